/* ptx_kernels.cu: kernels for test_emu_ptx.c, the self-test of the PTX
 * wrappers' emulations (kernels/cuda/ptx.cuh). The fragment layouts here
 * are written out again from the PTX ISA's tables, independently of the
 * emulation (tests/cuda-emu/runtime/tensor.cpp, ptx.cuh), and the host
 * compares the results with plain matrix products. Each case is an
 * extern "C" function returning the first CUDA error it met. Written as
 * any project .cu file is, so nvcc builds it too (sm_80). */
#include <cuda_runtime.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_compat.cuh"
#include "ptx.cuh"

#define CK(call)                                                                                   \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess)                                                                     \
            return e_;                                                                             \
    } while (0)

static cudaError_t finish(void)
{
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return e;
    return cudaDeviceSynchronize();
}

/* Byte (r, c) of a row-major matrix with `ld` bytes per row, as 4 bytes. */
__device__ __forceinline__ uint32_t pack4(const int8_t *p)
{
    return (uint32_t)(uint8_t)p[0] | (uint32_t)(uint8_t)p[1] << 8 | (uint32_t)(uint8_t)p[2] << 16 |
           (uint32_t)(uint8_t)p[3] << 24;
}

/* ---- mma.sync m16n8k32 s8 from registers built by the PTX ISA's tables ----------
 * A 16 x 32 row-major, W 8 x 32 (B = W^T: row n of W is column n of B),
 * C and D 16 x 8 row-major int32. */
__global__ void mma_from_table(const int8_t *A, const int8_t *W, const int32_t *C, int32_t *D)
{
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    uint32_t a[4], b[2];
    /* A: a0 row g, cols 4t..4t+3; a1 row g+8; a2 row g, cols +16; a3 row g+8, +16 */
    a[0] = pack4(A + g * 32 + 4 * t);
    a[1] = pack4(A + (g + 8) * 32 + 4 * t);
    a[2] = pack4(A + g * 32 + 4 * t + 16);
    a[3] = pack4(A + (g + 8) * 32 + 4 * t + 16);
    /* B: b0 rows (k) 4t..4t+3 of column (n) g; b1 rows +16 */
    b[0] = pack4(W + g * 32 + 4 * t);
    b[1] = pack4(W + g * 32 + 4 * t + 16);
    /* C/D: c0, c1 row g, cols 2t, 2t+1; c2, c3 row g+8 */
    int32_t d[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t],
                    C[(g + 8) * 8 + 2 * t + 1]};
    qs_mma_s8_16832(d, a, b);
    D[g * 8 + 2 * t] = d[0], D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2], D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

extern "C" cudaError_t ptx_mma(const int8_t *A, const int8_t *W, const int32_t *C, int32_t *D)
{
    int8_t *da, *dw;
    int32_t *dc, *dd;
    CK(cudaMalloc(&da, 16 * 32));
    CK(cudaMalloc(&dw, 8 * 32));
    CK(cudaMalloc(&dc, 16 * 8 * 4));
    CK(cudaMalloc(&dd, 16 * 8 * 4));
    CK(cudaMemcpy(da, A, 16 * 32, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dw, W, 8 * 32, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dc, C, 16 * 8 * 4, cudaMemcpyHostToDevice));
    QS_LAUNCH(1, 32, 0, 0, mma_from_table)(da, dw, dc, dd);
    cudaError_t e = finish();
    if (e == cudaSuccess)
        e = cudaMemcpy(D, dd, 16 * 8 * 4, cudaMemcpyDeviceToHost);
    cudaFree(da), cudaFree(dw), cudaFree(dc), cudaFree(dd);
    return e;
}

/* ---- mma.sync m16n8k64 s4 from registers built by the PTX ISA's tables ----------
 * A 16 x 64 and W 8 x 64 as one value (-8..7) per byte, packed here into
 * the registers: element i of a register is nibble i (low first). */
__device__ __forceinline__ uint32_t pack8_s4(const int8_t *p)
{
    uint32_t r = 0;
    for (int i = 0; i < 8; i++)
        r |= ((uint32_t)(uint8_t)p[i] & 15u) << (4 * i);
    return r;
}

