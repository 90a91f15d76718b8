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

#include "ds_backend_moe.h"
#include "ds_experts.h"
#include "ds_log.h"
#include "dsd.h"

#define HOST_MAX_ROWS DSD_MAX_ROWS
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
    /* accelerators the plan gave experts to (u.expert_dev > 0): one backend each */
    ds_backend *bk[DSD_MAX_DEVNAMES];
    ds_backend_moe *bm[DSD_MAX_DEVNAMES];
};

struct dev_want {
    const dsd_units *u;
    uint8_t dev;
};

static bool expert_on_dev(void *ctx, uint32_t layer, uint32_t expert)
{
    const struct dev_want *w = ctx;
    size_t i = (size_t)layer * w->u->n_experts + expert;
    return layer < w->u->n_layers && expert < w->u->n_experts && w->u->expert[i] &&
           w->u->expert_dev[i] == w->dev;
}

/* "opencl0" -> "opencl:0", "cuda1" -> "cuda:1" (ds_backend_open's specs). */
static int backend_spec(const char *name, char *spec, size_t n)
{
    const char *kinds[] = {"opencl", "cuda"};
    for (size_t k = 0; k < 2; k++) {
        size_t kl = strlen(kinds[k]);
        if (!strncmp(name, kinds[k], kl) && name[kl] >= '0' && name[kl] <= '9') {
            snprintf(spec, n, "%s:%s", kinds[k], name + kl);
            return 0;
        }
    }
    return -EINVAL;
}

/* Uploads the experts the plan put on each accelerator of this node to it. */
static int open_accelerators(dsd_host *h, const char *model_dir, ds_error *err)
{
    size_t ne = (size_t)h->u.n_layers * h->u.n_experts;
    for (uint8_t dev = 1; dev < DSD_MAX_DEVNAMES; dev++) {
        bool used = false;
        for (size_t i = 0; i < ne && !used; i++)
            used = h->u.expert[i] && h->u.expert_dev[i] == dev;
        if (!used)
            continue;
        char spec[48];
        if (backend_spec(h->u.dev_names[dev], spec, sizeof(spec)) < 0)
            return ds_error_set(err, -EINVAL, "plan: device '%s' is not one dsd can drive",
                                h->u.dev_names[dev]);
        int rc = ds_backend_open(spec, &h->bk[dev], err);
        struct dev_want w = {&h->u, dev};
        if (rc == 0)
            rc = ds_backend_moe_new_subset(h->m, model_dir, h->bk[dev], expert_on_dev, &w,
                                           &h->bm[dev], err);
        if (rc < 0) {
            ds_error_prefix(err, "experts on %s", h->u.dev_names[dev]);
            return rc;
        }
        ds_log_info("host: %.1f MiB of experts on %s (%s)",
                    (double)ds_backend_moe_bytes(h->bm[dev]) / (1 << 20), h->u.dev_names[dev],
                    ds_backend_device(h->bk[dev]));
    }
    return 0;
}

bool dsd_units_want(void *ctx, enum ds_unit_kind kind, uint32_t layer, uint32_t expert)
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
    h->u.expert_dev = calloc((size_t)(units->n_layers ? units->n_layers : 1) *
                                 (units->n_experts ? units->n_experts : 1),
                             1);
    if (!h->u.attn || !h->u.expert || !h->u.expert_dev)
        goto fail;
    memcpy(h->u.attn, units->attn, units->n_layers * sizeof(bool));
    memcpy(h->u.expert, units->expert, (size_t)units->n_layers * units->n_experts * sizeof(bool));
    if (units->expert_dev)
        memcpy(h->u.expert_dev, units->expert_dev, (size_t)units->n_layers * units->n_experts);
    ds_model_open_opts oo = {.want = dsd_units_want, .want_ctx = &h->u};
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
    if ((rc = open_accelerators(h, model_dir, err)) < 0)
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
    for (int i = 0; i < DSD_MAX_DEVNAMES; i++) {
        ds_backend_moe_free(h->bm[i]);
        ds_backend_free(h->bk[i]);
    }
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

