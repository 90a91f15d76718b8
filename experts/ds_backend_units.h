/* ds_backend_units.h — attention (with its KV cache and router), dense and shared FFNs,
 * embedding and head on a compute backend (devices/ds_backend.h): the units a plan puts on a
 * GPU while the routed experts stay elsewhere (the KTransformers layout).
 *
 * ds_backend_units_new uploads the chosen units' weights once, in checkpoint format (F32,
 * BF16, FP8 with its block scales; F16 and GGUF block types are widened to F32 on upload with
 * the engine's own row conversion, so the values are the ones the CPU engine computes on).
 * ds_backend_units_ops is a unit runner (experts/ds_layer.h): a layer hosted here runs on the
 * device, any other on the model's CPU units. Per attention call the rows' hidden state goes up
 * once, the attention output and the post-attention norm (and the router's choice) come back
 * once; the shared / dense FFN reuses the device copy of that norm (see the ffn contract
 * below). The KV cache of a hosted layer lives in device memory only: each sequence's
 * ds_kv_cache carries it (ds_kv_cache_set_ext) and keeps only the lengths on the host.
 *
 * Exact: every op is bit-identical to the CPU engine (ds_backend.h, ABI 2; OpenCL devices need
 * fp64), so tokens and logits match `dsctl generate --local` on the CPU bit for bit. */
#ifndef DS_BACKEND_UNITS_H
#define DS_BACKEND_UNITS_H

#include <stdbool.h>
#include <stdint.h>

#include "ds_backend.h"
#include "ds_layer.h"
#include "ds_model.h"

typedef struct ds_backend_units ds_backend_units;

/* Uploads to backend b the bound units of m that want(ctx, kind, layer) accepts (want NULL: all
 * of embed, attn[l], dense[l], shared[l], head; kinds other than those are never asked). The
 * model, the backend and pool (for the CPU fallbacks, may be NULL) are borrowed and must outlive
 * the result; so must it outlive every sequence table whose caches it holds (their device copies
 * are released through it). Errors name the unit. */
int ds_backend_units_new(const ds_model *m, ds_pool *pool, ds_backend *b,
                         bool (*want)(void *ctx, enum ds_unit_kind kind, uint32_t layer), void *ctx,
                         ds_backend_units **ret, ds_error *err);
ds_backend_units *ds_backend_units_free(ds_backend_units *bu);

/* The unit runner (ctx: a ds_backend_units). Contracts of ds_unit_runner_ops; in addition the
 * ffn of layer l reuses the device copy of the ffn_in that attn of the same layer produced
 * last when given the same host buffer and row count (the layer step's); a caller that
 * changes that buffer in between must pass another one. */
extern const ds_unit_runner_ops ds_backend_units_ops;

/* Exact mode (default true): every op bit-identical to the CPU engine (and the backend in its
 * exact mode: cuda without cuBLAS). false: the fast paths — the backend's tree RMSNorm for
 * contiguous rows, cuBLAS SGEMM for batches of 16+ rows on cuda — whose logits stay within
 * 1e-3 of the exact ones (absolute; test_model_generate checks it on the reference
 * checkpoints). The cluster always runs exact (its token identity needs it). */
void ds_backend_units_set_exact(ds_backend_units *bu, bool exact);
/* Whether the unit runs on the device. */
bool ds_backend_units_hosts(const ds_backend_units *bu, enum ds_unit_kind kind, uint32_t layer);
/* Bytes of weights uploaded; bytes of KV cache allocated on the device now. */
uint64_t ds_backend_units_weight_bytes(const ds_backend_units *bu);
uint64_t ds_backend_units_kv_bytes(const ds_backend_units *bu);
/* Seconds spent in device calls (attention with its router, FFNs, embed, head: from the upload
 * of the inputs to the download of the outputs) and calls, since the start. */
double ds_backend_units_busy_s(const ds_backend_units *bu, uint64_t *calls);

#endif
