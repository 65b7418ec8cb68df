/* `qctl plan`: the memory planner on this machine, no daemon needed.
 *
 *   qctl plan MODEL                      the comparison table: fp16, w8a8, 4-bit, 3-bit
 *   qctl plan MODEL --bits 3 --gpus 1    one scheme in detail, and whether it fits
 *   qctl plan MODEL --svg chart.svg      the comparison as a chart (plan_svg.c)
 */
#include "qs_ctl.h"
#include "qs_shard.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXIT_USAGE 2
#define MAX_TP     1024u

static const char usage[] =
    "usage: qctl plan MODEL [--scheme fp16|w8a8|bcq|rtn|w4a4] [--bits N] [--group G] [--gpus N]\n"
    "                       [--outliers N] [--device-memory SIZE] [--batch B] [--seq S]\n"
    "                       [--reserve SIZE] [--kv-cache fp16|int8|int4] [--json] [--svg FILE]\n"
    "\n"
    "Plans the memory of MODEL per GPU, with no daemon. Without --scheme or --bits it\n"
    "compares fp16, W8A8 (SmoothQuant), 4-bit and 3-bit BCQ (LUT-GEMM): weight bytes,\n"
    "bytes per GPU and the GPUs needed. With one, it details that scheme per GPU.\n"
    "\n"
    "  --scheme S          fp16, w8a8, bcq (non-uniform BCQ), rtn (uniform, stored as BCQ)\n"
    "                      or w4a4 (Atom: int4 weights and activations, int8 outliers)\n"
    "  --bits N            16 (fp16), 8 (w8a8), 4 (w4a4), or 1..8 for bcq/rtn (alone it\n"
    "                      means bcq)\n"
    "  --group G           bcq/rtn: input columns per group, a multiple of 32 that divides\n"
    "                      the shard widths, or 0 for one group per row (default 128 where\n"
    "                      valid); w8a8: channels per activation scale, a multiple of 4, or\n"
    "                      0 for one per token (default 128); w4a4: channels per int4 scale,\n"
    "                      a multiple of 8 (default 128)\n"
    "  --outliers N        w4a4: input channels kept in int8 (default 128, 0 for none)\n"
    "  --gpus N            tensor-parallel degree to check: says whether it fits, and if not\n"
    "                      what does\n"
    "  --device-memory S   memory of one GPU, e.g. 80GiB (default), 40GiB, 141GiB\n"
    "  --batch B           sequences decoded together (default 1)\n"
    "  --seq S             tokens of KV cache per sequence (default 512, at most the model's\n"
    "                      context)\n"
    "  --reserve S         per-GPU runtime reserve: CUDA context, cuBLAS, NCCL (default 1GiB)\n"
    "  --kv-cache F        the KV cache's format: fp16 (default), int8 or int4 (1 + 1/8 and\n"
    "                      1/2 + 1/8 bytes per value); the detail says how many sequences\n"
    "                      of --seq tokens fit, against an fp16 cache\n"
    "  --json              print one JSON object\n"
    "  --svg FILE          also draw the schemes as an SVG chart in FILE ('-': stdout, then\n"
    "                      nothing else is printed): weight bytes, and GPUs needed against\n"
    "                      GPU memory from 16 to 192 GiB with --device-memory marked\n"
    "\n"
    "Models: run `qctl plan --list`.\n";

static int usage_error(const char *fmt, const char *arg)
{
    fprintf(stderr, "qctl plan: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\nRun `qctl plan --help` for the options.\n");
    return EXIT_USAGE;
}

/* A whole unsigned decimal number in [lo, hi]; no sign, no trailing text. */
static int parse_u32(const char *s, uint32_t lo, uint32_t hi, uint32_t *out)
{
    if (!s || *s < '0' || *s > '9')
        return -1;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || v < lo || v > hi)
        return -1;
    *out = (uint32_t)v;
    return 0;
}

static double gib(uint64_t b)
{
    return (double)b / (double)(1ull << 30);
}

/* The most sequences of w->seq tokens (up to 4096) that fit dev bytes on tp
 * GPUs with w's KV cache format; 0 when not even one does. */
