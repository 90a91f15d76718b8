/* inventory.c — the placeable units of a model and what each costs (docs/placement.md). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "ds_placement.h"

/* Bytes of a [rows, cols] linear weight in the checkpoint dtype. FP8 adds one f32
 * weight_scale_inv per block of fp8_block_rows x fp8_block_cols. */
static uint64_t lin_bytes(const ds_model_config *c, uint64_t rows, uint64_t cols)
{
    switch (c->dtype) {
    case DS_DTYPE_F32:
        return 4 * rows * cols;
    case DS_DTYPE_F16:
    case DS_DTYPE_BF16:
        return 2 * rows * cols;
    case DS_DTYPE_F8_E4M3: {
        uint64_t br = c->fp8_block_rows ? c->fp8_block_rows : 128;
        uint64_t bc = c->fp8_block_cols ? c->fp8_block_cols : 128;
        return rows * cols + 4 * ((rows + br - 1) / br) * ((cols + bc - 1) / bc);
    }
    default: /* ggml block types are per tensor in a GGUF, never a config's dtype (yet) */
        break;
    }
    return 2 * rows * cols;
}

/* Embeddings, norms and the router gate are not quantized in the FP8 checkpoints (BF16). */
static uint64_t plain_bytes(const ds_model_config *c, uint64_t n)
{
    return (c->dtype == DS_DTYPE_F32 ? 4 : 2) * n;
}

int ds_inventory_build(const ds_model_config *c, ds_inventory *inv, ds_error *err)
{
    memset(inv, 0, sizeof *inv);
    if (!c->hidden_size || !c->num_hidden_layers || !c->num_attention_heads || !c->vocab_size)
        return ds_error_set(err, -EINVAL, "inventory: config has a zero size");
    if (c->num_hidden_layers > 4096 || c->n_routed_experts > 4096)
        return ds_error_set(err, -ERANGE, "inventory: %u layers / %u experts beyond limits",
                            c->num_hidden_layers, c->n_routed_experts);
    uint64_t D = c->hidden_size, H = c->num_attention_heads, C = c->kv_lora_rank;
    uint64_t R = c->qk_rope_head_dim, N = c->qk_nope_head_dim, V = c->v_head_dim;
    uint64_t Q = c->q_lora_rank;
    inv->n_layers = c->num_hidden_layers;
    inv->n_experts = c->n_routed_experts;
    inv->top_k = c->num_experts_per_tok;
    inv->n_group = c->n_group ? c->n_group : 1;
    inv->topk_group = c->topk_group ? c->topk_group : 1;
    uint64_t act = 2 * D; /* a hidden row crosses links in BF16 */

    /* attn[l]: MLA projections + the two RMSNorms of the layer. */
    uint64_t b = 0, p = 0; /* bytes, linear parameters */
    if (Q) {
        b += lin_bytes(c, Q, D) + plain_bytes(c, Q) + lin_bytes(c, H * (N + R), Q);
        p += Q * D + H * (N + R) * Q;
    } else {
        b += lin_bytes(c, H * (N + R), D);
        p += H * (N + R) * D;
    }
    b += lin_bytes(c, C + R, D) + plain_bytes(c, C) + lin_bytes(c, H * (N + V), C) +
         lin_bytes(c, D, H * V) + plain_bytes(c, 2 * D);
    p += (C + R) * D + H * (N + V) * C + D * H * V;
    inv->attn.weight_bytes = b;
    inv->attn.flops_per_token = 2.0 * (double)p;
    /* Absorbed MLA decode: per head and cached token, a score over C + R values and a
     * weighted sum over C values. */
    inv->attn.attn_flops_per_ctx = 2.0 * (double)H * (double)(2 * C + R);
    inv->attn.kv_bytes_per_token = 2 * (C + R); /* BF16 latent + rope key */
    inv->attn.act_bytes_per_token = act;

    /* Router gate of a MoE layer (+ V3's f32 correction bias), hosted with attn[l]. */
    uint64_t E = c->n_routed_experts;
    inv->attn_router.weight_bytes =
        E ? plain_bytes(c, E * D) + (c->topk_method == DS_TOPK_NOAUX_TC ? 4 * E : 0) : 0;
    inv->attn_router.flops_per_token = 2.0 * (double)(E * D);

    inv->dense.weight_bytes = 3 * lin_bytes(c, c->intermediate_size, D);
    inv->dense.flops_per_token = 6.0 * (double)c->intermediate_size * (double)D;
    inv->dense.act_bytes_per_token = act;
    uint64_t sw = (uint64_t)c->n_shared_experts * c->moe_intermediate_size;
    inv->shared.weight_bytes = sw ? 3 * lin_bytes(c, sw, D) : 0;
    inv->shared.flops_per_token = 6.0 * (double)sw * (double)D;
    inv->shared.act_bytes_per_token = act;
    inv->expert.weight_bytes = E ? 3 * lin_bytes(c, c->moe_intermediate_size, D) : 0;
    inv->expert.flops_per_token = 6.0 * (double)c->moe_intermediate_size * (double)D;
    inv->expert.act_bytes_per_token = act;
    inv->embed.weight_bytes = plain_bytes(c, (uint64_t)c->vocab_size * D);
    inv->embed.act_bytes_per_token = act;
    inv->head.weight_bytes = plain_bytes(c, (uint64_t)c->vocab_size * D + D);
    inv->head.flops_per_token = 2.0 * (double)c->vocab_size * (double)D;
    inv->head.act_bytes_per_token = act;

    inv->is_moe = calloc(inv->n_layers, sizeof *inv->is_moe);
    if (!inv->is_moe)
        return ds_error_set(err, -ENOMEM, "inventory: out of memory");
    for (uint32_t l = 0; l < inv->n_layers; l++)
        inv->is_moe[l] = E && ds_model_config_layer_is_moe(c, l);
    if (ds_unit_bytes_init(&inv->bytes, inv->n_layers) < 0) {
        ds_inventory_release(inv);
        return ds_error_set(err, -ENOMEM, "inventory: out of memory");
    }
    ds_unit_bytes *ub = &inv->bytes;
    ub->embed = inv->embed.weight_bytes;
    ub->head = inv->head.weight_bytes;
    for (uint32_t l = 0; l < inv->n_layers; l++) {
        ub->attn[l] = inv->attn.weight_bytes;
        if (inv->is_moe[l]) {
            ub->router[l] = inv->attn_router.weight_bytes;
            ub->shared[l] = inv->shared.weight_bytes;
            ub->expert[l] = inv->expert.weight_bytes;
        } else {
            ub->dense[l] = inv->dense.weight_bytes;
        }
    }
    return 0;
}

