/* test_gpu_w8a8.c: W8A8 on the device (qs_cuda_w8_upload, qs_cuda_w8a8_gemm)
 * against the CPU's float64 reference on the same activation codes
 * (qs_w8a8_gemm_ref_f64), fresh random W (qs_w8_quantize) and fp16 X each
 * run: activation groups per token (0), 128, 64, 96 (does not divide K and
 * straddles the GEMM's 128-channel tiles), 36 and 12 (not multiples of 32:
 * padded groups); ragged N (37, 129, 300) and K (77 and 99, not multiples
 * of 4; 1000); M = 1, 3, 16 (the decode tile), 37 (64-row tile), 130
 * (128-row tile, two M tiles); dynamic and static scales (the static one
 * clips); chosen and forced K-splits (1, 2, 3); X off its 8-byte alignment;
 * a token with an Inf (its outputs NaN, the others exact). Output poisoned
 * with 0xFF (NaN) before each run.
 *
 * Checks, per case:
 *   - the device's activation codes and scales (read back from the
 *     workspace) equal the CPU rule's bit for bit (qs_quant_act_token or
 *     qs_quant_act_static per group), padding zero;
 *   - every output within  tol = 2^-11 (|ref| + e) + e + 2^-25  of the
 *     reference, e = (ngroups + 18) 2^-24 B, B = sum_k (|x_k| + s_g / 2)
 *     |sw wq[n,k]|. Why: with the CPU's codes the integer sums are exact;
 *     what is left is fp32 rounding (int32 -> fp32, one fma per group, up to
 *     16 split partials and sw: at most ngroups + 18 roundings of at most
 *     2^-24 of the partial sums, which B bounds since s_g |xq| <= |x| +
 *     s_g / 2) and the one fp16 rounding of Y (half an ulp, 2^-11 relative,
 *     2^-25 absolute below fp16's normal range).
 * Also: the device W8 quantizer (qs_cuda_w8_quantize) against the CPU's
 * codes and scales bit for bit, and the norm with the activation
 * quantization fused in (qs_cuda_add_norm_w8, qs_cuda_w8a8_gemm_act)
 * against the unfused pair bit for bit and the CPU rule's codes.
 * Skips (77) without a GPU; under the harness (test_gpu_w8a8_emu) the same
 * cases run on the CPU, the large ones only on a GPU (and not with --quick,
 * which compute-sanitizer runs). */
#include "gpu_test.h"

#ifdef QS_CUDA_EMU
#include <qs_emu_api.h>
#endif

typedef struct w8_case {
    size_t N, K, group, M;
    int stat;        /* static scale */
    unsigned splits; /* 0: the chooser's */
    size_t xoff;     /* halves by which X starts past an 8-byte boundary */
    long inf_row;    /* -1, or the token that holds an Inf */
} w8_case;

/* The CPU's codes and scale of one group of one token (qs_act_row's rule). */
static int host_group(const float *x, size_t len, float stat, int8_t *codes, float *s)
{
    int bad = 0;
    for (size_t k = 0; k < len; k++)
        bad |= !isfinite(x[k]);
    if (stat > 0) {
        if (qs_quant_act_static(x, 1, len, stat, codes))
            return -1;
        *s = stat;
    } else if (qs_quant_act_token(x, 1, len, codes, s)) {
        return -1;
    }
    if (bad)
        *s = NAN;
    return 0;
}

