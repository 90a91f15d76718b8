/* bench_decode.c — CPU decode speed of the engine against this machine's memory bandwidth.
 *
 * Generates a V2-Lite-proportioned checkpoint (no q LoRA, 1 dense + MoE layers, 32 routed
 * experts of which 6 per token, 2 shared) with random BF16 weights, written as a real
 * safetensors checkpoint to a temporary directory, opens it like any checkpoint (mmap) and
 * decodes greedily with batch 1. Prints tokens/s, the weight bytes streamed per token (every
 * non-expert weight + the 6 chosen experts of each MoE layer + lm_head), the achieved
 * weight-streaming GB/s, a STREAM-style copy GB/s measured in the same run with the same
 * threads, and their ratio. Decode of one sequence is bound by weight streaming, so the ratio
 * says how close the kernels come to the memory system.
 *
 * usage: bench_decode [--threads N] [--tokens N] [--keep DIR] */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ds_engine.h"
#include "ds_model.h"
#include "ds_pool.h"
#include "ds_tensor.h"

/* Medium model (about 350 MB of BF16). */
enum {
    B_VOCAB = 16384,
    B_D = 1024,
    B_LAYERS = 5,
    B_HEADS = 8,
    B_KV = 256,
    B_NOPE = 64,
    B_ROPE = 32,
    B_V = 64,
    B_E = 32,
    B_K = 6,
    B_SHARED = 2,
    B_MOE_I = 256,
    B_DENSE_I = 2816,
};

typedef struct bt {
    char name[128];
    uint32_t rows, cols; /* cols == 0: 1-D */
    int f32;             /* 1: F32 (router bias), else BF16 */
    int kind;            /* 0 random, 1 ones, 2 zeros */
} bt;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng = 0x1234567887654321ull;
static uint32_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

static size_t n_t;
static bt tensors[512];

static void add(const char *name, uint32_t rows, uint32_t cols, int f32, int kind)
{
    bt *t = &tensors[n_t++];
    snprintf(t->name, sizeof(t->name), "%s", name);
    t->rows = rows;
    t->cols = cols;
    t->f32 = f32;
    t->kind = kind;
}

static void add_ffn(const char *p, uint32_t inter)
{
    char n[128];
    snprintf(n, sizeof(n), "%s.gate_proj.weight", p);
    add(n, inter, B_D, 0, 0);
    snprintf(n, sizeof(n), "%s.up_proj.weight", p);
    add(n, inter, B_D, 0, 0);
    snprintf(n, sizeof(n), "%s.down_proj.weight", p);
    add(n, B_D, inter, 0, 0);
}

static size_t t_bytes(const bt *t)
{
    return (size_t)t->rows * (t->cols ? t->cols : 1) * (t->f32 ? 4 : 2);
}

