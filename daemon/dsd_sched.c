/* dsd_sched.c — the coordinator's scheduler thread: jobs, continuous batching and the decode
 * step across the cluster.
 *
 * Each step takes every active job (continuous batching: jobs join and leave between steps),
 * one row per decoding job and all remaining prompt rows of a job in prefill, and runs:
 *   embed (here) -> for each layer: rows to the attn[l] host (attention, router, shared/dense
 *   beside it) -> one dispatch per expert-hosting node with the routed rows, expert ids and
 *   weights -> unweighted expert rows back -> ds_moe_combine in slot order (here) -> head and
 *   sampling (here).
 * Because every unit is row-independent and the combine order is the engine's, the tokens are
 * identical to `dsctl generate --local` (ds_model.h, bit-identity invariant).
 * Every request is timed: round trip, the host's reported compute time, and bytes, per node,
 * which gives the measured per-unit and per-link figures `dsctl placement` shows. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "ds_experts.h"
#include "ds_log.h"
#include "dsd.h"

#define SCHED_MAX_STOP 16

struct job {
    bool active;
    uint64_t id;
    uint8_t peer[DSD_MAX_PEER_ID];
    size_t peer_len;
    uint64_t request_id;
    int32_t *prompt;
    uint32_t n_prompt;
    uint32_t fed; /* positions already fed */
    uint32_t max_tokens;
    uint32_t n_gen;
    int32_t next; /* token to feed next (decode) */
    ds_sampler smp;
    int32_t stop_ids[SCHED_MAX_STOP];
    uint32_t n_stop;
};

struct link_stat {
    double latency_s, bandwidth_bytes_per_s; /* calibration */
    double rtt_s, compute_s;                 /* sums over requests */
    uint64_t bytes, messages;
};

struct dsd_sched {
    pthread_t th;
    bool started;
    void *zctx;
    char pipe_ep[128];
    dsd_plan plan;
    dsd_host *host;
    dsd_opts o;
    const ds_model_config *c;
    void **peers; /* [n_nodes] DEALER to each data endpoint */
    struct job *jobs;
    uint32_t max_jobs;
    uint64_t next_job, next_req, step, jobs_done;
    struct link_stat *links; /* [n_nodes] */
    double *attn_s;          /* [L] measured compute per attention layer */
    uint64_t *attn_calls;
    double *expert_s;        /* [n_nodes] measured expert compute per node */
    uint64_t *expert_counts; /* [L * E] routing counts */
    pthread_mutex_t mu;      /* guards the snapshots below */
    char *jobs_json, *stats_json, *links_json;
};

/* ---- helpers ------------------------------------------------------------------------------ */

static void job_finish(dsd_sched *s, void *pipe, struct job *j, const char *reason)
{
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__Token t = DSD__TOKEN__INIT;
    t.job = j->id;
    t.last = true;
    t.finish_reason = (char *)reason;
    t.id = 0;
    env.request_id = j->request_id;
    env.body_case = DSD__ENVELOPE__BODY_TOKEN;
    env.token = &t;
    uint8_t *buf;
    size_t len;
    if (j->peer_len && ds_wire_pack(&env, &buf, &len) == 0) {
        zmq_send(pipe, j->peer, j->peer_len, ZMQ_SNDMORE);
        zmq_send(pipe, buf, len, 0);
        free(buf);
    }
    /* free the KV caches on every attention host */
    Dsd__Envelope ce = DSD__ENVELOPE__INIT;
    Dsd__Cancel cc = DSD__CANCEL__INIT;
    cc.job = j->id;
    ce.body_case = DSD__ENVELOPE__BODY_CANCEL;
    ce.cancel = &cc;
    for (uint32_t n = 0; n < s->plan.n_nodes; n++)
        dsd_send(s->peers[n], NULL, 0, &ce, NULL, NULL, 0);
    ds_log_info("job %llu finished (%s) after %u tokens", (unsigned long long)j->id, reason,
                j->n_gen);
    free(j->prompt);
    memset(j, 0, sizeof(*j));
    s->jobs_done++;
}

static void pipe_reply(void *pipe, const uint8_t *peer, size_t peer_len, Dsd__Envelope *env)
{
    uint8_t *buf;
    size_t len;
    if (ds_wire_pack(env, &buf, &len) < 0)
        return;
    zmq_send(pipe, peer, peer_len, ZMQ_SNDMORE);
    zmq_send(pipe, buf, len, 0);
    free(buf);
}

static void pipe_error(void *pipe, const uint8_t *peer, size_t peer_len, uint64_t req,
                       Dsd__ErrorCode code, const char *msg)
{
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__Error e = DSD__ERROR__INIT;
    e.code = code;
    e.message = (char *)msg;
    env.request_id = req;
    env.body_case = DSD__ENVELOPE__BODY_ERROR;
    env.error = &e;
    ds_log_warn("client request %llu refused: %s", (unsigned long long)req, msg);
    pipe_reply(pipe, peer, peer_len, &env);
}

