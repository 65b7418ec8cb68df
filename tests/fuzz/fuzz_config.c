/* fuzz_config: a Hugging Face config.json as the loader reads it. */
#include "fuzz_util.h"
#include "qs_shard.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    char path[640];
    fuzz_file("config.json", data, n, path, sizeof path);
    qs_model_config c;
    qs_config_from_json(path, &c);
    return 0;
}
