/* dsctl_generate_plan.c — `dsctl generate --local --plan FILE`: one process runs a plan.
 *
 * FILE is the plan JSON of `dsctl plan --json` (docs/plan-format.md). Each unit's device
 * ("node/name"; the node is ignored: everything runs here) is mapped to a device of this
 * machine by its name: cpuN is the CPU engine, openclN / cudaN that backend's device N. Every
 * attention layer (with its KV cache and router), embed and head run on the device the plan
 * names (the dense/shared FFN with its attention, as in the daemon); the routed experts on
 * the one device they all name (a plan splitting them over devices is refused here). The
 * result is bit-identical to the CPU engine (exact mode). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "ds_backend_moe.h"
#include "ds_backend_units.h"
#include "ds_engine.h"
#include "ds_model.h"
#include "dsctl_generate_plan.h"

#define GP_MAX_DEVS 8

struct gen_plan {
    const ds_model *m;
    ds_pool *pool;
    uint32_t n_devs;
    char specs[GP_MAX_DEVS][32]; /* backend specs of the accelerators the plan names */
    ds_backend *bk[GP_MAX_DEVS];
    ds_backend_units *bu[GP_MAX_DEVS];
    ds_backend_moe *bm; /* the experts' device, or NULL (the CPU engine) */
    int8_t *attn;       /* [L] device index, -1: the CPU engine */
    int8_t embed, head, experts;
};

/* "cpuN" -> -1 (the CPU engine); "openclN"/"cudaN" -> index of its backend spec (added). */
static int dev_index(gen_plan *gp, const char *name, ds_error *err)
{
    const char *kinds[2] = {"opencl", "cuda"};
    if (!strncmp(name, "cpu", 3) && name[3] && strspn(name + 3, "0123456789") == strlen(name + 3))
        return -1;
    for (int k = 0; k < 2; k++) {
        size_t kl = strlen(kinds[k]);
        const char *d = name + kl;
        if (strncmp(name, kinds[k], kl) || !*d || strspn(d, "0123456789") != strlen(d) ||
            strlen(d) > 5)
            continue;
        char spec[32];
        snprintf(spec, sizeof(spec), "%s:%s", kinds[k], d);
        for (uint32_t i = 0; i < gp->n_devs; i++)
            if (!strcmp(gp->specs[i], spec))
                return (int)i;
        if (gp->n_devs == GP_MAX_DEVS)
            return ds_error_set(err, -E2BIG, "more than %d devices", GP_MAX_DEVS);
        snprintf(gp->specs[gp->n_devs], sizeof(gp->specs[0]), "%s", spec);
        return (int)gp->n_devs++;
    }
    return ds_error_set(err, -EINVAL, "device '%s' is not cpuN, openclN or cudaN", name);
}

struct gp_want {
    const gen_plan *gp;
    int dev;
};

static bool want_unit(void *ctx, enum ds_unit_kind kind, uint32_t layer)
{
    const struct gp_want *w = ctx;
    switch (kind) {
    case DS_UNIT_EMBED:
        return w->gp->embed == w->dev;
    case DS_UNIT_HEAD:
        return w->gp->head == w->dev;
    case DS_UNIT_ATTN:
    case DS_UNIT_DENSE:
    case DS_UNIT_SHARED:
        return w->gp->attn[layer] == w->dev;
    default:
        return false;
    }
}

gen_plan *gen_plan_free(gen_plan *gp)
{
    if (!gp)
        return NULL;
    for (uint32_t i = 0; i < GP_MAX_DEVS; i++)
        ds_backend_units_free(gp->bu[i]);
    ds_backend_moe_free(gp->bm);
    for (uint32_t i = 0; i < GP_MAX_DEVS; i++)
        ds_backend_free(gp->bk[i]);
    free(gp->attn);
    free(gp);
    return NULL;
}

