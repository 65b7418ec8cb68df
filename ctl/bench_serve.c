/* qctl bench-serve: a serving benchmark, as `vllm bench serve` runs one.
 *
 * --requests Generate calls, at most --concurrency in flight, each started
 * as soon as a stream is free or, with --rate R, at Poisson arrival times of
 * R per second (seeded). Prompts are windows of --prompt-words words of a
 * text file, read where qctl runs; every request asks for --max-tokens
 * tokens and ignores EOS, so that each produces the same count. Each stream
 * is a thread with its own connection.
 *
 * Reported: request throughput, output tokens/s, time to first token (from
 * the moment the request was due), inter-token latency and end-to-end
 * latency at p50, p90 and p99, as a table or --json. */
#define _POSIX_C_SOURCE 200809L
#include "qs_ctl.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

static const char bench_serve_help[] =
    "usage: qctl bench-serve MODEL [options]\n"
    "\nA serving benchmark: many generations at once against a loaded model, with the\n"
    "throughput and the latencies users see (time to first token, inter-token\n"
    "latency, end to end) at p50, p90 and p99.\n"
    "\noptions:\n"
    "  --model NAME         a loaded model (or the first argument)\n"
    "  --concurrency N      streams in flight at most (default 16)\n"
    "  --requests N         generations in all (default 4 x concurrency)\n"
    "  --rate R             requests per second, Poisson arrivals (default: all at once)\n"
    "  --prompts FILE       text whose word windows are the prompts (default:\n"
    "                       ../shared/data/wikitext-2-raw/wiki.test.raw if present)\n"
    "  --prompt-words N     words per prompt (default 32)\n"
    "  --max-tokens N       tokens each generation produces, EOS ignored (default 64)\n"
    "  --seed N             prompt choice and arrival times (default 1)\n";

typedef struct req_result {
    double due, first, end; /* seconds since the start */
    double *itl;            /* gaps between tokens, seconds */
    uint32_t tokens, itl_cap;
    int ok;
    char error[1100];
} req_result;

typedef struct bench {
    qs_ctl_global *g;
    const char *model;
    char **prompts;
    uint32_t nreq, max_tokens;
    double t0;
    double *due;
    req_result *res;
    pthread_mutex_t mu;
    uint32_t next;
} bench;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

typedef struct stream_ctx {
    req_result *r;
    double t0, last;
} stream_ctx;

static int on_msg(ProtobufCMessage *msg, void *ud)
{
    stream_ctx *s = ud;
    Qshard__V1__GenerateEvent *ev = (Qshard__V1__GenerateEvent *)msg;
    if (ev->event_case == QSHARD__V1__GENERATE_EVENT__EVENT_TOKEN) {
        double t = now() - s->t0;
        req_result *r = s->r;
        if (r->tokens == 0)
            r->first = t;
        else if (r->tokens - 1 < r->itl_cap)
            r->itl[r->tokens - 1] = t - s->last;
        s->last = t;
        r->tokens++;
    }
    protobuf_c_message_free_unpacked(msg, NULL);
    return 0;
}

