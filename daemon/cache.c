/* The quantized-model cache: a file's first load with a scheme writes the
 * quantized shards (shard/'s checkpoint format, one file per rank) into
 * DIR/KEY/, and later loads of the same file with the same options read
 * them instead of quantizing again.
 *
 * KEY is a 128-bit hash of the weights' identity (each file's size,
 * modification time, its first MiB, 64 samples of 4 KiB spread over it and
 * its last 64 KiB) and of every option that changes the result (scheme,
 * bits, group, BCQ iterations, SmoothQuant alpha and the calibration text's
 * identity, the split, the format version). An entry is whole when its
 * manifest.json exists: each rank renames its part into place, then writes
 * the manifest (also by rename); a load that finds a damaged part throws
 * the entry away and quantizes again. The manifest's modification time is
 * the entry's last use; above the size limit the least recently used
 * entries go. On a cluster each node's ranks keep their own parts in their
 * node's directory (rank 0 of each node evicts and clears). */
#define _GNU_SOURCE
#include "qs_daemon.h"
#include "qs_shard.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

/* Bump when a quantizer's output or the checkpoint format changes. */
#define CACHE_FORMAT "qshard-cache-1"

/* ---- The key ------------------------------------------------------------- */

/* out = a/b; 0 when it does not fit (the entry is then skipped). */
static int join(char *out, size_t n, const char *a, const char *b)
{
    int k = snprintf(out, n, "%s/%s", a, b);
    return k > 0 && (size_t)k < n;
}

/* Two FNV-1a lanes with different offsets and a final mix: 128 bits, not a
 * cryptographic hash (the manifest's source and options are checked too). */
typedef struct hash128 {
    uint64_t a, b;
} hash128;

static void h_init(hash128 *h)
{
    h->a = 0xcbf29ce484222325ull;
    h->b = 0x84222325cbf29ce4ull;
}

static void h_bytes(hash128 *h, const void *p, size_t n)
{
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) {
        h->a = (h->a ^ s[i]) * 0x100000001b3ull;
        h->b = (h->b ^ s[i] ^ (h->b >> 29)) * 0x9e3779b97f4a7c15ull;
    }
}

static void h_u64(hash128 *h, uint64_t v)
{
    h_bytes(h, &v, sizeof v);
}

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* One file's identity: size, modification time and samples of its bytes. */
static int h_file(hash128 *h, const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        return qs_seterr(QS_EIO, "cannot read %s: %s", path, strerror(e));
    }
    uint64_t size = (uint64_t)st.st_size;
    h_u64(h, size);
    h_u64(h, (uint64_t)st.st_mtim.tv_sec);
    h_u64(h, (uint64_t)st.st_mtim.tv_nsec);
    enum { HEAD = 1 << 20, TAIL = 64 << 10, SAMPLE = 4 << 10, NSAMPLES = 64 };
    char *buf = malloc(HEAD);
    if (!buf) {
        close(fd);
        return qs_seterr(QS_ENOMEM, "out of memory hashing %s", path);
    }
    struct {
        uint64_t off, len;
    } parts[NSAMPLES + 2];
    size_t np = 0;
    parts[np].off = 0, parts[np++].len = size < HEAD ? size : HEAD;
    for (uint64_t i = 0; i < NSAMPLES && size > HEAD; i++)
        parts[np].off = size / NSAMPLES * i, parts[np++].len = SAMPLE;
    if (size > TAIL)
        parts[np].off = size - TAIL, parts[np++].len = TAIL;
    int err = QS_OK;
    for (size_t i = 0; i < np && !err; i++) {
        uint64_t len = parts[i].len;
        if (parts[i].off + len > size)
            len = size - parts[i].off;
        ssize_t got = pread(fd, buf, (size_t)len, (off_t)parts[i].off);
        if (got < 0 || (uint64_t)got != len)
            err = qs_seterr(QS_EIO, "reading %s for the cache key failed", path);
        else
            h_bytes(h, buf, (size_t)len);
    }
    free(buf);
    close(fd);
    return err;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* A directory's weights: config.json, then every *.safetensors and *.json
 * file, in name order. */
