/* Model configurations read from files: Hugging Face config.json (OPT and
 * Llama keys), and the checks every configuration passes before use. */
#define _POSIX_C_SOURCE 200809L
#include "qs_shard.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_CONFIG_BYTES (1u << 20)

static int get_u32(const cJSON *o, const char *key, int required, uint32_t dflt, uint32_t *out,
                   const char *path)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!j) {
        if (required)
            return qs_seterr(QS_EFORMAT, "%s: missing \"%s\"", path, key);
        *out = dflt;
        return QS_OK;
    }
    if (!cJSON_IsNumber(j) || j->valuedouble < 0 || j->valuedouble > UINT32_MAX ||
        j->valuedouble != floor(j->valuedouble))
        return qs_seterr(QS_EFORMAT, "%s: \"%s\" is not a non-negative integer", path, key);
    *out = (uint32_t)j->valuedouble;
    return QS_OK;
}

static float get_f32(const cJSON *o, const char *key, float dflt)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(j) ? (float)j->valuedouble : dflt;
}

static int get_bool(const cJSON *o, const char *key, int dflt)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsBool(j) ? cJSON_IsTrue(j) : dflt;
}

static int read_small_file(const char *path, char **buf, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return qs_seterr(QS_ENOTFOUND, "cannot open %s: %s", path, strerror(errno));
    *buf = malloc(MAX_CONFIG_BYTES + 1);
    *len = *buf ? fread(*buf, 1, MAX_CONFIG_BYTES + 1, f) : 0;
    fclose(f);
    if (!*buf)
        return qs_seterr(QS_ENOMEM, "out of memory reading %s", path);
    if (*len > MAX_CONFIG_BYTES) {
        free(*buf);
        return qs_seterr(QS_EFORMAT, "%s is larger than a config.json can be (1 MiB)", path);
    }
    return QS_OK;
}

int qs_config_from_json(const char *path, qs_model_config *out)
{
    size_t len = 0;
    char *text = NULL;
    int err = read_small_file(path, &text, &len);
    if (err)
        return err;
    cJSON *o = cJSON_ParseWithLength(text, len);
    free(text);
    if (!cJSON_IsObject(o)) {
        cJSON_Delete(o);
        return qs_seterr(QS_EFORMAT, "%s is not a JSON object", path);
    }
    qs_model_config m = {0};
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(o, "model_type");
    const char *t = cJSON_IsString(type) ? type->valuestring : "";
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(o, "_name_or_path");
    snprintf(m.name, sizeof m.name, "%s", cJSON_IsString(name) ? name->valuestring : t);
    if ((err = get_u32(o, "num_hidden_layers", 1, 0, &m.layers, path)) ||
        (err = get_u32(o, "hidden_size", 1, 0, &m.hidden, path)) ||
        (err = get_u32(o, "num_attention_heads", 1, 0, &m.heads, path)) ||
        (err = get_u32(o, "vocab_size", 1, 0, &m.vocab, path)) ||
        (err = get_u32(o, "max_position_embeddings", 1, 0, &m.max_pos, path)))
        goto out;
    m.final_norm = 1;
    if (strcmp(t, "opt") == 0) {
        m.arch = QS_ARCH_OPT;
        m.norm = QS_NORM_LAYER;
        m.kv_heads = m.heads;
        m.head_dim = m.heads ? m.hidden / m.heads : 0;
        if ((err = get_u32(o, "ffn_dim", 1, 0, &m.ffn, path)) ||
            (err = get_u32(o, "word_embed_proj_dim", 0, m.hidden, &m.embed_dim, path)))
            goto out;
        m.tied_embeddings = 1;
        m.linear_bias = get_bool(o, "enable_bias", 1);
        m.learned_pos = 1;
        /* Post-LN OPT (350m) has no final norm. */
        m.final_norm = get_bool(o, "do_layer_norm_before", 1);
        m.norm_eps = 1e-5f;
    } else if (strcmp(t, "llama") == 0) {
        m.arch = QS_ARCH_LLAMA;
        m.norm = QS_NORM_RMS;
        if ((err = get_u32(o, "intermediate_size", 1, 0, &m.ffn, path)) ||
            (err = get_u32(o, "num_key_value_heads", 0, m.heads, &m.kv_heads, path)) ||
            (err = get_u32(o, "head_dim", 0, m.heads ? m.hidden / m.heads : 0, &m.head_dim, path)))
            goto out;
        m.embed_dim = m.hidden;
        m.gated_ffn = 1;
        m.tied_embeddings = get_bool(o, "tie_word_embeddings", 0);
        m.norm_eps = get_f32(o, "rms_norm_eps", 1e-6f);
        m.rope_theta = get_f32(o, "rope_theta", 10000.0f);
    } else {
        err = qs_seterr(QS_ENOTSUP,
                        "%s: model_type '%s' is not supported: qshard runs opt and "
                        "llama",
                        path, t);
        goto out;
    }
    if (!(err = qs_config_check(&m)))
        *out = m;
out:
    cJSON_Delete(o);
    return err;
}
