/* test_tiny_model.c — the shipped models/tiny (a trained DeepSeek-V3, BF16) end to end:
 * the C tokenizer turns each reference prompt's text into HF's ids (with BOS), the engine's
 * logits match HF transformers' (tests/data/tiny_ref, made by tools/train_tiny.py) within
 * 1e-3 at every prompt and decode position, and the greedy continuation is token-identical,
 * so the decoded text is HF's text. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "model_test_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds_engine.h"
#include "ds_model.h"
#include "ds_pool.h"
#include "ds_tokenizer.h"

/* DS_TINY_DIR / DS_TINY_REF override the model and reference folders (to check a retrained
 * model before it replaces the shipped one). */
static const char *tiny_dir(void)
{
    const char *e = getenv("DS_TINY_DIR");
    return e ? e : DS_SOURCE_ROOT "/models/tiny";
}
static const char *ref_dir(void)
{
    const char *e = getenv("DS_TINY_REF");
    return e ? e : DS_TEST_DATA "/tiny_ref";
}
#define N_PROMPTS 4

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

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    assert_int_equal(fread(b, 1, (size_t)n, f), (size_t)n);
    b[n] = '\0';
    fclose(f);
    *len = (size_t)n;
    return b;
}

static void test_tiny_vs_hf(void **state)
{
    (void)state;
    ds_error err = {0};
    ds_model *m = NULL;
    if (ds_model_open(tiny_dir(), NULL, &m, &err) < 0)
        fail_msg("%s", ds_error_str(&err));
    ds_tokenizer *tok = NULL;
    if (ds_tokenizer_load(tiny_dir(), &tok, &err) < 0)
        fail_msg("%s", ds_error_str(&err));
    const ds_model_config *c = ds_model_get_config(m);
    uint32_t V = c->vocab_size;
    assert_int_equal(ds_tokenizer_vocab_size(tok), V);
    assert_true(c->n_routed_experts >= 8 && c->n_group >= 4 && c->topk_group < c->n_group);
    assert_true(c->n_shared_experts >= 1 && c->first_k_dense_replace >= 1);
    ds_pool *pool = NULL;
    assert_int_equal(ds_pool_new(2, NULL, 0, &pool), 0);
    for (int p = 0; p < N_PROMPTS; p++) {
        char path[512], *lines;
        size_t len;
        snprintf(path, sizeof(path), "%s/ref_%d.txt", ref_dir(), p);
        lines = read_file(path, &len);
        int32_t prompt[256], gen[256];
        uint32_t np = parse_ids(lines, prompt, 256);
        uint32_t ng = parse_ids(strchr(lines, '\n') + 1, gen, 256);
        free(lines);
        assert_true(np >= 2 && ng >= 16);

        /* The C tokenizer on the prompt text gives HF's ids, BOS first. */
        snprintf(path, sizeof(path), "%s/ref_%d.prompt", ref_dir(), p);
        char *text = read_file(path, &len);
        int32_t *ids;
        size_t nids;
        assert_int_equal(ds_tokenizer_encode(tok, text, len, true, &ids, &nids, &err), 0);
        assert_int_equal(nids, np);
        assert_memory_equal(ids, prompt, np * sizeof(*ids));
        free(ids);

        snprintf(path, sizeof(path), "%s/ref_%d.f32", ref_dir(), p);
        char *raw = read_file(path, &len);
        assert_int_equal(len, (size_t)(np + ng - 1) * V * sizeof(float));
        const float *ref = (const float *)raw;

        ds_engine *e = NULL;
        assert_int_equal(ds_engine_new(m, pool, 512, &e, &err), 0);
        int seq = ds_engine_seq_add(e);
        assert_true(seq >= 0);
        float *lg = malloc((size_t)(np + ng) * V * sizeof(float));
        int seqs[256];
        for (uint32_t i = 0; i < np; i++)
            seqs[i] = seq;
        assert_int_equal(ds_engine_forward(e, np, seqs, prompt, lg, &err), 0);
        uint32_t rows = np;
        int32_t out[256];
        for (uint32_t s = 0; s < ng; s++) {
            out[s] = test_argmax(lg + (size_t)(rows - 1) * V, V);
            if (out[s] != gen[s])
                fail_msg("prompt %d: step %u token %d, HF %d", p, s, out[s], gen[s]);
            if (s + 1 == ng)
                break;
            assert_int_equal(ds_engine_forward(e, 1, &seq, &out[s], lg + (size_t)rows * V, &err),
                             0);
            rows++;
        }
        double md = 0;
        for (size_t i = 0; i < (size_t)(np + ng - 1) * V; i++)
            md = fmax(md, fabs((double)lg[i] - ref[i]));
        printf("tiny prompt %d: %u prompt + %u generated tokens, max |logit diff| vs HF %.3g\n", p,
               np, ng, md);
        if (!(md <= 1e-3))
            fail_msg("prompt %d: max |diff| %g > 1e-3", p, md);
        char *dec;
        size_t dl;
        assert_int_equal(ds_tokenizer_decode(tok, out, ng, true, &dec, &dl, &err), 0);
        printf("  %s|%s\n", text, dec);
        free(dec);
        free(lg);
        free(raw);
        free(text);
        ds_engine_free(e);
    }
    ds_pool_free(pool);
    ds_tokenizer_free(tok);
    ds_model_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_vs_hf),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
