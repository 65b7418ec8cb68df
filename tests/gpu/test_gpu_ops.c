/* test_gpu_ops.c: the device forward pass's elementwise and row operations
 * (qs_kernels.h, "The device forward pass") against float64 references that
 * follow shard/model.c, on fresh random inputs, outputs poisoned with 0xFF
 * (every fp16 and fp32 a NaN) so that an unwritten element fails. Ragged
 * widths (H % 8 != 0 takes the scalar path), odd head counts, several
 * batches, both RoPE layouts, and arrays 2 or 4 bytes off a 16-byte boundary
 * (the scalar fallback of the 16-byte paths).
 *
 * Tolerances, per element:
 *   exact (bit for bit): x += d, add_f16, the conversions, ReLU, embedding,
 *     learned positions, the logits gather, the KV cache copy of k and v,
 *     and an int8/int4 cache's codes and scales (qs_kv_quantize's of the
 *     fp16 rows);
 *   fp16 outputs: |y - ref| <= 2^-11 |ref| (half an fp16 ulp) + what fp32
 *     loses before the rounding: norms 1e-5 (1 + |ref|) (fp32 sums of a
 *     row, ~1e-6 of its scale), RoPE 1e-6 (|a| + |b|) (cancellation in
 *     a c - b s), SwiGLU 1e-6 |ref| (four fp32 roundings) + 2^-24 (half the
 *     fp16 subnormal spacing);
 *   fp32 outputs: post-LN x 1e-5 (1 + |ref|); the fp32-out linear's
 *     relative L2 <= 1e-5 (fp32 sums over K <= 300), fp16-out <= 5e-4
 *     (fp16 rounding, RMS 2^-11/sqrt(3) ~ 2.8e-4).
 * Skips (77) without a GPU; runs as test_gpu_ops_emu under the harness. */
#include "gpu_test.h"

/* ---- Device buffers, optionally misaligned by `off` bytes ---------------- */

typedef struct dbuf {
    void *base, *p;
} dbuf;

static int dalloc(dbuf *b, size_t bytes, size_t off)
{
    int err = qs_cuda_malloc(&b->base, bytes + 16);
    b->p = err ? NULL : (char *)b->base + off;
    return err;
}

static void dfree(dbuf *b)
{
    qs_cuda_free(b->base);
    b->base = b->p = NULL;
}

static void fill_f16(uint16_t *h, size_t n, double mean, double sd)
{
    for (size_t i = 0; i < n; i++)
        h[i] = qs_fp32_to_fp16((float)(mean + sd * tu_gauss()));
}

static double f16(uint16_t h)
{
    return qs_fp16_to_fp32(h);
}

/* One result line; bad counts mismatches (non-finite included). */
static void report(const char *what, size_t bad, size_t n, double worst)
{
    gt_cases++;
    if (bad)
        gt_failures++;
    printf("%s %-60s %zu/%zu off (worst %.2e of its bound)\n", bad ? "FAIL" : "ok  ", what, bad, n,
           worst);
}

/* |y - r| <= bound, y finite; returns 1 when off and tracks y's worst ratio. */
static int off(double y, double r, double bound, double *worst)
{
    if (!isfinite(y))
        return 1;
    double q = fabs(y - r) / bound;
    if (q > *worst)
        *worst = q;
    return !(fabs(y - r) <= bound);
}

/* ---- x += d; y = norm(x) * w (+ b) ------------------------------------------ */

