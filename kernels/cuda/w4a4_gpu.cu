/* w4a4_gpu.cu: W4A4 (Atom) on the GPU (qs_kernels.h, "W4A4 (Atom) on the
 * device"): the device layout, the activation codes read through the
 * channel permutation, and the integer tensor-core GEMM. Plain references:
 * kernels/cpu/w4a4.c (qs_w4a4_gemm, its float64 qs_w4a4_gemm_ref_f64 and
 * qs_w4_quant_act, whose codes the device reproduces bit for bit).
 *
 *   X    M x K fp16 row-major, original channel order, M <= QS_CUDA_W4_ROWS
 *   perm [K] position -> channel; K4 = K - ko positions of INT4, ko of INT8
 *   W    N x K codes in position order: INT4 (-7..7) before K4, INT8 after;
 *        s4 [N][ng] per row and group of G positions, s8 [N]
 *   Y    M x N fp16 = sum_g sx[m,g] s4[n,g] sum_{j in g} xq[m,j] wq[n,j]
 *                   + sxo[m] s8[n] sum_{j >= K4} xq[m,j] wq[n,j]
 *
 * Device layout (qs_kernels.h): rows of kd bytes; group g of the INT4
 * part at byte g * gp / 2 (gp = 64 * ceil(G / 64) positions, two codes per
 * byte in position order, the even one in the low nibble), the outliers as
 * int8 from off8 = ng * gp / 2, zeros to a multiple of 32 bytes, then to kd
 * (a multiple of 128). Why: ldmatrix moves bytes, so packed nibble rows load
 * with the W8A8 GEMM's exact tile code, and the PTX ISA's m16n8k64 s4
 * fragments are those bytes (register = 8 consecutive positions); a 32-byte
 * step (64 INT4 or 32 INT8 positions) never straddles two groups, so each
 * group's int32 sums are exact and are scaled into fp32 when it ends. The
 * scales are one array sw [ng + 1][N] (s8 last) and per token sx [ng + 1]
 * (sxo last): the outliers are simply the last group. Activations go
 * through the same layout in the workspace.
 *
 * 1. w4_quant_kernel: a CTA per token, a warp per group of positions
 *    (w4_act.cuh, shared with the fused norm in norm_gpu.cu): the gather by
 *    perm, max|x|, the codes packed 8 to a word.
 * 2. w4a4_gemm_kernel: w8a8_gpu.cu's tiling (CTA tile BM tokens x BN = 128
 *    rows of W, K in tiles of 128 bytes through a STAGES-deep cp.async
 *    pipeline, XOR-swizzled 16-byte chunks, ldmatrix.x4 fragments). Per
 *    32-byte step: INT4 on sm_80 one mma.sync m16n8k64 s4; INT4 on sm_90
 *    (no INT4 tensor cores) the same registers unpacked to int8 (even and odd
 *    nibbles, sign-extended per byte: A and B unpacked alike, so the k order
 *    the s8 instruction sees is a permutation common to both) into two
 *    mma.sync m16n8k32 s8; INT8 one m16n8k32 s8. At each group's end the
 *    int32 sums are scaled by sx[m,g] sw[g,n] into fp32 accumulators; fp16
 *    out, or fp32 partial sums over grid.z K-splits reduced in a fixed order
 *    (qs_cuda_reduce_splits). Tiles: M <= 16: 16 x 128, 4 warps; M <= 64:
 *    64 x 128, 4 warps; else 128 x 128, 8 warps. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_util.cuh"
#include "ptx.cuh"
#include "w4_act.cuh"

#define W4_BK       128    /* bytes per pipeline stage of a row */
#define W4_STAGES   4      /* pipeline depth */
#define W4_MAX_KO   131072 /* 127 * 127 * ko must fit in int32 */
#define W4_MAX_G    1048576
#define W4_MAX_SPLT 16
#define W4_QUANT_TH 256

/* ---- Layout, allocation, upload ------------------------------------------------------ */

struct w4_shape {
    size_t K4, ng, gp, off8, kd8, kd;
};

