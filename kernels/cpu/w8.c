/* w8.c: the W8A8 formats. INT8 weights per output channel in the tiled order
 * the GEMM wants (see qs_kernels.h), and INT8 activations per token (in
 * channel groups) or per tensor. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"
#include "w8.h"

size_t qs_w8_group(size_t K, size_t act_group)
{
    size_t Kp = (K + 3) / 4 * 4;
    return act_group == 0 || act_group >= K ? Kp : act_group;
}

size_t qs_w8_groups(size_t K, size_t act_group)
{
    size_t g = qs_w8_group(K, act_group);
    return (K + g - 1) / g;
}

size_t qs_w8_bytes(size_t N, size_t K, size_t act_group)
{
    size_t Kp = (K + 3) / 4 * 4, b, ng = qs_w8_groups(K, act_group), per;
    if (__builtin_mul_overflow(ng, 4, &per) || __builtin_add_overflow(per, Kp + 4, &per) ||
        __builtin_mul_overflow(N, per, &b))
        return 0;
    return b;
}

void qs_w8_sums(qs_w8 *w)
{
    size_t ng = qs_w8_groups(w->K, w->group);
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < w->N; n++)
        for (size_t g = 0; g < ng; g++) {
            int32_t sum = 0;
            size_t k1 = (g + 1) * w->group < w->K ? (g + 1) * w->group : w->K;
            for (size_t k = g * w->group; k < k1; k++)
                sum += w->w[qs_w8_index(w->N, w->Kp, n, k)];
            w->sum[g * w->N + n] = sum;
        }
}

int qs_w8_quantize(qs_w8 *out, const float *W, size_t N, size_t K, size_t act_group)
{
    if (!out || !W)
        return qs_seterr(QS_EINVAL, "qs_w8_quantize got a NULL pointer: pass the output struct "
                                    "and the N x K weights");
    memset(out, 0, sizeof(*out));
    if (N == 0 || K == 0)
        return qs_seterr(QS_EINVAL, "W8 matrix is empty (N=%zu, K=%zu)", N, K);
    /* The kernels step through K four columns at a time. */
    if (act_group % 4)
        return qs_seterr(QS_EINVAL,
                         "activation group of %zu channels: use a multiple of 4 (128 is the "
                         "usual), or 0 for one scale per token",
                         act_group);
    if (qs_w8_bytes(N, K, act_group) == 0 || K > SIZE_MAX / 2)
        return qs_seterr(QS_EOVERFLOW, "W8 sizes overflow for N=%zu K=%zu: split the matrix", N, K);
    size_t Kp = (K + 3) / 4 * 4, ng = qs_w8_groups(K, act_group);
    out->w = calloc(N, Kp);
    out->scale = malloc(N * sizeof(float));
    out->sum = malloc(ng * N * sizeof(int32_t));
    if (!out->w || !out->scale || !out->sum) {
        qs_w8_close(out);
        return qs_seterr(QS_ENOMEM, "out of memory for a %zu x %zu W8 matrix", N, K);
    }
    out->N = N, out->K = K, out->Kp = Kp, out->group = qs_w8_group(K, act_group);
    int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad)
    for (size_t n = 0; n < N; n++) {
        const float *row = W + n * K;
        float mx = 0;
        for (size_t k = 0; k < K; k++) {
            if (!isfinite(row[k]))
                bad = 1;
            mx = fmaxf(mx, fabsf(row[k]));
        }
        float s = mx / 127.0f, inv = mx > 0 ? 127.0f / mx : 0;
        for (size_t k = 0; k < K; k++) {
            float c = nearbyintf(row[k] * inv);
            c = c > 127 ? 127 : (c < -127 ? -127 : c);
            out->w[qs_w8_index(N, Kp, n, k)] = (int8_t)c;
        }
        out->scale[n] = s;
    }
    if (bad) {
        qs_w8_close(out);
        return qs_seterr(QS_EINVAL, "weights hold NaN or Inf: fix the checkpoint before "
                                    "quantizing it");
    }
    qs_w8_sums(out);
    return QS_OK;
}

void qs_w8_close(qs_w8 *w)
{
    if (!w)
        return;
    free(w->w);
    free(w->scale);
    free(w->sum);
    memset(w, 0, sizeof(*w));
}

int qs_w8_dequant(const qs_w8 *w, float *W)
{
    if (!w || !W || !w->w || !w->scale)
        return qs_seterr(QS_EINVAL, "qs_w8_dequant got a NULL pointer: quantize first and pass "
                                    "an N x K buffer");
    for (size_t n = 0; n < w->N; n++)
        for (size_t k = 0; k < w->K; k++)
            W[n * w->K + k] = w->scale[n] * (float)w->w[qs_w8_index(w->N, w->Kp, n, k)];
    return QS_OK;
}

/* Codes of one token row for scale inv (= 1/s); returns 1 if the row held a
 * NaN or Inf (its codes are then 0: a float->int of NaN is undefined in C). */
int qs_act_row(const float *x, size_t K, float inv, int8_t *xq)
{
    int bad = 0;
    for (size_t k = 0; k < K; k++) {
        float c = nearbyintf(x[k] * inv);
        if (!isfinite(x[k]))
            bad = 1, c = 0;
        c = c > 127 ? 127 : (c < -127 ? -127 : c);
        xq[k] = (int8_t)c;
    }
    return bad;
}

float qs_act_absmax(const float *x, size_t K)
{
    float mx = 0;
    for (size_t k = 0; k < K; k++)
        mx = fmaxf(mx, fabsf(x[k])); /* fmaxf skips NaN; qs_act_row flags it */
    return mx;
}

int qs_quant_act_token(const float *X, size_t M, size_t K, int8_t *xq, float *sx)
{
    if (!X || !xq || !sx || M == 0 || K == 0)
        return qs_seterr(QS_EINVAL, "qs_quant_act_token needs M x K activations, an M x K code "
                                    "buffer and M scales");
    for (size_t m = 0; m < M; m++) {
        float mx = qs_act_absmax(X + m * K, K);
        sx[m] = mx / 127.0f;
        if (qs_act_row(X + m * K, K, mx > 0 ? 127.0f / mx : 0, xq + m * K))
            sx[m] = NAN;
    }
    return QS_OK;
}

int qs_quant_act_static(const float *X, size_t M, size_t K, float scale, int8_t *xq)
{
    if (!X || !xq || M == 0 || K == 0 || !(scale > 0) || !isfinite(scale))
        return qs_seterr(QS_EINVAL,
                         "qs_quant_act_static needs M x K activations, a code buffer "
                         "and a finite positive scale (got %g)",
                         (double)scale);
    for (size_t m = 0; m < M; m++)
        qs_act_row(X + m * K, K, 1.0f / scale, xq + m * K);
    return QS_OK;
}
