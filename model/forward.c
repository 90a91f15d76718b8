/* forward.c — the units of ds_model.h: embedding, MLA attention in the absorbed form over the
 * compressed KV cache, RMSNorm, YaRN rope on adjacent pairs, the router, FFNs, head.
 * Every per-row computation has a fixed order (see the invariant in ds_model.h). */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model_impl.h"

/* config.c bounds qk_rope_head_dim by this */
#define DS_MAX_ROPE_DIM 4096

/* ---- helpers ---- */

static void rmsnorm(const float *x, const float *w, uint32_t d, double eps, float *out)
{
    double ss = 0;
    for (uint32_t i = 0; i < d; i++)
        ss += (double)x[i] * x[i];
    float r = (float)(1.0 / sqrt(ss / d + eps));
    for (uint32_t i = 0; i < d; i++)
        out[i] = w[i] * (x[i] * r);
}

static double yarn_mscale(double scale, double m)
{
    return scale <= 1.0 ? 1.0 : 0.1 * m * log(scale) + 1.0;
}

int ds_rope_init(const ds_model_config *c, ds_rope *r)
{
    uint32_t dim = c->qk_rope_head_dim, half = dim / 2;
    r->inv_freq = calloc(half ? half : 1, sizeof(double));
    if (!r->inv_freq)
        return -ENOMEM;
    double base = c->rope.theta;
    for (uint32_t i = 0; i < half; i++)
        r->inv_freq[i] = 1.0 / pow(base, (double)(2 * i) / dim);
    r->attn_factor = 1.0;
    r->softmax_scale = 1.0 / sqrt((double)(c->qk_nope_head_dim + c->qk_rope_head_dim));
    if (!c->rope.yarn || dim == 0)
        return 0;
    double f = c->rope.factor, orig = c->rope.original_max_position_embeddings;
#define CORR(rot) (dim * log(orig / ((rot)*2 * M_PI)) / (2 * log(base)))
    double low = floor(CORR(c->rope.beta_fast)), high = ceil(CORR(c->rope.beta_slow));
#undef CORR
    if (low < 0)
        low = 0;
    if (high > dim - 1)
        high = dim - 1;
    if (low == high)
        high += 0.001;
    for (uint32_t i = 0; i < half; i++) {
        double ramp = (i - low) / (high - low);
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        double fr = r->inv_freq[i];
        r->inv_freq[i] = fr / f * ramp + fr * (1 - ramp);
    }
    r->attn_factor = yarn_mscale(f, c->rope.mscale) / yarn_mscale(f, c->rope.mscale_all_dim);
    if (c->rope.mscale_all_dim) {
        double ms = yarn_mscale(f, c->rope.mscale_all_dim);
        r->softmax_scale *= ms * ms;
    }
    return 0;
}

/* cos/sin of pos * inv_freq[i] (times the YaRN attention factor) for the dr/2 pairs of one
 * position: computed once per row, applied to k_pe and every head's q_pe. */
static void rope_coefs(const ds_rope *r, uint32_t dim, uint32_t pos, float *cs, float *sn)
{
    for (uint32_t i = 0; i < dim / 2; i++) {
        float ang = (float)pos * (float)r->inv_freq[i];
        cs[i] = (float)(cos(ang) * r->attn_factor);
        sn[i] = (float)(sin(ang) * r->attn_factor);
    }
}

/* Rotates adjacent pairs (x[2i], x[2i+1]) by the angle whose cos/sin rope_coefs gave. */
static void rope_apply(const float *cs, const float *sn, uint32_t dim, float *x)
{
    for (uint32_t i = 0; i < dim / 2; i++) {
        float a = x[2 * i], b = x[2 * i + 1];
        x[2 * i] = a * cs[i] - b * sn[i];
        x[2 * i + 1] = a * sn[i] + b * cs[i];
    }
}

static float silu(float g)
{
    return g / (1.0f + ds_expf(-g));
}

/* ---- KV cache ---- */

