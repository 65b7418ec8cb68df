/* test_emu_harness.c: the CPU execution harness on small kernels written
 * for it (emu_kernels.cu). Correct kernels give the right numbers and no
 * report; each faulty kernel gives the report the harness exists for
 * (a missing __syncthreads, shared-memory races, out-of-bounds shared and
 * global accesses, uninitialised reads, divergent barriers and warp
 * collectives, a deadlock, host pointers, misalignment, launches over the
 * limits) and the CUDA error a GPU would. The bank model counts the
 * wavefronts of known patterns. Under AddressSanitizer (no access
 * instrumentation) the cases that need it are skipped with the reason,
 * and the out-of-bounds ones run in a child process that ASan must stop. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cuda_runtime_api.h>
#include <qs_emu_api.h>

cudaError_t emu_block_sum(int blocks, float *result, double *expect);
cudaError_t emu_warp_ops(int threads, int width, int *out);
cudaError_t emu_warp_exchange(int *out);
cudaError_t emu_atomics(int blocks, int threads, unsigned *count, float *fsum);
cudaError_t emu_big_smem(int raise, float *out);
cudaError_t emu_wmma(const float *A, const float *B, const float *C, float *D);
cudaError_t emu_graph(int n, int times, const float *x, const float *y0, float *y);
int emu_cublas(int m, int n, int k, const float *A, const float *B, float *C);
cudaError_t emu_bank(int pattern);
cudaError_t emu_fault(int which);
cudaError_t emu_half_chain(int n, float *out);
cudaError_t emu_convert(const float *in, int n, unsigned short *h, unsigned short *hz,
                        unsigned short *bf, float *back);

static int failures, cases;

static void check(int ok, const char *what, const char *detail)
{
    cases++;
    if (!ok)
        failures++;
    printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", what, detail && *detail ? ": " : "",
           detail ? detail : "");
}

/* A correct kernel leaves no report. */
static void clean(const char *what)
{
    unsigned long n = qs_emu_count_all();
    char d[600];
    snprintf(d, sizeof d, "%lu unexpected report(s); last: %s", n, qs_emu_last_report());
    check(n == 0, what, n ? d : "");
    qs_emu_reset();
}

