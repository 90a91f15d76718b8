/* backend_units.c — attention, KV cache, router, dense/shared FFN, embed and head on a compute
 * backend (see ds_backend_units.h).
 *
 * Invariant: each unit here computes exactly what its CPU unit in model/forward.c computes,
 * op for op in the same order, with the ABI 2 ops of ds_backend.h that are bit-identical to the
 * engine's helpers; only the place changes. The rope coefficients (libm cos/sin of the YaRN
 * frequencies) are computed on the host per row, as the engine does, and uploaded. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ds_backend_units.h"

#define MAX_ROPE_DIM  4096 /* config.c bounds qk_rope_head_dim by this */
#define MLA_MAX_CHUNK 256  /* rows of one sequence per mla_attn call (grid and scratch bounds) */

typedef struct bu_attn {
    bool on;
    ds_bk_weight *q_a, *q_b, *kv_a, *kv_b, *o, *gate; /* q_a, gate may be NULL */
    ds_bk_buf *attn_norm, *ffn_norm, *q_a_norm, *kv_a_norm, *gate_bias;
} bu_attn;

typedef struct bu_ffn {
    bool on;
    ds_bk_weight *gate, *up, *down;
} bu_ffn;

/* A device buffer grown on demand (contents not kept). */
typedef struct bu_buf {
    ds_bk_buf *b;
    size_t bytes;
} bu_buf;

struct ds_backend_units {
    const ds_model *m;
    const ds_model_config *c;
    ds_pool *pool;
    ds_backend *b;
    bu_attn *attn;          /* [L] */
    bu_ffn *dense, *shared; /* [L] */
    ds_bk_weight *embed, *lm_head;
    ds_bk_buf *final_norm;
    bool exact; /* the engine's orders everywhere (default); false: the fast paths */
    uint64_t weight_bytes, kv_bytes, calls;
    double busy_s;
    /* activations */
    bu_buf x, xn, qa, q, kva, att, hid, ffn, cs, sn, mla_scr, logits, rscr, ids, w, g, u, out;
    /* the ffn_in the last attention left on the device (ffn contract in the header) */
    uint32_t ffn_layer, ffn_n;
    const float *ffn_host;
    float *cs_h, *sn_h; /* host rope tables, grown with the rows */
    size_t rope_cap;    /* rows they hold */
};

/* One sequence's device KV cache: per layer a [cap, C + dr] buffer (ds_kv_cache_set_ext). */
typedef struct bu_kv {
    ds_backend_units *bu;
    uint32_t L;
    ds_bk_buf **buf; /* [L] */
    uint32_t *cap;   /* [L] positions allocated */
} bu_kv;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int ensure(ds_backend_units *bu, bu_buf *bb, size_t bytes, ds_error *err)
{
    if (bb->b && bb->bytes >= bytes)
        return 0;
    size_t want = bytes < 4096 ? 4096 : bytes + bytes / 2;
    ds_bk_buf_free(bb->b);
    bb->b = NULL;
    bb->bytes = 0;
    int rc = ds_bk_buf_new(bu->b, want, &bb->b, err);
    if (rc < 0)
        return rc;
    bb->bytes = want;
    return 0;
}

/* ---- upload ---- */

/* W in a format the backends compute on: F32, BF16 and FP8 as they are, F16 and block types
 * widened row by row with ds_weight_row_f32 (the engine's values, exactly). */
static int weight_up(ds_backend_units *bu, const ds_weight *w, ds_bk_weight **ret, ds_error *err)
{
    ds_bk_weight_desc d = {DS_BK_F32, w->rows, w->cols, w->data, NULL, 0, 0};
    float *tmp = NULL;
    switch (w->dtype) {
    case DS_DTYPE_F32:
        break;
    case DS_DTYPE_BF16:
        d.dtype = DS_BK_BF16;
        break;
    case DS_DTYPE_F8_E4M3:
        d.dtype = DS_BK_F8_E4M3;
        d.scale_inv = w->scale_inv;
        d.block_rows = w->block_rows;
        d.block_cols = w->block_cols;
        break;
    default:
        if (!(tmp = malloc((size_t)w->rows * w->cols * sizeof(float) + 1)))
            return ds_error_set(err, -ENOMEM, "out of memory widening a [%u, %u] weight", w->rows,
                                w->cols);
        for (uint32_t r = 0; r < w->rows; r++)
            ds_weight_row_f32(w, r, tmp + (size_t)r * w->cols);
        d.data = tmp;
    }
    int rc = ds_bk_weight_new(bu->b, &d, ret, err);
    free(tmp);
    if (rc == 0)
        bu->weight_bytes += ds_bk_weight_bytes(*ret);
    return rc;
}

