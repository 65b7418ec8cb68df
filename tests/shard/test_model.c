/* The forward pass on every split, against a float64 reference written here.
 * Run under mpirun with 1, 2 or 4 ranks. For a tiny Llama (RoPE, GQA, SwiGLU,
 * untied head, odd vocabulary) and a tiny OPT (biases, LayerNorm, learned
 * positions, tied head), rank 0 writes random weights as a safetensors file
 * and a config.json; every rank loads its shard through the real loader and
 * the logits must match the reference computed in double from the same
 * arrays. Then: prefill equals token-by-token decode (KV cache), quantized
 * schemes stay close to the reference of their own dequantized weights, and
 * synthetic weights give the same logits on 1 rank as on all of them. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "qs_collectives.h"
#include "qs_shard.h"

static int rank, world, failures;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            printf("rank %d FAIL %s:%d: ", rank, __FILE__, __LINE__);                              \
            printf(__VA_ARGS__);                                                                   \
            printf(" [%s]\n", qs_errmsg());                                                        \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

#include "tensors.h"

/* The same tensors as a GGUF file in llama.cpp's names and layout: Q and K
 * rows permuted within each head as llama.cpp's converter does (row 2i + j
 * of a head holds Hugging Face row j * hd/2 + i), so the loader must rotate
 * adjacent pairs for the logits to match the reference. */
static void put_str(FILE *f, const char *s)
{
    uint64_t n = strlen(s);
    fwrite(&n, 8, 1, f);
    fwrite(s, 1, n, f);
}

static void put_kv_u32(FILE *f, const char *k, uint32_t v)
{
    uint32_t t = 4;
    put_str(f, k);
    fwrite(&t, 4, 1, f);
    fwrite(&v, 4, 1, f);
}

static void write_gguf_llama(const char *path, const qs_model_config *c)
{
    static const struct {
        const char *hf, *gguf;
        int permute;
    } map[] = {{"input_layernorm.weight", "attn_norm.weight", 0},
               {"post_attention_layernorm.weight", "ffn_norm.weight", 0},
               {"self_attn.q_proj.weight", "attn_q.weight", 1},
               {"self_attn.k_proj.weight", "attn_k.weight", 1},
               {"self_attn.v_proj.weight", "attn_v.weight", 0},
               {"self_attn.o_proj.weight", "attn_output.weight", 0},
               {"mlp.gate_proj.weight", "ffn_gate.weight", 0},
               {"mlp.up_proj.weight", "ffn_up.weight", 0},
               {"mlp.down_proj.weight", "ffn_down.weight", 0}};
    typedef struct {
        char name[96];
        const tensor *t;
        int permute;
    } out_t;
    out_t outs[64];
    size_t no = 0;
    for (size_t i = 0; i < nts; i++) {
        const tensor *t = &ts[i];
        int l;
        char rest[96];
        if (sscanf(t->name, "model.layers.%d.%95s", &l, rest) == 2) {
            for (size_t k = 0; k < sizeof map / sizeof map[0]; k++)
                if (strcmp(rest, map[k].hf) == 0) {
                    snprintf(outs[no].name, sizeof outs[no].name, "blk.%d.%s", l, map[k].gguf);
                    outs[no].t = t, outs[no].permute = map[k].permute, no++;
                }
        } else {
            const char *g = strcmp(t->name, "model.embed_tokens.weight") == 0 ? "token_embd.weight"
                            : strcmp(t->name, "model.norm.weight") == 0       ? "output_norm.weight"
                                                                              : "output.weight";
            snprintf(outs[no].name, sizeof outs[no].name, "%s", g);
            outs[no].t = t, outs[no].permute = 0, no++;
        }
    }
    FILE *f = fopen(path, "wb");
    uint32_t version = 3, type_str = 8, type_arr = 9, type_f32 = 6;
    uint64_t nkv = 9, ntensors = no;
    fwrite("GGUF", 1, 4, f);
    fwrite(&version, 4, 1, f);
    fwrite(&ntensors, 8, 1, f);
    fwrite(&nkv, 8, 1, f);
    put_str(f, "general.architecture");
    fwrite(&type_str, 4, 1, f);
    put_str(f, "llama");
    put_kv_u32(f, "llama.block_count", c->layers);
    put_kv_u32(f, "llama.embedding_length", c->hidden);
    put_kv_u32(f, "llama.attention.head_count", c->heads);
    put_kv_u32(f, "llama.attention.head_count_kv", c->kv_heads);
    put_kv_u32(f, "llama.feed_forward_length", c->ffn);
    put_kv_u32(f, "llama.context_length", c->max_pos);
    put_str(f, "llama.rope.freq_base");
    fwrite(&type_f32, 4, 1, f);
    fwrite(&c->rope_theta, 4, 1, f);
    put_str(f, "tokenizer.ggml.tokens");
    fwrite(&type_arr, 4, 1, f);
    fwrite(&type_str, 4, 1, f);
    uint64_t nv = c->vocab;
    fwrite(&nv, 8, 1, f);
    for (uint32_t v = 0; v < c->vocab; v++) {
        char tok[16];
        snprintf(tok, sizeof tok, "t%u", v);
        put_str(f, tok);
    }
    uint64_t off = 0;
    for (size_t i = 0; i < no; i++) {
        const tensor *t = outs[i].t;
        uint32_t nd = t->rows == 1 ? 1 : 2, ftype = 0;
        put_str(f, outs[i].name);
        fwrite(&nd, 4, 1, f);
        uint64_t ne0 = t->cols, ne1 = t->rows;
        fwrite(&ne0, 8, 1, f);
        if (nd == 2)
            fwrite(&ne1, 8, 1, f);
        fwrite(&ftype, 4, 1, f);
        fwrite(&off, 8, 1, f);
        off += (t->rows * t->cols * 4 + 31) / 32 * 32;
    }
    long pos = ftell(f);
    for (; pos % 32; pos++)
        fputc(0, f);
    for (size_t i = 0; i < no; i++) {
        const tensor *t = outs[i].t;
        size_t hd = c->head_dim;
        for (size_t r = 0; r < t->rows; r++) {
            /* GGUF row r holds HF row src (within its head) */
            size_t src = r;
            if (outs[i].permute) {
                size_t h = r / hd, w = r % hd, pi = w / 2, j = w % 2;
                src = h * hd + j * (hd / 2) + pi;
            }
            fwrite(t->v + src * t->cols, 4, t->cols, f);
        }
        for (size_t b = t->rows * t->cols * 4; b % 32; b++)
            fputc(0, f);
    }
    fclose(f);
}

