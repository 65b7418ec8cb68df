/* nccl.cpp: nccl.h over MPI, so that the device collective path of
 * collectives/ runs under mpirun on machines without GPUs. A unique id
 * names its creator's world rank and a nonce; ncclCommInitRank gathers the
 * members' world ranks at the creator over MPI_COMM_WORLD (point to point,
 * tagged by the nonce, so only the members take part) and makes an MPI
 * communicator of them in NCCL rank order. Each operation gathers every
 * rank's buffer and combines them in rank order, so all ranks compute the
 * same bits. */
#include "emu_internal.h"

#include <nccl.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mpi.h>

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct ncclComm {
    MPI_Comm mpi; /* MPI_COMM_NULL for a communicator of one rank */
    int nranks, rank, device;
};

namespace qs_emu
{
namespace
{

thread_local char tl_nccl_error[512];

ncclResult_t nfail(ncclResult_t r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
ncclResult_t nfail(ncclResult_t r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tl_nccl_error, sizeof tl_nccl_error, fmt, ap);
    va_end(ap);
    if (r == ncclInvalidArgument || r == ncclInvalidUsage)
        report_msg(QS_EMU_API, "%s", tl_nccl_error);
    return r;
}

struct nccl_id {
    uint32_t magic;
    int32_t root_world;
    uint64_t nonce;
};
const uint32_t ID_MAGIC = 0x434e5351; /* "QSNC" */

size_t dtype_size(ncclDataType_t t)
{
    switch (t) {
    case ncclInt8:
    case ncclUint8:
        return 1;
    case ncclFloat16:
    case ncclBfloat16:
        return 2;
    case ncclInt32:
    case ncclUint32:
    case ncclFloat32:
        return 4;
    case ncclInt64:
    case ncclUint64:
    case ncclFloat64:
        return 8;
    }
    return 0;
}

template <class T> T combine(T a, T b, ncclRedOp_t op)
{
    switch (op) {
    case ncclSum:
    case ncclAvg:
        return a + b;
    case ncclProd:
        return a * b;
    case ncclMax:
        return a > b ? a : b;
    case ncclMin:
        return a < b ? a : b;
    }
    return a;
}

template <class T> void reduce_all(const char *all, size_t count, int n, ncclRedOp_t op, void *out)
{
    T *o = (T *)out;
    for (size_t i = 0; i < count; i++) {
        T acc = ((const T *)all)[i];
        for (int r = 1; r < n; r++)
            acc = combine(acc, ((const T *)(all + (size_t)r * count * sizeof(T)))[i], op);
        if (op == ncclAvg)
            acc = (T)(acc / (T)n);
        o[i] = acc;
    }
}

/* fp16 and bf16: combined in float, rounded after each rank's addition. */
void reduce_half(const char *all, size_t count, int n, ncclRedOp_t op, void *out, bool bf)
{
    uint16_t *o = (uint16_t *)out;
    auto tof = [bf](uint16_t h) { return bf ? qs_emu_bf2f(h) : qs_emu_h2f(h); };
    auto toh = [bf](float f) { return bf ? qs_emu_f2bf_rn(f) : qs_emu_f2h_rn(f); };
    for (size_t i = 0; i < count; i++) {
        float acc = tof(((const uint16_t *)all)[i]);
        for (int r = 1; r < n; r++)
            acc = tof(
                toh(combine(acc, tof(((const uint16_t *)(all + (size_t)r * count * 2))[i]), op)));
        if (op == ncclAvg)
            acc = tof(toh(acc / (float)n));
        o[i] = toh(acc);
    }
}

void reduce(ncclDataType_t t, const char *all, size_t count, int n, ncclRedOp_t op, void *out)
{
    switch (t) {
    case ncclInt8:
        return reduce_all<int8_t>(all, count, n, op, out);
    case ncclUint8:
        return reduce_all<uint8_t>(all, count, n, op, out);
    case ncclInt32:
        return reduce_all<int32_t>(all, count, n, op, out);
    case ncclUint32:
        return reduce_all<uint32_t>(all, count, n, op, out);
    case ncclInt64:
        return reduce_all<int64_t>(all, count, n, op, out);
    case ncclUint64:
        return reduce_all<uint64_t>(all, count, n, op, out);
    case ncclFloat32:
        return reduce_all<float>(all, count, n, op, out);
    case ncclFloat64:
        return reduce_all<double>(all, count, n, op, out);
    case ncclFloat16:
        return reduce_half(all, count, n, op, out, false);
    case ncclBfloat16:
        return reduce_half(all, count, n, op, out, true);
    }
}

/* MPI counts are int: large buffers go in chunks of 1 GiB. */
int gather_bytes(const void *send, size_t bytes, char *all, MPI_Comm c, int n)
{
    const size_t chunk = (size_t)1 << 30;
    std::vector<char> tmp;
    for (size_t off = 0; off < bytes; off += chunk) {
        size_t b = bytes - off < chunk ? bytes - off : chunk;
        tmp.resize(b * (size_t)n);
        int rc = MPI_Allgather((const char *)send + off, (int)b, MPI_BYTE, tmp.data(), (int)b,
                               MPI_BYTE, c);
        if (rc != MPI_SUCCESS)
            return rc;
        for (int r = 0; r < n; r++)
            memcpy(all + (size_t)r * bytes + off, tmp.data() + (size_t)r * b, b);
    }
    return MPI_SUCCESS;
}

enum op_kind { OP_ALLREDUCE, OP_REDUCE, OP_BCAST, OP_ALLGATHER, OP_REDUCE_SCATTER };
struct coll_args {
    int kind;
    const void *send;
    void *recv;
    size_t count; /* elements: per rank for all-gather, of the result for reduce-scatter */
    ncclDataType_t dt;
    ncclRedOp_t op;
    int root;
    ncclComm_t comm;
};

cudaError_t coll_op(void *blob)
{
    const coll_args &a = *(const coll_args *)blob;
    ncclComm_t c = a.comm;
    size_t es = dtype_size(a.dt), n = (size_t)c->nranks;
    size_t in_elems = a.kind == OP_REDUCE_SCATTER ? a.count * n : a.count;
    size_t in_bytes = in_elems * es;
    if (a.kind == OP_BCAST) {
        if (c->rank == a.root && a.send != a.recv)
            memmove(a.recv, a.send, in_bytes);
        if (c->mpi != MPI_COMM_NULL)
            for (size_t off = 0; off < in_bytes; off += (size_t)1 << 30) {
                size_t b = in_bytes - off < ((size_t)1 << 30) ? in_bytes - off : (size_t)1 << 30;
                MPI_Bcast((char *)a.recv + off, (int)b, MPI_BYTE, a.root, c->mpi);
            }
        dev_mark_init(a.recv, in_bytes);
        return cudaSuccess;
    }
    std::vector<char> all(in_bytes * n);
    if (c->mpi == MPI_COMM_NULL)
        memcpy(all.data(), a.send, in_bytes);
    else if (gather_bytes(a.send, in_bytes, all.data(), c->mpi, (int)n) != MPI_SUCCESS)
        return cudaErrorUnknown;
    switch (a.kind) {
    case OP_ALLGATHER:
        memcpy(a.recv, all.data(), in_bytes * n);
        dev_mark_init(a.recv, in_bytes * n);
        break;
    case OP_ALLREDUCE:
        reduce(a.dt, all.data(), in_elems, (int)n, a.op, a.recv);
        dev_mark_init(a.recv, in_bytes);
        break;
    case OP_REDUCE:
        if (c->rank == a.root) {
            reduce(a.dt, all.data(), in_elems, (int)n, a.op, a.recv);
            dev_mark_init(a.recv, in_bytes);
        }
        break;
    case OP_REDUCE_SCATTER: {
        std::vector<char> full(in_bytes);
        reduce(a.dt, all.data(), in_elems, (int)n, a.op, full.data());
        memcpy(a.recv, full.data() + (size_t)c->rank * a.count * es, a.count * es);
        dev_mark_init(a.recv, a.count * es);
        break;
    }
    }
    return cudaSuccess;
}

ncclResult_t run(const char *what, coll_args a, cudaStream_t s, size_t send_bytes,
                 size_t recv_bytes)
{
    std::lock_guard<std::recursive_mutex> lk(g_device_lock);
    if (!a.comm)
        return nfail(ncclInvalidArgument, "%s: NULL communicator", what);
    if (!dtype_size(a.dt))
        return nfail(ncclInvalidArgument, "%s: data type %d is not NCCL's", what, (int)a.dt);
    if ((unsigned)a.op > ncclAvg)
        return nfail(ncclInvalidArgument, "%s: reduction %d is not NCCL's", what, (int)a.op);
    if (a.root < 0 || a.root >= a.comm->nranks)
        return nfail(ncclInvalidArgument, "%s: root %d of %d ranks", what, a.root, a.comm->nranks);
    std::string why;
    if (send_bytes && !dev_range(a.send, send_bytes, &why))
        return nfail(ncclInvalidArgument, "%s: send buffer %p (%zu bytes): %s", what, a.send,
                     send_bytes, why.c_str());
    if (recv_bytes && !dev_range(a.recv, recv_bytes, &why))
        return nfail(ncclInvalidArgument, "%s: receive buffer %p (%zu bytes): %s", what, a.recv,
                     recv_bytes, why.c_str());
    if (sticky() != cudaSuccess)
        return nfail(ncclUnhandledCudaError, "%s: the device has faulted earlier (%s)", what,
                     cudaGetErrorName(sticky()));
    cudaError_t e = enqueue(s, coll_op, &a, sizeof a, what);
    if (e != cudaSuccess)
        return nfail(e == cudaErrorUnknown ? ncclSystemError : ncclUnhandledCudaError, "%s: %s",
                     what, e == cudaErrorUnknown ? "an MPI call failed" : cudaGetErrorName(e));
    return ncclSuccess;
}

} /* namespace */
} /* namespace qs_emu */