static void norm_case(size_t n, size_t H, int layer, int with_d, int post, size_t off_b)
{
    const float eps = 1e-5f;
    dbuf dx = {0}, dd = {0}, dw = {0}, db = {0}, dy = {0};
    float *x = gt_alloc(n * H * 4), *xo = gt_alloc(n * H * 4);
    uint16_t *d = gt_alloc(n * H * 2), *w = gt_alloc(H * 2), *b = gt_alloc(H * 2);
    uint16_t *y = gt_alloc(n * H * 2);
    char what[160];
    snprintf(what, sizeof what, "%s n=%zu H=%zu d=%d post=%d off=%zu",
             layer ? "layernorm" : "rmsnorm", n, H, with_d, post, off_b);
    for (size_t i = 0; i < n; i++) /* rows with a mean well off 0 test the centring */
        for (size_t j = 0; j < H; j++)
            x[i * H + j] = (float)(3.0 * (double)(i % 3) + 2.0 * tu_gauss());
    fill_f16(d, n * H, 0, 1);
    fill_f16(w, H, 1, 0.1);
    fill_f16(b, H, 0, 0.1);
    GT_OK(dalloc(&dx, n * H * 4, 4 * off_b));
    GT_OK(dalloc(&dd, n * H * 2, 2 * off_b));
    GT_OK(dalloc(&dw, H * 2, 2 * off_b));
    GT_OK(dalloc(&db, H * 2, 2 * off_b));
    GT_OK(dalloc(&dy, n * H * 2, 2 * off_b));
    GT_OK(qs_cuda_h2d(dx.p, x, n * H * 4));
    GT_OK(qs_cuda_h2d(dd.p, d, n * H * 2));
    GT_OK(qs_cuda_h2d(dw.p, w, H * 2));
    GT_OK(qs_cuda_h2d(db.p, b, H * 2));
    GT_OK(qs_cuda_memset(dy.p, 0xFF, n * H * 2));
    GT_OK(qs_cuda_add_norm(dx.p, with_d ? dd.p : NULL, dw.p, layer ? db.p : NULL, n, H, eps, post,
                           dy.p, NULL));
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(y, dy.p, n * H * 2));
    GT_OK(qs_cuda_d2h(xo, dx.p, n * H * 4));
    size_t bad = 0;
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        float *r = x + i * H;
        if (with_d) /* the CPU's `x[i] += proj[i]`: one fp32 rounding */
            for (size_t j = 0; j < H; j++)
                r[j] = r[j] + (float)f16(d[i * H + j]);
        double mean = 0, var = 0;
        if (layer) {
            for (size_t j = 0; j < H; j++)
                mean += r[j];
            mean /= (double)H;
        }
        for (size_t j = 0; j < H; j++)
            var += (r[j] - mean) * (r[j] - mean);
        double inv = 1.0 / sqrt(var / (double)H + eps);
        for (size_t j = 0; j < H; j++) {
            double ref = (r[j] - mean) * inv * f16(w[j]) + (layer ? f16(b[j]) : 0.0);
            bad +=
                off(f16(y[i * H + j]), ref, 0x1p-11 * fabs(ref) + 1e-5 * (1 + fabs(ref)), &worst);
            if (post)
                bad += off(xo[i * H + j], ref, 1e-5 * (1 + fabs(ref)), &worst);
            else if (memcmp(&xo[i * H + j], &r[j], 4) != 0)
                bad++;
        }
    }
    report(what, bad, n * H * (post ? 2 : 1), worst);
out:
    dfree(&dx), dfree(&dd), dfree(&dw), dfree(&db), dfree(&dy);
    free(x), free(xo), free(d), free(w), free(b), free(y);
}

/* ---- Elementwise: add_f16, conversions, SwiGLU, ReLU --------------------- */

