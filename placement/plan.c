/* plan.c — cost model, solver (heuristic + exact MILP) and baselines (docs/placement.md).
 *
 * A plan fixes: the host of embed and head, one host per layer for attn[l] (dense[l] and
 * shared[l] run on the same host: they need the rows attention produced), and up to
 * PL_MAX_COPIES hosts for every routed expert. Everything is evaluated by one cost model
 * (eval_plan) so the solver and the baselines are compared on equal terms. */
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <glpk.h>

#include "ds_placement.h"
#include "pl_internal.h"

const char *ds_strategy_name(enum ds_strategy s)
{
    switch (s) {
    case DS_STRAT_AUTO:
        return "auto";
    case DS_STRAT_MEM_PROPORTIONAL:
        return "mem-proportional";
    case DS_STRAT_EXPERTS_ON_CPU:
        return "experts-on-cpu";
    case DS_STRAT_BALANCED_EXPERTS:
        return "balanced-experts";
    case DS_STRAT_HEURISTIC:
        return "heuristic";
    case DS_STRAT_EXACT:
        return "exact";
    }
    return "?";
}

int ds_strategy_parse(const char *name, enum ds_strategy *out)
{
    for (int s = DS_STRAT_AUTO; s <= DS_STRAT_EXACT; s++)
        if (!strcmp(name, ds_strategy_name((enum ds_strategy)s))) {
            *out = (enum ds_strategy)s;
            return 0;
        }
    return -EINVAL;
}

/* ---- context ------------------------------------------------------------------------------ */

void pl_ctx_release(pl_ctx *x)
{
    free(x->lat);
    free(x->bw);
    free(x->usable);
    free(x->cap);
    free(x->pop);
    free(x->pin_attn);
    free(x->pin_exp);
    ds_inventory_release(&x->inv);
    memset(x, 0, sizeof *x);
}

static int device_by_name(const pl_ctx *x, const char *s)
{
    for (int d = 0; d < x->nd; d++) {
        char full[2 * DS_PL_MAX_NAME + 2];
        snprintf(full, sizeof full, "%s/%s", x->dev[d].node, x->dev[d].name);
        if (!strcmp(full, s))
            return d;
    }
    return -1;
}

