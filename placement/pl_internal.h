/* pl_internal.h — shared between the placement sources; not a public API. */
#ifndef PL_INTERNAL_H
#define PL_INTERNAL_H

#include "ds_placement.h"

#define PL_MAX_COPIES 4 /* copies of one expert (primary + replicas) */

typedef struct pl_ctx {
    const ds_cluster *cl;
    const ds_pl_device *dev; /* [nd] */
    int nd, nn;
    double *lat, *bw;        /* [nn*nn] link latency s, bandwidth bytes/s */
    bool *usable;            /* [nd] not excluded, not a shared-silicon alternative */
    double *cap;             /* [nd] bytes usable after the reserve */
    ds_inventory inv;
    uint32_t L, E;
    double *pop;             /* [L*E] routing share per pick, sums to 1 per layer */
    uint32_t batch, context, micro;
    enum ds_objective objective;
    double reserve;
    bool no_replicas;
    uint32_t exact_max_vars;
    double exact_tl;          /* seconds per MILP */
    int pin_embed, pin_head;  /* device or -1 */
    int *pin_attn;            /* [L] device or -1 */
    int *pin_exp;             /* [L*E] device or -1 */
} pl_ctx;

typedef struct pl_assign {
    int embed, head;
    int *attn;       /* [L] host of attn/dense/shared */
    uint8_t *ncopy;  /* [L*E] copies (0 on dense layers) */
    int *exp;        /* [L*E*PL_MAX_COPIES] devices of the copies */
} pl_assign;

typedef struct pl_layer_sums {
    double *bytes, *flops, *pairs; /* [nd] expected bytes streamed, FLOPs, (row, expert) pairs */
    int *cnt;                      /* [nd] expert copies */
    double *npairs;                /* [nn] pairs per node */
} pl_layer_sums;

typedef struct pl_result {
    double *busy;       /* [nd] seconds per step */
    double *link_bytes; /* [nn*nn] (a<b) bytes per step */
    double *link_s;     /* [nn*nn] seconds per step */
} pl_result;

int pl_ctx_init(pl_ctx *x, const ds_cluster *cl, const ds_model_config *cfg,
                const ds_plan_options *o, ds_error *err);
void pl_ctx_release(pl_ctx *x);
int pl_assign_init(pl_assign *a, const pl_ctx *x);
void pl_assign_release(pl_assign *a);
void pl_assign_copy(pl_assign *dst, const pl_assign *src, const pl_ctx *x);
int pl_layer_sums_init(pl_layer_sums *s, const pl_ctx *x);
void pl_layer_sums_release(pl_layer_sums *s);
void pl_layer_sums_reset(pl_layer_sums *s, const pl_ctx *x);
void pl_layer_sums_add(pl_layer_sums *s, const pl_ctx *x, uint32_t l, uint32_t e, int d,
                       int copies, double rows, int sign);
double pl_path(const pl_ctx *x, const pl_layer_sums *s, int host, int d, double rows);
double pl_layer_max(const pl_ctx *x, const pl_layer_sums *s, int host, double rows, int *arg);
/* The memory model: bytes on the host of layer l's attention (+ KV, router, shared or dense);
 * used[nd] bytes per device of the hosts (embed, head, layer hosts) only, or of every unit. */
double pl_layer_host_bytes(const pl_ctx *x, uint32_t l);
void pl_memory_hosts(const pl_ctx *x, const pl_assign *a, double *used);
void pl_memory(const pl_ctx *x, const pl_assign *a, double *used);
double pl_eval(const pl_ctx *x, const pl_assign *a, double rows, double ctx, pl_result *res,
               pl_layer_sums *s);
double pl_objective(const pl_ctx *x, const pl_assign *a, pl_result *res, pl_layer_sums *s);
int pl_result_init(pl_result *r, const pl_ctx *x);
void pl_result_release(pl_result *r);

/* Runs one strategy; the best assignment in a and its objective seconds in obj. */
int pl_run_strategy(pl_ctx *x, enum ds_strategy s, pl_assign *a, double *obj,
                    bool *not_optimal, char *why, size_t wl);
/* Message saying what memory is short and by how much. */
void pl_shortfall(const pl_ctx *x, char *msg, size_t ml);

#endif
