/* dsctl_generate_cluster.c — `dsctl generate` against the cluster (the coordinator), streaming
 * tokens through libdsclient. Output matches `dsctl generate --local`: the last line is
 * `tokens: a,b,c`. With --stream each token is also printed as it arrives. Until the lead
 * routes `generate` without --local here, the same code answers `dsctl submit`. */
#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds_client.h"
#include "dsctl.h"

int dsctl_exit_code(int rc);
int dsctl_connect(const char *endpoint, ds_client **c);
const char *dsctl_endpoint(const char *opt);
int dsctl_generate_cluster(int argc, char **argv);

#define GC_MAX_PROMPT 1000000

static void gc_usage(FILE *f)
{
    fprintf(f, "usage: dsctl generate --tokens ID,ID,... [options]   (against the cluster)\n"
               "  --endpoint E        coordinator client endpoint (default $DSD_ENDPOINT or\n"
               "                      tcp://127.0.0.1:7101)\n"
               "  --max-tokens N      tokens to generate (default 16)\n"
               "  --greedy            argmax decoding (default)\n"
               "  --temperature T     sample with temperature T > 0\n"
               "  --top-p P, --top-k K, --seed S (default 1)\n"
               "  --stop-eos          stop at the model's eos token\n"
               "  --stop id:N         stop at token N (repeatable)\n"
               "  --stream            print each token as it arrives\n"
               "  --cancel-after N    cancel the job after N tokens (testing)\n");
}

int dsctl_generate_cluster(int argc, char **argv)
{
    static const struct option opts[] = {{"endpoint", required_argument, NULL, 'e'},
                                         {"tokens", required_argument, NULL, 't'},
                                         {"max-tokens", required_argument, NULL, 'n'},
                                         {"greedy", no_argument, NULL, 'g'},
                                         {"temperature", required_argument, NULL, 'T'},
                                         {"top-p", required_argument, NULL, 'p'},
                                         {"top-k", required_argument, NULL, 'k'},
                                         {"seed", required_argument, NULL, 's'},
                                         {"stop-eos", no_argument, NULL, 'E'},
                                         {"stop", required_argument, NULL, 'S'},
                                         {"stream", no_argument, NULL, 'r'},
                                         {"cancel-after", required_argument, NULL, 'c'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    const char *ep = NULL, *toks = NULL, *stops[16];
    size_t n_stop = 0;
    double max_tokens = 16, temp = 0, top_p = 0, top_k = 0, seed = 1, cancel_after = -1;
    bool greedy = false, stream = false;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        double *dst = NULL;
        switch (ch) {
        case 'e':
            ep = optarg;
            break;
        case 't':
            toks = optarg;
            break;
        case 'n':
            dst = &max_tokens;
            break;
        case 'g':
            greedy = true;
            break;
        case 'T':
            dst = &temp;
            break;
        case 'p':
            dst = &top_p;
            break;
        case 'k':
            dst = &top_k;
            break;
        case 's':
            dst = &seed;
            break;
        case 'c':
            dst = &cancel_after;
            break;
        case 'E':
        case 'S':
            if (n_stop >= 16) {
                fprintf(stderr, "dsctl generate: at most 16 stop entries\n");
                return DSCTL_EXIT_USAGE;
            }
            stops[n_stop++] = ch == 'E' ? "eos" : optarg;
            break;
        case 'r':
            stream = true;
            break;
        case 'h':
            gc_usage(stdout);
            return DSCTL_EXIT_OK;
        default:
            gc_usage(stderr);
            return DSCTL_EXIT_USAGE;
        }
        if (dst) {
            if (dsctl_parse_num(optarg, 0, 1.8e19, dst) < 0) {
                fprintf(stderr, "dsctl generate: bad option value: %s\n", optarg);
                return DSCTL_EXIT_USAGE;
            }
        }
    }
    if (!toks || max_tokens < 1 || max_tokens > GC_MAX_PROMPT || top_p > 1) {
        gc_usage(stderr);
        return DSCTL_EXIT_USAGE;
    }
    uint32_t *ids;
    size_t n;
    if (dsctl_parse_ids(toks, UINT32_MAX, GC_MAX_PROMPT, &ids, &n) < 0) {
        fprintf(stderr, "dsctl generate: --tokens must be comma-separated ids\n");
        return DSCTL_EXIT_USAGE;
    }
    ds_client_request req = {.tokens = ids,
                             .n_tokens = n,
                             .temperature = greedy ? 0 : (float)temp,
                             .top_p = (float)top_p,
                             .top_k = (uint32_t)top_k,
                             .seed = (uint64_t)seed,
                             .max_tokens = (uint32_t)max_tokens,
                             .stop = stops,
                             .n_stop = n_stop};
    ds_client *c = NULL;
    const char *endpoint = dsctl_endpoint(ep);
    uint64_t job = 0;
    uint32_t *gen = malloc(((size_t)max_tokens + 1) * sizeof(*gen));
    size_t ngen = 0;
    int rc = gen ? dsctl_connect(endpoint, &c) : -ENOMEM;
    if (rc == 0)
        rc = ds_client_submit(c, &req, &job);
    bool cancelled = false;
    while (rc == 0) {
        ds_client_token t;
        if ((rc = ds_client_next(c, job, &t, -1)) < 0)
            break;
        if (t.has_id && ngen <= (size_t)max_tokens) {
            gen[ngen++] = t.id;
            if (stream) {
                printf("token %u\n", t.id);
                fflush(stdout);
            }
        }
        if (t.last) {
            if (!strcmp(t.finish_reason, "error"))
                rc = -EIO;
            if (!strcmp(t.finish_reason, "cancelled"))
                cancelled = true;
            break;
        }
        if (cancel_after >= 0 && ngen >= (size_t)cancel_after && !cancelled) {
            ds_client_cancel(c, job);
            cancelled = true; /* keep reading until the server's final notice */
        }
    }
    if (rc < 0)
        fprintf(stderr, "dsctl generate: %s: %s\n", endpoint,
                c && *ds_client_error(c) ? ds_client_error(c) : strerror(-rc));
    else {
        printf("tokens: ");
        for (size_t i = 0; i < ngen; i++)
            printf("%s%u", i ? "," : "", gen[i]);
        printf("\n");
        if (cancelled)
            printf("finish: cancelled\n");
    }
    ds_client_close(c);
    free(ids);
    free(gen);
    return dsctl_exit_code(rc);
}

DSCTL_COMMAND(submit, "generate on the cluster (same as `generate` without --local)",
              dsctl_generate_cluster);
