/* Quantized checkpoints: each rank's shard, already quantized (and smoothed),
 * saved as one safetensors file per rank, so that quantization and
 * calibration run once. Like a TensorRT-LLM engine, a checkpoint is for the
 * split it was made on: load it on the same number of ranks.
 *
 *   DIR/rank-00000-of-00002.safetensors, DIR/rank-00001-of-00002.safetensors
 *   __metadata__: format "qshard-checkpoint", version, scheme, bits,
 *                 group_size, outliers (w4a4), smoothing ("none" or alpha),
 *                 rope, tp, rank,
 *                 config (the model configuration as JSON)
 *   tensors: layers.L.{q,k,v,o,up,gate,down}.{bits,alpha,z | w8,scale,sum |
 *            w4,s4,s8,perm,ko | weight}[,bias], layers.L.{attn_norm,ffn_norm}.{weight,bias},
 *            embed, lm_head, pos, proj_in, proj_out, final_norm.{weight,bias}
 * Packed arrays are stored flat with their raw bytes (I32 words, F16 scales,
 * I8 codes); every size is checked against the layout the configuration,
 * scheme and split imply before it is copied.
 */
#define _POSIX_C_SOURCE 200809L
#include "model_internal.h"

#include "qs_collectives.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define FORMAT "qshard-checkpoint"

static void rank_path(char *out, size_t n, const char *dir, int rank, int size)
{
    snprintf(out, n, "%s/rank-%05d-of-%05d.safetensors", dir, rank, size);
}

/* ---- Writing ------------------------------------------------------------ */

typedef struct entry {
    char name[128];
    const char *dtype;
    uint64_t shape[2];
    int ndim;
    const void *data;
    uint64_t bytes;
} entry;

typedef struct writer {
    entry *e;
    size_t n, cap;
    void **owned; /* arrays made for writing (W4A4's plain codes), freed after */
    size_t nowned;
    int err;
} writer;

/* An array of bytes the writer frees when done; NULL (and w->err) if none. */
static void *writer_alloc(writer *w, size_t bytes)
{
    void **o = w->err ? NULL : realloc(w->owned, (w->nowned + 1) * sizeof *o);
    void *p = o ? malloc(bytes ? bytes : 1) : NULL;
    if (o)
        w->owned = o;
    if (!p) {
        if (!w->err)
            w->err = qs_seterr(QS_ENOMEM, "out of memory writing a checkpoint");
        return NULL;
    }
    w->owned[w->nowned++] = p;
    return p;
}

static void writer_free(writer *w)
{
    for (size_t i = 0; i < w->nowned; i++)
        free(w->owned[i]);
    free(w->owned);
    free(w->e);
}

static void put(writer *w, const char *name, const char *dtype, const void *data, uint64_t d0,
                uint64_t d1, uint64_t elem)
{
    if (w->err || !data)
        return;
    if (w->n == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 256;
        entry *e = realloc(w->e, cap * sizeof *e);
        if (!e) {
            w->err = qs_seterr(QS_ENOMEM, "out of memory writing a checkpoint");
            return;
        }
        w->e = e, w->cap = cap;
    }
    entry *e = &w->e[w->n++];
    snprintf(e->name, sizeof e->name, "%s", name);
    e->dtype = dtype;
    e->shape[0] = d0, e->shape[1] = d1;
    e->ndim = d1 ? 2 : 1;
    e->data = data;
    e->bytes = d0 * (d1 ? d1 : 1) * elem;
}

/* W4A4 as its plain codes (position order, int8 bytes), scales, input order
 * and outlier count: the kernel's packing stays the kernel's business. */
static void put_w4(writer *w, const char *prefix, const linear *l)
{
    char n[128];
    size_t N = l->N, K = l->K, K4 = K - l->w4.ko, G = l->w4.group;
    size_t ng = K4 && G ? (K4 + G - 1) / G : 0;
    int8_t *codes = writer_alloc(w, N * K);
    int32_t *ko = writer_alloc(w, sizeof *ko);
    if (!codes || !ko)
        return;
    *ko = (int32_t)l->w4.ko;
    int err = qs_w4_codes(&l->w4, codes);
    if (err) {
        w->err = err;
        return;
    }
    snprintf(n, sizeof n, "%s.w4", prefix);
    put(w, n, "I8", codes, N, K, 1);
    snprintf(n, sizeof n, "%s.s4", prefix);
    put(w, n, "F32", l->w4.s4, N * ng, 0, 4);
    snprintf(n, sizeof n, "%s.s8", prefix);
    put(w, n, "F32", l->w4.ko ? l->w4.s8 : NULL, N, 0, 4);
    snprintf(n, sizeof n, "%s.perm", prefix);
    put(w, n, "I32", l->w4.perm, K, 0, 4);
    snprintf(n, sizeof n, "%s.ko", prefix);
    put(w, n, "I32", ko, 1, 0, 4);
}