int pl_ctx_init(pl_ctx *x, const ds_cluster *cl, const ds_model_config *cfg,
                const ds_plan_options *o, ds_error *err)
{
    memset(x, 0, sizeof *x);
    int rc = ds_inventory_build(cfg, &x->inv, err);
    if (rc)
        return rc;
    if (o->unit_bytes && (rc = ds_inventory_set_bytes(&x->inv, o->unit_bytes, err)) < 0)
        return rc;
    x->cl = cl;
    x->nd = ds_cluster_n_devices(cl);
    x->nn = ds_cluster_n_nodes(cl);
    x->dev = ds_cluster_device(cl, 0);
    x->L = x->inv.n_layers;
    x->E = x->inv.n_experts;
    x->batch = o->batch ? o->batch : 1;
    x->context = o->context ? o->context : 1;
    if (o->batch > 1000000 || o->context > 100000000)
        return ds_error_set(err, -ERANGE, "plan: batch %u / context %u beyond limits", o->batch,
                            o->context);
    x->objective = o->objective;
    x->micro = o->micro_batches ? o->micro_batches : 4;
    if (x->micro > 1024)
        x->micro = 1024;
    x->reserve = o->reserve_fraction > 0 ? o->reserve_fraction : 0.05;
    if (x->reserve >= 1 || !isfinite(x->reserve))
        return ds_error_set(err, -ERANGE, "plan: memory reserve %g must be below 1", x->reserve);
    x->no_replicas = o->no_replicas;
    x->exact_max_vars = o->exact_max_vars ? o->exact_max_vars : 1024;
    x->exact_tl = o->exact_time_limit_s > 0 ? o->exact_time_limit_s : 1.0;
    size_t nn2 = (size_t)x->nn * x->nn;
    x->lat = calloc(nn2, sizeof *x->lat);
    x->bw = calloc(nn2, sizeof *x->bw);
    x->usable = calloc(x->nd, sizeof *x->usable);
    x->cap = calloc(x->nd, sizeof *x->cap);
    x->pop = calloc((size_t)x->L * (x->E ? x->E : 1), sizeof *x->pop);
    x->pin_attn = malloc(x->L * sizeof *x->pin_attn);
    x->pin_exp = malloc((size_t)x->L * (x->E ? x->E : 1) * sizeof *x->pin_exp);
    if (!x->lat || !x->bw || !x->usable || !x->cap || !x->pop || !x->pin_attn || !x->pin_exp)
        return ds_error_set(err, -ENOMEM, "plan: out of memory");
    for (int a = 0; a < x->nn; a++)
        for (int b = 0; b < x->nn; b++)
            ds_cluster_link(cl, a, b, &x->lat[a * x->nn + b], &x->bw[a * x->nn + b]);
    /* Shared silicon: a device that shares silicon with another is only an alternative to
     * it; it is used only when the operator excludes the primary. */
    bool *excl = calloc(x->nd, sizeof *excl);
    if (!excl)
        return ds_error_set(err, -ENOMEM, "plan: out of memory");
    for (size_t i = 0; i < o->n_exclude; i++) {
        bool hit = false;
        for (int d = 0; d < x->nd; d++) {
            char full[2 * DS_PL_MAX_NAME + 2];
            snprintf(full, sizeof full, "%s/%s", x->dev[d].node, x->dev[d].name);
            if (!strcmp(full, o->exclude[i]) || !strcmp(x->dev[d].node, o->exclude[i]))
                excl[d] = hit = true;
        }
        if (!hit) {
            free(excl);
            return ds_error_set(err, -EINVAL, "plan: --exclude '%s' names no node or device",
                                o->exclude[i]);
        }
    }
    int n_usable = 0;
    for (int d = 0; d < x->nd; d++) {
        int p = x->dev[d].shares_with;
        x->usable[d] = !excl[d] && (p < 0 || excl[p]) && x->dev[d].memory_bytes > 0;
        x->cap[d] = (double)x->dev[d].memory_bytes * (1 - x->reserve);
        n_usable += x->usable[d];
    }
    free(excl);
    if (!n_usable)
        return ds_error_set(err, -ENOENT,
                            "plan: no usable device (all excluded or without "
                            "memory)");
    /* Popularity: per layer, normalised to sum 1 over experts. */
    for (uint32_t l = 0; l < x->L; l++) {
        double s = 0;
        for (uint32_t e = 0; e < x->E; e++) {
            double v = o->expert_stats ? o->expert_stats[(size_t)l * x->E + e] : 1.0;
            if (!isfinite(v) || v < 0)
                return ds_error_set(err, -ERANGE, "plan: expert stats layer %u expert %u: %g", l, e,
                                    v);
            x->pop[(size_t)l * x->E + e] = v;
            s += v;
        }
        for (uint32_t e = 0; e < x->E; e++)
            x->pop[(size_t)l * x->E + e] = s > 0 ? x->pop[(size_t)l * x->E + e] / s : 1.0 / x->E;
    }
    x->pin_embed = x->pin_head = -1;
    for (uint32_t l = 0; l < x->L; l++)
        x->pin_attn[l] = -1;
    for (size_t i = 0; i < (size_t)x->L * x->E; i++)
        x->pin_exp[i] = -1;
    for (size_t i = 0; i < o->n_pins; i++) {
        enum ds_unit_kind k;
        uint32_t l, e;
        int d = device_by_name(x, o->pins[i].device);
        if (d < 0)
            return ds_error_set(err, -EINVAL,
                                "plan: pin %s: unknown device '%s' (want "
                                "node/device)",
                                o->pins[i].unit, o->pins[i].device);
        if (!x->usable[d])
            return ds_error_set(err, -EINVAL,
                                "plan: pin %s: device '%s' is excluded or an "
                                "alternative of another",
                                o->pins[i].unit, o->pins[i].device);
        if (ds_unit_parse(o->pins[i].unit, &k, &l, &e) ||
            (k != DS_UNIT_EMBED && k != DS_UNIT_HEAD && l >= x->L))
            return ds_error_set(err, -EINVAL, "plan: pin: bad unit '%s'", o->pins[i].unit);
        if (k == DS_UNIT_EMBED)
            x->pin_embed = d;
        else if (k == DS_UNIT_HEAD)
            x->pin_head = d;
        else if (k == DS_UNIT_EXPERT) {
            if (!x->inv.is_moe[l] || e >= x->E)
                return ds_error_set(err, -EINVAL, "plan: pin: no unit '%s'", o->pins[i].unit);
            x->pin_exp[(size_t)l * x->E + e] = d;
        } else {
            if ((k == DS_UNIT_DENSE && x->inv.is_moe[l]) ||
                (k == DS_UNIT_SHARED && (!x->inv.is_moe[l] || !x->inv.shared.weight_bytes)))
                return ds_error_set(err, -EINVAL, "plan: pin: no unit '%s'", o->pins[i].unit);
            if (x->pin_attn[l] >= 0 && x->pin_attn[l] != d)
                return ds_error_set(err, -EINVAL,
                                    "plan: pins put layer %u's attention, dense "
                                    "and shared units on different devices; they share a host",
                                    l);
            x->pin_attn[l] = d;
        }
    }
    return 0;
}