/* ---- The reference: one sequence, positions 0..n-1, in double ----------- */

static void ref_norm(const double *x, size_t H, const float *w, const float *b, double eps,
                     double *y)
{
    double mean = 0, var = 0;
    if (b) {
        for (size_t j = 0; j < H; j++)
            mean += x[j];
        mean /= H;
    }
    for (size_t j = 0; j < H; j++)
        var += (x[j] - mean) * (x[j] - mean);
    double inv = 1.0 / sqrt(var / H + eps);
    for (size_t j = 0; j < H; j++)
        y[j] = (x[j] - mean) * inv * w[j] + (b ? b[j] : 0);
}

/* y[N] = W[N x K] x[K] + b */
static void ref_linear(const float *W, const float *b, const double *x, size_t N, size_t K,
                       double *y)
{
    for (size_t n = 0; n < N; n++) {
        double s = b ? b[n] : 0;
        for (size_t k = 0; k < K; k++)
            s += (double)W[n * K + k] * x[k];
        y[n] = s;
    }
}

static void ref_forward(const qs_model_config *c, const int32_t *tok, size_t n, double *logits)
{
    size_t H = c->hidden, hd = c->head_dim, nh = c->heads, nkv = c->kv_heads, F = c->ffn;
    size_t V = c->vocab, L = c->layers;
    int opt = c->arch == QS_ARCH_OPT;
    double *x = calloc(n * H, sizeof *x), *h = malloc(H * sizeof *h);
    double *q = malloc(n * nh * hd * sizeof *q), *k = malloc(L * n * nkv * hd * sizeof *k);
    double *v = malloc(L * n * nkv * hd * sizeof *v), *a = malloc(nh * hd * sizeof *a);
    double *t = malloc((H > F ? H : F) * 2 * sizeof *t), *g = malloc(F * sizeof *g);
    const char *pfx = opt ? "model.decoder." : "model.";
    char nm[96];
    snprintf(nm, sizeof nm, "%sembed_tokens.weight", pfx);
    const float *E = get(nm, 0);
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < H; j++)
            x[i * H + j] =
                E[(size_t)tok[i] * H + j] +
                (opt ? get("model.decoder.embed_positions.weight", 0)[(i + 2) * H + j] : 0);
    for (size_t l = 0; l < L; l++) {
        const char *lp = opt ? "model.decoder.layers.%d." : "model.layers.%d.";
#define W(s) (snprintf(nm, sizeof nm, "%s%s", lp, s), get(nm, (int)l))
        for (size_t i = 0; i < n; i++) {
            ref_norm(x + i * H, H,
                     W(opt ? "self_attn_layer_norm.weight" : "input_layernorm.weight"),
                     opt ? W("self_attn_layer_norm.bias") : NULL, c->norm_eps, h);
            double *kk = k + (l * n + i) * nkv * hd, *vv = v + (l * n + i) * nkv * hd;
            ref_linear(W("self_attn.q_proj.weight"), opt ? W("self_attn.q_proj.bias") : NULL, h,
                       nh * hd, H, q + i * nh * hd);
            ref_linear(W("self_attn.k_proj.weight"), opt ? W("self_attn.k_proj.bias") : NULL, h,
                       nkv * hd, H, kk);
            ref_linear(W("self_attn.v_proj.weight"), opt ? W("self_attn.v_proj.bias") : NULL, h,
                       nkv * hd, H, vv);
            if (!opt) { /* RoPE, Hugging Face layout: rotate halves */
                double *vecs[2] = {q + i * nh * hd, kk};
                size_t heads[2] = {nh, nkv};
                for (int w = 0; w < 2; w++)
                    for (size_t hh = 0; hh < heads[w]; hh++)
                        for (size_t j = 0; j < hd / 2; j++) {
                            double f = i * pow(c->rope_theta, -2.0 * j / hd);
                            double *p = vecs[w] + hh * hd, x0 = p[j], x1 = p[j + hd / 2];
                            p[j] = x0 * cos(f) - x1 * sin(f);
                            p[j + hd / 2] = x0 * sin(f) + x1 * cos(f);
                        }
            }
        }
        for (size_t i = 0; i < n; i++) {
            for (size_t hh = 0; hh < nh; hh++) {
                size_t kvh = hh / (nh / nkv);
                double s[64], mx = -1e300, sum = 0;
                for (size_t p = 0; p <= i; p++) {
                    s[p] = 0;
                    for (size_t j = 0; j < hd; j++)
                        s[p] += q[(i * nh + hh) * hd + j] * k[((l * n + p) * nkv + kvh) * hd + j];
                    s[p] /= sqrt((double)hd);
                    mx = s[p] > mx ? s[p] : mx;
                }
                for (size_t p = 0; p <= i; p++)
                    sum += s[p] = exp(s[p] - mx);
                for (size_t j = 0; j < hd; j++) {
                    double o = 0;
                    for (size_t p = 0; p <= i; p++)
                        o += s[p] / sum * v[((l * n + p) * nkv + kvh) * hd + j];
                    a[hh * hd + j] = o;
                }
            }
            ref_linear(W(opt ? "self_attn.out_proj.weight" : "self_attn.o_proj.weight"),
                       opt ? W("self_attn.out_proj.bias") : NULL, a, H, nh * hd, t);
            for (size_t j = 0; j < H; j++)
                x[i * H + j] += t[j];
        }
        for (size_t i = 0; i < n; i++) {
            ref_norm(x + i * H, H,
                     W(opt ? "final_layer_norm.weight" : "post_attention_layernorm.weight"),
                     opt ? W("final_layer_norm.bias") : NULL, c->norm_eps, h);
            if (opt) {
                ref_linear(W("fc1.weight"), W("fc1.bias"), h, F, H, g);
                for (size_t j = 0; j < F; j++)
                    g[j] = g[j] > 0 ? g[j] : 0;
                ref_linear(W("fc2.weight"), W("fc2.bias"), g, H, F, t);
            } else {
                ref_linear(W("mlp.gate_proj.weight"), NULL, h, F, H, g);
                ref_linear(W("mlp.up_proj.weight"), NULL, h, F, H, t);
                for (size_t j = 0; j < F; j++)
                    g[j] = g[j] / (1 + exp(-g[j])) * t[j];
                ref_linear(W("mlp.down_proj.weight"), NULL, g, H, F, t);
            }
            for (size_t j = 0; j < H; j++)
                x[i * H + j] += t[j];
        }
#undef W
    }
    snprintf(nm, sizeof nm, "%s%s", pfx, opt ? "final_layer_norm.weight" : "norm.weight");
    const float *fw = get(nm, 0);
    const float *fb = opt ? get("model.decoder.final_layer_norm.bias", 0) : NULL;
    const float *head = opt ? E : get("lm_head.weight", 0);
    for (size_t i = 0; i < n; i++) {
        ref_norm(x + i * H, H, fw, fb, c->norm_eps, h);
        ref_linear(head, NULL, h, V, H, logits + i * V);
    }
    free(x), free(h), free(q), free(k), free(v), free(a), free(t), free(g);
}

