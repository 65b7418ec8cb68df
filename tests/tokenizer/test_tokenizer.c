/* The byte-level BPE tokenizer: a small GGUF written here byte by byte (so
 * these always run), its malformed variants, and, where the cache holds the
 * default model, SmolLM2's tokenizer checked against ids from Hugging Face's
 * tokenizers and round-tripped over WikiText-2's test file. */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "qs_shard.h"

static char tmpdir[256];

/* ---- A growable byte buffer ------------------------------------------- */

typedef struct buf {
    uint8_t *p;
    size_t n, cap;
} buf;

static void put(buf *b, const void *src, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}
static void put_u32(buf *b, uint32_t v)
{
    put(b, &v, 4);
}
static void put_u64(buf *b, uint64_t v)
{
    put(b, &v, 8);
}
static void put_strn(buf *b, const char *s, size_t n)
{
    put_u64(b, n);
    put(b, s, n);
}
static void put_str(buf *b, const char *s)
{
    put_strn(b, s, strlen(s));
}

static char *write_file(const char *name, const buf *b)
{
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b->p, 1, b->n, f), b->n);
    fclose(f);
    return path;
}

/* ---- A small byte-level BPE vocabulary ----------------------------------
 * ids 0..3: <|endoftext|>, <s>, </s> (control), <tool> (user-defined);
 * 4..259: the 256 byte tokens in byte order, written with GPT-2's
 * bytes_to_unicode (an independent copy of its definition); then one token
 * per merge, in merge order. */

enum { NSPECIAL = 4, BYTE0 = 4, MERGED0 = 260 };
static const char *const specials[NSPECIAL] = {"<|endoftext|>", "<s>", "</s>", "<tool>"};
static const int special_type[NSPECIAL] = {3, 3, 3, 4};
static const char *const merges[] = {
    "h e",
    "l l",
    "he ll",
    "hell o",
    "\xc4\xa0 w",
    "o r",
    "\xc4\xa0w or",
    "l d",
    "\xc4\xa0wor ld",
    "b c",
    "a b",
    "a bc",
    "\xc4\xa0 \xc4\xa0",
    "1 2",
};
#define NMERGES (sizeof merges / sizeof merges[0])
enum { HE = MERGED0, LL, HELL, HELLO, SP_W, OR, SP_WOR, LD, SP_WORLD, BC, AB, ABC, SP_SP, D12 };
#define NVOCAB (MERGED0 + NMERGES)
#define B(c)   (BYTE0 + (uint8_t)(c)) /* the id of a byte's token */

