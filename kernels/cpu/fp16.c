/* fp16.c: IEEE binary16 <-> binary32, bit exact, no F16C needed.
 * The formats keep scales as fp16 bits so that the CUDA code (__half) reads
 * the very same bytes; the hot kernels use F16C, these are the reference. */
#include <string.h>

#include "qs_kernels.h"

static uint32_t f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t qs_fp32_to_fp16(float f)
{
    uint32_t u = f2u(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) /* Inf or NaN (keep NaN quiet and non-zero) */
        return sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u);
    if (a >= 0x477ff000u) /* rounds to >= 65520: overflow to Inf */
        return sign | 0x7c00u;
    if (a < 0x38800000u) {
        /* Subnormal half (or zero): scale by 2^24 exactly via float add,
         * which rounds to nearest even for us. */
        float r = u2f(a) + 0.5f; /* 0.5 = 2^-1: ulp there is 2^-24 */
        return sign | (uint16_t)(f2u(r) - f2u(0.5f));
    }
    /* Normal: rebias exponent, round mantissa 23 -> 10 bits to nearest even. */
    uint32_t mant_odd = (a >> 13) & 1u;
    a += 0xc8000fffu + mant_odd; /* -(127-15)<<23 plus rounding bias */
    return sign | (uint16_t)(a >> 13);
}

float qs_fp16_to_fp32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f)
        return u2f(sign | 0x7f800000u | (m << 13));
    if (e == 0) { /* zero or subnormal: m * 2^-24 is exact in float */
        float r = (float)m * u2f(0x33800000u);
        return u2f(sign | f2u(r));
    }
    return u2f(sign | ((e + 112u) << 23) | (m << 13));
}
