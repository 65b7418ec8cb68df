/* rope_kv_gpu.cu: RoPE on q and k, then k and v into one layer's KV cache
 * (qs_kernels.h, qs_cuda_rope_kv). The CPU counterpart is shard/model.c's
 * rope() and the memcpy's into kv_index() of layer_forward.
 *
 * Shapes: q n x hq*hd, k and v n x hkv*hd (fp16, token-major, heads
 * contiguous); cs fp32 [positions][hd/2][cos, sin]; kc, vc fp16
 * [slots][max_seq][hkv*hd]. Token i at position p = pos[i]:
 *     (a, b) = (2j, 2j+1) (adjacent, GGUF) or (j, j + hd/2) (Hugging Face),
 *     a' = a c - b s,  b' = a s + b c,  (c, s) = cs[p][j],
 * computed in fp32 from the fp16 inputs and rounded once; k's rotated row
 * goes both back into k and into kc[slot[i]][p], v's row into vc.
 *
 * One CTA per token; a thread's unit is 4 adjacent pairs (one 16-byte load)
 * or 8 pairs of the two halves (two), with the 8 or 16 cs floats in 16-byte
 * loads, when hd allows it (adjacent: hd % 8 == 0, halves: hd % 16 == 0) and
 * every pointer is 16-byte aligned; else one pair. The thread that rotates a
 * piece of k also stores it in the cache, so no barrier is needed. Tokens at
 * a position past max_seq are skipped (the host checks them, see
 * qs_model_forward; this only keeps a bad index from writing out of the
 * cache). Slots are not known here and are the caller's to check.
 *
 * An int8/int4 cache (qs_cuda_rope_kvq): the rotation writes k back as
 * above but not to the cache; after a barrier, one thread per (k or v, KV
 * head, group of QS_KV_GROUP dimensions) reads the group's fp16 values (k's
 * as rotated and rounded, the values an fp16 cache would hold), quantizes
 * them (kv_quant.cuh, the CPU's codes bit for bit) and writes the codes
 * (8-value runs as one 8- or 4-byte store where aligned) and the group's
 * (scale, minimum). A token has only 2 * hkv * ceil(hd / 32) groups (12 for
 * SmolLM2), so a thread per group needs no shuffles and costs nothing that
 * matters beside the layer's GEMMs. Codes [slots][max_seq][hkv][code bytes],
 * scales [slots][max_seq][hkv][groups]. */
#include "kv_quant.cuh"
#include "rowops.cuh"

#define ROPE_THREADS 128

/* Rotates G pairs: a[g] with b[g] by cs[2g], cs[2g+1]. */
template <int G> __device__ __forceinline__ void rotate(float *a, float *b, const float *cs)
{
    QS_UNROLL
    for (int g = 0; g < G; g++) {
        const float x = a[g], y = b[g], c = cs[2 * g], s = cs[2 * g + 1];
        a[g] = x * c - y * s;
        b[g] = x * s + y * c;
    }
}

/* One token's rows of k and v (fp16, hkv * hd each) quantized into the
 * cache's row-head rh0.. (F: QS_KV_INT8 or QS_KV_INT4); VEC: 16-byte loads
 * and 8-value code stores (hd % 8 == 0, arrays aligned). */