static int w4_layout(size_t N, size_t K, size_t ko, size_t group, w4_shape *s)
{
    if (N == 0 || K == 0 || N > (1u << 30) || K > (1u << 30))
        return qs_seterr(QS_EINVAL,
                         "W4 matrix of %zu x %zu: the GPU kernels take 1 to 2^30 rows and columns",
                         N, K);
    if (ko > K || ko > W4_MAX_KO)
        return qs_seterr(QS_EINVAL,
                         "W4 matrix with %zu outlier channels of %zu: at most K and %d (the int32 "
                         "sums of the tensor cores)",
                         ko, K, W4_MAX_KO);
    s->K4 = K - ko;
    if (s->K4 > 0 && (group == 0 || group % 8 || group > W4_MAX_G))
        return qs_seterr(QS_EINVAL,
                         "W4 group of %zu positions: use the qs_w4's group (a multiple of 8, "
                         "128 by default)",
                         group);
    s->ng = s->K4 ? (s->K4 + group - 1) / group : 0;
    s->gp = s->K4 ? (group + 63) / 64 * 64 : 64;
    s->off8 = s->ng * s->gp / 2;
    s->kd8 = (ko + 31) / 32 * 32;
    s->kd = (s->off8 + s->kd8 + W4_BK - 1) / W4_BK * W4_BK;
    if (s->kd > (1u << 30))
        return qs_seterr(QS_EINVAL, "W4 rows of %zu bytes are too long for the GPU", s->kd);
    return QS_OK;
}

extern "C" void qs_cuda_w4_free(qs_cuda_w4 *d)
{
    if (!d)
        return;
    qs_cuda_free(d->codes);
    qs_cuda_free(d->sw);
    qs_cuda_free(d->perm);
    qs_cuda_free(d->ws);
    memset(d, 0, sizeof(*d));
}

extern "C" int qs_cuda_w4_alloc(qs_cuda_w4 *d, size_t N, size_t K, size_t ko, size_t group)
{
    if (!d)
        return qs_seterr(QS_EINVAL, "qs_cuda_w4_alloc got a NULL handle");
    memset(d, 0, sizeof(*d));
    w4_shape s = {0, 0, 0, 0, 0, 0};
    int err = w4_layout(N, K, ko, group, &s);
    if (err)
        return err;
    d->N = N, d->K = K, d->ko = ko, d->group = group, d->ngroups = s.ng;
    d->gp = s.gp, d->off8 = s.off8, d->kd = s.kd;
    const size_t sw_bytes = (s.ng + 1) * N * sizeof(float);
    d->bytes = N * s.kd + sw_bytes + K * sizeof(uint32_t);
    d->ws_bytes = (size_t)QS_CUDA_W4_ROWS * s.kd +
                  (size_t)QS_CUDA_W4_ROWS * (s.ng + 1) * sizeof(float) +
                  (size_t)QS_CUDA_WS_ROWS * N * sizeof(float);
    if ((err = qs_cuda_malloc(&d->codes, N * s.kd)) || (err = qs_cuda_malloc(&d->sw, sw_bytes)) ||
        (err = qs_cuda_malloc(&d->perm, K * sizeof(uint32_t))) ||
        (err = qs_cuda_malloc(&d->ws, d->ws_bytes))) {
        qs_cuda_w4_free(d);
        return err;
    }
    return QS_OK;
}

/* FNV-1a of the permutation: lets a GEMM check that activation codes were
 * gathered by its own order without reading device memory. */
static uint64_t w4_perm_hash(const uint32_t *perm, size_t K)
{
    uint64_t h = 0xcbf29ce484222325ull ^ K;
    for (size_t j = 0; j < K; j++)
        for (int b = 0; b < 4; b++)
            h = (h ^ ((perm ? perm[j] : (uint32_t)j) >> (8 * b) & 0xffu)) * 0x100000001b3ull;
    return h;
}