/* Reads the units of the plan file into gp's device choices. */
static int plan_read(gen_plan *gp, const char *path, const ds_model_config *c, ds_error *err)
{
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root)
        return ds_error_set(err, -EINVAL, "%s: line %d: %s", path, je.line, je.text);
    json_t *units = json_object_get(root, "units");
    int rc = 0;
    if (!json_is_array(units)) {
        rc = ds_error_set(err, -EINVAL, "%s: no \"units\" array (a `dsctl plan --json` file?)",
                          path);
        goto out;
    }
    bool seen_attn[4096] = {false}, seen_embed = false, seen_head = false, seen_exp = false;
    size_t i;
    json_t *u;
    json_array_foreach(units, i, u)
    {
        const char *un = json_string_value(json_object_get(u, "unit"));
        const char *dv = json_string_value(json_object_get(u, "device"));
        enum ds_unit_kind kind;
        uint32_t l, e;
        if (!un || !dv || ds_unit_parse(un, &kind, &l, &e) < 0 ||
            (kind != DS_UNIT_EMBED && kind != DS_UNIT_HEAD && l >= c->num_hidden_layers) ||
            (kind == DS_UNIT_EXPERT && e >= c->n_routed_experts)) {
            rc = ds_error_set(err, -EINVAL, "%s: units[%zu] is not a unit of this model", path, i);
            goto out;
        }
        if (json_integer_value(json_object_get(u, "replica")) > 0)
            continue; /* one process: the first copy is enough */
        const char *slash = strchr(dv, '/');
        int d = dev_index(gp, slash ? slash + 1 : dv, err);
        if (d < -1) {
            rc = d;
            ds_error_prefix(err, "%s: units[%zu] (%s)", path, i, un);
            goto out;
        }
        switch (kind) {
        case DS_UNIT_EMBED:
            gp->embed = (int8_t)d;
            seen_embed = true;
            break;
        case DS_UNIT_HEAD:
            gp->head = (int8_t)d;
            seen_head = true;
            break;
        case DS_UNIT_ATTN:
            gp->attn[l] = (int8_t)d;
            seen_attn[l] = true;
            break;
        case DS_UNIT_EXPERT:
            if (seen_exp && gp->experts != d) {
                rc = ds_error_set(err, -ENOTSUP,
                                  "%s: the routed experts are on more than one device; "
                                  "in-process they must share one",
                                  path);
                goto out;
            }
            gp->experts = (int8_t)d;
            seen_exp = true;
            break;
        default: /* dense / shared: with their attention */
            break;
        }
    }
    for (uint32_t l = 0; l < c->num_hidden_layers; l++)
        if (!seen_attn[l]) {
            rc = ds_error_set(err, -EINVAL, "%s: attn[%u] is not placed", path, l);
            goto out;
        }
    if (!seen_embed || !seen_head)
        rc = ds_error_set(err, -EINVAL, "%s: embed or head is not placed", path);
out:
    json_decref(root);
    return rc;
}

int gen_plan_load(const char *path, const ds_model *m, const char *model_dir, ds_pool *pool,
                  gen_plan **ret, ds_error *err)
{
    const ds_model_config *c = ds_model_get_config(m);
    *ret = NULL;
    if (c->num_hidden_layers > 4096)
        return ds_error_set(err, -ERANGE, "--plan: %u layers", c->num_hidden_layers);
    gen_plan *gp = calloc(1, sizeof(*gp));
    if (!gp || !(gp->attn = calloc(c->num_hidden_layers + 1, 1))) {
        free(gp);
        return ds_error_set(err, -ENOMEM, "out of memory");
    }
    gp->m = m;
    gp->pool = pool;
    gp->embed = gp->head = gp->experts = -1;
    int rc = plan_read(gp, path, c, err);
    for (uint32_t i = 0; rc == 0 && i < gp->n_devs; i++) {
        struct gp_want w = {gp, (int)i};
        if ((rc = ds_backend_open(gp->specs[i], &gp->bk[i], err)) < 0 ||
            (rc = ds_backend_units_new(m, pool, gp->bk[i], want_unit, &w, &gp->bu[i], err)) < 0)
            ds_error_prefix(err, "--plan: %s", gp->specs[i]);
    }
    if (rc == 0 && gp->experts >= 0 &&
        (rc = ds_backend_moe_new(m, model_dir, gp->bk[gp->experts], &gp->bm, err)) < 0)
        ds_error_prefix(err, "--plan: experts on %s", gp->specs[gp->experts]);
    if (rc < 0) {
        gen_plan_free(gp);
        return rc;
    }
    *ret = gp;
    return 0;
}

