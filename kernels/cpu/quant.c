/* quant.c: the quantizers. RTN (uniform, asymmetric per group) and its exact
 * BCQ form, non-uniform BCQ by greedy init plus alternating least squares,
 * and SmoothQuant's scale migration. All run once per model load, so they
 * favour clarity and double precision over speed. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "qs_kernels.h"
#include "quant.h"

int qs_check_weights(const float *W, size_t N, size_t K)
{
    for (size_t i = 0, n = N * K; i < n; i++)
        if (!isfinite(W[i]))
            return qs_seterr(QS_EINVAL,
                             "weight [%zu, %zu] is not finite (%g): fix the checkpoint before "
                             "quantizing it",
                             i / K, i % K, (double)W[i]);
    return QS_OK;
}

/* ---- RTN ---------------------------------------------------------------- */

/* Scale and zero point of one group; a constant group keeps its value exact. */
static void rtn_params(const float *w, size_t G, unsigned q, float *s, float *zp)
{
    float mn = w[0], mx = w[0];
    for (size_t k = 1; k < G; k++) {
        mn = w[k] < mn ? w[k] : mn;
        mx = w[k] > mx ? w[k] : mx;
    }
    float levels = (float)((1u << q) - 1);
    if (mx > mn)
        *s = (mx - mn) / levels;
    else
        *s = mn != 0 ? fabsf(mn) : 1.0f;
    *zp = nearbyintf(-mn / *s);
}

static uint8_t rtn_code(float w, float s, float zp, unsigned q)
{
    float c = nearbyintf(w / s) + zp, top = (float)((1u << q) - 1);
    c = c < 0 ? 0 : (c > top ? top : c);
    return (uint8_t)c;
}

int qs_rtn_quantize(qs_rtn *out, const float *W, size_t N, size_t K, unsigned q, size_t g)
{
    if (!out || !W)
        return qs_seterr(QS_EINVAL, "qs_rtn_quantize got a NULL pointer: pass the output "
                                    "struct and the N x K weights");
    memset(out, 0, sizeof(*out));
    int err = qs_bcq_check(N, K, q, g);
    if (err || (err = qs_check_weights(W, N, K)))
        return err;
    size_t ng = qs_bcq_ngroups(K, g), gs = g ? g : K;
    out->codes = malloc(N * K);
    out->scale = malloc(N * ng * sizeof(float));
    out->zero = malloc(N * ng * sizeof(float));
    if (!out->codes || !out->scale || !out->zero) {
        qs_rtn_close(out);
        return qs_seterr(QS_ENOMEM, "out of memory for RTN codes of a %zu x %zu matrix", N, K);
    }
    out->N = N, out->K = K, out->q = q, out->g = g;
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < N; n++)
        for (size_t gi = 0; gi < ng; gi++) {
            const float *w = W + n * K + gi * gs;
            float s, zp;
            rtn_params(w, gs, q, &s, &zp);
            out->scale[n * ng + gi] = s;
            out->zero[n * ng + gi] = zp;
            for (size_t k = 0; k < gs; k++)
                out->codes[n * K + gi * gs + k] = rtn_code(w[k], s, zp, q);
        }
    return QS_OK;
}

void qs_rtn_close(qs_rtn *r)
{
    if (!r)
        return;
    free(r->codes);
    free(r->scale);
    free(r->zero);
    memset(r, 0, sizeof(*r));
}

int qs_rtn_dequant(const qs_rtn *r, float *W)
{
    if (!r || !W || !r->codes || !r->scale || !r->zero)
        return qs_seterr(QS_EINVAL, "qs_rtn_dequant got a NULL pointer: quantize first and "
                                    "pass an N x K buffer");
    size_t ng = qs_bcq_ngroups(r->K, r->g), gs = r->g ? r->g : r->K;
    for (size_t n = 0; n < r->N; n++)
        for (size_t k = 0; k < r->K; k++) {
            size_t p = n * ng + k / gs;
            W[n * r->K + k] = r->scale[p] * ((float)r->codes[n * r->K + k] - r->zero[p]);
        }
    return QS_OK;
}

/* RTN's grid as a BCQ point, in fp16: alpha_i = s 2^i / 2,
 * z = s ((2^q - 1) / 2 - zp). */
