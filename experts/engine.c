/* engine.c — chains the units for a batch of rows on one machine (see ds_engine.h): embed,
 * the layer step of ds_layer.h for every layer (experts run synchronously, on the model's CPU
 * experts or the runner the caller set), head. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "ds_engine.h"
#include "ds_experts.h"
#include "ds_layer.h"

#define ENGINE_MAX_SEQS 4096

struct ds_engine {
    const ds_model *m;
    ds_pool *pool;
    uint32_t max_positions;
    ds_seqs *seqs;                   /* every layer; a sequence's handle is its slot */
    uint64_t next_id;                /* ids of the sequence table */
    ds_moe_runner_fn runner;         /* NULL: ds_moe_run_experts on m */
    void *runner_ctx;                /* borrowed, passed to runner */
    const ds_unit_runner_ops *units; /* NULL: the CPU units */
    void *units_ctx;
};

void ds_engine_set_units(ds_engine *e, const struct ds_unit_runner_ops *ops, void *ctx)
{
    e->units = ops;
    e->units_ctx = ops ? ctx : NULL;
}

int ds_engine_new(const ds_model *m, ds_pool *pool, uint32_t max_positions, ds_engine **ret,
                  ds_error *err)
{
    ds_engine *e = calloc(1, sizeof(*e));
    if (!e || ds_seqs_new(ds_model_get_config(m), NULL, ENGINE_MAX_SEQS,
                          max_positions ? max_positions : 1, &e->seqs) < 0) {
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
    ds_seqs_free(e->seqs);
    free(e);
    return NULL;
}

int ds_engine_seq_add(ds_engine *e)
{
    return ds_seqs_find(e->seqs, ++e->next_id, true);
}

void ds_engine_seq_remove(ds_engine *e, int seq)
{
    ds_seqs_remove_slot(e->seqs, seq);
}

uint32_t ds_engine_seq_len(const ds_engine *e, int seq)
{
    return ds_seqs_len(e->seqs, seq, 0);
}

/* The caller's ds_moe_runner_fn as an expert runner (synchronous). */
static int fn_run(void *ctx, uint32_t layer, const float *ffn_in, uint32_t n, const int32_t *ids,
                  const float *weights, float *out, ds_error *err)
{
    const ds_engine *e = ctx;
    (void)weights;
    int rc = e->runner(e->runner_ctx, layer, ffn_in, n, ids, out, err);
    return rc < 0 ? rc : DS_LAYER_DONE;
}

static const ds_expert_runner_ops fn_runner_ops = {.run = fn_run};

int ds_engine_forward(ds_engine *e, uint32_t n, const int *seqs, const int32_t *tokens,
                      float *logits, ds_error *err)
{
    const ds_model *m = e->m;
    const ds_model_config *c = ds_model_get_config(m);
    if (n == 0)
        return 0;
    ds_layer_step *st = NULL;
    uint32_t *pos = calloc(n, sizeof(*pos));
    int rc = pos ? ds_layer_step_new(m, e->pool, e->seqs, n, &st, err)
                 : ds_error_set(err, -ENOMEM, "engine: out of memory");
    if (rc < 0)
        goto out;
    for (uint32_t i = 0; i < n; i++) {
        if (!ds_seqs_slot_used(e->seqs, seqs[i])) {
            rc = ds_error_set(err, -EINVAL, "engine: row %u names unknown sequence %d", i, seqs[i]);
            goto out;
        }
        pos[i] = ds_seqs_len(e->seqs, seqs[i], 0);
        for (uint32_t j = 0; j < i; j++)
            if (seqs[j] == seqs[i])
                pos[i]++;
    }
    ds_layer_step_set_rows(st, n, seqs, pos);
    ds_layer_step_set_units(st, e->units, e->units_ctx);
    rc = e->units && e->units->embed
             ? e->units->embed(e->units_ctx, tokens, n, ds_layer_step_x(st), err)
             : ds_unit_embed(m, e->pool, tokens, n, ds_layer_step_x(st), err);
    if (rc < 0)
        goto out;
    ds_expert_runner_cpu cpu = {m, e->pool};
    const ds_expert_runner_ops *ops = e->runner ? &fn_runner_ops : &ds_expert_runner_cpu_ops;
    void *ctx = e->runner ? (void *)e : (void *)&cpu;
    for (uint32_t l = 0; l < c->num_hidden_layers; l++)
        if ((rc = ds_layer_step_run(st, l, ops, ctx, err)) < 0)
            goto out;
    if (logits && e->units && e->units->head)
        rc = e->units->head(e->units_ctx, ds_layer_step_x(st), n, logits, err);
    else
        rc = logits ? ds_unit_head(m, e->pool, ds_layer_step_x(st), n, logits, err) : 0;
out:
    ds_layer_step_free(st);
    free(pos);
    return rc;
}
