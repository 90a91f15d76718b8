/* dsd_rollout.c — plans: a new plan over the nodes up (round-robin at once, or the placement
 * solver on its own thread, signalled back over an eventfd), rolled out to every planned
 * worker (weights streamed to a node without a checkpoint copy), this node's own units opened
 * on the loader thread (dsd_loader.c) and installed, and serving once every planned node has
 * loaded. Members are matched to a plan by
 * name, never by their index at the solve's start. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

#include "ds_model.h"

#include "ds_log.h"
#include "dsd_loop.h"

/* Opens this node's units of plan p (node index self) and hands them and the plan to the
 * data thread. */
/* The coordinator's units of its plan are open (dsd_loader.c): installed in the data thread
 * while the plan is still the current one (else dropped: a newer load runs), then serving
 * once every planned node has loaded; a waiting replan is answered. */
void dsd_rollout_on_loaded(struct dsd *d)
{
    if (!d->loading || !dsd_loader_done(d->loading))
        return;
    dsd_loader *l = d->loading;
    d->loading = NULL;
    bool current = d->coord.have_plan && dsd_loader_plan(l)->version == d->plan_version;
    ds_error err = {0};
    int rc = dsd_loader_finish(l, d->dp, current, &err);
    dsd_loader_free(l);
    if (!current)
        return;
    if (rc < 0) {
        snprintf(d->coord.plan_error, sizeof(d->coord.plan_error),
                 "loading the coordinator's units: %s", ds_error_str(&err));
        ds_log_err("plan: %s", d->coord.plan_error);
    } else {
        d->coord.nodes[0].loaded = true;
        dsd_rollout_maybe_serve(d);
    }
    dsd_rollout_replan_reply(d, rc);
}

void dsd_rollout_solve_free(struct solve_job *j)
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
    ds_unit_bytes_release(&j->bytes);
    dsd_plan_clear(&j->plan);
    free(j);
}

static void *solve_main(void *arg)
{
    struct solve_job *j = arg;
    j->rc =
        dsd_plan_solve(&j->plan, ds_model_get_config(j->probe), j->spec, j->n,
                       (const char(*)[64])j->names, (const char(*)[DSD_STR_MAX])j->eps, j->strategy,
                       j->batch, j->ctx, j->stats, &j->bytes, j->pins, j->version, &j->err);
    dsd_solve_thread_done();
    uint64_t one = 1;
    if (write(j->efd, &one, sizeof(one)) != sizeof(one))
        ds_log_err("plan: cannot signal the loop");
    return NULL;
}

void dsd_rollout_replan_reply(struct dsd *d, int rc)
{
    if (!d->coord.replan_peer_len)
        return;
    if (rc < 0) {
        dsd_send_error(d->client, d->coord.replan_peer, d->coord.replan_peer_len,
                       d->coord.replan_req, DSD__ERROR_CODE__ERROR_CODE_INTERNAL,
                       "replan failed: %s",
                       d->coord.plan_error[0] ? d->coord.plan_error : strerror(-rc));
    } else {
        char buf[96];
        snprintf(buf, sizeof(buf), "{\"plan_version\":%llu}", (unsigned long long)d->plan_version);
        dsd_status_reply(d->client, d->coord.replan_peer, d->coord.replan_peer_len,
                         d->coord.replan_req, buf);
    }
    d->coord.replan_peer_len = 0;
}

/* A node without a checkpoint copy: stream it the checkpoint of exactly its units. */
static void start_stream(struct dsd *d, struct node *n, uint32_t plan_idx)
{
    dsd_stream_out_free(n->stream);
    n->stream = NULL;
    n->stream_acked = 0;
    if (n->has_model_copy)
        return;
    dsd_units u;
    ds_error err = {0};
    int rc = dsd_plan_units_of(&d->coord.plan, plan_idx, &u);
    if (rc == 0) {
        rc = dsd_stream_out_new(d->o.model, &u, d->coord.plan.version, &n->stream, &err);
        dsd_units_clear(&u);
    }
    if (rc < 0) {
        ds_log_err("node %s has no checkpoint copy and its weights cannot be streamed: %s; "
                   "planning without it",
                   n->name, err.msg[0] ? ds_error_str(&err) : strerror(-rc));
        n->failed = true;
        d->coord.rollout_again = true; /* after this rollout (its plan cannot load on n) */
        return;
    }
    ds_log_notice("node %s has no checkpoint copy: streaming its units (%.1f MiB)", n->name,
                  (double)dsd_stream_out_wire_bytes(n->stream) / (1 << 20));
    dsd_stream_out_pump(n->stream, d->control, (const char *)n->peer);
}

