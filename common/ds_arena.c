/* ds_arena.c — bump allocator; see ds_arena.h. Blocks form a singly linked list. */
#include "ds_arena.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct block {
    struct block *next;
    size_t size; /* usable bytes after the header */
    size_t used;
    _Alignas(16) unsigned char data[];
};

struct ds_arena {
    struct block *head;
    size_t block_bytes;
    size_t limit_bytes;
    size_t total; /* bytes handed out */
};

ds_arena *ds_arena_new(size_t block_bytes, size_t limit_bytes)
{
    ds_arena *a = calloc(1, sizeof(*a));
    if (!a)
        return NULL;
    a->block_bytes = block_bytes < 4096 ? 4096 : block_bytes;
    a->limit_bytes = limit_bytes;
    return a;
}

ds_arena *ds_arena_free(ds_arena *a)
{
    if (!a)
        return NULL;
    for (struct block *b = a->head, *n; b; b = n) {
        n = b->next;
        free(b);
    }
    free(a);
    return NULL;
}

void *ds_arena_alloc(ds_arena *a, size_t bytes)
{
    if (!a || bytes > SIZE_MAX - 32)
        return NULL;
    size_t need = (bytes + 15) & ~(size_t)15;
    if (a->limit_bytes && (need > a->limit_bytes || a->total > a->limit_bytes - need))
        return NULL;
    struct block *b = a->head;
    if (!b || b->size - b->used < need) {
        size_t sz = need > a->block_bytes ? need : a->block_bytes;
        b = malloc(sizeof(*b) + sz);
        if (!b)
            return NULL;
        b->size = sz;
        b->used = 0;
        b->next = a->head;
        a->head = b;
    }
    void *p = b->data + b->used;
    b->used += need;
    a->total += need;
    memset(p, 0, need);
    return p;
}

char *ds_arena_strdup(ds_arena *a, const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = ds_arena_alloc(a, n);
    if (p)
        memcpy(p, s, n);
    return p;
}

size_t ds_arena_used(const ds_arena *a)
{
    return a ? a->total : 0;
}