static int write_checkpoint(const char *dir)
{
    char n[128];
    add("model.embed_tokens.weight", B_VOCAB, B_D, 0, 0);
    add("model.norm.weight", B_D, 0, 0, 1);
    add("lm_head.weight", B_VOCAB, B_D, 0, 0);
    for (int l = 0; l < B_LAYERS; l++) {
#define L(s) (snprintf(n, sizeof(n), "model.layers.%d.%s", l, s), n)
        add(L("input_layernorm.weight"), B_D, 0, 0, 1);
        add(L("post_attention_layernorm.weight"), B_D, 0, 0, 1);
        add(L("self_attn.q_proj.weight"), B_HEADS * (B_NOPE + B_ROPE), B_D, 0, 0);
        add(L("self_attn.kv_a_proj_with_mqa.weight"), B_KV + B_ROPE, B_D, 0, 0);
        add(L("self_attn.kv_a_layernorm.weight"), B_KV, 0, 0, 1);
        add(L("self_attn.kv_b_proj.weight"), B_HEADS * (B_NOPE + B_V), B_KV, 0, 0);
        add(L("self_attn.o_proj.weight"), B_D, B_HEADS * B_V, 0, 0);
        if (l == 0) {
            add_ffn(L("mlp"), B_DENSE_I);
            continue;
        }
        add(L("mlp.gate.weight"), B_E, B_D, 0, 0);
        add_ffn(L("mlp.shared_experts"), B_MOE_I * B_SHARED);
        for (int e = 0; e < B_E; e++) {
            char p[128];
            snprintf(p, sizeof(p), "model.layers.%d.mlp.experts.%d", l, e);
            add_ffn(p, B_MOE_I);
        }
#undef L
    }
    json_t *hdr = json_object();
    size_t off = 0;
    for (size_t i = 0; i < n_t; i++) {
        json_t *o = json_object();
        json_object_set_new(o, "dtype", json_string(tensors[i].f32 ? "F32" : "BF16"));
        json_t *sh = json_array();
        json_array_append_new(sh, json_integer(tensors[i].rows));
        if (tensors[i].cols)
            json_array_append_new(sh, json_integer(tensors[i].cols));
        json_object_set_new(o, "shape", sh);
        json_t *of = json_array();
        json_array_append_new(of, json_integer((json_int_t)off));
        off += t_bytes(&tensors[i]);
        json_array_append_new(of, json_integer((json_int_t)off));
        json_object_set_new(o, "data_offsets", of);
        json_object_set_new(hdr, tensors[i].name, o);
    }
    char *js = json_dumps(hdr, JSON_COMPACT);
    json_decref(hdr);
    size_t jl = strlen(js), pad = (8 - jl % 8) % 8;
    char path[512];
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    FILE *f = fopen(path, "wb");
    if (!f)
        return -errno;
    uint64_t hl = jl + pad;
    uint8_t le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (uint8_t)(hl >> (8 * i));
    fwrite(le, 1, 8, f);
    fwrite(js, 1, jl, f);
    for (size_t i = 0; i < pad; i++)
        fputc(' ', f);
    free(js);
    uint16_t *buf = malloc((size_t)B_VOCAB * B_D * 2);
    for (size_t i = 0; i < n_t; i++) {
        size_t cnt = (size_t)tensors[i].rows * (tensors[i].cols ? tensors[i].cols : 1);
        if (tensors[i].f32) {
            float z = 0;
            for (size_t j = 0; j < cnt; j++)
                fwrite(&z, 4, 1, f);
            continue;
        }
        float scale = 2.0f / (float)(tensors[i].cols ? tensors[i].cols : 1);
        for (size_t j = 0; j < cnt; j++) {
            float v = tensors[i].kind == 1 ? 1.0f
                                           : ((float)(rnd() & 0xffff) / 32768.0f - 1.0f) *
                                                 (tensors[i].cols ? 30.0f * scale : 1.0f);
            buf[j] = ds_f32_to_bf16(v);
        }
        fwrite(buf, 2, cnt, f);
    }
    free(buf);
    if (fclose(f))
        return -EIO;
    snprintf(path, sizeof(path), "%s/config.json", dir);
    f = fopen(path, "w");
    if (!f)
        return -errno;
    fprintf(f,
            "{\"architectures\":[\"DeepseekV2ForCausalLM\"],\"vocab_size\":%d,\"hidden_size\":%d,"
            "\"intermediate_size\":%d,\"moe_intermediate_size\":%d,\"num_hidden_layers\":%d,"
            "\"num_attention_heads\":%d,\"q_lora_rank\":null,\"kv_lora_rank\":%d,"
            "\"qk_nope_head_dim\":%d,\"qk_rope_head_dim\":%d,\"v_head_dim\":%d,"
            "\"n_routed_experts\":%d,\"n_shared_experts\":%d,\"num_experts_per_tok\":%d,"
            "\"first_k_dense_replace\":1,\"topk_method\":\"greedy\",\"scoring_func\":\"softmax\","
            "\"norm_topk_prob\":false,\"routed_scaling_factor\":1.0,\"torch_dtype\":\"bfloat16\","
            "\"max_position_embeddings\":4096}\n",
            B_VOCAB, B_D, B_DENSE_I, B_MOE_I, B_LAYERS, B_HEADS, B_KV, B_NOPE, B_ROPE, B_V, B_E,
            B_SHARED, B_K);
    return fclose(f) ? -EIO : 0;
}

/* Weight bytes one decode token streams. */
static double bytes_per_token(void)
{
    double b = 0;
    for (size_t i = 0; i < n_t; i++) {
        const bt *t = &tensors[i];
        if (!strcmp(t->name, "model.embed_tokens.weight"))
            b += B_D * 2.0; /* one row */
        else if (strstr(t->name, ".experts."))
            b += t_bytes(t) * (double)B_K / B_E;
        else
            b += (double)t_bytes(t);
    }
    return b;
}

typedef struct cp_ctx {
    char *dst;
    const char *src;
    size_t chunk, total;
} cp_ctx;

static void cp_task(void *arg, uint32_t i)
{
    cp_ctx *c = arg;
    size_t off = (size_t)i * c->chunk, n = c->chunk;
    if (off + n > c->total)
        n = c->total - off;
    memcpy(c->dst + off, c->src + off, n);
}