using namespace qs_emu;

extern "C" ncclResult_t ncclGetVersion(int *v)
{
    if (!v)
        return ncclInvalidArgument;
    *v = NCCL_VERSION_CODE;
    return ncclSuccess;
}

extern "C" ncclResult_t ncclGetUniqueId(ncclUniqueId *id)
{
    if (!id)
        return nfail(ncclInvalidArgument, "ncclGetUniqueId: NULL id");
    memset(id, 0, sizeof *id);
    nccl_id v = {ID_MAGIC, 0, 0};
    int init = 0;
    MPI_Initialized(&init);
    if (init)
        MPI_Comm_rank(MPI_COMM_WORLD, &v.root_world);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    static uint64_t counter;
    v.nonce = ((uint64_t)ts.tv_nsec << 20) ^ ((uint64_t)getpid() << 40) ^ ++counter;
    memcpy(id->internal, &v, sizeof v);
    return ncclSuccess;
}

extern "C" ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId uid, int rank)
{
    if (!comm)
        return nfail(ncclInvalidArgument, "ncclCommInitRank: NULL communicator pointer");
    *comm = NULL;
    nccl_id id;
    memcpy(&id, uid.internal, sizeof id);
    if (id.magic != ID_MAGIC)
        return nfail(ncclInvalidArgument, "ncclCommInitRank: the unique id was not made by "
                                          "ncclGetUniqueId");
    if (nranks < 1 || rank < 0 || rank >= nranks)
        return nfail(ncclInvalidArgument, "ncclCommInitRank: rank %d of %d", rank, nranks);
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess)
        return nfail(ncclUnhandledCudaError, "ncclCommInitRank: no current CUDA device");
    ncclComm *c = new ncclComm{MPI_COMM_NULL, nranks, rank, dev};
    if (nranks > 1) {
        int init = 0, world = 0;
        MPI_Initialized(&init);
        if (!init) {
            delete c;
            return nfail(ncclSystemError, "ncclCommInitRank: the harness carries NCCL over MPI, "
                                          "and MPI is not initialized");
        }
        MPI_Comm_rank(MPI_COMM_WORLD, &world);
        const int tag = 30000 + (int)(id.nonce % 2000);
        std::vector<int> worlds((size_t)nranks, -1);
        if (rank == 0) {
            if (world != id.root_world) {
                delete c;
                return nfail(ncclInvalidUsage, "ncclCommInitRank: rank 0 must be the process "
                                               "that made the unique id");
            }
            worlds[0] = world;
            for (int i = 1; i < nranks; i++) {
                int msg[2];
                MPI_Recv(msg, 2, MPI_INT, MPI_ANY_SOURCE, tag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                if (msg[0] > 0 && msg[0] < nranks)
                    worlds[(size_t)msg[0]] = msg[1];
            }
            for (int i = 1; i < nranks; i++)
                MPI_Send(worlds.data(), nranks, MPI_INT, worlds[(size_t)i], tag, MPI_COMM_WORLD);
        } else {
            int msg[2] = {rank, world};
            MPI_Send(msg, 2, MPI_INT, id.root_world, tag, MPI_COMM_WORLD);
            MPI_Recv(worlds.data(), nranks, MPI_INT, id.root_world, tag, MPI_COMM_WORLD,
                     MPI_STATUS_IGNORE);
        }
        MPI_Group wg, g;
        MPI_Comm_group(MPI_COMM_WORLD, &wg);
        MPI_Group_incl(wg, nranks, worlds.data(), &g);
        int rc = MPI_Comm_create_group(MPI_COMM_WORLD, g, tag, &c->mpi);
        MPI_Group_free(&g);
        MPI_Group_free(&wg);
        if (rc != MPI_SUCCESS || c->mpi == MPI_COMM_NULL) {
            delete c;
            return nfail(ncclSystemError, "ncclCommInitRank: MPI_Comm_create_group failed");
        }
    }
    *comm = c;
    return ncclSuccess;
}

