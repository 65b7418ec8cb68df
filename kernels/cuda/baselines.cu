/* baselines.cu: what LUT-GEMM is measured against (qs_kernels.h, GPU section):
 *   - cuBLAS fp16 GEMM/GEMV (cublasGemmEx, fp32 compute) on dequantized W;
 *   - an OPTQ-style dequantizing GEMV for uniform 3-bit weights: 32 codes of
 *     a row packed in 96 bits, per-group fp16 scale and zero point,
 *     dequantized in registers (w = s * c - s * zp, one FFMA) and multiplied
 *     with x held in shared memory (fp32), fp32 sums, split-K like LUT-GEMM.
 * The OPTQ kernel (gptq quant_cuda_kernel.cu) is the same shape: one output
 * per thread, the x slice in shared memory, scale/zero per group, codes
 * unpacked with shifts across word boundaries. */
#include <stdlib.h>
#include <string.h>

#include "cuda_util.cuh"

/* ---- cuBLAS ---------------------------------------------------------------------- */

/* The fp16-output case of the forward pass's linear layer (linear_gpu.cu),
 * whose per-thread handle it shares. */
extern "C" int qs_cuda_gemm_f16_cublas(const void *W, const void *X, size_t M, size_t N, size_t K,
                                       void *Y, void *stream)
{
    return qs_cuda_linear_f16(W, X, M, N, K, Y, 0, stream);
}

/* ---- Uniform 3-bit, dequantizing GEMV ------------------------------------------------ */

extern "C" void qs_cuda_u3_free(qs_cuda_u3 *d)
{
    if (!d)
        return;
    qs_cuda_free(d->codes);
    qs_cuda_free(d->scale);
    qs_cuda_free(d->zero);
    qs_cuda_free(d->ws);
    memset(d, 0, sizeof(*d));
}

extern "C" int qs_cuda_u3_alloc(qs_cuda_u3 *d, size_t N, size_t K, size_t g)
{
    if (!d)
        return qs_seterr(QS_EINVAL, "qs_cuda_u3_alloc got a NULL handle");
    memset(d, 0, sizeof(*d));
    int err = qs_bcq_check(N, K, 3, g); /* same shape rules as BCQ */
    if (err)
        return err;
    if (N > (1u << 30) || K > (1u << 30))
        return qs_seterr(QS_EINVAL, "3-bit %zu x %zu is too large for the GPU kernels", N, K);
    d->N = N, d->K = K, d->g = g;
    d->ngroups = qs_bcq_ngroups(K, g);
    d->nb = (K + 31) / 32;
    d->bytes = d->nb * 3 * N * 4 + 2 * d->ngroups * N * 2;
    if ((err = qs_cuda_malloc(&d->codes, d->nb * 3 * N * 4)) ||
        (err = qs_cuda_malloc(&d->scale, d->ngroups * N * 2)) ||
        (err = qs_cuda_malloc(&d->zero, d->ngroups * N * 2)) ||
        (err = qs_cuda_malloc(&d->ws, (size_t)QS_CUDA_WS_ROWS * N * sizeof(float)))) {
        qs_cuda_u3_free(d);
        return err;
    }
    return QS_OK;
}