static void put_linear(writer *w, const char *prefix, const linear *l)
{
    char n[128];
    size_t bb = 0, ab = 0, zb = 0;
    switch (l->scheme) {
    case QS_SCHEME_FP16:
        snprintf(n, sizeof n, "%s.weight", prefix);
        put(w, n, "F32", l->w32, l->N, l->K, 4);
        break;
    case QS_SCHEME_W8A8:
        snprintf(n, sizeof n, "%s.w8", prefix);
        put(w, n, "I8", l->w8.w, l->N * l->w8.Kp, 0, 1);
        snprintf(n, sizeof n, "%s.scale", prefix);
        put(w, n, "F32", l->w8.scale, l->N, 0, 4);
        snprintf(n, sizeof n, "%s.sum", prefix);
        put(w, n, "I32", l->w8.sum, l->N * qs_w8_groups(l->K, l->w8.group), 0, 4);
        break;
    case QS_SCHEME_BCQ:
    case QS_SCHEME_RTN:
        qs_bcq_sizes(l->N, l->K, l->bcq.q, l->bcq.g, &bb, &ab, &zb);
        snprintf(n, sizeof n, "%s.bits", prefix);
        put(w, n, "I32", l->bcq.bits, bb / 4, 0, 4);
        snprintf(n, sizeof n, "%s.alpha", prefix);
        put(w, n, "F16", l->bcq.alpha, ab / 2, 0, 2);
        snprintf(n, sizeof n, "%s.z", prefix);
        put(w, n, "F16", l->bcq.z, zb / 2, 0, 2);
        break;
    case QS_SCHEME_W4A4:
        put_w4(w, prefix, l);
        break;
    }
    snprintf(n, sizeof n, "%s.bias", prefix);
    put(w, n, "F32", l->bias, l->N, 0, 4);
}

static void put_norm(writer *w, const char *prefix, const norm *nm, uint64_t h)
{
    char n[128];
    snprintf(n, sizeof n, "%s.weight", prefix);
    put(w, n, "F32", nm->w, h, 0, 4);
    snprintf(n, sizeof n, "%s.bias", prefix);
    put(w, n, "F32", nm->b, h, 0, 4);
}

static char *config_json(const qs_model_config *c)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "name", c->name);
    cJSON_AddStringToObject(o, "arch", c->arch == QS_ARCH_OPT ? "opt" : "llama");
    cJSON_AddStringToObject(o, "norm", c->norm == QS_NORM_LAYER ? "layer" : "rms");
    const struct {
        const char *k;
        double v;
    } f[] = {{"layers", c->layers},
             {"hidden", c->hidden},
             {"heads", c->heads},
             {"kv_heads", c->kv_heads},
             {"head_dim", c->head_dim},
             {"ffn", c->ffn},
             {"vocab", c->vocab},
             {"max_pos", c->max_pos},
             {"embed_dim", c->embed_dim},
             {"tied_embeddings", c->tied_embeddings},
             {"gated_ffn", c->gated_ffn},
             {"linear_bias", c->linear_bias},
             {"learned_pos", c->learned_pos},
             {"final_norm", c->final_norm},
             {"norm_eps", c->norm_eps},
             {"rope_theta", c->rope_theta}};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        cJSON_AddNumberToObject(o, f[i].k, f[i].v);
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

