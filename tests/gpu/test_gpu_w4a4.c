/* test_gpu_w4a4.c: W4A4 (Atom) on the device (qs_cuda_w4_upload,
 * qs_cuda_w4a4_gemm, the activation codes and the fused norm) against the
 * CPU's: fresh random codes each run (INT4 -7..7, the outliers -127..127,
 * qs_w4_from_codes; one case through qs_w4_quantize), random permutations
 * (one identity), fp16 X whose outlier channels are 30x the rest. Both
 * tensor-core paths on every case (qs_cuda_w4.mma: 4 = mma.sync m16n8k64
 * s4, sm_80's; 8 = the codes unpacked to int8 for m16n8k32, sm_90's).
 * Shapes: ragged N (37, 129, 300); K4 with a ragged last group (300 - 20:
 * groups 128, 128, 24) and not a multiple of 8 (77); groups 128, 64, 40 and
 * 8 (padded to 64 positions), 192 (three 32-byte steps: K-splits cut it);
 * ko 0, 5, 20, 32 and ko = K (no INT4 part); M = 1, 3, 16 (decode tile), 37
 * (64-row tile), 130 (128-row tile, two M tiles); forced K-splits 2 and 3;
 * X off its 4-byte alignment; a token with an Inf (its outputs NaN, the
 * others exact). Output poisoned with 0xFF (NaN) before each run.
 *
 * Checks, per case:
 *   - the device's activation codes and scales (read back from the
 *     workspace) equal qs_w4_quant_act's bit for bit, padding zero;
 *   - every output within  tol = 2^-11 (|ref| + e) + e + 2^-25  of
 *     qs_w4a4_gemm_ref_f64, e = (ngroups + 20) 2^-24 B, B = sum_j |sx xq_j|
 *     |sw wq_j| (the scales of j's group). Why: on the CPU's codes the
 *     integer sums are exact; what is left is fp32 rounding (int32 ->
 *     fp32 exact below 2^24, sx * sw and one fma per group, up to 16 split
 *     partials: at most ngroups + 20 roundings of at most 2^-24 of partial
 *     sums that B bounds) and the one fp16 rounding of Y;
 *   - and within 2 tol of the CPU's fp32 kernel qs_w4a4_gemm.
 * Also: the norm with the codes fused in (qs_cuda_add_norm_w4) against
 * qs_cuda_add_norm + qs_cuda_w4_quant_act bit for bit, their codes against
 * qs_w4_quant_act on y, and the GEMM on them (qs_cuda_w4a4_gemm_act)
 * against qs_cuda_w4a4_gemm on y bit for bit; the refusals; the bank model
 * of the GEMM's shared-memory accesses (the W8A8 swizzle: conflict-free).
 * Skips (77) without a GPU; under the harness (test_gpu_w4a4_emu) the same
 * cases run on the CPU, the large ones only on a GPU. */
#include "gpu_test.h"

#ifdef QS_CUDA_EMU
#include <qs_emu_api.h>
#endif

typedef struct w4_case {
    size_t N, K, ko, group, M;
    unsigned splits; /* 0: the chooser's */
    size_t xoff;     /* halves by which X starts past a 4-byte boundary */
    long inf_row;    /* -1, or the token that holds an Inf */
    int identity;    /* perm NULL */
    int quantize;    /* qs_w4_quantize from fp32 weights, not random codes */
} w4_case;

static const char *path_name(unsigned mma)
{
    return mma == 4 ? "s4" : mma == 8 ? "s8" : "dev";
}

/* A random permutation of 0..K-1. */
static void random_perm(uint32_t *perm, size_t K)
{
    for (size_t j = 0; j < K; j++)
        perm[j] = (uint32_t)j;
    for (size_t j = K; j > 1; j--) {
        size_t i = (size_t)(tu_u64() % j);
        uint32_t t = perm[j - 1];
        perm[j - 1] = perm[i], perm[i] = t;
    }
}

