/* engine.c — chains the units for a batch of rows on one machine (see ds_engine.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "ds_engine.h"
#include "ds_experts.h"

#define ENGINE_MAX_SEQS 4096

struct ds_engine {
    const ds_model *m;
    ds_pool *pool;
    uint32_t max_positions;
    ds_kv_cache **seqs; /* [ENGINE_MAX_SEQS], NULL = free slot */
    ds_moe_runner_fn runner; /* NULL: ds_moe_run_experts on m */
    void *runner_ctx;        /* borrowed, passed to runner */
};

int ds_engine_new(const ds_model *m, ds_pool *pool, uint32_t max_positions, ds_engine **ret,
                  ds_error *err)
{
    ds_engine *e = calloc(1, sizeof(*e));
    if (!e || !(e->seqs = calloc(ENGINE_MAX_SEQS, sizeof(*e->seqs)))) {
        free(e);
        return ds_error_set(err, -ENOMEM, "engine: out of memory");
    }
    e->m = m;
    e->pool = pool;
    e->max_positions = max_positions;
    *ret = e;
    return 0;
}

void ds_engine_set_moe_runner(ds_engine *e, ds_moe_runner_fn fn, void *ctx)
{
    e->runner = fn;
    e->runner_ctx = fn ? ctx : NULL;
}

ds_engine *ds_engine_free(ds_engine *e)
{
    if (!e)
        return NULL;
    for (int i = 0; i < ENGINE_MAX_SEQS; i++)
        ds_kv_cache_free(e->seqs[i]);
    free(e->seqs);
    free(e);
    return NULL;
}

int ds_engine_seq_add(ds_engine *e)
{
    const ds_model_config *c = ds_model_get_config(e->m);
    for (int i = 0; i < ENGINE_MAX_SEQS; i++) {
        if (e->seqs[i])
            continue;
        int rc = ds_kv_cache_new(c, 0, c->num_hidden_layers, e->max_positions, &e->seqs[i]);
        return rc < 0 ? rc : i;
    }
    return -ENOSPC;
}

void ds_engine_seq_remove(ds_engine *e, int seq)
{
    if (seq >= 0 && seq < ENGINE_MAX_SEQS)
        e->seqs[seq] = ds_kv_cache_free(e->seqs[seq]);
}

uint32_t ds_engine_seq_len(const ds_engine *e, int seq)
{
    if (seq < 0 || seq >= ENGINE_MAX_SEQS || !e->seqs[seq])
        return 0;
    return ds_kv_cache_len(e->seqs[seq], 0);
}

int ds_engine_forward(ds_engine *e, uint32_t n, const int *seqs, const int32_t *tokens,
                      float *logits, ds_error *err)
{
    const ds_model *m = e->m;
    const ds_model_config *c = ds_model_get_config(m);
    uint32_t D = c->hidden_size, k = c->num_experts_per_tok ? c->num_experts_per_tok : 1;
    if (n == 0)
        return 0;
    int rc = -ENOMEM;
    uint32_t *pos = calloc(n, sizeof(*pos));
    ds_kv_cache **caches = calloc(n, sizeof(*caches));
    float *x = malloc((size_t)n * D * sizeof(float));
    float *h = malloc((size_t)n * D * sizeof(float));
    float *fin = malloc((size_t)n * D * sizeof(float));
    float *tmp = malloc((size_t)n * D * sizeof(float));
    float *eo = malloc((size_t)n * k * D * sizeof(float));
    int32_t *ids = malloc((size_t)n * k * sizeof(int32_t));
    float *w = malloc((size_t)n * k * sizeof(float));
    if (!pos || !caches || !x || !h || !fin || !tmp || !eo || !ids || !w) {
        ds_error_set(err, rc, "engine: out of memory");
        goto out;
    }
    for (uint32_t i = 0; i < n; i++) {
        if (seqs[i] < 0 || seqs[i] >= ENGINE_MAX_SEQS || !e->seqs[seqs[i]]) {
            rc = ds_error_set(err, -EINVAL, "engine: row %u names unknown sequence %d", i, seqs[i]);
            goto out;
        }
        caches[i] = e->seqs[seqs[i]];
        pos[i] = ds_kv_cache_len(caches[i], 0);
        for (uint32_t j = 0; j < i; j++)
            if (seqs[j] == seqs[i])
                pos[i]++;
    }
    if ((rc = ds_unit_embed(m, e->pool, tokens, n, x, err)) < 0)
        goto out;
    for (uint32_t l = 0; l < c->num_hidden_layers; l++) {
        ds_attn_out ao = {h, fin, ids, w};
        if ((rc = ds_unit_attn(m, e->pool, l, x, n, pos, caches, &ao, err)) < 0)
            goto out;
        if (ds_model_config_layer_is_moe(c, l)) {
            rc = e->runner ? e->runner(e->runner_ctx, l, fin, n, ids, eo, err)
                           : ds_moe_run_experts(m, e->pool, l, fin, n, ids, eo, err);
            if (rc < 0)
                goto out;
            const float *sh = NULL;
            if (c->n_shared_experts) {
                if ((rc = ds_unit_shared(m, e->pool, l, fin, n, tmp, err)) < 0)
                    goto out;
                sh = tmp;
            }
            ds_moe_combine(D, n, k, w, eo, sh, h);
        } else {
            if ((rc = ds_unit_dense(m, e->pool, l, fin, n, tmp, err)) < 0)
                goto out;
            ds_unit_add(D, n, tmp, h);
        }
        float *t = x;
        x = h;
        h = t;
    }
    rc = logits ? ds_unit_head(m, e->pool, x, n, logits, err) : 0;
out:
    free(pos);
    free(caches);
    free(x);
    free(h);
    free(fin);
    free(tmp);
    free(eo);
    free(ids);
    free(w);
    return rc;
}