static uint32_t fit_batch(const qs_model_config *m, const qs_quant *q, uint32_t tp,
                          const qs_workload *w, uint64_t dev)
{
    uint32_t lo = 0, hi = 4096;
    while (lo < hi) { /* the total grows with the batch */
        uint32_t mid = lo + (hi - lo + 1) / 2;
        qs_workload t = *w;
        t.batch = mid;
        qs_plan p;
        if (qs_plan_make(m, q, tp, &t, &p) == QS_OK && p.rank.total <= dev)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

typedef struct plan_row {
    qs_plan plan;     /* at the degree shown */
    qs_min_gpus need; /* fewest GPUs */
    int fits;         /* at the degree shown */
} plan_row;

/* Plans one scheme: at `gpus` if given, else at the fewest valid GPUs. */
static int plan_row_make(const qs_model_config *m, const qs_quant *q, const qs_workload *w,
                         uint64_t dev, uint32_t gpus, plan_row *r)
{
    int err = qs_plan_min_gpus(m, q, w, dev, MAX_TP, &r->need);
    if (err)
        return err;
    uint32_t tp = gpus ? gpus : (r->need.valid_tp ? r->need.valid_tp : 1);
    if ((err = qs_plan_make(m, q, tp, w, &r->plan)))
        return err;
    r->fits = r->plan.rank.total <= dev;
    return QS_OK;
}

static const char *quant_label(const qs_quant *q, char *buf, size_t n)
{
    if (q->scheme == QS_SCHEME_BCQ || q->scheme == QS_SCHEME_RTN) {
        if (q->group_size)
            snprintf(buf, n, "%s %d-bit g%u", qs_scheme_name(q->scheme), q->bits, q->group_size);
        else
            snprintf(buf, n, "%s %d-bit row-wise", qs_scheme_name(q->scheme), q->bits);
    } else if (q->scheme == QS_SCHEME_W8A8 && q->group_size) {
        snprintf(buf, n, "w8a8 act-g%u", q->group_size);
    } else if (q->scheme == QS_SCHEME_W4A4) {
        snprintf(buf, n, "w4a4 g%u +%u int8", q->group_size, q->outliers);
    } else {
        snprintf(buf, n, "%s", qs_scheme_name(q->scheme));
    }
    return buf;
}

static cJSON *row_json(const qs_model_config *m, const plan_row *r, uint64_t dev,
                       const qs_workload *w)
{
    const qs_plan *p = &r->plan;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "scheme", qs_scheme_name(p->quant.scheme));
    cJSON_AddNumberToObject(o, "bits", p->quant.bits);
    cJSON_AddNumberToObject(o, "group_size", p->quant.group_size);
    cJSON_AddNumberToObject(o, "weight_bytes", (double)p->weight_bytes);
    cJSON_AddNumberToObject(o, "linear_params", (double)p->linear_params);
    cJSON_AddNumberToObject(o, "tp", p->tp);
    cJSON_AddNumberToObject(o, "bytes_per_gpu", (double)p->rank.total);
    cJSON_AddBoolToObject(o, "fits", r->fits);
    cJSON_AddNumberToObject(o, "free_bytes_per_gpu", r->fits ? (double)(dev - p->rank.total) : 0.0);
    cJSON_AddNumberToObject(o, "min_gpus", r->need.valid_tp);
    cJSON_AddNumberToObject(o, "min_gpus_memory", r->need.by_memory);
    cJSON_AddNumberToObject(o, "max_batch", fit_batch(m, &p->quant, p->tp, w, dev));
    cJSON *pr = cJSON_AddObjectToObject(o, "per_gpu");
    cJSON_AddNumberToObject(pr, "quantized_linear", (double)p->rank.linear);
    cJSON_AddNumberToObject(pr, "fp16", (double)p->rank.fp16);
    cJSON_AddNumberToObject(pr, "kv_cache", (double)p->rank.kv_cache);
    cJSON_AddNumberToObject(pr, "workspace", (double)p->rank.workspace);
    cJSON_AddNumberToObject(pr, "reserve", (double)p->rank.reserve);
    cJSON_AddNumberToObject(pr, "total", (double)p->rank.total);
    return o;
}

static void print_header(const qs_model_config *m, const qs_workload *w, uint64_t dev)
{
    printf("%s: %s, %u layers, hidden %u, %u heads (%u KV), FFN %u, vocab %u, context %u\n",
           m->name, m->arch == QS_ARCH_OPT ? "OPT" : "Llama", m->layers, m->hidden, m->heads,
           m->kv_heads, m->ffn, m->vocab, m->max_pos);
    printf("device %.2f GiB, %.2f GiB reserved per GPU; KV cache for batch %u x %u tokens "
           "(%s)\n\n",
           gib(dev), gib(w->reserve), w->batch, w->seq, qs_kv_name(w->kv));
}

static void print_need(const qs_min_gpus *n)
{
    if (n->valid_tp)
        printf("fewest GPUs: %u by memory alone, %u as a valid tensor-parallel degree\n",
               n->by_memory, n->valid_tp);
    else if (n->by_memory)
        printf("fewest GPUs: %u by memory alone, but no valid tensor-parallel degree up to %u "
               "fits\n",
               n->by_memory, MAX_TP);
    else
        printf("no split up to %u GPUs fits\n", MAX_TP);
}

static void print_detail(const qs_model_config *m, const plan_row *r, uint64_t dev,
                         const qs_workload *w)
{
    const qs_rank_bytes *b = &r->plan.rank;
    char label[64];
    printf("%s on %u GPU%s (per GPU):\n", quant_label(&r->plan.quant, label, sizeof label),
           r->plan.tp, r->plan.tp == 1 ? "" : "s");
    printf("  %-44s %10.2f GiB\n", "quantized linear layers", gib(b->linear));
    printf("  %-44s %10.2f GiB\n", "fp16: embeddings, LM head, norms, biases", gib(b->fp16));
    char kv[64];
    snprintf(kv, sizeof kv, "KV cache (batch %u x %u tokens, %s)", w->batch, w->seq,
             qs_kv_name(w->kv));
    printf("  %-44s %10.2f GiB\n", kv, gib(b->kv_cache));
    printf("  %-44s %10.2f GiB\n", "workspace (prefill chunk, logits)", gib(b->workspace));
    printf("  %-44s %10.2f GiB\n", "runtime reserve", gib(b->reserve));
    printf("  %-44s %10.2f GiB of %.2f GiB: %s\n", "total", gib(b->total), gib(dev),
           r->fits ? "fits" : "DOES NOT FIT");
    printf("model weights, all GPUs: %.2f GiB\n", gib(r->plan.weight_bytes));
    /* What the cache's format buys: sequences of --seq tokens that fit. */
    uint32_t nb = fit_batch(m, &r->plan.quant, r->plan.tp, w, dev);
    printf("sequences of %u tokens that fit on %u GPU%s: %u with the %s KV cache", w->seq,
           r->plan.tp, r->plan.tp == 1 ? "" : "s", nb, qs_kv_name(w->kv));
    if (w->kv != QS_KV_FP16) {
        qs_workload f = *w;
        f.kv = QS_KV_FP16;
        printf(" (fp16: %u)", fit_batch(m, &r->plan.quant, r->plan.tp, &f, dev));
    }
    printf("\n");
    print_need(&r->need);
}

/* For a plan that does not fit: more GPUs, or fewer bits on the same GPUs. */
static void suggest(const qs_model_config *m, const qs_workload *w, uint64_t dev, uint32_t tp,
                    const plan_row *r)
{
    if (r->need.valid_tp)
        printf("to fit: --gpus %u", r->need.valid_tp);
    else
        printf("to fit: no degree up to %u", MAX_TP);
    uint32_t g = qs_default_group(m);
    const qs_quant alts[] = {{QS_SCHEME_W8A8, 8, QS_W8A8_GROUP, 0},
                             {QS_SCHEME_BCQ, 4, g, 0},
                             {QS_SCHEME_BCQ, 3, g, 0},
                             {QS_SCHEME_BCQ, 2, g, 0}};
    for (size_t i = 0; i < sizeof alts / sizeof alts[0]; i++) {
        qs_plan p;
        char label[64];
        if (alts[i].bits >= r->plan.quant.bits || qs_tp_check(m, &alts[i], tp) ||
            qs_plan_make(m, &alts[i], tp, w, &p) || p.rank.total > dev)
            continue;
        printf(", or %s on %u (%.2f GiB per GPU)", quant_label(&alts[i], label, sizeof label), tp,
               gib(p.rank.total));
        break;
    }
    printf("\n");
}

int qs_ctl_plan(int argc, char **argv)
{
    static const struct option opts[] = {{"scheme", required_argument, 0, 's'},
                                         {"bits", required_argument, 0, 'b'},
                                         {"group", required_argument, 0, 'g'},
                                         {"outliers", required_argument, 0, 'o'},
                                         {"gpus", required_argument, 0, 'n'},
                                         {"device-memory", required_argument, 0, 'm'},
                                         {"batch", required_argument, 0, 'B'},
                                         {"seq", required_argument, 0, 'S'},
                                         {"reserve", required_argument, 0, 'r'},
                                         {"kv-cache", required_argument, 0, 'k'},
                                         {"json", no_argument, 0, 'j'},
                                         {"svg", required_argument, 0, 'v'},
                                         {"list", no_argument, 0, 'l'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    qs_quant q = {QS_SCHEME_BCQ, 0, 0, 0};
    int have_scheme = 0, have_bits = 0, have_group = 0, have_outliers = 0, json = 0;
    const char *svg = NULL;
    uint32_t gpus = 0, bits = 0, group = 0, outliers = 0;
    const char *group_arg = NULL; /* as typed, for the messages */
    uint64_t dev = 80ull << 30;
    qs_workload w = {1, 0, QS_PLAN_DEFAULT_RESERVE, QS_KV_FP16};

    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":", opts, NULL)) != -1) {
        switch (c) {
        case 's':
            if (qs_scheme_parse(optarg, &q.scheme))
                return usage_error("%s", qs_errmsg());
            have_scheme = 1;
            break;
        case 'b':
            if (parse_u32(optarg, 1, 16, &bits) || (bits > 8 && bits != 16))
                return usage_error("--bits '%s' is out of range: use 1 to 8, or 16 for fp16",
                                   optarg);
            have_bits = 1;
            break;
        case 'g':
            if (parse_u32(optarg, 0, 65536, &group))
                return usage_error("--group '%s' is out of range: use 0 to 65536", optarg);
            have_group = 1, group_arg = optarg;
            break;
        case 'o':
            if (parse_u32(optarg, 0, 65536, &outliers))
                return usage_error("--outliers '%s' is out of range: use 0 to 65536", optarg);
            have_outliers = 1;
            break;
        case 'n':
            if (parse_u32(optarg, 1, 4096, &gpus))
                return usage_error("--gpus '%s' is out of range: use 1 to 4096", optarg);
            break;
        case 'm':
            if (qs_parse_bytes(optarg, &dev))
                return usage_error("--device-memory: %s", qs_errmsg());
            break;
        case 'r':
            if (qs_parse_bytes(optarg, &w.reserve))
                return usage_error("--reserve: %s", qs_errmsg());
            break;
        case 'B':
            if (parse_u32(optarg, 1, 4096, &w.batch))
                return usage_error("--batch '%s' is out of range: use 1 to 4096", optarg);
            break;
        case 'S':
            if (parse_u32(optarg, 1, 1u << 20, &w.seq))
                return usage_error("--seq '%s' is out of range: use 1 to the model's context",
                                   optarg);
            break;
        case 'k':
            if (qs_kv_parse(optarg, &w.kv))
                return usage_error("--kv-cache: %s", qs_errmsg());
            break;
        case 'j':
            json = 1;
            break;
        case 'v':
            if (!*optarg)
                return usage_error("%s", "--svg needs a file name ('-' for stdout)");
            svg = optarg;
            break;
        case 'l':
            for (size_t i = 0; i < qs_preset_count(); i++)
                printf("%s\n", qs_preset_at(i)->name);
            return 0;
        case 'h':
            fputs(usage, stdout);
            return 0;
        case ':':
            return usage_error("%s needs a value", argv[optind - 1]);
        default:
            return usage_error("unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind >= argc)
        return usage_error("%s", "name a model, e.g. `qctl plan opt-175b`");
    if (optind + 1 < argc)
        return usage_error("unexpected argument '%s': plan takes one model", argv[optind + 1]);
    const qs_model_config *m = qs_preset_find(argv[optind]);
    if (!m)
        return usage_error("%s", qs_errmsg());
    if (w.seq == 0)
        w.seq = m->max_pos < QS_PLAN_DEFAULT_SEQ ? m->max_pos : QS_PLAN_DEFAULT_SEQ;
    if (w.seq > m->max_pos) {
        fprintf(stderr, "qctl plan: --seq %u is longer than %s's context of %u tokens\n", w.seq,
                m->name, m->max_pos);
        return EXIT_USAGE;
    }

    /* One scheme in detail, or the comparison table. */
    qs_quant rows[4];
    size_t nrows = 0;
    if (have_scheme || have_bits) {
        if (!have_scheme)
            q.scheme = bits == 16 ? QS_SCHEME_FP16 : QS_SCHEME_BCQ;
        q.bits = (int)bits;
        q.group_size = have_group ? group : qs_scheme_default_group(m, q.scheme);
        if (have_group && q.scheme == QS_SCHEME_FP16 && group)
            return usage_error("--group %s: fp16 has no groups (w8a8, bcq and rtn do)", group_arg);
        q.outliers = have_outliers ? outliers : q.scheme == QS_SCHEME_W4A4 ? QS_W4A4_OUTLIERS : 0;
        if (qs_quant_check(&q))
            return usage_error("%s", qs_errmsg());
        rows[nrows++] = q;
    } else {
        rows[nrows++] = (qs_quant){QS_SCHEME_FP16, 16, 0, 0};
        if (!have_group)
            group = qs_default_group(m);
        else if (group % 32)
            return usage_error("--group '%s' is not a multiple of 32 (or 0 for one group "
                               "per row)",
                               group_arg);
        rows[nrows++] = (qs_quant){QS_SCHEME_W8A8, 8, QS_W8A8_GROUP, 0};
        rows[nrows++] = (qs_quant){QS_SCHEME_BCQ, 4, group, 0};
        rows[nrows++] = (qs_quant){QS_SCHEME_BCQ, 3, group, 0};
    }
    /* An invalid split is the user's to fix: name the valid ones. */
    for (size_t i = 0; i < nrows; i++) {
        if (qs_tp_check(m, &rows[i], 1) != QS_OK || (gpus && qs_tp_check(m, &rows[i], gpus))) {
            return usage_error("%s", qs_errmsg());
        }
    }

    plan_row r[4];
    for (size_t i = 0; i < nrows; i++) {
        if (plan_row_make(m, &rows[i], &w, dev, gpus, &r[i]))
            return usage_error("%s", qs_errmsg());
    }

    if (svg) {
        char labels[4][64];
        const char *lp[4];
        for (size_t i = 0; i < nrows; i++)
            lp[i] = quant_label(&rows[i], labels[i], sizeof labels[i]);
        if (qs_ctl_plan_svg(svg, m, rows, lp, nrows, &w, dev)) {
            fprintf(stderr, "qctl plan: %s\n", qs_errmsg());
            return 1;
        }
        if (!strcmp(svg, "-"))
            return 0;
    }
    if (json) {
        cJSON *o = cJSON_CreateObject();
        cJSON *mo = cJSON_AddObjectToObject(o, "model");
        cJSON_AddStringToObject(mo, "name", m->name);
        cJSON_AddStringToObject(mo, "arch", m->arch == QS_ARCH_OPT ? "opt" : "llama");
        cJSON_AddNumberToObject(mo, "layers", m->layers);
        cJSON_AddNumberToObject(mo, "hidden", m->hidden);
        cJSON_AddNumberToObject(mo, "heads", m->heads);
        cJSON_AddNumberToObject(mo, "kv_heads", m->kv_heads);
        cJSON_AddNumberToObject(mo, "ffn", m->ffn);
        cJSON_AddNumberToObject(mo, "vocab", m->vocab);
        cJSON_AddNumberToObject(mo, "max_pos", m->max_pos);
        cJSON_AddNumberToObject(o, "device_memory", (double)dev);
        cJSON_AddNumberToObject(o, "batch", w.batch);
        cJSON_AddNumberToObject(o, "seq", w.seq);
        cJSON_AddNumberToObject(o, "reserve", (double)w.reserve);
        cJSON_AddStringToObject(o, "kv_cache", qs_kv_name(w.kv));
        if (gpus)
            cJSON_AddNumberToObject(o, "gpus", gpus);
        else
            cJSON_AddNullToObject(o, "gpus");
        cJSON *arr = cJSON_AddArrayToObject(o, "schemes");
        for (size_t i = 0; i < nrows; i++)
            cJSON_AddItemToArray(arr, row_json(m, &r[i], dev, &w));
        char *s = cJSON_Print(o);
        puts(s);
        cJSON_free(s);
        cJSON_Delete(o);
        return 0;
    }

    print_header(m, &w, dev);
    if (nrows == 1) {
        print_detail(m, &r[0], dev, &w);
        if (!r[0].fits)
            suggest(m, &w, dev, r[0].plan.tp, &r[0]);
        return 0;
    }
    printf("%-22s %12s %12s %8s %16s %16s\n", "scheme", "weights", "per GPU", "on GPUs",
           "GPUs by memory", "GPUs (valid TP)");
    for (size_t i = 0; i < nrows; i++) {
        char label[64], on[32];
        snprintf(on, sizeof on, "%u%s", r[i].plan.tp, r[i].fits ? "" : " (no)");
        printf("%-22s %8.2f GiB %8.2f GiB %8s %16u %16u\n",
               quant_label(&r[i].plan.quant, label, sizeof label), gib(r[i].plan.weight_bytes),
               gib(r[i].plan.rank.total), on, r[i].need.by_memory, r[i].need.valid_tp);
    }
    printf("\nper GPU: weights + KV cache + workspace + reserve at the degree in 'on GPUs'%s.\n",
           gpus ? "" : " (the fewest valid)");
    return 0;
}
