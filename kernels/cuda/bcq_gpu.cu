/* bcq_gpu.cu: BCQ-with-offset weights on the GPU (qs_kernels.h, GPU section): upload into
 * the device layout, LUT-GEMM for batch 1..8, and the fused dequantize +
 * tensor-core path for larger batches.
 *
 * LUT-GEMM, per CTA (THREADS rows, one per thread) and K-split:
 *   for each 128-column slice c of its K range
 *     - prefetch the q uint4 bit words of slice c+1 (one LDG.128 per plane)
 *     - build 16 tables (one per 8-column chunk) of the 256 signed sums
 *       T[p] = sum_j (p>>j & 1 ? +x_j : -x_j), fp32, for all MT tokens at once,
 *       stored [chunk][pattern][m] so that one look-up fetches all tokens
 *     - every byte of a bit-plane word is one look-up; per word and plane
 *       acc += alpha * (4 look-ups), and acc += z * T[chunk][0xFF] (the sum of
 *       x over the word: the offset needs no separate pass)
 *   partial sums of the K-splits go to the workspace, a second kernel adds
 *   them in a fixed order (deterministic) and rounds to fp16 once.
 * Groups: g is a multiple of 32 and a 32-column word never straddles two
 * groups, so alpha and z are fetched per word (per slice when g % 128 == 0):
 * any relation between g and the 128-column slice or the K-split is exact.
 *
 * Why fp32 tables: the sums of 8 fp16 inputs lose up to 3 bits in fp16, and
 * the paper's kernel also accumulates in fp16; fp32 keeps the kernel's error
 * at the fp16 rounding of Y. The price is shared memory (16 KiB per token per
 * slice, 17 KiB with the bank padding), which caps the CTAs per SM at batch 8
 * (136 KiB). */
#include <mma.h>

#include <algorithm>
#include <stdlib.h>
#include <string.h>

#include "cuda_util.cuh"

/* ---- Small helpers ----------------------------------------------------------- */

extern "C" int qs_cuda_malloc(void **p, size_t bytes)
{
    if (!p)
        return qs_seterr(QS_EINVAL, "qs_cuda_malloc got a NULL pointer");
    *p = NULL;
    QS_CU(cudaMalloc(p, bytes ? bytes : 1));
    return QS_OK;
}

extern "C" void qs_cuda_free(void *p)
{
    if (p)
        cudaFree(p);
}

extern "C" int qs_cuda_h2d(void *dst, const void *src, size_t bytes)
{
    QS_CU(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
    return QS_OK;
}

extern "C" int qs_cuda_d2h(void *dst, const void *src, size_t bytes)
{
    QS_CU(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
    return QS_OK;
}

extern "C" int qs_cuda_memset(void *p, int v, size_t bytes)
{
    QS_CU(cudaMemset(p, v, bytes));
    return QS_OK;
}

extern "C" int qs_cuda_sync(void)
{
    QS_CU(cudaDeviceSynchronize());
    QS_CU(cudaGetLastError());
    return QS_OK;
}

extern "C" int qs_cuda_sm_count(void)
{
    int dev = 0, n = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess)
        e = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) {
        qs_cuda_fail(e, "cudaDeviceGetAttribute(MultiProcessorCount)", __FILE__, __LINE__);
        return 0;
    }
    return n;
}

/* ---- Layout --------------------------------------------------------------------- */

static size_t bcq_gs(size_t K, size_t g)
{
    return g ? g : ((K + 31) / 32) * 32;
}

extern "C" size_t qs_cuda_bcq_bytes(size_t N, size_t K, unsigned q, size_t g)
{
    if (qs_bcq_check(N, K, q, g))
        return 0;
    size_t nc = ((K + 31) / 32 + 3) / 4, ng = qs_bcq_ngroups(K, g);
    return (size_t)q * N * nc * 16 + (size_t)(q + 1) * N * ng * 2;
}

extern "C" int qs_cuda_bcq_pack(const qs_bcq *w, uint32_t *bits, uint16_t *alpha, uint16_t *z)
{
    if (!w || !w->bits || !w->alpha || !w->z || !bits || !alpha || !z)
        return qs_seterr(QS_EINVAL, "qs_cuda_bcq_pack got a NULL array");
    int err = qs_bcq_check(w->N, w->K, w->q, w->g);
    if (err)
        return err;
    size_t N = w->N, q = w->q, nw = (w->K + 31) / 32, nc = (nw + 3) / 4;
    size_t ng = qs_bcq_ngroups(w->K, w->g);
    for (size_t c = 0; c < nc; c++)
        for (size_t i = 0; i < q; i++)
            for (size_t n = 0; n < N; n++)
                for (size_t j = 0; j < 4; j++) {
                    size_t wi = 4 * c + j;
                    bits[((c * q + i) * N + n) * 4 + j] =
                        wi < nw ? w->bits[qs_bcq_word_index(w, (unsigned)i, n, wi)] : 0;
                }
    for (size_t gi = 0; gi < ng; gi++)
        for (size_t n = 0; n < N; n++) {
            for (size_t i = 0; i < q; i++)
                alpha[(gi * q + i) * N + n] = w->alpha[qs_bcq_alpha_index(w, (unsigned)i, n, gi)];
            z[gi * N + n] = w->z[qs_bcq_z_index(w, n, gi)];
        }
    return QS_OK;
}

extern "C" void qs_cuda_bcq_free(qs_cuda_bcq *d)
{
    if (!d)
        return;
    qs_cuda_free(d->bits);
    qs_cuda_free(d->alpha);
    qs_cuda_free(d->z);
    qs_cuda_free(d->ws);
    memset(d, 0, sizeof(*d));
}

extern "C" int qs_cuda_bcq_alloc(qs_cuda_bcq *d, size_t N, size_t K, unsigned q, size_t g)
{
    if (!d)
        return qs_seterr(QS_EINVAL, "qs_cuda_bcq_alloc got a NULL handle");
    memset(d, 0, sizeof(*d));
    int err = qs_bcq_check(N, K, q, g);
    if (err)
        return err;
    if (N > (1u << 30) || K > (1u << 30))
        return qs_seterr(QS_EINVAL, "BCQ %zu x %zu is too large for the GPU kernels (< 2^30)", N,
                         K);
    d->N = N, d->K = K, d->q = q, d->g = g;
    d->ngroups = qs_bcq_ngroups(K, g);
    d->nw = (K + 31) / 32;
    d->nc = (d->nw + 3) / 4;
    d->bytes = qs_cuda_bcq_bytes(N, K, q, g);
    if ((err = qs_cuda_malloc(&d->bits, (size_t)q * N * d->nc * 16)) ||
        (err = qs_cuda_malloc(&d->alpha, (size_t)q * N * d->ngroups * 2)) ||
        (err = qs_cuda_malloc(&d->z, N * d->ngroups * 2)) ||
        (err = qs_cuda_malloc(&d->ws, (size_t)QS_CUDA_WS_ROWS * N * sizeof(float)))) {
        qs_cuda_bcq_free(d);
        return err;
    }
    return QS_OK;
}

