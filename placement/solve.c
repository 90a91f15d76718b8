/* solve.c — the solver (attention layout candidates + per-layer expert placement by greedy,
 * local search and replicas, or an exact MILP with GLPK) and the three baselines. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <glpk.h>

#include "ds_placement.h"
#include "pl_internal.h"

#define GIB (1024.0 * 1024.0 * 1024.0)

typedef struct pl_work {
    pl_ctx *x;
    pl_layer_sums s;
    double *rem;     /* [nd] bytes still free for experts */
    double *lim;     /* [nd] this layer's expert budget */
    double *lused;   /* [nd] this layer's expert bytes */
    uint32_t *order; /* [E] experts by popularity */
    bool exact;      /* use the MILP for experts */
    bool exact_failed;
    bool exact_not_optimal;
} pl_work;

static double cost_rows(const pl_ctx *x)
{
    return x->objective == DS_OBJ_LATENCY ? x->batch : ceil((double)x->batch / x->micro);
}

/* Seconds one layer's attention takes on device d at the objective's rows. */
static double attn_speed(const pl_ctx *x, int d)
{
    double rows = cost_rows(x);
    const ds_pl_device *v = &x->dev[d];
    double b = (double)x->inv.attn.weight_bytes +
               (double)x->inv.attn.kv_bytes_per_token * rows * x->context;
    double f = (x->inv.attn.flops_per_token + x->inv.attn.attn_flops_per_ctx * x->context) * rows;
    return fmax(b / v->mem_bw, f / v->flops) + v->launch_s;
}

/* ---- per-layer expert placement: greedy + local search ----------------------------------- */

static int cmp_pop_l; /* set before qsort (single-threaded, deterministic) */
static const pl_ctx *cmp_x;
static int cmp_order(const void *pa, const void *pb)
{
    uint32_t a = *(const uint32_t *)pa, b = *(const uint32_t *)pb;
    double va = cmp_x->pop[(size_t)cmp_pop_l * cmp_x->E + a];
    double vb = cmp_x->pop[(size_t)cmp_pop_l * cmp_x->E + b];
    if (va != vb)
        return va > vb ? -1 : 1;
    return a < b ? -1 : a > b;
}

/* Max path over the devices of d's node after the sums changed on d. */
static double node_key(const pl_ctx *x, const pl_layer_sums *s, int host, int d, double rows)
{
    double m = 0;
    for (int k = 0; k < x->nd; k++)
        if (x->dev[k].node_index == x->dev[d].node_index && s->cnt[k])
            m = fmax(m, pl_path(x, s, host, k, rows));
    return m;
}

static void greedy_layer(pl_work *w, pl_assign *a, uint32_t l, int host, double rows)
{
    pl_ctx *x = w->x;
    double eb = (double)x->inv.bytes.expert[l];
    size_t base = (size_t)l * x->E;
    for (uint32_t i = 0; i < x->E; i++) {
        uint32_t e = w->order[i];
        int pin = x->pin_exp[base + e];
        int best = -1;
        if (pin >= 0)
            best = pin;
        else {
            double bk = INFINITY;
            for (int pass = 0; pass < 2 && best < 0; pass++)
                for (int d = 0; d < x->nd; d++) {
                    if (!x->usable[d])
                        continue;
                    double room = pass == 0 ? w->lim[d] : w->rem[d];
                    if (w->lused[d] + eb > room + 0.5)
                        continue;
                    pl_layer_sums_add(&w->s, x, l, e, d, 1, rows, +1);
                    double k = node_key(x, &w->s, host, d, rows);
                    pl_layer_sums_add(&w->s, x, l, e, d, 1, rows, -1);
                    if (k < bk) {
                        bk = k;
                        best = d;
                    }
                }
        }
        if (best < 0) {
            a->ncopy[base + e] = 0;
            continue;
        }
        a->ncopy[base + e] = 1;
        a->exp[(base + e) * PL_MAX_COPIES] = best;
        w->lused[best] += eb;
        pl_layer_sums_add(&w->s, x, l, e, best, 1, rows, +1);
    }
}