struct ds_kv_cache {
    uint32_t layer_begin, layer_end;
    uint32_t width; /* C + dr floats per position */
    uint32_t max_positions;
    uint32_t cap;  /* positions allocated per layer */
    uint32_t *len; /* [layers] */
    float **data;  /* [layers][cap * width] */
    void *ext;     /* a copy kept elsewhere (ds_kv_cache_set_ext), or NULL */
    void (*ext_free)(void *ext);
};

int ds_kv_cache_new(const ds_model_config *c, uint32_t lb, uint32_t le, uint32_t max_positions,
                    ds_kv_cache **ret)
{
    if (lb > le || le > c->num_hidden_layers || max_positions == 0 || max_positions > (1u << 24))
        return -EINVAL;
    ds_kv_cache *kv = calloc(1, sizeof(*kv));
    if (!kv)
        return -ENOMEM;
    kv->layer_begin = lb;
    kv->layer_end = le;
    kv->width = c->kv_lora_rank + c->qk_rope_head_dim;
    kv->max_positions = max_positions;
    uint32_t nl = le - lb ? le - lb : 1;
    kv->len = calloc(nl, sizeof(*kv->len));
    kv->data = calloc(nl, sizeof(*kv->data));
    if (!kv->len || !kv->data) {
        ds_kv_cache_free(kv);
        return -ENOMEM;
    }
    *ret = kv;
    return 0;
}

ds_kv_cache *ds_kv_cache_free(ds_kv_cache *kv)
{
    if (!kv)
        return NULL;
    if (kv->ext && kv->ext_free)
        kv->ext_free(kv->ext);
    if (kv->data)
        for (uint32_t l = 0; l < kv->layer_end - kv->layer_begin; l++)
            free(kv->data[l]);
    free(kv->data);
    free(kv->len);
    free(kv);
    return NULL;
}

uint32_t ds_kv_cache_len(const ds_kv_cache *kv, uint32_t layer)
{
    if (layer < kv->layer_begin || layer >= kv->layer_end)
        return 0;
    return kv->len[layer - kv->layer_begin];
}

int ds_kv_cache_truncate(ds_kv_cache *kv, uint32_t len)
{
    for (uint32_t l = 0; l < kv->layer_end - kv->layer_begin; l++) {
        if (len > kv->len[l])
            return -EINVAL;
        kv->len[l] = len;
    }
    return 0;
}

void ds_kv_cache_set_ext(ds_kv_cache *kv, void *ext, void (*free_fn)(void *ext))
{
    if (kv->ext && kv->ext != ext && kv->ext_free)
        kv->ext_free(kv->ext);
    kv->ext = ext;
    kv->ext_free = free_fn;
}

void *ds_kv_cache_ext(const ds_kv_cache *kv)
{
    return kv->ext;
}

int ds_kv_cache_set_len(ds_kv_cache *kv, uint32_t layer, uint32_t len)
{
    if (layer < kv->layer_begin || layer >= kv->layer_end || len > kv->max_positions)
        return -EINVAL;
    kv->len[layer - kv->layer_begin] = len;
    return 0;
}

bool ds_kv_cache_has_layer(const ds_kv_cache *kv, uint32_t layer)
{
    return layer >= kv->layer_begin && layer < kv->layer_end;
}

uint32_t ds_kv_cache_max_positions(const ds_kv_cache *kv)
{
    return kv->max_positions;
}

static int kv_reserve(ds_kv_cache *kv, uint32_t need)
{
    if (need > kv->max_positions)
        return -ENOSPC;
    if (need <= kv->cap)
        return 0;
    uint32_t cap = kv->cap ? kv->cap : 64;
    while (cap < need)
        cap *= 2;
    if (cap > kv->max_positions)
        cap = kv->max_positions;
    for (uint32_t l = 0; l < kv->layer_end - kv->layer_begin; l++) {
        float *n = realloc(kv->data[l], (size_t)cap * kv->width * sizeof(float));
        if (!n)
            return -ENOMEM;
        kv->data[l] = n;
    }
    kv->cap = cap;
    return 0;
}

/* ---- units ---- */

