/* The forward pass's operations on the rank's GPU (ops.h), through the
 * kernels of kernels/cuda: the residual stream in fp32, activations in fp16,
 * the linear layers in their device formats (fp16, BCQ/RTN for LUT-GEMM
 * and the tensor-core path, W8A8 int8, W4A4 int4 + int8), the KV cache in fp16
 * (or int8/int4 codes), NCCL for the
 * group's sums (collectives/, on the communicator's stream, which every
 * kernel here uses too). qs_model_use_device moves a loaded shard here:
 * weights, caches and a workspace for `chunk` tokens are allocated once,
 * so a forward call only enqueues kernels. */
#include "ops.h"

#include "qs_collectives.h"
#include "qs_kernels.h"
#include "qs_synth.h"

#include <stdlib.h>
#include <string.h>

typedef struct gpu_linear {
    qs_cuda_bcq bcq; /* bcq, rtn */
    qs_cuda_w8 w8;   /* w8a8 */
    qs_cuda_w4 w4;   /* w4a4 */
    void *w16;       /* fp16: N x K */
    void *bias;      /* fp16 [N] where this rank adds it, else NULL */
} gpu_linear;

typedef struct gpu_norm {
    void *w, *b; /* fp16 [H]; b NULL for RMSNorm */
    /* W4A4: the codes this norm writes for the linears it feeds, in their
     * input order (a view of gpu.act4 with their permutation); a4.xq NULL
     * where the norm does not write codes. */
    qs_cuda_w4_act a4;
} gpu_norm;

typedef struct gpu {
    int device;
    void *stream;   /* the communicator's */
    void *kc, *vc;  /* fp16 [layer][slot][pos][hkv * hd], or int8/int4 codes (kv_layer) */
    void *ks, *vs;  /* int8/int4: the codes' fp16 (scale, min) pairs; NULL for fp16 */
    float *cs;      /* RoPE cos, sin per position and pair; NULL without RoPE */
    void *embed;    /* fp16 vr x E */
    void *lm_head;  /* fp16 vr x H, or NULL when tied */
    void *pos;      /* fp16 (max_pos + 2) x H (OPT), or NULL */
    void *proj_in;  /* fp16 H x E (opt-350m), or NULL */
    void *proj_out; /* fp16 E x H */
    gpu_norm final_norm;
    gpu_linear *lins; /* 7 per layer */
    gpu_norm *norms;  /* 2 per layer */
    /* Workspace for `rows` tokens. */
    size_t rows;
    float *x;
    void *h, *q, *k, *v, *att, *proj, *ff1, *ff2, *e16;
    void *att_ws;
    float *lg_local, *lg_all, *lg;
    int32_t *tokens;
    uint32_t *slot, *posd;
    /* Sampling on the device, and the decode step's graph. */
    qs_cuda_sample_params *params;
    uint64_t *state;
    int32_t *next;
    void *sample_ws;
    struct staged { /* pinned: what a step sends and brings back */
        qs_cuda_sample_params params;
        uint64_t state;
        int32_t next;
    } * io;
    /* One split-K / activation workspace for every linear layer (calls are
     * ordered on one stream): a handle's own would cost OPT-175B 5 GB. */
    void *ws;
    size_t ws_bytes;
    void ***ws_users; /* the handles' ws fields, repointed when it grows */
    size_t nws_users, cap_ws_users;
    /* W8A8: the layer norms write their output's activation codes too, and
     * the GEMMs reading h (q, k, v; up, gate) take them (act_h set). */
    qs_cuda_w8_act act;
    int act_h;
    /* W4A4: the same with the codes buffer act4, which every layer norm's
     * view shares; a4_h is the view that wrote h's codes, or NULL. */
    qs_cuda_w4_act act4;
    qs_cuda_w4_act *a4_h;
    void *graph;                 /* the captured one-token step, or NULL */
    int capturing;               /* a step is being captured */
    int in_step;                 /* step_end delivers the sampled token */
    int no_graph;                /* QS_NO_CUDA_GRAPH set, or a capture failed */
    uint64_t captured, replayed; /* decode steps */
    size_t bytes;                /* everything above */
} gpu;

static int gpu_alloc(gpu *g, void **p, size_t bytes)
{
    int err = qs_cuda_malloc(p, bytes ? bytes : 1);
    if (!err)
        g->bytes += bytes;
    return err;
}

/* A handle's workspace (*slot, bytes) traded for the shared one, grown to
 * fit; every earlier handle is repointed. */
static int share_ws(gpu *g, void **slot, size_t bytes)
{
    if (!*slot)
        return QS_OK;
    qs_cuda_free(*slot);
    *slot = NULL;
    if (bytes > g->ws_bytes) {
        void *p = NULL;
        int err = qs_cuda_malloc(&p, bytes);
        if (err)
            return err;
        qs_cuda_free(g->ws);
        g->bytes += bytes - g->ws_bytes;
        g->ws = p, g->ws_bytes = bytes;
        for (size_t i = 0; i < g->nws_users; i++)
            *g->ws_users[i] = p;
    }
    if (g->nws_users == g->cap_ws_users) {
        size_t cap = g->cap_ws_users ? 2 * g->cap_ws_users : 64;
        void ***u = realloc(g->ws_users, cap * sizeof *u);
        if (!u)
            return qs_seterr(QS_ENOMEM, "out of memory");
        g->ws_users = u, g->cap_ws_users = cap;
    }
    g->ws_users[g->nws_users++] = slot;
    *slot = g->ws;
    return QS_OK;
}