/* Moves and swaps of single experts off the bottleneck device while the layer gets faster. */
static void local_search(pl_work *w, pl_assign *a, uint32_t l, int host, double rows)
{
    pl_ctx *x = w->x;
    double eb = (double)x->inv.bytes.expert[l];
    size_t base = (size_t)l * x->E;
    bool swaps = (size_t)x->E * x->nd <= 4096;
    for (uint32_t it = 0; it < 8 * x->E + 64; it++) {
        int b;
        double cur = pl_layer_max(x, &w->s, host, rows, &b);
        if (b < 0)
            return;
        double best = cur * (1 - 1e-9);
        int be = -1, bd = -1, bf = -1;
        for (uint32_t e = 0; e < x->E; e++) {
            if (a->exp[(base + e) * PL_MAX_COPIES] != b || x->pin_exp[base + e] >= 0)
                continue;
            pl_layer_sums_add(&w->s, x, l, e, b, 1, rows, -1);
            for (int d = 0; d < x->nd; d++) {
                if (d == b || !x->usable[d])
                    continue;
                if (w->lused[d] + eb <= w->lim[d] + 0.5) {
                    pl_layer_sums_add(&w->s, x, l, e, d, 1, rows, +1);
                    double m = pl_layer_max(x, &w->s, host, rows, NULL);
                    pl_layer_sums_add(&w->s, x, l, e, d, 1, rows, -1);
                    if (m < best) {
                        best = m;
                        be = (int)e;
                        bd = d;
                        bf = -1;
                    }
                }
                if (!swaps)
                    continue;
                for (uint32_t f = 0; f < x->E; f++) {
                    if (a->exp[(base + f) * PL_MAX_COPIES] != d || x->pin_exp[base + f] >= 0)
                        continue;
                    pl_layer_sums_add(&w->s, x, l, f, d, 1, rows, -1);
                    pl_layer_sums_add(&w->s, x, l, e, d, 1, rows, +1);
                    pl_layer_sums_add(&w->s, x, l, f, b, 1, rows, +1);
                    double m = pl_layer_max(x, &w->s, host, rows, NULL);
                    pl_layer_sums_add(&w->s, x, l, f, b, 1, rows, -1);
                    pl_layer_sums_add(&w->s, x, l, e, d, 1, rows, -1);
                    pl_layer_sums_add(&w->s, x, l, f, d, 1, rows, +1);
                    if (m < best) {
                        best = m;
                        be = (int)e;
                        bd = d;
                        bf = (int)f;
                    }
                }
            }
            pl_layer_sums_add(&w->s, x, l, e, b, 1, rows, +1);
        }
        if (be < 0)
            return;
        pl_layer_sums_add(&w->s, x, l, (uint32_t)be, b, 1, rows, -1);
        pl_layer_sums_add(&w->s, x, l, (uint32_t)be, bd, 1, rows, +1);
        a->exp[(base + (uint32_t)be) * PL_MAX_COPIES] = bd;
        if (bf >= 0) {
            pl_layer_sums_add(&w->s, x, l, (uint32_t)bf, bd, 1, rows, -1);
            pl_layer_sums_add(&w->s, x, l, (uint32_t)bf, b, 1, rows, +1);
            a->exp[(base + (uint32_t)bf) * PL_MAX_COPIES] = b;
        } else {
            w->lused[b] -= eb;
            w->lused[bd] += eb;
        }
    }
}

/* Copies of hot experts of the bottleneck device onto others while memory allows and the
 * layer gets faster. */
static void add_replicas(pl_work *w, pl_assign *a, uint32_t l, int host, double rows)
{
    pl_ctx *x = w->x;
    double eb = (double)x->inv.bytes.expert[l];
    size_t base = (size_t)l * x->E;
    for (uint32_t it = 0; it < x->E; it++) {
        int b;
        double cur = pl_layer_max(x, &w->s, host, rows, &b);
        if (b < 0)
            return;
        /* the hottest expert with a copy on b */
        int he = -1;
        for (uint32_t i = 0; i < x->E && he < 0; i++) {
            uint32_t e = w->order[i];
            if (a->ncopy[base + e] >= PL_MAX_COPIES || a->ncopy[base + e] == 0)
                continue;
            for (int c = 0; c < a->ncopy[base + e]; c++)
                if (a->exp[(base + e) * PL_MAX_COPIES + c] == b)
                    he = (int)e;
        }
        if (he < 0)
            return;
        size_t i = base + (uint32_t)he;
        int n = a->ncopy[i];
        int *cp = &a->exp[i * PL_MAX_COPIES];
        double best = cur * (1 - 1e-6);
        int bd = -1;
        for (int c = 0; c < n; c++)
            pl_layer_sums_add(&w->s, x, l, (uint32_t)he, cp[c], n, rows, -1);
        for (int d = 0; d < x->nd; d++) {
            bool has = false;
            for (int c = 0; c < n; c++)
                has |= cp[c] == d;
            if (has || !x->usable[d] || w->lused[d] + eb > w->lim[d] + 0.5)
                continue;
            for (int c = 0; c < n; c++)
                pl_layer_sums_add(&w->s, x, l, (uint32_t)he, cp[c], n + 1, rows, +1);
            pl_layer_sums_add(&w->s, x, l, (uint32_t)he, d, n + 1, rows, +1);
            double m = pl_layer_max(x, &w->s, host, rows, NULL);
            pl_layer_sums_add(&w->s, x, l, (uint32_t)he, d, n + 1, rows, -1);
            for (int c = 0; c < n; c++)
                pl_layer_sums_add(&w->s, x, l, (uint32_t)he, cp[c], n + 1, rows, -1);
            if (m < best) {
                best = m;
                bd = d;
            }
        }
        if (bd < 0) {
            for (int c = 0; c < n; c++)
                pl_layer_sums_add(&w->s, x, l, (uint32_t)he, cp[c], n, rows, +1);
            return;
        }
        cp[n] = bd;
        a->ncopy[i] = (uint8_t)(n + 1);
        w->lused[bd] += eb;
        for (int c = 0; c <= n; c++)
            pl_layer_sums_add(&w->s, x, l, (uint32_t)he, cp[c], n + 1, rows, +1);
    }
}

