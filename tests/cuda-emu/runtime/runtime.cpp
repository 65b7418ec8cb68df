/* runtime.cpp: the CUDA runtime API of cuda_runtime_api.h on the harness.
 * The device is an H100 SXM by default (QS_EMU_GPU=a100|h100|h200 picks
 * the properties, QS_EMU_GPUS the count), so code that chooses by SM count
 * or shared memory takes the paths it takes there. Everything is
 * synchronous: a stream is an order, an event a host clock reading, and a
 * graph captured from a stream a list of the operations it recorded, run
 * in order at each launch. Errors follow the runtime's rules: a launch or
 * call error is returned and kept for cudaGetLastError; a device fault is
 * sticky, returned by every later call until qs_emu_reset() (on a GPU,
 * until the process ends). */
#include "emu_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <memory>
#include <set>

namespace qs_emu
{

static thread_local cudaError_t tl_last = cudaSuccess;
static cudaError_t g_sticky = cudaSuccess;
static thread_local int tl_device = 0;

void set_last_error(cudaError_t e)
{
    tl_last = e;
}

void set_sticky(cudaError_t e)
{
    g_sticky = e;
}

cudaError_t sticky()
{
    return g_sticky;
}

static cudaError_t fail(cudaError_t e)
{
    tl_last = e;
    return e;
}

/* Every call first answers a sticky fault, as the driver does. */
#define QS_EMU_STICKY()                                                                            \
    do {                                                                                           \
        if (g_sticky != cudaSuccess)                                                               \
            return fail(g_sticky);                                                                 \
    } while (0)

/* ---- Devices ------------------------------------------------------------------------------ */
static cudaDeviceProp make_props()
{
    cudaDeviceProp p;
    memset(&p, 0, sizeof p);
    const char *gpu = getenv("QS_EMU_GPU");
    bool a100 = gpu && !strcmp(gpu, "a100"), h200 = gpu && !strcmp(gpu, "h200");
    snprintf(p.name, sizeof p.name, "%s [cuda-emu]",
             a100   ? "NVIDIA A100-SXM4-80GB"
             : h200 ? "NVIDIA H200"
                    : "NVIDIA H100 80GB HBM3");
    p.totalGlobalMem = h200 ? (size_t)150095429632ull : (size_t)85029158912ull;
    p.sharedMemPerBlock = 48 * 1024;
    p.regsPerBlock = 65536;
    p.warpSize = 32;
    p.maxThreadsPerBlock = 1024;
    p.maxThreadsDim[0] = 1024, p.maxThreadsDim[1] = 1024, p.maxThreadsDim[2] = 64;
    p.maxGridSize[0] = 2147483647, p.maxGridSize[1] = 65535, p.maxGridSize[2] = 65535;
    p.totalConstMem = 65536;
    p.major = a100 ? 8 : 9, p.minor = 0;
    p.multiProcessorCount = a100 ? 108 : 132;
    p.l2CacheSize = a100 ? 40 * 1024 * 1024 : 50 * 1024 * 1024;
    p.maxThreadsPerMultiProcessor = 2048;
    p.sharedMemPerMultiprocessor = a100 ? 167936 : 233472;
    p.regsPerMultiprocessor = 65536;
    p.sharedMemPerBlockOptin = a100 ? 166912 : 232448;
    p.reservedSharedMemPerBlock = 1024;
    p.maxBlocksPerMultiProcessor = 32;
    p.memoryBusWidth = 5120;
    p.pciDomainID = 0, p.pciDeviceID = 0;
    return p;
}

const cudaDeviceProp &props()
{
    static cudaDeviceProp p = make_props();
    return p;
}

static int device_count()
{
    long n = env_long("QS_EMU_GPUS", 1);
    return n < 0 ? 0 : n > 64 ? 64 : (int)n;
}

/* ---- Streams and graphs ---------------------------------------------------------------------- */
struct node {
    host_op fn;
    std::shared_ptr<char> blob;
    std::string what;
};

} /* namespace qs_emu */

