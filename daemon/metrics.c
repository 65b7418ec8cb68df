/* Prometheus metrics, rank 0: counters and histograms fed by the Generate
 * path as it runs (gRPC and HTTP alike, since both are the same jobs), and
 * device and model figures from a Stats command that a scrape triggers.
 *
 * Names follow vLLM's (vllm:time_to_first_token_seconds becomes
 * qshard_time_to_first_token_seconds), with the model as a label, so that
 * dashboards made for vLLM need only the prefix changed. docs/metrics.md
 * lists them.
 */
#define _POSIX_C_SOURCE 200809L
#include "qs_daemon.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_SERIES 64 /* models ever loaded; more are not counted */
#define MAX_LE     24
#define STATS_AGE  1.0 /* seconds a Stats answer is fresh */

/* vLLM's buckets, so that the same quantiles read the same way. */
static const double ttft_le[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,
                                 0.25,  0.5,   0.75, 1.0,  2.5,  5.0,  7.5,  10.0,
                                 20.0,  40.0,  80.0, 160., 640., 2560.};
static const double itl_le[] = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,  0.3,  0.4, 0.5,
                                0.75, 1.0,   2.5,  5.0,   7.5, 10.0, 20.0, 40.0, 80.0};
static const double e2e_le[] = {0.3,  0.5,   0.8,   1.0,   1.5,   2.0,   2.5,
                                5.0,  10.0,  15.0,  20.0,  30.0,  40.0,  50.0,
                                60.0, 120.0, 240.0, 480.0, 960.0, 1920., 7680.};
#define NLE(a) (sizeof a / sizeof a[0])

typedef struct hist {
    const double *le;
    size_t n;
    uint64_t counts[MAX_LE]; /* per bucket, not cumulative */
    uint64_t count;
    double sum;
} hist;

enum { R_STOP, R_LENGTH, R_ABORT, R_N };
static const char *const reasons[R_N] = {"stop", "length", "abort"};

struct qs_series {
    qs_metrics *m;
    char model[64];
    int64_t running, waiting;
    uint64_t prompt_tokens, generation_tokens;
    uint64_t success[R_N];
    hist ttft, itl, e2e, queue;
    double kv_usage; /* of the cache, 0..1 */
    double decode_s, allreduce_s;
    double load_s, quantize_s;
};

struct qs_metrics {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct qs_series *series[MAX_SERIES];
    size_t n;
    Qshard__V1__StatsReply *stats; /* the last one the ranks answered */
    double stats_at;
    int refreshing;
};

static void hist_init(hist *h, const double *le, size_t n)
{
    memset(h, 0, sizeof *h);
    h->le = le;
    h->n = n;
}

static void observe(hist *h, double v)
{
    if (!isfinite(v) || v < 0)
        v = 0;
    size_t i = 0;
    while (i < h->n && v > h->le[i])
        i++;
    if (i < h->n)
        h->counts[i]++;
    h->count++;
    h->sum += v;
}

int qs_metrics_init(qs_metrics **out)
{
    qs_metrics *m = calloc(1, sizeof *m);
    if (!m)
        return qs_seterr(QS_ENOMEM, "out of memory starting the metrics");
    pthread_mutex_init(&m->mu, NULL);
    pthread_cond_init(&m->cv, NULL);
    *out = m;
    return QS_OK;
}

void qs_metrics_close(qs_metrics *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->n; i++)
        free(m->series[i]);
    if (m->stats)
        protobuf_c_message_free_unpacked(&m->stats->base, NULL);
    pthread_mutex_destroy(&m->mu);
    pthread_cond_destroy(&m->cv);
    free(m);
}

/* Under mu. */
static struct qs_series *find(qs_metrics *m, const char *model)
{
    for (size_t i = 0; i < m->n; i++)
        if (strcmp(m->series[i]->model, model) == 0)
            return m->series[i];
    return NULL;
}

