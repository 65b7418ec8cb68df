/* The KV cache in int8 or int4 (qs_kernels.h, "KV cache quantization"):
 * the quantizer a CPU rank's rope_kv runs on each token's keys and values,
 * the dequantization its attention runs per cached row, and a float64
 * dequantization for the tests. The device's rule (kernels/cuda/kv_quant.cuh)
 * gives the same codes bit for bit on the same inputs: every step below is
 * one IEEE operation in fp32 (no fused multiply-add, divisions not
 * reciprocals) or an fp16 rounding to nearest even.
 *
 * Shapes: x, out [n][hd] fp32; codes [n][qs_kv_code_bytes(f, hd)];
 * sm [n][qs_kv_groups(hd)][2] fp16 (scale, minimum). */
#include "qs_kernels.h"

#include <math.h>
#include <string.h>

#define KV_F16_MAX 65504.0f

static unsigned kv_qmax(qs_kv_format f)
{
    return f == QS_KV_INT8 ? 255u : 15u;
}

size_t qs_kv_code_bytes(qs_kv_format f, size_t hd)
{
    switch (f) {
    case QS_KV_INT8:
        return hd;
    case QS_KV_INT4:
        return (hd + 1) / 2;
    default:
        return 0;
    }
}

size_t qs_kv_groups(size_t hd)
{
    return (hd + QS_KV_GROUP - 1) / QS_KV_GROUP;
}

static int kv_check(const char *who, qs_kv_format f, const void *a, const void *b, const void *c,
                    size_t n, size_t hd)
{
    if (f != QS_KV_INT8 && f != QS_KV_INT4)
        return qs_seterr(QS_EINVAL, "%s: KV format %d is not int8 (1) or int4 (2)", who, (int)f);
    if ((n && (!a || !b || !c)) || hd == 0 || hd > 65536 || n > ((size_t)1 << 40) / hd)
        return qs_seterr(QS_EINVAL,
                         "%s: %zu vectors of %zu values: pass arrays, and a head size of 1 to "
                         "65536",
                         who, n, hd);
    return QS_OK;
}

/* One group of len values: its (scale, minimum) and codes c[0..len). */
static void kv_group(const float *x, size_t len, unsigned qmax, uint8_t *c, uint16_t *sm)
{
    float lo = INFINITY, hi = -INFINITY;
    for (size_t j = 0; j < len; j++)
        lo = fminf(lo, x[j]), hi = fmaxf(hi, x[j]);
    /* Beyond fp16's range (never in a model an fp16 GPU runs): saturate. */
    lo = fminf(fmaxf(lo, -KV_F16_MAX), KV_F16_MAX);
    uint16_t m16 = qs_fp32_to_fp16(lo);
    float m = qs_fp16_to_fp32(m16);
    float s = (hi - m) / (float)qmax;
    s = s > 0.0f ? fminf(s, KV_F16_MAX) : 0.0f; /* NaN (no finite value) too */
    uint16_t s16 = qs_fp32_to_fp16(s);
    s = qs_fp16_to_fp32(s16);
    for (size_t j = 0; j < len; j++) {
        float q = s > 0.0f ? rintf((x[j] - m) / s) : 0.0f;
        c[j] = (uint8_t)fminf(fmaxf(q, 0.0f), (float)qmax);
    }
    sm[0] = s16, sm[1] = m16;
}

int qs_kv_quantize(qs_kv_format f, const float *x, size_t n, size_t hd, uint8_t *codes,
                   uint16_t *sm)
{
    int err = kv_check("qs_kv_quantize", f, x, codes, sm, n, hd);
    if (err)
        return err;
    size_t cb = qs_kv_code_bytes(f, hd), ng = qs_kv_groups(hd);
    unsigned qmax = kv_qmax(f);
    for (size_t i = 0; i < n; i++) {
        const float *xi = x + i * hd;
        uint8_t *ci = codes + i * cb, c[QS_KV_GROUP];
        for (size_t g = 0; g < ng; g++) {
            size_t j0 = g * QS_KV_GROUP, len = hd - j0 < QS_KV_GROUP ? hd - j0 : QS_KV_GROUP;
            kv_group(xi + j0, len, qmax, c, sm + (i * ng + g) * 2);
            if (f == QS_KV_INT8) {
                memcpy(ci + j0, c, len);
                continue;
            }
            /* int4: value 2j in the low nibble, 2j + 1 in the high; groups
             * start at even values, so a byte never straddles two. */
            for (size_t j = 0; j < len; j += 2)
                ci[(j0 + j) / 2] = (uint8_t)(c[j] | (j + 1 < len ? c[j + 1] << 4 : 0));
        }
    }
    return QS_OK;
}

static unsigned kv_code(qs_kv_format f, const uint8_t *c, size_t j)
{
    return f == QS_KV_INT8 ? c[j] : (c[j / 2] >> (4 * (j & 1))) & 15u;
}

int qs_kv_dequant(qs_kv_format f, const uint8_t *codes, const uint16_t *sm, size_t n, size_t hd,
                  float *out)
{
    int err = kv_check("qs_kv_dequant", f, codes, sm, out, n, hd);
    if (err)
        return err;
    size_t cb = qs_kv_code_bytes(f, hd), ng = qs_kv_groups(hd);
    for (size_t i = 0; i < n; i++) {
        const uint8_t *ci = codes + i * cb;
        for (size_t g = 0; g < ng; g++) {
            float s = qs_fp16_to_fp32(sm[(i * ng + g) * 2]);
            float m = qs_fp16_to_fp32(sm[(i * ng + g) * 2 + 1]);
            size_t j1 = (g + 1) * QS_KV_GROUP < hd ? (g + 1) * QS_KV_GROUP : hd;
            for (size_t j = g * QS_KV_GROUP; j < j1; j++)
                out[i * hd + j] = (float)kv_code(f, ci, j) * s + m;
        }
    }
    return QS_OK;
}

int qs_kv_dequant_f64(qs_kv_format f, const uint8_t *codes, const uint16_t *sm, size_t n, size_t hd,
                      double *out)
{
    int err = kv_check("qs_kv_dequant_f64", f, codes, sm, out, n, hd);
    if (err)
        return err;
    size_t cb = qs_kv_code_bytes(f, hd), ng = qs_kv_groups(hd);
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < hd; j++) {
            const uint16_t *p = sm + (i * ng + j / QS_KV_GROUP) * 2;
            out[i * hd + j] = (double)kv_code(f, codes + i * cb, j) * qs_fp16_to_fp32(p[0]) +
                              qs_fp16_to_fp32(p[1]);
        }
    return QS_OK;
}
