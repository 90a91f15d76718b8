/* dsctl_generate.c — `dsctl generate --local`: run a checkpoint in-process (no daemon).
 *
 * The model is an HF checkpoint directory or a llama.cpp GGUF file (docs/gguf.md). The prompt
 * is either ids (--tokens) or text (positional argument, "-" = stdin), encoded with the model
 * directory's tokenizer.json (BOS per tokenizer_config.json) or the GGUF's tokenizer metadata.
 * For a text prompt the generated text is streamed to stdout as tokens arrive (whole UTF-8
 * characters only) and generation stops at EOS unless --ignore-eos. Either way the last line
 * printed is `tokens: a,b,c` (the generated ids); with --logits-out writes float32 little-endian
 * logits, one row of vocab_size per position fed to the model (the prompt, then every generated
 * token but the last). --experts-on SPEC runs every routed expert on a compute backend
 * (experts/ds_backend_moe.h) instead of the CPU engine (HF checkpoints only so far);
 * --device attn=DEV,experts=DEV places the other units too (experts/ds_backend_units.h:
 * attention with its KV cache and router, dense and shared FFNs, embedding and head). */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds_backend_moe.h"
#include "ds_backend_units.h"
#include "ds_engine.h"
#include "ds_model.h"
#include "ds_tokenizer.h"
#include "dsctl.h"
#include "dsctl_generate_plan.h"

/* The cluster side of `dsctl generate` (client/dsctl_generate_cluster.c). */
int dsctl_generate_cluster(int argc, char **argv);
/* Text prompts on the cluster (client/dsctl_generate_text.c). */
int dsctl_generate_cluster_text(int argc, char **argv);

#define GEN_MAX_TOKENS       1000000
#define GEN_MAX_PROMPT_BYTES (16u << 20) /* text prompt read from stdin */

static void gen_usage(FILE *f)
{
    fprintf(
        f,
        "usage: dsctl generate --local --model DIR|FILE.gguf --tokens ID,ID,... [options]\n"
        "       dsctl generate [--endpoint E] --tokens ID,ID,... [options]   (cluster; see dsctl "
        "submit --help)\n"
        "       dsctl generate [--endpoint E] --model DIR [options] TEXT|-   (cluster, text "
        "prompt)\n"
        "       dsctl generate --local --model DIR|FILE.gguf [options] TEXT|-\n"
        "  TEXT | -            text prompt (\"-\": read stdin), encoded with DIR/tokenizer.json\n"
        "                      or the GGUF file's tokenizer;\n"
        "                      the generated text is streamed to stdout\n"
        "  --max-tokens N      tokens to generate (default 16)\n"
        "  --greedy            argmax decoding (default when no --temperature)\n"
        "  --temperature T     sample with temperature T > 0\n"
        "  --top-p P           nucleus sampling mass (0, 1]\n"
        "  --top-k K           keep the K most likely tokens\n"
        "  --seed S            sampler seed (default 1)\n"
        "  --threads N         compute threads (default: all online CPUs)\n"
        "  --cpus LIST         pin the threads to these CPUs, e.g. 0-7,16\n"
        "  --logits-out FILE   write float32 LE logits, one row per fed position\n"
        "  --stop-eos          stop at the config's eos_token_id (default for TEXT)\n"
        "  --ignore-eos        do not stop at EOS (TEXT prompts)\n"
        "  --experts-on SPEC   run all routed experts on backend cpu, opencl[:N], cuda[:N]\n"
        "  --quantize q8_0|q4_k  quantise the F32/F16/BF16/FP8 linear weights at load\n"
        "                      (norms, embeddings, router gates stay; q4_k falls back to\n"
        "                      q8_0 for rows not a multiple of 256)\n"
        "  --device KEY=DEV,.. where units run: attn (attention + KV cache + router, dense\n"
        "                      and shared FFNs, embed, head) and experts (routed experts);\n"
        "                      DEV: cpu0 (the CPU engine, default), openclN, cudaN, or a\n"
        "                      backend spec (cpu, opencl[:N], cuda[:N]); exact: the same\n"
        "                      tokens and logits as the CPU engine\n"
        "  --plan FILE         run the units where a `dsctl plan --json` plan puts them\n"
        "                      (by device name: cpuN = the CPU engine, openclN, cudaN)\n"
        "  --fast              with --device attn=...: the device's fast kernels (tree\n"
        "                      RMSNorm, cuBLAS batches on cuda); logits within 1e-3 of\n"
        "                      the exact run, not bit-identical\n");
}

