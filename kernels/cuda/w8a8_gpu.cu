/* w8a8_gpu.cu: SmoothQuant W8A8 on the GPU (qs_kernels.h, "W8A8 on the
 * device"): the device layout, activation quantization and the int8
 * tensor-core GEMM. Plain references: kernels/cpu/w8a8.c (qs_w8a8_gemm and
 * its float64 qs_w8a8_gemm_ref_f64, on the same activation codes).
 *
 *   X   M x K fp16 row-major, M <= QS_CUDA_W8_ROWS
 *   W   N x K int8 codes, fp32 scale sw[N]
 *   Y   M x N fp16 = sw[n] * sum_g sx[m,g] * sum_{k in g} xq[m,k] wq[n,k]
 *
 * Device layout: each group of G input channels (G = the qs_w8's group; one
 * group of Kp per token) starts at a multiple of gp = 32 * ceil(G / 32)
 * bytes of its row, zeros after its channels; rows are kd = 128 *
 * ceil(ngroups * gp / 128) bytes. Why: a 32-channel step of mma.sync
 * m16n8k32 then never straddles two groups, so each group's int32 sums are
 * exact and are scaled into fp32 when the group ends, and the GEMM's
 * 128-byte K tiles need no bounds; the padding costs nothing for G a
 * multiple of 32 (the usual 128 and 64). The activations go through the
 * same layout in the workspace: xq int8 [QS_CUDA_W8_ROWS][kd], then sx fp32
 * [QS_CUDA_W8_ROWS][ngroups], then the split-K partial sums fp32
 * [QS_CUDA_WS_ROWS][N].
 *
 * 1. w8_quant_warp / w8_quant_block: per (token, group), one warp (G <= 1024)
 *    or one 512-thread block: scale = max|x| / 127, codes rint(x * 127/max)
 *    clamped to +-127 with the CPU's fp32 operations (__fdiv_rn, __fmul_rn,
 *    rintf: round to nearest even like nearbyintf), or the static scale's
 *    1/s; a group holding NaN or Inf gets scale NaN, which makes the token's
 *    outputs NaN as the CPU's (which marks all of the token's groups).
 * 2. w8a8_gemm_kernel: CTA tile BM tokens x BN = 128 rows of W, K in tiles
 *    of 128 bytes through a STAGES-deep cp.async pipeline (16-byte chunks,
 *    XOR-swizzled by row so that ldmatrix's eight rows hit eight different
 *    bank groups); per 32-channel step ldmatrix.x4 fragments and
 *    mma.sync.m16n8k32 s8 into int32; at each group's end the int32 sums
 *    are scaled by sx[m, g] into fp32 accumulators (GROUPED; with one group
 *    the fp32 accumulators exist only in the epilogue), sw[n] in the
 *    epilogue, fp16 out. Tiles: decode M <= 16: 16 x 128, 4 warps; M <= 64:
 *    64 x 128, 4 warps (32 x 64 each); prefill: 128 x 128, 8 warps (64 x 32
 *    each). K is split across grid.z (the partial sums reduced in a fixed
 *    order by qs_cuda_reduce_splits) when the tiles alone do not fill the
 *    device. Grid x runs over the M tiles, so CTAs that share a W tile run
 *    together and read it once from DRAM. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/w8.h"
#include "cuda_util.cuh"
#include "ptx.cuh"
#include "w8_act.cuh"

#define W8_BK       128    /* bytes (channels) per pipeline stage */
#define W8_STAGES   4      /* pipeline depth */
#define W8_MAX_G    131072 /* 127 * 127 * G must fit in int32 */
#define W8_WIDE_G   1024   /* larger groups: a block per group */
#define W8_MAX_SPLT 16

static size_t w8_gp(size_t G)
{
    return (G + 31) / 32 * 32;
}

/* ---- Upload and free --------------------------------------------------------------- */

extern "C" void qs_cuda_w8_free(qs_cuda_w8 *d)
{
    if (!d)
        return;
    qs_cuda_free(d->codes);
    qs_cuda_free(d->scale);
    qs_cuda_free(d->ws);
    memset(d, 0, sizeof(*d));
}

/* The device layout of K channels in activation groups (qs_w8_group's
 * rule): group G, ng groups of gp bytes, rows of kd bytes. */