static int h_dir(hash128 *h, const char *dir)
{
    DIR *dp = opendir(dir);
    if (!dp)
        return qs_seterr(QS_EIO, "cannot list %s: %s", dir, strerror(errno));
    char **names = NULL;
    size_t n = 0, cap = 0;
    int err = QS_OK;
    for (struct dirent *e; !err && (e = readdir(dp));) {
        size_t len = strlen(e->d_name);
        int want = (len > 12 && !strcmp(e->d_name + len - 12, ".safetensors")) ||
                   (len > 5 && !strcmp(e->d_name + len - 5, ".json"));
        if (!want)
            continue;
        if (n == cap) {
            char **g = realloc(names, (cap = cap ? 2 * cap : 16) * sizeof *g);
            if (!g) {
                err = qs_seterr(QS_ENOMEM, "out of memory listing %s", dir);
                break;
            }
            names = g;
        }
        if (!(names[n] = strdup(e->d_name)))
            err = qs_seterr(QS_ENOMEM, "out of memory listing %s", dir);
        else
            n++;
    }
    closedir(dp);
    if (!err)
        qsort(names, n, sizeof *names, by_name);
    for (size_t i = 0; i < n && !err; i++) {
        char path[4400];
        h_bytes(h, names[i], strlen(names[i]) + 1);
        err = join(path, sizeof path, dir, names[i])
                  ? h_file(h, path)
                  : qs_seterr(QS_EINVAL, "%s/%s: the path is too long", dir, names[i]);
    }
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    return err;
}

int qs_cache_key(const char *weights, const char *options, char key[33])
{
    hash128 h;
    h_init(&h);
    h_bytes(&h, CACHE_FORMAT, sizeof CACHE_FORMAT);
    h_bytes(&h, options, strlen(options) + 1);
    struct stat st;
    if (stat(weights, &st) != 0)
        return qs_seterr(QS_ENOTFOUND, "cannot read %s: %s", weights, strerror(errno));
    int err = S_ISDIR(st.st_mode) ? h_dir(&h, weights) : h_file(&h, weights);
    if (err)
        return err;
    snprintf(key, 33, "%016llx%016llx", (unsigned long long)mix64(h.a ^ mix64(h.b)),
             (unsigned long long)mix64(h.b + 0x9e3779b97f4a7c15ull));
    return QS_OK;
}

