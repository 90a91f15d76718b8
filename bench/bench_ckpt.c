/* bench_ckpt.c — writes the synthetic checkpoints of bench_ckpt.h.
 *
 * Linear weights are uniform in ±60/cols (std 34.6/cols), so a unit-RMS input gives outputs of
 * std 34.6/sqrt(cols) — 0.9 for cols 1536, a few units for the narrow expert down projections:
 * activations stay O(1) through the layers (every block input is RMS-normed), logits stay
 * finite and the router spreads tokens over the experts instead of saturating. Norm weights are
 * ones. The same weights as bench_decode always had (same seed, same tensor order). */
#include "bench_ckpt.h"

#include <errno.h>
#include <immintrin.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ds_gguf.h"
#include "ds_numeric.h"
#include "ds_pool.h"

typedef struct bt {
    char name[96];
    uint32_t rows, cols; /* cols == 0: 1-D */
    int ones;            /* 1: all 1.0 (norm weights), else random */
} bt;

typedef struct bt_list {
    bt *t;
    size_t n, cap;
} bt_list;

double bench_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int add(bt_list *l, int ones, uint32_t rows, uint32_t cols, const char *fmt, int a, int b)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 256;
        bt *t = realloc(l->t, cap * sizeof(*t));
        if (!t)
            return -ENOMEM;
        l->t = t;
        l->cap = cap;
    }
    bt *t = &l->t[l->n++];
    snprintf(t->name, sizeof(t->name), fmt, a, b);
    t->rows = rows;
    t->cols = cols;
    t->ones = ones;
    return 0;
}

static int add_ffn(bt_list *l, const bench_shape *s, uint32_t inter, const char *prefix, int a,
                   int b)
{
    char p[96], f[128];
    snprintf(p, sizeof(p), prefix, a, b);
    int rc = 0;
    snprintf(f, sizeof(f), "%s.gate_proj.weight", p);
    rc = rc ? rc : add(l, 0, inter, s->d, f, 0, 0);
    snprintf(f, sizeof(f), "%s.up_proj.weight", p);
    rc = rc ? rc : add(l, 0, inter, s->d, f, 0, 0);
    snprintf(f, sizeof(f), "%s.down_proj.weight", p);
    return rc ? rc : add(l, 0, s->d, inter, f, 0, 0);
}

/* The tensors in file order (the order fixes the random stream, so keep it stable). */
static int list_tensors(const bench_shape *s, bt_list *l)
{
    const char *lp = "model.layers.%d.%s";
    int rc = 0;
    rc = rc ? rc : add(l, 0, s->vocab, s->d, "model.embed_tokens.weight", 0, 0);
    rc = rc ? rc : add(l, 1, s->d, 0, "model.norm.weight", 0, 0);
    rc = rc ? rc : add(l, 0, s->vocab, s->d, "lm_head.weight", 0, 0);
    for (int i = 0; i < (int)s->layers && !rc; i++) {
        char n[96];
#define L(x) (snprintf(n, sizeof(n), lp, i, x), n)
        rc = rc ? rc : add(l, 1, s->d, 0, L("input_layernorm.weight"), 0, 0);
        rc = rc ? rc : add(l, 1, s->d, 0, L("post_attention_layernorm.weight"), 0, 0);
        rc = rc ? rc
                : add(l, 0, s->heads * (s->nope + s->rope), s->d, L("self_attn.q_proj.weight"), 0,
                      0);
        rc = rc ? rc
                : add(l, 0, s->kv_lora + s->rope, s->d, L("self_attn.kv_a_proj_with_mqa.weight"), 0,
                      0);
        rc = rc ? rc : add(l, 1, s->kv_lora, 0, L("self_attn.kv_a_layernorm.weight"), 0, 0);
        rc = rc ? rc
                : add(l, 0, s->heads * (s->nope + s->v), s->kv_lora,
                      L("self_attn.kv_b_proj.weight"), 0, 0);
        rc = rc ? rc : add(l, 0, s->d, s->heads * s->v, L("self_attn.o_proj.weight"), 0, 0);
#undef L
        if (i == 0) {
            rc = rc ? rc : add_ffn(l, s, s->dense_inter, "model.layers.%d.mlp", i, 0);
            continue;
        }
        snprintf(n, sizeof(n), lp, i, "mlp.gate.weight");
        rc = rc ? rc : add(l, 0, s->experts, s->d, n, 0, 0);
        rc = rc ? rc
                : add_ffn(l, s, s->moe_inter * s->shared, "model.layers.%d.mlp.shared_experts", i,
                          0);
        for (int e = 0; e < (int)s->experts && !rc; e++)
            rc = add_ffn(l, s, s->moe_inter, "model.layers.%d.mlp.experts.%d", i, e);
    }
    return rc;
}

