/* MPI back end: host buffers only (Open MPI here is not CUDA-aware). MPI
 * counts are int, so every message is cut into chunks of at most
 * comm->max_chunk elements (INT_MAX unless a test lowers it). */
#include "coll_internal.h"

#include <limits.h>
#include <stdint.h>
#include <stdio.h>

static MPI_Datatype mpi_type(qs_coll_dtype dt)
{
    switch (dt) {
    case QS_COLL_F32:
        return MPI_FLOAT;
    case QS_COLL_F16:
        return MPI_UINT16_T; /* moved as bits, never reduced as such */
    case QS_COLL_I32:
        return MPI_INT32_T;
    case QS_COLL_U8:
        return MPI_UINT8_T;
    }
    return MPI_DATATYPE_NULL;
}

int qs_coll_mpi_error(int rc, const char *what)
{
    char s[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, s, &len) != MPI_SUCCESS)
        snprintf(s, sizeof s, "unknown MPI error");
    return qs_seterr(QS_ECOMM, "%s failed: MPI error %d: %s", what, rc, s);
}

static size_t min_size(size_t a, size_t b)
{
    return a < b ? a : b;
}

int qs_coll_mpi_allreduce(qs_comm *c, const void *in, void *out, size_t count, qs_coll_dtype dt)
{
    const size_t es = qs_coll_dtype_size(dt);
    const int in_place = in == out;
    int rc;

    if (dt == QS_COLL_F16) {
        /* MPI has no fp16 type (MPIX_C_FLOAT16 is not in Open MPI 4): widen
         * each chunk to fp32 in the communicator's scratch, sum with MPI_FLOAT,
         * round back once. Twice the bytes on the wire, but the sum is as
         * exact as fp32 and does not depend on the reduction tree. */
        const uint16_t *src = in;
        uint16_t *dst = out;
        const size_t step = min_size(c->max_chunk, QS_COLL_F16_CHUNK);
        for (size_t off = 0; off < count; off += step) {
            size_t n = min_size(step, count - off);
            for (size_t i = 0; i < n; i++)
                c->scratch[i] = qs_coll_f16_to_f32(src[off + i]);
            rc = MPI_Allreduce(MPI_IN_PLACE, c->scratch, (int)n, MPI_FLOAT, MPI_SUM, c->mpi);
            if (rc != MPI_SUCCESS)
                return qs_coll_mpi_error(rc, "MPI_Allreduce (fp16 as fp32)");
            for (size_t i = 0; i < n; i++)
                dst[off + i] = qs_coll_f32_to_f16(c->scratch[i]);
        }
        return QS_OK;
    }

    const char *src = in;
    char *dst = out;
    for (size_t off = 0; off < count; off += c->max_chunk) {
        size_t n = min_size(c->max_chunk, count - off);
        rc = MPI_Allreduce(in_place ? MPI_IN_PLACE : src + off * es, dst + off * es, (int)n,
                           mpi_type(dt), MPI_SUM, c->mpi);
        if (rc != MPI_SUCCESS)
            return qs_coll_mpi_error(rc, "MPI_Allreduce");
    }
    return QS_OK;
}

int qs_coll_mpi_allgather(qs_comm *c, const void *in, void *out, size_t count, qs_coll_dtype dt)
{
    const size_t es = qs_coll_dtype_size(dt);
    const MPI_Datatype t = mpi_type(dt);
    const char *src = in;
    char *dst = out;
    const int in_place = src == dst + (size_t)c->rank * count * es;
    int rc;

    if (count <= c->max_chunk) {
        rc =
            MPI_Allgather(in_place ? MPI_IN_PLACE : src, (int)count, t, dst, (int)count, t, c->mpi);
        return rc == MPI_SUCCESS ? QS_OK : qs_coll_mpi_error(rc, "MPI_Allgather");
    }

    /* Too many elements for one int count: gather column chunks. Rank r's
     * piece [off, off+n) lands at out + (r*count + off) elements, so the
     * receive type is n contiguous elements stretched to an extent of count
     * elements; MPI then places the ranks' pieces count elements apart. */
    if (count * es > (size_t)PTRDIFF_MAX)
        return qs_seterr(QS_EOVERFLOW, "all-gather of %zu elements: extent exceeds MPI_Aint",
                         count);
    for (size_t off = 0; off < count; off += c->max_chunk) {
        size_t n = min_size(c->max_chunk, count - off);
        MPI_Datatype piece, stretched;
        rc = MPI_Type_contiguous((int)n, t, &piece);
        if (rc != MPI_SUCCESS)
            return qs_coll_mpi_error(rc, "MPI_Type_contiguous");
        rc = MPI_Type_create_resized(piece, 0, (MPI_Aint)(count * es), &stretched);
        MPI_Type_free(&piece);
        if (rc != MPI_SUCCESS)
            return qs_coll_mpi_error(rc, "MPI_Type_create_resized");
        rc = MPI_Type_commit(&stretched);
        if (rc == MPI_SUCCESS)
            rc = MPI_Allgather(in_place ? MPI_IN_PLACE : src + off * es, (int)n, t, dst + off * es,
                               1, stretched, c->mpi);
        MPI_Type_free(&stretched);
        if (rc != MPI_SUCCESS)
            return qs_coll_mpi_error(rc, "MPI_Allgather (chunked)");
    }
    return QS_OK;
}

int qs_coll_mpi_bcast(qs_comm *c, void *buf, size_t count, qs_coll_dtype dt, int root)
{
    const size_t es = qs_coll_dtype_size(dt);
    char *p = buf;
    for (size_t off = 0; off < count; off += c->max_chunk) {
        size_t n = min_size(c->max_chunk, count - off);
        int rc = MPI_Bcast(p + off * es, (int)n, mpi_type(dt), root, c->mpi);
        if (rc != MPI_SUCCESS)
            return qs_coll_mpi_error(rc, "MPI_Bcast");
    }
    return QS_OK;
}
