/* test_model.c — the engine against HF transformers' logits (tests/data/ref, made by
 * tools/gen_reference.py), the bit-identity invariant (batch composition, call splits, thread
 * counts, KV cache vs recompute), the router's -inf group rule, config and safetensors
 * validation on hostile inputs, conversions and sampling. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "model_test_util.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ds_config.h"
#include "ds_engine.h"
#include "ds_experts.h"
#include "ds_model.h"
#include "ds_pool.h"
#include "ds_tensor.h"

#define REF DS_TEST_DATA "/ref/"

static const char *const ref_models[] = {
    "v3_qlora_group_yarn", "v3_noqlora_d72", "v2_greedy", "v2_group_limited", "v3_bf16", "v3_fp8",
};

static uint32_t parse_ids(const char *s, int32_t *out, uint32_t max)
{
    uint32_t n = 0;
    while (*s && *s != '\n' && n < max) {
        char *end;
        out[n++] = (int32_t)strtol(s, &end, 10);
        s = *end == ',' ? end + 1 : end;
    }
    return n;
}

/* Reads ref_<i>.txt: prompt and generated ids. */
static void read_ref(const char *model, int i, int32_t *prompt, uint32_t *np, int32_t *gen,
                     uint32_t *ng)
{
    char path[512], line1[4096], line2[4096];
    snprintf(path, sizeof(path), REF "%s/ref_%d.txt", model, i);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    assert_non_null(fgets(line1, sizeof(line1), f));
    assert_non_null(fgets(line2, sizeof(line2), f));
    fclose(f);
    *np = parse_ids(line1, prompt, 64);
    *ng = parse_ids(line2, gen, 64);
}

static float *read_f32(const char *model, int i, size_t *count)
{
    char path[512];
    snprintf(path, sizeof(path), REF "%s/ref_%d.f32", model, i);
    return test_read_f32_file(path, count);
}

static ds_model *open_model(const char *name)
{
    char dir[512];
    snprintf(dir, sizeof(dir), REF "%s", name);
    return test_open_model_path(dir);
}

/* Prefill + greedy decode through the KV cache match HF within 1e-3, tokens identical. */
static void test_reference_logits(void **state)
{
    (void)state;
    ds_pool *pool = NULL;
    assert_int_equal(ds_pool_new(2, NULL, 0, &pool), 0);
    for (size_t mi = 0; mi < sizeof(ref_models) / sizeof(ref_models[0]); mi++) {
        ds_model *m = open_model(ref_models[mi]);
        uint32_t V = ds_model_get_config(m)->vocab_size;
        for (int r = 0; r < 2; r++) {
            int32_t prompt[64], gen[64];
            uint32_t np, ng;
            size_t nref;
            read_ref(ref_models[mi], r, prompt, &np, gen, &ng);
            assert_true(ng >= 16);
            float *ref = read_f32(ref_models[mi], r, &nref);
            assert_int_equal(nref, (size_t)(np + ng - 1) * V);
            ds_engine *e = NULL;
            ds_error err = {0};
            assert_int_equal(ds_engine_new(m, pool, 128, &e, &err), 0);
            int seq = ds_engine_seq_add(e);
            assert_true(seq >= 0);
            float *lg = malloc((size_t)(np + ng) * V * sizeof(float));
            int seqs[64];
            for (uint32_t i = 0; i < np; i++)
                seqs[i] = seq;
            assert_int_equal(ds_engine_forward(e, np, seqs, prompt, lg, &err), 0);
            uint32_t rows = np;
            for (uint32_t s = 0; s < ng; s++) {
                int32_t t = test_argmax(lg + (size_t)(rows - 1) * V, V);
                if (t != gen[s])
                    fail_msg("%s prompt %d: step %u token %d, HF %d", ref_models[mi], r, s, t,
                             gen[s]);
                if (s + 1 == ng)
                    break;
                assert_int_equal(ds_engine_forward(e, 1, &seq, &t, lg + (size_t)rows * V, &err), 0);
                rows++;
            }
            double md = 0;
            for (size_t i = 0; i < nref; i++)
                md = fmax(md, fabs((double)lg[i] - ref[i]));
            if (!(md <= 1e-3))
                fail_msg("%s prompt %d: max |diff| %g > 1e-3", ref_models[mi], r, md);
            free(lg);
            free(ref);
            ds_engine_free(e);
        }
        ds_model_free(m);
    }
    ds_pool_free(pool);
}

/* Runs prompt then decode steps for two sequences in different batch shapes and thread
 * counts; every logit row must be bit-identical. */
static void run_two_seqs(ds_model *m, ds_pool *pool, bool together, float *out_a, float *out_b)
{
    const int32_t pa[] = {3, 17, 42, 9}, pb[] = {100, 5, 7};
    uint32_t V = ds_model_get_config(m)->vocab_size;
    ds_engine *e = NULL;
    ds_error err = {0};
    assert_int_equal(ds_engine_new(m, pool, 64, &e, &err), 0);
    int a = ds_engine_seq_add(e), b = ds_engine_seq_add(e);
    float *lg = malloc(16 * (size_t)V * sizeof(float));
    if (together) {
        /* one call: a's prompt and b's prompt interleaved */
        int seqs[] = {a, b, a, b, a, b, a};
        int32_t toks[] = {pa[0], pb[0], pa[1], pb[1], pa[2], pb[2], pa[3]};
        assert_int_equal(ds_engine_forward(e, 7, seqs, toks, lg, &err), 0);
        memcpy(out_a, lg + 6 * (size_t)V, V * sizeof(float));
        memcpy(out_b, lg + 5 * (size_t)V, V * sizeof(float));
    } else {
        /* a in two calls, b one token at a time */
        int seqs[] = {a, a, a, a};
        assert_int_equal(ds_engine_forward(e, 1, seqs, pa, lg, &err), 0);
        assert_int_equal(ds_engine_forward(e, 3, seqs, pa + 1, lg, &err), 0);
        memcpy(out_a, lg + 2 * (size_t)V, V * sizeof(float));
        for (int i = 0; i < 3; i++)
            assert_int_equal(ds_engine_forward(e, 1, &b, &pb[i], lg, &err), 0);
        memcpy(out_b, lg, V * sizeof(float));
    }
    /* then 6 decode steps, batched (together) or one sequence per call */
    for (int s = 0; s < 6; s++) {
        int32_t ta = test_argmax(out_a, V), tb = test_argmax(out_b, V);
        if (together) {
            int seqs[] = {b, a};
            int32_t toks[] = {tb, ta};
            assert_int_equal(ds_engine_forward(e, 2, seqs, toks, lg, &err), 0);
            memcpy(out_b, lg, V * sizeof(float));
            memcpy(out_a, lg + V, V * sizeof(float));
        } else {
            assert_int_equal(ds_engine_forward(e, 1, &a, &ta, lg, &err), 0);
            memcpy(out_a, lg, V * sizeof(float));
            assert_int_equal(ds_engine_forward(e, 1, &b, &tb, lg, &err), 0);
            memcpy(out_b, lg, V * sizeof(float));
        }
    }
    free(lg);
    ds_engine_free(e);
}

