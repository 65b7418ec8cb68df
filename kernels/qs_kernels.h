/* qs_kernels.h: the public header of kernels/, the bottom library of qshard.
 *
 * It holds the error convention every qshard library uses, the quantized
 * weight formats shared by the CPU and CUDA code, the quantizers and the
 * kernels. Nothing here knows about models, MPI or gRPC.
 */
#ifndef QS_KERNELS_H
#define QS_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Errors -------------------------------------------------------------
 * Every fallible function returns a qs_err: 0 on success, a negative code
 * otherwise. The sentence that says what went wrong and what to do is kept
 * per thread and read with qs_errmsg() right after the failing call.
 */
typedef enum qs_err {
    QS_OK = 0,
    QS_EINVAL = -1,     /* an argument is out of range or inconsistent */
    QS_ENOMEM = -2,     /* an allocation failed */
    QS_EIO = -3,        /* reading or writing a file failed */
    QS_EFORMAT = -4,    /* a file or message is malformed */
    QS_EOVERFLOW = -5,  /* a size computation would overflow */
    QS_ENOTSUP = -6,    /* valid, but not supported by this build or device */
    QS_ENODEV = -7,     /* no usable device (e.g. no GPU) */
    QS_ECOMM = -8,      /* a collective or a peer rank failed */
    QS_ENOTFOUND = -9,  /* a named thing (model, file, tensor) does not exist */
    QS_EEXIST = -10,    /* the thing already exists */
    QS_ENOFIT = -11,    /* it does not fit in the memory given */
    QS_EBUSY = -12,     /* the resource is in use or shutting down */
    QS_EINTERNAL = -13, /* a bug: an invariant did not hold */
    QS_ESTATE = -14     /* valid, but not in this state (e.g. the model is not loaded) */
} qs_err;

/* Short fixed name of a code, e.g. "invalid argument". */
const char *qs_strerror(int err);
/* The last message set on this thread (never NULL; "" when none). */
const char *qs_errmsg(void);
/* Sets this thread's message (printf format) and returns err, so that a
 * failing path reads: return qs_seterr(QS_EINVAL, "...", ...); */