__global__ void mma_s4_from_table(const int8_t *A, const int8_t *W, const int32_t *C, int32_t *D)
{
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    uint32_t a[4], b[2];
    /* A: a0 row g, cols 8t..8t+7; a1 row g+8; a2 row g, cols +32; a3 row g+8, +32 */
    a[0] = pack8_s4(A + g * 64 + 8 * t);
    a[1] = pack8_s4(A + (g + 8) * 64 + 8 * t);
    a[2] = pack8_s4(A + g * 64 + 8 * t + 32);
    a[3] = pack8_s4(A + (g + 8) * 64 + 8 * t + 32);
    /* B: b0 rows (k) 8t..8t+7 of column (n) g; b1 rows +32 */
    b[0] = pack8_s4(W + g * 64 + 8 * t);
    b[1] = pack8_s4(W + g * 64 + 8 * t + 32);
    int32_t d[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t],
                    C[(g + 8) * 8 + 2 * t + 1]};
    qs_mma_s4_16864(d, a, b);
    D[g * 8 + 2 * t] = d[0], D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2], D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

extern "C" cudaError_t ptx_mma_s4(const int8_t *A, const int8_t *W, const int32_t *C, int32_t *D)
{
    int8_t *da, *dw;
    int32_t *dc, *dd;
    CK(cudaMalloc(&da, 16 * 64));
    CK(cudaMalloc(&dw, 8 * 64));
    CK(cudaMalloc(&dc, 16 * 8 * 4));
    CK(cudaMalloc(&dd, 16 * 8 * 4));
    CK(cudaMemcpy(da, A, 16 * 64, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dw, W, 8 * 64, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dc, C, 16 * 8 * 4, cudaMemcpyHostToDevice));
    QS_LAUNCH(1, 32, 0, 0, mma_s4_from_table)(da, dw, dc, dd);
    cudaError_t e = finish();
    if (e == cudaSuccess)
        e = cudaMemcpy(D, dd, 16 * 8 * 4, cudaMemcpyDeviceToHost);
    cudaFree(da), cudaFree(dw), cudaFree(dc), cudaFree(dd);
    return e;
}

/* Packed nibbles (A 16 x 128 and W 16 x 128, 64 bytes a row, element 2i
 * low and 2i+1 high in byte i) through the s8 path's ldmatrix.x4 calls
 * into two k64 steps of s4 mma: D = A W^T 16 x 16, as w4a4_gpu.cu's sm_80
 * path takes its fragments (without its swizzle). */