extern "C" int qs_cuda_w4_upload(qs_cuda_w4 *d, const qs_w4 *w)
{
    if (!d || !w || w->ko > w->K || (w->K > w->ko && (!w->w4 || !w->s4)) ||
        (w->ko && (!w->w8 || !w->s8)))
        return qs_seterr(QS_EINVAL, "qs_cuda_w4_upload got a NULL handle or weights: quantize "
                                    "them with qs_w4_quantize or qs_w4_from_codes first");
    int err = qs_cuda_w4_alloc(d, w->N, w->K, w->ko, w->group);
    if (err)
        return err;
    const size_t N = w->N, K = w->K, K4 = K - w->ko, G = w->group, ng = d->ngroups;
    const size_t gp = d->gp, off8 = d->off8, kd = d->kd;
    int8_t *codes = (int8_t *)malloc(N * K);
    uint8_t *rows = (uint8_t *)calloc(N, kd);
    float *sw = (float *)malloc((ng + 1) * N * sizeof(float));
    uint32_t *perm = (uint32_t *)malloc(K * sizeof(uint32_t));
    if (!codes || !rows || !sw || !perm) {
        err = qs_seterr(QS_ENOMEM, "out of host memory staging a %zu x %zu W4 matrix", N, K);
        goto out;
    }
    if ((err = qs_w4_codes(w, codes)))
        goto out;
    for (size_t j = 0; j < K; j++) {
        perm[j] = w->perm ? w->perm[j] : (uint32_t)j;
        if (perm[j] >= K) {
            err = qs_seterr(QS_EINVAL,
                            "W4 permutation maps position %zu to channel %u of %zu: quantize "
                            "with a permutation of 0..K-1",
                            j, perm[j], K);
            goto out;
        }
    }
    /* Position order to packed groups and the outlier bytes. */
    for (size_t n = 0; n < N; n++) {
        const int8_t *c = codes + n * K;
        uint8_t *r = rows + n * kd;
        for (size_t j = 0; j < K4; j++) {
            const size_t g = j / G, p = j % G;
            r[g * gp / 2 + p / 2] |= (uint8_t)(((unsigned)c[j] & 15u) << (4 * (p & 1)));
        }
        for (size_t j = K4; j < K; j++)
            r[off8 + j - K4] = (uint8_t)c[j];
    }
    for (size_t g = 0; g < ng; g++)
        for (size_t n = 0; n < N; n++)
            sw[g * N + n] = w->s4[n * ng + g];
    for (size_t n = 0; n < N; n++)
        sw[ng * N + n] = w->ko ? w->s8[n] : 0.0f;
    d->perm_hash = w4_perm_hash(perm, K);
    if (!(err = qs_cuda_h2d(d->codes, rows, N * kd)) &&
        !(err = qs_cuda_h2d(d->sw, sw, (ng + 1) * N * sizeof(float))))
        err = qs_cuda_h2d(d->perm, perm, K * sizeof(uint32_t));
out:
    free(codes), free(rows), free(sw), free(perm);
    if (err)
        qs_cuda_w4_free(d);
    return err;
}

extern "C" int qs_cuda_w4_act_alloc(qs_cuda_w4_act *a, size_t rows, const qs_cuda_w4 *d)
{
    if (!a)
        return qs_seterr(QS_EINVAL, "qs_cuda_w4_act_alloc got a NULL handle");
    memset(a, 0, sizeof(*a));
    if (!d || !d->perm)
        return qs_seterr(QS_EINVAL, "qs_cuda_w4_act_alloc needs the uploaded matrix whose "
                                    "permutation the codes follow (qs_cuda_w4_upload first)");
    if (rows == 0 || rows > QS_CUDA_W4_ROWS)
        return qs_seterr(QS_EINVAL,
                         "W4 activation codes for %zu tokens: 1 to %d (run larger batches in "
                         "chunks)",
                         rows, QS_CUDA_W4_ROWS);
    a->rows = rows, a->K = d->K, a->ko = d->ko, a->group = d->group, a->ngroups = d->ngroups;
    a->gp = d->gp, a->off8 = d->off8, a->kd = d->kd;
    a->perm = d->perm, a->perm_hash = d->perm_hash;
    int err;
    if ((err = qs_cuda_malloc(&a->xq, rows * a->kd)) ||
        (err = qs_cuda_malloc((void **)&a->sx, rows * (a->ngroups + 1) * sizeof(float))))
        qs_cuda_w4_act_free(a);
    return err;
}

