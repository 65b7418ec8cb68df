/* Rank 0's gRPC server: one completion queue served by one thread.
 *
 * Every call is a small state machine driven by tags on the completion queue:
 * NEW (a registered method was called) -> RECV (its request message) ->
 * dispatch (answer here, or queue a job for the main thread) -> SEND (status,
 * possibly from the main thread) and, independently, CLOSE (the client is
 * done or cancelled). A call is freed when the last of its pending batches
 * completes, so many calls can be in flight at once.
 */
#define _POSIX_C_SOURCE 200809L
#include "qs_daemon.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

enum { TAG_NEW, TAG_RECV, TAG_CLOSE, TAG_SEND, TAG_WRITE, TAG_SHUTDOWN };

/* Tags are addresses inside a call (or the server), so that one completion
 * names both the call and the step. */
typedef struct qs_tag {
    int kind;
    qs_call *call;
} qs_tag;

struct qs_call {
    qs_server *srv;
    const qs_command *command; /* NULL: a method we do not serve */
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_call_details details; /* filled for unknown methods only */
    grpc_byte_buffer *request;
    grpc_byte_buffer *reply; /* kept until the SEND batch completes */
    int cancelled;           /* written by RECV_CLOSE_ON_SERVER */
    atomic_int closed;       /* 1 once CLOSE completed */
    atomic_int refs;         /* pending batches + the handler's */
    atomic_int finished;
    atomic_int md_sent; /* initial metadata sent (or being sent) */
    double started;
    char *peer;
    char method[128];
    grpc_status_code code;
    char status[384];

    /* A streaming write waits for its own completion. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int write_done, write_ok;

    qs_tag t_new, t_recv, t_close, t_send, t_write;
    qs_call *prev, *next; /* the server's list of calls in flight */
};

struct qs_server {
    qs_daemon *d;
    grpc_server *server;
    grpc_completion_queue *cq;
    void **methods; /* registered method handles, parallel to qs_commands */
    pthread_t thread;
    int thread_started;
    atomic_int draining;
    atomic_int in_flight;
    double drain_deadline; /* monotonic; set before draining is */
    int cancelled;         /* the drain deadline passed: calls cancelled */
    qs_call *calls;        /* in flight, under mu */
    qs_tag t_shutdown;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done; /* the completion-queue thread has returned */
};

/* ---- Calls ---------------------------------------------------------------- */

static qs_call *call_new(qs_server *s, const qs_command *c)
{
    qs_call *call = calloc(1, sizeof *call);
    if (!call)
        return NULL;
    call->srv = s;
    call->command = c;
    grpc_metadata_array_init(&call->md);
    grpc_call_details_init(&call->details);
    pthread_mutex_init(&call->mu, NULL);
    pthread_cond_init(&call->cv, NULL);
    atomic_init(&call->refs, 1);
    atomic_init(&call->closed, 0);
    atomic_init(&call->finished, 0);
    atomic_init(&call->md_sent, 0);
    qs_tag *tags[] = {&call->t_new, &call->t_recv, &call->t_close, &call->t_send, &call->t_write};
    int kinds[] = {TAG_NEW, TAG_RECV, TAG_CLOSE, TAG_SEND, TAG_WRITE};
    for (int i = 0; i < 5; i++) {
        tags[i]->kind = kinds[i];
        tags[i]->call = call;
    }
    if (c)
        snprintf(call->method, sizeof call->method, "%s", c->method);
    return call;
}

static void call_free(qs_call *call)
{
    qs_server *s = call->srv;
    pthread_mutex_lock(&s->mu);
    if (call->prev)
        call->prev->next = call->next;
    else if (s->calls == call)
        s->calls = call->next;
    if (call->next)
        call->next->prev = call->prev;
    pthread_mutex_unlock(&s->mu);
    if (call->call)
        grpc_call_unref(call->call);
    grpc_metadata_array_destroy(&call->md);
    grpc_call_details_destroy(&call->details);
    if (call->request)
        grpc_byte_buffer_destroy(call->request);
    if (call->reply)
        grpc_byte_buffer_destroy(call->reply);
    gpr_free(call->peer);
    pthread_mutex_destroy(&call->mu);
    pthread_cond_destroy(&call->cv);
    free(call);
}

