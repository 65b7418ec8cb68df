/* The models a daemon serves: load, unload, generate and evaluate, run on
 * every rank (commands.c calls these from its table).
 *
 * The registry is replicated: every rank runs every Load and Unload, so every
 * rank holds the same list of models and their groups, and can compute the
 * same answer to "which ranks serve this model" without asking. A model's
 * group is a sub-communicator of the world: the least-loaded ranks, lowest
 * first. The group's first rank (its leader) owns the answer. Generate
 * admits a request into the model's batch, which sched.c steps. For Eval,
 * when world rank 0 is not in the group, the leader relays progress to rank
 * 0 point to point, and rank 0's reply (continue or stop) goes back, so a
 * client that disconnects stops the evaluation on every rank.
 */
#define _POSIX_C_SOURCE 200809L
#include "qs_daemon.h"
#include "qs_collectives.h"
#include "qs_shard.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <mpi.h>
#include <pthread.h>

#define MAX_MODELS    16
#define LATENCY_RING  4096
#define RELAY_TAG     0x5153
#define DEFAULT_CTX   512u
#define DEFAULT_BATCH 8u
#define DEFAULT_CALIB "/usr/share/common-licenses/GPL-3"
#define CALIB_TOKENS  4096u

struct qs_served {
    char name[64];
    char source[512];
    char weights[1024];
    qs_model_config cfg;
    qs_quant quant;
    uint32_t tp;
    int *ranks; /* world ranks of the group, ascending; ranks[0] leads */
    int member;
    qs_comm *comm;
    qs_model *model;
    qs_tokenizer *tok; /* every rank, when the weights carry one */
    float smoothing;
    uint32_t max_seq;   /* KV-cache tokens per sequence it was loaded with */
    uint32_t max_batch; /* sequences generated together (KV-cache slots) */
    qs_kv_format kv;    /* the KV cache's format */
    qs_batch *batch;    /* members: the sequences being generated (sched.c steps it) */
    qs_plan plan;
    qs_rank_bytes actual; /* this rank's (on rank 0: the leader's, from its reply) */
    int chat;             /* QS_CHAT_*: the kind of the GGUF's chat template */
    char system[256];     /* ChatML: the template's default system message, "" for none */
    double load_s;        /* the whole Load, on this rank */
    double quantize_s;    /* reading and quantizing (on rank 0: the leader's) */
    double created;       /* Unix time */
    char cache[8];        /* "hit", "stored" or "": the quantized-model cache */
    /* rank 0: what the clients saw */
    uint64_t tokens;
    double decode_s;
    double lat_ms[LATENCY_RING];
    size_t nlat;
};

/* ---- Registry ----------------------------------------------------------- */

int qs_models_init(qs_daemon *d)
{
    d->models = calloc(MAX_MODELS, sizeof *d->models);
    if (!d->models)
        return qs_seterr(QS_ENOMEM, "out of memory");
    return qs_comm_init_mpi(MPI_COMM_WORLD, &d->world_comm);
}

static void served_free(qs_served *s)
{
    if (!s)
        return;
    qs_batch_close(s->batch);
    qs_model_close(s->model);
    qs_comm_close(s->comm);
    qs_tokenizer_close(s->tok);
    free(s->ranks);
    free(s);
}

void qs_models_close(qs_daemon *d)
{
    for (size_t i = 0; d->models && i < d->nmodels; i++)
        served_free(d->models[i]);
    free(d->models);
    d->models = NULL;
    d->nmodels = 0;
    qs_comm_close(d->world_comm);
    d->world_comm = NULL;
}

qs_served *qs_models_find(const qs_daemon *d, const char *name)
{
    for (size_t i = 0; i < d->nmodels; i++)
        if (strcmp(d->models[i]->name, name) == 0)
            return d->models[i];
    qs_seterr(QS_ENOTFOUND, "no model named '%s' is loaded (qctl stats lists them)", name);
    return NULL;
}

/* ---- The catalog (rank 0) ------------------------------------------------ */

/* Rank 0, main thread: copies what the HTTP thread may read. A failed copy
 * keeps the previous catalog: it only names models for the OpenAI API. */
static void publish(qs_daemon *d)
{
    if (d->rank != 0)
        return;
    qs_catalog_entry *c = calloc(d->nmodels + 1, sizeof *c);
    if (!c) {
        qs_log(QS_LOG_WARN, "out of memory publishing the model list to the HTTP server");
        return;
    }
    for (size_t i = 0; i < d->nmodels; i++) {
        const qs_served *s = d->models[i];
        snprintf(c[i].name, sizeof c[i].name, "%s", s->name);
        c[i].chat = s->chat;
        snprintf(c[i].system, sizeof c[i].system, "%s", s->system);
        c[i].tokenizer = s->tok != NULL;
        c[i].max_seq = s->max_seq;
        c[i].created = s->created;
    }
    pthread_mutex_lock(&d->catalog_mu);
    free(d->catalog);
    d->catalog = c;
    d->ncatalog = d->nmodels;
    pthread_mutex_unlock(&d->catalog_mu);
}

int qs_models_catalog(qs_daemon *d, qs_catalog_entry **out, size_t *n)
{
    pthread_mutex_lock(&d->catalog_mu);
    *n = d->ncatalog;
    *out = malloc((d->ncatalog + 1) * sizeof **out);
    if (*out && d->ncatalog)
        memcpy(*out, d->catalog, d->ncatalog * sizeof **out);
    pthread_mutex_unlock(&d->catalog_mu);
    return *out ? QS_OK : qs_seterr(QS_ENOMEM, "out of memory listing the models");
}

int qs_models_catalog_find(qs_daemon *d, const char *name, qs_catalog_entry *out)
{
    int found = 0;
    pthread_mutex_lock(&d->catalog_mu);
    for (size_t i = 0; i < d->ncatalog && !found; i++)
        if (strcmp(d->catalog[i].name, name) == 0) {
            *out = d->catalog[i];
            found = 1;
        }
    pthread_mutex_unlock(&d->catalog_mu);
    return found;
}

/* This rank's share of every model it serves, for Stats. */
void qs_models_device(const qs_daemon *d, uint64_t *weights, uint64_t *kv, uint64_t *workspace,
                      uint32_t *count)
{
    *weights = *kv = *workspace = 0;
    *count = 0;
    for (size_t i = 0; i < d->nmodels; i++) {
        const qs_served *s = d->models[i];
        if (!s->member)
            continue;
        *weights += s->actual.linear + s->actual.fp16;
        *kv += s->actual.kv_cache;
        /* CPU ranks allocate activations per call: the plan's figure. */
        *workspace += s->plan.rank.workspace;
        (*count)++;
    }
}

/* The least-loaded ranks, lowest first: every rank computes the same set. */
static int choose_group(const qs_daemon *d, uint32_t tp, int *ranks)
{
    int *load = calloc((size_t)d->world, sizeof *load);
    if (!load)
        return qs_seterr(QS_ENOMEM, "out of memory");
    for (size_t i = 0; i < d->nmodels; i++)
        for (uint32_t j = 0; j < d->models[i]->tp; j++)
            load[d->models[i]->ranks[j]]++;
    for (uint32_t k = 0; k < tp; k++) {
        int best = -1;
        for (int r = 0; r < d->world; r++)
            if (load[r] >= 0 && (best < 0 || load[r] < load[best]))
                best = r;
        ranks[k] = best;
        load[best] = -1;
    }
    free(load);
    /* ascending, so that the leader is the lowest rank */
    for (uint32_t a = 1; a < tp; a++)
        for (uint32_t b = a; b > 0 && ranks[b - 1] > ranks[b]; b--) {
            int t = ranks[b];
            ranks[b] = ranks[b - 1];
            ranks[b - 1] = t;
        }
    return QS_OK;
}