/* ---- exact MILP for one layer's experts ---------------------------------------------------- */

static int milp_layer(pl_work *w, pl_assign *a, uint32_t l, int host, double rows)
{
    pl_ctx *x = w->x;
    const ds_inventory *iv = &x->inv;
    double eb = (double)iv->bytes.expert[l];
    double act = (double)iv->expert.act_bytes_per_token;
    double picks = rows * iv->top_k, M = picks + rows;
    size_t base = (size_t)l * x->E;
    int nd = x->nd, nn = x->nn, hn = x->dev[host].node_index;
    glp_prob *P = glp_create_prob();
    glp_set_obj_dir(P, GLP_MIN);
    /* columns: x[e][d] (E*nd), u[d], c[d], y[n], r[n], wn[n], rd[d], wd[d], t */
    int cx = 1, cu = cx + (int)x->E * nd, cc = cu + nd, cy = cc + nd, cr = cy + nn, cw = cr + nn,
        crd = cw + nn, cwd = crd + nd, ct = cwd + nd;
    glp_add_cols(P, ct);
    for (int j = 1; j <= ct; j++)
        glp_set_col_bnds(P, j, GLP_LO, 0, 0);
    for (uint32_t e = 0; e < x->E; e++)
        for (int d = 0; d < nd; d++) {
            int j = cx + (int)e * nd + d;
            glp_set_col_kind(P, j, GLP_BV);
            int pin = x->pin_exp[base + e];
            if (!x->usable[d] || (pin >= 0 && pin != d))
                glp_set_col_bnds(P, j, GLP_FX, 0, 0);
            else if (pin == d)
                glp_set_col_bnds(P, j, GLP_FX, 1, 1);
        }
    for (int d = 0; d < nd; d++) {
        glp_set_col_kind(P, cu + d, GLP_BV);
        glp_set_col_kind(P, cwd + d, GLP_BV);
    }
    for (int n = 0; n < nn; n++) {
        glp_set_col_kind(P, cy + n, GLP_BV);
        glp_set_col_kind(P, cw + n, GLP_BV);
    }
    double ts = iv->bytes.shared[l] ? fmax((double)iv->bytes.shared[l] / x->dev[host].mem_bw,
                                           iv->shared.flops_per_token * rows / x->dev[host].flops) +
                                          x->dev[host].launch_s
                                    : 0;
    glp_set_col_bnds(P, ct, GLP_LO, 0, 0);
    glp_set_obj_coef(P, ct, 1.0);
    int cap = 8 + 2 * nd + (int)x->E * nd;
    int *ia = malloc((size_t)(cap + 1) * sizeof *ia);
    double *ar = malloc((size_t)(cap + 1) * sizeof *ar);
    if (!ia || !ar) {
        free(ia);
        free(ar);
        glp_delete_prob(P);
        return -ENOMEM;
    }
    int k;
#define ROW(type, lo, hi)                                                                          \
    do {                                                                                           \
        int r_ = glp_add_rows(P, 1);                                                               \
        glp_set_row_bnds(P, r_, type, lo, hi);                                                     \
        glp_set_mat_row(P, r_, k, ia, ar);                                                         \
    } while (0)
    for (uint32_t e = 0; e < x->E; e++) { /* each expert once */
        k = 0;
        for (int d = 0; d < nd; d++) {
            ++k;
            ia[k] = cx + (int)e * nd + d;
            ar[k] = 1;
        }
        ROW(GLP_FX, 1, 1);
    }
    for (int d = 0; d < nd; d++) {
        double p_ = 0;
        /* memory, used flag */
        k = 0;
        for (uint32_t e = 0; e < x->E; e++) {
            ++k;
            ia[k] = cx + (int)e * nd + d;
            ar[k] = eb;
        }
        ROW(GLP_UP, 0, w->lim[d]);
        k = 0;
        for (uint32_t e = 0; e < x->E; e++) {
            ++k;
            ia[k] = cx + (int)e * nd + d;
            ar[k] = 1;
        }
        ++k;
        ia[k] = cu + d;
        ar[k] = -(double)x->E;
        ROW(GLP_UP, 0, 0);
        /* c_d >= bytes/bw + launch u_d ; c_d >= flops/F + launch u_d */
        for (int pass = 0; pass < 2; pass++) {
            k = 0;
            ++k;
            ia[k] = cc + d;
            ar[k] = 1;
            ++k;
            ia[k] = cu + d;
            ar[k] = -x->dev[d].launch_s;
            for (uint32_t e = 0; e < x->E; e++) {
                double p = x->pop[base + e];
                ++k;
                ia[k] = cx + (int)e * nd + d;
                ar[k] = pass == 0
                            ? -(1 - exp(picks * log1p(-fmin(p, 1 - 1e-15)))) * eb / x->dev[d].mem_bw
                            : -picks * p * iv->expert.flops_per_token / x->dev[d].flops;
            }
            ROW(GLP_LO, 0, 0);
        }
        (void)p_;
        /* path: t >= c_d + transfer */
        int dn = x->dev[d].node_index;
        k = 0;
        ++k;
        ia[k] = ct;
        ar[k] = 1;
        ++k;
        ia[k] = cc + d;
        ar[k] = -1;
        if (dn != hn) {
            ++k;
            ia[k] = cy + dn;
            ar[k] = -2 * x->lat[hn * nn + dn];
            ++k;
            ia[k] = cr + dn;
            ar[k] = -2 * act / x->bw[hn * nn + dn];
        } else if (d != host) {
            double hl = 0;
            if (x->dev[d].host_link_bw > 0)
                hl = x->dev[d].host_link_bw;
            if (x->dev[host].host_link_bw > 0 && (hl == 0 || x->dev[host].host_link_bw < hl))
                hl = x->dev[host].host_link_bw;
            if (hl > 0) {
                ++k;
                ia[k] = crd + d;
                ar[k] = -2 * act / hl;
            }
        }
        if (d == host && ts > 0) {
            /* the host also runs the shared experts: t >= c_h + ts */
            ROW(GLP_LO, ts, 0);
        } else
            ROW(GLP_LO, 0, 0);
        /* rd_d >= min(rows, pairs_d): rd >= pairs - M wd ; rd >= rows - M (1 - wd) */
        k = 0;
        ++k;
        ia[k] = crd + d;
        ar[k] = 1;
        ++k;
        ia[k] = cwd + d;
        ar[k] = M;
        for (uint32_t e = 0; e < x->E; e++) {
            ++k;
            ia[k] = cx + (int)e * nd + d;
            ar[k] = -picks * x->pop[base + e];
        }
        ROW(GLP_LO, 0, 0);
        k = 0;
        ++k;
        ia[k] = crd + d;
        ar[k] = 1;
        ++k;
        ia[k] = cwd + d;
        ar[k] = -M;
        ROW(GLP_LO, rows - M, 0);
    }
    for (int n = 0; n < nn; n++) {
        if (n == hn)
            continue;
        /* y_n used flag; r_n >= min(rows, pairs on n) */
        k = 0;
        for (int d = 0; d < nd; d++) {
            if (x->dev[d].node_index != n)
                continue;
            for (uint32_t e = 0; e < x->E; e++) {
                ++k;
                ia[k] = cx + (int)e * nd + d;
                ar[k] = 1;
            }
        }
        if (k == 0)
            continue;
        int kk = k;
        ++k;
        ia[k] = cy + n;
        ar[k] = -(double)x->E;
        ROW(GLP_UP, 0, 0);
        k = 0;
        for (int d = 0; d < nd; d++) {
            if (x->dev[d].node_index != n)
                continue;
            for (uint32_t e = 0; e < x->E; e++) {
                ++k;
                ia[k] = cx + (int)e * nd + d;
                ar[k] = -picks * x->pop[base + e];
            }
        }
        (void)kk;
        ++k;
        ia[k] = cr + n;
        ar[k] = 1;
        ++k;
        ia[k] = cw + n;
        ar[k] = M;
        ROW(GLP_LO, 0, 0);
        k = 0;
        ++k;
        ia[k] = cr + n;
        ar[k] = 1;
        ++k;
        ia[k] = cw + n;
        ar[k] = -M;
        ROW(GLP_LO, rows - M, 0);
    }
#undef ROW
    free(ia);
    free(ar);
    glp_iocp parm;
    glp_init_iocp(&parm);
    parm.presolve = GLP_ON;
    parm.msg_lev = GLP_MSG_OFF;
    parm.tm_lim = (int)(x->exact_tl * 1000);
    parm.mip_gap = 1e-6;
    int rc = glp_intopt(P, &parm);
    int st = glp_mip_status(P);
    if (rc != 0 && rc != GLP_ETMLIM && rc != GLP_EMIPGAP) {
        glp_delete_prob(P);
        return -ENOSPC;
    }
    if (st != GLP_OPT && st != GLP_FEAS) {
        glp_delete_prob(P);
        return -ENOSPC;
    }
    if (st != GLP_OPT)
        w->exact_not_optimal = true;
    for (uint32_t e = 0; e < x->E; e++) {
        int dd = -1;
        for (int d = 0; d < nd && dd < 0; d++)
            if (glp_mip_col_val(P, cx + (int)e * nd + d) > 0.5)
                dd = d;
        if (dd < 0) {
            glp_delete_prob(P);
            return -ENOSPC;
        }
        a->ncopy[base + e] = 1;
        a->exp[(base + e) * PL_MAX_COPIES] = dd;
        w->lused[dd] += eb;
        pl_layer_sums_add(&w->s, x, l, e, dd, 1, rows, +1);
    }
    glp_delete_prob(P);
    return 0;
}