static void call_unref(qs_call *call)
{
    if (atomic_fetch_sub(&call->refs, 1) == 1)
        call_free(call);
}

/* Starts a batch that holds a reference until its tag completes. */
static int call_batch(qs_call *call, const grpc_op *ops, size_t n, qs_tag *tag)
{
    atomic_fetch_add(&call->refs, 1);
    grpc_call_error e = grpc_call_start_batch(call->call, ops, n, tag, NULL);
    if (e != GRPC_CALL_OK) {
        qs_log(QS_LOG_ERROR, "%s: starting a batch failed: %s", call->method,
               grpc_call_error_to_string(e));
        atomic_fetch_sub(&call->refs, 1);
        return QS_EINTERNAL;
    }
    return QS_OK;
}

static void request_next(qs_server *s, size_t idx);

int qs_call_cancelled(qs_call *call)
{
    /* CLOSE completes early only when the client cancelled or the deadline
     * passed; on a healthy call it waits for our status. */
    if (atomic_load(&call->closed) && call->cancelled)
        return 1;
    return gpr_time_cmp(gpr_now(call->deadline.clock_type), call->deadline) > 0;
}

const char *qs_call_peer(qs_call *call)
{
    return call->peer ? call->peer : "?";
}

void qs_call_finish(qs_call *call, grpc_status_code code, const char *details,
                    grpc_byte_buffer *reply)
{
    if (atomic_exchange(&call->finished, 1)) {
        if (reply)
            grpc_byte_buffer_destroy(reply);
        return;
    }
    call->code = code;
    snprintf(call->status, sizeof call->status, "%s", details ? details : "");
    grpc_op ops[3];
    size_t n = 0;
    memset(ops, 0, sizeof ops);
    if (!atomic_exchange(&call->md_sent, 1)) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        n++;
    }
    if (reply && code == GRPC_STATUS_OK) {
        call->reply = reply;
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = reply;
        n++;
    } else if (reply) {
        grpc_byte_buffer_destroy(reply);
    }
    grpc_slice msg = grpc_slice_from_copied_string(call->status);
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = code;
    ops[n].data.send_status_from_server.status_details = details && *details ? &msg : NULL;
    n++;
    if (call_batch(call, ops, n, &call->t_send) != QS_OK) {
        /* No SEND completion will come to count it done. */
        qs_log(QS_LOG_WARN, "%s from %s: could not send %s", call->method, qs_call_peer(call),
               qs_proto_status_name(code));
        atomic_fetch_sub(&call->srv->in_flight, 1);
    }
    grpc_slice_unref(msg); /* not retained past start_batch */
}

void qs_call_release(qs_call *call)
{
    call_unref(call);
}

int qs_call_write(qs_call *call, grpc_byte_buffer *msg)
{
    grpc_op ops[2];
    size_t n = 0;
    memset(ops, 0, sizeof ops);
    if (!atomic_exchange(&call->md_sent, 1))
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n].data.send_message.send_message = msg;
    n++;
    pthread_mutex_lock(&call->mu);
    call->write_done = 0;
    pthread_mutex_unlock(&call->mu);
    int ok = 0;
    if (call_batch(call, ops, n, &call->t_write) == QS_OK) {
        pthread_mutex_lock(&call->mu);
        while (!call->write_done)
            pthread_cond_wait(&call->cv, &call->mu);
        ok = call->write_ok;
        pthread_mutex_unlock(&call->mu);
    }
    grpc_byte_buffer_destroy(msg);
    return ok ? QS_OK : qs_seterr(QS_ECOMM, "the client went away");
}