static int write_file(const char *path, const writer *w, cJSON *meta)
{
    cJSON *h = cJSON_CreateObject();
    cJSON_AddItemToObject(h, "__metadata__", meta);
    uint64_t off = 0;
    for (size_t i = 0; i < w->n; i++) {
        const entry *e = &w->e[i];
        cJSON *t = cJSON_AddObjectToObject(h, e->name);
        cJSON_AddStringToObject(t, "dtype", e->dtype);
        cJSON *shape = cJSON_AddArrayToObject(t, "shape");
        for (int d = 0; d < e->ndim; d++)
            cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)e->shape[d]));
        cJSON *offs = cJSON_AddArrayToObject(t, "data_offsets");
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)off));
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(off + e->bytes)));
        off += e->bytes;
    }
    char *text = cJSON_PrintUnformatted(h);
    cJSON_Delete(h);
    if (!text)
        return qs_seterr(QS_ENOMEM, "out of memory writing %s", path);
    /* Written under a temporary name, then renamed: a file at `path` is
     * whole (a full disk or a crash leaves only the .tmp, which no load
     * reads). */
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    int err = QS_OK;
    if (!f) {
        err = qs_seterr(QS_EIO, "cannot write %s: %s", tmp, strerror(errno));
    } else {
        uint64_t n = strlen(text);
        int ok = fwrite(&n, 8, 1, f) == 1 && fwrite(text, 1, n, f) == n;
        for (size_t i = 0; ok && i < w->n; i++)
            ok = fwrite(w->e[i].data, 1, w->e[i].bytes, f) == w->e[i].bytes;
        ok = ok && fflush(f) == 0 && fsync(fileno(f)) == 0;
        int saved = errno;
        if (fclose(f) != 0 || !ok) {
            err = qs_seterr(QS_EIO, "writing %s failed: %s (is the disk full?)", tmp,
                            strerror(ok ? errno : saved));
            unlink(tmp);
        } else if (rename(tmp, path) != 0) {
            err = qs_seterr(QS_EIO, "renaming %s to %s failed: %s", tmp, path, strerror(errno));
            unlink(tmp);
        }
    }
    cJSON_free(text);
    return err;
}

int qs_model_save(const qs_model *m, const char *dir)
{
    if (!m || !dir)
        return qs_seterr(QS_EINVAL, "qs_model_save: a model and a directory are required");
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return qs_seterr(QS_EIO, "cannot create %s: %s", dir, strerror(errno));
    const qs_model_config *c = &m->cfg;
    writer w = {0};
    char n[96];
    for (uint32_t l = 0; l < c->layers; l++) {
        const layer *L = &m->layers[l];
        const struct {
            const char *k;
            const linear *lin;
        } lins[] = {{"q", &L->q},   {"k", &L->k},       {"v", &L->v},      {"o", &L->o},
                    {"up", &L->up}, {"gate", &L->gate}, {"down", &L->down}};
        for (size_t i = 0; i < sizeof lins / sizeof lins[0]; i++) {
            if (!lins[i].lin->N)
                continue; /* OPT has no gate */
            snprintf(n, sizeof n, "layers.%u.%s", l, lins[i].k);
            put_linear(&w, n, lins[i].lin);
        }
        snprintf(n, sizeof n, "layers.%u.attn_norm", l);
        put_norm(&w, n, &L->attn_norm, c->hidden);
        snprintf(n, sizeof n, "layers.%u.ffn_norm", l);
        put_norm(&w, n, &L->ffn_norm, c->hidden);
    }
    /* The vocabulary tables as the model holds them: fp16 for the quantized
     * schemes (qs_model_tables_f16), fp32 for the fp16 scheme on CPU ranks. */
    put(&w, "embed", "F32", m->embed, m->vr, c->embed_dim, 4);
    put(&w, "embed", "F16", m->embed16, m->vr, c->embed_dim, 2);
    put(&w, "lm_head", "F32", m->lm_head, m->vr, c->hidden, 4);
    put(&w, "lm_head", "F16", m->lm_head16, m->vr, c->hidden, 2);
    put(&w, "pos", "F32", m->pos, (uint64_t)c->max_pos + 2, c->hidden, 4);
    put(&w, "proj_in", "F32", m->proj_in, c->hidden, c->embed_dim, 4);
    put(&w, "proj_out", "F32", m->proj_out, c->embed_dim, c->hidden, 4);
    put_norm(&w, "final_norm", &m->final_norm, c->hidden);
    if (w.err) {
        writer_free(&w);
        return w.err;
    }

    cJSON *meta = cJSON_CreateObject();
    char num[64], *cfg = config_json(c);
    cJSON_AddStringToObject(meta, "format", FORMAT);
    cJSON_AddStringToObject(meta, "version", "1");
    cJSON_AddStringToObject(meta, "scheme", qs_scheme_name(m->quant.scheme));
    snprintf(num, sizeof num, "%d", m->quant.bits);
    cJSON_AddStringToObject(meta, "bits", num);
    snprintf(num, sizeof num, "%u", m->quant.group_size);
    cJSON_AddStringToObject(meta, "group_size", num);
    if (m->quant.scheme == QS_SCHEME_W4A4) {
        snprintf(num, sizeof num, "%u", m->quant.outliers);
        cJSON_AddStringToObject(meta, "outliers", num);
    }
    if (m->smooth_alpha > 0)
        snprintf(num, sizeof num, "%g", m->smooth_alpha);
    else
        snprintf(num, sizeof num, "none");
    cJSON_AddStringToObject(meta, "smoothing", num);
    cJSON_AddStringToObject(meta, "rope", m->rope_adjacent ? "adjacent" : "halves");
    snprintf(num, sizeof num, "%d", m->size);
    cJSON_AddStringToObject(meta, "tp", num);
    snprintf(num, sizeof num, "%d", m->rank);
    cJSON_AddStringToObject(meta, "rank", num);
    cJSON_AddStringToObject(meta, "config", cfg ? cfg : "{}");
    cJSON_free(cfg);

    char path[4096];
    rank_path(path, sizeof path, dir, m->rank, m->size);
    int err = write_file(path, &w, meta);
    writer_free(&w);
    /* Every rank must have written its file before the checkpoint exists. */
    int32_t ok = err == QS_OK, all = 0;
    int cerr = qs_comm_allreduce_sum(m->tp, &ok, &all, 1, QS_COLL_I32, QS_COLL_HOST);
    if (err)
        return err;
    if (cerr)
        return cerr;
    if (all != m->size)
        return qs_seterr(QS_EIO, "another rank failed to write its part of %s", dir);
    return QS_OK;
}

