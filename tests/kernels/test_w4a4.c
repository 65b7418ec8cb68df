/* test_w4a4.c: the W4A4 (Atom) format and GEMM.
 *
 * - Every CPU path against qs_w4a4_gemm_ref_f64 on fresh random inputs and a
 *   random channel permutation, ragged shapes (N and K off multiples of
 *   8/16/128, a ragged last group, ko = 0, ko = K, ko = 128 of 576 and
 *   1536), M = 1, 3, 16, 33. The integer sums are exact on every path, so the
 *   only difference is fp32 rounding: one rounding of each group's scale
 *   product and one per group added, bounded by (ng + 3) * 2^-23 * sum_g
 *   |sx s4 acc_g| (computed from the codes).
 * - The reference equals the sum recomputed here from qs_w4_quant_act's and
 *   qs_w4_codes's codes bit for bit (the activation codes are the kernel's).
 * - The reference against the float64 product of the original fp32 weights
 *   and activations: relative L2 under 0.2 pooled over a path's calls (4-bit
 *   codes on both operands leave ~0.15 on Gaussian data; 0.3 for one call of
 *   512 outputs or more), under 0.02 when everything is INT8 (0.03).
 * - Outliers help, the clipping search is never worse than max scaling,
 *   from_codes(codes(w)) is bit-exact, the activation rule, NaN tokens,
 *   zero rows and tokens, and bad input. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "qs_kernels.h"
#include "testutil.h"

static const char *paths[] = {"scalar", "avx2", "avxvnni", "avx512"};
#define NPATHS 4

static void shuffle(uint32_t *p, size_t K)
{
    for (size_t j = 0; j < K; j++)
        p[j] = (uint32_t)j;
    for (size_t j = K; j > 1; j--) {
        size_t i = (size_t)(tu_u64() % j);
        uint32_t t = p[j - 1];
        p[j - 1] = p[i], p[i] = t;
    }
}

static size_t ngroups(const qs_w4 *w)
{
    size_t K4 = w->K - w->ko;
    return (K4 + w->group - 1) / w->group;
}

/* Y from the plain codes, in double, the reference's order; mag = the sum of
 * the absolute group terms. */
static void from_codes_f64(const qs_w4 *w, const float *X, size_t M, double *Y, double *mag)
{
    size_t N = w->N, K = w->K, K4 = K - w->ko, G = w->group, ng = ngroups(w);
    int8_t *wq = malloc(N * K), *xq = malloc(M * K);
    float *sx = malloc(M * ng * 4 + 4), *sxo = malloc(M * 4);
    assert_int_equal(qs_w4_codes(w, wq), QS_OK);
    assert_int_equal(qs_w4_quant_act(w, X, M, xq, sx, sxo), QS_OK);
    for (size_t m = 0; m < M; m++)
        for (size_t n = 0; n < N; n++) {
            double y = 0, a = 0;
            for (size_t g = 0; g < ng; g++) {
                int64_t acc = 0;
                for (size_t j = g * G; j < K4 && j < (g + 1) * G; j++)
                    acc += (int64_t)xq[m * K + j] * wq[n * K + j];
                double t = (double)sx[m * ng + g] * (double)w->s4[n * ng + g] * (double)acc;
                y += t, a += fabs(t);
            }
            int64_t acc = 0;
            for (size_t j = K4; j < K; j++)
                acc += (int64_t)xq[m * K + j] * wq[n * K + j];
            if (w->ko) {
                double t = (double)sxo[m] * (double)w->s8[n] * (double)acc;
                y += t, a += fabs(t);
            }
            Y[m * N + n] = y, mag[m * N + n] = a;
        }
    free(wq), free(xq), free(sx), free(sxo);
}

/* Squared error and squared magnitude against the fp32 product, pooled
 * over a path's calls: [0] INT4 parts, [1] all INT8. */
static double pool[2][2];

