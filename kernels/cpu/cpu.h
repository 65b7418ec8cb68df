/* cpu.h: private helpers shared by the CPU kernel files (not installed). */
#ifndef QS_CPU_H
#define QS_CPU_H

#include "qs_kernels.h"

/* Paths in increasing order of what they use; a forced path caps the ISA.
 * avx512 (AVX-512 BW + VBMI) changes LUT-GEMM, and W4A4 where the CPU also
 * has AVX-512 VNNI; W8A8 uses AVX-VNNI at avxvnni and above where the CPU
 * has it. */
enum { QS_PATH_SCALAR = 0, QS_PATH_AVX2 = 1, QS_PATH_AVXVNNI = 2, QS_PATH_AVX512 = 3 };

/* The path in force: best available, or what qs_cpu_force_path chose. */
int qs_cpu_path_id(void);
/* Whether the CPU has AVX-VNNI (VEX vpdpbusd). */
int qs_cpu_has_vnni(void);
/* Whether the CPU has AVX-512 VNNI (EVEX vpdpbusd on 512-bit vectors) on
 * top of the avx512 path's AVX-512 F + BW + VBMI. */
int qs_cpu_has_avx512vnni(void);

/* Checked M x K (and M x N) element counts for a GEMM call. */
static inline int qs_gemm_dims_ok(size_t M, size_t K, size_t N)
{
    size_t t;
    if (M == 0)
        return qs_seterr(QS_EINVAL, "GEMM batch M is 0: pass at least one token");
    if (__builtin_mul_overflow(M, K, &t) || __builtin_mul_overflow(t, sizeof(double), &t) ||
        __builtin_mul_overflow(M, N, &t) || __builtin_mul_overflow(t, sizeof(double), &t))
        return qs_seterr(QS_EOVERFLOW, "GEMM of %zu tokens overflows size_t: split the batch", M);
    return QS_OK;
}

#endif
