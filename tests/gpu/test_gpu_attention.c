/* test_gpu_attention.c: qs_cuda_attention (flash-decoding: any slot and
 * position per token, positions split across CTAs) and
 * qs_cuda_attention_prefill (tiled tensor-core kernel, tokens of one slot)
 * against a float64 causal grouped-query attention on the same fp16 inputs.
 *
 * Inputs: q ~ N(0, 1) (x4 in the "sharp" cases, scores of sd 4, where the
 * online maximum moves a lot), K and V ~ N(0, 1), all fp16. The cache holds
 * random rows only up to the last position any token of the slot attends
 * to; every other row of the cache is poisoned (0xFFFF, NaN), so reading
 * one position too many makes outputs NaN. Outputs are poisoned (0xFF)
 * before each call; so is the workspace on a GPU (under the harness it is
 * left unwritten, so that reading a partial nobody wrote is reported).
 *
 * The split chunk is lowered to 64 positions (qs_cuda_attention_set_chunk)
 * so that max_seq 64..300 gives 1..5 splits; positions sit at 0, on both
 * sides of split boundaries (63/64, 127/128, 191/192) and at max_seq - 1.
 * Shapes: SmolLM2 (hd 64, 9 query / 3 KV heads, and its 2-rank split 6 + 3
 * with q_first 6, kv_first 2), Llama-like hd 128 group 8 with offsets, MHA
 * (group 1) with ragged head counts, KV replicated across ranks (group 8,
 * 4 query heads), q_first not a multiple of the group, group 12 (two CTAs
 * per KV head), hd 32 and 80 (lanes and columns past hd).
 *
 * Every case runs three times: over an fp16 cache, and over int8 and int4
 * caches (qs_kv_quantize's codes of N(0, 1) rows, quantized on the host;
 * the reference reads their dequantized values, as the CPU's attention does;
 * rows never to be read hold codes 255 with NaN scales).
 *
 * Bound: relative L2 over all outputs <= 1e-3 and over each (token, head)
 * row <= 4e-3. The output is rounded to fp16 once (relative error <= 2^-11,
 * about 2e-4 in L2); the prefill kernel rounds P to fp16 for the tensor
 * cores (<= 2^-11 per weight, ~2e-4 in L2); fp32 sums over <= 300
 * positions and exp2f's few ulps are far below that. One position too many
 * or too few changes a row by ~1/sqrt(len) relative (>= 0.05 here). A
 * quantized cache adds nothing in the decode kernel (c s + m in fp32, as
 * the reference takes it) and one fp16 rounding of K and V in the prefill
 * kernel's tiles (2^-11 relative, as an fp16 cache's own rounding). A wrong
 * code, nibble or group's scale moves a row by far more than the bounds.
 *
 * Under the harness, the bank model's counts for the kernels' shared
 * accesses are printed (counts, not time); the decode kernel's must be
 * conflict-free, and so must the prefill kernel's but for its WMMA fragment
 * accesses, which the bank model leaves out (their layout under the harness
 * is not the GPU's). Skips (77) without a GPU. */
#include "gpu_test.h"

#ifdef QS_CUDA_EMU
#include "qs_emu_api.h"
#endif

#define AT_CHUNK 64

enum { AT_SPLIT = 1, AT_PREFILL = 2 };

typedef struct at_shape {
    unsigned hq, hkv, hd, group, q_first, kv_first, max_seq, slots;
} at_shape;

