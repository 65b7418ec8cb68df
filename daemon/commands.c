/* The commands: for each RPC, a validation on rank 0 (before any rank is
 * involved), a run on every rank, and a reply built on rank 0 from every
 * rank's part. Health.Check and Shutdown are answered by rank 0 alone.
 */
#define _POSIX_C_SOURCE 200809L
#include "qs_daemon.h"
#include "qs_shard.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_TP         64u
#define MAX_SHAPE_DIM  (1u << 20)
#define MAX_SHAPES     64u
#define MAX_TOKENS     8192u
#define MAX_CTX        32768u
#define MAX_BATCH      4096u
#define MAX_ITERATIONS 100000u
#define MAX_STOPS      8u /* OpenAI's API takes 4, and adds ChatML's end */
#define MAX_STOP_LEN   256u

grpc_status_code qs_err_status(int err)
{
    switch (err) {
    case QS_OK:
        return GRPC_STATUS_OK;
    case QS_EINVAL:
    case QS_EFORMAT:
    case QS_EOVERFLOW:
        return GRPC_STATUS_INVALID_ARGUMENT;
    case QS_ENOMEM:
    case QS_ENOFIT:
        return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case QS_EIO:
    case QS_ENODEV:
    case QS_ESTATE:
        return GRPC_STATUS_FAILED_PRECONDITION;
    case QS_ENOTSUP:
        return GRPC_STATUS_UNIMPLEMENTED;
    case QS_ENOTFOUND:
        return GRPC_STATUS_NOT_FOUND;
    case QS_EEXIST:
        return GRPC_STATUS_ALREADY_EXISTS;
    case QS_ECOMM:
    case QS_EBUSY:
        return GRPC_STATUS_UNAVAILABLE;
    default:
        return GRPC_STATUS_INTERNAL;
    }
}

/* ---- Helpers -------------------------------------------------------------- */

static int pack_reply(const void *msg, grpc_byte_buffer **out)
{
    *out = qs_proto_pack(msg);
    return *out ? QS_OK : qs_seterr(QS_ENOMEM, "the daemon ran out of memory packing the reply");
}

static int pack_part(const void *msg, qs_buf *out)
{
    out->data = qs_proto_pack_bytes(msg, &out->len);
    return out->data ? QS_OK : qs_seterr(QS_ENOMEM, "out of memory packing a rank's reply");
}

static double uptime(const qs_daemon *d)
{
    return qs_now() - d->started;
}

static int uses_groups(qs_scheme s)
{
    return s == QS_SCHEME_BCQ || s == QS_SCHEME_RTN;
}

/* Request quantization -> qs_quant with defaults filled in. m may be NULL (a
 * checkpoint or a bare kernel shape): the default group is then 128. */
int qs_quant_resolve(const Qshard__V1__Quantization *in, const qs_model_config *m, qs_quant *out)
{
    const char *scheme = in && in->scheme && *in->scheme ? in->scheme : "rtn";
    int err = qs_scheme_parse(scheme, &out->scheme);
    if (err)
        return err;
    if (in && in->bits > 64)
        return qs_seterr(QS_EINVAL, "bits must be 1..8 (or 16 for fp16), got %u", in->bits);
    out->bits = in ? (int)in->bits : 0;
    if (in && in->group_case == QSHARD__V1__QUANTIZATION__GROUP_GROUP_SIZE)
        out->group_size = in->group_size;
    else
        out->group_size = qs_scheme_default_group(m, out->scheme);
    if (in && in->outlier_channels_case == QSHARD__V1__QUANTIZATION__OUTLIER_CHANNELS_OUTLIERS)
        out->outliers = in->outliers;
    else
        out->outliers = out->scheme == QS_SCHEME_W4A4 ? QS_W4A4_OUTLIERS : 0;
    return qs_quant_check(out);
}

void qs_quant_fill(const qs_quant *q, Qshard__V1__Quantization *out)
{
    out->scheme = (char *)qs_scheme_name(q->scheme);
    out->bits = (uint32_t)q->bits;
    out->group_case = QSHARD__V1__QUANTIZATION__GROUP_GROUP_SIZE;
    out->group_size = q->group_size;
    if (q->scheme == QS_SCHEME_W4A4) {
        out->outlier_channels_case = QSHARD__V1__QUANTIZATION__OUTLIER_CHANNELS_OUTLIERS;
        out->outliers = q->outliers;
    }
}

