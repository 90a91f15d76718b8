/* output.c — ds_plan_solve (runs the strategies, keeps the chosen one), accessors, the plan
 * JSON (docs/plan-format.md) and the human report. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "ds_hash.h"
#include "ds_placement.h"
#include "pl_internal.h"

#define GIB    (1024.0 * 1024.0 * 1024.0)
#define N_CAND 5

typedef struct pl_cand {
    enum ds_strategy s;
    int rc;        /* 0 when it produced a plan */
    double obj;    /* objective seconds */
    char why[256]; /* why not, when rc != 0 */
} pl_cand;

struct ds_plan {
    pl_ctx x;
    ds_pl_device *devs; /* own copy: the plan outlives the cluster */
    pl_assign a;
    pl_result r;
    double *used; /* [nd] bytes */
    double step, tps, prefill, obj;
    double bneck_s;
    char bneck[2 * DS_PL_MAX_NAME + 8];
    enum ds_strategy requested, chosen;
    const char *solver;
    pl_cand cand[N_CAND];
    char digest[17];
    uint32_t replicas;
};

static void digest(ds_plan *p)
{
    const pl_ctx *x = &p->x;
    uint64_t h = DS_HASH_FNV1A_INIT;
    for (int d = 0; d < x->nd; d++) {
        const ds_pl_device *v = &x->dev[d];
        h = ds_hash_fnv1a(h, v->node, strlen(v->node));
        h = ds_hash_fnv1a(h, v->name, strlen(v->name));
        double f[5] = {(double)v->memory_bytes, v->mem_bw, v->flops, v->host_link_bw, v->launch_s};
        h = ds_hash_fnv1a(h, f, sizeof f);
        h = ds_hash_fnv1a(h, &x->usable[d], 1);
    }
    h = ds_hash_fnv1a(h, x->lat, (size_t)x->nn * x->nn * sizeof *x->lat);
    h = ds_hash_fnv1a(h, x->bw, (size_t)x->nn * x->nn * sizeof *x->bw);
    uint64_t mdl[8] = {x->L,
                       x->E,
                       x->inv.top_k,
                       x->inv.attn.weight_bytes,
                       x->inv.expert.weight_bytes,
                       x->inv.dense.weight_bytes,
                       x->inv.embed.weight_bytes,
                       x->inv.shared.weight_bytes};
    h = ds_hash_fnv1a(h, mdl, sizeof mdl);
    if (x->inv.bytes_from_file) { /* the file's real bytes differ layer by layer */
        const ds_unit_bytes *ub = &x->inv.bytes;
        size_t lb = x->L * sizeof(uint64_t);
        h = ds_hash_fnv1a(h, &ub->embed, sizeof ub->embed);
        h = ds_hash_fnv1a(h, &ub->head, sizeof ub->head);
        h = ds_hash_fnv1a(h, ub->attn, lb);
        h = ds_hash_fnv1a(h, ub->router, lb);
        h = ds_hash_fnv1a(h, ub->dense, lb);
        h = ds_hash_fnv1a(h, ub->shared, lb);
        h = ds_hash_fnv1a(h, ub->expert, lb);
    }
    uint64_t o[4] = {x->batch, x->context, (uint64_t)x->objective, x->micro};
    h = ds_hash_fnv1a(h, o, sizeof o);
    h = ds_hash_fnv1a(h, &x->reserve, sizeof x->reserve);
    h = ds_hash_fnv1a(h, x->pop, (size_t)x->L * x->E * sizeof *x->pop);
    h = ds_hash_fnv1a(h, x->pin_attn, x->L * sizeof *x->pin_attn);
    h = ds_hash_fnv1a(h, x->pin_exp, (size_t)x->L * x->E * sizeof *x->pin_exp);
    snprintf(p->digest, sizeof p->digest, "%016llx", (unsigned long long)h);
}

ds_plan *ds_plan_free(ds_plan *p)
{
    if (p) {
        pl_assign_release(&p->a);
        pl_result_release(&p->r);
        free(p->used);
        free(p->devs);
        pl_ctx_release(&p->x);
        free(p);
    }
    return NULL;
}