/* ---- Relay between the group's leader and rank 0 ------------------------- */

typedef struct relay_msg {
    int32_t kind; /* RELAY_END, RELAY_PROGRESS */
    double v[3];
} relay_msg;

enum { RELAY_END, RELAY_PROGRESS };

/* Polls a request to completion with short sleeps, so that a rank waiting on
 * a long generation does not spin a core the compute ranks need. */
static int wait_poll(MPI_Request *r)
{
    struct timespec nap = {0, 50000};
    for (int spins = 0;; spins++) {
        int done = 0;
        if (MPI_Test(r, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS)
            return qs_seterr(QS_ECOMM, "MPI failed relaying to rank 0");
        if (done)
            return QS_OK;
        if (spins > 100)
            nanosleep(&nap, NULL);
    }
}

/* Leader -> rank 0; returns rank 0's verdict (1: go on) for tokens and
 * progress. */
static int relay_send(const relay_msg *m)
{
    MPI_Request r;
    MPI_Isend(m, sizeof *m, MPI_BYTE, 0, RELAY_TAG, MPI_COMM_WORLD, &r);
    if (wait_poll(&r))
        return 0;
    if (m->kind == RELAY_END)
        return 0;
    int32_t go = 0;
    MPI_Irecv(&go, 1, MPI_INT32_T, 0, RELAY_TAG + 1, MPI_COMM_WORLD, &r);
    return wait_poll(&r) ? 0 : go;
}

static int relay_recv(int leader, relay_msg *m)
{
    MPI_Request r;
    MPI_Irecv(m, sizeof *m, MPI_BYTE, leader, RELAY_TAG, MPI_COMM_WORLD, &r);
    return wait_poll(&r);
}

static int relay_reply(int leader, int32_t go)
{
    MPI_Request r;
    MPI_Isend(&go, 1, MPI_INT32_T, leader, RELAY_TAG + 1, MPI_COMM_WORLD, &r);
    return wait_poll(&r);
}

/* ---- Tokens ------------------------------------------------------------- */

/* A model without a tokenizer (synthetic weights) takes the prompt's bytes
 * as token ids and prints ids back. */
static int encode(const qs_served *s, const char *text, size_t len, int32_t **ids, size_t *n)
{
    if (s->tok)
        return qs_tokenizer_encode(s->tok, text, len, qs_tokenizer_wants_bos(s->tok), ids, n);
    *ids = malloc((len ? len : 1) * sizeof **ids);
    if (!*ids)
        return qs_seterr(QS_ENOMEM, "out of memory encoding the prompt");
    for (size_t i = 0; i < len; i++)
        (*ids)[i] = (int32_t)((unsigned char)text[i] % s->cfg.vocab);
    *n = len;
    return QS_OK;
}

static const char *piece(const qs_served *s, int32_t id, char *buf, size_t n)
{
    size_t len;
    const char *p = s->tok ? qs_tokenizer_piece(s->tok, id, &len) : NULL;
    if (p)
        return p;
    snprintf(buf, n, "[%d] ", id);
    return buf;
}

/* ---- Load --------------------------------------------------------------- */

static int contains(const char *s, size_t n, const char *needle)
{
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (memcmp(s + i, needle, k) == 0)
            return 1;
    return 0;
}

/* ChatML is the one template the OpenAI endpoint applies: recognised by its
 * two markers, whatever Jinja surrounds them. A template that writes a
 * system message of its own when the first message is not one (SmolLM2's
 * does) gives it as the default. */
static int chat_kind(const qs_weights *f, char *system, size_t size)
{
    const char *t;
    size_t n;
    system[0] = '\0';
    if (qs_weights_meta_str(f, "tokenizer.chat_template", &t, &n) != QS_OK)
        return QS_CHAT_NONE;
    if (!contains(t, n, "<|im_start|>") || !contains(t, n, "<|im_end|>"))
        return QS_CHAT_OTHER;
    static const char open[] = "<|im_start|>system\n", close[] = "<|im_end|>";
    if (contains(t, n, "messages[0]['role'] != 'system'")) {
        for (size_t i = 0; i + sizeof open - 1 <= n; i++) {
            if (memcmp(t + i, open, sizeof open - 1) != 0)
                continue;
            size_t a = i + sizeof open - 1, b = a;
            while (b + sizeof close - 1 <= n && memcmp(t + b, close, sizeof close - 1) != 0)
                b++;
            /* Literal text only: a Jinja expression is not ours to run. */
            if (b + sizeof close - 1 <= n && b - a < size && !contains(t + a, b - a, "{") &&
                !contains(t + a, b - a, "'"))
                snprintf(system, size, "%.*s", (int)(b - a), t + a);
            break;
        }
    }
    return QS_CHAT_CHATML;
}

/* What to load: a preset (synthetic weights, a weights path, or for
 * smollm2-135m the cached default GGUF), a GGUF file, a Hugging Face
 * directory with config.json, or a qshard checkpoint directory. */
static int resolve_source(const Qshard__V1__LoadRequest *r, qs_served *s, qs_quant *q,
                          int *checkpoint)
{
    *checkpoint = 0;
    const qs_model_config *p = qs_preset_find(r->model);
    struct stat st;
    int err;
    snprintf(s->source, sizeof s->source, "%s", r->model);
    if (p) {
        s->cfg = *p;
        const char *w = r->weights;
        char cached[1024] = "";
        if (!*w && strcmp(p->name, "smollm2-135m") == 0 &&
            qs_cache_path(QS_DEFAULT_GGUF, cached, sizeof cached) == QS_OK &&
            access(cached, R_OK) == 0)
            w = cached;
        qs_clearerr();
        snprintf(s->weights, sizeof s->weights, "%s", *w ? w : "synthetic");
        if (strcmp(s->weights, "synthetic") != 0) {
            /* The file's shapes rule: check they are the preset's. */
            qs_weights *f = NULL;
            qs_model_config fc;
            if (!(err = qs_weights_open(s->weights, &f)) &&
                qs_weights_find(f, "token_embd.weight") && !qs_config_from_gguf(f, &fc)) {
                if (fc.layers != p->layers || fc.hidden != p->hidden || fc.vocab != p->vocab)
                    err = qs_seterr(QS_EINVAL, "'%s' holds a %u-layer, %u-wide model, not %s",
                                    s->weights, fc.layers, fc.hidden, p->name);
                else
                    s->cfg = fc, snprintf(s->cfg.name, sizeof s->cfg.name, "%s", p->name);
            }
            qs_weights_close(f);
            if (err)
                return err;
            qs_clearerr(); /* a lookup's miss */
        }
    } else if (stat(r->model, &st) == 0 && S_ISDIR(st.st_mode) && qs_is_checkpoint(r->model)) {
        uint32_t tp;
        if ((err = qs_checkpoint_info(r->model, &s->cfg, q, &tp)))
            return err;
        if (r->gpus && r->gpus != tp)
            return qs_seterr(QS_EINVAL,
                             "the checkpoint '%s' was saved from %u rank(s): load it "
                             "with --gpus %u",
                             r->model, tp, tp);
        s->tp = tp;
        snprintf(s->weights, sizeof s->weights, "%s", r->model);
        *checkpoint = 1;
    } else if (stat(r->model, &st) == 0 && S_ISDIR(st.st_mode)) {
        char cfg[1200];
        snprintf(cfg, sizeof cfg, "%s/config.json", r->model);
        if ((err = qs_config_from_json(cfg, &s->cfg)))
            return err;
        snprintf(s->weights, sizeof s->weights, "%s", r->model);
    } else {
        qs_weights *f;
        if ((err = qs_weights_open(r->model, &f)))
            return err;
        err = qs_config_from_gguf(f, &s->cfg);
        qs_weights_close(f);
        if (err)
            return err;
        snprintf(s->weights, sizeof s->weights, "%s", r->model);
    }
    return QS_OK;
}

/* ---- The quantized-model cache (cache.c) for a load from a file ---------- */

typedef struct cache_use {
    int use;      /* the group writes the cache after quantizing */
    int hit;      /* every member found its part: read it instead */
    int storable; /* the group may write it (use, unless it was a hit) */
    char key[33];
    char dir[4200]; /* the entry */
    char options[1400];
} cache_use;

/* Collective over the group: decides whether the cache serves this load
 * (every member has its part) and whether the group writes it. Files only
 * (synthetic weights are made faster than read back), never with --no-cache,
 * and a GPU group that quantizes on its GPUs reads the cache but does not
 * write it: that would take the host quantization it exists to avoid. */
static int cache_lookup(qs_daemon *d, qs_served *s, const Qshard__V1__LoadRequest *r,
                        const qs_model_opts *o, cache_use *cu)
{
    memset(cu, 0, sizeof *cu);
    int on = !d->opts.no_cache && !r->no_cache && o->weights && *d->opts.cache_dir;
    int device_quant = o->on_gpu && o->quantize_on == QS_QUANTIZE_ON_AUTO && !qs_cuda_emulated();
    char calib[1200] = "none";
    if (on && (s->quant.scheme == QS_SCHEME_W8A8 || s->quant.scheme == QS_SCHEME_W4A4 || r->gptq) &&
        s->cfg.final_norm) {
        const char *path = *r->calib_path ? r->calib_path : DEFAULT_CALIB;
        if (strcmp(path, "none") != 0 && s->tok &&
            qs_cache_file_identity(path, calib, sizeof calib))
            on = 0;
    }
    snprintf(cu->options, sizeof cu->options,
             "scheme=%s bits=%d group=%u outliers=%u gptq=%d iters=%u alpha=%g calib=%s tp=%u",
             qs_scheme_name(s->quant.scheme), s->quant.bits, s->quant.group_size, s->quant.outliers,
             r->gptq, r->bcq_iters, (double)r->smooth_alpha, calib, s->tp);
    if (on && qs_cache_key(o->weights, cu->options, cu->key) != QS_OK) {
        qs_log(QS_LOG_WARN, "cache: %s: not cached", qs_errmsg());
        qs_clearerr();
        on = 0;
    }
    int rank = qs_comm_rank(s->comm);
    int32_t mine[2] = {!on || !qs_cache_has(d, cu->key, rank, (int)s->tp), !on || device_quant};
    int32_t all[2] = {0, 0};
    int err = qs_comm_allreduce_sum(s->comm, mine, all, 2, QS_COLL_I32, QS_COLL_HOST);
    if (err)
        return err;
    cu->hit = all[0] == 0;
    cu->storable = all[1] == 0;
    cu->use = cu->storable && !cu->hit;
    if (on)
        snprintf(cu->dir, sizeof cu->dir, "%s/%s", d->opts.cache_dir, cu->key);
    return QS_OK;
}

/* Collective over the group: writes the quantized shards into the entry. A
 * failure (a full disk) costs the cache only, never the load. */
static void cache_store(qs_daemon *d, qs_served *s, cache_use *cu)
{
    int rank = qs_comm_rank(s->comm);
    if (qs_cache_entry_dir(d, cu->key, cu->dir, sizeof cu->dir) != QS_OK)
        cu->dir[0] = '\0'; /* qs_model_save fails here, and on every rank */
    int err = qs_model_save(s->model, *cu->dir ? cu->dir : "/nonexistent/qshard-cache");
    qs_cache_info info = {s->weights,    cu->options,         qs_scheme_name(s->quant.scheme),
                          s->quant.bits, s->quant.group_size, s->tp};
    if (!err)
        err = qs_cache_write_manifest(d, cu->key, &info);
    if (err) {
        qs_log(QS_LOG_WARN, "cache: could not store %s: %s", s->weights, qs_errmsg());
        qs_cache_remove(d, cu->key, rank, (int)s->tp);
        qs_clearerr();
        return;
    }
    snprintf(s->cache, sizeof s->cache, "stored");
    if (d->local_rank == 0)
        qs_cache_evict(d, cu->key);
}

static int uses_hessians(qs_scheme s)
{
    return s == QS_SCHEME_BCQ || s == QS_SCHEME_RTN || s == QS_SCHEME_W4A4;
}

/* A model without a tokenizer (synthetic weights) has no text to read: W4A4
 * ranks its outlier channels on seeded random tokens instead, which still
 * show which channels run large. */
static int random_tokens(const qs_served *s, size_t n, int32_t **ids)
{
    if (!(*ids = malloc(n * sizeof **ids)))
        return qs_seterr(QS_ENOMEM, "out of memory calibrating");
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        (*ids)[i] = (int32_t)(x % s->cfg.vocab);
    }
    return QS_OK;
}

