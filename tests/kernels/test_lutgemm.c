/* test_lutgemm.c: LUT-GEMM on every CPU path against the float64 product of
 * its dequantized weights: q = 1..8, row-wise and grouped g, batches 1, 2, 7,
 * 32 (and 70, over the 64-token chunk), ragged N and K. Two bounds: every
 * output within the stated int8-table bound (plus fp32 slack), and the
 * relative L2 error under 2%. NaN/Inf in activations must propagate. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "qs_kernels.h"
#include "testutil.h"

/* LUT-GEMM has no VNNI code: the avxvnni path runs the avx2 kernel. */
static const char *paths[] = {"scalar", "avx2", "avx512"};
#define NPATHS 3

/* Random BCQ weights: random bits (zero past K), alpha ~ |N(0, 0.02)| halving
 * per plane like a uniform grid but jittered, z ~ N(0, 0.01). */
static void random_bcq(qs_bcq *w, size_t N, size_t K, unsigned q, size_t g)
{
    assert_int_equal(qs_bcq_init(w, N, K, q, g), QS_OK);
    size_t nw = (K + 31) / 32, ng = g ? K / g : 1;
    for (unsigned i = 0; i < q; i++)
        for (size_t n = 0; n < N; n++)
            for (size_t wi = 0; wi < nw; wi++) {
                uint32_t v = (uint32_t)tu_u64();
                if (wi == nw - 1 && K % 32)
                    v &= (1u << (K % 32)) - 1;
                w->bits[qs_bcq_word_index(w, i, n, wi)] = v;
            }
    for (size_t gi = 0; gi < ng; gi++)
        for (size_t n = 0; n < N; n++) {
            for (unsigned i = 0; i < q; i++)
                w->alpha[qs_bcq_alpha_index(w, i, n, gi)] =
                    qs_fp32_to_fp16((float)(0.02 * (0.5 + tu_unif()) / (1u << (q - 1 - i))));
            w->z[qs_bcq_z_index(w, n, gi)] = qs_fp32_to_fp16((float)(0.01 * tu_gauss()));
        }
}

static double worst_rel = 0;

static void check(const qs_bcq *w, size_t M, const char *path)
{
    size_t N = w->N, K = w->K;
    float *X = malloc(M * K * 4), *Y = malloc(M * N * 4);
    double *R = malloc(M * N * 8), *E = malloc(M * N * 8), *A = malloc(M * N * 8);
    double *Wd = malloc(N * K * 8);
    tu_fill_gauss(X, M * K, 1);
    assert_int_equal(qs_lutgemm(w, X, M, Y), QS_OK);
    assert_int_equal(qs_lutgemm_ref_f64(w, X, M, R), QS_OK);
    assert_int_equal(qs_lutgemm_err_bound(w, X, M, E), QS_OK);
    qs_bcq_dequant_f64(w, Wd);
    for (size_t m = 0; m < M; m++) /* sum |w||x|, for the fp32 rounding slack */
        for (size_t n = 0; n < N; n++) {
            double a = 0;
            for (size_t k = 0; k < K; k++)
                a += fabs(Wd[n * K + k] * X[m * K + k]);
            A[m * N + n] = a;
        }
    for (size_t i = 0; i < M * N; i++) {
        double d = fabs(Y[i] - R[i]), lim = E[i] + 1e-5 * A[i];
        if (!(d <= lim))
            fail_msg("%s N=%zu K=%zu q=%u g=%zu M=%zu: out %zu off by %g > bound %g", path, N, K,
                     w->q, w->g, M, i, d, lim);
    }
    /* The mu = 8 fp32-table variant: fp32 rounding only. */
    assert_int_equal(qs_lutgemm_f32(w, X, M, Y), QS_OK);
    for (size_t i = 0; i < M * N; i++)
        if (!(fabs(Y[i] - R[i]) <= 1e-5 * A[i]))
            fail_msg("f32 N=%zu K=%zu q=%u g=%zu M=%zu: out %zu off by %g > %g", N, K, w->q, w->g,
                     M, i, fabs(Y[i] - R[i]), 1e-5 * A[i]);
    assert_int_equal(qs_lutgemm(w, X, M, Y), QS_OK);
    double rel = tu_rel_l2(Y, R, M * N);
    worst_rel = rel > worst_rel ? rel : worst_rel;
    if (!(rel < 0.02))
        fail_msg("%s N=%zu K=%zu q=%u g=%zu M=%zu: rel L2 %g >= 0.02", path, N, K, w->q, w->g, M,
                 rel);
    free(X), free(Y), free(R), free(E), free(A), free(Wd);
}

