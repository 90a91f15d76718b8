/* model_bytes.c — what every unit of a model file weighs, read from its tensor table alone.
 *
 * Placement needs each unit's real bytes (a GGUF mixes Q4_K, Q6_K, Q8_0, F32 ... tensor by
 * tensor, and an HF checkpoint may keep some weights in BF16 beside FP8 ones), but must not read
 * weights to plan: this file opens only the headers (the GGUF header and tensor infos, or the
 * safetensors JSON headers; the mappings are lazy, so no weight page is touched) and adds up,
 * per unit, the bytes of the tensors the loader binds for it (model.c, model_gguf.c) as the
 * loader holds them:
 *
 *   - a matrix is a view into the mapping: its bytes in the file (FP8: + its F32 block scales);
 *   - a vector (norm, router bias) is converted to float32 at load: 4 bytes per value;
 *   - the split attn_k_b / attn_v_b of a GGUF become one kv_b at load, in their type when both
 *     are F32/F16/BF16 and in float32 otherwise (model_gguf.c);
 *   - an expert of a stacked ffn_*_exps tensor is 1/E of it (a view of its slice);
 *   - with --quantize, a linear weight of F32/F16/BF16/F8 becomes Q8_0 or Q4_K blocks
 *     (ds_quantize_weight_type): its bytes are those blocks' (the FP8 scales are dropped).
 *
 * The tensor names are the loader's; a tensor the loader would need and the file lacks is an
 * error naming the file and the tensor, as at load. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ds_gguf.h"
#include "model_impl.h"

typedef struct mb {
    const char *path;
    ds_model_config *cfg;
    enum ds_quantize q;
    ds_gguf *gg; /* one of gg / st */
    ds_st *st;
    ds_error *err;
} mb;

#define NAME(buf, ...) snprintf(buf, sizeof(buf), __VA_ARGS__)

static int missing(const mb *b, const char *name)
{
    return ds_error_set(b->err, -ENOENT, "%s: missing tensor '%s'", b->path, name);
}

/* Bytes of a [rows, cols] linear weight now of element type `type` (a ggml id) as it will be
 * held: quantised at load when --quantize applies to it, else `file_bytes`. */
static uint64_t lin_held(const mb *b, uint32_t type, uint64_t rows, uint64_t cols,
                         uint64_t file_bytes)
{
    uint32_t qt;
    uint64_t rb;
    if (ds_quantize_weight_type(b->q, type, cols, &qt) && ds_quant_row_bytes(qt, cols, &rb) == 0)
        return rows * rb;
    return file_bytes;
}

/* ---- GGUF ---------------------------------------------------------------------------------- */

static int g_t(const mb *b, const char *name, const ds_gguf_tensor **t)
{
    *t = ds_gguf_tensor_find(b->gg, name);
    return *t ? 0 : missing(b, name);
}

/* A matrix {cols, rows} (or a slice of a stacked one: per = its count): its held bytes. */
static int g_mat(const mb *b, const char *name, bool quantizable, uint64_t *sum)
{
    const ds_gguf_tensor *t;
    int rc = g_t(b, name, &t);
    if (rc < 0)
        return rc;
    uint64_t cols = t->ne[0], rows = t->n_elements / cols;
    *sum += quantizable ? lin_held(b, t->type, rows, cols, t->nbytes) : t->nbytes;
    return 0;
}

static int g_vec(const mb *b, const char *name, bool optional, uint64_t *sum)
{
    const ds_gguf_tensor *t = ds_gguf_tensor_find(b->gg, name);
    if (!t)
        return optional ? 0 : missing(b, name);
    *sum += 4 * t->n_elements;
    return 0;
}

