/* model_gguf.c — binding a llama.cpp GGUF file (architecture deepseek2) to the engine's units.
 *
 * The tensors are those convert_hf_to_gguf.py writes (gguf-py constants.py MODEL_ARCH.DEEPSEEK2,
 * conversion/deepseek.py), dims in ggml order (ne[0] = columns, so an HF [rows, cols] weight is
 * ne = {cols, rows}):
 *
 *   token_embd, output_norm, output (absent = tied to token_embd)
 *   blk.N.attn_norm, ffn_norm                       the two RMSNorm vectors
 *   blk.N.attn_q_a, attn_q_a_norm, attn_q_b | attn_q  query (LoRA or not)
 *   blk.N.attn_kv_a_mqa, attn_kv_a_norm             [C + dr, D], [C]
 *   blk.N.attn_kv_b                                  older files: HF's kv_b_proj as is
 *   blk.N.attn_k_b {dn, C, H}, attn_v_b {C, dv, H}   newer files: kv_b split per head, k_b
 *                                                    TRANSPOSED (per head [C, dn])
 *   blk.N.attn_output                                [D, H*dv]
 *   blk.N.ffn_gate/up/down                           dense layers
 *   blk.N.ffn_gate_inp (+ exp_probs_b.bias)          router [E, D], bias [E]
 *   blk.N.ffn_{gate,up,down}_exps {cols, rows, E}    the experts stacked
 *   blk.N.ffn_{gate,up,down}_shexp                   shared experts
 *
 * Weights stay in the mapping in their ggml type (F32, F16, BF16 or a block type the engine
 * dequantises, ds_config.h); an expert is a ds_weight viewing its slice of the stacked tensor,
 * so it stays a placeable unit. Only kv_b of the split layout is rebuilt at load, because the
 * engine reads it as HF's [H*(dn+dv), C] (per head dn rows of W_UK, then dv rows of W_UV):
 * W_UK[h] is k_b[h] transposed. The rebuilt tensor keeps the element type when k_b and v_b
 * share F32/F16/BF16 (a transpose is exact) and is float32 otherwise (the dequantised values,
 * also exact). The converter does not permute q or k: rope pairs stay adjacent, as in HF. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ds_gguf.h"
#include "model_impl.h"

bool ds_model_path_is_gguf(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    char magic[4];
    ssize_t n = read(fd, magic, sizeof(magic));
    close(fd);
    return n == 4 && !memcmp(magic, "GGUF", 4);
}

/* The tensor `name`, recorded as read by a bound unit (ds_model_gguf_tensors_used). */
static const ds_gguf_tensor *g_find(ds_model *m, const char *name, ds_error *err)
{
    const ds_gguf_tensor *t = ds_gguf_tensor_find(m->gg, name);
    if (!t) {
        ds_error_set(err, -ENOENT, "%s: missing tensor '%s'", m->dir, name);
        return NULL;
    }
    if (m->n_gused == m->cap_gused) {
        size_t cap = m->cap_gused ? m->cap_gused * 2 : 256;
        const ds_gguf_tensor **u = realloc(m->gused, cap * sizeof(*u));
        if (!u) {
            ds_error_set(err, -ENOMEM, "out of memory");
            return NULL;
        }
        m->gused = u;
        m->cap_gused = cap;
    }
    m->gused[m->n_gused++] = t;
    return t;
}

/* The engine dtype of t, or an error naming the tensor and its type. */
static int g_dtype(const ds_gguf_tensor *t, enum ds_dtype *dt, ds_error *err)
{
    int d = ds_dtype_from_quant_type(t->type);
    if (d < 0 || !ds_quant_can_dequant(t->type))
        return ds_error_set(err, -ENOTSUP, "%s: tensor '%s' has type %s, not supported", t->file,
                            t->name, ds_quant_type_name(t->type));
    *dt = (enum ds_dtype)d;
    return 0;
}

static int g_shape_err(const ds_gguf_tensor *t, const char *want, ds_error *err)
{
    return ds_error_set(
        err, -EBADMSG, "%s: tensor '%s' has ne {%llu, %llu, %llu} (%u dims), the config needs %s",
        t->file, t->name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
        (unsigned long long)t->ne[2], t->n_dims, want);
}