static int vec_up(ds_backend_units *bu, const float *v, uint32_t n, ds_bk_buf **ret, ds_error *err)
{
    int rc = ds_bk_buf_new(bu->b, (size_t)n * sizeof(float), ret, err);
    if (rc == 0 && (rc = ds_bk_buf_write(*ret, 0, v, (size_t)n * sizeof(float), err)) == 0)
        bu->weight_bytes += (uint64_t)n * sizeof(float);
    return rc;
}

static int attn_up(ds_backend_units *bu, uint32_t l, ds_error *err)
{
    ds_attn_params p;
    if (ds_model_attn_params(bu->m, l, &p) < 0)
        return 0; /* not bound: not hosted */
    const ds_model_config *c = bu->c;
    bu_attn *a = &bu->attn[l];
    int rc = 0;
    if (p.q_a && ((rc = weight_up(bu, p.q_a, &a->q_a, err)) < 0 ||
                  (rc = vec_up(bu, p.q_a_norm, c->q_lora_rank, &a->q_a_norm, err)) < 0))
        return rc;
    if ((rc = weight_up(bu, p.q_b, &a->q_b, err)) < 0 ||
        (rc = weight_up(bu, p.kv_a, &a->kv_a, err)) < 0 ||
        (rc = weight_up(bu, p.kv_b, &a->kv_b, err)) < 0 ||
        (rc = weight_up(bu, p.o, &a->o, err)) < 0 ||
        (rc = vec_up(bu, p.attn_norm, c->hidden_size, &a->attn_norm, err)) < 0 ||
        (rc = vec_up(bu, p.ffn_norm, c->hidden_size, &a->ffn_norm, err)) < 0 ||
        (rc = vec_up(bu, p.kv_a_norm, c->kv_lora_rank, &a->kv_a_norm, err)) < 0)
        return rc;
    if (p.gate && ((rc = weight_up(bu, p.gate, &a->gate, err)) < 0 ||
                   (p.gate_bias &&
                    (rc = vec_up(bu, p.gate_bias, c->n_routed_experts, &a->gate_bias, err)) < 0)))
        return rc;
    a->on = true;
    return 0;
}

static int ffn_up(ds_backend_units *bu, enum ds_unit_kind kind, uint32_t l, bu_ffn *f,
                  ds_error *err)
{
    const ds_weight *g, *u, *d;
    if (ds_model_ffn_params(bu->m, kind, l, &g, &u, &d) < 0)
        return 0;
    int rc;
    if ((rc = weight_up(bu, g, &f->gate, err)) < 0 || (rc = weight_up(bu, u, &f->up, err)) < 0 ||
        (rc = weight_up(bu, d, &f->down, err)) < 0)
        return rc;
    f->on = true;
    return 0;
}

static void ffn_clear(bu_ffn *f)
{
    ds_bk_weight_free(f->gate);
    ds_bk_weight_free(f->up);
    ds_bk_weight_free(f->down);
}

ds_backend_units *ds_backend_units_free(ds_backend_units *bu)
{
    if (!bu)
        return NULL;
    for (uint32_t l = 0; bu->attn && l < bu->c->num_hidden_layers; l++) {
        bu_attn *a = &bu->attn[l];
        ds_bk_weight_free(a->q_a);
        ds_bk_weight_free(a->q_b);
        ds_bk_weight_free(a->kv_a);
        ds_bk_weight_free(a->kv_b);
        ds_bk_weight_free(a->o);
        ds_bk_weight_free(a->gate);
        ds_bk_buf_free(a->attn_norm);
        ds_bk_buf_free(a->ffn_norm);
        ds_bk_buf_free(a->q_a_norm);
        ds_bk_buf_free(a->kv_a_norm);
        ds_bk_buf_free(a->gate_bias);
        ffn_clear(&bu->dense[l]);
        ffn_clear(&bu->shared[l]);
    }
    free(bu->attn);
    free(bu->dense);
    free(bu->shared);
    ds_bk_weight_free(bu->embed);
    ds_bk_weight_free(bu->lm_head);
    ds_bk_buf_free(bu->final_norm);
    bu_buf *bufs[] = {&bu->x,    &bu->xn,  &bu->qa, &bu->q,  &bu->kva,     &bu->att,
                      &bu->hid,  &bu->ffn, &bu->cs, &bu->sn, &bu->mla_scr, &bu->logits,
                      &bu->rscr, &bu->ids, &bu->w,  &bu->g,  &bu->u,       &bu->out};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
        ds_bk_buf_free(bufs[i]->b);
    free(bu->cs_h);
    free(bu->sn_h);
    free(bu);
    return NULL;
}

