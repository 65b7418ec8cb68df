/* test_gpu_baselines.c: the baselines LUT-GEMM is timed against.
 *   - qs_cuda_bcq_dequant_f16 against qs_bcq_dequant (each weight within
 *     its fp16 rounding) with the output poisoned;
 *   - cuBLAS fp16 on those weights against qs_lutgemm_ref_f64 (relative L2
 *     <= 2e-3: fp16 weights and output), batches 1, 8, 16, 64, ragged N, K;
 *   - the OPTQ-style 3-bit GEMV against the float64 product of its own
 *     dequantized weights (fp16 scale and zero point, as uploaded), batches
 *     1..8, g = 32, 128, row-wise: relative L2 <= 1e-3.
 * Skips (77) without a GPU. */
#include "gpu_test.h"

static void dequant_case(size_t N, size_t K, unsigned q, size_t g)
{
    qs_bcq w = {0};
    qs_cuda_bcq d = {0};
    void *dW = NULL;
    float *Wf = gt_alloc(N * K * 4);
    uint16_t *Wh = gt_alloc(N * K * 2);
    GT_OK(gt_random_bcq(&w, N, K, q, g));
    GT_OK(qs_bcq_dequant(&w, Wf));
    GT_OK(qs_cuda_bcq_upload(&d, &w));
    GT_OK(qs_cuda_malloc(&dW, N * K * 2));
    GT_OK(qs_cuda_memset(dW, 0xFF, N * K * 2));
    GT_OK(qs_cuda_bcq_dequant_f16(&d, dW, NULL));
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(Wh, dW, N * K * 2));
    size_t bad = 0;
    for (size_t i = 0; i < N * K; i++) {
        float v = qs_fp16_to_fp32(Wh[i]);
        if (!(fabsf(v - Wf[i]) <= fabsf(Wf[i]) * 0x1p-10f + 1e-7f))
            bad++;
    }
    gt_cases++;
    gt_failures += bad != 0;
    printf("%s dequant_f16 N=%zu K=%zu q=%u g=%zu: %zu weights off\n", bad ? "FAIL" : "ok  ", N, K,
           q, g, bad);
out:
    qs_cuda_free(dW);
    qs_cuda_bcq_free(&d);
    qs_bcq_close(&w);
    free(Wf), free(Wh);
}

static void u3_case(size_t N, size_t K, size_t g, size_t M)
{
    qs_rtn r = {0};
    qs_cuda_u3 d = {0};
    void *dX = NULL, *dY = NULL;
    float *W = gt_alloc(N * K * 4), *Xf = gt_alloc(M * K * 4);
    uint16_t *Xh = gt_alloc(M * K * 2), *Yh = gt_alloc(M * N * 2);
    double *R = gt_alloc(M * N * 8), *Wd = gt_alloc(N * K * 8);
    char what[128];
    snprintf(what, sizeof what, "u3 N=%zu K=%zu g=%zu M=%zu", N, K, g, M);
    tu_fill_gauss(W, N * K, 0.02);
    GT_OK(qs_rtn_quantize(&r, W, N, K, 3, g));
    size_t ng = g ? K / g : 1, gs = g ? g : K;
    for (size_t n = 0; n < N; n++)
        for (size_t k = 0; k < K; k++) {
            double s = qs_fp16_to_fp32(qs_fp32_to_fp16(r.scale[n * ng + k / gs]));
            double zp = qs_fp16_to_fp32(qs_fp32_to_fp16(r.zero[n * ng + k / gs]));
            Wd[n * K + k] = s * ((double)r.codes[n * K + k] - zp);
        }
    gt_random_x(M * K, Xh, Xf);
    for (size_t m = 0; m < M; m++)
        for (size_t n = 0; n < N; n++) {
            double a = 0;
            for (size_t k = 0; k < K; k++)
                a += Wd[n * K + k] * Xf[m * K + k];
            R[m * N + n] = a;
        }
    GT_OK(qs_cuda_u3_upload(&d, &r));
    GT_OK(qs_cuda_malloc(&dX, M * K * 2));
    GT_OK(qs_cuda_malloc(&dY, M * N * 2));
    GT_OK(qs_cuda_h2d(dX, Xh, M * K * 2));
    GT_OK(qs_cuda_memset(dY, 0xFF, M * N * 2));
    GT_OK(qs_cuda_u3_gemv(&d, dX, M, dY, NULL));
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(Yh, dY, M * N * 2));
    gt_check(what, Yh, R, M * N, 1e-3);
out:
    qs_cuda_free(dX);
    qs_cuda_free(dY);
    qs_cuda_u3_free(&d);
    qs_rtn_close(&r);
    free(W), free(Xf), free(Xh), free(Yh), free(R), free(Wd);
}

int main(void)
{
    gt_need_gpu();
    tu_seed("test_gpu_baselines");
    dequant_case(37, 96, 3, 32);
    dequant_case(129, 1000, 8, 0);
    dequant_case(300, 384, 1, 128);
    static const size_t Ms[] = {1, 8, 16, 64};
    for (size_t i = 0; i < 4; i++) {
        gt_bcq_case(1000, 4128, 3, 32, Ms[i], GT_CUBLAS, NULL, 2e-3);
        gt_bcq_case(37, 77, 4, 0, Ms[i], GT_CUBLAS, NULL, 2e-3);
        gt_bcq_case(4100, 1024, 2, 128, Ms[i], GT_CUBLAS, NULL, 2e-3);
    }
    for (size_t M = 1; M <= 8; M++) {
        u3_case(1000, 4128, 32, M);
        u3_case(37, 96, 0, M);
        u3_case(4100, 2048, 128, M);
        u3_case(129, 1000, 0, M);
    }
    return gt_summary("test_gpu_baselines");
}
