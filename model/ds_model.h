/* ds_model.h — the DeepSeek-V2/V3 forward pass as separable units, and an in-process engine.
 *
 * A ds_model is an opened checkpoint directory: config.json + safetensors (mmap), weights kept
 * at checkpoint precision (see ds_tensor.h). The forward pass is cut along the design's units
 * so that the cluster can run each on a different node:
 *
 *   embed        token ids              -> hidden rows x            [n, D]
 *   attn[l]      x, positions, KV caches -> x + MLA(norm(x)) = h     [n, D]
 *                                          ffn_in = post_norm(h)    [n, D]
 *                                          router top-k ids/weights [n, k] (MoE layers)
 *   dense[l]     ffn_in -> FFN(ffn_in)                              [n, D] (dense layers)
 *   shared[l]    ffn_in -> shared experts' FFN(ffn_in)              [n, D] (MoE layers)
 *   expert[l][e] ffn_in rows routed to e -> expert_e(ffn_in)        [m, D] (unweighted)
 *   combine      h + sum_k w_k * expert_k + shared  (ds_moe_combine, experts/ds_experts.h)
 *                or h + dense (ds_unit_add)
 *   head         x -> lm_head(norm(x)) logits                       [n, vocab]
 *
 * BIT-IDENTITY INVARIANT. Every unit computes each output row from its own input row only
 * (attention also reads that row's KV cache), with a fixed accumulation order for every
 * output element: 16 interleaved fp32 fused-multiply-add partial sums over the input dimension
 * combined in a fixed tree (ds_weight_matmul), norms and softmaxes in one sequential pass per
 * row. Threads split work only across output elements / rows / heads, never inside a sum. So
 * a row's result is bit-identical whatever other rows share the batch, however the rows are
 * split across calls, whatever the thread count, and on any x86-64 or other CPU (FMA is used
 * explicitly on every path; the product is built with -ffp-contract=off). The distributed
 * cluster relies on this to reproduce `dsctl generate --local` token for token. The MoE
 * combine order is fixed too: the router's slot order, then the shared experts.
 *
 * Thread safety: a ds_model is read-only after open; units may run concurrently from several
 * threads as long as no two calls write the same KV cache. */
#ifndef DS_MODEL_H
#define DS_MODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "ds_config.h"
#include "ds_err.h"
#include "ds_pool.h"
#include "ds_tensor.h"
#include "ds_unit.h" /* enum ds_unit_kind: one definition for model, placement, daemon */

/* Load-time quantisation of linear weights (--quantize, dsd's `quantize` option): the F32,
 * F16, BF16 and FP8 weights of attention, dense/shared FFNs, routed experts and lm_head become
 * Q8_0 or Q4_K blocks in memory; norms, embeddings and router gates stay as they are; a weight
 * already in a ggml block type stays. A row whose length is not a multiple of 256 falls back
 * from Q4_K to Q8_0 (and one not a multiple of 32 stays as it is). docs/gguf.md. */
enum ds_quantize {
    DS_QUANTIZE_NONE,
    DS_QUANTIZE_Q8_0,
    DS_QUANTIZE_Q4_K,
};
#define DS_QUANTIZE_SRC_F8 0xF8F8u /* src_type of an FP8 (e4m3 + block scales) weight below */

/* "none" | "q8_0" | "q4_k" (also upper case) -> *q; -EINVAL otherwise. */
int ds_quantize_parse(const char *s, enum ds_quantize *q);
const char *ds_quantize_name(enum ds_quantize q);
/* Whether a linear weight of ggml type src_type (or DS_QUANTIZE_SRC_F8) with rows of cols values
 * is quantised under q, and to which ggml type (*out). */
bool ds_quantize_weight_type(enum ds_quantize q, uint32_t src_type, uint64_t cols, uint32_t *out);

/* Which units to bind at open. NULL want = all. Unbound units return -ENOENT when called.
 * Tensors of unbound units are neither validated against the config nor touched (the mapping
 * is lazy, so they cost no memory). */
typedef struct ds_model_open_opts {
    bool (*want)(void *ctx, enum ds_unit_kind kind, uint32_t layer, uint32_t expert);
    void *want_ctx;
    enum ds_quantize quantize; /* quantise the bound units' linear weights at load (0: none) */
} ds_model_open_opts;

typedef struct ds_model ds_model;

/* Reads only the header / tensor table of the model at path (a GGUF file or any part of a split
 * set; an HF directory: config.json and the safetensors headers; no weight is read) and fills
 * cfg and ub (ds_unit_bytes_release) with each unit's real bytes as the loader would hold them
 * under q: matrices at their bytes in the file, vectors as float32, a GGUF's split k_b/v_b as
 * the kv_b rebuilt at load, quantised weights as their blocks. For a bare config.json, or a
 * directory without safetensors, only cfg is filled (ub->n_layers == 0: no tensors to count).
 * Errors name the file and tensor. */
int ds_model_unit_bytes(const char *path, enum ds_quantize q, ds_model_config *cfg,
                        ds_unit_bytes *ub, ds_error *err);

