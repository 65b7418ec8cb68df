/* qs_shard.h: the public header of shard/: model presets and configurations,
 * the memory planner and the tensor-parallel divisibility rules (qs_plan),
 * and later the loaders and the forward pass on one rank's shard.
 */
#ifndef QS_SHARD_H
#define QS_SHARD_H

#include <stddef.h>
#include <stdint.h>

#include "qs_kernels.h" /* qs_err, qs_errmsg() */

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Model configuration ------------------------------------------------ */

typedef enum qs_arch { QS_ARCH_OPT, QS_ARCH_LLAMA } qs_arch;
typedef enum qs_norm { QS_NORM_LAYER, QS_NORM_RMS } qs_norm;

/* The shapes of a decoder-only transformer, as published in its config.json.
 * OPT: LayerNorm with bias, biases on every linear layer, fc1/fc2 FFN, learned
 * positions (max_pos + 2 rows: OPT offsets positions by 2), tied LM head;
 * opt-350m alone projects embeddings from embed_dim to hidden.
 * Llama: RMSNorm, no biases, gated FFN (gate, up, down), RoPE, grouped-query
 * attention when kv_heads < heads. */
typedef struct qs_model_config {
    char name[64];
    qs_arch arch;
    qs_norm norm;
    uint32_t layers;
    uint32_t hidden;
    uint32_t heads;
    uint32_t kv_heads;
    uint32_t head_dim; /* hidden / heads for every preset */
    uint32_t ffn;      /* intermediate size */
    uint32_t vocab;
    uint32_t max_pos;   /* context length */
    uint32_t embed_dim; /* word-embedding width; == hidden except opt-350m */
    int tied_embeddings;
    int gated_ffn;    /* 1: gate, up, down (Llama); 0: fc1, fc2 (OPT) */
    int linear_bias;  /* 1: every linear layer has a bias (OPT) */
    int learned_pos;  /* 1: a learned position table (OPT); 0: RoPE */
    int final_norm;   /* 1: a norm after the last layer */
    float norm_eps;   /* LayerNorm / RMSNorm epsilon */
    float rope_theta; /* RoPE base (Llama); 0 for learned positions */
} qs_model_config;

/* The presets, in a fixed order; qs_preset_find matches the name exactly,
 * ignoring case. NULL (and qs_errmsg() listing the known names) if unknown. */
size_t qs_preset_count(void);
const qs_model_config *qs_preset_at(size_t i);
const qs_model_config *qs_preset_find(const char *name);

/* The default model's file, which deploy/fetch-model.sh caches. */
#define QS_DEFAULT_GGUF "SmolLM2-135M-Instruct.Q4_1.gguf"
/* name in qshard's cache directory, as deploy/fetch-model.sh finds it:
 * $QSHARD_CACHE, else $XDG_CACHE_HOME/qshard, else $HOME/.cache/qshard.
 * QS_ENOTFOUND when none of them is set, QS_EOVERFLOW when out is short. */
int qs_cache_path(const char *name, char *out, size_t n);

/* Checks a configuration read from a file: every count non-zero and within
 * sane bounds, heads * head_dim == hidden, kv_heads dividing heads. */
int qs_config_check(const qs_model_config *m);

/* ---- Quantization scheme ------------------------------------------------ */

typedef enum qs_scheme {
    QS_SCHEME_FP16, /* no quantization */
    QS_SCHEME_W8A8, /* SmoothQuant: int8 weights per output channel, int8 activations */
    QS_SCHEME_BCQ,  /* non-uniform binary-coding quantization (LUT-GEMM), q bits */
    QS_SCHEME_RTN,  /* uniform round-to-nearest q bits, stored as BCQ */
    QS_SCHEME_W4A4  /* Atom: int4 weights and activations, int8 outlier channels */
} qs_scheme;

