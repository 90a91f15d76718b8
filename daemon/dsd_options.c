/* dsd_options.c — every dsd option lives in ONE table (name, type, bounds, default, help,
 * reloadable). The table drives the config file parser, the command line (getopt_long over a
 * long-option list generated from it: --key=value and --key value, '-' or '_' in the key),
 * the SIGHUP reload and `dsd --help`, so an option cannot be documented in one place and
 * parsed differently in another. Precedence: defaults < config file < command line. */
#include <errno.h>
#include <getopt.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ds_keyfile.h"
#include "ds_log.h"
#include "ds_version.h"
#include "dsd.h"

enum opt_type { OPT_STR, OPT_INT, OPT_BOOL, OPT_ENUM };

struct opt {
    const char *name;
    enum opt_type type;
    size_t off;
    size_t size;      /* OPT_STR: buffer size */
    int64_t min, max; /* OPT_INT bounds, inclusive */
    const char *def;
    const char *choices; /* OPT_ENUM: "a|b|c" */
    bool reloadable;
    const char *help;
};

#define S(f) offsetof(dsd_opts, f), sizeof(((dsd_opts *)0)->f)
#define I(f) offsetof(dsd_opts, f), 0

static const struct opt OPTS[] = {
    {"role", OPT_ENUM, S(role), 0, 0, "coordinator", "coordinator|worker", false,
     "coordinator holds membership, the plan and the job queue; worker hosts units"},
    {"node", OPT_STR, S(node), 0, 0, "", NULL, false,
     "node name, unique in the cluster (default: hostname)"},
    {"cluster", OPT_STR, S(cluster), 0, 0, "dsd", NULL, false, "cluster name (coordinator)"},
    {"coordinator", OPT_STR, S(coordinator), 0, 0, "", NULL, false,
     "worker: control endpoint of the coordinator, e.g. tcp://10.0.0.1:7100"},
    {"control_bind", OPT_STR, S(control_bind), 0, 0, "tcp://127.0.0.1:7100", NULL, false,
     "coordinator: where workers connect (ZeroMQ endpoint; loopback unless an address is "
     "given, e.g. tcp://10.0.0.1:7100 or tcp://*:7100)"},
    {"client_bind", OPT_STR, S(client_bind), 0, 0, "tcp://127.0.0.1:7101", NULL, false,
     "coordinator: where clients (libdsclient, dsctl) connect (loopback unless an address is "
     "given)"},
    {"data_bind", OPT_STR, S(data_bind), 0, 0, "tcp://127.0.0.1:7102", NULL, false,
     "where this node's data ROUTER listens"},
    {"data_advertise", OPT_STR, S(data_advertise), 0, 0, "", NULL, false,
     "data endpoint peers connect to (default: data_bind)"},
    {"model", OPT_STR, S(model), 0, 0, "/var/lib/dsd/model", NULL, false,
     "checkpoint directory (config.json + safetensors) or GGUF file (deepseek2, or any part of "
     "a split set), mmapped"},
    {"quantize", OPT_ENUM, S(quantize), 0, 0, "none", "none|q8_0|q4_k", false,
     "coordinator: quantise the model's F32/F16/BF16/FP8 linear weights at load into Q8_0 or "
     "Q4_K blocks on every node (norms, embeddings, router gates stay; q4_k rows not a "
     "multiple of 256 fall back to q8_0); the plan counts the quantised bytes"},
    {"state_dir", OPT_STR, S(state_dir), 0, 0, "/var/lib/dsd", NULL, false,
     "state directory (current plan, node identity)"},
    {"log_level", OPT_ENUM, S(log_level), 0, 0, "info", "err|warning|notice|info|debug", true,
     "log verbosity"},
    {"expect_workers", OPT_INT, I(expect_workers), 0, 1024, "0", NULL, false,
     "coordinator: workers that must join before the plan is rolled out"},
    {"heartbeat_ms", OPT_INT, I(heartbeat_ms), 20, 60000, "1000", NULL, true,
     "heartbeat period in milliseconds"},
    {"heartbeat_misses", OPT_INT, I(heartbeat_misses), 2, 100, "5", NULL, true,
     "missed heartbeats before a peer is declared failed"},
    {"threads", OPT_INT, I(threads), 0, 1024, "0", NULL, false,
     "compute threads (0: all online CPUs)"},
    {"max_jobs", OPT_INT, I(max_jobs), 1, 4096, "64", NULL, true,
     "coordinator: concurrent jobs accepted; more are refused with BUSY (a reload applies from "
     "the next plan)"},
    {"max_context", OPT_INT, I(max_context), 2, 1 << 20, "4096", NULL, false,
     "positions per sequence (prompt + generated), capped by the model"},
    {"step_timeout_ms", OPT_INT, I(step_timeout_ms), 100, 3600000, "30000", NULL, true,
     "a unit host that does not answer within this time fails the step"},
    {"max_request_bytes", OPT_INT, I(max_request_bytes), 256, 16 << 20, "1048576", NULL, true,
     "largest client request accepted (bytes); larger ones are refused with TOO_LARGE"},
    {"max_frame_bytes", OPT_INT, I(max_frame_bytes), 1 << 20, 1 << 30, "268435456", NULL, false,
     "largest frame a data-plane peer may send (bytes); a connection announcing more is dropped "
     "before it is buffered; the coordinator keeps a micro-batch's frames under it"},
    {"compute", OPT_BOOL, I(compute), 0, 1, "true", NULL, false,
     "coordinator: also host units (embed and head always stay on the coordinator)"},
    {"calibrate", OPT_BOOL, I(calibrate), 0, 1, "true", NULL, false,
     "measure the devices at start (memory bandwidth, FLOP/s; cached in state_dir)"},
    {"discover_opencl", OPT_BOOL, I(discover_opencl), 0, 1, "true", NULL, false,
     "include OpenCL devices when discovering this node's devices"},
    {"devices_config", OPT_STR, S(devices_config), 0, 0, "", NULL, false,
     "devices operator config file (docs/devices.md: memory_cap, ...), empty for none"},
    {"plan_strategy", OPT_STR, S(plan_strategy), 0, 0, "auto", NULL, true,
     "coordinator: placement strategy (auto, heuristic, exact, mem-proportional, ...; "
     "round-robin = the built-in debugging plan, not the solver)"},
    {"plan_batch", OPT_INT, I(plan_batch), 1, 4096, "1", NULL, true,
     "coordinator: sequences decoded together that the planner optimises for"},
    {"plan_context", OPT_INT, I(plan_context), 0, 1 << 20, "0", NULL, true,
     "coordinator: context tokens per sequence the planner reserves KV for (0: max_context)"},
    {"plan_pin", OPT_STR, S(plan_pin), 0, 0, "", NULL, true,
     "coordinator: units the solver must keep on a device, UNIT=NODE/DEV separated by commas "
     "(attn[*] = every layer, expert[L][*] / expert[*][*] = every expert of layer L / of all "
     "layers), e.g. attn[*]=coord/cuda0,head=coord/cuda0,expert[*][*]=coord/cpu0"},
    {"auto_replan", OPT_BOOL, I(auto_replan), 0, 1, "true", NULL, true,
     "coordinator: replan without a node that fails (its jobs end with an error), and take "
     "nodes outside the plan back in once no job runs"},
    {"link_wait_ms", OPT_INT, I(link_wait_ms), 0, 600000, "5000", NULL, true,
     "coordinator: how long the first plan waits for the links to the joined nodes to be "
     "measured (it plans as soon as they are)"},
    {"micro_batches", OPT_INT, I(micro_batches), 1, 64, "2", NULL, false,
     "coordinator: micro-batches in flight at once (the running jobs are split over them so "
     "one computes while another crosses a link; 1 when the plan runs on one node)"},
    {"max_rows_per_step", OPT_INT, I(max_rows_per_step), 1, 65536, "65536", NULL, false,
     "coordinator: rows (token positions) one micro-batch carries at most; a longer prefill is "
     "fed in chunks over several steps (the hosts' limit is 65536)"},
    {"curve_secret_key_file", OPT_STR, S(curve_secret_key_file), 0, 0, "", NULL, false,
     "CURVE: the cluster key pair file (dsctl keygen: 'public = KEY', 'secret = KEY', mode "
     "0600), the same on every node; empty = plain TCP, no authentication"},
    {"curve_authorized_keys", OPT_STR, S(curve_authorized_keys), 0, 0, "", NULL, false,
     "CURVE, coordinator: file of client public keys (Z85, one a line, # comments) allowed on "
     "client_bind; empty = every client that knows the cluster public key"},
    {"curve_operator_keys", OPT_STR, S(curve_operator_keys), 0, 0, "", NULL, false,
     "CURVE, coordinator: file of client public keys (as curve_authorized_keys) that may also "
     "drain, undrain and replan; the others may only submit, cancel and read status; empty = "
     "every admitted client may"},
    {"curve_server_public_key", OPT_STR, S(curve_server_public_key), 0, 0, "", NULL, false,
     "CURVE: the coordinator's (= cluster) public key, to pin it; empty = the public key of "
     "curve_secret_key_file; a different key refuses to start"},
    {"http_bind", OPT_STR, S(http_bind), 0, 0, "127.0.0.1:8080", NULL, false,
     "coordinator: HOST:PORT of the OpenAI-compatible HTTP API, /health, /metrics and the "
     "status page (docs/http.md); empty = no HTTP server. Without http_api_keys_file only "
     "loopback is served"},
    {"http_api_keys_file", OPT_STR, S(http_api_keys_file), 0, 0, "", NULL, false,
     "coordinator: file of HTTP API keys (one a line, # comments) a client sends as "
     "'Authorization: Bearer KEY'; empty = no keys, and the HTTP API binds loopback only"},
    {"http_model_name", OPT_STR, S(http_model_name), 0, 0, "", NULL, false,
     "coordinator: the model's id in /v1/models and the answers (default: the last part of "
     "the model path)"},
    {"chat_template_file", OPT_STR, S(chat_template_file), 0, 0, "", NULL, false,
     "coordinator: a chat template (Jinja text of the DeepSeek V2/V2.5/V3/R1/V3.1 form) used "
     "instead of the model's own, for a model whose template dsd does not render"},
    {"http_max_connections", OPT_INT, I(http_max_connections), 1, 10000, "256", NULL, false,
     "coordinator: concurrent HTTP connections (one thread each); more are refused"},
    {"http_max_body_bytes", OPT_INT, I(http_max_body_bytes), 1024, 256 << 20, "4194304", NULL,
     false, "coordinator: largest HTTP request body; a larger one is answered 413"},
    {"http_timeout_s", OPT_INT, I(http_timeout_s), 1, 86400, "600", NULL, false,
     "coordinator: an HTTP connection idle this long is closed"},
};
#define N_OPTS (sizeof(OPTS) / sizeof(OPTS[0]))

