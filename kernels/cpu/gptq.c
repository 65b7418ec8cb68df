/* gptq.c: GPTQ (Frantar et al., "OPTQ: Accurate Quantization for Generative
 * Pre-trained Transformers", 2022), one calibration-aware quantizer for every
 * weight grid of qshard: BCQ (qs_bcq_quantize's fit), RTN (its uniform grid
 * as BCQ) and W4A4.
 *
 * Shapes (row-major):
 *   X   M x K   calibration inputs of one linear (tokens x input channels)
 *   H   K x K   sum of X^T X over the calibration batches (qs_hessian_add)
 *   W   N x K   weights: output rows x input columns, original column order
 *   perm [K]    position j processes original column perm[j] (NULL: j)
 *   Hp  K x K   H in position order, Hp[a][b] = H[perm[a]][perm[b]]
 *   A   n x n   float64, n = K rounded up to NB: Hp reversed, A[i][j] =
 *               Hp[K-1-i][K-1-j], damped, identity past K; then in place
 *               its lower Cholesky factor L, then L^-1
 *   U   K x ld  float32, upper: the Cholesky factor of Hp^-1 (Hp^-1 = U^T U),
 *               U[i][j] = L^-1[K-1-i][K-1-j]; zero past column K
 *   Wc  R x ld  float32, R rows of W in position order, updated as columns
 *               are rounded (one thread's; the paper's W)
 *   E   R x BLK float32, the current block's scaled errors (w - q) / U[j][j]
 *   codes N x K, position order: BCQ's (bit i = plane i) or W4's (int8),
 *       packed at the end by qs_bcq_pack_codes or qs_w4_from_codes;
 *       W4's scales s4 [N][ceil(K4 / G)] and s8 [N] beside them
 *
 * The algorithm (the paper's Algorithm 1): for each column j in position
 * order, q = the nearest level of its row's grid, e = (w - q) / U[j][j],
 * and every later column k of that row takes w_k -= e U[j][k]. Lazy batch
 * updates: inside a block of up to BLK columns the update goes only to the
 * block's columns; at the block's end the rest of the row takes all of the
 * block's at once, a (R x BLK) by (BLK x K) product that runs at cache and
 * FMA speed instead of K rank-1 passes over memory. The grid of a group of
 * columns is fitted when its first column comes up, from those columns'
 * weights as updated by then; blocks end at group starts where a group
 * would straddle two blocks, so those weights are always exact.
 *
 * Why U = J L^-1 J (J reverses the order): Hp = J A J = (J L J)(J L J)^T with
 * J L J upper, so Hp^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper with
 * a positive diagonal: Hp^-1's upper Cholesky factor, from one Cholesky and
 * one triangular inverse instead of the paper's three steps (Cholesky,
 * inverse, Cholesky); the reference below takes the three and the tests
 * compare.
 *
 * Costs: the factorization is 2 n^3 / 6 multiply-adds in float64 (blocked
 * by NB, OpenMP over blocks), the column loop N K^2 / 2 in float32 (OpenMP
 * over chunks of R rows, each thread running its rows through every
 * column: rows never interact). Memory: 8 n^2 + 4 K ld bytes, plus
 * R x ld floats per thread. */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"
#include "quant.h"
#include "w4.h"

#define NB  128 /* factorization block */
#define BLK 128 /* lazy-batch block of columns */
#define HT  64  /* Hessian tile */
#define HM  256 /* Hessian tokens per pass */

/* A parallel region only for a step of at least this many multiply-adds
 * (~2 ms on one core): on this 2-core machine shared with other builds,
 * waking a sleeping OpenMP thread cost milliseconds, and K = 576 factored 15x
 * slower on 2 threads (about 20 regions) than on 1. */
#define PAR_FMA  (1u << 25)
#define PAR(fma) if ((double)(fma) >= (double)PAR_FMA)

#define ATTR_AVX2 __attribute__((target("avx2,fma")))

static size_t round_up(size_t x, size_t m)
{
    return (x + m - 1) / m * m;
}

/* ---- Small dense kernels ----------------------------------------------------
 * c (4 rows x 16 floats or 8 doubles, ldc) += s * sum_p a[r ars + p aps] b[p ldb ..]:
 * four rows of a broadcast against one row segment of b per p, so the
 * accumulators stay in registers; s (+-1) is applied once at the end, so
 * each broadcast is a plain load. */

static ATTR_AVX2 void mk_f32_avx2(size_t P, float s, const float *a, size_t ars, size_t aps,
                                  const float *b, size_t ldb, float *c, size_t ldc)
{
    __m256 acc[8];
    for (int i = 0; i < 8; i++)
        acc[i] = _mm256_setzero_ps();
    for (size_t p = 0; p < P; p++) {
        const float *ap = a + p * aps, *bp = b + p * ldb;
        __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            __m256 x = _mm256_broadcast_ss(ap + r * ars);
            acc[2 * r] = _mm256_fmadd_ps(x, b0, acc[2 * r]);
            acc[2 * r + 1] = _mm256_fmadd_ps(x, b1, acc[2 * r + 1]);
        }
    }
    __m256 sv = _mm256_set1_ps(s);
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) {
        float *cr = c + r * ldc;
        _mm256_storeu_ps(cr, _mm256_fmadd_ps(sv, acc[2 * r], _mm256_loadu_ps(cr)));
        _mm256_storeu_ps(cr + 8, _mm256_fmadd_ps(sv, acc[2 * r + 1], _mm256_loadu_ps(cr + 8)));
    }
}

static void mk_f32_plain(size_t P, float s, const float *a, size_t ars, size_t aps, const float *b,
                         size_t ldb, float *c, size_t ldc)
{
    for (int r = 0; r < 4; r++)
        for (size_t p = 0; p < P; p++) {
            float x = s * a[r * ars + p * aps];
            for (int k = 0; k < 16; k++)
                c[r * ldc + k] += x * b[p * ldb + k];
        }
}

