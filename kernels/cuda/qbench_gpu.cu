/* qbench_gpu: GPU kernel timings at OPT-175B layer shapes (docs/benchmarks.md,
 * "GPU kernels").
 *
 *   qbench_gpu [--quick] [--json] [--q Q] [--g G] [--iters N] [--sweep]
 *
 * For each shape (N x K = 12288 x 12288, 36864 x 12288, 49152 x 12288,
 * 12288 x 49152) and batch M (1, 2, 4, 8, 16, 64, 512) it times
 *   lut     LUT-GEMM (chooser's configuration) for M <= 8, the fused
 *           dequantize + tensor-core kernel above (what qs_cuda_bcq_matmul
 *           runs with the default crossover)
 *   lut-h   LUT-GEMM with fp16 tables (tokens in pairs), M = 2..8
 *   mma     the tensor-core kernel at M <= 8 too: where it beats lut, lower
 *           the crossover (qs_cuda_set_lut_max_m)
 *   cublas  cublasGemmEx fp16 (fp32 compute) on dequantized fp16 weights
 *   u3      the OPTQ-style dequantizing 3-bit GEMV (M <= 8)
 *   w8a8    SmoothQuant W8A8 (qs_cuda_w8a8_gemm: activations quantized on
 *           the device per token and group of g channels, int8 tensor
 *           cores), random codes, at every M
 * as the median of per-call CUDA event times over rotating weight copies
 * (enough that together they exceed twice the L2) and 4 rotating inputs,
 * after warm-up. Reports effective GB/s (weights + X + Y bytes over time),
 * the fraction of the device-to-device copy bandwidth measured here
 * (cudaMemcpy D2D of a large buffer, read + write bytes, median), the floor
 * (weight bytes / that bandwidth) and speed-ups over cuBLAS and u3.
 * --sweep also times every LUT configuration (threads x splits) at M <= 8
 * and prints the best next to the chooser's. Exits 77 without a GPU. */
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>

#include "cuda_compat.cuh"
#include "qs_kernels.h"

#define CK(call)                                                                                   \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "qbench_gpu: %s failed: CUDA error %d (%s)\n", #call, (int)e_,         \
                    cudaGetErrorString(e_));                                                       \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

#define QK(call)                                                                                   \
    do {                                                                                           \
        int e_ = (call);                                                                           \
        if (e_ != QS_OK) {                                                                         \
            fprintf(stderr, "qbench_gpu: %s failed: %s: %s\n", #call, qs_strerror(e_),             \
                    qs_errmsg());                                                                  \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

__global__ void fill_half(__half *p, size_t n, unsigned long long seed)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        unsigned long long z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        p[i] = __float2half_rn(((float)(z >> 40) * (1.0f / 16777216.0f)) * 2.0f - 1.0f);
    }
}

struct timer {
    int iters, warm;
    std::vector<cudaEvent_t> ev;
    explicit timer(int n) : iters(n), warm(3), ev(2 * n)
    {
        for (auto &e : ev)
            CK(cudaEventCreate(&e));
    }
    ~timer()
    {
        for (auto &e : ev)
            cudaEventDestroy(e);
    }
    /* Median microseconds of f(i) over iters calls; -1 if a call fails. */
    static double failed()
    {
        fprintf(stderr, "qbench_gpu: a timed call failed: %s\n", qs_errmsg());
        cudaDeviceSynchronize();
        return -1;
    }
    template <class F> double median_us(F f)
    {
        for (int i = 0; i < warm; i++)
            if (f(i) != QS_OK)
                return failed();
        for (int i = 0; i < iters; i++) {
            CK(cudaEventRecord(ev[2 * i]));
            if (f(warm + i) != QS_OK)
                return failed();
            CK(cudaEventRecord(ev[2 * i + 1]));
        }
        CK(cudaDeviceSynchronize());
        std::vector<double> t(iters);
        for (int i = 0; i < iters; i++) {
            float ms = 0;
            CK(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]));
            t[i] = ms * 1e3;
        }
        std::sort(t.begin(), t.end());
        return t[iters / 2];
    }
};

/* Random W8A8 codes in [-127, 127] where the device layout holds channels
 * (zeros in the group padding), scales ~ 0.02 / 127. */
__global__ void fill_w8(int8_t *codes, float *scale, size_t N, size_t K, size_t group, size_t gp,
                        size_t kd, unsigned long long seed)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < N * kd;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t col = i % kd, j = col % gp, k = col / gp * group + j;
        unsigned long long z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        codes[i] = (j < group && k < K) ? (int8_t)((int)(z % 255) - 127) : (int8_t)0;
        if (i < N)
            scale[i] = 0.02f / 127 * (0.5f + (float)(z >> 40) * (1.0f / 16777216.0f));
    }
}