/* STREAM "copy": bytes read + written per second, best of 5. */
static double stream_copy_gbs(ds_pool *pool)
{
    size_t total = 256u << 20;
    char *a = malloc(total), *b = malloc(total);
    if (!a || !b)
        return 0;
    memset(a, 1, total);
    memset(b, 2, total);
    cp_ctx c = {b, a, 4u << 20, total};
    double best = 0;
    for (int r = 0; r < 5; r++) {
        double t0 = now_s();
        ds_pool_run(pool, (uint32_t)(total / c.chunk), cp_task, &c);
        double gbs = 2.0 * total / (now_s() - t0) / 1e9;
        best = gbs > best ? gbs : best;
    }
    free(a);
    free(b);
    return best;
}

int main(int argc, char **argv)
{
    uint32_t threads = 0, ntok = 128;
    const char *keep = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
            ntok = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--keep") && i + 1 < argc)
            keep = argv[++i];
        else {
            fprintf(stderr, "usage: bench_decode [--threads N] [--tokens N] [--keep DIR]\n");
            return 2;
        }
    }
    char tmpl[] = "/tmp/ds_bench_decode_XXXXXX";
    const char *dir = keep;
    if (!dir && !(dir = mkdtemp(tmpl))) {
        perror("mkdtemp");
        return 1;
    }
    double t0 = now_s();
    int rc = write_checkpoint(dir);
    if (rc < 0) {
        fprintf(stderr, "bench_decode: writing %s: %s\n", dir, strerror(-rc));
        return 1;
    }
    double total_bytes = 0;
    for (size_t i = 0; i < n_t; i++)
        total_bytes += (double)t_bytes(&tensors[i]);
    printf("checkpoint: %s, %.0f MB BF16 (%zu tensors), written in %.1f s\n", dir,
           total_bytes / 1e6, n_t, now_s() - t0);
    ds_model *m = NULL;
    ds_error err = {0};
    ds_pool *pool = NULL;
    ds_engine *e = NULL;
    if ((rc = ds_model_open(dir, NULL, &m, &err)) < 0 || ds_pool_new(threads, NULL, 0, &pool) < 0 ||
        ds_engine_new(m, pool, ntok + 16, &e, &err) < 0) {
        fprintf(stderr, "bench_decode: %s\n", ds_error_str(&err));
        return 1;
    }
    int seq = ds_engine_seq_add(e);
    float *lg = malloc((size_t)B_VOCAB * sizeof(float));
    int32_t tok = 3;
    /* warm-up: fault the mapping in (2 tokens touch the non-expert weights; experts vary) */
    for (int i = 0; i < 2; i++) {
        ds_engine_forward(e, 1, &seq, &tok, lg, &err);
        tok = ds_sampler_pick(&(ds_sampler){.greedy = true}, lg, B_VOCAB);
    }
    double t1 = now_s();
    for (uint32_t i = 0; i < ntok; i++) {
        if (ds_engine_forward(e, 1, &seq, &tok, lg, &err) < 0) {
            fprintf(stderr, "bench_decode: %s\n", ds_error_str(&err));
            return 1;
        }
        tok = ds_sampler_pick(&(ds_sampler){.greedy = true}, lg, B_VOCAB);
    }
    double dt = now_s() - t1;
    double tps = ntok / dt, bpt = bytes_per_token();
    double wgbs = tps * bpt / 1e9;
    double cgbs = stream_copy_gbs(pool);
    printf("threads: %u\n", ds_pool_size(pool));
    printf("decode: %u tokens in %.2f s = %.2f tokens/s (batch 1)\n", ntok, dt, tps);
    printf("weights streamed per token: %.1f MB\n", bpt / 1e6);
    printf("%-34s %10s\n", "", "GB/s");
    printf("%-34s %10.2f\n", "decode weight streaming", wgbs);
    printf("%-34s %10.2f\n", "STREAM-style copy (read+write)", cgbs);
    printf("ratio decode / copy: %.2f\n", cgbs > 0 ? wgbs / cgbs : 0);
    free(lg);
    ds_engine_free(e);
    ds_pool_free(pool);
    ds_model_free(m);
    if (!keep) {
        char p[600];
        snprintf(p, sizeof(p), "%s/model.safetensors", dir);
        unlink(p);
        snprintf(p, sizeof(p), "%s/config.json", dir);
        unlink(p);
        rmdir(dir);
    }
    return 0;
}