template <int VEC, int F>
__device__ __forceinline__ void quantize_rows(const __half *kr, const __half *vr, int hkv, int hd,
                                              size_t rh0, uint8_t *kq, uint8_t *vq, __half2 *ks,
                                              __half2 *vs)
{
    constexpr float qmax = F == QS_KV_INT8 ? 255.0f : 15.0f;
    const int ng = (hd + QS_KV_GROUP - 1) / QS_KV_GROUP, per = hkv * ng;
    const size_t cb = F == QS_KV_INT8 ? (size_t)hd : (size_t)(hd + 1) / 2; /* bytes per head */
    for (int u = threadIdx.x; u < 2 * per; u += blockDim.x) {
        const bool isv = u >= per;
        const int h = (u % per) / ng, g = (u % per) % ng, j0 = g * QS_KV_GROUP;
        const int len = min(QS_KV_GROUP, hd - j0);
        const __half *src = (isv ? vr : kr) + (size_t)h * hd + j0;
        const size_t rh = rh0 + (size_t)h;
        uint8_t *dst = (isv ? vq : kq) + rh * cb;
        float x[QS_KV_GROUP];
        uint8_t c[QS_KV_GROUP];
        if (VEC) {
            for (int j = 0; j < len; j += 8)
                qs_ld_h8(src + j, x + j);
        } else {
            for (int j = 0; j < len; j++)
                x[j] = __half2float(src[j]);
        }
        kvq_group(x, len, qmax, c, (isv ? vs : ks) + rh * ng + g);
        if constexpr (F == QS_KV_INT8) {
            if (VEC) {
                for (int j = 0; j < len; j += 8) {
                    uint2 w = make_uint2(0, 0);
                    for (int e = 0; e < 4; e++)
                        w.x |= (uint32_t)c[j + e] << (8 * e),
                            w.y |= (uint32_t)c[j + 4 + e] << (8 * e);
                    *reinterpret_cast<uint2 *>(dst + j0 + j) = w;
                }
            } else {
                for (int j = 0; j < len; j++)
                    dst[j0 + j] = c[j];
            }
        } else {
            if (VEC) {
                for (int j = 0; j < len; j += 8) {
                    uint32_t w = 0;
                    for (int e = 0; e < 8; e++)
                        w |= (uint32_t)c[j + e] << (4 * e);
                    *reinterpret_cast<uint32_t *>(dst + (j0 + j) / 2) = w;
                }
            } else { /* groups start at even values: a byte never straddles two */
                for (int j = 0; j < len; j += 2)
                    dst[(j0 + j) / 2] = (uint8_t)(c[j] | (j + 1 < len ? c[j + 1] << 4 : 0));
            }
        }
    }
}

/* VEC: 0 scalar (one pair per unit), 1 adjacent (4 pairs), 2 halves (8 pairs).
 * F: the cache's format (qs_kv_format); int8/int4 take kc, vc as codes. */
