/* The planner's byte counts against numbers computed here from the shapes
 * and from the models' published parameter counts, not from planner code. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "qs_shard.h"

#define GiB (1ull << 30)

static const qs_workload default_w = {1, 512, QS_PLAN_DEFAULT_RESERVE, QS_KV_FP16};

static qs_plan plan(const char *name, qs_scheme s, int bits, uint32_t g, uint32_t tp,
                    const qs_workload *w)
{
    const qs_model_config *m = qs_preset_find(name);
    assert_non_null(m);
    qs_quant q = {s, bits, g, s == QS_SCHEME_W4A4 ? QS_W4A4_OUTLIERS : 0};
    qs_plan p;
    assert_int_equal(qs_plan_make(m, &q, tp, w, &p), QS_OK);
    return p;
}

/* fp16 weights are 2 bytes per parameter; the counts are the ones the model
 * cards publish (Hugging Face parameter totals). */
static void test_fp16_matches_published_parameter_counts(void **state)
{
    (void)state;
    static const struct {
        const char *name;
        uint64_t params;
    } cards[] = {
        {"opt-125m", 125239296ull},     {"opt-1.3b", 1315758080ull},
        {"llama-2-7b", 6738415616ull},  {"llama-3-8b", 8030261248ull},
        {"smollm2-135m", 134515008ull},
    };
    for (size_t i = 0; i < sizeof cards / sizeof cards[0]; i++) {
        qs_plan p = plan(cards[i].name, QS_SCHEME_FP16, 16, 0, 1, &default_w);
        assert_int_equal(p.weight_bytes, 2 * cards[i].params);
    }
}

/* OPT-175B from its shapes: 96 layers of 4 h^2 attention and 2 h*4h FFN
 * weights, each with its biases and two LayerNorms, plus the tied embedding,
 * 2050 learned positions and the final LayerNorm. */
static const uint64_t H = 12288, L = 96, F = 4 * 12288, V = 50272;

static uint64_t opt175_linear_params(void)
{
    return L * (4 * H * H + 2 * H * F);
}

static uint64_t opt175_fp16_params(void)
{
    return L * (4 * H + F + H + 2 * 2 * H) + V * H + 2050 * H + 2 * H;
}

static void test_opt175b_bytes_from_shapes(void **state)
{
    (void)state;
    uint64_t lin = opt175_linear_params(), rest = opt175_fp16_params();
    assert_int_equal(lin + rest, 174604468224ull); /* the published 175B total */

    qs_plan p = plan("opt-175b", QS_SCHEME_FP16, 16, 0, 1, &default_w);
    assert_int_equal(p.weight_bytes, 2 * (lin + rest));
    assert_int_equal(p.linear_params, lin);

    /* 3 bits per weight, and per 128 inputs 3 fp16 alphas and one fp16 offset. */
    p = plan("opt-175b", QS_SCHEME_BCQ, 3, 128, 1, &default_w);
    assert_int_equal(p.rank.linear, lin * 3 / 8 + lin / 128 * (3 + 1) * 2);
    assert_int_equal(p.rank.fp16, 2 * rest);
    /* Row-wise: one alpha set and offset per output row. */
    uint64_t rows = L * (4 * H + F + H);
    p = plan("opt-175b", QS_SCHEME_RTN, 3, 0, 1, &default_w);
    assert_int_equal(p.rank.linear, lin * 3 / 8 + rows * (3 + 1) * 2);

    /* W8A8: a byte per weight, an fp32 scale and an int32 sum per output row,
     * four fp32 static activation scales per layer (smoothing is folded). */
    p = plan("opt-175b", QS_SCHEME_W8A8, 8, 0, 1, &default_w);
    assert_int_equal(p.rank.linear, lin + rows * 8 + L * 16);
}

