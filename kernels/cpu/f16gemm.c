/* f16gemm.c: Y (M x N) = X (M x K) W^T with X in fp32 and W an N x K matrix
 * in fp16 (IEEE bits), fp32 sums: the LM head and embedding table of a CPU
 * rank's quantized models, kept in fp16 as a GPU keeps them, so that a
 * decode step reads half the bytes for them (SmolLM2's tied 49152 x 576
 * table: 57 MB instead of 113). The plain reference is qs_f16_gemm_ref_f64.
 *
 * Each row of W is widened to fp32 once (F16C) into a per-thread buffer and
 * used for every token; blocks of rows are shared out over the threads.
 * Each output is summed in one order on a path (below), whatever the
 * number of tokens: each path gives the same result every run and at
 * every batch size. */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

/* ---- Widening a row -------------------------------------------------------- */

static void widen_scalar(const uint16_t *h, size_t K, float *out)
{
    for (size_t k = 0; k < K; k++)
        out[k] = qs_fp16_to_fp32(h[k]);
}

__attribute__((target("avx2,fma,f16c"))) static void widen_avx2(const uint16_t *h, size_t K,
                                                                float *out)
{
    size_t k = 0;
    for (; k + 8 <= K; k += 8)
        _mm256_storeu_ps(out + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + k))));
    for (; k < K; k++)
        out[k] = qs_fp16_to_fp32(h[k]);
}

__attribute__((target("avx512f"))) static void widen_avx512(const uint16_t *h, size_t K, float *out)
{
    size_t k = 0;
    for (; k + 16 <= K; k += 16)
        _mm512_storeu_ps(out + k, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + k))));
    for (; k < K; k++)
        out[k] = qs_fp16_to_fp32(h[k]);
}

/* ---- Products of a block of rows with a block of tokens -----------------------
 * Every output Y[m][n] is summed in one order whatever M is, so a token's
 * logits do not depend on the other tokens of its call (continuous
 * batching gives a sequence the tokens it gets alone): one accumulator per
 * (row, token), vector lanes over k ascending, the tail masked (AVX-512) or
 * in order (AVX2), then the lanes. Blocks of 4 rows x 4 tokens keep 16
 * accumulators in registers and load 8 vectors per 16 FMAs (a dot product
 * at a time loads 2 per FMA); one token at a time takes 8 rows, so that 8
 * independent sums hide the FMA latency. A block short of rows or tokens
 * repeats its last one and drops the copies' results. */

#define RB 4 /* rows per block when several tokens share it */
#define TB 4 /* tokens per block */
#define R1 8 /* rows per block for a single token */

/* One k step of 16 lanes (masked at the tail) for every (row, token). The
 * loops over the block are unrolled so that the accumulators stay in
 * registers. */
#define STEP_512(LOAD)                                                                             \
    do {                                                                                           \
        __m512 wv[RB], xv[TB];                                                                     \
        _Pragma("GCC unroll 4") for (int r = 0; r < RB; r++) wv[r] = LOAD(w[r]);                   \
        _Pragma("GCC unroll 4") for (int t = 0; t < TB; t++) xv[t] = LOAD(x[t]);                   \
        _Pragma("GCC unroll 4") for (int r = 0; r < RB; r++)                                       \
            _Pragma("GCC unroll 4") for (int t = 0; t < TB; t++) acc[r][t] =                       \
                _mm512_fmadd_ps(wv[r], xv[t], acc[r][t]);                                          \
    } while (0)

/* y[t][r] = w[r] . x[t] for RB rows and TB tokens (AVX-512). */
__attribute__((target("avx512f"))) static void
block_512(const float *const w[RB], const float *const x[TB], size_t K, float y[TB][RB])
{
    __m512 acc[RB][TB];
    _Pragma("GCC unroll 4") for (int r = 0; r < RB; r++)
        _Pragma("GCC unroll 4") for (int t = 0; t < TB; t++) acc[r][t] = _mm512_setzero_ps();
    size_t k = 0;
#define FULL(p) _mm512_loadu_ps((p) + k)
    for (; k + 16 <= K; k += 16)
        STEP_512(FULL);
    if (k < K) {
        __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
#define MASKED(p) _mm512_maskz_loadu_ps(m, (p) + k)
        STEP_512(MASKED);
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < RB; r++)
        _Pragma("GCC unroll 4") for (int t = 0; t < TB; t++) y[t][r] =
            _mm512_reduce_add_ps(acc[r][t]);
}

