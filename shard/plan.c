/* The memory planner: exact bytes per rank for a model, a quantization
 * scheme, a tensor-parallel degree and a workload, and the fewest GPUs that
 * hold it. The split it counts is the one the loader makes (Megatron-style):
 *
 *   column-parallel (output rows split):  q, k, v, fc1 | gate, up
 *   row-parallel (input columns split):   o, fc2 | down   (then all-reduce)
 *   vocabulary-parallel:                  token embedding and LM head rows,
 *                                         ceil(vocab / tp) per rank
 *   replicated:                           norms, learned positions, row-parallel
 *                                         biases, opt-350m's projections
 *
 * Embeddings, LM head, norms and biases stay in fp16: an embedding row is
 * gathered once per token (its bytes never stream per step), norms and biases
 * are tiny, and the LM head's logits are the most quantization-sensitive
 * output of the model (GPTQ, LUT-GEMM and SmoothQuant all keep it fp16).
 */
#include "qs_shard.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define FP16          2u /* bytes */
#define FP32          4u
#define MAX_TP_LISTED 64u
#define MAX_BATCH     4096u
#define MAX_GROUP     65536u

const char *qs_scheme_name(qs_scheme s)
{
    switch (s) {
    case QS_SCHEME_FP16:
        return "fp16";
    case QS_SCHEME_W8A8:
        return "w8a8";
    case QS_SCHEME_BCQ:
        return "bcq";
    case QS_SCHEME_RTN:
        return "rtn";
    case QS_SCHEME_W4A4:
        return "w4a4";
    }
    return "?";
}

int qs_scheme_parse(const char *s, qs_scheme *out)
{
    static const qs_scheme all[] = {QS_SCHEME_FP16, QS_SCHEME_W8A8, QS_SCHEME_BCQ, QS_SCHEME_RTN,
                                    QS_SCHEME_W4A4};
    for (size_t i = 0; s && i < sizeof all / sizeof all[0]; i++) {
        if (strcasecmp(s, qs_scheme_name(all[i])) == 0) {
            *out = all[i];
            return QS_OK;
        }
    }
    return qs_seterr(QS_EINVAL, "unknown scheme '%s': choose fp16, w8a8, bcq, rtn or w4a4",
                     s ? s : "(null)");
}

static int is_weight_quantized(qs_scheme s)
{
    return s == QS_SCHEME_BCQ || s == QS_SCHEME_RTN;
}

int qs_quant_check(qs_quant *q)
{
    if (q->scheme != QS_SCHEME_W4A4 && q->outliers)
        return qs_seterr(QS_EINVAL,
                         "outlier channels are a w4a4 setting, not %s: drop --outliers or use "
                         "--scheme w4a4",
                         qs_scheme_name(q->scheme));
    switch (q->scheme) {
    case QS_SCHEME_W4A4:
        if (q->bits == 0)
            q->bits = 4;
        if (q->bits != 4)
            return qs_seterr(QS_EINVAL,
                             "scheme w4a4 stores 4-bit weights, not %d: drop --bits or use "
                             "--scheme bcq|rtn for 1 to 8 bits",
                             q->bits);
        /* The kernels unpack int4 codes eight at a time. */
        if (q->group_size % 8 != 0 || q->group_size > MAX_GROUP)
            return qs_seterr(QS_EINVAL,
                             "W4A4 group %u is not a multiple of 8 up to %u: use %u (the "
                             "default), or 0 for one scale per row and token",
                             q->group_size, MAX_GROUP, QS_W4A4_GROUP);
        if (q->outliers > MAX_GROUP)
            return qs_seterr(QS_EINVAL,
                             "%u outlier channels is out of range: use 0 to %u (128 is Atom's)",
                             q->outliers, MAX_GROUP);
        return QS_OK;
    case QS_SCHEME_FP16:
    case QS_SCHEME_W8A8: {
        int want = q->scheme == QS_SCHEME_FP16 ? 16 : 8;
        if (q->bits == 0)
            q->bits = want;
        if (q->bits != want)
            return qs_seterr(QS_EINVAL,
                             "scheme %s stores %d-bit weights, not %d: drop --bits or "
                             "use --scheme bcq|rtn for 1 to 8 bits",
                             qs_scheme_name(q->scheme), want, q->bits);
        if (q->scheme == QS_SCHEME_FP16)
            q->group_size = 0;
        /* W8A8's kernels step through the channels four at a time. */
        else if (q->group_size % 4 != 0 || q->group_size > MAX_GROUP)
            return qs_seterr(QS_EINVAL,
                             "W8A8 activation group %u is not a multiple of 4 up to %u: use "
                             "%u (the default), or 0 for one scale per token",
                             q->group_size, MAX_GROUP, QS_W8A8_GROUP);
        return QS_OK;
    }
    case QS_SCHEME_BCQ:
    case QS_SCHEME_RTN:
        if (q->bits == 0)
            q->bits = 4;
        if (q->bits < 1 || q->bits > 8)
            return qs_seterr(QS_EINVAL,
                             "%d bits is out of range for %s: use 1 to 8 (or "
                             "--scheme fp16 for 16)",
                             q->bits, qs_scheme_name(q->scheme));
        if (q->group_size % 32 != 0 || q->group_size > MAX_GROUP)
            return qs_seterr(QS_EINVAL,
                             "group size %u is not a multiple of 32 up to %u: use "
                             "e.g. 64 or 128, or 0 for one group per row",
                             q->group_size, MAX_GROUP);
        return QS_OK;
    }
    return qs_seterr(QS_EINVAL, "unknown scheme %d", (int)q->scheme);
}

