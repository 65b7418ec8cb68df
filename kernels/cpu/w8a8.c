/* w8a8.c: SmoothQuant W8A8 GEMM, Y[M x N] = X[M x K] W^T, int8 x int8 -> int32.
 *
 *   X  M x K fp32, quantized here per token in groups of G = w->group
 *      channels (dynamic) or per tensor (static)
 *   W  N x K int8 codes in the tiled order of qs_w8 (8 rows x 4 columns per
 *      256-bit vector), fp32 scale per row
 *   Y  M x N fp32 = sw[n] * sum_g sx[m,g] * sum_{k in g} xq[m,k] wq[n,k]
 *
 * Three paths, chosen at run time (qs_cpu_path): scalar; AVX2, where
 * vpmaddubsw multiplies |w| (u8) by x with w's sign (s8) so that a pair sum
 * is at most 2*127*127 = 32258 and never saturates int16 (the weights and
 * activations stop at +-127 for this reason), then vpmaddwd widens to int32;
 * AVX-VNNI, where vpdpbusd does u8 x s8 -> int32 in one instruction without
 * the int16 step, fed with x + 128 as u8 and corrected by 128 * sum_k w[n,k]
 * (kept in qs_w8.sum). Each 256-bit weight vector holds 8 rows x 4 columns,
 * so one broadcast of 4 activation bytes serves 8 rows and the int32 lanes
 * come out as 8 finished row sums: no horizontal reduction anywhere. Each
 * group's int32 sums are scaled into Y (an L1-resident tile) when the group
 * ends, so groups cost no extra registers; one group (per token) is the
 * SmoothQuant kernel unchanged.
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"
#include "w8.h"

/* Quantized activations, padded to Kp with zeros, in the form each path reads. */
typedef struct acts {
    int8_t *xq;  /* M x Kp codes */
    uint8_t *xa; /* AVX2: |xq|; VNNI: xq + 128 */
    float *sx;   /* M x ng scales, NaN where the token held NaN/Inf */
    size_t ng;   /* groups per token */
} acts;

static void acts_free(acts *a)
{
    free(a->xq);
    free(a->xa);
    free(a->sx);
}

static int acts_make(const qs_w8 *w, const float *X, size_t M, float act_scale, int vnni, acts *a)
{
    size_t K = w->K, Kp = w->Kp, G = w->group, ng = (K + G - 1) / G;
    a->ng = ng;
    a->xq = calloc(M, Kp);
    a->xa = calloc(M, Kp);
    a->sx = malloc(M * ng * sizeof(float));
    if (!a->xq || !a->xa || !a->sx) {
        acts_free(a);
        return qs_seterr(QS_ENOMEM, "out of memory for %zu quantized activation rows", M);
    }
#pragma omp parallel for schedule(static) if (M > 1)
    for (size_t m = 0; m < M; m++) {
        int bad = 0;
        for (size_t g = 0; g < ng; g++) {
            const float *x = X + m * K + g * G;
            size_t n = K - g * G < G ? K - g * G : G;
            float s = act_scale, inv;
            if (act_scale > 0) {
                inv = 1.0f / act_scale;
            } else {
                float mx = qs_act_absmax(x, n);
                s = mx / 127.0f;
                inv = mx > 0 ? 127.0f / mx : 0;
            }
            bad |= qs_act_row(x, n, inv, a->xq + m * Kp + g * G);
            a->sx[m * ng + g] = s;
        }
        /* A NaN or Inf anywhere makes the whole token's outputs NaN. */
        for (size_t g = 0; bad && g < ng; g++)
            a->sx[m * ng + g] = NAN;
        const int8_t *q = a->xq + m * Kp;
        for (size_t k = 0; k < Kp; k++)
            a->xa[m * Kp + k] = vnni ? (uint8_t)(q[k] + 128) : (uint8_t)(q[k] < 0 ? -q[k] : q[k]);
    }
    return QS_OK;
}

