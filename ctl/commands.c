/* The qctl commands that talk to qdaemon: parse options, make the call,
 * print the answer (text, or JSON with --json). */
#define _POSIX_C_SOURCE 200809L
#include "qs_ctl.h"
#include "qs_shard.h" /* qs_parse_bytes */

#include <errno.h>
#include <stddef.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

/* ---- Option parsing ------------------------------------------------------- */

typedef qs_args args;

static int usage_error(args *a, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

static int usage_error(args *a, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "qctl %s: ", a->cmd);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nrun 'qctl %s --help' for its options\n", a->cmd);
    a->err = QS_EXIT_USAGE;
    return QS_EXIT_USAGE;
}

/* Matches "--name VALUE" or "--name=VALUE" at argv[i]. */
static int opt_val(args *a, const char *name, const char **val)
{
    const char *s = a->argv[a->i];
    size_t n = strlen(name);
    if (strncmp(s, name, n) != 0)
        return 0;
    if (s[n] == '=') {
        *val = s + n + 1;
        return 1;
    }
    if (s[n] != '\0')
        return 0;
    if (a->i + 1 >= a->argc) {
        *val = "";
        usage_error(a, "%s needs a value", name);
        return 1;
    }
    *val = a->argv[++a->i];
    return 1;
}

static int opt_flag(args *a, const char *name)
{
    return strcmp(a->argv[a->i], name) == 0;
}

static int parse_u64(args *a, const char *opt, const char *v, uint64_t max, uint64_t *out)
{
    if (a->err)
        return -1;
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10);
    if (!*v || *v == '-' || *end || errno || x > max) {
        usage_error(a, "%s takes a whole number from 0 to %llu, got '%s'", opt,
                    (unsigned long long)max, v);
        return -1;
    }
    *out = x;
    return 0;
}

static int parse_u32(args *a, const char *opt, const char *v, uint32_t *out)
{
    uint64_t x;
    if (parse_u64(a, opt, v, UINT32_MAX, &x))
        return -1;
    *out = (uint32_t)x;
    return 0;
}

static int parse_double(args *a, const char *opt, const char *v, double *out)
{
    if (a->err)
        return -1;
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (!*v || *end || errno || !isfinite(x)) {
        usage_error(a, "%s takes a number, got '%s'", opt, v);
        return -1;
    }
    *out = x;
    return 0;
}

static int parse_size(args *a, const char *opt, const char *v, uint64_t *out)
{
    if (a->err)
        return -1;
    if (qs_parse_bytes(v, out) != QS_OK) {
        usage_error(a, "%s: %s", opt, qs_errmsg());
        return -1;
    }
    return 0;
}

/* Options every command takes. 1: consumed (check a->err). */
static int global_opt(qs_ctl_global *g, args *a)
{
    const char *v;
    if (opt_flag(a, "--json")) {
        g->json = 1;
        return 1;
    }
    if (opt_val(a, "--addr", &v)) {
        if (!a->err) {
            if (!*v || strlen(v) >= sizeof g->addr)
                usage_error(a, "--addr takes HOST:PORT, got '%s'", v);
            else
                snprintf(g->addr, sizeof g->addr, "%s", v);
        }
        return 1;
    }
    if (opt_val(a, "--timeout", &v)) {
        if (!parse_double(a, "--timeout", v, &g->timeout) && g->timeout < 0)
            usage_error(a, "--timeout takes seconds >= 0 (0: none), got '%s'", v);
        return 1;
    }
    if (opt_val(a, "--connect-timeout", &v)) {
        if (!parse_double(a, "--connect-timeout", v, &g->connect_timeout) &&
            g->connect_timeout <= 0)
            usage_error(a, "--connect-timeout takes seconds > 0, got '%s'", v);
        return 1;
    }
    static const struct {
        const char *opt;
        size_t off;
    } files[] = {{"--tls-ca", offsetof(qs_ctl_global, tls_ca)},
                 {"--tls-cert", offsetof(qs_ctl_global, tls_cert)},
                 {"--tls-key", offsetof(qs_ctl_global, tls_key)},
                 {"--token-file", offsetof(qs_ctl_global, token_file)}};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        if (!opt_val(a, files[i].opt, &v))
            continue;
        char *dst = (char *)g + files[i].off;
        if (!a->err && (!*v || strlen(v) >= sizeof g->tls_ca))
            usage_error(a, "%s takes a file path, got '%s'", files[i].opt, v);
        else if (!a->err)
            snprintf(dst, sizeof g->tls_ca, "%s", v);
        return 1;
    }
    return 0;
}

static const char global_help[] =
    "\ncommon options:\n"
    "  --addr HOST:PORT          the daemon (default $QSHARD_ADDR or " QS_CTL_DEFAULT_ADDR ")\n"
    "  --json                    print the answer as JSON\n"
    "  --timeout SECS            give up on the answer after SECS (0: wait forever)\n"
    "  --connect-timeout SECS    give up connecting after SECS (default 5)\n"
    "  --tls-ca FILE             TLS: the CA certificate (PEM) that signed the daemon's\n"
    "                            (default $QSHARD_TLS_CA); without it, plaintext\n"
    "  --tls-cert FILE, --tls-key FILE\n"
    "                            mutual TLS: this client's certificate and key (PEM;\n"
    "                            default $QSHARD_TLS_CERT, $QSHARD_TLS_KEY)\n"
    "  --token-file FILE         the daemon's access token, sent with every call\n"
    "                            (default $QSHARD_TOKEN_FILE)\n"
    "  -h, --help                this help\n"
    "\nexit codes: 0 ok, 1 the daemon refused (the reason is printed), 2 usage,\n"
    "3 the daemon is unreachable\n";

/* Loop head shared by the commands: help, global options, unknown options.
 * Returns 1 when argv[a->i] is left for the command, 0 when handled (check
 * a->err, and a->err == -1 for help). */
static int next_arg(qs_ctl_global *g, args *a)
{
    const char *s = a->argv[a->i];
    if (!strcmp(s, "-h") || !strcmp(s, "--help")) {
        fputs(a->help, stdout);
        fputs(global_help, stdout);
        a->err = -1;
        return 0;
    }
    if (global_opt(g, a))
        return 0;
    return 1;
}

static int unknown_arg(args *a)
{
    const char *s = a->argv[a->i];
    if (s[0] == '-')
        return usage_error(a, "unknown option '%s'", s);
    return usage_error(a, "unexpected argument '%s'", s);
}

/* The end of a parse: 0 to go on, else the exit code. */
static int parse_done(args *a)
{
    return a->err == -1 ? QS_EXIT_OK : a->err;
}

static double timeout_or(const qs_ctl_global *g, double dflt)
{
    return g->timeout >= 0 ? g->timeout : dflt;
}

/* Quantization options shared by plan, load and bench. */
typedef struct quant_opts {
    const char *scheme;
    uint32_t bits;
    int group_set;
    uint32_t group;
    int outliers_set;
    uint32_t outliers;
} quant_opts;

static int quant_opt(args *a, quant_opts *q)
{
    const char *v;
    if (opt_val(a, "--scheme", &v)) {
        q->scheme = v;
        return 1;
    }
    if (opt_val(a, "--bits", &v)) {
        parse_u32(a, "--bits", v, &q->bits);
        return 1;
    }
    if (opt_val(a, "--group", &v)) {
        if (a->err)
            return 1;
        q->group_set = 1;
        if (!strcmp(v, "row"))
            q->group = 0;
        else
            parse_u32(a, "--group", v, &q->group);
        return 1;
    }
    if (opt_val(a, "--outliers", &v)) {
        q->outliers_set = 1;
        parse_u32(a, "--outliers", v, &q->outliers);
        return 1;
    }
    return 0;
}

static void quant_msg(const quant_opts *q, Qshard__V1__Quantization *m)
{
    m->scheme = (char *)(q->scheme ? q->scheme : "");
    m->bits = q->bits;
    if (q->group_set) {
        m->group_case = QSHARD__V1__QUANTIZATION__GROUP_GROUP_SIZE;
        m->group_size = q->group;
    }
    if (q->outliers_set) {
        m->outlier_channels_case = QSHARD__V1__QUANTIZATION__OUTLIER_CHANNELS_OUTLIERS;
        m->outliers = q->outliers;
    }
}

#define QUANT_HELP                                                                                 \
    "  --scheme S        fp16, w8a8, bcq, rtn or w4a4 (default rtn)\n"                             \
    "  --bits Q          bits per weight, 1..8 for bcq/rtn (default 4)\n"                          \
    "  --group G         bcq/rtn: input columns per weight scale, a multiple of 32,\n"             \
    "                    or 'row' (default: the model's, 128 where it divides);\n"                 \
    "                    w8a8: input channels per activation scale, a multiple of 4,\n"            \
    "                    or 'row' for one per token (default 128); w4a4: input\n"                  \
    "                    channels per int4 scale, a multiple of 8 (default 128)\n"                 \
    "  --outliers N      w4a4: input channels kept in int8 (Atom's outliers, chosen\n"             \
    "                    by calibration; default 128, 0 for none)\n"

