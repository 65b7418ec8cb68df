/* sched.cpp: the execution model. A launch runs its blocks one after
 * another on the calling thread; a block's threads are fibers on their own
 * stacks, switched only where CUDA threads must wait for each other
 * (__syncthreads, warp collectives), in thread order: every run is the
 * same run. Barriers check that all threads of the block meet at the same
 * one; warp collectives that the lanes of their mask meet at the same
 * kind, mask and line; a block where no thread can go on is a deadlock.
 * Launch limits are the device's (runtime.cpp): threads, grid, and shared
 * memory (48 KiB unless cudaFuncSetAttribute raised it, the opt-in
 * maximum at most). */
#include "emu_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <map>
#include <memory>

#ifdef QS_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace qs_emu
{

uint3 g_thread_idx, g_block_idx;
dim3 g_block_dim, g_grid_dim;
unsigned g_lane, g_warp;
block_run *g_block;
fiber *g_cur;
std::recursive_mutex g_device_lock;

long env_long(const char *name, long def)
{
    const char *v = getenv(name);
    return v && *v ? strtol(v, NULL, 0) : def;
}

/* ---- Fibers ------------------------------------------------------------------ */
#if defined(__x86_64__)
extern "C" void qs_emu_fiber_swap(void **save_sp, void *next_sp);
extern "C" void qs_emu_fiber_start(void);
#endif

static void *g_sched_sp;
#if !defined(__x86_64__)
static ucontext_t g_sched_uc;
#endif
[[maybe_unused]] static const void *g_sched_stack_lo;
[[maybe_unused]] static size_t g_sched_stack_size;

struct stacks {
    char *base = nullptr;
    size_t each = 0, count = 0;
};
static stacks g_stacks;
static std::vector<fiber> g_fibers;
#if !defined(__x86_64__)
static std::vector<ucontext_t> g_ucs;
#endif

static size_t stack_bytes()
{
#ifdef QS_EMU_ASAN
    long kb = env_long("QS_EMU_STACK_KB", 512);
#else
    long kb = env_long("QS_EMU_STACK_KB", 128);
#endif
    return (size_t)(kb < 32 ? 32 : kb) * 1024;
}

/* One region for all threads' stacks, a guard page below each. */
static void ensure_stacks(size_t n)
{
    if (g_stacks.count >= n)
        return;
    size_t page = (size_t)sysconf(_SC_PAGESIZE), each = stack_bytes() + page;
    size_t count = n < 256 ? 256 : 1024;
    if (g_stacks.base)
        munmap(g_stacks.base, g_stacks.each * g_stacks.count);
    void *p = mmap(NULL, each * count, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        fprintf(stderr, "qs-emu: cannot map %zu bytes of thread stacks\n", each * count);
        abort();
    }
    g_stacks.base = (char *)p, g_stacks.each = each, g_stacks.count = count;
    for (size_t i = 0; i < count; i++)
        mprotect(g_stacks.base + i * each, page, PROT_NONE);
    g_fibers.assign(count, fiber());
#if !defined(__x86_64__)
    g_ucs.assign(count, ucontext_t());
#endif
    for (size_t i = 0; i < count; i++) {
        g_fibers[i].lo = g_stacks.base + i * each + page;
        g_fibers[i].hi = g_stacks.base + (i + 1) * each;
    }
}

static void fiber_main(void *arg);

std::vector<fiber> &fibers()
{
    return g_fibers;
}

#if !defined(__x86_64__)
static void fiber_main_uc(unsigned hi, unsigned lo)
{
    fiber_main((void *)(((uintptr_t)hi << 32) | lo));
}
#endif

/* A fresh stack whose first switch-in calls fiber_main(f). */
static void fiber_prepare(fiber *f, const launch_desc &d)
{
#ifdef QS_EMU_ASAN
    __asan_unpoison_memory_region(f->lo, (size_t)(f->hi - f->lo));
#endif
    uintptr_t top = (uintptr_t)f->hi;
    top = (top - d.args_size) & ~(uintptr_t)(d.args_align > 64 ? d.args_align - 1 : 63);
    f->args = (char *)top;
    d.copy(f->args, d.args);
#if defined(__x86_64__)
    uintptr_t a = (top - 64) & ~(uintptr_t)15; /* rsp after the first ret */
    uint64_t *s = (uint64_t *)(a - 64);
    unsigned mxcsr;
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
    s[0] = (uint64_t)mxcsr | ((uint64_t)0x037f << 32); /* mxcsr, x87 control word */
    s[1] = 0;                                          /* r15 */
    s[2] = 0;                                          /* r14 */
    s[3] = (uint64_t)(uintptr_t)f;                     /* r13: the argument */
    s[4] = (uint64_t)(uintptr_t)&fiber_main;           /* r12: the entry */
    s[5] = 0;                                          /* rbx */
    s[6] = 0;                                          /* rbp: ends frame-pointer walks */
    s[7] = (uint64_t)(uintptr_t)&qs_emu_fiber_start;
    f->sp = s;
#else
    ucontext_t *uc = &g_ucs[f - g_fibers.data()];
    getcontext(uc);
    uc->uc_stack.ss_sp = f->lo;
    uc->uc_stack.ss_size = (size_t)((char *)top - 256 - f->lo);
    uc->uc_link = NULL;
    makecontext(uc, (void (*)())fiber_main_uc, 2, (unsigned)((uintptr_t)f >> 32),
                (unsigned)(uintptr_t)f);
    f->sp = uc;
#endif
}

static void switch_in(fiber *f)
{
    g_cur = f;
    g_thread_idx = f->idx;
    g_lane = f->tid % 32, g_warp = f->tid / 32;
    check_set_thread(f);
    g_in_kernel = 1;
#ifdef QS_EMU_ASAN
    void *fake = NULL;
    __sanitizer_start_switch_fiber(&fake, f->lo, (size_t)(f->hi - f->lo));
#endif
#if defined(__x86_64__)
    qs_emu_fiber_swap(&g_sched_sp, f->sp);
#else
    swapcontext(&g_sched_uc, (ucontext_t *)f->sp);
#endif
#ifdef QS_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, NULL, NULL);
#endif
    g_in_kernel = 0;
    g_cur = NULL;
}

/* Back to the scheduler; returns when the scheduler switches in again
 * (never when the thread is done or the block aborted). */
static void switch_out(fiber *f, bool final)
{
#ifdef QS_EMU_ASAN
    __sanitizer_start_switch_fiber(final ? NULL : &f->asan_fake, g_sched_stack_lo,
                                   g_sched_stack_size);
#else
    (void) final;
#endif
#if defined(__x86_64__)
    qs_emu_fiber_swap(&f->sp, g_sched_sp);
#else
    swapcontext((ucontext_t *)f->sp, &g_sched_uc);
#endif
#ifdef QS_EMU_ASAN
    __sanitizer_finish_switch_fiber(f->asan_fake, &g_sched_stack_lo, &g_sched_stack_size);
#endif
}

static void fiber_main(void *arg)
{
    fiber *f = (fiber *)arg;
#ifdef QS_EMU_ASAN
    __sanitizer_finish_switch_fiber(NULL, &g_sched_stack_lo, &g_sched_stack_size);
#endif
    g_block->d->invoke(f->args);
    f->state = F_DONE;
    switch_out(f, true);
    abort(); /* never switched in again */
}

/* ---- Reports that end the block ------------------------------------------------- */
void fatal(qs_emu_kind kind, cudaError_t err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(kind, fmt, ap);
    va_end(ap);
    if (!g_block || !g_cur) {
        fprintf(stderr, "qs-emu: fatal device error outside a kernel\n");
        abort();
    }
    /* A refused launch is an ordinary error; a fault poisons the context. */
    if (kind != QS_EMU_LAUNCH)
        set_sticky(err);
    g_block->aborted = true, g_block->err = err;
    fiber *f = g_cur;
    f->state = F_DONE;
    switch_out(f, true);
    abort();
}

void trap(const char *why, const char *file, int line)
{
    fatal(QS_EMU_TRAP, cudaErrorLaunchFailure, "%s at %s:%d", why, file, line);
}

/* The same from the scheduler's side (barriers and collectives complete
 * there): the block is marked aborted and the scheduler stops it. */
static void block_fail(block_run *b, fiber *who, qs_emu_kind kind, cudaError_t err, const char *fmt,
                       ...) __attribute__((format(printf, 5, 6)));
static void block_fail(block_run *b, fiber *who, qs_emu_kind kind, cudaError_t err, const char *fmt,
                       ...)
{
    va_list ap;
    va_start(ap, fmt);
    g_cur = who;
    vreport(kind, fmt, ap);
    g_cur = NULL;
    va_end(ap);
    if (kind != QS_EMU_LAUNCH)
        set_sticky(err);
    b->aborted = true, b->err = err;
}

/* ---- Barriers -------------------------------------------------------------------- */
static int barrier_wait(int pred, const char *file, int line)
{
    fiber *f = g_cur;
    if (!f)
        trap("__syncthreads() called outside a kernel", file, line);
    f->state = F_BARRIER, f->file = file, f->line = line, f->pred = pred;
    switch_out(f, false);
    return f->result;
}

void syncthreads(const char *file, int line)
{
    barrier_wait(0, file, line);
}

int syncthreads_count(int pred, const char *file, int line)
{
    return barrier_wait(pred, file, line);
}

static std::string thread_name(const fiber &f)
{
    char b[64];
    snprintf(b, sizeof b, "(%u,%u,%u)", f.idx.x, f.idx.y, f.idx.z);
    return b;
}

/* Every live thread waits at a barrier: the same one, or the block is wrong. */
static void complete_barrier(block_run *b)
{
    fiber *first = NULL;
    int count = 0;
    for (unsigned t = 0; t < b->nthreads; t++) {
        fiber &f = g_fibers[t];
        if (f.state != F_BARRIER)
            continue;
        if (!first)
            first = &f;
        else if (f.line != first->line || strcmp(f.file, first->file)) {
            block_fail(b, &f, QS_EMU_DIVERGENT_BARRIER, cudaErrorLaunchFailure,
                       "divergent __syncthreads: thread %s waits at %s:%d, thread %s at %s:%d",
                       thread_name(*first).c_str(), first->file, first->line,
                       thread_name(f).c_str(), f.file, f.line);
            return;
        }
        count += f.pred;
    }
    for (unsigned t = 0; t < b->nthreads; t++)
        if (g_fibers[t].state == F_BARRIER)
            g_fibers[t].state = F_READY, g_fibers[t].result = count;
    b->at_barrier = 0;
    b->barriers++;
    check_barrier();
}

/* ---- Warp collectives --------------------------------------------------------------- */
static const char *warp_kind_name(int k)
{
    static const char *n[] = {"__syncwarp",      "a shuffle",        "a vote",   "__match_*_sync",
                              "__reduce_*_sync", "a WMMA operation", "mma.sync", "ldmatrix"};
    return k >= 0 && k < W_NKINDS ? n[k] : "?";
}

unsigned active_mask()
{
    return g_block->warp_alive[g_warp];
}

unsigned warp_collective(int kind, unsigned mask, const void *in, void *out, size_t bytes,
                         const char *file, int line)
{
    fiber *f = g_cur;
    if (!f)
        trap("a warp collective called outside a kernel", file, line);
    if (!(mask >> g_lane & 1u))
        fatal(QS_EMU_DIVERGENT_WARP, cudaErrorLaunchFailure,
              "lane %u calls %s at %s:%d with mask 0x%08x, which does not name it", g_lane,
              warp_kind_name(kind), file, line, mask);
    f->state = F_WARP, f->file = file, f->line = line, f->wkind = kind, f->wmask = mask;
    f->win = in, f->wout = out, f->wbytes = bytes;
    switch_out(f, false);
    return f->wgot;
}

/* Completes every collective of the warp whose lanes have all arrived:
 * the lanes of its mask that exist and have not exited (the CUDA rule). */
static void try_complete_warp(block_run *b, unsigned warp)
{
    uint32_t pending = b->warp_waiting[warp];
    while (pending) {
        unsigned l0 = (unsigned)__builtin_ctz(pending);
        fiber &a = g_fibers[warp * 32 + l0];
        unsigned S = a.wmask & b->warp_alive[warp];
        pending &= ~S & ~(1u << l0);
        if ((b->warp_waiting[warp] & S) != S)
            continue; /* someone in the mask is still on its way */
        for (unsigned l = 0; l < 32; l++) {
            if (!(S >> l & 1u))
                continue;
            fiber &o = g_fibers[warp * 32 + l];
            bool same = o.wkind == a.wkind && o.wmask == a.wmask && o.wbytes == a.wbytes &&
                        (a.wkind == W_SYNCWARP || (o.line == a.line && !strcmp(o.file, a.file)));
            if (!same) {
                block_fail(b, &o, QS_EMU_DIVERGENT_WARP, cudaErrorLaunchFailure,
                           "lanes of warp %u meet at different collectives: lane %u at %s (mask "
                           "0x%08x) %s:%d, lane %u at %s (mask 0x%08x) %s:%d",
                           warp, l0, warp_kind_name(a.wkind), a.wmask, a.file, a.line, l,
                           warp_kind_name(o.wkind), o.wmask, o.file, o.line);
                return;
            }
        }
        for (unsigned l = 0; l < 32; l++) {
            if (!(S >> l & 1u))
                continue;
            fiber &o = g_fibers[warp * 32 + l];
            if (!o.wout && o.wbytes && l == (unsigned)__builtin_ctz(S)) {
                /* warp_gather: one copy of the slots for the whole warp. */
                std::vector<char> &g = b->gather[warp];
                g.resize(32 * o.wbytes);
                b->gather_serial[warp]++;
                for (unsigned s = 0; s < 32; s++) {
                    if (S >> s & 1u)
                        memcpy(g.data() + s * o.wbytes, g_fibers[warp * 32 + s].win, o.wbytes);
                    else
                        memset(g.data() + s * o.wbytes, 0, o.wbytes);
                }
            } else if (o.wout && o.wbytes) {
                char *dst = (char *)o.wout;
                for (unsigned s = 0; s < 32; s++) {
                    if (S >> s & 1u)
                        memcpy(dst + s * o.wbytes, g_fibers[warp * 32 + s].win, o.wbytes);
                    else
                        memset(dst + s * o.wbytes, 0, o.wbytes);
                }
            }
            o.state = F_READY, o.wgot = S;
        }
        b->warp_waiting[warp] &= ~S;
        check_warp_sync(warp, S);
    }
}

const void *warp_gather(int kind, unsigned mask, const void *in, size_t bytes, const char *file,
                        int line, unsigned *got)
{
    unsigned g = warp_collective(kind, mask, in, NULL, bytes, file, line);
    if (got)
        *got = g;
    return g_block->gather[g_warp].data();
}

void check_warp_uniform(const void *value, size_t bytes, const char *what, const char *file,
                        int line)
{
    unsigned got = 0;
    const unsigned char *all =
        (const unsigned char *)warp_gather(W_WMMA, 0xffffffffu, value, bytes, file, line, &got);
    if (got != 0xffffffffu)
        fatal(QS_EMU_WARP_ARGS, cudaErrorLaunchFailure,
              "%s at %s:%d needs all 32 lanes of the warp; lanes 0x%08x took part", what, file,
              line, got);
    /* One lane's comparison serves the warp (they all see the same slots). */
    static uint64_t checked[32];
    static uint32_t checked_block[32];
    if (checked[g_warp] == g_block->gather_serial[g_warp] &&
        checked_block[g_warp] == g_block->serial)
        return;
    checked[g_warp] = g_block->gather_serial[g_warp], checked_block[g_warp] = g_block->serial;
    for (unsigned l = 0; l < 32; l++)
        if (memcmp(all + l * bytes, all, bytes))
            fatal(QS_EMU_WARP_ARGS, cudaErrorLaunchFailure,
                  "%s at %s:%d: lane %u passes a different pointer or stride than lane 0 (they "
                  "must be the same on all lanes)",
                  what, file, line, l);
}

/* ---- cp.async: the copies each thread has in flight ----------------------------------- */
void cp_async_issue(void *dst, const void *src, unsigned src_bytes)
{
    fiber *f = g_cur;
    if (!f)
        trap("cp.async issued outside a kernel", __FILE__, __LINE__);
    f->async.push_back(async_copy{dst, src, src_bytes, f->async_groups});
}

void cp_async_commit()
{
    if (g_cur)
        g_cur->async_groups++;
}

bool cp_async_complete(unsigned keep, void **dst, const void **src, unsigned *src_bytes)
{
    fiber *f = g_cur;
    if (!f || f->async_head == f->async.size())
        return false;
    const async_copy &c = f->async[f->async_head];
    /* Its group is pending among the `keep` most recent, or not committed. */
    if (c.group + keep >= f->async_groups)
        return false;
    *dst = c.dst, *src = c.src, *src_bytes = c.src_bytes;
    if (++f->async_head == f->async.size())
        f->async.clear(), f->async_head = 0;
    return true;
}

/* ---- Shared memory -------------------------------------------------------------------- */
void *dyn_smem(size_t align)
{
    (void)align; /* the arena is 1 KiB aligned */
    return g_smem;
}

void *static_smem(const void *tag, size_t bytes, size_t align, const char *name, const char *file,
                  int line)
{
    block_run *b = g_block;
    if (!b)
        trap("QS_SHARED used outside a kernel", file, line);
    for (const static_alloc &s : b->statics)
        if (s.tag == tag)
            return g_smem + s.off;
    if (align < 16)
        align = 16;
    uint32_t off = (uint32_t)((b->static_cursor + align - 1) & ~(align - 1));
    size_t total = b->static_total + bytes;
    const cudaDeviceProp &p = props();
    if (total > p.sharedMemPerBlock)
        fatal(QS_EMU_LAUNCH, cudaErrorInvalidValue,
              "static shared memory of %zu bytes ('%s' at %s:%d brings it there) is over the "
              "%zu bytes a kernel may declare",
              total, name, file, line, (size_t)p.sharedMemPerBlock);
    size_t limit = b->k->max_dyn >= 0 ? (size_t)b->k->max_dyn + total : p.sharedMemPerBlock;
    if (limit > p.sharedMemPerBlockOptin)
        limit = p.sharedMemPerBlockOptin;
    if (total + b->dyn_bytes > limit)
        fatal(QS_EMU_LAUNCH, cudaErrorInvalidValue,
              "too much shared memory: %zu bytes static (with '%s' at %s:%d) + %zu dynamic is "
              "over the %zu bytes this launch may use (cudaFuncSetAttribute with "
              "cudaFuncAttributeMaxDynamicSharedMemorySize raises it up to %zu)",
              total, name, file, line, b->dyn_bytes, limit, (size_t)p.sharedMemPerBlockOptin);
    if (off + bytes + SMEM_REDZONE > SMEM_CAPACITY)
        fatal(QS_EMU_LAUNCH, cudaErrorInvalidValue, "shared memory arena exhausted by '%s'", name);
    b->statics.push_back(static_alloc{tag, off, (uint32_t)bytes, name, file, line});
    b->static_cursor = off + (uint32_t)bytes + SMEM_REDZONE;
    b->static_total = (uint32_t)total;
    check_define_static(off, (uint32_t)bytes);
    return g_smem + off;
}

/* ---- Kernels --------------------------------------------------------------------------- */
static std::map<const void *, std::unique_ptr<kernel_info>> g_kernels;

kernel_info *kernel_for(const void *fn, const char *name)
{
    auto it = g_kernels.find(fn);
    if (it != g_kernels.end()) {
        if (name && it->second->name.empty())
            it->second->name = name;
        return it->second.get();
    }
    kernel_info *k = new kernel_info();
    k->fn = fn, k->name = name ? name : "", k->max_dyn = -1;
    g_kernels[fn].reset(k);
    return k;
}

std::vector<kernel_info *> all_kernels()
{
    std::vector<kernel_info *> v;
    for (auto &kv : g_kernels)
        v.push_back(kv.second.get());
    return v;
}

static cudaError_t refuse(cudaError_t e, const launch_desc &d, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static cudaError_t refuse(cudaError_t e, const launch_desc &d, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    report(QS_EMU_LAUNCH, d.file, d.line, "launch of %s refused (%s): %s", d.name,
           cudaGetErrorName(e), msg);
    set_last_error(e);
    return e;
}

static cudaError_t check_config(const launch_desc &d, kernel_info *k)
{
    const cudaDeviceProp &p = props();
    const dim3 &g = d.grid, &bl = d.block;
    unsigned long long th = (unsigned long long)bl.x * bl.y * bl.z;
    if (!bl.x || !bl.y || !bl.z || bl.x > (unsigned)p.maxThreadsDim[0] ||
        bl.y > (unsigned)p.maxThreadsDim[1] || bl.z > (unsigned)p.maxThreadsDim[2] ||
        th > (unsigned long long)p.maxThreadsPerBlock)
        return refuse(cudaErrorInvalidConfiguration, d,
                      "block (%u,%u,%u) = %llu threads; at most %d per block, (%d,%d,%d) per "
                      "dimension",
                      bl.x, bl.y, bl.z, th, p.maxThreadsPerBlock, p.maxThreadsDim[0],
                      p.maxThreadsDim[1], p.maxThreadsDim[2]);
    if (!g.x || !g.y || !g.z || g.x > (unsigned)p.maxGridSize[0] ||
        g.y > (unsigned)p.maxGridSize[1] || g.z > (unsigned)p.maxGridSize[2])
        return refuse(cudaErrorInvalidConfiguration, d, "grid (%u,%u,%u); at most (%d,%d,%d)", g.x,
                      g.y, g.z, p.maxGridSize[0], p.maxGridSize[1], p.maxGridSize[2]);
    size_t stat = k->static_known ? k->static_bytes : 0;
    size_t dyn_limit = k->max_dyn >= 0 ? (size_t)k->max_dyn : p.sharedMemPerBlock - stat;
    if (d.smem > dyn_limit)
        return refuse(cudaErrorInvalidValue, d,
                      "%zu bytes of dynamic shared memory; this kernel may have %zu (%s)", d.smem,
                      dyn_limit,
                      k->max_dyn >= 0 ? "as cudaFuncSetAttribute set"
                                      : "48 KiB less its static shared memory unless "
                                        "cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicShared"
                                        "MemorySize) raises it");
    if (stat + d.smem > p.sharedMemPerBlockOptin)
        return refuse(cudaErrorInvalidValue, d,
                      "%zu bytes static + %zu dynamic shared memory is over the device's %zu", stat,
                      d.smem, (size_t)p.sharedMemPerBlockOptin);
    if (d.args_size > 32764)
        return refuse(cudaErrorInvalidValue, d, "%zu bytes of kernel arguments (at most 32764)",
                      d.args_size);
    return cudaSuccess;
}

static uint32_t g_block_serial;

static void diagnose_deadlock(block_run *b)
{
    std::string what;
    for (unsigned t = 0; t < b->nthreads && what.size() < 1500; t++) {
        const fiber &f = g_fibers[t];
        if (f.state == F_DONE)
            continue;
        char line[256];
        if (f.state == F_BARRIER)
            snprintf(line, sizeof line, "\n    thread %s waits at __syncthreads %s:%d",
                     thread_name(f).c_str(), f.file, f.line);
        else
            snprintf(line, sizeof line, "\n    thread %s (lane %u) waits at %s %s:%d, mask 0x%08x",
                     thread_name(f).c_str(), f.tid % 32, warp_kind_name(f.wkind), f.file, f.line,
                     f.wmask);
        what += line;
    }
    fiber *who = NULL;
    for (unsigned t = 0; t < b->nthreads && !who; t++)
        if (g_fibers[t].state != F_DONE)
            who = &g_fibers[t];
    block_fail(b, who, QS_EMU_DEADLOCK, cudaErrorLaunchFailure,
               "no thread of the block can go on:%s", what.c_str());
}

/* Runs one block to its end; false if it aborted. */
static bool run_block(block_run *b, uint3 bid)
{
    const launch_desc &d = *b->d;
    g_block_idx = bid;
    b->serial = ++g_block_serial;
    b->alive = b->nthreads, b->at_barrier = 0, b->barriers = 0, b->aborted = false;
    b->err = cudaSuccess;
    for (unsigned w = 0; w < 32; w++) {
        unsigned lanes = w * 32 >= b->nthreads ? 0 : b->nthreads - w * 32;
        b->warp_waiting[w] = 0;
        b->warp_alive[w] = lanes >= 32 ? 0xffffffffu : (1u << lanes) - 1;
    }
    b->statics.clear();
    b->static_cursor = (uint32_t)((d.smem + SMEM_REDZONE + 1023) & ~(size_t)1023);
    b->static_total = 0;
    b->dyn_bytes = d.smem;
    check_begin_block(d.smem);
    for (unsigned t = 0; t < b->nthreads; t++) {
        fiber &f = g_fibers[t];
        f.tid = t;
        f.idx = uint3{t % d.block.x, (t / d.block.x) % d.block.y, t / (d.block.x * d.block.y)};
        f.state = F_READY, f.asan_fake = NULL, f.log.clear();
        f.async.clear(), f.async_head = 0, f.async_groups = 0;
        fiber_prepare(&f, d);
    }
    for (;;) {
        bool ran = false;
        for (unsigned t = 0; t < b->nthreads; t++) {
            fiber &f = g_fibers[t];
            if (f.state != F_READY)
                continue;
            ran = true;
            switch_in(&f);
            if (b->aborted)
                return false;
            if (f.state == F_BARRIER) {
                /* A barrier waits for every thread of the block. */
                if (b->alive < b->nthreads) {
                    block_fail(b, &f, QS_EMU_DIVERGENT_BARRIER, cudaErrorLaunchFailure,
                               "thread %s waits at __syncthreads %s:%d, which %u thread(s) of "
                               "its block exited without reaching (a barrier in code not all "
                               "threads reach)",
                               thread_name(f).c_str(), f.file, f.line, b->nthreads - b->alive);
                    return false;
                }
                if (++b->at_barrier == b->nthreads) {
                    check_end_interval();
                    complete_barrier(b);
                }
            } else if (f.state == F_WARP) {
                b->warp_waiting[f.tid / 32] |= 1u << (f.tid % 32);
                try_complete_warp(b, f.tid / 32);
            } else if (f.state == F_DONE) {
                b->alive--;
                b->warp_alive[f.tid / 32] &= ~(1u << (f.tid % 32));
                if (b->at_barrier) {
                    const fiber *w = NULL;
                    for (unsigned u = 0; u < b->nthreads && !w; u++)
                        if (g_fibers[u].state == F_BARRIER)
                            w = &g_fibers[u];
                    block_fail(b, &f, QS_EMU_DIVERGENT_BARRIER, cudaErrorLaunchFailure,
                               "thread %s exited while other threads of its block wait at "
                               "__syncthreads %s:%d (a barrier in code not all threads reach)",
                               thread_name(f).c_str(), w->file, w->line);
                    return false;
                }
                try_complete_warp(b, f.tid / 32);
            }
            if (b->aborted)
                return false;
        }
        if (!b->alive)
            break;
        if (!ran) {
            diagnose_deadlock(b);
            return false;
        }
    }
    check_end_interval();
    if (b->sample_banks)
        check_bank_block(b);
    if (!b->k->static_known || b->static_total > b->k->static_bytes)
        b->k->static_bytes = b->static_total;
    b->k->static_known = true;
    return true;
}

cudaError_t run_launch(const launch_desc &d)
{
    kernel_info *k = kernel_for(d.fn, d.name);
    cudaError_t e = check_config(d, k);
    if (e != cudaSuccess)
        return e;
    block_run b = {};
    b.d = &d, b.k = k;
    b.nthreads = d.block.x * d.block.y * d.block.z;
    ensure_stacks(b.nthreads);
    g_block_dim = d.block, g_grid_dim = d.grid;
    long sample = env_long("QS_EMU_BANK_BLOCKS", 1);
    long full = env_long("QS_EMU_CHECK_BLOCKS", 2);
    g_block = &b;
    uint64_t n = 0;
    bool ok = true;
    for (unsigned z = 0; z < d.grid.z && ok; z++)
        for (unsigned y = 0; y < d.grid.y && ok; y++)
            for (unsigned x = 0; x < d.grid.x && ok; x++, n++) {
                b.sample_banks = g_hooks && (long long)n < sample;
                b.full_checks = full < 0 || (long long)n < full;
                ok = run_block(&b, uint3{x, y, z});
            }
    g_block = NULL;
    return ok ? cudaSuccess : b.err;
}

long long clock64()
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

} /* namespace qs_emu */