static int g_layer(const mb *b, uint32_t l, ds_unit_bytes *ub)
{
    const ds_model_config *c = b->cfg;
    char n[128];
    int rc;
    uint64_t *a = &ub->attn[l];
    static const char *const vecs[] = {"attn_norm", "ffn_norm", "attn_kv_a_norm"};
    for (int i = 0; i < 3; i++) {
        NAME(n, "blk.%u.%s.weight", l, vecs[i]);
        if ((rc = g_vec(b, n, false, a)) < 0)
            return rc;
    }
    static const char *const lora[] = {"attn_q_a", "attn_q_b"};
    for (int i = 0; i < (c->q_lora_rank ? 2 : 0); i++) {
        NAME(n, "blk.%u.%s.weight", l, lora[i]);
        if ((rc = g_mat(b, n, true, a)) < 0)
            return rc;
    }
    if (c->q_lora_rank) {
        NAME(n, "blk.%u.attn_q_a_norm.weight", l);
        rc = g_vec(b, n, false, a);
    } else {
        NAME(n, "blk.%u.attn_q.weight", l);
        rc = g_mat(b, n, true, a);
    }
    if (rc < 0)
        return rc;
    NAME(n, "blk.%u.attn_kv_a_mqa.weight", l);
    if ((rc = g_mat(b, n, true, a)) < 0)
        return rc;
    NAME(n, "blk.%u.attn_output.weight", l);
    if ((rc = g_mat(b, n, true, a)) < 0)
        return rc;
    NAME(n, "blk.%u.attn_kv_b.weight", l);
    if (ds_gguf_tensor_find(b->gg, n)) {
        if ((rc = g_mat(b, n, true, a)) < 0)
            return rc;
    } else { /* split k_b / v_b: rebuilt as one kv_b [H*(dn+dv), C] at load */
        const ds_gguf_tensor *tk, *tv;
        char nv[128];
        NAME(n, "blk.%u.attn_k_b.weight", l);
        NAME(nv, "blk.%u.attn_v_b.weight", l);
        if ((rc = g_t(b, n, &tk)) < 0 || (rc = g_t(b, nv, &tv)) < 0)
            return rc;
        bool plain =
            tk->type == tv->type &&
            (tk->type == DS_QUANT_F32 || tk->type == DS_QUANT_F16 || tk->type == DS_QUANT_BF16);
        uint64_t rows = (uint64_t)c->num_attention_heads * (c->qk_nope_head_dim + c->v_head_dim);
        uint64_t vals = rows * c->kv_lora_rank;
        if (plain)
            *a += lin_held(b, tk->type, rows, c->kv_lora_rank,
                           vals * (tk->type == DS_QUANT_F32 ? 4 : 2));
        else /* float32 of values dequantised once: not quantised a second time */
            *a += vals * 4;
    }
    if (!ds_model_config_layer_is_moe(c, l)) {
        static const char *const ffn[] = {"ffn_gate", "ffn_up", "ffn_down"};
        for (int i = 0; i < 3; i++) {
            NAME(n, "blk.%u.%s.weight", l, ffn[i]);
            if ((rc = g_mat(b, n, true, &ub->dense[l])) < 0)
                return rc;
        }
        return 0;
    }
    NAME(n, "blk.%u.ffn_gate_inp.weight", l);
    if ((rc = g_mat(b, n, false, &ub->router[l])) < 0)
        return rc;
    NAME(n, "blk.%u.exp_probs_b.bias", l);
    if ((rc = g_vec(b, n, true, &ub->router[l])) < 0)
        return rc;
    static const char *const sh[] = {"ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"};
    for (int i = 0; c->n_shared_experts && i < 3; i++) {
        NAME(n, "blk.%u.%s.weight", l, sh[i]);
        if ((rc = g_mat(b, n, true, &ub->shared[l])) < 0)
            return rc;
    }
    static const char *const ex[] = {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"};
    for (int i = 0; i < 3; i++) {
        const ds_gguf_tensor *t;
        NAME(n, "blk.%u.%s.weight", l, ex[i]);
        if ((rc = g_t(b, n, &t)) < 0)
            return rc;
        if (t->n_dims != 3 || t->ne[2] != c->n_routed_experts)
            return ds_error_set(
                b->err, -EBADMSG, "%s: tensor '%s' stacks %llu experts, the config has %u", t->file,
                n, (unsigned long long)(t->n_dims == 3 ? t->ne[2] : 1), c->n_routed_experts);
        uint64_t cols = t->ne[0], rows = t->ne[1];
        ub->expert[l] += lin_held(b, t->type, rows, cols, t->nbytes / t->ne[2]);
    }
    return 0;
}

static int g_all(const mb *b, ds_unit_bytes *ub)
{
    int rc = g_mat(b, "token_embd.weight", false, &ub->embed);
    if (rc < 0 || (rc = g_vec(b, "output_norm.weight", false, &ub->head)) < 0)
        return rc;
    if (ds_gguf_tensor_find(b->gg, "output.weight"))
        rc = g_mat(b, "output.weight", true, &ub->head);
    else /* tied: the embeddings, as they are */
        rc = g_mat(b, "token_embd.weight", false, &ub->head);
    for (uint32_t l = 0; rc == 0 && l < b->cfg->num_hidden_layers; l++)
        rc = g_layer(b, l, ub);
    return rc;
}

/* ---- HF safetensors ------------------------------------------------------------------------ */

static uint32_t st_type(enum ds_st_dtype dt)
{
    switch (dt) {
    case DS_ST_F32:
        return DS_QUANT_F32;
    case DS_ST_F16:
        return DS_QUANT_F16;
    case DS_ST_BF16:
        return DS_QUANT_BF16;
    default:
        return UINT32_MAX; /* F8 and the rest: no ggml id */
    }
}

/* A [rows, cols] weight (+ its FP8 block scales): held bytes. */
static int s_mat(const mb *b, const char *name, bool quantizable, uint64_t *sum)
{
    const ds_st_tensor *t = ds_st_find(b->st, name);
    if (!t)
        return missing(b, name);
    uint64_t file = t->nbytes;
    if (t->dtype == DS_ST_F8_E4M3) {
        char sn[512];
        if (snprintf(sn, sizeof(sn), "%s_scale_inv", name) >= (int)sizeof(sn))
            return ds_error_set(b->err, -ENAMETOOLONG, "tensor name too long: %s", name);
        const ds_st_tensor *s = ds_st_find(b->st, sn);
        if (!s)
            return missing(b, sn);
        file += s->nbytes;
    }
    if (t->ndim != 2)
        return ds_error_set(b->err, -EBADMSG, "%s: tensor '%s' has %u dims, expected 2", t->file,
                            name, t->ndim);
    uint32_t type = t->dtype == DS_ST_F8_E4M3 ? DS_QUANTIZE_SRC_F8 : st_type(t->dtype);
    *sum += quantizable ? lin_held(b, type, t->shape[0], t->shape[1], file) : file;
    return 0;
}

static int s_vec(const mb *b, const char *name, bool optional, uint64_t *sum)
{
    const ds_st_tensor *t = ds_st_find(b->st, name);
    if (!t)
        return optional ? 0 : missing(b, name);
    uint64_t n = 1;
    for (uint32_t d = 0; d < t->ndim; d++)
        n *= t->shape[d];
    *sum += 4 * n;
    return 0;
}

static int s_ffn(const mb *b, const char *prefix, uint64_t *sum)
{
    static const char *const w[] = {"gate_proj", "up_proj", "down_proj"};
    char n[256];
    int rc;
    for (int i = 0; i < 3; i++) {
        NAME(n, "%s.%s.weight", prefix, w[i]);
        if ((rc = s_mat(b, n, true, sum)) < 0)
            return rc;
    }
    return 0;
}

static int s_layer(const mb *b, uint32_t l, ds_unit_bytes *ub)
{
    const ds_model_config *c = b->cfg;
    char n[256];
    int rc;
    uint64_t *a = &ub->attn[l];
    static const char *const vecs[] = {"input_layernorm", "post_attention_layernorm",
                                       "self_attn.kv_a_layernorm"};
    for (int i = 0; i < 3; i++) {
        NAME(n, "model.layers.%u.%s.weight", l, vecs[i]);
        if ((rc = s_vec(b, n, false, a)) < 0)
            return rc;
    }
    static const char *const lin[] = {"q_a_proj",           "q_b_proj",  "q_proj",
                                      "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"};
    for (int i = 0; i < 6; i++) {
        if ((i < 2 && !c->q_lora_rank) || (i == 2 && c->q_lora_rank))
            continue;
        NAME(n, "model.layers.%u.self_attn.%s.weight", l, lin[i]);
        if ((rc = s_mat(b, n, true, a)) < 0)
            return rc;
    }
    if (c->q_lora_rank) {
        NAME(n, "model.layers.%u.self_attn.q_a_layernorm.weight", l);
        if ((rc = s_vec(b, n, false, a)) < 0)
            return rc;
    }
    if (!ds_model_config_layer_is_moe(c, l)) {
        NAME(n, "model.layers.%u.mlp", l);
        return s_ffn(b, n, &ub->dense[l]);
    }
    NAME(n, "model.layers.%u.mlp.gate.weight", l);
    if ((rc = s_mat(b, n, false, &ub->router[l])) < 0)
        return rc;
    NAME(n, "model.layers.%u.mlp.gate.e_score_correction_bias", l);
    if ((rc = s_vec(b, n, true, &ub->router[l])) < 0)
        return rc;
    if (c->n_shared_experts) {
        NAME(n, "model.layers.%u.mlp.shared_experts", l);
        if ((rc = s_ffn(b, n, &ub->shared[l])) < 0)
            return rc;
    }
    for (uint32_t e = 0; e < c->n_routed_experts; e++) {
        uint64_t one = 0;
        NAME(n, "model.layers.%u.mlp.experts.%u", l, e);
        if ((rc = s_ffn(b, n, &one)) < 0)
            return rc;
        if (one > ub->expert[l])
            ub->expert[l] = one;
    }
    return 0;
}

static int s_all(const mb *b, ds_unit_bytes *ub)
{
    int rc = s_mat(b, "model.embed_tokens.weight", false, &ub->embed);
    if (rc < 0 || (rc = s_vec(b, "model.norm.weight", false, &ub->head)) < 0)
        return rc;
    if (b->cfg->tie_word_embeddings && !ds_st_find(b->st, "lm_head.weight"))
        rc = s_mat(b, "model.embed_tokens.weight", false, &ub->head);
    else
        rc = s_mat(b, "lm_head.weight", true, &ub->head);
    for (uint32_t l = 0; rc == 0 && l < b->cfg->num_hidden_layers; l++)
        rc = s_layer(b, l, ub);
    return rc;
}

/* Whether DIR has safetensors to read headers from (a directory holding only config.json,
 * such as tests/data/configs/deepseek-v3, is planned from the config alone). */
static bool has_weights(const char *dir)
{
    static const char *const f[] = {"model.safetensors", "model.safetensors.index.json"};
    char p[4096];
    struct stat sb;
    for (int i = 0; i < 2; i++)
        if (snprintf(p, sizeof(p), "%s/%s", dir, f[i]) < (int)sizeof(p) && stat(p, &sb) == 0)
            return true;
    return false;
}

int ds_model_unit_bytes(const char *path, enum ds_quantize q, ds_model_config *cfg,
                        ds_unit_bytes *ub, ds_error *err)
{
    memset(ub, 0, sizeof(*ub));
    mb b = {.path = path, .cfg = cfg, .q = q, .err = err};
    struct stat sb;
    char cpath[4096];
    int rc;
    bool dir = stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
    if (!dir && ds_model_path_is_gguf(path)) {
        if ((rc = ds_gguf_open_split(path, &b.gg, err)) < 0 ||
            (rc = ds_model_config_from_gguf(b.gg, cfg, err)) < 0)
            goto out;
        cfg->tie_word_embeddings = !ds_gguf_tensor_find(b.gg, "output.weight");
    } else {
        if (snprintf(cpath, sizeof(cpath), dir ? "%s/config.json" : "%s", path) >=
            (int)sizeof(cpath)) {
            rc = ds_error_set(err, -ENAMETOOLONG, "%s: path too long", path);
            goto out;
        }
        if ((rc = ds_model_config_load(cpath, cfg, err)) < 0)
            goto out;
        if (!dir || !has_weights(path)) /* a bare config.json: no tensor table to count */
            goto out;
        if ((rc = ds_st_open_dir(path, &b.st, err)) < 0)
            goto out;
    }
    if ((rc = ds_unit_bytes_init(ub, cfg->num_hidden_layers)) < 0) {
        ds_error_set(err, rc, "out of memory");
        goto out;
    }
    rc = b.gg ? g_all(&b, ub) : s_all(&b, ub);
    if (rc < 0)
        ds_unit_bytes_release(ub);
out:
    ds_gguf_free(b.gg);
    ds_st_free(b.st);
    return rc;
}
