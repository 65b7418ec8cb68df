/* Continuous batching in the daemon: many Generate requests on one model at
 * once, one forward call per step over all of them (shard/batch.c).
 *
 * A Generate command admits its request into the model's batch on every
 * member (models.c) and leaves the call open; from then on rank 0's main
 * thread runs STEP commands, one per model with sequences, between the
 * other commands it serves. Each STEP first ends the sequences rank 0 has
 * given up (the client went, a stop string was met), then every member
 * runs qs_batch_step and the group's leader returns the step's tokens,
 * which rank 0 streams to their calls. The members hold the same batch and
 * make the same steps, so they agree on every token; rank 0 need not be a
 * member: it learns the tokens from the leader's part of the reply.
 *
 * Rank 0 admits a request only while the batch has a free place; the others
 * wait in arrival order and join as places free up (the Generate job stays
 * queued here, counted as waiting). A place is free again once rank 0 has
 * sent the drop, or the members reported the sequence ended. */
#define _POSIX_C_SOURCE 200809L
#include "qs_daemon.h"
#include "qs_shard.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Rank 0: one generation, admitted or waiting. */
typedef struct gen {
    qs_job *job;
    Qshard__V1__GenerateRequest *req; /* unpacked from the job's payload */
    uint64_t id;                      /* the admitting command's number */
    uint32_t prompt, max_new, count;
    uint64_t seed;
    double admitted, first, last; /* when admitted, first and latest token */
    double comm_s;                /* the leader's collectives in the steps it decoded in */
    char *text;                   /* with stop strings: the text so far */
    size_t len, cap, stop_max;
    struct gen *next;
} gen;

/* Rank 0: a model's generations. */
typedef struct sched_model {
    char name[64];
    gen *running, *waiting; /* admission order; arrival order */
    uint32_t nrunning, nwaiting;
    uint64_t *drops; /* ended here, not yet sent to the members */
    size_t ndrops, cap_drops;
    struct sched_model *next;
} sched_model;

struct qs_sched {
    sched_model *models;
};

static sched_model *model_of(qs_daemon *d, const char *name, int create)
{
    if (!d->sched && !(create && (d->sched = calloc(1, sizeof *d->sched))))
        return NULL;
    for (sched_model *m = d->sched->models; m; m = m->next)
        if (!strcmp(m->name, name))
            return m;
    if (!create)
        return NULL;
    sched_model *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    snprintf(m->name, sizeof m->name, "%s", name);
    m->next = d->sched->models;
    d->sched->models = m;
    return m;
}

static void gen_free(gen *g)
{
    if (!g)
        return;
    if (g->req)
        protobuf_c_message_free_unpacked(&g->req->base, NULL);
    qs_job_free(g->job);
    free(g->text);
    free(g);
}

static gen *gen_new(qs_job *job)
{
    gen *g = calloc(1, sizeof *g);
    if (!g)
        return NULL;
    g->job = job;
    g->req = qshard__v1__generate_request__unpack(NULL, job->len, job->payload);
    if (!g->req) {
        free(g);
        return NULL;
    }
    for (size_t i = 0; i < g->req->n_stop; i++)
        if (strlen(g->req->stop[i]) > g->stop_max)
            g->stop_max = strlen(g->req->stop[i]);
    return g;
}

/* GenerateDone's finish_reason in OpenAI's words. */
static const char *openai_reason(const char *r)
{
    if (!strcmp(r, "length"))
        return "length";
    if (!strcmp(r, "cancelled"))
        return "abort";
    return "stop"; /* eos, or a stop string */
}