/* ---- The call as a job's sink ---------------------------------------------- */

static int sink_write(void *ctx, grpc_byte_buffer *msg)
{
    return qs_call_write(ctx, msg);
}

static void sink_finish(void *ctx, grpc_status_code code, const char *details,
                        grpc_byte_buffer *reply)
{
    qs_call_finish(ctx, code, details, reply);
}

static int sink_cancelled(void *ctx)
{
    return qs_call_cancelled(ctx);
}

static void sink_release(void *ctx)
{
    qs_call_release(ctx);
}

static const char *sink_peer(void *ctx)
{
    return qs_call_peer(ctx);
}

/* A gRPC client without a deadline sends none: it reads as infinite. */
static int sink_has_deadline(void *ctx)
{
    qs_call *call = ctx;
    return call->deadline.tv_sec != INT64_MAX;
}

static const qs_sink_ops call_sink_ops = {sink_write,   sink_finish, sink_cancelled,
                                          sink_release, sink_peer,   sink_has_deadline};

qs_sink qs_call_sink(qs_call *call)
{
    return (qs_sink){&call_sink_ops, call};
}

static qs_log_level status_level(grpc_status_code c)
{
    switch (c) {
    case GRPC_STATUS_INTERNAL:
    case GRPC_STATUS_UNKNOWN:
    case GRPC_STATUS_DATA_LOSS:
        return QS_LOG_ERROR;
    case GRPC_STATUS_UNAVAILABLE:
        return QS_LOG_WARN;
    default:
        return QS_LOG_INFO;
    }
}

/* ---- Completion handlers (the completion-queue thread) -------------------- */

static void on_new(qs_server *s, qs_call *call, int ok)
{
    if (!ok) {
        /* The server is shutting down: the request slot is returned unused. */
        call_free(call);
        return;
    }
    atomic_fetch_add(&s->in_flight, 1);
    pthread_mutex_lock(&s->mu);
    call->next = s->calls;
    if (s->calls)
        s->calls->prev = call;
    s->calls = call;
    pthread_mutex_unlock(&s->mu);
    call->started = qs_now();
    call->peer = grpc_call_get_peer(call->call);
    if (!atomic_load(&s->draining))
        request_next(s, call->command ? (size_t)(call->command - qs_commands) : qs_command_count);

    grpc_op close_op;
    memset(&close_op, 0, sizeof close_op);
    close_op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    close_op.data.recv_close_on_server.cancelled = &call->cancelled;
    call_batch(call, &close_op, 1, &call->t_close);

    if (!call->command) {
        size_t len = GRPC_SLICE_LENGTH(call->details.method);
        if (len >= sizeof call->method)
            len = sizeof call->method - 1;
        memcpy(call->method, GRPC_SLICE_START_PTR(call->details.method), len);
        call->method[len] = '\0';
        char msg[512];
        snprintf(msg, sizeof msg,
                 "unknown method %s: qdaemon serves " QS_SERVICE " and " QS_HEALTH_SERVICE
                 "/Check; is the client built from the same qshard.proto?",
                 call->method);
        qs_call_finish(call, GRPC_STATUS_UNIMPLEMENTED, msg, NULL);
        qs_call_release(call);
        return;
    }
    /* The access token, when the daemon has one; the standard health check
     * (load balancers' probes) tells nothing and needs none. */
    if (strcmp(call->command->method, QS_METHOD_HEALTH_CHECK) != 0) {
        const char *value = NULL;
        size_t len = 0;
        for (size_t i = 0; i < call->md.count; i++) {
            if (!grpc_slice_str_cmp(call->md.metadata[i].key, "authorization")) {
                value = (const char *)GRPC_SLICE_START_PTR(call->md.metadata[i].value);
                len = GRPC_SLICE_LENGTH(call->md.metadata[i].value);
            }
        }
        const char *why = qs_auth_refusal(&s->d->auth, value, len);
        if (why) {
            qs_call_finish(call, GRPC_STATUS_UNAUTHENTICATED, why, NULL);
            qs_call_release(call);
            return;
        }
    }
    grpc_op recv_op;
    memset(&recv_op, 0, sizeof recv_op);
    recv_op.op = GRPC_OP_RECV_MESSAGE;
    recv_op.data.recv_message.recv_message = &call->request;
    if (call_batch(call, &recv_op, 1, &call->t_recv) != QS_OK) {
        qs_call_finish(call, GRPC_STATUS_INTERNAL, "the daemon could not read the request", NULL);
        qs_call_release(call);
    }
}

