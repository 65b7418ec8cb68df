/* attention_gpu.cu: causal grouped-query attention over the KV cache (fp16, int8 or int4)
 * (qs_kernels.h, "The device forward pass"), the counterpart of attention()
 * in shard/model.c.
 *
 * Shapes: q, out fp16 [n][hq*hd]; kc, vc fp16 [slot][max_seq][hkv*hd] (one
 * layer; int8/int4 below); slot, pos uint32 [n] (device). Local head h reads local KV head
 * (q_first + h) / group - kv_first, and token i attends to positions
 * 0..pos[i] of slot[i]. Scores are fp32 in the log2 domain (q.k * log2(e) /
 * sqrt(hd), then exp2), sums and outputs fp32, out rounded to fp16 once.
 * Heads are taken KV head by KV head: the local query heads [h0, h1) that
 * read one KV head (all `group` of them, fewer at the ends of a rank's
 * range when q_first is not a multiple of group) are one unit of work, so
 * each KV row is read once for all of them.
 *
 * Decode, any slot and position per token (qs_cuda_attention):
 * flash-decoding. CTA = (token, KV head, split, up to 8 of its query heads);
 * split s covers positions [s*chunk, (s+1)*chunk), the chunk and the number
 * of splits a function of max_seq alone (att_chunk), so the grid never
 * depends on the positions and one captured graph serves every step. A CTA
 * whose chunk starts past pos[i] writes an empty partial (max -inf, sum 0)
 * and exits. The others walk their chunk in tiles of 64 positions with an
 * online softmax: each K and V row is read straight into registers with
 * 16-byte loads (D/8 lanes per row, a warp covers whole rows: coalesced),
 * the lane's 8 dimensions dotted with the 8 per head of each query head
 * held in registers, the partial dots reduce-scattered over the row's lanes
 * (G-1 + log2(L/G) shuffles for G heads instead of G*log2(L)); scores go to
 * shared memory, one warp per head takes the tile maximum and rescales, and
 * the lanes accumulate p * V for all heads on their 8 dimensions. Partial
 * (max, sum, unnormalised output) per split go to ws in fp32; a second
 * kernel combines them (reading only non-empty splits' outputs) into fp16.
 * With one split the first kernel writes out directly and ws is not used.
 *
 * Prefill, tokens of one slot (qs_cuda_attention_prefill): a tiled kernel on
 * the tensor cores. CTA = (64 query rows, KV head); a row is a (token, head)
 * pair, tokens in order and each token's heads together, so a tile holds
 * 64/G consecutive tokens with all their heads. Q (fp16) and then, tile by
 * tile, 64 positions of K and V are staged in shared memory with 16-byte
 * loads; per warp of 16 rows S = Q K^T by WMMA (m16n16k16, fp32
 * accumulators), an online softmax in fp32 on S (causal mask per row's own
 * position), P rounded to fp16 for P V by WMMA; the output stays in
 * registers, rescaled per row, in fp32. Why the separate entry: the caller
 * knows that a prefill run shares one slot, the launch shape cannot learn
 * it from the sizes, and the split kernel stays correct for every batch.
 *
 * Shared-memory banks (32 banks of 4 bytes). Rows of the K, V and Q tiles
 * are D + 8 halves (D = 64 or 128): 144 or 272 bytes, 4 banks past a
 * multiple of 128, so the 8 rows that one phase of a 16-byte access or one
 * LDSM 8x8 matrix touches start on 8 different 4-bank groups; the stores
 * that fill the tiles write 128 contiguous bytes per 8 lanes. The fp32
 * scratch (S, then P V) is D + 4 floats a row, P 72 halves: the per-row
 * float4 and uint4 accesses of the softmax (lane = row + 16 * half) hit 8
 * different 4-bank groups per phase. In the decode kernel the score rows are
 * 68 floats (4 mod 32), so the G heads' scores of up to 4 positions written
 * at once fall in distinct banks. tests/gpu/test_gpu_attention.c prints the
 * harness's bank-model counts.
 *
 * An int8/int4 cache (the _kvq entries, qs_cuda_kv): codes [slot][max_seq]
 * [hkv][hd or hd/2 bytes] and per group of 32 dimensions an fp16 (scale,
 * minimum) (kv_quant.cuh). Both kernels take the format as a template
 * argument and change only how a lane reads its 8 dimensions of a row: 8
 * code bytes (int8) or 4 (int4) and the group's (scale, minimum) in place of
 * 16 fp16 bytes, dequantized c s + m in fp32 (decode: into the registers
 * the fp16 path unpacks into; prefill: rounded to fp16 into the same shared
 * tiles, what the tensor cores take). The rest is the fp16 kernels'. */
#include <mma.h>

#include <math.h>
#include <stdint.h>

#include "cuda_util.cuh"
#include "kv_quant.cuh"

#define ATT_THREADS    128 /* 4 warps, both kernels */
#define ATT_TILE       64  /* positions per K/V tile */
#define ATT_SLD        68  /* decode score row, floats: 64 + 4 */
#define ATT_MAX_SPLITS 256 /* more positions per split beyond 256 splits */
#define ATT_GMAX       8   /* query heads per decode CTA (more: grid.z) */
#define PF_ROWS        64  /* query rows per prefill CTA, 16 per warp */
#define PF_PLD         72  /* P row, halves: 64 + 8 */