static int w8a8_args(const qs_w8 *w, const float *X, size_t M, float act_scale, const void *Y)
{
    if (!w || !X || !Y || !w->w || !w->scale || !w->sum)
        return qs_seterr(QS_EINVAL, "W8A8 GEMM got a NULL pointer: quantize the weights with "
                                    "qs_w8_quantize and pass M x K inputs and M x N outputs");
    if (w->group == 0 || w->group % 4 || w->group > w->Kp)
        return qs_seterr(QS_EINVAL,
                         "W8 matrix has activation group %zu for K=%zu: quantize it with "
                         "qs_w8_quantize",
                         w->group, w->K);
    if (isnan(act_scale) || isinf(act_scale))
        return qs_seterr(QS_EINVAL,
                         "static activation scale is %g: pass a finite scale > 0, "
                         "or <= 0 for per-token scales",
                         (double)act_scale);
    return qs_gemm_dims_ok(M, w->K, w->N);
}

/* ---- float64 reference ---------------------------------------------------- */

int qs_w8a8_gemm_ref_f64(const qs_w8 *w, const float *X, size_t M, float act_scale, double *Y)
{
    int err = w8a8_args(w, X, M, act_scale, Y);
    acts a;
    if (err || (err = acts_make(w, X, M, act_scale, 0, &a)))
        return err;
    for (size_t m = 0; m < M; m++)
        for (size_t n = 0; n < w->N; n++) {
            double y = 0;
            for (size_t g = 0; g < a.ng; g++) {
                int64_t acc = 0;
                size_t k1 = (g + 1) * w->group < w->K ? (g + 1) * w->group : w->K;
                for (size_t k = g * w->group; k < k1; k++)
                    acc += (int64_t)a.xq[m * w->Kp + k] * w->w[qs_w8_index(w->N, w->Kp, n, k)];
                y += (double)a.sx[m * a.ng + g] * (double)acc;
            }
            Y[m * w->N + n] = (double)w->scale[n] * y;
        }
    acts_free(&a);
    return QS_OK;
}

/* ---- scalar: rows [n0, n1), any layout -------------------------------------- */

static void rows_scalar(const qs_w8 *w, const acts *a, size_t M, size_t n0, size_t n1, float *Y)
{
    for (size_t n = n0; n < n1; n++)
        for (size_t m = 0; m < M; m++) {
            const int8_t *x = a->xq + m * w->Kp;
            float y = 0;
            for (size_t g = 0; g < a->ng; g++) {
                int32_t acc = 0;
                size_t k1 = (g + 1) * w->group < w->Kp ? (g + 1) * w->group : w->Kp;
                for (size_t k = g * w->group; k < k1; k++)
                    acc += (int32_t)x[k] * w->w[qs_w8_index(w->N, w->Kp, n, k)];
                y += a->sx[m * a->ng + g] * (float)acc;
            }
            Y[m * w->N + n] = w->scale[n] * y;
        }
}

/* ---- AVX2 and AVX-VNNI micro-kernels -----------------------------------------
 * RT tiles of 8 rows by TT tokens; acc[r][t] holds 8 row sums. Instantiated
 * with constant RT and TT so that the accumulators live in registers. */

#define ATTR_AVX2 __attribute__((target("avx2,fma,f16c")))
#define ATTR_VNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#define INLINE    static inline __attribute__((always_inline))
/* Software prefetch distance for the weight streams at batch 1: the
 * hardware prefetcher alone left a core well below its streaming rate. */
#define PF_AHEAD 4096

/* Where the tokens m0..m0+TT-1 of one tile block read their scales and
 * write their outputs: computed once per block, not once per group. */
typedef struct outs {
    float *y[4];        /* Y + m * N + the block's first row */
    const float *sx[4]; /* the token's group scales */
} outs;

INLINE void outs_make(const qs_w8 *w, const acts *a, size_t tile, size_t m0, int TT, float *Y,
                      outs *o)
{
    for (int t = 0; t < TT; t++) {
        o->y[t] = Y + (m0 + t) * w->N + tile * 8;
        o->sx[t] = a->sx + (m0 + t) * a->ng;
    }
}

