/* cuda_compat.cuh: the three places where CUDA C++ is not C++, written so
 * that the same .cu source compiles with nvcc for the GPU and with g++ for
 * the CPU execution harness (tests/cuda-emu, which defines QS_CUDA_EMU and
 * supplies its own versions of these macros in qs_emu.h):
 *
 *   QS_LAUNCH(grid, block, smem, stream, kernel)(args...)
 *       kernel<<<grid, block, smem, stream>>>(args...)
 *   QS_DYN_SMEM(T, name);             extern __shared__ T name[];
 *   QS_SHARED(T, name, [dims]);       __shared__ T name[dims];
 *   QS_SHARED_ALIGNED(a, T, name, [dims]);   __shared__ __align__(a) T name[dims];
 *
 * The kernel comes last in QS_LAUNCH so that template arguments with
 * commas need no parentheses. */
#ifndef QS_CUDA_COMPAT_CUH
#define QS_CUDA_COMPAT_CUH

#ifndef QS_CUDA_EMU
#define QS_LAUNCH(grid, block, smem, stream, ...)                                                  \
    __VA_ARGS__<<<grid, block, smem, (cudaStream_t)(stream)>>>
#define QS_DYN_SMEM(T, name)     extern __shared__ T name[]
#define QS_SHARED(T, name, dims) __shared__ T name dims
#define QS_SHARED_ALIGNED(a, T, name, dims)                                                        \
    __shared__ __align__(a)                                                                        \
    T name dims
#endif

/* #pragma unroll where nvcc reads it (g++ would warn about it). */
#if defined(__CUDA_ARCH__) && !defined(QS_CUDA_EMU)
#define QS_UNROLL _Pragma("unroll")
#else
#define QS_UNROLL
#endif

#endif
