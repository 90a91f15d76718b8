/* test_model_bytes.c — every unit's real bytes from a model file's tensor table
 * (ds_model_unit_bytes, model/model_bytes.c) and the placement inventory and plan built on them.
 *
 * The expected figures are independent of the C code: the files in tests/data/unit_bytes were
 * written by tools/gen_unit_bytes.py, which reads each GGUF with llama.cpp's own gguf-py
 * (GGUFReader: type, shape, n_bytes per tensor) and each HF checkpoint's safetensors JSON headers,
 * classifies the tensors into units by regular expressions on their names and applies the
 * documented holding rules (docs/placement.md). Files: a Q4_K_M GGUF (Q4_K, Q5_0, Q5_1, Q6_K, F32
 * mixed, experts of two layers of different types), a Q8_0 GGUF with F16 k_b beside Q8_0 v_b, an
 * F32 split set (from its first part), the older attn_kv_b layout, HF BF16, FP8 (+ block scales),
 * and the quantised figures of --quantize q8_0 / q4_k. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "ds_model.h"
#include "ds_placement.h"

#define DATA DS_TEST_DATA "/"
#define UB   DS_TEST_DATA "/unit_bytes/"

/* The figure `what [layer]` of ub. */
static uint64_t *field(ds_unit_bytes *ub, const char *what, uint32_t l)
{
    if (!strcmp(what, "embed"))
        return &ub->embed;
    if (!strcmp(what, "head"))
        return &ub->head;
    assert_true(l < ub->n_layers);
    if (!strcmp(what, "attn"))
        return &ub->attn[l];
    if (!strcmp(what, "router"))
        return &ub->router[l];
    if (!strcmp(what, "dense"))
        return &ub->dense[l];
    if (!strcmp(what, "shared"))
        return &ub->shared[l];
    if (!strcmp(what, "expert"))
        return &ub->expert[l];
    fail_msg("unknown figure '%s'", what);
    return NULL;
}

/* Compares every figure of ub with the file's; figures the file does not list must be 0.
 * Returns the number of lines. */
static int compare(const char *model, ds_unit_bytes *ub, const char *expected)
{
    FILE *f = fopen(expected, "r");
    if (!f)
        fail_msg("cannot open %s", expected);
    ds_unit_bytes seen;
    assert_int_equal(ds_unit_bytes_init(&seen, ub->n_layers), 0);
    char line[128], what[16];
    int n = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long long v;
        unsigned l = 0;
        if (sscanf(line, "%15s %u %llu", what, &l, &v) != 3) {
            assert_int_equal(sscanf(line, "%15s %llu", what, &v), 2);
            l = 0;
        }
        uint64_t got = *field(ub, what, l);
        if (got != v)
            fail_msg("%s: %s %u: %llu bytes, gguf-py/safetensors headers say %llu", model, what, l,
                     (unsigned long long)got, v);
        *field(&seen, what, l) = 1;
        n++;
    }
    fclose(f);
    const char *names[] = {"attn", "router", "dense", "shared", "expert"};
    for (uint32_t l = 0; l < ub->n_layers; l++)
        for (int i = 0; i < 5; i++)
            if (!*field(&seen, names[i], l) && *field(ub, names[i], l))
                fail_msg("%s: %s %u = %llu not in %s", model, names[i], l,
                         (unsigned long long)*field(ub, names[i], l), expected);
    ds_unit_bytes_release(&seen);
    return n;
}

static void check(const char *model, enum ds_quantize q, const char *expected)
{
    ds_model_config cfg;
    ds_unit_bytes ub;
    ds_error err = {0};
    if (ds_model_unit_bytes(model, q, &cfg, &ub, &err) < 0)
        fail_msg("%s: %s", model, ds_error_str(&err));
    assert_int_equal(ub.n_layers, cfg.num_hidden_layers);
    int n = compare(model, &ub, expected);
    assert_true(n >= 6);
    ds_unit_bytes_release(&ub);
}

static void test_gguf_files(void **state)
{
    (void)state;
    check(DATA "gguf_ref/tiny-Q4_K_M.gguf", DS_QUANTIZE_NONE, UB "tiny-Q4_K_M.txt");
    check(DATA "gguf_ref/v3-Q8_0.gguf", DS_QUANTIZE_NONE, UB "v3-Q8_0.txt");
    check(DATA "gguf_ref/v3-F16-kv_b.gguf", DS_QUANTIZE_NONE, UB "v3-F16-kv_b.txt");
    /* the first file of a split set opens the set */
    check(DATA "gguf_ref/v2-F32-split-00001-of-00003.gguf", DS_QUANTIZE_NONE,
          UB "v2-F32-split.txt");
}