/* A matrix for a case: random codes and scales, or quantized weights. */
static int make_w4(qs_w4 *w, const w4_case *c, const uint32_t *perm)
{
    const size_t N = c->N, K = c->K, K4 = K - c->ko, G = c->group ? c->group : 128;
    const size_t ng = K4 ? (K4 + G - 1) / G : 0;
    int err;
    if (c->quantize) {
        float *W = gt_alloc(N * K * 4);
        for (size_t i = 0; i < N * K; i++)
            W[i] = (float)(0.05 * tu_gauss());
        err = qs_w4_quantize(w, W, N, K, perm, c->ko, c->group);
        free(W);
        return err;
    }
    int8_t *codes = gt_alloc(N * K);
    float *s4 = gt_alloc(N * (ng + 1) * 4), *s8 = gt_alloc(N * 4);
    for (size_t n = 0; n < N; n++) {
        for (size_t j = 0; j < K; j++)
            codes[n * K + j] =
                (int8_t)(j < K4 ? (int)(tu_u64() % 15) - 7 : (int)(tu_u64() % 255) - 127);
        for (size_t g = 0; g < ng; g++)
            s4[n * ng + g] = (float)(0.01 * (0.5 + tu_unif()));
        s8[n] = (float)(0.001 * (0.5 + tu_unif()));
    }
    err = qs_w4_from_codes(w, codes, s4, s8, N, K, perm, c->ko, c->group);
    free(codes), free(s4), free(s8);
    return err;
}

/* fp16 X (M x K, original order): Gaussian, token magnitudes uneven, the
 * outlier channels (perm[K4..]) 30x. */
static void make_x(const w4_case *c, const uint32_t *perm, uint16_t *Xh, float *Xf)
{
    const size_t M = c->M, K = c->K, K4 = K - c->ko;
    float *big = gt_alloc(K * 4);
    for (size_t k = 0; k < K; k++)
        big[k] = 1;
    for (size_t j = K4; j < K; j++)
        big[perm ? perm[j] : j] = 30;
    for (size_t m = 0; m < M; m++)
        for (size_t k = 0; k < K; k++)
            Xh[m * K + k] = qs_fp32_to_fp16((float)(tu_gauss() * (1 + m % 5) * big[k]));
    if (c->inf_row >= 0)
        Xh[(size_t)c->inf_row * K + K / 2] = 0x7c00;
    for (size_t i = 0; i < M * K; i++)
        Xf[i] = qs_fp16_to_fp32(Xh[i]);
    free(big);
}

/* Device codes (xq rows of kd bytes, sx rows of ng + 1) against the CPU's
 * (position order, sx [ng], sxo): the number of codes and scales that
 * differ, padding included. */
static void compare_codes(const qs_cuda_w4 *d, size_t M, const uint8_t *xq, const float *sx,
                          const int8_t *cq, const float *cs, const float *cso, size_t *code_bad,
                          size_t *scale_bad)
{
    const size_t K = d->K, K4 = K - d->ko, G = d->group, ng = d->ngroups, gp = d->gp;
    const size_t kd = d->kd, off8 = d->off8;
    for (size_t m = 0; m < M; m++) {
        const uint8_t *r = xq + m * kd;
        uint8_t *want = gt_alloc(kd);
        for (size_t j = 0; j < K4; j++) {
            const size_t g = j / G, p = j % G;
            want[g * gp / 2 + p / 2] |= (uint8_t)(((unsigned)cq[m * K + j] & 15u) << (4 * (p & 1)));
        }
        for (size_t j = K4; j < K; j++)
            want[off8 + j - K4] = (uint8_t)cq[m * K + j];
        for (size_t i = 0; i < kd; i++)
            *code_bad += r[i] != want[i];
        free(want);
        for (size_t g = 0; g <= ng; g++) {
            const float a = sx[m * (ng + 1) + g], b = g < ng ? cs[m * ng + g] : cso[m];
            *scale_bad += isnan(b) ? !isnan(a) : memcmp(&a, &b, 4) != 0;
        }
    }
}

