/* check.cpp: every memory access of device code, as the hardware and
 * compute-sanitizer see it.
 *
 * Device code is compiled with GCC's ThreadSanitizer instrumentation
 * (-fsanitize=thread, no TSan runtime linked): the compiler puts a call to
 * __tsan_readN / __tsan_writeN before each load and store that may touch
 * memory, and this file defines those calls. On the host they return at
 * once; while a device thread runs, the address is classified:
 *   - the block's shared memory: bounds (each QS_SHARED array and the
 *     dynamic part, with red zones between), alignment, reads of bytes no
 *     thread of the block wrote, races (below), and the bank model's log;
 *   - device memory (memory.cpp): bounds against live allocations,
 *     alignment, reads of bytes nothing wrote;
 *   - the thread's own stack and the program image: allowed;
 *   - anything else is host memory that a GPU could not reach: fatal.
 *
 * Races: between two barriers of a block, one thread's write and another
 * thread's read or write of the same byte conflict unless both are
 * atomics, or both threads are in one warp and a warp collective naming
 * both came between them (__syncwarp, shuffles, votes, ...). Each shared
 * byte keeps its last write and up to two distinct readers of the current
 * interval, with the code locations, so a report names both sides. */
#include "emu_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <algorithm>
#include <map>
#include <unordered_map>

#ifdef QS_EMU_ASAN
#include <sanitizer/asan_interface.h>
#endif

extern "C" char __executable_start[], _end[];

