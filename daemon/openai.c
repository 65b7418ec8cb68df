/* The OpenAI-compatible API on the HTTP port: /v1/completions,
 * /v1/chat/completions (whole answers or server-sent events) and
 * /v1/models.
 *
 * A request becomes the same Generate job a gRPC client's does (qs_submit):
 * this file only translates. The job's sink is a qs_oa: the main thread
 * writes GenerateEvent messages into it, as it would to a gRPC stream, and
 * the HTTP connection's thread reads JSON or SSE bytes out of it.
 */
#define _POSIX_C_SOURCE 200809L
#include "qs_daemon.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_STOPS                  4
#define MAX_STOP_LEN               256
#define COMPLETIONS_DEFAULT_TOKENS 16 /* OpenAI's default for /v1/completions */

/* ---- Bytes ---------------------------------------------------------------- */

typedef struct buf {
    char *p;
    size_t len, cap;
    int oom; /* an append failed: the answer is incomplete */
} buf;

static void buf_add(buf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void buf_str(buf *b, const char *s)
{
    buf_add(b, s, strlen(s));
}

/* Copies up to n bytes of s as valid UTF-8 (an invalid byte becomes U+FFFD)
 * and returns how many it consumed: an incomplete character at the end is
 * left for later unless final. Token pieces may split a character. */
static size_t utf8_copy(buf *out, const char *s, size_t n, int final)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        size_t k = c < 0x80             ? 1
                   : (c & 0xE0) == 0xC0 ? 2
                   : (c & 0xF0) == 0xE0 ? 3
                   : (c & 0xF8) == 0xF0 ? 4
                                        : 0;
        if (k == 0 || (k == 2 && c < 0xC2) || (k == 4 && c > 0xF4)) {
            buf_str(out, "\xEF\xBF\xBD");
            i++;
            continue;
        }
        if (i + k > n) {
            if (!final) {
                /* Hold back only what could still become a character. */
                int ok = 1;
                for (size_t j = i + 1; j < n; j++)
                    ok &= ((unsigned char)s[j] & 0xC0) == 0x80;
                if (ok)
                    return i;
            }
            buf_str(out, "\xEF\xBF\xBD");
            i++;
            continue;
        }
        int ok = 1;
        for (size_t j = 1; j < k; j++)
            ok &= ((unsigned char)s[i + j] & 0xC0) == 0x80;
        /* Overlong three-byte forms, surrogates, above U+10FFFF. */
        if (ok && k == 3) {
            unsigned char c1 = (unsigned char)s[i + 1];
            ok = !(c == 0xE0 && c1 < 0xA0) && !(c == 0xED && c1 >= 0xA0);
        } else if (ok && k == 4) {
            unsigned char c1 = (unsigned char)s[i + 1];
            ok = !(c == 0xF0 && c1 < 0x90) && !(c == 0xF4 && c1 >= 0x90);
        }
        if (!ok) {
            buf_str(out, "\xEF\xBF\xBD");
            i++;
            continue;
        }
        buf_add(out, s + i, k);
        i += k;
    }
    return i;
}

/* ---- Errors --------------------------------------------------------------- */

void qs_openai_error(qs_http_reply *out, unsigned status, const char *code, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    memset(out, 0, sizeof *out);
    out->status = status;
    out->type = "application/json";
    cJSON *o = cJSON_CreateObject(), *e = cJSON_AddObjectToObject(o, "error");
    cJSON_AddStringToObject(e, "message", msg);
    cJSON_AddStringToObject(e, "type", status < 500 ? "invalid_request_error" : "server_error");
    cJSON_AddNullToObject(e, "param");
    if (code)
        cJSON_AddStringToObject(e, "code", code);
    else
        cJSON_AddNullToObject(e, "code");
    out->body = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    out->len = out->body ? strlen(out->body) : 0;
}

/* The HTTP status of a job's gRPC status, as vLLM and OpenAI would answer. */
static unsigned http_status(grpc_status_code c, const char **code)
{
    *code = NULL;
    switch (c) {
    case GRPC_STATUS_INVALID_ARGUMENT:
    case GRPC_STATUS_OUT_OF_RANGE:
        return 400;
    case GRPC_STATUS_NOT_FOUND:
    case GRPC_STATUS_FAILED_PRECONDITION: /* unloaded while queued */
        *code = "model_not_found";
        return 404;
    case GRPC_STATUS_UNIMPLEMENTED:
        return 501;
    case GRPC_STATUS_RESOURCE_EXHAUSTED:
    case GRPC_STATUS_UNAVAILABLE:
    case GRPC_STATUS_ABORTED:
    case GRPC_STATUS_CANCELLED:
        return 503;
    default:
        return 500;
    }
}

