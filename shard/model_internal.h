/* Private to shard/: one rank's model shard, shared by the forward pass
 * (model.c) and quantized checkpoints (checkpoint.c). */
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
    float *bias;  /* N, or NULL */
    int add_bias; /* 0 for row-parallel layers on ranks > 0: added once */
} linear;

/* ---- The shard ---------------------------------------------------------- */

typedef struct norm {
    float *w, *b; /* b NULL for RMSNorm */
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
    float *embed;              /* vr x E */
    float *lm_head;            /* vr x H, or NULL when tied */
    float *pos;                /* OPT: (max_pos + 2) x H */
    float *proj_in, *proj_out; /* opt-350m: H x E, E x H */
    norm final_norm;
    uint32_t max_slots, max_seq;
    float *kcache, *vcache; /* [layer][slot][pos][hkv * hd] */
    qs_calib *record;       /* SmoothQuant statistics being collected, or NULL */
    float smooth_alpha;     /* W8A8 smoothed with this strength; 0 = not smoothed */
    float *rope_cs;         /* RoPE cos, sin per position and pair; NULL without RoPE */
    double comm_ms;         /* time in all-reduce and all-gather, since load */
    qs_rank_bytes bytes;
};

/* Bytes of a linear layer in its format. */
uint64_t qs_linear_bytes(const linear *l);

/* Checkpoints: a directory of rank-RRRRR-of-PPPPP.safetensors files. */
int qs_checkpoint_load(qs_model *m, const char *dir);

#endif