static void w4_run(w4_case c, unsigned mma)
{
    const size_t N = c.N, K = c.K, M = c.M, K4 = K - c.ko;
    qs_w4 w = {0};
    qs_cuda_w4 d = {0};
    void *dX = NULL, *dY = NULL;
    uint32_t *perm = gt_alloc(K * 4);
    uint16_t *Xh = gt_alloc(M * K * 2), *Yh = gt_alloc(M * N * 2);
    float *Xf = gt_alloc(M * K * 4), *Yc = gt_alloc(M * N * 4);
    double *R = gt_alloc(M * N * 8);
    int8_t *cq = gt_alloc(M * K), *wq = gt_alloc(N * K);
    float *cs = NULL, *cso = gt_alloc(M * 4), *sx = NULL;
    uint8_t *xq = NULL;
    char what[192];
    snprintf(what, sizeof what, "%s N=%zu K=%zu ko=%zu g=%zu M=%zu sp=%u%s%s%s%s", path_name(mma),
             N, K, c.ko, c.group, M, c.splits, c.xoff ? " xoff" : "", c.inf_row >= 0 ? " inf" : "",
             c.identity ? " identity" : "", c.quantize ? " quantized" : "");

    random_perm(perm, K);
    const uint32_t *pm = c.identity ? NULL : perm;
    GT_OK(make_w4(&w, &c, pm));
    make_x(&c, pm, Xh, Xf);
    const size_t G = w.group, ng = K4 ? (K4 + G - 1) / G : 0;
    cs = gt_alloc(M * (ng + 1) * 4);
    GT_OK(qs_w4_quant_act(&w, Xf, M, cq, cs, cso));
    GT_OK(qs_w4a4_gemm_ref_f64(&w, Xf, M, R));
    GT_OK(qs_w4a4_gemm(&w, Xf, M, Yc));
    GT_OK(qs_w4_codes(&w, wq));

    GT_OK(qs_cuda_w4_upload(&d, &w));
    d.splits = c.splits, d.mma = mma;
    GT_OK(qs_cuda_malloc(&dX, M * K * 2 + 16));
    GT_OK(qs_cuda_malloc(&dY, M * N * 2));
    void *dXo = (char *)dX + 2 * c.xoff;
    GT_OK(qs_cuda_h2d(dXo, Xh, M * K * 2));
    GT_OK(qs_cuda_memset(dY, 0xFF, M * N * 2));
    GT_OK(qs_cuda_w4a4_gemm(&d, dXo, M, dY, NULL));
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(Yh, dY, M * N * 2));

    /* Activation codes and scales: the workspace's first two arrays. */
    xq = gt_alloc(M * d.kd), sx = gt_alloc(M * (ng + 1) * 4);
    GT_OK(qs_cuda_d2h(xq, d.ws, M * d.kd));
    GT_OK(qs_cuda_d2h(sx, (const char *)d.ws + (size_t)QS_CUDA_W4_ROWS * d.kd, M * (ng + 1) * 4));
    size_t code_bad = 0, scale_bad = 0;
    compare_codes(&d, M, xq, sx, cq, cs, cso, &code_bad, &scale_bad);

    /* Outputs against the reference, each within its bound. */
    size_t out_bad = 0, cpu_bad = 0, worst_i = 0;
    double worst = 0, num = 0, den = 0;
    for (size_t m = 0; m < M; m++)
        for (size_t n = 0; n < N; n++) {
            const size_t i = m * N + n;
            const float y = qs_fp16_to_fp32(Yh[i]);
            if (isnan(R[i])) { /* a token with an Inf: NaN outputs, as the CPU's */
                out_bad += !isnan(y);
                continue;
            }
            double B = 0;
            for (size_t j = 0; j < K; j++) {
                const size_t g = j / G;
                const double s =
                    j < K4 ? (double)cs[m * ng + g] * w.s4[n * ng + g] : (double)cso[m] * w.s8[n];
                B += fabs(s * cq[m * K + j] * wq[n * K + j]);
            }
            const double e = (double)(ng + 20) * 0x1p-24 * B;
            const double tol = 0x1p-11 * (fabs(R[i]) + e) + e + 0x1p-25;
            const double err = fabs((double)y - R[i]);
            if (!isfinite(y) || !(err <= tol))
                out_bad++;
            if (!(fabs((double)y - Yc[i]) <= 2 * tol))
                cpu_bad++;
            if (isfinite(y) && err / tol > worst)
                worst = err / tol, worst_i = i;
            num += err * err, den += R[i] * R[i];
        }
    const int ok = !code_bad && !scale_bad && !out_bad && !cpu_bad;
    gt_cases++;
    if (!ok)
        gt_failures++;
    printf("%s %-60s rel_l2 %.2e, max err/tol %.3f\n", ok ? "ok  " : "FAIL", what,
           sqrt(num / (den > 0 ? den : 1)), worst);
    if (code_bad || scale_bad)
        printf("     %zu activation code bytes, %zu scales differ from qs_w4_quant_act's\n",
               code_bad, scale_bad);
    if (out_bad || cpu_bad)
        printf("     %zu of %zu outputs out of bound, %zu off qs_w4a4_gemm's (worst at %zu: %g vs "
               "%.9g)\n",
               out_bad, M * N, cpu_bad, worst_i, (double)qs_fp16_to_fp32(Yh[worst_i]), R[worst_i]);