/* ---- Output --------------------------------------------------------------- */

static const char *fmt_bytes(uint64_t b, char *buf, size_t n)
{
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    double x = (double)b;
    int u = 0;
    while (x >= 1024 && u < 5) {
        x /= 1024;
        u++;
    }
    if (u == 0)
        snprintf(buf, n, "%llu B", (unsigned long long)b);
    else
        snprintf(buf, n, "%.2f %s", x, units[u]);
    return buf;
}

static void print_json(cJSON *j)
{
    char *s = cJSON_Print(j);
    if (s) {
        puts(s);
        free(s);
    }
    cJSON_Delete(j);
}

static void json_quant(cJSON *o, const char *key, const Qshard__V1__Quantization *q)
{
    cJSON *j = cJSON_AddObjectToObject(o, key);
    if (!q)
        return;
    cJSON_AddStringToObject(j, "scheme", q->scheme);
    cJSON_AddNumberToObject(j, "bits", q->bits);
    if (q->group_case == QSHARD__V1__QUANTIZATION__GROUP_GROUP_SIZE)
        cJSON_AddNumberToObject(j, "group_size", q->group_size);
    if (q->outlier_channels_case == QSHARD__V1__QUANTIZATION__OUTLIER_CHANNELS_OUTLIERS)
        cJSON_AddNumberToObject(j, "outliers", q->outliers);
}

static const char *group_text(const Qshard__V1__Quantization *q, char *buf, size_t n)
{
    if (q->group_case != QSHARD__V1__QUANTIZATION__GROUP_GROUP_SIZE)
        snprintf(buf, n, "default");
    else if (q->group_size == 0)
        snprintf(buf, n, "row");
    else
        snprintf(buf, n, "%u", q->group_size);
    /* w4a4: the int8 outlier channels belong with the grouping. */
    size_t used = strlen(buf);
    if (q->outlier_channels_case == QSHARD__V1__QUANTIZATION__OUTLIER_CHANNELS_OUTLIERS && used < n)
        snprintf(buf + used, n - used, " +%u int8", q->outliers);
    return buf;
}

/* ---- Calls and their failures --------------------------------------------- */

static int unreachable(const qs_ctl_global *g, const qs_rpc_status *st)
{
    fprintf(stderr,
            "qctl: cannot reach qdaemon at %s: is it running? start it with mpirun -np 2 "
            "qdaemon (%s)\n",
            g->addr, st->details);
    return QS_EXIT_UNREACHABLE;
}

static int refused(const qs_ctl_global *g, const char *cmd, const qs_rpc_status *st, double timeout)
{
    if (st->unreachable)
        return unreachable(g, st);
    if (st->code == GRPC_STATUS_DEADLINE_EXCEEDED && timeout > 0)
        fprintf(stderr,
                "qctl %s: the daemon did not answer within %g s (DEADLINE_EXCEEDED); raise "
                "--timeout, or 0 to wait\n",
                cmd, timeout);
    else
        fprintf(stderr, "qctl %s: %s (%s)\n", cmd, *st->details ? st->details : "no details",
                qs_proto_status_name(st->code));
    if (g->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON *e = cJSON_AddObjectToObject(j, "error");
        cJSON_AddStringToObject(e, "code", qs_proto_status_name(st->code));
        cJSON_AddStringToObject(e, "message", st->details);
        print_json(j);
    }
    return QS_EXIT_REFUSED;
}

/* A credentials file, whole (at most 1 MiB); NULL with a sentence on stderr. */
static char *read_secret(const char *opt, const char *path)
{
    FILE *f = fopen(path, "rb");
    char *buf = f ? malloc((1u << 20) + 1) : NULL;
    size_t n = buf ? fread(buf, 1, 1u << 20, f) : 0;
    int big = buf && n == (1u << 20) && fgetc(f) != EOF;
    if (f)
        fclose(f);
    if (!buf || big || n == 0) {
        fprintf(stderr, "qctl: %s %s: %s\n", opt, path,
                !f    ? strerror(errno)
                : big ? "the file is larger than 1 MiB"
                      : "the file is empty or unreadable");
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    return buf;
}

static qs_client *connect_to(const qs_ctl_global *g, int *rc)
{
    qs_rpc_status st;
    char *ca = NULL, *cert = NULL, *key = NULL, *tok = NULL;
    int bad = (*g->tls_ca && !(ca = read_secret("--tls-ca", g->tls_ca))) ||
              (*g->tls_cert && !(cert = read_secret("--tls-cert", g->tls_cert))) ||
              (*g->tls_key && !(key = read_secret("--tls-key", g->tls_key))) ||
              (*g->token_file && !(tok = read_secret("--token-file", g->token_file)));
    if (!bad && !cert != !key) {
        fprintf(stderr, "qctl: mutual TLS needs both --tls-cert and --tls-key\n");
        bad = 1;
    }
    if (!bad && tok) {
        /* The token is the file's first line. */
        tok[strcspn(tok, "\r\n")] = '\0';
        if (!*tok || strlen(tok) > 512) {
            fprintf(stderr,
                    "qctl: --token-file %s: the token (its first line) must be 1 to 512 "
                    "characters\n",
                    g->token_file);
            bad = 1;
        }
    }
    qs_client *c = NULL;
    if (bad) {
        *rc = QS_EXIT_USAGE;
    } else {
        qs_client_security sec = {ca, cert, key, tok};
        c = qs_client_init(g->addr, g->connect_timeout, &sec, &st);
        if (!c)
            *rc = unreachable(g, &st);
    }
    free(ca), free(cert), free(key);
    if (tok)
        memset(tok, 0, strlen(tok)); /* not left in freed memory */
    free(tok);
    return c;
}

/* One unary call with the usual failure reporting; 0 or the exit code. */
static int unary(const qs_ctl_global *g, const char *cmd, const char *method, const void *req,
                 const ProtobufCMessageDescriptor *reply_desc, double timeout, void **reply)
{
    int rc = 0;
    qs_client *c = connect_to(g, &rc);
    if (!c)
        return rc;
    qs_rpc_status st;
    ProtobufCMessage *r = NULL;
    if (qs_client_unary(c, method, req, reply_desc, timeout, &r, &st) != 0)
        rc = refused(g, cmd, &st, timeout);
    qs_client_close(c);
    *reply = r;
    return rc;
}

/* ---- health --------------------------------------------------------------- */

static const char health_help[] =
    "usage: qctl health [options]\n"
    "\nAsks the daemon whether it serves: the standard grpc.health.v1 check, then a\n"
    "round trip through every rank. Exits 0 when serving, 1 when not.\n";

int qs_ctl_health(qs_ctl_global *g, int argc, char **argv)
{
    args a = {.cmd = "health", .help = health_help, .argc = argc, .argv = argv};
    for (a.i = 1; a.i < argc && !a.err; a.i++)
        if (next_arg(g, &a))
            unknown_arg(&a);
    if (a.err)
        return parse_done(&a);

    double timeout = timeout_or(g, 10);
    int rc = 0;
    qs_client *c = connect_to(g, &rc);
    if (!c)
        return rc;
    qs_rpc_status st;
    Grpc__Health__V1__HealthCheckRequest creq = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    Grpc__Health__V1__HealthCheckResponse *check = NULL;
    Qshard__V1__HealthRequest hreq = QSHARD__V1__HEALTH_REQUEST__INIT;
    Qshard__V1__HealthReply *h = NULL;
    if (qs_client_unary(c, QS_METHOD_HEALTH_CHECK, &creq.base,
                        &grpc__health__v1__health_check_response__descriptor, timeout,
                        (ProtobufCMessage **)&check, &st) != 0 ||
        qs_client_unary(c, QS_METHOD_HEALTH, &hreq.base, &qshard__v1__health_reply__descriptor,
                        timeout, (ProtobufCMessage **)&h, &st) != 0) {
        rc = refused(g, "health", &st, timeout);
        goto out;
    }
    const ProtobufCEnumValue *sv = protobuf_c_enum_descriptor_get_value(
        &grpc__health__v1__health_check_response__serving_status__descriptor, (int)check->status);
    const char *status = sv ? sv->name : "UNKNOWN";
    int serving = h->serving &&
                  check->status == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
    if (g->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddBoolToObject(j, "serving", serving);
        cJSON_AddStringToObject(j, "status", status);
        cJSON_AddNumberToObject(j, "world_size", h->world_size);
        cJSON_AddStringToObject(j, "version", h->version);
        cJSON_AddBoolToObject(j, "draining", h->draining);
        cJSON_AddNumberToObject(j, "ranks_ok", h->ranks_ok);
        cJSON_AddNumberToObject(j, "roundtrip_ms", h->roundtrip_ms);
        cJSON_AddNumberToObject(j, "uptime_seconds", h->uptime_seconds);
        cJSON_AddNumberToObject(j, "requests_served", (double)h->requests_served);
        cJSON_AddStringToObject(j, "addr", g->addr);
        print_json(j);
    } else {
        printf("qdaemon %s at %s: %s\n", h->version, g->addr, serving ? "serving" : "not serving");
        printf("  grpc.health.v1   %s\n", status);
        printf("  ranks            %u of %u answered in %.2f ms\n", h->ranks_ok, h->world_size,
               h->roundtrip_ms);
        printf("  uptime           %.1f s, %llu request(s) served\n", h->uptime_seconds,
               (unsigned long long)h->requests_served);
        if (h->draining)
            printf("  draining         yes: it is shutting down\n");
    }
    if (!serving) {
        fprintf(stderr, "qctl health: qdaemon at %s is not serving%s\n", g->addr,
                h->draining ? ": it is shutting down" : "");
        rc = QS_EXIT_REFUSED;
    }
out:
    if (check)
        protobuf_c_message_free_unpacked(&check->base, NULL);
    if (h)
        protobuf_c_message_free_unpacked(&h->base, NULL);
    qs_client_close(c);
    return rc;
}

/* ---- stats ---------------------------------------------------------------- */

static const char stats_help[] = "usage: qctl stats [options]\n"
                                 "\nEvery rank's device (memory total, free and budget) and the "
                                 "loaded models.\n";

static void json_model(cJSON *arr, const Qshard__V1__ModelInfo *m)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "name", m->name);
    cJSON_AddStringToObject(j, "source", m->source);
    json_quant(j, "quant", m->quant);
    cJSON_AddNumberToObject(j, "tp", m->tp);
    cJSON *r = cJSON_AddArrayToObject(j, "ranks");
    for (size_t i = 0; i < m->n_ranks; i++)
        cJSON_AddItemToArray(r, cJSON_CreateNumber(m->ranks[i]));
    cJSON_AddNumberToObject(j, "weight_bytes", (double)m->weight_bytes);
    cJSON_AddNumberToObject(j, "rank_bytes", (double)m->rank_bytes);
    cJSON_AddNumberToObject(j, "planned_rank_bytes", (double)m->planned_rank_bytes);
    cJSON_AddStringToObject(j, "cache", m->cache ? m->cache : "");
    if (m->actual) {
        cJSON *a = cJSON_AddObjectToObject(j, "actual");
        cJSON_AddNumberToObject(a, "linear", (double)m->actual->linear);
        cJSON_AddNumberToObject(a, "fp16", (double)m->actual->fp16);
        cJSON_AddNumberToObject(a, "kv_cache", (double)m->actual->kv_cache);
        cJSON_AddNumberToObject(a, "total", (double)m->actual->total);
    }
    cJSON_AddStringToObject(j, "weights", m->weights);
    cJSON_AddStringToObject(j, "tokenizer", m->tokenizer);
    cJSON_AddNumberToObject(j, "smoothing", m->smoothing);
    cJSON_AddNumberToObject(j, "max_seq", m->max_seq);
    cJSON_AddNumberToObject(j, "max_batch", m->max_batch);
    cJSON_AddStringToObject(j, "kv_cache", *m->kv_cache ? m->kv_cache : "fp16");
    cJSON_AddNumberToObject(j, "running", m->running);
    cJSON_AddNumberToObject(j, "waiting", m->waiting);
    cJSON_AddNumberToObject(j, "tokens_generated", (double)m->tokens_generated);
    cJSON_AddNumberToObject(j, "tokens_per_second", m->tokens_per_second);
    cJSON_AddNumberToObject(j, "p50_token_ms", m->p50_token_ms);
    cJSON_AddNumberToObject(j, "p99_token_ms", m->p99_token_ms);
    cJSON *fps = cJSON_AddArrayToObject(j, "footprints");
    for (size_t i = 0; i < m->n_footprints; i++) {
        const Qshard__V1__Footprint *f = m->footprints[i];
        cJSON *o = cJSON_CreateObject();
        json_quant(o, "quant", f->quant);
        cJSON_AddNumberToObject(o, "weight_bytes", (double)f->weight_bytes);
        cJSON_AddNumberToObject(o, "bytes_per_gpu", (double)f->bytes_per_gpu);
        cJSON_AddNumberToObject(o, "min_gpus", f->min_gpus);
        cJSON_AddNumberToObject(o, "min_gpus_memory", f->min_gpus_memory);
        cJSON_AddBoolToObject(o, "loaded", f->loaded);
        cJSON_AddItemToArray(fps, o);
    }
    cJSON_AddItemToArray(arr, j);
}