/* ---- One request ---------------------------------------------------------- */

struct qs_oa {
    qs_daemon *d;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs; /* the connection's and the job's */
    qs_http_gone_fn gone;
    void *gone_ctx; /* NULL once the connection is done */
    int closed;
    char peer[80];

    /* The request. */
    int chat, stream, include_usage;
    char model[64], id[48];
    long long created;
    char *stops[MAX_STOPS];
    size_t nstop;

    /* What came back. */
    int events, finished;
    grpc_status_code code;
    char details[512];
    buf text;       /* the completion so far, control tokens left out */
    size_t sent;    /* bytes of text already in SSE chunks */
    size_t stop_at; /* where a stop string begins, once stop_hit */
    int stop_hit, role_sent;
    uint32_t prompt_tokens, completion_tokens;
    const char *reason; /* OpenAI's finish_reason */
    buf out;            /* SSE bytes not yet read */
    size_t out_pos;
    int ended;
};

static void oa_unref(qs_oa *o)
{
    pthread_mutex_lock(&o->mu);
    int left = --o->refs;
    pthread_mutex_unlock(&o->mu);
    if (left)
        return;
    for (size_t i = 0; i < o->nstop; i++)
        free(o->stops[i]);
    free(o->text.p);
    free(o->out.p);
    pthread_mutex_destroy(&o->mu);
    pthread_cond_destroy(&o->cv);
    free(o);
}

/* A chunk's frame, without its choice (under mu). */
static cJSON *chunk_new(const qs_oa *o)
{
    cJSON *c = cJSON_CreateObject();
    cJSON_AddStringToObject(c, "id", o->id);
    cJSON_AddStringToObject(c, "object", o->chat ? "chat.completion.chunk" : "text_completion");
    cJSON_AddNumberToObject(c, "created", (double)o->created);
    cJSON_AddStringToObject(c, "model", o->model);
    return c;
}

static void sse_send(qs_oa *o, cJSON *c)
{
    char *s = cJSON_PrintUnformatted(c);
    cJSON_Delete(c);
    if (!s) {
        o->out.oom = 1;
        return;
    }
    buf_str(&o->out, "data: ");
    buf_str(&o->out, s);
    buf_str(&o->out, "\n\n");
    cJSON_free(s);
}

/* One chunk: text (may be NULL) and a finish reason (NULL: not yet). */
static void sse_chunk(qs_oa *o, const char *text, const char *reason)
{
    cJSON *c = chunk_new(o);
    cJSON *choices = cJSON_AddArrayToObject(c, "choices"), *ch = cJSON_CreateObject();
    cJSON_AddItemToArray(choices, ch);
    cJSON_AddNumberToObject(ch, "index", 0);
    if (o->chat) {
        cJSON *delta = cJSON_AddObjectToObject(ch, "delta");
        if (!o->role_sent) {
            cJSON_AddStringToObject(delta, "role", "assistant");
            o->role_sent = 1;
        }
        if (text)
            cJSON_AddStringToObject(delta, "content", text);
    } else {
        cJSON_AddStringToObject(ch, "text", text ? text : "");
    }
    cJSON_AddNullToObject(ch, "logprobs");
    if (reason)
        cJSON_AddStringToObject(ch, "finish_reason", reason);
    else
        cJSON_AddNullToObject(ch, "finish_reason");
    if (o->include_usage)
        cJSON_AddNullToObject(c, "usage");
    sse_send(o, c);
}

static cJSON *usage_json(const qs_oa *o)
{
    cJSON *u = cJSON_CreateObject();
    cJSON_AddNumberToObject(u, "prompt_tokens", o->prompt_tokens);
    cJSON_AddNumberToObject(u, "completion_tokens", o->completion_tokens);
    cJSON_AddNumberToObject(u, "total_tokens", (double)o->prompt_tokens + o->completion_tokens);
    return u;
}

/* Bytes at the end of text that could begin a stop string: held back. */
static size_t stop_holdback(const qs_oa *o)
{
    size_t best = 0, avail = o->text.len - o->sent;
    for (size_t i = 0; i < o->nstop; i++) {
        size_t k = strlen(o->stops[i]) - 1;
        if (k > avail)
            k = avail;
        for (; k > best; k--)
            if (memcmp(o->text.p + o->text.len - k, o->stops[i], k) == 0) {
                best = k;
                break;
            }
    }
    return best;
}