static const char *dname(const pl_ctx *x, int d, char *buf, size_t n)
{
    snprintf(buf, n, "%s/%s", x->dev[d].node, x->dev[d].name);
    return buf;
}

int ds_plan_solve(const ds_cluster *cl, const ds_model_config *cfg, const ds_plan_options *opt,
                  ds_plan **out, ds_error *err)
{
    *out = NULL;
    ds_plan *p = calloc(1, sizeof *p);
    if (!p)
        return ds_error_set(err, -ENOMEM, "plan: out of memory");
    int rc = pl_ctx_init(&p->x, cl, cfg, opt, err);
    if (rc) {
        ds_plan_free(p);
        return rc;
    }
    pl_ctx *x = &p->x;
    p->devs = malloc(x->nd * sizeof *p->devs);
    p->used = calloc(x->nd, sizeof *p->used);
    if (!p->devs || !p->used || pl_assign_init(&p->a, x) || pl_result_init(&p->r, x)) {
        ds_plan_free(p);
        return ds_error_set(err, -ENOMEM, "plan: out of memory");
    }
    memcpy(p->devs, x->dev, x->nd * sizeof *p->devs);
    x->dev = p->devs;
    x->cl = NULL;
    p->requested = opt->strategy;
    /* Every strategy is run (cheap) so the report can name the runner-up; auto picks the best
     * of the solver and the baselines, so it never loses to one. */
    static const enum ds_strategy order[N_CAND] = {
        DS_STRAT_HEURISTIC, DS_STRAT_EXACT, DS_STRAT_MEM_PROPORTIONAL, DS_STRAT_EXPERTS_ON_CPU,
        DS_STRAT_BALANCED_EXPERTS};
    pl_assign t;
    if (pl_assign_init(&t, x)) {
        ds_plan_free(p);
        return ds_error_set(err, -ENOMEM, "plan: out of memory");
    }
    bool small = (size_t)x->E * x->nd <= x->exact_max_vars;
    int best = -1;
    bool exact_partial = false;
    for (int i = 0; i < N_CAND; i++) {
        pl_cand *c = &p->cand[i];
        c->s = order[i];
        c->obj = INFINITY;
        /* The MILP is the slow one: run only for auto (when small) or when asked for. */
        if (order[i] == DS_STRAT_EXACT && p->requested != DS_STRAT_EXACT &&
            (p->requested != DS_STRAT_AUTO || !small || !x->E)) {
            c->rc = -ENOENT;
            snprintf(c->why, sizeof c->why, "not run (%s)",
                     p->requested != DS_STRAT_AUTO ? "not requested"
                                                   : "instance too large for the MILP");
            continue;
        }
        bool no;
        c->rc = pl_run_strategy(x, order[i], &t, &c->obj, &no, c->why, sizeof c->why);
        if (c->rc)
            continue;
        bool eligible = p->requested == DS_STRAT_AUTO ? true : p->requested == order[i];
        if (p->requested == DS_STRAT_AUTO && (order[i] == DS_STRAT_EXACT) && no)
            exact_partial = true;
        /* strict improvement: on ties the earlier (solver) wins */
        if (eligible && (best < 0 || c->obj < p->cand[best].obj * (1 - 1e-12))) {
            best = i;
            pl_assign_copy(&p->a, &t, x);
            if (order[i] == DS_STRAT_EXACT)
                exact_partial = no;
        }
    }
    pl_assign_release(&t);
    if (best < 0) {
        char msg[512];
        int code = -ENOSPC;
        if (p->requested != DS_STRAT_AUTO) {
            for (int i = 0; i < N_CAND; i++)
                if (p->cand[i].s == p->requested) {
                    snprintf(msg, sizeof msg, "%s", p->cand[i].why);
                    code = p->cand[i].rc;
                }
            if (code == -ENOSPC) {
                char sf[400];
                pl_shortfall(x, sf, sizeof sf);
                if (strstr(sf, "does not fit"))
                    snprintf(msg, sizeof msg, "%s", sf);
            }
        } else
            pl_shortfall(x, msg, sizeof msg);
        ds_plan_free(p);
        return ds_error_set(err, code, "plan (%s): %s", ds_strategy_name(opt->strategy), msg);
    }
    p->chosen = p->cand[best].s;
    switch (p->chosen) {
    case DS_STRAT_HEURISTIC:
        p->solver = "heuristic";
        break;
    case DS_STRAT_EXACT:
        p->solver = exact_partial ? "exact-milp-time-limited" : "exact-milp";
        break;
    default:
        p->solver = ds_strategy_name(p->chosen);
        break;
    }
    p->obj = p->cand[best].obj;
    pl_layer_sums s;
    if (pl_layer_sums_init(&s, x)) {
        pl_layer_sums_release(&s);
        ds_plan_free(p);
        return ds_error_set(err, -ENOMEM, "plan: out of memory");
    }
    /* Prefill: a 1024-token chunk whose tokens see on average half of a 1024-token context. */
    p->prefill = pl_eval(x, &p->a, 1024, 512, NULL, &s) * 1000.0 / 1024.0;
    p->step = pl_eval(x, &p->a, x->batch, x->context, &p->r, &s);
    pl_layer_sums_release(&s);
    p->tps = x->objective == DS_OBJ_LATENCY ? x->batch / p->step : x->batch / p->obj;
    pl_memory(x, &p->a, p->used);
    char buf[2 * DS_PL_MAX_NAME + 2];
    p->bneck_s = -1;
    for (int d = 0; d < x->nd; d++)
        if (p->r.busy[d] > p->bneck_s) {
            p->bneck_s = p->r.busy[d];
            snprintf(p->bneck, sizeof p->bneck, "%s", dname(x, d, buf, sizeof buf));
        }
    for (int i = 0; i < x->nn; i++)
        for (int j = i + 1; j < x->nn; j++)
            if (p->r.link_s[i * x->nn + j] > p->bneck_s) {
                p->bneck_s = p->r.link_s[i * x->nn + j];
                snprintf(p->bneck, sizeof p->bneck, "link %.60s<->%.60s",
                         ds_cluster_node_name(cl, i), ds_cluster_node_name(cl, j));
            }
    for (size_t i = 0; i < (size_t)x->L * x->E; i++)
        p->replicas += p->a.ncopy[i] > 1 ? p->a.ncopy[i] - 1u : 0;
    digest(p);
    *out = p;
    return 0;
}

