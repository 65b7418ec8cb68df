/* Glue between protobuf-c messages and gRPC byte buffers. */
#include "qs_proto.h"

#include <stdlib.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>

void *qs_proto_pack_bytes(const ProtobufCMessage *m, size_t *len)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    /* malloc(0) may return NULL; callers treat NULL as out of memory. */
    unsigned char *buf = malloc(n ? n : 1);
    if (!buf)
        return NULL;
    *len = protobuf_c_message_pack(m, buf);
    return buf;
}

grpc_byte_buffer *qs_proto_pack(const ProtobufCMessage *m)
{
    size_t n = 0;
    void *buf = qs_proto_pack_bytes(m, &n);
    if (!buf)
        return NULL;
    /* The slice takes the buffer and frees it when gRPC is done with it. */
    grpc_slice s = grpc_slice_new(buf, n, free);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

ProtobufCMessage *qs_proto_unpack(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb)
{
    if (!bb || grpc_byte_buffer_length(bb) > QS_PROTO_MAX_MESSAGE)
        return NULL;
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, bb))
        return NULL;
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    ProtobufCMessage *m =
        protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
    grpc_slice_unref(s);
    return m;
}

const char *qs_proto_status_name(grpc_status_code code)
{
    switch (code) {
    case GRPC_STATUS_OK:
        return "OK";
    case GRPC_STATUS_CANCELLED:
        return "CANCELLED";
    case GRPC_STATUS_UNKNOWN:
        return "UNKNOWN";
    case GRPC_STATUS_INVALID_ARGUMENT:
        return "INVALID_ARGUMENT";
    case GRPC_STATUS_DEADLINE_EXCEEDED:
        return "DEADLINE_EXCEEDED";
    case GRPC_STATUS_NOT_FOUND:
        return "NOT_FOUND";
    case GRPC_STATUS_ALREADY_EXISTS:
        return "ALREADY_EXISTS";
    case GRPC_STATUS_PERMISSION_DENIED:
        return "PERMISSION_DENIED";
    case GRPC_STATUS_RESOURCE_EXHAUSTED:
        return "RESOURCE_EXHAUSTED";
    case GRPC_STATUS_FAILED_PRECONDITION:
        return "FAILED_PRECONDITION";
    case GRPC_STATUS_ABORTED:
        return "ABORTED";
    case GRPC_STATUS_OUT_OF_RANGE:
        return "OUT_OF_RANGE";
    case GRPC_STATUS_UNIMPLEMENTED:
        return "UNIMPLEMENTED";
    case GRPC_STATUS_INTERNAL:
        return "INTERNAL";
    case GRPC_STATUS_UNAVAILABLE:
        return "UNAVAILABLE";
    case GRPC_STATUS_DATA_LOSS:
        return "DATA_LOSS";
    case GRPC_STATUS_UNAUTHENTICATED:
        return "UNAUTHENTICATED";
    default:
        return "UNKNOWN";
    }
}
