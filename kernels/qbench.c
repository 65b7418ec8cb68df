/* qbench: times the CPU kernels against OpenBLAS fp32 on DRAM-resident weights.
 *
 *   qbench [--quick] [--json] [--threads N] [--path scalar|avx2|avxvnni|avx512]
 *          [--batches 1,16,128] [--blas-as-installed]
 *
 * It first measures this machine's memory read bandwidth (OpenMP sum over a
 * 1 GiB buffer, median of 5), then for each shape, scheme and batch prints
 * the median time over repeats, the effective weight bandwidth, the speed-up
 * over OpenBLAS fp32 (cblas_sgemv at batch 1, cblas_sgemm above) at the same
 * shape, batch and thread count, and the bandwidth floor fraction: (packed
 * weight bytes / measured bandwidth) / time, 1.0 meaning the kernel streams
 * its weights as fast as the machine can read. Each repeat uses the next of
 * several weight copies totalling more than twice the LLC, so the weights
 * come from DRAM, not cache. --batches replaces the batches of both shapes
 * (default 1, 32 and 128; --quick fewer).
 *
 * OpenBLAS 0.3.21 does not know recent Xeons (family 6 model 207) and falls
 * back to its SSE3 "Prescott" kernels, 5x slower at sgemm than its AVX-512
 * ones. A baseline that slow flatters every kernel, so qbench re-executes
 * itself with OPENBLAS_CORETYPE=SkylakeX (AVX-512) or Haswell (AVX2) when
 * it sees that fallback; --blas-as-installed keeps the library's choice.
 * It also sets OPENBLAS_THREAD_TIMEOUT=4 so that OpenBLAS threads sleep
 * right after each call instead of spinning into the next timing. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, nanosleep, setenv, execv */
#include <cblas.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "qs_kernels.h"

#define ROTATE_BYTES (640ull << 20) /* > 2 x this machine's 260 MiB LLC */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Lets the worker threads of the previous call go idle before the next is
 * timed: on 2 cores a spinning thread would steal half the machine. OpenBLAS
 * threads spin up to ~0.1 s by default, hence OPENBLAS_THREAD_TIMEOUT=4
 * (sleep almost at once) set by main; libgomp spins well under 1 ms. */
static void settle(void)
{
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, NULL);
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), cmp_d);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static uint64_t rng = 88172645463325252ull;
static void fill_rand(void *p, size_t bytes)
{
    uint64_t *u = p;
    size_t n = bytes / 8;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        uint64_t z = rng + i * 0x9e3779b97f4a7c15ull;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        u[i] = z ^ (z >> 31);
    }
    for (size_t i = n * 8; i < bytes; i++)
        ((uint8_t *)p)[i] = (uint8_t)i;
    rng += n * 0x9e3779b97f4a7c15ull;
}

static void fill_floats(float *p, size_t n, float sd)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        uint64_t z = (rng + i) * 0x9e3779b97f4a7c15ull;
        z ^= z >> 29;
        p[i] = sd * ((float)(z & 0xffff) / 32768.0f - 1.0f);
    }
    rng += n;
}

/* ---- memory bandwidth ---------------------------------------------------- */

/* Four independent vector sums so that the add latency never limits the
 * read rate (one chain of 8-wide adds tops out near 20 GB/s per core). */