/* Rolls out the plan job j made (or reports why there is none): every planned worker gets the
 * whole plan, the coordinator opens its units. Frees j. */
static int rollout_finish(struct dsd *d, struct solve_job *j)
{
    ds_error err = j->err;
    int rc = j->rc;
    if (rc < 0 && d->coord.have_plan) {
        /* the plan serving now is intact (dsd_rollout_start kept it): it goes on serving */
        snprintf(d->coord.plan_error, sizeof(d->coord.plan_error), "%s; plan v%llu goes on serving",
                 err.msg[0] ? ds_error_str(&err) : strerror(-rc),
                 (unsigned long long)d->plan_version);
        ds_log_err("plan: no new plan over %u nodes (strategy %s): %s", j->n, d->o.plan_strategy,
                   d->coord.plan_error);
        dsd_loop_set_state(d, d->coord.serving ? "serving" : "loading");
        goto out;
    }
    if (rc < 0) {
        snprintf(d->coord.plan_error, sizeof(d->coord.plan_error), "%s",
                 err.msg[0] ? ds_error_str(&err) : strerror(-rc));
        ds_log_err("plan: no plan over %u nodes (strategy %s): %s; the cluster does not serve",
                   j->n, d->o.plan_strategy, d->coord.plan_error);
        /* jobs waiting for a new plan cannot go on: they end now, saying why, instead of
         * waiting for a client's timeout */
        char why[600];
        snprintf(why, sizeof(why), "no plan fits the %u nodes left: %s", j->n, d->coord.plan_error);
        dsd_data_fail_jobs(d->dp, why);
        dsd_loop_set_state(d, "no-plan");
        dsd_notify("STATUS=no plan: %s", d->coord.plan_error);
        goto out;
    }
    d->coord.serving = false; /* until every planned node loaded the new plan */
    dsd_plan_clear(&d->coord.plan);
    d->coord.plan = j->plan;
    memset(&j->plan, 0, sizeof(j->plan));
    enum ds_quantize q = DS_QUANTIZE_NONE;
    ds_quantize_parse(d->o.quantize, &q); /* checked by the options table */
    d->coord.plan.quantize = (uint8_t)q;  /* every node quantises its units the same way */
    /* a new member token per plan: only the nodes it is sent to can feed its data plane */
    if (dsd_guard_new_token(d->coord.plan.token) < 0)
        ds_log_warn("plan: no random token (data plane open to every sender)");
    d->plan_version = d->coord.plan.version;
    d->coord.have_plan = true;
    Dsd__Plan wp;
    if ((rc = dsd_plan_to_wire(&d->coord.plan, &wp)) < 0) {
        snprintf(d->coord.plan_error, sizeof(d->coord.plan_error), "out of memory");
        goto out;
    }
    dsd_plan_write_file(d->o.state_dir, wp.json);
    ds_log_notice("plan v%llu over %u nodes (strategy %s, solver %s)",
                  (unsigned long long)d->plan_version, j->n, d->coord.plan.strategy,
                  d->coord.plan.solver);
    for (uint32_t i = 1; i < d->coord.n_nodes; i++) {
        d->coord.nodes[i].loaded = false;
        /* by name, not by the membership index at the solve's start: a node that joined while
         * the solver ran is not in this plan (rollout_again plans it next), and must not be
         * taken for plan node 0 and sent someone else's units */
        int32_t idx = dsd_plan_node_index(&d->coord.plan, d->coord.nodes[i].name);
        if (idx < 0)
            continue;
        Dsd__Envelope env = DSD__ENVELOPE__INIT;
        env.body_case = DSD__ENVELOPE__BODY_PLAN;
        env.plan = &wp;
        dsd_members_send(d, &d->coord.nodes[i], &env);
        start_stream(d, &d->coord.nodes[i], (uint32_t)idx);
    }
    dsd_plan_wire_clear(&wp);
    /* the coordinator's own units open on the loader thread (heartbeats go on meanwhile);
     * dsd_rollout_on_loaded installs them and answers a waiting replan */
    d->loading = dsd_loader_free(d->loading); /* a newer plan supersedes it */
    rc = dsd_loader_start(d->o.model, &d->coord.plan, 0, (uint32_t)d->o.threads,
                          (uint32_t)d->o.max_context, &d->loading, &err);
    if (rc < 0) {
        snprintf(d->coord.plan_error, sizeof(d->coord.plan_error),
                 "loading the coordinator's units: %s", ds_error_str(&err));
        ds_log_err("plan: %s", d->coord.plan_error);
        goto out;
    }
    dsd_loop_set_state(d, "loading");
    dsd_rollout_solve_free(j);
    return 0;
out:
    dsd_rollout_replan_reply(d, rc);
    dsd_rollout_solve_free(j);
    return rc;
}