static void test_hf_checkpoints(void **state)
{
    (void)state;
    check(DS_SOURCE_ROOT "/models/tiny", DS_QUANTIZE_NONE, UB "tiny.txt");
    check(DATA "ref/v3_fp8", DS_QUANTIZE_NONE, UB "v3_fp8.txt");
    check(DATA "ref/v3_noqlora_d72", DS_QUANTIZE_NONE, UB "v3_noqlora_d72.txt");
}

/* --quantize: the F32/F16/BF16/FP8 linear weights counted as the Q8_0 / Q4_K blocks they
 * become (q4_k rows not a multiple of 256 as Q8_0, FP8 scales dropped); a GGUF's block
 * tensors stay, its F16 ones (and the kv_b rebuilt from F16 k_b/v_b) are quantised. */
static void test_quantized(void **state)
{
    (void)state;
    check(DS_SOURCE_ROOT "/models/tiny", DS_QUANTIZE_Q8_0, UB "tiny-q8_0.txt");
    check(DS_SOURCE_ROOT "/models/tiny", DS_QUANTIZE_Q4_K, UB "tiny-q4_k.txt");
    check(DATA "ref/v3_fp8", DS_QUANTIZE_Q4_K, UB "v3_fp8-q4_k.txt");
    check(DATA "gguf_ref/v3-F16.gguf", DS_QUANTIZE_Q8_0, UB "v3-F16-q8_0.txt");
    check(DATA "gguf_ref/tiny-Q4_K_M.gguf", DS_QUANTIZE_Q8_0, UB "tiny-Q4_K_M.txt");
}

/* A Q4_K_M file's layers differ: its experts are not all the same type (llama-quantize gives
 * some layers' ffn_down more bits), which a config-derived inventory cannot know. */
static void test_layers_differ(void **state)
{
    (void)state;
    ds_model_config cfg;
    ds_unit_bytes ub;
    ds_error err = {0};
    assert_int_equal(
        ds_model_unit_bytes(DATA "gguf_ref/tiny-Q4_K_M.gguf", DS_QUANTIZE_NONE, &cfg, &ub, &err),
        0);
    bool differ = false;
    for (uint32_t l = 2; l < ub.n_layers; l++)
        differ |= ub.expert[l] != ub.expert[1];
    assert_true(differ);
    ds_unit_bytes_release(&ub);
}

/* The inventory and the plan take the file's figures: the plan JSON's per-unit bytes are the
 * file's and its total is their sum. */
static void test_plan_uses_file_bytes(void **state)
{
    (void)state;
    ds_model_config cfg;
    ds_unit_bytes ub;
    ds_error err = {0};
    assert_int_equal(
        ds_model_unit_bytes(DATA "gguf_ref/tiny-Q4_K_M.gguf", DS_QUANTIZE_NONE, &cfg, &ub, &err),
        0);
    ds_inventory inv;
    assert_int_equal(ds_inventory_build(&cfg, &inv, &err), 0);
    assert_int_equal(ds_inventory_set_bytes(&inv, &ub, &err), 0);
    assert_int_equal(ds_inventory_total_bytes(&inv),
                     ds_unit_bytes_total(&ub, cfg.n_routed_experts));
    ds_inventory_release(&inv);

    const char *spec = "{\"nodes\":[{\"name\":\"n\",\"class\":\"server\",\"devices\":[{"
                       "\"name\":\"cpu0\",\"kind\":\"cpu\",\"class\":\"server\","
                       "\"memory_bytes\":10000000000,\"mem_bw_bytes_per_s\":1e10,"
                       "\"flops\":1e11}]}]}";
    ds_cluster *cl = NULL;
    if (ds_cluster_parse(spec, strlen(spec), &cl, &err) < 0)
        fail_msg("%s", ds_error_str(&err));
    ds_plan_options o = {.batch = 1, .context = 64, .unit_bytes = &ub};
    ds_plan *p = NULL;
    if (ds_plan_solve(cl, &cfg, &o, &p, &err) < 0)
        fail_msg("%s", ds_error_str(&err));
    char *js = ds_plan_to_json(p);
    json_t *root = json_loads(js, 0, NULL);
    assert_non_null(root);
    json_t *units = json_object_get(root, "units"), *u;
    size_t i;
    uint64_t sum = 0;
    int checked = 0;
    json_array_foreach(units, i, u)
    {
        const char *name = json_string_value(json_object_get(u, "unit"));
        uint64_t b = (uint64_t)json_integer_value(json_object_get(u, "bytes"));
        sum += b;
        enum ds_unit_kind k;
        uint32_t l, e;
        assert_int_equal(ds_unit_parse(name, &k, &l, &e), 0);
        uint64_t want = k == DS_UNIT_EMBED    ? ub.embed
                        : k == DS_UNIT_HEAD   ? ub.head
                        : k == DS_UNIT_ATTN   ? ub.attn[l] + ub.router[l]
                        : k == DS_UNIT_DENSE  ? ub.dense[l]
                        : k == DS_UNIT_SHARED ? ub.shared[l]
                                              : ub.expert[l];
        if (b != want)
            fail_msg("plan unit %s: %llu bytes, the file's %llu", name, (unsigned long long)b,
                     (unsigned long long)want);
        checked++;
    }
    assert_true(checked > 30);
    assert_int_equal(sum, ds_unit_bytes_total(&ub, cfg.n_routed_experts));
    json_decref(root);
    free(js);
    ds_plan_free(p);
    ds_cluster_free(cl);
    ds_unit_bytes_release(&ub);
}