/* y[r] = h[r] . x for R1 fp16 rows and one token (AVX-512), in block_512's
 * order: each row widened as it is read, since one token reads it once. */
__attribute__((target("avx512f"))) static void rows_512(const uint16_t *const h[R1], const float *x,
                                                        size_t K, float y[R1])
{
    __m512 acc[R1];
    _Pragma("GCC unroll 8") for (int r = 0; r < R1; r++) acc[r] = _mm512_setzero_ps();
    size_t k = 0;
#define WIDE(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((p) + k)))
    for (; k + 16 <= K; k += 16) {
        __m512 xv = FULL(x);
        _Pragma("GCC unroll 8") for (int r = 0; r < R1; r++) acc[r] =
            _mm512_fmadd_ps(WIDE(h[r]), xv, acc[r]);
    }
    if (k < K) {
        __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
        __m512 xv = MASKED(x);
        for (int r = 0; r < R1; r++) {
            float t[16];
            for (size_t i = k; i < K; i++)
                t[i - k] = qs_fp16_to_fp32(h[r][i]);
            acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, t), xv, acc[r]);
        }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < R1; r++) y[r] = _mm512_reduce_add_ps(acc[r]);
}
#undef WIDE
#undef FULL
#undef MASKED

/* The lanes of an AVX2 accumulator in a fixed order, then the tail. */
__attribute__((target("avx2,fma"))) static float finish_256(__m256 acc, const float *w,
                                                            const float *x, size_t k0, size_t K)
{
    float lanes[8], s = 0.0f;
    _mm256_storeu_ps(lanes, acc);
    for (int j = 0; j < 8; j++)
        s += lanes[j];
    for (size_t k = k0; k < K; k++)
        s += w[k] * x[k];
    return s;
}

__attribute__((target("avx2,fma"))) static void
block_256(const float *const w[RB], const float *const x[TB], size_t K, float y[TB][RB])
{
    __m256 acc[RB][TB];
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TB; t++)
            acc[r][t] = _mm256_setzero_ps();
    size_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[RB], xv[TB];
        _Pragma("GCC unroll 4") for (int r = 0; r < RB; r++) wv[r] = _mm256_loadu_ps(w[r] + k);
        _Pragma("GCC unroll 4") for (int t = 0; t < TB; t++) xv[t] = _mm256_loadu_ps(x[t] + k);
        _Pragma("GCC unroll 4") for (int r = 0; r < RB; r++)
            _Pragma("GCC unroll 4") for (int t = 0; t < TB; t++) acc[r][t] =
                _mm256_fmadd_ps(wv[r], xv[t], acc[r][t]);
    }
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TB; t++)
            y[t][r] = finish_256(acc[r][t], w[r], x[t], k, K);
}

__attribute__((target("avx2,fma,f16c"))) static void rows_256(const uint16_t *const h[R1],
                                                              const float *x, size_t K, float y[R1])
{
    __m256 acc[R1];
    for (int r = 0; r < R1; r++)
        acc[r] = _mm256_setzero_ps();
    size_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 xv = _mm256_loadu_ps(x + k);
        _Pragma("GCC unroll 8") for (int r = 0; r < R1; r++) acc[r] = _mm256_fmadd_ps(
            _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h[r] + k))), xv, acc[r]);
    }
    for (int r = 0; r < R1; r++) {
        float lanes[8], s = 0.0f;
        _mm256_storeu_ps(lanes, acc[r]);
        for (int j = 0; j < 8; j++)
            s += lanes[j];
        for (size_t i = k; i < K; i++) /* as finish_256, on the widened values */
            s += qs_fp16_to_fp32(h[r][i]) * x[i];
        y[r] = s;
    }
}

static float dot_scalar(const float *a, const float *b, size_t K)
{
    float s = 0.0f;
    for (size_t k = 0; k < K; k++)
        s += a[k] * b[k];
    return s;
}

static void block_scalar(const float *const w[RB], const float *const x[TB], size_t K,
                         float y[TB][RB])
{
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TB; t++)
            y[t][r] = dot_scalar(w[r], x[t], K);
}

