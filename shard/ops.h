/* ops.h: the operations of the forward pass, one table per device. The
 * layer loop (forward.c) is written once against them; ops_cpu.c runs them
 * on the host in fp32, ops_cuda.c on the rank's GPU (an fp32 residual
 * stream, fp16 activations) through kernels/cuda. Buffers are the device's
 * own: host arrays on the CPU, device memory on a GPU. */
#ifndef QS_OPS_H
#define QS_OPS_H

#include "model_internal.h"

/* One call of the forward pass over n tokens. The ops fill the buffers in
 * begin() (sized for n) and free them in end(). */
typedef struct qs_fwd {
    qs_model *m;
    size_t n;
    const int32_t *tokens; /* host arrays of n */
    const uint32_t *slot, *pos;
    void *x;               /* residual stream, n x max(H, E), fp32 */
    void *h;               /* a norm's output, a linear's input, n x max(H, E) */
    void *q, *k, *v, *att; /* n x hq*hd, n x hkv*hd, n x hkv*hd, n x hq*hd */
    void *proj;            /* a row-parallel layer's partial sums, n x max(H, E) */
    void *ff1, *ff2;       /* n x fr */
    void *dev;             /* the device's own state for this call */
} qs_fwd;

typedef struct qs_ops {
    const char *name;
    int (*begin)(qs_fwd *f);
    void (*end)(qs_fwd *f);
    /* x = the tokens' embeddings (gathered over the group), plus learned
     * positions; through project_in when E != H. */
    int (*embed)(qs_fwd *f);
    /* x += d (NULL: nothing), y = norm(x); post: x = norm(x) too. */
    int (*add_norm)(qs_fwd *f, const void *d, const norm *nm, int post, void *y);
    /* y = x, as a linear layer's input. */
    int (*to_input)(qs_fwd *f, void *y);
    /* out (n x l->N) = in (n x l->K) W^T (+ bias where this rank adds it). */
    int (*linear)(qs_fwd *f, const linear *l, const void *in, void *out);
    /* q and k rotated at the tokens' positions, k and v into layer l's cache. */
    int (*rope_kv)(qs_fwd *f, uint32_t l);
    /* att = causal attention of q over layer l's cache. */
    int (*attention)(qs_fwd *f, uint32_t l);
    /* ff1 = silu(ff2) * ff1 when gated (SwiGLU), else max(ff1, 0). */
    int (*ffn_act)(qs_fwd *f, int gated);
    /* y (count elements) summed over the group in place (row-parallel). */
    int (*reduce)(qs_fwd *f, void *y, size_t count);
    /* logits (host, nl x vocab) of the nl tokens from token `first` of
     * in (the final norm's output, or x's input copy). */
    int (*logits)(qs_fwd *f, const void *in, size_t first, size_t nl, float *logits);
    /* SmoothQuant statistics: the abs-max per column of buf (n x width)
     * into site's columns [first, first + width) of m->record. */
    int (*record)(qs_fwd *f, uint32_t l, int site, const void *buf, size_t first, size_t width);
    /* The token after the call's last: the logits of in's last row sampled
     * with s (advanced as qs_sample advances it). The result may arrive in
     * step_end: a GPU leaves the logits on the device and copies only the
     * token back. */
    int (*sample)(qs_fwd *f, const void *in, qs_sampler *s, int32_t *next);
    /* Optional (NULL on the CPU): a decode step (one token and a sampler)
     * run as a captured CUDA graph. step_begin sets *replayed when it
     * replayed the captured step, so the loop is skipped; otherwise the
     * loop runs (captured when the device can) and step_end completes it:
     * it waits for the step and delivers the sampled token. */
    int (*step_begin)(qs_fwd *f, qs_sampler *s, int *replayed);
    int (*step_end)(qs_fwd *f, qs_sampler *s, int32_t *next, int err);
} qs_ops;

extern const qs_ops qs_ops_cpu;

/* The device's table for a model (the CPU's unless it was moved to a GPU). */
const qs_ops *qs_model_ops(const qs_model *m);

#endif