/* A bare config.json has no tensor table: config only. A missing file is an error naming it. */
static void test_config_only_and_errors(void **state)
{
    (void)state;
    ds_model_config cfg;
    ds_unit_bytes ub;
    ds_error err = {0};
    assert_int_equal(ds_model_unit_bytes(DS_SOURCE_ROOT "/models/tiny/config.json",
                                         DS_QUANTIZE_NONE, &cfg, &ub, &err),
                     0);
    assert_int_equal(ub.n_layers, 0);
    assert_int_equal(cfg.num_hidden_layers, 4);
    memset(&err, 0, sizeof err);
    assert_true(ds_model_unit_bytes(DATA "no-such.gguf", DS_QUANTIZE_NONE, &cfg, &ub, &err) < 0);
    assert_non_null(strstr(ds_error_str(&err), "no-such.gguf"));
    /* a GGUF that is not a deepseek2 model: the metadata error names the file */
    memset(&err, 0, sizeof err);
    assert_true(
        ds_model_unit_bytes(DATA "gguf/llama-Q2_K.gguf", DS_QUANTIZE_NONE, &cfg, &ub, &err) < 0);
    assert_non_null(strstr(ds_error_str(&err), "llama-Q2_K.gguf"));
}

/* Runs `dsctl ARGS`, returns its stdout (caller frees) and exit status. */
static char *run_dsctl(const char *args, int *status)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s/client/dsctl %s 2>&1", DS_BINARY_ROOT, args);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t cap = 1 << 20, n = 0;
    char *buf = malloc(cap);
    assert_non_null(buf);
    size_t k;
    while ((k = fread(buf + n, 1, cap - 1 - n, p)) > 0)
        n += k;
    buf[n] = 0;
    *status = pclose(p);
    return buf;
}

/* The real command on a GGUF (and on the first part of a split set): a plan is printed, and
 * its JSON's unit bytes add up to the file's figures. */
static void test_dsctl_plan_gguf(void **state)
{
    (void)state;
    const char *cl = DS_SOURCE_ROOT "/bench/clusters/cpu-server-2gpu.json";
    const char *files[] = {DATA "gguf_ref/tiny-Q4_K_M.gguf",
                           DATA "gguf_ref/v2-F32-split-00001-of-00003.gguf"};
    for (int f = 0; f < 2; f++) {
        char args[1024];
        int st;
        snprintf(args, sizeof args, "plan --cluster %s --model %s", cl, files[f]);
        char *out = run_dsctl(args, &st);
        if (st != 0 || strncmp(out, "plan: strategy", 14) || !strstr(out, "attention hosts"))
            fail_msg("dsctl %s: status %d: %s", args, st, out);
        free(out);
        snprintf(args, sizeof args, "plan --cluster %s --model %s --json", cl, files[f]);
        out = run_dsctl(args, &st);
        assert_int_equal(st, 0);
        json_t *root = json_loads(out, 0, NULL);
        if (!root)
            fail_msg("dsctl %s: not JSON: %s", args, out);
        json_t *u;
        size_t i;
        uint64_t sum = 0;
        json_array_foreach(json_object_get(root, "units"), i, u) sum +=
            (uint64_t)json_integer_value(json_object_get(u, "bytes"));
        ds_model_config cfg;
        ds_unit_bytes ub;
        ds_error err = {0};
        assert_int_equal(ds_model_unit_bytes(files[f], DS_QUANTIZE_NONE, &cfg, &ub, &err), 0);
        assert_int_equal(sum, ds_unit_bytes_total(&ub, cfg.n_routed_experts));
        ds_unit_bytes_release(&ub);
        json_decref(root);
        free(out);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gguf_files),
        cmocka_unit_test(test_hf_checkpoints),
        cmocka_unit_test(test_quantized),
        cmocka_unit_test(test_layers_differ),
        cmocka_unit_test(test_plan_uses_file_bytes),
        cmocka_unit_test(test_config_only_and_errors),
        cmocka_unit_test(test_dsctl_plan_gguf),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
