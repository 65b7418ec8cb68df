/* GGUF and safetensors readers: files written here byte by byte from the
 * specs, read back as fp32 and compared with values decoded independently;
 * every malformed variant must fail with a sentence, never crash. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "qs_shard.h"

static char tmpdir[256];

/* ---- A growable byte buffer and the fp16 encoding ----------------------- */

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
static void put_str(buf *b, const char *s)
{
    put_u64(b, strlen(s));
    put(b, s, strlen(s));
}

/* Round-to-nearest-even fp32 -> fp16 for normal values (enough here). */
static uint16_t to_half(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    int32_t e = (int32_t)((x >> 23) & 0xff) - 127 + 15;
    uint32_t m = x & 0x7fffff;
    if (e <= 0)
        return (uint16_t)sign;
    uint32_t h = sign | ((uint32_t)e << 10) | (m >> 13);
    uint32_t rest = m & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1)))
        h++;
    return (uint16_t)h;
}

/* fp16 -> double from the definition, independent of the reader's code. */
static double half_value(uint16_t h)
{
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double v = e ? (1.0 + m / 1024.0) * ldexp(1.0, e - 15) : m / 1024.0 * ldexp(1.0, -14);
    return (h & 0x8000) ? -v : v;
}

static double urand(void)
{
    return rand() / (double)RAND_MAX * 2.0 - 1.0;
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

/* ---- A GGUF file with one tensor of each supported type ----------------- */

enum { ROWS = 3, COLS = 96 }; /* 3 blocks of 32 per row */

typedef struct gguf_tensor {
    const char *name;
    uint32_t ggml_type;
    buf data;
    double want[ROWS * COLS];
} gguf_tensor;

/* Builds tensor data of the given ggml type and the values it decodes to. */
static void make_tensor(gguf_tensor *t)
{
    memset(&t->data, 0, sizeof t->data);
    for (int r = 0; r < ROWS; r++) {
        for (int b = 0; b < COLS / 32; b++) {
            double *w = &t->want[r * COLS + b * 32];
            if (t->ggml_type == 0) { /* F32 */
                for (int j = 0; j < 32; j++) {
                    float v = (float)urand();
                    put(&t->data, &v, 4);
                    w[j] = v;
                }
            } else if (t->ggml_type == 1) { /* F16 */
                for (int j = 0; j < 32; j++) {
                    uint16_t h = to_half((float)urand());
                    put(&t->data, &h, 2);
                    w[j] = half_value(h);
                }
            } else if (t->ggml_type == 8) { /* Q8_0: d, int8[32] */
                uint16_t d = to_half(0.01f + 0.02f * (float)rand() / RAND_MAX);
                put(&t->data, &d, 2);
                for (int j = 0; j < 32; j++) {
                    int8_t q = (int8_t)(rand() % 255 - 127);
                    put(&t->data, &q, 1);
                    w[j] = half_value(d) * q;
                }
            } else { /* Q4_0: d, nibbles; Q4_1: d, m, nibbles */
                uint16_t d = to_half(0.05f), m = to_half(-0.3f);
                put(&t->data, &d, 2);
                if (t->ggml_type == 3)
                    put(&t->data, &m, 2);
                uint8_t q[16];
                for (int j = 0; j < 16; j++) {
                    q[j] = (uint8_t)(rand() & 0xff);
                    double lo = q[j] & 0xf, hi = q[j] >> 4;
                    if (t->ggml_type == 2) {
                        w[j] = half_value(d) * (lo - 8);
                        w[j + 16] = half_value(d) * (hi - 8);
                    } else {
                        w[j] = half_value(d) * lo + half_value(m);
                        w[j + 16] = half_value(d) * hi + half_value(m);
                    }
                }
                put(&t->data, q, 16);
            }
        }
    }
}

static gguf_tensor tensors[] = {
    {"t.f32", 0, {0}, {0}},  {"t.f16", 1, {0}, {0}},  {"t.q8_0", 8, {0}, {0}},
    {"t.q4_0", 2, {0}, {0}}, {"t.q4_1", 3, {0}, {0}},
};
#define NT (sizeof tensors / sizeof tensors[0])

/* The whole file; `bad_offset` moves the last tensor's offset past the end. */
static buf make_gguf(int bad_offset, uint32_t bad_type)
{
    buf b = {0};
    put(&b, "GGUF", 4);
    put_u32(&b, 3);
    put_u64(&b, NT);
    put_u64(&b, 9);
    const char *arch = "llama";
    put_str(&b, "general.architecture");
    put_u32(&b, 8);
    put_str(&b, arch);
    struct {
        const char *k;
        uint32_t v;
    } kv[] = {{"llama.block_count", 2},           {"llama.embedding_length", 64},
              {"llama.attention.head_count", 4},  {"llama.attention.head_count_kv", 2},
              {"llama.feed_forward_length", 128}, {"llama.context_length", 256}};
    for (size_t i = 0; i < 6; i++) {
        put_str(&b, kv[i].k);
        put_u32(&b, 4);
        put_u32(&b, kv[i].v);
    }
    put_str(&b, "llama.rope.freq_base");
    put_u32(&b, 6);
    float theta = 100000.0f;
    put(&b, &theta, 4);
    put_str(&b, "tokenizer.ggml.tokens");
    put_u32(&b, 9);
    put_u32(&b, 8);
    put_u64(&b, 3);
    put_str(&b, "a");
    put_str(&b, "bc");
    put_str(&b, "<s>");

    uint64_t off = 0;
    for (size_t i = 0; i < NT; i++) {
        put_str(&b, tensors[i].name);
        put_u32(&b, 2);
        put_u64(&b, COLS); /* ne[0]: innermost */
        put_u64(&b, ROWS);
        put_u32(&b, i == NT - 1 && bad_type ? bad_type : tensors[i].ggml_type);
        put_u64(&b, i == NT - 1 && bad_offset ? off + 4096 : off);
        off += (tensors[i].data.n + 31) / 32 * 32;
    }
    while (b.n % 32)
        put(&b, "", 1);
    for (size_t i = 0; i < NT; i++) {
        put(&b, tensors[i].data.p, tensors[i].data.n);
        while (b.n % 32)
            put(&b, "", 1);
    }
    return b;
}

static int setup(void **state)
{
    (void)state;
    unsigned seed = (unsigned)time(NULL) ^ (unsigned)getpid();
    printf("seed %u\n", seed);
    srand(seed);
    snprintf(tmpdir, sizeof tmpdir, "/tmp/qs_test_weights_XXXXXX");
    assert_non_null(mkdtemp(tmpdir));
    for (size_t i = 0; i < NT; i++)
        make_tensor(&tensors[i]);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static void test_gguf_reads_every_type(void **state)
{
    (void)state;
    buf b = make_gguf(0, 0);
    qs_weights *w;
    assert_int_equal(qs_weights_open(write_file("ok.gguf", &b), &w), QS_OK);
    assert_int_equal(qs_weights_count(w), NT);
    float out[ROWS * COLS];
    for (size_t i = 0; i < NT; i++) {
        const qs_tensor_info *t = qs_weights_find(w, tensors[i].name);
        assert_non_null(t);
        assert_int_equal(t->ndim, 2);
        assert_int_equal(t->shape[0], ROWS);
        assert_int_equal(t->shape[1], COLS);
        assert_int_equal(qs_weights_read_f32(w, t, 0, ROWS, 0, COLS, out), QS_OK);
        for (int k = 0; k < ROWS * COLS; k++)
            assert_float_equal(out[k], tensors[i].want[k], 1e-6);
        /* A slice that starts and ends inside blocks: columns 45..77 of row 1. */
        assert_int_equal(qs_weights_read_f32(w, t, 1, 2, 45, 33, out), QS_OK);
        for (int r = 0; r < 2; r++)
            for (int c = 0; c < 33; c++)
                assert_float_equal(out[r * 33 + c], tensors[i].want[(1 + r) * COLS + 45 + c], 1e-6);
        assert_int_equal(qs_weights_read_f32(w, t, 2, 2, 0, COLS, out), QS_EINVAL);
        assert_int_equal(qs_weights_read_f32(w, t, 0, 1, 90, 7, out), QS_EINVAL);
    }
    qs_model_config m;
    assert_int_equal(qs_config_from_gguf(w, &m), QS_OK);
    assert_int_equal(m.layers, 2);
    assert_int_equal(m.hidden, 64);
    assert_int_equal(m.kv_heads, 2);
    assert_int_equal(m.head_dim, 16);
    assert_int_equal(m.vocab, 3);
    assert_true(m.tied_embeddings);
    assert_float_equal(m.rope_theta, 100000.0, 1e-3);
    qs_meta_array a;
    assert_int_equal(qs_weights_meta_array(w, "tokenizer.ggml.tokens", &a), QS_OK);
    const char *s;
    size_t n;
    for (int i = 0; i < 3; i++)
        assert_int_equal(qs_meta_array_next_str(&a, &s, &n), QS_OK);
    assert_int_equal(n, 3);
    assert_memory_equal(s, "<s>", 3);
    assert_int_equal(qs_meta_array_next_str(&a, &s, &n), QS_EFORMAT); /* exhausted */
    uint64_t u;
    assert_int_equal(qs_weights_meta_u64(w, "no.such.key", &u), QS_ENOTFOUND);
    assert_int_equal(qs_weights_meta_u64(w, "general.architecture", &u), QS_EFORMAT);
    qs_weights_close(w);
    free(b.p);
}

/* Every prefix of a valid file is a truncated file: each must be refused. */
static void test_gguf_every_truncation_fails_cleanly(void **state)
{
    (void)state;
    buf b = make_gguf(0, 0);
    size_t full = b.n;
    for (size_t len = 0; len < full; len += (len < 1024 ? 1 : 97)) {
        b.n = len;
        qs_weights *w = NULL;
        int err = qs_weights_open(write_file("trunc.gguf", &b), &w);
        assert_true(err < 0);
        assert_null(w);
        assert_true(strlen(qs_errmsg()) > 10);
    }
    free(b.p);
}

static void test_gguf_malformed(void **state)
{
    (void)state;
    qs_weights *w;
    buf b = make_gguf(1, 0);
    assert_int_equal(qs_weights_open(write_file("off.gguf", &b), &w), QS_EFORMAT);
    assert_non_null(strstr(qs_errmsg(), "t.q4_1"));
    free(b.p);

    b = make_gguf(0, 12); /* Q4_K: not supported */
    assert_int_equal(qs_weights_open(write_file("type.gguf", &b), &w), QS_ENOTSUP);
    assert_non_null(strstr(qs_errmsg(), "t.q4_1"));
    free(b.p);

    b = make_gguf(0, 0);
    b.p[4] = 7; /* version */
    assert_int_equal(qs_weights_open(write_file("ver.gguf", &b), &w), QS_EFORMAT);
    memcpy(b.p + 4, "\x03\0\0\0", 4);
    memset(b.p + 8, 0xff, 8); /* tensor count */
    assert_int_equal(qs_weights_open(write_file("count.gguf", &b), &w), QS_EFORMAT);
    free(b.p);

    /* A NaN in F32 data is found when read, naming the tensor. */
    b = make_gguf(0, 0);
    float nan = NAN;
    size_t f32_at = b.n;
    for (size_t i = NT; i-- > 0;)
        f32_at -= (tensors[i].data.n + 31) / 32 * 32;
    memcpy(b.p + f32_at + 4 * 5, &nan, 4);
    assert_int_equal(qs_weights_open(write_file("nan.gguf", &b), &w), QS_OK);
    float out[ROWS * COLS];
    assert_int_equal(qs_weights_read_f32(w, qs_weights_find(w, "t.f32"), 0, 1, 0, COLS, out),
                     QS_EFORMAT);
    assert_non_null(strstr(qs_errmsg(), "NaN"));
    assert_non_null(strstr(qs_errmsg(), "t.f32"));
    qs_weights_close(w);
    free(b.p);

    buf junk = {0};
    put(&junk, "not a model at all, just text", 29);
    assert_int_equal(qs_weights_open(write_file("junk.bin", &junk), &w), QS_EFORMAT);
    assert_int_equal(qs_weights_open("/nonexistent/model.gguf", &w), QS_ENOTFOUND);
    free(junk.p);
}

/* ---- safetensors -------------------------------------------------------- */

static buf make_safetensors(const char *header_fmt, const buf *data)
{
    char header[1024];
    snprintf(header, sizeof header, "%s", header_fmt);
    buf b = {0};
    put_u64(&b, strlen(header));
    put(&b, header, strlen(header));
    put(&b, data->p, data->n);
    return b;
}

static void test_safetensors_single_and_sharded(void **state)
{
    (void)state;
    /* a: F32 2x3, b: F16 4, c: BF16 1x2 */
    buf d = {0};
    float a[6];
    uint16_t h[4], bf[2];
    for (int i = 0; i < 6; i++)
        a[i] = (float)urand();
    put(&d, a, sizeof a);
    for (int i = 0; i < 4; i++)
        h[i] = to_half((float)urand());
    put(&d, h, sizeof h);
    float bv[2] = {1.5f, -0.375f};
    for (int i = 0; i < 2; i++) {
        uint32_t x;
        memcpy(&x, &bv[i], 4);
        bf[i] = (uint16_t)(x >> 16);
    }
    put(&d, bf, sizeof bf);
    buf f = make_safetensors("{\"__metadata__\":{\"format\":\"pt\"},"
                             "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
                             "\"b\":{\"dtype\":\"F16\",\"shape\":[4],\"data_offsets\":[24,32]},"
                             "\"c\":{\"dtype\":\"BF16\",\"shape\":[1,2],\"data_offsets\":[32,36]}}",
                             &d);
    char dir[300];
    snprintf(dir, sizeof dir, "%s/st", tmpdir);
    mkdir(dir, 0700);
    char path[400];
    snprintf(path, sizeof path, "st/model.safetensors");
    write_file(path, &f);

    qs_weights *w;
    assert_int_equal(qs_weights_open(dir, &w), QS_OK); /* a directory holding it */
    assert_int_equal(qs_weights_count(w), 3);
    float out[6];
    assert_int_equal(qs_weights_read_f32(w, qs_weights_find(w, "a"), 1, 1, 1, 2, out), QS_OK);
    assert_float_equal(out[0], a[4], 0);
    assert_float_equal(out[1], a[5], 0);
    assert_int_equal(qs_weights_read_f32(w, qs_weights_find(w, "b"), 0, 1, 0, 4, out), QS_OK);
    for (int i = 0; i < 4; i++)
        assert_float_equal(out[i], half_value(h[i]), 0);
    assert_int_equal(qs_weights_read_f32(w, qs_weights_find(w, "c"), 0, 1, 0, 2, out), QS_OK);
    assert_float_equal(out[0], 1.5, 0);
    assert_float_equal(out[1], -0.375, 0);
    assert_null(qs_weights_find(w, "zzz"));
    qs_weights_close(w);

    /* Two shards and an index. */
    buf d2 = {0};
    put(&d2, a, sizeof a);
    buf s1 =
        make_safetensors("{\"x\":{\"dtype\":\"F32\",\"shape\":[6],\"data_offsets\":[0,24]}}", &d2);
    buf s2 = make_safetensors("{\"y\":{\"dtype\":\"F32\",\"shape\":[3,2],\"data_offsets\":[0,24]}}",
                              &d2);
    write_file("st/model-00001-of-00002.safetensors", &s1);
    write_file("st/model-00002-of-00002.safetensors", &s2);
    buf idx = {0};
    const char *index = "{\"metadata\":{},\"weight_map\":{\"x\":\"model-00001-of-00002."
                        "safetensors\",\"y\":\"model-00002-of-00002.safetensors\"}}";
    put(&idx, index, strlen(index));
    char *ip = write_file("st/model.safetensors.index.json", &idx);
    assert_int_equal(qs_weights_open(ip, &w), QS_OK);
    assert_int_equal(qs_weights_count(w), 2);
    assert_int_equal(qs_weights_read_f32(w, qs_weights_find(w, "y"), 2, 1, 0, 2, out), QS_OK);
    assert_float_equal(out[1], a[5], 0);
    qs_weights_close(w);

    /* An index that points outside its directory, or at the wrong shard. */
    const char *bad_idx[] = {
        "{\"weight_map\":{\"x\":\"../evil.safetensors\"}}",
        "{\"weight_map\":{\"x\":\"model-00002-of-00002.safetensors\"}}",
        "{\"weight_map\":{\"x\":\"missing.safetensors\"}}",
        "{\"weight_map\":3}",
    };
    for (size_t i = 0; i < sizeof bad_idx / sizeof bad_idx[0]; i++) {
        idx.n = 0;
        put(&idx, bad_idx[i], strlen(bad_idx[i]));
        ip = write_file("st/model.safetensors.index.json", &idx);
        assert_true(qs_weights_open(ip, &w) < 0);
        assert_true(strlen(qs_errmsg()) > 10);
    }
    free(d.p), free(d2.p), free(f.p), free(s1.p), free(s2.p), free(idx.p);
}

static void test_safetensors_malformed(void **state)
{
    (void)state;
    buf d = {0};
    for (int i = 0; i < 32; i++)
        put(&d, "\0", 1);
    const char *bad[] = {
        /* offsets past the data */
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[16,48]}}",
        /* shape disagrees with the bytes */
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,16]}}",
        /* unsupported dtype */
        "{\"a\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[0,16]}}",
        /* negative and fractional dims */
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[-4],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,16]}}",
        /* begin after end */
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}",
        /* missing keys, not an object, not JSON */
        "{\"a\":{\"dtype\":\"F32\"}}",
        "[1,2,3]",
        "{\"a\": ",
        /* huge dims that overflow */
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,16]}}",
        /* duplicate names */
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
        "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        buf f = make_safetensors(bad[i], &d);
        qs_weights *w = (qs_weights *)1;
        int err = qs_weights_open(write_file("bad.safetensors", &f), &w);
        if (err >= 0)
            fail_msg("case %zu was accepted: %s", i, bad[i]);
        assert_null(w);
        assert_true(strlen(qs_errmsg()) > 10);
        free(f.p);
    }
    /* A header length larger than the file. */
    buf f = make_safetensors("{}", &d);
    uint64_t huge = 1ull << 40;
    memcpy(f.p, &huge, 8);
    qs_weights *w;
    assert_int_equal(qs_weights_open(write_file("len.safetensors", &f), &w), QS_EFORMAT);
    free(f.p);
    free(d.p);
}

