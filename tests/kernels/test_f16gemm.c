/* test_f16gemm: qs_f16_gemm (fp32 X times fp16 W^T) on every path
 * (scalar, AVX2 + F16C, AVX-512) against the float64 reference on fresh
 * Gaussian inputs: ragged K (1 to 1000, around every vector width), N and M,
 * the tied LM head's width 576. Bound per output: the fp32 sum's error,
 * (K + 4) 2^-24 sum_k |x_k w_k| (accumulators, then lanes, each adding at
 * most one rounding per term it takes in). Also: qs_f16_to_f32_row equals
 * the reference conversion bit for bit, and the refusals. */
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

static void one(size_t M, size_t N, size_t K)
{
    uint16_t *W = malloc(N * K * 2);
    float *X = malloc(M * K * 4), *Y = malloc(M * N * 4);
    double *R = malloc(M * N * 8);
    for (size_t i = 0; i < N * K; i++)
        W[i] = qs_fp32_to_fp16((float)(0.05 * tu_gauss()));
    tu_fill_gauss(X, M * K, 1.0);
    assert_int_equal(qs_f16_gemm_ref_f64(W, N, K, X, M, R), QS_OK);
    memset(Y, 0xFF, M * N * 4); /* NaN: every output must be written */
    assert_int_equal(qs_f16_gemm(W, N, K, X, M, Y), QS_OK);
    for (size_t m = 0; m < M; m++)
        for (size_t n = 0; n < N; n++) {
            double b = 0;
            for (size_t k = 0; k < K; k++)
                b += fabs((double)X[m * K + k] * qs_fp16_to_fp32(W[n * K + k]));
            double tol = (double)(K + 4) * 0x1p-24 * b + 1e-30;
            double err = fabs((double)Y[m * N + n] - R[m * N + n]);
            if (!(err <= tol))
                fail_msg("%s M=%zu N=%zu K=%zu: Y[%zu][%zu] = %.9g, reference %.9g (bound %.3g)",
                         qs_cpu_path(), M, N, K, m, n, (double)Y[m * N + n], R[m * N + n], tol);
        }
    free(W), free(X), free(Y), free(R);
}

static void test_f16gemm_vs_ref(void **state)
{
    (void)state;
    static const char *paths[] = {"scalar", "avx2", "avx512"};
    static const size_t Ks[] = {1, 7, 8, 15, 16, 17, 31, 33, 64, 65, 100, 576, 1000};
    static const size_t MNs[][2] = {{1, 1}, {1, 97}, {3, 5}, {17, 33}, {1, 300}, {4, 8}, {6, 9}};
    for (size_t p = 0; p < 3; p++) {
        if (qs_cpu_force_path(paths[p]) != QS_OK)
            continue; /* the CPU lacks it */
        for (size_t k = 0; k < sizeof Ks / sizeof Ks[0]; k++)
            for (size_t i = 0; i < sizeof MNs / sizeof MNs[0]; i++)
                one(MNs[i][0], MNs[i][1], Ks[k]);
    }
    qs_cpu_force_path(NULL);
}

/* A token's outputs do not depend on the other tokens of the call: each
 * row of a batch equals that row alone, bit for bit (continuous batching
 * relies on it), on every path and at batch sizes around the blocking. */
static void test_f16gemm_batch_invariant(void **state)
{
    (void)state;
    static const char *paths[] = {"scalar", "avx2", "avx512"};
    const size_t N = 45, K = 200, Ms[] = {2, 3, 4, 5, 9};
    uint16_t *W = malloc(N * K * 2);
    float *X = malloc(9 * K * 4), *Y = malloc(9 * N * 4), *y1 = malloc(N * 4);
    for (size_t i = 0; i < N * K; i++)
        W[i] = qs_fp32_to_fp16((float)(0.1 * tu_gauss()));
    tu_fill_gauss(X, 9 * K, 1.0);
    for (size_t p = 0; p < 3; p++) {
        if (qs_cpu_force_path(paths[p]) != QS_OK)
            continue;
        for (size_t i = 0; i < sizeof Ms / sizeof Ms[0]; i++) {
            assert_int_equal(qs_f16_gemm(W, N, K, X, Ms[i], Y), QS_OK);
            for (size_t m = 0; m < Ms[i]; m++) {
                assert_int_equal(qs_f16_gemm(W, N, K, X + m * K, 1, y1), QS_OK);
                if (memcmp(y1, Y + m * N, N * 4))
                    fail_msg("%s: token %zu of %zu differs from the token alone", qs_cpu_path(), m,
                             Ms[i]);
            }
        }
    }
    qs_cpu_force_path(NULL);
    free(W), free(X), free(Y), free(y1);
}

static void test_f16_widen(void **state)
{
    (void)state;
    /* Every fp16 bit pattern, through each path. */
    uint16_t *h = malloc(65536 * 2);
    float *f = malloc(65536 * 4);
    for (uint32_t i = 0; i < 65536; i++)
        h[i] = (uint16_t)i;
    static const char *paths[] = {"scalar", "avx2", "avx512"};
    for (size_t p = 0; p < 3; p++) {
        if (qs_cpu_force_path(paths[p]) != QS_OK)
            continue;
        qs_f16_to_f32_row(h, 65536, f);
        for (uint32_t i = 0; i < 65536; i++) {
            float want = qs_fp16_to_fp32((uint16_t)i);
            if (isnan(want) ? !isnan(f[i]) : memcmp(&want, &f[i], 4) != 0)
                fail_msg("%s: fp16 0x%04x widened to %g, want %g", paths[p], i, (double)f[i],
                         (double)want);
        }
    }
    qs_cpu_force_path(NULL);
    free(h), free(f);
}

static void test_f16gemm_refusals(void **state)
{
    (void)state;
    uint16_t w = 0;
    float x = 1, y;
    assert_int_equal(qs_f16_gemm(NULL, 1, 1, &x, 1, &y), QS_EINVAL);
    assert_int_equal(qs_f16_gemm(&w, 0, 1, &x, 1, &y), QS_EINVAL);
    assert_int_equal(qs_f16_gemm(&w, 1, 1, &x, 0, &y), QS_EINVAL);
}

int main(void)
{
    tu_seed("test_f16gemm");
    printf("# best CPU path: %s\n", qs_cpu_path());
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_f16gemm_vs_ref),
        cmocka_unit_test(test_f16gemm_batch_invariant),
        cmocka_unit_test(test_f16_widen),
        cmocka_unit_test(test_f16gemm_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