static void test_opt175b_split_and_kv_cache(void **state)
{
    (void)state;
    qs_workload w = {4, 2048, QS_PLAN_DEFAULT_RESERVE, QS_KV_FP16};
    qs_plan p = plan("opt-175b", QS_SCHEME_FP16, 16, 0, 8, &w);
    /* K and V, fp16, 96 layers, 4 x 2048 tokens, 12288 / 8 channels. */
    assert_int_equal(p.rank.kv_cache, 2ull * L * 4 * 2048 * (H / 8) * 2);
    /* Linear layers split evenly 8 ways. */
    assert_int_equal(p.rank.linear, 2 * opt175_linear_params() / 8);
    /* fp16 per rank: vocab rows split, positions/norms/row biases whole. */
    uint64_t per_rank = L * ((3 * H + F) / 8 + 2 * H + 4 * H) + V / 8 * H + 2050 * H + 2 * H;
    assert_int_equal(p.rank.fp16, 2 * per_rank);
    assert_int_equal(p.rank.reserve, GiB);
    assert_int_equal(p.rank.total, p.rank.linear + p.rank.fp16 + p.rank.kv_cache +
                                       p.rank.workspace + p.rank.reserve);
}

static void test_gqa_replicates_kv_heads_beyond_their_count(void **state)
{
    (void)state;
    /* llama-2-70b: 8 KV heads of 128; on 16 ranks each holds one (replicated). */
    qs_plan p = plan("llama-2-70b", QS_SCHEME_FP16, 16, 0, 16, &default_w);
    assert_int_equal(p.rank.kv_cache, 2ull * 80 * 512 * 128 * 2);
    p = plan("llama-2-70b", QS_SCHEME_FP16, 16, 0, 4, &default_w);
    assert_int_equal(p.rank.kv_cache, 2ull * 80 * 512 * 2 * 128 * 2);
}

/* The sources' headline: fp16 OPT-175B needs more than 4 80 GiB GPUs (5 by
 * memory, 6 as a split of 96 heads), W8A8 fits on 3, 3-bit g128 on 1. */
static void test_opt175b_gpu_counts_on_80gib(void **state)
{
    (void)state;
    const qs_model_config *m = qs_preset_find("opt-175b");
    qs_min_gpus n;
    qs_quant fp16 = {QS_SCHEME_FP16, 16, 0, 0}, w8 = {QS_SCHEME_W8A8, 8, 0, 0},
             b3 = {QS_SCHEME_BCQ, 3, 128, 0}, b4 = {QS_SCHEME_BCQ, 4, 128, 0};
    uint64_t dev = 80 * GiB;

    assert_int_equal(qs_plan_min_gpus(m, &fp16, &default_w, dev, 64, &n), QS_OK);
    assert_int_equal(n.by_memory, 5);
    assert_int_equal(n.valid_tp, 6);
    qs_plan p;
    assert_int_equal(qs_plan_make(m, &fp16, 4, &default_w, &p), QS_OK);
    assert_true(p.rank.total > dev);

    assert_int_equal(qs_plan_min_gpus(m, &w8, &default_w, dev, 64, &n), QS_OK);
    assert_int_equal(n.valid_tp, 3);
    assert_int_equal(qs_plan_min_gpus(m, &b4, &default_w, dev, 64, &n), QS_OK);
    assert_int_equal(n.valid_tp, 2);
    assert_int_equal(qs_plan_min_gpus(m, &b3, &default_w, dev, 64, &n), QS_OK);
    assert_int_equal(n.valid_tp, 1);
    assert_int_equal(n.by_memory, 1);
}