extern "C" void qs_cuda_w4_act_free(qs_cuda_w4_act *a)
{
    if (!a)
        return;
    qs_cuda_free(a->xq);
    qs_cuda_free(a->sx);
    memset(a, 0, sizeof(*a));
}

/* ---- Activation codes ---------------------------------------------------------------- */

__global__ void __launch_bounds__(W4_QUANT_TH)
    w4_quant_kernel(const __half *__restrict__ X, int K, w4_act_args a)
{
    w4_quant_row(X + (size_t)blockIdx.x * K, a, blockIdx.x);
}

static w4_act_args w4_args(const qs_cuda_w4_act *a, void *xq, float *sx)
{
    w4_act_args q;
    q.xq = (uint8_t *)xq, q.sx = sx, q.perm = (const uint32_t *)a->perm;
    q.K4 = (int)(a->K - a->ko), q.ko = (int)a->ko, q.G = (int)a->group, q.gp = (int)a->gp;
    q.ng = (int)a->ngroups, q.off8 = (int)a->off8, q.kd = (int)a->kd;
    return q;
}

static int w4_quant_launch(const qs_cuda_w4_act *a, const void *X, size_t M, cudaStream_t st)
{
    QS_LAUNCH((unsigned)M, W4_QUANT_TH, 0, st, w4_quant_kernel)
    ((const __half *)X, (int)a->K, w4_args(a, a->xq, a->sx));
    QS_CU_LAUNCH("w4_quant_kernel");
    return QS_OK;
}

extern "C" int qs_cuda_w4_quant_act(qs_cuda_w4_act *a, const void *X, size_t M, void *stream)
{
    if (!a || !a->xq || !a->sx || !a->perm || !X)
        return qs_seterr(QS_EINVAL, "qs_cuda_w4_quant_act: NULL codes or input (allocate the "
                                    "codes with qs_cuda_w4_act_alloc)");
    if (M < 1 || M > a->rows)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_w4_quant_act: %zu tokens for codes of %zu: allocate more rows "
                         "or run in chunks",
                         M, a->rows);
    return w4_quant_launch(a, X, M, QS_CU_STREAM(stream));
}

/* ---- The GEMM ---------------------------------------------------------------------- */

struct w4_gemm_args {
    const uint8_t *xq, *wq;
    const float *sx, *sw; /* [M][ng + 1], [ng + 1][N] */
    __half *Y;
    float *part; /* [splits][M][N] when splits > 1 */
    int M, N, kd, ng;
    int spg;      /* 32-byte steps per INT4 group (gp / 64) */
    int s8a, s8b; /* the outliers' steps: [s8a, s8b) */
    int splits, yvec;
};

/* The group of 32-byte step s: an INT4 group, ng (the outliers), or -1
 * (padding: zeros, no products needed). */
__device__ __forceinline__ int w4_group(const w4_gemm_args &a, int s)
{
    return s < a.s8a ? s / a.spg : s < a.s8b ? a.ng : -1;
}

__device__ __forceinline__ int w4_swz(int r, int ch)
{
    return r * W4_BK + ((ch ^ (r & 7)) << 4);
}

/* Nibbles 0, 2, 4, 6 (lo) or 1, 3, 5, 7 (hi) of x as four sign-extended
 * bytes: per byte (v ^ 8) + 0x78 stays below 0x100 (no carry), and ^ 0x80
 * maps it back to v - 16 for v >= 8. */
__device__ __forceinline__ uint32_t w4_s8(uint32_t v)
{
    return ((v ^ 0x08080808u) + 0x78787878u) ^ 0x80808080u;
}
__device__ __forceinline__ uint32_t w4_lo(uint32_t x)
{
    return w4_s8(x & 0x0f0f0f0fu);
}
__device__ __forceinline__ uint32_t w4_hi(uint32_t x)
{
    return w4_s8((x >> 4) & 0x0f0f0f0fu);
}