static int check_gpus(const qs_daemon *d, uint32_t gpus)
{
    if (gpus > (uint32_t)d->world)
        return qs_seterr(QS_EINVAL,
                         "gpus %u exceeds the daemon's %d rank(s): ask for at most %d, or restart "
                         "qdaemon with mpirun -np %u",
                         gpus, d->world, d->world, gpus);
    return QS_OK;
}

static int check_readable(const char *what, const char *path)
{
    if (access(path, R_OK) != 0)
        return qs_seterr(errno == ENOENT ? QS_ENOTFOUND : QS_EIO,
                         "cannot read %s '%s' on the daemon's host: %s", what, path,
                         strerror(errno));
    return QS_OK;
}

/* The directory of path must exist and be writable. */
static int check_writable_dir_of(const char *what, const char *path)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash)
        snprintf(dir, sizeof dir, ".");
    else if (slash == dir)
        dir[1] = '\0';
    else
        *slash = '\0';
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return qs_seterr(QS_ENOTFOUND,
                         "%s '%s': the directory '%s' does not exist on the daemon's host", what,
                         path, dir);
    if (access(dir, W_OK) != 0)
        return qs_seterr(QS_EIO, "%s '%s': the daemon cannot write to '%s': %s", what, path, dir,
                         strerror(errno));
    return QS_OK;
}

/* Model names become ids in later requests and in logs: keep them plain. */
static int check_name(const char *name)
{
    size_t n = strlen(name);
    if (n > 63)
        return qs_seterr(QS_EINVAL, "the model name is %zu characters long: at most 63", n);
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)name[i]) && !strchr("._-", name[i]))
            return qs_seterr(QS_EINVAL,
                             "the model name '%s' may hold only letters, digits, '.', '_' "
                             "and '-'",
                             name);
    return QS_OK;
}

static int check_model_named(const char *model, const char *verb)
{
    if (!model || !*model)
        return qs_seterr(QS_EINVAL, "name the model to %s (qctl stats lists the loaded ones)",
                         verb);
    return QS_OK;
}

/* ---- The device part shared by Stats and Plan ----------------------------- */

static void device_fill(const qs_daemon *d, Qshard__V1__DeviceStats *ds)
{
    ds->rank = (uint32_t)d->rank;
    ds->hostname = (char *)d->dev.hostname;
    ds->pid = (uint32_t)getpid();
    ds->kind = d->dev.cuda ? "cuda" : "cpu";
    ds->name = (char *)d->dev.name;
    ds->index = d->dev.index;
    ds->memory_total = d->dev.total;
    ds->memory_free = d->dev.free;
    ds->memory_budget = d->dev.budget;
    qs_models_device(d, &ds->memory_weights, &ds->memory_kv_cache, &ds->memory_workspace,
                     &ds->models);
    ds->memory_used = ds->memory_weights + ds->memory_kv_cache + ds->memory_workspace;
    /* A CPU device's free memory is its budget less what the models hold. */
    if (!d->dev.cuda)
        ds->memory_free = d->dev.budget > ds->memory_used ? d->dev.budget - ds->memory_used : 0;
}

static int run_device(qs_daemon *d, const qs_cmd *cmd, qs_buf *out)
{
    (void)cmd;
    int err = qs_device_refresh(&d->dev);
    if (err)
        return err;
    Qshard__V1__DeviceStats ds = QSHARD__V1__DEVICE_STATS__INIT;
    device_fill(d, &ds);
    return pack_part(&ds, out);
}

/* Unpacks every rank's DeviceStats; free with devices_free. */
static int devices_unpack(const qs_daemon *d, const qs_part *parts, Qshard__V1__DeviceStats ***out)
{
    Qshard__V1__DeviceStats **devs = calloc((size_t)d->world, sizeof *devs);
    if (!devs)
        return qs_seterr(QS_ENOMEM, "out of memory");
    for (int i = 0; i < d->world; i++) {
        devs[i] = qshard__v1__device_stats__unpack(NULL, parts[i].len, parts[i].data);
        if (!devs[i]) {
            for (int j = 0; j < i; j++)
                qshard__v1__device_stats__free_unpacked(devs[j], NULL);
            free(devs);
            return qs_seterr(QS_EINTERNAL, "rank %d sent a malformed device report", i);
        }
    }
    *out = devs;
    return QS_OK;
}

