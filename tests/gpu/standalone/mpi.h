/* mpi.h (standalone GPU build): the MPI names collectives/ compiles
 * against, for the bare GPU machines that have no MPI. Every call fails
 * (MPI_ERR_OTHER): programs built this way use one rank only
 * (qs_comm_init_single), which calls none of them. Never used where a real
 * MPI exists. */
#ifndef QS_STANDALONE_MPI_H
#define QS_STANDALONE_MPI_H

#include <stddef.h>

typedef int MPI_Comm, MPI_Datatype, MPI_Op, MPI_Errhandler;
typedef long MPI_Aint;
#define MPI_SUCCESS          0
#define MPI_ERR_OTHER        15
#define MPI_COMM_NULL        0
#define MPI_COMM_WORLD       1
#define MPI_DATATYPE_NULL    0
#define MPI_BYTE             1
#define MPI_INT              2
#define MPI_UNSIGNED         3
#define MPI_FLOAT            4
#define MPI_UINT8_T          5
#define MPI_UINT16_T         6
#define MPI_INT32_T          7
#define MPI_SUM              1
#define MPI_MIN              2
#define MPI_MAX              3
#define MPI_ERRORS_RETURN    1
#define MPI_IN_PLACE         ((void *)1)
#define MPI_UNDEFINED        (-32766)
#define MPI_THREAD_MULTIPLE  3
#define MPI_MAX_ERROR_STRING 256

int MPI_Init(int *argc, char ***argv);
int MPI_Initialized(int *flag);
int MPI_Finalized(int *flag);
int MPI_Comm_rank(MPI_Comm c, int *r);
int MPI_Comm_size(MPI_Comm c, int *n);
int MPI_Comm_dup(MPI_Comm c, MPI_Comm *out);
int MPI_Comm_split(MPI_Comm c, int color, int key, MPI_Comm *out);
int MPI_Comm_free(MPI_Comm *c);
int MPI_Comm_set_errhandler(MPI_Comm c, MPI_Errhandler h);
int MPI_Error_string(int code, char *s, int *len);
int MPI_Barrier(MPI_Comm c);
int MPI_Bcast(void *b, int n, MPI_Datatype t, int root, MPI_Comm c);
int MPI_Allreduce(const void *s, void *r, int n, MPI_Datatype t, MPI_Op op, MPI_Comm c);
int MPI_Allgather(const void *s, int sn, MPI_Datatype st, void *r, int rn, MPI_Datatype rt,
                  MPI_Comm c);
int MPI_Type_contiguous(int n, MPI_Datatype t, MPI_Datatype *out);
int MPI_Type_create_resized(MPI_Datatype t, MPI_Aint lb, MPI_Aint extent, MPI_Datatype *out);
int MPI_Type_commit(MPI_Datatype *t);
int MPI_Type_free(MPI_Datatype *t);
#endif
