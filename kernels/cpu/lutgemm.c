/* lutgemm.c: LUT-GEMM over BCQ weights, Y[M x N] = X[M x K] W^T, never
 * dequantizing W:
 *     y[m,n] = sum_i alpha[i,n,G] (B_i[n,:] . x[m,:]) + sum_G z[n,G] sum_{k in G} x[m,k].
 *
 *   X  M x K fp32 row-major, Y M x N fp32 row-major, W  qs_bcq (qs_kernels.h)
 *
 * B_i . x is read from look-up tables: for every run of mu = 4 inputs the 16
 * signed sums +-x0 +-x1 +-x2 +-x3 are computed once per token, and every
 * 4-bit nibble of a bit-plane word becomes one table read.
 *
 * Why mu = 4 and int8 tables (T-MAC's AVX2 design, not the paper's mu = 8 fp
 * tables): a 16-entry int8 table fits one 128-bit lane, so vpshufb does 32
 * look-ups (32 rows) per instruction; fp tables need a scalar load per
 * look-up. At batch 1 the fp path is compute bound far above the DRAM floor
 * (docs/benchmarks.md, "CPU kernels", has the measurements).
 *
 * Table quantization and its error bound: the tables of one block of kb
 * columns (kb = 256, or the largest of 256/128/64/32 dividing g) share one
 * scale s = max|T| / 127 and hold round(T / s), so each read is off by at
 * most s / 2 and
 *     |y - y_exact| <= sum_i sum_blocks |alpha| * nl * s / 2,
 * nl = look-ups per row in the block (kb / 4). qs_lutgemm_err_bound returns
 * it and the tests check it. Sums stay in int16: nl <= 64 reads of at most
 * 255 (the tables are stored as u8 = T + 128) give 16320 < 32768.
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

#define MAX_M 64 /* tokens per table pass: 64 x K/4 x 16 bytes of tables */

/* Per-token look-up tables and sums for one batch chunk. */
typedef struct luts {
    size_t nk4, nb, kb, ng, gs; /* runs of 4, table blocks, block cols, groups, group cols */
    uint8_t *t;                 /* [M][nk4][16], u8 = round(T / s) + 128 */
    float *s;                   /* [M][nb] block scales (NaN if the block held NaN/Inf) */
    float *xsum;                /* [M][ng] sum of x per group, for z */
} luts;

static size_t table_block(size_t g)
{
    size_t kb = 256;
    while (g && g % kb)
        kb /= 2;
    return kb;
}

static void luts_free(luts *L)
{
    free(L->t);
    free(L->s);
    free(L->xsum);
}

/* Table block of one token, scalar: T for runs [r0, r1), their shared
 * scale, u8 codes. Columns past K read as 0. */
static void block_scalar(const float *x, size_t K, size_t r0, size_t r1, uint8_t *t, float *sc)
{
    float f[64][16], mx = 0;
    int bad = 0;
    for (size_t r = r0; r < r1; r++) {
        float v[4], *T = f[r - r0];
        for (int j = 0; j < 4; j++)
            v[j] = 4 * r + j < K ? x[4 * r + j] : 0;
        T[0] = -(v[0] + v[1] + v[2] + v[3]);
        for (int j = 0; j < 4; j++) /* setting bit j flips -x_j to +x_j */
            for (int p = 0; p < (1 << j); p++)
                T[p | 1 << j] = T[p] + 2 * v[j];
        for (int p = 0; p < 16; p++) {
            bad |= !isfinite(T[p]);
            mx = fmaxf(mx, fabsf(T[p]));
        }
    }
    float inv = mx > 0 ? 127.0f / mx : 0;
    *sc = bad ? NAN : mx / 127.0f;
    for (size_t r = r0; r < r1; r++)
        for (int p = 0; p < 16; p++) {
            float c = nearbyintf(f[r - r0][p] * inv);
            c = !(c >= -127) ? -127 : (c > 127 ? 127 : c); /* NaN lands at -127 */
            t[(r - r0) * 16 + p] = (uint8_t)(int)(c + 128);
        }
}

/* The same with AVX2: T[0..7] and T[8..15] are four FMAs each against
 * constant +-1 sign vectors. Only for blocks wholly inside K. */