static int w8_layout(size_t K, size_t act_group, size_t *G, size_t *ng, size_t *gp, size_t *kd)
{
    if (act_group % 4)
        return qs_seterr(QS_EINVAL,
                         "activation group of %zu channels: use a multiple of 4 (128 is the "
                         "usual), or 0 for one scale per token",
                         act_group);
    *G = qs_w8_group(K, act_group), *ng = qs_w8_groups(K, act_group);
    if (*G > W8_MAX_G)
        return qs_seterr(QS_EINVAL,
                         "an activation group of %zu channels can overflow the int32 sums of "
                         "the tensor cores (at most %d): use groups of 128",
                         *G, W8_MAX_G);
    *gp = w8_gp(*G), *kd = (*ng * *gp + W8_BK - 1) / W8_BK * W8_BK;
    if (*kd > (1u << 30))
        return qs_seterr(QS_EINVAL, "W8 rows of %zu padded channels are too long for the GPU", *kd);
    return QS_OK;
}

extern "C" int qs_cuda_w8_alloc(qs_cuda_w8 *d, size_t N, size_t K, size_t act_group)
{
    if (!d)
        return qs_seterr(QS_EINVAL, "qs_cuda_w8_alloc got a NULL handle");
    memset(d, 0, sizeof(*d));
    if (N == 0 || K == 0 || N > (1u << 30) || K > (1u << 30))
        return qs_seterr(QS_EINVAL,
                         "W8 matrix of %zu x %zu: the GPU kernels take 1 to 2^30 rows and columns",
                         N, K);
    size_t G, ng, gp, kd;
    int err = w8_layout(K, act_group, &G, &ng, &gp, &kd);
    if (err)
        return err;
    d->N = N, d->K = K, d->group = G, d->ngroups = ng, d->gp = gp, d->kd = kd;
    d->bytes = N * kd + N * sizeof(float);
    d->ws_bytes = (size_t)QS_CUDA_W8_ROWS * kd + (size_t)QS_CUDA_W8_ROWS * ng * sizeof(float) +
                  (size_t)QS_CUDA_WS_ROWS * N * sizeof(float);
    if ((err = qs_cuda_malloc(&d->codes, N * kd)) ||
        (err = qs_cuda_malloc(&d->scale, N * sizeof(float))) ||
        (err = qs_cuda_malloc(&d->ws, d->ws_bytes))) {
        qs_cuda_w8_free(d);
        return err;
    }
    return QS_OK;
}

extern "C" int qs_cuda_w8_act_alloc(qs_cuda_w8_act *a, size_t rows, size_t K, size_t act_group)
{
    if (!a)
        return qs_seterr(QS_EINVAL, "qs_cuda_w8_act_alloc got a NULL handle");
    memset(a, 0, sizeof(*a));
    if (rows == 0 || rows > QS_CUDA_W8_ROWS || K == 0 || K > (1u << 30))
        return qs_seterr(QS_EINVAL,
                         "W8 activation codes for %zu tokens of %zu channels: 1 to %d tokens, 1 "
                         "to 2^30 channels",
                         rows, K, QS_CUDA_W8_ROWS);
    int err = w8_layout(K, act_group, &a->group, &a->ngroups, &a->gp, &a->kd);
    if (err)
        return err;
    a->rows = rows, a->K = K;
    if ((err = qs_cuda_malloc(&a->xq, rows * a->kd)) ||
        (err = qs_cuda_malloc((void **)&a->sx, rows * a->ngroups * sizeof(float))))
        qs_cuda_w8_act_free(a);
    return err;
}

extern "C" void qs_cuda_w8_act_free(qs_cuda_w8_act *a)
{
    if (!a)
        return;
    qs_cuda_free(a->xq);
    qs_cuda_free(a->sx);
    memset(a, 0, sizeof(*a));
}

extern "C" int qs_cuda_w8_upload(qs_cuda_w8 *d, const qs_w8 *w)
{
    if (!d || !w || !w->w || !w->scale)
        return qs_seterr(QS_EINVAL, "qs_cuda_w8_upload got a NULL handle or weights: quantize "
                                    "them with qs_w8_quantize first");
    if (w->group == 0 || w->group % 4 || w->group > w->Kp || w->Kp != (w->K + 3) / 4 * 4)
        return qs_seterr(QS_EINVAL,
                         "W8 matrix has activation group %zu for K=%zu: quantize it with "
                         "qs_w8_quantize",
                         w->group, w->K);
    int err = qs_cuda_w8_alloc(d, w->N, w->K, w->group);
    if (err)
        return err;
    const size_t N = w->N, K = w->K, G = d->group, gp = d->gp, kd = d->kd;
    int8_t *codes = (int8_t *)calloc(N, kd);
    if (!codes) {
        qs_cuda_w8_free(d);
        return qs_seterr(QS_ENOMEM, "out of host memory staging %zu bytes of W8 codes", N * kd);
    }
    /* The host's 8-row x 4-column tiles to rows of padded groups. */
    for (size_t n = 0; n < N; n++)
        for (size_t k = 0; k < K; k++)
            codes[n * kd + k / G * gp + k % G] = w->w[qs_w8_index(N, w->Kp, n, k)];
    if (!(err = qs_cuda_h2d(d->codes, codes, N * kd)))
        err = qs_cuda_h2d(d->scale, w->scale, N * sizeof(float));
    free(codes);
    if (err)
        qs_cuda_w8_free(d);
    return err;
}

