/* ds_engine.h — the in-process engine: chains the units of ds_model.h for a batch of
 * sequences on one machine (prefill + batched decode), with a KV cache per sequence.
 * `dsctl generate --local` runs on it; the cluster calls the same units and must reproduce its
 * tokens exactly (bit-identity invariant, ds_model.h). */
#ifndef DS_ENGINE_H
#define DS_ENGINE_H

#include <stdint.h>

#include "ds_model.h"

typedef struct ds_engine ds_engine;

/* The engine borrows m (which must outlive it) and pool (may be NULL). max_positions bounds
 * each sequence's length (KV cache capacity). */
int ds_engine_new(const ds_model *m, ds_pool *pool, uint32_t max_positions, ds_engine **ret,
                  ds_error *err);
ds_engine *ds_engine_free(ds_engine *e);
/* Runs the routed experts of one MoE layer with the contract of ds_moe_run_experts
 * (experts/ds_experts.h): out[(i*k + s), D] = expert_{ids[i*k+s]}(ffn_in[i]). ctx is the
 * runner's own state (e.g. a ds_backend_moe). */
typedef int (*ds_moe_runner_fn)(void *ctx, uint32_t layer, const float *ffn_in, uint32_t n,
                                const int32_t *ids, float *out, ds_error *err);
/* Replaces ds_moe_run_experts for every MoE layer by fn(ctx, ...) (fn NULL: back to the CPU
 * experts of m). ctx is borrowed and must outlive the engine's use of it. The runner must be
 * bit-identical to ds_moe_run_experts for the engine's tokens to stay exact. */
void ds_engine_set_moe_runner(ds_engine *e, ds_moe_runner_fn fn, void *ctx);
/* Runs attention, dense/shared FFNs, embed and head through a unit runner (experts/ds_layer.h,
 * e.g. ds_backend_units_ops: those units on an accelerator); ops NULL: the CPU units. Set it
 * before the first sequence is added; ctx is borrowed and must outlive the engine. */
struct ds_unit_runner_ops;
void ds_engine_set_units(ds_engine *e, const struct ds_unit_runner_ops *ops, void *ctx);
/* Adds a sequence (empty cache); returns its id (>= 0) or a negative errno. */
int ds_engine_seq_add(ds_engine *e);
void ds_engine_seq_remove(ds_engine *e, int seq);
/* Number of positions already fed for seq. */
uint32_t ds_engine_seq_len(const ds_engine *e, int seq);
/* Feeds n rows (tokens[i] of sequence seqs[i] at its next position; rows of one sequence in
 * order) and writes logits[n, vocab] (NULL: none). Prefill = many rows of one sequence;
 * batched decode = one row of each of several sequences; both may mix in one call. */
int ds_engine_forward(ds_engine *e, uint32_t n, const int *seqs, const int32_t *tokens,
                      float *logits, ds_error *err);

#endif