/* fp32 host values as fp16 on the device. */
static int upload_f16(gpu *g, const float *src, size_t count, void **out)
{
    *out = NULL;
    if (!src)
        return QS_OK;
    uint16_t *h = malloc(count * sizeof *h + 1);
    if (!h)
        return qs_seterr(QS_ENOMEM, "out of host memory staging %zu fp16 values", count);
    for (size_t i = 0; i < count; i++)
        h[i] = qs_fp32_to_fp16(src[i]);
    int err = gpu_alloc(g, out, count * 2);
    if (!err)
        err = qs_cuda_h2d(*out, h, count * 2);
    free(h);
    return err;
}

/* A table the host already holds in fp16 (qs_model_tables_f16), or NULL. */
static int upload_h16(gpu *g, const uint16_t *src, size_t count, void **out)
{
    *out = NULL;
    if (!src)
        return QS_OK;
    int err = gpu_alloc(g, out, count * 2);
    return err ? err : qs_cuda_h2d(*out, src, count * 2);
}

static int upload_norm(gpu *g, const norm *nm, size_t H, gpu_norm *out)
{
    int err = upload_f16(g, nm->w, H, &out->w);
    if (!err)
        err = upload_f16(g, nm->b, H, &out->b);
    return err;
}

/* The linear's weights in its device format; the host copy is freed. */
static int upload_linear(gpu *g, linear *l, gpu_linear *d)
{
    int err = QS_OK;
    switch (l->scheme) {
    case QS_SCHEME_FP16:
        err = upload_f16(g, l->w32, l->N * l->K, &d->w16);
        break;
    case QS_SCHEME_BCQ:
    case QS_SCHEME_RTN:
        if (!(err = qs_cuda_bcq_upload(&d->bcq, &l->bcq)))
            g->bytes += d->bcq.bytes;
        if (!err)
            err = share_ws(g, &d->bcq.ws, (size_t)QS_CUDA_WS_ROWS * l->N * sizeof(float));
        break;
    case QS_SCHEME_W8A8:
        if (!(err = qs_cuda_w8_upload(&d->w8, &l->w8)))
            g->bytes += d->w8.bytes;
        if (!err)
            err = share_ws(g, &d->w8.ws, d->w8.ws_bytes);
        break;
    case QS_SCHEME_W4A4:
        if (!(err = qs_cuda_w4_upload(&d->w4, &l->w4)))
            g->bytes += d->w4.bytes;
        if (!err)
            err = share_ws(g, &d->w4.ws, d->w4.ws_bytes);
        break;
    }
    if (!err && l->bias && l->add_bias)
        err = upload_f16(g, l->bias, l->N, &d->bias);
    if (err)
        return err;
    free(l->w32);
    l->w32 = NULL;
    qs_bcq_close(&l->bcq);
    qs_w8_close(&l->w8);
    qs_w4_close(&l->w4);
    l->dev = d;
    return QS_OK;
}

static void free_linear(gpu_linear *d)
{
    qs_cuda_bcq_free(&d->bcq);
    qs_cuda_w8_free(&d->w8);
    qs_cuda_w4_free(&d->w4);
    qs_cuda_free(d->w16);
    qs_cuda_free(d->bias);
}

static void free_norm(gpu_norm *n)
{
    qs_cuda_free(n->w);
    qs_cuda_free(n->b);
}

static linear *layer_linear(layer *L, int i)
{
    linear *lins[] = {&L->q, &L->k, &L->v, &L->o, &L->up, &L->gate, &L->down};
    return lins[i];
}

void qs_model_gpu_free(qs_model *m)
{
    gpu *g = m->dev;
    if (!g)
        return;
    qs_cuda_graph_free(g->graph);
    for (size_t i = 0; i < g->nws_users; i++)
        *g->ws_users[i] = NULL; /* the shared workspace is freed once, below */
    free(g->ws_users);
    qs_cuda_free(g->ws);
    for (uint32_t l = 0; g->lins && l < m->cfg.layers; l++)
        for (int i = 0; i < 7; i++)
            free_linear(&g->lins[l * 7 + i]);
    for (uint32_t i = 0; g->norms && i < 2 * m->cfg.layers; i++)
        free_norm(&g->norms[i]);
    free_norm(&g->final_norm);
    void *bufs[] = {g->kc,       g->vc,      g->ks,       g->vs,     g->cs,   g->embed, g->lm_head,
                    g->pos,      g->proj_in, g->proj_out, g->x,      g->h,    g->q,     g->k,
                    g->v,        g->att,     g->proj,     g->ff1,    g->ff2,  g->e16,   g->att_ws,
                    g->lg_local, g->lg_all,  g->lg,       g->tokens, g->slot, g->posd,  g->params,
                    g->state,    g->next,    g->sample_ws};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        qs_cuda_free(bufs[i]);
    qs_cuda_host_free(g->io);
    qs_cuda_w8_act_free(&g->act);
    qs_cuda_w4_act_free(&g->act4); /* the norms' views share its buffers */
    free(g->lins);
    free(g->norms);
    free(g);
    m->dev = NULL;
}