/* A float32 copy of a 1-D tensor of len values (any type with a dequantiser). */
static int g_vec(ds_model *m, const char *name, uint32_t len, const float **out, ds_error *err)
{
    const ds_gguf_tensor *t = g_find(m, name, err);
    if (!t)
        return -ENOENT;
    if (t->n_elements != len || t->ne[0] != len) {
        char want[32];
        snprintf(want, sizeof(want), "{%u}", len);
        return g_shape_err(t, want, err);
    }
    if (!ds_quant_can_dequant(t->type))
        return ds_error_set(err, -ENOTSUP, "%s: tensor '%s' has type %s, not supported", t->file,
                            name, ds_quant_type_name(t->type));
    float *v = malloc((size_t)len * sizeof(float) + 1);
    int rc = ds_model_own(m, v);
    if (rc < 0)
        return rc;
    if ((rc = ds_quant_dequant_row(t->type, t->data, len, v)) < 0)
        return ds_error_set(err, rc, "%s: tensor '%s': cannot dequantise", t->file, name);
    *out = v;
    return 0;
}

/* w = matrix `index` of t (ne {cols, rows, n}), i.e. rows [index*rows, (index+1)*rows). */
static int g_view(const ds_gguf_tensor *t, enum ds_dtype dt, uint32_t rows, uint32_t cols,
                  uint32_t index, ds_weight *w, ds_error *err)
{
    uint64_t rb;
    int rc = ds_quant_row_bytes(t->type, cols, &rb);
    if (rc < 0)
        return ds_error_set(err, -EBADMSG,
                            "%s: tensor '%s': rows of %u %s values are not whole "
                            "blocks",
                            t->file, t->name, cols, ds_quant_type_name(t->type));
    memset(w, 0, sizeof(*w));
    w->dtype = dt;
    w->rows = rows;
    w->cols = cols;
    w->data = (const uint8_t *)t->data + (size_t)index * rows * rb;
    return 0;
}

static int g_weight(ds_model *m, const char *name, uint32_t rows, uint32_t cols, ds_weight *w,
                    ds_error *err)
{
    const ds_gguf_tensor *t = g_find(m, name, err);
    if (!t)
        return -ENOENT;
    if (t->ne[0] != cols || t->ne[1] != rows || t->ne[2] != 1 || t->ne[3] != 1) {
        char want[64];
        snprintf(want, sizeof(want), "{%u, %u} (HF [%u, %u])", cols, rows, rows, cols);
        return g_shape_err(t, want, err);
    }
    enum ds_dtype dt = DS_DTYPE_F32;
    int rc = g_dtype(t, &dt, err);
    return rc < 0 ? rc : g_view(t, dt, rows, cols, 0, w, err);
}

#define NAME(buf, ...) snprintf(buf, sizeof(buf), __VA_ARGS__)

static bool g_want(const ds_model_open_opts *o, enum ds_unit_kind k, uint32_t l, uint32_t e)
{
    return !o || !o->want || o->want(o->want_ctx, k, l, e);
}

static int g_ffn(ds_model *m, uint32_t l, const char *suffix, uint32_t inter, ds_ffn *f,
                 ds_error *err)
{
    char n[128];
    uint32_t d = m->cfg.hidden_size;
    int rc;
    NAME(n, "blk.%u.ffn_gate%s.weight", l, suffix);
    if ((rc = g_weight(m, n, inter, d, &f->gate, err)) < 0)
        return rc;
    NAME(n, "blk.%u.ffn_up%s.weight", l, suffix);
    if ((rc = g_weight(m, n, inter, d, &f->up, err)) < 0)
        return rc;
    NAME(n, "blk.%u.ffn_down%s.weight", l, suffix);
    if ((rc = g_weight(m, n, d, inter, &f->down, err)) < 0)
        return rc;
    f->bound = true;
    return 0;
}

