/* rowops.cuh: pieces shared by the forward-pass kernels (norm_gpu.cu,
 * act_gpu.cu, rope_kv_gpu.cu, embed_gpu.cu, logits_gpu.cu, sample_gpu.cu):
 * 16-byte loads and stores of 8 fp16 or 4 fp32 values, the alignment test
 * that picks them, and block-wide sums.
 *
 * 16-byte accesses go through unions (never a __half pointer into a uint4:
 * that is undefined in C++ and g++ miscompiles it under the harness). */
#ifndef QS_ROWOPS_CUH
#define QS_ROWOPS_CUH

#include <stdint.h>

#include "cuda_util.cuh"

/* Host side: p is 16-byte aligned (NULL counts as aligned: it is not read). */
static inline bool qs_al16(const void *p)
{
    return ((uintptr_t)p & 15u) == 0;
}

union qs_h8 {
    uint4 u;
    __half h[8];
};

/* f[0..7] = p[0..7]; p 16-byte aligned. */
__device__ __forceinline__ void qs_ld_h8(const __half *p, float *f)
{
    qs_h8 r;
    r.u = *reinterpret_cast<const uint4 *>(p);
    QS_UNROLL
    for (int j = 0; j < 8; j++)
        f[j] = __half2float(r.h[j]);
}

/* p[0..7] = f[0..7] rounded to nearest even; p 16-byte aligned. */
__device__ __forceinline__ void qs_st_h8(__half *p, const float *f)
{
    qs_h8 r;
    QS_UNROLL
    for (int j = 0; j < 8; j++)
        r.h[j] = __float2half_rn(f[j]);
    *reinterpret_cast<uint4 *>(p) = r.u;
}

/* f[0..3] = p[0..3] and back; p 16-byte aligned. */
__device__ __forceinline__ void qs_ld_f4(const float *p, float *f)
{
    float4 v = *reinterpret_cast<const float4 *>(p);
    f[0] = v.x, f[1] = v.y, f[2] = v.z, f[3] = v.w;
}

__device__ __forceinline__ void qs_st_f4(float *p, const float *f)
{
    *reinterpret_cast<float4 *>(p) = make_float4(f[0], f[1], f[2], f[3]);
}

/* Sum over the block (blockDim.x a multiple of 32, at most 1024) in a fixed
 * order (xor butterfly in each warp, then the warps in order), so that every
 * thread gets the same value and every run the same bits. red: 32 slots of
 * shared memory; the call starts with a barrier, so that consecutive calls
 * may share red. */
template <class T> __device__ __forceinline__ T qs_block_sum(T v, T *red)
{
    QS_UNROLL
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0)
        red[threadIdx.x >> 5] = v;
    __syncthreads();
    T s = red[0];
    for (unsigned w = 1; w < blockDim.x / 32; w++)
        s += red[w];
    return s;
}

#endif
