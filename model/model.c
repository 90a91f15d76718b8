/* model.c — opening a checkpoint: binds every tensor the wanted units need, checked against
 * the config (presence, 2-D shape, dtype), with errors naming the file and the tensor. Norm
 * vectors and the router bias are converted once to float32 (they are tiny); linear weights
 * stay at checkpoint precision inside the mapping (F32, F16, BF16, FP8 + block scales).
 * A path to a .gguf file goes to model_gguf.c instead (same struct, same checks). */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds_gguf.h"
#include "model_impl.h"

static const ds_st_tensor *m_find(ds_model *m, const char *name, ds_error *err)
{
    const ds_st_tensor *t = ds_st_find(m->st, name);
    if (!t) {
        ds_error_set(err, -ENOENT, "%s: missing tensor '%s'", m->dir, name);
        return NULL;
    }
    if (m->n_used == m->cap_used) {
        size_t cap = m->cap_used ? m->cap_used * 2 : 256;
        const ds_st_tensor **u = realloc(m->used, cap * sizeof(*u));
        if (!u) {
            ds_error_set(err, -ENOMEM, "out of memory");
            return NULL;
        }
        m->used = u;
        m->cap_used = cap;
    }
    m->used[m->n_used++] = t;
    return t;
}

static int ptr_cmp(const void *a, const void *b)
{
    uintptr_t x = (uintptr_t) * (const ds_st_tensor *const *)a;
    uintptr_t y = (uintptr_t) * (const ds_st_tensor *const *)b;
    return x < y ? -1 : x > y;
}

/* A sorted copy of the n pointers p without repeats. */
static int unique_ptrs(const void *const *p, size_t n, const void ***out, size_t *k_out)
{
    const void **v = malloc((n ? n : 1) * sizeof(*v));
    if (!v)
        return -ENOMEM;
    memcpy(v, p, n * sizeof(*v));
    qsort(v, n, sizeof(*v), ptr_cmp);
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (!k || v[k - 1] != v[i])
            v[k++] = v[i];
    *out = v;
    *k_out = k;
    return 0;
}

int ds_model_tensors_used(const ds_model *m, const ds_st_tensor ***out, size_t *n)
{
    if (m->gg)
        return -EMEDIUMTYPE; /* a GGUF: ds_model_gguf_tensors_used */
    return unique_ptrs((const void *const *)m->used, m->n_used, (const void ***)out, n);
}

int ds_model_gguf_tensors_used(const ds_model *m, const struct ds_gguf_tensor ***out, size_t *n)
{
    if (!m->gg)
        return -EMEDIUMTYPE;
    return unique_ptrs((const void *const *)m->gused, m->n_gused, (const void ***)out, n);
}

const struct ds_gguf *ds_model_gguf(const ds_model *m)
{
    return m->gg;
}

/* A float32 copy of a 1-D tensor of len elements. */
static int m_vec(ds_model *m, const char *name, uint32_t len, const float **out, ds_error *err)
{
    const ds_st_tensor *t = m_find(m, name, err);
    if (!t)
        return -ENOENT;
    if (t->ndim != 1 || t->shape[0] != len)
        return ds_error_set(err, -EBADMSG,
                            "%s: tensor '%s' has shape %s[%llu...] (%u dims), "
                            "expected [%u]",
                            t->file, name, "", (unsigned long long)(t->ndim ? t->shape[0] : 0),
                            t->ndim, len);
    float *v = malloc((size_t)len * sizeof(float) + 1);
    int rc = ds_model_own(m, v);
    if (rc < 0)
        return rc;
    for (uint32_t i = 0; i < len; i++) {
        switch (t->dtype) {
        case DS_ST_F32:
            memcpy(&v[i], (const uint8_t *)t->data + 4 * (size_t)i, 4);
            break;
        case DS_ST_BF16: {
            uint16_t h;
            memcpy(&h, (const uint8_t *)t->data + 2 * (size_t)i, 2);
            v[i] = ds_bf16_to_f32(h);
            break;
        }
        case DS_ST_F16: {
            uint16_t h;
            memcpy(&h, (const uint8_t *)t->data + 2 * (size_t)i, 2);
            v[i] = ds_f16_to_f32(h);
            break;
        }
        default:
            return ds_error_set(err, -EBADMSG,
                                "%s: tensor '%s' has dtype %s, expected F32, "
                                "BF16 or F16",
                                t->file, name, ds_st_dtype_name(t->dtype));
        }
    }
    *out = v;
    return 0;
}

