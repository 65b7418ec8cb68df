/* test_gpu_quant.c: the device quantizers (qs_cuda_bcq_quantize, qs_cuda_rtn_quantize) and
 * the device synthetic fill (qs_cuda_synth_fill) against the CPU on the same inputs.
 *
 * Weights: Gaussian (sd 0.02) and outlier-laden (Student-t, nu = 3, plus two 10-sigma weights
 * per row) and degenerate rows (all zero, constant, three values); ragged N; K a multiple of 32 for
 * g = 32, 64, 128, and row-wise (g = 0) with K ragged, both a warp's group (K <= 1024) and a CTA's
 * (K > 1024); q = 1..8. The device result is downloaded, checked for zero padding (columns past K,
 * words past nw) and unpacked from the device layout into a host qs_bcq, then:
 *
 * - RTN: equal to qs_bcq_from_rtn bit for bit, everywhere (both compute in float the same
 *   way: min/max are exact, float division and nearbyintf are correctly rounded, and the
 *   fp16 conversions round to nearest even; nvcc's FMA contraction has nothing to fuse).
 * - BCQ: the reconstruction error sum (W - W^)^2 at most QU_MARGIN over qs_bcq_quantize's
 *   plus QU_FLOOR of the weights' energy sum W^2; at most QU_DIFF of the (row, group)s (plus
 *   one) with other fp16 alphas, z or bits than the CPU's (not asked of the degenerate rows,
 *   whose systems are singular but for the ridge: there rounding moves the scales along the
 *   null direction, ~1e12 times amplified, and not the levels); every group no worse than RTN's
 *   in plain squared error (the fit's own guarantee; 1e-9 for the two summation orders).
 *   Why not bit for bit: the device sums a group's terms in a tree over its threads, the CPU
 *   in column order, so the sums differ in the last bits (~1e-16 relative), and nvcc
 *   contracts products and sums into FMAs where the CPU build does not. A code moves only
 *   where a weight sits within that of a midpoint between two levels, or an fp16 rounding of
 *   alpha or z, or the convergence test, within it of a tie; that group's alternating fit
 *   then follows another path to another local optimum, a few percent away in that group's
 *   error, either side. The floor is for fits that are exact up to their fp16 scales (the
 *   degenerate rows, ~3e-8 to 9e-8 of the energy): two of those differ by about the fp16
 *   rounding of the levels, (2^-11)^2 of the energy, either way. Measured: under the harness
 *   (no FMA) 1 group of 9540 differed over 6 seeds, with the same error; with the device
 *   code built with -mfma -ffp-contract=fast (FMA where nvcc would put it), 2 groups of
 *   random weights of 28920 over 20 seeds (at most one per case), and up to 2 of 6
 *   degenerate ones per case; the random weights' errors moved by < 4e-6, the degenerate
 *   rows' by < 1e-9 of their energy. A fit cut to 3 iterations fails both checks.
 * - Both: qs_cuda_lutgemm on the device weights against qs_lutgemm_ref_f64 of the downloaded
 *   ones (the layout is the one the kernels read), relative L2 <= 1e-3 as in test_gpu_lutgemm.
 *
 * Synthetic fill: a slice (rows r0.., columns c0.., rows ld apart) of each kind against
 * qs_synth_value: bit for bit under the harness (glibc's log and cos on both sides), within
 * 1 ulp on a GPU (libdevice's double log and cos may differ from glibc's in the last bit of
 * the double, which moves the float by at most one ulp); the gaps between rows untouched.
 *
 * The same unstaged (QS_QUANT_STAGE_MAX=1: weights read from global memory each pass).
 *
 * Errors: a NaN or Inf weight is QS_EINVAL naming its place and leaves the handle freed; bad
 * shapes and fill arguments are QS_EINVAL. Skips (77) without a GPU. */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include <stdarg.h>

#include "gpu_test.h"
#include "qs_synth.h"

