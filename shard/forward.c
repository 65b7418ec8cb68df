/* The forward pass with a KV cache: one layer loop for every device, over
 * the device's operations (ops.h). Per layer: norm, q/k/v (column-
 * parallel), RoPE and the cache, attention, o (row-parallel) and a sum over
 * the group, norm, the FFN's input layers, SwiGLU or ReLU, its output layer
 * and a sum. Pre-LN models fold each residual add into the next norm;
 * post-LN (OPT-350m) normalises the residual stream itself. */
#include "ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

const qs_ops *qs_model_ops(const qs_model *m)
{
    return m->ops ? m->ops : &qs_ops_cpu;
}

/* Runs one layer. *pending is the previous layer's FFN output not yet added
 * to the residual stream (pre-LN), which this layer's first norm adds and
 * which this layer leaves for the next. */
static int layer_forward(const qs_ops *op, qs_fwd *f, uint32_t l, const void **pending)
{
    qs_model *m = f->m;
    const qs_model_config *c = &m->cfg;
    layer *L = &m->layers[l];
    size_t n = f->n, H = c->hidden, hd = m->hd;
    int pre = c->final_norm || c->arch == QS_ARCH_LLAMA; /* OPT-350m is post-LN */
    int rec = m->record && op->record;
    int err = QS_OK;

    /* Attention block; a post-LN layer's input is the residual stream as
     * the previous layer left it in h. */
    if (pre) {
        if ((err = op->add_norm(f, *pending, &L->attn_norm, 0, f->h)) ||
            (rec && (err = op->record(f, l, QS_CALIB_QKV, f->h, 0, H))))
            return err;
    } else if (l == 0 && (err = op->to_input(f, f->h))) {
        return err;
    }
    if ((err = op->linear(f, &L->q, f->h, f->q)) || (err = op->linear(f, &L->k, f->h, f->k)) ||
        (err = op->linear(f, &L->v, f->h, f->v)) || (err = op->rope_kv(f, l)) ||
        (err = op->attention(f, l)) ||
        (rec && (err = op->record(f, l, QS_CALIB_O, f->att, (size_t)m->q_first * hd,
                                  (size_t)m->hq * hd))) ||
        (err = op->linear(f, &L->o, f->att, f->proj)) || (err = op->reduce(f, f->proj, n * H)))
        return err;

    /* FFN block: the residual add folded into its norm. */
    if ((err = op->add_norm(f, f->proj, &L->ffn_norm, !pre, f->h)) ||
        (pre && rec && (err = op->record(f, l, QS_CALIB_UP, f->h, 0, H))) ||
        (err = op->linear(f, &L->up, f->h, f->ff1)) ||
        (c->gated_ffn && (err = op->linear(f, &L->gate, f->h, f->ff2))) ||
        (err = op->ffn_act(f, c->gated_ffn)) ||
        (rec && (err = op->record(f, l, QS_CALIB_DOWN, f->ff1, (size_t)m->rank * m->fr, m->fr))) ||
        (err = op->linear(f, &L->down, f->ff1, f->proj)) || (err = op->reduce(f, f->proj, n * H)))
        return err;
    if (pre) {
        *pending = f->proj;
        return QS_OK;
    }
    *pending = NULL;
    return op->add_norm(f, f->proj, &L->ffn_norm, 1, f->h);
}

/* n tokens at most the device's chunk: logits of tokens [first, n), or with
 * a sampler the token after the last. */
static int forward_chunk(qs_model *m, size_t n, const int32_t *tokens, const uint32_t *slot,
                         const uint32_t *pos, size_t first, float *logits, qs_sampler *s,
                         int32_t *next)
{
    const qs_ops *op = qs_model_ops(m);
    qs_fwd f = {.m = m, .n = n, .tokens = tokens, .slot = slot, .pos = pos};
    int err = op->begin(&f);
    if (err)
        return err;
    int replayed = 0, stepping = s && n == 1 && op->step_begin;
    if (stepping && (err = op->step_begin(&f, s, &replayed)))
        goto out;
    if (replayed)
        goto out;
    const void *pending = NULL;
    if ((err = op->embed(&f)))
        goto out;
    for (uint32_t l = 0; l < m->cfg.layers && !err; l++)
        err = layer_forward(op, &f, l, &pending);
    if (err || (!s && first == n))
        goto out;
    /* The last layer's output: through the final norm (pre-LN models all
     * have one), or as the last post-LN layer left it in h. */
    if (m->cfg.final_norm && (err = op->add_norm(&f, pending, &m->final_norm, 0, f.h)))
        goto out;
    err = s ? op->sample(&f, f.h, s, next) : op->logits(&f, f.h, first, n - first, logits);
out:
    if (stepping)
        err = op->step_end(&f, s, next, err);
    op->end(&f);
    return err;
}

static int check_tokens(const qs_model *m, size_t n, const int32_t *tokens, const uint32_t *slot,
                        const uint32_t *pos)
{
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
    return QS_OK;
}

int qs_model_forward(qs_model *m, size_t n, const int32_t *tokens, const uint32_t *slot,
                     const uint32_t *pos, size_t first_logit, float *logits)
{
    if (!m || !tokens || !slot || !pos || (first_logit < n && !logits) || first_logit > n)
        return qs_seterr(QS_EINVAL, "qs_model_forward: tokens, slots, positions and (for "
                                    "logits) an output are required");
    int err = check_tokens(m, n, tokens, slot, pos);
    if (err || n == 0)
        return err;
    /* A device with a fixed workspace takes the tokens in chunks; the cache
     * carries each chunk's keys and values to the next. */
    size_t chunk = m->chunk ? m->chunk : n, V = m->cfg.vocab;
    for (size_t at = 0; at < n && !err; at += chunk) {
        size_t k = n - at < chunk ? n - at : chunk;
        size_t first = first_logit > at ? first_logit - at : 0;
        if (first > k)
            first = k;
        float *out = first < k ? logits + (at + first - first_logit) * V : NULL;
        err = forward_chunk(m, k, tokens + at, slot + at, pos + at, first, out, NULL, NULL);
    }
    return err;
}

int qs_model_next(qs_model *m, size_t n, const int32_t *tokens, const uint32_t *slot,
                  const uint32_t *pos, qs_sampler *s, int32_t *next)
{
    if (!m || !tokens || !slot || !pos || !s || !next || n == 0)
        return qs_seterr(QS_EINVAL, "qs_model_next: tokens, slots, positions, a sampler and an "
                                    "output are required");
    int err = check_tokens(m, n, tokens, slot, pos);
    size_t chunk = m->chunk ? m->chunk : n;
    for (size_t at = 0; at < n && !err; at += chunk) {
        size_t k = n - at < chunk ? n - at : chunk;
        int last = at + k == n;
        err = forward_chunk(m, k, tokens + at, slot + at, pos + at, k, NULL, last ? s : NULL,
                            last ? next : NULL);
    }
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
