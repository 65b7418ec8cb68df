/* norm_gpu.cu: the residual stream on the device (qs_kernels.h, "The device
 * forward pass"): x (fp32) += d (fp16) fused with LayerNorm or RMSNorm into
 * fp16, the plain residual add, and the fp32 <-> fp16 conversions.
 *
 * The CPU counterpart is shard/model.c's norm_forward (float64 sums; here
 * fp32, as the header says: the output is fp16, whose rounding, 2^-11
 * relative, is far above what fp32 sums of a row lose) and the layer loop's
 * `x[i] += proj[i]` (one fp32 rounding, the same here).
 *
 * Shapes: x n x H fp32 row-major, d and y n x H fp16, w and b fp16 [H]. One
 * CTA per row; each thread owns units of 8 consecutive columns, read with
 * 16-byte loads when H % 8 == 0 and every pointer is 16-byte aligned, else
 * element by element (same units, same arithmetic). */
#include <string.h>

#include "rowops.cuh"
#include "w4_act.cuh"

/* ---- Units of 8 columns: 16-byte accesses or a bounded scalar loop ------- */

template <bool VEC> __device__ __forceinline__ void ld8(const float *p, int j0, int H, float *v)
{
    if (VEC) {
        qs_ld_f4(p + j0, v);
        qs_ld_f4(p + j0 + 4, v + 4);
    } else {
        QS_UNROLL
        for (int j = 0; j < 8; j++)
            v[j] = j0 + j < H ? p[j0 + j] : 0.0f;
    }
}

template <bool VEC> __device__ __forceinline__ void ld8(const __half *p, int j0, int H, float *v)
{
    if (VEC) {
        qs_ld_h8(p + j0, v);
    } else {
        QS_UNROLL
        for (int j = 0; j < 8; j++)
            v[j] = j0 + j < H ? __half2float(p[j0 + j]) : 0.0f;
    }
}

template <bool VEC> __device__ __forceinline__ void st8(float *p, int j0, int H, const float *v)
{
    if (VEC) {
        qs_st_f4(p + j0, v);
        qs_st_f4(p + j0 + 4, v + 4);
    } else {
        QS_UNROLL
        for (int j = 0; j < 8; j++)
            if (j0 + j < H)
                p[j0 + j] = v[j];
    }
}

template <bool VEC> __device__ __forceinline__ void st8(__half *p, int j0, int H, const float *v)
{
    if (VEC) {
        qs_st_h8(p + j0, v);
    } else {
        QS_UNROLL
        for (int j = 0; j < 8; j++)
            if (j0 + j < H)
                p[j0 + j] = __float2half_rn(v[j]);
    }
}

/* ---- x += d; y = norm(x) * w (+ b), and y's W8A8 codes --------------------
 * Pass 1 adds d and writes x back (each thread re-reads only what it wrote,
 * so no barrier is needed between the passes), summing x (LayerNorm) or x^2
 * (RMSNorm); LayerNorm's pass 2 sums the centred squares (two passes: no
 * cancellation for rows with a large mean); the last pass writes y and, for
 * post-LN, the normalised row back into x.
 *
 * Q8 (qs_cuda_add_norm_w8): the last pass also takes each group's max |y|
 * (of y's fp16 values, what the GEMM would read) into shared memory, one
 * atomic per run of a unit's columns in one group; after a barrier each
 * thread codes the columns it wrote (w8_act.cuh's rule) into the layout of
 * qs_cuda_w8_act, the thread of a group's first column writing its scale
 * and zero padding. Dynamic shared memory: the max bits and a NaN/Inf flag
 * per group.
 *
 * Q4 (qs_cuda_add_norm_w4): the last pass also stages y's fp16 values in
 * dynamic shared memory; after a barrier the block quantizes the staged
 * row through the permutation (w4_act.cuh's w4_quant_row, the code the
 * GEMM's own quantization runs, so the codes are the same bits). The codes
 * are in position order, which no thread's own columns follow: hence the
 * staging. */
#define NORM_MAX_THREADS 512

struct norm_w8 {
    int8_t *xq;
    float *sx;
    int G, gp, ng, kd;
};

