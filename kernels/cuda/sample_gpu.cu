/* sample_gpu.cu: one token per row of logits on the device, the CPU
 * sampler's token (shard/sampler.c, qs_sample) for the same logits and RNG
 * state (qs_kernels.h, qs_cuda_sample).
 *
 * Shapes: logits n x V fp32; params, state, tokens [n] (device); ws
 * qs_cuda_sample_ws_bytes(n, V). One CTA of 1024 threads per row; every
 * launch depends on (n, V) only, all decisions on values are taken inside
 * the CTA, block-uniformly.
 *
 * What the CPU does, and how the CTA does the same:
 *
 *  1. Greedy (temperature 0, not finite, or V < 2): the first maximum
 *     (NaN never wins; a NaN logit 0 gives 0, as the CPU's loop). One pass,
 *     16-byte loads, a (value, index) reduction. Nothing else runs.
 *
 *  2. p_i = expf((l_i - max) / T) in fp32 (IEEE division, expf: the CPU's
 *     expression), summed in double.
 *
 *  3. No truncation (top_p = 1, top_k 0 or >= V): u = U * sum p, the first
 *     id whose running sum in id order exceeds u. The CPU's running sum is
 *     one sequential chain; here each thread sums a contiguous run of ids in
 *     order, each warp chains its 32 runs in order, the block chains its 32
 *     warps in order. That prefix F is monotone and F(V-1) is the sum, so
 *     the thread whose run crosses u is unique and rescans its run: the pick
 *     is exactly min{i : F(i) > u} (V-1 when u >= sum, as on the CPU).
 *
 *  4. Truncation: candidates ordered by (p desc, id asc), which is a 64-bit
 *     key (p's bits above V-1-id; all keys distinct), never a sort of the
 *     vocabulary. p goes to ws once; a radix select (11-bit digits, counts
 *     in shared memory, stopping as soon as the bucket holding the m-th key
 *     is taken whole) finds the threshold above which exactly m keys lie;
 *     those m are gathered into shared memory and bitonic-sorted. m = keep =
 *     min(top_k, V) when that is at most QS_SAMPLE_CAP (4096): one chunk,
 *     and thread 0 then runs the CPU's loops on the sorted candidates
 *     verbatim (mass, nucleus, draw: the same double additions in the same
 *     order). With more (top_p alone, or top_k > 4096) the mass comes from
 *     a block sum, and the sorted order is walked in chunks of 4096 (each
 *     the next 4096 keys below the last chunk's threshold) until the
 *     nucleus is complete; each chunk's threshold and starting running sum
 *     are kept in ws, so the draw re-gathers only the chunk that holds u.
 *     Typical nucleus sizes need one chunk; a flat distribution with top_p
 *     near 1 costs a few passes per 4096 tokens of nucleus.
 *
 *  Every sum has a fixed order (no float atomics; only integer counts are
 *  atomic), so ranks holding the same logits draw the same token on any
 *  number of GPUs, run after run.
 *
 * Where the bits can differ from the CPU's, and what it does to the token:
 *  - expf: under the harness it is glibc's, so p is bit for bit the CPU's.
 *    On a GPU, CUDA's expf is within 2 ulp of the exact value; every p can
 *    differ from glibc's in the last bits. Then a token differs only when u
 *    falls within a few ulp of a boundary of the running sum (a chance of
 *    about 1e-7 per draw), or when two candidates within 2 ulp of each other
 *    straddle the top-k or nucleus boundary (order flips). Exact ties (equal
 *    logits) stay exact ties and break by id on both.
 *  - Summation order, on the harness and on GPUs alike: the total in case 3
 *    and the mass in case 4 with more than 4096 kept tokens are sums in a
 *    different order than the CPU's sequential ones, so they can differ in
 *    the last bits (relative V * 2^-53 at worst). A token then differs only
 *    if u, or top_p * mass, falls within that of a boundary: at most about
 *    V * 2^-53 (3e-11 at V = 256k) per draw. Sums that are exact (small
 *    integers, ties, power-of-two probabilities) are equal in any order, so
 *    such boundary cases, the ones tests construct, agree exactly.
 *  - NaN logits and an infinite maximum: the CPU's result is undefined
 *    (qsort on NaN); here such p are 0 and the token is still in [0, V).
 */
#include <math.h>

#include "rowops.cuh"

#define SM_THREADS    512
#define SM_WARPS      (SM_THREADS / 32)
#define SM_RB         11 /* radix digit bits */
#define SM_NB         (1 << SM_RB)
#define SM_BPT        (SM_NB / SM_THREADS) /* buckets per thread */
#define QS_SAMPLE_CAP 4096                 /* candidates sorted in shared memory at a time */

