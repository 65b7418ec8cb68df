/* tensor.cpp: the arithmetic of the tensor cores, for the warp-level
 * interfaces of the headers (WMMA in mma.h). A lane's call gathers the
 * warp's fragments (one copy per warp, sched.cpp) and computes the lane's
 * own elements of D (the A and B of one gather are converted once per
 * warp). Products are summed over k in order, in fp32 for
 * fp16/bf16 inputs and in int32 for 8-bit ones: the hardware's order of
 * summation is unspecified, so results may differ from a GPU's in the
 * last bits of fp32, never in integer paths. */
#include "emu_internal.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace qs_emu
{
namespace
{

size_t elem_size(int t)
{
    return t == E_F32 || t == E_S32 ? 4 : t == E_F16 || t == E_BF16 ? 2 : 1;
}

double get(const void *p, int t, size_t i)
{
    switch (t) {
    case E_F16:
        return qs_emu_h2f(((const uint16_t *)p)[i]);
    case E_BF16:
        return qs_emu_bf2f(((const uint16_t *)p)[i]);
    case E_F32:
        return ((const float *)p)[i];
    case E_S8:
        return ((const int8_t *)p)[i];
    case E_U8:
        return ((const uint8_t *)p)[i];
    default:
        return ((const int32_t *)p)[i];
    }
}

void put(void *p, int t, size_t i, double v)
{
    switch (t) {
    case E_F16:
        ((uint16_t *)p)[i] = qs_emu_f2h_rn((float)v);
        break;
    case E_BF16:
        ((uint16_t *)p)[i] = qs_emu_f2bf_rn((float)v);
        break;
    case E_F32:
        ((float *)p)[i] = (float)v;
        break;
    default:
        ((int32_t *)p)[i] = (int32_t)v;
        break;
    }
}

} /* namespace */

void wmma_mma(int M, int N, int K, int tin, const void *a, const void *b, int tc, const void *c,
              int td, void *d, const char *file, int line)
{
    const size_t es = elem_size(tin), na = (size_t)M * K / 32, nb = (size_t)K * N / 32;
    const size_t slot = (na + nb) * es;
    char mine[128]; /* at most 16 + 16 elements of 4 bytes */
    if (slot > sizeof mine)
        trap("WMMA fragment too large for the emulator", file, line);
    memcpy(mine, a, na * es);
    memcpy(mine + na * es, b, nb * es);
    const char *all = (const char *)warp_gather(W_WMMA, 0xffffffffu, mine, slot, file, line, NULL);
    /* A (M x K) and B (K x N) in the compute type, converted once per warp:
     * the first lane back from the gather fills the cache for the rest. */
    static struct {
        const block_run *block;
        uint32_t serial;
        uint64_t gather;
        float A[32 * 16], B[16 * 32];
        int Ai[32 * 16], Bi[16 * 32];
    } cache[32];
    const bool integer = tin == E_S8 || tin == E_U8;
    auto &w = cache[g_warp];
    if (w.block != g_block || w.serial != g_block->serial ||
        w.gather != g_block->gather_serial[g_warp]) {
        w.block = g_block, w.serial = g_block->serial, w.gather = g_block->gather_serial[g_warp];
        for (int i = 0; i < M * K; i++) {
            double v = get(all + (size_t)(i % 32) * slot, tin, (size_t)(i / 32));
            integer ? (void)(w.Ai[i] = (int)v) : (void)(w.A[i] = (float)v);
        }
        for (int i = 0; i < K * N; i++) {
            double v = get(all + (size_t)(i % 32) * slot + na * es, tin, (size_t)(i / 32));
            integer ? (void)(w.Bi[i] = (int)v) : (void)(w.B[i] = (float)v);
        }
    }
    const float *A = w.A, *B = w.B;
    const int *Ai = w.Ai, *Bi = w.Bi;
    const int ne = M * N / 32, lane = (int)g_lane;
    char out[16 * 4];
    for (int e = 0; e < ne; e++) {
        int idx = e * 32 + lane, r = idx / N, n = idx % N;
        if (integer) {
            int32_t acc = (int32_t)get(c, tc, (size_t)e);
            for (int k = 0; k < K; k++)
                acc += Ai[r * K + k] * Bi[k * N + n];
            put(out, td, (size_t)e, acc);
        } else {
            /* fp16 x fp16 (and bf16) products are exact in fp32, so this is
             * the fused multiply-add without libm's call. */
            float acc = (float)get(c, tc, (size_t)e);
            for (int k = 0; k < K; k++)
                acc += A[r * K + k] * B[k * N + n];
            put(out, td, (size_t)e, acc);
        }
    }
    memcpy(d, out, (size_t)ne * elem_size(td));
}

} /* namespace qs_emu */