struct CUgraph_st {
    std::vector<qs_emu::node> nodes;
};
struct CUgraphExec_st {
    std::vector<qs_emu::node> nodes;
};
struct CUstream_st {
    unsigned flags;
    CUgraph_st *capture; /* recording into, or NULL */
    bool invalidated;
};
struct CUevent_st {
    double ms;
    bool recorded;
    unsigned flags;
};

namespace qs_emu
{

static std::set<cudaStream_t> g_streams;
static std::set<cudaEvent_t> g_events;
static std::set<cudaGraph_t> g_graphs;
static std::set<cudaGraphExec_t> g_execs;
static int g_capturing; /* streams capturing now */

static bool is_default(cudaStream_t s)
{
    return s == NULL || s == cudaStreamLegacy || s == cudaStreamPerThread;
}

bool stream_valid(cudaStream_t s)
{
    return is_default(s) || g_streams.count(s);
}

bool capturing(cudaStream_t s)
{
    return !is_default(s) && g_streams.count(s) && s->capture;
}

cudaError_t enqueue(cudaStream_t s, host_op fn, const void *blob, size_t bytes, const char *what)
{
    if (!stream_valid(s)) {
        report_msg(QS_EMU_API, "%s on stream %p, which does not exist (destroyed?)", what,
                   (void *)s);
        return fail(cudaErrorInvalidResourceHandle);
    }
    if (!capturing(s))
        return fn((void *)blob);
    void *mem = NULL;
    if (posix_memalign(&mem, 64, bytes ? bytes : 1))
        return fail(cudaErrorMemoryAllocation);
    memcpy(mem, blob, bytes);
    s->capture->nodes.push_back(node{fn, std::shared_ptr<char>((char *)mem, free), what});
    return cudaSuccess;
}

/* A kernel launch as a graph node: the descriptor, then its arguments. */
static cudaError_t kernel_op(void *blob)
{
    launch_desc *d = (launch_desc *)blob;
    d->args = (char *)blob + ((sizeof(launch_desc) + 63) & ~(size_t)63);
    cudaError_t e = run_launch(*d);
    if (e != cudaSuccess)
        tl_last = e;
    return e;
}

void launch(const launch_desc &d)
{
    std::lock_guard<std::recursive_mutex> lk(g_device_lock);
    if (g_sticky != cudaSuccess) {
        tl_last = g_sticky;
        return;
    }
    if (g_block) {
        report(QS_EMU_API, d.file, d.line,
               "kernel %s launched from device code (dynamic "
               "parallelism is not emulated)",
               d.name);
        tl_last = cudaErrorNotSupported;
        return;
    }
    if (capturing(d.stream)) {
        size_t off = (sizeof(launch_desc) + 63) & ~(size_t)63;
        std::vector<char> blob(off + d.args_size);
        memcpy(blob.data(), &d, sizeof d);
        d.copy(blob.data() + off, d.args);
        enqueue(d.stream, kernel_op, blob.data(), blob.size(), d.name);
        return;
    }
    if (!stream_valid(d.stream)) {
        report(QS_EMU_API, d.file, d.line, "kernel %s launched on stream %p, which does not exist",
               d.name, (void *)d.stream);
        tl_last = cudaErrorInvalidResourceHandle;
        return;
    }
    cudaError_t e = run_launch(d);
    if (e != cudaSuccess)
        tl_last = e;
}

static double now_ms()
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

/* ---- Copies
 * --------------------------------------------------------------------------------------- */
struct copy_args {
    void *dst;
    const void *src;
    size_t bytes;
    int kind; /* resolved: 0 H2H, 1 H2D, 2 D2H, 3 D2D; 5: a memset of value `value` */
    int value;
};

static cudaError_t copy_op(void *blob)
{
    copy_args *a = (copy_args *)blob;
    if (a->kind == 5) {
        memset(a->dst, a->value, a->bytes);
        dev_mark_init(a->dst, a->bytes);
        return cudaSuccess;
    }
    memmove(a->dst, a->src, a->bytes);
    if (a->kind == 1)
        dev_mark_init(a->dst, a->bytes);
    else if (a->kind == 3)
        dev_copy_shadow(a->dst, a->src, a->bytes);
    return cudaSuccess;
}

static cudaError_t check_copy(const char *what, void *dst, const void *src, size_t bytes,
                              cudaMemcpyKind kind, copy_args *out)
{
    bool dd = is_device_ptr(dst), sd = is_device_ptr(src);
    if (kind == cudaMemcpyDefault)
        kind = dd ? (sd ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                  : (sd ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
    if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDeviceToDevice) {
        report_msg(QS_EMU_API, "%s: copy kind %d is not a cudaMemcpyKind", what, (int)kind);
        return fail(cudaErrorInvalidMemcpyDirection);
    }
    bool want_dd = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    bool want_sd = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    static const char *kn[] = {"HostToHost", "HostToDevice", "DeviceToHost", "DeviceToDevice"};
    if (bytes && ((!dst || !src) || dd != want_dd || sd != want_sd)) {
        report_msg(QS_EMU_API,
                   "%s(%p, %p, %zu, cudaMemcpy%s): the %s is %s memory, the %s %s memory", what,
                   dst, src, bytes, kn[kind], "destination", dd ? "device" : "host", "source",
                   sd ? "device" : "host");
        return fail(cudaErrorInvalidValue);
    }
    std::string why;
    if (bytes && dd && !dev_range(dst, bytes, &why)) {
        report_msg(QS_EMU_API, "%s: destination %p: %s", what, dst, why.c_str());
        return fail(cudaErrorInvalidValue);
    }
    if (bytes && sd && !dev_range(src, bytes, &why)) {
        report_msg(QS_EMU_API, "%s: source %p: %s", what, src, why.c_str());
        return fail(cudaErrorInvalidValue);
    }
    *out = copy_args{dst, src, bytes, (int)kind, 0};
    return cudaSuccess;
}

static cudaError_t check_set(const char *what, void *p, int v, size_t bytes, copy_args *out)
{
    std::string why;
    if (bytes && !dev_range(p, bytes, &why)) {
        report_msg(QS_EMU_API, "%s(%p, %d, %zu): %s", what, p, v, bytes, why.c_str());
        return fail(cudaErrorInvalidValue);
    }
    *out = copy_args{p, NULL, bytes, 5, v};
    return cudaSuccess;
}

/* Synchronous copies in the middle of a (global-mode) capture are what
 * CUDA refuses, since the graph would not contain them. */
static cudaError_t no_capture(const char *what)
{
    if (g_capturing) {
        report_msg(QS_EMU_API,
                   "%s while a stream is being captured: use the Async form on the "
                   "capturing stream",
                   what);
        return fail(cudaErrorStreamCaptureUnsupported);
    }
    return cudaSuccess;
}

} /* namespace qs_emu */

using namespace qs_emu;

#define LOCK() std::lock_guard<std::recursive_mutex> lk_(g_device_lock)

/* ---- Errors and versions
 * ------------------------------------------------------------------------------ */
extern "C" const char *cudaGetErrorName(cudaError_t e)
{
    switch (e) {
#define N(x)                                                                                       \
    case x:                                                                                        \
        return #x
        N(cudaSuccess);
        N(cudaErrorInvalidValue);
        N(cudaErrorMemoryAllocation);
        N(cudaErrorInitializationError);
        N(cudaErrorInvalidConfiguration);
        N(cudaErrorInvalidSymbol);
        N(cudaErrorInvalidDevicePointer);
        N(cudaErrorInvalidMemcpyDirection);
        N(cudaErrorInsufficientDriver);
        N(cudaErrorInvalidDeviceFunction);
        N(cudaErrorNoDevice);
        N(cudaErrorInvalidDevice);
        N(cudaErrorInvalidResourceHandle);
        N(cudaErrorNotReady);
        N(cudaErrorIllegalAddress);
        N(cudaErrorLaunchOutOfResources);
        N(cudaErrorAssert);
        N(cudaErrorIllegalInstruction);
        N(cudaErrorMisalignedAddress);
        N(cudaErrorLaunchFailure);
        N(cudaErrorNotSupported);
        N(cudaErrorStreamCaptureUnsupported);
        N(cudaErrorStreamCaptureInvalidated);
        N(cudaErrorStreamCaptureUnmatched);
        N(cudaErrorUnknown);
#undef N
    }
    return "cudaErrorUnknown";
}

extern "C" const char *cudaGetErrorString(cudaError_t e)
{
    switch (e) {
    case cudaSuccess:
        return "no error";
    case cudaErrorInvalidValue:
        return "invalid argument";
    case cudaErrorMemoryAllocation:
        return "out of memory";
    case cudaErrorInvalidConfiguration:
        return "invalid configuration argument";
    case cudaErrorNoDevice:
        return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice:
        return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle:
        return "invalid resource handle";
    case cudaErrorIllegalAddress:
        return "an illegal memory access was encountered";
    case cudaErrorMisalignedAddress:
        return "misaligned address";
    case cudaErrorLaunchFailure:
        return "unspecified launch failure";
    case cudaErrorInvalidMemcpyDirection:
        return "invalid copy direction for memcpy";
    case cudaErrorStreamCaptureUnsupported:
        return "operation not permitted when stream is capturing";
    case cudaErrorNotSupported:
        return "operation not supported";
    default:
        return cudaGetErrorName(e);
    }
}

extern "C" cudaError_t cudaGetLastError(void)
{
    cudaError_t e = tl_last;
    tl_last = sticky();
    return e;
}

extern "C" cudaError_t cudaPeekAtLastError(void)
{
    return tl_last;
}

extern "C" cudaError_t cudaRuntimeGetVersion(int *v)
{
    if (!v)
        return fail(cudaErrorInvalidValue);
    *v = CUDART_VERSION;
    return cudaSuccess;
}

extern "C" cudaError_t cudaDriverGetVersion(int *v)
{
    return cudaRuntimeGetVersion(v);
}

/* ---- Devices
 * -------------------------------------------------------------------------------------------- */
extern "C" cudaError_t cudaGetDeviceCount(int *n)
{
    if (!n)
        return fail(cudaErrorInvalidValue);
    *n = device_count();
    return *n ? cudaSuccess : fail(cudaErrorNoDevice);
}

extern "C" cudaError_t cudaSetDevice(int d)
{
    if (d < 0 || d >= device_count())
        return fail(cudaErrorInvalidDevice);
    tl_device = d;
    return cudaSuccess;
}

extern "C" cudaError_t cudaGetDevice(int *d)
{
    if (!d)
        return fail(cudaErrorInvalidValue);
    if (!device_count())
        return fail(cudaErrorNoDevice);
    *d = tl_device;
    return cudaSuccess;
}

extern "C" cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int d)
{
    if (!p)
        return fail(cudaErrorInvalidValue);
    if (d < 0 || d >= device_count())
        return fail(cudaErrorInvalidDevice);
    *p = props();
    p->pciBusID = 0x18 + d;
    return cudaSuccess;
}