/* The UTF-8 of bytes_to_unicode(b) into u; returns its length. */
static size_t byte_text(int b, char *u)
{
    int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    unsigned cp = (unsigned)b;
    if (!printable) {
        unsigned k = 0;
        for (int i = 0; i < b; i++)
            k += !((i >= '!' && i <= '~') || (i >= 0xA1 && i <= 0xAC) || (i >= 0xAE));
        cp = 256 + k;
    }
    if (cp < 0x80) {
        u[0] = (char)cp;
        return 1;
    }
    u[0] = (char)(0xC0 | cp >> 6);
    u[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
}

/* What to break in the file. */
typedef struct variant {
    const char *model, *pre;
    const char *extra_merge; /* appended to the merges */
    int types_short;         /* token_type one entry short */
    int bad_type;            /* a token type of 9 */
    uint32_t bos, eos;
    int drop_byte;  /* the token of byte 'x' renamed: not byte-level any more */
    int int_tokens; /* tokenizer.ggml.tokens as an array of u32 */
    int no_types;   /* no token_type at all: every token normal */
    int32_t unk;    /* tokenizer.ggml.unknown_token_id, -1: absent */
} variant;

static const variant good = {"gpt2", "smollm", NULL, 0, 0, 1, 2, 0, 0, 0, -1};

static buf make_gguf(const variant *v)
{
    size_t nmerges = NMERGES + (v->extra_merge != NULL);
    buf b = {0};
    put(&b, "GGUF", 4);
    put_u32(&b, 3);
    put_u64(&b, 0); /* tensors */
    put_u64(&b, 6 + !v->no_types + (v->unk >= 0));
    put_str(&b, "tokenizer.ggml.model");
    put_u32(&b, 8);
    put_str(&b, v->model);
    put_str(&b, "tokenizer.ggml.pre");
    put_u32(&b, 8);
    put_str(&b, v->pre);

    put_str(&b, "tokenizer.ggml.tokens");
    put_u32(&b, 9);
    if (v->int_tokens) {
        put_u32(&b, 4);
        put_u64(&b, NVOCAB);
        for (size_t i = 0; i < NVOCAB; i++)
            put_u32(&b, (uint32_t)i);
    } else {
        put_u32(&b, 8);
        put_u64(&b, NVOCAB);
        for (int i = 0; i < NSPECIAL; i++)
            put_str(&b, specials[i]);
        for (int c = 0; c < 256; c++) {
            char u[2];
            size_t n = byte_text(c, u);
            if (v->drop_byte && c == 'x')
                put_str(&b, "not-x");
            else
                put_strn(&b, u, n);
        }
        for (size_t m = 0; m < NMERGES; m++) { /* "left right" -> "leftright" */
            char joined[64];
            size_t o = 0;
            for (const char *s = merges[m]; *s; s++)
                if (*s != ' ')
                    joined[o++] = *s;
            put_strn(&b, joined, o);
        }
    }
    if (!v->no_types) {
        size_t nt = NVOCAB - (v->types_short != 0);
        put_str(&b, "tokenizer.ggml.token_type");
        put_u32(&b, 9);
        put_u32(&b, 5); /* i32 */
        put_u64(&b, nt);
        for (size_t i = 0; i < nt; i++)
            put_u32(&b, i < NSPECIAL                ? (uint32_t)special_type[i]
                        : (v->bad_type && i == 100) ? 9
                                                    : 1);
    }
    put_str(&b, "tokenizer.ggml.merges");
    put_u32(&b, 9);
    put_u32(&b, 8);
    put_u64(&b, nmerges);
    for (size_t m = 0; m < NMERGES; m++)
        put_str(&b, merges[m]);
    if (v->extra_merge)
        put_str(&b, v->extra_merge);
    put_str(&b, "tokenizer.ggml.bos_token_id");
    put_u32(&b, 4);
    put_u32(&b, v->bos);
    put_str(&b, "tokenizer.ggml.eos_token_id");
    put_u32(&b, 4);
    put_u32(&b, v->eos);
    if (v->unk >= 0) {
        put_str(&b, "tokenizer.ggml.unknown_token_id");
        put_u32(&b, 4);
        put_u32(&b, (uint32_t)v->unk);
    }
    while (b.n % 32) /* tensor data would start here */
        put(&b, "", 1);
    return b;
}

static qs_tokenizer *open_variant(const variant *v, int *err)
{
    buf b = make_gguf(v);
    qs_weights *w = NULL;
    assert_int_equal(qs_weights_open(write_file("tok.gguf", &b), &w), QS_OK);
    free(b.p);
    qs_tokenizer *t = (qs_tokenizer *)1;
    *err = qs_tokenizer_init_gguf(w, &t);
    qs_weights_close(w); /* the tokenizer keeps its own copy */
    if (*err)
        assert_null(t);
    return t;
}

/* Encodes text and compares with the expected ids. */
static void check_ids(const qs_tokenizer *t, const char *text, size_t len, int flags,
                      const int32_t *want, size_t nwant)
{
    int32_t *ids;
    size_t n;
    assert_int_equal(qs_tokenizer_encode(t, text, len, flags, &ids, &n), QS_OK);
    assert_non_null(ids);
    if (n != nwant || memcmp(ids, want, n * sizeof *ids) != 0) {
        fprintf(stderr, "encoding '%.*s' (flags %d):\n  got ", (int)len, text, flags);
        for (size_t i = 0; i < n; i++)
            fprintf(stderr, " %d", ids[i]);
        fprintf(stderr, "\n  want");
        for (size_t i = 0; i < nwant; i++)
            fprintf(stderr, " %d", want[i]);
        fprintf(stderr, "\n");
        fail_msg("ids differ for '%.*s'", (int)len, text);
    }
    free(ids);
}
#define CHECK(t, text, flags, ...)                                                                 \
    do {                                                                                           \
        const int32_t want_[] = {__VA_ARGS__};                                                     \
        check_ids(t, text, strlen(text), flags, want_, sizeof want_ / sizeof want_[0]);            \
    } while (0)

/* decode(encode(text)) == text, byte for byte. */
static void round_trip(const qs_tokenizer *t, const char *text, size_t len, int flags)
{
    int32_t *ids;
    size_t n, back_len;
    char *back;
    assert_int_equal(qs_tokenizer_encode(t, text, len, flags, &ids, &n), QS_OK);
    assert_true(n <= len);
    assert_int_equal(qs_tokenizer_decode(t, ids, n, &back, &back_len), QS_OK);
    if (back_len != len || memcmp(back, text, len) != 0)
        fail_msg("round trip of %zu bytes gave %zu different bytes", len, back_len);
    assert_int_equal(back[back_len], '\0');
    free(ids);
    free(back);
}

/* ---- The small vocabulary ------------------------------------------------ */

static void test_synthetic_encode(void **state)
{
    (void)state;
    int err;
    qs_tokenizer *t = open_variant(&good, &err);
    assert_int_equal(err, QS_OK);
    assert_int_equal(qs_tokenizer_vocab(t), NVOCAB);
    assert_int_equal(qs_tokenizer_bos(t), 1);
    assert_int_equal(qs_tokenizer_eos(t), 2);
    assert_int_equal(qs_tokenizer_wants_bos(t), 0);

    CHECK(t, "hello world", 0, HELLO, SP_WORLD);
    CHECK(t, "hello world", QS_TOK_ADD_BOS, 1, HELLO, SP_WORLD);
    /* Rank decides, not position: "b c" (9) before "a b" (10), then "a bc". */
    CHECK(t, "abc", 0, ABC);
    CHECK(t, "ab", 0, AB);
    CHECK(t, "bca", 0, BC, B('a'));
    /* Digits go one by one, so the merge "1 2" never applies. */
    CHECK(t, "12", 0, B('1'), B('2'));
    CHECK(t, "x12y", 0, B('x'), B('1'), B('2'), B('y'));
    /* Four spaces before a word: three, then " x"; equal ranks merge leftmost. */
    CHECK(t, "    x", 0, SP_SP, B(' '), B(' '), B('x'));
    CHECK(t, "hello\n", 0, HELLO, B('\n'));
    CHECK(t, "he's", 0, HE, B('\''), B('s'));
    /* Control tokens only when asked; user-defined ones always. */
    CHECK(t, "<s>hello</s>", QS_TOK_SPECIAL, 1, HELLO, 2);
    CHECK(t, "<s>hello</s>", 0, B('<'), B('s'), B('>'), HELLO, B('<'), B('/'), B('s'), B('>'));
    CHECK(t, "<tool>x", 0, 3, B('x'));
    CHECK(t, "<|endoftext|><s>", QS_TOK_SPECIAL, 0, 1);
    /* Invalid UTF-8 counts as "other": 0xFF 0xFE stay together, as bytes. */
    CHECK(t, "a\xff\xfe b", 0, B('a'), B(0xFF), B(0xFE), B(' '), B('b'));

    int32_t *ids;
    size_t n;
    assert_int_equal(qs_tokenizer_encode(t, NULL, 0, 0, &ids, &n), QS_OK);
    assert_non_null(ids);
    assert_int_equal(n, 0);
    free(ids);
    assert_int_equal(qs_tokenizer_encode(t, NULL, 3, 0, &ids, &n), QS_EINVAL);
    assert_int_equal(qs_tokenizer_encode(t, "x", 1, 64, &ids, &n), QS_EINVAL);
    qs_tokenizer_close(t);
}

static void test_synthetic_decode(void **state)
{
    (void)state;
    int err;
    qs_tokenizer *t = open_variant(&good, &err);
    assert_int_equal(err, QS_OK);
    size_t len;
    const char *p = qs_tokenizer_piece(t, HELLO, &len);
    assert_int_equal(len, 5);
    assert_memory_equal(p, "hello", 6);
    p = qs_tokenizer_piece(t, SP_WORLD, &len);
    assert_int_equal(len, 6);
    assert_memory_equal(p, " world", 7);
    p = qs_tokenizer_piece(t, 1, &len);
    assert_int_equal(len, 3);
    assert_memory_equal(p, "<s>", 4);
    p = qs_tokenizer_piece(t, B(0), &len); /* a NUL byte is a piece of length 1 */
    assert_int_equal(len, 1);
    assert_int_equal(p[0], 0);
    p = qs_tokenizer_piece(t, B(0xAD), &len); /* soft hyphen: one of the remapped bytes */
    assert_int_equal(len, 1);
    assert_int_equal((uint8_t)p[0], 0xAD);
    assert_null(qs_tokenizer_piece(t, -1, &len));
    assert_null(qs_tokenizer_piece(t, NVOCAB, &len));
    assert_non_null(strstr(qs_errmsg(), "outside the vocabulary"));
    assert_true(qs_tokenizer_is_control(t, 1));
    assert_false(qs_tokenizer_is_control(t, 3));
    assert_false(qs_tokenizer_is_control(t, HELLO));
    assert_false(qs_tokenizer_is_control(t, -5));

    const int32_t ids[] = {1, HELLO, SP_WORLD, B('!'), 2};
    char *text;
    assert_int_equal(qs_tokenizer_decode(t, ids, 5, &text, &len), QS_OK);
    assert_int_equal(len, strlen("<s>hello world!</s>"));
    assert_string_equal(text, "<s>hello world!</s>");
    free(text);
    assert_int_equal(qs_tokenizer_decode(t, NULL, 0, &text, &len), QS_OK);
    assert_int_equal(len, 0);
    free(text);
    const int32_t bad[] = {HELLO, NVOCAB + 7};
    assert_int_equal(qs_tokenizer_decode(t, bad, 2, &text, &len), QS_EINVAL);
    assert_null(text);
    assert_non_null(strstr(qs_errmsg(), "position 1"));
    const int32_t neg[] = {-1};
    assert_int_equal(qs_tokenizer_decode(t, neg, 1, &text, &len), QS_EINVAL);
    qs_tokenizer_close(t);
    qs_tokenizer_close(NULL);
}

/* Random byte strings, biased to the characters the pre-tokenizer cares
 * about, round-trip with and without control tokens. */
static void test_synthetic_round_trip_random(void **state)
{
    (void)state;
    static const char *const atoms[] = {
        " ",
        "  ",
        "\n",
        "\t",
        "a",
        "he",
        "llo",
        "1",
        "9",
        "'",
        "'s",
        "!",
        "<s>",
        "</s>",
        "<tool>",
        "\xc3\xa9",
        "\xe3\x80\x80",
        "\xc2\xa0",
        "\xff",
        "\xc3",
        "\x80",
        "\0",
        "x",
        "\xf0\x9f\x98\x80",
        "\xe4\xbd\xa0",
    };
    int err;
    qs_tokenizer *t = open_variant(&good, &err);
    assert_int_equal(err, QS_OK);
    char text[512];
    for (int iter = 0; iter < 3000; iter++) {
        size_t len = 0, natoms = (size_t)(rand() % 40);
        for (size_t k = 0; k < natoms; k++) {
            const char *a = atoms[rand() % (int)(sizeof atoms / sizeof atoms[0])];
            size_t al = a[0] ? strlen(a) : 1;
            if (rand() % 8 == 0) { /* a random byte */
                text[len++] = (char)(rand() & 0xFF);
                continue;
            }
            memcpy(text + len, a, al);
            len += al;
        }
        round_trip(t, text, len, 0);
        round_trip(t, text, len, QS_TOK_SPECIAL);
    }
    qs_tokenizer_close(t);
}

static void expect_error(const variant *v, int code, const char *needle)
{
    int err;
    qs_tokenizer *t = open_variant(v, &err);
    if (err != code)
        fail_msg("expected error %d, got %d: %s", code, err, qs_errmsg());
    assert_null(t);
    if (!strstr(qs_errmsg(), needle))
        fail_msg("message lacks '%s': %s", needle, qs_errmsg());
    assert_non_null(strstr(qs_errmsg(), "tok.gguf")); /* names the file */
}

static void test_synthetic_malformed(void **state)
{
    (void)state;
    variant v = good;
    v.model = "llama";
    expect_error(&v, QS_ENOTSUP, "'llama'");
    v = good, v.pre = "qwen2";
    expect_error(&v, QS_ENOTSUP, "'qwen2'");
    v = good, v.extra_merge = "h zz";
    expect_error(&v, QS_EFORMAT, "'zz'");
    v = good, v.extra_merge = "h o"; /* "ho" is not a token */
    expect_error(&v, QS_EFORMAT, "'ho'");
    v = good, v.extra_merge = "hello";
    expect_error(&v, QS_EFORMAT, "two tokens");
    v = good, v.types_short = 1;
    expect_error(&v, QS_EFORMAT, "token_type");
    v = good, v.bad_type = 1;
    expect_error(&v, QS_EFORMAT, "token_type[100]");
    v = good, v.bos = NVOCAB;
    expect_error(&v, QS_EFORMAT, "bos_token_id");
    v = good, v.eos = 100000;
    expect_error(&v, QS_EFORMAT, "eos_token_id");
    v = good, v.unk = NVOCAB + 1;
    expect_error(&v, QS_EFORMAT, "unknown_token_id");
    v = good, v.int_tokens = 1;
    expect_error(&v, QS_EFORMAT, "tokenizer.ggml.tokens");

    /* No token types: every token is normal text, nothing is special. */
    v = good, v.no_types = 1;
    int err;
    qs_tokenizer *t = open_variant(&v, &err);
    assert_int_equal(err, QS_OK);
    assert_false(qs_tokenizer_is_control(t, 1));
    CHECK(t, "<s>", QS_TOK_SPECIAL, B('<'), B('s'), B('>'));
    qs_tokenizer_close(t);

    /* A byte without a token: the unknown token stands in, or encode fails. */
    v = good, v.drop_byte = 1;
    t = open_variant(&v, &err);
    assert_int_equal(err, QS_OK);
    int32_t *ids;
    size_t n;
    assert_int_equal(qs_tokenizer_encode(t, "ax", 2, 0, &ids, &n), QS_EINVAL);
    assert_non_null(strstr(qs_errmsg(), "byte 0x78 (at offset 1)"));
    qs_tokenizer_close(t);
    v.unk = 0;
    t = open_variant(&v, &err);
    assert_int_equal(err, QS_OK);
    CHECK(t, "axb x", 0, B('a'), 0, B('b'), B(' '), 0);
    qs_tokenizer_close(t);

    qs_tokenizer *out = (qs_tokenizer *)1;
    assert_int_equal(qs_tokenizer_init_gguf(NULL, &out), QS_EINVAL);
    assert_null(out);
}

/* ---- SmolLM2, where the cache holds it ------------------------------------ */

/* The ids below come from Hugging Face's tokenizers, built from the GGUF's
 * vocabulary and merges the way SmolLM2's tokenizer.json specifies, by
 * tests/tokenizer/make_reference_ids.py (see there); `special` says whether
 * control tokens were recognized. Regenerate them with it, never by hand. */
/* Generated by tests/tokenizer/make_reference_ids.py. */
/* clang-format off */
static const struct reference {
    const char *text;
    int special; /* control tokens recognized */
    int exact;   /* decodes back to the text */
    size_t n;
    int32_t ids[64];
} references[] = {
    {"Hello world", 1, 1, 2, {19556, 905}},
    {"The quick brown fox jumps over the lazy dog.", 1, 1, 10, {504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30}},
    {"It's 12345 o'clock; they're here, we'll see what I'd've done. 'S 'LL", 1, 1, 29, {1589, 506, 216, 33, 34, 35, 36, 37, 263, 23, 17466, 43, 502, 2316, 1535, 28, 392, 3060, 963, 732, 339, 6737, 3543, 2294, 30, 637, 67, 637, 16421}},
    {"  leading spaces\011and\011tabs\012\012new   lines   ", 1, 1, 14, {216, 2899, 5600, 197, 397, 197, 100, 7366, 198, 198, 2241, 256, 3204, 333}},
    {"emoji \360\237\230\200\360\237\216\211 and CJK \344\275\240\345\245\275\344\270\226\347\225\214, \303\274n\303\257c\303\266d\303\251 \316\225\316\273\316\273\316\267\316\275\316\271\316\272\316\254", 1, 1, 38, {391, 33777, 40303, 218, 10813, 232, 227, 284, 37845, 59, 216, 18645, 250, 48392, 138, 7906, 240, 178, 239, 230, 28, 5549, 137, 94, 25972, 83, 7466, 84, 2756, 5664, 239, 17162, 17162, 25723, 11517, 12001, 21118, 26112}},
    {"3.14159 + 2,718 = \302\275\302\262\331\243 x10", 1, 1, 23, {35, 30, 33, 36, 33, 37, 41, 1232, 216, 34, 28, 39, 33, 40, 446, 216, 16738, 19133, 164, 113, 1792, 33, 32}},
    {"<|im_start|>user\012Hi there<|im_end|>\012", 1, 1, 7, {1, 4093, 198, 26843, 665, 2, 198}},
    {"<|im_start|>user\012Hi there<|im_end|>\012", 0, 1, 19, {44, 108, 306, 79, 3738, 108, 46, 4093, 198, 26843, 665, 44, 108, 306, 79, 486, 108, 46, 198}},
    {"def f(x):\012    return x**2  # comment\012", 1, 1, 14, {1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 5189, 198}},
    {"a                    b\012\012\012\012\012\011\011 c", 1, 1, 6, {81, 42185, 278, 22342, 3558, 265}},
    {"https://example.com/path\077q=1&r=2#frag", 1, 1, 17, {4687, 1742, 7434, 30, 824, 31, 1537, 47, 97, 45, 33, 22, 98, 45, 34, 19, 28082}},
    {"\343\200\200full\343\200\200width\302\240nbsp \342\200\203em\015\012CRLF", 1, 1, 18, {12109, 218, 11069, 12109, 218, 6930, 15442, 94, 32093, 216, 321, 221, 391, 201, 198, 9088, 60, 54}},
    {" = Robert Boulter = \012 \012 Robert Boulter is an English film , television and theatre actor .", 1, 1, 22, {446, 6356, 389, 9226, 352, 446, 3717, 3717, 6356, 389, 9226, 352, 314, 354, 2321, 4771, 3297, 8552, 284, 16984, 17523, 1673}},
    {"don't DON'T 're're 've 'm 'd 'x '", 1, 1, 18, {12420, 982, 422, 2154, 23, 68, 637, 257, 2316, 637, 307, 637, 93, 637, 84, 637, 104, 637}},
    {"<|im_end|><|im_end|><|endoftext|>tail", 1, 1, 4, {2, 2, 0, 14332}},
    {"", 1, 1, 0, {0}},
    {"a\004b \361\200\200\200 \035", 1, 0, 10, {81, 0, 82, 216, 0, 218, 218, 218, 216, 0}},
};
/* clang-format on */
#define WIKI_TEST_TOKENS 304830u /* wiki.test.raw */

static qs_tokenizer *open_smollm2(void)
{
    char path[1024];
    if (qs_cache_path(QS_DEFAULT_GGUF, path, sizeof path) != QS_OK)
        path[0] = '\0';
    if (access(path, R_OK) != 0) {
        printf("skipping: %s is absent (deploy/fetch-model.sh fetches it)\n", path);
        return NULL;
    }
    qs_weights *w;
    assert_int_equal(qs_weights_open(path, &w), QS_OK);
    qs_tokenizer *t;
    int err = qs_tokenizer_init_gguf(w, &t);
    if (err)
        fail_msg("%s", qs_errmsg());
    qs_weights_close(w);
    return t;
}

static void test_smollm2_reference_ids(void **state)
{
    (void)state;
    qs_tokenizer *t = open_smollm2();
    if (!t)
        skip();
    assert_int_equal(qs_tokenizer_vocab(t), 49152);
    assert_int_equal(qs_tokenizer_bos(t), 1);
    assert_int_equal(qs_tokenizer_eos(t), 2);
    assert_int_equal(qs_tokenizer_wants_bos(t), 0);
    for (int32_t id = 0; id < 17; id++)
        assert_true(qs_tokenizer_is_control(t, id));
    assert_false(qs_tokenizer_is_control(t, 17));
    size_t len;
    assert_string_equal(qs_tokenizer_piece(t, 2, &len), "<|im_end|>");
    for (size_t i = 0; i < sizeof references / sizeof references[0]; i++) {
        const struct reference *r = &references[i];
        int flags = r->special ? QS_TOK_SPECIAL : 0;
        check_ids(t, r->text, strlen(r->text), flags, r->ids, r->n);
        if (r->exact)
            round_trip(t, r->text, strlen(r->text), flags);
    }
    qs_tokenizer_close(t);
}

/* The 21 bytes SmolLM2's vocabulary has no token for (found with the
 * gguf package: no token is bytes_to_unicode of them); each encodes as the
 * unknown token 0, "<|endoftext|>". */
static const uint8_t smollm2_missing[] = {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0,
                                          0xC1, 0xF1, 0xF2, 0xF5, 0xF6, 0xF7, 0xF8,
                                          0xF9, 0xFA, 0xFB, 0xFC, 0xFD, 0xFE, 0xFF};

static int smollm2_lacks(uint8_t c)
{
    return memchr(smollm2_missing, c, sizeof smollm2_missing) != NULL;
}

/* decode(encode(text)) is the text with each byte SmolLM2 lacks replaced by
 * "<|endoftext|>", and otherwise the same bytes. */
static void round_trip_smollm2(const qs_tokenizer *t, const char *text, size_t len, int flags)
{
    static const char unk[] = "<|endoftext|>";
    size_t nmiss = 0;
    for (size_t i = 0; i < len; i++)
        nmiss += smollm2_lacks((uint8_t)text[i]);
    if (!nmiss) {
        round_trip(t, text, len, flags);
        return;
    }
    char *want = malloc(len + nmiss * (sizeof unk - 2));
    assert_non_null(want);
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        if (smollm2_lacks((uint8_t)text[i]))
            memcpy(want + o, unk, sizeof unk - 1), o += sizeof unk - 1;
        else
            want[o++] = text[i];
    }
    int32_t *ids;
    size_t n, back_len;
    char *back;
    assert_int_equal(qs_tokenizer_encode(t, text, len, flags, &ids, &n), QS_OK);
    assert_int_equal(qs_tokenizer_decode(t, ids, n, &back, &back_len), QS_OK);
    assert_int_equal(back_len, o);
    assert_memory_equal(back, want, o);
    free(ids);
    free(back);
    free(want);
}

