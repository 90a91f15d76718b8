/* dsd_clients.c — the coordinator's client socket: Submit and Cancel go to the scheduler on
 * the data thread (over the client pipe), status requests, drain and replan are answered
 * here; the scheduler's replies go back to the clients, and a client that is gone has its
 * job cancelled. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "ds_log.h"
#include "dsd_loop.h"

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

void dsd_clients_on_request(struct dsd *d)
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
    /* drain, undrain and replan change the cluster: operators only (dsd_curve.c roles) */
    bool operating = env->body_case == DSD__ENVELOPE__BODY_DRAIN ||
                     (env->body_case == DSD__ENVELOPE__BODY_STATUS_REQUEST &&
                      env->status_request->what && !strcmp(env->status_request->what, "replan"));
    if (operating && !dsd_curve_may_operate(m.user_id)) {
        ds_log_warn("client: refused '%s' from a client key without the operator role",
                    env->body_case == DSD__ENVELOPE__BODY_DRAIN ? "drain" : "replan");
        dsd_send_error(d->client, m.peer, m.peer_len, env->request_id,
                       DSD__ERROR_CODE__ERROR_CODE_FORBIDDEN,
                       "%s needs an operator key (curve_operator_keys); this key may submit, "
                       "cancel and read status",
                       env->body_case == DSD__ENVELOPE__BODY_DRAIN ? "drain" : "replan");
        dsd_msg_close(&m);
        return;
    }
    switch (env->body_case) {
    case DSD__ENVELOPE__BODY_SUBMIT:
    case DSD__ENVELOPE__BODY_CANCEL:
        if (!d->coord.serving) {
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
            size_t running = dsd_loop_jobs_running(d);
            if (running) {
                dsd_send_error(d->client, m.peer, m.peer_len, env->request_id,
                               DSD__ERROR_CODE__ERROR_CODE_BUSY,
                               "%zu jobs are running; replan when idle", running);
                break;
            }
            if (d->coord.solving || d->coord.replan_peer_len) {
                dsd_send_error(d->client, m.peer, m.peer_len, env->request_id,
                               DSD__ERROR_CODE__ERROR_CODE_BUSY, "a plan is being made");
                break;
            }
            /* answered when the plan is rolled out (or has failed): replan_reply */
            memcpy(d->coord.replan_peer, m.peer, m.peer_len);
            d->coord.replan_peer_len = m.peer_len;
            d->coord.replan_req = env->request_id;
            if (dsd_rollout_start(d) < 0)
                dsd_rollout_replan_reply(d, -EIO);
            break;
        }
        int code;
        char *s = dsd_status_json(d, what, &code);
        if (!s) {
            ds_log_warn("client: unknown status request '%.64s'", what);
            dsd_send_error(d->client, m.peer, m.peer_len, env->request_id,
                           DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "unknown status '%.64s'", what);
            break;
        }
        dsd_status_reply(d->client, m.peer, m.peer_len, env->request_id, s);
        free(s);
        break;
    }
    case DSD__ENVELOPE__BODY_DRAIN: {
        const char *name = env->drain->node ? env->drain->node : "";
        struct node *n = dsd_members_find(d, name, strlen(name));
        if (!n) {
            dsd_send_error(d->client, m.peer, m.peer_len, env->request_id,
                           DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT, "no node named '%.64s'", name);
            break;
        }
        if (n == &d->coord.nodes[0] && !env->drain->undrain) {
            dsd_send_error(d->client, m.peer, m.peer_len, env->request_id,
                           DSD__ERROR_CODE__ERROR_CODE_MALFORMED,
                           "%s is the coordinator: it embeds, samples and holds the jobs, and "
                           "cannot be drained (drain workers)",
                           n->name);
            break;
        }
        n->drained = !env->drain->undrain;
        ds_log_notice("node %s %s by a client", n->name, n->drained ? "drained" : "undrained");
        if (n != &d->coord.nodes[0])
            dsd_members_send(d, n, env);
        char buf[160];
        snprintf(buf, sizeof(buf), "{\"node\":\"%s\",\"drained\":%s}", n->name,
                 n->drained ? "true" : "false");
        dsd_status_reply(d->client, m.peer, m.peer_len, env->request_id, buf);
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

void dsd_clients_on_pipe(struct dsd *d)
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