/* Calibration on the group: an fp16 model over the calibration text (not
 * the evaluation text), then the statistics for the load: SmoothQuant's
 * factors for W8A8, Atom's outlier channels for W4A4. */
static int calibrate(qs_served *s, const Qshard__V1__LoadRequest *r, const qs_model_opts *o,
                     qs_calib *cal)
{
    const char *path = *r->calib_path ? r->calib_path : DEFAULT_CALIB;
    int32_t *ids = NULL;
    size_t n = 0;
    int err;
    if (!s->tok && (s->quant.scheme == QS_SCHEME_W4A4 || r->gptq) && !*r->calib_path) {
        /* one window (below): enough to rank channels whose maxima run 10x */
        path = "random tokens";
        n = o->max_seq && o->max_seq < 512 ? o->max_seq : 512;
        if ((err = random_tokens(s, n, &ids)))
            return err;
    } else {
        if (!s->tok)
            return qs_seterr(QS_EINVAL,
                             "calibration needs a tokenizer to read '%s': load a "
                             "GGUF model, or pass --calib none",
                             path);
        size_t len = 0;
        char *text = NULL;
        if ((err = qs_read_file(path, 64u << 20, &text, &len)))
            return err;
        err = qs_tokenizer_encode(s->tok, text, len, 0, &ids, &n);
        free(text);
        if (err)
            return err;
    }
    qs_model_opts fo = *o;
    fo.quant = (qs_quant){QS_SCHEME_FP16, 16, 0, 0};
    qs_model *fp = NULL;
    if (!(err = qs_calib_init(cal, &s->cfg)) &&
        !(err = qs_model_init(&s->cfg, &fo, s->comm, &fp)) &&
        !(err = r->gptq ? qs_calib_hessians(cal, fp) : QS_OK))
        err = qs_model_record(fp, cal);
    /* Windows of the model's KV cache, up to CALIB_TOKENS tokens in all. */
    uint32_t win = fo.max_seq ? fo.max_seq : 512;
    if (win > 512)
        win = 512;
    uint32_t *slot = calloc(win, sizeof *slot), *pos = malloc(win * sizeof *pos);
    if (!err && (!slot || !pos))
        err = qs_seterr(QS_ENOMEM, "out of memory calibrating");
    for (size_t at = 0; !err && at + win <= n && at < CALIB_TOKENS; at += win) {
        for (uint32_t i = 0; i < win; i++)
            pos[i] = i;
        err = qs_model_forward(fp, win, ids + at, slot, pos, win, NULL);
    }
    if (!err && n < win)
        err = qs_seterr(QS_EINVAL,
                        "the calibration text '%s' has %zu tokens, fewer than one "
                        "window of %u",
                        path, n, win);
    free(slot);
    free(pos);
    free(ids);
    qs_model_close(fp);
    return err;
}