static size_t t_elems(const bt *t)
{
    return (size_t)t->rows * (t->cols ? t->cols : 1);
}

/* xorshift64: fast, and the same stream on every machine. */
static uint32_t rnd(uint64_t *st)
{
    *st ^= *st << 13;
    *st ^= *st >> 7;
    *st ^= *st << 17;
    return (uint32_t)(*st >> 16);
}

static char *header_json(const bt_list *l)
{
    json_t *hdr = json_object();
    size_t off = 0;
    for (size_t i = 0; i < l->n; i++) {
        json_t *o = json_object();
        json_object_set_new(o, "dtype", json_string("BF16"));
        json_t *sh = json_array();
        json_array_append_new(sh, json_integer(l->t[i].rows));
        if (l->t[i].cols)
            json_array_append_new(sh, json_integer(l->t[i].cols));
        json_object_set_new(o, "shape", sh);
        json_t *of = json_array();
        json_array_append_new(of, json_integer((json_int_t)off));
        off += t_elems(&l->t[i]) * 2;
        json_array_append_new(of, json_integer((json_int_t)off));
        json_object_set_new(o, "data_offsets", of);
        json_object_set_new(hdr, l->t[i].name, o);
    }
    char *js = json_dumps(hdr, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(hdr);
    return js;
}

static int write_tensors(FILE *f, const bt_list *l, double *bytes)
{
    enum { CHUNK = 1 << 20 };
    uint16_t *buf = malloc(CHUNK * sizeof(*buf));
    if (!buf)
        return -ENOMEM;
    uint64_t st = 0x1234567887654321ull;
    double total = 0;
    for (size_t i = 0; i < l->n; i++) {
        const bt *t = &l->t[i];
        float amp = t->cols ? 60.0f / (float)t->cols : 1.0f;
        for (size_t done = 0, cnt = t_elems(t); done < cnt;) {
            size_t n = cnt - done < CHUNK ? cnt - done : CHUNK;
            for (size_t j = 0; j < n; j++)
                buf[j] = ds_f32_to_bf16(
                    t->ones ? 1.0f : ((float)(rnd(&st) & 0xffff) / 32768.0f - 1.0f) * amp);
            if (fwrite(buf, 2, n, f) != n) {
                free(buf);
                return -EIO;
            }
            done += n;
        }
        total += 2.0 * (double)t_elems(t);
    }
    free(buf);
    if (bytes)
        *bytes = total;
    return 0;
}

static int write_config(const char *dir, const bench_shape *s)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f)
        return -errno;
    /* Every field llama.cpp's converter and transformers read is spelled out, at the values
     * the engine would default to anyway. */
    fprintf(f,
            "{\"architectures\":[\"DeepseekV2ForCausalLM\"],\"model_type\":\"deepseek_v2\","
            "\"vocab_size\":%u,\"hidden_size\":%u,\"intermediate_size\":%u,"
            "\"moe_intermediate_size\":%u,\"num_hidden_layers\":%u,\"num_attention_heads\":%u,"
            "\"num_key_value_heads\":%u,\"q_lora_rank\":null,\"kv_lora_rank\":%u,"
            "\"qk_nope_head_dim\":%u,\"qk_rope_head_dim\":%u,\"v_head_dim\":%u,"
            "\"n_routed_experts\":%u,\"n_shared_experts\":%u,\"num_experts_per_tok\":%u,"
            "\"first_k_dense_replace\":1,\"moe_layer_freq\":1,\"n_group\":1,\"topk_group\":1,"
            "\"topk_method\":\"greedy\",\"scoring_func\":\"softmax\",\"norm_topk_prob\":false,"
            "\"routed_scaling_factor\":1.0,\"rms_norm_eps\":1e-06,\"rope_theta\":10000.0,"
            "\"hidden_act\":\"silu\",\"attention_bias\":false,\"tie_word_embeddings\":false,"
            "\"bos_token_id\":0,\"eos_token_id\":1,\"torch_dtype\":\"bfloat16\","
            "\"max_position_embeddings\":4096}\n",
            s->vocab, s->d, s->dense_inter, s->moe_inter, s->layers, s->heads, s->heads, s->kv_lora,
            s->nope, s->rope, s->v, s->experts, s->shared, s->topk);
    return fclose(f) ? -EIO : 0;
}