/* Streams what text can be shown now (under mu). */
static void emit_text(qs_oa *o, int final)
{
    size_t end = o->stop_hit ? o->stop_at : o->text.len - (final ? 0 : stop_holdback(o));
    if (end <= o->sent)
        return;
    buf t = {0};
    o->sent += utf8_copy(&t, o->text.p + o->sent, end - o->sent, final || o->stop_hit);
    if (t.len)
        sse_chunk(o, t.p, NULL);
    free(t.p);
}

/* Appends a piece and looks for a stop string in its reach (under mu). */
static void add_piece(qs_oa *o, const char *p)
{
    size_t old = o->text.len;
    buf_str(&o->text, p);
    for (size_t i = 0; i < o->nstop && !o->stop_hit; i++) {
        size_t k = strlen(o->stops[i]);
        size_t from = old >= k ? old - k + 1 : 0;
        if (from < o->sent)
            from = o->sent;
        for (size_t j = from; j + k <= o->text.len; j++)
            if (memcmp(o->text.p + j, o->stops[i], k) == 0) {
                o->stop_hit = 1;
                o->stop_at = j;
                break;
            }
    }
}

/* ---- The job's sink ------------------------------------------------------- */

static int oa_write(void *ctx, grpc_byte_buffer *msg)
{
    qs_oa *o = ctx;
    Qshard__V1__GenerateEvent *ev =
        (void *)qs_proto_unpack(&qshard__v1__generate_event__descriptor, msg);
    grpc_byte_buffer_destroy(msg);
    pthread_mutex_lock(&o->mu);
    int closed = o->closed;
    if (ev && ev->event_case == QSHARD__V1__GENERATE_EVENT__EVENT_TOKEN && ev->token) {
        o->events++;
        o->completion_tokens++;
        if (!ev->token->control && !o->stop_hit && ev->token->text)
            add_piece(o, ev->token->text);
        if (o->stream)
            emit_text(o, 0);
        pthread_cond_broadcast(&o->cv);
    }
    pthread_mutex_unlock(&o->mu);
    if (ev)
        protobuf_c_message_free_unpacked(&ev->base, NULL);
    return closed ? qs_seterr(QS_ECOMM, "the HTTP client went away") : QS_OK;
}

static const char *finish_reason(const char *done_reason, int stop_hit)
{
    if (stop_hit || !strcmp(done_reason, "eos") || !strcmp(done_reason, "stop"))
        return "stop";
    if (!strcmp(done_reason, "length"))
        return "length";
    return "abort"; /* cancelled: the client left or the drain timed out */
}

static void oa_finish(void *ctx, grpc_status_code code, const char *details,
                      grpc_byte_buffer *reply)
{
    qs_oa *o = ctx;
    Qshard__V1__GenerateEvent *ev = NULL;
    if (reply && code == GRPC_STATUS_OK)
        ev = (void *)qs_proto_unpack(&qshard__v1__generate_event__descriptor, reply);
    if (reply)
        grpc_byte_buffer_destroy(reply);
    pthread_mutex_lock(&o->mu);
    if (o->finished) {
        pthread_mutex_unlock(&o->mu);
        if (ev)
            protobuf_c_message_free_unpacked(&ev->base, NULL);
        return;
    }
    o->finished = 1;
    o->code = code;
    snprintf(o->details, sizeof o->details, "%s", details ? details : "");
    if (code == GRPC_STATUS_OK &&
        !(ev && ev->event_case == QSHARD__V1__GENERATE_EVENT__EVENT_DONE && ev->done)) {
        o->code = GRPC_STATUS_INTERNAL;
        snprintf(o->details, sizeof o->details, "the daemon sent no generation summary");
    }
    if (o->code == GRPC_STATUS_OK) {
        const Qshard__V1__GenerateDone *dn = ev->done;
        o->prompt_tokens = dn->prompt_tokens;
        o->completion_tokens = dn->generated_tokens;
        o->reason = finish_reason(dn->finish_reason ? dn->finish_reason : "", o->stop_hit);
    }
    if (o->stream && (o->code == GRPC_STATUS_OK || o->events)) {
        if (o->code == GRPC_STATUS_OK) {
            emit_text(o, 1);
            sse_chunk(o, NULL, o->reason);
            if (o->include_usage) {
                cJSON *c = chunk_new(o);
                cJSON_AddArrayToObject(c, "choices");
                cJSON_AddItemToObject(c, "usage", usage_json(o));
                sse_send(o, c);
            }
        } else {
            /* Too late for a status: an error event, as vLLM sends. */
            const char *ec;
            unsigned st = http_status(o->code, &ec);
            cJSON *c = cJSON_CreateObject(), *e = cJSON_AddObjectToObject(c, "error");
            cJSON_AddStringToObject(e, "message", o->details);
            cJSON_AddStringToObject(e, "type", st < 500 ? "invalid_request_error" : "server_error");
            cJSON_AddNullToObject(e, "param");
            cJSON_AddNumberToObject(e, "code", st);
            sse_send(o, c);
        }
        buf_str(&o->out, "data: [DONE]\n\n");
    }
    o->ended = 1;
    pthread_cond_broadcast(&o->cv);
    pthread_mutex_unlock(&o->mu);
    if (ev)
        protobuf_c_message_free_unpacked(&ev->base, NULL);
}

