/* test_gpu_sample.c: qs_cuda_sample against the CPU sampler itself
 * (shard/sampler.c, compiled into this test): for every row the same token
 * and the same RNG state after the draw, over several chained steps, with
 * every row of a batch its own parameters. Tolerance: none, token and state
 * must be equal (under the harness expf is glibc's, so p is the CPU's bit
 * for bit; the few sums taken in another order than the CPU's could only
 * differ at a chance of about V 2^-53 per draw, see sample_gpu.cu).
 *
 * Logits: Gaussian (sd 1 to 5), quantized to halves (ties everywhere, at the
 * top-k and nucleus boundaries too), all equal (one tie over the whole
 * vocabulary: the nucleus is top_p of it), a few integer levels, peaked with
 * masked (-inf) entries, and a very low temperature (most p underflow to 0).
 * Parameters: greedy (0, negative, NaN temperature), temperature alone,
 * top-p, top-k (1, 40, V - 1, V, > V, > 4096 = the device's chunk), both,
 * top_p out of (0, 1) (off). Vocabularies 2, 257, 1000, 10000 (a flat
 * nucleus of 9000 walks 3 chunks), 49152, and 1 (always token 0). Tokens
 * are poisoned (-1) before each call. */
#define _POSIX_C_SOURCE 200809L
#include "gpu_test.h"
#include "qs_shard.h"

#include <time.h>

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

typedef struct sparams {
    float T, top_p;
    uint32_t top_k; /* UINT32_MAX - k: V - k; UINT32_MAX: V + 5 */
} sparams;

#define K_VM1 (UINT32_MAX - 1) /* V - 1 */
#define K_V   (UINT32_MAX - 2) /* V */
#define K_VP  UINT32_MAX       /* V + 5 */

static const sparams grid[] = {
    {0.0f, 1.0f, 0},    {0.7f, 1.0f, 0},    {1.0f, 0.9f, 0},    {1.3f, 0.5f, 0},
    {0.8f, 1.0f, 40},   {1.0f, 0.95f, 40},  {1.0f, 1.0f, 1},    {1.0f, 0.9f, K_VM1},
    {1.0f, 1.0f, K_VP}, {1.0f, 0.7f, K_V},  {1.0f, 0.3f, 5000}, {2.0f, 0.99f, 0},
    {-1.0f, 0.9f, 40},  {NAN, 1.0f, 0},     {1.0f, 0.0f, 3},    {1.0f, 1.5f, 0},
    {0.02f, 0.9f, 0},   {1.0f, 1.0f, 5000}, {0.5f, 0.999f, 7},  {1.0f, 0.5f, 2},
};
#define NGRID (sizeof grid / sizeof grid[0])

/* Nuclei and top-k sets beyond the device's 4096-candidate chunk. */
static const sparams walk[] = {
    {1.0f, 0.9f, 0},
    {1.0f, 0.5f, 6000},
    {1.5f, 0.97f, 0},
    {1.0f, 1.0f, 4097},
};
#define NWALK (sizeof walk / sizeof walk[0])

static uint32_t resolve_k(uint32_t k, size_t V)
{
    return k == K_VM1  ? (uint32_t)(V - 1)
           : k == K_V  ? (uint32_t)V
           : k == K_VP ? (uint32_t)(V + 5)
                       : k;
}

static void fill_logits(float *l, size_t V, int kind)
{
    double sd = 1 + 4 * tu_unif();
    for (size_t i = 0; i < V; i++) {
        double g = tu_gauss();
        switch (kind) {
        case 0:
            l[i] = (float)(sd * g);
            break;
        case 1: /* halves: ties everywhere */
            l[i] = (float)(round(2 * g) / 2);
            break;
        case 2: /* one tie over the vocabulary */
            l[i] = 1.5f;
            break;
        case 3: /* four levels */
            l[i] = (float)(tu_u64() % 4);
            break;
        default: /* peaked, with masked entries */
            l[i] = tu_u64() % 7 == 0 ? -INFINITY : (float)g;
        }
    }
    if (kind == 4)
        l[tu_u64() % V] = 12.0f;
}