static void w8_run(w8_case c)
{
    const size_t N = c.N, K = c.K, M = c.M;
    qs_w8 w = {0};
    qs_cuda_w8 d = {0};
    void *dX = NULL, *dY = NULL;
    float *W = gt_alloc(N * K * 4), *Xf = gt_alloc(M * K * 4), *Wd = gt_alloc(N * K * 4);
    uint16_t *Xh = gt_alloc(M * K * 2), *Yh = gt_alloc(M * N * 2);
    double *R = gt_alloc(M * N * 8);
    int8_t *xq = NULL, *cq = NULL;
    float *sx = NULL, *cs = NULL;
    char what[160];
    snprintf(what, sizeof what, "N=%zu K=%zu g=%zu M=%zu %s sp=%u%s%s", N, K, c.group, M,
             c.stat ? "static" : "dynamic", c.splits, c.xoff ? " xoff" : "",
             c.inf_row >= 0 ? " inf" : "");

    for (size_t i = 0; i < N * K; i++)
        W[i] = (float)(0.05 * tu_gauss());
    GT_OK(qs_w8_quantize(&w, W, N, K, c.group));
    GT_OK(qs_w8_dequant(&w, Wd));
    /* Uneven token magnitudes and an outlier channel: groups matter. */
    for (size_t m = 0; m < M; m++)
        for (size_t k = 0; k < K; k++) {
            double v = tu_gauss() * (1 + m % 5) * (k == 3 ? 20 : 1);
            Xh[m * K + k] = qs_fp32_to_fp16((float)v);
        }
    if (c.inf_row >= 0)
        Xh[(size_t)c.inf_row * K + K / 2] = 0x7c00;
    float amax = 0;
    for (size_t i = 0; i < M * K; i++) {
        Xf[i] = qs_fp16_to_fp32(Xh[i]);
        if (isfinite(Xf[i]))
            amax = fmaxf(amax, fabsf(Xf[i]));
    }
    /* Static: 0.6 of the range, so the largest values clip at +-127. */
    const float stat = c.stat ? 0.6f * amax / 127 : 0;
    GT_OK(qs_w8a8_gemm_ref_f64(&w, Xf, M, stat, R));

    GT_OK(qs_cuda_w8_upload(&d, &w));
    d.splits = c.splits;
    GT_OK(qs_cuda_malloc(&dX, M * K * 2 + 16));
    GT_OK(qs_cuda_malloc(&dY, M * N * 2));
    void *dXo = (char *)dX + 2 * c.xoff;
    GT_OK(qs_cuda_h2d(dXo, Xh, M * K * 2));
    GT_OK(qs_cuda_memset(dY, 0xFF, M * N * 2));
    GT_OK(qs_cuda_w8a8_gemm(&d, dXo, M, stat, dY, NULL));
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(Yh, dY, M * N * 2));

    /* Activation codes and scales: the workspace's first two arrays. */
    const size_t G = d.group, ng = d.ngroups, gp = d.gp, kd = d.kd;
    xq = gt_alloc(M * kd), cq = gt_alloc(M * kd);
    sx = gt_alloc(M * ng * 4), cs = gt_alloc(M * ng * 4);
    GT_OK(qs_cuda_d2h(xq, d.ws, M * kd));
    GT_OK(qs_cuda_d2h(sx, (const char *)d.ws + (size_t)QS_CUDA_W8_ROWS * kd, M * ng * 4));
    for (size_t m = 0; m < M; m++)
        for (size_t g = 0; g < ng; g++) {
            size_t len = K - g * G < G ? K - g * G : G;
            if (host_group(Xf + m * K + g * G, len, stat, cq + m * kd + g * gp, &cs[m * ng + g])) {
                printf("FAIL %s: host quantization: %s\n", what, qs_errmsg());
                gt_failures++;
                goto out;
            }
        }
    size_t code_bad = 0, scale_bad = 0;
    for (size_t m = 0; m < M; m++) {
        for (size_t g = 0; g < ng; g++) {
            size_t len = K - g * G < G ? K - g * G : G;
            for (size_t j = 0; j < gp; j++)
                code_bad += xq[m * kd + g * gp + j] != (j < len ? cq[m * kd + g * gp + j] : 0);
            float a = sx[m * ng + g], b = cs[m * ng + g];
            scale_bad += isnan(b) ? !isnan(a) : memcmp(&a, &b, 4) != 0;
        }
        for (size_t j = ng * gp; j < kd; j++)
            code_bad += xq[m * kd + j] != 0;
    }

    /* Outputs against the reference, each within its bound. */
    size_t out_bad = 0, worst_i = 0;
    double worst = 0, num = 0, den = 0;
    for (size_t m = 0; m < M; m++) {
        const float *x = Xf + m * K;
        for (size_t n = 0; n < N; n++) {
            const size_t i = m * N + n;
            const float y = qs_fp16_to_fp32(Yh[i]);
            if (isnan(R[i])) { /* a token with an Inf: NaN outputs, as the CPU's */
                out_bad += !isnan(y);
                continue;
            }
            double B = 0;
            for (size_t k = 0; k < K; k++) {
                double s = stat > 0 ? stat : cs[m * ng + k / G];
                B += (fabs(x[k]) + 0.51 * s) * fabs(Wd[n * K + k]);
            }
            const double e = (double)(ng + 18) * 0x1p-24 * B;
            const double tol = 0x1p-11 * (fabs(R[i]) + e) + e + 0x1p-25;
            const double err = fabs((double)y - R[i]);
            if (!isfinite(y) || !(err <= tol))
                out_bad++;
            if (isfinite(y) && err / tol > worst)
                worst = err / tol, worst_i = i;
            num += err * err, den += R[i] * R[i];
        }
    }
    const int ok = !code_bad && !scale_bad && !out_bad;
    gt_cases++;
    if (!ok)
        gt_failures++;
    printf("%s %-52s rel_l2 %.2e, max err/tol %.3f\n", ok ? "ok  " : "FAIL", what,
           sqrt(num / (den > 0 ? den : 1)), worst);
    if (code_bad || scale_bad)
        printf("     %zu activation codes, %zu scales differ from the CPU's\n", code_bad,
               scale_bad);
    if (out_bad)
        printf("     %zu of %zu outputs out of bound (worst at %zu: %g vs %.9g)\n", out_bad, M * N,
               worst_i, (double)qs_fp16_to_fp32(Yh[worst_i]), R[worst_i]);
