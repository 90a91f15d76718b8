/* ds_layer.h — the layer step, written once: what one decoder layer does to a batch of rows,
 * and the sequence table whose KV caches it reads and writes.
 *
 * A layer step over n rows (each a sequence at a position) is: attention over each row's KV
 * cache of that layer with the router (ds_unit_attn), then either the dense FFN added to the
 * rows (a dense layer), or the shared experts beside the routed experts, whose unweighted
 * outputs are combined in the router's slot order (ds_moe_combine). The routed experts run
 * through an expert runner: a table of one function and a context, synchronous (the CPU
 * experts of the model, an accelerator's copies) or asynchronous (the daemon's dispatch to
 * the nodes hosting the experts: the step is then pending, and resumes once the owner has
 * written the expert rows in). The single-process engine (ds_engine.h) and the daemon's data
 * plane (daemon/dsd_data.c) both run their layers with it, so their tokens cannot drift
 * apart: every op, and the floating-point order of the combine, is the same code.
 *
 * The sequence table maps a sequence id to one KV cache per layer it hosts, and to nothing
 * for the other layers: a node hosting attn[l] alone holds the KV of layer l alone. */
#ifndef DS_LAYER_H
#define DS_LAYER_H

#include <stdbool.h>
#include <stdint.h>

#include "ds_model.h"

/* ---- sequence table ----------------------------------------------------------------------- */

typedef struct ds_seqs ds_seqs;

/* A table of at most max_seqs sequences of max_positions positions each, with KV caches for
 * the layers hosted[l] (hosted NULL: every layer of c). c is borrowed (it must outlive the
 * table). */
int ds_seqs_new(const ds_model_config *c, const bool *hosted, uint32_t max_seqs,
                uint32_t max_positions, ds_seqs **ret);
ds_seqs *ds_seqs_free(ds_seqs *t);
/* The slot of sequence id (>= 0); create: add it (empty caches) when absent. -ENOENT absent,
 * -ENOSPC table full, -ENOMEM. Slots stay valid until the sequence is removed. */
int ds_seqs_find(ds_seqs *t, uint64_t id, bool create);
/* Removes sequence id (its caches freed); unknown ids are ignored. */
void ds_seqs_remove(ds_seqs *t, uint64_t id);
/* Removes the sequence in slot (the engine's handle); a free slot is ignored. */
void ds_seqs_remove_slot(ds_seqs *t, int slot);
bool ds_seqs_slot_used(const ds_seqs *t, int slot);
/* The KV cache of slot's sequence for layer, or NULL when the layer is not hosted. */
ds_kv_cache *ds_seqs_kv(const ds_seqs *t, int slot, uint32_t layer);
/* Positions stored for layer (0 for a layer not hosted or a free slot). */
uint32_t ds_seqs_len(const ds_seqs *t, int slot, uint32_t layer);
/* KV caches each sequence holds: the hosted layers. */
uint32_t ds_seqs_layers(const ds_seqs *t);
uint32_t ds_seqs_count(const ds_seqs *t);

/* ---- expert runners ----------------------------------------------------------------------- */

#define DS_LAYER_DONE    0
#define DS_LAYER_PENDING 1

/* Runs the routed experts of one MoE layer for n rows: out[(i*k + s), D] =
 * expert_{ids[i*k+s]}(ffn_in[i]), unweighted (weights[n*k] are given for runners that send
 * them on). Returns DS_LAYER_DONE with out filled, DS_LAYER_PENDING when out will be filled
 * later (the owner then calls ds_layer_step_resume), or a negative errno with err set. A
 * runner must be bit-identical to ds_moe_run_experts for tokens to stay exact. */
typedef struct ds_expert_runner_ops {
    int (*run)(void *ctx, uint32_t layer, const float *ffn_in, uint32_t n, const int32_t *ids,
               const float *weights, float *out, ds_error *err);
} ds_expert_runner_ops;

