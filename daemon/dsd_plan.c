/* dsd_plan.c — the plan the coordinator rolls out: unit -> node, with the data endpoint of
 * every node. The coordinator asks the placement solver (dsd_plan_solve, dsd_solve.c); the
 * built-in round-robin plan (dsd_plan_build) spreads attention layers and routed experts over
 * every node and is used only when asked for (plan_strategy = round-robin, for tests and
 * debugging). embed and head stay on the coordinator, which samples. Shared experts and dense
 * FFNs run beside their attention. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "ds_log.h"
#include "dsd.h"

void dsd_units_clear(dsd_units *u)
{
    free(u->attn);
    free(u->expert);
    free(u->expert_dev);
    free(u->attn_dev);
    memset(u, 0, sizeof(*u));
}

void dsd_plan_clear(dsd_plan *p)
{
    free(p->nodes);
    free(p->endpoints);
    free(p->attn);
    free(p->expert);
    free(p->replicas);
    free(p->expert_dev);
    free(p->attn_dev);
    free(p->solver_json);
    memset(p, 0, sizeof(*p));
}

int dsd_plan_alloc(dsd_plan *p, const ds_model_config *c, uint32_t n_nodes, const char (*names)[64],
                   const char (*endpoints)[DSD_STR_MAX], uint64_t version)
{
    memset(p, 0, sizeof(*p));
    p->version = version;
    p->n_nodes = n_nodes;
    p->n_layers = c->num_hidden_layers;
    p->n_experts = c->n_routed_experts;
    p->nodes = calloc(n_nodes, sizeof(*p->nodes));
    p->endpoints = calloc(n_nodes, sizeof(*p->endpoints));
    p->attn = calloc(p->n_layers ? p->n_layers : 1, sizeof(*p->attn));
    p->expert = calloc((size_t)(p->n_layers ? p->n_layers : 1) * (p->n_experts ? p->n_experts : 1),
                       sizeof(*p->expert));
    p->replicas =
        calloc((size_t)(p->n_layers ? p->n_layers : 1) * (p->n_experts ? p->n_experts : 1),
               sizeof(*p->replicas));
    p->expert_dev =
        calloc((size_t)(p->n_layers ? p->n_layers : 1) * (p->n_experts ? p->n_experts : 1), 1);
    p->attn_dev = calloc(p->n_layers ? p->n_layers : 1, 1);
    p->n_dev_names = 1; /* [0] = "": the CPU engine */
    if (!p->nodes || !p->endpoints || !p->attn || !p->expert || !p->replicas || !p->expert_dev ||
        !p->attn_dev) {
        dsd_plan_clear(p);
        return -ENOMEM;
    }
    memcpy(p->nodes, names, n_nodes * sizeof(*p->nodes));
    memcpy(p->endpoints, endpoints, n_nodes * sizeof(*p->endpoints));
    return 0;
}

int dsd_plan_build(dsd_plan *p, const ds_model_config *c, uint32_t n_nodes, const char (*names)[64],
                   const char (*endpoints)[DSD_STR_MAX], bool coord_computes, uint64_t version)
{
    memset(p, 0, sizeof(*p));
    if (n_nodes == 0 || (!coord_computes && n_nodes < 2))
        return -EINVAL;
    int rc = dsd_plan_alloc(p, c, n_nodes, names, endpoints, version);
    if (rc < 0)
        return rc;
    snprintf(p->strategy, sizeof(p->strategy), "round-robin");
    snprintf(p->solver, sizeof(p->solver), "round-robin");
    p->embed = p->head = 0;
    /* Compute nodes: all, or all but the coordinator. Attention starts at the first worker so
     * that a 2-layer model on coordinator + 2 workers puts one layer on each worker. */
    uint32_t first = coord_computes ? 0 : 1, n_comp = n_nodes - first;
    uint32_t shift = n_nodes > 1 && coord_computes ? 1 : 0;
    for (uint32_t l = 0; l < p->n_layers; l++) {
        p->attn[l] = (int32_t)(first + (l + shift) % n_comp);
        bool moe = ds_model_config_layer_is_moe(c, l);
        for (uint32_t e = 0; e < p->n_experts; e++)
            p->expert[(size_t)l * p->n_experts + e] =
                moe ? (int32_t)(first + (e + l) % n_comp) : -1;
    }
    return 0;
}

