/* config.c — config.json of DeepSeek-V2/V3 checkpoints into ds_model_config.
 *
 * Every integer field is range-checked against a limit well above any released model, so a
 * hostile file cannot make later stages allocate unbounded memory; cross-field consistency
 * (groups divide experts, top-k fits, head dims even for rope) is checked last. Both spellings
 * newer writers use are accepted: rope_scaling / rope_parameters, torch_dtype / dtype.
 * ds_model_config_from_gguf maps the `deepseek2.*` metadata of a llama.cpp GGUF file onto the
 * same struct, with the same limits and the same final consistency check. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds_config.h"
#include "ds_gguf.h"

#define CFG_MAX_VOCAB        (1u << 22)
#define CFG_MAX_DIM          (1u << 17)
#define CFG_MAX_LAYERS       1024u
#define CFG_MAX_HEADS        4096u
#define CFG_MAX_EXPERTS      65536u
#define CFG_MAX_CONFIG_BYTES (16u << 20)

/* Reads an optional unsigned field; null counts as "absent" (q_lora_rank: null in V2-Lite). */
static int cfg_u32(json_t *root, const char *key, uint32_t def, uint32_t lo, uint32_t hi,
                   uint32_t *out, ds_error *err)
{
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return 0;
    }
    double d;
    if (json_is_integer(v))
        d = (double)json_integer_value(v);
    else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)))
        d = json_real_value(v);
    else
        return ds_error_set(err, -EBADMSG, "config field '%s' is not an integer", key);
    if (d < lo || d > hi)
        return ds_error_set(err, -ERANGE, "config field '%s' = %.0f is outside [%u, %u]", key, d,
                            lo, hi);
    *out = (uint32_t)d;
    return 0;
}

static int cfg_f64(json_t *root, const char *key, double def, double lo, double hi, double *out,
                   ds_error *err)
{
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return 0;
    }
    if (!json_is_number(v))
        return ds_error_set(err, -EBADMSG, "config field '%s' is not a number", key);
    double d = json_number_value(v);
    if (!(d >= lo && d <= hi))
        return ds_error_set(err, -ERANGE, "config field '%s' = %g is outside [%g, %g]", key, d, lo,
                            hi);
    *out = d;
    return 0;
}

static int cfg_bool(json_t *root, const char *key, bool def, bool *out, ds_error *err)
{
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return 0;
    }
    if (!json_is_boolean(v))
        return ds_error_set(err, -EBADMSG, "config field '%s' is not a boolean", key);
    *out = json_is_true(v);
    return 0;
}

/* Returns the string value of key, NULL when absent/null; -EBADMSG via *rc on a wrong type. */
static const char *cfg_str(json_t *root, const char *key, int *rc, ds_error *err)
{
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v))
        return NULL;
    if (!json_is_string(v)) {
        *rc = ds_error_set(err, -EBADMSG, "config field '%s' is not a string", key);
        return NULL;
    }
    return json_string_value(v);
}

/* bos/eos may be an int, null, or (rarely) a list; we keep the first. */
static int cfg_token_id(json_t *root, const char *key, uint32_t vocab, int32_t *out, ds_error *err)
{
    json_t *v = json_object_get(root, key);
    *out = -1;
    if (!v || json_is_null(v))
        return 0;
    if (json_is_array(v))
        v = json_array_size(v) ? json_array_get(v, 0) : NULL;
    if (!v)
        return 0;
    if (!json_is_integer(v))
        return ds_error_set(err, -EBADMSG, "config field '%s' is not a token id", key);
    json_int_t id = json_integer_value(v);
    if (id < 0 || (uint64_t)id >= vocab)
        return ds_error_set(err, -ERANGE, "config field '%s' = %lld is outside the vocabulary", key,
                            (long long)id);
    *out = (int32_t)id;
    return 0;
}