static void rtn_as_bcq(float s, float zp, unsigned q, uint16_t *alpha, uint16_t *z)
{
    for (unsigned i = 0; i < q; i++)
        alpha[i] = qs_fp32_to_fp16(s * (float)(1u << i) * 0.5f);
    *z = qs_fp32_to_fp16(s * ((float)((1u << q) - 1) * 0.5f - zp));
}

void qs_rtn_grid(const float *w, size_t gs, unsigned q, uint16_t *alpha, uint16_t *z)
{
    float s, zp;
    rtn_params(w, gs, q, &s, &zp);
    rtn_as_bcq(s, zp, q, alpha, z);
}

/* Writes per-element codes (bit i = plane i, 1 = +1) of rows [0, N) into the
 * bit-planes of w in its word order. */
void qs_bcq_pack_codes(qs_bcq *w, const uint8_t *codes)
{
    size_t nw = (w->K + 31) / 32;
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < w->N; n++)
        for (unsigned i = 0; i < w->q; i++)
            for (size_t wi = 0; wi < nw; wi++) {
                uint32_t word = 0;
                for (size_t j = 0; j < 32 && wi * 32 + j < w->K; j++)
                    word |= (uint32_t)((codes[n * w->K + wi * 32 + j] >> i) & 1u) << j;
                w->bits[qs_bcq_word_index(w, i, n, wi)] = word;
            }
}

int qs_bcq_from_rtn(qs_bcq *out, const float *W, size_t N, size_t K, unsigned q, size_t g)
{
    if (!out)
        return qs_seterr(QS_EINVAL, "qs_bcq_from_rtn got a NULL output: pass a qs_bcq to fill");
    qs_rtn r;
    int err = qs_rtn_quantize(&r, W, N, K, q, g);
    if (err)
        return err;
    if ((err = qs_bcq_init(out, N, K, q, g))) {
        qs_rtn_close(&r);
        return err;
    }
    size_t ng = qs_bcq_ngroups(K, g);
    for (size_t n = 0; n < N; n++)
        for (size_t gi = 0; gi < ng; gi++) {
            uint16_t a[8], z;
            rtn_as_bcq(r.scale[n * ng + gi], r.zero[n * ng + gi], q, a, &z);
            for (unsigned i = 0; i < q; i++)
                out->alpha[qs_bcq_alpha_index(out, i, n, gi)] = a[i];
            out->z[qs_bcq_z_index(out, n, gi)] = z;
        }
    qs_bcq_pack_codes(out, r.codes);
    qs_rtn_close(&r);
    return QS_OK;
}

/* ---- Non-uniform BCQ ---------------------------------------------------- */

/* Level of code c: z + sum_i (+-alpha_i). */
static double level(const double *a, double z, unsigned q, unsigned c)
{
    double v = z;
    for (unsigned i = 0; i < q; i++)
        v += (c >> i & 1u) ? a[i] : -a[i];
    return v;
}

typedef struct lvl {
    double v;
    unsigned c;
} lvl;

/* The 2^q levels in ascending order; equal levels keep code order (a
 * stable insertion sort: 16 or 256 entries, sorted every iteration). */
static void sort_levels(const double *a, double z, unsigned q, lvl *L)
{
    unsigned nl = 1u << q;
    for (unsigned c = 0; c < nl; c++) {
        lvl x = {level(a, z, q, c), c};
        unsigned j = c;
        for (; j > 0 && L[j - 1].v > x.v; j--)
            L[j] = L[j - 1];
        L[j] = x;
    }
}

/* A group's weights in ascending order (their indices), once per group:
 * assigning codes is then one merge of two sorted lists per iteration. */
typedef struct wix {
    double v;
    uint32_t k;
} wix;

static int wix_less(const wix *a, const wix *b)
{
    return a->v < b->v || (a->v == b->v && a->k < b->k);
}

/* Bottom-up merge sort of tmp (ties by index, so the order is unique),
 * through buf; the indices into order. */
