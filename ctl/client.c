/* A synchronous gRPC client over the C core: one channel, one pluck queue,
 * one call at a time (qctl makes one or two calls per run). */
#define _POSIX_C_SOURCE 200809L
#include "qs_ctl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

struct qs_client {
    char addr[256];
    grpc_channel *ch;
    grpc_completion_queue *cq;
    char auth[600]; /* "Bearer TOKEN", or "" */
};

static gpr_timespec deadline_in(double seconds)
{
    if (seconds <= 0)
        return gpr_inf_future(GPR_CLOCK_REALTIME);
    return gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
                        gpr_time_from_millis((int64_t)(seconds * 1e3), GPR_TIMESPAN));
}

static void set_status(qs_rpc_status *st, grpc_status_code code, int unreachable, const char *msg)
{
    st->code = code;
    st->unreachable = unreachable;
    snprintf(st->details, sizeof st->details, "%s", msg);
}

qs_client *qs_client_init(const char *addr, double connect_timeout, const qs_client_security *sec,
                          qs_rpc_status *st)
{
    qs_client *c = calloc(1, sizeof *c);
    if (!c) {
        set_status(st, GRPC_STATUS_RESOURCE_EXHAUSTED, 0, "out of memory");
        return NULL;
    }
    snprintf(c->addr, sizeof c->addr, "%s", addr);
    grpc_init();
    c->cq = grpc_completion_queue_create_for_pluck(NULL);
    /* No HTTP proxy: a proxy from the environment must not capture loopback
     * traffic to the daemon. */
    grpc_arg args[] = {
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_ENABLE_HTTP_PROXY, .value.integer = 0},
        {.type = GRPC_ARG_INTEGER,
         .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
         .value.integer = (int)QS_PROTO_MAX_MESSAGE},
    };
    grpc_channel_args cargs = {.num_args = sizeof args / sizeof args[0], .args = args};
    /* TLS when a CA (or a client certificate) is given: the daemon's
     * certificate is checked against it, and mutual TLS sends ours. */
    int tls = sec && (sec->ca_pem || sec->cert_pem);
    grpc_channel_credentials *creds;
    if (tls) {
        grpc_ssl_pem_key_cert_pair pair = {sec->key_pem, sec->cert_pem};
        creds = grpc_ssl_credentials_create(sec->ca_pem, sec->cert_pem ? &pair : NULL, NULL, NULL);
    } else {
        creds = grpc_insecure_credentials_create();
    }
    c->ch = grpc_channel_create(addr, creds, &cargs);
    grpc_channel_credentials_release(creds);
    if (sec && sec->token)
        snprintf(c->auth, sizeof c->auth, "Bearer %s", sec->token);

    /* Connect first, so that "nobody is listening" is told apart from an
     * answer of the daemon. */
    gpr_timespec deadline = deadline_in(connect_timeout);
    grpc_connectivity_state s = grpc_channel_check_connectivity_state(c->ch, 1);
    while (s != GRPC_CHANNEL_READY) {
        if (s == GRPC_CHANNEL_TRANSIENT_FAILURE || s == GRPC_CHANNEL_SHUTDOWN) {
            set_status(st, GRPC_STATUS_UNAVAILABLE, 1,
                       tls ? "the connection failed (TLS: is the daemon listening with "
                             "--tls-cert, and does --tls-ca hold the CA that signed it?)"
                           : "the connection failed; if qdaemon runs with --tls-cert, give "
                             "qctl --tls-ca");
            qs_client_close(c);
            return NULL;
        }
        int tag;
        grpc_channel_watch_connectivity_state(c->ch, s, deadline, c->cq, &tag);
        grpc_event ev =
            grpc_completion_queue_pluck(c->cq, &tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (!ev.success) {
            set_status(st, GRPC_STATUS_DEADLINE_EXCEEDED, 1,
                       "no connection within the connect timeout");
            qs_client_close(c);
            return NULL;
        }
        s = grpc_channel_check_connectivity_state(c->ch, 1);
    }
    return c;
}

