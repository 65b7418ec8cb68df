/* One rank's shard of an OPT or Llama model: loading (file or synthetic),
 * quantization, and the forward pass with a KV cache, on the CPU.
 *
 * Shapes on a rank of a tp-way split (see shard/plan.c):
 *   hq local query heads, hkv local KV heads (qs_tp_heads), hd head size,
 *   fr = ffn / tp, vr = ceil(vocab / tp) vocabulary rows
 *   q: hq*hd x H   k, v: hkv*hd x H   o: H x hq*hd   (then all-reduce)
 *   fc1 | gate, up: fr x H            fc2 | down: H x fr (then all-reduce)
 *   embedding: vr x E rows [rank*vr, ...); logits all-gathered to n x vocab
 */
#define _POSIX_C_SOURCE 200809L
#include "model_internal.h"

#include "qs_collectives.h"
#include "qs_kernels.h"
#include "qs_synth.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

uint64_t qs_linear_bytes(const linear *l)
{
    size_t a = 0, b = 0, c = 0;
    switch (l->scheme) {
    case QS_SCHEME_FP16:
        a = l->N * l->K * sizeof(float);
        break;
    case QS_SCHEME_W8A8:
        a = qs_w8_bytes(l->N, l->K, l->w8.group);
        break;
    case QS_SCHEME_BCQ:
    case QS_SCHEME_RTN:
        qs_bcq_sizes(l->N, l->K, l->bcq.q, l->bcq.g, &a, &b, &c);
        break;
    }
    return a + b + c;
}

/* Takes ownership of W (N x K fp32) and stores it in the scheme's format. */
static int linear_set(linear *l, float *W, size_t N, size_t K, const qs_quant *q, unsigned iters)
{
    l->N = N, l->K = K, l->scheme = q->scheme;
    int err = QS_OK;
    switch (q->scheme) {
    case QS_SCHEME_FP16:
        l->w32 = W;
        return QS_OK;
    case QS_SCHEME_W8A8:
        err = qs_w8_quantize(&l->w8, W, N, K, q->group_size);
        break;
    case QS_SCHEME_RTN:
        err = qs_bcq_from_rtn(&l->bcq, W, N, K, (unsigned)q->bits, q->group_size);
        break;
    case QS_SCHEME_BCQ:
        err = qs_bcq_quantize(&l->bcq, W, N, K, (unsigned)q->bits, q->group_size, iters);
        break;
    }
    free(W);
    return err;
}

static void linear_close(linear *l)
{
    free(l->w32);
    qs_bcq_close(&l->bcq);
    qs_w8_close(&l->w8);
    free(l->bias);
    memset(l, 0, sizeof *l);
}

/* Y (M x N) = X (M x K) W^T (+ bias). */
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
    }
    if (!err && l->bias && l->add_bias)
        for (size_t m = 0; m < M; m++)
            for (size_t n = 0; n < l->N; n++)
                Y[m * l->N + n] += l->bias[n];
    return err;
}

const qs_model_config *qs_model_cfg(const qs_model *m)
{
    return &m->cfg;
}

double qs_model_comm_ms(const qs_model *m)
{
    return m->comm_ms;
}

float qs_model_smoothing(const qs_model *m)
{
    return m->smooth_alpha;
}

qs_comm *qs_model_comm(const qs_model *m)
{
    return m->tp;
}

void qs_model_bytes(const qs_model *m, qs_rank_bytes *out)
{
    *out = m->bytes;
}

/* ---- Weight sources: a file, or synthetic values ------------------------ */

/* The tensors a layer needs, by role; names per file convention below. */
typedef enum role {
    R_Q,
    R_K,
    R_V,
    R_O,
    R_UP,
    R_GATE,
    R_DOWN,
    R_ATTN_NORM,
    R_FFN_NORM, /* per layer */
    R_EMBED,
    R_LM_HEAD,
    R_POS,
    R_FINAL_NORM,
    R_PROJ_IN,
    R_PROJ_OUT /* global */
} role;

typedef struct source {
    const qs_weights *w; /* NULL: synthetic */
    int gguf;            /* GGUF names and layout */
    uint64_t seed;
    uint32_t outliers;
    const qs_model_config *cfg;
} source;

static void tensor_name(const source *s, role r, int l, int bias, char *out, size_t n)
{
    static const char *gguf[] = {"attn_q",      "attn_k",     "attn_v",   "attn_output",
                                 "ffn_up",      "ffn_gate",   "ffn_down", "attn_norm",
                                 "ffn_norm",    "token_embd", "output",   "",
                                 "output_norm", "",           ""};
    static const char *llama[] = {"self_attn.q_proj",
                                  "self_attn.k_proj",
                                  "self_attn.v_proj",
                                  "self_attn.o_proj",
                                  "mlp.up_proj",
                                  "mlp.gate_proj",
                                  "mlp.down_proj",
                                  "input_layernorm",
                                  "post_attention_layernorm",
                                  "model.embed_tokens",
                                  "lm_head",
                                  "",
                                  "model.norm",
                                  "",
                                  ""};
    static const char *opt[] = {"self_attn.q_proj",
                                "self_attn.k_proj",
                                "self_attn.v_proj",
                                "self_attn.out_proj",
                                "fc1",
                                "",
                                "fc2",
                                "self_attn_layer_norm",
                                "final_layer_norm",
                                "model.decoder.embed_tokens",
                                "",
                                "model.decoder.embed_positions",
                                "model.decoder.final_layer_norm",
                                "model.decoder.project_in",
                                "model.decoder.project_out"};
    const char *suffix = bias ? "bias" : "weight";
    if (s->gguf) {
        if (r <= R_FFN_NORM)
            snprintf(out, n, "blk.%d.%s.%s", l, gguf[r], suffix);
        else
            snprintf(out, n, "%s.%s", gguf[r], suffix);
    } else if (s->cfg->arch == QS_ARCH_LLAMA) {
        if (r <= R_FFN_NORM)
            snprintf(out, n, "model.layers.%d.%s.%s", l, llama[r], suffix);
        else
            snprintf(out, n, "%s.%s", llama[r], suffix);
    } else {
        if (r <= R_FFN_NORM)
            snprintf(out, n, "model.decoder.layers.%d.%s.%s", l, opt[r], suffix);
        else
            snprintf(out, n, "%s.%s", opt[r], suffix);
    }
}