void qs_metrics_model(qs_metrics *m, const char *model, double load_s, double quantize_s)
{
    if (!m)
        return;
    pthread_mutex_lock(&m->mu);
    struct qs_series *s = find(m, model);
    if (!s && m->n < MAX_SERIES && (s = calloc(1, sizeof *s))) {
        s->m = m;
        snprintf(s->model, sizeof s->model, "%s", model);
        hist_init(&s->ttft, ttft_le, NLE(ttft_le));
        hist_init(&s->itl, itl_le, NLE(itl_le));
        hist_init(&s->e2e, e2e_le, NLE(e2e_le));
        hist_init(&s->queue, e2e_le, NLE(e2e_le));
        m->series[m->n++] = s;
    }
    if (s) {
        s->load_s = load_s;
        s->quantize_s = quantize_s;
    }
    pthread_mutex_unlock(&m->mu);
}

void qs_metrics_job(qs_metrics *m, qs_job *job, int state)
{
    if (!job->command || job->command->op != QS_OP_GENERATE) {
        job->state = state;
        return;
    }
    if (state == QS_JOB_WAITING) {
        /* Only loaded models are counted: a name a client made up must not
         * become a series. */
        if (m) {
            pthread_mutex_lock(&m->mu);
            job->series = find(m, job->model);
            if (job->series)
                job->series->waiting++;
            pthread_mutex_unlock(&m->mu);
        }
        job->state = state;
        return;
    }
    struct qs_series *s = job->series;
    if (s) {
        pthread_mutex_lock(&s->m->mu);
        if (state == QS_JOB_RUNNING && job->state == QS_JOB_WAITING) {
            s->waiting--;
            s->running++;
            observe(&s->queue, qs_now() - job->queued);
        } else if (state == QS_JOB_DONE && job->state == QS_JOB_WAITING) {
            s->waiting--;
            s->success[R_ABORT]++; /* cancelled, or refused by a drain */
        } else if (state == QS_JOB_DONE && job->state == QS_JOB_RUNNING) {
            s->running--;
            s->kv_usage = 0; /* one sequence per model: its slot is free */
        }
        pthread_mutex_unlock(&s->m->mu);
    }
    job->state = state;
}

void qs_metrics_token(qs_metrics *m, const qs_job *job, int first, double seconds, uint32_t kv_used,
                      uint32_t kv_size)
{
    (void)m;
    struct qs_series *s = job->series;
    if (!s)
        return;
    pthread_mutex_lock(&s->m->mu);
    observe(first ? &s->ttft : &s->itl, seconds);
    s->kv_usage = kv_size ? (double)(kv_used < kv_size ? kv_used : kv_size) / kv_size : 0;
    pthread_mutex_unlock(&s->m->mu);
}

void qs_metrics_generated(qs_metrics *m, const qs_job *job, uint32_t prompt, uint32_t generated,
                          const char *reason, double decode_s, double allreduce_s)
{
    (void)m;
    struct qs_series *s = job->series;
    if (!s)
        return;
    int r = !strcmp(reason, "length") ? R_LENGTH : !strcmp(reason, "abort") ? R_ABORT : R_STOP;
    pthread_mutex_lock(&s->m->mu);
    s->prompt_tokens += prompt;
    s->generation_tokens += generated;
    s->success[r]++;
    observe(&s->e2e, qs_now() - job->queued);
    if (isfinite(decode_s) && decode_s > 0)
        s->decode_s += decode_s;
    if (isfinite(allreduce_s) && allreduce_s > 0)
        s->allreduce_s += allreduce_s;
    pthread_mutex_unlock(&s->m->mu);
}

/* ---- Device figures: a Stats job whose answer comes back here ------------- */

typedef struct refresh {
    qs_metrics *m;
    int finished;
} refresh;

static int refresh_write(void *ctx, grpc_byte_buffer *msg)
{
    (void)ctx;
    grpc_byte_buffer_destroy(msg);
    return QS_OK;
}

