/* fuzz_wire.c — arbitrary bytes through the wire's only door. */
#include <stdint.h>
#include <stdlib.h>

#include "ds_wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    Dsd__Envelope *env = NULL;
    ds_error err = {0};
    if (ds_wire_unpack(data, size, &env, &err) == 0) {
        for (size_t i = 0; i < env->n_tensors; i++)
            (void)ds_wire_tensor_bytes(env->tensors[i]);
        (void)ds_wire_body_name(env);
        ds_wire_free(env);
    }
    return 0;
}
