/* qs_cuda.h: the GPU kernels for the BCQ-with-offset format (LUT-GEMM), the
 * fused dequantize + tensor-core path for larger batches, and the two
 * baselines the LUT-GEMM paper compares with (cuBLAS fp16 on dequantized
 * weights; an OPTQ-style dequantizing 3-bit GEMV). Plain C, no CUDA headers:
 * device pointers are void *, streams are cudaStream_t passed as void *
 * (NULL = the legacy default stream). To be merged into qs_kernels.h.
 *
 * All GEMMs: X is M x K fp16 row-major, Y is M x N fp16 row-major, both in
 * device memory, Y = X W^T, products and sums in fp32, Y rounded once.
 * Every function returns a qs_err (QS_ENODEV / QS_EINTERNAL with the CUDA
 * error string in qs_errmsg(), QS_EINVAL for bad arguments). Launches are
 * asynchronous on the stream; launch errors are checked, execution errors
 * surface at the next synchronizing call (qs_cuda_sync). */
#ifndef QS_CUDA_H
#define QS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "qs_kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Small device helpers (for tests and benchmarks written in C) -------- */
int qs_cuda_malloc(void **p, size_t bytes);
void qs_cuda_free(void *p); /* NULL is fine */
int qs_cuda_h2d(void *dst, const void *src, size_t bytes);
int qs_cuda_d2h(void *dst, const void *src, size_t bytes);
/* Sets every byte to v (0xFF makes every fp16 a NaN: output poisoning). */
int qs_cuda_memset(void *p, int v, size_t bytes);
/* cudaDeviceSynchronize + the last error, as a qs_err. */
int qs_cuda_sync(void);
/* Multiprocessor count of the current device (0 and a message on error). */
int qs_cuda_sm_count(void);

/* ---- BCQ weights on the device --------------------------------------------
 * The host qs_bcq is re-ordered at upload for coalesced 16-byte loads:
 *
 *   bits   uint4 (4 x uint32) [nc][q][N]: nc = ceil(nw / 4) chunks of 128
 *          columns; element (c, i, n) holds words 4c..4c+3 of plane i of row
 *          n (bit j of word w = column 32w + j, 1 = +1, as on the host);
 *          words past nw are 0.
 *   alpha  fp16 [ngroups][q][N]      z  fp16 [ngroups][N]
 *
 * Why: a warp's 32 threads own 32 consecutive rows, so one plane of one
 * 128-column chunk is one 512-byte coalesced load (16 bytes per thread,
 * LDG.128), and the scales of one (group, plane) are 64 contiguous bytes.
 * The host's 32-row tile order serves the AVX2 byte transpose and would cost
 * a gather on the GPU. The tensor-core path reads the same arrays (a tile of
 * 64 rows x 128 columns is q contiguous 1 KiB runs). Bytes on the device:
 * q*N*4*nc*4 + (q+1)*N*ngroups*2, at most 96 columns per row of padding over
 * the host size (none when K is a multiple of 128).
 *
 * Each handle owns a split-K workspace of QS_CUDA_WS_ROWS * N fp32 (so at
 * most QS_CUDA_WS_ROWS / M K-splits; 6 MiB at N = 12288): calls on one
 * handle must be ordered (one stream, or synced). */
#define QS_CUDA_WS_ROWS 128
typedef struct qs_cuda_bcq {
    size_t N, K;
    unsigned q;
    size_t g;       /* 0 = whole row */
    size_t ngroups; /* K / g, or 1 */
    size_t nw, nc;  /* words per row, 128-column chunks per row */
    void *bits;     /* uint4 [nc][q][N] */
    void *alpha;    /* fp16 [ngroups][q][N] */
    void *z;        /* fp16 [ngroups][N] */
    void *ws;       /* fp32 workspace, QS_CUDA_WS_ROWS * N */
    size_t bytes;   /* device bytes of bits + alpha + z */
} qs_cuda_bcq;

/* Bytes of the three device arrays for a shape (0 on an invalid shape). */
size_t qs_cuda_bcq_bytes(size_t N, size_t K, unsigned q, size_t g);
/* Host-side re-ordering into the device layout (arrays sized as above);
 * exposed so that the layout can be checked without a GPU. */
int qs_cuda_bcq_pack(const qs_bcq *w, uint32_t *bits, uint16_t *alpha, uint16_t *z);
/* Allocates device arrays for a shape (contents undefined). */
int qs_cuda_bcq_alloc(qs_cuda_bcq *d, size_t N, size_t K, unsigned q, size_t g);
/* Allocates and copies a host qs_bcq into the device layout. */
int qs_cuda_bcq_upload(qs_cuda_bcq *d, const qs_bcq *w);
/* Random contents for benchmarks: random bits (0 past K), alpha in
 * [0.005, 0.015) / 2^(q-1-i), z in [-0.01, 0.01). Deterministic in seed. */
int qs_cuda_bcq_fill_random(qs_cuda_bcq *d, uint64_t seed, void *stream);
/* Frees; safe on a zeroed or freed struct. */
void qs_cuda_bcq_free(qs_cuda_bcq *d);
/* Dequantizes into a row-major N x K fp16 device matrix (for cuBLAS). */
int qs_cuda_bcq_dequant_f16(const qs_cuda_bcq *d, void *W, void *stream);