extern "C" int qs_cuda_bcq_upload(qs_cuda_bcq *d, const qs_bcq *w)
{
    if (!w)
        return qs_seterr(QS_EINVAL, "qs_cuda_bcq_upload got NULL weights");
    int err = qs_cuda_bcq_alloc(d, w->N, w->K, w->q, w->g);
    if (err)
        return err;
    size_t bb = (size_t)w->q * w->N * d->nc * 16, ab = (size_t)w->q * w->N * d->ngroups * 2;
    size_t zb = w->N * d->ngroups * 2;
    uint32_t *bits = (uint32_t *)malloc(bb);
    uint16_t *alpha = (uint16_t *)malloc(ab), *z = (uint16_t *)malloc(zb);
    if (!bits || !alpha || !z)
        err = qs_seterr(QS_ENOMEM, "out of host memory staging %zu bytes of BCQ weights",
                        bb + ab + zb);
    if (!err)
        err = qs_cuda_bcq_pack(w, bits, alpha, z);
    if (!err && !(err = qs_cuda_h2d(d->bits, bits, bb)) &&
        !(err = qs_cuda_h2d(d->alpha, alpha, ab)))
        err = qs_cuda_h2d(d->z, z, zb);
    free(bits);
    free(alpha);
    free(z);
    if (err)
        qs_cuda_bcq_free(d);
    return err;
}

/* ---- Random fill and dequantization ---------------------------------------------- */

__global__ void bcq_fill_bits(uint32_t *bits, size_t total, int N, int q, int nw, int K,
                              unsigned long long seed)
{
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        size_t wi = 4 * (t / 4 / N / q) + t % 4; /* (c, i, n, j) -> word 4c + j */
        uint32_t v = (uint32_t)qs_hash64(seed, t);
        if ((int)wi >= nw)
            v = 0;
        else if ((int)wi == nw - 1 && K % 32)
            v &= (1u << (K % 32)) - 1;
        bits[t] = v;
    }
}

__global__ void bcq_fill_scales(__half *alpha, __half *z, size_t na, size_t nz, int N, int q,
                                unsigned long long seed)
{
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < na + nz;
         t += (size_t)gridDim.x * blockDim.x) {
        float u = qs_hash_unif(seed ^ 0x5bd1e995ull, t);
        if (t < na) {
            int i = (int)(t / N % q);
            alpha[t] = __float2half_rn((0.005f + 0.01f * u) / (float)(1u << (q - 1 - i)));
        } else {
            z[t - na] = __float2half_rn(0.02f * u - 0.01f);
        }
    }
}

extern "C" int qs_cuda_bcq_fill_random(qs_cuda_bcq *d, uint64_t seed, void *stream)
{
    if (!d || !d->bits)
        return qs_seterr(QS_EINVAL, "qs_cuda_bcq_fill_random: weights not allocated");
    cudaStream_t st = QS_CU_STREAM(stream);
    size_t nb = (size_t)d->q * d->N * d->nc * 4, na = (size_t)d->q * d->N * d->ngroups;
    QS_LAUNCH(1024, 256, 0, st, bcq_fill_bits)
    ((uint32_t *)d->bits, nb, (int)d->N, (int)d->q, (int)d->nw, (int)d->K, seed);
    QS_CU_LAUNCH("bcq_fill_bits");
    QS_LAUNCH(1024, 256, 0, st, bcq_fill_scales)
    ((__half *)d->alpha, (__half *)d->z, na, d->N * d->ngroups, (int)d->N, (int)d->q, seed);
    QS_CU_LAUNCH("bcq_fill_scales");
    return QS_OK;
}

/* One thread per (row, word): 32 fp16 weights. */
__global__ void bcq_dequant_kernel(const uint32_t *__restrict__ bits,
                                   const __half *__restrict__ alpha, const __half *__restrict__ zz,
                                   __half *__restrict__ W, int N, int K, int q, int nw, int gs,
                                   int ng)
{
    size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (t >= (size_t)N * nw)
        return;
    int n = (int)(t % N), wi = (int)(t / N), c = wi / 4, j = wi % 4;
    int gi = min(wi * 32 / gs, ng - 1);
    float v[32];
    float base = __half2float(zz[(size_t)gi * N + n]);
    for (int i = 0; i < q; i++)
        base -= __half2float(alpha[((size_t)gi * q + i) * N + n]);
#pragma unroll
    for (int b = 0; b < 32; b++)
        v[b] = base;
    for (int i = 0; i < q; i++) {
        float d2 = 2.0f * __half2float(alpha[((size_t)gi * q + i) * N + n]);
        uint32_t wd = bits[(((size_t)c * q + i) * N + n) * 4 + j];
#pragma unroll
        for (int b = 0; b < 32; b++)
            v[b] += (wd >> b & 1u) ? d2 : 0.0f;
    }
    __half *out = W + (size_t)n * K + (size_t)wi * 32;
#pragma unroll
    for (int b = 0; b < 32; b++)
        if (wi * 32 + b < K)
            out[b] = __float2half_rn(v[b]);
}

extern "C" int qs_cuda_bcq_dequant_f16(const qs_cuda_bcq *d, void *W, void *stream)
{
    if (!d || !d->bits || !W)
        return qs_seterr(QS_EINVAL, "qs_cuda_bcq_dequant_f16: NULL weights or output");
    size_t total = d->N * d->nw;
    QS_LAUNCH((unsigned)((total + 255) / 256), 256, 0, QS_CU_STREAM(stream), bcq_dequant_kernel)
    ((const uint32_t *)d->bits, (const __half *)d->alpha, (const __half *)d->z, (__half *)W,
     (int)d->N, (int)d->K, (int)d->q, (int)d->nw, (int)bcq_gs(d->K, d->g), (int)d->ngroups);
    QS_CU_LAUNCH("bcq_dequant_kernel");
    return QS_OK;
}

/* ---- Split-K reduction ----------------------------------------------------------- */