out:
    qs_cuda_free(dX);
    qs_cuda_free(dY);
    qs_cuda_w8_free(&d);
    qs_w8_close(&w);
    free(W), free(Xf), free(Wd), free(Xh), free(Yh), free(R);
    free(xq), free(cq), free(sx), free(cs);
}

/* Arguments the device path refuses. */
static void w8_refusals(void)
{
    float W[8 * 8];
    for (int i = 0; i < 64; i++)
        W[i] = (float)(i % 7) - 3;
    qs_w8 w = {0};
    qs_cuda_w8 d = {0}, e = {0};
    void *dX = NULL, *dY = NULL;
    int bad = 0;
    GT_OK(qs_w8_quantize(&w, W, 8, 8, 0));
    GT_OK(qs_cuda_w8_upload(&d, &w));
    GT_OK(qs_cuda_malloc(&dX, 2 * 8 * QS_CUDA_W8_ROWS + 16));
    GT_OK(qs_cuda_malloc(&dY, 2 * 8 * QS_CUDA_W8_ROWS + 16));
    bad += qs_cuda_w8a8_gemm(&d, dX, 0, 0, dY, NULL) != QS_EINVAL;
    bad += qs_cuda_w8a8_gemm(&d, dX, QS_CUDA_W8_ROWS + 1, 0, dY, NULL) != QS_EINVAL;
    bad += qs_cuda_w8a8_gemm(&d, dX, 1, NAN, dY, NULL) != QS_EINVAL;
    bad += qs_cuda_w8a8_gemm(&d, NULL, 1, 0, dY, NULL) != QS_EINVAL;
    d.splits = 2; /* one 128-channel tile cannot be split */
    bad += qs_cuda_w8a8_gemm(&d, dX, 1, 0, dY, NULL) != QS_EINVAL;
    bad += qs_cuda_w8_alloc(&e, 8, 8, 6) != QS_EINVAL;      /* not a multiple of 4 */
    bad += qs_cuda_w8_alloc(&e, 8, 300000, 0) != QS_EINVAL; /* int32 sums could overflow */
    gt_cases++;
    if (bad)
        gt_failures++;
    printf("%s refusals: M 0 and over the workspace, NaN scale, NULL input, splits over the K "
           "tiles, group 6, a 300000-channel group (%d accepted)\n",
           bad ? "FAIL" : "ok  ", bad);
out:
    qs_cuda_free(dX);
    qs_cuda_free(dY);
    qs_cuda_w8_free(&d);
    qs_w8_close(&w);
}

