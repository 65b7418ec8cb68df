/* w4.c: the W4A4 (Atom) format. Weights N x K, input channels reordered by
 * perm (position j holds original channel perm[j]):
 *
 *   positions j < K4 = K - ko   INT4, codes -7..7, fp32 scale s4[n][g] per row
 *                               and group g = j / G (clipping search below)
 *   positions j >= K4           INT8 outliers, codes -127..127, s8[n] = max/127
 *
 * and the activations' codes, per token: INT4 per group of G positions
 * (sx = max/7), INT8 over the outliers (sxo = max/127). The memory order of
 * the codes is in w4.h; qs_w4_codes / qs_w4_from_codes convert from and to
 * plain position-order codes. */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"
#include "w4.h"

/* Clip ratios tried per (row, group): 1.00, 0.99, ..., 0.70 of the group's
 * max, the least squared error kept. Against plain max scaling the error
 * falls by ~18 % on Gaussian and ~15 % on Student-t(3) weights
 * (test_w4_clip_search): the largest weights clip, the rest sit on a finer
 * grid. 1.00 is among them, so the search is never worse than max scaling. */
#define CLIP_STEPS 31
#define CLIP_STEP  0.01f

size_t qs_w4_group(size_t K4, size_t group)
{
    size_t g = group ? group : 128, k = K4 < 8 ? 8 : (K4 + 7) / 8 * 8;
    return g > k ? k : g;
}

int qs_w4_shape(size_t N, size_t K, size_t ko, size_t group, qs_w4_dims *d)
{
    memset(d, 0, sizeof(*d));
    if (N == 0 || K == 0)
        return qs_seterr(QS_EINVAL,
                         "W4 matrix is empty (N=%zu, K=%zu): pass at least one row and one "
                         "input channel",
                         N, K);
    if (ko > K)
        return qs_seterr(QS_EINVAL,
                         "%zu outlier channels of only K=%zu: ko must be at most K (128 is "
                         "Atom's usual)",
                         ko, K);
    /* The kernels step through the INT4 positions 8 at a time. */
    if (group % 8)
        return qs_seterr(QS_EINVAL,
                         "W4 group of %zu positions: use a multiple of 8 (128 is the usual), or "
                         "0 for the default",
                         group);
    /* perm is uint32 and the kernels index scales with int32 (16 * ng). */
    if (K > (size_t)1 << 30 || N > SIZE_MAX / 2)
        return qs_seterr(QS_EOVERFLOW,
                         "W4 matrix of N=%zu K=%zu is too large: split it (K up to 2^30)", N, K);
    d->N = N, d->K = K, d->ko = ko, d->K4 = K - ko;
    d->G = qs_w4_group(d->K4, group);
    d->Np = (N + QS_W4_ROWS - 1) / QS_W4_ROWS * QS_W4_ROWS;
    d->K4p = (d->K4 + 7) / 8 * 8, d->kop = (ko + 3) / 4 * 4;
    d->ng = (d->K4 + d->G - 1) / d->G;
    size_t t;
    if (__builtin_mul_overflow(d->Np, d->K4p + d->kop + 4 * d->ng + 8, &t))
        return qs_seterr(QS_EOVERFLOW, "W4 sizes overflow for N=%zu K=%zu: split the matrix", N, K);
    return QS_OK;
}

size_t qs_w4_bytes(size_t N, size_t K, size_t ko, size_t group)
{
    qs_w4_dims d;
    if (qs_w4_shape(N, K, ko, group, &d))
        return 0;
    /* codes, s4, s8 and sum (rows padded to 16), perm */
    return d.Np * d.K4p / 2 + d.Np * d.kop + d.Np * d.ng * 4 + d.Np * 8 + K * 4;
}

