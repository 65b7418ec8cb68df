/* cblas.h (standalone GPU build): the two BLAS calls shard/'s CPU
 * operations make, as plain loops, for GPU machines without OpenBLAS. A
 * GPU model never calls them; they are correct, and slow. */
#ifndef QS_STANDALONE_CBLAS_H
#define QS_STANDALONE_CBLAS_H
enum CBLAS_ORDER { CblasRowMajor = 101, CblasColMajor = 102 };
enum CBLAS_TRANSPOSE { CblasNoTrans = 111, CblasTrans = 112 };
void cblas_sgemm(enum CBLAS_ORDER o, enum CBLAS_TRANSPOSE ta, enum CBLAS_TRANSPOSE tb, int M, int N,
                 int K, float alpha, const float *A, int lda, const float *B, int ldb, float beta,
                 float *C, int ldc);
void cblas_sgemv(enum CBLAS_ORDER o, enum CBLAS_TRANSPOSE t, int M, int N, float alpha,
                 const float *A, int lda, const float *x, int incx, float beta, float *y, int incy);
#endif
