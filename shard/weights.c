/* Weight files: the handle shared by the GGUF and safetensors readers, the
 * memory mappings, and reading tensor slices as fp32. */
#define _POSIX_C_SOURCE 200809L
#include "weights_internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

const char *qs_dtype_name(qs_dtype t)
{
    switch (t) {
    case QS_DTYPE_F32:
        return "F32";
    case QS_DTYPE_F16:
        return "F16";
    case QS_DTYPE_BF16:
        return "BF16";
    case QS_DTYPE_I8:
        return "I8";
    case QS_DTYPE_I32:
        return "I32";
    case QS_DTYPE_Q8_0:
        return "Q8_0";
    case QS_DTYPE_Q4_0:
        return "Q4_0";
    case QS_DTYPE_Q4_1:
        return "Q4_1";
    }
    return "?";
}

/* Bytes of one block and the elements it holds (1 for plain types). */
void qs_dtype_block(qs_dtype t, uint64_t *bytes, uint64_t *elems)
{
    *elems = 1;
    switch (t) {
    case QS_DTYPE_F32:
    case QS_DTYPE_I32:
        *bytes = 4;
        break;
    case QS_DTYPE_F16:
    case QS_DTYPE_BF16:
        *bytes = 2;
        break;
    case QS_DTYPE_I8:
        *bytes = 1;
        break;
    case QS_DTYPE_Q8_0:
        *bytes = 2 + 32, *elems = 32;
        break;
    case QS_DTYPE_Q4_0:
        *bytes = 2 + 16, *elems = 32;
        break;
    case QS_DTYPE_Q4_1:
        *bytes = 4 + 16, *elems = 32;
        break;
    }
}

int qs_tensor_size(qs_tensor_info *t)
{
    uint64_t n = 1;
    for (uint32_t i = 0; i < t->ndim; i++) {
        if (t->shape[i] == 0 || t->shape[i] > (UINT64_C(1) << 40))
            return qs_seterr(QS_EFORMAT, "%s: tensor '%s' has dimension %u of size %llu", t->file,
                             t->name, i, (unsigned long long)t->shape[i]);
        if (n > (UINT64_C(1) << 48) / t->shape[i])
            return qs_seterr(QS_EFORMAT, "%s: tensor '%s' has more elements than any model",
                             t->file, t->name);
        n *= t->shape[i];
    }
    uint64_t bb, be;
    qs_dtype_block(t->dtype, &bb, &be);
    uint64_t inner = t->ndim ? t->shape[t->ndim - 1] : 1;
    if (inner % be)
        return qs_seterr(QS_EFORMAT,
                         "%s: tensor '%s' is %s but its rows of %llu are not whole "
                         "blocks of %llu",
                         t->file, t->name, qs_dtype_name(t->dtype), (unsigned long long)inner,
                         (unsigned long long)be);
    t->nbytes = n / be * bb;
    return QS_OK;
}

/* ---- Mappings ----------------------------------------------------------- */

int qs_map_file(qs_weights *w, const char *path, const uint8_t **base, size_t *size)
{
    if (w->nmaps == QS_MAX_FILES)
        return qs_seterr(QS_EFORMAT, "%s: more than %d weight files", path, QS_MAX_FILES);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return qs_seterr(errno == ENOENT ? QS_ENOTFOUND : QS_EIO, "cannot open %s: %s", path,
                         strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return qs_seterr(QS_EIO, "%s is not a regular file", path);
    }
    if (st.st_size < 8) {
        close(fd);
        return qs_seterr(QS_EFORMAT, "%s is %lld bytes: too short for a weight file", path,
                         (long long)st.st_size);
    }
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED)
        return qs_seterr(QS_EIO, "cannot map %s: %s", path, strerror(errno));
    qs_map *m = &w->maps[w->nmaps];
    m->path = strdup(path);
    if (!m->path) {
        munmap(p, (size_t)st.st_size);
        return qs_seterr(QS_ENOMEM, "out of memory opening %s", path);
    }
    m->base = p;
    m->size = (size_t)st.st_size;
    w->nmaps++;
    *base = p;
    *size = m->size;
    return QS_OK;
}

const char *qs_map_path(const qs_weights *w)
{
    return w->maps[w->nmaps - 1].path;
}

