/* dsd_status.c — the node's state (sd_notify STATUS) and the status documents a client asks for
 * (status, cluster, jobs, placement, expert_stats: JSON, the client boundary) and the cluster spec
 * the planner reads: every node's reported devices and the links measured over the real sockets. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "ds_log.h"
#include "dsd_loop.h"

/* The node's state: sd_notify STATUS and a log line, when it changed. */
void dsd_loop_set_state(struct dsd *d, const char *st)
{
    if (!strcmp(d->state, st))
        return;
    snprintf(d->state, sizeof(d->state), "%s", st);
    uint32_t up = 0;
    for (uint32_t i = 0; i < d->coord.n_nodes; i++)
        up += !d->coord.nodes[i].failed;
    if (d->coordinator)
        dsd_notify("STATUS=%s: coordinator, %u/%u nodes up, plan v%llu", st, up, d->coord.n_nodes,
                   (unsigned long long)d->plan_version);
    else
        dsd_notify("STATUS=%s: worker %s, plan v%llu", st, d->o.node,
                   (unsigned long long)d->plan_version);
    ds_log_notice("state: %s", st);
}

/* Links in cluster-spec form from the scheduler's calibration (a node's link to itself is host
 * memory, not a link). */
static json_t *spec_links(json_t *st)
{
    json_t *links = json_array(), *lk;
    size_t i;
    json_array_foreach(json_is_object(st) ? json_object_get(st, "links") : NULL, i, lk)
    {
        const char *a = json_string_value(json_object_get(lk, "from"));
        const char *b = json_string_value(json_object_get(lk, "to"));
        double bw = json_number_value(json_object_get(lk, "bandwidth_bytes_per_s"));
        if (!a || !b || !strcmp(a, b) || bw <= 0)
            continue;
        /* links are symmetric: the first measurement of a pair stands for both directions */
        bool dup = false;
        size_t k;
        json_t *have;
        json_array_foreach(links, k, have)
        {
            const char *ha = json_string_value(json_object_get(have, "a"));
            const char *hb = json_string_value(json_object_get(have, "b"));
            dup |= (!strcmp(ha, a) && !strcmp(hb, b)) || (!strcmp(ha, b) && !strcmp(hb, a));
        }
        if (dup)
            continue;
        json_array_append_new(links, json_pack("{s:s,s:s,s:f,s:f}", "a", a, "b", b, "latency_s",
                                               json_number_value(json_object_get(lk, "latency_s")),
                                               "bandwidth_bytes_per_s", bw));
    }
    return links;
}

/* The cluster spec of docs/cluster-spec.md: the nodes' reported devices and the links measured
 * over the real sockets (the running scheduler's, else the last one's). planned_only: leave
 * out failed, drained and unusable nodes (the planner's view); links to nodes left out are dropped.
 */
json_t *dsd_status_cluster_spec(struct dsd *d, bool planned_only)
{
    json_t *nodes = json_array(), *links;
    for (uint32_t i = 0; i < d->coord.n_nodes; i++) {
        struct node *n = &d->coord.nodes[i];
        if (n->failed || (planned_only && !dsd_members_plannable(n)))
            continue;
        json_array_append_new(nodes,
                              json_pack("{s:s,s:s,s:o}", "name", n->name, "class",
                                        n->klass[0] ? n->klass : "server", "devices",
                                        n->devices ? json_incref(n->devices) : json_array()));
    }
    json_t *st = dsd_status_measured(d);
    links = spec_links(st);
    json_decref(st);
    /* keep only links between listed nodes */
    for (size_t i = json_array_size(links); i-- > 0;) {
        json_t *lk = json_array_get(links, i);
        int found = 0;
        size_t k;
        json_t *nd;
        json_array_foreach(nodes, k, nd)
        {
            const char *nm = json_string_value(json_object_get(nd, "name"));
            found += !strcmp(nm, json_string_value(json_object_get(lk, "a"))) +
                     !strcmp(nm, json_string_value(json_object_get(lk, "b")));
        }
        if (found < 2)
            json_array_remove(links, i);
    }
    return json_pack("{s:o,s:o}", "nodes", nodes, "links", links);
}

json_t *dsd_status_data(struct dsd *d, const char *what)
{
    char *s = dsd_data_json(d->dp, what);
    json_t *j = s ? json_loads(s, 0, NULL) : NULL;
    free(s);
    return j ? j : json_null();
}

/* Every node's measurements merged: "links" (each node's links to its peers, calibration and
 * traffic), "units" (unit -> {node, measured_compute_s, calls | rows}), "expert_stats" (routing
 * counts summed over the attention hosts) and "nodes" (each node's own report). */