/* Reads rows [r0, r0+nr) x cols [c0, c0+nc) of a tensor whose whole shape is
 * rows x cols; allocates *out. Missing optional tensors (biases) give NULL. */
static int source_read(const source *s, role r, int l, int bias, uint64_t rows, uint64_t cols,
                       uint64_t r0, uint64_t nr, uint64_t c0, uint64_t nc, float **out)
{
    *out = NULL;
    float *dst = calloc(nr * nc + 1, sizeof *dst);
    if (!dst)
        return qs_seterr(QS_ENOMEM, "out of memory for a %llu x %llu weight slice",
                         (unsigned long long)nr, (unsigned long long)nc);
    char name[160];
    tensor_name(s, r, l, bias, name, sizeof name);
    if (!s->w) {
        int is_norm = r == R_ATTN_NORM || r == R_FFN_NORM || r == R_FINAL_NORM;
        uint64_t key = qs_synth_mix(
            s->seed ^ qs_synth_mix((uint64_t)r << 32 | (uint64_t)(l + 1) << 1 | (uint64_t)bias));
        /* Pre-trained scale: N(0, 0.02) weights, unit norm gains; the first
         * `outliers` hidden channels get 20x gains, so the activations that
         * feed the linears carry the outlier channels SmoothQuant targets. */
        int kind = bias ? QS_SYNTH_BIAS : is_norm ? QS_SYNTH_NORM : QS_SYNTH_WEIGHT;
        for (uint64_t i = 0; i < nr; i++)
            for (uint64_t j = 0; j < nc; j++)
                dst[i * nc + j] =
                    qs_synth_value(key, (r0 + i) * cols + c0 + j, c0 + j, kind, s->outliers);
        *out = dst;
        return QS_OK;
    }
    const qs_tensor_info *t = qs_weights_find(s->w, name);
    if (!t) {
        free(dst);
        if (bias)
            return qs_clearerr(), QS_OK;
        return qs_seterr(QS_EFORMAT,
                         "the weights have no tensor '%s', which a %s model with "
                         "this configuration needs",
                         name, s->cfg->arch == QS_ARCH_OPT ? "OPT" : "Llama");
    }
    uint64_t trows = 1, tcols = t->shape[t->ndim - 1];
    for (uint32_t d = 0; d + 1 < t->ndim; d++)
        trows *= t->shape[d];
    if (trows != rows || tcols != cols) {
        free(dst);
        return qs_seterr(QS_EFORMAT,
                         "%s: tensor '%s' is %llu x %llu but the configuration "
                         "needs %llu x %llu",
                         t->file, name, (unsigned long long)trows, (unsigned long long)tcols,
                         (unsigned long long)rows, (unsigned long long)cols);
    }
    int err = qs_weights_read_f32(s->w, t, r0, nr, c0, nc, dst);
    if (err) {
        free(dst);
        return err;
    }
    *out = dst;
    return QS_OK;
}

/* ---- Loading ------------------------------------------------------------ */

/* Reads one linear layer's slice (fp32) and its bias; the weights are
 * quantized later by finish_linear, after any smoothing is folded in. */
static int read_linear(qs_model *m, const source *s, role r, int l, linear *lin, uint64_t rows,
                       uint64_t cols, uint64_t r0, uint64_t nr, uint64_t c0, uint64_t nc,
                       int row_parallel, float **W)
{
    int err = source_read(s, r, l, 0, rows, cols, r0, nr, c0, nc, W);
    if (err)
        return err;
    lin->N = nr, lin->K = nc;
    if (!m->cfg.linear_bias)
        return QS_OK;
    /* A row-parallel bias is whole on every rank and added once, after the
     * all-reduce, by rank 0's partial sum. */
    if ((err = source_read(s, r, l, 1, 1, rows, 0, 1, r0, nr, &lin->bias)))
        return err;
    lin->add_bias = !row_parallel || m->rank == 0;
    if (lin->bias)
        m->bytes.fp16 += nr * sizeof(float);
    return QS_OK;
}

static int finish_linear(qs_model *m, linear *lin, float *W, unsigned iters)
{
    int err = linear_set(lin, W, lin->N, lin->K, &m->quant, iters);
    if (!err)
        m->bytes.linear += qs_linear_bytes(lin);
    return err;
}

static int load_norm(qs_model *m, const source *s, role r, int l, norm *nm)
{
    uint64_t h = m->cfg.hidden;
    int err = source_read(s, r, l, 0, 1, h, 0, 1, 0, h, &nm->w);
    if (!err && m->cfg.norm == QS_NORM_LAYER) {
        err = source_read(s, r, l, 1, 1, h, 0, 1, 0, h, &nm->b);
        if (!err && !nm->b) {
            /* A LayerNorm without a stored bias has a zero one. */
            nm->b = calloc(h, sizeof(float));
            if (!nm->b)
                err = qs_seterr(QS_ENOMEM, "out of memory for a norm");
        }
    }
    m->bytes.fp16 += h * sizeof(float) * (nm->b ? 2 : 1);
    return err;
}