int ds_backend_units_new(const ds_model *m, ds_pool *pool, ds_backend *b,
                         bool (*want)(void *ctx, enum ds_unit_kind kind, uint32_t layer), void *ctx,
                         ds_backend_units **ret, ds_error *err)
{
    *ret = NULL;
    ds_backend_units *bu = calloc(1, sizeof(*bu));
    if (!bu)
        return ds_error_set(err, -ENOMEM, "device units: out of memory");
    bu->m = m;
    bu->c = ds_model_get_config(m);
    bu->pool = pool;
    bu->b = b;
    bu->ffn_layer = UINT32_MAX;
    bu->exact = true;
    ds_backend_set_exact(b, true);
    uint32_t L = bu->c->num_hidden_layers;
    bu->attn = calloc(L + 1, sizeof(*bu->attn));
    bu->dense = calloc(L + 1, sizeof(*bu->dense));
    bu->shared = calloc(L + 1, sizeof(*bu->shared));
    int rc = 0;
    if (!bu->attn || !bu->dense || !bu->shared) {
        rc = ds_error_set(err, -ENOMEM, "device units: out of memory");
        goto fail;
    }
    /* the unit ops must exist there (OpenCL: fp64): refused at load, not at the first step */
    if ((rc = ensure(bu, &bu->x, 16, err)) < 0 || (rc = ensure(bu, &bu->xn, 16, err)) < 0 ||
        (rc = ds_bk_rmsnorm_rows(bu->x.b, 0, 1, bu->xn.b, 1, 1, 1e-6, bu->xn.b, 0, 1, err)) < 0) {
        ds_error_prefix(err, "device units on %s", ds_backend_kind(b));
        goto fail;
    }
    for (uint32_t l = 0; l < L; l++) {
        if ((!want || want(ctx, DS_UNIT_ATTN, l)) && (rc = attn_up(bu, l, err)) < 0) {
            ds_error_prefix(err, "attn[%u] on %s", l, ds_backend_kind(b));
            goto fail;
        }
        if ((!want || want(ctx, DS_UNIT_DENSE, l)) &&
            (rc = ffn_up(bu, DS_UNIT_DENSE, l, &bu->dense[l], err)) < 0) {
            ds_error_prefix(err, "dense[%u] on %s", l, ds_backend_kind(b));
            goto fail;
        }
        if ((!want || want(ctx, DS_UNIT_SHARED, l)) &&
            (rc = ffn_up(bu, DS_UNIT_SHARED, l, &bu->shared[l], err)) < 0) {
            ds_error_prefix(err, "shared[%u] on %s", l, ds_backend_kind(b));
            goto fail;
        }
    }
    const ds_weight *ew, *hw;
    const float *fnorm;
    if ((!want || want(ctx, DS_UNIT_EMBED, 0)) && ds_model_embed_params(m, &ew) == 0 &&
        (rc = weight_up(bu, ew, &bu->embed, err)) < 0) {
        ds_error_prefix(err, "embed on %s", ds_backend_kind(b));
        goto fail;
    }
    if ((!want || want(ctx, DS_UNIT_HEAD, 0)) && ds_model_head_params(m, &fnorm, &hw) == 0 &&
        ((rc = weight_up(bu, hw, &bu->lm_head, err)) < 0 ||
         (rc = vec_up(bu, fnorm, bu->c->hidden_size, &bu->final_norm, err)) < 0)) {
        ds_error_prefix(err, "head on %s", ds_backend_kind(b));
        goto fail;
    }
    *ret = bu;
    return 0;
fail:
    ds_backend_units_free(bu);
    return rc;
}

