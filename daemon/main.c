/* qdaemon: one MPI process per device; rank 0 also serves the gRPC API.
 *
 *   mpirun -np 2 qdaemon [--listen 127.0.0.1:50551] [--http 127.0.0.1:8000]
 *                        [--device-memory 16GiB]
 */
#define _POSIX_C_SOURCE 200809L
#include "qs_daemon.h"
#include "qs_shard.h" /* qs_parse_bytes */

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <mpi.h>

volatile sig_atomic_t qs_stop_signal;

static void on_signal(int sig)
{
    qs_stop_signal = sig;
}

static const char usage_text[] =
    "usage: mpirun -np N qdaemon [options]\n"
    "\n"
    "The qshard daemon: one MPI rank per device (local rank -> GPU, or a CPU device\n"
    "where no GPU is usable); rank 0 serves the gRPC API that qctl talks to.\n"
    "\n"
    "options:\n"
    "  --listen HOST:PORT     where rank 0 listens (default 127.0.0.1:50551; port 0\n"
    "                         picks a free port, see --address-file)\n"
    "  --http HOST:PORT       also serve HTTP on rank 0: GET /metrics (Prometheus),\n"
    "                         GET /health, and the OpenAI API: POST /v1/completions,\n"
    "                         POST /v1/chat/completions, GET /v1/models (default: off;\n"
    "                         port 0 picks a free port, see --http-address-file)\n"
    "  --allow-remote         allow non-loopback --listen and --http addresses; they also\n"
    "                         need TLS and an access token (or, for gRPC, client\n"
    "                         certificates)\n"
    "  --tls-cert FILE        TLS: rank 0's certificate chain (PEM), for gRPC and HTTP\n"
    "  --tls-key FILE         its private key (PEM)\n"
    "  --tls-client-ca FILE   mutual TLS: accept only gRPC clients whose certificate\n"
    "                         this CA (PEM) signed\n"
    "  --token-file FILE      an access token (the file's first line, 16 to 512\n"
    "                         characters): every request must carry 'authorization:\n"
    "                         Bearer TOKEN' (qctl --token-file; OpenAI clients' api_key)\n"
    "  --address-file PATH    write the bound HOST:PORT here once every rank is ready\n"
    "  --http-address-file PATH  the same for --http\n"
    "  --device-memory SIZE   memory of each CPU device, and a cap on each GPU's\n"
    "                         (binary units: 512MiB, 16GiB; default 16GiB)\n"
    "  --drain-timeout SECS   on SIGTERM or Shutdown, how long requests in flight may\n"
    "                         take to finish before they are cancelled (default 10)\n"
    "  --heartbeat SECS       rank 0's heartbeat when idle; the other ranks abort the\n"
    "                         job after 10 missed beats (default 1)\n"
    "  --rank-timeout SECS    rank 0 aborts the job when a rank takes longer than this\n"
    "                         to take a command (default 30)\n"
    "  --cache-dir DIR        the quantized-model cache: a file's first load with a\n"
    "                         scheme stores its quantized shards here, later loads read\n"
    "                         them (default $QSHARD_CACHE/quantized, else\n"
    "                         $XDG_CACHE_HOME/qshard/quantized, else\n"
    "                         ~/.cache/qshard/quantized; on each node for its ranks)\n"
    "  --cache-limit SIZE     evict the least recently used entries above this (default\n"
    "                         a quarter of the cache's file system)\n"
    "  --no-cache             neither read nor write the cache\n"
    "  --prefill-chunk N      prompt tokens per batch step, over all the prompts being\n"
    "                         read, so that a long one does not stall the running\n"
    "                         streams (default 256; a model's batch size is qctl load\n"
    "                         --max-batch)\n"
    "  --max-waiting N        generations that may wait for a place in a model's batch;\n"
    "                         more are refused with RESOURCE_EXHAUSTED (default 256)\n"
    "  --request-timeout SECS a generation's deadline when its client sets none: past\n"
    "                         it, it ends with DEADLINE_EXCEEDED (default 600; 0: none)\n"
    "  --log-level LEVEL      error, warn, info (default) or debug\n"
    "  --version              print the version and exit\n"
    "  -h, --help             print this help and exit\n"
    "\n"
    "Stop it with `qctl shutdown` or SIGTERM to rank 0 (both drain, then every rank\n"
    "exits 0). SIGTERM to mpirun also drains, but Open MPI kills the ranks after\n"
    "odls_base_sigkill_timeout (1 s) and exits non-zero.\n";