static void publish(dsd_sched *s)
{
    json_t *jobs = json_array();
    for (uint32_t i = 0; i < s->max_jobs; i++) {
        struct job *j = &s->jobs[i];
        if (!j->active)
            continue;
        json_array_append_new(jobs, json_pack("{s:I,s:s,s:i,s:i,s:i}", "id", (json_int_t)j->id,
                                              "state", j->fed < j->n_prompt ? "prefill" : "decode",
                                              "prompt_tokens", (int)j->n_prompt, "generated",
                                              (int)j->n_gen, "max_tokens", (int)j->max_tokens));
    }
    json_t *jr = json_pack("{s:o,s:I,s:I}", "jobs", jobs, "finished", (json_int_t)s->jobs_done,
                           "steps", (json_int_t)s->step);
    uint32_t L = s->plan.n_layers, E = s->plan.n_experts;
    json_t *links = json_array(), *units = json_object(), *counts = json_array();
    for (uint32_t n = 0; n < s->plan.n_nodes; n++) {
        struct link_stat *ls = &s->links[n];
        double tr = ls->rtt_s - ls->compute_s;
        json_array_append_new(
            links,
            json_pack("{s:s,s:s,s:f,s:f,s:f,s:f,s:I,s:I,s:f}", "from", s->plan.nodes[0], "to",
                      s->plan.nodes[n], "latency_s", ls->latency_s, "bandwidth_bytes_per_s",
                      ls->bandwidth_bytes_per_s, "measured_transfer_s", tr > 0 ? tr : 0.0,
                      "measured_compute_s", ls->compute_s, "messages", (json_int_t)ls->messages,
                      "bytes", (json_int_t)ls->bytes, "expert_compute_s", s->expert_s[n]));
    }
    char name[64];
    for (uint32_t l = 0; l < L; l++) {
        snprintf(name, sizeof(name), "attn[%u]", l);
        json_object_set_new(units, name,
                            json_pack("{s:s,s:f,s:I}", "node", s->plan.nodes[s->plan.attn[l]],
                                      "measured_compute_s", s->attn_s[l], "calls",
                                      (json_int_t)s->attn_calls[l]));
        if (s->plan.expert[(size_t)l * (E ? E : 1)] < 0 || !E)
            continue;
        json_t *row = json_array();
        for (uint32_t e = 0; e < E; e++)
            json_array_append_new(row,
                                  json_integer((json_int_t)s->expert_counts[(size_t)l * E + e]));
        json_array_append_new(counts, json_pack("{s:i,s:o}", "layer", (int)l, "counts", row));
    }
    json_t *st = json_pack("{s:o,s:o,s:{s:i,s:o}}", "links", links, "units", units, "expert_stats",
                           "n_routed_experts", (int)E, "layers", counts);
    char *a = json_dumps(jr, JSON_COMPACT), *b = json_dumps(st, JSON_COMPACT);
    json_decref(jr);
    json_decref(st);
    pthread_mutex_lock(&s->mu);
    free(s->jobs_json);
    free(s->stats_json);
    s->jobs_json = a;
    s->stats_json = b;
    pthread_mutex_unlock(&s->mu);
}

char *dsd_sched_json(dsd_sched *s, const char *what)
{
    if (!s)
        return NULL;
    pthread_mutex_lock(&s->mu);
    const char *src = !strcmp(what, "jobs") ? s->jobs_json : s->stats_json;
    char *r = src ? strdup(src) : NULL;
    pthread_mutex_unlock(&s->mu);
    return r;
}

/* ---- requests to unit hosts --------------------------------------------------------------- */

struct pending {
    uint32_t node;
    uint64_t req;
    uint64_t sent_ns;
    size_t bytes;
    dsd_msg reply;
    bool done;
};

static int send_req(dsd_sched *s, struct pending *p, uint32_t node, Dsd__Envelope *env, void **fr,
                    const size_t *sz, uint32_t n)
{
    memset(p, 0, sizeof(*p));
    p->node = node;
    p->req = env->request_id = ++s->next_req;
    p->sent_ns = dsd_now_ns();
    for (uint32_t i = 0; i < n; i++)
        p->bytes += sz[i];
    return dsd_send(s->peers[node], NULL, 0, env, fr, sz, n);
}

/* Waits for the replies of n pending requests (one per node at most). Stale replies (an older
 * request id, e.g. after a timeout) are dropped. */