typedef unsigned long long u64;

/* A chunk of the walk in ws: its threshold key and the running sum before it. */
struct sample_rec {
    u64 T;
    double acc;
};

__host__ __device__ __forceinline__ size_t sample_vp(size_t V)
{
    return (V + 3) & ~(size_t)3;
}

static size_t sample_row_bytes(size_t V)
{
    return sample_vp(V) * 4 + (V + QS_SAMPLE_CAP - 1) / QS_SAMPLE_CAP * sizeof(sample_rec);
}

/* The CPU's probability; a NaN (NaN logit, infinite maximum) becomes 0. */
__device__ __forceinline__ float sm_prob(float l, float mx, float T)
{
    const float p = expf((l - mx) / T);
    return p >= 0.0f ? p : 0.0f;
}

/* (p desc, id asc) as one unsigned order: p >= 0 so its bits order as p. */
__device__ __forceinline__ u64 sm_key(uint32_t pbits, uint32_t e, uint32_t V, int idb)
{
    return ((u64)pbits << idb) | (u64)(V - 1 - e);
}

__device__ __forceinline__ float sm_key_p(u64 k, int idb)
{
    return __uint_as_float((uint32_t)(k >> idb));
}

__device__ __forceinline__ int32_t sm_key_id(u64 k, uint32_t V, int idb)
{
    return (int32_t)(V - 1 - (uint32_t)(k & ((1ull << idb) - 1)));
}

/* shard/sampler.c's next_uniform: xorshift64*, 53 bits. */
__device__ __forceinline__ u64 sm_next_uniform(u64 s, double *u)
{
    u64 x = s ? s : 0x2545f4914f6cdd1dull;
    x ^= x >> 12, x ^= x << 25, x ^= x >> 27;
    *u = (double)((x * 0x2545f4914f6cdd1dull) >> 11) * (1.0 / 9007199254740992.0);
    return x;
}

/* Exclusive prefix sum over the block in thread order; sh: 32 slots. */
__device__ __forceinline__ unsigned sm_excl_scan(unsigned v, unsigned *sh)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned x = v;
    QS_UNROLL
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o)
            x += y;
    }
    __syncthreads();
    if (lane == 31)
        sh[warp] = x;
    __syncthreads();
    unsigned before = 0;
    for (int w = 0; w < warp; w++)
        before += sh[w];
    return before + x - v;
}

/* Shared state of one row's CTA. */
struct sm_shared {
    uint32_t *hist;  /* [SM_NB] digit counts */
    u64 *cand;       /* [QS_SAMPLE_CAP] candidate keys */
    unsigned *scan;  /* [32] */
    unsigned *res;   /* [4] select result; [3] gather count */
    double *red;     /* [32] */
    const uint4 *pb; /* p's bits, Vp / 4 vectors (ws) */
    uint32_t V;
    int idb, kbits;
};

/* Calls f(key) for every key of the row (p from ws), in a fixed order per
 * thread. */
template <class F> __device__ __forceinline__ void sm_for_keys(const sm_shared &s, F f)
{
    const uint32_t nv = (s.V + 3) / 4;
    for (uint32_t v = threadIdx.x; v < nv; v += SM_THREADS) {
        const uint4 q = s.pb[v];
        const uint32_t b[4] = {q.x, q.y, q.z, q.w};
        QS_UNROLL
        for (int c = 0; c < 4; c++)
            if (4 * v + c < s.V)
                f(sm_key(b[c], 4 * v + c, s.V, s.idb));
    }
}

/* The threshold T with exactly m keys in [T, B) (B absent: no bound); m is
 * at least 1 and at most the number of keys below B. Digits from the top;
 * stops when the bucket holding the m-th key is taken whole. */