/* qs_cuda_w8_quantize against qs_w8_quantize + qs_cuda_w8_upload: the
 * device arrays equal bit for bit (codes with their padding, scales), on
 * Gaussian rows with an outlier, a zero row, ragged K and padded groups; a
 * NaN weight is refused and leaves the handle empty. */
static void w8_quantize_case(size_t N, size_t K, size_t group, int nan)
{
    qs_w8 w = {0};
    qs_cuda_w8 ref = {0}, dev = {0};
    float *W = gt_alloc(N * K * 4), *dW = NULL;
    int8_t *a = NULL, *b = NULL;
    float *sa = gt_alloc(N * 4), *sb = gt_alloc(N * 4);
    char what[96];
    snprintf(what, sizeof what, "device W8 quantizer N=%zu K=%zu g=%zu%s", N, K, group,
             nan ? " NaN" : "");
    for (size_t i = 0; i < N * K; i++)
        W[i] = (float)(0.05 * tu_gauss()) * (i % K == 5 ? 30 : 1);
    for (size_t k = 0; k < K; k++)
        W[(N / 2) * K + k] = 0; /* scale 0, codes 0 */
    if (nan)
        W[(N - 1) * K + K / 3] = NAN;
    GT_OK(qs_cuda_malloc((void **)&dW, N * K * 4));
    GT_OK(qs_cuda_h2d(dW, W, N * K * 4));
    int err = qs_cuda_w8_quantize(&dev, dW, N, K, group, NULL);
    if (nan) {
        const int ok = err == QS_EINVAL && !dev.codes && strstr(qs_errmsg(), "NaN");
        gt_cases++;
        if (!ok)
            gt_failures++;
        printf("%s %s refused (%s)\n", ok ? "ok  " : "FAIL", what, qs_errmsg());
        goto out;
    }
    GT_OK(err);
    GT_OK(qs_w8_quantize(&w, W, N, K, group));
    GT_OK(qs_cuda_w8_upload(&ref, &w));
    a = gt_alloc(N * ref.kd), b = gt_alloc(N * dev.kd);
    GT_OK(qs_cuda_d2h(a, ref.codes, N * ref.kd));
    GT_OK(qs_cuda_d2h(b, dev.codes, N * dev.kd));
    GT_OK(qs_cuda_d2h(sa, ref.scale, N * 4));
    GT_OK(qs_cuda_d2h(sb, dev.scale, N * 4));
    const int ok = ref.kd == dev.kd && ref.group == dev.group && dev.bytes == ref.bytes &&
                   !memcmp(a, b, N * ref.kd) && !memcmp(sa, sb, N * 4);
    gt_cases++;
    if (!ok)
        gt_failures++;
    printf("%s %s: codes and scales equal the CPU's\n", ok ? "ok  " : "FAIL", what);
out:
    qs_cuda_free(dW);
    qs_cuda_w8_free(&ref);
    qs_cuda_w8_free(&dev);
    qs_w8_close(&w);
    free(W), free(a), free(b), free(sa), free(sb);
}

/* qs_cuda_add_norm_w8 against qs_cuda_add_norm followed by the GEMM's own
 * quantization: x and y equal bit for bit; the codes and scales equal the
 * CPU rule's on y's fp16 values (padding zero); the GEMM on those codes
 * (qs_cuda_w8a8_gemm_act) equals qs_cuda_w8a8_gemm on y bit for bit. A
 * row holding an Inf normalises to NaN: its scales are NaN. */