static unsigned g_att_chunk = 128; /* positions per split; qs_cuda_attention_set_chunk */

/* Positions per split: the configured chunk, grown in steps of a tile so
 * that there are at most ATT_MAX_SPLITS splits. A function of max_seq only. */
static unsigned att_chunk(unsigned max_seq)
{
    unsigned c = g_att_chunk;
    if ((max_seq + c - 1) / c > ATT_MAX_SPLITS) {
        c = (max_seq + ATT_MAX_SPLITS - 1) / ATT_MAX_SPLITS;
        c = (c + ATT_TILE - 1) / ATT_TILE * ATT_TILE;
    }
    return c;
}

static unsigned att_splits(unsigned max_seq)
{
    unsigned c = att_chunk(max_seq);
    return (max_seq + c - 1) / c;
}

/* ws: [splits][n][hq] (max, sum) float2, then at a 16-byte boundary
 * [splits][n][hq][hd] fp32 unnormalised outputs. */
static size_t att_ml_bytes(size_t splits, size_t n, size_t hq)
{
    return (splits * n * hq * 8 + 15) / 16 * 16;
}

extern "C" int qs_cuda_attention_set_chunk(unsigned positions)
{
    if (positions == 0)
        positions = 128;
    if (positions % ATT_TILE)
        return qs_seterr(QS_EINVAL,
                         "attention split chunk of %u positions: use a multiple of %d (0 = the "
                         "default 128)",
                         positions, ATT_TILE);
    g_att_chunk = positions;
    return QS_OK;
}

extern "C" size_t qs_cuda_attention_ws_bytes(size_t n, unsigned hq, unsigned hd, unsigned max_seq)
{
    if (n == 0 || hq == 0 || hd == 0 || max_seq == 0 || n > (1u << 30) || hq > 65535 || hd > 128)
        return 0;
    size_t s = att_splits(max_seq);
    if (s <= 1)
        return 0;
    return att_ml_bytes(s, n, hq) + s * n * hq * hd * sizeof(float);
}

/* ---- Shared pieces ------------------------------------------------------------- */

/* 8 fp16 (one 16-byte load) as floats, through a union. */
__device__ __forceinline__ void att_unpack8(uint4 u, float *f)
{
    union {
        uint4 u;
        __half2 h[4];
    } t;
    t.u = u;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        float2 v = __half22float2(t.h[j]);
        f[2 * j] = v.x, f[2 * j + 1] = v.y;
    }
}

/* A lane's 8 values as 8 fp16 in one uint4, as the prefill kernel's tiles
 * hold them: an fp16 cache's bits as they are, codes dequantized and rounded. */
template <int F> __device__ __forceinline__ uint4 kvq_half8(const kvq_raw<F> &r)
{
    if constexpr (F == QS_KV_FP16) {
        return r.u;
    } else {
        float f[8];
        kvq_unpack<F>(r, f);
        union {
            uint4 u;
            __half2 h[4];
        } t;
#pragma unroll
        for (int j = 0; j < 4; j++)
            t.h[j] = __floats2half2_rn(f[2 * j], f[2 * j + 1]);
        return t.u;
    }
}

/* The local query heads [h0, h1) that read the jj-th KV head used by this
 * rank (local KV head kv_base + jj, global q_first / group + jj). */
__device__ __forceinline__ void att_heads(int jj, int hq, int group, int q_first, int *h0, int *h1)
{
    const int a = (q_first / group + jj) * group - q_first;
    *h0 = max(a, 0);
    *h1 = min(a + group, hq);
}

/* Reduce-scatter of CNT values over the lane bits O, O/2, ..., 1 (O = L/2
 * first): each step halves the values a lane keeps, exchanging the other
 * half with lane ^ O; once one is left, plain sums. A lane ends with the
 * full sum of value hb, hb in its high lane bits. All lanes run the same
 * shuffles (the selects only pick which value goes). */
template <int CNT, int O> struct att_rs {
    static __device__ __forceinline__ void run(float *v, int lane, int &hb)
    {
        if constexpr (O > 0) {
            if constexpr (CNT > 1) {
                constexpr int H = CNT / 2;
                const bool up = (lane & O) != 0;
#pragma unroll
                for (int k = 0; k < H; k++) {
                    const float keep = up ? v[k + H] : v[k], send = up ? v[k] : v[k + H];
                    v[k] = keep + __shfl_xor_sync(0xffffffffu, send, O);
                }
                hb += up ? H : 0;
                att_rs<H, O / 2>::run(v, lane, hb);
            } else {
                v[0] += __shfl_xor_sync(0xffffffffu, v[0], O);
                att_rs<1, O / 2>::run(v, lane, hb);
            }
        }
    }
};

