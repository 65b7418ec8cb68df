/* Private to shard/: the weight-file handle shared by the GGUF and
 * safetensors readers. */
#ifndef QS_WEIGHTS_INTERNAL_H
#define QS_WEIGHTS_INTERNAL_H

#include "qs_shard.h"

#define QS_MAX_FILES 256

typedef struct qs_map {
    char *path;
    const uint8_t *base;
    size_t size;
} qs_map;

/* One GGUF metadata entry: the key and the bytes of its value. */
typedef struct qs_meta {
    const char *key; /* owned copy, NUL-terminated */
    uint32_t type;
    const uint8_t *val, *end;
} qs_meta;

struct qs_weights {
    qs_map maps[QS_MAX_FILES];
    size_t nmaps;
    qs_tensor_info *tensors;
    size_t ntensors, cap;
    qs_meta *meta;
    size_t nmeta;
    char **strings; /* owned names */
    size_t nstrings;
};

/* GGUF value types. */
enum {
    GGUF_U8 = 0,
    GGUF_I8,
    GGUF_U16,
    GGUF_I16,
    GGUF_U32,
    GGUF_I32,
    GGUF_F32,
    GGUF_BOOL,
    GGUF_STRING,
    GGUF_ARRAY,
    GGUF_U64,
    GGUF_I64,
    GGUF_F64
};

int qs_map_file(qs_weights *w, const char *path, const uint8_t **base, size_t *size);
const char *qs_map_path(const qs_weights *w); /* the last file mapped */
int qs_add_tensor(qs_weights *w, const qs_tensor_info *t);
char *qs_weights_strdup(qs_weights *w, const char *s, size_t n);
void qs_dtype_block(qs_dtype t, uint64_t *bytes, uint64_t *elems);
/* Sets t->nbytes from the shape and type, checking every bound. */
int qs_tensor_size(qs_tensor_info *t);

int qs_gguf_parse(qs_weights *w, const uint8_t *base, size_t size);
int qs_safetensors_parse(qs_weights *w, const uint8_t *base, size_t size);
int qs_safetensors_open_index(qs_weights *w, const char *index_path);

#endif
