/* quant.h: quant.c's per-(row, group) grid fits and the bit-plane packer,
 * private, so that GPTQ (gptq.c) fits its groups exactly as qs_bcq_quantize
 * and qs_rtn_quantize fit theirs (not installed). */
#ifndef QS_QUANT_H
#define QS_QUANT_H

#include <stddef.h>
#include <stdint.h>

#include "qs_kernels.h"

/* QS_OK, or QS_EINVAL naming the first non-finite weight of W (N x K). */
int qs_check_weights(const float *W, size_t N, size_t K);

/* Scratch for fitting groups of up to gs weights (one per thread). */
typedef struct qs_bcq_fitter qs_bcq_fitter;
qs_bcq_fitter *qs_bcq_fitter_new(size_t gs);
void qs_bcq_fitter_free(qs_bcq_fitter *f);

/* qs_bcq_quantize's fit of one group of gs weights w (gs <= the fitter's):
 * greedy and RTN seeds refined by alternating least squares, the better kept,
 * plain RTN if that is better still. alpha (q values) and z come out in fp16,
 * as stored; codes (gs) the code of each weight (bit i = plane i, 1 = +1). */
void qs_bcq_fit_group(qs_bcq_fitter *f, const float *w, size_t gs, unsigned q, unsigned iters,
                      uint8_t *codes, uint16_t *alpha, uint16_t *z);

/* RTN's grid for gs weights w (qs_rtn_quantize's scale and zero point) as a
 * BCQ point in fp16 (qs_bcq_from_rtn's alpha and z). */
void qs_rtn_grid(const float *w, size_t gs, unsigned q, uint16_t *alpha, uint16_t *z);

/* Writes per-element codes (N x K, bit i = plane i) into w's bit-planes. */
void qs_bcq_pack_codes(qs_bcq *w, const uint8_t *codes);

#endif