static int m_weight(ds_model *m, const char *name, uint32_t rows, uint32_t cols, ds_weight *w,
                    ds_error *err)
{
    const ds_st_tensor *t = m_find(m, name, err);
    if (!t)
        return -ENOENT;
    if (t->ndim != 2 || t->shape[0] != rows || t->shape[1] != cols)
        return ds_error_set(err, -EBADMSG,
                            "%s: tensor '%s' has shape [%llu, %llu] (%u dims), "
                            "the config needs [%u, %u]",
                            t->file, name, (unsigned long long)(t->ndim > 0 ? t->shape[0] : 0),
                            (unsigned long long)(t->ndim > 1 ? t->shape[1] : 0), t->ndim, rows,
                            cols);
    memset(w, 0, sizeof(*w));
    w->rows = rows;
    w->cols = cols;
    w->data = t->data;
    switch (t->dtype) {
    case DS_ST_F32:
        w->dtype = DS_DTYPE_F32;
        if ((uintptr_t)t->data % 4)
            goto realign;
        return 0;
    case DS_ST_BF16:
        w->dtype = DS_DTYPE_BF16;
        if ((uintptr_t)t->data % 2)
            goto realign;
        return 0;
    case DS_ST_F16:
        w->dtype = DS_DTYPE_F16;
        if ((uintptr_t)t->data % 2)
            goto realign;
        return 0;
    case DS_ST_F8_E4M3: {
        char sname[512];
        if (snprintf(sname, sizeof(sname), "%s_scale_inv", name) >= (int)sizeof(sname))
            return ds_error_set(err, -ENAMETOOLONG, "tensor name too long: %s", name);
        const ds_st_tensor *s = m_find(m, sname, err);
        if (!s)
            return -ENOENT;
        uint32_t br = m->cfg.fp8_block_rows, bc = m->cfg.fp8_block_cols;
        uint64_t nr = (rows + (uint64_t)br - 1) / br, nc = (cols + (uint64_t)bc - 1) / bc;
        if (s->dtype != DS_ST_F32 || s->ndim != 2 || s->shape[0] != nr || s->shape[1] != nc)
            return ds_error_set(err, -EBADMSG,
                                "%s: tensor '%s' must be F32 [%llu, %llu] "
                                "(block scales of '%s')",
                                s->file, sname, (unsigned long long)nr, (unsigned long long)nc,
                                name);
        w->dtype = DS_DTYPE_F8_E4M3;
        w->block_rows = br;
        w->block_cols = bc;
        if ((uintptr_t)s->data % 4) {
            float *f = malloc(s->nbytes + 1);
            int rc = ds_model_own(m, f);
            if (rc < 0)
                return rc;
            memcpy(f, s->data, s->nbytes);
            w->scale_inv = f;
        } else {
            w->scale_inv = s->data;
        }
        return 0;
    }
    default:
        return ds_error_set(err, -EBADMSG,
                            "%s: tensor '%s' has dtype %s; a linear weight must "
                            "be F32, F16, BF16 or F8_E4M3",
                            t->file, name, ds_st_dtype_name(t->dtype));
    }
realign : {
    /* safetensors does not promise alignment; copy the rare unaligned tensor once. */
    void *c = malloc(t->nbytes + 1);
    int rc = ds_model_own(m, c);
    if (rc < 0)
        return rc;
    memcpy(c, t->data, t->nbytes);
    w->data = c;
    return 0;
}
}

static bool m_want(const ds_model_open_opts *o, enum ds_unit_kind k, uint32_t l, uint32_t e)
{
    return !o || !o->want || o->want(o->want_ctx, k, l, e);
}

#define NAME(buf, ...) snprintf(buf, sizeof(buf), __VA_ARGS__)

