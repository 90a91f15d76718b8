/* dsd_data.c — a node's data plane: the thread that owns the data ROUTER, the node's units
 * (dsd_host) and a DEALER to every other node, and moves token batches through the cluster.
 *
 * A micro-batch travels as a chain, the way docs/architecture.md draws a decode step:
 *   scheduler (coordinator) embeds -> STEP to the host of attn[0]
 *   attention host: for each consecutive layer it hosts: attention + router (+ shared/dense
 *     beside it) -> one DISPATCH per expert-hosting node with the rows routed there, their
 *     expert ids and weights (experts it hosts itself run in place) -> the unweighted expert
 *     rows come back (COMBINE) -> ds_moe_combine in the router's slot order -> next layer
 *   when the next layer lives elsewhere: STEP to that node; after the last layer: STEP
 *     "head" to the coordinator, whose scheduler samples.
 * The coordinator is no longer a hop of every layer: a plan whose attention layers sit in
 * contiguous runs costs one hop per run plus one round trip per expert host per MoE layer.
 *
 * Nothing blocks: a task (one micro-batch at this node) waiting for expert replies is parked
 * and the thread keeps serving other nodes' dispatches and other micro-batches, so several
 * micro-batches can be in flight and two attention hosts that host each other's experts do
 * not deadlock. Every message carries the request id the scheduler gave the micro-batch
 * (request_id), so a failure anywhere is reported to the coordinator as an Error with that id
 * and the scheduler fails exactly the jobs of that micro-batch.
 *
 * Combining unweighted rows in slot order at the attention host (rather than partial sums at
 * the expert host, as docs/architecture.md first sketched) keeps the floating-point order of
 * the single-process engine, so the cluster stays token-identical to `dsctl generate --local`
 * (ds_model.h, bit-identity invariant); the cost is k rows back per token instead of one per
 * expert host.
 *
 * Link calibration (latency from 16 empty round trips, bandwidth from 1 MiB echoes) runs per
 * peer as replies arrive, also without blocking. */
#include <math.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "ds_experts.h"
#include "ds_log.h"
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
    uint64_t *dreq;     /* request id of the dispatch awaiting a reply; 0 = none */
    uint64_t *dsent;    /* send time */
    uint32_t *doff;     /* [N+1] offsets into dslot */
    uint32_t *dslot;    /* [n*K] slot of each pair, grouped by node */
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
};

/* ---- peers -------------------------------------------------------------------------------- */

static void cal_send(dsd_data *d, struct peer *p);

static struct peer *peer_add(dsd_data *d, const char *name, const char *endpoint)
{
    for (uint32_t i = 0; i < d->n_peers; i++)
        if (!strcmp(d->peers[i].endpoint, endpoint)) {
            snprintf(d->peers[i].name, sizeof(d->peers[i].name), "%s", name);
            return &d->peers[i];
        }
    if (d->n_peers >= MAX_PEERS)
        return NULL;
    struct peer *p = &d->peers[d->n_peers];
    memset(p, 0, sizeof(*p));
    snprintf(p->name, sizeof(p->name), "%s", name);
    snprintf(p->endpoint, sizeof(p->endpoint), "%s", endpoint);
    p->sock = zmq_socket(d->zctx, ZMQ_DEALER);
    int zero = 0, hwm = 0;
    zmq_setsockopt(p->sock, ZMQ_LINGER, &zero, sizeof(zero));
    /* never drop or block on a slow peer: messages queue until the link takes them */
    zmq_setsockopt(p->sock, ZMQ_SNDHWM, &hwm, sizeof(hwm));
    zmq_setsockopt(p->sock, ZMQ_RCVHWM, &hwm, sizeof(hwm));
    if (dsd_curve_client(p->sock) < 0 || zmq_connect(p->sock, endpoint) < 0) {
        ds_log_err("data: connect %s (%s): %s", endpoint, name, zmq_strerror(zmq_errno()));
        zmq_close(p->sock);
        return NULL;
    }
    p->cal_best = 1e9;
    d->n_peers++;
    cal_send(d, p);
    return p;
}

static struct peer *node_peer(dsd_data *d, uint32_t node)
{
    if (node >= d->plan.n_nodes || d->peer_of[node] < 0)
        return NULL;
    return &d->peers[d->peer_of[node]];
}

static int peer_send(dsd_data *d, struct peer *p, Dsd__Envelope *env, void **fr, const size_t *sz,
                     uint32_t n)
{
    size_t bytes = 0;
    for (uint32_t i = 0; i < n; i++)
        bytes += sz[i];
    p->bytes += bytes;
    d->dirty = true;
    return dsd_send(p->sock, NULL, 0, env, fr, sz, n);
}

/* ---- link calibration --------------------------------------------------------------------- */

static void cal_send(dsd_data *d, struct peer *p)
{
    bool big = p->cal_round >= CAL_PINGS;
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__LinkProbe lp = DSD__LINK_PROBE__INIT;
    Dsd__TensorDesc td, *tdp = &td;
    uint32_t shp[2];
    size_t sz = CAL_BW_FLOATS * sizeof(float);
    void *fr = big ? calloc(1, sz) : NULL;
    if (big && !fr) {
        p->cal_failed = true;
        return;
    }
    dsd_tensor_desc(&td, shp, DSD__DTYPE__DTYPE_F32, 1, CAL_BW_FLOATS);
    lp.seq = (uint64_t)p->cal_round;
    lp.sent_ns = p->cal_sent_ns = dsd_now_ns();
    env.request_id = p->cal_req = ++d->next_req;
    env.body_case = DSD__ENVELOPE__BODY_LINK_PROBE;
    env.link_probe = &lp;
    if (big) {
        env.n_tensors = 1;
        env.tensors = &tdp;
    }
    dsd_send(p->sock, NULL, 0, &env, big ? &fr : NULL, &sz, big ? 1 : 0);
}

static void cal_reply(dsd_data *d, struct peer *p)
{
    double dt = (double)(dsd_now_ns() - p->cal_sent_ns) * 1e-9;
    bool big = p->cal_round >= CAL_PINGS;
    if (!big && dt < p->cal_best)
        p->cal_best = dt;
    if (big && dt > p->cal_best) {
        double bw = 2.0 * CAL_BW_FLOATS * sizeof(float) / (dt - p->cal_best);
        if (bw > p->cal_bw)
            p->cal_bw = bw;
    }
    p->cal_req = 0;
    if (++p->cal_round < CAL_PINGS + CAL_BW_ROUNDS) {
        cal_send(d, p);
        return;
    }
    p->cal_done = true;
    d->dirty = true;
    ds_log_info("link %s -> %s: latency %.1f us, bandwidth %.1f MB/s", d->o.node, p->name,
                p->cal_best / 2 * 1e6, p->cal_bw / 1e6);
}

