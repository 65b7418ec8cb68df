/* linear_gpu.cu: fp16 linear layers by cuBLAS (qs_cuda_linear_f16), and the
 * calling thread's cuBLAS handle, which baselines.cu's
 * qs_cuda_gemm_f16_cublas shares (it is this call with an fp16 output).
 *
 * Y (M x N) = X (M x K fp16) W^T, W fp16 N x K row-major, cublasGemmEx with
 * CUBLAS_COMPUTE_32F: products and sums in fp32, Y rounded once to fp16, or
 * left fp32 (the logits). One handle per thread, created on the first call
 * (bound to the device current then, re-created if the device changes):
 * creating it allocates, so a thread makes one call before it captures a
 * CUDA graph; later calls only set the stream and enqueue. */
#include <cublas_v2.h>

#include "cuda_util.cuh"

static thread_local cublasHandle_t tl_handle = NULL;
static thread_local int tl_device = -1;

static int cublas_fail(cublasStatus_t s, const char *what)
{
    return qs_seterr(s == CUBLAS_STATUS_NOT_INITIALIZED ? QS_ENODEV : QS_EINTERNAL,
                     "%s failed: cuBLAS status %d (%s)", what, (int)s, cublasGetStatusString(s));
}

/* The thread's handle on the current device, set to stream. */
static int cublas_handle(cublasHandle_t *h, cudaStream_t stream)
{
    int dev = 0;
    QS_CU(cudaGetDevice(&dev));
    if (!tl_handle || tl_device != dev) {
        if (tl_handle)
            cublasDestroy(tl_handle);
        tl_handle = NULL;
        cublasStatus_t s = cublasCreate(&tl_handle);
        if (s != CUBLAS_STATUS_SUCCESS) {
            tl_handle = NULL;
            return cublas_fail(s, "cublasCreate");
        }
        tl_device = dev;
    }
    cublasStatus_t s = cublasSetStream(tl_handle, stream);
    if (s != CUBLAS_STATUS_SUCCESS)
        return cublas_fail(s, "cublasSetStream");
    *h = tl_handle;
    return QS_OK;
}

extern "C" int qs_cuda_linear_f16(const void *W, const void *X, size_t M, size_t N, size_t K,
                                  void *Y, int y_fp32, void *stream)
{
    if (!W || !X || !Y || M < 1 || N < 1 || K < 1 || M > 0x7fffffff || N > 0x7fffffff ||
        K > 0x7fffffff)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_linear_f16: NULL buffer or bad shape M=%zu N=%zu K=%zu", M, N, K);
    cublasHandle_t h = NULL;
    int err = cublas_handle(&h, QS_CU_STREAM(stream));
    if (err)
        return err;
    /* Row-major Y (M x N) = X W^T is column-major Y^T (N x M) = W^T' X^T':
     * W row-major N x K is column-major K x N, transposed; X row-major M x K
     * is column-major K x M, as is. */
    const float one = 1.0f, zero = 0.0f;
    cublasStatus_t s =
        cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)M, (int)K, &one, W, CUDA_R_16F,
                     (int)K, X, CUDA_R_16F, (int)K, &zero, Y, y_fp32 ? CUDA_R_32F : CUDA_R_16F,
                     (int)N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS)
        return cublas_fail(s, "cublasGemmEx");
    return QS_OK;
}
