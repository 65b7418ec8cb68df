/* qs_collectives.h: one communicator API over MPI, NCCL and a single rank. */
#ifndef QS_COLLECTIVES_H
#define QS_COLLECTIVES_H

#include "qs_kernels.h" /* qs_err */

typedef struct qs_comm qs_comm;

#endif