static void devices_free(const qs_daemon *d, Qshard__V1__DeviceStats **devs)
{
    for (int i = 0; devs && i < d->world; i++)
        qshard__v1__device_stats__free_unpacked(devs[i], NULL);
    free(devs);
}

/* ---- Health --------------------------------------------------------------- */

static int run_ping(qs_daemon *d, const qs_cmd *cmd, qs_buf *out)
{
    (void)d, (void)cmd, (void)out;
    return QS_OK;
}

static int reply_health(qs_daemon *d, const qs_cmd *cmd, const qs_part *parts, double seconds,
                        grpc_byte_buffer **out)
{
    (void)cmd, (void)parts;
    Qshard__V1__HealthReply r = QSHARD__V1__HEALTH_REPLY__INIT;
    r.draining = qs_server_draining(d->server);
    r.serving = !r.draining;
    r.world_size = (uint32_t)d->world;
    r.version = QS_DAEMON_VERSION;
    r.ranks_ok = (uint32_t)d->world; /* a rank that failed would have failed the command */
    r.roundtrip_ms = seconds * 1e3;
    r.uptime_seconds = uptime(d);
    r.requests_served = atomic_load(&d->served);
    return pack_reply(&r, out);
}

/* grpc.health.v1.Health/Check, answered without the ranks so that probes are
 * cheap; qshard.v1.Qshard/Health is the deep check that reaches every rank. */
static int answer_check(qs_daemon *d, const qs_sink *sink, const ProtobufCMessage *req,
                        grpc_byte_buffer **out)
{
    (void)sink;
    const Grpc__Health__V1__HealthCheckRequest *r = (const void *)req;
    Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    if (!*r->service || strcmp(r->service, QS_SERVICE) == 0)
        resp.status = qs_server_draining(d->server)
                          ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING
                          : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
    else if (strcmp(r->service, QS_HEALTH_SERVICE) == 0)
        resp.status = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
    else
        return qs_seterr(QS_ENOTFOUND,
                         "unknown service '%s': qdaemon serves '' and '" QS_SERVICE "'",
                         r->service);
    return pack_reply(&resp, out);
}

/* ---- Stats ---------------------------------------------------------------- */

static int reply_stats(qs_daemon *d, const qs_cmd *cmd, const qs_part *parts, double seconds,
                       grpc_byte_buffer **out)
{
    (void)cmd, (void)seconds;
    Qshard__V1__DeviceStats **devs = NULL;
    int err = devices_unpack(d, parts, &devs);
    if (err)
        return err;
    Qshard__V1__StatsReply r = QSHARD__V1__STATS_REPLY__INIT;
    r.world_size = (uint32_t)d->world;
    r.n_devices = (size_t)d->world;
    r.devices = devs;
    /* Footprints are planned for the smallest device, which bounds a split. */
    uint64_t mem = UINT64_MAX;
    for (int i = 0; i < d->world; i++)
        if (devs[i]->memory_budget < mem)
            mem = devs[i]->memory_budget;
    Qshard__V1__ModelInfo **infos = NULL;
    size_t n = 0;
    if ((err = qs_models_info(d, mem, &infos, &n))) {
        devices_free(d, devs);
        return err;
    }
    r.n_models = n;
    r.models = infos;
    r.uptime_seconds = uptime(d);
    r.requests_served = atomic_load(&d->served);
    err = pack_reply(&r, out);
    qs_models_info_free(infos, n);
    devices_free(d, devs);
    return err;
}

/* ---- Plan ----------------------------------------------------------------- */