/* Reference: out[i][h][:] = softmax(q . K^T / sqrt(hd)) V in double. */
static void at_reference(const at_shape *s, size_t n, const uint32_t *slot, const uint32_t *pos,
                         const float *qf, const float *kf, const float *vf, double *R)
{
    size_t rowe = (size_t)s->hkv * s->hd;
    double *sc = gt_alloc(s->max_seq * sizeof(double));
    for (size_t i = 0; i < n; i++)
        for (unsigned h = 0; h < s->hq; h++) {
            unsigned kvh = (s->q_first + h) / s->group - s->kv_first;
            const float *qi = qf + (i * s->hq + h) * s->hd;
            const float *kb = kf + (size_t)slot[i] * s->max_seq * rowe + (size_t)kvh * s->hd;
            const float *vb = vf + (size_t)slot[i] * s->max_seq * rowe + (size_t)kvh * s->hd;
            double mx = -INFINITY, sum = 0;
            for (uint32_t p = 0; p <= pos[i]; p++) {
                double d = 0;
                for (unsigned j = 0; j < s->hd; j++)
                    d += (double)qi[j] * kb[p * rowe + j];
                sc[p] = d / sqrt((double)s->hd);
                mx = sc[p] > mx ? sc[p] : mx;
            }
            for (uint32_t p = 0; p <= pos[i]; p++)
                sum += sc[p] = exp(sc[p] - mx);
            double *o = R + (i * s->hq + h) * s->hd;
            for (unsigned j = 0; j < s->hd; j++)
                o[j] = 0;
            for (uint32_t p = 0; p <= pos[i]; p++)
                for (unsigned j = 0; j < s->hd; j++)
                    o[j] += sc[p] / sum * vb[p * rowe + j];
        }
    free(sc);
}

/* gt_check over all outputs, then the worst (token, head) row. */
static void at_check(const char *what, const uint16_t *Yh, const double *R, size_t rows,
                     unsigned hd)
{
    gt_check(what, Yh, R, rows * hd, 1e-3);
    double worst = 0;
    size_t wr = 0;
    for (size_t r = 0; r < rows; r++) {
        double num = 0, den = 0;
        for (unsigned j = 0; j < hd; j++) {
            double y = qs_fp16_to_fp32(Yh[r * hd + j]), d = y - R[r * hd + j];
            num += d * d, den += R[r * hd + j] * R[r * hd + j];
        }
        double rel = sqrt(num / (den > 0 ? den : 1));
        if (!(rel <= worst)) /* NaN counts as worst */
            worst = rel, wr = r;
    }
    int ok = worst <= 4e-3;
    gt_cases++;
    gt_failures += !ok;
    printf("%s %-48s worst row %zu: rel_l2 %.3e (bound 4e-3)\n", ok ? "ok  " : "FAIL", what, wr,
           worst);
}

/* The cache's format of the cases run (main runs every case in each). */
static qs_kv_format at_fmt = QS_KV_FP16;

static const char *at_fmt_tag(void)
{
    return at_fmt == QS_KV_INT8 ? " int8" : at_fmt == QS_KV_INT4 ? " int4" : "";
}

/* One case: n tokens with host slot/pos; `runs`: which entries to call.
 * pos2 (or NULL): a second step on the same buffers with these positions
 * and the workspace left as the first step left it, as a replayed graph
 * finds it. */
