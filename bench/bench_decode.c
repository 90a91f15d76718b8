/* bench_decode.c — CPU decode speed of the engine against this machine's memory bandwidth.
 *
 * Generates a V2-Lite-proportioned checkpoint (no q LoRA, 1 dense + MoE layers, 32 routed
 * experts of which 6 per token, 2 shared) with random BF16 weights, written as a real
 * safetensors checkpoint (bench_ckpt.c) to a temporary directory, opens it like any checkpoint
 * (mmap) and decodes greedily with batch 1. Prints tokens/s, the weight bytes streamed per token
 * (every non-expert weight + the 6 chosen experts of each MoE layer + lm_head), the achieved
 * weight-streaming GB/s, a STREAM-style copy GB/s measured in the same run with the same
 * threads, and their ratio. Decode of one sequence is bound by weight streaming, so the ratio
 * says how close the kernels come to the memory system.
 *
 * usage: bench_decode [--threads N] [--tokens N] [--keep DIR] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench_ckpt.h"
#include "ds_engine.h"
#include "ds_model.h"
#include "ds_pool.h"

/* Medium model (about 320 MB of BF16). */
static const bench_shape shape = {
    .vocab = 16384,
    .d = 1024,
    .layers = 5,
    .heads = 8,
    .kv_lora = 256,
    .nope = 64,
    .rope = 32,
    .v = 64,
    .experts = 32,
    .topk = 6,
    .shared = 2,
    .moe_inter = 256,
    .dense_inter = 2816,
};

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
        double t0 = bench_now_s();
        ds_pool_run(pool, (uint32_t)(total / c.chunk), cp_task, &c);
        double gbs = 2.0 * total / (bench_now_s() - t0) / 1e9;
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
    double t0 = bench_now_s(), total_bytes = 0;
    int rc = bench_ckpt_write(dir, &shape, &total_bytes);
    if (rc < 0) {
        fprintf(stderr, "bench_decode: writing %s: %s\n", dir, strerror(-rc));
        return 1;
    }
    printf("checkpoint: %s, %.0f MB BF16, written in %.1f s\n", dir, total_bytes / 1e6,
           bench_now_s() - t0);
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
    float *lg = malloc((size_t)shape.vocab * sizeof(float));
    int32_t tok = 3;
    /* warm-up: fault the mapping in (2 tokens touch the non-expert weights; experts vary) */
    for (int i = 0; i < 2; i++) {
        ds_engine_forward(e, 1, &seq, &tok, lg, &err);
        tok = ds_sampler_pick(&(ds_sampler){.greedy = true}, lg, shape.vocab);
    }
    double t1 = bench_now_s();
    for (uint32_t i = 0; i < ntok; i++) {
        if (ds_engine_forward(e, 1, &seq, &tok, lg, &err) < 0) {
            fprintf(stderr, "bench_decode: %s\n", ds_error_str(&err));
            return 1;
        }
        tok = ds_sampler_pick(&(ds_sampler){.greedy = true}, lg, shape.vocab);
    }
    double dt = bench_now_s() - t1;
    double tps = ntok / dt, bpt = bench_bytes_per_token(ds_model_get_config(m));
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