__attribute__((target("avx2"))) static double sum_avx2(const float *p, size_t n)
{
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    for (size_t i = 0; i + 32 <= n; i += 32) {
        /* Prefetch as the kernels do: without it one core keeps too few
         * misses in flight and the "floor" would be a software limit. */
        _mm_prefetch((const char *)(p + i) + 4096, _MM_HINT_T0);
        _mm_prefetch((const char *)(p + i) + 4096 + 64, _MM_HINT_T0);
        a = _mm256_add_ps(a, _mm256_load_ps(p + i));
        b = _mm256_add_ps(b, _mm256_load_ps(p + i + 8));
        c = _mm256_add_ps(c, _mm256_load_ps(p + i + 16));
        d = _mm256_add_ps(d, _mm256_load_ps(p + i + 24));
    }
    float s[8];
    _mm256_storeu_ps(s, _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
    return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}

static double measure_bw(void)
{
    size_t bytes = 1ull << 30, n = bytes / 4;
    float *buf = aligned_alloc(64, bytes);
    if (!buf)
        return 0;
    fill_floats(buf, n, 1);
    double t[5], sink = 0;
    for (int r = 0; r < 5; r++) {
        double t0 = now(), s = 0;
#pragma omp parallel reduction(+ : s)
        {
            int id = omp_get_thread_num(), nt = omp_get_num_threads();
            size_t chunk = n / (size_t)nt / 32 * 32, b = (size_t)id * chunk;
            s += sum_avx2(buf + b, id == nt - 1 ? n - b : chunk);
        }
        t[r] = now() - t0;
        sink += s;
    }
    free(buf);
    if (sink == 12345) /* keep the sums alive */
        puts("");
    return (double)bytes / median(t, 5) / 1e9;
}

/* ---- one benchmark row ---------------------------------------------------- */

typedef struct row {
    size_t N, K, M;
    const char *scheme;
    double ms, wbytes, gbs, speedup, floor;
} row;

typedef struct bench {
    int json, quick, threads;
    double bw;
    row rows[160];
    int nrows;
    size_t batches[8]; /* --batches, nbatches of them (0: the defaults) */
    int nbatches;
} bench;

/* w4a4: Atom's W4A4, 128 INT8 outlier channels, INT4 groups of 128. */
enum { S_FP32, S_BCQ3, S_BCQ4, S_W8A8, S_W8A8G, S_W4A4, S_BCQ3F };
static const char *scheme_name[] = {"fp32-openblas", "bcq3-g128", "bcq4-g128",        "w8a8",
                                    "w8a8-g128",     "w4a4",      "bcq3-g128-f32lut8"};
#define W4_KO    128
#define W4_GROUP 128

/* Weight copies of one scheme: enough to exceed ROTATE_BYTES. */
typedef struct copies {
    int n;
    size_t bytes; /* packed weight bytes of one copy */
    float *f[64];
    qs_bcq b[128];
    qs_w8 w[64];
    qs_w4 w4[64];
} copies;

static int make_copies(copies *c, int scheme, size_t N, size_t K)
{
    memset(c, 0, sizeof(*c));
    size_t ba = 0, bz = 0;
    if (scheme == S_FP32)
        c->bytes = N * K * 4;
    else if (scheme == S_W8A8 || scheme == S_W8A8G)
        c->bytes = qs_w8_bytes(N, K, scheme == S_W8A8G ? 128 : 0);
    else if (scheme == S_W4A4)
        c->bytes = qs_w4_bytes(N, K, W4_KO, W4_GROUP);
    else {
        qs_bcq_sizes(N, K, scheme == S_BCQ4 ? 4 : 3, 128, &c->bytes, &ba, &bz);
        c->bytes += ba + bz;
    }
    c->n = (int)((ROTATE_BYTES + c->bytes - 1) / c->bytes);
    int cap = scheme == S_BCQ3 || scheme == S_BCQ4 ? 128 : 64;
    c->n = c->n < 2 ? 2 : (c->n > cap ? cap : c->n);
    int8_t *codes = NULL;
    float *s4 = NULL, *s8 = NULL;
    if (scheme == S_W4A4) {
        /* Random codes over the full ranges, made once and packed per copy. */
        size_t ng = (K - W4_KO + W4_GROUP - 1) / W4_GROUP;
        codes = malloc(N * K), s4 = malloc(N * ng * 4), s8 = malloc(N * 4);
        if (!codes || !s4 || !s8)
            return free(codes), free(s4), free(s8), QS_ENOMEM;
        fill_rand(codes, N * K);
        for (size_t n = 0; n < N; n++)
            for (size_t k = 0; k < K; k++) {
                uint8_t u = (uint8_t)codes[n * K + k];
                codes[n * K + k] = (int8_t)(k < K - W4_KO ? u % 15 - 7 : u % 255 - 127);
            }
        for (size_t i = 0; i < N * ng; i++)
            s4[i] = 1e-3f;
        for (size_t n = 0; n < N; n++)
            s8[n] = 1e-3f;
    }
    for (int i = 0; i < c->n; i++) {
        if (scheme == S_FP32) {
            if (!(c->f[i] = malloc(N * K * 4)))
                return QS_ENOMEM;
            fill_floats(c->f[i], N * K, 0.02f);
        } else if (scheme == S_W8A8 || scheme == S_W8A8G) {
            /* Timing does not depend on the values: random codes and scales. */
            float tiny = 0;
            if (qs_w8_quantize(&c->w[i], &tiny, 1, 1, 0))
                return QS_ENOMEM;
            qs_w8 *w = &c->w[i];
            free(w->w), free(w->scale), free(w->sum);
            w->N = N, w->K = K, w->Kp = (K + 3) / 4 * 4;
            w->group = qs_w8_group(K, scheme == S_W8A8G ? 128 : 0);
            size_t ng = qs_w8_groups(K, w->group);
            w->w = malloc(N * w->Kp), w->scale = malloc(N * 4), w->sum = malloc(ng * N * 4);
            if (!w->w || !w->scale || !w->sum)
                return QS_ENOMEM;
            fill_rand(w->w, N * w->Kp);
            for (size_t k = 0; k < N * w->Kp; k++)
                if (w->w[k] == -128)
                    w->w[k] = 127;
            for (size_t n = 0; n < N; n++)
                w->scale[n] = 1e-3f;
            qs_w8_sums(w);
        } else if (scheme == S_W4A4) {
            if (qs_w4_from_codes(&c->w4[i], codes, s4, s8, N, K, NULL, W4_KO, W4_GROUP))
                return free(codes), free(s4), free(s8), QS_ENOMEM;
        } else {
            qs_bcq *b = &c->b[i];
            if (qs_bcq_init(b, N, K, scheme == S_BCQ4 ? 4 : 3, 128))
                return QS_ENOMEM;
            fill_rand(b->bits, c->bytes - ba - bz);
            size_t na = ba / 2, nz = bz / 2;
            for (size_t j = 0; j < na; j++)
                b->alpha[j] = qs_fp32_to_fp16(0.01f / (float)(1 + j % 4));
            for (size_t j = 0; j < nz; j++)
                b->z[j] = qs_fp32_to_fp16(0.001f);
        }
    }
    free(codes), free(s4), free(s8);
    return QS_OK;
}

static void free_copies(copies *c, int scheme)
{
    for (int i = 0; i < c->n; i++) {
        if (scheme == S_FP32)
            free(c->f[i]);
        else if (scheme == S_W8A8 || scheme == S_W8A8G)
            qs_w8_close(&c->w[i]);
        else if (scheme == S_W4A4)
            qs_w4_close(&c->w4[i]);
        else
            qs_bcq_close(&c->b[i]);
    }
}

static int run_once(copies *c, int scheme, int i, size_t N, size_t K, size_t M, const float *X,
                    float *Y)
{
    switch (scheme) {
    case S_FP32:
        if (M == 1)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)N, (int)K, 1.0f, c->f[i], (int)K, X, 1,
                        0.0f, Y, 1);
        else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)N, (int)K, 1.0f, X,
                        (int)K, c->f[i], (int)K, 0.0f, Y, (int)N);
        return QS_OK;
    case S_W8A8:
    case S_W8A8G:
        return qs_w8a8_gemm(&c->w[i], X, M, 0, Y);
    case S_W4A4:
        return qs_w4a4_gemm(&c->w4[i], X, M, Y);
    case S_BCQ3F:
        return qs_lutgemm_f32(&c->b[i], X, M, Y);
    default:
        return qs_lutgemm(&c->b[i], X, M, Y);
    }
}