/* ---- assignments ------------------------------------------------------------------------ */

int pl_assign_init(pl_assign *a, const pl_ctx *x)
{
    memset(a, 0, sizeof *a);
    a->attn = calloc(x->L, sizeof *a->attn);
    a->ncopy = calloc((size_t)x->L * (x->E ? x->E : 1), sizeof *a->ncopy);
    a->exp = calloc((size_t)x->L * (x->E ? x->E : 1) * PL_MAX_COPIES, sizeof *a->exp);
    return a->attn && a->ncopy && a->exp ? 0 : -ENOMEM;
}

void pl_assign_release(pl_assign *a)
{
    free(a->attn);
    free(a->ncopy);
    free(a->exp);
    memset(a, 0, sizeof *a);
}

void pl_assign_copy(pl_assign *dst, const pl_assign *src, const pl_ctx *x)
{
    dst->embed = src->embed;
    dst->head = src->head;
    memcpy(dst->attn, src->attn, x->L * sizeof *dst->attn);
    memcpy(dst->ncopy, src->ncopy, (size_t)x->L * x->E * sizeof *dst->ncopy);
    memcpy(dst->exp, src->exp, (size_t)x->L * x->E * PL_MAX_COPIES * sizeof *dst->exp);
}

/* ---- cost model --------------------------------------------------------------------------- */

/* Seconds device d needs to run weights of `bytes` (streamed once) over work of `flops`. */
static double dev_time(const ds_pl_device *d, double bytes, double flops)
{
    return fmax(bytes / d->mem_bw, flops / d->flops) + d->launch_s;
}

/* Probability that a copy of an expert with routing share p (per pick) and `copies` copies
 * receives at least one of `picks` (token, expert) picks. */
static double touched(double p, double picks, int copies)
{
    double q = p / copies;
    if (q >= 1)
        return 1;
    return 1 - exp(picks * log1p(-q));
}

/* Seconds to move `bytes` between devices a and b (one direction), and the link it uses.
 * Different nodes: the node link. Same node: the host link of the accelerator side. */
static double xfer(const pl_ctx *x, int a, int b, double bytes, int *la, int *lb)
{
    *la = *lb = -1;
    if (a == b || bytes <= 0)
        return 0;
    int na = x->dev[a].node_index, nb = x->dev[b].node_index;
    if (na != nb) {
        *la = na < nb ? na : nb;
        *lb = na < nb ? nb : na;
        return x->lat[na * x->nn + nb] + bytes / x->bw[na * x->nn + nb];
    }
    double hl = 0;
    if (x->dev[a].host_link_bw > 0)
        hl = x->dev[a].host_link_bw;
    if (x->dev[b].host_link_bw > 0 && (hl == 0 || x->dev[b].host_link_bw < hl))
        hl = x->dev[b].host_link_bw;
    return hl > 0 ? bytes / hl : 0;
}

void pl_layer_sums_reset(pl_layer_sums *s, const pl_ctx *x)
{
    memset(s->bytes, 0, x->nd * sizeof *s->bytes);
    memset(s->flops, 0, x->nd * sizeof *s->flops);
    memset(s->pairs, 0, x->nd * sizeof *s->pairs);
    memset(s->cnt, 0, x->nd * sizeof *s->cnt);
    memset(s->npairs, 0, x->nn * sizeof *s->npairs);
}

/* Adds (sign +1) or removes (-1) one copy of expert e of layer l (of `copies`) on device d. */
void pl_layer_sums_add(pl_layer_sums *s, const pl_ctx *x, uint32_t l, uint32_t e, int d, int copies,
                       double rows, int sign)
{
    double p = x->pop[(size_t)l * x->E + e];
    double picks = rows * x->inv.top_k;
    double r = picks * p / copies;
    s->bytes[d] += sign * touched(p, picks, copies) * (double)x->inv.bytes.expert[l];
    s->flops[d] += sign * r * x->inv.expert.flops_per_token;
    s->pairs[d] += sign * r;
    s->cnt[d] += sign;
    s->npairs[x->dev[d].node_index] += sign * r;
}

