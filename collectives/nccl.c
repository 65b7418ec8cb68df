/* Device back end (CUDA builds only): NCCL for MPI communicators, device
 * copies for a single rank. Plain C against the CUDA runtime API and nccl.h,
 * so it is held to the same -Wall -Wextra as the rest of the host code.
 * Device memory never goes through MPI: MPI only carries the ncclUniqueId
 * and the ranks' yes/no on whether they are ready. */
#include "coll_internal.h"

#include <limits.h>
#include <stddef.h>

#include <cuda_runtime_api.h>
#include <nccl.h>

static int cuda_error(cudaError_t e, int code, const char *what)
{
    cudaGetLastError(); /* reset the last-error state so the next call starts clean */
    return qs_seterr(code, "%s failed: CUDA error %d (%s)", what, (int)e, cudaGetErrorString(e));
}

static int nccl_error(ncclResult_t r, ncclComm_t comm, const char *what)
{
    const char *last = ncclGetLastError(comm);
    return qs_seterr(QS_ECOMM, "%s failed: NCCL error %d (%s)%s%s", what, (int)r,
                     ncclGetErrorString(r), last && *last ? ": " : "", last ? last : "");
}

static ncclDataType_t nccl_type(qs_coll_dtype dt)
{
    switch (dt) {
    case QS_COLL_F32:
        return ncclFloat32;
    case QS_COLL_F16:
        return ncclFloat16;
    case QS_COLL_I32:
        return ncclInt32;
    case QS_COLL_U8:
        return ncclUint8;
    }
    return ncclUint8;
}

/* Picks the device and the stream on this rank only. */
static int local_setup(int *device, void *stream, cudaStream_t *out, int *owns)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess)
        return cuda_error(e, QS_ENODEV, "qs_comm_enable_device: cudaGetDeviceCount");
    if (n == 0)
        return qs_seterr(QS_ENODEV, "qs_comm_enable_device: no CUDA device on this machine");
    if (*device >= n)
        return qs_seterr(QS_ENODEV,
                         "qs_comm_enable_device: CUDA device %d does not exist (%d found)", *device,
                         n);
    e = *device >= 0 ? cudaSetDevice(*device) : cudaGetDevice(device);
    if (e != cudaSuccess)
        return cuda_error(e, QS_ENODEV, "qs_comm_enable_device: selecting the CUDA device");
    *owns = 0;
    *out = (cudaStream_t)stream;
    if (!stream) {
        e = cudaStreamCreateWithFlags(out, cudaStreamNonBlocking);
        if (e != cudaSuccess)
            return cuda_error(e, QS_ENODEV, "qs_comm_enable_device: cudaStreamCreate");
        *owns = 1;
    }
    return QS_OK;
}

int qs_coll_dev_enable(qs_comm *c, int device, void *stream)
{
    cudaStream_t s = NULL;
    int owns = 0;
    ncclComm_t nc = NULL;
    int err = local_setup(&device, stream, &s, &owns);

    if (c->kind == QS_COMM_MPI) {
        /* NCCL init blocks until every rank joins, so agree first: a rank
         * without a GPU then fails all ranks instead of hanging them. */
        err = qs_coll_agree(c->mpi, c->rank, err, "qs_comm_enable_device (CUDA device set-up)");
        if (err != QS_OK)
            goto fail;

        struct {
            int status;
            ncclUniqueId id;
        } msg = {0};
        if (c->rank == 0)
            msg.status = (int)ncclGetUniqueId(&msg.id);
        int rc = MPI_Bcast(&msg, (int)sizeof msg, MPI_BYTE, 0, c->mpi);
        if (rc != MPI_SUCCESS) {
            err = qs_coll_mpi_error(rc, "qs_comm_enable_device: MPI_Bcast of the ncclUniqueId");
            goto fail;
        }
        if (msg.status != ncclSuccess) {
            err = qs_seterr(QS_ECOMM, "qs_comm_enable_device: ncclGetUniqueId failed on rank 0: %s",
                            ncclGetErrorString((ncclResult_t)msg.status));
            goto fail;
        }
        ncclResult_t r = ncclCommInitRank(&nc, c->size, msg.id, c->rank);
        err = r == ncclSuccess ? QS_OK
                               : nccl_error(r, NULL, "qs_comm_enable_device: ncclCommInitRank");
        if (r != ncclSuccess)
            nc = NULL;
        err = qs_coll_agree(c->mpi, c->rank, err, "qs_comm_enable_device (ncclCommInitRank)");
        if (err != QS_OK)
            goto fail;
    } else if (err != QS_OK) {
        goto fail;
    }

    c->dev_enabled = 1;
    c->device = device;
    c->stream = s;
    c->owns_stream = owns;
    c->nccl = nc;
    return QS_OK;

fail:
    if (nc)
        ncclCommDestroy(nc);
    if (owns && s)
        cudaStreamDestroy(s);
    return err;
}