out:
    qs_cuda_free(dX);
    qs_cuda_free(dY);
    qs_cuda_w4_free(&d);
    qs_w4_close(&w);
    free(perm), free(Xh), free(Yh), free(Xf), free(Yc), free(R), free(cq), free(wq);
    free(cs), free(cso), free(sx), free(xq);
}

/* Arguments the device path refuses. */
static void w4_refusals(void)
{
    qs_w4 w = {0};
    qs_cuda_w4 d = {0}, e = {0}, f = {0};
    qs_cuda_w4_act a = {0}, b = {0};
    void *dX = NULL, *dY = NULL;
    int bad = 0;
    w4_case c = {8, 128, 8, 64, 1, 0, 0, -1, 0, 0};
    uint32_t perm[128];
    random_perm(perm, 128);
    GT_OK(make_w4(&w, &c, perm));
    GT_OK(qs_cuda_w4_upload(&d, &w));
    qs_w4_close(&w);
    GT_OK(make_w4(&w, &c, NULL)); /* the same shape, another permutation */
    GT_OK(qs_cuda_w4_upload(&f, &w));
    GT_OK(qs_cuda_malloc(&dX, 2 * 128 * QS_CUDA_W4_ROWS + 16));
    GT_OK(qs_cuda_malloc(&dY, 2 * 128 * QS_CUDA_W4_ROWS + 16));
    bad += qs_cuda_w4a4_gemm(&d, dX, 0, dY, NULL) != QS_EINVAL;
    bad += qs_cuda_w4a4_gemm(&d, dX, QS_CUDA_W4_ROWS + 1, dY, NULL) != QS_EINVAL;
    bad += qs_cuda_w4a4_gemm(&d, NULL, 1, dY, NULL) != QS_EINVAL;
    d.splits = 2; /* one 128-byte tile cannot be split */
    bad += qs_cuda_w4a4_gemm(&d, dX, 1, dY, NULL) != QS_EINVAL;
    d.splits = 0, d.mma = 5;
    bad += qs_cuda_w4a4_gemm(&d, dX, 1, dY, NULL) != QS_EINVAL;
    d.mma = 0;
    bad += qs_cuda_w4_alloc(&e, 8, 128, 0, 12) != QS_EINVAL;        /* not a multiple of 8 */
    bad += qs_cuda_w4_alloc(&e, 8, 128, 129, 8) != QS_EINVAL;       /* ko > K */
    bad += qs_cuda_w4_alloc(&e, 8, 300000, 140000, 8) != QS_EINVAL; /* int32 sums of ko */
    bad += qs_cuda_w4_alloc(&e, 0, 128, 0, 8) != QS_EINVAL;
    GT_OK(qs_cuda_w4_act_alloc(&a, 4, &f));
    bad += qs_cuda_w4a4_gemm_act(&d, &a, 1, dY, NULL) != QS_EINVAL; /* another permutation */
    bad += qs_cuda_w4a4_gemm_act(&f, &a, 5, dY, NULL) != QS_EINVAL; /* more rows than a has */
    bad += qs_cuda_w4_quant_act(&a, dX, 5, NULL) != QS_EINVAL;
    bad += qs_cuda_w4_act_alloc(&b, 0, &f) != QS_EINVAL;
    gt_cases++;
    if (bad)
        gt_failures++;
    printf("%s refusals: M 0 and over the workspace, NULL input, splits over the K tiles, mma 5, "
           "group 12, ko > K, ko over the int32 sums, N 0, codes of another permutation, too "
           "many rows, 0 rows (%d accepted)\n",
           bad ? "FAIL" : "ok  ", bad);
out:
    qs_cuda_free(dX);
    qs_cuda_free(dY);
    qs_cuda_w4_act_free(&a);
    qs_cuda_w4_free(&d);
    qs_cuda_w4_free(&e);
    qs_cuda_w4_free(&f);
    qs_w4_close(&w);
}