int ds_unit_embed(const ds_model *m, ds_pool *pool, const int32_t *tokens, uint32_t n, float *out,
                  ds_error *err)
{
    if (!m->embed_bound)
        return ds_error_set(err, -ENOENT, "embed unit not loaded");
    for (uint32_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || (uint32_t)tokens[i] >= m->cfg.vocab_size)
            return ds_error_set(err, -ERANGE, "token id %d outside the vocabulary [0, %u)",
                                tokens[i], m->cfg.vocab_size);
        ds_weight_row_f32(&m->embed, (uint32_t)tokens[i], out + (size_t)i * m->cfg.hidden_size);
    }
    return 0;
}

typedef struct attn_ctx {
    const ds_model *m;
    const ds_layer *L;
    uint32_t n;
    const uint32_t *pos;
    ds_kv_cache *const *caches;
    uint32_t layer;
    const float *q; /* [n, H*(dn+dr)] roped */
    float *att;     /* [n, H*dv] */
    uint32_t t_max; /* longest cache any row reads */
    int failed;     /* -ENOMEM when a task could not get its scratch (written by any task) */
} attn_ctx;

/* Rows per attention task: W_UK / W_UV rows are widened once for that many query rows. */
#define ATTN_ROWS 3

/* Head h for up to ATTN_ROWS consecutive rows: absorbed MLA against each row's cache.
 * Per row: q_lat = q_nopeᵀ W_UK[h] (one fmaf chain over d per latent), scores
 * (q_lat·c_t + q_pe·k_pe_t) · scale (8-lane dots), softmax, o_lat = Σ_t p_t c_t (one chain over
 * t), out = W_UV[h] o_lat (8-lane dots): the same order whatever the batch or the threads. */
static void attn_task(void *arg, uint32_t t)
{
    attn_ctx *a = arg;
    const ds_model_config *c = &a->m->cfg;
    uint32_t H = c->num_attention_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
    uint32_t dv = c->v_head_dim, C = c->kv_lora_rank, qw = H * (dn + dr);
    uint32_t blocks = (a->n + ATTN_ROWS - 1) / ATTN_ROWS;
    uint32_t h = t / blocks, i0 = (t % blocks) * ATTN_ROWS;
    uint32_t nr = a->n - i0 < ATTN_ROWS ? a->n - i0 : ATTN_ROWS;
    float *qlat = ds_thread_scratch(1, (size_t)2 * ATTN_ROWS * C + 2 * (size_t)a->t_max);
    if (!qlat) {
        a->failed = -ENOMEM; /* a long context's scores: reported, not fatal */
        return;
    }
    float *olat = qlat + (size_t)ATTN_ROWS * C, *p = olat + (size_t)ATTN_ROWS * C;
    float *pe = p + a->t_max;
    const float *q0 = a->q + (size_t)i0 * qw + (size_t)h * (dn + dr);
    ds_weight_vecmat(&a->L->kv_b, h * (dn + dv), dn, q0, qw, nr, qlat, C);
    float scale = (float)a->m->rope.softmax_scale;
    for (uint32_t r = 0; r < nr; r++) {
        uint32_t i = i0 + r;
        const ds_kv_cache *kv = a->caches[i];
        const float *cache = kv->data[a->layer - kv->layer_begin];
        uint32_t T = a->pos[i] + 1;
        ds_dot8_many(qlat + (size_t)r * C, cache, kv->width, T, C, p);
        ds_dot8_many(q0 + (size_t)r * qw + dn, cache + C, kv->width, T, dr, pe);
        float mx = -INFINITY;
        for (uint32_t s = 0; s < T; s++) {
            p[s] = (p[s] + pe[s]) * scale;
            if (p[s] > mx)
                mx = p[s];
        }
        float sum = 0;
        for (uint32_t s = 0; s < T; s++) {
            p[s] = ds_expf(p[s] - mx);
            sum += p[s];
        }
        for (uint32_t s = 0; s < T; s++)
            p[s] = p[s] / sum;
        ds_wsum(p, cache, kv->width, T, C, olat + (size_t)r * C);
    }
    ds_weight_dot8_rows(&a->L->kv_b, h * (dn + dv) + dn, dv, olat, C, nr,
                        a->att + (size_t)i0 * H * dv + (size_t)h * dv, (size_t)H * dv);
}