#define QU_MARGIN 5e-3    /* BCQ error over the CPU's, relative */
#define QU_FLOOR  0x1p-22 /* ... plus this much of the weights' energy */
#define QU_DIFF   0.05    /* (row, group)s that may differ from the CPU's (plus one) */
#define QU_LUT    1e-3    /* LUT-GEMM relative L2, as test_gpu_lutgemm */

/* The device arrays of d, downloaded. */
typedef struct dev_bcq {
    uint32_t *bits;
    uint16_t *alpha, *z;
    size_t bb, ab, zb;
} dev_bcq;

static int download(const qs_cuda_bcq *d, dev_bcq *h)
{
    h->bb = (size_t)d->q * d->N * d->nc * 16, h->ab = (size_t)d->q * d->N * d->ngroups * 2;
    h->zb = d->N * d->ngroups * 2;
    h->bits = gt_alloc(h->bb), h->alpha = gt_alloc(h->ab), h->z = gt_alloc(h->zb);
    int err = qs_cuda_d2h(h->bits, d->bits, h->bb);
    if (!err)
        err = qs_cuda_d2h(h->alpha, d->alpha, h->ab);
    if (!err)
        err = qs_cuda_d2h(h->z, d->z, h->zb);
    return err;
}

static void dev_free(dev_bcq *h)
{
    free(h->bits), free(h->alpha), free(h->z);
    memset(h, 0, sizeof *h);
}

/* The host-layout copy of device arrays (the inverse of qs_cuda_bcq_pack); counts set bits
 * past K and non-zero words past nw into *pad. */
static int unpack(const qs_cuda_bcq *d, const dev_bcq *h, qs_bcq *w, size_t *pad)
{
    int err = qs_bcq_init(w, d->N, d->K, d->q, d->g);
    if (err)
        return err;
    size_t N = d->N, q = d->q, nw = d->nw;
    *pad = 0;
    for (size_t c = 0; c < d->nc; c++)
        for (size_t i = 0; i < q; i++)
            for (size_t n = 0; n < N; n++)
                for (size_t j = 0; j < 4; j++) {
                    size_t wi = 4 * c + j;
                    uint32_t v = h->bits[((c * q + i) * N + n) * 4 + j];
                    if (wi >= nw) {
                        *pad += v != 0;
                        continue;
                    }
                    if (wi == nw - 1 && d->K % 32 && v >> (d->K % 32))
                        (*pad)++;
                    w->bits[qs_bcq_word_index(w, (unsigned)i, n, wi)] = v;
                }
    for (size_t gi = 0; gi < d->ngroups; gi++)
        for (size_t n = 0; n < N; n++) {
            for (size_t i = 0; i < q; i++)
                w->alpha[qs_bcq_alpha_index(w, (unsigned)i, n, gi)] =
                    h->alpha[(gi * q + i) * N + n];
            w->z[qs_bcq_z_index(w, n, gi)] = h->z[gi * N + n];
        }
    return QS_OK;
}

/* (row, group)s whose alphas, z and bit words are the same in two device-layout copies. */
static size_t same_groups(const qs_cuda_bcq *d, const dev_bcq *a, const dev_bcq *b)
{
    size_t N = d->N, q = d->q, gs = d->g ? d->g : d->K, same = 0;
    for (size_t n = 0; n < N; n++)
        for (size_t gi = 0; gi < d->ngroups; gi++) {
            int eq = a->z[gi * N + n] == b->z[gi * N + n];
            for (size_t i = 0; i < q && eq; i++) {
                size_t p = (gi * q + i) * N + n;
                eq = a->alpha[p] == b->alpha[p];
                for (size_t wi = gi * gs / 32; eq && wi < (gi * gs + gs + 31) / 32; wi++) {
                    size_t x = ((wi / 4 * q + i) * N + n) * 4 + wi % 4;
                    eq = a->bits[x] == b->bits[x];
                }
            }
            same += eq;
        }
    return same;
}