/* group_size: BCQ and RTN: input columns that share one alpha per plane and
 * one offset, a multiple of 32, or 0 for the whole row. W8A8: input channels
 * that share one activation scale per token, a multiple of 4, or 0 for one
 * scale per token (SmoothQuant's original; weights are per output channel
 * either way). W4A4: input channels sharing one int4 scale, weights per
 * row and activations per token, a multiple of 8, or 0 for one per row and
 * token. fp16 has bits 16 and no groups, w8a8 bits 8, w4a4 bits 4.
 * outliers (w4a4 only): the input channels with the largest calibration
 * activations kept in int8 in every linear layer; 0 for none. */
typedef struct qs_quant {
    qs_scheme scheme;
    int bits;
    uint32_t group_size;
    uint32_t outliers;
} qs_quant;

/* W8A8's default activation group. On SmolLM2 it takes W8A8 + SmoothQuant
 * from +1.9% to +0.5% perplexity over fp32 (docs/accuracy.md). */
#define QS_W8A8_GROUP 128u
/* W4A4's defaults, Atom's: groups of 128 channels, 128 int8 outlier channels. */
#define QS_W4A4_GROUP    128u
#define QS_W4A4_OUTLIERS 128u

const char *qs_scheme_name(qs_scheme s);
/* Parses "fp16", "w8a8", "bcq", "rtn", "w4a4". */
int qs_scheme_parse(const char *s, qs_scheme *out);
/* Fills in defaults and checks bits and group size against the scheme:
 * bits 0 means the scheme's default (fp16: 16, w8a8: 8, bcq/rtn/w4a4: 4). */
int qs_quant_check(qs_quant *q);

/* ---- Tensor-parallel rules ---------------------------------------------- */

/* The one place that says whether a model can be split tp ways with a
 * quantization: at least as many KV heads as ranks (dealt out unevenly if
 * need be, see qs_tp_heads), or tp a multiple of the KV heads (replicated)
 * that divides the query heads; FFN by tp; every shard's input width by the
 * group size. On failure the message names the valid degrees up to 64. */
int qs_tp_check(const qs_model_config *m, const qs_quant *q, uint32_t tp);

/* Rank r's attention heads on a valid tp-way split. KV heads are dealt out
 * whole, the first kv_heads % tp ranks taking one more, each with the query
 * heads that read it (SmolLM2's 3 KV heads on 2 ranks: 6 and 3 query heads).
 * With fewer KV heads than ranks, query heads split evenly and each rank
 * holds a copy of the one KV head they read. */
typedef struct qs_heads {
    uint32_t q_first, hq;   /* query heads [q_first, q_first + hq) */
    uint32_t kv_first, hkv; /* KV heads [kv_first, kv_first + hkv) */
} qs_heads;
qs_heads qs_tp_heads(const qs_model_config *m, uint32_t tp, uint32_t r);

/* ---- Memory plan -------------------------------------------------------- */

typedef struct qs_workload {
    uint32_t batch;   /* sequences decoded together */
    uint32_t seq;     /* tokens of KV cache per sequence */
    uint64_t reserve; /* per-device bytes for the runtime: context, cuBLAS, NCCL */
    qs_kv_format kv;  /* the KV cache's format (0: fp16) */
} qs_workload;

/* "fp16", "int8", "int4" (qs_kernels.h, "KV cache quantization"), and back. */
const char *qs_kv_name(qs_kv_format f);
int qs_kv_parse(const char *s, qs_kv_format *out);
/* Bytes of one token's K (or V) vector of one KV head of hd values in a
 * format: 2 hd (fp16), or the codes plus an fp16 scale and minimum per
 * group of QS_KV_GROUP (int8 hd + 4 ceil(hd/32), int4 ceil(hd/2) + 4
 * ceil(hd/32)). The planner's count, and what a GPU allocates. */
uint64_t qs_kv_vec_bytes(qs_kv_format f, uint64_t hd);

#define QS_PLAN_DEFAULT_SEQ     512u
#define QS_PLAN_DEFAULT_RESERVE (1ull << 30)
#define QS_PLAN_PREFILL_CHUNK   512u

/* Bytes one rank holds; rank 0 holds the largest share (vocabulary rows are
 * split by ceiling division). */