/* Rank 0: one progress event on the Load stream (layer 0: a stage starts). */
static void progress_at(const qs_daemon *d, const qs_cmd *cmd, const char *stage, uint32_t layer,
                        uint32_t layers, uint64_t total, double t0, double t_stage, uint64_t params)
{
    if (d->rank != 0)
        return;
    Qshard__V1__LoadProgress pr = QSHARD__V1__LOAD_PROGRESS__INIT;
    Qshard__V1__LoadEvent ev = QSHARD__V1__LOAD_EVENT__INIT;
    double now = qs_now();
    pr.stage = (char *)stage;
    pr.layer = layer;
    pr.layers = layers;
    pr.bytes_total = total;
    pr.seconds = now - t0;
    pr.stage_seconds = t_stage > 0 ? now - t_stage : 0;
    pr.params_done = params;
    ev.event_case = QSHARD__V1__LOAD_EVENT__EVENT_PROGRESS;
    ev.progress = &pr;
    qs_cmd_stream(cmd, &ev);
}

static void progress(const qs_daemon *d, const qs_cmd *cmd, const char *stage, uint32_t layers,
                     uint64_t total, double t0)
{
    progress_at(d, cmd, stage, 0, layers, total, t0, qs_now(), 0);
}

/* Rank 0 in the group: a progress event per layer loaded, with the weights
 * done so far (the whole model's, which the group quantizes together). */
typedef struct load_ctx {
    const qs_daemon *d;
    const qs_cmd *cmd;
    const char *stage;
    uint64_t total, layer_params;
    double t0, t_stage;
} load_ctx;

static void on_layer(void *ctx, uint32_t done, uint32_t layers)
{
    const load_ctx *l = ctx;
    progress_at(l->d, l->cmd, l->stage, done, layers, l->total, l->t0, l->t_stage,
                (uint64_t)done * l->layer_params);
}

static int load_part(const qs_served *s, qs_buf *out)
{
    const qs_rank_bytes *b = &s->actual;
    Qshard__V1__RankBytes rb = QSHARD__V1__RANK_BYTES__INIT;
    Qshard__V1__LoadPart lp = QSHARD__V1__LOAD_PART__INIT;
    rb.linear = b->linear;
    rb.fp16 = b->fp16;
    rb.kv_cache = b->kv_cache;
    rb.workspace = b->workspace;
    rb.reserve = b->reserve;
    rb.total = b->total;
    lp.actual = &rb;
    lp.quantize_seconds = s->quantize_s;
    lp.cache = (char *)s->cache;
    out->data = qs_proto_pack_bytes(&lp.base, &out->len);
    return out->data ? QS_OK : qs_seterr(QS_ENOMEM, "out of memory");
}