/* ---- Weights quantized on the device -------------------------------------------------
 * qs_w8_quantize's rule, one CTA per row: scale = max|w| / 127, codes
 * nearbyintf(w * 127 / max) clamped to +-127 (the activations' rule with
 * one group per row, w8_act.cuh), written in the device layout with its
 * zero padding, a 4-byte word per thread at a time. A NaN or Inf sets *bad. */
#define W8_WQ_THREADS 256

__global__ void __launch_bounds__(W8_WQ_THREADS)
    w8_weight_quant(const float *__restrict__ W, int K, int G, int gp, int ng, int kd,
                    int8_t *__restrict__ codes, float *__restrict__ scale, int *bad)
{
    QS_SHARED(float, red, [W8_WQ_THREADS / 32]);
    const int n = blockIdx.x, tid = threadIdx.x;
    const float *row = W + (size_t)n * K;
    float mx = 0.0f;
    bool nf = false;
    for (int k = tid; k < K; k += W8_WQ_THREADS) {
        const float v = row[k];
        nf |= !isfinite(v);
        mx = fmaxf(mx, fabsf(v));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if ((tid & 31) == 0)
        red[tid >> 5] = mx;
    nf = __syncthreads_or(nf) != 0;
    mx = red[0];
#pragma unroll
    for (int w = 1; w < W8_WQ_THREADS / 32; w++)
        mx = fmaxf(mx, red[w]);
    if (nf) {
        if (tid == 0)
            atomicOr(bad, 1);
        return; /* the whole block: the load fails */
    }
    float s, inv;
    w8_scale(mx, s, inv);
    bool none = false; /* every weight is finite here */
    int8_t *out = codes + (size_t)n * kd;
    for (int j = 4 * tid; j < kd; j += 4 * W8_WQ_THREADS) {
        uint32_t word = 0;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int p = j + e, g = p / gp, c = p - g * gp, k = g * G + c;
            if (g < ng && c < G && k < K)
                word |= w8_code(row[k], inv, none) << (8 * e);
        }
        *reinterpret_cast<uint32_t *>(out + j) = word;
    }
    if (tid == 0)
        scale[n] = s;
}

extern "C" int qs_cuda_w8_quantize(qs_cuda_w8 *d, const float *W, size_t N, size_t K,
                                   size_t act_group, void *stream)
{
    if (!d || !W)
        return qs_seterr(QS_EINVAL, "qs_cuda_w8_quantize got a NULL handle or weights");
    int err = qs_cuda_w8_alloc(d, N, K, act_group);
    if (err)
        return err;
    if (N > 0x7fffffff) {
        qs_cuda_w8_free(d);
        return qs_seterr(QS_EINVAL, "qs_cuda_w8_quantize: %zu rows are over the grid", N);
    }
    cudaStream_t st = QS_CU_STREAM(stream);
    int *bad = NULL, hbad = 0;
    if (!(err = qs_cuda_malloc((void **)&bad, sizeof *bad))) {
        cudaError_t e = cudaMemsetAsync(bad, 0, sizeof *bad, st);
        if (e == cudaSuccess) {
            QS_LAUNCH((unsigned)N, W8_WQ_THREADS, 0, st, w8_weight_quant)
            (W, (int)K, (int)d->group, (int)d->gp, (int)d->ngroups, (int)d->kd, (int8_t *)d->codes,
             (float *)d->scale, bad);
            e = cudaGetLastError();
        }
        if (e == cudaSuccess)
            e = cudaMemcpyAsync(&hbad, bad, sizeof hbad, cudaMemcpyDeviceToHost, st);
        if (e == cudaSuccess)
            e = cudaStreamSynchronize(st);
        if (e != cudaSuccess)
            err = qs_cuda_fail(e, "w8_weight_quant", __FILE__, __LINE__);
        qs_cuda_free(bad);
    }
    if (!err && hbad)
        err = qs_seterr(QS_EINVAL, "weights hold NaN or Inf: fix the checkpoint before "
                                   "quantizing it");
    if (err)
        qs_cuda_w8_free(d);
    return err;
}