static void test_tp_rules_name_the_valid_degrees(void **state)
{
    (void)state;
    const qs_model_config *m = qs_preset_find("opt-175b");
    qs_quant q = {QS_SCHEME_FP16, 16, 0, 0};
    assert_int_equal(qs_tp_check(m, &q, 8), QS_OK);
    assert_int_equal(qs_tp_check(m, &q, 5), QS_EINVAL);
    assert_non_null(strstr(qs_errmsg(), "valid degrees: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48"));
    assert_int_equal(qs_tp_check(m, &q, 0), QS_EINVAL);

    /* smollm2: hidden 576 is not a multiple of 128; its 3 KV heads go 1, 2
     * (unevenly) or 3 ways, or are copied on 9 ranks; not 4 ways. */
    m = qs_preset_find("smollm2-135m");
    q = (qs_quant){QS_SCHEME_BCQ, 4, 128, 0};
    assert_int_equal(qs_tp_check(m, &q, 1), QS_EINVAL);
    assert_non_null(strstr(qs_errmsg(), "576"));
    assert_int_equal(qs_default_group(m), 96);
    q.group_size = 64;
    assert_int_equal(qs_tp_check(m, &q, 3), QS_OK);
    assert_int_equal(qs_tp_check(m, &q, 2), QS_OK);
    assert_int_equal(qs_tp_check(m, &q, 4), QS_EINVAL);
    assert_non_null(strstr(qs_errmsg(), "valid degrees: 1, 2, 3"));
    /* opt-175b at tp 8 with g=1024: 12288 / 8 = 1536 is not a multiple. */
    m = qs_preset_find("opt-175b");
    q = (qs_quant){QS_SCHEME_BCQ, 3, 1024, 0};
    assert_int_equal(qs_tp_check(m, &q, 4), QS_OK);
    assert_int_equal(qs_tp_check(m, &q, 8), QS_EINVAL);
}

/* Uneven splits deal out whole KV heads with their query heads; every head
 * is held exactly once, or copied when there are fewer KV heads than ranks. */
static void test_heads_are_dealt_out_whole(void **state)
{
    (void)state;
    const qs_model_config *m = qs_preset_find("smollm2-135m"); /* 9 heads, 3 KV */
    qs_heads h0 = qs_tp_heads(m, 2, 0), h1 = qs_tp_heads(m, 2, 1);
    assert_int_equal(h0.q_first, 0), assert_int_equal(h0.hq, 6);
    assert_int_equal(h0.kv_first, 0), assert_int_equal(h0.hkv, 2);
    assert_int_equal(h1.q_first, 6), assert_int_equal(h1.hq, 3);
    assert_int_equal(h1.kv_first, 2), assert_int_equal(h1.hkv, 1);
    for (uint32_t r = 0; r < 9; r++) {
        qs_heads h = qs_tp_heads(m, 9, r); /* one query head each, KV head copied */
        assert_int_equal(h.q_first, r), assert_int_equal(h.hq, 1);
        assert_int_equal(h.kv_first, r / 3), assert_int_equal(h.hkv, 1);
    }
    /* opt-175b's 96 heads on 64 ranks: 32 ranks hold 2, 32 hold 1, in order. */
    m = qs_preset_find("opt-175b");
    uint32_t next = 0;
    for (uint32_t r = 0; r < 64; r++) {
        qs_heads h = qs_tp_heads(m, 64, r);
        assert_int_equal(h.q_first, next);
        assert_int_equal(h.hq, r < 32 ? 2 : 1);
        assert_int_equal(h.kv_first, h.q_first);
        next += h.hq;
    }
    assert_int_equal(next, 96);
    /* The plan counts rank 0, which holds the most. */
    qs_plan p = plan("smollm2-135m", QS_SCHEME_FP16, 16, 0, 2, &default_w);
    assert_int_equal(p.rank.kv_cache, 2ull * 30 * 512 * 2 * 64 * 2);
}

