/* bench_ops.c — where one decode token and one prefill go, op by op, on a real checkpoint.
 *
 * For every distinct linear weight shape of the model (attention projections, router gate,
 * routed expert, shared experts, dense FFN, lm_head) it times the engine's matmul alone
 * (ds_weight_matmul on that layer's weight, from the mapping) for 1 input row (decode) and for
 * the rows a prefill of PROMPT tokens gives it (PROMPT, or PROMPT*k/E for a routed expert), and
 * prints ms, GB/s of weight streamed and GFLOP/s. It then adds the op times up the way one
 * token uses them (each layer's projections, k experts, the shared or dense FFN, the head) and
 * compares the sum with a measured decode step and a measured prefill of the whole engine: the
 * difference is the time outside the matmuls (attention over the cache, norms, rope, router,
 * combine, pool hand-offs). It also times an empty parallel loop (the pool's hand-off) and the
 * read bandwidth with the same threads (bench_read_gbs, the figure bench_engine reports).
 *
 *   bench_ops --model DIR [--threads N] [--prompt N]
 *
 * All figures come from this one run; nothing is asserted. */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_ckpt.h"
#include "ds_engine.h"
#include "ds_model.h"
#include "ds_pool.h"
#include "ds_tensor.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

#define MAX_W 4096

/* One kind of matmul: the same shape in every layer (and every expert) that has it. Timing
 * cycles through all of them, so each call streams its weight from memory as decode does (one
 * layer's weight alone would sit in the cache). */
typedef struct op {
    const char *what;
    double per_token; /* uses per decode token */
    double rows_prefill;
    ds_weight *w; /* [nw] */
    uint32_t nw;
    double dec_s, pre_s; /* seconds per call */
} op;

static int bind_one(const ds_st *st, const ds_model_config *c, const char *name, ds_weight *w)
{
    const ds_st_tensor *t = ds_st_find(st, name);
    if (!t || t->ndim != 2)
        return -ENOENT;
    memset(w, 0, sizeof(*w));
    w->rows = (uint32_t)t->shape[0];
    w->cols = (uint32_t)t->shape[1];
    w->data = t->data;
    switch (t->dtype) {
    case DS_ST_F32:
        w->dtype = DS_DTYPE_F32;
        return 0;
    case DS_ST_BF16:
        w->dtype = DS_DTYPE_BF16;
        return 0;
    case DS_ST_F16:
        w->dtype = DS_DTYPE_F16;
        return 0;
    case DS_ST_F8_E4M3: {
        char sn[200];
        snprintf(sn, sizeof(sn), "%s_scale_inv", name);
        const ds_st_tensor *s = ds_st_find(st, sn);
        if (!s)
            return -ENOENT;
        w->dtype = DS_DTYPE_F8_E4M3;
        w->scale_inv = s->data;
        w->block_rows = c->fp8_block_rows;
        w->block_cols = c->fp8_block_cols;
        return 0;
    }
    default:
        return -ENOTSUP;
    }
}

/* Binds `fmt` (with %u for the layer, then %u for the expert when experts) in every layer of
 * the kind (moe: MoE layers, else dense ones; all: every layer). */
static void bind(const ds_st *st, const ds_model_config *c, op *o, int which, bool experts,
                 const char *fmt)
{
    o->w = calloc(MAX_W, sizeof(ds_weight));
    o->nw = 0;
    for (uint32_t l = 0; l < c->num_hidden_layers; l++) {
        bool moe = ds_model_config_layer_is_moe(c, l);
        if ((which == 1 && !moe) || (which == 0 && moe))
            continue;
        uint32_t ne = experts ? c->n_routed_experts : 1;
        for (uint32_t e = 0; e < ne && o->nw < MAX_W; e++) {
            char name[200];
            snprintf(name, sizeof(name), fmt, l, e);
            if (bind_one(st, c, name, &o->w[o->nw]) == 0)
                o->nw++;
        }
    }
}

static size_t wbytes(const ds_weight *w)
{
    size_t el = w->dtype == DS_DTYPE_F32 ? 4 : w->dtype == DS_DTYPE_F8_E4M3 ? 1 : 2;
    return (size_t)w->rows * w->cols * el;
}

/* Seconds per call, cycling through the op's weights for at least `budget` seconds (after one
 * warm pass that faults the mapping in). */