__global__ void reduce_splits_kernel(const float *__restrict__ ws, __half *__restrict__ Y,
                                     size_t MN, int splits)
{
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < MN;
         t += (size_t)gridDim.x * blockDim.x) {
        float s = 0;
        for (int k = 0; k < splits; k++)
            s += ws[(size_t)k * MN + t];
        Y[t] = __float2half_rn(s);
    }
}

int qs_cuda_reduce_splits(const float *ws, void *Y, size_t M, size_t N, unsigned splits,
                          cudaStream_t st)
{
    size_t MN = M * N;
    unsigned blocks = (unsigned)((MN + 255) / 256);
    if (blocks > 4096)
        blocks = 4096;
    QS_LAUNCH(blocks, 256, 0, st, reduce_splits_kernel)(ws, (__half *)Y, MN, (int)splits);
    QS_CU_LAUNCH("reduce_splits_kernel");
    return QS_OK;
}

/* ---- LUT-GEMM ---------------------------------------------------------------------- */

#define LUT_CHUNKS  16  /* 8-column chunks per 128-column slice */
#define LUT_CSTRIDE 272 /* entries per chunk table: 256 + 16 of bank padding */

template <int MT> struct vecf;
template <> struct vecf<1> {
    static __host__ __device__ __forceinline__ void ld(const float *p, float *v)
    {
        v[0] = p[0];
    }
};
template <> struct vecf<2> {
    static __host__ __device__ __forceinline__ void ld(const float *p, float *v)
    {
        float2 a = *reinterpret_cast<const float2 *>(p);
        v[0] = a.x, v[1] = a.y;
    }
};
template <> struct vecf<4> {
    static __host__ __device__ __forceinline__ void ld(const float *p, float *v)
    {
        float4 a = *reinterpret_cast<const float4 *>(p);
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
    }
};
template <> struct vecf<8> {
    static __host__ __device__ __forceinline__ void ld(const float *p, float *v)
    {
        vecf<4>::ld(p, v);
        vecf<4>::ld(p + 4, v + 4);
    }
};

/* The 16 table entries p = 16 h + l (h = 0..15) of one 8-column chunk for one
 * low nibble l: T[p] = sum_j (p >> j & 1 ? +x_j : -x_j), written to
 * out[h * hstride]. A warp's lanes take consecutive (l, m), so each of
 * the 16 stores hits 32 consecutive floats; the chunk stride is padded by 16
 * entries (LUT_CSTRIDE) so the two chunks of an MT = 1 warp land in opposite
 * bank halves: conflict-free stores. Shared by the kernel and the host
 * emulation (qs_cuda_lutgemm_emulate). */
__host__ __device__ __forceinline__ void lut_entries16(const float *x, int l, float *out,
                                                       int hstride)
{
    const float L = ((l & 1) ? x[0] : -x[0]) + ((l & 2) ? x[1] : -x[1]) + ((l & 4) ? x[2] : -x[2]) +
                    ((l & 8) ? x[3] : -x[3]);
    const float a[4] = {L - x[4] - x[5], L + x[4] - x[5], L - x[4] + x[5], L + x[4] + x[5]};
    const float b[4] = {-x[6] - x[7], x[6] - x[7], x[7] - x[6], x[6] + x[7]};
    QS_UNROLL
    for (int h = 0; h < 16; h++)
        out[h * hstride] = a[h & 3] + b[h >> 2];
}

/* NH half2 (tokens in pairs) widened to 2 NH floats; one 4/8/16-byte load. */
template <int NH> struct vech2;
template <> struct vech2<1> {
    static __host__ __device__ __forceinline__ void ld(const __half2 *p, float *v)
    {
        float2 a = __half22float2(p[0]);
        v[0] = a.x, v[1] = a.y;
    }
};
template <> struct vech2<2> {
    static __host__ __device__ __forceinline__ void ld(const __half2 *p, float *v)
    {
        union {
            uint2 u;
            __half2 h[2];
        } r;
        r.u = *reinterpret_cast<const uint2 *>(p);
        QS_UNROLL
        for (int j = 0; j < 2; j++) {
            float2 a = __half22float2(r.h[j]);
            v[2 * j] = a.x, v[2 * j + 1] = a.y;
        }
    }
};
template <> struct vech2<4> {
    static __host__ __device__ __forceinline__ void ld(const __half2 *p, float *v)
    {
        union {
            uint4 u;
            __half2 h[4];
        } r;
        r.u = *reinterpret_cast<const uint4 *>(p);
        QS_UNROLL
        for (int j = 0; j < 4; j++) {
            float2 a = __half22float2(r.h[j]);
            v[2 * j] = a.x, v[2 * j + 1] = a.y;
        }
    }
};

/* s[m] = B . x over one 32-column word (4 look-ups) from the slice's tables
 * T ([16][LUT_CSTRIDE][MT] fp32, or [16][LUT_CSTRIDE][MT / 2] half2 when HT);
 * wl = the word's place in the slice. wd = ~0 reads the plain sum of x (the
 * offset term). */
template <int MT, bool HT>
__host__ __device__ __forceinline__ void lut_word(const void *T, uint32_t wd, int wl, float *s)
{
    QS_UNROLL
    for (int m = 0; m < MT; m++)
        s[m] = 0.0f;
    QS_UNROLL
    for (int b = 0; b < 4; b++) {
        const size_t e = (size_t)(wl * 4 + b) * LUT_CSTRIDE + ((wd >> (8 * b)) & 255u);
        float v[MT];
        if constexpr (HT)
            vech2<MT / 2>::ld(reinterpret_cast<const __half2 *>(T) + e * (MT / 2), v);
        else
            vecf<MT>::ld(reinterpret_cast<const float *>(T) + e * MT, v);
        QS_UNROLL
        for (int m = 0; m < MT; m++)
            s[m] += v[m];
    }
}

/* One unit of the half-table build: tokens 2j and 2j+1, low nibble l, one
 * chunk; entry h of the 16 at T2[h * 16 * (MT / 2)]. */
template <int MT>
__host__ __device__ __forceinline__ void lut_entries16_h2(const float *xa, const float *xb, int l,
                                                          __half2 *T2)
{
    float ea[16], eb[16];
    lut_entries16(xa, l, ea, 1);
    lut_entries16(xb, l, eb, 1);
    QS_UNROLL
    for (int h = 0; h < 16; h++)
        T2[h * 16 * (MT / 2)] = __floats2half2_rn(ea[h], eb[h]);
}

__device__ __forceinline__ uint32_t u4_get(const uint4 &v, int j)
{
    return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; /* j is a constant after unrolling */
}