static void elementwise_case(size_t count, size_t off_b)
{
    dbuf dx = {0}, dd = {0}, dh = {0}, df = {0}, dg = {0}, du = {0}, dout = {0};
    float *x = gt_alloc(count * 4), *xo = gt_alloc(count * 4), *f = gt_alloc(count * 4);
    uint16_t *d = gt_alloc(count * 2), *h = gt_alloc(count * 2), *g = gt_alloc(count * 2);
    uint16_t *u = gt_alloc(count * 2), *o = gt_alloc(count * 2);
    char what[160];
    for (size_t i = 0; i < count; i++) {
        x[i] = (float)(10 * tu_gauss());
        /* conversions: the normal range, subnormals, overflow, Inf and NaN */
        switch (i % 16) {
        case 0:
            f[i] = (float)(1e-6 * tu_gauss());
            break;
        case 1:
            f[i] = (float)(1e5 * tu_gauss());
            break;
        case 2:
            f[i] = i % 32 == 2 ? INFINITY : -INFINITY;
            break;
        case 3:
            f[i] = NAN;
            break;
        default:
            f[i] = (float)(tu_gauss() * pow(2.0, (double)(int)(tu_u64() % 30) - 15));
        }
    }
    fill_f16(d, count, 0, 3);
    fill_f16(g, count, 0, 4);
    fill_f16(u, count, 0, 2);
    for (size_t i = 0; i < count; i++) /* fp16 specials into the widening test */
        h[i] = i % 16 == 5 ? 0x7c00 : i % 16 == 6 ? 0x0001 : i % 16 == 7 ? 0x8000 : d[i];
    GT_OK(dalloc(&dx, count * 4, 4 * off_b));
    GT_OK(dalloc(&dd, count * 2, 2 * off_b));
    GT_OK(dalloc(&dh, count * 2, 2 * off_b));
    GT_OK(dalloc(&df, count * 4, 4 * off_b));
    GT_OK(dalloc(&dg, count * 2, 2 * off_b));
    GT_OK(dalloc(&du, count * 2, 2 * off_b));
    GT_OK(dalloc(&dout, count * 4, 4 * off_b));

    /* x += d: exact */
    GT_OK(qs_cuda_h2d(dx.p, x, count * 4));
    GT_OK(qs_cuda_h2d(dd.p, d, count * 2));
    GT_OK(qs_cuda_add_f16(dx.p, dd.p, count, NULL));
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(xo, dx.p, count * 4));
    size_t bad = 0;
    for (size_t i = 0; i < count; i++) {
        float r = x[i] + (float)f16(d[i]);
        bad += memcmp(&r, &xo[i], 4) != 0;
    }
    snprintf(what, sizeof what, "add_f16 count=%zu off=%zu", count, off_b);
    report(what, bad, count, 0);

    /* fp32 -> fp16: qs_fp32_to_fp16's bits (NaN: any NaN) */
    GT_OK(qs_cuda_h2d(df.p, f, count * 4));
    GT_OK(qs_cuda_memset(dout.p, 0xFF, count * 2));
    GT_OK(qs_cuda_f32_to_f16(df.p, count, dout.p, NULL));
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(o, dout.p, count * 2));
    bad = 0;
    for (size_t i = 0; i < count; i++)
        bad += isnan(f[i]) ? !isnan(f16(o[i])) : o[i] != qs_fp32_to_fp16(f[i]);
    snprintf(what, sizeof what, "f32_to_f16 count=%zu off=%zu", count, off_b);
    report(what, bad, count, 0);

    /* fp16 -> fp32: exact */
    GT_OK(qs_cuda_h2d(dh.p, h, count * 2));
    GT_OK(qs_cuda_memset(dout.p, 0xFF, count * 4));
    GT_OK(qs_cuda_f16_to_f32(dh.p, count, dout.p, NULL));
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(xo, dout.p, count * 4));
    bad = 0;
    for (size_t i = 0; i < count; i++) {
        float r = qs_fp16_to_fp32(h[i]);
        bad += memcmp(&r, &xo[i], 4) != 0;
    }
    snprintf(what, sizeof what, "f16_to_f32 count=%zu off=%zu", count, off_b);
    report(what, bad, count, 0);

    /* SwiGLU into a fresh buffer, then in place over up */
    for (int inplace = 0; inplace < 2; inplace++) {
        GT_OK(qs_cuda_h2d(dg.p, g, count * 2));
        GT_OK(qs_cuda_h2d(du.p, u, count * 2));
        GT_OK(qs_cuda_memset(dout.p, 0xFF, count * 2));
        void *dst = inplace ? du.p : dout.p;
        GT_OK(qs_cuda_swiglu(dg.p, du.p, count, dst, NULL));
        GT_OK(qs_cuda_sync());
        GT_OK(qs_cuda_d2h(o, dst, count * 2));
        bad = 0;
        double worst = 0;
        for (size_t i = 0; i < count; i++) {
            double gv = f16(g[i]), ref = f16(u[i]) * (gv / (1 + exp(-gv)));
            bad += off(f16(o[i]), ref, (0x1p-11 + 1e-6) * fabs(ref) + 0x1p-24, &worst);
        }
        snprintf(what, sizeof what, "swiglu count=%zu off=%zu%s", count, off_b,
                 inplace ? " in place" : "");
        report(what, bad, count, worst);
    }

    /* ReLU: exact; NaN and -0 give +0 as the CPU's a > 0 ? a : 0 */
    for (size_t i = 0; i < count; i++)
        if (i % 16 == 9)
            g[i] = i % 32 == 9 ? 0x7e00 : 0x8000;
    GT_OK(qs_cuda_h2d(dg.p, g, count * 2));
    GT_OK(qs_cuda_memset(dout.p, 0xFF, count * 2));
    GT_OK(qs_cuda_relu(dg.p, count, dout.p, NULL));
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(o, dout.p, count * 2));
    bad = 0;
    for (size_t i = 0; i < count; i++)
        bad += o[i] != (f16(g[i]) > 0 ? g[i] : 0);
    snprintf(what, sizeof what, "relu count=%zu off=%zu", count, off_b);
    report(what, bad, count, 0);
out:
    dfree(&dx), dfree(&dd), dfree(&dh), dfree(&df), dfree(&dg), dfree(&du), dfree(&dout);
    free(x), free(xo), free(f), free(d), free(h), free(g), free(u), free(o);
}

/* ---- RoPE and the KV cache --------------------------------------------------- */

/* The format of the KV cache rope_case writes (main runs the cases in each). */
static qs_kv_format rope_fmt = QS_KV_FP16;

