/* test_backend_e2e.c — `test_backend_e2e SPEC`: every reference model of tests/data/ref with ALL
 * routed experts on backend SPEC (experts/ds_backend_moe.h), greedy, against the CPU engine
 * (ds_engine) on the same prompts.
 *
 * Checks: the generated tokens are identical, and so are the HF reference tokens in
 * ref_N.txt (an independent implementation); every logit is within 1e-4 (absolute, logits are
 * O(1)) of the engine's. With SPEC cpu the logits must be bit-identical (same kernels, same
 * order); for a device the number of bit-identical logits is printed (exp in SwiGLU may
 * differ in the last bit). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "ds_backend_moe.h"
#include "ds_backend_units.h"
#include "ds_engine.h"
#include "ds_experts.h"

static const char *spec = "opencl";
static ds_backend *B;

static int parse_tokens(const char *line, int32_t *out, int max)
{
    int n = 0;
    while (*line && *line != '\n' && n < max) {
        char *end;
        long v = strtol(line, &end, 10);
        if (end == line)
            break;
        out[n++] = (int32_t)v;
        line = *end == ',' ? end + 1 : end;
    }
    return n;
}

static int32_t argmax(const float *v, uint32_t n)
{
    int32_t b = 0;
    for (uint32_t i = 1; i < n; i++)
        if (v[i] > v[b])
            b = (int32_t)i;
    return b;
}

/* One forward step of n rows of ONE sequence at positions pos0.. with experts on the backend
 * (the engine's layer loop, experts/engine.c, with ds_backend_moe_run in place of
 * ds_moe_run_experts). */
static int step(const ds_model *m, ds_backend_moe *bm, ds_kv_cache *kv, const int32_t *tok,
                uint32_t n, uint32_t pos0, float *logits, ds_error *err)
{
    const ds_model_config *c = ds_model_get_config(m);
    uint32_t D = c->hidden_size, k = c->num_experts_per_tok ? c->num_experts_per_tok : 1;
    float *x = malloc((size_t)n * D * 4), *h = malloc((size_t)n * D * 4);
    float *fin = malloc((size_t)n * D * 4), *tmp = malloc((size_t)n * D * 4);
    float *eo = malloc((size_t)n * k * D * 4), *w = malloc((size_t)n * k * 4);
    int32_t *ids = malloc((size_t)n * k * 4);
    uint32_t *pos = malloc(n * 4);
    ds_kv_cache **caches = malloc(n * sizeof(*caches));
    for (uint32_t i = 0; i < n; i++) {
        pos[i] = pos0 + i;
        caches[i] = kv;
    }
    int rc = ds_unit_embed(m, NULL, tok, n, x, err);
    for (uint32_t l = 0; rc == 0 && l < c->num_hidden_layers; l++) {
        ds_attn_out ao = {h, fin, ids, w};
        if ((rc = ds_unit_attn(m, NULL, l, x, n, pos, caches, &ao, err)) < 0)
            break;
        if (ds_model_config_layer_is_moe(c, l)) {
            if ((rc = ds_backend_moe_run(bm, l, fin, n, ids, eo, err)) < 0)
                break;
            const float *sh = NULL;
            if (c->n_shared_experts) {
                if ((rc = ds_unit_shared(m, NULL, l, fin, n, tmp, err)) < 0)
                    break;
                sh = tmp;
            }
            ds_moe_combine(D, n, k, w, eo, sh, h);
        } else {
            if ((rc = ds_unit_dense(m, NULL, l, fin, n, tmp, err)) < 0)
                break;
            ds_unit_add(D, n, tmp, h);
        }
        float *t = x;
        x = h;
        h = t;
    }
    if (rc == 0)
        rc = ds_unit_head(m, NULL, x, n, logits, err);
    free(x);
    free(h);
    free(fin);
    free(tmp);
    free(eo);
    free(w);
    free(ids);
    free(pos);
    free(caches);
    return rc;
}