static int cfg_rope(json_t *root, ds_model_config *c, ds_error *err)
{
    int rc;
    ds_rope_config *r = &c->rope;
    json_t *rs = json_object_get(root, "rope_scaling");
    if (!rs || json_is_null(rs))
        rs = json_object_get(root, "rope_parameters");
    if (rs && !json_is_null(rs) && !json_is_object(rs))
        return ds_error_set(err, -EBADMSG, "config field 'rope_scaling' is not an object");
    if (rs && json_is_null(rs))
        rs = NULL;

    /* rope_theta lives at top level (classic) or inside rope_parameters (transformers 5). */
    double theta_top = NAN;
    if ((rc = cfg_f64(root, "rope_theta", NAN, 1.0, 1e12, &theta_top, err)) < 0)
        return rc;
    if (isnan(theta_top) && rs) {
        if ((rc = cfg_f64(rs, "rope_theta", NAN, 1.0, 1e12, &theta_top, err)) < 0)
            return rc;
    }
    r->theta = isnan(theta_top) ? 10000.0 : theta_top;
    r->yarn = false;
    r->factor = 1.0;
    r->original_max_position_embeddings = c->max_position_embeddings;
    r->beta_fast = 32.0;
    r->beta_slow = 1.0;
    r->mscale = 1.0;
    r->mscale_all_dim = 0.0;
    if (!rs)
        return 0;

    rc = 0;
    const char *type = cfg_str(rs, "type", &rc, err);
    if (rc < 0)
        return rc;
    if (!type)
        type = cfg_str(rs, "rope_type", &rc, err);
    if (rc < 0)
        return rc;
    if (!type || !strcmp(type, "default"))
        return 0;
    if (strcmp(type, "yarn") != 0)
        return ds_error_set(err, -EINVAL,
                            "config field 'rope_scaling.type' = '%s' is not "
                            "supported (only yarn or default)",
                            type);
    r->yarn = true;
    if ((rc = cfg_f64(rs, "factor", 1.0, 1.0, 1e6, &r->factor, err)) < 0 ||
        (rc = cfg_u32(rs, "original_max_position_embeddings", c->max_position_embeddings, 1,
                      1u << 30, &r->original_max_position_embeddings, err)) < 0 ||
        (rc = cfg_f64(rs, "beta_fast", 32.0, 1e-6, 1e6, &r->beta_fast, err)) < 0 ||
        (rc = cfg_f64(rs, "beta_slow", 1.0, 1e-6, 1e6, &r->beta_slow, err)) < 0 ||
        (rc = cfg_f64(rs, "mscale", 1.0, 0.0, 1e3, &r->mscale, err)) < 0 ||
        (rc = cfg_f64(rs, "mscale_all_dim", 0.0, 0.0, 1e3, &r->mscale_all_dim, err)) < 0) {
        ds_error_prefix(err, "rope_scaling");
        return rc;
    }
    return 0;
}

static int cfg_arch(json_t *root, ds_model_config *c, ds_error *err)
{
    int rc = 0;
    json_t *archs = json_object_get(root, "architectures");
    if (archs && json_is_array(archs)) {
        size_t i;
        json_t *a;
        json_array_foreach(archs, i, a)
        {
            const char *s = json_string_value(a);
            if (!s)
                continue;
            if (!strcmp(s, "DeepseekV3ForCausalLM")) {
                c->arch = DS_ARCH_DEEPSEEK_V3;
                return 0;
            }
            if (!strcmp(s, "DeepseekV2ForCausalLM")) {
                c->arch = DS_ARCH_DEEPSEEK_V2;
                return 0;
            }
        }
    }
    const char *mt = cfg_str(root, "model_type", &rc, err);
    if (rc < 0)
        return rc;
    if (mt && !strcmp(mt, "deepseek_v3")) {
        c->arch = DS_ARCH_DEEPSEEK_V3;
        return 0;
    }
    if (mt && !strcmp(mt, "deepseek_v2")) {
        c->arch = DS_ARCH_DEEPSEEK_V2;
        return 0;
    }
    return ds_error_set(err, -EINVAL,
                        "config: neither 'architectures' nor 'model_type' names "
                        "DeepseekV2ForCausalLM / DeepseekV3ForCausalLM");
}

