/* fuzz_safetensors.c — arbitrary bytes as a safetensors image: the header parser must reject
 * or accept without crashing, and every accepted tensor must lie inside the buffer. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ds_tensor.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ds_st *st = NULL;
    ds_error err = {0};
    if (ds_st_open_buffer(data, size, "fuzz.safetensors", &st, &err) == 0) {
        for (size_t i = 0; i < ds_st_count(st); i++) {
            const ds_st_tensor *t = ds_st_at(st, i);
            const uint8_t *p = t->data;
            if (p < data || p + t->nbytes > data + size)
                abort();
            volatile uint8_t sink = 0;
            if (t->nbytes)
                sink ^= p[0] ^ p[t->nbytes - 1];
            (void)sink;
            if (ds_st_find(st, t->name) != t)
                abort();
        }
        ds_st_free(st);
    }
    return 0;
}
