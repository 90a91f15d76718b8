/* dsd_main.c — the dsd daemon: options, roles, and the event loop that owns membership,
 * heartbeats, plan rollout, the client socket and the node's data socket.
 *
 * Life of a node: parse options (one table, dsd_options.c) -> bind sockets -> describe the
 * local devices -> start the data thread (dsd_data.c: it owns the data socket from then on) ->
 * worker: hello to the coordinator until welcomed; coordinator: wait for expect_workers hellos
 * and the links to them measured -> the coordinator builds a plan and sends it to every node
 * -> every node opens its units (mmap), hands them to its data thread and reports
 * LoadProgress -> the coordinator serves clients (its scheduler runs in its data thread).
 * Workers send their measurements (StepStats) with every heartbeat. SIGTERM/SIGINT stop the loop cleanly; SIGHUP reloads the
 * reloadable options. Under systemd: READY=1 once devices are known and the node has joined
 * (the coordinator: once the cluster serves), STATUS=<one line> on every change, WATCHDOG=1
 * from the loop at half the watchdog period. */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>
#include <systemd/sd-daemon.h>

#include "ds_devices.h"
#include "ds_log.h"
#include "ds_version.h"
#include "dsd.h"

#define MAX_NODES  64
#define SCHED_PIPE "inproc://dsd-sched"

struct node {
    char name[64];
    char endpoint[DSD_STR_MAX];
    json_t *devices; /* array of device objects from the hello */
    uint64_t last_seen_ns;
    bool loaded, failed, drained, has_model_copy;
    json_t *stats; /* the node's last StepStats, in dsd_data's "stats" form */
    dsd_stream_out *stream; /* its units' weights being streamed (no checkpoint copy) */
    char state[16];
    char klass[16]; /* server | gpu | edge */
};

struct dsd {
    dsd_opts o, cli_o;
    const char *config_path;
    int argc;
    char **argv;
    bool coordinator;
    void *zctx, *data, *control, *client, *pipe, *spipe;
    dsd_data *dp; /* the data thread */
    int sigfd;
    /* membership (coordinator: all nodes, nodes[0] = self) */
    struct node nodes[MAX_NODES];
    uint32_t n_nodes;
    dsd_plan plan;
    bool have_plan, serving, stopping;
    uint64_t plan_version;
    uint64_t plan_due_ns;  /* coordinator: first plan once links are measured, or at this time */
    struct solve_job *solving; /* a plan being made on the solver thread */
    bool rollout_again;        /* membership changed while solving: plan again after */
    uint8_t replan_peer[DSD_MAX_PEER_ID]; /* the client waiting for `dsctl replan` */
    size_t replan_peer_len;
    uint64_t replan_req;
    bool replan_when_idle;     /* nodes are up outside the plan: take them in when idle */
    char plan_error[512];  /* why the last plan failed ("" when it did not) */
    /* worker */
    bool welcomed;
    uint64_t last_coord_ns, last_hello_ns, hb_seq;
    char state[16];
    uint64_t last_hb_ns, last_wd_ns, wd_usec;
    uint32_t n_layers_hint; /* worker: layers of the model of the installed plan */
    dsd_stream_in *stream_in; /* worker without a checkpoint copy: weights being received */
    uint8_t *pending_plan;    /* the packed Plan envelope waiting for them */
    size_t pending_plan_len;
};

/* ---- local devices ------------------------------------------------------------------------ */

static json_t *g_devices; /* this node's cluster-spec device array (devices/ discovery) */
static char g_node_class[16] = "server";

/* Discovers (and, when asked, calibrates) this node's devices; falls back to one CPU device
 * described from sysconf when discovery fails, so a node can still join. */
static void discover_devices(const dsd_opts *o)
{
    ds_devices_options dopt = {.no_opencl = !o->discover_opencl,
                               .config_path = o->devices_config[0] ? o->devices_config : NULL};
    ds_device_list *l = NULL;
    ds_error err = {0};
    char *js = NULL;
    json_t *node = NULL;
    if (ds_device_list_discover(&dopt, &l, &err) == 0) {
        ds_calibrate_options copt = {.state_dir = o->state_dir};
        if (o->calibrate && ds_device_list_calibrate(l, &copt, &err) < 0)
            ds_log_warn("device calibration: %s", ds_error_str(&err));
        if (ds_device_list_spec_json(l, &js, &err) == 0)
            node = json_loads(js, 0, NULL);
        snprintf(g_node_class, sizeof(g_node_class), "%s", ds_device_list_node_class(l));
    } else {
        ds_log_warn("device discovery: %s (reporting one CPU device)", ds_error_str(&err));
    }
    free(js);
    ds_device_list_free(l);
    json_t *devs = node ? json_object_get(node, "devices") : NULL;
    if (devs && json_array_size(devs)) {
        g_devices = json_incref(devs);
    } else {
        long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
        g_devices = json_pack("[{s:s,s:s,s:s,s:I}]", "name", "cpu0", "kind", "cpu", "class",
                              "server", "memory_bytes", (json_int_t)pages * psz);
    }
    json_decref(node);
    ds_log_info("%zu devices discovered", json_array_size(g_devices));
}

static json_t *local_devices(void)
{
    return json_deep_copy(g_devices);
}

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

static void set_state(struct dsd *d, const char *st)
{
    if (!strcmp(d->state, st))
        return;
    snprintf(d->state, sizeof(d->state), "%s", st);
    uint32_t up = 0;
    for (uint32_t i = 0; i < d->n_nodes; i++)
        up += !d->nodes[i].failed;
    if (d->coordinator)
        dsd_notify("STATUS=%s: coordinator, %u/%u nodes up, plan v%llu", st, up, d->n_nodes,
                   (unsigned long long)d->plan_version);
    else
        dsd_notify("STATUS=%s: worker %s, plan v%llu", st, d->o.node,
                   (unsigned long long)d->plan_version);
    ds_log_notice("state: %s", st);
}

/* ---- cluster spec ------------------------------------------------------------------------- */