static void test_smollm2_odd_inputs(void **state)
{
    (void)state;
    qs_tokenizer *t = open_smollm2();
    if (!t)
        skip();
    static const char *const odd[] = {
        "",
        "\xff",
        "\xff\xfe\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0\x28\x8c\xbc", /* invalid sequences */
        "\xed\xa0\x80\xc0\xaf\xf8\x88\x80\xf4\x90\x80\x80",     /* surrogate, overlong, too high */
        "\xa0\xa1\x80\x8d\xe2\x82",                             /* continuations, cut off */
        "cut \xe2\x82",
        "\xf0\x9f\x98\x80\xf0\x9f\x91\xa8\xe2\x80\x8d\xf0\x9f\x91\xa9 emoji \xf0\x9f\x8e\x89",
        "\xe4\xbd\xa0\xe5\xa5\xbd\xef\xbc\x8c\xe4\xb8\x96\xe7\x95\x8c\xe3\x80\x82 \xed\x95\x9c",
        "12345 007 3.14 \xd9\xa3\xd9\xa4 \xc2\xbd",
        "\n\t\r\v\f \n\n\n\t\t\t  \r\n",
        "'s 't 're 've 'm 'll 'd 'S '' ''s x's",
        "<|im_start|><|im_start|<|im_end|>>",
        "ctrl \x04\x06\x13 end",
    };
    for (size_t i = 0; i < sizeof odd / sizeof odd[0]; i++) {
        round_trip_smollm2(t, odd[i], strlen(odd[i]), 0);
        round_trip_smollm2(t, odd[i], strlen(odd[i]), QS_TOK_SPECIAL);
    }
    /* Each byte alone: its own token, or the unknown token for the 21. */
    for (int c = 0; c < 256; c++) {
        int32_t *ids;
        size_t n, len;
        char ch = (char)c;
        assert_int_equal(qs_tokenizer_encode(t, &ch, 1, 0, &ids, &n), QS_OK);
        assert_int_equal(n, 1);
        if (smollm2_lacks((uint8_t)c)) {
            assert_int_equal(ids[0], 0);
        } else {
            const char *p = qs_tokenizer_piece(t, ids[0], &len);
            assert_int_equal(len, 1);
            assert_int_equal((uint8_t)p[0], c);
        }
        free(ids);
    }

    /* Long runs, NULs, every byte value, and random binary. */
    size_t big = 100000;
    char *s = malloc(big);
    assert_non_null(s);
    memset(s, ' ', big);
    round_trip(t, s, big, 0);
    memset(s, '\n', big);
    round_trip(t, s, big, 0);
    memset(s, 'a', big);
    round_trip(t, s, big, 0);
    memset(s, 0, big);
    round_trip(t, s, big, 0);
    for (size_t i = 0; i < 256 * 3; i++)
        s[i] = (char)(i % 256);
    round_trip_smollm2(t, s, 256 * 3, 0);
    for (size_t i = 0; i < big; i++)
        s[i] = (char)(rand() & 0xFF);
    round_trip_smollm2(t, s, big, QS_TOK_SPECIAL);
    free(s);
    qs_tokenizer_close(t);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void test_smollm2_wikitext(void **state)
{
    (void)state;
    const char *path = getenv("QSHARD_WIKITEXT");
    if (!path)
        path = QS_WIKITEXT_DEFAULT;
    FILE *f = fopen(path, "rb");
    if (!f) {
        printf("skipping: %s is absent (set QSHARD_WIKITEXT to wiki.test.raw)\n", path);
        skip();
    }
    qs_tokenizer *t = open_smollm2();
    if (!t) {
        fclose(f);
        skip();
    }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    assert_true(size > 0);
    rewind(f);
    char *text = malloc((size_t)size);
    assert_non_null(text);
    assert_int_equal(fread(text, 1, (size_t)size, f), (size_t)size);
    fclose(f);

    int32_t *ids;
    size_t n, len;
    char *back;
    double t0 = now();
    assert_int_equal(qs_tokenizer_encode(t, text, (size_t)size, 0, &ids, &n), QS_OK);
    double t1 = now();
    assert_int_equal(qs_tokenizer_decode(t, ids, n, &back, &len), QS_OK);
    double t2 = now();
    printf("wiki.test.raw: %ld bytes -> %zu tokens (reference %u); encode %.3f s, decode %.3f s\n",
           size, n, WIKI_TEST_TOKENS, t1 - t0, t2 - t1);
    assert_int_equal(n, WIKI_TEST_TOKENS);
    assert_int_equal(len, (size_t)size);
    assert_memory_equal(back, text, (size_t)size);
    free(ids);
    free(back);
    free(text);
    qs_tokenizer_close(t);
}

static int setup(void **state)
{
    (void)state;
    unsigned seed = (unsigned)time(NULL) ^ (unsigned)getpid();
    printf("seed %u\n", seed);
    srand(seed);
    snprintf(tmpdir, sizeof tmpdir, "/tmp/qs_test_tokenizer_XXXXXX");
    assert_non_null(mkdtemp(tmpdir));
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char path[512];
    snprintf(path, sizeof path, "%s/tok.gguf", tmpdir);
    unlink(path);
    return rmdir(tmpdir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_synthetic_encode),
        cmocka_unit_test(test_synthetic_decode),
        cmocka_unit_test(test_synthetic_round_trip_random),
        cmocka_unit_test(test_synthetic_malformed),
        cmocka_unit_test(test_smollm2_reference_ids),
        cmocka_unit_test(test_smollm2_odd_inputs),
        cmocka_unit_test(test_smollm2_wikitext),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
