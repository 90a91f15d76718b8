/* quantize.c — which weights --quantize turns into which ggml block type (ds_model.h); the
 * block quantisers themselves are in quant.c. */
#include <errno.h>
#include <stdlib.h>
#include <strings.h>

#include "ds_quant.h"
#include "model_impl.h"

int ds_quantize_parse(const char *s, enum ds_quantize *q)
{
    if (!strcasecmp(s, "none") || !*s)
        *q = DS_QUANTIZE_NONE;
    else if (!strcasecmp(s, "q8_0"))
        *q = DS_QUANTIZE_Q8_0;
    else if (!strcasecmp(s, "q4_k"))
        *q = DS_QUANTIZE_Q4_K;
    else
        return -EINVAL;
    return 0;
}

const char *ds_quantize_name(enum ds_quantize q)
{
    switch (q) {
    case DS_QUANTIZE_Q8_0:
        return "q8_0";
    case DS_QUANTIZE_Q4_K:
        return "q4_k";
    default:
        return "none";
    }
}

bool ds_quantize_weight_type(enum ds_quantize q, uint32_t src_type, uint64_t cols, uint32_t *out)
{
    if (q == DS_QUANTIZE_NONE)
        return false;
    if (src_type != DS_QUANT_F32 && src_type != DS_QUANT_F16 && src_type != DS_QUANT_BF16 &&
        src_type != DS_QUANTIZE_SRC_F8)
        return false; /* already a block type (or one the loader refuses) */
    if (q == DS_QUANTIZE_Q4_K && cols % 256 == 0) {
        *out = DS_QUANT_Q4_K;
        return true;
    }
    if (cols % 32)
        return false;
    *out = DS_QUANT_Q8_0;
    return true;
}

/* The ggml type id of an engine weight's element type, DS_QUANTIZE_SRC_F8 for FP8. */
static uint32_t weight_src_type(const ds_weight *w)
{
    switch (w->dtype) {
    case DS_DTYPE_F32:
        return DS_QUANT_F32;
    case DS_DTYPE_F16:
        return DS_QUANT_F16;
    case DS_DTYPE_BF16:
        return DS_QUANT_BF16;
    case DS_DTYPE_F8_E4M3:
        return DS_QUANTIZE_SRC_F8;
    default:
        return (uint32_t)ds_dtype_quant_type(w->dtype); /* a block type: stays */
    }
}

/* w replaced by an owned copy in blocks of the type q gives it (when it gives one). */
static int quantize_weight(ds_model *m, ds_weight *w, enum ds_quantize q, const char *what,
                           uint32_t l, ds_error *err)
{
    uint32_t qt;
    uint64_t rb;
    if (!w->data || !ds_quantize_weight_type(q, weight_src_type(w), w->cols, &qt) ||
        ds_quant_row_bytes(qt, w->cols, &rb) < 0)
        return 0;
    uint8_t *dst = malloc((size_t)(rb * w->rows) + 1);
    float *row = malloc((size_t)w->cols * sizeof(float));
    int rc = ds_model_own(m, dst);
    if (rc < 0 || !row) {
        free(row);
        return ds_error_set(err, -ENOMEM, "%s: quantising %s of layer %u: out of memory", m->dir,
                            what, l);
    }
    for (uint32_t r = 0; r < w->rows; r++) {
        ds_weight_row_f32(w, r, row);
        ds_quant_quantize_row(qt, row, w->cols, dst + (size_t)r * rb);
    }
    free(row);
    ds_weight nw = {.dtype = (enum ds_dtype)ds_dtype_from_quant_type(qt),
                    .rows = w->rows,
                    .cols = w->cols,
                    .data = dst};
    *w = nw;
    return 0;
}

static int quantize_ffn(ds_model *m, ds_ffn *f, enum ds_quantize q, const char *what, uint32_t l,
                        ds_error *err)
{
    int rc = 0;
    if (f->bound && ((rc = quantize_weight(m, &f->gate, q, what, l, err)) < 0 ||
                     (rc = quantize_weight(m, &f->up, q, what, l, err)) < 0 ||
                     (rc = quantize_weight(m, &f->down, q, what, l, err)) < 0))
        return rc;
    return 0;
}

int ds_model_quantize_bound(ds_model *m, enum ds_quantize q, ds_error *err)
{
    const ds_model_config *c = &m->cfg;
    int rc;
    for (uint32_t l = 0; l < c->num_hidden_layers; l++) {
        ds_layer *L = &m->layers[l];
        if (L->attn_bound) {
            ds_weight *w[] = {&L->q_a, &L->q_b, &L->kv_a, &L->kv_b, &L->o};
            for (int i = 0; i < 5; i++) {
                if ((i == 0 && !c->q_lora_rank) || (i == 3 && L->kv_b_dequantised))
                    continue;
                if ((rc = quantize_weight(m, w[i], q, "attention", l, err)) < 0)
                    return rc;
            }
        }
        if ((rc = quantize_ffn(m, &L->dense, q, "the dense FFN", l, err)) < 0 ||
            (rc = quantize_ffn(m, &L->shared, q, "the shared experts", l, err)) < 0)
            return rc;
        for (uint32_t e = 0; L->experts && e < c->n_routed_experts; e++)
            if ((rc = quantize_ffn(m, &L->experts[e], q, "an expert", l, err)) < 0)
                return rc;
    }
    /* lm_head, unless it is the embeddings themselves (tied): embeddings stay */
    bool tied = m->gg ? c->tie_word_embeddings
                      : c->tie_word_embeddings && !ds_st_find(m->st, "lm_head.weight");
    if (m->head_bound && !tied && (rc = quantize_weight(m, &m->lm_head, q, "lm_head", 0, err)) < 0)
        return rc;
    return 0;
}