int qs_model_run_load(qs_daemon *d, const qs_cmd *cmd, qs_buf *out)
{
    const Qshard__V1__LoadRequest *r = (const void *)cmd->req;
    double t0 = qs_now();
    if (d->nmodels == MAX_MODELS)
        return qs_seterr(QS_EBUSY, "%d models are loaded, the most one daemon serves: unload one",
                         MAX_MODELS);
    qs_served *s = calloc(1, sizeof *s);
    if (!s)
        return qs_seterr(QS_ENOMEM, "out of memory");
    qs_quant q = {0};
    int checkpoint = 0, err = resolve_source(r, s, &q, &checkpoint);
    if (!err && !checkpoint)
        err = qs_quant_resolve(r->quant, &s->cfg, &q);
    /* The name: --name, a preset's, or the file's; qs_preset_find's miss is
     * not an error here, and must not replace one. */
    const char *slash = strrchr(s->source, '/');
    int preset = !err && !checkpoint && qs_preset_find(r->model);
    if (!err)
        qs_clearerr();
    const char *nm = *r->name ? r->name : preset ? s->cfg.name : slash ? slash + 1 : s->source;
    if (strlen(nm) >= sizeof s->name && !err)
        err = qs_seterr(QS_EINVAL, "the model name '%s' is longer than %zu characters: pass --name",
                        nm, sizeof s->name - 1);
    snprintf(s->name, sizeof s->name, "%.63s", nm);
    if (!err && qs_models_find(d, s->name))
        err = qs_seterr(QS_EEXIST,
                        "a model named '%s' is loaded already: unload it or pass "
                        "--name",
                        s->name);
    s->quant = q;
    if (!s->tp)
        s->tp = r->gpus ? r->gpus : (uint32_t)d->world;
    if (!err && s->tp > (uint32_t)d->world)
        err = qs_seterr(QS_EINVAL, "%u ranks asked for, the daemon has %d", s->tp, d->world);
    if (!err)
        err = qs_tp_check(&s->cfg, &s->quant, s->tp);
    uint32_t max_seq = r->max_seq ? r->max_seq : (s->cfg.max_pos < 2048 ? s->cfg.max_pos : 2048);
    if (!err && max_seq > s->cfg.max_pos)
        err = qs_seterr(QS_EINVAL, "max_seq %u exceeds %s's context of %u", max_seq, s->cfg.name,
                        s->cfg.max_pos);
    if (!err && *r->kv_cache)
        err = qs_kv_parse(r->kv_cache, &s->kv);
    qs_workload w = {r->max_batch ? r->max_batch : DEFAULT_BATCH, max_seq, QS_PLAN_DEFAULT_RESERVE,
                     s->kv};
    s->max_seq = max_seq;
    if (!err)
        err = qs_plan_make(&s->cfg, &s->quant, s->tp, &w, &s->plan);
    /* The default batch shrinks to what the device holds; one asked for
     * does not. */
    while (!err && !r->max_batch && w.batch > 1 && s->plan.rank.total > d->dev.budget) {
        w.batch /= 2;
        err = qs_plan_make(&s->cfg, &s->quant, s->tp, &w, &s->plan);
    }
    s->max_batch = w.batch;
    /* The plan must fit the smallest device of the group: say what would. */
    if (!err && s->plan.rank.total > d->dev.budget) {
        qs_min_gpus mg = {0, 0};
        qs_plan_min_gpus(&s->cfg, &s->quant, &w, d->dev.budget, 64, &mg);
        char gib[64];
        snprintf(gib, sizeof gib, "%.2f GiB", (double)s->plan.rank.total / (1u << 30));
        if (mg.valid_tp)
            err =
                qs_seterr(QS_ENOFIT,
                          "%s needs %s per rank on %u rank(s), more than this "
                          "device's %.2f GiB: load it on --gpus %u, with fewer bits, "
                          "or a shorter --max-seq",
                          s->cfg.name, gib, s->tp, (double)d->dev.budget / (1u << 30), mg.valid_tp);
        else
            err = qs_seterr(QS_ENOFIT,
                            "%s needs %s per rank on %u rank(s), more than this "
                            "device's %.2f GiB, and no split up to 64 fits: use fewer "
                            "bits or a shorter --max-seq",
                            s->cfg.name, gib, s->tp, (double)d->dev.budget / (1u << 30));
    }

    /* The group: the same on every rank (the registry is replicated), so the
     * split below pairs up. Every rank reaches it, failed or not. */
    s->ranks = calloc((size_t)d->world, sizeof *s->ranks);
    if (!s->ranks && !err)
        err = qs_seterr(QS_ENOMEM, "out of memory");
    if (!err)
        err = choose_group(d, s->tp, s->ranks);
    for (uint32_t i = 0; !err && i < s->tp; i++)
        s->member |= s->ranks[i] == d->rank;
    int32_t fails = err != 0, all = 0;
    if (qs_comm_allreduce_sum(d->world_comm, &fails, &all, 1, QS_COLL_I32, QS_COLL_HOST) || all) {
        if (!err)
            err = qs_seterr(QS_ECOMM, "another rank refused the load");
        served_free(s);
        return err;
    }
    if ((err = qs_comm_split(d->world_comm, s->member ? 0 : -1, d->rank, &s->comm))) {
        served_free(s);
        return err;
    }
    progress(d, cmd, "planned", s->cfg.layers, s->plan.rank.total, t0);

    /* The tokenizer lives on every rank: rank 0 encodes and decodes for the
     * clients, the members encode the same prompts. */
    const char *tokpath = *r->tokenizer ? r->tokenizer : checkpoint ? NULL : s->weights;
    if (tokpath && strcmp(tokpath, "synthetic") != 0) {
        qs_weights *f = NULL;
        if (qs_weights_open(tokpath, &f) == QS_OK && qs_weights_find(f, "token_embd.weight")) {
            err = qs_tokenizer_init_gguf(f, &s->tok);
            s->chat = chat_kind(f, s->system, sizeof s->system);
        } else if (*r->tokenizer)
            err = qs_seterr(QS_EINVAL, "'%s' is not a GGUF file with a tokenizer", r->tokenizer);
        qs_weights_close(f);
        if (!err)
            qs_clearerr(); /* no tokenizer in the file: the lookups' misses */
    }

    qs_model_opts o = {.quant = s->quant,
                       .weights = strcmp(s->weights, "synthetic") ? s->weights : NULL,
                       .seed = r->seed ? r->seed : 20261122,
                       .outlier_channels = 4,
                       .max_slots = s->max_batch,
                       .max_seq = max_seq,
                       .kv_cache = s->kv,
                       .bcq_iters = r->bcq_iters,
                       .smooth_alpha = r->smooth_alpha,
                       .gptq = r->gptq};
    qs_calib cal = {0};
    int32_t gpus = 0;
    cache_use cu = {0};
    if (!err && s->member) {
        /* GPU ranks run their shards on their GPUs, loading layer by layer
         * straight onto them (a save needs the host copies: then after it).
         * A group of GPU and CPU ranks cannot share NCCL: refused. */
        int32_t gpu = d->dev.cuda;
        err = qs_comm_allreduce_sum(s->comm, &gpu, &gpus, 1, QS_COLL_I32, QS_COLL_HOST);
        if (!err && gpus && gpus != (int32_t)s->tp)
            err = qs_seterr(QS_EINVAL,
                            "%d of the group's %u ranks have a GPU: a model runs on GPUs or on "
                            "CPUs, not both; start qdaemon on nodes alike",
                            gpus, s->tp);
        o.on_gpu = gpus && !*r->save_path;
        o.gpu = d->dev.index;
    }
    if (!err && s->member && !checkpoint)
        err = cache_lookup(d, s, r, &o, &cu);
    if (!err && s->member && cu.hit) {
        /* Read from the cache: no calibration, no quantization. */
        progress(d, cmd, "reading cache", s->cfg.layers, s->plan.rank.total, t0);
        load_ctx lc = {d, cmd, "reading cache", s->plan.rank.total, 0, t0, qs_now()};
        qs_model_opts co = o;
        co.weights = cu.dir;
        co.calib = NULL;
        co.progress = on_layer;
        co.progress_ctx = &lc;
        double tq = qs_now();
        int lerr = qs_model_init(&s->cfg, &co, s->comm, &s->model);
        s->quantize_s = qs_now() - tq;
        /* A damaged entry (every rank agrees): thrown away, quantized again. */
        int32_t bad = lerr != 0, any = 0;
        if ((err = qs_comm_allreduce_sum(s->comm, &bad, &any, 1, QS_COLL_I32, QS_COLL_HOST)))
            ;
        else if (any) {
            qs_log(QS_LOG_WARN, "cache: entry %s of %s is damaged (%s): quantizing again", cu.key,
                   s->weights, lerr ? qs_errmsg() : "on another rank");
            qs_model_close(s->model);
            s->model = NULL;
            qs_cache_remove(d, cu.key, qs_comm_rank(s->comm), (int)s->tp);
            cu.hit = 0, cu.use = cu.storable;
            qs_clearerr();
        } else {
            qs_cache_touch(d, cu.key);
            snprintf(s->cache, sizeof s->cache, "hit");
        }
    }
    if (!err && s->member && !s->model) {
        /* Calibration needs text, so a tokenizer: a synthetic model is not
         * smoothed unless a calibration text is named (then it is refused). */
        int calib = *r->calib_path ? strcmp(r->calib_path, "none") != 0 : s->tok != NULL;
        /* W4A4 chooses its outlier channels by calibration, on random tokens
         * when there is no tokenizer; --calib none is then a contradiction. */
        int w4 = s->quant.scheme == QS_SCHEME_W4A4 && s->quant.outliers;
        if (w4 && !strcmp(r->calib_path, "none"))
            err = qs_seterr(QS_EINVAL,
                            "w4a4 chooses its %u outlier channels by calibration: "
                            "drop --calib none, or pass --outliers 0",
                            s->quant.outliers);
        /* GPTQ: the input Hessians of the same calibration. */
        int gptq = r->gptq && uses_hessians(s->quant.scheme);
        if (r->gptq && !err && !gptq)
            err = qs_seterr(QS_EINVAL, "--gptq is for bcq, rtn and w4a4, not %s: drop it",
                            qs_scheme_name(s->quant.scheme));
        if (gptq && !err && !strcmp(r->calib_path, "none"))
            err = qs_seterr(QS_EINVAL, "GPTQ needs a calibration text: drop --calib none or "
                                       "--gptq");
        if ((w4 || gptq) && !*r->calib_path)
            calib = 1;
        if (cu.use)
            o.on_gpu = 0; /* the cache is written from the host copies, then moved */
        if (!err && !checkpoint && (s->quant.scheme == QS_SCHEME_W8A8 || w4 || gptq) && calib &&
            s->cfg.final_norm) {
            progress(d, cmd, "calibrating", s->cfg.layers, s->plan.rank.total, t0);
            if (!(err = calibrate(s, r, &o, &cal))) {
                o.calib = &cal;
                if (s->quant.scheme == QS_SCHEME_W8A8)
                    s->smoothing = o.smooth_alpha > 0 ? o.smooth_alpha : 0.5f;
            }
        }
        if (!err) {
            const char *stage = checkpoint ? "reading" : "quantizing";
            progress(d, cmd, stage, s->cfg.layers, s->plan.rank.total, t0);
            load_ctx lc = {
                d,  cmd,     stage, s->plan.rank.total, s->plan.linear_params / s->cfg.layers,
                t0, qs_now()};
            o.progress = on_layer;
            o.progress_ctx = &lc;
            double tq = qs_now();
            err = qs_model_init(&s->cfg, &o, s->comm, &s->model);
            s->quantize_s = qs_now() - tq;
        }
        if (!err && *r->save_path) {
            progress(d, cmd, "saving", s->cfg.layers, s->plan.rank.total, t0);
            err = qs_model_save(s->model, r->save_path);
        }
        if (!err && cu.use) {
            progress(d, cmd, "caching", s->cfg.layers, s->plan.rank.total, t0);
            cache_store(d, s, &cu);
        }
    }
    if (s->member && gpus && (*r->save_path || cu.use)) {
        /* Saved or cached from the host copies first, then moved to the
         * GPUs; every member takes part in the agreement, even a failed one. */
        int32_t bad = err != 0, any = 0;
        int cerr = qs_comm_allreduce_sum(s->comm, &bad, &any, 1, QS_COLL_I32, QS_COLL_HOST);
        if (!err && (err = cerr) == QS_OK && !any) {
            progress(d, cmd, "uploading", s->cfg.layers, s->plan.rank.total, t0);
            err = qs_model_use_device(s->model, d->dev.index);
        }
    }
    if (!err && s->member) {
        qs_model_bytes(s->model, &s->actual);
        s->smoothing = qs_model_smoothing(s->model); /* also from a checkpoint */
        qs_batch_opts bo = {s->max_batch, d->opts.prefill_chunk};
        err = qs_batch_init(s->model, &bo, &s->batch);
    }
    qs_calib_close(&cal);
    /* All ranks keep the model, or none does. */
    fails = err != 0;
    if (qs_comm_allreduce_sum(d->world_comm, &fails, &all, 1, QS_COLL_I32, QS_COLL_HOST) || all) {
        if (!err)
            err = qs_seterr(QS_ECOMM, "another rank failed to load its shard");
        served_free(s);
        return err;
    }
    d->models[d->nmodels++] = s;
    s->load_s = qs_now() - t0;
    s->created = (double)time(NULL);
    publish(d);
    qs_log(QS_LOG_INFO,
           "loaded %s (%s %d-bit) on %u rank(s) in %.1f s, %u sequences of %u tokens, %s KV cache",
           s->name, qs_scheme_name(s->quant.scheme), s->quant.bits, s->tp, s->load_s, s->max_batch,
           s->max_seq, qs_kv_name(s->kv));
    return s->member && s->ranks[0] == d->rank ? load_part(s, out) : QS_OK;
}