int qs_ctl_stats(qs_ctl_global *g, int argc, char **argv)
{
    args a = {.cmd = "stats", .help = stats_help, .argc = argc, .argv = argv};
    for (a.i = 1; a.i < argc && !a.err; a.i++)
        if (next_arg(g, &a))
            unknown_arg(&a);
    if (a.err)
        return parse_done(&a);
    Qshard__V1__StatsRequest req = QSHARD__V1__STATS_REQUEST__INIT;
    Qshard__V1__StatsReply *r = NULL;
    double timeout = timeout_or(g, 30);
    int rc = unary(g, "stats", QS_METHOD_STATS, &req, &qshard__v1__stats_reply__descriptor, timeout,
                   (void **)&r);
    if (rc)
        return rc;
    if (g->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddNumberToObject(j, "world_size", r->world_size);
        cJSON_AddNumberToObject(j, "uptime_seconds", r->uptime_seconds);
        cJSON_AddNumberToObject(j, "requests_served", (double)r->requests_served);
        cJSON *devs = cJSON_AddArrayToObject(j, "devices");
        for (size_t i = 0; i < r->n_devices; i++) {
            const Qshard__V1__DeviceStats *d = r->devices[i];
            cJSON *o = cJSON_CreateObject();
            cJSON_AddNumberToObject(o, "rank", d->rank);
            cJSON_AddStringToObject(o, "hostname", d->hostname);
            cJSON_AddNumberToObject(o, "pid", d->pid);
            cJSON_AddStringToObject(o, "kind", d->kind);
            cJSON_AddStringToObject(o, "name", d->name);
            cJSON_AddNumberToObject(o, "index", d->index);
            cJSON_AddNumberToObject(o, "memory_total", (double)d->memory_total);
            cJSON_AddNumberToObject(o, "memory_free", (double)d->memory_free);
            cJSON_AddNumberToObject(o, "memory_budget", (double)d->memory_budget);
            cJSON_AddNumberToObject(o, "memory_used", (double)d->memory_used);
            cJSON_AddNumberToObject(o, "memory_weights", (double)d->memory_weights);
            cJSON_AddNumberToObject(o, "memory_kv_cache", (double)d->memory_kv_cache);
            cJSON_AddNumberToObject(o, "memory_workspace", (double)d->memory_workspace);
            cJSON_AddNumberToObject(o, "models", d->models);
            cJSON_AddItemToArray(devs, o);
        }
        cJSON *models = cJSON_AddArrayToObject(j, "models");
        for (size_t i = 0; i < r->n_models; i++)
            json_model(models, r->models[i]);
        print_json(j);
    } else {
        char t[32], f[32], b[32], w[32], k[32], ws[32];
        printf("%-5s %-10s %-5s %-16s %10s %10s %10s %10s %10s %10s\n", "rank", "host", "kind",
               "device", "total", "weights", "kv cache", "workspace", "free", "budget");
        for (size_t i = 0; i < r->n_devices; i++) {
            const Qshard__V1__DeviceStats *d = r->devices[i];
            printf("%-5u %-10.10s %-5s %-16.16s %10s %10s %10s %10s %10s %10s\n", d->rank,
                   d->hostname, d->kind, d->name, fmt_bytes(d->memory_total, t, sizeof t),
                   fmt_bytes(d->memory_weights, w, sizeof w),
                   fmt_bytes(d->memory_kv_cache, k, sizeof k),
                   fmt_bytes(d->memory_workspace, ws, sizeof ws),
                   fmt_bytes(d->memory_free, f, sizeof f),
                   fmt_bytes(d->memory_budget, b, sizeof b));
        }
        if (!r->n_models)
            printf("\nmodels: none loaded\n");
        for (size_t i = 0; i < r->n_models; i++) {
            const Qshard__V1__ModelInfo *m = r->models[i];
            char g1[40], pl[32];
            printf("\nmodel %s (%s, weights %s): %s %u-bit group %s, tp %u on rank(s)", m->name,
                   m->source, m->weights, m->quant ? m->quant->scheme : "?",
                   m->quant ? m->quant->bits : 0,
                   m->quant ? group_text(m->quant, g1, sizeof g1) : "?", m->tp);
            for (size_t j = 0; j < m->n_ranks; j++)
                printf(" %u", m->ranks[j]);
            printf("\n  per rank: %s allocated, %s planned", fmt_bytes(m->rank_bytes, t, sizeof t),
                   fmt_bytes(m->planned_rank_bytes, pl, sizeof pl));
            if (m->smoothing > 0)
                printf("; SmoothQuant alpha %.2f", (double)m->smoothing);
            printf("\n  batch: %u running, %u waiting, room for %u sequences of %u tokens "
                   "(%s KV cache)\n",
                   m->running, m->waiting, m->max_batch, m->max_seq,
                   *m->kv_cache ? m->kv_cache : "fp16");
            printf("  generated %llu tokens, %.1f tokens/s, per token p50 %.1f ms p99 %.1f ms\n",
                   (unsigned long long)m->tokens_generated, m->tokens_per_second, m->p50_token_ms,
                   m->p99_token_ms);
            if (m->n_footprints) {
                printf("  %-22s %12s %12s %8s %14s\n", "scheme", "weights", "per GPU", "GPUs",
                       "GPUs (memory)");
                for (size_t j = 0; j < m->n_footprints; j++) {
                    const Qshard__V1__Footprint *fp = m->footprints[j];
                    char lab[48], g2[40];
                    if (fp->quant->bits >= 8)
                        snprintf(lab, sizeof lab, "%s", fp->quant->scheme);
                    else
                        snprintf(lab, sizeof lab, "%s %u-bit g%s", fp->quant->scheme,
                                 fp->quant->bits, group_text(fp->quant, g2, sizeof g2));
                    printf("%s %-20s %12s %12s %8u %14u\n", fp->loaded ? " *" : "  ", lab,
                           fmt_bytes(fp->weight_bytes, w, sizeof w),
                           fmt_bytes(fp->bytes_per_gpu, k, sizeof k), fp->min_gpus,
                           fp->min_gpus_memory);
                }
                printf("  (* the scheme loaded; GPUs on devices like this daemon's smallest)\n");
            }
        }
        printf("uptime %.1f s, %llu request(s) served\n", r->uptime_seconds,
               (unsigned long long)r->requests_served);
    }
    protobuf_c_message_free_unpacked(&r->base, NULL);
    return QS_EXIT_OK;
}

