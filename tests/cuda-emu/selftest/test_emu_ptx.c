/* test_emu_ptx.c: the emulations of the PTX wrappers (kernels/cuda/ptx.cuh)
 * on known inputs (ptx_kernels.cu), against plain products and the PTX
 * ISA's tables written out again in the kernels:
 *   - mma.sync m16n8k32 s8: registers built by the table, D = A B + C exact
 *     (the full s8 range, -128 included; C nonzero);
 *   - mma.sync m16n8k64 s4 the same (the full s4 range, -8 included), and
 *     rows of packed nibbles through ldmatrix.x4 into two k64 steps, against
 *     A W^T;
 *   - ldmatrix .x4 and .x2: lane l's register j holds bytes 4(l%4)..+3 of
 *     the row whose address lane 8j + l/4 gave (rows permuted so that the
 *     supplying lane, not the memory order, decides);
 *   - the GEMM's composition: cp.async (rows zero-filled) -> ldmatrix.x4 ->
 *     two k32 steps of mma, against A W^T;
 *   - cp.async.wait_group N: the older groups complete, the newest N later;
 *   - misuses the harness must name: reading a cp.async destination before
 *     its thread waited, refilling a buffer others still read (races, need
 *     the access instrumentation), ldmatrix misaligned or on global memory,
 *     mma (s8 and s4) by half a warp and by a warp at two call sites. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>
#include <qs_emu_api.h>

cudaError_t ptx_mma(const int8_t *A, const int8_t *W, const int32_t *C, int32_t *D);
cudaError_t ptx_mma_s4(const int8_t *A, const int8_t *W, const int32_t *C, int32_t *D);
cudaError_t ptx_ldsm_s4(const uint8_t *A, const uint8_t *W, int32_t *D);
cudaError_t ptx_ldmatrix(int num, const uint8_t *rows, const int *perm, uint32_t *out);
cudaError_t ptx_pipeline(const int8_t *A, const int8_t *W, int m_valid, int32_t *D);
cudaError_t ptx_cp_groups(const uint8_t *src, uint8_t *out);
cudaError_t ptx_fault(int which);

static int failures, cases;
static uint64_t rng = 0x243f6a8885a308d3ull;

static uint32_t rnd(void)
{
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

static void check(int ok, const char *what, const char *detail)
{
    cases++;
    if (!ok)
        failures++;
    printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", what, detail && *detail ? ": " : "",
           detail ? detail : "");
}

static void clean(const char *what)
{
    unsigned long n = qs_emu_count_all();
    char d[600];
    snprintf(d, sizeof d, "%lu unexpected report(s); last: %s", n, qs_emu_last_report());
    check(n == 0, what, n ? d : "");
    qs_emu_reset();
}

static void mma(void)
{
    int8_t A[16 * 32], W[8 * 32];
    int32_t C[16 * 8], D[16 * 8];
    for (int i = 0; i < 16 * 32; i++)
        A[i] = (int8_t)(rnd() & 0xff);
    for (int i = 0; i < 8 * 32; i++)
        W[i] = (int8_t)(rnd() & 0xff);
    A[5] = -128, W[5] = -128; /* the extremes of s8 meet once */
    for (int i = 0; i < 16 * 8; i++)
        C[i] = (int32_t)(rnd() % 200001) - 100000;
    cudaError_t e = ptx_mma(A, W, C, D);
    int bad = 0;
    for (int r = 0; r < 16; r++)
        for (int n = 0; n < 8; n++) {
            int32_t s = C[r * 8 + n];
            for (int k = 0; k < 32; k++)
                s += A[r * 32 + k] * W[n * 32 + k];
            bad += D[r * 8 + n] != s;
        }
    char d[80];
    snprintf(d, sizeof d, "%d of 128 outputs differ (%s)", bad, cudaGetErrorName(e));
    check(e == cudaSuccess && !bad,
          "mma.sync m16n8k32 s8: registers by the PTX ISA table, D = A B + C exact", d);
    clean("mma: no report");
}