/* ---- Tiny models -------------------------------------------------------- */

static void make_llama(qs_model_config *c)
{
    *c = (qs_model_config){.name = "tiny-llama",
                           .arch = QS_ARCH_LLAMA,
                           .norm = QS_NORM_RMS,
                           .layers = 2,
                           .hidden = 128,
                           .heads = 4,
                           .kv_heads = 2,
                           .head_dim = 32,
                           .ffn = 256,
                           .vocab = 97,
                           .max_pos = 64,
                           .embed_dim = 128,
                           .gated_ffn = 1,
                           .final_norm = 1,
                           .norm_eps = 1e-5f,
                           .rope_theta = 10000.0f};
    char nm[96];
    for (int l = 0; l < 2; l++) {
#define A(s, r, c, sc, o)                                                                          \
    (snprintf(nm, sizeof nm, "model.layers.%d.%s", l, s), add(nm, r, c, sc, o))
        A("input_layernorm.weight", 1, 128, 0.2, 1.0);
        A("post_attention_layernorm.weight", 1, 128, 0.2, 1.0);
        A("self_attn.q_proj.weight", 128, 128, 0.15, 0);
        A("self_attn.k_proj.weight", 64, 128, 0.15, 0);
        A("self_attn.v_proj.weight", 64, 128, 0.15, 0);
        A("self_attn.o_proj.weight", 128, 128, 0.1, 0);
        A("mlp.gate_proj.weight", 256, 128, 0.15, 0);
        A("mlp.up_proj.weight", 256, 128, 0.15, 0);
        A("mlp.down_proj.weight", 128, 256, 0.1, 0);
#undef A
    }
    add("model.embed_tokens.weight", 97, 128, 1.0, 0);
    add("model.norm.weight", 1, 128, 0.2, 1.0);
    add("lm_head.weight", 97, 128, 0.2, 0);
}

