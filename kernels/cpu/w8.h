/* w8.h: private helpers of the W8A8 code (not installed). */
#ifndef QS_W8_H
#define QS_W8_H

#include <stddef.h>
#include <stdint.h>

/* Position of weight (n, k) in the tiled W8 order (qs_kernels.h). */
static inline size_t qs_w8_index(size_t N, size_t Kp, size_t n, size_t k)
{
    size_t full = N / 8 * 8;
    if (n < full)
        return (n / 8) * 8 * Kp + (k / 4) * 32 + (n % 8) * 4 + k % 4;
    return full * Kp + (n - full) * Kp + k;
}

int qs_act_row(const float *x, size_t K, float inv, int8_t *xq);
float qs_act_absmax(const float *x, size_t K);

#endif
