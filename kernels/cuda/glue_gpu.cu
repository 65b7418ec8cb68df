/* glue_gpu.cu: the small pieces of the device forward pass around the
 * kernels that do the work (qs_kernels.h, "The device forward pass"):
 * copies and waits on a stream, pinned host memory, CUDA graphs, and the
 * bias of a linear layer. */
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

extern "C" int qs_cuda_host_alloc(void **p, size_t bytes)
{
    if (!p)
        return qs_seterr(QS_EINVAL, "qs_cuda_host_alloc got a NULL pointer");
    *p = NULL;
    QS_CU(cudaMallocHost(p, bytes ? bytes : 1));
    return QS_OK;
}

extern "C" void qs_cuda_host_free(void *p)
{
    if (p)
        cudaFreeHost(p);
}

/* Global mode: a call that would break the capture (a synchronous copy,
 * an allocation) fails instead of running outside the graph. */
extern "C" int qs_cuda_graph_begin(void *stream)
{
    QS_CU(cudaStreamBeginCapture(QS_CU_STREAM(stream), cudaStreamCaptureModeGlobal));
    return QS_OK;
}

extern "C" int qs_cuda_graph_end(void *stream, void **exec)
{
    cudaGraph_t g = NULL;
    cudaGraphExec_t x = NULL;
    *exec = NULL;
    QS_CU(cudaStreamEndCapture(QS_CU_STREAM(stream), &g));
    cudaError_t e = cudaGraphInstantiate(&x, g, 0);
    cudaGraphDestroy(g);
    QS_CU(e);
    *exec = x;
    return QS_OK;
}

extern "C" int qs_cuda_graph_launch(void *exec, void *stream)
{
    QS_CU(cudaGraphLaunch((cudaGraphExec_t)exec, QS_CU_STREAM(stream)));
    return QS_OK;
}

extern "C" void qs_cuda_graph_free(void *exec)
{
    if (exec)
        cudaGraphExecDestroy((cudaGraphExec_t)exec);
}

extern "C" double qs_cuda_copy_bandwidth(size_t bytes)
{
    void *a = NULL, *b = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    float t[5];
    double gbs = 0;
    if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess ||
        cudaEventCreate(&e0) != cudaSuccess || cudaEventCreate(&e1) != cudaSuccess) {
        qs_seterr(QS_ENOMEM, "qs_cuda_copy_bandwidth: no room for two %zu-byte buffers", bytes);
        goto out;
    }
    cudaMemset(a, 1, bytes);
    cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice); /* warm-up */
    for (int i = 0; i < 5; i++) {
        cudaEventRecord(e0, 0);
        cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, 0);
        cudaEventRecord(e1, 0);
        cudaEventSynchronize(e1);
        cudaEventElapsedTime(&t[i], e0, e1);
    }
    for (int i = 1; i < 5; i++) /* insertion sort for the median */
        for (int j = i; j > 0 && t[j] < t[j - 1]; j--) {
            float x = t[j];
            t[j] = t[j - 1], t[j - 1] = x;
        }
    if (t[2] > 0)
        gbs = 2.0 * (double)bytes / (t[2] * 1e-3) / 1e9;
out:
    cudaGetLastError();
    if (e0)
        cudaEventDestroy(e0);
    if (e1)
        cudaEventDestroy(e1);
    cudaFree(a), cudaFree(b);
    return gbs;
}

/* Y (n x N fp16) += bias: one thread per column, rows over grid.y. */
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
