/* The single-rank back end, with no MPI_Init anywhere in the process, the
 * argument checks every back end shares, and the fp16 conversions behind the
 * host fp16 sum (exhaustively, against the compiler's _Float16 where it has
 * one). */
#include "coll_test_util.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>

#include <cmocka.h>

static void test_f16_roundtrip(void **state)
{
    (void)state;
    for (uint32_t h = 0; h < 0x10000u; h++) {
        float f = qs_coll_f16_to_f32((uint16_t)h);
        int is_nan = (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu);
        if (is_nan) {
            assert_true(isnan(f));
            assert_true(qs_coll_f32_to_f16(f) & 0x200u); /* quiet */
        } else {
            assert_int_equal(qs_coll_f32_to_f16(f), h);
        }
    }
    /* Known values: the largest half, the smallest subnormal, ties. */
    assert_true(qs_coll_f16_to_f32(0x7bffu) == 65504.0f);
    assert_true(qs_coll_f16_to_f32(0x0001u) == 0x1p-24f);
    assert_int_equal(qs_coll_f32_to_f16(65519.0f), 0x7bffu);
    assert_int_equal(qs_coll_f32_to_f16(65520.0f), 0x7c00u); /* tie to even: Inf */
    assert_int_equal(qs_coll_f32_to_f16(0x1p-25f), 0x0000u); /* tie to even: 0 */
    assert_int_equal(qs_coll_f32_to_f16(0x1.000002p-25f), 0x0001u);
    assert_int_equal(qs_coll_f32_to_f16(1.0f + 0x1p-11f), 0x3c00u); /* tie: even */
    assert_int_equal(qs_coll_f32_to_f16(1.0f + 0x3p-11f), 0x3c02u); /* tie: up to even */
    assert_int_equal(qs_coll_f32_to_f16(-2.0f), 0xc000u);
}

/* Every float class against the compiler's conversion, if it has one. */
static void test_f16_vs_compiler(void **state)
{
    (void)state;
#ifdef __FLT16_MAX__
    for (uint32_t h = 0; h < 0x10000u; h++) {
        uint16_t b = (uint16_t)h;
        _Float16 x;
        memcpy(&x, &b, 2);
        float mine = qs_coll_f16_to_f32(b), theirs = (float)x;
        if (!isnan(theirs))
            assert_memory_equal(&mine, &theirs, sizeof mine);
    }
    /* All float exponents, with mantissas near the rounding boundaries. */
    uint32_t seed = 12345;
    for (uint32_t e = 0; e < 256; e++) {
        for (uint32_t k = 0; k < 4096; k++) {
            seed = seed * 1664525u + 1013904223u;
            uint32_t m = k < 64 ? (k << 12) ^ (k & 1 ? 0x1000u : 0) : seed & 0x7fffffu;
            if (k >= 64 && k < 128)
                m = (seed & 0x7fe000u) | 0x1000u; /* exact ties at the normal rounding bit */
            uint32_t bits = (k & 2 ? 0x80000000u : 0) | (e << 23) | m;
            float f;
            memcpy(&f, &bits, 4);
            if (isnan(f))
                continue;
            _Float16 x = (_Float16)f;
            uint16_t theirs;
            memcpy(&theirs, &x, 2);
            uint16_t mine = qs_coll_f32_to_f16(f);
            if (mine != theirs)
                fail_msg("f32 0x%08x -> f16: mine 0x%04x, compiler 0x%04x", bits, mine, theirs);
        }
    }
#else
    skip();
#endif
}

