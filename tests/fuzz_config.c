/* fuzz_config.c — arbitrary bytes as config.json: parse or reject, never crash; an accepted
 * config keeps its documented invariants. */
#include <stdint.h>
#include <stdlib.h>

#include "ds_config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ds_model_config c;
    ds_error err = {0};
    if (ds_model_config_parse((const char *)data, size, &c, &err) == 0) {
        if (c.n_routed_experts && (c.topk_group > c.n_group || c.n_routed_experts % c.n_group ||
                                   c.num_experts_per_tok > c.n_routed_experts))
            abort();
        for (uint32_t l = 0; l < c.num_hidden_layers && l < 8; l++)
            (void)ds_model_config_layer_is_moe(&c, l);
    }
    return 0;
}