static void w8_fused_norm(size_t n, size_t H, size_t group, int layer, int post, long inf_row)
{
    const size_t N = 40;
    const float eps = 1e-5f;
    float *x = gt_alloc(n * H * 4), *x1 = gt_alloc(n * H * 4), *x2 = gt_alloc(n * H * 4);
    float *yf = gt_alloc(n * H * 4), *W = gt_alloc(N * H * 4);
    uint16_t *dh = gt_alloc(n * H * 2), *wh = gt_alloc(H * 2), *bh = gt_alloc(H * 2);
    uint16_t *y1 = gt_alloc(n * H * 2), *y2 = gt_alloc(n * H * 2);
    uint16_t *Y1 = gt_alloc(n * N * 2), *Y2 = gt_alloc(n * N * 2);
    int8_t *xq = NULL, *cq = NULL;
    float *sx = NULL, *cs = NULL;
    void *dx1 = NULL, *dx2 = NULL, *dd = NULL, *dw = NULL, *db = NULL, *dy1 = NULL, *dy2 = NULL;
    void *dY1 = NULL, *dY2 = NULL;
    qs_w8 w = {0};
    qs_cuda_w8 d = {0};
    qs_cuda_w8_act act = {0};
    char what[128];
    snprintf(what, sizeof what, "fused %s+W8 n=%zu H=%zu g=%zu%s%s",
             layer ? "LayerNorm" : "RMSNorm", n, H, group, post ? " post" : "",
             inf_row >= 0 ? " inf" : "");
    for (size_t i = 0; i < n * H; i++) {
        x[i] = (float)(tu_gauss() * (1 + i / H % 3)) * (i % H == 7 ? 25 : 1);
        dh[i] = qs_fp32_to_fp16((float)tu_gauss());
    }
    if (inf_row >= 0)
        x[(size_t)inf_row * H + H / 2] = INFINITY;
    for (size_t j = 0; j < H; j++) {
        wh[j] = qs_fp32_to_fp16((float)(1 + 0.1 * tu_gauss()));
        bh[j] = qs_fp32_to_fp16((float)(0.1 * tu_gauss()));
    }
    for (size_t i = 0; i < N * H; i++)
        W[i] = (float)(0.05 * tu_gauss());
    GT_OK(qs_w8_quantize(&w, W, N, H, group));
    GT_OK(qs_cuda_w8_upload(&d, &w));
    GT_OK(qs_cuda_w8_act_alloc(&act, n, H, group));
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
    GT_OK(qs_cuda_memset(act.xq, 0x5A, n * act.kd)); /* poisoned: every byte must be written */
    GT_OK(qs_cuda_memset(act.sx, 0x5A, n * act.ngroups * 4));
    GT_OK(qs_cuda_add_norm(dx1, dd, dw, layer ? db : NULL, n, H, eps, post, dy1, NULL));
    GT_OK(qs_cuda_add_norm_w8(dx2, dd, dw, layer ? db : NULL, n, H, eps, post, dy2, &act, NULL));
    GT_OK(qs_cuda_w8a8_gemm(&d, dy1, n, 0, dY1, NULL));
    GT_OK(qs_cuda_w8a8_gemm_act(&d, &act, n, dY2, NULL));
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(x1, dx1, n * H * 4));
    GT_OK(qs_cuda_d2h(x2, dx2, n * H * 4));
    GT_OK(qs_cuda_d2h(y1, dy1, n * H * 2));
    GT_OK(qs_cuda_d2h(y2, dy2, n * H * 2));
    GT_OK(qs_cuda_d2h(Y1, dY1, n * N * 2));
    GT_OK(qs_cuda_d2h(Y2, dY2, n * N * 2));
    const size_t G = act.group, ng = act.ngroups, gp = act.gp, kd = act.kd;
    xq = gt_alloc(n * kd), cq = gt_alloc(n * kd);
    sx = gt_alloc(n * ng * 4), cs = gt_alloc(n * ng * 4);
    GT_OK(qs_cuda_d2h(xq, act.xq, n * kd));
    GT_OK(qs_cuda_d2h(sx, act.sx, n * ng * 4));
    for (size_t i = 0; i < n * H; i++)
        yf[i] = qs_fp16_to_fp32(y1[i]);
    size_t code_bad = 0, scale_bad = 0;
    for (size_t m = 0; m < n; m++) {
        for (size_t g = 0; g < ng; g++) {
            size_t len = H - g * G < G ? H - g * G : G;
            if (host_group(yf + m * H + g * G, len, 0, cq + m * kd + g * gp, &cs[m * ng + g])) {
                printf("FAIL %s: host quantization: %s\n", what, qs_errmsg());
                gt_failures++;
                goto out;
            }
            for (size_t j = 0; j < gp; j++)
                code_bad += xq[m * kd + g * gp + j] != (j < len ? cq[m * kd + g * gp + j] : 0);
            float a = sx[m * ng + g], b = cs[m * ng + g];
            scale_bad += isnan(b) ? !isnan(a) : memcmp(&a, &b, 4) != 0;
        }
        for (size_t j = ng * gp; j < kd; j++)
            code_bad += xq[m * kd + j] != 0;
    }
    const int same_xy = !memcmp(x1, x2, n * H * 4) && !memcmp(y1, y2, n * H * 2);
    const int same_Y = !memcmp(Y1, Y2, n * N * 2);
    const int ok = same_xy && same_Y && !code_bad && !scale_bad;
    gt_cases++;
    if (!ok)
        gt_failures++;
    printf("%s %s: x, y%s; %zu codes and %zu scales differ from the CPU's; GEMM on them %s\n",
           ok ? "ok  " : "FAIL", what, same_xy ? " equal" : " DIFFER", code_bad, scale_bad,
           same_Y ? "equal" : "DIFFERS");