__device__ u64 sm_select(const sm_shared &s, uint32_t m, bool hasB, u64 B)
{
    u64 prefix = 0;
    uint32_t need = m;
    int top = s.kbits, shift = top > SM_RB ? top - SM_RB : 0;
    for (;;) {
        const u64 dmask = (1ull << (top - shift)) - 1;
        for (int b = threadIdx.x; b < SM_NB; b += SM_THREADS)
            s.hist[b] = 0;
        __syncthreads(); /* also: every thread has read the last pass's res */
        if (threadIdx.x == 0)
            s.res[0] = SM_NB; /* no bucket found: a bug, caught below */
        const u64 hi = prefix >> top;
        /* A thread adds runs of one bucket at once: zero probabilities (a
         * low temperature underflows most of the vocabulary) or a flat row
         * would otherwise send every key's atomic to one address. */
        unsigned rb = 0, rn = 0;
        sm_for_keys(s, [&](u64 k) {
            if ((!hasB || k < B) && (k >> top) == hi) {
                const unsigned b = (unsigned)((k >> shift) & dmask);
                if (rn && b != rb)
                    atomicAdd(&s.hist[rb], rn), rn = 0;
                rb = b, rn++;
            }
        });
        if (rn)
            atomicAdd(&s.hist[rb], rn);
        __syncthreads();
        /* Thread t holds SM_BPT buckets from NB-1-BPT*t down: thread order
         * is descending bucket order. */
        unsigned c[SM_BPT], tot = 0;
        QS_UNROLL
        for (int q = 0; q < SM_BPT; q++)
            tot += c[q] = s.hist[SM_NB - 1 - SM_BPT * (int)threadIdx.x - q];
        unsigned ex = sm_excl_scan(tot, s.scan);
        QS_UNROLL
        for (int q = 0; q < SM_BPT; q++) {
            if (ex < need && need <= ex + c[q])
                s.res[0] = (unsigned)(SM_NB - 1 - SM_BPT * (int)threadIdx.x - q), s.res[1] = ex,
                s.res[2] = c[q];
            ex += c[q];
        }
        __syncthreads();
        const unsigned bucket = s.res[0];
        if (bucket >= SM_NB)
            return prefix; /* unreachable while m <= the keys below B */
        const unsigned above = s.res[1], cnt = s.res[2];
        prefix |= (u64)bucket << shift;
        need -= above;
        if (need == cnt || shift == 0)
            return prefix;
        top = shift;
        shift = shift > SM_RB ? shift - SM_RB : 0;
    }
}

/* The keys in [T, B) (there are m <= QS_SAMPLE_CAP) into cand, sorted in
 * descending order (bitonic; the padding up to a power of two is key 0,
 * which sorts last). */
__device__ void sm_gather_sort(const sm_shared &s, u64 T, bool hasB, u64 B)
{
    if (threadIdx.x == 0)
        s.res[3] = 0;
    __syncthreads();
    sm_for_keys(s, [&](u64 k) {
        if (k >= T && (!hasB || k < B)) {
            const unsigned at = atomicAdd(&s.res[3], 1u);
            if (at < QS_SAMPLE_CAP)
                s.cand[at] = k;
        }
    });
    __syncthreads();
    const unsigned m = min(s.res[3], (unsigned)QS_SAMPLE_CAP);
    unsigned n2 = 1;
    while (n2 < m)
        n2 <<= 1;
    for (unsigned i = m + threadIdx.x; i < n2; i += SM_THREADS)
        s.cand[i] = 0;
    __syncthreads();
    for (unsigned k = 2; k <= n2; k <<= 1)
        for (unsigned j = k >> 1; j > 0; j >>= 1) {
            for (unsigned t = threadIdx.x; t < n2 / 2; t += SM_THREADS) {
                const unsigned i = ((t & ~(j - 1)) << 1) | (t & (j - 1)), l = i + j;
                const u64 a = s.cand[i], b = s.cand[l];
                if ((i & k) == 0 ? a < b : a > b)
                    s.cand[i] = b, s.cand[l] = a;
            }
            __syncthreads();
        }
}

