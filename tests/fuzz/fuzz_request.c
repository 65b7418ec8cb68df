/* fuzz_request: every request of proto/qshard.proto as rank 0 takes it:
 * unpacked by protobuf-c and checked by its command's validate function
 * (daemon/commands.c), before any rank sees it. The first byte picks the
 * command; the rest is the message. */
#include "fuzz_util.h"
#include "qs_daemon.h"

/* main.c's, which this harness replaces. */
volatile sig_atomic_t qs_stop_signal;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    static qs_daemon d;
    if (!d.world) {
        d.world = 2;
        d.dev.budget = 16ull << 30;
        snprintf(d.opts.cache_dir, sizeof d.opts.cache_dir, "%s/cache", fuzz_dir());
    }
    if (n < 1 || qs_command_count == 0)
        return 0;
    const qs_command *c = &qs_commands[data[0] % qs_command_count];
    ProtobufCMessage *req = protobuf_c_message_unpack(c->request, NULL, n - 1, data + 1);
    if (!req)
        return 0;
    if (c->validate)
        c->validate(&d, req);
    /* What a valid request is broadcast as, packed again. */
    size_t len = 0;
    void *bytes = qs_proto_pack_bytes(req, &len);
    free(bytes);
    protobuf_c_message_free_unpacked(req, NULL);
    return 0;
}