int bench_ckpt_write(const char *dir, const bench_shape *s, double *bytes)
{
    bt_list l = {0};
    int rc = list_tensors(s, &l);
    char *js = rc ? NULL : header_json(&l);
    if (!rc && !js)
        rc = -ENOMEM;
    char path[4096];
    FILE *f = NULL;
    if (!rc) {
        snprintf(path, sizeof(path), "%s/model.safetensors", dir);
        if (!(f = fopen(path, "wb")))
            rc = -errno;
    }
    if (!rc) {
        /* 8-byte little-endian header length, the JSON padded with spaces to 8 bytes. */
        size_t jl = strlen(js), pad = (8 - jl % 8) % 8;
        uint64_t hl = jl + pad;
        uint8_t le[8];
        for (int i = 0; i < 8; i++)
            le[i] = (uint8_t)(hl >> (8 * i));
        if (fwrite(le, 1, 8, f) != 8 || fwrite(js, 1, jl, f) != jl ||
            fwrite("       ", 1, pad, f) != pad)
            rc = -EIO;
    }
    if (!rc)
        rc = write_tensors(f, &l, bytes);
    if (f && fclose(f) && !rc)
        rc = -EIO;
    free(js);
    free(l.t);
    return rc ? rc : write_config(dir, s);
}

static double elem_bytes(const ds_model_config *c)
{
    switch (c->dtype) {
    case DS_DTYPE_F32:
    case DS_DTYPE_F16: /* widened to F32 at load, streamed as F32 */
        return 4;
    case DS_DTYPE_F8_E4M3:
        /* 1 byte + one float32 scale per block */
        return 1 + 4.0 / ((double)c->fp8_block_rows * c->fp8_block_cols);
    default:
        return 2;
    }
}

double bench_bytes_per_token(const ds_model_config *c)
{
    double d = c->hidden_size, h = c->num_attention_heads;
    double qk = c->qk_nope_head_dim + c->qk_rope_head_dim;
    double attn =
        c->q_lora_rank ? d * c->q_lora_rank + (double)c->q_lora_rank * h * qk : h * qk * d;
    attn += (double)(c->kv_lora_rank + c->qk_rope_head_dim) * d;
    attn += h * (c->qk_nope_head_dim + c->v_head_dim) * c->kv_lora_rank;
    attn += d * h * c->v_head_dim;
    double elems = 0;
    for (uint32_t l = 0; l < c->num_hidden_layers; l++) {
        elems += attn;
        if (!ds_model_config_layer_is_moe(c, l)) {
            elems += 3.0 * d * c->intermediate_size;
            continue;
        }
        double expert = 3.0 * d * c->moe_intermediate_size;
        elems += (double)c->n_routed_experts * d; /* router */
        elems += expert * (c->n_shared_experts + c->num_experts_per_tok);
    }
    elems += (double)c->vocab_size * d + d; /* lm_head + one embedding row */
    return elems * elem_bytes(c);
}

int bench_bytes_per_token_gguf(const char *path, const ds_model_config *c, double *out)
{
    ds_gguf *g = NULL;
    ds_error err = {0};
    int rc = ds_gguf_open_split(path, &g, &err);
    if (rc < 0)
        return rc;
    double b = 0;
    for (size_t i = 0; i < ds_gguf_tensor_count(g); i++) {
        const ds_gguf_tensor *t = ds_gguf_tensor_at(g, i);
        if (t->n_dims < 2)
            continue; /* norms, biases: a few KB */
        if (strstr(t->name, "_exps."))
            b += (double)t->nbytes * c->num_experts_per_tok / c->n_routed_experts;
        else if (!strcmp(t->name, "token_embd.weight"))
            b += (double)t->nbytes / t->ne[1];
        else
            b += (double)t->nbytes;
    }
    ds_gguf_free(g);
    *out = b;
    return 0;
}

