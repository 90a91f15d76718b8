/* ds_pool.c — see ds_pool.h. Work is handed out by an atomic counter; a generation number
 * wakes the workers for each ds_pool_run, and a pending count tells the caller when all
 * indices have finished. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "ds_pool.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <unistd.h>

struct ds_pool {
    uint32_t n_threads;       /* workers + the caller */
    pthread_t *threads;       /* n_threads - 1 */
    pthread_mutex_t run_lock; /* serialises ds_pool_run callers */
    pthread_mutex_t lock;     /* guards gen, stop, active */
    pthread_cond_t wake;      /* workers wait here for a new generation */
    pthread_cond_t done;      /* the caller waits here for active == 0 */
    uint64_t gen;             /* incremented per ds_pool_run */
    bool stop;
    uint32_t active; /* workers still inside the current generation */
    ds_pool_fn fn;
    void *ctx;
    uint32_t n;       /* indices in the current run */
    atomic_uint next; /* next index to hand out */
};

static void pool_drain(ds_pool *p)
{
    for (;;) {
        uint32_t i = atomic_fetch_add(&p->next, 1);
        if (i >= p->n)
            break;
        p->fn(p->ctx, i);
    }
}

/* Decode issues thousands of short parallel loops per second; a worker that polls for a
 * while before sleeping avoids a futex wake-up per loop. */
#define POOL_SPIN 20000

static inline void pool_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *pool_worker(void *arg)
{
    ds_pool *p = arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&p->lock);
    for (;;) {
        if (!p->stop && atomic_load(&p->gen) == seen) {
            pthread_mutex_unlock(&p->lock);
            for (int i = 0; i < POOL_SPIN && atomic_load(&p->gen) == seen; i++)
                pool_relax();
            pthread_mutex_lock(&p->lock);
        }
        while (!p->stop && p->gen == seen)
            pthread_cond_wait(&p->wake, &p->lock);
        if (p->stop)
            break;
        seen = p->gen;
        pthread_mutex_unlock(&p->lock);
        pool_drain(p);
        pthread_mutex_lock(&p->lock);
        if (--p->active == 0)
            pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

int ds_pool_new(uint32_t n_threads, const int *cpus, uint32_t n_cpus, ds_pool **ret)
{
    if (n_threads == 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = c > 0 ? (uint32_t)c : 1;
    }
    if (n_threads > 1024)
        return -ERANGE;
    ds_pool *p = calloc(1, sizeof(*p));
    if (!p)
        return -ENOMEM;
    p->n_threads = n_threads;
    pthread_mutex_init(&p->run_lock, NULL);
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    atomic_init(&p->next, 0);
    if (n_threads > 1) {
        p->threads = calloc(n_threads - 1, sizeof(*p->threads));
        if (!p->threads) {
            free(p);
            return -ENOMEM;
        }
    }
    for (uint32_t t = 0; t + 1 < n_threads; t++) {
        int rc = pthread_create(&p->threads[t], NULL, pool_worker, p);
        if (rc) {
            p->n_threads = t + 1;
            ds_pool_free(p);
            return -rc;
        }
        if (cpus && n_cpus) {
            cpu_set_t set;
            CPU_ZERO(&set);
            int cpu = cpus[(t + 1) % n_cpus];
            if (cpu >= 0 && cpu < CPU_SETSIZE) {
                CPU_SET(cpu, &set);
                /* Pinning is best effort: a cgroup may forbid the CPU; work still runs. */
                (void)pthread_setaffinity_np(p->threads[t], sizeof(set), &set);
            }
        }
    }
    *ret = p;
    return 0;
}

ds_pool *ds_pool_free(ds_pool *p)
{
    if (!p)
        return NULL;
    pthread_mutex_lock(&p->lock);
    p->stop = true;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    for (uint32_t t = 0; t + 1 < p->n_threads; t++)
        pthread_join(p->threads[t], NULL);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->lock);
    pthread_mutex_destroy(&p->run_lock);
    free(p->threads);
    free(p);
    return NULL;
}

uint32_t ds_pool_size(const ds_pool *p)
{
    return p ? p->n_threads : 1;
}

void ds_pool_run(ds_pool *p, uint32_t n, ds_pool_fn fn, void *ctx)
{
    if (!p || p->n_threads == 1 || n <= 1) {
        for (uint32_t i = 0; i < n; i++)
            fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&p->run_lock);
    pthread_mutex_lock(&p->lock);
    p->fn = fn;
    p->ctx = ctx;
    p->n = n;
    atomic_store(&p->next, 0);
    p->active = p->n_threads - 1;
    p->gen++;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    pool_drain(p);
    pthread_mutex_lock(&p->lock);
    while (p->active)
        pthread_cond_wait(&p->done, &p->lock);
    pthread_mutex_unlock(&p->lock);
    pthread_mutex_unlock(&p->run_lock);
}