/* ---- Tensor-parallel rules ---------------------------------------------- */

qs_heads qs_tp_heads(const qs_model_config *m, uint32_t tp, uint32_t r)
{
    qs_heads h;
    uint32_t group = m->heads / m->kv_heads;
    if (m->kv_heads >= tp) {
        uint32_t base = m->kv_heads / tp, extra = m->kv_heads % tp;
        h.hkv = base + (r < extra);
        h.kv_first = r * base + (r < extra ? r : extra);
        h.hq = h.hkv * group;
        h.q_first = h.kv_first * group;
    } else {
        h.hq = m->heads / tp;
        h.q_first = r * h.hq;
        h.hkv = 1;
        h.kv_first = h.q_first / group;
    }
    return h;
}

/* Each reason a split fails, written into why (may be NULL). */
static int tp_valid(const qs_model_config *m, const qs_quant *q, uint32_t tp, char *why, size_t n)
{
    if (tp == 0)
        return snprintf(why, n, "the degree must be at least 1"), 0;
    if (m->kv_heads < tp && (tp % m->kv_heads || m->heads % tp))
        return snprintf(why, n,
                        "%u KV heads on %u ranks would need copies: that takes a multiple "
                        "of %u ranks dividing the %u query heads",
                        m->kv_heads, tp, m->kv_heads, m->heads),
               0;
    if (m->ffn % tp)
        return snprintf(why, n, "FFN width %u does not split %u ways", m->ffn, tp), 0;
    if (is_weight_quantized(q->scheme) && q->group_size) {
        /* The attention shards differ by at most one KV head: check both. */
        uint32_t g = q->group_size, ffn_in = m->ffn / tp;
        uint32_t big = qs_tp_heads(m, tp, 0).hq * m->head_dim;
        uint32_t small = qs_tp_heads(m, tp, tp - 1).hq * m->head_dim;
        if (m->hidden % g)
            return snprintf(why, n, "group size %u does not divide the hidden width %u", g,
                            m->hidden),
                   0;
        if (big % g || small % g)
            return snprintf(why, n,
                            "group size %u does not divide the attention-output shard "
                            "width %u",
                            g, big % g ? big : small),
                   0;
        if (ffn_in % g)
            return snprintf(why, n, "group size %u does not divide the FFN shard width %u", g,
                            ffn_in),
                   0;
    }
    return 1;
}

int qs_tp_check(const qs_model_config *m, const qs_quant *q, uint32_t tp)
{
    char why[160];
    if (tp_valid(m, q, tp, why, sizeof why))
        return QS_OK;

    char valid[256];
    size_t off = 0;
    for (uint32_t t = 1; t <= MAX_TP_LISTED && off < sizeof valid; t++)
        if (tp_valid(m, q, t, NULL, 0))
            off += (size_t)snprintf(valid + off, sizeof valid - off, "%s%u", off ? ", " : "", t);
    if (off == 0) {
        /* No degree works: the group size is the problem; name the ones that do. */
        char groups[256] = "";
        qs_quant g = *q;
        off = 0;
        for (g.group_size = 32; g.group_size <= m->hidden && off < sizeof groups;
             g.group_size += 32)
            if (tp_valid(m, &g, tp, NULL, 0))
                off += (size_t)snprintf(groups + off, sizeof groups - off, "%u, ", g.group_size);
        return qs_seterr(QS_EINVAL,
                         "%s on %u GPU(s): %s; valid group sizes: %s0 (one group per row)", m->name,
                         tp, why, groups);
    }
    return qs_seterr(QS_EINVAL, "%s cannot be split %u ways: %s; valid degrees: %s", m->name, tp,
                     why, valid);
}

