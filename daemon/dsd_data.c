/* dsd_data.c — a node's data plane: the thread that owns the data ROUTER, the node's units
 * (dsd_host), a DEALER to every other node (dsd_links.c) and the micro-batches at this node
 * (dsd_chain.c), and on the coordinator the scheduler (dsd_sched.h), whose port it is. It
 * talks to the event loop only over inproc PAIR sockets: plan install, link probe requests,
 * reloaded options, stop; and publishes snapshots (this node's measurements, the job list)
 * under a mutex. Nothing in it blocks on a peer. */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "ds_tokenizer.h"
#include "ds_log.h"
#include "dsd_data_impl.h"

static void publish_jobs(dsd_data *d);

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
    /* cancels and errors only from members of the installed plan: they carry its token, which
     * only the plan's nodes were sent (dsd_guard.c); steps and dispatches are checked the same
     * way once their header is found well formed (dsd_chain.c); a probe is only echoed */
    if ((env->body_case == DSD__ENVELOPE__BODY_CANCEL ||
         env->body_case == DSD__ENVELOPE__BODY_ERROR) &&
        d->have_plan && !dsd_guard_member(&d->plan, env)) {
        dsd_data_refuse_nonmember(d, m);
        dsd_msg_close(m);
        return;
    }
    switch (env->body_case) {
    case DSD__ENVELOPE__BODY_LINK_PROBE:
        dsd_links_serve_probe(d, m);
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
            dsd_chain_serve_step(d, m);
        else
            dsd_chain_serve_dispatch(d, m);
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
            json_array_append_new(row,
                                  json_integer((json_int_t)d->expert_counts[(size_t)l * E + e]));
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

enum { OP_STOP = 1, OP_INSTALL, OP_PROBE, OP_OPTS, OP_FAIL_JOBS };

struct ctl_msg {
    int op;
    dsd_plan *plan; /* OP_INSTALL: heap plan, ownership passes (NULL: uninstall) */
    dsd_host *host; /* OP_INSTALL: ownership passes */
    uint32_t self;
    char name[64];              /* OP_PROBE */
    char endpoint[DSD_STR_MAX]; /* OP_PROBE */
    dsd_opts o;                 /* OP_OPTS: the options after a reload */
    char why[400];              /* OP_FAIL_JOBS: why the jobs cannot go on */
};

/* ---- the scheduler's port ------------------------------------------------------------------ */

static int port_launch(void *ctx, const dsd_sched_batch *b, ds_error *err)
{
    return dsd_chain_launch(ctx, b->rid, b->step, b->mb, b->n, b->seq, b->pos, b->x, err);
}

static void port_release(void *ctx, uint64_t job)
{
    dsd_chain_release(ctx, job);
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
        /* a job is fed again (its prompt and tokens so far) after a failed micro-batch or on a
         * new plan, this many times at most (dsd_sched_adopt) */
        .max_replays = 8,
    };
    /* every frame of a micro-batch must pass the peers' max_frame_bytes (dsd_guard.c) */
    uint32_t fit = dsd_guard_rows_per_frame(ds_model_get_config(dsd_host_model(d->host)),
                                            d->o.max_frame_bytes);
    if (lim.max_rows_per_step > fit) {
        ds_log_info("micro-batches carry at most %u rows (max_frame_bytes %lld)", fit,
                    (long long)d->o.max_frame_bytes);
        lim.max_rows_per_step = fit;
    }
    int rc = dsd_sched_new(dsd_host_model(d->host), dsd_host_pool(d->host), &tok, &lim, &SCHED_PORT,
                           d, &d->sched, err);
    if (rc == 0)
        dsd_sched_set_units(d->sched, &dsd_host_unit_ops, d->host);
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
            dsd_chain_task_free(&d->tasks[i]);
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
    /* the jobs belong to the coordinator, not to the plan: they outlive it and are replayed
     * on the new one (dsd_sched_adopt); the old scheduler is kept aside meanwhile (it uses
     * nothing of the old units once no micro-batch runs) */
    dsd_sched *old = d->sched;
    d->sched = NULL;
    uninstall(d, "error");
    if (!cm->plan) {
        dsd_host_free(cm->host);
        dsd_sched_fail_all(old, "the plan was withdrawn and no new one was made");
        dsd_sched_free(old, "error");
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
        struct peer *p = dsd_links_add(d, d->plan.nodes[n], d->plan.endpoints[n]);
        if (p)
            d->peer_of[n] = (int32_t)(p - d->peers);
    }
    d->have_plan = true;
    if (d->coordinator) {
        ds_error err = {0};
        if (sched_start(d, &err) < 0) {
            ds_log_err("scheduler: %s", ds_error_str(&err));
            char why[400];
            snprintf(why, sizeof(why), "the new plan's scheduler did not start: %s",
                     ds_error_str(&err));
            dsd_sched_fail_all(old, why);
        } else {
            uint32_t n = dsd_sched_adopt(d->sched, old);
            old = NULL;
            if (n)
                ds_log_notice("data: %u jobs replayed on plan v%llu", n,
                              (unsigned long long)d->plan.version);
        }
    }
    dsd_sched_free(old, "error");
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
        dsd_links_add(d, cm.name, cm.endpoint);
        return true;
    case OP_FAIL_JOBS:
        cm.why[sizeof(cm.why) - 1] = 0;
        dsd_sched_fail_all(d->sched, cm.why);
        return true;
    case OP_OPTS:
        ds_log_info("data: reloaded options (step_timeout_ms %lld)",
                    (long long)cm.o.step_timeout_ms);
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
    dsd_chain_expire(d, now);
    dsd_links_expire(d, now);
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
                dsd_chain_on_peer(d, i);
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

void dsd_data_fail_jobs(dsd_data *d, const char *why)
{
    struct ctl_msg cm = {.op = OP_FAIL_JOBS};
    snprintf(cm.why, sizeof(cm.why), "%s", why);
    zmq_send(d->loop_ctl, &cm, sizeof(cm), 0);
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