static void norm_close(norm *n)
{
    free(n->w);
    free(n->b);
}

static int calib_check(const qs_calib *c, const qs_model_config *cfg);

/* Where site's statistics of layer l start in a qs_calib (layout in qs_shard.h). */
static size_t calib_at(const qs_calib *c, uint32_t l, int site)
{
    size_t H = c->hidden, A = c->attn, F = c->ffn, at = (size_t)l * (2 * H + A + F);
    switch (site) {
    case QS_CALIB_QKV:
        return at;
    case QS_CALIB_O:
        return at + H;
    case QS_CALIB_UP:
        return at + H + A;
    default:
        return at + 2 * H + A;
    }
}

static size_t calib_floats(const qs_calib *c)
{
    return calib_at(c, c->layers, QS_CALIB_QKV);
}

/* Each rank records the columns it computes: the maxima over the group give
 * the whole statistics, whatever split recorded them. out->absmax is owned
 * by the caller. */
static int calib_merge(qs_model *m, const qs_calib *c, qs_calib *out)
{
    size_t n = calib_floats(c), P = (size_t)m->size;
    float *all = malloc(n * P * sizeof *all), *mx = malloc(n * sizeof *mx);
    int err = !all || !mx ? qs_seterr(QS_ENOMEM, "out of memory for SmoothQuant statistics")
                          : qs_comm_allgather(m->tp, c->absmax, all, n, QS_COLL_F32, QS_COLL_HOST);
    if (!err) {
        memcpy(mx, all, n * sizeof *mx);
        for (size_t r = 1; r < P; r++)
            for (size_t i = 0; i < n; i++)
                mx[i] = fmaxf(mx[i], all[r * n + i]);
    }
    free(all);
    if (err) {
        free(mx);
        mx = NULL;
    }
    *out = *c;
    out->absmax = mx;
    return err;
}

/* SmoothQuant at one norm-fed input: s_j from the calibration abs-max of
 * the norm's output and the column abs-max of every weight it feeds, over
 * the whole model (a column's rows are spread over the ranks, so the maxima
 * are all-gathered), then 1/s folded into the norm and s into the columns. */
static int smooth_site(qs_model *m, const float *act, norm *nm, float **W, const size_t *N,
                       size_t nlin, float alpha)
{
    size_t K = m->cfg.hidden, P = (size_t)m->size;
    float *wmax = calloc(K * (P + 1), sizeof *wmax), *s = malloc(K * sizeof *s);
    int err = QS_OK;
    if (!wmax || !s) {
        err = qs_seterr(QS_ENOMEM, "out of memory for SmoothQuant factors");
        goto out;
    }
    float *all = wmax + K;
    for (size_t l = 0; l < nlin; l++)
        for (size_t n = 0; n < N[l]; n++)
            for (size_t j = 0; j < K; j++)
                wmax[j] = fmaxf(wmax[j], fabsf(W[l][n * K + j]));
    if ((err = qs_comm_allgather(m->tp, wmax, all, K, QS_COLL_F32, QS_COLL_HOST)))
        goto out;
    for (size_t r = 0; r < P; r++)
        for (size_t j = 0; j < K; j++)
            wmax[j] = fmaxf(wmax[j], all[r * K + j]);
    /* The global maxima as a one-row matrix: the kernels' formula does the rest. */
    const float *one[1] = {wmax};
    size_t n1 = 1;
    if ((err = qs_smooth_scales(act, K, one, &n1, 1, alpha, s)) ||
        (err = qs_smooth_fold(nm->w, nm->b, K, W, N, nlin, s)))
        goto out;
out:
    free(wmax);
    free(s);
    return err;
}

/* SmoothQuant between two linears: P's output rows reach C's input columns
 * through an operation that commutes with a positive scale per channel
 * (attention's weighted sum of V, ReLU, the product with SwiGLU's gate), so
 * 1/s folded into P's rows and bias and s into C's columns leave fp32
 * outputs unchanged. C column j reads P row map[j] (GQA: one V row feeds the
 * same dimension of several query heads), so s is one factor per P row, from
 * the maxima over its columns. C is row-parallel: its columns are whole on
 * this rank and need no gather. */
static int smooth_pair(const float *act, float *Wp, float *bias, size_t rows, size_t K, float *Wc,
                       size_t N, size_t cols, const uint32_t *map, float alpha)
{
    float *amax = calloc(2 * rows, sizeof *amax), *s = malloc(rows * sizeof *s);
    float *wmax = amax + rows;
    int err = QS_OK;
    if (!amax || !s) {
        err = qs_seterr(QS_ENOMEM, "out of memory for SmoothQuant factors");
        goto out;
    }
    for (size_t j = 0; j < cols; j++)
        amax[map[j]] = fmaxf(amax[map[j]], act[j]);
    for (size_t n = 0; n < N; n++)
        for (size_t j = 0; j < cols; j++)
            wmax[map[j]] = fmaxf(wmax[map[j]], fabsf(Wc[n * cols + j]));
    const float *one[1] = {wmax};
    size_t n1 = 1;
    if ((err = qs_smooth_scales(amax, rows, one, &n1, 1, alpha, s)))
        goto out;
    for (size_t r = 0; r < rows; r++) {
        float inv = 1.0f / s[r];
        for (size_t k = 0; k < K; k++)
            Wp[r * K + k] *= inv;
        if (bias)
            bias[r] *= inv;
    }
    for (size_t n = 0; n < N; n++)
        for (size_t j = 0; j < cols; j++)
            Wc[n * cols + j] *= s[map[j]];
out:
    free(amax);
    free(s);
    return err;
}