static json_t *data_obj(struct dsd *d, const char *what);
static json_t *measured(struct dsd *d);

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
 * out failed and drained nodes (the planner's view); links to nodes left out are dropped. */
static json_t *cluster_spec(struct dsd *d, bool planned_only)
{
    json_t *nodes = json_array(), *links;
    for (uint32_t i = 0; i < d->n_nodes; i++) {
        struct node *n = &d->nodes[i];
        if (n->failed || (planned_only && n->drained))
            continue;
        json_array_append_new(nodes, json_pack("{s:s,s:s,s:o}", "name", n->name, "class",
                                               n->klass[0] ? n->klass : "server", "devices",
                                               n->devices ? json_incref(n->devices)
                                                          : json_array()));
    }
    json_t *st = measured(d);
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

/* ---- plan rollout ------------------------------------------------------------------------- */

/* Opens this node's units of plan p (node index self) and hands them and the plan to the
 * data thread. */
static int install_plan(struct dsd *d, const char *model_dir, const dsd_plan *p, uint32_t self,
                        ds_error *err)
{
    dsd_units u;
    dsd_host *h = NULL;
    int rc = dsd_plan_units_of(p, self, &u);
    if (rc < 0)
        return ds_error_set(err, rc, "out of memory");
    rc = dsd_host_new(model_dir, &u, (uint32_t)d->o.threads, (uint32_t)d->o.max_context, &h, err);
    dsd_units_clear(&u);
    if (rc < 0)
        return rc;
    return dsd_data_install(d->dp, p, self, h, err);
}

static void write_plan_file(struct dsd *d, const char *json)
{
    char path[PATH_MAX + 16];
    snprintf(path, sizeof(path), "%s/plan.json", d->o.state_dir);
    FILE *f = fopen(path, "we");
    if (!f) {
        ds_log_warn("%s: %s (plan not saved)", path, strerror(errno));
        return;
    }
    fprintf(f, "%s\n", json);
    fclose(f);
}

static void maybe_serve(struct dsd *d);
static void reply_json(void *sock, const void *peer, size_t pl, uint64_t req, const char *json);

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
    double *stats; /* [L * E] routing counts measured so far, or NULL (uniform popularity) */
    char strategy[32];
    uint32_t batch, ctx;
    uint64_t version;
    dsd_plan plan;
    int rc;
    ds_error err;
};

static void solve_job_free(struct solve_job *j)
{
    if (!j)
        return;
    if (j->efd >= 0)
        close(j->efd);
    ds_model_free(j->probe);
    free(j->names);
    free(j->eps);
    free(j->spec);
    free(j->stats);
    dsd_plan_clear(&j->plan);
    free(j);
}

static void *solve_main(void *arg)
{
    struct solve_job *j = arg;
    j->rc = dsd_plan_solve(&j->plan, ds_model_get_config(j->probe), j->spec, j->n,
                           (const char(*)[64])j->names, (const char(*)[DSD_STR_MAX])j->eps,
                           j->strategy, j->batch, j->ctx, j->stats, j->version, &j->err);
    dsd_solve_thread_done();
    uint64_t one = 1;
    if (write(j->efd, &one, sizeof(one)) != sizeof(one))
        ds_log_err("plan: cannot signal the loop");
    return NULL;
}

static void replan_reply(struct dsd *d, int rc)
{
    if (!d->replan_peer_len)
        return;
    if (rc < 0) {
        dsd_send_error(d->client, d->replan_peer, d->replan_peer_len, d->replan_req,
                       DSD__ERROR_CODE__ERROR_CODE_INTERNAL, "replan failed: %s",
                       d->plan_error[0] ? d->plan_error : strerror(-rc));
    } else {
        char buf[96];
        snprintf(buf, sizeof(buf), "{\"plan_version\":%llu}", (unsigned long long)d->plan_version);
        reply_json(d->client, d->replan_peer, d->replan_peer_len, d->replan_req, buf);
    }
    d->replan_peer_len = 0;
}

/* A node without a checkpoint copy: stream it the checkpoint of exactly its units. */
static void start_stream(struct dsd *d, struct node *n, uint32_t plan_idx)
{
    dsd_stream_out_free(n->stream);
    n->stream = NULL;
    if (n->has_model_copy)
        return;
    dsd_units u;
    ds_error err = {0};
    int rc = dsd_plan_units_of(&d->plan, plan_idx, &u);
    if (rc == 0) {
        rc = dsd_stream_out_new(d->o.model, &u, d->plan.version, &n->stream, &err);
        dsd_units_clear(&u);
    }
    if (rc < 0) {
        ds_log_err("node %s has no checkpoint copy and its weights cannot be streamed: %s; "
                   "planning without it",
                   n->name, err.msg[0] ? ds_error_str(&err) : strerror(-rc));
        n->failed = true;
        d->rollout_again = true; /* after this rollout (its plan cannot load on n) */
        return;
    }
    ds_log_notice("node %s has no checkpoint copy: streaming its units (%.1f MiB)", n->name,
                  (double)dsd_stream_out_total(n->stream) / (1 << 20));
    dsd_stream_out_pump(n->stream, d->control, n->name);
}

/* Rolls out the plan job j made (or reports why there is none): every planned worker gets the
 * whole plan, the coordinator opens its units. Frees j. */
static int rollout_finish(struct dsd *d, struct solve_job *j)
{
    ds_error err = j->err;
    int rc = j->rc;
    if (rc < 0) {
        snprintf(d->plan_error, sizeof(d->plan_error), "%s",
                 err.msg[0] ? ds_error_str(&err) : strerror(-rc));
        ds_log_err("plan: no plan over %u nodes (strategy %s): %s; the cluster does not serve",
                   j->n, d->o.plan_strategy, d->plan_error);
        set_state(d, "no-plan");
        dsd_notify("STATUS=no plan: %s", d->plan_error);
        goto out;
    }
    dsd_plan_clear(&d->plan);
    d->plan = j->plan;
    memset(&j->plan, 0, sizeof(j->plan));
    d->plan_version = d->plan.version;
    d->have_plan = true;
    Dsd__Plan wp;
    if ((rc = dsd_plan_to_wire(&d->plan, &wp)) < 0) {
        snprintf(d->plan_error, sizeof(d->plan_error), "out of memory");
        goto out;
    }
    write_plan_file(d, wp.json);
    ds_log_notice("plan v%llu over %u nodes (strategy %s, solver %s)",
                  (unsigned long long)d->plan_version, j->n, d->plan.strategy, d->plan.solver);
    for (uint32_t i = 1; i < d->n_nodes; i++) {
        d->nodes[i].loaded = false;
        /* by name, not by the membership index at the solve's start: a node that joined while
         * the solver ran is not in this plan (rollout_again plans it next), and must not be
         * taken for plan node 0 and sent someone else's units */
        int32_t idx = dsd_plan_node_index(&d->plan, d->nodes[i].name);
        if (idx < 0)
            continue;
        Dsd__Envelope env = DSD__ENVELOPE__INIT;
        env.body_case = DSD__ENVELOPE__BODY_PLAN;
        env.plan = &wp;
        dsd_send(d->control, d->nodes[i].name, strlen(d->nodes[i].name), &env, NULL, NULL, 0);
        start_stream(d, &d->nodes[i], (uint32_t)idx);
    }
    dsd_plan_wire_clear(&wp);
    rc = install_plan(d, d->o.model, &d->plan, 0, &err);
    if (rc < 0) {
        snprintf(d->plan_error, sizeof(d->plan_error), "loading the coordinator's units: %s",
                 ds_error_str(&err));
        ds_log_err("plan: %s", d->plan_error);
        goto out;
    }
    d->nodes[0].loaded = true;
    set_state(d, "loading");
    maybe_serve(d);
out:
    replan_reply(d, rc);
    solve_job_free(j);
    return rc;
}

/* The routing counts measured so far as the solver's expert popularity ([L * E], layers
 * without counts uniform), or NULL when nothing was routed yet: a replan places (and
 * replicates) the experts the traffic really uses. */
static double *measured_expert_stats(struct dsd *d, const ds_model_config *c)
{
    uint32_t L = c->num_hidden_layers, E = c->n_routed_experts;
    if (!E || d->plan.n_layers != L)
        return NULL;
    json_t *m = measured(d), *ent;
    json_t *layers = json_object_get(json_object_get(m, "expert_stats"), "layers");
    double *st = NULL;
    double total = 0;
    size_t i;
    if (json_array_size(layers) && (st = malloc((size_t)L * E * sizeof(double)))) {
        for (size_t k = 0; k < (size_t)L * E; k++)
            st[k] = 1;
        json_array_foreach(layers, i, ent)
        {
            json_int_t l = json_integer_value(json_object_get(ent, "layer"));
            json_t *cnt = json_object_get(ent, "counts");
            if (l < 0 || l >= (json_int_t)L || json_array_size(cnt) != E)
                continue;
            double row = 0;
            for (uint32_t e = 0; e < E; e++)
                row += (double)json_integer_value(json_array_get(cnt, e));
            if (row <= 0)
                continue;
            for (uint32_t e = 0; e < E; e++)
                st[(size_t)l * E + e] = (double)json_integer_value(json_array_get(cnt, e));
            total += row;
        }
    }
    json_decref(m);
    if (st && total <= 0) {
        free(st);
        st = NULL;
    }
    if (st)
        ds_log_info("plan: using %.0f measured expert routings as popularity", total);
    return st;
}

/* Starts a new plan over the nodes that are up and not drained: round-robin at once, the
 * solver on its own thread (on_solved finishes). A call while one is being made asks for
 * another one after it (membership changed meanwhile). */
static int rollout(struct dsd *d)
{
    if (d->solving) {
        d->rollout_again = true;
        return 0;
    }
    struct solve_job *j = calloc(1, sizeof(*j));
    if (!j)
        return -ENOMEM;
    j->efd = -1;
    int rc = ds_model_open(d->o.model, NULL, &j->probe, &j->err);
    if (rc < 0) {
        ds_log_err("plan: cannot read the model: %s", ds_error_str(&j->err));
        solve_job_free(j);
        return rc;
    }
    const ds_model_config *c = ds_model_get_config(j->probe);
    j->names = calloc(MAX_NODES, 64);
    j->eps = calloc(MAX_NODES, DSD_STR_MAX);
    for (uint32_t i = 0; j->names && j->eps && i < d->n_nodes && i < MAX_NODES; i++) {
        if (d->nodes[i].failed || d->nodes[i].drained)
            continue;
        /* the coordinator is listed first even with compute = false (embed, head) */
        snprintf(j->names[j->n], 64, "%s", d->nodes[i].name);
        snprintf(j->eps[j->n], DSD_STR_MAX, "%s", d->nodes[i].endpoint);
        j->n++;
    }
    d->have_plan = false;
    d->serving = false;
    d->plan_error[0] = 0;
    j->version = d->plan_version + 1;
    if (!j->names || !j->eps) {
        j->rc = ds_error_set(&j->err, -ENOMEM, "out of memory");
    } else if (!strcmp(d->o.plan_strategy, "round-robin")) {
        j->rc = dsd_plan_build(&j->plan, c, j->n, (const char(*)[64])j->names,
                               (const char(*)[DSD_STR_MAX])j->eps, d->o.compute, j->version);
        if (j->rc < 0)
            ds_error_set(&j->err, j->rc, "round-robin plan over %u nodes: %s", j->n,
                         strerror(-j->rc));
    } else if (!d->o.compute) {
        j->rc = ds_error_set(&j->err, -EINVAL, "compute = false needs plan_strategy = round-robin "
                                               "(the solver would place units on the coordinator)");
    } else {
        json_t *spec = cluster_spec(d, true);
        j->spec = json_dumps(spec, JSON_COMPACT);
        json_decref(spec);
        j->ctx = (uint32_t)(d->o.plan_context ? d->o.plan_context : d->o.max_context);
        if (j->ctx > c->max_position_embeddings)
            j->ctx = c->max_position_embeddings;
        j->batch = (uint32_t)d->o.plan_batch;
        j->stats = measured_expert_stats(d, c);
        snprintf(j->strategy, sizeof(j->strategy), "%s", d->o.plan_strategy);
        j->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (!j->spec || j->efd < 0) {
            j->rc = ds_error_set(&j->err, -ENOMEM, "cannot start the solver");
        } else if (pthread_create(&j->th, NULL, solve_main, j) != 0) {
            j->rc = ds_error_set(&j->err, -EAGAIN, "cannot start the solver thread");
        } else {
            d->solving = j;
            set_state(d, "planning");
            return 0;
        }
    }
    rc = rollout_finish(d, j);
    if (d->rollout_again && !d->solving) { /* a node dropped out while rolling out */
        d->rollout_again = false;
        return rollout(d);
    }
    return rc;
}

/* The solver thread signalled: join it and roll its plan out. */
static void on_solved(struct dsd *d)
{
    struct solve_job *j = d->solving;
    uint64_t v;
    if (!j || read(j->efd, &v, sizeof(v)) != sizeof(v))
        return;
    pthread_join(j->th, NULL);
    d->solving = NULL;
    rollout_finish(d, j);
    if (d->rollout_again) {
        d->rollout_again = false;
        rollout(d);
    }
}

static void maybe_serve(struct dsd *d)
{
    if (d->serving || !d->have_plan)
        return;
    for (uint32_t i = 0; i < d->n_nodes; i++)
        if (!d->nodes[i].loaded && !d->nodes[i].failed && !d->nodes[i].drained)
            return;
    d->serving = true;
    set_state(d, "serving");
    sd_notify(0, "READY=1");
}

/* Whether the current plan (or the one being made) lists node `name`. */
static bool plan_has(struct dsd *d, const char *name)
{
    const dsd_plan *p = d->solving ? &d->solving->plan : &d->plan;
    if (d->solving) /* being made over the nodes up when it started */
        for (uint32_t i = 0; i < d->solving->n; i++)
            if (!strcmp(d->solving->names[i], name))
                return true;
    for (uint32_t i = 0; !d->solving && i < p->n_nodes; i++)
        if (!strcmp(p->nodes[i], name))
            return true;
    return false;
}

static size_t jobs_running(struct dsd *d)
{
    return dsd_data_jobs_running(d->dp);
}

/* ---- status JSON -------------------------------------------------------------------------- */

static json_t *data_obj(struct dsd *d, const char *what)
{
    char *s = dsd_data_json(d->dp, what);
    json_t *j = s ? json_loads(s, 0, NULL) : NULL;
    free(s);
    return j ? j : json_null();
}

/* Every node's measurements merged: "links" (each node's links to its peers, calibration and
 * traffic), "units" (unit -> {node, measured_compute_s, calls | rows}), "expert_stats" (routing
 * counts summed over the attention hosts) and "nodes" (each node's own report). */
static json_t *measured(struct dsd *d)
{
    json_t *links = json_array(), *units = json_object(), *nodes = json_object();
    json_t *layers = json_object(); /* "layer" -> counts array */
    int64_t E = 0;
    for (uint32_t i = 0; i < d->n_nodes; i++) {
        struct node *n = &d->nodes[i];
        json_t *st = i == 0 ? data_obj(d, "stats") : json_incref(n->stats);
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
                json_object_set_new(have, "measured_compute_s",
                                    json_real(json_number_value(json_object_get(
                                                  have, "measured_compute_s")) +
                                              json_number_value(json_object_get(uv, "compute_s"))));
                if (r)
                    json_object_set_new(have, "rows",
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
    for (uint32_t l = 0; l < d->plan.n_layers; l++) { /* the last plan's (kept while replanning) */
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

static char *status_json(struct dsd *d, const char *what, int *code)
{
    json_t *r = NULL;
    uint64_t now = dsd_now_ns();
    *code = 0;
    if (!strcmp(what, "cluster")) {
        /* the cluster spec of docs/cluster-spec.md, links calibrated over the real sockets */
        r = cluster_spec(d, false);
    } else if (!strcmp(what, "status") || !strcmp(what, "devices") || !strcmp(what, "")) {
        json_t *nodes = json_array();
        for (uint32_t i = 0; i < d->n_nodes; i++) {
            struct node *n = &d->nodes[i];
            const char *st = n->failed    ? "failed"
                             : n->drained ? "draining"
                             : n->loaded  ? "serving"
                                          : "loading";
            if (i == 0)
                st = d->state;
            json_array_append_new(
                nodes, json_pack("{s:s,s:s,s:s,s:s,s:I,s:o,s:b,s:b}", "name", n->name, "role",
                                 i == 0 ? "coordinator" : "worker", "state", st, "endpoint",
                                 n->endpoint, "heartbeat_age_ms",
                                 (json_int_t)(i == 0 ? 0 : (now - n->last_seen_ns) / 1000000),
                                 "devices",
                                 n->devices ? json_incref(n->devices) : json_array(), "drained",
                                 n->drained, "has_model_copy", n->has_model_copy));
        }
        json_t *st = measured(d);
        json_t *links = json_is_object(st) ? json_object_get(st, "links") : NULL;
        r = json_pack("{s:s,s:s,s:s,s:I,s:o,s:O}", "cluster", d->o.cluster, "coordinator",
                      d->o.node, "state", d->state, "plan_version", (json_int_t)d->plan_version,
                      "nodes", nodes, "links", links ? links : json_array());
        if (d->plan_error[0])
            json_object_set_new(r, "plan_error", json_string(d->plan_error));
        if (dsd_curve_enabled())
            json_object_set_new(r, "curve_refused", json_integer((json_int_t)dsd_curve_refused()));
        json_decref(st);
    } else if (!strcmp(what, "jobs")) {
        r = data_obj(d, "jobs");
    } else if (!strcmp(what, "placement")) {
        char *pj = d->have_plan ? dsd_plan_json(&d->plan) : NULL;
        json_t *plan = pj ? json_loads(pj, 0, NULL) : json_null();
        free(pj);
        json_t *mine = data_obj(d, "stats");
        json_t *local = json_is_object(mine) ? json_incref(json_object_get(mine, "units")) : NULL;
        json_decref(mine);
        /* the solver's predicted per-device / per-link times beside the measured ones */
        json_t *pred = d->have_plan && d->plan.solver_json
                           ? json_loads(d->plan.solver_json, 0, NULL)
                           : NULL;
        r = json_pack("{s:o,s:o,s:o,s:o}", "plan", plan ? plan : json_null(), "measured",
                      measured(d), "coordinator_units", local ? local : json_null(),
                      "predicted", pred ? pred : json_null());
        if (d->plan_error[0])
            json_object_set_new(r, "plan_error", json_string(d->plan_error));
    } else if (!strcmp(what, "expert_stats")) {
        json_t *st = measured(d);
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

static void reply_json(void *sock, const void *peer, size_t pl, uint64_t req, const char *json)
{
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__StatusReply sr = DSD__STATUS_REPLY__INIT;
    sr.json = (char *)json;
    env.request_id = req;
    env.body_case = DSD__ENVELOPE__BODY_STATUS_REPLY;
    env.status_reply = &sr;
    dsd_send(sock, peer, pl, &env, NULL, NULL, 0);
}

static struct node *node_find(struct dsd *d, const char *name, size_t len)
{
    for (uint32_t i = 0; i < d->n_nodes; i++)
        if (strlen(d->nodes[i].name) == len && !memcmp(d->nodes[i].name, name, len))
            return &d->nodes[i];
    return NULL;
}

/* ---- coordinator: client socket ----------------------------------------------------------- */

static void forward_to_sched(struct dsd *d, dsd_msg *m)
{
    uint8_t *buf;
    size_t len;
    if (ds_wire_pack(m->env, &buf, &len) < 0)
        return;
    zmq_send(d->pipe, m->peer, m->peer_len, ZMQ_SNDMORE);
    zmq_send(d->pipe, buf, len, 0);
    free(buf);
}

static void on_client(struct dsd *d)
{
    dsd_msg m;
    ds_error err = {0};
    int rc = dsd_msg_recv(d->client, true, (size_t)d->o.max_request_bytes, &m, &err);
    if (rc == -EAGAIN)
        return;
    if (rc < 0) {
        ds_log_warn("client: refused a request: %s", ds_error_str(&err));
        if (m.peer_len)
            dsd_send_error(d->client, m.peer, m.peer_len, 0, m.refused, "%s", ds_error_str(&err));
        return;
    }
    Dsd__Envelope *env = m.env;
    switch (env->body_case) {
    case DSD__ENVELOPE__BODY_SUBMIT:
    case DSD__ENVELOPE__BODY_CANCEL:
        if (!d->serving) {
            dsd_send_error(d->client, m.peer, m.peer_len, env->request_id,
                           DSD__ERROR_CODE__ERROR_CODE_BUSY, "the cluster is not serving yet (%s)",
                           d->state);
            break;
        }
        forward_to_sched(d, &m);
        break;
    case DSD__ENVELOPE__BODY_STATUS_REQUEST: {
        const char *what = env->status_request->what ? env->status_request->what : "";
        if (!strcmp(what, "replan")) {
            char *js = dsd_data_json(d->dp, "jobs");
            json_t *j = js ? json_loads(js, 0, NULL) : NULL;
            free(js);
            size_t running = j ? json_array_size(json_object_get(j, "jobs")) : 0;
            json_decref(j);
            if (running) {
                dsd_send_error(d->client, m.peer, m.peer_len, env->request_id,
                               DSD__ERROR_CODE__ERROR_CODE_BUSY,
                               "%zu jobs are running; replan when idle", running);
                break;
            }
            if (d->solving || d->replan_peer_len) {
                dsd_send_error(d->client, m.peer, m.peer_len, env->request_id,
                               DSD__ERROR_CODE__ERROR_CODE_BUSY, "a plan is being made");
                break;
            }
            /* answered when the plan is rolled out (or has failed): replan_reply */
            memcpy(d->replan_peer, m.peer, m.peer_len);
            d->replan_peer_len = m.peer_len;
            d->replan_req = env->request_id;
            if (rollout(d) < 0)
                replan_reply(d, -EIO);
            break;
        }
        int code;
        char *s = status_json(d, what, &code);
        if (!s) {
            ds_log_warn("client: unknown status request '%.64s'", what);
            dsd_send_error(d->client, m.peer, m.peer_len, env->request_id,
                           DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "unknown status '%.64s'", what);
            break;
        }
        reply_json(d->client, m.peer, m.peer_len, env->request_id, s);
        free(s);
        break;
    }
    case DSD__ENVELOPE__BODY_DRAIN: {
        const char *name = env->drain->node ? env->drain->node : "";
        struct node *n = node_find(d, name, strlen(name));
        if (!n) {
            dsd_send_error(d->client, m.peer, m.peer_len, env->request_id,
                           DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT, "no node named '%.64s'", name);
            break;
        }
        n->drained = !env->drain->undrain;
        ds_log_notice("node %s %s by a client", n->name, n->drained ? "drained" : "undrained");
        if (n != &d->nodes[0])
            dsd_send(d->control, n->name, strlen(n->name), env, NULL, NULL, 0);
        char buf[160];
        snprintf(buf, sizeof(buf), "{\"node\":\"%s\",\"drained\":%s}", n->name,
                 n->drained ? "true" : "false");
        reply_json(d->client, m.peer, m.peer_len, env->request_id, buf);
        break;
    }
    default:
        ds_log_warn("client: refused '%s': not a client request", ds_wire_body_name(env));
        dsd_send_error(d->client, m.peer, m.peer_len, env->request_id,
                       DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "'%s' is not a client request",
                       ds_wire_body_name(env));
    }
    dsd_msg_close(&m);
}

static void on_pipe(struct dsd *d)
{
    for (int guard = 0; guard < 1024; guard++) {
        zmq_msg_t a, b;
        zmq_msg_init(&a);
        if (zmq_msg_recv(&a, d->pipe, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&a);
            return;
        }
        zmq_msg_init(&b);
        zmq_msg_recv(&b, d->pipe, 0);
        int r = zmq_send(d->client, zmq_msg_data(&a), zmq_msg_size(&a), ZMQ_SNDMORE);
        if (r >= 0)
            r = zmq_send(d->client, zmq_msg_data(&b), zmq_msg_size(&b), 0);
        if (r < 0 && zmq_errno() == EHOSTUNREACH) {
            /* the client is gone: cancel its job so nothing runs for nobody */
            Dsd__Envelope *env = NULL;
            if (ds_wire_unpack(zmq_msg_data(&b), zmq_msg_size(&b), &env, NULL) == 0) {
                if (env->body_case == DSD__ENVELOPE__BODY_TOKEN && !env->token->last) {
                    Dsd__Envelope ce = DSD__ENVELOPE__INIT;
                    Dsd__Cancel cc = DSD__CANCEL__INIT;
                    cc.job = env->token->job;
                    ce.body_case = DSD__ENVELOPE__BODY_CANCEL;
                    ce.cancel = &cc;
                    uint8_t *buf;
                    size_t len;
                    if (ds_wire_pack(&ce, &buf, &len) == 0) {
                        ds_log_notice("client of job %llu disconnected: cancelling",
                                      (unsigned long long)cc.job);
                        zmq_send(d->pipe, "", 0, ZMQ_SNDMORE);
                        zmq_send(d->pipe, buf, len, 0);
                        free(buf);
                    }
                }
                ds_wire_free(env);
            }
        }
        zmq_msg_close(&a);
        zmq_msg_close(&b);
    }
}

/* ---- coordinator: control socket ---------------------------------------------------------- */

/* A worker's StepStats, checked and kept in dsd_data's "stats" JSON form. */
static void take_stats(struct dsd *d, struct node *n, const Dsd__StepStats *st)
{
    if (!d->have_plan)
        return;
    json_t *j = dsd_stats_from_wire(st, n->name, d->plan.n_layers, d->plan.n_experts);
    if (!j)
        return;
    json_decref(n->stats);
    n->stats = j;
}

static void on_control_coord(struct dsd *d)
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
    struct node *n = node_find(d, (const char *)m.peer, m.peer_len);
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
        if (!n) {
            if (d->n_nodes >= MAX_NODES) {
                dsd_send_error(d->control, m.peer, m.peer_len, env->request_id,
                               DSD__ERROR_CODE__ERROR_CODE_BUSY, "cluster full");
                break;
            }
            n = &d->nodes[d->n_nodes++];
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
        w.node_id = (uint64_t)(n - d->nodes);
        w.heartbeat_ms = (uint32_t)d->o.heartbeat_ms;
        rep.request_id = env->request_id;
        rep.body_case = DSD__ENVELOPE__BODY_WELCOME;
        rep.welcome = &w;
        dsd_send(d->control, m.peer, m.peer_len, &rep, NULL, NULL, 0);
        set_state(d, d->serving ? "serving" : "joining");
        dsd_data_probe(d->dp, n->name, n->endpoint); /* measure the link to it */
        if (!d->have_plan && d->n_nodes >= 1 + (uint32_t)d->o.expect_workers) {
            /* plan once the links to every node are measured (on_timer), or give up waiting
             * after link_wait_ms and plan with what is known */
            if (!d->plan_due_ns)
                d->plan_due_ns = dsd_now_ns() + (uint64_t)d->o.link_wait_ms * 1000000ull;
        } else if (d->have_plan && !d->serving) {
            rollout(d); /* a node (re)joined during rollout: roll out again */
        } else if (d->have_plan && !plan_has(d, n->name)) {
            d->replan_when_idle = true; /* a new node, or one the plan left out: on_timer */
        } else if (d->have_plan) {
            /* a node came back (restarted): send it its part again */
            Dsd__Plan wp;
            if (dsd_plan_to_wire(&d->plan, &wp) == 0) {
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
            if (!plan_has(d, n->name))
                d->replan_when_idle = true;
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
            maybe_serve(d);
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

/* ---- worker: control socket --------------------------------------------------------------- */

static void send_load(struct dsd *d, uint64_t version, uint64_t loaded, uint64_t total, bool done,
                      const char *error)
{
    Dsd__Envelope rep = DSD__ENVELOPE__INIT;
    Dsd__LoadProgress lp = DSD__LOAD_PROGRESS__INIT;
    lp.plan_version = version;
    lp.bytes_loaded = loaded;
    lp.bytes_total = total;
    lp.done = done;
    lp.error = (char *)(error ? error : "");
    rep.body_case = DSD__ENVELOPE__BODY_LOAD_PROGRESS;
    rep.load_progress = &lp;
    dsd_send(d->control, NULL, 0, &rep, NULL, NULL, 0);
}

static bool want_nothing(void *ctx, enum ds_unit_kind kind, uint32_t layer, uint32_t expert)
{
    (void)ctx, (void)kind, (void)layer, (void)expert;
    return false;
}

/* Opens this node's units of wire plan p from model_dir and hands them to the data thread;
 * tells the coordinator (LoadProgress done or error). */
static void worker_load_plan(struct dsd *d, const Dsd__Plan *p, const char *model_dir)
{
    ds_error err = {0};
    ds_model *probe = NULL;
    dsd_plan plan = {0};
    set_state(d, "loading");
    /* the model's shape only: no unit bound (a streamed checkpoint holds just ours) */
    ds_model_open_opts shape_only = {.want = want_nothing};
    int rc = ds_model_open(model_dir, &shape_only, &probe, &err);
    if (rc == 0)
        rc = dsd_plan_from_wire(p, ds_model_get_config(probe), &plan, &err);
    uint32_t self = 0;
    while (rc == 0 && self < plan.n_nodes && strcmp(plan.nodes[self], d->o.node))
        self++;
    if (rc == 0 && self == plan.n_nodes)
        rc = ds_error_set(&err, -EPROTO, "the plan does not list this node (%s)", d->o.node);
    if (rc == 0)
        rc = install_plan(d, model_dir, &plan, self, &err);
    uint32_t n_layers = plan.n_layers;
    dsd_plan_clear(&plan);
    ds_model_free(probe);
    if (rc < 0) {
        ds_log_err("plan v%llu: %s", (unsigned long long)p->version, ds_error_str(&err));
        send_load(d, p->version, 0, 0, false, ds_error_str(&err));
        set_state(d, "failed");
        return;
    }
    d->plan_version = p->version;
    d->n_layers_hint = n_layers;
    if (p->json)
        write_plan_file(d, p->json);
    send_load(d, p->version, 0, 0, true, NULL);
    set_state(d, "serving");
}

/* A chunk of this node's streamed checkpoint: written, acknowledged; the last one loads the
 * plan that waited for it. */
static void on_weight_chunk(struct dsd *d, dsd_msg *m)
{
    const Dsd__WeightChunk *c = m->env->weight_chunk;
    ds_error err = {0};
    size_t len = 0;
    const void *data = m->n_frames == 1 ? dsd_msg_frame(m, 0, &len) : NULL;
    if (!d->stream_in) {
        ds_log_warn("control: weight chunk without a plan waiting for weights (ignored)");
        return;
    }
    uint64_t version = c->plan_version;
    int rc = data ? dsd_stream_in_chunk(d->stream_in, c, data, len, &err) : -EPROTO;
    if (rc == -ESTALE) {
        ds_log_debug("weights: %s (dropped)", ds_error_str(&err));
        return;
    }
    if (rc < 0) {
        ds_log_err("weights: %s", data ? ds_error_str(&err) : "chunk without its data frame");
        send_load(d, version, 0, 0, false, data ? ds_error_str(&err) : "bad weight chunk");
        d->stream_in = (dsd_stream_in_free(d->stream_in), NULL);
        set_state(d, "failed");
        return;
    }
    send_load(d, version, dsd_stream_in_bytes(d->stream_in), 0, false, NULL);
    if (!dsd_stream_in_complete(d->stream_in))
        return;
    char dir[PATH_MAX];
    snprintf(dir, sizeof(dir), "%s", dsd_stream_in_dir(d->stream_in));
    ds_log_notice("weights: %llu bytes received into %s",
                  (unsigned long long)dsd_stream_in_bytes(d->stream_in), dir);
    d->stream_in = (dsd_stream_in_free(d->stream_in), NULL);
    Dsd__Envelope *pe = NULL;
    if (ds_wire_unpack(d->pending_plan, d->pending_plan_len, &pe, &err) == 0 &&
        pe->body_case == DSD__ENVELOPE__BODY_PLAN)
        worker_load_plan(d, pe->plan, dir);
    ds_wire_free(pe);
    free(d->pending_plan);
    d->pending_plan = NULL;
}

static void send_hello(struct dsd *d)
{
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__Hello h = DSD__HELLO__INIT;
    enum { MAXD = 32 };
    Dsd__Device dev[MAXD], *devp[MAXD];
    json_t *devs = local_devices(), *x;
    size_t i, nd = 0;
    json_array_foreach(devs, i, x)
    {
        if (nd >= MAXD)
            break;
        dsd__device__init(&dev[nd]);
        dev[nd].name = (char *)(json_string_value(json_object_get(x, "name")) ?: "");
        dev[nd].kind = (char *)(json_string_value(json_object_get(x, "kind")) ?: "");
        dev[nd].klass = (char *)(json_string_value(json_object_get(x, "class")) ?: "");
        dev[nd].memory_bytes = (uint64_t)json_integer_value(json_object_get(x, "memory_bytes"));
        dev[nd].mem_bw_bytes_per_s = json_number_value(json_object_get(x, "mem_bw_bytes_per_s"));
        dev[nd].flops = json_number_value(json_object_get(x, "flops"));
        dev[nd].host_link_bytes_per_s =
            json_number_value(json_object_get(x, "host_link_bytes_per_s"));
        dev[nd].launch_s = json_number_value(json_object_get(x, "launch_s"));
        dev[nd].shares_silicon_with =
            (char *)(json_string_value(json_object_get(x, "shares_silicon_with")) ?: "");
        devp[nd] = &dev[nd];
        nd++;
    }
    h.node = d->o.node;
    h.data_endpoint = d->o.data_advertise;
    h.n_devices = nd;
    h.devices = devp;
    h.node_class = g_node_class;
    h.has_model_copy = access(d->o.model, R_OK) == 0;
    env.body_case = DSD__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    dsd_send(d->control, NULL, 0, &env, NULL, NULL, 0);
    json_decref(devs);
    d->last_hello_ns = dsd_now_ns();
}

static void on_control_worker(struct dsd *d)
{
    dsd_msg m;
    ds_error err = {0};
    int rc = dsd_msg_recv(d->control, false, DS_WIRE_MAX_ENVELOPE_BYTES, &m, &err);
    if (rc == -EAGAIN)
        return;
    if (rc < 0) {
        ds_log_warn("control: refused a message from the coordinator: %s", ds_error_str(&err));
        return;
    }
    Dsd__Envelope *env = m.env;
    d->last_coord_ns = dsd_now_ns();
    switch (env->body_case) {
    case DSD__ENVELOPE__BODY_WELCOME:
        if (!d->welcomed) {
            d->welcomed = true;
            ds_log_notice("joined cluster '%s' as node %llu", env->welcome->cluster ?: "",
                          (unsigned long long)env->welcome->node_id);
            set_state(d, "joined");
            sd_notify(0, "READY=1");
        }
        break;
    case DSD__ENVELOPE__BODY_PLAN:
        d->stream_in = (dsd_stream_in_free(d->stream_in), NULL);
        free(d->pending_plan);
        d->pending_plan = NULL;
        if (access(d->o.model, R_OK) == 0) {
            worker_load_plan(d, env->plan, d->o.model);
            break;
        }
        /* no checkpoint copy here: keep the plan until the coordinator has streamed this
         * node's units (WeightChunk) into state_dir/stream */
        set_state(d, "loading");
        char dir[PATH_MAX + 16];
        snprintf(dir, sizeof(dir), "%s/stream", d->o.state_dir);
        if (ds_wire_pack(env, &d->pending_plan, &d->pending_plan_len) < 0 ||
            dsd_stream_in_new(dir, env->plan->version, &d->stream_in, &err) < 0) {
            ds_log_err("plan v%llu: cannot receive weights: %s",
                       (unsigned long long)env->plan->version,
                       err.msg[0] ? ds_error_str(&err) : "out of memory");
            send_load(d, env->plan->version, 0, 0, false, "cannot receive weights");
            set_state(d, "failed");
            break;
        }
        ds_log_notice("plan v%llu: no checkpoint at %s; receiving this node's units from the "
                      "coordinator into %s",
                      (unsigned long long)env->plan->version, d->o.model, dir);
        break;
    case DSD__ENVELOPE__BODY_WEIGHT_CHUNK:
        on_weight_chunk(d, &m);
        break;
    case DSD__ENVELOPE__BODY_DRAIN:
        ds_log_notice("coordinator %s this node", env->drain->undrain ? "undrained" : "drained");
        set_state(d, env->drain->undrain ? "serving" : "draining");
        break;
    case DSD__ENVELOPE__BODY_HEARTBEAT:
        break;
    case DSD__ENVELOPE__BODY_ERROR:
        ds_log_err("coordinator refused us: %s", env->error->message ?: "");
        if (env->error->code == DSD__ERROR_CODE__ERROR_CODE_VERSION)
            d->stopping = true;
        else if (env->error->code == DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT)
            d->welcomed = false; /* the coordinator forgot us (restart): join again */
        break;
    default:
        ds_log_warn("control: ignored '%s' from the coordinator", ds_wire_body_name(env));
    }
    dsd_msg_close(&m);
}

/* ---- timers ------------------------------------------------------------------------------- */

/* Worker: this node's measurements (units, links, routing counts) to the coordinator. */
static void send_stats(struct dsd *d)
{
    json_t *st = data_obj(d, "stats");
    if (!json_is_object(st) || !d->plan_version) {
        json_decref(st);
        return;
    }
    json_t *units = json_object_get(st, "units"), *links = json_object_get(st, "links");
    json_t *ec = json_object_get(st, "expert_counts");
    size_t nu = json_object_size(units), nl = json_array_size(links);
    Dsd__UnitStat *us = calloc(nu ? nu : 1, sizeof(*us));
    Dsd__UnitStat **usp = calloc(nu ? nu : 1, sizeof(*usp));
    Dsd__LinkStat *ls = calloc(nl ? nl : 1, sizeof(*ls));
    Dsd__LinkStat **lsp = calloc(nl ? nl : 1, sizeof(*lsp));
    uint64_t *counts = NULL;
    Dsd__StepStats ss = DSD__STEP_STATS__INIT;
    if (!us || !usp || !ls || !lsp)
        goto out;
    size_t i = 0;
    const char *un;
    json_t *uv;
    json_object_foreach(units, un, uv)
    {
        dsd__unit_stat__init(&us[i]);
        us[i].unit = (char *)un;
        us[i].compute_s = json_number_value(json_object_get(uv, "compute_s"));
        json_t *c = json_object_get(uv, "calls");
        us[i].calls = (uint64_t)json_integer_value(c ? c : json_object_get(uv, "rows"));
        usp[i] = &us[i];
        i++;
    }
    json_t *lk;
    json_array_foreach(links, i, lk)
    {
        dsd__link_stat__init(&ls[i]);
        ls[i].peer = (char *)json_string_value(json_object_get(lk, "to"));
        ls[i].transfer_s = json_number_value(json_object_get(lk, "measured_transfer_s"));
        ls[i].bytes = (uint64_t)json_integer_value(json_object_get(lk, "bytes"));
        ls[i].messages = (uint64_t)json_integer_value(json_object_get(lk, "messages"));
        ls[i].latency_s = json_number_value(json_object_get(lk, "latency_s"));
        ls[i].bandwidth_bytes_per_s =
            json_number_value(json_object_get(lk, "bandwidth_bytes_per_s"));
        ls[i].compute_s = json_number_value(json_object_get(lk, "measured_compute_s"));
        ls[i].forwards = (uint64_t)json_integer_value(json_object_get(lk, "forwards"));
        ls[i].forward_bytes = (uint64_t)json_integer_value(json_object_get(lk, "forward_bytes"));
        ls[i].calibrated = json_is_true(json_object_get(lk, "calibrated"));
        lsp[i] = &ls[i];
    }
    ss.plan_version = d->plan_version;
    ss.n_units = nu;
    ss.units = usp;
    ss.n_links = nl;
    ss.links = lsp;
    /* routing counts, layer-major from the first MoE layer (zeros for layers not hosted) */
    uint32_t E = (uint32_t)json_integer_value(json_object_get(ec, "n_routed_experts"));
    uint32_t first = UINT32_MAX, last = 0;
    json_array_foreach(json_object_get(ec, "layers"), i, lk)
    {
        uint32_t l = (uint32_t)json_integer_value(json_object_get(lk, "layer"));
        first = l < first ? l : first;
        last = l > last ? l : last;
    }
    if (E && first != UINT32_MAX && d->n_layers_hint > last) {
        uint32_t L = d->n_layers_hint;
        counts = calloc((size_t)(L - first) * E, sizeof(uint64_t));
        if (counts) {
            json_array_foreach(json_object_get(ec, "layers"), i, lk)
            {
                uint32_t l = (uint32_t)json_integer_value(json_object_get(lk, "layer"));
                json_t *row = json_object_get(lk, "counts");
                for (uint32_t e = 0; e < E && e < json_array_size(row); e++)
                    counts[(size_t)(l - first) * E + e] =
                        (uint64_t)json_integer_value(json_array_get(row, e));
            }
            ss.first_moe_layer = first;
            ss.n_routed_experts = E;
            ss.n_expert_counts = (size_t)(L - first) * E;
            ss.expert_counts = counts;
        }
    }
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    env.body_case = DSD__ENVELOPE__BODY_STEP_STATS;
    env.step_stats = &ss;
    dsd_send(d->control, NULL, 0, &env, NULL, NULL, 0);
out:
    free(us);
    free(usp);
    free(ls);
    free(lsp);
    free(counts);
    json_decref(st);
}

/* Coordinator: the links to every live node are measured (or nothing to wait for). */
static bool links_measured(struct dsd *d)
{
    json_t *st = data_obj(d, "stats");
    bool all = true;
    for (uint32_t i = 1; i < d->n_nodes && all; i++) {
        if (d->nodes[i].failed)
            continue;
        bool found = false;
        size_t k;
        json_t *lk;
        json_array_foreach(json_object_get(st, "links"), k, lk)
        {
            if (!strcmp(json_string_value(json_object_get(lk, "to")) ?: "", d->nodes[i].name) &&
                json_is_true(json_object_get(lk, "calibrated")))
                found = true;
        }
        all = found;
    }
    json_decref(st);
    return all;
}

static void on_timer(struct dsd *d)
{
    uint64_t now = dsd_now_ns(), hb = (uint64_t)d->o.heartbeat_ms * 1000000ull;
    if (d->wd_usec && now - d->last_wd_ns >= d->wd_usec * 500ull) {
        sd_notify(0, "WATCHDOG=1");
        d->last_wd_ns = now;
    }
    if (now - d->last_hb_ns < hb)
        return;
    d->last_hb_ns = now;
    uint64_t dead = hb * (uint64_t)d->o.heartbeat_misses;
    if (d->coordinator && d->plan_due_ns && !d->have_plan &&
        (now >= d->plan_due_ns || links_measured(d))) {
        d->plan_due_ns = 0;
        rollout(d);
        now = dsd_now_ns(); /* the solver took time; heartbeat clocks were restarted */
    }
    if (d->coordinator) {
        for (uint32_t i = 1; i < d->n_nodes; i++) {
            struct node *n = &d->nodes[i];
            if (!n->failed && now > n->last_seen_ns && now - n->last_seen_ns > dead) {
                n->failed = true;
                ds_log_err("node %s failed: no heartbeat for %llu ms", n->name,
                           (unsigned long long)((now - n->last_seen_ns) / 1000000));
                set_state(d, d->serving ? "degraded" : d->state);
                if (d->o.auto_replan && (d->have_plan || d->solving) && plan_has(d, n->name)) {
                    ds_log_notice("replanning without %s (auto_replan)", n->name);
                    rollout(d);
                }
            }
        }
        /* a node that is up but outside the plan (it came back, or joined late) is taken in
         * once no job runs, so nothing running is cut short */
        if (d->o.auto_replan && d->replan_when_idle && d->serving && !d->solving &&
            jobs_running(d) == 0) {
            d->replan_when_idle = false;
            ds_log_notice("replanning to take in the nodes outside the plan (auto_replan)");
            rollout(d);
        }
        return;
    }
    if (!d->welcomed) {
        send_hello(d);
        return;
    }
    if (now - d->last_coord_ns > dead) {
        ds_log_err("coordinator lost: no reply for %llu ms; joining again",
                   (unsigned long long)((now - d->last_coord_ns) / 1000000));
        d->welcomed = false;
        set_state(d, "joining");
        send_hello(d);
        return;
    }
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__Heartbeat h = DSD__HEARTBEAT__INIT;
    h.seq = ++d->hb_seq;
    h.plan_version = d->plan_version;
    h.state = d->state;
    env.body_case = DSD__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &h;
    dsd_send(d->control, NULL, 0, &env, NULL, NULL, 0);
    send_stats(d);
}

static void on_signal(struct dsd *d)
{
    struct signalfd_siginfo si;
    while (read(d->sigfd, &si, sizeof(si)) == sizeof(si)) {
        if (si.ssi_signo == SIGHUP) {
            sd_notify(0, "RELOADING=1");
            dsd_opts next;
            dsd_opts_defaults(&next);
            ds_error err = {0};
            const char *cfg;
            if (dsd_opts_parse(&next, d->argc, d->argv, &cfg, &err) < 0)
                ds_log_err("reload: %s (kept the running options)", ds_error_str(&err));
            else {
                dsd_opts_apply_reload(&d->o, &next);
                dsd_data_set_opts(d->dp, &d->o);
                enum ds_log_level lv;
                if (ds_log_level_parse(d->o.log_level, &lv) == 0)
                    ds_log_set_level(lv);
            }
            sd_notify(0, "READY=1");
        } else {
            ds_log_notice("signal %u: shutting down", si.ssi_signo);
            d->stopping = true;
        }
    }
}

/* ---- main --------------------------------------------------------------------------------- */

/* zap_domain: a TCP ROUTER's CURVE domain (dsd_curve.c), NULL for inproc sockets */
static void *bind_sock(void *zctx, int type, const char *ep, const char *zap_domain,
                       ds_error *err)
{
    void *s = zmq_socket(zctx, type);
    int zero = 0, rc;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof(zero));
    if (zap_domain && (rc = dsd_curve_server(s, zap_domain)) < 0) {
        ds_error_set(err, rc, "bind %s: CURVE: %s", ep, zmq_strerror(-rc));
        zmq_close(s);
        return NULL;
    }
    if (zmq_bind(s, ep) < 0) {
        ds_error_set(err, -EADDRINUSE, "bind %s: %s", ep, zmq_strerror(zmq_errno()));
        zmq_close(s);
        return NULL;
    }
    return s;
}

int main(int argc, char **argv)
{
    struct dsd d = {0};
    ds_error err = {0};
    dsd_opts_defaults(&d.o);
    int rc = dsd_opts_parse(&d.o, argc, argv, &d.config_path, &err);
    if (rc == 1)
        return 0;
    if (!d.o.node[0])
        gethostname(d.o.node, sizeof(d.o.node) - 1);
    if (rc == 0)
        rc = dsd_opts_check(&d.o, &err);
    if (rc < 0) {
        fprintf(stderr, "dsd: %s\n", ds_error_str(&err));
        return 2;
    }
    d.argc = argc;
    d.argv = argv;
    enum ds_log_level lv;
    if (ds_log_level_parse(d.o.log_level, &lv) == 0)
        ds_log_set_level(lv);
    if (!d.o.data_advertise[0])
        snprintf(d.o.data_advertise, sizeof(d.o.data_advertise), "%s", d.o.data_bind);
    d.coordinator = !strcmp(d.o.role, "coordinator");
    if (mkdir(d.o.state_dir, 0750) < 0 && errno != EEXIST)
        ds_log_warn("state directory %s: %s", d.o.state_dir, strerror(errno));

    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGHUP);
    sigprocmask(SIG_BLOCK, &mask, NULL); /* before any thread starts: all inherit the mask */
    signal(SIGPIPE, SIG_IGN);
    d.sigfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);

    d.zctx = zmq_ctx_new();
    int ret = 1;
    if (dsd_curve_start(d.zctx, &d.o, &err) < 0 ||
        !(d.data = bind_sock(d.zctx, ZMQ_ROUTER, d.o.data_bind, DSD_CURVE_DOMAIN_CLUSTER, &err)))
        goto out;
    if (d.coordinator) {
        if (!(d.control = bind_sock(d.zctx, ZMQ_ROUTER, d.o.control_bind,
                                    DSD_CURVE_DOMAIN_CLUSTER, &err)) ||
            !(d.client = bind_sock(d.zctx, ZMQ_ROUTER, d.o.client_bind, DSD_CURVE_DOMAIN_CLIENT,
                                   &err)) ||
            !(d.pipe = bind_sock(d.zctx, ZMQ_PAIR, SCHED_PIPE, NULL, &err)))
            goto out;
        int one = 1;
        zmq_setsockopt(d.client, ZMQ_ROUTER_MANDATORY, &one, sizeof(one));
        int ivl = 1000, ttl = 5000;
        zmq_setsockopt(d.client, ZMQ_HEARTBEAT_IVL, &ivl, sizeof(ivl));
        zmq_setsockopt(d.client, ZMQ_HEARTBEAT_TIMEOUT, &ttl, sizeof(ttl));
        struct node *self = &d.nodes[d.n_nodes++];
        snprintf(self->name, sizeof(self->name), "%s", d.o.node);
        snprintf(self->endpoint, sizeof(self->endpoint), "%s", d.o.data_advertise);
        discover_devices(&d.o);
        self->devices = local_devices();
        snprintf(self->klass, sizeof(self->klass), "%s", g_node_class);
        self->has_model_copy = true;
    } else {
        discover_devices(&d.o);
        d.control = zmq_socket(d.zctx, ZMQ_DEALER);
        int zero = 0;
        zmq_setsockopt(d.control, ZMQ_LINGER, &zero, sizeof(zero));
        zmq_setsockopt(d.control, ZMQ_ROUTING_ID, d.o.node, strlen(d.o.node));
        /* never block the loop on a coordinator that is not connected (e.g. a CURVE handshake
         * it refuses): the message is dropped, hellos and heartbeats are resent anyway */
        int sndtmo = (int)d.o.heartbeat_ms;
        zmq_setsockopt(d.control, ZMQ_SNDTIMEO, &sndtmo, sizeof(sndtmo));
        if (dsd_curve_client(d.control) < 0 || zmq_connect(d.control, d.o.coordinator) < 0) {
            ds_error_set(&err, -EINVAL, "connect %s: %s", d.o.coordinator,
                         zmq_strerror(zmq_errno()));
            goto out;
        }
    }
    int inf = 0;
    zmq_setsockopt(d.data, ZMQ_SNDHWM, &inf, sizeof(inf)); /* queue for slow peers, never drop */
    /* the client pipe never blocks the data thread (tokens for the loop queue, however many;
     * the loop may be waiting on the data thread during a plan install) */
    if (d.pipe)
        zmq_setsockopt(d.pipe, ZMQ_RCVHWM, &inf, sizeof(inf));
    if (d.coordinator && ((!(d.spipe = zmq_socket(d.zctx, ZMQ_PAIR)) ||
                           zmq_setsockopt(d.spipe, ZMQ_SNDHWM, &inf, sizeof(inf)) < 0 ||
                           zmq_connect(d.spipe, SCHED_PIPE) < 0))) {
        ds_error_set(&err, -EIO, "client pipe: %s", zmq_strerror(zmq_errno()));
        goto out;
    }
    if (dsd_data_start(d.zctx, d.data, d.spipe, &d.o, d.coordinator, &d.dp, &err) < 0)
        goto out;
    sd_watchdog_enabled(0, &d.wd_usec);
    ds_log_notice("dsd %s: %s '%s', data %s", ds_version(), d.o.role, d.o.node, d.o.data_advertise);
    set_state(&d, "joining");
    if (d.coordinator && d.o.expect_workers == 0 && rollout(&d) < 0)
        goto out;
    if (!d.coordinator)
        send_hello(&d);
    while (!d.stopping) {
        zmq_pollitem_t it[5] = {
            {.fd = d.sigfd, .events = ZMQ_POLLIN},
            /* the data socket belongs to the data thread; here: the solver's done signal */
            {.fd = d.solving ? d.solving->efd : -1, .events = d.solving ? ZMQ_POLLIN : 0},
            {.socket = d.control, .events = ZMQ_POLLIN},
        };
        int n = 3;
        if (d.coordinator) {
            it[n++] = (zmq_pollitem_t){.socket = d.client, .events = ZMQ_POLLIN};
            it[n++] = (zmq_pollitem_t){.socket = d.pipe, .events = ZMQ_POLLIN};
        }
        long tmo = (long)d.o.heartbeat_ms;
        if (d.wd_usec && (long)(d.wd_usec / 2000) < tmo)
            tmo = (long)(d.wd_usec / 2000) + 1;
        if (zmq_poll(it, n, tmo) < 0 && zmq_errno() != EINTR)
            break;
        if (it[0].revents)
            on_signal(&d);
        if (it[1].revents)
            on_solved(&d);
        if (it[2].revents)
            d.coordinator ? on_control_coord(&d) : on_control_worker(&d);
        if (d.coordinator && it[3].revents)
            on_client(&d);
        if (d.coordinator && it[4].revents)
            on_pipe(&d);
        on_timer(&d);
    }
    ret = 0;
out:
    if (err.code)
        ds_log_err("%s", ds_error_str(&err));
    sd_notify(0, "STOPPING=1");
    if (d.solving) { /* the solver has time limits: wait for it, drop its plan */
        pthread_join(d.solving->th, NULL);
        solve_job_free(d.solving);
    }
    if (d.dp)
        dsd_data_stop(d.dp); /* closes nothing of ours but its own sockets */
    if (d.data)
        zmq_close(d.data);
    if (d.spipe)
        zmq_close(d.spipe);
    dsd_plan_clear(&d.plan);
    for (uint32_t i = 0; i < d.n_nodes; i++) {
        json_decref(d.nodes[i].devices);
        json_decref(d.nodes[i].stats);
        dsd_stream_out_free(d.nodes[i].stream);
    }
    dsd_stream_in_free(d.stream_in);
    free(d.pending_plan);
    if (d.control)
        zmq_close(d.control);
    if (d.client)
        zmq_close(d.client);
    if (d.pipe)
        zmq_close(d.pipe);
    zmq_ctx_term(d.zctx);
    dsd_curve_stop(); /* its ZAP thread ends with the context */
    json_decref(g_devices);
    if (d.sigfd >= 0)
        close(d.sigfd);
    ds_log_notice("stopped");
    return ret;
}