/* W4A4: each layer norm writes the codes of the linears it feeds (q, k, v
 * share one input order, up and gate another) in its own pass. One codes
 * buffer serves every norm: each holds a view of it with its linears'
 * order. Where a norm's row does not fit the fused kernel, or the orders'
 * shapes differ, the GEMMs quantize their own input instead. */
static int norm_codes_w4(qs_model *m, gpu *g, size_t rows)
{
    if (m->cfg.hidden > QS_CUDA_NORM_W4_MAX_H || !m->cfg.layers)
        return QS_OK;
    int err = qs_cuda_w4_act_alloc(&g->act4, rows, &g->lins[0].w4);
    if (err)
        return err;
    g->bytes += rows * (g->act4.kd + (g->act4.ngroups + 1) * sizeof(float));
    for (uint32_t l = 0; l < m->cfg.layers; l++)
        for (int i = 0; i < 2; i++) {
            const qs_cuda_w4 *w = &g->lins[l * 7 + (i ? 4 : 0)].w4; /* q, up */
            qs_cuda_w4_act *a = &g->norms[2 * l + i].a4;
            if (w->K != g->act4.K || w->ko != g->act4.ko || w->group != g->act4.group)
                continue;
            *a = g->act4;
            a->perm = w->perm;
            a->perm_hash = w->perm_hash;
        }
    return QS_OK;
}

static int alloc_workspace(qs_model *m, gpu *g, size_t rows)
{
    size_t H = m->cfg.hidden, E = m->cfg.embed_dim, w = H > E ? H : E, P = (size_t)m->size;
    size_t qd = (size_t)m->hq * m->hd, kvd = (size_t)m->hkv * m->hd, V = m->cfg.vocab;
    g->rows = rows;
    int err;
    if ((err = gpu_alloc(g, (void **)&g->x, rows * w * 4)) ||
        (err = gpu_alloc(g, &g->h, rows * w * 2)) || (err = gpu_alloc(g, &g->q, rows * qd * 2)) ||
        (err = gpu_alloc(g, &g->k, rows * kvd * 2)) ||
        (err = gpu_alloc(g, &g->v, rows * kvd * 2)) ||
        (err = gpu_alloc(g, &g->att, rows * qd * 2)) ||
        (err = gpu_alloc(g, &g->proj, rows * w * 2)) ||
        (err = gpu_alloc(g, &g->ff1, rows * m->fr * 2)) ||
        (err = gpu_alloc(g, &g->ff2, rows * m->fr * 2)) ||
        (err = gpu_alloc(g, &g->e16, rows * w * 2)) ||
        (err = gpu_alloc(g, &g->att_ws,
                         qs_cuda_attention_ws_bytes(rows, m->hq, m->hd, m->max_seq))) ||
        (err = gpu_alloc(g, (void **)&g->lg_local, rows * m->vr * 4)) ||
        (err = gpu_alloc(g, (void **)&g->lg_all, P * rows * m->vr * 4)) ||
        (err = gpu_alloc(g, (void **)&g->lg, rows * V * 4)) ||
        (err = gpu_alloc(g, (void **)&g->tokens, rows * 4)) ||
        (err = gpu_alloc(g, (void **)&g->slot, rows * 4)) ||
        (err = gpu_alloc(g, (void **)&g->posd, rows * 4)) ||
        (err = gpu_alloc(g, (void **)&g->params, sizeof *g->params)) ||
        (err = gpu_alloc(g, (void **)&g->state, sizeof *g->state)) ||
        (err = gpu_alloc(g, (void **)&g->next, sizeof *g->next)) ||
        (err = gpu_alloc(g, &g->sample_ws, qs_cuda_sample_ws_bytes(1, V))) ||
        (err = qs_cuda_host_alloc((void **)&g->io, sizeof *g->io)))
        return err;
    /* Fused norm + quantization where one CTA's shared memory holds the
     * groups (else each GEMM quantizes its input, as before). */
    if (m->quant.scheme == QS_SCHEME_W8A8 &&
        qs_w8_groups(H, m->quant.group_size) <= QS_CUDA_NORM_W8_MAX_GROUPS) {
        if ((err = qs_cuda_w8_act_alloc(&g->act, rows, H, m->quant.group_size)))
            return err;
        g->bytes += rows * (g->act.kd + g->act.ngroups * sizeof(float));
    }
    if (m->quant.scheme == QS_SCHEME_W4A4 && (err = norm_codes_w4(m, g, rows)))
        return err;
    const char *ng = getenv("QS_NO_CUDA_GRAPH");
    g->no_graph = ng && *ng && strcmp(ng, "0");
    return QS_OK;
}

extern const qs_ops qs_ops_cuda;

/* A GPU for the model: NCCL on the group (collective), the per-layer
 * tables. Layers then come one at a time (load.c streams them, so a large
 * model never sits whole on the host), and gpu_finish adds the rest. */
int qs_gpu_open(qs_model *m, int device)
{
    if (m->dev)
        return qs_seterr(QS_EBUSY, "the model is on a GPU already");
    int err = qs_comm_device(m->tp) >= 0 ? QS_OK : qs_comm_enable_device(m->tp, device, NULL);
    if (err)
        return err;
    gpu *g = calloc(1, sizeof *g);
    if (!g)
        return qs_seterr(QS_ENOMEM, "out of memory");
    g->device = qs_comm_device(m->tp);
    g->stream = qs_comm_stream(m->tp);
    g->lins = calloc((size_t)m->cfg.layers * 7, sizeof *g->lins);
    g->norms = calloc((size_t)m->cfg.layers * 2, sizeof *g->norms);
    m->dev = g;
    if (!g->lins || !g->norms) {
        qs_model_gpu_free(m);
        return qs_seterr(QS_ENOMEM, "out of memory");
    }
    return QS_OK;
}

