/* dsctl_plan.c — `dsctl plan`: place a model on a described cluster, offline (no daemon).
 * Pure computation on a cluster spec and the model's config and tensor table (a checkpoint's
 * safetensors headers or a GGUF header: the real bytes of every unit, no weight read), or a
 * bare config.json; see docs/placement.md. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "ds_config.h"
#include "ds_model.h"
#include "ds_placement.h"
#include "dsctl.h"

#define MAX_PINS    4096
#define MAX_EXCLUDE 256

static void usage(FILE *f)
{
    fprintf(f,
            "usage: dsctl plan --cluster FILE --model DIR|config.json|FILE.gguf [options]\n"
            "  --model                a checkpoint directory or a GGUF file (or the first part\n"
            "                         of a split set): each unit's bytes from its tensor types,\n"
            "                         reading only the headers; a bare config.json: from the\n"
            "                         config's dtype\n"
            "  --quantize q8_0|q4_k   plan the model as quantised at load (its F32/F16/BF16/FP8\n"
            "                         linear weights as Q8_0 / Q4_K blocks; needs the tensor\n"
            "                         table: a checkpoint directory or a GGUF)\n"
            "  --batch B              sequences decoded together (default 1)\n"
            "  --context T            tokens of context per sequence (default 4096)\n"
            "  --objective latency|throughput   (default latency)\n"
            "  --strategy NAME        auto (default), heuristic, exact, mem-proportional,\n"
            "                         experts-on-cpu, balanced-experts\n"
            "  --expert-stats FILE    JSON: one array per layer of expert counts (empty for\n"
            "                         dense layers), or what a running cluster measured\n"
            "                         (dsctl placement --json | jq .measured.expert_stats);\n"
            "                         uniform popularity without it\n"
            "  --pin UNIT=NODE/DEV    keep a unit on a device (repeatable), e.g. attn[3]=n1/cuda0\n"
            "  --exclude NAME         do not use a node or node/device (repeatable)\n"
            "  --reserve F            memory fraction kept free per device (default 0.05)\n"
            "  --micro-batches M      throughput: micro-batches in flight (default 4)\n"
            "  --json                 print the plan JSON (docs/plan-format.md)\n"
            "  --explain              name the bottleneck and the runner-up strategy\n"
            "Exit status 2 on a malformed spec or an infeasible plan (the message says what is\n"
            "short and by how much).\n");
}

static int parse_u32(const char *s, uint32_t lo, uint32_t hi, uint32_t *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi || s[0] == '-')
        return -EINVAL;
    *out = (uint32_t)v;
    return 0;
}

/* Expert statistics: an array with one entry per layer, each an array of n_experts counts
 * (or empty for dense layers); or the daemon's routing counts
 * {"n_routed_experts": E, "layers": [{"layer": l, "counts": [E]}, ...]} (layers not listed:
 * uniform). */
static json_t *stats_dense_form(json_t *root, size_t L)
{
    json_t *layers = json_object_get(root, "layers"), *ent;
    if (!json_is_array(layers) || !json_array_size(layers) ||
        !json_is_object(json_array_get(layers, 0)))
        return NULL;
    json_t *arr = json_array();
    for (size_t l = 0; l < L; l++)
        json_array_append_new(arr, json_array());
    size_t i;
    json_array_foreach(layers, i, ent)
    {
        json_t *lj = json_object_get(ent, "layer"), *c = json_object_get(ent, "counts");
        if (!json_is_integer(lj) || json_integer_value(lj) < 0 ||
            (size_t)json_integer_value(lj) >= L || !json_is_array(c)) {
            json_decref(arr);
            return json_null(); /* malformed: the caller reports */
        }
        json_array_set(arr, (size_t)json_integer_value(lj), c);
    }
    return arr;
}

