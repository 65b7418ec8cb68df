/* quant_gpu.cu: the BCQ and RTN quantizers on the device (qs_kernels.h, "Quantizers and
 * synthetic weights on the device"): W (N x K fp32, device) straight into the device BCQ
 * layout of struct qs_cuda_bcq (bits uint4 [nc][q][N], alpha fp16 [ngroups][q][N], z fp16
 * [ngroups][N]), which the LUT-GEMM and tensor-core kernels of bcq_gpu.cu read.
 *
 * The fit is kernels/cpu/quant.c's qs_bcq_quantize step for step, in double as there. Per
 * (row, group): mean and variance (the weights h = 1 + (w - mean)^2 / var of the squared
 * error at q <= 3); the greedy init (plane i takes the sign of the residual, alpha_i its mean
 * magnitude); from that seed and from the RTN codes the alternating refinement (least-squares
 * alpha and z for the bits, then the nearest of the 2^q levels per weight) until the weighted
 * error stops falling or `iters`; the last least squares rounded to fp16 and its codes; the
 * better seed, or plain RTN where that has the smaller plain squared error. The RTN quantizer
 * is the first and last step of that alone (qs_bcq_from_rtn, bit for bit).
 *
 * Each (row, group) is one team: a warp for groups of up to QW_MAX_GS columns (QW_TEAMS per
 * CTA), a CTA of QB_THREADS for longer ones (row-wise). A team stops iterating when its own
 * group has converged and goes on to the next (grid-stride). No per-weight state is kept
 * between passes: a pass's codes are a function of the weight and the previous pass's
 * parameters (greedy alphas, RTN step, sorted levels), so each pass recomputes them and
 * accumulates the next normal equations as it goes: per thread q(q-1)/2 + 2q sums of +-h and
 * +-h w in registers (the system's diagonal is sum h on every row, a constant), assembled
 * into the (q+1) x (q+1) system that one thread solves in registers by the CPU's Gaussian
 * elimination. The 2^q levels are sorted by merging, plane by plane, the two sorted runs
 * that adding and subtracting alpha_i makes, in the (value, code) order of the CPU's stable
 * qsort. A team's weights are staged once in shared memory (groups of a
 * warp always; a CTA's row when it fits the opt-in shared memory, ~53K columns on an H100;
 * longer rows are read from global memory each pass).
 *
 * Sums over a team go through shared memory in a fixed order (thread j of a chunk adds the T
 * partials of value j in thread order), so every thread of the team sees the same bits and
 * the result does not depend on scheduling. They differ from the CPU's sequential sums in
 * the last bits (and nvcc contracts to FMA where the CPU does not), which rarely moves a code
 * or an fp16 rounding; test_gpu_quant.c states the margin. */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_util.cuh"

#define QW_TEAMS   4    /* warp teams per CTA */
#define QW_MAX_GS  1024 /* the longest group a warp takes */
#define QB_THREADS 256  /* threads of a CTA team */
#define QS_MAXV    48   /* values reduced at once: 1 + q(q-1)/2 + 2q <= 45 */

/* A barrier over the team (TM, a template parameter, in scope). */
#define QT_SYNC()                                                                                  \
    do {                                                                                           \
        if constexpr (TM == 32)                                                                    \
            __syncwarp();                                                                          \
        else                                                                                       \
            __syncthreads();                                                                       \
    } while (0)

/* ---- One team's shared memory ------------------------------------------------------ */

/* Byte offsets: reduction chunk [C][T + 1] (the +1 keeps the summing threads on distinct
 * banks), totals, the current parameters (alpha[0..q-1], z at [q]), each seed's fp16
 * result, the levels (two buffers), the midpoints of the sorted
 * ones, the levels' codes (two buffers), the staged weights. */
struct qlayout {
    size_t buf, tot, par, res, lv, mid, lc, w, bytes;
};

static __host__ __device__ inline size_t q_round16(size_t x)
{
    return (x + 15) & ~(size_t)15;
}

static __host__ __device__ inline qlayout q_layout(int T, int C, int q, size_t gs, int staged)
{
    size_t nl = (size_t)1 << q, o = 0;
    qlayout L;
    L.buf = o, o += q_round16((size_t)C * (T + 1) * 8);
    L.tot = o, o += QS_MAXV * 8;
    L.par = o, o += 16 * 8;
    L.res = o, o += 2 * 16 * 8;
    L.lv = o, o += 2 * nl * 8;
    L.mid = o, o += nl * 8;
    L.lc = o, o += q_round16(2 * nl);
    L.w = o, o += staged ? q_round16(gs * 4) : 0;
    L.bytes = o;
    return L;
}