/* ---- tasks -------------------------------------------------------------------------------- */

static void task_free(struct task *t)
{
    free(t->seq);
    free(t->pos);
    free(t->slots);
    ds_layer_step_free(t->st);
    free(t->dreq);
    free(t->dsent);
    free(t->doff);
    free(t->dslot);
    memset(t, 0, sizeof(*t));
}

static struct task *task_new(dsd_data *d, uint64_t rid, uint64_t step, uint32_t mb,
                             uint32_t layer, uint32_t n)
{
    struct task *t = NULL;
    for (uint32_t i = 0; i < MAX_TASKS && !t; i++)
        if (!d->tasks[i].used)
            t = &d->tasks[i];
    if (!t)
        return NULL;
    const ds_model_config *c = d->c;
    uint32_t K = c->num_experts_per_tok ? c->num_experts_per_tok : 1;
    uint32_t N = d->plan.n_nodes;
    ds_error err = {0};
    t->used = true;
    t->d = d;
    t->rid = rid;
    t->step = step;
    t->mb = mb;
    t->layer = layer;
    t->n = n;
    t->seq = malloc(n * sizeof(*t->seq));
    t->pos = malloc(n * sizeof(*t->pos));
    t->slots = calloc(n, sizeof(*t->slots));
    t->dreq = calloc(N, sizeof(uint64_t));
    t->dsent = calloc(N, sizeof(uint64_t));
    t->doff = calloc(N + 1, sizeof(uint32_t));
    t->dslot = malloc((size_t)n * K * sizeof(uint32_t));
    if (!t->seq || !t->pos || !t->slots || !t->dreq || !t->dsent || !t->doff || !t->dslot ||
        ds_layer_step_new(dsd_host_model(d->host), dsd_host_pool(d->host), dsd_host_seqs(d->host),
                          n, &t->st, &err) < 0) {
        task_free(t);
        return NULL;
    }
    return t;
}

