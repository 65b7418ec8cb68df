/* Token sampling: greedy, temperature, nucleus (top-p), from a seeded RNG so
 * that every rank holding the same logits draws the same token. */
#include "qs_shard.h"

#include <math.h>
#include <stdlib.h>

void qs_sampler_init(qs_sampler *s, float temperature, float top_p, uint32_t top_k, uint64_t seed)
{
    s->top_k = top_k;
    s->temperature = temperature > 0 && isfinite(temperature) ? temperature : 0.0f;
    s->top_p = top_p > 0 && top_p < 1 ? top_p : 1.0f;
    s->state = seed ^ 0x853c49e6748fea9bull;
}

/* xorshift64*: small, fast, and the same everywhere. */
static double next_uniform(qs_sampler *s)
{
    uint64_t x = s->state ? s->state : 0x2545f4914f6cdd1dull;
    x ^= x >> 12, x ^= x << 25, x ^= x >> 27;
    s->state = x;
    return (double)((x * 0x2545f4914f6cdd1dull) >> 11) * (1.0 / 9007199254740992.0);
}

static int32_t argmax(const float *l, size_t n)
{
    size_t best = 0;
    for (size_t i = 1; i < n; i++)
        if (l[i] > l[best])
            best = i;
    return (int32_t)best;
}

typedef struct cand {
    float p;
    int32_t id;
} cand;

/* Probability descending, ties by id ascending: qsort is not stable, so
 * without the id the order of equal probabilities (and with it the token)
 * would be the C library's choice; the device sampler (kernels/cuda/
 * sample_gpu.cu) orders candidates the same way. */
static int by_prob_desc(const void *a, const void *b)
{
    const cand *x = a, *y = b;
    int c = (x->p < y->p) - (x->p > y->p);
    return c ? c : (x->id > y->id) - (x->id < y->id);
}

int32_t qs_sample(qs_sampler *s, const float *logits, size_t vocab)
{
    if (s->temperature == 0 || vocab < 2)
        return argmax(logits, vocab);
    cand *c = malloc(vocab * sizeof *c);
    if (!c)
        return argmax(logits, vocab);
    float mx = logits[argmax(logits, vocab)];
    double sum = 0;
    for (size_t i = 0; i < vocab; i++) {
        c[i].id = (int32_t)i;
        c[i].p = expf((logits[i] - mx) / s->temperature);
        sum += c[i].p;
    }
    /* Top-k, then nucleus: keep the k most likely tokens, then of those the
     * most likely up to top_p of their mass. */
    size_t keep = vocab;
    if (s->top_p < 1 || (s->top_k && s->top_k < vocab)) {
        qsort(c, vocab, sizeof *c, by_prob_desc);
        if (s->top_k && s->top_k < vocab)
            keep = s->top_k;
        double mass = 0;
        for (size_t i = 0; i < keep; i++)
            mass += c[i].p;
        double acc = 0;
        size_t k = 0;
        for (; k < keep && acc < s->top_p * mass; k++)
            acc += c[k].p;
        keep = k;
        sum = acc;
    }
    double u = next_uniform(s) * sum, acc = 0;
    int32_t pick = c[keep - 1].id;
    for (size_t i = 0; i < keep; i++) {
        acc += c[i].p;
        if (u < acc) {
            pick = c[i].id;
            break;
        }
    }
    free(c);
    return pick;
}
