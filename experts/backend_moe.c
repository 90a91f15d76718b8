/* backend_moe.c — routed experts through a compute backend (see ds_backend_moe.h). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds_backend_moe.h"
#include "ds_experts.h"
#include "ds_tensor.h"

typedef struct bm_expert {
    ds_bk_weight *gate, *up, *down; /* [I, D], [I, D], [D, I] */
} bm_expert;

struct ds_backend_moe {
    ds_backend *b;
    ds_model_config cfg; /* copy of the model's config */
    bm_expert *ex;       /* [num_hidden_layers * n_routed_experts]; NULL weights: dense layer */
    uint64_t bytes;      /* expert weight bytes uploaded */
    uint32_t cap;        /* rows the device buffers hold */
    ds_bk_buf *in, *g, *u, *out; /* [cap, D], [cap, I], [cap, I], [cap, D] */
    float *host;                 /* [cap, D] gather / scatter staging */
    float *hg, *hu;              /* [cap, I] host SwiGLU (exact mode) */
    bool exact;                  /* SwiGLU on the host with the engine's expf */
};

/* Uploads the linear weight `name` [rows, cols]. F16 is widened to F32 (as the engine does). */
static int upload(ds_backend_moe *bm, const ds_st *st, const char *name, uint32_t rows,
                  uint32_t cols, ds_bk_weight **ret, ds_error *err)
{
    const ds_st_tensor *t = ds_st_find(st, name);
    if (!t)
        return ds_error_set(err, -ENOENT, "tensor '%s' not found", name);
    if (t->ndim != 2 || t->shape[0] != rows || t->shape[1] != cols)
        return ds_error_set(err, -EBADMSG, "%s: tensor '%s' must be [%u, %u]", t->file, name, rows,
                            cols);
    ds_bk_weight_desc d = {DS_BK_F32, rows, cols, t->data, NULL, 0, 0};
    float *tmp = NULL;
    switch (t->dtype) {
    case DS_ST_F32:
        break;
    case DS_ST_BF16:
        d.dtype = DS_BK_BF16;
        break;
    case DS_ST_F16:
        if (!(tmp = malloc((size_t)rows * cols * sizeof(float))))
            return ds_error_set(err, -ENOMEM, "%s: out of memory", name);
        for (size_t i = 0; i < (size_t)rows * cols; i++) {
            uint16_t h;
            memcpy(&h, (const uint8_t *)t->data + 2 * i, 2);
            tmp[i] = ds_f16_to_f32(h);
        }
        d.data = tmp;
        break;
    case DS_ST_F8_E4M3: {
        char sname[512];
        snprintf(sname, sizeof(sname), "%s_scale_inv", name);
        const ds_st_tensor *s = ds_st_find(st, sname);
        uint32_t br = bm->cfg.fp8_block_rows, bc = bm->cfg.fp8_block_cols;
        if (!s || s->dtype != DS_ST_F32 || s->ndim != 2 || !br || !bc ||
            s->shape[0] != (rows + br - 1) / br || s->shape[1] != (cols + bc - 1) / bc)
            return ds_error_set(err, -EBADMSG, "tensor '%s': missing or misshapen block scales",
                                sname);
        d.dtype = DS_BK_F8_E4M3;
        d.scale_inv = s->data; /* the backends copy it; alignment only matters to them */
        d.block_rows = br;
        d.block_cols = bc;
        break;
    }
    default:
        return ds_error_set(err, -EBADMSG, "%s: tensor '%s' has dtype %s", t->file, name,
                            ds_st_dtype_name(t->dtype));
    }
    int rc = ds_bk_weight_new(bm->b, &d, ret, err);
    free(tmp);
    if (rc < 0)
        ds_error_prefix(err, "%s", name);
    else
        bm->bytes += ds_bk_weight_bytes(*ret);
    return rc;
}

ds_backend_moe *ds_backend_moe_free(ds_backend_moe *bm)
{
    if (!bm)
        return NULL;
    size_t n = (size_t)bm->cfg.num_hidden_layers * bm->cfg.n_routed_experts;
    for (size_t i = 0; bm->ex && i < n; i++) {
        ds_bk_weight_free(bm->ex[i].gate);
        ds_bk_weight_free(bm->ex[i].up);
        ds_bk_weight_free(bm->ex[i].down);
    }
    free(bm->ex);
    ds_bk_buf_free(bm->in);
    ds_bk_buf_free(bm->g);
    ds_bk_buf_free(bm->u);
    ds_bk_buf_free(bm->out);
    free(bm->host);
    free(bm->hg);
    free(bm->hu);
    free(bm);
    return NULL;
}

int ds_backend_moe_new(const ds_model *m, const char *dir, ds_backend *b, ds_backend_moe **ret,
                       ds_error *err)
{
    return ds_backend_moe_new_subset(m, dir, b, NULL, NULL, ret, err);
}