static void info_fill(const qs_served *s, Qshard__V1__ModelInfo *mi, Qshard__V1__Quantization *qm,
                      Qshard__V1__RankBytes *rb, uint32_t *ranks)
{
    qs_quant_fill(&s->quant, qm);
    for (uint32_t i = 0; i < s->tp; i++)
        ranks[i] = (uint32_t)s->ranks[i];
    rb->linear = s->actual.linear;
    rb->fp16 = s->actual.fp16;
    rb->kv_cache = s->actual.kv_cache;
    rb->workspace = s->actual.workspace;
    rb->reserve = s->actual.reserve;
    rb->total = s->actual.total;
    mi->name = (char *)s->name;
    mi->source = (char *)s->source;
    mi->quant = qm;
    mi->tp = s->tp;
    mi->n_ranks = s->tp;
    mi->ranks = ranks;
    mi->weight_bytes = s->plan.weight_bytes;
    mi->rank_bytes = s->actual.total;
    mi->planned_rank_bytes = s->plan.rank.total;
    mi->actual = rb;
    mi->weights = (char *)s->weights;
    mi->tokens_generated = s->tokens;
    mi->tokens_per_second = s->decode_s > 0 ? (double)s->tokens / s->decode_s : 0;
    mi->tokenizer = s->tok ? "gguf" : "";
    mi->smoothing = s->smoothing;
    mi->load_seconds = s->load_s;
    mi->quantize_seconds = s->quantize_s;
    mi->max_seq = s->max_seq;
    mi->max_batch = s->max_batch;
    mi->kv_cache = (char *)qs_kv_name(s->kv);
    mi->cache = (char *)s->cache;
    mi->chat_template = s->chat == QS_CHAT_CHATML  ? "chatml"
                        : s->chat == QS_CHAT_OTHER ? "other"
                                                   : "";
}

static int by_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Rank 0: the registry as ModelInfo messages (freed by qs_models_info_free). */
int qs_models_info(const qs_daemon *d, uint64_t device_mem, Qshard__V1__ModelInfo ***out, size_t *n)
{
    *n = d->nmodels;
    *out = calloc(d->nmodels + 1, sizeof **out);
    if (!*out)
        return qs_seterr(QS_ENOMEM, "out of memory");
    for (size_t i = 0; i < d->nmodels; i++) {
        const qs_served *s = d->models[i];
        /* one allocation per model: the message, its parts and footprints */
        struct info {
            Qshard__V1__ModelInfo mi;
            Qshard__V1__Quantization qm;
            Qshard__V1__RankBytes rb;
            Qshard__V1__Footprint fp[4];
            Qshard__V1__Quantization fq[4];
            Qshard__V1__Footprint *fpp[4];
            uint32_t ranks[];
        } *in = calloc(1, sizeof *in + s->tp * sizeof(uint32_t));
        if (!in)
            return qs_seterr(QS_ENOMEM, "out of memory");
        qshard__v1__model_info__init(&in->mi);
        qshard__v1__quantization__init(&in->qm);
        qshard__v1__rank_bytes__init(&in->rb);
        info_fill(s, &in->mi, &in->qm, &in->rb, in->ranks);
        qs_sched_counts(d, s->name, &in->mi.running, &in->mi.waiting);
        if (s->nlat) {
            double sorted[LATENCY_RING];
            size_t k = s->nlat < LATENCY_RING ? s->nlat : LATENCY_RING;
            memcpy(sorted, s->lat_ms, k * sizeof *sorted);
            qsort(sorted, k, sizeof *sorted, by_double);
            in->mi.p50_token_ms = sorted[k / 2];
            in->mi.p99_token_ms = sorted[(k * 99) / 100 < k ? (k * 99) / 100 : k - 1];
        }
        /* How the footprint shrinks: fp16, W8A8, 4-bit, 3-bit. */
        uint32_t g = qs_default_group(&s->cfg);
        const qs_quant sch[4] = {{QS_SCHEME_FP16, 16, 0, 0},
                                 {QS_SCHEME_W8A8, 8, QS_W8A8_GROUP, 0},
                                 {QS_SCHEME_BCQ, 4, g, 0},
                                 {QS_SCHEME_BCQ, 3, g, 0}};
        /* Same workload as the model was loaded for. */
        qs_workload w = {s->max_batch, s->max_seq, QS_PLAN_DEFAULT_RESERVE, s->kv};
        size_t nf = 0;
        for (int j = 0; j < 4; j++) {
            qs_min_gpus mg = {0, 0};
            qs_plan p;
            if (qs_plan_min_gpus(&s->cfg, &sch[j], &w, device_mem, 64, &mg) ||
                qs_plan_make(&s->cfg, &sch[j], mg.valid_tp ? mg.valid_tp : 1, &w, &p))
                continue;
            Qshard__V1__Footprint *f = &in->fp[nf];
            qshard__v1__footprint__init(f);
            qshard__v1__quantization__init(&in->fq[nf]);
            in->fq[nf].scheme = (char *)qs_scheme_name(sch[j].scheme);
            in->fq[nf].bits = (uint32_t)sch[j].bits;
            in->fq[nf].group_case = QSHARD__V1__QUANTIZATION__GROUP_GROUP_SIZE;
            in->fq[nf].group_size = sch[j].group_size;
            f->quant = &in->fq[nf];
            f->weight_bytes = p.weight_bytes;
            f->bytes_per_gpu = p.rank.total;
            f->min_gpus = mg.valid_tp;
            f->min_gpus_memory = mg.by_memory;
            int same_scheme = sch[j].scheme == s->quant.scheme ||
                              (sch[j].scheme == QS_SCHEME_BCQ && s->quant.scheme == QS_SCHEME_RTN);
            f->loaded = same_scheme && sch[j].bits == s->quant.bits;
            in->fpp[nf] = f;
            nf++;
        }
        qs_clearerr();
        in->mi.n_footprints = nf;
        in->mi.footprints = in->fpp;
        (*out)[i] = &in->mi;
    }
    return QS_OK;
}

