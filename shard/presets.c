/* Architecture presets: the shapes published in each model's config.json. */
#include "qs_shard.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* OPT (Zhang et al. 2022, facebook/opt-*): FFN = 4 x hidden, vocabulary
 * 50272, 2048 positions, head_dim = hidden / heads (64 to 128). */
#define OPT(n, l, h, nh)                                                                           \
    {                                                                                              \
        .name = n, .arch = QS_ARCH_OPT, .norm = QS_NORM_LAYER, .layers = l, .hidden = h,           \
        .heads = nh, .kv_heads = nh, .head_dim = (h) / (nh), .ffn = 4 * (h), .vocab = 50272,       \
        .max_pos = 2048, .embed_dim = h, .tied_embeddings = 1, .gated_ffn = 0, .linear_bias = 1,   \
        .learned_pos = 1, .final_norm = 1, .norm_eps = 1e-5f                                       \
    }

/* Llama-2/3 and SmolLM2 (Llama architecture): RMSNorm, SwiGLU, RoPE. */
#define LLAMA(n, l, h, nh, nkv, f, v, ctx, tied, theta)                                            \
    {                                                                                              \
        .name = n, .arch = QS_ARCH_LLAMA, .norm = QS_NORM_RMS, .layers = l, .hidden = h,           \
        .heads = nh, .kv_heads = nkv, .head_dim = (h) / (nh), .ffn = f, .vocab = v,                \
        .max_pos = ctx, .embed_dim = h, .tied_embeddings = tied, .gated_ffn = 1, .linear_bias = 0, \
        .learned_pos = 0, .final_norm = 1, .norm_eps = 1e-5f, .rope_theta = theta                  \
    }

static const qs_model_config presets[] = {
    OPT("opt-125m", 12, 768, 12),
    /* Post-LayerNorm, so no final norm; 512-wide embeddings projected to 1024. */
    {.name = "opt-350m",
     .arch = QS_ARCH_OPT,
     .norm = QS_NORM_LAYER,
     .layers = 24,
     .hidden = 1024,
     .heads = 16,
     .kv_heads = 16,
     .head_dim = 64,
     .ffn = 4096,
     .vocab = 50272,
     .max_pos = 2048,
     .embed_dim = 512,
     .tied_embeddings = 1,
     .gated_ffn = 0,
     .linear_bias = 1,
     .learned_pos = 1,
     .final_norm = 0,
     .norm_eps = 1e-5f,
     .rope_theta = 0},
    OPT("opt-1.3b", 24, 2048, 32),
    OPT("opt-2.7b", 32, 2560, 32),
    OPT("opt-6.7b", 32, 4096, 32),
    OPT("opt-13b", 40, 5120, 40),
    OPT("opt-30b", 48, 7168, 56),
    OPT("opt-66b", 64, 9216, 72),
    OPT("opt-175b", 96, 12288, 96),
    LLAMA("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, 4096, 0, 10000.0f),
    LLAMA("llama-2-13b", 40, 5120, 40, 40, 13824, 32000, 4096, 0, 10000.0f),
    LLAMA("llama-2-70b", 80, 8192, 64, 8, 28672, 32000, 4096, 0, 10000.0f),
    LLAMA("llama-3-8b", 32, 4096, 32, 8, 14336, 128256, 8192, 0, 500000.0f),
    LLAMA("llama-3-70b", 80, 8192, 64, 8, 28672, 128256, 8192, 0, 500000.0f),
    LLAMA("smollm2-135m", 30, 576, 9, 3, 1536, 49152, 8192, 1, 100000.0f),
};

size_t qs_preset_count(void)
{
    return sizeof presets / sizeof presets[0];
}

const qs_model_config *qs_preset_at(size_t i)
{
    return i < qs_preset_count() ? &presets[i] : NULL;
}

const qs_model_config *qs_preset_find(const char *name)
{
    if (name) {
        for (size_t i = 0; i < qs_preset_count(); i++)
            if (strcasecmp(presets[i].name, name) == 0)
                return &presets[i];
    }
    char known[512];
    size_t off = 0;
    for (size_t i = 0; i < qs_preset_count() && off < sizeof known; i++)
        off += (size_t)snprintf(known + off, sizeof known - off, "%s%s", i ? ", " : "",
                                presets[i].name);
    qs_seterr(QS_ENOTFOUND, "unknown model '%s': choose one of %s", name ? name : "(null)", known);
    return NULL;
}

/* Every configuration, preset or read from a file, passes this before use. */
int qs_config_check(const qs_model_config *m)
{
    /* Generous bounds: well above any published model, low enough that the
     * planner's 64-bit byte counts cannot overflow. */
    const struct {
        const char *what;
        uint32_t v, max;
    } f[] = {{"layers", m->layers, 1024},
             {"hidden size", m->hidden, 1u << 17},
             {"attention heads", m->heads, 1024},
             {"KV heads", m->kv_heads, 1024},
             {"head size", m->head_dim, 1024},
             {"FFN size", m->ffn, 1u << 19},
             {"vocabulary", m->vocab, 1u << 22},
             {"context", m->max_pos, 1u << 21},
             {"embedding width", m->embed_dim, 1u << 17}};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        if (f[i].v == 0 || f[i].v > f[i].max)
            return qs_seterr(QS_EFORMAT, "model '%s': %s %u is outside 1..%u", m->name, f[i].what,
                             f[i].v, f[i].max);
    if ((uint64_t)m->heads * m->head_dim != m->hidden)
        return qs_seterr(QS_EFORMAT, "model '%s': %u heads of %u do not make the hidden size %u",
                         m->name, m->heads, m->head_dim, m->hidden);
    if (m->heads % m->kv_heads)
        return qs_seterr(QS_EFORMAT, "model '%s': %u KV heads do not divide %u attention heads",
                         m->name, m->kv_heads, m->heads);
    if (!(m->norm_eps > 0 && m->norm_eps < 1) || !isfinite(m->rope_theta) || m->rope_theta < 0)
        return qs_seterr(QS_EFORMAT, "model '%s': norm epsilon %g or RoPE base %g is invalid",
                         m->name, m->norm_eps, m->rope_theta);
    return QS_OK;
}

int qs_cache_path(const char *name, char *out, size_t n)
{
    const char *q = getenv("QSHARD_CACHE"), *x = getenv("XDG_CACHE_HOME"), *h = getenv("HOME");
    int k = q && *q   ? snprintf(out, n, "%s/%s", q, name)
            : x && *x ? snprintf(out, n, "%s/qshard/%s", x, name)
            : h && *h ? snprintf(out, n, "%s/.cache/qshard/%s", h, name)
                      : -2;
    if (k == -2)
        return qs_seterr(QS_ENOTFOUND, "no cache directory: set QSHARD_CACHE (or HOME)");
    if (k < 0 || (size_t)k >= n)
        return qs_seterr(QS_EOVERFLOW, "the cache path of %s is too long", name);
    return QS_OK;
}