template <int BM, int BN, int WM, int WN, int STAGES, bool S4>
__global__ void __launch_bounds__(32 * WM * WN) w4a4_gemm_kernel(w4_gemm_args a)
{
    constexpr int THREADS = WM * WN * 32, WTM = BM / WM, WTN = BN / WN;
    constexpr int MT = WTM / 16, NT = WTN / 8;
    static_assert(MT >= 1 && NT >= 2 && NT % 2 == 0 && WTM % 16 == 0, "warp tile shape");
    constexpr int A_BYTES = BM * W4_BK, STAGE = (BM + BN) * W4_BK;
    constexpr int A_CHUNKS = BM * W4_BK / 16, B_CHUNKS = BN * W4_BK / 16;
    QS_DYN_SMEM(uint4, smv);
    char *sm = reinterpret_cast<char *>(smv);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / WN, wn = warp % WN;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN, sp = blockIdx.z;
    const int ktiles = a.kd / W4_BK;
    const int t0 = (int)((long long)ktiles * sp / a.splits);
    const int t1 = (int)((long long)ktiles * (sp + 1) / a.splits);
    const int nt = t1 - t0;

    /* Tile t of X's and W's codes into stage st; rows past M or N are
     * zero-filled (no global read), their sources clamped to row m0 / n0. */
    auto load_tile = [&](int st, int t) {
        char *As = sm + st * STAGE, *Bs = As + A_BYTES;
        const size_t kb = (size_t)t * W4_BK;
#pragma unroll
        for (int i = 0; i < (A_CHUNKS + THREADS - 1) / THREADS; i++) {
            const int c = tid + i * THREADS;
            if (A_CHUNKS % THREADS == 0 || c < A_CHUNKS) {
                const int r = c >> 3, ch = c & 7, m = m0 + r;
                const bool ok = m < a.M;
                qs_cp_async16(As + w4_swz(r, ch),
                              a.xq + (size_t)(ok ? m : m0) * a.kd + kb + ch * 16, ok);
            }
        }
#pragma unroll
        for (int i = 0; i < (B_CHUNKS + THREADS - 1) / THREADS; i++) {
            const int c = tid + i * THREADS;
            if (B_CHUNKS % THREADS == 0 || c < B_CHUNKS) {
                const int r = c >> 3, ch = c & 7, n = n0 + r;
                const bool ok = n < a.N;
                qs_cp_async16(Bs + w4_swz(r, ch),
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

    /* Group g's int32 sums scaled by sx[row, g] sw[g, col] into facc;
     * rows past M and columns past N read the last one's scales. */
    auto flush = [&](int g) {
        float w[NT][2];
#pragma unroll
        for (int j = 0; j < NT; j++) {
            const int col = n0 + wn * WTN + j * 8 + (lane & 3) * 2;
            const float *sw = a.sw + (size_t)g * a.N;
            w[j][0] = __ldg(sw + min(col, a.N - 1));
            w[j][1] = __ldg(sw + min(col + 1, a.N - 1));
        }
#pragma unroll
        for (int i = 0; i < MT; i++) {
            const int r0 = m0 + wm * WTM + i * 16 + (lane >> 2);
            const float s0 = __ldg(a.sx + (size_t)min(r0, a.M - 1) * (a.ng + 1) + g);
            const float s1 = __ldg(a.sx + (size_t)min(r0 + 8, a.M - 1) * (a.ng + 1) + g);
#pragma unroll
            for (int j = 0; j < NT; j++) {
                facc[i][j][0] = fmaf(s0 * w[j][0], (float)acc[i][j][0], facc[i][j][0]);
                facc[i][j][1] = fmaf(s0 * w[j][1], (float)acc[i][j][1], facc[i][j][1]);
                facc[i][j][2] = fmaf(s1 * w[j][0], (float)acc[i][j][2], facc[i][j][2]);
                facc[i][j][3] = fmaf(s1 * w[j][1], (float)acc[i][j][3], facc[i][j][3]);
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

    for (int it = 0; it < nt; it++) {
        qs_cp_async_wait<STAGES - 2>(); /* this thread's copies of tile it */
        __syncthreads();                /* everyone's; and stage it-1 is free */
        if (it + STAGES - 1 < nt)
            load_tile((it + STAGES - 1) % STAGES, t0 + it + STAGES - 1);
        qs_cp_async_commit();
        const char *As = sm + (it % STAGES) * STAGE, *Bs = As + A_BYTES;
#pragma unroll
        for (int ks = 0; ks < W4_BK / 32; ks++) {
            const int s = (t0 + it) * (W4_BK / 32) + ks, g = w4_group(a, s);
            if (g < 0)
                continue; /* padding (the same step for the whole CTA) */
            uint32_t fa[MT][4], fb[NT][2];
#pragma unroll
            for (int i = 0; i < MT; i++) {
                /* matrices: rows +0/+8 (lane bit 3) x k bytes 0-15/16-31 (bit 4) */
                const int r = wm * WTM + i * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                qs_ldmatrix_x4(fa[i], As + w4_swz(r, ks * 2 + (lane >> 4)));
            }
#pragma unroll
            for (int j = 0; j < NT / 2; j++) {
                /* matrices: k bytes 0-15/16-31 (lane bit 3) x rows +0/+8 (bit 4) */
                const int r = wn * WTN + j * 16 + (lane & 7) + (lane >> 4) * 8;
                uint32_t t[4];
                qs_ldmatrix_x4(t, Bs + w4_swz(r, ks * 2 + ((lane >> 3) & 1)));
                fb[2 * j][0] = t[0], fb[2 * j][1] = t[1];
                fb[2 * j + 1][0] = t[2], fb[2 * j + 1][1] = t[3];
            }
            if (g == a.ng) { /* INT8 outliers */
#pragma unroll
                for (int i = 0; i < MT; i++)
#pragma unroll
                    for (int j = 0; j < NT; j++)
                        qs_mma_s8_16832(acc[i][j], fa[i], fb[j]);
            } else if (S4) {
#pragma unroll
                for (int i = 0; i < MT; i++)
#pragma unroll
                    for (int j = 0; j < NT; j++)
                        qs_mma_s4_16864(acc[i][j], fa[i], fb[j]);
            } else {
                uint32_t lo[MT][4], hi[MT][4];
#pragma unroll
                for (int i = 0; i < MT; i++)
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        lo[i][e] = w4_lo(fa[i][e]), hi[i][e] = w4_hi(fa[i][e]);
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    const uint32_t bl[2] = {w4_lo(fb[j][0]), w4_lo(fb[j][1])};
                    const uint32_t bh[2] = {w4_hi(fb[j][0]), w4_hi(fb[j][1])};
#pragma unroll
                    for (int i = 0; i < MT; i++) {
                        qs_mma_s8_16832(acc[i][j], lo[i], bl);
                        qs_mma_s8_16832(acc[i][j], hi[i], bh);
                    }
                }
            }
            /* The group ends here, or the split does. */
            if ((it == nt - 1 && ks == W4_BK / 32 - 1) || w4_group(a, s + 1) != g)
                flush(g);
        }
    }

    /* Epilogue: fp16 (or the fp32 partial sums). */
#pragma unroll
    for (int j = 0; j < NT; j++) {
        const int col = n0 + wn * WTN + j * 8 + (lane & 3) * 2;
#pragma unroll
        for (int i = 0; i < MT; i++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int row = m0 + wm * WTM + i * 16 + (lane >> 2) + h * 8;
                if (row >= a.M || col >= a.N)
                    continue;
                const float y0 = facc[i][j][2 * h], y1 = facc[i][j][2 * h + 1];
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

template <int BM, int WM, int WN, bool S4>
static int w4_gemm_launch(const w4_gemm_args &a, cudaStream_t st)
{
    constexpr int BN = 128;
    const size_t smem = (size_t)W4_STAGES * (BM + BN) * W4_BK;
    if (smem > 48 * 1024)
        QS_CU(cudaFuncSetAttribute(w4a4_gemm_kernel<BM, BN, WM, WN, W4_STAGES, S4>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid((unsigned)((a.M + BM - 1) / BM), (unsigned)((a.N + BN - 1) / BN), (unsigned)a.splits);
    if (grid.y > 65535)
        return qs_seterr(QS_EINVAL, "qs_cuda_w4a4_gemm: N=%d is over the grid", a.N);
    QS_LAUNCH(grid, WM * WN * 32, smem, st, w4a4_gemm_kernel<BM, BN, WM, WN, W4_STAGES, S4>)(a);
    QS_CU_LAUNCH("w4a4_gemm_kernel");
    return QS_OK;
}

/* Tile rows for a batch, and the K-splits (as W8A8: enough CTAs for two
 * per SM, at least 4 K tiles per split, within the workspace's rows). */
static int w4_bm(size_t M)
{
    return M <= 16 ? 16 : M <= 64 ? 64 : 128;
}

static unsigned w4_splits(size_t M, size_t N, size_t kd, int sms)
{
    const size_t bm = (size_t)w4_bm(M), tiles = ((M + bm - 1) / bm) * ((N + 127) / 128);
    const size_t wave = 2 * (size_t)(sms > 0 ? sms : 1), ktiles = kd / W4_BK;
    size_t s = (wave + tiles - 1) / tiles;
    if (s > ktiles / 4)
        s = ktiles / 4;
    if (s > QS_CUDA_WS_ROWS / M)
        s = QS_CUDA_WS_ROWS / M;
    if (s > W4_MAX_SPLT)
        s = W4_MAX_SPLT;
    return s < 1 ? 1u : (unsigned)s;
}

/* The tensor-core path: forced by d->mma, else by the device. */
static int w4_path(const qs_cuda_w4 *d, bool *s4)
{
    if (d->mma == 4 || d->mma == 8) {
        *s4 = d->mma == 4;
        return QS_OK;
    }
    if (d->mma != 0)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_w4.mma is %u: use 0 (by the device), 4 (mma.sync s4, sm_80) or "
                         "8 (int8 tensor cores on unpacked codes)",
                         d->mma);
    /* Hopper and later have no INT4 tensor cores: s4 there would be emulated. */
    int dev = 0, major = 0;
    QS_CU(cudaGetDevice(&dev));
    QS_CU(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    *s4 = major == 8;
    return QS_OK;
}

/* The path and the K-splits of a call, checked before anything is launched. */
static int w4_plan(const qs_cuda_w4 *d, size_t M, unsigned *splits, bool *s4)
{
    const size_t ktiles = d->kd / W4_BK;
    unsigned sp = d->splits;
    if (sp == 0)
        sp = w4_splits(M, d->N, d->kd, qs_cuda_sm_count());
    if (sp > ktiles || (sp > 1 && sp * M > QS_CUDA_WS_ROWS))
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_w4a4_gemm: %u K-splits for M=%zu: at most %zu (K tiles of %d "
                         "bytes) and splits * M <= %d",
                         sp, M, ktiles, W4_BK, QS_CUDA_WS_ROWS);
    *splits = sp;
    return w4_path(d, s4);
}

extern "C" int qs_cuda_w4_mma(const qs_cuda_w4 *d)
{
    if (!d)
        return qs_seterr(QS_EINVAL, "qs_cuda_w4_mma got a NULL handle");
    bool s4;
    const int err = w4_path(d, &s4);
    return err ? err : s4 ? 4 : 8;
}

/* The GEMM on codes in the device layout, with the K-splits reduced. */
static int w4_gemm_run(const qs_cuda_w4 *d, const void *xq, const float *sx, size_t M, void *Y,
                       unsigned splits, bool s4, cudaStream_t st)
{
    float *part = (float *)((uint8_t *)d->ws + (size_t)QS_CUDA_W4_ROWS * d->kd) +
                  (size_t)QS_CUDA_W4_ROWS * (d->ngroups + 1);
    w4_gemm_args a;
    a.xq = (const uint8_t *)xq, a.wq = (const uint8_t *)d->codes;
    a.sx = sx, a.sw = (const float *)d->sw;
    a.Y = (__half *)Y, a.part = part;
    a.M = (int)M, a.N = (int)d->N, a.kd = (int)d->kd, a.ng = (int)d->ngroups;
    a.spg = (int)(d->gp / 64);
    a.s8a = (int)(d->off8 / 32), a.s8b = (int)((d->off8 + (d->ko + 31) / 32 * 32) / 32);
    a.splits = (int)splits;
    a.yvec = d->N % 2 == 0 && ((uintptr_t)Y & 3) == 0;
    int err;
    switch (w4_bm(M)) {
    case 16:
        err = s4 ? w4_gemm_launch<16, 1, 4, true>(a, st) : w4_gemm_launch<16, 1, 4, false>(a, st);
        break;
    case 64:
        err = s4 ? w4_gemm_launch<64, 2, 2, true>(a, st) : w4_gemm_launch<64, 2, 2, false>(a, st);
        break;
    default:
        err = s4 ? w4_gemm_launch<128, 2, 4, true>(a, st) : w4_gemm_launch<128, 2, 4, false>(a, st);
        break;
    }
    if (err || splits == 1)
        return err;
    return qs_cuda_reduce_splits(part, Y, M, d->N, splits, st);
}

static int w4_check(const qs_cuda_w4 *d, const void *X, size_t M, const void *Y)
{
    if (!d || !d->codes || !d->sw || !d->perm || !d->ws || !X || !Y)
        return qs_seterr(QS_EINVAL, "qs_cuda_w4a4_gemm: NULL weights, input or output (upload the "
                                    "weights with qs_cuda_w4_upload first)");
    if (M < 1 || M > QS_CUDA_W4_ROWS)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_w4a4_gemm: batch M=%zu, the workspace holds 1 to %d tokens: "
                         "run larger batches in chunks",
                         M, QS_CUDA_W4_ROWS);
    return QS_OK;
}

extern "C" int qs_cuda_w4a4_gemm(qs_cuda_w4 *d, const void *X, size_t M, void *Y, void *stream)
{
    int err = w4_check(d, X, M, Y);
    unsigned splits;
    bool s4;
    if (err || (err = w4_plan(d, M, &splits, &s4)))
        return err;
    cudaStream_t st = QS_CU_STREAM(stream);
    /* The workspace's codes, viewed as activation codes of the matrix. */
    qs_cuda_w4_act a;
    memset(&a, 0, sizeof a);
    a.rows = QS_CUDA_W4_ROWS, a.K = d->K, a.ko = d->ko, a.group = d->group;
    a.ngroups = d->ngroups, a.gp = d->gp, a.off8 = d->off8, a.kd = d->kd, a.perm = d->perm;
    a.xq = d->ws;
    a.sx = (float *)((uint8_t *)d->ws + (size_t)QS_CUDA_W4_ROWS * d->kd);
    if ((err = w4_quant_launch(&a, X, M, st)))
        return err;
    return w4_gemm_run(d, a.xq, a.sx, M, Y, splits, s4, st);
}

extern "C" int qs_cuda_w4a4_gemm_act(qs_cuda_w4 *d, const qs_cuda_w4_act *a, size_t M, void *Y,
                                     void *stream)
{
    int err = w4_check(d, a ? a->xq : NULL, M, Y);
    if (err)
        return err;
    if (a->K != d->K || a->ko != d->ko || a->group != d->group || a->perm_hash != d->perm_hash ||
        M > a->rows || !a->sx)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_w4a4_gemm_act: codes of %zu tokens x %zu channels (%zu "
                         "outliers, groups of %zu) for %zu tokens of a %zu-channel matrix (%zu, "
                         "%zu)%s: quantize with codes allocated for this matrix's K, ko, group "
                         "and permutation",
                         a->rows, a->K, a->ko, a->group, M, d->K, d->ko, d->group,
                         a->perm_hash != d->perm_hash ? ", another permutation" : "");
    unsigned splits;
    bool s4;
    if ((err = w4_plan(d, M, &splits, &s4)))
        return err;
    return w4_gemm_run(d, a->xq, a->sx, M, Y, splits, s4, QS_CU_STREAM(stream));
}