static ATTR_AVX2 void mk_f64_avx2(size_t P, double s, const double *a, size_t lda, const double *b,
                                  size_t ldb, double *c, size_t ldc)
{
    __m256d acc[8];
    for (int i = 0; i < 8; i++)
        acc[i] = _mm256_setzero_pd();
    for (size_t p = 0; p < P; p++) {
        const double *bp = b + p * ldb;
        __m256d b0 = _mm256_loadu_pd(bp), b1 = _mm256_loadu_pd(bp + 4);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            __m256d x = _mm256_broadcast_sd(a + r * lda + p);
            acc[2 * r] = _mm256_fmadd_pd(x, b0, acc[2 * r]);
            acc[2 * r + 1] = _mm256_fmadd_pd(x, b1, acc[2 * r + 1]);
        }
    }
    __m256d sv = _mm256_set1_pd(s);
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) {
        double *cr = c + r * ldc;
        _mm256_storeu_pd(cr, _mm256_fmadd_pd(sv, acc[2 * r], _mm256_loadu_pd(cr)));
        _mm256_storeu_pd(cr + 4, _mm256_fmadd_pd(sv, acc[2 * r + 1], _mm256_loadu_pd(cr + 4)));
    }
}

static void mk_f64_plain(size_t P, double s, const double *a, size_t lda, const double *b,
                         size_t ldb, double *c, size_t ldc)
{
    for (int r = 0; r < 4; r++)
        for (size_t p = 0; p < P; p++) {
            double x = s * a[r * lda + p];
            for (int k = 0; k < 8; k++)
                c[r * ldc + k] += x * b[p * ldb + k];
        }
}

/* C (rows x cols) += s A B, rows % 4 == 0, cols % 16 == 0; a column strip
 * of B (P x 16) stays in L1 while every row of A passes it. */
static void gemm_f32(size_t rows, size_t cols, size_t P, float s, const float *a, size_t ars,
                     size_t aps, const float *b, size_t ldb, float *c, size_t ldc, int avx2)
{
    for (size_t x = 0; x < cols; x += 16)
        for (size_t r = 0; r < rows; r += 4) {
            if (avx2)
                mk_f32_avx2(P, s, a + r * ars, ars, aps, b + x, ldb, c + r * ldc + x, ldc);
            else
                mk_f32_plain(P, s, a + r * ars, ars, aps, b + x, ldb, c + r * ldc + x, ldc);
        }
}

/* One NB x NB block: C += s A B, all three row-major NB x NB. */
static void blk_f64(double *c, size_t ldc, const double *a, size_t lda, const double *b, size_t ldb,
                    double s, int avx2)
{
    for (size_t x = 0; x < NB; x += 8)
        for (size_t r = 0; r < NB; r += 4) {
            if (avx2)
                mk_f64_avx2(NB, s, a + r * lda, lda, b + x, ldb, c + r * ldc + x, ldc);
            else
                mk_f64_plain(NB, s, a + r * lda, lda, b + x, ldb, c + r * ldc + x, ldc);
        }
}

static ATTR_AVX2 double dot_avx2(const double *x, const double *y, size_t n)
{
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        s0 = _mm256_fmadd_pd(_mm256_loadu_pd(x + i), _mm256_loadu_pd(y + i), s0);
        s1 = _mm256_fmadd_pd(_mm256_loadu_pd(x + i + 4), _mm256_loadu_pd(y + i + 4), s1);
    }
    double t[4];
    _mm256_storeu_pd(t, _mm256_add_pd(s0, s1));
    double s = (t[0] + t[1]) + (t[2] + t[3]);
    for (; i < n; i++)
        s += x[i] * y[i];
    return s;
}

static double dot(const double *x, const double *y, size_t n, int avx2)
{
    if (avx2)
        return dot_avx2(x, y, n);
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += x[i] * y[i];
    return s;
}

/* y[0..n) += s x[0..n): the in-block update of one row. */
static ATTR_AVX2 void axpy_avx2(float *y, const float *x, float s, size_t n)
{
    __m256 v = _mm256_set1_ps(s);
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(v, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++)
        y[i] += s * x[i];
}

static void axpy(float *y, const float *x, float s, size_t n, int avx2)
{
    if (avx2) {
        axpy_avx2(y, x, s, n);
        return;
    }
    for (size_t i = 0; i < n; i++)
        y[i] += s * x[i];
}

/* ---- The Hessian ------------------------------------------------------------ */

