/* bench_engine.c — the engine's prefill and batch-1 decode speed on a real checkpoint, against
 * the read bandwidth of this machine measured in the same run with the same threads.
 *
 * bench/bench_vs_llama.sh runs it beside llama.cpp's llama-bench on the same weights (converted
 * to GGUF), so the figures mean the same thing on both sides: prefill = one forward pass over a
 * PROMPT-row prompt into a fresh sequence (no logits, as llama-bench only computes the last
 * row's); decode = DECODE tokens, one per forward pass, from an empty sequence (llama-bench's
 * tg test); each REPEAT times, tokens/s averaged over the repeats (llama-bench's avg_ts), best
 * also printed. Load and page faults are excluded by a warm-up pass over every weight.
 *
 * Decode of one sequence is bound by weight streaming: bytes_per_token (bench_ckpt.h) times
 * tokens/s is the GB/s the kernels reach, and read_gbs is what the memory system gives: every
 * pool thread sums its part of a 1 GiB buffer (far above the last-level cache) with AVX2
 * loads into several independent accumulators, best of 5.
 *
 *   bench_engine write DIR [--tokenizer DIR] [--shape v2-1.3g|v2-4g]
 *                          a V2-shaped BF16 checkpoint (below; default the ~1.3 GB one), with
 *                          tokenizer.json/_config.json from models/tiny
 *   bench_engine run --model DIR|FILE.gguf [--threads N] [--decode N] [--prompt N] [--repeat R]
 *
 * For a GGUF the bytes per token are counted from its tensor table (each tensor's real type).
 *
 * `run` prints human lines and one `key=value` line per metric for scripts. */
#include <errno.h>
#include <fcntl.h>
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bench_ckpt.h"
#include "ds_backend_units.h"
#include "ds_engine.h"
#include "ds_model.h"
#include "ds_pool.h"

/* DeepSeek-V2 proportions at 1/10 width: MLA with the real kv_lora_rank 512 and 128/64/128 head
 * dims, 64 routed experts of which 6 per token, 2 shared, one leading dense layer. The vocab is
 * DeepSeek-Coder's (32256), the smallest DeepSeek tokenizer llama.cpp's converter recognises
 * (bench/llama_tokenizer.py). 1.32 GB of BF16, 387.5 MB streamed per decode token. */
static const bench_shape shape_1g = {
    .vocab = 32256,
    .d = 1536,
    .layers = 8,
    .heads = 12,
    .kv_lora = 512,
    .nope = 128,
    .rope = 64,
    .v = 128,
    .experts = 64,
    .topk = 6,
    .shared = 2,
    .moe_inter = 224,
    .dense_inter = 4096,
};

/* The same proportions at 2048 wide, 9 layers, expert width 512 (every K-quant row whole: a
 * multiple of 256), for the quantised GGUF benchmarks: 3.9 GB of BF16, so that its Q4_K_M from
 * llama-quantize is still above 1 GB (Q8_0 ~2.1 GB). */
static const bench_shape shape_4g = {
    .vocab = 32256,
    .d = 2048,
    .layers = 9,
    .heads = 16,
    .kv_lora = 512,
    .nope = 128,
    .rope = 64,
    .v = 128,
    .experts = 64,
    .topk = 6,
    .shared = 2,
    .moe_inter = 512,
    .dense_inter = 5632,
};

static int copy_file(const char *from, const char *to)
{
    FILE *in = fopen(from, "rb");
    if (!in)
        return -errno;
    FILE *out = fopen(to, "wb");
    if (!out) {
        int rc = -errno;
        fclose(in);
        return rc;
    }
    char buf[1 << 16];
    size_t n;
    int rc = 0;
    while (!rc && (n = fread(buf, 1, sizeof(buf), in)) > 0)
        if (fwrite(buf, 1, n, out) != n)
            rc = -EIO;
    if (ferror(in))
        rc = -EIO;
    fclose(in);
    if (fclose(out) && !rc)
        rc = -EIO;
    return rc;
}