extern "C" cudaError_t cudaDeviceGetAttribute(int *v, enum cudaDeviceAttr a, int d)
{
    if (!v)
        return fail(cudaErrorInvalidValue);
    if (d < 0 || d >= device_count())
        return fail(cudaErrorInvalidDevice);
    const cudaDeviceProp &p = props();
    switch (a) {
    case cudaDevAttrMaxThreadsPerBlock:
        *v = p.maxThreadsPerBlock;
        break;
    case cudaDevAttrMaxBlockDimX:
    case cudaDevAttrMaxBlockDimY:
    case cudaDevAttrMaxBlockDimZ:
        *v = p.maxThreadsDim[a - cudaDevAttrMaxBlockDimX];
        break;
    case cudaDevAttrMaxGridDimX:
    case cudaDevAttrMaxGridDimY:
    case cudaDevAttrMaxGridDimZ:
        *v = p.maxGridSize[a - cudaDevAttrMaxGridDimX];
        break;
    case cudaDevAttrMaxSharedMemoryPerBlock:
        *v = (int)p.sharedMemPerBlock;
        break;
    case cudaDevAttrTotalConstantMemory:
        *v = (int)p.totalConstMem;
        break;
    case cudaDevAttrWarpSize:
        *v = 32;
        break;
    case cudaDevAttrMaxRegistersPerBlock:
        *v = p.regsPerBlock;
        break;
    case cudaDevAttrClockRate:
        *v = 1980000;
        break;
    case cudaDevAttrMultiProcessorCount:
        *v = p.multiProcessorCount;
        break;
    case cudaDevAttrMemoryClockRate:
        *v = 2619000;
        break;
    case cudaDevAttrGlobalMemoryBusWidth:
        *v = p.memoryBusWidth;
        break;
    case cudaDevAttrL2CacheSize:
        *v = p.l2CacheSize;
        break;
    case cudaDevAttrMaxThreadsPerMultiProcessor:
        *v = p.maxThreadsPerMultiProcessor;
        break;
    case cudaDevAttrComputeCapabilityMajor:
        *v = p.major;
        break;
    case cudaDevAttrComputeCapabilityMinor:
        *v = p.minor;
        break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
        *v = (int)p.sharedMemPerMultiprocessor;
        break;
    case cudaDevAttrMaxRegistersPerMultiprocessor:
        *v = p.regsPerMultiprocessor;
        break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
        *v = (int)p.sharedMemPerBlockOptin;
        break;
    case cudaDevAttrMaxBlocksPerMultiprocessor:
        *v = p.maxBlocksPerMultiProcessor;
        break;
    default:
        report_msg(QS_EMU_API, "cudaDeviceGetAttribute: attribute %d is not emulated", (int)a);
        return fail(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}

extern "C" cudaError_t cudaDeviceGetPCIBusId(char *id, int len, int d)
{
    if (!id || len < 13)
        return fail(cudaErrorInvalidValue);
    if (d < 0 || d >= device_count())
        return fail(cudaErrorInvalidDevice);
    snprintf(id, (size_t)len, "0000:%02x:00.0", 0x18 + d);
    return cudaSuccess;
}

extern "C" cudaError_t cudaDeviceSynchronize(void)
{
    LOCK();
    QS_EMU_STICKY();
    return cudaSuccess;
}

extern "C" cudaError_t cudaDeviceReset(void)
{
    LOCK();
    set_sticky(cudaSuccess);
    tl_last = cudaSuccess;
    return cudaSuccess;
}

extern "C" cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes)
{
    LOCK();
    QS_EMU_STICKY();
    if (!free_bytes || !total_bytes)
        return fail(cudaErrorInvalidValue);
    size_t total = props().totalGlobalMem, used = dev_live_bytes() + ((size_t)512 << 20);
    *total_bytes = total;
    *free_bytes = used < total ? total - used : 0;
    return cudaSuccess;
}

/* ---- Copies
 * ------------------------------------------------------------------------------------------------
 */
extern "C" cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes,
                                  enum cudaMemcpyKind kind)
{
    LOCK();
    QS_EMU_STICKY();
    copy_args a;
    cudaError_t e = no_capture("cudaMemcpy");
    if (e == cudaSuccess)
        e = check_copy("cudaMemcpy", dst, src, bytes, kind, &a);
    return e == cudaSuccess ? copy_op(&a) : e;
}

