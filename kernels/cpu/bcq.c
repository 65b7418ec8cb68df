/* bcq.c: the BCQ-with-offset format: shape checks, exact sizes, allocation,
 * the word order of the bit-planes and dequantization (the reference view
 * of the weights that every BCQ kernel is tested against). */
#include <stdlib.h>
#include <string.h>

#include "qs_kernels.h"

size_t qs_bcq_ngroups(size_t K, size_t g)
{
    return g == 0 ? 1 : K / g;
}

int qs_bcq_check(size_t N, size_t K, unsigned q, size_t g)
{
    if (q < 1 || q > 8)
        return qs_seterr(QS_EINVAL, "BCQ needs 1 to 8 bit-planes, got q=%u: pick q in 1..8", q);
    if (N == 0 || K == 0)
        return qs_seterr(QS_EINVAL, "BCQ matrix is empty (N=%zu, K=%zu): give both a size >= 1", N,
                         K);
    if (g != 0 && (g % 32 != 0 || K % g != 0))
        return qs_seterr(QS_EINVAL,
                         "BCQ group size g=%zu must be a multiple of 32 that divides K=%zu, "
                         "or 0 for whole rows",
                         g, K);
    size_t b, a, z, nk;
    /* Every array, and the N x K dequantized matrix in double, must be
     * addressable: check the largest products once. */
    if (__builtin_mul_overflow((size_t)q * 4, N, &b) ||
        __builtin_mul_overflow(b, (K + 31) / 32, &b) ||
        __builtin_mul_overflow((size_t)q * 2, N, &a) ||
        __builtin_mul_overflow(a, qs_bcq_ngroups(K, g), &a) ||
        __builtin_mul_overflow(N * 2, qs_bcq_ngroups(K, g), &z) ||
        __builtin_mul_overflow(N, K, &nk) || __builtin_mul_overflow(nk, sizeof(double), &nk))
        return qs_seterr(QS_EOVERFLOW,
                         "BCQ sizes overflow size_t for N=%zu K=%zu q=%u: split the matrix", N, K,
                         q);
    return QS_OK;
}

int qs_bcq_sizes(size_t N, size_t K, unsigned q, size_t g, size_t *bits_bytes, size_t *alpha_bytes,
                 size_t *z_bytes)
{
    int err = qs_bcq_check(N, K, q, g);
    if (err)
        return err;
    size_t ng = qs_bcq_ngroups(K, g);
    if (bits_bytes)
        *bits_bytes = (size_t)q * N * ((K + 31) / 32) * 4;
    if (alpha_bytes)
        *alpha_bytes = (size_t)q * N * ng * 2;
    if (z_bytes)
        *z_bytes = N * ng * 2;
    return QS_OK;
}

int qs_bcq_init(qs_bcq *w, size_t N, size_t K, unsigned q, size_t g)
{
    if (!w)
        return qs_seterr(QS_EINVAL, "qs_bcq_init got a NULL struct: pass a qs_bcq to fill");
    memset(w, 0, sizeof(*w));
    size_t bb, ab, zb;
    int err = qs_bcq_sizes(N, K, q, g, &bb, &ab, &zb);
    if (err)
        return err;
    w->bits = calloc(bb / 4, 4);
    w->alpha = calloc(ab / 2, 2);
    w->z = calloc(zb / 2, 2);
    if (!w->bits || !w->alpha || !w->z) {
        qs_bcq_close(w);
        return qs_seterr(QS_ENOMEM, "out of memory for a %zu x %zu %u-bit BCQ matrix (%zu bytes)",
                         N, K, q, bb + ab + zb);
    }
    w->N = N, w->K = K, w->q = q, w->g = g;
    return QS_OK;
}

void qs_bcq_close(qs_bcq *w)
{
    if (!w)
        return;
    free(w->bits);
    free(w->alpha);
    free(w->z);
    memset(w, 0, sizeof(*w));
}

size_t qs_bcq_word_index(const qs_bcq *w, unsigned i, size_t n, size_t wi)
{
    size_t nw = (w->K + 31) / 32, tile = n / QS_BCQ_TILE, r = n % QS_BCQ_TILE;
    size_t base = tile * QS_BCQ_TILE * w->q * nw;
    if (tile < w->N / QS_BCQ_TILE) {
        size_t slot = ((r >> 1) & 3) << 3 | (r >> 4) << 2 | (r & 1) << 1 | ((r >> 3) & 1);
        return base + (wi * w->q + i) * QS_BCQ_TILE + slot;
    }
    size_t rows = w->N - tile * QS_BCQ_TILE; /* the partial last tile */
    return base + (wi * w->q + i) * rows + r;
}

static int bcq_valid(const qs_bcq *w, const void *out)
{
    if (!w || !out || !w->bits || !w->alpha || !w->z)
        return qs_seterr(QS_EINVAL, "BCQ weights or output buffer is NULL: initialize the "
                                    "qs_bcq with qs_bcq_init and pass an N x K buffer");
    return qs_bcq_check(w->N, w->K, w->q, w->g);
}

size_t qs_bcq_alpha_index(const qs_bcq *w, unsigned i, size_t n, size_t gi)
{
    size_t ng = qs_bcq_ngroups(w->K, w->g), tile = n / QS_BCQ_TILE;
    size_t rows = tile < w->N / QS_BCQ_TILE ? QS_BCQ_TILE : w->N - tile * QS_BCQ_TILE;
    return tile * QS_BCQ_TILE * w->q * ng + (gi * w->q + i) * rows + n % QS_BCQ_TILE;
}

size_t qs_bcq_z_index(const qs_bcq *w, size_t n, size_t gi)
{
    size_t ng = qs_bcq_ngroups(w->K, w->g), tile = n / QS_BCQ_TILE;
    size_t rows = tile < w->N / QS_BCQ_TILE ? QS_BCQ_TILE : w->N - tile * QS_BCQ_TILE;
    return tile * QS_BCQ_TILE * ng + gi * rows + n % QS_BCQ_TILE;
}

/* One dequantizer for both precisions (the fp16 scales are exact in both);
 * the sum runs in double and is rounded once for fp32. */
static int bcq_dequant(const qs_bcq *w, float *Wf, double *Wd)
{
    int err = bcq_valid(w, Wf ? (const void *)Wf : (const void *)Wd);
    if (err)
        return err;
    size_t gs = w->g ? w->g : w->K;
    for (size_t n = 0; n < w->N; n++)
        for (size_t k = 0; k < w->K; k++) {
            size_t gi = k / gs;
            double v = qs_fp16_to_fp32(w->z[qs_bcq_z_index(w, n, gi)]);
            for (unsigned i = 0; i < w->q; i++) {
                double a = qs_fp16_to_fp32(w->alpha[qs_bcq_alpha_index(w, i, n, gi)]);
                uint32_t word = w->bits[qs_bcq_word_index(w, i, n, k / 32)];
                v += (word >> (k % 32) & 1u) ? a : -a;
            }
            if (Wf)
                Wf[n * w->K + k] = (float)v;
            else
                Wd[n * w->K + k] = v;
        }
    return QS_OK;
}

int qs_bcq_dequant(const qs_bcq *w, float *W)
{
    return bcq_dequant(w, W, NULL);
}

int qs_bcq_dequant_f64(const qs_bcq *w, double *W)
{
    return bcq_dequant(w, NULL, W);
}