static int oa_cancelled(void *ctx)
{
    qs_oa *o = ctx;
    pthread_mutex_lock(&o->mu);
    int gone = o->closed || o->stop_hit || (o->gone && o->gone(o->gone_ctx));
    pthread_mutex_unlock(&o->mu);
    /* Past the drain timeout the gRPC calls are cancelled; these too. */
    return gone || qs_server_drain_expired(o->d->server);
}

static void oa_release(void *ctx)
{
    oa_unref(ctx);
}

static const char *oa_peer(void *ctx)
{
    return ((qs_oa *)ctx)->peer;
}

/* HTTP has no deadline of the client's: --request-timeout applies. */
static const qs_sink_ops oa_ops = {oa_write, oa_finish, oa_cancelled, oa_release, oa_peer, NULL};

size_t qs_openai_read(qs_oa *o, char *dst, size_t max)
{
    pthread_mutex_lock(&o->mu);
    while (o->out_pos == o->out.len && !o->ended)
        pthread_cond_wait(&o->cv, &o->mu);
    size_t n = o->out.len - o->out_pos;
    if (n > max)
        n = max;
    memcpy(dst, o->out.p + o->out_pos, n);
    o->out_pos += n;
    if (o->out_pos == o->out.len)
        o->out_pos = o->out.len = 0; /* keep the buffer from growing */
    pthread_mutex_unlock(&o->mu);
    return n;
}

void qs_openai_close(qs_oa *o)
{
    pthread_mutex_lock(&o->mu);
    o->closed = 1;
    o->gone = NULL;
    o->gone_ctx = NULL;
    pthread_mutex_unlock(&o->mu);
    oa_unref(o);
}

/* ---- Request parsing ------------------------------------------------------ */

typedef struct params {
    const char *model;
    double max_tokens, temperature, top_p, top_k, seed;
    int have_max, have_seed, stream, include_usage;
    const char *stops[MAX_STOPS];
    size_t nstop;
} params;

/* A number field: 0 absent or null, 1 present and in [lo, hi] (and whole
 * when integer), -1 wrong (a sentence in err). */
static int num_field(const cJSON *o, const char *key, double lo, double hi, int integer, double *v,
                     char *err, size_t n)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!x || cJSON_IsNull(x))
        return 0;
    if (!cJSON_IsNumber(x) || !isfinite(x->valuedouble) || x->valuedouble < lo ||
        x->valuedouble > hi || (integer && x->valuedouble != floor(x->valuedouble))) {
        snprintf(err, n, "'%s' must be %s from %g to %g", key, integer ? "an integer" : "a number",
                 lo, hi);
        return -1;
    }
    *v = x->valuedouble;
    return 1;
}

/* Fields this server cannot honour: refused, not silently ignored, unless
 * they hold the value that means "off". */
static int unsupported(const cJSON *o, char *err, size_t n)
{
    static const char *const zero_only[] = {"presence_penalty", "frequency_penalty",
                                            "repetition_penalty"};
    for (size_t i = 0; i < sizeof zero_only / sizeof zero_only[0]; i++) {
        const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, zero_only[i]);
        int off = !x || cJSON_IsNull(x) ||
                  (cJSON_IsNumber(x) &&
                   x->valuedouble == (strcmp(zero_only[i], "repetition_penalty") ? 0.0 : 1.0));
        if (!off) {
            snprintf(err, n, "'%s' is not supported by qshard", zero_only[i]);
            return -1;
        }
    }
    static const char *const false_only[] = {"logprobs",   "top_logprobs",    "echo",
                                             "suffix",     "tools",           "functions",
                                             "logit_bias", "response_format", "best_of"};
    for (size_t i = 0; i < sizeof false_only / sizeof false_only[0]; i++) {
        const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, false_only[i]);
        int off =
            !x || cJSON_IsNull(x) || cJSON_IsFalse(x) ||
            (cJSON_IsNumber(x) &&
             (x->valuedouble == 0 || (!strcmp(false_only[i], "best_of") && x->valuedouble == 1))) ||
            (cJSON_IsArray(x) && cJSON_GetArraySize(x) == 0) ||
            (cJSON_IsObject(x) && !cJSON_GetArrayItem(x, 0)) ||
            (!strcmp(false_only[i], "response_format") && cJSON_IsObject(x) &&
             cJSON_IsString(cJSON_GetObjectItemCaseSensitive(x, "type")) &&
             !strcmp(cJSON_GetObjectItemCaseSensitive(x, "type")->valuestring, "text"));
        if (!off) {
            snprintf(err, n, "'%s' is not supported by qshard", false_only[i]);
            return -1;
        }
    }
    return 0;
}

