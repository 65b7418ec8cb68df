/* w4a4.c: Atom W4A4 GEMM, Y[M x N] = X[M x K] W^T, and its float64 reference.
 *
 *   X  M x K fp32 in the original channel order, quantized here (the rule of
 *      qs_w4_quant_act): gathered through perm, INT4 per token and group of
 *      G positions before K4, INT8 per token over the ko outliers after
 *   W  qs_w4: INT4 codes as nibbles, INT8 outlier codes, in 16-row tiles
 *      (kernels/cpu/w4.h), s4 [N][ng], s8 [N]
 *   Y  M x N fp32 = sum_g sx[m,g] s4[n,g] sum_{j in g} xq[m,j] wq[n,j]
 *                 + sxo[m] s8[n] sum_{j >= K4} xq[m,j] wq[n,j]
 *
 * Paths (qs_cpu_path): scalar; avx2 and avxvnni on 256-bit vectors (an 8-row
 * half of a tile per vector); avx512 on 512-bit vectors (a 16-row tile) where
 * the CPU has AVX-512 VNNI, else as avxvnni.
 *
 * Operands of the u8 x s8 products (vpdpbusd; vpmaddubsw on avx2):
 * - INT4: the weights are the u8 side, stored as w + 8 (1..15) so that a
 *   nibble is unpacked by one AND (low) or shift + AND (high), with no
 *   subtraction per weight vector; the activations are the s8 side as they
 *   are. The offset is taken off per token and group: the sum is
 *   sum (w + 8) x = sum w x + 8 sum x, and 8 * sum_{j in g} xq[m,j] is
 *   computed once per token while quantizing. On avx2 a pair sum of
 *   vpmaddubsw is at most 2 * 15 * 7 = 210, far from int16 saturation.
 * - INT8 outliers: the weights stay s8 and the activations become the u8
 *   side as x + 128, corrected by 128 * sum_j wq[n,j] (qs_w4.sum), as W8A8
 *   does; avx2 multiplies |w| by x with w's sign instead (no offset).
 * Each vector's int32 lanes are finished row sums: no horizontal reduction.
 * A group's sums are scaled into Y (an L1-resident tile) when the group
 * ends. Blocks of 32 rows run in parallel (OpenMP); within a block the
 * tokens go 4 at a time, so a block's weights come from DRAM once per call
 * and from cache for every later 4 tokens.
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"
#include "w4.h"

enum { K_SCALAR, K_AVX2, K_VNNI, K_AVX512 };

/* Quantized activations, padded, in the form the kernel reads. */
typedef struct acts {
    int8_t *x4;  /* M x K4p INT4 codes (s8), zeros past K4 */
    uint8_t *x8; /* M x kop outlier codes: + 128 for vpdpbusd, else s8; padding x = 0 */
    float *sx;   /* M x ng group scales */
    float *sxo;  /* M outlier scales */
    int32_t *xs; /* M x ng: 8 * sum of the group's codes (the nibble offset) */
} acts;

static void acts_free(acts *a)
{
    free(a->x4);
    free(a->x8);
    free(a->sx);
    free(a->sxo);
    free(a->xs);
}

/* Token m's codes, scales and offsets into a. */
static void act_row(const qs_w4 *w, const qs_w4_dims *d, const float *x, float *buf, int offset,
                    acts *a, size_t m)
{
    int8_t *q4 = a->x4 + m * d->K4p, *q8 = (int8_t *)a->x8 + m * d->kop;
    memset(q8, 0, d->kop);
    qs_w4_act_token(w, d, x, buf, q4, q8, a->sx + m * d->ng, a->sxo + m);
    for (size_t g = 0; g < d->ng; g++) {
        int32_t s = 0;
        size_t j1 = (g + 1) * d->G < d->K4 ? (g + 1) * d->G : d->K4;
        for (size_t j = g * d->G; j < j1; j++)
            s += q4[j];
        a->xs[m * d->ng + g] = 8 * s;
    }
    if (offset)
        for (size_t i = 0; i < d->kop; i++)
            a->x8[m * d->kop + i] = (uint8_t)(q8[i] + 128);
}

