/* mpi_check.h: the failure counter of the MPI shard tests. CHECK prints the
 * rank, the place, the message and the library's last error sentence, and
 * counts; the test's main sums the counts over the ranks. */
#ifndef QS_MPI_CHECK_H
#define QS_MPI_CHECK_H

#include <stdio.h>

#include "qs_kernels.h"

static int rank, world, failures;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            printf("rank %d FAIL %s:%d: ", rank, __FILE__, __LINE__);                              \
            printf(__VA_ARGS__);                                                                   \
            printf(" [%s]\n", qs_errmsg());                                                        \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

#endif
