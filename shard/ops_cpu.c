/* The forward pass's operations on the host (ops.h): fp32 throughout,
 * OpenBLAS and the CPU quantized kernels for the linear layers, MPI for the
 * group's sums. Each is the reference its CUDA counterpart (ops_cuda.c,
 * kernels/cuda) is tested against. */
#define _POSIX_C_SOURCE 200809L
#include "ops.h"

#include "qs_collectives.h"
#include "qs_kernels.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int linear_forward(const linear *l, const float *X, size_t M, float *Y)
{
    int err = QS_OK;
    switch (l->scheme) {
    case QS_SCHEME_FP16:
        /* One token (decode) is a GEMV: OpenBLAS's sgemm pads it to a tile. */
        if (M == 1)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)l->N, (int)l->K, 1.0f, l->w32, (int)l->K,
                        X, 1, 0.0f, Y, 1);
        else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)l->N, (int)l->K, 1.0f,
                        X, (int)l->K, l->w32, (int)l->K, 0.0f, Y, (int)l->N);
        break;
    case QS_SCHEME_W8A8:
        err = qs_w8a8_gemm(&l->w8, X, M, 0.0f, Y);
        break;
    case QS_SCHEME_BCQ:
    case QS_SCHEME_RTN:
        err = qs_lutgemm(&l->bcq, X, M, Y);
        break;
    case QS_SCHEME_W4A4:
        err = qs_w4a4_gemm(&l->w4, X, M, Y);
        break;
    }
    if (!err && l->bias && l->add_bias)
        for (size_t m = 0; m < M; m++)
            for (size_t n = 0; n < l->N; n++)
                Y[m * l->N + n] += l->bias[n];
    return err;
}

/* x (n x H) -> y: LayerNorm (with b) or RMSNorm (b NULL), in float64 sums. */
static void norm_forward(const norm *nm, const float *x, size_t n, size_t H, float eps, float *y)
{
    for (size_t i = 0; i < n; i++) {
        const float *r = x + i * H;
        double mean = 0, var = 0;
        if (nm->b) {
            for (size_t j = 0; j < H; j++)
                mean += r[j];
            mean /= (double)H;
        }
        for (size_t j = 0; j < H; j++)
            var += (r[j] - mean) * (r[j] - mean);
        float inv = (float)(1.0 / sqrt(var / (double)H + eps));
        for (size_t j = 0; j < H; j++)
            y[i * H + j] = (float)(r[j] - mean) * inv * nm->w[j] + (nm->b ? nm->b[j] : 0.0f);
    }
}

/* Rotates one head vector in place for position p. Adjacent: pairs (2i,
 * 2i+1) (Meta and llama.cpp layout); else halves (i, i + hd/2) (Hugging Face). */
static void rope(const qs_model *m, float *v, uint32_t p)
{
    uint32_t half = m->hd / 2;
    const float *cs = m->rope_cs + (size_t)p * half * 2;
    for (uint32_t i = 0; i < half; i++) {
        uint32_t a = m->rope_adjacent ? 2 * i : i, b = m->rope_adjacent ? 2 * i + 1 : i + half;
        float x = v[a], y = v[b], c = cs[2 * i], s = cs[2 * i + 1];
        v[a] = x * c - y * s;
        v[b] = x * s + y * c;
    }
}

/* Row-head index of (layer, slot, position), KV head 0: the fp16 cache's
 * vectors and the int8/int4 caches' codes and scales are all [..][hkv][..]. */
static size_t kv_row(const qs_model *m, uint32_t l, uint32_t slot, uint32_t p)
{
    return (((size_t)l * m->max_slots + slot) * m->max_seq + p) * m->hkv;
}

static size_t kv_index(const qs_model *m, uint32_t l, uint32_t slot, uint32_t p)
{
    return kv_row(m, l, slot, p) * m->hd;
}

/* KV head kvh's key (k != 0) or value at (layer, slot, p): the fp16 cache's
 * own row, or the int8/int4 codes dequantized into buf (hd floats). */