/* Layer l's weights to the GPU; the host copies are freed. */
int qs_gpu_upload_layer(qs_model *m, uint32_t l)
{
    gpu *g = m->dev;
    layer *L = &m->layers[l];
    size_t H = m->cfg.hidden;
    int err = QS_OK;
    for (int i = 0; i < 7 && !err; i++) {
        linear *lin = layer_linear(L, i);
        if (lin->N && !lin->dev)
            err = upload_linear(g, lin, &g->lins[l * 7 + i]);
    }
    if (!err)
        err = upload_norm(g, &L->attn_norm, H, &g->norms[2 * l]);
    if (!err)
        err = upload_norm(g, &L->ffn_norm, H, &g->norms[2 * l + 1]);
    if (!err) {
        qs_norm_close(&L->attn_norm), qs_norm_close(&L->ffn_norm);
        L->attn_norm.dev = &g->norms[2 * l], L->ffn_norm.dev = &g->norms[2 * l + 1];
    }
    return err;
}

/* Device fp32 weights W (lin->N x lin->K) into layer l's linear `which` in
 * the model's scheme (W is left to the caller); the host bias uploaded. */
static int quantize_on_gpu(qs_model *m, uint32_t l, int which, linear *lin, const float *W,
                           unsigned iters)
{
    gpu *g = m->dev;
    gpu_linear *d = &g->lins[l * 7 + which];
    size_t N = lin->N, K = lin->K;
    const qs_quant *q = &m->quant;
    int err = QS_OK;
    switch (q->scheme) {
    case QS_SCHEME_FP16:
        if (!(err = gpu_alloc(g, &d->w16, N * K * 2)))
            err = qs_cuda_f32_to_f16(W, N * K, d->w16, g->stream);
        if (!err)
            err = qs_cuda_stream_sync(g->stream);
        break;
    case QS_SCHEME_BCQ:
        err = qs_cuda_bcq_quantize(&d->bcq, W, N, K, (unsigned)q->bits, q->group_size, iters,
                                   g->stream);
        break;
    case QS_SCHEME_RTN:
        err = qs_cuda_rtn_quantize(&d->bcq, W, N, K, (unsigned)q->bits, q->group_size, g->stream);
        break;
    case QS_SCHEME_W8A8:
        err = qs_cuda_w8_quantize(&d->w8, W, N, K, q->group_size, g->stream);
        break;
    case QS_SCHEME_W4A4: /* quantized on the host: the outlier choice needs calibration */
        err = qs_seterr(QS_ENOTSUP, "w4a4 is quantized on the host, not on the GPU");
        break;
    }
    if (!err && (q->scheme == QS_SCHEME_BCQ || q->scheme == QS_SCHEME_RTN)) {
        g->bytes += d->bcq.bytes;
        err = share_ws(g, &d->bcq.ws, (size_t)QS_CUDA_WS_ROWS * N * sizeof(float));
    } else if (!err && q->scheme == QS_SCHEME_W8A8) {
        g->bytes += d->w8.bytes;
        err = share_ws(g, &d->w8.ws, d->w8.ws_bytes);
    }
    if (!err && lin->bias && lin->add_bias)
        err = upload_f16(g, lin->bias, N, &d->bias);
    if (err)
        return err;
    free(lin->bias);
    lin->bias = NULL;
    lin->scheme = q->scheme;
    m->bytes.linear += q->scheme == QS_SCHEME_FP16   ? N * K * 2
                       : q->scheme == QS_SCHEME_W8A8 ? d->w8.bytes
                                                     : d->bcq.bytes;
    lin->dev = d;
    return QS_OK;
}

int qs_gpu_synth_linear(qs_model *m, uint32_t l, int which, linear *lin, uint64_t key,
                        uint64_t cols, uint64_t r0, uint64_t c0, unsigned iters)
{
    gpu *g = m->dev;
    size_t N = lin->N, K = lin->K;
    float *W = NULL;
    int err = qs_cuda_malloc((void **)&W, N * K * sizeof(float));
    if (!err)
        err = qs_cuda_synth_fill(W, key, cols, r0, N, c0, K, K, QS_SYNTH_WEIGHT, 0, g->stream);
    if (!err)
        err = quantize_on_gpu(m, l, which, lin, W, iters);
    qs_cuda_free(W);
    return err;
}

int qs_gpu_quantize_linear(qs_model *m, uint32_t l, int which, linear *lin, float *W,
                           unsigned iters)
{
    size_t bytes = lin->N * lin->K * sizeof(float);
    float *dW = NULL;
    int err = qs_cuda_malloc((void **)&dW, bytes);
    if (!err)
        err = qs_cuda_h2d(dW, W, bytes);
    free(W);
    if (!err)
        err = quantize_on_gpu(m, l, which, lin, dW, iters);
    qs_cuda_free(dW);
    return err;
}

