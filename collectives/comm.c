/* The public entry points: argument checks, the choice of back end, and the
 * single-rank back end (no communication, copies only where out != in). */
#include "coll_internal.h"

#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

size_t qs_coll_dtype_size(qs_coll_dtype dtype)
{
    switch (dtype) {
    case QS_COLL_F32:
        return 4;
    case QS_COLL_F16:
        return 2;
    case QS_COLL_I32:
        return 4;
    case QS_COLL_U8:
        return 1;
    }
    return 0;
}

static qs_comm *comm_alloc(enum qs_comm_kind kind)
{
    size_t scratch = kind == QS_COMM_MPI ? QS_COLL_F16_CHUNK * sizeof(float) : 0;
    qs_comm *c = calloc(1, sizeof *c + scratch);
    if (!c)
        return NULL;
    c->kind = kind;
    c->rank = 0;
    c->size = 1;
    c->mpi = MPI_COMM_NULL;
    c->max_chunk = INT_MAX;
    c->device = -1;
    return c;
}

/* ---- Communicators ------------------------------------------------------ */

int qs_comm_init_single(qs_comm **out)
{
    if (!out)
        return qs_seterr(QS_EINVAL, "qs_comm_init_single: out is NULL");
    *out = comm_alloc(QS_COMM_SINGLE);
    if (!*out)
        return qs_seterr(QS_ENOMEM, "qs_comm_init_single: out of memory");
    return QS_OK;
}

/* A collective constructor must fail on every rank or on none: otherwise the
 * ranks that succeeded wait forever in the next collective. Each rank says
 * whether it is ready and all take the verdict of the first that is not. */
int qs_coll_agree(MPI_Comm mpi, int rank, int local_err, const char *what)
{
    int mine = local_err == QS_OK ? INT_MAX : rank, first_bad = INT_MAX;
    int rc = MPI_Allreduce(&mine, &first_bad, 1, MPI_INT, MPI_MIN, mpi);
    if (rc != MPI_SUCCESS)
        return qs_coll_mpi_error(rc, what);
    if (first_bad == INT_MAX)
        return QS_OK;
    if (local_err != QS_OK)
        return local_err; /* keep this rank's own message */
    return qs_seterr(QS_ECOMM, "%s failed on rank %d (see that rank's message)", what, first_bad);
}

/* Takes ownership of an MPI communicator we created (a dup or a split). */
static int adopt_mpi(qs_comm *c, MPI_Comm mpi)
{
    c->mpi = mpi;
    int rc = MPI_Comm_set_errhandler(mpi, MPI_ERRORS_RETURN);
    if (rc == MPI_SUCCESS)
        rc = MPI_Comm_rank(mpi, &c->rank);
    if (rc == MPI_SUCCESS)
        rc = MPI_Comm_size(mpi, &c->size);
    return rc == MPI_SUCCESS ? QS_OK : qs_coll_mpi_error(rc, "setting up the MPI communicator");
}

static void free_comm(qs_comm *c)
{
    int finalized = 0;
    if (c->mpi != MPI_COMM_NULL && MPI_Finalized(&finalized) == MPI_SUCCESS && !finalized)
        MPI_Comm_free(&c->mpi);
    free(c);
}

int qs_comm_init_mpi(MPI_Comm mpi_comm, qs_comm **out)
{
    if (!out)
        return qs_seterr(QS_EINVAL, "qs_comm_init_mpi: out is NULL");
    *out = NULL;
    int inited = 0, finalized = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&finalized);
    if (!inited || finalized)
        return qs_seterr(QS_EINVAL, "qs_comm_init_mpi: MPI is not initialized (call MPI_Init "
                                    "first, or use qs_comm_init_single without MPI)");
    if (mpi_comm == MPI_COMM_NULL)
        return qs_seterr(QS_EINVAL, "qs_comm_init_mpi: the MPI communicator is MPI_COMM_NULL");

    MPI_Comm dup = MPI_COMM_NULL;
    int rc = MPI_Comm_dup(mpi_comm, &dup);
    if (rc != MPI_SUCCESS)
        return qs_coll_mpi_error(rc, "qs_comm_init_mpi: MPI_Comm_dup");

    qs_comm *c = comm_alloc(QS_COMM_MPI);
    int err = c ? QS_OK : qs_seterr(QS_ENOMEM, "qs_comm_init_mpi: out of memory");
    if (c)
        err = adopt_mpi(c, dup);
    int rank = 0;
    MPI_Comm_rank(dup, &rank);
    err = qs_coll_agree(dup, rank, err, "qs_comm_init_mpi");
    if (err != QS_OK) {
        if (c)
            free_comm(c); /* frees dup */
        else
            MPI_Comm_free(&dup);
        return err;
    }
    *out = c;
    return QS_OK;
}