int qs_add_tensor(qs_weights *w, const qs_tensor_info *t)
{
    if (w->ntensors == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 256;
        qs_tensor_info *n = realloc(w->tensors, cap * sizeof *n);
        if (!n)
            return qs_seterr(QS_ENOMEM, "out of memory listing tensors");
        w->tensors = n;
        w->cap = cap;
    }
    w->tensors[w->ntensors++] = *t;
    return QS_OK;
}

/* ---- Open and close ----------------------------------------------------- */

static int ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* A directory: the sharded index, one safetensors file, or one GGUF file. */
static int resolve_dir(const char *dir, char *out, size_t n)
{
    static const char *names[] = {"model.safetensors.index.json", "model.safetensors"};
    for (size_t i = 0; i < 2; i++) {
        snprintf(out, n, "%s/%s", dir, names[i]);
        if (access(out, R_OK) == 0)
            return QS_OK;
    }
    DIR *d = opendir(dir);
    if (!d)
        return qs_seterr(QS_EIO, "cannot read directory %s: %s", dir, strerror(errno));
    int found = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (ends_with(e->d_name, ".gguf")) {
            if (found++)
                break;
            snprintf(out, n, "%s/%s", dir, e->d_name);
        }
    }
    closedir(d);
    if (found == 1)
        return QS_OK;
    return qs_seterr(found ? QS_EINVAL : QS_ENOTFOUND,
                     "%s holds %s: point at one .gguf file, a .safetensors file or "
                     "model.safetensors.index.json",
                     dir, found ? "several .gguf files" : "no model.safetensors or .gguf file");
}

int qs_weights_open(const char *path, qs_weights **out)
{
    if (!path || !out)
        return qs_seterr(QS_EINVAL, "qs_weights_open: path and out are required");
    *out = NULL;
    char resolved[4096];
    struct stat st;
    if (stat(path, &st) != 0)
        return qs_seterr(QS_ENOTFOUND, "cannot open %s: %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) {
        int err = resolve_dir(path, resolved, sizeof resolved);
        if (err)
            return err;
        path = resolved;
    }
    qs_weights *w = calloc(1, sizeof *w);
    if (!w)
        return qs_seterr(QS_ENOMEM, "out of memory opening %s", path);

    int err;
    if (ends_with(path, ".json")) {
        err = qs_safetensors_open_index(w, path);
    } else {
        const uint8_t *base;
        size_t size;
        err = qs_map_file(w, path, &base, &size);
        if (!err) {
            if (memcmp(base, "GGUF", 4) == 0)
                err = qs_gguf_parse(w, base, size);
            else
                err = qs_safetensors_parse(w, base, size);
        }
    }
    if (err) {
        qs_weights_close(w);
        return err;
    }
    *out = w;
    return QS_OK;
}

void qs_weights_close(qs_weights *w)
{
    if (!w)
        return;
    for (size_t i = 0; i < w->nmaps; i++) {
        munmap((void *)w->maps[i].base, w->maps[i].size);
        free(w->maps[i].path);
    }
    for (size_t i = 0; i < w->nstrings; i++)
        free(w->strings[i]);
    free(w->strings);
    free(w->tensors);
    free(w->meta);
    free(w);
}

char *qs_weights_strdup(qs_weights *w, const char *s, size_t n)
{
    char **ns = realloc(w->strings, (w->nstrings + 1) * sizeof *ns);
    if (!ns)
        return NULL;
    w->strings = ns;
    char *c = malloc(n + 1);
    if (!c)
        return NULL;
    memcpy(c, s, n);
    c[n] = '\0';
    w->strings[w->nstrings++] = c;
    return c;
}

size_t qs_weights_count(const qs_weights *w)
{
    return w ? w->ntensors : 0;
}

const qs_tensor_info *qs_weights_at(const qs_weights *w, size_t i)
{
    return w && i < w->ntensors ? &w->tensors[i] : NULL;
}

const qs_tensor_info *qs_weights_find(const qs_weights *w, const char *name)
{
    for (size_t i = 0; w && name && i < w->ntensors; i++)
        if (strcmp(w->tensors[i].name, name) == 0)
            return &w->tensors[i];
    qs_seterr(QS_ENOTFOUND, "%s has no tensor '%s'", w && w->nmaps ? w->maps[0].path : "?",
              name ? name : "(null)");
    return NULL;
}

/* ---- Reading as fp32 ---------------------------------------------------- */

static uint16_t rd16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