/* Tells the coordinator that micro-batch rid failed here (it fails exactly those jobs). */
static void chain_fail(dsd_data *d, uint64_t rid, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void chain_fail(dsd_data *d, uint64_t rid, const char *fmt, ...)
{
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    ds_log_err("data: micro-batch %llu failed: %s", (unsigned long long)rid, msg);
    if (!d->have_plan)
        return;
    if ((uint32_t)d->plan.head == d->self) {
        if (d->sched)
            dsd_sched_on_result(d->sched, rid, NULL, 0, msg);
        return;
    }
    struct peer *p = node_peer(d, (uint32_t)d->plan.head);
    if (p)
        dsd_send_error(p->sock, NULL, 0, rid, DSD__ERROR_CODE__ERROR_CODE_INTERNAL, "%s: %s",
                       d->o.node, msg);
}

static void step_header(Dsd__StepHeader *sh, const struct task *t, uint64_t plan_version,
                        char *unit, size_t unit_len, uint32_t layer, uint32_t n_layers)
{
    dsd__step_header__init(sh);
    if (layer < n_layers)
        snprintf(unit, unit_len, "attn[%u]", layer);
    else
        snprintf(unit, unit_len, "head");
    sh->step = t->step;
    sh->plan_version = plan_version;
    sh->layer = layer;
    sh->unit = unit;
    sh->n_seq_ids = t->n;
    sh->seq_ids = t->seq;
    sh->n_positions = t->n;
    sh->positions = t->pos;
    sh->micro_batch = t->mb;
}

/* Passes the task's rows on to the host of attn[t->layer] (or head) and frees the task. */
static void task_forward(dsd_data *d, struct task *t)
{
    uint32_t L = d->c->num_hidden_layers;
    uint32_t dest = t->layer < L ? (uint32_t)d->plan.attn[t->layer] : (uint32_t)d->plan.head;
    if (dest == d->self) { /* only the head can be here: attention would have continued */
        if (d->sched)
            dsd_sched_on_result(d->sched, t->rid, ds_layer_step_x(t->st), t->n, NULL);
        else
            chain_fail(d, t->rid, "head is not hosted on this node");
        task_free(t);
        return;
    }
    struct peer *p = node_peer(d, dest);
    if (!p) {
        chain_fail(d, t->rid, "no link to node %u", dest);
        task_free(t);
        return;
    }
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__StepHeader sh;
    Dsd__TensorDesc td, *tdp = &td;
    uint32_t shp[2];
    char unit[32];
    step_header(&sh, t, d->plan.version, unit, sizeof(unit), t->layer, L);
    dsd_tensor_desc(&td, shp, DSD__DTYPE__DTYPE_F32, t->n, d->c->hidden_size);
    env.request_id = t->rid;
    env.body_case = DSD__ENVELOPE__BODY_STEP;
    env.step = &sh;
    env.n_tensors = 1;
    env.tensors = &tdp;
    size_t sz = (size_t)t->n * d->c->hidden_size * sizeof(float);
    void *fr = malloc(sz); /* ownership passes to zmq */
    if (!fr) {
        chain_fail(d, t->rid, "out of memory");
        task_free(t);
        return;
    }
    memcpy(fr, ds_layer_step_x(t->st), sz);
    p->forwards++;
    p->forward_bytes += sz;
    if (peer_send(d, p, &env, &fr, &sz, 1) < 0)
        chain_fail(d, t->rid, "send to %s failed", p->name);
    task_free(t);
}

static const ds_expert_runner_ops dispatch_ops;

/* Runs the task's layers hosted here (the layer step of experts/ds_layer.h, its routed
 * experts dispatched) until it waits for expert replies, leaves, or fails. */
static void task_run(dsd_data *d, struct task *t)
{
    uint32_t L = d->c->num_hidden_layers;
    while (t->layer < L && (uint32_t)d->plan.attn[t->layer] == d->self) {
        ds_error err = {0};
        Dsd__ErrorCode code = 0;
        int rc = dsd_host_rows(d->host, t->layer, t->n, t->seq, t->pos, t->slots, &code, &err);
        if (rc == 0)
            rc = ds_layer_step_set_rows(t->st, t->n, t->slots, t->pos);
        uint64_t t0 = dsd_now_ns();
        t->local_s = 0;
        if (rc == 0)
            rc = ds_layer_step_run(t->st, t->layer, &dispatch_ops, t, &err);
        if (rc < 0) {
            chain_fail(d, t->rid, "attn[%u]: %s", t->layer, ds_error_str(&err));
            task_free(t);
            return;
        }
        dsd_host_note_attn(d->host, t->layer, (double)(dsd_now_ns() - t0) * 1e-9 - t->local_s);
        d->dirty = true;
        if (rc == DS_LAYER_PENDING) {
            t->deadline = dsd_now_ns() + (uint64_t)d->o.step_timeout_ms * 1000000ull;
            return; /* parked until the expert hosts answer (on_peer) */
        }
        t->layer++;
    }
    task_forward(d, t);
}

/* The node that runs expert e of layer l for rows whose attention ran here: this node when it
 * holds a copy (the solver replicates hot experts, typically beside attention); else one of
 * the copies (primary and replicas), taken in turn by micro-batch step so a hot expert's load
 * is spread over its copies. Which copy runs a row never changes its result. */
static uint32_t expert_route(const dsd_data *d, uint32_t l, uint32_t e, uint64_t step)
{
    size_t i = (size_t)l * d->plan.n_experts + e;
    uint64_t reps = d->plan.replicas[i];
    if (d->self < 64 && (reps >> d->self & 1))
        return d->self;
    uint32_t primary = (uint32_t)d->plan.expert[i];
    if (!reps || primary == d->self)
        return primary;
    uint32_t n = 1 + (uint32_t)__builtin_popcountll(reps), pick = (uint32_t)(step % n);
    if (pick == 0)
        return primary;
    for (uint32_t node = 0; node < 64; node++)
        if (reps >> node & 1 && --pick == 0)
            return node;
    return primary;
}

/* The expert runner of the data plane (ds_expert_runner_ops, ctx = the task): one dispatch
 * per remote expert host with the rows routed there; the experts hosted here run in place.
 * t->pending counts the replies to wait for: DS_LAYER_PENDING while there are any. */
static int task_dispatch(void *ctx, uint32_t l, const float *ffn_in, uint32_t n, const int32_t *ids,
                         const float *weights, float *eo, ds_error *err)
{
    struct task *t = ctx;
    dsd_data *d = t->d;
    const ds_model_config *c = d->c;
    uint32_t D = c->hidden_size, E = c->n_routed_experts, N = d->plan.n_nodes;
    uint32_t K = c->num_experts_per_tok ? c->num_experts_per_tok : 1;
    uint32_t *rows_of = malloc(n * sizeof(uint32_t));
    uint32_t *pr = malloc((size_t)n * K * sizeof(uint32_t));
    uint32_t *pe = malloc((size_t)n * K * sizeof(uint32_t));
    float *pw = malloc((size_t)n * K * sizeof(float));
    int rc = 0;
    if (!rows_of || !pr || !pe || !pw) {
        rc = ds_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (uint32_t i = 0; i < n * K; i++)
        d->expert_counts[(size_t)l * E + (uint32_t)ids[i]]++;
    uint32_t done = 0;
    t->pending = 0;
    for (uint32_t node = 0; node < N; node++) {
        uint32_t P = 0, R = 0;
        t->doff[node] = done;
        t->dreq[node] = 0;
        for (uint32_t i = 0; i < n; i++) {
            bool used = false;
            for (uint32_t k = 0; k < K; k++) {
                uint32_t e = (uint32_t)ids[i * K + k];
                if (expert_route(d, l, e, t->step) != node)
                    continue;
                if (!used) {
                    rows_of[R++] = i;
                    used = true;
                }
                pr[P] = R - 1;
                pe[P] = e;
                pw[P] = weights[i * K + k];
                t->dslot[done + P] = i * K + k;
                P++;
            }
        }
        if (!P)
            continue;
        float *rows = malloc((size_t)R * D * sizeof(float));
        if (!rows) {
            rc = ds_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        for (uint32_t j = 0; j < R; j++)
            memcpy(rows + (size_t)j * D, ffn_in + (size_t)rows_of[j] * D, D * sizeof(float));
        if (node == d->self) {
            float *o = malloc((size_t)P * D * sizeof(float));
            Dsd__ErrorCode code = 0;
            double cs = 0;
            if (!o) {
                free(rows);
                rc = ds_error_set(err, -ENOMEM, "out of memory");
                goto out;
            }
            rc = dsd_host_experts(d->host, l, R, rows, P, pr, pe, o, &cs, &code, err);
            t->local_s += cs;
            for (uint32_t p = 0; rc >= 0 && p < P; p++)
                memcpy(eo + (size_t)t->dslot[done + p] * D, o + (size_t)p * D, D * sizeof(float));
            free(rows);
            free(o);
            if (rc < 0)
                goto out;
            done += P;
            continue;
        }
        struct peer *p = node_peer(d, node);
        if (!p) {
            free(rows);
            rc = ds_error_set(err, -EHOSTUNREACH, "no link to node %u", node);
            goto out;
        }
        Dsd__Envelope de = DSD__ENVELOPE__INIT;
        Dsd__DispatchHeader dh = DSD__DISPATCH_HEADER__INIT;
        Dsd__TensorDesc dtd, *dtdp = &dtd;
        uint32_t dshp[2];
        dsd_tensor_desc(&dtd, dshp, DSD__DTYPE__DTYPE_F32, R, D);
        dh.step = t->step;
        dh.plan_version = d->plan.version;
        dh.layer = l;
        dh.rows = R;
        dh.n_pair_rows = dh.n_pair_experts = dh.n_pair_weights = P;
        dh.pair_rows = pr;
        dh.pair_experts = pe;
        dh.pair_weights = pw;
        dh.micro_batch = t->mb;
        de.request_id = t->dreq[node] = ++d->next_req;
        de.body_case = DSD__ENVELOPE__BODY_DISPATCH;
        de.dispatch = &dh;
        de.n_tensors = 1;
        de.tensors = &dtdp;
        size_t rsz = (size_t)R * D * sizeof(float);
        void *rf = rows;
        t->dsent[node] = dsd_now_ns();
        if (peer_send(d, p, &de, &rf, &rsz, 1) < 0) {
            t->dreq[node] = 0;
            rc = ds_error_set(err, -EIO, "send to %s failed", p->name);
            goto out;
        }
        t->pending++;
        done += P;
    }
    t->doff[N] = done;
out:
    free(rows_of);
    free(pr);
    free(pe);
    free(pw);
    return rc < 0 ? rc : t->pending ? DS_LAYER_PENDING : DS_LAYER_DONE;
}

static const ds_expert_runner_ops dispatch_ops = {.run = task_dispatch};

/* A dispatch reply from plan node `node`: the unweighted expert rows of its pairs. */
static void task_combine_reply(dsd_data *d, struct task *t, uint32_t node, dsd_msg *m)
{
    const ds_model_config *c = d->c;
    uint32_t D = c->hidden_size;
    struct peer *p = node_peer(d, node);
    t->dreq[node] = 0;
    uint32_t P = t->doff[node + 1] - t->doff[node];
    if (m->env->body_case == DSD__ENVELOPE__BODY_ERROR) {
        chain_fail(d, t->rid, "node %s: %s", p ? p->name : "?", m->env->error->message);
        task_free(t);
        return;
    }
    const Dsd__TensorDesc *td = m->n_frames == 1 ? m->env->tensors[0] : NULL;
    const float *o = td && m->env->body_case == DSD__ENVELOPE__BODY_COMBINE &&
                             td->dtype == DSD__DTYPE__DTYPE_F32 && td->n_shape == 2 &&
                             td->shape[0] == P && td->shape[1] == D
                         ? dsd_msg_frame(m, 0, NULL)
                         : NULL;
    if (!o) {
        chain_fail(d, t->rid, "node %s: dispatch reply has the wrong frames", p ? p->name : "?");
        task_free(t);
        return;
    }
    if (p) {
        p->rtt_s += (double)(dsd_now_ns() - t->dsent[node]) * 1e-9;
        p->compute_s += m->env->combine->compute_s;
        p->messages++;
        p->bytes += (size_t)P * D * sizeof(float);
        d->dirty = true;
    }
    for (uint32_t q = 0; q < P; q++)
        memcpy(ds_layer_step_expert_out(t->st) + (size_t)t->dslot[t->doff[node] + q] * D,
               o + (size_t)q * D, D * sizeof(float));
    if (--t->pending)
        return;
    ds_layer_step_resume(t->st);
    t->layer++;
    task_run(d, t);
}

/* ---- starting a micro-batch (the scheduler) ----------------------------------------------- */

static int data_launch(dsd_data *d, uint64_t rid, uint64_t step, uint32_t mb, uint32_t n,
                       const uint64_t *seq, const uint32_t *pos, const float *x, ds_error *err)
{
    if (!d->have_plan || !n)
        return ds_error_set(err, -EINVAL, "no plan");
    struct task *t = task_new(d, rid, step, mb, 0, n);
    if (!t)
        return ds_error_set(err, -EBUSY, "too many micro-batches in flight on %s", d->o.node);
    memcpy(t->seq, seq, n * sizeof(*seq));
    memcpy(t->pos, pos, n * sizeof(*pos));
    memcpy(ds_layer_step_x(t->st), x, (size_t)n * d->c->hidden_size * sizeof(float));
    if ((uint32_t)d->plan.attn[0] == d->self)
        task_run(d, t);
    else
        task_forward(d, t);
    return 0;
}

/* Frees a sequence's KV caches on every node (CANCEL, fire and forget). */
static void data_release(dsd_data *d, uint64_t seq)
{
    Dsd__Envelope ce = DSD__ENVELOPE__INIT;
    Dsd__Cancel cc = DSD__CANCEL__INIT;
    cc.job = seq;
    ce.body_case = DSD__ENVELOPE__BODY_CANCEL;
    ce.cancel = &cc;
    for (uint32_t n = 0; d->have_plan && n < d->plan.n_nodes; n++) {
        struct peer *p = node_peer(d, n);
        if (p)
            dsd_send(p->sock, NULL, 0, &ce, NULL, NULL, 0);
    }
    dsd_host_release(d->host, seq);
}

/* ---- the data ROUTER ---------------------------------------------------------------------- */

#define REFUSE(code, ...)                                                                          \
    do {                                                                                           \
        char _b[400];                                                                              \
        snprintf(_b, sizeof(_b), __VA_ARGS__);                                                     \
        ds_log_warn("data: refused %s from peer: %s", ds_wire_body_name(env), _b);                 \
        dsd_send_error(d->router, m->peer, m->peer_len, env->request_id, code, "%s", _b);          \
        return;                                                                                    \
    } while (0)

static bool tensor_is(const Dsd__TensorDesc *t, Dsd__Dtype dt, uint32_t d0, uint32_t d1)
{
    return t->dtype == dt && t->n_shape == 2 && t->shape[0] == d0 && t->shape[1] == d1;
}

static void serve_step(dsd_data *d, dsd_msg *m)
{
    const Dsd__Envelope *env = m->env;
    const Dsd__StepHeader *st = env->step;
    uint32_t L = d->c->num_hidden_layers, D = d->c->hidden_size, n = (uint32_t)st->n_seq_ids;
    if (st->plan_version != d->plan.version)
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT, "plan version %llu, serving %llu",
               (unsigned long long)st->plan_version, (unsigned long long)d->plan.version);
    bool head = st->layer == L;
    if (head ? (uint32_t)d->plan.head != d->self || !d->sched
             : st->layer > L || !dsd_host_has_attn(d->host, st->layer))
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT, "%s[%u] is not hosted here",
               head ? "head" : "attn", st->layer);
    if (n == 0 || n > DSD_MAX_ROWS || st->n_positions != n || m->n_frames != 1 ||
        !tensor_is(env->tensors[0], DSD__DTYPE__DTYPE_F32, n, D))
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_MALFORMED,
               "step: need %u seq ids, %u positions and one f32 frame [rows, %u]", n, n, D);
    const float *x = dsd_msg_frame(m, 0, NULL);
    if (!x)
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_INTERNAL, "out of memory");
    if (head) {
        dsd_sched_on_result(d->sched, env->request_id, x, n, NULL);
        return;
    }
    struct task *t = task_new(d, env->request_id, st->step, st->micro_batch, st->layer, n);
    if (!t) {
        chain_fail(d, env->request_id, "too many micro-batches in flight on %s", d->o.node);
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_BUSY, "too many micro-batches in flight");
    }
    memcpy(t->seq, st->seq_ids, n * sizeof(uint64_t));
    memcpy(t->pos, st->positions, n * sizeof(uint32_t));
    memcpy(ds_layer_step_x(t->st), x, (size_t)n * D * sizeof(float));
    /* a bad row (unknown sequence position, ...) fails here with an Error to the sender too,
     * so a peer speaking the protocol wrongly hears why */
    uint64_t rid = env->request_id;
    ds_error err = {0};
    Dsd__ErrorCode code = 0;
    for (uint32_t i = 0; i < n; i++)
        if (t->pos[i] >= (uint32_t)d->o.max_context) {
            code = DSD__ERROR_CODE__ERROR_CODE_MALFORMED;
            ds_error_set(&err, -EINVAL, "row %u: position %u past max_context", i, t->pos[i]);
        }
    if (code) {
        task_free(t);
        chain_fail(d, rid, "%s", ds_error_str(&err));
        REFUSE(code, "%s", ds_error_str(&err));
    }
    task_run(d, t);
}