extern "C" int qs_cuda_u3_upload(qs_cuda_u3 *d, const qs_rtn *r)
{
    if (!r || !r->codes || !r->scale || !r->zero)
        return qs_seterr(QS_EINVAL, "qs_cuda_u3_upload got NULL weights");
    if (r->q != 3)
        return qs_seterr(QS_EINVAL, "the 3-bit baseline takes q = 3 RTN weights, got q=%u", r->q);
    int err = qs_cuda_u3_alloc(d, r->N, r->K, r->g);
    if (err)
        return err;
    size_t N = r->N, K = r->K, nb = d->nb, ng = d->ngroups;
    uint32_t *codes = (uint32_t *)calloc(nb * 3 * N, 4);
    uint16_t *sc = (uint16_t *)malloc(ng * N * 2), *zp = (uint16_t *)malloc(ng * N * 2);
    if (!codes || !sc || !zp) {
        free(codes), free(sc), free(zp);
        qs_cuda_u3_free(d);
        return qs_seterr(QS_ENOMEM, "out of host memory staging 3-bit weights");
    }
    for (size_t n = 0; n < N; n++)
        for (size_t k = 0; k < K; k++) {
            uint64_t c = r->codes[n * K + k] & 7u, bit = 3 * (k % 32), b = k / 32;
            codes[(b * 3 + bit / 32) * N + n] |= (uint32_t)(c << (bit % 32));
            if (bit % 32 > 29) /* crosses into the next word */
                codes[(b * 3 + bit / 32 + 1) * N + n] |= (uint32_t)(c >> (32 - bit % 32));
        }
    for (size_t gi = 0; gi < ng; gi++)
        for (size_t n = 0; n < N; n++) {
            sc[gi * N + n] = qs_fp32_to_fp16(r->scale[n * ng + gi]);
            zp[gi * N + n] = qs_fp32_to_fp16(r->zero[n * ng + gi]);
        }
    if (!(err = qs_cuda_h2d(d->codes, codes, nb * 3 * N * 4)) &&
        !(err = qs_cuda_h2d(d->scale, sc, ng * N * 2)))
        err = qs_cuda_h2d(d->zero, zp, ng * N * 2);
    free(codes), free(sc), free(zp);
    if (err)
        qs_cuda_u3_free(d);
    return err;
}

__global__ void u3_fill_kernel(uint32_t *codes, __half *scale, __half *zero, size_t ncodes,
                               size_t nsc, int N, int K, unsigned long long seed)
{
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < ncodes + nsc;
         t += (size_t)gridDim.x * blockDim.x) {
        if (t < ncodes) {
            uint32_t v = (uint32_t)qs_hash64(seed, t);
            int b = (int)(t / N / 3), wd = (int)(t / N % 3);
            int valid = K - 32 * b; /* columns of this block inside K */
            if (valid < 32) {
                int bits = 3 * valid - 32 * wd; /* valid bits of this word */
                v = bits <= 0 ? 0 : bits >= 32 ? v : v & ((1u << bits) - 1);
            }
            codes[t] = v;
        } else {
            float u = qs_hash_unif(seed ^ 0x1234567ull, t);
            scale[t - ncodes] = __float2half_rn(0.002f + 0.004f * u);
            zero[t - ncodes] = __float2half_rn((float)(qs_hash64(seed ^ 77, t) % 8));
        }
    }
}

extern "C" int qs_cuda_u3_fill_random(qs_cuda_u3 *d, uint64_t seed, void *stream)
{
    if (!d || !d->codes)
        return qs_seterr(QS_EINVAL, "qs_cuda_u3_fill_random: weights not allocated");
    QS_LAUNCH(1024, 256, 0, QS_CU_STREAM(stream), u3_fill_kernel)
    ((uint32_t *)d->codes, (__half *)d->scale, (__half *)d->zero, d->nb * 3 * d->N,
     d->ngroups * d->N, (int)d->N, (int)d->K, seed);
    QS_CU_LAUNCH("u3_fill_kernel");
    return QS_OK;
}

#define U3_SLICE 32 /* 32-column blocks of x per shared-memory slice (1024 columns) */

