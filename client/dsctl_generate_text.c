/* dsctl_generate_text.c — `dsctl generate [--model DIR] TEXT` against the cluster.
 * Without --model the text goes to the coordinator, which tokenizes it with its model's
 * tokenizer.json and sends every token with the text it adds (held back while it may be the
 * start of a --stop string). With --model DIR the prompt is tokenized here with DIR's
 * tokenizer (the same files the nodes load), the ids go to the coordinator, and the tokens
 * coming back are decoded here (unless --stop strings are given: then the coordinator's text,
 * which cuts the stop string, is printed). Either way the text streams as it arrives (never
 * half a UTF-8 character) and the last line is `tokens: a,b,c`, as for --local, so a script
 * can compare a cluster run with an in-process one. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds_cleanup.h"
#include "ds_client.h"
#include "ds_tokenizer.h"
#include "dsctl.h"

#define TEXT_MAX_PROMPT_BYTES (16u << 20)
#define TEXT_MAX_TOKENS 1000000u

int dsctl_generate_cluster_text(int argc, char **argv);
int dsctl_connect_timeout(const char *endpoint, int timeout_ms, ds_client **c);

static void text_usage(FILE *f)
{
    fprintf(f, "usage: dsctl generate [--model DIR] [options] TEXT|-   (on the cluster)\n"
               "  TEXT | -            prompt (\"-\": read stdin)\n"
               "  --model DIR         tokenize here with DIR/tokenizer.json (default: the\n"
               "                      coordinator tokenizes with its model's tokenizer)\n"
               "  --stop STR          stop when the output contains STR, which is not printed\n"
               "                      (repeatable, up to 15; needs the coordinator's tokenizer)\n"
               "  --endpoint E        coordinator client endpoint ($DSD_ENDPOINT, default\n"
               "                      tcp://127.0.0.1:7101)\n"
               "  --max-tokens N      tokens to generate (default 16)\n"
               "  --greedy            argmax decoding (default)\n"
               "  --temperature T, --top-p P, --top-k K, --seed S (default 1)\n"
               "  --ignore-eos        do not stop at the end-of-sequence token\n"
               "  --timeout-ms MS     per-token wait (default 30000)\n");
}

static char *read_stdin_text(size_t *len)
{
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        size_t got = fread(buf + n, 1, cap - n, stdin);
        n += got;
        if (got == 0)
            break;
        if (n == cap) {
            if (cap >= TEXT_MAX_PROMPT_BYTES) {
                free(buf);
                return NULL;
            }
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                return NULL;
            }
            buf = nb;
            cap *= 2;
        }
    }
    *len = n;
    return buf;
}

int dsctl_generate_cluster_text(int argc, char **argv)
{
    static const struct option opts[] = {
        {"model", required_argument, NULL, 'm'},   {"endpoint", required_argument, NULL, 'E'},
        {"max-tokens", required_argument, NULL, 'n'}, {"greedy", no_argument, NULL, 'g'},
        {"temperature", required_argument, NULL, 't'}, {"top-p", required_argument, NULL, 'p'},
        {"top-k", required_argument, NULL, 'k'},   {"seed", required_argument, NULL, 's'},
        {"ignore-eos", no_argument, NULL, 'I'},    {"timeout-ms", required_argument, NULL, 'T'},
        {"stop", required_argument, NULL, 'S'},    {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *stops[16];
    size_t n_stop = 0;
    const char *model = NULL, *endpoint = getenv("DSD_ENDPOINT");
    double max_tokens = 16, temp = 0, top_p = 0, top_k = 0, seed = 1, timeout_ms = 30000;
    bool ignore_eos = false;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        int bad = 0;
        switch (c) {
        case 'm': model = optarg; break;
        case 'E': endpoint = optarg; break;
        case 'n': bad = dsctl_parse_num(optarg, 1, TEXT_MAX_TOKENS, &max_tokens); break;
        case 'g': temp = 0; break;
        case 't': bad = dsctl_parse_num(optarg, 0, 100, &temp); break;
        case 'p': bad = dsctl_parse_num(optarg, 0, 1, &top_p); break;
        case 'k': bad = dsctl_parse_num(optarg, 0, 1e9, &top_k); break;
        case 's': bad = dsctl_parse_num(optarg, 0, 1.8e19, &seed); break;
        case 'I': ignore_eos = true; break;
        case 'S':
            if (n_stop >= 15 || !optarg[0]) {
                fprintf(stderr, "dsctl generate: --stop takes a non-empty string, at most 15\n");
                return DSCTL_EXIT_USAGE;
            }
            stops[n_stop++] = optarg;
            break;
        case 'T': bad = dsctl_parse_num(optarg, 1, 3.6e6, &timeout_ms); break;
        case 'h': text_usage(stdout); return DSCTL_EXIT_OK;
        default: text_usage(stderr); return DSCTL_EXIT_USAGE;
        }
        if (bad) {
            fprintf(stderr, "dsctl generate: bad value '%s' for --%s\n", optarg,
                    opts[c == 'n' ? 2 : 0].name);
            return DSCTL_EXIT_USAGE;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "dsctl generate: need one TEXT argument (or -)\n");
        text_usage(stderr);
        return DSCTL_EXIT_USAGE;
    }
    if (!endpoint || !*endpoint)
        endpoint = "tcp://127.0.0.1:7101";

    ds_error err = {0};
    ds_tokenizer *tok = NULL;
    if (model && ds_tokenizer_load(model, &tok, &err) < 0) {
        fprintf(stderr, "dsctl generate: %s\n", ds_error_str(&err));
        return DSCTL_EXIT_USAGE;
    }
    int rc = DSCTL_EXIT_FAILURE;
    char *text = NULL;
    size_t text_len = 0;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    uint32_t *uids = NULL, *gen = NULL;
    uint32_t n_gen = 0;
    ds_client *cl = NULL;
    ds_tok_stream *ts = NULL;
    if (strcmp(argv[optind], "-") == 0) {
        text = read_stdin_text(&text_len);
        if (!text) {
            fprintf(stderr, "dsctl generate: cannot read the prompt from stdin (limit %u bytes)\n",
                    TEXT_MAX_PROMPT_BYTES);
            rc = DSCTL_EXIT_USAGE;
            goto out;
        }
    } else {
        text = strdup(argv[optind]);
        text_len = strlen(text);
    }
    if (!text_len || memchr(text, 0, text_len)) {
        fprintf(stderr, "dsctl generate: the prompt is empty or contains a NUL byte\n");
        rc = DSCTL_EXIT_USAGE;
        goto out;
    }
    if (tok &&
        (ds_tokenizer_encode(tok, text, text_len, true, &ids, &n_ids, &err) < 0 || n_ids == 0)) {
        fprintf(stderr, "dsctl generate: %s\n", n_ids ? ds_error_str(&err) : "empty prompt");
        rc = DSCTL_EXIT_USAGE;
        goto out;
    }
    uids = malloc((n_ids ? n_ids : 1) * sizeof(*uids));
    gen = malloc((size_t)max_tokens * sizeof(*gen));
    if (!uids || !gen)
        goto out;
    for (size_t i = 0; i < n_ids; i++)
        uids[i] = (uint32_t)ids[i];

    /* CURVE keys from the environment like every cluster command ($DSD_SERVER_KEY, ...) */
    if (dsctl_connect_timeout(endpoint, (int)timeout_ms, &cl) < 0) {
        fprintf(stderr, "dsctl generate: cannot connect to %s\n", endpoint);
        goto out;
    }
    if (!ignore_eos)
        stops[n_stop++] = "eos";
    ds_client_request req = {
        .tokens = tok ? uids : NULL,
        .n_tokens = tok ? n_ids : 0,
        .prompt = tok ? NULL : text,
        .temperature = (float)temp,
        .top_p = (float)top_p,
        .top_k = (uint32_t)top_k,
        .seed = (uint64_t)seed,
        .max_tokens = (uint32_t)max_tokens,
        .stop = n_stop ? stops : NULL,
        .n_stop = n_stop,
    };
    /* print the coordinator's text unless we decode here (--model, no stop strings) */
    bool server_text = !tok || n_stop > (ignore_eos ? 0u : 1u);
    uint64_t job = 0;
    if (ds_client_submit(cl, &req, &job) < 0) {
        fprintf(stderr, "dsctl generate: %s: %s\n", endpoint, ds_client_error(cl));
        goto out;
    }
    if (!server_text && ds_tok_stream_new(tok, true, &ts) < 0)
        goto out;
    for (;;) {
        ds_client_token t;
        if (ds_client_next(cl, job, &t, -1) < 0) {
            fprintf(stderr, "\ndsctl generate: %s: %s\n", endpoint, ds_client_error(cl));
            goto out;
        }
        if (t.has_id && n_gen < (uint32_t)max_tokens) {
            gen[n_gen++] = t.id;
            const char *piece;
            size_t plen;
            if (ts && ds_tok_stream_push(ts, (int32_t)t.id, &piece, &plen, &err) == 0 && plen) {
                fwrite(piece, 1, plen, stdout);
                fflush(stdout);
            }
        }
        if (server_text && t.text_len) {
            fwrite(t.text, 1, t.text_len, stdout);
            fflush(stdout);
        }
        if (t.last) {
            if (strcmp(t.finish_reason, "error") == 0 || strcmp(t.finish_reason, "cancelled") == 0) {
                fprintf(stderr, "\ndsctl generate: job ended: %s\n", t.finish_reason);
                goto out;
            }
            break;
        }
    }
    const char *piece;
    size_t plen;
    if (ts && ds_tok_stream_flush(ts, &piece, &plen) == 0 && plen)
        fwrite(piece, 1, plen, stdout);
    printf("\ntokens: ");
    for (uint32_t i = 0; i < n_gen; i++)
        printf("%s%u", i ? "," : "", gen[i]);
    printf("\n");
    rc = DSCTL_EXIT_OK;
out:
    ds_tok_stream_free(ts);
    ds_client_close(cl);
    free(gen);
    free(uids);
    free(ids);
    free(text);
    ds_tokenizer_free(tok);
    return rc;
}