/* Squared error of w against W per (row, group) into E (N x ngroups); returns the sum. */
static double group_err(const qs_bcq *w, const float *W, double *E)
{
    size_t N = w->N, K = w->K, ng = qs_bcq_ngroups(K, w->g), gs = w->g ? w->g : K;
    double *D = gt_alloc(N * K * sizeof(double)), tot = 0;
    qs_bcq_dequant_f64(w, D);
    for (size_t n = 0; n < N; n++)
        for (size_t gi = 0; gi < ng; gi++) {
            double e = 0;
            for (size_t k = gi * gs; k < gi * gs + gs; k++)
                e += (W[n * K + k] - D[n * K + k]) * (W[n * K + k] - D[n * K + k]);
            E[n * ng + gi] = e;
            tot += e;
        }
    free(D);
    return tot;
}

/* dist 0: Gaussian; 1: Student-t with two 10-sigma weights a row; 2: degenerate rows (all
 * zero, constant, three values: constant planes, singular systems, tied levels). */
static void fill_weights(float *W, size_t N, size_t K, int dist)
{
    static const float three[3] = {-0.01f, 0.0f, 0.015f};
    for (size_t i = 0; i < N * K; i++)
        W[i] = dist == 2 ? (i / K % 3 == 0   ? 0.0f
                            : i / K % 3 == 1 ? 0.01f
                                             : three[tu_u64() % 3])
                         : (float)(0.02 * (dist ? tu_student(3) : tu_gauss()));
    if (dist == 1)
        for (size_t n = 0; n < N; n++)
            for (int j = 0; j < 2; j++)
                W[n * K + tu_u64() % K] = (tu_u64() & 1 ? 0.2f : -0.2f);
}

static void verdict(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void verdict(int ok, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("%s ", ok ? "ok  " : "FAIL");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    gt_cases++;
    if (!ok)
        gt_failures++;
}

/* The device weights through LUT-GEMM against the float64 product of their download. */
static void lut_check(const char *what, qs_cuda_bcq *d, const qs_bcq *w, size_t M)
{
    size_t N = w->N, K = w->K;
    uint16_t *Xh = gt_alloc(M * K * 2), *Yh = gt_alloc(M * N * 2);
    float *Xf = gt_alloc(M * K * 4);
    double *R = gt_alloc(M * N * 8);
    void *dX = NULL, *dY = NULL;
    char name[160];
    snprintf(name, sizeof name, "%s lutgemm M=%zu", what, M);
    gt_random_x(M * K, Xh, Xf);
    GT_OK(qs_lutgemm_ref_f64(w, Xf, M, R));
    GT_OK(qs_cuda_malloc(&dX, M * K * 2));
    GT_OK(qs_cuda_malloc(&dY, M * N * 2));
    GT_OK(qs_cuda_h2d(dX, Xh, M * K * 2));
    GT_OK(qs_cuda_memset(dY, 0xFF, M * N * 2));
    GT_OK(qs_cuda_lutgemm(d, dX, M, dY, NULL, NULL));
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(Yh, dY, M * N * 2));
    gt_check(name, Yh, R, M * N, QU_LUT);
out:
    qs_cuda_free(dX), qs_cuda_free(dY);
    free(Xh), free(Yh), free(Xf), free(R);
}