/* The CPU experts of a model: ctx is a ds_expert_runner_cpu (ds_moe_run_experts). */
typedef struct ds_expert_runner_cpu {
    const ds_model *m;
    ds_pool *pool;
} ds_expert_runner_cpu;
extern const ds_expert_runner_ops ds_expert_runner_cpu_ops;

/* ---- unit runners ------------------------------------------------------------------------- */

/* Where the units other than the routed experts run: by default the model's CPU units
 * (ds_unit_attn, ds_unit_dense / ds_unit_shared, ds_unit_embed, ds_unit_head); a device runner
 * (experts/ds_backend_units.h) puts them on an accelerator, per layer. Each function has the
 * contract of the CPU unit it replaces and must be bit-identical to it for tokens to stay
 * exact. A NULL function means the CPU unit. ffn: kind is DS_UNIT_DENSE or DS_UNIT_SHARED. */
typedef struct ds_unit_runner_ops {
    int (*attn)(void *ctx, uint32_t layer, const float *x, uint32_t n, const uint32_t *positions,
                ds_kv_cache *const *caches, ds_attn_out *out, ds_error *err);
    int (*ffn)(void *ctx, enum ds_unit_kind kind, uint32_t layer, const float *ffn_in, uint32_t n,
               float *out, ds_error *err);
    int (*embed)(void *ctx, const int32_t *tokens, uint32_t n, float *out, ds_error *err);
    int (*head)(void *ctx, const float *x, uint32_t n, float *logits, ds_error *err);
} ds_unit_runner_ops;

/* ---- the layer step ----------------------------------------------------------------------- */

typedef struct ds_layer_step ds_layer_step;

/* A step for up to max_rows rows of model m (borrowed) over the sequences of seqs (borrowed),
 * computing with pool (may be NULL). */
int ds_layer_step_new(const ds_model *m, ds_pool *pool, ds_seqs *seqs, uint32_t max_rows,
                      ds_layer_step **ret, ds_error *err);
ds_layer_step *ds_layer_step_free(ds_layer_step *st);
/* Sets the rows: n (<= max_rows) rows, row i of the sequence in slots[i] at positions[i]
 * (rows of one sequence consecutive, positions increasing; checked by the caller against its
 * caches). Copied. */
int ds_layer_step_set_rows(ds_layer_step *st, uint32_t n, const int *slots,
                           const uint32_t *positions);
/* The rows' hidden state [n, D]: written by the caller before the first layer, read after
 * the last one; each layer updates it in place. */
float *ds_layer_step_x(ds_layer_step *st);
uint32_t ds_layer_step_rows(const ds_layer_step *st);

/* Runs layer `layer` for the rows (attention, router, dense or shared FFN, routed experts
 * through runner/ctx, combine). DS_LAYER_DONE: x holds the layer's output. DS_LAYER_PENDING:
 * the runner will deliver; write its rows into ds_layer_step_expert_out and call
 * ds_layer_step_resume. Negative errno on failure (err says why; the rows are then garbage). */
int ds_layer_step_run(ds_layer_step *st, uint32_t layer, const ds_expert_runner_ops *runner,
                      void *ctx, ds_error *err);
/* Runs attention / dense / shared FFNs through ops/ctx (borrowed; NULL: the CPU units). */
void ds_layer_step_set_units(ds_layer_step *st, const ds_unit_runner_ops *ops, void *ctx);
/* Finishes a pending layer once every expert row is in: the combine. */
void ds_layer_step_resume(ds_layer_step *st);
bool ds_layer_step_pending(const ds_layer_step *st);
/* Of the MoE layer being run: routed expert ids and weights [n*K], the expert input
 * [n, D] (post-attention norm), and the expert output rows [n*K, D] by slot. */
const int32_t *ds_layer_step_ids(const ds_layer_step *st);
const float *ds_layer_step_weights(const ds_layer_step *st);
const float *ds_layer_step_ffn_in(const ds_layer_step *st);
float *ds_layer_step_expert_out(ds_layer_step *st);

#endif