static void sort_weights(const double *w, size_t G, wix *tmp, wix *buf, uint32_t *order)
{
    for (size_t k = 0; k < G; k++)
        tmp[k].v = w[k], tmp[k].k = (uint32_t)k;
    wix *src = tmp, *dst = buf;
    for (size_t width = 1; width < G; width *= 2) {
        for (size_t lo = 0; lo < G; lo += 2 * width) {
            size_t mid = lo + width < G ? lo + width : G,
                   hi = lo + 2 * width < G ? lo + 2 * width : G;
            size_t i = lo, j = mid, o = lo;
            while (i < mid && j < hi)
                dst[o++] = wix_less(&src[j], &src[i]) ? src[j++] : src[i++];
            while (i < mid)
                dst[o++] = src[i++];
            while (j < hi)
                dst[o++] = src[j++];
        }
        wix *t = src;
        src = dst, dst = t;
    }
    for (size_t k = 0; k < G; k++)
        order[k] = src[k].k;
}

/* The weighted code histogram the normal equations need: cnt[c] = sum of
 * h, sw[c] = sum of h w over the elements with code c, in index order. */
typedef struct hist {
    double cnt[256], sw[256];
} hist;

/* Best bits for fixed alpha and z: the nearest of the sorted levels (the
 * lowest whose midpoint with the next is at least w), walking the weights
 * in ascending order (rank: scratch of G bytes). Returns the squared error,
 * each element's weighted by h[k], summed in index order; fills the new
 * codes' histogram and says whether any code changed. */
static double assign_codes(const double *w, const double *h, const uint32_t *order, size_t G,
                           const double *a, double z, unsigned q, uint8_t *codes, uint8_t *rank,
                           lvl *L, hist *hs, int *changed)
{
    unsigned nl = 1u << q, j = 0;
    sort_levels(a, z, q, L);
    double mid[255];
    for (unsigned m = 0; m + 1 < nl; m++)
        mid[m] = 0.5 * (L[m].v + L[m + 1].v);
    for (size_t i = 0; i < G; i++) {
        size_t k = order[i];
        while (j + 1 < nl && w[k] > mid[j])
            j++;
        rank[k] = (uint8_t)j;
    }
    memset(hs->cnt, 0, nl * sizeof(double));
    memset(hs->sw, 0, nl * sizeof(double));
    double err = 0;
    int ch = 0;
    for (size_t k = 0; k < G; k++) {
        double d = w[k] - L[rank[k]].v;
        uint8_t c = (uint8_t)L[rank[k]].c;
        ch |= c != codes[k];
        codes[k] = c;
        err += h[k] * d * d;
        hs->cnt[c] += h[k], hs->sw[c] += h[k] * w[k];
    }
    *changed = ch;
    return err;
}

static void code_hist(const double *w, const double *h, size_t G, const uint8_t *codes, unsigned q,
                      hist *hs)
{
    memset(hs->cnt, 0, (1u << q) * sizeof(double));
    memset(hs->sw, 0, (1u << q) * sizeof(double));
    for (size_t k = 0; k < G; k++)
        hs->cnt[codes[k]] += h[k], hs->sw[codes[k]] += h[k] * w[k];
}

/* Weighted (h) least-squares alpha (q values) and z for fixed bits. The
 * normal equations depend on the bits only through the code histogram, so
 * they cost O(2^q q^2). A tiny ridge keeps them solvable when a plane is
 * constant (then it is collinear with z). */
static void ls_alpha_z(const hist *hs, unsigned q, double *a, double *z)
{
    unsigned nl = 1u << q, d = q + 1;
    const double *cnt = hs->cnt, *sw = hs->sw;
    double A[9][10];
    for (unsigned i = 0; i < d; i++)
        memset(A[i], 0, (d + 1) * sizeof(double));
    /* Symmetric: the upper triangle, then its mirror. */
    for (unsigned c = 0; c < nl; c++) {
        if (cnt[c] == 0)
            continue;
        double v[9];
        for (unsigned i = 0; i < q; i++)
            v[i] = (c >> i & 1u) ? 1 : -1;
        v[q] = 1;
        for (unsigned i = 0; i < d; i++) {
            for (unsigned j = i; j < d; j++)
                A[i][j] += cnt[c] * v[i] * v[j];
            A[i][d] += sw[c] * v[i];
        }
    }
    for (unsigned i = 0; i < d; i++)
        for (unsigned j = 0; j < i; j++)
            A[i][j] = A[j][i];
    double tr = 0;
    for (unsigned i = 0; i < d; i++)
        tr += A[i][i];
    for (unsigned i = 0; i < d; i++)
        A[i][i] += 1e-12 * tr + 1e-300;
    /* Gaussian elimination with partial pivoting on the augmented matrix. */
    for (unsigned col = 0; col < d; col++) {
        unsigned p = col;
        for (unsigned r = col + 1; r < d; r++)
            if (fabs(A[r][col]) > fabs(A[p][col]))
                p = r;
        for (unsigned j = 0; j <= d; j++) {
            double t = A[col][j];
            A[col][j] = A[p][j], A[p][j] = t;
        }
        for (unsigned r = col + 1; r < d; r++) {
            double f = A[r][col] / A[col][col];
            for (unsigned j = col; j <= d; j++)
                A[r][j] -= f * A[col][j];
        }
    }
    double x[9];
    for (int r = (int)d - 1; r >= 0; r--) {
        double t = A[r][d];
        for (unsigned j = (unsigned)r + 1; j < d; j++)
            t -= A[r][j] * x[j];
        x[r] = t / A[r][r];
    }
    for (unsigned i = 0; i < q; i++)
        a[i] = x[i];
    *z = x[q];
}