int qs_cache_file_identity(const char *path, char *out, size_t n)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return qs_seterr(QS_ENOTFOUND, "cannot read %s: %s", path, strerror(errno));
    snprintf(out, n, "%s:%lld:%lld.%09ld", path, (long long)st.st_size,
             (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
    return QS_OK;
}

/* ---- Entries -------------------------------------------------------------- */

const char *qs_cache_dir(const qs_daemon *d)
{
    return d->opts.cache_dir;
}

/* DIR/KEY[/FILE] into out; "" when it does not fit (nothing is then found
 * or written there: --cache-dir is checked to leave room). */
static void entry_path(const qs_daemon *d, const char *key, const char *file, char *out, size_t n)
{
    int k = file ? snprintf(out, n, "%s/%s/%s", d->opts.cache_dir, key, file)
                 : snprintf(out, n, "%s/%s", d->opts.cache_dir, key);
    if (k < 0 || (size_t)k >= n)
        out[0] = '\0';
}

/* mkdir -p for the cache directory and the entry. */
static int make_dirs(const char *path)
{
    char p[4200];
    snprintf(p, sizeof p, "%s", path);
    for (char *s = p + 1; *s; s++) {
        if (*s != '/')
            continue;
        *s = '\0';
        if (mkdir(p, 0755) != 0 && errno != EEXIST)
            return qs_seterr(QS_EIO, "cannot create %s: %s", p, strerror(errno));
        *s = '/';
    }
    if (mkdir(p, 0755) != 0 && errno != EEXIST)
        return qs_seterr(QS_EIO, "cannot create %s: %s", p, strerror(errno));
    return QS_OK;
}

int qs_cache_entry_dir(const qs_daemon *d, const char *key, char *out, size_t n)
{
    entry_path(d, key, NULL, out, n);
    return make_dirs(out);
}

int qs_cache_has(const qs_daemon *d, const char *key, int rank, int size)
{
    char m[4200], dir[4200];
    entry_path(d, key, "manifest.json", m, sizeof m);
    entry_path(d, key, NULL, dir, sizeof dir);
    return access(m, R_OK) == 0 && qs_checkpoint_has_rank(dir, rank, size);
}

void qs_cache_touch(const qs_daemon *d, const char *key)
{
    char m[4200];
    entry_path(d, key, "manifest.json", m, sizeof m);
    utimensat(AT_FDCWD, m, NULL, 0);
}

int qs_cache_write_manifest(const qs_daemon *d, const char *key, const qs_cache_info *info)
{
    cJSON *j = cJSON_CreateObject();
    if (!j)
        return qs_seterr(QS_ENOMEM, "out of memory");
    cJSON_AddStringToObject(j, "format", CACHE_FORMAT);
    cJSON_AddStringToObject(j, "source", info->source);
    cJSON_AddStringToObject(j, "options", info->options);
    cJSON_AddStringToObject(j, "scheme", info->scheme);
    cJSON_AddNumberToObject(j, "bits", info->bits);
    cJSON_AddNumberToObject(j, "group", info->group);
    cJSON_AddNumberToObject(j, "tp", info->tp);
    cJSON_AddNumberToObject(j, "created", (double)time(NULL));
    char *text = cJSON_Print(j);
    cJSON_Delete(j);
    if (!text)
        return qs_seterr(QS_ENOMEM, "out of memory");
    char path[4200], tmp[4300];
    entry_path(d, key, "manifest.json", path, sizeof path);
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "w");
    int err = QS_OK;
    if (!f || fputs(text, f) < 0 || fclose(f) != 0) {
        err = qs_seterr(QS_EIO, "cannot write %s: %s", tmp, strerror(errno));
        unlink(tmp);
    } else if (rename(tmp, path) != 0) {
        err = qs_seterr(QS_EIO, "cannot rename %s: %s", tmp, strerror(errno));
        unlink(tmp);
    }
    cJSON_free(text);
    return err;
}

/* Removes the entry directory and what is in it (files only: parts,
 * manifest, leftovers of an interrupted write); the bytes freed. */
static uint64_t remove_entry_dir(const char *dir)
{
    uint64_t freed = 0;
    DIR *dp = opendir(dir);
    if (!dp)
        return 0;
    for (struct dirent *e; (e = readdir(dp));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        char p[4400];
        struct stat st;
        if (join(p, sizeof p, dir, e->d_name) && lstat(p, &st) == 0 && S_ISREG(st.st_mode) &&
            unlink(p) == 0)
            freed += (uint64_t)st.st_size;
    }
    closedir(dp);
    rmdir(dir);
    return freed;
}

void qs_cache_remove(const qs_daemon *d, const char *key, int rank, int size)
{
    /* This rank's part and the manifest: the entry is no longer whole. */
    char m[4200], dir[4200];
    entry_path(d, key, "manifest.json", m, sizeof m);
    entry_path(d, key, NULL, dir, sizeof dir);
    unlink(m);
    char part[4400];
    snprintf(part, sizeof part, "%s/rank-%05d-of-%05d.safetensors", dir, rank, size);
    unlink(part);
    rmdir(dir); /* once the last part is gone */
}

/* Every whole entry of the directory with its size and last use. */
typedef struct ent {
    char key[64];
    uint64_t bytes;
    double last_used, created;
    cJSON *manifest;
} ent;

