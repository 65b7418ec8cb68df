/* The MPI back end under mpirun (-np 1, 2, 4): every collective on host
 * buffers against a serial result each rank computes alone, for fp32, fp16,
 * int32 and bytes, sizes 0, 1, 3 and 1000003, in and out of place, with the
 * default and tiny chunk limits, on the world, on even/odd groups, on a
 * reversed-key split and on a one-rank subgroup. */
#include "coll_test_util.h"

#include <mpi.h>
#include <stdlib.h>

static int failures;
static int checks;
static int world_rank;

/* One line per failure (ranks interleave), with the library's last message. */
#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        checks++;                                                                                  \
        if (!(cond)) {                                                                             \
            char what_[512];                                                                       \
            snprintf(what_, sizeof what_, __VA_ARGS__);                                            \
            failures++;                                                                            \
            fprintf(stderr, "rank %d: FAIL %s:%d: %s [last error: %s]\n", world_rank, __FILE__,    \
                    __LINE__, what_, qs_errmsg());                                                 \
        }                                                                                          \
    } while (0)

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "rank %d: out of memory (%zu bytes)\n", world_rank, n);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    return p;
}

static void check_allreduce(qs_comm *c, const char *tag, qs_coll_dtype dt, size_t n)
{
    qs_clearerr();
    int rank = qs_comm_rank(c), size = qs_comm_size(c);
    size_t es = qs_coll_dtype_size(dt);
    char *in = xmalloc(n * es), *out = xmalloc(n * es), *ref = xmalloc(n * es);
    ref_sum(dt, size, ref, n);

    fill(dt, rank, in, n);
    memset(out, 0xAB, n * es);
    int err = qs_comm_allreduce_sum(c, in, out, n, dt, QS_COLL_HOST);
    long d = first_diff(dt, out, ref, n);
    CHECK(err == QS_OK && d < 0, "%s allreduce %s n=%zu: err %d, first diff at %ld", tag,
          dt_name(dt), n, err, d);
    /* the input must be left alone */
    char *again = xmalloc(n * es);
    fill(dt, rank, again, n);
    CHECK(first_diff(dt, in, again, n) < 0, "%s allreduce %s n=%zu changed its input", tag,
          dt_name(dt), n);

    err = qs_comm_allreduce_sum(c, in, in, n, dt, QS_COLL_HOST);
    d = first_diff(dt, in, ref, n);
    CHECK(err == QS_OK && d < 0, "%s allreduce in place %s n=%zu: err %d, first diff at %ld", tag,
          dt_name(dt), n, err, d);
    free(in);
    free(out);
    free(ref);
    free(again);
}

static void check_allgather(qs_comm *c, const char *tag, qs_coll_dtype dt, size_t n)
{
    qs_clearerr();
    int rank = qs_comm_rank(c), size = qs_comm_size(c);
    size_t es = qs_coll_dtype_size(dt), total = n * (size_t)size;
    char *in = xmalloc(n * es), *out = xmalloc(total * es), *ref = xmalloc(total * es);
    ref_gather(dt, size, ref, n);

    fill(dt, rank, in, n);
    memset(out, 0xCD, total * es);
    int err = qs_comm_allgather(c, in, out, n, dt, QS_COLL_HOST);
    long d = first_diff(dt, out, ref, total);
    CHECK(err == QS_OK && d < 0, "%s allgather %s n=%zu: err %d, first diff at %ld", tag,
          dt_name(dt), n, err, d);

    memset(out, 0xCD, total * es);
    fill(dt, rank, out + (size_t)rank * n * es, n);
    err = qs_comm_allgather(c, out + (size_t)rank * n * es, out, n, dt, QS_COLL_HOST);
    d = first_diff(dt, out, ref, total);
    CHECK(err == QS_OK && d < 0, "%s allgather in place %s n=%zu: err %d, first diff at %ld", tag,
          dt_name(dt), n, err, d);
    free(in);
    free(out);
    free(ref);
}

static void check_bcast(qs_comm *c, const char *tag, qs_coll_dtype dt, size_t n, int root)
{
    qs_clearerr();
    int rank = qs_comm_rank(c);
    size_t es = qs_coll_dtype_size(dt);
    char *buf = xmalloc(n * es), *ref = xmalloc(n * es);
    fill(dt, root + 100, ref, n);
    if (rank == root)
        memcpy(buf, ref, n * es);
    else
        memset(buf, 0xEF, n * es);
    int err = qs_comm_bcast(c, buf, n, dt, root, QS_COLL_HOST);
    long d = first_diff(dt, buf, ref, n);
    CHECK(err == QS_OK && d < 0, "%s bcast %s n=%zu root=%d: err %d, first diff at %ld", tag,
          dt_name(dt), n, root, err, d);
    free(buf);
    free(ref);
}