static void on_recv(qs_server *s, qs_call *call, int ok)
{
    if (!ok || !call->request) {
        qs_call_finish(call, GRPC_STATUS_INVALID_ARGUMENT,
                       ok ? "the request carried no message" : "the request could not be read",
                       NULL);
        qs_call_release(call);
    } else {
        /* The handler's reference goes with it. */
        qs_dispatch(s->d, call, call->command, call->request);
    }
    call_unref(call);
}

static void on_send(qs_server *s, qs_call *call, int ok)
{
    double ms = (qs_now() - call->started) * 1e3;
    grpc_status_code code = ok ? call->code : GRPC_STATUS_CANCELLED;
    const char *st = ok ? call->status : "the client went away before the answer was sent";
    qs_log(status_level(code), "%s from %s: %s in %.2f ms%s%s", call->method, qs_call_peer(call),
           qs_proto_status_name(code), ms, *st ? ": " : "", st);
    atomic_fetch_add(&s->d->served, 1);
    atomic_fetch_sub(&s->in_flight, 1);
    call_unref(call);
}

static void on_write(qs_call *call, int ok)
{
    pthread_mutex_lock(&call->mu);
    call->write_done = 1;
    call->write_ok = ok;
    pthread_cond_signal(&call->cv);
    pthread_mutex_unlock(&call->mu);
    call_unref(call);
}

/* The drain deadline passed: every call still open is answered now, with a
 * status of our own (ABORTED: the daemon's decision, not a lost connection).
 * The commands behind them finish on their own; their answers are dropped
 * (qs_call_finish answers once). The list lock keeps every call alive here. */
static void cancel_in_flight(qs_server *s)
{
    char msg[256];
    snprintf(msg, sizeof msg,
             "the daemon is shutting down and this request did not finish within its "
             "--drain-timeout (%g s); send it again once the daemon is back",
             s->d->opts.drain_timeout);
    qs_log(QS_LOG_WARN, "drain timeout (%g s): cancelling %d request(s) in flight",
           s->d->opts.drain_timeout, atomic_load(&s->in_flight));
    pthread_mutex_lock(&s->mu);
    for (qs_call *c = s->calls; c; c = c->next)
        qs_call_finish(c, GRPC_STATUS_ABORTED, msg, NULL);
    pthread_mutex_unlock(&s->mu);
    s->cancelled = 1;
}

