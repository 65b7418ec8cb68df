/* cuda_fp16.h (cuda-emu): __half and __half2 with the toolkit's names.
 * Conversions from float round to nearest even, bit for bit as the
 * hardware's cvt.rn.f16.f32 (NaN becomes 0x7fff as CUDA's does);
 * arithmetic is done in float and rounded once, which is exact for + - *
 * of fp16 operands (their exact results fit in float's 24 bits) and
 * correctly rounded for / and fma but in rare double-rounding cases. */
#ifndef QS_EMU_CUDA_FP16_H
#define QS_EMU_CUDA_FP16_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cuda_runtime.h"

static inline __attribute__((always_inline)) unsigned short qs_emu_f2h_rn(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u)
        return 0x7fffu; /* NaN */
    if (ax >= 0x477ff000u)
        return (unsigned short)(sign | 0x7c00u); /* >= 65520: infinity */
    if (ax <= 0x33000000u)
        return (unsigned short)sign; /* <= 2^-25: zero (2^-25 is a tie, to even) */
    int e = (int)(ax >> 23);
    if (e < 113) { /* a subnormal fp16: multiples of 2^-24 */
        uint32_t m = (ax & 0x7fffffu) | 0x800000u, shift = (uint32_t)(126 - e);
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u)))
            r++;
        return (unsigned short)(sign | r);
    }
    uint32_t r = ((uint32_t)(e - 112) << 10) | ((ax >> 13) & 0x3ffu), rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u)))
        r++; /* a carry moves into the exponent, as it should */
    return (unsigned short)(sign | r);
}

static inline __attribute__((always_inline)) unsigned short qs_emu_f2h_rz(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u)
        return 0x7fffu;
    if (ax == 0x7f800000u)
        return (unsigned short)(sign | 0x7c00u);
    if (ax >= 0x477fe000u)
        return (unsigned short)(sign | 0x7bffu); /* truncates to the largest finite */
    int e = (int)(ax >> 23);
    if (e < 103)
        return (unsigned short)sign;
    if (e < 113)
        return (unsigned short)(sign | (((ax & 0x7fffffu) | 0x800000u) >> (126 - e)));
    return (unsigned short)(sign | ((uint32_t)(e - 112) << 10) | ((ax >> 13) & 0x3ffu));
}