static __attribute__((target("avx2,fma"))) void block_avx2(const float *x, size_t r0, size_t r1,
                                                           uint8_t *t, float *sc)
{
    const __m256 s0 = _mm256_setr_ps(-1, 1, -1, 1, -1, 1, -1, 1);
    const __m256 s1 = _mm256_setr_ps(-1, -1, 1, 1, -1, -1, 1, 1);
    const __m256 s2 = _mm256_setr_ps(-1, -1, -1, -1, 1, 1, 1, 1);
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 inf = _mm256_set1_ps(INFINITY);
    __m256 f[64][2], mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (size_t r = r0; r < r1; r++) {
        __m256 x0 = _mm256_broadcast_ss(x + 4 * r), x1 = _mm256_broadcast_ss(x + 4 * r + 1);
        __m256 x2 = _mm256_broadcast_ss(x + 4 * r + 2), x3 = _mm256_broadcast_ss(x + 4 * r + 3);
        __m256 lo = _mm256_fmadd_ps(x2, s2, _mm256_fmadd_ps(x1, s1, _mm256_mul_ps(x0, s0)));
        __m256 a = _mm256_sub_ps(lo, x3), b = _mm256_add_ps(lo, x3); /* bit 3: -x3 / +x3 */
        f[r - r0][0] = a, f[r - r0][1] = b;
        __m256 aa = _mm256_and_ps(a, absm), ab = _mm256_and_ps(b, absm);
        mx = _mm256_max_ps(mx, _mm256_max_ps(aa, ab));
        bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(aa, inf, _CMP_NLT_UQ),
                                             _mm256_cmp_ps(ab, inf, _CMP_NLT_UQ)));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float m = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
    *sc = _mm256_movemask_ps(bad) ? NAN : m / 127.0f;
    const __m256 inv = _mm256_set1_ps(m > 0 ? 127.0f / m : 0);
    const __m256i lo127 = _mm256_set1_epi32(-127), hi127 = _mm256_set1_epi32(127);
    const __m256i off = _mm256_set1_epi32(128);
    for (size_t r = r0; r < r1; r++) {
        __m256i q[2];
        for (int h = 0; h < 2; h++) { /* round to nearest even, clamp, +128 */
            __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(f[r - r0][h], inv));
            q[h] = _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(v, lo127), hi127), off);
        }
        __m128i w0 =
            _mm_packs_epi32(_mm256_castsi256_si128(q[0]), _mm256_extracti128_si256(q[0], 1));
        __m128i w1 =
            _mm_packs_epi32(_mm256_castsi256_si128(q[1]), _mm256_extracti128_si256(q[1], 1));
        _mm_store_si128((__m128i *)(t + (r - r0) * 16), _mm_packus_epi16(w0, w1));
    }
}

/* Builds the tables of M tokens: K/4 x 16 entries per token, against
 * N x K/4 x q reads in the GEMM. */
static int luts_make(const qs_bcq *w, const float *X, size_t M, luts *L)
{
    size_t K = w->K, nw = (K + 31) / 32;
    L->nk4 = nw * 8, L->kb = table_block(w->g), L->nb = (nw * 32 + L->kb - 1) / L->kb;
    L->ng = qs_bcq_ngroups(K, w->g), L->gs = w->g ? w->g : K;
    L->t = aligned_alloc(64, (M * L->nk4 * 16 + 63) / 64 * 64);
    L->s = malloc(M * L->nb * sizeof(float));
    L->xsum = malloc(M * L->ng * sizeof(float));
    if (!L->t || !L->s || !L->xsum) {
        luts_free(L);
        return qs_seterr(QS_ENOMEM, "out of memory for LUT-GEMM tables of %zu tokens", M);
    }
    int simd = qs_cpu_path_id() != QS_PATH_SCALAR;
    for (size_t m = 0; m < M; m++) {
        const float *x = X + m * K;
        for (size_t gi = 0; gi < L->ng; gi++) {
            float s[8] = {0}; /* 8 partial sums: vectorizes, and rounds less */
            size_t k = gi * L->gs, e = (gi + 1) * L->gs;
            for (; k + 8 <= e; k += 8)
                for (int j = 0; j < 8; j++)
                    s[j] += x[k + j];
            for (; k < e; k++)
                s[0] += x[k];
            L->xsum[m * L->ng + gi] =
                ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
        }
        for (size_t b = 0; b < L->nb; b++) {
            size_t r0 = b * L->kb / 4, r1 = r0 + L->kb / 4;
            r1 = r1 < L->nk4 ? r1 : L->nk4;
            uint8_t *t = L->t + (m * L->nk4 + r0) * 16;
            if (simd && 4 * r1 <= K)
                block_avx2(x, r0, r1, t, &L->s[m * L->nb + b]);
            else
                block_scalar(x, K, r0, r1, t, &L->s[m * L->nb + b]);
        }
    }
    return QS_OK;
}