/* ---- Team collectives --------------------------------------------------------------- */

/* tot[j] = over the team, the sum of v[j] for j < NS, then alternately the min and the max.
 * Chunks of C values: every thread writes its partials, thread j adds column j in thread
 * order (four interleaved sums), and every thread may read tot after the last barrier. */
template <int TM, int C, int V, int NS>
static __device__ __forceinline__ void team_reduce(const double *v, double *buf, double *tot, int t)
{
    QS_UNROLL
    for (int c0 = 0; c0 < V; c0 += C) {
        const int nc = V - c0 < C ? V - c0 : C;
        QS_UNROLL
        for (int j = 0; j < C; j++)
            if (j < nc)
                buf[j * (TM + 1) + t] = v[c0 + j];
        QT_SYNC();
        if (t < nc) {
            const double *b = buf + t * (TM + 1);
            const int j = c0 + t;
            double r;
            if (j < NS) {
                double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
                for (int l = 0; l < TM; l += 4)
                    s0 += b[l], s1 += b[l + 1], s2 += b[l + 2], s3 += b[l + 3];
                r = (s0 + s1) + (s2 + s3);
            } else if ((j - NS) % 2 == 0) {
                r = b[0];
                for (int l = 1; l < TM; l++)
                    r = fmin(r, b[l]);
            } else {
                r = b[0];
                for (int l = 1; l < TM; l++)
                    r = fmax(r, b[l]);
            }
            tot[j] = r;
        }
        QT_SYNC();
    }
}

/* Levels z + sum_i +-alpha_i of all 2^Q codes, sorted ascending by (value, code), in
 * lv/lc + (Q & 1) * 2^Q, and the midpoints between neighbours. Built a plane at a time, as
 * the CPU's level() sums (z, then plane 0 up): the sorted levels of planes 0..i-1 minus
 * alpha_i and plus alpha_i are two sorted runs (rounding is monotone), merged by rank (each
 * element's place in its run plus a binary search of the other run; the minus run holds the
 * lower codes, so it goes first on ties): ~2^q q reads instead of a sort's 2^q q^2 / 2.
 * lv, lc: two buffers of 2^Q, alternating. */
template <int Q, int TM>
static __device__ __forceinline__ void make_levels(const double *par, double *lv, unsigned char *lc,
                                                   double *mid, int t)
{
    constexpr int NL = 1 << Q;
    QS_UNROLL
    for (int i = 0; i < Q; i++) {
        const int n = 1 << i;
        const double *sv = lv + (i & 1) * NL, a = par[i];
        const unsigned char *sc = lc + (i & 1) * NL;
        double *dv = lv + ((i + 1) & 1) * NL;
        unsigned char *dc = lc + ((i + 1) & 1) * NL;
        for (int p = t; p < 2 * n; p += TM) {
            const bool up = p >= n;
            const int e = up ? p - n : p;
            const double nv =
                i == 0 ? (up ? par[Q] + a : par[Q] - a) : (up ? sv[e] + a : sv[e] - a);
            int cnt = 0; /* elements of the other run before this one */
            for (int b = n; b >= 1; b >>= 1) {
                if (cnt + b > n)
                    continue;
                const double o = i == 0 ? par[Q] : sv[cnt + b - 1];
                if (up ? o - a <= nv : o + a < nv)
                    cnt += b;
            }
            dv[e + cnt] = nv;
            dc[e + cnt] = (unsigned char)((i == 0 ? 0u : sc[e]) | (unsigned)up << i);
        }
        QT_SYNC();
    }
    const double *fv = lv + (Q & 1) * NL;
    for (int i = t; i < NL - 1; i += TM)
        mid[i] = 0.5 * (fv[i] + fv[i + 1]);
    QT_SYNC();
}

/* ---- Per weight ------------------------------------------------------------------------ */

/* Index of the nearest sorted level: the number of midpoints below x, which is what the
 * CPU's bisection finds (the midpoints never decrease). */