bool ds_backend_units_hosts(const ds_backend_units *bu, enum ds_unit_kind kind, uint32_t layer)
{
    if (!bu)
        return false;
    bool in = layer < bu->c->num_hidden_layers;
    switch (kind) {
    case DS_UNIT_ATTN:
        return in && bu->attn[layer].on;
    case DS_UNIT_DENSE:
        return in && bu->dense[layer].on;
    case DS_UNIT_SHARED:
        return in && bu->shared[layer].on;
    case DS_UNIT_EMBED:
        return bu->embed != NULL;
    case DS_UNIT_HEAD:
        return bu->lm_head != NULL;
    default:
        return false;
    }
}

uint64_t ds_backend_units_weight_bytes(const ds_backend_units *bu)
{
    return bu->weight_bytes;
}

uint64_t ds_backend_units_kv_bytes(const ds_backend_units *bu)
{
    return bu->kv_bytes;
}

double ds_backend_units_busy_s(const ds_backend_units *bu, uint64_t *calls)
{
    if (calls)
        *calls = bu->calls;
    return bu->busy_s;
}

void ds_backend_units_set_exact(ds_backend_units *bu, bool exact)
{
    bu->exact = exact;
    ds_backend_set_exact(bu->b, exact);
}

/* RMSNorm of n rows: the engine's (double sum in order) in exact mode; the backend's
 * work-group tree in fast mode where the rows are contiguous from the buffers' start. */
static int norm(ds_backend_units *bu, ds_bk_buf *x, size_t stride, ds_bk_buf *g, uint32_t n,
                uint32_t d, double eps, ds_bk_buf *y, ds_error *err)
{
    if (!bu->exact && stride == d)
        return ds_bk_rmsnorm(x, g, n, d, (float)eps, y, err);
    return ds_bk_rmsnorm_rows(x, 0, stride, g, n, d, eps, y, 0, stride, err);
}

/* ---- the device KV cache ---- */

static void bu_kv_free(void *p)
{
    bu_kv *k = p;
    if (!k)
        return;
    size_t kvw = (size_t)k->bu->c->kv_lora_rank + k->bu->c->qk_rope_head_dim;
    for (uint32_t l = 0; l < k->L; l++) {
        k->bu->kv_bytes -= (uint64_t)k->cap[l] * kvw * sizeof(float);
        ds_bk_buf_free(k->buf[l]);
    }
    free(k->buf);
    free(k->cap);
    free(k);
}

/* The device cache of layer l in kv with room for `need` positions (grown by doubling, the
 * positions so far copied over). */
static int kv_device(ds_backend_units *bu, ds_kv_cache *kv, uint32_t l, uint32_t need,
                     ds_bk_buf **ret, ds_error *err)
{
    bu_kv *k = ds_kv_cache_ext(kv);
    if (k && k->bu != bu)
        return ds_error_set(err, -EINVAL, "KV cache held by another device");
    if (!k) {
        uint32_t L = bu->c->num_hidden_layers;
        if (!(k = calloc(1, sizeof(*k))) || !(k->buf = calloc(L, sizeof(*k->buf))) ||
            !(k->cap = calloc(L, sizeof(*k->cap)))) {
            if (k)
                free(k->buf);
            free(k);
            return ds_error_set(err, -ENOMEM, "KV cache: out of memory");
        }
        k->bu = bu;
        k->L = L;
        ds_kv_cache_set_ext(kv, k, bu_kv_free);
    }
    size_t kvw = (size_t)bu->c->kv_lora_rank + bu->c->qk_rope_head_dim;
    if (need > k->cap[l]) {
        uint32_t cap = k->cap[l] ? k->cap[l] : 64, maxp = ds_kv_cache_max_positions(kv);
        while (cap < need)
            cap *= 2;
        if (cap > maxp)
            cap = maxp;
        ds_bk_buf *nb = NULL;
        int rc = ds_bk_buf_new(bu->b, (size_t)cap * kvw * sizeof(float), &nb, err);
        if (rc < 0)
            return rc;
        uint32_t len = ds_kv_cache_len(kv, l);
        if (len &&
            (rc = ds_bk_copy(nb, 0, k->buf[l], 0, (size_t)len * kvw * sizeof(float), err)) < 0) {
            ds_bk_buf_free(nb);
            return rc;
        }
        bu->kv_bytes += (uint64_t)(cap - k->cap[l]) * kvw * sizeof(float);
        ds_bk_buf_free(k->buf[l]);
        k->buf[l] = nb;
        k->cap[l] = cap;
    }
    *ret = k->buf[l];
    return 0;
}

