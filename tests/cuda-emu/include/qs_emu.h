/* qs_emu.h (cuda-emu): CUDA C++ device code compiled by g++ for the CPU
 * execution harness. The project's own .cu files compile unchanged against
 * this header (cuda_runtime.h includes it); the few places where CUDA C++
 * syntax is not C++ go through three macros that nvcc expands to the CUDA
 * forms (kernels/cuda/cuda_compat.cuh):
 *
 *   QS_LAUNCH(grid, block, smem, stream, kernel)(args...)   kernel<<<...>>>(args...)
 *   QS_DYN_SMEM(T, name);                                   extern __shared__ T name[];
 *   QS_SHARED(T, name, [dims]);  QS_SHARED_ALIGNED(a, T, name, [dims]);
 *
 * Execution model (runtime/sched.cpp): a launch runs its blocks one after
 * another on the calling thread; a block's threads are fibers that switch
 * only at barriers and warp collectives, so a run is deterministic. Every
 * memory access of code compiled with the harness's instrumentation goes
 * through runtime/check.cpp, which knows shared memory, device memory, the
 * thread's own stack and the program image, and reports what the hardware
 * or compute-sanitizer would: out-of-bounds and misaligned accesses,
 * host pointers dereferenced on the device, shared-memory races between
 * barriers, reads of unwritten shared or device memory, divergent barriers
 * and warp collectives, launches over the device's limits. */
#ifndef QS_EMU_H
#define QS_EMU_H

#ifndef __cplusplus
#error "qs_emu.h is the device side of the CUDA harness: compile .cu sources as C++"
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <new>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_runtime_api.h"
#include "qs_emu_api.h"

#define QS_CUDA_EMU 1
/* Device code is compiled as for an H100 (sm_90): arch-specific paths take
 * the branch they take there. Host/device dispatch must not test it. */
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900
#endif

/* ---- Keywords ------------------------------------------------------------- */
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __align__(n)    __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __grid_constant__
/* Static shared memory is declared with QS_SHARED so that the harness knows
 * each array's bounds; a plain __shared__ is a compile error here. */
#define __shared__                                                                                 \
    _Pragma("GCC error \"under cuda-emu declare shared memory with QS_SHARED / QS_DYN_SMEM "       \
            "(kernels/cuda/cuda_compat.cuh)\"")

/* ---- Vector types ----------------------------------------------------------- */
#define QS_EMU_VEC2(T, N, A)                                                                       \
    struct __attribute__((aligned(A))) N {                                                         \
        T x, y;                                                                                    \
    };                                                                                             \
    static inline N make_##N(T x, T y)                                                             \
    {                                                                                              \
        N v = {x, y};                                                                              \
        return v;                                                                                  \
    }
#define QS_EMU_VEC3(T, N)                                                                          \
    struct N {                                                                                     \
        T x, y, z;                                                                                 \
    };                                                                                             \
    static inline N make_##N(T x, T y, T z)                                                        \
    {                                                                                              \
        N v = {x, y, z};                                                                           \
        return v;                                                                                  \
    }
#define QS_EMU_VEC4(T, N, A)                                                                       \
    struct __attribute__((aligned(A))) N {                                                         \
        T x, y, z, w;                                                                              \
    };                                                                                             \
    static inline N make_##N(T x, T y, T z, T w)                                                   \
    {                                                                                              \
        N v = {x, y, z, w};                                                                        \
        return v;                                                                                  \
    }
QS_EMU_VEC2(float, float2, 8)
QS_EMU_VEC4(float, float4, 16)
QS_EMU_VEC2(int, int2, 8)
QS_EMU_VEC4(int, int4, 16)
QS_EMU_VEC2(unsigned int, uint2, 8)
QS_EMU_VEC4(unsigned int, uint4, 16)
QS_EMU_VEC2(double, double2, 16)
QS_EMU_VEC2(short, short2, 4)
QS_EMU_VEC2(unsigned short, ushort2, 4)
QS_EMU_VEC4(signed char, char4, 4)
QS_EMU_VEC4(unsigned char, uchar4, 4)
QS_EMU_VEC3(float, float3)
QS_EMU_VEC3(int, int3)
QS_EMU_VEC3(unsigned int, uint3)
#undef QS_EMU_VEC2
#undef QS_EMU_VEC3
#undef QS_EMU_VEC4

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
        : x(vx), y(vy), z(vz)
    {
    }
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const
    {
        return uint3{x, y, z};
    }
};