static int parse_common(const cJSON *o, int chat, params *p, char *err, size_t n)
{
    memset(p, 0, sizeof *p);
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(o, "model");
    if (m && !cJSON_IsNull(m) && !cJSON_IsString(m)) {
        snprintf(err, n, "'model' must be a string");
        return -1;
    }
    p->model = cJSON_IsString(m) ? m->valuestring : NULL;
    int r;
    double nn = 1;
    if ((r = num_field(o, "n", 1, 1, 1, &nn, err, n)) < 0) {
        snprintf(err, n, "'n' must be 1: qshard generates one choice per request");
        return -1;
    }
    /* max_completion_tokens is the chat API's newer name. */
    const char *mkey = chat && cJSON_GetObjectItemCaseSensitive(o, "max_completion_tokens")
                           ? "max_completion_tokens"
                           : "max_tokens";
    if ((r = num_field(o, mkey, 1, 1e9, 1, &p->max_tokens, err, n)) < 0)
        return -1;
    p->have_max = r;
    p->temperature = 1; /* OpenAI's default */
    if (num_field(o, "temperature", 0, 2, 0, &p->temperature, err, n) < 0)
        return -1;
    p->top_p = 1;
    if (num_field(o, "top_p", 1e-9, 1, 0, &p->top_p, err, n) < 0) {
        snprintf(err, n, "'top_p' must be a number in (0, 1]");
        return -1;
    }
    p->top_k = -1; /* vLLM's extension; -1 or 0: off */
    if (num_field(o, "top_k", -1, 1e6, 1, &p->top_k, err, n) < 0)
        return -1;
    if ((r = num_field(o, "seed", -9.2e18, 9.2e18, 1, &p->seed, err, n)) < 0)
        return -1;
    p->have_seed = r;
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(o, "stream");
    if (st && !cJSON_IsNull(st) && !cJSON_IsBool(st)) {
        snprintf(err, n, "'stream' must be true or false");
        return -1;
    }
    p->stream = cJSON_IsTrue(st);
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(o, "stream_options");
    if (so && !cJSON_IsNull(so)) {
        const cJSON *iu = cJSON_GetObjectItemCaseSensitive(so, "include_usage");
        if (!cJSON_IsObject(so) || (iu && !cJSON_IsBool(iu))) {
            snprintf(err, n,
                     "'stream_options' must be an object such as {\"include_usage\": true}");
            return -1;
        }
        if (!p->stream) {
            snprintf(err, n, "'stream_options' is only allowed with \"stream\": true");
            return -1;
        }
        p->include_usage = cJSON_IsTrue(iu);
    }
    const cJSON *stop = cJSON_GetObjectItemCaseSensitive(o, "stop");
    if (cJSON_IsString(stop)) {
        p->stops[p->nstop++] = stop->valuestring;
    } else if (cJSON_IsArray(stop)) {
        const cJSON *x;
        cJSON_ArrayForEach(x, stop)
        {
            if (!cJSON_IsString(x) || p->nstop == MAX_STOPS) {
                snprintf(err, n, "'stop' must be a string or an array of at most %d strings",
                         MAX_STOPS);
                return -1;
            }
            p->stops[p->nstop++] = x->valuestring;
        }
    } else if (stop && !cJSON_IsNull(stop)) {
        snprintf(err, n, "'stop' must be a string or an array of at most %d strings", MAX_STOPS);
        return -1;
    }
    for (size_t i = 0; i < p->nstop; i++) {
        size_t k = strlen(p->stops[i]);
        if (k == 0 || k > MAX_STOP_LEN) {
            snprintf(err, n, "stop strings must be 1 to %d bytes long", MAX_STOP_LEN);
            return -1;
        }
    }
    return unsupported(o, err, n);
}

/* A message's text: a string, or an array of {"type": "text", "text"}. */
static int content_text(const cJSON *c, buf *out, char *err, size_t n)
{
    if (cJSON_IsString(c)) {
        buf_str(out, c->valuestring);
        return 0;
    }
    if (cJSON_IsArray(c)) {
        const cJSON *part;
        cJSON_ArrayForEach(part, c)
        {
            const cJSON *t = cJSON_GetObjectItemCaseSensitive(part, "type");
            const cJSON *tx = cJSON_GetObjectItemCaseSensitive(part, "text");
            if (!cJSON_IsString(t) || strcmp(t->valuestring, "text") || !cJSON_IsString(tx)) {
                snprintf(err, n, "only text content parts are supported");
                return -1;
            }
            buf_str(out, tx->valuestring);
        }
        return 0;
    }
    snprintf(err, n, "a message's 'content' must be a string or an array of text parts");
    return -1;
}