char *dsd_plan_json(const dsd_plan *p)
{
    json_t *root = json_object(), *units = json_object(), *nodes = json_object();
    json_object_set_new(root, "version", json_integer((json_int_t)p->version));
    json_object_set_new(root, "strategy", json_string(p->strategy));
    json_object_set_new(root, "solver", json_string(p->solver));
    if (p->quantize)
        json_object_set_new(root, "quantize",
                            json_string(ds_quantize_name((enum ds_quantize)p->quantize)));
    for (uint32_t i = 0; i < p->n_nodes; i++)
        json_object_set_new(nodes, p->nodes[i], json_string(p->endpoints[i]));
    json_object_set_new(units, "embed", json_string(p->nodes[p->embed]));
    char name[64];
    for (uint32_t l = 0; l < p->n_layers; l++) {
        snprintf(name, sizeof(name), "attn[%u]", l);
        json_object_set_new(units, name, json_string(p->nodes[p->attn[l]]));
        for (uint32_t e = 0; e < p->n_experts; e++) {
            int32_t h = p->expert[(size_t)l * p->n_experts + e];
            if (h < 0)
                continue;
            snprintf(name, sizeof(name), "expert[%u][%u]", l, e);
            json_object_set_new(units, name, json_string(p->nodes[h]));
        }
    }
    json_object_set_new(units, "head", json_string(p->nodes[p->head]));
    json_object_set_new(root, "units", units);
    /* units on an accelerator of their node: "expert[l][e]": "opencl0", "attn[l]": "cuda0" */
    json_t *on_dev = json_object();
    for (uint32_t l = 0; l < p->n_layers; l++)
        if (p->attn_dev[l]) {
            snprintf(name, sizeof(name), "attn[%u]", l);
            json_object_set_new(on_dev, name, json_string(p->dev_names[p->attn_dev[l]]));
        }
    if (p->embed_dev)
        json_object_set_new(on_dev, "embed", json_string(p->dev_names[p->embed_dev]));
    if (p->head_dev)
        json_object_set_new(on_dev, "head", json_string(p->dev_names[p->head_dev]));
    for (size_t i = 0; i < (size_t)p->n_layers * p->n_experts; i++)
        if (p->expert_dev[i]) {
            snprintf(name, sizeof(name), "expert[%zu][%zu]", i / p->n_experts, i % p->n_experts);
            json_object_set_new(on_dev, name, json_string(p->dev_names[p->expert_dev[i]]));
        }
    json_object_set_new(root, "devices", on_dev);
    /* extra copies of hot experts: "expert[l][e]": [nodes other than the primary] */
    json_t *reps = json_object();
    for (uint32_t l = 0; l < p->n_layers; l++)
        for (uint32_t e = 0; e < p->n_experts; e++) {
            uint64_t m = p->replicas[(size_t)l * p->n_experts + e];
            if (!m)
                continue;
            json_t *a = json_array();
            for (uint32_t n = 0; n < p->n_nodes && n < 64; n++)
                if (m >> n & 1)
                    json_array_append_new(a, json_string(p->nodes[n]));
            snprintf(name, sizeof(name), "expert[%u][%u]", l, e);
            json_object_set_new(reps, name, a);
        }
    json_object_set_new(root, "replicas", reps);
    json_object_set_new(root, "nodes", nodes);
    char *s = json_dumps(root, JSON_SORT_KEYS | JSON_COMPACT);
    json_decref(root);
    return s;
}

static int units_alloc(dsd_units *u, uint32_t L, uint32_t E)
{
    memset(u, 0, sizeof(*u));
    u->n_layers = L;
    u->n_experts = E;
    u->attn = calloc(L ? L : 1, sizeof(bool));
    u->expert = calloc((size_t)(L ? L : 1) * (E ? E : 1), sizeof(bool));
    u->expert_dev = calloc((size_t)(L ? L : 1) * (E ? E : 1), 1);
    u->attn_dev = calloc(L ? L : 1, 1);
    if (!u->attn || !u->expert || !u->expert_dev || !u->attn_dev) {
        dsd_units_clear(u);
        return -ENOMEM;
    }
    return 0;
}