typedef struct qs_rank_bytes {
    uint64_t linear;    /* quantized linear layers: packed weights, alphas, offsets, scales */
    uint64_t fp16;      /* kept in fp16: embeddings, LM head, norms, biases */
    uint64_t kv_cache;  /* K and V for batch x seq tokens, in the workload's format */
    uint64_t workspace; /* activations of one prefill chunk and the logits */
    uint64_t reserve;   /* runtime context */
    uint64_t total;
} qs_rank_bytes;

typedef struct qs_plan {
    qs_quant quant;
    uint32_t tp;
    uint64_t weight_bytes; /* all ranks together, without replication: the model's size */
    uint64_t linear_params;
    qs_rank_bytes rank; /* rank 0, the largest */
} qs_plan;

/* Plans model m with quantization q on tp ranks for a workload. Validates q
 * and the workload; does not require tp to be a valid split (see
 * qs_tp_check), so that "GPUs by memory alone" can be computed. */
int qs_plan_make(const qs_model_config *m, const qs_quant *q, uint32_t tp, const qs_workload *w,
                 qs_plan *out);

/* The fewest GPUs of device_mem bytes: by memory alone (any tp) and as the
 * smallest valid tp degree (qs_tp_check) that fits. 0 when none up to
 * max_tp does. */
typedef struct qs_min_gpus {
    uint32_t by_memory;
    uint32_t valid_tp;
} qs_min_gpus;
int qs_plan_min_gpus(const qs_model_config *m, const qs_quant *q, const qs_workload *w,
                     uint64_t device_mem, uint32_t max_tp, qs_min_gpus *out);

/* The default group size for a model at tp 1: 128 where it divides every
 * input width, else the largest multiple of 32 below it that does, else 0. */
uint32_t qs_default_group(const qs_model_config *m);
/* The group a scheme gets when none is asked for: qs_default_group for BCQ
 * and RTN (128 when m is NULL: a bare kernel shape), QS_W8A8_GROUP for W8A8,
 * 0 for fp16. */
uint32_t qs_scheme_default_group(const qs_model_config *m, qs_scheme s);

/* Parses a byte size: a plain integer, or a number with a binary unit
 * (KiB, MiB, GiB, TiB), e.g. "80GiB", "79.5GiB". Decimal units (GB) are
 * refused as ambiguous. */
int qs_parse_bytes(const char *s, uint64_t *out);

/* ---- Weight files: GGUF and safetensors ---------------------------------
 * A weight file is memory-mapped read-only; every header length, offset,
 * shape and type is checked against the file size before use, and a failure
 * names the file and the tensor. Tensors are read as fp32 slices, so a rank
 * touches only the pages of its own shard.
 */

typedef enum qs_dtype {
    QS_DTYPE_F32,
    QS_DTYPE_F16,
    QS_DTYPE_BF16,
    QS_DTYPE_I8,
    QS_DTYPE_I32,
    QS_DTYPE_Q8_0, /* GGUF: blocks of 32, fp16 scale + 32 int8 */
    QS_DTYPE_Q4_0, /* GGUF: blocks of 32, fp16 scale + 16 bytes of nibbles, x = (q - 8) d */
    QS_DTYPE_Q4_1, /* GGUF: blocks of 32, fp16 scale and min + nibbles, x = q d + m */
} qs_dtype;

const char *qs_dtype_name(qs_dtype t);

#define QS_MAX_DIMS 4

/* shape[] is outermost first (PyTorch order): a linear weight is {out, in}. */
typedef struct qs_tensor_info {
    const char *name;
    qs_dtype dtype;
    uint32_t ndim;
    uint64_t shape[QS_MAX_DIMS];
    uint64_t nbytes;
    const uint8_t *data; /* inside the mapping */
    const char *file;    /* the file it lives in */
} qs_tensor_info;

typedef struct qs_weights qs_weights;

/* Opens a GGUF file, a .safetensors file, a sharded safetensors index
 * (model.safetensors.index.json) or a directory holding one of those. */
int qs_weights_open(const char *path, qs_weights **out);
void qs_weights_close(qs_weights *w);