/* The routing counts measured so far as the solver's expert popularity ([L * E], layers
 * without counts uniform), or NULL when nothing was routed yet: a replan places (and
 * replicates) the experts the traffic really uses. */
static double *measured_expert_stats(struct dsd *d, const ds_model_config *c)
{
    uint32_t L = c->num_hidden_layers, E = c->n_routed_experts;
    if (!E || d->coord.plan.n_layers != L)
        return NULL;
    json_t *m = dsd_status_measured(d), *ent;
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

static bool want_no_unit(void *ctx, enum ds_unit_kind kind, uint32_t layer, uint32_t expert)
{
    (void)ctx, (void)kind, (void)layer, (void)expert;
    return false;
}

/* Whether every node of the current plan is up (a drained node still serves its units). */
static bool plan_intact(struct dsd *d)
{
    for (uint32_t i = 0; i < d->coord.plan.n_nodes; i++) {
        struct node *n =
            dsd_members_find(d, d->coord.plan.nodes[i], strlen(d->coord.plan.nodes[i]));
        if (!n || n->failed || !n->loaded)
            return false;
    }
    return true;
}

/* Starts a new plan over the nodes that are up and not drained: round-robin at once, the
 * solver on its own thread (on_solved finishes). A call while one is being made asks for
 * another one after it (membership changed meanwhile). */
int dsd_rollout_start(struct dsd *d)
{
    if (d->coord.solving) {
        d->coord.rollout_again = true;
        return 0;
    }
    struct solve_job *j = calloc(1, sizeof(*j));
    if (!j)
        return -ENOMEM;
    j->efd = -1;
    /* the model's shape only: no unit bound, so no weight is read (NULL options would bind
     * every unit: all norms converted and, for a GGUF, every layer's kv_b rebuilt); a
     * checkpoint found broken at start (truncated: dsd_digest.c) opens lazily and would fail
     * only under a job */
    ds_model_open_opts shape_only = {.want = want_no_unit};
    int rc = d->problem[0] ? ds_error_set(&j->err, -EBADMSG, "%s", d->problem)
                           : ds_model_open(d->o.model, &shape_only, &j->probe, &j->err);
    if (rc < 0) {
        snprintf(d->coord.plan_error, sizeof(d->coord.plan_error), "cannot read the model %s: %s",
                 d->o.model, ds_error_str(&j->err));
        ds_log_err("plan: %s", d->coord.plan_error);
        if (!d->coord.have_plan) {
            dsd_loop_set_state(d, "no-plan");
            dsd_notify("STATUS=no plan: %s", d->coord.plan_error);
            d->coord.retry_ns = dsd_now_ns() + 5000000000ull; /* the path may appear */
        }
        dsd_rollout_solve_free(j);
        return rc;
    }
    const ds_model_config *c = ds_model_get_config(j->probe);
    j->names = calloc(MAX_NODES, 64);
    j->eps = calloc(MAX_NODES, DSD_STR_MAX);
    for (uint32_t i = 0; j->names && j->eps && i < d->coord.n_nodes && i < MAX_NODES; i++) {
        if (!dsd_members_plannable(&d->coord.nodes[i]))
            continue;
        /* the coordinator is listed first even with compute = false (embed, head) */
        snprintf(j->names[j->n], 64, "%s", d->coord.nodes[i].name);
        snprintf(j->eps[j->n], DSD_STR_MAX, "%s", d->coord.nodes[i].endpoint);
        j->n++;
    }
    /* a plan whose nodes are all still up and loaded keeps serving while the new one is made,
     * and stays when it cannot be made (a failed `dsctl replan`, a node with a profile the
     * solver cannot use); one that lost a node is given up at once */
    bool keep = d->coord.have_plan && d->coord.serving && plan_intact(d);
    if (!keep) {
        d->coord.have_plan = false;
        d->coord.serving = false;
    }
    d->coord.plan_error[0] = 0;
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
        j->rc = ds_error_set(&j->err, -EINVAL,
                             "compute = false needs plan_strategy = round-robin "
                             "(the solver would place units on the coordinator)");
    } else {
        json_t *spec = dsd_status_cluster_spec(d, true);
        j->spec = json_dumps(spec, JSON_COMPACT);
        json_decref(spec);
        j->ctx = (uint32_t)(d->o.plan_context ? d->o.plan_context : d->o.max_context);
        if (j->ctx > c->max_position_embeddings)
            j->ctx = c->max_position_embeddings;
        j->batch = (uint32_t)d->o.plan_batch;
        j->stats = measured_expert_stats(d, c);
        /* the units' real bytes (a GGUF's tensor types; quantised ones under `quantize`) from
         * the file's tensor table; when it cannot be read, the config's dtype sizes them */
        ds_model_config bc;
        ds_error be = {0};
        enum ds_quantize q = DS_QUANTIZE_NONE;
        ds_quantize_parse(d->o.quantize, &q);
        if (ds_model_unit_bytes(d->o.model, q, &bc, &j->bytes, &be) < 0)
            ds_log_warn("plan: unit sizes from the config (%s)", ds_error_str(&be));
        else if (bc.num_hidden_layers != c->num_hidden_layers)
            ds_unit_bytes_release(&j->bytes);
        snprintf(j->strategy, sizeof(j->strategy), "%s", d->o.plan_strategy);
        snprintf(j->pins, sizeof(j->pins), "%s", d->o.plan_pin);
        j->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (!j->spec || j->efd < 0) {
            j->rc = ds_error_set(&j->err, -ENOMEM, "cannot start the solver");
        } else if (pthread_create(&j->th, NULL, solve_main, j) != 0) {
            j->rc = ds_error_set(&j->err, -EAGAIN, "cannot start the solver thread");
        } else {
            d->coord.solving = j;
            if (!keep)
                dsd_loop_set_state(d, "planning");
            return 0;
        }
    }
    rc = rollout_finish(d, j);
    if (d->coord.rollout_again && !d->coord.solving) { /* a node dropped out while rolling out */
        d->coord.rollout_again = false;
        return dsd_rollout_start(d);
    }
    return rc;
}