/* W8A8 with calibration. q/k/v and up/gate are fed by a norm (SmoothQuant's
 * reference code smooths these two), o by V. down is fed by up and smoothed
 * only with one activation scale per token: the FFN's inner activation
 * carries the largest outliers, which flatten a whole token's codes; in
 * channel groups they flatten one group, and smoothing down then only moves
 * precision out of its weights (SmolLM2, 16 windows: +0.49% over fp32
 * without, +0.82% with). Post-LN OPT has no norm in front of q/k/v. */
static int smooth_layer(qs_model *m, uint32_t l, const qs_calib *cal, float alpha, float *Wq,
                        float *Wk, float *Wv, float *Wo, float *Wu, float *Wg, float *Wd)
{
    const qs_model_config *c = &m->cfg;
    layer *L = &m->layers[l];
    size_t H = c->hidden, hd = m->hd, cols = (size_t)m->hq * hd, F = m->fr;
    float *qkv[3] = {Wq, Wk, Wv}, *ffn[2] = {Wu, Wg};
    size_t nqkv[3] = {L->q.N, L->k.N, L->v.N}, nffn[2] = {L->up.N, L->gate.N};
    uint32_t *map = malloc((cols > F ? cols : F) * sizeof *map);
    if (!map)
        return qs_seterr(QS_ENOMEM, "out of memory for SmoothQuant factors");
    int err = smooth_site(m, cal->absmax + calib_at(cal, l, QS_CALIB_QKV), &L->attn_norm, qkv, nqkv,
                          3, alpha);
    if (!err)
        err = smooth_site(m, cal->absmax + calib_at(cal, l, QS_CALIB_UP), &L->ffn_norm, ffn, nffn,
                          Wg ? 2 : 1, alpha);
    if (!err) {
        uint32_t group = c->heads / c->kv_heads;
        for (size_t j = 0; j < cols; j++)
            map[j] = ((m->q_first + (uint32_t)(j / hd)) / group - m->kv_first) * (uint32_t)hd +
                     (uint32_t)(j % hd);
        err = smooth_pair(cal->absmax + calib_at(cal, l, QS_CALIB_O) + m->q_first * hd, Wv,
                          L->v.bias, L->v.N, H, Wo, L->o.N, cols, map, alpha);
    }
    if (!err && qs_w8_groups(F, m->quant.group_size) == 1) {
        for (size_t j = 0; j < F; j++)
            map[j] = (uint32_t)j;
        err = smooth_pair(cal->absmax + calib_at(cal, l, QS_CALIB_DOWN) + (size_t)m->rank * m->fr,
                          Wu, L->up.bias, L->up.N, H, Wd, L->down.N, F, map, alpha);
    }
    free(map);
    return err;
}

static int load_layer(qs_model *m, const source *s, int l, const qs_model_opts *o,
                      const qs_calib *calib)
{
    const qs_model_config *c = &m->cfg;
    layer *L = &m->layers[l];
    uint64_t H = c->hidden, hd = c->head_dim, qd = (uint64_t)c->heads * hd;
    uint64_t kvd = (uint64_t)c->kv_heads * hd, F = c->ffn, f0 = (uint64_t)m->rank * m->fr;
    float *Wq = NULL, *Wk = NULL, *Wv = NULL, *Wo = NULL, *Wu = NULL, *Wg = NULL, *Wd = NULL;
    int err;
    if ((err = load_norm(m, s, R_ATTN_NORM, l, &L->attn_norm)) ||
        (err = load_norm(m, s, R_FFN_NORM, l, &L->ffn_norm)) ||
        (err =
             read_linear(m, s, R_Q, l, &L->q, qd, H, m->q_first * hd, m->hq * hd, 0, H, 0, &Wq)) ||
        (err = read_linear(m, s, R_K, l, &L->k, kvd, H, m->kv_first * hd, m->hkv * hd, 0, H, 0,
                           &Wk)) ||
        (err = read_linear(m, s, R_V, l, &L->v, kvd, H, m->kv_first * hd, m->hkv * hd, 0, H, 0,
                           &Wv)) ||
        (err =
             read_linear(m, s, R_O, l, &L->o, H, qd, 0, H, m->q_first * hd, m->hq * hd, 1, &Wo)) ||
        (err = read_linear(m, s, R_UP, l, &L->up, F, H, f0, m->fr, 0, H, 0, &Wu)) ||
        (err = read_linear(m, s, R_DOWN, l, &L->down, H, F, 0, H, f0, m->fr, 1, &Wd)) ||
        (c->gated_ffn &&
         (err = read_linear(m, s, R_GATE, l, &L->gate, F, H, f0, m->fr, 0, H, 0, &Wg))))
        goto out;
    if (calib) {
        m->smooth_alpha = o->smooth_alpha > 0 ? o->smooth_alpha : 0.5f;
        if ((err =
                 smooth_layer(m, (uint32_t)l, calib, m->smooth_alpha, Wq, Wk, Wv, Wo, Wu, Wg, Wd)))
            goto out;
    }
    /* Quantize; finish_linear takes ownership of each array. */
    linear *lins[] = {&L->q, &L->k, &L->v, &L->o, &L->up, &L->down, &L->gate};
    float **ws[] = {&Wq, &Wk, &Wv, &Wo, &Wu, &Wd, &Wg};
    for (size_t i = 0; i < sizeof lins / sizeof lins[0] && !err; i++) {
        if (*ws[i])
            err = finish_linear(m, lins[i], *ws[i], o->bcq_iters);
        *ws[i] = NULL;
    }
out:
    free(Wq), free(Wk), free(Wv), free(Wo), free(Wu), free(Wg), free(Wd);
    return err;
}