size_t qs_weights_count(const qs_weights *w);
const qs_tensor_info *qs_weights_at(const qs_weights *w, size_t i);
/* NULL (and a message) if absent. */
const qs_tensor_info *qs_weights_find(const qs_weights *w, const char *name);

/* Reads rows [row0, row0 + nrows) and columns [col0, col0 + ncols) of a 1-D
 * or 2-D tensor (1-D: one row) as fp32 into dst (nrows x ncols, row-major).
 * Quantized GGUF blocks are dequantized; NaN or Inf in the values is an
 * error naming the tensor. */
int qs_weights_read_f32(const qs_weights *w, const qs_tensor_info *t, uint64_t row0, uint64_t nrows,
                        uint64_t col0, uint64_t ncols, float *dst);

/* GGUF metadata (QS_ENOTFOUND if absent, QS_EFORMAT if of another type;
 * integers of any width convert when they fit). Strings are not
 * NUL-terminated inside the file: they come with their length. */
int qs_weights_meta_u64(const qs_weights *w, const char *key, uint64_t *out);
int qs_weights_meta_f32(const qs_weights *w, const char *key, float *out);
int qs_weights_meta_str(const qs_weights *w, const char *key, const char **s, size_t *len);
/* An array: its element type (the GGUF type number) and count, and a cursor
 * to read elements with qs_weights_meta_array_str / _i64 / _f32. */
typedef struct qs_meta_array {
    uint32_t type;
    uint64_t count;
    const uint8_t *p, *end; /* private */
} qs_meta_array;
int qs_weights_meta_array(const qs_weights *w, const char *key, qs_meta_array *a);
/* Next element; QS_EFORMAT if the array holds another type or is exhausted. */
int qs_meta_array_next_str(qs_meta_array *a, const char **s, size_t *len);
int qs_meta_array_next_f64(qs_meta_array *a, double *v);

/* A model configuration from GGUF metadata (llama architecture keys) or a
 * Hugging Face config.json (OPT and Llama keys); checked with
 * qs_config_check. */
int qs_config_from_gguf(const qs_weights *w, qs_model_config *out);
int qs_config_from_json(const char *path, qs_model_config *out);

/* ---- One rank's shard of a model: load and forward ----------------------
 * A model is split Megatron-style over the ranks of a communicator (see
 * shard/plan.c for the split). Every rank loads or generates only its own
 * slice, quantizes it with the chosen scheme and runs the forward pass on
 * it; the all-reduces after the row-parallel layers and the all-gather of
 * the logits go through collectives/.
 *
 * On CPU ranks, activations, the KV cache and the parts kept in fp16 on a
 * GPU (embeddings, norms, biases, the fp16 scheme's weights) are held in
 * fp32: the CPU has no fp16 arithmetic worth using. Quantized weights are
 * held in their packed formats (kernels/qs_kernels.h). */

typedef struct qs_comm qs_comm; /* collectives/qs_collectives.h */
typedef struct qs_model qs_model;

/* SmoothQuant calibration statistics: per layer, the per-channel abs-max of
 * the four activations that feed linear layers, [layer][site][width]: the
 * attention norm's output (q/k/v, hidden), the attention output (o, heads x
 * head_dim), the FFN norm's output (up/gate, hidden) and the FFN's inner
 * activation (down, ffn). Recorded over the whole width on any split. */
enum { QS_CALIB_QKV, QS_CALIB_O, QS_CALIB_UP, QS_CALIB_DOWN, QS_CALIB_SITES };
typedef struct qs_calib {
    uint32_t layers, hidden, attn, ffn;
    float *absmax;
    /* GPTQ: per layer and site, the Hessian X^T X of the inputs of this
     * rank's own linears (hk[site] wide: the whole hidden state at q/k/v and
     * up/gate, the rank's columns at o and down), [layer][site][hk][hk];
     * NULL unless qs_calib_hessians asked for it. A merged copy borrows it. */
    float *hess;
    uint32_t hk[4];
    int hess_borrowed;
} qs_calib;
int qs_calib_init(qs_calib *c, const qs_model_config *cfg);
/* Asks c to record GPTQ's Hessians too, for model m's split (before
 * qs_model_record); QS_ENOMEM with a sentence where they would not fit. */
