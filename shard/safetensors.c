/* Hugging Face safetensors reader: one file, or shards listed by
 * model.safetensors.index.json.
 *
 *   u64 N (little-endian) | N bytes of JSON header | data
 *   header: { "name": {"dtype": "F16", "shape": [r, c], "data_offsets": [b, e]},
 *             "__metadata__": {...} }   offsets relative to the data start
 */
#define _POSIX_C_SOURCE 200809L
#include "weights_internal.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The format's own limit on the header. */
#define MAX_HEADER (100u << 20)

static int st_dtype(const char *s, qs_dtype *out)
{
    static const struct {
        const char *name;
        qs_dtype t;
    } map[] = {{"F32", QS_DTYPE_F32},
               {"F16", QS_DTYPE_F16},
               {"BF16", QS_DTYPE_BF16},
               {"I8", QS_DTYPE_I8},
               {"I32", QS_DTYPE_I32}};
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++) {
        if (strcmp(s, map[i].name) == 0) {
            *out = map[i].t;
            return 1;
        }
    }
    return 0;
}

/* A JSON number that is a whole non-negative integer below 2^53. */
static int json_u64(const cJSON *j, uint64_t *out)
{
    if (!cJSON_IsNumber(j) || j->valuedouble < 0 || j->valuedouble > 9007199254740992.0 ||
        j->valuedouble != (double)(uint64_t)j->valuedouble)
        return 0;
    *out = (uint64_t)j->valuedouble;
    return 1;
}

static int parse_entry(qs_weights *w, const cJSON *e, const char *file, const uint8_t *data,
                       uint64_t data_size)
{
    qs_tensor_info t = {.file = file};
    if (!(t.name = qs_weights_strdup(w, e->string, strlen(e->string))))
        return qs_seterr(QS_ENOMEM, "out of memory reading %s", file);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsObject(e) || !cJSON_IsString(dt) || !cJSON_IsArray(shape) ||
        !cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2)
        return qs_seterr(QS_EFORMAT, "%s: tensor '%s' needs dtype, shape and two data_offsets",
                         file, t.name);
    if (!st_dtype(dt->valuestring, &t.dtype))
        return qs_seterr(QS_ENOTSUP,
                         "%s: tensor '%s' has dtype %s; qshard reads F32, F16, BF16, "
                         "I8 and I32",
                         file, t.name, dt->valuestring);
    int nd = cJSON_GetArraySize(shape);
    if (nd > QS_MAX_DIMS)
        return qs_seterr(QS_EFORMAT, "%s: tensor '%s' has %d dimensions (at most %d)", file, t.name,
                         nd, QS_MAX_DIMS);
    t.ndim = (uint32_t)nd;
    for (int d = 0; d < nd; d++)
        if (!json_u64(cJSON_GetArrayItem(shape, d), &t.shape[d]))
            return qs_seterr(QS_EFORMAT,
                             "%s: tensor '%s' has a shape entry that is not a "
                             "non-negative integer",
                             file, t.name);
    if (nd == 0) { /* a scalar: one element */
        t.ndim = 1;
        t.shape[0] = 1;
    }
    int err = qs_tensor_size(&t);
    if (err)
        return err;
    uint64_t b, e2;
    if (!json_u64(cJSON_GetArrayItem(offs, 0), &b) || !json_u64(cJSON_GetArrayItem(offs, 1), &e2))
        return qs_seterr(QS_EFORMAT, "%s: tensor '%s' has malformed data_offsets", file, t.name);
    if (b > e2 || e2 > data_size)
        return qs_seterr(QS_EFORMAT,
                         "%s: tensor '%s' spans bytes %llu..%llu, outside the %llu "
                         "bytes of data",
                         file, t.name, (unsigned long long)b, (unsigned long long)e2,
                         (unsigned long long)data_size);
    if (e2 - b != t.nbytes)
        return qs_seterr(QS_EFORMAT,
                         "%s: tensor '%s' holds %llu bytes but its shape and dtype "
                         "need %llu",
                         file, t.name, (unsigned long long)(e2 - b), (unsigned long long)t.nbytes);
    t.data = data + b;
    return qs_add_tensor(w, &t);
}

/* "__metadata__" holds string pairs; they are kept in GGUF's string encoding
 * (u64 length, bytes) so that qs_weights_meta_str reads both formats. */