int qs_comm_split(qs_comm *parent, int color, int key, qs_comm **child)
{
    if (!child)
        return qs_seterr(QS_EINVAL, "qs_comm_split: child is NULL");
    *child = NULL;
    if (!parent)
        return qs_seterr(QS_EINVAL, "qs_comm_split: parent is NULL");

    qs_comm *c = NULL;
    int err = QS_OK;
    if (parent->kind == QS_COMM_SINGLE) {
        if (color < 0)
            return QS_OK;
        err = qs_comm_init_single(&c);
        if (err != QS_OK)
            return err;
    } else {
        MPI_Comm sub = MPI_COMM_NULL;
        int rc = MPI_Comm_split(parent->mpi, color < 0 ? MPI_UNDEFINED : color, key, &sub);
        if (rc != MPI_SUCCESS)
            return qs_coll_mpi_error(rc, "qs_comm_split: MPI_Comm_split");
        if (sub != MPI_COMM_NULL) {
            c = comm_alloc(QS_COMM_MPI);
            err = c ? adopt_mpi(c, sub) : qs_seterr(QS_ENOMEM, "qs_comm_split: out of memory");
        }
        err = qs_coll_agree(parent->mpi, parent->rank, err, "qs_comm_split");
        if (err != QS_OK) {
            if (c)
                free_comm(c);
            else if (sub != MPI_COMM_NULL)
                MPI_Comm_free(&sub);
            return err;
        }
        if (!c)
            return QS_OK; /* color < 0: this rank is in no group */
    }
    c->max_chunk = parent->max_chunk;

    /* A model's group computes on the same GPU as the whole daemon. The child
     * shares a stream the caller gave, but makes its own where the parent
     * owns one, so that closing the parent first leaves nothing dangling. */
    if (parent->dev_enabled) {
        err = qs_comm_enable_device(c, parent->device, parent->owns_stream ? NULL : parent->stream);
        if (err != QS_OK) {
            qs_comm_close(c);
            return err;
        }
    }
    *child = c;
    return QS_OK;
}

int qs_comm_close(qs_comm *comm)
{
    if (!comm)
        return QS_OK;
    int err = QS_OK;
#ifdef QS_HAVE_CUDA
    if (comm->dev_enabled)
        err = qs_coll_dev_close(comm);
#endif
    free_comm(comm);
    return err;
}

int qs_comm_rank(const qs_comm *comm)
{
    return comm ? comm->rank : -1;
}

int qs_comm_size(const qs_comm *comm)
{
    return comm ? comm->size : 0;
}

MPI_Comm qs_comm_mpi(const qs_comm *comm)
{
    return comm ? comm->mpi : MPI_COMM_NULL;
}

int qs_comm_set_max_chunk(qs_comm *comm, size_t max_count)
{
    if (!comm)
        return qs_seterr(QS_EINVAL, "qs_comm_set_max_chunk: comm is NULL");
    if (max_count == 0 || max_count > INT_MAX)
        return qs_seterr(QS_EINVAL, "qs_comm_set_max_chunk: %zu is outside 1..INT_MAX", max_count);
    comm->max_chunk = max_count;
    return QS_OK;
}

/* ---- Devices ------------------------------------------------------------ */

