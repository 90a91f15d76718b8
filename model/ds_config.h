/* ds_config.h — a DeepSeek-V2/V3 model configuration (HF config.json), the contract between
 * the engine (model/), placement (placement/) and the daemon.
 *
 * Every field of both architectures that changes the computation or the weights' shapes is
 * here. Loading validates ranges (no absurd sizes: a peer or a file cannot make us allocate
 * unbounded memory) and consistency (topk_group <= n_group, n_routed_experts divisible by
 * n_group, ...). */
#ifndef DS_CONFIG_H
#define DS_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#include "ds_err.h"

enum ds_arch {
    DS_ARCH_DEEPSEEK_V2 = 2, /* DeepseekV2ForCausalLM */
    DS_ARCH_DEEPSEEK_V3 = 3, /* DeepseekV3ForCausalLM */
};

enum ds_scoring {
    DS_SCORING_SOFTMAX, /* V2 */
    DS_SCORING_SIGMOID, /* V3 */
};

enum ds_topk_method {
    DS_TOPK_GREEDY,               /* V2: plain top-k over all experts */
    DS_TOPK_GROUP_LIMITED_GREEDY, /* V2: group score = max in group */
    DS_TOPK_NOAUX_TC,             /* V3: group score = sum of top-2 biased scores */
};

/* Checkpoint weight precision of the linear layers. */
enum ds_dtype {
    DS_DTYPE_F32,
    DS_DTYPE_F16,
    DS_DTYPE_BF16,
    DS_DTYPE_F8_E4M3, /* with 128x128 (weight_block_size) weight_scale_inv blocks */
    /* ggml block formats (GGUF files): rows are packed blocks, ds_quant_row_bytes(type, cols)
     * bytes each; dequantised per row (model/quant.c) and computed in float32. */
    DS_DTYPE_Q4_0,
    DS_DTYPE_Q4_1,
    DS_DTYPE_Q5_0,
    DS_DTYPE_Q5_1,
    DS_DTYPE_Q8_0,
    DS_DTYPE_Q2_K,
    DS_DTYPE_Q3_K,
    DS_DTYPE_Q4_K,
    DS_DTYPE_Q5_K,
    DS_DTYPE_Q6_K,
};

/* The ggml type id (enum ds_quant_type) of a block dtype, or -1 for F32/F16/BF16/F8. */
int ds_dtype_quant_type(enum ds_dtype dt);
/* The dtype of a ggml type id the engine computes on, or -1 (IQ*, Q8_1, Q8_K, ...). */
int ds_dtype_from_quant_type(uint32_t type);

typedef struct ds_rope_config {
    double theta;         /* rope_theta */
    bool yarn;            /* rope_scaling.type == "yarn" */
    double factor;        /* rope_scaling.factor (1 when no scaling) */
    uint32_t original_max_position_embeddings;
    double beta_fast;     /* default 32 */
    double beta_slow;     /* default 1 */
    double mscale;        /* default 1 */
    double mscale_all_dim; /* default 0 */
} ds_rope_config;

typedef struct ds_model_config {
    enum ds_arch arch;
    uint32_t vocab_size;
    uint32_t hidden_size;             /* D */
    uint32_t intermediate_size;       /* dense FFN width */
    uint32_t moe_intermediate_size;   /* one routed expert's width */
    uint32_t num_hidden_layers;       /* MTP layers (>= this) are skipped */
    uint32_t num_attention_heads;     /* H */
    uint32_t q_lora_rank;             /* 0 = no q LoRA (q_proj) */
    uint32_t kv_lora_rank;            /* latent width C */
    uint32_t qk_nope_head_dim;
    uint32_t qk_rope_head_dim;
    uint32_t v_head_dim;
    uint32_t n_routed_experts;        /* 0 = dense model */
    uint32_t n_shared_experts;        /* 0 = none */
    uint32_t num_experts_per_tok;     /* top-k */
    uint32_t n_group;                 /* 1 when ungrouped */
    uint32_t topk_group;
    uint32_t first_k_dense_replace;
    uint32_t moe_layer_freq;          /* layer l is MoE iff l >= first_k_dense_replace && l % freq == 0 */
    enum ds_topk_method topk_method;
    enum ds_scoring scoring_func;
    bool norm_topk_prob;
    double routed_scaling_factor;
    double rms_norm_eps;
    uint32_t max_position_embeddings;
    uint32_t num_nextn_predict_layers;
    ds_rope_config rope;
    bool tie_word_embeddings;
    int32_t bos_token_id;             /* -1 when absent */
    int32_t eos_token_id;             /* -1 when absent */
    enum ds_dtype dtype;              /* torch_dtype / dtype, or F8 when quantization_config */
    uint32_t fp8_block_rows, fp8_block_cols; /* weight_block_size, 128x128 */
} ds_model_config;

/* Parses config.json text / file. On failure returns -EBADMSG (bad JSON, bad field type),
 * -ERANGE (value out of bounds) or -EINVAL (inconsistent) with err naming the field. */
int ds_model_config_parse(const char *json_text, size_t len, ds_model_config *out, ds_error *err);
int ds_model_config_load(const char *path, ds_model_config *out, ds_error *err);

/* The config of a llama.cpp GGUF file of architecture `deepseek2` (the keys
 * convert_hf_to_gguf.py writes, docs/gguf.md), checked like config.json: -ENOENT for a missing
 * required key, -EBADMSG for a wrong value type, -ERANGE out of bounds, -EINVAL inconsistent or
 * another architecture, with err naming the file and the key. */
struct ds_gguf;
int ds_model_config_from_gguf(const struct ds_gguf *g, ds_model_config *out, ds_error *err);

/* True when layer l (0-based, < num_hidden_layers) has a routed MoE FFN. */
bool ds_model_config_layer_is_moe(const ds_model_config *c, uint32_t l);

#endif
