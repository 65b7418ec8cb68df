/* embed_gpu.cu: the input embeddings on the device (qs_kernels.h, "The
 * device forward pass"). The CPU counterpart is shard/model.c's embed():
 *   qs_cuda_embed    x (n x E fp32) row i = table row tokens[i] - v_first
 *                    (fp16 vr x E, this rank's vocabulary block) when that
 *                    lies in [0, vr), else zeros: a sum over the ranks then
 *                    gathers every row;
 *   qs_cuda_add_pos  x (n x H fp32) += table row pos[i] + offset (OPT's
 *                    learned positions start at row 2).
 * Both exact (fp16 -> fp32 is exact, the add rounds once as on the CPU).
 * One CTA per token; units of 8 columns with 16-byte accesses when the
 * width is a multiple of 8 and the pointers are aligned, else one by one. */
#include "rowops.cuh"

#define EMB_THREADS 128

/* dst (fp32, w columns) = src (fp16) or, src NULL, 0; add: dst += src. */
template <bool VEC, bool ADD>
__device__ __forceinline__ void row_f16_to_f32(float *dst, const __half *src, size_t w)
{
    if (VEC) {
        for (size_t j = 8 * (size_t)threadIdx.x; j < w; j += 8 * (size_t)blockDim.x) {
            float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            if (src)
                qs_ld_h8(src + j, v);
            if (ADD) {
                float o[8];
                qs_ld_f4(dst + j, o);
                qs_ld_f4(dst + j + 4, o + 4);
                QS_UNROLL
                for (int e = 0; e < 8; e++)
                    v[e] += o[e];
            }
            qs_st_f4(dst + j, v);
            qs_st_f4(dst + j + 4, v + 4);
        }
    } else {
        for (size_t j = threadIdx.x; j < w; j += blockDim.x) {
            float v = src ? __half2float(src[j]) : 0.0f;
            dst[j] = ADD ? dst[j] + v : v;
        }
    }
}

template <bool VEC>
__global__ void __launch_bounds__(EMB_THREADS)
    embed_kernel(const int32_t *__restrict__ tokens, const __half *__restrict__ table,
                 uint32_t v_first, uint32_t vr, size_t E, float *__restrict__ x)
{
    const size_t i = blockIdx.x;
    const uint32_t t = (uint32_t)tokens[i]; /* negative ids wrap far outside */
    const __half *src =
        t >= v_first && t - v_first < vr ? table + (size_t)(t - v_first) * E : nullptr;
    row_f16_to_f32<VEC, false>(x + i * E, src, E);
}

template <bool VEC>
__global__ void __launch_bounds__(EMB_THREADS)
    add_pos_kernel(float *__restrict__ x, const uint32_t *__restrict__ pos, size_t H,
                   const __half *__restrict__ table, uint32_t offset)
{
    const size_t i = blockIdx.x;
    row_f16_to_f32<VEC, true>(x + i * H, table + ((size_t)pos[i] + offset) * H, H);
}

extern "C" int qs_cuda_embed(const int32_t *tokens, size_t n, const void *table, uint32_t v_first,
                             uint32_t vr, size_t E, float *x, void *stream)
{
    if (!tokens || !table || !x || E < 1 || vr < 1 || n > 0x7fffffff)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_embed: tokens, table and x are required, E >= 1, vr >= 1, "
                         "n < 2^31 (got E=%zu vr=%u n=%zu)",
                         E, vr, n);
    if (n == 0)
        return QS_OK;
    const bool vec = E % 8 == 0 && qs_al16(table) && qs_al16(x);
    const __half *tb = (const __half *)table;
    cudaStream_t st = QS_CU_STREAM(stream);
    if (vec) {
        QS_LAUNCH((unsigned)n, EMB_THREADS, 0, st, embed_kernel<true>)
        (tokens, tb, v_first, vr, E, x);
    } else {
        QS_LAUNCH((unsigned)n, EMB_THREADS, 0, st, embed_kernel<false>)
        (tokens, tb, v_first, vr, E, x);
    }
    QS_CU_LAUNCH("embed_kernel");
    return QS_OK;
}

extern "C" int qs_cuda_add_pos(float *x, const uint32_t *pos, size_t n, size_t H, const void *table,
                               uint32_t offset, void *stream)
{
    if (!x || !pos || !table || H < 1 || n > 0x7fffffff)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_add_pos: x, pos and table are required, H >= 1, n < 2^31 "
                         "(got H=%zu n=%zu)",
                         H, n);
    if (n == 0)
        return QS_OK;
    const bool vec = H % 8 == 0 && qs_al16(table) && qs_al16(x);
    const __half *tb = (const __half *)table;
    cudaStream_t st = QS_CU_STREAM(stream);
    if (vec) {
        QS_LAUNCH((unsigned)n, EMB_THREADS, 0, st, add_pos_kernel<true>)(x, pos, H, tb, offset);
    } else {
        QS_LAUNCH((unsigned)n, EMB_THREADS, 0, st, add_pos_kernel<false>)(x, pos, H, tb, offset);
    }
    QS_CU_LAUNCH("add_pos_kernel");
    return QS_OK;
}
