/* moe.c — grouping routed slots per expert, running hosted experts, fixed-order combine. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ds_experts.h"
#include "ds_pool.h"

int ds_moe_group(uint32_t n, uint32_t k, const int32_t *ids, uint32_t n_experts, ds_moe_groups *g)
{
    memset(g, 0, sizeof(*g));
    g->n_experts = n_experts;
    g->offsets = calloc((size_t)n_experts + 1, sizeof(uint32_t));
    g->order = malloc((size_t)n * k * sizeof(uint32_t) + 1);
    if (!g->offsets || !g->order) {
        ds_moe_groups_clear(g);
        return -ENOMEM;
    }
    for (size_t i = 0; i < (size_t)n * k; i++) {
        if (ids[i] < 0 || (uint32_t)ids[i] >= n_experts) {
            ds_moe_groups_clear(g);
            return -ERANGE;
        }
        g->offsets[ids[i] + 1]++;
    }
    for (uint32_t e = 0; e < n_experts; e++)
        g->offsets[e + 1] += g->offsets[e];
    uint32_t *fill = calloc(n_experts + 1, sizeof(uint32_t));
    if (!fill) {
        ds_moe_groups_clear(g);
        return -ENOMEM;
    }
    for (size_t i = 0; i < (size_t)n * k; i++) {
        uint32_t e = (uint32_t)ids[i];
        g->order[g->offsets[e] + fill[e]++] = (uint32_t)i;
    }
    free(fill);
    return 0;
}

void ds_moe_groups_clear(ds_moe_groups *g)
{
    free(g->offsets);
    free(g->order);
    memset(g, 0, sizeof(*g));
}

/* One parallel loop over the active experts of a layer: task j runs expert act[j] on its rows
 * single-threaded. ds_weight_matmul's values do not depend on the thread count, so this gives
 * the same bits as running each expert on the whole pool, with one pool wake-up per layer
 * instead of three per expert. */
typedef struct moe_batch {
    const ds_model *m;
    uint32_t layer, D;
    const ds_moe_groups *g;
    const uint32_t *act; /* [n_act] expert ids with rows */
    const float *in;     /* [n*k, D] rows gathered in group order */
    float *res;          /* [n*k, D] results in group order */
    int *rc;             /* [n_act] per-task status */
    ds_error *errs;      /* [n_act] per-task error context */
} moe_batch;

static void moe_batch_task(void *arg, uint32_t j)
{
    moe_batch *t = arg;
    uint32_t e = t->act[j], b = t->g->offsets[e], cnt = t->g->offsets[e + 1] - b;
    t->rc[j] = ds_unit_expert(t->m, NULL, t->layer, e, t->in + (size_t)b * t->D, cnt,
                              t->res + (size_t)b * t->D, &t->errs[j]);
}

int ds_moe_run_experts(const ds_model *m, ds_pool *pool, uint32_t layer, const float *ffn_in,
                       uint32_t n, const int32_t *ids, float *out, ds_error *err)
{
    const ds_model_config *c = ds_model_get_config(m);
    uint32_t D = c->hidden_size, k = c->num_experts_per_tok;
    size_t slots = (size_t)n * k;
    ds_moe_groups g;
    int rc = ds_moe_group(n, k, ids, c->n_routed_experts, &g);
    if (rc < 0)
        return ds_error_set(err, rc, "layer %u: bad routing ids", layer);
    uint32_t *act = malloc(c->n_routed_experts * sizeof(uint32_t) + 1), n_act = 0;
    float *in = malloc(slots * D * sizeof(float) + 1);
    float *res = malloc(slots * D * sizeof(float) + 1);
    int *rcs = NULL;
    ds_error *errs = NULL;
    if (!act || !in || !res) {
        rc = ds_error_set(err, -ENOMEM, "layer %u: out of memory", layer);
        goto out;
    }
    /* Rows gathered once in group order: expert e's rows are in[offsets[e] .. offsets[e+1]). */
    for (size_t j = 0; j < slots; j++)
        memcpy(in + j * D, ffn_in + (size_t)(g.order[j] / k) * D, D * sizeof(float));
    for (uint32_t e = 0; e < c->n_routed_experts; e++)
        if (g.offsets[e + 1] > g.offsets[e])
            act[n_act++] = e;
    /* Batch when every thread gets at least one expert; with fewer active experts than
     * threads (decode on a big pool) each expert's matmuls use the whole pool instead. */
    uint32_t threads = ds_pool_size(pool);
    if (threads > 1 && n_act >= threads) {
        rcs = calloc(n_act, sizeof(*rcs));
        errs = calloc(n_act, sizeof(*errs));
        if (!rcs || !errs) {
            rc = ds_error_set(err, -ENOMEM, "layer %u: out of memory", layer);
            goto out;
        }
        moe_batch t = {m, layer, D, &g, act, in, res, rcs, errs};
        ds_pool_run(pool, n_act, moe_batch_task, &t);
        for (uint32_t j = 0; j < n_act; j++)
            if (rcs[j] < 0) {
                rc = rcs[j];
                if (err)
                    *err = errs[j];
                goto out;
            }
    } else {
        for (uint32_t j = 0; j < n_act; j++) {
            uint32_t e = act[j], b = g.offsets[e], cnt = g.offsets[e + 1] - b;
            if ((rc = ds_unit_expert(m, pool, layer, e, in + (size_t)b * D, cnt,
                                     res + (size_t)b * D, err)) < 0)
                goto out;
        }
    }
    for (size_t j = 0; j < slots; j++)
        memcpy(out + (size_t)g.order[j] * D, res + j * D, D * sizeof(float));
out:
    free(act);
    free(in);
    free(res);
    free(rcs);
    free(errs);
    ds_moe_groups_clear(&g);
    return rc;
}

void ds_moe_combine(uint32_t d, uint32_t n, uint32_t k, const float *weights,
                    const float *expert_out, const float *shared, float *hidden)
{
    for (uint32_t i = 0; i < n; i++) {
        float *h = hidden + (size_t)i * d;
        for (uint32_t c = 0; c < d; c++) {
            float y = 0;
            for (uint32_t s = 0; s < k; s++)
                y = fmaf(weights[(size_t)i * k + s], expert_out[((size_t)i * k + s) * d + c], y);
            if (shared)
                y += shared[(size_t)i * d + c];
            h[c] += y;
        }
    }
}