/* ChatML, as SmolLM2's template writes it: the template's own system
 * message when the first one is not a system message, each message between
 * <|im_start|>ROLE and <|im_end|>, then the assistant's turn opened. */
static int chatml(const cJSON *msgs, const qs_catalog_entry *e, buf *out, char *err, size_t n)
{
    if (!cJSON_IsArray(msgs) || cJSON_GetArraySize(msgs) == 0) {
        snprintf(err, n, "'messages' must be a non-empty array of {\"role\", \"content\"}");
        return -1;
    }
    int i = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, msgs)
    {
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        if (!cJSON_IsObject(m) || !cJSON_IsString(role)) {
            snprintf(err, n, "message %d has no 'role'", i);
            return -1;
        }
        const char *r = role->valuestring;
        if (!strcmp(r, "developer")) /* OpenAI's newer name for system */
            r = "system";
        if (strcmp(r, "system") && strcmp(r, "user") && strcmp(r, "assistant")) {
            snprintf(err, n,
                     "message %d: role '%.40s' is not supported: use system, user or assistant", i,
                     r);
            return -1;
        }
        if (i == 0 && strcmp(r, "system") && e->system[0]) {
            buf_str(out, "<|im_start|>system\n");
            buf_str(out, e->system);
            buf_str(out, "<|im_end|>\n");
        }
        buf_str(out, "<|im_start|>");
        buf_str(out, r);
        buf_str(out, "\n");
        if (content_text(cJSON_GetObjectItemCaseSensitive(m, "content"), out, err, n)) {
            /* "message i: " before the sentence, truncated to n. */
            char why[512];
            snprintf(why, sizeof why, "%s", err);
            int k = snprintf(err, n, "message %d: ", i);
            if (k > 0 && (size_t)k < n) {
                size_t len = strlen(why), room = n - (size_t)k - 1;
                len = len < room ? len : room;
                memcpy(err + k, why, len);
                err[(size_t)k + len] = '\0';
            }
            return -1;
        }
        buf_str(out, "<|im_end|>\n");
        i++;
    }
    buf_str(out, "<|im_start|>assistant\n");
    return 0;
}

/* ---- Serving -------------------------------------------------------------- */

static void reply_json(qs_http_reply *out, cJSON *o)
{
    memset(out, 0, sizeof *out);
    out->body = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!out->body) {
        qs_openai_error(out, 500, NULL, "the daemon ran out of memory writing the answer");
        return;
    }
    out->status = 200;
    out->type = "application/json";
    out->len = strlen(out->body);
}

static cJSON *model_json(const qs_catalog_entry *e)
{
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", e->name);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", floor(e->created));
    cJSON_AddStringToObject(m, "owned_by", "qshard");
    cJSON_AddNumberToObject(m, "max_model_len", e->max_seq);
    return m;
}

static void serve_models(qs_daemon *d, const char *id, qs_http_reply *out)
{
    qs_catalog_entry *cat = NULL;
    size_t n = 0;
    if (qs_models_catalog(d, &cat, &n) != QS_OK) {
        qs_openai_error(out, 500, NULL, "%s", qs_errmsg());
        return;
    }
    if (id) {
        for (size_t i = 0; i < n; i++)
            if (!strcmp(cat[i].name, id)) {
                reply_json(out, model_json(&cat[i]));
                free(cat);
                return;
            }
        free(cat);
        qs_openai_error(out, 404, "model_not_found",
                        "the model '%.100s' is not loaded (GET /v1/models lists those that are)",
                        id);
        return;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "object", "list");
    cJSON *data = cJSON_AddArrayToObject(o, "data");
    for (size_t i = 0; i < n; i++)
        cJSON_AddItemToArray(data, model_json(&cat[i]));
    free(cat);
    reply_json(out, o);
}

