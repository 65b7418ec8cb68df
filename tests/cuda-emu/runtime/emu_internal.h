/* emu_internal.h: what the harness's runtime files share. None of these
 * files is compiled with the access instrumentation; only device code is. */
#ifndef QS_EMU_INTERNAL_H
#define QS_EMU_INTERNAL_H

#include <cuda_runtime.h>

#include <stdarg.h>

#include <stddef.h>
#include <stdint.h>

#include <mutex>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define QS_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define QS_EMU_ASAN 1
#endif
#endif

namespace qs_emu
{

/* ---- One device thread ---------------------------------------------------- */
enum fiber_state { F_READY, F_BARRIER, F_WARP, F_DONE };

struct access_rec { /* a shared access of a sampled block, for the bank model */
    const void *pc;
    uint32_t off;
    uint8_t size, write;
};

struct async_copy { /* a cp.async issued and not yet waited for */
    void *dst;
    const void *src;
    unsigned src_bytes;
    uint64_t group; /* the groups committed before it was issued */
};

struct fiber {
    void *sp; /* saved stack pointer while switched out */
    char *lo, *hi;
    void *asan_fake;
    unsigned tid; /* linear thread index in the block */
    uint3 idx;
    int state;
    /* What it waits at (F_BARRIER, F_WARP). */
    const char *file;
    int line;
    int pred, result;
    int wkind;
    unsigned wmask, wgot;
    const void *win;
    void *wout;
    size_t wbytes;
    char *args; /* the launch's argument tuple, on this stack */
    std::vector<access_rec> log;
    std::vector<async_copy> async; /* cp.async in flight, oldest first from async_head */
    size_t async_head;
    uint64_t async_groups; /* cp.async.commit_group count */
};

/* ---- The running launch and block --------------------------------------------- */
struct static_alloc {
    const void *tag;
    uint32_t off, bytes;
    const char *name, *file;
    int line;
};

struct kernel_info { /* per kernel function, across launches */
    const void *fn;
    std::string name;
    int max_dyn; /* cudaFuncAttributeMaxDynamicSharedMemorySize, -1 unset */
    size_t static_bytes;
    bool static_known;
    uint64_t bank_req[2], bank_wave[2], bank_ideal[2]; /* [load, store] */
};

struct block_run {
    const launch_desc *d;
    kernel_info *k;
    unsigned nthreads, alive, at_barrier, barriers;
    uint32_t serial; /* distinct for every block run by the process */
    bool aborted;
    cudaError_t err; /* why it aborted */
    bool sample_banks;
    bool
        full_checks; /* races, uninitialised reads: the first QS_EMU_CHECK_BLOCKS (2) of a launch */
    size_t dyn_bytes;
    uint32_t warp_waiting[32];    /* lanes at a warp collective, per warp */
    uint32_t warp_alive[32];      /* lanes that exist and have not exited */
    std::vector<char> gather[32]; /* warp_gather's slots, per warp */
    uint64_t gather_serial[32];   /* counts them, so lanes can share work on one */
    std::vector<static_alloc> statics;
    uint32_t static_cursor, static_total;
};

extern block_run *g_block; /* NULL outside a kernel */
extern fiber *g_cur;       /* the running device thread, NULL on the host */
extern std::recursive_mutex g_device_lock;

/* Where a report happened: the kernel, block and thread, as text. */
std::string where();
std::string symbolize(const void *pc);
/* A fatal device error: reported, then the launch ends (sticky error). */
[[noreturn]] void fatal(qs_emu_kind kind, cudaError_t err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void vreport(qs_emu_kind kind, const char *fmt, va_list ap);
void report_msg(qs_emu_kind kind, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
bool report_once(qs_emu_kind kind, const void *pc_a, const void *pc_b);

/* Sticky and last errors (runtime.cpp). */
void set_last_error(cudaError_t e);
void set_sticky(cudaError_t e);
cudaError_t sticky();

/* ---- Shared memory and its shadow (check.cpp) --------------------------------- */
enum { SMEM_CAPACITY = 288 * 1024, SMEM_REDZONE = 64 };
extern char *g_smem; /* the block's shared memory: SMEM_CAPACITY bytes */
void check_begin_block(size_t dyn_bytes);
void check_define_static(uint32_t off, uint32_t bytes);
void check_barrier();
void check_warp_sync(unsigned warp, unsigned mask);
void check_end_interval(); /* the bank model's groups end at barriers */
void check_set_thread(fiber *f);
void check_bank_block(block_run *b);
extern bool g_hooks; /* device code was compiled with the instrumentation */
/* Every access of device code, and of the runtime's atomics (atomic). */
void check_access(const void *p, size_t n, bool write, bool atomic, const void *pc);
extern volatile int g_in_kernel;

/* ---- Device memory (memory.cpp) ------------------------------------------------- */
enum { SH_NONE = 0, SH_ALLOC = 1, SH_INIT = 2 };
extern uintptr_t g_dev_base, g_dev_span;
extern uint8_t *g_dev_shadow;
bool dev_range(const void *p, size_t bytes, std::string *why); /* within one live allocation */
bool is_device_ptr(const void *p);
void dev_mark_init(const void *p, size_t bytes);
void dev_copy_shadow(void *dst, const void *src, size_t bytes);
std::string dev_describe(uintptr_t a, size_t bytes);
size_t dev_live_bytes();

/* ---- Devices (runtime.cpp) ------------------------------------------------------- */
const cudaDeviceProp &props();

/* ---- Streams: deferred work under graph capture (runtime.cpp) -------------------- */
/* Runs fn(blob) now, or records it into the graph being captured on s.
 * blob is copied (bytes) when recorded. Returns the error of the call or of
 * the recording. */
typedef cudaError_t (*host_op)(void *blob);
cudaError_t enqueue(cudaStream_t s, host_op fn, const void *blob, size_t bytes, const char *what);
bool stream_valid(cudaStream_t s);
bool capturing(cudaStream_t s);

/* ---- Launches (sched.cpp) -------------------------------------------------------- */
cudaError_t run_launch(const launch_desc &d);
std::vector<fiber> &fibers();
std::vector<kernel_info *> all_kernels();
kernel_info *kernel_for(const void *fn, const char *name);

/* Environment knobs. */
long env_long(const char *name, long def);

} /* namespace qs_emu */

#endif