int qs_hessian_add(float *H, const float *X, size_t M, size_t K)
{
    if (!H || !X)
        return qs_seterr(QS_EINVAL, "qs_hessian_add got a NULL pointer: pass the K x K "
                                    "Hessian (zeros at first) and the M x K inputs");
    if (M == 0 || K == 0)
        return qs_seterr(QS_EINVAL,
                         "qs_hessian_add got an empty batch (M=%zu, K=%zu): pass at least one "
                         "token of at least one channel",
                         M, K);
    size_t Kp = round_up(K, HT), t;
    if (Kp < K || __builtin_mul_overflow(K, K, &t) || __builtin_mul_overflow(t, 8, &t) ||
        __builtin_mul_overflow(M, K, &t) || __builtin_mul_overflow(t, 8, &t))
        return qs_seterr(QS_EOVERFLOW,
                         "a %zu x %zu Hessian of %zu tokens overflows size_t: split the input "
                         "channels",
                         K, K, M);
    for (size_t i = 0; i < M * K; i++)
        if (!isfinite(X[i]))
            return qs_seterr(QS_EINVAL,
                             "calibration input [token %zu, channel %zu] is not finite (%g): "
                             "the batch would poison the Hessian; skip it",
                             i / K, i % K, (double)X[i]);
    size_t lx = Kp + 16; /* not a multiple of 1 KiB: see la in gptq_factor */
    float *Xp = calloc(HM * lx, sizeof *Xp);
    if (!Xp)
        return qs_seterr(QS_ENOMEM, "out of memory for a %zu-token slice of the Hessian input",
                         (size_t)HM);
    int avx2 = qs_cpu_path_id() >= QS_PATH_AVX2;
    size_t nt = Kp / HT;
    for (size_t m0 = 0; m0 < M; m0 += HM) {
        size_t mc = M - m0 < HM ? M - m0 : HM;
        for (size_t m = 0; m < mc; m++) { /* padded with zero channels to Kp */
            memcpy(Xp + m * lx, X + (m0 + m) * K, K * sizeof *Xp);
        }
        /* Tiles on and above the diagonal; the lower half is the mirror. */
#pragma omp parallel for schedule(dynamic, 1) PAR(nt *(nt + 1) / 2 * HT * HT * mc)
        for (size_t tt = 0; tt < nt * nt; tt++) {
            size_t ti = tt / nt, tj = tt % nt;
            if (tj < ti)
                continue;
            float C[HT * HT];
            memset(C, 0, sizeof C);
            gemm_f32(HT, HT, mc, 1.0f, Xp + ti * HT, 1, lx, Xp + tj * HT, lx, C, HT, avx2);
            for (size_t i = ti * HT; i < (ti + 1) * HT && i < K; i++)
                for (size_t j = i > tj * HT ? i : tj * HT; j < (tj + 1) * HT && j < K; j++)
                    H[i * K + j] += C[(i - ti * HT) * HT + j - tj * HT];
        }
    }
    free(Xp);
#pragma omp parallel for schedule(static) PAR(K *K * 4)
    for (size_t i = 1; i < K; i++)
        for (size_t j = 0; j < i; j++)
            H[i * K + j] = H[j * K + i];
    return QS_OK;
}

/* ---- Factorization: U, the upper Cholesky factor of Hp^-1 -------------------- */

/* Lower Cholesky factor of A (n x n, rows la apart, n % NB == 0) in its
 * lower triangle (the upper is scratch), right-looking by blocks of NB. PT:
 * NB x la scratch for the panel transposed, so the trailing update reads
 * both operands in rows. Returns n, or the row where a pivot was not
 * positive. */
static size_t chol_lower(double *A, size_t n, size_t la, double *PT, int avx2)
{
    for (size_t k0 = 0; k0 < n; k0 += NB) {
        size_t k1 = k0 + NB;
        for (size_t j = k0; j < k1; j++) {
            double *Aj = A + j * la;
            double d = Aj[j] - dot(Aj + k0, Aj + k0, j - k0, avx2);
            if (!(d > 0) || !isfinite(d))
                return j;
            Aj[j] = sqrt(d);
            for (size_t i = j + 1; i < k1; i++) {
                double *Ai = A + i * la;
                Ai[j] = (Ai[j] - dot(Ai + k0, Aj + k0, j - k0, avx2)) / Aj[j];
            }
        }
        if (k1 == n)
            break;
#pragma omp parallel for schedule(static) PAR((n - k1) * NB * NB / 2)
        for (size_t i = k1; i < n; i++) {
            double *Ai = A + i * la;
            for (size_t j = k0; j < k1; j++)
                Ai[j] = (Ai[j] - dot(Ai + k0, A + j * la + k0, j - k0, avx2)) / A[j * la + j];
            for (size_t p = 0; p < NB; p++)
                PT[p * la + i] = Ai[k0 + p];
        }
        size_t nb = (n - k1) / NB;
#pragma omp parallel for schedule(dynamic, 1) PAR(nb *(nb + 1) / 2 * NB * NB * NB)
        for (size_t t = 0; t < nb * nb; t++) {
            size_t I = t / nb, J = t % nb;
            if (J > I)
                continue;
            size_t i0 = k1 + I * NB, j0 = k1 + J * NB;
            blk_f64(A + i0 * la + j0, la, A + i0 * la + k0, la, PT + j0, la, -1.0, avx2);
        }
    }
    return n;
}

/* L^-1 in place of the lower triangle of A (n x n, rows la apart), block row
 * by block row: X[I,J] = -L[I,I]^-1 sum_{P=J..I-1} L[I,P] X[P,J]. The upper
 * triangles of the diagonal blocks come out zero (they are read as
 * operands); the blocks above them are never read. T: NB x la scratch, D:
 * NB x NB. */
static void trtri_lower(double *A, size_t n, size_t la, double *T, double *D, int avx2)
{
    for (size_t I = 0; I < n / NB; I++) {
        size_t i0 = I * NB;
        const double *L = A + i0 * la + i0;
        /* D = L[I,I]^-1 by forward substitution, zeros above the diagonal */
        memset(D, 0, NB * NB * sizeof *D);
        for (size_t i = 0; i < NB; i++) {
            D[i * NB + i] = 1 / L[i * la + i];
            for (size_t j = 0; j < i; j++) {
                double s = 0;
                for (size_t p = j; p < i; p++)
                    s += L[i * la + p] * D[p * NB + j];
                D[i * NB + j] = -s * D[i * NB + i];
            }
        }
        /* All of row I's sums first: they read L[I,P], which the second
         * loop overwrites with X[I,P]. */
#pragma omp parallel for schedule(dynamic, 1) PAR(I *(I + 1) / 2 * NB * NB * NB)
        for (size_t J = 0; J < I; J++) {
            double *Tj = T + J * NB;
            for (size_t r = 0; r < NB; r++)
                memset(Tj + r * la, 0, NB * sizeof *Tj);
            for (size_t P = J; P < I; P++)
                blk_f64(Tj, la, A + i0 * la + P * NB, la, A + P * NB * la + J * NB, la, 1.0, avx2);
        }
#pragma omp parallel for schedule(static) PAR(I *NB *NB *NB)
        for (size_t J = 0; J < I; J++) {
            double *X = A + i0 * la + J * NB;
            for (size_t r = 0; r < NB; r++)
                memset(X + r * la, 0, NB * sizeof *X);
            blk_f64(X, la, D, NB, T + J * NB, la, -1.0, avx2);
        }
        for (size_t r = 0; r < NB; r++)
            memcpy(A + (i0 + r) * la + i0, D + r * NB, NB * sizeof *D);
    }
}