struct row {
    size_t N, K, M;
    const char *kernel;
    double us, gbs, frac, floor_us, vs_cublas, vs_u3;
    char cfg[48];
};

int main(int argc, char **argv)
{
    int quick = 0, json = 0, sweep = 0, iters = 0;
    unsigned q = 3;
    size_t g = 128;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick"))
            quick = 1;
        else if (!strcmp(argv[i], "--json"))
            json = 1;
        else if (!strcmp(argv[i], "--sweep"))
            sweep = 1;
        else if (!strcmp(argv[i], "--q") && i + 1 < argc)
            q = (unsigned)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--g") && i + 1 < argc)
            g = (size_t)atoll(argv[++i]);
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc)
            iters = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: qbench_gpu [--quick] [--json] [--q Q] [--g G] [--iters N] "
                            "[--sweep]\n");
            return 2;
        }
    }
    if (qs_cuda_device_count() <= 0) {
        printf("SKIP: qbench_gpu needs a GPU: %s\n", qs_errmsg());
        return 77;
    }
    if (iters <= 0)
        iters = quick ? 20 : 100;
    int dev = 0;
    cudaDeviceProp prop;
    CK(cudaGetDevice(&dev));
    CK(cudaGetDeviceProperties(&prop, dev));
    timer tm(iters);

    /* Device-to-device copy bandwidth: 1 GiB, read + write bytes. */
    size_t cb = (size_t)1 << 30;
    void *a = NULL, *b = NULL;
    CK(cudaMalloc(&a, cb));
    CK(cudaMalloc(&b, cb));
    CK(cudaMemset(a, 1, cb));
    double copy_us = tm.median_us([&](int) {
        return cudaMemcpyAsync(b, a, cb, cudaMemcpyDeviceToDevice) == cudaSuccess ? QS_OK
                                                                                  : QS_EINTERNAL;
    });
    CK(cudaFree(a));
    CK(cudaFree(b));
    double bw = 2.0 * (double)cb / (copy_us * 1e-6) / 1e9; /* GB/s */
    if (!json)
        printf("# %s, %d SMs, L2 %d MiB; D2D copy %.0f GB/s (read+write, median of %d)\n"
               "# q=%u g=%zu, median of %d calls, weights rotated over copies > 2x L2\n",
               prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, bw, iters, q, g, iters);

    static const size_t shapes[4][2] = {
        {12288, 12288}, {36864, 12288}, {49152, 12288}, {12288, 49152}};
    static const size_t batches[] = {1, 2, 4, 8, 16, 64, 512};
    const int nshapes = quick ? 1 : 4;
    std::vector<size_t> Ms;
    if (quick)
        Ms = {1, 8, 64};
    else
        Ms.assign(batches, batches + 7);
    const size_t Mmax = *std::max_element(Ms.begin(), Ms.end());
    std::vector<row> rows;

    for (int s = 0; s < nshapes; s++) {
        const size_t N = shapes[s][0], K = shapes[s][1];
        const size_t lut_bytes = qs_cuda_bcq_bytes(N, K, q, g);
        if (!lut_bytes) {
            fprintf(stderr, "qbench_gpu: bad shape or q/g: %s\n", qs_errmsg());
            return 1;
        }
        const size_t l2x2 = 2 * (size_t)prop.l2CacheSize;
        const int nl = (int)std::max<size_t>(2, (l2x2 + lut_bytes - 1) / lut_bytes);
        const size_t f16_bytes = N * K * 2;
        const int nf = (int)std::max<size_t>(2, (l2x2 + f16_bytes - 1) / f16_bytes);
        std::vector<qs_cuda_bcq> lut(nl);
        for (int i = 0; i < nl; i++) {
            QK(qs_cuda_bcq_alloc(&lut[i], N, K, q, g));
            QK(qs_cuda_bcq_fill_random(&lut[i], 1000 + i, NULL));
        }
        std::vector<void *> wf(nf);
        for (int i = 0; i < nf; i++) {
            CK(cudaMalloc(&wf[i], f16_bytes));
            QK(qs_cuda_bcq_dequant_f16(&lut[i % nl], wf[i], NULL));
        }
        qs_cuda_u3 u3probe;
        QK(qs_cuda_u3_alloc(&u3probe, N, K, g));
        const size_t u3_bytes = u3probe.bytes;
        qs_cuda_u3_free(&u3probe);
        const int nu = (int)std::max<size_t>(2, (l2x2 + u3_bytes - 1) / u3_bytes);
        std::vector<qs_cuda_u3> u3(nu);
        for (int i = 0; i < nu; i++) {
            QK(qs_cuda_u3_alloc(&u3[i], N, K, g));
            QK(qs_cuda_u3_fill_random(&u3[i], 2000 + i, NULL));
        }
        qs_cuda_w8 w8probe;
        QK(qs_cuda_w8_alloc(&w8probe, N, K, g));
        const size_t w8_bytes = w8probe.bytes;
        qs_cuda_w8_free(&w8probe);
        const int nw8 = (int)std::max<size_t>(2, (l2x2 + w8_bytes - 1) / w8_bytes);
        std::vector<qs_cuda_w8> w8(nw8);
        for (int i = 0; i < nw8; i++) {
            QK(qs_cuda_w8_alloc(&w8[i], N, K, g));
            QS_LAUNCH(1024, 256, 0, 0, fill_w8)
            ((int8_t *)w8[i].codes, (float *)w8[i].scale, N, K, w8[i].group, w8[i].gp, w8[i].kd,
             4000 + i);
            CK(cudaGetLastError());
        }
        void *X[4], *Y = NULL;
        for (int i = 0; i < 4; i++) {
            CK(cudaMalloc(&X[i], Mmax * K * 2));
            QS_LAUNCH(1024, 256, 0, 0, fill_half)((__half *)X[i], Mmax * K, 3000 + i);
            CK(cudaGetLastError());
        }
        CK(cudaMalloc(&Y, Mmax * N * 2));
        CK(cudaDeviceSynchronize());

        for (size_t M : Ms) {
            const double io = (double)(M * K + M * N) * 2;
            auto add = [&](const char *k, double us, double wbytes, const char *cfg) {
                row r = {N, K, M, k, us, 0, 0, 0, 0, 0, ""};
                if (us > 0) {
                    r.gbs = (wbytes + io) / (us * 1e-6) / 1e9;
                    r.frac = r.gbs / bw;
                }
                r.floor_us = wbytes / (bw * 1e9) * 1e6;
                snprintf(r.cfg, sizeof r.cfg, "%s", cfg ? cfg : "");
                rows.push_back(r);
                return rows.size() - 1;
            };
            char cfgs[48] = "";
            if (M <= 8) {
                qs_cuda_lut_cfg c;
                QK(qs_cuda_lut_choose(M, N, K, q, 0, &c));
                snprintf(cfgs, sizeof cfgs, "th=%u sp=%u", c.threads, c.splits);
            } else {
                unsigned bm = M <= 16 ? 16 : 64;
                snprintf(cfgs, sizeof cfgs, "bm=%u sp=%d", bm, qs_cuda_mma_splits(M, N, K, bm, 0));
            }
            double t_lut = tm.median_us([&](int i) {
                return M <= 8 ? qs_cuda_lutgemm(&lut[i % nl], X[i % 4], M, Y, NULL, NULL)
                              : qs_cuda_bcq_gemm_mma(&lut[i % nl], X[i % 4], M, Y, NULL, 0, 0);
            });
            size_t il = add("lut", t_lut, (double)lut_bytes, cfgs), im = (size_t)-1, ih = im;
            if (M >= 2 && M <= 8) { /* fp16 tables at the same configuration */
                qs_cuda_lut_cfg c;
                QK(qs_cuda_lut_choose(M, N, K, q, 0, &c));
                c.half_tables = 1;
                double t_h = tm.median_us(
                    [&](int i) { return qs_cuda_lutgemm(&lut[i % nl], X[i % 4], M, Y, NULL, &c); });
                char hc[48];
                snprintf(hc, sizeof hc, "%s h", cfgs);
                ih = add("lut-h", t_h, (double)lut_bytes, hc);
            }
            if (M <= 8) {
                double t_mma = tm.median_us([&](int i) {
                    return qs_cuda_bcq_gemm_mma(&lut[i % nl], X[i % 4], M, Y, NULL, 0, 0);
                });
                char mc[48];
                snprintf(mc, sizeof mc, "bm=16 sp=%d", qs_cuda_mma_splits(M, N, K, 16, 0));
                im = add("mma", t_mma, (double)lut_bytes, mc);
            }
            double t_cub = tm.median_us([&](int i) {
                return qs_cuda_gemm_f16_cublas(wf[i % nf], X[i % 4], M, N, K, Y, NULL);
            });
            add("cublas", t_cub, (double)f16_bytes, NULL);
            double t_u3 = -1;
            if (M <= 8) {
                t_u3 = tm.median_us(
                    [&](int i) { return qs_cuda_u3_gemv(&u3[i % nu], X[i % 4], M, Y, NULL); });
                add("u3", t_u3, (double)u3_bytes, NULL);
            }
            double t_w8 = tm.median_us(
                [&](int i) { return qs_cuda_w8a8_gemm(&w8[i % nw8], X[i % 4], M, 0.0f, Y, NULL); });
            char wc[48];
            snprintf(wc, sizeof wc, "g=%zu", w8[0].group);
            size_t iw = add("w8a8", t_w8, (double)w8_bytes, wc);
            for (size_t k : {il, im, ih, iw})
                if (k != (size_t)-1 && rows[k].us > 0) {
                    rows[k].vs_cublas = t_cub > 0 ? t_cub / rows[k].us : 0;
                    rows[k].vs_u3 = t_u3 > 0 ? t_u3 / rows[k].us : 0;
                }
            if (sweep && M <= 8) {
                double best = 1e30;
                char bcfg[48] = "";
                size_t nc = ((K + 31) / 32 + 3) / 4;
                for (unsigned ht = 0; ht <= (M > 1 ? 1u : 0u); ht++)
                    for (unsigned th = 128; th <= 256; th *= 2)
                        for (unsigned sp = 1; sp * M <= 64 && sp <= nc;
                             sp = sp < 4 ? sp + 1 : sp * 3 / 2) {
                            qs_cuda_lut_cfg c = {th, sp, ht};
                            double t = tm.median_us([&](int i) {
                                return qs_cuda_lutgemm(&lut[i % nl], X[i % 4], M, Y, NULL, &c);
                            });
                            if (t > 0 && t < best)
                                best = t, snprintf(bcfg, sizeof bcfg, "th=%u sp=%u%s", th, sp,
                                                   ht ? " h" : "");
                        }
                add("lut-best", best, (double)lut_bytes, bcfg);
            }
            CK(cudaDeviceSynchronize());
        }
        for (auto &l : lut)
            qs_cuda_bcq_free(&l);
        for (auto &u : u3)
            qs_cuda_u3_free(&u);
        for (auto &w : w8)
            qs_cuda_w8_free(&w);
        for (void *p : wf)
            CK(cudaFree(p));
        for (int i = 0; i < 4; i++)
            CK(cudaFree(X[i]));
        CK(cudaFree(Y));
    }

    if (json) {
        printf("{\"device\": \"%s\", \"sms\": %d, \"d2d_gbs\": %.1f, \"q\": %u, \"g\": %zu, "
               "\"iters\": %d, \"rows\": [\n",
               prop.name, prop.multiProcessorCount, bw, q, g, iters);
        for (size_t i = 0; i < rows.size(); i++) {
            const row &r = rows[i];
            printf("  {\"N\": %zu, \"K\": %zu, \"M\": %zu, \"kernel\": \"%s\", \"cfg\": \"%s\", "
                   "\"us\": %.2f, \"gbs\": %.1f, \"frac_d2d\": %.3f, \"floor_us\": %.2f, "
                   "\"vs_cublas\": %.2f, \"vs_u3\": %.2f}%s\n",
                   r.N, r.K, r.M, r.kernel, r.cfg, r.us, r.gbs, r.frac, r.floor_us, r.vs_cublas,
                   r.vs_u3, i + 1 < rows.size() ? "," : "");
        }
        printf("]}\n");
    } else {
        printf("%-13s %4s %-8s %-12s %9s %8s %6s %9s %9s %7s\n", "N x K", "M", "kernel", "cfg",
               "us", "GB/s", "%d2d", "floor_us", "vs_cublas", "vs_u3");
        for (const row &r : rows) {
            char shape[32];
            snprintf(shape, sizeof shape, "%zux%zu", r.N, r.K);
            printf("%-13s %4zu %-8s %-12s %9.2f %8.1f %5.1f%% %9.2f", shape, r.M, r.kernel, r.cfg,
                   r.us, r.gbs, 100 * r.frac, r.floor_us);
            if (r.vs_cublas > 0)
                printf(" %8.2fx", r.vs_cublas);
            else
                printf(" %9s", "");
            if (r.vs_u3 > 0)
                printf(" %6.2fx", r.vs_u3);
            printf("\n");
        }
    }
    return 0;
}