static void at_case(const char *name, const at_shape *s, size_t n, const uint32_t *slot,
                    const uint32_t *pos, const uint32_t *pos2, double qmul, int runs)
{
    size_t rowe = (size_t)s->hkv * s->hd, cache = (size_t)s->slots * s->max_seq * rowe;
    size_t qn = n * s->hq * s->hd, wsb = qs_cuda_attention_ws_bytes(n, s->hq, s->hd, s->max_seq);
    /* The device's cache: fp16 rows, or codes (cb bytes per vector) and
     * (scale, min) pairs (ng per vector). */
    const int quant = at_fmt != QS_KV_FP16;
    size_t nvec = (size_t)s->slots * s->max_seq * s->hkv, cb = qs_kv_code_bytes(at_fmt, s->hd);
    size_t ng = qs_kv_groups(s->hd), cbytes = quant ? nvec * cb : cache * 2;
    uint16_t *qh = gt_alloc(qn * 2), *kh = gt_alloc(cbytes), *vh = gt_alloc(cbytes);
    uint16_t *ksm = gt_alloc(nvec * ng * 4), *vsm = gt_alloc(nvec * ng * 4);
    uint16_t *Yh = gt_alloc(qn * 2);
    float *qf = gt_alloc(qn * 4), *kf = gt_alloc(cache * 4), *vf = gt_alloc(cache * 4);
    double *R = gt_alloc(qn * 8);
    void *dq = NULL, *dk = NULL, *dv = NULL, *dout = NULL, *dws = NULL, *dslot = NULL, *dpos = NULL;
    void *dks = NULL, *dvs = NULL;
    long *ext = gt_alloc(s->slots * sizeof(long));
    char what[160];

    for (unsigned sl = 0; sl < s->slots; sl++)
        ext[sl] = -1;
    for (size_t i = 0; i < n; i++)
        for (int k = 0; k < 2; k++) {
            const uint32_t *pk = k ? pos2 : pos;
            if (pk && (long)pk[i] > ext[slot[i]])
                ext[slot[i]] = pk[i];
        }
    for (size_t i = 0; i < qn; i++) {
        qh[i] = qs_fp32_to_fp16((float)(qmul * tu_gauss()));
        qf[i] = qs_fp16_to_fp32(qh[i]);
    }
    for (unsigned sl = 0; sl < s->slots; sl++)
        for (unsigned p = 0; p < s->max_seq; p++) {
            size_t o = ((size_t)sl * s->max_seq + p) * rowe, r = o / s->hd;
            if ((long)p <= ext[sl] && !quant) {
                gt_random_x(rowe, kh + o, kf + o);
                gt_random_x(rowe, vh + o, vf + o);
            } else if ((long)p <= ext[sl]) {
                /* N(0, 1) rows quantized on the host; the reference reads
                 * their dequantized values, as the CPU's attention does. */
                uint8_t *kc = (uint8_t *)kh + r * cb, *vc = (uint8_t *)vh + r * cb;
                tu_fill_gauss(kf + o, rowe, 1.0);
                tu_fill_gauss(vf + o, rowe, 1.0);
                GT_OK(qs_kv_quantize(at_fmt, kf + o, s->hkv, s->hd, kc, ksm + r * ng * 2));
                GT_OK(qs_kv_quantize(at_fmt, vf + o, s->hkv, s->hd, vc, vsm + r * ng * 2));
                GT_OK(qs_kv_dequant(at_fmt, kc, ksm + r * ng * 2, s->hkv, s->hd, kf + o));
                GT_OK(qs_kv_dequant(at_fmt, vc, vsm + r * ng * 2, s->hkv, s->hd, vf + o));
            } else if (!quant) {
                memset(kh + o, 0xFF, rowe * 2); /* NaN: must never be read */
                memset(vh + o, 0xFF, rowe * 2);
            } else { /* codes 255, scale and min NaN: must never be read */
                memset((uint8_t *)kh + r * cb, 0xFF, s->hkv * cb);
                memset((uint8_t *)vh + r * cb, 0xFF, s->hkv * cb);
                memset(ksm + r * ng * 2, 0xFF, s->hkv * ng * 4);
                memset(vsm + r * ng * 2, 0xFF, s->hkv * ng * 4);
            }
        }
    at_reference(s, n, slot, pos, qf, kf, vf, R);

    GT_OK(qs_cuda_malloc(&dq, qn * 2));
    GT_OK(qs_cuda_malloc(&dk, cbytes));
    GT_OK(qs_cuda_malloc(&dv, cbytes));
    if (quant) {
        GT_OK(qs_cuda_malloc(&dks, nvec * ng * 4));
        GT_OK(qs_cuda_malloc(&dvs, nvec * ng * 4));
        GT_OK(qs_cuda_h2d(dks, ksm, nvec * ng * 4));
        GT_OK(qs_cuda_h2d(dvs, vsm, nvec * ng * 4));
    }
    const qs_cuda_kv kv = {at_fmt, dk, dv, dks, dvs};
    GT_OK(qs_cuda_malloc(&dout, qn * 2));
    GT_OK(qs_cuda_malloc(&dslot, n * 4));
    GT_OK(qs_cuda_malloc(&dpos, n * 4));
    if (wsb)
        GT_OK(qs_cuda_malloc(&dws, wsb));
    GT_OK(qs_cuda_h2d(dq, qh, qn * 2));
    GT_OK(qs_cuda_h2d(dk, kh, cbytes));
    GT_OK(qs_cuda_h2d(dv, vh, cbytes));
    GT_OK(qs_cuda_h2d(dslot, slot, n * 4));
    GT_OK(qs_cuda_h2d(dpos, pos, n * 4));
    for (int run = AT_SPLIT; run <= AT_PREFILL; run <<= 1) {
        if (!(runs & run))
            continue;
        snprintf(what, sizeof what, "%s%s %s hq=%u/%u hd=%u g=%u n=%zu",
                 run == AT_SPLIT ? "split" : "tiled", at_fmt_tag(), name, s->hq, s->hkv, s->hd,
                 s->group, n);
        GT_OK(qs_cuda_memset(dout, 0xFF, qn * 2));
        if (dws && !qs_cuda_emulated())
            GT_OK(qs_cuda_memset(dws, 0xFF, wsb));
        if (run == AT_SPLIT && !quant)
            GT_OK(qs_cuda_attention(dq, dk, dv, n, dslot, dpos, s->hq, s->hkv, s->hd, s->group,
                                    s->q_first, s->kv_first, s->max_seq, dws, dout, NULL));
        else if (run == AT_SPLIT)
            GT_OK(qs_cuda_attention_kvq(dq, &kv, n, dslot, dpos, s->hq, s->hkv, s->hd, s->group,
                                        s->q_first, s->kv_first, s->max_seq, dws, dout, NULL));
        else if (!quant)
            GT_OK(qs_cuda_attention_prefill(dq, dk, dv, n, dslot, dpos, s->hq, s->hkv, s->hd,
                                            s->group, s->q_first, s->kv_first, s->max_seq, dout,
                                            NULL));
        else
            GT_OK(qs_cuda_attention_prefill_kvq(dq, &kv, n, dslot, dpos, s->hq, s->hkv, s->hd,
                                                s->group, s->q_first, s->kv_first, s->max_seq, dout,
                                                NULL));
        GT_OK(qs_cuda_sync());
        GT_OK(qs_cuda_d2h(Yh, dout, qn * 2));
        at_check(what, Yh, R, n * s->hq, s->hd);
    }
    if (pos2) {
        snprintf(what, sizeof what, "split%s %s next step", at_fmt_tag(), name);
        at_reference(s, n, slot, pos2, qf, kf, vf, R);
        GT_OK(qs_cuda_h2d(dpos, pos2, n * 4));
        GT_OK(qs_cuda_memset(dout, 0xFF, qn * 2));
        GT_OK(qs_cuda_attention_kvq(dq, &kv, n, dslot, dpos, s->hq, s->hkv, s->hd, s->group,
                                    s->q_first, s->kv_first, s->max_seq, dws, dout, NULL));
        GT_OK(qs_cuda_sync());
        GT_OK(qs_cuda_d2h(Yh, dout, qn * 2));
        at_check(what, Yh, R, n * s->hq, s->hd);
    }
out:
    qs_cuda_free(dq), qs_cuda_free(dk), qs_cuda_free(dv), qs_cuda_free(dout);
    qs_cuda_free(dws), qs_cuda_free(dslot), qs_cuda_free(dpos), qs_cuda_free(dks);
    qs_cuda_free(dvs);
    free(qh), free(kh), free(vh), free(Yh), free(qf), free(kf), free(vf), free(R), free(ext);
    free(ksm), free(vsm);
}