static void check(size_t N, size_t K, size_t ko, size_t group, size_t M, const char *path)
{
    float *W = malloc(N * K * 4), *X = malloc(M * K * 4), *Y = malloc(M * N * 4);
    double *R = malloc(M * N * 8), *C = malloc(M * N * 8), *mag = malloc(M * N * 8),
           *F = malloc(M * N * 8);
    uint32_t *perm = malloc(K * 4);
    tu_fill_gauss(W, N * K, 0.05);
    tu_fill_gauss(X, M * K, 1);
    for (size_t m = 0; m < M; m++) /* uneven token magnitudes */
        for (size_t k = 0; k < K; k++)
            X[m * K + k] *= (float)(1 + m % 5);
    shuffle(perm, K);
    qs_w4 w;
    assert_int_equal(qs_w4_quantize(&w, W, N, K, perm, ko, group), QS_OK);
    assert_int_equal(qs_w4a4_gemm(&w, X, M, Y), QS_OK);
    assert_int_equal(qs_w4a4_gemm_ref_f64(&w, X, M, R), QS_OK);
    from_codes_f64(&w, X, M, C, mag);
    size_t ng = ngroups(&w);
    for (size_t i = 0; i < M * N; i++) {
        if (R[i] != C[i])
            fail_msg("%s N=%zu K=%zu ko=%zu G=%zu M=%zu: ref %g != from codes %g at %zu", path, N,
                     K, ko, group, M, R[i], C[i], i);
        double d = fabs(Y[i] - R[i]);
        if (!(d <= (double)(ng + 3) * 0x1p-23 * mag[i] + 1e-30))
            fail_msg("%s N=%zu K=%zu ko=%zu G=%zu M=%zu: out (%zu,%zu) %.9g vs %.9g (mag %g)", path,
                     N, K, ko, group, M, i / N, i % N, (double)Y[i], R[i], mag[i]);
    }
    for (size_t m = 0; m < M; m++)
        for (size_t n = 0; n < N; n++) {
            double y = 0;
            for (size_t k = 0; k < K; k++)
                y += (double)W[n * K + k] * X[m * K + k];
            F[m * N + n] = y;
        }
    double e2 = 0, f2 = 0;
    for (size_t i = 0; i < M * N; i++)
        e2 += (R[i] - F[i]) * (R[i] - F[i]), f2 += F[i] * F[i];
    /* A few outputs say little about an L2 ratio (N = M = 1 is one sample):
     * bounded per call from 512 outputs on, and pooled over the path. */
    double rq = sqrt(e2 / f2), lim = ko == K ? 0.03 : 0.3;
    if (M * N >= 512 && !(rq < lim))
        fail_msg("%s N=%zu K=%zu ko=%zu G=%zu M=%zu: rel L2 vs fp32 %g (limit %g)", path, N, K, ko,
                 group, M, rq, lim);
    pool[ko == K][0] += e2, pool[ko == K][1] += f2;
    qs_w4_close(&w);
    free(W), free(X), free(Y), free(R), free(C), free(mag), free(F), free(perm);
}

static void test_w4a4_vs_ref(void **state)
{
    (void)state;
    /* N, K, ko, group */
    const size_t shapes[][4] = {
        {37, 224, 0, 128},    /* no outliers, last group of 96 */
        {69, 99, 3, 0},       /* K4 = 96 < 128: one group */
        {16, 576, 128, 128},  /* SmolLM2's hidden: K4 = 448, last group of 64 */
        {133, 1536, 128, 0},  /* K4 = 1408: 11 full groups */
        {8, 1, 1, 0},         /* ko = K = 1 */
        {47, 300, 300, 64},   /* all outliers */
        {33, 200, 0, 8},      /* the smallest group */
        {17, 77, 13, 24},     /* ragged everywhere */
        {1, 130, 2, 16},      /* one row */
        {50, 1000, 125, 128}, /* K4 = 875, ko not a multiple of 4 */
        {64, 256, 32, 64}     /* whole 32-row blocks */
    };
    const size_t batches[] = {1, 3, 16, 33};
    for (size_t p = 0; p < NPATHS; p++) {
        if (qs_cpu_force_path(paths[p]) != QS_OK) {
            printf("# skipping path %s: %s\n", paths[p], qs_errmsg());
            continue;
        }
        memset(pool, 0, sizeof(pool));
        for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
            for (size_t b = 0; b < 4; b++)
                check(shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3], batches[b], paths[p]);
        double r4 = sqrt(pool[0][0] / pool[0][1]), r8 = sqrt(pool[1][0] / pool[1][1]);
        printf("# %s: rel L2 against the fp32 product %.4f with INT4 parts, %.4f all INT8\n",
               paths[p], r4, r8);
        assert_true(r4 < 0.2 && r8 < 0.02);
    }
    qs_cpu_force_path(NULL);
}

