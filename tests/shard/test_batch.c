/* Continuous batching (shard/batch.c) on 1 or 2 ranks, synthetic SmolLM2
 * widths with 2 layers:
 * - a token's logits do not depend on the other tokens of its forward call:
 *   bit for bit for the quantized schemes (their kernels compute each row
 *   alone), within 1e-5 for the fp16 scheme, whose fp32 BLAS blocks the
 *   product differently by the number of rows;
 * - sequences of different prompt lengths, lengths, samplers and seeds,
 *   joining at different steps, one dropped midway, prompts read in small
 *   chunks: each sequence's tokens equal its run alone (qs_model_generate);
 *   for the fp16 scheme the greedy ones (a sampled draw may fall on the
 *   other side of a 1e-6 change);
 * - the slots come back, a full batch and a sequence too long are refused. */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qs_collectives.h"
#include "qs_shard.h"

static int rank, world, failures;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            printf("rank %d FAIL %s:%d: ", rank, __FILE__, __LINE__);                              \
            printf(__VA_ARGS__);                                                                   \
            printf(" [%s]\n", qs_errmsg());                                                        \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

enum { NSEQ = 6, SLOTS = 4, MAXSEQ = 64, MAXNEW = 12 };

typedef struct spec {
    size_t n, max_new;
    float temperature, top_p;
    uint32_t top_k;
    uint64_t seed;
    int join_step; /* the step before which it is added */
    int drop_step; /* the step before which it is dropped; -1: never */
} spec;

static const spec specs[NSEQ] = {
    {37, 9, 0, 1, 0, 1, 0, -1},     {1, 12, 0.8f, 0.9f, 0, 2, 0, -1},  {5, 1, 0, 1, 0, 3, 1, -1},
    {20, 12, 1.0f, 1, 40, 4, 2, 6}, {11, 7, 0.7f, 0.95f, 0, 5, 3, -1}, {3, 10, 0, 1, 0, 6, 5, -1},
};

static void prompt_of(int i, int32_t *p, size_t n, uint32_t vocab)
{
    uint64_t x = 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1);
    for (size_t k = 0; k < n; k++) {
        x ^= x >> 13, x ^= x << 7, x ^= x >> 17;
        p[k] = (int32_t)(x % vocab);
    }
}

static int max_rel(const float *a, const float *b, size_t n, double *rel)
{
    double num = 0, den = 0;
    int same = 1;
    for (size_t i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]), den += (double)b[i] * b[i];
        same &= a[i] == b[i];
    }
    *rel = den > 0 ? sqrt(num / den) : 0;
    return same;
}

typedef struct keep {
    int32_t *t;
    size_t *n;
} keep;

static int keep_cb(void *ctx, int32_t tok)
{
    keep *k = ctx;
    if (*k->n < MAXNEW)
        k->t[(*k->n)++] = tok;
    return 0;
}

/* Tokens of two sequences in one call, in mixed order, against each alone. */
static void run_rows_alone(qs_model *m, qs_scheme scheme)
{
    const uint32_t V = qs_model_cfg(m)->vocab;
    int32_t a[9], b[4];
    prompt_of(10, a, 9, V), prompt_of(11, b, 4, V);
    float *la = malloc(2 * (size_t)V * sizeof *la), *lb = malloc(2 * (size_t)V * sizeof *lb);
    float *mix = malloc(2 * (size_t)V * sizeof *mix);
    uint32_t sa[9] = {0}, pa[9], sb[4] = {1, 1, 1, 1}, pb[4];
    for (uint32_t i = 0; i < 9; i++)
        pa[i] = i;
    for (uint32_t i = 0; i < 4; i++)
        pb[i] = i;
    int err = qs_model_forward(m, 9, a, sa, pa, 8, la);
    err = err ? err : qs_model_forward(m, 4, b, sb, pb, 3, lb);
    /* Together: b's prompt, a's prompt, interleaved, the two last tokens at
     * the end (as a batch step orders them). */
    int32_t t[13];
    uint32_t s[13], p[13];
    size_t n = 0;
    for (size_t i = 0; i < 8; i++) {
        if (i < 3)
            t[n] = b[i], s[n] = 1, p[n] = (uint32_t)i, n++;
        t[n] = a[i], s[n] = 0, p[n] = (uint32_t)i, n++;
    }
    t[n] = b[3], s[n] = 1, p[n] = 3, n++;
    t[n] = a[8], s[n] = 0, p[n] = 8, n++;
    err = err ? err : qs_model_forward(m, n, t, s, p, n - 2, mix);
    CHECK(!err, "forward");
    double ra, rb;
    int same_b = max_rel(mix, lb, V, &rb), same_a = max_rel(mix + V, la, V, &ra);
    if (scheme == QS_SCHEME_FP16)
        CHECK(ra < 1e-5 && rb < 1e-5, "fp16: rows in a batch differ from alone by %.3g, %.3g", ra,
              rb);
    else
        CHECK(same_a && same_b, "%s: rows in a batch differ from alone (relative L2 %.3g, %.3g)",
              qs_scheme_name(scheme), ra, rb);
    if (rank == 0)
        printf("%s: a row batched vs alone: relative L2 %.3g and %.3g%s\n", qs_scheme_name(scheme),
               ra, rb, same_a && same_b ? " (bit for bit)" : "");
    free(la), free(lb), free(mix);
}