int qs_calib_hessians(qs_calib *c, const qs_model *m);
void qs_calib_close(qs_calib *c);

/* Where a GPU model's file weights are quantized. AUTO: on the GPU (the
 * device quantizers of kernels/cuda, minutes for OPT-175B where the host
 * takes hours), except under the CPU execution harness, whose emulated
 * iterative fits would take hours for a real model: there on the host. */
enum { QS_QUANTIZE_ON_AUTO = 0, QS_QUANTIZE_ON_HOST, QS_QUANTIZE_ON_DEVICE };

typedef struct qs_model_opts {
    qs_quant quant;            /* scheme; bits 0 = the scheme's default */
    const char *weights;       /* GGUF or safetensors path; NULL = synthetic */
    uint64_t seed;             /* synthetic weights: same seed, same model on any split */
    uint32_t outlier_channels; /* synthetic: hidden channels with 20x activations */
    uint32_t max_slots;        /* sequences the KV cache holds at once (default 1) */
    uint32_t max_seq;          /* tokens per sequence (default min(context, 2048)) */
    qs_kv_format kv_cache;     /* the KV cache's format (0: fp16; fp32 on CPU ranks) */
    unsigned bcq_iters;        /* BCQ refinement iterations (0: the quantizer's default) */
    const qs_calib *calib;     /* smooth with these statistics (NULL: none); exact in fp32, it
                                * is for W8A8 (pre-LN models only) */
    float smooth_alpha;        /* SmoothQuant migration strength (0: 0.5) */
    int gptq;                  /* bcq, rtn, w4a4: GPTQ with calib's Hessians (which it needs) */
    int on_gpu;                /* 1: load onto GPU `gpu` layer by layer (collective, as
                                * qs_model_use_device); the host never holds the whole shard */
    int gpu;
    int quantize_on; /* on_gpu, weights from a file: QS_QUANTIZE_ON_* */
    /* Called after each layer is loaded (NULL: none), for progress bars. */
    void (*progress)(void *ctx, uint32_t layers_done, uint32_t layers);
    void *progress_ctx;
} qs_model_opts;

/* Loads this rank's shard (collective over tp: every rank of the group calls
 * it). The configuration is checked against the file and against the split
 * (qs_tp_check). */
int qs_model_init(const qs_model_config *cfg, const qs_model_opts *opts, qs_comm *tp,
                  qs_model **out);
void qs_model_close(qs_model *m);
const qs_model_config *qs_model_cfg(const qs_model *m);
/* Sequences the KV cache holds at once, and tokens per sequence. */
uint32_t qs_model_slots(const qs_model *m);
uint32_t qs_model_max_seq(const qs_model *m);
/* The KV cache's format it was loaded with. */
qs_kv_format qs_model_kv(const qs_model *m);
/* Milliseconds this rank has spent in collectives (all-reduce after the
 * row-parallel layers, the logits' all-gather) since it was loaded. */
double qs_model_comm_ms(const qs_model *m);
/* The SmoothQuant strength its W8A8 weights were smoothed with; 0: none. */
float qs_model_smoothing(const qs_model *m);
/* The tensor-parallel group the model was loaded on. */
qs_comm *qs_model_comm(const qs_model *m);
/* While c is set (NULL stops), forward passes accumulate SmoothQuant
 * statistics into it: run a calibration text through an fp16 model, then
 * load the W8A8 model with opts.calib = c. */
int qs_model_record(qs_model *m, qs_calib *c);
/* Saves this rank's quantized shard (collective: every rank writes its own
 * DIR/rank-RRRRR-of-PPPPP.safetensors, with the scheme, bits, group size,
 * smoothing and configuration in its metadata). A model loaded from DIR
 * (opts.weights = DIR) skips quantization and calibration; it must be
 * loaded on as many ranks as it was saved from. */