/* A run of columns of group g with max |v| mx and a NaN/Inf flag, into the
 * block's group state. */
__device__ __forceinline__ void norm_w8_flush(unsigned *gmax, unsigned *gbad, int g, float mx,
                                              bool bad)
{
    if (g < 0)
        return;
    atomicMax(&gmax[g], __float_as_uint(mx)); /* non-negative floats order as their bits */
    if (bad)
        atomicOr(&gbad[g], 1u);
}

enum { NORM_PLAIN, NORM_Q8, NORM_Q4 };

template <bool VEC, int Q>
__global__ void __launch_bounds__(NORM_MAX_THREADS)
    add_norm_kernel(float *__restrict__ x, const __half *__restrict__ d,
                    const __half *__restrict__ w, const __half *__restrict__ b, int H, float eps,
                    int post, __half *__restrict__ y, norm_w8 q, w4_act_args q4)
{
    constexpr bool Q8 = Q == NORM_Q8;
    QS_SHARED(float, red, [32]);
    QS_DYN_SMEM(uint4, gsv); /* Q8: gmax [ng], then gbad [ng]; Q4: the fp16 row */
    unsigned *gst = reinterpret_cast<unsigned *>(gsv);
    float *xr = x + (size_t)blockIdx.x * H;
    const __half *dr = d ? d + (size_t)blockIdx.x * H : nullptr;
    __half *yr = y + (size_t)blockIdx.x * H;
    const int units = (H + 7) / 8;
    const bool ln = b != nullptr;

    float s = 0.0f;
    for (int u = threadIdx.x; u < units; u += blockDim.x) {
        float v[8];
        ld8<VEC>(xr, 8 * u, H, v);
        if (dr) {
            float a[8];
            ld8<VEC>(dr, 8 * u, H, a);
            QS_UNROLL
            for (int j = 0; j < 8; j++)
                v[j] += a[j];
            st8<VEC>(xr, 8 * u, H, v);
        }
        QS_UNROLL
        for (int j = 0; j < 8; j++)
            s += ln ? v[j] : v[j] * v[j]; /* columns past H are 0 */
    }
    s = qs_block_sum(s, red) / (float)H;
    float mean = ln ? s : 0.0f, var = s; /* RMSNorm: var = mean(x^2) */
    if (ln) {
        float c2 = 0.0f;
        for (int u = threadIdx.x; u < units; u += blockDim.x) {
            float v[8];
            ld8<VEC>(xr, 8 * u, H, v);
            QS_UNROLL
            for (int j = 0; j < 8; j++) {
                float c = 8 * u + j < H ? v[j] - mean : 0.0f;
                c2 += c * c;
            }
        }
        var = qs_block_sum(c2, red) / (float)H;
    }
    unsigned *gmax = gst, *gbad = gst + q.ng;
    if (Q8) {
        for (int g = threadIdx.x; g < q.ng; g += blockDim.x)
            gmax[g] = 0u, gbad[g] = 0u;
        __syncthreads();
    }
    const float inv = 1.0f / sqrtf(var + eps);
    for (int u = threadIdx.x; u < units; u += blockDim.x) {
        float v[8], g[8], o[8];
        ld8<VEC>(xr, 8 * u, H, v);
        ld8<VEC>(w, 8 * u, H, g);
        QS_UNROLL
        for (int j = 0; j < 8; j++)
            o[j] = (v[j] - mean) * inv * g[j];
        if (ln) {
            float c[8];
            ld8<VEC>(b, 8 * u, H, c);
            QS_UNROLL
            for (int j = 0; j < 8; j++)
                o[j] += c[j];
        }
        st8<VEC>(yr, 8 * u, H, o);
        if (post)
            st8<VEC>(xr, 8 * u, H, o);
        if (Q == NORM_Q4) /* y's values again (16-byte aligned: uint4 storage) */
            st8<VEC>(reinterpret_cast<__half *>(gsv), 8 * u, H, o);
        if (Q8) {
            int rg = -1;
            float mx = 0.0f;
            bool bad = false;
            for (int j = 0; j < 8 && 8 * u + j < H; j++) {
                const int col = 8 * u + j, gi = col / q.G;
                const float h = __half2float(__float2half_rn(o[j]));
                if (gi != rg) {
                    norm_w8_flush(gmax, gbad, rg, mx, bad);
                    rg = gi, mx = 0.0f, bad = false;
                }
                bad |= !isfinite(h);
                if (!isnan(h))
                    mx = fmaxf(mx, fabsf(h));
            }
            norm_w8_flush(gmax, gbad, rg, mx, bad);
        }
    }
    if (Q == NORM_Q4) {
        __syncthreads();
        w4_quant_row(reinterpret_cast<const __half *>(gsv), q4, blockIdx.x);
        return;
    }
    if (!Q8)
        return;
    __syncthreads();
    int8_t *qr = q.xq + (size_t)blockIdx.x * q.kd;
    float *sr = q.sx + (size_t)blockIdx.x * q.ng;
    for (int u = threadIdx.x; u < units; u += blockDim.x) {
        float v[8];
        ld8<VEC>(yr, 8 * u, H, v); /* this thread's own fp16 outputs */
        for (int j = 0; j < 8 && 8 * u + j < H; j++) {
            const int col = 8 * u + j, gi = col / q.G, c = col - gi * q.G;
            float sc, iv;
            w8_scale(__uint_as_float(gmax[gi]), sc, iv);
            bool unused = false;
            qr[gi * q.gp + c] = (int8_t)(uint8_t)w8_code(v[j], iv, unused);
            if (c == 0) {
                sr[gi] = gbad[gi] ? QS_W8_NAN_SCALE : sc;
                const int len = min(q.G, H - gi * q.G);
                for (int p = len; p < q.gp; p++)
                    qr[gi * q.gp + p] = 0;
            }
        }
    }
    for (int p = q.ng * q.gp + threadIdx.x; p < q.kd; p += blockDim.x)
        qr[p] = 0;
}