int dsd_plan_units_of(const dsd_plan *p, uint32_t idx, dsd_units *u)
{
    int rc = units_alloc(u, p->n_layers, p->n_experts);
    if (rc < 0)
        return rc;
    u->embed = p->embed == (int32_t)idx;
    u->head = p->head == (int32_t)idx;
    u->embed_dev = u->embed ? p->embed_dev : 0;
    u->head_dev = u->head ? p->head_dev : 0;
    for (uint32_t l = 0; l < p->n_layers; l++) {
        u->attn[l] = p->attn[l] == (int32_t)idx;
        u->attn_dev[l] = u->attn[l] ? p->attn_dev[l] : 0;
        for (uint32_t e = 0; e < p->n_experts; e++) {
            size_t i = (size_t)l * p->n_experts + e;
            u->expert[i] =
                p->expert[i] == (int32_t)idx || (idx < 64 && (p->replicas[i] >> idx & 1));
            /* the device choice is the primary's (a replica runs on its node's CPU engine) */
            if (p->expert[i] == (int32_t)idx)
                u->expert_dev[i] = p->expert_dev[i];
        }
    }
    memcpy(u->dev_names, p->dev_names, sizeof(u->dev_names));
    u->quantize = p->quantize;
    return 0;
}

int dsd_plan_to_wire(const dsd_plan *p, Dsd__Plan *w)
{
    dsd__plan__init(w);
    w->version = p->version;
    w->json = dsd_plan_json(p);
    w->quantize = (char *)ds_quantize_name((enum ds_quantize)p->quantize);
    w->data_token = (char *)p->token;
    size_t n = 2 + p->n_layers + (size_t)p->n_layers * p->n_experts;
    for (size_t i = 0; i < (size_t)p->n_layers * p->n_experts; i++)
        n += (size_t)__builtin_popcountll(p->replicas[i]);
    w->units = calloc(n, sizeof(*w->units));
    Dsd__PlanUnit *pu = calloc(n, sizeof(*pu));
    /* one block: unit names (32 bytes each), then "node/device" strings (96 each) */
    char *names = calloc(n, 32 + 96), *devnames = names ? names + n * 32 : NULL;
    w->data_endpoints = calloc(p->n_nodes, sizeof(*w->data_endpoints));
    Dsd__Plan__DataEndpointsEntry *de = calloc(p->n_nodes, sizeof(*de));
    if (!w->json || !w->units || !pu || !names || !w->data_endpoints || !de) {
        free(pu);
        free(names);
        free(de);
        dsd_plan_wire_clear(w);
        return -ENOMEM;
    }
    size_t k = 0;
#define ADD(node, ...)                                                                             \
    do {                                                                                           \
        dsd__plan_unit__init(&pu[k]);                                                              \
        snprintf(names + k * 32, 32, __VA_ARGS__);                                                 \
        pu[k].unit = names + k * 32;                                                               \
        pu[k].device = p->nodes[node];                                                             \
        w->units[k] = &pu[k];                                                                      \
        k++;                                                                                       \
    } while (0)
#define ON_DEV(node, dev)                                                                          \
    do {                                                                                           \
        if (dev) { /* "node/device": an accelerator of that node runs it */                        \
            char *dn = devnames + (k - 1) * 96;                                                    \
            snprintf(dn, 96, "%s/%s", p->nodes[node], p->dev_names[dev]);                          \
            pu[k - 1].device = dn;                                                                 \
        }                                                                                          \
    } while (0)
    ADD(p->embed, "embed");
    ON_DEV(p->embed, p->embed_dev);
    for (uint32_t l = 0; l < p->n_layers; l++) {
        ADD(p->attn[l], "attn[%u]", l);
        ON_DEV(p->attn[l], p->attn_dev[l]);
        for (uint32_t e = 0; e < p->n_experts; e++) {
            size_t i = (size_t)l * p->n_experts + e;
            if (p->expert[i] < 0)
                continue;
            ADD(p->expert[i], "expert[%u][%u]", l, e);
            if (p->expert_dev[i]) { /* "node/device": an accelerator of that node runs it */
                char *dn = devnames + (k - 1) * 96;
                snprintf(dn, 96, "%s/%s", p->nodes[p->expert[i]], p->dev_names[p->expert_dev[i]]);
                pu[k - 1].device = dn;
            }
            uint32_t r = 0;
            for (uint32_t nd = 0; nd < p->n_nodes && nd < 64; nd++)
                if (p->replicas[i] >> nd & 1) {
                    ADD(nd, "expert[%u][%u]", l, e);
                    pu[k - 1].replica = ++r;
                }
        }
    }
    ADD(p->head, "head");
    ON_DEV(p->head, p->head_dev);
#undef ON_DEV
#undef ADD
    w->n_units = k;
    for (uint32_t i = 0; i < p->n_nodes; i++) {
        dsd__plan__data_endpoints_entry__init(&de[i]);
        de[i].key = p->nodes[i];
        de[i].value = p->endpoints[i];
        w->data_endpoints[i] = &de[i];
    }
    w->n_data_endpoints = p->n_nodes;
    return 0;
}