/* One of the stacked expert tensors, checked once per layer: ne {cols, rows, E}. */
static int g_experts_tensor(ds_model *m, uint32_t l, const char *which, uint32_t rows,
                            uint32_t cols, const ds_gguf_tensor **t, enum ds_dtype *dt,
                            ds_error *err)
{
    char n[128];
    uint32_t e = m->cfg.n_routed_experts;
    NAME(n, "blk.%u.ffn_%s_exps.weight", l, which);
    if (!(*t = g_find(m, n, err)))
        return -ENOENT;
    if ((*t)->ne[0] != cols || (*t)->ne[1] != rows || (*t)->ne[2] != e || (*t)->ne[3] != 1) {
        char want[48];
        snprintf(want, sizeof(want), "{%u, %u, %u}", cols, rows, e);
        return g_shape_err(*t, want, err);
    }
    return g_dtype(*t, dt, err);
}

static int g_experts(ds_model *m, uint32_t l, const ds_model_open_opts *o, ds_error *err)
{
    const ds_model_config *c = &m->cfg;
    ds_layer *L = &m->layers[l];
    uint32_t d = c->hidden_size, fi = c->moe_intermediate_size;
    const ds_gguf_tensor *tg = NULL, *tu = NULL, *td = NULL;
    enum ds_dtype dg = DS_DTYPE_F32, du = DS_DTYPE_F32, dd = DS_DTYPE_F32;
    int rc;
    L->experts = calloc(c->n_routed_experts, sizeof(*L->experts));
    if (!L->experts)
        return -ENOMEM;
    bool any = false;
    for (uint32_t e = 0; e < c->n_routed_experts && !any; e++)
        any = g_want(o, DS_UNIT_EXPERT, l, e);
    if (!any)
        return 0;
    if ((rc = g_experts_tensor(m, l, "gate", fi, d, &tg, &dg, err)) < 0 ||
        (rc = g_experts_tensor(m, l, "up", fi, d, &tu, &du, err)) < 0 ||
        (rc = g_experts_tensor(m, l, "down", d, fi, &td, &dd, err)) < 0)
        return rc;
    for (uint32_t e = 0; e < c->n_routed_experts; e++) {
        if (!g_want(o, DS_UNIT_EXPERT, l, e))
            continue;
        ds_ffn *f = &L->experts[e];
        if ((rc = g_view(tg, dg, fi, d, e, &f->gate, err)) < 0 ||
            (rc = g_view(tu, du, fi, d, e, &f->up, err)) < 0 ||
            (rc = g_view(td, dd, d, fi, e, &f->down, err)) < 0)
            return rc;
        f->bound = true;
    }
    return 0;
}

/* kv_b [H*(dn+dv), C] from the split k_b {dn, C, H} and v_b {C, dv, H}: per head, dn rows
 * W_UK[h][j][c] = k_b[h][c][j], then the dv rows of v_b[h]. */
