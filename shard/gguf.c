/* GGUF v2/v3 reader (llama.cpp's format): header, metadata and tensor table,
 * every count and offset checked against the bytes that remain.
 *
 *   "GGUF" u32 version, u64 tensor_count, u64 kv_count
 *   kv_count x  { string key, u32 type, value }
 *   tensor_count x { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset }
 *   padding to general.alignment (default 32), then the tensor data
 * Strings are u64 length + bytes; ne[0] is the innermost dimension.
 */
#include "weights_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_NAME 4096u
#define MAX_KV   (1u << 20)

typedef struct cursor {
    const uint8_t *p, *end;
    const char *file;
} cursor;

static int need(cursor *c, uint64_t n, const char *what)
{
    if ((uint64_t)(c->end - c->p) < n)
        return qs_seterr(QS_EFORMAT,
                         "%s: truncated GGUF file: %s runs past the end (download it again)",
                         c->file, what);
    return QS_OK;
}

static int rd_u32(cursor *c, uint32_t *v, const char *what)
{
    int err = need(c, 4, what);
    if (!err) {
        memcpy(v, c->p, 4);
        c->p += 4;
    }
    return err;
}

static int rd_u64(cursor *c, uint64_t *v, const char *what)
{
    int err = need(c, 8, what);
    if (!err) {
        memcpy(v, c->p, 8);
        c->p += 8;
    }
    return err;
}

static int rd_str(cursor *c, const char **s, uint64_t *n, const char *what)
{
    int err = rd_u64(c, n, what);
    if (!err)
        err = need(c, *n, what);
    if (!err) {
        *s = (const char *)c->p;
        c->p += *n;
    }
    return err;
}

static uint64_t scalar_size(uint32_t type)
{
    switch (type) {
    case GGUF_U8:
    case GGUF_I8:
    case GGUF_BOOL:
        return 1;
    case GGUF_U16:
    case GGUF_I16:
        return 2;
    case GGUF_U32:
    case GGUF_I32:
    case GGUF_F32:
        return 4;
    case GGUF_U64:
    case GGUF_I64:
    case GGUF_F64:
        return 8;
    default:
        return 0;
    }
}

/* Steps over one value of the given type; arrays of arrays are refused. */
static int skip_value(cursor *c, uint32_t type, int depth, const char *key)
{
    uint64_t n = scalar_size(type);
    if (n)
        return need(c, n, key) ? QS_EFORMAT : (c->p += n, QS_OK);
    if (type == GGUF_STRING) {
        const char *s;
        return rd_str(c, &s, &n, key);
    }
    if (type != GGUF_ARRAY || depth > 0)
        return qs_seterr(QS_EFORMAT, "%s: metadata '%s' has unsupported value type %u", c->file,
                         key, type);
    uint32_t et;
    uint64_t count;
    int err = rd_u32(c, &et, key);
    if (!err)
        err = rd_u64(c, &count, key);
    if (err)
        return err;
    uint64_t es = scalar_size(et);
    if (es) {
        if (count > (uint64_t)(c->end - c->p) / es)
            return qs_seterr(QS_EFORMAT,
                             "%s: metadata array '%s' of %llu elements runs past the "
                             "end of the file",
                             c->file, key, (unsigned long long)count);
        c->p += count * es;
        return QS_OK;
    }
    /* Each element takes at least 8 bytes (a string's length), which bounds count. */
    if (count > (uint64_t)(c->end - c->p) / 8)
        return qs_seterr(QS_EFORMAT,
                         "%s: metadata array '%s' of %llu elements runs past the end: the "
                         "file is truncated or damaged (download it again)",
                         c->file, key, (unsigned long long)count);
    for (uint64_t i = 0; i < count; i++)
        if ((err = skip_value(c, et, depth + 1, key)))
            return err;
    return QS_OK;
}

static int ggml_type(uint32_t t, qs_dtype *out)
{
    switch (t) {
    case 0:
        *out = QS_DTYPE_F32;
        return 1;
    case 1:
        *out = QS_DTYPE_F16;
        return 1;
    case 2:
        *out = QS_DTYPE_Q4_0;
        return 1;
    case 3:
        *out = QS_DTYPE_Q4_1;
        return 1;
    case 8:
        *out = QS_DTYPE_Q8_0;
        return 1;
    case 24:
        *out = QS_DTYPE_I8;
        return 1;
    case 26:
        *out = QS_DTYPE_I32;
        return 1;
    case 30:
        *out = QS_DTYPE_BF16;
        return 1;
    default:
        return 0;
    }
}