/* ---- the units ---- */

static int rope_tables(ds_backend_units *bu, const uint32_t *pos, uint32_t n, ds_error *err)
{
    uint32_t half = bu->c->qk_rope_head_dim / 2;
    if (n > bu->rope_cap) {
        float *a = realloc(bu->cs_h, (size_t)n * (half + 1) * sizeof(float));
        if (a)
            bu->cs_h = a;
        float *s = realloc(bu->sn_h, (size_t)n * (half + 1) * sizeof(float));
        if (s)
            bu->sn_h = s;
        if (!a || !s)
            return ds_error_set(err, -ENOMEM, "rope tables: out of memory");
        bu->rope_cap = n;
    }
    for (uint32_t i = 0; i < n; i++)
        ds_model_rope_coefs(bu->m, pos[i], bu->cs_h + (size_t)i * half,
                            bu->sn_h + (size_t)i * half);
    size_t bytes = (size_t)n * half * sizeof(float);
    int rc;
    if ((rc = ensure(bu, &bu->cs, bytes + 4, err)) < 0 ||
        (rc = ensure(bu, &bu->sn, bytes + 4, err)) < 0)
        return rc;
    if (!bytes)
        return 0;
    if ((rc = ds_bk_buf_write(bu->cs.b, 0, bu->cs_h, bytes, err)) < 0)
        return rc;
    return ds_bk_buf_write(bu->sn.b, 0, bu->sn_h, bytes, err);
}

/* The checks of ds_unit_attn, with its messages. */
static int attn_check(const ds_model_config *c, uint32_t layer, uint32_t n,
                      const uint32_t *positions, ds_kv_cache *const *caches, ds_error *err)
{
    for (uint32_t i = 0; i < n; i++) {
        ds_kv_cache *kv = caches[i];
        if (!kv || !ds_kv_cache_has_layer(kv, layer))
            return ds_error_set(err, -EINVAL, "attn[%u]: row %u has no cache for this layer", layer,
                                i);
        uint32_t len = ds_kv_cache_len(kv, layer);
        for (uint32_t j = 0; j < i; j++)
            if (caches[j] == kv)
                len = positions[j] + 1;
        if (positions[i] > len)
            return ds_error_set(err, -EINVAL,
                                "attn[%u]: row %u position %u skips past cache "
                                "length %u",
                                layer, i, positions[i], len);
        if (positions[i] >= ds_kv_cache_max_positions(kv))
            return ds_error_set(err, -ENOSPC, "attn[%u]: position %u beyond the cache's %u", layer,
                                positions[i], ds_kv_cache_max_positions(kv));
    }
    (void)c;
    return 0;
}

