/* tensors.h (tests/shard): random fp32 tensors, identical on every rank
 * (a fixed xorshift stream), written as one safetensors file: the weight
 * files test_model and test_model_gpu load through the real loader. One
 * translation unit's statics; include once per test. */
#ifndef QS_TEST_TENSORS_H
#define QS_TEST_TENSORS_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng = 1;
static inline double urand(void)
{
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

typedef struct tensor {
    char name[128];
    size_t rows, cols;
    float *v;
} tensor;

static tensor ts[256];
static size_t nts;

static inline float *add(const char *name, size_t rows, size_t cols, double scale, double offset)
{
    tensor *t = &ts[nts++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->rows = rows, t->cols = cols;
    t->v = malloc(rows * cols * sizeof(float));
    for (size_t i = 0; i < rows * cols; i++)
        t->v[i] = (float)(offset + scale * urand());
    return t->v;
}

static inline const float *get(const char *fmt, int l)
{
    char name[128];
    snprintf(name, sizeof name, fmt, l);
    for (size_t i = 0; i < nts; i++)
        if (strcmp(ts[i].name, name) == 0)
            return ts[i].v;
    return NULL;
}

static inline void free_tensors(void)
{
    for (size_t i = 0; i < nts; i++)
        free(ts[i].v);
    nts = 0;
}

static inline void write_safetensors(const char *path)
{
    char *hdr = malloc(65536);
    size_t off = 0, at = 0;
    at += (size_t)sprintf(hdr + at, "{");
    for (size_t i = 0; i < nts; i++) {
        size_t bytes = ts[i].rows * ts[i].cols * 4;
        if (ts[i].rows == 1)
            at += (size_t)sprintf(hdr + at,
                                  "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%zu],"
                                  "\"data_offsets\":[%zu,%zu]}",
                                  i ? "," : "", ts[i].name, ts[i].cols, off, off + bytes);
        else
            at +=
                (size_t)sprintf(hdr + at,
                                "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%zu,%zu],"
                                "\"data_offsets\":[%zu,%zu]}",
                                i ? "," : "", ts[i].name, ts[i].rows, ts[i].cols, off, off + bytes);
        off += bytes;
    }
    at += (size_t)sprintf(hdr + at, "}");
    FILE *f = fopen(path, "wb");
    uint64_t n = at;
    fwrite(&n, 8, 1, f);
    fwrite(hdr, 1, at, f);
    for (size_t i = 0; i < nts; i++)
        fwrite(ts[i].v, 4, ts[i].rows * ts[i].cols, f);
    fclose(f);
    free(hdr);
}

#endif