static void mma_s4(void)
{
    int8_t A[16 * 64], W[8 * 64];
    int32_t C[16 * 8], D[16 * 8];
    for (int i = 0; i < 16 * 64; i++)
        A[i] = (int8_t)(rnd() % 16) - 8;
    for (int i = 0; i < 8 * 64; i++)
        W[i] = (int8_t)(rnd() % 16) - 8;
    A[9] = -8, W[9] = -8; /* the extremes of s4 meet once */
    A[70] = 7, W[6] = -8;
    for (int i = 0; i < 16 * 8; i++)
        C[i] = (int32_t)(rnd() % 200001) - 100000;
    cudaError_t e = ptx_mma_s4(A, W, C, D);
    int bad = 0;
    for (int r = 0; r < 16; r++)
        for (int n = 0; n < 8; n++) {
            int32_t s = C[r * 8 + n];
            for (int k = 0; k < 64; k++)
                s += A[r * 64 + k] * W[n * 64 + k];
            bad += D[r * 8 + n] != s;
        }
    char d[80];
    snprintf(d, sizeof d, "%d of 128 outputs differ (%s)", bad, cudaGetErrorName(e));
    check(e == cudaSuccess && !bad,
          "mma.sync m16n8k64 s4: registers by the PTX ISA table, D = A B + C exact", d);
    clean("mma s4: no report");

    /* Packed rows: A and W 16 x 128 values, nibble 2i low / 2i+1 high of byte i. */
    int8_t a[16 * 128], w[16 * 128];
    uint8_t pa[16 * 64], pw[16 * 64];
    int32_t D2[16 * 16];
    for (int i = 0; i < 16 * 128; i++)
        a[i] = (int8_t)(rnd() % 16) - 8, w[i] = (int8_t)(rnd() % 16) - 8;
    for (int i = 0; i < 16 * 64; i++) {
        pa[i] = (uint8_t)((a[2 * i] & 15) | (a[2 * i + 1] & 15) << 4);
        pw[i] = (uint8_t)((w[2 * i] & 15) | (w[2 * i + 1] & 15) << 4);
    }
    e = ptx_ldsm_s4(pa, pw, D2);
    bad = 0;
    for (int r = 0; r < 16; r++)
        for (int n = 0; n < 16; n++) {
            int32_t s = 0;
            for (int k = 0; k < 128; k++)
                s += a[r * 128 + k] * w[n * 128 + k];
            bad += D2[r * 16 + n] != s;
        }
    snprintf(d, sizeof d, "%d of 256 outputs differ (%s)", bad, cudaGetErrorName(e));
    check(e == cudaSuccess && !bad,
          "packed nibble rows -> ldmatrix.x4 -> mma s4 x 2 k-steps = A W^T", d);
    clean("ldmatrix + mma s4: no report");
}

static void ldmatrix(void)
{
    uint8_t rows[32 * 16];
    int perm[32];
    uint32_t out[32 * 4];
    for (int i = 0; i < 32 * 16; i++)
        rows[i] = (uint8_t)(rnd() & 0xff);
    for (int l = 0; l < 32; l++)
        perm[l] = (l * 7 + 3) % 32;
    for (int num = 2; num <= 4; num += 2) {
        cudaError_t e = ptx_ldmatrix(num, rows, perm, out);
        int bad = 0;
        for (int l = 0; l < 32; l++)
            for (int j = 0; j < 4; j++) {
                uint32_t want = 0;
                if (j < num) {
                    const uint8_t *row = rows + perm[8 * j + l / 4] * 16 + 4 * (l % 4);
                    want = row[0] | row[1] << 8 | row[2] << 16 | (uint32_t)row[3] << 24;
                }
                bad += out[l * 4 + j] != want;
            }
        char what[120], d[80];
        snprintf(what, sizeof what,
                 "ldmatrix.x%d: lane l's register j = bytes 4(l%%4).. of the row lane 8j + l/4 "
                 "addressed",
                 num);
        snprintf(d, sizeof d, "%d of 128 registers differ (%s)", bad, cudaGetErrorName(e));
        check(e == cudaSuccess && !bad, what, d);
        clean("ldmatrix: no report");
    }
}

