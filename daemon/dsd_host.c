/* dsd_host.c — the units a node hosts and the data-plane requests that run them.
 *
 * A host opens the checkpoint with only its units bound (the mapping is lazy, so a node pays
 * memory only for the weights it uses), keeps the MLA KV cache of every sequence for the
 * attention layers it hosts, and answers two requests:
 *   step     rows for attn[l]: runs attention + router, then the dense FFN (dense layers, added
 *            here) or the shared experts (MoE layers) beside it, and returns the rows;
 *   dispatch rows routed to experts it hosts: returns one UNWEIGHTED output row per
 *            (row, expert) pair; the caller combines them in the router's slot order with
 *            ds_moe_combine, which is what keeps the cluster bit-identical to the local
 *            engine (a pre-summed partial would change the floating-point order).
 * Every id, count and shape from the wire is checked against the model and this node's units
 * before use; a bad request gets an Error reply and a log line. */
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "ds_experts.h"
#include "ds_log.h"
#include "dsd.h"

#define HOST_MAX_ROWS 65536u
#define HOST_MAX_SEQS 8192u

struct seq_cache {
    uint64_t seq;
    ds_kv_cache *kv;
};

struct dsd_host {
    ds_model *m;
    ds_pool *pool;
    const ds_model_config *c;
    dsd_units u;
    uint32_t max_context;
    struct seq_cache *seqs; /* [HOST_MAX_SEQS], kv == NULL: free */
    uint32_t n_seqs;
    double *attn_s; /* [L] seconds of compute in attn[l] (+ shared/dense beside it) */
    uint64_t *attn_calls;
    double *expert_s; /* [L*E] */
    uint64_t *expert_rows;
};

static bool host_want(void *ctx, enum ds_unit_kind kind, uint32_t layer, uint32_t expert)
{
    const dsd_units *u = ctx;
    switch (kind) {
    case DS_UNIT_EMBED:
        return u->embed;
    case DS_UNIT_HEAD:
        return u->head;
    case DS_UNIT_ATTN:
    case DS_UNIT_DENSE:
    case DS_UNIT_SHARED:
        return layer < u->n_layers && u->attn[layer];
    case DS_UNIT_EXPERT:
        return layer < u->n_layers && expert < u->n_experts &&
               u->expert[(size_t)layer * u->n_experts + expert];
    }
    return false;
}

int dsd_host_new(const char *model_dir, const dsd_units *units, uint32_t threads,
                 uint32_t max_context, dsd_host **ret, ds_error *err)
{
    dsd_host *h = calloc(1, sizeof(*h));
    if (!h)
        return -ENOMEM;
    int rc = -ENOMEM;
    /* copy the unit set: the model's want callback reads it */
    h->u = *units;
    h->u.attn = calloc(units->n_layers ? units->n_layers : 1, sizeof(bool));
    h->u.expert = calloc((size_t)(units->n_layers ? units->n_layers : 1) *
                             (units->n_experts ? units->n_experts : 1),
                         sizeof(bool));
    if (!h->u.attn || !h->u.expert)
        goto fail;
    memcpy(h->u.attn, units->attn, units->n_layers * sizeof(bool));
    memcpy(h->u.expert, units->expert, (size_t)units->n_layers * units->n_experts * sizeof(bool));
    ds_model_open_opts oo = {.want = host_want, .want_ctx = &h->u};
    if ((rc = ds_model_open(model_dir, &oo, &h->m, err)) < 0)
        goto fail;
    h->c = ds_model_get_config(h->m);
    if (h->c->num_hidden_layers != units->n_layers || h->c->n_routed_experts != units->n_experts) {
        rc = ds_error_set(err, -EINVAL, "%s: model shape differs from the plan's", model_dir);
        goto fail;
    }
    h->max_context =
        max_context < h->c->max_position_embeddings ? max_context : h->c->max_position_embeddings;
    uint32_t L = h->c->num_hidden_layers, E = h->c->n_routed_experts ? h->c->n_routed_experts : 1;
    rc = -ENOMEM;
    h->seqs = calloc(HOST_MAX_SEQS, sizeof(*h->seqs));
    h->attn_s = calloc(L, sizeof(double));
    h->attn_calls = calloc(L, sizeof(uint64_t));
    h->expert_s = calloc((size_t)L * E, sizeof(double));
    h->expert_rows = calloc((size_t)L * E, sizeof(uint64_t));
    if (!h->seqs || !h->attn_s || !h->attn_calls || !h->expert_s || !h->expert_rows)
        goto fail;
    if ((rc = ds_pool_new(threads, NULL, 0, &h->pool)) < 0)
        goto fail;
    *ret = h;
    return 0;
fail:
    if (rc == -ENOMEM && !err->code)
        ds_error_set(err, rc, "out of memory");
    dsd_host_free(h);
    return rc;
}

