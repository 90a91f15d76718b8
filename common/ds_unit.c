/* ds_unit.c — unit names (see ds_unit.h). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds_unit.h"

int ds_unit_format(char *buf, size_t n, enum ds_unit_kind kind, uint32_t layer, uint32_t expert)
{
    int len;
    switch (kind) {
    case DS_UNIT_EMBED:
        len = snprintf(buf, n, "embed");
        break;
    case DS_UNIT_HEAD:
        len = snprintf(buf, n, "head");
        break;
    case DS_UNIT_ATTN:
        len = snprintf(buf, n, "attn[%u]", layer);
        break;
    case DS_UNIT_DENSE:
        len = snprintf(buf, n, "dense[%u]", layer);
        break;
    case DS_UNIT_SHARED:
        len = snprintf(buf, n, "shared[%u]", layer);
        break;
    case DS_UNIT_EXPERT:
        len = snprintf(buf, n, "expert[%u][%u]", layer, expert);
        break;
    default:
        return -EINVAL;
    }
    return len;
}

int ds_unit_parse(const char *s, enum ds_unit_kind *kind, uint32_t *layer, uint32_t *expert)
{
    static const struct {
        const char *prefix;
        enum ds_unit_kind kind;
        int n_index; /* bracketed indices that follow */
    } kinds[] = {
        {"embed", DS_UNIT_EMBED, 0}, {"head", DS_UNIT_HEAD, 0},     {"attn", DS_UNIT_ATTN, 1},
        {"dense", DS_UNIT_DENSE, 1}, {"shared", DS_UNIT_SHARED, 1}, {"expert", DS_UNIT_EXPERT, 2},
    };
    for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++) {
        size_t pl = strlen(kinds[k].prefix);
        if (strncmp(s, kinds[k].prefix, pl))
            continue;
        const char *p = s + pl;
        uint32_t idx[2] = {0, 0};
        for (int i = 0; i < kinds[k].n_index; i++) {
            if (*p++ != '[')
                return -EINVAL;
            /* decimal digits only: no sign, no space, no leading zero but "0" itself */
            if (*p < '0' || *p > '9' || (p[0] == '0' && p[1] != ']'))
                return -EINVAL;
            uint64_t v = 0;
            for (; *p >= '0' && *p <= '9'; p++)
                if ((v = v * 10 + (uint64_t)(*p - '0')) > UINT32_MAX)
                    return -EINVAL;
            if (*p++ != ']')
                return -EINVAL;
            idx[i] = (uint32_t)v;
        }
        if (*p)
            return -EINVAL;
        *kind = kinds[k].kind;
        *layer = idx[0];
        *expert = idx[1];
        return 0;
    }
    return -EINVAL;
}

int ds_unit_bytes_init(ds_unit_bytes *b, uint32_t n_layers)
{
    memset(b, 0, sizeof(*b));
    size_t n = n_layers ? n_layers : 1;
    uint64_t **arr[5] = {&b->attn, &b->router, &b->dense, &b->shared, &b->expert};
    for (int i = 0; i < 5; i++)
        if (!(*arr[i] = calloc(n, sizeof(uint64_t)))) {
            ds_unit_bytes_release(b);
            return -ENOMEM;
        }
    b->n_layers = n_layers;
    return 0;
}

void ds_unit_bytes_release(ds_unit_bytes *b)
{
    if (!b)
        return;
    free(b->attn);
    free(b->router);
    free(b->dense);
    free(b->shared);
    free(b->expert);
    memset(b, 0, sizeof(*b));
}

uint64_t ds_unit_bytes_total(const ds_unit_bytes *b, uint32_t n_experts)
{
    uint64_t t = b->embed + b->head;
    for (uint32_t l = 0; l < b->n_layers; l++)
        t += b->attn[l] + b->router[l] + b->dense[l] + b->shared[l] +
             (uint64_t)n_experts * b->expert[l];
    return t;
}
