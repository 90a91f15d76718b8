/* dsd_members.c — the coordinator's membership: hellos (a node
 * joins or rejoins; its devices and data endpoint), heartbeats (answered; a node is back),
 * load progress (streamed weights acknowledged, a node loaded or failed), worker statistics.
 * What membership changes mean for the plan is dsd_rollout.c's. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

#include "ds_log.h"
#include "dsd_loop.h"

static json_t *device_from_wire(const Dsd__Device *d)
{
    json_t *o = json_pack("{s:s,s:s,s:s,s:I,s:f,s:f}", "name", d->name ?: "", "kind", d->kind ?: "",
                          "class", d->klass ?: "", "memory_bytes", (json_int_t)d->memory_bytes,
                          "mem_bw_bytes_per_s", d->mem_bw_bytes_per_s, "flops", d->flops);
    if (d->host_link_bytes_per_s > 0)
        json_object_set_new(o, "host_link_bytes_per_s", json_real(d->host_link_bytes_per_s));
    if (d->launch_s > 0)
        json_object_set_new(o, "launch_s", json_real(d->launch_s));
    if (d->shares_silicon_with && d->shares_silicon_with[0])
        json_object_set_new(o, "shares_silicon_with", json_string(d->shares_silicon_with));
    return o;
}

/* A worker's StepStats, checked and kept in dsd_data's "stats" JSON form. */
static void take_stats(struct dsd *d, struct node *n, const Dsd__StepStats *st)
{
    if (!d->coord.have_plan)
        return;
    json_t *j = dsd_stats_from_wire(st, n->name, d->coord.plan.n_layers, d->coord.plan.n_experts);
    if (!j)
        return;
    json_decref(n->stats);
    n->stats = j;
}

/* Whether a control socket identity belongs to node `name`: the name itself, or
 * name#instance (dsd_main.c: letters and digits after the '#'). */
static bool identity_is(const char *name, const uint8_t *peer, size_t len)
{
    size_t n = strlen(name);
    if (len < n || memcmp(name, peer, n))
        return false;
    if (len == n)
        return true;
    if (peer[n] != '#' || len - n > 33)
        return false;
    for (size_t i = n + 1; i < len; i++)
        if (!((peer[i] >= '0' && peer[i] <= '9') || (peer[i] >= 'a' && peer[i] <= 'z') ||
              (peer[i] >= 'A' && peer[i] <= 'Z')))
            return false;
    return true;
}

/* Refuses a hello with err's reason: an Error to the node (which logs it), a log line here,
 * repeated at most every 10 s for the same reason (a refused node says hello every heartbeat),
 * and an entry in the status document's "refused" list. */
static void refuse_hello(struct dsd *d, const dsd_msg *m, const char *name, uint64_t req,
                         Dsd__ErrorCode code, const ds_error *err)
{
    struct dsd_coord *c = &d->coord;
    uint32_t k = 0;
    while (k < c->n_refused && strcmp(c->refused[k].name, name ? name : ""))
        k++;
    if (k == c->n_refused && c->n_refused == sizeof(c->refused) / sizeof(c->refused[0])) {
        /* full: the oldest entry goes */
        memmove(c->refused, c->refused + 1, sizeof(c->refused) - sizeof(c->refused[0]));
        k = c->n_refused - 1;
    } else if (k == c->n_refused) {
        c->n_refused++;
    }
    snprintf(c->refused[k].name, sizeof(c->refused[k].name), "%s", name ? name : "");
    snprintf(c->refused[k].reason, sizeof(c->refused[k].reason), "%s", ds_error_str(err));
    c->refused[k].at_ns = dsd_now_ns();
    static char last[256];
    static uint64_t last_ns;
    uint64_t now = dsd_now_ns();
    const char *why = ds_error_str(err);
    if (strncmp(last, why, sizeof(last) - 1) || now - last_ns > 10000000000ull) {
        ds_log_err("control: refused hello from '%.*s': %s", (int)m->peer_len,
                   (const char *)m->peer, why);
        snprintf(last, sizeof(last), "%s", why);
        last_ns = now;
    }
    dsd_send_error(d->control, m->peer, m->peer_len, req, code, "hello refused: %s", why);
}