static int keep_metadata(qs_weights *w, const cJSON *md, const char *file)
{
    if (!cJSON_IsObject(md))
        return qs_seterr(QS_EFORMAT, "%s: __metadata__ is not an object", file);
    size_t n = (size_t)cJSON_GetArraySize(md);
    qs_meta *meta = realloc(w->meta, (w->nmeta + n + 1) * sizeof *meta);
    if (!meta)
        return qs_seterr(QS_ENOMEM, "out of memory reading %s", file);
    w->meta = meta;
    for (const cJSON *e = md->child; e; e = e->next) {
        if (!cJSON_IsString(e))
            return qs_seterr(QS_EFORMAT, "%s: __metadata__ value '%s' is not a string", file,
                             e->string);
        uint64_t len = strlen(e->valuestring);
        char *tmp = malloc(8 + len);
        char *enc = NULL;
        if (tmp) {
            memcpy(tmp, &len, 8);
            memcpy(tmp + 8, e->valuestring, len);
            enc = qs_weights_strdup(w, tmp, 8 + len);
            free(tmp);
        }
        qs_meta *m = &w->meta[w->nmeta];
        if (!enc || !(m->key = qs_weights_strdup(w, e->string, strlen(e->string))))
            return qs_seterr(QS_ENOMEM, "out of memory reading %s", file);
        m->type = GGUF_STRING;
        m->val = (const uint8_t *)enc;
        m->end = m->val + 8 + len;
        w->nmeta++;
    }
    return QS_OK;
}

int qs_safetensors_parse(qs_weights *w, const uint8_t *base, size_t size)
{
    const char *file = qs_map_path(w);
    uint64_t n;
    memcpy(&n, base, 8);
    if (n < 2 || n > MAX_HEADER || n > size - 8 || base[8] != '{')
        return qs_seterr(QS_EFORMAT,
                         "%s is neither GGUF (magic 'GGUF') nor safetensors (its "
                         "header length %llu does not fit the file of %zu bytes, or "
                         "the header is not JSON): name a GGUF file, a .safetensors file or a "
                         "directory with config.json",
                         file, (unsigned long long)n, size);
    cJSON *h = cJSON_ParseWithLength((const char *)base + 8, (size_t)n);
    if (!h || !cJSON_IsObject(h)) {
        cJSON_Delete(h);
        return qs_seterr(QS_EFORMAT, "%s: the safetensors header is not a JSON object", file);
    }
    int err = QS_OK;
    size_t first = w->ntensors;
    for (const cJSON *e = h->child; e && !err; e = e->next) {
        if (strcmp(e->string, "__metadata__") == 0)
            err = keep_metadata(w, e, file);
        else
            err = parse_entry(w, e, file, base + 8 + n, size - 8 - n);
    }
    cJSON_Delete(h);
    /* Duplicate names would make look-ups ambiguous. */
    for (size_t i = first; i < w->ntensors && !err; i++)
        for (size_t j = i + 1; j < w->ntensors && !err; j++)
            if (strcmp(w->tensors[i].name, w->tensors[j].name) == 0)
                err = qs_seterr(QS_EFORMAT, "%s: tensor '%s' appears twice", file,
                                w->tensors[i].name);
    return err;
}

/* model.safetensors.index.json: {"weight_map": {"tensor": "file", ...}}. */
int qs_safetensors_open_index(qs_weights *w, const char *index_path)
{
    const uint8_t *base;
    size_t size;
    int err = qs_map_file(w, index_path, &base, &size);
    if (err)
        return err;
    cJSON *idx = cJSON_ParseWithLength((const char *)base, size);
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(idx, "weight_map");
    if (!cJSON_IsObject(map)) {
        cJSON_Delete(idx);
        return qs_seterr(QS_EFORMAT, "%s: not a safetensors index (no weight_map object)",
                         index_path);
    }
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", index_path);
    char *slash = strrchr(dir, '/');
    if (slash)
        *slash = '\0';
    else
        snprintf(dir, sizeof dir, ".");

    /* Open each shard once, in the order the map first names it. */
    for (const cJSON *e = map->child; e && !err; e = e->next) {
        if (!cJSON_IsString(e) || strchr(e->valuestring, '/') || e->valuestring[0] == '.') {
            err = qs_seterr(QS_EFORMAT,
                            "%s: tensor '%s' maps to '%s', not a file name beside "
                            "the index",
                            index_path, e->string,
                            cJSON_IsString(e) ? e->valuestring : "(not a string)");
            break;
        }
        int seen = 0;
        for (const cJSON *p = map->child; p != e && !seen; p = p->next)
            seen = strcmp(p->valuestring, e->valuestring) == 0;
        if (seen)
            continue;
        char path[8192];
        snprintf(path, sizeof path, "%s/%s", dir, e->valuestring);
        const uint8_t *sb;
        size_t ss;
        if (!(err = qs_map_file(w, path, &sb, &ss)))
            err = qs_safetensors_parse(w, sb, ss);
    }
    /* Every mapped tensor must be where the index says. */
    for (const cJSON *e = map->child; e && !err; e = e->next) {
        const qs_tensor_info *t = qs_weights_find(w, e->string);
        if (!t) {
            err = qs_seterr(QS_EFORMAT, "%s lists tensor '%s' in %s, which does not hold it",
                            index_path, e->string, e->valuestring);
            break;
        }
        const char *base_name = strrchr(t->file, '/');
        if (strcmp(base_name ? base_name + 1 : t->file, e->valuestring) != 0)
            err = qs_seterr(QS_EFORMAT, "%s lists tensor '%s' in %s, but it is in %s", index_path,
                            e->string, e->valuestring, t->file);
    }
    cJSON_Delete(idx);
    return err;
}
