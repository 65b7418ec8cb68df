/* One rank's model shard: its accessors and its end. Loading is load.c,
 * SmoothQuant smooth.c, the forward pass forward.c over the devices' ops
 * (ops_cpu.c, ops_cuda.c). */
#include "model_internal.h"

#include <stdlib.h>

const qs_model_config *qs_model_cfg(const qs_model *m)
{
    return &m->cfg;
}

uint32_t qs_model_slots(const qs_model *m)
{
    return m->max_slots;
}

uint32_t qs_model_max_seq(const qs_model *m)
{
    return m->max_seq;
}

qs_kv_format qs_model_kv(const qs_model *m)
{
    return m->kv;
}

double qs_model_comm_ms(const qs_model *m)
{
    return m->comm_ms;
}

float qs_model_smoothing(const qs_model *m)
{
    return m->smooth_alpha;
}

qs_comm *qs_model_comm(const qs_model *m)
{
    return m->tp;
}

void qs_model_bytes(const qs_model *m, qs_rank_bytes *out)
{
    *out = m->bytes;
}

void qs_norm_close(norm *n)
{
    free(n->w);
    free(n->b);
    n->w = n->b = NULL;
}

#ifndef QS_SHARD_GPU
int qs_model_use_device(qs_model *m, int device)
{
    (void)m, (void)device;
    return qs_seterr(QS_ENOTSUP, "this build of qshard has no CUDA: the model stays on the CPU");
}
#endif

#ifndef QS_SHARD_GPU
void qs_model_graph_steps(const qs_model *m, uint64_t *captured, uint64_t *replayed)
{
    (void)m;
    *captured = *replayed = 0;
}
#endif

int qs_model_on_device(const qs_model *m)
{
    return m && m->dev != NULL;
}

void qs_model_close(qs_model *m)
{
    if (!m)
        return;
#ifdef QS_SHARD_GPU
    qs_model_gpu_free(m);
#endif
    for (uint32_t l = 0; m->layers && l < m->cfg.layers; l++) {
        layer *L = &m->layers[l];
        qs_norm_close(&L->attn_norm);
        qs_norm_close(&L->ffn_norm);
        linear *lins[] = {&L->q, &L->k, &L->v, &L->o, &L->up, &L->gate, &L->down};
        for (size_t i = 0; i < sizeof lins / sizeof lins[0]; i++)
            qs_linear_close(lins[i]);
    }
    free(m->layers);
    free(m->embed);
    free(m->lm_head);
    free(m->embed16);
    free(m->lm_head16);
    free(m->pos);
    free(m->proj_in);
    free(m->proj_out);
    qs_norm_close(&m->final_norm);
    free(m->kcache);
    free(m->vcache);
    free(m->kq), free(m->vq), free(m->ks), free(m->vs);
    free(m->rope_cs);
    free(m);
}

/* One vocabulary table (rows x width fp32) to fp16; the fp32 copy freed. */
static int table_f16(float **t32, uint16_t **t16, size_t count)
{
    if (!*t32)
        return QS_OK;
    uint16_t *h = malloc(count * sizeof *h);
    if (!h)
        return qs_seterr(QS_ENOMEM, "out of memory for a %zu-value fp16 table", count);
    for (size_t i = 0; i < count; i++)
        h[i] = qs_fp32_to_fp16((*t32)[i]);
    free(*t32);
    *t32 = NULL;
    *t16 = h;
    return QS_OK;
}

int qs_model_tables_f16(qs_model *m)
{
    if (m->quant.scheme == QS_SCHEME_FP16)
        return QS_OK;
    size_t vr = m->vr, E = m->cfg.embed_dim, H = m->cfg.hidden;
    int had_head = m->lm_head != NULL;
    int err = table_f16(&m->embed, &m->embed16, vr * E);
    if (!err && (err = table_f16(&m->lm_head, &m->lm_head16, vr * H)) == QS_OK)
        m->bytes.fp16 -= (uint64_t)vr * (E + (had_head ? H : 0)) * 2;
    return err;
}