/* ---- Activation quantization ----------------------------------------------------------- */

/* x[j..j+3] (zeros from len on) as fp32; vec: 8-byte loads allowed. */
__device__ __forceinline__ void w8_load4(const __half *x, int j, int len, bool vec, float v[4])
{
    if (vec && j + 4 <= len) {
        union {
            uint2 u;
            __half h[4];
        } t;
        t.u = *reinterpret_cast<const uint2 *>(x + j);
#pragma unroll
        for (int e = 0; e < 4; e++)
            v[e] = __half2float(t.h[e]);
    } else {
#pragma unroll
        for (int e = 0; e < 4; e++)
            v[e] = j + e < len ? __half2float(x[j + e]) : 0.0f;
    }
}

/* Codes 4j..4j+3 of one group (the padding past len is 0). */
__device__ __forceinline__ uint32_t w8_code4(const __half *x, int j, int len, bool vec, float inv,
                                             bool &bad)
{
    float v[4];
    w8_load4(x, j, len, vec, v);
    uint32_t word = 0;
#pragma unroll
    for (int e = 0; e < 4; e++)
        if (j + e < len)
            word |= w8_code(v[e], inv, bad) << (8 * e);
    return word;
}

struct w8_quant_args {
    const __half *X;
    int8_t *xq;
    float *sx;
    int K, G, gp, ng, kd;
    int vec;          /* K % 4 == 0 and X 8-byte aligned */
    float s_st, i_st; /* static scale and 1/scale; s_st <= 0: dynamic */
};