/* Opens DIR (config.json + model.safetensors or model.safetensors.index.json), or a llama.cpp
 * GGUF file of architecture deepseek2 (any path whose file starts with "GGUF"; the first, or
 * any, part of a split set NAME-0000K-of-0000N.gguf opens the whole set): config from its
 * metadata, weights in their ggml types (docs/gguf.md). Validates every needed tensor's
 * presence, dtype and shape against the config; errors name file and tensor. opts may be NULL. */
int ds_model_open(const char *dir, const ds_model_open_opts *opts, ds_model **ret, ds_error *err);
ds_model *ds_model_free(ds_model *m);
const ds_model_config *ds_model_get_config(const ds_model *m);
/* The checkpoint tensors the bound units read (weights, norms, scales, biases), each once:
 * *out is a malloc'd array (caller frees) of *n pointers valid while m is open. What a node
 * without a checkpoint copy needs streamed to it (docs/daemon.md, weight streaming).
 * -EMEDIUMTYPE for a model opened from a GGUF file: ds_model_gguf_tensors_used. */
int ds_model_tensors_used(const ds_model *m, const ds_st_tensor ***out, size_t *n);
/* The same for a model opened from a GGUF: the GGUF tensors the bound units read, each once
 * (a stacked ffn_*_exps tensor whole, even when only some of its experts are bound; the split
 * k_b and v_b, from which the loader rebuilds kv_b), in their types. -EMEDIUMTYPE for an HF
 * checkpoint. */
struct ds_gguf_tensor;
struct ds_gguf;
int ds_model_gguf_tensors_used(const ds_model *m, const struct ds_gguf_tensor ***out, size_t *n);
/* The GGUF file (set) m was opened from (its metadata, tensor table), or NULL. */
const struct ds_gguf *ds_model_gguf(const ds_model *m);

/* --- KV cache ---------------------------------------------------------------------------
 * The compressed MLA cache of ONE sequence for the layers [layer_begin, layer_end): per
 * layer, per position, the normalised latent c (kv_lora_rank floats) then the roped k_pe
 * (qk_rope_head_dim floats). A node owns caches only for the layers it hosts. Capacity grows
 * on demand up to max_positions. */
typedef struct ds_kv_cache ds_kv_cache;

int ds_kv_cache_new(const ds_model_config *c, uint32_t layer_begin, uint32_t layer_end,
                    uint32_t max_positions, ds_kv_cache **ret);
ds_kv_cache *ds_kv_cache_free(ds_kv_cache *kv);
/* Positions stored for layer l (the next position to write is this value). */
uint32_t ds_kv_cache_len(const ds_kv_cache *kv, uint32_t layer);
/* Forgets positions >= len in every layer (rewind); len must be <= the current lengths. */
int ds_kv_cache_truncate(ds_kv_cache *kv, uint32_t len);

/* A copy of the cache kept elsewhere (an accelerator's memory, experts/ds_backend_units.h): an
 * opaque pointer owned by the cache from then on and released with free_fn(ext) when the
 * cache is freed (or replaced). A cache whose attention runs on a device holds its rows there
 * only; the host side then tracks just the lengths. */
void ds_kv_cache_set_ext(ds_kv_cache *kv, void *ext, void (*free_fn)(void *ext));
void *ds_kv_cache_ext(const ds_kv_cache *kv);
/* Records that layer now holds len positions (written elsewhere, by the owner of ext). */
int ds_kv_cache_set_len(ds_kv_cache *kv, uint32_t layer, uint32_t len);
uint32_t ds_kv_cache_max_positions(const ds_kv_cache *kv);
bool ds_kv_cache_has_layer(const ds_kv_cache *kv, uint32_t layer);

/* --- Units --------------------------------------------------------------------------------
 * All row buffers are float32 row-major and caller-owned; n may be 0. pool may be NULL. */

/* out[n, D] = embedding rows of tokens[n]; -ERANGE with err for an id outside the vocab. */
int ds_unit_embed(const ds_model *m, ds_pool *pool, const int32_t *tokens, uint32_t n, float *out,
                  ds_error *err);

typedef struct ds_attn_out {
    float *hidden;       /* [n, D] x + o_proj(MLA(input_layernorm(x))) */
    float *ffn_in;       /* [n, D] post_attention_layernorm(hidden) */
    int32_t *topk_ids;   /* [n, num_experts_per_tok] MoE layers only; may be NULL otherwise */
    float *topk_weights; /* [n, num_experts_per_tok] unbiased, normalised, scaled */
} ds_attn_out;

/* Attention unit of layer l for n rows. Row i belongs to the sequence whose cache is
 * caches[i] and sits at positions[i]. Each row's latent/k_pe is written to its cache at
 * positions[i] (which must be <= that cache's current length for l; a smaller value rewinds
 * the cache), then the row attends to positions [0, positions[i]] of its cache. Rows of one
 * sequence within a call must have consecutive increasing positions. The router runs here
 * for MoE layers (the gate is part of attn[l]). */
int ds_unit_attn(const ds_model *m, ds_pool *pool, uint32_t layer, const float *x, uint32_t n,
                 const uint32_t *positions, ds_kv_cache *const *caches, ds_attn_out *out,
                 ds_error *err);