int ds_backend_moe_new_subset(const ds_model *m, const char *dir, ds_backend *b,
                              bool (*want)(void *ctx, uint32_t layer, uint32_t expert), void *ctx,
                              ds_backend_moe **ret, ds_error *err)
{
    *ret = NULL;
    ds_backend_moe *bm = calloc(1, sizeof(*bm));
    if (!bm)
        return ds_error_set(err, -ENOMEM, "backend moe: out of memory");
    bm->b = b;
    bm->exact = true;
    bm->cfg = *ds_model_get_config(m);
    const ds_model_config *c = &bm->cfg;
    ds_st *st = NULL;
    int rc = -ENOMEM;
    bm->ex = calloc((size_t)c->num_hidden_layers * c->n_routed_experts + 1, sizeof(*bm->ex));
    if (!bm->ex) {
        ds_error_set(err, rc, "backend moe: out of memory");
        goto out;
    }
    size_t dl = strlen(dir);
    if (dl > 5 && !strcmp(dir + dl - 5, ".gguf")) {
        /* the expert backends read safetensors tensors (BF16/F32/FP8); a GGUF's experts run
         * on the CPU engine, or with --device experts=... through the units path */
        rc = ds_error_set(err, -ENOTSUP,
                          "%s: routed experts on a compute backend need an HF checkpoint; run "
                          "a GGUF's experts on the CPU engine",
                          dir);
        goto out;
    }
    if ((rc = ds_st_open_dir(dir, &st, err)) < 0)
        goto out;
    uint32_t D = c->hidden_size, I = c->moe_intermediate_size;
    for (uint32_t l = 0; l < c->num_hidden_layers; l++) {
        if (!ds_model_config_layer_is_moe(c, l))
            continue;
        for (uint32_t e = 0; e < c->n_routed_experts; e++) {
            bm_expert *x = &bm->ex[(size_t)l * c->n_routed_experts + e];
            if (want && !want(ctx, l, e))
                continue;
            char n[256];
            snprintf(n, sizeof(n), "model.layers.%u.mlp.experts.%u.gate_proj.weight", l, e);
            if ((rc = upload(bm, st, n, I, D, &x->gate, err)) < 0)
                goto out;
            snprintf(n, sizeof(n), "model.layers.%u.mlp.experts.%u.up_proj.weight", l, e);
            if ((rc = upload(bm, st, n, I, D, &x->up, err)) < 0)
                goto out;
            snprintf(n, sizeof(n), "model.layers.%u.mlp.experts.%u.down_proj.weight", l, e);
            if ((rc = upload(bm, st, n, D, I, &x->down, err)) < 0)
                goto out;
        }
    }
    rc = 0;
out:
    /* The backends copied the weights: the mapping can go. */
    ds_st_free(st);
    if (rc < 0) {
        ds_backend_moe_free(bm);
        return rc;
    }
    *ret = bm;
    return 0;
}

void ds_backend_moe_set_exact(ds_backend_moe *bm, bool exact)
{
    bm->exact = exact;
}

uint64_t ds_backend_moe_bytes(const ds_backend_moe *bm)
{
    return bm->bytes;
}

/* Grows the device buffers to rows rows. */
static int reserve(ds_backend_moe *bm, uint32_t rows, ds_error *err)
{
    if (rows <= bm->cap)
        return 0;
    size_t D = bm->cfg.hidden_size, I = bm->cfg.moe_intermediate_size;
    ds_bk_buf_free(bm->in);
    ds_bk_buf_free(bm->g);
    ds_bk_buf_free(bm->u);
    ds_bk_buf_free(bm->out);
    free(bm->host);
    free(bm->hg);
    free(bm->hu);
    bm->hg = bm->hu = NULL;
    bm->in = bm->g = bm->u = bm->out = NULL;
    bm->cap = 0;
    int rc;
    if ((rc = ds_bk_buf_new(bm->b, rows * D * 4, &bm->in, err)) < 0 ||
        (rc = ds_bk_buf_new(bm->b, rows * I * 4, &bm->g, err)) < 0 ||
        (rc = ds_bk_buf_new(bm->b, rows * I * 4, &bm->u, err)) < 0 ||
        (rc = ds_bk_buf_new(bm->b, rows * D * 4, &bm->out, err)) < 0)
        return rc;
    if (!(bm->host = malloc(rows * D * 4)) || !(bm->hg = malloc(rows * I * 4)) ||
        !(bm->hu = malloc(rows * I * 4)))
        return ds_error_set(err, -ENOMEM, "backend moe: out of memory");
    bm->cap = rows;
    return 0;
}

