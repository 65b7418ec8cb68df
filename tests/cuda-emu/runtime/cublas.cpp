/* cublas.cpp: cublas_v2.h as reference loops. A GEMM's operands are read
 * through the harness's view of device memory: each must lie in a live
 * allocation (else the call fails as an illegal address would), and the
 * columns it reads must have been written (else an initialisation
 * report). Runs on the stream's order, or into a graph being captured. */
#include "emu_internal.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdlib.h>
#include <string.h>

struct cublasContext {
    cudaStream_t stream;
};

namespace qs_emu
{
namespace
{

size_t type_size(cudaDataType_t t)
{
    switch (t) {
    case CUDA_R_16F:
    case CUDA_R_16BF:
        return 2;
    case CUDA_R_32F:
    case CUDA_R_32I:
        return 4;
    case CUDA_R_64F:
        return 8;
    case CUDA_R_8I:
        return 1;
    }
    return 0;
}

double load(const void *p, cudaDataType_t t, size_t i)
{
    switch (t) {
    case CUDA_R_16F:
        return qs_emu_h2f(((const uint16_t *)p)[i]);
    case CUDA_R_16BF:
        return qs_emu_bf2f(((const uint16_t *)p)[i]);
    case CUDA_R_32F:
        return ((const float *)p)[i];
    case CUDA_R_64F:
        return ((const double *)p)[i];
    case CUDA_R_8I:
        return ((const int8_t *)p)[i];
    case CUDA_R_32I:
        return ((const int32_t *)p)[i];
    }
    return 0;
}

void store(void *p, cudaDataType_t t, size_t i, double v)
{
    switch (t) {
    case CUDA_R_16F:
        ((uint16_t *)p)[i] = qs_emu_f2h_rn((float)v);
        break;
    case CUDA_R_16BF:
        ((uint16_t *)p)[i] = qs_emu_f2bf_rn((float)v);
        break;
    case CUDA_R_32F:
        ((float *)p)[i] = (float)v;
        break;
    case CUDA_R_64F:
        ((double *)p)[i] = v;
        break;
    case CUDA_R_8I:
        ((int8_t *)p)[i] = (int8_t)v;
        break;
    case CUDA_R_32I:
        ((int32_t *)p)[i] = (int32_t)v;
        break;
    }
}

struct gemm_args {
    cublasOperation_t ta, tb;
    int m, n, k, lda, ldb, ldc;
    double alpha, beta;
    const void *A, *B;
    void *C;
    cudaDataType_t at, bt, ct;
    cublasComputeType_t compute;
};

/* Bytes a column-major operand spans: cols columns of `rows` at stride ld. */
size_t span(int rows, int cols, int ld, size_t es)
{
    return ((size_t)(cols - 1) * (size_t)ld + (size_t)rows) * es;
}

bool columns_written(const void *p, int rows, int cols, int ld, size_t es)
{
    for (int c = 0; c < cols; c++) {
        const uint8_t *s = g_dev_shadow + ((uintptr_t)p - g_dev_base) + (size_t)c * ld * es;
        for (size_t i = 0; i < (size_t)rows * es; i++)
            if (s[i] != SH_INIT)
                return false;
    }
    return true;
}

cudaError_t gemm_op(void *blob)
{
    const gemm_args &g = *(const gemm_args *)blob;
    const int ar = g.ta == CUBLAS_OP_N ? g.m : g.k, ac = g.ta == CUBLAS_OP_N ? g.k : g.m;
    const int br = g.tb == CUBLAS_OP_N ? g.k : g.n, bc = g.tb == CUBLAS_OP_N ? g.n : g.k;
    /* The shadow follows device stores only where device code is
     * instrumented (not in the ASan build): check it only then. */
    const char *unwritten = !g_hooks                                                ? NULL
                            : !columns_written(g.A, ar, ac, g.lda, type_size(g.at)) ? "A"
                            : !columns_written(g.B, br, bc, g.ldb, type_size(g.bt)) ? "B"
                            : g.beta != 0 && !columns_written(g.C, g.m, g.n, g.ldc, type_size(g.ct))
                                ? "C"
                                : NULL;
    if (unwritten)
        report_msg(QS_EMU_UNINIT_GLOBAL,
                   "cublasGemmEx reads operand %s (at %p), which has elements nothing has written",
                   unwritten,
                   unwritten[0] == 'A'   ? g.A
                   : unwritten[0] == 'B' ? g.B
                                         : (void *)g.C);
    /* op(A) as m x k and op(B) as k x n in the compute type's precision. */
    const bool fp = g.compute != CUBLAS_COMPUTE_32I, dbl = g.compute == CUBLAS_COMPUTE_64F;
    std::vector<double> a((size_t)g.m * g.k), b((size_t)g.k * g.n);
    for (int i = 0; i < g.m; i++)
        for (int l = 0; l < g.k; l++)
            a[(size_t)i * g.k + l] = load(g.A, g.at,
                                          g.ta == CUBLAS_OP_N ? (size_t)i + (size_t)l * g.lda
                                                              : (size_t)l + (size_t)i * g.lda);
    for (int l = 0; l < g.k; l++)
        for (int j = 0; j < g.n; j++)
            b[(size_t)j * g.k + l] = load(g.B, g.bt,
                                          g.tb == CUBLAS_OP_N ? (size_t)l + (size_t)j * g.ldb
                                                              : (size_t)j + (size_t)l * g.ldb);
    for (int j = 0; j < g.n; j++)
        for (int i = 0; i < g.m; i++) {
            const double *ai = &a[(size_t)i * g.k], *bj = &b[(size_t)j * g.k];
            double r;
            if (!fp) {
                int64_t s = 0;
                for (int l = 0; l < g.k; l++)
                    s += (int64_t)ai[l] * (int64_t)bj[l];
                r = (double)(int32_t)s;
            } else if (dbl) {
                double s = 0;
                for (int l = 0; l < g.k; l++)
                    s = fma(ai[l], bj[l], s);
                r = s;
            } else {
                float s = 0;
                for (int l = 0; l < g.k; l++)
                    s = fmaf((float)ai[l], (float)bj[l], s);
                r = s;
            }
            size_t ci = (size_t)i + (size_t)j * g.ldc;
            double v = g.alpha * r + (g.beta != 0 ? g.beta * load(g.C, g.ct, ci) : 0.0);
            store(g.C, g.ct, ci, v);
        }
    for (int j = 0; j < g.n; j++)
        dev_mark_init((char *)g.C + (size_t)j * g.ldc * type_size(g.ct),
                      (size_t)g.m * type_size(g.ct));
    return cudaSuccess;
}

double scalar(const void *p, cublasComputeType_t c)
{
    switch (c) {
    case CUBLAS_COMPUTE_16F:
    case CUBLAS_COMPUTE_16F_PEDANTIC:
        return qs_emu_h2f(*(const uint16_t *)p);
    case CUBLAS_COMPUTE_64F:
        return *(const double *)p;
    case CUBLAS_COMPUTE_32I:
        return *(const int32_t *)p;
    default:
        return *(const float *)p;
    }
}

cublasStatus_t bad(const char *fmt, const char *what)
{
    report_msg(QS_EMU_API, fmt, what);
    return CUBLAS_STATUS_INVALID_VALUE;
}

} /* namespace */
} /* namespace qs_emu */