/* A vocabulary table (the embedding or the LM head: vr rows of `width`,
 * rows v_first.. of the whole vocab x width tensor, padding rows zero) made
 * on the GPU in fp16, 1024 rows at a time through an fp32 slice. */
int qs_gpu_synth_table(qs_model *m, int lm_head, uint64_t key)
{
    gpu *g = m->dev;
    size_t width = lm_head ? m->cfg.hidden : m->cfg.embed_dim, vr = m->vr, V = m->cfg.vocab;
    size_t have = m->v_first < V ? V - m->v_first : 0, chunk = 1024;
    if (have > vr)
        have = vr;
    void **out = lm_head ? &g->lm_head : &g->embed;
    float *W = NULL;
    int err = gpu_alloc(g, out, vr * width * 2);
    if (!err)
        err = qs_cuda_memset(*out, 0, vr * width * 2);
    if (!err)
        err = qs_cuda_malloc((void **)&W, chunk * width * sizeof(float));
    for (size_t r = 0; r < have && !err; r += chunk) {
        size_t n = have - r < chunk ? have - r : chunk;
        if (!(err = qs_cuda_synth_fill(W, key, width, m->v_first + r, n, 0, width, width,
                                       QS_SYNTH_WEIGHT, 0, g->stream)))
            err = qs_cuda_f32_to_f16(W, n * width, (char *)*out + r * width * 2, g->stream);
        if (!err)
            err = qs_cuda_stream_sync(g->stream);
    }
    qs_cuda_free(W);
    if (!err)
        m->bytes.fp16 += vr * width * 2;
    return err;
}

/* Bytes of one layer's K (or V) cache, fp16 rows or int8/int4 codes, and
 * of its codes' (scale, min) pairs (0 for fp16); each rounded up to 256 so
 * that every layer's arrays start 16-byte aligned, as the kernels read them. */
static size_t cache_layer(const qs_model *m)
{
    size_t rows = (size_t)m->max_slots * m->max_seq * m->hkv;
    size_t b = m->kv == QS_KV_FP16 ? rows * m->hd * 2 : rows * qs_kv_code_bytes(m->kv, m->hd);
    return (b + 255) / 256 * 256;
}

static size_t scale_layer(const qs_model *m)
{
    size_t rows = (size_t)m->max_slots * m->max_seq * m->hkv;
    return m->kv == QS_KV_FP16 ? 0 : (rows * qs_kv_groups(m->hd) * 4 + 255) / 256 * 256;
}

/* Layer l's cache as the kernels take it. */
static qs_cuda_kv layer_kv(const qs_model *m, const gpu *g, uint32_t l)
{
    size_t off = l * cache_layer(m), soff = l * scale_layer(m);
    qs_cuda_kv kv = {m->kv, (char *)g->kc + off, (char *)g->vc + off, NULL, NULL};
    if (m->kv != QS_KV_FP16)
        kv.ks = (char *)g->ks + soff, kv.vs = (char *)g->vs + soff;
    return kv;
}

/* The tables, the caches and the workspace; the model then runs here. */
int qs_gpu_finish(qs_model *m)
{
    gpu *g = m->dev;
    const qs_model_config *c = &m->cfg;
    size_t H = c->hidden, E = c->embed_dim;
    int err;
    if ((!g->embed && m->embed16 &&
         (err = upload_h16(g, m->embed16, (size_t)m->vr * E, &g->embed))) ||
        (!g->lm_head && m->lm_head16 &&
         (err = upload_h16(g, m->lm_head16, (size_t)m->vr * H, &g->lm_head))) ||
        (!g->embed && (err = upload_f16(g, m->embed, (size_t)m->vr * E, &g->embed))) ||
        (!g->lm_head && (err = upload_f16(g, m->lm_head, (size_t)m->vr * H, &g->lm_head))) ||
        (err = upload_f16(g, m->pos, ((size_t)c->max_pos + 2) * H, &g->pos)) ||
        (err = upload_f16(g, m->proj_in, H * E, &g->proj_in)) ||
        (err = upload_f16(g, m->proj_out, E * H, &g->proj_out)))
        return err;
    if (c->final_norm) {
        if ((err = upload_norm(g, &m->final_norm, H, &g->final_norm)))
            return err;
        qs_norm_close(&m->final_norm);
        m->final_norm.dev = &g->final_norm;
    }
    if (m->rope_cs) {
        size_t bytes = (size_t)m->max_seq * (m->hd / 2) * 2 * sizeof(float);
        if ((err = gpu_alloc(g, (void **)&g->cs, bytes)) ||
            (err = qs_cuda_h2d(g->cs, m->rope_cs, bytes)))
            return err;
    }
    size_t kv = c->layers * cache_layer(m), ksb = c->layers * scale_layer(m);
    if ((err = gpu_alloc(g, &g->kc, kv)) || (err = gpu_alloc(g, &g->vc, kv)) ||
        (err = qs_cuda_memset(g->kc, 0, kv)) || (err = qs_cuda_memset(g->vc, 0, kv)))
        return err;
    if (ksb && ((err = gpu_alloc(g, &g->ks, ksb)) || (err = gpu_alloc(g, &g->vs, ksb)) ||
                (err = qs_cuda_memset(g->ks, 0, ksb)) || (err = qs_cuda_memset(g->vs, 0, ksb))))
        return err;
    /* One prefill chunk of up to 256 tokens (llama.cpp's default batch is
     * 512; 256 keeps a chunk's logits small) and at most the cache;
     * QS_GPU_CHUNK lowers it (tests of the chunked path). */
    size_t rows = m->max_seq < 256 ? m->max_seq : 256;
    const char *ch = getenv("QS_GPU_CHUNK");
    if (ch && atol(ch) > 0 && (size_t)atol(ch) < rows)
        rows = (size_t)atol(ch);
    if ((err = alloc_workspace(m, g, rows)) || (err = qs_cuda_sync()))
        return err;
    /* The host copies go: the GPU holds the shard now. */
    free(m->embed), free(m->lm_head), free(m->pos), free(m->proj_in), free(m->proj_out);
    m->embed = m->lm_head = m->pos = m->proj_in = m->proj_out = NULL;
    free(m->embed16), free(m->lm_head16);
    m->embed16 = m->lm_head16 = NULL;
    free(m->kcache), free(m->vcache), free(m->kq), free(m->vq), free(m->ks), free(m->vs);
    m->kcache = m->vcache = NULL;
    m->kq = m->vq = NULL;
    m->ks = m->vs = NULL;
    m->ops = &qs_ops_cuda;
    m->chunk = rows;
    m->bytes.kv_cache = 2 * (kv + ksb);
    m->bytes.total = g->bytes;
    return QS_OK;
}

