/* qs_proto.h: the public header of proto/: the generated messages of the
 * qshard.v1 and grpc.health.v1 APIs, their method paths, and the glue that
 * moves a protobuf-c message into and out of a gRPC byte buffer. Used by the
 * server (daemon/) and the client (ctl/) alike; knows nothing of MPI.
 */
#ifndef QS_PROTO_H
#define QS_PROTO_H

#include <stddef.h>

#include <grpc/byte_buffer.h>
#include <grpc/status.h>
#include <protobuf-c/protobuf-c.h>

#include "health.pb-c.h"
#include "qshard.pb-c.h"

#ifdef __cplusplus
extern "C" {
#endif

#define QS_SERVICE             "qshard.v1.Qshard"
#define QS_METHOD_HEALTH       "/qshard.v1.Qshard/Health"
#define QS_METHOD_STATS        "/qshard.v1.Qshard/Stats"
#define QS_METHOD_PLAN         "/qshard.v1.Qshard/Plan"
#define QS_METHOD_LOAD         "/qshard.v1.Qshard/Load"
#define QS_METHOD_UNLOAD       "/qshard.v1.Qshard/Unload"
#define QS_METHOD_GENERATE     "/qshard.v1.Qshard/Generate"
#define QS_METHOD_EVAL         "/qshard.v1.Qshard/Eval"
#define QS_METHOD_BENCH        "/qshard.v1.Qshard/Bench"
#define QS_METHOD_CACHE        "/qshard.v1.Qshard/Cache"
#define QS_METHOD_SHUTDOWN     "/qshard.v1.Qshard/Shutdown"
#define QS_HEALTH_SERVICE      "grpc.health.v1.Health"
#define QS_METHOD_HEALTH_CHECK "/grpc.health.v1.Health/Check"

/* Largest message either side accepts (gRPC's own default receive limit). */
#define QS_PROTO_MAX_MESSAGE (4u << 20)

/* Packs m into a new byte buffer (the caller destroys it); NULL if out of
 * memory. */
grpc_byte_buffer *qs_proto_pack(const ProtobufCMessage *m);

/* Unpacks a message of type d from bb (which stays the caller's); NULL when
 * bb is NULL, larger than QS_PROTO_MAX_MESSAGE, or malformed. Free the result
 * with protobuf_c_message_free_unpacked(m, NULL). */
ProtobufCMessage *qs_proto_unpack(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb);

/* Packs m into a new malloc'd buffer of *len bytes (for MPI); NULL if out of
 * memory. A zero-length message still returns a non-NULL buffer. */
void *qs_proto_pack_bytes(const ProtobufCMessage *m, size_t *len);

/* The canonical name of a status code, e.g. "INVALID_ARGUMENT". */
const char *qs_proto_status_name(grpc_status_code code);

#ifdef __cplusplus
}
#endif
#endif /* QS_PROTO_H */