dsd_host *dsd_host_free(dsd_host *h)
{
    if (!h)
        return NULL;
    if (h->seqs)
        for (uint32_t i = 0; i < HOST_MAX_SEQS; i++)
            ds_kv_cache_free(h->seqs[i].kv);
    free(h->seqs);
    ds_pool_free(h->pool);
    ds_model_free(h->m);
    dsd_units_clear(&h->u);
    free(h->attn_s);
    free(h->attn_calls);
    free(h->expert_s);
    free(h->expert_rows);
    free(h);
    return NULL;
}

const ds_model *dsd_host_model(const dsd_host *h)
{
    return h->m;
}

ds_pool *dsd_host_pool(const dsd_host *h)
{
    return h->pool;
}

static struct seq_cache *seq_find(dsd_host *h, uint64_t seq, bool create)
{
    struct seq_cache *free_slot = NULL;
    for (uint32_t i = 0; i < HOST_MAX_SEQS; i++) {
        if (h->seqs[i].kv && h->seqs[i].seq == seq)
            return &h->seqs[i];
        if (!h->seqs[i].kv && !free_slot)
            free_slot = &h->seqs[i];
    }
    if (!create || !free_slot)
        return NULL;
    if (ds_kv_cache_new(h->c, 0, h->c->num_hidden_layers, h->max_context, &free_slot->kv) < 0)
        return NULL;
    free_slot->seq = seq;
    h->n_seqs++;
    return free_slot;
}

static void seq_release(dsd_host *h, uint64_t seq)
{
    struct seq_cache *s = seq_find(h, seq, false);
    if (s) {
        s->kv = ds_kv_cache_free(s->kv);
        h->n_seqs--;
    }
}

static bool tensor_is(const Dsd__TensorDesc *t, Dsd__Dtype dt, uint32_t d0, uint32_t d1)
{
    return t->dtype == dt && t->n_shape == 2 && t->shape[0] == d0 && t->shape[1] == d1;
}

#define REFUSE(code, ...)                                                                          \
    do {                                                                                           \
        char _b[400];                                                                              \
        snprintf(_b, sizeof(_b), __VA_ARGS__);                                                     \
        ds_log_warn("data: refused %s from peer: %s", ds_wire_body_name(env), _b);                 \
        dsd_send_error(sock, m->peer, m->peer_len, env->request_id, code, "%s", _b);               \
        goto out;                                                                                  \
    } while (0)

