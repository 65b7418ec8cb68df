/* atomics.cpp: CUDA's atomic functions. Device threads run one at a time,
 * so a read-modify-write is atomic as written; what matters is that the
 * access is checked (bounds, alignment) and marked atomic for the race
 * detector, which is why these live here and not in the instrumented
 * header. */
#include "emu_internal.h"

#include <cuda_fp16.h>

namespace qs_emu
{

static inline void note(void *p, size_t n, const void *pc)
{
    if ((uintptr_t)p % n)
        fatal(QS_EMU_MISALIGNED, cudaErrorMisalignedAddress, "misaligned %zu-byte atomic at %p, %s",
              n, p, symbolize(pc).c_str());
    if (g_in_kernel)
        check_access(p, n, true, true, pc);
}

} /* namespace qs_emu */

#define PC __builtin_return_address(0)
#define RMW(T, name, expr)                                                                         \
    T name(T *p, T v)                                                                              \
    {                                                                                              \
        qs_emu::note(p, sizeof(T), PC);                                                            \
        T old = *p;                                                                                \
        *p = (expr);                                                                               \
        return old;                                                                                \
    }

RMW(int, atomicAdd, old + v)
RMW(unsigned, atomicAdd, old + v)
RMW(unsigned long long, atomicAdd, old + v)
RMW(float, atomicAdd, old + v)
RMW(double, atomicAdd, old + v)
RMW(int, atomicSub, old - v)
RMW(unsigned, atomicSub, old - v)
RMW(int, atomicExch, v)
RMW(unsigned, atomicExch, v)
RMW(unsigned long long, atomicExch, v)
RMW(float, atomicExch, v)
RMW(int, atomicMin, v < old ? v : old)
RMW(unsigned, atomicMin, v < old ? v : old)
RMW(long long, atomicMin, v < old ? v : old)
RMW(unsigned long long, atomicMin, v < old ? v : old)
RMW(int, atomicMax, v > old ? v : old)
RMW(unsigned, atomicMax, v > old ? v : old)
RMW(long long, atomicMax, v > old ? v : old)
RMW(unsigned long long, atomicMax, v > old ? v : old)
RMW(int, atomicAnd, old &v)
RMW(unsigned, atomicAnd, old &v)
RMW(int, atomicOr, old | v)
RMW(unsigned, atomicOr, old | v)
RMW(int, atomicXor, old ^ v)
RMW(unsigned, atomicXor, old ^ v)
RMW(unsigned, atomicInc, old >= v ? 0u : old + 1u)
RMW(unsigned, atomicDec, (old == 0u || old > v) ? v : old - 1u)
RMW(__half, atomicAdd, __hadd(old, v))
RMW(__half2, atomicAdd, __hadd2(old, v))
#undef RMW

#define CAS(T)                                                                                     \
    T atomicCAS(T *p, T cmp, T v)                                                                  \
    {                                                                                              \
        qs_emu::note(p, sizeof(T), PC);                                                            \
        T old = *p;                                                                                \
        if (old == cmp)                                                                            \
            *p = v;                                                                                \
        return old;                                                                                \
    }
CAS(int)
CAS(unsigned)
CAS(unsigned long long)
CAS(unsigned short)
#undef CAS
