/* ds_experts.h — MoE execution around the router: grouping routed rows per expert (and per
 * destination), running a set of hosted experts, and the fixed-order combine.
 *
 * The router itself runs in the attention unit (ds_router_select in model/ds_model.h); what
 * comes out of it per row is k (expert id, weight) slots. Dispatch groups the slots by expert so
 * each expert runs once on all its rows; combine adds the results back in slot order:
 *     y = 0; for s in 0..k-1: y = fma(w_s, out_s, y);  y += shared;  hidden += y
 * which is the same for any grouping or host assignment (bit-identity, see ds_model.h). */
#ifndef DS_EXPERTS_H
#define DS_EXPERTS_H

#include <stdint.h>

#include "ds_model.h"

/* Slots [n*k] grouped by expert: the slots of expert e are order[offsets[e] .. offsets[e+1]),
 * each a flat slot index i*k + s (row i, slot s), ascending. */
typedef struct ds_moe_groups {
    uint32_t n_experts;
    uint32_t *offsets; /* [n_experts + 1] */
    uint32_t *order;   /* [n * k] */
} ds_moe_groups;

/* Groups ids[n*k] (each in [0, n_experts)); -ERANGE for an id out of range. Frees with
 * ds_moe_groups_clear. */
int ds_moe_group(uint32_t n, uint32_t k, const int32_t *ids, uint32_t n_experts,
                 ds_moe_groups *out);
void ds_moe_groups_clear(ds_moe_groups *g);

/* Runs every routed expert of layer l for the rows routed to it: out[(i*k + s), D] =
 * expert_{ids[i*k+s]}(ffn_in[i]). Experts are taken from m (unbound ones give -ENOENT). */
int ds_moe_run_experts(const ds_model *m, ds_pool *pool, uint32_t layer, const float *ffn_in,
                       uint32_t n, const int32_t *ids, float *out, ds_error *err);

/* hidden[i] += sum_s weights[i*k+s] * expert_out[(i*k+s)] + shared[i] (shared may be NULL),
 * in the fixed order documented above. */
void ds_moe_combine(uint32_t d, uint32_t n, uint32_t k, const float *weights,
                    const float *expert_out, const float *shared, float *hidden);

#endif