static void correct_kernels(void)
{
    float sums[7];
    double ref[7];
    cudaError_t e = emu_block_sum(7, sums, ref);
    int ok = e == cudaSuccess;
    for (int b = 0; b < 7 && ok; b++)
        ok = fabs(sums[b] - ref[b]) <= 1e-3 * fabs(ref[b]);
    check(ok, "block_sum: shared-memory tree over 7 blocks of 256", cudaGetErrorName(e));
    clean("block_sum: no report");

    /* 48 threads: a partial second warp; segments of 8 for up/down. */
    int out[48 * 8];
    e = emu_warp_ops(48, 8, out);
    ok = e == cudaSuccess;
    for (int t = 0; t < 48 && ok; t++) {
        int w = t / 32, lane = t % 32, n = w ? 16 : 32, sum = 0, *o = out + t * 8;
        for (int l = lane & ~15; l < (lane & ~15) + 16; l++)
            sum += (w * 32 + l) * 3 + 1;
        int v = t * 3 + 1, seg = lane & ~7;
        int up = lane - 3 >= seg ? v - 9 : v, down = lane + 2 < seg + 8 ? v + 6 : v;
        unsigned bal = 0, match = 0;
        for (int l = 0; l < n; l++) {
            if (l % 3 == 0)
                bal |= 1u << l;
            if (l / 8 == lane / 8)
                match |= 1u << l;
        }
        int half = 0;
        for (int l = 0; l < 16; l++)
            half += (w * 32 + l) * 3 + 1;
        ok = o[0] == sum && o[1] == (w * 32 + 5) * 3 + 1 && o[2] == up && o[3] == down &&
             (unsigned)o[4] == bal && o[5] == (1 + 2) && (unsigned)o[6] == match &&
             o[7] == (lane < 16 ? half : 0);
        if (!ok)
            printf("     thread %d: got %d %d %d %d %x %d %x %d\n", t, o[0], o[1], o[2], o[3], o[4],
                   o[5], o[6], o[7]);
    }
    check(ok,
          "warp_ops: xor (width 16)/idx/up/down shuffles, ballot, any/all, match, reduce; partial "
          "warp",
          cudaGetErrorName(e));
    clean("warp_ops: no report");

    int ex[64];
    e = emu_warp_exchange(ex);
    ok = e == cudaSuccess;
    for (int t = 0; t < 64 && ok; t++)
        ok = ex[t] == (t ^ 1) * 10;
    check(ok, "warp_exchange: shared memory ordered by __syncwarp alone", cudaGetErrorName(e));
    clean("warp_exchange: no race report (the __syncwarp orders it)");

    unsigned count = 0;
    float fsum = 0;
    e = emu_atomics(3, 96, &count, &fsum);
    check(e == cudaSuccess && count == 3 * 96 && fsum == 0.5f * 3 * 96,
          "atomics: shared and global counters from 288 threads", cudaGetErrorName(e));
    clean("atomics: no race report");

    float big[128];
    e = emu_big_smem(1, big);
    ok = e == cudaSuccess;
    for (int t = 0; t < 128 && ok; t++) {
        double s = 0;
        for (int i = t; i < 25600; i += 128)
            s += 25599 - i;
        ok = fabs(big[t] - s) <= 1e-6 * s;
    }
    check(ok, "100 KiB of dynamic shared memory after cudaFuncSetAttribute", cudaGetErrorName(e));
    clean("big_smem: no report");

    float A[256], B[256], C[256], D[256];
    for (int i = 0; i < 256; i++)
        A[i] = (float)((i * 7) % 13 - 6) / 8, B[i] = (float)((i * 5) % 11 - 5) / 4,
        C[i] = (float)(i % 9) - 4;
    e = emu_wmma(A, B, C, D);
    double err = 0;
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++) {
            double s = C[r * 16 + c];
            for (int k = 0; k < 16; k++)
                s += (double)A[r * 16 + k] * B[c * 16 + k]; /* B column-major */
            err = fmax(err, fabs(s - D[r * 16 + c]));
        }
    char d[64];
    snprintf(d, sizeof d, "max error %.2e", err);
    check(e == cudaSuccess && err == 0, "wmma m16n16k16 fp16 -> fp32 (values exact in fp16)", d);
    clean("wmma: no report");

    float x[300], y0[300], y[300];
    for (int i = 0; i < 300; i++)
        x[i] = (float)i, y0[i] = 1.0f;
    e = emu_graph(300, 3, x, y0, y);
    ok = e == cudaSuccess;
    for (int i = 0; i < 300 && ok; i++)
        ok = y[i] == 1.0f + 3 * 2.0f * i;
    check(ok, "graph: captured copy + kernel, replayed 3 times", cudaGetErrorName(e));
    clean("graph: no report");

    enum { M = 5, N = 7, K = 33 };
    float a[K * M], b[K * N], c[M * N];
    for (int i = 0; i < K * M; i++)
        a[i] = (float)((i * 3) % 7 - 3) / 4;
    for (int i = 0; i < K * N; i++)
        b[i] = (float)((i * 5) % 9 - 4) / 2;
    int rc = emu_cublas(M, N, K, a, b, c);
    err = 0;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double s = 0;
            for (int k = 0; k < K; k++)
                s += (double)a[i * K + k] * b[j * K + k];
            err = fmax(err, fabs(s - c[i + j * M]));
        }
    snprintf(d, sizeof d, "max error %.2e", err);
    check(rc == 0 && err == 0, "cublasGemmEx fp16 in, fp32 out, A transposed", d);
    clean("cublas: no report");

    float hc[100];
    e = emu_half_chain(100, hc);
    ok = e == cudaSuccess;
    for (int i = 0; i < 100 && ok; i++)
        ok = hc[i] == (float)i / 2;
    check(ok, "fp16 results of a call stored to device memory, then read by the next kernel",
          cudaGetErrorName(e));
    clean("half chain: the stores count as writes (no uninitialised read)");
}