static int acts_make(const qs_w4 *w, const qs_w4_dims *d, const float *X, size_t M, int offset,
                     acts *a)
{
    memset(a, 0, sizeof(*a));
    a->x4 = calloc(M, d->K4p + 1);
    a->x8 = malloc(M * d->kop + 1);
    a->sx = malloc(M * d->ng * sizeof(float) + 1);
    a->sxo = malloc(M * sizeof(float));
    a->xs = malloc(M * d->ng * sizeof(int32_t) + 1);
    if (!a->x4 || !a->x8 || !a->sx || !a->sxo || !a->xs) {
        acts_free(a);
        return qs_seterr(QS_ENOMEM, "out of memory for %zu quantized activation rows", M);
    }
    int nomem = 0;
#pragma omp parallel if (M > 1) reduction(| : nomem)
    {
        float *buf = malloc(d->K * sizeof(float));
        nomem = !buf;
#pragma omp for schedule(static)
        for (size_t m = 0; m < M; m++)
            if (buf)
                act_row(w, d, X + m * d->K, buf, offset, a, m);
        free(buf);
    }
    if (nomem) {
        acts_free(a);
        return qs_seterr(QS_ENOMEM, "out of memory for a token of %zu activations", d->K);
    }
    return QS_OK;
}

static int w4a4_args(const qs_w4 *w, const float *X, size_t M, const void *Y, qs_w4_dims *d)
{
    int err = qs_w4_check(w, "W4A4 GEMM", d);
    if (err)
        return err;
    if (!X || !Y)
        return qs_seterr(QS_EINVAL, "W4A4 GEMM got a NULL pointer: pass M x K inputs (original "
                                    "channel order) and M x N outputs");
    return qs_gemm_dims_ok(M, d->K, d->N);
}

/* ---- float64 reference ------------------------------------------------------
 * From the plain codes (qs_w4_codes) and qs_w4_quant_act: exact integer sums,
 * the scales applied in double. Shares nothing with the kernels' layout. */

int qs_w4a4_gemm_ref_f64(const qs_w4 *w, const float *X, size_t M, double *Y)
{
    qs_w4_dims d;
    int err = w4a4_args(w, X, M, Y, &d);
    if (err)
        return err;
    int8_t *wq = malloc(d.N * d.K), *xq = malloc(M * d.K);
    float *sx = malloc(M * d.ng * sizeof(float) + 1), *sxo = malloc(M * sizeof(float));
    if (!wq || !xq || !sx || !sxo)
        err = qs_seterr(QS_ENOMEM, "out of memory for the W4A4 reference of %zu tokens", M);
    if (!err)
        err = qs_w4_codes(w, wq);
    if (!err)
        err = qs_w4_quant_act(w, X, M, xq, sx, sxo);
    for (size_t m = 0; !err && m < M; m++)
        for (size_t n = 0; n < d.N; n++) {
            const int8_t *a = xq + m * d.K, *b = wq + n * d.K;
            double y = 0;
            for (size_t g = 0; g < d.ng; g++) {
                int64_t acc = 0;
                size_t j1 = (g + 1) * d.G < d.K4 ? (g + 1) * d.G : d.K4;
                for (size_t j = g * d.G; j < j1; j++)
                    acc += (int64_t)a[j] * b[j];
                y += (double)sx[m * d.ng + g] * (double)w->s4[n * d.ng + g] * (double)acc;
            }
            int64_t acc = 0;
            for (size_t j = d.K4; j < d.K; j++)
                acc += (int64_t)a[j] * b[j];
            if (d.ko)
                y += (double)sxo[m] * (double)w->s8[n] * (double)acc;
            Y[m * d.N + n] = y;
        }
    free(wq), free(xq), free(sx), free(sxo);
    return err;
}

/* ---- scalar: rows [n0, n1) -------------------------------------------------- */

static void rows_scalar(const qs_w4 *w, const qs_w4_dims *d, const acts *a, size_t M, size_t n0,
                        size_t n1, int8_t *c, float *Y)
{
    for (size_t n = n0; n < n1; n++) {
        for (size_t j = 0; j < d->K4; j++) /* the row's codes, once for all tokens */
            c[j] = (int8_t)qs_w4_get4(w, d->K4p, n, j);
        for (size_t i = 0; i < d->ko; i++)
            c[d->K4 + i] = w->w8[qs_w4_index8(d->kop, n, i)];
        for (size_t m = 0; m < M; m++) {
            const int8_t *x = a->x4 + m * d->K4p, *xo = (const int8_t *)a->x8 + m * d->kop;
            float y = 0;
            for (size_t g = 0; g < d->ng; g++) {
                int32_t acc = 0;
                size_t j1 = (g + 1) * d->G < d->K4 ? (g + 1) * d->G : d->K4;
                for (size_t j = g * d->G; j < j1; j++)
                    acc += (int32_t)x[j] * c[j];
                y += a->sx[m * d->ng + g] * w->s4[n * d->ng + g] * (float)acc;
            }
            if (d->ko) {
                int32_t acc = 0;
                for (size_t i = 0; i < d->ko; i++)
                    acc += (int32_t)xo[i] * c[d->K4 + i];
                y += a->sxo[m] * w->s8[n] * (float)acc;
            }
            Y[m * d->N + n] = y;
        }
    }
}

