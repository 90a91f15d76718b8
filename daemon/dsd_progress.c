/* dsd_progress.c — long work made visible: this node's units being opened and paged in (the
 * loader), and weights being streamed (the coordinator: to every node without a checkpoint
 * copy, as they acknowledge; a worker: as it receives). Ticked from the loop's timer; reports
 * bytes done / total and the rate in the status document (`dsctl status`, /health), in the
 * journal every few seconds, in systemd's STATUS line, and extends the unit's start timeout
 * (EXTEND_TIMEOUT_USEC) while the bytes keep moving, so a coordinator paging in a large model
 * is not killed by its own TimeoutStartSec, and one that is stuck still is. */
#include <stdio.h>
#include <string.h>

#include "ds_log.h"
#include "dsd_loop.h"

#define LOG_EVERY_NS    (5ull * 1000000000ull)
#define EXTEND_WINDOW_S 60 /* each extension: a minute from now, sent while bytes move */

static void human(double b, char *out, size_t n)
{
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int i = 0;
    while (b >= 1024 && i < 4) {
        b /= 1024;
        i++;
    }
    snprintf(out, n, i ? "%.1f %s" : "%.0f %s", b, u[i]);
}

/* One sample of a piece of work; done == total == 0 and !running ends it. */
static void update(struct dsd *d, struct dsd_progress *p, const char *what, bool running,
                   uint64_t done, uint64_t total, uint64_t now)
{
    char a[32], b[32], r[32];
    if (!running) {
        if (p->active) {
            human((double)p->done, a, sizeof(a));
            ds_log_notice("%s: %s done in %.1f s", what, a, (double)(now - p->t0_ns) / 1e9);
        }
        memset(p, 0, sizeof(*p));
        return;
    }
    if (!p->active) {
        memset(p, 0, sizeof(*p));
        p->active = true;
        p->t0_ns = p->last_ns = p->last_log_ns = now;
        p->last_status_ns = 0;
    }
    if (now - p->last_ns >= 1000000000ull) { /* the rate over the last second or more */
        double inst = (double)(done - (done >= p->last_done ? p->last_done : done)) /
                      ((double)(now - p->last_ns) / 1e9);
        p->rate = p->rate > 0 ? 0.5 * p->rate + 0.5 * inst : inst;
        p->last_ns = now;
        p->last_done = done;
    }
    bool moved = done != p->done;
    p->done = done;
    p->total = total;
    human((double)done, a, sizeof(a));
    human((double)total, b, sizeof(b));
    human(p->rate, r, sizeof(r));
    double pct = total ? 100.0 * (double)done / (double)total : 0;
    if (now - p->last_log_ns >= LOG_EVERY_NS || (total && done == total && moved)) {
        p->last_log_ns = now;
        if (total)
            ds_log_notice("%s: %s of %s (%.0f%%: %llu of %llu bytes), %s/s", what, a, b, pct,
                          (unsigned long long)done, (unsigned long long)total, r);
        else
            ds_log_notice("%s: %s, %s/s", what, a, r);
    }
    /* the loop ticks on every message: STATUS at most every 0.2 s, and at 100 % */
    if (now - p->last_status_ns >= 200000000ull || (total && done == total && moved)) {
        p->last_status_ns = now;
        if (total)
            dsd_notify("STATUS=%s: %s %.0f%% (%s of %s, %s/s)", d->state, what, pct, a, b, r);
        else
            dsd_notify("STATUS=%s: %s %s (%s/s)", d->state, what, a, r);
    }
    if (moved && now - p->last_extend_ns >= 1000000000ull) {
        p->last_extend_ns = now;
        dsd_notify("EXTEND_TIMEOUT_USEC=%llu", (unsigned long long)EXTEND_WINDOW_S * 1000000ull);
    }
}

void dsd_progress_tick(struct dsd *d)
{
    uint64_t now = dsd_now_ns(), done = 0, total = 0;
    bool loading = d->loading != NULL;
    if (loading)
        dsd_loader_progress(d->loading, &done, &total);
    update(d, &d->progress_load, "paging in weights", loading && total, done, total, now);
    bool streaming = false;
    done = total = 0;
    if (d->coordinator) {
        for (uint32_t i = 1; i < d->coord.n_nodes; i++) {
            struct node *n = &d->coord.nodes[i];
            if (!n->stream || n->failed)
                continue;
            streaming = true;
            total += dsd_stream_out_total(n->stream);
            done += n->stream_acked;
        }
    } else if (d->worker.stream_in) {
        streaming = true;
        done = dsd_stream_in_bytes(d->worker.stream_in);
    }
    update(d, &d->progress_stream,
           d->coordinator ? "streaming weights to nodes" : "receiving weights", streaming, done,
           total, now);
}

static json_t *one(const struct dsd_progress *p)
{
    return json_pack("{s:I,s:I,s:f,s:f}", "bytes_done", (json_int_t)p->done, "bytes_total",
                     (json_int_t)p->total, "bytes_per_s", p->rate, "seconds",
                     (double)(dsd_now_ns() - p->t0_ns) / 1e9);
}

json_t *dsd_progress_json(struct dsd *d)
{
    if (!d->progress_load.active && !d->progress_stream.active)
        return NULL;
    json_t *o = json_object();
    if (d->progress_load.active)
        json_object_set_new(o, "loading", one(&d->progress_load));
    if (d->progress_stream.active)
        json_object_set_new(o, "streaming", one(&d->progress_stream));
    return o;
}
