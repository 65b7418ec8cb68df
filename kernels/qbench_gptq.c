/* qbench_gptq: times the calibration Hessian and GPTQ (kernels/cpu/gptq.c)
 * against the plain quantizers, per weight shape.
 *
 *   qbench_gptq [--reps R] [--tokens M] [NxK ...]
 *
 * Default shapes: SmolLM2-135M's two linear shapes (1536x576: up/gate,
 * 576x1536: down) and 2048x8192. H comes from M random tokens (default
 * 1024; rank-deficient past K = M, which the damping covers, and the
 * timing does not depend on H's values). BCQ and RTN groups of 128 (96
 * where 128 does not divide K), W4 groups of 128 and 128 outlier channels.
 * Prints the median over R runs (default 3) of each step. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qs_kernels.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static float gauss(void)
{
    double u[2];
    for (int i = 0; i < 2; i++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        u[i] = ((double)(rng >> 11) + 0.5) / 9007199254740992.0;
    }
    return (float)(sqrt(-2 * log(u[0])) * cos(6.283185307179586 * u[1]));
}

enum { S_HESS, S_RTN4, S_GRTN4, S_BCQ3, S_GBCQ3, S_W4, S_GW4, S_N };
static const char *names[S_N] = {"qs_hessian_add",     "qs_bcq_from_rtn q4", "qs_gptq_bcq rtn q4",
                                 "qs_bcq_quantize q3", "qs_gptq_bcq bcq q3", "qs_w4_quantize",
                                 "qs_gptq_w4"};

static int bench(size_t N, size_t K, size_t M, int reps)
{
    float *W = malloc(N * K * sizeof *W), *X = malloc(M * K * sizeof *X),
          *H = malloc(K * K * sizeof *H);
    double *t = malloc((size_t)reps * S_N * sizeof *t);
    if (!W || !X || !H || !t)
        return fprintf(stderr, "qbench_gptq: out of memory for %zux%zu\n", N, K), 1;
    for (size_t i = 0; i < N * K; i++)
        W[i] = 0.02f * gauss();
    for (size_t i = 0; i < M * K; i++)
        X[i] = gauss();
    size_t g = K % 128 == 0 ? 128 : 96, ko = K >= 512 ? 128 : 0; /* W4: Atom's 128 outliers */
    for (int r = 0; r < reps; r++) {
        qs_bcq b;
        qs_w4 w4;
        double t0 = now();
        memset(H, 0, K * K * sizeof *H);
        if (qs_hessian_add(H, X, M, K))
            goto fail;
        t[S_HESS * reps + r] = now() - t0;
        for (int s = S_RTN4; s < S_N; s++) {
            t0 = now();
            int err = s == S_RTN4    ? qs_bcq_from_rtn(&b, W, N, K, 4, g)
                      : s == S_GRTN4 ? qs_gptq_bcq(&b, W, N, K, H, 4, g, 0, 1, NULL)
                      : s == S_BCQ3  ? qs_bcq_quantize(&b, W, N, K, 3, g, 0)
                      : s == S_GBCQ3 ? qs_gptq_bcq(&b, W, N, K, H, 3, g, 0, 0, NULL)
                      : s == S_W4    ? qs_w4_quantize(&w4, W, N, K, NULL, ko, 128)
                                     : qs_gptq_w4(&w4, W, N, K, H, NULL, ko, 128, NULL);
            if (err)
                goto fail;
            t[s * reps + r] = now() - t0;
            if (s >= S_W4)
                qs_w4_close(&w4);
            else
                qs_bcq_close(&b);
        }
    }
    for (int s = 0; s < S_N; s++) {
        qsort(t + s * reps, (size_t)reps, sizeof *t, cmp_d);
        printf("%5zux%-5zu g=%-3zu %-20s %10.3f s%s\n", N, K, g, names[s], t[s * reps + reps / 2],
               s == S_HESS ? " (per batch)" : "");
    }
    free(W), free(X), free(H), free(t);
    return 0;
fail:
    fprintf(stderr, "qbench_gptq: %s\n", qs_errmsg());
    return 1;
}

int main(int argc, char **argv)
{
    int reps = 3;
    size_t M = 1024, shapes[16][2], ns = 0;
    for (int i = 1; i < argc; i++) {
        size_t n, k;
        if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
            M = (size_t)atol(argv[++i]);
        else if (ns < 16 && sscanf(argv[i], "%zux%zu", &n, &k) == 2 && n && k)
            shapes[ns][0] = n, shapes[ns][1] = k, ns++;
        else
            return fprintf(stderr, "usage: qbench_gptq [--reps R] [--tokens M] [NxK ...]\n"), 2;
    }
    if (reps < 1 || M < 1)
        return fprintf(stderr, "qbench_gptq: --reps and --tokens take a count >= 1\n"), 2;
    if (!ns) {
        const size_t def[3][2] = {{1536, 576}, {576, 1536}, {2048, 8192}};
        memcpy(shapes, def, sizeof def), ns = 3;
    }
    printf("qbench_gptq: %d threads, kernel path %s, H from %zu tokens, median of %d\n",
           omp_get_max_threads(), qs_cpu_path(), M, reps);
    for (size_t s = 0; s < ns; s++)
        if (bench(shapes[s][0], shapes[s][1], M, reps))
            return 1;
    return 0;
}