static void suite(qs_comm *c, const char *tag)
{
    static const size_t sizes[] = {0, 1, 3, 1000003};
    static const qs_coll_dtype sums[] = {QS_COLL_F32, QS_COLL_F16, QS_COLL_I32};
    static const qs_coll_dtype all[] = {QS_COLL_F32, QS_COLL_F16, QS_COLL_I32, QS_COLL_U8};
    int size = qs_comm_size(c);

    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        size_t n = sizes[s];
        for (size_t t = 0; t < 3; t++)
            check_allreduce(c, tag, sums[t], n);
        for (size_t t = 0; t < 4; t++)
            check_allgather(c, tag, all[t], n);
        check_bcast(c, tag, QS_COLL_F32, n, 0);
        check_bcast(c, tag, QS_COLL_U8, n, size - 1);
    }
    CHECK(qs_comm_barrier(c) == QS_OK, "%s barrier", tag);

    /* Zero length with NULL buffers is a no-op, not an error. */
    CHECK(qs_comm_allreduce_sum(c, NULL, NULL, 0, QS_COLL_F16, QS_COLL_HOST) == QS_OK,
          "%s allreduce n=0 NULL", tag);
    CHECK(qs_comm_allgather(c, NULL, NULL, 0, QS_COLL_F32, QS_COLL_HOST) == QS_OK,
          "%s allgather n=0 NULL", tag);
    CHECK(qs_comm_bcast(c, NULL, 0, QS_COLL_U8, 0, QS_COLL_HOST) == QS_OK, "%s bcast n=0 NULL",
          tag);
}

/* The same collectives cut into many MPI calls: exercises the chunk loops and
 * the stretched receive type of the chunked all-gather. */
static void chunked_suite(qs_comm *c, const char *tag)
{
    static const size_t sizes[] = {1, 3, 7, 8, 1000};
    CHECK(qs_comm_set_max_chunk(c, 7) == QS_OK, "set_max_chunk 7");
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        check_allreduce(c, tag, QS_COLL_F32, sizes[s]);
        check_allreduce(c, tag, QS_COLL_F16, sizes[s]);
        check_allgather(c, tag, QS_COLL_F32, sizes[s]);
        check_allgather(c, tag, QS_COLL_U8, sizes[s]);
        check_bcast(c, tag, QS_COLL_I32, sizes[s], qs_comm_size(c) - 1);
    }
    /* Chunks around the fp16 scratch size (65536) and a ragged end. */
    CHECK(qs_comm_set_max_chunk(c, 65537) == QS_OK, "set_max_chunk 65537");
    check_allreduce(c, tag, QS_COLL_F16, 1000003);
    check_allgather(c, tag, QS_COLL_F16, 200003);
    CHECK(qs_comm_set_max_chunk(c, (size_t)1 << 31) == QS_EINVAL, "max_chunk above INT_MAX");
    CHECK(qs_comm_set_max_chunk(c, 0) == QS_EINVAL, "max_chunk 0");
    CHECK(qs_comm_set_max_chunk(c, 2147483647) == QS_OK, "max_chunk INT_MAX");
}