static void run_model_mode(const char *name, int which, bool exact)
{
    char dir[1024], path[1100], line[4096];
    snprintf(dir, sizeof(dir), "%s/ref/%s", DS_TEST_DATA, name);
    snprintf(path, sizeof(path), "%s/ref_%d.txt", dir, which);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    int32_t prompt[64], hf[64];
    assert_non_null(fgets(line, sizeof(line), f));
    int np = parse_tokens(line, prompt, 64);
    assert_non_null(fgets(line, sizeof(line), f));
    int ng = parse_tokens(line, hf, 64);
    fclose(f);
    assert_true(np > 0 && ng > 1);

    ds_error err = {0};
    ds_model *m = NULL;
    if (ds_model_open(dir, NULL, &m, &err) < 0)
        fail_msg("%s: %s", dir, ds_error_str(&err));
    const ds_model_config *c = ds_model_get_config(m);
    uint32_t V = c->vocab_size, maxp = (uint32_t)(np + ng + 1);
    ds_backend_moe *bm = NULL;
    if (ds_backend_moe_new(m, dir, B, &bm, &err) < 0)
        fail_msg("%s: %s", name, ds_error_str(&err));
    ds_backend_moe_set_exact(bm, exact);

    /* Reference: the CPU engine. */
    ds_engine *e = NULL;
    assert_int_equal(ds_engine_new(m, NULL, maxp, &e, &err), 0);
    int seq = ds_engine_seq_add(e);
    assert_true(seq >= 0);
    ds_kv_cache *kv = NULL;
    assert_int_equal(ds_kv_cache_new(c, 0, c->num_hidden_layers, maxp, &kv), 0);
    float *la = malloc((size_t)np * V * 4), *lb = malloc((size_t)np * V * 4);
    int seqs[64];
    for (int i = 0; i < 64; i++)
        seqs[i] = seq;
    int32_t ta = 0, tb = 0;
    uint64_t same = 0, total = 0;
    double maxdiff = 0;
    for (int s = 0; s < ng; s++) {
        uint32_t n = s == 0 ? (uint32_t)np : 1, p0 = s == 0 ? 0 : (uint32_t)(np + s - 1);
        const int32_t *ia = s == 0 ? prompt : &ta, *ib = s == 0 ? prompt : &tb;
        if (ds_engine_forward(e, n, seqs, ia, la, &err) < 0)
            fail_msg("engine: %s", ds_error_str(&err));
        if (step(m, bm, kv, ib, n, p0, lb, &err) < 0)
            fail_msg("%s on %s: %s", name, spec, ds_error_str(&err));
        for (size_t i = 0; i < (size_t)n * V; i++) {
            double d = fabs((double)la[i] - lb[i]);
            maxdiff = d > maxdiff ? d : maxdiff;
            same += memcmp(&la[i], &lb[i], 4) == 0;
            total++;
        }
        ta = argmax(la + (size_t)(n - 1) * V, V);
        tb = argmax(lb + (size_t)(n - 1) * V, V);
        if (ta != tb)
            fail_msg("%s/%d on %s: step %d token %d, engine %d", name, which, spec, s, tb, ta);
        if (tb != hf[s])
            fail_msg("%s/%d on %s: step %d token %d, HF reference %d", name, which, spec, s, tb,
                     hf[s]);
    }
    fprintf(stderr,
            "  %s/ref_%d on %s, SwiGLU on the %s: %d tokens identical; logits %llu/%llu "
            "bit-identical, max |diff| %.3g; %.1f KiB of experts on the device\n",
            name, which, spec, exact ? "host" : "device", ng, (unsigned long long)same,
            (unsigned long long)total, maxdiff, ds_backend_moe_bytes(bm) / 1024.0);
    assert_true(maxdiff <= 1e-4);
    /* Exact mode: same matmul order + the engine's expf => the whole model bit-identical
     * (cuda's cuBLAS path for batches is not exact: prefill rows >= 16 may differ). */
    if ((exact && strncmp(spec, "cuda", 4)) || !strcmp(spec, "cpu"))
        assert_true(same == total);
    free(la);
    free(lb);
    ds_kv_cache_free(kv);
    ds_engine_free(e);
    ds_backend_moe_free(bm);
    ds_model_free(m);
}

static void run_model(const char *name, int which)
{
    run_model_mode(name, which, true);
    run_model_mode(name, which, false);
}

static void test_v3_bf16(void **state)
{
    run_model("v3_bf16", 0);
    run_model("v3_bf16", 1);
}
static void test_v3_fp8(void **state)
{
    run_model("v3_fp8", 0);
    run_model("v3_fp8", 1);
}
static void test_v3_qlora_group_yarn(void **state)
{
    run_model("v3_qlora_group_yarn", 0);
}
static void test_v3_noqlora_d72(void **state)
{
    run_model("v3_noqlora_d72", 0);
}
static void test_v2_greedy(void **state)
{
    run_model("v2_greedy", 0);
    run_model("v2_greedy", 1);
}
static void test_v2_group_limited(void **state)
{
    run_model("v2_group_limited", 0);
}