/* Group g's int32 sums, rows tile*8.. of the block, scaled into Y: times the
 * token's group scale, added to the earlier groups' (kept in Y, an L1-resident
 * tile), times the row scales after the last group. VNNI first takes off
 * 128 * the group's weight sums (the +128 on its activations). */
INLINE ATTR_AVX2 void flush_group(const qs_w8 *w, const acts *a, size_t tile, size_t g, int RT,
                                  int TT, __m256i acc[3][4], int vnni, const outs *o)
{
    int last = g + 1 == a->ng;
#pragma GCC unroll 4
    for (int r = 0; r < RT; r++) {
        size_t n = (tile + r) * 8;
        __m256i corr =
            vnni
                ? _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(w->sum + g * w->N + n)), 7)
                : _mm256_setzero_si256();
        __m256 sw = _mm256_loadu_ps(w->scale + n);
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][t], corr));
            __m256 sx = _mm256_set1_ps(o->sx[t][g]);
            float *y = o->y[t] + r * 8;
            __m256 v = g ? _mm256_fmadd_ps(sx, f, _mm256_loadu_ps(y)) : _mm256_mul_ps(sx, f);
            _mm256_storeu_ps(y, last ? _mm256_mul_ps(v, sw) : v);
        }
    }
}

static inline int32_t load4(const uint8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

INLINE ATTR_AVX2 void mk_avx2(const qs_w8 *w, const acts *a, size_t tile, size_t m0, int RT, int TT,
                              float *Y)
{
    const size_t Kp = w->Kp, G4 = w->group / 4;
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *wt = w->w + tile * 8 * Kp;
    outs o;
    outs_make(w, a, tile, m0, TT, Y, &o);
    for (size_t g = 0; g < a->ng; g++) {
        __m256i acc[3][4];
#pragma GCC unroll 4
        for (int r = 0; r < RT; r++)
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++)
                acc[r][t] = _mm256_setzero_si256();
        size_t kend = (g + 1) * G4 < Kp / 4 ? (g + 1) * G4 : Kp / 4;
        for (size_t k4 = g * G4; k4 < kend; k4++) {
            __m256i wa[3], wv[3];
#pragma GCC unroll 4
            for (int r = 0; r < RT; r++) {
                wv[r] = _mm256_loadu_si256((const __m256i *)(wt + r * 8 * Kp + k4 * 32));
                wa[r] = _mm256_abs_epi8(wv[r]);
                if (TT == 1 && k4 % 2 == 0)
                    _mm_prefetch((const char *)(wt + r * 8 * Kp + k4 * 32) + PF_AHEAD, _MM_HINT_T0);
            }
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++) {
                __m256i xb =
                    _mm256_set1_epi32(load4((const uint8_t *)a->xq + (m0 + t) * Kp + 4 * k4));
#pragma GCC unroll 4
                for (int r = 0; r < RT; r++) {
                    /* |w| * (x with w's sign) = w * x, pairs summed in int16 */
                    __m256i p = _mm256_maddubs_epi16(wa[r], _mm256_sign_epi8(xb, wv[r]));
                    acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(p, ones));
                }
            }
        }
        flush_group(w, a, tile, g, RT, TT, acc, 0, &o);
    }
}

/* acc += u8 a . s8 b, 4 products per int32 lane. Inline asm because GCC 12
 * copies (and spills) the tied accumulator of _mm256_dpbusd_avx_epi32 on
 * every call: 2.5 moves per vpdpbusd in the inner loop. */
INLINE ATTR_VNNI __m256i dpbusd(__m256i acc, __m256i a, __m256i b)
{
    __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(a), "x"(b));
    return acc;
}