/* Rank from the launcher's environment, for messages printed before MPI_Init. */
static int env_rank(void)
{
    const char *names[] = {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const char *v = getenv(names[i]);
        if (v)
            return atoi(v);
    }
    return 0;
}

static int parse_seconds(const char *opt, const char *v, double lo, double *out)
{
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || *end || x < lo || x > 86400)
        return qs_seterr(QS_EINVAL, "%s takes seconds from %g to 86400, got '%s'", opt, lo, v);
    *out = x;
    return QS_OK;
}

/* Loopback always; anything else only with --allow-remote, TLS and a way to
 * tell clients apart (the access token, or for gRPC the clients'
 * certificates): the gRPC API can load models and shut the daemon down, the
 * HTTP one can run generations. */
static int check_listen(const char *opt, const char *example, const char *listen,
                        const qs_daemon_opts *o)
{
    const char *colon = strrchr(listen, ':');
    if (!colon || colon == listen || !colon[1])
        return qs_seterr(QS_EINVAL, "%s takes HOST:PORT, e.g. %s, got '%s'", opt, example, listen);
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || port < 0 || port > 65535)
        return qs_seterr(QS_EINVAL, "%s: '%s' is not a port (0..65535)", opt, colon + 1);
    char host[256];
    size_t n = (size_t)(colon - listen);
    if (n >= sizeof host)
        return qs_seterr(QS_EINVAL, "%s: the host name is too long", opt);
    memcpy(host, listen, n);
    host[n] = '\0';
    if (n >= 2 && host[0] == '[' && host[n - 1] == ']') {
        memmove(host, host + 1, n - 2);
        host[n - 2] = '\0';
    }
    unsigned char a[16];
    int loopback = strcmp(host, "localhost") == 0 ||
                   (inet_pton(AF_INET, host, a) == 1 && a[0] == 127) ||
                   (inet_pton(AF_INET6, host, a) == 1 &&
                    memcmp(a, "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\1", 16) == 0);
    if (loopback)
        return QS_OK;
    int grpc = strcmp(opt, "--listen") == 0;
    if (!o->allow_remote || !*o->tls_cert || !(*o->token_file || (grpc && *o->tls_client_ca)))
        return qs_seterr(QS_EINVAL,
                         "%s: refusing to listen on '%s', which is not a loopback address: "
                         "remote clients need --allow-remote with TLS (--tls-cert, --tls-key) "
                         "and an access token (--token-file)%s",
                         opt, listen, grpc ? " or client certificates (--tls-client-ca)" : "");
    return QS_OK;
}

/* 0: run; 1: exit 0 (help, version); 2: usage error (message printed). */
/* A whole number in [lo, hi]. */
static int parse_count(const char *opt, const char *val, unsigned long lo, unsigned long hi,
                       const char *what, uint32_t *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(val, &end, 10);
    if (errno || end == val || *end || v < lo || v > hi || val[0] == '-')
        return qs_seterr(QS_EINVAL, "%s '%s': give a whole number of %s from %lu to %lu", opt, val,
                         what, lo, hi);
    *out = (uint32_t)v;
    return QS_OK;
}