template <int Q> static __device__ __forceinline__ int nearest(const double *mid, double x)
{
    int lo = 0;
    QS_UNROLL
    for (int b = (1 << Q) >> 1; b >= 1; b >>= 1)
        if (x > mid[lo + b - 1])
            lo += b;
    return lo;
}

/* The greedy seed's code: plane i is the sign of the residual after planes 0..i-1. */
template <int Q>
static __device__ __forceinline__ unsigned greedy_code(double x, double mean, const double *a)
{
    unsigned c = 0;
    double lv = mean;
    QS_UNROLL
    for (int i = 0; i < Q; i++) {
        const bool up = x - lv >= 0;
        c |= (unsigned)up << i;
        lv += up ? a[i] : -a[i];
    }
    return c;
}

/* quant.c's rtn_code, in float as there. */
static __device__ __forceinline__ unsigned rtn_code(float w, float s, float zp, unsigned q)
{
    float c = nearbyintf(w / s) + zp, top = (float)((1u << q) - 1);
    c = c < 0 ? 0 : (c > top ? top : c);
    return (unsigned)c;
}

/* Position in the reduced vector of the pair (i, j), i < j < Q: after the error at 0. */
template <int Q> static __device__ __forceinline__ constexpr int pair_idx(int i, int j)
{
    return 1 + i * Q - i * (i + 1) / 2 + (j - i - 1);
}

/* One weight's share of the normal equations for code c: sum h s_i s_j (i < j), sum h s_i,
 * sum h w s_i, s_i = +-1 the code's bit i. */
template <int Q>
static __device__ __forceinline__ void ne_add(double *a, unsigned c, double h, double hx)
{
    constexpr int NP = Q * (Q - 1) / 2;
    QS_UNROLL
    for (int i = 0; i < Q; i++) {
        const unsigned bi = c >> i & 1u;
        QS_UNROLL
        for (int j = i + 1; j < Q; j++)
            a[pair_idx<Q>(i, j)] += ((c >> j & 1u) == bi) ? h : -h;
        a[1 + NP + i] += bi ? h : -h;
        a[1 + NP + Q + i] += bi ? hx : -hx;
    }
}

/* ---- The least-squares solve (one thread) --------------------------------------------- */

/* alpha[0..Q-1] and z (out[Q]) minimising sum h (w - z - sum_i s_i alpha_i)^2 from the
 * reduced sums, with quant.c's tiny ridge and its Gaussian elimination with partial
 * pivoting, operation for operation. In registers: every index is a compile-time constant
 * once unrolled (the pivot row is swapped in by selects), so nothing waits on memory. */
template <int Q>
static __device__ __forceinline__ void ls_solve(const double *tot, double H, double HW, double *out)
{
    constexpr int D = Q + 1, NP = Q * (Q - 1) / 2;
    double A[D][D + 1];
    QS_UNROLL
    for (int i = 0; i < Q; i++) {
        A[i][i] = H;
        QS_UNROLL
        for (int j = i + 1; j < Q; j++)
            A[i][j] = A[j][i] = tot[pair_idx<Q>(i, j)];
        A[i][Q] = A[Q][i] = tot[1 + NP + i];
        A[i][D] = tot[1 + NP + Q + i];
    }
    A[Q][Q] = H;
    A[Q][D] = HW;
    double tr = 0;
    QS_UNROLL
    for (int i = 0; i < D; i++)
        tr += A[i][i];
    QS_UNROLL
    for (int i = 0; i < D; i++)
        A[i][i] += 1e-12 * tr + 1e-300;
    QS_UNROLL
    for (int col = 0; col < D; col++) {
        int p = col;
        double best = fabs(A[col][col]);
        QS_UNROLL
        for (int r = col + 1; r < D; r++)
            if (fabs(A[r][col]) > best)
                p = r, best = fabs(A[r][col]);
        QS_UNROLL
        for (int r = col + 1; r < D; r++) {
            const bool sw = p == r;
            QS_UNROLL
            for (int j = 0; j <= D; j++) {
                const double x = A[col][j], y = A[r][j];
                A[col][j] = sw ? y : x, A[r][j] = sw ? x : y;
            }
        }
        QS_UNROLL
        for (int r = col + 1; r < D; r++) {
            const double f = A[r][col] / A[col][col];
            QS_UNROLL
            for (int j = col; j <= D; j++)
                A[r][j] -= f * A[col][j];
        }
    }
    double x[D];
    QS_UNROLL
    for (int r = D - 1; r >= 0; r--) {
        double v = A[r][D];
        QS_UNROLL
        for (int j = r + 1; j < D; j++)
            v -= A[r][j] * x[j];
        x[r] = v / A[r][r];
    }
    QS_UNROLL
    for (int i = 0; i < D; i++)
        out[i] = x[i];
}