static int cfg_dtype(json_t *root, ds_model_config *c, ds_error *err)
{
    int rc = 0;
    c->dtype = DS_DTYPE_BF16;
    c->fp8_block_rows = c->fp8_block_cols = 128;
    const char *dt = cfg_str(root, "torch_dtype", &rc, err);
    if (rc < 0)
        return rc;
    if (!dt)
        dt = cfg_str(root, "dtype", &rc, err);
    if (rc < 0)
        return rc;
    if (dt) {
        if (!strcmp(dt, "float32"))
            c->dtype = DS_DTYPE_F32;
        else if (!strcmp(dt, "float16"))
            c->dtype = DS_DTYPE_F16;
        else if (!strcmp(dt, "bfloat16"))
            c->dtype = DS_DTYPE_BF16;
        else
            return ds_error_set(err, -EINVAL, "config field 'torch_dtype' = '%s' unsupported", dt);
    }
    json_t *q = json_object_get(root, "quantization_config");
    if (!q || json_is_null(q))
        return 0;
    if (!json_is_object(q))
        return ds_error_set(err, -EBADMSG, "config field 'quantization_config' is not an object");
    const char *fmt = cfg_str(q, "fmt", &rc, err);
    if (rc < 0)
        return rc;
    const char *method = cfg_str(q, "quant_method", &rc, err);
    if (rc < 0)
        return rc;
    if ((fmt && strcmp(fmt, "e4m3") != 0) || (method && strcmp(method, "fp8") != 0))
        return ds_error_set(err, -EINVAL,
                            "config: quantization_config (fmt '%s', method '%s') "
                            "unsupported; only fp8 e4m3",
                            fmt ? fmt : "-", method ? method : "-");
    c->dtype = DS_DTYPE_F8_E4M3;
    json_t *bs = json_object_get(q, "weight_block_size");
    if (bs && !json_is_null(bs)) {
        if (!json_is_array(bs) || json_array_size(bs) != 2 ||
            !json_is_integer(json_array_get(bs, 0)) || !json_is_integer(json_array_get(bs, 1)))
            return ds_error_set(err, -EBADMSG,
                                "config field 'quantization_config.weight_block_size' is not "
                                "[rows, cols]");
        json_int_t br = json_integer_value(json_array_get(bs, 0));
        json_int_t bc = json_integer_value(json_array_get(bs, 1));
        if (br < 1 || br > 65536 || bc < 1 || bc > 65536)
            return ds_error_set(err, -ERANGE,
                                "config field 'quantization_config.weight_block_size' out of "
                                "range [1, 65536]");
        c->fp8_block_rows = (uint32_t)br;
        c->fp8_block_cols = (uint32_t)bc;
    }
    return 0;
}

static int cfg_routing(json_t *root, ds_model_config *c, ds_error *err)
{
    int rc = 0;
    const char *sf = cfg_str(root, "scoring_func", &rc, err);
    if (rc < 0)
        return rc;
    const char *tm = cfg_str(root, "topk_method", &rc, err);
    if (rc < 0)
        return rc;
    bool v3 = c->arch == DS_ARCH_DEEPSEEK_V3;
    if (!sf)
        sf = v3 ? "sigmoid" : "softmax";
    if (!tm)
        tm = v3 ? "noaux_tc" : "greedy";
    if (!strcmp(sf, "sigmoid"))
        c->scoring_func = DS_SCORING_SIGMOID;
    else if (!strcmp(sf, "softmax"))
        c->scoring_func = DS_SCORING_SOFTMAX;
    else
        return ds_error_set(err, -EINVAL, "config field 'scoring_func' = '%s' unsupported", sf);
    /* "gready" is a misspelling shipped in some V2 configs. */
    if (!strcmp(tm, "greedy") || !strcmp(tm, "gready"))
        c->topk_method = DS_TOPK_GREEDY;
    else if (!strcmp(tm, "group_limited_greedy"))
        c->topk_method = DS_TOPK_GROUP_LIMITED_GREEDY;
    else if (!strcmp(tm, "noaux_tc"))
        c->topk_method = DS_TOPK_NOAUX_TC;
    else
        return ds_error_set(err, -EINVAL, "config field 'topk_method' = '%s' unsupported", tm);
    return 0;
}

static int cfg_check(ds_model_config *c, ds_error *err)
{
    if (c->n_routed_experts) {
        if (c->num_experts_per_tok < 1 || c->num_experts_per_tok > c->n_routed_experts)
            return ds_error_set(err, -EINVAL,
                                "config: num_experts_per_tok %u must be in [1, "
                                "n_routed_experts %u]",
                                c->num_experts_per_tok, c->n_routed_experts);
        if (c->n_routed_experts % c->n_group)
            return ds_error_set(err, -EINVAL,
                                "config: n_routed_experts %u is not divisible by "
                                "n_group %u",
                                c->n_routed_experts, c->n_group);
        if (c->topk_group < 1 || c->topk_group > c->n_group)
            return ds_error_set(err, -EINVAL, "config: topk_group %u must be in [1, n_group %u]",
                                c->topk_group, c->n_group);
        if (c->topk_method == DS_TOPK_NOAUX_TC && c->n_group > 1 &&
            c->n_routed_experts / c->n_group < 2)
            return ds_error_set(err, -EINVAL, "config: noaux_tc needs >= 2 experts per group");
        if ((uint64_t)c->topk_group * (c->n_routed_experts / c->n_group) < c->num_experts_per_tok)
            return ds_error_set(err, -EINVAL,
                                "config: topk_group %u groups hold fewer than "
                                "num_experts_per_tok %u experts",
                                c->topk_group, c->num_experts_per_tok);
        if (c->moe_intermediate_size < 1)
            return ds_error_set(err, -EINVAL, "config: moe_intermediate_size must be > 0");
    }
    if (c->qk_rope_head_dim % 2)
        return ds_error_set(err, -EINVAL, "config: qk_rope_head_dim %u must be even",
                            c->qk_rope_head_dim);
    if (c->qk_nope_head_dim + c->qk_rope_head_dim == 0)
        return ds_error_set(err, -EINVAL, "config: qk head dim is 0");
    if (c->first_k_dense_replace > 0 || c->n_routed_experts == 0) {
        if (c->intermediate_size < 1)
            return ds_error_set(err, -EINVAL, "config: intermediate_size must be > 0");
    }
    if (c->rope.yarn && c->rope.original_max_position_embeddings < 1)
        return ds_error_set(err, -EINVAL, "config: yarn needs original_max_position_embeddings");
    return 0;
}