static int wait_replies(dsd_sched *s, struct pending *p, uint32_t n, ds_error *err)
{
    uint64_t deadline = dsd_now_ns() + (uint64_t)s->o.step_timeout_ms * 1000000ull;
    uint32_t left = n;
    zmq_pollitem_t items[64];
    while (left) {
        uint32_t k = 0, map[64];
        for (uint32_t i = 0; i < n && k < 64; i++)
            if (!p[i].done) {
                items[k] = (zmq_pollitem_t){.socket = s->peers[p[i].node], .events = ZMQ_POLLIN};
                map[k++] = i;
            }
        uint64_t now = dsd_now_ns();
        if (now >= deadline)
            return ds_error_set(err, -ETIMEDOUT, "node %s did not answer within %lld ms",
                                s->plan.nodes[p[map[0]].node], (long long)s->o.step_timeout_ms);
        int r = zmq_poll(items, (int)k, (long)((deadline - now) / 1000000ull) + 1);
        if (r < 0 && zmq_errno() != EINTR)
            return ds_error_set(err, -zmq_errno(), "poll: %s", zmq_strerror(zmq_errno()));
        for (uint32_t q = 0; q < k; q++) {
            if (!(items[q].revents & ZMQ_POLLIN))
                continue;
            struct pending *pp = &p[map[q]];
            dsd_msg m;
            ds_error e2 = {0};
            int rc = dsd_msg_recv(s->peers[pp->node], false, DS_WIRE_MAX_ENVELOPE_BYTES, &m, &e2);
            if (rc == -EAGAIN)
                continue;
            if (rc < 0)
                return ds_error_set(err, rc, "node %s: bad reply: %s", s->plan.nodes[pp->node],
                                    ds_error_str(&e2));
            if (m.env->request_id != pp->req) {
                dsd_msg_close(&m);
                continue;
            }
            if (m.env->body_case == DSD__ENVELOPE__BODY_ERROR) {
                rc = ds_error_set(err, -EPROTO, "node %s: %s", s->plan.nodes[pp->node],
                                  m.env->error->message);
                dsd_msg_close(&m);
                return rc;
            }
            pp->reply = m;
            pp->done = true;
            left--;
            double rtt = (double)(dsd_now_ns() - pp->sent_ns) * 1e-9;
            struct link_stat *ls = &s->links[pp->node];
            ls->rtt_s += rtt;
            ls->messages++;
            ls->bytes += pp->bytes;
            for (uint32_t f = 0; f < m.n_frames; f++)
                ls->bytes += zmq_msg_size(&m.frames[f]);
            if (m.env->body_case == DSD__ENVELOPE__BODY_COMBINE)
                ls->compute_s += m.env->combine->compute_s;
        }
    }
    return 0;
}

static void pending_close(struct pending *p, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        if (p[i].done)
            dsd_msg_close(&p[i].reply);
}

static bool frame_is(const dsd_msg *m, uint32_t i, Dsd__Dtype dt, uint32_t d0, uint32_t d1)
{
    if (i >= m->n_frames)
        return false;
    const Dsd__TensorDesc *t = m->env->tensors[i];
    return t->dtype == dt && t->n_shape == 2 && t->shape[0] == d0 && t->shape[1] == d1;
}

static void *dup_buf(const void *src, size_t n)
{
    void *d = malloc(n ? n : 1);
    if (d)
        memcpy(d, src, n);
    return d;
}