static void test_single_collectives(void **state)
{
    (void)state;
    int inited = 1;
    MPI_Initialized(&inited);
    assert_int_equal(inited, 0); /* this test runs without MPI */

    qs_comm *c = NULL;
    assert_int_equal(qs_comm_init_single(&c), QS_OK);
    assert_int_equal(qs_comm_rank(c), 0);
    assert_int_equal(qs_comm_size(c), 1);
    assert_true(qs_comm_mpi(c) == MPI_COMM_NULL);
    assert_int_equal(qs_comm_device(c), -1);
    assert_null(qs_comm_stream(c));

    static const size_t sizes[] = {1, 3, 1000003};
    static const qs_coll_dtype dts[] = {QS_COLL_F32, QS_COLL_F16, QS_COLL_I32, QS_COLL_U8};
    for (size_t s = 0; s < 3; s++) {
        for (size_t t = 0; t < 4; t++) {
            size_t n = sizes[s], es = qs_coll_dtype_size(dts[t]);
            char *in = malloc(n * es), *out = malloc(n * es), *ref = malloc(n * es);
            assert_non_null(in);
            assert_non_null(out);
            assert_non_null(ref);
            fill(dts[t], 0, in, n);
            fill(dts[t], 0, ref, n);
            if (dts[t] != QS_COLL_U8) {
                /* ref_sum of one rank: fp16 goes through fp32 and back unchanged */
                ref_sum(dts[t], 1, ref, n);
                memset(out, 0, n * es);
                assert_int_equal(qs_comm_allreduce_sum(c, in, out, n, dts[t], QS_COLL_HOST), QS_OK);
                assert_memory_equal(out, ref, n * es);
                assert_int_equal(qs_comm_allreduce_sum(c, out, out, n, dts[t], QS_COLL_HOST),
                                 QS_OK);
                assert_memory_equal(out, ref, n * es);
            }
            memset(out, 0, n * es);
            assert_int_equal(qs_comm_allgather(c, in, out, n, dts[t], QS_COLL_HOST), QS_OK);
            assert_memory_equal(out, in, n * es);
            assert_int_equal(qs_comm_allgather(c, out, out, n, dts[t], QS_COLL_HOST), QS_OK);
            assert_memory_equal(out, in, n * es);
            assert_int_equal(qs_comm_bcast(c, out, n, dts[t], 0, QS_COLL_HOST), QS_OK);
            assert_memory_equal(out, in, n * es);
            free(in);
            free(out);
            free(ref);
        }
    }
    assert_int_equal(qs_comm_barrier(c), QS_OK);
    assert_int_equal(qs_comm_sync(c), QS_OK);
    assert_int_equal(qs_comm_close(c), QS_OK);
}

static void test_single_split(void **state)
{
    (void)state;
    qs_comm *c = NULL, *child = (qs_comm *)&child;
    assert_int_equal(qs_comm_init_single(&c), QS_OK);
    assert_int_equal(qs_comm_set_max_chunk(c, 5), QS_OK);
    assert_int_equal(qs_comm_split(c, -1, 0, &child), QS_OK);
    assert_null(child);
    assert_int_equal(qs_comm_split(c, 3, 0, &child), QS_OK);
    assert_non_null(child);
    assert_int_equal(qs_comm_size(child), 1);
    float a[3] = {1, 2, 3}, b[3] = {0};
    assert_int_equal(qs_comm_allreduce_sum(child, a, b, 3, QS_COLL_F32, QS_COLL_HOST), QS_OK);
    assert_memory_equal(a, b, sizeof a);
    assert_int_equal(qs_comm_close(child), QS_OK);
    assert_int_equal(qs_comm_close(c), QS_OK);
    assert_int_equal(qs_comm_close(NULL), QS_OK);
}