uint32_t qs_default_group(const qs_model_config *m)
{
    qs_quant q = {QS_SCHEME_BCQ, 4, 0, 0};
    for (uint32_t g = 128; g >= 32; g -= 32) {
        q.group_size = g;
        if (tp_valid(m, &q, 1, NULL, 0))
            return g;
    }
    return 0;
}

uint32_t qs_scheme_default_group(const qs_model_config *m, qs_scheme s)
{
    if (s == QS_SCHEME_W8A8)
        return QS_W8A8_GROUP;
    if (s == QS_SCHEME_W4A4)
        return QS_W4A4_GROUP;
    if (!is_weight_quantized(s))
        return 0;
    return m ? qs_default_group(m) : 128;
}

/* ---- Byte counts -------------------------------------------------------- */

static uint64_t cdiv(uint64_t a, uint64_t b)
{
    return (a + b - 1) / b;
}

/* One linear layer of n output rows and k inputs in the scheme's format. */
static uint64_t linear_bytes(const qs_quant *q, uint64_t n, uint64_t k)
{
    switch (q->scheme) {
    case QS_SCHEME_FP16:
        return n * k * FP16;
    case QS_SCHEME_W8A8:
        /* int8 codes (k padded to 4 for the 4-byte dot products), an fp32
         * scale per output channel and an int32 code sum per output channel
         * and activation group: kernels/ qs_w8. */
        return n * (cdiv(k, 4) * 4) + n * FP32 +
               n * 4 * (q->group_size && q->group_size < k ? cdiv(k, q->group_size) : 1);
    case QS_SCHEME_BCQ:
    case QS_SCHEME_RTN: {
        /* Packed planes: 32 signs per word along k. fp16 alpha per plane per
         * group, fp16 offset per group. */
        uint64_t groups = q->group_size ? cdiv(k, q->group_size) : 1;
        uint64_t bits = (uint64_t)q->bits;
        return bits * n * cdiv(k, 32) * 4 + bits * n * groups * FP16 + n * groups * FP16;
    }
    case QS_SCHEME_W4A4: {
        /* int4 codes, an fp32 scale and an int32 code sum per row and group;
         * the outliers' int8 codes and a scale per row; the input order
         * (kernels/ qs_w4). A row-parallel shard holds at most all outliers. */
        uint64_t ko = q->outliers < k ? q->outliers : k, k4 = k - ko;
        uint64_t groups = q->group_size && q->group_size < k4 ? cdiv(k4, q->group_size) : 1;
        return n * cdiv(k4, 2) + n * groups * (FP32 + 4) + n * ko + n * (FP32 + 4) + k * 4;
    }
    }
    return 0;
}