/* ---- Reading ------------------------------------------------------------ */

int qs_checkpoint_has_rank(const char *dir, int rank, int size)
{
    char path[4096];
    rank_path(path, sizeof path, dir, rank, size);
    return access(path, R_OK) == 0;
}

int qs_is_checkpoint(const char *dir)
{
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return 0;
    qs_model_config c;
    qs_quant q;
    uint32_t tp;
    return qs_checkpoint_info(dir, &c, &q, &tp) == QS_OK;
}

static int meta_str(const qs_weights *w, const char *key, char *out, size_t n)
{
    const char *s;
    size_t len;
    int err = qs_weights_meta_str(w, key, &s, &len);
    if (err)
        return err;
    if (len >= n)
        return qs_seterr(QS_EFORMAT, "checkpoint metadata '%s' is too long", key);
    memcpy(out, s, len);
    out[len] = '\0';
    return QS_OK;
}

static int meta_u32(const qs_weights *w, const char *key, uint32_t *out)
{
    char buf[32], *end;
    int err = meta_str(w, key, buf, sizeof buf);
    if (err)
        return err;
    errno = 0;
    unsigned long v = strtoul(buf, &end, 10);
    if (errno || *end || buf[0] == '\0' || v > UINT32_MAX)
        return qs_seterr(QS_EFORMAT, "checkpoint metadata '%s' = '%s' is not a number", key, buf);
    *out = (uint32_t)v;
    return QS_OK;
}

static double cfg_num(const cJSON *o, const char *k, int *bad)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!cJSON_IsNumber(j) || j->valuedouble < 0) {
        *bad = 1;
        return 0;
    }
    return j->valuedouble;
}