extern "C" cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes,
                                       enum cudaMemcpyKind kind, cudaStream_t s)
{
    LOCK();
    QS_EMU_STICKY();
    copy_args a;
    cudaError_t e = check_copy("cudaMemcpyAsync", dst, src, bytes, kind, &a);
    return e == cudaSuccess ? enqueue(s, copy_op, &a, sizeof a, "cudaMemcpyAsync") : e;
}

extern "C" cudaError_t cudaMemset(void *p, int v, size_t bytes)
{
    LOCK();
    QS_EMU_STICKY();
    copy_args a;
    cudaError_t e = no_capture("cudaMemset");
    if (e == cudaSuccess)
        e = check_set("cudaMemset", p, v, bytes, &a);
    return e == cudaSuccess ? copy_op(&a) : e;
}

extern "C" cudaError_t cudaMemsetAsync(void *p, int v, size_t bytes, cudaStream_t s)
{
    LOCK();
    QS_EMU_STICKY();
    copy_args a;
    cudaError_t e = check_set("cudaMemsetAsync", p, v, bytes, &a);
    return e == cudaSuccess ? enqueue(s, copy_op, &a, sizeof a, "cudaMemsetAsync") : e;
}

extern "C" cudaError_t cudaMemcpyToSymbol_emu(const void *symbol, const void *src, size_t bytes,
                                              size_t offset)
{
    LOCK();
    QS_EMU_STICKY();
    if (!symbol || !src)
        return fail(cudaErrorInvalidSymbol);
    memcpy((char *)symbol + offset, src, bytes);
    return cudaSuccess;
}