static int dev_attn(ds_backend_units *bu, uint32_t layer, const float *x, uint32_t n,
                    const uint32_t *pos, ds_kv_cache *const *caches, ds_attn_out *out,
                    ds_error *err)
{
    const ds_model_config *c = bu->c;
    bu_attn *a = &bu->attn[layer];
    uint32_t D = c->hidden_size, H = c->num_attention_heads, dn = c->qk_nope_head_dim;
    uint32_t dr = c->qk_rope_head_dim, dv = c->v_head_dim, C = c->kv_lora_rank;
    uint32_t ql = c->q_lora_rank, qw = H * (dn + dr), kvw = C + dr;
    size_t rowb = (size_t)n * D * sizeof(float);
    int rc;
    if ((rc = attn_check(c, layer, n, pos, caches, err)) < 0)
        return rc;
    if ((rc = ensure(bu, &bu->x, rowb, err)) < 0 || (rc = ensure(bu, &bu->xn, rowb, err)) < 0 ||
        (rc = ensure(bu, &bu->qa, (size_t)n * (ql ? ql : 1) * 4, err)) < 0 ||
        (rc = ensure(bu, &bu->q, (size_t)n * qw * 4, err)) < 0 ||
        (rc = ensure(bu, &bu->kva, (size_t)n * kvw * 4, err)) < 0 ||
        (rc = ensure(bu, &bu->att, (size_t)n * H * dv * 4, err)) < 0 ||
        (rc = ensure(bu, &bu->hid, rowb, err)) < 0 || (rc = ensure(bu, &bu->ffn, rowb, err)) < 0)
        return rc;
    /* input norm, q (LoRA) and kv_a: model/forward.c ds_unit_attn, step for step */
    if ((rc = ds_bk_buf_write(bu->x.b, 0, x, rowb, err)) < 0 ||
        (rc = norm(bu, bu->x.b, D, a->attn_norm, n, D, c->rms_norm_eps, bu->xn.b, err)) < 0)
        return rc;
    if (ql) {
        if ((rc = ds_bk_matmul(a->q_a, bu->xn.b, 0, n, bu->qa.b, 0, err)) < 0 ||
            (rc = norm(bu, bu->qa.b, ql, a->q_a_norm, n, ql, 1e-6, bu->qa.b, err)) < 0 ||
            (rc = ds_bk_matmul(a->q_b, bu->qa.b, 0, n, bu->q.b, 0, err)) < 0)
            return rc;
    } else if ((rc = ds_bk_matmul(a->q_b, bu->xn.b, 0, n, bu->q.b, 0, err)) < 0) {
        return rc;
    }
    if ((rc = ds_bk_matmul(a->kv_a, bu->xn.b, 0, n, bu->kva.b, 0, err)) < 0 ||
        (rc = ds_bk_rmsnorm_rows(bu->kva.b, 0, kvw, a->kv_a_norm, n, C, 1e-6, bu->kva.b, 0, kvw,
                                 err)) < 0 ||
        (rc = rope_tables(bu, pos, n, err)) < 0 ||
        (rc = ds_bk_rope(bu->kva.b, n, 1, kvw, C, dr, bu->cs.b, bu->sn.b, err)) < 0 ||
        (rc = ds_bk_rope(bu->q.b, n, H, dn + dr, dn, dr, bu->cs.b, bu->sn.b, err)) < 0)
        return rc;
    /* append to each row's device cache, then attend run by run (rows of one sequence) */
    for (uint32_t i = 0; i < n; i++) {
        ds_bk_buf *cb;
        if ((rc = kv_device(bu, caches[i], layer, pos[i] + 1, &cb, err)) < 0 ||
            (rc = ds_bk_copy(cb, (size_t)pos[i] * kvw * 4, bu->kva.b, (size_t)i * kvw * 4,
                             (size_t)kvw * 4, err)) < 0)
            return ds_error_prefix(err, "attn[%u]: KV cache", layer), rc;
        ds_kv_cache_set_len(caches[i], layer, pos[i] + 1);
    }
    ds_bk_mla_desc md = {H, dn, dr, dv, C, 0};
    ds_attn_params p;
    ds_model_attn_params(bu->m, layer, &p);
    md.scale = (float)p.softmax_scale;
    for (uint32_t i0 = 0; i0 < n;) {
        uint32_t i1 = i0 + 1;
        /* a run of one sequence's consecutive positions, in chunks whose scratch (q_lat, o_lat
         * and the scores: rows x H x (2C + context)) stays below 64 Mi floats */
        size_t per_row = (size_t)H * (2 * (size_t)C + pos[i0] + MLA_MAX_CHUNK);
        uint32_t chunk = (uint32_t)((64u << 20) / per_row);
        chunk = chunk < 1 ? 1 : chunk > MLA_MAX_CHUNK ? MLA_MAX_CHUNK : chunk;
        while (i1 < n && i1 - i0 < chunk && caches[i1] == caches[i0] && pos[i1] == pos[i1 - 1] + 1)
            i1++;
        ds_bk_buf *cb;
        if ((rc = kv_device(bu, caches[i0], layer, pos[i1 - 1] + 1, &cb, err)) < 0 ||
            (rc = ensure(bu, &bu->mla_scr, ds_bk_mla_attn_scratch(&md, pos[i0], i1 - i0) * 4,
                         err)) < 0 ||
            (rc = ds_bk_mla_attn(&md, bu->q.b, (size_t)i0 * qw, a->kv_b, cb, pos[i0], i1 - i0,
                                 bu->mla_scr.b, bu->att.b, (size_t)i0 * H * dv, err)) < 0)
            return rc;
        i0 = i1;
    }
    /* o_proj + residual, post-attention norm */
    if ((rc = ds_bk_matmul(a->o, bu->att.b, 0, n, bu->hid.b, 0, err)) < 0 ||
        (rc = ds_bk_add(bu->hid.b, bu->x.b, (size_t)n * D, err)) < 0 ||
        (rc = norm(bu, bu->hid.b, D, a->ffn_norm, n, D, c->rms_norm_eps, bu->ffn.b, err)) < 0)
        return rc;
    if (a->gate && out->topk_ids && out->topk_weights) {
        uint32_t E = c->n_routed_experts, k = c->num_experts_per_tok;
        ds_bk_router_desc r = {
            E,
            k,
            c->n_group,
            c->topk_group,
            c->scoring_func == DS_SCORING_SIGMOID,
            c->topk_method == DS_TOPK_GREEDY     ? DS_BK_ROUTER_GREEDY
            : c->topk_method == DS_TOPK_NOAUX_TC ? DS_BK_ROUTER_GROUP_TOP2SUM
                                                 : DS_BK_ROUTER_GROUP_MAX,
            c->norm_topk_prob,
            (float)c->routed_scaling_factor,
        };
        if ((rc = ensure(bu, &bu->logits, (size_t)n * E * 4, err)) < 0 ||
            (rc = ensure(bu, &bu->rscr, ds_bk_router_scratch(&r, n) * 4, err)) < 0 ||
            (rc = ensure(bu, &bu->ids, (size_t)n * k * 4, err)) < 0 ||
            (rc = ensure(bu, &bu->w, (size_t)n * k * 4, err)) < 0 ||
            (rc = ds_bk_matmul(a->gate, bu->ffn.b, 0, n, bu->logits.b, 0, err)) < 0 ||
            (rc = ds_bk_router(&r, bu->logits.b, a->gate_bias, n, bu->rscr.b, bu->ids.b, bu->w.b,
                               err)) < 0 ||
            (rc = ds_bk_buf_read(bu->ids.b, 0, out->topk_ids, (size_t)n * k * 4, err)) < 0 ||
            (rc = ds_bk_buf_read(bu->w.b, 0, out->topk_weights, (size_t)n * k * 4, err)) < 0)
            return rc;
    }
    if ((rc = ds_bk_buf_read(bu->hid.b, 0, out->hidden, rowb, err)) < 0 ||
        (rc = ds_bk_buf_read(bu->ffn.b, 0, out->ffn_in, rowb, err)) < 0)
        return rc;
    bu->ffn_layer = layer;
    bu->ffn_n = n;
    bu->ffn_host = out->ffn_in;
    return 0;
}

