/* Deterministic inputs and serial references shared by the collectives
 * tests: every rank can compute every other rank's input, so each rank checks
 * its collective result against a sum or gather it computes alone. */
#ifndef QS_COLL_TEST_UTIL_H
#define QS_COLL_TEST_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "coll_internal.h" /* qs_coll_f16_to_f32, qs_coll_f32_to_f16 */

/* Multiples of 1/64 below 8 in magnitude: every partial sum over a few ranks
 * is exact in fp32, so any reduction order gives the same bits. */
static inline float in_f32(int rank, size_t i)
{
    return (float)((long)((i * 31 + (size_t)rank * 17 + 5) % 1001) - 500) / 64.0f;
}

/* Multiples of 1/1024 in [-2, 2]: exact in fp16, their sums exact in fp32
 * but not in fp16, so the result checks that the sum is rounded once. */
static inline uint16_t in_f16(int rank, size_t i)
{
    return qs_coll_f32_to_f16((float)((long)((i * 13 + (size_t)rank * 7) % 4097) - 2048) / 1024.0f);
}

static inline int32_t in_i32(int rank, size_t i)
{
    return (int32_t)((i * 7 + (size_t)rank * 1000003) % 100000) - 50000;
}

static inline uint8_t in_u8(int rank, size_t i)
{
    return (uint8_t)(i * 5 + (size_t)rank * 37 + 1);
}

/* Fills buf with rank's input of dtype. */
static inline void fill(qs_coll_dtype dt, int rank, void *buf, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        switch (dt) {
        case QS_COLL_F32:
            ((float *)buf)[i] = in_f32(rank, i);
            break;
        case QS_COLL_F16:
            ((uint16_t *)buf)[i] = in_f16(rank, i);
            break;
        case QS_COLL_I32:
            ((int32_t *)buf)[i] = in_i32(rank, i);
            break;
        case QS_COLL_U8:
            ((uint8_t *)buf)[i] = in_u8(rank, i);
            break;
        }
    }
}

/* The serial all-reduce: summed in rank order; fp16 summed in fp32 and
 * rounded once, as the host back end promises. */
static inline void ref_sum(qs_coll_dtype dt, int nranks, void *buf, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float f = 0;
        int32_t k = 0;
        for (int r = 0; r < nranks; r++) {
            if (dt == QS_COLL_F32)
                f += in_f32(r, i);
            else if (dt == QS_COLL_F16)
                f += qs_coll_f16_to_f32(in_f16(r, i));
            else
                k += in_i32(r, i);
        }
        if (dt == QS_COLL_F32)
            ((float *)buf)[i] = f;
        else if (dt == QS_COLL_F16)
            ((uint16_t *)buf)[i] = qs_coll_f32_to_f16(f);
        else
            ((int32_t *)buf)[i] = k;
    }
}

/* The serial all-gather: rank r's input at r * n elements. */
static inline void ref_gather(qs_coll_dtype dt, int nranks, void *buf, size_t n)
{
    size_t es = qs_coll_dtype_size(dt);
    for (int r = 0; r < nranks; r++)
        fill(dt, r, (char *)buf + (size_t)r * n * es, n);
}

/* Index of the first element that differs bitwise, or -1. */
static inline long first_diff(qs_coll_dtype dt, const void *a, const void *b, size_t n)
{
    size_t es = qs_coll_dtype_size(dt);
    if (memcmp(a, b, n * es) == 0)
        return -1;
    for (size_t i = 0; i < n; i++)
        if (memcmp((const char *)a + i * es, (const char *)b + i * es, es) != 0)
            return (long)i;
    return -1;
}

static inline const char *dt_name(qs_coll_dtype dt)
{
    switch (dt) {
    case QS_COLL_F32:
        return "f32";
    case QS_COLL_F16:
        return "f16";
    case QS_COLL_I32:
        return "i32";
    case QS_COLL_U8:
        return "u8";
    }
    return "?";
}

#endif /* QS_COLL_TEST_UTIL_H */
