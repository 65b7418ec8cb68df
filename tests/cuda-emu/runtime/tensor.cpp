/* tensor.cpp: the arithmetic of the tensor cores, for the warp-level
 * interfaces of the headers (WMMA in mma.h) and the PTX wrappers of
 * kernels/cuda/ptx.cuh (mma.sync with s8 and s4 operands). A lane's call gathers the
 * warp's fragments (one copy per warp, sched.cpp) and computes the lane's
 * own elements of D (the A and B of one gather are converted once per
 * warp). Products are summed over k in order, in fp32 for
 * fp16/bf16 inputs and in int32 for 8- and 4-bit ones: the hardware's order of
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

void wmma_mma(int M, int N, int K, int tin, const void *a, int a_col, const void *b, int b_col,
              int tc, const void *c, int td, void *d, const char *file, int line)
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
        /* Run i of a fragment is lane i / ne's element i % ne; A[r][k] is
         * run r * K + k (row runs) or k * M + r (column runs). */
        for (int r = 0; r < M; r++)
            for (int k = 0; k < K; k++) {
                size_t i = a_col ? (size_t)k * M + r : (size_t)r * K + k;
                double v = get(all + (i / na) * slot, tin, i % na);
                integer ? (void)(w.Ai[r * K + k] = (int)v) : (void)(w.A[r * K + k] = (float)v);
            }
        for (int k = 0; k < K; k++)
            for (int n = 0; n < N; n++) {
                size_t i = b_col ? (size_t)n * K + k : (size_t)k * N + n;
                double v = get(all + (i / nb) * slot + na * es, tin, i % nb);
                integer ? (void)(w.Bi[k * N + n] = (int)v) : (void)(w.B[k * N + n] = (float)v);
            }
    }
    const float *A = w.A, *B = w.B;
    const int *Ai = w.Ai, *Bi = w.Bi;
    const int ne = M * N / 32, lane = (int)g_lane;
    char out[16 * 4];
    for (int e = 0; e < ne; e++) {
        int idx = lane * ne + e, r = idx / N, n = idx % N;
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

/* mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32. Fragments (PTX ISA,
 * "Matrix Fragments for mma.m16n8k32", .s8), g = lane >> 2, t = lane & 3,
 * element i of a fragment is byte i % 4 of register i / 4 (low to high):
 *   A (16 x 32, row): row g for i in 0..3 and 8..11, g + 8 otherwise;
 *                     column 4t + (i & 3), + 16 for i >= 8
 *   B (32 x 8, col):  row (k) 4t + (i & 3), + 16 for i >= 4; column g
 *   C, D (16 x 8):    row g for i < 2, g + 8 otherwise; column 2t + (i & 1) */
void mma_s8_m16n8k32(const uint32_t a[4], const uint32_t b[2], const int32_t c[4], int32_t d[4],
                     const char *file, int line)
{
    const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    unsigned got = 0;
    const uint32_t *all =
        (const uint32_t *)warp_gather(W_MMA, 0xffffffffu, mine, sizeof mine, file, line, &got);
    if (got != 0xffffffffu)
        fatal(QS_EMU_WARP_ARGS, cudaErrorLaunchFailure,
              "mma.sync at %s:%d needs all 32 lanes of the warp (.aligned); lanes 0x%08x took part",
              file, line, got);
    /* A and B placed once per warp and gather, as for WMMA. */
    static struct {
        const block_run *block;
        uint32_t serial;
        uint64_t gather;
        int32_t A[16][32], B[32][8];
    } cache[32];
    auto &w = cache[g_warp];
    if (w.block != g_block || w.serial != g_block->serial ||
        w.gather != g_block->gather_serial[g_warp]) {
        w.block = g_block, w.serial = g_block->serial, w.gather = g_block->gather_serial[g_warp];
        for (int l = 0; l < 32; l++) {
            const uint32_t *s = all + l * 6;
            const int g = l >> 2, t = l & 3;
            for (int i = 0; i < 16; i++) {
                int row = (i < 4 || (i >= 8 && i < 12)) ? g : g + 8;
                int col = 4 * t + (i & 3) + (i >= 8 ? 16 : 0);
                w.A[row][col] = (int8_t)(s[i / 4] >> (8 * (i % 4)));
            }
            for (int i = 0; i < 8; i++) {
                int row = 4 * t + (i & 3) + (i >= 4 ? 16 : 0);
                w.B[row][g] = (int8_t)(s[4 + i / 4] >> (8 * (i % 4)));
            }
        }
    }
    const int g = (int)g_lane >> 2, t = (int)g_lane & 3;
    int32_t out[4];
    for (int i = 0; i < 4; i++) {
        const int row = i < 2 ? g : g + 8, col = 2 * t + (i & 1);
        uint32_t acc = (uint32_t)c[i]; /* two's complement wrap, no UB */
        for (int k = 0; k < 32; k++)
            acc += (uint32_t)(w.A[row][k] * w.B[k][col]);
        out[i] = (int32_t)acc;
    }
    memcpy(d, out, sizeof out);
}

/* mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32. Fragments (PTX ISA,
 * "Matrix Fragments for mma.m16n8k64", .s4), g = lane >> 2, t = lane & 3,
 * element i of a fragment is nibble i % 8 of register i / 8 (low to high),
 * two's complement:
 *   A (16 x 64, row): row g for i in 0..7 and 16..23, g + 8 otherwise;
 *                     column 8t + (i & 7), + 32 for i >= 16
 *   B (64 x 8, col):  row (k) 8t + (i & 7), + 32 for i >= 8; column g
 *   C, D (16 x 8):    as m16n8k32. */
void mma_s4_m16n8k64(const uint32_t a[4], const uint32_t b[2], const int32_t c[4], int32_t d[4],
                     const char *file, int line)
{
    const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    unsigned got = 0;
    const uint32_t *all =
        (const uint32_t *)warp_gather(W_MMA, 0xffffffffu, mine, sizeof mine, file, line, &got);
    if (got != 0xffffffffu)
        fatal(QS_EMU_WARP_ARGS, cudaErrorLaunchFailure,
              "mma.sync at %s:%d needs all 32 lanes of the warp (.aligned); lanes 0x%08x took part",
              file, line, got);
    static struct {
        const block_run *block;
        uint32_t serial;
        uint64_t gather;
        int32_t A[16][64], B[64][8];
    } cache[32];
    auto &w = cache[g_warp];
    if (w.block != g_block || w.serial != g_block->serial ||
        w.gather != g_block->gather_serial[g_warp]) {
        w.block = g_block, w.serial = g_block->serial, w.gather = g_block->gather_serial[g_warp];
        for (int l = 0; l < 32; l++) {
            const uint32_t *s = all + l * 6;
            const int g = l >> 2, t = l & 3;
            for (int i = 0; i < 32; i++) {
                const int row = (i < 8 || (i >= 16 && i < 24)) ? g : g + 8;
                const int col = 8 * t + (i & 7) + (i >= 16 ? 32 : 0);
                const int v = (int)((s[i / 8] >> (4 * (i % 8))) & 15u);
                w.A[row][col] = v >= 8 ? v - 16 : v;
            }
            for (int i = 0; i < 16; i++) {
                const int row = 8 * t + (i & 7) + (i >= 8 ? 32 : 0);
                const int v = (int)((s[4 + i / 8] >> (4 * (i % 8))) & 15u);
                w.B[row][g] = v >= 8 ? v - 16 : v;
            }
        }
    }
    const int g = (int)g_lane >> 2, t = (int)g_lane & 3;
    int32_t out[4];
    for (int i = 0; i < 4; i++) {
        const int row = i < 2 ? g : g + 8, col = 2 * t + (i & 1);
        uint32_t acc = (uint32_t)c[i];
        for (int k = 0; k < 64; k++)
            acc += (uint32_t)(w.A[row][k] * w.B[k][col]);
        out[i] = (int32_t)acc;
    }
    memcpy(d, out, sizeof out);
}

} /* namespace qs_emu */
