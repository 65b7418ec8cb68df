/* test_w8a8.c: W8A8 GEMM on every CPU path against the float64 reference
 * (same activation codes, exact integer sums): relative L2 under 1e-6 and
 * every output within 1e-5 of its magnitude, plus the fp32 rounding of
 * adding one partial sum per group (ng * 2^-22 of sum_k |w x|); against the fp32 product of the
 * original weights and activations under 3% (the int8 quantization itself).
 * Dynamic scales per token and per channel group (groups that do and do not
 * divide K), static scales, int16 saturation worst case, NaN/Inf; and
 * groups beating one scale per token when one channel is an outlier. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "qs_kernels.h"
#include "testutil.h"

static const char *paths[] = {"scalar", "avx2", "avxvnni"};

static void check(size_t N, size_t K, size_t M, int stat, size_t group, const char *path)
{
    float *W = malloc(N * K * 4), *X = malloc(M * K * 4), *Y = malloc(M * N * 4);
    double *R = malloc(M * N * 8), *F = malloc(M * N * 8);
    tu_fill_gauss(W, N * K, 0.05);
    tu_fill_gauss(X, M * K, 1);
    for (size_t m = 0; m < M; m++) /* uneven token magnitudes */
        for (size_t k = 0; k < K; k++)
            X[m * K + k] *= (float)(1 + m % 5);
    float amax = 0;
    for (size_t i = 0; i < M * K; i++)
        amax = fmaxf(amax, fabsf(X[i]));
    float sc = stat ? amax / 127 : 0;
    qs_w8 w;
    assert_int_equal(qs_w8_quantize(&w, W, N, K, group), QS_OK);
    assert_int_equal(qs_w8a8_gemm(&w, X, M, sc, Y), QS_OK);
    assert_int_equal(qs_w8a8_gemm_ref_f64(&w, X, M, sc, R), QS_OK);
    size_t ng = qs_w8_groups(K, group);
    double e2 = 0, r2 = 0, mag2 = 0;
    for (size_t m = 0; m < M; m++)
        for (size_t n = 0; n < N; n++) {
            double y = 0, mag = 0;
            for (size_t k = 0; k < K; k++) {
                y += (double)W[n * K + k] * X[m * K + k];
                mag += fabs((double)W[n * K + k] * X[m * K + k]);
            }
            F[m * N + n] = y;
            double d = fabs(Y[m * N + n] - R[m * N + n]);
            e2 += d * d, r2 += R[m * N + n] * R[m * N + n], mag2 += mag * mag;
            if (!(d <= 1e-5 * fabs(R[m * N + n]) + (double)(ng - 1) * 0x1p-22 * mag + 1e-30))
                fail_msg("%s N=%zu K=%zu M=%zu static=%d group=%zu: out (%zu,%zu) %g vs %g", path,
                         N, K, M, stat, group, m, n, (double)Y[m * N + n], R[m * N + n]);
        }
    /* L2 over all outputs, with the same allowance for the group partials */
    if (!(sqrt(e2) <= 1e-6 * sqrt(r2) + (double)(ng - 1) * 0x1p-22 * sqrt(mag2)))
        fail_msg("%s N=%zu K=%zu M=%zu static=%d group=%zu: L2 error %g of %g", path, N, K, M, stat,
                 group, sqrt(e2), sqrt(r2));
    double rq = tu_rel_l2(Y, F, M * N);
    if (!(rq < (stat ? 0.06 : 0.03)))
        fail_msg("%s N=%zu K=%zu M=%zu static=%d group=%zu: rel L2 vs fp32 %g", path, N, K, M, stat,
                 group, rq);
    qs_w8_close(&w);
    free(W), free(X), free(Y), free(R), free(F);
}

static void test_w8a8_vs_ref(void **state)
{
    (void)state;
    const size_t shapes[][2] = {{37, 224}, {69, 99}, {16, 4096}, {8, 1}, {133, 513}};
    const size_t batches[] = {1, 2, 7, 32};
    /* 0: per token; 128 divides 224 and 4096 but not 99 or 513; 4: the
     * smallest; 12: ragged everywhere */
    const size_t groups[] = {0, 128, 4, 12};
    for (size_t p = 0; p < 3; p++) {
        if (qs_cpu_force_path(paths[p]) != QS_OK) {
            printf("# skipping path %s: %s\n", paths[p], qs_errmsg());
            continue;
        }
        for (size_t s = 0; s < 5; s++)
            for (size_t b = 0; b < 4; b++)
                for (size_t g = 0; g < 4; g++)
                    for (int stat = 0; stat < 2; stat++)
                        check(shapes[s][0], shapes[s][1], batches[b], stat, groups[g], paths[p]);
    }
    qs_cpu_force_path(NULL);
}