/* ds_moe_run_experts: the batched path (one pool loop over the active experts, taken when
 * they are at least as many as the threads) gives the bits of the sequential path (NULL pool),
 * and out-of-range routing ids are refused. */
static void test_moe_batched(void **state)
{
    (void)state;
    ds_model *m = open_model("v3_fp8");
    const ds_model_config *c = ds_model_get_config(m);
    uint32_t D = c->hidden_size, k = c->num_experts_per_tok, n = 6, E = c->n_routed_experts;
    float *x = malloc((size_t)n * D * 4), *o1 = malloc((size_t)n * k * D * 4);
    float *o2 = malloc((size_t)n * k * D * 4);
    int32_t *ids = malloc((size_t)n * k * 4);
    assert_true(x && o1 && o2 && ids);
    for (size_t i = 0; i < (size_t)n * D; i++)
        x[i] = sinf((float)i * 0.37f);
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t s = 0; s < k; s++)
            ids[i * k + s] = (int32_t)((i + s * 3) % E);
    ds_pool *p2 = NULL;
    ds_error err = {0};
    assert_int_equal(ds_pool_new(2, NULL, 0, &p2), 0);
    assert_int_equal(ds_moe_run_experts(m, NULL, 1, x, n, ids, o1, &err), 0);
    assert_int_equal(ds_moe_run_experts(m, p2, 1, x, n, ids, o2, &err), 0);
    assert_memory_equal(o1, o2, (size_t)n * k * D * 4);
    /* Each slot equals its expert run alone on its row. */
    float *one = malloc((size_t)D * 4);
    assert_non_null(one);
    for (uint32_t j = 0; j < n * k; j++) {
        assert_int_equal(
            ds_unit_expert(m, NULL, 1, (uint32_t)ids[j], x + (size_t)(j / k) * D, 1, one, &err), 0);
        assert_memory_equal(one, o2 + (size_t)j * D, (size_t)D * 4);
    }
    ids[5] = (int32_t)E;
    assert_int_equal(ds_moe_run_experts(m, p2, 1, x, n, ids, o2, &err), -ERANGE);
    free(one);
    ds_pool_free(p2);
    free(x);
    free(o1);
    free(o2);
    free(ids);
    ds_model_free(m);
}

static void test_bit_identity(void **state)
{
    (void)state;
    const char *names[] = {"v3_qlora_group_yarn", "v3_fp8", "v2_group_limited"};
    for (int mi = 0; mi < 3; mi++) {
        ds_model *m = open_model(names[mi]);
        uint32_t V = ds_model_get_config(m)->vocab_size;
        float *a1 = malloc(V * 4), *b1 = malloc(V * 4), *a2 = malloc(V * 4), *b2 = malloc(V * 4);
        ds_pool *p3 = NULL;
        assert_int_equal(ds_pool_new(3, NULL, 0, &p3), 0);
        run_two_seqs(m, NULL, false, a1, b1);
        run_two_seqs(m, p3, true, a2, b2);
        assert_memory_equal(a1, a2, V * 4);
        assert_memory_equal(b1, b2, V * 4);
        ds_pool_free(p3);
        free(a1);
        free(b1);
        free(a2);
        free(b2);
        ds_model_free(m);
    }
}

/* One sequence's logits, fed as: its 7-token prompt then 5 greedy steps, with `others` other
 * sequences (prompts of 2..6 tokens, then one token per step) in the same calls. Rows of the
 * target sit at varying places in the batch, so every matmul path runs: n = 1 (decode tile),
 * 2 (3x2 decode tile), 3+ (GEMM) and the split prompt (3 + 4 rows) when others == 0. */
static void run_mixed(ds_model *m, ds_pool *pool, int others, float *out)
{
    enum { P = 7, STEPS = 5, MAXO = 3 };
    const ds_model_config *c = ds_model_get_config(m);
    uint32_t V = c->vocab_size;
    ds_engine *e = NULL;
    ds_error err = {0};
    assert_int_equal(ds_engine_new(m, pool, 64, &e, &err), 0);
    int a = ds_engine_seq_add(e), o[MAXO];
    for (int j = 0; j < others; j++)
        o[j] = ds_engine_seq_add(e);
    float *lg = malloc(40 * (size_t)V * sizeof(float));
    int seqs[40];
    int32_t toks[40], ta[P + STEPS];
    for (int i = 0; i < P; i++)
        ta[i] = (int32_t)((3 + 11 * i) % V);
    uint32_t n = 0, at = 0;
    if (others == 0) {
        /* the prompt in two calls */
        for (int i = 0; i < 3; i++)
            seqs[i] = a;
        assert_int_equal(ds_engine_forward(e, 3, seqs, ta, lg, &err), 0);
        for (int i = 0; i < 4; i++)
            seqs[i] = a;
        assert_int_equal(ds_engine_forward(e, 4, seqs, ta + 3, lg, &err), 0);
        at = 3;
    } else {
        /* other prompts first, the target's in the middle */
        for (int j = 0; j < others; j++)
            for (int i = 0; i < 2 + 2 * j; i++, n++) {
                seqs[n] = o[j];
                toks[n] = (int32_t)((50 + 7 * i + 13 * j) % V);
            }
        for (int i = 0; i < P; i++, n++) {
            seqs[n] = a;
            toks[n] = ta[i];
        }
        at = n - 1;
        assert_int_equal(ds_engine_forward(e, n, seqs, toks, lg, &err), 0);
    }
    memcpy(out, lg + (size_t)at * V, V * sizeof(float));
    for (int s = 0; s < STEPS; s++) {
        int32_t t = test_argmax(out + (size_t)s * V, V);
        n = 0;
        /* the target first on even steps, last on odd ones */
        if (s % 2 == 0) {
            seqs[n] = a;
            toks[n++] = t;
        }
        for (int j = 0; j < others; j++) {
            seqs[n] = o[j];
            toks[n++] = (int32_t)((9 + s + j) % V);
        }
        if (s % 2 == 1) {
            seqs[n] = a;
            toks[n++] = t;
        }
        assert_int_equal(ds_engine_forward(e, n, seqs, toks, lg, &err), 0);
        at = s % 2 == 0 ? 0 : n - 1;
        memcpy(out + (size_t)(s + 1) * V, lg + (size_t)at * V, V * sizeof(float));
    }
    free(lg);
    ds_engine_free(e);
}

/* The fast paths keep a row's result independent of the batch, the threads and the kernel:
 * one sequence alone on one thread (AVX2 where the CPU has it) against the same sequence
 * batched with 1, 2 or 3 others on 2 and 3 threads, and against the portable kernel. */
