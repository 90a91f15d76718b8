/* ds_pool.h — a fixed-size thread pool for data-parallel loops ("parallel for").
 *
 * ds_pool_run(pool, n, fn, ctx) calls fn(ctx, i) for every i in [0, n) across the pool's
 * threads plus the caller and returns when all are done. Which thread runs which i is not
 * fixed, so callers must make fn(ctx, i) write only to outputs owned by index i: that keeps
 * results independent of the thread count (the engine's bit-identity invariant relies on it).
 * Concurrent ds_pool_run calls on one pool are serialised. Threads may be pinned to a CPU set
 * (the cores of one device). */
#ifndef DS_POOL_H
#define DS_POOL_H

#include <stddef.h>
#include <stdint.h>

typedef struct ds_pool ds_pool;

typedef void (*ds_pool_fn)(void *ctx, uint32_t i);

/* Creates a pool of n_threads workers in all (the caller of ds_pool_run counts as one, so
 * n_threads - 1 threads are started; 0 means the number of online CPUs). cpus, when not NULL,
 * lists n_cpus CPU ids the workers are pinned to (round robin). */
int ds_pool_new(uint32_t n_threads, const int *cpus, uint32_t n_cpus, ds_pool **ret);

/* Stops and joins the workers. NULL-safe; returns NULL. */
ds_pool *ds_pool_free(ds_pool *pool);

/* Number of threads that run work (workers + caller); 1 for a NULL pool. */
uint32_t ds_pool_size(const ds_pool *pool);

/* Runs fn(ctx, i) for i in [0, n). A NULL pool runs them in order on the caller. */
void ds_pool_run(ds_pool *pool, uint32_t n, ds_pool_fn fn, void *ctx);

#endif
