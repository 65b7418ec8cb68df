/* gpu_test.h: shared pieces of the GPU kernel tests: random BCQ weights,
 * fp16 inputs, device round trips with the output poisoned (all bytes 0xFF,
 * every fp16 a NaN) so that an unwritten element fails, relative L2 errors
 * against the float64 reference. Seeds: testutil.h (QS_TEST_SEED=...). */
#ifndef QS_GPU_TEST_H
#define QS_GPU_TEST_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qs_kernels.h"
#include "testutil.h"

static int gt_failures = 0, gt_cases = 0;

/* Skips (77) with the reason when no GPU answers. */
static inline void gt_need_gpu(void)
{
    if (qs_cuda_device_count() <= 0) {
        printf("SKIP: no GPU: %s\n", qs_errmsg());
        exit(77);
    }
    if (qs_cuda_emulated())
        printf("# on the CPU execution harness (tests/cuda-emu): rows over 320 cut to 257 + "
               "N %% 64, batches from 65 to 128 to 33 + M %% 31; the full shapes run on a GPU\n");
}

/* Rows of a case: as asked on a GPU; under the harness, which runs a
 * thread at a time, long matrices keep their raggedness and more than two
 * CTAs of rows but not their length. */
static inline size_t gt_n(size_t n)
{
    return qs_cuda_emulated() && n > 320 ? 257 + n % 64 : n;
}

/* Batches likewise: ragged and over two tiles of 16, not 100 long. Batches
 * over 128 stay (they test the one-split path that needs no workspace). */
static inline size_t gt_m(size_t m)
{
    return qs_cuda_emulated() && m > 64 && m <= 128 ? 33 + m % 31 : m;
}