int ds_unit_attn(const ds_model *m, ds_pool *pool, uint32_t layer, const float *x, uint32_t n,
                 const uint32_t *positions, ds_kv_cache *const *caches, ds_attn_out *out,
                 ds_error *err)
{
    const ds_model_config *c = &m->cfg;
    if (layer >= c->num_hidden_layers || !m->layers[layer].attn_bound)
        return ds_error_set(err, -ENOENT, "attn[%u] unit not loaded", layer);
    const ds_layer *L = &m->layers[layer];
    if (n == 0)
        return 0;
    uint32_t D = c->hidden_size, H = c->num_attention_heads, dn = c->qk_nope_head_dim;
    uint32_t dr = c->qk_rope_head_dim, dv = c->v_head_dim, C = c->kv_lora_rank;
    uint32_t qw = H * (dn + dr), kvw = C + dr;
    /* Validate caches and positions before touching anything. */
    for (uint32_t i = 0; i < n; i++) {
        ds_kv_cache *kv = caches[i];
        if (!kv || layer < kv->layer_begin || layer >= kv->layer_end)
            return ds_error_set(err, -EINVAL, "attn[%u]: row %u has no cache for this layer", layer,
                                i);
        uint32_t len = kv->len[layer - kv->layer_begin];
        /* earlier rows of the same cache in this call extend it */
        for (uint32_t j = 0; j < i; j++)
            if (caches[j] == kv)
                len = positions[j] + 1;
        if (positions[i] > len)
            return ds_error_set(err, -EINVAL,
                                "attn[%u]: row %u position %u skips past cache "
                                "length %u",
                                layer, i, positions[i], len);
        if (positions[i] >= kv->max_positions)
            return ds_error_set(err, -ENOSPC, "attn[%u]: position %u beyond the cache's %u", layer,
                                positions[i], kv->max_positions);
    }
    size_t qa_w = c->q_lora_rank ? c->q_lora_rank : 1;
    float *xn = malloc((size_t)n * D * sizeof(float));
    float *qa = malloc((size_t)n * qa_w * sizeof(float));
    float *q = malloc((size_t)n * qw * sizeof(float));
    float *kva = malloc((size_t)n * kvw * sizeof(float));
    float *att = malloc((size_t)n * H * dv * sizeof(float));
    int rc = 0;
    if (!xn || !qa || !q || !kva || !att) {
        rc = -ENOMEM;
        goto out;
    }
    for (uint32_t i = 0; i < n; i++)
        rmsnorm(x + (size_t)i * D, L->attn_norm, D, c->rms_norm_eps, xn + (size_t)i * D);
    if (c->q_lora_rank) {
        ds_weight_matmul(&L->q_a, xn, n, qa, pool);
        /* HF uses eps 1e-6 for the LoRA norms whatever rms_norm_eps says. */
        for (uint32_t i = 0; i < n; i++)
            rmsnorm(qa + i * qa_w, L->q_a_norm, c->q_lora_rank, 1e-6, qa + i * qa_w);
        ds_weight_matmul(&L->q_b, qa, n, q, pool);
    } else {
        ds_weight_matmul(&L->q_b, xn, n, q, pool);
    }
    ds_weight_matmul(&L->kv_a, xn, n, kva, pool);
    float cs[DS_MAX_ROPE_DIM / 2], sn[DS_MAX_ROPE_DIM / 2];
    for (uint32_t i = 0; i < n; i++) {
        float *kr = kva + (size_t)i * kvw;
        rmsnorm(kr, L->kv_a_norm, C, 1e-6, kr);
        rope_coefs(&m->rope, dr, positions[i], cs, sn);
        rope_apply(cs, sn, dr, kr + C);
        for (uint32_t h = 0; h < H; h++)
            rope_apply(cs, sn, dr, q + (size_t)i * qw + h * (dn + dr) + dn);
    }
    for (uint32_t i = 0; i < n; i++) {
        ds_kv_cache *kv = caches[i];
        uint32_t li = layer - kv->layer_begin;
        if ((rc = kv_reserve(kv, positions[i] + 1)) < 0) {
            ds_error_set(err, rc, "attn[%u]: KV cache", layer);
            goto out;
        }
        memcpy(kv->data[li] + (size_t)positions[i] * kvw, kva + (size_t)i * kvw,
               kvw * sizeof(float));
        kv->len[li] = positions[i] + 1;
    }
    uint32_t t_max = 0;
    for (uint32_t i = 0; i < n; i++)
        t_max = positions[i] + 1 > t_max ? positions[i] + 1 : t_max;
    attn_ctx a = {m, L, n, positions, caches, layer, q, att, t_max, 0};
    ds_pool_run(pool, H * ((n + ATTN_ROWS - 1) / ATTN_ROWS), attn_task, &a);
    if (a.failed) {
        rc = ds_error_set(err, a.failed, "attn[%u]: out of memory for %u cached positions", layer,
                          t_max);
        goto out;
    }
    ds_weight_matmul(&L->o, att, n, out->hidden, pool);
    for (size_t i = 0; i < (size_t)n * D; i++)
        out->hidden[i] += x[i];
    for (uint32_t i = 0; i < n; i++)
        rmsnorm(out->hidden + (size_t)i * D, L->ffn_norm, D, c->rms_norm_eps,
                out->ffn_in + (size_t)i * D);
    if (L->moe && out->topk_ids && out->topk_weights) {
        uint32_t E = c->n_routed_experts, k = c->num_experts_per_tok;
        float *logits = malloc((size_t)n * E * sizeof(float));
        if (!logits) {
            rc = -ENOMEM;
            goto out;
        }
        ds_weight_matmul(&L->gate, out->ffn_in, n, logits, pool);
        for (uint32_t i = 0; i < n; i++)
            ds_router_select(c, logits + (size_t)i * E, L->gate_bias, out->topk_ids + i * k,
                             out->topk_weights + i * k);
        free(logits);
    }
out:
    free(xn);
    free(qa);
    free(q);
    free(kva);
    free(att);
    return rc;
}