void dsd_plan_wire_clear(Dsd__Plan *w)
{
    if (w->n_units) {
        free((char *)w->units[0]->unit); /* names block */
        free(w->units[0]);               /* PlanUnit block */
    }
    if (w->n_data_endpoints)
        free(w->data_endpoints[0]);
    free(w->units);
    free(w->data_endpoints);
    free(w->json);
    dsd__plan__init(w);
}

int dsd_plan_units_from_wire(const Dsd__Plan *w, const char *self, const ds_model_config *c,
                             dsd_units *u, ds_error *err)
{
    uint32_t L = c->num_hidden_layers, E = c->n_routed_experts;
    int rc = units_alloc(u, L, E);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < w->n_units; i++) {
        const Dsd__PlanUnit *pu = w->units[i];
        enum ds_unit_kind kind;
        uint32_t l, e;
        if (!pu->unit || !pu->device || ds_unit_parse(pu->unit, &kind, &l, &e) < 0 ||
            (kind != DS_UNIT_EMBED && kind != DS_UNIT_HEAD && l >= L) ||
            (kind == DS_UNIT_EXPERT && (e >= E || !ds_model_config_layer_is_moe(c, l)))) {
            dsd_units_clear(u);
            return ds_error_set(err, -EPROTO, "plan: unit %zu '%s' is not a unit of this model", i,
                                pu->unit ? pu->unit : "(null)");
        }
        if (strcmp(pu->device, self) && strncmp(pu->device, self, strlen(self)))
            continue;
        /* "node" or "node/device" both name this node */
        size_t sl = strlen(self);
        if (pu->device[sl] && pu->device[sl] != '/')
            continue;
        switch (kind) {
        case DS_UNIT_EMBED:
            u->embed = true;
            break;
        case DS_UNIT_HEAD:
            u->head = true;
            break;
        case DS_UNIT_ATTN:
        case DS_UNIT_DENSE:
        case DS_UNIT_SHARED:
            u->attn[l] = true;
            break;
        case DS_UNIT_EXPERT:
            u->expert[(size_t)l * E + e] = true;
            break;
        }
    }
    return 0;
}

