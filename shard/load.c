/* Loading one rank's shard: each tensor's slice from a file (GGUF,
 * safetensors) or from the counter-based synthetic generator, SmoothQuant
 * folded in (smooth.c), then quantized in the scheme's format.
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

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* The synthetic key of a tensor (source_read's). */
static uint64_t synth_key(const source *s, role r, int l, int bias)
{
    return qs_synth_mix(s->seed ^
                        qs_synth_mix((uint64_t)r << 32 | (uint64_t)(l + 1) << 1 | (uint64_t)bias));
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
    /* W NULL: the weights are made on the GPU (device_linear), the bias here. */
    int err = W ? source_read(s, r, l, 0, rows, cols, r0, nr, c0, nc, W) : QS_OK;
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

static int finish_linear(qs_model *m, linear *lin, float *W, unsigned iters, const uint32_t *perm,
                         size_t ko, const float *H)
{
    int err = H ? qs_linear_set_gptq(lin, W, lin->N, lin->K, &m->quant, iters, perm, ko, H)
                : qs_linear_set(lin, W, lin->N, lin->K, &m->quant, iters, perm, ko);
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

static int gpu_quantize_linear(qs_model *m, uint32_t l, int which, linear *lin, float *W,
                               unsigned iters)
{
#ifdef QS_SHARD_GPU
    return qs_gpu_quantize_linear(m, l, which, lin, W, iters);
#else
    (void)m, (void)l, (void)which, (void)lin, (void)iters;
    free(W);
    return QS_ENOTSUP;
#endif
}

static int quantize_on_device(const qs_model_opts *o)
{
    if (o->quantize_on == QS_QUANTIZE_ON_AUTO)
        return !qs_cuda_emulated();
    return o->quantize_on == QS_QUANTIZE_ON_DEVICE;
}

/* A synthetic layer on a GPU: each weight made in device memory and
 * quantized there (fp16, BCQ, RTN, W8A8 without smoothing), so the host never holds it: what lets
 * OPT-175B load onto one GPU at the GPU's speed. Norms and biases, small,
 * come from the host. */
static int load_layer_device(qs_model *m, const source *s, int l, const qs_model_opts *o)
{
#ifdef QS_SHARD_GPU
    const qs_model_config *c = &m->cfg;
    layer *L = &m->layers[l];
    uint64_t H = c->hidden, hd = c->head_dim, qd = (uint64_t)c->heads * hd;
    uint64_t kvd = (uint64_t)c->kv_heads * hd, F = c->ffn, f0 = (uint64_t)m->rank * m->fr;
    struct {
        role r;
        linear *lin;
        uint64_t rows, cols, r0, nr, c0, nc;
        int rp, which;
    } t[] = {
        {R_Q, &L->q, qd, H, m->q_first * hd, m->hq * hd, 0, H, 0, 0},
        {R_K, &L->k, kvd, H, m->kv_first * hd, m->hkv * hd, 0, H, 0, 1},
        {R_V, &L->v, kvd, H, m->kv_first * hd, m->hkv * hd, 0, H, 0, 2},
        {R_O, &L->o, H, qd, 0, H, m->q_first * hd, m->hq * hd, 1, 3},
        {R_UP, &L->up, F, H, f0, m->fr, 0, H, 0, 4},
        {R_GATE, &L->gate, F, H, f0, m->fr, 0, H, 0, 5},
        {R_DOWN, &L->down, H, F, 0, H, f0, m->fr, 1, 6},
    };
    int err;
    if ((err = load_norm(m, s, R_ATTN_NORM, l, &L->attn_norm)) ||
        (err = load_norm(m, s, R_FFN_NORM, l, &L->ffn_norm)))
        return err;
    for (size_t i = 0; i < sizeof t / sizeof t[0] && !err; i++) {
        if (t[i].r == R_GATE && !c->gated_ffn)
            continue;
        linear *lin = t[i].lin;
        lin->scheme = m->quant.scheme;
        if (!(err = read_linear(m, s, t[i].r, l, lin, t[i].rows, t[i].cols, t[i].r0, t[i].nr,
                                t[i].c0, t[i].nc, t[i].rp, NULL)))
            err = qs_gpu_synth_linear(m, (uint32_t)l, t[i].which, lin, synth_key(s, t[i].r, l, 0),
                                      t[i].cols, t[i].r0, t[i].c0, o->bcq_iters);
    }
    return err;
#else
    (void)m, (void)s, (void)l, (void)o;
    return qs_seterr(QS_ENOTSUP, "this build of qshard has no CUDA");
#endif
}

static int load_layer(qs_model *m, const source *s, int l, const qs_model_opts *o,
                      const qs_calib *calib)
{
    if (m->dev && !s->w && !calib && m->quant.scheme != QS_SCHEME_W4A4)
        return load_layer_device(m, s, l, o);
    const qs_model_config *c = &m->cfg;
    layer *L = &m->layers[l];
    uint64_t H = c->hidden, hd = c->head_dim, qd = (uint64_t)c->heads * hd;
    uint64_t kvd = (uint64_t)c->kv_heads * hd, F = c->ffn, f0 = (uint64_t)m->rank * m->fr;
    float *Wq = NULL, *Wk = NULL, *Wv = NULL, *Wo = NULL, *Wu = NULL, *Wg = NULL, *Wd = NULL;
    uint32_t *perm[QS_CALIB_SITES] = {0};
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
    int w4 = m->quant.scheme == QS_SCHEME_W4A4;
    if (calib && m->quant.scheme == QS_SCHEME_W8A8) {
        m->smooth_alpha = o->smooth_alpha > 0 ? o->smooth_alpha : 0.5f;
        if ((err = qs_smooth_layer(m, (uint32_t)l, calib, m->smooth_alpha, Wq, Wk, Wv, Wo, Wu, Wg,
                                   Wd)))
            goto out;
    }
    /* W4A4: the input order of the linears at each calibration site. */
    size_t A = qd, at[QS_CALIB_SITES] = {0, (size_t)m->q_first * hd, 0, f0};
    size_t width[QS_CALIB_SITES] = {H, A, H, F};
    size_t K[QS_CALIB_SITES] = {H, (size_t)m->hq * hd, H, m->fr}, ko[QS_CALIB_SITES] = {0};
    for (int site = 0; w4 && site < QS_CALIB_SITES && !err; site++) {
        const float *a = calib ? calib->absmax + qs_calib_at(calib, (uint32_t)l, site) : NULL;
        if (!(perm[site] = malloc(K[site] * sizeof(uint32_t))))
            err = qs_seterr(QS_ENOMEM, "out of memory choosing outlier channels");
        else
            err = qs_outlier_order(a, width[site], at[site], K[site], m->quant.outliers, perm[site],
                                   &ko[site]);
    }
    /* Quantize, on the GPU or here; each takes ownership of its array. */
    linear *lins[] = {&L->q, &L->k, &L->v, &L->o, &L->up, &L->gate, &L->down};
    float **ws[] = {&Wq, &Wk, &Wv, &Wo, &Wu, &Wg, &Wd};
    static const int site_of[] = {QS_CALIB_QKV, QS_CALIB_QKV, QS_CALIB_QKV, QS_CALIB_O,
                                  QS_CALIB_UP,  QS_CALIB_UP,  QS_CALIB_DOWN};
    /* W4A4 and GPTQ quantize on the host: they need the statistics. */
    int gptq = o->gptq && calib && calib->hess;
    int dev = m->dev && quantize_on_device(o) && !w4 && !gptq;
    for (size_t i = 0; i < sizeof lins / sizeof lins[0] && !err; i++) {
        int site = site_of[i];
        const float *Hs = gptq ? qs_calib_hessian(calib, (uint32_t)l, site) : NULL;
        if (*ws[i])
            err = dev ? gpu_quantize_linear(m, (uint32_t)l, (int)i, lins[i], *ws[i], o->bcq_iters)
                      : finish_linear(m, lins[i], *ws[i], o->bcq_iters, perm[site], ko[site], Hs);
        *ws[i] = NULL;
    }
out:
    free(Wq), free(Wk), free(Wv), free(Wo), free(Wu), free(Wg), free(Wd);
    for (int site = 0; site < QS_CALIB_SITES; site++)
        free(perm[site]);
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

/* The GPU steps of loading (ops_cuda.c), or a refusal in a build without. */
static int gpu_open(qs_model *m, int device)
{
#ifdef QS_SHARD_GPU
    return qs_gpu_open(m, device);
#else
    (void)m, (void)device;
    return qs_seterr(QS_ENOTSUP, "this build of qshard has no CUDA: load on the CPU");
#endif
}

static int gpu_upload_layer(qs_model *m, uint32_t l)
{
#ifdef QS_SHARD_GPU
    return qs_gpu_upload_layer(m, l);
#else
    (void)m, (void)l;
    return QS_ENOTSUP;
#endif
}

static int gpu_synth_table(qs_model *m, int lm_head, uint64_t key)
{
#ifdef QS_SHARD_GPU
    return qs_gpu_synth_table(m, lm_head, key);
#else
    (void)m, (void)lm_head, (void)key;
    return QS_ENOTSUP;
#endif
}

static int gpu_finish(qs_model *m)
{
#ifdef QS_SHARD_GPU
    return qs_gpu_finish(m);
#else
    (void)m;
    return QS_ENOTSUP;
#endif
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
    if (!qs_kv_name(opts->kv_cache)) {
        free(m);
        return qs_seterr(QS_EINVAL, "KV cache format %d is unknown: use fp16, int8 or int4",
                         (int)opts->kv_cache);
    }
    m->kv = opts->kv_cache;
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
        if (opts->on_gpu && (err = gpu_open(m, opts->gpu)))
            goto fail;
        for (uint32_t l = 0; m->dev && l < cfg->layers && !err; l++)
            err = gpu_upload_layer(m, l);
        if (err)
            goto fail;
        goto cache;
    }
    if (opts->calib && cfg->final_norm &&
        ((err = qs_calib_check(opts->calib, cfg)) ||
         (err = qs_calib_merge(m, opts->calib, &merged))))
        goto fail;
    if (opts->on_gpu && (err = gpu_open(m, opts->gpu)))
        goto fail;
    for (uint32_t l = 0; l < cfg->layers; l++) {
        if ((err = load_layer(m, &s, (int)l, opts, merged.absmax ? &merged : NULL)) ||
            (m->dev && (err = gpu_upload_layer(m, l))))
            goto fail;
        if (opts->progress)
            opts->progress(opts->progress_ctx, l + 1, cfg->layers);
    }
    if (m->dev && !s.w) {
        /* Synthetic tables too are made on the GPU. */
        if ((err = gpu_synth_table(m, 0, synth_key(&s, R_EMBED, -1, 0))) ||
            (!cfg->tied_embeddings &&
             (err = gpu_synth_table(m, 1, synth_key(&s, R_LM_HEAD, -1, 0)))))
            goto fail;
    } else if ((err = load_vocab_rows(m, &s, R_EMBED, E, &m->embed)) ||
               (!cfg->tied_embeddings &&
                (err = load_vocab_rows(m, &s, R_LM_HEAD, H, &m->lm_head)))) {
        goto fail;
    }
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
    if (m->dev) {
        if ((err = gpu_finish(m)))
            goto fail;
        qs_weights_close(file);
        qs_calib_close(&merged);
        *out = m;
        return QS_OK;
    }
    if ((err = qs_model_tables_f16(m)))
        goto fail;
    /* The cache in its format: fp32 vectors for fp16 (the CPU computes in
     * fp32), else codes and their scales (qs_kv_quantize's layout). */
    size_t rows = (size_t)cfg->layers * m->max_slots * m->max_seq * m->hkv;
    size_t kvb = m->kv == QS_KV_FP16
                     ? rows * m->hd * sizeof(float)
                     : rows * (qs_kv_code_bytes(m->kv, m->hd) + qs_kv_groups(m->hd) * 4);
    if (m->kv == QS_KV_FP16) {
        m->kcache = calloc(rows * m->hd, sizeof(float));
        m->vcache = calloc(rows * m->hd, sizeof(float));
    } else {
        m->kq = calloc(rows, qs_kv_code_bytes(m->kv, m->hd));
        m->vq = calloc(rows, qs_kv_code_bytes(m->kv, m->hd));
        m->ks = calloc(rows * qs_kv_groups(m->hd), 4);
        m->vs = calloc(rows * qs_kv_groups(m->hd), 4);
    }
    if (m->kv == QS_KV_FP16 ? !m->kcache || !m->vcache : !m->kq || !m->vq || !m->ks || !m->vs) {
        err = qs_seterr(QS_ENOMEM,
                        "out of memory for a KV cache of %u slots x %u tokens: "
                        "lower --max-seq or --slots",
                        m->max_slots, m->max_seq);
        goto fail;
    }
    m->bytes.kv_cache = 2 * kvb;
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