static void refresh_finish(void *ctx, grpc_status_code code, const char *details,
                           grpc_byte_buffer *reply)
{
    refresh *r = ctx;
    qs_metrics *m = r->m;
    Qshard__V1__StatsReply *st = NULL;
    if (!r->finished && code == GRPC_STATUS_OK && reply)
        st = (void *)qs_proto_unpack(&qshard__v1__stats_reply__descriptor, reply);
    else if (!r->finished && code != GRPC_STATUS_OK)
        qs_log(QS_LOG_DEBUG, "metrics: the ranks' figures could not be had: %s",
               details ? details : "");
    if (reply)
        grpc_byte_buffer_destroy(reply);
    pthread_mutex_lock(&m->mu);
    if (!r->finished) {
        r->finished = 1;
        if (st) {
            if (m->stats)
                protobuf_c_message_free_unpacked(&m->stats->base, NULL);
            m->stats = st;
            m->stats_at = qs_now();
        }
        m->refreshing = 0;
        pthread_cond_broadcast(&m->cv);
    }
    pthread_mutex_unlock(&m->mu);
}

static int refresh_cancelled(void *ctx)
{
    (void)ctx;
    return 0;
}

static void refresh_release(void *ctx)
{
    free(ctx);
}

static const char *refresh_peer(void *ctx)
{
    (void)ctx;
    return "the metrics";
}

static const qs_sink_ops refresh_ops = {refresh_write,   refresh_finish, refresh_cancelled,
                                        refresh_release, refresh_peer,   NULL};

/* Under mu, which it drops while queueing. */
static void start_refresh(qs_daemon *d, qs_metrics *m)
{
    refresh *r = calloc(1, sizeof *r);
    if (!r)
        return;
    r->m = m;
    m->refreshing = 1;
    pthread_mutex_unlock(&m->mu);
    Qshard__V1__StatsRequest req = QSHARD__V1__STATS_REQUEST__INIT;
    qs_submit(d, (qs_sink){&refresh_ops, r}, qs_command_for_op(QS_OP_STATS), &req.base);
    pthread_mutex_lock(&m->mu);
}

/* ---- The text exposition -------------------------------------------------- */

/* A label value: backslash, quote and newline escaped. */
static void label(FILE *f, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\' || *v == '"')
            fprintf(f, "\\%c", *v);
        else if (*v == '\n')
            fputs("\\n", f);
        else
            fputc(*v, f);
    }
}