/* The hook refuses what it cannot do, with a message. */
static void test_errors(void **state)
{
    char dir[1024];
    snprintf(dir, sizeof(dir), "%s/ref/v3_bf16", DS_TEST_DATA);
    ds_error err = {0};
    ds_model *m = NULL;
    assert_int_equal(ds_model_open(dir, NULL, &m, &err), 0);
    ds_backend_moe *bm = NULL;
    /* the wrong checkpoint for this model: shapes differ */
    char other[1024];
    snprintf(other, sizeof(other), "%s/ref/v3_noqlora_d72", DS_TEST_DATA);
    assert_true(ds_backend_moe_new(m, other, B, &bm, &err) < 0);
    assert_null(bm);
    assert_non_null(strstr(err.msg, "experts"));
    assert_int_equal(ds_backend_moe_new(m, dir, B, &bm, &err), 0);
    float in[4096] = {0}, out[4096];
    int32_t ids[2] = {0, 99};
    assert_int_equal(ds_backend_moe_run(bm, 1, in, 1, ids, out, &err), -ERANGE);
    assert_int_equal(ds_backend_moe_run(bm, 0, in, 1, ids, out, &err), -ENOENT); /* dense */
    ds_backend_moe_free(bm);
    ds_model_free(m);
}

/* Attention, KV cache, router, dense/shared FFNs, embed and head on the backend
 * (experts/ds_backend_units.h) under continuous batching: three sequences, a prefill alone, then
 * a call mixing a prefill, a decode row and another prefill, then batched decode steps, and a
 * sequence removed and another added meanwhile (its device cache released, a new one made).
 * Every call's logits must be bit-identical to the CPU engine's for the same rows. */
static void units_batched(const char *name)
{
    char dir[1024];
    snprintf(dir, sizeof(dir), "%s/ref/%s", DS_TEST_DATA, name);
    ds_error err = {0};
    ds_model *m = NULL;
    assert_int_equal(ds_model_open(dir, NULL, &m, &err), 0);
    const ds_model_config *c = ds_model_get_config(m);
    uint32_t V = c->vocab_size;
    ds_engine *cpu = NULL, *dev = NULL;
    ds_backend_units *bu = NULL;
    assert_int_equal(ds_engine_new(m, NULL, 64, &cpu, &err), 0);
    assert_int_equal(ds_engine_new(m, NULL, 64, &dev, &err), 0);
    if (ds_backend_units_new(m, NULL, B, NULL, NULL, &bu, &err) < 0)
        fail_msg("units on %s: %s", spec, ds_error_str(&err));
    assert_true(ds_backend_units_hosts(bu, DS_UNIT_ATTN, 0) &&
                ds_backend_units_hosts(bu, DS_UNIT_HEAD, 0));
    assert_true(ds_backend_units_weight_bytes(bu) > 0);
    ds_engine_set_units(dev, &ds_backend_units_ops, bu);
    int sc[4], sd[4];
    for (int i = 0; i < 3; i++) {
        sc[i] = ds_engine_seq_add(cpu);
        sd[i] = ds_engine_seq_add(dev);
        assert_true(sc[i] >= 0 && sd[i] >= 0);
    }
    float *lc = malloc((size_t)16 * V * 4), *ld = malloc((size_t)16 * V * 4);
    /* call shapes: {seq index per row}, tokens from a fixed stream */
    static const int calls[][8] = {
        {0, 0, 0, 0, 0, -1}, {1, 1, 1, 0, 2, 2, -1}, {0, 1, 2, -1}, {2, 1, 0, -1},
        {3, 3, 3, 0, -1},    {0, 2, 3, -1},          {3, -1},
    };
    uint32_t tokgen = 7;
    for (size_t k = 0; k < sizeof(calls) / sizeof(calls[0]); k++) {
        if (k == 4) { /* sequence 1 leaves, sequence 3 joins */
            ds_engine_seq_remove(cpu, sc[1]);
            ds_engine_seq_remove(dev, sd[1]);
            sc[3] = ds_engine_seq_add(cpu);
            sd[3] = ds_engine_seq_add(dev);
            assert_true(sc[3] >= 0 && sd[3] >= 0);
        }
        int rc_[8], rd_[8];
        int32_t tok[8];
        uint32_t n = 0;
        for (; calls[k][n] >= 0; n++) {
            rc_[n] = sc[calls[k][n]];
            rd_[n] = sd[calls[k][n]];
            tokgen = tokgen * 1103515245u + 12345u;
            tok[n] = (int32_t)((tokgen >> 8) % V);
        }
        assert_int_equal(ds_engine_forward(cpu, n, rc_, tok, lc, &err), 0);
        if (ds_engine_forward(dev, n, rd_, tok, ld, &err) < 0)
            fail_msg("%s call %zu on %s: %s", name, k, spec, ds_error_str(&err));
        if (memcmp(lc, ld, (size_t)n * V * 4))
            fail_msg("%s call %zu (%u rows): device logits differ from the CPU engine's", name, k,
                     n);
        for (int i = 0; i < 4; i++)
            if (k < 4 ? i < 3 : i != 1)
                assert_int_equal(ds_engine_seq_len(cpu, sc[i]), ds_engine_seq_len(dev, sd[i]));
    }
    assert_true(ds_backend_units_kv_bytes(bu) > 0);
    uint64_t calls_n = 0;
    ds_backend_units_busy_s(bu, &calls_n);
    assert_true(calls_n > 0);
    ds_engine_free(dev);
    assert_int_equal(ds_backend_units_kv_bytes(bu), 0); /* the sequences' device caches freed */
    ds_engine_free(cpu);
    ds_backend_units_free(bu);
    free(lc);
    free(ld);
    ds_model_free(m);
}