INLINE ATTR_VNNI void mk_vnni(const qs_w8 *w, const acts *a, size_t tile, size_t m0, int RT, int TT,
                              float *Y)
{
    const size_t Kp = w->Kp, G4 = w->group / 4;
    const int8_t *wt = w->w + tile * 8 * Kp;
    outs o;
    outs_make(w, a, tile, m0, TT, Y, &o);
    for (size_t g = 0; g < a->ng; g++) {
        __m256i acc[3][4];
#pragma GCC unroll 4
        for (int r = 0; r < RT; r++)
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++)
                acc[r][t] = _mm256_setzero_si256();
        size_t kend = (g + 1) * G4 < Kp / 4 ? (g + 1) * G4 : Kp / 4;
        for (size_t k4 = g * G4; k4 < kend; k4++) {
            __m256i wv[3];
#pragma GCC unroll 4
            for (int r = 0; r < RT; r++) {
                wv[r] = _mm256_loadu_si256((const __m256i *)(wt + r * 8 * Kp + k4 * 32));
                if (TT == 1 && k4 % 2 == 0) /* GEMV streams: see PF_AHEAD */
                    _mm_prefetch((const char *)(wt + r * 8 * Kp + k4 * 32) + PF_AHEAD, _MM_HINT_T0);
            }
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++) {
                __m256i xb = _mm256_set1_epi32(load4(a->xa + (m0 + t) * Kp + 4 * k4));
#pragma GCC unroll 4
                for (int r = 0; r < RT; r++)
                    acc[r][t] = dpbusd(acc[r][t], xb, wv[r]);
            }
        }
        flush_group(w, a, tile, g, RT, TT, acc, 1, &o);
    }
}

/* One block of RT tiles (RT = 3: 24 rows) against all M tokens, TT = 4 at a
 * time: 12 independent accumulators cover vpdpbusd's 5-cycle latency at 2
 * per cycle (8 left it a third idle). */
#define TILE_BLOCK(NAME, MK, ATTR)                                                                 \
    static ATTR void NAME(const qs_w8 *w, const acts *a, size_t tile, int RT, size_t M, float *Y)  \
    {                                                                                              \
        size_t m = 0;                                                                              \
        for (; m + 4 <= M; m += 4)                                                                 \
            RT == 3   ? MK(w, a, tile, m, 3, 4, Y)                                                 \
            : RT == 2 ? MK(w, a, tile, m, 2, 4, Y)                                                 \
                      : MK(w, a, tile, m, 1, 4, Y);                                                \
        for (; m < M; m++)                                                                         \
            RT == 3   ? MK(w, a, tile, m, 3, 1, Y)                                                 \
            : RT == 2 ? MK(w, a, tile, m, 2, 1, Y)                                                 \
                      : MK(w, a, tile, m, 1, 1, Y);                                                \
    }
TILE_BLOCK(block_avx2, mk_avx2, ATTR_AVX2)
TILE_BLOCK(block_vnni, mk_vnni, ATTR_VNNI)

int qs_w8a8_gemm(const qs_w8 *w, const float *X, size_t M, float act_scale, float *Y)
{
    int err = w8a8_args(w, X, M, act_scale, Y);
    int path = qs_cpu_path_id(), vnni = path >= QS_PATH_AVXVNNI && qs_cpu_has_vnni();
    acts a;
    if (err || (err = acts_make(w, X, M, act_scale, vnni, &a)))
        return err;
    size_t ntiles = w->N / 8, nblk = (ntiles + 2) / 3;
    if (path == QS_PATH_SCALAR) {
#pragma omp parallel for schedule(static)
        for (size_t b = 0; b < nblk; b++)
            rows_scalar(w, &a, M, b * 24, (3 * b + 3 <= ntiles ? 3 * b + 3 : ntiles) * 8, Y);
    } else {
        /* Dynamic: a core that loses its time slice must not hold up the call. */
#pragma omp parallel for schedule(dynamic, 2)
        for (size_t b = 0; b < nblk; b++) {
            int RT = (int)(ntiles - 3 * b < 3 ? ntiles - 3 * b : 3);
            if (vnni)
                block_vnni(w, &a, 3 * b, RT, M, Y);
            else
                block_avx2(w, &a, 3 * b, RT, M, Y);
        }
    }
    rows_scalar(w, &a, M, ntiles * 8, w->N, Y); /* the N % 8 rest */
    acts_free(&a);
    return QS_OK;
}