static int lut_args(const qs_bcq *w, const float *X, size_t M, const void *Y)
{
    if (!w || !X || !Y || !w->bits || !w->alpha || !w->z)
        return qs_seterr(QS_EINVAL, "LUT-GEMM got a NULL pointer: initialize the weights with "
                                    "qs_bcq_init or a quantizer and pass M x K inputs and M x N "
                                    "outputs");
    int err = qs_bcq_check(w->N, w->K, w->q, w->g);
    return err ? err : qs_gemm_dims_ok(M, w->K, w->N);
}

/* ---- float64 reference ------------------------------------------------------ */

int qs_lutgemm_ref_f64(const qs_bcq *w, const float *X, size_t M, double *Y)
{
    int err = lut_args(w, X, M, Y);
    if (err)
        return err;
    double *W = malloc(w->N * w->K * sizeof(double));
    if (!W)
        return qs_seterr(QS_ENOMEM, "out of memory for the %zu x %zu reference matrix", w->N, w->K);
    qs_bcq_dequant_f64(w, W);
    for (size_t m = 0; m < M; m++)
        for (size_t n = 0; n < w->N; n++) {
            double acc = 0;
            for (size_t k = 0; k < w->K; k++)
                acc += W[n * w->K + k] * (double)X[m * w->K + k];
            Y[m * w->N + n] = acc;
        }
    free(W);
    return QS_OK;
}

int qs_lutgemm_err_bound(const qs_bcq *w, const float *X, size_t M, double *E)
{
    int err = lut_args(w, X, M, E);
    luts L;
    if (err || (err = luts_make(w, X, M, &L)))
        return err;
    size_t nw = (w->K + 31) / 32;
    for (size_t m = 0; m < M; m++)
        for (size_t n = 0; n < w->N; n++) {
            double e = 0;
            for (size_t b = 0; b < L.nb; b++) {
                size_t w0 = b * L.kb / 32, w1 = w0 + L.kb / 32, gi = w0 * 32 / L.gs;
                double nl = 8.0 * (double)((w1 < nw ? w1 : nw) - w0);
                for (unsigned i = 0; i < w->q; i++)
                    e += fabs(qs_fp16_to_fp32(w->alpha[qs_bcq_alpha_index(w, i, n, gi)])) * nl *
                         L.s[m * L.nb + b] / 2;
            }
            E[m * w->N + n] = e;
        }
    luts_free(&L);
    return QS_OK;
}

/* ---- scalar: rows [n0, n1), any tile (the fallback and the ragged tail) ------ */

static void rows_scalar(const qs_bcq *w, const luts *L, size_t M, size_t n0, size_t n1, float *Y)
{
    size_t nw = (w->K + 31) / 32;
    for (size_t n = n0; n < n1; n++)
        for (size_t m = 0; m < M; m++) {
            float acc = 0;
            for (size_t gi = 0; gi < L->ng; gi++)
                acc += qs_fp16_to_fp32(w->z[qs_bcq_z_index(w, n, gi)]) * L->xsum[m * L->ng + gi];
            for (size_t b = 0; b < L->nb; b++) {
                size_t w0 = b * L->kb / 32, w1 = w0 + L->kb / 32, gi = w0 * 32 / L->gs;
                w1 = w1 < nw ? w1 : nw;
                for (unsigned i = 0; i < w->q; i++) {
                    int32_t sum = 0;
                    for (size_t wi = w0; wi < w1; wi++) {
                        uint32_t word = w->bits[qs_bcq_word_index(w, i, n, wi)];
                        const uint8_t *t = L->t + (m * L->nk4 + wi * 8) * 16;
                        for (int j = 0; j < 8; j++)
                            sum += t[j * 16 + (word >> (4 * j) & 15u)] - 128;
                    }
                    float a = qs_fp16_to_fp32(w->alpha[qs_bcq_alpha_index(w, i, n, gi)]);
                    acc += a * L->s[m * L->nb + b] * (float)sum;
                }
            }
            Y[m * w->N + n] = acc;
        }
}