/* Hp's dead channels, damping and U (K x ld floats, ld = K rounded up to 16
 * plus 16, zero past column K and below the diagonal). Checks H as the
 * header says; *U and *dead are the caller's to free. */
static int gptq_factor(const float *H, size_t K, const uint32_t *perm, double damp, int avx2,
                       float **Uout, size_t *ldout, uint8_t **deadout)
{
    *Uout = NULL, *deadout = NULL;
    /* Rows la = n + 8 doubles apart: at n * 8 bytes (a multiple of 1 KiB)
     * the 128 rows of a column strip fell into one L1 set and the
     * factorization ran at a third of its speed. */
    size_t n = round_up(K, NB), la = n + 8, ld = round_up(K, 16) + 16, t;
    if (__builtin_mul_overflow(n, la, &t) || __builtin_mul_overflow(t, sizeof(double), &t) ||
        __builtin_mul_overflow(K, ld, &t) || __builtin_mul_overflow(t, sizeof(float), &t))
        return qs_seterr(QS_EOVERFLOW, "GPTQ's %zu x %zu inverse Hessian overflows size_t", K, K);
    uint8_t *dead = malloc(K);
    double *A = malloc(n * la * sizeof *A), *T = malloc((NB * la + NB * NB) * sizeof *T);
    float *U = NULL;
    int err = QS_OK;
    if (!dead || !A || !T) {
        err =
            qs_seterr(QS_ENOMEM, "out of memory for GPTQ's %zu x %zu float64 Hessian factor", K, K);
        goto out;
    }
    double sum = 0;
    size_t live = 0;
    for (size_t a = 0; a < K; a++) {
        size_t c = perm ? perm[a] : a;
        float h = H[c * K + c];
        if (!isfinite(h) || h < 0) {
            err = qs_seterr(QS_EINVAL,
                            "Hessian diagonal [%zu] is %g: H must be X^T X of finite "
                            "calibration inputs (qs_hessian_add), finite and never negative; "
                            "record it again",
                            c, (double)h);
            goto out;
        }
        dead[a] = h == 0;
        live += !dead[a];
        sum += dead[a] ? 1.0 : h;
    }
    if (!live) {
        err = qs_seterr(QS_EINVAL, "the Hessian is zero: record calibration inputs with "
                                   "qs_hessian_add before GPTQ");
        goto out;
    }
    double add = damp * sum / (double)K;
    int bad = 0;
#pragma omp parallel for schedule(dynamic, 16) reduction(| : bad) PAR(n *n * 4)
    for (size_t i = 0; i < n; i++) {
        double *Ai = A + i * la;
        for (size_t j = 0; j <= i; j++) {
            double v = i == j;
            if (i < K) {
                size_t a = K - 1 - i, b = K - 1 - j; /* a <= b */
                size_t pa = perm ? perm[a] : a, pb = perm ? perm[b] : b;
                float h = pa <= pb ? H[pa * K + pb] : H[pb * K + pa];
                bad |= !isfinite(h);
                v = a == b ? (dead[a] ? 1.0 : h) + add : h;
            }
            Ai[j] = v;
        }
    }
    if (bad) {
        for (size_t i = 0; i < K; i++)
            for (size_t j = i; j < K; j++)
                if (!isfinite(H[i * K + j])) {
                    err = qs_seterr(QS_EINVAL,
                                    "Hessian entry [%zu, %zu] is %g: record it again from "
                                    "finite calibration inputs",
                                    i, j, (double)H[i * K + j]);
                    goto out;
                }
    }
    size_t piv = chol_lower(A, n, la, T, avx2);
    if (piv < n) {
        size_t a = K - 1 - piv;
        err = qs_seterr(QS_EINVAL,
                        "the Hessian is not positive definite even after damping (at input "
                        "channel %zu): H must be X^T X from qs_hessian_add; raise "
                        "qs_gptq_opts.damp (now %g) if it is",
                        perm ? (size_t)perm[a] : a, damp);
        goto out;
    }
    trtri_lower(A, n, la, T, T + NB * la, avx2);
    U = calloc(K * ld, sizeof *U);
    if (!U) {
        err =
            qs_seterr(QS_ENOMEM, "out of memory for GPTQ's %zu x %zu inverse Hessian factor", K, K);
        goto out;
    }
#pragma omp parallel for schedule(static) PAR(K *K * 4)
    for (size_t i = 0; i < K; i++)
        for (size_t j = i; j < K; j++)
            U[i * ld + j] = (float)A[(K - 1 - i) * la + (K - 1 - j)];
out:
    free(A);
    free(T);
    if (err) {
        free(dead);
        return err;
    }
    *Uout = U, *ldout = ld, *deadout = dead;
    return QS_OK;
}

/* ---- Grids ------------------------------------------------------------------ */

enum { GRID_BCQ, GRID_RTN, GRID_W4 };

/* Groups in position order: of gs positions up to K4 (the last one ragged
 * for W4), then the W4 outliers [K4, K) as one group whose int8 scale per
 * row is set up front from the original weights. */
typedef struct grid {
    int kind;
    unsigned q, iters;
    size_t gs; /* group size in positions (K for one group per row) */
    size_t K4; /* W4: the first outlier position; K otherwise */
    size_t K;
} grid;

/* One row's grid for its current group. BCQ and RTN (lim 0): the 2^q levels,
 * ascending, each as the dequantizer computes it, so the values chosen are
 * the stored ones. W4: s * c for the codes c in -lim..lim. */
typedef struct rowgrid {
    unsigned nl;
    int lim;
    float s;
    float lv[256];
    double mid[255]; /* (lv[m] + lv[m + 1]) / 2, exact in float64 */
    uint8_t code[256];
} rowgrid;