int qs_model_save(const qs_model *m, const char *dir);
/* Reads a checkpoint's configuration, scheme and split (from rank 0's file). */
int qs_checkpoint_info(const char *dir, qs_model_config *cfg, qs_quant *q, uint32_t *tp);
/* 1 when dir holds a qshard checkpoint. */
int qs_is_checkpoint(const char *dir);
/* 1 when DIR holds rank `rank` of `size`'s part (whole: parts are written
 * under a temporary name and renamed). */
int qs_checkpoint_has_rank(const char *dir, int rank, int size);
/* Bytes this rank actually allocated, by part. */
void qs_model_bytes(const qs_model *m, qs_rank_bytes *out);
/* Moves the loaded shard to this rank's GPU (collective over the group:
 * every rank calls it, with its own device): weights in the device formats,
 * the KV cache in fp16, a workspace for one prefill chunk, NCCL on the
 * group. The host copies of the weights are freed, so save a checkpoint
 * before. QS_ENOTSUP in a build without CUDA. */
int qs_model_use_device(qs_model *m, int device);
/* 1 when the model runs on a GPU. */
int qs_model_on_device(const qs_model *m);
/* Decode steps captured as a CUDA graph and replayed from it (0 on a CPU). */
void qs_model_graph_steps(const qs_model *m, uint64_t *captured, uint64_t *replayed);

/* Runs n tokens (collective over tp). Token i goes to KV slot slot[i] at
 * position pos[i]; the earlier positions of that slot must already be in the
 * cache, from earlier calls or from earlier tokens of this call. Logits of
 * tokens [first_logit, n) are written to logits ((n - first_logit) x vocab,
 * identical on every rank); first_logit == n computes none. */
int qs_model_forward(qs_model *m, size_t n, const int32_t *tokens, const uint32_t *slot,
                     const uint32_t *pos, size_t first_logit, float *logits);

typedef struct qs_sampler qs_sampler;
/* Runs n tokens as qs_model_forward does and samples the token after the
 * last with s (advancing it as qs_sample does): every rank gets the same
 * token. On a GPU the logits stay on the device (only the tokens travel),
 * and a one-token step is replayed from a captured CUDA graph. */
int qs_model_next(qs_model *m, size_t n, const int32_t *tokens, const uint32_t *slot,
                  const uint32_t *pos, qs_sampler *s, int32_t *next);

/* Perplexity scoring of one window, as llama.cpp's perplexity tool does:
 * tokens [0, n) run in KV slot `slot` from position 0, and the log-likelihood
 * of each token after position `first` given those before it is summed:
 * *nll += -log p(tokens[j + 1] | tokens[..j]) for j in [first, n - 1), and
 * *count += n - 1 - first. Collective over tp. */
int qs_model_score(qs_model *m, const int32_t *tokens, size_t n, size_t first, uint32_t slot,
                   double *nll, size_t *count);

/* ---- Generation and perplexity (collective over the model's group) ------ */

/* Called for each generated token on every rank; rank 0's return value
 * decides for all: non-zero stops (a cancelled client, say). */
typedef int (*qs_token_cb)(void *ctx, int32_t token);

typedef struct qs_gen_stats {
    size_t prompt_tokens, new_tokens;
    double prefill_ms, decode_ms;
    double decode_comm_ms; /* of decode_ms, in collectives */
    double *token_ms;      /* optional: per decode step, up to token_ms_cap */
    size_t token_ms_cap;
} qs_gen_stats;

typedef struct qs_sampler qs_sampler;

/* Runs the prompt in KV slot `slot` from position 0, then samples up to
 * max_new tokens, stopping early at eos (pass -1 for none). */
int qs_model_generate(qs_model *m, uint32_t slot, const int32_t *prompt, size_t n, size_t max_new,
                      qs_sampler *s, int32_t eos, qs_token_cb cb, void *ctx, qs_gen_stats *st);

/* ---- Continuous batching (batch.c), collective over the model's group ----
 * Many sequences on one model: each qs_batch_step is one forward call over
 * the next token of every decoding sequence and chunks of the prompts still
 * being read. Every rank of the group makes the same adds, drops and steps
 * in the same order, and so holds the same sequences and samples the same
 * tokens. A sequence's tokens do not depend on what else runs beside it
 * where the kernels compute each token's row alone (the quantized schemes;
 * tests/shard/test_batch.c). */