/* A few channels at 50x the rest (Atom's outlier channels). With ko = 0 each
 * one sets its group's scale and flattens its neighbours to a code or two;
 * listed last as outliers (INT8) they cost almost nothing. */
static void test_w4a4_outliers_help(void **state)
{
    (void)state;
    size_t N = 64, K = 1536, M = 8, nout = 8, ko = 128;
    float *W = malloc(N * K * 4), *X = malloc(M * K * 4), *Y = malloc(M * N * 4);
    double *F = malloc(M * N * 8);
    uint32_t *perm = malloc(K * 4), *order = malloc(K * 4);
    uint8_t *big = calloc(K, 1);
    tu_fill_gauss(W, N * K, 0.05);
    tu_fill_gauss(X, M * K, 1);
    shuffle(order, K);
    for (size_t i = 0; i < nout; i++)
        big[order[i]] = 1;
    for (size_t m = 0; m < M; m++)
        for (size_t k = 0; k < K; k++)
            if (big[k])
                X[m * K + k] = 50.0f * (float)(1 + tu_unif()) * ((m + k) % 2 ? -1.0f : 1.0f);
    /* the big channels last, then enough others to make ko */
    size_t a = 0, z = K;
    for (size_t k = 0; k < K; k++)
        if (big[k])
            perm[--z] = (uint32_t)k;
    for (size_t k = 0; k < K; k++)
        if (!big[k])
            perm[a++] = (uint32_t)k;
    for (size_t m = 0; m < M; m++)
        for (size_t n = 0; n < N; n++) {
            double y = 0;
            for (size_t k = 0; k < K; k++)
                y += (double)W[n * K + k] * X[m * K + k];
            F[m * N + n] = y;
        }
    double err[3];
    const size_t kos[] = {0, nout, ko};
    for (int i = 0; i < 3; i++) {
        qs_w4 w;
        assert_int_equal(qs_w4_quantize(&w, W, N, K, i ? perm : NULL, kos[i], 128), QS_OK);
        assert_int_equal(qs_w4a4_gemm(&w, X, M, Y), QS_OK);
        err[i] = tu_rel_l2(Y, F, M * N);
        qs_w4_close(&w);
    }
    printf("# rel L2 with %zu outlier channels: ko = 0 %.4f, ko = %zu %.4f, ko = %zu %.4f\n", nout,
           err[0], nout, err[1], ko, err[2]);
    assert_true(err[1] * 3 < err[0]);
    assert_true(err[2] * 3 < err[0]);
    free(W), free(X), free(Y), free(F), free(perm), free(order), free(big);
}

/* Per (row, group): the clipped scale's squared error is at most that of
 * plain max scaling (within fp32 rounding of the search's sums), and over
 * the matrix clearly less; the INT8 outliers are max/127 round-to-nearest. */