int qs_w4_check(const qs_w4 *w, const char *who, qs_w4_dims *d)
{
    if (!w)
        return qs_seterr(QS_EINVAL, "%s got a NULL W4 matrix: quantize one with qs_w4_quantize",
                         who);
    int err = qs_w4_shape(w->N, w->K, w->ko, w->group, d);
    if (err)
        return err;
    if (w->group == 0 || !w->perm || (d->K4 && (!w->w4 || !w->s4)) ||
        (w->ko && (!w->w8 || !w->s8 || !w->sum)))
        return qs_seterr(QS_EINVAL,
                         "%s got an incomplete W4 matrix (closed, or not made by "
                         "qs_w4_quantize / qs_w4_from_codes): make it with one of those",
                         who);
    return QS_OK;
}

void qs_w4_close(qs_w4 *w)
{
    if (!w)
        return;
    free(w->perm);
    free(w->w4);
    free(w->s4);
    free(w->w8);
    free(w->s8);
    free(w->sum);
    memset(w, 0, sizeof(*w));
}

/* Checks perm (NULL: identity) and copies it into w->perm. */
static int set_perm(qs_w4 *w, const uint32_t *perm, size_t K)
{
    if (!perm) {
        for (size_t j = 0; j < K; j++)
            w->perm[j] = (uint32_t)j;
        return QS_OK;
    }
    uint8_t *seen = calloc(K, 1);
    if (!seen)
        return qs_seterr(QS_ENOMEM, "out of memory checking a W4 permutation of %zu", K);
    for (size_t j = 0; j < K; j++) {
        if (perm[j] >= K || seen[perm[j]]) {
            int dup = perm[j] < K;
            free(seen);
            return qs_seterr(QS_EINVAL,
                             "perm is not a permutation of 0..%zu: perm[%zu] = %u %s; list "
                             "every input channel exactly once (outliers last)",
                             K - 1, j, (unsigned)perm[j],
                             dup ? "appears twice" : "is out of range");
        }
        seen[perm[j]] = 1;
        w->perm[j] = perm[j];
    }
    free(seen);
    return QS_OK;
}

/* Allocates out for the shape (codes 0, scales 0) and sets perm. */
static int w4_alloc(qs_w4 *out, const qs_w4_dims *d, const uint32_t *perm)
{
    memset(out, 0, sizeof(*out));
    out->perm = malloc(d->K * sizeof(uint32_t));
    int bad = !out->perm;
    if (d->K4) {
        out->w4 = malloc(d->Np * d->K4p / 2);
        out->s4 = calloc(d->Np * d->ng, sizeof(float));
        bad |= !out->w4 || !out->s4;
        if (out->w4)
            memset(out->w4, 0x88, d->Np * d->K4p / 2); /* code 0 in both nibbles */
    }
    if (d->ko) {
        out->w8 = calloc(d->Np, d->kop);
        out->s8 = calloc(d->Np, sizeof(float));
        out->sum = calloc(d->Np, sizeof(int32_t));
        bad |= !out->w8 || !out->s8 || !out->sum;
    }
    if (bad) {
        qs_w4_close(out);
        return qs_seterr(QS_ENOMEM, "out of memory for a %zu x %zu W4 matrix", d->N, d->K);
    }
    out->N = d->N, out->K = d->K, out->ko = d->ko, out->group = d->G;
    int err = set_perm(out, perm, d->K);
    if (err)
        qs_w4_close(out);
    return err;
}

/* Row n's codes (position order, K of them) into the kernel order. */
static void pack_row(qs_w4 *w, const qs_w4_dims *d, size_t n, const int8_t *c)
{
    for (size_t j = 0; j < d->K4; j++) {
        uint8_t *b = w->w4 + qs_w4_index(d->K4p, n, j), v = (uint8_t)(c[j] + 8);
        *b = (j >> 2) & 1 ? (uint8_t)((*b & 0x0f) | v << 4) : (uint8_t)((*b & 0xf0) | v);
    }
    int32_t sum = 0;
    for (size_t i = 0; i < d->ko; i++) {
        w->w8[qs_w4_index8(d->kop, n, i)] = c[d->K4 + i];
        sum += c[d->K4 + i];
    }
    if (d->ko)
        w->sum[n] = sum;
}