/* The solver thread signalled: join it and roll its plan out. */
void dsd_rollout_on_solved(struct dsd *d)
{
    struct solve_job *j = d->coord.solving;
    uint64_t v;
    if (!j || read(j->efd, &v, sizeof(v)) != sizeof(v))
        return;
    pthread_join(j->th, NULL);
    d->coord.solving = NULL;
    rollout_finish(d, j);
    if (d->coord.rollout_again) {
        d->coord.rollout_again = false;
        dsd_rollout_start(d);
    }
}

void dsd_rollout_maybe_serve(struct dsd *d)
{
    if (d->coord.serving || !d->coord.have_plan)
        return;
    /* every node of the plan that is up has loaded it (one outside the plan is not waited for) */
    for (uint32_t i = 0; i < d->coord.n_nodes; i++)
        if (!d->coord.nodes[i].loaded && !d->coord.nodes[i].failed && !d->coord.nodes[i].drained &&
            dsd_plan_node_index(&d->coord.plan, d->coord.nodes[i].name) >= 0)
            return;
    d->coord.serving = true;
    dsd_loop_set_state(d, "serving");
    sd_notify(0, "READY=1");
}

/* Whether the current plan (or the one being made) lists node `name`. */
bool dsd_rollout_plan_has(struct dsd *d, const char *name)
{
    const dsd_plan *p = d->coord.solving ? &d->coord.solving->plan : &d->coord.plan;
    if (d->coord.solving) /* being made over the nodes up when it started */
        for (uint32_t i = 0; i < d->coord.solving->n; i++)
            if (!strcmp(d->coord.solving->names[i], name))
                return true;
    for (uint32_t i = 0; !d->coord.solving && i < p->n_nodes; i++)
        if (!strcmp(p->nodes[i], name))
            return true;
    return false;
}

size_t dsd_loop_jobs_running(struct dsd *d)
{
    return dsd_data_jobs_running(d->dp);
}