/* ---- Streams, events, graphs
 * ------------------------------------------------------------------------------- */
extern "C" cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags)
{
    LOCK();
    if (!s)
        return fail(cudaErrorInvalidValue);
    *s = new CUstream_st{flags, NULL, false};
    g_streams.insert(*s);
    return cudaSuccess;
}

extern "C" cudaError_t cudaStreamCreate(cudaStream_t *s)
{
    return cudaStreamCreateWithFlags(s, cudaStreamDefault);
}

extern "C" cudaError_t cudaStreamDestroy(cudaStream_t s)
{
    LOCK();
    if (is_default(s) || !g_streams.erase(s)) {
        report_msg(QS_EMU_API, "cudaStreamDestroy(%p): not a stream that exists", (void *)s);
        return fail(cudaErrorInvalidResourceHandle);
    }
    if (s->capture) {
        delete s->capture;
        g_capturing--;
    }
    delete s;
    return cudaSuccess;
}

extern "C" cudaError_t cudaStreamSynchronize(cudaStream_t s)
{
    LOCK();
    QS_EMU_STICKY();
    if (!stream_valid(s))
        return fail(cudaErrorInvalidResourceHandle);
    if (capturing(s))
        return fail(cudaErrorStreamCaptureUnsupported);
    return cudaSuccess;
}