/* qs_cuda_add_norm_w4 against qs_cuda_add_norm followed by
 * qs_cuda_w4_quant_act: x, y, codes and scales equal bit for bit, the codes
 * equal qs_w4_quant_act's on y's values, and qs_cuda_w4a4_gemm_act on them
 * equals qs_cuda_w4a4_gemm on y bit for bit. */
static void w4_fused_norm(size_t n, size_t H, size_t ko, size_t group, int layer, int post,
                          long inf_row, unsigned mma)
{
    const size_t N = 40;
    const float eps = 1e-5f;
    float *x = gt_alloc(n * H * 4), *x1 = gt_alloc(n * H * 4), *x2 = gt_alloc(n * H * 4);
    float *yf = gt_alloc(n * H * 4);
    uint16_t *dh = gt_alloc(n * H * 2), *wh = gt_alloc(H * 2), *bh = gt_alloc(H * 2);
    uint16_t *y1 = gt_alloc(n * H * 2), *y2 = gt_alloc(n * H * 2);
    uint16_t *Y1 = gt_alloc(n * N * 2), *Y2 = gt_alloc(n * N * 2);
    uint32_t *perm = gt_alloc(H * 4);
    uint8_t *q1 = NULL, *q2 = NULL;
    float *s1 = NULL, *s2 = NULL, *cs = NULL, *cso = gt_alloc(n * 4);
    int8_t *cq = gt_alloc(n * H);
    void *dx1 = NULL, *dx2 = NULL, *dd = NULL, *dw = NULL, *db = NULL, *dy1 = NULL, *dy2 = NULL;
    void *dY1 = NULL, *dY2 = NULL;
    qs_w4 w = {0};
    qs_cuda_w4 d = {0};
    qs_cuda_w4_act a1 = {0}, a2 = {0};
    char what[128];
    snprintf(what, sizeof what, "%s fused %s+W4 n=%zu H=%zu ko=%zu g=%zu%s%s", path_name(mma),
             layer ? "LayerNorm" : "RMSNorm", n, H, ko, group, post ? " post" : "",
             inf_row >= 0 ? " inf" : "");
    random_perm(perm, H);
    for (size_t i = 0; i < n * H; i++) {
        x[i] = (float)(tu_gauss() * (1 + i / H % 3)) * (perm[H - 1] == i % H ? 25 : 1);
        dh[i] = qs_fp32_to_fp16((float)tu_gauss());
    }
    if (inf_row >= 0)
        x[(size_t)inf_row * H + H / 2] = INFINITY;
    for (size_t j = 0; j < H; j++) {
        wh[j] = qs_fp32_to_fp16((float)(1 + 0.1 * tu_gauss()));
        bh[j] = qs_fp32_to_fp16((float)(0.1 * tu_gauss()));
    }
    w4_case c = {N, H, ko, group, n, 0, 0, -1, 0, 0};
    GT_OK(make_w4(&w, &c, perm));
    GT_OK(qs_cuda_w4_upload(&d, &w));
    d.mma = mma;
    GT_OK(qs_cuda_w4_act_alloc(&a1, n, &d));
    GT_OK(qs_cuda_w4_act_alloc(&a2, n, &d));
    void **bufs[] = {&dx1, &dx2, &dd, &dy1, &dy2};
    size_t sizes[] = {n * H * 4, n * H * 4, n * H * 2, n * H * 2, n * H * 2};
    for (int i = 0; i < 5; i++)
        GT_OK(qs_cuda_malloc(bufs[i], sizes[i]));
    GT_OK(qs_cuda_malloc(&dw, H * 2));
    GT_OK(qs_cuda_malloc(&db, H * 2));
    GT_OK(qs_cuda_malloc(&dY1, n * N * 2));
    GT_OK(qs_cuda_malloc(&dY2, n * N * 2));
    GT_OK(qs_cuda_h2d(dx1, x, n * H * 4));
    GT_OK(qs_cuda_h2d(dx2, x, n * H * 4));
    GT_OK(qs_cuda_h2d(dd, dh, n * H * 2));
    GT_OK(qs_cuda_h2d(dw, wh, H * 2));
    GT_OK(qs_cuda_h2d(db, bh, H * 2));
    /* poisoned: every byte must be written */
    GT_OK(qs_cuda_memset(a2.xq, 0x5A, n * a2.kd));
    GT_OK(qs_cuda_memset(a2.sx, 0x5A, n * (a2.ngroups + 1) * 4));
    GT_OK(qs_cuda_add_norm(dx1, dd, dw, layer ? db : NULL, n, H, eps, post, dy1, NULL));
    GT_OK(qs_cuda_w4_quant_act(&a1, dy1, n, NULL));
    GT_OK(qs_cuda_add_norm_w4(dx2, dd, dw, layer ? db : NULL, n, H, eps, post, dy2, &a2, NULL));
    GT_OK(qs_cuda_w4a4_gemm(&d, dy1, n, dY1, NULL));
    GT_OK(qs_cuda_w4a4_gemm_act(&d, &a2, n, dY2, NULL));
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(x1, dx1, n * H * 4));
    GT_OK(qs_cuda_d2h(x2, dx2, n * H * 4));
    GT_OK(qs_cuda_d2h(y1, dy1, n * H * 2));
    GT_OK(qs_cuda_d2h(y2, dy2, n * H * 2));
    GT_OK(qs_cuda_d2h(Y1, dY1, n * N * 2));
    GT_OK(qs_cuda_d2h(Y2, dY2, n * N * 2));
    const size_t kd = a1.kd, ns = a1.ngroups + 1;
    q1 = gt_alloc(n * kd), q2 = gt_alloc(n * kd);
    s1 = gt_alloc(n * ns * 4), s2 = gt_alloc(n * ns * 4), cs = gt_alloc(n * ns * 4);
    GT_OK(qs_cuda_d2h(q1, a1.xq, n * kd));
    GT_OK(qs_cuda_d2h(q2, a2.xq, n * kd));
    GT_OK(qs_cuda_d2h(s1, a1.sx, n * ns * 4));
    GT_OK(qs_cuda_d2h(s2, a2.sx, n * ns * 4));
    for (size_t i = 0; i < n * H; i++)
        yf[i] = qs_fp16_to_fp32(y1[i]);
    GT_OK(qs_w4_quant_act(&w, yf, n, cq, cs, cso));
    size_t code_bad = 0, scale_bad = 0;
    compare_codes(&d, n, q2, s2, cq, cs, cso, &code_bad, &scale_bad);
    const int same_xy = !memcmp(x1, x2, n * H * 4) && !memcmp(y1, y2, n * H * 2);
    const int same_q = !memcmp(q1, q2, n * kd) && !memcmp(s1, s2, n * ns * 4);
    const int same_Y = !memcmp(Y1, Y2, n * N * 2);
    const int ok = same_xy && same_q && same_Y && !code_bad && !scale_bad;
    gt_cases++;
    if (!ok)
        gt_failures++;
    printf("%s %s: x, y%s; codes%s; %zu code bytes and %zu scales differ from the CPU's; GEMM on "
           "them %s\n",
           ok ? "ok  " : "FAIL", what, same_xy ? " equal" : " DIFFER",
           same_q ? " equal the unfused" : " DIFFER from the unfused", code_bad, scale_bad,
           same_Y ? "equal" : "DIFFERS");
