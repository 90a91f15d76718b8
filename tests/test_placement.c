/* test_placement.c — unit inventory against hand-computed byte counts, the cost model on tiny
 * hand-solvable clusters, the solver's constraints (memory, pins, exclusions, shared silicon),
 * infeasible inputs and the plan JSON keys. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "ds_config.h"
#include "ds_placement.h"

static ds_model_config load_cfg(const char *name)
{
    char path[1024];
    ds_model_config c;
    ds_error err = {0};
    snprintf(path, sizeof path, "%s/configs/%s/config.json", DS_TEST_DATA, name);
    int rc = ds_model_config_load(path, &c, &err);
    if (rc)
        fprintf(stderr, "%s\n", ds_error_str(&err));
    assert_int_equal(rc, 0);
    return c;
}

/* FP8 linear weight [r, c] with 128x128 f32 scale blocks, written out independently. */
static uint64_t f8(uint64_t r, uint64_t c)
{
    return r * c + 4 * ((r + 127) / 128) * ((c + 127) / 128);
}

static void test_inventory_v3(void **state)
{
    (void)state;
    ds_model_config c = load_cfg("deepseek-v3");
    assert_int_equal(c.dtype, DS_DTYPE_F8_E4M3);
    ds_inventory inv;
    ds_error err = {0};
    assert_int_equal(ds_inventory_build(&c, &inv, &err), 0);
    /* MLA cache per token per layer: kv_lora_rank 512 + rope 64, BF16. */
    assert_int_equal(inv.attn.kv_bytes_per_token, (512 + 64) * 2);
    /* one routed expert: gate, up [2048, 7168] and down [7168, 2048] in FP8 + scales */
    assert_int_equal(inv.expert.weight_bytes, 3 * (2048ull * 7168 + 4 * 16 * 56));
    assert_int_equal(inv.expert.weight_bytes, 44050944ull);
    uint64_t D = 7168;
    uint64_t attn = f8(1536, D) + 1536 * 2 + f8(128 * 192, 1536) + f8(576, D) + 512 * 2 +
                    f8(128 * 256, 512) + f8(D, 128 * 128) + 2 * D * 2;
    assert_int_equal(inv.attn.weight_bytes, attn);
    assert_int_equal(inv.attn.weight_bytes, 187183840ull);
    assert_int_equal(inv.attn_router.weight_bytes, 256 * D * 2 + 256 * 4);
    assert_int_equal(inv.embed.weight_bytes, 129280ull * D * 2);
    assert_int_equal(inv.shared.weight_bytes, 3 * f8(2048, D));
    assert_int_equal(inv.dense.weight_bytes, 3 * f8(18432, D));
    assert_int_equal(inv.n_layers, 61);
    int moe = 0;
    for (uint32_t l = 0; l < inv.n_layers; l++)
        moe += inv.is_moe[l];
    assert_int_equal(moe, 58);
    /* The published FP8 checkpoint is ~689 GB with the MTP layer (~11.5 GB); 61 layers are
     * between 650 and 690 GB. */
    double tot = (double)ds_inventory_total_bytes(&inv);
    assert_true(tot > 650e9 && tot < 690e9);
    ds_inventory_release(&inv);
}

static void test_inventory_v2_lite(void **state)
{
    (void)state;
    ds_model_config c = load_cfg("deepseek-v2-lite");
    assert_int_equal(c.dtype, DS_DTYPE_BF16);
    ds_inventory inv;
    ds_error err = {0};
    assert_int_equal(ds_inventory_build(&c, &inv, &err), 0);
    assert_int_equal(inv.attn.kv_bytes_per_token, 1152);
    assert_int_equal(inv.expert.weight_bytes, 3ull * 1408 * 2048 * 2);
    /* no q LoRA: q_proj [16*192, 2048]; kv_a [576, 2048]; kv_b [16*256, 512]; o [2048, 2048] */
    uint64_t attn = 2 * (3072ull * 2048 + 576 * 2048 + 4096 * 512 + 2048 * 2048) + 512 * 2 +
                    2 * 2048 * 2;
    assert_int_equal(inv.attn.weight_bytes, attn);
    assert_int_equal(inv.shared.weight_bytes, 3ull * 2816 * 2048 * 2);
    /* 15.7B parameters in BF16 */
    double tot = (double)ds_inventory_total_bytes(&inv);
    assert_true(tot > 31.0e9 && tot < 31.8e9);
    ds_inventory_release(&inv);
}

