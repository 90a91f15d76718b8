/* dsd_links.c — a node's links to its peers: one DEALER per peer (no high-water mark: a slow
 * link queues, never drops), and link calibration (latency from 16 empty round trips,
 * bandwidth from 1 MiB echoes), non-blocking, as replies arrive; the echo of other nodes'
 * probes. */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "ds_experts.h"
#include "ds_log.h"
#include "dsd_data_impl.h"

static void cal_send(dsd_data *d, struct peer *p);

struct peer *dsd_links_add(dsd_data *d, const char *name, const char *endpoint)
{
    for (uint32_t i = 0; i < d->n_peers; i++)
        if (!strcmp(d->peers[i].endpoint, endpoint)) {
            snprintf(d->peers[i].name, sizeof(d->peers[i].name), "%s", name);
            return &d->peers[i];
        }
    if (d->n_peers >= MAX_PEERS)
        return NULL;
    struct peer *p = &d->peers[d->n_peers];
    memset(p, 0, sizeof(*p));
    snprintf(p->name, sizeof(p->name), "%s", name);
    snprintf(p->endpoint, sizeof(p->endpoint), "%s", endpoint);
    p->sock = zmq_socket(d->zctx, ZMQ_DEALER);
    int zero = 0, hwm = 0;
    zmq_setsockopt(p->sock, ZMQ_LINGER, &zero, sizeof(zero));
    /* never drop or block on a slow peer: messages queue until the link takes them */
    zmq_setsockopt(p->sock, ZMQ_SNDHWM, &hwm, sizeof(hwm));
    zmq_setsockopt(p->sock, ZMQ_RCVHWM, &hwm, sizeof(hwm));
    /* a peer's replies (combines, probe echoes) are bounded like what it may send us */
    if (dsd_guard_sock_limit(p->sock, d->o.max_frame_bytes) < 0 || dsd_curve_client(p->sock) < 0 ||
        zmq_connect(p->sock, endpoint) < 0) {
        ds_log_err("data: connect %s (%s): %s", endpoint, name, zmq_strerror(zmq_errno()));
        zmq_close(p->sock);
        return NULL;
    }
    p->cal_best = 1e9;
    d->n_peers++;
    cal_send(d, p);
    return p;
}

struct peer *dsd_links_of_node(dsd_data *d, uint32_t node)
{
    if (node >= d->plan.n_nodes || d->peer_of[node] < 0)
        return NULL;
    return &d->peers[d->peer_of[node]];
}

int dsd_links_send(dsd_data *d, struct peer *p, Dsd__Envelope *env, void **fr, const size_t *sz,
                   uint32_t n)
{
    size_t bytes = 0;
    for (uint32_t i = 0; i < n; i++)
        bytes += sz[i];
    p->bytes += bytes;
    d->dirty = true;
    if (d->have_plan && d->plan.token[0]) /* what makes the peer take it from a member */
        env->data_token = d->plan.token;
    return dsd_send(p->sock, NULL, 0, env, fr, sz, n);
}

static void cal_send(dsd_data *d, struct peer *p)
{
    bool big = p->cal_round >= CAL_PINGS;
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__LinkProbe lp = DSD__LINK_PROBE__INIT;
    Dsd__TensorDesc td, *tdp = &td;
    uint32_t shp[2];
    size_t sz = CAL_BW_FLOATS * sizeof(float);
    void *fr = big ? calloc(1, sz) : NULL;
    if (big && !fr) {
        p->cal_failed = true;
        return;
    }
    dsd_tensor_desc(&td, shp, DSD__DTYPE__DTYPE_F32, 1, CAL_BW_FLOATS);
    lp.seq = (uint64_t)p->cal_round;
    lp.sent_ns = p->cal_sent_ns = dsd_now_ns();
    env.request_id = p->cal_req = ++d->next_req;
    env.body_case = DSD__ENVELOPE__BODY_LINK_PROBE;
    env.link_probe = &lp;
    if (big) {
        env.n_tensors = 1;
        env.tensors = &tdp;
    }
    dsd_send(p->sock, NULL, 0, &env, big ? &fr : NULL, &sz, big ? 1 : 0);
}

void dsd_links_on_probe_reply(dsd_data *d, struct peer *p)
{
    double dt = (double)(dsd_now_ns() - p->cal_sent_ns) * 1e-9;
    bool big = p->cal_round >= CAL_PINGS;
    if (!big && dt < p->cal_best)
        p->cal_best = dt;
    if (big && dt > p->cal_best) {
        double bw = 2.0 * CAL_BW_FLOATS * sizeof(float) / (dt - p->cal_best);
        if (bw > p->cal_bw)
            p->cal_bw = bw;
    }
    p->cal_req = 0;
    if (++p->cal_round < CAL_PINGS + CAL_BW_ROUNDS) {
        cal_send(d, p);
        return;
    }
    p->cal_done = true;
    d->dirty = true;
    ds_log_info("link %s -> %s: latency %.1f us, bandwidth %.1f MB/s", d->o.node, p->name,
                p->cal_best / 2 * 1e6, p->cal_bw / 1e6);
}

void dsd_links_serve_probe(dsd_data *d, dsd_msg *m)
{
    const Dsd__Envelope *env = m->env;
    Dsd__Envelope rep = DSD__ENVELOPE__INIT;
    Dsd__LinkProbe lp = DSD__LINK_PROBE__INIT;
    lp.seq = env->link_probe->seq;
    lp.sent_ns = env->link_probe->sent_ns;
    lp.echo = true;
    rep.request_id = env->request_id;
    rep.body_case = DSD__ENVELOPE__BODY_LINK_PROBE;
    rep.link_probe = &lp;
    rep.n_tensors = env->n_tensors;
    rep.tensors = env->tensors;
    void *fr[DS_WIRE_MAX_TENSOR_FRAMES];
    size_t sz[DS_WIRE_MAX_TENSOR_FRAMES];
    for (uint32_t i = 0; i < m->n_frames; i++) {
        sz[i] = zmq_msg_size(&m->frames[i]);
        fr[i] = malloc(sz[i] ? sz[i] : 1);
        if (!fr[i]) {
            for (uint32_t j = 0; j < i; j++)
                free(fr[j]);
            return;
        }
        memcpy(fr[i], zmq_msg_data(&m->frames[i]), sz[i]);
    }
    dsd_send(d->router, m->peer, m->peer_len, &rep, fr, sz, m->n_frames);
}

/* Calibration probes without an answer within step_timeout are sent again. */
void dsd_links_expire(dsd_data *d, uint64_t now)
{
    for (uint32_t i = 0; i < d->n_peers; i++) {
        struct peer *p = &d->peers[i];
        if (p->cal_req && now - p->cal_sent_ns > (uint64_t)d->o.step_timeout_ms * 1000000ull) {
            ds_log_warn("link calibration to %s: no answer; retrying", p->name);
            cal_send(d, p);
        }
    }
}
