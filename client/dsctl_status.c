/* dsctl_status.c — `dsctl status`: the cluster, its nodes and their health, from the
 * coordinator. Also holds the helpers every cluster-facing dsctl command shares (connection
 * options, JSON fetch, exit codes from libdsclient errors). */
#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "ds_client.h"
#include "ds_keyfile.h"
#include "dsctl.h"

/* shared by the dsctl_*.c cluster commands (declared where used) */
int dsctl_exit_code(int rc);
int dsctl_connect(const char *endpoint, ds_client **c);
const char *dsctl_endpoint(const char *opt);
int dsctl_fetch(const char *cmd, const char *endpoint, const char *what, json_t **out);
int dsctl_simple_query(int argc, char **argv, const char *what, const char *usage,
                       void (*table)(json_t *));

int dsctl_exit_code(int rc)
{
    switch (rc) {
    case 0:
        return DSCTL_EXIT_OK;
    case -EINVAL:
    case -EMSGSIZE:
        return DSCTL_EXIT_USAGE;
    case -ESRCH:
    case -ENOENT:
        return DSCTL_EXIT_NOT_FOUND;
    default:
        return DSCTL_EXIT_FAILURE;
    }
}

const char *dsctl_endpoint(const char *opt)
{
    if (opt)
        return opt;
    const char *e = getenv("DSD_ENDPOINT");
    return e && *e ? e : "tcp://127.0.0.1:7101";
}

/* CURVE from the environment: $DSD_SERVER_KEY the cluster public key (Z85), $DSD_CLIENT_KEY a
 * key file of this client's pair (dsctl keygen --out; without it an ephemeral pair, which a
 * coordinator with curve_authorized_keys refuses). */
int dsctl_connect_timeout(const char *endpoint, int timeout_ms, ds_client **c);
int dsctl_connect_timeout(const char *endpoint, int timeout_ms, ds_client **c)
{
    const char *t = getenv("DSD_TIMEOUT_MS"), *kf = getenv("DSD_CLIENT_KEY");
    const char *rt = getenv("DSD_SUBMIT_RETRY_MS");
    ds_client_opts o = {.timeout_ms = timeout_ms > 0 ? timeout_ms
                                      : t            ? atoi(t)
                                                     : 10000,
                        .server_public_key = getenv("DSD_SERVER_KEY"),
                        /* a submit the cluster refused while it replans is sent again */
                        .submit_retry_ms = rt ? atoi(rt) : 30000};
    if (o.server_public_key && !*o.server_public_key)
        o.server_public_key = NULL;
    char pub[DS_KEY_Z85_LEN + 1], sec[DS_KEY_Z85_LEN + 1];
    if (o.server_public_key && kf && *kf) {
        ds_error err = {0};
        int rc = ds_keyfile_read(kf, true, pub, sec, &err);
        if (rc == 0 && !pub[0])
            rc = ds_error_set(&err, -EBADMSG, "%s: no 'public = KEY' line", kf);
        if (rc < 0) {
            fprintf(stderr, "dsctl: DSD_CLIENT_KEY: %s\n", ds_error_str(&err));
            return rc;
        }
        o.public_key = pub;
        o.secret_key = sec;
    }
    int rc = ds_client_connect(endpoint, &o, c);
    memset(sec, 0, sizeof(sec));
    return rc;
}

int dsctl_connect(const char *endpoint, ds_client **c)
{
    return dsctl_connect_timeout(endpoint, 0, c);
}

int dsctl_fetch(const char *cmd, const char *endpoint, const char *what, json_t **out)
{
    ds_client *c = NULL;
    char *js = NULL;
    int rc = dsctl_connect(endpoint, &c);
    if (rc == 0)
        rc = ds_client_status(c, what, &js);
    if (rc < 0) {
        fprintf(stderr, "dsctl %s: %s: %s\n", cmd, endpoint,
                c && *ds_client_error(c) ? ds_client_error(c) : strerror(-rc));
        ds_client_close(c);
        return rc;
    }
    ds_client_close(c);
    json_error_t je;
    *out = json_loads(js, 0, &je);
    free(js);
    if (!*out) {
        fprintf(stderr, "dsctl %s: bad JSON from the coordinator: %s\n", cmd, je.text);
        return -EPROTO;
    }
    return 0;
}