/* ---- The kernel --------------------------------------------------------------------------- */

enum { QM_FIT, QM_LEVELS, QM_RTN, QM_ZERO };

/* Teams of TM threads (32: QW_TEAMS per CTA; QB_THREADS: the CTA), each taking (row, group)
 * pairs rg = n * ngroups + gi in grid-stride order. *bad: the lowest flat index of a
 * non-finite weight (the host reads it; that group is written as zeros). */
template <int Q, int TM>
__global__ void __launch_bounds__(TM == 32 ? 32 * QW_TEAMS : TM)
    bcq_fit_kernel(const float *__restrict__ W, size_t N, size_t K, size_t g, int iters,
                   int rtn_only, int staged, unsigned team_bytes, uint32_t *__restrict__ bits,
                   __half *__restrict__ alpha, __half *__restrict__ zout,
                   unsigned long long *__restrict__ bad)
{
    constexpr int C = TM == 32 ? 16 : 8, NP = Q * (Q - 1) / 2, VNE = 1 + NP + 2 * Q;
    const int t = (int)(threadIdx.x % TM), team = (int)(threadIdx.x / TM);
    const int teams = (int)(blockDim.x / TM), lane = t & 31, wq = t >> 5;
    const size_t gs = g ? g : K, ng = g ? K / g : 1, nw = (K + 31) / 32, nw4 = (nw + 3) / 4 * 4;
    const qlayout L = q_layout(TM, C, Q, gs, staged);
    QS_DYN_SMEM(double, smem);
    char *base = reinterpret_cast<char *>(smem) + (size_t)team * team_bytes;
    double *buf = (double *)(base + L.buf), *tot = (double *)(base + L.tot);
    double *par = (double *)(base + L.par), *res = (double *)(base + L.res);
    double *lvs = (double *)(base + L.lv);
    double *mid = (double *)(base + L.mid);
    unsigned char *lcs = (unsigned char *)(base + L.lc);
    const double *lv = lvs + (Q & 1) * (1 << Q); /* the sorted levels (make_levels) */
    const unsigned char *lc = lcs + (Q & 1) * (1 << Q);
    float *wv = (float *)(base + L.w);

    for (size_t rg = (size_t)blockIdx.x * teams + team; rg < N * ng;
         rg += (size_t)gridDim.x * teams) {
        const size_t n = rg / ng, gi = rg % ng;
        const float *wg = W + n * K + gi * gs;
        const float *src = staged ? wv : wg;

        /* Stage; sum, count of non-finite weights, min, max. */
        double st[4] = {0, 0, INFINITY, -INFINITY};
        for (size_t k = t; k < gs; k += TM) {
            const float x = wg[k];
            if (staged)
                wv[k] = x;
            if (isfinite(x)) {
                st[0] += x;
                st[2] = fmin(st[2], (double)x);
                st[3] = fmax(st[3], (double)x);
            } else {
                st[1] += 1;
                atomicMin(bad, (unsigned long long)(n * K + gi * gs + k));
            }
        }
        team_reduce<TM, C, 4, 2>(st, buf, tot, t);
        const double sum = tot[0];
        int mode = tot[1] > 0 ? QM_ZERO : rtn_only ? QM_RTN : QM_FIT;

        /* RTN's step and zero point and their BCQ point in fp16 (quant.c's rtn_params and
         * rtn_as_bcq, in float as there). */
        float s = 1, zp = 0;
        double ra[Q] = {0}, rz = 0;
        if (mode != QM_ZERO) {
            const float mn = (float)tot[2], mx = (float)tot[3];
            const float levels = (float)((1u << Q) - 1);
            s = mx > mn ? (mx - mn) / levels : (mn != 0 ? fabsf(mn) : 1.0f);
            zp = nearbyintf(-mn / s);
            QS_UNROLL
            for (int i = 0; i < Q; i++)
                ra[i] = __half2float(__float2half_rn(s * (float)(1u << i) * 0.5f));
            rz = __half2float(__float2half_rn(s * ((float)((1u << Q) - 1) * 0.5f - zp)));
        }

        if (mode == QM_FIT) {
            const double mean = sum / (double)gs;
            double v1[1] = {0};
            for (size_t k = t; k < gs; k += TM) {
                const double d = src[k] - mean;
                v1[0] += d * d;
            }
            team_reduce<TM, C, 1, 1>(v1, buf, tot, t);
            const double var = tot[0] / (double)gs;
            /* The error's weights (quant.c says why): 1 + d^2 / var at q <= 3. */
            const double ivar = Q <= 3 && var > 0 ? 1 / var : 0;

            /* Greedy init: ga[i] = mean |residual| after planes 0..i-1 (every thread
             * divides the same total); on the way sum h and sum h w, the normal
             * equations' constants. */
            double H = 0, HW = 0, ga[Q];
            QS_UNROLL
            for (int i = 0; i < Q; i++) {
                double v3[3] = {0, 0, 0};
                for (size_t k = t; k < gs; k += TM) {
                    const double x = src[k];
                    double l = mean;
                    QS_UNROLL
                    for (int p = 0; p < i; p++)
                        l += x - l >= 0 ? ga[p] : -ga[p];
                    v3[0] += fabs(x - l);
                    if (i == 0) {
                        const double h = 1 + (x - mean) * (x - mean) * ivar;
                        v3[1] += h, v3[2] += h * x;
                    }
                }
                team_reduce<TM, C, 3, 3>(v3, buf, tot, t);
                if (i == 0)
                    H = tot[1], HW = tot[2];
                ga[i] = tot[0] / (double)gs;
            }

            /* Seed 0 the greedy codes, seed 1 the RTN codes: refine each. */
            double e[2] = {0, 0}, pe[2] = {0, 0}, p2 = 0;
            for (int sd = 0; sd < 2; sd++) {
                double a[VNE];
                QS_UNROLL
                for (int j = 0; j < VNE; j++)
                    a[j] = 0;
                for (size_t k = t; k < gs; k += TM) {
                    const float xf = src[k];
                    const double x = xf, h = 1 + (x - mean) * (x - mean) * ivar;
                    unsigned c;
                    if (sd == 0) {
                        c = greedy_code<Q>(x, mean, ga);
                    } else {
                        c = rtn_code(xf, s, zp, Q);
                        double v = rz; /* plain RTN's error, for the last choice */
                        QS_UNROLL
                        for (int i = 0; i < Q; i++)
                            v += (c >> i & 1u) ? ra[i] : -ra[i];
                        a[0] += (x - v) * (x - v);
                    }
                    ne_add<Q>(a, c, h, h * x);
                }
                team_reduce<TM, C, VNE, VNE>(a, buf, tot, t);
                if (sd == 1)
                    p2 = tot[0];
                double best = INFINITY;
                for (int it = 0; it < iters; it++) {
                    if (t == 0)
                        ls_solve<Q>(tot, H, HW, par);
                    QT_SYNC();
                    make_levels<Q, TM>(par, lvs, lcs, mid, t);
                    QS_UNROLL
                    for (int j = 0; j < VNE; j++)
                        a[j] = 0;
                    for (size_t k = t; k < gs; k += TM) {
                        const double x = src[k], h = 1 + (x - mean) * (x - mean) * ivar;
                        const int lo = nearest<Q>(mid, x);
                        const double d = x - lv[lo];
                        a[0] += h * d * d;
                        ne_add<Q>(a, lc[lo], h, h * x);
                    }
                    team_reduce<TM, C, VNE, VNE>(a, buf, tot, t);
                    const double err = tot[0];
                    if (!(err < best * (1 - 1e-9))) /* stopped falling */
                        break;
                    best = err;
                }
                /* The least-squares scales of the last codes, in fp16, and their codes. */
                if (t == 0) {
                    ls_solve<Q>(tot, H, HW, par);
                    for (int i = 0; i <= Q; i++)
                        par[i] = __half2float(__float2half_rn((float)par[i]));
                }
                QT_SYNC();
                make_levels<Q, TM>(par, lvs, lcs, mid, t);
                double f[2] = {0, 0};
                for (size_t k = t; k < gs; k += TM) {
                    const double x = src[k], h = 1 + (x - mean) * (x - mean) * ivar;
                    const double d = x - lv[nearest<Q>(mid, x)];
                    f[0] += h * d * d, f[1] += d * d;
                }
                team_reduce<TM, C, 2, 2>(f, buf, tot, t);
                e[sd] = tot[0], pe[sd] = tot[1];
                if (t == 0)
                    for (int i = 0; i <= Q; i++)
                        res[sd * 16 + i] = par[i];
            }
            /* The better seed by the weighted error; plain RTN if the plain error says so
             * (q = 1 on heavy tails). The levels in place are seed 1's. */
            const int win = e[1] < e[0] ? 1 : 0;
            if (p2 < pe[win]) {
                mode = QM_RTN;
            } else {
                mode = QM_LEVELS;
                if (win == 0) {
                    if (t == 0)
                        for (int i = 0; i <= Q; i++)
                            par[i] = res[i];
                    QT_SYNC();
                    make_levels<Q, TM>(par, lvs, lcs, mid, t);
                }
            }
        }

        /* Bits: a warp's ballot of plane i over 32 consecutive columns is the word; lane i
         * stores plane i. Columns past K are 0, as are the words past nw. */
        const size_t col0 = gi * gs;
        for (size_t kb = 0; kb < gs; kb += TM) {
            const size_t k = kb + t, k32 = kb + 32 * (size_t)wq;
            unsigned c = 0;
            if (k < gs && mode != QM_ZERO) {
                const float x = src[k];
                c = mode == QM_RTN ? rtn_code(x, s, zp, Q) : lc[nearest<Q>(mid, x)];
            }
            QS_UNROLL
            for (int i = 0; i < Q; i++) {
                const unsigned word = __ballot_sync(0xffffffffu, (c >> i) & 1u);
                if (lane == i && k32 < gs) {
                    const size_t wi = (col0 + k32) / 32;
                    bits[((wi / 4 * Q + i) * N + n) * 4 + wi % 4] = word;
                }
            }
        }
        if (gi == ng - 1)
            for (size_t p = t; p < (nw4 - nw) * Q; p += TM) {
                const size_t wi = nw + p / Q, i = p % Q;
                bits[((wi / 4 * Q + i) * N + n) * 4 + wi % 4] = 0;
            }
        if (t == 0) {
            for (int i = 0; i < Q; i++)
                alpha[(gi * Q + i) * N + n] = __float2half_rn(mode == QM_LEVELS ? (float)par[i]
                                                              : mode == QM_RTN  ? (float)ra[i]
                                                                                : 0.0f);
            zout[gi * N + n] = __float2half_rn(mode == QM_LEVELS ? (float)par[Q]
                                               : mode == QM_RTN  ? (float)rz
                                                                 : 0.0f);
        }
    }
}