static const struct opt *opt_find(const char *name)
{
    for (size_t i = 0; i < N_OPTS; i++)
        if (!strcmp(OPTS[i].name, name))
            return &OPTS[i];
    return NULL;
}

static int opt_apply(dsd_opts *o, const struct opt *p, const char *v, ds_error *err)
{
    char *base = (char *)o + p->off;
    switch (p->type) {
    case OPT_STR:
        if (strlen(v) >= p->size)
            return ds_error_set(err, -ERANGE, "option %s: value longer than %zu bytes", p->name,
                                p->size - 1);
        strcpy(base, v);
        return 0;
    case OPT_ENUM: {
        size_t n = strlen(v);
        const char *c = p->choices;
        while (c && *c) {
            const char *bar = strchr(c, '|');
            size_t len = bar ? (size_t)(bar - c) : strlen(c);
            if (len == n && !strncmp(c, v, n) && n < p->size) {
                strcpy(base, v);
                return 0;
            }
            c = bar ? bar + 1 : NULL;
        }
        return ds_error_set(err, -EINVAL, "option %s: '%s' is not one of %s", p->name, v,
                            p->choices);
    }
    case OPT_INT: {
        char *end;
        errno = 0;
        long long x = strtoll(v, &end, 10);
        if (end == v || *end || errno)
            return ds_error_set(err, -EINVAL, "option %s: '%s' is not an integer", p->name, v);
        if (x < p->min || x > p->max)
            return ds_error_set(err, -ERANGE, "option %s: %lld outside [%lld, %lld]", p->name, x,
                                (long long)p->min, (long long)p->max);
        *(int64_t *)base = x;
        return 0;
    }
    case OPT_BOOL:
        if (!strcmp(v, "true") || !strcmp(v, "yes") || !strcmp(v, "1") || !strcmp(v, "on"))
            *(bool *)base = true;
        else if (!strcmp(v, "false") || !strcmp(v, "no") || !strcmp(v, "0") || !strcmp(v, "off"))
            *(bool *)base = false;
        else
            return ds_error_set(err, -EINVAL, "option %s: '%s' is not a boolean", p->name, v);
        return 0;
    }
    return -EINVAL;
}

