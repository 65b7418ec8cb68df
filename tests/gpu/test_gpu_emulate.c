/* test_gpu_emulate.c: the parts of the GPU kernels that need no GPU, so that
 * they are checked on every machine (this test never skips):
 *   - the device layout (qs_cuda_bcq_pack): dequantizing from the packed
 *     arrays with the documented indexing gives qs_bcq_dequant exactly;
 *   - the LUT kernel's algorithm on the host (qs_cuda_lutgemm_emulate: same
 *     slices, table builder, look-ups, scale fetches, split order) against
 *     qs_lutgemm_ref_f64: relative L2 <= 1e-5 (fp32 throughout), q = 1..8,
 *     every g, ragged N and K, batches 1..8, 1 to many K-splits; the same
 *     with fp16 tables (tokens in pairs): <= 1e-3 (entries rounded to fp16);
 *   - the chooser's configurations are valid (threads 128/256, splits >= 1,
 *     splits * M <= 64, splits <= 128-column slices) for the OPT-175B shapes
 *     and the test shapes on 108- and 132-SM devices; printed for the notes. */
#include "gpu_test.h"

static void layout_case(size_t N, size_t K, unsigned q, size_t g)
{
    qs_bcq w = {0};
    size_t nw = (K + 31) / 32, nc = (nw + 3) / 4, ng = g ? K / g : 1, gs = g ? g : K;
    uint32_t *bits = gt_alloc(q * N * nc * 16);
    uint16_t *alpha = gt_alloc(q * N * ng * 2), *z = gt_alloc(N * ng * 2);
    float *Wf = gt_alloc(N * K * 4);
    size_t bad = 0;
    GT_OK(gt_random_bcq(&w, N, K, q, g));
    GT_OK(qs_bcq_dequant(&w, Wf));
    GT_OK(qs_cuda_bcq_pack(&w, bits, alpha, z));
    if (qs_cuda_bcq_bytes(N, K, q, g) != q * N * nc * 16 + (q + 1) * N * ng * 2)
        bad++;
    for (size_t n = 0; n < N; n++)
        for (size_t k = 0; k < K; k++) {
            size_t gi = k / gs, wi = k / 32;
            double v = qs_fp16_to_fp32(z[gi * N + n]);
            for (unsigned i = 0; i < q; i++) {
                double a = qs_fp16_to_fp32(alpha[(gi * q + i) * N + n]);
                uint32_t wd = bits[(((wi / 4) * q + i) * N + n) * 4 + wi % 4];
                v += (wd >> (k % 32) & 1) ? a : -a;
            }
            bad += (float)v != Wf[n * K + k];
        }
    for (size_t wi = nw; wi < nc * 4; wi++) /* padding words are zero */
        for (unsigned i = 0; i < q; i++)
            for (size_t n = 0; n < N; n++)
                bad += bits[(((wi / 4) * q + i) * N + n) * 4 + wi % 4] != 0;
    gt_cases++;
    gt_failures += bad != 0;
    printf("%s layout N=%zu K=%zu q=%u g=%zu: %zu mismatches\n", bad ? "FAIL" : "ok  ", N, K, q, g,
           bad);
out:
    qs_bcq_close(&w);
    free(bits), free(alpha), free(z), free(Wf);
}

static void emulate_case(size_t N, size_t K, unsigned q, size_t g, size_t M, unsigned splits,
                         int half)
{
    qs_bcq w = {0};
    float *X = gt_alloc(M * K * 4), *Y = gt_alloc(M * N * 4);
    double *R = gt_alloc(M * N * 8);
    uint16_t *Xh = gt_alloc(M * K * 2);
    char what[128];
    snprintf(what, sizeof what, "emulate%s N=%zu K=%zu q=%u g=%zu M=%zu sp=%u", half ? "-h" : "", N,
             K, q, g, M, splits);
    GT_OK(gt_random_bcq(&w, N, K, q, g));
    gt_random_x(M * K, Xh, X);
    GT_OK(qs_lutgemm_ref_f64(&w, X, M, R));
    for (size_t i = 0; i < M * N; i++)
        Y[i] = NAN;
    GT_OK(qs_cuda_lutgemm_emulate(&w, X, M, splits, half, Y));
    gt_cases++;
    double rel = tu_rel_l2(Y, R, M * N), bound = half && M > 1 ? 1e-3 : 1e-5;
    int ok = rel <= bound; /* NaN fails too */
    gt_failures += !ok;
    printf("%s %-48s rel_l2 %.3e (bound %.0e)\n", ok ? "ok  " : "FAIL", what, rel, bound);
out:
    qs_bcq_close(&w);
    free(X), free(Y), free(R), free(Xh);
}

static void chooser_case(size_t M, size_t N, size_t K, unsigned q, int sm, int print)
{
    qs_cuda_lut_cfg c;
    size_t nc = ((K + 31) / 32 + 3) / 4;
    int err = qs_cuda_lut_choose(M, N, K, q, sm, &c);
    int ok = !err && (c.threads == 128 || c.threads == 256) && c.splits >= 1 &&
             c.splits * M <= 64 && c.splits <= nc;
    gt_cases++;
    gt_failures += !ok;
    if (print || !ok)
        printf("%s chooser sm=%d M=%zu N=%zu K=%zu q=%u -> threads %u splits %u (CTAs %zu)\n",
               ok ? "ok  " : "FAIL", sm, M, N, K, q, c.threads, c.splits,
               ((N + c.threads - 1) / c.threads) * c.splits);
}

int main(void)
{
    tu_seed("test_gpu_emulate");
    for (size_t s = 0; s < GT_NSHAPES; s++)
        layout_case(gt_shapes[s].N, gt_shapes[s].K, 1 + (unsigned)s % 8, gt_shapes[s].g);
    for (size_t s = 0; s < GT_NSHAPES; s++)
        for (unsigned q = 1; q <= 8; q++) {
            size_t K = gt_shapes[s].K, M = 1 + (3 * q + s) % 8, nc = ((K + 31) / 32 + 3) / 4;
            size_t most = 64 / M < nc ? 64 / M : nc;
            unsigned sp = (unsigned)(q % 3 == 0 ? 1 : q % 3 == 1 ? most : (most + 1) / 2);
            emulate_case(gt_shapes[s].N, K, q, gt_shapes[s].g, M, sp, 0);
            emulate_case(gt_shapes[s].N, K, q, gt_shapes[s].g, M, sp, 1);
        }
    static const size_t opt[4][2] = {
        {12288, 12288}, {36864, 12288}, {49152, 12288}, {12288, 49152}};
    for (int sm = 108; sm <= 132; sm += 24)
        for (int i = 0; i < 4; i++)
            for (size_t M = 1; M <= 8; M *= 2)
                chooser_case(M, opt[i][0], opt[i][1], 3, sm, sm == 132);
    for (size_t s = 0; s < GT_NSHAPES; s++)
        for (size_t M = 1; M <= 8; M++)
            for (unsigned q = 1; q <= 8; q++)
                chooser_case(M, gt_shapes[s].N, gt_shapes[s].K, q, 132, 0);
    return gt_summary("test_gpu_emulate");
}