static void serve_step(dsd_host *h, void *sock, dsd_msg *m, uint64_t plan_version)
{
    const Dsd__Envelope *env = m->env;
    const Dsd__StepHeader *st = env->step;
    const ds_model_config *c = h->c;
    uint32_t D = c->hidden_size, K = c->num_experts_per_tok ? c->num_experts_per_tok : 1;
    uint32_t L = c->num_hidden_layers, n = (uint32_t)st->n_seq_ids;
    uint32_t *pos = NULL;
    ds_kv_cache **caches = NULL;
    void *fr[5] = {0};
    ds_error err = {0};
    if (st->plan_version != plan_version)
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT, "plan version %llu, serving %llu",
               (unsigned long long)st->plan_version, (unsigned long long)plan_version);
    if (st->layer >= L || !h->u.attn[st->layer])
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT, "attn[%u] is not hosted here", st->layer);
    if (n == 0 || n > HOST_MAX_ROWS || st->n_positions != n || m->n_frames != 1 ||
        !tensor_is(env->tensors[0], DSD__DTYPE__DTYPE_F32, n, D))
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_MALFORMED,
               "step: need %u seq ids, %u positions and one f32 frame [rows, %u]", n, n, D);
    pos = malloc(n * sizeof(*pos));
    caches = malloc(n * sizeof(*caches));
    if (!pos || !caches)
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_INTERNAL, "out of memory");
    for (uint32_t i = 0; i < n; i++) {
        struct seq_cache *sc = seq_find(h, st->seq_ids[i], true);
        if (!sc)
            REFUSE(DSD__ERROR_CODE__ERROR_CODE_BUSY, "no room for sequence %llu",
                   (unsigned long long)st->seq_ids[i]);
        caches[i] = sc->kv;
        pos[i] = st->positions[i];
        bool follows = i > 0 && st->seq_ids[i - 1] == st->seq_ids[i];
        if (pos[i] >= h->max_context ||
            (follows ? pos[i] != pos[i - 1] + 1 : pos[i] > ds_kv_cache_len(sc->kv, st->layer)))
            REFUSE(DSD__ERROR_CODE__ERROR_CODE_MALFORMED,
                   "row %u: position %u invalid for job %llu", i, pos[i],
                   (unsigned long long)st->seq_ids[i]);
        for (uint32_t j = 0; !follows && j < i; j++)
            if (st->seq_ids[j] == st->seq_ids[i])
                REFUSE(DSD__ERROR_CODE__ERROR_CODE_MALFORMED,
                       "rows of job %llu are not consecutive", (unsigned long long)st->seq_ids[i]);
    }
    bool moe = ds_model_config_layer_is_moe(c, st->layer);
    uint32_t nf = moe ? (c->n_shared_experts ? 5 : 4) : 1;
    size_t rowb = (size_t)n * D * sizeof(float);
    size_t sizes[5] = {rowb, rowb, (size_t)n * K * sizeof(int32_t), (size_t)n * K * sizeof(float),
                       rowb};
    for (uint32_t i = 0; i < 5; i++)
        if (!(fr[i] = malloc(sizes[i])))
            REFUSE(DSD__ERROR_CODE__ERROR_CODE_INTERNAL, "out of memory");
    const float *xin = dsd_msg_frame(m, 0, NULL);
    if (!xin)
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_INTERNAL, "out of memory");
    uint64_t t0 = dsd_now_ns();
    ds_attn_out ao = {fr[0], fr[1], fr[2], fr[3]};
    int rc = ds_unit_attn(h->m, h->pool, st->layer, xin, n, pos, caches, &ao, &err);
    if (rc >= 0 && moe && c->n_shared_experts)
        rc = ds_unit_shared(h->m, h->pool, st->layer, fr[1], n, fr[4], &err);
    if (rc >= 0 && !moe) {
        rc = ds_unit_dense(h->m, h->pool, st->layer, fr[1], n, fr[4], &err);
        if (rc >= 0)
            ds_unit_add(D, n, fr[4], fr[0]);
    }
    if (rc < 0)
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_INTERNAL, "attn[%u]: %s", st->layer, ds_error_str(&err));
    double dt = (double)(dsd_now_ns() - t0) * 1e-9;
    h->attn_s[st->layer] += dt;
    h->attn_calls[st->layer]++;
    if (!moe) {
        free(fr[1]);
        fr[1] = NULL;
    }
    if (nf == 4) {
        free(fr[4]);
        fr[4] = NULL;
    }
    void *send_fr[5];
    size_t send_sz[5];
    Dsd__TensorDesc td[5], *tdp[5];
    uint32_t shp[5][2];
    static const Dsd__Dtype dts[5] = {DSD__DTYPE__DTYPE_F32, DSD__DTYPE__DTYPE_F32,
                                      DSD__DTYPE__DTYPE_I32, DSD__DTYPE__DTYPE_F32,
                                      DSD__DTYPE__DTYPE_F32};
    uint32_t order[5] = {0, 1, 2, 3, 4}, k = 0;
    for (uint32_t i = 0; i < 5 && k < nf; i++) {
        if (!fr[order[i]])
            continue;
        uint32_t j = order[i];
        send_fr[k] = fr[j];
        fr[j] = NULL;
        send_sz[k] = sizes[j];
        dsd_tensor_desc(&td[k], shp[k], dts[j], n, (j == 2 || j == 3) ? K : D);
        tdp[k] = &td[k];
        k++;
    }
    Dsd__Envelope rep = DSD__ENVELOPE__INIT;
    Dsd__CombineHeader ch = DSD__COMBINE_HEADER__INIT;
    ch.step = st->step;
    ch.plan_version = plan_version;
    ch.layer = st->layer;
    ch.rows = n;
    ch.compute_s = dt;
    ch.micro_batch = st->micro_batch;
    rep.request_id = env->request_id;
    rep.body_case = DSD__ENVELOPE__BODY_COMBINE;
    rep.combine = &ch;
    rep.n_tensors = k;
    rep.tensors = tdp;
    dsd_send(sock, m->peer, m->peer_len, &rep, send_fr, send_sz, k);
