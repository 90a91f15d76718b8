/* dsd_loop.h — the event loop's state and its subsystems (not a public header).
 *
 * The loop (dsd_main.c: lifecycle, sockets, signals, timers) owns one struct dsd; each
 * subsystem is a file that acts on it from the loop's thread:
 *   dsd_local.c    this node's devices (discovery, node class, backend ids)
 *   dsd_loader.c   this node's units of a plan opened on a thread of their own
 *   dsd_members.c  the coordinator's membership: hello, heartbeats,
 *                  load progress, worker statistics, node state
 *   dsd_rollout.c  plans: the solver thread, rollout to the workers, the coordinator's own
 *                  units, serving once every planned node has loaded
 *   dsd_clients.c  the client socket (submit/cancel to the scheduler, status, drain, replan)
 *                  and the scheduler's pipe back to the clients
 *   dsd_worker.c   a worker's side of the control socket: hello, plan load, streamed weights,
 *                  its statistics to the coordinator
 *   dsd_status.c   the node's state, the status documents (JSON at the client boundary) and
 *                  the cluster spec
 * Invariant: only the loop's thread touches struct dsd; the data thread is reached through
 * dsd_data_* (inproc pipes), the solver thread through its solve_job and eventfd. */
#ifndef DSD_LOOP_H
#define DSD_LOOP_H

#include <jansson.h>
#include <pthread.h>

#include "dsd.h"

#define MAX_NODES  64
#define SCHED_PIPE "inproc://dsd-sched"

typedef struct dsd_loader dsd_loader;

struct node {
    char name[64];
    char endpoint[DSD_STR_MAX];
    json_t *devices; /* array of device objects from the hello */
    uint64_t last_seen_ns;
    bool loaded, failed, drained, has_model_copy;
    json_t *stats;          /* the node's last StepStats, in dsd_data's "stats" form */
    dsd_stream_out *stream; /* its units' weights being streamed (no checkpoint copy) */
    uint64_t stream_acked;  /* bytes of them it acknowledged */
    char state[16];
    char klass[16];                    /* server | gpu | edge */
    uint8_t peer[DSD_MAX_PEER_ID + 1]; /* its control socket identity (name or name#instance) */
    size_t peer_len;
    char problem[512]; /* why it cannot host units (it said so, or its load failed), or "" */
};

/* The coordinator's state: membership, the plan and its rollout. */
struct dsd_coord {
    struct node nodes[MAX_NODES]; /* nodes[0] = self */
    uint32_t n_nodes;
    dsd_plan plan;
    bool have_plan, serving;
    uint64_t plan_due_ns;                 /* first plan once links are measured, or at this time */
    struct solve_job *solving;            /* a plan being made on the solver thread */
    bool rollout_again;                   /* membership changed while solving: plan again after */
    uint8_t replan_peer[DSD_MAX_PEER_ID]; /* the client waiting for `dsctl replan` */
    size_t replan_peer_len;
    uint64_t replan_req;
    bool replan_when_idle; /* nodes are up outside the plan: take them in when idle */
    char plan_error[512];  /* why the last plan failed ("" when it did not) */
    uint64_t retry_ns;     /* plan again at this time (the model could not be read) */
    struct refusal {
        char name[DSD_NODE_NAME_MAX];
        char reason[256];
        uint64_t at_ns;
    } refused[8]; /* the last hellos refused (duplicate name, other model, bad profile) */
    uint32_t n_refused;
};

/* A worker's state: its place in the cluster and the plan it loads. */
struct dsd_worker {
    bool welcomed;
    uint64_t last_coord_ns, last_hello_ns, hb_seq;
    uint32_t n_layers_hint;   /* layers of the model of the installed plan */
    dsd_stream_in *stream_in; /* without a checkpoint copy: weights being received */
    uint8_t *pending_plan;    /* the packed Plan envelope waiting for them */
    size_t pending_plan_len;
    char *load_json;        /* the plan being loaded: its JSON, written to state_dir once loaded */
    uint32_t load_layers;   /* and its layers (n_layers_hint once loaded) */
    char last_refusal[256]; /* the coordinator's last Error, logged once per reason */
    char load_token[DSD_TOKEN_LEN]; /* the data token of the plan being loaded */
    char plan_token[DSD_TOKEN_LEN]; /* and of the plan installed */
};