template <bool VEC, int Q>
static void norm_go(unsigned n, unsigned th, size_t smem, cudaStream_t st, float *x,
                    const __half *d, const __half *w, const __half *b, int H, float eps, int post,
                    __half *y, norm_w8 q, w4_act_args q4)
{
    QS_LAUNCH(n, th, smem, st, add_norm_kernel<VEC, Q>)(x, d, w, b, H, eps, post, y, q, q4);
}

static int norm_launch(float *x, const void *d, const void *w, const void *b, size_t n, size_t H,
                       float eps, int post, void *y, const qs_cuda_w8_act *a,
                       const qs_cuda_w4_act *a4, void *stream)
{
    if (!x || !w || !y || H < 1 || H > 0x7fffffff || n > 0x7fffffff || !(eps >= 0))
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_add_norm: x, w and y are required, 1 <= H < 2^31, n < 2^31 "
                         "and eps >= 0 (got H=%zu n=%zu eps=%g)",
                         H, n, (double)eps);
    if (n == 0)
        return QS_OK;
    const size_t units = (H + 7) / 8;
    const unsigned th =
        (unsigned)(units >= NORM_MAX_THREADS ? NORM_MAX_THREADS : (units + 31) / 32 * 32);
    const bool vec =
        H % 8 == 0 && qs_al16(x) && qs_al16(d) && qs_al16(w) && qs_al16(b) && qs_al16(y);
    float *xf = x;
    const __half *dh = (const __half *)d, *wh = (const __half *)w, *bh = (const __half *)b;
    __half *yh = (__half *)y;
    cudaStream_t st = QS_CU_STREAM(stream);
    norm_w8 q = {nullptr, nullptr, 1, 0, 0, 0};
    w4_act_args q4;
    memset(&q4, 0, sizeof q4);
    size_t smem = 0;
    if (a) {
        q.xq = (int8_t *)a->xq, q.sx = a->sx;
        q.G = (int)a->group, q.gp = (int)a->gp, q.ng = (int)a->ngroups, q.kd = (int)a->kd;
        smem = 2 * sizeof(unsigned) * a->ngroups;
    }
    if (a4) {
        q4.xq = (uint8_t *)a4->xq, q4.sx = a4->sx, q4.perm = (const uint32_t *)a4->perm;
        q4.K4 = (int)(a4->K - a4->ko), q4.ko = (int)a4->ko, q4.G = (int)a4->group;
        q4.gp = (int)a4->gp, q4.ng = (int)a4->ngroups, q4.off8 = (int)a4->off8;
        q4.kd = (int)a4->kd;
        smem = (H * sizeof(__half) + 15) / 16 * 16;
    }
    typedef void (*go_fn)(unsigned, unsigned, size_t, cudaStream_t, float *, const __half *,
                          const __half *, const __half *, int, float, int, __half *, norm_w8,
                          w4_act_args);
    const int mode = a4 ? NORM_Q4 : a ? NORM_Q8 : NORM_PLAIN;
    static const go_fn gos[2][3] = {
        {norm_go<false, NORM_PLAIN>, norm_go<false, NORM_Q8>, norm_go<false, NORM_Q4>},
        {norm_go<true, NORM_PLAIN>, norm_go<true, NORM_Q8>, norm_go<true, NORM_Q4>}};
    gos[vec][mode]((unsigned)n, th, smem, st, xf, dh, wh, bh, (int)H, eps, post, yh, q, q4);
    QS_CU_LAUNCH("add_norm_kernel");
    return QS_OK;
}