static void make_opt(qs_model_config *c)
{
    *c = (qs_model_config){.name = "tiny-opt",
                           .arch = QS_ARCH_OPT,
                           .norm = QS_NORM_LAYER,
                           .layers = 2,
                           .hidden = 128,
                           .heads = 4,
                           .kv_heads = 4,
                           .head_dim = 32,
                           .ffn = 512,
                           .vocab = 101,
                           .max_pos = 60,
                           .embed_dim = 128,
                           .tied_embeddings = 1,
                           .linear_bias = 1,
                           .learned_pos = 1,
                           .final_norm = 1,
                           .norm_eps = 1e-5f};
    char nm[128];
    for (int l = 0; l < 2; l++) {
#define A(s, r, c, sc, o)                                                                          \
    (snprintf(nm, sizeof nm, "model.decoder.layers.%d.%s", l, s), add(nm, r, c, sc, o))
        A("self_attn_layer_norm.weight", 1, 128, 0.2, 1.0);
        A("self_attn_layer_norm.bias", 1, 128, 0.1, 0);
        A("final_layer_norm.weight", 1, 128, 0.2, 1.0);
        A("final_layer_norm.bias", 1, 128, 0.1, 0);
        const char *p[] = {"q_proj", "k_proj", "v_proj", "out_proj"};
        for (int i = 0; i < 4; i++) {
            char s[64];
            snprintf(s, sizeof s, "self_attn.%s.weight", p[i]);
            A(s, 128, 128, 0.15, 0);
            snprintf(s, sizeof s, "self_attn.%s.bias", p[i]);
            A(s, 1, 128, 0.1, 0);
        }
        A("fc1.weight", 512, 128, 0.15, 0);
        A("fc1.bias", 1, 512, 0.1, 0);
        A("fc2.weight", 128, 512, 0.07, 0);
        A("fc2.bias", 1, 128, 0.1, 0);
#undef A
    }
    add("model.decoder.embed_tokens.weight", 101, 128, 1.0, 0);
    add("model.decoder.embed_positions.weight", 62, 128, 0.3, 0);
    add("model.decoder.final_layer_norm.weight", 1, 128, 0.2, 1.0);
    add("model.decoder.final_layer_norm.bias", 1, 128, 0.1, 0);
}

/* Relative L2 distance of float logits from double ones. */
static double rel_l2(const float *a, const double *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

enum { NTOK = 12 };

/* A saved checkpoint reloads to the very same logits, on the same split;
 * on another split it is refused with a sentence. */
static void check_checkpoint(qs_comm *comm, const qs_model *m, const qs_model_config *c,
                             const qs_model_opts *o, const char *dir, const int32_t *tok,
                             const uint32_t *slot, const uint32_t *pos, const float *want)
{
    char ck[600];
    snprintf(ck, sizeof ck, "%s/ckpt-%s-%s", dir, c->name, qs_scheme_name(o->quant.scheme));
    int err = qs_model_save(m, ck);
    CHECK(err == QS_OK, "%s: save", ck);
    qs_model_config cc;
    qs_quant q;
    uint32_t tp = 0;
    err = qs_checkpoint_info(ck, &cc, &q, &tp);
    CHECK(!err && tp == (uint32_t)world && q.scheme == o->quant.scheme && q.bits == o->quant.bits &&
              cc.layers == c->layers && cc.vocab == c->vocab,
          "%s: info", ck);
    qs_model_opts lo = *o;
    lo.weights = ck;
    qs_model *r;
    err = qs_model_init(&cc, &lo, comm, &r);
    CHECK(err == QS_OK, "%s: reload", ck);
    if (!err) {
        float *got = malloc(c->vocab * sizeof *got);
        err = qs_model_forward(r, NTOK, tok, slot, pos, NTOK - 1, got);
        CHECK(!err && memcmp(got, want, c->vocab * sizeof *got) == 0, "%s: reloaded logits differ",
              ck);
        free(got);
        qs_model_close(r);
    }
    if (world > 1) {
        qs_comm *solo = NULL;
        qs_comm_split(comm, rank == 0 ? 0 : -1, 0, &solo);
        if (solo) {
            err = qs_model_init(&cc, &lo, solo, &r);
            CHECK(err != QS_OK && strstr(qs_errmsg(), "ranks"), "%s: loaded on 1 rank", ck);
            qs_comm_close(solo);
        }
    }
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0) {
        char cmd[700];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", ck);
        if (system(cmd) != 0)
            printf("could not remove %s\n", ck);
    }
}

static int32_t gen_tokens[16];
static int gen_seen, gen_stop_at;

static int on_token(void *ctx, int32_t t)
{
    (void)ctx;
    if (gen_seen < 16)
        gen_tokens[gen_seen] = t;
    gen_seen++;
    return gen_stop_at && gen_seen >= gen_stop_at;
}