struct fault {
    int which;
    const char *what;
    qs_emu_kind kind;
    cudaError_t err;  /* what the program sees */
    int needs_checks; /* 1: the access instrumentation finds it */
};

static const struct fault faults[] = {
    {0, "missing __syncthreads between writes and a neighbour's read", QS_EMU_RACE, cudaSuccess, 1},
    {1, "two threads write one shared word", QS_EMU_RACE, cudaSuccess, 1},
    {2, "write after other threads' reads, no barrier", QS_EMU_RACE, cudaSuccess, 1},
    {3, "static shared array indexed past its end", QS_EMU_OOB_SHARED, cudaErrorIllegalAddress, 1},
    {4, "dynamic shared memory read past its end", QS_EMU_OOB_SHARED, cudaErrorIllegalAddress, 1},
    {5, "global read past the end of an allocation", QS_EMU_OOB_GLOBAL, cudaErrorIllegalAddress, 1},
    {6, "global memory read before anything wrote it", QS_EMU_UNINIT_GLOBAL, cudaSuccess, 1},
    {7, "shared memory read before any thread wrote it", QS_EMU_UNINIT_SHARED, cudaSuccess, 1},
    {8, "threads at two different __syncthreads", QS_EMU_DIVERGENT_BARRIER, cudaErrorLaunchFailure,
     0},
    {9, "threads exit before a __syncthreads others reach", QS_EMU_DIVERGENT_BARRIER,
     cudaErrorLaunchFailure, 0},
    {10, "a host pointer dereferenced in a kernel", QS_EMU_HOST_POINTER, cudaErrorIllegalAddress,
     1},
    {11, "float4 load 4 bytes off its alignment", QS_EMU_MISALIGNED, cudaErrorMisalignedAddress, 1},
    {12, "shuffle by lanes their mask does not name", QS_EMU_DIVERGENT_WARP, cudaErrorLaunchFailure,
     0},
    {13, "shuffle reads a lane outside its mask", QS_EMU_BAD_MASK, cudaSuccess, 0},
    {14, "half a warp at a full-mask shuffle, the rest at a barrier", QS_EMU_DEADLOCK,
     cudaErrorLaunchFailure, 0},
    {15, "one warp's lanes at two call sites of a shuffle", QS_EMU_DIVERGENT_WARP,
     cudaErrorLaunchFailure, 0},
    {16, "64 KiB dynamic shared memory without cudaFuncSetAttribute", QS_EMU_LAUNCH,
     cudaErrorInvalidValue, 0},
    {17, "40 KiB static + 16 KiB dynamic shared memory", QS_EMU_LAUNCH, cudaErrorInvalidValue, 0},
    {18, "2048 threads per block", QS_EMU_LAUNCH, cudaErrorInvalidConfiguration, 0},
    {19, "__trap()", QS_EMU_TRAP, cudaErrorLaunchFailure, 0},
};

/* Under ASan: the out-of-bounds faults must stop a child process. */
static void asan_child(const struct fault *f)
{
    fflush(NULL);
    pid_t p = fork();
    if (p == 0) {
        emu_fault(f->which);
        _exit(0); /* ASan did not stop it */
    }
    int st = 0;
    waitpid(p, &st, 0);
    int stopped = WIFSIGNALED(st) || (WIFEXITED(st) && WEXITSTATUS(st) != 0);
    char what[200];
    snprintf(what, sizeof what, "under ASan: %s stops the program", f->what);
    check(stopped, what, stopped ? "" : "the child ran to the end");
}

