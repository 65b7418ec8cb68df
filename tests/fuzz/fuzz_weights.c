/* fuzz_weights: a GGUF or safetensors file as qs_weights_open reads it, and
 * everything a load then asks of it: the configuration from GGUF metadata,
 * the tokenizer (with an encode and a decode), and a row of each tensor. */
#include "fuzz_util.h"
#include "qs_shard.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    char path[640];
    fuzz_file("model.gguf", data, n, path, sizeof path);
    qs_weights *w = NULL;
    if (qs_weights_open(path, &w) != QS_OK)
        return 0;
    qs_model_config cfg;
    qs_config_from_gguf(w, &cfg);
    qs_tokenizer *t = NULL;
    if (qs_tokenizer_init_gguf(w, &t) == QS_OK) {
        int32_t *ids = NULL;
        size_t nid = 0;
        if (qs_tokenizer_encode(t, "Hello <|im_start|> world 123", 27, QS_TOK_SPECIAL, &ids,
                                &nid) == QS_OK) {
            char *text = NULL;
            size_t len = 0;
            if (qs_tokenizer_decode(t, ids, nid, &text, &len) == QS_OK)
                free(text);
        }
        free(ids);
        qs_tokenizer_close(t);
    }
    float row[256];
    size_t count = qs_weights_count(w);
    for (size_t i = 0; i < count && i < 16; i++) {
        const qs_tensor_info *ti = qs_weights_at(w, i);
        /* Either end of the shape as the row length: the reader checks it. */
        for (int e = 0; e < 2 && ti->ndim; e++) {
            uint64_t cols = ti->shape[e ? ti->ndim - 1 : 0];
            qs_weights_read_f32(w, ti, 0, 1, 0, cols < 256 ? cols : 256, row);
        }
    }
    qs_weights_close(w);
    return 0;
}