/* Per-group scratch of the refinement. */
typedef struct fit_ws {
    const uint32_t *order; /* the weights' ascending order */
    uint8_t *rank;         /* G bytes */
    lvl *L;                /* 256 levels */
    hist hs;
} fit_ws;

/* Alternating refinement from the given codes; returns the error of the
 * fp16-rounded result, which is what gets stored. Stops when the codes
 * repeat (the next step would give the same alpha) or the error stops
 * falling. */
static double refine(const double *w, const double *h, size_t G, unsigned q, unsigned iters,
                     uint8_t *codes, double *a, double *z, fit_ws *f)
{
    double best = INFINITY;
    int changed = 1;
    code_hist(w, h, G, codes, q, &f->hs);
    for (unsigned it = 0; it < iters; it++) {
        ls_alpha_z(&f->hs, q, a, z);
        double err =
            assign_codes(w, h, f->order, G, a, *z, q, codes, f->rank, f->L, &f->hs, &changed);
        if (!changed || !(err < best * (1 - 1e-9))) /* converged, or stopped falling */
            break;
        best = err;
    }
    if (changed) /* the least-squares scales of the final bits */
        ls_alpha_z(&f->hs, q, a, z);
    for (unsigned i = 0; i < q; i++)
        a[i] = qs_fp16_to_fp32(qs_fp32_to_fp16((float)a[i]));
    *z = qs_fp16_to_fp32(qs_fp32_to_fp16((float)*z));
    return assign_codes(w, h, f->order, G, a, *z, q, codes, f->rank, f->L, &f->hs, &changed);
}

/* One thread's scratch for groups of up to gs weights. */
struct qs_bcq_fitter {
    size_t gs;
    double *w, *h;
    uint8_t *c2, *c3; /* refined RTN codes, plain RTN codes */
    uint32_t *order;
    wix *tmp; /* 2 gs */
    fit_ws f;
};

qs_bcq_fitter *qs_bcq_fitter_new(size_t gs)
{
    qs_bcq_fitter *ft = calloc(1, sizeof *ft);
    if (!ft)
        return NULL;
    ft->gs = gs;
    ft->w = malloc(gs * sizeof(double));
    ft->h = malloc(gs * sizeof(double));
    ft->c2 = malloc(2 * gs);
    ft->c3 = ft->c2 ? ft->c2 + gs : NULL;
    ft->order = malloc(gs * sizeof *ft->order);
    ft->tmp = malloc(2 * gs * sizeof *ft->tmp);
    ft->f.order = ft->order;
    ft->f.rank = malloc(gs);
    ft->f.L = malloc(256 * sizeof(lvl));
    if (!ft->w || !ft->h || !ft->c2 || !ft->order || !ft->tmp || !ft->f.rank || !ft->f.L) {
        qs_bcq_fitter_free(ft);
        return NULL;
    }
    return ft;
}

void qs_bcq_fitter_free(qs_bcq_fitter *ft)
{
    if (!ft)
        return;
    free(ft->w);
    free(ft->h);
    free(ft->c2);
    free(ft->order);
    free(ft->tmp);
    free(ft->f.rank);
    free(ft->f.L);
    free(ft);
}

