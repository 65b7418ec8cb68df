/* test_formats.c: fp16 converters, BCQ sizes and word order, and the error
 * paths of every format (bad q, bad g, NULL, size overflow). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "qs_kernels.h"
#include "testutil.h"

static void test_fp16(void **state)
{
    (void)state;
    const float exact[] = {0.0f,
                           -0.0f,
                           1.0f,
                           -2.5f,
                           65504.0f,
                           6.103515625e-05f,
                           5.9604644775390625e-08f /* smallest subnormal */};
    for (size_t i = 0; i < sizeof(exact) / sizeof(exact[0]); i++)
        assert_true(qs_fp16_to_fp32(qs_fp32_to_fp16(exact[i])) == exact[i]);
    assert_int_equal(qs_fp32_to_fp16(1.0f), 0x3c00);
    assert_int_equal(qs_fp32_to_fp16(65520.0f), 0x7c00);           /* rounds to Inf */
    assert_int_equal(qs_fp32_to_fp16(1.0f + 1.0f / 2048), 0x3c00); /* tie to even */
    assert_true(isnan(qs_fp16_to_fp32(qs_fp32_to_fp16(NAN))));
    assert_true(isinf(qs_fp16_to_fp32(qs_fp32_to_fp16(-INFINITY))));
    /* Every half round-trips through float. */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = qs_fp16_to_fp32((uint16_t)h);
        if (!isnan(f))
            assert_int_equal(qs_fp32_to_fp16(f), h);
    }
    /* Relative rounding error of normals is at most 2^-11. */
    for (int i = 0; i < 100000; i++) {
        float f = (float)(tu_gauss() * 100);
        float r = qs_fp16_to_fp32(qs_fp32_to_fp16(f));
        assert_true(fabsf(r - f) <= fabsf(f) * (1.0f / 2048) + 3e-8f);
    }
}

static void test_bcq_sizes_and_order(void **state)
{
    (void)state;
    const size_t shapes[][3] = {
        {37, 224, 32}, {69, 512, 128}, {96, 300, 0}, {64, 96, 0}, {1, 1, 0}};
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
        for (unsigned q = 1; q <= 8; q++) {
            size_t N = shapes[s][0], K = shapes[s][1], g = shapes[s][2];
            size_t bb, ab, zb, ng = g ? K / g : 1, nw = (K + 31) / 32;
            assert_int_equal(qs_bcq_sizes(N, K, q, g, &bb, &ab, &zb), QS_OK);
            assert_int_equal(bb, q * N * nw * 4);
            assert_int_equal(ab, q * N * ng * 2);
            assert_int_equal(zb, N * ng * 2);
            qs_bcq w;
            assert_int_equal(qs_bcq_init(&w, N, K, q, g), QS_OK);
            /* The word order is a bijection onto [0, q N nw). */
            uint8_t *seen = calloc(q * N * nw, 1);
            for (unsigned i = 0; i < q; i++)
                for (size_t n = 0; n < N; n++)
                    for (size_t wi = 0; wi < nw; wi++) {
                        size_t idx = qs_bcq_word_index(&w, i, n, wi);
                        assert_true(idx < q * N * nw);
                        assert_int_equal(seen[idx], 0);
                        seen[idx] = 1;
                    }
            free(seen);
            qs_bcq_close(&w);
            qs_bcq_close(&w); /* closing twice is safe */
        }
}

static void expect_err(int got, int want)
{
    assert_int_equal(got, want);
    assert_true(strlen(qs_errmsg()) > 10);
    qs_clearerr();
}

static void test_invalid(void **state)
{
    (void)state;
    qs_bcq w;
    float W[64 * 96] = {0}, X[96] = {0}, Y[64];
    expect_err(qs_bcq_init(&w, 64, 96, 0, 0), QS_EINVAL);
    expect_err(qs_bcq_init(&w, 64, 96, 9, 0), QS_EINVAL);
    expect_err(qs_bcq_init(&w, 64, 96, 3, 64), QS_EINVAL); /* does not divide K */
    expect_err(qs_bcq_init(&w, 64, 96, 3, 48), QS_EINVAL); /* not a multiple of 32 */
    expect_err(qs_bcq_init(&w, 0, 96, 3, 0), QS_EINVAL);
    expect_err(qs_bcq_init(NULL, 64, 96, 3, 0), QS_EINVAL);
    expect_err(qs_bcq_init(&w, SIZE_MAX / 8, 96, 8, 0), QS_EOVERFLOW);
    expect_err(qs_bcq_sizes(SIZE_MAX / 2, SIZE_MAX / 2, 3, 0, NULL, NULL, NULL), QS_EOVERFLOW);
    expect_err(qs_bcq_from_rtn(&w, W, 64, 96, 9, 32), QS_EINVAL);
    expect_err(qs_bcq_from_rtn(&w, NULL, 64, 96, 3, 32), QS_EINVAL);
    expect_err(qs_bcq_quantize(&w, W, 64, 96, 0, 32, 0), QS_EINVAL);
    W[5] = NAN;
    expect_err(qs_bcq_quantize(&w, W, 64, 96, 3, 32, 0), QS_EINVAL);
    W[5] = 0;
    /* Kernels reject NULLs, an empty batch, a corrupt struct, a batch that overflows. */
    assert_int_equal(qs_bcq_from_rtn(&w, W, 64, 96, 3, 32), QS_OK);
    expect_err(qs_lutgemm(&w, NULL, 1, Y), QS_EINVAL);
    expect_err(qs_lutgemm(&w, X, 0, Y), QS_EINVAL);
    expect_err(qs_lutgemm(NULL, X, 1, Y), QS_EINVAL);
    expect_err(qs_lutgemm(&w, X, SIZE_MAX / 64, Y), QS_EOVERFLOW);
    w.q = 9;
    expect_err(qs_lutgemm(&w, X, 1, Y), QS_EINVAL);
    w.q = 3;
    qs_bcq_close(&w);
    qs_w8 w8;
    expect_err(qs_w8_quantize(&w8, NULL, 4, 4, 0), QS_EINVAL);
    expect_err(qs_w8_quantize(&w8, W, 0, 4, 0), QS_EINVAL);
    expect_err(qs_w8_quantize(&w8, W, SIZE_MAX / 2, 4, 0), QS_EOVERFLOW);
    expect_err(qs_w8_quantize(&w8, W, 64, 96, 6), QS_EINVAL); /* not a multiple of 4 */
    assert_int_equal(qs_w8_quantize(&w8, W, 64, 96, 0), QS_OK);
    expect_err(qs_w8a8_gemm(&w8, X, 1, NAN, Y), QS_EINVAL);
    expect_err(qs_w8a8_gemm(&w8, NULL, 1, 0, Y), QS_EINVAL);
    expect_err(qs_w8a8_gemm(&w8, X, 0, 0, Y), QS_EINVAL);
    w8.group = 5;
    expect_err(qs_w8a8_gemm(&w8, X, 1, 0, Y), QS_EINVAL);
    qs_w8_close(&w8);
    int8_t xq[96];
    expect_err(qs_quant_act_static(X, 1, 96, 0.0f, xq), QS_EINVAL);
    expect_err(qs_cpu_force_path("sse9"), QS_EINVAL);
}

int main(void)
{
    tu_seed("test_formats");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp16),
        cmocka_unit_test(test_bcq_sizes_and_order),
        cmocka_unit_test(test_invalid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
