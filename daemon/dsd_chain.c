/* dsd_chain.c — micro-batches at a node: the chain of a decode step through the layers this
 * node hosts, the dispatch to the expert hosts, and the requests other nodes send.
 *
 * A micro-batch travels as a chain, the way docs/architecture.md draws a decode step:
 *   scheduler (coordinator) embeds -> STEP to the host of attn[0]
 *   attention host: for each consecutive layer it hosts, the layer step of experts/ds_layer.h
 *     (the one the single-process engine runs): attention + router (+ shared/dense beside
 *     it), then its expert runner here: one DISPATCH per expert-hosting node with the rows
 *     routed there, their expert ids and weights (experts it hosts itself run in place); the
 *     step is pending until the unweighted expert rows come back (COMBINE), then resumes:
 *     ds_moe_combine in the router's slot order -> next layer
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
 * expert host. */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "ds_experts.h"
#include "ds_log.h"
#include "dsd_data_impl.h"

/* A data-plane request without the plan's token: counted, and logged and answered (the sender
 * may be a node that missed a plan) at most once a second, so a flood neither floods the log
 * nor makes this node queue replies for a sender that never reads them. */
void dsd_data_refuse_nonmember(dsd_data *d, dsd_msg *m)
{
    const Dsd__Envelope *env = m->env;
    d->refused_nonmember++;
    uint64_t now = dsd_now_ns();
    if (now - d->last_refusal_log_ns <= 1000000000ull)
        return; /* neither logged nor answered: a sender that never reads must not make us
                 * queue replies (the data ROUTER has no high-water mark) */
    ds_log_warn("data: refused '%s' (request %llu): not from a member of plan v%llu (%llu "
                "refused so far)",
                ds_wire_body_name(env), (unsigned long long)env->request_id,
                (unsigned long long)d->plan.version, (unsigned long long)d->refused_nonmember);
    d->last_refusal_log_ns = now;
    if (env->body_case != DSD__ENVELOPE__BODY_ERROR) /* never answer an error with one */
        dsd_send_error(d->router, m->peer, m->peer_len, env->request_id,
                       DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT,
                       "not a member of plan v%llu: data-plane requests need the plan's token",
                       (unsigned long long)d->plan.version);
}

void dsd_chain_task_free(struct task *t)
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

static struct task *task_new(dsd_data *d, uint64_t rid, uint64_t step, uint32_t mb, uint32_t layer,
                             uint32_t n)
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
        dsd_chain_task_free(t);
        return NULL;
    }
    ds_layer_step_set_units(t->st, &dsd_host_unit_ops, d->host);
    return t;
}

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
    struct peer *p = dsd_links_of_node(d, (uint32_t)d->plan.head);
    if (p) { /* with the plan's token (dsd_links_send): the head acts only on members' errors */
        char text[512];
        snprintf(text, sizeof(text), "%s: %s", d->o.node, msg);
        Dsd__Envelope env = DSD__ENVELOPE__INIT;
        Dsd__Error e = DSD__ERROR__INIT;
        e.code = DSD__ERROR_CODE__ERROR_CODE_INTERNAL;
        e.message = text;
        env.request_id = rid;
        env.body_case = DSD__ENVELOPE__BODY_ERROR;
        env.error = &e;
        dsd_links_send(d, p, &env, NULL, NULL, 0);
    }
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
        dsd_chain_task_free(t);
        return;
    }
    struct peer *p = dsd_links_of_node(d, dest);
    if (!p) {
        chain_fail(d, t->rid, "no link to node %u", dest);
        dsd_chain_task_free(t);
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
        dsd_chain_task_free(t);
        return;
    }
    memcpy(fr, ds_layer_step_x(t->st), sz);
    p->forwards++;
    p->forward_bytes += sz;
    if (dsd_links_send(d, p, &env, &fr, &sz, 1) < 0)
        chain_fail(d, t->rid, "send to %s failed", p->name);
    dsd_chain_task_free(t);
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
            dsd_guard_step_rollback(dsd_host_seqs(d->host), t->n, t->seq, t->pos);
            dsd_chain_task_free(t);
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
        struct peer *p = dsd_links_of_node(d, node);
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
        if (dsd_links_send(d, p, &de, &rf, &rsz, 1) < 0) {
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
    struct peer *p = dsd_links_of_node(d, node);
    t->dreq[node] = 0;
    uint32_t P = t->doff[node + 1] - t->doff[node];
    if (m->env->body_case == DSD__ENVELOPE__BODY_ERROR) {
        chain_fail(d, t->rid, "node %s: %s", p ? p->name : "?", m->env->error->message);
        dsd_chain_task_free(t);
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
        dsd_chain_task_free(t);
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

int dsd_chain_launch(dsd_data *d, uint64_t rid, uint64_t step, uint32_t mb, uint32_t n,
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
void dsd_chain_release(dsd_data *d, uint64_t seq)
{
    Dsd__Envelope ce = DSD__ENVELOPE__INIT;
    Dsd__Cancel cc = DSD__CANCEL__INIT;
    cc.job = seq;
    ce.body_case = DSD__ENVELOPE__BODY_CANCEL;
    ce.cancel = &cc;
    for (uint32_t n = 0; d->have_plan && n < d->plan.n_nodes; n++) {
        struct peer *p = dsd_links_of_node(d, n);
        if (p)
            dsd_links_send(d, p, &ce, NULL, NULL, 0);
    }
    dsd_host_release(d->host, seq);
}

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

void dsd_chain_serve_step(dsd_data *d, dsd_msg *m)
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
    /* well formed: acted on only when it comes from a member of this plan (dsd_guard.c) */
    if (!dsd_guard_member(&d->plan, env)) {
        dsd_data_refuse_nonmember(d, m);
        return;
    }
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
    /* a step may open a bounded number of sequences, all or none (dsd_guard.c) */
    if (!code &&
        dsd_guard_step_seqs(dsd_host_seqs(d->host), n, t->seq, DSD_GUARD_MAX_NEW_SEQS, &err) < 0)
        code = DSD__ERROR_CODE__ERROR_CODE_MALFORMED;
    if (code) {
        dsd_chain_task_free(t);
        chain_fail(d, rid, "%s", ds_error_str(&err));
        REFUSE(code, "%s", ds_error_str(&err));
    }
    task_run(d, t);
}

void dsd_chain_serve_dispatch(dsd_data *d, dsd_msg *m)
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
    if (!dsd_guard_member(&d->plan, env)) {
        dsd_data_refuse_nonmember(d, m);
        return;
    }
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

/* A reply on the DEALER to peer pi: a dispatch's combine, a probe echo, or an error. */
void dsd_chain_on_peer(dsd_data *d, uint32_t pi)
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
            dsd_links_on_probe_reply(d, p);
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

/* Micro-batches parked longer than step_timeout fail. */
void dsd_chain_expire(dsd_data *d, uint64_t now)
{
    for (uint32_t i = 0; i < MAX_TASKS; i++) {
        struct task *t = &d->tasks[i];
        if (t->used && t->pending && now > t->deadline) {
            chain_fail(d, t->rid, "layer %u: expert hosts did not answer within %lld ms", t->layer,
                       (long long)d->o.step_timeout_ms);
            dsd_guard_step_rollback(dsd_host_seqs(d->host), t->n, t->seq, t->pos);
            dsd_chain_task_free(t);
        }
    }
}