void qs_bcq_fit_group(qs_bcq_fitter *ft, const float *wf, size_t gs, unsigned q, unsigned iters,
                      uint8_t *c1, uint16_t *alpha, uint16_t *z)
{
    double *w = ft->w, *h = ft->h;
    uint8_t *c2 = ft->c2, *c3 = ft->c3;
    fit_ws *f = &ft->f;
    double a1[8], z1, a2[8], z2;
    for (size_t k = 0; k < gs; k++)
        w[k] = wf[k];
    sort_weights(w, gs, ft->tmp, ft->tmp + gs, ft->order);
    /* Greedy: z = mean, then each plane takes the sign of the residual and
     * its mean magnitude. */
    double mean = 0;
    for (size_t k = 0; k < gs; k++)
        mean += w[k];
    mean /= (double)gs;
    /* Weights of the squared error: 1 + d^2 / var, d = w - mean. At 3 bits
     * and fewer the plain least-squares fit clips the tail (on SmolLM2-135M
     * row-wise it cut blk.11.ffn_down's 6.07 to 1.74), and those few large
     * weights carry the large outputs: perplexity went from 22 to 1.6e6. At
     * 4 bits it clips little and plain MSE measured slightly better. */
    double var = 0;
    for (size_t k = 0; k < gs; k++)
        var += (w[k] - mean) * (w[k] - mean);
    var /= (double)gs;
    for (size_t k = 0; k < gs; k++)
        h[k] = q <= 3 && var > 0 ? 1 + (w[k] - mean) * (w[k] - mean) / var : 1;
    memset(c1, 0, gs);
    for (unsigned i = 0; i < q; i++) {
        double m = 0;
        for (size_t k = 0; k < gs; k++) {
            double r = w[k] - level(a1, mean, i, c1[k]);
            m += fabs(r);
            if (r >= 0)
                c1[k] |= (uint8_t)(1u << i);
        }
        a1[i] = m / (double)gs;
    }
    double e1 = refine(w, h, gs, q, iters, c1, a1, &z1, f);
    /* RTN seed: its levels are a BCQ point too; refining it makes the result
     * never worse than RTN in the weighted error (ALS only finds a local
     * optimum, and for large q the uniform grid is often near one). */
    float s, zp;
    rtn_params(wf, gs, q, &s, &zp);
    for (size_t k = 0; k < gs; k++)
        c2[k] = c3[k] = rtn_code(wf[k], s, zp, q);
    double e2 = refine(w, h, gs, q, iters, c2, a2, &z2, f);
    if (e2 < e1) {
        memcpy(c1, c2, gs);
        memcpy(a1, a2, sizeof(a1));
        z1 = z2;
    }
    /* The weighted fit may lose to plain RTN in plain squared error (q = 1
     * on heavy tails); RTN then, which clips nothing. */
    uint16_t ra[8], rz;
    rtn_as_bcq(s, zp, q, ra, &rz);
    for (unsigned i = 0; i < q; i++)
        a2[i] = qs_fp16_to_fp32(ra[i]);
    z2 = qs_fp16_to_fp32(rz);
    double p1 = 0, p2 = 0, lv1[256], lv2[256];
    for (unsigned c = 0; c < 1u << q; c++)
        lv1[c] = level(a1, z1, q, c), lv2[c] = level(a2, z2, q, c);
    for (size_t k = 0; k < gs; k++) {
        double d1 = w[k] - lv1[c1[k]], d2 = w[k] - lv2[c3[k]];
        p1 += d1 * d1, p2 += d2 * d2;
    }
    if (p2 < p1) {
        memcpy(c1, c3, gs);
        memcpy(a1, a2, sizeof(a1));
        z1 = z2;
    }
    for (unsigned i = 0; i < q; i++)
        alpha[i] = qs_fp32_to_fp16((float)a1[i]);
    *z = qs_fp32_to_fp16((float)z1);
}