using namespace qs_emu;

extern "C" cublasStatus_t cublasCreate(cublasHandle_t *h)
{
    if (!h)
        return CUBLAS_STATUS_INVALID_VALUE;
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || !n)
        return *h = NULL, CUBLAS_STATUS_NOT_INITIALIZED;
    *h = new cublasContext{NULL};
    return CUBLAS_STATUS_SUCCESS;
}

extern "C" cublasStatus_t cublasDestroy(cublasHandle_t h)
{
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

extern "C" cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s)
{
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    h->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}

extern "C" cublasStatus_t cublasGetStream(cublasHandle_t h, cudaStream_t *s)
{
    if (!h || !s)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    *s = h->stream;
    return CUBLAS_STATUS_SUCCESS;
}

extern "C" const char *cublasGetStatusName(cublasStatus_t s)
{
    switch (s) {
    case CUBLAS_STATUS_SUCCESS:
        return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
        return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED:
        return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE:
        return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH:
        return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR:
        return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED:
        return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR:
        return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED:
        return "CUBLAS_STATUS_NOT_SUPPORTED";
    }
    return "CUBLAS_STATUS_UNKNOWN";
}

extern "C" const char *cublasGetStatusString(cublasStatus_t s)
{
    switch (s) {
    case CUBLAS_STATUS_SUCCESS:
        return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED:
        return "the library was not initialized";
    case CUBLAS_STATUS_INVALID_VALUE:
        return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_EXECUTION_FAILED:
        return "the GPU program failed to execute";
    case CUBLAS_STATUS_NOT_SUPPORTED:
        return "the functionality requested is not supported";
    default:
        return cublasGetStatusName(s);
    }
}