/* ---- The real default model, where the cache holds it ------------------- */

static void test_smollm2_gguf(void **state)
{
    (void)state;
    char path[1024];
    if (qs_cache_path(QS_DEFAULT_GGUF, path, sizeof path) != QS_OK)
        path[0] = '\0';
    if (access(path, R_OK) != 0) {
        printf("skipping: %s is absent (deploy/fetch-model.sh fetches it)\n", path);
        skip();
    }
    qs_weights *w;
    assert_int_equal(qs_weights_open(path, &w), QS_OK);
    qs_model_config m;
    assert_int_equal(qs_config_from_gguf(w, &m), QS_OK);
    const qs_model_config *p = qs_preset_find("smollm2-135m");
    assert_int_equal(m.layers, p->layers);
    assert_int_equal(m.hidden, p->hidden);
    assert_int_equal(m.heads, p->heads);
    assert_int_equal(m.kv_heads, p->kv_heads);
    assert_int_equal(m.ffn, p->ffn);
    assert_int_equal(m.vocab, p->vocab);
    assert_true(m.tied_embeddings);
    const qs_tensor_info *e = qs_weights_find(w, "token_embd.weight");
    assert_non_null(e);
    assert_int_equal(e->dtype, QS_DTYPE_Q8_0);
    assert_int_equal(e->shape[0], 49152);
    assert_int_equal(e->shape[1], 576);
    const qs_tensor_info *q = qs_weights_find(w, "blk.0.attn_q.weight");
    assert_non_null(q);
    assert_int_equal(q->dtype, QS_DTYPE_Q4_1);
    float *row = malloc(576 * 4 * sizeof(float));
    assert_int_equal(qs_weights_read_f32(w, q, 100, 4, 0, 576, row), QS_OK);
    double ss = 0;
    for (int i = 0; i < 576 * 4; i++)
        ss += (double)row[i] * row[i];
    assert_true(ss > 0 && ss < 576 * 4 * 100.0); /* trained weights: non-zero, modest */
    free(row);
    qs_weights_close(w);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gguf_reads_every_type),
        cmocka_unit_test(test_gguf_every_truncation_fails_cleanly),
        cmocka_unit_test(test_gguf_malformed),
        cmocka_unit_test(test_safetensors_single_and_sharded),
        cmocka_unit_test(test_safetensors_malformed),
        cmocka_unit_test(test_smollm2_gguf),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