/* Vocabulary rows [v_first, v_first + vr) of a vocab x width table; rows
 * past the vocabulary (the last rank's padding) stay zero. */
static int load_vocab_rows(qs_model *m, const source *s, role r, uint64_t width, float **out)
{
    uint64_t V = m->cfg.vocab, have = m->v_first < V ? V - m->v_first : 0;
    if (have > m->vr)
        have = m->vr;
    float *slice = NULL;
    int err = have ? source_read(s, r, -1, 0, V, width, m->v_first, have, 0, width, &slice) : 0;
    if (err)
        return err;
    float *t = calloc((size_t)m->vr * width, sizeof *t);
    if (!t) {
        free(slice);
        return qs_seterr(QS_ENOMEM, "out of memory for the embedding table");
    }
    if (slice)
        memcpy(t, slice, have * width * sizeof *t);
    free(slice);
    *out = t;
    m->bytes.fp16 += (uint64_t)m->vr * width * sizeof(float);
    return QS_OK;
}

/* cos and sin of every position's rotation angles, once per model:
 * rope_cs[(p * hd/2 + i) * 2 + {0,1}] for angle p * theta^(-2i/hd). */
static int rope_table(qs_model *m)
{
    if (m->cfg.rope_theta <= 0)
        return QS_OK;
    size_t half = m->hd / 2;
    m->rope_cs = malloc((size_t)m->max_seq * half * 2 * sizeof(float));
    if (!m->rope_cs)
        return qs_seterr(QS_ENOMEM, "out of memory for the RoPE table");
    for (size_t p = 0; p < m->max_seq; p++) {
        for (size_t i = 0; i < half; i++) {
            double f = (double)p * pow((double)m->cfg.rope_theta, -2.0 * (double)i / m->hd);
            m->rope_cs[(p * half + i) * 2] = (float)cos(f);
            m->rope_cs[(p * half + i) * 2 + 1] = (float)sin(f);
        }
    }
    return QS_OK;
}

int qs_model_init(const qs_model_config *cfg, const qs_model_opts *opts, qs_comm *tp,
                  qs_model **out)
{
    if (!cfg || !opts || !tp || !out)
        return qs_seterr(QS_EINVAL, "qs_model_init: configuration, options, communicator and "
                                    "out are required");
    *out = NULL;
    int err = qs_config_check(cfg);
    if (err)
        return err;
    qs_quant q = opts->quant;
    if (q.scheme == QS_SCHEME_FP16)
        q.group_size = 0;
    if ((err = qs_quant_check(&q)))
        return err;
    uint32_t size = (uint32_t)qs_comm_size(tp);
    if ((err = qs_tp_check(cfg, &q, size)))
        return err;

    qs_model *m = calloc(1, sizeof *m);
    if (!m)
        return qs_seterr(QS_ENOMEM, "out of memory");
    m->cfg = *cfg;
    m->quant = q;
    m->tp = tp;
    m->rank = qs_comm_rank(tp);
    m->size = (int)size;
    m->hd = cfg->head_dim;
    qs_heads heads = qs_tp_heads(cfg, size, (uint32_t)m->rank);
    m->hq = heads.hq, m->q_first = heads.q_first;
    m->hkv = heads.hkv, m->kv_first = heads.kv_first;
    m->fr = cfg->ffn / size;
    m->vr = (cfg->vocab + size - 1) / size;
    m->v_first = (uint32_t)m->rank * m->vr;
    m->max_slots = opts->max_slots ? opts->max_slots : 1;
    m->max_seq = opts->max_seq ? opts->max_seq : (cfg->max_pos < 2048 ? cfg->max_pos : 2048);
    if (m->max_seq > cfg->max_pos || m->max_slots > 4096) {
        free(m);
        return qs_seterr(QS_EINVAL,
                         "KV cache of %u slots x %u tokens is out of range: at most "
                         "4096 slots of the model's %u-token context",
                         opts->max_slots, opts->max_seq, cfg->max_pos);
    }

    qs_weights *file = NULL;
    qs_calib merged = {0}; /* SmoothQuant statistics, merged over the group */
    source s = {.seed = opts->seed, .outliers = opts->outlier_channels, .cfg = &m->cfg};
    if (opts->weights && !qs_is_checkpoint(opts->weights)) {
        if ((err = qs_weights_open(opts->weights, &file)))
            goto fail;
        s.w = file;
        s.gguf = qs_weights_find(file, "token_embd.weight") != NULL;
        qs_clearerr();
        /* llama.cpp stores Q and K permuted for rotation of adjacent pairs. */
        m->rope_adjacent = s.gguf;
    }
    if (s.outliers > cfg->hidden)
        s.outliers = cfg->hidden;

    uint64_t H = cfg->hidden, E = cfg->embed_dim;
    m->layers = calloc(cfg->layers, sizeof *m->layers);
    if (!m->layers) {
        err = qs_seterr(QS_ENOMEM, "out of memory");
        goto fail;
    }
    if (opts->weights && qs_is_checkpoint(opts->weights)) {
        if ((err = qs_checkpoint_load(m, opts->weights)))
            goto fail;
        goto cache;
    }
    if (opts->calib && cfg->final_norm &&
        ((err = calib_check(opts->calib, cfg)) || (err = calib_merge(m, opts->calib, &merged))))
        goto fail;
    for (uint32_t l = 0; l < cfg->layers; l++) {
        if ((err = load_layer(m, &s, (int)l, opts, merged.absmax ? &merged : NULL)))
            goto fail;
        if (opts->progress)
            opts->progress(opts->progress_ctx, l + 1, cfg->layers);
    }
    if ((err = load_vocab_rows(m, &s, R_EMBED, E, &m->embed)))
        goto fail;
    if (!cfg->tied_embeddings && (err = load_vocab_rows(m, &s, R_LM_HEAD, H, &m->lm_head)))
        goto fail;
    if (cfg->final_norm && (err = load_norm(m, &s, R_FINAL_NORM, -1, &m->final_norm)))
        goto fail;
    if (cfg->learned_pos) {
        uint64_t P = (uint64_t)cfg->max_pos + 2;
        if ((err = source_read(&s, R_POS, -1, 0, P, H, 0, P, 0, H, &m->pos)))
            goto fail;
        m->bytes.fp16 += P * H * sizeof(float);
    }
    if (E != H) {
        if ((err = source_read(&s, R_PROJ_IN, -1, 0, H, E, 0, H, 0, E, &m->proj_in)) ||
            (err = source_read(&s, R_PROJ_OUT, -1, 0, E, H, 0, E, 0, H, &m->proj_out)))
            goto fail;
        m->bytes.fp16 += 2 * H * E * sizeof(float);
    }

cache:
    if ((err = rope_table(m)))
        goto fail;
    size_t kv = (size_t)cfg->layers * m->max_slots * m->max_seq * m->hkv * m->hd;
    m->kcache = calloc(kv, sizeof(float));
    m->vcache = calloc(kv, sizeof(float));
    if (!m->kcache || !m->vcache) {
        err = qs_seterr(QS_ENOMEM,
                        "out of memory for a KV cache of %u slots x %u tokens: "
                        "lower --max-seq or --slots",
                        m->max_slots, m->max_seq);
        goto fail;
    }
    m->bytes.kv_cache = 2 * kv * sizeof(float);
    m->bytes.total = m->bytes.linear + m->bytes.fp16 + m->bytes.kv_cache;
    qs_weights_close(file);
    qs_calib_close(&merged);
    *out = m;
    return QS_OK;
fail:
    qs_weights_close(file);
    qs_calib_close(&merged);
    qs_model_close(m);
    return err;
}