static ds_cluster *spec(const char *json)
{
    ds_cluster *cl = NULL;
    ds_error err = {0};
    int rc = ds_cluster_parse(json, strlen(json), &cl, &err);
    if (rc)
        fprintf(stderr, "%s\n", ds_error_str(&err));
    assert_int_equal(rc, 0);
    return cl;
}

/* A tiny dense model: every byte count is small and known. */
static ds_model_config tiny_cfg(uint32_t experts)
{
    ds_model_config c = load_cfg("deepseek-v2-lite");
    c.vocab_size = 1000;
    c.hidden_size = 256;
    c.intermediate_size = 512;
    c.moe_intermediate_size = 128;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 2;
    c.kv_lora_rank = 64;
    c.n_routed_experts = experts;
    c.num_experts_per_tok = experts ? 2 : 0;
    c.n_shared_experts = 0;
    c.first_k_dense_replace = experts ? 1 : 2;
    c.moe_layer_freq = 1;
    c.n_group = 1;
    c.topk_group = 1;
    return c;
}

static void test_cost_single_device(void **state)
{
    (void)state;
    /* One device, streaming-bound: step = sum of bytes / bandwidth (launch 0, huge FLOP/s). */
    ds_cluster *cl = spec("{\"nodes\":[{\"name\":\"n\",\"class\":\"server\",\"devices\":[{"
                          "\"name\":\"cpu0\",\"kind\":\"cpu\",\"class\":\"server\","
                          "\"memory_bytes\":1000000000,\"mem_bw_bytes_per_s\":1e9,"
                          "\"flops\":1e18}]}]}");
    ds_model_config c = tiny_cfg(0);
    ds_inventory inv;
    ds_error err = {0};
    assert_int_equal(ds_inventory_build(&c, &inv, &err), 0);
    ds_plan_options o = {.batch = 1, .context = 10};
    ds_plan *p = NULL;
    assert_int_equal(ds_plan_solve(cl, &c, &o, &p, &err), 0);
    double bytes = 2.0 * 256 /* embed row */ +
                   2 * ((double)inv.attn.weight_bytes + 10.0 * 1152 / 1152 *
                                                          (double)inv.attn.kv_bytes_per_token +
                        (double)inv.dense.weight_bytes) +
                   (double)inv.head.weight_bytes;
    ds_plan_summary s;
    ds_plan_get_summary(p, &s);
    assert_true(fabs(s.decode_step_s - bytes / 1e9) < 1e-12);
    assert_true(fabs(s.decode_tokens_per_s - 1e9 / bytes) < 1e-6 * s.decode_tokens_per_s);
    ds_plan_free(p);
    ds_inventory_release(&inv);
    ds_cluster_free(cl);
}

static const char *two_dev =
    "{\"nodes\":[{\"name\":\"n\",\"class\":\"server\",\"devices\":["
    "{\"name\":\"slow\",\"kind\":\"cpu\",\"class\":\"server\",\"memory_bytes\":1000000000,"
    "\"mem_bw_bytes_per_s\":1e9,\"flops\":1e18},"
    "{\"name\":\"fast\",\"kind\":\"gpu\",\"class\":\"gpu\",\"memory_bytes\":1000000000,"
    "\"mem_bw_bytes_per_s\":3e9,\"flops\":1e18},"
    "{\"name\":\"alias\",\"kind\":\"cpu\",\"class\":\"server\",\"memory_bytes\":1000000000,"
    "\"mem_bw_bytes_per_s\":9e12,\"flops\":1e18,\"shares_silicon_with\":\"slow\"}]}]}";