static double time_mm(const op *o, uint32_t n, ds_pool *pool, double budget)
{
    const ds_weight *w = &o->w[0];
    float *x = malloc((size_t)n * w->cols * sizeof(float));
    float *y = malloc((size_t)n * w->rows * sizeof(float));
    if (!x || !y)
        exit(1);
    for (size_t i = 0; i < (size_t)n * w->cols; i++)
        x[i] = (float)((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
    for (uint32_t j = 0; j < o->nw; j++)
        ds_weight_matmul(&o->w[j], x, n, y, pool);
    int reps = 0;
    double t0 = now_s(), t;
    do {
        ds_weight_matmul(&o->w[reps % o->nw], x, n, y, pool);
        reps++;
    } while ((t = now_s() - t0) < budget);
    free(x);
    free(y);
    return t / reps;
}

static void noop(void *ctx, uint32_t i)
{
    (void)ctx;
    (void)i;
}

int main(int argc, char **argv)
{
    const char *dir = NULL;
    uint32_t threads = 1, prompt = 128;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc)
            dir = argv[++i];
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = (uint32_t)strtoul(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--prompt") && i + 1 < argc)
            prompt = (uint32_t)strtoul(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: bench_ops --model DIR [--threads N] [--prompt N]\n");
            return 2;
        }
    }
    if (!dir || threads < 1 || threads > 256 || prompt < 1 || prompt > 4096) {
        fprintf(stderr, "usage: bench_ops --model DIR [--threads 1..256] [--prompt 1..4096]\n");
        return 2;
    }
    ds_error err = {0};
    ds_model *m = NULL;
    ds_st *st = NULL;
    ds_pool *pool = NULL;
    if (ds_model_open(dir, NULL, &m, &err) < 0 || ds_st_open_dir(dir, &st, &err) < 0 ||
        ds_pool_new(threads, NULL, 0, &pool) < 0) {
        fprintf(stderr, "bench_ops: %s\n", ds_error_str(&err));
        return 1;
    }
    const ds_model_config *c = ds_model_get_config(m);
    uint32_t L = c->num_hidden_layers, moe_layers = 0;
    for (uint32_t l = 0; l < L; l++)
        moe_layers += ds_model_config_layer_is_moe(c, l);
    uint32_t dense_layers = L - moe_layers;
    double k = c->num_experts_per_tok, E = c->n_routed_experts ? c->n_routed_experts : 1;
    op ops[32];
    int n_ops = 0;
#define OP(WHAT, PER, ROWS, WHICH, EXPERTS, FMT)                                                   \
    do {                                                                                           \
        op *o_ = &ops[n_ops];                                                                      \
        memset(o_, 0, sizeof(*o_));                                                                \
        o_->what = WHAT;                                                                           \
        o_->per_token = PER;                                                                       \
        o_->rows_prefill = ROWS;                                                                   \
        bind(st, c, o_, WHICH, EXPERTS, FMT);                                                      \
        if (o_->nw)                                                                                \
            n_ops++;                                                                               \
        else                                                                                       \
            free(o_->w);                                                                           \
    } while (0)
    double P = prompt;
    OP("q_a (per layer)", L, P, 2, false, "model.layers.%u.self_attn.q_a_proj.weight");
    OP("q_b (per layer)", L, P, 2, false, "model.layers.%u.self_attn.q_b_proj.weight");
    OP("q_proj (per layer)", L, P, 2, false, "model.layers.%u.self_attn.q_proj.weight");
    OP("kv_a (per layer)", L, P, 2, false, "model.layers.%u.self_attn.kv_a_proj_with_mqa.weight");
    OP("o_proj (per layer)", L, P, 2, false, "model.layers.%u.self_attn.o_proj.weight");
    OP("router gate (MoE layer)", moe_layers, P, 1, false, "model.layers.%u.mlp.gate.weight");
    OP("expert gate (k per MoE layer)", k * moe_layers, P * k / E, 1, true,
       "model.layers.%u.mlp.experts.%u.gate_proj.weight");
    OP("expert up", k * moe_layers, P * k / E, 1, true,
       "model.layers.%u.mlp.experts.%u.up_proj.weight");
    OP("expert down", k * moe_layers, P * k / E, 1, true,
       "model.layers.%u.mlp.experts.%u.down_proj.weight");
    OP("shared gate", moe_layers, P, 1, false,
       "model.layers.%u.mlp.shared_experts.gate_proj.weight");
    OP("shared up", moe_layers, P, 1, false, "model.layers.%u.mlp.shared_experts.up_proj.weight");
    OP("shared down", moe_layers, P, 1, false,
       "model.layers.%u.mlp.shared_experts.down_proj.weight");
    OP("dense gate", dense_layers, P, 0, false, "model.layers.%u.mlp.gate_proj.weight");
    OP("dense up", dense_layers, P, 0, false, "model.layers.%u.mlp.up_proj.weight");
    OP("dense down", dense_layers, P, 0, false, "model.layers.%u.mlp.down_proj.weight");
    OP("lm_head", 1, 1, 2, false, "lm_head.weight");
#undef OP
    printf("model %s: %u layers (%u MoE), threads %u, prompt %u\n", dir, L, moe_layers,
           ds_pool_size(pool), prompt);
    double rbw = bench_read_gbs(pool);
    printf("read bandwidth (1 GiB, same threads): %.2f GB/s\n", rbw);
    /* the pool's hand-off: an empty parallel loop of `threads` indices */
    double t0 = now_s();
    for (int i = 0; i < 20000; i++)
        ds_pool_run(pool, ds_pool_size(pool), noop, NULL);
    double handoff_us = (now_s() - t0) / 20000 * 1e6;
    printf("empty parallel loop: %.2f us\n\n", handoff_us);
    printf("%-30s %11s %5s | %8s %7s %6s | %5s %8s %7s\n", "op", "shape", "dtype", "dec ms", "GB/s",
           "%read", "rows", "pre ms", "GFLOP/s");
    double dec_sum = 0, pre_sum = 0, bytes_tok = 0, calls_tok = 0;
    for (int i = 0; i < n_ops; i++) {
        op *o = &ops[i];
        uint32_t pr = (uint32_t)(o->rows_prefill + 0.5);
        pr = pr < 1 ? 1 : pr;
        o->dec_s = time_mm(o, 1, pool, 0.15);
        o->pre_s = time_mm(o, pr, pool, 0.3);
        const ds_weight *w = &o->w[0];
        double gbs = (double)wbytes(w) / o->dec_s / 1e9;
        double gfl = 2.0 * w->rows * w->cols * pr / o->pre_s / 1e9;
        char shape[32];
        snprintf(shape, sizeof(shape), "%ux%u", w->rows, w->cols);
        const char *dt = w->dtype == DS_DTYPE_F32    ? "F32"
                         : w->dtype == DS_DTYPE_BF16 ? "BF16"
                         : w->dtype == DS_DTYPE_F16  ? "F16"
                                                     : "FP8";
        printf("%-30s %11s %5s | %8.3f %7.2f %5.0f%% | %5u %8.3f %7.1f\n", o->what, shape, dt,
               o->dec_s * 1e3, gbs, rbw > 0 ? 100 * gbs / rbw : 0, pr, o->pre_s * 1e3, gfl);
        dec_sum += o->per_token * o->dec_s;
        /* prefill: every routed expert gets its share of the rows */
        double pre_calls = o->per_token * (strstr(o->what, "expert") ? E / k : 1);
        if (!strcmp(o->what, "lm_head"))
            pre_calls = 1;
        pre_sum += pre_calls * o->pre_s;
        bytes_tok += o->per_token * (double)wbytes(w);
        calls_tok += o->per_token;
    }
    /* the whole engine: decode steps and one prefill */
    ds_engine *e = NULL;
    if (ds_engine_new(m, pool, prompt + 80, &e, &err) < 0) {
        fprintf(stderr, "bench_ops: %s\n", ds_error_str(&err));
        return 1;
    }
    int32_t *toks = malloc(prompt * sizeof(int32_t));
    int *seqs = malloc(prompt * sizeof(int));
    float *lg = malloc((size_t)c->vocab_size * sizeof(float));
    int s = ds_engine_seq_add(e);
    for (uint32_t i = 0; i < prompt; i++) {
        toks[i] = (int32_t)((7 + 131 * i) % c->vocab_size);
        seqs[i] = s;
    }
    ds_engine_forward(e, prompt, seqs, toks, NULL, &err); /* warm-up: faults the mapping in */
    ds_engine_seq_remove(e, s);
    s = ds_engine_seq_add(e);
    for (uint32_t i = 0; i < prompt; i++)
        seqs[i] = s;
    t0 = now_s();
    ds_engine_forward(e, prompt, seqs, toks, NULL, &err);
    double pre_eng = now_s() - t0;
    int32_t tok = 3;
    ds_engine_forward(e, 1, &s, &tok, lg, &err);
    t0 = now_s();
    enum { DEC = 48 };
    for (int i = 0; i < DEC; i++)
        ds_engine_forward(e, 1, &s, &tok, lg, &err);
    double dec_eng = (now_s() - t0) / DEC;
    printf("\nper decode token: matmuls alone %.2f ms (%.0f calls, %.1f MB of weights: %.2f GB/s);"
           " engine %.2f ms (%.2f GB/s, %.0f%% of read);\n  outside the matmuls %.2f ms (%.0f%%):"
           " attention over the cache, norms, rope, router, combine, %.0f pool hand-offs\n",
           dec_sum * 1e3, calls_tok, bytes_tok / 1e6, bytes_tok / dec_sum / 1e9, dec_eng * 1e3,
           bytes_tok / dec_eng / 1e9, rbw > 0 ? 100 * bytes_tok / dec_eng / 1e9 / rbw : 0,
           (dec_eng - dec_sum) * 1e3, 100 * (dec_eng - dec_sum) / dec_eng, calls_tok);
    printf("prefill of %u tokens: matmuls alone %.1f ms; engine %.1f ms (%.1f tokens/s); outside "
           "the matmuls %.1f ms (%.0f%%)\n",
           prompt, pre_sum * 1e3, pre_eng * 1e3, prompt / pre_eng, (pre_eng - pre_sum) * 1e3,
           100 * (pre_eng - pre_sum) / pre_eng);
    printf("decode_ms=%.3f matmul_ms=%.3f prefill_ms=%.1f prefill_matmul_ms=%.1f read_gbs=%.2f "
           "handoff_us=%.2f\n",
           dec_eng * 1e3, dec_sum * 1e3, pre_eng * 1e3, pre_sum * 1e3, rbw, handoff_us);
    for (int i = 0; i < n_ops; i++)
        free(ops[i].w);
    free(toks);
    free(seqs);
    free(lg);
    ds_engine_free(e);
    ds_pool_free(pool);
    ds_st_free(st);
    ds_model_free(m);
    return 0;
}