/* ---- plan --daemon -------------------------------------------------------- */

static const char plan_help[] =
    "usage: qctl plan --daemon MODEL [options]\n"
    "\nPlans MODEL's memory on the daemon, against its own devices (the smallest\n"
    "budget among its ranks). Without --daemon, `qctl plan` plans locally.\n"
    "\noptions:\n"
    "  --model NAME      a preset, e.g. opt-175b (or the first argument)\n" QUANT_HELP
    "  --gpus N          tensor-parallel degree (default: the daemon's world size)\n"
    "  --batch B         sequences decoded together (default 1)\n"
    "  --seq S           KV-cache tokens per sequence (default 512)\n"
    "  --reserve SIZE    per-device runtime bytes (default 1GiB)\n"
    "  --device-memory SIZE  plan against SIZE instead of the daemon's devices\n";

int qs_ctl_plan_daemon(qs_ctl_global *g, int argc, char **argv)
{
    args a = {.cmd = "plan", .help = plan_help, .argc = argc, .argv = argv};
    Qshard__V1__PlanRequest req = QSHARD__V1__PLAN_REQUEST__INIT;
    Qshard__V1__Quantization qm = QSHARD__V1__QUANTIZATION__INIT;
    quant_opts q = {0};
    const char *model = NULL, *v;
    for (a.i = 1; a.i < argc && !a.err; a.i++) {
        if (!next_arg(g, &a) || opt_flag(&a, "--daemon") || quant_opt(&a, &q))
            continue;
        if (opt_val(&a, "--model", &v))
            model = v;
        else if (opt_val(&a, "--gpus", &v))
            parse_u32(&a, "--gpus", v, &req.gpus);
        else if (opt_val(&a, "--batch", &v))
            parse_u32(&a, "--batch", v, &req.batch);
        else if (opt_val(&a, "--seq", &v))
            parse_u32(&a, "--seq", v, &req.seq);
        else if (opt_val(&a, "--reserve", &v))
            parse_size(&a, "--reserve", v, &req.reserve);
        else if (opt_val(&a, "--device-memory", &v))
            parse_size(&a, "--device-memory", v, &req.device_memory);
        else if (argv[a.i][0] != '-' && !model)
            model = argv[a.i];
        else
            unknown_arg(&a);
    }
    if (!a.err && !model)
        usage_error(&a, "name the model to plan, e.g. qctl plan --daemon opt-175b");
    if (a.err)
        return parse_done(&a);
    req.model = (char *)model;
    quant_msg(&q, &qm);
    req.quant = &qm;
    Qshard__V1__PlanReply *r = NULL;
    int rc = unary(g, "plan", QS_METHOD_PLAN, &req, &qshard__v1__plan_reply__descriptor,
                   timeout_or(g, 30), (void **)&r);
    if (rc)
        return rc;
    const Qshard__V1__RankBytes *rb = r->rank;
    if (g->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "model", r->model);
        json_quant(j, "quant", r->quant);
        cJSON_AddNumberToObject(j, "tp", r->tp);
        cJSON_AddNumberToObject(j, "weight_bytes", (double)r->weight_bytes);
        cJSON_AddNumberToObject(j, "linear_params", (double)r->linear_params);
        cJSON *o = cJSON_AddObjectToObject(j, "rank_bytes");
        if (rb) {
            cJSON_AddNumberToObject(o, "linear", (double)rb->linear);
            cJSON_AddNumberToObject(o, "fp16", (double)rb->fp16);
            cJSON_AddNumberToObject(o, "kv_cache", (double)rb->kv_cache);
            cJSON_AddNumberToObject(o, "workspace", (double)rb->workspace);
            cJSON_AddNumberToObject(o, "reserve", (double)rb->reserve);
            cJSON_AddNumberToObject(o, "total", (double)rb->total);
        }
        cJSON_AddNumberToObject(j, "device_memory", (double)r->device_memory);
        cJSON_AddBoolToObject(j, "fits", r->fits);
        cJSON_AddBoolToObject(j, "tp_valid", r->tp_valid);
        if (*r->tp_problem)
            cJSON_AddStringToObject(j, "tp_problem", r->tp_problem);
        cJSON_AddNumberToObject(j, "min_gpus_by_memory", r->min_gpus_by_memory);
        cJSON_AddNumberToObject(j, "min_gpus_valid", r->min_gpus_valid);
        cJSON_AddNumberToObject(j, "world_size", r->world_size);
        print_json(j);
    } else {
        char b1[32], b2[32], gt[40];
        printf("%s, %s %u-bit, group %s, tp %u (daemon world %u)\n", r->model,
               r->quant ? r->quant->scheme : "?", r->quant ? r->quant->bits : 0,
               r->quant ? group_text(r->quant, gt, sizeof gt) : "?", r->tp, r->world_size);
        printf("  weights          %s in all\n", fmt_bytes(r->weight_bytes, b1, sizeof b1));
        if (rb) {
            printf("  per rank         %s: linear %s", fmt_bytes(rb->total, b1, sizeof b1),
                   fmt_bytes(rb->linear, b2, sizeof b2));
            printf(", fp16 %s", fmt_bytes(rb->fp16, b2, sizeof b2));
            printf(", KV %s", fmt_bytes(rb->kv_cache, b2, sizeof b2));
            printf(", workspace %s", fmt_bytes(rb->workspace, b2, sizeof b2));
            printf(", reserve %s\n", fmt_bytes(rb->reserve, b2, sizeof b2));
        }
        printf("  device memory    %s: %s\n", fmt_bytes(r->device_memory, b1, sizeof b1),
               r->fits ? "fits" : "does NOT fit");
        if (!r->tp_valid)
            printf("  tp %u invalid     %s\n", r->tp, r->tp_problem);
        printf("  fewest devices   %u by memory, %u as a valid split\n", r->min_gpus_by_memory,
               r->min_gpus_valid);
    }
    protobuf_c_message_free_unpacked(&r->base, NULL);
    return QS_EXIT_OK;
}

/* ---- load ----------------------------------------------------------------- */