static void test_solver_speed_aware(void **state)
{
    (void)state;
    /* 8 experts, a device 3x faster: with a large batch every expert is touched, so the
     * optimum splits experts 6:2 (6/3 = 2/1 time units). Shared silicon: 'alias' (absurdly
     * fast) must never be used since it is the same hardware as 'slow'. */
    ds_cluster *cl = spec(two_dev);
    ds_model_config c = tiny_cfg(8);
    ds_plan_options o = {.batch = 256, .context = 1, .no_replicas = true};
    ds_plan *p = NULL;
    ds_error err = {0};
    assert_int_equal(ds_plan_solve(cl, &c, &o, &p, &err), 0);
    int n[3] = {0};
    for (uint32_t e = 0; e < 8; e++) {
        int d = ds_plan_unit_device(p, DS_UNIT_EXPERT, 1, e, 0);
        assert_true(d >= 0 && d < 3);
        n[d]++;
    }
    assert_int_equal(n[2], 0);
    assert_int_equal(n[1], 6);
    assert_int_equal(n[0], 2);
    assert_int_equal(ds_plan_unit_device(p, DS_UNIT_EXPERT, 0, 0, 0), -ENOENT);
    uint64_t b;
    double busy;
    ds_plan_device_load(p, 2, &b, &busy);
    assert_int_equal(b, 0);
    ds_plan_free(p);
    /* exact and heuristic agree on this instance */
    o.strategy = DS_STRAT_EXACT;
    double ex = ds_plan_eval_strategy(cl, &c, &o, DS_STRAT_EXACT, &err);
    double he = ds_plan_eval_strategy(cl, &c, &o, DS_STRAT_HEURISTIC, &err);
    assert_true(ex > 0 && he > 0);
    assert_true(fabs(ex - he) <= 1e-9 * ex);
    ds_cluster_free(cl);
}

static void test_pins_exclusions(void **state)
{
    (void)state;
    ds_cluster *cl = spec(two_dev);
    ds_model_config c = tiny_cfg(8);
    ds_pin pins[2] = {{"expert[1][3]", "n/slow"}, {"attn[0]", "n/slow"}};
    const char *ex[1] = {"n/fast"};
    ds_plan_options o = {.batch = 4, .context = 16, .pins = pins, .n_pins = 2};
    ds_plan *p = NULL;
    ds_error err = {0};
    assert_int_equal(ds_plan_solve(cl, &c, &o, &p, &err), 0);
    assert_int_equal(ds_plan_unit_device(p, DS_UNIT_EXPERT, 1, 3, 0), 0);
    assert_int_equal(ds_plan_unit_device(p, DS_UNIT_ATTN, 0, 0, 0), 0);
    assert_int_equal(ds_plan_unit_device(p, DS_UNIT_DENSE, 0, 0, 0), 0);
    ds_plan_free(p);
    /* excluding 'fast' leaves 'slow'; excluding 'slow' too makes 'alias' usable */
    o.n_pins = 0;
    o.exclude = ex;
    o.n_exclude = 1;
    assert_int_equal(ds_plan_solve(cl, &c, &o, &p, &err), 0);
    for (uint32_t e = 0; e < 8; e++)
        assert_int_equal(ds_plan_unit_device(p, DS_UNIT_EXPERT, 1, e, 0), 0);
    ds_plan_free(p);
    const char *ex2[2] = {"n/fast", "n/slow"};
    o.exclude = ex2;
    o.n_exclude = 2;
    assert_int_equal(ds_plan_solve(cl, &c, &o, &p, &err), 0);
    assert_int_equal(ds_plan_unit_device(p, DS_UNIT_HEAD, 0, 0, 0), 2);
    ds_plan_free(p);
    /* bad pins */
    ds_pin bad[1] = {{"expert[0][3]", "n/slow"}};
    o.n_exclude = 0;
    o.pins = bad;
    o.n_pins = 1;
    assert_int_equal(ds_plan_solve(cl, &c, &o, &p, &err), -EINVAL);
    ds_pin bad2[1] = {{"attn[0]", "n/nope"}};
    o.pins = bad2;
    assert_int_equal(ds_plan_solve(cl, &c, &o, &p, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "n/nope"));
    ds_cluster_free(cl);
}