static size_t group_start(const grid *g, size_t j)
{
    return j >= g->K4 ? g->K4 : j / g->gs * g->gs;
}

static size_t group_end(const grid *g, size_t j0)
{
    return j0 >= g->K4 ? g->K : (j0 + g->gs < g->K4 ? j0 + g->gs : g->K4);
}

/* The block from b0: BLK columns, cut at the last group start inside when
 * that group would run past the block (its fit needs its columns updated by
 * all the columns before it, and only a block's own columns are). */
static size_t block_end(const grid *g, size_t b0, size_t K)
{
    size_t b1 = b0 + BLK < K ? b0 + BLK : K, s = group_start(g, b1 - 1);
    return s > b0 && group_end(g, s) > b1 ? s : b1;
}

/* BCQ levels z + sum_i +-alpha_i, summed as qs_bcq_dequant sums them. */
static void bcq_levels(const uint16_t *alpha, uint16_t z, unsigned q, rowgrid *rg)
{
    double a[8], z0 = qs_fp16_to_fp32(z);
    for (unsigned i = 0; i < q; i++)
        a[i] = qs_fp16_to_fp32(alpha[i]);
    rg->nl = 1u << q, rg->lim = 0;
    for (unsigned c = 0; c < rg->nl; c++) {
        double v = z0;
        for (unsigned i = 0; i < q; i++)
            v += (c >> i & 1u) ? a[i] : -a[i];
        float f = (float)v;
        unsigned j = c; /* insertion: equal levels keep code order */
        for (; j > 0 && rg->lv[j - 1] > f; j--)
            rg->lv[j] = rg->lv[j - 1], rg->code[j] = rg->code[j - 1];
        rg->lv[j] = f, rg->code[j] = (uint8_t)c;
    }
    for (unsigned m = 0; m + 1 < rg->nl; m++)
        rg->mid[m] = 0.5 * ((double)rg->lv[m] + rg->lv[m + 1]);
}

/* The nearest level to w (the lower of two as near): the number of
 * midpoints below w, by a branch-free binary search (the search was 40% of
 * GPTQ's time at K = 576 with branches). W4: s * (float)c as qs_w4_dequant
 * computes it, c = w / s rounded to even and clamped (at an exact midpoint
 * the division's rounding may pick the farther of two levels). */
static float rg_round(const rowgrid *rg, float w, int *code)
{
    if (rg->lim) {
        float c = rg->s > 0 ? nearbyintf(w / rg->s) : 0, m = (float)rg->lim;
        c = c > m ? m : (c < -m ? -m : c);
        *code = (int)c;
        return rg->s * (float)*code; /* (float)(int): -0.0 codes are 0, as stored */
    }
    const double *b = rg->mid, x = w;
    unsigned n = rg->nl - 1;
    while (n > 1) {
        unsigned half = n / 2;
        b = b[half] < x ? b + half : b;
        n -= half;
    }
    unsigned i = (unsigned)(b - rg->mid) + (b[0] < x);
    *code = rg->code[i];
    return rg->lv[i];
}

/* Outputs, written as groups are fitted (BCQ alpha and z into bcq, W4 s4
 * [N][ng]; W4 s8 [N] up front) and as columns are rounded (codes N x K in
 * position order, BCQ's into codes, W4's into codes8; the values chosen into
 * Wq, original order). */
typedef struct gptq_out {
    qs_bcq *bcq;
    uint8_t *codes;
    int8_t *codes8;
    float *s4, *s8;
    size_t ng;
    float *Wq;
} gptq_out;

typedef struct row_ws {
    qs_bcq_fitter *ft;
    uint8_t *fit_codes; /* gs */
} row_ws;

/* Row n's grid for the group starting at position j0, from its current
 * weights w (group_end - j0 of them). */
static void fit_row(const grid *g, row_ws *ws, const float *w, size_t j0, size_t n,
                    const gptq_out *o, rowgrid *rg)
{
    size_t len = group_end(g, j0) - j0, gi = j0 / g->gs;
    if (g->kind == GRID_W4) {
        rg->nl = 0;
        if (j0 >= g->K4) {
            rg->s = o->s8[n], rg->lim = 127;
        } else {
            rg->s = o->s4[n * o->ng + gi] = qs_w4_fit_group(w, len, (int8_t *)ws->fit_codes);
            rg->lim = 7;
        }
        return;
    }
    uint16_t a[8], z;
    if (g->kind == GRID_BCQ)
        qs_bcq_fit_group(ws->ft, w, len, g->q, g->iters, ws->fit_codes, a, &z);
    else
        qs_rtn_grid(w, len, g->q, a, &z);
    for (unsigned i = 0; i < g->q; i++)
        o->bcq->alpha[qs_bcq_alpha_index(o->bcq, i, n, gi)] = a[i];
    o->bcq->z[qs_bcq_z_index(o->bcq, n, gi)] = z;
    bcq_levels(a, z, g->q, rg);
}

static void put(const gptq_out *o, size_t n, size_t K, size_t j, size_t col, int code, float v)
{
    if (o->codes8)
        o->codes8[n * K + j] = (int8_t)code;
    else
        o->codes[n * K + j] = (uint8_t)code;
    if (o->Wq)
        o->Wq[n * K + col] = v;
}

/* The outliers' int8 scale of one row, as qs_w4_quantize sets it. */
static float w4_s8(const float *v, size_t n)
{
    float mx = 0;
    for (size_t k = 0; k < n; k++)
        mx = fmaxf(mx, fabsf(v[k]));
    return mx >= FLT_MIN ? mx / 127.0f : 0;
}

/* ---- The column loop ---------------------------------------------------------- */

