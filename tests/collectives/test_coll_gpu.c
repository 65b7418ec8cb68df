/* The device path under mpirun: NCCL on an MPI communicator (one GPU per
 * rank), the single-rank device copies, a split that inherits the device, and
 * a caller-supplied stream. Skips (77) with the CUDA error where there is no
 * GPU, with the reason where there are fewer GPUs than ranks (NCCL refuses two
 * ranks on one GPU), and in a build without CUDA after checking that device
 * buffers are refused with QS_ENOTSUP. */
#include "coll_test_util.h"

#include <math.h>
#include <mpi.h>
#include <stdlib.h>

#ifdef QS_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

static int world_rank;

#ifdef QS_HAVE_CUDA
static int failures;

/* One line per failure (ranks interleave), with the library's last message. */
#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            char what_[512];                                                                       \
            snprintf(what_, sizeof what_, __VA_ARGS__);                                            \
            failures++;                                                                            \
            fprintf(stderr, "rank %d: FAIL %s:%d: %s [last error: %s]\n", world_rank, __FILE__,    \
                    __LINE__, what_, qs_errmsg());                                                 \
        }                                                                                          \
    } while (0)
#endif

/* Every rank skips together, so mpirun reports 77. */
static int skip(const char *why)
{
    if (world_rank == 0)
        printf("SKIP: %s\n", why);
    MPI_Finalize();
    return 77;
}

#ifdef QS_HAVE_CUDA
#define CUDA_OK(call)                                                                              \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "rank %d: %s: CUDA error %d (%s)\n", world_rank, #call, (int)e_,       \
                    cudaGetErrorString(e_));                                                       \
            MPI_Abort(MPI_COMM_WORLD, 1);                                                          \
        }                                                                                          \
    } while (0)

/* fp16 on NCCL is summed in fp16 step by step, so beyond two ranks it may
 * differ from the host's round-once result by an ulp per step. */
static long f16_diff(const uint16_t *got, const uint16_t *ref, size_t n, int nranks)
{
    for (size_t i = 0; i < n; i++) {
        float g = qs_coll_f16_to_f32(got[i]), r = qs_coll_f16_to_f32(ref[i]);
        float tol = nranks <= 2 ? 0.0f : (float)(nranks - 1) * fabsf(r) * 0x1p-10f + 0x1p-10f;
        if (!(fabsf(g - r) <= tol))
            return (long)i;
    }
    return -1;
}

static void device_suite(qs_comm *c, const char *tag)
{
    static const size_t sizes[] = {0, 1, 3, 1000003};
    static const qs_coll_dtype dts[] = {QS_COLL_F32, QS_COLL_F16, QS_COLL_I32};
    int rank = qs_comm_rank(c), size = qs_comm_size(c);
    for (size_t s = 0; s < 4; s++) {
        size_t n = sizes[s];
        for (size_t t = 0; t < 3; t++) {
            qs_coll_dtype dt = dts[t];
            size_t es = qs_coll_dtype_size(dt), bytes = n * es, total = bytes * (size_t)size;
            char *h = malloc(total + 1), *ref = malloc(total + 1), *got = malloc(total + 1);
            void *din = NULL, *dout = NULL;
            CUDA_OK(cudaMalloc(&din, bytes + 1));
            CUDA_OK(cudaMalloc(&dout, total + 1));

            /* all-reduce, out of place then in place */
            fill(dt, rank, h, n);
            ref_sum(dt, size, ref, n);
            CUDA_OK(cudaMemcpy(din, h, bytes, cudaMemcpyHostToDevice));
            int err = qs_comm_allreduce_sum(c, din, dout, n, dt, QS_COLL_DEVICE);
            CHECK(err == QS_OK && qs_comm_sync(c) == QS_OK, "%s allreduce %s n=%zu", tag,
                  dt_name(dt), n);
            CUDA_OK(cudaMemcpy(got, dout, bytes, cudaMemcpyDeviceToHost));
            long d = dt == QS_COLL_F16 ? f16_diff((uint16_t *)got, (uint16_t *)ref, n, size)
                                       : first_diff(dt, got, ref, n);
            CHECK(d < 0, "%s allreduce %s n=%zu: first diff at %ld", tag, dt_name(dt), n, d);
            err = qs_comm_allreduce_sum(c, din, din, n, dt, QS_COLL_DEVICE);
            CHECK(err == QS_OK && qs_comm_sync(c) == QS_OK, "%s allreduce in place", tag);
            CUDA_OK(cudaMemcpy(got, din, bytes, cudaMemcpyDeviceToHost));
            d = dt == QS_COLL_F16 ? f16_diff((uint16_t *)got, (uint16_t *)ref, n, size)
                                  : first_diff(dt, got, ref, n);
            CHECK(d < 0, "%s allreduce in place %s n=%zu: first diff at %ld", tag, dt_name(dt), n,
                  d);

            /* all-gather, out of place then in place */
            ref_gather(dt, size, ref, n);
            CUDA_OK(cudaMemcpy(din, h, bytes, cudaMemcpyHostToDevice));
            err = qs_comm_allgather(c, din, dout, n, dt, QS_COLL_DEVICE);
            CHECK(err == QS_OK && qs_comm_sync(c) == QS_OK, "%s allgather", tag);
            CUDA_OK(cudaMemcpy(got, dout, total, cudaMemcpyDeviceToHost));
            d = first_diff(dt, got, ref, n * (size_t)size);
            CHECK(d < 0, "%s allgather %s n=%zu: first diff at %ld", tag, dt_name(dt), n, d);
            CUDA_OK(cudaMemset(dout, 0, total + 1));
            char *mine = (char *)dout + (size_t)rank * bytes;
            CUDA_OK(cudaMemcpy(mine, h, bytes, cudaMemcpyHostToDevice));
            err = qs_comm_allgather(c, mine, dout, n, dt, QS_COLL_DEVICE);
            CHECK(err == QS_OK && qs_comm_sync(c) == QS_OK, "%s allgather in place", tag);
            CUDA_OK(cudaMemcpy(got, dout, total, cudaMemcpyDeviceToHost));
            d = first_diff(dt, got, ref, n * (size_t)size);
            CHECK(d < 0, "%s allgather in place %s n=%zu: first diff at %ld", tag, dt_name(dt), n,
                  d);

            /* broadcast from the last rank */
            int root = size - 1;
            fill(dt, root + 100, ref, n);
            if (rank == root)
                CUDA_OK(cudaMemcpy(dout, ref, bytes, cudaMemcpyHostToDevice));
            else
                CUDA_OK(cudaMemset(dout, 0xEF, bytes + 1));
            err = qs_comm_bcast(c, dout, n, dt, root, QS_COLL_DEVICE);
            CHECK(err == QS_OK && qs_comm_sync(c) == QS_OK, "%s bcast", tag);
            CUDA_OK(cudaMemcpy(got, dout, bytes, cudaMemcpyDeviceToHost));
            d = first_diff(dt, got, ref, n);
            CHECK(d < 0, "%s bcast %s n=%zu: first diff at %ld", tag, dt_name(dt), n, d);

            CUDA_OK(cudaFree(din));
            CUDA_OK(cudaFree(dout));
            free(h);
            free(ref);
            free(got);
        }
    }
}
#endif

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    int world_size;
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);

