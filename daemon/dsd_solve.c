/* dsd_solve.c — the coordinator's call into the placement solver (placement/ds_placement.h):
 * cluster spec + model config + workload -> a dsd_plan (unit -> node, and the accelerator of
 * the node that runs each expert). embed and head are pinned to the coordinator, which embeds
 * and samples. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds_placement.h"
#include "dsd.h"

/* Node index (into the planned names) of the device the solver gave a unit; -1 when absent. */
static int32_t unit_node(const ds_plan *sp, const ds_cluster *cl, const int32_t *node_of_spec,
                         enum ds_unit_kind k, uint32_t l, uint32_t e, uint32_t replica)
{
    int dev = ds_plan_unit_device(sp, k, l, e, replica);
    if (dev < 0)
        return -1;
    const ds_pl_device *d = ds_cluster_device(cl, dev);
    return d ? node_of_spec[d->node_index] : -1;
}

/* Fills p's units from the solver's plan sp over cluster cl (node_of_spec: spec node -> plan
 * node). -EPROTO when the solver left a unit unplaced or moved embed/head. */
static int plan_fill(dsd_plan *p, const ds_model_config *c, const ds_plan *sp, const ds_cluster *cl,
                     const int32_t *node_of_spec, ds_error *err)
{
    p->embed = unit_node(sp, cl, node_of_spec, DS_UNIT_EMBED, 0, 0, 0);
    p->head = unit_node(sp, cl, node_of_spec, DS_UNIT_HEAD, 0, 0, 0);
    bool bad = p->embed != 0 || p->head != 0;
    uint32_t L = c->num_hidden_layers, E = c->n_routed_experts;
    for (uint32_t l = 0; l < L && !bad; l++) {
        /* dense[l] / shared[l] run beside attn[l] in dsd's hosts (one step request per layer) */
        p->attn[l] = unit_node(sp, cl, node_of_spec, DS_UNIT_ATTN, l, 0, 0);
        bad = p->attn[l] < 0;
        bool moe = ds_model_config_layer_is_moe(c, l);
        for (uint32_t e = 0; e < E && !bad; e++) {
            size_t i = (size_t)l * E + e;
            int32_t h = moe ? unit_node(sp, cl, node_of_spec, DS_UNIT_EXPERT, l, e, 0) : -1;
            bad = moe && h < 0;
            p->expert[i] = h;
            /* the device within the node: accelerators run their experts there */
            int dv = moe ? ds_plan_unit_device(sp, DS_UNIT_EXPERT, l, e, 0) : -1;
            const ds_pl_device *pd = dv >= 0 ? ds_cluster_device(cl, dv) : NULL;
            p->expert_dev[i] = pd ? dsd_plan_dev_index(p, pd->name) : 0;
            /* the solver's extra copies of hot experts (replica 1, 2, ...) on other nodes */
            uint64_t mask = 0;
            for (uint32_t r = 1; moe && r < 64; r++) {
                int32_t rn = unit_node(sp, cl, node_of_spec, DS_UNIT_EXPERT, l, e, r);
                if (rn < 0)
                    break;
                if (rn != h && rn < 64)
                    mask |= 1ull << rn;
            }
            p->replicas[i] = mask;
        }
    }
    if (bad)
        return ds_error_set(err, -EPROTO,
                            "plan: the solver left a unit unplaced or moved embed/head");
    return 0;
}

int dsd_plan_solve(dsd_plan *p, const ds_model_config *c, const char *spec_json, uint32_t n_nodes,
                   const char (*names)[64], const char (*endpoints)[DSD_STR_MAX],
                   const char *strategy, uint32_t batch, uint32_t context,
                   const double *expert_stats, const ds_unit_bytes *unit_bytes, uint64_t version,
                   ds_error *err)
{
    memset(p, 0, sizeof(*p));
    ds_plan_options opt = {.batch = batch ? batch : 1,
                           .context = context ? context : 1,
                           .objective = DS_OBJ_LATENCY,
                           .expert_stats = expert_stats,
                           .unit_bytes = unit_bytes && unit_bytes->n_layers ? unit_bytes : NULL};
    if (ds_strategy_parse(strategy, &opt.strategy) < 0)
        return ds_error_set(err, -EINVAL, "plan_strategy '%s': unknown strategy", strategy);
    if (n_nodes == 0 || n_nodes > DS_PL_MAX_NODES)
        return ds_error_set(err, -EINVAL, "plan: %u nodes", n_nodes);
    ds_cluster *cl = NULL;
    ds_plan *sp = NULL;
    int32_t *node_of_spec = NULL;
    int rc = ds_cluster_parse(spec_json, strlen(spec_json), &cl, err);
    if (rc < 0)
        return rc;
    if ((rc = dsd_plan_alloc(p, c, n_nodes, names, endpoints, version)) < 0) {
        ds_error_set(err, rc, "out of memory");
        goto out;
    }
    snprintf(p->strategy, sizeof(p->strategy), "%s", strategy);
    /* embed and head stay on the coordinator (names[0]): it embeds the tokens and samples */
    int ndev = ds_cluster_n_devices(cl), coord_dev = -1;
    for (int i = 0; i < ndev && coord_dev < 0; i++)
        if (!strcmp(ds_cluster_device(cl, i)->node, names[0]))
            coord_dev = i;
    if (coord_dev < 0) {
        rc = ds_error_set(err, -EINVAL, "plan: the coordinator '%s' reports no device", names[0]);
        goto out;
    }
    const ds_pl_device *cd = ds_cluster_device(cl, coord_dev);
    ds_pin pins[2];
    memset(pins, 0, sizeof(pins));
    snprintf(pins[0].unit, sizeof(pins[0].unit), "embed");
    snprintf(pins[1].unit, sizeof(pins[1].unit), "head");
    snprintf(pins[0].device, sizeof(pins[0].device), "%s/%s", cd->node, cd->name);
    snprintf(pins[1].device, sizeof(pins[1].device), "%s/%s", cd->node, cd->name);
    opt.pins = pins;
    opt.n_pins = 2;
    int nn = ds_cluster_n_nodes(cl);
    node_of_spec = calloc((size_t)(nn > 0 ? nn : 1), sizeof(*node_of_spec));
    if (!node_of_spec) {
        rc = ds_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (int i = 0; i < nn; i++) {
        node_of_spec[i] = -1;
        for (uint32_t j = 0; j < n_nodes; j++)
            if (!strcmp(ds_cluster_node_name(cl, i), names[j]))
                node_of_spec[i] = (int32_t)j;
        if (node_of_spec[i] < 0) {
            rc = ds_error_set(err, -EINVAL, "plan: spec node '%s' is not a planned node",
                              ds_cluster_node_name(cl, i));
            goto out;
        }
    }
    if ((rc = ds_plan_solve(cl, c, &opt, &sp, err)) < 0)
        goto out;
    ds_plan_summary sum;
    ds_plan_get_summary(sp, &sum);
    snprintf(p->solver, sizeof(p->solver), "%s", sum.solver ? sum.solver : "?");
    p->solver_json = ds_plan_to_json(sp);
    rc = plan_fill(p, c, sp, cl, node_of_spec, err);
out:
    if (rc < 0)
        dsd_plan_clear(p);
    free(node_of_spec);
    ds_plan_free(sp);
    ds_cluster_free(cl);
    return rc;
}

void dsd_solve_thread_done(void)
{
    ds_placement_thread_done();
}