static const char load_help[] =
    "usage: qctl load MODEL [options]\n"
    "\nQuantizes MODEL and loads it across the daemon's ranks, printing progress.\n"
    "\noptions:\n"
    "  --model M         a preset (e.g. opt-125m), a safetensors directory or a GGUF\n"
    "                    file on the daemon's host (or the first argument)\n" QUANT_HELP
    "  --gpus N          ranks in the model's group (default: all)\n"
    "  --weights W       'synthetic' (default) or a path on the daemon's host\n"
    "  --save PATH       also write the quantized shards to PATH (a directory; load it\n"
    "                    later with `qctl load PATH` on as many ranks)\n"
    "  --name ID         serve it under ID (default: the model's name)\n"
    "  --seed N          seed of synthetic weights\n"
    "  --max-seq N       KV-cache tokens per sequence (default: context, at most 2048)\n"
    "  --max-batch N     sequences generated together, each with max-seq tokens of\n"
    "                    KV cache (default 8, fewer when the device cannot hold them)\n"
    "  --kv-cache F      the KV cache's format: fp16 (default), int8 or int4 (an fp16\n"
    "                    scale and minimum per 32 values: 56% or 31% of fp16's bytes)\n"
    "  --calib PATH      calibration text on the daemon's host, for W8A8's SmoothQuant,\n"
    "                    W4A4's outliers and GPTQ (default\n"
    "                    /usr/share/common-licenses/GPL-3; 'none': no calibration)\n"
    "  --gptq            bcq, rtn, w4a4: quantize with GPTQ (each column's error\n"
    "                    compensated through the calibration's input Hessians)\n"
    "  --alpha A         W8A8: SmoothQuant migration strength (default 0.5)\n"
    "  --tokenizer GGUF  the tokenizer of a checkpoint's model\n"
    "  --bcq-iters N     BCQ refinement iterations (default 20)\n"
    "  --no-cache        neither read nor write the daemon's quantized-model cache\n"
    "                    (a file's first load stores its quantized shards there;\n"
    "                    qctl cache list|clear)\n"
    "\nsmollm2-135m with no --weights loads the cached GGUF that deploy/fetch-model.sh\n"
    "fetches, when it is there; other presets default to synthetic weights.\n";

typedef struct load_ctx {
    const qs_ctl_global *g;
    Qshard__V1__LoadEvent *result;
    int tty; /* stderr is a terminal: draw a bar */
} load_ctx;

/* ", 12.3 M weights/s, 40 s left": the stage's rate so far and the time
 * its remaining layers take at that rate ("" before a rate exists). */
static const char *load_rate(const Qshard__V1__LoadProgress *p, char *out, size_t n)
{
    out[0] = '\0';
    if (p->layer == 0 || p->stage_seconds <= 0 || p->layers < p->layer)
        return out;
    double left = p->stage_seconds * (double)(p->layers - p->layer) / p->layer;
    int k = 0;
    if (p->params_done)
        k = snprintf(out, n, ", %.1f M weights/s", (double)p->params_done / p->stage_seconds / 1e6);
    if (k >= 0 && (size_t)k < n && p->layer < p->layers)
        snprintf(out + k, n - (size_t)k, ", %.0f s left", left);
    return out;
}

static int load_on_msg(ProtobufCMessage *msg, void *ud)
{
    load_ctx *l = ud;
    Qshard__V1__LoadEvent *ev = (Qshard__V1__LoadEvent *)msg;
    if (ev->event_case == QSHARD__V1__LOAD_EVENT__EVENT_PROGRESS && ev->progress) {
        const Qshard__V1__LoadProgress *p = ev->progress;
        char total[32];
        if (!l->g->json && !strcmp(p->stage, "planned"))
            fprintf(stderr, "  planned: %s per rank, %u layers\n",
                    fmt_bytes(p->bytes_total, total, sizeof total), p->layers);
        else if (!l->g->json && p->layer && l->tty) {
            /* A bar on a terminal, redrawn in place. */
            char rate[64];
            int w = 30, fill = p->layers ? (int)((uint64_t)w * p->layer / p->layers) : 0;
            fprintf(stderr, "\r  %-12s [%.*s%*s] %u/%u layers, %.1f s%s", p->stage, fill,
                    "##############################", w - fill, "", p->layer, p->layers, p->seconds,
                    load_rate(p, rate, sizeof rate));
            if (p->layer == p->layers)
                fprintf(stderr, "\n");
        } else if (!l->g->json) {
            /* Plain lines elsewhere: the stage, then about every tenth of the layers. */
            char rate[64];
            uint32_t step = p->layers > 10 ? (p->layers + 9) / 10 : 1;
            if (!p->layer)
                fprintf(stderr, "  %-12s %.1f s\n", p->stage, p->seconds);
            else if (p->layer % step == 0 || p->layer == p->layers)
                fprintf(stderr, "  %-12s %u/%u layers, %.1f s%s\n", p->stage, p->layer, p->layers,
                        p->seconds, load_rate(p, rate, sizeof rate));
        }
        protobuf_c_message_free_unpacked(msg, NULL);
        return 0;
    }
    if (l->result)
        protobuf_c_message_free_unpacked(&l->result->base, NULL);
    l->result = ev;
    return 0;
}

int qs_ctl_load(qs_ctl_global *g, int argc, char **argv)
{
    args a = {.cmd = "load", .help = load_help, .argc = argc, .argv = argv};
    Qshard__V1__LoadRequest req = QSHARD__V1__LOAD_REQUEST__INIT;
    Qshard__V1__Quantization qm = QSHARD__V1__QUANTIZATION__INIT;
    quant_opts q = {0};
    const char *model = NULL, *v;
    for (a.i = 1; a.i < argc && !a.err; a.i++) {
        if (!next_arg(g, &a) || quant_opt(&a, &q))
            continue;
        if (opt_val(&a, "--model", &v))
            model = v;
        else if (opt_val(&a, "--gpus", &v))
            parse_u32(&a, "--gpus", v, &req.gpus);
        else if (opt_val(&a, "--weights", &v))
            req.weights = (char *)v;
        else if (opt_val(&a, "--save", &v))
            req.save_path = (char *)v;
        else if (opt_val(&a, "--name", &v))
            req.name = (char *)v;
        else if (opt_val(&a, "--seed", &v))
            parse_u64(&a, "--seed", v, UINT64_MAX, &req.seed);
        else if (opt_val(&a, "--max-seq", &v))
            parse_u32(&a, "--max-seq", v, &req.max_seq);
        else if (opt_val(&a, "--max-batch", &v))
            parse_u32(&a, "--max-batch", v, &req.max_batch);
        else if (opt_val(&a, "--kv-cache", &v))
            req.kv_cache = (char *)v; /* the daemon says which formats exist */
        else if (opt_val(&a, "--calib", &v))
            req.calib_path = (char *)v;
        else if (opt_val(&a, "--tokenizer", &v))
            req.tokenizer = (char *)v;
        else if (opt_val(&a, "--bcq-iters", &v))
            parse_u32(&a, "--bcq-iters", v, &req.bcq_iters);
        else if (opt_flag(&a, "--no-cache"))
            req.no_cache = 1;
        else if (opt_flag(&a, "--gptq"))
            req.gptq = 1;
        else if (opt_val(&a, "--alpha", &v)) {
            double al = 0;
            if (!parse_double(&a, "--alpha", v, &al) && (al <= 0 || al >= 1))
                usage_error(&a, "--alpha must be between 0 and 1, got %s", v);
            req.smooth_alpha = (float)al;
        } else if (argv[a.i][0] != '-' && !model)
            model = argv[a.i];
        else
            unknown_arg(&a);
    }
    if (!a.err && !model)
        usage_error(&a, "name the model to load, e.g. qctl load opt-125m");
    if (a.err)
        return parse_done(&a);
    req.model = (char *)model;
    quant_msg(&q, &qm);
    req.quant = &qm;

    int rc = 0;
    qs_client *c = connect_to(g, &rc);
    if (!c)
        return rc;
    load_ctx l = {g, NULL, isatty(2)};
    qs_rpc_status st;
    double timeout = timeout_or(g, 0);
    if (qs_client_call(c, QS_METHOD_LOAD, &req.base, &qshard__v1__load_event__descriptor, timeout,
                       load_on_msg, &l, &st) != 0) {
        rc = refused(g, "load", &st, timeout);
    } else if (!l.result || l.result->event_case != QSHARD__V1__LOAD_EVENT__EVENT_RESULT ||
               !l.result->result || !l.result->result->model) {
        fprintf(stderr, "qctl load: the daemon ended the load without a result\n");
        rc = QS_EXIT_REFUSED;
    } else {
        const Qshard__V1__ModelInfo *m = l.result->result->model;
        if (g->json) {
            cJSON *j = cJSON_CreateObject();
            cJSON *arr = cJSON_AddArrayToObject(j, "models");
            json_model(arr, m);
            cJSON_AddNumberToObject(j, "seconds", l.result->result->seconds);
            print_json(j);
        } else {
            char b[32], p[32], g1[40];
            printf("loaded %s (%s %u-bit group %s) on %u rank(s) in %.1f s\n", m->name,
                   m->quant->scheme, m->quant->bits, group_text(m->quant, g1, sizeof g1), m->tp,
                   l.result->result->seconds);
            printf("  per rank: %s allocated against %s planned",
                   fmt_bytes(m->rank_bytes, b, sizeof b),
                   fmt_bytes(m->planned_rank_bytes, p, sizeof p));
            if (m->actual) {
                char w[32], k[32];
                printf(" (weights %s, %s KV cache %s for %u sequences of %u tokens)",
                       fmt_bytes(m->actual->linear + m->actual->fp16, w, sizeof w),
                       *m->kv_cache ? m->kv_cache : "fp16",
                       fmt_bytes(m->actual->kv_cache, k, sizeof k), m->max_batch, m->max_seq);
            }
            printf("\n");
            if (m->smoothing > 0)
                printf("  SmoothQuant: calibrated, alpha %.2f\n", (double)m->smoothing);
            if (m->cache && !strcmp(m->cache, "hit"))
                printf("  read from the quantized-model cache (qctl load --no-cache to "
                       "quantize again)\n");
            else if (m->cache && !strcmp(m->cache, "stored"))
                printf("  stored in the quantized-model cache: the next load of this file and "
                       "options reads it\n");
        }
    }
    if (l.result)
        protobuf_c_message_free_unpacked(&l.result->base, NULL);
    qs_client_close(c);
    return rc;
}