static void test_units_batched(void **state)
{
    const char *names[] = {"v3_qlora_group_yarn", "v2_greedy", "v3_fp8", "v3_noqlora_d72"};
    for (int i = 0; i < 4; i++)
        units_batched(names[i]);
}

/* A prompt longer than one mla_attn call takes (256 rows of a sequence per call): models/tiny,
 * 300 rows in one forward, then decode steps; bit-identical to the CPU engine. Not on the
 * reference cpu backend (its one-thread scalar matmuls over 300 rows take minutes under the
 * sanitizers; the chunking is the runner's, the same for every backend). */
static void test_units_long_prefill(void **state)
{
    if (!strcmp(spec, "cpu")) {
        printf("long prefill: skipped on the reference cpu backend\n");
        return;
    }
    char dir[1024];
    snprintf(dir, sizeof(dir), "%s/models/tiny", DS_SOURCE_ROOT);
    ds_error err = {0};
    ds_model *m = NULL;
    if (ds_model_open(dir, NULL, &m, &err) < 0) {
        printf("models/tiny not present: skipped\n");
        return;
    }
    uint32_t V = ds_model_get_config(m)->vocab_size, n = 300;
    ds_engine *cpu = NULL, *dev = NULL;
    ds_backend_units *bu = NULL;
    assert_int_equal(ds_engine_new(m, NULL, 400, &cpu, &err), 0);
    assert_int_equal(ds_engine_new(m, NULL, 400, &dev, &err), 0);
    if (ds_backend_units_new(m, NULL, B, NULL, NULL, &bu, &err) < 0)
        fail_msg("units on %s: %s", spec, ds_error_str(&err));
    ds_engine_set_units(dev, &ds_backend_units_ops, bu);
    int sc = ds_engine_seq_add(cpu), sd = ds_engine_seq_add(dev);
    int *rc_ = malloc(n * sizeof(int)), *rd_ = malloc(n * sizeof(int));
    int32_t *tok = malloc(n * sizeof(int32_t));
    float *lc = malloc((size_t)n * V * 4), *ld = malloc((size_t)n * V * 4);
    for (uint32_t i = 0; i < n; i++) {
        rc_[i] = sc;
        rd_[i] = sd;
        tok[i] = (int32_t)((i * 7919u + 13u) % V);
    }
    assert_int_equal(ds_engine_forward(cpu, n, rc_, tok, lc, &err), 0);
    if (ds_engine_forward(dev, n, rd_, tok, ld, &err) < 0)
        fail_msg("long prefill on %s: %s", spec, ds_error_str(&err));
    assert_memory_equal(lc, ld, (size_t)n * V * 4);
    for (int k = 0; k < 3; k++) {
        int32_t t = argmax(lc + (k ? 0 : (size_t)(n - 1) * V), V);
        assert_int_equal(ds_engine_forward(cpu, 1, &sc, &t, lc, &err), 0);
        assert_int_equal(ds_engine_forward(dev, 1, &sd, &t, ld, &err), 0);
        assert_memory_equal(lc, ld, (size_t)V * 4);
    }
    ds_engine_free(dev);
    ds_engine_free(cpu);
    ds_backend_units_free(bu);
    free(rc_);
    free(rd_);
    free(tok);
    free(lc);
    free(ld);
    ds_model_free(m);
}

int main(int argc, char **argv)
{
    if (argc > 1)
        spec = argv[1];
    ds_error err = {0};
    if (ds_backend_open(spec, &B, &err) < 0) {
        fprintf(stderr, "test_backend_e2e: %s: %s\n", spec, ds_error_str(&err));
        return !strncmp(spec, "cuda", 4) ? 77 : 1;
    }
    fprintf(stderr, "test_backend_e2e: experts on %s '%s'\n", spec, ds_backend_device(B));
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_v3_bf16),
        cmocka_unit_test(test_v3_fp8),
        cmocka_unit_test(test_v3_qlora_group_yarn),
        cmocka_unit_test(test_v3_noqlora_d72),
        cmocka_unit_test(test_v2_greedy),
        cmocka_unit_test(test_v2_group_limited),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_units_batched),
        cmocka_unit_test(test_units_long_prefill),
    };
    int rc = cmocka_run_group_tests_name(spec, tests, NULL, NULL);
    ds_backend_free(B);
    return rc;
}
