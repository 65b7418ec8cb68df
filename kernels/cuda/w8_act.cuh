/* w8_act.cuh: the W8A8 activation-code rule on the device, shared by the
 * GEMM's own quantization (w8a8_gpu.cu) and the operations that quantize
 * their output in the same pass (norm_gpu.cu's qs_cuda_add_norm_w8), so
 * that both give the CPU's codes bit for bit (kernels/cpu/w8a8.c,
 * qs_act_row): per token and group, scale = max|x| / 127 and codes
 * nearbyintf(x * 127 / max) clamped to +-127, each in one fp32 rounding;
 * NaN and Inf code 0 and make the group's scale NaN. */
#ifndef QS_W8_ACT_CUH
#define QS_W8_ACT_CUH

#include "cuda_util.cuh"

/* One code; bad is set for NaN or Inf. Clamped in float first, so the
 * conversion to int is exact. */
__device__ __forceinline__ uint32_t w8_code(float x, float inv, bool &bad)
{
    float c = rintf(__fmul_rn(x, inv));
    c = fminf(fmaxf(c, -127.0f), 127.0f);
    if (!isfinite(x))
        bad = true, c = 0.0f;
    return (uint32_t)(uint8_t)(int8_t)(int)c;
}

/* A group's scale and 1/scale from its max |x| (NaN skipped, as fmaxf
 * does on the CPU). */
__device__ __forceinline__ void w8_scale(float mx, float &s, float &inv)
{
    s = __fdiv_rn(mx, 127.0f);
    inv = mx > 0.0f ? __fdiv_rn(127.0f, mx) : 0.0f;
}

#define QS_W8_NAN_SCALE __int_as_float(0x7fc00000)

#endif