int qs_checkpoint_info(const char *dir, qs_model_config *cfg, qs_quant *q, uint32_t *tp)
{
    char path[4096];
    struct stat st;
    uint32_t size = 0;
    /* Find the split from rank 0's file name. */
    for (uint32_t p = 1; p <= 4096 && !size; p++) {
        rank_path(path, sizeof path, dir, 0, (int)p);
        if (stat(path, &st) == 0)
            size = p;
    }
    if (!size)
        return qs_seterr(QS_ENOTFOUND,
                         "%s holds no qshard checkpoint (rank-00000-of-*.safetensors): "
                         "save one with `qctl load ... --save %s`",
                         dir, dir);
    qs_weights *w;
    int err = qs_weights_open(path, &w);
    if (err)
        return err;
    char fmt[64], scheme[16], cj[4096];
    uint32_t bits = 0, group = 0, mtp = 0;
    if ((err = meta_str(w, "format", fmt, sizeof fmt)) || strcmp(fmt, FORMAT) != 0) {
        err = qs_seterr(QS_EFORMAT, "%s is not a qshard checkpoint (metadata format is not %s)",
                        path, FORMAT);
        goto out;
    }
    if ((err = meta_str(w, "scheme", scheme, sizeof scheme)) ||
        (err = qs_scheme_parse(scheme, &q->scheme)) || (err = meta_u32(w, "bits", &bits)) ||
        (err = meta_u32(w, "group_size", &group)) || (err = meta_u32(w, "tp", &mtp)) ||
        (err = meta_str(w, "config", cj, sizeof cj)))
        goto out;
    if (mtp != size) {
        err = qs_seterr(QS_EFORMAT, "%s says tp %u but is named for %u ranks", path, mtp, size);
        goto out;
    }
    q->bits = (int)bits;
    q->group_size = group;
    q->outliers = 0;
    if (q->scheme == QS_SCHEME_W4A4 && (err = meta_u32(w, "outliers", &q->outliers)))
        goto out;
    if ((err = qs_quant_check(q)))
        goto out;
    cJSON *o = cJSON_Parse(cj);
    int bad = !cJSON_IsObject(o);
    qs_model_config c = {0};
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(o, "name");
    const cJSON *arch = cJSON_GetObjectItemCaseSensitive(o, "arch");
    const cJSON *norm = cJSON_GetObjectItemCaseSensitive(o, "norm");
    bad |= !cJSON_IsString(name) || !cJSON_IsString(arch) || !cJSON_IsString(norm);
    if (!bad) {
        snprintf(c.name, sizeof c.name, "%s", name->valuestring);
        c.arch = strcmp(arch->valuestring, "opt") == 0 ? QS_ARCH_OPT : QS_ARCH_LLAMA;
        c.norm = strcmp(norm->valuestring, "layer") == 0 ? QS_NORM_LAYER : QS_NORM_RMS;
        c.layers = (uint32_t)cfg_num(o, "layers", &bad);
        c.hidden = (uint32_t)cfg_num(o, "hidden", &bad);
        c.heads = (uint32_t)cfg_num(o, "heads", &bad);
        c.kv_heads = (uint32_t)cfg_num(o, "kv_heads", &bad);
        c.head_dim = (uint32_t)cfg_num(o, "head_dim", &bad);
        c.ffn = (uint32_t)cfg_num(o, "ffn", &bad);
        c.vocab = (uint32_t)cfg_num(o, "vocab", &bad);
        c.max_pos = (uint32_t)cfg_num(o, "max_pos", &bad);
        c.embed_dim = (uint32_t)cfg_num(o, "embed_dim", &bad);
        c.tied_embeddings = (int)cfg_num(o, "tied_embeddings", &bad);
        c.gated_ffn = (int)cfg_num(o, "gated_ffn", &bad);
        c.linear_bias = (int)cfg_num(o, "linear_bias", &bad);
        c.learned_pos = (int)cfg_num(o, "learned_pos", &bad);
        c.final_norm = (int)cfg_num(o, "final_norm", &bad);
        c.norm_eps = (float)cfg_num(o, "norm_eps", &bad);
        c.rope_theta = (float)cfg_num(o, "rope_theta", &bad);
    }
    cJSON_Delete(o);
    if (bad) {
        err = qs_seterr(QS_EFORMAT, "%s: the configuration in its metadata is malformed", path);
        goto out;
    }
    if ((err = qs_config_check(&c)))
        goto out;
    *cfg = c;
    *tp = size;
out:
    qs_weights_close(w);
    return err;
}

