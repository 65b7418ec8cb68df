/* glue_gpu.cu: the small pieces of the device forward pass around the
 * kernels that do the work (qs_kernels.h, "The device forward pass"):
 * copies and waits on a stream, and the bias of a linear layer. */
#include "cuda_util.cuh"

extern "C" int qs_cuda_h2d_async(void *dst, const void *src, size_t bytes, void *stream)
{
    QS_CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, QS_CU_STREAM(stream)));
    return QS_OK;
}

extern "C" int qs_cuda_d2h_async(void *dst, const void *src, size_t bytes, void *stream)
{
    QS_CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, QS_CU_STREAM(stream)));
    return QS_OK;
}

extern "C" int qs_cuda_stream_sync(void *stream)
{
    QS_CU(cudaStreamSynchronize(QS_CU_STREAM(stream)));
    return QS_OK;
}

/* Y (n x N fp16) += bias: one thread per two columns, rows over grid.y. */
__global__ void add_bias_kernel(__half *__restrict__ Y, const __half *__restrict__ bias, int n,
                                int N)
{
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= N)
        return;
    float b = __half2float(bias[j]);
    for (int i = blockIdx.y; i < n; i += gridDim.y)
        Y[(size_t)i * N + j] = __float2half_rn(__half2float(Y[(size_t)i * N + j]) + b);
}

extern "C" int qs_cuda_add_bias(void *Y, const void *bias, size_t n, size_t N, void *stream)
{
    if (!Y || !bias || n > 0x7fffffff || N > 0x7fffffff)
        return qs_seterr(QS_EINVAL, "qs_cuda_add_bias: NULL output or bias, or shape too large");
    if (!n || !N)
        return QS_OK;
    dim3 grid((unsigned)((N + 255) / 256), (unsigned)(n < 1024 ? n : 1024));
    QS_LAUNCH(grid, 256, 0, stream, add_bias_kernel)
    ((__half *)Y, (const __half *)bias, (int)n, (int)N);
    QS_CU_LAUNCH("add_bias_kernel");
    return QS_OK;
}