static void *cq_thread(void *arg)
{
    qs_server *s = arg;
    for (;;) {
        /* Wake now and then while draining: the main thread may be stuck in a
         * long command, so the drain deadline is enforced here. */
        gpr_timespec until =
            atomic_load(&s->draining)
                ? gpr_time_add(gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_millis(100, GPR_TIMESPAN))
                : gpr_inf_future(GPR_CLOCK_REALTIME);
        grpc_event ev = grpc_completion_queue_next(s->cq, until, NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (atomic_load(&s->draining) && !s->cancelled && qs_now() > s->drain_deadline)
            cancel_in_flight(s);
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        qs_tag *t = ev.tag;
        switch (t->kind) {
        case TAG_SHUTDOWN:
            /* No call is left: let the queue drain to GRPC_QUEUE_SHUTDOWN. */
            qs_log(QS_LOG_DEBUG, "gRPC server shut down");
            grpc_completion_queue_shutdown(s->cq);
            break;
        case TAG_NEW:
            on_new(s, t->call, ev.success);
            break;
        case TAG_RECV:
            on_recv(s, t->call, ev.success);
            break;
        case TAG_CLOSE:
            atomic_store(&t->call->closed, 1);
            call_unref(t->call);
            break;
        case TAG_SEND:
            on_send(s, t->call, ev.success);
            break;
        case TAG_WRITE:
            on_write(t->call, ev.success);
            break;
        }
    }
    pthread_mutex_lock(&s->mu);
    s->done = 1;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    /* Wake the main thread, which may be waiting for the queue to empty. */
    pthread_mutex_lock(&s->d->mu);
    pthread_cond_broadcast(&s->d->cv);
    pthread_mutex_unlock(&s->d->mu);
    return NULL;
}

/* Asks for the next call of method idx (idx == qs_command_count: any method
 * not registered, which we answer UNIMPLEMENTED rather than leave hanging). */
static void request_next(qs_server *s, size_t idx)
{
    const qs_command *c = idx < qs_command_count ? &qs_commands[idx] : NULL;
    qs_call *call = call_new(s, c);
    if (!call) {
        qs_log(QS_LOG_ERROR, "out of memory: no longer accepting calls to %s",
               c ? c->method : "unknown methods");
        return;
    }
    grpc_call_error e;
    if (c)
        e = grpc_server_request_registered_call(s->server, s->methods[idx], &call->call,
                                                &call->deadline, &call->md, NULL, s->cq, s->cq,
                                                &call->t_new);
    else
        e = grpc_server_request_call(s->server, &call->call, &call->details, &call->md, s->cq,
                                     s->cq, &call->t_new);
    if (e != GRPC_CALL_OK) {
        qs_log(QS_LOG_ERROR, "cannot accept calls to %s: %s", c ? c->method : "unknown methods",
               grpc_call_error_to_string(e));
        call_free(call);
    }
}

/* ---- The server ----------------------------------------------------------- */

int qs_server_start(qs_daemon *d, const char *listen, char *bound, size_t bound_size,
                    qs_server **out)
{
    qs_server *s = calloc(1, sizeof *s);
    void **methods = calloc(qs_command_count, sizeof *methods);
    if (!s || !methods) {
        free(s);
        free(methods);
        return qs_seterr(QS_ENOMEM, "out of memory starting the gRPC server");
    }
    s->d = d;
    s->methods = methods;
    s->t_shutdown.kind = TAG_SHUTDOWN;
    atomic_init(&s->draining, 0);
    atomic_init(&s->in_flight, 0);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);

    grpc_init();
    s->cq = grpc_completion_queue_create_for_next(NULL);
    /* SO_REUSEPORT off: a second daemon on the same port must fail to bind
     * rather than silently share (and split) the traffic. */
    grpc_arg args[] = {
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_ALLOW_REUSEPORT, .value.integer = 0},
        {.type = GRPC_ARG_INTEGER,
         .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
         .value.integer = (int)QS_PROTO_MAX_MESSAGE},
    };
    grpc_channel_args cargs = {.num_args = sizeof args / sizeof args[0], .args = args};
    s->server = grpc_server_create(&cargs, NULL);
    for (size_t i = 0; i < qs_command_count; i++)
        s->methods[i] = grpc_server_register_method(s->server, qs_commands[i].method, NULL,
                                                    GRPC_SRM_PAYLOAD_NONE, 0);
    grpc_server_register_completion_queue(s->server, s->cq, NULL);
    /* TLS when rank 0 has a certificate (auth.c); mutual TLS with a client CA. */
    const qs_auth *au = &d->auth;
    grpc_server_credentials *creds;
    if (au->cert_pem) {
        grpc_ssl_pem_key_cert_pair pair = {au->key_pem, au->cert_pem};
        creds = grpc_ssl_server_credentials_create_ex(
            au->client_ca_pem, &pair, 1,
            au->client_ca_pem ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                              : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
            NULL);
    } else {
        creds = grpc_insecure_server_credentials_create();
    }
    int port = grpc_server_add_http2_port(s->server, listen, creds);
    grpc_server_credentials_release(creds);
    if (port <= 0) {
        grpc_server_destroy(s->server);
        grpc_completion_queue_shutdown(s->cq);
        grpc_completion_queue_destroy(s->cq);
        grpc_shutdown();
        free(s->methods);
        free(s);
        return qs_seterr(QS_EBUSY,
                         "cannot listen on %s: the port is in use (is another qdaemon running?) "
                         "or the host is not an address of this machine; pick another with "
                         "--listen HOST:PORT (port 0 picks a free one)",
                         listen);
    }
    grpc_server_start(s->server);
    for (size_t i = 0; i <= qs_command_count; i++)
        request_next(s, i);

    const char *colon = strrchr(listen, ':');
    int hostlen = colon ? (int)(colon - listen) : (int)strlen(listen);
    snprintf(bound, bound_size, "%.*s:%d", hostlen, listen, port);

    if (pthread_create(&s->thread, NULL, cq_thread, s) != 0) {
        /* Nothing was accepted yet: shut down the server and give up. */
        grpc_server_shutdown_and_notify(s->server, s->cq, &s->t_shutdown);
        grpc_server_cancel_all_calls(s->server);
        s->thread_started = 0;
        cq_thread(s);
        grpc_server_destroy(s->server);
        grpc_completion_queue_destroy(s->cq);
        grpc_shutdown();
        free(s->methods);
        free(s);
        return qs_seterr(QS_ENOMEM, "cannot start the gRPC thread");
    }
    s->thread_started = 1;
    *out = s;
    return QS_OK;
}