/* x rounded to the nearest integer, ties to even, for |x| < 2^22: the
 * default rounding mode does it in the add, and GCC vectorizes it (plain
 * x86-64 has no vector nearbyintf). Equals nearbyintf there. */
static inline float rne(float x)
{
    return (x + 12582912.0f) - 12582912.0f;
}

/* Squared error of v[0..n) on the grid s * (-7..7) with codes rne(v * inv),
 * in eight fp32 lanes (vectorized; the candidates' errors compare within
 * fp32 rounding). */
static float grid_err(const float *v, size_t n, float s, float inv)
{
    float e[8] = {0};
    size_t k = 0;
    for (; k + 8 <= n; k += 8)
        for (int l = 0; l < 8; l++) {
            float q = rne(v[k + l] * inv);
            q = q > 7 ? 7 : (q < -7 ? -7 : q);
            float r = v[k + l] - s * q;
            e[l] += r * r;
        }
    for (; k < n; k++) {
        float q = rne(v[k] * inv);
        q = q > 7 ? 7 : (q < -7 ? -7 : q);
        float r = v[k] - s * q;
        e[0] += r * r;
    }
    return ((e[0] + e[1]) + (e[2] + e[3])) + ((e[4] + e[5]) + (e[6] + e[7]));
}

/* One (row, group): the clip ratio with the least squared error, its codes
 * into c, its scale returned. A group whose max is below FLT_MIN (zeros, or
 * a scale 7/max would overflow) is all zeros with scale 0. */
static float quant_group(const float *v, size_t n, int8_t *c)
{
    float mx = 0;
    for (size_t k = 0; k < n; k++)
        mx = fmaxf(mx, fabsf(v[k]));
    if (!(mx >= FLT_MIN)) {
        memset(c, 0, n);
        return 0;
    }
    float best = INFINITY, bs = 0, binv = 0;
    for (int i = 0; i < CLIP_STEPS; i++) {
        float m = mx * (1.0f - CLIP_STEP * (float)i), s = m / 7.0f, inv = 7.0f / m;
        float e = grid_err(v, n, s, inv);
        if (e < best)
            best = e, bs = s, binv = inv;
    }
    for (size_t k = 0; k < n; k++) {
        float q = rne(v[k] * binv);
        c[k] = (int8_t)(q > 7 ? 7 : (q < -7 ? -7 : q));
    }
    return bs;
}

float qs_w4_fit_group(const float *v, size_t n, int8_t *c)
{
    return quant_group(v, n, c);
}

int qs_w4_quantize(qs_w4 *out, const float *W, size_t N, size_t K, const uint32_t *perm, size_t ko,
                   size_t group)
{
    if (!out || !W)
        return qs_seterr(QS_EINVAL, "qs_w4_quantize got a NULL pointer: pass the output struct "
                                    "and the N x K weights");
    memset(out, 0, sizeof(*out));
    qs_w4_dims d;
    int err = qs_w4_shape(N, K, ko, group, &d);
    if (err || (err = w4_alloc(out, &d, perm)))
        return err;
    int bad = 0, nomem = 0;
#pragma omp parallel reduction(| : bad, nomem)
    {
        float *v = malloc(K * sizeof(float));
        int8_t *c = malloc(K);
        if (!v || !c)
            nomem = 1;
#pragma omp for schedule(dynamic, 16)
        for (size_t n = 0; n < N; n++) {
            if (!v || !c)
                continue;
            const float *row = W + n * K;
            for (size_t j = 0; j < K; j++) {
                v[j] = row[out->perm[j]];
                bad |= !isfinite(v[j]);
            }
            for (size_t g = 0; g < d.ng; g++) {
                size_t j0 = g * d.G, j1 = j0 + d.G < d.K4 ? j0 + d.G : d.K4;
                out->s4[n * d.ng + g] = quant_group(v + j0, j1 - j0, c + j0);
            }
            float mx = 0;
            for (size_t j = d.K4; j < K; j++)
                mx = fmaxf(mx, fabsf(v[j]));
            float inv = mx >= FLT_MIN ? 127.0f / mx : 0;
            for (size_t j = d.K4; j < K; j++) {
                float q = nearbyintf(v[j] * inv);
                c[j] = (int8_t)(q > 127 ? 127 : (q < -127 ? -127 : q));
            }
            if (ko)
                out->s8[n] = mx >= FLT_MIN ? mx / 127.0f : 0;
            pack_row(out, &d, n, c);
        }
        free(v);
        free(c);
    }
    if (nomem || bad) {
        qs_w4_close(out);
        return nomem ? qs_seterr(QS_ENOMEM, "out of memory quantizing a %zu x %zu W4 matrix", N, K)
                     : qs_seterr(QS_EINVAL, "weights hold NaN or Inf: fix the checkpoint before "
                                            "quantizing it");
    }
    return QS_OK;
}