static const float *kv_vec(const qs_model *m, int k, uint32_t l, uint32_t slot, uint32_t p,
                           uint32_t kvh, float *buf)
{
    size_t rh = kv_row(m, l, slot, p) + kvh;
    if (m->kv == QS_KV_FP16)
        return (k ? m->kcache : m->vcache) + rh * m->hd;
    size_t cb = qs_kv_code_bytes(m->kv, m->hd), ng = qs_kv_groups(m->hd);
    qs_kv_dequant(m->kv, (k ? m->kq : m->vq) + rh * cb, (k ? m->ks : m->vs) + rh * ng * 2, 1, m->hd,
                  buf);
    return buf;
}

/* Causal attention of n tokens over their slots' caches; out is n x hq*hd.
 * An int8/int4 cache is dequantized row by row as it is read. */
static void attention(const qs_model *m, uint32_t l, size_t n, const float *q, const uint32_t *slot,
                      const uint32_t *pos, float *out)
{
    uint32_t hd = m->hd, hq = m->hq, group = m->cfg.heads / m->cfg.kv_heads;
    float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (size_t i = 0; i < n; i++) {
        for (uint32_t h = 0; h < hq; h++) {
            uint32_t kvh = (m->q_first + h) / group - m->kv_first;
            const float *qi = q + i * hq * hd + (size_t)h * hd;
            float *o = out + i * hq * hd + (size_t)h * hd;
            uint32_t len = pos[i] + 1;
            float *sc = malloc((len + hd) * sizeof *sc);
            if (!sc)
                continue;          /* leaves zeros; the caller checked the cache size */
            float *buf = sc + len; /* a dequantized row */
            float mx = -INFINITY;
            for (uint32_t p = 0; p < len; p++) {
                const float *k = kv_vec(m, 1, l, slot[i], p, kvh, buf);
                float d = 0;
#pragma omp simd reduction(+ : d)
                for (uint32_t j = 0; j < hd; j++)
                    d += qi[j] * k[j];
                sc[p] = d * scale;
                mx = sc[p] > mx ? sc[p] : mx;
            }
            double sum = 0;
            for (uint32_t p = 0; p < len; p++)
                sum += sc[p] = expf(sc[p] - mx);
            memset(o, 0, hd * sizeof *o);
            for (uint32_t p = 0; p < len; p++) {
                const float *v = kv_vec(m, 0, l, slot[i], p, kvh, buf);
                float w = (float)(sc[p] / sum);
#pragma omp simd
                for (uint32_t j = 0; j < hd; j++)
                    o[j] += w * v[j];
            }
            free(sc);
        }
    }
}

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

/* Row-parallel output: sum the partial products of every rank in place. The
 * time spent waiting here is the price of the split (qs_model_comm_ms). */
static int reduce(qs_model *m, float *y, size_t count)
{
    double t0 = now_ms();
    int err = qs_comm_allreduce_sum(m->tp, y, y, count, QS_COLL_F32, QS_COLL_HOST);
    m->comm_ms += now_ms() - t0;
    return err;
}

/* SmoothQuant calibration: the per-channel abs-max of one linear input, n
 * tokens of width columns starting at column first of the site's statistics. */
static void record_absmax(qs_model *m, uint32_t l, int site, const float *h, size_t n, size_t first,
                          size_t width)
{
    if (!m->record)
        return;
    float *mx = m->record->absmax + qs_calib_at(m->record, l, site) + first;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < width; j++)
            mx[j] = fmaxf(mx[j], fabsf(h[i * width + j]));
}

/* ---- The table ---------------------------------------------------------- */

static int cpu_begin(qs_fwd *f)
{
    const qs_model *m = f->m;
    size_t n = f->n, H = m->cfg.hidden, E = m->cfg.embed_dim, w = H > E ? H : E;
    size_t sizes[] = {n * w,
                      n * w,
                      n * m->hq * m->hd,
                      n * m->hkv * m->hd,
                      n * m->hkv * m->hd,
                      n * m->hq * m->hd,
                      n * w,
                      n * m->fr,
                      n * m->fr};
    void **bufs[] = {&f->x, &f->h, &f->q, &f->k, &f->v, &f->att, &f->proj, &f->ff1, &f->ff2};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (!(*bufs[i] = malloc(sizes[i] * sizeof(float) + 1))) {
            for (size_t j = 0; j < i; j++)
                free(*bufs[j]), *bufs[j] = NULL;
            return qs_seterr(QS_ENOMEM, "out of memory for the activations of %zu tokens", n);
        }
    return QS_OK;
}