static inline __attribute__((always_inline)) float qs_emu_h2f(unsigned short h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, x;
    if (e == 0x1f) {
        x = sign | 0x7f800000u | (m << 13);
    } else if (e) {
        x = sign | ((e + 112) << 23) | (m << 13);
    } else if (m) { /* subnormal: normalise */
        int s = 0;
        while (!(m & 0x400u))
            m <<= 1, s++;
        x = sign | ((uint32_t)(113 - s) << 23) | ((m & 0x3ffu) << 13);
    } else {
        x = sign;
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}

typedef struct __half_raw {
    unsigned short x;
} __half_raw;
typedef struct __half2_raw {
    unsigned short x, y;
} __half2_raw;

struct __attribute__((aligned(2))) __half {
    unsigned short __x;
    __half() = default;
    constexpr __half(const __half_raw &r) : __x(r.x) {}
    __half(float f) : __x(qs_emu_f2h_rn(f)) {}
    __half(double d) : __x(qs_emu_f2h_rn((float)d)) {}
    __half(int i) : __x(qs_emu_f2h_rn((float)i)) {}
    __half(unsigned i) : __x(qs_emu_f2h_rn((float)i)) {}
    __half(long long i) : __x(qs_emu_f2h_rn((float)i)) {}
    __half(unsigned long long i) : __x(qs_emu_f2h_rn((float)i)) {}
    __half(short i) : __x(qs_emu_f2h_rn((float)i)) {}
    __half(unsigned short i) : __x(qs_emu_f2h_rn((float)i)) {}
    operator float() const
    {
        return qs_emu_h2f(__x);
    }
    operator __half_raw() const
    {
        return __half_raw{__x};
    }
    __half &operator=(float f)
    {
        __x = qs_emu_f2h_rn(f);
        return *this;
    }
    __half &operator=(const __half_raw &r)
    {
        __x = r.x;
        return *this;
    }
};
typedef __half half;

struct __attribute__((aligned(4))) __half2 {
    __half x, y;
    __half2() = default;
    constexpr __half2(const __half &a, const __half &b) : x(a), y(b) {}
    __half2(const __half2_raw &r) : x(__half_raw{r.x}), y(__half_raw{r.y}) {}
    operator __half2_raw() const
    {
        return __half2_raw{x.__x, y.__x};
    }
};
typedef __half2 half2;

static inline __attribute__((always_inline)) __half qs_emu_mkh(unsigned short b)
{
    return __half(__half_raw{b});
}

/* ---- Conversions ---- */
static inline __attribute__((always_inline)) __half __float2half(float f)
{
    return qs_emu_mkh(qs_emu_f2h_rn(f));
}
static inline __attribute__((always_inline)) __half __float2half_rn(float f)
{
    return qs_emu_mkh(qs_emu_f2h_rn(f));
}
static inline __attribute__((always_inline)) __half __float2half_rz(float f)
{
    return qs_emu_mkh(qs_emu_f2h_rz(f));
}
static inline __attribute__((always_inline)) __half __double2half(double d)
{
    return qs_emu_mkh(qs_emu_f2h_rn((float)d));
}
static inline __attribute__((always_inline)) float __half2float(__half h)
{
    return qs_emu_h2f(h.__x);
}
static inline __attribute__((always_inline)) __half2 __floats2half2_rn(float a, float b)
{
    return __half2(__float2half_rn(a), __float2half_rn(b));
}
static inline __attribute__((always_inline)) __half2 __float22half2_rn(float2 f)
{
    return __floats2half2_rn(f.x, f.y);
}
static inline __attribute__((always_inline)) __half2 __float2half2_rn(float f)
{
    return __floats2half2_rn(f, f);
}
static inline __attribute__((always_inline)) float2 __half22float2(__half2 h)
{
    return make_float2(__half2float(h.x), __half2float(h.y));
}
static inline __attribute__((always_inline)) float __low2float(__half2 h)
{
    return __half2float(h.x);
}
static inline __attribute__((always_inline)) float __high2float(__half2 h)
{
    return __half2float(h.y);
}
static inline __attribute__((always_inline)) __half __low2half(__half2 h)
{
    return h.x;
}
static inline __attribute__((always_inline)) __half __high2half(__half2 h)
{
    return h.y;
}
static inline __attribute__((always_inline)) __half2 __halves2half2(__half a, __half b)
{
    return __half2(a, b);
}
static inline __attribute__((always_inline)) __half2 __half2half2(__half a)
{
    return __half2(a, a);
}
static inline __attribute__((always_inline)) __half2 make_half2(__half a, __half b)
{
    return __half2(a, b);
}
static inline __attribute__((always_inline)) __half2 __lows2half2(__half2 a, __half2 b)
{
    return __half2(a.x, b.x);
}
static inline __attribute__((always_inline)) __half2 __highs2half2(__half2 a, __half2 b)
{
    return __half2(a.y, b.y);
}
static inline __attribute__((always_inline)) unsigned short __half_as_ushort(__half h)
{
    return h.__x;
}
static inline __attribute__((always_inline)) short __half_as_short(__half h)
{
    return (short)h.__x;
}
static inline __attribute__((always_inline)) __half __ushort_as_half(unsigned short b)
{
    return qs_emu_mkh(b);
}
static inline __attribute__((always_inline)) __half __short_as_half(short b)
{
    return qs_emu_mkh((unsigned short)b);
}
static inline __attribute__((always_inline)) __half __int2half_rn(int i)
{
    return __float2half_rn((float)i);
}
static inline __attribute__((always_inline)) int __half2int_rn(__half h)
{
    return (int)nearbyintf(__half2float(h));
}
static inline __attribute__((always_inline)) int __half2int_rz(__half h)
{
    return (int)__half2float(h);
}

/* ---- Arithmetic ---- */
static inline __attribute__((always_inline)) __half __hadd(__half a, __half b)
{
    return __float2half_rn(__half2float(a) + __half2float(b));
}
static inline __attribute__((always_inline)) __half __hsub(__half a, __half b)
{
    return __float2half_rn(__half2float(a) - __half2float(b));
}
static inline __attribute__((always_inline)) __half __hmul(__half a, __half b)
{
    return __float2half_rn(__half2float(a) * __half2float(b));
}
static inline __attribute__((always_inline)) __half __hdiv(__half a, __half b)
{
    return __float2half_rn(__half2float(a) / __half2float(b));
}
static inline __attribute__((always_inline)) __half __hfma(__half a, __half b, __half c)
{
    return __float2half_rn(
        (float)fma((double)__half2float(a), (double)__half2float(b), (double)__half2float(c)));
}
static inline __attribute__((always_inline)) __half __hneg(__half a)
{
    return qs_emu_mkh((unsigned short)(a.__x ^ 0x8000u));
}
static inline __attribute__((always_inline)) __half __habs(__half a)
{
    return qs_emu_mkh((unsigned short)(a.__x & 0x7fffu));
}
static inline __attribute__((always_inline)) bool __hisnan(__half a)
{
    return (a.__x & 0x7fffu) > 0x7c00u;
}
static inline __attribute__((always_inline)) bool __hisinf(__half a)
{
    return (a.__x & 0x7fffu) == 0x7c00u;
}
static inline __attribute__((always_inline)) __half __hmax(__half a, __half b)
{
    return __float2half(fmaxf(__half2float(a), __half2float(b)));
}
static inline __attribute__((always_inline)) __half __hmin(__half a, __half b)
{
    return __float2half(fminf(__half2float(a), __half2float(b)));
}
static inline __attribute__((always_inline)) bool __heq(__half a, __half b)
{
    return __half2float(a) == __half2float(b);
}
static inline __attribute__((always_inline)) bool __hne(__half a, __half b)
{
    return __half2float(a) != __half2float(b);
}
static inline __attribute__((always_inline)) bool __hlt(__half a, __half b)
{
    return __half2float(a) < __half2float(b);
}
static inline __attribute__((always_inline)) bool __hle(__half a, __half b)
{
    return __half2float(a) <= __half2float(b);
}
static inline __attribute__((always_inline)) bool __hgt(__half a, __half b)
{
    return __half2float(a) > __half2float(b);
}
static inline __attribute__((always_inline)) bool __hge(__half a, __half b)
{
    return __half2float(a) >= __half2float(b);
}
static inline __attribute__((always_inline)) __half hexp(__half a)
{
    return __float2half(expf(__half2float(a)));
}
static inline __attribute__((always_inline)) __half hlog(__half a)
{
    return __float2half(logf(__half2float(a)));
}
static inline __attribute__((always_inline)) __half hsqrt(__half a)
{
    return __float2half(sqrtf(__half2float(a)));
}
static inline __attribute__((always_inline)) __half hrsqrt(__half a)
{
    return __float2half(1.0f / sqrtf(__half2float(a)));
}
static inline __attribute__((always_inline)) __half2 __hadd2(__half2 a, __half2 b)
{
    return __half2(__hadd(a.x, b.x), __hadd(a.y, b.y));
}
static inline __attribute__((always_inline)) __half2 __hsub2(__half2 a, __half2 b)
{
    return __half2(__hsub(a.x, b.x), __hsub(a.y, b.y));
}
static inline __attribute__((always_inline)) __half2 __hmul2(__half2 a, __half2 b)
{
    return __half2(__hmul(a.x, b.x), __hmul(a.y, b.y));
}
static inline __attribute__((always_inline)) __half2 __h2div(__half2 a, __half2 b)
{
    return __half2(__hdiv(a.x, b.x), __hdiv(a.y, b.y));
}
static inline __attribute__((always_inline)) __half2 __hfma2(__half2 a, __half2 b, __half2 c)
{
    return __half2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y));
}
static inline __attribute__((always_inline)) __half2 __hmax2(__half2 a, __half2 b)
{
    return __half2(__hmax(a.x, b.x), __hmax(a.y, b.y));
}
static inline __attribute__((always_inline)) __half2 __hmin2(__half2 a, __half2 b)
{
    return __half2(__hmin(a.x, b.x), __hmin(a.y, b.y));
}
static inline __attribute__((always_inline)) __half2 __hneg2(__half2 a)
{
    return __half2(__hneg(a.x), __hneg(a.y));
}