/* The whole answer of a request that did not stream (under mu). */
static void whole_answer(qs_oa *o, qs_http_reply *out)
{
    buf t = {0};
    utf8_copy(&t, o->text.p ? o->text.p : "", o->stop_hit ? o->stop_at : o->text.len, 1);
    cJSON *c = cJSON_CreateObject();
    cJSON_AddStringToObject(c, "id", o->id);
    cJSON_AddStringToObject(c, "object", o->chat ? "chat.completion" : "text_completion");
    cJSON_AddNumberToObject(c, "created", (double)o->created);
    cJSON_AddStringToObject(c, "model", o->model);
    cJSON *choices = cJSON_AddArrayToObject(c, "choices"), *ch = cJSON_CreateObject();
    cJSON_AddItemToArray(choices, ch);
    cJSON_AddNumberToObject(ch, "index", 0);
    if (o->chat) {
        cJSON *msg = cJSON_AddObjectToObject(ch, "message");
        cJSON_AddStringToObject(msg, "role", "assistant");
        cJSON_AddStringToObject(msg, "content", t.p ? t.p : "");
    } else {
        cJSON_AddStringToObject(ch, "text", t.p ? t.p : "");
    }
    cJSON_AddNullToObject(ch, "logprobs");
    cJSON_AddStringToObject(ch, "finish_reason", o->reason ? o->reason : "stop");
    cJSON_AddItemToObject(c, "usage", usage_json(o));
    free(t.p);
    reply_json(out, c);
}