void qs_models_info_free(Qshard__V1__ModelInfo **infos, size_t n)
{
    for (size_t i = 0; infos && i < n; i++)
        free(infos[i]); /* the struct info starts with the message */
    free(infos);
}

int qs_model_reply_load(qs_daemon *d, const qs_cmd *cmd, const qs_part *parts, double seconds,
                        grpc_byte_buffer **reply)
{
    (void)cmd;
    qs_served *s = d->nmodels ? d->models[d->nmodels - 1] : NULL;
    if (!s)
        return qs_seterr(QS_EINTERNAL, "the loaded model is not in the registry");
    const qs_part *part = &parts[s->ranks[0]];
    Qshard__V1__LoadPart *lp = qshard__v1__load_part__unpack(NULL, part->len, part->data);
    if (lp) {
        const Qshard__V1__RankBytes *rb = lp->actual;
        if (rb)
            s->actual = (qs_rank_bytes){rb->linear,    rb->fp16,    rb->kv_cache,
                                        rb->workspace, rb->reserve, rb->total};
        s->quantize_s = lp->quantize_seconds;
        snprintf(s->cache, sizeof s->cache, "%.7s", lp->cache ? lp->cache : "");
        qshard__v1__load_part__free_unpacked(lp, NULL);
    }
    s->load_s = seconds;
    qs_metrics_model(d->metrics, s->name, s->load_s, s->quantize_s);
    Qshard__V1__ModelInfo **infos = NULL;
    size_t n = 0;
    int err = qs_models_info(d, d->dev.budget, &infos, &n);
    if (err)
        return err;
    Qshard__V1__LoadResult res = QSHARD__V1__LOAD_RESULT__INIT;
    Qshard__V1__LoadEvent ev = QSHARD__V1__LOAD_EVENT__INIT;
    res.model = infos[n - 1];
    res.seconds = seconds;
    ev.event_case = QSHARD__V1__LOAD_EVENT__EVENT_RESULT;
    ev.result = &res;
    *reply = qs_proto_pack(&ev.base);
    qs_models_info_free(infos, n);
    return *reply ? QS_OK : qs_seterr(QS_ENOMEM, "out of memory");
}

/* ---- Unload ------------------------------------------------------------- */

int qs_model_run_unload(qs_daemon *d, const qs_cmd *cmd, qs_buf *out)
{
    const Qshard__V1__UnloadRequest *r = (const void *)cmd->req;
    for (size_t i = 0; i < d->nmodels; i++) {
        if (strcmp(d->models[i]->name, r->name) != 0)
            continue;
        qs_served *s = d->models[i];
        /* This rank's part of what is freed: its shard's bytes, as allocated. */
        Qshard__V1__UnloadReply part = QSHARD__V1__UNLOAD_REPLY__INIT;
        if (s->member && s->model) {
            qs_rank_bytes b;
            qs_model_bytes(s->model, &b);
            part.freed_bytes = b.total;
        }
        memmove(&d->models[i], &d->models[i + 1], (d->nmodels - i - 1) * sizeof *d->models);
        d->nmodels--;
        served_free(s);
        publish(d);
        out->data = qs_proto_pack_bytes(&part.base, &out->len);
        return out->data ? QS_OK : qs_seterr(QS_ENOMEM, "out of memory");
    }
    return qs_seterr(QS_ENOTFOUND, "no model named '%s' is loaded (qctl stats lists them)",
                     r->name);
}

/* ---- Generate: admission into the model's batch ----------------------- */

/* Generate and Eval need a loaded model: not a missing file, a state. */
static qs_served *loaded(const qs_daemon *d, const char *name)
{
    qs_served *s = qs_models_find(d, name);
    if (!s)
        qs_seterr(QS_ESTATE,
                  "no model named '%s' is loaded: load it first (qctl load %s), "
                  "or see qctl stats for the loaded ones",
                  name, name);
    return s;
}

/* The prompt's ids and the tokens to generate, the same on every rank that
 * computes them. */
static int generate_inputs(const qs_served *s, const Qshard__V1__GenerateRequest *r, int32_t **ids,
                           size_t *n, uint32_t *max_new)
{
    int err;
    if (s->tok)
        err = qs_tokenizer_encode(s->tok, r->prompt, strlen(r->prompt),
                                  (qs_tokenizer_wants_bos(s->tok) ? QS_TOK_ADD_BOS : 0) |
                                      (r->special_tokens ? QS_TOK_SPECIAL : 0),
                                  ids, n);
    else
        err = encode(s, r->prompt, strlen(r->prompt), ids, n);
    if (err)
        return err;
    if (*n == 0)
        return qs_seterr(QS_EINVAL, "the prompt encodes to no tokens");
    /* The last token sampled is never fed back: n + max_new - 1 positions. */
    uint32_t cap = s->max_seq;
    if (*n >= cap)
        return qs_seterr(QS_EINVAL,
                         "the prompt's %zu tokens fill %s's KV cache of %u tokens: shorten it, "
                         "or load the model with a larger --max-seq",
                         *n, s->name, cap);
    uint32_t left = (uint32_t)(cap + 1 - *n);
    *max_new = r->max_tokens ? r->max_tokens : r->fit_context ? left : 64;
    if (r->fit_context && *max_new > left)
        *max_new = left;
    if (*n + *max_new > (size_t)cap + 1)
        return qs_seterr(QS_EINVAL,
                         "%zu prompt tokens and %u new ones exceed %s's KV cache of %u tokens: "
                         "ask for at most %u, or load the model with a larger --max-seq",
                         *n, *max_new, s->name, cap, left);
    return QS_OK;
}

/* Every rank: the Generate command admits the request into the model's
 * batch under the command's number; sched.c's steps generate it. The
 * leader's part tells rank 0 the prompt's length and the seed. */
int qs_model_run_generate(qs_daemon *d, const qs_cmd *cmd, qs_buf *out)
{
    const Qshard__V1__GenerateRequest *r = (const void *)cmd->req;
    qs_served *s = loaded(d, r->model);
    if (!s)
        return QS_ESTATE;
    if (!s->member)
        return QS_OK;
    int32_t *ids = NULL;
    size_t n = 0;
    uint32_t max_new = 0;
    int err = generate_inputs(s, r, &ids, &n, &max_new);
    uint64_t seed = r->seed ? r->seed : 0x9e3779b97f4a7c15ull ^ cmd->seq;
    qs_sampler smp;
    qs_sampler_init(&smp, r->temperature, r->top_p > 0 ? r->top_p : 1.0f, r->top_k, seed);
    int32_t eos = s->tok && !r->ignore_eos ? qs_tokenizer_eos(s->tok) : -1;
    if (!err)
        err = qs_batch_add(s->batch, cmd->seq, ids, n, max_new, &smp, eos);
    free(ids);
    if (err || d->rank != s->ranks[0])
        return err;
    Qshard__V1__GenerateDone done = QSHARD__V1__GENERATE_DONE__INIT;
    done.prompt_tokens = (uint32_t)n;
    done.generated_tokens = max_new;
    done.seed = seed;
    out->data = qs_proto_pack_bytes(&done.base, &out->len);
    return out->data ? QS_OK : qs_seterr(QS_ENOMEM, "out of memory");
}

