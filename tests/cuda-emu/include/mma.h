/* mma.h (cuda-emu): nvcuda::wmma at the API level. A fragment holds
 * num_elements = rows * cols / 32 elements per lane; element e of lane l is
 * entry e * 32 + l of the fragment's matrix in row-major order (the
 * hardware's assignment is unspecified, and portable code cannot depend on
 * it). load/store are per-lane accesses, so the harness checks their
 * bounds, races and initialisation; every call is warp-collective and its
 * pointer and ldm must be the same on all lanes, the pointer 256-bit
 * aligned and ldm a multiple of 16 bytes, as the CUDA guide requires.
 * mma_sync gathers the warp's fragments and each lane computes its own
 * elements of D, products summed over k in order in the accumulator's
 * type (fp32 for half inputs, int32 for int8). */
#ifndef QS_EMU_MMA_H
#define QS_EMU_MMA_H

#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace nvcuda
{
namespace wmma
{

struct matrix_a {
};
struct matrix_b {
};
struct accumulator {
};
struct row_major {
};
struct col_major {
};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K> struct qs_dims;
template <int M, int N, int K> struct qs_dims<matrix_a, M, N, K> {
    static constexpr int rows = M, cols = K;
};
template <int M, int N, int K> struct qs_dims<matrix_b, M, N, K> {
    static constexpr int rows = K, cols = N;
};
template <int M, int N, int K> struct qs_dims<accumulator, M, N, K> {
    static constexpr int rows = M, cols = N;
};

template <class Use, int M, int N, int K, class T, class Layout = void> class fragment
{
    static_assert((M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) ||
                      (M == 8 && N == 32 && K == 16),
                  "cuda-emu WMMA shapes: m16n16k16, m32n8k16, m8n32k16");

  public:
    static constexpr int rows = qs_dims<Use, M, N, K>::rows, cols = qs_dims<Use, M, N, K>::cols;
    static constexpr int num_elements = rows * cols / 32;
    T x[num_elements];
    typedef T element_type;
    typedef Layout layout_type;
};

/* Entry (r, c) of lane `lane`'s element e: the lane's NE elements are a
 * run of one row (row-contiguous) or one column (a and b fragments with
 * col_major), so a load or store of a lane is one 16-byte access where the
 * memory layout agrees, as ldmatrix's are. */
template <int ROWS, int COLS, int NE, bool COLC>
static inline void qs_rc(int e, int lane, int *r, int *c)
{
    int i = lane * NE + e;
    if (COLC)
        *c = i / ROWS, *r = i % ROWS;
    else
        *r = i / COLS, *c = i % COLS;
}
template <class Use, class Layout> struct qs_colc {
    static constexpr bool v = false;
};
template <> struct qs_colc<matrix_a, col_major> {
    static constexpr bool v = true;
};
template <> struct qs_colc<matrix_b, col_major> {
    static constexpr bool v = true;
};

template <class T> static inline void qs_check_ptr(const T *p, unsigned ldm, const char *what)
{
    const uint64_t u[2] = {(uint64_t)(uintptr_t)p, ldm};
    qs_emu::check_warp_uniform(u, sizeof u, what, __FILE__, __LINE__);
    if ((uintptr_t)p % 32)
        qs_emu::trap("WMMA pointer is not 256-bit aligned", __FILE__, __LINE__);
    if ((ldm * sizeof(T)) % 16)
        qs_emu::trap("WMMA ldm is not a multiple of 16 bytes", __FILE__, __LINE__);
}

/* bytes from src to dst in the widest accesses their alignment allows,
 * as plain loads and stores (not memcpy, which the instrumentation does
 * not see). */
static inline void qs_copy_run(void *dst, const void *src, size_t bytes)
{
    struct alignas(16) b16 {
        unsigned char b[16];
    };
    size_t step = ((uintptr_t)dst | (uintptr_t)src | bytes) % 16 == 0  ? 16
                  : ((uintptr_t)dst | (uintptr_t)src | bytes) % 8 == 0 ? 8
                  : ((uintptr_t)dst | (uintptr_t)src | bytes) % 4 == 0 ? 4
                                                                       : 2;
    qs_emu::g_bank_mute = 1;
    for (size_t o = 0; o < bytes; o += step) {
        char *d = (char *)dst + o;
        const char *s = (const char *)src + o;
        if (step == 16)
            *(b16 *)d = *(const b16 *)s;
        else if (step == 8)
            *(uint64_t *)d = *(const uint64_t *)s;
        else if (step == 4)
            *(uint32_t *)d = *(const uint32_t *)s;
        else
            *(uint16_t *)d = *(const uint16_t *)s;
    }
    qs_emu::g_bank_mute = 0;
}

/* row: memory is row-major. COLC: the fragment's runs are columns. */
template <bool COLC, class F, class T>
static inline void qs_load(F &f, const T *p, unsigned ldm, bool row)
{
    constexpr int NE = F::num_elements;
    int r, c;
    qs_rc<F::rows, F::cols, NE, COLC>(0, (int)qs_emu::g_lane, &r, &c);
    if (row == !COLC) { /* the lane's run is contiguous in memory: one access */
        qs_copy_run(f.x, row ? p + (size_t)r * ldm + c : p + (size_t)c * ldm + r, sizeof f.x);
        return;
    }
    qs_emu::g_bank_mute = 1;
    for (int e = 0; e < NE; e++) {
        qs_rc<F::rows, F::cols, NE, COLC>(e, (int)qs_emu::g_lane, &r, &c);
        f.x[e] = row ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r];
    }
    qs_emu::g_bank_mute = 0;
}

template <class Use, int M, int N, int K, class T, class TP>
static inline void load_matrix_sync(fragment<Use, M, N, K, T, row_major> &f, const TP *p,
                                    unsigned ldm)
{
    qs_check_ptr(p, ldm, "wmma::load_matrix_sync");
    qs_load<false>(f, reinterpret_cast<const T *>(p), ldm, true);
}
template <class Use, int M, int N, int K, class T, class TP>
static inline void load_matrix_sync(fragment<Use, M, N, K, T, col_major> &f, const TP *p,
                                    unsigned ldm)
{
    qs_check_ptr(p, ldm, "wmma::load_matrix_sync");
    qs_load<qs_colc<Use, col_major>::v>(f, reinterpret_cast<const T *>(p), ldm, false);
}
template <int M, int N, int K, class T>
static inline void load_matrix_sync(fragment<accumulator, M, N, K, T> &f, const T *p, unsigned ldm,
                                    layout_t layout)
{
    qs_check_ptr(p, ldm, "wmma::load_matrix_sync");
    qs_load<false>(f, p, ldm, layout == mem_row_major);
}

template <int M, int N, int K, class T>
static inline void store_matrix_sync(T *p, const fragment<accumulator, M, N, K, T> &f, unsigned ldm,
                                     layout_t layout)
{
    qs_check_ptr(p, ldm, "wmma::store_matrix_sync");
    typedef fragment<accumulator, M, N, K, T> F;
    constexpr int NE = F::num_elements;
    int r, c;
    qs_rc<F::rows, F::cols, NE, false>(0, (int)qs_emu::g_lane, &r, &c);
    if (layout == mem_row_major) {
        qs_copy_run(p + (size_t)r * ldm + c, f.x, sizeof f.x);
        return;
    }
    qs_emu::g_bank_mute = 1;
    for (int e = 0; e < NE; e++) {
        qs_rc<F::rows, F::cols, NE, false>(e, (int)qs_emu::g_lane, &r, &c);
        p[(size_t)c * ldm + r] = f.x[e];
    }
    qs_emu::g_bank_mute = 0;
}

template <class Use, int M, int N, int K, class T, class L, class V>
static inline void fill_fragment(fragment<Use, M, N, K, T, L> &f, const V &v)
{
    qs_emu::syncwarp(__FILE__, __LINE__);
    for (int e = 0; e < f.num_elements; e++)
        f.x[e] = T(v);
}

template <class T> struct qs_elem;
template <> struct qs_elem<__half> {
    static constexpr int v = qs_emu::E_F16;
};
template <> struct qs_elem<float> {
    static constexpr int v = qs_emu::E_F32;
};
template <> struct qs_elem<signed char> {
    static constexpr int v = qs_emu::E_S8;
};
template <> struct qs_elem<unsigned char> {
    static constexpr int v = qs_emu::E_U8;
};
template <> struct qs_elem<int> {
    static constexpr int v = qs_emu::E_S32;
};

template <int M, int N, int K, class TA, class LA, class LB, class TC, class TD>
static inline void
mma_sync(fragment<accumulator, M, N, K, TD> &d, const fragment<matrix_a, M, N, K, TA, LA> &a,
         const fragment<matrix_b, M, N, K, TA, LB> &b, const fragment<accumulator, M, N, K, TC> &c)
{
    qs_emu::wmma_mma(M, N, K, qs_elem<TA>::v, a.x, qs_colc<matrix_a, LA>::v, b.x,
                     qs_colc<matrix_b, LB>::v, qs_elem<TC>::v, c.x, qs_elem<TD>::v, d.x, __FILE__,
                     __LINE__);
}

} /* namespace wmma */
} /* namespace nvcuda */

#endif