int qs_gguf_parse(qs_weights *w, const uint8_t *base, size_t size)
{
    const char *file = qs_map_path(w);
    cursor c = {base + 4, base + size, file};
    uint32_t version;
    uint64_t ntensors, nkv;
    int err = rd_u32(&c, &version, "the header");
    if (!err)
        err = rd_u64(&c, &ntensors, "the header");
    if (!err)
        err = rd_u64(&c, &nkv, "the header");
    if (err)
        return err;
    if (version != 2 && version != 3)
        return qs_seterr(QS_EFORMAT, "%s: GGUF version %u is not supported (2 and 3 are)", file,
                         version);
    if (nkv > MAX_KV || ntensors > (uint64_t)(c.end - c.p) / 24)
        return qs_seterr(QS_EFORMAT,
                         "%s: GGUF header claims %llu metadata entries and %llu "
                         "tensors, more than the file can hold: it is truncated or damaged "
                         "(download it again)",
                         file, (unsigned long long)nkv, (unsigned long long)ntensors);

    /* Metadata: index each entry so that look-ups need not walk the file. */
    w->meta = calloc(nkv ? nkv : 1, sizeof *w->meta);
    if (!w->meta)
        return qs_seterr(QS_ENOMEM, "out of memory reading %s", file);
    uint32_t alignment = 32;
    for (uint64_t i = 0; i < nkv; i++) {
        const char *k;
        uint64_t klen;
        uint32_t type;
        if ((err = rd_str(&c, &k, &klen, "a metadata key")))
            return err;
        if (klen == 0 || klen > MAX_NAME)
            return qs_seterr(QS_EFORMAT, "%s: metadata key %llu has length %llu", file,
                             (unsigned long long)i, (unsigned long long)klen);
        qs_meta *m = &w->meta[w->nmeta];
        if (!(m->key = qs_weights_strdup(w, k, klen)))
            return qs_seterr(QS_ENOMEM, "out of memory reading %s", file);
        if ((err = rd_u32(&c, &type, m->key)))
            return err;
        m->type = type;
        m->val = c.p;
        if ((err = skip_value(&c, type, 0, m->key)))
            return err;
        m->end = c.p;
        w->nmeta++;
        if (strcmp(m->key, "general.alignment") == 0) {
            if (type != GGUF_U32)
                return qs_seterr(QS_EFORMAT, "%s: general.alignment is not a u32", file);
            memcpy(&alignment, m->val, 4);
            if (alignment == 0 || (alignment & (alignment - 1)) || alignment > 65536)
                return qs_seterr(QS_EFORMAT,
                                 "%s: general.alignment %u is not a power of two "
                                 "up to 65536",
                                 file, alignment);
        }
    }

    /* Tensor table; offsets are relative to the aligned start of the data. */
    size_t first = w->ntensors;
    uint64_t *offsets = calloc(ntensors ? ntensors : 1, sizeof *offsets);
    if (!offsets)
        return qs_seterr(QS_ENOMEM, "out of memory reading %s", file);
    for (uint64_t i = 0; i < ntensors && !err; i++) {
        qs_tensor_info t = {.file = file};
        const char *name;
        uint64_t nlen, ne[QS_MAX_DIMS];
        uint32_t type;
        if ((err = rd_str(&c, &name, &nlen, "a tensor name")))
            break;
        if (nlen == 0 || nlen > MAX_NAME) {
            err = qs_seterr(QS_EFORMAT, "%s: tensor %llu has a name of length %llu", file,
                            (unsigned long long)i, (unsigned long long)nlen);
            break;
        }
        if (!(t.name = qs_weights_strdup(w, name, nlen))) {
            err = qs_seterr(QS_ENOMEM, "out of memory reading %s", file);
            break;
        }
        if ((err = rd_u32(&c, &t.ndim, t.name)))
            break;
        if (t.ndim == 0 || t.ndim > QS_MAX_DIMS) {
            err = qs_seterr(QS_EFORMAT, "%s: tensor '%s' has %u dimensions (1 to %d supported)",
                            file, t.name, t.ndim, QS_MAX_DIMS);
            break;
        }
        for (uint32_t d = 0; d < t.ndim && !err; d++)
            err = rd_u64(&c, &ne[d], t.name);
        if (!err)
            err = rd_u32(&c, &type, t.name);
        if (!err)
            err = rd_u64(&c, &offsets[i], t.name);
        if (err)
            break;
        if (!ggml_type(type, &t.dtype)) {
            err = qs_seterr(QS_ENOTSUP,
                            "%s: tensor '%s' has ggml type %u; qshard reads F32, F16, "
                            "BF16, Q8_0, Q4_0 and Q4_1: re-export the model with one "
                            "of those",
                            file, t.name, type);
            break;
        }
        for (uint32_t d = 0; d < t.ndim; d++)
            t.shape[d] = ne[t.ndim - 1 - d];
        if ((err = qs_tensor_size(&t)) || (err = qs_add_tensor(w, &t)))
            break;
    }
    if (!err) {
        uint64_t pos = (uint64_t)(c.p - base);
        uint64_t data = (pos + alignment - 1) / alignment * alignment;
        for (size_t i = first; i < w->ntensors; i++) {
            qs_tensor_info *t = &w->tensors[i];
            uint64_t off = offsets[i - first];
            if (off % alignment || data > size || off > size - data ||
                t->nbytes > size - data - off) {
                err = qs_seterr(
                    QS_EFORMAT,
                    "%s: tensor '%s' (%llu bytes at offset %llu) lies "
                    "outside the file of %zu bytes or is misaligned: the file is truncated or "
                    "damaged (download it again)",
                    file, t->name, (unsigned long long)t->nbytes, (unsigned long long)off, size);
                break;
            }
            t->data = base + data + off;
        }
    }
    free(offsets);
    return err;
}