/* A scale array of count entries: finite and >= 0. */
static int scales_ok(const float *s, size_t count, const char *name, size_t ng)
{
    for (size_t i = 0; i < count; i++)
        if (!(s[i] >= 0 && s[i] <= FLT_MAX))
            return qs_seterr(QS_EINVAL,
                             "%s[%zu][%zu] = %g: scales must be finite and >= 0 (the codes "
                             "carry the sign)",
                             name, i / ng, i % ng, (double)s[i]);
    return QS_OK;
}

int qs_w4_from_codes(qs_w4 *out, const int8_t *codes, const float *s4, const float *s8, size_t N,
                     size_t K, const uint32_t *perm, size_t ko, size_t group)
{
    if (!out)
        return qs_seterr(QS_EINVAL, "qs_w4_from_codes got a NULL output struct");
    memset(out, 0, sizeof(*out));
    qs_w4_dims d;
    int err = qs_w4_shape(N, K, ko, group, &d);
    if (err)
        return err;
    if (!codes || (d.K4 && !s4) || (ko && !s8))
        return qs_seterr(QS_EINVAL,
                         "qs_w4_from_codes got a NULL pointer: pass N x K codes, s4 [N][%zu] "
                         "(NULL only when ko = K) and s8 [N] (NULL only when ko = 0)",
                         d.ng);
    if ((err = scales_ok(s4, N * d.ng, "s4", d.ng)) || (err = scales_ok(s8, ko ? N : 0, "s8", 1)))
        return err;
    for (size_t n = 0; n < N; n++)
        for (size_t j = 0; j < K; j++) {
            int c = codes[n * K + j], lim = j < d.K4 ? 7 : 127;
            if (c < -lim || c > lim)
                return qs_seterr(QS_EINVAL,
                                 "code %d at row %zu, position %zu is out of range: INT4 "
                                 "positions (before K4 = %zu) take -7..7, outliers -127..127",
                                 c, n, j, d.K4);
        }
    if ((err = w4_alloc(out, &d, perm)))
        return err;
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < N; n++)
        pack_row(out, &d, n, codes + n * K);
    if (d.K4)
        memcpy(out->s4, s4, N * d.ng * sizeof(float));
    if (ko)
        memcpy(out->s8, s8, N * sizeof(float));
    return QS_OK;
}

int qs_w4_codes(const qs_w4 *w, int8_t *codes)
{
    qs_w4_dims d;
    int err = qs_w4_check(w, "qs_w4_codes", &d);
    if (err)
        return err;
    if (!codes)
        return qs_seterr(QS_EINVAL, "qs_w4_codes got a NULL buffer: pass N x K bytes");
    for (size_t n = 0; n < d.N; n++) {
        int8_t *c = codes + n * d.K;
        for (size_t j = 0; j < d.K4; j++)
            c[j] = (int8_t)qs_w4_get4(w, d.K4p, n, j);
        for (size_t i = 0; i < d.ko; i++)
            c[d.K4 + i] = w->w8[qs_w4_index8(d.kop, n, i)];
    }
    return QS_OK;
}

