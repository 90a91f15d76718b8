/* fuzz_cluster_spec.c — the cluster-spec parser never crashes or leaks on any input, and a
 * spec it accepts can be planned (the tiny built-in dense model) without crashing. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ds_placement.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ds_cluster *cl = NULL;
    ds_error err = {0};
    if (ds_cluster_parse((const char *)data, size, &cl, &err))
        return 0;
    ds_model_config c;
    memset(&c, 0, sizeof c);
    c.arch = DS_ARCH_DEEPSEEK_V2;
    c.vocab_size = 64;
    c.hidden_size = 32;
    c.intermediate_size = 64;
    c.moe_intermediate_size = 16;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 2;
    c.kv_lora_rank = 16;
    c.qk_nope_head_dim = 8;
    c.qk_rope_head_dim = 8;
    c.v_head_dim = 8;
    c.n_routed_experts = 4;
    c.num_experts_per_tok = 2;
    c.n_group = 1;
    c.topk_group = 1;
    c.first_k_dense_replace = 1;
    c.moe_layer_freq = 1;
    c.dtype = DS_DTYPE_BF16;
    ds_plan_options o = {.batch = 2, .context = 8, .exact_max_vars = 1};
    ds_plan *p = NULL;
    if (ds_plan_solve(cl, &c, &o, &p, &err) == 0) {
        char *s = ds_plan_to_json(p);
        free(s);
        ds_plan_free(p);
    }
    ds_cluster_free(cl);
    return 0;
}