/* ---- LUT-GEMM (batch M = 1..8) ----------------------------------------------
 * mu = 8: per 128-column slice, each CTA builds 16 tables of the 256 signed
 * sums of 8 inputs (fp32, [chunk][pattern][m]) in shared memory once, and
 * all its rows (one per thread) read them; K is split across CTAs, partial
 * sums reduced in a second kernel. Tile sizes are template parameters; the
 * chooser picks them from (M, N, K, q) and the SM count. */
typedef struct qs_cuda_lut_cfg {
    unsigned threads;     /* rows per CTA = threads: 128 or 256 */
    unsigned splits;      /* K splits (CTAs along K), 1..64/M, <= 128-column slices */
    unsigned half_tables; /* 1: fp16 tables, tokens in pairs (half the shared memory
                             and look-up traffic; entries rounded to fp16, ~3e-4
                             relative); ignored at M = 1. The chooser says 0. */
} qs_cuda_lut_cfg;

/* The chooser (pure host code; sm_count 0 = ask the device). */
int qs_cuda_lut_choose(size_t M, size_t N, size_t K, unsigned q, int sm_count,
                       qs_cuda_lut_cfg *cfg);
/* Y = X W^T for M = 1..8. cfg NULL = the chooser's pick. */
int qs_cuda_lutgemm(qs_cuda_bcq *w, const void *X, size_t M, void *Y, void *stream,
                    const qs_cuda_lut_cfg *cfg);
/* The LUT kernel's algorithm run on the host (same layout, table builder,
 * look-ups, split order; fp32 X and Y, no device): checks the layout and
 * the table arithmetic where no GPU is present. */
int qs_cuda_lutgemm_emulate(const qs_bcq *w, const float *X, size_t M, unsigned splits,
                            int half_tables, float *Y);

/* ---- Fused dequantize + tensor cores (any M; meant for M > 8) ---------------
 * Per CTA (8 warps) a tile of W (128 rows for bm = 16, 64 for bm = 64) x 128
 * columns is dequantized from the bit-planes into shared memory as fp16 and
 * multiplied with WMMA (HMMA m16n16k16, fp32 accumulators); no fp16 copy of
 * W exists in device memory. bm: 16 or 64 rows of X per CTA, 0 = choose (16
 * when M <= 16). splits: K-splits (partial sums reduced as in LUT-GEMM),
 * 0 = choose (qs_cuda_mma_splits); splits * M <= QS_CUDA_WS_ROWS. */
int qs_cuda_bcq_gemm_mma(qs_cuda_bcq *w, const void *X, size_t M, void *Y, void *stream,
                         unsigned bm, unsigned splits);
/* The K-splits the tensor-core path picks (sm_count 0 = ask the device). */
int qs_cuda_mma_splits(size_t M, size_t N, size_t K, unsigned bm, int sm_count);

/* The serving entry: LUT-GEMM for M <= the crossover (default 8), the
 * tensor-core path above it. */
int qs_cuda_bcq_matmul(qs_cuda_bcq *w, const void *X, size_t M, void *Y, void *stream);
/* Sets the crossover (0..8; 0 = always the tensor-core path), process-wide;
 * qbench_gpu reports both paths at M <= 8 to pick it per device. */
int qs_cuda_set_lut_max_m(unsigned m);

/* ---- Baselines ------------------------------------------------------------- */
/* cuBLAS: Y = X W^T with W an N x K row-major fp16 device matrix,
 * cublasGemmEx with CUBLAS_COMPUTE_32F. One handle per thread, created on
 * first use (bound to the device current then). */
int qs_cuda_gemm_f16_cublas(const void *W, const void *X, size_t M, size_t N, size_t K, void *Y,
                            void *stream);

/* OPTQ-style uniform 3-bit weights, dequantized in registers:
 *   codes  uint32 [nb][3][N], nb = ceil(K / 32): the 32 3-bit codes of one
 *          row and 32-column block packed little-endian into 96 bits
 *          (code j at bits 3j..3j+2, crossing words), words 0..2;
 *   scale  fp16 [ngroups][N], zero fp16 [ngroups][N] (the zero point zp),
 *   w = scale * (code - zp). */
typedef struct qs_cuda_u3 {
    size_t N, K, g, ngroups, nb;
    void *codes, *scale, *zero;
    void *ws; /* fp32 split-K workspace, QS_CUDA_WS_ROWS * N */
    size_t bytes;
} qs_cuda_u3;

/* From a host qs_rtn with q == 3 (scale and zp rounded to fp16). */
int qs_cuda_u3_upload(qs_cuda_u3 *d, const qs_rtn *r);
int qs_cuda_u3_alloc(qs_cuda_u3 *d, size_t N, size_t K, size_t g);
int qs_cuda_u3_fill_random(qs_cuda_u3 *d, uint64_t seed, void *stream);
void qs_cuda_u3_free(qs_cuda_u3 *d);
/* Y = X W^T, M = 1..8. */
int qs_cuda_u3_gemv(qs_cuda_u3 *d, const void *X, size_t M, void *Y, void *stream);

#ifdef __cplusplus
}
#endif
#endif /* QS_CUDA_H */
