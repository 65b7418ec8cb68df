/* Linear layers in any scheme: the CPU formats (fp32, BCQ/RTN, W8A8, W4A4), their
 * sizes and their lifetime. The forward products are the devices' (ops_cpu.c,
 * ops_cuda.c). */
#include "model_internal.h"

#include <stdlib.h>
#include <string.h>

uint64_t qs_linear_bytes(const linear *l)
{
    size_t a = 0, b = 0, c = 0;
    switch (l->scheme) {
    case QS_SCHEME_FP16:
        a = l->N * l->K * sizeof(float);
        break;
    case QS_SCHEME_W8A8:
        a = qs_w8_bytes(l->N, l->K, l->w8.group);
        break;
    case QS_SCHEME_BCQ:
    case QS_SCHEME_RTN:
        qs_bcq_sizes(l->N, l->K, l->bcq.q, l->bcq.g, &a, &b, &c);
        break;
    case QS_SCHEME_W4A4:
        a = qs_w4_bytes(l->N, l->K, l->w4.ko, l->w4.group);
        break;
    }
    return a + b + c;
}

/* Takes ownership of W (N x K fp32) and stores it in the scheme's format. */
int qs_linear_set(linear *l, float *W, size_t N, size_t K, const qs_quant *q, unsigned iters,
                  const uint32_t *perm, size_t ko)
{
    l->N = N, l->K = K, l->scheme = q->scheme;
    int err = QS_OK;
    switch (q->scheme) {
    case QS_SCHEME_FP16:
        l->w32 = W;
        return QS_OK;
    case QS_SCHEME_W8A8:
        err = qs_w8_quantize(&l->w8, W, N, K, q->group_size);
        break;
    case QS_SCHEME_RTN:
        err = qs_bcq_from_rtn(&l->bcq, W, N, K, (unsigned)q->bits, q->group_size);
        break;
    case QS_SCHEME_BCQ:
        err = qs_bcq_quantize(&l->bcq, W, N, K, (unsigned)q->bits, q->group_size, iters);
        break;
    case QS_SCHEME_W4A4:
        /* Group 0 (one scale per row and token) as one group as wide as K. */
        err = qs_w4_quantize(&l->w4, W, N, K, perm, perm ? ko : 0,
                             q->group_size ? q->group_size : (K + 7) / 8 * 8);
        break;
    }
    free(W);
    return err;
}

int qs_linear_set_gptq(linear *l, float *W, size_t N, size_t K, const qs_quant *q, unsigned iters,
                       const uint32_t *perm, size_t ko, const float *H)
{
    int err;
    switch (q->scheme) {
    case QS_SCHEME_BCQ:
    case QS_SCHEME_RTN:
        err = qs_gptq_bcq(&l->bcq, W, N, K, H, (unsigned)q->bits, q->group_size, iters,
                          q->scheme == QS_SCHEME_RTN, NULL);
        break;
    case QS_SCHEME_W4A4:
        err = qs_gptq_w4(&l->w4, W, N, K, H, perm, perm ? ko : 0,
                         q->group_size ? q->group_size : (K + 7) / 8 * 8, NULL);
        break;
    default:
        return qs_linear_set(l, W, N, K, q, iters, perm, ko);
    }
    l->N = N, l->K = K, l->scheme = q->scheme;
    free(W);
    return err;
}

void qs_linear_close(linear *l)
{
    free(l->w32);
    qs_bcq_close(&l->bcq);
    qs_w8_close(&l->w8);
    qs_w4_close(&l->w4);
    free(l->bias);
    memset(l, 0, sizeof *l);
}

/* Y (M x N) = X (M x K) W^T (+ bias). */