/* out[n, D] = dense FFN of layer l (down(silu(gate x) * up x)) of ffn_in. */
int ds_unit_dense(const ds_model *m, ds_pool *pool, uint32_t layer, const float *ffn_in, uint32_t n,
                  float *out, ds_error *err);
/* out[n, D] = shared experts' FFN of layer l (MoE layers with n_shared_experts > 0). */
int ds_unit_shared(const ds_model *m, ds_pool *pool, uint32_t layer, const float *ffn_in,
                   uint32_t n, float *out, ds_error *err);
/* out[n, D] = routed expert e of layer l applied to n rows (unweighted). */
int ds_unit_expert(const ds_model *m, ds_pool *pool, uint32_t layer, uint32_t expert,
                   const float *ffn_in, uint32_t n, float *out, ds_error *err);
/* Several routed experts of layer l as one parallel job: expert experts[j] runs on rows
 * [offsets[j], offsets[j+1]) of in[.., D] and writes the same rows of out (unweighted). The
 * values are those of ds_unit_expert on each expert alone. */
int ds_unit_experts(const ds_model *m, ds_pool *pool, uint32_t layer, uint32_t n_experts,
                    const uint32_t *experts, const uint32_t *offsets, const float *in, float *out,
                    ds_error *err);
/* logits[n, vocab] = lm_head(norm(x)). */
int ds_unit_head(const ds_model *m, ds_pool *pool, const float *x, uint32_t n, float *logits,
                 ds_error *err);

/* --- A unit's parameters, for a runner that computes it elsewhere (an accelerator) ---------
 * Views into the opened model (valid while it is open); -ENOENT when the unit is not bound. */
typedef struct ds_attn_params {
    const float *attn_norm, *ffn_norm; /* [D] input / post-attention RMSNorm */
    const ds_weight *q_a;              /* [q_lora, D], or NULL without q LoRA */
    const float *q_a_norm;             /* [q_lora] (eps 1e-6) */
    const ds_weight *q_b;              /* [H*(dn+dr), q_lora or D] */
    const ds_weight *kv_a;             /* [C + dr, D] */
    const float *kv_a_norm;            /* [C] (eps 1e-6) */
    const ds_weight *kv_b, *o;         /* [H*(dn+dv), C], [D, H*dv] */
    const ds_weight *gate;             /* [E, D] router, NULL in a dense layer */
    const float *gate_bias;            /* [E] or NULL */
    double softmax_scale;              /* with YaRN's mscale^2 */
} ds_attn_params;
int ds_model_attn_params(const ds_model *m, uint32_t layer, ds_attn_params *out);
/* The dense FFN (kind DS_UNIT_DENSE) or the shared experts (DS_UNIT_SHARED) of layer. */
int ds_model_ffn_params(const ds_model *m, enum ds_unit_kind kind, uint32_t layer,
                        const ds_weight **gate, const ds_weight **up, const ds_weight **down);
/* The embedding [V, D]; the final norm [D] and lm_head [V, D]. */
int ds_model_embed_params(const ds_model *m, const ds_weight **embed);
int ds_model_head_params(const ds_model *m, const float **final_norm, const ds_weight **lm_head);
/* The rope coefficients of position pos, as ds_unit_attn computes them (YaRN frequencies and
 * attention factor): cs[dr/2], sn[dr/2]. */
void ds_model_rope_coefs(const ds_model *m, uint32_t pos, float *cs, float *sn);

/* --- Router (DeepSeek's reference rules) ---------------------------------------------------
 * scores: softmax (V2) or sigmoid (V3) of the gate logits, in fp32. Selection uses the scores
 * plus bias when a bias is given (e_score_correction_bias, whatever the width); group-limited
 * methods keep the topk_group best groups (group score: max for group_limited_greedy, sum of
 * the top 2 biased scores for noaux_tc) and mask the others with -inf. Weights are the
 * UNBIASED scores of the chosen experts, divided by their sum when norm_topk_prob (plus 1e-20
 * for noaux_tc like the reference), times routed_scaling_factor. Ties choose the lower index.
 * ids/weights: [num_experts_per_tok], in descending order of selection score. */
void ds_router_select(const ds_model_config *c, const float *gate_logits, const float *bias,
                      int32_t *ids, float *weights);

/* hidden[n, D] += delta[n, D] (the dense-layer combine; same for every batch split). */
void ds_unit_add(uint32_t d, uint32_t n, const float *delta, float *hidden);

/* --- Sampling ------------------------------------------------------------------------------ */
typedef struct ds_sampler {
    bool greedy;       /* argmax (lowest id on ties); the other fields are ignored */
    float temperature; /* > 0 */
    float top_p;       /* (0, 1]; 1 = off */
    uint32_t top_k;    /* 0 = off */
    uint64_t state;    /* PRNG state (xorshift64*), seeded with ds_sampler_seed */
} ds_sampler;

void ds_sampler_seed(ds_sampler *s, uint64_t seed);
/* Picks a token id from logits[vocab]. */
int32_t ds_sampler_pick(ds_sampler *s, const float *logits, uint32_t vocab);

#endif