static void serve_dispatch(dsd_data *d, dsd_msg *m)
{
    const Dsd__Envelope *env = m->env;
    const Dsd__DispatchHeader *dh = env->dispatch;
    uint32_t D = d->c->hidden_size, R = dh->rows;
    uint32_t K = d->c->num_experts_per_tok ? d->c->num_experts_per_tok : 1;
    size_t P = dh->n_pair_rows;
    if (dh->plan_version != d->plan.version)
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT, "plan version %llu, serving %llu",
               (unsigned long long)dh->plan_version, (unsigned long long)d->plan.version);
    if (R == 0 || R > DSD_MAX_ROWS || P == 0 || dh->n_pair_experts != P ||
        dh->n_pair_weights != P || m->n_frames != 1 ||
        !tensor_is(env->tensors[0], DSD__DTYPE__DTYPE_F32, R, D))
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_MALFORMED,
               "dispatch: need pairs (rows, experts, weights) of one length and one f32 frame "
               "[rows, %u]",
               D);
    /* a row is routed to K experts, so one node gets at most K pairs of it: bound P before
     * allocating the P rows of output a peer's header asks for */
    if (P > (uint64_t)R * K)
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_MALFORMED,
               "dispatch: %zu pairs for %u rows, at most %u per row (num_experts_per_tok)", P, R,
               K);
    const float *rows = dsd_msg_frame(m, 0, NULL);
    float *out = malloc(P * D * sizeof(float));
    if (!rows || !out) {
        free(out);
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_INTERNAL, "out of memory");
    }
    ds_error err = {0};
    Dsd__ErrorCode code = 0;
    double cs = 0;
    if (dsd_host_experts(d->host, dh->layer, R, rows, (uint32_t)P, dh->pair_rows, dh->pair_experts,
                         out, &cs, &code, &err) < 0) {
        free(out);
        REFUSE(code, "%s", ds_error_str(&err));
    }
    d->dirty = true;
    Dsd__Envelope rep = DSD__ENVELOPE__INIT;
    Dsd__CombineHeader ch = DSD__COMBINE_HEADER__INIT;
    Dsd__TensorDesc td, *tdp = &td;
    uint32_t shp[2];
    dsd_tensor_desc(&td, shp, DSD__DTYPE__DTYPE_F32, (uint32_t)P, D);
    ch.step = dh->step;
    ch.plan_version = d->plan.version;
    ch.layer = dh->layer;
    ch.rows = (uint32_t)P;
    ch.compute_s = cs;
    ch.micro_batch = dh->micro_batch;
    rep.request_id = env->request_id;
    rep.body_case = DSD__ENVELOPE__BODY_COMBINE;
    rep.combine = &ch;
    rep.n_tensors = 1;
    rep.tensors = &tdp;
    size_t osz = P * D * sizeof(float);
    void *fr = out;
    dsd_send(d->router, m->peer, m->peer_len, &rep, &fr, &osz, 1);
}

