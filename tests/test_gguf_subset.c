/* test_gguf_subset.c — a GGUF model opened for some units only reads those units' tensors
 * (ds_model_gguf_tensors_used), and the small GGUF the daemon streams to a node without a copy
 * (ds_gguf_subset_header + those tensors' bytes) opens with the same loader and computes those
 * units bit for bit like the whole file.
 *
 * Independent checks: the tensors used are compared with the unit each tensor's name belongs to
 * (llama.cpp's naming, parsed here with sscanf, not the loader's tables); the subset file's
 * outputs with the original file's outputs; its metadata with the original's config and
 * tokenizer keys. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ds_gguf.h"
#include "ds_model.h"

#define GREF DS_TEST_DATA "/gguf_ref/"

/* The units of the test: attention of layer 2, experts 3 of layer 1 and 5 of layer 2. */
static bool want(void *ctx, enum ds_unit_kind k, uint32_t l, uint32_t e)
{
    (void)ctx;
    return (k == DS_UNIT_ATTN && l == 2) || (k == DS_UNIT_EXPERT && l == 1 && e == 3) ||
           (k == DS_UNIT_EXPERT && l == 2 && e == 5);
}

/* Whether tensor `name` belongs to one of want()'s units, by llama.cpp's tensor naming. */
static bool name_wanted(const char *name)
{
    unsigned l;
    char what[64];
    if (sscanf(name, "blk.%u.%63[a-z_].", &l, what) != 2)
        return false; /* token_embd, output, output_norm: embed / head */
    size_t n = strlen(what);
    if (n > 5 && !strcmp(what + n - 5, "_exps"))
        return l == 1 || l == 2; /* a stacked tensor holds the wanted expert */
    if (!strcmp(what, "ffn_gate") || !strcmp(what, "ffn_up") || !strcmp(what, "ffn_down") ||
        strstr(what, "_shexp"))
        return false; /* dense and shared FFNs */
    return l == 2;    /* attention, norms, router of layer 2 */
}

static void test_tensors_used(void **state)
{
    (void)state;
    ds_model *m = NULL;
    ds_error err = {0};
    ds_model_open_opts o = {.want = want};
    if (ds_model_open(GREF "tiny-Q4_K_M.gguf", &o, &m, &err) < 0)
        fail_msg("%s", ds_error_str(&err));
    const ds_gguf_tensor **t = NULL;
    size_t n = 0;
    assert_int_equal(ds_model_gguf_tensors_used(m, &t, &n), 0);
    const ds_st_tensor **st = NULL;
    size_t sn;
    assert_int_equal(ds_model_tensors_used(m, &st, &sn), -EMEDIUMTYPE);
    /* every tensor read is one of the units', and every one of the units' is read */
    size_t expect = 0;
    const ds_gguf *g = ds_model_gguf(m);
    for (size_t i = 0; i < ds_gguf_tensor_count(g); i++)
        expect += name_wanted(ds_gguf_tensor_at(g, i)->name);
    for (size_t i = 0; i < n; i++)
        if (!name_wanted(t[i]->name))
            fail_msg("read '%s', which none of the bound units needs", t[i]->name);
    assert_int_equal(n, expect);
    assert_true(n >= 15);
    free(t);
    ds_model_free(m);
}

/* Writes the subset GGUF of m's bound units to path (header, then each tensor at its offset). */
static void write_subset(ds_model *m, const char *path)
{
    const ds_gguf_tensor **t = NULL;
    size_t n = 0;
    assert_int_equal(ds_model_gguf_tensors_used(m, &t, &n), 0);
    uint64_t *off = calloc(n, sizeof *off), data_len = 0;
    uint8_t *hdr = NULL;
    size_t hl = 0;
    ds_error err = {0};
    if (ds_gguf_subset_header(ds_model_gguf(m), t, n, &hdr, &hl, off, &data_len, &err) < 0)
        fail_msg("%s", ds_error_str(&err));
    assert_int_equal(hl % ds_gguf_alignment(ds_model_gguf(m)), 0);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(hdr, 1, hl, f), hl);
    uint8_t *data = calloc(1, data_len + 1);
    for (size_t i = 0; i < n; i++)
        memcpy(data + off[i], t[i]->data, t[i]->nbytes);
    assert_int_equal(fwrite(data, 1, data_len, f), data_len);
    fclose(f);
    free(data);
    free(hdr);
    free(off);
    free(t);
}

static void test_subset_opens_and_matches(void **state)
{
    (void)state;
    ds_model *m = NULL, *s = NULL;
    ds_error err = {0};
    ds_model_open_opts o = {.want = want};
    assert_int_equal(ds_model_open(GREF "tiny-Q4_K_M.gguf", &o, &m, &err), 0);
    char path[] = "/tmp/test_gguf_subset.XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    write_subset(m, path);
    if (ds_model_open(path, &o, &s, &err) < 0)
        fail_msg("subset: %s", ds_error_str(&err));
    /* the same config (metadata carried over) */
    const ds_model_config *cm = ds_model_get_config(m), *cs = ds_model_get_config(s);
    assert_int_equal(cm->num_hidden_layers, cs->num_hidden_layers);
    assert_int_equal(cm->hidden_size, cs->hidden_size);
    assert_int_equal(cm->vocab_size, cs->vocab_size);
    assert_int_equal(cm->n_routed_experts, cs->n_routed_experts);
    assert_int_equal(cm->kv_lora_rank, cs->kv_lora_rank);
    /* (tie_word_embeddings is the loader's reading of output.weight's absence: only the host
     * of head, which the subset does not hold, binds either) */
    assert_true(cm->rms_norm_eps == cs->rms_norm_eps && cm->rope.theta == cs->rope.theta);
    const ds_gguf *gs = ds_model_gguf(s);
    assert_null(ds_gguf_kv_find(gs, "split.count"));
    assert_non_null(ds_gguf_kv_find(gs, "tokenizer.ggml.tokens"));
    const ds_gguf_tensor **ts = NULL;
    size_t ns = 0;
    assert_int_equal(ds_model_gguf_tensors_used(s, &ts, &ns), 0);
    assert_int_equal(ns, ds_gguf_tensor_count(gs)); /* it holds nothing else */
    free(ts);
    /* the experts compute the same bits */
    const ds_model_config *c = ds_model_get_config(m);
    uint32_t D = c->hidden_size, rows = 3;
    float *in = malloc(sizeof(float) * D * rows), *a = malloc(sizeof(float) * D * rows),
          *b = malloc(sizeof(float) * D * rows);
    for (uint32_t i = 0; i < D * rows; i++)
        in[i] = (float)((i * 2654435761u) % 1000) / 500.0f - 1.0f;
    uint32_t le[2][2] = {{1, 3}, {2, 5}};
    for (int k = 0; k < 2; k++) {
        assert_int_equal(ds_unit_expert(m, NULL, le[k][0], le[k][1], in, rows, a, &err), 0);
        assert_int_equal(ds_unit_expert(s, NULL, le[k][0], le[k][1], in, rows, b, &err), 0);
        assert_memory_equal(a, b, sizeof(float) * D * rows);
    }
    /* an expert the subset does not hold is not bound there either */
    assert_int_equal(ds_unit_expert(s, NULL, 1, 4, in, rows, b, &err), -ENOENT);
    free(in);
    free(a);
    free(b);
    ds_model_free(s);
    ds_model_free(m);
    unlink(path);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tensors_used),
        cmocka_unit_test(test_subset_opens_and_matches),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