/* Rows n0 .. n0 + rows - 1 (rows <= R, R % 4 == 0) through every column. */
static void gptq_rows(const grid *g, const float *W, size_t K, const uint32_t *perm,
                      const uint8_t *dead, const float *U, size_t ld, size_t n0, size_t rows,
                      size_t R, float *Wc, float *E, rowgrid *rg, row_ws *ws, const gptq_out *o,
                      int avx2)
{
    for (size_t r = 0; r < R; r++) {
        float *wr = Wc + r * ld;
        memset(wr, 0, ld * sizeof *wr);
        if (r < rows)
            for (size_t j = 0; j < K; j++)
                wr[j] = dead[j] ? 0 : W[(n0 + r) * K + (perm ? perm[j] : j)];
        if (r < rows && g->kind == GRID_W4 && g->K4 < K)
            o->s8[n0 + r] = w4_s8(wr + g->K4, K - g->K4);
    }
    for (size_t b0 = 0, b1; b0 < K; b0 = b1) {
        b1 = block_end(g, b0, K);
        for (size_t j = b0; j < b1; j++) {
            if (group_start(g, j) == j)
                for (size_t r = 0; r < rows; r++)
                    fit_row(g, ws, Wc + r * ld + j, j, n0 + r, o, &rg[r]);
            const float *uj = U + j * ld;
            float d = uj[j];
            for (size_t r = 0; r < R; r++) {
                float *wr = Wc + r * ld, e = 0;
                if (r < rows) {
                    int code;
                    float v = rg_round(&rg[r], wr[j], &code);
                    put(o, n0 + r, K, j, perm ? perm[j] : j, code, v);
                    e = (wr[j] - v) / d;
                }
                E[r * BLK + j - b0] = e;
                if (e != 0)
                    axpy(wr + j + 1, uj + j + 1, -e, b1 - j - 1, avx2);
            }
        }
        if (b1 < K) /* the block's errors onto the rest of the rows at once */
            gemm_f32(R, round_up(K - b1, 16), b1 - b0, -1.0f, E, BLK, 1, U + b0 * ld + b1, ld,
                     Wc + b1, ld, avx2);
    }
}

static int gptq_run(const grid *g, const float *W, size_t N, size_t K, const uint32_t *perm,
                    const uint8_t *dead, const float *U, size_t ld, const gptq_out *o)
{
    int avx2 = qs_cpu_path_id() >= QS_PATH_AVX2;
    /* Chunks of R rows: large enough to reuse each U block across rows,
     * small enough that every thread gets a few. */
    size_t R = 64, threads = (size_t)omp_get_max_threads();
    while (R > 8 && (N + R - 1) / R < 4 * threads)
        R /= 2;
    size_t chunks = (N + R - 1) / R;
    int nomem = 0;
#pragma omp parallel reduction(| : nomem)
    {
        float *Wc = malloc(R * ld * sizeof *Wc), *E = malloc(R * BLK * sizeof *E);
        rowgrid *rg = malloc(R * sizeof *rg);
        row_ws ws = {NULL, NULL};
        if (g->kind == GRID_BCQ)
            ws.ft = qs_bcq_fitter_new(g->gs);
        ws.fit_codes = malloc(g->gs);
        nomem = !Wc || !E || !rg || !ws.fit_codes || (g->kind == GRID_BCQ && !ws.ft);
#pragma omp for schedule(dynamic, 1)
        for (size_t c = 0; c < chunks; c++) {
            if (nomem)
                continue;
            size_t n0 = c * R, rows = N - n0 < R ? N - n0 : R;
            gptq_rows(g, W, K, perm, dead, U, ld, n0, rows, R, Wc, E, rg, &ws, o, avx2);
        }
        free(Wc);
        free(E);
        free(rg);
        qs_bcq_fitter_free(ws.ft);
        free(ws.fit_codes);
    }
    if (nomem)
        return qs_seterr(QS_ENOMEM, "out of memory for GPTQ's per-thread rows (%zu x %zu floats)",
                         R, ld);
    return QS_OK;
}

static int check_damp(const qs_gptq_opts *opts, double *damp)
{
    *damp = opts && opts->damp != 0 ? opts->damp : 0.01;
    if (!(*damp > 0) || !isfinite(*damp))
        return qs_seterr(QS_EINVAL,
                         "GPTQ damping %g is not a positive fraction of the mean Hessian "
                         "diagonal: pass 0 for the default 0.01",
                         *damp);
    return QS_OK;
}

int qs_gptq_bcq(qs_bcq *out, const float *W, size_t N, size_t K, const float *H, unsigned q,
                size_t g, unsigned iters, int uniform, const qs_gptq_opts *opts)
{
    if (!out || !W || !H)
        return qs_seterr(QS_EINVAL, "qs_gptq_bcq got a NULL pointer: pass the output struct, "
                                    "the N x K weights and the K x K Hessian");
    memset(out, 0, sizeof *out);
    double damp;
    int err = qs_bcq_check(N, K, q, g);
    if (err || (err = check_damp(opts, &damp)) || (err = qs_check_weights(W, N, K)))
        return err;
    grid gr = {uniform ? GRID_RTN : GRID_BCQ, q, iters ? iters : 20, g ? g : K, K, K};
    float *U = NULL;
    size_t ld = 0;
    uint8_t *dead = NULL, *codes = NULL;
    if ((err = gptq_factor(H, K, NULL, damp, qs_cpu_path_id() >= QS_PATH_AVX2, &U, &ld, &dead)))
        return err;
    if (!(codes = malloc(N * K))) {
        err = qs_seterr(QS_ENOMEM, "out of memory for GPTQ codes of a %zu x %zu matrix", N, K);
        goto out;
    }
    if ((err = qs_bcq_init(out, N, K, q, g)))
        goto out;
    gptq_out o = {out, codes, NULL, NULL, NULL, 0, opts ? opts->Wq : NULL};
    if ((err = gptq_run(&gr, W, N, K, NULL, dead, U, ld, &o)))
        goto out;
    qs_bcq_pack_codes(out, codes);
out:
    if (err)
        qs_bcq_close(out);
    free(U);
    free(dead);
    free(codes);
    return err;
}