static void test_infeasible(void **state)
{
    (void)state;
    ds_cluster *cl = spec("{\"nodes\":[{\"name\":\"n\",\"class\":\"edge\",\"devices\":[{"
                          "\"name\":\"cpu0\",\"kind\":\"cpu\",\"class\":\"edge\","
                          "\"memory_bytes\":8589934592,\"mem_bw_bytes_per_s\":1e10,"
                          "\"flops\":1e11}]}]}");
    ds_model_config c = load_cfg("deepseek-v2-lite");
    ds_plan_options o = {.batch = 1, .context = 1024};
    ds_plan *p = NULL;
    ds_error err = {0};
    assert_int_equal(ds_plan_solve(cl, &c, &o, &p, &err), -ENOSPC);
    assert_null(p);
    assert_non_null(strstr(err.msg, "short by"));
    /* 8 GiB * 0.95 = 7.6 GiB usable against ~29.3 GiB: short by more than 20 GiB */
    const char *s = strstr(err.msg, "short by ");
    assert_true(strtod(s + 9, NULL) > 20);
    ds_cluster_free(cl);
}

static void test_spec_errors(void **state)
{
    (void)state;
    static const struct {
        const char *json;
        int rc;
    } cases[] = {
        {"{", -EBADMSG},
        {"[]", -EBADMSG},
        {"{\"nodes\":[]}", -ENOENT},
        {"{\"nodes\":[{\"name\":\"a\",\"devices\":[]}]}", -ENOENT},
        {"{\"nodes\":[{\"name\":\"a\",\"devices\":[{\"name\":\"d\",\"kind\":\"cpu\","
         "\"memory_bytes\":-1,\"mem_bw_bytes_per_s\":1,\"flops\":1}]}]}", -ERANGE},
        {"{\"nodes\":[{\"name\":\"a\",\"devices\":[{\"name\":\"d\",\"kind\":\"tpu\","
         "\"memory_bytes\":1,\"mem_bw_bytes_per_s\":1,\"flops\":1}]}]}", -EINVAL},
        {"{\"nodes\":[{\"name\":\"a\",\"devices\":[{\"name\":\"d\",\"kind\":\"cpu\","
         "\"memory_bytes\":1,\"mem_bw_bytes_per_s\":1,\"flops\":1},{\"name\":\"d\",\"kind\":"
         "\"cpu\",\"memory_bytes\":1,\"mem_bw_bytes_per_s\":1,\"flops\":1}]}]}", -EINVAL},
        {"{\"nodes\":[{\"name\":\"a\",\"devices\":[{\"name\":\"d\",\"kind\":\"cpu\","
         "\"memory_bytes\":1,\"mem_bw_bytes_per_s\":1,\"flops\":1,\"shares_silicon_with\":"
         "\"x\"}]}]}", -EINVAL},
        {"{\"nodes\":[{\"name\":\"a\",\"devices\":[{\"name\":\"d\",\"kind\":\"cpu\","
         "\"memory_bytes\":1,\"mem_bw_bytes_per_s\":1,\"flops\":1}]}],\"links\":[{\"a\":\"a\","
         "\"b\":\"zz\",\"latency_s\":0,\"bandwidth_bytes_per_s\":1}]}", -EINVAL},
        {"{\"nodes\":[{\"name\":\"a\",\"devices\":[{\"name\":\"d\",\"kind\":\"cpu\","
         "\"memory_bytes\":1,\"mem_bw_bytes_per_s\":\"fast\",\"flops\":1}]}]}", -EBADMSG},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ds_cluster *cl = (ds_cluster *)1;
        ds_error err = {0};
        int rc = ds_cluster_parse(cases[i].json, strlen(cases[i].json), &cl, &err);
        if (rc != cases[i].rc)
            fprintf(stderr, "case %zu: rc %d: %s\n", i, rc, err.msg);
        assert_int_equal(rc, cases[i].rc);
        assert_null(cl);
        assert_true(err.msg[0] != 0);
    }
}