void qs_client_close(qs_client *c)
{
    if (!c)
        return;
    if (c->ch)
        grpc_channel_destroy(c->ch);
    grpc_completion_queue_shutdown(c->cq);
    while (
        grpc_completion_queue_pluck(c->cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
        GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(c->cq);
    free(c);
    grpc_shutdown();
}

static int pluck(qs_client *c, void *tag)
{
    grpc_event ev =
        grpc_completion_queue_pluck(c->cq, tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    return ev.type == GRPC_OP_COMPLETE && ev.success;
}

int qs_client_call(qs_client *c, const char *method, const ProtobufCMessage *req,
                   const ProtobufCMessageDescriptor *reply_desc, double timeout,
                   qs_client_on_msg on_msg, void *ud, qs_rpc_status *st)
{
    grpc_byte_buffer *send = qs_proto_pack(req);
    if (!send) {
        set_status(st, GRPC_STATUS_RESOURCE_EXHAUSTED, 0, "out of memory");
        return -1;
    }
    grpc_slice m = grpc_slice_from_static_string(method);
    grpc_call *call = grpc_channel_create_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, c->cq, m, NULL,
                                               deadline_in(timeout), NULL);
    grpc_metadata_array md, trailing;
    grpc_metadata_array_init(&md);
    grpc_metadata_array_init(&trailing);
    grpc_status_code code = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    int tag_send, tag_status, tag_recv;

    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    grpc_metadata auth;
    memset(&auth, 0, sizeof auth);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (c->auth[0]) {
        auth.key = grpc_slice_from_static_string("authorization");
        auth.value = grpc_slice_from_static_string(c->auth);
        ops[0].data.send_initial_metadata.count = 1;
        ops[0].data.send_initial_metadata.metadata = &auth;
    }
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &md;
    grpc_call_error e = grpc_call_start_batch(call, ops, 4, &tag_send, NULL);
    if (e == GRPC_CALL_OK) {
        memset(ops, 0, sizeof ops);
        ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
        ops[0].data.recv_status_on_client.trailing_metadata = &trailing;
        ops[0].data.recv_status_on_client.status = &code;
        ops[0].data.recv_status_on_client.status_details = &details;
        e = grpc_call_start_batch(call, ops, 1, &tag_status, NULL);
    }
    if (e != GRPC_CALL_OK) {
        set_status(st, GRPC_STATUS_INTERNAL, 0, grpc_call_error_to_string(e));
        grpc_call_unref(call);
        grpc_byte_buffer_destroy(send);
        grpc_metadata_array_destroy(&md);
        grpc_metadata_array_destroy(&trailing);
        return -1;
    }
    int sent = pluck(c, &tag_send);
    int malformed = 0, stopped = 0;
    /* A failed send means the call is already over: its status says why. */
    while (sent && !stopped) {
        grpc_byte_buffer *bb = NULL;
        memset(ops, 0, sizeof ops);
        ops[0].op = GRPC_OP_RECV_MESSAGE;
        ops[0].data.recv_message.recv_message = &bb;
        if (grpc_call_start_batch(call, ops, 1, &tag_recv, NULL) != GRPC_CALL_OK)
            break;
        if (!pluck(c, &tag_recv) || !bb)
            break;
        ProtobufCMessage *msg = qs_proto_unpack(reply_desc, bb);
        grpc_byte_buffer_destroy(bb);
        if (!msg) {
            malformed = 1;
            break;
        }
        if (on_msg(msg, ud))
            stopped = 1;
    }
    if (malformed || stopped)
        grpc_call_cancel(call, NULL);
    pluck(c, &tag_status);

    char *text = grpc_slice_to_c_string(details);
    grpc_connectivity_state cs = grpc_channel_check_connectivity_state(c->ch, 0);
    if (malformed) {
        char msg[256];
        snprintf(msg, sizeof msg,
                 "the daemon sent a malformed %s: are qctl and qdaemon the same version?",
                 reply_desc->name);
        set_status(st, GRPC_STATUS_INTERNAL, 0, msg);
    } else {
        /* UNAVAILABLE on a channel that is no longer READY: the connection was
         * lost (the daemon died or is gone), not a refusal by the daemon. */
        set_status(st, code, code == GRPC_STATUS_UNAVAILABLE && cs != GRPC_CHANNEL_READY, text);
    }
    gpr_free(text);
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&md);
    grpc_metadata_array_destroy(&trailing);
    grpc_byte_buffer_destroy(send);
    grpc_call_unref(call);
    return st->code == GRPC_STATUS_OK ? 0 : -1;
}

typedef struct unary_ctx {
    ProtobufCMessage *msg;
    int count;
} unary_ctx;

static int unary_on_msg(ProtobufCMessage *msg, void *ud)
{
    unary_ctx *u = ud;
    if (u->msg)
        protobuf_c_message_free_unpacked(u->msg, NULL);
    u->msg = msg;
    u->count++;
    return 0;
}

int qs_client_unary(qs_client *c, const char *method, const ProtobufCMessage *req,
                    const ProtobufCMessageDescriptor *reply_desc, double timeout,
                    ProtobufCMessage **reply, qs_rpc_status *st)
{
    unary_ctx u = {NULL, 0};
    int rc = qs_client_call(c, method, req, reply_desc, timeout, unary_on_msg, &u, st);
    if (rc == 0 && u.count != 1) {
        set_status(st, GRPC_STATUS_INTERNAL, 0, "the daemon answered without a reply message");
        rc = -1;
    }
    if (rc != 0 && u.msg) {
        protobuf_c_message_free_unpacked(u.msg, NULL);
        u.msg = NULL;
    }
    *reply = u.msg;
    return rc;
}