/* sched.c's view of a model. */
qs_batch *qs_served_batch(const qs_served *s)
{
    return s->member ? s->batch : NULL;
}

int qs_served_leader(const qs_served *s)
{
    return s->ranks[0];
}

uint32_t qs_served_capacity(const qs_served *s)
{
    return s->max_batch;
}

uint32_t qs_served_max_seq(const qs_served *s)
{
    return s->max_seq;
}

const char *qs_served_piece(const qs_served *s, int32_t id, char *buf, size_t n, int *control)
{
    *control = s->tok && qs_tokenizer_is_control(s->tok, id);
    return piece(s, id, buf, n);
}

double qs_served_comm_ms(const qs_served *s)
{
    return s->member && s->model ? qs_model_comm_ms(s->model) : 0;
}

void qs_served_batch_clear(qs_served *s)
{
    if (s->member)
        qs_batch_clear(s->batch);
}

void qs_served_count(qs_served *s, double latency_ms, uint32_t tokens, double decode_s)
{
    if (latency_ms >= 0)
        s->lat_ms[s->nlat++ % LATENCY_RING] = latency_ms;
    s->tokens += tokens;
    s->decode_s += decode_s;
}

/* Rank 0: the part of the model's leader, whose reply speaks for the group. */
static const qs_part *leader_part(const qs_daemon *d, const char *model, const qs_part *parts,
                                  qs_served **s)
{
    *s = qs_models_find(d, model);
    return *s ? &parts[(*s)->ranks[0]] : NULL;
}

/* ---- Eval --------------------------------------------------------------- */

typedef struct eval_ctx {
    qs_daemon *d;
    const qs_cmd *cmd;
    size_t total;
    double t0;
    int stopped;
} eval_ctx;

static int stream_progress(eval_ctx *e, double chunks, double ppl)
{
    Qshard__V1__EvalProgress pr = QSHARD__V1__EVAL_PROGRESS__INIT;
    Qshard__V1__EvalEvent ev = QSHARD__V1__EVAL_EVENT__INIT;
    pr.chunks = (uint32_t)chunks;
    pr.chunks_total = (uint32_t)e->total;
    pr.perplexity = ppl;
    pr.seconds = qs_now() - e->t0;
    ev.event_case = QSHARD__V1__EVAL_EVENT__EVENT_PROGRESS;
    ev.progress = &pr;
    if (qs_cmd_stream(e->cmd, &ev) != QS_OK || qs_cmd_cancelled(e->cmd))
        e->stopped = 1;
    return e->stopped;
}

static int on_chunk(void *ctx, const qs_ppl *p)
{
    eval_ctx *e = ctx;
    double ppl = exp(p->nll / (double)(p->count ? p->count : 1));
    if (e->d->rank == 0)
        return stream_progress(e, (double)p->chunks, ppl);
    relay_msg m = {.kind = RELAY_PROGRESS, .v = {(double)p->chunks, ppl, 0}};
    return !relay_send(&m);
}

int qs_model_run_eval(qs_daemon *d, const qs_cmd *cmd, qs_buf *out)
{
    const Qshard__V1__EvalRequest *r = (const void *)cmd->req;
    qs_served *s = loaded(d, r->model);
    if (!s)
        return QS_ESTATE;
    int leader = s->ranks[0];
    uint32_t ctx = r->ctx ? r->ctx : DEFAULT_CTX;
    eval_ctx e = {d, cmd, 0, qs_now(), 0};
    if (!s->member && d->rank != 0)
        return QS_OK;
    /* Every member and rank 0 encode the text: the same ids everywhere. */
    size_t len = 0;
    char *text = NULL;
    int err = QS_OK;
    if (r->source_case == QSHARD__V1__EVAL_REQUEST__SOURCE_TEXT_PATH)
        err = qs_read_file(r->text_path, 256u << 20, &text, &len);
    else if ((text = strdup(r->text)))
        len = strlen(text);
    else
        err = qs_seterr(QS_ENOMEM, "out of memory");
    if (!err && !s->tok)
        err = qs_seterr(QS_EINVAL,
                        "'%s' has no tokenizer, so text cannot be scored: load a "
                        "GGUF model",
                        s->name);
    int32_t *ids = NULL;
    size_t n = 0;
    if (!err)
        err = qs_tokenizer_encode(s->tok, text, len, 0, &ids, &n);
    free(text);
    size_t chunks = ctx ? n / ctx : 0;
    if (r->max_chunks && chunks > r->max_chunks)
        chunks = r->max_chunks;
    e.total = chunks;
    if (!s->member) {
        /* rank 0 outside the group: relay the leader's progress */
        free(ids);
        if (err)
            return err;
        for (;;) {
            relay_msg m;
            if (relay_recv(leader, &m) || m.kind == RELAY_END)
                break;
            stream_progress(&e, m.v[0], m.v[1]);
            relay_reply(leader, !e.stopped);
        }
        return QS_OK;
    }
    int32_t bos = s->tok && qs_tokenizer_wants_bos(s->tok) ? qs_tokenizer_bos(s->tok) : -1;
    qs_ppl p = {0, 0, 0};
    if (!err)
        err = qs_model_perplexity(s->model, ids, n, ctx, r->max_chunks, bos,
                                  d->rank == leader ? on_chunk : NULL, &e, &p);
    free(ids);
    if (d->rank == leader && leader != 0) {
        relay_msg m = {.kind = RELAY_END};
        relay_send(&m);
    }
    if (err || d->rank != leader)
        return err;
    Qshard__V1__EvalReply rep = QSHARD__V1__EVAL_REPLY__INIT;
    rep.mean_nll = p.count ? p.nll / (double)p.count : 0;
    rep.perplexity = exp(rep.mean_nll);
    rep.tokens = p.count;
    rep.chunks = (uint32_t)p.chunks;
    rep.seconds = qs_now() - e.t0;
    rep.text_tokens = n;
    rep.bos = bos >= 0;
    out->data = qs_proto_pack_bytes(&rep.base, &out->len);
    return out->data ? QS_OK : qs_seterr(QS_ENOMEM, "out of memory");
}

int qs_model_reply_eval(qs_daemon *d, const qs_cmd *cmd, const qs_part *parts, double seconds,
                        grpc_byte_buffer **reply)
{
    (void)seconds;
    const Qshard__V1__EvalRequest *r = (const void *)cmd->req;
    qs_served *s;
    const qs_part *lp = leader_part(d, r->model, parts, &s);
    if (!lp)
        return QS_ENOTFOUND;
    Qshard__V1__EvalReply *rep = qshard__v1__eval_reply__unpack(NULL, lp->len, lp->data);
    if (!rep)
        return qs_seterr(QS_EINTERNAL, "rank %d sent a malformed evaluation", s->ranks[0]);
    Qshard__V1__EvalEvent ev = QSHARD__V1__EVAL_EVENT__INIT;
    ev.event_case = QSHARD__V1__EVAL_EVENT__EVENT_DONE;
    ev.done = rep;
    *reply = qs_proto_pack(&ev.base);
    qshard__v1__eval_reply__free_unpacked(rep, NULL);
    return *reply ? QS_OK : qs_seterr(QS_ENOMEM, "out of memory");
}
