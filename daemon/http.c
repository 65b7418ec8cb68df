/* Rank 0's HTTP server (--http HOST:PORT), on libmicrohttpd: it parses the
 * HTTP, this file routes. GET /metrics (metrics.c), GET /health, and
 * everything under /v1 to the OpenAI API (openai.c).
 *
 * One thread per connection: a request may wait for its job (queued behind
 * others on rank 0's main thread) or stream its tokens, and only its own
 * connection waits with it. The number of connections is capped.
 */
#define _POSIX_C_SOURCE 200809L
#include "qs_daemon.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <microhttpd.h>

#define MAX_BODY        (1u << 20) /* a prompt longer than any KV cache, with room */
#define MAX_CONNECTIONS 64
#define IDLE_TIMEOUT    60 /* seconds an idle keep-alive connection stays */
#define STREAM_BLOCK    4096

struct qs_http {
    qs_daemon *d;
    struct MHD_Daemon *mhd;
    atomic_int in_flight;
};

/* One request on a connection. */
typedef struct req {
    qs_http *h;
    struct MHD_Connection *conn;
    double started;
    char peer[80];
    char what[160]; /* METHOD URL, for the log */
    char *body;
    size_t len;
    int too_big;
    unsigned status;
    qs_oa *stream; /* closed when the request completes, never before */
} req;

int qs_http_in_flight(qs_http *h)
{
    return h ? atomic_load(&h->in_flight) : 0;
}

static void peer_of(struct MHD_Connection *c, char *out, size_t n)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    snprintf(out, n, "?");
    if (!ci || !ci->client_addr)
        return;
    char host[64];
    const struct sockaddr *sa = ci->client_addr;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const void *)sa;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        snprintf(out, n, "%s:%u", host, ntohs(in->sin_port));
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in = (const void *)sa;
        inet_ntop(AF_INET6, &in->sin6_addr, host, sizeof host);
        snprintf(out, n, "[%s]:%u", host, ntohs(in->sin6_port));
    }
}

/* The client hung up: a request waiting for its job stops it. The job's
 * thread asks; the connection is alive until the request completes. */
static int conn_gone(void *ctx)
{
    req *r = ctx;
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci)
        return 0;
    /* Readable with nothing to read is an orderly close; a reset is an
     * error. Data (a pipelined request) is left where it is. */
    struct pollfd p = {.fd = ci->connect_fd, .events = POLLIN};
    if (poll(&p, 1, 0) <= 0)
        return 0;
    if (p.revents & (POLLHUP | POLLERR))
        return 1;
    char c;
    ssize_t n = recv(ci->connect_fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

static enum MHD_Result send_reply(req *r, qs_http_reply *rep)
{
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(rep->len, rep->body, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(rep->body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, rep->type);
    r->status = rep->status;
    enum MHD_Result ok = MHD_queue_response(r->conn, rep->status, resp);
    MHD_destroy_response(resp);
    return ok;
}

static enum MHD_Result send_text(req *r, unsigned status, const char *type, const char *text)
{
    qs_http_reply rep = {status, type, strdup(text), strlen(text), NULL};
    if (!rep.body)
        return MHD_NO;
    return send_reply(r, &rep);
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    size_t n = qs_openai_read(cls, buf, max);
    return n ? (ssize_t)n : MHD_CONTENT_READER_END_OF_STREAM;
}

static enum MHD_Result send_stream(req *r, qs_http_reply *rep)
{
    /* The request, not the response, owns the stream: MHD may free the
     * response after it says the request completed, and the stream's job
     * probes the connection until then. */
    struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, STREAM_BLOCK,
                                                                  stream_read, rep->stream, NULL);
    if (!resp) {
        qs_openai_close(rep->stream);
        return MHD_NO;
    }
    r->stream = rep->stream;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, rep->type);
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    r->status = rep->status;
    enum MHD_Result ok = MHD_queue_response(r->conn, rep->status, resp);
    MHD_destroy_response(resp);
    return ok;
}

