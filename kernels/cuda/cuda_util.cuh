/* cuda_util.cuh: private helpers of the kernels/cuda translation units:
 * CUDA calls checked and turned into qs_err codes with the CUDA message. */
#ifndef QS_CUDA_UTIL_CUH
#define QS_CUDA_UTIL_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_compat.cuh"
#include "qs_kernels.h"

static inline int qs_cuda_fail(cudaError_t e, const char *what, const char *file, int line)
{
    int code = QS_EINTERNAL;
    if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver ||
        e == cudaErrorInitializationError || e == cudaErrorInvalidDevice)
        code = QS_ENODEV;
    else if (e == cudaErrorMemoryAllocation)
        code = QS_ENOMEM;
    cudaGetLastError(); /* clear a non-sticky error so the next call starts clean */
    return qs_seterr(code, "%s failed (%s:%d): CUDA error %d (%s)", what, file, line, (int)e,
                     cudaGetErrorString(e));
}

/* Returns from the calling function with a qs_err when a CUDA call fails. */
#define QS_CU(call)                                                                                \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess)                                                                     \
            return qs_cuda_fail(e_, #call, __FILE__, __LINE__);                                    \
    } while (0)

/* After a launch: configuration and launch errors (execution errors show up
 * at the next synchronizing call). */
#define QS_CU_LAUNCH(name) QS_CU(cudaGetLastError())

#define QS_CU_STREAM(s) ((cudaStream_t)(s))

/* splitmix64 of (seed, index): device-side random fills for benchmarks. */
__device__ __forceinline__ unsigned long long qs_hash64(unsigned long long seed,
                                                        unsigned long long i)
{
    unsigned long long z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float qs_hash_unif(unsigned long long seed, unsigned long long i)
{
    return (float)(qs_hash64(seed, i) >> 40) * (1.0f / 16777216.0f); /* [0, 1) */
}

/* Partial sums [splits][M][N] fp32 -> Y fp16 (bcq_gpu.cu). */
int qs_cuda_reduce_splits(const float *ws, void *Y, size_t M, size_t N, unsigned splits,
                          cudaStream_t st);

#endif