/* Places the experts of every MoE layer for a fixed attention layout (a->attn set). */
static int place_experts(pl_work *w, pl_assign *a)
{
    pl_ctx *x = w->x;
    double rows = cost_rows(x);
    double used[DS_PL_MAX_DEVICES];
    /* free memory after the non-expert units */
    pl_memory_hosts(x, a, used);
    uint32_t n_moe = 0;
    for (uint32_t l = 0; l < x->L; l++)
        n_moe += x->inv.is_moe[l];
    for (int d = 0; d < x->nd; d++) {
        w->rem[d] = x->usable[d] ? x->cap[d] - used[d] : 0;
        if (w->rem[d] < 0 && (used[d] > 0))
            return -ENOSPC;
    }
    uint32_t left = n_moe;
    int prev_l = -1;
    for (uint32_t l = 0; l < x->L; l++) {
        if (!x->inv.is_moe[l])
            continue;
        size_t base = (size_t)l * x->E;
        double eb = (double)x->inv.bytes.expert[l];
        bool pinned = false;
        for (uint32_t e = 0; e < x->E; e++)
            pinned |= x->pin_exp[base + e] >= 0;
        /* Same problem as the previous MoE layer: reuse its answer if it still fits. */
        if (prev_l >= 0 && !pinned && a->attn[l] == a->attn[prev_l] &&
            !memcmp(&x->pop[base], &x->pop[(size_t)prev_l * x->E], x->E * sizeof *x->pop)) {
            bool fits = true;
            for (int d = 0; d < x->nd; d++)
                fits &= w->lused[d] <= w->rem[d] + 0.5;
            if (fits) {
                memcpy(&a->ncopy[base], &a->ncopy[(size_t)prev_l * x->E], x->E);
                memcpy(&a->exp[base * PL_MAX_COPIES],
                       &a->exp[(size_t)prev_l * x->E * PL_MAX_COPIES],
                       x->E * PL_MAX_COPIES * sizeof *a->exp);
                for (int d = 0; d < x->nd; d++)
                    w->rem[d] -= w->lused[d];
                left--;
                continue;
            }
        }
        for (int d = 0; d < x->nd; d++) {
            w->lused[d] = 0;
            /* A fair share of what is left keeps later layers placeable; at least one expert
             * fits where any memory is left. */
            w->lim[d] = fmax(0, w->rem[d] / left);
            if (w->lim[d] < eb && w->rem[d] >= eb)
                w->lim[d] = eb;
        }
        cmp_x = x;
        cmp_pop_l = (int)l;
        for (uint32_t e = 0; e < x->E; e++)
            w->order[e] = e;
        qsort(w->order, x->E, sizeof *w->order, cmp_order);
        pl_layer_sums_reset(&w->s, x);
        int host = a->attn[l];
        int rc = -1;
        if (w->exact) {
            rc = milp_layer(w, a, l, host, rows);
            if (rc) {
                w->exact_failed = true;
                return rc;
            }
        } else {
            greedy_layer(w, a, l, host, rows);
            for (uint32_t e = 0; e < x->E; e++)
                if (!a->ncopy[base + e])
                    return -ENOSPC;
            for (int d = 0; d < x->nd; d++)
                w->lim[d] = fmax(w->lim[d], w->lused[d]);
            local_search(w, a, l, host, rows);
        }
        if (!x->no_replicas)
            add_replicas(w, a, l, host, rows);
        for (int d = 0; d < x->nd; d++)
            w->rem[d] -= w->lused[d];
        left--;
        prev_l = (int)l;
    }
    return 0;
}