static int parse_args(int argc, char **argv, qs_daemon_opts *o, int print)
{
    memset(o, 0, sizeof *o);
    snprintf(o->listen, sizeof o->listen, "127.0.0.1:50551");
    o->device_memory = 16ull << 30;
    o->drain_timeout = 10;
    o->heartbeat = 1;
    o->rank_timeout = 30;
    o->prefill_chunk = QS_BATCH_PREFILL_CHUNK;
    o->max_waiting = 256;
    o->request_timeout = 600;
    o->log_level = QS_LOG_INFO;
    for (int i = 1; i < argc; i++) {
        char name[64];
        const char *a = argv[i], *val = NULL;
        const char *eq = strchr(a, '=');
        if (strncmp(a, "--", 2) == 0 && eq && (size_t)(eq - a) < sizeof name) {
            memcpy(name, a, (size_t)(eq - a));
            name[eq - a] = '\0';
            val = eq + 1;
        } else {
            snprintf(name, sizeof name, "%s", a);
        }
        if (!strcmp(name, "-h") || !strcmp(name, "--help")) {
            if (print)
                fputs(usage_text, stdout);
            return 1;
        }
        if (!strcmp(name, "--version")) {
            if (print)
                printf("qdaemon %s\n", QS_DAEMON_VERSION);
            return 1;
        }
        if (!strcmp(name, "--allow-remote")) {
            o->allow_remote = 1;
            continue;
        }
        if (!strcmp(name, "--no-cache")) {
            o->no_cache = 1;
            continue;
        }
        static const char *const takes[] = {
            "--listen",        "--address-file",  "--device-memory",
            "--drain-timeout", "--heartbeat",     "--log-level",
            "--rank-timeout",  "--http",          "--http-address-file",
            "--cache-dir",     "--cache-limit",   "--tls-cert",
            "--tls-key",       "--tls-client-ca", "--token-file",
            "--prefill-chunk", "--max-waiting",   "--request-timeout"};
        int known = 0;
        for (size_t k = 0; k < sizeof takes / sizeof takes[0]; k++)
            known |= !strcmp(name, takes[k]);
        if (!known) {
            if (print)
                fprintf(stderr, "qdaemon: unknown option '%s'\n\n%s", a, usage_text);
            return 2;
        }
        if (!val) {
            if (i + 1 >= argc) {
                if (print)
                    fprintf(stderr, "qdaemon: %s needs a value (see --help)\n", name);
                return 2;
            }
            val = argv[++i];
        }
        int err = QS_OK;
        if (!strcmp(name, "--listen")) {
            if (strlen(val) >= sizeof o->listen)
                err = qs_seterr(QS_EINVAL, "--listen: the address is too long");
            else
                snprintf(o->listen, sizeof o->listen, "%s", val);
        } else if (!strcmp(name, "--http")) {
            if (strlen(val) >= sizeof o->http || !*val)
                err = qs_seterr(QS_EINVAL, "--http takes HOST:PORT, e.g. 127.0.0.1:8000");
            else
                snprintf(o->http, sizeof o->http, "%s", val);
        } else if (!strcmp(name, "--address-file")) {
            if (strlen(val) >= sizeof o->address_file)
                err = qs_seterr(QS_EINVAL, "--address-file: the path is too long");
            else
                snprintf(o->address_file, sizeof o->address_file, "%s", val);
        } else if (!strcmp(name, "--http-address-file")) {
            if (strlen(val) >= sizeof o->http_address_file)
                err = qs_seterr(QS_EINVAL, "--http-address-file: the path is too long");
            else
                snprintf(o->http_address_file, sizeof o->http_address_file, "%s", val);
        } else if (!strcmp(name, "--device-memory")) {
            err = qs_parse_bytes(val, &o->device_memory);
            if (!err && o->device_memory < (1ull << 20))
                err = qs_seterr(QS_EINVAL, "--device-memory %s is below 1MiB", val);
            o->device_memory_given = 1;
        } else if (!strcmp(name, "--tls-cert") || !strcmp(name, "--tls-key") ||
                   !strcmp(name, "--tls-client-ca") || !strcmp(name, "--token-file")) {
            char *dst = !strcmp(name, "--tls-cert")     ? o->tls_cert
                        : !strcmp(name, "--tls-key")    ? o->tls_key
                        : !strcmp(name, "--token-file") ? o->token_file
                                                        : o->tls_client_ca;
            if (!*val || strlen(val) >= sizeof o->tls_cert)
                err = qs_seterr(QS_EINVAL, "%s takes a file path", name);
            else
                snprintf(dst, sizeof o->tls_cert, "%s", val);
        } else if (!strcmp(name, "--cache-dir")) {
            if (strlen(val) >= sizeof o->cache_dir - 64 || !*val)
                err = qs_seterr(QS_EINVAL, "--cache-dir: give a directory path under %zu bytes",
                                sizeof o->cache_dir - 64);
            else
                snprintf(o->cache_dir, sizeof o->cache_dir, "%s", val);
        } else if (!strcmp(name, "--cache-limit")) {
            err = qs_parse_bytes(val, &o->cache_limit);
            if (!err && o->cache_limit == 0)
                err = qs_seterr(QS_EINVAL, "--cache-limit 0: use --no-cache to turn it off");
        } else if (!strcmp(name, "--drain-timeout")) {
            err = parse_seconds(name, val, 0, &o->drain_timeout);
        } else if (!strcmp(name, "--heartbeat")) {
            err = parse_seconds(name, val, 0.01, &o->heartbeat);
        } else if (!strcmp(name, "--rank-timeout")) {
            err = parse_seconds(name, val, 1, &o->rank_timeout);
        } else if (!strcmp(name, "--prefill-chunk")) {
            err = parse_count(name, val, 1, 65536, "tokens", &o->prefill_chunk);
        } else if (!strcmp(name, "--request-timeout")) {
            err = parse_seconds(name, val, 0, &o->request_timeout);
        } else if (!strcmp(name, "--max-waiting")) {
            err = parse_count(name, val, 0, 1u << 20, "requests", &o->max_waiting);
        } else {
            err = qs_log_parse_level(val, &o->log_level);
        }
        if (err) {
            if (print)
                fprintf(stderr, "qdaemon: %s\n", qs_errmsg());
            return 2;
        }
    }
    if (!*o->tls_cert != !*o->tls_key || (*o->tls_client_ca && !*o->tls_cert)) {
        if (print)
            fprintf(stderr, "qdaemon: TLS needs both --tls-cert and --tls-key (and "
                            "--tls-client-ca needs them too)\n");
        return 2;
    }
    if (check_listen("--listen", "127.0.0.1:50551", o->listen, o) != QS_OK ||
        (o->http[0] && check_listen("--http", "127.0.0.1:8000", o->http, o))) {
        if (print)
            fprintf(stderr, "qdaemon: %s\n", qs_errmsg());
        return 2;
    }
    if (!o->cache_dir[0] &&
        qs_cache_path("quantized", o->cache_dir, sizeof o->cache_dir - 64) != QS_OK)
        o->no_cache = 1; /* nowhere to keep it */
    if (o->http_address_file[0] && !o->http[0]) {
        if (print)
            fprintf(stderr, "qdaemon: --http-address-file needs --http\n");
        return 2;
    }
    return 0;
}