/* Copies a tensor of exactly `bytes` bytes, or names what disagrees. */
static int take(const qs_weights *w, const char *name, const char *dtype_want, void *dst,
                uint64_t bytes)
{
    const qs_tensor_info *t = qs_weights_find(w, name);
    if (!t)
        return qs_seterr(QS_EFORMAT, "the checkpoint has no tensor '%s'", name);
    if (strcmp(qs_dtype_name(t->dtype), dtype_want) != 0 || t->nbytes != bytes)
        return qs_seterr(QS_EFORMAT,
                         "%s: tensor '%s' is %s of %llu bytes, the layout needs %s of "
                         "%llu: was it saved for another model or split?",
                         t->file, name, qs_dtype_name(t->dtype), (unsigned long long)t->nbytes,
                         dtype_want, (unsigned long long)bytes);
    memcpy(dst, t->data, bytes);
    return QS_OK;
}

static int alloc_take(const qs_weights *w, const char *name, const char *dtype, uint64_t bytes,
                      void **out)
{
    *out = malloc(bytes ? bytes : 1);
    if (!*out)
        return qs_seterr(QS_ENOMEM, "out of memory loading '%s'", name);
    return take(w, name, dtype, *out, bytes);
}

/* A vocabulary table of count values, stored F16 or F32, into the form the
 * model keeps (fp16 for the quantized schemes, fp32 for the fp16 scheme). */
static int take_table(const qs_model *m, const qs_weights *w, const char *name, uint64_t count,
                      float **t32, uint16_t **t16)
{
    const qs_tensor_info *t = qs_weights_find(w, name);
    if (!t)
        return qs_seterr(QS_EFORMAT, "the checkpoint has no tensor '%s'", name);
    int half = t->dtype == QS_DTYPE_F16, want_half = m->quant.scheme != QS_SCHEME_FP16;
    int err = half ? alloc_take(w, name, "F16", count * 2, (void **)t16)
                   : alloc_take(w, name, "F32", count * 4, (void **)t32);
    if (err || half == want_half)
        return err;
    /* Stored in the other width: widen or narrow it (widening is exact). */
    if (half) {
        *t32 = malloc(count * sizeof **t32);
        if (!*t32)
            return qs_seterr(QS_ENOMEM, "out of memory loading '%s'", name);
        qs_f16_to_f32_row(*t16, count, *t32);
        free(*t16);
        *t16 = NULL;
        return QS_OK;
    }
    *t16 = malloc(count * sizeof **t16);
    if (!*t16)
        return qs_seterr(QS_ENOMEM, "out of memory loading '%s'", name);
    for (uint64_t i = 0; i < count; i++)
        (*t16)[i] = qs_fp32_to_fp16((*t32)[i]);
    free(*t32);
    *t32 = NULL;
    return QS_OK;
}

/* W4A4 from its plain codes; qs_w4_from_codes refuses codes out of range
 * and an order that is not a permutation, so damage is named, not used. */
static int take_w4(const qs_model *m, const qs_weights *w, const char *prefix, linear *l)
{
    char n[128];
    size_t N = l->N, K = l->K;
    int32_t ko = 0;
    int8_t *codes = NULL;
    float *s4 = NULL, *s8 = NULL;
    uint32_t *perm = NULL;
    snprintf(n, sizeof n, "%s.ko", prefix);
    int err = take(w, n, "I32", &ko, 4);
    if (!err && (ko < 0 || (size_t)ko > K))
        err = qs_seterr(QS_EFORMAT,
                        "%s says %d outlier channels of %zu: the checkpoint is damaged; save it "
                        "again with qctl load --save",
                        n, ko, K);
    size_t G = m->quant.group_size ? m->quant.group_size : (K + 7) / 8 * 8;
    size_t K4 = K - (size_t)(ko > 0 ? ko : 0), ng = K4 ? (K4 + G - 1) / G : 0;
    if (!err) {
        snprintf(n, sizeof n, "%s.w4", prefix);
        err = alloc_take(w, n, "I8", (uint64_t)N * K, (void **)&codes);
    }
    if (!err && ng) {
        snprintf(n, sizeof n, "%s.s4", prefix);
        err = alloc_take(w, n, "F32", (uint64_t)N * ng * 4, (void **)&s4);
    }
    if (!err && ko) {
        snprintf(n, sizeof n, "%s.s8", prefix);
        err = alloc_take(w, n, "F32", (uint64_t)N * 4, (void **)&s8);
    }
    if (!err) {
        snprintf(n, sizeof n, "%s.perm", prefix);
        err = alloc_take(w, n, "I32", (uint64_t)K * 4, (void **)&perm);
    }
    if (!err && (err = qs_w4_from_codes(&l->w4, codes, s4, s8, N, K, perm, (size_t)ko, G))) {
        char why[512];
        snprintf(why, sizeof why, "%s", qs_errmsg());
        err = qs_seterr(err, "%s in the checkpoint: %s; save it again with qctl load --save",
                        prefix, why);
    }
    free(codes), free(s4), free(s8), free(perm);
    return err;
}