static int units_attn(void *ctx, uint32_t layer, const float *x, uint32_t n,
                      const uint32_t *positions, ds_kv_cache *const *caches, ds_attn_out *out,
                      ds_error *err)
{
    ds_backend_units *bu = ctx;
    if (!ds_backend_units_hosts(bu, DS_UNIT_ATTN, layer)) {
        bu->ffn_layer = UINT32_MAX; /* the device holds no ffn_in of this layer */
        return ds_unit_attn(bu->m, bu->pool, layer, x, n, positions, caches, out, err);
    }
    if (n == 0)
        return 0;
    double t0 = now_s();
    int rc = dev_attn(bu, layer, x, n, positions, caches, out, err);
    bu->busy_s += now_s() - t0;
    bu->calls++;
    if (rc < 0) {
        bu->ffn_layer = UINT32_MAX;
        ds_error_prefix(err, "attn[%u] on %s", layer, ds_backend_kind(bu->b));
    }
    return rc;
}

static int units_ffn(void *ctx, enum ds_unit_kind kind, uint32_t layer, const float *ffn_in,
                     uint32_t n, float *out, ds_error *err)
{
    ds_backend_units *bu = ctx;
    if (!ds_backend_units_hosts(bu, kind, layer))
        return kind == DS_UNIT_DENSE ? ds_unit_dense(bu->m, bu->pool, layer, ffn_in, n, out, err)
                                     : ds_unit_shared(bu->m, bu->pool, layer, ffn_in, n, out, err);
    if (n == 0)
        return 0;
    double t0 = now_s();
    bu_ffn *f = kind == DS_UNIT_DENSE ? &bu->dense[layer] : &bu->shared[layer];
    uint32_t D = bu->c->hidden_size, I = f->gate ? ds_bk_weight_rows(f->gate) : 0;
    size_t rowb = (size_t)n * D * 4, gb = (size_t)n * I * 4;
    int rc = ensure(bu, &bu->g, gb, err);
    if (rc == 0)
        rc = ensure(bu, &bu->u, gb, err);
    if (rc == 0)
        rc = ensure(bu, &bu->out, rowb, err);
    /* the post-attention norm is still on the device when the attention of this layer ran here */
    bool have = ffn_in == bu->ffn_host && layer == bu->ffn_layer && n == bu->ffn_n;
    if (rc == 0 && !have && (rc = ensure(bu, &bu->ffn, rowb, err)) == 0) {
        bu->ffn_layer = UINT32_MAX;
        rc = ds_bk_buf_write(bu->ffn.b, 0, ffn_in, rowb, err);
    }
    if (rc == 0)
        rc = ds_bk_matmul(f->gate, bu->ffn.b, 0, n, bu->g.b, 0, err);
    if (rc == 0)
        rc = ds_bk_matmul(f->up, bu->ffn.b, 0, n, bu->u.b, 0, err);
    if (rc == 0)
        rc = ds_bk_swiglu(bu->g.b, bu->u.b, (size_t)n * I, err);
    if (rc == 0)
        rc = ds_bk_matmul(f->down, bu->g.b, 0, n, bu->out.b, 0, err);
    if (rc == 0)
        rc = ds_bk_buf_read(bu->out.b, 0, out, rowb, err);
    bu->busy_s += now_s() - t0;
    bu->calls++;
    if (rc < 0)
        ds_error_prefix(err, "%s[%u] on %s", kind == DS_UNIT_DENSE ? "dense" : "shared", layer,
                        ds_backend_kind(bu->b));
    return rc;
}