extern "C" int qs_cuda_add_norm(float *x, const void *d, const void *w, const void *b, size_t n,
                                size_t H, float eps, int post, void *y, void *stream)
{
    return norm_launch(x, d, w, b, n, H, eps, post, y, NULL, NULL, stream);
}

extern "C" int qs_cuda_add_norm_w8(float *x, const void *d, const void *w, const void *b, size_t n,
                                   size_t H, float eps, int post, void *y, qs_cuda_w8_act *a,
                                   void *stream)
{
    if (!a || !a->xq || !a->sx || a->K != H || n > a->rows)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_add_norm_w8: activation codes for %zu tokens of %zu channels "
                         "cannot take %zu tokens of %zu: allocate them with qs_cuda_w8_act_alloc "
                         "for the norm's width",
                         a ? a->rows : 0, a ? a->K : 0, n, H);
    if (a->ngroups > QS_CUDA_NORM_W8_MAX_GROUPS)
        return qs_seterr(QS_ENOTSUP,
                         "qs_cuda_add_norm_w8: %zu activation groups are over one CTA's shared "
                         "memory (%d): quantize in the GEMM",
                         a->ngroups, QS_CUDA_NORM_W8_MAX_GROUPS);
    return norm_launch(x, d, w, b, n, H, eps, post, y, a, NULL, stream);
}

extern "C" int qs_cuda_add_norm_w4(float *x, const void *d, const void *w, const void *b, size_t n,
                                   size_t H, float eps, int post, void *y, qs_cuda_w4_act *a,
                                   void *stream)
{
    if (!a || !a->xq || !a->sx || !a->perm || a->K != H || n > a->rows)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_add_norm_w4: activation codes for %zu tokens of %zu channels "
                         "cannot take %zu tokens of %zu: allocate them with qs_cuda_w4_act_alloc "
                         "for a matrix that reads the norm's output",
                         a ? a->rows : 0, a ? a->K : 0, n, H);
    if (H > QS_CUDA_NORM_W4_MAX_H)
        return qs_seterr(QS_ENOTSUP,
                         "qs_cuda_add_norm_w4: a row of %zu channels is over the shared memory "
                         "it is staged in (%d): use qs_cuda_add_norm and qs_cuda_w4_quant_act",
                         H, QS_CUDA_NORM_W4_MAX_H);
    return norm_launch(x, d, w, b, n, H, eps, post, y, NULL, a, stream);
}

/* ---- Elementwise: x += d, and the conversions ------------------------------
 * Units of 8 elements in a grid-stride loop: 16-byte accesses when every
 * pointer is aligned, the tail (count % 8) and unaligned arrays one by one.
 * The grid depends on count only. */
#define EW_THREADS    256
#define EW_MAX_BLOCKS 4096

static unsigned ew_blocks(size_t count)
{
    size_t units = (count + 7) / 8, b = (units + EW_THREADS - 1) / EW_THREADS;
    return (unsigned)(b < EW_MAX_BLOCKS ? b : EW_MAX_BLOCKS);
}