__device__ __forceinline__ float att_warp_max(float v)
{
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float att_warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* ---- Decode: split kernel ---------------------------------------------------------
 * Grid (n * nkvu, splits, ceil(heads per KV head / G)), ATT_THREADS threads.
 * D: 64 or 128 (hd rounded up; lanes past hd load nothing); G: 1, 2, 4, 8
 * query heads per CTA (padding heads have q = 0 and are not written).
 * Lane layout: L = D/8 lanes per KV row (lane's dimensions 8*(lane%L) ..
 * +8), NG = 4 * 32/L lane groups, group lg takes positions lg + NG*k of a
 * tile. ml/po: the partials (NULL when splits == 1: out written here). */
template <int D, int G, int F>
__global__ void __launch_bounds__(ATT_THREADS)
    attn_split_kernel(const __half *__restrict__ q, const void *__restrict__ kc,
                      const void *__restrict__ vc, const __half2 *__restrict__ ks,
                      const __half2 *__restrict__ vs, const uint32_t *__restrict__ slot,
                      const uint32_t *__restrict__ pos, int n, int hq, int hkv, int hd, int group,
                      int q_first, int kv_base, int nkvu, int max_seq, int chunk, int splits,
                      float qscale, float2 *__restrict__ ml, float *__restrict__ po,
                      __half *__restrict__ out)
{
    constexpr int L = D / 8, RW = 32 / L, NG = (ATT_THREADS / 32) * RW, KSTEP = ATT_TILE / NG;
    static_assert(G <= L, "the reduce-scatter needs at least as many lanes per row as heads");
    QS_SHARED(float, s_p, [G][ATT_SLD]);
    QS_SHARED(float, s_m, [G]);
    QS_SHARED(float, s_l, [G]);
    QS_SHARED(float, s_a, [G]);
    /* Per lane group: the 8 values of lane `sub` at sub*4 (first 4) and
     * D/2 + sub*4 (last 4), so that a float4 store phase is contiguous. */
    QS_SHARED_ALIGNED(16, float, s_red, [NG][G][D]);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int i = (int)(blockIdx.x / (unsigned)nkvu), jj = (int)(blockIdx.x % (unsigned)nkvu);
    const int s = (int)blockIdx.y;
    int h0, h1;
    att_heads(jj, hq, group, q_first, &h0, &h1);
    h0 += G * (int)blockIdx.z;
    h1 = min(h1, h0 + G);
    if (h0 >= h1)
        return; /* the whole block: a z-slice past this KV head's heads */
    const int nh = h1 - h0;
    const int p_i = (int)min(pos[i], (uint32_t)(max_seq - 1)); /* never past the cache */
    const int c0 = s * chunk;
    const size_t mlo = ((size_t)s * n + i) * hq + h0;
    if (c0 > p_i) { /* empty partial: the combine gives it weight 0 */
        if (tid < nh)
            ml[mlo + tid] = make_float2(-INFINITY, 0.0f);
        return;
    }
    const int c1 = min(c0 + chunk, p_i + 1);
    /* Row-head index of position 0 of this slot and KV head; + p * hkv. */
    const size_t rh0 = (size_t)slot[i] * max_seq * hkv + (size_t)(kv_base + jj);
    const int ng = (hd + QS_KV_GROUP - 1) / QS_KV_GROUP;

    const int sub = lane % L, lg = warp * RW + lane / L, d0 = sub * 8;
    const bool dv = d0 < hd;
    float qf[G][8], acc[G][8];
#pragma unroll
    for (int g = 0; g < G; g++) {
        uint4 u = make_uint4(0, 0, 0, 0);
        if (g < nh && dv)
            u = __ldg(reinterpret_cast<const uint4 *>(q + ((size_t)i * hq + h0 + g) * hd + d0));
        att_unpack8(u, qf[g]);
#pragma unroll
        for (int e = 0; e < 8; e++)
            qf[g][e] *= qscale, acc[g][e] = 0.0f;
    }
    if (tid < G)
        s_m[tid] = -INFINITY, s_l[tid] = 0.0f;

    for (int t0 = c0; t0 < c1; t0 += ATT_TILE) {
        kvq_raw<F> kr[KSTEP], vr[KSTEP];
#pragma unroll
        for (int k = 0; k < KSTEP; k++) {
            const int p = t0 + lg + NG * k;
            kr[k] = p < c1 && dv ? kvq_load<F>(kc, ks, rh0 + (size_t)p * hkv, hd, ng, d0)
                                 : kvq_zero<F>();
        }
#pragma unroll
        for (int k = 0; k < KSTEP; k++) {
            const int r = lg + NG * k;
            float kf[8], dot[G];
            kvq_unpack<F>(kr[k], kf);
#pragma unroll
            for (int g = 0; g < G; g++) {
                float a = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; e++)
                    a = fmaf(qf[g][e], kf[e], a);
                dot[g] = a;
            }
            int hb = 0;
            att_rs<G, L / 2>::run(dot, lane, hb);
            if (sub % (L / G) == 0)
                s_p[hb][r] = t0 + r < c1 ? dot[0] : -INFINITY;
        }
        /* V in flight across the barrier and the softmax, in K's registers. */
#pragma unroll
        for (int k = 0; k < KSTEP; k++) {
            const int p = t0 + lg + NG * k;
            vr[k] = p < c1 && dv ? kvq_load<F>(vc, vs, rh0 + (size_t)p * hkv, hd, ng, d0)
                                 : kvq_zero<F>();
        }
        __syncthreads();
        /* Online softmax, one warp per head: the tile's max, p = exp2(s - m). */
        for (int g = warp; g < G; g += ATT_THREADS / 32) {
            const float x0 = s_p[g][lane], x1 = s_p[g][lane + 32];
            const float mo = s_m[g], mn = fmaxf(mo, att_warp_max(fmaxf(x0, x1)));
            const float e0 = exp2f(x0 - mn), e1 = exp2f(x1 - mn);
            s_p[g][lane] = e0, s_p[g][lane + 32] = e1;
            const float sum = att_warp_sum(e0 + e1);
            if (lane == 0) {
                const float al = exp2f(mo - mn); /* 0 on the first tile */
                s_a[g] = al, s_l[g] = s_l[g] * al + sum, s_m[g] = mn;
            }
        }
        __syncthreads();
#pragma unroll
        for (int g = 0; g < G; g++) {
            const float al = s_a[g];
#pragma unroll
            for (int e = 0; e < 8; e++)
                acc[g][e] *= al;
        }
#pragma unroll
        for (int k = 0; k < KSTEP; k++) {
            const int r = lg + NG * k;
            float vf[8];
            kvq_unpack<F>(vr[k], vf);
#pragma unroll
            for (int g = 0; g < G; g++) {
                const float pg = s_p[g][r];
#pragma unroll
                for (int e = 0; e < 8; e++)
                    acc[g][e] = fmaf(pg, vf[e], acc[g][e]);
            }
        }
        __syncthreads(); /* s_p, s_a are rewritten by the next tile */
    }

#pragma unroll
    for (int g = 0; g < G; g++) {
        float *red = &s_red[lg][g][0];
        *reinterpret_cast<float4 *>(red + sub * 4) =
            make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
        *reinterpret_cast<float4 *>(red + D / 2 + sub * 4) =
            make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
    }
    __syncthreads();
    /* x runs over s_red's order (contiguous reads); d is the dimension. */
    for (int idx = tid; idx < nh * D; idx += ATT_THREADS) {
        const int g = idx / D, x = idx % D;
        const int d = 8 * ((x % (D / 2)) / 4) + 4 * (x / (D / 2)) + x % 4;
        if (d >= hd)
            continue;
        float o = 0.0f;
#pragma unroll
        for (int r = 0; r < NG; r++)
            o += s_red[r][g][x];
        if (splits == 1)
            out[((size_t)i * hq + h0 + g) * hd + d] = __float2half_rn(o / s_l[g]);
        else
            po[(mlo + g) * hd + d] = o;
    }
    if (splits > 1 && tid < nh)
        ml[mlo + tid] = make_float2(s_m[tid], s_l[tid]);
}

