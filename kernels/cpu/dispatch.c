/* dispatch.c: which SIMD path the CPU kernels take, decided once at run
 * time from cpuid, so that one binary runs everywhere and uses what it finds. */
#include <string.h>

#include "cpu.h"

static int forced = -1;

int qs_cpu_path_id(void)
{
    if (forced >= 0)
        return forced;
    static int best = -1;
    if (best < 0) {
        __builtin_cpu_init();
        int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                   __builtin_cpu_supports("f16c");
        best = !avx2 ? QS_PATH_SCALAR
                     : (__builtin_cpu_supports("avxvnni") ? QS_PATH_AVXVNNI : QS_PATH_AVX2);
    }
    return best;
}

const char *qs_cpu_path(void)
{
    static const char *names[] = {"scalar", "avx2", "avxvnni"};
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
                                           : -1;
    if (want < 0)
        return qs_seterr(QS_EINVAL, "unknown CPU path '%s': use scalar, avx2 or avxvnni", force);
    if (want > qs_cpu_path_id())
        return qs_seterr(QS_ENOTSUP, "this CPU lacks the '%s' instructions: the best it has is %s",
                         force, qs_cpu_path());
    forced = want;
    return QS_OK;
}
