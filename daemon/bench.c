/* Bench: kernel timings on the daemon's own devices. Each rank asked (the
 * first `gpus`, or all) quantizes random weights of each shape and times the
 * quantized kernel against the fp32 BLAS baseline on the same inputs, median
 * of the iterations. On CPU ranks that is OpenBLAS sgemv/sgemm; ranks on one
 * node share its cores, so ask for one rank (--gpus 1) for clean numbers.
 * One weight copy is timed again and again, so shapes that fit the last-level
 * cache flatter the kernels: qbench rotates copies for DRAM-bound figures. */
#define _POSIX_C_SOURCE 200809L
#include "qs_daemon.h"
#include "qs_shard.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>

static int by_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct weights {
    qs_scheme scheme;
    qs_bcq bcq;
    qs_w8 w8;
    qs_w4 w4;
} weights;

static int run_kernel(const weights *w, const float *X, size_t M, float *Y)
{
    return w->scheme == QS_SCHEME_W8A8   ? qs_w8a8_gemm(&w->w8, X, M, 0.0f, Y)
           : w->scheme == QS_SCHEME_W4A4 ? qs_w4a4_gemm(&w->w4, X, M, Y)
                                         : qs_lutgemm(&w->bcq, X, M, Y);
}

static void run_blas(const float *W, size_t N, size_t K, const float *X, size_t M, float *Y)
{
    if (M == 1)
        cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)N, (int)K, 1.0f, W, (int)K, X, 1, 0.0f, Y, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)N, (int)K, 1.0f, X,
                    (int)K, W, (int)K, 0.0f, Y, (int)N);
}

/* Median microseconds of `iters` calls (one untimed call first). */
static double median_us(const weights *w, const float *W, size_t N, size_t K, const float *X,
                        size_t M, float *Y, unsigned iters, int *err)
{
    double *t = malloc(iters * sizeof *t);
    if (!t) {
        *err = qs_seterr(QS_ENOMEM, "out of memory timing");
        return 0;
    }
    for (unsigned i = 0; i <= iters && !*err; i++) {
        double t0 = qs_now();
        if (w)
            *err = run_kernel(w, X, M, Y);
        else
            run_blas(W, N, K, X, M, Y);
        if (i)
            t[i - 1] = (qs_now() - t0) * 1e6;
    }
    qsort(t, iters, sizeof *t, by_double);
    double m = t[iters / 2];
    free(t);
    return m;
}