void qs_model_close(qs_model *m)
{
    if (!m)
        return;
    for (uint32_t l = 0; m->layers && l < m->cfg.layers; l++) {
        layer *L = &m->layers[l];
        norm_close(&L->attn_norm);
        norm_close(&L->ffn_norm);
        linear *lins[] = {&L->q, &L->k, &L->v, &L->o, &L->up, &L->gate, &L->down};
        for (size_t i = 0; i < sizeof lins / sizeof lins[0]; i++)
            linear_close(lins[i]);
    }
    free(m->layers);
    free(m->embed);
    free(m->lm_head);
    free(m->pos);
    free(m->proj_in);
    free(m->proj_out);
    norm_close(&m->final_norm);
    free(m->kcache);
    free(m->vcache);
    free(m->rope_cs);
    free(m);
}

/* ---- Forward pass ------------------------------------------------------- */

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

static size_t kv_index(const qs_model *m, uint32_t l, uint32_t slot, uint32_t p)
{
    return (((size_t)l * m->max_slots + slot) * m->max_seq + p) * m->hkv * m->hd;
}

/* Causal attention of n tokens over their slots' caches; out is n x hq*hd. */
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
            float *sc = malloc(len * sizeof *sc);
            if (!sc)
                continue; /* leaves zeros; the caller checked the cache size */
            float mx = -INFINITY;
            for (uint32_t p = 0; p < len; p++) {
                const float *k = m->kcache + kv_index(m, l, slot[i], p) + (size_t)kvh * hd;
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
                const float *v = m->vcache + kv_index(m, l, slot[i], p) + (size_t)kvh * hd;
                float w = (float)(sc[p] / sum);
#pragma omp simd
                for (uint32_t j = 0; j < hd; j++)
                    o[j] += w * v[j];
            }
            free(sc);
        }
    }
}

typedef struct scratch {
    float *x, *h, *q, *k, *v, *att, *proj, *ff1, *ff2;
} scratch;

static void scratch_free(scratch *s)
{
    float **p[] = {&s->x, &s->h, &s->q, &s->k, &s->v, &s->att, &s->proj, &s->ff1, &s->ff2};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
        free(*p[i]);
}

static int scratch_alloc(const qs_model *m, size_t n, scratch *s)
{
    size_t H = m->cfg.hidden, E = m->cfg.embed_dim;
    size_t w = H > E ? H : E;
    memset(s, 0, sizeof *s);
    s->x = malloc(n * w * sizeof(float));
    s->h = malloc(n * w * sizeof(float));
    s->q = malloc(n * m->hq * m->hd * sizeof(float));
    s->k = malloc(n * m->hkv * m->hd * sizeof(float));
    s->v = malloc(n * m->hkv * m->hd * sizeof(float));
    s->att = malloc(n * m->hq * m->hd * sizeof(float));
    s->proj = malloc(n * w * sizeof(float));
    s->ff1 = malloc(n * m->fr * sizeof(float));
    s->ff2 = malloc(n * m->fr * sizeof(float));
    if (!s->x || !s->h || !s->q || !s->k || !s->v || !s->att || !s->proj || !s->ff1 || !s->ff2) {
        scratch_free(s);
        return qs_seterr(QS_ENOMEM, "out of memory for the activations of %zu tokens", n);
    }
    return QS_OK;
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
    float *mx = m->record->absmax + calib_at(m->record, l, site) + first;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < width; j++)
            mx[j] = fmaxf(mx[j], fabsf(h[i * width + j]));
}

