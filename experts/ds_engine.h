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