int dsd_plan_copy(dsd_plan *dst, const dsd_plan *src)
{
    *dst = *src;
    dst->nodes = NULL;
    dst->endpoints = NULL;
    dst->attn = NULL;
    dst->expert = NULL;
    dst->replicas = NULL;
    dst->expert_dev = NULL;
    dst->attn_dev = NULL;
    dst->solver_json = NULL;
    uint32_t N = src->n_nodes, L = src->n_layers ? src->n_layers : 1;
    size_t ne = (size_t)L * (src->n_experts ? src->n_experts : 1);
    dst->nodes = malloc((N ? N : 1) * sizeof(*dst->nodes));
    dst->endpoints = malloc((N ? N : 1) * sizeof(*dst->endpoints));
    dst->attn = malloc(L * sizeof(int32_t));
    dst->expert = malloc(ne * sizeof(int32_t));
    dst->replicas = malloc(ne * sizeof(uint64_t));
    dst->expert_dev = malloc(ne);
    dst->attn_dev = malloc(L);
    if (src->solver_json)
        dst->solver_json = strdup(src->solver_json);
    if (!dst->nodes || !dst->endpoints || !dst->attn || !dst->expert || !dst->replicas ||
        !dst->expert_dev || !dst->attn_dev || (src->solver_json && !dst->solver_json)) {
        dsd_plan_clear(dst);
        return -ENOMEM;
    }
    memcpy(dst->nodes, src->nodes, N * sizeof(*dst->nodes));
    memcpy(dst->endpoints, src->endpoints, N * sizeof(*dst->endpoints));
    memcpy(dst->attn, src->attn, src->n_layers * sizeof(int32_t));
    memcpy(dst->expert, src->expert, (size_t)src->n_layers * src->n_experts * sizeof(int32_t));
    memcpy(dst->replicas, src->replicas, (size_t)src->n_layers * src->n_experts * sizeof(uint64_t));
    memcpy(dst->expert_dev, src->expert_dev, (size_t)src->n_layers * src->n_experts);
    memcpy(dst->attn_dev, src->attn_dev, src->n_layers);
    return 0;
}

/* Index of the node a plan unit's device ("node" or "node/device") names, or -1. */
static int32_t wire_node(const dsd_plan *p, const char *device)
{
    for (uint32_t i = 0; device && i < p->n_nodes; i++) {
        size_t l = strlen(p->nodes[i]);
        if (!strncmp(device, p->nodes[i], l) && (device[l] == 0 || device[l] == '/'))
            return (int32_t)i;
    }
    return -1;
}