static int load_stats(const char *path, const ds_model_config *cfg, double **out)
{
    json_error_t je;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        fprintf(stderr, "dsctl plan: %s: %s (line %d)\n", path, je.text, je.line);
        return -EBADMSG;
    }
    size_t L = cfg->num_hidden_layers, E = cfg->n_routed_experts;
    json_t *dense = json_is_object(root) ? stats_dense_form(root, L) : NULL;
    if (dense) { /* keep it alive with root */
        json_object_set_new(root, "__dense", dense);
    }
    json_t *arr = dense ? dense : json_is_object(root) ? json_object_get(root, "layers") : root;
    if (!json_is_array(arr) || json_array_size(arr) != L || !E) {
        fprintf(stderr, "dsctl plan: %s: want an array of %zu layers (each %zu expert counts)\n",
                path, L, E);
        json_decref(root);
        return -EBADMSG;
    }
    double *st = calloc(L * E, sizeof *st);
    if (!st) {
        json_decref(root);
        return -ENOMEM;
    }
    for (size_t l = 0; l < L; l++) {
        json_t *row = json_array_get(arr, l);
        size_t n = json_array_size(row);
        if (!json_is_array(row) || (n != 0 && n != E)) {
            fprintf(stderr, "dsctl plan: %s: layer %zu: want %zu counts or []\n", path, l, E);
            goto bad;
        }
        for (size_t e = 0; e < E; e++) {
            json_t *v = json_array_get(row, e);
            if (n == 0) {
                st[l * E + e] = 1;
                continue;
            }
            if (!json_is_number(v) || json_number_value(v) < 0 || json_number_value(v) > 1e18) {
                fprintf(stderr, "dsctl plan: %s: layer %zu expert %zu: not a count\n", path, l, e);
                goto bad;
            }
            st[l * E + e] = json_number_value(v);
        }
    }
    json_decref(root);
    *out = st;
    return 0;
bad:
    free(st);
    json_decref(root);
    return -EBADMSG;
}