void dsd_opts_defaults(dsd_opts *o)
{
    memset(o, 0, sizeof(*o));
    for (size_t i = 0; i < N_OPTS; i++) {
        int r = opt_apply(o, &OPTS[i], OPTS[i].def, NULL);
        (void)r; /* defaults are in range by construction (checked by test_daemon) */
    }
}

int dsd_opts_set(dsd_opts *o, const char *key, const char *value, ds_error *err)
{
    const struct opt *p = opt_find(key);
    if (!p)
        return ds_error_set(err, -ENOENT, "unknown option '%s' (see dsd --help)", key);
    return opt_apply(o, p, value, err);
}

int dsd_opts_load_file(dsd_opts *o, const char *path, ds_error *err)
{
    FILE *f = fopen(path, "re");
    if (!f)
        return ds_error_set(err, -errno, "%s: %s", path, strerror(errno));
    char line[4096];
    unsigned ln = 0;
    int rc = 0;
    while (fgets(line, sizeof(line), f)) {
        ln++;
        if (!strchr(line, '\n') && !feof(f)) {
            rc = ds_error_set(err, -ERANGE, "%s:%u: line longer than %zu bytes", path, ln,
                              sizeof(line) - 2);
            break;
        }
        char *s = ds_trim(line);
        if (!*s || *s == '#')
            continue;
        char *eq = strchr(s, '=');
        if (!eq) {
            rc = ds_error_set(err, -EINVAL, "%s:%u: expected 'key = value'", path, ln);
            break;
        }
        *eq = 0;
        char *k = ds_trim(s), *v = ds_trim(eq + 1);
        size_t vl = strlen(v);
        if (vl >= 2 && v[0] == '"' && v[vl - 1] == '"') {
            v[vl - 1] = 0;
            v++;
        }
        if ((rc = dsd_opts_set(o, k, v, err)) < 0) {
            ds_error_prefix(err, "%s:%u", path, ln);
            break;
        }
    }
    fclose(f);
    return rc;
}