#ifndef QS_HAVE_CUDA
static int no_cuda(const char *what)
{
    return qs_seterr(QS_ENOTSUP,
                     "%s: device buffers need a CUDA build of qshard, and this one was built "
                     "without nvcc (QS_HAVE_CUDA off); use host buffers or rebuild with CUDA",
                     what);
}
#endif

int qs_comm_enable_device(qs_comm *comm, int device, void *stream)
{
    if (!comm)
        return qs_seterr(QS_EINVAL, "qs_comm_enable_device: comm is NULL");
    if (comm->dev_enabled)
        return qs_seterr(QS_EBUSY, "qs_comm_enable_device: a device is already enabled (%d)",
                         comm->device);
#ifdef QS_HAVE_CUDA
    return qs_coll_dev_enable(comm, device, stream);
#else
    (void)device;
    (void)stream;
    return no_cuda("qs_comm_enable_device");
#endif
}

int qs_comm_device(const qs_comm *comm)
{
    return comm && comm->dev_enabled ? comm->device : -1;
}

void *qs_comm_stream(const qs_comm *comm)
{
    return comm && comm->dev_enabled ? comm->stream : NULL;
}

int qs_comm_sync(qs_comm *comm)
{
    if (!comm)
        return qs_seterr(QS_EINVAL, "qs_comm_sync: comm is NULL");
#ifdef QS_HAVE_CUDA
    if (comm->dev_enabled)
        return qs_coll_dev_sync(comm);
#endif
    return QS_OK;
}

/* ---- Collectives -------------------------------------------------------- */

/* Checks what every collective shares. Returns QS_OK to go on, 1 when there
 * is nothing to do (count 0), or an error. Configuration errors (bad dtype,
 * device memory without CUDA) are reported even for count 0, so a caller
 * finds them with its first, possibly empty, message. */
static int check(const qs_comm *c, const char *op, size_t count, qs_coll_dtype dt, qs_coll_mem mem,
                 size_t *bytes)
{
    if (!c)
        return qs_seterr(QS_EINVAL, "%s: comm is NULL", op);
    size_t es = qs_coll_dtype_size(dt);
    if (es == 0)
        return qs_seterr(QS_EINVAL, "%s: unknown dtype %d", op, (int)dt);
    if (mem != QS_COLL_HOST && mem != QS_COLL_DEVICE)
        return qs_seterr(QS_EINVAL, "%s: unknown buffer location %d", op, (int)mem);
    if (mem == QS_COLL_DEVICE) {
#ifndef QS_HAVE_CUDA
        return no_cuda(op);
#else
        if (!c->dev_enabled)
            return qs_seterr(QS_EINVAL,
                             "%s: device buffers on a communicator without a device: call "
                             "qs_comm_enable_device first",
                             op);
#endif
    }
    if (count > SIZE_MAX / es)
        return qs_seterr(QS_EOVERFLOW, "%s: %zu elements of %zu bytes overflow size_t", op, count,
                         es);
    *bytes = count * es;
    return count == 0 ? 1 : QS_OK;
}

/* Byte ranges [a, a+n) and [b, b+m) share a byte. */
static int overlap(const void *a, size_t n, const void *b, size_t m)
{
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + m && y < x + n;
}

int qs_comm_allreduce_sum(qs_comm *comm, const void *sendbuf, void *recvbuf, size_t count,
                          qs_coll_dtype dtype, qs_coll_mem mem)
{
    static const char op[] = "qs_comm_allreduce_sum";
    size_t bytes = 0;
    int err = check(comm, op, count, dtype, mem, &bytes);
    if (err == QS_OK && dtype == QS_COLL_U8)
        err = qs_seterr(QS_EINVAL, "%s: sums of QS_COLL_U8 are not defined (use QS_COLL_I32)", op);
    if (err != QS_OK)
        return err == 1 ? QS_OK : err;
    if (!sendbuf || !recvbuf)
        return qs_seterr(QS_EINVAL, "%s: %s is NULL with count %zu", op,
                         sendbuf ? "recvbuf" : "sendbuf", count);
    if (sendbuf != recvbuf && overlap(sendbuf, bytes, recvbuf, bytes))
        return qs_seterr(QS_EINVAL, "%s: sendbuf and recvbuf overlap (in place needs them equal)",
                         op);

#ifdef QS_HAVE_CUDA
    if (mem == QS_COLL_DEVICE)
        return qs_coll_dev_allreduce(comm, sendbuf, recvbuf, count, dtype);
#endif
    if (comm->kind == QS_COMM_MPI)
        return qs_coll_mpi_allreduce(comm, sendbuf, recvbuf, count, dtype);
    if (sendbuf != recvbuf)
        memcpy(recvbuf, sendbuf, bytes);
    return QS_OK;
}