/* ---- the engine's runners over the plan's devices ---- */

static ds_backend_units *units_of(const gen_plan *gp, int d)
{
    return d >= 0 ? gp->bu[d] : NULL;
}

static int gp_attn(void *ctx, uint32_t layer, const float *x, uint32_t n, const uint32_t *pos,
                   ds_kv_cache *const *caches, ds_attn_out *out, ds_error *err)
{
    const gen_plan *gp = ctx;
    ds_backend_units *bu = units_of(gp, gp->attn[layer]);
    return bu ? ds_backend_units_ops.attn(bu, layer, x, n, pos, caches, out, err)
              : ds_unit_attn(gp->m, gp->pool, layer, x, n, pos, caches, out, err);
}

static int gp_ffn(void *ctx, enum ds_unit_kind kind, uint32_t layer, const float *in, uint32_t n,
                  float *out, ds_error *err)
{
    const gen_plan *gp = ctx;
    ds_backend_units *bu = units_of(gp, gp->attn[layer]);
    if (bu)
        return ds_backend_units_ops.ffn(bu, kind, layer, in, n, out, err);
    return kind == DS_UNIT_DENSE ? ds_unit_dense(gp->m, gp->pool, layer, in, n, out, err)
                                 : ds_unit_shared(gp->m, gp->pool, layer, in, n, out, err);
}

static int gp_embed(void *ctx, const int32_t *tokens, uint32_t n, float *out, ds_error *err)
{
    const gen_plan *gp = ctx;
    ds_backend_units *bu = units_of(gp, gp->embed);
    return bu ? ds_backend_units_ops.embed(bu, tokens, n, out, err)
              : ds_unit_embed(gp->m, gp->pool, tokens, n, out, err);
}

static int gp_head(void *ctx, const float *x, uint32_t n, float *logits, ds_error *err)
{
    const gen_plan *gp = ctx;
    ds_backend_units *bu = units_of(gp, gp->head);
    return bu ? ds_backend_units_ops.head(bu, x, n, logits, err)
              : ds_unit_head(gp->m, gp->pool, x, n, logits, err);
}

static const ds_unit_runner_ops gp_units_ops = {
    .attn = gp_attn, .ffn = gp_ffn, .embed = gp_embed, .head = gp_head};

static int gp_experts(void *ctx, uint32_t layer, const float *ffn_in, uint32_t n,
                      const int32_t *ids, float *out, ds_error *err)
{
    return ds_backend_moe_run(((gen_plan *)ctx)->bm, layer, ffn_in, n, ids, out, err);
}

void gen_plan_install(gen_plan *gp, ds_engine *e)
{
    ds_engine_set_units(e, &gp_units_ops, gp);
    if (gp->bm)
        ds_engine_set_moe_runner(e, gp_experts, gp);
}

/* What runs where, one line (stderr). */
void gen_plan_describe(const gen_plan *gp, FILE *f)
{
    uint32_t L = ds_model_get_config(gp->m)->num_hidden_layers, on = 0;
    for (uint32_t l = 0; l < L; l++)
        on += gp->attn[l] >= 0;
    fprintf(f,
            "plan: %u of %u attention layers on accelerators, embed on %s, head on %s, experts "
            "on %s\n",
            on, L, gp->embed >= 0 ? gp->specs[gp->embed] : "cpu0",
            gp->head >= 0 ? gp->specs[gp->head] : "cpu0",
            gp->experts >= 0 ? gp->specs[gp->experts] : "cpu0");
}