int dsd_plan_from_wire(const Dsd__Plan *w, const ds_model_config *c, dsd_plan *p, ds_error *err)
{
    uint32_t N = (uint32_t)w->n_data_endpoints;
    if (N == 0 || N > 4096)
        return ds_error_set(err, -EPROTO, "plan: %u data endpoints", N);
    char(*names)[64] = calloc(N, 64);
    char(*eps)[DSD_STR_MAX] = calloc(N, DSD_STR_MAX);
    int rc = -ENOMEM;
    if (!names || !eps)
        goto out;
    for (uint32_t i = 0; i < N; i++) {
        const Dsd__Plan__DataEndpointsEntry *de = w->data_endpoints[i];
        if (!de->key || !de->value || !de->key[0] || strlen(de->key) >= 64 ||
            strlen(de->value) >= DSD_STR_MAX) {
            rc = ds_error_set(err, -EPROTO, "plan: data endpoint %u is malformed", i);
            goto out;
        }
        snprintf(names[i], 64, "%s", de->key);
        snprintf(eps[i], DSD_STR_MAX, "%s", de->value);
    }
    if ((rc = dsd_plan_alloc(p, c, N, (const char(*)[64])names, (const char(*)[DSD_STR_MAX])eps,
                             w->version)) < 0)
        goto out;
    enum ds_quantize q = DS_QUANTIZE_NONE;
    if (w->quantize && ds_quantize_parse(w->quantize, &q) < 0) {
        rc = ds_error_set(err, -EPROTO, "plan: quantize '%.16s' unknown", w->quantize);
        goto fail;
    }
    p->quantize = (uint8_t)q;
    if (w->data_token && strlen(w->data_token) >= DSD_TOKEN_LEN) {
        rc = ds_error_set(err, -EPROTO, "plan: data token longer than %d bytes", DSD_TOKEN_LEN - 1);
        goto fail;
    }
    snprintf(p->token, sizeof(p->token), "%s", w->data_token ? w->data_token : "");
    uint32_t L = p->n_layers, E = p->n_experts;
    p->embed = p->head = -1;
    for (uint32_t l = 0; l < L; l++) {
        p->attn[l] = -1;
        for (uint32_t e = 0; e < E; e++)
            p->expert[(size_t)l * E + e] = -1;
    }
    for (size_t i = 0; i < w->n_units; i++) {
        const Dsd__PlanUnit *pu = w->units[i];
        enum ds_unit_kind kind;
        uint32_t l, e;
        int32_t node = wire_node(p, pu->device);
        if (!pu->unit || ds_unit_parse(pu->unit, &kind, &l, &e) < 0 || node < 0 ||
            (kind != DS_UNIT_EMBED && kind != DS_UNIT_HEAD && l >= L) ||
            (kind == DS_UNIT_EXPERT && (e >= E || !ds_model_config_layer_is_moe(c, l)))) {
            rc = ds_error_set(err, -EPROTO, "plan: unit %zu '%s' on '%s' is not valid here", i,
                              pu->unit ? pu->unit : "(null)", pu->device ? pu->device : "(null)");
            goto fail;
        }
        const char *dslash = strchr(pu->device, '/');
        uint8_t dev = dslash ? dsd_plan_dev_index(p, dslash + 1) : 0;
        if (kind == DS_UNIT_EMBED) {
            p->embed = node;
            p->embed_dev = dev;
        } else if (kind == DS_UNIT_HEAD) {
            p->head = node;
            p->head_dev = dev;
        } else if (kind == DS_UNIT_EXPERT && pu->replica)
            p->replicas[(size_t)l * E + e] |= node < 64 ? 1ull << node : 0;
        else if (kind == DS_UNIT_EXPERT) {
            p->expert[(size_t)l * E + e] = node;
            const char *slash = strchr(pu->device, '/');
            p->expert_dev[(size_t)l * E + e] = slash ? dsd_plan_dev_index(p, slash + 1) : 0;
        } else {
            p->attn[l] = node;
            p->attn_dev[l] = dev;
        }
    }
    /* every unit of the model placed once */
    rc = ds_error_set(err, -EPROTO, "plan: embed or head unplaced");
    if (p->embed < 0 || p->head < 0)
        goto fail;
    for (uint32_t l = 0; l < L; l++) {
        if (p->attn[l] < 0) {
            rc = ds_error_set(err, -EPROTO, "plan: attn[%u] unplaced", l);
            goto fail;
        }
        for (uint32_t e = 0; ds_model_config_layer_is_moe(c, l) && e < E; e++)
            if (p->expert[(size_t)l * E + e] < 0) {
                rc = ds_error_set(err, -EPROTO, "plan: expert[%u][%u] unplaced", l, e);
                goto fail;
            }
    }
    rc = 0;
    goto out;
fail:
    dsd_plan_clear(p);
out:
    free(names);
    free(eps);
    if (rc == -ENOMEM && !err->code)
        ds_error_set(err, rc, "out of memory");
    return rc;
}

int32_t dsd_plan_node_index(const dsd_plan *p, const char *name)
{
    for (uint32_t i = 0; p && name && i < p->n_nodes; i++)
        if (!strcmp(p->nodes[i], name))
            return (int32_t)i;
    return -1;
}

uint8_t dsd_plan_dev_index(dsd_plan *p, const char *name)
{
    if (!name || !name[0] || !strncmp(name, "cpu", 3))
        return 0;
    if (strncmp(name, "opencl", 6) && strncmp(name, "cuda", 4))
        return 0; /* not an accelerator dsd can drive: the CPU engine */
    for (uint32_t i = 1; i < p->n_dev_names; i++)
        if (!strcmp(p->dev_names[i], name))
            return (uint8_t)i;
    if (p->n_dev_names >= DSD_MAX_DEVNAMES)
        return 0;
    snprintf(p->dev_names[p->n_dev_names], sizeof(p->dev_names[0]), "%s", name);
    return (uint8_t)p->n_dev_names++;
}

int dsd_plan_write_file(const char *state_dir, const char *json)
{
    char path[PATH_MAX + 16];
    snprintf(path, sizeof(path), "%s/plan.json", state_dir);
    FILE *f = fopen(path, "we");
    if (!f) {
        int rc = -errno;
        ds_log_warn("%s: %s (plan not saved)", path, strerror(errno));
        return rc;
    }
    fprintf(f, "%s\n", json);
    return fclose(f) == 0 ? 0 : -errno;
}
