/* stubs.c (standalone GPU build): the MPI, BLAS and cJSON functions of
 * mpi.h, cblas.h and cjson/cJSON.h here. See those headers for why. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cblas.h"
#include "cjson/cJSON.h"
#include "mpi.h"

/* ---- MPI: every call fails; MPI is never initialised here ---- */
int MPI_Init(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    return MPI_ERR_OTHER;
}
int MPI_Initialized(int *flag)
{
    *flag = 0;
    return MPI_SUCCESS;
}
int MPI_Finalized(int *flag)
{
    *flag = 0;
    return MPI_SUCCESS;
}
int MPI_Error_string(int code, char *s, int *len)
{
    *len = snprintf(s, MPI_MAX_ERROR_STRING, "no MPI in this standalone build (code %d)", code);
    return MPI_SUCCESS;
}
/* Each call below fails with MPI_ERR_OTHER. */
#define FAIL(signature)                                                                            \
    signature                                                                                      \
    {                                                                                              \
        return MPI_ERR_OTHER;                                                                      \
    }
FAIL(int MPI_Comm_rank(MPI_Comm c, int *r))
FAIL(int MPI_Comm_size(MPI_Comm c, int *n))
FAIL(int MPI_Comm_dup(MPI_Comm c, MPI_Comm *out))
FAIL(int MPI_Comm_split(MPI_Comm c, int color, int key, MPI_Comm *out))
FAIL(int MPI_Comm_free(MPI_Comm *c))
FAIL(int MPI_Comm_set_errhandler(MPI_Comm c, MPI_Errhandler h))
FAIL(int MPI_Barrier(MPI_Comm c))
FAIL(int MPI_Bcast(void *b, int n, MPI_Datatype t, int root, MPI_Comm c))
FAIL(int MPI_Allreduce(const void *s, void *r, int n, MPI_Datatype t, MPI_Op op, MPI_Comm c))
FAIL(int MPI_Allgather(const void *s, int sn, MPI_Datatype st, void *r, int rn, MPI_Datatype rt,
                       MPI_Comm c))
FAIL(int MPI_Type_contiguous(int n, MPI_Datatype t, MPI_Datatype *out))
FAIL(int MPI_Type_create_resized(MPI_Datatype t, MPI_Aint lb, MPI_Aint extent, MPI_Datatype *out))
FAIL(int MPI_Type_commit(MPI_Datatype *t))
FAIL(int MPI_Type_free(MPI_Datatype *t))

/* ---- BLAS, row-major only (shard/'s use) ---- */
void cblas_sgemm(enum CBLAS_ORDER o, enum CBLAS_TRANSPOSE ta, enum CBLAS_TRANSPOSE tb, int M, int N,
                 int K, float alpha, const float *A, int lda, const float *B, int ldb, float beta,
                 float *C, int ldc)
{
    (void)o;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double s = 0;
            for (int k = 0; k < K; k++)
                s += (double)(ta == CblasNoTrans ? A[i * lda + k] : A[k * lda + i]) *
                     (tb == CblasNoTrans ? B[k * ldb + j] : B[j * ldb + k]);
            C[i * ldc + j] = (float)(alpha * s + (beta != 0 ? beta * C[i * ldc + j] : 0));
        }
}
void cblas_sgemv(enum CBLAS_ORDER o, enum CBLAS_TRANSPOSE t, int M, int N, float alpha,
                 const float *A, int lda, const float *x, int incx, float beta, float *y, int incy)
{
    (void)o;
    int rows = t == CblasNoTrans ? M : N, cols = t == CblasNoTrans ? N : M;
    for (int i = 0; i < rows; i++) {
        double s = 0;
        for (int k = 0; k < cols; k++)
            s += (double)(t == CblasNoTrans ? A[i * lda + k] : A[k * lda + i]) * x[k * incx];
        y[i * incy] = (float)(alpha * s + (beta != 0 ? beta * y[i * incy] : 0));
    }
}

/* ---- cJSON: nothing parses, nothing is built ---- */
cJSON *cJSON_Parse(const char *s)
{
    (void)s;
    return NULL;
}
cJSON *cJSON_ParseWithLength(const char *s, size_t n)
{
    (void)s, (void)n;
    return NULL;
}
void cJSON_Delete(cJSON *j)
{
    (void)j;
}
char *cJSON_PrintUnformatted(const cJSON *j)
{
    (void)j;
    return NULL;
}
void cJSON_free(void *p)
{
    free(p);
}
cJSON *cJSON_CreateObject(void)
{
    return NULL;
}
cJSON *cJSON_CreateNumber(double v)
{
    (void)v;
    return NULL;
}
#define NONE(ret, name, ...)                                                                       \
    ret name(__VA_ARGS__)                                                                          \
    {                                                                                              \
        return 0;                                                                                  \
    }
NONE(cJSON *, cJSON_AddArrayToObject, cJSON *o, const char *k)
NONE(cJSON *, cJSON_AddObjectToObject, cJSON *o, const char *k)
NONE(cJSON *, cJSON_AddNumberToObject, cJSON *o, const char *k, double v)
NONE(cJSON *, cJSON_AddStringToObject, cJSON *o, const char *k, const char *v)
NONE(cJSON_bool, cJSON_AddItemToArray, cJSON *a, cJSON *i)
NONE(cJSON_bool, cJSON_AddItemToObject, cJSON *o, const char *k, cJSON *i)
NONE(cJSON *, cJSON_GetArrayItem, const cJSON *a, int i)
NONE(int, cJSON_GetArraySize, const cJSON *a)
NONE(cJSON *, cJSON_GetObjectItemCaseSensitive, const cJSON *o, const char *k)
NONE(cJSON_bool, cJSON_IsArray, const cJSON *j)
NONE(cJSON_bool, cJSON_IsBool, const cJSON *j)
NONE(cJSON_bool, cJSON_IsNumber, const cJSON *j)
NONE(cJSON_bool, cJSON_IsObject, const cJSON *j)
NONE(cJSON_bool, cJSON_IsString, const cJSON *j)
NONE(cJSON_bool, cJSON_IsTrue, const cJSON *j)