/* ---- Decode: combine --------------------------------------------------------------
 * Grid n * hq, ATT_THREADS threads (thread d: output dimension d): with M
 * the largest partial max, out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M)
 * l_s, in fp32; empty partials (l = 0) weigh 0 and their o is not read. */
__global__ void __launch_bounds__(ATT_THREADS)
    attn_combine_kernel(const float2 *__restrict__ ml, const float *__restrict__ po, int n, int hq,
                        int hd, int splits, __half *__restrict__ out)
{
    QS_SHARED(float, s_m, [ATT_MAX_SPLITS]);
    QS_SHARED(float, s_w, [ATT_MAX_SPLITS]);
    const int tid = threadIdx.x;
    const size_t ih = blockIdx.x, nhq = (size_t)n * hq;
    for (int s = tid; s < splits; s += ATT_THREADS) {
        const float2 v = ml[s * nhq + ih];
        s_m[s] = v.x, s_w[s] = v.y;
    }
    __syncthreads();
    float M = -INFINITY;
    for (int s = 0; s < splits; s++)
        M = fmaxf(M, s_m[s]);
    float Lsum = 0.0f;
    for (int s = 0; s < splits; s++) {
        const float l = s_w[s];
        if (l > 0.0f)
            Lsum += l * exp2f(s_m[s] - M);
    }
    const float inv = 1.0f / Lsum;
    for (int d = tid; d < hd; d += ATT_THREADS) {
        float o = 0.0f;
        for (int s = 0; s < splits; s++)
            if (s_w[s] > 0.0f)
                o += exp2f(s_m[s] - M) * po[(s * nhq + ih) * hd + d];
        out[ih * hd + d] = __float2half_rn(o * inv);
    }
}

/* ---- Prefill: tiled tensor-core kernel -------------------------------------------
 * Grid (ceil(n * heads per KV head / 64), nkvu), ATT_THREADS threads, dynamic
 * shared memory pf_smem<D>::bytes. Warp w owns rows 16w..16w+15 of the tile;
 * in the SIMT parts lane = row + 16 * half, the half choosing 32 of the 64
 * positions (softmax) or D/2 of the output columns. */
template <int D> struct pf_smem {
    static constexpr int LDK = D + 8; /* halves: Q, K, V rows */
    static constexpr int SCR = D + 4; /* floats: S (64 used) and P V rows */
    static constexpr size_t q = 0, k = q + (size_t)PF_ROWS * LDK * 2,
                            v = k + (size_t)ATT_TILE * LDK * 2, p = v + (size_t)ATT_TILE * LDK * 2,
                            s = p + (size_t)PF_ROWS * PF_PLD * 2,
                            rp = s + (size_t)PF_ROWS * SCR * 4, bytes = rp + PF_ROWS * 4;
    static_assert(SCR >= ATT_TILE + 4, "scratch rows hold S");
};

