/* SmoothQuant: the calibration statistics (qs_calib: per-channel abs-max of
 * the four activations that feed linear layers, recorded during fp forward
 * passes and merged over the group) and folding the smoothing factors into
 * norms and weights before W8A8 quantization. */
#include "model_internal.h"

#include "qs_collectives.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Where site's statistics of layer l start in a qs_calib (layout in qs_shard.h). */
size_t qs_calib_at(const qs_calib *c, uint32_t l, int site)
{
    size_t H = c->hidden, A = c->attn, F = c->ffn, at = (size_t)l * (2 * H + A + F);
    switch (site) {
    case QS_CALIB_QKV:
        return at;
    case QS_CALIB_O:
        return at + H;
    case QS_CALIB_UP:
        return at + H + A;
    default:
        return at + 2 * H + A;
    }
}

static size_t calib_floats(const qs_calib *c)
{
    return qs_calib_at(c, c->layers, QS_CALIB_QKV);
}

/* Each rank records the columns it computes: the maxima over the group give
 * the whole statistics, whatever split recorded them. out->absmax is owned
 * by the caller. */
int qs_calib_merge(qs_model *m, const qs_calib *c, qs_calib *out)
{
    size_t n = calib_floats(c), P = (size_t)m->size;
    float *all = malloc(n * P * sizeof *all), *mx = malloc(n * sizeof *mx);
    int err = !all || !mx ? qs_seterr(QS_ENOMEM, "out of memory for SmoothQuant statistics")
                          : qs_comm_allgather(m->tp, c->absmax, all, n, QS_COLL_F32, QS_COLL_HOST);
    if (!err) {
        memcpy(mx, all, n * sizeof *mx);
        for (size_t r = 1; r < P; r++)
            for (size_t i = 0; i < n; i++)
                mx[i] = fmaxf(mx[i], all[r * n + i]);
    }
    free(all);
    if (err) {
        free(mx);
        mx = NULL;
    }
    *out = *c;
    out->absmax = mx;
    out->hess_borrowed = 1; /* each rank's own, nothing to merge */
    return err;
}

/* SmoothQuant at one norm-fed input: s_j from the calibration abs-max of
 * the norm's output and the column abs-max of every weight it feeds, over
 * the whole model (a column's rows are spread over the ranks, so the maxima
 * are all-gathered), then 1/s folded into the norm and s into the columns. */
static int smooth_site(qs_model *m, const float *act, norm *nm, float **W, const size_t *N,
                       size_t nlin, float alpha)
{
    size_t K = m->cfg.hidden, P = (size_t)m->size;
    float *wmax = calloc(K * (P + 1), sizeof *wmax), *s = malloc(K * sizeof *s);
    int err = QS_OK;
    if (!wmax || !s) {
        err = qs_seterr(QS_ENOMEM, "out of memory for SmoothQuant factors");
        goto out;
    }
    float *all = wmax + K;
    for (size_t l = 0; l < nlin; l++)
        for (size_t n = 0; n < N[l]; n++)
            for (size_t j = 0; j < K; j++)
                wmax[j] = fmaxf(wmax[j], fabsf(W[l][n * K + j]));
    if ((err = qs_comm_allgather(m->tp, wmax, all, K, QS_COLL_F32, QS_COLL_HOST)))
        goto out;
    for (size_t r = 0; r < P; r++)
        for (size_t j = 0; j < K; j++)
            wmax[j] = fmaxf(wmax[j], all[r * K + j]);
    /* The global maxima as a one-row matrix: the kernels' formula does the rest. */
    const float *one[1] = {wmax};
    size_t n1 = 1;
    if ((err = qs_smooth_scales(act, K, one, &n1, 1, alpha, s)) ||
        (err = qs_smooth_fold(nm->w, nm->b, K, W, N, nlin, s)))
        goto out;
out:
    free(wmax);
    free(s);
    return err;
}