/* Written under a temporary name and renamed, so that a reader never sees a
 * half-written address. */
static int write_address_file(const char *path, const char *addr)
{
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f)
        return qs_seterr(QS_EIO, "cannot write the address file '%s': %s", tmp, strerror(errno));
    int bad = fprintf(f, "%s\n", addr) < 0;
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path) != 0) {
        int e = errno;
        remove(tmp);
        return qs_seterr(QS_EIO, "cannot write the address file '%s': %s", path, strerror(e));
    }
    return QS_OK;
}

/* Two ranks of a node on one GPU halve its memory and time-slice it: say so.
 * Compared by PCI bus id, since device indices depend on what each rank sees
 * (CUDA_VISIBLE_DEVICES). */
static void warn_shared_gpus(const qs_daemon *d, MPI_Comm node)
{
    int n = 0;
    MPI_Comm_size(node, &n);
    char *ids = calloc((size_t)n, sizeof d->dev.pci);
    if (!ids)
        return;
    MPI_Allgather(d->dev.pci, (int)sizeof d->dev.pci, MPI_CHAR, ids, (int)sizeof d->dev.pci,
                  MPI_CHAR, node);
    for (int i = 0; i < d->local_rank && d->dev.pci[0]; i++) {
        if (strncmp(ids + (size_t)i * sizeof d->dev.pci, d->dev.pci, sizeof d->dev.pci) == 0) {
            qs_log(QS_LOG_WARN,
                   "local rank %d shares GPU %s with local rank %d: start no more ranks per node "
                   "than it has GPUs",
                   d->local_rank, d->dev.pci, i);
            break;
        }
    }
    free(ids);
}