/* ---- SIMD micro-kernels -------------------------------------------------------
 * One block of up to 32 rows (2 tiles) against TT tokens (4, or 1 for the
 * rest and for GEMV), outputs to y[t] (the block's first row of token t's
 * output, or a scratch tile for the last, partial block). Instantiated with
 * constant sizes so that the accumulators live in registers. */

#define ATTR_AVX2   __attribute__((target("avx2,fma,f16c")))
#define ATTR_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vnni")))
#define INLINE      static inline __attribute__((always_inline))
/* Software prefetch distance of the weight streams at batch 1 (as W8A8). */
#define PF_AHEAD 4096

typedef struct blk {
    const qs_w4 *w;
    const qs_w4_dims *d;
    const acts *a;
    size_t tile;              /* first tile of the block */
    float *y[4];              /* outputs of the block's rows, per token */
    const int8_t *x4[4];      /* the tokens' INT4 codes */
    const uint8_t *x8[4];     /* and outlier codes */
    const float *sx[4], *sxo; /* group scales, outlier scales (from token m0) */
    const int32_t *xs[4];     /* nibble offsets */
} blk;

static inline int32_t load4(const void *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* acc += u8 a . s8 b, 4 products per int32 lane. Inline asm because GCC 12
 * copies (and spills) the tied accumulator of the intrinsics on every call
 * (see w8a8.c); the asm also lets the VEX form sit in an AVX2 function,
 * called only where the CPU has AVX-VNNI. */
INLINE ATTR_AVX2 __m256i dp_vex(__m256i acc, __m256i a, __m256i b)
{
    __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(a), "x"(b));
    return acc;
}

INLINE ATTR_AVX512 __m512i dp_zmm(__m512i acc, __m512i a, __m512i b)
{
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}

/* u8 a . s8 b with vpmaddubsw (pair sums fit int16: see the top). */
INLINE ATTR_AVX2 __m256i dp_avx2(__m256i acc, __m256i a, __m256i b)
{
    __m256i p = _mm256_maddubs_epi16(a, b);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

/* 256-bit: H halves of 8 rows (2 or 4: one or two tiles) by TT tokens. */
INLINE ATTR_AVX2 void mk_ymm(const blk *b, int H, int TT, int vnni)
{
    const qs_w4_dims *d = b->d;
    const qs_w4 *w = b->w;
    const __m256i lo4 = _mm256_set1_epi8(0x0f);
    const size_t tb4 = QS_W4_ROWS * d->K4p / 2, G8 = d->G / 8;
    const uint8_t *w4 = w->w4 + b->tile * tb4;
    const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                           _mm256_set1_epi32((int)d->ng));
    for (size_t g = 0; g < d->ng; g++) {
        __m256i acc[4][4];
#pragma GCC unroll 4
        for (int h = 0; h < H; h++)
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++)
                acc[h][t] = _mm256_setzero_si256();
        size_t kend = (g + 1) * G8 < d->K4p / 8 ? (g + 1) * G8 : d->K4p / 8;
        for (size_t kb = g * G8; kb < kend; kb++) {
            __m256i lo[4], hi[4];
#pragma GCC unroll 4
            for (int h = 0; h < H; h++) {
                const uint8_t *p = w4 + (h / 2) * tb4 + kb * 64 + (h % 2) * 32;
                __m256i v = _mm256_loadu_si256((const __m256i *)p);
                if (TT == 1 && h % 2 == 0)
                    _mm_prefetch((const char *)p + PF_AHEAD, _MM_HINT_T0);
                lo[h] = _mm256_and_si256(v, lo4);
                hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
            }
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++) {
                __m256i xl = _mm256_set1_epi32(load4(b->x4[t] + kb * 8));
                __m256i xh = _mm256_set1_epi32(load4(b->x4[t] + kb * 8 + 4));
#pragma GCC unroll 4
                for (int h = 0; h < H; h++) {
                    if (vnni)
                        acc[h][t] = dp_vex(dp_vex(acc[h][t], lo[h], xl), hi[h], xh);
                    else /* both pair sums in int16 (<= 420), one widening */
                        acc[h][t] = _mm256_add_epi32(
                            acc[h][t],
                            _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo[h], xl),
                                                               _mm256_maddubs_epi16(hi[h], xh)),
                                              _mm256_set1_epi16(1)));
                }
            }
        }