/* getopt_long's table, generated from OPTS: every option under its name and, where the name
 * has '_', with '-' instead; then --config, --help, --version. val: the index in OPTS, or the
 * LONG_* codes below. */
enum { LONG_CONFIG = 0x10000, LONG_HELP, LONG_VERSION };
#define N_LONG (2 * N_OPTS + 4)

static void long_options(struct option *lo, char (*dashed)[64])
{
    size_t n = 0;
    for (size_t i = 0; i < N_OPTS; i++) {
        lo[n++] = (struct option){OPTS[i].name, required_argument, NULL, (int)i};
        if (!strchr(OPTS[i].name, '_'))
            continue;
        snprintf(dashed[i], 64, "%s", OPTS[i].name);
        for (char *c = dashed[i]; *c; c++)
            if (*c == '_')
                *c = '-';
        lo[n++] = (struct option){dashed[i], required_argument, NULL, (int)i};
    }
    lo[n++] = (struct option){"config", required_argument, NULL, LONG_CONFIG};
    lo[n++] = (struct option){"help", no_argument, NULL, LONG_HELP};
    lo[n++] = (struct option){"version", no_argument, NULL, LONG_VERSION};
    lo[n] = (struct option){NULL, 0, NULL, 0};
}

/* One getopt_long pass over argv (reset first: the parse runs again on SIGHUP). pass 0 looks
 * for --config, --help and --version only; pass 1 applies every option. Returns 0, 1 when
 * --help or --version was printed, or a negative errno with err naming the argument. */
static int parse_pass(dsd_opts *o, int argc, char **argv, int pass, const char **config,
                      ds_error *err)
{
    static struct option lo[N_LONG];
    static char dashed[N_OPTS][64];
    long_options(lo, dashed);
    optind = 0;
    opterr = 0;
    int c, idx;
    /* "+": no permutation (argv stays as given; a stray word ends the options), ":": a
     * missing value is told apart from an unknown option */
    while ((c = getopt_long(argc, argv, "+:h", lo, &idx)) != -1) {
        const char *arg = argv[optind - 1];
        if (c == '?' || c == ':')
            return ds_error_set(err, -EINVAL, "argument '%s': %s (see dsd --help)", arg,
                                c == ':' ? "needs a value" : "unknown option");
        if (c == 'h' || c == LONG_HELP) {
            dsd_opts_help(stdout);
            return 1;
        }
        if (c == LONG_VERSION) {
            printf("dsd %s\n", ds_version());
            return 1;
        }
        if (c == LONG_CONFIG) {
            *config = optarg;
            continue;
        }
        if (pass == 0)
            continue;
        int rc = opt_apply(o, &OPTS[c], optarg, err);
        if (rc < 0)
            return rc;
    }
    if (optind < argc)
        return ds_error_set(err, -EINVAL, "argument '%s': expected --key=value or --key value",
                            argv[optind]);
    return 0;
}

