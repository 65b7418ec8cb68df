/* tokenizer.h: byte-level BPE (the GPT-2 family, e.g. SmolLM2) built from a
 * GGUF file's tokenizer.ggml.* metadata. To be merged into qs_shard.h.
 *
 * A tokenizer is immutable once made: encode, decode and piece may be called
 * from any number of threads at once. It copies what it needs, so the
 * qs_weights it was made from may be closed before it.
 *
 * Text is bytes. Any byte string, invalid UTF-8 included, encodes, and
 * decode(encode(text)) gives the same bytes back, provided the vocabulary
 * has a token for each of the 256 bytes. SmolLM2's lacks 21 (0x04, 0x06,
 * 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, 0xF5..0xFF): each of
 * those encodes as the unknown token (tokenizer.ggml.unknown_token_id,
 * SmolLM2: 0, "<|endoftext|>"), as Hugging Face's tokenizer does, so such
 * text does not come back; with no unknown token, encode fails instead.
 */
#ifndef QS_TOKENIZER_H
#define QS_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "qs_shard.h" /* qs_weights; qs_err via qs_kernels.h */

#ifdef __cplusplus
extern "C" {
#endif

typedef struct qs_tokenizer qs_tokenizer;

/* Flags of qs_tokenizer_encode. Passing 1 or 0 reads as "add BOS or not". */
enum {
    /* Put the BOS token first (QS_EINVAL if the file names none). */
    QS_TOK_ADD_BOS = 1,
    /* Recognize control tokens (token_type 3, e.g. "<|im_start|>") written
     * in the text, as llama.cpp's parse_special and Hugging Face's default
     * do. Off, such text is ordinary text, split into ordinary tokens: the
     * safe choice for text a user typed. Chat templates want it on.
     * User-defined tokens (token_type 4) are recognized either way. */
    QS_TOK_SPECIAL = 2,
};

/* Reads tokenizer.ggml.model (must be "gpt2"), .pre ("smollm" and the
 * pre-tokenizers llama.cpp groups with it: digits split one by one, then the
 * GPT-2 pattern; or "gpt-2": the pattern alone), .tokens, .merges,
 * .token_type (optional: all normal when absent), .bos_token_id,
 * .eos_token_id, .unknown_token_id and .add_bos_token (all optional). Every count and id is
 * checked: a merge naming an unknown token, a type array of another length,
 * an id outside the vocabulary are QS_EFORMAT naming the file and the key. */
int qs_tokenizer_init_gguf(const qs_weights *w, qs_tokenizer **out);
void qs_tokenizer_close(qs_tokenizer *t);

/* Encodes len bytes of text (need not be NUL-terminated; NULL when len is 0)
 * with the QS_TOK_* flags. QS_EINVAL names the offset of a byte that has
 * neither a token nor an unknown token to stand for it. On success *ids is a malloc'ed array of *n
 * token ids (never NULL, even when *n is 0) that the caller frees with free(). */
int qs_tokenizer_encode(const qs_tokenizer *t, const char *text, size_t len, int flags,
                        int32_t **ids, size_t *n);

/* Decodes n ids into their exact bytes: *text is malloc'ed, holds *len bytes
 * plus a terminating NUL (the bytes themselves may hold NULs), and the caller
 * frees it with free(). Control tokens decode to their text ("<|im_end|>").
 * An id outside the vocabulary is QS_EINVAL naming its position. */
int qs_tokenizer_decode(const qs_tokenizer *t, const int32_t *ids, size_t n, char **text,
                        size_t *len);

/* The bytes of one token, for streaming output: a pointer into the tokenizer
 * (valid until close) to *len bytes followed by a NUL. A piece may end in
 * the middle of a UTF-8 character: whoever prints pieces one by one holds
 * back an incomplete tail. NULL (and QS_EINVAL's message) for an id outside
 * the vocabulary. */
const char *qs_tokenizer_piece(const qs_tokenizer *t, int32_t id, size_t *len);

/* 1 for control tokens (token_type 3), which a chat front end usually does
 * not print; 0 otherwise, and for ids outside the vocabulary. */
int qs_tokenizer_is_control(const qs_tokenizer *t, int32_t id);

/* The BOS and EOS ids, -1 where the file names none. */
int32_t qs_tokenizer_bos(const qs_tokenizer *t);
int32_t qs_tokenizer_eos(const qs_tokenizer *t);
/* tokenizer.ggml.add_bos_token: 1 if the model expects BOS first, else 0
 * (also when absent). SmolLM2 says 0. */
int qs_tokenizer_wants_bos(const qs_tokenizer *t);
size_t qs_tokenizer_vocab(const qs_tokenizer *t);

#ifdef __cplusplus
}
#endif
#endif /* QS_TOKENIZER_H */