static int units_embed(void *ctx, const int32_t *tokens, uint32_t n, float *out, ds_error *err)
{
    ds_backend_units *bu = ctx;
    if (!bu->embed)
        return ds_unit_embed(bu->m, bu->pool, tokens, n, out, err);
    for (uint32_t i = 0; i < n; i++)
        if (tokens[i] < 0 || (uint32_t)tokens[i] >= bu->c->vocab_size)
            return ds_error_set(err, -ERANGE, "token id %d outside the vocabulary [0, %u)",
                                tokens[i], bu->c->vocab_size);
    if (n == 0)
        return 0;
    double t0 = now_s();
    size_t rowb = (size_t)n * bu->c->hidden_size * 4;
    int rc = ensure(bu, &bu->x, rowb, err);
    if (rc == 0)
        rc = ds_bk_gather_rows(bu->embed, tokens, n, bu->x.b, 0, err);
    if (rc == 0)
        rc = ds_bk_buf_read(bu->x.b, 0, out, rowb, err);
    bu->busy_s += now_s() - t0;
    bu->calls++;
    return rc < 0 ? (ds_error_prefix(err, "embed on %s", ds_backend_kind(bu->b)), rc) : 0;
}

static int units_head(void *ctx, const float *x, uint32_t n, float *logits, ds_error *err)
{
    ds_backend_units *bu = ctx;
    if (!bu->lm_head)
        return ds_unit_head(bu->m, bu->pool, x, n, logits, err);
    if (n == 0)
        return 0;
    double t0 = now_s();
    uint32_t D = bu->c->hidden_size, V = ds_bk_weight_rows(bu->lm_head);
    size_t rowb = (size_t)n * D * 4;
    int rc = ensure(bu, &bu->x, rowb, err);
    if (rc == 0)
        rc = ensure(bu, &bu->xn, rowb, err);
    if (rc == 0)
        rc = ensure(bu, &bu->logits, (size_t)n * V * 4, err);
    if (rc == 0)
        rc = ds_bk_buf_write(bu->x.b, 0, x, rowb, err);
    if (rc == 0)
        rc = norm(bu, bu->x.b, D, bu->final_norm, n, D, bu->c->rms_norm_eps, bu->xn.b, err);
    if (rc == 0)
        rc = ds_bk_matmul(bu->lm_head, bu->xn.b, 0, n, bu->logits.b, 0, err);
    if (rc == 0)
        rc = ds_bk_buf_read(bu->logits.b, 0, logits, (size_t)n * V * 4, err);
    bu->busy_s += now_s() - t0;
    bu->calls++;
    return rc < 0 ? (ds_error_prefix(err, "head on %s", ds_backend_kind(bu->b)), rc) : 0;
}

const ds_unit_runner_ops ds_backend_units_ops = {
    .attn = units_attn,
    .ffn = units_ffn,
    .embed = units_embed,
    .head = units_head,
};