void dsd_members_on_control(struct dsd *d)
{
    dsd_msg m;
    ds_error err = {0};
    int rc = dsd_msg_recv(d->control, true, DS_WIRE_MAX_ENVELOPE_BYTES, &m, &err);
    if (rc == -EAGAIN)
        return;
    if (rc < 0) {
        ds_log_warn("control: refused a message from '%.*s': %s", (int)m.peer_len,
                    (const char *)m.peer, ds_error_str(&err));
        if (m.peer_len)
            dsd_send_error(d->control, m.peer, m.peer_len, 0, m.refused, "%s", ds_error_str(&err));
        return;
    }
    Dsd__Envelope *env = m.env;
    struct node *n = dsd_members_find_peer(d, m.peer, m.peer_len);
    switch (env->body_case) {
    case DSD__ENVELOPE__BODY_HELLO: {
        Dsd__Hello *h = env->hello;
        if (!h->node || !identity_is(h->node, m.peer, m.peer_len) || !h->data_endpoint ||
            !h->data_endpoint[0] || strlen(h->data_endpoint) >= DSD_STR_MAX) {
            ds_log_warn("control: refused hello: the socket identity must be the node name (or "
                        "name#instance) and a data endpoint is required");
            dsd_send_error(d->control, m.peer, m.peer_len, env->request_id,
                           DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "bad hello");
            break;
        }
        /* a profile that cannot be true never reaches membership or the planner: the node is
         * refused as a whole, whatever it was before (the plan it is in stays as it is) */
        if (dsd_guard_hello(h, &err) < 0) {
            refuse_hello(d, &m, h->node, env->request_id, DSD__ERROR_CODE__ERROR_CODE_MALFORMED,
                         &err);
            break;
        }
        n = dsd_members_find(d, h->node, strlen(h->node));
        if (n == &d->coord.nodes[0] ||
            (n && !n->failed &&
             (n->peer_len != m.peer_len || memcmp(n->peer, m.peer, m.peer_len)))) {
            /* another daemon holds this name (a live node's heartbeats keep it; a node that
             * died is failed after heartbeat_misses and its name free again) */
            ds_error_set(&err, -EEXIST,
                         "node name '%s' is already taken by %s: give this node another name "
                         "(node = ...)",
                         h->node, n == &d->coord.nodes[0] ? "the coordinator" : "a live node");
            refuse_hello(d, &m, h->node, env->request_id, DSD__ERROR_CODE__ERROR_CODE_BUSY, &err);
            break;
        }
        /* a copy of the checkpoint must be the coordinator's: same files, same weights */
        if (h->has_model_copy && h->model_digest && h->model_digest[0] && d->model_digest[0] &&
            strcmp(h->model_digest, d->model_digest)) {
            ds_error_set(&err, -EBADMSG,
                         "model digest mismatch: node %s has %s, the coordinator has %s (%s); "
                         "its checkpoint copy is another model",
                         h->node, h->model_digest, d->model_digest, d->o.model);
            refuse_hello(d, &m, h->node, env->request_id, DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT,
                         &err);
            break;
        }
        if (!n) {
            if (d->coord.n_nodes >= MAX_NODES) {
                dsd_send_error(d->control, m.peer, m.peer_len, env->request_id,
                               DSD__ERROR_CODE__ERROR_CODE_BUSY, "cluster full");
                break;
            }
            n = &d->coord.nodes[d->coord.n_nodes++];
            memset(n, 0, sizeof(*n));
            snprintf(n->name, sizeof(n->name), "%s", h->node);
            ds_log_notice("node %s joined (%s)", n->name, h->data_endpoint);
        } else if (n->failed) {
            ds_log_notice("node %s rejoined", n->name);
        }
        n->failed = false;
        n->loaded = false;
        n->has_model_copy = h->has_model_copy;
        memcpy(n->peer, m.peer, m.peer_len);
        n->peer[m.peer_len] = 0;
        n->peer_len = m.peer_len;
        if (strcmp(n->problem, h->problem ? h->problem : "")) {
            snprintf(n->problem, sizeof(n->problem), "%s", h->problem ? h->problem : "");
            if (n->problem[0])
                ds_log_err("node %s cannot host units: %s; planning without it", n->name,
                           n->problem);
        }
        n->stream = (dsd_stream_out_free(n->stream), NULL); /* it restarted: streams afresh */
        snprintf(n->endpoint, sizeof(n->endpoint), "%s", h->data_endpoint);
        json_decref(n->devices);
        n->devices = json_array();
        for (size_t i = 0; i < h->n_devices && i < 64; i++)
            json_array_append_new(n->devices, device_from_wire(h->devices[i]));
        snprintf(n->klass, sizeof(n->klass), "%s", h->node_class ? h->node_class : "server");
        n->last_seen_ns = dsd_now_ns();
        Dsd__Envelope rep = DSD__ENVELOPE__INIT;
        Dsd__Welcome w = DSD__WELCOME__INIT;
        w.cluster = d->o.cluster;
        w.node_id = (uint64_t)(n - d->coord.nodes);
        w.heartbeat_ms = (uint32_t)d->o.heartbeat_ms;
        rep.request_id = env->request_id;
        rep.body_case = DSD__ENVELOPE__BODY_WELCOME;
        rep.welcome = &w;
        dsd_send(d->control, m.peer, m.peer_len, &rep, NULL, NULL, 0);
        dsd_loop_set_state(d, d->coord.serving ? "serving" : "joining");
        dsd_data_probe(d->dp, n->name, n->endpoint); /* measure the link to it */
        if (!d->coord.have_plan && d->coord.n_nodes >= 1 + (uint32_t)d->o.expect_workers) {
            /* plan once the links to every node are measured (on_timer), or give up waiting
             * after link_wait_ms and plan with what is known */
            if (!d->coord.plan_due_ns)
                d->coord.plan_due_ns = dsd_now_ns() + (uint64_t)d->o.link_wait_ms * 1000000ull;
        } else if (d->coord.have_plan && !d->coord.serving) {
            dsd_rollout_start(d); /* a node (re)joined during rollout: roll out again */
        } else if (d->coord.have_plan && !dsd_rollout_plan_has(d, n->name)) {
            d->coord.replan_when_idle = true; /* a new node, or one the plan left out: on_timer */
        } else if (d->coord.have_plan) {
            /* a node came back (restarted): send it its part again */
            Dsd__Plan wp;
            if (dsd_plan_to_wire(&d->coord.plan, &wp) == 0) {
                Dsd__Envelope pe = DSD__ENVELOPE__INIT;
                pe.body_case = DSD__ENVELOPE__BODY_PLAN;
                pe.plan = &wp;
                dsd_members_send(d, n, &pe);
                dsd_plan_wire_clear(&wp);
            }
        }
        break;
    }
    case DSD__ENVELOPE__BODY_HEARTBEAT:
        if (!n) {
            dsd_send_error(d->control, m.peer, m.peer_len, env->request_id,
                           DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT, "unknown node: say hello");
            break;
        }
        n->last_seen_ns = dsd_now_ns();
        if (n->failed) {
            n->failed = false;
            ds_log_notice("node %s is back", n->name);
            if (!dsd_rollout_plan_has(d, n->name))
                d->coord.replan_when_idle = true;
        }
        {
            Dsd__Envelope rep = DSD__ENVELOPE__INIT;
            Dsd__Heartbeat hb = DSD__HEARTBEAT__INIT;
            hb.seq = env->heartbeat->seq;
            hb.plan_version = d->plan_version;
            hb.state = d->state;
            rep.body_case = DSD__ENVELOPE__BODY_HEARTBEAT;
            rep.heartbeat = &hb;
            dsd_send(d->control, m.peer, m.peer_len, &rep, NULL, NULL, 0);
        }
        break;
    case DSD__ENVELOPE__BODY_LOAD_PROGRESS:
        if (!n)
            break;
        if (env->load_progress->plan_version != d->plan_version) {
            ds_log_warn("node %s: load progress for plan v%llu, current v%llu (ignored)", n->name,
                        (unsigned long long)env->load_progress->plan_version,
                        (unsigned long long)d->plan_version);
            break;
        }
        if (env->load_progress->error && env->load_progress->error[0]) {
            /* it cannot host its units (a checkpoint that fails to open, streamed weights it
             * cannot store, ...): it stays a member, the state says why, and the next plan is
             * made without it until it says hello again */
            ds_log_err("node %s failed to load plan v%llu: %s; planning without it", n->name,
                       (unsigned long long)d->plan_version, env->load_progress->error);
            snprintf(n->problem, sizeof(n->problem), "loading plan v%llu failed: %s",
                     (unsigned long long)d->plan_version, env->load_progress->error);
            n->stream = (dsd_stream_out_free(n->stream), NULL);
            if (d->o.auto_replan)
                dsd_rollout_start(d);
            break;
        }
        if (!env->load_progress->done && n->stream) {
            dsd_stream_out_ack(n->stream, env->load_progress->bytes_loaded);
            n->stream_acked = env->load_progress->bytes_loaded;
            dsd_stream_out_pump(n->stream, d->control, (const char *)n->peer);
            break;
        }
        if (env->load_progress->done) {
            n->stream = (dsd_stream_out_free(n->stream), NULL);
            n->loaded = true;
            ds_log_notice("node %s loaded plan v%llu", n->name,
                          (unsigned long long)d->plan_version);
            dsd_rollout_maybe_serve(d);
        }
        break;
    case DSD__ENVELOPE__BODY_STEP_STATS:
        if (n)
            take_stats(d, n, env->step_stats);
        break;
    case DSD__ENVELOPE__BODY_ERROR:
        break;
    default:
        ds_log_warn("control: refused '%s' from %.*s: not a control message",
                    ds_wire_body_name(env), (int)m.peer_len, (const char *)m.peer);
        dsd_send_error(d->control, m.peer, m.peer_len, env->request_id,
                       DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "'%s' is not a control message",
                       ds_wire_body_name(env));
    }
    dsd_msg_close(&m);
}

/* Coordinator: the links to every live node are measured (or nothing to wait for). */
bool dsd_members_links_measured(struct dsd *d)
{
    json_t *st = dsd_status_data(d, "stats");
    bool all = true;
    for (uint32_t i = 1; i < d->coord.n_nodes && all; i++) {
        if (d->coord.nodes[i].failed)
            continue;
        bool found = false;
        size_t k;
        json_t *lk;
        json_array_foreach(json_object_get(st, "links"), k, lk)
        {
            if (!strcmp(json_string_value(json_object_get(lk, "to")) ?: "",
                        d->coord.nodes[i].name) &&
                json_is_true(json_object_get(lk, "calibrated")))
                found = true;
        }
        all = found;
    }
    json_decref(st);
    return all;
}