int qs_bcq_quantize(qs_bcq *out, const float *W, size_t N, size_t K, unsigned q, size_t g,
                    unsigned max_iters)
{
    if (!out || !W)
        return qs_seterr(QS_EINVAL, "qs_bcq_quantize got a NULL pointer: pass the output "
                                    "struct and the N x K weights");
    memset(out, 0, sizeof(*out));
    int err = qs_bcq_check(N, K, q, g);
    if (err || (err = qs_check_weights(W, N, K)))
        return err;
    if (max_iters == 0)
        max_iters = 20;
    size_t ng = qs_bcq_ngroups(K, g), gs = g ? g : K;
    uint8_t *codes = malloc(N * K);
    if (!codes)
        return qs_seterr(QS_ENOMEM, "out of memory for BCQ codes of a %zu x %zu matrix", N, K);
    if ((err = qs_bcq_init(out, N, K, q, g))) {
        free(codes);
        return err;
    }
    int nomem = 0;
#pragma omp parallel reduction(| : nomem)
    {
        qs_bcq_fitter *ft = qs_bcq_fitter_new(gs);
        nomem = !ft;
#pragma omp for schedule(dynamic, 4)
        for (size_t t = 0; t < N * ng; t++) {
            if (nomem)
                continue;
            size_t n = t / ng, gi = t % ng;
            uint16_t a[8], z;
            qs_bcq_fit_group(ft, W + n * K + gi * gs, gs, q, max_iters, codes + n * K + gi * gs, a,
                             &z);
            for (unsigned i = 0; i < q; i++)
                out->alpha[qs_bcq_alpha_index(out, i, n, gi)] = a[i];
            out->z[qs_bcq_z_index(out, n, gi)] = z;
        }
        qs_bcq_fitter_free(ft);
    }
    if (nomem) {
        free(codes);
        qs_bcq_close(out);
        return qs_seterr(QS_ENOMEM, "out of memory for BCQ quantizer scratch");
    }
    qs_bcq_pack_codes(out, codes);
    free(codes);
    return QS_OK;
}

/* ---- SmoothQuant -------------------------------------------------------- */

int qs_smooth_scales(const float *act_absmax, size_t K, const float *const *W, const size_t *N,
                     size_t nlin, float a, float *s)
{
    if (!act_absmax || !W || !N || !s || nlin == 0 || K == 0)
        return qs_seterr(QS_EINVAL, "qs_smooth_scales needs the K activation maxima, at least "
                                    "one linear with its row count, and an output of K scales");
    if (!(a >= 0 && a <= 1))
        return qs_seterr(QS_EINVAL, "SmoothQuant migration strength a=%g must be in [0, 1]",
                         (double)a);
    for (size_t l = 0; l < nlin; l++)
        if (!W[l] || N[l] == 0)
            return qs_seterr(QS_EINVAL, "linear %zu has no weights: pass N[l] >= 1 rows", l);
    for (size_t j = 0; j < K; j++) {
        double wmax = 0;
        for (size_t l = 0; l < nlin; l++)
            for (size_t n = 0; n < N[l]; n++)
                wmax = fmax(wmax, fabs(W[l][n * K + j]));
        double xmax = fabs(act_absmax[j]);
        double v = 1;
        if (xmax > 0 && wmax > 0 && isfinite(xmax) && isfinite(wmax))
            v = pow(xmax, a) / pow(wmax, 1 - a);
        s[j] = (float)fmin(fmax(v, 1e-5), 1e5);
    }
    return QS_OK;
}

int qs_smooth_fold(float *norm_weight, float *norm_bias, size_t K, float *const *W, const size_t *N,
                   size_t nlin, const float *s)
{
    if (!norm_weight || !W || !N || !s || K == 0)
        return qs_seterr(QS_EINVAL, "qs_smooth_fold needs the norm weight, the linears and the "
                                    "K scales from qs_smooth_scales");
    for (size_t j = 0; j < K; j++)
        if (!(s[j] > 0) || !isfinite(s[j]))
            return qs_seterr(QS_EINVAL,
                             "smoothing scale %zu is %g: scales must be finite and "
                             "positive",
                             j, (double)s[j]);
    for (size_t l = 0; l < nlin; l++)
        if (!W[l])
            return qs_seterr(QS_EINVAL, "linear %zu has no weights", l);
    for (size_t j = 0; j < K; j++) {
        norm_weight[j] /= s[j];
        if (norm_bias)
            norm_bias[j] /= s[j];
    }
    for (size_t l = 0; l < nlin; l++)
        for (size_t n = 0; n < N[l]; n++)
            for (size_t j = 0; j < K; j++)
                W[l][n * K + j] *= s[j];
    return QS_OK;
}
