/* ptx.cuh: the inline PTX of kernels/cuda, one __device__ wrapper per
 * instruction. Under nvcc each body is the instruction (asm volatile);
 * under the CPU execution harness (QS_CUDA_EMU, tests/cuda-emu) it is an
 * emulation that follows the PTX ISA's documented semantics and fragment
 * layouts, checked by tests/cuda-emu/selftest/test_emu_ptx against plain
 * matrix products. Needs sm_80 (cp.async, mma.sync m16n8k32 s8 and
 * m16n8k64 s4; sm_90 compiles the s4 form but has no INT4 tensor cores).
 *
 *   qs_cp_async16(smem, gmem, valid)   cp.async.cg.shared.global, 16 bytes,
 *                                      zero-filled when !valid (src-size 0)
 *   qs_cp_async_commit()               cp.async.commit_group
 *   qs_cp_async_wait<N>()              cp.async.wait_group N
 *   qs_ldmatrix_x4(r, smem)            ldmatrix.sync.aligned.m8n8.x4.shared.b16
 *   qs_ldmatrix_x2(r, smem)            the same, .x2
 *   qs_mma_s8_16832(d, a, b)           mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32,
 *                                      d += a b
 *   qs_mma_s4_16864(d, a, b)           mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32,
 *                                      d += a b (eight nibbles per register)
 *
 * Layouts (PTX ISA "Matrix Fragments for mma.m16n8k32" and "ldmatrix"),
 * g = lane >> 2, t = lane & 3, bytes of a register low to high:
 *   ldmatrix: lanes 8j..8j+7 give the row addresses (16 bytes each, 16-byte
 *     aligned, shared memory) of matrix j; register j of lane l receives
 *     bytes 4t..4t+3 of row g of matrix j.
 *   mma A (16 x 32 s8, row-major): a[0] row g, bytes k = 4t..4t+3; a[1] row
 *     g + 8, same k; a[2] row g, k + 16; a[3] row g + 8, k + 16.
 *   mma B (32 x 8 s8, column-major: row n of W holds its k): b[0] column
 *     (n) g, k = 4t..4t+3; b[1] the same, k + 16.
 *   mma C/D (16 x 8 s32): d[0], d[1] row g, columns 2t, 2t + 1; d[2], d[3]
 *     row g + 8.
 * So ldmatrix.x4 of rows (r, r + 8) x (k bytes 0-15, 16-31) is an A
 * fragment, and of W rows (n, n + 8) x the same two halves two B fragments.
 *   m16n8k64 s4 (PTX ISA "Matrix Fragments for mma.m16n8k64"): the same
 *     registers by bytes, each holding eight two's complement nibbles (low
 *     nibble first): a[0] row g, k = 8t..8t+7; a[1] row g + 8; a[2] row g,
 *     k + 32; a[3] row g + 8, k + 32; b[0] column g, k = 8t..8t+7; b[1]
 *     k + 32; C/D as above. So rows of packed nibbles (element 2i low, 2i+1
 *     high in byte i) load with the same ldmatrix calls as s8 rows.
 *
 * The emulations take the caller's file and line (default arguments that
 * g++ fills in at the call site) so that the harness's warp checks name the
 * kernel's line and lanes of a warp at two different call sites of one
 * wrapper are a divergence, as on the GPU. cp.async copies once when issued
 * and again when a wait completes it (see qs_emu::cp_async_complete): the
 * race detector then sees both ends of the window in which the hardware
 * may write, so reading a destination before waiting for it, or refilling
 * a buffer others still read, is reported. */
#ifndef QS_PTX_CUH
#define QS_PTX_CUH

#include <stdint.h>

#include "cuda_compat.cuh"

#ifdef QS_CUDA_EMU
#define QS_PTX_SITE      , const char *qs_file = __builtin_FILE(), int qs_line = __builtin_LINE()
#define QS_PTX_SITE_ONLY const char *qs_file = __builtin_FILE(), int qs_line = __builtin_LINE()
#else
#define QS_PTX_SITE
#define QS_PTX_SITE_ONLY
#endif

#ifdef QS_CUDA_EMU
/* 16 bytes from src (or zeros) to dst, as one access each. */
__device__ __forceinline__ void qs_emu_cp_async_copy(void *dst, const void *src, unsigned src_bytes)
{
    uint4 v = make_uint4(0, 0, 0, 0);
    if (src_bytes)
        v = *reinterpret_cast<const uint4 *>(src);
    *reinterpret_cast<uint4 *>(dst) = v;
}
#endif

