/* qs_ctl.h: the header of ctl/, the qctl client: a small synchronous gRPC
 * client over the C core (client.c) and the commands (commands.c). */
#ifndef QS_CTL_H
#define QS_CTL_H

#include <stddef.h>
#include <stdint.h>

#include "qs_proto.h"

/* Exit codes of every qctl command. */
enum {
    QS_EXIT_OK = 0,
    QS_EXIT_REFUSED = 1,    /* the daemon answered with an error status */
    QS_EXIT_USAGE = 2,      /* bad command line */
    QS_EXIT_UNREACHABLE = 3 /* no daemon at the address */
};

#define QS_CTL_DEFAULT_ADDR "127.0.0.1:50551"

/* ---- Client (client.c) ---------------------------------------------------- */

typedef struct qs_client qs_client;

typedef struct qs_rpc_status {
    grpc_status_code code;
    int unreachable; /* the connection failed or was lost */
    char details[1024];
} qs_rpc_status;

/* TLS and the access token (PEM text and the token itself; NULL: unused).
 * ca_pem checks the daemon's certificate; cert_pem and key_pem are ours for
 * mutual TLS; token goes with every call as "authorization: Bearer". */
typedef struct qs_client_security {
    const char *ca_pem, *cert_pem, *key_pem, *token;
} qs_client_security;

/* Connects to addr, waiting up to connect_timeout seconds (sec NULL:
 * plaintext, no token). On failure returns NULL with st->unreachable set
 * and the reason in st->details. */
qs_client *qs_client_init(const char *addr, double connect_timeout, const qs_client_security *sec,
                          qs_rpc_status *st);
void qs_client_close(qs_client *c);

/* Called for each reply message (taken: free it with
 * protobuf_c_message_free_unpacked); non-zero stops reading. */
typedef int (*qs_client_on_msg)(ProtobufCMessage *msg, void *ud);

/* Calls method with req and reads replies of type reply_desc until the
 * server's status; timeout <= 0: no deadline. Returns 0 when the status is
 * OK. A unary method calls on_msg once. */
int qs_client_call(qs_client *c, const char *method, const ProtobufCMessage *req,
                   const ProtobufCMessageDescriptor *reply_desc, double timeout,
                   qs_client_on_msg on_msg, void *ud, qs_rpc_status *st);

/* Unary convenience: *reply is the one message (NULL on error). */
int qs_client_unary(qs_client *c, const char *method, const ProtobufCMessage *req,
                    const ProtobufCMessageDescriptor *reply_desc, double timeout,
                    ProtobufCMessage **reply, qs_rpc_status *st);

/* ---- Commands (commands.c) ------------------------------------------------ */

/* Options every command accepts, before or after its name. */
typedef struct qs_ctl_global {
    char addr[256];
    int json;
    double timeout;         /* seconds; < 0: the command's default */
    double connect_timeout; /* seconds */
    /* Files (default $QSHARD_TLS_CA, $QSHARD_TLS_CERT, $QSHARD_TLS_KEY,
     * $QSHARD_TOKEN_FILE); "" for none. */
    char tls_ca[1024], tls_cert[1024], tls_key[1024], token_file[1024];
} qs_ctl_global;

/* Each takes argv[0] == its name and returns the exit code. */
int qs_ctl_health(qs_ctl_global *g, int argc, char **argv);
int qs_ctl_stats(qs_ctl_global *g, int argc, char **argv);
int qs_ctl_plan_daemon(qs_ctl_global *g, int argc, char **argv);
int qs_ctl_load(qs_ctl_global *g, int argc, char **argv);
int qs_ctl_unload(qs_ctl_global *g, int argc, char **argv);
int qs_ctl_generate(qs_ctl_global *g, int argc, char **argv);
int qs_ctl_eval(qs_ctl_global *g, int argc, char **argv);
int qs_ctl_bench(qs_ctl_global *g, int argc, char **argv);
int qs_ctl_shutdown(qs_ctl_global *g, int argc, char **argv);
int qs_ctl_cache(qs_ctl_global *g, int argc, char **argv);

/* `qctl bench-serve` (bench_serve.c): concurrent streams against a model. */
int qs_ctl_bench_serve(qs_ctl_global *g, int argc, char **argv);

/* Shared by the command files (commands.c). A command's arguments, parsed
 * in a loop of qs_ctl_next_arg (help and global options) and
 * qs_ctl_opt_val; err holds an exit code once a usage error was printed. */
typedef struct qs_args {
    const char *cmd;
    const char *help;
    int argc;
    char **argv;
    int i;
    int err;
} qs_args;
int qs_ctl_next_arg(qs_ctl_global *g, qs_args *a);
int qs_ctl_opt_val(qs_args *a, const char *name, const char **val);
int qs_ctl_parse_u32(qs_args *a, const char *opt, const char *v, uint32_t *out);
int qs_ctl_parse_double(qs_args *a, const char *opt, const char *v, double *out);
int qs_ctl_unknown_arg(qs_args *a);
int qs_ctl_usage(qs_args *a, const char *msg);
/* 0 to go on, else the exit code. */
int qs_ctl_parse_done(qs_args *a);
qs_client *qs_ctl_connect(const qs_ctl_global *g, int *rc);
int qs_ctl_refused(const qs_ctl_global *g, const char *cmd, const qs_rpc_status *st,
                   double timeout);
struct cJSON;
void qs_ctl_print_json(struct cJSON *j);

/* `qctl plan` without --daemon: the planner, locally (plan_cmd.c). */
int qs_ctl_plan(int argc, char **argv);

/* `qctl plan --svg FILE` (plan_svg.c): weight bytes of each scheme, and the
 * GPUs each needs against the size of one GPU, as a plain SVG chart; path
 * "-" is stdout. labels[i] names rows[i]. */
struct qs_model_config;
struct qs_quant;
struct qs_workload;
int qs_ctl_plan_svg(const char *path, const struct qs_model_config *m, const struct qs_quant *rows,
                    const char *const *labels, size_t n, const struct qs_workload *w, uint64_t dev);

#endif /* QS_CTL_H */