static uint64_t dir_bytes(const char *dir)
{
    uint64_t n = 0;
    DIR *dp = opendir(dir);
    if (!dp)
        return 0;
    for (struct dirent *e; (e = readdir(dp));) {
        char p[4400];
        struct stat st;
        if (join(p, sizeof p, dir, e->d_name) && lstat(p, &st) == 0 && S_ISREG(st.st_mode))
            n += (uint64_t)st.st_size;
    }
    closedir(dp);
    return n;
}

static int by_use(const void *a, const void *b)
{
    double x = ((const ent *)a)->last_used, y = ((const ent *)b)->last_used;
    return (x > y) - (x < y);
}

static cJSON *read_manifest(const char *path)
{
    char *text = NULL;
    if (qs_read_file(path, 1u << 16, &text, NULL) != QS_OK) {
        qs_clearerr(); /* not an entry, then */
        return NULL;
    }
    cJSON *j = cJSON_Parse(text);
    free(text);
    if (j && !cJSON_IsObject(j)) {
        cJSON_Delete(j);
        j = NULL;
    }
    return j;
}

/* The entries, least recently used first; *out freed by free_entries. */
static int list_entries(const qs_daemon *d, ent **out, size_t *n)
{
    *out = NULL, *n = 0;
    DIR *dp = opendir(d->opts.cache_dir);
    if (!dp)
        return errno == ENOENT
                   ? QS_OK
                   : qs_seterr(QS_EIO, "cannot list %s: %s", d->opts.cache_dir, strerror(errno));
    ent *v = NULL;
    size_t cap = 0, k = 0;
    int err = QS_OK;
    for (struct dirent *e; (e = readdir(dp));) {
        if (strlen(e->d_name) != 32 || strspn(e->d_name, "0123456789abcdef") != 32)
            continue;
        char dir[4200], m[4300];
        entry_path(d, e->d_name, NULL, dir, sizeof dir);
        snprintf(m, sizeof m, "%s/manifest.json", dir);
        struct stat st;
        if (stat(m, &st) != 0)
            continue; /* being written, or broken: not an entry */
        if (k == cap) {
            ent *g = realloc(v, (cap = cap ? 2 * cap : 16) * sizeof *g);
            if (!g) {
                err = qs_seterr(QS_ENOMEM, "out of memory listing the cache");
                break;
            }
            v = g;
        }
        ent *x = &v[k++];
        memset(x, 0, sizeof *x);
        memcpy(x->key, e->d_name, 33); /* 32 hex digits, checked above, and the NUL */
        x->bytes = dir_bytes(dir);
        x->last_used = (double)st.st_mtim.tv_sec + st.st_mtim.tv_nsec * 1e-9;
        x->manifest = read_manifest(m);
        cJSON *c = cJSON_GetObjectItemCaseSensitive(x->manifest, "created");
        x->created = cJSON_IsNumber(c) ? c->valuedouble : x->last_used;
    }
    closedir(dp);
    if (v)
        qsort(v, k, sizeof *v, by_use);
    *out = v, *n = k;
    return err;
}

static void free_entries(ent *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        cJSON_Delete(v[i].manifest);
    free(v);
}

uint64_t qs_cache_limit(const qs_daemon *d)
{
    if (d->opts.cache_limit)
        return d->opts.cache_limit;
    /* A quarter of the file system the cache lives on. */
    struct statvfs vfs;
    char probe[4096];
    snprintf(probe, sizeof probe, "%s", d->opts.cache_dir);
    while (statvfs(probe, &vfs) != 0) {
        char *slash = strrchr(probe, '/');
        if (!slash || slash == probe)
            return 16ull << 30;
        *slash = '\0';
    }
    return (uint64_t)vfs.f_blocks * vfs.f_frsize / 4;
}

