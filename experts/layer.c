/* layer.c — the layer step and the sequence table (see ds_layer.h).
 *
 * Invariant: for a batch of rows, ds_layer_step_run followed (when pending) by
 * ds_layer_step_resume computes exactly what the single-process engine always computed:
 *     h, ffn_in, ids, w = attn[l](x)
 *     dense layer: h += dense(ffn_in)
 *     MoE layer:   h += sum_s w_s * expert_{ids_s}(ffn_in) (fma, slot order) + shared(ffn_in)
 * whoever runs the experts, and each row independently of the others. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "ds_experts.h"
#include "ds_layer.h"

/* ---- sequence table ----------------------------------------------------------------------- */

struct seq_slot {
    bool used;
    uint64_t id;
    ds_kv_cache **kv; /* [L]: NULL for a layer not hosted */
};

struct ds_seqs {
    const ds_model_config *c;
    uint32_t L, max_seqs, max_positions, n_hosted, n_used;
    bool *hosted; /* [L] */
    struct seq_slot *slots;
};

int ds_seqs_new(const ds_model_config *c, const bool *hosted, uint32_t max_seqs,
                uint32_t max_positions, ds_seqs **ret)
{
    if (!max_seqs || !max_positions)
        return -EINVAL;
    ds_seqs *t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    t->c = c;
    t->L = c->num_hidden_layers;
    t->max_seqs = max_seqs;
    t->max_positions = max_positions;
    t->hosted = calloc(t->L ? t->L : 1, sizeof(bool));
    t->slots = calloc(max_seqs, sizeof(*t->slots));
    if (!t->hosted || !t->slots) {
        ds_seqs_free(t);
        return -ENOMEM;
    }
    for (uint32_t l = 0; l < t->L; l++) {
        t->hosted[l] = !hosted || hosted[l];
        t->n_hosted += t->hosted[l];
    }
    *ret = t;
    return 0;
}

static void slot_clear(ds_seqs *t, struct seq_slot *s)
{
    if (!s->used)
        return;
    for (uint32_t l = 0; s->kv && l < t->L; l++)
        ds_kv_cache_free(s->kv[l]);
    free(s->kv);
    memset(s, 0, sizeof(*s));
    t->n_used--;
}

ds_seqs *ds_seqs_free(ds_seqs *t)
{
    if (!t)
        return NULL;
    for (uint32_t i = 0; t->slots && i < t->max_seqs; i++)
        slot_clear(t, &t->slots[i]);
    free(t->slots);
    free(t->hosted);
    free(t);
    return NULL;
}

int ds_seqs_find(ds_seqs *t, uint64_t id, bool create)
{
    int free_slot = -1;
    for (uint32_t i = 0; i < t->max_seqs; i++) {
        if (t->slots[i].used && t->slots[i].id == id)
            return (int)i;
        if (!t->slots[i].used && free_slot < 0)
            free_slot = (int)i;
    }
    if (!create)
        return -ENOENT;
    if (free_slot < 0)
        return -ENOSPC;
    struct seq_slot *s = &t->slots[free_slot];
    if (!(s->kv = calloc(t->L ? t->L : 1, sizeof(*s->kv))))
        return -ENOMEM;
    s->used = true;
    s->id = id;
    t->n_used++;
    /* one cache per hosted layer, so a layer this table does not host costs nothing */
    for (uint32_t l = 0; l < t->L; l++) {
        int rc = t->hosted[l] ? ds_kv_cache_new(t->c, l, l + 1, t->max_positions, &s->kv[l]) : 0;
        if (rc < 0) {
            slot_clear(t, s);
            return rc;
        }
    }
    return free_slot;
}

void ds_seqs_remove(ds_seqs *t, uint64_t id)
{
    int slot = t ? ds_seqs_find(t, id, false) : -1;
    if (slot >= 0)
        slot_clear(t, &t->slots[slot]);
}

void ds_seqs_remove_slot(ds_seqs *t, int slot)
{
    if (t && slot >= 0 && (uint32_t)slot < t->max_seqs)
        slot_clear(t, &t->slots[slot]);
}

bool ds_seqs_slot_used(const ds_seqs *t, int slot)
{
    return t && slot >= 0 && (uint32_t)slot < t->max_seqs && t->slots[slot].used;
}

ds_kv_cache *ds_seqs_kv(const ds_seqs *t, int slot, uint32_t layer)
{
    if (!ds_seqs_slot_used(t, slot) || layer >= t->L)
        return NULL;
    return t->slots[slot].kv[layer];
}