__global__ void __launch_bounds__(SM_THREADS)
    sample_kernel(const float *__restrict__ logits, uint32_t V, bool vec,
                  const qs_cuda_sample_params *__restrict__ params, u64 *__restrict__ state,
                  unsigned char *__restrict__ ws, size_t ws_row, int32_t *__restrict__ tokens)
{
    QS_SHARED(uint32_t, hist, [SM_NB]);
    QS_SHARED_ALIGNED(16, u64, cand, [QS_SAMPLE_CAP]);
    QS_SHARED(unsigned, scan, [32]);
    QS_SHARED(unsigned, res, [4]);
    QS_SHARED(double, red, [32]);
    QS_SHARED(float, redv, [32]);
    QS_SHARED(uint32_t, redi, [32]);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const size_t row = blockIdx.x;
    const float *l = logits + row * V;
    const qs_cuda_sample_params prm = params[row];
    const u64 st0 = state[row]; /* read by all before any write (thread 0, at the end) */

    /* ---- 1. The first maximum ---- */
    float bv = -INFINITY;
    uint32_t bi = V; /* none yet; every real index is below */
    if (vec) {       /* four 16-byte loads in flight per thread */
        for (uint32_t v0 = tid; v0 < V / 4; v0 += 4 * SM_THREADS) {
            float f[4][4];
            QS_UNROLL
            for (int r = 0; r < 4; r++)
                if (v0 + r * SM_THREADS < V / 4)
                    qs_ld_f4(l + 4 * (v0 + r * SM_THREADS), f[r]);
            QS_UNROLL
            for (int r = 0; r < 4; r++) {
                const uint32_t v = v0 + r * SM_THREADS;
                QS_UNROLL
                for (int c = 0; c < 4; c++)
                    if (v < V / 4 && (f[r][c] > bv || (f[r][c] == bv && 4 * v + c < bi)))
                        bv = f[r][c], bi = 4 * v + c;
            }
        }
    } else {
        for (uint32_t e = tid; e < V; e += SM_THREADS)
            if (l[e] > bv || (l[e] == bv && e < bi))
                bv = l[e], bi = e;
    }
    QS_UNROLL
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const uint32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi))
            bv = ov, bi = oi;
    }
    if (lane == 0)
        redv[warp] = bv, redi[warp] = bi;
    __syncthreads();
    bv = redv[0], bi = redi[0];
    for (int w = 1; w < SM_WARPS; w++)
        if (redv[w] > bv || (redv[w] == bv && redi[w] < bi))
            bv = redv[w], bi = redi[w];
    const uint32_t amax = (bi >= V || isnan(l[0])) ? 0 : bi;

    const float T = prm.temperature;
    if (!(T > 0.0f) || !isfinite(T) || V < 2) {
        if (tid == 0)
            tokens[row] = (int32_t)amax;
        return; /* the whole block */
    }
    const float mx = l[amax];
    const float tp = prm.top_p > 0.0f && prm.top_p < 1.0f ? prm.top_p : 1.0f;
    const uint32_t tk = prm.top_k;

    /* ---- 3. No truncation: the running sum in id order ---- */
    if (!(tp < 1.0f || (tk && tk < V))) {
        const uint32_t run = (V + SM_THREADS - 1) / SM_THREADS;
        const uint32_t e0 = min((uint32_t)tid * run, V), e1 = min(e0 + run, V);
        double S = 0;
        for (uint32_t e = e0; e < e1; e++)
            S += sm_prob(l[e], mx, T);
        double G = 0, W = 0; /* this thread's start within its warp; the warp's total */
        for (int L = 0; L < 32; L++) {
            const double t = __shfl_sync(0xffffffffu, S, L);
            if (lane == L)
                G = W;
            W += t;
        }
        if (lane == 0)
            red[warp] = W;
        if (tid == 0)
            res[0] = V - 1; /* overwritten by the thread whose run crosses u */
        __syncthreads();
        double Bw = 0, sum = 0;
        for (int w = 0; w < SM_WARPS; w++) {
            if (w == warp)
                Bw = sum;
            sum += red[w];
        }
        double u01;
        const u64 st1 = sm_next_uniform(st0, &u01);
        const double u = u01 * sum;
        const double before = Bw + G, after = Bw + (G + S);
        if (before <= u && u < after) { /* one thread: F crosses u in its run */
            double a = 0;
            uint32_t pick = e1 - 1;
            for (uint32_t e = e0; e < e1; e++) {
                a += sm_prob(l[e], mx, T);
                if (u < Bw + (G + a)) {
                    pick = e;
                    break;
                }
            }
            res[0] = pick;
        }
        __syncthreads();
        if (tid == 0) {
            tokens[row] = (int32_t)(u < sum ? res[0] : V - 1);
            state[row] = st1;
        }
        return;
    }

    /* ---- 4. Truncation: p to ws, radix select, sorted chunks ---- */
    uint32_t *pw = reinterpret_cast<uint32_t *>(ws + row * ws_row);
    sample_rec *rec = reinterpret_cast<sample_rec *>(ws + row * ws_row + sample_vp(V) * 4);
    const uint32_t keep = tk && tk < V ? tk : V;
    double tot = 0;
    for (uint32_t e = tid; e < (uint32_t)sample_vp(V); e += SM_THREADS) {
        const float p = e < V ? sm_prob(l[e], mx, T) : 0.0f;
        pw[e] = __float_as_uint(p);
        tot += p;
    }
    int idb = 1;
    while (idb < 32 && (V - 1) >> idb)
        idb++;
    sm_shared s = {hist, cand, scan,    res, red, reinterpret_cast<const uint4 *>(pw),
                   V,    idb,  30 + idb};
    double mass = 0; /* thread 0's, for keep > CAP; the chunk's own sum otherwise */
    if (keep > QS_SAMPLE_CAP) {
        if (keep == V) {
            mass = qs_block_sum(tot, red);
        } else {
            __syncthreads(); /* pw complete */
            const u64 Tk = sm_select(s, keep, false, 0);
            double part = 0;
            sm_for_keys(s, [&](u64 k) {
                if (k >= Tk)
                    part += sm_key_p(k, idb);
            });
            mass = qs_block_sum(part, red);
        }
    }
    __syncthreads(); /* pw complete and visible to the block */

    double acc = 0, target = (double)tp * mass; /* thread 0's running sum, as the CPU's */
    uint32_t done = 0, k = 0;
    bool hasB = false;
    u64 B = 0;
    unsigned j = 0;
    for (;;) {
        const uint32_t m = min(keep - done, (uint32_t)QS_SAMPLE_CAP);
        const u64 Tj = m == V - done ? 0 : sm_select(s, m, hasB, B);
        sm_gather_sort(s, Tj, hasB, B);
        if (tid == 0) {
            if (keep <= QS_SAMPLE_CAP) { /* the CPU's mass: sorted, in order */
                mass = 0;
                for (uint32_t i = 0; i < m; i++)
                    mass += sm_key_p(cand[i], idb);
                target = (double)tp * mass;
            }
            rec[j].T = Tj, rec[j].acc = acc;
            uint32_t i = 0;
            for (; i < m && acc < target; i++)
                acc += sm_key_p(cand[i], idb);
            k = done + i;
            res[0] = !(acc < target) || done + m == keep;
        }
        __syncthreads();
        const bool stop = res[0] != 0;
        __syncthreads(); /* res is written again by the next select */
        if (stop)
            break;
        hasB = true, B = Tj, done += m, j++;
    }

    /* The draw: the chunk whose running sums cross u, re-gathered unless it
     * is the last one (still in cand). */
    double u = 0;
    u64 st1 = 0;
    if (tid == 0) {
        double u01;
        st1 = sm_next_uniform(st0, &u01);
        u = u01 * acc;
        unsigned c = j + 1; /* none: the last nucleus token */
        for (unsigned q = 0; q <= j; q++)
            if (u < (q < j ? rec[q + 1].acc : acc)) {
                c = q;
                break;
            }
        res[1] = c;
    }
    __syncthreads();
    const unsigned c = res[1];
    if (c < j)
        sm_gather_sort(s, rec[c].T, c > 0, c > 0 ? rec[c - 1].T : 0);
    if (tid == 0) {
        int32_t pick;
        if (k == 0) { /* NaN or zero mass only (the CPU reads c[-1] there) */
            pick = sm_key_id(cand[0], V, idb);
        } else if (c > j) {
            pick = sm_key_id(cand[k - 1 - done], V, idb);
        } else {
            const uint32_t len = c < j ? QS_SAMPLE_CAP : k - done;
            double a = rec[c].acc;
            pick = sm_key_id(cand[len - 1], V, idb);
            for (uint32_t i = 0; i < len; i++) {
                a += sm_key_p(cand[i], idb);
                if (u < a) {
                    pick = sm_key_id(cand[i], V, idb);
                    break;
                }
            }
        }
        tokens[row] = pick;
        state[row] = st1;
    }
}