static int g_kv_b_split(ds_model *m, uint32_t l, ds_weight *w, ds_error *err)
{
    const ds_model_config *c = &m->cfg;
    uint32_t h = c->num_attention_heads, dn = c->qk_nope_head_dim, dv = c->v_head_dim;
    uint32_t C = c->kv_lora_rank;
    char nk[64], nv[64];
    NAME(nk, "blk.%u.attn_k_b.weight", l);
    NAME(nv, "blk.%u.attn_v_b.weight", l);
    const ds_gguf_tensor *tk = g_find(m, nk, err), *tv;
    if (!tk)
        return -ENOENT;
    if (!(tv = g_find(m, nv, err)))
        return -ENOENT;
    char want[48];
    if (tk->ne[0] != dn || tk->ne[1] != C || tk->ne[2] != h || tk->ne[3] != 1) {
        snprintf(want, sizeof(want), "{%u, %u, %u}", dn, C, h);
        return g_shape_err(tk, want, err);
    }
    if (tv->ne[0] != C || tv->ne[1] != dv || tv->ne[2] != h || tv->ne[3] != 1) {
        snprintf(want, sizeof(want), "{%u, %u, %u}", C, dv, h);
        return g_shape_err(tv, want, err);
    }
    enum ds_dtype dk = DS_DTYPE_F32, dvt = DS_DTYPE_F32;
    int rc;
    if ((rc = g_dtype(tk, &dk, err)) < 0 || (rc = g_dtype(tv, &dvt, err)) < 0)
        return rc;
    /* same plain type: move elements; otherwise float32 of the dequantised values */
    bool plain = dk == dvt && (dk == DS_DTYPE_F32 || dk == DS_DTYPE_F16 || dk == DS_DTYPE_BF16);
    enum ds_dtype dt = plain ? dk : DS_DTYPE_F32;
    size_t es = dt == DS_DTYPE_F32 ? 4 : 2;
    size_t rows = (size_t)h * (dn + dv);
    uint8_t *kv = malloc(rows * C * es + 1);
    if ((rc = ds_model_own(m, kv)) < 0)
        return rc;
    float *tmp = NULL;
    if (!plain && !(tmp = malloc(((size_t)C * dn > C ? (size_t)C * dn : C) * sizeof(float))))
        return -ENOMEM;
    uint64_t kb, vb; /* bytes per row of k_b (dn values) and v_b (C values) */
    if ((rc = ds_quant_row_bytes(tk->type, dn, &kb)) < 0 ||
        (rc = ds_quant_row_bytes(tv->type, C, &vb)) < 0) {
        free(tmp);
        return ds_error_set(err, -EBADMSG, "%s: '%s'/'%s' rows are not whole blocks", m->dir, nk,
                            nv);
    }
    for (uint32_t hh = 0; hh < h; hh++) {
        uint8_t *dst = kv + (size_t)hh * (dn + dv) * C * es;
        const uint8_t *ks = (const uint8_t *)tk->data + (size_t)hh * C * kb;
        const uint8_t *vs = (const uint8_t *)tv->data + (size_t)hh * dv * vb;
        if (plain) {
            for (uint32_t j = 0; j < dn; j++)
                for (uint32_t cc = 0; cc < C; cc++)
                    memcpy(dst + ((size_t)j * C + cc) * es, ks + ((size_t)cc * dn + j) * es, es);
            memcpy(dst + (size_t)dn * C * es, vs, (size_t)dv * C * es);
            continue;
        }
        for (uint32_t cc = 0; cc < C; cc++)
            ds_quant_dequant_row(tk->type, ks + (size_t)cc * kb, dn, tmp + (size_t)cc * dn);
        float *df = (float *)dst;
        for (uint32_t j = 0; j < dn; j++)
            for (uint32_t cc = 0; cc < C; cc++)
                df[(size_t)j * C + cc] = tmp[(size_t)cc * dn + j];
        for (uint32_t j = 0; j < dv; j++)
            ds_quant_dequant_row(tv->type, vs + (size_t)j * vb, C, df + (size_t)(dn + j) * C);
    }
    free(tmp);
    m->layers[l].kv_b_dequantised = !plain;
    memset(w, 0, sizeof(*w));
    w->dtype = dt;
    w->rows = (uint32_t)rows;
    w->cols = C;
    w->data = kv;
    return 0;
}