/* Elements [c0, c0 + n) of one row starting at p. */
static void row_to_f32(qs_dtype t, const uint8_t *p, uint64_t c0, uint64_t n, float *dst)
{
    switch (t) {
    case QS_DTYPE_F32:
        memcpy(dst, p + 4 * c0, 4 * n);
        return;
    case QS_DTYPE_I32:
        for (uint64_t i = 0; i < n; i++) {
            int32_t v;
            memcpy(&v, p + 4 * (c0 + i), 4);
            dst[i] = (float)v;
        }
        return;
    case QS_DTYPE_F16:
        for (uint64_t i = 0; i < n; i++)
            dst[i] = qs_fp16_to_fp32(rd16(p + 2 * (c0 + i)));
        return;
    case QS_DTYPE_BF16:
        for (uint64_t i = 0; i < n; i++) {
            uint32_t bits = (uint32_t)rd16(p + 2 * (c0 + i)) << 16;
            memcpy(&dst[i], &bits, 4);
        }
        return;
    case QS_DTYPE_I8:
        for (uint64_t i = 0; i < n; i++)
            dst[i] = (float)(int8_t)p[c0 + i];
        return;
    default:
        break;
    }
    /* GGUF blocks of 32: dequantize each block the slice touches. Q4 blocks
     * keep element j in the low nibble of byte j and element j + 16 in the
     * high nibble. */
    uint64_t bb, be;
    qs_dtype_block(t, &bb, &be);
    for (uint64_t b = c0 / 32; b * 32 < c0 + n; b++) {
        const uint8_t *blk = p + b * bb;
        float v[32], d = qs_fp16_to_fp32(rd16(blk));
        if (t == QS_DTYPE_Q8_0) {
            for (int j = 0; j < 32; j++)
                v[j] = d * (float)(int8_t)blk[2 + j];
        } else {
            float m = t == QS_DTYPE_Q4_1 ? qs_fp16_to_fp32(rd16(blk + 2)) : -8.0f * d;
            const uint8_t *q = blk + (t == QS_DTYPE_Q4_1 ? 4 : 2);
            for (int j = 0; j < 16; j++) {
                v[j] = d * (float)(q[j] & 0xf) + m;
                v[j + 16] = d * (float)(q[j] >> 4) + m;
            }
        }
        uint64_t lo = b * 32 > c0 ? b * 32 : c0, hi = b * 32 + 32 < c0 + n ? b * 32 + 32 : c0 + n;
        memcpy(dst + (lo - c0), v + (lo - b * 32), (hi - lo) * sizeof(float));
    }
}

int qs_weights_read_f32(const qs_weights *w, const qs_tensor_info *t, uint64_t row0, uint64_t nrows,
                        uint64_t col0, uint64_t ncols, float *dst)
{
    (void)w;
    if (!t || !dst)
        return qs_seterr(QS_EINVAL, "qs_weights_read_f32: tensor and destination are required");
    uint64_t cols = t->ndim ? t->shape[t->ndim - 1] : 1;
    uint64_t rows = 1;
    for (uint32_t i = 0; i + 1 < t->ndim; i++)
        rows *= t->shape[i];
    if (row0 > rows || nrows > rows - row0 || col0 > cols || ncols > cols - col0)
        return qs_seterr(QS_EINVAL,
                         "%s: slice rows %llu+%llu, cols %llu+%llu is outside tensor "
                         "'%s' of %llu x %llu",
                         t->file, (unsigned long long)row0, (unsigned long long)nrows,
                         (unsigned long long)col0, (unsigned long long)ncols, t->name,
                         (unsigned long long)rows, (unsigned long long)cols);
    uint64_t bb, be;
    qs_dtype_block(t->dtype, &bb, &be);
    uint64_t row_bytes = cols / be * bb;
    for (uint64_t r = 0; r < nrows; r++) {
        float *d = dst + r * ncols;
        row_to_f32(t->dtype, t->data + (row0 + r) * row_bytes, col0, ncols, d);
        for (uint64_t c = 0; c < ncols; c++) {
            if (!isfinite(d[c]))
                return qs_seterr(QS_EFORMAT,
                                 "%s: tensor '%s' holds %s at row %llu, column %llu: "
                                 "the file is corrupt or was saved with overflow",
                                 t->file, t->name, isnan(d[c]) ? "NaN" : "Inf",
                                 (unsigned long long)(row0 + r), (unsigned long long)(col0 + c));
        }
    }
    return QS_OK;
}
