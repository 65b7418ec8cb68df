/* fuzz_checkpoint: a quantized checkpoint's part (safetensors with qshard's
 * metadata: scheme, bits, group, split, the configuration as JSON) as
 * qs_checkpoint_info and qs_is_checkpoint read it. */
#include "fuzz_util.h"
#include "qs_shard.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    char path[640];
    fuzz_file("rank-00000-of-00001.safetensors", data, n, path, sizeof path);
    qs_model_config c;
    qs_quant q;
    uint32_t tp;
    qs_checkpoint_info(fuzz_dir(), &c, &q, &tp);
    qs_is_checkpoint(fuzz_dir());
    return 0;
}