/* ---- FFNs as one parallel job ----
 * Several SwiGLU FFNs of one layer (the routed experts a layer activates, or one dense/shared
 * FFN) run as two parallel loops: gate and up (with silu(g) * u on the task's own elements),
 * then down; each loop's tasks are chunks of output rows of every FFN, so the pool wakes twice
 * per layer whatever the number of experts and threads. A matmul's value does not depend on
 * how its rows are split, so the bits are those of one FFN at a time on one thread. */
typedef struct ffn_task {
    uint32_t f;      /* which FFN */
    uint32_t r0, r1; /* output rows of gate/up (phase 1) or down (phase 2) */
} ffn_task;

typedef struct ffn_job {
    const ds_ffn *const *f; /* [nf] */
    const uint32_t *off;    /* [nf + 1] row offsets into in / out */
    const size_t *goff;     /* [nf] float offsets of each FFN's [rows, I] block in g / u */
    uint32_t D;
    const float *in; /* [off[nf], D] */
    float *out;      /* [off[nf], D] */
    float *g, *u;    /* intermediate activations */
    const ffn_task *tasks;
    /* each FFN's prepared inputs (quantised once for block-type weights, tensor.c): gate's,
     * up's (the same as gate's when the formats agree) and down's */
    ds_matmul_in *gin, *uin, *din;
} ffn_job;