/* One shape and q: the BCQ fit and RTN on the device against the CPU's on the same W. */
static void quant_case(size_t N, size_t K, unsigned q, size_t g, int dist, size_t M)
{
    size_t ng = qs_bcq_ngroups(K, g), pad = 0;
    float *W = gt_alloc(N * K * 4);
    double *Ed = gt_alloc(N * ng * 8), *Ec = gt_alloc(N * ng * 8), *Er = gt_alloc(N * ng * 8);
    void *dW = NULL;
    qs_cuda_bcq d = {0}, dr = {0};
    qs_bcq cpu = {0}, rtn = {0}, hw = {0}, hr = {0};
    dev_bcq got = {0}, want = {0}, gotr = {0};
    char what[128];
    static const char *dists[] = {"gauss", "outliers", "degenerate"};
    snprintf(what, sizeof what, "N=%zu K=%zu q=%u g=%zu %s", N, K, q, g, dists[dist]);
    fill_weights(W, N, K, dist);
    GT_OK(qs_cuda_malloc(&dW, N * K * 4));
    GT_OK(qs_cuda_h2d(dW, W, N * K * 4));

    /* RTN: bit for bit. */
    GT_OK(qs_cuda_rtn_quantize(&dr, dW, N, K, q, g, NULL));
    GT_OK(qs_bcq_from_rtn(&rtn, W, N, K, q, g));
    GT_OK(download(&dr, &gotr));
    want.bb = gotr.bb, want.ab = gotr.ab, want.zb = gotr.zb;
    want.bits = gt_alloc(want.bb), want.alpha = gt_alloc(want.ab), want.z = gt_alloc(want.zb);
    GT_OK(qs_cuda_bcq_pack(&rtn, want.bits, want.alpha, want.z));
    verdict(!memcmp(gotr.bits, want.bits, want.bb) && !memcmp(gotr.alpha, want.alpha, want.ab) &&
                !memcmp(gotr.z, want.z, want.zb),
            "%-40s rtn equal to qs_bcq_from_rtn bit for bit", what);
    GT_OK(unpack(&dr, &gotr, &hr, &pad));
    double er = group_err(&rtn, W, Er);

    /* BCQ: error within the margin, most groups identical, none worse than RTN. */
    GT_OK(qs_cuda_bcq_quantize(&d, dW, N, K, q, g, 0, NULL));
    GT_OK(qs_bcq_quantize(&cpu, W, N, K, q, g, 0));
    GT_OK(download(&d, &got));
    GT_OK(qs_cuda_bcq_pack(&cpu, want.bits, want.alpha, want.z));
    size_t pad2 = 0;
    GT_OK(unpack(&d, &got, &hw, &pad2));
    verdict(pad == 0 && pad2 == 0, "%-40s padding zero (%zu, %zu bad words)", what, pad, pad2);
    double ed = group_err(&hw, W, Ed), ec = group_err(&cpu, W, Ec), en = 0;
    for (size_t i = 0; i < N * K; i++)
        en += (double)W[i] * W[i];
    size_t same = same_groups(&d, &got, &want), worse = 0;
    for (size_t i = 0; i < N * ng; i++)
        worse += Ed[i] > Er[i] * (1 + 1e-9) + 1e-30;
    verdict(ed <= ec * (1 + QU_MARGIN) + QU_FLOOR * en &&
                (dist == 2 || (double)(N * ng - same) <= QU_DIFF * (double)(N * ng) + 1) &&
                worse == 0,
            "%-40s bcq err/cpu-1 %+.1e (<= %.0e), err %.1e of energy, /rtn %.3f, same %zu/%zu, "
            "worse than rtn %zu",
            what, ec > 0 ? ed / ec - 1 : 0, QU_MARGIN, en > 0 ? ed / en : 0, er > 0 ? ed / er : 0,
            same, N * ng, worse);
    lut_check(what, &d, &hw, M);
    if (q == 3 || q == 8)
        lut_check("  rtn", &dr, &hr, M);
out:
    qs_cuda_free(dW);
    qs_cuda_bcq_free(&d), qs_cuda_bcq_free(&dr);
    qs_bcq_close(&cpu), qs_bcq_close(&rtn), qs_bcq_close(&hw), qs_bcq_close(&hr);
    dev_free(&got), dev_free(&want), dev_free(&gotr);
    free(W), free(Ed), free(Ec), free(Er);
}

/* ULPs between two floats (the same sign: the values here are never near zero together). */
static uint32_t ulps(float a, float b)
{
    int32_t x, y;
    memcpy(&x, &a, 4), memcpy(&y, &b, 4);
    if ((x < 0) != (y < 0))
        return a == b ? 0 : UINT32_MAX;
    return x > y ? (uint32_t)(x - y) : (uint32_t)(y - x);
}

