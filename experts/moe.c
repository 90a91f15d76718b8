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
    uint32_t *off = malloc((c->n_routed_experts + 1) * sizeof(uint32_t));
    float *in = malloc(slots * D * sizeof(float) + 1);
    float *res = malloc(slots * D * sizeof(float) + 1);
    if (!act || !off || !in || !res) {
        rc = ds_error_set(err, -ENOMEM, "layer %u: out of memory", layer);
        goto out;
    }
    /* Rows gathered once in group order: expert e's rows are in[offsets[e] .. offsets[e+1]). */
    for (size_t j = 0; j < slots; j++)
        memcpy(in + j * D, ffn_in + (size_t)(g.order[j] / k) * D, D * sizeof(float));
    off[0] = 0;
    for (uint32_t e = 0; e < c->n_routed_experts; e++)
        if (g.offsets[e + 1] > g.offsets[e]) {
            act[n_act++] = e;
            off[n_act] = g.offsets[e + 1];
        }
    /* Every active expert in one job of two parallel loops (ds_unit_experts): one pool
     * wake-up per phase for the whole layer, whatever the thread count. */
    if ((rc = ds_unit_experts(m, pool, layer, n_act, act, off, in, res, err)) < 0)
        goto out;
    for (size_t j = 0; j < slots; j++)
        memcpy(out + (size_t)g.order[j] * D, res + j * D, D * sizeof(float));
out:
    free(act);
    free(off);
    free(in);
    free(res);
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