/* ---- AVX2: one full tile of 32 rows, TT = 1 or 2 tokens ----------------------
 * Per (word index, plane) the tile's 32 words are four vectors; a byte
 * shuffle and two unpack levels turn them into four vectors V_b holding
 * byte b of all 32 words (slot order, qs_kernels.h), whose low and high
 * nibbles index the tables of runs 8*wi + 2b and 8*wi + 2b + 1. A look-up
 * result r (32 u8) is summed as raw 16-bit lanes into E (low byte plus 256 x
 * high byte, mod 2^16) and its high bytes alone into O; the low-byte sums
 * are then E - 256 O, exact because they stay below 2^16. That costs one
 * shift and two adds per 32 look-ups instead of a mask, a shift and two adds. */

#define ATTR_AVX2 __attribute__((target("avx2,fma,f16c")))
#ifndef PF_AHEAD
#define PF_AHEAD 4096
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T0
#endif

static inline __attribute__((always_inline)) ATTR_AVX2 void
tile_avx2(const qs_bcq *w, const luts *L, size_t tile, size_t m0, int TT, float *Y)
{
    const size_t N = w->N, q = w->q, nw = (w->K + 31) / 32, n0 = tile * 32;
    const uint32_t *bits = w->bits + tile * 32 * q * nw;
    const __m256i byte_t = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0,
                                            4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m256i lo4 = _mm256_set1_epi8(0x0f);
    __m256 acc[2][4];
#pragma GCC unroll 4
    for (int t = 0; t < TT; t++)
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++)
            acc[t][j] = _mm256_setzero_ps();
    for (size_t b = 0; b < L->nb; b++) {
        size_t w0 = b * L->kb / 32, w1 = w0 + L->kb / 32, gi = w0 * 32 / L->gs;
        w1 = w1 < nw ? w1 : nw;
        for (size_t i = 0; i < q; i++) {
            __m256i E[2], O[2];
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++)
                E[t] = O[t] = _mm256_setzero_si256();
            for (size_t wi = w0; wi < w1; wi++) {
                const __m256i *p = (const __m256i *)(bits + (wi * q + i) * 32);
                /* Software prefetch PF_AHEAD bytes on: the stream prefetcher alone
                 * left a single core at half its streaming bandwidth. */
                _mm_prefetch((const char *)p + PF_AHEAD, PF_HINT);
                _mm_prefetch((const char *)p + PF_AHEAD + 64, PF_HINT);
                __m256i A = _mm256_shuffle_epi8(_mm256_loadu_si256(p + 0), byte_t);
                __m256i B = _mm256_shuffle_epi8(_mm256_loadu_si256(p + 1), byte_t);
                __m256i C = _mm256_shuffle_epi8(_mm256_loadu_si256(p + 2), byte_t);
                __m256i D = _mm256_shuffle_epi8(_mm256_loadu_si256(p + 3), byte_t);
                __m256i ABl = _mm256_unpacklo_epi32(A, B), ABh = _mm256_unpackhi_epi32(A, B);
                __m256i CDl = _mm256_unpacklo_epi32(C, D), CDh = _mm256_unpackhi_epi32(C, D);
                __m256i V[4] = {_mm256_unpacklo_epi64(ABl, CDl), _mm256_unpackhi_epi64(ABl, CDl),
                                _mm256_unpacklo_epi64(ABh, CDh), _mm256_unpackhi_epi64(ABh, CDh)};
#pragma GCC unroll 4
                for (int bb = 0; bb < 4; bb++) {
                    __m256i lo = _mm256_and_si256(V[bb], lo4);
                    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(V[bb], 4), lo4);
#pragma GCC unroll 4
                    for (int t = 0; t < TT; t++) {
                        const uint8_t *tb = L->t + ((m0 + t) * L->nk4 + wi * 8 + 2 * bb) * 16;
                        __m256i tl = _mm256_broadcastsi128_si256(_mm_load_si128((const void *)tb));
                        __m256i th =
                            _mm256_broadcastsi128_si256(_mm_load_si128((const void *)(tb + 16)));
                        __m256i r1 = _mm256_shuffle_epi8(tl, lo), r2 = _mm256_shuffle_epi8(th, hi);
                        E[t] = _mm256_add_epi16(E[t], _mm256_add_epi16(r1, r2));
                        O[t] = _mm256_add_epi16(O[t], _mm256_add_epi16(_mm256_srli_epi16(r1, 8),
                                                                       _mm256_srli_epi16(r2, 8)));
                    }
                }
            }
            /* Epilogue: remove the +128 of every read, widen in row order,
             * scale by alpha (fp16, 32 rows contiguous) times the table scale. */
            const __m256i off = _mm256_set1_epi16((short)(128 * 8 * (w1 - w0)));
            const uint16_t *al = w->alpha + tile * 32 * q * L->ng + (gi * q + i) * 32;
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++) {
                __m256i e =
                    _mm256_sub_epi16(_mm256_sub_epi16(E[t], _mm256_slli_epi16(O[t], 8)), off);
                __m256i o = _mm256_sub_epi16(O[t], off);
                __m128i h[4] = {_mm256_castsi256_si128(e), _mm256_castsi256_si128(o),
                                _mm256_extracti128_si256(e, 1), _mm256_extracti128_si256(o, 1)};
                __m256 s = _mm256_set1_ps(L->s[(m0 + t) * L->nb + b]);
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) {
                    __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(al + 8 * j)));
                    __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(h[j]));
                    acc[t][j] = _mm256_fmadd_ps(_mm256_mul_ps(a, s), v, acc[t][j]);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < TT; t++) {
        for (size_t gi = 0; gi < L->ng; gi++) {
            __m256 xs = _mm256_set1_ps(L->xsum[(m0 + t) * L->ng + gi]);
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                __m256 z = _mm256_cvtph_ps(
                    _mm_loadu_si128((const __m128i *)(w->z + tile * 32 * L->ng + gi * 32 + 8 * j)));
                acc[t][j] = _mm256_fmadd_ps(z, xs, acc[t][j]);
            }
        }
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++)
            _mm256_storeu_ps(Y + (m0 + t) * N + n0 + 8 * j, acc[t][j]);
    }
}

