/* Private to shard/: one rank's model shard, shared by loading (load.c),
 * SmoothQuant (smooth.c), the forward pass (forward.c and the devices' ops)
 * and quantized checkpoints (checkpoint.c). */
#ifndef QS_MODEL_INTERNAL_H
#define QS_MODEL_INTERNAL_H

#include "qs_kernels.h"
#include "qs_shard.h"

/* ---- Linear layers in any scheme ---------------------------------------- */

typedef struct linear {
    size_t N, K;
    qs_scheme scheme;
    float *w32;   /* fp16 scheme: fp32 on the CPU, N x K */
    qs_bcq bcq;   /* bcq, rtn */
    qs_w8 w8;     /* w8a8 */
    qs_w4 w4;     /* w4a4 */
    float *bias;  /* N, or NULL */
    int add_bias; /* 0 for row-parallel layers on ranks > 0: added once */
    void *dev;    /* the device's copy (ops_cuda.c), or NULL */
} linear;

/* ---- The shard ---------------------------------------------------------- */

typedef struct norm {
    float *w, *b; /* b NULL for RMSNorm */
    void *dev;    /* the device's copy (ops_cuda.c), or NULL */
} norm;

typedef struct layer {
    norm attn_norm, ffn_norm;
    linear q, k, v, o;
    linear up, gate, down; /* OPT: up = fc1, down = fc2, no gate */
} layer;

struct qs_model {
    qs_model_config cfg;
    qs_quant quant;
    qs_comm *tp;
    int rank, size;
    uint32_t hq, hkv, hd, fr, vr; /* local sizes */
    uint32_t q_first, kv_first;   /* first global head of this rank */
    uint32_t v_first;             /* first vocabulary row */
    int rope_adjacent;            /* GGUF Llama: rotate adjacent pairs; HF: halves */
    layer *layers;
    float *embed;   /* vr x E */
    float *lm_head; /* vr x H, or NULL when tied */
    /* CPU ranks, quantized schemes: the same tables in fp16, as a GPU keeps
     * them (then embed and lm_head are NULL): half the bytes a decode step
     * reads for the LM head (qs_model_tables_f16). */
    uint16_t *embed16, *lm_head16;
    float *pos;                /* OPT: (max_pos + 2) x H */
    float *proj_in, *proj_out; /* opt-350m: H x E, E x H */
    norm final_norm;
    uint32_t max_slots, max_seq;
    qs_kv_format kv;        /* the cache's format, set at load (qs_model_opts.kv_cache) */
    float *kcache, *vcache; /* fp16 format (fp32 on the CPU): [layer][slot][pos][hkv * hd] */
    uint8_t *kq, *vq;       /* int8/int4: codes [layer][slot][pos][hkv][qs_kv_code_bytes] */
    uint16_t *ks, *vs;      /* and their fp16 (scale, min) [layer][slot][pos][hkv][groups][2] */
    qs_calib *record;       /* SmoothQuant statistics being collected, or NULL */
    float smooth_alpha;     /* W8A8 smoothed with this strength; 0 = not smoothed */
    float *rope_cs;         /* RoPE cos, sin per position and pair; NULL without RoPE */
    double comm_ms;         /* time in all-reduce and all-gather, since load */
    qs_rank_bytes bytes;
    const struct qs_ops *ops; /* the device's operations (ops.h); NULL: the CPU's */
    size_t chunk;             /* tokens per forward call the device takes (0: any) */
    void *dev;                /* the device's state (ops_cuda.c) */
};

/* The quantized schemes' embedding and LM head tables to fp16 (the fp16
 * scheme, the CPU's fp32 reference, keeps fp32); bytes.fp16 follows. */
int qs_model_tables_f16(qs_model *m);

/* Bytes of a linear layer in its format. */
uint64_t qs_linear_bytes(const linear *l);
/* Takes ownership of W (N x K fp32) and stores it in the scheme's format;
 * w4a4 reads its inputs in perm's order with the last ko in int8 (perm
 * NULL: the channels' own order, no outliers). */
int qs_linear_set(linear *l, float *W, size_t N, size_t K, const qs_quant *q, unsigned iters,
                  const uint32_t *perm, size_t ko);
/* The same by GPTQ with H (K x K, the layer's input Hessian): bcq, rtn, w4a4. */
int qs_linear_set_gptq(linear *l, float *W, size_t N, size_t K, const qs_quant *q, unsigned iters,
                       const uint32_t *perm, size_t ko, const float *H);

/* ---- Atom's outlier channels (outliers.c) --------------------------------- */
/* The input order of a W4A4 linear that reads columns [first, first + K) of
 * an input `width` wide, whose channels' calibration abs-maxima are absmax
 * (NULL: no statistics, no outliers): of the `want` largest over the whole
 * width, the *ko in its columns go last; the rest keep their order. perm
 * gets K entries, local to the columns. */
int qs_outlier_order(const float *absmax, size_t width, size_t first, size_t K, size_t want,
                     uint32_t *perm, size_t *ko);
void qs_linear_close(linear *l);
void qs_norm_close(norm *n);

/* ---- SmoothQuant (smooth.c) ----------------------------------------------- */
/* Where site's statistics of layer l start in a qs_calib (layout in qs_shard.h). */
size_t qs_calib_at(const qs_calib *c, uint32_t l, int site);
int qs_calib_check(const qs_calib *c, const qs_model_config *cfg);
/* Layer l's Hessian at site (hk[site] x hk[site]), or NULL without them. */
float *qs_calib_hessian(const qs_calib *c, uint32_t l, int site);
/* Each rank's recorded columns merged over the group; out->absmax is the caller's. */
int qs_calib_merge(qs_model *m, const qs_calib *c, qs_calib *out);
/* Folds layer l's smoothing factors into its norms and fp32 weights. */
int qs_smooth_layer(qs_model *m, uint32_t l, const qs_calib *cal, float alpha, float *Wq, float *Wk,
                    float *Wv, float *Wo, float *Wu, float *Wg, float *Wd);

/* The model's GPU (ops_cuda.c, in the library when QS_SHARD_GPU): opened
 * (NCCL joins the group: collective), filled layer by layer as they load
 * (each layer's host copies freed), finished with the tables, caches and
 * workspace; freed with the model. */
int qs_gpu_open(qs_model *m, int device);
int qs_gpu_upload_layer(qs_model *m, uint32_t l);
int qs_gpu_finish(qs_model *m);
/* Layer l's linear `which` (q k v o up gate down: 0..6) made on the GPU:
 * its synthetic weights (qs_cuda_synth_fill with key, of a tensor `cols`
 * wide, rows r0.. and columns c0.. of lin->N x lin->K) quantized there; the
 * host bias (if any) uploaded. */
int qs_gpu_synth_linear(qs_model *m, uint32_t l, int which, linear *lin, uint64_t key,
                        uint64_t cols, uint64_t r0, uint64_t c0, unsigned iters);
/* Layer l's linear `which` from host fp32 weights W (lin->N x lin->K,
 * freed here), quantized on the GPU in the model's scheme. */
int qs_gpu_quantize_linear(qs_model *m, uint32_t l, int which, linear *lin, float *W,
                           unsigned iters);
/* The embedding (lm_head 0) or LM head table made on the GPU from its key. */
int qs_gpu_synth_table(qs_model *m, int lm_head, uint64_t key);
void qs_model_gpu_free(qs_model *m);

/* Checkpoints: a directory of rank-RRRRR-of-PPPPP.safetensors files. */
int qs_checkpoint_load(qs_model *m, const char *dir);

#endif