/* ---- read bandwidth ---- */

typedef struct rd_ctx {
    const uint8_t *buf;
    size_t chunk;  /* bytes per task, a multiple of 256 */
    uint64_t *out; /* one sum per task, so the loads cannot be optimised away */
} rd_ctx;

__attribute__((target("avx2"))) static uint64_t sum_avx2(const uint8_t *p, size_t n)
{
    /* 8 independent 32-byte accumulators: integer adds have 1-cycle latency, so the loop is
     * bound by the loads, not by a dependency chain. */
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
            a7 = a0;
    for (size_t i = 0; i < n; i += 256) {
        const __m256i *v = (const __m256i *)(p + i);
        a0 = _mm256_add_epi64(a0, _mm256_load_si256(v + 0));
        a1 = _mm256_add_epi64(a1, _mm256_load_si256(v + 1));
        a2 = _mm256_add_epi64(a2, _mm256_load_si256(v + 2));
        a3 = _mm256_add_epi64(a3, _mm256_load_si256(v + 3));
        a4 = _mm256_add_epi64(a4, _mm256_load_si256(v + 4));
        a5 = _mm256_add_epi64(a5, _mm256_load_si256(v + 5));
        a6 = _mm256_add_epi64(a6, _mm256_load_si256(v + 6));
        a7 = _mm256_add_epi64(a7, _mm256_load_si256(v + 7));
    }
    __m256i s =
        _mm256_add_epi64(_mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)),
                         _mm256_add_epi64(_mm256_add_epi64(a4, a5), _mm256_add_epi64(a6, a7)));
    uint64_t l[4];
    _mm256_storeu_si256((__m256i *)l, s);
    return l[0] + l[1] + l[2] + l[3];
}

static uint64_t sum_portable(const uint8_t *p, size_t n)
{
    const uint64_t *w = (const uint64_t *)p;
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (size_t i = 0; i < n / 8; i += 4) {
        a0 += w[i];
        a1 += w[i + 1];
        a2 += w[i + 2];
        a3 += w[i + 3];
    }
    return a0 + a1 + a2 + a3;
}

static int have_avx2;

static void rd_task(void *arg, uint32_t i)
{
    rd_ctx *c = arg;
    const uint8_t *p = c->buf + (size_t)i * c->chunk;
    c->out[i] = have_avx2 ? sum_avx2(p, c->chunk) : sum_portable(p, c->chunk);
}

/* See bench_ckpt.h. The buffer is split into 16 MiB tasks that the pool hands out
 * dynamically, so a thread delayed by other load on the machine does not leave the others idle
 * at the end. */
double bench_read_gbs(ds_pool *pool)
{
    const size_t total = (size_t)1 << 30, chunk = (size_t)16 << 20;
    const uint32_t tasks = (uint32_t)(total / chunk);
    uint8_t *buf = aligned_alloc(4096, total);
    uint64_t *out = calloc(tasks, sizeof(*out));
    if (!buf || !out) {
        free(buf);
        free(out);
        return 0;
    }
    memset(buf, 1, total); /* fault every page in before timing */
    have_avx2 = __builtin_cpu_supports("avx2");
    rd_ctx c = {buf, chunk, out};
    double best = 0;
    uint64_t check = 0;
    for (int r = 0; r < 5; r++) {
        double t0 = bench_now_s();
        ds_pool_run(pool, tasks, rd_task, &c);
        double gbs = (double)total / (bench_now_s() - t0) / 1e9;
        best = gbs > best ? gbs : best;
        for (uint32_t i = 0; i < tasks; i++)
            check += out[i];
    }
    free(buf);
    free(out);
    /* every byte is 1: each pass sums total/8 words of 0x0101010101010101 */
    if (check != 5 * (uint64_t)(total / 8) * 0x0101010101010101ull)
        fprintf(stderr, "bench: read bandwidth checksum mismatch\n");
    return best;
}