static void test_fast_path_identity(void **state)
{
    (void)state;
    const char *names[] = {"v3_bf16", "v3_fp8", "v2_greedy", "v3_qlora_group_yarn"};
    for (int mi = 0; mi < 4; mi++) {
        ds_model *m = open_model(names[mi]);
        size_t bytes = 6 * (size_t)ds_model_get_config(m)->vocab_size * sizeof(float);
        float *want = malloc(bytes), *got = malloc(bytes);
        run_mixed(m, NULL, 0, want);
        for (uint32_t threads = 2; threads <= 3; threads++) {
            ds_pool *p = NULL;
            assert_int_equal(ds_pool_new(threads, NULL, 0, &p), 0);
            for (int others = 0; others <= 3; others++) {
                run_mixed(m, p, others, got);
                if (memcmp(want, got, bytes))
                    fail_msg("%s: %u threads, %d other sequences: logits differ", names[mi],
                             threads, others);
            }
            ds_pool_free(p);
        }
        ds_tensor_force_portable(true);
        run_mixed(m, NULL, 2, got);
        ds_tensor_force_portable(false);
        if (memcmp(want, got, bytes))
            fail_msg("%s: portable kernel: logits differ", names[mi]);
        free(want);
        free(got);
        ds_model_free(m);
    }
}

/* Decoding through the cache equals recomputing the whole sequence in one prefill. */
static void test_kv_vs_recompute(void **state)
{
    (void)state;
    ds_model *m = open_model("v3_qlora_group_yarn");
    uint32_t V = ds_model_get_config(m)->vocab_size;
    int32_t toks[12] = {3, 17, 42};
    float *lg = malloc(12 * (size_t)V * 4), *full = malloc(12 * (size_t)V * 4);
    ds_engine *e = NULL;
    ds_error err = {0};
    assert_int_equal(ds_engine_new(m, NULL, 64, &e, &err), 0);
    int s = ds_engine_seq_add(e);
    int seqs[12] = {0};
    for (int i = 0; i < 12; i++)
        seqs[i] = s;
    assert_int_equal(ds_engine_forward(e, 3, seqs, toks, lg, &err), 0);
    for (int i = 3; i < 12; i++) {
        toks[i] = test_argmax(lg + (size_t)(i - 1) * V, V);
        assert_int_equal(ds_engine_forward(e, 1, &s, &toks[i], lg + (size_t)i * V, &err), 0);
    }
    ds_engine_free(e);
    assert_int_equal(ds_engine_new(m, NULL, 64, &e, &err), 0);
    s = ds_engine_seq_add(e);
    assert_int_equal(ds_engine_forward(e, 12, seqs, toks, full, &err), 0);
    assert_memory_equal(lg, full, 12 * (size_t)V * 4);
    ds_engine_free(e);
    free(lg);
    free(full);
    ds_model_free(m);
}

/* Units run on their own with explicit inputs give the engine's result. */
static void test_units_separable(void **state)
{
    (void)state;
    /* An expert on 1 row equals the same row inside a batch of 2; wrong units are refused. */
    ds_error err = {0};
    ds_model *m = open_model("v3_noqlora_d72");
    const ds_model_config *c = ds_model_get_config(m);
    uint32_t D = c->hidden_size;
    float *x = calloc(D, 4), *y = calloc(D, 4), *y2 = calloc(2 * D, 4), *x2 = calloc(2 * D, 4);
    for (uint32_t i = 0; i < D; i++)
        x[i] = sinf((float)i);
    memcpy(x2, x, D * 4);
    for (uint32_t i = 0; i < D; i++)
        x2[D + i] = cosf((float)i);
    assert_int_equal(ds_unit_expert(m, NULL, 1, 3, x, 1, y, &err), 0);
    assert_int_equal(ds_unit_expert(m, NULL, 1, 3, x2, 2, y2, &err), 0);
    assert_memory_equal(y, y2, D * 4);
    assert_int_equal(ds_unit_expert(m, NULL, 0, 3, x, 1, y, &err), -ENOENT);
    assert_int_equal(ds_unit_expert(m, NULL, 1, 99, x, 1, y, &err), -ENOENT);
    assert_int_equal(ds_unit_dense(m, NULL, 1, x, 1, y, &err), -ENOENT);
    int32_t bad = (int32_t)c->vocab_size;
    assert_int_equal(ds_unit_embed(m, NULL, &bad, 1, y, &err), -ERANGE);
    free(x);
    free(y);
    free(y2);
    free(x2);
    ds_model_free(m);
}

static bool want_expert3(void *ctx, enum ds_unit_kind k, uint32_t l, uint32_t e)
{
    (void)ctx;
    return k == DS_UNIT_EXPERT && l == 1 && e == 3;
}

static void test_open_subset(void **state)
{
    (void)state;
    ds_model *m = NULL;
    ds_error err = {0};
    ds_model_open_opts o = {.want = want_expert3};
    assert_int_equal(ds_model_open(REF "v3_noqlora_d72", &o, &m, &err), 0);
    uint32_t D = ds_model_get_config(m)->hidden_size;
    float *x = calloc(D, 4), *y = calloc(D, 4);
    int32_t t = 1;
    assert_int_equal(ds_unit_expert(m, NULL, 1, 3, x, 1, y, &err), 0);
    assert_int_equal(ds_unit_expert(m, NULL, 1, 2, x, 1, y, &err), -ENOENT);
    assert_int_equal(ds_unit_embed(m, NULL, &t, 1, y, &err), -ENOENT);
    assert_int_equal(ds_unit_head(m, NULL, x, 1, y, &err), -ENOENT);
    free(x);
    free(y);
    ds_model_free(m);
}

static ds_model_config router_cfg(void)
{
    ds_model_config c;
    memset(&c, 0, sizeof(c));
    c.n_routed_experts = 8;
    c.num_experts_per_tok = 2;
    c.n_group = 4;
    c.topk_group = 1;
    c.topk_method = DS_TOPK_NOAUX_TC;
    c.scoring_func = DS_SCORING_SIGMOID;
    c.norm_topk_prob = true;
    c.routed_scaling_factor = 2.5;
    return c;
}

/* Negative biased scores: DeepSeek masks unselected groups with -inf, so both experts come
 * from the best group; HF's 0.0 mask would pick experts of masked groups instead. */
static void test_router_inf_mask(void **state)
{
    (void)state;
    ds_model_config c = router_cfg();
    float logits[8] = {0.5f, 0.4f, 0.0f, 0.0f, 0.1f, 0.0f, -0.3f, 0.2f};
    float bias[8] = {-3, -3, -3, -3, -3, -3, -3, -3};
    int32_t ids[2];
    float w[2];
    ds_router_select(&c, logits, bias, ids, w);
    assert_int_equal(ids[0], 0);
    assert_int_equal(ids[1], 1);
    double s0 = 1 / (1 + exp(-0.5)), s1 = 1 / (1 + exp(-0.4));
    assert_float_equal(w[0], 2.5 * s0 / (s0 + s1), 1e-6);
    assert_float_equal(w[1], 2.5 * s1 / (s0 + s1), 1e-6);
}