template <int MT>
__global__ void __launch_bounds__(256)
    u3_kernel(const uint32_t *__restrict__ codes, const __half *__restrict__ scale,
              const __half *__restrict__ zero, const __half *__restrict__ X, __half *__restrict__ Y,
              float *__restrict__ ws, int M, int N, int K, int gs, int ng, int nb, int splits)
{
    QS_SHARED_ALIGNED(16, float, xs, [U3_SLICE * 32 * MT]); /* [k][m] */
    const int n = blockIdx.x * 256 + threadIdx.x, sp = blockIdx.y;
    const bool row = n < N;
    const int b0 = (int)((long long)nb * sp / splits),
              b1 = (int)((long long)nb * (sp + 1) / splits);
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; m++)
        acc[m] = 0.0f;
    for (int sb = b0; sb < b1; sb += U3_SLICE) {
        const int se = min(sb + U3_SLICE, b1);
        __syncthreads();
        for (int u = threadIdx.x; u < U3_SLICE * 32 * MT; u += 256) {
            const int m = u % MT, k = sb * 32 + u / MT;
            xs[u] = (m < M && k < K) ? __half2float(X[(size_t)m * K + k]) : 0.0f;
        }
        __syncthreads();
        if (!row)
            continue;
        for (int b = sb; b < se; b++) {
            const uint32_t w0 = codes[((size_t)b * 3 + 0) * N + n];
            const uint32_t w1 = codes[((size_t)b * 3 + 1) * N + n];
            const uint32_t w2 = codes[((size_t)b * 3 + 2) * N + n];
            const int gi = min(b * 32 / gs, ng - 1);
            const float s = __half2float(scale[(size_t)gi * N + n]);
            const float nsz = -s * __half2float(zero[(size_t)gi * N + n]);
            const float *xb = xs + (b - sb) * 32 * MT;
#pragma unroll
            for (int j = 0; j < 32; j++) {
                const int bit = 3 * j, wd = bit / 32, off = bit % 32;
                const uint32_t lo = wd == 0 ? w0 : wd == 1 ? w1 : w2;
                uint32_t c = lo >> off;
                if (off > 29)
                    c |= (wd == 0 ? w1 : w2) << (32 - off);
                const float w = fmaf(s, (float)(c & 7u), nsz);
#pragma unroll
                for (int m = 0; m < MT; m++)
                    acc[m] = fmaf(w, xb[j * MT + m], acc[m]);
            }
        }
    }
    if (row) {
#pragma unroll
        for (int m = 0; m < MT; m++)
            if (m < M) {
                if (splits == 1)
                    Y[(size_t)m * N + n] = __float2half_rn(acc[m]);
                else
                    ws[((size_t)sp * M + m) * N + n] = acc[m];
            }
    }
}

extern "C" int qs_cuda_u3_gemv(qs_cuda_u3 *d, const void *X, size_t M, void *Y, void *stream)
{
    if (!d || !d->codes || !d->ws || !X || !Y)
        return qs_seterr(QS_EINVAL, "qs_cuda_u3_gemv: NULL weights, input or output");
    if (M < 1 || M > 8)
        return qs_seterr(QS_EINVAL, "qs_cuda_u3_gemv takes M = 1..8, got %zu", M);
    int sm = qs_cuda_sm_count();
    if (sm <= 0)
        return QS_ENODEV;
    /* Splits as for LUT-GEMM: about 4 CTAs of 256 rows per SM, >= 2 slices each. */
    size_t ctas_n = (d->N + 255) / 256, want = (size_t)sm * 4;
    size_t splits = (want + ctas_n - 1) / ctas_n, max_k = d->nb / (2 * U3_SLICE);
    if (splits > max_k)
        splits = max_k;
    if (splits > 64 / M)
        splits = 64 / M;
    if (splits < 1)
        splits = 1;
    int gs = (int)(d->g ? d->g : d->nb * 32);
    dim3 grid((unsigned)ctas_n, (unsigned)splits);
    cudaStream_t st = QS_CU_STREAM(stream);
    const uint32_t *c = (const uint32_t *)d->codes;
    const __half *s = (const __half *)d->scale, *z = (const __half *)d->zero,
                 *x = (const __half *)X;
    __half *y = (__half *)Y;
    float *ws = (float *)d->ws;
    int Mi = (int)M, N = (int)d->N, K = (int)d->K, ng = (int)d->ngroups, nb = (int)d->nb;
    int sp = (int)splits;
    if (M == 1)
        QS_LAUNCH(grid, 256, 0, st, u3_kernel<1>)(c, s, z, x, y, ws, Mi, N, K, gs, ng, nb, sp);
    else if (M == 2)
        QS_LAUNCH(grid, 256, 0, st, u3_kernel<2>)(c, s, z, x, y, ws, Mi, N, K, gs, ng, nb, sp);
    else if (M <= 4)
        QS_LAUNCH(grid, 256, 0, st, u3_kernel<4>)(c, s, z, x, y, ws, Mi, N, K, gs, ng, nb, sp);
    else
        QS_LAUNCH(grid, 256, 0, st, u3_kernel<8>)(c, s, z, x, y, ws, Mi, N, K, gs, ng, nb, sp);
    QS_CU_LAUNCH("u3_kernel");
    if (splits > 1)
        return qs_cuda_reduce_splits(ws, Y, M, d->N, (unsigned)splits, st);
    return QS_OK;
}