/* ---- Metadata ----------------------------------------------------------- */

static const qs_meta *meta_find(const qs_weights *w, const char *key)
{
    for (size_t i = 0; w && i < w->nmeta; i++)
        if (strcmp(w->meta[i].key, key) == 0)
            return &w->meta[i];
    qs_seterr(QS_ENOTFOUND, "%s has no metadata '%s'", w && w->nmaps ? w->maps[0].path : "?", key);
    return NULL;
}

static int read_number(uint32_t type, const uint8_t *p, double *v)
{
    union {
        uint8_t u8;
        int8_t i8;
        uint16_t u16;
        int16_t i16;
        uint32_t u32;
        int32_t i32;
        float f32;
        uint64_t u64;
        int64_t i64;
        double f64;
    } u;
    uint64_t n = scalar_size(type);
    if (!n)
        return QS_EFORMAT;
    memcpy(&u, p, n);
    switch (type) {
    case GGUF_U8:
    case GGUF_BOOL:
        *v = u.u8;
        break;
    case GGUF_I8:
        *v = u.i8;
        break;
    case GGUF_U16:
        *v = u.u16;
        break;
    case GGUF_I16:
        *v = u.i16;
        break;
    case GGUF_U32:
        *v = u.u32;
        break;
    case GGUF_I32:
        *v = u.i32;
        break;
    case GGUF_F32:
        *v = u.f32;
        break;
    case GGUF_U64:
        *v = (double)u.u64;
        break;
    case GGUF_I64:
        *v = (double)u.i64;
        break;
    case GGUF_F64:
        *v = u.f64;
        break;
    }
    return QS_OK;
}

int qs_weights_meta_u64(const qs_weights *w, const char *key, uint64_t *out)
{
    const qs_meta *m = meta_find(w, key);
    if (!m)
        return QS_ENOTFOUND;
    double v;
    if (m->type == GGUF_U64) {
        memcpy(out, m->val, 8);
        return QS_OK;
    }
    if (m->type == GGUF_F32 || m->type == GGUF_F64 || read_number(m->type, m->val, &v) || v < 0)
        return qs_seterr(QS_EFORMAT, "%s: metadata '%s' is not a non-negative integer",
                         w->maps[0].path, key);
    *out = (uint64_t)v;
    return QS_OK;
}

int qs_weights_meta_f32(const qs_weights *w, const char *key, float *out)
{
    const qs_meta *m = meta_find(w, key);
    if (!m)
        return QS_ENOTFOUND;
    double v;
    if (read_number(m->type, m->val, &v))
        return qs_seterr(QS_EFORMAT, "%s: metadata '%s' is not a number", w->maps[0].path, key);
    *out = (float)v;
    return QS_OK;
}

int qs_weights_meta_str(const qs_weights *w, const char *key, const char **s, size_t *len)
{
    const qs_meta *m = meta_find(w, key);
    if (!m)
        return QS_ENOTFOUND;
    if (m->type != GGUF_STRING)
        return qs_seterr(QS_EFORMAT, "%s: metadata '%s' is not a string", w->maps[0].path, key);
    uint64_t n;
    memcpy(&n, m->val, 8);
    *s = (const char *)m->val + 8;
    *len = (size_t)n;
    return QS_OK;
}

int qs_weights_meta_array(const qs_weights *w, const char *key, qs_meta_array *a)
{
    const qs_meta *m = meta_find(w, key);
    if (!m)
        return QS_ENOTFOUND;
    if (m->type != GGUF_ARRAY)
        return qs_seterr(QS_EFORMAT, "%s: metadata '%s' is not an array", w->maps[0].path, key);
    memcpy(&a->type, m->val, 4);
    memcpy(&a->count, m->val + 4, 8);
    a->p = m->val + 12;
    a->end = m->end;
    return QS_OK;
}