/* Argument errors are caught before any communication, on every rank. */
static void errors(qs_comm *c)
{
    float x[4] = {0};
    CHECK(qs_comm_allreduce_sum(c, NULL, x, 4, QS_COLL_F32, QS_COLL_HOST) == QS_EINVAL,
          "NULL sendbuf");
    CHECK(qs_comm_allreduce_sum(c, x, x + 1, 3, QS_COLL_F32, QS_COLL_HOST) == QS_EINVAL, "overlap");
    CHECK(qs_comm_allreduce_sum(c, x, x, 4, QS_COLL_U8, QS_COLL_HOST) == QS_EINVAL, "u8 sum");
    CHECK(qs_comm_allreduce_sum(c, x, x, 4, (qs_coll_dtype)9, QS_COLL_HOST) == QS_EINVAL,
          "bad dtype");
    CHECK(qs_comm_allreduce_sum(c, x, x, (size_t)-1 / 2, QS_COLL_F32, QS_COLL_HOST) == QS_EOVERFLOW,
          "overflowing count");
    CHECK(qs_comm_bcast(c, x, 4, QS_COLL_F32, qs_comm_size(c), QS_COLL_HOST) == QS_EINVAL,
          "root out of range");
    CHECK(qs_comm_bcast(c, x, 4, QS_COLL_F32, -1, QS_COLL_HOST) == QS_EINVAL, "negative root");
    int err = qs_comm_allreduce_sum(c, x, x, 4, QS_COLL_F32, QS_COLL_DEVICE);
#ifdef QS_HAVE_CUDA
    CHECK(err == QS_EINVAL && strstr(qs_errmsg(), "qs_comm_enable_device"),
          "device buffers before enable_device: %d", err);
#else
    CHECK(err == QS_ENOTSUP && strstr(qs_errmsg(), "CUDA"), "device buffers without CUDA: %d", err);
#endif
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    int world_size;
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    double t0 = MPI_Wtime();

    qs_comm *world = NULL;
    CHECK(qs_comm_init_mpi(MPI_COMM_WORLD, &world) == QS_OK, "init_mpi");
    if (!world)
        MPI_Abort(MPI_COMM_WORLD, 1);
    CHECK(qs_comm_rank(world) == world_rank && qs_comm_size(world) == world_size, "rank/size %d/%d",
          qs_comm_rank(world), qs_comm_size(world));
    CHECK(qs_comm_mpi(world) != MPI_COMM_NULL && qs_comm_mpi(world) != MPI_COMM_WORLD,
          "the communicator is a duplicate");

    /* Our communicator returns MPI errors instead of aborting the job. */
    MPI_Errhandler eh;
    MPI_Comm_get_errhandler(qs_comm_mpi(world), &eh);
    CHECK(eh == MPI_ERRORS_RETURN, "MPI_ERRORS_RETURN on the duplicate");
    MPI_Errhandler_free(&eh);
    int dummy = 0;
    int rc = MPI_Send(&dummy, 1, MPI_INT, world_size + 5, 0, qs_comm_mpi(world));
    CHECK(rc != MPI_SUCCESS, "an invalid MPI call on the duplicate returns an error");
    CHECK(qs_coll_mpi_error(rc, "MPI_Send") == QS_ECOMM && strstr(qs_errmsg(), "MPI_Send failed"),
          "MPI errors become QS_ECOMM with MPI's string");
    char s[MPI_MAX_ERROR_STRING];
    int len;
    MPI_Error_string(rc, s, &len);
    CHECK(strstr(qs_errmsg(), s) != NULL, "message holds MPI's error string '%s'", s);

    /* A device that one rank cannot open fails every rank, without a hang:
     * rank 0 asks for device 1000, the others for their current one. */
    int derr = qs_comm_enable_device(world, world_rank == 0 ? 1000 : -1, NULL);
#ifdef QS_HAVE_CUDA
    CHECK(world_rank == 0
              ? derr == QS_ENODEV
              : derr == QS_ENODEV || (derr == QS_ECOMM && strstr(qs_errmsg(), "rank 0")),
          "enable_device with a missing device on rank 0: %d", derr);
#else
    CHECK(derr == QS_ENOTSUP, "enable_device without CUDA: %d", derr);
#endif
    CHECK(qs_comm_device(world) == -1 && qs_comm_stream(world) == NULL, "no device after failure");
    if (world_rank == 0)
        printf("enable_device(1000) on rank 0 (expected to fail): %s\n", qs_errmsg());

    errors(world);
    suite(world, "world");
    chunked_suite(world, "world/chunked");

    /* Even and odd ranks: two groups, ranks in world order. */
    qs_comm *half = NULL;
    CHECK(qs_comm_split(world, world_rank % 2, world_rank, &half) == QS_OK && half,
          "split even/odd");
    if (half) {
        CHECK(qs_comm_size(half) == (world_size + 1 - world_rank % 2) / 2 &&
                  qs_comm_rank(half) == world_rank / 2,
              "even/odd rank %d size %d", qs_comm_rank(half), qs_comm_size(half));
        /* Members are the right world ranks: gather them. */
        int32_t members[64];
        int32_t me = world_rank;
        CHECK(qs_comm_allgather(half, &me, members, 1, QS_COLL_I32, QS_COLL_HOST) == QS_OK,
              "gather members");
        for (int r = 0; r < qs_comm_size(half); r++)
            CHECK(members[r] == 2 * r + world_rank % 2, "member %d is world rank %d", r,
                  (int)members[r]);
        suite(half, world_rank % 2 ? "odd" : "even");
        CHECK(qs_comm_close(half) == QS_OK, "close even/odd");
    }

    /* Key orders the child: a negative key reverses the ranks. */
    qs_comm *rev = NULL;
    CHECK(qs_comm_split(world, 0, -world_rank, &rev) == QS_OK && rev, "split reversed");
    if (rev) {
        CHECK(qs_comm_rank(rev) == world_size - 1 - world_rank, "reversed rank %d",
              qs_comm_rank(rev));
        check_allgather(rev, "reversed", QS_COLL_F32, 3);
        qs_comm_close(rev);
    }

    /* A model served by rank 0 alone: the others get no communicator. */
    qs_comm *solo = NULL;
    CHECK(qs_comm_split(world, world_rank == 0 ? 7 : -1, 0, &solo) == QS_OK, "split solo");
    CHECK((solo != NULL) == (world_rank == 0), "solo only on rank 0");
    if (solo) {
        CHECK(qs_comm_size(solo) == 1 && qs_comm_rank(solo) == 0, "solo size 1");
        suite(solo, "solo");
        /* A split of the subgroup, too. */
        qs_comm *inner = NULL;
        CHECK(qs_comm_split(solo, 0, 0, &inner) == QS_OK && inner, "split of solo");
        if (inner)
            check_allreduce(inner, "solo/inner", QS_COLL_F16, 1000);
        qs_comm_close(inner);
        qs_comm_close(solo);
    }

    CHECK(qs_comm_close(world) == QS_OK, "close world");

    int total = 0;
    MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (world_rank == 0)
        printf("test_coll_mpi: %d ranks, %d checks on rank 0, %d failures, %.2f s\n", world_size,
               checks, total, MPI_Wtime() - t0);
    MPI_Finalize();
    return total ? 1 : 0;
}