/* W4's shape, and perm a permutation (GPTQ reads H and W through it before
 * qs_w4_from_codes would check it). */
static int w4_args(size_t N, size_t K, const uint32_t *perm, size_t ko, size_t group, qs_w4_dims *d)
{
    int err = qs_w4_shape(N, K, ko, group, d);
    if (err || !perm)
        return err;
    uint8_t *seen = calloc(K, 1);
    if (!seen)
        return qs_seterr(QS_ENOMEM, "out of memory checking a W4 permutation of %zu", K);
    for (size_t j = 0; j < K && !err; j++) {
        if (perm[j] >= K || seen[perm[j]])
            err = qs_seterr(QS_EINVAL,
                            "perm is not a permutation of 0..%zu: perm[%zu] = %u %s; list every "
                            "input channel exactly once (outliers last)",
                            K - 1, j, (unsigned)perm[j],
                            perm[j] < K ? "appears twice" : "is out of range");
        else
            seen[perm[j]] = 1;
    }
    free(seen);
    return err;
}

int qs_gptq_w4(qs_w4 *out, const float *W, size_t N, size_t K, const float *H, const uint32_t *perm,
               size_t ko, size_t group, const qs_gptq_opts *opts)
{
    if (!out || !W || !H)
        return qs_seterr(QS_EINVAL, "qs_gptq_w4 got a NULL pointer: pass the output struct, the "
                                    "N x K weights and the K x K Hessian");
    memset(out, 0, sizeof *out);
    double damp;
    qs_w4_dims d;
    int err = w4_args(N, K, perm, ko, group, &d);
    if (err || (err = check_damp(opts, &damp)) || (err = qs_check_weights(W, N, K)))
        return err;
    grid gr = {GRID_W4, 4, 0, d.G, d.K4, K};
    float *U = NULL, *s4 = NULL, *s8 = NULL;
    size_t ld = 0;
    uint8_t *dead = NULL;
    int8_t *codes = NULL;
    if ((err = gptq_factor(H, K, perm, damp, qs_cpu_path_id() >= QS_PATH_AVX2, &U, &ld, &dead)))
        return err;
    codes = malloc(N * K);
    s4 = calloc(N * (d.ng ? d.ng : 1), sizeof *s4);
    s8 = calloc(N, sizeof *s8);
    if (!codes || !s4 || !s8) {
        err = qs_seterr(QS_ENOMEM, "out of memory for GPTQ codes of a %zu x %zu matrix", N, K);
        goto out;
    }
    gptq_out o = {NULL, NULL, codes, s4, s8, d.ng, opts ? opts->Wq : NULL};
    if (!(err = gptq_run(&gr, W, N, K, perm, dead, U, ld, &o)))
        err = qs_w4_from_codes(out, codes, s4, s8, N, K, perm, ko, group);
out:
    free(U), free(dead), free(codes), free(s4), free(s8);
    return err;
}

/* ---- The float64 reference ------------------------------------------------------ */

/* Unblocked lower Cholesky of the n x n A in place; the failing row or n. */
static size_t chol_plain(double *A, size_t n)
{
    for (size_t j = 0; j < n; j++) {
        double d = A[j * n + j];
        for (size_t p = 0; p < j; p++)
            d -= A[j * n + p] * A[j * n + p];
        if (!(d > 0) || !isfinite(d))
            return j;
        A[j * n + j] = sqrt(d);
        for (size_t i = j + 1; i < n; i++) {
            double s = A[i * n + j];
            for (size_t p = 0; p < j; p++)
                s -= A[i * n + p] * A[j * n + p];
            A[i * n + j] = s / A[j * n + j];
        }
        for (size_t i = 0; i < j; i++)
            A[i * n + j] = 0;
    }
    return n;
}

/* U (K x K, upper, row-major) of the paper: Cholesky of H, H^-1 from it,
 * upper Cholesky of H^-1. H here is Hp, damped, dead channels at 1. */
static int ref_uinv(double *Hd, size_t K, double *U)
{
    if (chol_plain(Hd, K) < K)
        return qs_seterr(QS_EINVAL, "the Hessian is not positive definite even after damping: "
                                    "H must be X^T X from qs_hessian_add");
    /* Li = L^-1 (lower), by columns */
    double *Li = calloc(K * K, sizeof *Li);
    if (!Li)
        return qs_seterr(QS_ENOMEM, "out of memory for the GPTQ reference");
    for (size_t j = 0; j < K; j++) {
        Li[j * K + j] = 1 / Hd[j * K + j];
        for (size_t i = j + 1; i < K; i++) {
            double s = 0;
            for (size_t p = j; p < i; p++)
                s += Hd[i * K + p] * Li[p * K + j];
            Li[i * K + j] = -s / Hd[i * K + i];
        }
    }
    /* H^-1 = Li^T Li into Hd, then its lower Cholesky; U is its transpose */
    for (size_t i = 0; i < K; i++)
        for (size_t j = 0; j <= i; j++) {
            double s = 0;
            for (size_t p = i; p < K; p++)
                s += Li[p * K + i] * Li[p * K + j];
            Hd[i * K + j] = Hd[j * K + i] = s;
        }
    free(Li);
    if (chol_plain(Hd, K) < K)
        return qs_seterr(QS_EINVAL, "the inverse Hessian is not positive definite: H is too "
                                    "ill-conditioned; raise the damping");
    for (size_t i = 0; i < K; i++)
        for (size_t j = 0; j < K; j++)
            U[i * K + j] = j >= i ? Hd[j * K + i] : 0;
    return QS_OK;
}

