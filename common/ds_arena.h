/* ds_arena.h — a bump allocator for many small allocations with one lifetime (a parsed config,
 * one request). Allocations are 16-byte aligned and zeroed; everything is freed at once. */
#ifndef DS_ARENA_H
#define DS_ARENA_H

#include <stddef.h>

typedef struct ds_arena ds_arena;

/* Creates an arena that grows in blocks of at least block_bytes and refuses to hold more than
 * limit_bytes in all (0 = no limit). Returns NULL on out-of-memory. Caller frees. */
ds_arena *ds_arena_new(size_t block_bytes, size_t limit_bytes);
ds_arena *ds_arena_free(ds_arena *a);

/* Zeroed, 16-byte aligned; NULL when out of memory or past the limit. Owned by the arena. */
void *ds_arena_alloc(ds_arena *a, size_t bytes);
char *ds_arena_strdup(ds_arena *a, const char *s);
/* Bytes handed out so far. */
size_t ds_arena_used(const ds_arena *a);

#endif