void qs_model_graph_steps(const qs_model *m, uint64_t *captured, uint64_t *replayed)
{
    const gpu *g = m ? m->dev : NULL;
    *captured = g ? g->captured : 0;
    *replayed = g ? g->replayed : 0;
}

int qs_model_use_device(qs_model *m, int device)
{
    if (!m)
        return qs_seterr(QS_EINVAL, "qs_model_use_device: no model");
    if (m->record)
        return qs_seterr(QS_EBUSY, "the model is recording SmoothQuant statistics: move it to "
                                   "the GPU after calibration");
    int err = qs_gpu_open(m, device);
    for (uint32_t l = 0; l < m->cfg.layers && !err; l++)
        err = qs_gpu_upload_layer(m, l);
    if (!err)
        err = qs_gpu_finish(m);
    if (err)
        qs_model_gpu_free(m);
    return err;
}

/* ---- The table ---------------------------------------------------------- */

static gpu *G(const qs_fwd *f)
{
    return f->m->dev;
}

static int cuda_begin(qs_fwd *f)
{
    gpu *g = G(f);
    if (f->n > g->rows)
        return qs_seterr(QS_EINTERNAL, "forward call of %zu tokens over the workspace of %zu", f->n,
                         g->rows);
    f->x = g->x, f->h = g->h, f->q = g->q, f->k = g->k, f->v = g->v, f->att = g->att;
    f->proj = g->proj, f->ff1 = g->ff1, f->ff2 = g->ff2;
    int err;
    if ((err = qs_cuda_h2d_async(g->tokens, f->tokens, f->n * 4, g->stream)) ||
        (err = qs_cuda_h2d_async(g->slot, f->slot, f->n * 4, g->stream)) ||
        (err = qs_cuda_h2d_async(g->posd, f->pos, f->n * 4, g->stream)))
        return err;
    return QS_OK;
}

static void cuda_end(qs_fwd *f)
{
    (void)f;
}

static int timed_allreduce(qs_model *m, void *y, size_t count, qs_coll_dtype dt)
{
    return qs_comm_allreduce_sum(m->tp, y, y, count, dt, QS_COLL_DEVICE);
}

static int cuda_embed(qs_fwd *f)
{
    qs_model *m = f->m;
    gpu *g = G(f);
    size_t n = f->n, E = m->cfg.embed_dim, H = m->cfg.hidden;
    int err;
    if ((err = qs_cuda_embed(g->tokens, n, g->embed, m->v_first, m->vr, E, g->x, g->stream)) ||
        (err = timed_allreduce(m, g->x, n * E, QS_COLL_F32)))
        return err;
    g->act_h = 0;
    g->a4_h = NULL;
    if (E != H) {
        /* project_in: E -> H through fp16, the residual stream back in fp32. */
        if ((err = qs_cuda_f32_to_f16(g->x, n * E, g->e16, g->stream)) ||
            (err = qs_cuda_linear_f16(g->proj_in, g->e16, n, H, E, g->h, 0, g->stream)) ||
            (err = qs_cuda_f16_to_f32(g->h, n * H, g->x, g->stream)))
            return err;
    }
    if (g->pos)
        err = qs_cuda_add_pos(g->x, g->posd, n, H, g->pos, 2, g->stream);
    return err;
}

static int cuda_add_norm(qs_fwd *f, const void *d, const norm *nm, int post, void *y)
{
    const qs_model *m = f->m;
    gpu_norm *gn = nm->dev;
    gpu *g = G(f);
    /* A layer's norm feeds W8A8 or W4A4 linears; the final norm feeds the fp16 LM head. */
    g->act_h = g->act.xq && y == g->h && nm != &m->final_norm;
    g->a4_h = gn->a4.xq && y == g->h ? &gn->a4 : NULL;
    if (g->a4_h)
        return qs_cuda_add_norm_w4(f->x, d, gn->w, gn->b, f->n, m->cfg.hidden, m->cfg.norm_eps,
                                   post, y, g->a4_h, g->stream);
    if (g->act_h)
        return qs_cuda_add_norm_w8(f->x, d, gn->w, gn->b, f->n, m->cfg.hidden, m->cfg.norm_eps,
                                   post, y, &g->act, g->stream);
    return qs_cuda_add_norm(f->x, d, gn->w, gn->b, f->n, m->cfg.hidden, m->cfg.norm_eps, post, y,
                            g->stream);
}