static int take_linear(qs_model *m, const qs_weights *w, const char *prefix, linear *l, size_t N,
                       size_t K, int row_parallel)
{
    char n[128];
    int err = QS_OK;
    l->N = N, l->K = K, l->scheme = m->quant.scheme;
    switch (l->scheme) {
    case QS_SCHEME_FP16:
        snprintf(n, sizeof n, "%s.weight", prefix);
        err = alloc_take(w, n, "F32", (uint64_t)N * K * 4, (void **)&l->w32);
        break;
    case QS_SCHEME_W8A8: {
        uint32_t g = m->quant.group_size;
        size_t ng = qs_w8_groups(K, g);
        l->w8.N = N, l->w8.K = K, l->w8.Kp = (K + 3) / 4 * 4;
        l->w8.group = qs_w8_group(K, g);
        snprintf(n, sizeof n, "%s.w8", prefix);
        if ((err = alloc_take(w, n, "I8", (uint64_t)N * l->w8.Kp, (void **)&l->w8.w)))
            break;
        snprintf(n, sizeof n, "%s.scale", prefix);
        if ((err = alloc_take(w, n, "F32", (uint64_t)N * 4, (void **)&l->w8.scale)))
            break;
        snprintf(n, sizeof n, "%s.sum", prefix);
        if ((err = alloc_take(w, n, "I32", (uint64_t)N * ng * 4, (void **)&l->w8.sum)))
            break;
        /* The sums are derived from the codes: a mismatch means a damaged file,
         * and would silently shift every output of the VNNI path. */
        int32_t *stored = l->w8.sum;
        if (!(l->w8.sum = malloc(N * ng * 4))) {
            l->w8.sum = stored;
            err = qs_seterr(QS_ENOMEM, "out of memory checking %s", n);
            break;
        }
        qs_w8_sums(&l->w8);
        if (memcmp(stored, l->w8.sum, N * ng * 4))
            err = qs_seterr(QS_EFORMAT,
                            "%s does not match the codes of %s.w8: the checkpoint is damaged; "
                            "save it again with qctl load --save",
                            n, prefix);
        free(stored);
        break;
    }
    case QS_SCHEME_BCQ:
    case QS_SCHEME_RTN: {
        size_t bb, ab, zb;
        unsigned q = (unsigned)m->quant.bits;
        if ((err = qs_bcq_init(&l->bcq, N, K, q, m->quant.group_size)) ||
            (err = qs_bcq_sizes(N, K, q, m->quant.group_size, &bb, &ab, &zb)))
            break;
        snprintf(n, sizeof n, "%s.bits", prefix);
        if ((err = take(w, n, "I32", l->bcq.bits, bb)))
            break;
        snprintf(n, sizeof n, "%s.alpha", prefix);
        if ((err = take(w, n, "F16", l->bcq.alpha, ab)))
            break;
        snprintf(n, sizeof n, "%s.z", prefix);
        err = take(w, n, "F16", l->bcq.z, zb);
        break;
    }
    case QS_SCHEME_W4A4:
        err = take_w4(m, w, prefix, l);
        break;
    }
    if (err)
        return err;
    m->bytes.linear += qs_linear_bytes(l);
    if (m->cfg.linear_bias) {
        snprintf(n, sizeof n, "%s.bias", prefix);
        if ((err = alloc_take(w, n, "F32", (uint64_t)N * 4, (void **)&l->bias)))
            return err;
        l->add_bias = !row_parallel || m->rank == 0;
        m->bytes.fp16 += N * 4;
    }
    return QS_OK;
}