static void test_w4_clip_search(void **state)
{
    (void)state;
    size_t N = 40, K = 1000, ko = 40, G = 128, K4 = K - ko, ng = (K4 + G - 1) / G;
    float *W = malloc(N * K * 4), *D = malloc(N * K * 4);
    uint32_t *perm = malloc(K * 4);
    for (int heavy = 0; heavy < 2; heavy++) {
        for (size_t i = 0; i < N * K; i++)
            W[i] = (float)(0.02 * (heavy ? tu_student(3) : tu_gauss()));
        shuffle(perm, K);
        qs_w4 w;
        assert_int_equal(qs_w4_quantize(&w, W, N, K, perm, ko, G), QS_OK);
        assert_int_equal(qs_w4_dequant(&w, D), QS_OK);
        double tot_clip = 0, tot_max = 0;
        for (size_t n = 0; n < N; n++) {
            for (size_t g = 0; g < ng; g++) {
                size_t j1 = (g + 1) * G < K4 ? (g + 1) * G : K4;
                float mx = 0;
                for (size_t j = g * G; j < j1; j++)
                    mx = fmaxf(mx, fabsf(W[n * K + perm[j]]));
                double s = mx / 7.0, ec = 0, em = 0;
                for (size_t j = g * G; j < j1; j++) {
                    double v = W[n * K + perm[j]], c = v - D[n * K + perm[j]];
                    double q = fmin(7, fmax(-7, nearbyint(v / s)));
                    ec += c * c, em += (v - s * q) * (v - s * q);
                }
                assert_true(w.s4[n * ng + g] <= mx / 7.0f * 1.000001f);
                assert_true(w.s4[n * ng + g] >= mx / 7.0f * 0.69f);
                if (!(ec <= em * (1 + 1e-5) + 1e-30))
                    fail_msg("row %zu group %zu: clipped error %g > max-scaled %g", n, g, ec, em);
                tot_clip += ec, tot_max += em;
            }
            float mx = 0;
            for (size_t j = K4; j < K; j++)
                mx = fmaxf(mx, fabsf(W[n * K + perm[j]]));
            assert_true(w.s8[n] == mx / 127.0f);
            for (size_t j = K4; j < K; j++) {
                float v = W[n * K + perm[j]];
                assert_true(fabsf(v - D[n * K + perm[j]]) <= w.s8[n] * 0.5001f);
            }
        }
        printf("# %s weights: squared error clipped %.4g, max-scaled %.4g (%.1f%% less)\n",
               heavy ? "Student-t(3)" : "Gaussian", tot_clip, tot_max,
               100 * (1 - tot_clip / tot_max));
        assert_true(tot_clip < 0.97 * tot_max);
        qs_w4_close(&w);
    }
    free(W), free(D), free(perm);
}

/* from_codes(codes(w)) is w bit for bit (same codes, scales, outputs), and
 * codes(from_codes(c)) is c for random codes of the full ranges. */