static void test_errors(void **state)
{
    (void)state;
    qs_comm *c = NULL;
    float x[8] = {0};
    assert_int_equal(qs_comm_init_single(NULL), QS_EINVAL);
    assert_int_equal(qs_comm_init_single(&c), QS_OK);

    /* MPI_Init was never called: a clear refusal, not a crash. */
    qs_comm *m = (qs_comm *)&m;
    assert_int_equal(qs_comm_init_mpi(MPI_COMM_WORLD, &m), QS_EINVAL);
    assert_null(m);
    assert_non_null(strstr(qs_errmsg(), "MPI_Init"));

    /* count 0 is a no-op even with NULL buffers */
    assert_int_equal(qs_comm_allreduce_sum(c, NULL, NULL, 0, QS_COLL_F32, QS_COLL_HOST), QS_OK);
    assert_int_equal(qs_comm_allgather(c, NULL, NULL, 0, QS_COLL_F16, QS_COLL_HOST), QS_OK);
    assert_int_equal(qs_comm_bcast(c, NULL, 0, QS_COLL_U8, 0, QS_COLL_HOST), QS_OK);

    assert_int_equal(qs_comm_allreduce_sum(NULL, x, x, 1, QS_COLL_F32, QS_COLL_HOST), QS_EINVAL);
    assert_int_equal(qs_comm_allreduce_sum(c, x, NULL, 1, QS_COLL_F32, QS_COLL_HOST), QS_EINVAL);
    assert_non_null(strstr(qs_errmsg(), "recvbuf is NULL"));
    assert_int_equal(qs_comm_allgather(c, NULL, x, 1, QS_COLL_F32, QS_COLL_HOST), QS_EINVAL);
    assert_int_equal(qs_comm_bcast(c, NULL, 1, QS_COLL_F32, 0, QS_COLL_HOST), QS_EINVAL);
    assert_int_equal(qs_comm_allreduce_sum(c, x, x + 2, 4, QS_COLL_F32, QS_COLL_HOST), QS_EINVAL);
    assert_non_null(strstr(qs_errmsg(), "overlap"));
    assert_int_equal(qs_comm_allgather(c, x + 1, x, 4, QS_COLL_F32, QS_COLL_HOST), QS_EINVAL);
    assert_int_equal(qs_comm_allreduce_sum(c, x, x, 8, QS_COLL_U8, QS_COLL_HOST), QS_EINVAL);
    assert_int_equal(qs_comm_allreduce_sum(c, x, x, 1, (qs_coll_dtype)-3, QS_COLL_HOST), QS_EINVAL);
    assert_int_equal(qs_comm_allreduce_sum(c, x, x, 1, QS_COLL_F32, (qs_coll_mem)5), QS_EINVAL);
    assert_int_equal(qs_comm_allreduce_sum(c, x, x, SIZE_MAX / 2, QS_COLL_F32, QS_COLL_HOST),
                     QS_EOVERFLOW);
    assert_int_equal(qs_comm_bcast(c, x, 1, QS_COLL_F32, 1, QS_COLL_HOST), QS_EINVAL);
    assert_non_null(strstr(qs_errmsg(), "root 1"));
    assert_int_equal(qs_comm_set_max_chunk(c, 0), QS_EINVAL);
    assert_int_equal(qs_comm_set_max_chunk(NULL, 1), QS_EINVAL);
    assert_int_equal(qs_comm_barrier(NULL), QS_EINVAL);
    assert_int_equal(qs_comm_split(NULL, 0, 0, &m), QS_EINVAL);
    assert_int_equal(qs_comm_rank(NULL), -1);
    assert_int_equal(qs_comm_size(NULL), 0);

    /* Device buffers: refused without CUDA; need enable_device with it. */
    int err = qs_comm_allreduce_sum(c, x, x, 1, QS_COLL_F32, QS_COLL_DEVICE);
#ifdef QS_HAVE_CUDA
    assert_int_equal(err, QS_EINVAL);
    assert_non_null(strstr(qs_errmsg(), "qs_comm_enable_device"));
#else
    assert_int_equal(err, QS_ENOTSUP);
    assert_non_null(strstr(qs_errmsg(), "CUDA"));
    assert_int_equal(qs_comm_enable_device(c, 0, NULL), QS_ENOTSUP);
    /* also for count 0: a configuration error shows on the first call */
    assert_int_equal(qs_comm_allgather(c, NULL, NULL, 0, QS_COLL_F32, QS_COLL_DEVICE), QS_ENOTSUP);
#endif
    assert_int_equal(qs_comm_close(c), QS_OK);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_f16_roundtrip),
        cmocka_unit_test(test_f16_vs_compiler),
        cmocka_unit_test(test_single_collectives),
        cmocka_unit_test(test_single_split),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