/* Dispatch + compute + combine seconds of device d's experts for a layer hosted on `host`. */
double pl_path(const pl_ctx *x, const pl_layer_sums *s, int host, int d, double rows)
{
    if (s->cnt[d] <= 0)
        return 0;
    double c = dev_time(&x->dev[d], s->bytes[d], s->flops[d]);
    int la, lb;
    double act = (double)x->inv.expert.act_bytes_per_token;
    int nd = x->dev[d].node_index, nh = x->dev[host].node_index;
    if (nd != nh)
        c += 2 * xfer(x, host, d, fmin(rows, s->npairs[nd]) * act, &la, &lb);
    else
        c += 2 * xfer(x, host, d, fmin(rows, s->pairs[d]) * act, &la, &lb);
    return c;
}

double pl_layer_max(const pl_ctx *x, const pl_layer_sums *s, int host, double rows, int *arg)
{
    double m = 0;
    int am = -1;
    for (int d = 0; d < x->nd; d++) {
        if (!s->cnt[d])
            continue;
        double t = pl_path(x, s, host, d, rows);
        if (t > m) {
            m = t;
            am = d;
        }
    }
    if (arg)
        *arg = am;
    return m;
}

int pl_layer_sums_init(pl_layer_sums *s, const pl_ctx *x)
{
    s->bytes = calloc(x->nd, sizeof *s->bytes);
    s->flops = calloc(x->nd, sizeof *s->flops);
    s->pairs = calloc(x->nd, sizeof *s->pairs);
    s->cnt = calloc(x->nd, sizeof *s->cnt);
    s->npairs = calloc(x->nn, sizeof *s->npairs);
    return s->bytes && s->flops && s->pairs && s->cnt && s->npairs ? 0 : -ENOMEM;
}

void pl_layer_sums_release(pl_layer_sums *s)
{
    free(s->bytes);
    free(s->flops);
    free(s->pairs);
    free(s->cnt);
    free(s->npairs);
}

/* The placement memory model, written once: what a device must hold for the units given to
 * it. A layer's host holds attn[l]'s weights and KV cache (batch sequences of `context`
 * tokens) and, beside it, the router gate + shared experts (MoE layer) or the dense FFN; every
 * expert copy holds its weights; embed and head hold theirs. */
double pl_layer_host_bytes(const pl_ctx *x, uint32_t l)
{
    const ds_unit_bytes *ub = &x->inv.bytes;
    double b = (double)ub->attn[l] +
               (double)x->inv.attn.kv_bytes_per_token * x->batch * (double)x->context;
    if (x->inv.is_moe[l])
        b += (double)(ub->router[l] + ub->shared[l]);
    else
        b += (double)ub->dense[l];
    return b;
}

void pl_memory_hosts(const pl_ctx *x, const pl_assign *a, double *used)
{
    memset(used, 0, x->nd * sizeof *used);
    used[a->embed] += (double)x->inv.bytes.embed;
    used[a->head] += (double)x->inv.bytes.head;
    for (uint32_t l = 0; l < x->L; l++)
        used[a->attn[l]] += pl_layer_host_bytes(x, l);
}

void pl_memory(const pl_ctx *x, const pl_assign *a, double *used)
{
    pl_memory_hosts(x, a, used);
    for (uint32_t l = 0; l < x->L; l++) {
        if (!x->inv.is_moe[l])
            continue;
        for (uint32_t e = 0; e < x->E; e++) {
            size_t i = (size_t)l * x->E + e;
            for (int c = 0; c < a->ncopy[i]; c++)
                used[a->exp[i * PL_MAX_COPIES + c]] += (double)x->inv.bytes.expert[l];
        }
    }
}

/* Evaluates a decode step of `rows` rows with `ctx` tokens of context each. Fills res (busy
 * seconds per device, bytes and seconds per node pair) when given. Returns step seconds. */