extern "C" cudaError_t cudaStreamQuery(cudaStream_t s)
{
    return cudaStreamSynchronize(s);
}

extern "C" cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags)
{
    LOCK();
    (void)flags;
    if (!stream_valid(s) || !g_events.count(e))
        return fail(cudaErrorInvalidResourceHandle);
    return cudaSuccess; /* everything before it has run */
}

struct host_fn_args {
    cudaHostFn_t fn;
    void *data;
};
static cudaError_t host_fn_op(void *blob)
{
    host_fn_args *a = (host_fn_args *)blob;
    a->fn(a->data);
    return cudaSuccess;
}

extern "C" cudaError_t cudaLaunchHostFunc(cudaStream_t s, cudaHostFn_t fn, void *data)
{
    LOCK();
    QS_EMU_STICKY();
    if (!fn)
        return fail(cudaErrorInvalidValue);
    host_fn_args a = {fn, data};
    return enqueue(s, host_fn_op, &a, sizeof a, "cudaLaunchHostFunc");
}

extern "C" cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags)
{
    LOCK();
    if (!e)
        return fail(cudaErrorInvalidValue);
    *e = new CUevent_st{0, false, flags};
    g_events.insert(*e);
    return cudaSuccess;
}

extern "C" cudaError_t cudaEventCreate(cudaEvent_t *e)
{
    return cudaEventCreateWithFlags(e, cudaEventDefault);
}