/* Times every scheme of one shape. The schemes are interleaved, one call
 * each per round, so that a burst of load from other processes on this
 * shared machine hits the baseline and the kernels alike and the speed-up
 * stays meaningful; the median over rounds is reported. */
static int bench_shape(bench *B, size_t N, size_t K, const size_t *batches, int nb)
{
    enum { NS = S_BCQ3F + 1, MAXR = 15 };
    size_t Mmax = batches[nb - 1];
    float *X = malloc(Mmax * K * 4), *Y = malloc(Mmax * N * 4);
    copies *c = calloc(NS, sizeof(copies));
    if (!X || !Y || !c)
        return QS_ENOMEM;
    fill_floats(X, Mmax * K, 1);
    for (int s = 0; s < S_BCQ3F; s++) /* S_BCQ3F runs on the bcq3 copies */
        if (make_copies(&c[s], s, N, K)) {
            fprintf(stderr, "qbench: out of memory for %s copies of %zux%zu\n", scheme_name[s], N,
                    K);
            return QS_ENOMEM;
        }
    for (int bi = 0; bi < nb; bi++) {
        size_t M = batches[bi];
        double t[NS][MAXR];
        int idx[NS] = {0}, rounds = 0, maxr = B->quick ? 5 : (M == 1 ? 15 : 7);
        for (int s = 0; s < NS; s++) /* warm-up: page faults, thread start */
            if (!(s == S_BCQ3F && M > 1))
                run_once(&c[s == S_BCQ3F ? S_BCQ3 : s], s, 0, N, K, M, X, Y);
        double start = now();
        while (rounds < maxr && (rounds < 3 || now() - start < 12.0)) {
            for (int s = 0; s < NS; s++) {
                if (s == S_BCQ3F && M > 1) /* token by token: batch 1 says it all */
                    continue;
                copies *cs = &c[s == S_BCQ3F ? S_BCQ3 : s];
                settle();
                /* At batch 1 a call is short enough (0.3 ms at 4096) for the
                 * wake-up of sleeping worker threads to show: one untimed
                 * call on another copy first, as back-to-back layers would. */
                if (M == 1)
                    run_once(cs, s, idx[s]++ % cs->n, N, K, M, X, Y);
                double t0 = now();
                if (run_once(cs, s, idx[s]++ % cs->n, N, K, M, X, Y))
                    return fprintf(stderr, "qbench: %s\n", qs_errmsg()), QS_EINTERNAL;
                t[s][rounds] = now() - t0;
            }
            rounds++;
        }
        double base = median(t[S_FP32], rounds) * 1e3;
        for (int s = 0; s < NS; s++) {
            if (s == S_BCQ3F && M > 1)
                continue;
            row *r = &B->rows[B->nrows++];
            r->N = N, r->K = K, r->M = M, r->scheme = scheme_name[s];
            r->ms = median(t[s], rounds) * 1e3;
            r->wbytes = (double)c[s == S_BCQ3F ? S_BCQ3 : s].bytes;
            r->gbs = r->wbytes / (r->ms * 1e-3) / 1e9;
            r->speedup = base / r->ms;
            r->floor = (r->wbytes / (B->bw * 1e9)) / (r->ms * 1e-3);
            if (!B->json)
                printf("%5zux%-5zu  %-17s %5zu  %10.3f  %8.2f  %8.2fx  %6.2f\n", N, K, r->scheme, M,
                       r->ms, r->gbs, r->speedup, r->floor);
        }
        fflush(stdout);
    }
    for (int s = 0; s < S_BCQ3F; s++)
        free_copies(&c[s], s);
    free(c), free(X), free(Y);
    return QS_OK;
}