/* Group score is the sum of the top two biased scores, not the max; weights unbiased. */
static void test_router_group_top2(void **state)
{
    (void)state;
    ds_model_config c = router_cfg();
    /* group 0: one big (2.0) and one tiny; group 1: two fairly big (1.5, 1.5) */
    float logits[8] = {2.0f, -4.0f, 1.5f, 1.5f, -4, -4, -4, -4};
    float bias[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int32_t ids[2];
    float w[2];
    ds_router_select(&c, logits, bias, ids, w);
    assert_int_equal(ids[0], 2);
    assert_int_equal(ids[1], 3);
    /* bias changes the choice but not the weight */
    float bias2[8] = {0, 0, 0.5f, 0, 0, 0, 0, 0};
    ds_router_select(&c, logits, bias2, ids, w);
    assert_int_equal(ids[0], 2);
    assert_float_equal(w[0], 1.25, 1e-6);
}

static void test_router_v2(void **state)
{
    (void)state;
    ds_model_config c = router_cfg();
    c.scoring_func = DS_SCORING_SOFTMAX;
    c.topk_method = DS_TOPK_GROUP_LIMITED_GREEDY;
    c.norm_topk_prob = false;
    c.routed_scaling_factor = 1.0;
    c.topk_group = 2;
    float logits[8] = {0, 3, 0, 0, 2.9f, 0, 1, 2.95f};
    int32_t ids[2];
    float w[2];
    ds_router_select(&c, logits, NULL, ids, w);
    /* groups by max: g0 3, g2 2.9, g3 2.95 -> g0 and g3; experts 1 and 7 */
    assert_int_equal(ids[0], 1);
    assert_int_equal(ids[1], 7);
    double z = 0;
    for (int i = 0; i < 8; i++)
        z += exp(logits[i]);
    assert_float_equal(w[0], exp(3) / z, 1e-6);
    c.topk_method = DS_TOPK_GREEDY;
    ds_router_select(&c, logits, NULL, ids, w);
    assert_int_equal(ids[1], 7);
}

static void test_combine_and_group(void **state)
{
    (void)state;
    int32_t ids[6] = {2, 0, 2, 1, 0, 2};
    ds_moe_groups g;
    assert_int_equal(ds_moe_group(3, 2, ids, 3, &g), 0);
    assert_int_equal(g.offsets[1], 2);
    assert_int_equal(g.offsets[3], 6);
    assert_int_equal(g.order[0], 1);
    assert_int_equal(g.order[1], 4);
    ds_moe_groups_clear(&g);
    int32_t bad[2] = {0, 5};
    assert_int_equal(ds_moe_group(1, 2, bad, 3, &g), -ERANGE);
    float w[2] = {0.5f, 2.0f}, eo[4] = {1, 2, 3, 4}, sh[2] = {10, 20}, h[2] = {100, 200};
    ds_moe_combine(2, 1, 2, w, eo, sh, h);
    assert_float_equal(h[0], 100 + 0.5 + 6 + 10, 1e-6);
    assert_float_equal(h[1], 200 + 1 + 8 + 20, 1e-6);
}

static void test_conversions(void **state)
{
    (void)state;
    assert_float_equal(ds_fp8_e4m3_to_f32(0x38), 1.0, 0);
    assert_float_equal(ds_fp8_e4m3_to_f32(0x7E), 448.0, 0);
    assert_float_equal(ds_fp8_e4m3_to_f32(0xFE), -448.0, 0);
    assert_float_equal(ds_fp8_e4m3_to_f32(0x01), ldexp(1, -9), 0);
    assert_float_equal(ds_fp8_e4m3_to_f32(0x08), ldexp(1, -6), 0);
    assert_true(isnan(ds_fp8_e4m3_to_f32(0x7F)));
    assert_float_equal(ds_bf16_to_f32(0x3F80), 1.0, 0);
    assert_int_equal(ds_f32_to_bf16(1.0f), 0x3F80);
    assert_int_equal(ds_f32_to_bf16(1.00390625f), 0x3F80); /* tie to even */
    assert_float_equal(ds_f16_to_f32(0x3C00), 1.0, 0);
    assert_float_equal(ds_f16_to_f32(0x0001), ldexp(1, -24), 0);
    assert_float_equal(ds_f16_to_f32(0xC000), -2.0, 0);
}

/* FP8 matmul with partial edge blocks equals the dequantised float computation. */
/* FP8 dequantisation (per-block, SIMD bit arithmetic or LUT): every byte value 0..255 (NaNs,
 * subnormals, both zeros) in blocks of 128 and of 100 (tails inside blocks), row 1 of a 2-row
 * block grid, must give exactly the scalar definition ds_fp8_e4m3_to_f32(v) * scale, bit for
 * bit, on the vector and on the portable path. */
static void test_fp8_dequant_exhaustive(void **state)
{
    (void)state;
    const uint32_t bcs[2] = {128, 100};
    for (int bi = 0; bi < 2; bi++) {
        uint32_t cols = 2 * 256 + 13, bc = bcs[bi], nbc = (cols + bc - 1) / bc;
        uint8_t *data = malloc((size_t)2 * cols);
        float *scale = malloc((size_t)2 * nbc * sizeof(float));
        float *got = malloc(cols * sizeof(float)), *gotp = malloc(cols * sizeof(float));
        assert_true(data && scale && got && gotp);
        for (uint32_t i = 0; i < 2 * cols; i++)
            data[i] = (uint8_t)(i * 7 + (i >> 8));
        for (uint32_t i = 0; i < 2 * nbc; i++)
            scale[i] = 0.75f + 0.3125f * (float)i;
        /* Edge scales: tiny (denormal products), huge (past the vector path's range),
         * negative, and a denormal scale. */
        scale[1] = 3e-38f;
        scale[2] = 300.f;
        scale[nbc] = -1.5f;
        scale[nbc + 1] = 1e-40f;
        ds_weight w = {DS_DTYPE_F8_E4M3, 2, cols, data, scale, 1, bc};
        for (uint32_t r = 0; r < 2; r++) {
            ds_tensor_force_portable(false);
            ds_weight_row_f32(&w, r, got);
            ds_tensor_force_portable(true);
            ds_weight_row_f32(&w, r, gotp);
            ds_tensor_force_portable(false);
            for (uint32_t c = 0; c < cols; c++) {
                float want = ds_fp8_e4m3_to_f32(data[(size_t)r * cols + c]) *
                             scale[(size_t)r * nbc + c / bc];
                assert_memory_equal(&got[c], &want, 4);
                assert_memory_equal(&gotp[c], &want, 4);
            }
        }
        /* Every byte value was covered. */
        bool seen[256] = {false};
        for (uint32_t i = 0; i < 2 * cols; i++)
            seen[data[i]] = true;
        for (int v = 0; v < 256; v++)
            assert_true(seen[v]);
        free(data);
        free(scale);
        free(got);
        free(gotp);
    }
}

static void test_fp8_matmul(void **state)
{
    (void)state;
    enum { R = 130, C = 131 };
    uint8_t *q = malloc(R * C);
    float sc[4] = {0.5f, 2.0f, 0.25f, 4.0f};
    float x[C], y[R];
    for (int i = 0; i < R * C; i++)
        q[i] = (uint8_t)((i * 37 + 11) % 126); /* positive finite codes */
    for (int c = 0; c < C; c++)
        x[c] = (float)((c % 7) - 3) * 0.125f;
    ds_weight w = {DS_DTYPE_F8_E4M3, R, C, q, sc, 128, 128};
    ds_weight_matmul(&w, x, 1, y, NULL);
    for (int r = 0; r < R; r++) {
        double ref = 0;
        for (int c = 0; c < C; c++)
            ref += (double)ds_fp8_e4m3_to_f32(q[r * C + c]) * sc[(r / 128) * 2 + c / 128] * x[c];
        assert_float_equal(y[r], ref, 1e-3 * (1 + fabs(ref)));
    }
    free(q);
}

/* The AVX2 kernels (decode tiles for 1 and 2 rows, the GEMM tile for 3+), the AVX-512 GEMM
 * tile (where the CPU has it) and the portable kernel give identical bits for every weight type,
 * any number of rows per call, any row range, and agree with a double reference. */
static void test_kernel_identity(void **state)
{
    (void)state;
    enum { R = 37, C = 1001, N = 8 };
    uint16_t *wb = malloc(R * C * 2), *wh = malloc(R * C * 2);
    uint8_t *w8 = malloc(R * C);
    float *wf = malloc(R * C * 4), *x = malloc(N * C * 4), *sc = malloc(R * C * 4);
    float *y1 = malloc(N * R * 4), *y2 = malloc(N * R * 4), *y3 = malloc(N * R * 4);
    uint32_t s = 12345;
    for (int i = 0; i < R * C; i++) {
        s = s * 1103515245u + 12345u;
        wf[i] = ((float)(s >> 8) / 16777216.0f - 0.5f);
        wb[i] = ds_f32_to_bf16(wf[i]);
        /* f16 bits of a value in [-0.5, 0.5) (including subnormals near 0) */
        wh[i] = (uint16_t)((s >> 9) & 0x37ff) | (uint16_t)((s & 1) << 15);
        w8[i] = (uint8_t)(s >> 24);
        if ((w8[i] & 0x7f) == 0x7f) /* no NaN weights: the double reference below */
            w8[i] ^= 1;
        sc[i] = 0.01f * (float)(1 + i % 5); /* more than enough block scales */
    }
    /* F32, BF16, F16, then FP8 with blocks 128 x 128 and 16 x 32 (fused in registers) and
     * 8 x 100 (row buffer path), all against the portable kernel and a double reference. */
    const uint32_t f8_br[3] = {128, 16, 8}, f8_bc[3] = {128, 32, 100};
    for (int i = 0; i < N * C; i++)
        x[i] = sinf((float)i * 0.37f);
    for (int t = 0; t < 6; t++) {
        ds_weight w = {DS_DTYPE_F32, R, C, wf, NULL, 0, 0};
        if (t == 1)
            w = (ds_weight){DS_DTYPE_BF16, R, C, wb, NULL, 0, 0};
        if (t == 2)
            w = (ds_weight){DS_DTYPE_F16, R, C, wh, NULL, 0, 0};
        if (t >= 3)
            w = (ds_weight){DS_DTYPE_F8_E4M3, R, C, w8, sc, f8_br[t - 3], f8_bc[t - 3]};
        for (uint32_t n = 1; n <= N; n++) {
            ds_tensor_force_portable(false);
            ds_weight_matmul(&w, x, n, y1, NULL);
            ds_tensor_force_portable(true);
            ds_weight_matmul(&w, x, n, y2, NULL);
            ds_tensor_force_portable(false);
            assert_memory_equal(y1, y2, (size_t)n * R * 4);
            /* the AVX2 GEMM tile where the CPU would take the AVX-512 one */
            ds_tensor_force_avx2(true);
            ds_weight_matmul(&w, x, n, y2, NULL);
            ds_tensor_force_avx2(false);
            assert_memory_equal(y1, y2, (size_t)n * R * 4);
            /* the one-row decode tile one weight row at a time instead of three */
            ds_tensor_set_decode_rows(1);
            ds_weight_matmul(&w, x, n, y2, NULL);
            ds_tensor_set_decode_rows(3);
            assert_memory_equal(y1, y2, (size_t)n * R * 4);
            /* each row alone, and the rows split in uneven ranges on the fast path */
            for (uint32_t i = 0; i < n; i++) {
                ds_weight_matmul(&w, x + (size_t)i * C, 1, y3, NULL);
                assert_memory_equal(y3, y1 + (size_t)i * R, R * 4);
            }
            memset(y3, 0, (size_t)n * R * 4);
            ds_weight_matmul_rows(&w, x, n, y3, 0, 5);
            ds_weight_matmul_rows(&w, x, n, y3, 5, 19);
            ds_weight_matmul_rows(&w, x, n, y3, 19, R);
            assert_memory_equal(y3, y1, (size_t)n * R * 4);
        }
        for (int r = 0; r < R; r++) {
            double ref = 0;
            for (int c = 0; c < C; c++) {
                double wv = t == 0   ? wf[r * C + c]
                            : t == 1 ? ds_bf16_to_f32(wb[r * C + c])
                                     : ds_f16_to_f32(wh[r * C + c]);
                if (t >= 3) {
                    uint32_t nbc = (C + w.block_cols - 1) / w.block_cols;
                    wv = (double)ds_fp8_e4m3_to_f32(w8[r * C + c]) *
                         sc[(r / w.block_rows) * nbc + c / w.block_cols];
                }
                ref += wv * x[c];
            }
            assert_float_equal(y1[r], ref, t >= 3 ? 2e-3 : 1e-4);
        }
    }
    free(w8);
    free(sc);
    free(wb);
    free(wh);
    free(wf);
    free(x);
    free(y1);
    free(y2);
    free(y3);
}

/* The attention products (ds_dot8, ds_wsum, ds_weight_vecmat, ds_weight_dot8_rows) give the
 * same bits on the vector and the portable path, for every weight type and odd lengths. */
static void test_attn_kernels_identity(void **state)
{
    (void)state;
    enum { R = 21, C = 203, NV = 4 }; /* C: a tail after the 8-column steps */
    uint16_t wb[R * C], wh[R * C];
    uint8_t w8[R * C];
    float wf[R * C], a[NV * R], sc[64], v[NV * C];
    uint32_t s = 777;
    for (int i = 0; i < R * C; i++) {
        s = s * 1103515245u + 12345u;
        wf[i] = ((float)(s >> 8) / 16777216.0f - 0.5f);
        wb[i] = ds_f32_to_bf16(wf[i]);
        wh[i] = (uint16_t)((s >> 9) & 0x37ff) | (uint16_t)((s & 1) << 15);
        w8[i] = (uint8_t)((s >> 24) % 0x7e);
    }
    for (int i = 0; i < 64; i++)
        sc[i] = 0.02f * (float)(1 + i % 7);
    for (int i = 0; i < NV * R; i++)
        a[i] = cosf((float)i * 0.7f);
    for (int i = 0; i < NV * C; i++)
        v[i] = sinf((float)i * 0.3f);
    for (uint32_t n = 1; n <= 67; n += 11) {
        float d1[8], d2[8], s1[C], s2[C];
        ds_tensor_force_portable(false);
        ds_dot8_many(v, wf, C, 7, n, d1);
        ds_wsum(a, wf, C, 13, n, s1);
        ds_tensor_force_portable(true);
        ds_dot8_many(v, wf, C, 7, n, d2);
        ds_wsum(a, wf, C, 13, n, s2);
        ds_tensor_force_portable(false);
        assert_memory_equal(d1, d2, sizeof(float) * 7);
        assert_memory_equal(s1, s2, sizeof(float) * n);
    }
    for (int t = 0; t < 4; t++) {
        ds_weight w = {DS_DTYPE_F32, R, C, wf, NULL, 0, 0};
        if (t == 1)
            w = (ds_weight){DS_DTYPE_BF16, R, C, wb, NULL, 0, 0};
        if (t == 2)
            w = (ds_weight){DS_DTYPE_F16, R, C, wh, NULL, 0, 0};
        if (t == 3)
            w = (ds_weight){DS_DTYPE_F8_E4M3, R, C, w8, sc, 8, 64};
        for (uint32_t nv = 1; nv <= NV; nv++) {
            float m1[NV * C], m2[NV * C], o1[NV * R], o2[NV * R];
            ds_tensor_force_portable(false);
            ds_weight_vecmat(&w, 2, 17, a, R, nv, m1, C);
            ds_weight_dot8_rows(&w, 1, 19, v, C, nv, o1, R);
            ds_tensor_force_portable(true);
            ds_weight_vecmat(&w, 2, 17, a, R, nv, m2, C);
            ds_weight_dot8_rows(&w, 1, 19, v, C, nv, o2, R);
            ds_tensor_force_portable(false);
            for (uint32_t i = 0; i < nv; i++) {
                assert_memory_equal(m1 + i * C, m2 + i * C, C * sizeof(float));
                assert_memory_equal(o1 + i * R, o2 + i * R, 19 * sizeof(float));
            }
            /* and against the definition */
            float row[C];
            for (uint32_t c = 0; c < C; c++) {
                double ref = 0;
                for (uint32_t d = 0; d < 17; d++) {
                    ds_weight_row_f32(&w, 2 + d, row);
                    ref += (double)a[d] * row[c];
                }
                assert_float_equal(m1[c], ref, 1e-3 * (1 + fabs(ref)));
            }
        }
    }
}

static void test_sampler(void **state)
{
    (void)state;
    float lg[5] = {0.1f, 2.0f, 1.9f, -1.0f, 0.0f};
    ds_sampler s = {.greedy = true};
    assert_int_equal(ds_sampler_pick(&s, lg, 5), 1);
    s = (ds_sampler){.greedy = false, .temperature = 1.0f, .top_p = 1.0f, .top_k = 1};
    ds_sampler_seed(&s, 7);
    for (int i = 0; i < 20; i++)
        assert_int_equal(ds_sampler_pick(&s, lg, 5), 1);
    s.top_k = 2;
    int seen[5] = {0};
    for (int i = 0; i < 400; i++)
        seen[ds_sampler_pick(&s, lg, 5)]++;
    assert_int_equal(seen[0] + seen[3] + seen[4], 0);
    assert_true(seen[1] > 100 && seen[2] > 100); /* p = 0.525 / 0.475 */
    ds_sampler a = s, b = s;
    ds_sampler_seed(&a, 99);
    ds_sampler_seed(&b, 99);
    a.top_k = b.top_k = 0;
    for (int i = 0; i < 50; i++)
        assert_int_equal(ds_sampler_pick(&a, lg, 5), ds_sampler_pick(&b, lg, 5));
    s.top_k = 0;
    s.top_p = 0.01f;
    assert_int_equal(ds_sampler_pick(&s, lg, 5), 1);
}

static void add_task(void *ctx, uint32_t i)
{
    ((uint64_t *)ctx)[i] = (uint64_t)i * i;
}

static void test_pool(void **state)
{
    (void)state;
    ds_pool *p = NULL;
    int cpus[1] = {0};
    assert_int_equal(ds_pool_new(4, cpus, 1, &p), 0);
    assert_int_equal(ds_pool_size(p), 4);
    uint64_t v[1000];
    for (int r = 0; r < 20; r++) {
        memset(v, 0, sizeof(v));
        ds_pool_run(p, 1000, add_task, v);
        for (uint64_t i = 0; i < 1000; i++)
            assert_int_equal(v[i], i * i);
    }
    assert_null(ds_pool_free(p));
    assert_null(ds_pool_free(NULL));
}

/* ---- config ---- */

static const char v3_cfg[] =
    "{\"architectures\":[\"DeepseekV3ForCausalLM\"],\"vocab_size\":129280,\"hidden_size\":7168,"
    "\"intermediate_size\":18432,\"moe_intermediate_size\":2048,\"num_hidden_layers\":61,"
    "\"num_attention_heads\":128,\"q_lora_rank\":1536,\"kv_lora_rank\":512,"
    "\"qk_nope_head_dim\":128,\"qk_rope_head_dim\":64,\"v_head_dim\":128,"
    "\"n_routed_experts\":256,\"n_shared_experts\":1,\"num_experts_per_tok\":8,\"n_group\":8,"
    "\"topk_group\":4,\"topk_method\":\"noaux_tc\",\"scoring_func\":\"sigmoid\","
    "\"norm_topk_prob\":true,\"routed_scaling_factor\":2.5,\"first_k_dense_replace\":3,"
    "\"moe_layer_freq\":1,\"rms_norm_eps\":1e-06,\"rope_theta\":10000,"
    "\"max_position_embeddings\":163840,\"rope_scaling\":{\"type\":\"yarn\",\"factor\":40,"
    "\"original_max_position_embeddings\":4096,\"beta_fast\":32,\"beta_slow\":1,\"mscale\":1.0,"
    "\"mscale_all_dim\":1.0},\"num_nextn_predict_layers\":1,\"bos_token_id\":0,"
    "\"eos_token_id\":1,\"torch_dtype\":\"bfloat16\",\"quantization_config\":"
    "{\"activation_scheme\":\"dynamic\",\"fmt\":\"e4m3\",\"quant_method\":\"fp8\","
    "\"weight_block_size\":[128,128]}}";

static void test_config_v3(void **state)
{
    (void)state;
    ds_model_config c;
    ds_error err = {0};
    assert_int_equal(ds_model_config_parse(v3_cfg, strlen(v3_cfg), &c, &err), 0);
    assert_int_equal(c.arch, DS_ARCH_DEEPSEEK_V3);
    assert_int_equal(c.hidden_size, 7168);
    assert_int_equal(c.n_group, 8);
    assert_int_equal(c.topk_method, DS_TOPK_NOAUX_TC);
    assert_int_equal(c.scoring_func, DS_SCORING_SIGMOID);
    assert_int_equal(c.dtype, DS_DTYPE_F8_E4M3);
    assert_true(c.rope.yarn);
    assert_float_equal(c.rope.factor, 40, 0);
    assert_int_equal(c.rope.original_max_position_embeddings, 4096);
    assert_int_equal(c.num_nextn_predict_layers, 1);
    assert_false(ds_model_config_layer_is_moe(&c, 2));
    assert_true(ds_model_config_layer_is_moe(&c, 3));
    /* transformers 5 spelling: rope_parameters with rope_type and rope_theta inside, dtype */
    const char *v2 =
        "{\"model_type\":\"deepseek_v2\",\"vocab_size\":100,\"hidden_size\":16,"
        "\"intermediate_size\":32,\"moe_intermediate_size\":8,\"num_hidden_layers\":2,"
        "\"num_attention_heads\":2,\"q_lora_rank\":null,\"kv_lora_rank\":8,"
        "\"qk_nope_head_dim\":4,\"qk_rope_head_dim\":4,\"v_head_dim\":4,\"n_routed_experts\":4,"
        "\"num_experts_per_tok\":2,\"dtype\":\"float16\",\"rope_parameters\":{\"rope_type\":"
        "\"yarn\",\"rope_theta\":500.0,\"factor\":2.0,\"original_max_position_embeddings\":64}}";
    assert_int_equal(ds_model_config_parse(v2, strlen(v2), &c, &err), 0);
    assert_int_equal(c.arch, DS_ARCH_DEEPSEEK_V2);
    assert_int_equal(c.q_lora_rank, 0);
    assert_int_equal(c.scoring_func, DS_SCORING_SOFTMAX);
    assert_int_equal(c.topk_method, DS_TOPK_GREEDY);
    assert_int_equal(c.dtype, DS_DTYPE_F16);
    assert_true(c.rope.yarn);
    assert_float_equal(c.rope.theta, 500.0, 0);
    assert_int_equal(c.n_group, 1);
}

static void expect_cfg_error(const char *from, const char *to, int code, const char *needle)
{
    char buf[sizeof(v3_cfg) + 256];
    const char *p = strstr(v3_cfg, from);
    assert_non_null(p);
    size_t pre = (size_t)(p - v3_cfg);
    snprintf(buf, sizeof(buf), "%.*s%s%s", (int)pre, v3_cfg, to, p + strlen(from));
    ds_model_config c;
    ds_error err = {0};
    assert_int_equal(ds_model_config_parse(buf, strlen(buf), &c, &err), code);
    if (!strstr(ds_error_str(&err), needle))
        fail_msg("error '%s' does not mention '%s'", ds_error_str(&err), needle);
}

static void test_config_bad(void **state)
{
    (void)state;
    expect_cfg_error("\"hidden_size\":7168", "\"hidden_size\":-1", -ERANGE, "hidden_size");
    expect_cfg_error("\"hidden_size\":7168", "\"hidden_size\":99999999999", -ERANGE, "hidden_size");
    expect_cfg_error("\"hidden_size\":7168", "\"hidden_size\":\"big\"", -EBADMSG, "hidden_size");
    expect_cfg_error("\"topk_group\":4", "\"topk_group\":9", -EINVAL, "topk_group");
    expect_cfg_error("\"n_group\":8", "\"n_group\":7", -EINVAL, "n_group");
    expect_cfg_error("\"num_experts_per_tok\":8", "\"num_experts_per_tok\":300", -EINVAL,
                     "num_experts_per_tok");
    expect_cfg_error("\"scoring_func\":\"sigmoid\"", "\"scoring_func\":\"relu\"", -EINVAL,
                     "scoring_func");
    expect_cfg_error("\"type\":\"yarn\"", "\"type\":\"dynamic\"", -EINVAL, "rope_scaling");
    expect_cfg_error("\"qk_rope_head_dim\":64", "\"qk_rope_head_dim\":63", -EINVAL,
                     "qk_rope_head_dim");
    expect_cfg_error("\"eos_token_id\":1", "\"eos_token_id\":999999", -ERANGE, "eos_token_id");
    expect_cfg_error("DeepseekV3ForCausalLM", "LlamaForCausalLM", -EINVAL, "architectures");
    expect_cfg_error("{\"architectures\"", "[{\"architectures\"", -EBADMSG, "JSON");
    ds_model_config c;
    ds_error err = {0};
    assert_int_equal(ds_model_config_parse("[1,2]", 5, &c, &err), -EBADMSG);
    assert_int_equal(ds_model_config_parse("", 0, &c, &err), -EBADMSG);
    assert_int_equal(ds_model_config_load("/nonexistent/config.json", &c, &err), -ENOENT);
}

/* ---- safetensors ---- */

static size_t st_image(uint8_t *buf, const char *json, size_t data_len)
{
    size_t n = strlen(json);
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)((uint64_t)n >> (8 * i));
    memcpy(buf + 8, json, n);
    memset(buf + 8 + n, 0x3c, data_len);
    return 8 + n + data_len;
}