/* ---- attention layouts ---------------------------------------------------------------------- */

static int cmp_speed_x_dummy;
static const pl_ctx *spd_x;
static int cmp_speed(const void *pa, const void *pb)
{
    int a = *(const int *)pa, b = *(const int *)pb;
    double va = attn_speed(spd_x, a), vb = attn_speed(spd_x, b);
    if (va != vb)
        return va < vb ? -1 : 1;
    return a - b;
}

static void apply_host_pins(const pl_ctx *x, pl_assign *a)
{
    if (x->pin_embed >= 0)
        a->embed = x->pin_embed;
    if (x->pin_head >= 0)
        a->head = x->pin_head;
    for (uint32_t l = 0; l < x->L; l++)
        if (x->pin_attn[l] >= 0)
            a->attn[l] = x->pin_attn[l];
}

/* Candidate c: 0..2 = everything on the c-th fastest device that fits; 3 = contiguous chain
 * over devices by speed. Returns -ENOENT when the candidate does not exist. */
static int attn_layout(const pl_ctx *x, int c, pl_assign *a)
{
    int ids[DS_PL_MAX_DEVICES], n = 0;
    for (int d = 0; d < x->nd; d++)
        if (x->usable[d])
            ids[n++] = d;
    spd_x = x;
    (void)cmp_speed_x_dummy;
    qsort(ids, (size_t)n, sizeof *ids, cmp_speed);
    double total = (double)(x->inv.bytes.embed + x->inv.bytes.head);
    for (uint32_t l = 0; l < x->L; l++)
        total += pl_layer_host_bytes(x, l);
    if (c < 3) {
        int seen = 0;
        for (int i = 0; i < n; i++) {
            if (x->cap[ids[i]] < total)
                continue;
            if (seen++ == c) {
                a->embed = a->head = ids[i];
                for (uint32_t l = 0; l < x->L; l++)
                    a->attn[l] = ids[i];
                apply_host_pins(x, a);
                return 0;
            }
        }
        return -ENOENT;
    }
    int i = 0;
    double used = (double)x->inv.bytes.embed;
    a->embed = ids[0];
    for (uint32_t l = 0; l < x->L; l++) {
        double b = pl_layer_host_bytes(x, l);
        while (i < n && used + b > x->cap[ids[i]] * 0.5) {
            i++;
            used = 0;
        }
        if (i >= n)
            return -ENOENT;
        a->attn[l] = ids[i];
        used += b;
    }
    a->head = a->attn[x->L - 1];
    apply_host_pins(x, a);
    return 0;
}