static void run_model(qs_comm *comm, const char *dir, int opt)
{
    qs_model_config c;
    rng = opt ? 7 : 3;
    if (opt)
        make_opt(&c);
    else
        make_llama(&c);
    char path[512];
    snprintf(path, sizeof path, "%s/%s.safetensors", dir, c.name);
    if (rank == 0)
        write_safetensors(path);
    MPI_Barrier(MPI_COMM_WORLD);

    int32_t tok[NTOK];
    uint32_t slot[NTOK] = {0}, pos[NTOK];
    for (int i = 0; i < NTOK; i++)
        tok[i] = (int32_t)((i * 37 + 5) % c.vocab), pos[i] = (uint32_t)i;
    size_t V = c.vocab;
    double *ref = malloc(NTOK * V * sizeof *ref);
    ref_forward(&c, tok, NTOK, ref);
    float *out = malloc(NTOK * V * sizeof *out);

    /* fp16 scheme (fp32 on the CPU): all logits of a prefill. */
    qs_model_opts o = {
        .quant = {QS_SCHEME_FP16, 16, 0, 0}, .weights = path, .max_slots = 2, .max_seq = 32};
    qs_model *m = NULL;
    int err = qs_model_init(&c, &o, comm, &m);
    CHECK(err == QS_OK, "%s: init", c.name);
    if (err)
        goto out;
    err = qs_model_forward(m, NTOK, tok, slot, pos, 0, out);
    CHECK(err == QS_OK, "%s: forward", c.name);
    double e = rel_l2(out, ref, NTOK * V);
    CHECK(e < 1e-5, "%s fp16 on %d ranks: relative L2 %.3g vs reference", c.name, world, e);

    /* The same model from a GGUF file (Llama: permuted Q/K, adjacent RoPE). */
    if (!opt) {
        char gpath[512];
        snprintf(gpath, sizeof gpath, "%s/%s.gguf", dir, c.name);
        if (rank == 0)
            write_gguf_llama(gpath, &c);
        MPI_Barrier(MPI_COMM_WORLD);
        qs_model_opts go = o;
        go.weights = gpath;
        qs_model *gm = NULL;
        err = qs_model_init(&c, &go, comm, &gm);
        CHECK(err == QS_OK, "%s: init from GGUF", c.name);
        float *gout = malloc(NTOK * V * sizeof *gout);
        if (!err)
            err = qs_model_forward(gm, NTOK, tok, slot, pos, 0, gout);
        e = err ? 1.0 : rel_l2(gout, ref, NTOK * V);
        CHECK(!err && e < 1e-5, "%s from GGUF on %d ranks: relative L2 %.3g vs reference", c.name,
              world, e);
        free(gout);
        qs_model_close(gm);
        MPI_Barrier(MPI_COMM_WORLD);
        if (rank == 0)
            unlink(gpath);
        err = QS_OK;
    }

    /* The same sequence one token at a time in slot 1: the KV cache must
     * give the prefill's logits at every step. */
    double worst = 0;
    for (int i = 0; i < NTOK && !err; i++) {
        uint32_t s1 = 1;
        err = qs_model_forward(m, 1, &tok[i], &s1, &pos[i], 0, out);
        double d = rel_l2(out, ref + (size_t)i * V, V);
        worst = d > worst ? d : worst;
    }
    CHECK(!err && worst < 1e-5, "%s: decode step by step, worst relative L2 %.3g", c.name, worst);

    /* Perplexity scoring of the second half against the reference's
     * log-softmax. */
    double nll = 0, want = 0;
    size_t count = 0;
    err = qs_model_score(m, tok, NTOK, NTOK / 2, 0, &nll, &count);
    for (size_t j = NTOK / 2; j + 1 < NTOK; j++) {
        const double *l = ref + j * V;
        double mx = l[0], sum = 0;
        for (size_t v = 1; v < V; v++)
            mx = l[v] > mx ? l[v] : mx;
        for (size_t v = 0; v < V; v++)
            sum += exp(l[v] - mx);
        want += log(sum) + mx - l[tok[j + 1]];
    }
    CHECK(!err && count == NTOK - 1 - NTOK / 2 && fabs(nll - want) < 1e-4 * fabs(want),
          "%s: score nll %.6f over %zu, reference %.6f", c.name, nll, count, want);
    CHECK(qs_model_score(m, tok, 1, 0, 0, &nll, &count) == QS_EINVAL, "1-token window accepted");

    /* Greedy generation equals the reference's greedy continuation; rank 0
     * stopping early stops every rank at the same step. */
    {
        int32_t seq[NTOK];
        memcpy(seq, tok, 6 * sizeof *seq);
        double *rl = malloc(NTOK * V * sizeof *rl);
        for (size_t k = 6; k < 10; k++) {
            ref_forward(&c, seq, k, rl);
            size_t best = 0;
            for (size_t v = 1; v < V; v++)
                best = rl[(k - 1) * V + v] > rl[(k - 1) * V + best] ? v : best;
            seq[k] = (int32_t)best;
        }
        free(rl);
        gen_seen = 0;
        gen_stop_at = 0;
        qs_sampler smp;
        qs_sampler_init(&smp, 0, 1, 0, 1);
        qs_gen_stats st = {0};
        err = qs_model_generate(m, 1, tok, 6, 4, &smp, -1, on_token, NULL, &st);
        CHECK(!err && st.new_tokens == 4 && gen_seen == 4 &&
                  memcmp(gen_tokens, seq + 6, 4 * sizeof *seq) == 0,
              "%s: greedy generation %d %d %d %d, reference %d %d %d %d", c.name, gen_tokens[0],
              gen_tokens[1], gen_tokens[2], gen_tokens[3], seq[6], seq[7], seq[8], seq[9]);
        gen_seen = 0;
        gen_stop_at = rank == 0 ? 2 : 0;
        err = qs_model_generate(m, 1, tok, 6, 8, &smp, -1, on_token, NULL, &st);
        CHECK(!err && st.new_tokens == 2, "%s: rank 0 stopped at 2, this rank made %zu", c.name,
              st.new_tokens);
    }

    /* Bad input: a token outside the vocabulary, a position past the cache. */
    int32_t bad = (int32_t)V;
    uint32_t p0 = 0, far = 40;
    CHECK(qs_model_forward(m, 1, &bad, slot, &p0, 0, out) == QS_EINVAL, "bad token accepted");
    CHECK(qs_model_forward(m, 1, tok, slot, &far, 0, out) == QS_EINVAL, "bad position accepted");
    qs_rank_bytes b;
    qs_model_bytes(m, &b);
    CHECK(b.linear > 0 &&
              b.kv_cache == 2ull * c.layers * 2 * 32 *
                                (c.kv_heads >= (uint32_t)world ? c.kv_heads / world : 1) *
                                c.head_dim * 4,
          "%s: KV bytes %llu", c.name, (unsigned long long)b.kv_cache);
    qs_model_close(m);

    /* Quantized: RTN 4-bit g32 and BCQ 3-bit g32 must stay near the fp
     * reference (quantization error), W8A8 too; every rank agrees. */
    const struct {
        qs_quant q;
        double tol;
    } schemes[] = {{{QS_SCHEME_RTN, 4, 32, 0}, 0.25},
                   {{QS_SCHEME_BCQ, 3, 32, 0}, 0.35},
                   {{QS_SCHEME_W8A8, 8, 0, 0}, 0.05},
                   {{QS_SCHEME_W8A8, 8, 32, 0}, 0.05},
                   {{QS_SCHEME_W4A4, 4, 32, 0}, 0.35}};
    for (size_t i = 0; i < sizeof schemes / sizeof schemes[0]; i++) {
        o.quant = schemes[i].q;
        err = qs_model_init(&c, &o, comm, &m);
        CHECK(err == QS_OK, "%s: init %s", c.name, qs_scheme_name(o.quant.scheme));
        if (err)
            continue;
        err = qs_model_forward(m, NTOK, tok, slot, pos, NTOK - 1, out);
        e = rel_l2(out, ref + (NTOK - 1) * V, V);
        CHECK(!err && e < schemes[i].tol, "%s %s %d-bit on %d ranks: relative L2 %.3g (bound %g)",
              c.name, qs_scheme_name(o.quant.scheme), o.quant.bits, world, e, schemes[i].tol);
        if (rank == 0)
            printf("%s %s %d-bit g%u on %d ranks: last-token logits relative L2 %.4f\n", c.name,
                   qs_scheme_name(o.quant.scheme), o.quant.bits, o.quant.group_size, world, e);
        check_checkpoint(comm, m, &c, &o, dir, tok, slot, pos, out);
        qs_model_close(m);
    }
out:
    if (rank == 0)
        unlink(path);
    free(ref);
    free(out);
    free_tensors();
}

