/* w4.h: private helpers of the W4A4 (Atom) code (not installed).
 *
 * Memory layout of qs_w4 (the kernels', kernels/cpu/w4a4.c):
 *   rows padded to Np = 16 * ceil(N / 16) (padding rows: code 0, scale 0),
 *   INT4 positions to K4p = 8 * ceil(K4 / 8), outliers to kop = 4 * ceil(ko / 4).
 *   w4: tiles of 16 rows; a tile is K4p / 8 blocks of 64 bytes; byte r * 4 + i
 *       of block b holds row r's codes at positions 8b + i (low nibble) and
 *       8b + 4 + i (high nibble), each stored as code + 8 (1..15; padding 8).
 *       So one 512-bit load is 16 rows x 4 positions twice: vpand gives the
 *       first four, vpsrlw + vpand the next four, each the u8 operand of one
 *       vpdpbusd whose int32 lanes are 16 finished row sums (a 256-bit path
 *       reads the two 8-row halves of a block separately).
 *   w8: tiles of 16 rows; a tile is kop / 4 blocks of 64 bytes, byte r * 4 + i
 *       of block b row r's code at position K4 + 4b + i (int8, padding 0).
 *   s4: [Np][ng] (the public [N][ng] then zero rows), s8, sum: [Np].
 *   sum[n]: sum of row n's outlier codes (the +128 offset of the outlier
 *       activations, see w4a4.c).
 */
#ifndef QS_W4_H
#define QS_W4_H

#include <stddef.h>
#include <stdint.h>

#include "qs_kernels.h"

#define QS_W4_ROWS 16 /* rows per tile */

/* Sizes derived from a qs_w4 (or a shape). */
typedef struct qs_w4_dims {
    size_t N, K, K4, ko, G;
    size_t Np, K4p, kop, ng; /* ng = ceil(K4 / G) int4 groups */
} qs_w4_dims;

/* The group the format uses: group (0 = 128) clamped to K4 rounded up to 8
 * (at least 8); the same ng either way, a canonical value in the struct. */
size_t qs_w4_group(size_t K4, size_t group);
/* Dimensions of a shape; QS_OK or QS_EINVAL/QS_EOVERFLOW with a message. */
int qs_w4_shape(size_t N, size_t K, size_t ko, size_t group, qs_w4_dims *d);
/* The scale of one (row, group) of n INT4 weights v by qs_w4_quantize's
 * clipping search, and their codes into c (n); 0 for a group of zeros.
 * GPTQ (gptq.c) fits its groups with it. */
float qs_w4_fit_group(const float *v, size_t n, int8_t *c);
/* Checks a quantized struct handed to a kernel and fills d. */
int qs_w4_check(const qs_w4 *w, const char *who, qs_w4_dims *d);

/* Byte of row n, INT4 position j < K4 in w4 (nibble (j >> 2) & 1). */
static inline size_t qs_w4_index(size_t K4p, size_t n, size_t j)
{
    return (n / QS_W4_ROWS) * QS_W4_ROWS * (K4p / 2) + (j / 8) * 64 + (n % QS_W4_ROWS) * 4 + j % 4;
}

/* Byte of row n, outlier i (position K4 + i) in w8. */
static inline size_t qs_w4_index8(size_t kop, size_t n, size_t i)
{
    return (n / QS_W4_ROWS) * QS_W4_ROWS * kop + (i / 4) * 64 + (n % QS_W4_ROWS) * 4 + i % 4;
}

/* INT4 code of row n, position j < K4. */
static inline int qs_w4_get4(const qs_w4 *w, size_t K4p, size_t n, size_t j)
{
    uint8_t b = w->w4[qs_w4_index(K4p, n, j)];
    return (int)((j >> 2) & 1 ? b >> 4 : b & 15) - 8;
}

/* One token's activation codes (the rule of qs_w4_quant_act, qs_kernels.h):
 * x is the token in original order, buf K floats of scratch, q4 gets the K4
 * INT4 codes and q8 the ko INT8 codes in position order, sx its ng group
 * scales and *sxo the outlier scale (0 when ko = 0). A token holding NaN or
 * Inf gets zero codes and NaN scales everywhere; returns 1 then, else 0. */
int qs_w4_act_token(const qs_w4 *w, const qs_w4_dims *d, const float *x, float *buf, int8_t *q4,
                    int8_t *q8, float *sx, float *sxo);

#endif