/* ---- baselines ------------------------------------------------------------------------------ */

static void apply_expert_pins(const pl_ctx *x, pl_assign *a)
{
    for (size_t i = 0; i < (size_t)x->L * x->E; i++)
        if (x->pin_exp[i] >= 0) {
            a->ncopy[i] = 1;
            a->exp[i * PL_MAX_COPIES] = x->pin_exp[i];
        }
}

static int fits(const pl_ctx *x, const pl_assign *a, char *why, size_t wl)
{
    double used[DS_PL_MAX_DEVICES];
    pl_memory(x, a, used);
    for (int d = 0; d < x->nd; d++)
        if (used[d] > x->cap[d] + 0.5 || (used[d] > 0 && !x->usable[d])) {
            snprintf(why, wl, "%s/%s needs %.2f GiB, has %.2f GiB usable (short by %.2f GiB)",
                     x->dev[d].node, x->dev[d].name, used[d] / GIB, x->cap[d] / GIB,
                     (used[d] - x->cap[d]) / GIB);
            return -ENOSPC;
        }
    return 0;
}

static int baseline(const pl_ctx *x, enum ds_strategy s, pl_assign *a, char *why, size_t wl)
{
    int ids[DS_PL_MAX_DEVICES], n = 0;
    for (int d = 0; d < x->nd; d++)
        if (x->usable[d])
            ids[n++] = d;
    memset(a->ncopy, 0, (size_t)x->L * x->E);
    if (s == DS_STRAT_MEM_PROPORTIONAL) {
        double capsum = 0, tot = (double)x->inv.bytes.embed;
        for (int i = 0; i < n; i++)
            capsum += x->cap[ids[i]];
        double lb[4096];
        for (uint32_t l = 0; l < x->L; l++) {
            lb[l] = pl_layer_host_bytes(x, l) +
                    (x->inv.is_moe[l] ? (double)x->E * (double)x->inv.bytes.expert[l] : 0);
            tot += lb[l];
        }
        tot += (double)x->inv.bytes.head;
        double cum = (double)x->inv.bytes.embed, bound = 0;
        int i = 0;
        bound = x->cap[ids[0]] / capsum * tot;
        for (uint32_t l = 0; l < x->L; l++) {
            while (i < n - 1 && cum + lb[l] / 2 > bound) {
                i++;
                bound += x->cap[ids[i]] / capsum * tot;
            }
            a->attn[l] = ids[i];
            cum += lb[l];
            if (x->inv.is_moe[l])
                for (uint32_t e = 0; e < x->E; e++) {
                    a->ncopy[(size_t)l * x->E + e] = 1;
                    a->exp[((size_t)l * x->E + e) * PL_MAX_COPIES] = ids[i];
                }
        }
        a->embed = a->attn[0];
        a->head = a->attn[x->L - 1];
    } else {
        int host = -1;
        if (s == DS_STRAT_EXPERTS_ON_CPU) {
            for (int i = 0; i < n; i++)
                if (strcmp(x->dev[ids[i]].kind, "cpu") &&
                    (host < 0 || x->dev[ids[i]].mem_bw > x->dev[host].mem_bw))
                    host = ids[i];
            if (host < 0) {
                snprintf(why, wl, "no usable GPU or accelerator");
                return -ENOENT;
            }
            a->embed = a->head = host;
            for (uint32_t l = 0; l < x->L; l++)
                a->attn[l] = host;
            int m = 0;
            for (int i = 0; i < n; i++)
                if (!strcmp(x->dev[ids[i]].kind, "cpu"))
                    ids[m++] = ids[i];
            if (!m) {
                snprintf(why, wl, "no usable CPU device");
                return -ENOENT;
            }
            n = m;
        } else if (attn_layout(x, 0, a) && attn_layout(x, 3, a)) {
            snprintf(why, wl, "attention does not fit on the devices");
            return -ENOSPC;
        }
        double rem[DS_PL_MAX_DEVICES], used[DS_PL_MAX_DEVICES];
        apply_host_pins(x, a);
        pl_memory_hosts(x, a, used);
        for (int d = 0; d < x->nd; d++)
            rem[d] = x->cap[d] - used[d];
        int rr = 0;
        for (uint32_t l = 0; l < x->L; l++) {
            if (!x->inv.is_moe[l])
                continue;
            double eb = (double)x->inv.bytes.expert[l];
            for (uint32_t e = 0; e < x->E; e++) {
                int tries = 0;
                while (tries < n && rem[ids[rr % n]] < eb && s == DS_STRAT_BALANCED_EXPERTS) {
                    rr++;
                    tries++;
                }
                int d = ids[rr % n];
                rr++;
                rem[d] -= eb;
                a->ncopy[(size_t)l * x->E + e] = 1;
                a->exp[((size_t)l * x->E + e) * PL_MAX_COPIES] = d;
            }
        }
    }
    apply_host_pins(x, a);
    apply_expert_pins(x, a);
    return fits(x, a, why, wl);
}

