/* dsd_worker.c — a worker's side of the control socket: hello until welcomed, a plan loaded
 * (its units opened and handed to the data thread) or its weights received first when the
 * node has no checkpoint copy, LoadProgress, drain, and its measurements to the coordinator
 * with every heartbeat. */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

#include "ds_model.h"

#include "ds_log.h"
#include "dsd_loop.h"

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

static void worker_loaded(struct dsd *d, uint64_t version, int rc, const ds_error *err);

/* Starts opening this node's units of wire plan p from model_dir on the loader thread (the
 * loop keeps heartbeating); dsd_worker_on_loaded installs them and tells the coordinator. */
static void worker_load_plan(struct dsd *d, const Dsd__Plan *p, const char *model_dir)
{
    ds_error err = {0};
    ds_model *probe = NULL;
    dsd_plan plan = {0};
    dsd_loop_set_state(d, "loading");
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
    if (rc == 0) {
        d->loading = dsd_loader_free(d->loading); /* a newer plan supersedes it */
        rc = dsd_loader_start(model_dir, &plan, self, (uint32_t)d->o.threads,
                              (uint32_t)d->o.max_context, &d->loading, &err);
    }
    if (rc == 0) {
        free(d->worker.load_json);
        d->worker.load_json = p->json ? strdup(p->json) : NULL;
        d->worker.load_layers = plan.n_layers;
        snprintf(d->worker.load_token, sizeof(d->worker.load_token), "%s", plan.token);
    }
    dsd_plan_clear(&plan);
    ds_model_free(probe);
    if (rc < 0)
        worker_loaded(d, p->version, rc, &err);
}

static void worker_loaded(struct dsd *d, uint64_t version, int rc, const ds_error *err)
{
    if (rc < 0) {
        ds_log_err("plan v%llu: %s", (unsigned long long)version, ds_error_str(err));
        send_load(d, version, 0, 0, false, ds_error_str(err));
        dsd_loop_set_state(d, "failed");
        return;
    }
    d->plan_version = version;
    d->worker.n_layers_hint = d->worker.load_layers;
    memcpy(d->worker.plan_token, d->worker.load_token, sizeof(d->worker.plan_token));
    if (d->worker.load_json)
        dsd_plan_write_file(d->o.state_dir, d->worker.load_json);
    free(d->worker.load_json);
    d->worker.load_json = NULL;
    send_load(d, version, 0, 0, true, NULL);
    dsd_loop_set_state(d, "serving");
}

/* A chunk of this node's streamed checkpoint: written, acknowledged; the last one loads the
 * plan that waited for it. */
static void on_weight_chunk(struct dsd *d, dsd_msg *m)
{
    const Dsd__WeightChunk *c = m->env->weight_chunk;
    ds_error err = {0};
    size_t len = 0;
    const void *data = m->n_frames == 1 ? dsd_msg_frame(m, 0, &len) : NULL;
    if (!d->worker.stream_in) {
        ds_log_warn("control: weight chunk without a plan waiting for weights (ignored)");
        return;
    }
    uint64_t version = c->plan_version;
    int rc = data ? dsd_stream_in_chunk(d->worker.stream_in, c, data, len, &err) : -EPROTO;
    if (rc == -ESTALE) {
        ds_log_debug("weights: %s (dropped)", ds_error_str(&err));
        return;
    }
    if (rc < 0) {
        ds_log_err("weights: %s", data ? ds_error_str(&err) : "chunk without its data frame");
        send_load(d, version, 0, 0, false, data ? ds_error_str(&err) : "bad weight chunk");
        d->worker.stream_in = (dsd_stream_in_free(d->worker.stream_in), NULL);
        dsd_loop_set_state(d, "failed");
        return;
    }
    send_load(d, version, dsd_stream_in_bytes(d->worker.stream_in), 0, false, NULL);
    if (!dsd_stream_in_complete(d->worker.stream_in))
        return;
    char dir[PATH_MAX + 16];
    snprintf(dir, sizeof(dir), "%s", dsd_stream_in_model(d->worker.stream_in));
    ds_log_notice("weights: %llu bytes received into %s",
                  (unsigned long long)dsd_stream_in_bytes(d->worker.stream_in), dir);
    d->worker.stream_in = (dsd_stream_in_free(d->worker.stream_in), NULL);
    Dsd__Envelope *pe = NULL;
    if (ds_wire_unpack(d->worker.pending_plan, d->worker.pending_plan_len, &pe, &err) == 0 &&
        pe->body_case == DSD__ENVELOPE__BODY_PLAN)
        worker_load_plan(d, pe->plan, dir);
    ds_wire_free(pe);
    free(d->worker.pending_plan);
    d->worker.pending_plan = NULL;
}

