/* f16gemm.c: Y (M x N) = X (M x K) W^T with X in fp32 and W an N x K matrix
 * in fp16 (IEEE bits), fp32 sums: the LM head and embedding table of a CPU
 * rank's quantized models, kept in fp16 as a GPU keeps them, so that a
 * decode step reads half the bytes for them (SmolLM2's tied 49152 x 576
 * table: 57 MB instead of 113). The plain reference is qs_f16_gemm_ref_f64.
 *
 * Each row of W is widened to fp32 once (F16C) into a per-thread buffer and
 * used for every token; rows are shared out over the threads. Sums: 16
 * lanes times 4 accumulators (AVX-512), 8 x 4 (AVX2), or in order
 * (scalar), then the lanes added in a fixed order: each path gives the same
 * result every run. */
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

/* ---- Dot products ------------------------------------------------------------ */

static float dot_scalar(const float *a, const float *b, size_t K)
{
    float s = 0.0f;
    for (size_t k = 0; k < K; k++)
        s += a[k] * b[k];
    return s;
}

__attribute__((target("avx2,fma"))) static float dot_avx2(const float *a, const float *b, size_t K)
{
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    size_t k = 0;
    for (; k + 32 <= K; k += 32)
        for (int j = 0; j < 4; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8 * j), _mm256_loadu_ps(b + k + 8 * j),
                                     acc[j]);
    for (; k + 8 <= K; k += 8)
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc[0]);
    __m256 s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    float lanes[8];
    _mm256_storeu_ps(lanes, s);
    float r = 0.0f;
    for (int j = 0; j < 8; j++)
        r += lanes[j];
    for (; k < K; k++)
        r += a[k] * b[k];
    return r;
}

__attribute__((target("avx512f"))) static float dot_avx512(const float *a, const float *b, size_t K)
{
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    size_t k = 0;
    for (; k + 64 <= K; k += 64)
        for (int j = 0; j < 4; j++)
            acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 16 * j),
                                     _mm512_loadu_ps(b + k + 16 * j), acc[j]);
    for (; k + 16 <= K; k += 16)
        acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc[0]);
    if (k < K) { /* the tail, masked: zeros past K */
        __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
        acc[1] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k),
                                 acc[1]);
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    return _mm512_reduce_add_ps(s);
}

/* ---- The product ------------------------------------------------------------- */

int qs_f16_gemm(const uint16_t *W, size_t N, size_t K, const float *X, size_t M, float *Y)
{
    if (!W || !X || !Y || N == 0 || K == 0)
        return qs_seterr(QS_EINVAL, "qs_f16_gemm: NULL matrices or an empty shape (N=%zu K=%zu)",
                         N, K);
    int err = qs_gemm_dims_ok(M, K, N);
    if (err)
        return err;
    const int path = qs_cpu_path_id();
    void (*widen)(const uint16_t *, size_t, float *) = path >= QS_PATH_AVX512 ? widen_avx512
                                                       : path >= QS_PATH_AVX2 ? widen_avx2
                                                                               : widen_scalar;
    float (*dot)(const float *, const float *, size_t) = path >= QS_PATH_AVX512 ? dot_avx512
                                                         : path >= QS_PATH_AVX2 ? dot_avx2
                                                                                 : dot_scalar;
    int nomem = 0;
#pragma omp parallel reduction(| : nomem)
    {
        float *row = malloc(K * sizeof *row);
        nomem = !row;
#pragma omp for schedule(static)
        for (size_t n = 0; n < N; n++) {
            if (!row)
                continue;
            widen(W + n * K, K, row);
            for (size_t m = 0; m < M; m++)
                Y[m * N + n] = dot(X + m * K, row, K);
        }
        free(row);
    }
    return nomem ? qs_seterr(QS_ENOMEM, "out of memory for a %zu-wide row", K) : QS_OK;
}

int qs_f16_gemm_ref_f64(const uint16_t *W, size_t N, size_t K, const float *X, size_t M,
                        double *Y)
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