static int cmd_write(int argc, char **argv)
{
    const char *dir = NULL, *tok = DS_SOURCE_ROOT "/models/tiny";
    const bench_shape *shape = &shape_1g;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc)
            tok = argv[++i];
        else if (!strcmp(argv[i], "--shape") && i + 1 < argc && !strcmp(argv[i + 1], "v2-1.3g"))
            shape = &shape_1g, i++;
        else if (!strcmp(argv[i], "--shape") && i + 1 < argc && !strcmp(argv[i + 1], "v2-4g"))
            shape = &shape_4g, i++;
        else if (!dir && argv[i][0] != '-')
            dir = argv[i];
        else
            dir = NULL, i = argc;
    }
    if (!dir) {
        fprintf(stderr, "usage: bench_engine write DIR [--tokenizer DIR] [--shape v2-1.3g|v2-4g]\n");
        return 2;
    }
    if (mkdir(dir, 0755) && errno != EEXIST) {
        fprintf(stderr, "bench_engine: %s: %s\n", dir, strerror(errno));
        return 1;
    }
    double t0 = bench_now_s(), bytes = 0;
    int rc = bench_ckpt_write(dir, shape, &bytes);
    static const char *const tok_files[] = {"tokenizer.json", "tokenizer_config.json"};
    for (size_t i = 0; i < 2 && !rc; i++) {
        char from[4096], to[4096];
        snprintf(from, sizeof(from), "%s/%s", tok, tok_files[i]);
        snprintf(to, sizeof(to), "%s/%s", dir, tok_files[i]);
        if ((rc = copy_file(from, to)) < 0)
            fprintf(stderr, "bench_engine: copying %s: %s\n", from, strerror(-rc));
    }
    if (rc < 0) {
        fprintf(stderr, "bench_engine: writing %s: %s\n", dir, strerror(-rc));
        return 1;
    }
    printf("checkpoint: %s, %.2f GB BF16, written in %.1f s\n", dir, bytes / 1e9,
           bench_now_s() - t0);
    return 0;
}

/* ---- read bandwidth ---- */

/* ---- engine ---- */

typedef struct stats {
    double mean, best; /* tokens/s: mean over the repeats (llama-bench's avg_ts), best */
} stats;

static void stats_add(stats *s, double tps, uint32_t r, uint32_t of)
{
    s->mean += tps / of;
    if (!r || tps > s->best)
        s->best = tps;
}

/* Tokens are a fixed pseudo-random sequence in [2, vocab): what is fed does not change the
 * work per token, except for which experts run, and varied tokens spread those as text does. */
static int32_t token_at(uint32_t i, uint32_t vocab)
{
    return (int32_t)(2 + (i * 2654435761u >> 7) % (vocab - 2));
}

static int run_prompt(ds_engine *e, uint32_t n, uint32_t vocab, double *secs, ds_error *err)
{
    int seq = ds_engine_seq_add(e);
    if (seq < 0)
        return ds_error_set(err, seq, "adding a sequence");
    int *seqs = malloc(n * sizeof(*seqs));
    int32_t *toks = malloc(n * sizeof(*toks));
    int rc = seqs && toks ? 0 : -ENOMEM;
    for (uint32_t i = 0; i < n && !rc; i++) {
        seqs[i] = seq;
        toks[i] = token_at(i, vocab);
    }
    double t0 = bench_now_s();
    if (!rc)
        rc = ds_engine_forward(e, n, seqs, toks, NULL, err);
    *secs = bench_now_s() - t0;
    ds_engine_seq_remove(e, seq);
    free(seqs);
    free(toks);
    return rc;
}

/* n decode steps from an empty sequence; each step's logits are computed (as a real decode
 * needs them) and the fed token is the fixed sequence, not the argmax, so the routed experts
 * stay varied whatever the random weights prefer. */
static int run_decode(ds_engine *e, uint32_t n, uint32_t vocab, float *logits, double *secs,
                      ds_error *err)
{
    int seq = ds_engine_seq_add(e);
    if (seq < 0)
        return ds_error_set(err, seq, "adding a sequence");
    int rc = 0;
    double t0 = bench_now_s();
    for (uint32_t i = 0; i < n && !rc; i++) {
        int32_t tok = token_at(1000 + i, vocab);
        rc = ds_engine_forward(e, 1, &seq, &tok, logits, err);
    }
    *secs = bench_now_s() - t0;
    ds_engine_seq_remove(e, seq);
    return rc;
}