void qs_server_drain(qs_server *s)
{
    pthread_mutex_lock(&s->mu);
    if (atomic_load(&s->draining)) {
        pthread_mutex_unlock(&s->mu);
        return;
    }
    s->drain_deadline = qs_now() + s->d->opts.drain_timeout;
    atomic_store(&s->draining, 1);
    pthread_mutex_unlock(&s->mu);
    qs_log(QS_LOG_INFO, "draining: no new requests; %d in flight", atomic_load(&s->in_flight));
    grpc_server_shutdown_and_notify(s->server, s->cq, &s->t_shutdown);
}

int qs_server_draining(qs_server *s)
{
    return atomic_load(&s->draining);
}

int qs_server_drain_expired(qs_server *s)
{
    pthread_mutex_lock(&s->mu);
    int expired = atomic_load(&s->draining) && qs_now() > s->drain_deadline;
    pthread_mutex_unlock(&s->mu);
    return expired;
}

int qs_server_in_flight(qs_server *s)
{
    return atomic_load(&s->in_flight);
}

int qs_server_wait(qs_server *s, double timeout)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double end = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9 + (timeout > 0 ? timeout : 0);
    ts.tv_sec = (time_t)end;
    ts.tv_nsec = (long)((end - (double)ts.tv_sec) * 1e9);
    pthread_mutex_lock(&s->mu);
    while (!s->done && timeout > 0)
        if (pthread_cond_timedwait(&s->cv, &s->mu, &ts) == ETIMEDOUT)
            break;
    int done = s->done;
    pthread_mutex_unlock(&s->mu);
    return done;
}

void qs_server_close(qs_server *s)
{
    if (!s)
        return;
    qs_server_drain(s);
    if (s->thread_started)
        pthread_join(s->thread, NULL);
    grpc_server_destroy(s->server);
    grpc_completion_queue_destroy(s->cq);
    grpc_shutdown();
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s->methods);
    free(s);
}