/* Synthetic weights: rank 0 alone (a one-rank group) and all ranks together
 * must produce the same logits, since every value depends only on its place.
 * In fp32 (the fp16 scheme on a CPU rank) they agree to rounding. LUT-GEMM
 * rounds its tables to int8 per block, a step function of the input: the
 * row-parallel sums, added in another order on another split, move an input
 * by 1e-7, which can flip one table entry, and the next layer spreads that
 * into a new draw of the tables' ~1% error (qs_lutgemm_err_bound). So the
 * 4-bit model is held to that scale, far below a wrong slice's error. */
static void run_synthetic(qs_comm *all, qs_scheme scheme, double tol)
{
    qs_model_config c = *qs_preset_find("smollm2-135m");
    c.layers = 2; /* the real widths, fewer layers: a quick run */
    qs_comm *solo = NULL;
    int err = qs_comm_split(all, rank == 0 ? 0 : -1, 0, &solo);
    CHECK(err == QS_OK, "split");
    qs_quant q = {scheme, scheme == QS_SCHEME_FP16 ? 16 : 4, scheme == QS_SCHEME_FP16 ? 0 : 64, 0};
    qs_model_opts o = {.quant = q, .seed = 42, .outlier_channels = 4, .max_seq = 16};
    int32_t tok[4] = {1, 500, 20000, 49151};
    uint32_t slot[4] = {0}, pos[4] = {0, 1, 2, 3};
    float *a = malloc(c.vocab * sizeof *a), *b = malloc(c.vocab * sizeof *b);
    qs_model *m;
    if (world <= 3) {
        /* 3 KV heads: 1, 2 (unevenly: 6 and 3 query heads) or 3 ranks */
        err = qs_model_init(&c, &o, all, &m);
        CHECK(err == QS_OK, "synthetic init on %d", world);
        err = qs_model_forward(m, 4, tok, slot, pos, 3, a);
        CHECK(err == QS_OK, "synthetic forward");
        qs_model_close(m);
    } else {
        /* 4 ranks cannot split smollm2: the check must say so. */
        err = qs_model_init(&c, &o, all, &m);
        CHECK(err == QS_EINVAL && strstr(qs_errmsg(), "valid degrees"), "invalid split accepted");
        c = *qs_preset_find("opt-125m");
        c.layers = 2;
        a = realloc(a, c.vocab * sizeof *a), b = realloc(b, c.vocab * sizeof *b);
        err = qs_model_init(&c, &o, all, &m);
        CHECK(err == QS_OK, "synthetic opt init on %d", world);
        err = qs_model_forward(m, 4, tok, slot, pos, 3, a);
        CHECK(err == QS_OK, "synthetic opt forward");
        qs_model_close(m);
    }
    if (solo) {
        err = qs_model_init(&c, &o, solo, &m);
        CHECK(err == QS_OK, "synthetic init on 1");
        err = qs_model_forward(m, 4, tok, slot, pos, 3, b);
        double num = 0, den = 0;
        for (size_t i = 0; i < c.vocab; i++)
            num += (a[i] - b[i]) * (a[i] - b[i]), den += (double)b[i] * b[i];
        CHECK(!err && den > 0 && sqrt(num / den) < tol,
              "%s synthetic %s: 1 rank vs %d ranks differ, relative L2 %.3g (bound %g)", c.name,
              qs_scheme_name(scheme), world, sqrt(num / den), tol);
        printf("%s synthetic %s: 1 rank vs %d ranks, relative L2 %.3g\n", c.name,
               qs_scheme_name(scheme), world, sqrt(num / den));
        qs_model_close(m);
        qs_comm_close(solo);
    }
    free(a), free(b);
}