static int take_norm(qs_model *m, const qs_weights *w, const char *prefix, norm *nm)
{
    char n[128];
    uint64_t h = m->cfg.hidden;
    snprintf(n, sizeof n, "%s.weight", prefix);
    int err = alloc_take(w, n, "F32", h * 4, (void **)&nm->w);
    if (!err && m->cfg.norm == QS_NORM_LAYER) {
        snprintf(n, sizeof n, "%s.bias", prefix);
        err = alloc_take(w, n, "F32", h * 4, (void **)&nm->b);
    }
    m->bytes.fp16 += h * 4 * (nm->b ? 2 : 1);
    return err;
}

int qs_checkpoint_load(qs_model *m, const char *dir)
{
    char path[4096], buf[64];
    rank_path(path, sizeof path, dir, m->rank, m->size);
    qs_weights *w;
    int err = qs_weights_open(path, &w);
    if (err)
        return err == QS_ENOTFOUND
                   ? qs_seterr(QS_EINVAL,
                               "%s has no part for rank %d of %d: a checkpoint loads "
                               "on the number of ranks it was saved from",
                               dir, m->rank, m->size)
                   : err;
    uint32_t r = 0;
    if ((err = meta_u32(w, "rank", &r)) || r != (uint32_t)m->rank) {
        err = qs_seterr(QS_EFORMAT, "%s is not rank %d's part", path, m->rank);
        goto out;
    }
    if (meta_str(w, "rope", buf, sizeof buf) == QS_OK)
        m->rope_adjacent = strcmp(buf, "adjacent") == 0;
    if (meta_str(w, "smoothing", buf, sizeof buf) == QS_OK && strcmp(buf, "none") != 0)
        m->smooth_alpha = strtof(buf, NULL);
    const qs_model_config *c = &m->cfg;
    size_t H = c->hidden, hd = m->hd, E = c->embed_dim;
    char n[96];
    for (uint32_t l = 0; l < c->layers && !err; l++) {
        layer *L = &m->layers[l];
        const struct {
            const char *k;
            linear *lin;
            size_t N, K;
            int row;
        } lins[] = {{"q", &L->q, m->hq * hd, H, 0},
                    {"k", &L->k, m->hkv * hd, H, 0},
                    {"v", &L->v, m->hkv * hd, H, 0},
                    {"o", &L->o, H, m->hq * hd, 1},
                    {"up", &L->up, m->fr, H, 0},
                    {"down", &L->down, H, m->fr, 1},
                    {"gate", &L->gate, c->gated_ffn ? m->fr : 0, H, 0}};
        for (size_t i = 0; i < sizeof lins / sizeof lins[0] && !err; i++) {
            if (!lins[i].N)
                continue;
            snprintf(n, sizeof n, "layers.%u.%s", l, lins[i].k);
            err = take_linear(m, w, n, lins[i].lin, lins[i].N, lins[i].K, lins[i].row);
        }
        snprintf(n, sizeof n, "layers.%u.attn_norm", l);
        if (!err)
            err = take_norm(m, w, n, &L->attn_norm);
        snprintf(n, sizeof n, "layers.%u.ffn_norm", l);
        if (!err)
            err = take_norm(m, w, n, &L->ffn_norm);
    }
    if (!err)
        err = take_table(m, w, "embed", (uint64_t)m->vr * E, &m->embed, &m->embed16);
    if (!err && !c->tied_embeddings)
        err = take_table(m, w, "lm_head", (uint64_t)m->vr * H, &m->lm_head, &m->lm_head16);
    if (!err && c->learned_pos)
        err = alloc_take(w, "pos", "F32", ((uint64_t)c->max_pos + 2) * H * 4, (void **)&m->pos);
    if (!err && E != H)
        err = alloc_take(w, "proj_in", "F32", (uint64_t)H * E * 4, (void **)&m->proj_in) ||
                      alloc_take(w, "proj_out", "F32", (uint64_t)E * H * 4, (void **)&m->proj_out)
                  ? QS_EFORMAT
                  : QS_OK;
    if (!err && c->final_norm)
        err = take_norm(m, w, "final_norm", &m->final_norm);
    if (!err) {
        m->bytes.fp16 += (uint64_t)m->vr * E * (m->embed16 ? 2 : 4) * (c->tied_embeddings ? 1 : 2);
        if (c->learned_pos)
            m->bytes.fp16 += ((uint64_t)c->max_pos + 2) * H * 4;
        if (E != H)
            m->bytes.fp16 += 2ull * H * E * 4;
    }
out:
    qs_weights_close(w);
    return err;
}