/* Rank 0: answers a generation that has ended and frees it. */
static void finish(qs_daemon *d, gen *g, const char *reason)
{
    qs_job *job = g->job;
    Qshard__V1__GenerateDone done = QSHARD__V1__GENERATE_DONE__INIT;
    done.prompt_tokens = g->prompt;
    done.generated_tokens = g->count;
    done.finish_reason = (char *)reason;
    done.first_token_seconds = g->first > 0 ? g->first - g->admitted : 0;
    double decode_s = g->count > 1 ? g->last - g->first : 0;
    done.tokens_per_second = decode_s > 0 ? (double)(g->count - 1) / decode_s : 0;
    done.seed = g->seed;
    done.decode_allreduce_share = decode_s > 0 ? g->comm_s / decode_s : 0;
    qs_served *s = qs_models_find(d, g->req->model);
    if (s)
        qs_served_count(s, -1, g->count, decode_s);
    qs_metrics_generated(d->metrics, job, g->prompt, g->count, openai_reason(reason), decode_s,
                         g->comm_s < decode_s ? g->comm_s : decode_s);
    Qshard__V1__GenerateEvent ev = QSHARD__V1__GENERATE_EVENT__INIT;
    ev.event_case = QSHARD__V1__GENERATE_EVENT__EVENT_DONE;
    ev.done = &done;
    grpc_byte_buffer *reply = qs_proto_pack(&ev.base);
    if (reply)
        qs_sink_finish(&job->sink, GRPC_STATUS_OK, NULL, reply);
    else
        qs_sink_finish(&job->sink, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory", NULL);
    qs_metrics_job(d->metrics, job, QS_JOB_DONE);
    gen_free(g);
}

/* Rank 0: ends a generation with an error sentence. */
static void fail(qs_daemon *d, gen *g, grpc_status_code code, const char *why)
{
    qs_sink_finish(&g->job->sink, code, why, NULL);
    qs_metrics_job(d->metrics, g->job, QS_JOB_DONE);
    gen_free(g);
}

/* Takes g out of a list. */
static void unlink_gen(gen **list, gen *g)
{
    for (gen **p = list; *p; p = &(*p)->next)
        if (*p == g) {
            *p = g->next;
            g->next = NULL;
            return;
        }
}

/* Rank 0: the members end g at the next step; its place counts as taken
 * until then. */
static void drop(sched_model *m, gen *g)
{
    if (m->ndrops == m->cap_drops) {
        size_t cap = m->cap_drops ? 2 * m->cap_drops : 8;
        uint64_t *t = realloc(m->drops, cap * sizeof *t);
        if (!t)
            return; /* the sequence runs to its end unseen: wasteful, not wrong */
        m->drops = t, m->cap_drops = cap;
    }
    m->drops[m->ndrops++] = g->id;
}

/* ---- Stop strings (rank 0) --------------------------------------------------- */

/* Appends a piece and says whether the text now holds a stop string; only
 * its tail can hold a new one. */
static int stop_met(gen *g, const char *p)
{
    const Qshard__V1__GenerateRequest *r = g->req;
    if (!r->n_stop)
        return 0;
    size_t n = strlen(p), old = g->len;
    if (g->len + n + 1 > g->cap) {
        size_t cap = (g->len + n + 1) * 2;
        char *t = realloc(g->text, cap);
        if (!t)
            return 1; /* cannot watch for it: stop rather than run past it */
        g->text = t;
        g->cap = cap;
    }
    memcpy(g->text + g->len, p, n + 1);
    g->len += n;
    size_t from = old >= g->stop_max ? old - g->stop_max + 1 : 0;
    for (size_t i = 0; i < r->n_stop; i++) {
        size_t k = strlen(r->stop[i]);
        for (size_t j = from; j + k <= g->len; j++)
            if (memcmp(g->text + j, r->stop[i], k) == 0)
                return 1;
    }
    return 0;
}

/* A control token is no text to match, but one named as a stop string
 * whole ends the generation: a chat stops at ChatML's "<|im_end|>" even
 * where it is not the model's EOS. */
static int control_stop(const gen *g, const char *p)
{
    for (size_t i = 0; i < g->req->n_stop; i++)
        if (!strcmp(g->req->stop[i], p))
            return 1;
    return 0;
}

/* Rank 0: one token to the client. NULL to go on, else why it ends here
 * ("stop": a stop string; "cancelled": the receiver went). The token that
 * completes a stop string still goes out: the receiver cuts the text at
 * the string (the OpenAI endpoint does). */
static const char *stream(qs_daemon *d, qs_served *s, gen *g, int32_t t, uint64_t kv_used,
                          uint64_t kv_size)
{
    char buf[32];
    int control;
    Qshard__V1__GenerateToken tk = QSHARD__V1__GENERATE_TOKEN__INIT;
    Qshard__V1__GenerateEvent ev = QSHARD__V1__GENERATE_EVENT__INIT;
    tk.text = (char *)qs_served_piece(s, t, buf, sizeof buf, &control);
    tk.token_id = (uint32_t)t;
    tk.control = control;
    ev.event_case = QSHARD__V1__GENERATE_EVENT__EVENT_TOKEN;
    ev.token = &tk;
    double now = qs_now();
    qs_served_count(s, g->count ? (now - g->last) * 1e3 : -1, 0, 0);
    qs_metrics_token(d->metrics, g->job, g->count == 0,
                     g->count == 0 ? now - g->job->queued : now - g->last,
                     (uint32_t)(kv_used < UINT32_MAX ? kv_used : UINT32_MAX),
                     (uint32_t)(kv_size < UINT32_MAX ? kv_size : UINT32_MAX));
    if (g->count == 0)
        g->first = now;
    g->last = now;
    g->count++;
    int stop = control ? control_stop(g, tk.text) : stop_met(g, tk.text);
    grpc_byte_buffer *bb = qs_proto_pack(&ev.base);
    if (!bb || qs_sink_write(&g->job->sink, bb) != QS_OK || qs_sink_cancelled(&g->job->sink)) {
        if (!g->job->stopped)
            g->job->stopped = "abort";
        return "cancelled";
    }
    if (stop) {
        g->job->stopped = "stop";
        return "stop";
    }
    return NULL;
}

/* ---- Admission (rank 0) -------------------------------------------------------- */

int qs_sched_take(qs_daemon *d, qs_job *job)
{
    if (job->command->op == QS_OP_UNLOAD) {
        Qshard__V1__UnloadRequest *u =
            qshard__v1__unload_request__unpack(NULL, job->len, job->payload);
        if (u && qs_models_find(d, u->name))
            qs_sched_forget(d, u->name, "the model was unloaded");
        qs_clearerr();
        if (u)
            qshard__v1__unload_request__free_unpacked(u, NULL);
        return 0;
    }
    if (job->command->op != QS_OP_GENERATE)
        return 0;
    qs_served *s = qs_models_find(d, job->model);
    if (!s) {
        qs_clearerr();
        return 0; /* the command says it is not loaded */
    }
    sched_model *m = model_of(d, job->model, 1);
    if (!m)
        return 0;
    /* Places taken: running, plus ended ones whose drop has not gone out. */
    if (!m->nwaiting && m->nrunning + m->ndrops < qs_served_capacity(s))
        return 0;
    if (m->nwaiting >= d->opts.max_waiting) {
        char why[256];
        snprintf(why, sizeof why,
                 "'%s' is generating %u sequences and %u more wait: retry later, or raise "
                 "qdaemon --max-waiting (or qctl load --max-batch)",
                 job->model, m->nrunning, m->nwaiting);
        qs_sink_finish(&job->sink, GRPC_STATUS_RESOURCE_EXHAUSTED, why, NULL);
        qs_metrics_job(d->metrics, job, QS_JOB_DONE);
        qs_job_free(job);
        return 1;
    }
    gen *g = gen_new(job);
    if (!g)
        return 0; /* runs now and is refused for want of memory */
    gen **p = &m->waiting;
    while (*p)
        p = &(*p)->next;
    *p = g;
    m->nwaiting++;
    return 1;
}

int qs_sched_admit(qs_daemon *d, const qs_cmd *cmd, const qs_part *parts)
{
    qs_job *job = cmd->job;
    const Qshard__V1__GenerateRequest *r = (const void *)cmd->req;
    qs_served *s = qs_models_find(d, r->model);
    sched_model *m = s ? model_of(d, r->model, 1) : NULL;
    const qs_part *lp = s ? &parts[qs_served_leader(s)] : NULL;
    Qshard__V1__GenerateDone *in =
        lp ? qshard__v1__generate_done__unpack(NULL, lp->len, lp->data) : NULL;
    gen *g = m && in ? gen_new(job) : NULL;
    if (!g) {
        if (in)
            qshard__v1__generate_done__free_unpacked(in, NULL);
        /* The members hold it: end it with the next step. */
        if (m) {
            gen tmp = {.id = cmd->seq};
            drop(m, &tmp);
        }
        qs_sink_finish(&job->sink, GRPC_STATUS_INTERNAL,
                       "rank 0 could not keep track of the generation (out of memory?)", NULL);
        return QS_ENOMEM;
    }
    g->id = cmd->seq;
    g->prompt = in->prompt_tokens;
    g->max_new = in->generated_tokens;
    g->seed = in->seed;
    g->admitted = qs_now();
    qshard__v1__generate_done__free_unpacked(in, NULL);
    gen **p = &m->running;
    while (*p)
        p = &(*p)->next;
    *p = g;
    m->nrunning++;
    return QS_OK;
}

void qs_sched_counts(const qs_daemon *d, const char *model, uint32_t *running, uint32_t *waiting)
{
    *running = *waiting = 0;
    for (sched_model *m = d->sched ? d->sched->models : NULL; m; m = m->next)
        if (!strcmp(m->name, model))
            *running = m->nrunning, *waiting = m->nwaiting;
}

/* ---- Steps ----------------------------------------------------------------------- */

/* Every rank: ends the dropped sequences, runs one step, and (the leader)
 * returns its tokens. */
int qs_sched_run_step(qs_daemon *d, const qs_cmd *cmd, qs_buf *out)
{
    const Qshard__V1__StepRequest *r = (const void *)cmd->req;
    qs_served *s = qs_models_find(d, r->model);
    if (!s)
        return QS_ESTATE;
    qs_batch *b = qs_served_batch(s);
    if (!b)
        return QS_OK;
    for (size_t i = 0; i < r->n_drop; i++)
        if (qs_batch_drop(b, r->drop[i]) != QS_OK)
            qs_log(QS_LOG_WARN, "step: %s", qs_errmsg());
    qs_clearerr();
    size_t cap = qs_batch_capacity(b), nev = 0;
    qs_batch_event *ev = malloc((cap ? cap : 1) * sizeof *ev);
    if (!ev)
        return qs_seterr(QS_ENOMEM, "out of memory for a step's tokens");
    qs_batch_stats st;
    double t0 = qs_now(), c0 = qs_served_comm_ms(s);
    int err = qs_batch_step(b, ev, cap, &nev, &st);
    if (err) {
        /* The step failed on some rank: every rank ends every sequence,
         * and rank 0 tells their callers why. */
        free(ev);
        qs_served_batch_clear(s);
        return err;
    }
    if (d->rank != qs_served_leader(s)) {
        free(ev);
        return QS_OK;
    }
    Qshard__V1__StepReply rep = QSHARD__V1__STEP_REPLY__INIT;
    Qshard__V1__StepToken *tk = calloc(nev ? nev : 1, sizeof *tk);
    Qshard__V1__StepToken **tp = calloc(nev ? nev : 1, sizeof *tp);
    if (!tk || !tp) {
        free(ev), free(tk), free(tp);
        return qs_seterr(QS_ENOMEM, "out of memory for a step's tokens");
    }
    for (size_t i = 0; i < nev; i++) {
        qshard__v1__step_token__init(&tk[i]);
        tk[i].id = ev[i].id;
        tk[i].token = ev[i].token;
        tk[i].finish = (uint32_t)ev[i].finish;
        tp[i] = &tk[i];
    }
    rep.n_tokens = nev;
    rep.tokens = tp;
    rep.batch_tokens = (uint32_t)st.tokens;
    rep.prompt_tokens = (uint32_t)st.prompt_tokens;
    rep.seconds = qs_now() - t0;
    rep.comm_seconds = (qs_served_comm_ms(s) - c0) / 1e3;
    out->data = qs_proto_pack_bytes(&rep.base, &out->len);
    free(ev), free(tk), free(tp);
    return out->data ? QS_OK : qs_seterr(QS_ENOMEM, "out of memory");
}

static gen *find(sched_model *m, uint64_t id)
{
    for (gen *g = m->running; g; g = g->next)
        if (g->id == id)
            return g;
    return NULL;
}

/* Rank 0: streams a step's tokens and ends the generations that ended. */
void qs_sched_step_done(qs_daemon *d, const qs_cmd *cmd, const qs_part *parts)
{
    const Qshard__V1__StepRequest *r = (const void *)cmd->req;
    sched_model *m = model_of(d, r->model, 0);
    qs_served *s = qs_models_find(d, r->model);
    if (!m || !s)
        return;
    const qs_part *lp = &parts[qs_served_leader(s)];
    int first_err = -1;
    for (int i = 0; i < d->world; i++)
        if (parts[i].err && (first_err < 0 || parts[first_err].err == QS_ECOMM))
            first_err = i;
    Qshard__V1__StepReply *rep =
        first_err < 0 ? qshard__v1__step_reply__unpack(NULL, lp->len, lp->data) : NULL;
    if (!rep) {
        /* Every member cleared its batch: end every running generation. */
        char why[512];
        snprintf(why, sizeof why, "the step failed on rank %d: %s", first_err,
                 first_err >= 0 ? parts[first_err].msg : "a malformed reply from the leader");
        while (m->running) {
            gen *g = m->running;
            m->running = g->next;
            fail(d, g, GRPC_STATUS_INTERNAL, why);
        }
        m->nrunning = 0;
        m->ndrops = 0;
        return;
    }
    uint64_t kv_used = 0;
    for (gen *g = m->running; g; g = g->next)
        kv_used += g->prompt + g->count;
    uint64_t kv_size = (uint64_t)qs_served_capacity(s) * qs_served_max_seq(s);
    for (size_t i = 0; i < rep->n_tokens; i++) {
        const Qshard__V1__StepToken *t = rep->tokens[i];
        gen *g = find(m, t->id);
        if (!g)
            continue; /* rank 0 ended it; its drop goes out with the next step */
        if (g->count > 0)
            g->comm_s += rep->comm_seconds;
        const char *end = t->token >= 0 ? stream(d, s, g, t->token, kv_used, kv_size) : NULL;
        if (t->finish) {
            unlink_gen(&m->running, g);
            m->nrunning--;
            finish(d, g, end ? end : t->finish == QS_FINISH_EOS ? "eos" : "length");
        } else if (end) {
            unlink_gen(&m->running, g);
            m->nrunning--;
            drop(m, g);
            finish(d, g, end);
        }
    }
    qshard__v1__step_reply__free_unpacked(rep, NULL);
}

/* Rank 0: ends the generations whose clients went between steps. */
static void reap(qs_daemon *d, sched_model *m)
{
    /* --request-timeout: the deadline of a client that set none. */
    double now = qs_now(), limit = d->opts.request_timeout;
    char late[256];
    snprintf(late, sizeof late,
             "the generation ran past qdaemon --request-timeout (%.0f s): ask for fewer "
             "tokens, set a deadline of your own, or raise the option",
             limit);
    for (gen *g = m->running, *next; g; g = next) {
        next = g->next;
        int over =
            limit > 0 && now - g->job->queued > limit && !qs_sink_has_deadline(&g->job->sink);
        if (over || qs_sink_cancelled(&g->job->sink)) {
            if (!g->job->stopped)
                g->job->stopped = "abort";
            unlink_gen(&m->running, g);
            m->nrunning--;
            drop(m, g);
            if (over)
                fail(d, g, GRPC_STATUS_DEADLINE_EXCEEDED, late);
            else
                finish(d, g, "cancelled");
        }
    }
    for (gen *g = m->waiting, *next; g; g = next) {
        next = g->next;
        int over =
            limit > 0 && now - g->job->queued > limit && !qs_sink_has_deadline(&g->job->sink);
        if (over || qs_sink_cancelled(&g->job->sink)) {
            unlink_gen(&m->waiting, g);
            m->nwaiting--;
            fail(d, g, over ? GRPC_STATUS_DEADLINE_EXCEEDED : GRPC_STATUS_CANCELLED,
                 over ? late
                      : "the client cancelled or its deadline passed while the request waited "
                        "for a place in the batch");
        }
    }
}

int qs_sched_busy(const qs_daemon *d)
{
    for (sched_model *m = d->sched ? d->sched->models : NULL; m; m = m->next)
        if (m->nrunning || m->nwaiting || m->ndrops)
            return 1;
    return 0;
}

/* The step command for m, with its drops. */
static void step(qs_daemon *d, sched_model *m)
{
    Qshard__V1__StepRequest st = QSHARD__V1__STEP_REQUEST__INIT;
    st.model = m->name;
    st.n_drop = m->ndrops;
    st.drop = m->drops;
    m->ndrops = 0;
    qs_ranks_internal(d, QS_OP_STEP, &st.base);
}

void qs_sched_lead(qs_daemon *d)
{
    if (!d->sched)
        return;
    for (sched_model *m = d->sched->models; m; m = m->next) {
        reap(d, m);
        qs_served *s = qs_models_find(d, m->name);
        if (!s) { /* gone without an Unload (cannot happen today): end them */
            qs_clearerr();
            qs_sched_forget(d, m->name, "the model is no longer loaded");
            return;
        }
        /* Admit the waiting while there is room: each is a Generate
         * command, whose reply (qs_sched_admit) puts it in running. The
         * drops go out first, or the members would still be full. */
        if (m->nwaiting && m->ndrops && m->nrunning + m->ndrops >= qs_served_capacity(s))
            step(d, m);
        while (m->waiting && m->nrunning + m->ndrops < qs_served_capacity(s)) {
            gen *g = m->waiting;
            m->waiting = g->next;
            m->nwaiting--;
            qs_job *job = g->job;
            g->job = NULL;
            gen_free(g);
            qs_ranks_run_job(d, job);
        }
        if (m->nrunning || m->ndrops)
            step(d, m);
    }
}

/* Rank 0, before an Unload: the model's generations end with a sentence. */
void qs_sched_forget(qs_daemon *d, const char *model, const char *why)
{
    if (!d->sched)
        return;
    for (sched_model **p = &d->sched->models; *p; p = &(*p)->next) {
        sched_model *m = *p;
        if (strcmp(m->name, model))
            continue;
        while (m->running) {
            gen *g = m->running;
            m->running = g->next;
            fail(d, g, GRPC_STATUS_ABORTED, why);
        }
        while (m->waiting) {
            gen *g = m->waiting;
            m->waiting = g->next;
            fail(d, g, GRPC_STATUS_ABORTED, why);
        }
        *p = m->next;
        free(m->drops);
        free(m);
        return;
    }
}

void qs_sched_close(qs_daemon *d, const char *why)
{
    while (d->sched && d->sched->models)
        qs_sched_forget(d, d->sched->models->name, why);
    free(d->sched);
    d->sched = NULL;
}