static void test_quant_and_workload_validation(void **state)
{
    (void)state;
    qs_quant q = {QS_SCHEME_BCQ, 0, 128, 0};
    assert_int_equal(qs_quant_check(&q), QS_OK);
    assert_int_equal(q.bits, 4);
    for (int bad = -1; bad <= 16; bad++) {
        q = (qs_quant){QS_SCHEME_RTN, bad, 128, 0};
        int want = (bad >= 0 && bad <= 8) ? QS_OK : QS_EINVAL;
        assert_int_equal(qs_quant_check(&q), want);
    }
    q = (qs_quant){QS_SCHEME_BCQ, 3, 100, 0};
    assert_int_equal(qs_quant_check(&q), QS_EINVAL);
    q = (qs_quant){QS_SCHEME_W8A8, 4, 0, 0};
    assert_int_equal(qs_quant_check(&q), QS_EINVAL);
    q = (qs_quant){QS_SCHEME_FP16, 0, 0, 0};
    assert_int_equal(qs_quant_check(&q), QS_OK);
    assert_int_equal(q.bits, 16);
    /* W4A4: 4 bits only, groups of 8s, outliers only for it */
    q = (qs_quant){QS_SCHEME_W4A4, 0, 128, 128};
    assert_int_equal(qs_quant_check(&q), QS_OK);
    assert_int_equal(q.bits, 4);
    q = (qs_quant){QS_SCHEME_W4A4, 3, 128, 128};
    assert_int_equal(qs_quant_check(&q), QS_EINVAL);
    q = (qs_quant){QS_SCHEME_W4A4, 4, 12, 128};
    assert_int_equal(qs_quant_check(&q), QS_EINVAL);
    q = (qs_quant){QS_SCHEME_RTN, 4, 128, 8};
    assert_int_equal(qs_quant_check(&q), QS_EINVAL);
    assert_non_null(strstr(qs_errmsg(), "w4a4"));

    const qs_model_config *m = qs_preset_find("opt-125m");
    qs_plan p;
    qs_quant f = {QS_SCHEME_FP16, 16, 0, 0};
    qs_workload w = {1, 4096, 0, QS_KV_FP16};
    assert_int_equal(qs_plan_make(m, &f, 1, &w, &p), QS_EINVAL); /* past the context */
    w = (qs_workload){0, 16, 0, QS_KV_FP16};
    assert_int_equal(qs_plan_make(m, &f, 1, &w, &p), QS_EINVAL);
    w = (qs_workload){1, 16, 0, QS_KV_FP16};
    assert_int_equal(qs_plan_make(m, &f, 0, &w, &p), QS_EINVAL);
    assert_int_equal(qs_plan_make(NULL, &f, 1, &w, &p), QS_EINVAL);
    assert_null(qs_preset_find("gpt-5"));
    assert_non_null(strstr(qs_errmsg(), "opt-175b"));
    assert_non_null(qs_preset_find("OPT-175B"));
}

/* W4A4 on OPT-175B: 4-bit weights plus 128 int8 input channels per layer
 * and the scales come to a little more than 4-bit BCQ at g128 and well
 * under W8A8, so it fits one 80 GiB GPU as 4-bit BCQ nearly does. */
static void test_w4a4_bytes(void **state)
{
    (void)state;
    qs_plan a = plan("opt-175b", QS_SCHEME_W4A4, 4, 128, 1, &default_w);
    qs_plan b = plan("opt-175b", QS_SCHEME_BCQ, 4, 128, 1, &default_w);
    qs_plan w8 = plan("opt-175b", QS_SCHEME_W8A8, 8, 128, 1, &default_w);
    assert_true(a.rank.linear > b.rank.linear * 0.95 && a.rank.linear < b.rank.linear * 1.2);
    assert_true(a.rank.linear < w8.rank.linear * 0.65);
    /* 128 outliers of K = 12288 per layer: codes 0.5 byte each, outliers 1 */
    const qs_model_config *m = qs_preset_find("opt-175b");
    qs_quant q = {QS_SCHEME_W4A4, 4, 128, 0};
    qs_plan none;
    assert_int_equal(qs_plan_make(m, &q, 1, &default_w, &none), QS_OK);
    assert_true(a.rank.linear > none.rank.linear);
}

/* The KV cache at 2, 1 + 4/32 and 0.5 + 4/32 bytes per value (an fp16
 * scale and minimum per group of 32; a ragged head's last group counts
 * whole), so the same memory holds 1.78x (int8) and 3.2x (int4) the tokens
 * of fp16; everything else is the same. */