/* Every product at +-127 * 127: int16 pair sums must not saturate and the
 * int32 sums must be exact. */
static void test_w8a8_saturation(void **state)
{
    (void)state;
    size_t N = 24, K = 8192, M = 3;
    float *W = malloc(N * K * 4), *X = malloc(M * K * 4), *Y = malloc(M * N * 4);
    for (size_t i = 0; i < N * K; i++)
        W[i] = (i / K) % 2 ? -1.0f : 1.0f;
    for (size_t i = 0; i < M * K; i++)
        X[i] = (i / K) == 1 ? -2.0f : 2.0f;
    qs_w8 w;
    assert_int_equal(qs_w8_quantize(&w, W, N, K, 0), QS_OK);
    for (size_t p = 0; p < 3; p++) {
        if (qs_cpu_force_path(paths[p]) != QS_OK)
            continue;
        assert_int_equal(qs_w8a8_gemm(&w, X, M, 0, Y), QS_OK);
        for (size_t m = 0; m < M; m++)
            for (size_t n = 0; n < N; n++) {
                float want = (n % 2 ? -1.0f : 1.0f) * (m == 1 ? -2.0f : 2.0f) * (float)K;
                assert_true(fabsf(Y[m * N + n] - want) <= 1e-5f * fabsf(want));
            }
    }
    qs_cpu_force_path(NULL);
    qs_w8_close(&w);
    free(W), free(X), free(Y);
}

static void test_w8a8_nonfinite(void **state)
{
    (void)state;
    size_t N = 21, K = 100, M = 4;
    float *W = malloc(N * K * 4), *X = malloc(M * K * 4), *Y = malloc(M * N * 4);
    tu_fill_gauss(W, N * K, 0.05);
    qs_w8 w;
    assert_int_equal(qs_w8_quantize(&w, W, N, K, 32), QS_OK);
    for (size_t p = 0; p < 3; p++) {
        if (qs_cpu_force_path(paths[p]) != QS_OK)
            continue;
        for (int stat = 0; stat < 2; stat++) {
            tu_fill_gauss(X, M * K, 1);
            X[1 * K + 5] = NAN;
            X[2 * K + 99] = -INFINITY;
            assert_int_equal(qs_w8a8_gemm(&w, X, M, stat ? 0.05f : 0, Y), QS_OK);
            for (size_t n = 0; n < N; n++) {
                assert_false(isfinite(Y[1 * N + n]));
                assert_false(isfinite(Y[2 * N + n]));
                assert_true(isfinite(Y[0 * N + n]) && isfinite(Y[3 * N + n]));
            }
        }
    }
    qs_cpu_force_path(NULL);
    qs_w8_close(&w);
    free(W), free(X), free(Y);
}

/* One channel at 100x the others (a SwiGLU output's massive activation):
 * with one scale per token every other channel keeps a code or two; groups
 * of 64 confine it to its own group. The grouped error must be several
 * times smaller. */
static void test_w8a8_groups_contain_outliers(void **state)
{
    (void)state;
    size_t N = 64, K = 1536, M = 8;
    float *W = malloc(N * K * 4), *X = malloc(M * K * 4), *Y = malloc(M * N * 4);
    double *F = malloc(M * N * 8);
    tu_fill_gauss(W, N * K, 0.05);
    tu_fill_gauss(X, M * K, 1);
    for (size_t m = 0; m < M; m++)
        X[m * K + 777] = 100.0f * (m % 2 ? -1.0f : 1.0f);
    for (size_t m = 0; m < M; m++)
        for (size_t n = 0; n < N; n++) {
            double y = 0;
            for (size_t k = 0; k < K; k++)
                y += (double)W[n * K + k] * X[m * K + k];
            F[m * N + n] = y;
        }
    double err[2];
    for (int grouped = 0; grouped < 2; grouped++) {
        qs_w8 w;
        assert_int_equal(qs_w8_quantize(&w, W, N, K, grouped ? 64 : 0), QS_OK);
        assert_int_equal(qs_w8a8_gemm(&w, X, M, 0, Y), QS_OK);
        err[grouped] = tu_rel_l2(Y, F, M * N);
        qs_w8_close(&w);
    }
    printf("# rel L2 with an outlier channel: per token %.4f, groups of 64 %.4f\n", err[0], err[1]);
    assert_true(err[1] * 3 < err[0]);
    free(W), free(X), free(Y), free(F);
}

int main(void)
{
    tu_seed("test_w8a8");
    printf("# best CPU path: %s\n", qs_cpu_path());
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_w8a8_vs_ref),
        cmocka_unit_test(test_w8a8_saturation),
        cmocka_unit_test(test_w8a8_nonfinite),
        cmocka_unit_test(test_w8a8_groups_contain_outliers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
