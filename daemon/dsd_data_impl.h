/* dsd_data_impl.h — the data plane's state, shared by its files (not a public header):
 *   dsd_data.c   the thread, its control pipe from the loop, plan install, the scheduler's
 *                port and the client pipe, this node's measurements
 *   dsd_chain.c  micro-batches at this node: the layer step over the layers hosted here, the
 *                expert runner that dispatches to the expert hosts, the combine replies, the
 *                step and dispatch requests other nodes send
 *   dsd_links.c  a DEALER per peer, link calibration, probe echoes
 * Only the data thread touches struct dsd_data (the snapshots under mu excepted). */
#ifndef DSD_DATA_IMPL_H
#define DSD_DATA_IMPL_H

#include <pthread.h>

#include "dsd.h"
#include "dsd_sched.h"

#define DATA_CTL_EP   "inproc://dsd-data-ctl"
#define MAX_TASKS     64u
#define MAX_PEERS     64u
#define CAL_PINGS     16
#define CAL_BW_ROUNDS 4
#define CAL_BW_FLOATS (256u * 1024u)

struct peer {
    char name[64];
    char endpoint[DSD_STR_MAX];
    void *sock; /* DEALER */
    /* calibration state: probes sent so far, the outstanding probe's id and send time */
    int cal_round;
    bool cal_done, cal_failed;
    uint64_t cal_req, cal_sent_ns;
    double cal_best, cal_bw;
    /* traffic from this node to the peer */
    double rtt_s, compute_s; /* dispatch round trips, and the peer's compute inside them */
    uint64_t messages, bytes, forwards, forward_bytes;
};

struct task {
    bool used;
    dsd_data *d; /* the data plane (the expert runner's context is the task) */
    uint64_t rid, step;
    uint32_t mb, layer, n;
    uint64_t *seq;
    uint32_t *pos;
    int *slots;        /* [n] the rows' slots in the host's sequence table */
    ds_layer_step *st; /* the rows' hidden state and the layer being run (experts/ds_layer.h) */
    double local_s;    /* expert compute run here during the layer being run */
    /* dispatch bookkeeping, per plan node */
    uint64_t *dreq;  /* request id of the dispatch awaiting a reply; 0 = none */
    uint64_t *dsent; /* send time */
    uint32_t *doff;  /* [N+1] offsets into dslot */
    uint32_t *dslot; /* [n*K] slot of each pair, grouped by node */
    uint32_t pending;
    uint64_t deadline;
};

struct dsd_data {
    pthread_t th;
    bool started;
    void *zctx, *router, *ctl, *loop_ctl, *spipe;
    dsd_opts o;
    bool coordinator;
    /* the installed plan */
    dsd_plan plan;
    bool have_plan;
    uint32_t self;
    dsd_host *host;
    const ds_model_config *c;
    int32_t *peer_of; /* [plan.n_nodes] index into peers, -1 for self */
    struct peer peers[MAX_PEERS];
    uint32_t n_peers;
    struct task tasks[MAX_TASKS];
    uint64_t next_req;
    uint64_t *expert_counts; /* [L*E] rows routed from the attention layers hosted here */
    dsd_sched *sched;        /* coordinator: jobs and micro-batches */
    pthread_mutex_t mu;
    char *stats_json, *jobs_json;
    uint32_t jobs_running; /* the scheduler's running jobs, as last published */
    uint64_t last_publish_ns;
    bool dirty;
    uint64_t refused_nonmember;   /* data-plane requests refused: not from a plan member */
    uint64_t last_refusal_log_ns; /* when one was last logged */
};

/* ---- dsd_data.c ---- */
/* Answers (and counts) a data-plane request that does not carry the plan's token. */
void dsd_data_refuse_nonmember(dsd_data *d, dsd_msg *m);

/* ---- dsd_links.c ---- */
/* The peer at endpoint (added, connected and calibrated when new; renamed when known). NULL
 * when the table is full or the connect fails. */
struct peer *dsd_links_add(dsd_data *d, const char *name, const char *endpoint);
/* The peer of plan node `node`, NULL for this node or an unknown one. */
struct peer *dsd_links_of_node(dsd_data *d, uint32_t node);
/* Sends on a peer's DEALER (dsd_send, takes the frames), counting its bytes. */
int dsd_links_send(dsd_data *d, struct peer *p, Dsd__Envelope *env, void **fr, const size_t *sz,
                   uint32_t n);
/* A calibration probe came back from p. */
void dsd_links_on_probe_reply(dsd_data *d, struct peer *p);
/* Echoes a peer's LinkProbe on the data ROUTER. */
void dsd_links_serve_probe(dsd_data *d, dsd_msg *m);
void dsd_links_expire(dsd_data *d, uint64_t now);

/* ---- dsd_chain.c ---- */
void dsd_chain_task_free(struct task *t);
/* Starts micro-batch rid at this node (the scheduler's launch). */
int dsd_chain_launch(dsd_data *d, uint64_t rid, uint64_t step, uint32_t mb, uint32_t n,
                     const uint64_t *seq, const uint32_t *pos, const float *x, ds_error *err);
/* Frees a sequence's KV caches on every node (CANCEL, fire and forget). */
void dsd_chain_release(dsd_data *d, uint64_t seq);
void dsd_chain_serve_step(dsd_data *d, dsd_msg *m);
void dsd_chain_serve_dispatch(dsd_data *d, dsd_msg *m);
/* A reply on the DEALER to peer pi: a dispatch's combine, a probe echo, or an error. */
void dsd_chain_on_peer(dsd_data *d, uint32_t pi);
void dsd_chain_expire(dsd_data *d, uint64_t now);

#endif