uint32_t ds_seqs_len(const ds_seqs *t, int slot, uint32_t layer)
{
    ds_kv_cache *kv = ds_seqs_kv(t, slot, layer);
    return kv ? ds_kv_cache_len(kv, layer) : 0;
}

uint32_t ds_seqs_layers(const ds_seqs *t)
{
    return t->n_hosted;
}

uint32_t ds_seqs_count(const ds_seqs *t)
{
    return t->n_used;
}

/* ---- expert runners ----------------------------------------------------------------------- */

static int cpu_run(void *ctx, uint32_t layer, const float *ffn_in, uint32_t n, const int32_t *ids,
                   const float *weights, float *out, ds_error *err)
{
    const ds_expert_runner_cpu *r = ctx;
    (void)weights;
    int rc = ds_moe_run_experts(r->m, r->pool, layer, ffn_in, n, ids, out, err);
    return rc < 0 ? rc : DS_LAYER_DONE;
}

const ds_expert_runner_ops ds_expert_runner_cpu_ops = {.run = cpu_run};

/* ---- the layer step ----------------------------------------------------------------------- */

struct ds_layer_step {
    const ds_model *m;
    const ds_model_config *c;
    ds_pool *pool;
    ds_seqs *seqs;
    uint32_t max_rows, n, K;
    int *slots;                      /* [max_rows] */
    uint32_t *pos;                   /* [max_rows] */
    ds_kv_cache **caches;            /* [max_rows] of the layer being run */
    float *x;                        /* [max_rows, D] hidden state, in/out */
    float *hid;                      /* [max_rows, D] after attention */
    float *ffn_in;                   /* [max_rows, D] */
    float *ffn_out;                  /* [max_rows, D] dense FFN or shared experts */
    int32_t *ids;                    /* [max_rows, K] */
    float *w;                        /* [max_rows, K] */
    float *eo;                       /* [max_rows * K, D] routed expert outputs by slot */
    bool pending, shared;            /* waiting for expert rows; ffn_out holds the shared experts */
    const ds_unit_runner_ops *units; /* NULL: the CPU units */
    void *units_ctx;
};

void ds_layer_step_set_units(ds_layer_step *st, const ds_unit_runner_ops *ops, void *ctx)
{
    st->units = ops;
    st->units_ctx = ops ? ctx : NULL;
}

static int step_ffn(ds_layer_step *st, enum ds_unit_kind kind, uint32_t layer, ds_error *err)
{
    if (st->units && st->units->ffn)
        return st->units->ffn(st->units_ctx, kind, layer, st->ffn_in, st->n, st->ffn_out, err);
    if (kind == DS_UNIT_DENSE)
        return ds_unit_dense(st->m, st->pool, layer, st->ffn_in, st->n, st->ffn_out, err);
    return ds_unit_shared(st->m, st->pool, layer, st->ffn_in, st->n, st->ffn_out, err);
}

ds_layer_step *ds_layer_step_free(ds_layer_step *st)
{
    if (!st)
        return NULL;
    free(st->slots);
    free(st->pos);
    free(st->caches);
    free(st->x);
    free(st->hid);
    free(st->ffn_in);
    free(st->ffn_out);
    free(st->ids);
    free(st->w);
    free(st->eo);
    free(st);
    return NULL;
}

int ds_layer_step_new(const ds_model *m, ds_pool *pool, ds_seqs *seqs, uint32_t max_rows,
                      ds_layer_step **ret, ds_error *err)
{
    if (!max_rows)
        return ds_error_set(err, -EINVAL, "layer step: no rows");
    ds_layer_step *st = calloc(1, sizeof(*st));
    if (!st)
        return ds_error_set(err, -ENOMEM, "layer step: out of memory");
    st->m = m;
    st->c = ds_model_get_config(m);
    st->pool = pool;
    st->seqs = seqs;
    st->max_rows = max_rows;
    st->K = st->c->num_experts_per_tok ? st->c->num_experts_per_tok : 1;
    size_t rows = (size_t)max_rows * st->c->hidden_size * sizeof(float);
    st->slots = malloc(max_rows * sizeof(*st->slots));
    st->pos = malloc(max_rows * sizeof(*st->pos));
    st->caches = malloc(max_rows * sizeof(*st->caches));
    st->x = malloc(rows);
    st->hid = malloc(rows);
    st->ffn_in = malloc(rows);
    st->ffn_out = malloc(rows);
    st->ids = malloc((size_t)max_rows * st->K * sizeof(int32_t));
    st->w = malloc((size_t)max_rows * st->K * sizeof(float));
    st->eo = malloc(rows * st->K);
    if (!st->slots || !st->pos || !st->caches || !st->x || !st->hid || !st->ffn_in ||
        !st->ffn_out || !st->ids || !st->w || !st->eo) {
        ds_layer_step_free(st);
        return ds_error_set(err, -ENOMEM, "layer step: out of memory for %u rows", max_rows);
    }
    *ret = st;
    return 0;
}