/* One warp per (token, group), 4 groups per block: grid (ceil(ng / 4), M). */
__global__ void __launch_bounds__(128) w8_quant_warp(w8_quant_args a)
{
    const int lane = threadIdx.x & 31, g = blockIdx.x * 4 + (threadIdx.x >> 5), m = blockIdx.y;
    if (g >= a.ng)
        return; /* a whole warp: no barrier in this kernel */
    const int k0 = g * a.G, len = min(a.G, a.K - k0);
    const __half *x = a.X + (size_t)m * a.K + k0;
    const bool vec = a.vec != 0;
    float s = a.s_st, inv = a.i_st;
    if (a.s_st <= 0) {
        float mx = 0.0f;
        for (int j = lane * 4; j < len; j += 128) {
            float v[4];
            w8_load4(x, j, len, vec, v);
#pragma unroll
            for (int e = 0; e < 4; e++)
                mx = fmaxf(mx, fabsf(v[e])); /* fmaxf skips NaN, as the CPU's */
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        w8_scale(mx, s, inv);
    }
    bool bad = false;
    int8_t *q = a.xq + (size_t)m * a.kd;
    for (int j = lane * 4; j < a.gp; j += 128)
        *reinterpret_cast<uint32_t *>(q + (size_t)g * a.gp + j) =
            w8_code4(x, j, len, vec, inv, bad);
    bad = __any_sync(0xffffffffu, bad);
    if (lane == 0)
        a.sx[(size_t)m * a.ng + g] = bad ? QS_W8_NAN_SCALE : s;
    if (g == a.ng - 1) /* the row's tail past the last group */
        for (int j = a.ng * a.gp + lane * 4; j < a.kd; j += 128)
            *reinterpret_cast<uint32_t *>(q + j) = 0u;
}

/* One 512-thread block per (token, group) for long groups: grid (ng, M). */
__global__ void __launch_bounds__(512) w8_quant_block(w8_quant_args a)
{
    QS_SHARED(float, red, [16]);
    const int tid = threadIdx.x, lane = tid & 31, g = blockIdx.x, m = blockIdx.y;
    const int k0 = g * a.G, len = min(a.G, a.K - k0);
    const __half *x = a.X + (size_t)m * a.K + k0;
    const bool vec = a.vec != 0;
    float s = a.s_st, inv = a.i_st;
    if (a.s_st <= 0) { /* the same for the whole block */
        float mx = 0.0f;
        for (int j = tid * 4; j < len; j += 2048) {
            float v[4];
            w8_load4(x, j, len, vec, v);
#pragma unroll
            for (int e = 0; e < 4; e++)
                mx = fmaxf(mx, fabsf(v[e]));
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        if (lane == 0)
            red[tid >> 5] = mx;
        __syncthreads();
        mx = red[0];
#pragma unroll
        for (int w = 1; w < 16; w++)
            mx = fmaxf(mx, red[w]);
        w8_scale(mx, s, inv);
    }
    bool bad = false;
    int8_t *q = a.xq + (size_t)m * a.kd;
    for (int j = tid * 4; j < a.gp; j += 2048)
        *reinterpret_cast<uint32_t *>(q + (size_t)g * a.gp + j) =
            w8_code4(x, j, len, vec, inv, bad);
    bad = __syncthreads_or(bad) != 0;
    if (tid == 0)
        a.sx[(size_t)m * a.ng + g] = bad ? QS_W8_NAN_SCALE : s;
    if (g == a.ng - 1)
        for (int j = a.ng * a.gp + tid * 4; j < a.kd; j += 2048)
            *reinterpret_cast<uint32_t *>(q + j) = 0u;
}

/* ---- The GEMM ----------------------------------------------------------------------------- */

struct w8_gemm_args {
    const int8_t *xq, *wq;
    const float *sx, *sw;
    __half *Y;
    float *part;           /* [splits][M][N] when splits > 1 */
    int M, N, kd, ng, spg; /* spg: 32-channel steps per group (gp / 32) */
    int splits, yvec;      /* yvec: N even and Y 4-byte aligned (half2 stores) */
};

/* Byte offset of 16-byte chunk ch (0..7) of row r in a stage's tile: rows of
 * 128 bytes, chunks XOR-swizzled by r % 8 so that the eight row addresses of
 * one ldmatrix matrix (same ch, rows r..r+7) fall in distinct bank groups. */
__device__ __forceinline__ int w8_swz(int r, int ch)
{
    return r * W8_BK + ((ch ^ (r & 7)) << 4);
}

template <int BM, int BN, int WM, int WN, int STAGES, bool GROUPED>
__global__ void __launch_bounds__(32 * WM * WN) w8a8_gemm_kernel(w8_gemm_args a)
{
    constexpr int THREADS = WM * WN * 32, WTM = BM / WM, WTN = BN / WN;
    constexpr int MT = WTM / 16, NT = WTN / 8;
    static_assert(MT >= 1 && NT >= 2 && NT % 2 == 0 && WTM % 16 == 0, "warp tile shape");
    constexpr int A_BYTES = BM * W8_BK, STAGE = (BM + BN) * W8_BK;
    constexpr int A_CHUNKS = BM * W8_BK / 16, B_CHUNKS = BN * W8_BK / 16;
    QS_DYN_SMEM(uint4, smv);
    char *sm = reinterpret_cast<char *>(smv);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / WN, wn = warp % WN;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN, sp = blockIdx.z;
    const int ktiles = a.kd / W8_BK;
    const int t0 = (int)((long long)ktiles * sp / a.splits);
    const int t1 = (int)((long long)ktiles * (sp + 1) / a.splits);
    const int nt = t1 - t0;

    /* Tile t of X's codes and W's codes into stage st; rows past M or N are
     * zero-filled (no global read), their sources clamped to row m0 / n0. */
    auto load_tile = [&](int st, int t) {
        char *As = sm + st * STAGE, *Bs = As + A_BYTES;
        const size_t kb = (size_t)t * W8_BK;
#pragma unroll
        for (int i = 0; i < (A_CHUNKS + THREADS - 1) / THREADS; i++) {
            const int c = tid + i * THREADS;
            if (A_CHUNKS % THREADS == 0 || c < A_CHUNKS) {
                const int r = c >> 3, ch = c & 7, m = m0 + r;
                const bool ok = m < a.M;
                qs_cp_async16(As + w8_swz(r, ch),
                              a.xq + (size_t)(ok ? m : m0) * a.kd + kb + ch * 16, ok);
            }
        }
#pragma unroll
        for (int i = 0; i < (B_CHUNKS + THREADS - 1) / THREADS; i++) {
            const int c = tid + i * THREADS;
            if (B_CHUNKS % THREADS == 0 || c < B_CHUNKS) {
                const int r = c >> 3, ch = c & 7, n = n0 + r;
                const bool ok = n < a.N;
                qs_cp_async16(Bs + w8_swz(r, ch),
                              a.wq + (size_t)(ok ? n : n0) * a.kd + kb + ch * 16, ok);
            }
        }
    };

    int32_t acc[MT][NT][4];
    float facc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                acc[i][j][e] = 0, facc[i][j][e] = 0.0f;

    /* The int32 sums of group g (rows of this lane: r0 and r0 + 8 per
     * m16 tile) scaled into facc; rows past M read row M - 1's scale. */
    auto flush = [&](int g) {
#pragma unroll
        for (int i = 0; i < MT; i++) {
            const int r0 = m0 + wm * WTM + i * 16 + (lane >> 2);
            const float s0 = __ldg(a.sx + (size_t)min(r0, a.M - 1) * a.ng + g);
            const float s1 = __ldg(a.sx + (size_t)min(r0 + 8, a.M - 1) * a.ng + g);
#pragma unroll
            for (int j = 0; j < NT; j++) {
                facc[i][j][0] = fmaf(s0, (float)acc[i][j][0], facc[i][j][0]);
                facc[i][j][1] = fmaf(s0, (float)acc[i][j][1], facc[i][j][1]);
                facc[i][j][2] = fmaf(s1, (float)acc[i][j][2], facc[i][j][2]);
                facc[i][j][3] = fmaf(s1, (float)acc[i][j][3], facc[i][j][3]);
#pragma unroll
                for (int e = 0; e < 4; e++)
                    acc[i][j][e] = 0;
            }
        }
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < nt)
            load_tile(s, t0 + s);
        qs_cp_async_commit();
    }
    /* Group of the split's first step, and the steps left in it. */
    int g = t0 * 4 / a.spg, gleft = a.spg - t0 * 4 % a.spg;

    for (int it = 0; it < nt; it++) {
        qs_cp_async_wait<STAGES - 2>(); /* this thread's copies of tile it */
        __syncthreads();                /* everyone's; and stage it-1 is free */
        if (it + STAGES - 1 < nt)
            load_tile((it + STAGES - 1) % STAGES, t0 + it + STAGES - 1);
        qs_cp_async_commit();
        const char *As = sm + (it % STAGES) * STAGE, *Bs = As + A_BYTES;
#pragma unroll
        for (int ks = 0; ks < W8_BK / 32; ks++) {
            uint32_t fa[MT][4], fb[NT][2];
#pragma unroll
            for (int i = 0; i < MT; i++) {
                /* matrices: rows +0/+8 (lane bit 3) x k bytes 0-15/16-31 (bit 4) */
                const int r = wm * WTM + i * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                qs_ldmatrix_x4(fa[i], As + w8_swz(r, ks * 2 + (lane >> 4)));
            }
#pragma unroll
            for (int j = 0; j < NT / 2; j++) {
                /* matrices: k bytes 0-15/16-31 (lane bit 3) x rows +0/+8 (bit 4) */
                const int r = wn * WTN + j * 16 + (lane & 7) + (lane >> 4) * 8;
                uint32_t t[4];
                qs_ldmatrix_x4(t, Bs + w8_swz(r, ks * 2 + ((lane >> 3) & 1)));
                fb[2 * j][0] = t[0], fb[2 * j][1] = t[1];
                fb[2 * j + 1][0] = t[2], fb[2 * j + 1][1] = t[3];
            }
#pragma unroll
            for (int i = 0; i < MT; i++)
#pragma unroll
                for (int j = 0; j < NT; j++)
                    qs_mma_s8_16832(acc[i][j], fa[i], fb[j]);
            if (GROUPED && --gleft == 0) {
                if (g < a.ng) /* the steps past the last group are padding */
                    flush(g);
                g++, gleft = a.spg;
            }
        }
    }
    if ((!GROUPED || gleft != a.spg) && g < a.ng)
        flush(g); /* the group the split ends in (or the only one) */

        /* Epilogue: sw[n], then fp16 (or the fp32 partial sums). */
#pragma unroll
    for (int j = 0; j < NT; j++) {
        const int col = n0 + wn * WTN + j * 8 + (lane & 3) * 2;
        const float w0 = col < a.N ? __ldg(a.sw + col) : 0.0f;
        const float w1 = col + 1 < a.N ? __ldg(a.sw + col + 1) : 0.0f;
#pragma unroll
        for (int i = 0; i < MT; i++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int row = m0 + wm * WTM + i * 16 + (lane >> 2) + h * 8;
                if (row >= a.M || col >= a.N)
                    continue;
                const float y0 = facc[i][j][2 * h] * w0, y1 = facc[i][j][2 * h + 1] * w1;
                const bool pair = col + 1 < a.N;
                if (a.splits == 1) {
                    __half *y = a.Y + (size_t)row * a.N + col;
                    if (pair && a.yvec)
                        *reinterpret_cast<__half2 *>(y) = __floats2half2_rn(y0, y1);
                    else {
                        y[0] = __float2half_rn(y0);
                        if (pair)
                            y[1] = __float2half_rn(y1);
                    }
                } else {
                    float *p = a.part + ((size_t)sp * a.M + row) * a.N + col;
                    if (pair && (a.N % 2) == 0)
                        *reinterpret_cast<float2 *>(p) = make_float2(y0, y1);
                    else {
                        p[0] = y0;
                        if (pair)
                            p[1] = y1;
                    }
                }
            }
    }
}

template <int BM, int WM, int WN, bool GR>
static int w8_gemm_launch(const w8_gemm_args &a, cudaStream_t st)
{
    constexpr int BN = 128;
    const size_t smem = (size_t)W8_STAGES * (BM + BN) * W8_BK;
    if (smem > 48 * 1024)
        QS_CU(cudaFuncSetAttribute(w8a8_gemm_kernel<BM, BN, WM, WN, W8_STAGES, GR>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid((unsigned)((a.M + BM - 1) / BM), (unsigned)((a.N + BN - 1) / BN), (unsigned)a.splits);
    if (grid.y > 65535)
        return qs_seterr(QS_EINVAL, "qs_cuda_w8a8_gemm: N=%d is over the grid", a.N);
    QS_LAUNCH(grid, WM * WN * 32, smem, st, w8a8_gemm_kernel<BM, BN, WM, WN, W8_STAGES, GR>)(a);
    QS_CU_LAUNCH("w8a8_gemm_kernel");
    return QS_OK;
}

/* Tile rows for a batch, and the K-splits: enough CTAs for two per SM, at
 * least 4 K tiles (512 channels) per split, the partial sums within the
 * workspace's QS_CUDA_WS_ROWS rows. */
static int w8_bm(size_t M)
{
    return M <= 16 ? 16 : M <= 64 ? 64 : 128;
}

static unsigned w8_splits(size_t M, size_t N, size_t kd, int sms)
{
    const size_t bm = (size_t)w8_bm(M), tiles = ((M + bm - 1) / bm) * ((N + 127) / 128);
    const size_t wave = 2 * (size_t)(sms > 0 ? sms : 1), ktiles = kd / W8_BK;
    size_t s = (wave + tiles - 1) / tiles;
    if (s > ktiles / 4)
        s = ktiles / 4;
    if (s > QS_CUDA_WS_ROWS / M)
        s = QS_CUDA_WS_ROWS / M;
    if (s > W8_MAX_SPLT)
        s = W8_MAX_SPLT;
    return s < 1 ? 1u : (unsigned)s;
}

/* The K-splits for a call (the handle's, or the chooser's), checked before
 * anything is launched. */
static int w8_gemm_splits(const qs_cuda_w8 *d, size_t M, unsigned *out)
{
    const size_t ktiles = d->kd / W8_BK;
    unsigned splits = d->splits;
    if (splits == 0)
        splits = w8_splits(M, d->N, d->kd, qs_cuda_sm_count());
    if (splits > ktiles || (splits > 1 && splits * M > QS_CUDA_WS_ROWS))
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_w8a8_gemm: %u K-splits for M=%zu: at most %zu (K tiles of %d) "
                         "and splits * M <= %d",
                         splits, M, ktiles, W8_BK, QS_CUDA_WS_ROWS);
    *out = splits;
    return QS_OK;
}

/* The GEMM on activation codes already in the workspace layout (xq rows of
 * kd bytes, sx rows of ngroups scales), with the K-splits reduced. */
static int w8_gemm_run(const qs_cuda_w8 *d, const int8_t *xq, const float *sx, size_t M, void *Y,
                       unsigned splits, cudaStream_t st)
{
    float *part = (float *)((int8_t *)d->ws + (size_t)QS_CUDA_W8_ROWS * d->kd) +
                  (size_t)QS_CUDA_W8_ROWS * d->ngroups;
    w8_gemm_args a;
    a.xq = xq, a.wq = (const int8_t *)d->codes, a.sx = sx, a.sw = (const float *)d->scale;
    a.Y = (__half *)Y, a.part = part;
    a.M = (int)M, a.N = (int)d->N, a.kd = (int)d->kd, a.ng = (int)d->ngroups;
    a.spg = (int)(d->gp / 32), a.splits = (int)splits;
    a.yvec = d->N % 2 == 0 && ((uintptr_t)Y & 3) == 0;
    const bool grouped = d->ngroups > 1;
    int err;
    switch (w8_bm(M)) {
    case 16:
        err = grouped ? w8_gemm_launch<16, 1, 4, true>(a, st)
                      : w8_gemm_launch<16, 1, 4, false>(a, st);
        break;
    case 64:
        err = grouped ? w8_gemm_launch<64, 2, 2, true>(a, st)
                      : w8_gemm_launch<64, 2, 2, false>(a, st);
        break;
    default:
        err = grouped ? w8_gemm_launch<128, 2, 4, true>(a, st)
                      : w8_gemm_launch<128, 2, 4, false>(a, st);
        break;
    }
    if (err || splits == 1)
        return err;
    return qs_cuda_reduce_splits(part, Y, M, d->N, splits, st);
}

static int w8_check(const qs_cuda_w8 *d, const void *X, size_t M, const void *Y)
{
    if (!d || !d->codes || !d->scale || !d->ws || !X || !Y)
        return qs_seterr(QS_EINVAL, "qs_cuda_w8a8_gemm: NULL weights, input or output (upload the "
                                    "weights with qs_cuda_w8_upload first)");
    if (M < 1 || M > QS_CUDA_W8_ROWS)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_w8a8_gemm: batch M=%zu, the workspace holds 1 to %d tokens: "
                         "run larger batches in chunks",
                         M, QS_CUDA_W8_ROWS);
    return QS_OK;
}

extern "C" int qs_cuda_w8a8_gemm(qs_cuda_w8 *d, const void *X, size_t M, float act_scale, void *Y,
                                 void *stream)
{
    int err = w8_check(d, X, M, Y);
    if (err)
        return err;
    if (isnan(act_scale) || isinf(act_scale))
        return qs_seterr(QS_EINVAL,
                         "static activation scale is %g: pass a finite scale > 0, or <= 0 for "
                         "per-token scales",
                         (double)act_scale);
    unsigned splits;
    if ((err = w8_gemm_splits(d, M, &splits)))
        return err;
    cudaStream_t st = QS_CU_STREAM(stream);
    int8_t *xq = (int8_t *)d->ws;
    float *sx = (float *)(xq + (size_t)QS_CUDA_W8_ROWS * d->kd);

    w8_quant_args q;
    q.X = (const __half *)X, q.xq = xq, q.sx = sx;
    q.K = (int)d->K, q.G = (int)d->group, q.gp = (int)d->gp, q.ng = (int)d->ngroups;
    q.kd = (int)d->kd;
    q.vec = d->K % 4 == 0 && ((uintptr_t)X & 7) == 0;
    q.s_st = act_scale > 0 ? act_scale : 0.0f;
    q.i_st = act_scale > 0 ? 1.0f / act_scale : 0.0f; /* the CPU's 1.0f / scale */
    if (d->group <= W8_WIDE_G) {
        dim3 grid((unsigned)((d->ngroups + 3) / 4), (unsigned)M);
        QS_LAUNCH(grid, 128, 0, st, w8_quant_warp)(q);
        QS_CU_LAUNCH("w8_quant_warp");
    } else {
        dim3 grid((unsigned)d->ngroups, (unsigned)M);
        QS_LAUNCH(grid, 512, 0, st, w8_quant_block)(q);
        QS_CU_LAUNCH("w8_quant_block");
    }
    return w8_gemm_run(d, xq, sx, M, Y, splits, st);
}

extern "C" int qs_cuda_w8a8_gemm_act(qs_cuda_w8 *d, const qs_cuda_w8_act *a, size_t M, void *Y,
                                     void *stream)
{
    int err = w8_check(d, a ? a->xq : NULL, M, Y);
    if (err)
        return err;
    if (a->K != d->K || a->group != d->group || M > a->rows || !a->sx)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_w8a8_gemm_act: codes of %zu tokens x %zu channels in groups of "
                         "%zu for %zu tokens of a %zu-channel matrix in groups of %zu: quantize "
                         "with the matrix's K and group",
                         a->rows, a->K, a->group, M, d->K, d->group);
    unsigned splits;
    if ((err = w8_gemm_splits(d, M, &splits)))
        return err;
    return w8_gemm_run(d, (const int8_t *)a->xq, a->sx, M, Y, splits, QS_CU_STREAM(stream));
}