/* SmoothQuant: folding the factors is exact in fp32 (an fp16-scheme model
 * loaded with the statistics gives the same logits), and with outlier
 * activation channels W8A8 after calibration is closer to the fp model than
 * W8A8 without it. opt-125m smooths per head; smollm2 folds o's factors
 * into V rows that several query heads share, on an uneven split at 2 ranks. */
static void run_smoothquant(qs_comm *all, const char *name)
{
    qs_model_config c = *qs_preset_find(name);
    c.layers = 2;
    qs_model_opts o = {
        .quant = {QS_SCHEME_FP16, 16, 0, 0}, .seed = 7, .outlier_channels = 8, .max_seq = 64};
    if (qs_tp_check(&c, &o.quant, (uint32_t)world) != QS_OK)
        return;
    enum { T = 24 };
    int32_t tok[T];
    uint32_t slot[T] = {0}, pos[T];
    for (int i = 0; i < T; i++)
        tok[i] = (int32_t)((i * 7919 + 13) % c.vocab), pos[i] = (uint32_t)i;
    size_t V = c.vocab;
    float *fp = malloc(V * sizeof *fp), *q = malloc(V * sizeof *q);
    double *ref = malloc(V * sizeof *ref);
    qs_calib cal;
    qs_model *m;
    int err = qs_calib_init(&cal, &c);
    if (!err)
        err = qs_model_init(&c, &o, all, &m);
    CHECK(err == QS_OK, "smoothquant: fp init");
    if (err)
        return;
    /* Calibrate on other tokens than the ones evaluated. */
    int32_t cal_tok[T];
    for (int i = 0; i < T; i++)
        cal_tok[i] = (int32_t)((i * 104729 + 71) % c.vocab);
    err = qs_model_record(m, &cal);
    if (!err)
        err = qs_model_forward(m, T, cal_tok, slot, pos, T, NULL);
    qs_model_record(m, NULL);
    if (!err)
        err = qs_model_forward(m, T, tok, slot, pos, T - 1, fp);
    CHECK(err == QS_OK, "smoothquant: calibration run");
    qs_model_close(m);
    for (size_t i = 0; i < V; i++)
        ref[i] = fp[i];

    o.calib = &cal;
    err = qs_model_init(&c, &o, all, &m);
    if (!err)
        err = qs_model_forward(m, T, tok, slot, pos, T - 1, q);
    CHECK(err == QS_OK, "smoothquant: fp16 smoothed");
    double exact = err ? 1 : rel_l2(q, ref, V);
    qs_model_close(m);
    CHECK(exact < 1e-5, "%s: smoothing changed fp32 logits by relative L2 %.3g", name, exact);

    /* per token without and with smoothing; activation groups of 32 with */
    double e[3] = {0, 0, 0};
    for (int smooth = 0; smooth < 3; smooth++) {
        o.quant = (qs_quant){QS_SCHEME_W8A8, 8, smooth == 2 ? 32 : 0, 0};
        o.calib = smooth ? &cal : NULL;
        err = qs_model_init(&c, &o, all, &m);
        if (!err)
            err = qs_model_forward(m, T, tok, slot, pos, T - 1, q);
        CHECK(err == QS_OK, "smoothquant: w8a8 smooth=%d", smooth);
        if (!err)
            e[smooth] = rel_l2(q, ref, V);
        qs_model_close(m);
    }
    if (rank == 0)
        printf("%s (2 layers, 8 outlier channels) on %d ranks: fp32 smoothed vs not %.2g; W8A8 "
               "relative L2 %.4f without smoothing, %.4f with, %.4f with and groups of 32\n",
               name, world, exact, e[0], e[1], e[2]);
    CHECK(e[1] < e[0], "%s: smoothing did not help: %.4f vs %.4f", name, e[1], e[0]);
    CHECK(e[2] < e[0], "%s: groups with smoothing no better than neither: %.4f vs %.4f", name, e[2],
          e[0]);
    qs_calib_close(&cal);
    free(fp), free(q), free(ref);
}