int main(int argc, char **argv)
{
    qs_threads_setup(argv); /* may re-execute the daemon, once */
    qs_daemon d;
    memset(&d, 0, sizeof d);
    int pr = parse_args(argc, argv, &d.opts, env_rank() == 0);
    if (pr)
        return pr == 1 ? 0 : 2;

    /* Only the main thread calls MPI; rank 0's gRPC thread hands it work
     * through the job queue. FUNNELED keeps every MPI call in one thread, so
     * the collectives are issued in the same order on every rank without
     * locks, and avoids Open MPI's slower and less portable THREAD_MULTIPLE. */
    int provided = 0;
    if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
        fprintf(stderr, "qdaemon: MPI_Init_thread failed: start it with mpirun -np N qdaemon\n");
        return 1;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &d.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &d.world);
    MPI_Comm node;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, d.rank, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &d.local_rank);
    qs_log_init(d.opts.log_level, d.rank);
    qs_threads_init(d.rank);
    if (provided < MPI_THREAD_FUNNELED)
        qs_log(QS_LOG_WARN, "MPI provides thread level %d, below FUNNELED", provided);
    d.started = qs_now();
    atomic_init(&d.served, 0);
    pthread_mutex_init(&d.mu, NULL);
    pthread_cond_init(&d.cv, NULL);
    pthread_mutex_init(&d.catalog_mu, NULL);

    /* Every rank takes the signals; only rank 0 acts on them (mpirun forwards
     * SIGTERM to all ranks, and the leader decides when they exit). */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    /* Startup: every rank opens its device, rank 0 binds; then all agree. */
    int ok = 1;
    char why[600] = "";
    if (qs_device_init(&d.dev, d.local_rank, &d.opts) != QS_OK) {
        ok = 0;
        snprintf(why, sizeof why, "%s", qs_errmsg());
    } else {
        qs_log(QS_LOG_INFO, "rank %d/%d on %s: %s %s, budget %.2f GiB", d.rank, d.world,
               d.dev.hostname, d.dev.cuda ? "GPU" : "device", d.dev.name,
               (double)d.dev.budget / (double)(1ull << 30));
    }
    char bound[300] = "", http_bound[300] = "";
    if (ok && d.rank == 0) {
        if (qs_auth_load(&d.auth, &d.opts) != QS_OK || qs_metrics_init(&d.metrics) != QS_OK ||
            qs_server_start(&d, d.opts.listen, bound, sizeof bound, &d.server) != QS_OK) {
            ok = 0;
            snprintf(why, sizeof why, "%s", qs_errmsg());
        } else if (d.opts.http[0] && qs_http_start(&d, d.opts.http, http_bound, sizeof http_bound,
                                                   &d.http) != QS_OK) {
            ok = 0;
            snprintf(why, sizeof why, "%s", qs_errmsg());
        }
    }
    warn_shared_gpus(&d, node);
    MPI_Comm_free(&node);
    int all_ok = 0;
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!all_ok) {
        if (!ok)
            qs_log(QS_LOG_ERROR, "cannot start: %s", why);
        qs_http_close(d.http); /* it asks the gRPC server whether it drains */
        if (d.server) {
            qs_server_drain(d.server);
            qs_server_close(d.server);
        }
        qs_metrics_close(d.metrics);
        qs_auth_close(&d.auth);
        MPI_Finalize();
        return 1;
    }

    /* The communicator every model's group is split from (collective). */
    if (qs_models_init(&d) != QS_OK) {
        qs_log(QS_LOG_ERROR, "cannot start: %s", qs_errmsg());
        MPI_Abort(MPI_COMM_WORLD, 1);
    }

    int rc = 0;
    if (d.rank == 0) {
        /* The HTTP address first: whoever waits for the gRPC one may use both. */
        if ((d.opts.http_address_file[0] &&
             write_address_file(d.opts.http_address_file, http_bound) != QS_OK) ||
            (d.opts.address_file[0] && write_address_file(d.opts.address_file, bound) != QS_OK)) {
            qs_log(QS_LOG_ERROR, "%s", qs_errmsg());
            qs_server_drain(d.server);
            rc = 1;
        } else {
            qs_log(QS_LOG_INFO, "serving qshard.v1 on %s with %d rank(s)", bound, d.world);
            if (d.http)
                qs_log(QS_LOG_INFO, "serving HTTP (/metrics, /health, /v1) on %s", http_bound);
        }
        qs_ranks_lead(&d);
        /* Every job is answered: the HTTP threads end, and before the gRPC
         * server goes, which they ask whether the daemon drains. */
        qs_http_close(d.http);
        /* The server thread ends once its last call is done; if it is wedged,
         * exit without waiting for it. */
        if (qs_server_wait(d.server, 5))
            qs_server_close(d.server);
        else
            qs_log(QS_LOG_WARN, "the gRPC server did not stop in time");
        if (d.opts.address_file[0])
            remove(d.opts.address_file);
        if (d.opts.http_address_file[0])
            remove(d.opts.http_address_file);
        qs_log(QS_LOG_INFO, "stopped after %llu request(s)",
               (unsigned long long)atomic_load(&d.served));
    } else {
        qs_ranks_follow(&d);
    }
    qs_models_close(&d);
    qs_metrics_close(d.metrics);
    qs_auth_close(&d.auth);
    free(d.catalog);
    MPI_Finalize();
    return rc;
}