__global__ void ldsm_mma_s4(const uint8_t *A, const uint8_t *W, int32_t *D)
{
    QS_SHARED_ALIGNED(16, uint8_t, As, [16 * 64]);
    QS_SHARED_ALIGNED(16, uint8_t, Ws, [16 * 64]);
    const int lane = threadIdx.x;
    for (int i = lane; i < 16 * 64; i += 32)
        As[i] = A[i], Ws[i] = W[i];
    __syncwarp();
    int32_t acc[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
    for (int ks = 0; ks < 2; ks++) {
        uint32_t a[4], t[4];
        const int ra = (lane & 7) + ((lane >> 3) & 1) * 8, ca = ks * 32 + (lane >> 4) * 16;
        qs_ldmatrix_x4(a, As + ra * 64 + ca);
        const int rb = (lane & 7) + (lane >> 4) * 8, cb = ks * 32 + ((lane >> 3) & 1) * 16;
        qs_ldmatrix_x4(t, Ws + rb * 64 + cb);
        const uint32_t b0[2] = {t[0], t[1]}, b1[2] = {t[2], t[3]};
        qs_mma_s4_16864(acc[0], a, b0);
        qs_mma_s4_16864(acc[1], a, b1);
    }
    const int g = lane >> 2, tt = lane & 3;
    for (int j = 0; j < 2; j++) {
        D[g * 16 + j * 8 + 2 * tt] = acc[j][0], D[g * 16 + j * 8 + 2 * tt + 1] = acc[j][1];
        D[(g + 8) * 16 + j * 8 + 2 * tt] = acc[j][2];
        D[(g + 8) * 16 + j * 8 + 2 * tt + 1] = acc[j][3];
    }
}

extern "C" cudaError_t ptx_ldsm_s4(const uint8_t *A, const uint8_t *W, int32_t *D)
{
    uint8_t *da, *dw;
    int32_t *dd;
    CK(cudaMalloc(&da, 16 * 64));
    CK(cudaMalloc(&dw, 16 * 64));
    CK(cudaMalloc(&dd, 16 * 16 * 4));
    CK(cudaMemcpy(da, A, 16 * 64, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dw, W, 16 * 64, cudaMemcpyHostToDevice));
    QS_LAUNCH(1, 32, 0, 0, ldsm_mma_s4)(da, dw, dd);
    cudaError_t e = finish();
    if (e == cudaSuccess)
        e = cudaMemcpy(D, dd, 16 * 16 * 4, cudaMemcpyDeviceToHost);
    cudaFree(da), cudaFree(dw), cudaFree(dd);
    return e;
}

/* ---- ldmatrix: which lane receives which bytes of which row ---------------------
 * 32 rows of 16 bytes in shared memory at a stride of 48 bytes; lane l gives
 * the address of row perm[l]. out[l * 4 + j] = register j of lane l. */
__global__ void ldmatrix_rows(const uint4 *rows, const int *perm, int num, uint32_t *out)
{
    QS_SHARED_ALIGNED(16, uint4, s, [32 * 3]);
    const int lane = threadIdx.x;
    s[lane * 3] = rows[lane];
    s[lane * 3 + 1] = make_uint4(0, 0, 0, 0), s[lane * 3 + 2] = make_uint4(0, 0, 0, 0);
    __syncwarp();
    uint32_t r[4] = {0, 0, 0, 0};
    const uint4 *p = &s[perm[lane] * 3];
    if (num == 4)
        qs_ldmatrix_x4(r, p);
    else
        qs_ldmatrix_x2(r, p);
    for (int j = 0; j < 4; j++)
        out[lane * 4 + j] = r[j];
}

extern "C" cudaError_t ptx_ldmatrix(int num, const uint8_t *rows, const int *perm, uint32_t *out)
{
    uint4 *dr;
    int *dp;
    uint32_t *dout;
    CK(cudaMalloc(&dr, 32 * 16));
    CK(cudaMalloc(&dp, 32 * 4));
    CK(cudaMalloc(&dout, 32 * 4 * 4));
    CK(cudaMemcpy(dr, rows, 32 * 16, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dp, perm, 32 * 4, cudaMemcpyHostToDevice));
    QS_LAUNCH(1, 32, 0, 0, ldmatrix_rows)(dr, dp, num, dout);
    cudaError_t e = finish();
    if (e == cudaSuccess)
        e = cudaMemcpy(out, dout, 32 * 4 * 4, cudaMemcpyDeviceToHost);
    cudaFree(dr), cudaFree(dp), cudaFree(dout);
    return e;
}

/* ---- The GEMM's composition: cp.async -> ldmatrix.x4 -> mma -----------------------
 * A 16 x 64 (rows past m_valid zero-filled by cp.async), W 16 x 64 (two
 * n8 tiles), D = A W^T 16 x 16, two k32 steps; the fragments taken as
 * kernels/cuda/w8a8_gpu.cu takes them (without its swizzle). */
__global__ void cp_ldsm_mma(const int8_t *A, const int8_t *W, int m_valid, int32_t *D)
{
    QS_SHARED_ALIGNED(16, int8_t, As, [16 * 64]);
    QS_SHARED_ALIGNED(16, int8_t, Ws, [16 * 64]);
    const int lane = threadIdx.x;
    for (int c = lane; c < 64; c += 32) { /* 16 rows x 4 chunks each */
        const int r = c >> 2, ch = c & 3;
        qs_cp_async16(As + r * 64 + ch * 16, A + (r < m_valid ? r : 0) * 64 + ch * 16, r < m_valid);
        qs_cp_async16(Ws + r * 64 + ch * 16, W + r * 64 + ch * 16, true);
    }
    qs_cp_async_commit();
    qs_cp_async_wait<0>();
    __syncwarp();
    int32_t acc[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
    for (int ks = 0; ks < 2; ks++) {
        uint32_t a[4], t[4];
        const int ra = (lane & 7) + ((lane >> 3) & 1) * 8, ca = ks * 32 + (lane >> 4) * 16;
        qs_ldmatrix_x4(a, As + ra * 64 + ca);
        const int rb = (lane & 7) + (lane >> 4) * 8, cb = ks * 32 + ((lane >> 3) & 1) * 16;
        qs_ldmatrix_x4(t, Ws + rb * 64 + cb);
        const uint32_t b0[2] = {t[0], t[1]}, b1[2] = {t[2], t[3]};
        qs_mma_s8_16832(acc[0], a, b0);
        qs_mma_s8_16832(acc[1], a, b1);
    }
    const int g = lane >> 2, tt = lane & 3;
    for (int j = 0; j < 2; j++) {
        D[g * 16 + j * 8 + 2 * tt] = acc[j][0], D[g * 16 + j * 8 + 2 * tt + 1] = acc[j][1];
        D[(g + 8) * 16 + j * 8 + 2 * tt] = acc[j][2];
        D[(g + 8) * 16 + j * 8 + 2 * tt + 1] = acc[j][3];
    }
}

extern "C" cudaError_t ptx_pipeline(const int8_t *A, const int8_t *W, int m_valid, int32_t *D)
{
    int8_t *da, *dw;
    int32_t *dd;
    CK(cudaMalloc(&da, 16 * 64));
    CK(cudaMalloc(&dw, 16 * 64));
    CK(cudaMalloc(&dd, 16 * 16 * 4));
    CK(cudaMemcpy(da, A, 16 * 64, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dw, W, 16 * 64, cudaMemcpyHostToDevice));
    QS_LAUNCH(1, 32, 0, 0, cp_ldsm_mma)(da, dw, m_valid, dd);
    cudaError_t e = finish();
    if (e == cudaSuccess)
        e = cudaMemcpy(D, dd, 16 * 16 * 4, cudaMemcpyDeviceToHost);
    cudaFree(da), cudaFree(dw), cudaFree(dd);
    return e;
}

/* ---- cp.async groups: wait_group N leaves the N most recent pending -------------------
 * Thread t copies chunk t of each of three groups; after wait<1> the first
 * two groups are read by the neighbour thread (after a barrier), the third
 * after wait<0>. out: the 3 x 64 chunks as read. */
__global__ void cp_groups(const uint4 *src, uint4 *out)
{
    QS_SHARED_ALIGNED(16, uint4, s, [3 * 64]);
    const int t = threadIdx.x;
    for (int gi = 0; gi < 3; gi++) {
        qs_cp_async16(&s[gi * 64 + t], &src[gi * 64 + t], true);
        qs_cp_async_commit();
    }
    qs_cp_async_wait<1>();
    __syncthreads();
    out[t ^ 1] = s[t ^ 1], out[64 + (t ^ 1)] = s[64 + (t ^ 1)];
    qs_cp_async_wait<0>();
    __syncthreads();
    out[128 + (t ^ 1)] = s[128 + (t ^ 1)];
}

extern "C" cudaError_t ptx_cp_groups(const uint8_t *src, uint8_t *out)
{
    uint4 *ds, *dout;
    CK(cudaMalloc(&ds, 3 * 64 * 16));
    CK(cudaMalloc(&dout, 3 * 64 * 16));
    CK(cudaMemcpy(ds, src, 3 * 64 * 16, cudaMemcpyHostToDevice));
    QS_LAUNCH(1, 64, 0, 0, cp_groups)(ds, dout);
    cudaError_t e = finish();
    if (e == cudaSuccess)
        e = cudaMemcpy(out, dout, 3 * 64 * 16, cudaMemcpyDeviceToHost);
    cudaFree(ds), cudaFree(dout);
    return e;
}

/* ---- Misuses, one per kernel --------------------------------------------------------------- */

/* Reads another thread's cp.async destination before that thread waited:
 * the third group is still in flight after wait<1>. */
__global__ void fault_cp_unwaited(const uint4 *src, uint4 *out)
{
    QS_SHARED_ALIGNED(16, uint4, s, [3 * 64]);
    const int t = threadIdx.x;
    for (int gi = 0; gi < 3; gi++) {
        qs_cp_async16(&s[gi * 64 + t], &src[gi * 64 + t], true);
        qs_cp_async_commit();
    }
    qs_cp_async_wait<1>();
    __syncthreads();
    out[t ^ 1] = s[128 + (t ^ 1)]; /* group 2: needs wait<0> and a barrier first */
    qs_cp_async_wait<0>();
}

/* Refills a buffer that other threads are still reading (no barrier). */
__global__ void fault_cp_refill(const uint4 *src, uint4 *out)
{
    QS_SHARED_ALIGNED(16, uint4, s, [64]);
    const int t = threadIdx.x;
    qs_cp_async16(&s[t], &src[t], true);
    qs_cp_async_commit();
    qs_cp_async_wait<0>();
    __syncthreads();
    out[t] = s[t ^ 1];
    qs_cp_async16(&s[t], &src[64 + t], true); /* needs __syncthreads() above */
    qs_cp_async_commit();
    qs_cp_async_wait<0>();
}

__global__ void fault_ldmatrix_misaligned(uint32_t *out)
{
    QS_SHARED_ALIGNED(16, uint8_t, s, [32 * 16 + 16]);
    const int lane = threadIdx.x;
    for (int i = lane; i < 32 * 16 + 16; i += 32)
        s[i] = (uint8_t)i;
    __syncwarp();
    uint32_t r[4];
    qs_ldmatrix_x4(r, s + lane * 16 + 4); /* 4 bytes past the 16-byte boundary */
    out[lane] = r[0];
}

__global__ void fault_ldmatrix_global(const uint4 *g, uint32_t *out)
{
    uint32_t r[4];
    qs_ldmatrix_x4(r, g + threadIdx.x); /* global memory: ldmatrix reads .shared */
    out[threadIdx.x] = r[0];
}

__global__ void fault_mma_partial(int32_t *out)
{
    uint32_t a[4] = {1, 1, 1, 1}, b[2] = {1, 1};
    int32_t d[4] = {0, 0, 0, 0};
    qs_mma_s8_16832(d, a, b); /* a block of 16 threads: half a warp */
    out[threadIdx.x] = d[0];
}

__global__ void fault_mma_s4_partial(int32_t *out)
{
    uint32_t a[4] = {1, 1, 1, 1}, b[2] = {1, 1};
    int32_t d[4] = {0, 0, 0, 0};
    qs_mma_s4_16864(d, a, b); /* a block of 16 threads: half a warp */
    out[threadIdx.x] = d[0];
}

__global__ void fault_mma_divergent(int32_t *out)
{
    uint32_t a[4] = {1, 1, 1, 1}, b[2] = {1, 1};
    int32_t d[4] = {0, 0, 0, 0};
    if (threadIdx.x < 16)
        qs_mma_s8_16832(d, a, b);
    else
        qs_mma_s8_16832(d, a, b); /* another call site: the warp diverged */
    out[threadIdx.x] = d[0];
}

extern "C" cudaError_t ptx_fault(int which)
{
    uint4 *src;
    uint32_t *o;
    CK(cudaMalloc(&src, 3 * 64 * 16));
    CK(cudaMalloc(&o, 3 * 64 * 16));
    CK(cudaMemset(src, 1, 3 * 64 * 16));
    switch (which) {
    case 0:
        QS_LAUNCH(1, 64, 0, 0, fault_cp_unwaited)(src, (uint4 *)o);
        break;
    case 1:
        QS_LAUNCH(1, 64, 0, 0, fault_cp_refill)(src, (uint4 *)o);
        break;
    case 2:
        QS_LAUNCH(1, 32, 0, 0, fault_ldmatrix_misaligned)(o);
        break;
    case 3:
        QS_LAUNCH(1, 32, 0, 0, fault_ldmatrix_global)(src, o);
        break;
    case 4:
        QS_LAUNCH(1, 16, 0, 0, fault_mma_partial)((int32_t *)o);
        break;
    case 5:
        QS_LAUNCH(1, 32, 0, 0, fault_mma_divergent)((int32_t *)o);
        break;
    case 6:
        QS_LAUNCH(1, 16, 0, 0, fault_mma_s4_partial)((int32_t *)o);
        break;
    }
    return finish(); /* frees fail while a fault is sticky; the test resets */
}