uint64_t qs_cache_evict(const qs_daemon *d, const char *keep)
{
    ent *v;
    size_t n;
    if (list_entries(d, &v, &n) != QS_OK)
        return 0;
    uint64_t total = 0, freed = 0, limit = qs_cache_limit(d);
    for (size_t i = 0; i < n; i++)
        total += v[i].bytes;
    for (size_t i = 0; i < n && total > limit; i++) {
        if (keep && !strcmp(v[i].key, keep))
            continue;
        char dir[4200];
        entry_path(d, v[i].key, NULL, dir, sizeof dir);
        uint64_t f = remove_entry_dir(dir);
        qs_log(QS_LOG_INFO,
               "cache: evicted %s (%.1f MiB, least recently used) to stay under %.1f "
               "GiB",
               v[i].key, (double)f / (1 << 20), (double)limit / (1 << 30));
        total -= v[i].bytes < total ? v[i].bytes : total;
        freed += f;
    }
    free_entries(v, n);
    return freed;
}

uint64_t qs_cache_clear(const qs_daemon *d)
{
    ent *v;
    size_t n;
    if (list_entries(d, &v, &n) != QS_OK)
        return 0;
    uint64_t freed = 0;
    for (size_t i = 0; i < n; i++) {
        char dir[4200];
        entry_path(d, v[i].key, NULL, dir, sizeof dir);
        freed += remove_entry_dir(dir);
    }
    free_entries(v, n);
    return freed;
}

static const char *jstr(const cJSON *j, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, k);
    return cJSON_IsString(v) ? v->valuestring : "";
}

static double jnum(const cJSON *j, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, k);
    return cJSON_IsNumber(v) ? v->valuedouble : 0;
}

int qs_cache_list(const qs_daemon *d, Qshard__V1__CacheReply *r)
{
    ent *v;
    size_t n;
    int err = list_entries(d, &v, &n);
    if (err)
        return err;
    r->dir = (char *)d->opts.cache_dir;
    r->limit = qs_cache_limit(d);
    r->n_entries = n;
    r->entries = calloc(n ? n : 1, sizeof *r->entries);
    Qshard__V1__CacheEntry *es = calloc(n ? n : 1, sizeof *es);
    Qshard__V1__Quantization *qs = calloc(n ? n : 1, sizeof *qs);
    if (!r->entries || !es || !qs) {
        free(r->entries), free(es), free(qs);
        free_entries(v, n);
        r->entries = NULL, r->n_entries = 0;
        return qs_seterr(QS_ENOMEM, "out of memory listing the cache");
    }
    for (size_t i = 0; i < n; i++) {
        qshard__v1__cache_entry__init(&es[i]);
        qshard__v1__quantization__init(&qs[i]);
        const cJSON *m = v[i].manifest;
        /* Strings owned by the reply (freed by qs_cache_list_free). */
        es[i].key = strdup(v[i].key);
        es[i].source = strdup(jstr(m, "source"));
        qs[i].scheme = strdup(jstr(m, "scheme"));
        qs[i].bits = (uint32_t)jnum(m, "bits");
        qs[i].group_case = QSHARD__V1__QUANTIZATION__GROUP_GROUP_SIZE;
        qs[i].group_size = (uint32_t)jnum(m, "group");
        es[i].quant = &qs[i];
        es[i].tp = (uint32_t)jnum(m, "tp");
        es[i].bytes = v[i].bytes;
        es[i].created = v[i].created;
        es[i].last_used = v[i].last_used;
        r->bytes += v[i].bytes;
        r->entries[i] = &es[i];
    }
    if (n == 0)
        free(es), free(qs);
    free_entries(v, n);
    return QS_OK;
}

void qs_cache_list_free(Qshard__V1__CacheReply *r)
{
    if (!r->entries)
        return;
    for (size_t i = 0; i < r->n_entries; i++) {
        free(r->entries[i]->key);
        free(r->entries[i]->source);
        free(r->entries[i]->quant->scheme);
    }
    if (r->n_entries) {
        free(r->entries[0]->quant);
        free(r->entries[0]);
    }
    free(r->entries);
    r->entries = NULL;
}
