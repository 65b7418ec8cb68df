/* coll_internal.h: what comm.c, mpi.c, nccl.c and half.c share. Not public:
 * users see only qs_collectives.h; the tests include this for the fp16
 * conversions. */
#ifndef QS_COLL_INTERNAL_H
#define QS_COLL_INTERNAL_H

#include <stdint.h>

#include "qs_collectives.h"

/* fp16 sums on MPI go through a float buffer of this many elements inside the
 * communicator, so a host fp16 all-reduce never allocates (an allocation that
 * fails on one rank only would leave the others waiting in MPI). */
#define QS_COLL_F16_CHUNK ((size_t)1 << 16)

enum qs_comm_kind { QS_COMM_SINGLE = 1, QS_COMM_MPI = 2 };

struct qs_comm {
    enum qs_comm_kind kind;
    int rank;
    int size;
    MPI_Comm mpi;     /* our duplicate (MPI_ERRORS_RETURN); MPI_COMM_NULL if single */
    size_t max_chunk; /* elements per MPI call, 1..INT_MAX */

    /* Device side, set by qs_comm_enable_device (CUDA builds only). */
    int dev_enabled;
    int device;      /* CUDA ordinal */
    void *stream;    /* cudaStream_t */
    int owns_stream; /* we created the stream and destroy it on close */
    void *nccl;      /* ncclComm_t; NULL on a single rank */

    float scratch[]; /* QS_COLL_F16_CHUNK floats on MPI communicators */
};

/* IEEE binary16 <-> binary32, round to nearest even, NaN and Inf kept. */
float qs_coll_f16_to_f32(uint16_t h);
uint16_t qs_coll_f32_to_f16(float f);

/* Collective over mpi: QS_OK if every rank's local_err is QS_OK, else an
 * error on every rank (this rank's own, or QS_ECOMM naming the first rank
 * that failed). Constructors call it so they fail everywhere or nowhere. */
int qs_coll_agree(MPI_Comm mpi, int rank, int local_err, const char *what);

/* MPI back end (mpi.c): host buffers, arguments already checked, count > 0. */
int qs_coll_mpi_error(int rc, const char *what);
int qs_coll_mpi_allreduce(qs_comm *c, const void *in, void *out, size_t count, qs_coll_dtype dt);
int qs_coll_mpi_allgather(qs_comm *c, const void *in, void *out, size_t count, qs_coll_dtype dt);
int qs_coll_mpi_bcast(qs_comm *c, void *buf, size_t count, qs_coll_dtype dt, int root);

#ifdef QS_HAVE_CUDA
/* Device back end (nccl.c): NCCL on MPI communicators, copies on one rank. */
int qs_coll_dev_enable(qs_comm *c, int device, void *stream);
int qs_coll_dev_close(qs_comm *c);
int qs_coll_dev_sync(qs_comm *c);
int qs_coll_dev_allreduce(qs_comm *c, const void *in, void *out, size_t count, qs_coll_dtype dt);
int qs_coll_dev_allgather(qs_comm *c, const void *in, void *out, size_t count, qs_coll_dtype dt);
int qs_coll_dev_bcast(qs_comm *c, void *buf, size_t count, qs_coll_dtype dt, int root);
#endif

#endif /* QS_COLL_INTERNAL_H */