template <int D, int F>
__global__ void __launch_bounds__(ATT_THREADS)
    attn_prefill_kernel(const __half *__restrict__ q, const void *__restrict__ kc,
                        const void *__restrict__ vc, const __half2 *__restrict__ ks,
                        const __half2 *__restrict__ vs, const uint32_t *__restrict__ slot,
                        const uint32_t *__restrict__ pos, int n, int hq, int hkv, int hd, int group,
                        int q_first, int kv_base, int max_seq, float qscale,
                        __half *__restrict__ out)
{
    using namespace nvcuda;
    typedef pf_smem<D> SM;
    constexpr int LDK = SM::LDK, SCR = SM::SCR, CH = D / 8; /* 16-byte chunks per row */
    QS_DYN_SMEM(float4, smem); /* no static shared memory: the base is the window's */
    unsigned char *sb = reinterpret_cast<unsigned char *>(smem);
    __half *Qs = reinterpret_cast<__half *>(sb + SM::q),
           *Ks = reinterpret_cast<__half *>(sb + SM::k);
    __half *Vs = reinterpret_cast<__half *>(sb + SM::v),
           *Ps = reinterpret_cast<__half *>(sb + SM::p);
    float *Sc = reinterpret_cast<float *>(sb + SM::s);
    int *Rp = reinterpret_cast<int *>(sb + SM::rp);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, jj = (int)blockIdx.y;
    int h0, h1;
    att_heads(jj, hq, group, q_first, &h0, &h1);
    const int nh = h1 - h0;
    const long long rows = (long long)n * nh, r0 = (long long)blockIdx.x * PF_ROWS;
    if (r0 >= rows)
        return; /* the whole block: this KV head has fewer rows */
    const size_t rh0 = (size_t)slot[r0 / nh] * max_seq * hkv + (size_t)(kv_base + jj);
    const int ng = (hd + QS_KV_GROUP - 1) / QS_KV_GROUP;

    if (tid < PF_ROWS) { /* rows past the end take position 0: finite, never written */
        const long long r = r0 + tid;
        Rp[tid] = r < rows ? (int)min(pos[r / nh], (uint32_t)(max_seq - 1)) : 0;
    }
    for (int u = tid; u < PF_ROWS * CH; u += ATT_THREADS) {
        const int r = u / CH, c = u % CH;
        const long long gr = r0 + r;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (gr < rows && c * 8 < hd) {
            const long long t = gr / nh;
            const int h = h0 + (int)(gr % nh);
            v = __ldg(reinterpret_cast<const uint4 *>(q + ((size_t)t * hq + h) * hd + c * 8));
        }
        *reinterpret_cast<uint4 *>(Qs + r * LDK + c * 8) = v;
    }
    __syncthreads();
    int maxp = 0;
    for (int r = 0; r < PF_ROWS; r++)
        maxp = max(maxp, Rp[r]);
    const int lr = lane & 15, hf = lane >> 4, myrow = warp * 16 + lr, mypos = Rp[myrow];
    const int nd16 = (hd + 15) / 16; /* 16-column blocks that carry data */
    float m = -INFINITY, l = 0.0f, o[D / 2];
#pragma unroll
    for (int j = 0; j < D / 2; j++)
        o[j] = 0.0f;
    float *Sw = Sc + warp * 16 * SCR;
    __half *Pw = Ps + warp * 16 * PF_PLD;

    for (int t0 = 0; t0 <= maxp; t0 += ATT_TILE) {
        __syncthreads(); /* the previous tile's K and V are no longer read */
        for (int u = tid; u < ATT_TILE * CH; u += ATT_THREADS) {
            const int r = u / CH, c = u % CH, p = t0 + r;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = kv;
            if (p <= maxp && c * 8 < hd) { /* maxp: the tile's last position, in the cache */
                const size_t rh = rh0 + (size_t)p * hkv;
                kv = kvq_half8<F>(kvq_load<F>(kc, ks, rh, hd, ng, c * 8));
                vv = kvq_half8<F>(kvq_load<F>(vc, vs, rh, hd, ng, c * 8));
            }
            *reinterpret_cast<uint4 *>(Ks + r * LDK + c * 8) = kv;
            *reinterpret_cast<uint4 *>(Vs + r * LDK + c * 8) = vv;
        }
        __syncthreads();

        /* S (16 x 64) = Q K^T; K's rows are B's columns (col_major). */
        {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf[ATT_TILE / 16];
#pragma unroll
            for (int b = 0; b < ATT_TILE / 16; b++)
                wmma::fill_fragment(sf[b], 0.0f);
            for (int kk = 0; kk < nd16; kk++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
                wmma::load_matrix_sync(fa, Qs + warp * 16 * LDK + kk * 16, LDK);
#pragma unroll
                for (int b = 0; b < ATT_TILE / 16; b++) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
                    wmma::load_matrix_sync(fb, Ks + b * 16 * LDK + kk * 16, LDK);
                    wmma::mma_sync(sf[b], fa, fb, sf[b]);
                }
            }
#pragma unroll
            for (int b = 0; b < ATT_TILE / 16; b++)
                wmma::store_matrix_sync(Sw + b * 16, sf[b], SCR, wmma::mem_row_major);
        }
        __syncwarp();

        /* Online softmax on the lane's 32 positions of its row; the row's
         * other half is lane ^ 16. Every row has position 0 <= its own, so
         * m is finite from the first tile on. */
        float sv[32];
#pragma unroll
        for (int c4 = 0; c4 < 8; c4++) {
            const float4 x = *reinterpret_cast<const float4 *>(Sw + lr * SCR + hf * 32 + 4 * c4);
            sv[4 * c4] = x.x, sv[4 * c4 + 1] = x.y, sv[4 * c4 + 2] = x.z, sv[4 * c4 + 3] = x.w;
        }
        float mx = -INFINITY;
#pragma unroll
        for (int c = 0; c < 32; c++) {
            sv[c] = t0 + hf * 32 + c <= mypos ? sv[c] * qscale : -INFINITY;
            mx = fmaxf(mx, sv[c]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        const float mn = fmaxf(m, mx), al = exp2f(m - mn);
        float sum = 0.0f;
#pragma unroll
        for (int c8 = 0; c8 < 4; c8++) {
            union {
                uint4 u;
                __half2 h[4];
            } t;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int c = 8 * c8 + 2 * e;
                t.h[e] = __floats2half2_rn(exp2f(sv[c] - mn), exp2f(sv[c + 1] - mn));
                const float2 f = __half22float2(t.h[e]); /* the sum of what P V multiplies */
                sum += f.x + f.y;
            }
            *reinterpret_cast<uint4 *>(Pw + lr * PF_PLD + hf * 32 + 8 * c8) = t.u;
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 16);
        l = l * al + sum, m = mn;
#pragma unroll
        for (int j = 0; j < D / 2; j++)
            o[j] *= al;
        __syncwarp();

        /* P V (16 x D) into the scratch, then added to the lane's columns. */
        {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> of[D / 16];
#pragma unroll
            for (int b = 0; b < D / 16; b++)
                wmma::fill_fragment(of[b], 0.0f);
#pragma unroll
            for (int kk = 0; kk < ATT_TILE / 16; kk++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fp;
                wmma::load_matrix_sync(fp, Pw + kk * 16, PF_PLD);
#pragma unroll
                for (int b = 0; b < D / 16; b++) {
                    if (b < nd16) {
                        wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fv;
                        wmma::load_matrix_sync(fv, Vs + kk * 16 * LDK + b * 16, LDK);
                        wmma::mma_sync(of[b], fp, fv, of[b]);
                    }
                }
            }
#pragma unroll
            for (int b = 0; b < D / 16; b++)
                if (b < nd16)
                    wmma::store_matrix_sync(Sw + b * 16, of[b], SCR, wmma::mem_row_major);
        }
        __syncwarp();
#pragma unroll
        for (int c4 = 0; c4 < D / 8; c4++) {
            const int col = hf * (D / 2) + 4 * c4;
            if (col < nd16 * 16) {
                const float4 x = *reinterpret_cast<const float4 *>(Sw + lr * SCR + col);
                o[4 * c4] += x.x, o[4 * c4 + 1] += x.y, o[4 * c4 + 2] += x.z, o[4 * c4 + 3] += x.w;
            }
        }
    }

    const long long gr = r0 + myrow;
    if (gr < rows) {
        const long long t = gr / nh;
        const int h = h0 + (int)(gr % nh);
        __half *orow = out + ((size_t)t * hq + h) * hd;
        const float inv = 1.0f / l;
#pragma unroll
        for (int c8 = 0; c8 < D / 16; c8++) {
            const int col = hf * (D / 2) + 8 * c8;
            if (col < hd) {
                union {
                    uint4 u;
                    __half2 h[4];
                } t8;
#pragma unroll
                for (int e = 0; e < 4; e++)
                    t8.h[e] =
                        __floats2half2_rn(o[8 * c8 + 2 * e] * inv, o[8 * c8 + 2 * e + 1] * inv);
                *reinterpret_cast<uint4 *>(orow + col) = t8.u;
            }
        }
    }
}