/* A piece of long work watched by dsd_progress.c (bytes, rate, when last logged/extended). */
struct dsd_progress {
    bool active;
    uint64_t done, total; /* bytes; total 0 when unknown */
    uint64_t t0_ns, last_ns, last_done, last_log_ns, last_extend_ns, last_status_ns;
    double rate; /* bytes per second, smoothed */
};

/* The loop's state. coord is used on the coordinator only, worker on a worker only. */
struct dsd {
    dsd_opts o, cli_o;
    const char *config_path;
    int argc;
    char **argv;
    bool coordinator, stopping;
    void *zctx, *data, *control, *client, *pipe, *spipe;
    dsd_data *dp; /* the data thread */
    int sigfd;
    char state[16];
    uint64_t plan_version;             /* the plan rolled out (coordinator) or installed (worker) */
    char model_digest[DSD_DIGEST_LEN]; /* this node's checkpoint copy (dsd_digest.c), or "" */
    char problem[512];                 /* why this node cannot host units, or "" */
    int lock_fd;                       /* state_dir/dsd.lock, held while running */
    char instance[DSD_TOKEN_LEN];      /* this process: random at start (status "instance") */
    uint64_t last_hb_ns, last_wd_ns, wd_usec;
    uint64_t last_loop_ns; /* the timers' last run: a longer gap is a stall of this process */
    dsd_loader *loading;   /* this node's units of a plan being opened on the loader thread */
    struct dsd_coord coord;
    struct dsd_worker worker;
    struct dsd_progress progress_load, progress_stream;
};

/* A plan being made. The placement solver runs on its own thread (the exact MILP can take
 * seconds), so the loop keeps heartbeating meanwhile; it signals `efd` when done. */
struct solve_job {
    pthread_t th;
    int efd;
    ds_model *probe; /* the model's shape (units unbound: no weights) */
    uint32_t n;
    char (*names)[64];
    char (*eps)[DSD_STR_MAX];
    char *spec;
    double *stats;       /* [L * E] routing counts measured so far, or NULL (uniform popularity) */
    ds_unit_bytes bytes; /* each unit's real bytes from the model file's tensor table */
    char strategy[32];
    char pins[1024]; /* plan_pin */
    uint32_t batch, ctx;
    uint64_t version;
    dsd_plan plan;
    int rc;
    ds_error err;
};

/* ---- dsd_loader.c ---- */
/* Opens node self's units of plan p (copied) from model_dir on a thread of its own; the
 * loop polls dsd_loader_fd and, once dsd_loader_done, takes the units. */
int dsd_loader_start(const char *model_dir, const dsd_plan *p, uint32_t self, uint32_t threads,
                     uint32_t max_context, dsd_loader **ret, ds_error *err);
int dsd_loader_fd(const dsd_loader *l);
/* Whether the thread has signalled (reads the signal). */
bool dsd_loader_done(dsd_loader *l);
const dsd_plan *dsd_loader_plan(const dsd_loader *l);
uint32_t dsd_loader_self(const dsd_loader *l);
/* Joins the thread; the units (ownership passes to *host) or why they could not be opened. */
int dsd_loader_take(dsd_loader *l, dsd_host **host, ds_error *err);
/* Joins the thread and hands the units with l's plan to the data thread (install), or frees
 * them (a stale load); the open's or the install's error. */