static void serve_generate(qs_daemon *d, int chat, const char *body, size_t len, const char *peer,
                           qs_http_gone_fn gone, void *gone_ctx, qs_http_reply *out)
{
    cJSON *o = cJSON_ParseWithLength(body, len);
    if (!cJSON_IsObject(o)) {
        cJSON_Delete(o);
        qs_openai_error(out, 400, NULL, "the body is not a JSON object");
        return;
    }
    char err[512] = "";
    params p;
    if (parse_common(o, chat, &p, err, sizeof err)) {
        cJSON_Delete(o);
        qs_openai_error(out, 400, NULL, "%s", err);
        return;
    }
    /* The model: named, or the only one loaded (as llama.cpp's server). */
    qs_catalog_entry e;
    if (!p.model || !*p.model) {
        qs_catalog_entry *cat = NULL;
        size_t n = 0;
        int one = qs_models_catalog(d, &cat, &n) == QS_OK && n == 1;
        if (one)
            e = cat[0];
        free(cat);
        if (!one) {
            cJSON_Delete(o);
            qs_openai_error(out, 400, NULL, "name the 'model' (GET /v1/models lists those loaded)");
            return;
        }
    } else if (!qs_models_catalog_find(d, p.model, &e)) {
        qs_openai_error(out, 404, "model_not_found",
                        "the model '%.100s' is not loaded (GET /v1/models lists those that are; "
                        "qctl load loads one)",
                        p.model);
        cJSON_Delete(o);
        return;
    }
    buf prompt = {0};
    if (chat) {
        if (e.chat != QS_CHAT_CHATML) {
            qs_openai_error(out, 400, NULL,
                            e.chat == QS_CHAT_NONE
                                ? "the model '%s' has no chat template: use /v1/completions"
                                : "the model '%s' has a chat template other than ChatML, which "
                                  "qshard cannot apply: use /v1/completions with the prompt "
                                  "already formatted",
                            e.name);
            cJSON_Delete(o);
            return;
        }
        if (chatml(cJSON_GetObjectItemCaseSensitive(o, "messages"), &e, &prompt, err, sizeof err)) {
            free(prompt.p);
            cJSON_Delete(o);
            qs_openai_error(out, 400, NULL, "%s", err);
            return;
        }
    } else {
        const cJSON *pr = cJSON_GetObjectItemCaseSensitive(o, "prompt");
        if (cJSON_IsArray(pr) && cJSON_GetArraySize(pr) == 1 &&
            cJSON_IsString(cJSON_GetArrayItem(pr, 0)))
            pr = cJSON_GetArrayItem(pr, 0);
        if (!cJSON_IsString(pr)) {
            cJSON_Delete(o);
            qs_openai_error(out, 400, NULL,
                            "'prompt' must be a string (or an array of one string; token "
                            "arrays are not supported)");
            return;
        }
        buf_str(&prompt, pr->valuestring);
    }
    if (prompt.oom) {
        free(prompt.p);
        cJSON_Delete(o);
        qs_openai_error(out, 500, NULL, "the daemon ran out of memory");
        return;
    }

    qs_oa *a = calloc(1, sizeof *a);
    if (!a) {
        free(prompt.p);
        cJSON_Delete(o);
        qs_openai_error(out, 500, NULL, "the daemon ran out of memory");
        return;
    }
    static atomic_uint_fast64_t counter;
    pthread_mutex_init(&a->mu, NULL);
    pthread_cond_init(&a->cv, NULL);
    a->d = d;
    a->refs = 2;
    a->gone = gone;
    a->gone_ctx = gone_ctx;
    snprintf(a->peer, sizeof a->peer, "%s", peer);
    a->chat = chat;
    a->stream = p.stream;
    a->include_usage = p.include_usage;
    snprintf(a->model, sizeof a->model, "%s", e.name);
    a->created = (long long)time(NULL);
    snprintf(a->id, sizeof a->id, "%s-%llx%04llx", chat ? "chatcmpl" : "cmpl",
             (unsigned long long)a->created,
             (unsigned long long)(atomic_fetch_add(&counter, 1) & 0xffff));
    for (size_t i = 0; i < p.nstop; i++)
        if ((a->stops[a->nstop] = strdup(p.stops[i])))
            a->nstop++;
    /* A chat ends with the assistant's turn, EOS or not: rank 0 stops at
     * the control token (not text, so the sink never sees it as text). */
    char *stops[MAX_STOPS + 1];
    memcpy(stops, a->stops, a->nstop * sizeof *stops);
    size_t nstops = a->nstop;
    if (chat)
        stops[nstops++] = "<|im_end|>";

    Qshard__V1__GenerateRequest req = QSHARD__V1__GENERATE_REQUEST__INIT;
    req.model = a->model;
    req.prompt = prompt.p ? prompt.p : "";
    /* No max_tokens: as many as the context holds (chat) or 16
     * (completions), as OpenAI; a given one that does not fit is refused. */
    req.max_tokens = p.have_max ? (uint32_t)p.max_tokens : chat ? 0 : COMPLETIONS_DEFAULT_TOKENS;
    req.fit_context = !p.have_max;
    req.temperature = (float)p.temperature;
    req.top_p = (float)p.top_p;
    req.top_k = p.top_k > 0 ? (uint32_t)p.top_k : 0;
    /* 0 asks the daemon to pick: a client's seed 0 must stay fixed. */
    req.seed = p.have_seed ? (p.seed == 0 ? 0x5eed5eed5eed5eedull : (uint64_t)(int64_t)p.seed) : 0;
    req.n_stop = nstops;
    req.stop = stops;
    req.special_tokens = chat;
    qs_submit(d, (qs_sink){&oa_ops, a}, qs_command_for_op(QS_OP_GENERATE), &req.base);
    free(prompt.p);
    cJSON_Delete(o);

    /* The first event (a stream) or the answer. */
    pthread_mutex_lock(&a->mu);
    while (!a->finished && !(a->stream && a->events))
        pthread_cond_wait(&a->cv, &a->mu);
    if (a->finished && (a->code != GRPC_STATUS_OK || a->text.oom || a->out.oom) && !a->events) {
        const char *code;
        unsigned st = a->code == GRPC_STATUS_OK ? 500 : http_status(a->code, &code);
        if (a->code == GRPC_STATUS_OK)
            code = NULL;
        qs_openai_error(out, st, code, "%s",
                        a->code == GRPC_STATUS_OK ? "the daemon ran out of memory" : a->details);
        pthread_mutex_unlock(&a->mu);
        qs_openai_close(a);
        return;
    }
    if (!a->stream) {
        if (a->code != GRPC_STATUS_OK) {
            const char *code;
            unsigned st = http_status(a->code, &code);
            qs_openai_error(out, st, code, "%s", a->details);
        } else {
            whole_answer(a, out);
        }
        pthread_mutex_unlock(&a->mu);
        qs_openai_close(a);
        return;
    }
    pthread_mutex_unlock(&a->mu);
    memset(out, 0, sizeof *out);
    out->status = 200;
    out->type = "text/event-stream";
    out->stream = a; /* the connection's reference goes with it */
}

void qs_openai_serve(qs_daemon *d, const char *method, const char *path, const char *body,
                     size_t len, const char *peer, qs_http_gone_fn gone, void *gone_ctx,
                     qs_http_reply *out)
{
    int get = !strcmp(method, "GET"), post = !strcmp(method, "POST");
    if (!strcmp(path, "/v1/models") || !strncmp(path, "/v1/models/", 11)) {
        if (!get)
            qs_openai_error(out, 405, NULL, "%s takes GET", path);
        else
            serve_models(d, path[10] ? path + 11 : NULL, out);
        return;
    }
    int chat = !strcmp(path, "/v1/chat/completions");
    if (chat || !strcmp(path, "/v1/completions")) {
        if (!post)
            qs_openai_error(out, 405, NULL, "%s takes POST with a JSON body", path);
        else
            serve_generate(d, chat, body, len, peer, gone, gone_ctx, out);
        return;
    }
    qs_openai_error(out, 404, NULL,
                    "no route %.200s: qdaemon serves POST /v1/completions, POST "
                    "/v1/chat/completions and GET /v1/models",
                    path);
}