static void ffn_up_task(void *arg, uint32_t t)
{
    const ffn_job *j = arg;
    const ffn_task *k = &j->tasks[t];
    const ds_ffn *f = j->f[k->f];
    uint32_t n = j->off[k->f + 1] - j->off[k->f], I = f->gate.rows;
    float *g = j->g + j->goff[k->f], *u = j->u + j->goff[k->f];
    ds_weight_matmul_rows_in(&f->gate, &j->gin[k->f], g, k->r0, k->r1);
    ds_weight_matmul_rows_in(&f->up, &j->uin[k->f], u, k->r0, k->r1);
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t o = k->r0; o < k->r1; o++)
            g[(size_t)i * I + o] = silu(g[(size_t)i * I + o]) * u[(size_t)i * I + o];
}

static void ffn_down_task(void *arg, uint32_t t)
{
    const ffn_job *j = arg;
    const ffn_task *k = &j->tasks[t];
    const ds_ffn *f = j->f[k->f];
    ds_weight_matmul_rows_in(&f->down, &j->din[k->f], j->out + (size_t)j->off[k->f] * j->D, k->r0,
                             k->r1);
}

/* Bytes of w's prepared input for n rows, rounded to the 64-byte pieces the job lays out. */
static size_t in_bytes64(const ds_weight *w, uint32_t n)
{
    return (ds_matmul_in_bytes(w, n) + 63) & ~(size_t)63;
}

/* Bytes of the prepared inputs of FFN f for n rows (gate, up and down; up may share gate's). */
static size_t ffn_in_bytes(const ds_ffn *f, uint32_t n)
{
    return in_bytes64(&f->gate, n) + in_bytes64(&f->up, n) + in_bytes64(&f->down, n);
}

/* Chunks of `rows(f)` output rows over every FFN with rows to do; returns the task count. */
static uint32_t ffn_tasks(const ds_ffn *const *f, const uint32_t *off, uint32_t nf, bool down,
                          uint32_t threads, ffn_task *tasks, uint32_t max_tasks)
{
    uint64_t total = 0;
    for (uint32_t j = 0; j < nf; j++)
        if (off[j + 1] > off[j])
            total += down ? f[j]->down.rows : f[j]->gate.rows;
    /* about 4 tasks per thread, whole 12-row tiles, not below 24 rows */
    uint64_t ch = (total + threads * 4 - 1) / (threads * 4);
    ch = ch < 24 ? 24 : (ch + 11) / 12 * 12;
    uint32_t nt = 0;
    for (uint32_t j = 0; j < nf; j++) {
        if (off[j + 1] == off[j])
            continue;
        uint32_t rows = down ? f[j]->down.rows : f[j]->gate.rows;
        for (uint32_t r = 0; r < rows && nt < max_tasks; r += (uint32_t)ch)
            tasks[nt++] = (ffn_task){j, r, r + ch < rows ? r + (uint32_t)ch : rows};
    }
    return nt;
}