static void *stream_main(void *arg)
{
    bench *b = arg;
    int rc = 0;
    qs_client *c = qs_ctl_connect(b->g, &rc);
    for (;;) {
        pthread_mutex_lock(&b->mu);
        uint32_t i = b->next < b->nreq ? b->next++ : b->nreq;
        pthread_mutex_unlock(&b->mu);
        if (i == b->nreq)
            break;
        req_result *r = &b->res[i];
        r->due = b->due[i];
        double wait = b->t0 + r->due - now();
        if (wait > 0) {
            struct timespec ts = {(time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9)};
            nanosleep(&ts, NULL);
        }
        if (!c) {
            snprintf(r->error, sizeof r->error, "no connection to the daemon");
            continue;
        }
        Qshard__V1__GenerateRequest q = QSHARD__V1__GENERATE_REQUEST__INIT;
        q.model = (char *)b->model;
        q.prompt = b->prompts[i];
        q.max_tokens = b->max_tokens;
        q.ignore_eos = 1;
        stream_ctx s = {r, b->t0, 0};
        qs_rpc_status st;
        if (qs_client_call(c, QS_METHOD_GENERATE, &q.base, &qshard__v1__generate_event__descriptor,
                           0, on_msg, &s, &st) == 0)
            r->ok = 1;
        else
            snprintf(r->error, sizeof r->error, "%s (%s)", st.details,
                     qs_proto_status_name(st.code));
        r->end = now() - b->t0;
    }
    qs_client_close(c);
    return NULL;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* p in [0, 100] of sorted v (nearest rank). */
static double pct(const double *v, size_t n, double p)
{
    if (!n)
        return 0;
    size_t k = (size_t)ceil(p / 100.0 * (double)n);
    return v[k ? k - 1 : 0];
}

static char *read_text(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = NULL;
    size_t cap = 0, n = 0, k;
    do {
        if (n + 65536 > cap) {
            cap = (n + 65536) * 2;
            char *t = realloc(buf, cap + 1);
            if (!t || cap > (256u << 20)) {
                free(t ? t : buf);
                fclose(f);
                return NULL;
            }
            buf = t;
        }
        k = fread(buf + n, 1, cap - n, f);
        n += k;
    } while (k > 0);
    fclose(f);
    buf[n] = '\0';
    *len = n;
    return buf;
}

/* The text's words (whitespace-separated, in place). */
static size_t split_words(char *text, char ***out)
{
    size_t n = 0, cap = 0;
    char **w = NULL, *save = NULL;
    for (char *t = strtok_r(text, " \t\r\n", &save); t; t = strtok_r(NULL, " \t\r\n", &save)) {
        if (n == cap) {
            cap = cap ? 2 * cap : 4096;
            char **x = realloc(w, cap * sizeof *x);
            if (!x)
                break;
            w = x;
        }
        w[n++] = t;
    }
    *out = w;
    return n;
}

static uint64_t rng_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12, x ^= x << 25, x ^= x >> 27;
    *s = x;
    return x * 0x2545f4914f6cdd1dull;
}

static void add_pcts(cJSON *j, const char *name, const double *v, size_t n)
{
    cJSON *o = cJSON_AddObjectToObject(j, name);
    cJSON_AddNumberToObject(o, "p50", pct(v, n, 50));
    cJSON_AddNumberToObject(o, "p90", pct(v, n, 90));
    cJSON_AddNumberToObject(o, "p99", pct(v, n, 99));
}