/* ---- Host side ------------------------------------------------------------------------------ */

template <int Q, int TM>
static int fit_launch(qs_cuda_bcq *d, const float *W, int iters, int rtn_only, size_t optin,
                      unsigned long long *bad, cudaStream_t st)
{
    const int C = TM == 32 ? 16 : 8;
    const size_t gs = d->g ? d->g : d->K, teams = TM == 32 ? QW_TEAMS : 1;
    /* QS_QUANT_STAGE_MAX (bytes per CTA, for tests): stage only below it, so that the
     * global-memory path runs on shapes the harness can afford. */
    size_t stage_max = optin;
    const char *env = getenv("QS_QUANT_STAGE_MAX");
    if (env && *env)
        stage_max = strtoull(env, NULL, 0);
    int staged = 1;
    qlayout L = q_layout(TM, C, Q, gs, 1);
    if (L.bytes * teams > (stage_max < optin ? stage_max : optin)) /* a row too long */
        staged = 0, L = q_layout(TM, C, Q, gs, 0);
    const size_t smem = L.bytes * teams;
    if (smem > optin)
        return qs_seterr(QS_ENOTSUP,
                         "the quantizer needs %zu bytes of shared memory per CTA, the device "
                         "allows %zu",
                         smem, optin);
    if (smem > 48 * 1024)
        QS_CU(cudaFuncSetAttribute(bcq_fit_kernel<Q, TM>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    size_t blocks = (d->N * d->ngroups + teams - 1) / teams;
    if (blocks > INT_MAX)
        blocks = INT_MAX;
    QS_LAUNCH((unsigned)blocks, (unsigned)(teams * TM), smem, st, bcq_fit_kernel<Q, TM>)
    (W, d->N, d->K, d->g, iters, rtn_only, staged, (unsigned)L.bytes, (uint32_t *)d->bits,
     (__half *)d->alpha, (__half *)d->z, bad);
    QS_CU_LAUNCH("bcq_fit_kernel");
    return QS_OK;
}

template <int Q>
static int fit_launch_team(qs_cuda_bcq *d, const float *W, int iters, int rtn_only, size_t optin,
                           unsigned long long *bad, cudaStream_t st)
{
    const size_t gs = d->g ? d->g : d->K;
    return gs <= QW_MAX_GS ? fit_launch<Q, 32>(d, W, iters, rtn_only, optin, bad, st)
                           : fit_launch<Q, QB_THREADS>(d, W, iters, rtn_only, optin, bad, st);
}

/* Launch, then wait for the stream and read the first non-finite weight's index. */
static int fit_run(qs_cuda_bcq *d, const float *W, int iters, int rtn_only, cudaStream_t st)
{
    int dev = 0, optin = 0;
    QS_CU(cudaGetDevice(&dev));
    QS_CU(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    /* The handle's split-K workspace (>= 512 bytes) holds the flag until a GEMM uses it. */
    unsigned long long *bad = (unsigned long long *)d->ws, first = 0;
    QS_CU(cudaMemsetAsync(bad, 0xFF, sizeof *bad, st));
    int err;
    switch (d->q) {
    case 1:
        err = fit_launch_team<1>(d, W, iters, rtn_only, (size_t)optin, bad, st);
        break;
    case 2:
        err = fit_launch_team<2>(d, W, iters, rtn_only, (size_t)optin, bad, st);
        break;
    case 3:
        err = fit_launch_team<3>(d, W, iters, rtn_only, (size_t)optin, bad, st);
        break;
    case 4:
        err = fit_launch_team<4>(d, W, iters, rtn_only, (size_t)optin, bad, st);
        break;
    case 5:
        err = fit_launch_team<5>(d, W, iters, rtn_only, (size_t)optin, bad, st);
        break;
    case 6:
        err = fit_launch_team<6>(d, W, iters, rtn_only, (size_t)optin, bad, st);
        break;
    case 7:
        err = fit_launch_team<7>(d, W, iters, rtn_only, (size_t)optin, bad, st);
        break;
    default:
        err = fit_launch_team<8>(d, W, iters, rtn_only, (size_t)optin, bad, st);
        break;
    }
    if (err)
        return err;
    QS_CU(cudaMemcpyAsync(&first, bad, sizeof first, cudaMemcpyDeviceToHost, st));
    QS_CU(cudaStreamSynchronize(st));
    if (first != ~0ull)
        return qs_seterr(QS_EINVAL,
                         "weight [%llu, %llu] is NaN or Inf: fix the checkpoint before "
                         "quantizing it",
                         first / d->K, first % d->K);
    return QS_OK;
}

static int quantize(qs_cuda_bcq *d, const float *W, size_t N, size_t K, unsigned q, size_t g,
                    unsigned iters, int rtn_only, void *stream, const char *who)
{
    if (!d || !W)
        return qs_seterr(QS_EINVAL,
                         "%s got a NULL pointer: pass the handle and the N x K fp32 weights in "
                         "device memory",
                         who);
    int err = qs_cuda_bcq_alloc(d, N, K, q, g);
    if (err)
        return err;
    if (iters == 0)
        iters = 20; /* qs_bcq_quantize's default */
    if ((err =
             fit_run(d, W, iters > INT_MAX ? INT_MAX : (int)iters, rtn_only, QS_CU_STREAM(stream))))
        qs_cuda_bcq_free(d);
    return err;
}

extern "C" int qs_cuda_bcq_quantize(qs_cuda_bcq *d, const float *W, size_t N, size_t K, unsigned q,
                                    size_t g, unsigned iters, void *stream)
{
    return quantize(d, W, N, K, q, g, iters, 0, stream, "qs_cuda_bcq_quantize");
}

extern "C" int qs_cuda_rtn_quantize(qs_cuda_bcq *d, const float *W, size_t N, size_t K, unsigned q,
                                    size_t g, void *stream)
{
    return quantize(d, W, N, K, q, g, 1, 1, stream, "qs_cuda_rtn_quantize");
}