static int g_bind_layer(ds_model *m, uint32_t l, const ds_model_open_opts *o, ds_error *err)
{
    const ds_model_config *c = &m->cfg;
    ds_layer *L = &m->layers[l];
    char n[128];
    int rc;
    uint32_t d = c->hidden_size, h = c->num_attention_heads;
    uint32_t qk = c->qk_nope_head_dim + c->qk_rope_head_dim;
    L->moe = ds_model_config_layer_is_moe(c, l);
    if (g_want(o, DS_UNIT_ATTN, l, 0)) {
        NAME(n, "blk.%u.attn_norm.weight", l);
        if ((rc = g_vec(m, n, d, &L->attn_norm, err)) < 0)
            return rc;
        NAME(n, "blk.%u.ffn_norm.weight", l);
        if ((rc = g_vec(m, n, d, &L->ffn_norm, err)) < 0)
            return rc;
        if (c->q_lora_rank) {
            NAME(n, "blk.%u.attn_q_a.weight", l);
            if ((rc = g_weight(m, n, c->q_lora_rank, d, &L->q_a, err)) < 0)
                return rc;
            NAME(n, "blk.%u.attn_q_a_norm.weight", l);
            if ((rc = g_vec(m, n, c->q_lora_rank, &L->q_a_norm, err)) < 0)
                return rc;
            NAME(n, "blk.%u.attn_q_b.weight", l);
            if ((rc = g_weight(m, n, h * qk, c->q_lora_rank, &L->q_b, err)) < 0)
                return rc;
        } else {
            NAME(n, "blk.%u.attn_q.weight", l);
            if ((rc = g_weight(m, n, h * qk, d, &L->q_b, err)) < 0)
                return rc;
        }
        NAME(n, "blk.%u.attn_kv_a_mqa.weight", l);
        if ((rc = g_weight(m, n, c->kv_lora_rank + c->qk_rope_head_dim, d, &L->kv_a, err)) < 0)
            return rc;
        NAME(n, "blk.%u.attn_kv_a_norm.weight", l);
        if ((rc = g_vec(m, n, c->kv_lora_rank, &L->kv_a_norm, err)) < 0)
            return rc;
        NAME(n, "blk.%u.attn_kv_b.weight", l);
        if (ds_gguf_tensor_find(m->gg, n))
            rc = g_weight(m, n, h * (c->qk_nope_head_dim + c->v_head_dim), c->kv_lora_rank,
                          &L->kv_b, err);
        else
            rc = g_kv_b_split(m, l, &L->kv_b, err);
        if (rc < 0)
            return rc;
        NAME(n, "blk.%u.attn_output.weight", l);
        if ((rc = g_weight(m, n, d, h * c->v_head_dim, &L->o, err)) < 0)
            return rc;
        if (L->moe) {
            NAME(n, "blk.%u.ffn_gate_inp.weight", l);
            if ((rc = g_weight(m, n, c->n_routed_experts, d, &L->gate, err)) < 0)
                return rc;
            NAME(n, "blk.%u.exp_probs_b.bias", l);
            if (ds_gguf_tensor_find(m->gg, n) &&
                (rc = g_vec(m, n, c->n_routed_experts, &L->gate_bias, err)) < 0)
                return rc;
            if (!L->gate_bias && c->topk_method == DS_TOPK_NOAUX_TC)
                return ds_error_set(err, -ENOENT,
                                    "%s: missing tensor '%s' (sigmoid gating needs it)", m->dir, n);
        }
        L->attn_bound = true;
    }
    if (!L->moe) {
        if (g_want(o, DS_UNIT_DENSE, l, 0) &&
            (rc = g_ffn(m, l, "", c->intermediate_size, &L->dense, err)) < 0)
            return rc;
        return 0;
    }
    if (c->n_shared_experts && g_want(o, DS_UNIT_SHARED, l, 0) &&
        (rc = g_ffn(m, l, "_shexp", c->moe_intermediate_size * c->n_shared_experts, &L->shared,
                    err)) < 0)
        return rc;
    return g_experts(m, l, o, err);
}

int ds_model_open_gguf(ds_model *m, const ds_model_open_opts *opts, ds_error *err)
{
    int rc;
    if ((rc = ds_gguf_open_split(m->dir, &m->gg, err)) < 0 ||
        (rc = ds_model_config_from_gguf(m->gg, &m->cfg, err)) < 0)
        return rc;
    const ds_model_config *c = &m->cfg;
    m->cfg.tie_word_embeddings = !ds_gguf_tensor_find(m->gg, "output.weight");
    m->layers = calloc(c->num_hidden_layers, sizeof(*m->layers));
    if (!m->layers)
        return -ENOMEM;
    if (g_want(opts, DS_UNIT_EMBED, 0, 0)) {
        if ((rc = g_weight(m, "token_embd.weight", c->vocab_size, c->hidden_size, &m->embed, err)) <
            0)
            return rc;
        m->embed_bound = true;
    }
    if (g_want(opts, DS_UNIT_HEAD, 0, 0)) {
        if ((rc = g_vec(m, "output_norm.weight", c->hidden_size, &m->final_norm, err)) < 0)
            return rc;
        const char *hn = c->tie_word_embeddings ? "token_embd.weight" : "output.weight";
        if ((rc = g_weight(m, hn, c->vocab_size, c->hidden_size, &m->lm_head, err)) < 0)
            return rc;
        m->head_bound = true;
    }
    for (uint32_t l = 0; l < c->num_hidden_layers; l++)
        if ((rc = g_bind_layer(m, l, opts, err)) < 0)
            return rc;
    if ((rc = ds_rope_init(c, &m->rope)) < 0)
        return ds_error_set(err, rc, "%s: rope tables", m->dir);
    return 0;
}
