/* cuda_bf16.h (cuda-emu): __nv_bfloat16 and __nv_bfloat162 with the
 * toolkit's names; float -> bf16 rounds to nearest even (NaN -> 0x7fff). */
#ifndef QS_EMU_CUDA_BF16_H
#define QS_EMU_CUDA_BF16_H

#include <stdint.h>
#include <string.h>

#include "cuda_fp16.h"

static inline __attribute__((always_inline)) unsigned short qs_emu_f2bf_rn(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return 0x7fffu;
    return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
static inline __attribute__((always_inline)) float qs_emu_bf2f(unsigned short b)
{
    uint32_t x = (uint32_t)b << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

typedef struct __nv_bfloat16_raw {
    unsigned short x;
} __nv_bfloat16_raw;

struct __attribute__((aligned(2))) __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    constexpr __nv_bfloat16(const __nv_bfloat16_raw &r) : __x(r.x) {}
    __nv_bfloat16(float f) : __x(qs_emu_f2bf_rn(f)) {}
    __nv_bfloat16(double d) : __x(qs_emu_f2bf_rn((float)d)) {}
    operator float() const
    {
        return qs_emu_bf2f(__x);
    }
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
    __nv_bfloat16 x, y;
    __nv_bfloat162() = default;
    constexpr __nv_bfloat162(const __nv_bfloat16 &a, const __nv_bfloat16 &b) : x(a), y(b) {}
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

static inline __attribute__((always_inline)) __nv_bfloat16 __float2bfloat16(float f)
{
    return __nv_bfloat16(__nv_bfloat16_raw{qs_emu_f2bf_rn(f)});
}
static inline __attribute__((always_inline)) __nv_bfloat16 __float2bfloat16_rn(float f)
{
    return __float2bfloat16(f);
}
static inline __attribute__((always_inline)) float __bfloat162float(__nv_bfloat16 b)
{
    return qs_emu_bf2f(b.__x);
}
static inline __attribute__((always_inline)) __nv_bfloat162 __floats2bfloat162_rn(float a, float b)
{
    return __nv_bfloat162(__float2bfloat16(a), __float2bfloat16(b));
}
static inline __attribute__((always_inline)) float2 __bfloat1622float2(__nv_bfloat162 h)
{
    return make_float2(__bfloat162float(h.x), __bfloat162float(h.y));
}
static inline __attribute__((always_inline)) unsigned short __bfloat16_as_ushort(__nv_bfloat16 b)
{
    return b.__x;
}
static inline __attribute__((always_inline)) __nv_bfloat16 __ushort_as_bfloat16(unsigned short b)
{
    return __nv_bfloat16(__nv_bfloat16_raw{b});
}

#endif