static inline __attribute__((always_inline)) __half operator+(__half a, __half b)
{
    return __hadd(a, b);
}
static inline __attribute__((always_inline)) __half operator-(__half a, __half b)
{
    return __hsub(a, b);
}
static inline __attribute__((always_inline)) __half operator*(__half a, __half b)
{
    return __hmul(a, b);
}
static inline __attribute__((always_inline)) __half operator/(__half a, __half b)
{
    return __hdiv(a, b);
}
static inline __attribute__((always_inline)) __half operator-(__half a)
{
    return __hneg(a);
}
static inline __attribute__((always_inline)) __half &operator+=(__half &a, __half b)
{
    return a = __hadd(a, b);
}
static inline __attribute__((always_inline)) __half &operator*=(__half &a, __half b)
{
    return a = __hmul(a, b);
}
static inline __attribute__((always_inline)) bool operator==(__half a, __half b)
{
    return __heq(a, b);
}
static inline __attribute__((always_inline)) bool operator!=(__half a, __half b)
{
    return __hne(a, b);
}
static inline __attribute__((always_inline)) bool operator<(__half a, __half b)
{
    return __hlt(a, b);
}
static inline __attribute__((always_inline)) bool operator>(__half a, __half b)
{
    return __hgt(a, b);
}
static inline __attribute__((always_inline)) bool operator<=(__half a, __half b)
{
    return __hle(a, b);
}
static inline __attribute__((always_inline)) bool operator>=(__half a, __half b)
{
    return __hge(a, b);
}
static inline __attribute__((always_inline)) __half2 operator+(__half2 a, __half2 b)
{
    return __hadd2(a, b);
}
static inline __attribute__((always_inline)) __half2 operator-(__half2 a, __half2 b)
{
    return __hsub2(a, b);
}
static inline __attribute__((always_inline)) __half2 operator*(__half2 a, __half2 b)
{
    return __hmul2(a, b);
}

/* fp16 atomics (RMW in the runtime, seen by the race detector as atomic). */
__half2 atomicAdd(__half2 *p, __half2 v);
__half atomicAdd(__half *p, __half v);

#endif