static int cuda_to_input(qs_fwd *f, void *y)
{
    G(f)->act_h = 0;
    G(f)->a4_h = NULL;
    return qs_cuda_f32_to_f16(f->x, f->n * f->m->cfg.hidden, y, G(f)->stream);
}

static int cuda_linear(qs_fwd *f, const linear *l, const void *in, void *out)
{
    gpu_linear *d = l->dev;
    void *st = G(f)->stream;
    int err = QS_OK;
    switch (l->scheme) {
    case QS_SCHEME_FP16:
        err = qs_cuda_linear_f16(d->w16, in, f->n, l->N, l->K, out, 0, st);
        break;
    case QS_SCHEME_BCQ:
    case QS_SCHEME_RTN:
        err = qs_cuda_bcq_matmul(&d->bcq, in, f->n, out, st);
        break;
    case QS_SCHEME_W8A8:
        if (in == G(f)->h && G(f)->act_h)
            err = qs_cuda_w8a8_gemm_act(&d->w8, &G(f)->act, f->n, out, st);
        else
            err = qs_cuda_w8a8_gemm(&d->w8, in, f->n, 0.0f, out, st);
        break;
    case QS_SCHEME_W4A4:
        if (in == G(f)->h && G(f)->a4_h)
            err = qs_cuda_w4a4_gemm_act(&d->w4, G(f)->a4_h, f->n, out, st);
        else
            err = qs_cuda_w4a4_gemm(&d->w4, in, f->n, out, st);
        break;
    }
    if (!err && d->bias)
        err = qs_cuda_add_bias(out, d->bias, f->n, l->N, st);
    return err;
}

static int cuda_rope_kv(qs_fwd *f, uint32_t l)
{
    const qs_model *m = f->m;
    gpu *g = G(f);
    qs_cuda_kv kv = layer_kv(m, g, l);
    return qs_cuda_rope_kvq(g->q, g->k, g->v, f->n, m->hq, m->hkv, m->hd, g->cs, m->rope_adjacent,
                            g->slot, g->posd, &kv, m->max_seq, g->stream);
}

static int cuda_attention(qs_fwd *f, uint32_t l)
{
    const qs_model *m = f->m;
    gpu *g = G(f);
    qs_cuda_kv kv = layer_kv(m, g, l);
    /* Tokens of one sequence (a prefill) take the tiled kernel. */
    int one_slot = f->n > 1;
    for (size_t i = 1; i < f->n && one_slot; i++)
        one_slot = f->slot[i] == f->slot[0];
    if (one_slot)
        return qs_cuda_attention_prefill_kvq(g->q, &kv, f->n, g->slot, g->posd, m->hq, m->hkv,
                                             m->hd, m->cfg.heads / m->cfg.kv_heads, m->q_first,
                                             m->kv_first, m->max_seq, g->att, g->stream);
    return qs_cuda_attention_kvq(g->q, &kv, f->n, g->slot, g->posd, m->hq, m->hkv, m->hd,
                                 m->cfg.heads / m->cfg.kv_heads, m->q_first, m->kv_first,
                                 m->max_seq, g->att_ws, g->att, g->stream);
}

static int cuda_ffn_act(qs_fwd *f, int gated)
{
    gpu *g = G(f);
    size_t count = f->n * f->m->fr;
    return gated ? qs_cuda_swiglu(g->ff2, g->ff1, count, g->ff1, g->stream)
                 : qs_cuda_relu(g->ff1, count, g->ff1, g->stream);
}

static int cuda_reduce(qs_fwd *f, void *y, size_t count)
{
    return timed_allreduce(f->m, y, count, QS_COLL_F16);
}

static int device_logits(qs_fwd *f, const void *in, size_t first, size_t nl);

/* Logits to the host (perplexity, qs_model_forward's callers). */
static int cuda_logits(qs_fwd *f, const void *in, size_t first, size_t nl, float *logits)
{
    gpu *g = G(f);
    int err = device_logits(f, in, first, nl);
    if (!err)
        err = qs_cuda_d2h_async(logits, g->lg, nl * f->m->cfg.vocab * 4, g->stream);
    return err ? err : qs_cuda_stream_sync(g->stream);
}

/* Calibration on the GPU: the activations come to the host for the maxima. */
static int cuda_record(qs_fwd *f, uint32_t l, int site, const void *buf, size_t first, size_t width)
{
    qs_model *m = f->m;
    size_t count = f->n * width;
    uint16_t *h = malloc(count * 2 + 1);
    if (!h)
        return qs_seterr(QS_ENOMEM, "out of memory for calibration statistics");
    int err = qs_cuda_d2h_async(h, buf, count * 2, G(f)->stream);
    if (!err)
        err = qs_cuda_stream_sync(G(f)->stream);
    if (!err) {
        float *mx = m->record->absmax + qs_calib_at(m->record, l, site) + first;
        for (size_t i = 0; i < f->n; i++)
            for (size_t j = 0; j < width; j++) {
                float v = qs_fp16_to_fp32(h[i * width + j]);
                v = v < 0 ? -v : v;
                mx[j] = v > mx[j] ? v : mx[j];
            }
    }
    float *H = qs_calib_hessian(m->record, l, site), *x = NULL;
    if (!err && H) {
        if (!(x = malloc(count * sizeof *x + 1)))
            err = qs_seterr(QS_ENOMEM, "out of memory for calibration statistics");
        for (size_t i = 0; !err && i < count; i++)
            x[i] = qs_fp16_to_fp32(h[i]);
        if (!err)
            err = qs_hessian_add(H, x, f->n, width);
    }
    free(x);
    free(h);
    return err;
}

