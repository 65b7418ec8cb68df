/* qs_collectives.h: one communicator API over MPI, NCCL and a single rank.
 *
 * A qs_comm is a group of ranks that run collectives together. It is made
 * from an MPI communicator (qs_comm_init_mpi), for one process without MPI
 * (qs_comm_init_single), or by splitting another one (qs_comm_split), and
 * released with qs_comm_close.
 *
 * Every collective names where its buffers live (qs_coll_mem), and that
 * picks the back end:
 *   QS_COLL_HOST    MPI on an MPI communicator; plain copies on a single rank.
 *   QS_COLL_DEVICE  NCCL on an MPI communicator (MPI here is not CUDA-aware,
 *                   so device memory never goes through MPI); device copies on
 *                   a single rank. Needs qs_comm_enable_device() first, and a
 *                   build with CUDA (else QS_ENOTSUP).
 *
 * Host collectives block until the result is in the output buffer. Device
 * collectives are enqueued on the communicator's CUDA stream and return at
 * once; qs_comm_sync() waits for them.
 *
 * Collective calls (everything that takes a qs_comm, except the accessors,
 * qs_comm_set_max_chunk and qs_comm_sync) must be made by every rank of the
 * communicator, in the same order, with the same count, dtype and root.
 * A count of 0 is a valid no-op (buffers may then be NULL).
 *
 * The location is trusted, not probed: a device pointer passed as
 * QS_COLL_HOST reaches MPI and crashes there. A communicator is used by one
 * thread at a time (like an MPI communicator without MPI_THREAD_MULTIPLE).
 *
 * fp16 sums on the host are computed in fp32 (each chunk converted, reduced
 * with MPI_FLOAT/MPI_SUM, rounded back to fp16 once, round-to-nearest-even);
 * on the device NCCL reduces fp16 natively (ncclFloat16, ncclSum).
 *
 * Errors follow qs_kernels.h: a negative qs_err, with qs_errmsg() saying what
 * went wrong. MPI failures become QS_ECOMM with MPI's error string.
 */
#ifndef QS_COLLECTIVES_H
#define QS_COLLECTIVES_H

#include <stddef.h>

#include <mpi.h>

#include "qs_kernels.h" /* qs_err, qs_errmsg */

