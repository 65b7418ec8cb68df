/* act_gpu.cu: the FFN activations on the device (qs_kernels.h, "The device
 * forward pass"), on count fp16 elements, out possibly one of the inputs:
 *   SwiGLU  out = gate / (1 + exp(-gate)) * up   (shard/model.c's
 *           `ff1[i] *= g / (1.0f + expf(-g))`, in fp32, rounded once)
 *   ReLU    out = a > 0 ? a : 0                   (exact; NaN and -0 give +0)
 * Units of 8 elements, 16-byte accesses when every pointer is aligned. The
 * grid depends on count only. */
#include "rowops.cuh"

#define ACT_THREADS    256
#define ACT_MAX_BLOCKS 4096

static unsigned act_blocks(size_t count)
{
    size_t units = (count + 7) / 8, b = (units + ACT_THREADS - 1) / ACT_THREADS;
    return (unsigned)(b < ACT_MAX_BLOCKS ? b : ACT_MAX_BLOCKS);
}

/* expf, not __expf: the CPU's function to within its ulps (under the
 * harness glibc's exactly). A large negative gate gives exp = inf and -0. */
__device__ __forceinline__ float silu_mul(float g, float u)
{
    return u * (g / (1.0f + expf(-g)));
}

__global__ void swiglu_kernel(const __half *gate, const __half *up, size_t count, __half *out,
                              bool vec)
{
    for (size_t u = blockIdx.x * (size_t)blockDim.x + threadIdx.x; u < (count + 7) / 8;
         u += (size_t)gridDim.x * blockDim.x) {
        const size_t i0 = 8 * u;
        if (vec && i0 + 8 <= count) {
            float g[8], a[8];
            qs_ld_h8(gate + i0, g);
            qs_ld_h8(up + i0, a);
            QS_UNROLL
            for (int j = 0; j < 8; j++)
                a[j] = silu_mul(g[j], a[j]);
            qs_st_h8(out + i0, a);
        } else {
            for (size_t i = i0; i < count && i < i0 + 8; i++)
                out[i] = __float2half_rn(silu_mul(__half2float(gate[i]), __half2float(up[i])));
        }
    }
}

__global__ void relu_kernel(const __half *a, size_t count, __half *out, bool vec)
{
    for (size_t u = blockIdx.x * (size_t)blockDim.x + threadIdx.x; u < (count + 7) / 8;
         u += (size_t)gridDim.x * blockDim.x) {
        const size_t i0 = 8 * u;
        if (vec && i0 + 8 <= count) {
            float v[8];
            qs_ld_h8(a + i0, v);
            QS_UNROLL
            for (int j = 0; j < 8; j++)
                v[j] = v[j] > 0.0f ? v[j] : 0.0f;
            qs_st_h8(out + i0, v); /* exact: every value is an fp16 already */
        } else {
            for (size_t i = i0; i < count && i < i0 + 8; i++) {
                float v = __half2float(a[i]);
                out[i] = __float2half_rn(v > 0.0f ? v : 0.0f);
            }
        }
    }
}

extern "C" int qs_cuda_swiglu(const void *gate, const void *up, size_t count, void *out,
                              void *stream)
{
    if (!gate || !up || !out)
        return qs_seterr(QS_EINVAL, "qs_cuda_swiglu: gate, up and out are required");
    if (count == 0)
        return QS_OK;
    QS_LAUNCH(act_blocks(count), ACT_THREADS, 0, QS_CU_STREAM(stream), swiglu_kernel)
    ((const __half *)gate, (const __half *)up, count, (__half *)out,
     qs_al16(gate) && qs_al16(up) && qs_al16(out));
    QS_CU_LAUNCH("swiglu_kernel");
    return QS_OK;
}

extern "C" int qs_cuda_relu(const void *a, size_t count, void *out, void *stream)
{
    if (!a || !out)
        return qs_seterr(QS_EINVAL, "qs_cuda_relu: a and out are required");
    if (count == 0)
        return QS_OK;
    QS_LAUNCH(act_blocks(count), ACT_THREADS, 0, QS_CU_STREAM(stream), relu_kernel)
    ((const __half *)a, count, (__half *)out, qs_al16(a) && qs_al16(out));
    QS_CU_LAUNCH("relu_kernel");
    return QS_OK;
}