/* Unit u covers elements 8u..8u+7; the 16-byte path takes it when all 8 exist. */
#define EW_FOR(u, count)                                                                           \
    for (size_t u = blockIdx.x * (size_t)blockDim.x + threadIdx.x; u < ((count) + 7) / 8;          \
         u += (size_t)gridDim.x * blockDim.x)

__global__ void add_f16_kernel(float *__restrict__ x, const __half *__restrict__ d, size_t count,
                               bool vec)
{
    EW_FOR(u, count)
    {
        const size_t i0 = 8 * u;
        if (vec && i0 + 8 <= count) {
            float v[8], a[8];
            qs_ld_f4(x + i0, v);
            qs_ld_f4(x + i0 + 4, v + 4);
            qs_ld_h8(d + i0, a);
            QS_UNROLL
            for (int j = 0; j < 8; j++)
                v[j] += a[j];
            qs_st_f4(x + i0, v);
            qs_st_f4(x + i0 + 4, v + 4);
        } else {
            for (size_t i = i0; i < count && i < i0 + 8; i++)
                x[i] += __half2float(d[i]);
        }
    }
}

__global__ void f32_to_f16_kernel(const float *__restrict__ x, size_t count, __half *__restrict__ y,
                                  bool vec)
{
    EW_FOR(u, count)
    {
        const size_t i0 = 8 * u;
        if (vec && i0 + 8 <= count) {
            float v[8];
            qs_ld_f4(x + i0, v);
            qs_ld_f4(x + i0 + 4, v + 4);
            qs_st_h8(y + i0, v);
        } else {
            for (size_t i = i0; i < count && i < i0 + 8; i++)
                y[i] = __float2half_rn(x[i]);
        }
    }
}

__global__ void f16_to_f32_kernel(const __half *__restrict__ x, size_t count, float *__restrict__ y,
                                  bool vec)
{
    EW_FOR(u, count)
    {
        const size_t i0 = 8 * u;
        if (vec && i0 + 8 <= count) {
            float v[8];
            qs_ld_h8(x + i0, v);
            qs_st_f4(y + i0, v);
            qs_st_f4(y + i0 + 4, v + 4);
        } else {
            for (size_t i = i0; i < count && i < i0 + 8; i++)
                y[i] = __half2float(x[i]);
        }
    }
}

extern "C" int qs_cuda_add_f16(float *x, const void *d, size_t count, void *stream)
{
    if (!x || !d)
        return qs_seterr(QS_EINVAL, "qs_cuda_add_f16: x and d are required");
    if (count == 0)
        return QS_OK;
    QS_LAUNCH(ew_blocks(count), EW_THREADS, 0, QS_CU_STREAM(stream), add_f16_kernel)
    (x, (const __half *)d, count, qs_al16(x) && qs_al16(d));
    QS_CU_LAUNCH("add_f16_kernel");
    return QS_OK;
}

extern "C" int qs_cuda_f32_to_f16(const float *x, size_t count, void *y, void *stream)
{
    if (!x || !y)
        return qs_seterr(QS_EINVAL, "qs_cuda_f32_to_f16: x and y are required");
    if (count == 0)
        return QS_OK;
    QS_LAUNCH(ew_blocks(count), EW_THREADS, 0, QS_CU_STREAM(stream), f32_to_f16_kernel)
    (x, count, (__half *)y, qs_al16(x) && qs_al16(y));
    QS_CU_LAUNCH("f32_to_f16_kernel");
    return QS_OK;
}

extern "C" int qs_cuda_f16_to_f32(const void *x, size_t count, float *y, void *stream)
{
    if (!x || !y)
        return qs_seterr(QS_EINVAL, "qs_cuda_f16_to_f32: x and y are required");
    if (count == 0)
        return QS_OK;
    QS_LAUNCH(ew_blocks(count), EW_THREADS, 0, QS_CU_STREAM(stream), f16_to_f32_kernel)
    ((const __half *)x, count, y, qs_al16(x) && qs_al16(y));
    QS_CU_LAUNCH("f16_to_f32_kernel");
    return QS_OK;
}