static void rows_scalar(const uint16_t *const h[R1], const float *x, size_t K, float y[R1])
{
    for (int r = 0; r < R1; r++) {
        float s = 0.0f;
        for (size_t k = 0; k < K; k++)
            s += qs_fp16_to_fp32(h[r][k]) * x[k];
        y[r] = s;
    }
}

/* ---- The product ------------------------------------------------------------- */

int qs_f16_gemm(const uint16_t *W, size_t N, size_t K, const float *X, size_t M, float *Y)
{
    if (!W || !X || !Y || N == 0 || K == 0)
        return qs_seterr(QS_EINVAL, "qs_f16_gemm: NULL matrices or an empty shape (N=%zu K=%zu)", N,
                         K);
    int err = qs_gemm_dims_ok(M, K, N);
    if (err)
        return err;
    const int path = qs_cpu_path_id();
    void (*widen)(const uint16_t *, size_t, float *) = path >= QS_PATH_AVX512 ? widen_avx512
                                                       : path >= QS_PATH_AVX2 ? widen_avx2
                                                                              : widen_scalar;
    void (*block)(const float *const[RB], const float *const[TB], size_t, float[TB][RB]) =
        path >= QS_PATH_AVX512 ? block_512
        : path >= QS_PATH_AVX2 ? block_256
                               : block_scalar;
    void (*rows)(const uint16_t *const[R1], const float *, size_t, float[R1]) =
        path >= QS_PATH_AVX512 ? rows_512
        : path >= QS_PATH_AVX2 ? rows_256
                               : rows_scalar;
    /* Rows go out in blocks, each widened once into the thread's buffer. */
    const size_t nrb = M == 1 ? R1 : RB, nblocks = (N + nrb - 1) / nrb;
    int nomem = 0;
#pragma omp parallel reduction(| : nomem)
    {
        float *buf = malloc(nrb * K * sizeof *buf);
        nomem = !buf;
#pragma omp for schedule(static)
        for (size_t b = 0; b < nblocks; b++) {
            if (!buf)
                continue;
            size_t n0 = b * nrb, nr = N - n0 < nrb ? N - n0 : nrb;
            if (M == 1) {
                const uint16_t *h[R1];
                for (size_t r = 0; r < R1; r++)
                    h[r] = W + (n0 + (r < nr ? r : nr - 1)) * K;
                float y[R1];
                rows(h, X, K, y);
                for (size_t r = 0; r < nr; r++)
                    Y[n0 + r] = y[r];
                continue;
            }
            const float *w[RB];
            for (size_t r = 0; r < RB; r++) {
                w[r] = buf + (r < nr ? r : nr - 1) * K;
                if (r < nr)
                    widen(W + (n0 + r) * K, K, buf + r * K);
            }
            for (size_t m0 = 0; m0 < M; m0 += TB) {
                size_t nt = M - m0 < TB ? M - m0 : TB;
                const float *x[TB];
                for (size_t t = 0; t < TB; t++)
                    x[t] = X + (m0 + (t < nt ? t : nt - 1)) * K;
                float y[TB][RB];
                block(w, x, K, y);
                for (size_t t = 0; t < nt; t++)
                    for (size_t r = 0; r < nr; r++)
                        Y[(m0 + t) * N + n0 + r] = y[t][r];
            }
        }
        free(buf);
    }
    return nomem ? qs_seterr(QS_ENOMEM, "out of memory for %zu widened rows of %zu", nrb, K)
                 : QS_OK;
}

int qs_f16_gemm_ref_f64(const uint16_t *W, size_t N, size_t K, const float *X, size_t M, double *Y)
{
    if (!W || !X || !Y || N == 0 || K == 0 || M == 0)
        return qs_seterr(QS_EINVAL, "qs_f16_gemm_ref_f64: NULL matrices or an empty shape");
    for (size_t m = 0; m < M; m++)
        for (size_t n = 0; n < N; n++) {
            double s = 0;
            for (size_t k = 0; k < K; k++)
                s += (double)X[m * K + k] * qs_fp16_to_fp32(W[n * K + k]);
            Y[m * N + n] = s;
        }
    return QS_OK;
}

void qs_f16_to_f32_row(const uint16_t *h, size_t count, float *out)
{
    const int path = qs_cpu_path_id();
    if (path >= QS_PATH_AVX512)
        widen_avx512(h, count, out);
    else if (path >= QS_PATH_AVX2)
        widen_avx2(h, count, out);
    else
        widen_scalar(h, count, out);
}