#pragma GCC unroll 4
        for (int h = 0; h < H; h++) {
            size_t n = b->tile * QS_W4_ROWS + h * 8;
            __m256 s4 = _mm256_i32gather_ps(w->s4 + n * d->ng + g, idx, 4);
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++) {
                __m256 f =
                    _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[h][t], _mm256_set1_epi32(b->xs[t][g])));
                __m256 sc = _mm256_mul_ps(s4, _mm256_set1_ps(b->sx[t][g]));
                float *y = b->y[t] + h * 8;
                _mm256_storeu_ps(y, g ? _mm256_fmadd_ps(sc, f, _mm256_loadu_ps(y))
                                      : _mm256_mul_ps(sc, f));
            }
        }
    }
    if (!d->ko)
        return;
    const size_t tb8 = QS_W4_ROWS * d->kop;
    const int8_t *w8 = w->w8 + b->tile * tb8;
    __m256i acc[4][4];
#pragma GCC unroll 4
    for (int h = 0; h < H; h++)
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++)
            acc[h][t] = _mm256_setzero_si256();
    for (size_t k4 = 0; k4 < d->kop / 4; k4++) {
        __m256i wv[4], wa[4];
#pragma GCC unroll 4
        for (int h = 0; h < H; h++) {
            wv[h] =
                _mm256_loadu_si256((const __m256i *)(w8 + (h / 2) * tb8 + k4 * 64 + (h % 2) * 32));
            if (!vnni)
                wa[h] = _mm256_abs_epi8(wv[h]);
        }
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            __m256i xb = _mm256_set1_epi32(load4(b->x8[t] + k4 * 4));
#pragma GCC unroll 4
            for (int h = 0; h < H; h++)
                acc[h][t] = vnni ? dp_vex(acc[h][t], xb, wv[h])
                                 : dp_avx2(acc[h][t], wa[h], _mm256_sign_epi8(xb, wv[h]));
        }
    }
#pragma GCC unroll 4
    for (int h = 0; h < H; h++) {
        size_t n = b->tile * QS_W4_ROWS + h * 8;
        __m256i corr = vnni
                           ? _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(w->sum + n)), 7)
                           : _mm256_setzero_si256();
        __m256 s8 = _mm256_loadu_ps(w->s8 + n);
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[h][t], corr));
            __m256 sc = _mm256_mul_ps(s8, _mm256_set1_ps(b->sxo[t]));
            float *y = b->y[t] + h * 8;
            _mm256_storeu_ps(y, d->ng ? _mm256_fmadd_ps(sc, f, _mm256_loadu_ps(y))
                                      : _mm256_mul_ps(sc, f));
        }
    }
}

/* 512-bit: RT tiles of 16 rows (1 or 2) by TT tokens. At TT = 1 the low and
 * high nibbles sum into separate accumulators, so that four chains hide
 * vpdpbusd's latency. */