extern "C" ncclResult_t ncclCommDestroy(ncclComm_t c)
{
    if (!c)
        return ncclSuccess;
    if (c->mpi != MPI_COMM_NULL)
        MPI_Comm_free(&c->mpi);
    delete c;
    return ncclSuccess;
}

extern "C" ncclResult_t ncclCommAbort(ncclComm_t c)
{
    return ncclCommDestroy(c);
}

extern "C" ncclResult_t ncclCommCount(const ncclComm_t c, int *n)
{
    if (!c || !n)
        return ncclInvalidArgument;
    *n = c->nranks;
    return ncclSuccess;
}

extern "C" ncclResult_t ncclCommUserRank(const ncclComm_t c, int *r)
{
    if (!c || !r)
        return ncclInvalidArgument;
    *r = c->rank;
    return ncclSuccess;
}

extern "C" ncclResult_t ncclCommCuDevice(const ncclComm_t c, int *d)
{
    if (!c || !d)
        return ncclInvalidArgument;
    *d = c->device;
    return ncclSuccess;
}

extern "C" ncclResult_t ncclCommGetAsyncError(ncclComm_t c, ncclResult_t *e)
{
    if (!c || !e)
        return ncclInvalidArgument;
    *e = ncclSuccess;
    return ncclSuccess;
}