int qs_seterr(int err, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void qs_clearerr(void);

/* ---- Devices ------------------------------------------------------------ */

/* Number of usable CUDA devices; 0 when the build has no CUDA or the machine
 * has no GPU (then qs_errmsg() says why, e.g. CUDA error 100). */
int qs_cuda_device_count(void);
/* 1 when the CUDA code runs on the CPU under the project's execution
 * harness (tests/cuda-emu) instead of a GPU: tests then pick shapes that
 * the emulator runs in seconds. */
int qs_cuda_emulated(void);

/* ---- fp16 ----------------------------------------------------------------
 * IEEE binary16 stored as uint16_t bits, round to nearest even, subnormals
 * and Inf/NaN kept. The formats below store scales this way so that the CPU
 * and CUDA code read the same bytes. */
uint16_t qs_fp32_to_fp16(float f);
float qs_fp16_to_fp32(uint16_t h);
/* count values widened to fp32 (F16C where the CPU has it). */
void qs_f16_to_f32_row(const uint16_t *h, size_t count, float *out);
/* Y (M x N, fp32) = X (M x K, fp32) W^T with W an N x K fp16 matrix, fp32
 * sums (kernels/cpu/f16gemm.c: a CPU rank's fp16 LM head), and its float64
 * reference. */
int qs_f16_gemm(const uint16_t *W, size_t N, size_t K, const float *X, size_t M, float *Y);
int qs_f16_gemm_ref_f64(const uint16_t *W, size_t N, size_t K, const float *X, size_t M, double *Y);

/* ---- KV cache quantization (kernels/cpu/kvquant.c) -------------------------
 * The KV cache in int8 or int4 (qctl load --kv-cache): each token's key
 * (after RoPE) and value vector of one KV head, hd values, is cut into groups
 * of QS_KV_GROUP consecutive dimensions (the last one shorter when hd is
 * ragged), each quantized asymmetrically with its own fp16 scale s and
 * minimum m, qmax = 255 (int8) or 15 (int4):
 *     m = fp16(min x),  s = fp16((max x - m) / qmax),
 *     c = clamp(rint((x - m) / s), 0, qmax)  (0 where s is 0),  x^ = c s + m,
 * each step one fp32 operation, so that the device's quantizer gives the
 * same codes bit for bit. Why groups of 32 and not one scale per head: keys
 * carry outlier channels, and at 4 bits one scale over 64 or 128 dimensions
 * leaves the others a few codes (Atom and KIVI group the cache for the same
 * reason); one layout for both widths keeps one kernel path. Bytes per value:
 * 1 + 4/32 (int8), 0.5 + 4/32 (int4), against 2 in fp16.
 * Layout of n vectors: codes [n][qs_kv_code_bytes(f, hd)], int8 one byte per
 * value, int4 two per byte (value 2j in the low nibble of byte j, 2j + 1 in
 * the high; an odd hd leaves the last high nibble 0); sm fp16
 * [n][qs_kv_groups(hd)][2], (s, m) per group. */
typedef enum qs_kv_format { QS_KV_FP16 = 0, QS_KV_INT8 = 1, QS_KV_INT4 = 2 } qs_kv_format;
#define QS_KV_GROUP 32
/* Code bytes of one vector (0 for fp16), and groups per vector. */
size_t qs_kv_code_bytes(qs_kv_format f, size_t hd);
size_t qs_kv_groups(size_t hd);
int qs_kv_quantize(qs_kv_format f, const float *x, size_t n, size_t hd, uint8_t *codes,
                   uint16_t *sm);
/* x^ = c s + m in fp32, and in float64 (the tests' reference). */
int qs_kv_dequant(qs_kv_format f, const uint8_t *codes, const uint16_t *sm, size_t n, size_t hd,
                  float *out);
int qs_kv_dequant_f64(qs_kv_format f, const uint8_t *codes, const uint16_t *sm, size_t n, size_t hd,
                      double *out);

/* ---- BCQ with offset (LUT-GEMM) ------------------------------------------
 * A weight matrix W of N rows (outputs) by K columns (inputs) is stored as
 *     W[n,k] ~= sum_{i=1..q} alpha[i,n,G(k)] * B_i[n,k] + z[n,G(k)],  B_i = +-1,
 * q = 1..8 bit-planes, G(k) = k / g the group of column k; g is a multiple of
 * 32 that divides K, or 0 for one group spanning the whole row (then K is
 * free). ngroups = K / g (1 when g == 0), nw = ceil(K / 32).
 *
 * Sizes, exact (the memory planner counts on them; see qs_bcq_sizes):
 *     bits   q * N * nw * 4 bytes    alpha  q * N * ngroups * 2 bytes
 *     z          N * ngroups * 2 bytes
 *
 * bits: one 32-bit word holds 32 consecutive columns of one row of one
 * plane: bit j of word w is column 32*w + j, 1 means +1 and 0 means -1; the
 * columns past K in the last word are 0. Word order: rows are cut in tiles
 * of 32 (the last tile holds the N % 32 rest); a tile's words are contiguous,
 * ordered [w][plane][slot]. In a full tile row r sits at slot
 *     ((r >> 1) & 3) << 3 | (r >> 4) << 2 | (r & 1) << 1 | (r >> 3) & 1
 * and in the last, partial tile at slot r. Why: the AVX2 kernel loads the 32
 * words of one (w, plane) as four 256-bit vectors, transposes them to bytes
 * with one shuffle and two unpacks per vector and looks each 4-bit nibble up
 * in a 16-entry table with vpshufb; this slot order makes the 32 results
 * come out in row order after its even/odd byte split, so no permute is left
 * in the inner loop or the epilogue. qs_bcq_word_index() computes it.
 *
 * alpha and z: fp16, tile by tile like the bits (32 rows, the last tile the
 * rest), within a tile alpha ordered [group][plane][row] and z [group][row].
 * Why: a tile's scales then stream contiguously next to its bits (ordered
 * [group][plane][row] over the whole matrix they were 384 scattered cache
 * misses per 32-row tile at 12288 x 12288 and halved the kernel's speed),
 * and the epilogue reads the 32 rows of one (group, plane) as one 64-byte
 * line. qs_bcq_alpha_index() and qs_bcq_z_index() compute the positions. */
typedef struct qs_bcq {
    size_t N, K;     /* rows (outputs), columns (inputs) */
    unsigned q;      /* bit-planes, 1..8 */
    size_t g;        /* group size in columns; 0 = the whole row */
    uint32_t *bits;  /* q * N * nw words, order above */
    uint16_t *alpha; /* fp16, q * N * ngroups, order above */
    uint16_t *z;     /* fp16, N * ngroups, order above */
} qs_bcq;

#define QS_BCQ_TILE 32 /* rows per tile in the word order */

/* Checks a shape and returns QS_OK or QS_EINVAL/QS_EOVERFLOW with a message. */
int qs_bcq_check(size_t N, size_t K, unsigned q, size_t g);
/* Byte sizes of the three arrays (any pointer may be NULL). */
int qs_bcq_sizes(size_t N, size_t K, unsigned q, size_t g, size_t *bits_bytes, size_t *alpha_bytes,
                 size_t *z_bytes);
/* Number of groups: K / g, or 1 when g == 0. */
size_t qs_bcq_ngroups(size_t K, size_t g);
/* Allocates the arrays (bits zeroed, alpha and z zero); qs_bcq_close frees
 * them and is safe on a zeroed or closed struct. */
int qs_bcq_init(qs_bcq *w, size_t N, size_t K, unsigned q, size_t g);
void qs_bcq_close(qs_bcq *w);
/* Index into w->bits of the word of plane i (0-based), row n, word wi. */
size_t qs_bcq_word_index(const qs_bcq *w, unsigned i, size_t n, size_t wi);
/* Index into w->alpha of plane i, row n, group gi; into w->z of row n, group gi. */
size_t qs_bcq_alpha_index(const qs_bcq *w, unsigned i, size_t n, size_t gi);
size_t qs_bcq_z_index(const qs_bcq *w, size_t n, size_t gi);
/* Dequantizes to a row-major N x K matrix (fp32 or fp64). */
int qs_bcq_dequant(const qs_bcq *w, float *W);
int qs_bcq_dequant_f64(const qs_bcq *w, double *W);

/* ---- Uniform RTN ----------------------------------------------------------
 * Asymmetric round-to-nearest per row and group of g columns (g as above):
 *     s = (max - min) / (2^q - 1), zp = round(-min / s),
 *     c = clamp(round(w / s) + zp, 0, 2^q - 1),  w^ = s * (c - zp).
 * Stored as BCQ exactly: with c = sum_i 2^(i-1) c_i and B_i = 2 c_i - 1,
 *     w^ = sum_i (s 2^(i-1) / 2) B_i + s ((2^q - 1) / 2 - zp),
 * so alpha_i = s 2^(i-1) / 2 and z = s ((2^q - 1) / 2 - zp), one kernel for
 * both; only the fp16 rounding of alpha and z differs from plain RTN. */
typedef struct qs_rtn {
    size_t N, K;
    unsigned q;
    size_t g;
    uint8_t *codes; /* N x K codes in 0..2^q-1 */
    float *scale;   /* [N][ngroups] */
    float *zero;    /* [N][ngroups] zero points zp (integers stored as float) */
} qs_rtn;

int qs_rtn_quantize(qs_rtn *out, const float *W, size_t N, size_t K, unsigned q, size_t g);
void qs_rtn_close(qs_rtn *r);
int qs_rtn_dequant(const qs_rtn *r, float *W);
/* RTN-quantizes W and writes it into out (initialized here) as BCQ. */
int qs_bcq_from_rtn(qs_bcq *out, const float *W, size_t N, size_t K, unsigned q, size_t g);

/* Non-uniform BCQ: per row and group, greedy init (residual sign, alpha =
 * mean |r|), then alternating refinement: least-squares alpha and z for the
 * bits, then the best of the 2^q levels per weight for alpha and z, until the
 * error stops falling or max_iters (0: default 20). The RTN point is refined
 * the same way and the better of the two kept, so the result is never worse
 * than RTN in that error. The error is the squared error; for q <= 3 each
 * weight's is scaled by 1 + (w - mean)^2 / var of its group, so that the fit
 * does not clip the few large weights (plain MSE did, and collapsed
 * SmolLM2-135M at 3 bits row-wise). out is initialized here. */
int qs_bcq_quantize(qs_bcq *out, const float *W, size_t N, size_t K, unsigned q, size_t g,
                    unsigned max_iters);

/* ---- SmoothQuant ----------------------------------------------------------
 * s_j = max|X_j|^a / max|W_j|^(1-a), clamped to [1e-5, 1e5], from the
 * per-input-channel activation abs-max act_absmax[K] and the weights W[l]
 * (N[l] x K, row-major) of the nlin linears fed by the same norm. A channel
 * with no activation or no weight gets s_j = 1. */
int qs_smooth_scales(const float *act_absmax, size_t K, const float *const *W, const size_t *N,
                     size_t nlin, float a, float *s);
/* Folds s: norm_weight[j] and norm_bias[j] (bias may be NULL) divided by
 * s_j, column j of every W[l] multiplied by s_j; fp32 outputs are unchanged
 * up to rounding. */
int qs_smooth_fold(float *norm_weight, float *norm_bias, size_t K, float *const *W, const size_t *N,
                   size_t nlin, const float *s);

/* ---- W8A8 -----------------------------------------------------------------
 * INT8 weights per output channel (symmetric, fp32 scale, codes -127..127),
 * INT8 activations per token in groups of G input channels (dynamic: one
 * scale per token and group; G = K is the classic per-token scale) or per
 * tensor (static), int32 sums per group:
 *     Y[m,n] = sw[n] * sum_g sx[m,g] * sum_{k in g} xq[m,k] wq[n,k].
 * Groups keep one channel with a large activation (SwiGLU outputs carry
 * some 50x the typical magnitude) from flattening every other channel of
 * its token to a few codes; Atom groups activations the same way.
 * Weight order: rows in tiles of 8; a full tile is [k/4][row][k%4] (8 rows x
 * 4 bytes = one 256-bit vector per 4 columns, what vpdpbusd/vpmaddubsw want),
 * the last N % 8 rows row-major; K is padded with zeros to Kp = 4*ceil(K/4).
 * Bytes: N * Kp (codes) + N * 4 (scales) + N * 4 * ceil(K/G) (row sums per
 * group, for the u8 offset trick of VNNI). */
typedef struct qs_w8 {
    size_t N, K, Kp;
    size_t group; /* activation group G: a multiple of 4, <= Kp; Kp = per token */
    int8_t *w;    /* N * Kp codes, order above */
    float *scale; /* [N] */
    int32_t *sum; /* [ceil(K/G)][N] sum_{k in g} wq[n,k] */
} qs_w8;

/* act_group: channels per activation scale, a multiple of 4; 0 or >= K
 * means one scale per token. */
int qs_w8_quantize(qs_w8 *out, const float *W, size_t N, size_t K, size_t act_group);
void qs_w8_close(qs_w8 *w);
size_t qs_w8_bytes(size_t N, size_t K, size_t act_group);
/* The group the kernels use for act_group: act_group, or Kp (= 4*ceil(K/4))
 * for one scale per token (0 or >= K); and the groups per token, ceil(K / G). */
size_t qs_w8_group(size_t K, size_t act_group);
size_t qs_w8_groups(size_t K, size_t act_group);
/* Fills w->sum from the codes (after the codes are in place). */
void qs_w8_sums(qs_w8 *w);
int qs_w8_dequant(const qs_w8 *w, float *W);
/* Activation quantization, row-major M x K -> int8 M x K: per token
 * (sx[m] = max|X[m,:]| / 127) or per tensor with a given static scale
 * (values clamped to +-127). */
int qs_quant_act_token(const float *X, size_t M, size_t K, int8_t *xq, float *sx);
int qs_quant_act_static(const float *X, size_t M, size_t K, float scale, int8_t *xq);

/* ---- W4A4 (Atom) -----------------------------------------------------------
 * Input channels reordered offline: perm[j] is the original input channel at
 * position j, and the ko channels with the largest calibration activations
 * come last. Positions j < K4 = K - ko: INT4 weights and activations,
 * symmetric (codes -7..7), the weights with an fp32 scale per row and group of
 * G positions (the last group ragged; a clipping search picks each scale:
 * clip ratios 1.00, 0.99, ..., 0.70 of the group's max, the least squared
 * error kept), the activations quantized dynamically per token and group.
 * Positions j >= K4 (the outliers): INT8 weights per row (swo = max / 127,
 * codes -127..127) and INT8 activations per token:
 *   Y[m,n] = sum_g sx[m,g] sw[n,g] sum_{j in g} xq[m,j] wq[n,j]
 *          + sxo[m] swo[n] sum_{j >= K4} xq[m,j] wq[n,j].
 *
 * Activation codes (the rule a GPU reproduces bit for bit), per token, for
 * each INT4 group (qmax = 7) and for the outlier positions (qmax = 127),
 * on x_j = X[m, perm[j]] in fp32:
 *   max = the largest |x_j| (NaN skipped), scale = max / qmax (fp32 division),
 *   inv = max > 0 ? qmax / max : 0 (an IEEE fp32 division, not a fast
 *         reciprocal; Inf when max < qmax / FLT_MAX),
 *   code = clamp(nearbyintf(x_j * inv), -qmax, qmax): the fp32 product
 *         (CUDA __fmul_rn) rounded to an integer, ties to even (rintf); a
 *         NaN product (0 * Inf) gives code 0.
 * A token holding NaN or Inf: every code 0 and every scale (sx and sxo)
 * NaN, so its outputs are NaN. A zero token: codes 0, scales 0, outputs 0.
 * sxo is 0 when ko = 0 (unless NaN).
 *
 * The codes' memory order is the CPU kernel's (kernels/cpu/w4.h: 16-row
 * tiles, INT4 codes as nibbles w + 8); qs_w4_codes reads them out in a plain
 * order. s4 and s8 are plain arrays, readable as documented below; their
 * rows past N (up to a multiple of 16) are zeros. */
typedef struct qs_w4 {
    size_t N, K, ko, group; /* K4 = K - ko; group: G, a multiple of 8 */
    uint32_t *perm;         /* [K] */
    uint8_t *w4;            /* INT4 codes, two per byte (kernel order); NULL when K4 = 0 */
    float *s4;              /* [N][ceil(K4 / group)]; NULL when K4 = 0 */
    int8_t *w8;             /* outlier codes (kernel order); NULL when ko = 0 */
    float *s8;              /* [N]; NULL when ko = 0 */
    int32_t *sum;           /* [N] sums of each row's outlier codes (the VNNI offset
                               of the outliers); NULL when ko = 0 */
} qs_w4;

/* W (N x K, original channel order) quantized as above. perm NULL = identity;
 * ko 0 = no outliers; group 0 = 128; a group is clamped to K4 rounded up to 8
 * (at least 8), which changes nothing but the value stored. NaN or Inf
 * weights: QS_EINVAL. */
int qs_w4_quantize(qs_w4 *out, const float *W, size_t N, size_t K, const uint32_t *perm, size_t ko,
                   size_t group);
/* From codes chosen elsewhere (GPTQ, a checkpoint): codes N x K in position
 * order (-7..7 before K4, -127..127 after), s4 [N][ceil(K4/G)] (may be NULL
 * when ko = K), s8 [N] (may be NULL when ko = 0), scales finite and >= 0.
 * Everything is checked: QS_EINVAL names the first bad value. */
int qs_w4_from_codes(qs_w4 *out, const int8_t *codes, const float *s4, const float *s8, size_t N,
                     size_t K, const uint32_t *perm, size_t ko, size_t group);
/* The codes N x K in position order (the inverse of qs_w4_from_codes). */
int qs_w4_codes(const qs_w4 *w, int8_t *codes);
/* Frees the arrays; safe on a zeroed or closed struct. */
void qs_w4_close(qs_w4 *w);
/* Bytes of the format as allocated (codes, scales, sums, perm; rows padded
 * to 16, K4 to 8, ko to 4); 0 on overflow or a bad shape. */
size_t qs_w4_bytes(size_t N, size_t K, size_t ko, size_t group);
/* N x K fp32 in the original channel order. */
int qs_w4_dequant(const qs_w4 *w, float *W);
/* Activation codes by the rule above: X (M x K, original order) read
 * through perm into xq (M x K, position order: K4 INT4 codes, then ko INT8
 * codes), sx [M][ceil(K4/G)] (may be NULL when ko = K), sxo [M]. */
int qs_w4_quant_act(const qs_w4 *w, const float *X, size_t M, int8_t *xq, float *sx, float *sxo);
/* Y (M x N) = X (M x K, original order) W^T with the activation quantization
 * fused (kernels/cpu/w4a4.c); and its float64 reference on the same
 * activation codes (qs_w4_quant_act's and qs_w4_codes's, exact integer
 * sums, the scales applied in double). */
int qs_w4a4_gemm(const qs_w4 *w, const float *X, size_t M, float *Y);
int qs_w4a4_gemm_ref_f64(const qs_w4 *w, const float *X, size_t M, double *Y);

/* ---- GPTQ -----------------------------------------------------------------
 * The calibration-aware quantizer of GPTQ (Frantar et al., 2022): input
 * columns are rounded one at a time, each to the nearest level of its row's
 * grid, and the rounding error of each is moved onto the columns not yet
 * rounded so as to minimise the layer's output error ||X W^T - X Wq^T||_F
 * over calibration inputs X, through H = X^T X. Any weight grid: the grid
 * of a group of columns is fitted when the group's first column comes up,
 * from its columns' weights as updated by then (kernels/cpu/gptq.c has the
 * algorithm, its shapes and costs).
 *
 * H: K x K fp32, symmetric; only its upper triangle (H[i][j], j >= i) is
 * read. Before factoring, a channel with H[j][j] == 0 (never active in the
 * calibration) gets weight 0 and H[j][j] = 1, and damp * mean(diag H) is
 * added to the diagonal. A non-finite entry, a negative or all-zero
 * diagonal, or an H not positive definite after damping is QS_EINVAL; on
 * any failure the output struct is left empty (closing it is safe). */

/* H (K x K) += X^T X over the M tokens of X (M x K row-major), sums in fp32;
 * call once per calibration batch on the same H (start from zeros). Writes
 * the whole of H (its lower triangle as the mirror of the upper). */
int qs_hessian_add(float *H, const float *X, size_t M, size_t K);

typedef struct qs_gptq_opts {
    double damp; /* fraction of the mean diagonal added to it; 0 = 0.01 (the paper's) */
    float *Wq;   /* NULL, or N x K: the quantized weights chosen (original column
                  * order), equal to the output format's dequantization bit for bit */
} qs_gptq_opts;

/* GPTQ onto BCQ with offset (the qs_bcq layout, out initialized here):
 * uniform 0: q alphas and an offset per row and group of g columns, fitted
 * as qs_bcq_quantize fits them (iters as its max_iters, 0: 20); uniform 1:
 * RTN's asymmetric grid (qs_rtn_quantize's scale and zero point) written as
 * qs_bcq_from_rtn writes it. q, g as qs_bcq_check; opts NULL: defaults. */
int qs_gptq_bcq(qs_bcq *out, const float *W, size_t N, size_t K, const float *H, unsigned q,
                size_t g, unsigned iters, int uniform, const qs_gptq_opts *opts);
/* The float64 reference: the paper's steps unblocked (Cholesky of H,
 * inverse, Cholesky of the inverse; every column's error applied to all
 * later columns at once), the same grids; Wq (N x K) the weights chosen. */
int qs_gptq_bcq_ref_f64(const float *W, size_t N, size_t K, const float *H, unsigned q, size_t g,
                        unsigned iters, int uniform, double damp, float *Wq);
/* GPTQ onto W4A4 (the qs_w4 format, out initialized here; perm, ko and
 * group as qs_w4_quantize): columns in position order; each INT4 group's
 * scale per row by qs_w4_quantize's clipping search on the updated weights,
 * the outliers' INT8 scale per row (max / 127) set once from the original
 * weights. H in the original channel order. */
int qs_gptq_w4(qs_w4 *out, const float *W, size_t N, size_t K, const float *H, const uint32_t *perm,
               size_t ko, size_t group, const qs_gptq_opts *opts);
/* Its float64 reference, as qs_gptq_bcq_ref_f64's. */
int qs_gptq_w4_ref_f64(const float *W, size_t N, size_t K, const float *H, const uint32_t *perm,
                       size_t ko, size_t group, double damp, float *Wq);

/* ---- Kernels (CPU, fp32 activations; OpenMP over output rows) -------------
 * All GEMMs: X is M x K row-major, Y is M x N row-major, Y = X W^T. */

/* LUT-GEMM over BCQ weights, M = 1..64 (larger M runs in chunks of 64).
 * Allocates its tables per call: min(M, 64) x 4 x ceil(K/32) x 16 bytes. */
int qs_lutgemm(const qs_bcq *w, const float *X, size_t M, float *Y);
/* The paper's variant: mu = 8 fp32 tables, no table quantization (fp32
 * rounding only), scalar reads; slower, the accuracy-first choice. */
int qs_lutgemm_f32(const qs_bcq *w, const float *X, size_t M, float *Y);
/* Its float64 reference: the dequantized weights times X in double. */
int qs_lutgemm_ref_f64(const qs_bcq *w, const float *X, size_t M, double *Y);
/* Per-output bound on |qs_lutgemm - reference| from the int8 tables (one
 * entry per element of E, M x N): sum_i sum_blocks |alpha| * nl * s / 2,
 * with nl look-ups per block and s the block's table scale. */
int qs_lutgemm_err_bound(const qs_bcq *w, const float *X, size_t M, double *E);

/* W8A8 GEMM with the activation quantization fused: act_scale <= 0 means
 * dynamic per token and group (w->group), > 0 the static per-tensor scale. */
int qs_w8a8_gemm(const qs_w8 *w, const float *X, size_t M, float act_scale, float *Y);
/* Its float64 reference: the same activation codes, exact integer dot
 * products, the scales applied in double. */
int qs_w8a8_gemm_ref_f64(const qs_w8 *w, const float *X, size_t M, float act_scale, double *Y);

/* Which SIMD path the kernels take: "avx512" (LUT-GEMM with AVX-512 BW and
 * VBMI, W4A4 with AVX-512 VNNI where the CPU has it, else as avxvnni; W8A8
 * as avxvnni), "avxvnni", "avx2" or "scalar". force:
 * NULL = best available, else one of those names (for tests and qbench;
 * process-wide, not to be called while kernels run on other threads). */
const char *qs_cpu_path(void);
int qs_cpu_force_path(const char *force);

/* ---- GPU kernels (kernels/cuda/, built where nvcc exists) ---------------
 * The GPU kernels for the BCQ-with-offset format (LUT-GEMM), the
 * fused dequantize + tensor-core path for larger batches, and the two
 * baselines the LUT-GEMM paper compares with (cuBLAS fp16 on dequantized
 * weights; an OPTQ-style dequantizing 3-bit GEMV). Plain C, no CUDA headers:
 * device pointers are void *, streams are cudaStream_t passed as void *
 * (NULL = the legacy default stream).
 *
 * All GEMMs: X is M x K fp16 row-major, Y is M x N fp16 row-major, both in
 * device memory, Y = X W^T, products and sums in fp32, Y rounded once.
 * Every function returns a qs_err (QS_ENODEV / QS_EINTERNAL with the CUDA
 * error string in qs_errmsg(), QS_EINVAL for bad arguments). Launches are
 * asynchronous on the stream; launch errors are checked, execution errors
 * surface at the next synchronizing call (qs_cuda_sync). */

/* ---- Small device helpers (for tests and benchmarks written in C) -------- */
int qs_cuda_malloc(void **p, size_t bytes);
void qs_cuda_free(void *p); /* NULL is fine */
int qs_cuda_h2d(void *dst, const void *src, size_t bytes);
int qs_cuda_d2h(void *dst, const void *src, size_t bytes);
/* Sets every byte to v (0xFF makes every fp16 a NaN: output poisoning). */
int qs_cuda_memset(void *p, int v, size_t bytes);
/* cudaDeviceSynchronize + the last error, as a qs_err. */
int qs_cuda_sync(void);
/* Multiprocessor count of the current device (0 and a message on error). */
int qs_cuda_sm_count(void);

/* ---- BCQ weights on the device --------------------------------------------
 * The host qs_bcq is re-ordered at upload for coalesced 16-byte loads:
 *
 *   bits   uint4 (4 x uint32) [nc][q][N]: nc = ceil(nw / 4) chunks of 128
 *          columns; element (c, i, n) holds words 4c..4c+3 of plane i of row
 *          n (bit j of word w = column 32w + j, 1 = +1, as on the host);
 *          words past nw are 0.
 *   alpha  fp16 [ngroups][q][N]      z  fp16 [ngroups][N]
 *
 * Why: a warp's 32 threads own 32 consecutive rows, so one plane of one
 * 128-column chunk is one 512-byte coalesced load (16 bytes per thread,
 * LDG.128), and the scales of one (group, plane) are 64 contiguous bytes.
 * The host's 32-row tile order serves the AVX2 byte transpose and would cost
 * a gather on the GPU. The tensor-core path reads the same arrays (a tile of
 * 64 rows x 128 columns is q contiguous 1 KiB runs). Bytes on the device:
 * q*N*4*nc*4 + (q+1)*N*ngroups*2, at most 96 columns per row of padding over
 * the host size (none when K is a multiple of 128).
 *
 * Each handle owns a split-K workspace of QS_CUDA_WS_ROWS * N fp32 (so at
 * most QS_CUDA_WS_ROWS / M K-splits; 6 MiB at N = 12288): calls on one
 * handle must be ordered (one stream, or synced). */
#define QS_CUDA_WS_ROWS 128
typedef struct qs_cuda_bcq {
    size_t N, K;
    unsigned q;
    size_t g;       /* 0 = whole row */
    size_t ngroups; /* K / g, or 1 */
    size_t nw, nc;  /* words per row, 128-column chunks per row */
    void *bits;     /* uint4 [nc][q][N] */
    void *alpha;    /* fp16 [ngroups][q][N] */
    void *z;        /* fp16 [ngroups][N] */
    void *ws;       /* fp32 workspace, QS_CUDA_WS_ROWS * N */
    size_t bytes;   /* device bytes of bits + alpha + z */
} qs_cuda_bcq;

/* Bytes of the three device arrays for a shape (0 on an invalid shape). */
size_t qs_cuda_bcq_bytes(size_t N, size_t K, unsigned q, size_t g);
/* Host-side re-ordering into the device layout (arrays sized as above);
 * exposed so that the layout can be checked without a GPU. */
int qs_cuda_bcq_pack(const qs_bcq *w, uint32_t *bits, uint16_t *alpha, uint16_t *z);
/* Allocates device arrays for a shape (contents undefined). */
int qs_cuda_bcq_alloc(qs_cuda_bcq *d, size_t N, size_t K, unsigned q, size_t g);
/* Allocates and copies a host qs_bcq into the device layout. */
int qs_cuda_bcq_upload(qs_cuda_bcq *d, const qs_bcq *w);
/* Random contents for benchmarks: random bits (0 past K), alpha in
 * [0.005, 0.015) / 2^(q-1-i), z in [-0.01, 0.01). Deterministic in seed. */
int qs_cuda_bcq_fill_random(qs_cuda_bcq *d, uint64_t seed, void *stream);
/* Frees; safe on a zeroed or freed struct. */
void qs_cuda_bcq_free(qs_cuda_bcq *d);
/* Dequantizes into a row-major N x K fp16 device matrix (for cuBLAS). */
int qs_cuda_bcq_dequant_f16(const qs_cuda_bcq *d, void *W, void *stream);

/* ---- LUT-GEMM (batch M = 1..8) ----------------------------------------------
 * mu = 8: per 128-column slice, each CTA builds 16 tables of the 256 signed
 * sums of 8 inputs (fp32, [chunk][pattern][m]) in shared memory once, and
 * all its rows (one per thread) read them; K is split across CTAs, partial
 * sums reduced in a second kernel. Tile sizes are template parameters; the
 * chooser picks them from (M, N, K, q) and the SM count. */
typedef struct qs_cuda_lut_cfg {
    unsigned threads;     /* rows per CTA = threads: 128 or 256 */
    unsigned splits;      /* K splits (CTAs along K), 1..64/M, <= 128-column slices */
    unsigned half_tables; /* 1: fp16 tables, tokens in pairs (half the shared memory
                             and look-up traffic; entries rounded to fp16, ~3e-4
                             relative); ignored at M = 1. The chooser says 0. */
} qs_cuda_lut_cfg;

/* The chooser (pure host code; sm_count 0 = ask the device). */
int qs_cuda_lut_choose(size_t M, size_t N, size_t K, unsigned q, int sm_count,
                       qs_cuda_lut_cfg *cfg);
/* Y = X W^T for M = 1..8. cfg NULL = the chooser's pick. */
int qs_cuda_lutgemm(qs_cuda_bcq *w, const void *X, size_t M, void *Y, void *stream,
                    const qs_cuda_lut_cfg *cfg);
/* The LUT kernel's algorithm run on the host (same layout, table builder,
 * look-ups, split order; fp32 X and Y, no device): checks the layout and
 * the table arithmetic where no GPU is present. */
int qs_cuda_lutgemm_emulate(const qs_bcq *w, const float *X, size_t M, unsigned splits,
                            int half_tables, float *Y);

/* ---- Fused dequantize + tensor cores (any M; meant for M > 8) ---------------
 * Per CTA (8 warps) a tile of W (128 rows for bm = 16, 64 for bm = 64) x 128
 * columns is dequantized from the bit-planes into shared memory as fp16 and
 * multiplied with WMMA (HMMA m16n16k16, fp32 accumulators); no fp16 copy of
 * W exists in device memory. bm: 16 or 64 rows of X per CTA, 0 = choose (16
 * when M <= 16). splits: K-splits (partial sums reduced as in LUT-GEMM),
 * 0 = choose (qs_cuda_mma_splits); splits * M <= QS_CUDA_WS_ROWS. */
int qs_cuda_bcq_gemm_mma(qs_cuda_bcq *w, const void *X, size_t M, void *Y, void *stream,
                         unsigned bm, unsigned splits);
/* The K-splits the tensor-core path picks (sm_count 0 = ask the device). */
int qs_cuda_mma_splits(size_t M, size_t N, size_t K, unsigned bm, int sm_count);

/* The serving entry: LUT-GEMM for M <= the crossover (default 2), the
 * tensor-core path above it. */
int qs_cuda_bcq_matmul(qs_cuda_bcq *w, const void *X, size_t M, void *Y, void *stream);
/* Sets the crossover (0..8; 0 = always the tensor-core path), process-wide;
 * qbench_gpu reports both paths at M <= 8 to pick it per device. */
int qs_cuda_set_lut_max_m(unsigned m);

/* ==== The device forward pass (kernels/cuda; docs/architecture.md) ==========
 * What shard/'s layer loop calls on a GPU rank, each the counterpart of a CPU
 * operation (shard/ops_cpu.c) that its cuda-emu test compares it with.
 * Activations are fp16 [token][width] row-major, but the residual stream x
 * stays fp32; weights of norms, embeddings and the LM head are fp16. Index
 * arrays (tokens, slots, positions) are device arrays. Every call only
 * enqueues work on `stream` (NULL: the default stream): no host
 * synchronisation, no allocation, and launch shapes that depend on sizes,
 * never on the values in device arrays, so that one decode step can be
 * captured in a CUDA graph and replayed with new tokens and positions.
 * QS_EINVAL for bad shapes, QS_ENODEV/QS_EINTERNAL with CUDA's message. */

/* Copies on a stream (host memory pageable or pinned), and the wait for
 * one; a NULL stream is the default stream. */
int qs_cuda_h2d_async(void *dst, const void *src, size_t bytes, void *stream);
int qs_cuda_d2h_async(void *dst, const void *src, size_t bytes, void *stream);
int qs_cuda_stream_sync(void *stream);
/* Pinned host memory (what copies inside a CUDA graph need). */
int qs_cuda_host_alloc(void **p, size_t bytes);
void qs_cuda_host_free(void *p);
/* Stream capture into a CUDA graph: begin, then end into an executable
 * graph (*exec; NULL with an error when the capture failed: it is then
 * abandoned), launched as often as wanted on a stream, and freed. */
int qs_cuda_graph_begin(void *stream);
int qs_cuda_graph_end(void *stream, void **exec);
int qs_cuda_graph_launch(void *exec, void *stream);
void qs_cuda_graph_free(void *exec);
/* Device-to-device copy bandwidth in GB/s (bytes read plus written, the
 * median of 5 copies of `bytes`, as qbench_gpu measures it): the floor
 * that memory-bound kernels are held to. 0 and a message on error. */
double qs_cuda_copy_bandwidth(size_t bytes);
/* Y (n x N fp16) += bias (fp16 [N]), row by row. */
int qs_cuda_add_bias(void *Y, const void *bias, size_t n, size_t N, void *stream);

/* x (n x H fp32) += d (n x H fp16, or NULL: nothing added); then y (n x H
 * fp16) = LayerNorm(x) * w + b when b is non-NULL, else RMSNorm(x) * w
 * (x / sqrt(mean(x^2) + eps)); w, b fp16 [H]; sums in fp32. post != 0
 * (post-LN, OPT-350m): x = that normalised row as well (fp32). */
int qs_cuda_add_norm(float *x, const void *d, const void *w, const void *b, size_t n, size_t H,
                     float eps, int post, void *y, void *stream);
/* The same, and y's W8A8 activation codes (its fp16 values quantized per
 * token and group, the CPU's rule) into a (qs_cuda_w8_act of H channels, at
 * least n rows). QS_ENOTSUP when a's groups are too many for one CTA's
 * shared memory (over QS_CUDA_NORM_W8_MAX_GROUPS): use qs_cuda_add_norm and the GEMM's own
 * quantization. */
#define QS_CUDA_NORM_W8_MAX_GROUPS 6144
struct qs_cuda_w8_act;
int qs_cuda_add_norm_w8(float *x, const void *d, const void *w, const void *b, size_t n, size_t H,
                        float eps, int post, void *y, struct qs_cuda_w8_act *a, void *stream);
/* The same, and y's W4A4 activation codes (y's fp16 values read through
 * a's permutation and quantized as qs_w4_quant_act does) into a
 * (qs_cuda_w4_act of H channels, at least n rows), so that the W4A4 GEMMs
 * reading y (qs_cuda_w4a4_gemm_act) skip their own quantization. The row is
 * staged in shared memory: QS_ENOTSUP over QS_CUDA_NORM_W4_MAX_H channels
 * (use qs_cuda_add_norm and qs_cuda_w4_quant_act). */
#define QS_CUDA_NORM_W4_MAX_H 16384
struct qs_cuda_w4_act;
int qs_cuda_add_norm_w4(float *x, const void *d, const void *w, const void *b, size_t n, size_t H,
                        float eps, int post, void *y, struct qs_cuda_w4_act *a, void *stream);
/* x (fp32) += d (fp16), count elements. */
int qs_cuda_add_f16(float *x, const void *d, size_t count, void *stream);
/* Conversions of count elements. */
int qs_cuda_f32_to_f16(const float *x, size_t count, void *y, void *stream);
int qs_cuda_f16_to_f32(const void *x, size_t count, float *y, void *stream);

/* RoPE, then the KV cache. q (n x hq*hd) and k (n x hkv*hd), fp16, are
 * rotated in place at each token's position pos[i] with cs (fp32
 * [positions][hd/2][cos, sin], the CPU's table; NULL: no rotation, OPT),
 * on pairs (2j, 2j+1) when adjacent (GGUF) else (j, j + hd/2) (Hugging
 * Face). Then token i's rows of k and v go to the caches at (slot[i],
 * pos[i]): kc, vc fp16 [slots][max_seq][hkv*hd], one layer's. */
int qs_cuda_rope_kv(void *q, void *k, const void *v, size_t n, unsigned hq, unsigned hkv,
                    unsigned hd, const float *cs, int adjacent, const uint32_t *slot,
                    const uint32_t *pos, void *kc, void *vc, unsigned max_seq, void *stream);

/* One layer's KV cache in any format (qs_kv_format): fp16 rows, or int8/int4
 * codes with their fp16 (scale, minimum) pairs in qs_kv_quantize's layout;
 * row (slot, pos) holds the hkv heads' vectors one after another. Every
 * array 16-byte aligned. */
typedef struct qs_cuda_kv {
    int format;    /* qs_kv_format */
    void *k, *v;   /* fp16 [slots][max_seq][hkv*hd], or codes
                    * [slots][max_seq][hkv][qs_kv_code_bytes(format, hd)] */
    void *ks, *vs; /* int8/int4: fp16 [slots][max_seq][hkv][qs_kv_groups(hd)][2]; fp16: unused */
} qs_cuda_kv;
/* qs_cuda_rope_kv into a cache of any format: int8/int4 quantize the rotated
 * k rows (as rounded to fp16) and v's rows with qs_kv_quantize's rule, the
 * same codes bit for bit. */
int qs_cuda_rope_kvq(void *q, void *k, const void *v, size_t n, unsigned hq, unsigned hkv,
                     unsigned hd, const float *cs, int adjacent, const uint32_t *slot,
                     const uint32_t *pos, const qs_cuda_kv *kv, unsigned max_seq, void *stream);

/* Causal grouped-query attention over the KV cache: out (n x hq*hd fp16),
 * token i and local head h = softmax(q[i,h] . K^T / sqrt(hd)) V over
 * positions 0..pos[i] of slot[i]'s cache, read from KV head
 * (q_first + h) / group - kv_first (group = query heads per KV head,
 * global). Positions are split across CTAs for long contexts
 * (flash-decoding: partial maxima, sums and outputs in ws, combined by a
 * second kernel); the split depends on max_seq, not on the positions. */
size_t qs_cuda_attention_ws_bytes(size_t n, unsigned hq, unsigned hd, unsigned max_seq);
int qs_cuda_attention(const void *q, const void *kc, const void *vc, size_t n, const uint32_t *slot,
                      const uint32_t *pos, unsigned hq, unsigned hkv, unsigned hd, unsigned group,
                      unsigned q_first, unsigned kv_first, unsigned max_seq, void *ws, void *out,
                      void *stream);
/* The same for tokens that all share one slot (a prefill run: slot[i] ==
 * slot[0] for every i, positions any, usually consecutive; the caller
 * knows, the launch shape cannot): a tiled tensor-core kernel, 64 (token,
 * head) rows of one KV head per CTA against K/V tiles in shared memory, P
 * rounded to fp16 for P V (~2e-4 relative). No workspace. hd: a multiple of
 * 8 up to 128 (both entries); q, the caches and out 16-byte aligned. */
int qs_cuda_attention_prefill(const void *q, const void *kc, const void *vc, size_t n,
                              const uint32_t *slot, const uint32_t *pos, unsigned hq, unsigned hkv,
                              unsigned hd, unsigned group, unsigned q_first, unsigned kv_first,
                              unsigned max_seq, void *out, void *stream);
/* Both over a cache of any format (qs_cuda_kv): int8/int4 rows are
 * dequantized as they are read, x = c s + m in fp32 (the prefill kernel
 * rounds them to fp16 in its shared-memory tiles, as the tensor cores take
 * them). The fp16 entries above are these with an fp16 cache. */
int qs_cuda_attention_kvq(const void *q, const qs_cuda_kv *kv, size_t n, const uint32_t *slot,
                          const uint32_t *pos, unsigned hq, unsigned hkv, unsigned hd,
                          unsigned group, unsigned q_first, unsigned kv_first, unsigned max_seq,
                          void *ws, void *out, void *stream);
int qs_cuda_attention_prefill_kvq(const void *q, const qs_cuda_kv *kv, size_t n,
                                  const uint32_t *slot, const uint32_t *pos, unsigned hq,
                                  unsigned hkv, unsigned hd, unsigned group, unsigned q_first,
                                  unsigned kv_first, unsigned max_seq, void *out, void *stream);
/* Positions per split of qs_cuda_attention (a multiple of 64; 0: the
 * default 128), process-wide; more where max_seq would need over 256
 * splits. For tests (small max_seq with several splits) and tuning: set it
 * before sizing the workspace, not while attention runs on another thread. */
int qs_cuda_attention_set_chunk(unsigned positions);

/* FFN activations on count fp16 elements; out may be an input. SwiGLU:
 * out = silu(gate) * up = gate / (1 + exp(-gate)) * up; ReLU: max(a, 0). */
int qs_cuda_swiglu(const void *gate, const void *up, size_t count, void *out, void *stream);
int qs_cuda_relu(const void *a, size_t count, void *out, void *stream);

/* Vocabulary-parallel embedding: x (n x E fp32) row i = row
 * tokens[i] - v_first of table (fp16, vr x E) when that is in [0, vr),
 * zeros otherwise (a sum over the ranks then gathers the rows). */
int qs_cuda_embed(const int32_t *tokens, size_t n, const void *table, uint32_t v_first, uint32_t vr,
                  size_t E, float *x, void *stream);
/* x (n x H fp32) += table row pos[i] + offset (fp16; OPT's learned
 * positions, offset 2). */
int qs_cuda_add_pos(float *x, const uint32_t *pos, size_t n, size_t H, const void *table,
                    uint32_t offset, void *stream);

/* Y (M x N) = X (M x K, fp16) W^T (W fp16 N x K row-major) by cuBLAS with
 * fp32 sums; Y fp32 when y_fp32 (logits), else fp16. */
int qs_cuda_linear_f16(const void *W, const void *X, size_t M, size_t N, size_t K, void *Y,
                       int y_fp32, void *stream);
/* Logits gathered from P ranks' vocabulary blocks: all (P x nl x vr fp32,
 * rank-major as an all-gather leaves them) -> logits (nl x V), dropping the
 * padding rows past V. */
int qs_cuda_gather_logits(const float *all, size_t P, size_t nl, size_t vr, size_t V, float *logits,
                          void *stream);

/* Sampling on the device, one token per row of logits (n x V fp32) into
 * tokens (int32, device), as the CPU sampler does (shard/sampler.c):
 * greedy (the first maximum) where temperature is 0, else p = exp((l -
 * max) / temperature), the top_k most likely (0: all), of those the most
 * likely up to top_p of their mass, candidates in order of probability
 * then id, and u from the same xorshift64* stream: state[i] (device) is
 * advanced once per non-greedy draw. params: device array of n. */
typedef struct qs_cuda_sample_params {
    float temperature, top_p;
    uint32_t top_k;
    uint32_t pad;
} qs_cuda_sample_params;
size_t qs_cuda_sample_ws_bytes(size_t n, size_t V);
int qs_cuda_sample(const float *logits, size_t n, size_t V, const qs_cuda_sample_params *params,
                   uint64_t *state, void *ws, int32_t *tokens, void *stream);

/* ---- W8A8 on the device -----------------------------------------------------
 * The codes and scales of a host qs_w8 in the device layout below;
 * activations quantized on the device per token and group as the CPU kernel
 * does (qs_quant_act_token's rule per group: scale = max|x| / 127, codes
 * rounded to nearest even, +-127; bit for bit the CPU's codes and scales),
 * or with a static per-tensor scale (1/scale as the CPU computes it); int8
 * tensor-core products (mma.sync m16n8k32 s8, int32 sums) scaled per group
 * into fp32; fp16 out. A token holding NaN or Inf gets NaN outputs.
 *
 * Device layout (kernels/cuda/w8a8_gpu.cu): row n of codes is kd bytes;
 * group g (channels g*group .. g*group + group - 1) starts at byte g * gp,
 * gp = 32 * ceil(group / 32), zeros after its channels and past the last
 * group; kd = 128 * ceil(ngroups * gp / 128). So a 32-channel tensor-core
 * step never straddles two groups. group as qs_w8_group (Kp for one scale
 * per token), at most 131072 (the int32 sums). The qs_w8's group sums are
 * not uploaded (s8 x s8 needs no offset correction).
 * The workspace: xq int8 [QS_CUDA_W8_ROWS][kd] (the activation codes, same
 * layout), sx fp32 [QS_CUDA_W8_ROWS][ngroups] (their scales, NaN for a
 * group with NaN/Inf), then fp32 [QS_CUDA_WS_ROWS][N] split-K partial sums:
 * calls on one handle must be ordered (one stream, or synced). */
typedef struct qs_cuda_w8 {
    size_t N, K, group, ngroups;
    size_t gp, kd;   /* bytes per group and per row, above */
    void *codes;     /* int8 [N][kd] */
    void *scale;     /* fp32 [N] */
    void *ws;        /* the kernel's workspace, above */
    size_t ws_bytes; /* its size */
    size_t bytes;    /* device bytes of codes + scale */
    unsigned splits; /* K-splits of the GEMM: 0 = the chooser's (tests and benchmarks force) */
} qs_cuda_w8;
/* Allocates the arrays for a shape (act_group as qs_w8_quantize's; contents
 * undefined); qs_cuda_w8_upload allocates and copies a host qs_w8 into the
 * layout. qs_cuda_w8_free is safe on a zeroed or freed struct. */
int qs_cuda_w8_alloc(qs_cuda_w8 *d, size_t N, size_t K, size_t act_group);
int qs_cuda_w8_upload(qs_cuda_w8 *d, const qs_w8 *w);
void qs_cuda_w8_free(qs_cuda_w8 *d);
/* Y (M x N fp16) = X (M x K fp16) W^T; act_scale <= 0: dynamic per token
 * and group, > 0: static (NaN or Inf: QS_EINVAL). M up to the workspace's
 * rows (QS_CUDA_W8_ROWS). Two launches (quantize, GEMM), three with
 * K-splits; no allocation or host synchronisation. */
#define QS_CUDA_W8_ROWS 512
int qs_cuda_w8a8_gemm(qs_cuda_w8 *d, const void *X, size_t M, float act_scale, void *Y,
                      void *stream);
/* Activation codes in that layout (xq int8 [rows][kd], sx fp32
 * [rows][ngroups], dynamic scales), written by an operation that quantizes
 * its own output in the same pass (qs_cuda_add_norm_w8, as SmoothQuant's and
 * Atom's serving kernels fuse it), so that the GEMMs reading that output
 * (q, k and v; up and gate) skip their quantization launch:
 * qs_cuda_w8a8_gemm_act equals qs_cuda_w8a8_gemm on the same fp16 input bit
 * for bit. The codes' K and group must be the matrix's. */
typedef struct qs_cuda_w8_act {
    size_t rows, K, group, ngroups, gp, kd;
    void *xq;
    float *sx;
} qs_cuda_w8_act;
int qs_cuda_w8_act_alloc(qs_cuda_w8_act *a, size_t rows, size_t K, size_t act_group);
void qs_cuda_w8_act_free(qs_cuda_w8_act *a);
int qs_cuda_w8a8_gemm_act(qs_cuda_w8 *d, const qs_cuda_w8_act *a, size_t M, void *Y, void *stream);

/* ---- W4A4 (Atom) on the device ----------------------------------------------
 * A host qs_w4 (section "W4A4 (Atom)") in the device layout below; the
 * activations read through the matrix's channel permutation and quantized
 * on the device as qs_w4_quant_act does (bit for bit its codes and scales:
 * INT4 per token and group of positions before K4 = K - ko, INT8 per token
 * after); integer tensor-core products summed per group in int32 and
 * scaled into fp32 by sx[m,g] s4[n,g] (the outliers by sxo[m] s8[n]); fp16
 * out. A token holding NaN or Inf gets NaN scales and NaN outputs.
 *
 * Two tensor-core paths, chosen by the device's compute capability at run
 * time: 8.x (A100): mma.sync m16n8k64 s4 on the INT4 part; 9.0 and later
 * (H100/H200, no INT4 tensor cores): the same packed codes unpacked to int8
 * in registers into mma.sync m16n8k32 s8 (as QServe does for W4A8). Both
 * run the outliers through m16n8k32 s8. qs_cuda_w4.mma forces one (tests).
 *
 * Device layout (kernels/cuda/w4a4_gpu.cu): row n of codes is kd bytes.
 * The INT4 part: group g (positions g*group .. g*group + group - 1) starts
 * at byte g * gp / 2, gp = 64 * ceil(group / 64), two codes per byte in
 * position order (the even position in the low nibble, two's complement),
 * zeros after its positions. The outliers: position K4 + i at byte off8 + i,
 * off8 = ngroups * gp / 2, int8, zeros up to off8 + 32 * ceil(ko / 32).
 * Zeros from there to kd = 128 * ceil((off8 + 32 * ceil(ko / 32)) / 128).
 * So a 64-position s4 step (32 bytes) never straddles two groups, an s8
 * step of 32 outliers never meets INT4 codes, and the GEMM's 128-byte K
 * tiles need no bounds. Scales sw fp32 [ngroups + 1][N]: s4 per group, then
 * s8 (one array, so the outliers are the GEMM's last group). perm uint32
 * [K] (position -> original channel).
 * The workspace: xq [QS_CUDA_W4_ROWS][kd] (the activation codes, same
 * layout), sx fp32 [QS_CUDA_W4_ROWS][ngroups + 1] (their scales, sxo last),
 * then fp32 [QS_CUDA_WS_ROWS][N] split-K partial sums: calls on one handle
 * must be ordered (one stream, or synced). Limits: N, K up to 2^30, ko up
 * to 131072 (int32 sums), group a multiple of 8. */
#define QS_CUDA_W4_ROWS 512
typedef struct qs_cuda_w4 {
    size_t N, K, ko, group, ngroups; /* K4 = K - ko, ngroups = ceil(K4 / group) */
    size_t gp, off8, kd;             /* padded group, outlier offset, row bytes (above) */
    void *codes;                     /* uint8 [N][kd] */
    void *sw;                        /* fp32 [ngroups + 1][N] */
    void *perm;                      /* uint32 [K] */
    uint64_t perm_hash;              /* of perm's contents (matches activation codes to it) */
    void *ws;                        /* the kernel's workspace, above */
    size_t ws_bytes;                 /* its size */
    size_t bytes;                    /* device bytes of codes + sw + perm */
    unsigned splits;                 /* K-splits: 0 = the chooser's (tests force) */
    unsigned mma; /* 0 = by compute capability; 4 = m16n8k64 s4; 8 = s8 on unpacked codes */
} qs_cuda_w4;
/* Allocates the arrays for a shape (group as the qs_w4's, already resolved:
 * a multiple of 8; contents undefined); qs_cuda_w4_upload allocates and
 * copies a host qs_w4 into the layout (its codes by qs_w4_codes; a NULL
 * perm is the identity). qs_cuda_w4_free is safe on a zeroed or freed
 * struct. */
int qs_cuda_w4_alloc(qs_cuda_w4 *d, size_t N, size_t K, size_t ko, size_t group);
int qs_cuda_w4_upload(qs_cuda_w4 *d, const qs_w4 *w);
void qs_cuda_w4_free(qs_cuda_w4 *d);
/* Y (M x N fp16) = X (M x K fp16, original channel order) W^T with the
 * activation quantization on the device (ops_cuda.c: o and down, whose
 * inputs no norm precedes). M up to QS_CUDA_W4_ROWS. Two launches
 * (quantize, GEMM), three with K-splits; no allocation or host
 * synchronisation. */
int qs_cuda_w4a4_gemm(qs_cuda_w4 *d, const void *X, size_t M, void *Y, void *stream);
/* Activation codes in the device layout (xq [rows][kd], sx fp32
 * [rows][ngroups + 1], sxo last) for the matrices that share one input and
 * one permutation (q, k and v; up and gate: Atom reorders them alike),
 * written once by qs_cuda_w4_quant_act or by the norm before them
 * (qs_cuda_add_norm_w4, reorder and quantization fused into the norm as
 * Atom does), then read by each GEMM with qs_cuda_w4a4_gemm_act, which
 * equals qs_cuda_w4a4_gemm on the same fp16 input bit for bit.
 * qs_cuda_w4_act_alloc takes the layout and the permutation (borrowed: d
 * must outlive a) from d; a matrix whose K, ko, group or permutation
 * differs is refused by qs_cuda_w4a4_gemm_act. */
typedef struct qs_cuda_w4_act {
    size_t rows, K, ko, group, ngroups, gp, off8, kd;
    const void *perm; /* uint32 [K], the matrix's */
    uint64_t perm_hash;
    void *xq;  /* uint8 [rows][kd] */
    float *sx; /* [rows][ngroups + 1] */
} qs_cuda_w4_act;
int qs_cuda_w4_act_alloc(qs_cuda_w4_act *a, size_t rows, const qs_cuda_w4 *d);
void qs_cuda_w4_act_free(qs_cuda_w4_act *a);
/* X (M x K fp16, original order, M <= a->rows) into a's codes. */
int qs_cuda_w4_quant_act(qs_cuda_w4_act *a, const void *X, size_t M, void *stream);
int qs_cuda_w4a4_gemm_act(qs_cuda_w4 *d, const qs_cuda_w4_act *a, size_t M, void *Y, void *stream);
/* The tensor-core path d's GEMMs take on the current device: 4 (mma.sync
 * m16n8k64 s4) or 8 (int8 on unpacked codes); a negative qs_err on error. */
int qs_cuda_w4_mma(const qs_cuda_w4 *d);

/* ---- Quantizers and synthetic weights on the device -------------------------
 * So that a large model is quantized at GPU speed and, synthetic, never held
 * on the host: W (N x K fp32, device) -> device-layout weights, the same
 * fits as the CPU quantizers (qs_bcq_quantize's greedy init and alternating
 * least squares, qs_bcq_from_rtn, qs_w8_quantize) within the tolerance
 * their tests state. The BCQ and RTN ones (kernels/cuda/quant_gpu.cu) allocate d with
 * qs_cuda_bcq_alloc and wait for `stream` once at the end: a NaN or Inf weight is QS_EINVAL
 * naming it, as on the CPU, and d is freed. iters 0: qs_bcq_quantize's default (20).
 * qs_cuda_w8_quantize is defined with qs_cuda_w8's device layout, by the W8A8 kernels. */
int qs_cuda_bcq_quantize(qs_cuda_bcq *d, const float *W, size_t N, size_t K, unsigned q, size_t g,
                         unsigned iters, void *stream);
int qs_cuda_rtn_quantize(qs_cuda_bcq *d, const float *W, size_t N, size_t K, unsigned q, size_t g,
                         void *stream);
int qs_cuda_w8_quantize(qs_cuda_w8 *d, const float *W, size_t N, size_t K, size_t act_group,
                        void *stream);
/* W (nr x nc fp32, device, rows ld apart) = rows r0.. and columns c0.. of
 * the synthetic tensor shard/ generates on the host (kernels/qs_synth.h:
 * the same counter-based function of (key, row * cols + col); kind 0 a
 * weight N(0, 0.02), 1 a bias N(0, 0.01), 2 a norm gain 1 + N(0, 0.05), 20
 * in the first `outliers` columns). Equal to the host's but for the last
 * bit where the GPU's double log/cos round differently (bit for bit under
 * the harness). */
int qs_cuda_synth_fill(float *W, uint64_t key, uint64_t cols, uint64_t r0, uint64_t nr, uint64_t c0,
                       uint64_t nc, uint64_t ld, int kind, uint64_t outliers, void *stream);

/* ---- Baselines ------------------------------------------------------------- */
/* cuBLAS: Y = X W^T with W an N x K row-major fp16 device matrix,
 * cublasGemmEx with CUBLAS_COMPUTE_32F. One handle per thread, created on
 * first use (bound to the device current then). */
int qs_cuda_gemm_f16_cublas(const void *W, const void *X, size_t M, size_t N, size_t K, void *Y,
                            void *stream);

/* OPTQ-style uniform 3-bit weights, dequantized in registers:
 *   codes  uint32 [nb][3][N], nb = ceil(K / 32): the 32 3-bit codes of one
 *          row and 32-column block packed little-endian into 96 bits
 *          (code j at bits 3j..3j+2, crossing words), words 0..2;
 *   scale  fp16 [ngroups][N], zero fp16 [ngroups][N] (the zero point zp),
 *   w = scale * (code - zp). */
typedef struct qs_cuda_u3 {
    size_t N, K, g, ngroups, nb;
    void *codes, *scale, *zero;
    void *ws; /* fp32 split-K workspace, QS_CUDA_WS_ROWS * N */
    size_t bytes;
} qs_cuda_u3;

/* From a host qs_rtn with q == 3 (scale and zp rounded to fp16). */
int qs_cuda_u3_upload(qs_cuda_u3 *d, const qs_rtn *r);
int qs_cuda_u3_alloc(qs_cuda_u3 *d, size_t N, size_t K, size_t g);
int qs_cuda_u3_fill_random(qs_cuda_u3 *d, uint64_t seed, void *stream);
void qs_cuda_u3_free(qs_cuda_u3 *d);
/* Y = X W^T, M = 1..8. */
int qs_cuda_u3_gemv(qs_cuda_u3 *d, const void *X, size_t M, void *Y, void *stream);

#ifdef __cplusplus
}
#endif
#endif /* QS_KERNELS_H */