/* ---- Host side ------------------------------------------------------------------ */

typedef struct att_shape {
    int kv_base, nkvu, nhmax;
} att_shape;

static int att_check(const char *who, const void *q, const qs_cuda_kv *kv, size_t n,
                     const uint32_t *slot, const uint32_t *pos, unsigned hq, unsigned hkv,
                     unsigned hd, unsigned group, unsigned q_first, unsigned kv_first,
                     unsigned max_seq, const void *out, att_shape *sh)
{
    if (!q || !kv || !kv->k || !kv->v || !slot || !pos || !out)
        return qs_seterr(QS_EINVAL, "%s: NULL q, cache, slot, position or output array", who);
    if (kv->format != QS_KV_FP16 && kv->format != QS_KV_INT8 && kv->format != QS_KV_INT4)
        return qs_seterr(QS_EINVAL, "%s: KV cache format %d: use fp16 (0), int8 (1) or int4 (2)",
                         who, kv->format);
    if (kv->format != QS_KV_FP16 && (!kv->ks || !kv->vs))
        return qs_seterr(QS_EINVAL, "%s: an int8/int4 cache needs its scale arrays", who);
    if (n > (1u << 24))
        return qs_seterr(QS_EINVAL, "%s: %zu tokens in one call; split the batch below 2^24", who,
                         n);
    if (hd < 8 || hd > 128 || hd % 8)
        return qs_seterr(QS_EINVAL,
                         "%s: head dimension %u; the kernels take multiples of 8 from 8 to 128 "
                         "(16-byte rows)",
                         who, hd);
    if (hq == 0 || hkv == 0 || group == 0 || hq > 4096 || hkv > 4096 || group > 4096)
        return qs_seterr(QS_EINVAL, "%s: %u query heads, %u KV heads, group %u: each 1..4096", who,
                         hq, hkv, group);
    if ((uint64_t)n * hq > 0x7fffffffu)
        return qs_seterr(QS_EINVAL, "%s: %zu tokens x %u heads is over the grid; split the batch",
                         who, n, hq);
    if (max_seq == 0 || max_seq > (1u << 24))
        return qs_seterr(QS_EINVAL, "%s: max_seq %u, use 1..2^24", who, max_seq);
    if (q_first > (1u << 20) || kv_first > (1u << 20))
        return qs_seterr(QS_EINVAL, "%s: q_first %u or kv_first %u out of range", who, q_first,
                         kv_first);
    const unsigned lo = q_first / group, hi = (q_first + hq - 1) / group;
    if (lo < kv_first || hi - kv_first >= hkv)
        return qs_seterr(QS_EINVAL,
                         "%s: query heads %u..%u read KV heads %u..%u (group %u), but this "
                         "cache holds KV heads %u..%u: check q_first, kv_first and hkv",
                         who, q_first, q_first + hq - 1, lo, hi, group, kv_first,
                         kv_first + hkv - 1);
    if (((uintptr_t)q | (uintptr_t)kv->k | (uintptr_t)kv->v | (uintptr_t)kv->ks |
         (uintptr_t)kv->vs | (uintptr_t)out) &
        15)
        return qs_seterr(QS_EINVAL,
                         "%s: q, the caches and out must be 16-byte aligned (the kernels read "
                         "rows with 16-byte loads)",
                         who);
    sh->kv_base = (int)(lo - kv_first);
    sh->nkvu = (int)(hi - lo + 1);
    sh->nhmax = (int)(group < hq ? group : hq);
    return QS_OK;
}

