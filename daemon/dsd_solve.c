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

/* The plan's device index (0: the node's CPU engine) of the device the solver gave a unit. */
static uint8_t unit_dev(dsd_plan *p, const ds_plan *sp, const ds_cluster *cl, enum ds_unit_kind k,
                        uint32_t l)
{
    int dv = ds_plan_unit_device(sp, k, l, 0, 0);
    const ds_pl_device *pd = dv >= 0 ? ds_cluster_device(cl, dv) : NULL;
    return pd ? dsd_plan_dev_index(p, pd->name) : 0;
}

/* Fills p's units from the solver's plan sp over cluster cl (node_of_spec: spec node -> plan
 * node). -EPROTO when the solver left a unit unplaced or moved embed/head. */
static int plan_fill(dsd_plan *p, const ds_model_config *c, const ds_plan *sp, const ds_cluster *cl,
                     const int32_t *node_of_spec, ds_error *err)
{
    p->embed = unit_node(sp, cl, node_of_spec, DS_UNIT_EMBED, 0, 0, 0);
    p->head = unit_node(sp, cl, node_of_spec, DS_UNIT_HEAD, 0, 0, 0);
    bool bad = p->embed != 0 || p->head != 0;
    p->embed_dev = unit_dev(p, sp, cl, DS_UNIT_EMBED, 0);
    p->head_dev = unit_dev(p, sp, cl, DS_UNIT_HEAD, 0);
    uint32_t L = c->num_hidden_layers, E = c->n_routed_experts;
    for (uint32_t l = 0; l < L && !bad; l++) {
        /* dense[l] / shared[l] run beside attn[l] in dsd's hosts (one step request per layer),
         * on the device the solver gave the attention */
        p->attn[l] = unit_node(sp, cl, node_of_spec, DS_UNIT_ATTN, l, 0, 0);
        p->attn_dev[l] = unit_dev(p, sp, cl, DS_UNIT_ATTN, l);
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

/* One pin entry's unit pattern: a unit name, attn[*] (every layer), expert[L][*] or
 * expert[*][*] (every expert of MoE layer L, of every MoE layer). Appends the pins. */
static int pin_expand(const char *u, size_t ul, const char *dev, size_t dl,
                      const ds_model_config *c, ds_pin *pins, size_t *n, size_t cap)
{
    char unit[48];
    snprintf(unit, sizeof(unit), "%.*s", (int)ul, u);
    uint32_t L = c->num_hidden_layers, E = c->n_routed_experts, l0 = 0, l1 = 0, e1 = 1;
    bool by_expert = false;
    unsigned long lv;
    char tail;
    if (!strcmp(unit, "attn[*]")) {
        l1 = L;
    } else if (!strcmp(unit, "expert[*][*]")) {
        l1 = L;
        e1 = E;
        by_expert = true;
    } else if (sscanf(unit, "expert[%lu][*%c", &lv, &tail) == 2 && tail == ']' && lv < L &&
               !strchr(unit + 7, '-')) {
        l0 = (uint32_t)lv;
        l1 = l0 + 1;
        e1 = E;
        by_expert = true;
    } else {
        if (strchr(unit, '*') || *n >= cap) /* a pattern of none of the forms above */
            return -EINVAL;
        snprintf(pins[*n].unit, sizeof(pins[*n].unit), "%s", unit);
        snprintf(pins[*n].device, sizeof(pins[*n].device), "%.*s", (int)dl, dev);
        (*n)++;
        return 0;
    }
    for (uint32_t l = l0; l < l1; l++)
        for (uint32_t e = 0; e < e1; e++) {
            if (by_expert && !ds_model_config_layer_is_moe(c, l))
                continue;
            if (*n >= cap)
                return -ENOSPC;
            if (by_expert)
                snprintf(pins[*n].unit, sizeof(pins[*n].unit), "expert[%u][%u]", l, e);
            else
                snprintf(pins[*n].unit, sizeof(pins[*n].unit), "attn[%u]", l);
            snprintf(pins[*n].device, sizeof(pins[*n].device), "%.*s", (int)dl, dev);
            (*n)++;
        }
    return 0;
}

/* "UNIT=NODE/DEV" entries (commas or spaces between; pin_expand's patterns) -> pins, with
 * room for 2 more (embed/head). */
static int parse_pins(const char *s, const ds_model_config *c, ds_pin **ret, size_t *n,
                      ds_error *err)
{
    size_t cap = 2, per = (size_t)(c->num_hidden_layers ? c->num_hidden_layers : 1) *
                          (c->n_routed_experts ? c->n_routed_experts : 1);
    for (const char *q = s ? s : ""; *q; q++)
        cap += *q == '=' ? per : 0;
    ds_pin *pins = calloc(cap, sizeof(*pins));
    if (!pins)
        return ds_error_set(err, -ENOMEM, "out of memory");
    *n = 0;
    while (s && *s) {
        size_t len = strcspn(s, ", \t");
        if (len) {
            const char *eq = memchr(s, '=', len);
            size_t ul = eq ? (size_t)(eq - s) : 0, dl = eq ? len - ul - 1 : 0;
            if (!eq || !ul || !dl || ul >= sizeof(pins[0].unit) || dl >= sizeof(pins[0].device) ||
                !memchr(eq + 1, '/', dl) ||
                pin_expand(s, ul, eq + 1, dl, c, pins, n, cap - 2) < 0) {
                free(pins);
                return ds_error_set(err, -EINVAL, "plan_pin: bad entry '%.*s' (UNIT=NODE/DEVICE)",
                                    (int)len, s);
            }
        }
        s += len;
        s += strspn(s, ", \t");
    }
    *ret = pins;
    return 0;
}

int dsd_plan_solve(dsd_plan *p, const ds_model_config *c, const char *spec_json, uint32_t n_nodes,
                   const char (*names)[64], const char (*endpoints)[DSD_STR_MAX],
                   const char *strategy, uint32_t batch, uint32_t context,
                   const double *expert_stats, const ds_unit_bytes *unit_bytes,
                   const char *pin_list, uint64_t version, ds_error *err)
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
    ds_pin *pins = NULL;
    size_t npins = 0;
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
    if ((rc = parse_pins(pin_list, c, &pins, &npins, err)) < 0)
        goto out;
    /* embed and head on the coordinator's first device unless the operator pinned them */
    static const char *const ends[2] = {"embed", "head"};
    for (int k = 0; k < 2; k++) {
        bool pinned = false;
        for (size_t i = 0; i < npins; i++)
            pinned |= !strcmp(pins[i].unit, ends[k]);
        if (pinned)
            continue;
        snprintf(pins[npins].unit, sizeof(pins[npins].unit), "%s", ends[k]);
        snprintf(pins[npins].device, sizeof(pins[npins].device), "%s/%s", cd->node, cd->name);
        npins++;
    }
    opt.pins = pins;
    opt.n_pins = npins;
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
    free(pins);
    free(node_of_spec);
    ds_plan_free(sp);
    ds_cluster_free(cl);
    return rc;
}

void dsd_solve_thread_done(void)
{
    ds_placement_thread_done();
}
