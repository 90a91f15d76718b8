/* model_impl.h — the private layout of ds_model shared by the model sources. */
#ifndef DS_MODEL_IMPL_H
#define DS_MODEL_IMPL_H

#include "ds_model.h"

typedef struct ds_ffn {
    bool bound;
    ds_weight gate, up; /* [I, D] */
    ds_weight down;     /* [D, I] */
} ds_ffn;

typedef struct ds_layer {
    bool moe; /* routed MoE FFN (else dense) */
    bool attn_bound;
    const float *attn_norm; /* [D] input_layernorm */
    const float *ffn_norm;  /* [D] post_attention_layernorm */
    ds_weight q_a;          /* [q_lora_rank, D] (q LoRA only) */
    const float *q_a_norm;  /* [q_lora_rank] */
    ds_weight q_b;          /* [H*(dn+dr), q_lora_rank or D] (q_b_proj or q_proj) */
    ds_weight kv_a;         /* [C + dr, D] */
    const float *kv_a_norm; /* [C] */
    ds_weight kv_b;         /* [H*(dn+dv), C]: per head dn rows W_UK then dv rows W_UV */
    bool kv_b_dequantised;  /* kv_b rebuilt in float32 from block types (not requantised) */
    ds_weight o;            /* [D, H*dv] */
    ds_weight gate;         /* [E, D] router (MoE) */
    const float *gate_bias; /* [E] e_score_correction_bias or NULL */
    ds_ffn dense;           /* dense layers */
    ds_ffn shared;          /* MoE layers with shared experts */
    ds_ffn *experts;        /* [E] MoE layers */
} ds_layer;

typedef struct ds_rope {
    double *inv_freq;     /* [dr/2] after YaRN */
    double attn_factor;   /* multiplies cos and sin (YaRN mscale ratio) */
    double softmax_scale; /* (dn+dr)^-0.5 * mscale_all^2 */
} ds_rope;

struct ds_model {
    char *dir; /* the checkpoint directory, or the GGUF file's path */
    ds_model_config cfg;
    ds_st *st;          /* HF checkpoints */
    struct ds_gguf *gg; /* GGUF files (then st is NULL and `used` stays empty) */
    bool embed_bound, head_bound;
    ds_weight embed;         /* [V, D] */
    const float *final_norm; /* [D] */
    ds_weight lm_head;       /* [V, D] */
    ds_layer *layers;        /* [num_hidden_layers] */
    ds_rope rope;
    void **owned; /* converted copies freed with the model */
    size_t n_owned, cap_owned;
    const ds_st_tensor **used; /* every checkpoint tensor the bound units read */
    size_t n_used, cap_used;
    const struct ds_gguf_tensor **gused; /* the same for a GGUF */
    size_t n_gused, cap_gused;
};

int ds_rope_init(const ds_model_config *c, ds_rope *r);

/* Takes ownership of p (malloc'd): freed with the model. -ENOMEM (p freed) when p is NULL or
 * the list cannot grow. */
int ds_model_own(ds_model *m, void *p);
/* True when path names a GGUF file (starts with the magic "GGUF"). */
bool ds_model_path_is_gguf(const char *path);
/* Opens m->dir as a GGUF file or split set (model_gguf.c): config from its metadata, then the
 * wanted units' tensors bound (views into the mapping; kv_b rebuilt when split). */
int ds_model_open_gguf(ds_model *m, const ds_model_open_opts *opts, ds_error *err);
/* --quantize: the bound units' linear weights (not embeddings, router gates or norms) that
 * ds_quantize_weight_type selects, replaced by owned Q8_0 / Q4_K copies (quantize.c). */
int ds_model_quantize_bound(ds_model *m, enum ds_quantize q, ds_error *err);

#endif