/* Hp damped with dead channels at 1 (float64, full), and the dead flags. */
static int ref_hessian(const float *H, size_t K, const uint32_t *perm, double damp, double *Hd,
                       uint8_t *dead)
{
    double sum = 0;
    size_t live = 0;
    for (size_t a = 0; a < K; a++) {
        size_t c = perm ? perm[a] : a;
        for (size_t b = 0; b < K; b++) {
            size_t d = perm ? perm[b] : b;
            float h = c <= d ? H[c * K + d] : H[d * K + c];
            if (!isfinite(h) || (a == b && h < 0))
                return qs_seterr(QS_EINVAL, "Hessian entry [%zu, %zu] is %g", c, d, (double)h);
            Hd[a * K + b] = h;
        }
        dead[a] = Hd[a * K + a] == 0;
        if (dead[a])
            Hd[a * K + a] = 1;
        live += !dead[a];
        sum += Hd[a * K + a];
    }
    if (!live)
        return qs_seterr(QS_EINVAL, "the Hessian is zero: record calibration inputs first");
    for (size_t a = 0; a < K; a++)
        Hd[a * K + a] += damp * sum / (double)K;
    return QS_OK;
}

/* The unblocked column loop in float64 over the paper's U, the same grids
 * and outputs as gptq_rows. */
static int ref_run(const grid *gr, const float *W, size_t N, size_t K, const float *H,
                   const uint32_t *perm, double damp, const gptq_out *o)
{
    double *Hd = malloc(K * K * sizeof *Hd), *U = malloc(K * K * sizeof *U),
           *w = malloc(K * sizeof *w);
    uint8_t *dead = malloc(K);
    float *wf = malloc(K * sizeof *wf);
    row_ws ws = {gr->kind == GRID_BCQ ? qs_bcq_fitter_new(gr->gs) : NULL, malloc(gr->gs)};
    int err = QS_OK;
    if (!Hd || !U || !w || !dead || !wf || !ws.fit_codes || (gr->kind == GRID_BCQ && !ws.ft)) {
        err = qs_seterr(QS_ENOMEM, "out of memory for the GPTQ reference");
        goto out;
    }
    if ((err = ref_hessian(H, K, perm, damp, Hd, dead)) || (err = ref_uinv(Hd, K, U)))
        goto out;
    rowgrid rg;
    for (size_t n = 0; n < N; n++) {
        for (size_t j = 0; j < K; j++)
            w[j] = dead[j] ? 0 : W[n * K + (perm ? perm[j] : j)];
        if (gr->kind == GRID_W4 && gr->K4 < K) {
            for (size_t j = gr->K4; j < K; j++)
                wf[j] = (float)w[j];
            o->s8[n] = w4_s8(wf + gr->K4, K - gr->K4);
        }
        for (size_t j = 0; j < K; j++) {
            if (group_start(gr, j) == j) {
                for (size_t k = j; k < group_end(gr, j); k++)
                    wf[k] = (float)w[k];
                fit_row(gr, &ws, wf + j, j, n, o, &rg);
            }
            int code;
            float v = rg_round(&rg, (float)w[j], &code);
            put(o, n, K, j, perm ? perm[j] : j, code, v);
            double e = (w[j] - v) / U[j * K + j];
            for (size_t k = j + 1; k < K; k++)
                w[k] -= e * U[j * K + k];
        }
    }
out:
    qs_bcq_fitter_free(ws.ft);
    free(ws.fit_codes);
    free(Hd), free(U), free(w), free(dead), free(wf);
    return err;
}

int qs_gptq_bcq_ref_f64(const float *W, size_t N, size_t K, const float *H, unsigned q, size_t g,
                        unsigned iters, int uniform, double damp, float *Wq)
{
    if (!W || !H || !Wq)
        return qs_seterr(QS_EINVAL, "qs_gptq_bcq_ref_f64 got a NULL pointer: pass the weights, "
                                    "the Hessian and an N x K output");
    qs_gptq_opts opts = {damp, NULL};
    int err = qs_bcq_check(N, K, q, g);
    if (err || (err = check_damp(&opts, &damp)) || (err = qs_check_weights(W, N, K)))
        return err;
    grid gr = {uniform ? GRID_RTN : GRID_BCQ, q, iters ? iters : 20, g ? g : K, K, K};
    qs_bcq tmp; /* holds the alphas and offsets the fits write */
    uint8_t *codes = malloc(N * K);
    if (!codes)
        return qs_seterr(QS_ENOMEM, "out of memory for the GPTQ reference");
    if (!(err = qs_bcq_init(&tmp, N, K, q, g))) {
        gptq_out o = {&tmp, codes, NULL, NULL, NULL, 0, Wq};
        err = ref_run(&gr, W, N, K, H, NULL, damp, &o);
    }
    qs_bcq_close(&tmp);
    free(codes);
    return err;
}

int qs_gptq_w4_ref_f64(const float *W, size_t N, size_t K, const float *H, const uint32_t *perm,
                       size_t ko, size_t group, double damp, float *Wq)
{
    if (!W || !H || !Wq)
        return qs_seterr(QS_EINVAL, "qs_gptq_w4_ref_f64 got a NULL pointer: pass the weights, "
                                    "the Hessian and an N x K output");
    qs_gptq_opts opts = {damp, NULL};
    qs_w4_dims d;
    int err = w4_args(N, K, perm, ko, group, &d);
    if (err || (err = check_damp(&opts, &damp)) || (err = qs_check_weights(W, N, K)))
        return err;
    grid gr = {GRID_W4, 4, 0, d.G, d.K4, K};
    int8_t *codes = malloc(N * K);
    float *s4 = calloc(N * (d.ng ? d.ng : 1), sizeof *s4), *s8 = calloc(N, sizeof *s8);
    if (!codes || !s4 || !s8)
        err = qs_seterr(QS_ENOMEM, "out of memory for the GPTQ reference");
    else {
        gptq_out o = {NULL, NULL, codes, s4, s8, d.ng, Wq};
        err = ref_run(&gr, W, N, K, H, perm, damp, &o);
    }
    free(codes), free(s4), free(s8);
    return err;
}