static int ffn_job_run(const ds_ffn *const *f, const uint32_t *off, uint32_t nf, ds_pool *pool,
                       uint32_t D, const float *in, float *out)
{
    size_t *goff = malloc((nf + 1) * sizeof(size_t));
    if (!goff)
        return -ENOMEM;
    size_t gsz = 0;
    uint32_t max_tasks = 0, threads = ds_pool_size(pool);
    for (uint32_t j = 0; j < nf; j++) {
        goff[j] = gsz;
        gsz += (size_t)(off[j + 1] - off[j]) * f[j]->gate.rows;
        /* at most one task per 24 rows, plus one per FFN */
        max_tasks += (f[j]->gate.rows > D ? f[j]->gate.rows : D) / 24 + 1;
    }
    max_tasks += threads * 4;
    size_t qsz = 0;
    for (uint32_t j = 0; j < nf; j++)
        qsz += ffn_in_bytes(f[j], off[j + 1] - off[j]);
    float *g = malloc(gsz * sizeof(float) + 1), *u = malloc(gsz * sizeof(float) + 1);
    ffn_task *tasks = malloc((size_t)max_tasks * sizeof(*tasks));
    ds_matmul_in *ins = malloc((size_t)3 * nf * sizeof(*ins) + 1);
    uint8_t *qbuf = qsz ? aligned_alloc(64, qsz) : NULL;
    int rc = 0;
    if (!g || !u || !tasks || !ins || (qsz && !qbuf)) {
        rc = -ENOMEM;
        goto out;
    }
    ffn_job job = {f, off, goff, D, in, out, g, u, tasks, ins, ins + nf, ins + 2 * nf};
    uint8_t *qp = qbuf;
    for (uint32_t j = 0; j < nf; j++) {
        uint32_t n = off[j + 1] - off[j];
        const float *x = in + (size_t)off[j] * D;
        ds_matmul_in_prepare(&f[j]->gate, x, n, qp, &job.gin[j]);
        qp += in_bytes64(&f[j]->gate, n);
        if (ds_matmul_in_fits(&job.gin[j], &f[j]->up)) {
            job.uin[j] = job.gin[j];
        } else {
            ds_matmul_in_prepare(&f[j]->up, x, n, qp, &job.uin[j]);
            qp += in_bytes64(&f[j]->up, n);
        }
    }
    uint32_t nt = ffn_tasks(f, off, nf, false, threads, tasks, max_tasks);
    ds_pool_run(pool, nt, ffn_up_task, &job);
    for (uint32_t j = 0; j < nf; j++) {
        uint32_t n = off[j + 1] - off[j];
        ds_matmul_in_prepare(&f[j]->down, g + goff[j], n, qp, &job.din[j]);
        qp += in_bytes64(&f[j]->down, n);
    }
    nt = ffn_tasks(f, off, nf, true, threads, tasks, max_tasks);
    ds_pool_run(pool, nt, ffn_down_task, &job);
out:
    free(goff);
    free(g);
    free(u);
    free(tasks);
    free(ins);
    free(qbuf);
    return rc;
}

static int ffn_run(const ds_ffn *f, ds_pool *pool, const float *x, uint32_t n, uint32_t D,
                   float *out)
{
    uint32_t off[2] = {0, n};
    return ffn_job_run(&f, off, 1, pool, D, x, out);
}

int ds_unit_dense(const ds_model *m, ds_pool *pool, uint32_t layer, const float *ffn_in, uint32_t n,
                  float *out, ds_error *err)
{
    if (layer >= m->cfg.num_hidden_layers || !m->layers[layer].dense.bound)
        return ds_error_set(err, -ENOENT, "dense[%u] unit not loaded", layer);
    int rc = ffn_run(&m->layers[layer].dense, pool, ffn_in, n, m->cfg.hidden_size, out);
    return rc < 0 ? ds_error_set(err, rc, "dense[%u]: out of memory", layer) : 0;
}

int ds_unit_shared(const ds_model *m, ds_pool *pool, uint32_t layer, const float *ffn_in,
                   uint32_t n, float *out, ds_error *err)
{
    if (layer >= m->cfg.num_hidden_layers || !m->layers[layer].shared.bound)
        return ds_error_set(err, -ENOENT, "shared[%u] unit not loaded", layer);
    int rc = ffn_run(&m->layers[layer].shared, pool, ffn_in, n, m->cfg.hidden_size, out);
    return rc < 0 ? ds_error_set(err, rc, "shared[%u]: out of memory", layer) : 0;
}

int ds_unit_expert(const ds_model *m, ds_pool *pool, uint32_t layer, uint32_t expert,
                   const float *ffn_in, uint32_t n, float *out, ds_error *err)
{
    uint32_t off[2] = {0, n};
    return ds_unit_experts(m, pool, layer, 1, &expert, off, ffn_in, out, err);
}