#ifndef QS_HAVE_CUDA
    /* No CUDA in the build: device buffers must be refused, clearly. */
    qs_comm *c = NULL;
    qs_comm_init_single(&c);
    float x = 0;
    int err = qs_comm_enable_device(c, 0, NULL);
    int err2 = qs_comm_allreduce_sum(c, &x, &x, 1, QS_COLL_F32, QS_COLL_DEVICE);
    qs_comm_close(c);
    if (err != QS_ENOTSUP || err2 != QS_ENOTSUP) {
        fprintf(stderr, "FAIL: device buffers in a build without CUDA gave %d/%d, not ENOTSUP\n",
                err, err2);
        MPI_Finalize();
        return 1;
    }
    return skip("this build has no CUDA (QS_HAVE_CUDA off): device buffers are refused with "
                "QS_ENOTSUP as they should be");
#else
    int ndev = 0;
    cudaError_t e = cudaGetDeviceCount(&ndev);
    char why[256];
    if (e != cudaSuccess || ndev == 0) {
        snprintf(why, sizeof why, "no usable CUDA device: CUDA error %d (%s)", (int)e,
                 cudaGetErrorString(e));
        return skip(why);
    }
    if (ndev < world_size) {
        snprintf(why, sizeof why,
                 "NCCL needs one GPU per rank: %d ranks but %d GPU(s) on this machine", world_size,
                 ndev);
        return skip(why);
    }
    double t0 = MPI_Wtime();

    /* NCCL over the world, the device picked as the daemon does (rank). */
    qs_comm *world = NULL;
    CHECK(qs_comm_init_mpi(MPI_COMM_WORLD, &world) == QS_OK, "init_mpi");
    int err = qs_comm_enable_device(world, world_rank % ndev, NULL);
    CHECK(err == QS_OK, "enable_device on the world");
    if (err != QS_OK) {
        qs_comm_close(world);
        MPI_Finalize();
        return 1;
    }
    CHECK(qs_comm_device(world) == world_rank % ndev && qs_comm_stream(world),
          "device and owned stream");
    CHECK(qs_comm_enable_device(world, 0, NULL) == QS_EBUSY, "enable twice");
    device_suite(world, "world");

    /* Children inherit the device: even/odd groups and rank 0 alone. */
    qs_comm *half = NULL;
    CHECK(qs_comm_split(world, world_rank % 2, world_rank, &half) == QS_OK && half, "split");
    if (half) {
        CHECK(qs_comm_device(half) == qs_comm_device(world), "child device");
        device_suite(half, "even/odd");
        qs_comm_close(half);
    }
    qs_comm *solo = NULL;
    CHECK(qs_comm_split(world, world_rank == 0 ? 0 : -1, 0, &solo) == QS_OK, "split solo");
    if (solo) {
        device_suite(solo, "solo");
        qs_comm_close(solo);
    }
    CHECK(qs_comm_close(world) == QS_OK, "close world");

    /* One rank without MPI underneath, on a stream the caller owns. */
    cudaStream_t s;
    CUDA_OK(cudaSetDevice(world_rank % ndev));
    CUDA_OK(cudaStreamCreate(&s));
    qs_comm *single = NULL;
    CHECK(qs_comm_init_single(&single) == QS_OK, "init_single");
    CHECK(qs_comm_enable_device(single, -1, s) == QS_OK, "enable_device on a single rank");
    CHECK(qs_comm_stream(single) == (void *)s, "the caller's stream is used");
    device_suite(single, "single");
    CHECK(qs_comm_close(single) == QS_OK, "close single");
    CUDA_OK(cudaStreamDestroy(s));

    int total = 0;
    MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (world_rank == 0)
        printf("test_coll_gpu: %d ranks on %d GPU(s), %d failures, %.2f s\n", world_size, ndev,
               total, MPI_Wtime() - t0);
    MPI_Finalize();
    return total ? 1 : 0;
#endif
}