void dsd_worker_hello(struct dsd *d)
{
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__Hello h = DSD__HELLO__INIT;
    enum { MAXD = 32 };
    Dsd__Device dev[MAXD], *devp[MAXD];
    json_t *devs = dsd_local_devices(), *x;
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
    h.node_class = (char *)dsd_local_node_class();
    h.has_model_copy = access(d->o.model, R_OK) == 0;
    h.model_digest = d->model_digest;
    h.problem = d->problem;
    env.body_case = DSD__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    dsd_send(d->control, NULL, 0, &env, NULL, NULL, 0);
    json_decref(devs);
    d->worker.last_hello_ns = dsd_now_ns();
}

void dsd_worker_on_control(struct dsd *d)
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
    d->worker.last_coord_ns = dsd_now_ns();
    switch (env->body_case) {
    case DSD__ENVELOPE__BODY_WELCOME:
        if (!d->worker.welcomed) {
            d->worker.welcomed = true;
            d->worker.last_refusal[0] = 0;
            ds_log_notice("joined cluster '%s' as node %llu", env->welcome->cluster ?: "",
                          (unsigned long long)env->welcome->node_id);
            dsd_loop_set_state(d, "joined");
            sd_notify(0, "READY=1");
        }
        break;
    case DSD__ENVELOPE__BODY_PLAN:
        /* the plan this node has installed already (same version, same random token: the
         * coordinator sent it again after we said hello again, e.g. after it stalled): keep
         * its units and KV caches, so the jobs running on it go on */
        if (env->plan->version && env->plan->version == d->plan_version && !d->loading &&
            env->plan->data_token && env->plan->data_token[0] &&
            !strcmp(env->plan->data_token, d->worker.plan_token)) {
            ds_log_notice("plan v%llu: already installed, kept",
                          (unsigned long long)d->plan_version);
            send_load(d, d->plan_version, 0, 0, true, NULL);
            dsd_loop_set_state(d, "serving");
            break;
        }
        d->worker.stream_in = (dsd_stream_in_free(d->worker.stream_in), NULL);
        free(d->worker.pending_plan);
        d->worker.pending_plan = NULL;
        if (access(d->o.model, R_OK) == 0) {
            worker_load_plan(d, env->plan, d->o.model);
            break;
        }
        /* no checkpoint copy here: keep the plan until the coordinator has streamed this
         * node's units (WeightChunk) into state_dir/stream */
        dsd_loop_set_state(d, "loading");
        char dir[PATH_MAX + 16];
        snprintf(dir, sizeof(dir), "%s/stream", d->o.state_dir);
        if (ds_wire_pack(env, &d->worker.pending_plan, &d->worker.pending_plan_len) < 0 ||
            dsd_stream_in_new(dir, env->plan->version, &d->worker.stream_in, &err) < 0) {
            ds_log_err("plan v%llu: cannot receive weights: %s",
                       (unsigned long long)env->plan->version,
                       err.msg[0] ? ds_error_str(&err) : "out of memory");
            send_load(d, env->plan->version, 0, 0, false, "cannot receive weights");
            dsd_loop_set_state(d, "failed");
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
        dsd_loop_set_state(d, env->drain->undrain ? "serving" : "draining");
        break;
    case DSD__ENVELOPE__BODY_HEARTBEAT:
        break;
    case DSD__ENVELOPE__BODY_ERROR:
        /* a refused hello is answered every heartbeat: say it once per reason */
        if (strncmp(d->worker.last_refusal, env->error->message ?: "",
                    sizeof(d->worker.last_refusal) - 1)) {
            ds_log_err("coordinator refused us: %s", env->error->message ?: "");
            snprintf(d->worker.last_refusal, sizeof(d->worker.last_refusal), "%s",
                     env->error->message ?: "");
        }
        if (!d->worker.welcomed)
            dsd_loop_set_state(d, "refused"); /* until a hello is welcomed */
        if (env->error->code == DSD__ERROR_CODE__ERROR_CODE_VERSION)
            d->stopping = true;
        else if (env->error->code == DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT)
            d->worker.welcomed = false; /* the coordinator forgot us (restart): join again */
        break;
    default:
        ds_log_warn("control: ignored '%s' from the coordinator", ds_wire_body_name(env));
    }
    dsd_msg_close(&m);
}

/* Worker: this node's measurements (units, links, routing counts) to the coordinator. */
void dsd_worker_send_stats(struct dsd *d)
{
    json_t *st = dsd_status_data(d, "stats");
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
    if (E && first != UINT32_MAX && d->worker.n_layers_hint > last) {
        uint32_t L = d->worker.n_layers_hint;
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

void dsd_worker_on_loaded(struct dsd *d)
{
    if (!d->loading || !dsd_loader_done(d->loading))
        return;
    dsd_loader *l = d->loading;
    d->loading = NULL;
    uint64_t version = dsd_loader_plan(l)->version;
    ds_error err = {0};
    int rc = dsd_loader_finish(l, d->dp, true, &err);
    dsd_loader_free(l);
    worker_loaded(d, version, rc, &err);
}