static void rope_case(size_t n, unsigned hq, unsigned hkv, unsigned hd, int rope, int adjacent,
                      size_t off_b)
{
    const unsigned slots = 3, max_seq = 40, half = hd / 2;
    const size_t qw = (size_t)hq * hd, kw = (size_t)hkv * hd, cache = slots * max_seq * kw;
    /* int8/int4: codes (cb bytes per vector) and (scale, min) pairs (ng). */
    const int quant = rope_fmt != QS_KV_FP16;
    const size_t nvec = (size_t)slots * max_seq * hkv, cb = qs_kv_code_bytes(rope_fmt, hd);
    const size_t ng = qs_kv_groups(hd), cbytes = quant ? nvec * cb : cache * 2,
                 sbytes = nvec * ng * 4;
    dbuf dq = {0}, dk = {0}, dv = {0}, dkc = {0}, dvc = {0}, dcs = {0}, dslot = {0}, dpos = {0};
    dbuf dks = {0}, dvs = {0};
    uint16_t *q = gt_alloc(n * qw * 2), *k = gt_alloc(n * kw * 2), *v = gt_alloc(n * kw * 2);
    uint16_t *qo = gt_alloc(n * qw * 2), *ko = gt_alloc(n * kw * 2);
    uint16_t *kc = gt_alloc(cbytes), *vc = gt_alloc(cbytes);
    uint16_t *ks = gt_alloc(sbytes), *vs = gt_alloc(sbytes), *wsm = gt_alloc(hkv * ng * 4);
    uint8_t *wc = gt_alloc(hkv * cb + 1);
    float *xf = gt_alloc(kw * 4);
    float *cs = gt_alloc((size_t)max_seq * hd * 4);
    uint32_t *slot = gt_alloc(n * 4), *pos = gt_alloc(n * 4);
    char *used = gt_alloc(slots * max_seq);
    char what[160];
    snprintf(what, sizeof what, "rope_kv%s n=%zu hq=%u hkv=%u hd=%u %s off=%zu",
             rope_fmt == QS_KV_INT8   ? " int8"
             : rope_fmt == QS_KV_INT4 ? " int4"
                                      : "",
             n, hq, hkv, hd,
             !rope      ? "no-rope"
             : adjacent ? "adjacent"
                        : "halves",
             off_b);
    for (size_t p = 0; p < max_seq; p++) /* shard/model.c's rope_table, theta 10000 */
        for (size_t i = 0; i < half; i++) {
            double f = (double)p * pow(10000.0, -2.0 * (double)i / hd);
            cs[(p * half + i) * 2] = (float)cos(f);
            cs[(p * half + i) * 2 + 1] = (float)sin(f);
        }
    for (size_t i = 0; i < n; i++) { /* distinct (slot, pos): one writer per cache row */
        do {
            slot[i] = (uint32_t)(tu_u64() % slots);
            pos[i] = (uint32_t)(tu_u64() % max_seq);
        } while (used[slot[i] * max_seq + pos[i]]);
        used[slot[i] * max_seq + pos[i]] = 1;
    }
    fill_f16(q, n * qw, 0, 1);
    fill_f16(k, n * kw, 0, 1);
    fill_f16(v, n * kw, 0, 1);
    GT_OK(dalloc(&dq, n * qw * 2, 2 * off_b));
    GT_OK(dalloc(&dk, n * kw * 2, 2 * off_b));
    GT_OK(dalloc(&dv, n * kw * 2, 2 * off_b));
    GT_OK(dalloc(&dkc, cbytes, 2 * off_b));
    GT_OK(dalloc(&dvc, cbytes, 2 * off_b));
    GT_OK(dalloc(&dks, sbytes, 4 * off_b));
    GT_OK(dalloc(&dvs, sbytes, 4 * off_b));
    GT_OK(dalloc(&dcs, (size_t)max_seq * hd * 4, 4 * off_b));
    GT_OK(dalloc(&dslot, n * 4, 0));
    GT_OK(dalloc(&dpos, n * 4, 0));
    GT_OK(qs_cuda_h2d(dq.p, q, n * qw * 2));
    GT_OK(qs_cuda_h2d(dk.p, k, n * kw * 2));
    GT_OK(qs_cuda_h2d(dv.p, v, n * kw * 2));
    GT_OK(qs_cuda_h2d(dcs.p, cs, (size_t)max_seq * hd * 4));
    GT_OK(qs_cuda_h2d(dslot.p, slot, n * 4));
    GT_OK(qs_cuda_h2d(dpos.p, pos, n * 4));
    GT_OK(qs_cuda_memset(dkc.p, 0xFF, cbytes));
    GT_OK(qs_cuda_memset(dvc.p, 0xFF, cbytes));
    GT_OK(qs_cuda_memset(dks.p, 0xFF, sbytes));
    GT_OK(qs_cuda_memset(dvs.p, 0xFF, sbytes));
    if (quant) {
        const qs_cuda_kv kv = {rope_fmt, dkc.p, dvc.p, dks.p, dvs.p};
        GT_OK(qs_cuda_rope_kvq(dq.p, dk.p, dv.p, n, hq, hkv, hd, rope ? dcs.p : NULL, adjacent,
                               dslot.p, dpos.p, &kv, max_seq, NULL));
    } else {
        GT_OK(qs_cuda_rope_kv(dq.p, dk.p, dv.p, n, hq, hkv, hd, rope ? dcs.p : NULL, adjacent,
                              dslot.p, dpos.p, dkc.p, dvc.p, max_seq, NULL));
    }
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(qo, dq.p, n * qw * 2));
    GT_OK(qs_cuda_d2h(ko, dk.p, n * kw * 2));
    GT_OK(qs_cuda_d2h(kc, dkc.p, cbytes));
    GT_OK(qs_cuda_d2h(vc, dvc.p, cbytes));
    GT_OK(qs_cuda_d2h(ks, dks.p, sbytes));
    GT_OK(qs_cuda_d2h(vs, dvs.p, sbytes));
    size_t bad = 0, checked = 0;
    double worst = 0;
    for (size_t i = 0; i < n; i++)
        for (unsigned h = 0; h < hq + hkv; h++) {
            const uint16_t *in =
                h < hq ? q + i * qw + (size_t)h * hd : k + i * kw + (size_t)(h - hq) * hd;
            const uint16_t *got =
                h < hq ? qo + i * qw + (size_t)h * hd : ko + i * kw + (size_t)(h - hq) * hd;
            if (!rope) { /* untouched */
                bad += memcmp(in, got, hd * 2) != 0;
                checked++;
                continue;
            }
            const float *c = cs + (size_t)pos[i] * hd;
            for (unsigned j = 0; j < half; j++) {
                unsigned a = adjacent ? 2 * j : j, b = adjacent ? 2 * j + 1 : j + half;
                double x = f16(in[a]), y = f16(in[b]);
                double ra = x * c[2 * j] - y * c[2 * j + 1], rb = x * c[2 * j + 1] + y * c[2 * j];
                double ab = 1e-6 * (fabs(x) + fabs(y));
                bad += off(f16(got[a]), ra, 0x1p-11 * fabs(ra) + ab, &worst);
                bad += off(f16(got[b]), rb, 0x1p-11 * fabs(rb) + ab, &worst);
                checked += 2;
            }
        }
    /* int8/int4: the codes and scales at (slot, pos) are qs_kv_quantize's of
     * k's rotated row and of v's row as fp16 holds them, bit for bit; the
     * rows no token wrote keep their 0xFF poison. */
    for (size_t s = 0; quant && s < slots; s++)
        for (size_t p = 0; p < max_seq; p++) {
            size_t r = (s * max_seq + p) * hkv, i = 0;
            while (i < n && !(slot[i] == s && pos[i] == p))
                i++;
            for (int isv = 0; isv < 2; isv++) {
                const uint8_t *gc = (const uint8_t *)(isv ? vc : kc) + r * cb;
                const uint16_t *gs = (isv ? vs : ks) + r * ng * 2;
                if (i == n) {
                    for (size_t e = 0; e < hkv * cb; e++)
                        bad += gc[e] != 0xFF;
                    for (size_t e = 0; e < hkv * ng * 2; e++)
                        bad += gs[e] != 0xFFFF;
                    checked += hkv * (cb + ng * 2);
                    continue;
                }
                for (size_t e = 0; e < kw; e++)
                    xf[e] = qs_fp16_to_fp32((isv ? v : ko)[i * kw + e]);
                GT_OK(qs_kv_quantize(rope_fmt, xf, hkv, hd, wc, wsm));
                bad += memcmp(gc, wc, hkv * cb) != 0;
                bad += memcmp(gs, wsm, hkv * ng * 4) != 0;
                checked += 2;
            }
        }
    /* the caches: k's rotated row and v's row at (slot, pos), 0xFFFF elsewhere */
    for (size_t s = 0; !quant && s < slots; s++)
        for (size_t p = 0; p < max_seq; p++) {
            const uint16_t *kr = kc + (s * max_seq + p) * kw, *vr = vc + (s * max_seq + p) * kw;
            size_t i = 0;
            while (i < n && !(slot[i] == s && pos[i] == p))
                i++;
            for (size_t e = 0; e < kw; e++) {
                uint16_t ke = i < n ? ko[i * kw + e] : 0xFFFF, ve = i < n ? v[i * kw + e] : 0xFFFF;
                bad += (kr[e] != ke) + (vr[e] != ve);
            }
            checked += 2 * kw;
        }
    report(what, bad, checked, worst);