static void rank_bytes(const qs_model_config *m, const qs_quant *q, uint32_t tp,
                       const qs_workload *w, qs_rank_bytes *r)
{
    uint64_t hd = m->head_dim, h = m->hidden, e = m->embed_dim;
    /* Rank 0 holds the most heads; an invalid tp (memory alone) is rounded up. */
    qs_heads rank0 = qs_tp_heads(m, tp, 0);
    uint64_t heads = m->kv_heads >= tp ? rank0.hq : cdiv(m->heads, tp), kv = rank0.hkv;
    uint64_t ffn = cdiv(m->ffn, tp);
    uint64_t vocab = cdiv(m->vocab, tp);
    uint64_t attn_in = heads * hd;

    /* Linear layers of one decoder layer on this rank. */
    uint64_t lin = linear_bytes(q, heads * hd, h) + 2 * linear_bytes(q, kv * hd, h) +
                   linear_bytes(q, h, attn_in);
    lin += m->gated_ffn ? 2 * linear_bytes(q, ffn, h) + linear_bytes(q, h, ffn)
                        : linear_bytes(q, ffn, h) + linear_bytes(q, h, ffn);
    /* W8A8: SmoothQuant's factors are folded into the norms and weights
     * (no bytes of their own); one fp32 static activation scale per input. */
    if (q->scheme == QS_SCHEME_W8A8)
        lin += 4 * FP32;
    r->linear = lin * m->layers;

    /* fp16 parts. */
    uint64_t norm = (m->norm == QS_NORM_LAYER ? 2 : 1) * h; /* weight (+ bias) */
    uint64_t per_layer = 2 * norm;
    if (m->linear_bias) {
        uint64_t col = heads * hd + 2 * kv * hd + (m->gated_ffn ? 2 : 1) * ffn;
        per_layer += col + 2 * h; /* column-parallel biases split, row-parallel replicated */
    }
    uint64_t fp16 = per_layer * m->layers;
    fp16 += vocab * e; /* token embedding */
    if (!m->tied_embeddings)
        fp16 += vocab * h; /* LM head */
    if (m->learned_pos)
        fp16 += ((uint64_t)m->max_pos + 2) * h;
    if (e != h)
        fp16 += 2 * e * h; /* project_in, project_out */
    if (m->final_norm)
        fp16 += norm;
    r->fp16 = fp16 * FP16;

    /* KV cache: K and V, in the workload's format, for every layer,
     * sequence and position. */
    uint64_t tokens = (uint64_t)w->batch * w->seq;
    r->kv_cache = 2 * m->layers * tokens * kv * qs_kv_vec_bytes(w->kv, hd);

    /* Workspace: activations of one prefill chunk plus the logits. The buffers
     * are counted side by side (not aliased), an upper bound. */
    uint64_t chunk = w->seq < QS_PLAN_PREFILL_CHUNK ? w->seq : QS_PLAN_PREFILL_CHUNK;
    uint64_t t = (uint64_t)w->batch * chunk;
    uint64_t ws = 2 * t * h * FP16;                           /* residual, normed input */
    ws += t * (heads + 2 * kv) * hd * FP16;                   /* q, k, v */
    ws += t * attn_in * FP16;                                 /* attention output */
    ws += (uint64_t)w->batch * heads * chunk * w->seq * FP32; /* scores */
    ws += t * ffn * (m->gated_ffn ? 2 : 1) * FP16;            /* FFN intermediate */
    ws += (uint64_t)w->batch * (vocab + m->vocab) * FP32;     /* local and gathered logits */
    if (q->scheme == QS_SCHEME_W8A8 || q->scheme == QS_SCHEME_W4A4) {
        /* int8 activation codes (int4 ones held a byte each), scales per token and group */
        uint64_t width = h > ffn ? h : ffn;
        ws += t * width + t * FP32 * (q->group_size ? cdiv(width, q->group_size) + 1 : 2);
    }
    r->workspace = ws;

    r->reserve = w->reserve;
    r->total = r->linear + r->fp16 + r->kv_cache + r->workspace + r->reserve;
}

const char *qs_kv_name(qs_kv_format f)
{
    switch (f) {
    case QS_KV_FP16:
        return "fp16";
    case QS_KV_INT8:
        return "int8";
    case QS_KV_INT4:
        return "int4";
    }
    return NULL;
}

int qs_kv_parse(const char *s, qs_kv_format *out)
{
    static const qs_kv_format all[] = {QS_KV_FP16, QS_KV_INT8, QS_KV_INT4};
    for (size_t i = 0; s && i < sizeof all / sizeof all[0]; i++)
        if (strcasecmp(s, qs_kv_name(all[i])) == 0) {
            *out = all[i];
            return QS_OK;
        }
    return qs_seterr(QS_EINVAL,
                     "'%s' is not a KV cache format: use fp16 (the default), int8 (56%% of "
                     "its bytes) or int4 (31%%)",
                     s ? s : "");
}

/* Mirrors qs_kv_code_bytes and qs_kv_groups (kernels/cpu/kvquant.c), which
 * the planner does not link. */
uint64_t qs_kv_vec_bytes(qs_kv_format f, uint64_t hd)
{
    uint64_t sm = 4 * ((hd + QS_KV_GROUP - 1) / QS_KV_GROUP); /* fp16 scale + minimum */
    switch (f) {
    case QS_KV_INT8:
        return hd + sm;
    case QS_KV_INT4:
        return (hd + 1) / 2 + sm;
    default:
        return hd * FP16;
    }
}

static uint64_t linear_params(const qs_model_config *m)
{
    uint64_t h = m->hidden, hd = m->head_dim;
    uint64_t p = h * m->heads * hd * 2 + h * m->kv_heads * hd * 2;
    p += (m->gated_ffn ? 3 : 2) * h * m->ffn;
    return p * m->layers;
}