static ATTR_AVX2 void tile_avx2_all(const qs_bcq *w, const luts *L, size_t tile, size_t M, float *Y)
{
    size_t m = 0;
    for (; m + 2 <= M; m += 2)
        tile_avx2(w, L, tile, m, 2, Y);
    if (m < M)
        tile_avx2(w, L, tile, m, 1, Y);
}

/* ---- AVX-512 (BW + VBMI): the same tile with 64-byte vectors -----------------
 * The 32 words of one (word index, plane) are two vectors; two vpermi2b
 * gather "bytes 0 and 1" and "bytes 2 and 3" of all 32 rows (any byte order
 * is one instruction here, so rows land where the epilogue wants them: the
 * AVX2 order, lanes 0-1 for one byte and lanes 2-3 for the next). The lane
 * tables are [T, T, T', T'] built from one 64-byte load of four tables.
 * Every vpshufb does 64 look-ups; the ALU work per 256 look-ups drops from
 * ~56 ops on three ports to ~28 on two. */

#define ATTR_512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vbmi")))

/* Byte p of the gathered vector j (0: bytes 0/1, 1: bytes 2/3): row r of
 * lane pair p / 32 sits where the AVX2 epilogue expects it. */
static void perm_idx(uint8_t idx[2][64])
{
    for (int j = 0; j < 2; j++)
        for (int p = 0; p < 64; p++) {
            int q = p % 16, L = (p % 32) / 16;
            int r = 16 * L + 8 * (q & 1) + (q >> 1);
            int slot = ((r >> 1) & 3) << 3 | (r >> 4) << 2 | (r & 1) << 1 | ((r >> 3) & 1);
            idx[j][p] = (uint8_t)(slot * 4 + 2 * j + p / 32);
        }
}

