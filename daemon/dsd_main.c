/* dsd_main.c — the dsd daemon's lifecycle over one small reactor.
 *
 * main() reads as the life of a node: parse options (one table, dsd_options.c) -> bind
 * sockets -> describe the local devices -> start the data thread (dsd_data.c: it owns the
 * data socket from then on) -> loop: poll signals, the solver's done signal, the control
 * socket and (coordinator) the client socket and the scheduler's pipe, dispatching to the
 * subsystem that owns each (dsd_loop.h), then the timers (heartbeats, failure detection,
 * watchdog) -> stop in reverse. SIGTERM/SIGINT stop the loop cleanly; SIGHUP reloads the
 * reloadable options. Under systemd: READY=1 once devices are known and the node has joined
 * (the coordinator: once the cluster serves), STATUS=<one line> on every change, WATCHDOG=1
 * from the loop at half the watchdog period. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>
#include <systemd/sd-daemon.h>

#include "ds_log.h"
#include "ds_version.h"
#include "dsd_http.h"
#include "dsd_loop.h"

/* the HTTP server's connections reach the client ROUTER here (dsd_http.c) */
#define HTTP_CLIENT_EP "inproc://dsd-http-clients"

static void on_timer(struct dsd *d)
{
    dsd_progress_tick(d);
    uint64_t now = dsd_now_ns(), hb = (uint64_t)d->o.heartbeat_ms * 1000000ull;
    if (d->wd_usec && now - d->last_wd_ns >= d->wd_usec * 500ull) {
        sd_notify(0, "WATCHDOG=1");
        d->last_wd_ns = now;
    }
    uint64_t dead = hb * (uint64_t)d->o.heartbeat_misses;
    /* this loop itself did not run for a while (SIGSTOP, a swapped-out host): what it could
     * not read says nothing about the peers, so they get a fresh window instead of being
     * declared failed for our silence */
    if (d->last_loop_ns && now - d->last_loop_ns > dead / 2 && now - d->last_loop_ns > 2 * hb) {
        ds_log_warn("the event loop stalled for %llu ms: every peer gets a fresh heartbeat window",
                    (unsigned long long)((now - d->last_loop_ns) / 1000000));
        for (uint32_t i = 1; d->coordinator && i < d->coord.n_nodes; i++)
            if (!d->coord.nodes[i].failed)
                d->coord.nodes[i].last_seen_ns = now;
        if (!d->coordinator)
            d->worker.last_coord_ns = now;
    }
    d->last_loop_ns = now;
    if (now - d->last_hb_ns < hb)
        return;
    d->last_hb_ns = now;
    if (d->coordinator && d->coord.plan_due_ns && !d->coord.have_plan &&
        (now >= d->coord.plan_due_ns || dsd_members_links_measured(d))) {
        d->coord.plan_due_ns = 0;
        dsd_rollout_start(d);
        now = dsd_now_ns(); /* the solver took time; heartbeat clocks were restarted */
    }
    if (d->coordinator && d->coord.retry_ns && now >= d->coord.retry_ns && !d->coord.have_plan &&
        !d->coord.solving) {
        d->coord.retry_ns = 0;
        dsd_rollout_start(d);
    }
    if (d->coordinator) {
        for (uint32_t i = 1; i < d->coord.n_nodes; i++) {
            struct node *n = &d->coord.nodes[i];
            if (!n->failed && now > n->last_seen_ns && now - n->last_seen_ns > dead) {
                n->failed = true;
                ds_log_err("node %s failed: no heartbeat for %llu ms", n->name,
                           (unsigned long long)((now - n->last_seen_ns) / 1000000));
                dsd_loop_set_state(d, d->coord.serving ? "degraded" : d->state);
                if (d->o.auto_replan && (d->coord.have_plan || d->coord.solving) &&
                    dsd_rollout_plan_has(d, n->name)) {
                    ds_log_notice("replanning without %s (auto_replan)", n->name);
                    dsd_rollout_start(d);
                }
            }
        }
        /* a node that is up but outside the plan (it came back, or joined late) is taken in
         * once no job runs, so nothing running is cut short */
        if (d->o.auto_replan && d->coord.replan_when_idle && d->coord.serving &&
            !d->coord.solving && dsd_loop_jobs_running(d) == 0) {
            d->coord.replan_when_idle = false;
            ds_log_notice("replanning to take in the nodes outside the plan (auto_replan)");
            dsd_rollout_start(d);
        }
        return;
    }
    if (!d->worker.welcomed) {
        dsd_worker_hello(d);
        return;
    }
    if (now - d->worker.last_coord_ns > dead) {
        ds_log_err("coordinator lost: no reply for %llu ms; joining again",
                   (unsigned long long)((now - d->worker.last_coord_ns) / 1000000));
        d->worker.welcomed = false;
        dsd_loop_set_state(d, "joining");
        dsd_worker_hello(d);
        return;
    }
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__Heartbeat h = DSD__HEARTBEAT__INIT;
    h.seq = ++d->worker.hb_seq;
    h.plan_version = d->plan_version;
    h.state = d->state;
    env.body_case = DSD__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &h;
    dsd_send(d->control, NULL, 0, &env, NULL, NULL, 0);
    dsd_worker_send_stats(d);
}

