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
 * cache). Slots are not known here and are the caller's to check. */
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

/* VEC: 0 scalar (one pair per unit), 1 adjacent (4 pairs), 2 halves (8 pairs). */
template <int VEC>
__global__ void __launch_bounds__(ROPE_THREADS)
    rope_kv_kernel(__half *__restrict__ q, __half *__restrict__ k, const __half *__restrict__ v,
                   int hq, int hkv, int hd, const float *__restrict__ cs, int adjacent,
                   const uint32_t *__restrict__ slot, const uint32_t *__restrict__ pos,
                   __half *__restrict__ kc, __half *__restrict__ vc, unsigned max_seq)
{
    const size_t i = blockIdx.x;
    const uint32_t p = pos[i];
    if (p >= max_seq)
        return; /* the whole block: there is no barrier in this kernel */
    const size_t kw = (size_t)hkv * hd;
    __half *qr = q + i * hq * hd, *kr = k + i * kw;
    const __half *vr = v + i * kw;
    const size_t at = ((size_t)slot[i] * max_seq + p) * kw;
    __half *kd = kc + at, *vd = vc + at;

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
                if (isk)
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
                if (isk) {
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
                if (isk)
                    dst[ia] = ha, dst[ib] = hb;
            }
        }
    } else { /* no rotation (OPT): k's row to the cache as it is */
        if (VEC) {
            for (size_t e = 8 * threadIdx.x; e < kw; e += 8 * blockDim.x)
                *reinterpret_cast<uint4 *>(kd + e) = *reinterpret_cast<const uint4 *>(kr + e);
        } else {
            for (size_t e = threadIdx.x; e < kw; e += blockDim.x)
                kd[e] = kr[e];
        }
    }
    if (VEC) {
        for (size_t e = 8 * threadIdx.x; e < kw; e += 8 * blockDim.x)
            *reinterpret_cast<uint4 *>(vd + e) = *reinterpret_cast<const uint4 *>(vr + e);
    } else {
        for (size_t e = threadIdx.x; e < kw; e += blockDim.x)
            vd[e] = vr[e];
    }
}

extern "C" int qs_cuda_rope_kv(void *q, void *k, const void *v, size_t n, unsigned hq, unsigned hkv,
                               unsigned hd, const float *cs, int adjacent, const uint32_t *slot,
                               const uint32_t *pos, void *kc, void *vc, unsigned max_seq,
                               void *stream)
{
    if (!q || !k || !v || !slot || !pos || !kc || !vc)
        return qs_seterr(QS_EINVAL, "qs_cuda_rope_kv: q, k, v, slot, pos, kc and vc are required");
    if (hq < 1 || hkv < 1 || hd < 1 || max_seq < 1 || (cs && hd % 2) ||
        (uint64_t)(hq + (uint64_t)hkv) * hd > 0x7fffffff || n > 0x7fffffff)
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_rope_kv: bad shape hq=%u hkv=%u hd=%u max_seq=%u n=%zu (RoPE "
                         "needs an even head size)",
                         hq, hkv, hd, max_seq, n);
    if (n == 0)
        return QS_OK;
    const bool al = qs_al16(q) && qs_al16(k) && qs_al16(v) && qs_al16(kc) && qs_al16(vc) &&
                    qs_al16(cs) && hd % 8 == 0;
    /* Without RoPE any vector layout copies 8 halves at a time. */
    int vec = 0;
    if (al && (!cs || adjacent))
        vec = 1;
    else if (al && hd % 16 == 0)
        vec = 2;
    cudaStream_t st = QS_CU_STREAM(stream);
    __half *qh = (__half *)q, *kh = (__half *)k, *kch = (__half *)kc, *vch = (__half *)vc;
    const __half *vh = (const __half *)v;
    const int a = adjacent != 0, Hq = (int)hq, Hkv = (int)hkv, Hd = (int)hd;
    const unsigned g = (unsigned)n;
    if (vec == 1) {
        QS_LAUNCH(g, ROPE_THREADS, 0, st, rope_kv_kernel<1>)
        (qh, kh, vh, Hq, Hkv, Hd, cs, a, slot, pos, kch, vch, max_seq);
    } else if (vec == 2) {
        QS_LAUNCH(g, ROPE_THREADS, 0, st, rope_kv_kernel<2>)
        (qh, kh, vh, Hq, Hkv, Hd, cs, a, slot, pos, kch, vch, max_seq);
    } else {
        QS_LAUNCH(g, ROPE_THREADS, 0, st, rope_kv_kernel<0>)
        (qh, kh, vh, Hq, Hkv, Hd, cs, a, slot, pos, kch, vch, max_seq);
    }
    QS_CU_LAUNCH("rope_kv_kernel");
    return QS_OK;
}