static void serve_probe(dsd_data *d, dsd_msg *m)
{
    const Dsd__Envelope *env = m->env;
    Dsd__Envelope rep = DSD__ENVELOPE__INIT;
    Dsd__LinkProbe lp = DSD__LINK_PROBE__INIT;
    lp.seq = env->link_probe->seq;
    lp.sent_ns = env->link_probe->sent_ns;
    lp.echo = true;
    rep.request_id = env->request_id;
    rep.body_case = DSD__ENVELOPE__BODY_LINK_PROBE;
    rep.link_probe = &lp;
    rep.n_tensors = env->n_tensors;
    rep.tensors = env->tensors;
    void *fr[DS_WIRE_MAX_TENSOR_FRAMES];
    size_t sz[DS_WIRE_MAX_TENSOR_FRAMES];
    for (uint32_t i = 0; i < m->n_frames; i++) {
        sz[i] = zmq_msg_size(&m->frames[i]);
        fr[i] = malloc(sz[i] ? sz[i] : 1);
        if (!fr[i]) {
            for (uint32_t j = 0; j < i; j++)
                free(fr[j]);
            return;
        }
        memcpy(fr[i], zmq_msg_data(&m->frames[i]), sz[i]);
    }
    dsd_send(d->router, m->peer, m->peer_len, &rep, fr, sz, m->n_frames);
}

static void on_router(dsd_data *d)
{
    dsd_msg msg, *m = &msg;
    ds_error err = {0};
    int rc = dsd_msg_recv(d->router, true, DS_WIRE_MAX_ENVELOPE_BYTES, m, &err);
    if (rc == -EAGAIN)
        return;
    if (rc < 0) {
        ds_log_warn("data: refused a message: %s", ds_error_str(&err));
        if (m->peer_len)
            dsd_send_error(d->router, m->peer, m->peer_len, 0, m->refused, "%s",
                           ds_error_str(&err));
        return;
    }
    Dsd__Envelope *env = m->env;
    switch (env->body_case) {
    case DSD__ENVELOPE__BODY_LINK_PROBE:
        serve_probe(d, m);
        break;
    case DSD__ENVELOPE__BODY_CANCEL:
        dsd_host_release(d->host, env->cancel->job); /* fire and forget */
        break;
    case DSD__ENVELOPE__BODY_STEP:
    case DSD__ENVELOPE__BODY_DISPATCH:
        if (!d->have_plan || !d->host) {
            ds_log_warn("data: refused '%s': this node has no plan loaded yet",
                        ds_wire_body_name(env));
            dsd_send_error(d->router, m->peer, m->peer_len, env->request_id,
                           DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT, "no plan loaded on this node");
            break;
        }
        if (env->body_case == DSD__ENVELOPE__BODY_STEP)
            serve_step(d, m);
        else
            serve_dispatch(d, m);
        break;
    case DSD__ENVELOPE__BODY_ERROR:
        /* a micro-batch failed further down the chain: only the coordinator acts on it */
        if (d->sched)
            dsd_sched_on_result(d->sched, env->request_id, NULL, 0,
                                env->error->message ? env->error->message : "error");
        break;
    default:
        ds_log_warn("data: refused '%s' message: not a data-plane request", ds_wire_body_name(env));
        dsd_send_error(d->router, m->peer, m->peer_len, env->request_id,
                       DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "'%s' is not a data-plane request",
                       ds_wire_body_name(env));
    }
    dsd_msg_close(m);
}

/* A reply on the DEALER to peer pi: a dispatch's combine, a probe echo, or an error. */
static void on_peer(dsd_data *d, uint32_t pi)
{
    struct peer *p = &d->peers[pi];
    dsd_msg m;
    ds_error err = {0};
    int rc = dsd_msg_recv(p->sock, false, DS_WIRE_MAX_ENVELOPE_BYTES, &m, &err);
    if (rc == -EAGAIN)
        return;
    if (rc < 0) {
        ds_log_warn("data: bad reply from %s: %s", p->name, ds_error_str(&err));
        return;
    }
    uint64_t req = m.env->request_id;
    if (req && req == p->cal_req) {
        if (m.env->body_case == DSD__ENVELOPE__BODY_LINK_PROBE)
            cal_reply(d, p);
        else {
            p->cal_failed = true;
            p->cal_req = 0;
        }
        dsd_msg_close(&m);
        return;
    }
    for (uint32_t i = 0; req && d->have_plan && i < MAX_TASKS; i++) {
        struct task *t = &d->tasks[i];
        if (!t->used || !t->pending)
            continue;
        for (uint32_t node = 0; node < d->plan.n_nodes; node++)
            if (t->dreq[node] == req && d->peer_of[node] == (int32_t)pi) {
                task_combine_reply(d, t, node, &m);
                dsd_msg_close(&m);
                return;
            }
    }
    /* a late reply (its micro-batch already failed) or an error for a forwarded step */
    if (m.env->body_case == DSD__ENVELOPE__BODY_ERROR)
        ds_log_warn("data: %s: %s", p->name, m.env->error->message ? m.env->error->message : "");
    dsd_msg_close(&m);
}