out:
    for (int i = 0; i < 5; i++)
        qs_cuda_free(*bufs[i]);
    qs_cuda_free(dw), qs_cuda_free(db), qs_cuda_free(dY1), qs_cuda_free(dY2);
    qs_cuda_w8_act_free(&act);
    qs_cuda_w8_free(&d);
    qs_w8_close(&w);
    free(x), free(x1), free(x2), free(yf), free(W), free(dh), free(wh), free(bh);
    free(y1), free(y2), free(Y1), free(Y2), free(xq), free(cq), free(sx), free(cs);
}

/* What the fused path refuses: codes of another width or too few rows,
 * and groups over one CTA's shared memory. */
static void w8_fused_refusals(void)
{
    qs_cuda_w8_act a = {0}, big = {0};
    qs_cuda_w8 d = {0};
    void *x = NULL, *y = NULL;
    int bad = 0;
    GT_OK(qs_cuda_w8_act_alloc(&a, 4, 64, 16));
    GT_OK(qs_cuda_w8_act_alloc(&big, 1, 4 * 6145, 4));
    GT_OK(qs_cuda_w8_alloc(&d, 8, 64, 32));
    GT_OK(qs_cuda_malloc(&x, 4 * 4 * 6145 * 4));
    GT_OK(qs_cuda_malloc(&y, 2 * 4 * 6145 * 4));
    bad += qs_cuda_add_norm_w8(x, NULL, y, NULL, 4, 96, 1e-5f, 0, y, &a, NULL) != QS_EINVAL;
    bad += qs_cuda_add_norm_w8(x, NULL, y, NULL, 5, 64, 1e-5f, 0, y, &a, NULL) != QS_EINVAL;
    bad +=
        qs_cuda_add_norm_w8(x, NULL, y, NULL, 1, 4 * 6145, 1e-5f, 0, y, &big, NULL) != QS_ENOTSUP;
    bad += qs_cuda_w8a8_gemm_act(&d, &a, 4, y, NULL) != QS_EINVAL; /* groups 16 vs 32 */
    bad += qs_cuda_w8_act_alloc(&big, 0, 64, 0) != QS_EINVAL;
    bad += qs_cuda_w8_act_alloc(&big, 4, 64, 6) != QS_EINVAL;
    gt_cases++;
    if (bad)
        gt_failures++;
    printf("%s fused refusals: another width, too many rows, 6145 groups, another group, 0 rows, "
           "group 6 (%d accepted)\n",
           bad ? "FAIL" : "ok  ", bad);
out:
    qs_cuda_w8_act_free(&a);
    qs_cuda_w8_act_free(&big);
    qs_cuda_w8_free(&d);
    qs_cuda_free(x);
    qs_cuda_free(y);
}