static enum MHD_Result serve(req *r, const char *url, const char *method)
{
    qs_daemon *d = r->h->d;
    int get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
    /* The access token on everything but /health (probes need none);
     * Prometheus and OpenAI clients send it as a Bearer token. */
    if (strcmp(url, "/health") != 0) {
        const char *auth = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Authorization");
        const char *why = qs_auth_refusal(&d->auth, auth, auth ? strlen(auth) : 0);
        if (why) {
            qs_http_reply rep;
            qs_openai_error(&rep, 401, "invalid_api_key", "%s", why);
            if (!rep.body)
                return MHD_NO;
            return send_reply(r, &rep);
        }
    }
    if (!strcmp(url, "/health")) {
        if (!get)
            return send_text(r, 405, "text/plain", "/health takes GET\n");
        int draining = qs_server_draining(d->server);
        return send_text(r, draining ? 503 : 200, "application/json",
                         draining ? "{\"status\":\"draining\"}\n" : "{\"status\":\"ok\"}\n");
    }
    if (!strcmp(url, "/metrics")) {
        if (!get)
            return send_text(r, 405, "text/plain", "/metrics takes GET\n");
        char *text = NULL;
        size_t len = 0;
        if (qs_metrics_render(d, 2.0, &text, &len) != QS_OK) {
            char msg[600];
            snprintf(msg, sizeof msg, "%s\n", qs_errmsg());
            return send_text(r, 500, "text/plain", msg);
        }
        qs_http_reply rep = {200, "text/plain; version=0.0.4; charset=utf-8", text, len, NULL};
        return send_reply(r, &rep);
    }
    qs_http_reply rep;
    if (strncmp(url, "/v1/", 4) != 0) {
        qs_openai_error(&rep, 404, NULL,
                        "no route %.200s: qdaemon serves GET /metrics, GET /health and the "
                        "OpenAI API under /v1",
                        url);
    } else if (qs_server_draining(d->server)) {
        qs_openai_error(&rep, 503, NULL,
                        "the daemon is shutting down and takes no new requests; send it again "
                        "once it is back");
    } else if (r->too_big) {
        qs_openai_error(&rep, 413, NULL, "the request body is larger than %u bytes", MAX_BODY);
    } else {
        qs_openai_serve(d, method, url, r->body ? r->body : "", r->len, r->peer, conn_gone, r,
                        &rep);
    }
    if (!rep.body && !rep.stream)
        return MHD_NO; /* out of memory: MHD closes the connection */
    return rep.stream ? send_stream(r, &rep) : send_reply(r, &rep);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_size, void **con_cls)
{
    (void)version;
    qs_http *h = cls;
    req *r = *con_cls;
    if (!r) {
        /* First call: headers only. */
        r = calloc(1, sizeof *r);
        if (!r)
            return MHD_NO;
        r->h = h;
        r->conn = conn;
        r->started = qs_now();
        peer_of(conn, r->peer, sizeof r->peer);
        snprintf(r->what, sizeof r->what, "%s %.140s", method, url);
        atomic_fetch_add(&h->in_flight, 1);
        *con_cls = r;
        return MHD_YES;
    }
    if (*upload_size) {
        /* Keep reading an oversized body (to answer 413), not storing it. */
        if (!r->too_big && r->len + *upload_size <= MAX_BODY) {
            char *b = realloc(r->body, r->len + *upload_size + 1);
            if (!b)
                return MHD_NO;
            memcpy(b + r->len, upload_data, *upload_size);
            r->body = b;
            r->len += *upload_size;
            r->body[r->len] = '\0';
        } else {
            r->too_big = 1;
        }
        *upload_size = 0;
        return MHD_YES;
    }
    return serve(r, url, method);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)conn;
    qs_http *h = cls;
    req *r = *con_cls;
    if (!r)
        return;
    if (r->status)
        qs_log(r->status >= 500 ? QS_LOG_WARN : QS_LOG_INFO, "HTTP %s from %s: %u in %.2f ms%s",
               r->what, r->peer, r->status, (qs_now() - r->started) * 1e3,
               toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? "" : " (the connection ended early)");
    if (r->stream)
        qs_openai_close(r->stream);
    if (r->status)
        atomic_fetch_add(&h->d->served, 1);
    atomic_fetch_sub(&h->in_flight, 1);
    free(r->body);
    free(r);
    *con_cls = NULL;
}

