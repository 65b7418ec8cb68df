/* qs_daemon.h: the header of daemon/, the qdaemon program.
 *
 * qdaemon runs as one MPI process per device. Rank 0 is the leader: a gRPC
 * thread (server.c) receives and validates requests and queues them as jobs;
 * rank 0's main thread, the only thread that calls MPI, broadcasts each job
 * as a command (ranks.c) that every rank runs (commands.c) and gathers the
 * replies, which rank 0 turns into the gRPC answer. An HTTP thread
 * (http.c, openai.c, metrics.c) queues the same jobs for the OpenAI API and
 * answers Prometheus scrapes.
 */
#ifndef QS_DAEMON_H
#define QS_DAEMON_H

#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "qs_kernels.h" /* qs_err, qs_seterr, qs_errmsg */
#include "qs_proto.h"

#define QS_DAEMON_VERSION "0.1.0"

/* ---- Logging (log.c) ------------------------------------------------------ */

typedef enum qs_log_level { QS_LOG_ERROR, QS_LOG_WARN, QS_LOG_INFO, QS_LOG_DEBUG } qs_log_level;

/* Parses "error", "warn", "info", "debug". */
int qs_log_parse_level(const char *s, qs_log_level *out);
/* Sets the threshold and the rank printed in every line. */
void qs_log_init(qs_log_level level, int rank);
int qs_log_enabled(qs_log_level level);
void qs_log(qs_log_level level, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* Seconds on the monotonic clock. */
double qs_now(void);

/* ---- Options (main.c) ----------------------------------------------------- */

typedef struct qs_daemon_opts {
    char listen[256];             /* HOST:PORT for rank 0's gRPC server */
    char http[256];               /* HOST:PORT for rank 0's HTTP server; "" for none */
    int allow_remote;             /* permit non-loopback listen and http addresses */
    char address_file[4096];      /* where to write the bound address; "" for none */
    char http_address_file[4096]; /* the same for the HTTP address */
    uint64_t device_memory;       /* CPU device budget; caps a GPU's when given */
    int device_memory_given;
    double drain_timeout; /* seconds to finish in-flight requests on shutdown */
    double heartbeat;     /* seconds between rank 0's heartbeats when idle */
    double rank_timeout;  /* seconds rank 0 waits for the ranks to take a command */
    qs_log_level log_level;
    /* TLS and the access token (auth.c): files, "" for none. */
    char tls_cert[4096], tls_key[4096], tls_client_ca[4096], token_file[4096];
    char cache_dir[4096];   /* the quantized-model cache (cache.c) */
    uint64_t cache_limit;   /* bytes; 0: a quarter of its file system */
    int no_cache;           /* never read or write it */
    uint32_t prefill_chunk; /* prompt tokens per batch step (sched.c) */
    uint32_t max_waiting;   /* generations waiting for a place, per model */
    double request_timeout; /* seconds a generation may take when its client set no
                             * deadline (sched.c); 0: no limit */
} qs_daemon_opts;

/* ---- Devices (device.c) --------------------------------------------------- */

typedef struct qs_device {
    int cuda;       /* 1: a CUDA GPU; 0: a CPU device */
    int index;      /* CUDA device index; -1 for CPU */
    char name[256]; /* cudaDeviceProp.name is 256 */
    char pci[32];   /* the GPU's PCI bus id; "" for a CPU device */
    char hostname[128];
    uint64_t total;
    uint64_t free;
    uint64_t budget;
    uint64_t used; /* bytes held by qshard's models (none yet) */
} qs_device;

/* Picks this rank's device: local_rank -> GPU when any is usable, else a CPU
 * device with the --device-memory budget. */
int qs_device_init(qs_device *dev, int local_rank, const qs_daemon_opts *o);
/* Re-reads free memory. */
int qs_device_refresh(qs_device *dev);

/* ---- The daemon ----------------------------------------------------------- */

typedef struct qs_daemon qs_daemon;
typedef struct qs_server qs_server;
typedef struct qs_call qs_call;
typedef struct qs_command qs_command;
typedef struct qs_http qs_http;       /* http.c */
typedef struct qs_metrics qs_metrics; /* metrics.c */

/* Where a job's answer goes: a gRPC call (server.c), an HTTP request
 * (openai.c) or the daemon itself (metrics.c). The commands speak to it in
 * packed protobuf messages, the same bytes whoever listens. */
typedef struct qs_sink_ops {
    /* One message on a stream (taken); QS_ECOMM once the receiver has gone. */
    int (*write)(void *ctx, grpc_byte_buffer *msg);
    /* The answer (reply taken, may be NULL): the first wins, later ones are
     * dropped. Any thread. */
    void (*finish)(void *ctx, grpc_status_code code, const char *details, grpc_byte_buffer *reply);
    /* 1 once the receiver wants nothing more: gone, cancelled, past its
     * deadline, or satisfied (a stop string was met). */
    int (*cancelled)(void *ctx);
    /* Drops the reference the job holds. */
    void (*release)(void *ctx);
    const char *(*peer)(void *ctx);
    /* 1 when the receiver set a deadline of its own (NULL: never). */
    int (*has_deadline)(void *ctx);
} qs_sink_ops;

typedef struct qs_sink {
    const qs_sink_ops *ops;
    void *ctx;
} qs_sink;

int qs_sink_write(const qs_sink *s, grpc_byte_buffer *msg);
void qs_sink_finish(const qs_sink *s, grpc_status_code code, const char *details,
                    grpc_byte_buffer *reply);
int qs_sink_cancelled(const qs_sink *s);
int qs_sink_has_deadline(const qs_sink *s);
/* Releases the sink and clears it; a cleared sink is a no-op everywhere. */
void qs_sink_release(qs_sink *s);
const char *qs_sink_peer(const qs_sink *s);

/* Where a Generate job stands, for the request gauges (metrics.c). */
enum { QS_JOB_NEW, QS_JOB_WAITING, QS_JOB_RUNNING, QS_JOB_DONE };

/* A request waiting for rank 0's main thread (queued by the gRPC or HTTP
 * thread). */
typedef struct qs_job {
    const qs_command *command;
    qs_sink sink;
    void *payload; /* the packed request, broadcast to every rank */
    size_t len;
    double queued; /* when it arrived (monotonic seconds) */
    /* Generate only (rank 0): the model, for the metrics; how rank 0 ended
     * it early: "stop" (a stop string) or "abort" (the receiver went). */
    char model[64];
    int state;                /* QS_JOB_* */
    struct qs_series *series; /* the model's metrics; NULL: not counted */
    const char *stopped;
    struct qs_job *next;
} qs_job;

typedef struct qs_served qs_served; /* a loaded model (models.c) */
typedef struct qs_sched qs_sched;   /* rank 0's generations (sched.c) */
typedef struct qs_comm qs_comm;     /* collectives/qs_collectives.h */

/* Who may use the daemon (auth.c). */
typedef struct qs_auth {
    char *cert_pem, *key_pem; /* TLS: rank 0's certificate chain and key; NULL: plaintext */
    char *client_ca_pem;      /* mutual TLS: the CA that signs the clients' */
    char bearer[530];         /* "Bearer TOKEN", or "" when no token is set */
} qs_auth;

struct qs_daemon {
    qs_daemon_opts opts;
    int rank, world, local_rank;
    qs_device dev;
    double started;
    atomic_uint_fast64_t served; /* requests answered */
    uint64_t seq;                /* commands broadcast so far */
    qs_server *server;           /* rank 0 only */
    qs_http *http;               /* rank 0 with --http only */
    qs_metrics *metrics;         /* rank 0 only */
    qs_auth auth;                /* rank 0 only */

    /* The job queue between the gRPC thread and rank 0's main thread. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    qs_job *head, *tail;
    int queue_closed;

    /* Models, the same list on every rank (models.c). */
    qs_comm *world_comm;
    qs_served **models;
    size_t nmodels;
    qs_sched *sched; /* rank 0: the generations in each model's batch */

    /* Rank 0: what the HTTP thread may know of the models, published by the
     * main thread after each Load and Unload (models.c). */
    pthread_mutex_t catalog_mu;
    struct qs_catalog_entry *catalog;
    size_t ncatalog;
};

/* Queue a job for the main thread; QS_EBUSY once the queue is closed. */
int qs_daemon_enqueue(qs_daemon *d, qs_job *job);
/* Answers the sink UNAVAILABLE unless it was answered, releases it, frees. */
void qs_job_free(qs_job *job);

/* Set by the SIGTERM/SIGINT handler; rank 0's main thread polls it. */
extern volatile sig_atomic_t qs_stop_signal;

/* A whole file of at most max bytes, NUL-terminated (*len bytes without the
 * NUL; len may be NULL), with a sentence when it cannot be (files.c). */
int qs_read_file(const char *path, size_t max, char **out, size_t *len);

/* ---- Who may use the daemon (auth.c) ----------------------------------------- */

/* Rank 0: reads the files the options name (a sentence on error). */
int qs_auth_load(qs_auth *a, const qs_daemon_opts *o);
void qs_auth_close(qs_auth *a);
/* NULL when a request whose "authorization" value is value[0..len) may go
 * on; else the sentence to refuse it with (UNAUTHENTICATED, HTTP 401). */
const char *qs_auth_refusal(const qs_auth *a, const char *value, size_t len);

/* ---- CPUs and threads (threads.c) -------------------------------------------- */

/* Before MPI_Init: pins the rank to its share of the node's CPUs, sets the
 * OpenMP thread count and wait policy, and re-executes the daemon once so
 * that the runtimes read them. */
void qs_threads_setup(char **argv);
/* After MPI_Init: OpenBLAS's thread count, and the choice in the log. */
void qs_threads_init(int rank);

/* ---- The quantized-model cache (cache.c) ----------------------------------- */

/* KEY (32 hex digits) of weights (a file or a safetensors directory) and
 * the options that change the quantized result. */
int qs_cache_key(const char *weights, const char *options, char key[33]);
/* "PATH:SIZE:MTIME" of a file, for options that name one (the calibration text). */
int qs_cache_file_identity(const char *path, char *out, size_t n);
/* 1 when the entry is whole and holds this rank's part. */
int qs_cache_has(const qs_daemon *d, const char *key, int rank, int size);
/* The entry's directory (created). */
int qs_cache_entry_dir(const qs_daemon *d, const char *key, char *out, size_t n);
typedef struct qs_cache_info {
    const char *source, *options, *scheme;
    int bits;
    uint32_t group, tp;
} qs_cache_info;
/* After every rank's part is in place: the entry becomes whole. */
int qs_cache_write_manifest(const qs_daemon *d, const char *key, const qs_cache_info *info);
/* Marks a use (least recently used entries are evicted first). */
void qs_cache_touch(const qs_daemon *d, const char *key);
/* Throws away this rank's part and the manifest (a damaged entry). */
void qs_cache_remove(const qs_daemon *d, const char *key, int rank, int size);
/* Evicts least recently used entries (never `keep`) until under the limit;
 * the bytes freed. */
uint64_t qs_cache_evict(const qs_daemon *d, const char *keep);
uint64_t qs_cache_limit(const qs_daemon *d);
uint64_t qs_cache_clear(const qs_daemon *d);
/* Fills r's dir, entries, bytes and limit; qs_cache_list_free frees them. */
int qs_cache_list(const qs_daemon *d, Qshard__V1__CacheReply *r);
void qs_cache_list_free(Qshard__V1__CacheReply *r);

/* ---- Commands (commands.c) ------------------------------------------------ */

/* Opcodes of the broadcast header. EXIT and HEARTBEAT carry no payload. */
enum {
    QS_OP_EXIT = 1,
    QS_OP_HEARTBEAT,
    QS_OP_PING,
    QS_OP_STATS,
    QS_OP_PLAN,
    QS_OP_LOAD,
    QS_OP_UNLOAD,
    QS_OP_GENERATE,
    QS_OP_EVAL,
    QS_OP_BENCH,
    QS_OP_CACHE,
    QS_OP_STEP /* internal: one continuous-batching step (sched.c) */
};

/* A command as every rank sees it. */
typedef struct qs_cmd {
    uint32_t op;
    int32_t group; /* 0: the world; later a model's group */
    uint64_t seq;
    ProtobufCMessage *req; /* the request, unpacked on this rank */
    qs_job *job;           /* rank 0 only: the call being served (streams) */
} qs_cmd;

/* A growable byte buffer: one rank's part of a reply. */
typedef struct qs_buf {
    void *data;
    size_t len;
} qs_buf;

/* One rank's answer, as gathered on rank 0. */
typedef struct qs_part {
    int err;         /* qs_err of that rank's run */
    const char *msg; /* err != 0: its sentence (NUL-terminated) */
    const void *data;
    size_t len;
} qs_part;

struct qs_command {
    const char *method; /* full gRPC path */
    uint32_t op;        /* 0: answered by rank 0's gRPC thread, no ranks involved */
    const ProtobufCMessageDescriptor *request;
    double timeout; /* seconds rank 0 waits for the ranks' replies; 0: no limit */
    int drains;     /* answering it starts the drain (Shutdown) */
    /* Rank 0, gRPC thread: refuses a bad request before any rank sees it. */
    int (*validate)(qs_daemon *d, const ProtobufCMessage *req);
    /* Rank 0, gRPC or HTTP thread, op == 0 only: the whole answer. */
    int (*answer)(qs_daemon *d, const qs_sink *sink, const ProtobufCMessage *req,
                  grpc_byte_buffer **reply);
    /* Every rank: runs the command on this rank's device; fills out. */
    int (*run)(qs_daemon *d, const qs_cmd *cmd, qs_buf *out);
    /* Rank 0: builds the reply from every rank's part (parts[r] for rank r). */
    int (*reply)(qs_daemon *d, const qs_cmd *cmd, const qs_part *parts, double seconds,
                 grpc_byte_buffer **reply);
    /* Rank 0, instead of reply: takes the job over, to answer it later
     * (Generate: the scheduler streams it). Non-zero: it answered the sink. */
    int (*admit)(qs_daemon *d, const qs_cmd *cmd, const qs_part *parts);
    /* Rank 0, an internal command (no job, no client): the parts. */
    void (*done)(qs_daemon *d, const qs_cmd *cmd, const qs_part *parts);
};

extern const qs_command qs_commands[];
extern const size_t qs_command_count;
const qs_command *qs_command_for_op(uint32_t op);

/* Rank 0, gRPC thread: unpack, then qs_submit. */
void qs_dispatch(qs_daemon *d, qs_call *call, const qs_command *c, grpc_byte_buffer *bb);
/* Rank 0, any thread but the main one: validate req (which stays the
 * caller's), then answer it or queue it as a job. The sink is answered and
 * released either way. */
void qs_submit(qs_daemon *d, qs_sink sink, const qs_command *c, const ProtobufCMessage *req);
/* The command that serves a gRPC method path; NULL if none. */
const qs_command *qs_command_for_method(const char *method);

/* Rank 0: one message on a server-streaming call; QS_ECOMM once the client
 * has gone (the command should stop). A no-op on other ranks. */
int qs_cmd_stream(const qs_cmd *cmd, const void *msg);
/* Rank 0: 1 once the receiver of the command's answer wants nothing more. */
int qs_cmd_cancelled(const qs_cmd *cmd);

/* Request quantization -> qs_quant with defaults filled in (m may be NULL:
 * the default group is then 128). */
struct qs_model_config;
struct qs_quant;
int qs_quant_resolve(const Qshard__V1__Quantization *in, const struct qs_model_config *m,
                     struct qs_quant *out);
/* qs_quant -> its message (the strings are static). */
void qs_quant_fill(const struct qs_quant *q, Qshard__V1__Quantization *out);

/* The gRPC status for a qs_err. */
grpc_status_code qs_err_status(int err);

/* ---- Models (models.c) ---------------------------------------------------- */

/* Collective over the world at start-up: the communicator models split from. */
int qs_models_init(qs_daemon *d);
void qs_models_close(qs_daemon *d);
/* NULL (and a message) when no model has that name. */
qs_served *qs_models_find(const qs_daemon *d, const char *name);
/* This rank's bytes over the models it serves. */
void qs_models_device(const qs_daemon *d, uint64_t *weights, uint64_t *kv, uint64_t *workspace,
                      uint32_t *count);
/* Rank 0: the registry as messages, with footprints on devices of
 * device_mem bytes; free with qs_models_info_free. */
int qs_models_info(const qs_daemon *d, uint64_t device_mem, Qshard__V1__ModelInfo ***out,
                   size_t *n);
void qs_models_info_free(Qshard__V1__ModelInfo **infos, size_t n);

int qs_model_run_load(qs_daemon *d, const qs_cmd *cmd, qs_buf *out);
int qs_model_reply_load(qs_daemon *d, const qs_cmd *cmd, const qs_part *parts, double seconds,
                        grpc_byte_buffer **reply);
int qs_model_run_unload(qs_daemon *d, const qs_cmd *cmd, qs_buf *out);
/* Every rank: admits the request into the model's batch (sched.c steps it). */
int qs_model_run_generate(qs_daemon *d, const qs_cmd *cmd, qs_buf *out);
int qs_model_run_eval(qs_daemon *d, const qs_cmd *cmd, qs_buf *out);
int qs_model_reply_eval(qs_daemon *d, const qs_cmd *cmd, const qs_part *parts, double seconds,
                        grpc_byte_buffer **reply);

/* The catalog: what the HTTP thread may read of the loaded models without
 * racing the main thread. Rank 0 publishes it after each Load and Unload. */
enum { QS_CHAT_NONE, QS_CHAT_CHATML, QS_CHAT_OTHER };
typedef struct qs_catalog_entry {
    char name[64];
    int chat;         /* QS_CHAT_*: the GGUF's tokenizer.chat_template, by kind */
    char system[256]; /* ChatML: the template's default system message, "" for none */
    int tokenizer;    /* 1: text prompts; 0: bytes as token ids (synthetic) */
    uint32_t max_seq; /* KV-cache tokens per sequence */
    double created;   /* Unix time of the load */
} qs_catalog_entry;
/* A copy of the catalog (free() it; *out may be NULL when *n is 0). */
int qs_models_catalog(qs_daemon *d, qs_catalog_entry **out, size_t *n);
/* 1 and *out when a model of that name is loaded, else 0. */
int qs_models_catalog_find(qs_daemon *d, const char *name, qs_catalog_entry *out);

/* sched.c's view of a model. */
struct qs_batch;
struct qs_batch *qs_served_batch(const qs_served *s); /* NULL outside the group */
int qs_served_leader(const qs_served *s);
uint32_t qs_served_capacity(const qs_served *s);
uint32_t qs_served_max_seq(const qs_served *s);
double qs_served_comm_ms(const qs_served *s);
/* Members: ends every sequence of the batch (after a failed step). */
void qs_served_batch_clear(qs_served *s);
/* The text of token id; *control: a control token. */
const char *qs_served_piece(const qs_served *s, int32_t id, char *buf, size_t n, int *control);
/* Rank 0: a token latency (< 0: none), and tokens and decode seconds of a
 * generation, for ModelInfo. */
void qs_served_count(qs_served *s, double latency_ms, uint32_t tokens, double decode_s);

/* ---- Continuous batching (sched.c), rank 0 unless said ------------------- */

/* Before a job runs: a Generate whose model's batch is full waits here, or
 * is refused when --max-waiting wait already (1: taken); an Unload first
 * ends the model's generations. */
int qs_sched_take(qs_daemon *d, qs_job *job);
/* Generate's admit: the job is now a running generation. */
int qs_sched_admit(qs_daemon *d, const qs_cmd *cmd, const qs_part *parts);
/* 1 while any model has generations running, waiting or to be dropped. */
int qs_sched_busy(const qs_daemon *d);
/* One round: for each model, the waiting that fit are admitted and one
 * step runs. */
void qs_sched_lead(qs_daemon *d);
/* Ends the model's generations, with why as their callers' error. */
void qs_sched_forget(qs_daemon *d, const char *model, const char *why);
void qs_sched_close(qs_daemon *d, const char *why);
void qs_sched_counts(const qs_daemon *d, const char *model, uint32_t *running, uint32_t *waiting);
/* Every rank: the STEP command; rank 0: its parts. */
int qs_sched_run_step(qs_daemon *d, const qs_cmd *cmd, qs_buf *out);
void qs_sched_step_done(qs_daemon *d, const qs_cmd *cmd, const qs_part *parts);

/* ---- Rank 0's commands (ranks.c) ------------------------------------------ */

/* Runs a job as a command on every rank and answers it (or hands it over). */
void qs_ranks_run_job(qs_daemon *d, qs_job *job);
/* Runs an internal command (commands.c's internal table). */
void qs_ranks_internal(qs_daemon *d, uint32_t op, const ProtobufCMessage *req);

/* Bench (bench.c): kernel timings on each rank asked. */
int qs_run_bench(qs_daemon *d, const qs_cmd *cmd, qs_buf *out);
int qs_reply_bench(qs_daemon *d, const qs_cmd *cmd, const qs_part *parts, double seconds,
                   grpc_byte_buffer **reply);

/* ---- Metrics (metrics.c), rank 0 only ------------------------------------ */

int qs_metrics_init(qs_metrics **out);
void qs_metrics_close(qs_metrics *m);
/* Rank 0, after a Load: the model's series (kept after an Unload, so that
 * counters never go back), and the load's durations. */
void qs_metrics_model(qs_metrics *m, const char *model, double load_s, double quantize_s);
/* A Generate job moves to state (QS_JOB_*): the running and waiting gauges,
 * the queue time (on RUNNING) and the aborted requests. Any thread. */
void qs_metrics_job(qs_metrics *m, qs_job *job, int state);
/* Rank 0 streamed a token of job: the time to first token or the latency
 * since the previous one; kv_used of kv_size cache tokens now held. */
void qs_metrics_token(qs_metrics *m, const qs_job *job, int first, double seconds, uint32_t kv_used,
                      uint32_t kv_size);
/* A generation ended: its tokens, why (OpenAI's "stop", "length" or
 * "abort"), its decode and all-reduce seconds. */
void qs_metrics_generated(qs_metrics *m, const qs_job *job, uint32_t prompt, uint32_t generated,
                          const char *reason, double decode_s, double allreduce_s);
/* The Prometheus text exposition of everything (malloc'ed). Asks the ranks
 * for fresh device figures when they are older than a second and waits up
 * to wait seconds for them; otherwise serves the last ones. */
int qs_metrics_render(qs_daemon *d, double wait, char **text, size_t *len);

/* ---- HTTP server (http.c, openai.c), rank 0 only -------------------------- */

/* Binds listen (port 0: a free one) and starts serving /metrics, /health and
 * the OpenAI API (/v1/...). *bound receives the address bound. */
int qs_http_start(qs_daemon *d, const char *listen, char *bound, size_t bound_size, qs_http **out);
/* Requests started and not yet answered (the drain waits for them). */
int qs_http_in_flight(qs_http *h);
/* Stops accepting and ends the connections (after the drain). */
void qs_http_close(qs_http *h);

/* ---- The OpenAI API (openai.c), served by http.c -------------------------- */

typedef struct qs_oa qs_oa; /* one request */

/* An HTTP answer: a whole body, or a stream of server-sent events. */
typedef struct qs_http_reply {
    unsigned status;
    const char *type; /* Content-Type */
    char *body;       /* malloc'ed; NULL for a stream */
    size_t len;
    qs_oa *stream; /* read it with qs_openai_read until 0, then qs_openai_close */
} qs_http_reply;

/* http.c's probe: 1 once the client of ctx has hung up. Called with the
 * request's lock held, never after qs_openai_close. */
typedef int (*qs_http_gone_fn)(void *ctx);

/* Serves METHOD /v1/... with its body; blocks until the answer is known (a
 * stream: until its first event, so that a refusal gets its own status). */
void qs_openai_serve(qs_daemon *d, const char *method, const char *path, const char *body,
                     size_t len, const char *peer, qs_http_gone_fn gone, void *gone_ctx,
                     qs_http_reply *out);
/* The next bytes of a stream, waiting for them; 0 once it has ended. */
size_t qs_openai_read(qs_oa *o, char *buf, size_t max);
/* The connection is done with the stream (whether it ended or not). */
void qs_openai_close(qs_oa *o);
/* An answer in OpenAI's error shape: {"error": {"message", "type", "param",
 * "code"}}. */
void qs_openai_error(qs_http_reply *out, unsigned status, const char *code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

/* ---- Rank coordination (ranks.c) ----------------------------------------- */

/* Every rank: the loop of the non-zero ranks; returns at EXIT. */
int qs_ranks_follow(qs_daemon *d);
/* Rank 0, main thread: serves the job queue until drained, then broadcasts
 * EXIT. */
int qs_ranks_lead(qs_daemon *d);

/* ---- gRPC server (server.c), rank 0 only ---------------------------------- */

/* Binds (port 0: a free one), starts the completion-queue thread. *bound
 * receives the address actually bound, e.g. "127.0.0.1:43121". */
int qs_server_start(qs_daemon *d, const char *listen, char *bound, size_t bound_size,
                    qs_server **out);
/* Stops accepting; requests in flight go on until --drain-timeout, when the
 * server cancels them. Idempotent, any thread. */
void qs_server_drain(qs_server *s);
int qs_server_draining(qs_server *s);
/* 1 once draining has gone on past --drain-timeout. */
int qs_server_drain_expired(qs_server *s);
/* Calls started and not yet finished. */
int qs_server_in_flight(qs_server *s);
/* Waits up to timeout seconds for the server to finish its shutdown; 1 when it
 * did. */
int qs_server_wait(qs_server *s, double timeout);
void qs_server_close(qs_server *s);

/* The call as the sink a job answers (it takes the handler's reference). */
qs_sink qs_call_sink(qs_call *call);
/* Answers a call (any thread; the first answer wins, later ones are
 * dropped): status, details and an optional reply message (taken). */
void qs_call_finish(qs_call *call, grpc_status_code code, const char *details,
                    grpc_byte_buffer *reply);
/* Drops the handler's reference: qs_dispatch receives it with the call and
 * hands it to the job, which releases it in qs_job_free. */
void qs_call_release(qs_call *call);
/* Streams one message (taken) on a server-streaming call and waits until it
 * is written; QS_ECOMM when the client has gone. */
int qs_call_write(qs_call *call, grpc_byte_buffer *msg);
/* 1 once the client cancelled or the deadline passed. */
int qs_call_cancelled(qs_call *call);
const char *qs_call_peer(qs_call *call);

#endif /* QS_DAEMON_H */
