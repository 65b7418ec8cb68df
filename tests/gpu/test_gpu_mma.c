/* test_gpu_mma.c: the fused dequantize + tensor-core path (and the
 * qs_cuda_bcq_matmul dispatcher) against qs_lutgemm_ref_f64: q = 1..8, every
 * g, ragged N and K, batches 16 and 64 (and 9, 100 and 1: ragged M), both CTA
 * heights (bm = 16, 64), chosen and forced K-splits. Bound: relative L2 <= 2e-3 (weights rounded to
 * fp16 in shared memory, ~2e-4, plus the fp16 rounding of Y, ~3e-4). Output poisoned with NaN
 * before each run. Skips (77) without a GPU. */
#include "gpu_test.h"

#define MMA_BOUND 2e-3

int main(void)
{
    gt_need_gpu();
    tu_seed("test_gpu_mma");
    static const size_t Ms[] = {16, 64, 9, 100, 1};
    for (size_t s = 0; s < GT_NSHAPES; s++)
        for (unsigned q = 1; q <= 8; q++) {
            size_t M = Ms[(q + s) % 5];
            gt_bcq_case(gt_shapes[s].N, gt_shapes[s].K, q, gt_shapes[s].g, M,
                        (q + s) % 2 ? GT_MMA16 : GT_MMA64, NULL, MMA_BOUND);
        }
    for (size_t i = 0; i < 5; i++) {
        gt_bcq_case(1000, 4128, 3, 32, Ms[i], GT_MMA16, NULL, MMA_BOUND);
        gt_bcq_case(1000, 4128, 3, 32, Ms[i], GT_MMA64, NULL, MMA_BOUND);
        gt_bcq_case(129, 1000, 4, 0, Ms[i], GT_MATMUL, NULL, MMA_BOUND);
    }
    gt_bcq_case(4100, 1024, 3, 128, 256, GT_MATMUL, NULL, MMA_BOUND);
    /* Forced K-splits: groups straddle split boundaries, ragged K. */
    static const unsigned sps[] = {1, 2, 3, 7};
    for (size_t i = 0; i < 4; i++) {
        qs_cuda_lut_cfg c = {0, sps[i], 0};
        gt_bcq_case(1000, 4128, 3, 32, 16, GT_MMA16, &c, MMA_BOUND);
        gt_bcq_case(513, 2048, 5, 128, 17, GT_MMA64, &c, MMA_BOUND);
        gt_bcq_case(129, 1000, 2, 0, 9, GT_MMA16, &c, MMA_BOUND);
    }
    gt_x_off = 1; /* X not 16-byte aligned */
    gt_bcq_case(1000, 4096, 3, 64, 16, GT_MMA16, NULL, MMA_BOUND);
    gt_bcq_case(300, 384, 4, 128, 64, GT_MMA64, NULL, MMA_BOUND);
    gt_x_off = 0;
    return gt_summary("test_gpu_mma");
}