bool dsd_host_has_attn(const dsd_host *h, uint32_t layer)
{
    return h && layer < h->u.n_layers && h->u.attn[layer];
}

void dsd_host_release(dsd_host *h, uint64_t seq)
{
    if (h)
        seq_release(h, seq);
}

#define FAIL(c, ...)                                                                               \
    do {                                                                                           \
        *code = (c);                                                                               \
        rc = ds_error_set(err, -EINVAL, __VA_ARGS__);                                              \
        goto out;                                                                                  \
    } while (0)

int dsd_host_attn(dsd_host *h, uint32_t layer, uint32_t n, const uint64_t *seq_ids,
                  const uint32_t *positions, const float *x, dsd_attn_bufs *o, double *compute_s,
                  Dsd__ErrorCode *code, ds_error *err)
{
    const ds_model_config *c = h->c;
    uint32_t D = c->hidden_size;
    ds_kv_cache **caches = NULL;
    float *delta = NULL;
    int rc = 0;
    if (layer >= c->num_hidden_layers || !h->u.attn[layer])
        FAIL(DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT, "attn[%u] is not hosted here", layer);
    if (n == 0 || n > HOST_MAX_ROWS)
        FAIL(DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "step: %u rows (1..%u)", n, HOST_MAX_ROWS);
    caches = malloc(n * sizeof(*caches));
    if (!caches)
        FAIL(DSD__ERROR_CODE__ERROR_CODE_INTERNAL, "out of memory");
    for (uint32_t i = 0; i < n; i++) {
        bool follows = i > 0 && seq_ids[i - 1] == seq_ids[i];
        for (uint32_t j = 0; !follows && j < i; j++)
            if (seq_ids[j] == seq_ids[i])
                FAIL(DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "rows of job %llu are not consecutive",
                     (unsigned long long)seq_ids[i]);
        struct seq_cache *sc = seq_find(h, seq_ids[i], true);
        if (!sc)
            FAIL(DSD__ERROR_CODE__ERROR_CODE_BUSY, "no room for sequence %llu",
                 (unsigned long long)seq_ids[i]);
        caches[i] = sc->kv;
        uint32_t p = positions[i];
        if (p >= h->max_context ||
            (follows ? p != positions[i - 1] + 1 : p > ds_kv_cache_len(sc->kv, layer)))
            FAIL(DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "row %u: position %u invalid for job %llu",
                 i, p, (unsigned long long)seq_ids[i]);
    }
    bool moe = ds_model_config_layer_is_moe(c, layer);
    uint64_t t0 = dsd_now_ns();
    ds_attn_out ao = {o->hidden, o->ffn_in, moe ? o->ids : NULL, moe ? o->weights : NULL};
    rc = ds_unit_attn(h->m, h->pool, layer, x, n, positions, caches, &ao, err);
    if (rc >= 0 && moe && c->n_shared_experts)
        rc = ds_unit_shared(h->m, h->pool, layer, o->ffn_in, n, o->shared, err);
    if (rc >= 0 && !moe) {
        if (!(delta = malloc((size_t)n * D * sizeof(float))))
            FAIL(DSD__ERROR_CODE__ERROR_CODE_INTERNAL, "out of memory");
        rc = ds_unit_dense(h->m, h->pool, layer, o->ffn_in, n, delta, err);
        if (rc >= 0)
            ds_unit_add(D, n, delta, o->hidden);
    }
    if (rc < 0) {
        *code = DSD__ERROR_CODE__ERROR_CODE_INTERNAL;
        goto out;
    }
    double dt = (double)(dsd_now_ns() - t0) * 1e-9;
    h->attn_s[layer] += dt;
    h->attn_calls[layer]++;
    *compute_s = dt;
out:
    free(caches);
    free(delta);
    return rc;
}