#define GT_OK(call)                                                                                \
    do {                                                                                           \
        int e_ = (call);                                                                           \
        if (e_ != QS_OK) {                                                                         \
            printf("FAIL %s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #call, qs_strerror(e_),       \
                   qs_errmsg());                                                                   \
            gt_failures++;                                                                         \
            goto out;                                                                              \
        }                                                                                          \
    } while (0)

static inline void *gt_alloc(size_t bytes)
{
    void *p = calloc(bytes ? bytes : 1, 1);
    if (!p) {
        printf("FAIL: out of host memory (%zu bytes)\n", bytes);
        exit(1);
    }
    return p;
}

/* Random BCQ weights as in tests/kernels/test_lutgemm.c: random bits (0 past
 * K), alpha ~ 0.02 (0.5 + U) / 2^(q-1-i), z ~ N(0, 0.01). */
static inline int gt_random_bcq(qs_bcq *w, size_t N, size_t K, unsigned q, size_t g)
{
    int err = qs_bcq_init(w, N, K, q, g);
    if (err)
        return err;
    size_t nw = (K + 31) / 32, ng = g ? K / g : 1;
    for (unsigned i = 0; i < q; i++)
        for (size_t n = 0; n < N; n++)
            for (size_t wi = 0; wi < nw; wi++) {
                uint32_t v = (uint32_t)tu_u64();
                if (wi == nw - 1 && K % 32)
                    v &= (1u << (K % 32)) - 1;
                w->bits[qs_bcq_word_index(w, i, n, wi)] = v;
            }
    for (size_t gi = 0; gi < ng; gi++)
        for (size_t n = 0; n < N; n++) {
            for (unsigned i = 0; i < q; i++)
                w->alpha[qs_bcq_alpha_index(w, i, n, gi)] =
                    qs_fp32_to_fp16((float)(0.02 * (0.5 + tu_unif()) / (1u << (q - 1 - i))));
            w->z[qs_bcq_z_index(w, n, gi)] = qs_fp32_to_fp16((float)(0.01 * tu_gauss()));
        }
    return QS_OK;
}

/* M x K inputs ~ N(0, 1) rounded to fp16: Xh the bits, Xf the same values. */
static inline void gt_random_x(size_t n, uint16_t *Xh, float *Xf)
{
    for (size_t i = 0; i < n; i++) {
        Xh[i] = qs_fp32_to_fp16((float)tu_gauss());
        Xf[i] = qs_fp16_to_fp32(Xh[i]);
    }
}

/* Compares fp16 device output (copied to Yh) with the reference; prints one
 * line; counts a failure on any non-finite element or rel > bound. */
static inline void gt_check(const char *what, const uint16_t *Yh, const double *R, size_t n,
                            double bound)
{
    size_t bad = 0;
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        float y = qs_fp16_to_fp32(Yh[i]);
        if (!isfinite(y)) {
            bad++;
            continue;
        }
        num += (y - R[i]) * (y - R[i]);
        den += R[i] * R[i];
    }
    double rel = sqrt(num / (den > 0 ? den : 1));
    int ok = bad == 0 && rel <= bound;
    gt_cases++;
    if (!ok)
        gt_failures++;
    printf("%s %-48s rel_l2 %.3e (bound %.0e)%s\n", ok ? "ok  " : "FAIL", what, rel, bound,
           bad ? " NON-FINITE/UNWRITTEN OUTPUTS" : "");
    if (bad)
        printf("     %zu of %zu outputs are NaN/Inf (poisoned and never written?)\n", bad, n);
}

static inline int gt_summary(const char *name)
{
    printf("# %s: %d cases, %d failures\n", name, gt_cases, gt_failures);
    return gt_failures ? 1 : 0;
}

#endif

/* ---- One BCQ kernel run against qs_lutgemm_ref_f64 ------------------------
 * cfg: the LUT configuration, or for the tensor-core runs cfg->splits the
 * K-splits (NULL: the choosers'). */
enum { GT_LUT, GT_MMA16, GT_MMA64, GT_MATMUL, GT_CUBLAS };
static const char *gt_run_name[] = {"lut", "mma16", "mma64", "matmul", "cublas"};
/* Halves by which X starts past a 16-byte boundary (exercises the scalar
 * input path of kernels that use 16-byte loads when they can). */
static size_t gt_x_off = 0;

static inline void gt_bcq_case(size_t N, size_t K, unsigned q, size_t g, size_t M, int run,
                               const qs_cuda_lut_cfg *cfg, double bound)
{
    N = gt_n(N), M = gt_m(M);
    qs_bcq w = {0};
    qs_cuda_bcq d = {0};
    void *dX = NULL, *dY = NULL, *dW = NULL;
    uint16_t *Xh = gt_alloc(M * K * 2), *Yh = gt_alloc(M * N * 2);
    float *Xf = gt_alloc(M * K * 4);
    double *R = gt_alloc(M * N * 8);
    char what[160];
    snprintf(what, sizeof what, "%s N=%zu K=%zu q=%u g=%zu M=%zu", gt_run_name[run], N, K, q, g, M);
    if (cfg)
        snprintf(what + strlen(what), sizeof what - strlen(what), " th=%u sp=%u", cfg->threads,
                 cfg->splits);
    GT_OK(gt_random_bcq(&w, N, K, q, g));
    gt_random_x(M * K, Xh, Xf);
    GT_OK(qs_lutgemm_ref_f64(&w, Xf, M, R));
    GT_OK(qs_cuda_bcq_upload(&d, &w));
    if (gt_x_off)
        snprintf(what + strlen(what), sizeof what - strlen(what), " xoff=%zu", gt_x_off);
    GT_OK(qs_cuda_malloc(&dX, M * K * 2 + 16));
    GT_OK(qs_cuda_malloc(&dY, M * N * 2));
    void *dXo = (char *)dX + 2 * gt_x_off;
    GT_OK(qs_cuda_h2d(dXo, Xh, M * K * 2));
    GT_OK(qs_cuda_memset(dY, 0xFF, M * N * 2));
    switch (run) {
    case GT_LUT:
        GT_OK(qs_cuda_lutgemm(&d, dXo, M, dY, NULL, cfg));
        break;
    case GT_MMA16:
    case GT_MMA64:
        GT_OK(qs_cuda_bcq_gemm_mma(&d, dXo, M, dY, NULL, run == GT_MMA16 ? 16 : 64,
                                   cfg ? cfg->splits : 0));
        break;
    case GT_MATMUL:
        GT_OK(qs_cuda_bcq_matmul(&d, dXo, M, dY, NULL));
        break;
    default:
        GT_OK(qs_cuda_malloc(&dW, N * K * 2));
        GT_OK(qs_cuda_memset(dW, 0xFF, N * K * 2));
        GT_OK(qs_cuda_bcq_dequant_f16(&d, dW, NULL));
        GT_OK(qs_cuda_gemm_f16_cublas(dW, dXo, M, N, K, dY, NULL));
        break;
    }
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(Yh, dY, M * N * 2));
    gt_check(what, Yh, R, M * N, bound);
out:
    qs_cuda_free(dX);
    qs_cuda_free(dY);
    qs_cuda_free(dW);
    qs_cuda_bcq_free(&d);
    qs_bcq_close(&w);
    free(Xh), free(Yh), free(Xf), free(R);
}

/* Shapes: ragged N (37, 1000, 4100), ragged K (96, 4128; 77 and 1000 row-wise,
 * which need not be multiples of 32), each g the K allows. */
typedef struct gt_shape {
    size_t N, K, g;
} gt_shape;
static const gt_shape gt_shapes[] = {
    {37, 96, 32},      {37, 96, 0},      {1000, 4128, 32}, {1000, 4128, 0},
    {300, 384, 64},    {300, 384, 128},  {129, 1000, 0},   {77, 77, 0},
    {4100, 1024, 128}, {1000, 4096, 64}, {513, 2048, 128}, {64, 12288, 128},
};
#define GT_NSHAPES (sizeof gt_shapes / sizeof gt_shapes[0])
