/* fuzz_tokenizer: SmolLM2's tokenizer (from the GGUF that
 * deploy/fetch-model.sh caches; QS_FUZZ_GGUF names another) on arbitrary
 * input: the first byte picks encode (with or without control tokens and
 * BOS) or decode (the rest read as int32 ids, in range or not). */
#include "fuzz_util.h"
#include "qs_shard.h"

static qs_tokenizer *tok;
static qs_weights *file;
/* Bytes with a token of their own: SmolLM2's vocabulary lacks 21 (0xff,
 * 0xc0, ... never seen in training), which encode to the unknown token. */
static int has_byte[256];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    const char *p = getenv("QS_FUZZ_GGUF");
    char def[1024];
    if (!p && qs_cache_path(QS_DEFAULT_GGUF, def, sizeof def) == QS_OK)
        p = def;
    if (!p) {
        fprintf(stderr, "fuzz_tokenizer: %s\n", qs_errmsg());
        exit(77);
    }
    if (qs_weights_open(p, &file) != QS_OK || qs_tokenizer_init_gguf(file, &tok) != QS_OK) {
        fprintf(stderr, "fuzz_tokenizer: no tokenizer (%s): run deploy/fetch-model.sh\n",
                qs_errmsg());
        exit(77);
    }
    for (size_t id = 0; id < qs_tokenizer_vocab(tok); id++) {
        size_t len;
        const char *p1 = qs_tokenizer_piece(tok, (int32_t)id, &len);
        if (p1 && len == 1)
            has_byte[(unsigned char)p1[0]] = 1;
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    if (n < 1)
        return 0;
    if (data[0] & 1) {
        int32_t *ids = NULL;
        size_t nid = 0;
        if (qs_tokenizer_encode(tok, (const char *)data + 1, n - 1, data[0] >> 1 & 3, &ids, &nid) ==
            QS_OK) {
            char *text = NULL;
            size_t len = 0;
            /* Without BOS, decoding gives the bytes back when each byte has
             * a token (byte-level BPE). */
            int err = qs_tokenizer_decode(tok, ids, nid, &text, &len), all = 1;
            for (size_t i = 1; i < n; i++)
                all &= has_byte[data[i]];
            if (!(data[0] >> 1 & QS_TOK_ADD_BOS) && all &&
                (err || len != n - 1 || memcmp(text, data + 1, n - 1) != 0)) {
                fprintf(stderr,
                        "fuzz_tokenizer: %zu bytes encode to %zu ids that decode to %zu "
                        "other bytes\n",
                        n - 1, nid, len);
                abort();
            }
            free(text);
        }
        free(ids);
    } else {
        size_t k = (n - 1) / 4;
        int32_t *ids = malloc(k ? k * 4 : 4);
        memcpy(ids, data + 1, k * 4);
        char *text = NULL;
        size_t len = 0;
        if (qs_tokenizer_decode(tok, ids, k, &text, &len) == QS_OK)
            free(text);
        for (size_t i = 0; i < k; i++)
            qs_tokenizer_piece(tok, ids[i], &len);
        free(ids);
    }
    return 0;
}