/* ---- unload --------------------------------------------------------------- */

static const char unload_help[] = "usage: qctl unload NAME [options]\n"
                                  "\nFrees a loaded model on every rank of its group.\n";

int qs_ctl_unload(qs_ctl_global *g, int argc, char **argv)
{
    args a = {.cmd = "unload", .help = unload_help, .argc = argc, .argv = argv};
    const char *name = NULL;
    for (a.i = 1; a.i < argc && !a.err; a.i++) {
        if (!next_arg(g, &a))
            continue;
        if (argv[a.i][0] != '-' && !name)
            name = argv[a.i];
        else
            unknown_arg(&a);
    }
    if (!a.err && !name)
        usage_error(&a, "name the model to unload (qctl stats lists them)");
    if (a.err)
        return parse_done(&a);
    Qshard__V1__UnloadRequest req = QSHARD__V1__UNLOAD_REQUEST__INIT;
    req.name = (char *)name;
    Qshard__V1__UnloadReply *r = NULL;
    int rc = unary(g, "unload", QS_METHOD_UNLOAD, &req, &qshard__v1__unload_reply__descriptor,
                   timeout_or(g, 60), (void **)&r);
    if (rc)
        return rc;
    if (g->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "name", name);
        cJSON_AddNumberToObject(j, "freed_bytes", (double)r->freed_bytes);
        print_json(j);
    } else {
        char b[32];
        printf("unloaded %s: %s freed\n", name, fmt_bytes(r->freed_bytes, b, sizeof b));
    }
    protobuf_c_message_free_unpacked(&r->base, NULL);
    return QS_EXIT_OK;
}

/* ---- cache ---------------------------------------------------------------- */

static const char cache_help[] =
    "usage: qctl cache [list|clear] [options]\n"
    "\nThe daemon's quantized-model cache: a file's first load with a scheme stores\n"
    "its quantized shards there, and the next load of the same file with the same\n"
    "options reads them instead of quantizing again.\n"
    "  list    the entries on rank 0's node, least recently used first (default)\n"
    "  clear   remove every entry, on every node\n";

int qs_ctl_cache(qs_ctl_global *g, int argc, char **argv)
{
    args a = {.cmd = "cache", .help = cache_help, .argc = argc, .argv = argv};
    const char *action = NULL;
    for (a.i = 1; a.i < argc && !a.err; a.i++) {
        if (!next_arg(g, &a))
            continue;
        if (argv[a.i][0] != '-' && !action)
            action = argv[a.i];
        else
            unknown_arg(&a);
    }
    if (!action)
        action = "list";
    if (!a.err && strcmp(action, "list") != 0 && strcmp(action, "clear") != 0)
        usage_error(&a, "'%s' is not a cache action: use list or clear", action);
    if (a.err)
        return parse_done(&a);
    Qshard__V1__CacheRequest req = QSHARD__V1__CACHE_REQUEST__INIT;
    req.action = (char *)action;
    Qshard__V1__CacheReply *r = NULL;
    int rc = unary(g, "cache", QS_METHOD_CACHE, &req, &qshard__v1__cache_reply__descriptor,
                   timeout_or(g, 120), (void **)&r);
    if (rc)
        return rc;
    if (g->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "dir", r->dir);
        cJSON_AddNumberToObject(j, "bytes", (double)r->bytes);
        cJSON_AddNumberToObject(j, "limit", (double)r->limit);
        cJSON_AddNumberToObject(j, "freed_bytes", (double)r->freed_bytes);
        cJSON *arr = cJSON_AddArrayToObject(j, "entries");
        for (size_t i = 0; i < r->n_entries; i++) {
            const Qshard__V1__CacheEntry *e = r->entries[i];
            cJSON *x = cJSON_CreateObject();
            cJSON_AddStringToObject(x, "key", e->key);
            cJSON_AddStringToObject(x, "source", e->source);
            json_quant(x, "quant", e->quant);
            cJSON_AddNumberToObject(x, "tp", e->tp);
            cJSON_AddNumberToObject(x, "bytes", (double)e->bytes);
            cJSON_AddNumberToObject(x, "created", e->created);
            cJSON_AddNumberToObject(x, "last_used", e->last_used);
            cJSON_AddItemToArray(arr, x);
        }
        print_json(j);
    } else {
        char b[32], l[32];
        if (!strcmp(action, "clear"))
            printf("cleared: %s freed on rank 0's node\n", fmt_bytes(r->freed_bytes, b, sizeof b));
        printf("%s: %zu entr%s, %s of %s\n", r->dir, r->n_entries, r->n_entries == 1 ? "y" : "ies",
               fmt_bytes(r->bytes, b, sizeof b), fmt_bytes(r->limit, l, sizeof l));
        for (size_t i = 0; i < r->n_entries; i++) {
            const Qshard__V1__CacheEntry *e = r->entries[i];
            char g1[40], age[32];
            time_t t = (time_t)e->last_used;
            struct tm tm;
            strftime(age, sizeof age, "%Y-%m-%d %H:%M", localtime_r(&t, &tm));
            printf("  %s  %-5s %u-bit group %-4s tp %u  %9s  used %s  %s\n", e->key,
                   e->quant ? e->quant->scheme : "?", e->quant ? e->quant->bits : 0,
                   e->quant ? group_text(e->quant, g1, sizeof g1) : "?", e->tp,
                   fmt_bytes(e->bytes, b, sizeof b), age, e->source);
        }
    }
    protobuf_c_message_free_unpacked(&r->base, NULL);
    return QS_EXIT_OK;
}

/* ---- generate ------------------------------------------------------------- */

static const char generate_help[] =
    "usage: qctl generate MODEL PROMPT [options]\n"
    "\nStreams the continuation of PROMPT by a loaded model.\n"
    "\noptions:\n"
    "  --model NAME        a loaded model (or the first argument)\n"
    "  --prompt TEXT       the prompt (or the second argument)\n"
    "  --max-tokens N      tokens to generate (default 64)\n"
    "  --temperature T     0 for greedy (default 0)\n"
    "  --top-p P           nucleus cut in (0, 1] (default 1)\n"
    "  --top-k K           keep the K most likely tokens (default: all)\n"
    "  --seed N            sampling seed (default: the daemon picks and reports one)\n";

typedef struct gen_ctx {
    const qs_ctl_global *g;
    cJSON *tokens;
    char *text;
    size_t len;
    Qshard__V1__GenerateDone *done;
    ProtobufCMessage *done_msg;
} gen_ctx;

static int gen_on_msg(ProtobufCMessage *msg, void *ud)
{
    gen_ctx *x = ud;
    Qshard__V1__GenerateEvent *ev = (Qshard__V1__GenerateEvent *)msg;
    if (ev->event_case == QSHARD__V1__GENERATE_EVENT__EVENT_TOKEN && ev->token) {
        const char *t = ev->token->text;
        if (x->g->json) {
            size_t n = strlen(t);
            char *s = realloc(x->text, x->len + n + 1);
            if (s) {
                memcpy(s + x->len, t, n + 1);
                x->text = s;
                x->len += n;
            }
            cJSON_AddItemToArray(x->tokens, cJSON_CreateNumber(ev->token->token_id));
        } else {
            fputs(t, stdout);
            fflush(stdout);
        }
        protobuf_c_message_free_unpacked(msg, NULL);
        return 0;
    }
    if (ev->event_case == QSHARD__V1__GENERATE_EVENT__EVENT_DONE && ev->done) {
        if (x->done_msg)
            protobuf_c_message_free_unpacked(x->done_msg, NULL);
        x->done_msg = msg;
        x->done = ev->done;
        return 0;
    }
    protobuf_c_message_free_unpacked(msg, NULL);
    return 0;
}