json_t *dsd_status_measured(struct dsd *d)
{
    json_t *links = json_array(), *units = json_object(), *nodes = json_object();
    json_t *layers = json_object(); /* "layer" -> counts array */
    int64_t E = 0;
    for (uint32_t i = 0; i < d->coord.n_nodes; i++) {
        struct node *n = &d->coord.nodes[i];
        json_t *st = i == 0 ? dsd_status_data(d, "stats") : json_incref(n->stats);
        if (!json_is_object(st)) {
            json_decref(st);
            continue;
        }
        json_object_set(nodes, n->name, st);
        size_t k;
        json_t *lk;
        json_array_foreach(json_object_get(st, "links"), k, lk) json_array_append(links, lk);
        const char *un;
        json_t *uv;
        json_object_foreach(json_object_get(st, "units"), un, uv)
        {
            json_t *c = json_object_get(uv, "calls"), *r = json_object_get(uv, "rows");
            json_t *have = json_object_get(units, un);
            if (have) { /* a replicated expert: add this copy's work, list its node */
                json_object_set_new(
                    have, "measured_compute_s",
                    json_real(json_number_value(json_object_get(have, "measured_compute_s")) +
                              json_number_value(json_object_get(uv, "compute_s"))));
                if (r)
                    json_object_set_new(
                        have, "rows",
                        json_integer(json_integer_value(json_object_get(have, "rows")) +
                                     json_integer_value(r)));
                json_t *rn = json_object_get(have, "replica_nodes");
                if (!rn)
                    json_object_set_new(have, "replica_nodes", rn = json_array());
                json_array_append_new(rn, json_string(n->name));
                continue;
            }
            json_t *o = json_pack("{s:s,s:O}", "node", n->name, "measured_compute_s",
                                  json_object_get(uv, "compute_s"));
            if (c)
                json_object_set(o, "calls", c);
            if (r)
                json_object_set(o, "rows", r);
            json_object_set_new(units, un, o);
        }
        json_t *ec = json_object_get(st, "expert_counts");
        if (json_integer_value(json_object_get(ec, "n_routed_experts")) > E)
            E = json_integer_value(json_object_get(ec, "n_routed_experts"));
        json_array_foreach(json_object_get(ec, "layers"), k, lk)
        {
            char key[16];
            snprintf(key, sizeof(key), "%lld",
                     (long long)json_integer_value(json_object_get(lk, "layer")));
            json_t *cur = json_object_get(layers, key), *add = json_object_get(lk, "counts");
            if (!cur) {
                json_object_set_new(layers, key, json_deep_copy(add));
                continue;
            }
            for (size_t e = 0; e < json_array_size(cur) && e < json_array_size(add); e++)
                json_array_set_new(cur, e,
                                   json_integer(json_integer_value(json_array_get(cur, e)) +
                                                json_integer_value(json_array_get(add, e))));
        }
        json_decref(st);
    }
    json_t *ls = json_array();
    for (uint32_t l = 0; l < d->coord.plan.n_layers;
         l++) { /* the last plan's (kept while replanning) */
        char key[16];
        snprintf(key, sizeof(key), "%u", l);
        json_t *c = json_object_get(layers, key);
        if (c)
            json_array_append_new(ls, json_pack("{s:i,s:O}", "layer", (int)l, "counts", c));
    }
    json_decref(layers);
    return json_pack("{s:o,s:o,s:{s:I,s:o},s:o}", "links", links, "units", units, "expert_stats",
                     "n_routed_experts", (json_int_t)E, "layers", ls, "nodes", nodes);
}