out:
    for (int i = 0; i < 5; i++)
        qs_cuda_free(*bufs[i]);
    qs_cuda_free(dw), qs_cuda_free(db), qs_cuda_free(dY1), qs_cuda_free(dY2);
    qs_cuda_w4_act_free(&a1);
    qs_cuda_w4_act_free(&a2);
    qs_cuda_w4_free(&d);
    qs_w4_close(&w);
    free(x), free(x1), free(x2), free(yf), free(dh), free(wh), free(bh), free(y1), free(y2);
    free(Y1), free(Y2), free(perm), free(q1), free(q2), free(s1), free(s2), free(cs), free(cso);
    free(cq);
}

/* What the fused norm refuses: codes of another width or too few rows, a
 * row over the staging. */
static void w4_fused_refusals(void)
{
    qs_w4 w = {0}, big = {0};
    qs_cuda_w4 d = {0}, dbig = {0};
    qs_cuda_w4_act a = {0}, abig = {0};
    void *x = NULL, *y = NULL;
    int bad = 0;
    const size_t HB = QS_CUDA_NORM_W4_MAX_H + 8;
    w4_case c = {8, 64, 0, 32, 1, 0, 0, -1, 1, 0}, cb = {1, HB, 0, 128, 1, 0, 0, -1, 1, 0};
    GT_OK(make_w4(&w, &c, NULL));
    GT_OK(make_w4(&big, &cb, NULL));
    GT_OK(qs_cuda_w4_upload(&d, &w));
    GT_OK(qs_cuda_w4_upload(&dbig, &big));
    GT_OK(qs_cuda_w4_act_alloc(&a, 4, &d));
    GT_OK(qs_cuda_w4_act_alloc(&abig, 1, &dbig));
    GT_OK(qs_cuda_malloc(&x, HB * 4 * 4));
    GT_OK(qs_cuda_malloc(&y, HB * 2 * 4));
    bad += qs_cuda_add_norm_w4(x, NULL, y, NULL, 4, 96, 1e-5f, 0, y, &a, NULL) != QS_EINVAL;
    bad += qs_cuda_add_norm_w4(x, NULL, y, NULL, 5, 64, 1e-5f, 0, y, &a, NULL) != QS_EINVAL;
    bad += qs_cuda_add_norm_w4(x, NULL, y, NULL, 1, HB, 1e-5f, 0, y, &abig, NULL) != QS_ENOTSUP;
    bad += qs_cuda_add_norm_w4(x, NULL, y, NULL, 1, 64, 1e-5f, 0, y, NULL, NULL) != QS_EINVAL;
    gt_cases++;
    if (bad)
        gt_failures++;
    printf("%s fused refusals: another width, too many rows, %zu channels, no codes (%d "
           "accepted)\n",
           bad ? "FAIL" : "ok  ", HB, bad);
out:
    qs_cuda_w4_act_free(&a);
    qs_cuda_w4_act_free(&abig);
    qs_cuda_w4_free(&d);
    qs_cuda_w4_free(&dbig);
    qs_w4_close(&w);
    qs_w4_close(&big);
    qs_cuda_free(x);
    qs_cuda_free(y);
}