/* ---- cp.async ------------------------------------------------------------------ */
__device__ __forceinline__ void qs_cp_async16(void *smem, const void *gmem, bool valid QS_PTX_SITE)
{
#ifdef QS_CUDA_EMU
    if (!qs_emu::in_shared(smem, 16))
        qs_emu::trap("cp.async destination is not in shared memory", qs_file, qs_line);
    if ((uintptr_t)smem % 16 || (valid && (uintptr_t)gmem % 16))
        qs_emu::trap("cp.async of 16 bytes with an address not 16-byte aligned", qs_file, qs_line);
    if (valid && qs_emu::in_shared(gmem, 1))
        qs_emu::trap("cp.async source is shared memory (it must be global)", qs_file, qs_line);
    qs_emu_cp_async_copy(smem, gmem, valid ? 16u : 0u);
    qs_emu::cp_async_issue(smem, gmem, valid ? 16u : 0u);
#else
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
                 "r"(valid ? 16 : 0)
                 : "memory");
#endif
}

__device__ __forceinline__ void qs_cp_async_commit(QS_PTX_SITE_ONLY)
{
#ifdef QS_CUDA_EMU
    (void)qs_file, (void)qs_line;
    qs_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

/* Waits until at most N of this thread's most recent committed groups are
 * pending. Other threads' copies need a __syncthreads after it. */
template <int N> __device__ __forceinline__ void qs_cp_async_wait(QS_PTX_SITE_ONLY)
{
#ifdef QS_CUDA_EMU
    (void)qs_file, (void)qs_line;
    void *d;
    const void *s;
    unsigned sb;
    while (qs_emu::cp_async_complete((unsigned)N, &d, &s, &sb))
        qs_emu_cp_async_copy(d, s, sb);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

/* ---- ldmatrix ---------------------------------------------------------------------- */
#ifdef QS_CUDA_EMU
template <int NUM>
__device__ __forceinline__ void qs_emu_ldmatrix(uint32_t *r, const void *smem, const char *file,
                                                int line)
{
    union row16 {
        uint4 v;
        uint32_t w[4];
    };
    const unsigned lane = qs_emu::g_lane;
    row16 mine;
    mine.v = make_uint4(0, 0, 0, 0);
    if (lane < 8u * NUM) { /* the lanes that give row addresses */
        if (!qs_emu::in_shared(smem, 16))
            qs_emu::trap("ldmatrix row address is not in shared memory", file, line);
        if ((uintptr_t)smem % 16)
            qs_emu::trap("ldmatrix row address is not 16-byte aligned", file, line);
        mine.v = *reinterpret_cast<const uint4 *>(smem);
    }
    row16 rows[32];
    unsigned got = qs_emu::warp_collective(qs_emu::W_LDMATRIX, 0xffffffffu, &mine, rows,
                                           sizeof mine, file, line);
    if (got != 0xffffffffu)
        qs_emu::trap("ldmatrix needs all 32 lanes of the warp (.aligned)", file, line);
    for (int j = 0; j < NUM; j++)
        r[j] = rows[8 * j + (lane >> 2)].w[lane & 3];
}
#endif

__device__ __forceinline__ void qs_ldmatrix_x4(uint32_t r[4], const void *smem QS_PTX_SITE)
{
#ifdef QS_CUDA_EMU
    qs_emu_ldmatrix<4>(r, smem, qs_file, qs_line);
#else
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s)
                 : "memory");
#endif
}

__device__ __forceinline__ void qs_ldmatrix_x2(uint32_t r[2], const void *smem QS_PTX_SITE)
{
#ifdef QS_CUDA_EMU
    qs_emu_ldmatrix<2>(r, smem, qs_file, qs_line);
#else
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(s)
                 : "memory");
#endif
}

/* ---- mma.sync ------------------------------------------------------------------------- */
__device__ __forceinline__ void qs_mma_s8_16832(int32_t d[4], const uint32_t a[4],
                                                const uint32_t b[2] QS_PTX_SITE)
{
#ifdef QS_CUDA_EMU
    qs_emu::mma_s8_m16n8k32(a, b, d, d, qs_file, qs_line);
#else
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ void qs_mma_s4_16864(int32_t d[4], const uint32_t a[4],
                                                const uint32_t b[2] QS_PTX_SITE)
{
#ifdef QS_CUDA_EMU
    qs_emu::mma_s4_m16n8k64(a, b, d, d, qs_file, qs_line);
#else
    asm volatile("mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

#endif