/* A model bigger than any one rank may hold: at 4 ranks each caps its data
 * segment at half the model's fp32 bytes, then loads its slice of a
 * synthetic model and runs a token. Nothing rank-local may build the whole
 * model, or the allocation fails. (Skipped under AddressSanitizer, whose
 * shadow memory does not mix with a data limit.) */
static void run_bigger_than_a_rank(qs_comm *all)
{
#if defined(__SANITIZE_ADDRESS__)
    (void)all;
    if (rank == 0)
        printf("bigger-than-a-rank: skipped under AddressSanitizer\n");
    return;
#else
    if (world != 4)
        return;
    qs_model_config c = *qs_preset_find("opt-2.7b");
    c.layers = 8;
    qs_quant q = {QS_SCHEME_FP16, 16, 0, 0};
    qs_workload w = {1, 16, 0, QS_KV_FP16};
    qs_plan whole;
    qs_plan_make(&c, &q, 1, &w, &whole);
    uint64_t fp32_bytes = whole.weight_bytes * 2; /* CPU ranks hold fp16 parts as fp32 */
    struct rlimit lim = {fp32_bytes / 2, fp32_bytes / 2}, old;
    getrlimit(RLIMIT_DATA, &old);
    if (setrlimit(RLIMIT_DATA, &lim) != 0) {
        printf("bigger-than-a-rank: setrlimit failed, skipped\n");
        return;
    }
    qs_model_opts o = {.quant = q, .seed = 3, .max_seq = 16};
    qs_model *m = NULL;
    int err = qs_model_init(&c, &o, all, &m);
    float *lg = malloc(c.vocab * sizeof *lg);
    int32_t tok = 42;
    uint32_t sl = 0, p = 0;
    if (!err)
        err = qs_model_forward(m, 1, &tok, &sl, &p, 0, lg);
    qs_rank_bytes b = {0};
    if (m)
        qs_model_bytes(m, &b);
    CHECK(!err && b.total < fp32_bytes / 2,
          "a %.2f GiB model on 4 ranks capped at %.2f GiB each: %s", fp32_bytes / 1073741824.0,
          fp32_bytes / 2147483648.0, err ? "failed" : "a rank holds too much");
    if (rank == 0 && !err)
        printf("opt-2.7b (8 layers, %.2f GiB in fp32) on 4 ranks capped at %.2f GiB each: rank 0 "
               "holds %.2f GiB\n",
               fp32_bytes / 1073741824.0, fp32_bytes / 2147483648.0, b.total / 1073741824.0);
    qs_model_close(m);
    free(lg);
    setrlimit(RLIMIT_DATA, &old);
#endif
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    qs_comm *comm;
    if (qs_comm_init_mpi(MPI_COMM_WORLD, &comm)) {
        printf("rank %d: %s\n", rank, qs_errmsg());
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    char dir[64] = "/tmp/qs_model_XXXXXX";
    if (rank == 0 && !mkdtemp(dir))
        MPI_Abort(MPI_COMM_WORLD, 1);
    MPI_Bcast(dir, sizeof dir, MPI_CHAR, 0, MPI_COMM_WORLD);

    run_model(comm, dir, 0);
    run_model(comm, dir, 1);
    run_synthetic(comm, QS_SCHEME_FP16, 1e-4);
    run_synthetic(comm, QS_SCHEME_RTN, 2e-2);
    run_smoothquant(comm, "opt-125m");
    run_smoothquant(comm, "smollm2-135m");
    run_bigger_than_a_rank(comm);

    int total = 0;
    MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0) {
        rmdir(dir);
        printf("test_model on %d ranks: %s (%d failures)\n", world, total ? "FAILED" : "ok", total);
    }
    qs_comm_close(comm);
    MPI_Finalize();
    return total ? 1 : 0;
}