/* SmoothQuant between two linears: P's output rows reach C's input columns
 * through an operation that commutes with a positive scale per channel
 * (attention's weighted sum of V, ReLU, the product with SwiGLU's gate), so
 * 1/s folded into P's rows and bias and s into C's columns leave fp32
 * outputs unchanged. C column j reads P row map[j] (GQA: one V row feeds the
 * same dimension of several query heads), so s is one factor per P row, from
 * the maxima over its columns. C is row-parallel: its columns are whole on
 * this rank and need no gather. */
static int smooth_pair(const float *act, float *Wp, float *bias, size_t rows, size_t K, float *Wc,
                       size_t N, size_t cols, const uint32_t *map, float alpha)
{
    float *amax = calloc(2 * rows, sizeof *amax), *s = malloc(rows * sizeof *s);
    float *wmax = amax + rows;
    int err = QS_OK;
    if (!amax || !s) {
        err = qs_seterr(QS_ENOMEM, "out of memory for SmoothQuant factors");
        goto out;
    }
    for (size_t j = 0; j < cols; j++)
        amax[map[j]] = fmaxf(amax[map[j]], act[j]);
    for (size_t n = 0; n < N; n++)
        for (size_t j = 0; j < cols; j++)
            wmax[map[j]] = fmaxf(wmax[map[j]], fabsf(Wc[n * cols + j]));
    const float *one[1] = {wmax};
    size_t n1 = 1;
    if ((err = qs_smooth_scales(amax, rows, one, &n1, 1, alpha, s)))
        goto out;
    for (size_t r = 0; r < rows; r++) {
        float inv = 1.0f / s[r];
        for (size_t k = 0; k < K; k++)
            Wp[r * K + k] *= inv;
        if (bias)
            bias[r] *= inv;
    }
    for (size_t n = 0; n < N; n++)
        for (size_t j = 0; j < cols; j++)
            Wc[n * cols + j] *= s[map[j]];
out:
    free(amax);
    free(s);
    return err;
}

/* W8A8 with calibration. q/k/v and up/gate are fed by a norm (SmoothQuant's
 * reference code smooths these two), o by V. down is fed by up and smoothed
 * only with one activation scale per token: the FFN's inner activation
 * carries the largest outliers, which flatten a whole token's codes; in
 * channel groups they flatten one group, and smoothing down then only moves
 * precision out of its weights (SmolLM2, 16 windows: +0.49% over fp32
 * without, +0.82% with). Post-LN OPT has no norm in front of q/k/v. */
int qs_smooth_layer(qs_model *m, uint32_t l, const qs_calib *cal, float alpha, float *Wq, float *Wk,
                    float *Wv, float *Wo, float *Wu, float *Wg, float *Wd)
{
    const qs_model_config *c = &m->cfg;
    layer *L = &m->layers[l];
    size_t H = c->hidden, hd = m->hd, cols = (size_t)m->hq * hd, F = m->fr;
    float *qkv[3] = {Wq, Wk, Wv}, *ffn[2] = {Wu, Wg};
    size_t nqkv[3] = {L->q.N, L->k.N, L->v.N}, nffn[2] = {L->up.N, L->gate.N};
    uint32_t *map = malloc((cols > F ? cols : F) * sizeof *map);
    if (!map)
        return qs_seterr(QS_ENOMEM, "out of memory for SmoothQuant factors");
    int err = smooth_site(m, cal->absmax + qs_calib_at(cal, l, QS_CALIB_QKV), &L->attn_norm, qkv,
                          nqkv, 3, alpha);
    if (!err)
        err = smooth_site(m, cal->absmax + qs_calib_at(cal, l, QS_CALIB_UP), &L->ffn_norm, ffn,
                          nffn, Wg ? 2 : 1, alpha);
    if (!err) {
        uint32_t group = c->heads / c->kv_heads;
        for (size_t j = 0; j < cols; j++)
            map[j] = ((m->q_first + (uint32_t)(j / hd)) / group - m->kv_first) * (uint32_t)hd +
                     (uint32_t)(j % hd);
        err = smooth_pair(cal->absmax + qs_calib_at(cal, l, QS_CALIB_O) + m->q_first * hd, Wv,
                          L->v.bias, L->v.N, H, Wo, L->o.N, cols, map, alpha);
    }
    if (!err && qs_w8_groups(F, m->quant.group_size) == 1) {
        for (size_t j = 0; j < F; j++)
            map[j] = (uint32_t)j;
        err =
            smooth_pair(cal->absmax + qs_calib_at(cal, l, QS_CALIB_DOWN) + (size_t)m->rank * m->fr,
                        Wu, L->up.bias, L->up.N, H, Wd, L->down.N, F, map, alpha);
    }
    free(map);
    return err;
}