void ds_plan_get_summary(const ds_plan *p, ds_plan_summary *s)
{
    memset(s, 0, sizeof *s);
    s->decode_step_s = p->step;
    s->decode_tokens_per_s = p->tps;
    s->prefill_s_per_1k_tokens = p->prefill;
    s->bottleneck_busy_s = p->bneck_s;
    snprintf(s->bottleneck, sizeof s->bottleneck, "%s", p->bneck);
    s->solver = p->solver;
    s->strategy = ds_strategy_name(p->requested);
    s->replicas = p->replicas;
}

int ds_plan_unit_device(const ds_plan *p, enum ds_unit_kind k, uint32_t l, uint32_t e, uint32_t r)
{
    const pl_ctx *x = &p->x;
    switch (k) {
    case DS_UNIT_EMBED:
        return r ? -ENOENT : p->a.embed;
    case DS_UNIT_HEAD:
        return r ? -ENOENT : p->a.head;
    case DS_UNIT_ATTN:
        return l < x->L && !r ? p->a.attn[l] : -ENOENT;
    case DS_UNIT_DENSE:
        return l < x->L && !r && !x->inv.is_moe[l] ? p->a.attn[l] : -ENOENT;
    case DS_UNIT_SHARED:
        return l < x->L && !r && x->inv.is_moe[l] && x->inv.shared.weight_bytes ? p->a.attn[l]
                                                                                : -ENOENT;
    case DS_UNIT_EXPERT:
        if (l >= x->L || e >= x->E || !x->inv.is_moe[l] || r >= p->a.ncopy[(size_t)l * x->E + e])
            return -ENOENT;
        return p->a.exp[((size_t)l * x->E + e) * PL_MAX_COPIES + r];
    }
    return -ENOENT;
}