static const char *kind_name[] = {"gauss", "halves", "flat", "levels", "peaked"};

/* n rows of V logits, each with its parameters (rows cycle through gr[]
 * from g0, the logits kinds through nk kinds from k0), steps chained draws. */
static void sample_case(const sparams *gr, size_t ng, size_t V, size_t n, size_t g0, int k0, int nk,
                        int steps)
{
    float *l = gt_alloc(n * V * 4);
    qs_sampler *cpu = gt_alloc(n * sizeof *cpu);
    qs_cuda_sample_params *prm = gt_alloc(n * sizeof *prm);
    uint64_t *st = gt_alloc(n * 8);
    int32_t *tok = gt_alloc(n * 4);
    void *dl = NULL, *dp = NULL, *ds = NULL, *dws = NULL, *dt = NULL;
    size_t wsb = qs_cuda_sample_ws_bytes(n, V);
    int *kinds = gt_alloc(n * sizeof *kinds), fail0 = gt_failures;
    double t0 = now_s();
    for (size_t i = 0; i < n; i++) {
        const sparams *g = &gr[(g0 + i) % ng];
        uint32_t k = resolve_k(g->top_k, V);
        kinds[i] = (int)(k0 + (i / ng) % nk) % 5;
        fill_logits(l + i * V, V, kinds[i]);
        qs_sampler_init(&cpu[i], g->T, g->top_p, k, tu_u64());
        prm[i] = (qs_cuda_sample_params){g->T, g->top_p, k, 0};
        st[i] = cpu[i].state;
    }
    GT_OK(qs_cuda_malloc(&dl, n * V * 4));
    GT_OK(qs_cuda_malloc(&dp, n * sizeof *prm));
    GT_OK(qs_cuda_malloc(&ds, n * 8));
    GT_OK(qs_cuda_malloc(&dws, wsb));
    GT_OK(qs_cuda_malloc(&dt, n * 4));
    GT_OK(qs_cuda_h2d(dl, l, n * V * 4));
    GT_OK(qs_cuda_h2d(dp, prm, n * sizeof *prm));
    GT_OK(qs_cuda_h2d(ds, st, n * 8));
    for (int s = 0; s < steps; s++) {
        GT_OK(qs_cuda_memset(dt, 0xFF, n * 4));
        GT_OK(qs_cuda_sample(dl, n, V, dp, ds, dws, dt, NULL));
        GT_OK(qs_cuda_sync());
        GT_OK(qs_cuda_d2h(tok, dt, n * 4));
        GT_OK(qs_cuda_d2h(st, ds, n * 8));
        for (size_t i = 0; i < n; i++) {
            int32_t want = qs_sample(&cpu[i], l + i * V, V);
            int ok = tok[i] == want && st[i] == cpu[i].state;
            gt_cases++;
            if (!ok) {
                gt_failures++;
                const sparams *g = &gr[(g0 + i) % ng];
                printf("FAIL V=%zu row %zu step %d (%s, T=%g top_p=%g top_k=%u): token %d, "
                       "CPU %d; state %s\n",
                       V, i, s, kind_name[kinds[i]], (double)g->T, (double)g->top_p, prm[i].top_k,
                       tok[i], want, st[i] == cpu[i].state ? "equal" : "DIFFERS");
            }
        }
    }
    printf("%s V=%zu: %zu rows x %d chained steps, %s parameters from %zu, %d logits kinds "
           "from %s: %d differ (%.1f s)\n",
           gt_failures == fail0 ? "ok  " : "FAIL", V, n, steps, gr == grid ? "grid" : "walk", g0,
           nk, kind_name[k0], gt_failures - fail0, now_s() - t0);
out:
    qs_cuda_free(dl), qs_cuda_free(dp), qs_cuda_free(ds), qs_cuda_free(dws), qs_cuda_free(dt);
    free(l), free(cpu), free(prm), free(st), free(tok), free(kinds);
}

/* The harness ran it, but is it a sampler? Temperature 1 on 4 logits
 * (p = 1, e^-1, e^-2, e^-3): frequencies within 5 sigma over 4000 draws,
 * token and state equal to the CPU's on every draw (one row, chained). */