int qs_ctl_generate(qs_ctl_global *g, int argc, char **argv)
{
    args a = {.cmd = "generate", .help = generate_help, .argc = argc, .argv = argv};
    Qshard__V1__GenerateRequest req = QSHARD__V1__GENERATE_REQUEST__INIT;
    const char *model = NULL, *prompt = NULL, *v;
    double temp = 0, top_p = 0;
    for (a.i = 1; a.i < argc && !a.err; a.i++) {
        if (!next_arg(g, &a))
            continue;
        if (opt_val(&a, "--model", &v))
            model = v;
        else if (opt_val(&a, "--prompt", &v))
            prompt = v;
        else if (opt_val(&a, "--max-tokens", &v))
            parse_u32(&a, "--max-tokens", v, &req.max_tokens);
        else if (opt_val(&a, "--temperature", &v))
            parse_double(&a, "--temperature", v, &temp);
        else if (opt_val(&a, "--top-p", &v))
            parse_double(&a, "--top-p", v, &top_p);
        else if (opt_val(&a, "--top-k", &v))
            parse_u32(&a, "--top-k", v, &req.top_k);
        else if (opt_val(&a, "--seed", &v))
            parse_u64(&a, "--seed", v, UINT64_MAX, &req.seed);
        else if (argv[a.i][0] != '-' && !model)
            model = argv[a.i];
        else if (argv[a.i][0] != '-' && !prompt)
            prompt = argv[a.i];
        else
            unknown_arg(&a);
    }
    if (!a.err && (!model || !prompt))
        usage_error(&a, "give a model and a prompt, e.g. qctl generate opt-125m 'Hello'");
    if (a.err)
        return parse_done(&a);
    req.model = (char *)model;
    req.prompt = (char *)prompt;
    req.temperature = (float)temp;
    req.top_p = (float)top_p;

    int rc = 0;
    qs_client *c = connect_to(g, &rc);
    if (!c)
        return rc;
    gen_ctx x = {.g = g, .tokens = cJSON_CreateArray()};
    qs_rpc_status st;
    double timeout = timeout_or(g, 0);
    if (qs_client_call(c, QS_METHOD_GENERATE, &req.base, &qshard__v1__generate_event__descriptor,
                       timeout, gen_on_msg, &x, &st) != 0) {
        if (!g->json && x.len)
            putchar('\n');
        rc = refused(g, "generate", &st, timeout);
    } else if (g->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "text", x.text ? x.text : "");
        cJSON_AddItemToObject(j, "tokens", x.tokens);
        x.tokens = NULL;
        if (x.done) {
            cJSON_AddNumberToObject(j, "prompt_tokens", x.done->prompt_tokens);
            cJSON_AddNumberToObject(j, "generated_tokens", x.done->generated_tokens);
            cJSON_AddStringToObject(j, "finish_reason", x.done->finish_reason);
            cJSON_AddNumberToObject(j, "first_token_seconds", x.done->first_token_seconds);
            cJSON_AddNumberToObject(j, "tokens_per_second", x.done->tokens_per_second);
            cJSON_AddNumberToObject(j, "seed", (double)x.done->seed);
            cJSON_AddNumberToObject(j, "decode_allreduce_share", x.done->decode_allreduce_share);
        }
        print_json(j);
    } else {
        /* The summary goes to stderr: the text must be out first when both
         * land in one file. */
        putchar('\n');
        fflush(stdout);
        if (x.done)
            fprintf(stderr, "[%u tokens, %s; first token %.3f s, %.1f tokens/s, seed %llu]\n",
                    x.done->generated_tokens, x.done->finish_reason, x.done->first_token_seconds,
                    x.done->tokens_per_second, (unsigned long long)x.done->seed);
    }
    cJSON_Delete(x.tokens);
    free(x.text);
    if (x.done_msg)
        protobuf_c_message_free_unpacked(x.done_msg, NULL);
    qs_client_close(c);
    return rc;
}

/* ---- eval ----------------------------------------------------------------- */

static const char eval_help[] =
    "usage: qctl eval MODEL --text FILE [options]\n"
    "\nPerplexity of a loaded model on a text, as llama.cpp's perplexity tool computes it:\n"
    "non-overlapping windows of --ctx tokens, each scored on its second half (the first\n"
    "token of a window becomes BOS when the model asks for one; SmolLM2 does not).\n"
    "Progress goes to stderr after each window.\n"
    "\noptions:\n"
    "  --model NAME        a loaded model (or the first argument)\n"
    "  --text FILE         a UTF-8 text file on the daemon's host (also --text-file)\n"
    "  --string TEXT       the text itself\n"
    "  --ctx N             tokens per window (default 512)\n"
    "  --max-chunks N      evaluate at most N windows (default: all)\n";

typedef struct eval_ctx {
    const qs_ctl_global *g;
    Qshard__V1__EvalEvent *done;
    int tty;
    cJSON *windows; /* --json: the running estimate after each window, as llama.cpp prints it */
} eval_ctx;

static int eval_on_msg(ProtobufCMessage *msg, void *ud)
{
    eval_ctx *e = ud;
    Qshard__V1__EvalEvent *ev = (Qshard__V1__EvalEvent *)msg;
    if (ev->event_case == QSHARD__V1__EVAL_EVENT__EVENT_PROGRESS && ev->progress) {
        const Qshard__V1__EvalProgress *p = ev->progress;
        if (!e->g->json)
            fprintf(stderr, "%s  window %u/%u  perplexity so far %.4f  %.1f s%s",
                    e->tty ? "\r" : "", p->chunks, p->chunks_total, p->perplexity, p->seconds,
                    e->tty ? "" : "\n");
        if (e->windows) {
            cJSON *w = cJSON_CreateObject();
            cJSON_AddNumberToObject(w, "window", p->chunks);
            cJSON_AddNumberToObject(w, "perplexity_so_far", p->perplexity);
            cJSON_AddNumberToObject(w, "seconds", p->seconds);
            cJSON_AddItemToArray(e->windows, w);
        }
        protobuf_c_message_free_unpacked(msg, NULL);
        return 0;
    }
    if (e->done)
        protobuf_c_message_free_unpacked(&e->done->base, NULL);
    e->done = ev;
    return 0;
}

int qs_ctl_eval(qs_ctl_global *g, int argc, char **argv)
{
    args a = {.cmd = "eval", .help = eval_help, .argc = argc, .argv = argv};
    Qshard__V1__EvalRequest req = QSHARD__V1__EVAL_REQUEST__INIT;
    const char *model = NULL, *v;
    for (a.i = 1; a.i < argc && !a.err; a.i++) {
        if (!next_arg(g, &a))
            continue;
        if (opt_val(&a, "--model", &v)) {
            model = v;
        } else if (opt_val(&a, "--text", &v) || opt_val(&a, "--text-file", &v)) {
            if (req.source_case)
                usage_error(&a, "give one text: --text FILE or --string TEXT");
            req.source_case = QSHARD__V1__EVAL_REQUEST__SOURCE_TEXT_PATH;
            req.text_path = (char *)v;
        } else if (opt_val(&a, "--string", &v)) {
            if (req.source_case)
                usage_error(&a, "give one text: --text FILE or --string TEXT");
            req.source_case = QSHARD__V1__EVAL_REQUEST__SOURCE_TEXT;
            req.text = (char *)v;
        } else if (opt_val(&a, "--ctx", &v)) {
            parse_u32(&a, "--ctx", v, &req.ctx);
        } else if (opt_val(&a, "--max-chunks", &v)) {
            parse_u32(&a, "--max-chunks", v, &req.max_chunks);
        } else if (argv[a.i][0] != '-' && !model) {
            model = argv[a.i];
        } else {
            unknown_arg(&a);
        }
    }
    if (!a.err && !model)
        usage_error(&a, "name the model to evaluate");
    if (!a.err && !req.source_case)
        usage_error(&a, "give the text: --text FILE or --string TEXT");
    if (a.err)
        return parse_done(&a);
    req.model = (char *)model;

    int rc = 0;
    qs_client *c = connect_to(g, &rc);
    if (!c)
        return rc;
    eval_ctx e = {g, NULL, isatty(2), g->json ? cJSON_CreateArray() : NULL};
    qs_rpc_status st;
    double timeout = timeout_or(g, 0);
    if (qs_client_call(c, QS_METHOD_EVAL, &req.base, &qshard__v1__eval_event__descriptor, timeout,
                       eval_on_msg, &e, &st) != 0) {
        if (e.tty && !g->json)
            fprintf(stderr, "\n");
        rc = refused(g, "eval", &st, timeout);
    } else if (!e.done || e.done->event_case != QSHARD__V1__EVAL_EVENT__EVENT_DONE ||
               !e.done->done) {
        fprintf(stderr, "qctl eval: the daemon ended the evaluation without a result\n");
        rc = QS_EXIT_REFUSED;
    } else {
        const Qshard__V1__EvalReply *r = e.done->done;
        if (e.tty && !g->json)
            fprintf(stderr, "\n");
        if (g->json) {
            cJSON *j = cJSON_CreateObject();
            cJSON_AddStringToObject(j, "model", model);
            cJSON_AddNumberToObject(j, "perplexity", r->perplexity);
            cJSON_AddNumberToObject(j, "mean_nll", r->mean_nll);
            cJSON_AddNumberToObject(j, "tokens", (double)r->tokens);
            cJSON_AddNumberToObject(j, "text_tokens", (double)r->text_tokens);
            cJSON_AddNumberToObject(j, "chunks", r->chunks);
            cJSON_AddNumberToObject(j, "ctx", req.ctx ? req.ctx : 512);
            cJSON_AddBoolToObject(j, "bos", r->bos);
            cJSON_AddNumberToObject(j, "seconds", r->seconds);
            cJSON_AddItemToObject(j, "windows", e.windows);
            e.windows = NULL;
            print_json(j);
        } else {
            printf("%s: perplexity %.4f (mean NLL %.4f) over %llu scored tokens in %u window(s) "
                   "of %u, %.1f s (text: %llu tokens)\n",
                   model, r->perplexity, r->mean_nll, (unsigned long long)r->tokens, r->chunks,
                   req.ctx ? req.ctx : 512, r->seconds, (unsigned long long)r->text_tokens);
        }
    }
    if (e.done)
        protobuf_c_message_free_unpacked(&e.done->base, NULL);
    cJSON_Delete(e.windows); /* still ours when the eval failed */
    qs_client_close(c);
    return rc;
}