/* n rows with k expert slots each: out[(i*k + s)] = expert_{ids[i*k+s]}(ffn_in[i]). */
static int run_k(ds_backend_moe *bm, uint32_t layer, const float *ffn_in, uint32_t n, uint32_t k,
                 const int32_t *ids, float *out, ds_error *err)
{
    const ds_model_config *c = &bm->cfg;
    uint32_t D = c->hidden_size, I = c->moe_intermediate_size;
    if (layer >= c->num_hidden_layers || !ds_model_config_layer_is_moe(c, layer))
        return ds_error_set(err, -ENOENT, "backend moe: layer %u has no routed experts", layer);
    if (n == 0)
        return 0;
    ds_moe_groups g;
    int rc = ds_moe_group(n, k, ids, c->n_routed_experts, &g);
    if (rc < 0)
        return ds_error_set(err, rc, "layer %u: bad routing ids", layer);
    uint32_t rows = n * k;
    for (uint32_t e = 0; e < c->n_routed_experts; e++)
        if (g.offsets[e + 1] > g.offsets[e] &&
            !bm->ex[(size_t)layer * c->n_routed_experts + e].gate) {
            rc = ds_error_set(err, -ENOENT, "expert[%u][%u] is not on this device", layer, e);
            goto out;
        }
    if ((rc = reserve(bm, rows, err)) < 0)
        goto out;
    /* Gather in expert order: group slot j is row j of the device buffers. */
    for (uint32_t j = 0; j < rows; j++)
        memcpy(bm->host + (size_t)j * D, ffn_in + (size_t)(g.order[j] / k) * D, D * 4);
    if ((rc = ds_bk_buf_write(bm->in, 0, bm->host, (size_t)rows * D * 4, err)) < 0)
        goto out;
    for (uint32_t e = 0; e < c->n_routed_experts; e++) {
        uint32_t b0 = g.offsets[e], cnt = g.offsets[e + 1] - b0;
        if (!cnt)
            continue;
        bm_expert *x = &bm->ex[(size_t)layer * c->n_routed_experts + e];
        if ((rc = ds_bk_matmul(x->gate, bm->in, (size_t)b0 * D, cnt, bm->g, (size_t)b0 * I, err)) <
                0 ||
            (rc = ds_bk_matmul(x->up, bm->in, (size_t)b0 * D, cnt, bm->u, (size_t)b0 * I, err)) < 0)
            goto out;
    }
    /* SwiGLU over all slots at once: elementwise, so one launch serves every expert. In exact
     * mode it runs here with the C library's expf, as the engine does (ffn_run in
     * model/forward.c): a device's exp may differ in the last bit, and the cluster's
     * bit-identity invariant (ds_model.h) needs every unit bit-identical. The round trip is
     * 3 x rows x I floats, small next to the expert weights streamed. */
    size_t gi = (size_t)rows * I;
    if (bm->exact) {
        if ((rc = ds_bk_buf_read(bm->g, 0, bm->hg, gi * 4, err)) < 0 ||
            (rc = ds_bk_buf_read(bm->u, 0, bm->hu, gi * 4, err)) < 0)
            goto out;
        for (size_t i = 0; i < gi; i++)
            bm->hg[i] = bm->hg[i] / (1.0f + ds_expf(-bm->hg[i])) * bm->hu[i];
        if ((rc = ds_bk_buf_write(bm->g, 0, bm->hg, gi * 4, err)) < 0)
            goto out;
    } else if ((rc = ds_bk_swiglu(bm->g, bm->u, gi, err)) < 0) {
        goto out;
    }
    for (uint32_t e = 0; e < c->n_routed_experts; e++) {
        uint32_t b0 = g.offsets[e], cnt = g.offsets[e + 1] - b0;
        if (!cnt)
            continue;
        bm_expert *x = &bm->ex[(size_t)layer * c->n_routed_experts + e];
        if ((rc = ds_bk_matmul(x->down, bm->g, (size_t)b0 * I, cnt, bm->out, (size_t)b0 * D, err)) <
            0)
            goto out;
    }
    if ((rc = ds_bk_buf_read(bm->out, 0, bm->host, (size_t)rows * D * 4, err)) < 0)
        goto out;
    for (uint32_t j = 0; j < rows; j++)
        memcpy(out + (size_t)g.order[j] * D, bm->host + (size_t)j * D, D * 4);
out:
    if (rc < 0)
        ds_error_prefix(err, "layer %u experts on %s", layer, ds_backend_kind(bm->b));
    ds_moe_groups_clear(&g);
    return rc;
}

int ds_backend_moe_run(ds_backend_moe *bm, uint32_t layer, const float *ffn_in, uint32_t n,
                       const int32_t *ids, float *out, ds_error *err)
{
    return run_k(bm, layer, ffn_in, n, bm->cfg.num_experts_per_tok, ids, out, err);
}

int ds_backend_moe_run_pairs(ds_backend_moe *bm, uint32_t layer, const float *rows, uint32_t n,
                             const int32_t *experts, float *out, ds_error *err)
{
    return run_k(bm, layer, rows, n, 1, experts, out, err);
}