static void expect_st(const char *json, size_t data_len, int code, const char *needle)
{
    uint8_t buf[4096];
    size_t len = st_image(buf, json, data_len);
    ds_st *st = NULL;
    ds_error err = {0};
    int rc = ds_st_open_buffer(buf, len, "x.safetensors", &st, &err);
    assert_int_equal(rc, code);
    if (rc == 0) {
        ds_st_free(st);
        return;
    }
    if (!strstr(ds_error_str(&err), needle) || !strstr(ds_error_str(&err), "x.safetensors"))
        fail_msg("error '%s' does not name x.safetensors and '%s'", ds_error_str(&err), needle);
}

static void test_safetensors_hostile(void **state)
{
    (void)state;
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
              "\"__metadata__\":{\"format\":\"pt\"}}",
              16, 0, "");
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}", 8, -EBADMSG,
              "'a'"); /* truncated data */
    expect_st("{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[0,16]}}", 16, -EBADMSG,
              "'a'"); /* dtype size does not match the span */
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
              "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
              16, -EBADMSG, "overlap");
    expect_st("{\"a\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, -EBADMSG,
              "dtype");
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, -EBADMSG,
              "shape");
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,8],"
              "\"data_offsets\":[0,8]}}",
              8, -EBADMSG, "'a'");
    expect_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, -EBADMSG,
              "'a'");
    expect_st("{\"a\":", 0, -EBADMSG, "JSON");
    /* header length past EOF, and too short for a length at all */
    uint8_t b[16] = {0xff, 0xff, 0, 0, 0, 0, 0, 0, '{', '}'};
    ds_st *st = NULL;
    ds_error err = {0};
    assert_int_equal(ds_st_open_buffer(b, 10, "h.safetensors", &st, &err), -EBADMSG);
    assert_non_null(strstr(ds_error_str(&err), "past the end"));
    assert_int_equal(ds_st_open_buffer(b, 5, "h.safetensors", &st, &err), -EBADMSG);
}

