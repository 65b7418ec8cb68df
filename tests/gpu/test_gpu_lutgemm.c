/* test_gpu_lutgemm.c: the CUDA LUT-GEMM (batch 1..8) against the float64
 * product of the dequantized weights (qs_lutgemm_ref_f64): q = 1..8, g in
 * {32, 64, 128, row-wise}, ragged N and K, every batch 1..8, the chooser's
 * configuration and forced ones (128/256 rows per CTA, no split, the most
 * splits), and fp16 tables (tokens in pairs). Bound: relative L2 <= 1e-3
 * (fp32 tables and sums; the fp16 rounding of Y alone is ~3e-4), 2e-3 with
 * fp16 tables. Output poisoned with NaN before each run.
 * --quick: a few cases (the compute-sanitizer run). Skips (77) without GPU. */
#include "gpu_test.h"

#define LUT_BOUND      1e-3
#define LUT_BOUND_HALF 2e-3 /* fp16 tables: ~3e-4 more */

int main(int argc, char **argv)
{
    int quick = argc > 1 && !strcmp(argv[1], "--quick");
    gt_need_gpu();
    tu_seed("test_gpu_lutgemm");
    if (quick) {
        qs_cuda_lut_cfg c = {128, 2, 0};
        gt_bcq_case(37, 96, 3, 32, 3, GT_LUT, NULL, LUT_BOUND);
        gt_bcq_case(129, 1000, 4, 0, 8, GT_LUT, NULL, LUT_BOUND);
        gt_bcq_case(300, 384, 8, 128, 1, GT_LUT, &c, LUT_BOUND);
        gt_bcq_case(1000, 4128, 2, 32, 5, GT_LUT, NULL, LUT_BOUND);
        return gt_summary("test_gpu_lutgemm --quick");
    }
    /* Every shape, every q, a batch that walks 1..8 with q and the shape. */
    for (size_t s = 0; s < GT_NSHAPES; s++)
        for (unsigned q = 1; q <= 8; q++)
            gt_bcq_case(gt_shapes[s].N, gt_shapes[s].K, q, gt_shapes[s].g, 1 + (3 * q + s) % 8,
                        GT_LUT, NULL, LUT_BOUND);
    /* Every batch at two shapes, q = 3 and 4. */
    for (size_t M = 1; M <= 8; M++) {
        gt_bcq_case(1000, 4128, 3, 32, M, GT_LUT, NULL, LUT_BOUND);
        gt_bcq_case(4100, 1024, 4, 128, M, GT_LUT, NULL, LUT_BOUND);
    }
    /* Forced configurations: both CTA sizes, one split and the most splits
     * (groups then straddle split boundaries), K-splits over ragged K. */
    const unsigned th[2] = {128, 256};
    for (int t = 0; t < 2; t++)
        for (size_t M = 1; M <= 8; M += 3) {
            size_t nc = (4128 / 32 + 3) / 4, most = 64 / M < nc ? 64 / M : nc;
            qs_cuda_lut_cfg one = {th[t], 1, 0}, many = {th[t], (unsigned)most, 0},
                            odd = {th[t], 3, 0};
            gt_bcq_case(1000, 4128, 3, 32, M, GT_LUT, &one, LUT_BOUND);
            gt_bcq_case(1000, 4128, 5, 32, M, GT_LUT, &many, LUT_BOUND);
            gt_bcq_case(513, 2048, 3, 128, M, GT_LUT, &odd, LUT_BOUND);
            gt_bcq_case(129, 1000, 2, 0, M, GT_LUT, &odd, LUT_BOUND);
        }
    /* fp16 tables (tokens in pairs): every batch 2..8, both CTA sizes,
     * 1 to 4 splits, at most the shape's 128-column slices (300 x 384 has 3). */
    for (size_t M = 2; M <= 8; M++) {
        unsigned sp = (unsigned)(1 + M % 4);
        qs_cuda_lut_cfg h = {M % 2 ? 128 : 256, sp, 1}, h3 = {h.threads, sp < 3 ? sp : 3, 1};
        gt_bcq_case(1000, 4128, 3, 32, M, GT_LUT, &h, LUT_BOUND_HALF);
        gt_bcq_case(129, 1000, 1 + (unsigned)M % 8, 0, M, GT_LUT, &h, LUT_BOUND_HALF);
        gt_bcq_case(300, 384, 8, 128, M, GT_LUT, &h3, LUT_BOUND_HALF);
    }
    /* X not 16-byte aligned: the scalar input path at K % 8 == 0. */
    gt_x_off = 1;
    gt_bcq_case(1000, 4096, 3, 64, 3, GT_LUT, NULL, LUT_BOUND);
    gt_bcq_case(300, 384, 4, 128, 8, GT_LUT, NULL, LUT_BOUND);
    gt_x_off = 0;
    return gt_summary("test_gpu_lutgemm");
}