INLINE ATTR_AVX512 void mk_zmm(const blk *b, int RT, int TT)
{
    const qs_w4_dims *d = b->d;
    const qs_w4 *w = b->w;
    const __m512i lo4 = _mm512_set1_epi8(0x0f);
    const size_t tb4 = QS_W4_ROWS * d->K4p / 2, G8 = d->G / 8;
    const uint8_t *w4 = w->w4 + b->tile * tb4;
    const __m512i idx =
        _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                           _mm512_set1_epi32((int)d->ng));
    for (size_t g = 0; g < d->ng; g++) {
        __m512i acc[2][4], acc2[2];
#pragma GCC unroll 2
        for (int r = 0; r < RT; r++) {
            acc2[r] = _mm512_setzero_si512();
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++)
                acc[r][t] = _mm512_setzero_si512();
        }
        size_t kend = (g + 1) * G8 < d->K4p / 8 ? (g + 1) * G8 : d->K4p / 8;
        for (size_t kb = g * G8; kb < kend; kb++) {
            __m512i lo[2], hi[2];
#pragma GCC unroll 2
            for (int r = 0; r < RT; r++) {
                const uint8_t *p = w4 + r * tb4 + kb * 64;
                __m512i v = _mm512_loadu_si512((const void *)p);
                if (TT == 1)
                    _mm_prefetch((const char *)p + PF_AHEAD, _MM_HINT_T0);
                lo[r] = _mm512_and_si512(v, lo4);
                hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
            }
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++) {
                __m512i xl = _mm512_set1_epi32(load4(b->x4[t] + kb * 8));
                __m512i xh = _mm512_set1_epi32(load4(b->x4[t] + kb * 8 + 4));
#pragma GCC unroll 2
                for (int r = 0; r < RT; r++) {
                    acc[r][t] = dp_zmm(acc[r][t], lo[r], xl);
                    if (TT == 1)
                        acc2[r] = dp_zmm(acc2[r], hi[r], xh);
                    else
                        acc[r][t] = dp_zmm(acc[r][t], hi[r], xh);
                }
            }
        }
#pragma GCC unroll 2
        for (int r = 0; r < RT; r++) {
            size_t n = (b->tile + r) * QS_W4_ROWS;
            __m512 s4 = _mm512_i32gather_ps(idx, w->s4 + n * d->ng + g, 4);
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++) {
                __m512i s = TT == 1 ? _mm512_add_epi32(acc[r][t], acc2[r]) : acc[r][t];
                __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(s, _mm512_set1_epi32(b->xs[t][g])));
                __m512 sc = _mm512_mul_ps(s4, _mm512_set1_ps(b->sx[t][g]));
                float *y = b->y[t] + r * QS_W4_ROWS;
                _mm512_storeu_ps(y, g ? _mm512_fmadd_ps(sc, f, _mm512_loadu_ps(y))
                                      : _mm512_mul_ps(sc, f));
            }
        }
    }
    if (!d->ko)
        return;
    const size_t tb8 = QS_W4_ROWS * d->kop;
    const int8_t *w8 = w->w8 + b->tile * tb8;
    __m512i acc[2][4];
#pragma GCC unroll 2
    for (int r = 0; r < RT; r++)
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++)
            acc[r][t] = _mm512_setzero_si512();
    for (size_t k4 = 0; k4 < d->kop / 4; k4++) {
        __m512i wv[2];
#pragma GCC unroll 2
        for (int r = 0; r < RT; r++)
            wv[r] = _mm512_loadu_si512((const void *)(w8 + r * tb8 + k4 * 64));
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            __m512i xb = _mm512_set1_epi32(load4(b->x8[t] + k4 * 4));
#pragma GCC unroll 2
            for (int r = 0; r < RT; r++)
                acc[r][t] = dp_zmm(acc[r][t], xb, wv[r]);
        }
    }
#pragma GCC unroll 2
    for (int r = 0; r < RT; r++) {
        size_t n = (b->tile + r) * QS_W4_ROWS;
        __m512i corr = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(w->sum + n)), 7);
        __m512 s8 = _mm512_loadu_ps(w->s8 + n);
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][t], corr));
            __m512 sc = _mm512_mul_ps(s8, _mm512_set1_ps(b->sxo[t]));
            float *y = b->y[t] + r * QS_W4_ROWS;
            _mm512_storeu_ps(y, d->ng ? _mm512_fmadd_ps(sc, f, _mm512_loadu_ps(y))
                                      : _mm512_mul_ps(sc, f));
        }
    }
}

/* Constant-size instances, one per (path, rows, tokens). With 16 ymm
 * registers, 4 tokens take one tile (2 halves: 8 accumulators, 4 unpacked
 * weight vectors, 2 broadcasts) at a time; one token two tiles. */