/* The array was bounds-checked when the file was opened; these re-check the
 * cursor so that a caller reading past count gets an error, not a fault. */
int qs_meta_array_next_str(qs_meta_array *a, const char **s, size_t *len)
{
    uint64_t n;
    if (a->type != GGUF_STRING || a->end - a->p < 8)
        return qs_seterr(QS_EFORMAT, "metadata array is not strings, or is exhausted");
    memcpy(&n, a->p, 8);
    if ((uint64_t)(a->end - a->p - 8) < n)
        return qs_seterr(QS_EFORMAT, "metadata array string runs past its array");
    *s = (const char *)a->p + 8;
    *len = (size_t)n;
    a->p += 8 + n;
    return QS_OK;
}

int qs_meta_array_next_f64(qs_meta_array *a, double *v)
{
    uint64_t n = scalar_size(a->type);
    if (!n || (uint64_t)(a->end - a->p) < n)
        return qs_seterr(QS_EFORMAT, "metadata array is not numbers, or is exhausted");
    read_number(a->type, a->p, v);
    a->p += n;
    return QS_OK;
}

/* ---- Configuration ------------------------------------------------------ */

static int meta_u32(const qs_weights *w, const char *arch, const char *key, uint32_t *out)
{
    char k[160];
    snprintf(k, sizeof k, "%s.%s", arch, key);
    uint64_t v;
    int err = qs_weights_meta_u64(w, k, &v);
    if (err)
        return err;
    if (v > UINT32_MAX)
        return qs_seterr(QS_EFORMAT, "%s: metadata '%s' = %llu is out of range", w->maps[0].path, k,
                         (unsigned long long)v);
    *out = (uint32_t)v;
    return QS_OK;
}

int qs_config_from_gguf(const qs_weights *w, qs_model_config *out)
{
    const char *arch = NULL;
    size_t alen = 0;
    int err = qs_weights_meta_str(w, "general.architecture", &arch, &alen);
    if (err)
        return err;
    if (alen != 5 || memcmp(arch, "llama", 5) != 0)
        return qs_seterr(QS_ENOTSUP,
                         "%s: architecture '%.*s' is not supported from GGUF (llama "
                         "is)",
                         w->maps[0].path, (int)(alen < 64 ? alen : 64), arch);
    qs_model_config m = {.arch = QS_ARCH_LLAMA,
                         .norm = QS_NORM_RMS,
                         .gated_ffn = 1,
                         .final_norm = 1,
                         .rope_theta = 10000.0f,
                         .norm_eps = 1e-5f};
    const char *name = NULL;
    size_t nlen = 0;
    if (qs_weights_meta_str(w, "general.name", &name, &nlen) == QS_OK)
        snprintf(m.name, sizeof m.name, "%.*s", (int)(nlen < 63 ? nlen : 63), name);
    else
        snprintf(m.name, sizeof m.name, "gguf-llama");
    if ((err = meta_u32(w, "llama", "block_count", &m.layers)) ||
        (err = meta_u32(w, "llama", "embedding_length", &m.hidden)) ||
        (err = meta_u32(w, "llama", "attention.head_count", &m.heads)) ||
        (err = meta_u32(w, "llama", "feed_forward_length", &m.ffn)) ||
        (err = meta_u32(w, "llama", "context_length", &m.max_pos)))
        return err;
    if (meta_u32(w, "llama", "attention.head_count_kv", &m.kv_heads))
        m.kv_heads = m.heads;
    qs_weights_meta_f32(w, "llama.rope.freq_base", &m.rope_theta);
    qs_weights_meta_f32(w, "llama.attention.layer_norm_rms_epsilon", &m.norm_eps);
    qs_meta_array tokens;
    if ((err = qs_weights_meta_array(w, "tokenizer.ggml.tokens", &tokens)))
        return err;
    if (tokens.count > UINT32_MAX)
        return qs_seterr(QS_EFORMAT, "%s: vocabulary of %llu tokens", w->maps[0].path,
                         (unsigned long long)tokens.count);
    m.vocab = (uint32_t)tokens.count;
    m.head_dim = m.heads ? m.hidden / m.heads : 0;
    m.embed_dim = m.hidden;
    m.tied_embeddings = qs_weights_find(w, "output.weight") == NULL;
    qs_clearerr();
    if ((err = qs_config_check(&m)))
        return err;
    *out = m;
    return QS_OK;
}
