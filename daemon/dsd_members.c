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

struct node *dsd_members_find(struct dsd *d, const char *name, size_t len)
{
    for (uint32_t i = 0; i < d->coord.n_nodes; i++)
        if (strlen(d->coord.nodes[i].name) == len && !memcmp(d->coord.nodes[i].name, name, len))
            return &d->coord.nodes[i];
    return NULL;
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

/* Refuses a hello with err's reason: an Error to the node (which logs it) and a log line here,
 * repeated at most every 10 s for the same reason (a refused node says hello every heartbeat). */
static void refuse_hello(struct dsd *d, const dsd_msg *m, uint64_t req, Dsd__ErrorCode code,
                         const ds_error *err)
{
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
    struct node *n = dsd_members_find(d, (const char *)m.peer, m.peer_len);
    switch (env->body_case) {
    case DSD__ENVELOPE__BODY_HELLO: {
        Dsd__Hello *h = env->hello;
        if (!h->node || strlen(h->node) != m.peer_len || memcmp(h->node, m.peer, m.peer_len) ||
            !h->data_endpoint || !h->data_endpoint[0] || strlen(h->data_endpoint) >= DSD_STR_MAX) {
            ds_log_warn("control: refused hello: node name must equal the socket identity and a "
                        "data endpoint is required");
            dsd_send_error(d->control, m.peer, m.peer_len, env->request_id,
                           DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "bad hello");
            break;
        }
        /* a profile that cannot be true never reaches membership or the planner: the node is
         * refused as a whole, whatever it was before (the plan it is in stays as it is) */
        if (dsd_guard_hello(h, &err) < 0) {
            refuse_hello(d, &m, env->request_id, DSD__ERROR_CODE__ERROR_CODE_MALFORMED, &err);
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
                dsd_send(d->control, n->name, strlen(n->name), &pe, NULL, NULL, 0);
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
            ds_log_err("node %s failed to load: %s", n->name, env->load_progress->error);
            n->failed = true;
            n->stream = (dsd_stream_out_free(n->stream), NULL);
            break;
        }
        if (!env->load_progress->done && n->stream) {
            dsd_stream_out_ack(n->stream, env->load_progress->bytes_loaded);
            dsd_stream_out_pump(n->stream, d->control, n->name);
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
