/* synth_gpu.cu: synthetic weights made on the device (qs_cuda_synth_fill), so that a GPU
 * rank fills its slice of a synthetic model (OPT-175B's 350 GB in fp16) without the host
 * ever holding it. The value is kernels/qs_synth.h's qs_synth_value, the same source the
 * host loader (shard/model.c) calls, compiled here for the device: a counter-based function
 * of (key, row * cols + col), so any slice equals the host's. The double log, cos and sqrt
 * of the GPU's libdevice may round differently from glibc's in the last bit, which can move
 * the fp32 result by an ulp; under the harness (glibc) it is bit for bit. */
#include "cuda_util.cuh"
#include "qs_synth.h"

/* W[i * ld + j] for i < nr, j < nc: x over columns (coalesced stores), y over rows, both
 * grid-stride. */
__global__ void synth_fill_kernel(float *__restrict__ W, uint64_t key, uint64_t cols, uint64_t r0,
                                  uint64_t nr, uint64_t c0, uint64_t nc, uint64_t ld, int kind,
                                  uint64_t outliers)
{
    for (uint64_t i = blockIdx.y; i < nr; i += gridDim.y)
        for (uint64_t j = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; j < nc;
             j += (uint64_t)gridDim.x * blockDim.x)
            W[i * ld + j] = qs_synth_value(key, (r0 + i) * cols + c0 + j, c0 + j, kind, outliers);
}

extern "C" int qs_cuda_synth_fill(float *W, uint64_t key, uint64_t cols, uint64_t r0, uint64_t nr,
                                  uint64_t c0, uint64_t nc, uint64_t ld, int kind,
                                  uint64_t outliers, void *stream)
{
    if (kind != QS_SYNTH_WEIGHT && kind != QS_SYNTH_BIAS && kind != QS_SYNTH_NORM)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_synth_fill: kind %d is none of 0 (weight), 1 (bias), 2 (norm "
                         "gain)",
                         kind);
    if (nr == 0 || nc == 0)
        return QS_OK;
    if (!W)
        return qs_seterr(QS_EINVAL, "qs_cuda_synth_fill got a NULL output: pass an nr x ld fp32 "
                                    "device matrix");
    if (c0 > cols || nc > cols - c0)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_synth_fill: columns %llu..%llu are past the tensor's %llu: "
                         "give c0 + nc <= cols",
                         (unsigned long long)c0, (unsigned long long)(c0 + nc - 1),
                         (unsigned long long)cols);
    uint64_t last;
    if (ld < nc || __builtin_mul_overflow(nr - 1, ld, &last) ||
        __builtin_add_overflow(last, nc, &last) || last > SIZE_MAX / sizeof(float))
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_synth_fill: rows %llu apart cannot hold %llu columns, or %llu "
                         "rows of them overflow: give nc <= ld",
                         (unsigned long long)ld, (unsigned long long)nc, (unsigned long long)nr);
    const uint64_t bx = (nc + 255) / 256;
    dim3 grid((unsigned)(bx < 1024 ? bx : 1024), (unsigned)(nr < 65535 ? nr : 65535));
    QS_LAUNCH(grid, 256, 0, QS_CU_STREAM(stream), synth_fill_kernel)
    (W, key, cols, r0, nr, c0, nc, ld, kind, outliers);
    QS_CU_LAUNCH("synth_fill_kernel");
    return QS_OK;
}