char *dsd_status_json(struct dsd *d, const char *what, int *code)
{
    json_t *r = NULL;
    uint64_t now = dsd_now_ns();
    *code = 0;
    if (!strcmp(what, "cluster")) {
        /* the cluster spec of docs/cluster-spec.md, links calibrated over the real sockets */
        r = dsd_status_cluster_spec(d, false);
    } else if (!strcmp(what, "status") || !strcmp(what, "devices") || !strcmp(what, "")) {
        json_t *nodes = json_array();
        for (uint32_t i = 0; i < d->coord.n_nodes; i++) {
            struct node *n = &d->coord.nodes[i];
            const char *st = n->failed       ? "failed"
                             : n->problem[0] ? "unusable"
                             : n->drained    ? "draining"
                             : n->loaded     ? "serving"
                                             : "loading";
            if (i == 0)
                st = d->state;
            json_array_append_new(
                nodes, json_pack("{s:s,s:s,s:s,s:s,s:I,s:o,s:b,s:b}", "name", n->name, "role",
                                 i == 0 ? "coordinator" : "worker", "state", st, "endpoint",
                                 n->endpoint, "heartbeat_age_ms",
                                 (json_int_t)(i == 0 ? 0 : (now - n->last_seen_ns) / 1000000),
                                 "devices", n->devices ? json_incref(n->devices) : json_array(),
                                 "drained", n->drained, "has_model_copy", n->has_model_copy));
            if (n->problem[0])
                json_object_set_new(json_array_get(nodes, json_array_size(nodes) - 1), "problem",
                                    json_string(n->problem));
        }
        json_t *st = dsd_status_measured(d);
        json_t *links = json_is_object(st) ? json_object_get(st, "links") : NULL;
        r = json_pack("{s:s,s:s,s:s,s:I,s:o,s:O}", "cluster", d->o.cluster, "coordinator",
                      d->o.node, "state", d->state, "plan_version", (json_int_t)d->plan_version,
                      "nodes", nodes, "links", links ? links : json_array());
        if (d->coord.plan_error[0])
            json_object_set_new(r, "plan_error", json_string(d->coord.plan_error));
        if (d->model_digest[0])
            json_object_set_new(r, "model_digest", json_string(d->model_digest));
        json_object_set_new(r, "instance", json_string(d->instance));
        if (d->coord.n_refused) { /* the last hellos refused, and why */
            json_t *rf = json_array();
            for (uint32_t k = 0; k < d->coord.n_refused; k++)
                json_array_append_new(
                    rf, json_pack("{s:s,s:s,s:I}", "name", d->coord.refused[k].name, "reason",
                                  d->coord.refused[k].reason, "age_ms",
                                  (json_int_t)((now - d->coord.refused[k].at_ns) / 1000000)));
            json_object_set_new(r, "refused", rf);
        }
        if (dsd_curve_enabled())
            json_object_set_new(r, "curve_refused", json_integer((json_int_t)dsd_curve_refused()));
        json_t *prog = dsd_progress_json(d); /* loading / streaming under way */
        if (prog)
            json_object_set_new(r, "progress", prog);
        json_decref(st);
    } else if (!strcmp(what, "jobs")) {
        r = dsd_status_data(d, "jobs");
        /* which coordinator process answers: a client whose job is not in the list of the
         * instance it submitted to knows the job is lost (libdsclient) */
        if (json_is_object(r))
            json_object_set_new(r, "instance", json_string(d->instance));
    } else if (!strcmp(what, "placement")) {
        char *pj = d->coord.have_plan ? dsd_plan_json(&d->coord.plan) : NULL;
        json_t *plan = pj ? json_loads(pj, 0, NULL) : json_null();
        free(pj);
        json_t *mine = dsd_status_data(d, "stats");
        json_t *local = json_is_object(mine) ? json_incref(json_object_get(mine, "units")) : NULL;
        json_decref(mine);
        /* the solver's predicted per-device / per-link times beside the measured ones */
        json_t *pred = d->coord.have_plan && d->coord.plan.solver_json
                           ? json_loads(d->coord.plan.solver_json, 0, NULL)
                           : NULL;
        r = json_pack("{s:o,s:o,s:o,s:o}", "plan", plan ? plan : json_null(), "measured",
                      dsd_status_measured(d), "coordinator_units", local ? local : json_null(),
                      "predicted", pred ? pred : json_null());
        if (d->coord.plan_error[0])
            json_object_set_new(r, "plan_error", json_string(d->coord.plan_error));
    } else if (!strcmp(what, "expert_stats")) {
        json_t *st = dsd_status_measured(d);
        json_t *es = json_is_object(st) ? json_object_get(st, "expert_stats") : NULL;
        r = es ? json_incref(es) : json_null();
        json_decref(st);
    } else {
        *code = DSD__ERROR_CODE__ERROR_CODE_MALFORMED;
        return NULL;
    }
    char *s = json_dumps(r, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(r);
    return s;
}

void dsd_status_reply(void *sock, const void *peer, size_t pl, uint64_t req, const char *json)
{
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__StatusReply sr = DSD__STATUS_REPLY__INIT;
    sr.json = (char *)json;
    env.request_id = req;
    env.body_case = DSD__ENVELOPE__BODY_STATUS_REPLY;
    env.status_reply = &sr;
    dsd_send(sock, peer, pl, &env, NULL, NULL, 0);
}