int qs_w4_dequant(const qs_w4 *w, float *W)
{
    qs_w4_dims d;
    int err = qs_w4_check(w, "qs_w4_dequant", &d);
    if (err)
        return err;
    if (!W)
        return qs_seterr(QS_EINVAL, "qs_w4_dequant got a NULL buffer: pass N x K floats");
    for (size_t n = 0; n < d.N; n++) {
        float *row = W + n * d.K;
        for (size_t j = 0; j < d.K4; j++)
            row[w->perm[j]] = w->s4[n * d.ng + j / d.G] * (float)qs_w4_get4(w, d.K4p, n, j);
        for (size_t i = 0; i < d.ko; i++)
            row[w->perm[d.K4 + i]] = w->s8[n] * (float)w->w8[qs_w4_index8(d.kop, n, i)];
    }
    return QS_OK;
}

/* ---- activations ---------------------------------------------------------- */

/* v[0..n) (one group, already in position order) to codes -qmax..qmax
 * with scale max/qmax: the rule of qs_w4_quant_act in qs_kernels.h. A code
 * that is NaN (0 * Inf when qmax / max overflowed, or a NaN or Inf input,
 * whose token is zeroed afterwards) becomes 0. Returns 1 if a value is NaN
 * or Inf. */
static int act_group(const float *v, size_t n, float qmax, int8_t *q, float *scale)
{
    float mx = 0;
    int bad = 0;
    for (size_t k = 0; k < n; k++) {
        mx = fmaxf(mx, fabsf(v[k])); /* skips NaN */
        bad |= !isfinite(v[k]);
    }
    float inv = mx > 0 ? qmax / mx : 0;
    for (size_t k = 0; k < n; k++) {
        float c = nearbyintf(v[k] * inv);
        c = c > qmax ? qmax : (c < -qmax ? -qmax : c);
        q[k] = (int8_t)(c == c ? c : 0);
    }
    *scale = mx / qmax;
    return bad;
}

/* The same rule on eight lanes, bit for bit: the maximum is exact in any
 * order; (x + 1.5 * 2^23) - 1.5 * 2^23 is nearbyintf for |x| < 2^22 and
 * keeps Inf and NaN; the operand order of vminps/vmaxps keeps a NaN (as the
 * scalar comparisons do) until it is set to 0. No "fma" target, so that
 * the product and the add can never be contracted into one rounding. */
__attribute__((target("avx2"))) static int act_group_avx2(const float *v, size_t n, float qmax,
                                                          int8_t *q, float *scale)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m8 = _mm256_setzero_ps(), z8 = m8;
    size_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 x = _mm256_loadu_ps(v + k);
        m8 = _mm256_max_ps(_mm256_andnot_ps(sign, x), m8);             /* NaN: keeps m8 */
        z8 = _mm256_add_ps(z8, _mm256_mul_ps(x, _mm256_setzero_ps())); /* NaN iff NaN/Inf */
    }
    float l8[8], mx = 0, z = 0;
    _mm256_storeu_ps(l8, m8);
    for (int l = 0; l < 8; l++)
        mx = fmaxf(mx, l8[l]);
    _mm256_storeu_ps(l8, z8);
    for (int l = 0; l < 8; l++)
        z += l8[l];
    for (; k < n; k++) {
        mx = fmaxf(mx, fabsf(v[k]));
        z += v[k] * 0.0f;
    }
    float inv = mx > 0 ? qmax / mx : 0;
    const __m256 vi = _mm256_set1_ps(inv), rn = _mm256_set1_ps(12582912.0f),
                 hi = _mm256_set1_ps(qmax), lo = _mm256_set1_ps(-qmax);
    for (k = 0; k + 8 <= n; k += 8) {
        __m256 c = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(v + k), vi), rn), rn);
        c = _mm256_max_ps(lo, _mm256_min_ps(hi, c)); /* second operand on NaN: c */
        c = _mm256_and_ps(c, _mm256_cmp_ps(c, c, _CMP_ORD_Q));
        __m256i i = _mm256_cvtps_epi32(c);
        __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
        _mm_storel_epi64((__m128i *)(q + k), _mm_packs_epi16(h, h));
    }
    for (; k < n; k++) {
        float c = nearbyintf(v[k] * inv);
        c = c > qmax ? qmax : (c < -qmax ? -qmax : c);
        q[k] = (int8_t)(c == c ? c : 0);
    }
    *scale = mx / qmax;
    return z != 0;
}