int qs_coll_dev_close(qs_comm *c)
{
    int err = QS_OK;
    if (c->nccl) {
        ncclResult_t r = ncclCommDestroy((ncclComm_t)c->nccl);
        if (r != ncclSuccess)
            err = nccl_error(r, NULL, "qs_comm_close: ncclCommDestroy");
    }
    if (c->owns_stream && c->stream) {
        cudaError_t e = cudaStreamDestroy((cudaStream_t)c->stream);
        if (e != cudaSuccess && err == QS_OK)
            err = cuda_error(e, QS_ECOMM, "qs_comm_close: cudaStreamDestroy");
    }
    c->nccl = NULL;
    c->stream = NULL;
    c->dev_enabled = 0;
    return err;
}

/* NCCL and the copies act on the current device: switch to the
 * communicator's for the call and back, so callers that drive several
 * devices from one thread are not surprised. */
static int enter(const qs_comm *c, int *prev)
{
    cudaError_t e = cudaGetDevice(prev);
    if (e == cudaSuccess && *prev != c->device)
        e = cudaSetDevice(c->device);
    return e == cudaSuccess ? QS_OK
                            : cuda_error(e, QS_ECOMM, "selecting the communicator's device");
}

static int leave(const qs_comm *c, int prev, int err)
{
    if (prev != c->device)
        cudaSetDevice(prev);
    return err;
}

int qs_coll_dev_sync(qs_comm *c)
{
    int prev, err = enter(c, &prev);
    if (err != QS_OK)
        return err;
    cudaError_t e = cudaStreamSynchronize((cudaStream_t)c->stream);
    if (e != cudaSuccess)
        err = cuda_error(e, QS_ECOMM, "qs_comm_sync: cudaStreamSynchronize");
    if (err == QS_OK && c->nccl) {
        ncclResult_t async = ncclSuccess;
        ncclResult_t r = ncclCommGetAsyncError((ncclComm_t)c->nccl, &async);
        if (r != ncclSuccess)
            err = nccl_error(r, (ncclComm_t)c->nccl, "qs_comm_sync: ncclCommGetAsyncError");
        else if (async != ncclSuccess)
            err = nccl_error(async, (ncclComm_t)c->nccl, "qs_comm_sync: a device collective");
    }
    return leave(c, prev, err);
}

/* One rank: out = in, enqueued on the stream like a collective would be. */
static int dev_copy(qs_comm *c, void *out, const void *in, size_t bytes, const char *what)
{
    if (out == in)
        return QS_OK;
    int prev, err = enter(c, &prev);
    if (err != QS_OK)
        return err;
    cudaError_t e =
        cudaMemcpyAsync(out, in, bytes, cudaMemcpyDeviceToDevice, (cudaStream_t)c->stream);
    if (e != cudaSuccess)
        err = cuda_error(e, QS_ECOMM, what);
    return leave(c, prev, err);
}

int qs_coll_dev_allreduce(qs_comm *c, const void *in, void *out, size_t count, qs_coll_dtype dt)
{
    if (!c->nccl)
        return dev_copy(c, out, in, count * qs_coll_dtype_size(dt), "qs_comm_allreduce_sum");
    int prev, err = enter(c, &prev);
    if (err != QS_OK)
        return err;
    ncclResult_t r = ncclAllReduce(in, out, count, nccl_type(dt), ncclSum, (ncclComm_t)c->nccl,
                                   (cudaStream_t)c->stream);
    if (r != ncclSuccess)
        err = nccl_error(r, (ncclComm_t)c->nccl, "ncclAllReduce");
    return leave(c, prev, err);
}

int qs_coll_dev_allgather(qs_comm *c, const void *in, void *out, size_t count, qs_coll_dtype dt)
{
    if (!c->nccl)
        return dev_copy(c, out, in, count * qs_coll_dtype_size(dt), "qs_comm_allgather");
    int prev, err = enter(c, &prev);
    if (err != QS_OK)
        return err;
    ncclResult_t r =
        ncclAllGather(in, out, count, nccl_type(dt), (ncclComm_t)c->nccl, (cudaStream_t)c->stream);
    if (r != ncclSuccess)
        err = nccl_error(r, (ncclComm_t)c->nccl, "ncclAllGather");
    return leave(c, prev, err);
}

int qs_coll_dev_bcast(qs_comm *c, void *buf, size_t count, qs_coll_dtype dt, int root)
{
    if (!c->nccl)
        return QS_OK;
    int prev, err = enter(c, &prev);
    if (err != QS_OK)
        return err;
    ncclResult_t r = ncclBroadcast(buf, buf, count, nccl_type(dt), root, (ncclComm_t)c->nccl,
                                   (cudaStream_t)c->stream);
    if (r != ncclSuccess)
        err = nccl_error(r, (ncclComm_t)c->nccl, "ncclBroadcast");
    return leave(c, prev, err);
}