int ds_unit_experts(const ds_model *m, ds_pool *pool, uint32_t layer, uint32_t n_experts,
                    const uint32_t *experts, const uint32_t *offsets, const float *in, float *out,
                    ds_error *err)
{
    const ds_model_config *c = &m->cfg;
    if (n_experts == 0)
        return 0;
    const ds_ffn **f = malloc(n_experts * sizeof(*f));
    if (!f)
        return ds_error_set(err, -ENOMEM, "layer %u experts: out of memory", layer);
    for (uint32_t j = 0; j < n_experts; j++) {
        uint32_t e = experts[j];
        if (layer >= c->num_hidden_layers || !m->layers[layer].experts ||
            e >= c->n_routed_experts || !m->layers[layer].experts[e].bound) {
            free(f);
            return ds_error_set(err, -ENOENT, "expert[%u][%u] unit not loaded", layer, e);
        }
        if (offsets[j + 1] < offsets[j]) {
            free(f);
            return ds_error_set(err, -EINVAL, "layer %u experts: row offsets go backwards", layer);
        }
        f[j] = &m->layers[layer].experts[e];
    }
    int rc = ffn_job_run(f, offsets, n_experts, pool, c->hidden_size, in, out);
    free(f);
    return rc < 0 ? ds_error_set(err, rc, "layer %u experts: out of memory", layer) : 0;
}

int ds_unit_head(const ds_model *m, ds_pool *pool, const float *x, uint32_t n, float *logits,
                 ds_error *err)
{
    if (!m->head_bound)
        return ds_error_set(err, -ENOENT, "head unit not loaded");
    uint32_t D = m->cfg.hidden_size;
    float *xn = malloc((size_t)n * D * sizeof(float) + 1);
    if (!xn)
        return ds_error_set(err, -ENOMEM, "head: out of memory");
    for (uint32_t i = 0; i < n; i++)
        rmsnorm(x + (size_t)i * D, m->final_norm, D, m->cfg.rms_norm_eps, xn + (size_t)i * D);
    ds_weight_matmul(&m->lm_head, xn, n, logits, pool);
    free(xn);
    return 0;
}

void ds_unit_add(uint32_t d, uint32_t n, const float *delta, float *hidden)
{
    for (size_t i = 0; i < (size_t)d * n; i++)
        hidden[i] += delta[i];
}

/* ---- a unit's parameters (ds_model.h) ---- */

int ds_model_attn_params(const ds_model *m, uint32_t layer, ds_attn_params *out)
{
    if (layer >= m->cfg.num_hidden_layers || !m->layers[layer].attn_bound)
        return -ENOENT;
    const ds_layer *L = &m->layers[layer];
    *out = (ds_attn_params){
        .attn_norm = L->attn_norm,
        .ffn_norm = L->ffn_norm,
        .q_a = m->cfg.q_lora_rank ? &L->q_a : NULL,
        .q_a_norm = m->cfg.q_lora_rank ? L->q_a_norm : NULL,
        .q_b = &L->q_b,
        .kv_a = &L->kv_a,
        .kv_a_norm = L->kv_a_norm,
        .kv_b = &L->kv_b,
        .o = &L->o,
        .gate = L->moe ? &L->gate : NULL,
        .gate_bias = L->moe ? L->gate_bias : NULL,
        .softmax_scale = m->rope.softmax_scale,
    };
    return 0;
}

int ds_model_ffn_params(const ds_model *m, enum ds_unit_kind kind, uint32_t layer,
                        const ds_weight **gate, const ds_weight **up, const ds_weight **down)
{
    if (layer >= m->cfg.num_hidden_layers)
        return -ENOENT;
    const ds_ffn *f = kind == DS_UNIT_DENSE    ? &m->layers[layer].dense
                      : kind == DS_UNIT_SHARED ? &m->layers[layer].shared
                                               : NULL;
    if (!f || !f->bound)
        return -ENOENT;
    *gate = &f->gate;
    *up = &f->up;
    *down = &f->down;
    return 0;
}

int ds_model_embed_params(const ds_model *m, const ds_weight **embed)
{
    if (!m->embed_bound)
        return -ENOENT;
    *embed = &m->embed;
    return 0;
}

int ds_model_head_params(const ds_model *m, const float **final_norm, const ds_weight **lm_head)
{
    if (!m->head_bound)
        return -ENOENT;
    *final_norm = m->final_norm;
    *lm_head = &m->lm_head;
    return 0;
}

void ds_model_rope_coefs(const ds_model *m, uint32_t pos, float *cs, float *sn)
{
    rope_coefs(&m->rope, m->cfg.qk_rope_head_dim, pos, cs, sn);
}