/* A run of n consecutive positions p0.. of one slot: both entries. */
static void at_prefill(const char *name, const at_shape *s, uint32_t sl, uint32_t p0, size_t n,
                       double qmul)
{
    uint32_t *slot = gt_alloc(n * 4), *pos = gt_alloc(n * 4);
    for (size_t i = 0; i < n; i++)
        slot[i] = sl, pos[i] = p0 + (uint32_t)i;
    at_case(name, s, n, slot, pos, NULL, qmul, AT_SPLIT | AT_PREFILL);
    free(slot), free(pos);
}

static void at_expect_einval(const char *what, int err)
{
    int ok = err == QS_EINVAL;
    gt_cases++;
    gt_failures += !ok;
    printf("%s refuses %-40s %s%s\n", ok ? "ok  " : "FAIL", what, qs_strerror(err),
           ok ? "" : " (expected invalid argument)");
    if (ok)
        printf("     \"%s\"\n", qs_errmsg());
}

/* Bad arguments are refused before anything is launched. */
static void at_refusals(void)
{
    void *d = NULL;
    uint32_t *ds = NULL;
    GT_OK(qs_cuda_malloc(&d, 1 << 16));
    GT_OK(qs_cuda_malloc((void **)&ds, 64));
    char *b = d;
    at_expect_einval("hd 100 (not a multiple of 8)",
                     qs_cuda_attention(b, b, b, 1, ds, ds, 2, 1, 100, 2, 0, 0, 64, NULL, b, NULL));
    at_expect_einval("hd 136 (over 128)", qs_cuda_attention_prefill(b, b, b, 1, ds, ds, 2, 1, 136,
                                                                    2, 0, 0, 64, b, NULL));
    at_expect_einval("query heads reading a KV head not held",
                     qs_cuda_attention(b, b, b, 1, ds, ds, 3, 3, 64, 3, 9, 0, 64, NULL, b, NULL));
    at_expect_einval("KV heads before kv_first",
                     qs_cuda_attention(b, b, b, 1, ds, ds, 3, 1, 64, 3, 0, 2, 64, NULL, b, NULL));
    at_expect_einval("no workspace with splits",
                     qs_cuda_attention(b, b, b, 1, ds, ds, 3, 1, 64, 3, 0, 0, 256, NULL, b, NULL));
    at_expect_einval("misaligned q", qs_cuda_attention(b + 2, b, b, 1, ds, ds, 3, 1, 64, 3, 0, 0,
                                                       64, NULL, b, NULL));
    at_expect_einval("chunk 100", qs_cuda_attention_set_chunk(100));
    qs_cuda_kv kv = {QS_KV_INT8, b, b, NULL, NULL};
    at_expect_einval(
        "an int8 cache without scales",
        qs_cuda_attention_kvq(b, &kv, 1, ds, ds, 3, 1, 64, 3, 0, 0, 64, NULL, b, NULL));
    kv.format = 7, kv.ks = kv.vs = b;
    at_expect_einval("cache format 7", qs_cuda_attention_prefill_kvq(b, &kv, 1, ds, ds, 3, 1, 64, 3,
                                                                     0, 0, 64, b, NULL));
    kv.format = QS_KV_INT4, kv.ks = b + 4;
    at_expect_einval("misaligned scales", qs_cuda_attention_kvq(b, &kv, 1, ds, ds, 3, 1, 64, 3, 0,
                                                                0, 64, NULL, b, NULL));
out:
    qs_cuda_free(d);
    qs_cuda_free(ds);
}