static void frequency_case(size_t N)
{
    const size_t V = 4;
    float l[4] = {3, 2, 1, 0};
    qs_sampler cpu;
    qs_sampler_init(&cpu, 1.0f, 1.0f, 0, tu_u64());
    qs_cuda_sample_params prm = {1.0f, 1.0f, 0, 0};
    uint64_t st = cpu.state;
    void *dl = NULL, *dp = NULL, *ds = NULL, *dws = NULL, *dt = NULL;
    size_t counts[4] = {0}, diff = 0;
    int32_t *tok = gt_alloc(N * 4);
    GT_OK(qs_cuda_malloc(&dl, 16));
    GT_OK(qs_cuda_malloc(&dp, sizeof prm));
    GT_OK(qs_cuda_malloc(&ds, 8));
    GT_OK(qs_cuda_malloc(&dws, qs_cuda_sample_ws_bytes(1, V)));
    GT_OK(qs_cuda_malloc(&dt, N * 4));
    GT_OK(qs_cuda_h2d(dl, l, 16));
    GT_OK(qs_cuda_h2d(dp, &prm, sizeof prm));
    GT_OK(qs_cuda_h2d(ds, &st, 8));
    for (size_t s = 0; s < N; s++) /* queued back to back: the state chains on the device */
        GT_OK(qs_cuda_sample(dl, 1, V, dp, ds, dws, (int32_t *)dt + s, NULL));
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(tok, dt, N * 4));
    for (size_t s = 0; s < N; s++) {
        diff += tok[s] != qs_sample(&cpu, l, V);
        counts[tok[s] & 3]++;
    }
    double z = 1 + exp(-1.0) + exp(-2.0) + exp(-3.0), worst = 0;
    for (int i = 0; i < 4; i++) {
        double p = exp(-(double)i) / z, sd = sqrt(N * p * (1 - p));
        double dev = fabs((double)counts[i] - N * p) / sd;
        worst = dev > worst ? dev : worst;
    }
    gt_cases++;
    gt_failures += diff != 0 || worst > 5;
    printf("%s frequencies over %zu draws %zu/%zu/%zu/%zu, worst %.1f sigma; %zu differ from "
           "the CPU\n",
           diff == 0 && worst <= 5 ? "ok  " : "FAIL", N, counts[0], counts[1], counts[2], counts[3],
           worst, diff);
out:
    qs_cuda_free(dl), qs_cuda_free(dp), qs_cuda_free(ds), qs_cuda_free(dws), qs_cuda_free(dt);
    free(tok);
}

int main(void)
{
    tu_seed("test_gpu_sample");
    gt_need_gpu();
    const int emu = qs_cuda_emulated();
    /* every grid row against every logits kind at the small vocabularies */
    sample_case(grid, NGRID, 1, 4, 1, 0, 1, 2);
    sample_case(grid, NGRID, 2, NGRID, 0, 0, 1, 3);
    sample_case(grid, NGRID, 257, NGRID * 5, 0, 0, 5, 2);
    sample_case(grid, NGRID, 1000, NGRID * 5, 3, 0, 5, 2);
    sample_case(grid, NGRID, 49152, emu ? 12 : 5 * NGRID, 0, 0, emu ? 1 : 5, emu ? 1 : 2);
    sample_case(grid, NGRID, 49152, emu ? 14 : 5 * NGRID, 6, 1, emu ? 1 : 5, emu ? 1 : 2);
    /* chunk walks: flat and four-level logits, nuclei of 2,500 to 9,000 */
    sample_case(walk, NWALK, 10000, 2 * NWALK, 0, 2, 2, 2);
    sample_case(walk, NWALK, 49152, emu ? 1 : 2 * NWALK, 0, 2, 2, 2); /* 44,237 of 49,152 */
    if (!emu)
        sample_case(grid, NGRID, 262144, 5 * NGRID, 0, 0, 5, 2);
    frequency_case(emu ? 200 : 4000);
    printf("# %d draws compared\n", gt_cases);
    return gt_summary("test_gpu_sample");
}