static int m_ffn(ds_model *m, const char *prefix, uint32_t inter, ds_ffn *f, ds_error *err)
{
    char n[256];
    uint32_t d = m->cfg.hidden_size;
    int rc;
    NAME(n, "%s.gate_proj.weight", prefix);
    if ((rc = m_weight(m, n, inter, d, &f->gate, err)) < 0)
        return rc;
    NAME(n, "%s.up_proj.weight", prefix);
    if ((rc = m_weight(m, n, inter, d, &f->up, err)) < 0)
        return rc;
    NAME(n, "%s.down_proj.weight", prefix);
    if ((rc = m_weight(m, n, d, inter, &f->down, err)) < 0)
        return rc;
    f->bound = true;
    return 0;
}

static int m_bind_layer(ds_model *m, uint32_t l, const ds_model_open_opts *o, ds_error *err)
{
    const ds_model_config *c = &m->cfg;
    ds_layer *L = &m->layers[l];
    char n[256];
    int rc;
    uint32_t d = c->hidden_size, h = c->num_attention_heads;
    uint32_t qk = c->qk_nope_head_dim + c->qk_rope_head_dim;
    L->moe = ds_model_config_layer_is_moe(c, l);
    if (m_want(o, DS_UNIT_ATTN, l, 0)) {
        NAME(n, "model.layers.%u.input_layernorm.weight", l);
        if ((rc = m_vec(m, n, d, &L->attn_norm, err)) < 0)
            return rc;
        NAME(n, "model.layers.%u.post_attention_layernorm.weight", l);
        if ((rc = m_vec(m, n, d, &L->ffn_norm, err)) < 0)
            return rc;
        if (c->q_lora_rank) {
            NAME(n, "model.layers.%u.self_attn.q_a_proj.weight", l);
            if ((rc = m_weight(m, n, c->q_lora_rank, d, &L->q_a, err)) < 0)
                return rc;
            NAME(n, "model.layers.%u.self_attn.q_a_layernorm.weight", l);
            if ((rc = m_vec(m, n, c->q_lora_rank, &L->q_a_norm, err)) < 0)
                return rc;
            NAME(n, "model.layers.%u.self_attn.q_b_proj.weight", l);
            if ((rc = m_weight(m, n, h * qk, c->q_lora_rank, &L->q_b, err)) < 0)
                return rc;
        } else {
            NAME(n, "model.layers.%u.self_attn.q_proj.weight", l);
            if ((rc = m_weight(m, n, h * qk, d, &L->q_b, err)) < 0)
                return rc;
        }
        NAME(n, "model.layers.%u.self_attn.kv_a_proj_with_mqa.weight", l);
        if ((rc = m_weight(m, n, c->kv_lora_rank + c->qk_rope_head_dim, d, &L->kv_a, err)) < 0)
            return rc;
        NAME(n, "model.layers.%u.self_attn.kv_a_layernorm.weight", l);
        if ((rc = m_vec(m, n, c->kv_lora_rank, &L->kv_a_norm, err)) < 0)
            return rc;
        NAME(n, "model.layers.%u.self_attn.kv_b_proj.weight", l);
        if ((rc = m_weight(m, n, h * (c->qk_nope_head_dim + c->v_head_dim), c->kv_lora_rank,
                           &L->kv_b, err)) < 0)
            return rc;
        NAME(n, "model.layers.%u.self_attn.o_proj.weight", l);
        if ((rc = m_weight(m, n, d, h * c->v_head_dim, &L->o, err)) < 0)
            return rc;
        if (L->moe) {
            NAME(n, "model.layers.%u.mlp.gate.weight", l);
            if ((rc = m_weight(m, n, c->n_routed_experts, d, &L->gate, err)) < 0)
                return rc;
            NAME(n, "model.layers.%u.mlp.gate.e_score_correction_bias", l);
            /* The bias is used whenever present (V3); V2 has none. */
            if (ds_st_find(m->st, n) &&
                (rc = m_vec(m, n, c->n_routed_experts, &L->gate_bias, err)) < 0)
                return rc;
            if (!L->gate_bias && c->topk_method == DS_TOPK_NOAUX_TC)
                return ds_error_set(err, -ENOENT, "%s: missing tensor '%s' (noaux_tc needs it)",
                                    m->dir, n);
        }
        L->attn_bound = true;
    }
    if (!L->moe) {
        if (m_want(o, DS_UNIT_DENSE, l, 0)) {
            NAME(n, "model.layers.%u.mlp", l);
            if ((rc = m_ffn(m, n, c->intermediate_size, &L->dense, err)) < 0)
                return rc;
        }
        return 0;
    }
    if (c->n_shared_experts && m_want(o, DS_UNIT_SHARED, l, 0)) {
        NAME(n, "model.layers.%u.mlp.shared_experts", l);
        if ((rc = m_ffn(m, n, c->moe_intermediate_size * c->n_shared_experts, &L->shared, err)) < 0)
            return rc;
    }
    L->experts = calloc(c->n_routed_experts, sizeof(*L->experts));
    if (!L->experts)
        return -ENOMEM;
    for (uint32_t e = 0; e < c->n_routed_experts; e++) {
        if (!m_want(o, DS_UNIT_EXPERT, l, e))
            continue;
        NAME(n, "model.layers.%u.mlp.experts.%u", l, e);
        if ((rc = m_ffn(m, n, c->moe_intermediate_size, &L->experts[e], err)) < 0)
            return rc;
    }
    return 0;
}

