/* logits_gpu.cu: the logits gathered from the ranks' vocabulary blocks
 * (qs_cuda_gather_logits). The CPU counterpart is the transpose at the end
 * of shard/model.c's logits_forward.
 *
 * all: P x nl x vr fp32 as an all-gather leaves it, rank-major ([rank][token]
 * [row of the rank's block]); logits: nl x V fp32, logits[i][r*vr + j] =
 * all[r][i][j] for r*vr + j < V (the last ranks' padding rows are dropped).
 * One CTA per (rank, token) copies one contiguous run of min(vr, V - r*vr)
 * floats; 16-byte accesses when vr and V are multiples of 4 and both arrays
 * aligned (then every run starts aligned), else one by one. */
#include "rowops.cuh"

#define GATHER_THREADS 256

template <bool VEC>
__global__ void __launch_bounds__(GATHER_THREADS)
    gather_logits_kernel(const float *__restrict__ all, size_t nl, size_t vr, size_t V,
                         float *__restrict__ logits)
{
    const size_t r = blockIdx.x / nl, i = blockIdx.x % nl, first = r * vr;
    if (first >= V)
        return; /* a rank holding padding rows only; no barrier here */
    const size_t len = V - first < vr ? V - first : vr;
    const float *src = all + (r * nl + i) * vr;
    float *dst = logits + i * V + first;
    if (VEC) {
        for (size_t j = 4 * (size_t)threadIdx.x; j < len; j += 4 * (size_t)blockDim.x) {
            float v[4];
            qs_ld_f4(src + j, v);
            qs_st_f4(dst + j, v);
        }
    } else {
        for (size_t j = threadIdx.x; j < len; j += blockDim.x)
            dst[j] = src[j];
    }
}

extern "C" int qs_cuda_gather_logits(const float *all, size_t P, size_t nl, size_t vr, size_t V,
                                     float *logits, void *stream)
{
    if (!all || !logits || P < 1 || vr < 1 || V < 1 || P * vr < V || V > 0x7fffffff ||
        P * nl > 0x7fffffff)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_gather_logits: all and logits are required and the P=%zu "
                         "blocks of vr=%zu rows must cover the vocabulary of V=%zu (nl=%zu)",
                         P, vr, V, nl);
    if (nl == 0)
        return QS_OK;
    const bool vec = vr % 4 == 0 && V % 4 == 0 && qs_al16(all) && qs_al16(logits);
    cudaStream_t st = QS_CU_STREAM(stream);
    const unsigned g = (unsigned)(P * nl);
    if (vec) {
        QS_LAUNCH(g, GATHER_THREADS, 0, st, gather_logits_kernel<true>)(all, nl, vr, V, logits);
    } else {
        QS_LAUNCH(g, GATHER_THREADS, 0, st, gather_logits_kernel<false>)(all, nl, vr, V, logits);
    }
    QS_CU_LAUNCH("gather_logits_kernel");
    return QS_OK;
}