/* Common shape: [--endpoint E] [--json] [--help]; prints JSON or a table. */
int dsctl_simple_query(int argc, char **argv, const char *what, const char *usage,
                       void (*table)(json_t *))
{
    static const struct option opts[] = {{"endpoint", required_argument, NULL, 'e'},
                                         {"json", no_argument, NULL, 'j'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    const char *ep = NULL;
    bool json = false;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'e':
            ep = optarg;
            break;
        case 'j':
            json = true;
            break;
        case 'h':
            printf("%s", usage);
            return DSCTL_EXIT_OK;
        default:
            fprintf(stderr, "%s", usage);
            return DSCTL_EXIT_USAGE;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "%s", usage);
        return DSCTL_EXIT_USAGE;
    }
    json_t *j;
    int rc = dsctl_fetch(argv[0], dsctl_endpoint(ep), what, &j);
    if (rc < 0)
        return dsctl_exit_code(rc);
    if (json) {
        char *s = json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS);
        printf("%s\n", s);
        free(s);
    } else {
        table(j);
    }
    json_decref(j);
    return DSCTL_EXIT_OK;
}

static void status_table(json_t *j)
{
    printf("cluster %s  coordinator %s  state %s  plan v%lld\n",
           json_string_value(json_object_get(j, "cluster")),
           json_string_value(json_object_get(j, "coordinator")),
           json_string_value(json_object_get(j, "state")),
           (long long)json_integer_value(json_object_get(j, "plan_version")));
    printf("%-16s %-12s %-10s %-8s %-12s %s\n", "NODE", "ROLE", "STATE", "DRAINED", "HEARTBEAT",
           "DATA ENDPOINT");
    size_t i;
    json_t *n;
    json_array_foreach(json_object_get(j, "nodes"), i, n)
        printf("%-16s %-12s %-10s %-8s %-12s %s\n", json_string_value(json_object_get(n, "name")),
               json_string_value(json_object_get(n, "role")),
               json_string_value(json_object_get(n, "state")),
               json_is_true(json_object_get(n, "drained")) ? "yes" : "no", ({
                   static char b[32];
                   snprintf(b, sizeof(b), "%lld ms ago",
                            (long long)json_integer_value(json_object_get(n, "heartbeat_age_ms")));
                   b;
               }),
               json_string_value(json_object_get(n, "endpoint")));
    /* long work under way (dsd_progress.c): bytes done of total, rate */
    const char *kinds[] = {"loading", "streaming"};
    const char *words[] = {"paging in weights", "streaming weights"};
    for (int k = 0; k < 2; k++) {
        json_t *p = json_object_get(json_object_get(j, "progress"), kinds[k]);
        if (!p)
            continue;
        double done = json_number_value(json_object_get(p, "bytes_done"));
        double total = json_number_value(json_object_get(p, "bytes_total"));
        double rate = json_number_value(json_object_get(p, "bytes_per_s"));
        if (total > 0)
            printf("%s: %.1f of %.1f MiB (%.0f%%), %.1f MiB/s\n", words[k], done / 1048576,
                   total / 1048576, 100 * done / total, rate / 1048576);
        else
            printf("%s: %.1f MiB, %.1f MiB/s\n", words[k], done / 1048576, rate / 1048576);
    }
    /* what is wrong, after the table (scripts reading the table see it unchanged) */
    json_array_foreach(json_object_get(j, "nodes"), i, n) if (json_object_get(n, "problem"))
        printf("node %s cannot host units: %s\n", json_string_value(json_object_get(n, "name")),
               json_string_value(json_object_get(n, "problem")));
    if (json_object_get(j, "plan_error"))
        printf("plan error: %s\n", json_string_value(json_object_get(j, "plan_error")));
    json_array_foreach(json_object_get(j, "refused"), i, n)
        printf("refused %s %lld ms ago: %s\n", json_string_value(json_object_get(n, "name")),
               (long long)json_integer_value(json_object_get(n, "age_ms")),
               json_string_value(json_object_get(n, "reason")));
}

static int cmd_status(int argc, char **argv)
{
    return dsctl_simple_query(argc, argv, "status",
                              "usage: dsctl status [--endpoint tcp://HOST:7101] [--json]\n"
                              "  the cluster, its nodes and their health (coordinator's view);\n"
                              "  $DSD_ENDPOINT sets the default endpoint\n",
                              status_table);
}

DSCTL_COMMAND(status, "cluster, nodes and health", cmd_status);
