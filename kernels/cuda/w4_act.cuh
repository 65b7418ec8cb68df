/* w4_act.cuh: the W4A4 (Atom) activation codes on the device, shared by the
 * GEMM's own quantization (w4a4_gpu.cu) and the norm that quantizes its
 * output in the same pass (norm_gpu.cu's qs_cuda_add_norm_w4), so that both
 * give qs_w4_quant_act's codes and scales bit for bit (kernels/cpu/w4a4.c):
 * a token's channels read through the permutation (position j = channel
 * perm[j]); per group of positions before K4, scale = max|x| / 7 and codes
 * nearbyintf(x * 7 / max) clamped to +-7, each in one fp32 rounding; the
 * outliers after K4 likewise with 127 (W8A8's scale, w8_act.cuh) and one
 * scale per token; a product that is NaN (0 x an overflowed 1/scale) codes
 * 0; a NaN or Inf anywhere in the token makes all of its codes 0 and all of
 * its scales NaN (sxo too).
 *
 * Written in the layout of qs_cuda_w4 (qs_kernels.h): nibbles in position
 * order within groups padded to gp positions, the outliers from byte off8,
 * zeros to kd; sx [ng + 1] per token, sxo last (0 when ko = 0). */
#ifndef QS_W4_ACT_CUH
#define QS_W4_ACT_CUH

#include "w8_act.cuh"

struct w4_act_args {
    uint8_t *xq; /* [rows][kd] */
    float *sx;   /* [rows][ng + 1] */
    const uint32_t *perm;
    int K4, ko, G, gp, ng, off8, kd;
};

/* One code of -qmax..qmax, as an int (NaN and Inf code 0: the caller
 * flags them). Clamped in float first, so the conversion is exact. */
__device__ __forceinline__ int w4_code_q(float x, float inv, float qmax)
{
    float c = rintf(__fmul_rn(x, inv));
    if (!isfinite(x) || isnan(c))
        c = 0.0f;
    return (int)fminf(fmaxf(c, -qmax), qmax);
}

/* An INT4 code, two's complement in the low nibble. */
__device__ __forceinline__ uint32_t w4_code(float x, float inv)
{
    return (uint32_t)w4_code_q(x, inv, 7.0f) & 15u;
}

__device__ __forceinline__ void w4_scale(float mx, float &s, float &inv)
{
    s = __fdiv_rn(mx, 7.0f);
    inv = mx > 0.0f ? __fdiv_rn(7.0f, mx) : 0.0f;
}

/* x[perm[p + e]] for e = 0..7 as fp32 (zeros from len on); p is a multiple
 * of 8, so perm + p is 32-byte aligned for two 16-byte loads. */
__device__ __forceinline__ void w4_gather8(const __half *x, const uint32_t *perm, int p, int len,
                                           float v[8])
{
    if (p + 8 <= len) {
        const uint4 a = *reinterpret_cast<const uint4 *>(perm + p);
        const uint4 b = *reinterpret_cast<const uint4 *>(perm + p + 4);
        const uint32_t c[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int e = 0; e < 8; e++)
            v[e] = __half2float(x[c[e]]);
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++)
            v[e] = p + e < len ? __half2float(x[perm[p + e]]) : 0.0f;
    }
}

/* Token m's codes and scales from its row x (fp16, original order; global
 * or shared memory), by the whole block (a barrier inside: every thread
 * calls it). A warp per group of positions, round robin; the outliers are
 * one more group, and every thread zeroes the row's tail. */
__device__ __forceinline__ void w4_quant_row(const __half *x, const w4_act_args &a, int m)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    uint8_t *q = a.xq + (size_t)m * a.kd;
    float *sx = a.sx + (size_t)m * (a.ng + 1);
    bool bad = false;
    for (int g = warp; g <= a.ng; g += nw) {
        if (g < a.ng) {
            const int j0 = g * a.G, len = min(a.G, a.K4 - j0);
            const uint32_t *pg = a.perm + j0;
            float mx = 0.0f;
            for (int p = lane * 8; p < len; p += 256) {
                float v[8];
                w4_gather8(x, pg, p, len, v);
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    bad |= !isfinite(v[e]);
                    mx = fmaxf(mx, fabsf(v[e])); /* fmaxf skips NaN, as the CPU's */
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1)
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            float s, inv;
            w4_scale(mx, s, inv);
            for (int p = lane * 8; p < a.gp; p += 256) {
                uint32_t word = 0;
                if (p < len) {
                    float v[8];
                    w4_gather8(x, pg, p, len, v);
#pragma unroll
                    for (int e = 0; e < 8; e++)
                        if (p + e < len)
                            word |= w4_code(v[e], inv) << (4 * e);
                }
                *reinterpret_cast<uint32_t *>(q + g * (a.gp / 2) + p / 2) = word;
            }
            if (lane == 0)
                sx[g] = s;
        } else { /* the outliers: int8, one scale per token */
            const uint32_t *po = a.perm + a.K4;
            float mx = 0.0f;
            for (int i = lane; i < a.ko; i += 32) {
                const float v = __half2float(x[po[i]]);
                bad |= !isfinite(v);
                mx = fmaxf(mx, fabsf(v));
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1)
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            float s, inv;
            w8_scale(mx, s, inv);
            const int kd8 = (a.ko + 31) / 32 * 32;
            for (int i = lane * 4; i < kd8; i += 128) {
                uint32_t word = 0;
#pragma unroll
                for (int e = 0; e < 4; e++)
                    if (i + e < a.ko)
                        word |=
                            ((uint32_t)w4_code_q(__half2float(x[po[i + e]]), inv, 127.0f) & 255u)
                            << (8 * e);
                *reinterpret_cast<uint32_t *>(q + a.off8 + i) = word;
            }
            if (lane == 0)
                sx[a.ng] = a.ko ? s : 0.0f;
        }
    }
    for (int i = a.off8 + (a.ko + 31) / 32 * 32 + 4 * (int)threadIdx.x; i < a.kd;
         i += 4 * blockDim.x)
        *reinterpret_cast<uint32_t *>(q + i) = 0u;
    /* A NaN or Inf anywhere in the token: every code 0 and every scale NaN
     * (after the barrier, which orders these writes after the first ones). */
    if (__syncthreads_or(bad)) {
        for (int i = 4 * (int)threadIdx.x; i < a.kd; i += 4 * blockDim.x)
            *reinterpret_cast<uint32_t *>(q + i) = 0u;
        for (int g = threadIdx.x; g <= a.ng; g += blockDim.x)
            sx[g] = QS_W8_NAN_SCALE;
    }
}

#endif
