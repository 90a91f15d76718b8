/* dsd_loader.c — a plan's units opened off the event loop's thread.
 *
 * Opening a node's units maps the checkpoint, checks every bound tensor and uploads experts to
 * the accelerators the plan names: seconds on a real model. On the loop's thread that would
 * stop heartbeats (a worker would lose the coordinator, the coordinator its workers, and a
 * slow install trigger rollout after rollout). A loader does it on its own thread with its
 * own copy of the plan and signals an eventfd the loop polls; the loop then hands the units
 * to the data thread (dsd_data_install, quick). */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "ds_log.h"
#include "dsd_loop.h"

struct dsd_loader {
    pthread_t th;
    bool started;
    int efd;
    char model_dir[PATH_MAX];
    dsd_plan plan; /* a copy */
    uint32_t self, threads, max_context;
    dsd_host *host; /* the result, until taken */
    int rc;
    ds_error err;
    _Atomic uint64_t paged, to_page; /* bytes of the units' tensors paged in, in all */
};

/* Touches every page of the tensors the units read, so the weights are in memory before the
 * node serves (the mapping is lazy: otherwise the first tokens would page them in from disk),
 * counting the bytes for dsd_loader_progress. A GGUF model cannot list them yet: skipped. */
static void page_in(dsd_loader *l)
{
    const ds_st_tensor **ts;
    size_t n;
    if (ds_model_tensors_used(dsd_host_model(l->host), &ts, &n) < 0)
        return;
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += ts[i]->nbytes;
    atomic_store(&l->to_page, total);
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *p = ts[i]->data;
        for (uint64_t off = 0; off < ts[i]->nbytes; off += 4096)
            sink ^= p[off];
        atomic_fetch_add(&l->paged, ts[i]->nbytes);
    }
    (void)sink;
    free(ts);
}

static void *loader_main(void *arg)
{
    dsd_loader *l = arg;
    dsd_units u;
    l->rc = dsd_plan_units_of(&l->plan, l->self, &u);
    if (l->rc < 0) {
        ds_error_set(&l->err, l->rc, "out of memory");
    } else {
        /* the accelerators the plan names, by the ids this node's discovery gave them */
        for (uint32_t i = 1; i < DSD_MAX_DEVNAMES && u.dev_names[i][0]; i++)
            if (dsd_local_backend_spec(u.dev_names[i], u.dev_specs[i], sizeof(u.dev_specs[i])) < 0)
                u.dev_specs[i][0] = 0;
        l->rc = dsd_host_new(l->model_dir, &u, l->threads, l->max_context, &l->host, &l->err);
        dsd_units_clear(&u);
        if (l->rc == 0)
            page_in(l);
    }
    uint64_t one = 1;
    if (write(l->efd, &one, sizeof(one)) != sizeof(one))
        ds_log_err("loader: cannot signal the loop");
    return NULL;
}

int dsd_loader_start(const char *model_dir, const dsd_plan *p, uint32_t self, uint32_t threads,
                     uint32_t max_context, dsd_loader **ret, ds_error *err)
{
    dsd_loader *l = calloc(1, sizeof(*l));
    if (!l)
        return ds_error_set(err, -ENOMEM, "out of memory");
    l->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    snprintf(l->model_dir, sizeof(l->model_dir), "%s", model_dir);
    l->self = self;
    l->threads = threads;
    l->max_context = max_context;
    int rc = l->efd < 0 ? ds_error_set(err, -errno, "loader: eventfd: %s", strerror(errno)) : 0;
    if (rc == 0 && dsd_plan_copy(&l->plan, p) < 0)
        rc = ds_error_set(err, -ENOMEM, "out of memory");
    if (rc == 0 && pthread_create(&l->th, NULL, loader_main, l) != 0)
        rc = ds_error_set(err, -EAGAIN, "cannot start the loader thread");
    if (rc < 0) {
        dsd_loader_free(l);
        return rc;
    }
    l->started = true;
    *ret = l;
    return 0;
}

void dsd_loader_progress(const dsd_loader *l, uint64_t *done, uint64_t *total)
{
    *done = atomic_load(&((dsd_loader *)l)->paged);
    *total = atomic_load(&((dsd_loader *)l)->to_page);
}

int dsd_loader_fd(const dsd_loader *l)
{
    return l ? l->efd : -1;
}

const dsd_plan *dsd_loader_plan(const dsd_loader *l)
{
    return &l->plan;
}

uint32_t dsd_loader_self(const dsd_loader *l)
{
    return l->self;
}

bool dsd_loader_done(dsd_loader *l)
{
    uint64_t v;
    return l && read(l->efd, &v, sizeof(v)) == sizeof(v);
}

int dsd_loader_take(dsd_loader *l, dsd_host **host, ds_error *err)
{
    if (l->started) {
        pthread_join(l->th, NULL);
        l->started = false;
    }
    if (l->rc < 0) {
        *err = l->err;
        return l->rc;
    }
    *host = l->host;
    l->host = NULL;
    return 0;
}

int dsd_loader_finish(dsd_loader *l, dsd_data *dp, bool install, ds_error *err)
{
    dsd_host *h = NULL;
    int rc = dsd_loader_take(l, &h, err);
    if (rc < 0)
        return rc;
    if (!install) {
        dsd_host_free(h);
        return 0;
    }
    return dsd_data_install(dp, &l->plan, l->self, h, err); /* takes h, also on error */
}

dsd_loader *dsd_loader_free(dsd_loader *l)
{
    if (!l)
        return NULL;
    if (l->started)
        pthread_join(l->th, NULL); /* an open has no cancellation point: wait for it */
    dsd_host_free(l->host);
    dsd_plan_clear(&l->plan);
    if (l->efd >= 0)
        close(l->efd);
    free(l);
    return NULL;
}