static void test_w4_codes_roundtrip(void **state)
{
    (void)state;
    const size_t shapes[][4] = {{37, 224, 0, 128}, {21, 301, 45, 24}, {16, 64, 64, 0}};
    for (size_t s = 0; s < 3; s++) {
        size_t N = shapes[s][0], K = shapes[s][1], ko = shapes[s][2], M = 5;
        float *W = malloc(N * K * 4), *D1 = malloc(N * K * 4), *D2 = malloc(N * K * 4);
        float *X = malloc(M * K * 4), *Y1 = malloc(M * N * 4), *Y2 = malloc(M * N * 4);
        int8_t *c1 = malloc(N * K), *c2 = malloc(N * K);
        uint32_t *perm = malloc(K * 4);
        tu_fill_gauss(W, N * K, 0.05);
        tu_fill_gauss(X, M * K, 1);
        shuffle(perm, K);
        qs_w4 w, w2, w3;
        assert_int_equal(qs_w4_quantize(&w, W, N, K, perm, ko, shapes[s][3]), QS_OK);
        size_t ng = ngroups(&w);
        assert_int_equal(qs_w4_codes(&w, c1), QS_OK);
        assert_int_equal(qs_w4_from_codes(&w2, c1, w.s4, w.s8, N, K, w.perm, ko, w.group), QS_OK);
        assert_int_equal(w2.group, w.group);
        assert_int_equal(qs_w4_codes(&w2, c2), QS_OK);
        assert_memory_equal(c1, c2, N * K);
        if (ng)
            assert_memory_equal(w.s4, w2.s4, N * ng * 4);
        if (ko) {
            assert_memory_equal(w.s8, w2.s8, N * 4);
            assert_memory_equal(w.sum, w2.sum, N * 4);
        }
        assert_memory_equal(w.perm, w2.perm, K * 4);
        assert_int_equal(qs_w4_dequant(&w, D1), QS_OK);
        assert_int_equal(qs_w4_dequant(&w2, D2), QS_OK);
        assert_memory_equal(D1, D2, N * K * 4);
        assert_int_equal(qs_w4a4_gemm(&w, X, M, Y1), QS_OK);
        assert_int_equal(qs_w4a4_gemm(&w2, X, M, Y2), QS_OK);
        assert_memory_equal(Y1, Y2, M * N * 4);
        /* random codes over the whole ranges, -7..7 and -127..127 */
        for (size_t n = 0; n < N; n++)
            for (size_t j = 0; j < K; j++)
                c1[n * K + j] =
                    (int8_t)(j < K - ko ? (int)(tu_u64() % 15) - 7 : (int)(tu_u64() % 255) - 127);
        assert_int_equal(qs_w4_from_codes(&w3, c1, w.s4, w.s8, N, K, NULL, ko, shapes[s][3]),
                         QS_OK);
        assert_int_equal(qs_w4_codes(&w3, c2), QS_OK);
        assert_memory_equal(c1, c2, N * K);
        qs_w4_close(&w), qs_w4_close(&w2), qs_w4_close(&w3);
        free(W), free(D1), free(D2), free(X), free(Y1), free(Y2), free(c1), free(c2), free(perm);
    }
}

static void quant_act_rule(const char *path)
{
    size_t N = 9, K = 300, ko = 44, G = 64, M = 7, K4 = K - ko, ng = (K4 + G - 1) / G;
    float *W = malloc(N * K * 4), *X = malloc(M * K * 4);
    int8_t *xq = malloc(M * K);
    float *sx = malloc(M * ng * 4), *sxo = malloc(M * 4);
    uint32_t *perm = malloc(K * 4);
    tu_fill_gauss(W, N * K, 0.05);
    tu_fill_gauss(X, M * K, 2);
    for (size_t k = 0; k < K; k++) /* exact ties: x * 7 / max lands on .5 */
        X[2 * K + k] = (float)((int)(k % 29) - 14) * 0.25f;
    memset(X + 3 * K, 0, K * 4);   /* a zero token */
    for (size_t k = 0; k < K; k++) /* 7 / max and 127 / max overflow to Inf */
        X[6 * K + k] = k % 3 ? 0.0f : (float)(k % 2 ? 1.5e-38 : -1.2e-38);
    shuffle(perm, K);
    qs_w4 w;
    assert_int_equal(qs_w4_quantize(&w, W, N, K, perm, ko, G), QS_OK);
    assert_int_equal(qs_w4_quant_act(&w, X, M, xq, sx, sxo), QS_OK);
    for (size_t m = 0; m < M; m++) {
        for (size_t g = 0; g <= ng; g++) {
            size_t j0 = g * G, j1 = g < ng ? (j0 + G < K4 ? j0 + G : K4) : K;
            float q = g < ng ? 7.0f : 127.0f, mx = 0;
            if (g == ng)
                j0 = K4;
            for (size_t j = j0; j < j1; j++)
                mx = fmaxf(mx, fabsf(X[m * K + perm[j]]));
            float inv = mx > 0 ? q / mx : 0;
            assert_true((g < ng ? sx[m * ng + g] : sxo[m]) == mx / q);
            for (size_t j = j0; j < j1; j++) {
                float c = nearbyintf(X[m * K + perm[j]] * inv);
                c = c != c ? 0 : (c > q ? q : (c < -q ? -q : c)); /* 0 * Inf: 0 */
                if (xq[m * K + j] != (int)c)
                    fail_msg("%s: token %zu position %zu: code %d, want %d", path, m, j,
                             xq[m * K + j], (int)c);
            }
        }
    }
    qs_w4_close(&w);
    free(W), free(X), free(xq), free(sx), free(sxo), free(perm);
}

