/* dsd_host.c — the units a node hosts and the data-plane requests that run them.
 *
 * A host opens the checkpoint with only its units bound (the mapping is lazy, so a node pays
 * memory only for the weights it uses) and keeps a sequence table (experts/ds_layer.h) whose
 * KV caches cover exactly the attention layers it hosts. The data plane runs the layer step
 * (ds_layer_step_run) over it for the rows of a step once dsd_host_rows has checked them
 * against this node's caches, and asks it to run dispatched experts: one UNWEIGHTED output
 * row per (row, expert) pair; the attention host combines them in the router's slot order,
 * which is what keeps the cluster bit-identical to the local engine (a pre-summed partial
 * would change the floating-point order).
 * Every id, count and shape from the wire is checked against the model and this node's units
 * before use; a bad request gets an Error reply and a log line. */
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "ds_backend_moe.h"
#include "ds_backend_units.h"
#include "ds_experts.h"
#include "ds_log.h"
#include "dsd.h"

#define HOST_MAX_ROWS DSD_MAX_ROWS
#define HOST_MAX_SEQS 8192u

struct dsd_host {
    ds_model *m;
    ds_pool *pool;
    const ds_model_config *c;
    dsd_units u;
    uint32_t max_context;
    ds_seqs *seqs;  /* sequence (job id) -> KV caches of the hosted attention layers */
    double *attn_s; /* [L] seconds of compute in attn[l] (+ shared/dense beside it) */
    uint64_t *attn_calls;
    double *expert_s; /* [L*E] */
    uint64_t *expert_rows;
    /* accelerators the plan gave experts to (u.expert_dev > 0): one backend each */
    ds_backend *bk[DSD_MAX_DEVNAMES];
    ds_backend_moe *bm[DSD_MAX_DEVNAMES];
    /* accelerators the plan gave attention (with its KV cache, router, dense/shared FFN),
     * embed or head to (u.attn_dev, u.embed_dev, u.head_dev > 0) */
    ds_backend_units *bu[DSD_MAX_DEVNAMES];
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

/* The backend of accelerator dev (opened once, shared by its experts and other units). */
static int open_backend(dsd_host *h, uint8_t dev, ds_error *err)
{
    if (h->bk[dev])
        return 0;
    /* the device by the backend id this node's discovery gave it, not by its name */
    const char *spec = h->u.dev_specs[dev];
    if (!spec[0] || !strcmp(spec, "cpu"))
        return ds_error_set(err, -EINVAL,
                            "plan: device '%s' is not an accelerator this node discovered",
                            h->u.dev_names[dev]);
    return ds_backend_open(spec, &h->bk[dev], err);
}

static bool unit_on_dev(void *ctx, enum ds_unit_kind kind, uint32_t layer)
{
    const struct dev_want *w = ctx;
    const dsd_units *u = w->u;
    switch (kind) {
    case DS_UNIT_EMBED:
        return u->embed && u->embed_dev == w->dev;
    case DS_UNIT_HEAD:
        return u->head && u->head_dev == w->dev;
    case DS_UNIT_ATTN:
    case DS_UNIT_DENSE:
    case DS_UNIT_SHARED:
        return layer < u->n_layers && u->attn[layer] && u->attn_dev[layer] == w->dev;
    default:
        return false;
    }
}

/* Uploads the attention layers (with the dense/shared FFN beside them), embed and head the
 * plan put on each accelerator of this node (experts/ds_backend_units.h). */
static int open_unit_devices(dsd_host *h, ds_error *err)
{
    for (uint8_t dev = 1; dev < DSD_MAX_DEVNAMES; dev++) {
        struct dev_want w = {&h->u, dev};
        bool used = unit_on_dev(&w, DS_UNIT_EMBED, 0) || unit_on_dev(&w, DS_UNIT_HEAD, 0);
        for (uint32_t l = 0; l < h->u.n_layers && !used; l++)
            used = unit_on_dev(&w, DS_UNIT_ATTN, l);
        if (!used)
            continue;
        int rc = open_backend(h, dev, err);
        if (rc == 0)
            rc = ds_backend_units_new(h->m, h->pool, h->bk[dev], unit_on_dev, &w, &h->bu[dev], err);
        if (rc < 0) {
            ds_error_prefix(err, "units on %s", h->u.dev_names[dev]);
            return rc;
        }
        ds_log_info("host: %.1f MiB of attention/FFN/embed/head weights on %s (%s), KV cache "
                    "there",
                    (double)ds_backend_units_weight_bytes(h->bu[dev]) / (1 << 20),
                    h->u.dev_names[dev], ds_backend_device(h->bk[dev]));
    }
    return 0;
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
        int rc = open_backend(h, dev, err);
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
    h->u.attn_dev = calloc(units->n_layers ? units->n_layers : 1, 1);
    if (!h->u.attn || !h->u.expert || !h->u.expert_dev || !h->u.attn_dev)
        goto fail;
    if (units->attn_dev)
        memcpy(h->u.attn_dev, units->attn_dev, units->n_layers);
    memcpy(h->u.attn, units->attn, units->n_layers * sizeof(bool));
    memcpy(h->u.expert, units->expert, (size_t)units->n_layers * units->n_experts * sizeof(bool));
    if (units->expert_dev)
        memcpy(h->u.expert_dev, units->expert_dev, (size_t)units->n_layers * units->n_experts);
    ds_model_open_opts oo = {
        .want = dsd_units_want, .want_ctx = &h->u, .quantize = (enum ds_quantize)units->quantize};
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
    if ((rc = ds_seqs_new(h->c, h->u.attn, HOST_MAX_SEQS, h->max_context ? h->max_context : 1,
                          &h->seqs)) < 0)
        goto fail;
    rc = -ENOMEM;
    h->attn_s = calloc(L, sizeof(double));
    h->attn_calls = calloc(L, sizeof(uint64_t));
    h->expert_s = calloc((size_t)L * E, sizeof(double));
    h->expert_rows = calloc((size_t)L * E, sizeof(uint64_t));
    if (!h->attn_s || !h->attn_calls || !h->expert_s || !h->expert_rows)
        goto fail;
    if ((rc = ds_pool_new(threads, NULL, 0, &h->pool)) < 0)
        goto fail;
    if ((rc = open_accelerators(h, model_dir, err)) < 0 || (rc = open_unit_devices(h, err)) < 0)
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
    ds_seqs_free(h->seqs); /* first: device KV caches are released through the units */
    for (int i = 0; i < DSD_MAX_DEVNAMES; i++) {
        ds_backend_units_free(h->bu[i]);
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

bool dsd_host_has_attn(const dsd_host *h, uint32_t layer)
{
    return h && layer < h->u.n_layers && h->u.attn[layer];
}

void dsd_host_release(dsd_host *h, uint64_t seq)
{
    if (h)
        ds_seqs_remove(h->seqs, seq);
}

ds_seqs *dsd_host_seqs(dsd_host *h)
{
    return h->seqs;
}

uint32_t dsd_host_kv_layers(const dsd_host *h)
{
    return ds_seqs_layers(h->seqs);
}

/* ---- the unit runner: each unit on the device the plan names ---- */

static ds_backend_units *attn_units(const dsd_host *h, uint32_t layer)
{
    return layer < h->u.n_layers ? h->bu[h->u.attn_dev[layer]] : NULL;
}

static int host_attn(void *ctx, uint32_t layer, const float *x, uint32_t n,
                     const uint32_t *positions, ds_kv_cache *const *caches, ds_attn_out *out,
                     ds_error *err)
{
    dsd_host *h = ctx;
    ds_backend_units *bu = attn_units(h, layer);
    return bu ? ds_backend_units_ops.attn(bu, layer, x, n, positions, caches, out, err)
              : ds_unit_attn(h->m, h->pool, layer, x, n, positions, caches, out, err);
}

static int host_ffn(void *ctx, enum ds_unit_kind kind, uint32_t layer, const float *ffn_in,
                    uint32_t n, float *out, ds_error *err)
{
    dsd_host *h = ctx;
    ds_backend_units *bu = attn_units(h, layer);
    if (bu)
        return ds_backend_units_ops.ffn(bu, kind, layer, ffn_in, n, out, err);
    return kind == DS_UNIT_DENSE ? ds_unit_dense(h->m, h->pool, layer, ffn_in, n, out, err)
                                 : ds_unit_shared(h->m, h->pool, layer, ffn_in, n, out, err);
}

static int host_embed(void *ctx, const int32_t *tokens, uint32_t n, float *out, ds_error *err)
{
    dsd_host *h = ctx;
    ds_backend_units *bu = h->bu[h->u.embed_dev];
    return bu ? ds_backend_units_ops.embed(bu, tokens, n, out, err)
              : ds_unit_embed(h->m, h->pool, tokens, n, out, err);
}

static int host_head(void *ctx, const float *x, uint32_t n, float *logits, ds_error *err)
{
    dsd_host *h = ctx;
    ds_backend_units *bu = h->bu[h->u.head_dev];
    return bu ? ds_backend_units_ops.head(bu, x, n, logits, err)
              : ds_unit_head(h->m, h->pool, x, n, logits, err);
}

const ds_unit_runner_ops dsd_host_unit_ops = {
    .attn = host_attn,
    .ffn = host_ffn,
    .embed = host_embed,
    .head = host_head,
};

void dsd_host_note_attn(dsd_host *h, uint32_t layer, double seconds)
{
    if (layer < h->c->num_hidden_layers) {
        h->attn_s[layer] += seconds > 0 ? seconds : 0;
        h->attn_calls[layer]++;
    }
}

#define FAIL(c, ...)                                                                               \
    do {                                                                                           \
        *code = (c);                                                                               \
        rc = ds_error_set(err, -EINVAL, __VA_ARGS__);                                              \
        goto out;                                                                                  \
    } while (0)

int dsd_host_rows(dsd_host *h, uint32_t layer, uint32_t n, const uint64_t *seq_ids,
                  const uint32_t *positions, int *slots, Dsd__ErrorCode *code, ds_error *err)
{
    const ds_model_config *c = h->c;
    int rc = 0;
    if (layer >= c->num_hidden_layers || !h->u.attn[layer])
        FAIL(DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT, "attn[%u] is not hosted here", layer);
    if (n == 0 || n > HOST_MAX_ROWS)
        FAIL(DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "step: %u rows (1..%u)", n, HOST_MAX_ROWS);
    for (uint32_t i = 0; i < n; i++) {
        bool follows = i > 0 && seq_ids[i - 1] == seq_ids[i];
        for (uint32_t j = 0; !follows && j < i; j++)
            if (seq_ids[j] == seq_ids[i])
                FAIL(DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "rows of job %llu are not consecutive",
                     (unsigned long long)seq_ids[i]);
        int slot = follows ? slots[i - 1] : ds_seqs_find(h->seqs, seq_ids[i], true);
        if (slot < 0)
            FAIL(DSD__ERROR_CODE__ERROR_CODE_BUSY, "no room for sequence %llu",
                 (unsigned long long)seq_ids[i]);
        slots[i] = slot;
        uint32_t p = positions[i];
        if (p >= h->max_context ||
            (follows ? p != positions[i - 1] + 1 : p > ds_seqs_len(h->seqs, slot, layer)))
            FAIL(DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "row %u: position %u invalid for job %llu",
                 i, p, (unsigned long long)seq_ids[i]);
    }
out:
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
    /* group the pairs by expert (counting sort, stable) so each expert runs once: first the
     * experts this node runs on its CPU, then those on an accelerator, each group contiguous */
    const uint8_t *devs = h->u.expert_dev + (size_t)layer * E;
    uint32_t *act = malloc((size_t)(E + 1) * 2 * sizeof(uint32_t));
    if (!act)
        FAIL(DSD__ERROR_CODE__ERROR_CODE_INTERNAL, "out of memory");
    uint32_t *off = act + E + 1, n_cpu = 0, n_act = 0;
    for (uint32_t p = 0; p < P; p++)
        cnt[pair_experts[p] + 1]++;
    for (int accel = 0; accel < 2; accel++)
        for (uint32_t e = 0; e < E; e++)
            if (cnt[e + 1] && (devs[e] && h->bm[devs[e]]) == accel) {
                act[n_act++] = e;
                n_cpu += !accel;
            }
    off[0] = 0;
    for (uint32_t j = 0; j < n_act; j++)
        off[j + 1] = off[j] + cnt[act[j] + 1];
    /* cnt[e] becomes the next free slot of expert e's group */
    for (uint32_t j = 0; j < n_act; j++)
        cnt[act[j]] = off[j];
    for (uint32_t p = 0; p < P; p++)
        idx[cnt[pair_experts[p]]++] = p;
    for (uint32_t j = 0; j < P; j++)
        memcpy(in + (size_t)j * D, rows + (size_t)pair_rows[idx[j]] * D, D * sizeof(float));
    uint64_t t0 = dsd_now_ns();
    /* the CPU experts as one parallel job (ds_unit_experts: two pool wake-ups for all of them,
     * the bits of one expert at a time); its time is shared out by rows */
    if (n_cpu) {
        rc = ds_unit_experts(h->m, h->pool, layer, n_cpu, act, off, in, tmp, err);
        if (rc < 0) {
            free(act);
            *code = DSD__ERROR_CODE__ERROR_CODE_INTERNAL;
            goto out;
        }
        double dt = (double)(dsd_now_ns() - t0) * 1e-9;
        for (uint32_t j = 0; j < n_cpu; j++) {
            uint32_t g = off[j + 1] - off[j];
            h->expert_s[(size_t)layer * E + act[j]] += dt * g / off[n_cpu];
            h->expert_rows[(size_t)layer * E + act[j]] += g;
        }
    }
    for (uint32_t j = n_cpu; j < n_act; j++) {
        uint32_t e = act[j], b = off[j], g = off[j + 1] - b;
        uint64_t te = dsd_now_ns();
        /* on the accelerator the plan chose (bit-identical: docs/backends.md) */
        int32_t *ids = malloc(g * sizeof(int32_t));
        if (!ids) {
            free(act);
            *code = DSD__ERROR_CODE__ERROR_CODE_INTERNAL;
            rc = ds_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        for (uint32_t i = 0; i < g; i++)
            ids[i] = (int32_t)e;
        rc = ds_backend_moe_run_pairs(h->bm[devs[e]], layer, in + (size_t)b * D, g, ids,
                                      tmp + (size_t)b * D, err);
        free(ids);
        if (rc < 0) {
            free(act);
            *code = DSD__ERROR_CODE__ERROR_CODE_INTERNAL;
            goto out;
        }
        h->expert_s[(size_t)layer * E + e] += (double)(dsd_now_ns() - te) * 1e-9;
        h->expert_rows[(size_t)layer * E + e] += g;
    }
    for (uint32_t j = 0; j < P; j++)
        memcpy(out + (size_t)idx[j] * D, tmp + (size_t)j * D, D * sizeof(float));
    free(act);
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