int dsd_host_experts(dsd_host *h, uint32_t layer, uint32_t R, const float *rows, uint32_t P,
                     const uint32_t *pair_rows, const uint32_t *pair_experts, float *out,
                     double *compute_s, Dsd__ErrorCode *code, ds_error *err)
{
    const ds_model_config *c = h->c;
    uint32_t D = c->hidden_size, E = c->n_routed_experts, L = c->num_hidden_layers;
    uint32_t K = c->num_experts_per_tok ? c->num_experts_per_tok : 1;
    uint32_t *cnt = NULL, *idx = NULL;
    float *in = NULL, *tmp = NULL;
    int rc = 0;
    if (layer >= L || !ds_model_config_layer_is_moe(c, layer))
        FAIL(DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT, "layer %u has no routed experts", layer);
    /* each row was routed to K experts: at most K of its pairs come to one host */
    if (R == 0 || R > HOST_MAX_ROWS || P == 0 || P > (uint64_t)R * K)
        FAIL(DSD__ERROR_CODE__ERROR_CODE_MALFORMED,
             "dispatch: %u rows, %u pairs (at most %u per row)", R, P, K);
    for (uint32_t p = 0; p < P; p++) {
        if (pair_rows[p] >= R)
            FAIL(DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "pair %u: row %u of %u", p, pair_rows[p],
                 R);
        if (pair_experts[p] >= E || !h->u.expert[(size_t)layer * E + pair_experts[p]])
            FAIL(DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT, "expert[%u][%u] is not hosted here",
                 layer, pair_experts[p]);
    }
    cnt = calloc(E + 1, sizeof(*cnt));
    idx = malloc(P * sizeof(*idx));
    in = malloc((size_t)P * D * sizeof(float));
    tmp = malloc((size_t)P * D * sizeof(float));
    if (!cnt || !idx || !in || !tmp)
        FAIL(DSD__ERROR_CODE__ERROR_CODE_INTERNAL, "out of memory");
    /* group the pairs by expert (counting sort, stable) so each expert runs once */
    for (uint32_t p = 0; p < P; p++)
        cnt[pair_experts[p] + 1]++;
    for (uint32_t e = 0; e < E; e++)
        cnt[e + 1] += cnt[e];
    for (uint32_t p = 0; p < P; p++)
        idx[cnt[pair_experts[p]]++] = p;
    /* cnt[e] is now the end of expert e's group */
    uint64_t t0 = dsd_now_ns();
    uint32_t start = 0;
    for (uint32_t e = 0; e < E; e++) {
        uint32_t end = cnt[e], g = end - start;
        if (!g)
            continue;
        for (uint32_t j = 0; j < g; j++)
            memcpy(in + (size_t)j * D, rows + (size_t)pair_rows[idx[start + j]] * D,
                   D * sizeof(float));
        uint64_t te = dsd_now_ns();
        uint8_t dev = h->u.expert_dev[(size_t)layer * E + e];
        if (dev && h->bm[dev]) {
            /* on the accelerator the plan chose (bit-identical: docs/backends.md) */
            int32_t *ids = malloc(g * sizeof(int32_t));
            if (!ids) {
                *code = DSD__ERROR_CODE__ERROR_CODE_INTERNAL;
                rc = ds_error_set(err, -ENOMEM, "out of memory");
                goto out;
            }
            for (uint32_t j = 0; j < g; j++)
                ids[j] = (int32_t)e;
            rc = ds_backend_moe_run_pairs(h->bm[dev], layer, in, g, ids, tmp, err);
            free(ids);
        } else {
            rc = ds_unit_expert(h->m, h->pool, layer, e, in, g, tmp, err);
        }
        if (rc < 0) {
            *code = DSD__ERROR_CODE__ERROR_CODE_INTERNAL;
            goto out;
        }
        h->expert_s[(size_t)layer * E + e] += (double)(dsd_now_ns() - te) * 1e-9;
        h->expert_rows[(size_t)layer * E + e] += g;
        for (uint32_t j = 0; j < g; j++)
            memcpy(out + (size_t)idx[start + j] * D, tmp + (size_t)j * D, D * sizeof(float));
        start = end;
    }
    *compute_s = (double)(dsd_now_ns() - t0) * 1e-9;
out:
    free(cnt);
    free(idx);
    free(in);
    free(tmp);
    return rc;
}
#undef FAIL

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