static void cpu_end(qs_fwd *f)
{
    void **bufs[] = {&f->x, &f->h, &f->q, &f->k, &f->v, &f->att, &f->proj, &f->ff1, &f->ff2};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        free(*bufs[i]), *bufs[i] = NULL;
}

/* Embedding rows live on the rank that owns the token's vocabulary block:
 * each rank fills the rows it owns, zeros elsewhere, and a sum gathers them. */
static int cpu_embed(qs_fwd *f)
{
    qs_model *m = f->m;
    size_t n = f->n, E = m->cfg.embed_dim, H = m->cfg.hidden;
    float *x = f->x, *e = E == H ? x : f->h;
    memset(e, 0, n * E * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        uint32_t t = (uint32_t)f->tokens[i];
        if (t >= m->v_first && t < m->v_first + m->vr) {
            size_t row = (size_t)(t - m->v_first) * E;
            if (m->embed16)
                qs_f16_to_f32_row(m->embed16 + row, E, e + i * E);
            else
                memcpy(e + i * E, m->embed + row, E * sizeof(float));
        }
    }
    int err = reduce(m, e, n * E);
    if (err)
        return err;
    if (E != H)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)H, (int)E, 1.0f, e,
                    (int)E, m->proj_in, (int)E, 0.0f, x, (int)H);
    if (m->pos)
        for (size_t i = 0; i < n; i++)
            for (size_t j = 0; j < H; j++)
                x[i * H + j] += m->pos[(size_t)(f->pos[i] + 2) * H + j];
    return QS_OK;
}

static int cpu_add_norm(qs_fwd *f, const void *d, const norm *nm, int post, void *y)
{
    const qs_model *m = f->m;
    size_t H = m->cfg.hidden, count = f->n * H;
    float *x = f->x;
    if (d)
        for (size_t i = 0; i < count; i++)
            x[i] += ((const float *)d)[i];
    norm_forward(nm, x, f->n, H, m->cfg.norm_eps, y);
    if (post)
        memcpy(x, y, count * sizeof(float));
    return QS_OK;
}

static int cpu_to_input(qs_fwd *f, void *y)
{
    memcpy(y, f->x, f->n * f->m->cfg.hidden * sizeof(float));
    return QS_OK;
}

static int cpu_linear(qs_fwd *f, const linear *l, const void *in, void *out)
{
    return linear_forward(l, in, f->n, out);
}

static int cpu_rope_kv(qs_fwd *f, uint32_t l)
{
    const qs_model *m = f->m;
    size_t hd = m->hd;
    float *q = f->q, *k = f->k, *v = f->v;
    for (size_t i = 0; i < f->n; i++) {
        if (m->cfg.rope_theta > 0) {
            for (uint32_t h = 0; h < m->hq; h++)
                rope(m, q + (i * m->hq + h) * hd, f->pos[i]);
            for (uint32_t h = 0; h < m->hkv; h++)
                rope(m, k + (i * m->hkv + h) * hd, f->pos[i]);
        }
        if (m->kv == QS_KV_FP16) {
            size_t at = kv_index(m, l, f->slot[i], f->pos[i]);
            memcpy(m->kcache + at, k + i * m->hkv * hd, m->hkv * hd * sizeof(float));
            memcpy(m->vcache + at, v + i * m->hkv * hd, m->hkv * hd * sizeof(float));
            continue;
        }
        /* int8/int4: the keys as rotated, quantized per head and group. */
        size_t rh = kv_row(m, l, f->slot[i], f->pos[i]);
        size_t cb = qs_kv_code_bytes(m->kv, hd), ng = qs_kv_groups(hd);
        int err = qs_kv_quantize(m->kv, k + i * m->hkv * hd, m->hkv, hd, m->kq + rh * cb,
                                 m->ks + rh * ng * 2);
        if (!err)
            err = qs_kv_quantize(m->kv, v + i * m->hkv * hd, m->hkv, hd, m->vq + rh * cb,
                                 m->vs + rh * ng * 2);
        if (err)
            return err;
    }
    return QS_OK;
}