static void synth_case(uint64_t cols, uint64_t r0, uint64_t nr, uint64_t c0, uint64_t nc,
                       uint64_t ld, int kind, uint64_t outliers)
{
    const uint64_t key = tu_u64();
    const size_t n = (size_t)(nr * ld);
    float *Wd = gt_alloc(n * 4);
    void *dW = NULL;
    GT_OK(qs_cuda_malloc(&dW, n * 4));
    GT_OK(qs_cuda_memset(dW, 0xFF, n * 4));
    GT_OK(qs_cuda_synth_fill(dW, key, cols, r0, nr, c0, nc, ld, kind, outliers, NULL));
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(Wd, dW, n * 4));
    uint32_t worst = 0;
    size_t gaps = 0;
    for (uint64_t i = 0; i < nr; i++)
        for (uint64_t j = 0; j < ld; j++) {
            float v = Wd[i * ld + j];
            if (j >= nc) {
                uint32_t b;
                memcpy(&b, &v, 4);
                gaps += b != 0xFFFFFFFFu;
                continue;
            }
            float h = qs_synth_value(key, (r0 + i) * cols + c0 + j, c0 + j, kind, outliers);
            uint32_t u = ulps(v, h);
            worst = u > worst ? u : worst;
        }
    uint32_t allowed = qs_cuda_emulated() ? 0 : 1;
    verdict(worst <= allowed && gaps == 0,
            "synth kind %d rows %llu+%llu cols %llu+%llu of %llu ld %llu: worst %u ulp (<= %u), "
            "%zu gap floats written",
            kind, (unsigned long long)r0, (unsigned long long)nr, (unsigned long long)c0,
            (unsigned long long)nc, (unsigned long long)cols, (unsigned long long)ld, worst,
            allowed, gaps);
out:
    qs_cuda_free(dW);
    free(Wd);
}

static void error_cases(void)
{
    const size_t N = 9, K = 96;
    float *W = gt_alloc(N * K * 4);
    void *dW = NULL;
    qs_cuda_bcq d = {0};
    fill_weights(W, N, K, 0);
    W[5 * K + 17] = NAN;
    GT_OK(qs_cuda_malloc(&dW, N * K * 4));
    GT_OK(qs_cuda_h2d(dW, W, N * K * 4));
    int e1 = qs_cuda_bcq_quantize(&d, dW, N, K, 3, 32, 0, NULL);
    verdict(e1 == QS_EINVAL && strstr(qs_errmsg(), "[5, 17]") && !d.bits,
            "NaN weight: bcq QS_EINVAL naming [5, 17], handle freed (%s)", qs_errmsg());
    W[5 * K + 17] = 1, W[8 * K + 95] = INFINITY;
    GT_OK(qs_cuda_h2d(dW, W, N * K * 4));
    int e2 = qs_cuda_rtn_quantize(&d, dW, N, K, 2, 0, NULL);
    verdict(e2 == QS_EINVAL && strstr(qs_errmsg(), "[8, 95]") && !d.bits,
            "Inf weight: rtn QS_EINVAL naming [8, 95], handle freed (%s)", qs_errmsg());
    verdict(qs_cuda_bcq_quantize(&d, dW, N, K, 3, 64, 0, NULL) == QS_EINVAL &&
                qs_cuda_rtn_quantize(&d, dW, N, K, 9, 32, NULL) == QS_EINVAL &&
                qs_cuda_bcq_quantize(&d, NULL, N, K, 3, 32, 0, NULL) == QS_EINVAL,
            "bad shapes (g not dividing K, q = 9, no weights): QS_EINVAL");
    verdict(qs_cuda_synth_fill(dW, 1, 96, 0, 9, 0, 96, 96, 3, 0, NULL) == QS_EINVAL &&
                qs_cuda_synth_fill(dW, 1, 96, 0, 9, 10, 90, 96, 0, 0, NULL) == QS_EINVAL &&
                qs_cuda_synth_fill(dW, 1, 96, 0, 9, 0, 96, 95, 0, 0, NULL) == QS_EINVAL &&
                qs_cuda_synth_fill(NULL, 1, 96, 0, 9, 0, 96, 96, 0, 0, NULL) == QS_EINVAL &&
                qs_cuda_synth_fill(NULL, 1, 96, 0, 0, 0, 96, 96, 0, 0, NULL) == QS_OK,
            "bad fills (kind 3, columns past the tensor, ld < nc, NULL): QS_EINVAL; none: OK");
out:
    qs_cuda_free(dW);
    free(W);
}