static int plan_inputs(const qs_daemon *d, const Qshard__V1__PlanRequest *r,
                       const qs_model_config **m, qs_quant *q, qs_workload *w, uint32_t *tp)
{
    if (!*r->model)
        return qs_seterr(QS_EINVAL, "name the model to plan, e.g. opt-175b");
    *m = qs_preset_find(r->model);
    if (!*m)
        return QS_ENOTFOUND;
    int err = qs_quant_resolve(r->quant, *m, q);
    if (err)
        return err;
    if (r->gpus > MAX_TP)
        return qs_seterr(QS_EINVAL, "gpus must be 1..%u (0: the daemon's %d ranks), got %u", MAX_TP,
                         d->world, r->gpus);
    *tp = r->gpus ? r->gpus : (uint32_t)d->world;
    w->batch = r->batch ? r->batch : 1;
    w->seq = r->seq ? r->seq : QS_PLAN_DEFAULT_SEQ;
    w->reserve = r->reserve ? r->reserve : QS_PLAN_DEFAULT_RESERVE;
    w->kv = QS_KV_FP16; /* PlanRequest has no KV format: qctl plan --kv-cache plans others */
    return QS_OK;
}

static int validate_plan(qs_daemon *d, const ProtobufCMessage *req)
{
    const qs_model_config *m;
    qs_quant q;
    qs_workload w;
    uint32_t tp;
    int err = plan_inputs(d, (const void *)req, &m, &q, &w, &tp);
    if (err)
        return err;
    qs_plan p;
    return qs_plan_make(m, &q, tp, &w, &p); /* checks the workload */
}

static int reply_plan(qs_daemon *d, const qs_cmd *cmd, const qs_part *parts, double seconds,
                      grpc_byte_buffer **out)
{
    (void)seconds;
    const Qshard__V1__PlanRequest *r = (const void *)cmd->req;
    const qs_model_config *m;
    qs_quant q;
    qs_workload w;
    uint32_t tp;
    int err = plan_inputs(d, r, &m, &q, &w, &tp);
    if (err)
        return err;
    uint64_t mem = r->device_memory;
    if (!mem) {
        /* The smallest device bounds every rank's share. */
        Qshard__V1__DeviceStats **devs = NULL;
        err = devices_unpack(d, parts, &devs);
        if (err)
            return err;
        mem = UINT64_MAX;
        for (int i = 0; i < d->world; i++)
            if (devs[i]->memory_budget < mem)
                mem = devs[i]->memory_budget;
        devices_free(d, devs);
    }
    qs_plan p;
    err = qs_plan_make(m, &q, tp, &w, &p);
    if (err)
        return err;
    qs_min_gpus mg = {0, 0};
    err = qs_plan_min_gpus(m, &q, &w, mem, MAX_TP, &mg);
    if (err)
        return err;

    Qshard__V1__PlanReply rep = QSHARD__V1__PLAN_REPLY__INIT;
    Qshard__V1__Quantization qm = QSHARD__V1__QUANTIZATION__INIT;
    Qshard__V1__RankBytes rb = QSHARD__V1__RANK_BYTES__INIT;
    qs_quant_fill(&p.quant, &qm);
    rb.linear = p.rank.linear;
    rb.fp16 = p.rank.fp16;
    rb.kv_cache = p.rank.kv_cache;
    rb.workspace = p.rank.workspace;
    rb.reserve = p.rank.reserve;
    rb.total = p.rank.total;
    rep.model = (char *)m->name;
    rep.quant = &qm;
    rep.tp = p.tp;
    rep.weight_bytes = p.weight_bytes;
    rep.linear_params = p.linear_params;
    rep.rank = &rb;
    rep.device_memory = mem;
    rep.fits = p.rank.total <= mem;
    char problem[512] = "";
    qs_clearerr();
    rep.tp_valid = qs_tp_check(m, &p.quant, tp) == QS_OK;
    if (!rep.tp_valid)
        snprintf(problem, sizeof problem, "%s", qs_errmsg());
    rep.tp_problem = problem;
    rep.min_gpus_by_memory = mg.by_memory;
    rep.min_gpus_valid = mg.valid_tp;
    rep.world_size = (uint32_t)d->world;
    return pack_reply(&rep, out);
}

/* ---- Load / Unload -------------------------------------------------------- */