static void run_batch(qs_comm *comm, qs_scheme scheme, int bits)
{
    qs_model_config c = *qs_preset_find("smollm2-135m");
    c.layers = 2;
    qs_model_opts o = {.quant = {scheme, bits, scheme == QS_SCHEME_FP16 ? 0 : 64},
                       .seed = 5,
                       .outlier_channels = 4,
                       .max_slots = SLOTS,
                       .max_seq = MAXSEQ};
    qs_model *m;
    int err = qs_model_init(&c, &o, comm, &m);
    CHECK(!err, "init %s", qs_scheme_name(scheme));
    if (err)
        return;
    run_rows_alone(m, scheme);

    /* Each sequence alone, its tokens kept by the callback. */
    int32_t want[NSEQ][MAXNEW], got[NSEQ][MAXNEW], prompt[NSEQ][40];
    size_t nwant[NSEQ] = {0}, ngot[NSEQ] = {0};
    for (int i = 0; i < NSEQ; i++) {
        const spec *q = &specs[i];
        prompt_of(i, prompt[i], q->n, c.vocab);
        qs_sampler s;
        qs_sampler_init(&s, q->temperature, q->top_p, q->top_k, q->seed);
        qs_gen_stats st = {0};
        keep k = {want[i], &nwant[i]};
        err = qs_model_generate(m, 0, prompt[i], q->n, q->max_new, &s, -1, keep_cb, &k, &st);
        CHECK(!err && nwant[i] == q->max_new, "generate %d: %zu tokens", i, nwant[i]);
    }

    /* Together, in chunks of 8 prompt tokens a step. */
    qs_batch *b;
    qs_batch_opts bo = {.prefill_chunk = 8};
    err = qs_batch_init(m, &bo, &b);
    CHECK(!err && qs_batch_capacity(b) == SLOTS, "batch init");
    qs_batch_event ev[SLOTS];
    int ended[NSEQ] = {0}, steps = 0, most = 0;
    for (int step = 0; step < 200 && !err; step++) {
        /* Joins at its step, or once a slot is free. */
        for (int i = 0; i < NSEQ; i++) {
            const spec *q = &specs[i];
            if (q->join_step > step || ended[i] != 0)
                continue;
            {
                qs_sampler s;
                qs_sampler_init(&s, q->temperature, q->top_p, q->top_k, q->seed);
                int e = qs_batch_add(b, (uint64_t)i + 100, prompt[i], q->n, q->max_new, &s, -1);
                if (e == QS_EBUSY)
                    continue; /* full: waits for a slot */
                CHECK(!e, "add %d", i);
                ended[i] = 1; /* running */
            }
        }
        for (int i = 0; i < NSEQ; i++)
            if (specs[i].drop_step == step && ended[i] == 1) {
                CHECK(!qs_batch_drop(b, (uint64_t)i + 100), "drop %d", i);
                ended[i] = 2;
            }
        if (qs_batch_running(b) > (uint32_t)most)
            most = (int)qs_batch_running(b);
        int waiting = 0;
        for (int i = 0; i < NSEQ; i++)
            waiting += ended[i] == 0;
        if (!qs_batch_running(b) && !waiting)
            break;
        size_t nev;
        qs_batch_stats st;
        err = qs_batch_step(b, ev, SLOTS, &nev, &st);
        CHECK(!err, "step %d", step);
        CHECK(st.prompt_tokens <= 8, "step %d read %zu prompt tokens", step, st.prompt_tokens);
        steps++;
        for (size_t e = 0; e < nev; e++) {
            int i = (int)(ev[e].id - 100);
            CHECK(i >= 0 && i < NSEQ && ngot[i] < MAXNEW, "event for %llu",
                  (unsigned long long)ev[e].id);
            if (i < 0 || i >= NSEQ || ngot[i] >= MAXNEW)
                continue;
            CHECK(ev[e].first == (ngot[i] == 0), "first flag of %d", i);
            got[i][ngot[i]++] = ev[e].token;
            if (ev[e].finish) {
                CHECK(ev[e].finish == QS_FINISH_LENGTH && ngot[i] == specs[i].max_new,
                      "sequence %d ended (%d) after %zu tokens", i, ev[e].finish, ngot[i]);
                ended[i] = 2;
            }
        }
    }
    CHECK(qs_batch_running(b) == 0 && qs_batch_kv_tokens(b) == 0, "%u sequences left",
          qs_batch_running(b));
    CHECK(most == SLOTS, "at most %d sequences ran together", most);
    for (int i = 0; i < NSEQ; i++) {
        size_t n = specs[i].drop_step >= 0 ? ngot[i] : nwant[i];
        CHECK(ngot[i] == n && (specs[i].drop_step < 0 || ngot[i] < specs[i].max_new),
              "sequence %d: %zu tokens batched, %zu alone", i, ngot[i], nwant[i]);
        /* fp16: a 1e-6 change in a logit may move a sampled draw across
         * a boundary of the cumulative distribution, so only greedy
         * sequences must match there (their margins are far wider). */
        if (scheme == QS_SCHEME_FP16 && specs[i].temperature > 0)
            continue;
        CHECK(!memcmp(got[i], want[i], n * sizeof(int32_t)),
              "%s sequence %d: batched tokens differ from alone", qs_scheme_name(scheme), i);
    }
    if (rank == 0)
        printf("%s %d-bit: %d sequences (%d at once) in %d steps, each as alone\n",
               qs_scheme_name(scheme), bits, NSEQ, most, steps);

    /* Refusals: a full batch, a sequence longer than the cache. */
    qs_sampler s;
    qs_sampler_init(&s, 0, 1, 0, 1);
    int32_t one = 1;
    for (int i = 0; i < SLOTS; i++)
        CHECK(!qs_batch_add(b, 1000 + (uint64_t)i, &one, 1, 4, &s, -1), "add %d", i);
    CHECK(qs_batch_add(b, 2000, &one, 1, 4, &s, -1) == QS_EBUSY, "a full batch took one more");
    CHECK(qs_batch_drop(b, 1002) == QS_OK && qs_batch_add(b, 2000, &one, 1, 4, &s, -1) == QS_OK,
          "a freed slot was not taken");
    CHECK(!qs_batch_drop(b, 2000), "drop");
    CHECK(qs_batch_add(b, 3000, &one, 1, MAXSEQ + 1, &s, -1) == QS_EINVAL &&
              strstr(qs_errmsg(), "max_seq"),
          "a sequence longer than the cache was taken");
    qs_batch_close(b);
    qs_model_close(m);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    qs_comm *comm;
    if (qs_comm_init_mpi(MPI_COMM_WORLD, &comm)) {
        printf("rank %d: %s\n", rank, qs_errmsg());
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    run_batch(comm, QS_SCHEME_RTN, 4);
    run_batch(comm, QS_SCHEME_W8A8, 8);
    run_batch(comm, QS_SCHEME_FP16, 16);
    int total = 0;
    MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0)
        printf("test_batch on %d ranks: %s (%d failures)\n", world, total ? "FAILED" : "ok", total);
    qs_comm_close(comm);
    MPI_Finalize();
    return total ? 1 : 0;
}