/* ---- the solver ------------------------------------------------------------------------------ */

/* Runs the heuristic (exact = false) or the MILP over the attention candidates; best in a. */
static int solver(pl_ctx *x, bool exact, pl_assign *a, double *obj, bool *not_optimal, char *why,
                  size_t wl)
{
    pl_work w = {.x = x, .exact = exact};
    pl_assign t;
    pl_result r;
    int rc = pl_layer_sums_init(&w.s, x);
    w.rem = calloc(x->nd, sizeof *w.rem);
    w.lim = calloc(x->nd, sizeof *w.lim);
    w.lused = calloc(x->nd, sizeof *w.lused);
    w.order = calloc(x->E ? x->E : 1, sizeof *w.order);
    int rc2 = pl_assign_init(&t, x), rc3 = pl_result_init(&r, x);
    *obj = INFINITY;
    int result = -ENOSPC;
    snprintf(why, wl, "no attention layout leaves room for the experts");
    if (rc || rc2 || rc3 || !w.rem || !w.lim || !w.lused || !w.order) {
        result = -ENOMEM;
        snprintf(why, wl, "out of memory");
        goto out;
    }
    for (int c = 0; c < 4; c++) {
        memset(t.ncopy, 0, (size_t)x->L * x->E);
        if (attn_layout(x, c, &t))
            continue;
        if (x->E && (size_t)x->E * x->nd > x->exact_max_vars && exact) {
            result = -E2BIG;
            snprintf(why, wl,
                     "instance too large for the exact MILP (%u experts x %d devices "
                     "> %u)",
                     x->E, x->nd, x->exact_max_vars);
            break;
        }
        for (int d = 0; d < x->nd; d++)
            w.lused[d] = 0;
        if (place_experts(&w, &t))
            continue;
        char tmp[256];
        if (fits(x, &t, tmp, sizeof tmp))
            continue;
        double o = pl_objective(x, &t, &r, &w.s);
        if (o < *obj) {
            *obj = o;
            pl_assign_copy(a, &t, x);
            result = 0;
        }
    }
    *not_optimal = w.exact_not_optimal;
out:
    pl_layer_sums_release(&w.s);
    free(w.rem);
    free(w.lim);
    free(w.lused);
    free(w.order);
    pl_assign_release(&t);
    pl_result_release(&r);
    return result;
}