static float att_qscale(unsigned hd)
{
    return (float)(1.4426950408889634 / sqrt((double)hd)); /* log2(e) / sqrt(hd) */
}

/* What every decode launch takes besides the kernel's template arguments. */
typedef struct att_args {
    const void *q;
    const qs_cuda_kv *kv;
    size_t n;
    const uint32_t *slot, *pos;
    unsigned hq, hkv, hd, group, q_first, max_seq, chunk, splits;
    att_shape sh;
    float2 *ml;
    float *po;
    void *out;
    cudaStream_t st;
} att_args;

template <int D, int G, int F> static int split_launch(const att_args &a)
{
    dim3 grid((unsigned)(a.n * a.sh.nkvu), a.splits, (unsigned)((a.sh.nhmax + G - 1) / G));
    QS_LAUNCH(grid, ATT_THREADS, 0, a.st, attn_split_kernel<D, G, F>)
    ((const __half *)a.q, a.kv->k, a.kv->v, (const __half2 *)a.kv->ks, (const __half2 *)a.kv->vs,
     a.slot, a.pos, (int)a.n, (int)a.hq, (int)a.hkv, (int)a.hd, (int)a.group, (int)a.q_first,
     a.sh.kv_base, a.sh.nkvu, (int)a.max_seq, (int)a.chunk, (int)a.splits, att_qscale(a.hd), a.ml,
     a.po, (__half *)a.out);
    QS_CU_LAUNCH("attn_split_kernel");
    return QS_OK;
}

template <int D, int F> static int split_launch_g(int g, const att_args &a)
{
    if (g <= 1)
        return split_launch<D, 1, F>(a);
    if (g <= 2)
        return split_launch<D, 2, F>(a);
    if (g <= 4)
        return split_launch<D, 4, F>(a);
    return split_launch<D, 8, F>(a);
}

template <int F> static int split_launch_d(int g, const att_args &a)
{
    return a.hd <= 64 ? split_launch_g<64, F>(g, a) : split_launch_g<128, F>(g, a);
}

extern "C" int qs_cuda_attention_kvq(const void *q, const qs_cuda_kv *kv, size_t n,
                                     const uint32_t *slot, const uint32_t *pos, unsigned hq,
                                     unsigned hkv, unsigned hd, unsigned group, unsigned q_first,
                                     unsigned kv_first, unsigned max_seq, void *ws, void *out,
                                     void *stream)
{
    att_shape sh;
    int err = att_check("qs_cuda_attention", q, kv, n, slot, pos, hq, hkv, hd, group, q_first,
                        kv_first, max_seq, out, &sh);
    if (err)
        return err;
    if (n == 0)
        return QS_OK;
    const unsigned chunk = att_chunk(max_seq), splits = att_splits(max_seq);
    if (splits > 1 && (!ws || ((uintptr_t)ws & 15)))
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_attention: max_seq %u takes %u splits: pass a 16-byte aligned "
                         "workspace of qs_cuda_attention_ws_bytes() = %zu bytes",
                         max_seq, splits, qs_cuda_attention_ws_bytes(n, hq, hd, max_seq));
    float2 *ml = splits > 1 ? (float2 *)ws : NULL;
    float *po = splits > 1 ? (float *)((char *)ws + att_ml_bytes(splits, n, hq)) : NULL;
    cudaStream_t st = QS_CU_STREAM(stream);
    const int g = sh.nhmax < ATT_GMAX ? sh.nhmax : ATT_GMAX;
    const att_args a = {q,       kv,      n,     slot,   pos, hq, hkv, hd,  group,
                        q_first, max_seq, chunk, splits, sh,  ml, po,  out, st};
    err = kv->format == QS_KV_INT8   ? split_launch_d<QS_KV_INT8>(g, a)
          : kv->format == QS_KV_INT4 ? split_launch_d<QS_KV_INT4>(g, a)
                                     : split_launch_d<QS_KV_FP16>(g, a);
    if (err || splits == 1)
        return err;
    QS_LAUNCH(dim3((unsigned)(n * hq)), ATT_THREADS, 0, st, attn_combine_kernel)
    (ml, po, (int)n, (int)hq, (int)hd, (int)splits, (__half *)out);
    QS_CU_LAUNCH("attn_combine_kernel");
    return QS_OK;
}