int qs_calib_init(qs_calib *c, const qs_model_config *cfg)
{
    *c = (qs_calib){
        cfg->layers, cfg->hidden, cfg->heads * cfg->head_dim, cfg->ffn, NULL, NULL, {0}, 0};
    c->absmax = calloc(calib_floats(c), sizeof(float));
    return c->absmax ? QS_OK : qs_seterr(QS_ENOMEM, "out of memory for calibration statistics");
}

/* A Hessian per layer and site of this rank's linear inputs: GPTQ needs
 * the products of every pair of channels, not only their maxima. */
int qs_calib_hessians(qs_calib *c, const qs_model *m)
{
    const uint32_t hk[QS_CALIB_SITES] = {c->hidden, m->hq * m->hd, c->hidden, m->fr};
    uint64_t per = 0;
    for (int s = 0; s < QS_CALIB_SITES; s++)
        per += (uint64_t)hk[s] * hk[s];
    uint64_t bytes = per * c->layers * sizeof(float);
    if (bytes > (8ull << 30))
        return qs_seterr(QS_ENOMEM,
                         "GPTQ's calibration Hessians of %s take %.1f GiB on a rank (the limit is "
                         "8): load it on more ranks, or without --gptq",
                         m->cfg.name, bytes / 1073741824.0);
    free(c->hess);
    if (!(c->hess = calloc(per * c->layers, sizeof(float))))
        return qs_seterr(QS_ENOMEM, "out of memory for %.1f GiB of GPTQ Hessians",
                         bytes / 1073741824.0);
    memcpy(c->hk, hk, sizeof hk);
    c->hess_borrowed = 0;
    return QS_OK;
}

float *qs_calib_hessian(const qs_calib *c, uint32_t l, int site)
{
    if (!c || !c->hess)
        return NULL;
    uint64_t per = 0, at = 0;
    for (int s = 0; s < QS_CALIB_SITES; s++) {
        if (s == site)
            at = per;
        per += (uint64_t)c->hk[s] * c->hk[s];
    }
    return c->hess + per * l + at;
}

void qs_calib_close(qs_calib *c)
{
    free(c->absmax);
    if (!c->hess_borrowed)
        free(c->hess);
    c->absmax = NULL;
    c->hess = NULL;
}

int qs_calib_check(const qs_calib *c, const qs_model_config *cfg)
{
    if (c->layers != cfg->layers || c->hidden != cfg->hidden ||
        c->attn != cfg->heads * cfg->head_dim || c->ffn != cfg->ffn || !c->absmax)
        return qs_seterr(QS_EINVAL,
                         "calibration statistics for %u layers (widths %u, %u, %u) do not fit "
                         "%s: calibrate on the same model",
                         c->layers, c->hidden, c->attn, c->ffn, cfg->name);
    return QS_OK;
}

int qs_model_record(qs_model *m, qs_calib *c)
{
    int err = c ? qs_calib_check(c, &m->cfg) : QS_OK;
    if (!err)
        m->record = c;
    return err;
}