out:
    for (uint32_t i = 0; i < 5; i++)
        free(fr[i]);
    free(pos);
    free(caches);
}

static void serve_dispatch(dsd_host *h, void *sock, dsd_msg *m, uint64_t plan_version)
{
    const Dsd__Envelope *env = m->env;
    const Dsd__DispatchHeader *d = env->dispatch;
    const ds_model_config *c = h->c;
    uint32_t D = c->hidden_size, E = c->n_routed_experts, L = c->num_hidden_layers;
    uint32_t P = (uint32_t)d->n_pair_rows, R = d->rows;
    uint32_t *cnt = NULL, *idx = NULL;
    float *in = NULL, *tmp = NULL;
    void *out = NULL;
    ds_error err = {0};
    if (d->plan_version != plan_version)
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT, "plan version %llu, serving %llu",
               (unsigned long long)d->plan_version, (unsigned long long)plan_version);
    if (d->layer >= L || !ds_model_config_layer_is_moe(c, d->layer))
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT, "layer %u has no routed experts",
               d->layer);
    if (R == 0 || R > HOST_MAX_ROWS || P == 0 || P > (uint64_t)R * E || d->n_pair_experts != P ||
        d->n_pair_weights != P || m->n_frames != 1 ||
        !tensor_is(env->tensors[0], DSD__DTYPE__DTYPE_F32, R, D))
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_MALFORMED,
               "dispatch: need pairs (rows, experts, weights) of one length and one f32 frame "
               "[rows, %u]",
               D);
    for (uint32_t p = 0; p < P; p++) {
        if (d->pair_rows[p] >= R)
            REFUSE(DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "pair %u: row %u of %u", p,
                   d->pair_rows[p], R);
        if (d->pair_experts[p] >= E || !h->u.expert[(size_t)d->layer * E + d->pair_experts[p]])
            REFUSE(DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT, "expert[%u][%u] is not hosted here",
                   d->layer, d->pair_experts[p]);
    }
    cnt = calloc(E + 1, sizeof(*cnt));
    idx = malloc(P * sizeof(*idx));
    in = malloc((size_t)P * D * sizeof(float));
    tmp = malloc((size_t)P * D * sizeof(float));
    out = malloc((size_t)P * D * sizeof(float));
    if (!cnt || !idx || !in || !tmp || !out)
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_INTERNAL, "out of memory");
    /* group the pairs by expert (counting sort, stable) so each expert runs once */
    for (uint32_t p = 0; p < P; p++)
        cnt[d->pair_experts[p] + 1]++;
    for (uint32_t e = 0; e < E; e++)
        cnt[e + 1] += cnt[e];
    for (uint32_t p = 0; p < P; p++)
        idx[cnt[d->pair_experts[p]]++] = p;
    /* cnt[e] is now the end of expert e's group */
    const float *rows = dsd_msg_frame(m, 0, NULL);
    if (!rows)
        REFUSE(DSD__ERROR_CODE__ERROR_CODE_INTERNAL, "out of memory");
    uint64_t t0 = dsd_now_ns();
    uint32_t start = 0;
    for (uint32_t e = 0; e < E; e++) {
        uint32_t end = cnt[e], g = end - start;
        if (!g)
            continue;
        for (uint32_t j = 0; j < g; j++)
            memcpy(in + (size_t)j * D, rows + (size_t)d->pair_rows[idx[start + j]] * D,
                   D * sizeof(float));
        uint64_t te = dsd_now_ns();
        if (ds_unit_expert(h->m, h->pool, d->layer, e, in, g, tmp, &err) < 0)
            REFUSE(DSD__ERROR_CODE__ERROR_CODE_INTERNAL, "expert[%u][%u]: %s", d->layer, e,
                   ds_error_str(&err));
        h->expert_s[(size_t)d->layer * E + e] += (double)(dsd_now_ns() - te) * 1e-9;
        h->expert_rows[(size_t)d->layer * E + e] += g;
        for (uint32_t j = 0; j < g; j++)
            memcpy((float *)out + (size_t)idx[start + j] * D, tmp + (size_t)j * D,
                   D * sizeof(float));
        start = end;
    }
    double dt = (double)(dsd_now_ns() - t0) * 1e-9;
    Dsd__Envelope rep = DSD__ENVELOPE__INIT;
    Dsd__CombineHeader ch = DSD__COMBINE_HEADER__INIT;
    Dsd__TensorDesc td, *tdp = &td;
    uint32_t shp[2];
    dsd_tensor_desc(&td, shp, DSD__DTYPE__DTYPE_F32, P, D);
    ch.step = d->step;
    ch.plan_version = plan_version;
    ch.layer = d->layer;
    ch.rows = P;
    ch.compute_s = dt;
    ch.micro_batch = d->micro_batch;
    rep.request_id = env->request_id;
    rep.body_case = DSD__ENVELOPE__BODY_COMBINE;
    rep.combine = &ch;
    rep.n_tensors = 1;
    rep.tensors = &tdp;
    size_t osz = (size_t)P * D * sizeof(float);
    dsd_send(sock, m->peer, m->peer_len, &rep, &out, &osz, 1);