static void test_lutgemm_vs_ref(void **state)
{
    (void)state;
    /* K = 96k + 32 with g = 32, N = 37; N past a tile with g = 128; K not a
     * multiple of 32 row-wise; a 2-tile matrix with g = K; row-wise with
     * several table blocks and a partial one. */
    const size_t shapes[][3] = {
        {37, 224, 32}, {69, 512, 128}, {45, 300, 0}, {64, 256, 256}, {33, 1000, 0}};
    const size_t batches[] = {1, 2, 7, 32};
    for (size_t p = 0; p < NPATHS; p++) {
        if (qs_cpu_force_path(paths[p]) != QS_OK) {
            printf("# skipping path %s: %s\n", paths[p], qs_errmsg());
            continue;
        }
        for (size_t s = 0; s < 5; s++)
            for (unsigned q = 1; q <= 8; q++) {
                qs_bcq w;
                random_bcq(&w, shapes[s][0], shapes[s][1], q, shapes[s][2]);
                for (size_t b = 0; b < 4; b++)
                    check(&w, batches[b], paths[p]);
                qs_bcq_close(&w);
            }
    }
    qs_cpu_force_path(NULL);
    printf("# worst relative L2 error %.3g (bound 0.02)\n", worst_rel);
}

/* Batches over the 64-token chunk, and quantized real weights. */
static void test_lutgemm_big_batch(void **state)
{
    (void)state;
    size_t N = 70, K = 384;
    float *W = malloc(N * K * 4);
    tu_fill_gauss(W, N * K, 0.02);
    qs_bcq w;
    assert_int_equal(qs_bcq_from_rtn(&w, W, N, K, 4, 128), QS_OK);
    check(&w, 70, qs_cpu_path());
    qs_bcq_close(&w);
    assert_int_equal(qs_bcq_quantize(&w, W, N, K, 3, 0, 5), QS_OK);
    check(&w, 3, qs_cpu_path());
    qs_bcq_close(&w);
    free(W);
}

static void test_lutgemm_nonfinite(void **state)
{
    (void)state;
    size_t N = 45, K = 256, M = 4;
    qs_bcq w;
    random_bcq(&w, N, K, 3, 128);
    float *X = malloc(M * K * 4), *Y = malloc(M * N * 4);
    double *R = malloc(M * N * 8);
    for (size_t p = 0; p < NPATHS; p++) {
        if (qs_cpu_force_path(paths[p]) != QS_OK)
            continue;
        tu_fill_gauss(X, M * K, 1);
        X[1 * K + 17] = NAN;
        X[2 * K + 200] = INFINITY;
        assert_int_equal(qs_lutgemm_ref_f64(&w, X, M, R), QS_OK);
        for (int f32 = 0; f32 < 2; f32++) {
            assert_int_equal((f32 ? qs_lutgemm_f32 : qs_lutgemm)(&w, X, M, Y), QS_OK);
            for (size_t n = 0; n < N; n++) {
                assert_false(isfinite(Y[1 * N + n]));
                assert_false(isfinite(Y[2 * N + n]));
                for (size_t m = 0; m < M; m += 3) /* tokens 0 and 3 are untouched */
                    assert_true(fabs(Y[m * N + n] - R[m * N + n]) <
                                0.05 * (1 + fabs(R[m * N + n])));
            }
        }
    }
    qs_cpu_force_path(NULL);
    qs_bcq_close(&w);
    free(X), free(Y), free(R);
}

int main(void)
{
    tu_seed("test_lutgemm");
    printf("# best CPU path: %s\n", qs_cpu_path());
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lutgemm_vs_ref),
        cmocka_unit_test(test_lutgemm_big_batch),
        cmocka_unit_test(test_lutgemm_nonfinite),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