static int validate_load(qs_daemon *d, const ProtobufCMessage *req)
{
    const Qshard__V1__LoadRequest *r = (const void *)req;
    if (!*r->model)
        return qs_seterr(QS_EINVAL,
                         "name the model to load: a preset (e.g. opt-125m), a safetensors "
                         "directory or a GGUF file");
    const qs_model_config *m = qs_preset_find(r->model);
    struct stat st;
    if (!m && stat(r->model, &st) != 0) {
        char presets[400];
        snprintf(presets, sizeof presets, "%s", qs_errmsg());
        return qs_seterr(QS_ENOTFOUND, "%s; nor is '%s' a checkpoint path on the daemon's host",
                         presets, r->model);
    }
    qs_quant q;
    int err = qs_quant_resolve(r->quant, m, &q);
    if (err)
        return err;
    if ((err = check_gpus(d, r->gpus)))
        return err;
    uint32_t tp = r->gpus ? r->gpus : (uint32_t)d->world;
    if (m && (err = qs_tp_check(m, &q, tp)))
        return err;
    if (*r->weights && strcmp(r->weights, "synthetic") != 0 &&
        (err = check_readable("weights", r->weights)))
        return err;
    if (*r->save_path && (err = check_writable_dir_of("save path", r->save_path)))
        return err;
    if (*r->name && (err = check_name(r->name)))
        return err;
    qs_kv_format kv;
    if (*r->kv_cache && (err = qs_kv_parse(r->kv_cache, &kv)))
        return err;
    return QS_OK;
}

int qs_cmd_stream(const qs_cmd *cmd, const void *msg)
{
    if (!cmd->job || !cmd->job->sink.ops)
        return QS_OK;
    grpc_byte_buffer *bb = qs_proto_pack(msg);
    if (!bb)
        return qs_seterr(QS_ENOMEM, "out of memory packing a streamed message");
    return qs_sink_write(&cmd->job->sink, bb);
}

int qs_cmd_cancelled(const qs_cmd *cmd)
{
    return cmd->job && qs_sink_cancelled(&cmd->job->sink);
}

static int validate_unload(qs_daemon *d, const ProtobufCMessage *req)
{
    (void)d;
    return check_model_named(((const Qshard__V1__UnloadRequest *)(const void *)req)->name,
                             "unload");
}

static int reply_unload(qs_daemon *d, const qs_cmd *cmd, const qs_part *parts, double seconds,
                        grpc_byte_buffer **out)
{
    (void)cmd, (void)seconds;
    Qshard__V1__UnloadReply r = QSHARD__V1__UNLOAD_REPLY__INIT;
    /* Freed on every rank of the model's group, together. */
    for (int i = 0; i < d->world; i++) {
        Qshard__V1__UnloadReply *p =
            parts[i].len ? qshard__v1__unload_reply__unpack(NULL, parts[i].len, parts[i].data)
                         : NULL;
        if (p) {
            r.freed_bytes += p->freed_bytes;
            qshard__v1__unload_reply__free_unpacked(p, NULL);
        }
    }
    return pack_reply(&r, out);
}

/* ---- Generate ------------------------------------------------------------- */

static int validate_generate(qs_daemon *d, const ProtobufCMessage *req)
{
    (void)d;
    const Qshard__V1__GenerateRequest *r = (const void *)req;
    int err = check_model_named(r->model, "generate with");
    if (err)
        return err;
    if (!*r->prompt)
        return qs_seterr(QS_EINVAL, "the prompt is empty: give some text to continue");
    if (r->max_tokens > MAX_TOKENS)
        return qs_seterr(QS_EINVAL, "max_tokens must be 1..%u (0: 64), got %u", MAX_TOKENS,
                         r->max_tokens);
    if (!isfinite(r->temperature) || r->temperature < 0 || r->temperature > 100)
        return qs_seterr(QS_EINVAL, "temperature must be 0 (greedy) .. 100, got %g",
                         (double)r->temperature);
    if (!isfinite(r->top_p) || r->top_p < 0 || r->top_p > 1)
        return qs_seterr(QS_EINVAL, "top_p must be in (0, 1] (0: no cut), got %g",
                         (double)r->top_p);
    if (r->n_stop > MAX_STOPS)
        return qs_seterr(QS_EINVAL, "at most %u stop strings, got %zu", MAX_STOPS, r->n_stop);
    for (size_t i = 0; i < r->n_stop; i++) {
        size_t n = strlen(r->stop[i]);
        if (n == 0 || n > MAX_STOP_LEN)
            return qs_seterr(QS_EINVAL, "stop string %zu is %zu bytes long: give 1 to %u", i + 1, n,
                             MAX_STOP_LEN);
    }
    return QS_OK;
}

/* ---- Eval ----------------------------------------------------------------- */