/* A --device value: NULL for the CPU engine (cpuN), else a backend spec in spec[len]
 * (openclN -> opencl:N, cudaN -> cuda:N, a spec as it is). -EINVAL for anything else. */
static int device_spec(const char *dev, size_t n, char *spec, size_t len, bool *engine)
{
    *engine = false;
    static const char *const kinds[] = {"cpu", "opencl", "cuda"};
    for (int k = 0; k < 3; k++) {
        size_t kl = strlen(kinds[k]);
        if (n < kl || strncmp(dev, kinds[k], kl))
            continue;
        const char *rest = dev + kl;
        size_t rn = n - kl, digits = 0;
        while (digits < rn && rest[digits] >= '0' && rest[digits] <= '9')
            digits++;
        if (rn == 0 ||
            (rest[0] == ':' && rn > 1 && digits == 0 && strspn(rest + 1, "0123456789") >= rn - 1)) {
            snprintf(spec, len, "%.*s", (int)n, dev); /* a backend spec */
            return 0;
        }
        if (digits == rn && digits > 0 && digits < 6) {
            if (k == 0) {
                *engine = true;
                return 0;
            }
            snprintf(spec, len, "%s:%.*s", kinds[k], (int)digits, rest);
            return 0;
        }
    }
    return -EINVAL;
}

/* "attn=opencl0,experts=cpu0" -> the two specs ("" for the CPU engine). */
static int parse_devices(const char *s, char *attn, char *experts, size_t len)
{
    attn[0] = experts[0] = 0;
    while (*s) {
        const char *eq = strchr(s, '='), *end = strchr(s, ',');
        if (!end)
            end = s + strlen(s);
        if (!eq || eq > end)
            return -EINVAL;
        char *dst = (size_t)(eq - s) == 4 && !strncmp(s, "attn", 4)      ? attn
                    : (size_t)(eq - s) == 7 && !strncmp(s, "experts", 7) ? experts
                                                                         : NULL;
        bool engine;
        if (!dst || device_spec(eq + 1, (size_t)(end - eq - 1), dst, len, &engine) < 0)
            return -EINVAL;
        if (engine)
            dst[0] = 0;
        s = *end ? end + 1 : end;
    }
    return 0;
}

/* "0-3,8" -> cpu ids (at most max). */
static int parse_cpus(const char *s, int *cpus, uint32_t max, uint32_t *n)
{
    *n = 0;
    while (*s) {
        char *end;
        long a = strtol(s, &end, 10), b = a;
        if (end == s || a < 0 || a > 65535)
            return -EINVAL;
        if (*end == '-') {
            s = end + 1;
            b = strtol(s, &end, 10);
            if (end == s || b < a || b > 65535)
                return -EINVAL;
        }
        for (long c = a; c <= b; c++) {
            if (*n >= max)
                return -ERANGE;
            cpus[(*n)++] = (int)c;
        }
        if (*end && *end != ',')
            return -EINVAL;
        s = *end ? end + 1 : end;
    }
    return *n ? 0 : -EINVAL;
}

/* Reads all of stdin (at most GEN_MAX_PROMPT_BYTES). */
static int read_stdin(char **out, size_t *len)
{
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    if (!buf)
        return -ENOMEM;
    for (;;) {
        if (n == cap) {
            if (cap >= GEN_MAX_PROMPT_BYTES) {
                free(buf);
                return -EFBIG;
            }
            cap *= 2;
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                return -ENOMEM;
            }
            buf = nb;
        }
        size_t r = fread(buf + n, 1, cap - n, stdin);
        n += r;
        if (r == 0) {
            if (ferror(stdin)) {
                free(buf);
                return -EIO;
            }
            break;
        }
    }
    *out = buf;
    *len = n;
    return 0;
}