/* A checkpoint dir with a tensor missing, with a wrong shape, or truncated: clear errors. */
static void copy_file(const char *from, const char *to, long truncate_to)
{
    FILE *a = fopen(from, "rb"), *b = fopen(to, "wb");
    assert_non_null(a);
    assert_non_null(b);
    char buf[65536];
    size_t n;
    long total = 0;
    while ((n = fread(buf, 1, sizeof(buf), a)) > 0) {
        if (truncate_to >= 0 && total + (long)n > truncate_to)
            n = (size_t)(truncate_to - total);
        fwrite(buf, 1, n, b);
        total += (long)n;
        if (truncate_to >= 0 && total >= truncate_to)
            break;
    }
    fclose(a);
    fclose(b);
}

static void test_checkpoint_hostile(void **state)
{
    (void)state;
    char dir[] = "/tmp/ds_test_model_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char cfg[600], st[600];
    snprintf(cfg, sizeof(cfg), "%s/config.json", dir);
    snprintf(st, sizeof(st), "%s/model.safetensors", dir);
    copy_file(REF "v2_greedy/config.json", cfg, -1);
    ds_model *m = NULL;
    ds_error err = {0};
    /* truncated weights */
    copy_file(REF "v2_greedy/model.safetensors", st, 5000);
    assert_int_equal(ds_model_open(dir, NULL, &m, &err), -EBADMSG);
    assert_non_null(strstr(ds_error_str(&err), "model.safetensors"));
    /* missing tensor: rename one in the header (same length keeps offsets valid) */
    copy_file(REF "v2_greedy/model.safetensors", st, -1);
    FILE *f = fopen(st, "r+b");
    assert_non_null(f);
    char hdr[8192];
    size_t n = fread(hdr, 1, sizeof(hdr), f);
    char *p = memmem(hdr, n, "model.norm.weight", 17);
    assert_non_null(p);
    p[6] = 'X';
    fseek(f, p - hdr, SEEK_SET);
    fwrite(p, 1, 17, f);
    fclose(f);
    assert_int_equal(ds_model_open(dir, NULL, &m, &err), -ENOENT);
    assert_non_null(strstr(ds_error_str(&err), "model.norm.weight"));
    /* shape that does not match the config */
    copy_file(REF "v2_greedy/model.safetensors", st, -1);
    f = fopen(cfg, "w");
    FILE *g = fopen(REF "v2_greedy/config.json", "r");
    char text[8192];
    size_t tl = fread(text, 1, sizeof(text) - 1, g);
    text[tl] = 0;
    fclose(g);
    char *h = strstr(text, "\"intermediate_size\": 64");
    assert_non_null(h);
    memcpy(h, "\"intermediate_size\": 65", 23);
    fwrite(text, 1, tl, f);
    fclose(f);
    assert_int_equal(ds_model_open(dir, NULL, &m, &err), -EBADMSG);
    assert_non_null(strstr(ds_error_str(&err), "model.layers.0.mlp.gate_proj.weight"));
    /* bad JSON config */
    f = fopen(cfg, "w");
    fputs("{\"vocab_size\": 12,", f);
    fclose(f);
    assert_int_equal(ds_model_open(dir, NULL, &m, &err), -EBADMSG);
    assert_non_null(strstr(ds_error_str(&err), "config.json"));
    unlink(cfg);
    unlink(st);
    rmdir(dir);
}