typedef struct qs_batch qs_batch;

#define QS_BATCH_PREFILL_CHUNK 256u

typedef struct qs_batch_opts {
    uint32_t max_seqs;      /* sequences at once, at most the model's KV slots (0: all) */
    uint32_t prefill_chunk; /* prompt tokens per step, over all sequences (0: the default) */
} qs_batch_opts;

enum { QS_FINISH_NONE, QS_FINISH_EOS, QS_FINISH_LENGTH };

/* A sequence's token from one step. */
typedef struct qs_batch_event {
    uint64_t id;
    int32_t token; /* -1: none (a sequence that asked for 0 tokens) */
    int first;     /* its first token */
    int finish;    /* QS_FINISH_*: it has left the batch */
} qs_batch_event;

typedef struct qs_batch_stats {
    size_t tokens;        /* in the forward call */
    size_t prompt_tokens; /* of them, prompt tokens */
    size_t decode_tokens; /* of them, sampled tokens fed back */
    size_t sequences;     /* that sampled a token */
} qs_batch_stats;

int qs_batch_init(qs_model *m, const qs_batch_opts *o, qs_batch **out);
void qs_batch_close(qs_batch *b);
/* Adds a sequence under a caller's id, in the first free KV slot: its
 * prompt, at most max_new tokens to sample, its own sampler (copied), and
 * the token that ends it (-1: none). QS_EBUSY when every slot is taken. */
int qs_batch_add(qs_batch *b, uint64_t id, const int32_t *prompt, size_t n, size_t max_new,
                 const qs_sampler *s, int32_t eos);
/* Ends a sequence now (a cancelled request, a stop string met): its slot is free. */
int qs_batch_drop(qs_batch *b, uint64_t id);
/* Ends every sequence (after a failed step, which leaves them unknown). */
void qs_batch_clear(qs_batch *b);
/* One step: ev gets a token for every sequence whose last token ran (cap
 * at least qs_batch_running); those finished have left. */
int qs_batch_step(qs_batch *b, qs_batch_event *ev, size_t cap, size_t *nev, qs_batch_stats *st);
uint32_t qs_batch_running(const qs_batch *b);
uint32_t qs_batch_capacity(const qs_batch *b);
/* KV-cache tokens the running sequences hold. */
uint64_t qs_batch_kv_tokens(const qs_batch *b);

typedef struct qs_ppl {
    double nll;    /* summed negative log-likelihood, nats */
    size_t count;  /* tokens scored */
    size_t chunks; /* windows done */
} qs_ppl;
/* Progress after each window; rank 0's non-zero return stops all ranks. */
typedef int (*qs_ppl_cb)(void *ctx, const qs_ppl *sofar);

/* Perplexity = exp(nll / count) over non-overlapping windows of ctx tokens
 * of ids (at most max_chunks, 0 = all), each scored on its second half, the
 * first token replaced by bos (-1: kept), as llama.cpp's perplexity tool. */
int qs_model_perplexity(qs_model *m, const int32_t *ids, size_t n, size_t ctx, size_t max_chunks,
                        int32_t bos, qs_ppl_cb cb, void *cb_ctx, qs_ppl *out);

/* ---- Sampling ------------------------------------------------------------ */
struct qs_sampler {
    float temperature; /* 0: greedy */
    float top_p;       /* 1: off */
    uint32_t top_k;    /* 0: off */
    uint64_t state;    /* RNG state, from the seed */
};
void qs_sampler_init(qs_sampler *s, float temperature, float top_p, uint32_t top_k, uint64_t seed);
/* Picks a token from vocab logits; deterministic for a seed, so every rank
 * holding the same logits picks the same token. */
int32_t qs_sample(qs_sampler *s, const float *logits, size_t vocab);

/* ---- Tokenizer: byte-level BPE (the GPT-2 family, e.g. SmolLM2) built from a
 * GGUF file's tokenizer.ggml.* metadata.
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
#endif /* QS_SHARD_H */