/* x[0..7] of token m at columns k0..k0+7 (0 past K or for m >= M). */
__device__ __forceinline__ void load_x8(const __half *__restrict__ X, int M, int K, int m, int k0,
                                        bool vec, float *x)
{
    if (m < M && vec && k0 + 8 <= K) {
        /* A union, not a __half2 pointer into a uint4: that is undefined in
         * C++ and g++ miscompiles it (the harness showed garbage). */
        union {
            uint4 u;
            __half2 h[4];
        } r;
        r.u = __ldg(reinterpret_cast<const uint4 *>(X + (size_t)m * K + k0));
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float2 f = __half22float2(r.h[j]);
            x[2 * j] = f.x, x[2 * j + 1] = f.y;
        }
    } else {
#pragma unroll
        for (int j = 0; j < 8; j++)
            x[j] = (m < M && k0 + j < K) ? __half2float(X[(size_t)m * K + k0 + j]) : 0.0f;
    }
}

template <int MT, int QMAX, int THREADS, bool HT>
__global__ void __launch_bounds__(THREADS)
    lut_kernel(const uint4 *__restrict__ bits, const __half *__restrict__ alpha,
               const __half *__restrict__ zz, const __half *__restrict__ X, __half *__restrict__ Y,
               float *__restrict__ ws, int M, int N, int K, int q, int gs, int ng, int nc,
               int splits)
{
    QS_DYN_SMEM(float4, lut_smem);
    float *T = reinterpret_cast<float *>(lut_smem); /* [16][LUT_CSTRIDE][MT] */
    const int n = blockIdx.x * THREADS + threadIdx.x;
    const bool row = n < N;
    const int sp = blockIdx.y;
    const int c0 = (int)((long long)nc * sp / splits),
              c1 = (int)((long long)nc * (sp + 1) / splits);
    const bool xvec = (K % 8) == 0 && ((uintptr_t)X & 15) == 0; /* 16-byte rows */

    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; m++)
        acc[m] = 0.0f;

    uint4 nb[QMAX];