double pl_eval(const pl_ctx *x, const pl_assign *a, double rows, double ctx, pl_result *res,
               pl_layer_sums *s)
{
    double step = 0;
    int la, lb;
    const ds_inventory *iv = &x->inv;
    double act = (double)iv->attn.act_bytes_per_token;
    if (res) {
        memset(res->busy, 0, x->nd * sizeof *res->busy);
        memset(res->link_bytes, 0, (size_t)x->nn * x->nn * sizeof *res->link_bytes);
        memset(res->link_s, 0, (size_t)x->nn * x->nn * sizeof *res->link_s);
    }
#define HOP(from, to, bytes)                                                                       \
    do {                                                                                           \
        double t_ = xfer(x, (from), (to), (bytes), &la, &lb);                                      \
        step += t_;                                                                                \
        if (res && la >= 0) {                                                                      \
            res->link_bytes[la * x->nn + lb] += (bytes);                                           \
            res->link_s[la * x->nn + lb] += t_;                                                    \
        }                                                                                          \
    } while (0)
    /* embed: a row lookup per token. */
    double t = dev_time(&x->dev[a->embed], rows * act, 0);
    step += t;
    if (res)
        res->busy[a->embed] += t;
    int prev = a->embed;
    for (uint32_t l = 0; l < x->L; l++) {
        int h = a->attn[l];
        HOP(prev, h, rows * act);
        double wb = (double)iv->bytes.attn[l], fl = iv->attn.flops_per_token * rows;
        if (iv->is_moe[l]) {
            wb += (double)iv->bytes.router[l];
            fl += iv->attn_router.flops_per_token * rows;
        }
        /* The KV cache is streamed too: every row reads its whole context. */
        wb += (double)iv->attn.kv_bytes_per_token * rows * ctx;
        fl += iv->attn.attn_flops_per_ctx * rows * ctx;
        t = dev_time(&x->dev[h], wb, fl);
        step += t;
        if (res)
            res->busy[h] += t;
        if (!iv->is_moe[l]) {
            t = dev_time(&x->dev[h], (double)iv->bytes.dense[l], iv->dense.flops_per_token * rows);
            step += t;
            if (res)
                res->busy[h] += t;
        } else {
            /* Shared experts run on the host beside the routed experts. */
            double ts = iv->bytes.shared[l] ? dev_time(&x->dev[h], (double)iv->bytes.shared[l],
                                                       iv->shared.flops_per_token * rows)
                                            : 0;
            pl_layer_sums_reset(s, x);
            for (uint32_t e = 0; e < x->E; e++) {
                size_t i = (size_t)l * x->E + e;
                for (int c = 0; c < a->ncopy[i]; c++)
                    pl_layer_sums_add(s, x, l, e, a->exp[i * PL_MAX_COPIES + c], a->ncopy[i], rows,
                                      +1);
            }
            double te = 0;
            for (int d = 0; d < x->nd; d++) {
                if (!s->cnt[d])
                    continue;
                double p = pl_path(x, s, h, d, rows);
                double c = dev_time(&x->dev[d], s->bytes[d], s->flops[d]);
                if (d == h)
                    p += ts; /* the host runs shared experts and its own routed ones */
                te = fmax(te, p);
                if (res)
                    res->busy[d] += c;
            }
            if (res) {
                /* Node links: each remote node's rows cross twice. */
                for (int n = 0; n < x->nn; n++) {
                    int hn = x->dev[h].node_index;
                    if (n == hn || s->npairs[n] <= 0)
                        continue;
                    double bytes = fmin(rows, s->npairs[n]) * act;
                    int a0 = n < hn ? n : hn, b0 = n < hn ? hn : n;
                    double tl = x->lat[a0 * x->nn + b0] + bytes / x->bw[a0 * x->nn + b0];
                    res->link_bytes[a0 * x->nn + b0] += 2 * bytes;
                    res->link_s[a0 * x->nn + b0] += 2 * tl;
                }
                if (ts > 0)
                    res->busy[h] += ts;
            }
            step += fmax(te, ts);
        }
        prev = h;
    }
    HOP(prev, a->head, rows * act);
    t = dev_time(&x->dev[a->head], (double)iv->bytes.head, iv->head.flops_per_token * rows);
    step += t;
    if (res)
        res->busy[a->head] += t;
#undef HOP
    return step;
}

/* The objective of a plan: latency = step seconds; throughput = seconds per batch with
 * `micro` micro-batches pipelined (the slowest of: one micro-batch's step, and micro times
 * the busiest device or link per micro-batch). */
double pl_objective(const pl_ctx *x, const pl_assign *a, pl_result *res, pl_layer_sums *s)
{
    if (x->objective == DS_OBJ_LATENCY)
        return pl_eval(x, a, x->batch, x->context, NULL, s);
    double rows = ceil((double)x->batch / x->micro);
    double step = pl_eval(x, a, rows, x->context, res, s);
    double mx = 0;
    for (int d = 0; d < x->nd; d++)
        mx = fmax(mx, res->busy[d]);
    for (int i = 0; i < x->nn * x->nn; i++)
        mx = fmax(mx, res->link_s[i]);
    return fmax(step, x->micro * mx);
}

int pl_result_init(pl_result *r, const pl_ctx *x)
{
    r->busy = calloc(x->nd, sizeof *r->busy);
    r->link_bytes = calloc((size_t)x->nn * x->nn, sizeof *r->link_bytes);
    r->link_s = calloc((size_t)x->nn * x->nn, sizeof *r->link_s);
    return r->busy && r->link_bytes && r->link_s ? 0 : -ENOMEM;
}

void pl_result_release(pl_result *r)
{
    free(r->busy);
    free(r->link_bytes);
    free(r->link_s);
}