static int validate_eval(qs_daemon *d, const ProtobufCMessage *req)
{
    (void)d;
    const Qshard__V1__EvalRequest *r = (const void *)req;
    int err = check_model_named(r->model, "evaluate");
    if (err)
        return err;
    switch (r->source_case) {
    case QSHARD__V1__EVAL_REQUEST__SOURCE_TEXT_PATH:
        if ((err = check_readable("text file", r->text_path)))
            return err;
        break;
    case QSHARD__V1__EVAL_REQUEST__SOURCE_TEXT:
        if (!*r->text)
            return qs_seterr(QS_EINVAL, "the text to evaluate is empty");
        break;
    default:
        return qs_seterr(QS_EINVAL, "give the text to evaluate: a file on the daemon's host "
                                    "(text_path) or the text itself");
    }
    if (r->ctx == 1 || r->ctx > MAX_CTX)
        return qs_seterr(QS_EINVAL, "ctx must be 2..%u tokens (0: the model's context), got %u",
                         MAX_CTX, r->ctx);
    return QS_OK;
}

/* ---- Bench ---------------------------------------------------------------- */

static int validate_bench(qs_daemon *d, const ProtobufCMessage *req)
{
    const Qshard__V1__BenchRequest *r = (const void *)req;
    qs_quant q;
    int err = qs_quant_resolve(r->quant, NULL, &q);
    if (err)
        return err;
    if (r->n_shapes > MAX_SHAPES)
        return qs_seterr(QS_EINVAL, "at most %u shapes per request, got %zu", MAX_SHAPES,
                         r->n_shapes);
    for (size_t i = 0; i < r->n_shapes; i++) {
        const Qshard__V1__Shape *s = r->shapes[i];
        if (s->m < 1 || s->k < 1 || s->m > MAX_SHAPE_DIM || s->k > MAX_SHAPE_DIM)
            return qs_seterr(QS_EINVAL, "shape %ux%u is out of range: m and k must be 1..%u", s->m,
                             s->k, MAX_SHAPE_DIM);
        if (uses_groups(q.scheme) && q.group_size && s->k % q.group_size)
            return qs_seterr(QS_EINVAL,
                             "shape %ux%u: k is not a multiple of the group size %u; pick a "
                             "group that divides %u",
                             s->m, s->k, q.group_size, s->k);
    }
    if (r->batch > MAX_BATCH)
        return qs_seterr(QS_EINVAL, "batch must be 1..%u (0: 1), got %u", MAX_BATCH, r->batch);
    if (r->iterations > MAX_ITERATIONS)
        return qs_seterr(QS_EINVAL, "iterations must be 1..%u (0: 20), got %u", MAX_ITERATIONS,
                         r->iterations);
    return check_gpus(d, r->gpus);
}

/* ---- Cache ---------------------------------------------------------------- */

static int validate_cache(qs_daemon *d, const ProtobufCMessage *req)
{
    (void)d;
    const Qshard__V1__CacheRequest *r = (const void *)req;
    if (strcmp(r->action, "list") != 0 && strcmp(r->action, "clear") != 0)
        return qs_seterr(QS_EINVAL, "cache action '%s': use list or clear", r->action);
    return QS_OK;
}

/* Every node's first rank clears its node's directory; rank 0 lists its own. */
static int run_cache(qs_daemon *d, const qs_cmd *cmd, qs_buf *out)
{
    const Qshard__V1__CacheRequest *r = (const void *)cmd->req;
    uint64_t freed = 0;
    if (!strcmp(r->action, "clear") && d->local_rank == 0) {
        freed = qs_cache_clear(d);
        qs_log(QS_LOG_INFO, "cache: cleared %.1f MiB from %s", (double)freed / (1 << 20),
               d->opts.cache_dir);
    }
    if (d->rank != 0)
        return QS_OK;
    Qshard__V1__CacheReply rep = QSHARD__V1__CACHE_REPLY__INIT;
    int err = qs_cache_list(d, &rep);
    rep.freed_bytes = freed;
    if (!err && !(out->data = qs_proto_pack_bytes(&rep.base, &out->len)))
        err = qs_seterr(QS_ENOMEM, "out of memory");
    qs_cache_list_free(&rep);
    return err;
}