/* ---- stats -------------------------------------------------------------------------------- */

static void publish_jobs(dsd_data *d);

/* This node's measurements: {"node", "units": {unit: {compute_s, calls|rows}}, "links":
 * [{from, to, latency_s, bandwidth_bytes_per_s, measured_transfer_s, measured_compute_s,
 * messages, bytes, forwards, forward_bytes}], "expert_counts": {"n_routed_experts", "layers":
 * [{layer, counts}]}}. */
static void publish(dsd_data *d)
{
    json_t *o = json_object();
    json_object_set_new(o, "node", json_string(d->o.node));
    char *hs = d->host ? dsd_host_stats_json(d->host) : NULL;
    json_t *units = hs ? json_loads(hs, 0, NULL) : NULL;
    free(hs);
    json_object_set_new(o, "units", units ? units : json_object());
    json_t *links = json_array();
    for (uint32_t i = 0; i < d->n_peers; i++) {
        struct peer *p = &d->peers[i];
        double tr = p->rtt_s - p->compute_s;
        json_t *lk = json_pack(
            "{s:s,s:s,s:f,s:f,s:f,s:f,s:I,s:I,s:I,s:I,s:b}", "from", d->o.node, "to", p->name,
            "latency_s", p->cal_done ? p->cal_best / 2 : 0.0, "bandwidth_bytes_per_s",
            p->cal_done ? p->cal_bw : 0.0, "measured_transfer_s", tr > 0 ? tr : 0.0,
            "measured_compute_s", p->compute_s, "messages", (json_int_t)p->messages, "bytes",
            (json_int_t)p->bytes, "forwards", (json_int_t)p->forwards, "forward_bytes",
            (json_int_t)p->forward_bytes, "calibrated", p->cal_done);
        json_object_set_new(lk, "expert_compute_s", json_real(p->compute_s));
        json_array_append_new(links, lk);
    }
    json_object_set_new(o, "links", links);
    json_t *layers = json_array();
    uint32_t E = d->c ? d->c->n_routed_experts : 0;
    for (uint32_t l = 0; d->have_plan && E && l < d->plan.n_layers; l++) {
        if (!dsd_host_has_attn(d->host, l) || !ds_model_config_layer_is_moe(d->c, l))
            continue;
        json_t *row = json_array();
        for (uint32_t e = 0; e < E; e++)
            json_array_append_new(row, json_integer((json_int_t)d->expert_counts[(size_t)l * E + e]));
        json_array_append_new(layers, json_pack("{s:i,s:o}", "layer", (int)l, "counts", row));
    }
    json_object_set_new(o, "expert_counts",
                        json_pack("{s:i,s:o}", "n_routed_experts", (int)E, "layers", layers));
    char *s = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(o);
    pthread_mutex_lock(&d->mu);
    free(d->stats_json);
    d->stats_json = s;
    pthread_mutex_unlock(&d->mu);
    publish_jobs(d);
    d->dirty = false;
    d->last_publish_ns = dsd_now_ns();
}

static void publish_jobs(dsd_data *d)
{
    char *js = d->sched ? dsd_sched_jobs_json(d->sched) : NULL;
    dsd_sched_stats st = {0};
    if (d->sched)
        dsd_sched_get_stats(d->sched, &st);
    pthread_mutex_lock(&d->mu);
    free(d->jobs_json);
    d->jobs_json = js;
    d->jobs_running = st.jobs;
    pthread_mutex_unlock(&d->mu);
}

uint32_t dsd_data_jobs_running(dsd_data *d)
{
    if (!d)
        return 0;
    pthread_mutex_lock(&d->mu);
    uint32_t n = d->jobs_running;
    pthread_mutex_unlock(&d->mu);
    return n;
}

char *dsd_data_json(dsd_data *d, const char *what)
{
    if (!d)
        return NULL;
    pthread_mutex_lock(&d->mu);
    const char *src = !strcmp(what, "jobs") ? d->jobs_json : d->stats_json;
    char *r = src ? strdup(src) : NULL;
    pthread_mutex_unlock(&d->mu);
    return r;
}

/* ---- control from the event loop ---------------------------------------------------------- */

enum { OP_STOP = 1, OP_INSTALL, OP_PROBE, OP_OPTS };

struct ctl_msg {
    int op;
    dsd_plan *plan; /* OP_INSTALL: heap plan, ownership passes (NULL: uninstall) */
    dsd_host *host; /* OP_INSTALL: ownership passes */
    uint32_t self;
    char name[64];              /* OP_PROBE */
    char endpoint[DSD_STR_MAX]; /* OP_PROBE */
    dsd_opts o;                 /* OP_OPTS: the options after a reload */
};

/* ---- the scheduler's port ------------------------------------------------------------------ */

static int port_launch(void *ctx, const dsd_sched_batch *b, ds_error *err)
{
    return data_launch(ctx, b->rid, b->step, b->mb, b->n, b->seq, b->pos, b->x, err);
}

static void port_release(void *ctx, uint64_t job)
{
    data_release(ctx, job);
}

/* To a client, through the event loop: [client identity, envelope] on the client pipe. */
static void port_reply(void *ctx, const uint8_t *id, size_t id_len, const Dsd__Envelope *env)
{
    dsd_data *d = ctx;
    uint8_t *buf;
    size_t len;
    if (!d->spipe || ds_wire_pack((Dsd__Envelope *)env, &buf, &len) < 0)
        return;
    zmq_send(d->spipe, id, id_len, ZMQ_SNDMORE);
    zmq_send(d->spipe, buf, len, 0);
    free(buf);
}

static void port_jobs_changed(void *ctx)
{
    publish_jobs(ctx);
}

static const dsd_sched_port SCHED_PORT = {
    .launch = port_launch,
    .release = port_release,
    .reply = port_reply,
    .jobs_changed = port_jobs_changed,
};

/* Client requests the event loop forwards as [client identity, envelope]: to the scheduler,
 * or refused (BUSY) while no plan is installed. */