int qs_run_bench(qs_daemon *d, const qs_cmd *cmd, qs_buf *out)
{
    const Qshard__V1__BenchRequest *r = (const void *)cmd->req;
    if (r->gpus && (uint32_t)d->rank >= r->gpus)
        return QS_OK;
    qs_quant q;
    int err = qs_quant_resolve(r->quant, NULL, &q);
    if (err)
        return err;
    /* OPT-175B's layer shapes: q/k/v/o, fc2 and fc1 (N x K). */
    static const uint32_t dflt[][2] = {{12288, 12288}, {12288, 49152}, {49152, 12288}};
    size_t nshapes = r->n_shapes ? r->n_shapes : sizeof dflt / sizeof dflt[0];
    size_t M = r->batch ? r->batch : 1;
    unsigned iters = r->iterations ? r->iterations : 20;
    Qshard__V1__BenchResult *res = calloc(nshapes, sizeof *res);
    Qshard__V1__BenchResult **rp = calloc(nshapes, sizeof *rp);
    Qshard__V1__Shape *shp = calloc(nshapes, sizeof *shp);
    if (!res || !rp || !shp) {
        free(res), free(rp), free(shp);
        return qs_seterr(QS_ENOMEM, "out of memory");
    }
    size_t done = 0;
    for (size_t i = 0; i < nshapes && !err; i++) {
        size_t N = r->n_shapes ? r->shapes[i]->m : dflt[i][0];
        size_t K = r->n_shapes ? r->shapes[i]->k : dflt[i][1];
        float *W = malloc(N * K * sizeof *W), *X = malloc(M * K * sizeof *X);
        float *Y = malloc(M * N * sizeof *Y);
        weights w = {.scheme = q.scheme};
        if (!W || !X || !Y) {
            err = qs_seterr(QS_ENOMEM,
                            "out of memory for a %zux%zu benchmark: ask for smaller "
                            "shapes",
                            N, K);
        } else {
            uint64_t s = 0x9e3779b97f4a7c15ull ^ (N * 31 + K);
            for (size_t j = 0; j < N * K; j++) {
                s = s * 6364136223846793005ull + 1442695040888963407ull;
                W[j] = ((float)(s >> 40) / 16777216.0f - 0.5f) * 0.04f;
            }
            for (size_t j = 0; j < M * K; j++)
                X[j] = (float)((j * 7919) % 1000) / 1000.0f - 0.5f;
            if (q.scheme == QS_SCHEME_W8A8)
                err = qs_w8_quantize(&w.w8, W, N, K, q.group_size);
            else if (q.scheme == QS_SCHEME_W4A4) /* the last channels as the outliers */
                err = qs_w4_quantize(&w.w4, W, N, K, NULL, q.outliers < K ? q.outliers : K,
                                     q.group_size ? q.group_size : (K + 7) / 8 * 8);
            else if (q.scheme != QS_SCHEME_FP16)
                err = qs_bcq_from_rtn(&w.bcq, W, N, K, (unsigned)q.bits, q.group_size);
        }
        double fp = err ? 0 : median_us(NULL, W, N, K, X, M, Y, iters, &err);
        double qt =
            err || q.scheme == QS_SCHEME_FP16 ? fp : median_us(&w, W, N, K, X, M, Y, iters, &err);
        if (!err) {
            qshard__v1__shape__init(&shp[done]);
            shp[done].m = (uint32_t)N;
            shp[done].k = (uint32_t)K;
            Qshard__V1__BenchResult *b = &res[done];
            qshard__v1__bench_result__init(b);
            b->shape = &shp[done];
            b->rank = (uint32_t)d->rank;
            b->device = d->dev.name;
            b->kernel = q.scheme == QS_SCHEME_W8A8   ? "w8a8 int8 (CPU)"
                        : q.scheme == QS_SCHEME_W4A4 ? "w4a4 int4 + int8 outliers (CPU)"
                        : q.scheme == QS_SCHEME_FP16 ? "fp32 BLAS (CPU)"
                                                     : "LUT-GEMM (CPU)";
            b->quant_us = qt;
            b->fp16_us = fp;
            b->speedup = qt > 0 ? fp / qt : 0;
            size_t bb = 0, ab = 0, zb = 0;
            if (q.scheme == QS_SCHEME_W8A8)
                bb = qs_w8_bytes(N, K, q.group_size);
            else if (q.scheme == QS_SCHEME_W4A4)
                bb = qs_w4_bytes(N, K, w.w4.ko, w.w4.group);
            else if (q.scheme == QS_SCHEME_FP16)
                bb = N * K * 2;
            else
                qs_bcq_sizes(N, K, (unsigned)q.bits, q.group_size, &bb, &ab, &zb);
            b->weight_bytes = bb + ab + zb;
            rp[done] = b;
            done++;
        }
        qs_bcq_close(&w.bcq);
        qs_w8_close(&w.w8);
        qs_w4_close(&w.w4);
        free(W), free(X), free(Y);
    }
    if (!err) {
        Qshard__V1__BenchReply rep = QSHARD__V1__BENCH_REPLY__INIT;
        rep.n_results = done;
        rep.results = rp;
        out->data = qs_proto_pack_bytes(&rep.base, &out->len);
        if (!out->data)
            err = qs_seterr(QS_ENOMEM, "out of memory");
    }
    free(res), free(rp), free(shp);
    return err;
}

/* Rank 0: every rank's results, in rank order. */
int qs_reply_bench(qs_daemon *d, const qs_cmd *cmd, const qs_part *parts, double seconds,
                   grpc_byte_buffer **reply)
{
    (void)cmd, (void)seconds;
    Qshard__V1__BenchReply all = QSHARD__V1__BENCH_REPLY__INIT;
    Qshard__V1__BenchReply **per = calloc((size_t)d->world, sizeof *per);
    size_t n = 0;
    for (int i = 0; per && i < d->world; i++)
        if (parts[i].len &&
            (per[i] = qshard__v1__bench_reply__unpack(NULL, parts[i].len, parts[i].data)))
            n += per[i]->n_results;
    all.results = calloc(n + 1, sizeof *all.results);
    for (int i = 0; per && all.results && i < d->world; i++)
        for (size_t j = 0; per[i] && j < per[i]->n_results; j++)
            all.results[all.n_results++] = per[i]->results[j];
    *reply = per && all.results ? qs_proto_pack(&all.base) : NULL;
    for (int i = 0; per && i < d->world; i++)
        if (per[i])
            qshard__v1__bench_reply__free_unpacked(per[i], NULL);
    free(per);
    free(all.results);
    return *reply ? QS_OK : qs_seterr(QS_ENOMEM, "out of memory");
}