/* Under the harness: the bank model's count of the GEMM's shared-memory
 * accesses (ldmatrix rows, cp.async chunks) since the start. The swizzle
 * must make them conflict-free: wavefronts equal to the ideal. */
static void w8_banks(void)
{
#ifdef QS_CUDA_EMU
    if (!qs_emu_checks_active()) {
        printf("skip bank model: needs the access instrumentation, off under AddressSanitizer\n");
        return;
    }
    qs_emu_bank_stats ld, st;
    qs_emu_banks("w8a8_gemm_kernel", &ld, &st);
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

int main(int argc, char **argv)
{
    const int quick = argc > 1 && !strcmp(argv[1], "--quick"); /* under compute-sanitizer */
    gt_need_gpu();
    tu_seed("test_gpu_w8a8");
    static const size_t Ms[] = {1, 3, 16, 37, 130};
    static const size_t groups[] = {0, 128, 64, 96, 36};
    /* Every M with every group, dynamic and static, on a ragged shape. */
    for (size_t g = 0; g < 5; g++)
        for (size_t i = 0; i < 5; i++) {
            w8_case c = {300, 1000, groups[g], Ms[i], (int)((g + i) % 2), 0, 0, -1};
            if (Ms[i] == 130) /* the largest tile: the narrower shape */
                c.N = 129, c.K = 384;
            w8_run(c);
        }
    /* K not a multiple of 4, small groups, N under one tile. */
    w8_run((w8_case){37, 77, 0, 3, 0, 0, 0, -1});
    w8_run((w8_case){37, 77, 36, 16, 1, 0, 0, -1});
    w8_run((w8_case){129, 99, 12, 37, 0, 0, 0, -1});
    /* Forced K-splits: groups of 96 straddle the split boundaries. */
    for (unsigned sp = 1; sp <= 3; sp++) {
        w8_run((w8_case){300, 1000, 96, 3, 0, sp, 0, -1});
        w8_run((w8_case){129, 1000, 0, 37, 1, sp, 0, -1});
    }
    /* X off its alignment (scalar loads), and a token with an Inf. */
    w8_run((w8_case){300, 1000, 128, 3, 0, 0, 1, -1});
    w8_run((w8_case){129, 384, 64, 16, 0, 0, 0, 5});
    w8_run((w8_case){129, 384, 0, 37, 1, 2, 0, 36});
    w8_refusals();
    /* The device quantizer; the norm with the activation codes fused in. */
    w8_quantize_case(37, 77, 0, 0);
    w8_quantize_case(129, 1000, 128, 0);
    w8_quantize_case(64, 384, 36, 0);
    w8_quantize_case(16, 200, 12, 1);
    w8_fused_norm(5, 576, 96, 0, 0, -1);  /* SmolLM2's width, 16-byte path */
    w8_fused_norm(3, 1000, 128, 1, 0, 1); /* ragged last group, a row with an Inf */
    w8_fused_norm(16, 77, 12, 0, 0, -1);  /* scalar path, units straddle groups */
    w8_fused_norm(4, 384, 36, 1, 1, -1);  /* padded groups, post-LN */
    w8_fused_norm(2, 300, 0, 0, 0, -1);   /* one scale per token */
    w8_fused_refusals();
    w8_banks();
    if (!qs_cuda_emulated() && !quick) { /* GPU only: the full shapes */
        w8_run((w8_case){4100, 4096, 128, 512, 0, 0, 0, -1});
        w8_run((w8_case){12288, 4096, 128, 1, 0, 0, 0, -1});
        w8_run((w8_case){1000, 12288, 0, 64, 1, 0, 0, -1});
        w8_run((w8_case){4096, 4128, 96, 200, 0, 0, 0, -1});
    }
    return gt_summary("test_gpu_w8a8");
}