static int cpu_attention(qs_fwd *f, uint32_t l)
{
    attention(f->m, l, f->n, f->q, f->slot, f->pos, f->att);
    return QS_OK;
}

static int cpu_ffn_act(qs_fwd *f, int gated)
{
    size_t nf = f->n * f->m->fr;
    float *a = f->ff1, *g = f->ff2;
    if (gated)
        for (size_t i = 0; i < nf; i++)
            a[i] *= g[i] / (1.0f + expf(-g[i]));
    else
        for (size_t i = 0; i < nf; i++)
            a[i] = a[i] > 0 ? a[i] : 0;
    return QS_OK;
}

static int cpu_reduce(qs_fwd *f, void *y, size_t count)
{
    return reduce(f->m, y, count);
}

/* Logits of nl tokens: each rank multiplies by its vocabulary rows, then an
 * all-gather and a transpose give every rank nl x vocab. */
static int cpu_logits(qs_fwd *f, const void *in_, size_t first, size_t nl, float *logits)
{
    qs_model *m = f->m;
    size_t H = m->cfg.hidden, E = m->cfg.embed_dim, V = m->cfg.vocab, vr = m->vr;
    size_t P = (size_t)m->size;
    const float *in = (const float *)in_ + first * H;
    float *proj = NULL, *local = NULL, *all = NULL;
    int err = QS_OK;
    if (E != H) {
        if (!(proj = malloc(nl * E * sizeof *proj)))
            return qs_seterr(QS_ENOMEM, "out of memory for the logits");
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nl, (int)E, (int)H, 1.0f, in,
                    (int)H, m->proj_out, (int)H, 0.0f, proj, (int)E);
        in = proj;
    }
    const float *table = m->lm_head ? m->lm_head : m->embed;
    const uint16_t *table16 = m->lm_head16 ? m->lm_head16 : m->embed16;
    local = malloc(nl * vr * sizeof *local);
    all = malloc(P * nl * vr * sizeof *all);
    if (!local || !all) {
        err = qs_seterr(QS_ENOMEM, "out of memory for the logits of %zu tokens", nl);
        goto out;
    }
    if (table16 && (err = qs_f16_gemm(table16, vr, E, in, nl, local)))
        goto out;
    if (!table16)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nl, (int)vr, (int)E, 1.0f, in,
                    (int)E, table, (int)E, 0.0f, local, (int)vr);
    double t0 = now_ms();
    err = qs_comm_allgather(m->tp, local, all, nl * vr, QS_COLL_F32, QS_COLL_HOST);
    m->comm_ms += now_ms() - t0;
    if (err)
        goto out;
    for (size_t r = 0; r < P; r++)
        for (size_t i = 0; i < nl; i++)
            for (size_t j = 0; j < vr && r * vr + j < V; j++)
                logits[i * V + r * vr + j] = all[(r * nl + i) * vr + j];
out:
    free(proj);
    free(local);
    free(all);
    return err;
}

static int cpu_record(qs_fwd *f, uint32_t l, int site, const void *buf, size_t first, size_t width)
{
    record_absmax(f->m, l, site, buf, f->n, first, width);
    float *H = qs_calib_hessian(f->m->record, l, site);
    return H ? qs_hessian_add(H, buf, f->n, width) : QS_OK;
}

static int cpu_sample(qs_fwd *f, const void *in, qs_sampler *s, int32_t *next)
{
    size_t V = f->m->cfg.vocab;
    float *logits = malloc(V * sizeof *logits);
    if (!logits)
        return qs_seterr(QS_ENOMEM, "out of memory for the logits");
    int err = cpu_logits(f, in, f->n - 1, 1, logits);
    if (!err)
        *next = qs_sample(s, logits, V);
    free(logits);
    return err;
}

const qs_ops qs_ops_cpu = {
    .name = "cpu",
    .begin = cpu_begin,
    .end = cpu_end,
    .embed = cpu_embed,
    .add_norm = cpu_add_norm,
    .to_input = cpu_to_input,
    .linear = cpu_linear,
    .rope_kv = cpu_rope_kv,
    .attention = cpu_attention,
    .ffn_act = cpu_ffn_act,
    .reduce = cpu_reduce,
    .logits = cpu_logits,
    .record = cpu_record,
    .sample = cpu_sample,
};
