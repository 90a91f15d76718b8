/* model_own.c — the buffers a model owns (converted copies, rebuilt tensors), freed with it.
 * Its own file so that model.c (the safetensors binding) and model_gguf.c (the GGUF binding)
 * both use it without depending on each other. */
#include <errno.h>
#include <stdlib.h>

#include "model_impl.h"

int ds_model_own(ds_model *m, void *p)
{
    if (!p)
        return -ENOMEM;
    if (m->n_owned == m->cap_owned) {
        size_t cap = m->cap_owned ? m->cap_owned * 2 : 64;
        void **n = realloc(m->owned, cap * sizeof(*n));
        if (!n) {
            free(p);
            return -ENOMEM;
        }
        m->owned = n;
        m->cap_owned = cap;
    }
    m->owned[m->n_owned++] = p;
    return 0;
}