static inline __attribute__((always_inline)) ATTR_512 void tile_512(const qs_bcq *w, const luts *L,
                                                                    size_t tile, size_t m0, int TT,
                                                                    const __m512i *pidx, float *Y)
{
    const size_t N = w->N, q = w->q, nw = (w->K + 31) / 32, n0 = tile * 32;
    const uint32_t *bits = w->bits + tile * 32 * q * nw;
    const __m512i lo4 = _mm512_set1_epi8(0x0f), P0 = pidx[0], P1 = pidx[1];
    /* Sums in two 16-row halves: "e" rows 0-7 and 16-23, "o" rows 8-15 and
     * 24-31 (the even/odd byte split); row order is restored at the store. */
    __m512 accE[2], accO[2];
#pragma GCC unroll 4
    for (int t = 0; t < TT; t++)
        accE[t] = accO[t] = _mm512_setzero_ps();
    for (size_t b = 0; b < L->nb; b++) {
        size_t w0 = b * L->kb / 32, w1 = w0 + L->kb / 32, gi = w0 * 32 / L->gs;
        w1 = w1 < nw ? w1 : nw;
        /* Each of the two folded lanes starts at -64 per read so that the
         * +128 of every u8 table entry cancels without a subtraction. */
        const __m512i init = _mm512_set1_epi16((short)(-64 * 8 * (w1 - w0)));
        __m512 blkE[2], blkO[2]; /* sum over planes of alpha x reads, unscaled */
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++)
            blkE[t] = blkO[t] = _mm512_setzero_ps();
        for (size_t i = 0; i < q; i++) {
            __m512i E[2], O[2];
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++)
                E[t] = O[t] = init;
            for (size_t wi = w0; wi < w1; wi++) {
                const uint32_t *p = bits + (wi * q + i) * 32;
                _mm_prefetch((const char *)p + PF_AHEAD, PF_HINT);
                _mm_prefetch((const char *)p + PF_AHEAD + 64, PF_HINT);
                __m512i Z0 = _mm512_loadu_si512(p), Z1 = _mm512_loadu_si512(p + 16);
                __m512i G[2] = {_mm512_permutex2var_epi8(Z0, P0, Z1),
                                _mm512_permutex2var_epi8(Z0, P1, Z1)};
#pragma GCC unroll 2
                for (int j = 0; j < 2; j++) {
                    __m512i lo = _mm512_and_si512(G[j], lo4);
                    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(G[j], 4), lo4);
#pragma GCC unroll 4
                    for (int t = 0; t < TT; t++) {
                        /* tables of runs 8wi + 4j .. 8wi + 4j + 3 */
                        __m512i T4 = _mm512_load_si512(
                            (const void *)(L->t + ((m0 + t) * L->nk4 + wi * 8 + 4 * j) * 16));
                        __m512i tl = _mm512_shuffle_i32x4(T4, T4, 0xA0); /* T0 T0 T2 T2 */
                        __m512i th = _mm512_shuffle_i32x4(T4, T4, 0xF5); /* T1 T1 T3 T3 */
                        __m512i r1 = _mm512_shuffle_epi8(tl, lo), r2 = _mm512_shuffle_epi8(th, hi);
                        E[t] = _mm512_add_epi16(E[t], _mm512_add_epi16(r1, r2));
                        O[t] = _mm512_add_epi16(O[t], _mm512_add_epi16(_mm512_srli_epi16(r1, 8),
                                                                       _mm512_srli_epi16(r2, 8)));
                    }
                }
            }
            /* alpha of 32 rows, 16-byte chunks c0..c3 reordered c0 c2 | c1 c3 */
            __m512i a16 = _mm512_shuffle_i64x2(
                _mm512_loadu_si512(w->alpha + tile * 32 * q * L->ng + (gi * q + i) * 32),
                _mm512_loadu_si512(w->alpha + tile * 32 * q * L->ng + (gi * q + i) * 32), 0xD8);
            __m512 aE = _mm512_cvtph_ps(_mm512_castsi512_si256(a16));
            __m512 aO = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(a16, 1));
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++) {
                /* fold lanes 2-3 (the second byte's reads) onto lanes 0-1 */
                __m256i Ef = _mm256_add_epi16(_mm512_castsi512_si256(E[t]),
                                              _mm512_extracti64x4_epi64(E[t], 1));
                __m256i Of = _mm256_add_epi16(_mm512_castsi512_si256(O[t]),
                                              _mm512_extracti64x4_epi64(O[t], 1));
                __m256i e = _mm256_sub_epi16(Ef, _mm256_slli_epi16(Of, 8));
                blkE[t] =
                    _mm512_fmadd_ps(aE, _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(e)), blkE[t]);
                blkO[t] =
                    _mm512_fmadd_ps(aO, _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(Of)), blkO[t]);
            }
        }
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) { /* the block's table scale, once for all planes */
            __m512 s = _mm512_set1_ps(L->s[(m0 + t) * L->nb + b]);
            accE[t] = _mm512_fmadd_ps(s, blkE[t], accE[t]);
            accO[t] = _mm512_fmadd_ps(s, blkO[t], accO[t]);
        }
    }
    for (size_t gi = 0; gi < L->ng; gi++) {
        const uint16_t *zp = w->z + tile * 32 * L->ng + gi * 32;
        __m512i z16 = _mm512_shuffle_i64x2(_mm512_loadu_si512(zp), _mm512_loadu_si512(zp), 0xD8);
        __m512 zE = _mm512_cvtph_ps(_mm512_castsi512_si256(z16));
        __m512 zO = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(z16, 1));
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            __m512 xs = _mm512_set1_ps(L->xsum[(m0 + t) * L->ng + gi]);
            accE[t] = _mm512_fmadd_ps(zE, xs, accE[t]);
            accO[t] = _mm512_fmadd_ps(zO, xs, accO[t]);
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < TT; t++) {
        float *y = Y + (m0 + t) * N + n0;
        _mm256_storeu_ps(y, _mm512_castps512_ps256(accE[t]));
        _mm256_storeu_ps(y + 8, _mm512_castps512_ps256(accO[t]));
        _mm256_storeu_ps(y + 16,
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(accE[t]), 1)));
        _mm256_storeu_ps(y + 24,
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(accO[t]), 1)));
    }
}

