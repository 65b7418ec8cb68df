/* test_kvquant: the KV cache's int8/int4 quantizer (qs_kv_quantize) and its
 * dequantization against a plain float64 rule written here, on fresh random
 * vectors with ragged head sizes (1 to 130, across the 32-value groups) and
 * counts: Gaussian rows, rows with outlier channels (keys after RoPE), rows
 * of one repeated value (scale 0) and of tiny values (subnormal fp16 scales).
 *
 * Per group: the minimum is fp16(min x) exactly; the scale is within one fp16
 * rounding of (max x - m) / qmax (2^-11 relative, 2^-25 absolute where it is
 * subnormal); each code is the reference's clamp(round((x - m) / s)) in
 * double, either neighbour only where the quotient sits within 1e-5 of a half
 * (fp32 and double may round a tie apart). Per value: |x^ - x| <= s/2 plus
 * what the fp16 rounding of s and m clips (the maximum past qmax s, the
 * minimum below m) plus fp32 rounding; qs_kv_dequant equals
 * qs_kv_dequant_f64 to fp32 rounding; int4's unused high nibble (odd hd) is
 * 0. Then the sizes, the RMS error on Gaussian rows and the refusals. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "qs_kernels.h"
#include "testutil.h"

enum { ROWS_GAUSS, ROWS_OUTLIERS, ROWS_CONSTANT, ROWS_TINY };

static void fill(float *x, size_t n, size_t hd, int kind)
{
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < hd; j++) {
            double v = tu_gauss();
            if (kind == ROWS_OUTLIERS && j % 29 == 3)
                v *= 12; /* a few channels an order of magnitude above the rest */
            else if (kind == ROWS_CONSTANT)
                v = 0.75 - (double)i;
            else if (kind == ROWS_TINY)
                v *= 1e-6;
            x[i * hd + j] = (float)v;
        }
}

static unsigned code_at(qs_kv_format f, const uint8_t *c, size_t j)
{
    return f == QS_KV_INT8 ? c[j] : (c[j / 2] >> (4 * (j & 1))) & 15u;
}

static void one(qs_kv_format f, size_t n, size_t hd, int kind)
{
    const unsigned qmax = f == QS_KV_INT8 ? 255 : 15;
    size_t cb = qs_kv_code_bytes(f, hd), ng = qs_kv_groups(hd);
    float *x = malloc(n * hd * 4), *y = malloc(n * hd * 4);
    double *r = malloc(n * hd * 8);
    uint8_t *codes = malloc(n * cb + 1);
    uint16_t *sm = malloc(n * ng * 4 + 1);
    fill(x, n, hd, kind);
    memset(codes, 0xAA, n * cb);
    memset(sm, 0xFF, n * ng * 4); /* NaN: every pair must be written */
    assert_int_equal(qs_kv_quantize(f, x, n, hd, codes, sm), QS_OK);
    assert_int_equal(qs_kv_dequant(f, codes, sm, n, hd, y), QS_OK);
    assert_int_equal(qs_kv_dequant_f64(f, codes, sm, n, hd, r), QS_OK);
    for (size_t i = 0; i < n; i++) {
        const uint8_t *ci = codes + i * cb;
        if (f == QS_KV_INT4 && hd % 2 && (ci[cb - 1] >> 4))
            fail_msg("int4 hd %zu row %zu: the unused high nibble is %u", hd, i, ci[cb - 1] >> 4);
        for (size_t g = 0; g < ng; g++) {
            size_t j0 = g * QS_KV_GROUP, j1 = j0 + QS_KV_GROUP < hd ? j0 + QS_KV_GROUP : hd;
            double lo = INFINITY, hi = -INFINITY;
            for (size_t j = j0; j < j1; j++)
                lo = fmin(lo, x[i * hd + j]), hi = fmax(hi, x[i * hd + j]);
            double s = qs_fp16_to_fp32(sm[(i * ng + g) * 2]),
                   m = qs_fp16_to_fp32(sm[(i * ng + g) * 2 + 1]);
            if (sm[(i * ng + g) * 2 + 1] != qs_fp32_to_fp16((float)lo))
                fail_msg("hd %zu row %zu group %zu: minimum %.9g, want fp16(%.9g)", hd, i, g, m,
                         lo);
            double se = (hi - m) / qmax;
            if (!(fabs(s - fmax(se, 0)) <= 0x1p-11 * fabs(se) + 0x1p-25))
                fail_msg("hd %zu row %zu group %zu: scale %.9g, want %.9g within fp16 rounding", hd,
                         i, g, s, se);
            for (size_t j = j0; j < j1; j++) {
                double t = s > 0 ? ((double)x[i * hd + j] - m) / s : 0;
                double want = fmin(fmax(nearbyint(t), 0), qmax);
                unsigned c = code_at(f, ci, j);
                int tie = fabs(fabs(t - floor(t)) - 0.5) < 1e-5;
                if (c != want && !(tie && fabs(c - t) <= 0.5 + 1e-5))
                    fail_msg("%s hd %zu row %zu value %zu: code %u, the rule gives %.0f "
                             "((x - m) / s = %.9g)",
                             f == QS_KV_INT8 ? "int8" : "int4", hd, i, j, c, want, t);
                double e = fabs(r[i * hd + j] - x[i * hd + j]);
                double bound = s / 2 + fmax(0, hi - m - qmax * s) + fmax(0, m - lo) +
                               0x1p-22 * (fabs(x[i * hd + j]) + fabs(m)) + 1e-37;
                if (!(e <= bound))
                    fail_msg("hd %zu row %zu value %zu: |x^ - x| = %.3g over %.3g (s %.3g)", hd, i,
                             j, e, bound, s);
                double d = fabs((double)y[i * hd + j] - r[i * hd + j]);
                if (!(d <= 0x1p-22 * (c * s + fabs(m)) + 1e-37))
                    fail_msg("hd %zu: qs_kv_dequant %.9g, float64 %.9g", hd, (double)y[i * hd + j],
                             r[i * hd + j]);
            }
        }
    }
    free(x), free(y), free(r), free(codes), free(sm);
}

