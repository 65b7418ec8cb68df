/* dispatch.c: which SIMD path the CPU kernels take, decided once at run
 * time from cpuid, so that one binary runs everywhere and uses what it finds. */
#include <cpuid.h>
#include <string.h>

#include "cpu.h"

/* cpuid bits that not every compiler's __builtin_cpu_supports names
 * (clang 14 knows neither "f16c" nor "avxvnni"): F16C is leaf 1, ECX bit
 * 29; AVX-VNNI is leaf 7 subleaf 1, EAX bit 4. The OS's AVX state is what
 * __builtin_cpu_supports("avx2") already checks. */
static int has_f16c(void)
{
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c >> 29 & 1);
}

static int has_avxvnni(void)
{
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 4 & 1);
}

/* AVX-512 VNNI: leaf 7 subleaf 0, ECX bit 11 (the OS's zmm state is what
 * __builtin_cpu_supports("avx512f") checks). */
static int has_avx512vnni(void)
{
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (c >> 11 & 1);
}

static int forced = -1, best = -1, vnni, avx512, avx512vnni;

static void detect(void)
{
    if (best >= 0)
        return;
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
    vnni = avx2 && has_avxvnni();
    avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vbmi");
    avx512vnni = avx512 && has_avx512vnni();
    best = !avx2 ? QS_PATH_SCALAR : avx512 ? QS_PATH_AVX512 : vnni ? QS_PATH_AVXVNNI : QS_PATH_AVX2;
}

int qs_cpu_path_id(void)
{
    detect();
    return forced >= 0 ? forced : best;
}

int qs_cpu_has_vnni(void)
{
    detect();
    return vnni;
}

int qs_cpu_has_avx512vnni(void)
{
    detect();
    return avx512vnni;
}

const char *qs_cpu_path(void)
{
    static const char *names[] = {"scalar", "avx2", "avxvnni", "avx512"};
    return names[qs_cpu_path_id()];
}

int qs_cpu_force_path(const char *force)
{
    forced = -1;
    if (!force)
        return QS_OK;
    int want = !strcmp(force, "scalar")    ? QS_PATH_SCALAR
               : !strcmp(force, "avx2")    ? QS_PATH_AVX2
               : !strcmp(force, "avxvnni") ? QS_PATH_AVXVNNI
               : !strcmp(force, "avx512")  ? QS_PATH_AVX512
                                           : -1;
    if (want < 0)
        return qs_seterr(QS_EINVAL, "unknown CPU path '%s': use scalar, avx2, avxvnni or avx512",
                         force);
    detect();
    if (want > best || (want == QS_PATH_AVXVNNI && !vnni) || (want == QS_PATH_AVX512 && !avx512))
        return qs_seterr(QS_ENOTSUP, "this CPU lacks the '%s' instructions: the best it has is %s",
                         force, qs_cpu_path());
    forced = want;
    return QS_OK;
}