static void test_kv_cache_formats(void **state)
{
    (void)state;
    const qs_workload w8 = {1, 512, QS_PLAN_DEFAULT_RESERVE, QS_KV_INT8};
    const qs_workload w4 = {1, 512, QS_PLAN_DEFAULT_RESERVE, QS_KV_INT4};
    qs_plan f = plan("smollm2-135m", QS_SCHEME_FP16, 16, 0, 1, &default_w);
    qs_plan p8 = plan("smollm2-135m", QS_SCHEME_FP16, 16, 0, 1, &w8);
    qs_plan p4 = plan("smollm2-135m", QS_SCHEME_FP16, 16, 0, 1, &w4);
    assert_int_equal(f.rank.kv_cache, 2ull * 30 * 512 * 3 * 64 * 2);
    assert_int_equal(p8.rank.kv_cache, 2ull * 30 * 512 * 3 * (64 + 2 * 4));
    assert_int_equal(p4.rank.kv_cache, 2ull * 30 * 512 * 3 * (32 + 2 * 4));
    assert_int_equal(p8.rank.total - p8.rank.kv_cache, f.rank.total - f.rank.kv_cache);
    assert_int_equal(p4.weight_bytes, f.weight_bytes);
    assert_int_equal(qs_kv_vec_bytes(QS_KV_FP16, 80), 160);
    assert_int_equal(qs_kv_vec_bytes(QS_KV_INT8, 80), 80 + 3 * 4);
    assert_int_equal(qs_kv_vec_bytes(QS_KV_INT4, 80), 40 + 3 * 4);
    assert_int_equal(qs_kv_vec_bytes(QS_KV_INT4, 7), 4 + 4);
    assert_int_equal(qs_kv_vec_bytes(QS_KV_INT8, 128) * 16, 16 * 128 + 16 * 16); /* 1.125 B */
    qs_workload bad = {1, 512, 0, (qs_kv_format)3};
    qs_plan p;
    qs_quant q = {QS_SCHEME_FP16, 16, 0, 0};
    assert_int_equal(qs_plan_make(qs_preset_find("opt-125m"), &q, 1, &bad, &p), QS_EINVAL);
    assert_string_equal(qs_kv_name(QS_KV_INT4), "int4");
    qs_kv_format k;
    assert_int_equal(qs_kv_parse("Int8", &k), QS_OK);
    assert_int_equal(k, QS_KV_INT8);
    assert_int_equal(qs_kv_parse("q8", &k), QS_EINVAL);
    assert_non_null(strstr(qs_errmsg(), "int4"));
}

static void test_presets_are_valid_configs(void **state)
{
    (void)state;
    for (size_t i = 0; i < qs_preset_count(); i++) {
        const qs_model_config *m = qs_preset_at(i);
        if (qs_config_check(m) != QS_OK)
            fail_msg("%s: %s", m->name, qs_errmsg());
    }
    qs_model_config bad = *qs_preset_find("llama-2-7b");
    bad.kv_heads = 5;
    assert_int_equal(qs_config_check(&bad), QS_EFORMAT);
    bad = *qs_preset_find("llama-2-7b");
    bad.head_dim = 100;
    assert_int_equal(qs_config_check(&bad), QS_EFORMAT);
}

static void test_parse_bytes(void **state)
{
    (void)state;
    uint64_t v;
    assert_int_equal(qs_parse_bytes("80GiB", &v), QS_OK);
    assert_int_equal(v, 80 * GiB);
    assert_int_equal(qs_parse_bytes("1.5MiB", &v), QS_OK);
    assert_int_equal(v, 3 * 512 * 1024);
    assert_int_equal(qs_parse_bytes("4096", &v), QS_OK);
    assert_int_equal(v, 4096);
    const char *bad[] = {
        "80GB", "80 GiB", "abc", "-1", "", "1e30GiB", "0", "12XiB", "99999999999999999999999999",
        "nan",  "inf",    "0.1"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(qs_parse_bytes(bad[i], &v), QS_EINVAL);
        assert_true(strlen(qs_errmsg()) > 10);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp16_matches_published_parameter_counts),
        cmocka_unit_test(test_opt175b_bytes_from_shapes),
        cmocka_unit_test(test_opt175b_split_and_kv_cache),
        cmocka_unit_test(test_gqa_replicates_kv_heads_beyond_their_count),
        cmocka_unit_test(test_heads_are_dealt_out_whole),
        cmocka_unit_test(test_opt175b_gpu_counts_on_80gib),
        cmocka_unit_test(test_tp_rules_name_the_valid_degrees),
        cmocka_unit_test(test_quant_and_workload_validation),
        cmocka_unit_test(test_w4a4_bytes),
        cmocka_unit_test(test_kv_cache_formats),
        cmocka_unit_test(test_presets_are_valid_configs),
        cmocka_unit_test(test_parse_bytes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