int ds_inventory_set_bytes(ds_inventory *inv, const ds_unit_bytes *b, ds_error *err)
{
    if (b->n_layers != inv->n_layers)
        return ds_error_set(err, -EINVAL,
                            "inventory: the file's unit bytes cover %u layers, the "
                            "config has %u",
                            b->n_layers, inv->n_layers);
    ds_unit_bytes *ub = &inv->bytes;
    ub->embed = inv->embed.weight_bytes = b->embed;
    ub->head = inv->head.weight_bytes = b->head;
    for (uint32_t l = 0; l < inv->n_layers; l++) {
        ub->attn[l] = b->attn[l];
        ub->router[l] = inv->is_moe[l] ? b->router[l] : 0;
        ub->dense[l] = inv->is_moe[l] ? 0 : b->dense[l];
        ub->shared[l] = inv->is_moe[l] ? b->shared[l] : 0;
        ub->expert[l] = inv->is_moe[l] ? b->expert[l] : 0;
    }
    inv->bytes_from_file = true;
    return 0;
}

void ds_inventory_release(ds_inventory *inv)
{
    if (inv) {
        free(inv->is_moe);
        inv->is_moe = NULL;
        ds_unit_bytes_release(&inv->bytes);
    }
}

uint64_t ds_inventory_total_bytes(const ds_inventory *inv)
{
    return ds_unit_bytes_total(&inv->bytes, inv->n_experts);
}