static void on_spipe(dsd_data *d)
{
    for (int guard = 0; guard < 1024; guard++) {
        zmq_msg_t a, b;
        zmq_msg_init(&a);
        zmq_msg_init(&b);
        if (zmq_msg_recv(&a, d->spipe, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&a);
            zmq_msg_close(&b);
            return;
        }
        zmq_msg_recv(&b, d->spipe, 0);
        Dsd__Envelope *env = NULL;
        ds_error err = {0};
        const uint8_t *id = zmq_msg_data(&a);
        size_t il = zmq_msg_size(&a);
        if (il <= DSD_SCHED_MAX_CLIENT_ID &&
            ds_wire_unpack(zmq_msg_data(&b), zmq_msg_size(&b), &env, &err) == 0) {
            if (!d->sched) {
                ds_log_warn("client request %llu refused: no plan is installed",
                            (unsigned long long)env->request_id);
                if (il)
                    dsd_send_error(d->spipe, id, il, env->request_id,
                                   DSD__ERROR_CODE__ERROR_CODE_BUSY, "no plan is installed");
            } else if (env->body_case == DSD__ENVELOPE__BODY_SUBMIT) {
                dsd_sched_submit(d->sched, id, il, env->request_id, env->submit);
            } else if (env->body_case == DSD__ENVELOPE__BODY_CANCEL) {
                dsd_sched_cancel(d->sched, id, il, env->request_id, env->cancel->job);
            }
            ds_wire_free(env);
        }
        zmq_msg_close(&a);
        zmq_msg_close(&b);
    }
}

/* Whether the plan keeps every attention layer and expert on the node of attn[0]. */
static bool plan_one_node(const dsd_plan *p)
{
    for (uint32_t l = 0; l < p->n_layers; l++) {
        if (p->attn[l] != p->attn[0])
            return false;
        for (uint32_t e = 0; e < p->n_experts; e++) {
            size_t i = (size_t)l * p->n_experts + e;
            if (p->expert[i] >= 0 && p->expert[i] != p->attn[0])
                return false;
        }
    }
    return true;
}

static int sched_start(dsd_data *d, ds_error *err)
{
    ds_tokenizer *tok = NULL;
    ds_error terr = {0};
    if (ds_tokenizer_load(d->o.model, &tok, &terr) < 0) {
        tok = NULL;
        ds_log_info("no tokenizer (%s): clients send token ids; stops 'eos' and 'id:N' only",
                    ds_error_str(&terr));
    }
    dsd_sched_limits lim = {
        .max_jobs = (uint32_t)d->o.max_jobs,
        .micro_batches = (uint32_t)d->o.micro_batches,
        .max_context = (uint32_t)d->o.max_context,
        .max_rows_per_step = (uint32_t)d->o.max_rows_per_step,
        .step_timeout_ns = (uint64_t)d->o.step_timeout_ms * 1000000ull,
        .one_node = plan_one_node(&d->plan),
    };
    int rc = dsd_sched_new(dsd_host_model(d->host), dsd_host_pool(d->host), &tok, &lim, &SCHED_PORT,
                           d, &d->sched, err);
    ds_tokenizer_free(tok);
    return rc;
}

/* Drops the plan, its units and micro-batches; running jobs end with `reason`. */
static void uninstall(dsd_data *d, const char *reason)
{
    if (d->sched)
        d->sched = dsd_sched_free(d->sched, reason);
    for (uint32_t i = 0; i < MAX_TASKS; i++)
        if (d->tasks[i].used)
            task_free(&d->tasks[i]);
    d->host = dsd_host_free(d->host);
    dsd_plan_clear(&d->plan);
    free(d->peer_of);
    d->peer_of = NULL;
    free(d->expert_counts);
    d->expert_counts = NULL;
    d->c = NULL;
    d->have_plan = false;
}

static void install(dsd_data *d, struct ctl_msg *cm)
{
    uninstall(d, "error"); /* a new plan: jobs of the old one cannot continue */
    if (!cm->plan) {
        dsd_host_free(cm->host);
        return;
    }
    d->plan = *cm->plan;
    free(cm->plan);
    d->host = cm->host;
    d->self = cm->self;
    d->c = ds_model_get_config(dsd_host_model(d->host));
    uint32_t N = d->plan.n_nodes, E = d->c->n_routed_experts ? d->c->n_routed_experts : 1;
    d->peer_of = calloc(N, sizeof(int32_t));
    d->expert_counts = calloc((size_t)d->plan.n_layers * E, sizeof(uint64_t));
    if (!d->peer_of || !d->expert_counts) {
        ds_log_err("data: out of memory installing plan v%llu",
                   (unsigned long long)d->plan.version);
        uninstall(d, "error");
        return;
    }
    for (uint32_t n = 0; n < N; n++) {
        d->peer_of[n] = -1;
        if (n == d->self)
            continue;
        struct peer *p = peer_add(d, d->plan.nodes[n], d->plan.endpoints[n]);
        if (p)
            d->peer_of[n] = (int32_t)(p - d->peers);
    }
    d->have_plan = true;
    if (d->coordinator) {
        ds_error err = {0};
        if (sched_start(d, &err) < 0)
            ds_log_err("scheduler: %s", ds_error_str(&err));
    }
    ds_log_info("data: plan v%llu installed (node %u of %u)", (unsigned long long)d->plan.version,
                d->self, N);
    d->dirty = true;
}

/* Returns false on STOP. */
static bool on_ctl(dsd_data *d)
{
    struct ctl_msg cm;
    int n = zmq_recv(d->ctl, &cm, sizeof(cm), ZMQ_DONTWAIT);
    if (n != (int)sizeof(cm))
        return true;
    switch (cm.op) {
    case OP_STOP:
        return false;
    case OP_INSTALL:
        install(d, &cm);
        publish(d);
        zmq_send(d->ctl, "ok", 2, 0);
        return true;
    case OP_PROBE:
        peer_add(d, cm.name, cm.endpoint);
        return true;
    case OP_OPTS:
        ds_log_info("data: reloaded options (step_timeout_ms %lld)", (long long)cm.o.step_timeout_ms);
        d->o = cm.o;
        if (d->sched)
            dsd_sched_set_step_timeout(d->sched, (uint64_t)cm.o.step_timeout_ms * 1000000ull);
        return true;
    }
    return true;
}

/* Micro-batches parked longer than step_timeout fail; stuck calibration probes give up. */
static void expire(dsd_data *d)
{
    uint64_t now = dsd_now_ns();
    for (uint32_t i = 0; i < MAX_TASKS; i++) {
        struct task *t = &d->tasks[i];
        if (t->used && t->pending && now > t->deadline) {
            chain_fail(d, t->rid, "layer %u: expert hosts did not answer within %lld ms",
                       t->layer, (long long)d->o.step_timeout_ms);
            task_free(t);
        }
    }
    for (uint32_t i = 0; i < d->n_peers; i++) {
        struct peer *p = &d->peers[i];
        if (p->cal_req && now - p->cal_sent_ns > (uint64_t)d->o.step_timeout_ms * 1000000ull) {
            ds_log_warn("link calibration to %s: no answer; retrying", p->name);
            cal_send(d, p);
        }
    }
}