int ds_model_config_parse(const char *json_text, size_t len, ds_model_config *out, ds_error *err)
{
    if (!json_text || !out)
        return ds_error_set(err, -EINVAL, "config: NULL argument");
    if (len > CFG_MAX_CONFIG_BYTES)
        return ds_error_set(err, -ERANGE, "config: %zu bytes is larger than the %u limit", len,
                            CFG_MAX_CONFIG_BYTES);
    json_error_t jerr;
    json_t *root = json_loadb(json_text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return ds_error_set(err, -EBADMSG, "config: bad JSON at line %d column %d: %s", jerr.line,
                            jerr.column, jerr.text);
    ds_model_config c;
    memset(&c, 0, sizeof(c));
    int rc = -EBADMSG;
    if (!json_is_object(root)) {
        rc = ds_error_set(err, -EBADMSG, "config: top level is not an object");
        goto free_root;
    }
    if ((rc = cfg_arch(root, &c, err)) < 0)
        goto free_root;
    bool v3 = c.arch == DS_ARCH_DEEPSEEK_V3;
    uint32_t n_group = 1, topk_group = 1;
    if ((rc = cfg_u32(root, "vocab_size", 0, 1, CFG_MAX_VOCAB, &c.vocab_size, err)) < 0 ||
        (rc = cfg_u32(root, "hidden_size", 0, 1, CFG_MAX_DIM, &c.hidden_size, err)) < 0 ||
        (rc = cfg_u32(root, "intermediate_size", 0, 0, CFG_MAX_DIM * 4, &c.intermediate_size,
                      err)) < 0 ||
        (rc = cfg_u32(root, "moe_intermediate_size", 0, 0, CFG_MAX_DIM, &c.moe_intermediate_size,
                      err)) < 0 ||
        (rc = cfg_u32(root, "num_hidden_layers", 0, 1, CFG_MAX_LAYERS, &c.num_hidden_layers, err)) <
            0 ||
        (rc = cfg_u32(root, "num_attention_heads", 0, 1, CFG_MAX_HEADS, &c.num_attention_heads,
                      err)) < 0 ||
        (rc = cfg_u32(root, "q_lora_rank", 0, 0, CFG_MAX_DIM, &c.q_lora_rank, err)) < 0 ||
        (rc = cfg_u32(root, "kv_lora_rank", 0, 1, CFG_MAX_DIM, &c.kv_lora_rank, err)) < 0 ||
        (rc = cfg_u32(root, "qk_nope_head_dim", 0, 0, 4096, &c.qk_nope_head_dim, err)) < 0 ||
        (rc = cfg_u32(root, "qk_rope_head_dim", 0, 0, 4096, &c.qk_rope_head_dim, err)) < 0 ||
        (rc = cfg_u32(root, "v_head_dim", 0, 1, 4096, &c.v_head_dim, err)) < 0 ||
        (rc = cfg_u32(root, "n_routed_experts", 0, 0, CFG_MAX_EXPERTS, &c.n_routed_experts, err)) <
            0 ||
        (rc = cfg_u32(root, "n_shared_experts", 0, 0, 1024, &c.n_shared_experts, err)) < 0 ||
        (rc = cfg_u32(root, "num_experts_per_tok", 0, 0, CFG_MAX_EXPERTS, &c.num_experts_per_tok,
                      err)) < 0 ||
        (rc = cfg_u32(root, "n_group", 1, 1, CFG_MAX_EXPERTS, &n_group, err)) < 0 ||
        (rc = cfg_u32(root, "topk_group", 1, 1, CFG_MAX_EXPERTS, &topk_group, err)) < 0 ||
        (rc = cfg_u32(root, "first_k_dense_replace", 0, 0, CFG_MAX_LAYERS, &c.first_k_dense_replace,
                      err)) < 0 ||
        (rc = cfg_u32(root, "moe_layer_freq", 1, 1, CFG_MAX_LAYERS, &c.moe_layer_freq, err)) < 0 ||
        (rc = cfg_bool(root, "norm_topk_prob", v3, &c.norm_topk_prob, err)) < 0 ||
        (rc = cfg_f64(root, "routed_scaling_factor", v3 ? 2.5 : 1.0, 0.0, 1e6,
                      &c.routed_scaling_factor, err)) < 0 ||
        (rc = cfg_f64(root, "rms_norm_eps", 1e-6, 0.0, 1.0, &c.rms_norm_eps, err)) < 0 ||
        (rc = cfg_u32(root, "max_position_embeddings", 4096, 1, 1u << 30,
                      &c.max_position_embeddings, err)) < 0 ||
        (rc = cfg_u32(root, "num_nextn_predict_layers", 0, 0, 64, &c.num_nextn_predict_layers,
                      err)) < 0 ||
        (rc = cfg_bool(root, "tie_word_embeddings", false, &c.tie_word_embeddings, err)) < 0)
        goto free_root;
    c.n_group = n_group;
    c.topk_group = topk_group;
    if ((rc = cfg_token_id(root, "bos_token_id", c.vocab_size, &c.bos_token_id, err)) < 0 ||
        (rc = cfg_token_id(root, "eos_token_id", c.vocab_size, &c.eos_token_id, err)) < 0 ||
        (rc = cfg_routing(root, &c, err)) < 0 || (rc = cfg_rope(root, &c, err)) < 0 ||
        (rc = cfg_dtype(root, &c, err)) < 0 || (rc = cfg_check(&c, err)) < 0)
        goto free_root;
    *out = c;
    rc = 0;
free_root:
    json_decref(root);
    return rc;
}

int ds_model_config_load(const char *path, ds_model_config *out, ds_error *err)
{
    FILE *f = fopen(path, "rbe");
    if (!f)
        return ds_error_set(err, -errno, "%s: cannot open: %s", path, strerror(errno));
    char *buf = malloc(CFG_MAX_CONFIG_BYTES + 1);
    if (!buf) {
        fclose(f);
        return ds_error_set(err, -ENOMEM, "%s: out of memory", path);
    }
    size_t n = fread(buf, 1, CFG_MAX_CONFIG_BYTES + 1, f);
    int rd_err = ferror(f);
    fclose(f);
    int rc;
    if (rd_err)
        rc = ds_error_set(err, -EIO, "%s: read error", path);
    else if (n > CFG_MAX_CONFIG_BYTES)
        rc = ds_error_set(err, -ERANGE, "%s: larger than %u bytes", path, CFG_MAX_CONFIG_BYTES);
    else {
        rc = ds_model_config_parse(buf, n, out, err);
        if (rc < 0)
            ds_error_prefix(err, "%s", path);
    }
    free(buf);
    return rc;
}

bool ds_model_config_layer_is_moe(const ds_model_config *c, uint32_t l)
{
    return c->n_routed_experts > 0 && l >= c->first_k_dense_replace && l % c->moe_layer_freq == 0;
}

/* ---- GGUF (llama.cpp's deepseek2 architecture) ---------------------------------------------
 * Keys as convert_hf_to_gguf.py writes them (gguf-py constants.py, conversion/deepseek.py):
 * "deepseek2." + the suffixes below. The MLA-absorbed layout writes key_length = kv_lora_rank +
 * rope and value_length = kv_lora_rank, and the real head dims under key_length_mla /
 * value_length_mla; older files (with attn_kv_b) have only key_length / value_length = the real
 * head dims. */

typedef struct gcfg {
    const ds_gguf *g;
    const char *file;
    char key[128];
} gcfg;

static const ds_gguf_kv *gk(gcfg *c, const char *suffix)
{
    snprintf(c->key, sizeof(c->key), "deepseek2.%s", suffix);
    return ds_gguf_kv_find(c->g, c->key);
}

static int g_u32(gcfg *c, const char *suffix, bool required, uint32_t def, uint32_t lo, uint32_t hi,
                 uint32_t *out, ds_error *err)
{
    const ds_gguf_kv *kv = gk(c, suffix);
    if (!kv) {
        if (required)
            return ds_error_set(err, -ENOENT, "%s: key '%s' missing", c->file, c->key);
        *out = def;
        return 0;
    }
    uint32_t v;
    int rc = ds_gguf_kv_u32(kv, &v, err);
    if (rc < 0)
        return rc;
    if (v < lo || v > hi)
        return ds_error_set(err, -ERANGE, "%s: key '%s' = %u is outside [%u, %u]", c->file, c->key,
                            v, lo, hi);
    *out = v;
    return 0;
}

/* A float key as the double the converter meant: the file stores float32 (rms eps 1e-6 becomes
 * 9.99999997e-07); when the shortest decimal of 7 digits rounds back to the same float32, that
 * decimal is used, so a GGUF gives the same config values as the config.json it came from. */
static int g_f64(gcfg *c, const char *suffix, double def, double lo, double hi, double *out,
                 ds_error *err)
{
    const ds_gguf_kv *kv = gk(c, suffix);
    if (!kv) {
        *out = def;
        return 0;
    }
    float f;
    int rc = ds_gguf_kv_f32(kv, &f, err);
    if (rc < 0)
        return rc;
    char buf[32];
    snprintf(buf, sizeof(buf), "%.7g", (double)f);
    double d = strtod(buf, NULL);
    if ((float)d != f)
        d = f;
    if (!(d >= lo && d <= hi))
        return ds_error_set(err, -ERANGE, "%s: key '%s' = %g is outside [%g, %g]", c->file, c->key,
                            d, lo, hi);
    *out = d;
    return 0;
}

static int g_bool(gcfg *c, const char *suffix, bool def, bool *out, ds_error *err)
{
    const ds_gguf_kv *kv = gk(c, suffix);
    if (!kv) {
        *out = def;
        return 0;
    }
    return ds_gguf_kv_bool(kv, out, err);
}

static int g_token_id(const ds_gguf *g, const char *file, const char *key, uint32_t vocab,
                      int32_t *out, ds_error *err)
{
    *out = -1;
    const ds_gguf_kv *kv = ds_gguf_kv_find(g, key);
    if (!kv)
        return 0;
    uint32_t v;
    int rc = ds_gguf_kv_u32(kv, &v, err);
    if (rc < 0)
        return rc;
    if (v >= vocab)
        return ds_error_set(err, -ERANGE, "%s: key '%s' = %u is outside the vocabulary (%u)", file,
                            key, v, vocab);
    *out = (int32_t)v;
    return 0;
}

static int g_rope(gcfg *c, ds_model_config *m, ds_error *err)
{
    ds_rope_config *r = &m->rope;
    int rc;
    if ((rc = g_f64(c, "rope.freq_base", 10000.0, 1e-3, 1e12, &r->theta, err)) < 0)
        return rc;
    r->factor = 1.0;
    r->beta_fast = 32.0;
    r->beta_slow = 1.0;
    r->mscale = 1.0;
    r->mscale_all_dim = 0.0;
    const ds_gguf_kv *kv = gk(c, "rope.scaling.type");
    if (!kv)
        return 0;
    ds_gguf_str t;
    if ((rc = ds_gguf_kv_str(kv, &t, err)) < 0)
        return rc;
    if (t.len == 4 && !memcmp(t.ptr, "none", 4))
        return 0;
    if (t.len != 4 || memcmp(t.ptr, "yarn", 4))
        return ds_error_set(err, -EINVAL, "%s: key '%s' = '%.*s' unsupported (yarn or none)",
                            c->file, c->key, (int)(t.len > 64 ? 64 : t.len), t.ptr);
    r->yarn = true;
    double log_mul;
    if ((rc = g_f64(c, "rope.scaling.factor", 1.0, 1e-6, 1e6, &r->factor, err)) < 0 ||
        (rc = g_u32(c, "rope.scaling.original_context_length", true, 0, 1, 1u << 30,
                    &r->original_max_position_embeddings, err)) < 0 ||
        (rc = g_f64(c, "rope.scaling.yarn_beta_fast", 32.0, -1e6, 1e6, &r->beta_fast, err)) < 0 ||
        (rc = g_f64(c, "rope.scaling.yarn_beta_slow", 1.0, -1e6, 1e6, &r->beta_slow, err)) < 0 ||
        (rc = g_f64(c, "rope.scaling.yarn_log_multiplier", 0.0, 0.0, 1e3, &log_mul, err)) < 0)
        return rc;
    /* The converter writes 0.1 * mscale_all_dim (llama.cpp divides by 0.1 again) and not
     * mscale; llama.cpp takes mscale = mscale_all_dim for deepseek2 (llama-context.cpp), which
     * makes the cos/sin factor mscale/mscale_all_dim 1. V2 and V3 ship equal values. */
    char buf[32];
    snprintf(buf, sizeof(buf), "%.7g", log_mul / 0.1);
    r->mscale_all_dim = strtod(buf, NULL);
    r->mscale = r->mscale_all_dim;
    return 0;
}

int ds_model_config_from_gguf(const ds_gguf *g, ds_model_config *out, ds_error *err)
{
    gcfg gc = {.g = g, .file = ds_gguf_file_path(g, 0)};
    ds_gguf_str arch;
    int rc = ds_gguf_get_str(g, "general.architecture", &arch, err);
    if (rc < 0)
        return rc;
    if (arch.len != 9 || memcmp(arch.ptr, "deepseek2", 9))
        return ds_error_set(err, -EINVAL,
                            "%s: key 'general.architecture' = '%.*s', only deepseek2 is supported",
                            gc.file, (int)(arch.len > 64 ? 64 : arch.len), arch.ptr);
    ds_model_config c;
    memset(&c, 0, sizeof(c));
    uint32_t key_len, val_len, key_mla, val_mla, gating, n_group, topk_group;
    /* the vocabulary: deepseek2.vocab_size, else the token list (llama.cpp does the same) */
    const ds_gguf_kv *tok = ds_gguf_kv_find(g, "tokenizer.ggml.tokens");
    if ((rc = g_u32(&gc, "vocab_size", false, 0, 0, CFG_MAX_VOCAB, &c.vocab_size, err)) < 0)
        return rc;
    if (!c.vocab_size) {
        if (!tok)
            return ds_error_set(err, -ENOENT,
                                "%s: neither 'deepseek2.vocab_size' nor 'tokenizer.ggml.tokens'",
                                gc.file);
        if (ds_gguf_kv_type(tok) != DS_GGUF_ARRAY || ds_gguf_kv_len(tok) < 1 ||
            ds_gguf_kv_len(tok) > CFG_MAX_VOCAB)
            return ds_error_set(err, -ERANGE,
                                "%s: key 'tokenizer.ggml.tokens' is not an array of 1..%u tokens",
                                gc.file, CFG_MAX_VOCAB);
        c.vocab_size = (uint32_t)ds_gguf_kv_len(tok);
    }
    if ((rc = g_u32(&gc, "block_count", true, 0, 1, CFG_MAX_LAYERS, &c.num_hidden_layers, err)) <
            0 ||
        (rc = g_u32(&gc, "embedding_length", true, 0, 1, CFG_MAX_DIM, &c.hidden_size, err)) < 0 ||
        (rc = g_u32(&gc, "feed_forward_length", false, 0, 0, CFG_MAX_DIM * 4, &c.intermediate_size,
                    err)) < 0 ||
        (rc = g_u32(&gc, "attention.head_count", true, 0, 1, CFG_MAX_HEADS, &c.num_attention_heads,
                    err)) < 0 ||
        (rc = g_u32(&gc, "attention.q_lora_rank", false, 0, 0, CFG_MAX_DIM, &c.q_lora_rank, err)) <
            0 ||
        (rc = g_u32(&gc, "attention.kv_lora_rank", true, 0, 1, CFG_MAX_DIM, &c.kv_lora_rank, err)) <
            0 ||
        (rc = g_u32(&gc, "attention.key_length", true, 0, 1, 2 * CFG_MAX_DIM, &key_len, err)) < 0 ||
        (rc = g_u32(&gc, "attention.value_length", true, 0, 1, CFG_MAX_DIM, &val_len, err)) < 0 ||
        (rc = g_u32(&gc, "attention.key_length_mla", false, 0, 1, 8192, &key_mla, err)) < 0 ||
        (rc = g_u32(&gc, "attention.value_length_mla", false, 0, 1, 4096, &val_mla, err)) < 0 ||
        (rc = g_u32(&gc, "rope.dimension_count", true, 0, 0, 4096, &c.qk_rope_head_dim, err)) < 0 ||
        (rc = g_u32(&gc, "expert_count", false, 0, 0, CFG_MAX_EXPERTS, &c.n_routed_experts, err)) <
            0 ||
        (rc = g_u32(&gc, "expert_used_count", false, 0, 0, CFG_MAX_EXPERTS, &c.num_experts_per_tok,
                    err)) < 0 ||
        (rc = g_u32(&gc, "expert_shared_count", false, 0, 0, 1024, &c.n_shared_experts, err)) < 0 ||
        (rc = g_u32(&gc, "expert_feed_forward_length", false, 0, 0, CFG_MAX_DIM,
                    &c.moe_intermediate_size, err)) < 0 ||
        (rc = g_u32(&gc, "leading_dense_block_count", false, 0, 0, CFG_MAX_LAYERS,
                    &c.first_k_dense_replace, err)) < 0 ||
        (rc = g_u32(&gc, "expert_gating_func", false, 1, 1, 2, &gating, err)) < 0 ||
        (rc = g_u32(&gc, "expert_group_count", false, 1, 1, CFG_MAX_EXPERTS, &n_group, err)) < 0 ||
        (rc = g_u32(&gc, "expert_group_used_count", false, 1, 1, CFG_MAX_EXPERTS, &topk_group,
                    err)) < 0 ||
        (rc = g_bool(&gc, "expert_weights_norm", false, &c.norm_topk_prob, err)) < 0 ||
        (rc = g_f64(&gc, "expert_weights_scale", 1.0, 0.0, 1e6, &c.routed_scaling_factor, err)) <
            0 ||
        (rc = g_f64(&gc, "attention.layer_norm_rms_epsilon", 1e-6, 0.0, 1.0, &c.rms_norm_eps,
                    err)) < 0 ||
        (rc = g_u32(&gc, "context_length", false, 4096, 1, 1u << 30, &c.max_position_embeddings,
                    err)) < 0 ||
        (rc = g_rope(&gc, &c, err)) < 0)
        return rc;
    /* head dims: the _mla keys when present (absorbed layout), else the plain ones */
    uint32_t qk = key_mla ? key_mla : key_len, v = val_mla ? val_mla : val_len;
    if ((key_mla != 0) != (val_mla != 0))
        return ds_error_set(err, -EINVAL,
                            "%s: 'deepseek2.attention.key_length_mla' and 'value_length_mla' "
                            "must both be present or both absent",
                            gc.file);
    if (qk <= c.qk_rope_head_dim)
        return ds_error_set(err, -EINVAL,
                            "%s: key length %u must exceed 'deepseek2.rope.dimension_count' %u",
                            gc.file, qk, c.qk_rope_head_dim);
    c.qk_nope_head_dim = qk - c.qk_rope_head_dim;
    c.v_head_dim = v;
    if (c.qk_nope_head_dim > 4096 || c.v_head_dim > 4096)
        return ds_error_set(err, -ERANGE, "%s: head dims %u/%u past 4096", gc.file,
                            c.qk_nope_head_dim, c.v_head_dim);
    c.n_group = n_group;
    c.topk_group = topk_group;
    c.moe_layer_freq = 1; /* llama.cpp: every layer from leading_dense_block_count on is MoE */
    if (c.first_k_dense_replace > c.num_hidden_layers)
        c.first_k_dense_replace = c.num_hidden_layers;
    /* gating 2 is V3's sigmoid with the bias-corrected group-limited top-k; 1 is V2's softmax
     * (greedy, or group-limited when there are groups). */
    c.scoring_func = gating == 2 ? DS_SCORING_SIGMOID : DS_SCORING_SOFTMAX;
    c.arch = gating == 2 ? DS_ARCH_DEEPSEEK_V3 : DS_ARCH_DEEPSEEK_V2;
    c.topk_method = gating == 2   ? DS_TOPK_NOAUX_TC
                    : n_group > 1 ? DS_TOPK_GROUP_LIMITED_GREEDY
                                  : DS_TOPK_GREEDY;
    c.tie_word_embeddings = false; /* resolved by the loader: no output.weight = tied */
    c.dtype = DS_DTYPE_BF16;       /* per tensor in a GGUF; this is only the placement estimate */
    if ((rc = g_token_id(g, gc.file, "tokenizer.ggml.bos_token_id", c.vocab_size, &c.bos_token_id,
                         err)) < 0 ||
        (rc = g_token_id(g, gc.file, "tokenizer.ggml.eos_token_id", c.vocab_size, &c.eos_token_id,
                         err)) < 0)
        return rc;
    if ((rc = cfg_check(&c, err)) < 0) {
        ds_error_prefix(err, "%s", gc.file);
        return rc;
    }
    *out = c;
    return 0;
}
