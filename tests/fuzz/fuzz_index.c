/* fuzz_index: a sharded safetensors index (model.safetensors.index.json)
 * naming tensors in shard files beside it: two small real shards, the
 * index from the input. */
#include "fuzz_util.h"
#include "qs_shard.h"

/* A safetensors file of one F32 tensor [rows, cols] named name. */
static void shard(const char *file, const char *name, int rows, int cols)
{
    char hdr[256], path[640];
    int n = snprintf(hdr, sizeof hdr,
                     "{\"%s\":{\"dtype\":\"F32\",\"shape\":[%d,%d],\"data_offsets\":[0,%d]}}", name,
                     rows, cols, 4 * rows * cols);
    size_t total = 8 + (size_t)n + 4u * (size_t)(rows * cols);
    uint8_t *buf = calloc(1, total);
    uint64_t len = (uint64_t)n;
    memcpy(buf, &len, 8);
    memcpy(buf + 8, hdr, (size_t)n);
    fuzz_file(file, buf, total, path, sizeof path);
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    static int made;
    if (!made) {
        shard("model-00001-of-00002.safetensors", "a.weight", 4, 8);
        shard("model-00002-of-00002.safetensors", "b.weight", 2, 3);
        made = 1;
    }
    char path[640];
    fuzz_file("model.safetensors.index.json", data, n, path, sizeof path);
    qs_weights *w = NULL;
    if (qs_weights_open(fuzz_dir(), &w) == QS_OK) {
        float row[8];
        for (size_t i = 0; i < qs_weights_count(w); i++)
            qs_weights_read_f32(w, qs_weights_at(w, i), 0, 1, 0, 3, row);
        qs_weights_close(w);
    }
    return 0;
}