template <int VEC, int F>
__global__ void __launch_bounds__(ROPE_THREADS)
    rope_kv_kernel(__half *__restrict__ q, __half *__restrict__ k, const __half *__restrict__ v,
                   int hq, int hkv, int hd, const float *__restrict__ cs, int adjacent,
                   const uint32_t *__restrict__ slot, const uint32_t *__restrict__ pos,
                   void *__restrict__ kc, void *__restrict__ vc, __half2 *__restrict__ ks,
                   __half2 *__restrict__ vs, unsigned max_seq)
{
    constexpr bool f16 = F == QS_KV_FP16;
    const size_t i = blockIdx.x;
    const uint32_t p = pos[i];
    if (p >= max_seq)
        return; /* the whole block, before its one barrier */
    const size_t kw = (size_t)hkv * hd;
    __half *qr = q + i * hq * hd, *kr = k + i * kw;
    const __half *vr = v + i * kw;
    const size_t rh0 = ((size_t)slot[i] * max_seq + p) * hkv, at = rh0 * hd;
    __half *kd = f16 ? static_cast<__half *>(kc) + at : nullptr;
    __half *vd = f16 ? static_cast<__half *>(vc) + at : nullptr;

    if (cs) {
        const int half = hd / 2;
        const float *c = cs + (size_t)p * hd; /* hd/2 pairs of 2 floats */
        constexpr int G = VEC == 0 ? 1 : VEC == 1 ? 4 : 8;
        const int upr = half / G; /* units per head */
        const int units = (hq + hkv) * upr;
        for (int u = threadIdx.x; u < units; u += blockDim.x) {
            const int h = u / upr, j0 = (u % upr) * G;
            const bool isk = h >= hq;
            __half *row = isk ? kr + (size_t)(h - hq) * hd : qr + (size_t)h * hd;
            __half *dst = isk ? kd + (size_t)(h - hq) * hd : nullptr;
            float a[G], b[G], t[2 * G];
            if constexpr (VEC == 1) { /* pairs (2j, 2j+1), j = j0..j0+3: 8 contiguous halves */
                float e[8];
                qs_ld_h8(row + 2 * j0, e);
                QS_UNROLL
                for (int g = 0; g < G; g++)
                    a[g] = e[2 * g], b[g] = e[2 * g + 1];
                qs_ld_f4(c + 2 * j0, t);
                qs_ld_f4(c + 2 * j0 + 4, t + 4);
                rotate<G>(a, b, t);
                QS_UNROLL
                for (int g = 0; g < G; g++)
                    e[2 * g] = a[g], e[2 * g + 1] = b[g];
                qs_st_h8(row + 2 * j0, e);
                if (f16 && isk)
                    qs_st_h8(dst + 2 * j0, e);
            } else if constexpr (VEC == 2) { /* j0..j0+7 with j0+half..: two runs of 8 */
                qs_ld_h8(row + j0, a);
                qs_ld_h8(row + j0 + half, b);
                QS_UNROLL
                for (int g = 0; g < 2 * G; g += 4)
                    qs_ld_f4(c + 2 * j0 + g, t + g);
                rotate<G>(a, b, t);
                qs_st_h8(row + j0, a);
                qs_st_h8(row + j0 + half, b);
                if (f16 && isk) {
                    qs_st_h8(dst + j0, a);
                    qs_st_h8(dst + j0 + half, b);
                }
            } else {
                const int ia = adjacent ? 2 * j0 : j0, ib = adjacent ? 2 * j0 + 1 : j0 + half;
                a[0] = __half2float(row[ia]), b[0] = __half2float(row[ib]);
                t[0] = c[2 * j0], t[1] = c[2 * j0 + 1];
                rotate<1>(a, b, t);
                const __half ha = __float2half_rn(a[0]), hb = __float2half_rn(b[0]);
                row[ia] = ha, row[ib] = hb;
                if (f16 && isk)
                    dst[ia] = ha, dst[ib] = hb;
            }
        }
    } else if (f16) { /* no rotation (OPT): k's row to the cache as it is */
        if (VEC) {
            for (size_t e = 8 * threadIdx.x; e < kw; e += 8 * blockDim.x)
                *reinterpret_cast<uint4 *>(kd + e) = *reinterpret_cast<const uint4 *>(kr + e);
        } else {
            for (size_t e = threadIdx.x; e < kw; e += blockDim.x)
                kd[e] = kr[e];
        }
    }
    if constexpr (!f16) {
        __syncthreads(); /* k's rotated rows, written above by other threads */
        quantize_rows<VEC, F>(kr, vr, hkv, hd, rh0, static_cast<uint8_t *>(kc),
                              static_cast<uint8_t *>(vc), ks, vs);
    } else if (VEC) {
        for (size_t e = 8 * threadIdx.x; e < kw; e += 8 * blockDim.x)
            *reinterpret_cast<uint4 *>(vd + e) = *reinterpret_cast<const uint4 *>(vr + e);
    } else {
        for (size_t e = threadIdx.x; e < kw; e += blockDim.x)
            vd[e] = vr[e];
    }
}

template <int F>
static void rope_launch(int vec, unsigned g, cudaStream_t st, __half *qh, __half *kh,
                        const __half *vh, int Hq, int Hkv, int Hd, const float *cs, int a,
                        const uint32_t *slot, const uint32_t *pos, const qs_cuda_kv *kv,
                        unsigned max_seq)
{
    __half2 *ks = (__half2 *)kv->ks, *vs = (__half2 *)kv->vs;
    if (vec == 1) {
        QS_LAUNCH(g, ROPE_THREADS, 0, st, rope_kv_kernel<1, F>)
        (qh, kh, vh, Hq, Hkv, Hd, cs, a, slot, pos, kv->k, kv->v, ks, vs, max_seq);
    } else if (vec == 2) {
        QS_LAUNCH(g, ROPE_THREADS, 0, st, rope_kv_kernel<2, F>)
        (qh, kh, vh, Hq, Hkv, Hd, cs, a, slot, pos, kv->k, kv->v, ks, vs, max_seq);
    } else {
        QS_LAUNCH(g, ROPE_THREADS, 0, st, rope_kv_kernel<0, F>)
        (qh, kh, vh, Hq, Hkv, Hd, cs, a, slot, pos, kv->k, kv->v, ks, vs, max_seq);
    }
}