/* Under the harness: the bank model's count of the GEMM's shared-memory
 * accesses since the start (ldmatrix rows, cp.async chunks): with the
 * W8A8 swizzle they must be conflict-free. */
static void w4_banks(void)
{
#ifdef QS_CUDA_EMU
    if (!qs_emu_checks_active()) {
        printf("skip bank model: needs the access instrumentation, off under AddressSanitizer\n");
        return;
    }
    qs_emu_bank_stats ld, st;
    qs_emu_banks("w4a4_gemm_kernel", &ld, &st);
    const int ok = ld.requests > 0 && ld.wavefronts == ld.ideal && st.wavefronts == st.ideal;
    gt_cases++;
    if (!ok)
        gt_failures++;
    printf("%s bank model, GEMM: loads %llu requests %llu wavefronts (ideal %llu), stores %llu "
           "requests %llu wavefronts (ideal %llu)\n",
           ok ? "ok  " : "FAIL", (unsigned long long)ld.requests, (unsigned long long)ld.wavefronts,
           (unsigned long long)ld.ideal, (unsigned long long)st.requests,
           (unsigned long long)st.wavefronts, (unsigned long long)st.ideal);
#endif
}

/* The path a handle with mma = 0 takes on this device: expect (4 or 8),
 * or any when 0. */