#define YMM_INSTANCE(NAME, VNNI)                                                                   \
    static ATTR_AVX2 void NAME(const blk *b, int RT, int TT)                                       \
    {                                                                                              \
        if (TT == 1) {                                                                             \
            RT == 2 ? mk_ymm(b, 4, 1, VNNI) : mk_ymm(b, 2, 1, VNNI);                               \
            return;                                                                                \
        }                                                                                          \
        for (int i = 0; i < RT; i++) {                                                             \
            blk h = *b;                                                                            \
            h.tile += (size_t)i;                                                                   \
            for (int t = 0; t < 4; t++)                                                            \
                h.y[t] += i * QS_W4_ROWS;                                                          \
            mk_ymm(&h, 2, 4, VNNI);                                                                \
        }                                                                                          \
    }
YMM_INSTANCE(ymm_avx2, 0)
YMM_INSTANCE(ymm_vnni, 1)

static ATTR_AVX512 void zmm_vnni(const blk *b, int RT, int TT)
{
    if (TT == 4)
        RT == 2 ? mk_zmm(b, 2, 4) : mk_zmm(b, 1, 4);
    else
        RT == 2 ? mk_zmm(b, 2, 1) : mk_zmm(b, 1, 1);
}

/* Block bi (rows 32 bi.. of the padded Np) against all M tokens. */
static void block(const qs_w4 *w, const qs_w4_dims *d, const acts *a, size_t bi, size_t M, int kind,
                  float *Y)
{
    size_t ntiles = d->Np / QS_W4_ROWS, tile = 2 * bi, n0 = tile * QS_W4_ROWS;
    int RT = ntiles - tile >= 2 ? 2 : 1;
    size_t rows = RT * QS_W4_ROWS, valid = d->N - n0 < rows ? d->N - n0 : rows;
    float scratch[4][2 * QS_W4_ROWS]; /* the last block's outputs, rows past N included */
    blk b = {.w = w, .d = d, .a = a, .tile = tile};
    for (size_t m0 = 0; m0 < M;) {
        int TT = M - m0 >= 4 ? 4 : 1;
        for (int t = 0; t < TT; t++) {
            size_t m = m0 + t;
            b.y[t] = valid < rows ? scratch[t] : Y + m * d->N + n0;
            b.x4[t] = a->x4 + m * d->K4p;
            b.x8[t] = a->x8 + m * d->kop;
            b.sx[t] = a->sx + m * d->ng;
            b.xs[t] = a->xs + m * d->ng;
        }
        b.sxo = a->sxo + m0;
        if (kind == K_AVX512)
            zmm_vnni(&b, RT, TT);
        else if (kind == K_VNNI)
            ymm_vnni(&b, RT, TT);
        else
            ymm_avx2(&b, RT, TT);
        if (valid < rows)
            for (int t = 0; t < TT; t++)
                memcpy(Y + (m0 + t) * d->N + n0, scratch[t], valid * sizeof(float));
        m0 += (size_t)TT;
    }
}

int qs_w4a4_gemm(const qs_w4 *w, const float *X, size_t M, float *Y)
{
    qs_w4_dims d;
    int err = w4a4_args(w, X, M, Y, &d);
    if (err)
        return err;
    int path = qs_cpu_path_id();
    int kind = path == QS_PATH_SCALAR                              ? K_SCALAR
               : path >= QS_PATH_AVX512 && qs_cpu_has_avx512vnni() ? K_AVX512
               : path >= QS_PATH_AVXVNNI && qs_cpu_has_vnni()      ? K_VNNI
                                                                   : K_AVX2;
    acts a;
    if ((err = acts_make(w, &d, X, M, kind == K_VNNI || kind == K_AVX512, &a)))
        return err;
    if (kind == K_SCALAR) {
        int nomem = 0;
#pragma omp parallel reduction(| : nomem)
        {
            int8_t *c = malloc(d.K);
            nomem = !c;
#pragma omp for schedule(static)
            for (size_t n0 = 0; n0 < d.N; n0 += 32)
                if (c)
                    rows_scalar(w, &d, &a, M, n0, n0 + 32 < d.N ? n0 + 32 : d.N, c, Y);
            free(c);
        }
        if (nomem)
            err = qs_seterr(QS_ENOMEM, "out of memory for the W4A4 scalar kernel's row buffer");
    } else {
        size_t nblk = (d.Np / QS_W4_ROWS + 1) / 2;
        /* Dynamic: a core that loses its time slice must not hold up the call. */
#pragma omp parallel for schedule(dynamic, 2)
        for (size_t bi = 0; bi < nblk; bi++)
            block(w, &d, &a, bi, M, kind, Y);
    }
    acts_free(&a);
    return err;
}