extern "C" cudaError_t cudaEventDestroy(cudaEvent_t e)
{
    LOCK();
    if (!g_events.erase(e))
        return fail(cudaErrorInvalidResourceHandle);
    delete e;
    return cudaSuccess;
}

static cudaError_t event_op(void *blob)
{
    cudaEvent_t e = *(cudaEvent_t *)blob;
    e->ms = now_ms();
    e->recorded = true;
    return cudaSuccess;
}

extern "C" cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s)
{
    LOCK();
    QS_EMU_STICKY();
    if (!g_events.count(e))
        return fail(cudaErrorInvalidResourceHandle);
    return enqueue(s, event_op, &e, sizeof e, "cudaEventRecord");
}

extern "C" cudaError_t cudaEventSynchronize(cudaEvent_t e)
{
    LOCK();
    QS_EMU_STICKY();
    return g_events.count(e) ? cudaSuccess : fail(cudaErrorInvalidResourceHandle);
}

extern "C" cudaError_t cudaEventQuery(cudaEvent_t e)
{
    return cudaEventSynchronize(e);
}

/* Host time between the two records: a real number, but of the emulator,
 * never of a GPU (docs/cuda-emu.md). */
extern "C" cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b)
{
    LOCK();
    if (!ms || !g_events.count(a) || !g_events.count(b))
        return fail(cudaErrorInvalidResourceHandle);
    if (!a->recorded || !b->recorded)
        return fail(cudaErrorInvalidResourceHandle);
    *ms = (float)(b->ms - a->ms);
    return cudaSuccess;
}

extern "C" cudaError_t cudaStreamBeginCapture(cudaStream_t s, enum cudaStreamCaptureMode mode)
{
    LOCK();
    QS_EMU_STICKY();
    (void)mode;
    if (is_default(s)) {
        report_msg(QS_EMU_API, "cudaStreamBeginCapture on the default stream (CUDA refuses it)");
        return fail(cudaErrorStreamCaptureUnsupported);
    }
    if (!g_streams.count(s))
        return fail(cudaErrorInvalidResourceHandle);
    if (s->capture)
        return fail(cudaErrorIllegalInstruction);
    s->capture = new CUgraph_st();
    g_capturing++;
    return cudaSuccess;
}

extern "C" cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *g)
{
    LOCK();
    if (!g)
        return fail(cudaErrorInvalidValue);
    if (!g_streams.count(s) || !s->capture)
        return fail(cudaErrorStreamCaptureUnmatched);
    *g = s->capture;
    g_graphs.insert(*g);
    s->capture = NULL;
    g_capturing--;
    return g_sticky != cudaSuccess ? fail(g_sticky) : cudaSuccess;
}

extern "C" cudaError_t cudaStreamIsCapturing(cudaStream_t s, enum cudaStreamCaptureStatus *st)
{
    LOCK();
    if (!st || !stream_valid(s))
        return fail(cudaErrorInvalidValue);
    *st = capturing(s) ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
    return cudaSuccess;
}

extern "C" cudaError_t cudaGraphInstantiate(cudaGraphExec_t *x, cudaGraph_t g,
                                            unsigned long long flags)
{
    LOCK();
    (void)flags;
    if (!x || !g_graphs.count(g))
        return fail(cudaErrorInvalidValue);
    *x = new CUgraphExec_st{g->nodes};
    g_execs.insert(*x);
    return cudaSuccess;
}