out:
    dfree(&dq), dfree(&dk), dfree(&dv), dfree(&dkc), dfree(&dvc), dfree(&dcs), dfree(&dslot),
        dfree(&dpos), dfree(&dks), dfree(&dvs);
    free(ks), free(vs), free(wsm), free(wc), free(xf);
    free(q), free(k), free(v), free(qo), free(ko), free(kc), free(vc), free(cs), free(slot),
        free(pos), free(used);
}

/* ---- Embedding rows and learned positions ------------------------------------ */

static void embed_case(size_t n, size_t E, size_t off_b)
{
    const uint32_t v_first = 100, vr = 37, P = 50;
    dbuf dtab = {0}, dtok = {0}, dx = {0}, dpt = {0}, dpos = {0};
    uint16_t *tab = gt_alloc((size_t)vr * E * 2), *pt = gt_alloc((size_t)(P + 2) * E * 2);
    int32_t *tok = gt_alloc(n * 4);
    uint32_t *pos = gt_alloc(n * 4);
    float *x = gt_alloc(n * E * 4);
    char what[160];
    fill_f16(tab, (size_t)vr * E, 0, 0.5);
    fill_f16(pt, (size_t)(P + 2) * E, 0, 0.5);
    for (size_t i = 0; i < n; i++) { /* inside, below, above the block, the edges, negative */
        uint64_t r = tu_u64() % 6;
        tok[i] = r == 0   ? (int32_t)(tu_u64() % v_first)
                 : r == 1 ? (int32_t)(v_first + vr + tu_u64() % 1000)
                 : r == 2 ? -1 - (int32_t)(tu_u64() % 5)
                 : r == 3 ? (int32_t)(i % 2 ? v_first : v_first + vr - 1)
                          : (int32_t)(v_first + tu_u64() % vr);
        pos[i] = (uint32_t)(tu_u64() % P);
    }
    GT_OK(dalloc(&dtab, (size_t)vr * E * 2, 2 * off_b));
    GT_OK(dalloc(&dpt, (size_t)(P + 2) * E * 2, 2 * off_b));
    GT_OK(dalloc(&dtok, n * 4, 0));
    GT_OK(dalloc(&dpos, n * 4, 0));
    GT_OK(dalloc(&dx, n * E * 4, 4 * off_b));
    GT_OK(qs_cuda_h2d(dtab.p, tab, (size_t)vr * E * 2));
    GT_OK(qs_cuda_h2d(dpt.p, pt, (size_t)(P + 2) * E * 2));
    GT_OK(qs_cuda_h2d(dtok.p, tok, n * 4));
    GT_OK(qs_cuda_h2d(dpos.p, pos, n * 4));
    GT_OK(qs_cuda_memset(dx.p, 0xFF, n * E * 4));
    GT_OK(qs_cuda_embed(dtok.p, n, dtab.p, v_first, vr, E, dx.p, NULL));
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(x, dx.p, n * E * 4));
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t t = (uint32_t)tok[i];
        int in = t >= v_first && t < v_first + vr;
        for (size_t j = 0; j < E; j++) {
            float r = in ? qs_fp16_to_fp32(tab[(t - v_first) * E + j]) : 0.0f;
            bad += memcmp(&r, &x[i * E + j], 4) != 0;
        }
    }
    snprintf(what, sizeof what, "embed n=%zu E=%zu block [%u, %u) off=%zu", n, E, v_first,
             v_first + vr, off_b);
    report(what, bad, n * E, 0);

    /* x += positions table row pos + 2 (OPT) */
    GT_OK(qs_cuda_add_pos(dx.p, dpos.p, n, E, dpt.p, 2, NULL));
    GT_OK(qs_cuda_sync());
    float *y = gt_alloc(n * E * 4);
    GT_OK(qs_cuda_d2h(y, dx.p, n * E * 4));
    bad = 0;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < E; j++) {
            float r = x[i * E + j] + qs_fp16_to_fp32(pt[(pos[i] + 2) * E + j]);
            bad += memcmp(&r, &y[i * E + j], 4) != 0;
        }
    free(y);
    snprintf(what, sizeof what, "add_pos n=%zu H=%zu offset 2 off=%zu", n, E, off_b);
    report(what, bad, n * E, 0);