int dsd_loader_finish(dsd_loader *l, dsd_data *dp, bool install, ds_error *err);
/* Bytes of the units' tensors paged in so far and in all (0 until known). Any thread. */
void dsd_loader_progress(const dsd_loader *l, uint64_t *done, uint64_t *total);
/* Joins (an open cannot be interrupted) and frees what was not taken. NULL-safe. */
dsd_loader *dsd_loader_free(dsd_loader *l);

/* ---- dsd_local.c ---- */
/* Discovers (and, when asked, calibrates) this node's devices (once, at start). */
void dsd_local_devices_discover(const dsd_opts *o);
/* This node's devices in cluster-spec form (caller owns the reference). */
json_t *dsd_local_devices(void);
const char *dsd_local_node_class(void);
/* The backend spec (ds_backend_open's "opencl:1") of this node's device `name`, as discovery
 * found it; -ENOENT for a device this node does not have. Thread-safe after discovery. */
int dsd_local_backend_spec(const char *name, char *spec, size_t n);

/* ---- dsd_members.c ---- */
void dsd_local_devices_free(void);
struct node *dsd_members_find(struct dsd *d, const char *name, size_t len);
/* The member whose control socket identity is peer, or NULL. */
struct node *dsd_members_find_peer(struct dsd *d, const void *peer, size_t len);
/* Sends env to member n on the control socket (by its socket identity). */
int dsd_members_send(struct dsd *d, const struct node *n, Dsd__Envelope *env);
/* Whether member n may be given units: up, not drained, nothing wrong with it. */
static inline bool dsd_members_plannable(const struct node *n)
{
    return !n->failed && !n->drained && !n->problem[0];
}
/* Coordinator: one message on the control socket. */
void dsd_members_on_control(struct dsd *d);
/* Coordinator: the links to every live node are measured (or nothing to wait for). */
bool dsd_members_links_measured(struct dsd *d);

/* ---- dsd_rollout.c ---- */
/* The coordinator's units are open on the loader: install them, serve when all have loaded. */
void dsd_rollout_on_loaded(struct dsd *d);
void dsd_rollout_solve_free(struct solve_job *j);
void dsd_rollout_replan_reply(struct dsd *d, int rc);
int dsd_rollout_start(struct dsd *d);
void dsd_rollout_on_solved(struct dsd *d);
void dsd_rollout_maybe_serve(struct dsd *d);
bool dsd_rollout_plan_has(struct dsd *d, const char *name);
size_t dsd_loop_jobs_running(struct dsd *d);

/* ---- dsd_status.c ---- */
/* Sets the node's state (sd_notify STATUS, log line) when it changed. */
void dsd_loop_set_state(struct dsd *d, const char *st);
json_t *dsd_status_cluster_spec(struct dsd *d, bool planned_only);
json_t *dsd_status_data(struct dsd *d, const char *what);
json_t *dsd_status_measured(struct dsd *d);
/* The status document `what` (malloc'd JSON); NULL with *code set for an unknown one. */
char *dsd_status_json(struct dsd *d, const char *what, int *code);
void dsd_status_reply(void *sock, const void *peer, size_t pl, uint64_t req, const char *json);

/* ---- dsd_progress.c ---- */
/* Loading and streaming progress: STATUS, the journal, EXTEND_TIMEOUT_USEC (from the timer). */
void dsd_progress_tick(struct dsd *d);
/* {"loading": {...}, "streaming": {...}} of the work under way, or NULL when none. */
json_t *dsd_progress_json(struct dsd *d);

/* ---- dsd_clients.c ---- */
void dsd_clients_on_request(struct dsd *d);
void dsd_clients_on_pipe(struct dsd *d);

/* ---- dsd_worker.c ---- */
void dsd_worker_hello(struct dsd *d);
void dsd_worker_on_control(struct dsd *d);
void dsd_worker_send_stats(struct dsd *d);
/* The worker's units are open on the loader: install them, tell the coordinator. */
void dsd_worker_on_loaded(struct dsd *d);

#endif