static ATTR_512 void tile_512_all(const qs_bcq *w, const luts *L, size_t tile, size_t M,
                                  const uint8_t idx[2][64], float *Y)
{
    const __m512i pidx[2] = {_mm512_loadu_si512(idx[0]), _mm512_loadu_si512(idx[1])};
    size_t m = 0;
    for (; m + 2 <= M; m += 2)
        tile_512(w, L, tile, m, 2, pidx, Y);
    if (m < M)
        tile_512(w, L, tile, m, 1, pidx, Y);
}

int qs_lutgemm(const qs_bcq *w, const float *X, size_t M, float *Y)
{
    int err = lut_args(w, X, M, Y);
    if (err)
        return err;
    int path = qs_cpu_path_id();
    size_t ntiles = w->N / 32;
    uint8_t idx[2][64];
    perm_idx(idx);
    for (size_t m0 = 0; m0 < M; m0 += MAX_M) {
        size_t mc = M - m0 < MAX_M ? M - m0 : MAX_M;
        luts L;
        if ((err = luts_make(w, X + m0 * w->K, mc, &L)))
            return err;
        /* The chunk's outputs are rows m0.. of Y: shift Y, keep stride N. */
        float *Yc = Y + m0 * w->N;
        /* Dynamic chunks of 4 tiles: on a shared machine a core that loses
         * its time slice would otherwise hold up the whole call. */
#pragma omp parallel for schedule(dynamic, 4)
        for (size_t t = 0; t <= ntiles; t++) {
            if (t == ntiles)
                rows_scalar(w, &L, mc, ntiles * 32, w->N, Yc);
            else if (path == QS_PATH_SCALAR)
                rows_scalar(w, &L, mc, t * 32, t * 32 + 32, Yc);
            else if (path == QS_PATH_AVX512)
                tile_512_all(w, &L, t, mc, idx, Yc);
            else
                tile_avx2_all(w, &L, t, mc, Yc);
        }
        luts_free(&L);
    }
    return QS_OK;
}