int dsd_opts_parse(dsd_opts *o, int argc, char **argv, const char **config, ds_error *err)
{
    *config = NULL;
    int rc = parse_pass(o, argc, argv, 0, config, err);
    if (rc != 0)
        return rc;
    if (!*config && access("/etc/dsd/dsd.conf", R_OK) == 0)
        *config = "/etc/dsd/dsd.conf";
    if (*config && **config && (rc = dsd_opts_load_file(o, *config, err)) < 0)
        return rc;
    return parse_pass(o, argc, argv, 1, config, err);
}

int dsd_opts_check(const dsd_opts *o, ds_error *err)
{
    if (!strcmp(o->role, "worker") && !o->coordinator[0])
        return ds_error_set(err, -EINVAL,
                            "option coordinator: a worker needs the coordinator's "
                            "control endpoint");
    if (!o->node[0])
        return ds_error_set(err, -EINVAL, "option node: empty node name");
    if (!o->curve_secret_key_file[0] &&
        (o->curve_authorized_keys[0] || o->curve_server_public_key[0]))
        return ds_error_set(
            err, -EINVAL, "option %s: CURVE needs curve_secret_key_file (the cluster key pair)",
            o->curve_authorized_keys[0] ? "curve_authorized_keys" : "curve_server_public_key");
    if (o->curve_server_public_key[0] && !ds_key_is_z85(o->curve_server_public_key))
        return ds_error_set(err, -EINVAL, "option curve_server_public_key: not %d Z85 characters",
                            DS_KEY_Z85_LEN);
    for (const char *c = o->node; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
              *c == '-' || *c == '_' || *c == '.'))
            return ds_error_set(err, -EINVAL, "option node: '%s' may only use [A-Za-z0-9._-]",
                                o->node);
    return 0;
}

void dsd_opts_apply_reload(dsd_opts *cur, const dsd_opts *next)
{
    for (size_t i = 0; i < N_OPTS; i++) {
        const struct opt *p = &OPTS[i];
        size_t sz = p->type == OPT_INT    ? sizeof(int64_t)
                    : p->type == OPT_BOOL ? sizeof(bool)
                                          : p->size;
        char *a = (char *)cur + p->off;
        const char *b = (const char *)next + p->off;
        if (!memcmp(a, b, sz))
            continue;
        if (!p->reloadable) {
            ds_log_warn("reload: option %s cannot change while running; restart to apply", p->name);
            continue;
        }
        memcpy(a, b, sz);
        ds_log_notice("reload: option %s changed", p->name);
    }
}

void dsd_opts_help(FILE *f)
{
    fprintf(f, "usage: dsd [--config=PATH] [--key=value | --key value ...] [--help] [--version]\n\n"
               "Options (config file: key = value; command line: --key=value or --key value,\n"
               "'-' or '_' in the key):\n");
    for (size_t i = 0; i < N_OPTS; i++) {
        const struct opt *p = &OPTS[i];
        char range[96] = "";
        if (p->type == OPT_INT)
            snprintf(range, sizeof(range), " [%lld..%lld]", (long long)p->min, (long long)p->max);
        else if (p->type == OPT_ENUM)
            snprintf(range, sizeof(range), " {%s}", p->choices);
        fprintf(f, "  %-18s %s%s\n  %-18s default: %s%s\n", p->name, p->help, range, "",
                p->def[0] ? p->def : "(empty)", p->reloadable ? "; reloadable with SIGHUP" : "");
    }
}

void dsd_opts_print(const dsd_opts *o, FILE *f)
{
    for (size_t i = 0; i < N_OPTS; i++) {
        const struct opt *p = &OPTS[i];
        const char *base = (const char *)o + p->off;
        if (p->type == OPT_INT)
            fprintf(f, "%s = %lld\n", p->name, (long long)*(const int64_t *)base);
        else if (p->type == OPT_BOOL)
            fprintf(f, "%s = %s\n", p->name, *(const bool *)base ? "true" : "false");
        else
            fprintf(f, "%s = %s\n", p->name, base);
    }
}