out:
    dfree(&dtab), dfree(&dtok), dfree(&dx), dfree(&dpt), dfree(&dpos);
    free(tab), free(pt), free(tok), free(pos), free(x);
}

/* ---- cuBLAS linear, fp16 and fp32 out ----------------------------------------- */

static void linear_case(size_t M, size_t N, size_t K)
{
    dbuf dW = {0}, dX = {0}, dY = {0};
    uint16_t *W = gt_alloc(N * K * 2), *X = gt_alloc(M * K * 2), *Yh = gt_alloc(M * N * 2);
    float *Yf = gt_alloc(M * N * 4);
    double *R = gt_alloc(M * N * 8);
    char what[160];
    fill_f16(W, N * K, 0, 0.05);
    fill_f16(X, M * K, 0, 1);
    for (size_t m = 0; m < M; m++)
        for (size_t o = 0; o < N; o++) {
            double a = 0;
            for (size_t k = 0; k < K; k++)
                a += f16(X[m * K + k]) * f16(W[o * K + k]);
            R[m * N + o] = a;
        }
    GT_OK(dalloc(&dW, N * K * 2, 0));
    GT_OK(dalloc(&dX, M * K * 2, 0));
    GT_OK(dalloc(&dY, M * N * 4, 0));
    GT_OK(qs_cuda_h2d(dW.p, W, N * K * 2));
    GT_OK(qs_cuda_h2d(dX.p, X, M * K * 2));
    GT_OK(qs_cuda_memset(dY.p, 0xFF, M * N * 4));
    GT_OK(qs_cuda_linear_f16(dW.p, dX.p, M, N, K, dY.p, 1, NULL));
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(Yf, dY.p, M * N * 4));
    size_t bad = 0;
    for (size_t i = 0; i < M * N; i++)
        bad += !isfinite(Yf[i]);
    double rel = tu_rel_l2(Yf, R, M * N);
    int ok = !bad && rel <= 1e-5;
    gt_cases++;
    gt_failures += !ok;
    snprintf(what, sizeof what, "linear_f16 fp32 out M=%zu N=%zu K=%zu", M, N, K);
    printf("%s %-48s rel_l2 %.3e (bound 1e-05)%s\n", ok ? "ok  " : "FAIL", what, rel,
           bad ? " NON-FINITE/UNWRITTEN OUTPUTS" : "");
    GT_OK(qs_cuda_memset(dY.p, 0xFF, M * N * 2));
    GT_OK(qs_cuda_linear_f16(dW.p, dX.p, M, N, K, dY.p, 0, NULL));
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(Yh, dY.p, M * N * 2));
    snprintf(what, sizeof what, "linear_f16 fp16 out M=%zu N=%zu K=%zu", M, N, K);
    gt_check(what, Yh, R, M * N, 5e-4);