int qs_plan_make(const qs_model_config *m, const qs_quant *q, uint32_t tp, const qs_workload *w,
                 qs_plan *out)
{
    if (!m || !q || !w || !out)
        return qs_seterr(QS_EINVAL, "qs_plan_make: a required argument is NULL");
    qs_quant qq = *q;
    int err = qs_quant_check(&qq);
    if (err)
        return err;
    if (tp == 0 || tp > 4096)
        return qs_seterr(QS_EINVAL, "%u GPUs is out of range: use 1 to 4096", tp);
    if (w->batch == 0 || w->batch > MAX_BATCH)
        return qs_seterr(QS_EINVAL, "batch %u is out of range: use 1 to %u", w->batch, MAX_BATCH);
    if (!qs_kv_name(w->kv))
        return qs_seterr(QS_EINVAL, "KV cache format %d is unknown: use fp16, int8 or int4",
                         (int)w->kv);
    if (w->seq == 0 || w->seq > m->max_pos)
        return qs_seterr(QS_EINVAL,
                         "sequence length %u is out of range for %s: use 1 to its "
                         "context of %u",
                         w->seq, m->name, m->max_pos);

    memset(out, 0, sizeof *out);
    out->quant = qq;
    out->tp = tp;
    out->linear_params = linear_params(m);
    rank_bytes(m, &qq, tp, w, &out->rank);
    qs_rank_bytes whole;
    rank_bytes(m, &qq, 1, w, &whole);
    out->weight_bytes = whole.linear + whole.fp16;
    return QS_OK;
}

int qs_plan_min_gpus(const qs_model_config *m, const qs_quant *q, const qs_workload *w,
                     uint64_t device_mem, uint32_t max_tp, qs_min_gpus *out)
{
    out->by_memory = out->valid_tp = 0;
    for (uint32_t tp = 1; tp <= max_tp && !out->valid_tp; tp++) {
        qs_plan p;
        int err = qs_plan_make(m, q, tp, w, &p);
        if (err)
            return err;
        if (p.rank.total > device_mem)
            continue;
        if (!out->by_memory)
            out->by_memory = tp;
        if (tp_valid(m, &p.quant, tp, NULL, 0))
            out->valid_tp = tp;
    }
    return QS_OK;
}

/* ---- Sizes -------------------------------------------------------------- */

int qs_parse_bytes(const char *s, uint64_t *out)
{
    static const struct {
        const char *unit;
        double mult;
    } units[] = {{"", 1.0},
                 {"B", 1.0},
                 {"KiB", 1024.0},
                 {"MiB", 1048576.0},
                 {"GiB", 1073741824.0},
                 {"TiB", 1099511627776.0}};
    if (!s || !*s)
        return qs_seterr(QS_EINVAL, "empty size: write e.g. 80GiB");
    if (!isdigit((unsigned char)s[0]))
        return qs_seterr(QS_EINVAL,
                         "'%s' is not a size: write a positive number with a binary "
                         "unit, e.g. 80GiB or 512MiB",
                         s);
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (errno || !isfinite(v))
        return qs_seterr(QS_EINVAL, "'%s' is not a size: write e.g. 80GiB", s);
    if (*end == ' ')
        return qs_seterr(QS_EINVAL,
                         "'%s' has a space before its unit: write it as one word, "
                         "e.g. 80GiB",
                         s);
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
        if (strcmp(end, units[i].unit) != 0)
            continue;
        double bytes = v * units[i].mult;
        /* 2^60 bytes (1 EiB) is far beyond any device and keeps sums exact. */
        if (bytes > 1152921504606846976.0)
            return qs_seterr(QS_EINVAL, "'%s' is too large: sizes go up to 1 EiB", s);
        if (bytes < 1.0)
            return qs_seterr(QS_EINVAL, "'%s' is zero: a device needs some memory", s);
        *out = (uint64_t)bytes;
        return QS_OK;
    }
    if (strcasecmp(end, "GB") == 0 || strcasecmp(end, "MB") == 0 || strcasecmp(end, "TB") == 0 ||
        strcasecmp(end, "KB") == 0)
        return qs_seterr(QS_EINVAL,
                         "'%s' is ambiguous (decimal or binary?): write %.*s%ciB for "
                         "binary units, or the number of bytes",
                         s, (int)(end - s), s, toupper((unsigned char)end[0]));
    return qs_seterr(QS_EINVAL, "'%s' has an unknown unit '%s': use KiB, MiB, GiB or TiB", s, end);
}
