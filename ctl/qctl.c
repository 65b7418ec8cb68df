/* qctl: the command-line client of qdaemon.
 *
 *   qctl [--addr HOST:PORT] [--json] COMMAND [options]
 */
#define _POSIX_C_SOURCE 200809L
#include "qs_ctl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char usage[] =
    "usage: qctl [--addr HOST:PORT] [--json] COMMAND [options]\n"
    "\n"
    "The client of qdaemon, the qshard inference daemon.\n"
    "\n"
    "commands:\n"
    "  plan MODEL        memory and GPUs a model needs (locally; --daemon: on the\n"
    "                    daemon's own devices; --svg FILE: also as a chart)\n"
    "  load MODEL        quantize and load a model across the daemon's ranks\n"
    "  unload NAME       free a loaded model\n"
    "  stats             devices, memory and loaded models\n"
    "  generate M TEXT   stream a continuation of TEXT\n"
    "  eval M            perplexity on a text\n"
    "  bench             time a quantized kernel against the BLAS baseline\n"
    "  bench-serve M     many generations at once: throughput and latencies\n"
    "  cache [list|clear]  the daemon's cache of quantized models\n"
    "  health            whether the daemon serves (exit 0) or not (exit 1)\n"
    "  shutdown          drain and stop the daemon\n"
    "\n"
    "options (before or after the command):\n"
    "  --addr HOST:PORT          the daemon (default $QSHARD_ADDR, else " QS_CTL_DEFAULT_ADDR ")\n"
    "  --json                    print the answer as JSON\n"
    "  --timeout SECS            give up on the answer after SECS\n"
    "  --connect-timeout SECS    give up connecting after SECS (default 5)\n"
    "  --tls-ca FILE             TLS: the CA (PEM) that signed the daemon's certificate\n"
    "  --tls-cert FILE, --tls-key FILE   mutual TLS: this client's certificate and key\n"
    "  --token-file FILE         the daemon's access token (its first line)\n"
    "                            (defaults: $QSHARD_TLS_CA, $QSHARD_TLS_CERT,\n"
    "                            $QSHARD_TLS_KEY, $QSHARD_TOKEN_FILE)\n"
    "  -h, --help                help; `qctl COMMAND --help` for a command's options\n"
    "\n"
    "exit codes: 0 ok, 1 the daemon refused (the reason is printed), 2 usage,\n"
    "3 the daemon is unreachable\n";

typedef int (*cmd_fn)(qs_ctl_global *g, int argc, char **argv);

static const struct {
    const char *name;
    cmd_fn fn;
} commands[] = {
    {"health", qs_ctl_health},     {"stats", qs_ctl_stats},
    {"load", qs_ctl_load},         {"unload", qs_ctl_unload},
    {"generate", qs_ctl_generate}, {"eval", qs_ctl_eval},
    {"bench", qs_ctl_bench},       {"bench-serve", qs_ctl_bench_serve},
    {"shutdown", qs_ctl_shutdown}, {"cache", qs_ctl_cache},
};

static int usage_error(const char *fmt, const char *arg)
{
    fprintf(stderr, "qctl: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\nrun 'qctl --help' for the commands\n");
    return QS_EXIT_USAGE;
}

int main(int argc, char **argv)
{
    qs_ctl_global g = {.json = 0, .timeout = -1, .connect_timeout = 5};
    /* qctl says what failed in its own sentence; the gRPC core's log lines
     * (a TLS handshake's, for one) would only repeat it. */
    setenv("GRPC_VERBOSITY", "NONE", 0);
    const char *env = getenv("QSHARD_ADDR");
    snprintf(g.addr, sizeof g.addr, "%s", env && *env ? env : QS_CTL_DEFAULT_ADDR);
    const struct {
        const char *var, *opt;
        char *dst;
    } files[] = {{"QSHARD_TLS_CA", "--tls-ca", g.tls_ca},
                 {"QSHARD_TLS_CERT", "--tls-cert", g.tls_cert},
                 {"QSHARD_TLS_KEY", "--tls-key", g.tls_key},
                 {"QSHARD_TOKEN_FILE", "--token-file", g.token_file}};
    for (size_t k = 0; k < sizeof files / sizeof files[0]; k++) {
        const char *v = getenv(files[k].var);
        if (v && *v)
            snprintf(files[k].dst, sizeof g.tls_ca, "%s", v);
    }

    /* Options before the command; the command's own parser takes the same
     * ones after it. */
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(usage, stdout);
            return QS_EXIT_OK;
        } else if (!strcmp(a, "--version")) {
            puts("qctl 0.1.0");
            return QS_EXIT_OK;
        } else if (!strcmp(a, "--json")) {
            g.json = 1;
        } else if (!strcmp(a, "--addr") || !strcmp(a, "--timeout") ||
                   !strcmp(a, "--connect-timeout")) {
            if (i + 1 >= argc)
                return usage_error("%s needs a value", a);
            const char *v = argv[++i];
            char *end;
            if (!strcmp(a, "--addr")) {
                if (!*v || strlen(v) >= sizeof g.addr)
                    return usage_error("--addr takes HOST:PORT, got '%s'", v);
                snprintf(g.addr, sizeof g.addr, "%s", v);
            } else {
                double x = strtod(v, &end);
                if (!*v || *end || x < 0 || (x == 0 && !strcmp(a, "--connect-timeout")))
                    return usage_error("expected seconds, got '%s'", v);
                *(strcmp(a, "--timeout") ? &g.connect_timeout : &g.timeout) = x;
            }
        } else if (!strncmp(a, "--addr=", 7)) {
            snprintf(g.addr, sizeof g.addr, "%s", a + 7);
        } else if (!strcmp(a, "--tls-ca") || !strcmp(a, "--tls-cert") || !strcmp(a, "--tls-key") ||
                   !strcmp(a, "--token-file")) {
            if (i + 1 >= argc || !*argv[i + 1] || strlen(argv[i + 1]) >= sizeof g.tls_ca)
                return usage_error("%s takes a file path", a);
            for (size_t k = 0; k < sizeof files / sizeof files[0]; k++)
                if (!strcmp(a, files[k].opt))
                    snprintf(files[k].dst, sizeof g.tls_ca, "%s", argv[i + 1]);
            i++;
        } else {
            return usage_error("unknown option '%s'", a);
        }
    }
    if (i >= argc) {
        fputs(usage, stderr);
        return QS_EXIT_USAGE;
    }
    const char *name = argv[i];
    int cargc = argc - i;
    char **cargv = argv + i;

    if (!strcmp(name, "plan")) {
        /* `plan --daemon` asks the daemon; plain `plan` is local and knows
         * nothing of --addr. */
        for (int k = 1; k < cargc; k++)
            if (!strcmp(cargv[k], "--daemon"))
                return qs_ctl_plan_daemon(&g, cargc, cargv);
        if (g.json) {
            /* --json given before the command: hand it to the planner. */
            char **v = calloc((size_t)cargc + 2, sizeof *v);
            if (!v)
                return 1;
            memcpy(v, cargv, sizeof *v * (size_t)cargc);
            v[cargc] = "--json";
            int rc = qs_ctl_plan(cargc + 1, v);
            free(v);
            return rc;
        }
        return qs_ctl_plan(cargc, cargv);
    }
    for (size_t k = 0; k < sizeof commands / sizeof commands[0]; k++)
        if (!strcmp(name, commands[k].name))
            return commands[k].fn(&g, cargc, cargv);
    return usage_error("unknown command '%s'", name);
}