static int layer_forward(qs_model *m, uint32_t l, size_t n, const uint32_t *slot,
                         const uint32_t *pos, scratch *s)
{
    const qs_model_config *c = &m->cfg;
    layer *L = &m->layers[l];
    size_t H = c->hidden, hd = m->hd;
    int pre = c->final_norm || c->arch == QS_ARCH_LLAMA; /* OPT-350m is post-LN */
    int err;

    /* Attention block. */
    const float *in = s->x;
    if (pre) {
        norm_forward(&L->attn_norm, s->x, n, H, c->norm_eps, s->h);
        in = s->h;
        record_absmax(m, l, QS_CALIB_QKV, s->h, n, 0, H);
    }
    if ((err = linear_forward(&L->q, in, n, s->q)) || (err = linear_forward(&L->k, in, n, s->k)) ||
        (err = linear_forward(&L->v, in, n, s->v)))
        return err;
    for (size_t i = 0; i < n; i++) {
        if (c->rope_theta > 0) {
            for (uint32_t h = 0; h < m->hq; h++)
                rope(m, s->q + (i * m->hq + h) * hd, pos[i]);
            for (uint32_t h = 0; h < m->hkv; h++)
                rope(m, s->k + (i * m->hkv + h) * hd, pos[i]);
        }
        size_t at = kv_index(m, l, slot[i], pos[i]);
        memcpy(m->kcache + at, s->k + i * m->hkv * hd, m->hkv * hd * sizeof(float));
        memcpy(m->vcache + at, s->v + i * m->hkv * hd, m->hkv * hd * sizeof(float));
    }
    attention(m, l, n, s->q, slot, pos, s->att);
    record_absmax(m, l, QS_CALIB_O, s->att, n, (size_t)m->q_first * hd, (size_t)m->hq * hd);
    if ((err = linear_forward(&L->o, s->att, n, s->proj)) || (err = reduce(m, s->proj, n * H)))
        return err;
    for (size_t i = 0; i < n * H; i++)
        s->x[i] += s->proj[i];
    if (!pre)
        norm_forward(&L->attn_norm, s->x, n, H, c->norm_eps, s->x);

    /* FFN block: SwiGLU (Llama) or ReLU (OPT). */
    in = s->x;
    if (pre) {
        norm_forward(&L->ffn_norm, s->x, n, H, c->norm_eps, s->h);
        in = s->h;
        record_absmax(m, l, QS_CALIB_UP, s->h, n, 0, H);
    }
    if ((err = linear_forward(&L->up, in, n, s->ff1)))
        return err;
    size_t nf = n * m->fr;
    if (c->gated_ffn) {
        if ((err = linear_forward(&L->gate, in, n, s->ff2)))
            return err;
        for (size_t i = 0; i < nf; i++) {
            float g = s->ff2[i];
            s->ff1[i] *= g / (1.0f + expf(-g));
        }
    } else {
        for (size_t i = 0; i < nf; i++)
            s->ff1[i] = s->ff1[i] > 0 ? s->ff1[i] : 0;
    }
    record_absmax(m, l, QS_CALIB_DOWN, s->ff1, n, (size_t)m->rank * m->fr, m->fr);
    if ((err = linear_forward(&L->down, s->ff1, n, s->proj)) || (err = reduce(m, s->proj, n * H)))
        return err;
    for (size_t i = 0; i < n * H; i++)
        s->x[i] += s->proj[i];
    if (!pre)
        norm_forward(&L->ffn_norm, s->x, n, H, c->norm_eps, s->x);
    return QS_OK;
}

/* Embedding rows live on the rank that owns the token's vocabulary block:
 * each rank fills the rows it owns, zeros elsewhere, and a sum gathers them. */
static int embed(qs_model *m, size_t n, const int32_t *tokens, const uint32_t *pos, scratch *s)
{
    size_t E = m->cfg.embed_dim, H = m->cfg.hidden;
    float *e = E == H ? s->x : s->h;
    memset(e, 0, n * E * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        uint32_t t = (uint32_t)tokens[i];
        if (t >= m->v_first && t < m->v_first + m->vr)
            memcpy(e + i * E, m->embed + (size_t)(t - m->v_first) * E, E * sizeof(float));
    }
    int err = reduce(m, e, n * E);
    if (err)
        return err;
    if (E != H)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)H, (int)E, 1.0f, e,
                    (int)E, m->proj_in, (int)E, 0.0f, s->x, (int)H);
    if (m->pos)
        for (size_t i = 0; i < n; i++)
            for (size_t j = 0; j < H; j++)
                s->x[i * H + j] += m->pos[(size_t)(pos[i] + 2) * H + j];
    return QS_OK;
}

/* Logits of the last nl tokens: each rank multiplies by its vocabulary rows,
 * then an all-gather and a transpose give every rank nl x vocab. */