/* The activation rule as qs_kernels.h states it, recomputed here, on every
 * path (the scalar path quantizes with scalar code, the others with AVX2). */
static void test_w4_quant_act_rule(void **state)
{
    (void)state;
    for (size_t p = 0; p < NPATHS; p++)
        if (qs_cpu_force_path(paths[p]) == QS_OK)
            quant_act_rule(paths[p]);
    qs_cpu_force_path(NULL);
}

/* NaN/Inf tokens give NaN outputs, zero tokens and zero weight rows zero. */
static void test_w4a4_nonfinite_and_zero(void **state)
{
    (void)state;
    size_t N = 21, K = 100, M = 5;
    float *W = malloc(N * K * 4), *X = malloc(M * K * 4), *Y = malloc(M * N * 4);
    tu_fill_gauss(W, N * K, 0.05);
    memset(W + 4 * K, 0, K * 4); /* row 4 zero */
    const size_t kos[] = {0, 12, K};
    for (size_t p = 0; p < NPATHS; p++) {
        if (qs_cpu_force_path(paths[p]) != QS_OK)
            continue;
        for (int i = 0; i < 3; i++) {
            qs_w4 w;
            assert_int_equal(qs_w4_quantize(&w, W, N, K, NULL, kos[i], 32), QS_OK);
            tu_fill_gauss(X, M * K, 1);
            X[1 * K + 5] = NAN;
            X[2 * K + 99] = -INFINITY;
            memset(X + 3 * K, 0, K * 4);
            assert_int_equal(qs_w4a4_gemm(&w, X, M, Y), QS_OK);
            for (size_t n = 0; n < N; n++) {
                assert_true(isnan(Y[1 * N + n]) && isnan(Y[2 * N + n]));
                assert_true(Y[3 * N + n] == 0);
                assert_true(isfinite(Y[0 * N + n]) && isfinite(Y[4 * N + n]));
            }
            assert_true(Y[0 * N + 4] == 0 && Y[4 * N + 4] == 0);
            int8_t *xq = malloc(M * K);
            float sx[5 * 4], sxo[5];
            assert_int_equal(qs_w4_quant_act(&w, X, M, xq, sx, sxo), QS_OK);
            assert_true(isnan(sxo[1]) && isnan(sxo[2]) && sxo[3] == 0);
            assert_true(kos[i] ? sxo[0] > 0 : sxo[0] == 0);
            for (size_t k = 0; k < K; k++)
                assert_int_equal(xq[1 * K + k], 0);
            free(xq);
            qs_w4_close(&w);
        }
    }
    qs_cpu_force_path(NULL);
    free(W), free(X), free(Y);
}

#define EXPECT_ERR(call, code)                                                                     \
    do {                                                                                           \
        qs_clearerr();                                                                             \
        assert_int_equal((call), (code));                                                          \
        assert_true(qs_errmsg()[0] != 0);                                                          \
    } while (0)