static void w4_default_path(int expect)
{
    qs_cuda_w4 d = {0};
    GT_OK(qs_cuda_w4_alloc(&d, 8, 128, 0, 128));
    const int p = qs_cuda_w4_mma(&d);
    d.mma = 4;
    const int p4 = qs_cuda_w4_mma(&d);
    d.mma = 8;
    const int p8 = qs_cuda_w4_mma(&d);
    d.mma = 3;
    const int bad = qs_cuda_w4_mma(&d);
    const int ok =
        (p == 4 || p == 8) && (!expect || p == expect) && p4 == 4 && p8 == 8 && bad == QS_EINVAL;
    gt_cases++;
    if (!ok)
        gt_failures++;
    printf("%s the device's tensor-core path: %s (expected %s); forced 4 -> %d, 8 -> %d, 3 -> %s\n",
           ok ? "ok  " : "FAIL",
           p == 4   ? "mma.sync s4"
           : p == 8 ? "s8 on unpacked codes"
                    : "error",
           expect == 4   ? "s4"
           : expect == 8 ? "s8"
                         : "either",
           p4, p8, qs_strerror(bad));
out:
    qs_cuda_w4_free(&d);
}

int main(void)
{
    /* The path the device must choose: the harness's A100 (QS_EMU_GPU=a100,
     * test_gpu_w4a4_a100_emu) s4, its H100 and H200 s8; a GPU either. */
    int expect = 0;
#ifdef QS_CUDA_EMU
    const char *gpu = getenv("QS_EMU_GPU");
    expect = gpu && !strcmp(gpu, "a100") ? 4 : 8;
#endif
    gt_need_gpu();
    tu_seed("test_gpu_w4a4");
    static const w4_case cases[] = {
        /* N, K, ko, group, M, splits, xoff, inf_row, identity, quantize */
        {37, 200, 8, 64, 1, 0, 0, -1, 0, 0},      /* decode: 3 groups, outliers */
        {129, 300, 20, 128, 3, 0, 1, -1, 0, 0},   /* last group 24 of 128, X unaligned */
        {40, 256, 0, 128, 16, 0, 0, -1, 0, 0},    /* no outliers */
        {37, 82, 5, 32, 37, 0, 0, -1, 0, 0},      /* K4 = 77: not a multiple of 8; 64-row tile */
        {64, 160, 32, 40, 130, 0, 0, -1, 0, 0},   /* groups padded to 64; 128-row tile x 2 */
        {48, 136, 16, 8, 5, 0, 0, 2, 0, 0},       /* groups of 8; a token with an Inf */
        {300, 1000, 32, 192, 3, 2, 0, -1, 0, 0},  /* splits cut the 3-step groups */
        {129, 1000, 20, 128, 16, 3, 0, -1, 1, 0}, /* identity perm, 3 splits */
        {40, 96, 96, 8, 3, 0, 0, -1, 0, 0},       /* ko = K: outliers only */
        {33, 256, 16, 128, 4, 0, 0, -1, 0, 1},    /* qs_w4_quantize */
        {70, 1000, 100, 40, 40, 3, 0, -1, 0, 0},  /* splits cut the outliers (4 steps) */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        w4_run(cases[i], 4);
        w4_run(cases[i], 8);
    }
    w4_default_path(expect);
    w4_run((w4_case){37, 200, 8, 64, 2, 0, 0, -1, 0, 0}, 0); /* the device's own path */
    w4_refusals();
    for (unsigned p = 4; p <= 8; p += 4) {
        w4_fused_norm(5, 576, 64, 128, 0, 0, -1, p); /* SmolLM2's width, 16-byte path */
        w4_fused_norm(3, 300, 20, 64, 1, 1, 1, p);   /* scalar path, post-LN, a row with an Inf */
    }
    w4_fused_norm(4, 77, 5, 24, 0, 0, -1, 8);   /* H not a multiple of 8 */
    w4_fused_norm(2, 256, 0, 128, 1, 0, -1, 4); /* no outliers */
    w4_fused_refusals();
    w4_banks();
    if (!qs_cuda_emulated()) { /* GPU only: the full shapes, both paths */
        for (unsigned p = 4; p <= 8; p += 4) {
            w4_run((w4_case){4096, 4096, 128, 128, 512, 0, 0, -1, 0, 0}, p);
            w4_run((w4_case){12288, 4096, 128, 128, 1, 0, 0, -1, 0, 0}, p);
            w4_run((w4_case){4096, 11008, 128, 128, 64, 0, 0, -1, 0, 0}, p);
            w4_run((w4_case){1000, 4136, 0, 128, 200, 0, 0, -1, 0, 0}, p);
        }
    }
    return gt_summary("test_gpu_w4a4");
}