extern "C" cudaError_t cudaGraphLaunch(cudaGraphExec_t x, cudaStream_t s)
{
    LOCK();
    QS_EMU_STICKY();
    if (!g_execs.count(x) || !stream_valid(s))
        return fail(cudaErrorInvalidResourceHandle);
    if (capturing(s)) {
        report_msg(QS_EMU_API, "cudaGraphLaunch into a capturing stream is not emulated");
        return fail(cudaErrorNotSupported);
    }
    for (node &n : x->nodes) {
        cudaError_t e = n.fn(n.blob.get());
        if (e != cudaSuccess)
            return fail(e);
    }
    return cudaSuccess;
}

extern "C" cudaError_t cudaGraphExecDestroy(cudaGraphExec_t x)
{
    LOCK();
    if (!g_execs.erase(x))
        return fail(cudaErrorInvalidResourceHandle);
    delete x;
    return cudaSuccess;
}

extern "C" cudaError_t cudaGraphDestroy(cudaGraph_t g)
{
    LOCK();
    if (!g_graphs.erase(g))
        return fail(cudaErrorInvalidResourceHandle);
    delete g;
    return cudaSuccess;
}

/* ---- Kernels
 * --------------------------------------------------------------------------------------------- */
extern "C" cudaError_t cudaFuncSetAttribute(const void *func, enum cudaFuncAttribute attr,
                                            int value)
{
    LOCK();
    if (!func)
        return fail(cudaErrorInvalidDeviceFunction);
    kernel_info *k = kernel_for(func, NULL);
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        size_t stat = k->static_known ? k->static_bytes : 0;
        if (value < 0 || (size_t)value + stat > props().sharedMemPerBlockOptin) {
            report_msg(QS_EMU_LAUNCH,
                       "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, %d): over the device's "
                       "%zu bytes per block (less %zu static)",
                       value, (size_t)props().sharedMemPerBlockOptin, stat);
            return fail(cudaErrorInvalidValue);
        }
        k->max_dyn = value;
        return cudaSuccess;
    }
    if (attr == cudaFuncAttributePreferredSharedMemoryCarveout)
        return value < -1 || value > 100 ? fail(cudaErrorInvalidValue) : cudaSuccess;
    return fail(cudaErrorInvalidValue);
}

extern "C" cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes *a, const void *func)
{
    LOCK();
    if (!a || !func)
        return fail(cudaErrorInvalidValue);
    kernel_info *k = kernel_for(func, NULL);
    memset(a, 0, sizeof *a);
    a->sharedSizeBytes = k->static_known ? k->static_bytes : 0;
    a->maxThreadsPerBlock = props().maxThreadsPerBlock;
    a->maxDynamicSharedSizeBytes =
        k->max_dyn >= 0 ? k->max_dyn : (int)(props().sharedMemPerBlock - a->sharedSizeBytes);
    a->ptxVersion = a->binaryVersion = props().major * 10 + props().minor;
    return cudaSuccess;
}

/* From threads and shared memory only: registers are not known here. */
extern "C" cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int *blocks, const void *func,
                                                                     int threads, size_t dyn)
{
    LOCK();
    if (!blocks || !func || threads <= 0)
        return fail(cudaErrorInvalidValue);
    const cudaDeviceProp &p = props();
    kernel_info *k = kernel_for(func, NULL);
    size_t smem = (k->static_known ? k->static_bytes : 0) + dyn + p.reservedSharedMemPerBlock;
    int by_threads = p.maxThreadsPerMultiProcessor / (((threads + 31) / 32) * 32);
    int by_smem = (int)(p.sharedMemPerMultiprocessor / smem);
    int b = by_threads < by_smem ? by_threads : by_smem;
    *blocks = b < p.maxBlocksPerMultiProcessor ? b : p.maxBlocksPerMultiProcessor;
    return cudaSuccess;
}