out:
    dfree(&dW), dfree(&dX), dfree(&dY);
    free(W), free(X), free(Yh), free(Yf), free(R);
}

/* ---- Logits gathered from P ranks' blocks --------------------------------------- */

static void gather_case(size_t P, size_t nl, size_t V, size_t off_b)
{
    const size_t vr = (V + P - 1) / P;
    dbuf da = {0}, dl = {0};
    float *all = gt_alloc(P * nl * vr * 4), *lg = gt_alloc(nl * V * 4);
    char what[160];
    for (size_t i = 0; i < P * nl * vr; i++)
        all[i] = (float)tu_gauss();
    GT_OK(dalloc(&da, P * nl * vr * 4, 4 * off_b));
    GT_OK(dalloc(&dl, nl * V * 4, 4 * off_b));
    GT_OK(qs_cuda_h2d(da.p, all, P * nl * vr * 4));
    GT_OK(qs_cuda_memset(dl.p, 0xFF, nl * V * 4));
    GT_OK(qs_cuda_gather_logits(da.p, P, nl, vr, V, dl.p, NULL));
    GT_OK(qs_cuda_sync());
    GT_OK(qs_cuda_d2h(lg, dl.p, nl * V * 4));
    size_t bad = 0; /* logits_forward's transpose */
    for (size_t r = 0; r < P; r++)
        for (size_t i = 0; i < nl; i++)
            for (size_t j = 0; j < vr && r * vr + j < V; j++)
                bad += memcmp(&lg[i * V + r * vr + j], &all[(r * nl + i) * vr + j], 4) != 0;
    for (size_t i = 0; i < nl * V; i++)
        bad += isnan(lg[i]); /* every element written */
    snprintf(what, sizeof what, "gather_logits P=%zu nl=%zu V=%zu vr=%zu off=%zu", P, nl, V, vr,
             off_b);
    report(what, bad, nl * V, 0);
out:
    dfree(&da), dfree(&dl);
    free(all), free(lg);
}

/* ---- Arguments the calls must refuse ------------------------------------------- */