/* The external interface: dsctl generate --local ... --logits-out FILE, last line tokens. */
static void test_dsctl_generate(void **state)
{
    (void)state;
    const char *names[] = {"v3_qlora_group_yarn", "v2_group_limited", "v3_fp8"};
    for (int mi = 0; mi < 3; mi++) {
        int32_t prompt[64], gen[64];
        uint32_t np, ng;
        size_t nref;
        read_ref(names[mi], 1, prompt, &np, gen, &ng);
        float *ref = read_f32(names[mi], 1, &nref);
        char cmd[2048], toks[512] = "", out[4096] = "", last[4096] = "";
        for (uint32_t i = 0; i < np; i++)
            snprintf(toks + strlen(toks), sizeof(toks) - strlen(toks), "%s%d", i ? "," : "",
                     prompt[i]);
        char lpath[] = "/tmp/ds_test_logits_XXXXXX";
        int fd = mkstemp(lpath);
        assert_true(fd >= 0);
        close(fd);
        snprintf(cmd, sizeof(cmd),
                 DS_BINARY_ROOT "/client/dsctl generate --local --model " REF
                                "%s --tokens %s --max-tokens %u --greedy --logits-out %s "
                                "--threads 2",
                 names[mi], toks, ng, lpath);
        FILE *p = popen(cmd, "r");
        assert_non_null(p);
        while (fgets(out, sizeof(out), p))
            memcpy(last, out, sizeof(out));
        assert_int_equal(pclose(p), 0);
        char want[1024] = "tokens: ";
        for (uint32_t i = 0; i < ng; i++)
            snprintf(want + strlen(want), sizeof(want) - strlen(want), "%s%d", i ? "," : "",
                     gen[i]);
        strcat(want, "\n");
        assert_string_equal(last, want);
        FILE *f = fopen(lpath, "rb");
        assert_non_null(f);
        float *got = malloc((nref + 1) * sizeof(float));
        assert_int_equal(fread(got, sizeof(float), nref + 1, f), nref);
        fclose(f);
        unlink(lpath);
        for (size_t i = 0; i < nref; i++)
            assert_true(fabs((double)got[i] - ref[i]) <= 1e-3);
        free(got);
        free(ref);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_v3),
        cmocka_unit_test(test_config_bad),
        cmocka_unit_test(test_conversions),
        cmocka_unit_test(test_fp8_matmul),
        cmocka_unit_test(test_fp8_dequant_exhaustive),
        cmocka_unit_test(test_safetensors_hostile),
        cmocka_unit_test(test_checkpoint_hostile),
        cmocka_unit_test(test_router_inf_mask),
        cmocka_unit_test(test_router_group_top2),
        cmocka_unit_test(test_router_v2),
        cmocka_unit_test(test_combine_and_group),
        cmocka_unit_test(test_kernel_identity),
        cmocka_unit_test(test_attn_kernels_identity),
        cmocka_unit_test(test_sampler),
        cmocka_unit_test(test_pool),
        cmocka_unit_test(test_units_separable),
        cmocka_unit_test(test_open_subset),
        cmocka_unit_test(test_reference_logits),
        cmocka_unit_test(test_bit_identity),
        cmocka_unit_test(test_fast_path_identity),
        cmocka_unit_test(test_moe_batched),
        cmocka_unit_test(test_kv_vs_recompute),
        cmocka_unit_test(test_dsctl_generate),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