extern "C" const char *ncclGetErrorString(ncclResult_t r)
{
    switch (r) {
    case ncclSuccess:
        return "no error";
    case ncclUnhandledCudaError:
        return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
    case ncclSystemError:
        return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
    case ncclInternalError:
        return "internal error - please report this issue to the NCCL developers";
    case ncclInvalidArgument:
        return "invalid argument (run with NCCL_DEBUG=WARN for details)";
    case ncclInvalidUsage:
        return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    case ncclRemoteError:
        return "remote process exited or there was a network error";
    case ncclInProgress:
        return "NCCL operation in progress";
    }
    return "unknown result code";
}

extern "C" const char *ncclGetLastError(ncclComm_t c)
{
    (void)c;
    return tl_nccl_error;
}

extern "C" ncclResult_t ncclAllReduce(const void *s, void *r, size_t count, ncclDataType_t dt,
                                      ncclRedOp_t op, ncclComm_t c, cudaStream_t st)
{
    size_t b = count * dtype_size(dt);
    return run("ncclAllReduce", coll_args{OP_ALLREDUCE, s, r, count, dt, op, 0, c}, st, b, b);
}

extern "C" ncclResult_t ncclReduce(const void *s, void *r, size_t count, ncclDataType_t dt,
                                   ncclRedOp_t op, int root, ncclComm_t c, cudaStream_t st)
{
    size_t b = count * dtype_size(dt);
    return run("ncclReduce", coll_args{OP_REDUCE, s, r, count, dt, op, root, c}, st, b,
               c && c->rank == root ? b : 0);
}

extern "C" ncclResult_t ncclBroadcast(const void *s, void *r, size_t count, ncclDataType_t dt,
                                      int root, ncclComm_t c, cudaStream_t st)
{
    size_t b = count * dtype_size(dt);
    return run("ncclBroadcast", coll_args{OP_BCAST, s, r, count, dt, ncclSum, root, c}, st,
               c && c->rank == root ? b : 0, b);
}

extern "C" ncclResult_t ncclAllGather(const void *s, void *r, size_t count, ncclDataType_t dt,
                                      ncclComm_t c, cudaStream_t st)
{
    size_t b = count * dtype_size(dt);
    return run("ncclAllGather", coll_args{OP_ALLGATHER, s, r, count, dt, ncclSum, 0, c}, st, b,
               c ? b * (size_t)c->nranks : 0);
}

extern "C" ncclResult_t ncclReduceScatter(const void *s, void *r, size_t count, ncclDataType_t dt,
                                          ncclRedOp_t op, ncclComm_t c, cudaStream_t st)
{
    size_t b = count * dtype_size(dt);
    return run("ncclReduceScatter", coll_args{OP_REDUCE_SCATTER, s, r, count, dt, op, 0, c}, st,
               c ? b * (size_t)c->nranks : 0, b);
}

/* Every operation completes when called, so a group needs no deferral. */
extern "C" ncclResult_t ncclGroupStart(void)
{
    return ncclSuccess;
}

extern "C" ncclResult_t ncclGroupEnd(void)
{
    return ncclSuccess;
}