static void test_kvquant_vs_rule(void **state)
{
    (void)state;
    static const size_t hds[] = {1, 2, 7, 8, 24, 31, 32, 33, 63, 64, 80, 96, 128, 130};
    static const size_t ns[] = {1, 5, 17};
    for (int f = QS_KV_INT8; f <= QS_KV_INT4; f++)
        for (size_t h = 0; h < sizeof hds / sizeof hds[0]; h++)
            for (size_t k = 0; k < sizeof ns / sizeof ns[0]; k++)
                for (int kind = ROWS_GAUSS; kind <= ROWS_TINY; kind++)
                    one((qs_kv_format)f, ns[k], hds[h], kind);
}

/* Sizes, and how the error scales: Gaussian rows' relative RMS error is
 * about 1/(qmax sqrt(12)) of a group's range (some 5-7 sd for 32 values). */
static void test_kvquant_sizes_and_error(void **state)
{
    (void)state;
    assert_int_equal(qs_kv_code_bytes(QS_KV_INT8, 64), 64);
    assert_int_equal(qs_kv_code_bytes(QS_KV_INT4, 64), 32);
    assert_int_equal(qs_kv_code_bytes(QS_KV_INT4, 7), 4);
    assert_int_equal(qs_kv_code_bytes(QS_KV_FP16, 64), 0);
    assert_int_equal(qs_kv_groups(64), 2);
    assert_int_equal(qs_kv_groups(80), 3);
    assert_int_equal(qs_kv_groups(1), 1);
    const size_t n = 200, hd = 64;
    float *x = malloc(n * hd * 4), *y = malloc(n * hd * 4);
    uint8_t *c = malloc(n * hd);
    uint16_t *sm = malloc(n * 2 * 4);
    fill(x, n, hd, ROWS_GAUSS);
    for (int f = QS_KV_INT8; f <= QS_KV_INT4; f++) {
        assert_int_equal(qs_kv_quantize((qs_kv_format)f, x, n, hd, c, sm), QS_OK);
        assert_int_equal(qs_kv_dequant((qs_kv_format)f, c, sm, n, hd, y), QS_OK);
        double num = 0, den = 0;
        for (size_t i = 0; i < n * hd; i++)
            num += (y[i] - x[i]) * (y[i] - x[i]), den += x[i] * x[i];
        double rel = sqrt(num / den), want = f == QS_KV_INT8 ? 6e-3 : 1e-1;
        printf("# %s: relative RMS error %.2e on N(0, 1) rows (bound %.0e)\n",
               f == QS_KV_INT8 ? "int8" : "int4", rel, want);
        assert_true(rel <= want);
    }
    free(x), free(y), free(c), free(sm);
}

static void test_kvquant_refusals(void **state)
{
    (void)state;
    float x[4] = {0};
    uint8_t c[4];
    uint16_t sm[2];
    assert_int_equal(qs_kv_quantize(QS_KV_FP16, x, 1, 4, c, sm), QS_EINVAL);
    assert_int_equal(qs_kv_quantize((qs_kv_format)7, x, 1, 4, c, sm), QS_EINVAL);
    assert_int_equal(qs_kv_quantize(QS_KV_INT8, x, 1, 0, c, sm), QS_EINVAL);
    assert_int_equal(qs_kv_quantize(QS_KV_INT8, NULL, 1, 4, c, sm), QS_EINVAL);
    assert_int_equal(qs_kv_dequant(QS_KV_INT4, c, NULL, 1, 4, x), QS_EINVAL);
    assert_int_equal(qs_kv_quantize(QS_KV_INT8, NULL, 0, 4, NULL, NULL), QS_OK); /* nothing */
}

int main(void)
{
    tu_seed("test_kvquant");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kvquant_vs_rule),
        cmocka_unit_test(test_kvquant_sizes_and_error),
        cmocka_unit_test(test_kvquant_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