static void family(FILE *f, const char *name, const char *type, const char *help)
{
    fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void sample(FILE *f, const char *name, const char *model, double v)
{
    fprintf(f, "%s{model=\"", name);
    label(f, model);
    fprintf(f, "\"} %.17g\n", v);
}

static void histogram(FILE *f, const char *name, const char *model, const hist *h)
{
    uint64_t cum = 0;
    for (size_t i = 0; i < h->n; i++) {
        cum += h->counts[i];
        fprintf(f, "%s_bucket{model=\"", name);
        label(f, model);
        fprintf(f, "\",le=\"%g\"} %llu\n", h->le[i], (unsigned long long)cum);
    }
    fprintf(f, "%s_bucket{model=\"", name);
    label(f, model);
    fprintf(f, "\",le=\"+Inf\"} %llu\n", (unsigned long long)h->count);
    fprintf(f, "%s_sum{model=\"", name);
    label(f, model);
    fprintf(f, "\"} %.17g\n", h->sum);
    fprintf(f, "%s_count{model=\"", name);
    label(f, model);
    fprintf(f, "\"} %llu\n", (unsigned long long)h->count);
}

/* One gauge or counter over every series. */
#define EACH(name, type, help, expr)                                                               \
    do {                                                                                           \
        family(f, name, type, help);                                                               \
        for (size_t i = 0; i < m->n; i++) {                                                        \
            const struct qs_series *s = m->series[i];                                              \
            sample(f, name, s->model, (double)(expr));                                             \
        }                                                                                          \
    } while (0)

#define EACH_HIST(name, help, field)                                                               \
    do {                                                                                           \
        family(f, name, "histogram", help);                                                        \
        for (size_t i = 0; i < m->n; i++)                                                          \
            histogram(f, name, m->series[i]->model, &m->series[i]->field);                         \
    } while (0)

static const Qshard__V1__ModelInfo *stats_model(const Qshard__V1__StatsReply *st, const char *name)
{
    for (size_t i = 0; st && i < st->n_models; i++)
        if (st->models[i]->name && strcmp(st->models[i]->name, name) == 0)
            return st->models[i];
    return NULL;
}

/* Under mu. */
static void render(qs_daemon *d, qs_metrics *m, FILE *f)
{
    EACH("qshard_num_requests_running", "gauge",
         "Generate requests running now (commands run one at a time).", s->running);
    EACH("qshard_num_requests_waiting", "gauge",
         "Generate requests queued for rank 0's main thread.", s->waiting);
    EACH("qshard_prompt_tokens_total", "counter", "Prompt tokens of finished generations.",
         s->prompt_tokens);
    EACH("qshard_generation_tokens_total", "counter", "Tokens generated by finished generations.",
         s->generation_tokens);
    family(f, "qshard_request_success_total", "counter",
           "Finished generations by finish reason (stop: EOS or a stop string; length: "
           "max_tokens; abort: the client went away or the request never ran).");
    for (size_t i = 0; i < m->n; i++)
        for (int r = 0; r < R_N; r++) {
            fputs("qshard_request_success_total{model=\"", f);
            label(f, m->series[i]->model);
            fprintf(f, "\",finished_reason=\"%s\"} %llu\n", reasons[r],
                    (unsigned long long)m->series[i]->success[r]);
        }
    EACH_HIST("qshard_time_to_first_token_seconds",
              "From the request's arrival to its first token streamed.", ttft);
    EACH_HIST("qshard_inter_token_latency_seconds", "Between two tokens streamed.", itl);
    EACH_HIST("qshard_e2e_request_latency_seconds", "From the request's arrival to its last token.",
              e2e);
    EACH_HIST("qshard_request_queue_time_seconds", "From the request's arrival to its start.",
              queue);
    EACH("qshard_kv_cache_usage_perc", "gauge",
         "Share of the model's KV cache held by the sequence running (1 is full).", s->kv_usage);
    EACH("qshard_decode_seconds_total", "counter", "Seconds the model's leader spent decoding.",
         s->decode_s);
    EACH("qshard_decode_allreduce_seconds_total", "counter",
         "Of the decoding seconds, those in collectives (all-reduce, logits all-gather).",
         s->allreduce_s);
    EACH("qshard_decode_allreduce_share", "gauge",
         "Share of decode time in collectives, over all generations so far.",
         s->decode_s > 0 ? s->allreduce_s / s->decode_s : 0);

    /* The rest describe what is loaded now. */
    qs_catalog_entry *cat = NULL;
    size_t ncat = 0;
    if (qs_models_catalog(d, &cat, &ncat) != QS_OK)
        ncat = 0;
    family(f, "qshard_model_load_seconds", "gauge",
           "Seconds the model's Load took, calibration and quantization included.");
    for (size_t i = 0; i < ncat; i++) {
        const struct qs_series *s = find(m, cat[i].name);
        if (s)
            sample(f, "qshard_model_load_seconds", s->model, s->load_s);
    }
    family(f, "qshard_model_quantize_seconds", "gauge",
           "Of the load, seconds reading and quantizing the weights on the group's leader.");
    for (size_t i = 0; i < ncat; i++) {
        const struct qs_series *s = find(m, cat[i].name);
        if (s)
            sample(f, "qshard_model_quantize_seconds", s->model, s->quantize_s);
    }
    const Qshard__V1__StatsReply *st = m->stats;
    static const struct {
        const char *name, *help;
        int which;
    } mb[] = {
        {"qshard_model_planned_bytes", "Bytes the planner gave the model's largest rank.", 0},
        {"qshard_model_allocated_bytes", "Bytes the model's largest rank allocated.", 1},
        {"qshard_model_weight_bytes", "Bytes of the model's weights over all ranks.", 2},
    };
    for (size_t k = 0; k < sizeof mb / sizeof mb[0]; k++) {
        family(f, mb[k].name, "gauge", mb[k].help);
        for (size_t i = 0; i < ncat; i++) {
            const Qshard__V1__ModelInfo *mi = stats_model(st, cat[i].name);
            if (mi)
                sample(f, mb[k].name, cat[i].name,
                       (double)(mb[k].which == 0   ? mi->planned_rank_bytes
                                : mb[k].which == 1 ? mi->rank_bytes
                                                   : mi->weight_bytes));
        }
    }
    free(cat);

    family(f, "qshard_device_memory_used_bytes", "gauge",
           "Bytes the models hold on each rank's device, by part.");
    for (size_t i = 0; st && i < st->n_devices; i++) {
        const Qshard__V1__DeviceStats *dv = st->devices[i];
        const char *parts[] = {"weights", "kv_cache", "workspace"};
        const uint64_t v[] = {dv->memory_weights, dv->memory_kv_cache, dv->memory_workspace};
        for (int p = 0; p < 3; p++)
            fprintf(f,
                    "qshard_device_memory_used_bytes{rank=\"%u\",kind=\"%s\",part=\"%s\"} %llu\n",
                    dv->rank, dv->kind ? dv->kind : "", parts[p], (unsigned long long)v[p]);
    }
    static const struct {
        const char *name, *help;
        int which;
    } db[] = {
        {"qshard_device_memory_free_bytes",
         "Free device memory (a CPU device: its budget less what the models hold).", 0},
        {"qshard_device_memory_total_bytes", "Device memory (a CPU device: --device-memory).", 1},
        {"qshard_device_memory_budget_bytes", "Device memory the planner may use.", 2},
    };
    for (size_t k = 0; k < sizeof db / sizeof db[0]; k++) {
        family(f, db[k].name, "gauge", db[k].help);
        for (size_t i = 0; st && i < st->n_devices; i++) {
            const Qshard__V1__DeviceStats *dv = st->devices[i];
            uint64_t v = db[k].which == 0   ? dv->memory_free
                         : db[k].which == 1 ? dv->memory_total
                                            : dv->memory_budget;
            fprintf(f, "%s{rank=\"%u\",kind=\"%s\"} %llu\n", db[k].name, dv->rank,
                    dv->kind ? dv->kind : "", (unsigned long long)v);
        }
    }
    family(f, "qshard_ranks", "gauge", "MPI ranks of the daemon, one per device.");
    fprintf(f, "qshard_ranks %d\n", d->world);
    family(f, "qshard_stats_age_seconds", "gauge",
           "Age of the device and model figures above (the ranks are asked at most once a "
           "second; a long command delays them).");
    fprintf(f, "qshard_stats_age_seconds %.3f\n", st ? qs_now() - m->stats_at : -1.0);
}

int qs_metrics_render(qs_daemon *d, double wait, char **text, size_t *len)
{
    qs_metrics *m = d->metrics;
    pthread_mutex_lock(&m->mu);
    if (!m->refreshing && (!m->stats || qs_now() - m->stats_at > STATS_AGE) &&
        !qs_server_draining(d->server))
        start_refresh(d, m);
    if (m->refreshing && wait > 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        double end = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9 + wait;
        ts.tv_sec = (time_t)end;
        ts.tv_nsec = (long)((end - (double)ts.tv_sec) * 1e9);
        while (m->refreshing)
            if (pthread_cond_timedwait(&m->cv, &m->mu, &ts) != 0)
                break;
    }
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    if (!f) {
        pthread_mutex_unlock(&m->mu);
        return qs_seterr(QS_ENOMEM, "out of memory rendering the metrics");
    }
    render(d, m, f);
    pthread_mutex_unlock(&m->mu);
    if (fclose(f) != 0 || !buf) {
        free(buf);
        return qs_seterr(QS_ENOMEM, "out of memory rendering the metrics");
    }
    *text = buf;
    *len = n;
    return QS_OK;
}