extern "C" size_t qs_cuda_sample_ws_bytes(size_t n, size_t V)
{
    return n * sample_row_bytes(V ? V : 1);
}

extern "C" int qs_cuda_sample(const float *logits, size_t n, size_t V,
                              const qs_cuda_sample_params *params, uint64_t *state, void *ws,
                              int32_t *tokens, void *stream)
{
    if (!logits || !params || !state || !ws || !tokens)
        return qs_seterr(QS_EINVAL, "qs_cuda_sample: logits, params, state, ws and tokens are "
                                    "required (ws: qs_cuda_sample_ws_bytes(n, V) bytes)");
    if (V < 1 || V > 0x7fffffff || n > 0x7fffffff || !qs_al16(ws))
        return qs_seterr(QS_EINVAL,
                         "qs_cuda_sample: V=%zu must be in 1..2^31-1, n=%zu below 2^31 and ws "
                         "16-byte aligned",
                         V, n);
    if (n == 0)
        return QS_OK;
    const bool vec = V % 4 == 0 && qs_al16(logits);
    QS_LAUNCH((unsigned)n, SM_THREADS, 0, QS_CU_STREAM(stream), sample_kernel)
    (logits, (uint32_t)V, vec, params, (u64 *)state, (unsigned char *)ws, sample_row_bytes(V),
     tokens);
    QS_CU_LAUNCH("sample_kernel");
    return QS_OK;
}