/* The next token on the device: the last row's logits stay there, the
 * sampler's state goes there and back (8 bytes), the token comes back. */
static int device_logits(qs_fwd *f, const void *in, size_t first, size_t nl)
{
    qs_model *m = f->m;
    gpu *g = G(f);
    size_t H = m->cfg.hidden, E = m->cfg.embed_dim, V = m->cfg.vocab, P = (size_t)m->size;
    const char *x = (const char *)in + first * H * 2;
    int err = QS_OK;
    if (E != H) {
        if ((err = qs_cuda_linear_f16(g->proj_out, x, nl, E, H, g->e16, 0, g->stream)))
            return err;
        x = g->e16;
    }
    const void *table = g->lm_head ? g->lm_head : g->embed;
    if ((err = qs_cuda_linear_f16(table, x, nl, m->vr, E, g->lg_local, 1, g->stream)) ||
        (err = qs_comm_allgather(m->tp, g->lg_local, g->lg_all, nl * m->vr, QS_COLL_F32,
                                 QS_COLL_DEVICE)))
        return err;
    return qs_cuda_gather_logits(g->lg_all, P, nl, m->vr, V, g->lg, g->stream);
}

static int stage_sampler(gpu *g, const qs_sampler *s)
{
    g->io->params = (qs_cuda_sample_params){s->temperature, s->top_p, s->top_k, 0};
    g->io->state = s->state;
    int err = qs_cuda_h2d_async(g->params, &g->io->params, sizeof g->io->params, g->stream);
    return err ? err : qs_cuda_h2d_async(g->state, &g->io->state, sizeof g->io->state, g->stream);
}

static int deliver(gpu *g, qs_sampler *s, int32_t *next)
{
    int err = qs_cuda_stream_sync(g->stream);
    if (!err)
        *next = g->io->next, s->state = g->io->state;
    return err;
}

static int cuda_sample(qs_fwd *f, const void *in, qs_sampler *s, int32_t *next)
{
    gpu *g = G(f);
    int err;
    if (!g->in_step && (err = stage_sampler(g, s)))
        return err;
    if ((err = device_logits(f, in, f->n - 1, 1)) ||
        (err = qs_cuda_sample(g->lg, 1, f->m->cfg.vocab, g->params, g->state, g->sample_ws, g->next,
                              g->stream)) ||
        (err = qs_cuda_d2h_async(&g->io->next, g->next, sizeof g->io->next, g->stream)) ||
        (err = qs_cuda_d2h_async(&g->io->state, g->state, sizeof g->io->state, g->stream)))
        return err;
    return g->in_step ? QS_OK : deliver(g, s, next);
}

/* A decode step: the first one is captured into a graph (and then run
 * from it), every later one replays it; the inputs (token, slot, position,
 * sampler) were copied to their fixed device buffers before. */
static int cuda_step_begin(qs_fwd *f, qs_sampler *s, int *replayed)
{
    gpu *g = G(f);
    int err = stage_sampler(g, s);
    if (err)
        return err;
    g->in_step = 1;
    *replayed = 0;
    if (g->graph) {
        *replayed = 1;
        g->replayed++;
        return qs_cuda_graph_launch(g->graph, g->stream);
    }
    if (!g->no_graph) {
        if ((err = qs_cuda_graph_begin(g->stream))) {
            g->in_step = 0;
            return err;
        }
        g->capturing = 1;
    }
    return QS_OK;
}

static int cuda_step_end(qs_fwd *f, qs_sampler *s, int32_t *next, int err)
{
    gpu *g = G(f);
    if (g->capturing) {
        void *exec = NULL;
        int cerr = qs_cuda_graph_end(g->stream, &exec);
        g->capturing = 0;
        if (!err && cerr) {
            /* Not capturable here: run the steps as they come from now on. */
            g->no_graph = 1;
            g->in_step = 0;
            return cerr;
        }
        if (!err && !(err = qs_cuda_graph_launch(exec, g->stream)))
            g->graph = exec, g->captured++;
        else
            qs_cuda_graph_free(exec);
    }
    g->in_step = 0;
    return err ? err : deliver(g, s, next);
}

const qs_ops qs_ops_cuda = {
    .name = "cuda",
    .begin = cuda_begin,
    .end = cuda_end,
    .embed = cuda_embed,
    .add_norm = cuda_add_norm,
    .to_input = cuda_to_input,
    .linear = cuda_linear,
    .rope_kv = cuda_rope_kv,
    .attention = cuda_attention,
    .ffn_act = cuda_ffn_act,
    .reduce = cuda_reduce,
    .logits = cuda_logits,
    .record = cuda_record,
    .sample = cuda_sample,
    .step_begin = cuda_step_begin,
    .step_end = cuda_step_end,
};