extern "C" int qs_cuda_rope_kvq(void *q, void *k, const void *v, size_t n, unsigned hq,
                                unsigned hkv, unsigned hd, const float *cs, int adjacent,
                                const uint32_t *slot, const uint32_t *pos, const qs_cuda_kv *kv,
                                unsigned max_seq, void *stream)
{
    if (!q || !k || !v || !slot || !pos || !kv || !kv->k || !kv->v)
        return qs_seterr(QS_EINVAL, "qs_cuda_rope_kv: q, k, v, slot, pos and the caches are "
                                    "required");
    const int f = kv->format;
    if (f != QS_KV_FP16 && f != QS_KV_INT8 && f != QS_KV_INT4)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_rope_kv: KV cache format %d: use fp16 (0), int8 (1) or int4 (2)",
                         f);
    if (f != QS_KV_FP16 && (!kv->ks || !kv->vs))
        return qs_seterr(QS_EINVAL, "qs_cuda_rope_kv: an int8/int4 cache needs its scale arrays");
    if (hq < 1 || hkv < 1 || hd < 1 || max_seq < 1 || (cs && hd % 2) ||
        (uint64_t)(hq + (uint64_t)hkv) * hd > 0x7fffffff || n > 0x7fffffff)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_rope_kv: bad shape hq=%u hkv=%u hd=%u max_seq=%u n=%zu (RoPE "
                         "needs an even head size)",
                         hq, hkv, hd, max_seq, n);
    if (n == 0)
        return QS_OK;
    const bool al = qs_al16(q) && qs_al16(k) && qs_al16(v) && qs_al16(kv->k) && qs_al16(kv->v) &&
                    qs_al16(kv->ks) && qs_al16(kv->vs) && qs_al16(cs) && hd % 8 == 0;
    /* Without RoPE any vector layout copies 8 halves at a time. */
    int vec = 0;
    if (al && (!cs || adjacent))
        vec = 1;
    else if (al && hd % 16 == 0)
        vec = 2;
    cudaStream_t st = QS_CU_STREAM(stream);
    __half *qh = (__half *)q, *kh = (__half *)k;
    const __half *vh = (const __half *)v;
    const int a = adjacent != 0, Hq = (int)hq, Hkv = (int)hkv, Hd = (int)hd;
    const unsigned g = (unsigned)n;
    if (f == QS_KV_INT8)
        rope_launch<QS_KV_INT8>(vec, g, st, qh, kh, vh, Hq, Hkv, Hd, cs, a, slot, pos, kv, max_seq);
    else if (f == QS_KV_INT4)
        rope_launch<QS_KV_INT4>(vec, g, st, qh, kh, vh, Hq, Hkv, Hd, cs, a, slot, pos, kv, max_seq);
    else
        rope_launch<QS_KV_FP16>(vec, g, st, qh, kh, vh, Hq, Hkv, Hd, cs, a, slot, pos, kv, max_seq);
    QS_CU_LAUNCH("rope_kv_kernel");
    return QS_OK;
}

extern "C" int qs_cuda_rope_kv(void *q, void *k, const void *v, size_t n, unsigned hq, unsigned hkv,
                               unsigned hd, const float *cs, int adjacent, const uint32_t *slot,
                               const uint32_t *pos, void *kc, void *vc, unsigned max_seq,
                               void *stream)
{
    const qs_cuda_kv kv = {QS_KV_FP16, kc, vc, NULL, NULL};
    return qs_cuda_rope_kvq(q, k, v, n, hq, hkv, hd, cs, adjacent, slot, pos, &kv, max_seq, stream);
}