static int reply_cache(qs_daemon *d, const qs_cmd *cmd, const qs_part *parts, double seconds,
                       grpc_byte_buffer **reply)
{
    (void)d, (void)cmd, (void)seconds;
    Qshard__V1__CacheReply *r = qshard__v1__cache_reply__unpack(NULL, parts[0].len, parts[0].data);
    if (!r)
        return qs_seterr(QS_EINTERNAL, "rank 0's cache listing did not unpack");
    *reply = qs_proto_pack(&r->base);
    qshard__v1__cache_reply__free_unpacked(r, NULL);
    return *reply ? QS_OK : qs_seterr(QS_ENOMEM, "out of memory");
}

/* ---- Shutdown ------------------------------------------------------------- */

static int answer_shutdown(qs_daemon *d, const qs_sink *sink, const ProtobufCMessage *req,
                           grpc_byte_buffer **out)
{
    (void)req;
    qs_log(QS_LOG_INFO, "shutdown requested by %s", qs_sink_peer(sink));
    Qshard__V1__ShutdownReply r = QSHARD__V1__SHUTDOWN_REPLY__INIT;
    /* Not counting this call; HTTP requests drain too. */
    int n = qs_server_in_flight(d->server) - 1 + qs_http_in_flight(d->http);
    r.in_flight = n > 0 ? (uint32_t)n : 0;
    r.drain_timeout_seconds = d->opts.drain_timeout;
    return pack_reply(&r, out);
}

/* ---- The table ------------------------------------------------------------ */

#define REQ(name) &qshard__v1__##name##__descriptor

const qs_command qs_commands[] = {
    {.method = QS_METHOD_HEALTH,
     .op = QS_OP_PING,
     .request = REQ(health_request),
     .timeout = 10,
     .run = run_ping,
     .reply = reply_health},
    {.method = QS_METHOD_HEALTH_CHECK,
     .request = &grpc__health__v1__health_check_request__descriptor,
     .answer = answer_check},
    {.method = QS_METHOD_STATS,
     .op = QS_OP_STATS,
     .request = REQ(stats_request),
     .timeout = 30,
     .run = run_device,
     .reply = reply_stats},
    {.method = QS_METHOD_PLAN,
     .op = QS_OP_PLAN,
     .request = REQ(plan_request),
     .timeout = 30,
     .validate = validate_plan,
     .run = run_device,
     .reply = reply_plan},
    {.method = QS_METHOD_LOAD,
     .op = QS_OP_LOAD,
     .request = REQ(load_request),
     .validate = validate_load,
     .run = qs_model_run_load,
     .reply = qs_model_reply_load},
    {.method = QS_METHOD_UNLOAD,
     .op = QS_OP_UNLOAD,
     .request = REQ(unload_request),
     .validate = validate_unload,
     .run = qs_model_run_unload,
     .reply = reply_unload},
    {.method = QS_METHOD_GENERATE,
     .op = QS_OP_GENERATE,
     .request = REQ(generate_request),
     .validate = validate_generate,
     .run = qs_model_run_generate,
     .admit = qs_sched_admit},
    {.method = QS_METHOD_EVAL,
     .op = QS_OP_EVAL,
     .request = REQ(eval_request),
     .validate = validate_eval,
     .run = qs_model_run_eval,
     .reply = qs_model_reply_eval},
    {.method = QS_METHOD_BENCH,
     .op = QS_OP_BENCH,
     .request = REQ(bench_request),
     .validate = validate_bench,
     .run = qs_run_bench,
     .reply = qs_reply_bench},
    {.method = QS_METHOD_CACHE,
     .op = QS_OP_CACHE,
     .request = REQ(cache_request),
     .timeout = 120,
     .validate = validate_cache,
     .run = run_cache,
     .reply = reply_cache},
    {.method = QS_METHOD_SHUTDOWN,
     .request = REQ(shutdown_request),
     .drains = 1,
     .answer = answer_shutdown},
};
const size_t qs_command_count = sizeof qs_commands / sizeof qs_commands[0];

/* Commands between the ranks alone, which no client calls. */
static const qs_command internal[] = {
    {.method = "(step)",
     .op = QS_OP_STEP,
     .request = REQ(step_request),
     .run = qs_sched_run_step,
     .done = qs_sched_step_done},
};