namespace qs_emu
{

bool g_hooks;
volatile int g_in_kernel;
int g_bank_mute;
char *g_smem;

namespace
{

struct cell {
    uint32_t wblock, wbar, wseq;
    uint16_t wtid;
    uint8_t watomic, nreaders;
    uint32_t rblock, rbar;
    uint16_t rtid[2];
    uint32_t rseq[2];
    const void *wpc;
    const void *rpc[2];
};

cell *g_cells;
uint8_t *g_smem_ok; /* addressable in this block */
uintptr_t g_stack_lo, g_stack_hi;
unsigned g_tid;

struct wevent {
    uint32_t seq, mask;
};
std::vector<wevent> g_wevents[32];
uint32_t g_wseq[32];

struct range {
    uint32_t off, bytes;
};
std::vector<range> g_defined; /* what check_begin_block must forget */

void init_smem()
{
    if (g_smem)
        return;
    void *p = mmap(NULL, SMEM_CAPACITY + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (p == MAP_FAILED) {
        fprintf(stderr, "qs-emu: cannot map the shared-memory arena\n");
        abort();
    }
    g_smem = (char *)(((uintptr_t)p + 1023) & ~(uintptr_t)1023);
#ifdef QS_EMU_ASAN
    /* Without the instrumentation ASan checks shared bounds: all of the
     * arena is poisoned but the block's arrays. */
    __asan_poison_memory_region(g_smem, SMEM_CAPACITY);
#endif
    g_cells = (cell *)calloc(SMEM_CAPACITY, sizeof(cell));
    g_smem_ok = (uint8_t *)calloc(SMEM_CAPACITY, 1);
    if (!g_cells || !g_smem_ok) {
        fprintf(stderr, "qs-emu: out of memory for the shared-memory shadow\n");
        abort();
    }
}

void define(uint32_t off, uint32_t bytes)
{
#ifdef QS_EMU_ASAN
    __asan_unpoison_memory_region(g_smem + off, bytes);
#endif
    memset(g_smem_ok + off, 1, bytes);
    memset(g_smem + off, 0xff, bytes); /* NaN in fp16 and fp32: unwritten reads show */
    g_defined.push_back(range{off, bytes});
}

std::string smem_where(uint32_t off)
{
    char b[256];
    snprintf(b, sizeof b, "shared offset %u, outside every array", off);
    block_run *blk = g_block;
    if (off < blk->dyn_bytes) {
        snprintf(b, sizeof b, "dynamic shared memory + %u (of %zu bytes)", off, blk->dyn_bytes);
        return b;
    }
    for (const static_alloc &s : blk->statics)
        if (off >= s.off && off < s.off + s.bytes) {
            snprintf(b, sizeof b, "'%s' + %u (%u bytes, %s:%d)", s.name, off - s.off, s.bytes,
                     s.file, s.line);
            return b;
        }
    /* Outside everything: name the nearest array below. */
    const static_alloc *near = NULL;
    for (const static_alloc &s : blk->statics)
        if (s.off + s.bytes <= off && (!near || s.off > near->off))
            near = &s;
    if (near)
        snprintf(b, sizeof b, "%u bytes past the end of '%s' (%u bytes, %s:%d)",
                 off - (near->off + near->bytes), near->name, near->bytes, near->file, near->line);
    else if (off >= blk->dyn_bytes)
        snprintf(b, sizeof b, "%llu bytes past the end of the %zu bytes of dynamic shared memory",
                 (unsigned long long)(off - blk->dyn_bytes), blk->dyn_bytes);
    return b;
}

std::string thread_of(unsigned tid)
{
    const dim3 &d = g_block_dim;
    char b[48];
    snprintf(b, sizeof b, "(%u,%u,%u)", tid % d.x, (tid / d.x) % d.y, tid / (d.x * d.y));
    return b;
}

/* Did a warp collective naming both threads come after a's access? */
bool warp_ordered(unsigned ta, uint32_t seqa, unsigned tb)
{
    if (ta / 32 != tb / 32 || ta / 32 >= 32)
        return false;
    const std::vector<wevent> &ev = g_wevents[ta / 32];
    unsigned la = ta % 32, lb = tb % 32;
    for (size_t i = ev.size(); i-- > 0 && ev[i].seq > seqa;)
        if ((ev[i].mask >> la & 1u) && (ev[i].mask >> lb & 1u))
            return true;
    return false;
}

void race(const char *what, uint32_t off, unsigned other, const void *other_pc,
          const char *other_did, const void *pc, const char *did)
{
    if (!report_once(QS_EMU_RACE, other_pc, pc))
        return;
    char msg[1024];
    snprintf(msg, sizeof msg,
             "shared-memory race (%s) on %s: thread %s %s it at %s, and thread %s %s it at %s, "
             "with no __syncthreads (or __syncwarp naming both) between",
             what, smem_where(off).c_str(), thread_of(other).c_str(), other_did,
             symbolize(other_pc).c_str(), thread_of(g_tid).c_str(), did, symbolize(pc).c_str());
    report_msg(QS_EMU_RACE, "%s", msg);
}

void shared_access(uint32_t off, size_t n, bool write, bool atomic, const void *pc)
{
    block_run *blk = g_block;
    /* Arrays are contiguous and red zones wider than any access, so the two
     * ends decide the bounds. */
    if (off + n > SMEM_CAPACITY || !g_smem_ok[off] || !g_smem_ok[off + n - 1])
        for (size_t i = 0; i < n; i++)
            if (off + i >= SMEM_CAPACITY || !g_smem_ok[off + i])
                fatal(QS_EMU_OOB_SHARED, cudaErrorIllegalAddress,
                      "invalid shared %s of %zu bytes at %s, %s", write ? "write" : "read", n,
                      smem_where((uint32_t)(off + i)).c_str(), symbolize(pc).c_str());
    if (n > 1 && (off % n) && !atomic)
        fatal(QS_EMU_MISALIGNED, cudaErrorMisalignedAddress,
              "misaligned shared %s of %zu bytes at %s, %s", write ? "write" : "read", n,
              smem_where(off).c_str(), symbolize(pc).c_str());
    if (blk->sample_banks && !g_bank_mute)
        g_cur->log.push_back(access_rec{pc, off, (uint8_t)n, (uint8_t)write});
    if (!blk->full_checks)
        return;
    const uint32_t bs = blk->serial, bar = blk->barriers, t = g_tid, w = t / 32;
    const uint32_t seq = w < 32 ? g_wseq[w] : 0;
    bool raced = false;
    for (size_t i = 0; i < n; i++) {
        cell &c = g_cells[off + i];
        bool written = c.wblock == bs;
        if (!write) {
            if (!written) {
                if (report_once(QS_EMU_UNINIT_SHARED, pc, NULL))
                    report_msg(QS_EMU_UNINIT_SHARED,
                               "thread %s reads %zu bytes of shared memory at %s that no thread "
                               "of the block has written, %s",
                               thread_of(t).c_str(), n, smem_where(off).c_str(),
                               symbolize(pc).c_str());
                break;
            }
            if (!raced && c.wbar == bar && c.wtid != t && !(atomic && c.watomic) &&
                !warp_ordered(c.wtid, c.wseq, t)) {
                race("read after write", off, c.wtid, c.wpc, "wrote", pc, "reads");
                raced = true;
            }
            if (c.rblock != bs || c.rbar != bar) {
                c.rblock = bs, c.rbar = bar, c.nreaders = 1;
                c.rtid[0] = (uint16_t)t, c.rseq[0] = seq, c.rpc[0] = pc;
            } else if (c.rtid[0] == t) {
                c.rseq[0] = seq, c.rpc[0] = pc;
            } else if (c.nreaders == 1) {
                c.nreaders = 2, c.rtid[1] = (uint16_t)t, c.rseq[1] = seq, c.rpc[1] = pc;
            } else if (c.rtid[1] == t) {
                c.rseq[1] = seq, c.rpc[1] = pc;
            }
        } else {
            if (!raced && written && c.wbar == bar && c.wtid != t && !(atomic && c.watomic) &&
                !warp_ordered(c.wtid, c.wseq, t)) {
                race("write after write", off, c.wtid, c.wpc, "wrote", pc, "writes");
                raced = true;
            }
            if (!raced && c.rblock == bs && c.rbar == bar && !atomic) {
                for (int r = 0; r < c.nreaders && !raced; r++)
                    if (c.rtid[r] != t && !warp_ordered(c.rtid[r], c.rseq[r], t)) {
                        race("write after read", off, c.rtid[r], c.rpc[r], "read", pc, "writes");
                        raced = true;
                    }
            }
            c.wblock = bs, c.wbar = bar, c.wseq = seq, c.wtid = (uint16_t)t;
            c.watomic = atomic, c.wpc = pc;
        }
    }
}

void global_access(uintptr_t a, size_t n, bool write, bool atomic, const void *pc)
{
    uint8_t *s = g_dev_shadow + (a - g_dev_base);
    if (s[0] == SH_NONE || s[n - 1] == SH_NONE) /* red zones are wider than an access */
        for (size_t i = 0; i < n; i++)
            if (s[i] == SH_NONE)
                fatal(QS_EMU_OOB_GLOBAL, cudaErrorIllegalAddress,
                      "invalid global %s of %zu bytes at %p: %s, %s", write ? "write" : "read", n,
                      (void *)a, dev_describe(a + i, n - i).c_str(), symbolize(pc).c_str());
    if (n > 1 && (a % n) && !atomic)
        fatal(QS_EMU_MISALIGNED, cudaErrorMisalignedAddress,
              "misaligned global %s of %zu bytes at %p, %s", write ? "write" : "read", n, (void *)a,
              symbolize(pc).c_str());
    if (write) {
        memset(s, SH_INIT, n);
        return;
    }
    if (!g_block->full_checks)
        return;
    for (size_t i = 0; i < n; i++)
        if (s[i] != SH_INIT) {
            if (report_once(QS_EMU_UNINIT_GLOBAL, pc, NULL))
                report_msg(QS_EMU_UNINIT_GLOBAL,
                           "thread %s reads %zu bytes at %p that nothing has written (%s), %s",
                           thread_of(g_tid).c_str(), n, (void *)a, dev_describe(a, n).c_str(),
                           symbolize(pc).c_str());
            return;
        }
}

} /* namespace */

/* The one entry for every access of device code (and of the runtime's
 * atomics, which pass atomic = true). */
void check_access(const void *p, size_t n, bool write, bool atomic, const void *pc)
{
    uintptr_t a = (uintptr_t)p;
    if (a - (uintptr_t)g_smem < SMEM_CAPACITY) {
        shared_access((uint32_t)(a - (uintptr_t)g_smem), n, write, atomic, pc);
        return;
    }
    if (a - g_dev_base < g_dev_span) {
        global_access(a, n, write, atomic, pc);
        return;
    }
    if (a - g_stack_lo < g_stack_hi - g_stack_lo)
        return;
    if (a >= (uintptr_t)__executable_start && a < (uintptr_t)_end)
        return; /* __constant__ and __device__ variables, static tables, the runtime's state */
    if (a - (uintptr_t)g_smem < SMEM_CAPACITY + 4096) /* the arena's tail */
        fatal(QS_EMU_OOB_SHARED, cudaErrorIllegalAddress,
              "invalid shared %s of %zu bytes past the end of shared memory, %s",
              write ? "write" : "read", n, symbolize(pc).c_str());
    fatal(QS_EMU_HOST_POINTER, cudaErrorIllegalAddress,
          "device code %s %zu bytes of host memory at %p (a host pointer given to a kernel, or "
          "another thread's local variable?), %s",
          write ? "writes" : "reads", n, p, symbolize(pc).c_str());
}

void check_begin_block(size_t dyn_bytes)
{
    init_smem();
    for (const range &r : g_defined) {
        memset(g_smem_ok + r.off, 0, r.bytes);
#ifdef QS_EMU_ASAN
        __asan_poison_memory_region(g_smem + r.off, r.bytes);
#endif
    }
    g_defined.clear();
    if (dyn_bytes)
        define(0, (uint32_t)dyn_bytes);
    for (int w = 0; w < 32; w++)
        g_wevents[w].clear(), g_wseq[w] = 0;
}

void check_define_static(uint32_t off, uint32_t bytes)
{
    define(off, bytes);
}

void check_barrier()
{
    for (int w = 0; w < 32; w++)
        g_wevents[w].clear();
}

void check_warp_sync(unsigned warp, unsigned mask)
{
    if (warp >= 32)
        return;
    g_wevents[warp].push_back(wevent{++g_wseq[warp], mask});
}

void check_set_thread(fiber *f)
{
    g_stack_lo = (uintptr_t)f->lo, g_stack_hi = (uintptr_t)f->hi;
    g_tid = f->tid;
}

/* ---- The bank model ------------------------------------------------------------------- */
namespace
{

/* Wavefronts of one warp-wide access: per phase (all 32 lanes for accesses
 * of 4 bytes or less, 16 for 8 bytes, 8 for 16), the most distinct 4-byte
 * words that fall in one bank; the same word is a broadcast. */
uint64_t wavefronts(const std::vector<std::pair<unsigned, const access_rec *>> &lanes,
                    uint64_t *ideal)
{
    unsigned size = lanes[0].second->size;
    unsigned per = size <= 4 ? 32 : size == 8 ? 16 : 8;
    uint64_t total = 0;
    *ideal = 0;
    for (unsigned phase = 0; phase < 32 / per; phase++) {
        std::vector<uint32_t> words[32];
        bool any = false;
        for (const auto &la : lanes) {
            if (la.first / per != phase)
                continue;
            any = true;
            const access_rec *r = la.second;
            for (uint32_t w = r->off / 4; w <= (r->off + r->size - 1) / 4; w++) {
                std::vector<uint32_t> &b = words[w % 32];
                if (std::find(b.begin(), b.end(), w) == b.end())
                    b.push_back(w);
            }
        }
        if (!any)
            continue;
        size_t most = 1;
        for (auto &b : words)
            most = std::max(most, b.size());
        total += most;
        *ideal += 1;
    }
    return total;
}

} /* namespace */

/* A barrier ends an interval: the bank groups of the sampled block are
 * formed per interval, by (instruction, how many times this lane ran it). */
void check_end_interval()
{
    block_run *b = g_block;
    if (!b || !b->sample_banks)
        return;
    std::vector<fiber> &fb = fibers();
    for (unsigned w = 0; w * 32 < b->nthreads; w++) {
        std::map<std::pair<const void *, unsigned>,
                 std::vector<std::pair<unsigned, const access_rec *>>>
            groups;
        for (unsigned l = 0; l < 32 && w * 32 + l < b->nthreads; l++) {
            std::unordered_map<const void *, unsigned> seen;
            for (const access_rec &r : fb[w * 32 + l].log)
                groups[{r.pc, seen[r.pc]++}].push_back({l, &r});
        }
        for (auto &g : groups) {
            uint64_t ideal = 0, wave = wavefronts(g.second, &ideal);
            int st = g.second[0].second->write ? 1 : 0;
            b->k->bank_req[st]++;
            b->k->bank_wave[st] += wave;
            b->k->bank_ideal[st] += ideal;
        }
    }
    for (unsigned t = 0; t < b->nthreads; t++)
        fb[t].log.clear();
}

void check_bank_block(block_run *b)
{
    (void)b; /* the last interval was folded in by check_end_interval */
}

bool in_shared(const void *p, size_t bytes)
{
    uintptr_t a = (uintptr_t)p, lo = (uintptr_t)g_smem;
    return g_smem && a >= lo && bytes <= SMEM_CAPACITY && a - lo <= SMEM_CAPACITY - bytes;
}

} /* namespace qs_emu */

/* ---- The instrumentation's entry points ------------------------------------------------ */
using qs_emu::g_in_kernel;
#define QS_EMU_HOOK(n)                                                                             \
    extern "C" void __tsan_read##n(void *p)                                                        \
    {                                                                                              \
        if (g_in_kernel)                                                                           \
            qs_emu::check_access(p, n, false, false, __builtin_return_address(0));                 \
    }                                                                                              \
    extern "C" void __tsan_write##n(void *p)                                                       \
    {                                                                                              \
        if (g_in_kernel)                                                                           \
            qs_emu::check_access(p, n, true, false, __builtin_return_address(0));                  \
    }                                                                                              \
    extern "C" void __tsan_unaligned_read##n(void *p)                                              \
    {                                                                                              \
        if (g_in_kernel)                                                                           \
            qs_emu::check_access(p, n, false, false, __builtin_return_address(0));                 \
    }                                                                                              \
    extern "C" void __tsan_unaligned_write##n(void *p)                                             \
    {                                                                                              \
        if (g_in_kernel)                                                                           \
            qs_emu::check_access(p, n, true, false, __builtin_return_address(0));                  \
    }                                                                                              \
    extern "C" void __tsan_volatile_read##n(void *p)                                               \
    {                                                                                              \
        if (g_in_kernel)                                                                           \
            qs_emu::check_access(p, n, false, false, __builtin_return_address(0));                 \
    }                                                                                              \
    extern "C" void __tsan_volatile_write##n(void *p)                                              \
    {                                                                                              \
        if (g_in_kernel)                                                                           \
            qs_emu::check_access(p, n, true, false, __builtin_return_address(0));                  \
    }
QS_EMU_HOOK(1)
QS_EMU_HOOK(2)
QS_EMU_HOOK(4)
QS_EMU_HOOK(8)
QS_EMU_HOOK(16)
#undef QS_EMU_HOOK

extern "C" void __tsan_read_range(void *p, unsigned long n)
{
    if (g_in_kernel)
        qs_emu::check_access(p, n, false, false, __builtin_return_address(0));
}
extern "C" void __tsan_write_range(void *p, unsigned long n)
{
    if (g_in_kernel)
        qs_emu::check_access(p, n, true, false, __builtin_return_address(0));
}
/* Called from the constructor of every instrumented object file. */
extern "C" void __tsan_init(void)
{
    qs_emu::g_hooks = true;
}
extern "C" void __tsan_func_entry(void *pc)
{
    (void)pc;
}
extern "C" void __tsan_func_exit(void) {}
extern "C" void __tsan_vptr_update(void **p, void *v)
{
    (void)p, (void)v;
}
extern "C" void __tsan_vptr_read(void **p)
{
    (void)p;
}