typedef struct qu_shape {
    size_t N, K, g;
} qu_shape;

int main(void)
{
    gt_need_gpu();
    tu_seed("test_gpu_quant");
    const int emu = qs_cuda_emulated();
    /* Warp teams (g = 32, 64, 128; row-wise K = 77, 525), a CTA team (row-wise 1060). */
    static const qu_shape emu_shapes[] = {
        {37, 128, 32}, {29, 256, 64}, {19, 384, 128}, {21, 77, 0}, {5, 525, 0}, {2, 1060, 0},
    };
    /* On a GPU also long rows: a CTA team staged (12288) and read from global memory
     * (60000 columns are past any GPU's shared memory per CTA). */
    static const qu_shape gpu_shapes[] = {
        {1000, 4096, 128}, {300, 4128, 32}, {129, 1000, 0}, {64, 12288, 0}, {8, 60000, 0},
    };
    const size_t ne = sizeof emu_shapes / sizeof emu_shapes[0];
    const size_t ngpu = emu ? 0 : sizeof gpu_shapes / sizeof gpu_shapes[0];
    for (size_t s = 0; s < ne + ngpu; s++) {
        const qu_shape *sh = s < ne ? &emu_shapes[s] : &gpu_shapes[s - ne];
        for (unsigned q = 1; q <= 8; q++) {
            /* Under the harness a group's cost grows as 2^q (the levels): half the rows per
             * bit past 3, odd and at least 3. */
            size_t N = sh->N;
            if (emu && q > 3)
                N = (N >> (q - 3) | 1) < 3 ? (N < 3 ? N : 3) : N >> (q - 3) | 1;
            quant_case(N, sh->K, q, sh->g, (int)((q + s) % 2), 1 + (q + 3 * s) % 8);
        }
    }
    /* Weights read from global memory every pass (what rows too long for shared memory do,
     * over 53K columns on an H100): staging forbidden, a warp's groups and a CTA's row. */
    setenv("QS_QUANT_STAGE_MAX", "1", 1);
    quant_case(13, 256, 3, 64, 1, 3);
    quant_case(3, 1060, 2, 0, 0, 2);
    quant_case(2, 1060, 5, 0, 1, 5);
    unsetenv("QS_QUANT_STAGE_MAX");
    /* Degenerate rows at every q, grouped and row-wise. */
    for (unsigned q = 1; q <= 8; q++) {
        quant_case(6, 128, q, 64, 2, q);
        quant_case(6, 100, q, 0, 2, 9 - q);
    }
    /* Synthetic slices: weights of a 300 x 1000 tensor (rows 100.., columns 77..), a bias
     * row, norm gains with outlier columns, a whole row-major tensor. */
    synth_case(1000, 100, 37, 77, 300, 320, QS_SYNTH_WEIGHT, 0);
    synth_case(4100, 0, 1, 0, 4100, 4100, QS_SYNTH_BIAS, 0);
    synth_case(576, 0, 1, 0, 576, 576, QS_SYNTH_NORM, 6);
    synth_case(576, 3, 2, 1, 575, 600, QS_SYNTH_NORM, 6);
    synth_case(257, 0, 129, 0, 257, 257, QS_SYNTH_WEIGHT, 0);
    error_cases();
    return gt_summary("test_gpu_quant");
}