static void test_json_and_determinism(void **state)
{
    (void)state;
    char path[1024];
    snprintf(path, sizeof path, "%s/bench/clusters/cpu-server-2gpu.json", DS_SOURCE_ROOT);
    ds_cluster *cl = NULL;
    ds_error err = {0};
    assert_int_equal(ds_cluster_load(path, &cl, &err), 0);
    ds_model_config c = load_cfg("deepseek-v2-lite");
    ds_plan_options o = {.batch = 4, .context = 2048};
    ds_plan *p1 = NULL, *p2 = NULL;
    assert_int_equal(ds_plan_solve(cl, &c, &o, &p1, &err), 0);
    assert_int_equal(ds_plan_solve(cl, &c, &o, &p2, &err), 0);
    char *a = ds_plan_to_json(p1), *b = ds_plan_to_json(p2);
    assert_string_equal(a, b);
    json_error_t je;
    json_t *r = json_loads(a, 0, &je);
    assert_non_null(r);
    assert_int_equal(json_integer_value(json_object_get(r, "version")), 1);
    assert_string_equal(json_string_value(json_object_get(r, "strategy")), "auto");
    assert_non_null(json_object_get(r, "objective"));
    assert_non_null(json_object_get(r, "inputs_digest"));
    json_t *pr = json_object_get(r, "predicted");
    assert_true(json_real_value(json_object_get(pr, "decode_step_s")) > 0);
    assert_true(fabs(json_real_value(json_object_get(pr, "decode_tokens_per_s")) -
                     4 / json_real_value(json_object_get(pr, "decode_step_s"))) < 1e-6);
    assert_non_null(json_object_get(pr, "prefill_s_per_1k_tokens"));
    /* every unit once (replica 0): embed + head + 27 attn + 1 dense + 26 shared + 26*64 */
    json_t *units = json_object_get(r, "units");
    size_t n0 = 0, i;
    json_t *u;
    uint64_t sum = 0;
    json_array_foreach(units, i, u) {
        assert_non_null(json_object_get(u, "unit"));
        assert_non_null(strchr(json_string_value(json_object_get(u, "device")), '/'));
        if (json_integer_value(json_object_get(u, "replica")) == 0) {
            n0++;
            sum += (uint64_t)json_integer_value(json_object_get(u, "bytes"));
        }
    }
    assert_int_equal(n0, 2 + 27 + 1 + 26 + 26 * 64);
    ds_inventory inv;
    assert_int_equal(ds_inventory_build(&c, &inv, &err), 0);
    assert_int_equal(sum, ds_inventory_total_bytes(&inv));
    ds_inventory_release(&inv);
    /* device memory within capacity */
    json_array_foreach(json_object_get(r, "devices"), i, u) {
        assert_true(json_integer_value(json_object_get(u, "bytes_used")) <=
                    json_integer_value(json_object_get(u, "capacity_bytes")));
        assert_non_null(json_object_get(u, "busy_s"));
    }
    assert_true(json_is_array(json_object_get(r, "links")));
    json_decref(r);
    free(a);
    free(b);
    ds_plan_free(p1);
    ds_plan_free(p2);
    ds_cluster_free(cl);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_inventory_v3),
        cmocka_unit_test(test_inventory_v2_lite),
        cmocka_unit_test(test_cost_single_device),
        cmocka_unit_test(test_solver_speed_aware),
        cmocka_unit_test(test_pins_exclusions),
        cmocka_unit_test(test_infeasible),
        cmocka_unit_test(test_spec_errors),
        cmocka_unit_test(test_json_and_determinism),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