uint32_t ds_plan_expert_copies(const ds_plan *p, uint32_t l, uint32_t e)
{
    if (l >= p->x.L || e >= p->x.E || !p->x.inv.is_moe[l])
        return 0;
    return p->a.ncopy[(size_t)l * p->x.E + e];
}

void ds_plan_device_load(const ds_plan *p, int d, uint64_t *bytes, double *busy)
{
    if (d < 0 || d >= p->x.nd) {
        *bytes = 0;
        *busy = 0;
        return;
    }
    *bytes = (uint64_t)p->used[d];
    *busy = p->r.busy[d];
}

static void add_unit(json_t *arr, const char *unit, const pl_ctx *x, int d, uint64_t bytes,
                     int replica)
{
    char buf[2 * DS_PL_MAX_NAME + 2];
    json_array_append_new(arr, json_pack("{s:s,s:s,s:I,s:i}", "unit", unit, "device",
                                         dname(x, d, buf, sizeof buf), "bytes", (json_int_t)bytes,
                                         "replica", replica));
}

char *ds_plan_to_json(const ds_plan *p)
{
    const pl_ctx *x = &p->x;
    json_t *root = json_object();
    json_object_set_new(root, "version", json_integer(1));
    json_object_set_new(root, "objective",
                        json_string(x->objective == DS_OBJ_LATENCY ? "latency" : "throughput"));
    json_object_set_new(root, "strategy", json_string(ds_strategy_name(p->requested)));
    json_object_set_new(root, "solver", json_string(p->solver));
    json_object_set_new(root, "inputs_digest", json_string(p->digest));
    json_object_set_new(root, "workload",
                        json_pack("{s:i,s:i,s:i,s:f}", "batch", (int)x->batch, "context",
                                  (int)x->context, "micro_batches", (int)x->micro,
                                  "reserve_fraction", x->reserve));
    json_object_set_new(root, "predicted",
                        json_pack("{s:f,s:f,s:f,s:s,s:f}", "decode_step_s", p->step,
                                  "decode_tokens_per_s", p->tps, "prefill_s_per_1k_tokens",
                                  p->prefill, "bottleneck", p->bneck, "bottleneck_busy_s",
                                  p->bneck_s));
    json_t *units = json_array();
    char nm[48];
    const ds_unit_bytes *ub = &x->inv.bytes;
    add_unit(units, "embed", x, p->a.embed, ub->embed, 0);
    for (uint32_t l = 0; l < x->L; l++) {
        snprintf(nm, sizeof nm, "attn[%u]", l);
        add_unit(units, nm, x, p->a.attn[l], ub->attn[l] + ub->router[l], 0);
        if (!x->inv.is_moe[l]) {
            snprintf(nm, sizeof nm, "dense[%u]", l);
            add_unit(units, nm, x, p->a.attn[l], ub->dense[l], 0);
            continue;
        }
        if (x->inv.shared.weight_bytes) {
            snprintf(nm, sizeof nm, "shared[%u]", l);
            add_unit(units, nm, x, p->a.attn[l], ub->shared[l], 0);
        }
        for (uint32_t e = 0; e < x->E; e++) {
            size_t i = (size_t)l * x->E + e;
            snprintf(nm, sizeof nm, "expert[%u][%u]", l, e);
            for (int c = 0; c < p->a.ncopy[i]; c++)
                add_unit(units, nm, x, p->a.exp[i * PL_MAX_COPIES + c], ub->expert[l], c);
        }
    }
    add_unit(units, "head", x, p->a.head, ub->head, 0);
    json_object_set_new(root, "units", units);
    json_t *devs = json_array();
    char buf[2 * DS_PL_MAX_NAME + 2];
    for (int d = 0; d < x->nd; d++)
        json_array_append_new(devs, json_pack("{s:s,s:I,s:I,s:f,s:b}", "device",
                                              dname(x, d, buf, sizeof buf), "bytes_used",
                                              (json_int_t)p->used[d], "capacity_bytes",
                                              (json_int_t)x->dev[d].memory_bytes, "busy_s",
                                              p->r.busy[d], "usable", x->usable[d]));
    json_object_set_new(root, "devices", devs);
    json_t *links = json_array();
    for (int i = 0; i < x->nn; i++)
        for (int j = i + 1; j < x->nn; j++)
            if (p->r.link_bytes[i * x->nn + j] > 0)
                json_array_append_new(
                    links, json_pack("{s:s,s:s,s:f,s:f}", "a", p->devs ? x->dev[0].node : "", "b",
                                     "", "bytes_per_step", p->r.link_bytes[i * x->nn + j],
                                     "seconds_per_step", p->r.link_s[i * x->nn + j]));
    /* node names: the first device of each node carries it */
    size_t k = 0;
    for (int i = 0; i < x->nn; i++)
        for (int j = i + 1; j < x->nn; j++)
            if (p->r.link_bytes[i * x->nn + j] > 0) {
                json_t *o = json_array_get(links, k++);
                const char *na = "", *nb = "";
                for (int d = 0; d < x->nd; d++) {
                    if (x->dev[d].node_index == i)
                        na = x->dev[d].node;
                    if (x->dev[d].node_index == j)
                        nb = x->dev[d].node;
                }
                json_object_set_new(o, "a", json_string(na));
                json_object_set_new(o, "b", json_string(nb));
            }
    json_object_set_new(root, "links", links);
    json_t *cands = json_array();
    for (int i = 0; i < N_CAND; i++) {
        const pl_cand *c = &p->cand[i];
        json_t *o = json_pack("{s:s}", "strategy", ds_strategy_name(c->s));
        if (c->rc == 0)
            json_object_set_new(o, "objective_s", json_real(c->obj));
        else
            json_object_set_new(o, "error", json_string(c->why));
        json_array_append_new(cands, o);
    }
    json_object_set_new(root, "candidates", cands);
    char *s = json_dumps(root, JSON_INDENT(1) | JSON_PRESERVE_ORDER);
    json_decref(root);
    return s;
}