static void faulty_kernels(void)
{
    int checks = qs_emu_checks_active();
    for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++) {
        const struct fault *f = &faults[i];
        if (f->needs_checks && !checks) {
            if (f->kind == QS_EMU_OOB_SHARED || f->kind == QS_EMU_OOB_GLOBAL)
                asan_child(f);
            else
                printf("skip %s: needs the access instrumentation, which is off under "
                       "AddressSanitizer\n",
                       f->what);
            continue;
        }
        qs_emu_reset();
        cudaError_t e = emu_fault(f->which);
        unsigned long n = qs_emu_count(f->kind);
        char d[900];
        snprintf(d, sizeof d, "%lu report(s) of the kind, program sees %s (want %s); last: %.600s",
                 n, cudaGetErrorName(e), cudaGetErrorName(f->err), qs_emu_last_report());
        check(n >= 1 && e == f->err, f->what, n >= 1 && e == f->err ? "" : d);
        if (n >= 1 && i < 3)
            printf("     %s\n", qs_emu_last_report()); /* what a user reads */
        qs_emu_reset();
        /* A fault is over once reset: the device works again. */
        float s[1];
        double r[1];
        check(emu_block_sum(1, s, r) == cudaSuccess, "  the device works after the reset", "");
        qs_emu_reset();
    }
}

/* Reference conversions in double arithmetic: the representable fp16 (or
 * bf16) values around x, and the rounding rule applied to them. */
static double f16_value(unsigned short h)
{
    int e = (h >> 10) & 31, m = h & 1023;
    double v = e ? ldexp(1024 + m, e - 25) : ldexp(m, -24);
    return (h & 0x8000) ? -v : v;
}

static unsigned short ref_f2h(float f, int toward_zero)
{
    if (isnan(f))
        return 0x7fff;
    double a = fabs((double)f);
    unsigned short s = signbit(f) ? 0x8000 : 0, best = 0;
    if (!toward_zero && a >= 65520.0)
        return s | 0x7c00;
    if (isinf(f))
        return s | 0x7c00;
    /* The largest finite fp16 at or below a, then the rule. */
    unsigned short lo = 0;
    for (int b = 14; b >= 0; b--) /* binary search over 0..0x7bff */
        if ((unsigned)(lo | (1u << b)) <= 0x7bff &&
            f16_value((unsigned short)(lo | (1u << b))) <= a)
            lo |= (unsigned short)(1u << b);
    if (toward_zero || lo == 0x7bff)
        best = lo;
    else {
        double dl = a - f16_value(lo), dh = f16_value((unsigned short)(lo + 1)) - a;
        best = dl < dh || (dl == dh && !(lo & 1)) ? lo : (unsigned short)(lo + 1);
    }
    return s | best;
}

static unsigned short ref_f2bf(float f)
{
    if (isnan(f))
        return 0x7fff;
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;
    float fl, fh;
    memcpy(&fl, &lo, 4);
    memcpy(&fh, &hi, 4);
    double dl = fabs((double)f - fl), dh = fabs((double)fh - f);
    if (isinf(f))
        return (unsigned short)(u >> 16);
    return (unsigned short)((dl < dh || (dl == dh && !((lo >> 16) & 1))) ? lo >> 16 : hi >> 16);
}