const qs_command *qs_command_for_op(uint32_t op)
{
    for (size_t i = 0; i < qs_command_count; i++)
        if (qs_commands[i].op == op && op != 0)
            return &qs_commands[i];
    for (size_t i = 0; i < sizeof internal / sizeof internal[0]; i++)
        if (internal[i].op == op)
            return &internal[i];
    return NULL;
}

const qs_command *qs_command_for_method(const char *method)
{
    for (size_t i = 0; i < qs_command_count; i++)
        if (strcmp(qs_commands[i].method, method) == 0)
            return &qs_commands[i];
    return NULL;
}

/* ---- Sinks ---------------------------------------------------------------- */

int qs_sink_write(const qs_sink *s, grpc_byte_buffer *msg)
{
    if (!s->ops) {
        grpc_byte_buffer_destroy(msg);
        return QS_OK;
    }
    return s->ops->write(s->ctx, msg);
}

void qs_sink_finish(const qs_sink *s, grpc_status_code code, const char *details,
                    grpc_byte_buffer *reply)
{
    if (s->ops)
        s->ops->finish(s->ctx, code, details, reply);
    else if (reply)
        grpc_byte_buffer_destroy(reply);
}

int qs_sink_cancelled(const qs_sink *s)
{
    return s->ops ? s->ops->cancelled(s->ctx) : 0;
}

int qs_sink_has_deadline(const qs_sink *s)
{
    return s->ops && s->ops->has_deadline ? s->ops->has_deadline(s->ctx) : 0;
}

void qs_sink_release(qs_sink *s)
{
    if (s->ops)
        s->ops->release(s->ctx);
    s->ops = NULL;
    s->ctx = NULL;
}

const char *qs_sink_peer(const qs_sink *s)
{
    return s->ops ? s->ops->peer(s->ctx) : "the daemon";
}

/* ---- Dispatch ------------------------------------------------------------- */

void qs_dispatch(qs_daemon *d, qs_call *call, const qs_command *c, grpc_byte_buffer *bb)
{
    qs_sink sink = qs_call_sink(call);
    ProtobufCMessage *req = qs_proto_unpack(c->request, bb);
    if (!req) {
        char msg[256];
        snprintf(msg, sizeof msg,
                 "the request is not a valid %s message: are qctl and qdaemon from the same "
                 "qshard version?",
                 c->request->name);
        qs_sink_finish(&sink, GRPC_STATUS_INVALID_ARGUMENT, msg, NULL);
        qs_sink_release(&sink);
        return;
    }
    qs_submit(d, sink, c, req);
    protobuf_c_message_free_unpacked(req, NULL);
}

void qs_submit(qs_daemon *d, qs_sink sink, const qs_command *c, const ProtobufCMessage *req)
{
    qs_clearerr();
    int err = c->validate ? c->validate(d, req) : QS_OK;
    if (err) {
        qs_sink_finish(&sink, qs_err_status(err), qs_errmsg(), NULL);
        qs_sink_release(&sink);
        return;
    }
    if (c->answer) {
        grpc_byte_buffer *reply = NULL;
        err = c->answer(d, &sink, req, &reply);
        qs_sink_finish(&sink, qs_err_status(err), err ? qs_errmsg() : NULL, reply);
        qs_sink_release(&sink);
        if (!err && c->drains)
            qs_server_drain(d->server);
        return;
    }
    /* The job takes the sink (and its reference) to the main thread. */
    qs_job *job = calloc(1, sizeof *job);
    if (job)
        job->payload = qs_proto_pack_bytes(req, &job->len);
    if (!job || !job->payload) {
        free(job);
        qs_sink_finish(&sink, GRPC_STATUS_RESOURCE_EXHAUSTED, "the daemon is out of memory", NULL);
        qs_sink_release(&sink);
        return;
    }
    job->command = c;
    job->sink = sink;
    job->queued = qs_now();
    if (c->op == QS_OP_GENERATE) {
        const Qshard__V1__GenerateRequest *g = (const void *)req;
        snprintf(job->model, sizeof job->model, "%s", g->model);
    }
    /* Counted as waiting before the main thread can see it. */
    qs_metrics_job(d->metrics, job, QS_JOB_WAITING);
    if (qs_daemon_enqueue(d, job) != QS_OK)
        qs_job_free(job); /* answers UNAVAILABLE */
}