out:
    free(cnt);
    free(idx);
    free(in);
    free(tmp);
    free(out);
}

static void serve_probe(void *sock, dsd_msg *m)
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
        const void *src = zmq_msg_data(&m->frames[i]);
        sz[i] = zmq_msg_size(&m->frames[i]);
        fr[i] = malloc(sz[i] ? sz[i] : 1);
        if (!fr[i]) {
            for (uint32_t j = 0; j < i; j++)
                free(fr[j]);
            return;
        }
        memcpy(fr[i], src, sz[i]);
    }
    dsd_send(sock, m->peer, m->peer_len, &rep, fr, sz, m->n_frames);
}

void dsd_host_serve(dsd_host *h, void *sock, dsd_msg *m, uint64_t plan_version)
{
    Dsd__Envelope *env = m->env;
    switch (env->body_case) {
    case DSD__ENVELOPE__BODY_STEP:
        if (!h)
            goto no_units;
        serve_step(h, sock, m, plan_version);
        return;
    case DSD__ENVELOPE__BODY_DISPATCH:
        if (!h)
            goto no_units;
        serve_dispatch(h, sock, m, plan_version);
        return;
    case DSD__ENVELOPE__BODY_CANCEL:
        if (h)
            seq_release(h, env->cancel->job);
        return; /* fire and forget */
    case DSD__ENVELOPE__BODY_LINK_PROBE:
        serve_probe(sock, m);
        return;
    default:
        ds_log_warn("data: refused '%s' message: not a data-plane request", ds_wire_body_name(env));
        dsd_send_error(sock, m->peer, m->peer_len, env->request_id,
                       DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "'%s' is not a data-plane request",
                       ds_wire_body_name(env));
        return;
    }
no_units:
    ds_log_warn("data: refused '%s': this node has no plan loaded yet", ds_wire_body_name(env));
    dsd_send_error(sock, m->peer, m->peer_len, env->request_id,
                   DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT, "no plan loaded on this node");
}

char *dsd_host_stats_json(dsd_host *h)
{
    json_t *o = json_object();
    if (h) {
        uint32_t L = h->c->num_hidden_layers, E = h->c->n_routed_experts;
        char name[64];
        for (uint32_t l = 0; l < L; l++) {
            if (h->attn_calls[l]) {
                snprintf(name, sizeof(name), "attn[%u]", l);
                json_object_set_new(o, name,
                                    json_pack("{s:f,s:I}", "compute_s", h->attn_s[l], "calls",
                                              (json_int_t)h->attn_calls[l]));
            }
            for (uint32_t e = 0; e < E; e++) {
                size_t i = (size_t)l * E + e;
                if (!h->expert_rows[i])
                    continue;
                snprintf(name, sizeof(name), "expert[%u][%u]", l, e);
                json_object_set_new(o, name,
                                    json_pack("{s:f,s:I}", "compute_s", h->expert_s[i], "rows",
                                              (json_int_t)h->expert_rows[i]));
            }
        }
    }
    char *s = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(o);
    return s;
}