static void on_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && msg[n - 1] == '\n')
        msg[--n] = '\0';
    qs_log(QS_LOG_DEBUG, "HTTP: %s", msg);
}

int qs_http_start(qs_daemon *d, const char *listen, char *bound, size_t bound_size, qs_http **out)
{
    const char *colon = strrchr(listen, ':');
    char host[256];
    size_t hn = colon ? (size_t)(colon - listen) : 0;
    if (!colon || hn >= sizeof host)
        return qs_seterr(QS_EINVAL, "--http takes HOST:PORT, got '%s'", listen);
    memcpy(host, listen, hn);
    host[hn] = '\0';
    if (hn >= 2 && host[0] == '[' && host[hn - 1] == ']') {
        memmove(host, host + 1, hn - 2);
        host[hn - 2] = '\0';
    }
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    struct addrinfo *ai = NULL;
    int gai = getaddrinfo(host, colon + 1, &hints, &ai);
    if (gai != 0 || !ai)
        return qs_seterr(QS_EINVAL, "--http %s: cannot resolve '%s': %s", listen, host,
                         gai_strerror(gai));
    qs_http *h = calloc(1, sizeof *h);
    if (!h) {
        freeaddrinfo(ai);
        return qs_seterr(QS_ENOMEM, "out of memory starting the HTTP server");
    }
    h->d = d;
    atomic_init(&h->in_flight, 0);
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
                     MHD_USE_ERROR_LOG | (ai->ai_family == AF_INET6 ? MHD_USE_IPv6 : 0);
    /* HTTPS with rank 0's certificate when it has one (libmicrohttpd's GnuTLS). */
    const qs_auth *au = &d->auth;
    if (au->cert_pem && MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES) {
        freeaddrinfo(ai);
        free(h);
        return qs_seterr(QS_ENOTSUP, "--http with --tls-cert: this libmicrohttpd has no TLS; "
                                     "serve HTTP on loopback behind a TLS proxy instead");
    }
    if (au->cert_pem)
        flags |= MHD_USE_TLS;
    h->mhd = MHD_start_daemon(
        flags, 0, NULL, NULL, on_request, h, MHD_OPTION_SOCK_ADDR, ai->ai_addr,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)MAX_CONNECTIONS, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned)IDLE_TIMEOUT, MHD_OPTION_NOTIFY_COMPLETED, on_completed, h,
        MHD_OPTION_EXTERNAL_LOGGER, on_log, NULL,
        /* The list ends at the first MHD_OPTION_END: no certificate, no TLS. */
        au->cert_pem ? MHD_OPTION_HTTPS_MEM_KEY : MHD_OPTION_END, au->key_pem,
        MHD_OPTION_HTTPS_MEM_CERT, au->cert_pem, MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!h->mhd) {
        free(h);
        return qs_seterr(QS_EBUSY,
                         "cannot serve HTTP on %s: the port is in use or the host is not an "
                         "address of this machine; pick another with --http HOST:PORT (port 0 "
                         "picks a free one)",
                         listen);
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(h->mhd, MHD_DAEMON_INFO_BIND_PORT);
    snprintf(bound, bound_size, "%.*s:%u", (int)hn, listen, di ? di->port : 0u);
    *out = h;
    return QS_OK;
}

void qs_http_close(qs_http *h)
{
    if (!h)
        return;
    MHD_stop_daemon(h->mhd);
    free(h);
}