extern "C" int qs_cuda_attention(const void *q, const void *kc, const void *vc, size_t n,
                                 const uint32_t *slot, const uint32_t *pos, unsigned hq,
                                 unsigned hkv, unsigned hd, unsigned group, unsigned q_first,
                                 unsigned kv_first, unsigned max_seq, void *ws, void *out,
                                 void *stream)
{
    const qs_cuda_kv kv = {QS_KV_FP16, (void *)kc, (void *)vc, NULL, NULL};
    return qs_cuda_attention_kvq(q, &kv, n, slot, pos, hq, hkv, hd, group, q_first, kv_first,
                                 max_seq, ws, out, stream);
}

template <int D, int F>
static int prefill_launch(const void *q, const qs_cuda_kv *kv, size_t n, const uint32_t *slot,
                          const uint32_t *pos, unsigned hq, unsigned hkv, unsigned hd,
                          unsigned group, unsigned q_first, const att_shape &sh, unsigned max_seq,
                          void *out, cudaStream_t st)
{
    const size_t smem = pf_smem<D>::bytes;
    if (smem > 48 * 1024)
        QS_CU(cudaFuncSetAttribute(attn_prefill_kernel<D, F>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid((unsigned)((n * sh.nhmax + PF_ROWS - 1) / PF_ROWS), (unsigned)sh.nkvu);
    QS_LAUNCH(grid, ATT_THREADS, smem, st, attn_prefill_kernel<D, F>)
    ((const __half *)q, kv->k, kv->v, (const __half2 *)kv->ks, (const __half2 *)kv->vs, slot, pos,
     (int)n, (int)hq, (int)hkv, (int)hd, (int)group, (int)q_first, sh.kv_base, (int)max_seq,
     att_qscale(hd), (__half *)out);
    QS_CU_LAUNCH("attn_prefill_kernel");
    return QS_OK;
}

template <int F>
static int prefill_launch_d(const void *q, const qs_cuda_kv *kv, size_t n, const uint32_t *slot,
                            const uint32_t *pos, unsigned hq, unsigned hkv, unsigned hd,
                            unsigned group, unsigned q_first, const att_shape &sh, unsigned max_seq,
                            void *out, cudaStream_t st)
{
    if (hd <= 64)
        return prefill_launch<64, F>(q, kv, n, slot, pos, hq, hkv, hd, group, q_first, sh, max_seq,
                                     out, st);
    return prefill_launch<128, F>(q, kv, n, slot, pos, hq, hkv, hd, group, q_first, sh, max_seq,
                                  out, st);
}

extern "C" int qs_cuda_attention_prefill_kvq(const void *q, const qs_cuda_kv *kv, size_t n,
                                             const uint32_t *slot, const uint32_t *pos, unsigned hq,
                                             unsigned hkv, unsigned hd, unsigned group,
                                             unsigned q_first, unsigned kv_first, unsigned max_seq,
                                             void *out, void *stream)
{
    att_shape sh;
    int err = att_check("qs_cuda_attention_prefill", q, kv, n, slot, pos, hq, hkv, hd, group,
                        q_first, kv_first, max_seq, out, &sh);
    if (err || n == 0)
        return err;
    cudaStream_t st = QS_CU_STREAM(stream);
    if (kv->format == QS_KV_INT8)
        return prefill_launch_d<QS_KV_INT8>(q, kv, n, slot, pos, hq, hkv, hd, group, q_first, sh,
                                            max_seq, out, st);
    if (kv->format == QS_KV_INT4)
        return prefill_launch_d<QS_KV_INT4>(q, kv, n, slot, pos, hq, hkv, hd, group, q_first, sh,
                                            max_seq, out, st);
    return prefill_launch_d<QS_KV_FP16>(q, kv, n, slot, pos, hq, hkv, hd, group, q_first, sh,
                                        max_seq, out, st);
}

extern "C" int qs_cuda_attention_prefill(const void *q, const void *kc, const void *vc, size_t n,
                                         const uint32_t *slot, const uint32_t *pos, unsigned hq,
                                         unsigned hkv, unsigned hd, unsigned group,
                                         unsigned q_first, unsigned kv_first, unsigned max_seq,
                                         void *out, void *stream)
{
    const qs_cuda_kv kv = {QS_KV_FP16, (void *)kc, (void *)vc, NULL, NULL};
    return qs_cuda_attention_prefill_kvq(q, &kv, n, slot, pos, hq, hkv, hd, group, q_first,
                                         kv_first, max_seq, out, stream);
}