int qs_ctl_bench_serve(qs_ctl_global *g, int argc, char **argv)
{
    qs_args a = {.cmd = "bench-serve", .help = bench_serve_help, .argc = argc, .argv = argv};
    const char *model = NULL, *path = NULL, *v;
    uint32_t conc = 16, nreq = 0, words = 32, max_tokens = 64, seed32 = 1;
    double rate = 0;
    for (a.i = 1; a.i < argc && !a.err; a.i++) {
        if (!qs_ctl_next_arg(g, &a))
            continue;
        if (qs_ctl_opt_val(&a, "--model", &v))
            model = v;
        else if (qs_ctl_opt_val(&a, "--concurrency", &v))
            qs_ctl_parse_u32(&a, "--concurrency", v, &conc);
        else if (qs_ctl_opt_val(&a, "--requests", &v))
            qs_ctl_parse_u32(&a, "--requests", v, &nreq);
        else if (qs_ctl_opt_val(&a, "--rate", &v))
            qs_ctl_parse_double(&a, "--rate", v, &rate);
        else if (qs_ctl_opt_val(&a, "--prompts", &v))
            path = v;
        else if (qs_ctl_opt_val(&a, "--prompt-words", &v))
            qs_ctl_parse_u32(&a, "--prompt-words", v, &words);
        else if (qs_ctl_opt_val(&a, "--max-tokens", &v))
            qs_ctl_parse_u32(&a, "--max-tokens", v, &max_tokens);
        else if (qs_ctl_opt_val(&a, "--seed", &v))
            qs_ctl_parse_u32(&a, "--seed", v, &seed32);
        else if (argv[a.i][0] != '-' && !model)
            model = argv[a.i];
        else
            qs_ctl_unknown_arg(&a);
    }
    if (!a.err && !model)
        qs_ctl_usage(&a, "give a loaded model, e.g. qctl bench-serve smollm2-135m");
    if (!a.err && (conc < 1 || conc > 1024))
        qs_ctl_usage(&a, "--concurrency takes 1 to 1024 streams");
    if (!a.err && (words < 1 || words > 4096 || max_tokens < 1 || rate < 0))
        qs_ctl_usage(&a, "--prompt-words takes 1 to 4096, --max-tokens at least 1, --rate at "
                         "least 0");
    if (a.err)
        return qs_ctl_parse_done(&a);
    if (!nreq)
        nreq = 4 * conc;
    if (!path)
        path = "../shared/data/wikitext-2-raw/wiki.test.raw";
    size_t tlen = 0;
    char *text = read_text(path, &tlen);
    char **w = NULL;
    size_t nw = text ? split_words(text, &w) : 0;
    if (nw < words) {
        fprintf(stderr,
                "qctl bench-serve: %s: %s; give --prompts FILE, a text of at least %u words\n",
                path, text ? "too few words" : "cannot read it", words);
        free(text), free(w);
        return QS_EXIT_USAGE;
    }

    bench b = {.g = g, .model = model, .nreq = nreq, .max_tokens = max_tokens};
    b.prompts = calloc(nreq, sizeof *b.prompts);
    b.due = calloc(nreq, sizeof *b.due);
    b.res = calloc(nreq, sizeof *b.res);
    uint64_t rs = 0x9e3779b97f4a7c15ull ^ seed32;
    double at = 0;
    int oom = !b.prompts || !b.due || !b.res;
    for (uint32_t i = 0; !oom && i < nreq; i++) {
        size_t start = (size_t)(rng_next(&rs) % (nw - words + 1)), len = 0;
        for (uint32_t k = 0; k < words; k++)
            len += strlen(w[start + k]) + 1;
        if (!(b.prompts[i] = malloc(len + 1))) {
            oom = 1;
            break;
        }
        char *p = b.prompts[i];
        for (uint32_t k = 0; k < words; k++)
            p += sprintf(p, k ? " %s" : "%s", w[start + k]);
        if (rate > 0) /* exponential gaps: a Poisson process of `rate` */
            at += -log(1.0 - (double)(rng_next(&rs) >> 11) / 9007199254740992.0) / rate;
        b.due[i] = at;
        b.res[i].itl_cap = max_tokens;
        if (!(b.res[i].itl = malloc(max_tokens * sizeof(double))))
            oom = 1;
    }
    int rc = QS_EXIT_OK;
    pthread_t *th = oom ? NULL : calloc(conc, sizeof *th);
    if (!th) {
        fprintf(stderr, "qctl bench-serve: out of memory\n");
        rc = QS_EXIT_REFUSED;
        goto out;
    }
    pthread_mutex_init(&b.mu, NULL);
    b.t0 = now();
    uint32_t started = 0;
    for (; started < conc && started < nreq; started++)
        if (pthread_create(&th[started], NULL, stream_main, &b))
            break;
    for (uint32_t i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    double wall = now() - b.t0;
    pthread_mutex_destroy(&b.mu);

    /* Latencies over the requests that completed. */
    double *ttft = calloc(nreq, sizeof *ttft), *e2e = calloc(nreq, sizeof *e2e);
    size_t nitl = 0, ndone = 0;
    uint64_t tokens = 0;
    for (uint32_t i = 0; i < nreq; i++)
        nitl += b.res[i].ok && b.res[i].tokens > 1 ? b.res[i].tokens - 1 : 0;
    double *itl = calloc(nitl + 1, sizeof *itl);
    if (!ttft || !e2e || !itl) {
        free(ttft), free(e2e), free(itl);
        fprintf(stderr, "qctl bench-serve: out of memory\n");
        rc = QS_EXIT_REFUSED;
        goto out;
    }
    nitl = 0;
    const char *first_error = NULL;
    for (uint32_t i = 0; i < nreq; i++) {
        req_result *r = &b.res[i];
        if (!r->ok) {
            if (!first_error)
                first_error = *r->error ? r->error : "not run";
            continue;
        }
        ttft[ndone] = r->first - r->due;
        e2e[ndone++] = r->end - r->due;
        tokens += r->tokens;
        for (uint32_t k = 0; k + 1 < r->tokens && k < r->itl_cap; k++)
            itl[nitl++] = r->itl[k];
    }
    qsort(ttft, ndone, sizeof *ttft, cmp_double);
    qsort(e2e, ndone, sizeof *e2e, cmp_double);
    qsort(itl, nitl, sizeof *itl, cmp_double);
    if (g->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "model", model);
        cJSON_AddNumberToObject(j, "concurrency", conc);
        cJSON_AddNumberToObject(j, "requests", nreq);
        cJSON_AddNumberToObject(j, "completed", (double)ndone);
        cJSON_AddNumberToObject(j, "rate", rate);
        cJSON_AddNumberToObject(j, "prompt_words", words);
        cJSON_AddNumberToObject(j, "max_tokens", max_tokens);
        cJSON_AddNumberToObject(j, "seconds", wall);
        cJSON_AddNumberToObject(j, "output_tokens", (double)tokens);
        cJSON_AddNumberToObject(j, "request_throughput", (double)ndone / wall);
        cJSON_AddNumberToObject(j, "output_tokens_per_second", (double)tokens / wall);
        add_pcts(j, "ttft_seconds", ttft, ndone);
        add_pcts(j, "itl_seconds", itl, nitl);
        add_pcts(j, "e2e_seconds", e2e, ndone);
        if (first_error)
            cJSON_AddStringToObject(j, "first_error", first_error);
        qs_ctl_print_json(j); /* and frees it */
    } else {
        printf("%s: %u requests, %u streams at most, %s; %u-word prompts, %u tokens each\n", model,
               nreq, conc, rate > 0 ? "Poisson arrivals" : "all at once", words, max_tokens);
        if (rate > 0)
            printf("  rate                 %10.2f requests/s\n", rate);
        printf("  completed            %10zu of %u in %.2f s\n", ndone, nreq, wall);
        printf("  request throughput   %10.2f requests/s\n", (double)ndone / wall);
        printf("  output tokens        %10.1f tokens/s (%llu tokens)\n", (double)tokens / wall,
               (unsigned long long)tokens);
        printf("  %-20s %10s %10s %10s\n", "ms", "p50", "p90", "p99");
        printf("  %-20s %10.1f %10.1f %10.1f\n", "time to first token", 1e3 * pct(ttft, ndone, 50),
               1e3 * pct(ttft, ndone, 90), 1e3 * pct(ttft, ndone, 99));
        printf("  %-20s %10.1f %10.1f %10.1f\n", "inter-token latency", 1e3 * pct(itl, nitl, 50),
               1e3 * pct(itl, nitl, 90), 1e3 * pct(itl, nitl, 99));
        printf("  %-20s %10.1f %10.1f %10.1f\n", "end to end", 1e3 * pct(e2e, ndone, 50),
               1e3 * pct(e2e, ndone, 90), 1e3 * pct(e2e, ndone, 99));
        if (first_error)
            printf("  failed: %u, the first: %s\n", nreq - (uint32_t)ndone, first_error);
    }
    if (ndone < nreq)
        rc = QS_EXIT_REFUSED;
    free(ttft), free(e2e), free(itl);
out:
    for (uint32_t i = 0; b.res && i < nreq; i++)
        free(b.res[i].itl);
    for (uint32_t i = 0; b.prompts && i < nreq; i++)
        free(b.prompts[i]);
    free(th), free(b.prompts), free(b.due), free(b.res), free(w), free(text);
    return rc;
}