static void pipeline(void)
{
    int8_t A[16 * 64], W[16 * 64];
    int32_t D[16 * 16];
    for (int i = 0; i < 16 * 64; i++)
        A[i] = (int8_t)((rnd() % 255) - 127), W[i] = (int8_t)((rnd() % 255) - 127);
    const int m_valid = 11;
    cudaError_t e = ptx_pipeline(A, W, m_valid, D);
    int bad = 0;
    for (int r = 0; r < 16; r++)
        for (int n = 0; n < 16; n++) {
            int32_t s = 0;
            for (int k = 0; k < 64 && r < m_valid; k++)
                s += A[r * 64 + k] * W[n * 64 + k];
            bad += D[r * 16 + n] != s;
        }
    char d[80];
    snprintf(d, sizeof d, "%d of 256 outputs differ (%s)", bad, cudaGetErrorName(e));
    check(e == cudaSuccess && !bad,
          "cp.async (rows 11..15 zero-filled) -> ldmatrix.x4 -> mma x 2 k-steps = A W^T", d);
    clean("pipeline: no report");
}

static void groups(void)
{
    uint8_t src[3 * 64 * 16], out[3 * 64 * 16];
    for (int i = 0; i < 3 * 64 * 16; i++)
        src[i] = (uint8_t)(rnd() & 0xff);
    cudaError_t e = ptx_cp_groups(src, out);
    check(e == cudaSuccess && !memcmp(src, out, sizeof src),
          "cp.async.wait_group 1 completes the older groups, wait_group 0 the last",
          cudaGetErrorName(e));
    clean("cp.async groups: no report (each read after the wait and a barrier)");
}

static const struct {
    int which;
    const char *what;
    qs_emu_kind kind;
    cudaError_t err;
    int needs_checks;
} faults[] = {
    {0, "a cp.async destination read by another thread before its issuer waited", QS_EMU_RACE,
     cudaSuccess, 1},
    {1, "cp.async into a buffer another thread still reads (no barrier)", QS_EMU_RACE, cudaSuccess,
     1},
    {2, "ldmatrix row address off its 16-byte alignment", QS_EMU_TRAP, cudaErrorLaunchFailure, 0},
    {3, "ldmatrix on global memory", QS_EMU_TRAP, cudaErrorLaunchFailure, 0},
    {4, "mma.sync by half a warp", QS_EMU_WARP_ARGS, cudaErrorLaunchFailure, 0},
    {5, "mma.sync by one warp at two call sites", QS_EMU_DIVERGENT_WARP, cudaErrorLaunchFailure, 0},
    {6, "mma.sync s4 by half a warp", QS_EMU_WARP_ARGS, cudaErrorLaunchFailure, 0},
};

static void misuses(void)
{
    qs_emu_set_quiet(1);
    for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++) {
        if (faults[i].needs_checks && !qs_emu_checks_active()) {
            printf("skip %s: needs the access instrumentation, off under AddressSanitizer\n",
                   faults[i].what);
            continue;
        }
        qs_emu_reset();
        cudaError_t e = ptx_fault(faults[i].which);
        unsigned long n = qs_emu_count(faults[i].kind);
        char d[900];
        snprintf(d, sizeof d, "%lu report(s) of the kind, program sees %s (want %s); last: %.600s",
                 n, cudaGetErrorName(e), cudaGetErrorName(faults[i].err), qs_emu_last_report());
        int ok = n >= 1 && e == faults[i].err;
        check(ok, faults[i].what, ok ? "" : d);
        if (ok)
            printf("     %.300s\n", qs_emu_last_report());
        qs_emu_reset();
    }
    qs_emu_set_quiet(0);
}

int main(void)
{
    printf("# test_emu_ptx: access checks %s\n",
           qs_emu_checks_active() ? "on" : "off (AddressSanitizer build)");
    mma();
    mma_s4();
    ldmatrix();
    pipeline();
    groups();
    misuses();
    qs_emu_reset();
    printf("# test_emu_ptx: %d cases, %d failures\n", cases, failures);
    return failures ? 1 : 0;
}