int pl_run_strategy(pl_ctx *x, enum ds_strategy s, pl_assign *a, double *obj, bool *not_optimal,
                    char *why, size_t wl)
{
    *not_optimal = false;
    if (s == DS_STRAT_HEURISTIC || s == DS_STRAT_AUTO)
        return solver(x, false, a, obj, not_optimal, why, wl);
    if (s == DS_STRAT_EXACT)
        return solver(x, true, a, obj, not_optimal, why, wl);
    int rc = baseline(x, s, a, why, wl);
    if (rc)
        return rc;
    pl_layer_sums sm;
    pl_result r;
    if (pl_layer_sums_init(&sm, x) || pl_result_init(&r, x)) {
        pl_layer_sums_release(&sm);
        pl_result_release(&r);
        return -ENOMEM;
    }
    *obj = pl_objective(x, a, &r, &sm);
    pl_layer_sums_release(&sm);
    pl_result_release(&r);
    return 0;
}

/* A clear message when the model cannot fit at all: what is short and by how much. */
void pl_shortfall(const pl_ctx *x, char *msg, size_t ml)
{
    double w = (double)ds_inventory_total_bytes(&x->inv);
    double kv = 0;
    for (uint32_t l = 0; l < x->L; l++)
        kv += (double)x->inv.attn.kv_bytes_per_token * x->batch * (double)x->context;
    double cap = 0, biggest = 0;
    for (int d = 0; d < x->nd; d++)
        if (x->usable[d]) {
            cap += x->cap[d];
            biggest = fmax(biggest, x->cap[d]);
        }
    if (w + kv > cap)
        snprintf(msg, ml,
                 "model does not fit: needs %.2f GiB (weights %.2f GiB + KV cache %.2f "
                 "GiB for batch %u x context %u) but the usable devices offer %.2f GiB after "
                 "the %.0f%% reserve: short by %.2f GiB",
                 (w + kv) / GIB, w / GIB, kv / GIB, x->batch, x->context, cap / GIB,
                 x->reserve * 100, (w + kv - cap) / GIB);
    else
        snprintf(msg, ml,
                 "model does not pack: needs %.2f GiB of %.2f GiB usable, but a "
                 "layer's attention + KV cache (%.2f GiB) or the embeddings (%.2f GiB) do not "
                 "fit beside the experts on any device (largest device %.2f GiB usable)",
                 (w + kv) / GIB, cap / GIB, pl_layer_host_bytes(x, 0) / GIB,
                 (double)x->inv.bytes.embed / GIB, biggest / GIB);
}

void ds_placement_thread_done(void)
{
    glp_free_env();
}