/* One forward pass over n rows; writes logits of the rows in last_rows[n_last]. */
static int forward(dsd_sched *s, uint32_t n, const int32_t *tokens, const uint64_t *seq_ids,
                   const uint32_t *positions, const uint32_t *last_rows, uint32_t n_last,
                   float *logits, ds_error *err)
{
    const ds_model_config *c = s->c;
    const ds_model *m = dsd_host_model(s->host);
    ds_pool *pool = dsd_host_pool(s->host);
    uint32_t D = c->hidden_size, K = c->num_experts_per_tok ? c->num_experts_per_tok : 1;
    uint32_t E = c->n_routed_experts, N = s->plan.n_nodes;
    size_t rowb = (size_t)n * D * sizeof(float);
    float *x = malloc(rowb), *eo = malloc(rowb * K), *sel = NULL;
    uint32_t *rows_of = malloc((size_t)n * sizeof(uint32_t));
    struct pending *pend = calloc(N + 1, sizeof(*pend)); /* attn + one per node */
    uint32_t n_pend = 0;
    int rc = -ENOMEM;
    if (!x || !eo || !rows_of || !pend) {
        ds_error_set(err, rc, "out of memory");
        goto out;
    }
    if ((rc = ds_unit_embed(m, pool, tokens, n, x, err)) < 0)
        goto out;
    for (uint32_t l = 0; l < c->num_hidden_layers; l++) {
        uint32_t a = (uint32_t)s->plan.attn[l];
        bool moe = ds_model_config_layer_is_moe(c, l);
        Dsd__Envelope env = DSD__ENVELOPE__INIT;
        Dsd__StepHeader sh = DSD__STEP_HEADER__INIT;
        Dsd__TensorDesc td, *tdp = &td;
        uint32_t shp[2];
        dsd_tensor_desc(&td, shp, DSD__DTYPE__DTYPE_F32, n, D);
        char uname[32];
        snprintf(uname, sizeof(uname), "attn[%u]", l);
        sh.step = s->step;
        sh.plan_version = s->plan.version;
        sh.layer = l;
        sh.unit = uname;
        sh.n_seq_ids = n;
        sh.seq_ids = (uint64_t *)seq_ids;
        sh.n_positions = n;
        sh.positions = (uint32_t *)positions;
        env.body_case = DSD__ENVELOPE__BODY_STEP;
        env.step = &sh;
        env.n_tensors = 1;
        env.tensors = &tdp;
        void *fr = dup_buf(x, rowb);
        if (!fr) {
            rc = ds_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        n_pend = 1;
        if ((rc = send_req(s, &pend[0], a, &env, &fr, &rowb, 1)) < 0 ||
            (rc = wait_replies(s, pend, 1, err)) < 0)
            goto out;
        dsd_msg *r = &pend[0].reply;
        uint32_t want = moe ? (c->n_shared_experts ? 5 : 4) : 1;
        if (r->env->body_case != DSD__ENVELOPE__BODY_COMBINE || r->n_frames != want ||
            !frame_is(r, 0, DSD__DTYPE__DTYPE_F32, n, D) ||
            (moe && (!frame_is(r, 1, DSD__DTYPE__DTYPE_F32, n, D) ||
                     !frame_is(r, 2, DSD__DTYPE__DTYPE_I32, n, K) ||
                     !frame_is(r, 3, DSD__DTYPE__DTYPE_F32, n, K) ||
                     (want == 5 && !frame_is(r, 4, DSD__DTYPE__DTYPE_F32, n, D))))) {
            rc = ds_error_set(err, -EPROTO, "node %s: attn[%u] reply has the wrong frames",
                              s->plan.nodes[a], l);
            goto out;
        }
        s->attn_s[l] += r->env->combine->compute_s;
        s->attn_calls[l]++;
        const float *hid = dsd_msg_frame(r, 0, NULL);
        if (!hid) {
            rc = ds_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        memcpy(x, hid, rowb);
        if (!moe) {
            pending_close(pend, n_pend);
            n_pend = 0;
            continue;
        }
        const float *fin = dsd_msg_frame(r, 1, NULL);
        const int32_t *ids = dsd_msg_frame(r, 2, NULL);
        const float *w = dsd_msg_frame(r, 3, NULL);
        const float *shared = want == 5 ? dsd_msg_frame(r, 4, NULL) : NULL;
        if (!fin || !ids || !w || (want == 5 && !shared)) {
            rc = ds_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        for (uint32_t i = 0; i < n * K; i++)
            if (ids[i] < 0 || (uint32_t)ids[i] >= E) {
                rc = ds_error_set(err, -EPROTO, "node %s: expert id %d out of range",
                                  s->plan.nodes[a], ids[i]);
                goto out;
            }
        /* one dispatch per destination node */
        struct pending *dp = pend + 1;
        uint32_t n_dp = 0;
        uint32_t *pair_slot_all = malloc((size_t)n * K * sizeof(uint32_t));
        uint32_t *pr = malloc((size_t)n * K * sizeof(uint32_t));
        uint32_t *pe = malloc((size_t)n * K * sizeof(uint32_t));
        float *pw = malloc((size_t)n * K * sizeof(float));
        uint32_t *slot_node_start = calloc(N + 1, sizeof(uint32_t));
        if (!pair_slot_all || !pr || !pe || !pw || !slot_node_start) {
            free(pair_slot_all), free(pr), free(pe), free(pw), free(slot_node_start);
            rc = ds_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        uint32_t done_pairs = 0;
        uint32_t *dest_of = calloc(N, sizeof(uint32_t)); /* pending index per node */
        for (uint32_t node = 0; node < N && dest_of; node++) {
            uint32_t P = 0, R = 0;
            for (uint32_t i = 0; i < n; i++) {
                bool used = false;
                for (uint32_t k2 = 0; k2 < K; k2++) {
                    int32_t e = ids[i * K + k2];
                    if (s->plan.expert[(size_t)l * E + (uint32_t)e] != (int32_t)node)
                        continue;
                    if (!used) {
                        rows_of[R++] = i;
                        used = true;
                    }
                    pr[P] = R - 1;
                    pe[P] = (uint32_t)e;
                    pw[P] = w[i * K + k2];
                    pair_slot_all[done_pairs + P] = i * K + k2;
                    P++;
                    s->expert_counts[(size_t)l * E + (uint32_t)e]++;
                }
            }
            slot_node_start[node] = done_pairs;
            if (!P)
                continue;
            float *rows = malloc((size_t)R * D * sizeof(float));
            if (!rows) {
                rc = ds_error_set(err, -ENOMEM, "out of memory");
                break;
            }
            for (uint32_t j = 0; j < R; j++)
                memcpy(rows + (size_t)j * D, fin + (size_t)rows_of[j] * D, D * sizeof(float));
            Dsd__Envelope de = DSD__ENVELOPE__INIT;
            Dsd__DispatchHeader dh = DSD__DISPATCH_HEADER__INIT;
            Dsd__TensorDesc dtd, *dtdp = &dtd;
            uint32_t dshp[2];
            dsd_tensor_desc(&dtd, dshp, DSD__DTYPE__DTYPE_F32, R, D);
            dh.step = s->step;
            dh.plan_version = s->plan.version;
            dh.layer = l;
            dh.rows = R;
            dh.n_pair_rows = dh.n_pair_experts = dh.n_pair_weights = P;
            dh.pair_rows = pr;
            dh.pair_experts = pe;
            dh.pair_weights = pw;
            de.body_case = DSD__ENVELOPE__BODY_DISPATCH;
            de.dispatch = &dh;
            de.n_tensors = 1;
            de.tensors = &dtdp;
            size_t rsz = (size_t)R * D * sizeof(float);
            void *rf = rows;
            dest_of[node] = n_dp;
            if ((rc = send_req(s, &dp[n_dp], node, &de, &rf, &rsz, 1)) < 0)
                break;
            dp[n_dp].bytes = P; /* reuse: pair count, restored below */
            n_dp++;
            done_pairs += P;
            rc = 0;
        }
        if (!dest_of)
            rc = ds_error_set(err, -ENOMEM, "out of memory");
        uint32_t *pair_counts = NULL;
        if (rc >= 0) {
            pair_counts = malloc((n_dp ? n_dp : 1) * sizeof(uint32_t));
            for (uint32_t i = 0; i < n_dp && pair_counts; i++) {
                pair_counts[i] = (uint32_t)dp[i].bytes;
                dp[i].bytes = 0;
            }
            n_pend = 1 + n_dp;
            rc = wait_replies(s, dp, n_dp, err);
        }
        for (uint32_t i = 0; rc >= 0 && i < n_dp; i++) {
            dsd_msg *dr = &dp[i].reply;
            uint32_t node = dp[i].node, P = pair_counts[i];
            if (dr->env->body_case != DSD__ENVELOPE__BODY_COMBINE ||
                !frame_is(dr, 0, DSD__DTYPE__DTYPE_F32, P, D)) {
                rc = ds_error_set(err, -EPROTO, "node %s: dispatch reply has the wrong frames",
                                  s->plan.nodes[node]);
                break;
            }
            s->expert_s[node] += dr->env->combine->compute_s;
            const float *o = dsd_msg_frame(dr, 0, NULL);
            if (!o) {
                rc = ds_error_set(err, -ENOMEM, "out of memory");
                break;
            }
            uint32_t base = slot_node_start[node];
            for (uint32_t p = 0; p < P; p++)
                memcpy(eo + (size_t)pair_slot_all[base + p] * D, o + (size_t)p * D,
                       D * sizeof(float));
        }
        free(pair_slot_all), free(pr), free(pe), free(pw), free(slot_node_start), free(dest_of);
        free(pair_counts);
        if (rc < 0)
            goto out;
        ds_moe_combine(D, n, K, w, eo, shared, x);
        pending_close(pend, n_pend);
        n_pend = 0;
    }
    sel = malloc((size_t)n_last * D * sizeof(float));
    if (!sel) {
        rc = ds_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (uint32_t i = 0; i < n_last; i++)
        memcpy(sel + (size_t)i * D, x + (size_t)last_rows[i] * D, D * sizeof(float));
    rc = ds_unit_head(m, pool, sel, n_last, logits, err);
out:
    pending_close(pend, n_pend);
    free(pend);
    free(x);
    free(eo);
    free(sel);
    free(rows_of);
    return rc;
}

/* ---- jobs --------------------------------------------------------------------------------- */

static void handle_submit(dsd_sched *s, void *pipe, const uint8_t *peer, size_t pl,
                          Dsd__Envelope *env)
{
    const Dsd__Submit *sb = env->submit;
    const ds_model_config *c = s->c;
    uint32_t ctx = (uint32_t)s->o.max_context < c->max_position_embeddings
                       ? (uint32_t)s->o.max_context
                       : c->max_position_embeddings;
    char msg[256];
#define BAD(code, ...)                                                                             \
    do {                                                                                           \
        snprintf(msg, sizeof(msg), __VA_ARGS__);                                                   \
        pipe_error(pipe, peer, pl, env->request_id, code, msg);                                    \
        return;                                                                                    \
    } while (0)
    if (!sb->n_tokens)
        BAD(DSD__ERROR_CODE__ERROR_CODE_MALFORMED,
            sb->prompt && sb->prompt[0] ? "text prompts need the tokenizer, which this "
                                          "coordinator does not have: send token ids"
                                        : "empty prompt");
    if (sb->n_tokens >= ctx || sb->max_tokens == 0 || sb->n_tokens + sb->max_tokens > ctx)
        BAD(DSD__ERROR_CODE__ERROR_CODE_TOO_LARGE,
            "prompt (%zu tokens) + max_tokens (%u) must fit the context of %u and max_tokens "
            "must be > 0",
            sb->n_tokens, sb->max_tokens, ctx);
    for (size_t i = 0; i < sb->n_tokens; i++)
        if (sb->tokens[i] >= c->vocab_size)
            BAD(DSD__ERROR_CODE__ERROR_CODE_MALFORMED,
                "token %zu: id %u outside the vocabulary (%u)", i, sb->tokens[i], c->vocab_size);
    float temp = sb->sampling ? sb->sampling->temperature : 0;
    float top_p = sb->sampling && sb->sampling->top_p > 0 ? sb->sampling->top_p : 1;
    if (!(temp >= 0 && temp <= 1e6) || !(top_p > 0 && top_p <= 1))
        BAD(DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "sampling: temperature must be in [0, 1e6] "
                                                   "and top_p in (0, 1]");
    if (sb->n_stop > SCHED_MAX_STOP)
        BAD(DSD__ERROR_CODE__ERROR_CODE_TOO_LARGE, "at most %d stop entries", SCHED_MAX_STOP);
    struct job *j = NULL;
    for (uint32_t i = 0; i < s->max_jobs && !j; i++)
        if (!s->jobs[i].active)
            j = &s->jobs[i];
    if (!j)
        BAD(DSD__ERROR_CODE__ERROR_CODE_BUSY, "%u jobs running, the limit (max_jobs)", s->max_jobs);
    int32_t stops[SCHED_MAX_STOP];
    for (size_t i = 0; i < sb->n_stop; i++) {
        const char *st = sb->stop[i];
        char *end;
        if (!strcmp(st, "eos"))
            stops[i] = c->eos_token_id;
        else if (!strncmp(st, "id:", 3) && (stops[i] = (int32_t)strtol(st + 3, &end, 10)) >= 0 &&
                 end != st + 3 && !*end)
            ;
        else
            BAD(DSD__ERROR_CODE__ERROR_CODE_MALFORMED,
                "stop '%.64s': without a tokenizer only 'eos' and 'id:N' are understood", st);
    }
    memset(j, 0, sizeof(*j));
    j->prompt = malloc(sb->n_tokens * sizeof(int32_t));
    if (!j->prompt)
        BAD(DSD__ERROR_CODE__ERROR_CODE_INTERNAL, "out of memory");
    for (size_t i = 0; i < sb->n_tokens; i++)
        j->prompt[i] = (int32_t)sb->tokens[i];
    j->active = true;
    j->id = ++s->next_job;
    memcpy(j->peer, peer, pl);
    j->peer_len = pl;
    j->request_id = env->request_id;
    j->n_prompt = (uint32_t)sb->n_tokens;
    j->max_tokens = sb->max_tokens;
    j->n_stop = (uint32_t)sb->n_stop;
    memcpy(j->stop_ids, stops, sb->n_stop * sizeof(int32_t));
    j->smp = (ds_sampler){.greedy = temp == 0,
                          .temperature = temp > 0 ? temp : 1,
                          .top_p = top_p,
                          .top_k = sb->sampling ? sb->sampling->top_k : 0};
    ds_sampler_seed(&j->smp, sb->sampling ? sb->sampling->seed : 1);
    /* acknowledge with the job id so the client can cancel before the first token */
    Dsd__Envelope ack = DSD__ENVELOPE__INIT;
    Dsd__StatusReply sr = DSD__STATUS_REPLY__INIT;
    char js[64];
    snprintf(js, sizeof(js), "{\"job\":%llu}", (unsigned long long)j->id);
    sr.json = js;
    ack.request_id = env->request_id;
    ack.body_case = DSD__ENVELOPE__BODY_STATUS_REPLY;
    ack.status_reply = &sr;
    pipe_reply(pipe, peer, pl, &ack);
    ds_log_info("job %llu accepted: %u prompt tokens, max %u", (unsigned long long)j->id,
                j->n_prompt, j->max_tokens);
#undef BAD
}

static void handle_cancel(dsd_sched *s, void *pipe, const uint8_t *peer, size_t pl,
                          Dsd__Envelope *env)
{
    for (uint32_t i = 0; i < s->max_jobs; i++) {
        struct job *j = &s->jobs[i];
        if (j->active && j->id == env->cancel->job) {
            /* a client may cancel only its own jobs; the loop cancels on disconnect (pl == 0) */
            if (pl && (pl != j->peer_len || memcmp(peer, j->peer, pl)))
                break;
            if (!pl)
                j->peer_len = 0; /* the client is gone: no final token to send */
            job_finish(s, pipe, j, "cancelled");
            return;
        }
    }
    if (pl)
        pipe_error(pipe, peer, pl, env->request_id, DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_JOB,
                   "no such job");
}

static void run_step(dsd_sched *s, void *pipe)
{
    uint32_t n = 0, nj = 0;
    for (uint32_t i = 0; i < s->max_jobs; i++)
        if (s->jobs[i].active) {
            struct job *j = &s->jobs[i];
            n += j->fed < j->n_prompt ? j->n_prompt - j->fed : 1;
            nj++;
        }
    if (!nj)
        return;
    int32_t *tok = malloc(n * sizeof(*tok));
    uint64_t *ids = malloc(n * sizeof(*ids));
    uint32_t *pos = malloc(n * sizeof(*pos)), *last = malloc(nj * sizeof(*last));
    struct job **jl = malloc(nj * sizeof(*jl));
    float *logits = malloc((size_t)nj * s->c->vocab_size * sizeof(float));
    ds_error err = {0};
    int rc = -ENOMEM;
    if (!tok || !ids || !pos || !last || !jl || !logits)
        goto fail;
    uint32_t r = 0, q = 0;
    for (uint32_t i = 0; i < s->max_jobs; i++) {
        struct job *j = &s->jobs[i];
        if (!j->active)
            continue;
        if (j->fed < j->n_prompt) {
            for (uint32_t p = j->fed; p < j->n_prompt; p++, r++) {
                tok[r] = j->prompt[p];
                ids[r] = j->id;
                pos[r] = p;
            }
        } else {
            tok[r] = j->next;
            ids[r] = j->id;
            pos[r] = j->fed;
            r++;
        }
        last[q] = r - 1;
        jl[q++] = j;
    }
    s->step++;
    rc = forward(s, n, tok, ids, pos, last, nj, logits, &err);
fail:
    if (rc < 0) {
        ds_log_err("step %llu failed: %s", (unsigned long long)s->step, ds_error_str(&err));
        for (uint32_t i = 0; i < s->max_jobs; i++)
            if (s->jobs[i].active)
                job_finish(s, pipe, &s->jobs[i], "error");
    } else {
        for (uint32_t i = 0; i < nj; i++) {
            struct job *j = jl[i];
            j->fed = j->fed < j->n_prompt ? j->n_prompt : j->fed + 1;
            int32_t t =
                ds_sampler_pick(&j->smp, logits + (size_t)i * s->c->vocab_size, s->c->vocab_size);
            j->n_gen++;
            j->next = t;
            const char *reason = j->n_gen >= j->max_tokens ? "length" : NULL;
            for (uint32_t k = 0; k < j->n_stop && !reason; k++)
                if (j->stop_ids[k] == t)
                    reason = "stop";
            Dsd__Envelope env = DSD__ENVELOPE__INIT;
            Dsd__Token tk = DSD__TOKEN__INIT;
            tk.job = j->id;
            tk.id = (uint32_t)t;
            tk.last = reason != NULL;
            tk.finish_reason = (char *)(reason ? reason : "");
            env.request_id = j->request_id;
            env.body_case = DSD__ENVELOPE__BODY_TOKEN;
            env.token = &tk;
            pipe_reply(pipe, j->peer, j->peer_len, &env);
            if (reason) {
                j->peer_len = 0; /* the final token carried last = true */
                job_finish(s, pipe, j, reason);
            }
        }
    }
    free(tok);
    free(ids);
    free(pos);
    free(last);
    free(jl);
    free(logits);
}

/* ---- link calibration --------------------------------------------------------------------- */

static void calibrate(dsd_sched *s)
{
    enum { PINGS = 16, BW_ROUNDS = 4, BW_FLOATS = 256 * 1024 };
    for (uint32_t n = 0; n < s->plan.n_nodes; n++) {
        double best = 1e9, bw_best = 0;
        ds_error err = {0};
        for (int rnd = 0; rnd < PINGS + BW_ROUNDS; rnd++) {
            bool big = rnd >= PINGS;
            Dsd__Envelope env = DSD__ENVELOPE__INIT;
            Dsd__LinkProbe lp = DSD__LINK_PROBE__INIT;
            Dsd__TensorDesc td, *tdp = &td;
            uint32_t shp[2];
            dsd_tensor_desc(&td, shp, DSD__DTYPE__DTYPE_F32, 1, BW_FLOATS);
            lp.seq = (uint64_t)rnd;
            lp.sent_ns = dsd_now_ns();
            env.body_case = DSD__ENVELOPE__BODY_LINK_PROBE;
            env.link_probe = &lp;
            size_t sz = BW_FLOATS * sizeof(float);
            void *fr = big ? calloc(1, sz) : NULL;
            if (big) {
                env.n_tensors = 1;
                env.tensors = &tdp;
            }
            struct pending p;
            uint64_t t0 = dsd_now_ns();
            if (send_req(s, &p, n, &env, big ? &fr : NULL, &sz, big ? 1 : 0) < 0 ||
                wait_replies(s, &p, 1, &err) < 0) {
                ds_log_warn("link calibration to %s failed: %s", s->plan.nodes[n],
                            ds_error_str(&err));
                break;
            }
            double dt = (double)(dsd_now_ns() - t0) * 1e-9;
            pending_close(&p, 1);
            if (!big && dt < best)
                best = dt;
            if (big && dt > best) {
                double bw = 2.0 * (double)sz / (dt - best);
                if (bw > bw_best)
                    bw_best = bw;
            }
        }
        s->links[n] = (struct link_stat){.latency_s = best < 1e9 ? best / 2 : 0,
                                         .bandwidth_bytes_per_s = bw_best};
        ds_log_info("link %s -> %s: latency %.1f us, bandwidth %.1f MB/s", s->plan.nodes[0],
                    s->plan.nodes[n], s->links[n].latency_s * 1e6, bw_best / 1e6);
    }
}

/* ---- thread ------------------------------------------------------------------------------- */

static void *sched_main(void *arg)
{
    dsd_sched *s = arg;
    void *pipe = zmq_socket(s->zctx, ZMQ_PAIR);
    zmq_connect(pipe, s->pipe_ep);
    calibrate(s);
    publish(s);
    bool running = true;
    while (running) {
        bool busy = false;
        for (uint32_t i = 0; i < s->max_jobs && !busy; i++)
            busy = s->jobs[i].active;
        zmq_pollitem_t it = {.socket = pipe, .events = ZMQ_POLLIN};
        int r = zmq_poll(&it, 1, busy ? 0 : 500);
        if (r < 0 && zmq_errno() == ETERM)
            break;
        /* take every queued request before the next step (jobs join between steps) */
        while (r > 0) {
            zmq_msg_t a, b;
            zmq_msg_init(&a);
            zmq_msg_init(&b);
            if (zmq_msg_recv(&a, pipe, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(&a);
                zmq_msg_close(&b);
                break;
            }
            if (zmq_msg_size(&a) == 4 && !memcmp(zmq_msg_data(&a), "STOP", 4)) {
                running = false;
                zmq_msg_close(&a);
                zmq_msg_close(&b);
                break;
            }
            zmq_msg_recv(&b, pipe, 0);
            Dsd__Envelope *env = NULL;
            ds_error err = {0};
            if (ds_wire_unpack(zmq_msg_data(&b), zmq_msg_size(&b), &env, &err) == 0) {
                const uint8_t *peer = zmq_msg_data(&a);
                size_t pl = zmq_msg_size(&a);
                if (env->body_case == DSD__ENVELOPE__BODY_SUBMIT)
                    handle_submit(s, pipe, peer, pl, env);
                else if (env->body_case == DSD__ENVELOPE__BODY_CANCEL)
                    handle_cancel(s, pipe, peer, pl, env);
                ds_wire_free(env);
            }
            zmq_msg_close(&a);
            zmq_msg_close(&b);
        }
        if (!running)
            break;
        run_step(s, pipe);
        publish(s);
    }
    for (uint32_t i = 0; i < s->max_jobs; i++)
        if (s->jobs[i].active)
            job_finish(s, pipe, &s->jobs[i], "cancelled");
    zmq_close(pipe);
    return NULL;
}

int dsd_sched_start(void *zctx, const char *pipe_endpoint, const dsd_plan *plan, dsd_host *host,
                    const dsd_opts *o, dsd_sched **ret, ds_error *err)
{
    dsd_sched *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->zctx = zctx;
    snprintf(s->pipe_ep, sizeof(s->pipe_ep), "%s", pipe_endpoint);
    s->host = host;
    s->o = *o;
    s->c = ds_model_get_config(dsd_host_model(host));
    s->plan = *plan;
    s->plan.solver_json = NULL; /* the loop's; the scheduler needs only the unit map */
    uint32_t N = plan->n_nodes, L = plan->n_layers, E = plan->n_experts ? plan->n_experts : 1;
    /* deep copy the plan arrays */
    s->plan.nodes = malloc(N * sizeof(*s->plan.nodes));
    s->plan.endpoints = malloc(N * sizeof(*s->plan.endpoints));
    s->plan.attn = malloc(L * sizeof(int32_t));
    s->plan.expert = malloc((size_t)L * E * sizeof(int32_t));
    s->max_jobs = (uint32_t)o->max_jobs;
    s->jobs = calloc(s->max_jobs, sizeof(*s->jobs));
    s->peers = calloc(N, sizeof(void *));
    s->links = calloc(N, sizeof(*s->links));
    s->expert_s = calloc(N, sizeof(double));
    s->attn_s = calloc(L, sizeof(double));
    s->attn_calls = calloc(L, sizeof(uint64_t));
    s->expert_counts = calloc((size_t)L * E, sizeof(uint64_t));
    pthread_mutex_init(&s->mu, NULL);
    if (!s->plan.nodes || !s->plan.endpoints || !s->plan.attn || !s->plan.expert || !s->jobs ||
        !s->peers || !s->links || !s->expert_s || !s->attn_s || !s->attn_calls ||
        !s->expert_counts) {
        dsd_sched_stop(s);
        return ds_error_set(err, -ENOMEM, "scheduler: out of memory");
    }
    memcpy(s->plan.nodes, plan->nodes, N * sizeof(*s->plan.nodes));
    memcpy(s->plan.endpoints, plan->endpoints, N * sizeof(*s->plan.endpoints));
    memcpy(s->plan.attn, plan->attn, L * sizeof(int32_t));
    memcpy(s->plan.expert, plan->expert, (size_t)L * E * sizeof(int32_t));
    for (uint32_t i = 0; i < N; i++) {
        s->peers[i] = zmq_socket(zctx, ZMQ_DEALER);
        int zero = 0;
        zmq_setsockopt(s->peers[i], ZMQ_LINGER, &zero, sizeof(zero));
        if (zmq_connect(s->peers[i], plan->endpoints[i]) < 0) {
            int rc = ds_error_set(err, -EINVAL, "scheduler: connect %s: %s", plan->endpoints[i],
                                  zmq_strerror(zmq_errno()));
            dsd_sched_stop(s);
            return rc;
        }
    }
    if (pthread_create(&s->th, NULL, sched_main, s) != 0) {
        dsd_sched_stop(s);
        return ds_error_set(err, -EAGAIN, "scheduler: cannot start thread");
    }
    s->started = true;
    *ret = s;
    return 0;
}

/* Joins the thread (the loop has sent STOP on the pipe) and frees everything. */
void dsd_sched_stop(dsd_sched *s)
{
    if (!s)
        return;
    if (s->started)
        pthread_join(s->th, NULL);
    for (uint32_t i = 0; s->peers && i < s->plan.n_nodes; i++)
        if (s->peers[i])
            zmq_close(s->peers[i]);
    for (uint32_t i = 0; s->jobs && i < s->max_jobs; i++)
        free(s->jobs[i].prompt);
    free(s->peers);
    free(s->jobs);
    free(s->links);
    free(s->expert_s);
    free(s->attn_s);
    free(s->attn_calls);
    free(s->expert_counts);
    free(s->jobs_json);
    free(s->stats_json);
    free(s->links_json);
    pthread_mutex_destroy(&s->mu);
    dsd_plan_clear(&s->plan);
    free(s);
}