/* ds_engine's expert runner on a ds_backend_moe (same contract as ds_moe_run_experts). */
static int run_on_backend(void *ctx, uint32_t layer, const float *ffn_in, uint32_t n,
                          const int32_t *ids, float *out, ds_error *err)
{
    return ds_backend_moe_run(ctx, layer, ffn_in, n, ids, out, err);
}

/* Writes the bytes of one streamed token to stdout right away. */
static int stream_token(ds_tok_stream *ts, int32_t id, bool *nl_last)
{
    const char *b;
    size_t len;
    ds_error err = {0};
    if (ds_tok_stream_push(ts, id, &b, &len, &err) < 0) {
        fprintf(stderr, "dsctl generate: decode: %s\n", ds_error_str(&err));
        return -EINVAL;
    }
    if (len) {
        fwrite(b, 1, len, stdout);
        fflush(stdout);
        *nl_last = b[len - 1] == '\n';
    }
    return 0;
}

static int cmd_generate(int argc, char **argv)
{
    /* Without --local the job goes to the cluster's coordinator (client/dsctl_generate_cluster.c).
     */
    bool want_local = false, want_help = false, has_model = false, has_tokens = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--local") == 0)
            want_local = true;
        else if (strcmp(argv[i], "--model") == 0 || strncmp(argv[i], "--model=", 8) == 0)
            has_model = true;
        else if (strcmp(argv[i], "--tokens") == 0 || strncmp(argv[i], "--tokens=", 9) == 0)
            has_tokens = true;
        else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            want_help = true;
        else if (strcmp(argv[i], "--") == 0)
            break;
    }
    if (!want_local && !want_help && (has_model || !has_tokens)) /* a text prompt */
        return dsctl_generate_cluster_text(argc, argv);
    if (!want_local && !want_help)
        return dsctl_generate_cluster(argc, argv);
    static const struct option opts[] = {
        {"local", no_argument, NULL, 'L'},
        {"model", required_argument, NULL, 'm'},
        {"tokens", required_argument, NULL, 't'},
        {"max-tokens", required_argument, NULL, 'n'},
        {"greedy", no_argument, NULL, 'g'},
        {"temperature", required_argument, NULL, 'T'},
        {"top-p", required_argument, NULL, 'p'},
        {"top-k", required_argument, NULL, 'k'},
        {"seed", required_argument, NULL, 's'},
        {"threads", required_argument, NULL, 'j'},
        {"cpus", required_argument, NULL, 'c'},
        {"logits-out", required_argument, NULL, 'o'},
        {"stop-eos", no_argument, NULL, 'e'},
        {"ignore-eos", no_argument, NULL, 'I'},
        {"experts-on", required_argument, NULL, 'x'},
        {"quantize", required_argument, NULL, 'Q'},
        {"device", required_argument, NULL, 'D'},
        {"fast", no_argument, NULL, 'F'},
        {"plan", required_argument, NULL, 'P'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *model = NULL, *tokens_s = NULL, *logits_path = NULL, *experts_on = NULL;
    const char *devices = NULL, *plan_path = NULL;
    char attn_spec[64] = "", experts_spec[64] = "";
    bool local = false, stop_eos = false, ignore_eos = false, greedy = false, fast = false;
    int cpus[1024];
    uint32_t n_cpus = 0;
    double max_tokens = 16, temp = 0, top_p = 1, top_k = 0, seed = 1, threads = 0;
    ds_sampler smp = {.greedy = true, .temperature = 1, .top_p = 1};
    enum ds_quantize quant = DS_QUANTIZE_NONE;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        int bad = 0;
        switch (c) {
        case 'L':
            local = true;
            break;
        case 'm':
            model = optarg;
            break;
        case 't':
            tokens_s = optarg;
            break;
        case 'n':
            bad = dsctl_parse_num(optarg, 0, GEN_MAX_TOKENS, &max_tokens);
            break;
        case 'g':
            greedy = true; /* wins over --temperature */
            break;
        case 'T':
            bad = dsctl_parse_num(optarg, 0, 1e6, &temp);
            break;
        case 'p':
            bad = dsctl_parse_num(optarg, 1e-9, 1, &top_p);
            break;
        case 'k':
            bad = dsctl_parse_num(optarg, 0, 1e9, &top_k);
            break;
        case 's':
            bad = dsctl_parse_num(optarg, 0, 1.8e19, &seed);
            break;
        case 'j':
            bad = dsctl_parse_num(optarg, 0, 1024, &threads);
            break;
        case 'c':
            bad = parse_cpus(optarg, cpus, 1024, &n_cpus);
            break;
        case 'o':
            logits_path = optarg;
            break;
        case 'e':
            stop_eos = true;
            break;
        case 'I':
            ignore_eos = true;
            break;
        case 'x':
            experts_on = optarg;
            break;
        case 'Q':
            if (ds_quantize_parse(optarg, &quant) < 0) {
                fprintf(stderr, "dsctl generate: --quantize is q8_0 or q4_k, not '%s'\n", optarg);
                return DSCTL_EXIT_USAGE;
            }
            break;
        case 'F':
            fast = true;
            break;
        case 'P':
            plan_path = optarg;
            break;
        case 'D':
            devices = optarg;
            bad = parse_devices(optarg, attn_spec, experts_spec, sizeof(attn_spec)) < 0;
            break;
        case 'h':
            gen_usage(stdout);
            return DSCTL_EXIT_OK;
        default:
            gen_usage(stderr);
            return DSCTL_EXIT_USAGE;
        }
        if (bad) {
            fprintf(stderr, "dsctl generate: bad option value: %s\n", optarg);
            return DSCTL_EXIT_USAGE;
        }
    }
    if (!local) {
        fprintf(stderr, "dsctl generate: only --local (in-process) is supported so far\n");
        return DSCTL_EXIT_USAGE;
    }
    if (plan_path && (devices || experts_on || fast)) {
        fprintf(stderr, "dsctl generate: --plan places every unit: no --device, --experts-on "
                        "or --fast with it\n");
        return DSCTL_EXIT_USAGE;
    }
    if (devices && experts_on) {
        fprintf(stderr, "dsctl generate: give --experts-on or --device experts=..., not both\n");
        return DSCTL_EXIT_USAGE;
    }
    if (experts_spec[0])
        experts_on = experts_spec;
    if (fast && !attn_spec[0]) {
        fprintf(stderr, "dsctl generate: --fast needs --device attn=DEV (an accelerator)\n");
        return DSCTL_EXIT_USAGE;
    }
    const char *text_arg = optind < argc ? argv[optind] : NULL;
    if (!model || !!tokens_s == !!text_arg || optind + (text_arg ? 1 : 0) != argc) {
        if (tokens_s && text_arg)
            fprintf(stderr, "dsctl generate: give either --tokens or a text prompt, not both\n");
        gen_usage(stderr);
        return DSCTL_EXIT_USAGE;
    }
    int32_t *prompt = NULL; /* ids <= INT32_MAX: the same bits as uint32_t */
    uint32_t np = 0;
    size_t np_z = 0;
    if (tokens_s &&
        dsctl_parse_ids(tokens_s, INT32_MAX, GEN_MAX_TOKENS, (uint32_t **)&prompt, &np_z) < 0) {
        fprintf(stderr, "dsctl generate: --tokens must be comma-separated ids\n");
        return DSCTL_EXIT_USAGE;
    }
    np = (uint32_t)np_z;
    if (temp > 0 && !greedy) {
        smp.greedy = false;
        smp.temperature = (float)temp;
    }
    smp.top_p = (float)top_p;
    smp.top_k = (uint32_t)top_k;
    ds_sampler_seed(&smp, (uint64_t)seed);

    int ret = DSCTL_EXIT_FAILURE, rc;
    ds_error err = {0};
    ds_tokenizer *tok = NULL;
    ds_tok_stream *ts = NULL;
    ds_backend *bk = NULL, *abk = NULL; /* experts', attention's (when another device) */
    ds_backend_moe *bm = NULL;
    ds_backend_units *bu = NULL;
    gen_plan *gp = NULL;
    char *text = NULL;
    bool nl_last = true; /* the streamed text ended with a newline (or is empty) */
    int32_t eos = -1;
    ds_model *m = NULL;
    ds_pool *pool = NULL;
    ds_engine *eng = NULL;
    FILE *lf = NULL;
    float *logits = NULL;
    int32_t *gen = NULL;
    uint32_t ngen = 0, nmax = (uint32_t)max_tokens;
    ds_model_open_opts mo = {.quantize = quant};
    if ((rc = ds_model_open(model, &mo, &m, &err)) < 0) {
        fprintf(stderr, "dsctl generate: %s\n", ds_error_str(&err));
        ret = DSCTL_EXIT_USAGE;
        goto out;
    }
    const ds_model_config *cfg = ds_model_get_config(m);
    uint32_t V = cfg->vocab_size;
    if (stop_eos)
        eos = cfg->eos_token_id;
    if (text_arg) {
        size_t tlen, nids;
        int32_t *ids = NULL;
        if ((rc = ds_tokenizer_load(model, &tok, &err)) < 0) {
            fprintf(stderr, "dsctl generate: %s\n", ds_error_str(&err));
            ret = DSCTL_EXIT_USAGE;
            goto out;
        }
        if (strcmp(text_arg, "-") == 0) {
            if ((rc = read_stdin(&text, &tlen)) < 0) {
                fprintf(stderr, "dsctl generate: reading the prompt from stdin: %s\n",
                        rc == -EFBIG ? "longer than 16 MiB" : strerror(-rc));
                ret = DSCTL_EXIT_USAGE;
                goto out;
            }
        } else {
            tlen = strlen(text_arg);
        }
        rc = ds_tokenizer_encode(tok, text ? text : text_arg, tlen, true, &ids, &nids, &err);
        if (rc < 0) {
            fprintf(stderr, "dsctl generate: encoding the prompt: %s\n", ds_error_str(&err));
            ret = DSCTL_EXIT_USAGE;
            goto out;
        }
        if (nids == 0 || nids > GEN_MAX_TOKENS) {
            free(ids);
            fprintf(stderr, "dsctl generate: the prompt encodes to %zu tokens (need 1..%d)\n", nids,
                    GEN_MAX_TOKENS);
            ret = DSCTL_EXIT_USAGE;
            goto out;
        }
        prompt = ids;
        np = (uint32_t)nids;
        if (!ignore_eos) {
            eos = ds_tokenizer_eos_id(tok);
            if (eos < 0)
                eos = cfg->eos_token_id;
        }
        if ((rc = ds_tok_stream_new(tok, true, &ts)) < 0) {
            fprintf(stderr, "dsctl generate: out of memory\n");
            goto out;
        }
    }
    for (uint32_t i = 0; i < np; i++)
        if ((uint32_t)prompt[i] >= V) {
            fprintf(stderr, "dsctl generate: token %d is outside the vocabulary (%u)\n", prompt[i],
                    V);
            ret = DSCTL_EXIT_USAGE;
            goto out;
        }
    if ((rc = ds_pool_new((uint32_t)threads, n_cpus ? cpus : NULL, n_cpus, &pool)) < 0) {
        fprintf(stderr, "dsctl generate: thread pool: %s\n", strerror(-rc));
        goto out;
    }
    if ((rc = ds_engine_new(m, pool, np + nmax + 1, &eng, &err)) < 0 ||
        (rc = ds_engine_seq_add(eng)) < 0) {
        fprintf(stderr, "dsctl generate: %s\n",
                rc == -ENOMEM ? "out of memory" : ds_error_str(&err));
        goto out;
    }
    int seq = rc;
    if (experts_on) {
        if ((rc = ds_backend_open(experts_on, &bk, &err)) < 0 ||
            (rc = ds_backend_moe_new(m, model, bk, &bm, &err)) < 0) {
            fprintf(stderr, "dsctl generate: --experts-on %s: %s\n", experts_on,
                    ds_error_str(&err));
            if (rc == -EINVAL)
                ret = DSCTL_EXIT_USAGE; /* a malformed SPEC, not a runtime failure */
            goto out;
        }
        ds_engine_set_moe_runner(eng, run_on_backend, bm);
    }
    if (attn_spec[0]) {
        ds_backend *ab = bk && !strcmp(attn_spec, experts_on) ? bk : NULL;
        if (!ab && (rc = ds_backend_open(attn_spec, &abk, &err)) < 0) {
            fprintf(stderr, "dsctl generate: --device attn=%s: %s\n", attn_spec,
                    ds_error_str(&err));
            goto out;
        }
        if ((rc = ds_backend_units_new(m, pool, ab ? ab : abk, NULL, NULL, &bu, &err)) < 0) {
            fprintf(stderr, "dsctl generate: --device attn=%s: %s\n", attn_spec,
                    ds_error_str(&err));
            goto out;
        }
        ds_backend_units_set_exact(bu, !fast);
        ds_engine_set_units(eng, &ds_backend_units_ops, bu);
    }
    if (plan_path) {
        if ((rc = gen_plan_load(plan_path, m, model, pool, &gp, &err)) < 0) {
            fprintf(stderr, "dsctl generate: %s\n", ds_error_str(&err));
            if (rc == -EINVAL || rc == -ENOTSUP)
                ret = DSCTL_EXIT_USAGE; /* a plan this model or process cannot run */
            goto out;
        }
        gen_plan_describe(gp, stderr);
        gen_plan_install(gp, eng);
    }
    logits = malloc((size_t)np * V * sizeof(float));
    gen = malloc((nmax + 1) * sizeof(*gen));
    int *seqs = calloc(np, sizeof(int));
    if (!logits || !gen || !seqs) {
        free(seqs);
        fprintf(stderr, "dsctl generate: out of memory\n");
        goto out;
    }
    for (uint32_t i = 0; i < np; i++)
        seqs[i] = seq;
    if (logits_path && !(lf = fopen(logits_path, "wbe"))) {
        free(seqs);
        fprintf(stderr, "dsctl generate: %s: %s\n", logits_path, strerror(errno));
        goto out;
    }
    /* Prefill: every prompt position in one pass. */
    rc = nmax ? ds_engine_forward(eng, np, seqs, prompt, logits, &err) : 0;
    free(seqs);
    if (rc < 0) {
        fprintf(stderr, "dsctl generate: %s\n", ds_error_str(&err));
        goto out;
    }
    if (nmax && lf && fwrite(logits, sizeof(float), (size_t)np * V, lf) != (size_t)np * V)
        goto write_fail;
    const float *last = logits + (size_t)(np - 1) * V;
    while (ngen < nmax) {
        int32_t t = ds_sampler_pick(&smp, last, V);
        gen[ngen++] = t;
        if (ts && !(t == eos) && stream_token(ts, t, &nl_last) < 0)
            goto out;
        if (ngen == nmax || (eos >= 0 && t == eos))
            break;
        if ((rc = ds_engine_forward(eng, 1, &seq, &t, logits, &err)) < 0) {
            fprintf(stderr, "dsctl generate: %s\n", ds_error_str(&err));
            goto out;
        }
        if (lf && fwrite(logits, sizeof(float), V, lf) != V)
            goto write_fail;
        last = logits;
    }
    if (lf) {
        int e = fclose(lf);
        lf = NULL;
        if (e)
            goto write_fail;
    }
    if (ts) {
        const char *b;
        size_t len;
        ds_tok_stream_flush(ts, &b, &len);
        if (len) {
            fwrite(b, 1, len, stdout);
            nl_last = b[len - 1] == '\n';
        }
        if (!nl_last)
            printf("\n"); /* `tokens:` stays on a line of its own */
    }
    printf("tokens: ");
    for (uint32_t i = 0; i < ngen; i++)
        printf("%s%d", i ? "," : "", gen[i]);
    printf("\n");
    ret = DSCTL_EXIT_OK;
    goto out;
write_fail:
    fprintf(stderr, "dsctl generate: %s: write failed\n", logits_path);
out:
    if (lf)
        fclose(lf);
    free(gen);
    free(logits);
    free(prompt);
    free(text);
    ds_tok_stream_free(ts);
    ds_tokenizer_free(tok);
    ds_engine_free(eng); /* before the device units: its caches live on their device */
    ds_backend_units_free(bu);
    gen_plan_free(gp);
    ds_backend_free(abk);
    ds_backend_moe_free(bm);
    ds_backend_free(bk);
    ds_pool_free(pool);
    ds_model_free(m);
    return ret;
}

DSCTL_COMMAND(generate, "generate tokens from a checkpoint (--local: in-process)", cmd_generate);