/* ---- The paper's variant: mu = 8, fp32 tables -----------------------------
 * Same formula, but one 256-entry fp32 table per run of 8 inputs, read with
 * one scalar load per byte of a bit-plane word: no table quantization error
 * (only fp32 rounding), 2x fewer reads than mu = 4, but no SIMD for the
 * reads. Kept as the accuracy-first kernel and as the measured alternative
 * that the int8 vpshufb design is chosen over (docs/benchmarks.md). Tables
 * are per token (K/8 x 1 KiB), so a batch runs token by token. */

static void table8(const float *x, size_t K, size_t r, float *T)
{
    float v[8], s = 0;
    for (int j = 0; j < 8; j++)
        v[j] = 8 * r + j < K ? x[8 * r + j] : 0, s += v[j];
    T[0] = -s;
    for (int j = 0; j < 8; j++) /* setting bit j flips -x_j to +x_j */
        for (int p = 0; p < (1 << j); p++)
            T[p | 1 << j] = T[p] + 2 * v[j];
}

int qs_lutgemm_f32(const qs_bcq *w, const float *X, size_t M, float *Y)
{
    int err = lut_args(w, X, M, Y);
    if (err)
        return err;
    size_t K = w->K, N = w->N, q = w->q, nw = (K + 31) / 32, nr = nw * 4;
    size_t ng = qs_bcq_ngroups(K, w->g), gs = w->g ? w->g : nw * 32, ntiles = (N + 31) / 32;
    float *T = malloc(nr * 256 * sizeof(float));
    if (!T)
        return qs_seterr(QS_ENOMEM, "out of memory for %zu fp32 look-up tables", nr);
    for (size_t m = 0; m < M; m++) {
        const float *x = X + m * K;
        float *y = Y + m * N;
#pragma omp parallel
        {
#pragma omp for schedule(static)
            for (size_t r = 0; r < nr; r++)
                table8(x, K, r, T + r * 256);
#pragma omp for schedule(dynamic, 4)
            for (size_t t = 0; t < ntiles; t++) {
                size_t n0 = t * 32, R = N - n0 < 32 ? N - n0 : 32;
                float acc[32] = {0}, part[32];
                for (size_t gi = 0; gi < ng; gi++) {
                    size_t w0 = gi * gs / 32, w1 = (gi + 1) * gs / 32;
                    w1 = w1 < nw ? w1 : nw;
                    float xs = 0;
                    for (size_t k = gi * gs; k < (gi + 1) * gs && k < K; k++)
                        xs += x[k];
                    for (size_t r = 0; r < R; r++)
                        acc[r] += qs_fp16_to_fp32(w->z[qs_bcq_z_index(w, n0 + r, gi)]) * xs;
                    for (unsigned i = 0; i < q; i++) {
                        for (size_t r = 0; r < R; r++)
                            part[r] = 0;
                        for (size_t wi = w0; wi < w1; wi++) {
                            const float *Tw = T + wi * 4 * 256;
                            /* the tile's 32 words of (wi, i) are contiguous */
                            const uint32_t *p = w->bits + qs_bcq_word_index(w, i, n0, wi);
                            for (size_t r = 0; r < R; r++) {
                                uint32_t word = R == 32 ? p[((r >> 1) & 3) << 3 | (r >> 4) << 2 |
                                                            (r & 1) << 1 | ((r >> 3) & 1)]
                                                        : p[r];
                                part[r] += (Tw[word & 255] + Tw[256 + (word >> 8 & 255)]) +
                                           (Tw[512 + (word >> 16 & 255)] + Tw[768 + (word >> 24)]);
                            }
                        }
                        for (size_t r = 0; r < R; r++)
                            acc[r] +=
                                qs_fp16_to_fp32(w->alpha[qs_bcq_alpha_index(w, i, n0 + r, gi)]) *
                                part[r];
                    }
                }
                for (size_t r = 0; r < R; r++)
                    y[n0 + r] = acc[r];
            }
        }
    }
    free(T);
    return QS_OK;
}