static void at_banks(void)
{
#ifdef QS_CUDA_EMU
    static const char *kernels[] = {"attn_split_kernel", "attn_combine_kernel",
                                    "attn_prefill_kernel"};
    if (!qs_emu_checks_active()) {
        printf("# bank model: off in this build (AddressSanitizer)\n");
        return;
    }
    const int check = getenv("QS_EMU_BANK_BLOCKS") == NULL; /* the counts assume 1 block */
    if (!check)
        printf("# bank model: QS_EMU_BANK_BLOCKS is set, the counts below are not checked\n");
    printf("# bank model (first block of each launch; counts, not time):\n");
    for (int k = 0; k < 3; k++) {
        qs_emu_bank_stats ld, st;
        if (qs_emu_banks(kernels[k], &ld, &st) <= 0)
            continue;
        printf("#   %-20s loads %llu req %llu wavefronts (ideal %llu), stores %llu req %llu "
               "(ideal %llu)\n",
               kernels[k], (unsigned long long)ld.requests, (unsigned long long)ld.wavefronts,
               (unsigned long long)ld.ideal, (unsigned long long)st.requests,
               (unsigned long long)st.wavefronts, (unsigned long long)st.ideal);
        int ok = 1;
        if (k == 0) {
            /* Score rows of 68 floats, permuted reduction layout: none of the
             * split kernel's shared accesses may conflict. */
            ok = ld.requests > 0 && ld.wavefronts == ld.ideal && st.wavefronts == st.ideal;
            if (check)
                printf("%s split kernel's shared accesses conflict-free\n", ok ? "ok  " : "FAIL");
        } else if (k == 2 && check) {
            /* The K/V/Q tiles, scores and P (WMMA fragments are not counted:
             * their layout under the harness is not the GPU's). */
            ok = ld.wavefronts == ld.ideal && st.wavefronts == st.ideal;
            printf("%s prefill kernel's shared accesses (but WMMA's) conflict-free\n",
                   ok ? "ok  " : "FAIL");
        }
        if (k == 1 || !check)
            continue;
        gt_cases++;
        gt_failures += !ok;
    }
#endif
}