static int cmd_run(int argc, char **argv)
{
    const char *dir = NULL, *attn_on = NULL;
    bool fast = false;
    uint32_t threads = 0, ndec = 64, nprompt = 128, reps = 3;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        int more = i + 1 < argc;
        if (!strcmp(a, "--model") && more)
            dir = argv[++i];
        else if (!strcmp(a, "--threads") && more)
            threads = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(a, "--decode") && more)
            ndec = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(a, "--prompt") && more)
            nprompt = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(a, "--repeat") && more)
            reps = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(a, "--attn-on") && more)
            attn_on = argv[++i]; /* attention, KV, FFNs, embed, head on a backend */
        else if (!strcmp(a, "--fast"))
            fast = true;
        else
            dir = NULL, i = argc;
    }
    if (!dir || !ndec || !nprompt || !reps || ndec > 65536 || nprompt > 65536 || reps > 1000) {
        fprintf(stderr, "usage: bench_engine run --model DIR [--threads N] [--decode N] "
                        "[--prompt N] [--repeat R] [--attn-on SPEC [--fast]]\n");
        return 2;
    }
    ds_backend *bk = NULL;
    ds_backend_units *bu = NULL;
    ds_model *m = NULL;
    ds_pool *pool = NULL;
    ds_engine *e = NULL;
    ds_error err = {0};
    float *logits = NULL;
    int status = 1;
    double t0 = bench_now_s();
    if (ds_model_open(dir, NULL, &m, &err) < 0 || ds_pool_new(threads, NULL, 0, &pool) < 0 ||
        ds_engine_new(m, pool, (nprompt > ndec ? nprompt : ndec) + 8, &e, &err) < 0) {
        fprintf(stderr, "bench_engine: %s\n", err.msg[0] ? ds_error_str(&err) : "out of memory");
        goto out;
    }
    if (attn_on) { /* every unit but the routed experts on the device (the KTransformers layout) */
        if (ds_backend_open(attn_on, &bk, &err) < 0 ||
            ds_backend_units_new(m, pool, bk, NULL, NULL, &bu, &err) < 0) {
            fprintf(stderr, "bench_engine: --attn-on %s: %s\n", attn_on, ds_error_str(&err));
            goto out;
        }
        ds_backend_units_set_exact(bu, !fast);
        ds_engine_set_units(e, &ds_backend_units_ops, bu);
    }
    const ds_model_config *c = ds_model_get_config(m);
    if (c->vocab_size < 3 || !(logits = malloc((size_t)c->vocab_size * sizeof(*logits)))) {
        fprintf(stderr, "bench_engine: vocab_size %u\n", c->vocab_size);
        goto out;
    }
    double load_s = bench_now_s() - t0, secs;
    /* Warm-up: a prompt faults in every non-expert weight and, with enough rows, nearly every
     * expert; a few decode steps warm the decode path. */
    t0 = bench_now_s();
    if (run_prompt(e, nprompt, c->vocab_size, &secs, &err) < 0 ||
        run_decode(e, 4, c->vocab_size, logits, &secs, &err) < 0)
        goto fail;
    double warm_s = bench_now_s() - t0;
    stats pre = {0}, dec = {0};
    for (uint32_t r = 0; r < reps; r++) {
        if (run_prompt(e, nprompt, c->vocab_size, &secs, &err) < 0)
            goto fail;
        stats_add(&pre, nprompt / secs, r, reps);
    }
    for (uint32_t r = 0; r < reps; r++) {
        if (run_decode(e, ndec, c->vocab_size, logits, &secs, &err) < 0)
            goto fail;
        stats_add(&dec, ndec / secs, r, reps);
    }
    double bpt = bench_bytes_per_token(c), rgbs = bench_read_gbs(pool);
    size_t dl = strlen(dir);
    if (dl > 5 && !strcmp(dir + dl - 5, ".gguf") && bench_bytes_per_token_gguf(dir, c, &bpt) < 0) {
        fprintf(stderr, "bench_engine: cannot read the tensor table of %s\n", dir);
        goto out;
    }
    double dgbs = dec.mean * bpt / 1e9;
    uint32_t nt = ds_pool_size(pool);
    printf("model: %s (load %.1f s, warm-up %.1f s)\n", dir, load_s, warm_s);
    printf("threads: %u\n", nt);
    printf("prefill: %u-token prompt, %.2f tokens/s (mean of %u; best %.2f)\n", nprompt, pre.mean,
           reps, pre.best);
    printf("decode:  %u tokens, batch 1, %.2f tokens/s (mean of %u; best %.2f)\n", ndec, dec.mean,
           reps, dec.best);
    printf("weights streamed per decode token: %.1f MB\n", bpt / 1e6);
    printf("decode weight streaming: %.2f GB/s = %.0f%% of the read bandwidth (%.2f GB/s)\n", dgbs,
           rgbs > 0 ? 100 * dgbs / rgbs : 0, rgbs);
    if (attn_on)
        printf("attn_on=%s%s (%s)\n", attn_on, fast ? " fast" : " exact", ds_backend_device(bk));
    printf("threads=%u\n", nt);
    printf("prompt_rows=%u\n", nprompt);
    printf("prefill_tok_s=%.3f\n", pre.mean);
    printf("prefill_tok_s_best=%.3f\n", pre.best);
    printf("decode_tok_s=%.3f\n", dec.mean);
    printf("decode_tok_s_best=%.3f\n", dec.best);
    printf("bytes_per_token=%.0f\n", bpt);
    printf("decode_gbs=%.3f\n", dgbs);
    printf("read_gbs=%.3f\n", rgbs);
    status = 0;
    goto out;
fail:
    fprintf(stderr, "bench_engine: %s\n", ds_error_str(&err));
out:
    free(logits);
    ds_engine_free(e); /* before the device units: the caches live on the device */
    ds_backend_units_free(bu);
    ds_backend_free(bk);
    ds_pool_free(pool);
    ds_model_free(m);
    return status;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && !strcmp(argv[1], "write"))
        return cmd_write(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "run"))
        return cmd_run(argc, argv);
    fprintf(stderr, "usage: bench_engine write DIR [--tokenizer DIR]\n"
                    "       bench_engine run --model DIR [--threads N] [--decode N] [--prompt N] "
                    "[--repeat R] [--attn-on SPEC [--fast]]\n");
    return 2;
}