/* model as a Hugging Face cache entry: its snapshot, and its repository id for the HTTP API */
static int resolve_model(dsd_opts *o, ds_error *err)
{
    char repo[128] = "";
    int rc = dsd_model_resolve(o->model, sizeof(o->model), repo, sizeof(repo), err);
    if (rc == 1 && !o->http_model_name[0])
        snprintf(o->http_model_name, sizeof(o->http_model_name), "%s", repo);
    return rc;
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
            if (dsd_opts_parse(&next, d->argc, d->argv, &cfg, &err) < 0 ||
                resolve_model(&next, &err) < 0) /* as at start: compared with the running */
                ds_log_err("reload: %s (kept the running options)", ds_error_str(&err));
            else {
                dsd_opts_apply_reload(&d->o, &next);
                if (d->client) /* new client connections get the reloaded limit */
                    dsd_guard_sock_limit(d->client, DSD_GUARD_CLIENT_BYTES(d->o.max_request_bytes));
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

/* zap_domain: a TCP ROUTER's CURVE domain (dsd_curve.c), NULL for inproc sockets; max_bytes:
 * the largest frame a peer may send (dsd_guard.c), set before the first byte can arrive */
static void *bind_sock(void *zctx, int type, const char *ep, const char *zap_domain,
                       int64_t max_bytes, ds_error *err)
{
    void *s = zmq_socket(zctx, type);
    int zero = 0, rc;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof(zero));
    if (max_bytes > 0 && (rc = dsd_guard_sock_limit(s, max_bytes)) < 0) {
        ds_error_set(err, rc, "bind %s: message size limit: %s", ep, zmq_strerror(-rc));
        zmq_close(s);
        return NULL;
    }
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
    struct dsd d = {.lock_fd = -1};
    ds_error err = {0};
    dsd_http *http = NULL;
    dsd_opts_defaults(&d.o);
    int rc = dsd_opts_parse(&d.o, argc, argv, &d.config_path, &err);
    if (rc == 1)
        return 0;
    if (!d.o.node[0])
        gethostname(d.o.node, sizeof(d.o.node) - 1);
    if (rc == 0)
        rc = dsd_opts_check(&d.o, &err);
    if (rc >= 0)
        rc = resolve_model(&d.o, &err);
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
    /* one daemon per state_dir (they would overwrite each other's plan.json and streams) */
    rc = dsd_state_dir_lock(d.o.state_dir, &d.lock_fd, &err);
    if (rc == -EBUSY) {
        fprintf(stderr, "dsd: %s\n", ds_error_str(&err));
        ds_log_err("%s", ds_error_str(&err));
        return 2;
    }
    if (rc < 0)
        ds_log_warn("%s (running without the state_dir lock)", ds_error_str(&err));
    err = (ds_error){0};
    if (dsd_guard_new_token(d.instance) < 0)
        snprintf(d.instance, sizeof(d.instance), "%08x", (unsigned)getpid());
    dsd_node_check(&d.o, d.model_digest, sizeof(d.model_digest), d.problem, sizeof(d.problem));
    if (d.model_digest[0])
        ds_log_info("model %s: digest %s", d.o.model, d.model_digest);
    if (d.problem[0])
        ds_log_err("%s", d.problem);

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
        !(d.data = bind_sock(d.zctx, ZMQ_ROUTER, d.o.data_bind, DSD_CURVE_DOMAIN_CLUSTER,
                             d.o.max_frame_bytes, &err)))
        goto out;
    if (d.coordinator) {
        if (!(d.control = bind_sock(d.zctx, ZMQ_ROUTER, d.o.control_bind, DSD_CURVE_DOMAIN_CLUSTER,
                                    DSD_GUARD_CONTROL_BYTES, &err)) ||
            !(d.client = bind_sock(d.zctx, ZMQ_ROUTER, d.o.client_bind, DSD_CURVE_DOMAIN_CLIENT,
                                   DSD_GUARD_CLIENT_BYTES(d.o.max_request_bytes), &err)) ||
            !(d.pipe = bind_sock(d.zctx, ZMQ_PAIR, SCHED_PIPE, NULL, 0, &err)))
            goto out;
        if (zmq_bind(d.client, HTTP_CLIENT_EP) < 0) {
            ds_error_set(&err, -EIO, "bind %s: %s", HTTP_CLIENT_EP, zmq_strerror(zmq_errno()));
            goto out;
        }
        int one = 1;
        zmq_setsockopt(d.client, ZMQ_ROUTER_MANDATORY, &one, sizeof(one));
        int ivl = 1000, ttl = 5000;
        zmq_setsockopt(d.client, ZMQ_HEARTBEAT_IVL, &ivl, sizeof(ivl));
        zmq_setsockopt(d.client, ZMQ_HEARTBEAT_TIMEOUT, &ttl, sizeof(ttl));
        struct node *self = &d.coord.nodes[d.coord.n_nodes++];
        snprintf(self->name, sizeof(self->name), "%s", d.o.node);
        snprintf(self->endpoint, sizeof(self->endpoint), "%s", d.o.data_advertise);
        dsd_local_devices_discover(&d.o);
        self->devices = dsd_local_devices();
        snprintf(self->klass, sizeof(self->klass), "%s", dsd_local_node_class());
        self->has_model_copy = true;
        if (!d.model_digest[0]) /* planning says so too, and retries: the path may appear */
            snprintf(d.coord.plan_error, sizeof(d.coord.plan_error), "cannot read the model: %s",
                     d.problem[0] ? d.problem : "no such file or directory");
    } else {
        dsd_local_devices_discover(&d.o);
        d.control = zmq_socket(d.zctx, ZMQ_DEALER);
        int zero = 0;
        zmq_setsockopt(d.control, ZMQ_LINGER, &zero, sizeof(zero));
        /* name#instance: a second daemon with this node's name reaches the coordinator (a
         * ROUTER would drop a second connection with the same identity unheard) and is told
         * the name is taken */
        char ident[DSD_NODE_NAME_MAX + 24];
        unsigned rnd[2] = {0};
        int ufd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
        if (ufd >= 0) {
            if (read(ufd, rnd, sizeof(rnd)) != sizeof(rnd))
                rnd[0] = (unsigned)getpid();
            close(ufd);
        }
        snprintf(ident, sizeof(ident), "%s#%08x%08x", d.o.node, rnd[0], rnd[1]);
        zmq_setsockopt(d.control, ZMQ_ROUTING_ID, ident, strlen(ident));
        /* never block the loop on a coordinator that is not connected (e.g. a CURVE handshake
         * it refuses): the message is dropped, hellos and heartbeats are resent anyway */
        int sndtmo = (int)d.o.heartbeat_ms;
        zmq_setsockopt(d.control, ZMQ_SNDTIMEO, &sndtmo, sizeof(sndtmo));
        if (dsd_guard_sock_limit(d.control, DSD_GUARD_CONTROL_BYTES) < 0 ||
            dsd_curve_client(d.control) < 0 || zmq_connect(d.control, d.o.coordinator) < 0) {
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
    /* a port that cannot be had leaves the cluster serving over ZeroMQ: logged, not fatal */
    if (d.coordinator && d.o.http_bind[0] &&
        dsd_http_start(d.zctx, &d.o, HTTP_CLIENT_EP, &http, &err) < 0) {
        ds_log_err("http: %s; serving without the HTTP API", ds_error_str(&err));
        ds_error_clear(&err);
    }
    sd_watchdog_enabled(0, &d.wd_usec);
    ds_log_notice("dsd %s: %s '%s', data %s", ds_version(), d.o.role, d.o.node, d.o.data_advertise);
    dsd_loop_set_state(&d, "joining");
    if (d.coordinator && d.o.expect_workers == 0)
        dsd_rollout_start(&d); /* a failure is in plan_error (dsctl status) and retried */
    if (!d.coordinator)
        dsd_worker_hello(&d);
    while (!d.stopping) {
        zmq_pollitem_t it[6] = {
            {.fd = d.sigfd, .events = ZMQ_POLLIN},
            /* the data socket belongs to the data thread; here: the solver's done signal */
            {.fd = d.coord.solving ? d.coord.solving->efd : -1,
             .events = d.coord.solving ? ZMQ_POLLIN : 0},
            /* and the loader's: this node's units of a plan are open */
            {.fd = dsd_loader_fd(d.loading), .events = d.loading ? ZMQ_POLLIN : 0},
            {.socket = d.control, .events = ZMQ_POLLIN},
        };
        int n = 4;
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
            dsd_rollout_on_solved(&d);
        if (it[2].revents) {
            dsd_progress_tick(&d); /* the load's last sample: all paged in */
            d.coordinator ? dsd_rollout_on_loaded(&d) : dsd_worker_on_loaded(&d);
        }
        if (it[3].revents)
            d.coordinator ? dsd_members_on_control(&d) : dsd_worker_on_control(&d);
        if (d.coordinator && it[4].revents)
            dsd_clients_on_request(&d);
        if (d.coordinator && it[5].revents)
            dsd_clients_on_pipe(&d);
        on_timer(&d);
    }
    ret = 0;
out:
    if (err.code)
        ds_log_err("%s", ds_error_str(&err));
    sd_notify(0, "STOPPING=1");
    /* its connections end within a wait slice, their jobs cancelled */
    http = dsd_http_stop(http);
    if (d.coord.solving) { /* the solver has time limits: wait for it, drop its plan */
        pthread_join(d.coord.solving->th, NULL);
        dsd_rollout_solve_free(d.coord.solving);
    }
    d.loading = dsd_loader_free(d.loading); /* an open cannot be interrupted: wait for it */
    free(d.worker.load_json);
    if (d.dp)
        dsd_data_stop(d.dp); /* closes nothing of ours but its own sockets */
    if (d.data)
        zmq_close(d.data);
    if (d.spipe)
        zmq_close(d.spipe);
    dsd_plan_clear(&d.coord.plan);
    for (uint32_t i = 0; i < d.coord.n_nodes; i++) {
        json_decref(d.coord.nodes[i].devices);
        json_decref(d.coord.nodes[i].stats);
        dsd_stream_out_free(d.coord.nodes[i].stream);
    }
    dsd_stream_in_free(d.worker.stream_in);
    free(d.worker.pending_plan);
    if (d.control)
        zmq_close(d.control);
    if (d.client)
        zmq_close(d.client);
    if (d.pipe)
        zmq_close(d.pipe);
    zmq_ctx_term(d.zctx);
    dsd_curve_stop(); /* its ZAP thread ends with the context */
    dsd_local_devices_free();
    if (d.sigfd >= 0)
        close(d.sigfd);
    if (d.lock_fd >= 0)
        close(d.lock_fd);
    ds_log_notice("stopped");
    return ret;
}