extern "C" cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                                       int m, int n, int k, const void *alpha, const void *A,
                                       cudaDataType_t at, int lda, const void *B, cudaDataType_t bt,
                                       int ldb, const void *beta, void *C, cudaDataType_t ct,
                                       int ldc, cublasComputeType_t compute, cublasGemmAlgo_t algo)
{
    std::lock_guard<std::recursive_mutex> lk(g_device_lock);
    (void)algo;
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    if (sticky() != cudaSuccess)
        return CUBLAS_STATUS_EXECUTION_FAILED;
    if (m < 0 || n < 0 || k < 0 || !alpha || !beta || ta == CUBLAS_OP_C || tb == CUBLAS_OP_C)
        return bad("%s: negative size, NULL scalar or an operation the emulator lacks",
                   "cublasGemmEx");
    if (!type_size(at) || !type_size(bt) || !type_size(ct))
        return bad("%s: a data type the emulator lacks", "cublasGemmEx");
    const int ar = ta == CUBLAS_OP_N ? m : k, ac = ta == CUBLAS_OP_N ? k : m;
    const int br = tb == CUBLAS_OP_N ? k : n, bc = tb == CUBLAS_OP_N ? n : k;
    if (lda < (ar > 1 ? ar : 1) || ldb < (br > 1 ? br : 1) || ldc < (m > 1 ? m : 1))
        return bad("%s: a leading dimension below its operand's rows", "cublasGemmEx");
    if (!m || !n)
        return CUBLAS_STATUS_SUCCESS;
    std::string why;
    const char *which = NULL;
    if (k && !dev_range(A, span(ar, ac, lda, type_size(at)), &why))
        which = "A";
    else if (k && !dev_range(B, span(br, bc, ldb, type_size(bt)), &why))
        which = "B";
    else if (!dev_range(C, span(m, n, ldc, type_size(ct)), &why))
        which = "C";
    if (which) {
        report_msg(QS_EMU_OOB_GLOBAL, "cublasGemmEx: operand %s at %p: %s", which,
                   which[0] == 'A'   ? A
                   : which[0] == 'B' ? B
                                     : (const void *)C,
                   why.c_str());
        set_sticky(cudaErrorIllegalAddress);
        return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    gemm_args g = {
        ta, tb, m, n,  k,  lda, ldb,    ldc, scalar(alpha, compute), scalar(beta, compute),
        A,  B,  C, at, bt, ct,  compute};
    cudaError_t e = enqueue(h->stream, gemm_op, &g, sizeof g, "cublasGemmEx");
    return e == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}

extern "C" cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                                      int m, int n, int k, const float *alpha, const float *A,
                                      int lda, const float *B, int ldb, const float *beta, float *C,
                                      int ldc)
{
    return cublasGemmEx(h, ta, tb, m, n, k, alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb, beta, C,
                        CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}
