/* Atom's outlier channels: each W4A4 linear's input order from the
 * calibration statistics. The channels whose activations reach furthest
 * (abs-max over the calibration text, merged over the group) go last and
 * stay INT8; the rest keep their order and become INT4 in groups.
 *
 * Under tensor parallelism the choice is made once over the whole input,
 * so every split keeps the same channels in INT8 as the unsplit model: a
 * column-parallel layer (q, k, v, up, gate) reads the whole hidden state
 * and keeps all of them; a row-parallel layer (o, down) keeps those that
 * fall in its columns, which may be none. */
#include "model_internal.h"

#include <stdlib.h>

typedef struct ranked {
    float a;
    uint32_t j;
} ranked;

/* Largest first; equal maxima by channel, so every rank sorts alike. */
static int by_absmax(const void *x, const void *y)
{
    const ranked *p = x, *q = y;
    if (p->a != q->a)
        return p->a < q->a ? 1 : -1;
    return p->j < q->j ? -1 : p->j > q->j;
}

int qs_outlier_order(const float *absmax, size_t width, size_t first, size_t K, size_t want,
                     uint32_t *perm, size_t *ko)
{
    if (first > width || K > width - first)
        return qs_seterr(QS_EINVAL,
                         "outlier channels: columns %zu..%zu are outside an input %zu wide", first,
                         first + K, width);
    if (want > width)
        want = width;
    ranked *r = malloc((width ? width : 1) * sizeof *r);
    unsigned char *out = calloc(K ? K : 1, 1);
    if (!r || !out) {
        free(r);
        free(out);
        return qs_seterr(QS_ENOMEM, "out of memory choosing outlier channels");
    }
    for (size_t j = 0; j < width; j++)
        /* A NaN maximum ranks lowest rather than poisoning the sort. */
        r[j] = (ranked){absmax && absmax[j] == absmax[j] ? absmax[j] : -1.0f, (uint32_t)j};
    qsort(r, width, sizeof *r, by_absmax);
    size_t n = 0;
    for (size_t i = 0; absmax && i < want; i++)
        if (r[i].j >= first && r[i].j < first + K)
            out[r[i].j - first] = 1, n++;
    size_t at = 0, o = K - n;
    for (size_t j = 0; j < K; j++)
        perm[out[j] ? o++ : at++] = (uint32_t)j;
    *ko = n;
    free(r);
    free(out);
    return QS_OK;
}