static int logits_forward(qs_model *m, const float *x, size_t nl, float *logits)
{
    size_t H = m->cfg.hidden, E = m->cfg.embed_dim, V = m->cfg.vocab, vr = m->vr;
    size_t P = (size_t)m->size;
    const float *in = x;
    float *proj = NULL, *local = NULL, *all = NULL;
    int err = QS_OK;
    if (E != H) {
        if (!(proj = malloc(nl * E * sizeof *proj)))
            return qs_seterr(QS_ENOMEM, "out of memory for the logits");
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nl, (int)E, (int)H, 1.0f, x,
                    (int)H, m->proj_out, (int)H, 0.0f, proj, (int)E);
        in = proj;
    }
    const float *table = m->lm_head ? m->lm_head : m->embed;
    local = malloc(nl * vr * sizeof *local);
    all = malloc(P * nl * vr * sizeof *all);
    if (!local || !all) {
        err = qs_seterr(QS_ENOMEM, "out of memory for the logits of %zu tokens", nl);
        goto out;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nl, (int)vr, (int)E, 1.0f, in, (int)E,
                table, (int)E, 0.0f, local, (int)vr);
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

int qs_model_forward(qs_model *m, size_t n, const int32_t *tokens, const uint32_t *slot,
                     const uint32_t *pos, size_t first_logit, float *logits)
{
    if (!m || !tokens || !slot || !pos || (first_logit < n && !logits) || first_logit > n)
        return qs_seterr(QS_EINVAL, "qs_model_forward: tokens, slots, positions and (for "
                                    "logits) an output are required");
    if (n == 0)
        return QS_OK;
    for (size_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || (uint32_t)tokens[i] >= m->cfg.vocab)
            return qs_seterr(QS_EINVAL, "token id %d at %zu is outside the vocabulary of %u",
                             tokens[i], i, m->cfg.vocab);
        if (slot[i] >= m->max_slots || pos[i] >= m->max_seq)
            return qs_seterr(QS_EINVAL,
                             "token %zu: slot %u position %u is outside the KV cache "
                             "of %u slots x %u tokens",
                             i, slot[i], pos[i], m->max_slots, m->max_seq);
    }
    scratch s;
    int err = scratch_alloc(m, n, &s);
    if (err)
        return err;
    if ((err = embed(m, n, tokens, pos, &s)))
        goto out;
    for (uint32_t l = 0; l < m->cfg.layers && !err; l++)
        err = layer_forward(m, l, n, slot, pos, &s);
    if (err || first_logit == n)
        goto out;
    size_t H = m->cfg.hidden, nl = n - first_logit;
    const float *x = s.x + first_logit * H;
    if (m->cfg.final_norm) {
        norm_forward(&m->final_norm, x, nl, H, m->cfg.norm_eps, s.h);
        x = s.h;
    }
    err = logits_forward(m, x, nl, logits);
out:
    scratch_free(&s);
    return err;
}

int qs_model_score(qs_model *m, const int32_t *tokens, size_t n, size_t first, uint32_t slot,
                   double *nll, size_t *count)
{
    if (!m || !tokens || !nll || !count || n < 2 || first >= n - 1)
        return qs_seterr(QS_EINVAL,
                         "qs_model_score: a window of n >= 2 tokens with first < n - 1 "
                         "is required (n %zu, first %zu)",
                         n, first);
    if (n > m->max_seq)
        return qs_seterr(QS_EINVAL,
                         "a window of %zu tokens exceeds the KV cache of %u: lower "
                         "--ctx or load with a longer --max-seq",
                         n, m->max_seq);
    size_t V = m->cfg.vocab, nl = n - 1 - first;
    uint32_t *slots = malloc(n * sizeof *slots), *pos = malloc(n * sizeof *pos);
    float *logits = malloc((nl + 1) * V * sizeof *logits);
    int err = QS_OK;
    if (!slots || !pos || !logits) {
        err = qs_seterr(QS_ENOMEM, "out of memory for the logits of a %zu-token window", n);
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        slots[i] = slot, pos[i] = (uint32_t)i;
    /* Logits of positions first .. n-1; the last one predicts nothing scored. */
    if ((err = qs_model_forward(m, n, tokens, slots, pos, first, logits)))
        goto out;
    for (size_t j = 0; j < nl; j++) {
        const float *l = logits + j * V;
        float mx = l[0];
        for (size_t v = 1; v < V; v++)
            mx = l[v] > mx ? l[v] : mx;
        double sum = 0;
        for (size_t v = 0; v < V; v++)
            sum += exp((double)l[v] - mx);
        *nll += log(sum) + mx - l[tokens[first + j + 1]];
    }
    *count += nl;
out:
    free(slots);
    free(pos);
    free(logits);
    return err;
}

int qs_calib_init(qs_calib *c, const qs_model_config *cfg)
{
    *c = (qs_calib){cfg->layers, cfg->hidden, cfg->heads * cfg->head_dim, cfg->ffn, NULL};
    c->absmax = calloc(calib_floats(c), sizeof(float));
    return c->absmax ? QS_OK : qs_seterr(QS_ENOMEM, "out of memory for calibration statistics");
}

void qs_calib_close(qs_calib *c)
{
    free(c->absmax);
    c->absmax = NULL;
}

static int calib_check(const qs_calib *c, const qs_model_config *cfg)
{
    if (c->layers != cfg->layers || c->hidden != cfg->hidden ||
        c->attn != cfg->heads * cfg->head_dim || c->ffn != cfg->ffn || !c->absmax)
        return qs_seterr(QS_EINVAL,
                         "calibration statistics for %u layers (widths %u, %u, %u) do not fit "
                         "%s: calibrate on the same model",
                         c->layers, c->hidden, c->attn, c->ffn, cfg->name);
    return QS_OK;
}

int qs_model_record(qs_model *m, qs_calib *c)
{
    int err = c ? calib_check(c, &m->cfg) : QS_OK;
    if (!err)
        m->record = c;
    return err;
}