static void *data_main(void *arg)
{
    dsd_data *d = arg;
    bool running = true;
    publish(d);
    while (running) {
        zmq_pollitem_t it[3 + MAX_PEERS];
        int n = 0;
        it[n++] = (zmq_pollitem_t){.socket = d->ctl, .events = ZMQ_POLLIN};
        it[n++] = (zmq_pollitem_t){.socket = d->router, .events = ZMQ_POLLIN};
        if (d->spipe)
            it[n++] = (zmq_pollitem_t){.socket = d->spipe, .events = ZMQ_POLLIN};
        int first_peer = n;
        uint32_t np = d->n_peers;
        for (uint32_t i = 0; i < np; i++)
            it[n++] = (zmq_pollitem_t){.socket = d->peers[i].sock, .events = ZMQ_POLLIN};
        long tmo = d->sched ? dsd_sched_wait_ms(d->sched) : 50;
        if (zmq_poll(it, n, tmo) < 0) {
            if (zmq_errno() == ETERM)
                break;
            continue;
        }
        if (it[0].revents)
            running = on_ctl(d);
        if (!running)
            break;
        for (int k = 0; k < 256 && (it[1].revents & ZMQ_POLLIN); k++) {
            int ev = 0;
            size_t sz = sizeof(ev);
            zmq_getsockopt(d->router, ZMQ_EVENTS, &ev, &sz);
            if (!(ev & ZMQ_POLLIN))
                break;
            on_router(d);
        }
        if (d->spipe && (it[2].revents & ZMQ_POLLIN))
            on_spipe(d);
        for (uint32_t i = 0; i < np; i++) {
            if (!(it[first_peer + (int)i].revents & ZMQ_POLLIN))
                continue;
            for (int k = 0; k < 256; k++) {
                int ev = 0;
                size_t sz = sizeof(ev);
                zmq_getsockopt(d->peers[i].sock, ZMQ_EVENTS, &ev, &sz);
                if (!(ev & ZMQ_POLLIN))
                    break;
                on_peer(d, i);
            }
        }
        expire(d);
        if (d->sched)
            dsd_sched_tick(d->sched, dsd_now_ns());
        /* the snapshot changes only with work done (the job list is published as it changes) */
        if (d->dirty && dsd_now_ns() - d->last_publish_ns > 100000000ull)
            publish(d);
    }
    uninstall(d, "cancelled");
    publish(d);
    return NULL;
}

int dsd_data_start(void *zctx, void *router, void *spipe, const dsd_opts *o, bool coordinator,
                   dsd_data **ret, ds_error *err)
{
    dsd_data *d = calloc(1, sizeof(*d));
    if (!d)
        return ds_error_set(err, -ENOMEM, "out of memory");
    d->zctx = zctx;
    d->router = router;
    d->spipe = spipe;
    d->o = *o;
    d->coordinator = coordinator;
    pthread_mutex_init(&d->mu, NULL);
    char ep[64];
    snprintf(ep, sizeof(ep), "%s-%p", DATA_CTL_EP, (void *)d);
    void *a = zmq_socket(zctx, ZMQ_PAIR), *b = zmq_socket(zctx, ZMQ_PAIR);
    if (!a || !b || zmq_bind(a, ep) < 0 || zmq_connect(b, ep) < 0) {
        if (a)
            zmq_close(a);
        if (b)
            zmq_close(b);
        pthread_mutex_destroy(&d->mu);
        free(d);
        return ds_error_set(err, -EIO, "data thread: inproc pipe: %s", zmq_strerror(zmq_errno()));
    }
    d->ctl = a;
    d->loop_ctl = b;
    if (pthread_create(&d->th, NULL, data_main, d) != 0) {
        zmq_close(a);
        zmq_close(b);
        pthread_mutex_destroy(&d->mu);
        free(d);
        return ds_error_set(err, -EAGAIN, "cannot start the data thread");
    }
    d->started = true;
    *ret = d;
    return 0;
}

int dsd_data_install(dsd_data *d, const dsd_plan *plan, uint32_t self, dsd_host *host,
                     ds_error *err)
{
    struct ctl_msg cm = {.op = OP_INSTALL, .self = self, .host = host};
    if (plan) {
        if (!(cm.plan = calloc(1, sizeof(*cm.plan))) || dsd_plan_copy(cm.plan, plan) < 0) {
            free(cm.plan);
            dsd_host_free(host);
            return ds_error_set(err, -ENOMEM, "out of memory");
        }
    }
    if (zmq_send(d->loop_ctl, &cm, sizeof(cm), 0) != (int)sizeof(cm)) {
        if (cm.plan) {
            dsd_plan_clear(cm.plan);
            free(cm.plan);
        }
        dsd_host_free(host);
        return ds_error_set(err, -EIO, "data thread: %s", zmq_strerror(zmq_errno()));
    }
    char ok[4];
    zmq_recv(d->loop_ctl, ok, sizeof(ok), 0); /* the thread has it (and freed the old units) */
    return 0;
}

void dsd_data_probe(dsd_data *d, const char *name, const char *endpoint)
{
    struct ctl_msg cm = {.op = OP_PROBE};
    snprintf(cm.name, sizeof(cm.name), "%s", name);
    snprintf(cm.endpoint, sizeof(cm.endpoint), "%s", endpoint);
    zmq_send(d->loop_ctl, &cm, sizeof(cm), 0);
}

void dsd_data_set_opts(dsd_data *d, const dsd_opts *o)
{
    struct ctl_msg *cm = calloc(1, sizeof(*cm));
    if (!cm)
        return;
    cm->op = OP_OPTS;
    cm->o = *o;
    zmq_send(d->loop_ctl, cm, sizeof(*cm), 0);
    free(cm);
}

void dsd_data_stop(dsd_data *d)
{
    if (!d)
        return;
    if (d->started) {
        struct ctl_msg cm = {.op = OP_STOP};
        zmq_send(d->loop_ctl, &cm, sizeof(cm), 0);
        pthread_join(d->th, NULL);
    }
    for (uint32_t i = 0; i < d->n_peers; i++)
        zmq_close(d->peers[i].sock);
    zmq_close(d->ctl);
    zmq_close(d->loop_ctl);
    free(d->stats_json);
    free(d->jobs_json);
    pthread_mutex_destroy(&d->mu);
    free(d);
}