/* Every case, in the cache format at_fmt. */
static void at_all(void)
{
    /* hq, hkv, hd, group, q_first, kv_first, max_seq, slots */
    const at_shape smol = {9, 3, 64, 3, 0, 0, 200, 4};
    const at_shape smol_r0 = {6, 2, 64, 3, 0, 0, 200, 4};
    const at_shape smol_r1 = {3, 1, 64, 3, 6, 2, 200, 4};
    const at_shape llama_r1 = {16, 2, 128, 8, 16, 2, 300, 3};
    const at_shape mha = {5, 5, 128, 1, 7, 7, 150, 3};
    const at_shape repl = {4, 1, 64, 8, 12, 1, 200, 3};
    const at_shape offg = {6, 2, 128, 4, 2, 0, 150, 3};
    const at_shape g12 = {24, 2, 64, 12, 0, 0, 140, 3};
    const at_shape hd80 = {4, 2, 80, 2, 0, 0, 150, 3};
    const at_shape hd32 = {3, 3, 32, 1, 0, 0, 100, 3};
    const at_shape one = {6, 2, 64, 3, 0, 0, 64, 3};

    /* Decode batches: several slots, positions at 0, at split boundaries,
     * at max_seq - 1; a slot twice at different positions. */
    {
        const uint32_t sl[] = {0, 1, 2, 3, 1, 2, 0, 3};
        const uint32_t ps[] = {0, 63, 64, 199, 127, 128, 191, 192};
        /* The next step moves every token on by one (199 stays: the last
         * position), several across a split boundary; and one back to 0. */
        const uint32_t ps2[] = {1, 64, 65, 199, 128, 129, 192, 0};
        at_case("smollm2 decode", &smol, 8, sl, ps, ps2, 1.0, AT_SPLIT);
        at_case("smollm2 decode sharp", &smol, 8, sl, ps, NULL, 4.0, AT_SPLIT);
        at_case("smollm2 rank0", &smol_r0, 8, sl, ps, NULL, 1.0, AT_SPLIT);
        at_case("smollm2 rank1", &smol_r1, 8, sl, ps, NULL, 1.0, AT_SPLIT);
    }
    {
        const uint32_t sl[] = {2, 0, 1, 0, 2};
        const uint32_t ps[] = {299, 0, 255, 256, 70};
        at_case("llama rank1 q/kv_first 16/2", &llama_r1, 5, sl, ps, NULL, 1.0, AT_SPLIT);
    }
    {
        const uint32_t sl[] = {0, 1, 2, 1};
        const uint32_t ps[] = {149, 64, 0, 63};
        at_case("mha q/kv_first 7", &mha, 4, sl, ps, NULL, 1.0, AT_SPLIT);
        at_case("kv replicated q_first 12", &repl, 3, sl, ps, NULL, 1.0, AT_SPLIT);
        at_case("q_first 2 of group 4", &offg, 3, sl, ps, NULL, 1.0, AT_SPLIT);
        at_case("group 12", &g12, 2, sl + 2, ps + 2, NULL, 1.0, AT_SPLIT);
        at_case("hd 80", &hd80, 3, sl, ps, NULL, 1.0, AT_SPLIT);
        const uint32_t ps32[] = {99, 64, 0};
        at_case("hd 32", &hd32, 3, sl, ps32, NULL, 1.0, AT_SPLIT);
        const uint32_t ps1[] = {63, 0, 31};
        size_t wsb = qs_cuda_attention_ws_bytes(3, one.hq, one.hd, one.max_seq);
        gt_cases++;
        gt_failures += wsb != 0;
        printf("%s max_seq %u with chunk %d: one split, workspace %zu bytes (0 expected)\n",
               wsb ? "FAIL" : "ok  ", one.max_seq, AT_CHUNK, wsb);
        at_case("one split, no workspace", &one, 3, sl, ps1, NULL, 1.0, AT_SPLIT);
    }
    {
        /* The default chunk (128): max_seq 300 in 3 splits. */
        qs_cuda_attention_set_chunk(0);
        const uint32_t sl[] = {0, 1, 2};
        const uint32_t ps[] = {299, 127, 128};
        at_case("default chunk", &llama_r1, 3, sl, ps, NULL, 1.0, AT_SPLIT);
        qs_cuda_attention_set_chunk(AT_CHUNK);
    }
    {
        /* A mixed batch: three decode tokens and a prefill run of slot 3. */
        uint32_t sl[23], ps[23];
        const uint32_t dsl[] = {0, 1, 2}, dps[] = {199, 64, 5};
        for (int i = 0; i < 3; i++)
            sl[i] = dsl[i], ps[i] = dps[i];
        for (int i = 0; i < 20; i++)
            sl[3 + i] = 3, ps[3 + i] = 30 + (uint32_t)i;
        at_case("mixed decode + prefill", &smol, 23, sl, ps, NULL, 1.0, AT_SPLIT);
    }

    /* Prefill runs, through both entries: row tiles over token and tile
     * boundaries, K tiles up to the last position of the cache. */
    at_prefill("prefill from 0", &smol_r0, 2, 0, 40, 1.0);
    at_prefill("prefill from 0 sharp", &smol_r0, 2, 0, 40, 4.0);
    at_prefill("prefill 100..122", &(at_shape){8, 1, 128, 8, 0, 0, 200, 2}, 1, 100, 23, 1.0);
    at_prefill("prefill rank1 163..199", &smol_r1, 3, 163, 37, 1.0);
    at_prefill("prefill mha hd 80", &(at_shape){3, 3, 80, 1, 0, 0, 100, 2}, 0, 5, 70, 1.0);
    at_prefill("prefill q_first 2 of group 4", &offg, 1, 60, 20, 1.0);
    at_prefill("prefill group 12", &g12, 1, 50, 10, 1.0);
    at_prefill("prefill hd 32", &hd32, 1, 30, 45, 1.0);
}

int main(void)
{
    gt_need_gpu();
    tu_seed("test_gpu_attention");
    if (qs_cuda_attention_set_chunk(AT_CHUNK)) {
        printf("FAIL: qs_cuda_attention_set_chunk(%d): %s\n", AT_CHUNK, qs_errmsg());
        return 1;
    }
    for (at_fmt = QS_KV_FP16; at_fmt <= QS_KV_INT4; at_fmt++)
        at_all();
    at_fmt = QS_KV_FP16;
    at_refusals();
    at_banks();
    return gt_summary("test_gpu_attention");
}
