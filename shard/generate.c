/* The loops above one forward step: generation with a sampler, and
 * perplexity over a token stream. Both are collective over the model's
 * tensor-parallel group: every rank runs them with the same arguments, and
 * rank 0 alone decides when to stop early (its callback's answer is
 * broadcast), so the ranks never disagree on how many steps to run. */
#define _POSIX_C_SOURCE 200809L
#include "qs_shard.h"

#include "qs_collectives.h"

#include <stdlib.h>
#include <time.h>

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

/* Rank 0's verdict, shared: 1 to go on, 0 to stop. */
static int agree(qs_comm *tp, int go, int *err)
{
    int32_t v = go;
    *err = qs_comm_bcast(tp, &v, 1, QS_COLL_I32, 0, QS_COLL_HOST);
    return *err ? 0 : v;
}

int qs_model_generate(qs_model *m, uint32_t slot, const int32_t *prompt, size_t n, size_t max_new,
                      qs_sampler *s, int32_t eos, qs_token_cb cb, void *ctx, qs_gen_stats *st)
{
    const qs_model_config *c = qs_model_cfg(m);
    qs_comm *tp = qs_model_comm(m);
    if (!prompt || n == 0 || !s || !st)
        return qs_seterr(QS_EINVAL, "generation needs a prompt of at least one token");
    st->prompt_tokens = n;
    st->new_tokens = 0;
    st->prefill_ms = st->decode_ms = 0;
    (void)c;
    uint32_t *slots = malloc(n * sizeof *slots), *pos = malloc(n * sizeof *pos);
    int err = QS_OK;
    if (!slots || !pos) {
        err = qs_seterr(QS_ENOMEM, "out of memory for a %zu-token prompt", n);
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        slots[i] = slot, pos[i] = (uint32_t)i;
    double t0 = now_ms();
    int32_t t;
    if ((err = qs_model_next(m, n, prompt, slots, pos, s, &t)))
        goto out;
    st->prefill_ms = now_ms() - t0;
    double comm0 = qs_model_comm_ms(m);
    uint32_t p = (uint32_t)n;
    for (size_t k = 0; k < max_new; k++) {
        st->new_tokens++;
        int go = cb ? cb(ctx, t) == 0 : 1;
        go = agree(tp, go && t != eos && k + 1 < max_new, &err);
        if (!go)
            break;
        double t1 = now_ms();
        int32_t in = t;
        if ((err = qs_model_next(m, 1, &in, &slot, &p, s, &t)))
            break;
        double dt = now_ms() - t1;
        if (st->token_ms && k < st->token_ms_cap)
            st->token_ms[k] = dt;
        st->decode_ms += dt;
        p++;
    }
    st->decode_comm_ms = qs_model_comm_ms(m) - comm0;
out:
    free(slots);
    free(pos);
    return err;
}

int qs_model_perplexity(qs_model *m, const int32_t *ids, size_t n, size_t ctx, size_t max_chunks,
                        int32_t bos, qs_ppl_cb cb, void *cb_ctx, qs_ppl *out)
{
    if (!ids || !out || ctx < 4)
        return qs_seterr(QS_EINVAL, "perplexity needs tokens and a context of at least 4");
    size_t chunks = n / ctx;
    if (max_chunks && chunks > max_chunks)
        chunks = max_chunks;
    if (chunks == 0)
        return qs_seterr(QS_EINVAL,
                         "the text has %zu tokens, fewer than one window of %zu: use "
                         "a longer text or a smaller --ctx",
                         n, ctx);
    out->nll = 0;
    out->count = 0;
    out->chunks = 0;
    qs_comm *tp = qs_model_comm(m);
    int32_t *win = malloc(ctx * sizeof *win);
    if (!win)
        return qs_seterr(QS_ENOMEM, "out of memory for a %zu-token window", ctx);
    int err = QS_OK;
    for (size_t i = 0; i < chunks && !err; i++) {
        /* As llama.cpp: the window's first token becomes BOS when the model
         * has one; only the second half is scored, so that every scored
         * token sees at least ctx/2 tokens of context. */
        for (size_t j = 0; j < ctx; j++)
            win[j] = ids[i * ctx + j];
        if (bos >= 0)
            win[0] = bos;
        if ((err = qs_model_score(m, win, ctx, ctx / 2, 0, &out->nll, &out->count)))
            break;
        out->chunks++;
        int go = cb ? cb(cb_ctx, out) == 0 : 1;
        if (!agree(tp, go, &err))
            break;
    }
    free(win);
    return err;
}