static void test_w4_bad_input(void **state)
{
    (void)state;
    size_t N = 4, K = 16;
    float W[64], X[16], Y[4], s4[4] = {1, 1, 1, 1}, s8[4] = {1, 1, 1, 1};
    int8_t codes[64] = {0}, xq[16];
    uint32_t perm[16];
    double R[4];
    for (size_t j = 0; j < K; j++)
        perm[j] = (uint32_t)(K - 1 - j);
    tu_fill_gauss(W, 64, 1);
    tu_fill_gauss(X, 16, 1);
    qs_w4 w, z;
    memset(&z, 0, sizeof(z));
    EXPECT_ERR(qs_w4_quantize(NULL, W, N, K, NULL, 0, 0), QS_EINVAL);
    EXPECT_ERR(qs_w4_quantize(&w, NULL, N, K, NULL, 0, 0), QS_EINVAL);
    EXPECT_ERR(qs_w4_quantize(&w, W, 0, K, NULL, 0, 0), QS_EINVAL);
    EXPECT_ERR(qs_w4_quantize(&w, W, N, 0, NULL, 0, 0), QS_EINVAL);
    EXPECT_ERR(qs_w4_quantize(&w, W, N, K, NULL, 17, 0), QS_EINVAL);
    EXPECT_ERR(qs_w4_quantize(&w, W, N, K, NULL, 0, 12), QS_EINVAL);
    EXPECT_ERR(qs_w4_quantize(&w, W, SIZE_MAX / 4, K, NULL, 0, 0), QS_EOVERFLOW);
    EXPECT_ERR(qs_w4_quantize(&w, W, 1, (size_t)1 << 31, NULL, 0, 0), QS_EOVERFLOW);
    perm[3] = perm[4]; /* a duplicate */
    EXPECT_ERR(qs_w4_quantize(&w, W, N, K, perm, 0, 0), QS_EINVAL);
    perm[3] = 99; /* out of range */
    EXPECT_ERR(qs_w4_quantize(&w, W, N, K, perm, 0, 0), QS_EINVAL);
    EXPECT_ERR(qs_w4_from_codes(&w, codes, s4, s8, N, K, perm, 4, 0), QS_EINVAL);
    perm[3] = 12;
    W[17] = NAN;
    EXPECT_ERR(qs_w4_quantize(&w, W, N, K, perm, 4, 0), QS_EINVAL);
    W[17] = 1;
    assert_null(w.perm); /* failed calls leave the struct empty */
    EXPECT_ERR(qs_w4_from_codes(NULL, codes, s4, s8, N, K, perm, 4, 0), QS_EINVAL);
    EXPECT_ERR(qs_w4_from_codes(&w, NULL, s4, s8, N, K, perm, 4, 0), QS_EINVAL);
    EXPECT_ERR(qs_w4_from_codes(&w, codes, NULL, s8, N, K, perm, 4, 0), QS_EINVAL);
    EXPECT_ERR(qs_w4_from_codes(&w, codes, s4, NULL, N, K, perm, 4, 0), QS_EINVAL);
    EXPECT_ERR(qs_w4_from_codes(&w, codes, s4, s8, N, K, perm, 4, 4), QS_EINVAL);
    EXPECT_ERR(qs_w4_from_codes(&w, codes, s4, s8, N, K, perm, 20, 0), QS_EINVAL);
    codes[5] = 8; /* INT4 position out of range */
    EXPECT_ERR(qs_w4_from_codes(&w, codes, s4, s8, N, K, perm, 4, 0), QS_EINVAL);
    codes[5] = -8;
    EXPECT_ERR(qs_w4_from_codes(&w, codes, s4, s8, N, K, perm, 4, 0), QS_EINVAL);
    codes[5] = 0, codes[15] = -128; /* outlier position out of range */
    EXPECT_ERR(qs_w4_from_codes(&w, codes, s4, s8, N, K, perm, 4, 0), QS_EINVAL);
    codes[15] = 127;
    s4[2] = NAN;
    EXPECT_ERR(qs_w4_from_codes(&w, codes, s4, s8, N, K, perm, 4, 0), QS_EINVAL);
    s4[2] = -1;
    EXPECT_ERR(qs_w4_from_codes(&w, codes, s4, s8, N, K, perm, 4, 0), QS_EINVAL);
    s4[2] = 1, s8[1] = INFINITY;
    EXPECT_ERR(qs_w4_from_codes(&w, codes, s4, s8, N, K, perm, 4, 0), QS_EINVAL);
    s8[1] = 1;
    /* NULL scales where the part is absent are fine */
    assert_int_equal(qs_w4_from_codes(&w, codes, NULL, s8, N, K, perm, K, 0), QS_OK);
    qs_w4_close(&w);
    codes[15] = 7; /* an INT4 position when ko = 0 */
    assert_int_equal(qs_w4_from_codes(&w, codes, s4, NULL, N, K, perm, 0, 0), QS_OK);
    qs_w4_close(&w);
    codes[15] = 127;
    assert_int_equal(qs_w4_from_codes(&w, codes, s4, s8, N, K, perm, 4, 0), QS_OK);
    /* size queries */
    assert_true(qs_w4_bytes(N, K, 4, 0) > 0);
    assert_int_equal(qs_w4_bytes(N, K, 4, 12), 0);
    assert_int_equal(qs_w4_bytes(SIZE_MAX / 4, K, 0, 0), 0);
    assert_int_equal(qs_w4_bytes(0, K, 0, 0), 0);
    /* kernels on a closed or NULL struct, NULL buffers, M = 0 */
    EXPECT_ERR(qs_w4a4_gemm(NULL, X, 1, Y), QS_EINVAL);
    EXPECT_ERR(qs_w4a4_gemm(&z, X, 1, Y), QS_EINVAL);
    EXPECT_ERR(qs_w4a4_gemm(&w, NULL, 1, Y), QS_EINVAL);
    EXPECT_ERR(qs_w4a4_gemm(&w, X, 1, NULL), QS_EINVAL);
    EXPECT_ERR(qs_w4a4_gemm(&w, X, 0, Y), QS_EINVAL);
    EXPECT_ERR(qs_w4a4_gemm(&w, X, SIZE_MAX / 8, Y), QS_EOVERFLOW);
    EXPECT_ERR(qs_w4a4_gemm_ref_f64(&z, X, 1, R), QS_EINVAL);
    EXPECT_ERR(qs_w4a4_gemm_ref_f64(&w, X, 1, NULL), QS_EINVAL);
    EXPECT_ERR(qs_w4_codes(&z, codes), QS_EINVAL);
    EXPECT_ERR(qs_w4_codes(&w, NULL), QS_EINVAL);
    EXPECT_ERR(qs_w4_dequant(&w, NULL), QS_EINVAL);
    EXPECT_ERR(qs_w4_dequant(NULL, W), QS_EINVAL);
    EXPECT_ERR(qs_w4_quant_act(&w, X, 1, NULL, s4, s8), QS_EINVAL);
    EXPECT_ERR(qs_w4_quant_act(&w, X, 1, xq, NULL, s8), QS_EINVAL);
    EXPECT_ERR(qs_w4_quant_act(&w, X, 1, xq, s4, NULL), QS_EINVAL);
    EXPECT_ERR(qs_w4_quant_act(&w, X, 0, xq, s4, s8), QS_EINVAL);
    EXPECT_ERR(qs_w4_quant_act(&z, X, 1, xq, s4, s8), QS_EINVAL);
    w.group = 12; /* a struct edited by hand */
    EXPECT_ERR(qs_w4a4_gemm(&w, X, 1, Y), QS_EINVAL);
    w.group = 16;
    assert_int_equal(qs_w4a4_gemm(&w, X, 1, Y), QS_OK);
    qs_w4_close(&w);
    qs_w4_close(&w); /* twice is fine */
    qs_w4_close(NULL);
}

int main(void)
{
    tu_seed("test_w4a4");
    printf("# best CPU path: %s\n", qs_cpu_path());
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_w4a4_vs_ref),       cmocka_unit_test(test_w4a4_outliers_help),
        cmocka_unit_test(test_w4_clip_search),    cmocka_unit_test(test_w4_codes_roundtrip),
        cmocka_unit_test(test_w4_quant_act_rule), cmocka_unit_test(test_w4a4_nonfinite_and_zero),
        cmocka_unit_test(test_w4_bad_input),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