#ifdef __cplusplus
extern "C" {
#endif

typedef struct qs_comm qs_comm;

/* Element types. Sums are defined for F32, F16 and I32. */
typedef enum qs_coll_dtype {
    QS_COLL_F32 = 0, /* float */
    QS_COLL_F16 = 1, /* IEEE binary16, stored as uint16_t */
    QS_COLL_I32 = 2, /* int32_t */
    QS_COLL_U8 = 3   /* bytes (all-gather and broadcast only) */
} qs_coll_dtype;

/* Where a collective's buffers live. */
typedef enum qs_coll_mem {
    QS_COLL_HOST = 0,  /* host memory: MPI (or copies on a single rank) */
    QS_COLL_DEVICE = 1 /* CUDA device memory: NCCL (or device copies) */
} qs_coll_mem;

/* Bytes per element of a dtype; 0 for an unknown one. */
size_t qs_coll_dtype_size(qs_coll_dtype dtype);

/* ---- Communicators ------------------------------------------------------ */

/* A communicator over the ranks of mpi_comm (collective over mpi_comm). MPI
 * must be initialized. The communicator is duplicated, so qshard's traffic
 * never mixes with the caller's, and its error handler is MPI_ERRORS_RETURN. */
int qs_comm_init_mpi(MPI_Comm mpi_comm, qs_comm **out);

/* A communicator of one rank that does no communication and needs no MPI. */
int qs_comm_init_single(qs_comm **out);

/* Splits parent into groups, as MPI_Comm_split (collective over parent): the
 * ranks passing the same color >= 0 form one child, ordered by key, then by
 * parent rank. A rank passing a negative color joins no group and gets
 * *child = NULL with QS_OK. If the parent has a device enabled, each child
 * enables the same device (so the split is also collective over each child's
 * NCCL initialization) and the same stream if the caller supplied it; where
 * the parent owns its stream, the child creates and owns its own, so parent
 * and child may be closed in any order. */
int qs_comm_split(qs_comm *parent, int color, int key, qs_comm **child);

/* Frees the communicator (NCCL comm, owned stream, MPI duplicate). Not
 * collective for a single rank; for MPI it calls MPI_Comm_free, which is.
 * NULL is allowed. Returns QS_ECOMM if a back end reported an error while
 * tearing down (the communicator is freed anyway). */
int qs_comm_close(qs_comm *comm);

/* This rank's index in comm (0..size-1), and the number of ranks. */
int qs_comm_rank(const qs_comm *comm);
int qs_comm_size(const qs_comm *comm);

/* The MPI communicator behind comm (qshard's duplicate; do not free it), or
 * MPI_COMM_NULL for a single-rank communicator. For small host messages that
 * do not fit the collectives below, e.g. command headers. */
MPI_Comm qs_comm_mpi(const qs_comm *comm);

/* Largest element count one MPI call may carry; bigger messages are split
 * into chunks of at most this many elements. Default and maximum: INT_MAX
 * (MPI counts are int). Small values are for tests. Local, not collective,
 * but every rank must use the same value. */
int qs_comm_set_max_chunk(qs_comm *comm, size_t max_count);

/* ---- Devices (CUDA builds) ---------------------------------------------- */

/* Makes device buffers usable on comm (collective over comm): selects CUDA
 * device `device` (or keeps the current one when device < 0) and uses
 * `stream` (a cudaStream_t; NULL makes the communicator create and own a
 * non-blocking stream). On an MPI communicator it creates the NCCL
 * communicator: rank 0 makes the ncclUniqueId and broadcasts it over MPI.
 * All ranks agree on success before NCCL is entered, so a rank without a
 * GPU makes every rank fail instead of hanging.
 * QS_ENOTSUP in a build without CUDA; QS_ENODEV when the device is absent;
 * QS_EBUSY if a device is already enabled on comm. */
int qs_comm_enable_device(qs_comm *comm, int device, void *stream);

/* The CUDA device ordinal and stream (a cudaStream_t) the device collectives
 * use; -1 and NULL before qs_comm_enable_device. */
int qs_comm_device(const qs_comm *comm);
void *qs_comm_stream(const qs_comm *comm);

/* Waits until the device collectives enqueued on comm's stream are done, and
 * reports an asynchronous NCCL error as QS_ECOMM. QS_OK when no device is
 * enabled. Local, not collective. */
int qs_comm_sync(qs_comm *comm);

/* ---- Collectives -------------------------------------------------------- */

/* recvbuf[i] = sum over ranks of sendbuf[i], for i < count, on every rank.
 * sendbuf == recvbuf reduces in place; other overlaps are rejected. */
int qs_comm_allreduce_sum(qs_comm *comm, const void *sendbuf, void *recvbuf, size_t count,
                          qs_coll_dtype dtype, qs_coll_mem mem);

/* Every rank contributes count elements; recvbuf (size * count elements)
 * receives them in rank order on every rank. In place when sendbuf ==
 * recvbuf + rank * count elements. */
int qs_comm_allgather(qs_comm *comm, const void *sendbuf, void *recvbuf, size_t count,
                      qs_coll_dtype dtype, qs_coll_mem mem);

/* Copies count elements of buf on rank root to buf on every rank. */
int qs_comm_bcast(qs_comm *comm, void *buf, size_t count, qs_coll_dtype dtype, int root,
                  qs_coll_mem mem);

/* Returns when every rank has called it (MPI_Barrier; a no-op on a single
 * rank). It does not wait for device work: call qs_comm_sync first. */
int qs_comm_barrier(qs_comm *comm);

#ifdef __cplusplus
}
#endif
#endif /* QS_COLLECTIVES_H */
