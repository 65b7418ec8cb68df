/* memory.cpp: device memory. One reserved address range that only device
 * allocations use, so that an address says by itself whether it is device
 * memory; a shadow byte per byte says whether it is allocated, and whether
 * anything has written it (what compute-sanitizer's memcheck and initcheck
 * know). Allocations are 256-byte aligned, as cudaMalloc's, with red zones
 * between them, filled with 0xFF (NaN as fp16 and fp32), and never reused:
 * a freed address stays invalid for the life of the process. Under
 * AddressSanitizer the red zones and freed ranges are poisoned too, so
 * ASan catches what the instrumentation would. */
#include "emu_internal.h"

#include <execinfo.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <map>

#ifdef QS_EMU_ASAN
#include <sanitizer/asan_interface.h>
#endif

namespace qs_emu
{

uintptr_t g_dev_base, g_dev_span;
uint8_t *g_dev_shadow;

namespace
{

enum { ALIGN = 256, REDZONE = 256 };
const size_t SPAN = (size_t)1 << 38; /* 256 GiB of addresses, touched only where allocated */

struct alloc {
    size_t bytes;
    void *where[4]; /* the allocating call stack, for reports */
    int nwhere;
};
std::map<uintptr_t, alloc> g_live, g_freed;
uintptr_t g_bump;
size_t g_live_bytes;

bool init()
{
    if (g_dev_base)
        return true;
    void *d = mmap(NULL, SPAN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    void *s = mmap(NULL, SPAN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (d == MAP_FAILED || s == MAP_FAILED)
        return false;
    g_dev_base = (uintptr_t)d, g_dev_span = SPAN, g_dev_shadow = (uint8_t *)s;
    g_bump = g_dev_base + REDZONE;
    return true;
}

void release(uintptr_t p, size_t bytes)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = (p + page - 1) & ~(page - 1), hi = (p + bytes) & ~(page - 1);
    memset(g_dev_shadow + (p - g_dev_base), SH_NONE, bytes);
    if (hi > lo) {
        madvise((void *)lo, hi - lo, MADV_DONTNEED);
        madvise(g_dev_shadow + (lo - g_dev_base), hi - lo, MADV_DONTNEED);
    }
}

std::string alloc_site(const alloc &a)
{
    std::string s;
    for (int i = 1; i < a.nwhere && i < 4; i++) /* frame 0 is cudaMalloc itself */
        s += (s.empty() ? "" : " <- ") + symbolize(a.where[i]);
    return s.empty() ? std::string("unknown") : s;
}

const std::pair<const uintptr_t, alloc> *below(const std::map<uintptr_t, alloc> &m, uintptr_t a)
{
    auto it = m.upper_bound(a);
    if (it == m.begin())
        return nullptr;
    return &*--it;
}

} /* namespace */

bool is_device_ptr(const void *p)
{
    return g_dev_base && (uintptr_t)p - g_dev_base < g_dev_span;
}

size_t dev_live_bytes()
{
    return g_live_bytes;
}

std::string dev_describe(uintptr_t a, size_t bytes)
{
    char b[512];
    const auto *l = below(g_live, a);
    const auto *f = below(g_freed, a);
    if (l && a < l->first + l->second.bytes) {
        snprintf(b, sizeof b, "%zu bytes into a %zu-byte allocation made by %s", a - l->first,
                 l->second.bytes, alloc_site(l->second).c_str());
        return b;
    }
    if (f && a < f->first + f->second.bytes && (!l || f->first > l->first)) {
        snprintf(b, sizeof b, "inside a %zu-byte allocation already freed (allocated by %s)",
                 f->second.bytes, alloc_site(f->second).c_str());
        return b;
    }
    if (l && a - (l->first + l->second.bytes) < 4096) {
        snprintf(b, sizeof b, "%zu bytes past the end of a %zu-byte allocation made by %s",
                 a - (l->first + l->second.bytes), l->second.bytes, alloc_site(l->second).c_str());
        return b;
    }
    auto next = g_live.upper_bound(a);
    if (next != g_live.end() && next->first - a <= 4096) {
        snprintf(b, sizeof b, "%zu bytes before the start of a %zu-byte allocation made by %s",
                 next->first - a, next->second.bytes, alloc_site(next->second).c_str());
        return b;
    }
    (void)bytes;
    return "not in any device allocation";
}

bool dev_range(const void *p, size_t bytes, std::string *why)
{
    uintptr_t a = (uintptr_t)p;
    if (!is_device_ptr(p)) {
        if (why)
            *why = "not a device pointer";
        return false;
    }
    const auto *l = below(g_live, a);
    if (l && a + bytes <= l->first + l->second.bytes && a + bytes >= a)
        return true;
    if (why) {
        char b[640];
        if (l && a < l->first + l->second.bytes)
            snprintf(b, sizeof b,
                     "%zu bytes from %zu bytes into a %zu-byte allocation (made by %s) run %zu "
                     "bytes past its end",
                     bytes, a - l->first, l->second.bytes, alloc_site(l->second).c_str(),
                     a + bytes - (l->first + l->second.bytes));
        else
            snprintf(b, sizeof b, "%s", dev_describe(a, bytes).c_str());
        *why = b;
    }
    return false;
}

void dev_mark_init(const void *p, size_t bytes)
{
    if (is_device_ptr(p))
        memset(g_dev_shadow + ((uintptr_t)p - g_dev_base), SH_INIT, bytes);
}

void dev_copy_shadow(void *dst, const void *src, size_t bytes)
{
    memmove(g_dev_shadow + ((uintptr_t)dst - g_dev_base),
            g_dev_shadow + ((uintptr_t)src - g_dev_base), bytes);
}

} /* namespace qs_emu */

using namespace qs_emu;

extern "C" cudaError_t cudaMalloc(void **p, size_t bytes)
{
    std::lock_guard<std::recursive_mutex> lk(g_device_lock);
    if (!p)
        return set_last_error(cudaErrorInvalidValue), cudaErrorInvalidValue;
    *p = NULL;
    if (sticky())
        return set_last_error(sticky()), sticky();
    if (!init())
        return set_last_error(cudaErrorMemoryAllocation), cudaErrorMemoryAllocation;
    size_t total = props().totalGlobalMem;
    if (bytes > total || g_live_bytes + bytes > total - ((size_t)512 << 20) ||
        g_bump + bytes + 2 * REDZONE + ALIGN > g_dev_base + SPAN)
        return set_last_error(cudaErrorMemoryAllocation), cudaErrorMemoryAllocation;
    uintptr_t a = (g_bump + ALIGN - 1) & ~(uintptr_t)(ALIGN - 1);
    size_t n = bytes ? bytes : 1;
    g_bump = a + n + REDZONE;
    alloc al;
    al.bytes = n;
    al.nwhere = backtrace(al.where, 4);
    g_live[a] = al;
    g_live_bytes += n;
    memset(g_dev_shadow + (a - g_dev_base), SH_ALLOC, n);
    memset((void *)a, 0xff, n);
#ifdef QS_EMU_ASAN
    __asan_poison_memory_region((void *)(a + n), REDZONE);
#endif
    *p = (void *)a;
    return cudaSuccess;
}

extern "C" cudaError_t cudaFree(void *p)
{
    std::lock_guard<std::recursive_mutex> lk(g_device_lock);
    if (!p)
        return cudaSuccess;
    auto it = g_live.find((uintptr_t)p);
    if (it == g_live.end()) {
        bool freed = g_freed.count((uintptr_t)p);
        report_msg(QS_EMU_API, "cudaFree(%p): %s", p,
                   freed ? "freed twice" : dev_describe((uintptr_t)p, 1).c_str());
        set_last_error(cudaErrorInvalidValue);
        return cudaErrorInvalidValue;
    }
    alloc al = it->second;
    g_live.erase(it);
    g_live_bytes -= al.bytes;
    release((uintptr_t)p, al.bytes);
#ifdef QS_EMU_ASAN
    __asan_poison_memory_region(p, al.bytes);
#endif
    g_freed[(uintptr_t)p] = al;
    return cudaSuccess;
}

extern "C" cudaError_t cudaMallocHost(void **p, size_t bytes)
{
    if (!p)
        return cudaErrorInvalidValue;
    if (posix_memalign(p, 4096, bytes ? bytes : 1))
        return *p = NULL, set_last_error(cudaErrorMemoryAllocation), cudaErrorMemoryAllocation;
    return cudaSuccess;
}

extern "C" cudaError_t cudaHostAlloc(void **p, size_t bytes, unsigned flags)
{
    (void)flags;
    return cudaMallocHost(p, bytes);
}

extern "C" cudaError_t cudaFreeHost(void *p)
{
    free(p);
    return cudaSuccess;
}