int qs_comm_allgather(qs_comm *comm, const void *sendbuf, void *recvbuf, size_t count,
                      qs_coll_dtype dtype, qs_coll_mem mem)
{
    static const char op[] = "qs_comm_allgather";
    size_t bytes = 0;
    int err = check(comm, op, count, dtype, mem, &bytes);
    if (err != QS_OK)
        return err == 1 ? QS_OK : err;
    if (!sendbuf || !recvbuf)
        return qs_seterr(QS_EINVAL, "%s: %s is NULL with count %zu", op,
                         sendbuf ? "recvbuf" : "sendbuf", count);
    if (bytes > SIZE_MAX / (size_t)comm->size)
        return qs_seterr(QS_EOVERFLOW, "%s: %d ranks x %zu bytes overflow size_t", op, comm->size,
                         bytes);
    size_t total = bytes * (size_t)comm->size;
    const char *mine = (const char *)recvbuf + (size_t)comm->rank * bytes;
    if ((const char *)sendbuf != mine && overlap(sendbuf, bytes, recvbuf, total))
        return qs_seterr(QS_EINVAL,
                         "%s: sendbuf overlaps recvbuf (in place needs sendbuf == recvbuf + "
                         "rank * count elements)",
                         op);

#ifdef QS_HAVE_CUDA
    if (mem == QS_COLL_DEVICE)
        return qs_coll_dev_allgather(comm, sendbuf, recvbuf, count, dtype);
#endif
    if (comm->kind == QS_COMM_MPI)
        return qs_coll_mpi_allgather(comm, sendbuf, recvbuf, count, dtype);
    if ((const char *)sendbuf != mine)
        memcpy(recvbuf, sendbuf, bytes);
    return QS_OK;
}

int qs_comm_bcast(qs_comm *comm, void *buf, size_t count, qs_coll_dtype dtype, int root,
                  qs_coll_mem mem)
{
    static const char op[] = "qs_comm_bcast";
    size_t bytes = 0;
    int err = check(comm, op, count, dtype, mem, &bytes);
    if (err == QS_OK || err == 1) {
        if (root < 0 || root >= comm->size)
            err = qs_seterr(QS_EINVAL, "%s: root %d is not a rank of this %d-rank communicator", op,
                            root, comm->size);
    }
    if (err != QS_OK)
        return err == 1 ? QS_OK : err;
    if (!buf)
        return qs_seterr(QS_EINVAL, "%s: buf is NULL with count %zu", op, count);

#ifdef QS_HAVE_CUDA
    if (mem == QS_COLL_DEVICE)
        return qs_coll_dev_bcast(comm, buf, count, dtype, root);
#endif
    if (comm->kind == QS_COMM_MPI)
        return qs_coll_mpi_bcast(comm, buf, count, dtype, root);
    return QS_OK; /* one rank: the root already holds the data */
}

int qs_comm_barrier(qs_comm *comm)
{
    if (!comm)
        return qs_seterr(QS_EINVAL, "qs_comm_barrier: comm is NULL");
    if (comm->kind != QS_COMM_MPI)
        return QS_OK;
    int rc = MPI_Barrier(comm->mpi);
    return rc == MPI_SUCCESS ? QS_OK : qs_coll_mpi_error(rc, "MPI_Barrier");
}