/* x[perm[j]] for j < K into buf: 8 at a time by vgatherdps (perm < 2^30). */
__attribute__((target("avx2"))) static void gather_avx2(const float *x, const uint32_t *perm,
                                                        size_t K, float *buf)
{
    size_t j = 0;
    for (; j + 8 <= K; j += 8)
        _mm256_storeu_ps(
            buf + j, _mm256_i32gather_ps(x, _mm256_loadu_si256((const __m256i *)(perm + j)), 4));
    for (; j < K; j++)
        buf[j] = x[perm[j]];
}

int qs_w4_act_token(const qs_w4 *w, const qs_w4_dims *d, const float *x, float *buf, int8_t *q4,
                    int8_t *q8, float *sx, float *sxo)
{
    int simd = qs_cpu_path_id() >= QS_PATH_AVX2, bad = 0;
    if (simd)
        gather_avx2(x, w->perm, d->K, buf);
    else
        for (size_t j = 0; j < d->K; j++)
            buf[j] = x[w->perm[j]];
    for (size_t g = 0; g < d->ng; g++) {
        size_t j0 = g * d->G, j1 = j0 + d->G < d->K4 ? j0 + d->G : d->K4;
        bad |= (simd ? act_group_avx2 : act_group)(buf + j0, j1 - j0, 7.0f, q4 + j0, sx + g);
    }
    *sxo = 0;
    if (d->ko)
        bad |= (simd ? act_group_avx2 : act_group)(buf + d->K4, d->ko, 127.0f, q8, sxo);
    if (bad) {
        memset(q4, 0, d->K4);
        memset(q8, 0, d->ko);
        for (size_t g = 0; g < d->ng; g++)
            sx[g] = NAN;
        *sxo = NAN;
    }
    return bad;
}

int qs_w4_quant_act(const qs_w4 *w, const float *X, size_t M, int8_t *xq, float *sx, float *sxo)
{
    qs_w4_dims d;
    int err = qs_w4_check(w, "qs_w4_quant_act", &d);
    if (err)
        return err;
    if (!X || !xq || (d.ng && !sx) || !sxo || M == 0)
        return qs_seterr(QS_EINVAL,
                         "qs_w4_quant_act needs M >= 1 tokens of K=%zu activations, an M x K "
                         "code buffer, M x %zu group scales (NULL only when ko = K) and M "
                         "outlier scales",
                         d.K, d.ng);
    if ((err = qs_gemm_dims_ok(M, d.K, d.ng + 1)))
        return err;
    int nomem = 0;
#pragma omp parallel if (M > 1) reduction(| : nomem)
    {
        float *buf = malloc(d.K * sizeof(float));
        nomem = !buf;
#pragma omp for schedule(static)
        for (size_t m = 0; m < M; m++)
            if (buf)
                qs_w4_act_token(w, &d, X + m * d.K, buf, xq + m * d.K, xq + m * d.K + d.K4,
                                d.ng ? sx + m * d.ng : NULL, sxo + m);
        free(buf);
    }
    if (nomem)
        return qs_seterr(QS_ENOMEM, "out of memory for a token of %zu activations", d.K);
    return QS_OK;
}