#pragma unroll
    for (int i = 0; i < QMAX; i++)
        nb[i] = (row && i < q && c0 < c1) ? __ldg(&bits[((size_t)c0 * q + i) * N + n])
                                          : make_uint4(0, 0, 0, 0);

    for (int c = c0; c < c1; c++) {
        uint4 cb[QMAX];
#pragma unroll
        for (int i = 0; i < QMAX; i++) {
            cb[i] = nb[i];
            nb[i] = (row && i < q && c + 1 < c1) ? __ldg(&bits[((size_t)(c + 1) * q + i) * N + n])
                                                 : make_uint4(0, 0, 0, 0);
        }
        /* Scales of the slice's 4 words (one group per slice when g % 128 == 0). */
        float al[4][QMAX], zw[4];
        const bool one_group = gs % 128 == 0;
#pragma unroll
        for (int wl = 0; wl < 4; wl++) {
            int gi = min((c * 4 + wl) * 32 / gs, ng - 1);
            if (wl > 0 && one_group) {
#pragma unroll
                for (int i = 0; i < QMAX; i++)
                    al[wl][i] = al[0][i];
                zw[wl] = zw[0];
                continue;
            }
#pragma unroll
            for (int i = 0; i < QMAX; i++)
                al[wl][i] =
                    (row && i < q) ? __half2float(alpha[((size_t)gi * q + i) * N + n]) : 0.f;
            zw[wl] = row ? __half2float(zz[(size_t)gi * N + n]) : 0.f;
        }

        /* Build the 16 tables of this slice: unit = (chunk, low nibble, token),
         * or (chunk, low nibble, token pair) for half tables. */
        __syncthreads();
        if constexpr (HT) {
            constexpr int NP = MT / 2;
            __half2 *T2 = reinterpret_cast<__half2 *>(lut_smem);
            for (int u = threadIdx.x; u < LUT_CHUNKS * 16 * NP; u += THREADS) {
                const int j = u % NP, l = (u / NP) & 15, ch = u / NP / 16;
                float xa[8], xb[8];
                load_x8(X, M, K, 2 * j, c * 128 + ch * 8, xvec, xa);
                load_x8(X, M, K, 2 * j + 1, c * 128 + ch * 8, xvec, xb);
                lut_entries16_h2<MT>(xa, xb, l, T2 + ((size_t)ch * LUT_CSTRIDE + l) * NP + j);
            }
        } else {
            for (int u = threadIdx.x; u < LUT_CHUNKS * 16 * MT; u += THREADS) {
                const int m = u % MT, l = (u / MT) & 15, ch = u / MT / 16;
                float x[8];
                load_x8(X, M, K, m, c * 128 + ch * 8, xvec, x);
                lut_entries16(x, l, T + ((size_t)ch * LUT_CSTRIDE + l) * MT + m, 16 * MT);
            }
        }
        __syncthreads();

        if (row) {
#pragma unroll
            for (int wl = 0; wl < 4; wl++) {
#pragma unroll
                for (int i = 0; i < QMAX; i++) {
                    if (i < q) {
                        float s[MT];
                        lut_word<MT, HT>(T, u4_get(cb[i], wl), wl, s);
#pragma unroll
                        for (int m = 0; m < MT; m++)
                            acc[m] = fmaf(al[wl][i], s[m], acc[m]);
                    }
                }
                /* Offset: z times the sum of x over the word (pattern 0xFF). */
                float s[MT];
                lut_word<MT, HT>(T, 0xffffffffu, wl, s);
#pragma unroll
                for (int m = 0; m < MT; m++)
                    acc[m] = fmaf(zw[wl], s[m], acc[m]);
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

static size_t lut_smem_bytes(unsigned mt, bool ht)
{
    return (size_t)LUT_CHUNKS * LUT_CSTRIDE * mt * (ht ? 2 : 4);
}

static unsigned pow2_at_least(size_t M)
{
    return M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8;
}

extern "C" int qs_cuda_lut_choose(size_t M, size_t N, size_t K, unsigned q, int sm_count,
                                  qs_cuda_lut_cfg *cfg)
{
    if (!cfg || M < 1 || M > 8 || N < 1 || K < 1 || q < 1 || q > 8)
        return qs_seterr(QS_EINVAL,
                         "LUT-GEMM config for M=%zu N=%zu K=%zu q=%u: need M in 1..8, q in 1..8", M,
                         N, K, q);
    if (sm_count <= 0 && (sm_count = qs_cuda_sm_count()) <= 0)
        return QS_ENODEV;
    unsigned mt = pow2_at_least(M);
    size_t nc = ((K + 31) / 32 + 3) / 4;
    size_t smem = lut_smem_bytes(mt, false);
    /* Many rows per CTA amortize the table (1 build per 256 rows); small N
     * gets 128-row CTAs and more K-splits instead. */
    unsigned threads = N >= 4096 ? 256 : 128;
    size_t per_sm = (227 * 1024) / (smem + 1024);
    if (per_sm > 2048 / threads)
        per_sm = 2048 / threads;
    /* Registers (ptxas report, sm_90a): about 64 / 100 / 176 per thread for
     * QMAX = 2 / 4 / 8, out of 65536 per SM. */
    size_t regs = q <= 2 ? 64 : q <= 4 ? 100 : 176;
    if (per_sm > 65536 / (regs * threads))
        per_sm = 65536 / (regs * threads);
    if (per_sm < 1)
        per_sm = 1;
    size_t ctas_n = (N + threads - 1) / threads;
    size_t wave = (size_t)sm_count * per_sm; /* CTAs resident at once */
    size_t max_k = nc / 2 > 1 ? nc / 2 : 1;  /* at least 2 slices per split */
    if (max_k > 64 / M)
        max_k = 64 / M;
    /* The fewest splits that fill a wave with the SMs evenly loaded (every
     * SM within 10% of the same CTA count); failing that, the most even. */
    size_t splits = 0, best = 1;
    double best_eff = 0;
    for (size_t s = 1; s <= max_k; s++) {
        size_t ctas = ctas_n * s, per = (ctas + sm_count - 1) / sm_count;
        double eff = (double)ctas / ((double)per * sm_count);
        if (ctas >= wave && eff >= 0.9) {
            splits = s;
            break;
        }
        if (eff > best_eff + 1e-9 && (ctas >= wave || s == max_k || ctas * 2 >= wave))
            best_eff = eff, best = s;
    }
    if (!splits)
        splits = best;
    cfg->threads = threads;
    cfg->splits = (unsigned)splits;
    cfg->half_tables = 0; /* fp32 tables unless measurements say otherwise */
    return QS_OK;
}

template <int MT, int QMAX, int TH, bool HT>
static int lut_launch(qs_cuda_bcq *w, const void *X, size_t M, void *Y, unsigned splits,
                      cudaStream_t st)
{
    const size_t smem = lut_smem_bytes(MT, HT);
    if (smem > 48 * 1024)
        QS_CU(cudaFuncSetAttribute(lut_kernel<MT, QMAX, TH, HT>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid((unsigned)((w->N + TH - 1) / TH), splits);
    QS_LAUNCH(grid, TH, smem, st, lut_kernel<MT, QMAX, TH, HT>)
    ((const uint4 *)w->bits, (const __half *)w->alpha, (const __half *)w->z, (const __half *)X,
     (__half *)Y, (float *)w->ws, (int)M, (int)w->N, (int)w->K, (int)w->q, (int)bcq_gs(w->K, w->g),
     (int)w->ngroups, (int)w->nc, (int)splits);
    QS_CU_LAUNCH("lut_kernel");
    if (splits > 1)
        return qs_cuda_reduce_splits((const float *)w->ws, Y, M, w->N, splits, st);
    return QS_OK;
}

template <int MT, int QMAX, bool HT>
static int lut_launch_th(qs_cuda_bcq *w, const void *X, size_t M, void *Y, unsigned th,
                         unsigned splits, cudaStream_t st)
{
    return th == 128 ? lut_launch<MT, QMAX, 128, HT>(w, X, M, Y, splits, st)
                     : lut_launch<MT, QMAX, 256, HT>(w, X, M, Y, splits, st);
}

template <int MT, bool HT>
static int lut_launch_q(qs_cuda_bcq *w, const void *X, size_t M, void *Y, unsigned th,
                        unsigned splits, cudaStream_t st)
{
    if (w->q <= 2)
        return lut_launch_th<MT, 2, HT>(w, X, M, Y, th, splits, st);
    if (w->q <= 4)
        return lut_launch_th<MT, 4, HT>(w, X, M, Y, th, splits, st);
    return lut_launch_th<MT, 8, HT>(w, X, M, Y, th, splits, st);
}

static int bcq_args(const qs_cuda_bcq *w, const void *X, const void *Y, size_t M, const char *who)
{
    if (!w || !w->bits || !w->alpha || !w->z || !w->ws || !X || !Y)
        return qs_seterr(QS_EINVAL,
                         "%s: NULL weights, input or output (upload the weights with "
                         "qs_cuda_bcq_upload first)",
                         who);
    if (M < 1 || M > (1u << 30))
        return qs_seterr(QS_EINVAL, "%s: batch M=%zu out of range", who, M);
    return QS_OK;
}

extern "C" int qs_cuda_lutgemm(qs_cuda_bcq *w, const void *X, size_t M, void *Y, void *stream,
                               const qs_cuda_lut_cfg *cfg)
{
    int err = bcq_args(w, X, Y, M, "qs_cuda_lutgemm");
    if (err)
        return err;
    if (M > 8)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_lutgemm takes M = 1..8, got %zu: use "
                         "qs_cuda_bcq_matmul (tensor-core path) for larger batches",
                         M);
    qs_cuda_lut_cfg c;
    if (cfg)
        c = *cfg;
    else if ((err = qs_cuda_lut_choose(M, w->N, w->K, w->q, 0, &c)))
        return err;
    if ((c.threads != 128 && c.threads != 256) || c.splits < 1 || c.splits * M > 64 ||
        c.splits > w->nc)
        return qs_seterr(QS_EINVAL,
                         "LUT-GEMM config threads=%u splits=%u invalid for M=%zu, %zu slices: "
                         "threads 128 or 256, splits * M <= 64, splits <= slices",
                         c.threads, c.splits, M, w->nc);
    cudaStream_t st = QS_CU_STREAM(stream);
    const bool ht = c.half_tables && M >= 2; /* token pairs: no half tables at M = 1 */
    switch (pow2_at_least(M)) {
    case 1:
        return lut_launch_q<1, false>(w, X, M, Y, c.threads, c.splits, st);
    case 2:
        return ht ? lut_launch_q<2, true>(w, X, M, Y, c.threads, c.splits, st)
                  : lut_launch_q<2, false>(w, X, M, Y, c.threads, c.splits, st);
    case 4:
        return ht ? lut_launch_q<4, true>(w, X, M, Y, c.threads, c.splits, st)
                  : lut_launch_q<4, false>(w, X, M, Y, c.threads, c.splits, st);
    default:
        return ht ? lut_launch_q<8, true>(w, X, M, Y, c.threads, c.splits, st)
                  : lut_launch_q<8, false>(w, X, M, Y, c.threads, c.splits, st);
    }
}

/* ---- Host emulation of the LUT kernel ---------------------------------------------
 * The same slices, table builder, look-ups, scale fetches and split order as
 * lut_kernel, on the host, from the packed device layout: checks the layout
 * and the table arithmetic on machines without a GPU. fp32 output, no fp16
 * rounding of Y (X is taken as given, fp32). */
template <int MT, bool HT>
static void lut_emulate(const qs_bcq *w, const uint32_t *bits, const uint16_t *alpha,
                        const uint16_t *zz, const float *X, int M, int splits, float *Y, void *T,
                        float *part)
{
    const int N = (int)w->N, K = (int)w->K, q = (int)w->q;
    const int nc = (int)(((w->K + 31) / 32 + 3) / 4), ng = (int)qs_bcq_ngroups(w->K, w->g);
    const int gs = (int)bcq_gs(w->K, w->g);
    auto xload = [&](int m, int k0, float *x) {
        for (int j = 0; j < 8; j++)
            x[j] = (m < M && k0 + j < K) ? X[(size_t)m * K + k0 + j] : 0.0f;
    };
    for (int sp = 0; sp < splits; sp++) {
        const int c0 = (int)((long long)nc * sp / splits);
        const int c1 = (int)((long long)nc * (sp + 1) / splits);
        for (int i = 0; i < M * N; i++)
            part[(size_t)sp * M * N + i] = 0.0f;
        for (int c = c0; c < c1; c++) {
            if constexpr (HT) {
                constexpr int NP = MT / 2;
                for (int u = 0; u < LUT_CHUNKS * 16 * NP; u++) {
                    const int j = u % NP, l = (u / NP) & 15, ch = u / NP / 16;
                    float xa[8], xb[8];
                    xload(2 * j, c * 128 + ch * 8, xa);
                    xload(2 * j + 1, c * 128 + ch * 8, xb);
                    lut_entries16_h2<MT>(xa, xb, l,
                                         (__half2 *)T + ((size_t)ch * LUT_CSTRIDE + l) * NP + j);
                }
            } else {
                for (int u = 0; u < LUT_CHUNKS * 16 * MT; u++) {
                    const int m = u % MT, l = (u / MT) & 15, ch = u / MT / 16;
                    float x[8];
                    xload(m, c * 128 + ch * 8, x);
                    lut_entries16(x, l, (float *)T + ((size_t)ch * LUT_CSTRIDE + l) * MT + m,
                                  16 * MT);
                }
            }
            for (int n = 0; n < N; n++) {
                float acc[MT];
                for (int m = 0; m < MT; m++)
                    acc[m] = 0.0f;
                for (int wl = 0; wl < 4; wl++) {
                    const int gi = std::min((c * 4 + wl) * 32 / gs, ng - 1);
                    float s[MT];
                    for (int i = 0; i < q; i++) {
                        uint32_t wd = bits[(((size_t)c * q + i) * N + n) * 4 + wl];
                        lut_word<MT, HT>(T, wd, wl, s);
                        float a = qs_fp16_to_fp32(alpha[((size_t)gi * q + i) * N + n]);
                        for (int m = 0; m < MT; m++)
                            acc[m] = fmaf(a, s[m], acc[m]);
                    }
                    lut_word<MT, HT>(T, 0xffffffffu, wl, s);
                    float z = qs_fp16_to_fp32(zz[(size_t)gi * N + n]);
                    for (int m = 0; m < MT; m++)
                        acc[m] = fmaf(z, s[m], acc[m]);
                }
                for (int m = 0; m < M; m++)
                    part[((size_t)sp * M + m) * N + n] += acc[m];
            }
        }
    }
    for (size_t t = 0; t < (size_t)M * N; t++) {
        float s = 0;
        for (int sp = 0; sp < splits; sp++)
            s += part[(size_t)sp * M * N + t];
        Y[t] = s;
    }
}

extern "C" int qs_cuda_lutgemm_emulate(const qs_bcq *w, const float *X, size_t M, unsigned splits,
                                       int half_tables, float *Y)
{
    if (!w || !X || !Y || M < 1 || M > 8)
        return qs_seterr(QS_EINVAL, "qs_cuda_lutgemm_emulate: NULL argument or M=%zu not 1..8", M);
    int err = qs_bcq_check(w->N, w->K, w->q, w->g);
    if (err)
        return err;
    size_t nc = ((w->K + 31) / 32 + 3) / 4, ng = qs_bcq_ngroups(w->K, w->g);
    if (splits < 1 || splits > nc || splits * M > 64)
        return qs_seterr(QS_EINVAL, "qs_cuda_lutgemm_emulate: splits=%u invalid", splits);
    unsigned mt = pow2_at_least(M);
    const bool ht = half_tables && M >= 2;
    uint32_t *bits = (uint32_t *)malloc((size_t)w->q * w->N * nc * 16);
    uint16_t *alpha = (uint16_t *)malloc((size_t)w->q * w->N * ng * 2);
    uint16_t *z = (uint16_t *)malloc(w->N * ng * 2);
    void *T = malloc(lut_smem_bytes(mt, false));
    float *part = (float *)malloc((size_t)splits * M * w->N * 4);
    if (!bits || !alpha || !z || !T || !part)
        err = qs_seterr(QS_ENOMEM, "qs_cuda_lutgemm_emulate: out of memory");
    if (!err)
        err = qs_cuda_bcq_pack(w, bits, alpha, z);
    if (!err) {
        int Mi = (int)M, sp = (int)splits;
        if (mt == 1)
            lut_emulate<1, false>(w, bits, alpha, z, X, Mi, sp, Y, T, part);
        else if (mt == 2)
            ht ? lut_emulate<2, true>(w, bits, alpha, z, X, Mi, sp, Y, T, part)
               : lut_emulate<2, false>(w, bits, alpha, z, X, Mi, sp, Y, T, part);
        else if (mt == 4)
            ht ? lut_emulate<4, true>(w, bits, alpha, z, X, Mi, sp, Y, T, part)
               : lut_emulate<4, false>(w, bits, alpha, z, X, Mi, sp, Y, T, part);
        else
            ht ? lut_emulate<8, true>(w, bits, alpha, z, X, Mi, sp, Y, T, part)
               : lut_emulate<8, false>(w, bits, alpha, z, X, Mi, sp, Y, T, part);
    }
    free(bits), free(alpha), free(z), free(T), free(part);
    return err;
}

/* ---- Fused dequantize + tensor cores ------------------------------------------------
 * CTA tile: BM tokens x BN rows of W (16 x 128 or 64 x 64), K in steps of 128
 * columns (one uint4 chunk), 8 warps, K split across grid.z when the tiles
 * alone do not fill the GPU. Per step: the X tile (fp16, straight copy) and
 * the W tile (dequantized per (row, 32-column word): w = (z - sum alpha) +
 * sum_i 2 alpha_i b_i in fp32, stored as fp16) go to shared memory, rows
 * padded by 8 halves against bank conflicts, then 8 k-steps of WMMA
 * 16x16x16 (HMMA, fp32 accumulators). The bit words and scales of step c+1
 * are loaded into registers before step c's dequantization, so their
 * latency hides behind it and the MMAs. Grid x runs over the M tiles so the
 * CTAs resident together share one W tile through L2. */
#define MMA_BK      128
#define MMA_LD      (MMA_BK + 8)
#define MMA_THREADS 256

template <int BM, int BN, int QMAX>
__global__ void __launch_bounds__(MMA_THREADS)
    mma_kernel(const uint32_t *__restrict__ bits, const __half *__restrict__ alpha,
               const __half *__restrict__ zz, const __half *__restrict__ X, __half *__restrict__ Y,
               float *__restrict__ ws, int M, int N, int K, int q, int gs, int ng, int nw, int nc,
               int splits)
{
    using namespace nvcuda;
    constexpr int WARPS_M = BM >= 32 ? 2 : 1, WARPS_N = 8 / WARPS_M;
    constexpr int FM = BM / WARPS_M / 16, FN = BN / WARPS_N / 16;
    static_assert(FM >= 1 && FN >= 1, "tile too small for 8 warps");
    constexpr int UNITS = BN * 4 / MMA_THREADS; /* (row, word) units per thread */
    constexpr int XS = BM * MMA_LD, WS = BN * MMA_LD;
    constexpr int CS = BM * (BN + 4) * 2; /* fp32 as halves */
    constexpr int SMEM = (XS + WS) > CS ? (XS + WS) : CS;
    QS_SHARED_ALIGNED(128, __half, sm, [SMEM]);
    __half *Xs = sm, *Ws = sm + XS;
    float *Cs = reinterpret_cast<float *>(sm);

    const int tid = threadIdx.x, warp = tid / 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN, sp = blockIdx.z;
    const int c0 = (int)((long long)nc * sp / splits),
              c1 = (int)((long long)nc * (sp + 1) / splits);
    const bool xvec = (K % 8) == 0 && ((uintptr_t)X & 15) == 0; /* 16-byte rows */

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
    for (int a = 0; a < FM; a++)
#pragma unroll
        for (int b = 0; b < FN; b++)
            wmma::fill_fragment(acc[a][b], 0.0f);

    /* Register prefetch of one step's W words and scales, per unit. */
    uint32_t pw[UNITS][QMAX];
    float pa[UNITS][QMAX], pz[UNITS];
    auto prefetch = [&](int c) {
#pragma unroll
        for (int v = 0; v < UNITS; v++) {
            const int u = tid + v * MMA_THREADS, r = u / 4, wl = u % 4, n = n0 + r;
            const int wi = c * 4 + wl, gi = min(wi * 32 / gs, ng - 1);
            const bool ok = c < c1 && n < N && wi < nw;
#pragma unroll
            for (int i = 0; i < QMAX; i++) {
                pw[v][i] =
                    (ok && i < q) ? __ldg(&bits[(((size_t)c * q + i) * N + n) * 4 + wl]) : 0u;
                pa[v][i] = (ok && i < q) ? __half2float(alpha[((size_t)gi * q + i) * N + n]) : 0.f;
            }
            pz[v] = ok ? __half2float(zz[(size_t)gi * N + n]) : 0.f;
        }
    };
    prefetch(c0);

    for (int c = c0; c < c1; c++) {
        uint32_t cw[UNITS][QMAX];
        float ca[UNITS][QMAX], cz[UNITS];
#pragma unroll
        for (int v = 0; v < UNITS; v++) {
#pragma unroll
            for (int i = 0; i < QMAX; i++)
                cw[v][i] = pw[v][i], ca[v][i] = pa[v][i];
            cz[v] = pz[v];
        }
        prefetch(c + 1);
        __syncthreads(); /* the previous step's MMAs are done with Xs, Ws */
        /* X tile: BM x 128 halves, 8 per unit. */
        for (int u = tid; u < BM * 16; u += MMA_THREADS) {
            const int r = u / 16, k0 = c * MMA_BK + (u % 16) * 8, m = m0 + r;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (m < M && xvec && k0 + 8 <= K) {
                v = __ldg(reinterpret_cast<const uint4 *>(X + (size_t)m * K + k0));
            } else if (m < M) {
                union {
                    uint4 u;
                    __half h[8];
                } t;
#pragma unroll
                for (int j = 0; j < 8; j++)
                    t.h[j] = k0 + j < K ? X[(size_t)m * K + k0 + j] : __float2half(0.0f);
                v = t.u;
            }
            *reinterpret_cast<uint4 *>(Xs + r * MMA_LD + (u % 16) * 8) = v;
        }
        /* W tile: BN rows x 4 words; consecutive units read consecutive words
         * of the [c][i][n][4] layout. Out-of-range units have all-zero
         * scales, so they store zeros. */
#pragma unroll
        for (int v = 0; v < UNITS; v++) {
            const int u = tid + v * MMA_THREADS, r = u / 4, wl = u % 4;
            float base = cz[v];
#pragma unroll
            for (int i = 0; i < QMAX; i++)
                base -= ca[v][i];
            float w[32];
#pragma unroll
            for (int b = 0; b < 32; b++)
                w[b] = base;
#pragma unroll
            for (int i = 0; i < QMAX; i++) {
                if (i < q) {
                    const float d2 = 2.0f * ca[v][i];
#pragma unroll
                    for (int b = 0; b < 32; b++)
                        w[b] += (cw[v][i] >> b & 1u) ? d2 : 0.0f;
                }
            }
            uint4 *out = reinterpret_cast<uint4 *>(Ws + r * MMA_LD + wl * 32);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                union {
                    uint4 u;
                    __half2 h[4];
                } t;
#pragma unroll
                for (int e = 0; e < 4; e++)
                    t.h[e] = __floats2half2_rn(w[8 * j + 2 * e], w[8 * j + 2 * e + 1]);
                out[j] = t.u;
            }
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < MMA_BK / 16; kk++) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa[FM];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb[FN];
#pragma unroll
            for (int a = 0; a < FM; a++)
                wmma::load_matrix_sync(fa[a], Xs + (wm * FM * 16 + a * 16) * MMA_LD + kk * 16,
                                       MMA_LD);
#pragma unroll
            for (int b = 0; b < FN; b++)
                wmma::load_matrix_sync(fb[b], Ws + (wn * FN * 16 + b * 16) * MMA_LD + kk * 16,
                                       MMA_LD);
#pragma unroll
            for (int a = 0; a < FM; a++)
#pragma unroll
                for (int b = 0; b < FN; b++)
                    wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
        }
    }
    __syncthreads();
#pragma unroll
    for (int a = 0; a < FM; a++)
#pragma unroll
        for (int b = 0; b < FN; b++)
            wmma::store_matrix_sync(Cs + (wm * FM * 16 + a * 16) * (BN + 4) + wn * FN * 16 + b * 16,
                                    acc[a][b], BN + 4, wmma::mem_row_major);
    __syncthreads();
    for (int u = tid; u < BM * BN; u += MMA_THREADS) {
        const int r = u / BN, col = u % BN, m = m0 + r, n = n0 + col;
        if (m < M && n < N) {
            const float y = Cs[r * (BN + 4) + col];
            if (splits == 1)
                Y[(size_t)m * N + n] = __float2half_rn(y);
            else
                ws[((size_t)sp * M + m) * N + n] = y;
        }
    }
}

template <int BM, int BN, int QMAX>
static int mma_launch(const qs_cuda_bcq *w, const void *X, size_t M, void *Y, unsigned splits,
                      cudaStream_t st)
{
    dim3 grid((unsigned)((M + BM - 1) / BM), (unsigned)((w->N + BN - 1) / BN), splits);
    if (grid.y > 65535 || grid.x > 65535)
        return qs_seterr(QS_EINVAL, "qs_cuda_bcq_gemm_mma: M=%zu x N=%zu is over the grid", M,
                         w->N);
    QS_LAUNCH(grid, MMA_THREADS, 0, st, mma_kernel<BM, BN, QMAX>)
    ((const uint32_t *)w->bits, (const __half *)w->alpha, (const __half *)w->z, (const __half *)X,
     (__half *)Y, (float *)w->ws, (int)M, (int)w->N, (int)w->K, (int)w->q, (int)bcq_gs(w->K, w->g),
     (int)w->ngroups, (int)w->nw, (int)w->nc, (int)splits);
    QS_CU_LAUNCH("mma_kernel");
    if (splits > 1)
        return qs_cuda_reduce_splits((const float *)w->ws, Y, M, w->N, splits, st);
    return QS_OK;
}

template <int BM, int BN>
static int mma_launch_q(const qs_cuda_bcq *w, const void *X, size_t M, void *Y, unsigned splits,
                        cudaStream_t st)
{
    if (w->q <= 2)
        return mma_launch<BM, BN, 2>(w, X, M, Y, splits, st);
    if (w->q <= 4)
        return mma_launch<BM, BN, 4>(w, X, M, Y, splits, st);
    return mma_launch<BM, BN, 8>(w, X, M, Y, splits, st);
}

extern "C" int qs_cuda_mma_splits(size_t M, size_t N, size_t K, unsigned bm, int sm_count)
{
    if (sm_count <= 0 && (sm_count = qs_cuda_sm_count()) <= 0)
        return 1;
    size_t bn = bm == 16 ? 128 : 64, nc = ((K + 31) / 32 + 3) / 4;
    size_t tiles = ((M + bm - 1) / bm) * ((N + bn - 1) / bn);
    size_t wave = 2 * (size_t)sm_count; /* 2 CTAs of 8 warps per SM (registers) */
    size_t s = (wave + tiles - 1) / tiles, max_s = QS_CUDA_WS_ROWS / M;
    if (s > nc / 4)
        s = nc / 4; /* at least 4 steps of 128 columns per split */
    if (s > max_s)
        s = max_s;
    return s < 1 ? 1 : (int)s;
}

extern "C" int qs_cuda_bcq_gemm_mma(qs_cuda_bcq *w, const void *X, size_t M, void *Y, void *stream,
                                    unsigned bm, unsigned splits)
{
    int err = bcq_args(w, X, Y, M, "qs_cuda_bcq_gemm_mma");
    if (err)
        return err;
    if (bm == 0)
        bm = M <= 16 ? 16 : 64;
    if (bm != 16 && bm != 64)
        return qs_seterr(QS_EINVAL, "qs_cuda_bcq_gemm_mma: bm=%u, use 16, 64 or 0", bm);
    if (splits == 0)
        splits = (unsigned)qs_cuda_mma_splits(M, w->N, w->K, bm, 0);
    /* One split writes Y directly; only partial sums need the workspace. */
    if ((splits > 1 && splits * M > QS_CUDA_WS_ROWS) || splits > w->nc)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_bcq_gemm_mma: splits=%u for M=%zu: need splits * M <= %d when "
                         "splitting, and splits <= %zu (128-column steps)",
                         splits, M, QS_CUDA_WS_ROWS, w->nc);
    cudaStream_t st = QS_CU_STREAM(stream);
    if (bm == 16)
        return mma_launch_q<16, 128>(w, X, M, Y, splits, st);
    return mma_launch_q<64, 64>(w, X, M, Y, splits, st);
}

/* The crossover: LUT-GEMM up to M = 2, the tensor-core path above. A model
 * of the LUT kernel's shared-memory traffic (random table bytes: ~2.7
 * wavefronts per look-up at M = 1, ~12 per request at M = 8 by the
 * harness's bank model) puts the tensor cores ahead from batch 2 to 4;
 * qbench_gpu measures both at M <= 8 to set it per device. */
static unsigned g_lut_max_m = 2;

extern "C" int qs_cuda_set_lut_max_m(unsigned m)
{
    if (m > 8)
        return qs_seterr(QS_EINVAL, "LUT-GEMM takes batches up to 8, got a crossover of %u", m);
    g_lut_max_m = m;
    return QS_OK;
}

extern "C" int qs_cuda_bcq_matmul(qs_cuda_bcq *w, const void *X, size_t M, void *Y, void *stream)
{
    if (M >= 1 && M <= g_lut_max_m)
        return qs_cuda_lutgemm(w, X, M, Y, stream, NULL);
    return qs_cuda_bcq_gemm_mma(w, X, M, Y, stream, 0, 0);
}
