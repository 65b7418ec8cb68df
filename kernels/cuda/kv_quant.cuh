/* kv_quant.cuh: the KV cache's int8/int4 format on the device (qs_kernels.h,
 * "KV cache quantization"), shared by rope_kv_gpu.cu (which quantizes each
 * token's rows into the cache) and attention_gpu.cu (which dequantizes them
 * as it reads). The counterpart of kernels/cpu/kvquant.c.
 *
 * Quantizer: one group of up to QS_KV_GROUP values, the CPU's steps one for
 * one (fminf/fmaxf, fp16 rounding to nearest even, __fsub_rn and __fdiv_rn,
 * rintf), so the codes and (scale, minimum) are the CPU's bit for bit on the
 * same fp32 inputs.
 *
 * Reads: a lane's 8 consecutive dimensions d0..d0+7 of one row (d0 a
 * multiple of 8, so never across two groups): fp16 one 16-byte load, int8
 * 8 bytes, int4 4 bytes, with the group's (scale, minimum) as one 4-byte
 * __half2; rh is the row-head index (slot * max_seq + pos) * hkv + head. */
#ifndef QS_KV_QUANT_CUH
#define QS_KV_QUANT_CUH

#include <stdint.h>

#include "cuda_util.cuh"

#define KVQ_F16_MAX 65504.0f

/* x[0..len) -> codes c[0..len), *sm = (scale, minimum). */
__device__ __forceinline__ void kvq_group(const float *x, int len, float qmax, uint8_t *c,
                                          __half2 *sm)
{
    float lo = INFINITY, hi = -INFINITY;
    for (int j = 0; j < len; j++)
        lo = fminf(lo, x[j]), hi = fmaxf(hi, x[j]);
    lo = fminf(fmaxf(lo, -KVQ_F16_MAX), KVQ_F16_MAX);
    const __half mh = __float2half_rn(lo);
    const float m = __half2float(mh);
    float s = __fdiv_rn(__fsub_rn(hi, m), qmax);
    s = s > 0.0f ? fminf(s, KVQ_F16_MAX) : 0.0f;
    const __half sh = __float2half_rn(s);
    s = __half2float(sh);
    for (int j = 0; j < len; j++) {
        const float q = s > 0.0f ? rintf(__fdiv_rn(__fsub_rn(x[j], m), s)) : 0.0f;
        c[j] = (uint8_t)fminf(fmaxf(q, 0.0f), qmax);
    }
    *sm = __halves2half2(sh, mh);
}

/* What one lane holds of a row between its load and its use. */
template <int F> struct kvq_raw;
template <> struct kvq_raw<QS_KV_FP16> {
    uint4 u;
};
template <> struct kvq_raw<QS_KV_INT8> {
    uint2 c;
    __half2 sm;
};
template <> struct kvq_raw<QS_KV_INT4> {
    uint32_t c;
    __half2 sm;
};

template <int F> __device__ __forceinline__ kvq_raw<F> kvq_zero()
{
    kvq_raw<F> r;
    if constexpr (F == QS_KV_FP16)
        r.u = make_uint4(0, 0, 0, 0);
    else if constexpr (F == QS_KV_INT8)
        r.c = make_uint2(0, 0), r.sm = __floats2half2_rn(0.0f, 0.0f);
    else
        r.c = 0, r.sm = __floats2half2_rn(0.0f, 0.0f);
    return r;
}

template <int F>
__device__ __forceinline__ kvq_raw<F> kvq_load(const void *x, const __half2 *sm, size_t rh, int hd,
                                               int ng, int d0)
{
    kvq_raw<F> r;
    if constexpr (F == QS_KV_FP16) {
        r.u = __ldg(reinterpret_cast<const uint4 *>(static_cast<const __half *>(x) + rh * hd + d0));
    } else {
        const uint8_t *c = static_cast<const uint8_t *>(x);
        if constexpr (F == QS_KV_INT8)
            r.c = __ldg(reinterpret_cast<const uint2 *>(c + rh * hd + d0));
        else
            r.c = __ldg(reinterpret_cast<const uint32_t *>(c + rh * (hd / 2) + d0 / 2));
        r.sm = __ldg(sm + rh * ng + d0 / QS_KV_GROUP);
    }
    return r;
}

/* The 8 values as floats: fp16 widened, codes c s + m. */
template <int F> __device__ __forceinline__ void kvq_unpack(const kvq_raw<F> &r, float *f)
{
    if constexpr (F == QS_KV_FP16) {
        union {
            uint4 u;
            __half2 h[4];
        } t;
        t.u = r.u;
        QS_UNROLL
        for (int j = 0; j < 4; j++) {
            const float2 v = __half22float2(t.h[j]);
            f[2 * j] = v.x, f[2 * j + 1] = v.y;
        }
    } else {
        const float s = __low2float(r.sm), m = __high2float(r.sm);
        if constexpr (F == QS_KV_INT8) {
            QS_UNROLL
            for (int e = 0; e < 4; e++) {
                f[e] = fmaf((float)((r.c.x >> (8 * e)) & 0xffu), s, m);
                f[4 + e] = fmaf((float)((r.c.y >> (8 * e)) & 0xffu), s, m);
            }
        } else {
            QS_UNROLL
            for (int e = 0; e < 8; e++)
                f[e] = fmaf((float)((r.c >> (4 * e)) & 0xfu), s, m);
        }
    }
}

#endif