static void refusals(void)
{
    int bad = 0;
    float f = 0;
    bad += qs_cuda_add_norm(NULL, NULL, &f, NULL, 1, 8, 1e-5f, 0, &f, NULL) != QS_EINVAL;
    bad += qs_cuda_add_norm(&f, NULL, &f, NULL, 1, 0, 1e-5f, 0, &f, NULL) != QS_EINVAL;
    bad += qs_cuda_rope_kv(&f, &f, &f, 1, 1, 1, 7, &f, 1, (uint32_t *)&f, (uint32_t *)&f, &f, &f, 8,
                           NULL) != QS_EINVAL;        /* odd head size with RoPE */
    qs_cuda_kv kv = {QS_KV_INT4, &f, &f, NULL, NULL}; /* no scale arrays */
    bad += qs_cuda_rope_kvq(&f, &f, &f, 1, 1, 1, 8, NULL, 1, (uint32_t *)&f, (uint32_t *)&f, &kv, 8,
                            NULL) != QS_EINVAL;
    bad += qs_cuda_gather_logits(&f, 2, 1, 3, 7, &f, NULL) != QS_EINVAL; /* 2 x 3 < 7 */
    bad += qs_cuda_linear_f16(&f, &f, 0, 1, 1, &f, 0, NULL) != QS_EINVAL;
    bad += qs_cuda_embed(NULL, 1, &f, 0, 1, 1, &f, NULL) != QS_EINVAL;
    /* nothing to do is not an error, and launches nothing */
    bad += qs_cuda_add_f16(&f, &f, 0, NULL) != QS_OK;
    bad += qs_cuda_swiglu(&f, &f, 0, &f, NULL) != QS_OK;
    gt_cases++;
    gt_failures += bad != 0;
    printf("%s refusals of bad arguments: %d wrong\n", bad ? "FAIL" : "ok  ", bad);
}

int main(void)
{
    tu_seed("test_gpu_ops");
    gt_need_gpu();
    const int emu = qs_cuda_emulated();

    /* norms: H = 1, 7, 1000, 1030 (scalar), 576, 4096 (16-byte), odd batches */
    static const size_t Hs[] = {1, 7, 576, 1000, 1030, 4096};
    for (size_t h = 0; h < sizeof Hs / sizeof Hs[0]; h++)
        for (int layer = 0; layer < 2; layer++) {
            size_t n = h % 2 ? 3 : 5;
            norm_case(n, Hs[h], layer, 1, 0, 0);
            norm_case(1, Hs[h], layer, (int)(h % 2), 1, 0);
        }
    norm_case(2, 576, 1, 1, 0, 1); /* misaligned: the scalar path of H % 8 == 0 */
    norm_case(2, 4096, 0, 1, 1, 2);
    norm_case(emu ? 9 : 64, 12288, 1, 1, 0, 0);

    static const size_t counts[] = {1, 7, 8, 1001, 4099};
    for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++)
        elementwise_case(counts[c], 0);
    elementwise_case(1001, 1);
    elementwise_case(emu ? 70000 : 3000001, 0);

    /* RoPE: odd head counts, hd 6 (scalar), 24 (adjacent 16-byte, halves
     * scalar), 64 and 128 (16-byte both), no RoPE (OPT), misaligned */
    for (int layout = 0; layout < 3; layout++) {
        int rope = layout < 2, adj = layout == 0;
        rope_case(1, 3, 1, 64, rope, adj, 0);
        rope_case(5, 5, 5, 6, rope, adj, 0);
        rope_case(9, 7, 1, 24, rope, adj, 0);
        rope_case(4, 4, 2, 128, rope, adj, 0);
        rope_case(3, 9, 3, 64, rope, adj, 1);
    }
    /* The same into int8 and int4 caches: hd 6 and 24 (scalar, one short
     * group), 80 (a group of 16), 64 and 128 (16-byte, whole groups). */
    for (rope_fmt = QS_KV_INT8; rope_fmt <= QS_KV_INT4; rope_fmt++)
        for (int layout = 0; layout < 3; layout++) {
            int rope = layout < 2, adj = layout == 0;
            rope_case(1, 3, 1, 64, rope, adj, 0);
            rope_case(5, 5, 5, 6, rope, adj, 0);
            rope_case(9, 7, 1, 24, rope, adj, 0);
            rope_case(4, 4, 2, 128, rope, adj, 0);
            rope_case(6, 2, 2, 80, rope, adj, 0);
            rope_case(3, 9, 3, 64, rope, adj, 1);
        }
    rope_fmt = QS_KV_FP16;

    embed_case(1, 64, 0);
    embed_case(17, 13, 0);
    embed_case(9, 576, 0);
    embed_case(9, 576, 1);

    linear_case(1, 37, 77);
    linear_case(5, 100, 64);
    linear_case(33, 129, 300);

    gather_case(1, 3, 1000, 0);
    gather_case(3, 2, 1000, 0);
    gather_case(4, 3, 257, 0);
    gather_case(4, 1, 5, 0); /* the last rank holds padding only */
    gather_case(2, 3, 49152, 0);
    gather_case(3, 2, 1000, 1);
    refusals();
    return gt_summary("test_gpu_ops");
}