int main(int argc, char **argv)
{
    bench B = {0};
    int as_installed = 0;
    for (int i = 1; i < argc; i++)
        as_installed |= !strcmp(argv[i], "--blas-as-installed");
    if (!getenv("QBENCH_REEXEC")) {
        /* Both OpenBLAS settings are read when the library loads: re-exec once. */
        setenv("QBENCH_REEXEC", "1", 1);
        int again = 0;
        if (!getenv("OPENBLAS_THREAD_TIMEOUT"))
            setenv("OPENBLAS_THREAD_TIMEOUT", "4", 1), again = 1;
        if (!as_installed && !getenv("OPENBLAS_CORETYPE") &&
            !strcmp(openblas_get_corename(), "Prescott")) {
            __builtin_cpu_init();
            const char *core = __builtin_cpu_supports("avx512f") ? "SkylakeX"
                               : __builtin_cpu_supports("avx2")  ? "Haswell"
                                                                 : NULL;
            if (core)
                setenv("OPENBLAS_CORETYPE", core, 1), again = 1;
        }
        if (again)
            execv("/proc/self/exe", argv); /* on failure: go on as we are */
    }
    B.threads = omp_get_max_threads();
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json"))
            B.json = 1;
        else if (!strcmp(argv[i], "--blas-as-installed"))
            continue;
        else if (!strcmp(argv[i], "--quick"))
            B.quick = 1;
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            B.threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--path") && i + 1 < argc) {
            if (qs_cpu_force_path(argv[++i]))
                return fprintf(stderr, "qbench: %s\n", qs_errmsg()), 2;
        } else if (!strcmp(argv[i], "--batches") && i + 1 < argc) {
            /* a comma-separated list, increasing */
            for (char *p = argv[++i], *e; *p && B.nbatches < 8; p = *e ? e + 1 : e) {
                long v = strtol(p, &e, 10);
                if (v < 1 || v > 4096 || (*e && *e != ',') ||
                    (B.nbatches && (size_t)v <= B.batches[B.nbatches - 1]))
                    return fprintf(stderr, "qbench: --batches takes up to 8 increasing batch "
                                           "sizes 1..4096, e.g. 1,16,128\n"),
                           2;
                B.batches[B.nbatches++] = (size_t)v;
            }
        } else {
            fprintf(stderr, "usage: qbench [--quick] [--json] [--threads N] "
                            "[--path scalar|avx2|avxvnni|avx512] [--batches 1,16,128] "
                            "[--blas-as-installed]\n");
            return 2;
        }
    }
    if (B.threads < 1)
        B.threads = 1;
    omp_set_num_threads(B.threads);
    openblas_set_num_threads(B.threads);
    B.bw = measure_bw();
    char load0[64] = "?";
    FILE *la = fopen("/proc/loadavg", "r");
    if (la) {
        if (!fgets(load0, sizeof(load0), la))
            load0[0] = 0;
        fclose(la);
        load0[strcspn(load0, "\n")] = 0;
    }
    if (!B.json) {
        printf("qbench: %d threads, kernel path %s, OpenBLAS core %s, thread timeout %s (%s)\n",
               B.threads, qs_cpu_path(), openblas_get_corename(),
               getenv("OPENBLAS_THREAD_TIMEOUT") ? getenv("OPENBLAS_THREAD_TIMEOUT") : "default",
               openblas_get_config());
        printf("memory read bandwidth (1 GiB OpenMP sum, median of 5): %.2f GB/s; load average "
               "at start: %s\n\n",
               B.bw, load0);
        printf("%-11s  %-17s %5s  %10s  %8s  %9s  %6s\n", "shape NxK", "scheme", "batch",
               "median ms", "GB/s", "vs fp32", "floor");
    }
    const size_t all[] = {1, 32, 128}, one[] = {1};
    if (B.nbatches ? bench_shape(&B, 4096, 4096, B.batches, B.nbatches) ||
                         bench_shape(&B, 12288, 12288, B.batches, B.nbatches)
                   : bench_shape(&B, 4096, 4096, all, B.quick ? 2 : 3) ||
                         bench_shape(&B, 12288, 12288, B.quick ? one : all, B.quick ? 1 : 3))
        return 1;
    if (B.json) {
        printf("{\"threads\": %d, \"path\": \"%s\", \"openblas_core\": \"%s\", "
               "\"load_average\": \"%s\", \"bandwidth_gbs\": %.3f, \"rows\": [\n",
               B.threads, qs_cpu_path(), openblas_get_corename(), load0, B.bw);
        for (int i = 0; i < B.nrows; i++) {
            row *r = &B.rows[i];
            printf("  {\"N\": %zu, \"K\": %zu, \"scheme\": \"%s\", \"batch\": %zu, \"median_ms\": "
                   "%.4f, \"weight_bytes\": %.0f, \"gbs\": %.3f, \"speedup_vs_fp32\": %.3f, "
                   "\"floor_fraction\": %.3f}%s\n",
                   r->N, r->K, r->scheme, r->M, r->ms, r->wbytes, r->gbs, r->speedup, r->floor,
                   i + 1 < B.nrows ? "," : "");
        }
        printf("]}\n");
    }
    return 0;
}