/* ---- The runtime's side (tests/cuda-emu/runtime) -------------------------- */
namespace qs_emu
{

/* The running thread's coordinates, kept by the scheduler in the program
 * image (device code may read it; see check.cpp). */
extern uint3 g_thread_idx;
extern uint3 g_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;
extern unsigned g_lane, g_warp;
/* Non-zero while a WMMA fragment is loaded or stored: the bank model leaves
 * those accesses out (their per-lane layout is the emulator's, not the
 * hardware's, which is unspecified). */
extern int g_bank_mute;

enum warp_kind {
    W_SYNCWARP,
    W_SHFL,
    W_VOTE,
    W_MATCH,
    W_REDUCE,
    W_WMMA,
    W_MMA,
    W_LDMATRIX,
    W_NKINDS
};

/* A collective over the lanes of `mask` in the calling thread's warp: each
 * lane gives `bytes` bytes at `in`; `out` (32 slots of `bytes`) receives
 * slot l = lane l's input for every lane that took part, zeros elsewhere.
 * Returns the lanes that took part: those of mask that exist and have not
 * exited (the CUDA rule for *_sync). Checks that the caller is in mask, and
 * that all lanes meet at the same kind, mask and (but for __syncwarp) line. */
unsigned warp_collective(int kind, unsigned mask, const void *in, void *out, size_t bytes,
                         const char *file, int line);
/* The same without the copies: returns the warp's 32 slots in one buffer
 * of the runtime's, valid until the calling lane's next collective. */
const void *warp_gather(int kind, unsigned mask, const void *in, size_t bytes, const char *file,
                        int line, unsigned *got);

/* Element types of the tensor-core arithmetic (runtime/tensor.cpp). */
enum elem { E_F16, E_BF16, E_F32, E_S8, E_U8, E_S32 };
/* WMMA D = A B + C for the calling lane: gathers the warp's A and B
 * fragments (lane l's elements are the l-th run of the matrix in row-major
 * order, column-major where a_col / b_col) and computes the lane's elements of D, products summed
 * over k in order in fp32 (int32 for 8-bit inputs). */
void wmma_mma(int M, int N, int K, int tin, const void *a, int a_col, const void *b, int b_col,
              int tc, const void *c, int td, void *d, const char *file, int line);
unsigned active_mask();

/* ---- PTX-level operations: what kernels/cuda/ptx.cuh's emulations call -------
 * (runtime/tensor.cpp, sched.cpp, check.cpp). */
/* Whether [p, p + bytes) lies in the block's shared-memory arena: the
 * .shared state space that ldmatrix and cp.async's destination require. */
bool in_shared(const void *p, size_t bytes);
/* mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 for the calling lane:
 * gathers the warp's A (4 registers) and B (2 registers) fragments, places
 * their bytes by the PTX ISA's fragment tables and computes the lane's four
 * elements of D = A B + C in int32 (wrapping, as the hardware's adder does
 * without .satfinite). d may be c. All 32 lanes must take part. */
void mma_s8_m16n8k32(const uint32_t a[4], const uint32_t b[2], const int32_t c[4], int32_t d[4],
                     const char *file, int line);
/* mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 likewise: eight two's
 * complement nibbles per register, low to high (A 16 x 64, B 64 x 8). */
void mma_s4_m16n8k64(const uint32_t a[4], const uint32_t b[2], const int32_t c[4], int32_t d[4],
                     const char *file, int line);
/* cp.async, per thread: a 16-byte copy issued (the caller has done it once
 * already), a group committed, and the copies that cp.async.wait_group
 * `keep` completes: the oldest copy of a group older than the `keep` most
 * recent committed groups, removed from the thread's list (true), or none
 * left (false). The caller performs the copy again then, so that a read of
 * the destination by another thread before the issuing thread waited races
 * with it (and a write into a buffer others still read races with the
 * first copy). */
void cp_async_issue(void *dst, const void *src, unsigned src_bytes);
void cp_async_commit();
bool cp_async_complete(unsigned keep, void **dst, const void **src, unsigned *src_bytes);

void syncthreads(const char *file, int line);
int syncthreads_count(int pred, const char *file, int line);

/* Shared memory of the running block: the dynamic part, and one static
 * array per (tag, block), bounded, poisoned (0xFF) at block start. */
void *dyn_smem(size_t align);
void *static_smem(const void *tag, size_t bytes, size_t align, const char *name, const char *file,
                  int line);

/* A device-side error the hardware would fault on: ends the launch. */
[[noreturn]] void trap(const char *why, const char *file, int line);
/* A report the harness makes (races and the like); the caller goes on. */
void report(qs_emu_kind kind, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* A misuse of the WMMA/PTX-level interfaces (alignment, shape). */
void check_warp_uniform(const void *value, size_t bytes, const char *what, const char *file,
                        int line);

long long clock64();

/* ---- Launches --------------------------------------------------------------- */
struct launch_desc {
    const char *name; /* the kernel as written at the launch */
    const char *file;
    int line;
    const void *fn; /* identity for cudaFuncSetAttribute and the per-kernel caches */
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    /* The arguments, a std::tuple<fn, P...>: copied onto each thread's stack
     * (copy) and run from there (invoke), so device code reads only its own
     * stack. */
    const void *args;
    size_t args_size, args_align;
    void (*copy)(void *dst, const void *src);
    void (*invoke)(const void *args);
};
void launch(const launch_desc &d);

template <class... P> struct launcher {
    void (*fn)(P...);
    const char *name, *file;
    int line;
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;

    typedef std::tuple<void (*)(P...), typename std::decay<P>::type...> tuple_t;
    static void copy(void *dst, const void *src)
    {
        new (dst) tuple_t(*static_cast<const tuple_t *>(src));
    }
    static void invoke(const void *p)
    {
        std::apply([](auto f, auto... a) { f(a...); }, *static_cast<const tuple_t *>(p));
    }
    template <class... A> void operator()(A &&...a) const
    {
        static_assert(sizeof...(A) == sizeof...(P),
                      "kernel launched with the wrong number of arguments");
        static_assert(std::is_trivially_destructible<tuple_t>::value,
                      "kernel arguments must be trivially copyable");
        tuple_t args(fn, std::forward<A>(a)...);
        launch_desc d = {name,   file,  line,        (const void *)fn, grid,  block,  smem,
                         stream, &args, sizeof args, alignof(tuple_t), &copy, &invoke};
        launch(d);
    }
};
template <class... P> struct launcher_ref {
    void (*fn)(P...);
    launcher<P...> bind(const char *name, const char *file, int line, dim3 g, dim3 b, size_t smem,
                        cudaStream_t st) const
    {
        return launcher<P...>{fn, name, file, line, g, b, smem, st};
    }
};
template <class... P> static inline launcher_ref<P...> launcher_for(void (*fn)(P...))
{
    return launcher_ref<P...>{fn};
}

} /* namespace qs_emu */

#define threadIdx (qs_emu::g_thread_idx)
#define blockIdx  (qs_emu::g_block_idx)
#define blockDim  (qs_emu::g_block_dim)
#define gridDim   (qs_emu::g_grid_dim)
static constexpr int warpSize = 32;

#define QS_LAUNCH(grid, block, smem, stream, ...)                                                  \
    qs_emu::launcher_for(__VA_ARGS__)                                                              \
        .bind(#__VA_ARGS__, __FILE__, __LINE__, grid, block, smem, (cudaStream_t)(stream))
#define QS_DYN_SMEM(T, name) T *name = reinterpret_cast<T *>(qs_emu::dyn_smem(alignof(T)))
#define QS_SHARED_ALIGNED(a, T, name, dims)                                                        \
    static const char qs_emu_tag_##name = 0;                                                       \
    typedef T qs_emu_type_##name dims;                                                             \
    qs_emu_type_##name &name = *reinterpret_cast<qs_emu_type_##name *>(                            \
        qs_emu::static_smem(&qs_emu_tag_##name, sizeof(qs_emu_type_##name),                        \
                            (a) > alignof(T) ? (a) : alignof(T), #name, __FILE__, __LINE__))
#define QS_SHARED(T, name, dims) QS_SHARED_ALIGNED(alignof(T), T, name, dims)

/* ---- Barriers ---------------------------------------------------------------- */
#define __syncthreads()        qs_emu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_count(p) qs_emu::syncthreads_count((p) != 0, __FILE__, __LINE__)
#define __syncthreads_and(p)                                                                       \
    (qs_emu::syncthreads_count((p) != 0, __FILE__, __LINE__) ==                                    \
     (int)(blockDim.x * blockDim.y * blockDim.z))
#define __syncthreads_or(p) (qs_emu::syncthreads_count((p) != 0, __FILE__, __LINE__) != 0)
#define __syncwarp(...)     qs_emu::syncwarp_at{__FILE__, __LINE__}(__VA_ARGS__)
/* The harness runs one thread at a time: fences order nothing more. */
#define __threadfence()        ((void)0)
#define __threadfence_block()  ((void)0)
#define __threadfence_system() ((void)0)
#define __trap()               qs_emu::trap("__trap() called", __FILE__, __LINE__)

namespace qs_emu
{

static inline void syncwarp(const char *file, int line, unsigned mask = 0xffffffffu)
{
    warp_collective(W_SYNCWARP, mask, nullptr, nullptr, 0, file, line);
}
/* __syncwarp() and __syncwarp(mask) with the caller's line. */
struct syncwarp_at {
    const char *file;
    int line;
    void operator()(unsigned mask = 0xffffffffu) const
    {
        syncwarp(file, line, mask);
    }
};

/* ---- Warp shuffles and votes ------------------------------------------------- */
static inline int shfl_width(int width, const char *file, int line)
{
    if (width < 1 || width > 32 || (width & (width - 1)))
        trap("shuffle width must be a power of two from 1 to 32", file, line);
    return width;
}

template <class T>
static inline T shfl_pick(unsigned got, const T *all, int src, T mine, const char *file, int line)
{
    if (!(got >> src & 1u)) {
        report(QS_EMU_BAD_MASK, file, line,
               "lane %u reads lane %d, which is not in the shuffle's mask or has exited: the value "
               "is undefined on a GPU",
               g_lane, src);
        return mine;
    }
    return all[src];
}

template <class T>
static inline T shfl_idx(const char *file, int line, unsigned mask, T v, int src, int width = 32)
{
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                  "shuffle of a type over 8 bytes");
    T all[32];
    unsigned got = warp_collective(W_SHFL, mask, &v, all, sizeof(T), file, line);
    int w = shfl_width(width, file, line), base = (int)g_lane & ~(w - 1);
    return shfl_pick(got, all, base + (src & (w - 1)), v, file, line);
}
template <class T>
static inline T shfl_up(const char *file, int line, unsigned mask, T v, unsigned d, int width = 32)
{
    T all[32];
    unsigned got = warp_collective(W_SHFL, mask, &v, all, sizeof(T), file, line);
    int w = shfl_width(width, file, line), base = (int)g_lane & ~(w - 1), s = (int)g_lane - (int)d;
    return s < base ? v : shfl_pick(got, all, s, v, file, line);
}
template <class T>
static inline T shfl_down(const char *file, int line, unsigned mask, T v, unsigned d,
                          int width = 32)
{
    T all[32];
    unsigned got = warp_collective(W_SHFL, mask, &v, all, sizeof(T), file, line);
    int w = shfl_width(width, file, line), base = (int)g_lane & ~(w - 1), s = (int)g_lane + (int)d;
    return s >= base + w ? v : shfl_pick(got, all, s, v, file, line);
}
template <class T>
static inline T shfl_xor(const char *file, int line, unsigned mask, T v, int lm, int width = 32)
{
    T all[32];
    unsigned got = warp_collective(W_SHFL, mask, &v, all, sizeof(T), file, line);
    int w = shfl_width(width, file, line), base = (int)g_lane & ~(w - 1), s = (int)g_lane ^ lm;
    return s >= base + w ? v : shfl_pick(got, all, s & 31, v, file, line);
}

static inline unsigned ballot(const char *file, int line, unsigned mask, int pred)
{
    int all[32], p = pred != 0;
    unsigned got = warp_collective(W_VOTE, mask, &p, all, sizeof p, file, line), r = 0;
    for (int l = 0; l < 32; l++)
        if ((got >> l & 1u) && all[l])
            r |= 1u << l;
    return r;
}

template <class T> static inline unsigned match_any(const char *file, int line, unsigned mask, T v)
{
    T all[32];
    unsigned got = warp_collective(W_MATCH, mask, &v, all, sizeof(T), file, line), r = 0;
    for (int l = 0; l < 32; l++)
        if ((got >> l & 1u) && !memcmp(&all[l], &v, sizeof(T)))
            r |= 1u << l;
    return r;
}
template <class T>
static inline unsigned match_all(const char *file, int line, unsigned mask, T v, int *pred)
{
    unsigned r = match_any(file, line, mask, v), got = mask & active_mask();
    *pred = r == got;
    return *pred ? got : 0;
}

enum { R_ADD, R_MIN, R_MAX, R_AND, R_OR, R_XOR };
template <class T> static inline T reduce(const char *file, int line, int op, unsigned mask, T v)
{
    T all[32];
    unsigned got = warp_collective(W_REDUCE, mask, &v, all, sizeof(T), file, line);
    T r = v;
    bool first = true;
    for (int l = 0; l < 32; l++) {
        if (!(got >> l & 1u))
            continue;
        T x = all[l];
        if (first)
            r = x, first = false;
        else if (op == R_ADD)
            r = r + x;
        else if (op == R_MIN)
            r = x < r ? x : r;
        else if (op == R_MAX)
            r = x > r ? x : r;
        else if (op == R_AND)
            r = r & x;
        else if (op == R_OR)
            r = r | x;
        else
            r = r ^ x;
    }
    return r;
}

} /* namespace qs_emu */

#define __shfl_sync(...)      qs_emu::shfl_idx(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...)   qs_emu::shfl_up(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) qs_emu::shfl_down(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...)  qs_emu::shfl_xor(__FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(m, p)   qs_emu::ballot(__FILE__, __LINE__, m, (p) != 0)
#define __any_sync(m, p)      (qs_emu::ballot(__FILE__, __LINE__, m, (p) != 0) != 0u)
#define __all_sync(m, p)                                                                           \
    (qs_emu::ballot(__FILE__, __LINE__, m, (p) != 0) == ((m)&qs_emu::active_mask()))
#define __activemask()            qs_emu::active_mask()
#define __match_any_sync(m, v)    qs_emu::match_any(__FILE__, __LINE__, m, v)
#define __match_all_sync(m, v, p) qs_emu::match_all(__FILE__, __LINE__, m, v, p)
#define __reduce_add_sync(m, v)   qs_emu::reduce(__FILE__, __LINE__, qs_emu::R_ADD, m, v)
#define __reduce_min_sync(m, v)   qs_emu::reduce(__FILE__, __LINE__, qs_emu::R_MIN, m, v)
#define __reduce_max_sync(m, v)   qs_emu::reduce(__FILE__, __LINE__, qs_emu::R_MAX, m, v)
#define __reduce_and_sync(m, v)   qs_emu::reduce(__FILE__, __LINE__, qs_emu::R_AND, m, v)
#define __reduce_or_sync(m, v)    qs_emu::reduce(__FILE__, __LINE__, qs_emu::R_OR, m, v)
#define __reduce_xor_sync(m, v)   qs_emu::reduce(__FILE__, __LINE__, qs_emu::R_XOR, m, v)

/* ---- Atomics: in the runtime, outside the instrumented code, so that the
 * race detector sees them as atomic (runtime/atomics.cpp). ---------------- */
int atomicAdd(int *p, int v);
unsigned atomicAdd(unsigned *p, unsigned v);
unsigned long long atomicAdd(unsigned long long *p, unsigned long long v);
float atomicAdd(float *p, float v);
double atomicAdd(double *p, double v);
int atomicSub(int *p, int v);
unsigned atomicSub(unsigned *p, unsigned v);
int atomicExch(int *p, int v);
unsigned atomicExch(unsigned *p, unsigned v);
unsigned long long atomicExch(unsigned long long *p, unsigned long long v);
float atomicExch(float *p, float v);
int atomicMin(int *p, int v);
unsigned atomicMin(unsigned *p, unsigned v);
long long atomicMin(long long *p, long long v);
unsigned long long atomicMin(unsigned long long *p, unsigned long long v);
int atomicMax(int *p, int v);
unsigned atomicMax(unsigned *p, unsigned v);
long long atomicMax(long long *p, long long v);
unsigned long long atomicMax(unsigned long long *p, unsigned long long v);
int atomicCAS(int *p, int cmp, int v);
unsigned atomicCAS(unsigned *p, unsigned cmp, unsigned v);
unsigned long long atomicCAS(unsigned long long *p, unsigned long long cmp, unsigned long long v);
unsigned short atomicCAS(unsigned short *p, unsigned short cmp, unsigned short v);
int atomicAnd(int *p, int v);
unsigned atomicAnd(unsigned *p, unsigned v);
int atomicOr(int *p, int v);
unsigned atomicOr(unsigned *p, unsigned v);
int atomicXor(int *p, int v);
unsigned atomicXor(unsigned *p, unsigned v);
unsigned atomicInc(unsigned *p, unsigned v);
unsigned atomicDec(unsigned *p, unsigned v);

/* ---- Loads and stores with cache hints: plain accesses here ---------------- */
template <class T> static inline __attribute__((always_inline)) T __ldg(const T *p)
{
    return *p;
}
template <class T> static inline __attribute__((always_inline)) T __ldcg(const T *p)
{
    return *p;
}
template <class T> static inline __attribute__((always_inline)) T __ldca(const T *p)
{
    return *p;
}
template <class T> static inline __attribute__((always_inline)) T __ldcs(const T *p)
{
    return *p;
}
template <class T> static inline __attribute__((always_inline)) T __ldlu(const T *p)
{
    return *p;
}
template <class T> static inline __attribute__((always_inline)) T __ldcv(const T *p)
{
    return *p;
}
template <class T> static inline void __stcg(T *p, T v)
{
    *p = v;
}
template <class T> static inline void __stcs(T *p, T v)
{
    *p = v;
}
template <class T> static inline void __stwb(T *p, T v)
{
    *p = v;
}
template <class T> static inline void __stwt(T *p, T v)
{
    *p = v;
}

/* ---- Integer and float intrinsics ----------------------------------------------- */
/* __expf, __logf, __sinf and friends are glibc's own functions of those
 * names (full precision, where the GPU's are approximate). */
static inline int min(int a, int b)
{
    return a < b ? a : b;
}
static inline unsigned min(unsigned a, unsigned b)
{
    return a < b ? a : b;
}
static inline unsigned min(int a, unsigned b)
{
    return min((unsigned)a, b);
}
static inline unsigned min(unsigned a, int b)
{
    return min(a, (unsigned)b);
}
static inline long long min(long long a, long long b)
{
    return a < b ? a : b;
}
static inline unsigned long long min(unsigned long long a, unsigned long long b)
{
    return a < b ? a : b;
}
static inline long min(long a, long b)
{
    return a < b ? a : b;
}
static inline unsigned long min(unsigned long a, unsigned long b)
{
    return a < b ? a : b;
}
static inline float min(float a, float b)
{
    return fminf(a, b);
}
static inline double min(double a, double b)
{
    return fmin(a, b);
}
static inline int max(int a, int b)
{
    return a > b ? a : b;
}
static inline unsigned max(unsigned a, unsigned b)
{
    return a > b ? a : b;
}
static inline unsigned max(int a, unsigned b)
{
    return max((unsigned)a, b);
}
static inline unsigned max(unsigned a, int b)
{
    return max(a, (unsigned)b);
}
static inline long long max(long long a, long long b)
{
    return a > b ? a : b;
}
static inline unsigned long long max(unsigned long long a, unsigned long long b)
{
    return a > b ? a : b;
}
static inline long max(long a, long b)
{
    return a > b ? a : b;
}
static inline unsigned long max(unsigned long a, unsigned long b)
{
    return a > b ? a : b;
}
static inline float max(float a, float b)
{
    return fmaxf(a, b);
}
static inline double max(double a, double b)
{
    return fmax(a, b);
}

static inline int __popc(unsigned x)
{
    return __builtin_popcount(x);
}
static inline int __popcll(unsigned long long x)
{
    return __builtin_popcountll(x);
}
static inline int __clz(int x)
{
    return x ? __builtin_clz((unsigned)x) : 32;
}
static inline int __clzll(long long x)
{
    return x ? __builtin_clzll((unsigned long long)x) : 64;
}
static inline int __ffs(int x)
{
    return __builtin_ffs(x);
}
static inline int __ffsll(long long x)
{
    return __builtin_ffsll(x);
}
static inline unsigned __brev(unsigned x)
{
    x = (x >> 1 & 0x55555555u) | (x & 0x55555555u) << 1;
    x = (x >> 2 & 0x33333333u) | (x & 0x33333333u) << 2;
    x = (x >> 4 & 0x0f0f0f0fu) | (x & 0x0f0f0f0fu) << 4;
    return __builtin_bswap32(x);
}
/* PRMT in its default mode: byte i of the result is byte s[i] of {y, x}. */
static inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s)
{
    unsigned long long v = (unsigned long long)y << 32 | x, r = 0;
    for (int i = 0; i < 4; i++)
        r |= (v >> (8 * ((s >> (4 * i)) & 7)) & 0xffu) << (8 * i);
    return (unsigned)r;
}
static inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s)
{
    unsigned long long v = (unsigned long long)hi << 32 | lo;
    return (unsigned)((v << (s & 31)) >> 32);
}
static inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned s)
{
    unsigned long long v = (unsigned long long)hi << 32 | lo;
    return (unsigned)((v << (s > 32 ? 32 : s)) >> 32);
}
static inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s)
{
    unsigned long long v = (unsigned long long)hi << 32 | lo;
    return (unsigned)(v >> (s & 31));
}
static inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned s)
{
    unsigned long long v = (unsigned long long)hi << 32 | lo;
    return (unsigned)(v >> (s > 32 ? 32 : s));
}
static inline unsigned __umulhi(unsigned a, unsigned b)
{
    return (unsigned)(((unsigned long long)a * b) >> 32);
}
static inline int __mulhi(int a, int b)
{
    return (int)(((long long)a * b) >> 32);
}
static inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b)
{
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
static inline int __mul24(int a, int b)
{
    return ((a << 8) >> 8) * ((b << 8) >> 8);
}
static inline unsigned __umul24(unsigned a, unsigned b)
{
    return (a & 0xffffffu) * (b & 0xffffffu);
}
/* DP4A: four int8 products summed into c (signed x signed, unsigned x unsigned). */
static inline int __dp4a(int a, int b, int c)
{
    for (int i = 0; i < 4; i++)
        c += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
    return c;
}
static inline unsigned __dp4a(unsigned a, unsigned b, unsigned c)
{
    for (int i = 0; i < 4; i++)
        c += ((a >> (8 * i)) & 0xffu) * ((b >> (8 * i)) & 0xffu);
    return c;
}
static inline int __float_as_int(float f)
{
    int i;
    memcpy(&i, &f, 4);
    return i;
}
static inline unsigned __float_as_uint(float f)
{
    unsigned i;
    memcpy(&i, &f, 4);
    return i;
}
static inline float __int_as_float(int i)
{
    float f;
    memcpy(&f, &i, 4);
    return f;
}
static inline float __uint_as_float(unsigned i)
{
    float f;
    memcpy(&f, &i, 4);
    return f;
}
static inline long long __double_as_longlong(double d)
{
    long long i;
    memcpy(&i, &d, 8);
    return i;
}
static inline double __longlong_as_double(long long i)
{
    double d;
    memcpy(&d, &i, 8);
    return d;
}
static inline float rsqrtf(float x)
{
    return 1.0f / sqrtf(x);
}
static inline double rsqrt(double x)
{
    return 1.0 / sqrt(x);
}
static inline float __fdividef(float a, float b)
{
    return a / b;
}
static inline float fdividef(float a, float b)
{
    return a / b;
}
static inline float __frcp_rn(float x)
{
    return 1.0f / x;
}
static inline float __fsqrt_rn(float x)
{
    return sqrtf(x);
}
static inline float __frsqrt_rn(float x)
{
    return 1.0f / sqrtf(x);
}
static inline float __fmaf_rn(float a, float b, float c)
{
    return fmaf(a, b, c);
}
static inline float __fadd_rn(float a, float b)
{
    return a + b;
}
static inline float __fsub_rn(float a, float b)
{
    return a - b;
}
static inline float __fmul_rn(float a, float b)
{
    return a * b;
}
static inline float __fdiv_rn(float a, float b)
{
    return a / b;
}
static inline float __saturatef(float x)
{
    return x != x ? 0.0f : x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x;
}
static inline int __float2int_rn(float x)
{
    return (int)nearbyintf(x);
}
static inline int __float2int_rz(float x)
{
    return (int)x;
}
static inline int __float2int_rd(float x)
{
    return (int)floorf(x);
}
static inline int __float2int_ru(float x)
{
    return (int)ceilf(x);
}
static inline unsigned __float2uint_rn(float x)
{
    return (unsigned)nearbyintf(x);
}
static inline long long __float2ll_rn(float x)
{
    return (long long)nearbyintf(x);
}
static inline float __int2float_rn(int i)
{
    return (float)i;
}
static inline float __uint2float_rn(unsigned i)
{
    return (float)i;
}
static inline float __ll2float_rn(long long i)
{
    return (float)i;
}
static inline long long clock64()
{
    return qs_emu::clock64();
}
static inline void __nanosleep(unsigned ns)
{
    (void)ns;
}

#endif
