/* bench_ckpt.h — synthetic DeepSeek-V2 checkpoints for the engine benchmarks.
 *
 * bench_ckpt_write() writes a real Hugging Face layout checkpoint (config.json +
 * model.safetensors, unfused experts, BF16) with random weights scaled so activations stay
 * near unit size through every layer, so the engine (and llama.cpp, after conversion) runs the
 * same arithmetic as on a trained model. The weights come from a fixed seed: two writes of one
 * shape give identical files. */
#ifndef BENCH_CKPT_H
#define BENCH_CKPT_H

#include <stddef.h> /* ds_config.h uses size_t without it */
#include <stdint.h>

#include "ds_config.h"

/* A DeepseekV2ForCausalLM without q LoRA: 1 leading dense layer, then MoE layers with softmax
 * greedy routing (no groups, no renormalisation), n_shared shared experts. */
typedef struct bench_shape {
    uint32_t vocab;       /* vocab_size (rows of embed_tokens and lm_head) */
    uint32_t d;           /* hidden_size */
    uint32_t layers;      /* num_hidden_layers; layer 0 is dense */
    uint32_t heads;       /* num_attention_heads */
    uint32_t kv_lora;     /* kv_lora_rank */
    uint32_t nope, rope;  /* qk_nope_head_dim, qk_rope_head_dim */
    uint32_t v;           /* v_head_dim */
    uint32_t experts;     /* n_routed_experts */
    uint32_t topk;        /* num_experts_per_tok */
    uint32_t shared;      /* n_shared_experts (one FFN of width shared * moe_inter) */
    uint32_t moe_inter;   /* moe_intermediate_size */
    uint32_t dense_inter; /* intermediate_size (layer 0) */
} bench_shape;

/* Writes DIR/config.json and DIR/model.safetensors (DIR must exist). On success returns 0 and
 * stores the weight bytes written in *bytes (may be NULL); else a negative errno. */
int bench_ckpt_write(const char *dir, const bench_shape *s, double *bytes);

/* Weight bytes one batch-1 decode token streams under config c: every non-expert linear
 * weight (attention, dense FFN, shared experts, router), top-k of the routed experts of each
 * MoE layer, lm_head and one embedding row, at the checkpoint's element size (FP8: 1 byte +
 * its block scales). Norm vectors are left out (a few KB per layer). */
double bench_bytes_per_token(const ds_model_config *c);

/* The same for a GGUF file (path: the file or the first of a split set), from its tensor
 * table: each 2-D+ tensor's real bytes in its own type, the stacked *_exps tensors times
 * top-k / n_routed_experts, one row of token_embd. 0, or a negative errno. */
int bench_bytes_per_token_gguf(const char *path, const ds_model_config *c, double *out);

/* CLOCK_MONOTONIC in seconds. */
double bench_now_s(void);

/* The read bandwidth of this machine with the pool's threads: every thread sums (AVX2 loads
 * into 8 accumulators) its 16 MiB tasks of a 1 GiB buffer, far above the last-level cache;
 * GB/s, best of 5 passes. 0 if the buffer cannot be allocated. */
struct ds_pool;
double bench_read_gbs(struct ds_pool *pool);

#endif