int ds_layer_step_set_rows(ds_layer_step *st, uint32_t n, const int *slots,
                           const uint32_t *positions)
{
    if (n > st->max_rows)
        return -EINVAL;
    st->n = n;
    memcpy(st->slots, slots, n * sizeof(*slots));
    memcpy(st->pos, positions, n * sizeof(*positions));
    st->pending = false;
    return 0;
}

float *ds_layer_step_x(ds_layer_step *st)
{
    return st->x;
}

uint32_t ds_layer_step_rows(const ds_layer_step *st)
{
    return st->n;
}

int ds_layer_step_run(ds_layer_step *st, uint32_t layer, const ds_expert_runner_ops *runner,
                      void *ctx, ds_error *err)
{
    const ds_model_config *c = st->c;
    uint32_t n = st->n, D = c->hidden_size;
    if (layer >= c->num_hidden_layers || st->pending)
        return ds_error_set(err, -EINVAL, "layer step: layer %u", layer);
    for (uint32_t i = 0; i < n; i++)
        if (!(st->caches[i] = ds_seqs_kv(st->seqs, st->slots[i], layer)))
            return ds_error_set(err, -ENOENT, "layer %u: row %u has no KV cache here", layer, i);
    bool moe = ds_model_config_layer_is_moe(c, layer);
    ds_attn_out ao = {st->hid, st->ffn_in, moe ? st->ids : NULL, moe ? st->w : NULL};
    int rc = st->units && st->units->attn
                 ? st->units->attn(st->units_ctx, layer, st->x, n, st->pos, st->caches, &ao, err)
                 : ds_unit_attn(st->m, st->pool, layer, st->x, n, st->pos, st->caches, &ao, err);
    if (rc < 0)
        return rc;
    if (!moe) {
        if ((rc = step_ffn(st, DS_UNIT_DENSE, layer, err)) < 0)
            return rc;
        ds_unit_add(D, n, st->ffn_out, st->hid);
        memcpy(st->x, st->hid, (size_t)n * D * sizeof(float));
        return DS_LAYER_DONE;
    }
    for (uint32_t i = 0; i < n * st->K; i++)
        if (st->ids[i] < 0 || (uint32_t)st->ids[i] >= c->n_routed_experts)
            return ds_error_set(err, -ERANGE, "attn[%u]: expert id %d out of range", layer,
                                st->ids[i]);
    st->shared = c->n_shared_experts > 0;
    if (st->shared && (rc = step_ffn(st, DS_UNIT_SHARED, layer, err)) < 0)
        return rc;
    rc = runner->run(ctx, layer, st->ffn_in, n, st->ids, st->w, st->eo, err);
    if (rc < 0)
        return rc;
    if (rc == DS_LAYER_PENDING) {
        st->pending = true;
        return DS_LAYER_PENDING;
    }
    st->pending = true;
    ds_layer_step_resume(st);
    return DS_LAYER_DONE;
}

void ds_layer_step_resume(ds_layer_step *st)
{
    if (!st->pending)
        return;
    uint32_t D = st->c->hidden_size;
    ds_moe_combine(D, st->n, st->K, st->w, st->eo, st->shared ? st->ffn_out : NULL, st->hid);
    memcpy(st->x, st->hid, (size_t)st->n * D * sizeof(float));
    st->pending = false;
}

bool ds_layer_step_pending(const ds_layer_step *st)
{
    return st->pending;
}

const int32_t *ds_layer_step_ids(const ds_layer_step *st)
{
    return st->ids;
}

const float *ds_layer_step_weights(const ds_layer_step *st)
{
    return st->w;
}

const float *ds_layer_step_ffn_in(const ds_layer_step *st)
{
    return st->ffn_in;
}

float *ds_layer_step_expert_out(ds_layer_step *st)
{
    return st->eo;
}