/* ---- bench ---------------------------------------------------------------- */

static const char bench_help[] =
    "usage: qctl bench [options]\n"
    "\nTimes a quantized GEMM/GEMV kernel on the daemon's devices against the fp32\n"
    "BLAS baseline on the same random weights (one copy: cache-resident shapes\n"
    "flatter the kernel; qbench measures from DRAM).\n"
    "\noptions:\n"
    "  --shape MxK[,MxK...]  output x input features; repeatable (default: OPT-175B's)\n"
    "  --batch B             tokens per call, 1 for GEMV (default 1)\n" QUANT_HELP
    "  --iterations N        timed calls per shape, median reported (default 20)\n"
    "  --gpus N              ranks that time it (default: all)\n";

#define MAX_CLI_SHAPES 64

int qs_ctl_bench(qs_ctl_global *g, int argc, char **argv)
{
    args a = {.cmd = "bench", .help = bench_help, .argc = argc, .argv = argv};
    Qshard__V1__BenchRequest req = QSHARD__V1__BENCH_REQUEST__INIT;
    Qshard__V1__Quantization qm = QSHARD__V1__QUANTIZATION__INIT;
    Qshard__V1__Shape shapes[MAX_CLI_SHAPES];
    Qshard__V1__Shape *shape_ptrs[MAX_CLI_SHAPES];
    size_t n_shapes = 0;
    quant_opts q = {0};
    const char *v;
    for (a.i = 1; a.i < argc && !a.err; a.i++) {
        if (!next_arg(g, &a) || quant_opt(&a, &q))
            continue;
        if (opt_val(&a, "--shape", &v)) {
            if (a.err)
                break;
            const char *s = v;
            while (*s && !a.err) {
                unsigned m, k;
                int used = 0;
                if (sscanf(s, "%ux%u%n", &m, &k, &used) != 2 || (s[used] && s[used] != ',')) {
                    usage_error(&a, "--shape takes MxK[,MxK...], e.g. 12288x12288, got '%s'", v);
                    break;
                }
                if (n_shapes == MAX_CLI_SHAPES) {
                    usage_error(&a, "at most %d shapes", MAX_CLI_SHAPES);
                    break;
                }
                Qshard__V1__Shape sh = QSHARD__V1__SHAPE__INIT;
                sh.m = m;
                sh.k = k;
                shapes[n_shapes] = sh;
                shape_ptrs[n_shapes] = &shapes[n_shapes];
                n_shapes++;
                s += used + (s[used] == ',');
            }
        } else if (opt_val(&a, "--batch", &v)) {
            parse_u32(&a, "--batch", v, &req.batch);
        } else if (opt_val(&a, "--iterations", &v)) {
            parse_u32(&a, "--iterations", v, &req.iterations);
        } else if (opt_val(&a, "--gpus", &v)) {
            parse_u32(&a, "--gpus", v, &req.gpus);
        } else {
            unknown_arg(&a);
        }
    }
    if (a.err)
        return parse_done(&a);
    req.n_shapes = n_shapes;
    req.shapes = shape_ptrs;
    quant_msg(&q, &qm);
    req.quant = &qm;
    Qshard__V1__BenchReply *r = NULL;
    int rc = unary(g, "bench", QS_METHOD_BENCH, &req, &qshard__v1__bench_reply__descriptor,
                   timeout_or(g, 0), (void **)&r);
    if (rc)
        return rc;
    if (g->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON *arr = cJSON_AddArrayToObject(j, "results");
        for (size_t i = 0; i < r->n_results; i++) {
            const Qshard__V1__BenchResult *b = r->results[i];
            cJSON *o = cJSON_CreateObject();
            cJSON_AddNumberToObject(o, "m", b->shape ? b->shape->m : 0);
            cJSON_AddNumberToObject(o, "k", b->shape ? b->shape->k : 0);
            cJSON_AddNumberToObject(o, "rank", b->rank);
            cJSON_AddStringToObject(o, "device", b->device);
            cJSON_AddStringToObject(o, "kernel", b->kernel);
            cJSON_AddNumberToObject(o, "quant_us", b->quant_us);
            cJSON_AddNumberToObject(o, "fp16_us", b->fp16_us);
            cJSON_AddNumberToObject(o, "speedup", b->speedup);
            cJSON_AddNumberToObject(o, "weight_bytes", (double)b->weight_bytes);
            cJSON_AddItemToArray(arr, o);
        }
        print_json(j);
    } else {
        printf("%-5s %-14s %-20s %-16s %12s %12s %8s\n", "rank", "shape", "device", "kernel",
               "quant us", "fp16 us", "speedup");
        for (size_t i = 0; i < r->n_results; i++) {
            const Qshard__V1__BenchResult *b = r->results[i];
            char shape[32];
            snprintf(shape, sizeof shape, "%ux%u", b->shape ? b->shape->m : 0,
                     b->shape ? b->shape->k : 0);
            printf("%-5u %-14s %-20.20s %-16.16s %12.2f %12.2f %7.2fx\n", b->rank, shape, b->device,
                   b->kernel, b->quant_us, b->fp16_us, b->speedup);
        }
    }
    protobuf_c_message_free_unpacked(&r->base, NULL);
    return QS_EXIT_OK;
}

/* ---- shutdown ------------------------------------------------------------- */

static const char shutdown_help[] =
    "usage: qctl shutdown [options]\n"
    "\nAsks the daemon to stop: it refuses new requests, finishes those in flight\n"
    "within its --drain-timeout, and every rank exits 0.\n";

int qs_ctl_shutdown(qs_ctl_global *g, int argc, char **argv)
{
    args a = {.cmd = "shutdown", .help = shutdown_help, .argc = argc, .argv = argv};
    for (a.i = 1; a.i < argc && !a.err; a.i++)
        if (next_arg(g, &a))
            unknown_arg(&a);
    if (a.err)
        return parse_done(&a);
    Qshard__V1__ShutdownRequest req = QSHARD__V1__SHUTDOWN_REQUEST__INIT;
    Qshard__V1__ShutdownReply *r = NULL;
    int rc = unary(g, "shutdown", QS_METHOD_SHUTDOWN, &req, &qshard__v1__shutdown_reply__descriptor,
                   timeout_or(g, 30), (void **)&r);
    if (rc)
        return rc;
    if (g->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddBoolToObject(j, "draining", 1);
        cJSON_AddNumberToObject(j, "in_flight", r->in_flight);
        cJSON_AddNumberToObject(j, "drain_timeout_seconds", r->drain_timeout_seconds);
        print_json(j);
    } else {
        printf("qdaemon at %s is shutting down: %u other request(s) in flight, %g s to finish\n",
               g->addr, r->in_flight, r->drain_timeout_seconds);
    }
    protobuf_c_message_free_unpacked(&r->base, NULL);
    return QS_EXIT_OK;
}

/* ---- For the other command files (qs_ctl.h) ------------------------------- */

int qs_ctl_next_arg(qs_ctl_global *g, qs_args *a)
{
    return next_arg(g, a);
}

int qs_ctl_opt_val(qs_args *a, const char *name, const char **val)
{
    return opt_val(a, name, val);
}

int qs_ctl_parse_u32(qs_args *a, const char *opt, const char *v, uint32_t *out)
{
    return parse_u32(a, opt, v, out);
}

int qs_ctl_parse_double(qs_args *a, const char *opt, const char *v, double *out)
{
    return parse_double(a, opt, v, out);
}

int qs_ctl_unknown_arg(qs_args *a)
{
    return unknown_arg(a);
}

int qs_ctl_usage(qs_args *a, const char *msg)
{
    return usage_error(a, "%s", msg);
}

int qs_ctl_parse_done(qs_args *a)
{
    return parse_done(a);
}

qs_client *qs_ctl_connect(const qs_ctl_global *g, int *rc)
{
    return connect_to(g, rc);
}

int qs_ctl_refused(const qs_ctl_global *g, const char *cmd, const qs_rpc_status *st, double timeout)
{
    return refused(g, cmd, st, timeout);
}

void qs_ctl_print_json(cJSON *j)
{
    print_json(j);
}