void ds_plan_print(const ds_plan *p, void *file, bool explain)
{
    FILE *f = file;
    const pl_ctx *x = &p->x;
    char buf[2 * DS_PL_MAX_NAME + 2];
    fprintf(f, "plan: strategy %s, solver %s, objective %s, batch %u, context %u, digest %s\n",
            ds_strategy_name(p->requested), p->solver,
            x->objective == DS_OBJ_LATENCY ? "latency" : "throughput", x->batch, x->context,
            p->digest);
    fprintf(f, "predicted: decode step %.3f ms, %.2f tokens/s, prefill %.3f s per 1k tokens\n",
            p->step * 1e3, p->tps, p->prefill);
    fprintf(f, "\n%-28s %10s %10s %10s %8s %8s\n", "device", "used GiB", "cap GiB", "busy ms",
            "experts", "layers");
    for (int d = 0; d < x->nd; d++) {
        int ne = 0, nl = 0;
        for (size_t i = 0; i < (size_t)x->L * x->E; i++)
            for (int c = 0; c < p->a.ncopy[i]; c++)
                ne += p->a.exp[i * PL_MAX_COPIES + c] == d;
        for (uint32_t l = 0; l < x->L; l++)
            nl += p->a.attn[l] == d;
        fprintf(f, "%-28s %10.2f %10.2f %10.3f %8d %8d%s\n", dname(x, d, buf, sizeof buf),
                p->used[d] / GIB, (double)x->dev[d].memory_bytes / GIB, p->r.busy[d] * 1e3, ne, nl,
                x->usable[d] ? "" : "  (not used: excluded or shares silicon)");
    }
    fprintf(f, "\nattention hosts (attn/dense/shared): embed -> %s\n",
            dname(x, p->a.embed, buf, sizeof buf));
    uint32_t l0 = 0;
    for (uint32_t l = 1; l <= x->L; l++)
        if (l == x->L || p->a.attn[l] != p->a.attn[l0]) {
            fprintf(f, "  layers %u-%u -> %s\n", l0, l - 1,
                    dname(x, p->a.attn[l0], buf, sizeof buf));
            l0 = l;
        }
    fprintf(f, "  head -> %s\n", dname(x, p->a.head, buf, sizeof buf));
    if (x->E) {
        fprintf(f, "\nexperts per MoE layer (copies per device; %u replicas in all):\n",
                p->replicas);
        char prev[1024] = "";
        uint32_t from = 0;
        for (uint32_t l = 0; l <= x->L; l++) {
            char line[1024] = "";
            if (l < x->L && x->inv.is_moe[l]) {
                size_t o = 0;
                for (int d = 0; d < x->nd && o < sizeof line - 80; d++) {
                    int n = 0;
                    for (uint32_t e = 0; e < x->E; e++) {
                        size_t i = (size_t)l * x->E + e;
                        for (int c = 0; c < p->a.ncopy[i]; c++)
                            n += p->a.exp[i * PL_MAX_COPIES + c] == d;
                    }
                    if (n)
                        o += (size_t)snprintf(line + o, sizeof line - o, " %s:%d",
                                              dname(x, d, buf, sizeof buf), n);
                }
            }
            if (strcmp(line, prev) || l == x->L) {
                if (prev[0])
                    fprintf(f, "  layers %u-%u:%s\n", from, l - 1, prev);
                snprintf(prev, sizeof prev, "%s", line);
                from = l;
            }
        }
    }
    fprintf(f, "\nlinks per decode step:\n");
    int any = 0;
    for (int i = 0; i < x->nn; i++)
        for (int j = i + 1; j < x->nn; j++)
            if (p->r.link_bytes[i * x->nn + j] > 0) {
                const char *na = "", *nb = "";
                for (int d = 0; d < x->nd; d++) {
                    if (x->dev[d].node_index == i)
                        na = x->dev[d].node;
                    if (x->dev[d].node_index == j)
                        nb = x->dev[d].node;
                }
                fprintf(f, "  %s <-> %s: %.1f KiB, %.3f ms\n", na, nb,
                        p->r.link_bytes[i * x->nn + j] / 1024, p->r.link_s[i * x->nn + j] * 1e3);
                any = 1;
            }
    if (!any)
        fprintf(f, "  (no traffic between nodes)\n");
    if (explain) {
        fprintf(f, "\nexplain:\n  bottleneck: %s, busy %.3f ms of a %.3f ms step\n", p->bneck,
                p->bneck_s * 1e3, p->step * 1e3);
        int ru = -1;
        for (int i = 0; i < N_CAND; i++) {
            const pl_cand *c = &p->cand[i];
            if (c->s == p->chosen)
                continue;
            if (c->rc == 0 && (ru < 0 || c->obj < p->cand[ru].obj))
                ru = i;
        }
        if (ru >= 0)
            fprintf(f, "  runner-up: %s at %.3f ms per %s (%.2fx the chosen %.3f ms)\n",
                    ds_strategy_name(p->cand[ru].s), p->cand[ru].obj * 1e3,
                    x->objective == DS_OBJ_LATENCY ? "step" : "batch", p->cand[ru].obj / p->obj,
                    p->obj * 1e3);
        for (int i = 0; i < N_CAND; i++) {
            const pl_cand *c = &p->cand[i];
            if (c->rc == 0)
                fprintf(f, "  %-18s %.3f ms\n", ds_strategy_name(c->s), c->obj * 1e3);
            else
                fprintf(f, "  %-18s -- %s\n", ds_strategy_name(c->s), c->why);
        }
    }
}

double ds_plan_eval_strategy(const ds_cluster *cl, const ds_model_config *cfg,
                             const ds_plan_options *opt, enum ds_strategy s, ds_error *err)
{
    ds_plan_options o = *opt;
    o.strategy = s;
    ds_plan *p;
    int rc = ds_plan_solve(cl, cfg, &o, &p, err);
    if (rc)
        return -1;
    double v = p->obj;
    ds_plan_free(p);
    return v;
}