int ds_model_open(const char *dir, const ds_model_open_opts *opts, ds_model **ret, ds_error *err)
{
    ds_model *m = calloc(1, sizeof(*m));
    if (!m)
        return -ENOMEM;
    int rc = -ENOMEM;
    char path[4096];
    m->dir = strdup(dir);
    if (!m->dir)
        goto fail;
    if (ds_model_path_is_gguf(dir)) {
        if ((rc = ds_model_open_gguf(m, opts, err)) < 0 ||
            (opts && opts->quantize && (rc = ds_model_quantize_bound(m, opts->quantize, err)) < 0))
            goto fail;
        *ret = m;
        return 0;
    }
    if (snprintf(path, sizeof(path), "%s/config.json", dir) >= (int)sizeof(path)) {
        rc = ds_error_set(err, -ENAMETOOLONG, "%s: path too long", dir);
        goto fail;
    }
    if ((rc = ds_model_config_load(path, &m->cfg, err)) < 0)
        goto fail;
    if ((rc = ds_st_open_dir(dir, &m->st, err)) < 0)
        goto fail;
    const ds_model_config *c = &m->cfg;
    m->layers = calloc(c->num_hidden_layers, sizeof(*m->layers));
    if (!m->layers) {
        rc = -ENOMEM;
        goto fail;
    }
    if (m_want(opts, DS_UNIT_EMBED, 0, 0)) {
        if ((rc = m_weight(m, "model.embed_tokens.weight", c->vocab_size, c->hidden_size, &m->embed,
                           err)) < 0)
            goto fail;
        m->embed_bound = true;
    }
    if (m_want(opts, DS_UNIT_HEAD, 0, 0)) {
        if ((rc = m_vec(m, "model.norm.weight", c->hidden_size, &m->final_norm, err)) < 0)
            goto fail;
        const char *hn = c->tie_word_embeddings && !ds_st_find(m->st, "lm_head.weight")
                             ? "model.embed_tokens.weight"
                             : "lm_head.weight";
        if ((rc = m_weight(m, hn, c->vocab_size, c->hidden_size, &m->lm_head, err)) < 0)
            goto fail;
        m->head_bound = true;
    }
    for (uint32_t l = 0; l < c->num_hidden_layers; l++)
        if ((rc = m_bind_layer(m, l, opts, err)) < 0)
            goto fail;
    if ((rc = ds_rope_init(c, &m->rope)) < 0) {
        ds_error_set(err, rc, "%s: rope tables", dir);
        goto fail;
    }
    if (opts && opts->quantize && (rc = ds_model_quantize_bound(m, opts->quantize, err)) < 0)
        goto fail;
    *ret = m;
    return 0;
fail:
    ds_model_free(m);
    return rc;
}

ds_model *ds_model_free(ds_model *m)
{
    if (!m)
        return NULL;
    if (m->layers)
        for (uint32_t l = 0; l < m->cfg.num_hidden_layers; l++)
            free(m->layers[l].experts);
    free(m->layers);
    for (size_t i = 0; i < m->n_owned; i++)
        free(m->owned[i]);
    free(m->owned);
    free(m->used);
    free(m->gused);
    free(m->rope.inv_freq);
    ds_st_free(m->st);
    ds_gguf_free(m->gg);
    free(m->dir);
    free(m);
    return NULL;
}

const ds_model_config *ds_model_get_config(const ds_model *m)
{
    return &m->cfg;
}
