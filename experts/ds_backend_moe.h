/* ds_backend_moe.h — routed experts on a compute backend (devices/ds_backend.h).
 *
 * The engine's hook for "experts on an OpenCL/CUDA device": every routed expert of every MoE
 * layer is uploaded once (checkpoint format, straight from the safetensors files), and
 * ds_backend_moe_run has the contract of ds_moe_run_experts (experts/ds_experts.h), so a
 * caller swaps one for the other. One call gathers the rows of all experts in expert order,
 * uploads them once, runs gate/up/SwiGLU/down per expert on the device and reads the results
 * back once. matmul on cpu/opencl is bit-identical to the CPU engine. SwiGLU runs on the host
 * by default (exact mode: the engine's expf, so the whole expert is bit-identical to the CPU
 * engine); ds_backend_moe_set_exact(bm, false) runs it on the device, where exp may differ in
 * the last bit (tokens still identical on the reference models; docs/backends.md). */
#ifndef DS_BACKEND_MOE_H
#define DS_BACKEND_MOE_H

#include <stdbool.h>
#include <stdint.h>

#include "ds_backend.h"
#include "ds_model.h"

typedef struct ds_backend_moe ds_backend_moe;

/* Uploads the routed experts of m's MoE layers (read from checkpoint dir `dir`, the one m was
 * opened from) to backend b, which must outlive the result. Errors name the tensor. */
int ds_backend_moe_new(const ds_model *m, const char *dir, ds_backend *b, ds_backend_moe **ret,
                       ds_error *err);
/* Only the experts want(ctx, layer, expert) accepts (want NULL: all), e.g. the experts a
 * cluster node was given on this device; running another one is -ENOENT. */
int ds_backend_moe_new_subset(const ds_model *m, const char *dir, ds_backend *b,
                              bool (*want)(void *ctx, uint32_t layer, uint32_t expert), void *ctx,
                              ds_backend_moe **ret, ds_error *err);
ds_backend_moe *ds_backend_moe_free(ds_backend_moe *bm);
/* Exact mode (default true): SwiGLU on the host, bit-identical to the CPU engine. */
void ds_backend_moe_set_exact(ds_backend_moe *bm, bool exact);
/* Bytes of expert weights uploaded. */
uint64_t ds_backend_moe_bytes(const ds_backend_moe *bm);
/* As ds_moe_run_experts: out[(i*k + s), D] = expert_{ids[i*k+s]}(ffn_in[i]) for layer l. */
int ds_backend_moe_run(ds_backend_moe *bm, uint32_t layer, const float *ffn_in, uint32_t n,
                       const int32_t *ids, float *out, ds_error *err);
/* One expert per row: out[i] = expert_{experts[i]}(rows[i]) (a cluster node's dispatch). */
int ds_backend_moe_run_pairs(ds_backend_moe *bm, uint32_t layer, const float *rows, uint32_t n,
                             const int32_t *experts, float *out, ds_error *err);

#endif
