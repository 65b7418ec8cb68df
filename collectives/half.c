/* IEEE binary16 conversions for the host fp16 sum (reduced in fp32). Written
 * out in integer arithmetic because C11 has no portable half type. */
#include "coll_internal.h"

#include <string.h>

float qs_coll_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;
    uint32_t bits;

    if (e == 0x1f) {
        bits = sign | 0x7f800000u | (m << 13); /* Inf, or NaN with its payload */
    } else if (e != 0) {
        bits = sign | ((e + 112) << 23) | (m << 13); /* rebias 15 -> 127 */
    } else if (m == 0) {
        bits = sign;
    } else {
        /* Subnormal half: normalize the mantissa, every one is a float normal. */
        int32_t ex = 1;
        while (!(m & 0x400u)) {
            m <<= 1;
            ex--;
        }
        bits = sign | ((uint32_t)(ex + 112) << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

uint16_t qs_coll_f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;

    if (ax > 0x7f800000u) /* NaN: keep it quiet and keep the top payload bits */
        return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    if (ax >= 0x47800000u) /* >= 65536 (and Inf): Inf */
        return (uint16_t)(sign | 0x7c00u);

    uint32_t exp = ax >> 23;
    uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
    uint32_t h, shift;
    if (exp >= 113) {
        /* Normal half: drop 13 mantissa bits; a carry may round up into the
         * exponent, and from 65520 up into Inf, both as IEEE wants. */
        h = ((exp - 112) << 10) | ((ax >> 13) & 0x3ffu);
        shift = 13;
    } else {
        /* Subnormal half (units of 2^-24), or zero. */
        if (exp < 102) /* below 2^-25: rounds to zero */
            return sign;
        shift = 126 - exp; /* 14..24 */
        h = mant >> shift;
    }
    uint32_t rem = mant & ((1u << shift) - 1);
    uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1u)))
        h++;
    return (uint16_t)(sign | h);
}