static int cmd_plan(int argc, char **argv)
{
    static const struct option opts[] = {{"cluster", required_argument, NULL, 'c'},
                                         {"model", required_argument, NULL, 'm'},
                                         {"batch", required_argument, NULL, 'b'},
                                         {"context", required_argument, NULL, 't'},
                                         {"objective", required_argument, NULL, 'o'},
                                         {"strategy", required_argument, NULL, 's'},
                                         {"expert-stats", required_argument, NULL, 'x'},
                                         {"pin", required_argument, NULL, 'p'},
                                         {"exclude", required_argument, NULL, 'e'},
                                         {"reserve", required_argument, NULL, 'r'},
                                         {"micro-batches", required_argument, NULL, 'M'},
                                         {"json", no_argument, NULL, 'j'},
                                         {"explain", no_argument, NULL, 'X'},
                                         {"quantize", required_argument, NULL, 'Q'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    const char *cluster_path = NULL, *model = NULL, *stats_path = NULL;
    ds_plan_options o = {.batch = 1, .context = 4096};
    static ds_pin pins[MAX_PINS];
    static const char *excl[MAX_EXCLUDE];
    size_t npin = 0, nex = 0;
    bool json = false, explain = false;
    enum ds_quantize quant = DS_QUANTIZE_NONE;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'c':
            cluster_path = optarg;
            break;
        case 'm':
            model = optarg;
            break;
        case 'x':
            stats_path = optarg;
            break;
        case 'j':
            json = true;
            break;
        case 'X':
            explain = true;
            break;
        case 'Q':
            if (ds_quantize_parse(optarg, &quant) < 0) {
                fprintf(stderr, "dsctl plan: --quantize is q8_0 or q4_k, not '%s'\n", optarg);
                return DSCTL_EXIT_USAGE;
            }
            break;
        case 'b':
            if (parse_u32(optarg, 1, 1000000, &o.batch)) {
                fprintf(stderr, "dsctl plan: bad --batch '%s' (1..1000000)\n", optarg);
                return DSCTL_EXIT_USAGE;
            }
            break;
        case 't':
            if (parse_u32(optarg, 1, 100000000, &o.context)) {
                fprintf(stderr, "dsctl plan: bad --context '%s' (1..100000000)\n", optarg);
                return DSCTL_EXIT_USAGE;
            }
            break;
        case 'M':
            if (parse_u32(optarg, 1, 1024, &o.micro_batches)) {
                fprintf(stderr, "dsctl plan: bad --micro-batches '%s' (1..1024)\n", optarg);
                return DSCTL_EXIT_USAGE;
            }
            break;
        case 'o':
            if (!strcmp(optarg, "latency"))
                o.objective = DS_OBJ_LATENCY;
            else if (!strcmp(optarg, "throughput"))
                o.objective = DS_OBJ_THROUGHPUT;
            else {
                fprintf(stderr, "dsctl plan: --objective is latency or throughput\n");
                return DSCTL_EXIT_USAGE;
            }
            break;
        case 's':
            if (ds_strategy_parse(optarg, &o.strategy)) {
                fprintf(stderr, "dsctl plan: unknown --strategy '%s'\n", optarg);
                return DSCTL_EXIT_USAGE;
            }
            break;
        case 'r': {
            char *end;
            o.reserve_fraction = strtod(optarg, &end);
            if (end == optarg || *end || !(o.reserve_fraction >= 0 && o.reserve_fraction < 1)) {
                fprintf(stderr, "dsctl plan: bad --reserve '%s' (0 <= F < 1)\n", optarg);
                return DSCTL_EXIT_USAGE;
            }
            if (o.reserve_fraction == 0)
                o.reserve_fraction = 1e-12; /* 0 means "default" in the options */
            break;
        }
        case 'p': {
            const char *eq = strchr(optarg, '=');
            if (!eq || npin >= MAX_PINS || (size_t)(eq - optarg) >= sizeof pins[0].unit ||
                strlen(eq + 1) >= sizeof pins[0].device) {
                fprintf(stderr, "dsctl plan: bad --pin '%s' (UNIT=NODE/DEVICE)\n", optarg);
                return DSCTL_EXIT_USAGE;
            }
            memcpy(pins[npin].unit, optarg, (size_t)(eq - optarg));
            pins[npin].unit[eq - optarg] = 0;
            snprintf(pins[npin].device, sizeof pins[npin].device, "%s", eq + 1);
            npin++;
            break;
        }
        case 'e':
            if (nex >= MAX_EXCLUDE) {
                fprintf(stderr, "dsctl plan: too many --exclude\n");
                return DSCTL_EXIT_USAGE;
            }
            excl[nex++] = optarg;
            break;
        case 'h':
            usage(stdout);
            return DSCTL_EXIT_OK;
        default:
            usage(stderr);
            return DSCTL_EXIT_USAGE;
        }
    }
    if (!cluster_path || !model || optind < argc) {
        usage(stderr);
        return DSCTL_EXIT_USAGE;
    }
    ds_error err = {0};
    ds_model_config cfg;
    ds_unit_bytes ub;
    /* Planning reads no weights: the config, and each unit's bytes from the tensor table (a
     * checkpoint directory's safetensors headers, a GGUF header); a bare config.json gives
     * the config alone, whose dtype (quantization_config -> FP8, else torch_dtype) then sizes
     * the units. */
    if (ds_model_unit_bytes(model, quant, &cfg, &ub, &err)) {
        fprintf(stderr, "dsctl plan: %s\n", ds_error_str(&err));
        return DSCTL_EXIT_USAGE;
    }
    if (quant && !ub.n_layers) {
        fprintf(stderr, "dsctl plan: --quantize needs the model's tensor table (a checkpoint "
                        "directory or a GGUF), not a bare config.json\n");
        return DSCTL_EXIT_USAGE;
    }
    if (ub.n_layers)
        o.unit_bytes = &ub;
    ds_cluster *cl = NULL;
    if (ds_cluster_load(cluster_path, &cl, &err)) {
        fprintf(stderr, "dsctl plan: %s\n", ds_error_str(&err));
        ds_unit_bytes_release(&ub);
        return DSCTL_EXIT_USAGE;
    }
    double *stats = NULL;
    if (stats_path && load_stats(stats_path, &cfg, &stats)) {
        ds_cluster_free(cl);
        ds_unit_bytes_release(&ub);
        return DSCTL_EXIT_USAGE;
    }
    o.expert_stats = stats;
    o.pins = pins;
    o.n_pins = npin;
    o.exclude = excl;
    o.n_exclude = nex;
    ds_plan *p = NULL;
    int rc = ds_plan_solve(cl, &cfg, &o, &p, &err);
    free(stats);
    ds_cluster_free(cl);
    ds_unit_bytes_release(&ub);
    if (rc) {
        fprintf(stderr, "dsctl plan: %s\n", ds_error_str(&err));
        return rc == -ENOMEM ? DSCTL_EXIT_FAILURE : DSCTL_EXIT_USAGE;
    }
    if (json) {
        char *s = ds_plan_to_json(p);
        if (!s) {
            ds_plan_free(p);
            fprintf(stderr, "dsctl plan: out of memory\n");
            return DSCTL_EXIT_FAILURE;
        }
        puts(s);
        free(s);
    } else
        ds_plan_print(p, stdout, explain);
    ds_plan_free(p);
    return DSCTL_EXIT_OK;
}

DSCTL_COMMAND(plan, "place a model on a described cluster (offline, no daemon)", cmd_plan);