static void conversions(void)
{
    enum { N = 1 << 16 };
    static float in[N], back[N];
    static unsigned short h[N], hz[N], bf[N];
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < N; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        uint32_t u = (uint32_t)x;
        if (i % 4 == 1) /* near fp16's range: exponents 2^-26 .. 2^17 */
            u = (u & 0x807fffffu) | ((uint32_t)(101 + (x >> 40) % 43) << 23);
        if (i % 4 == 2) /* exact ties of fp16 and of bf16 */
            u = (u & 0x807fe000u) | 0x1000u | ((uint32_t)(103 + (x >> 40) % 40) << 23);
        if (i % 4 == 3)
            u = (u & 0xffff0000u) | 0x8000u;
        memcpy(&in[i], &u, 4);
    }
    const float special[] = {0.0f,          -0.0f,    65504.0f,       65519.99f,
                             65520.0f,      1e-8f,    2.98023224e-8f, 5.96046448e-8f,
                             6.1035156e-5f, INFINITY, -INFINITY,      NAN};
    for (size_t i = 0; i < sizeof special / sizeof special[0]; i++)
        in[i * 4] = special[i];
    cudaError_t e = emu_convert(in, N, h, hz, bf, back);
    long bad_h = 0, bad_z = 0, bad_b = 0, bad_back = 0;
    for (int i = 0; i < N; i++) {
        bad_h += h[i] != ref_f2h(in[i], 0);
        bad_z += hz[i] != ref_f2h(in[i], 1);
        bad_b += bf[i] != ref_f2bf(in[i]);
        double v = (h[i] & 0x7fff) > 0x7c00    ? NAN
                   : (h[i] & 0x7fff) == 0x7c00 ? INFINITY
                                               : fabs(f16_value(h[i]));
        if ((h[i] & 0x8000) && !isnan(v))
            v = -v;
        bad_back += !(isnan(v) ? isnan(back[i]) : (double)back[i] == v);
    }
    char d[160];
    snprintf(d, sizeof d, "%ld / %ld / %ld / %ld of %d differ", bad_h, bad_z, bad_b, bad_back, N);
    check(e == cudaSuccess && !bad_h && !bad_z && !bad_b && !bad_back,
          "fp32 -> fp16 (nearest even, toward zero), -> bf16, fp16 -> fp32: bit exact against "
          "double-precision references (subnormals, ties, overflow, NaN)",
          d);
    clean("conversions: no report");
}

static void banks(void)
{
    if (!qs_emu_checks_active()) {
        printf("skip bank model: needs the access instrumentation, off under AddressSanitizer\n");
        return;
    }
    static const struct {
        int pattern;
        const char *what;
        double want; /* load wavefronts of the pattern's access */
    } pats[] = {{0, "consecutive words", 1},  {1, "stride 32 words", 32},
                {2, "broadcast", 1},          {3, "stride 2 words", 2},
                {4, "stride 33 (padded)", 1}, {5, "float4 per lane", 4}};
    for (size_t i = 0; i < sizeof pats / sizeof pats[0]; i++) {
        qs_emu_reset();
        qs_emu_bank_stats ld, st;
        cudaError_t e = emu_bank(pats[i].pattern);
        qs_emu_banks("bank_pattern", &ld, &st);
        /* Requests: the fill loop's 33 stores and the one load under test. */
        char what[120], d[160];
        snprintf(what, sizeof what, "bank model: %s takes %.0f wavefront(s)", pats[i].what,
                 pats[i].want);
        snprintf(d, sizeof d, "loads %llu requests, %llu wavefronts, ideal %llu",
                 (unsigned long long)ld.requests, (unsigned long long)ld.wavefronts,
                 (unsigned long long)ld.ideal);
        check(e == cudaSuccess && ld.requests == 1 && ld.wavefronts == (uint64_t)pats[i].want, what,
              d);
        if (i == 0)
            check(st.requests == 33 && st.wavefronts == 33,
                  "bank model: the fill's 33 stores "
                  "are conflict-free",
                  "");
    }
    qs_emu_reset();
}

int main(void)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    struct cudaDeviceProp p;
    cudaGetDeviceProperties(&p, 0);
    printf("# %s, %d SMs, %zu bytes shared per block (opt-in); access checks %s\n", p.name,
           p.multiProcessorCount, p.sharedMemPerBlockOptin,
           qs_emu_checks_active() ? "on" : "off (AddressSanitizer build)");
    check(e == cudaSuccess && n >= 1, "the emulated device answers", cudaGetErrorName(e));
    correct_kernels();
    conversions();
    faulty_kernels();
    banks();
    qs_emu_reset();
    printf("# test_emu_harness: %d cases, %d failures\n", cases, failures);
    return failures ? 1 : 0;
}
