/* dsctl_placement.c — `dsctl placement`: where every unit runs (per layer: the attention host;
 * per MoE layer: expert -> node), with the measured compute time per unit and per node and the
 * measured transfer time per link, side by side with the calibrated link figures. */
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "dsctl.h"

int dsctl_exit_code(int rc);
const char *dsctl_endpoint(const char *opt);
int dsctl_fetch(const char *cmd, const char *endpoint, const char *what, json_t **out);

static const char *unit_node(json_t *units, const char *name)
{
    const char *s = json_string_value(json_object_get(units, name));
    return s ? s : "-";
}

static int cmd_placement(int argc, char **argv)
{
    static const struct option opts[] = {{"endpoint", required_argument, NULL, 'e'},
                                         {"json", no_argument, NULL, 'j'},
                                         {"layer", required_argument, NULL, 'l'},
                                         {"unit", required_argument, NULL, 'u'},
                                         {"explain", no_argument, NULL, 'x'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    const char *ep = NULL, *unit = NULL;
    bool json = false, explain = false;
    long only_layer = -1;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        char *end;
        switch (ch) {
        case 'e':
            ep = optarg;
            break;
        case 'j':
            json = true;
            break;
        case 'u':
            unit = optarg;
            break;
        case 'x':
            explain = true;
            break;
        case 'l':
            only_layer = strtol(optarg, &end, 10);
            if (end == optarg || *end || only_layer < 0 || only_layer > 100000) {
                fprintf(stderr, "dsctl placement: bad --layer %s\n", optarg);
                return DSCTL_EXIT_USAGE;
            }
            break;
        default:
            fprintf(
                ch == 'h' ? stdout : stderr,
                "usage: dsctl placement [--endpoint E] [--json] [--layer L] [--unit U] "
                "[--explain]\n"
                "  unit -> node map of the running plan with measured compute and link times\n");
            return ch == 'h' ? DSCTL_EXIT_OK : DSCTL_EXIT_USAGE;
        }
    }
    json_t *j;
    int rc = dsctl_fetch("placement", dsctl_endpoint(ep), "placement", &j);
    if (rc < 0)
        return dsctl_exit_code(rc);
    json_t *units = json_object_get(json_object_get(j, "plan"), "units");
    json_t *meas = json_object_get(j, "measured");
    if (unit) {
        const char *node = json_string_value(json_object_get(units, unit));
        if (!node) {
            fprintf(stderr, "dsctl placement: no unit '%s' in the plan\n", unit);
            json_decref(j);
            return DSCTL_EXIT_NOT_FOUND;
        }
        json_t *mu = json_object_get(json_object_get(meas, "units"), unit);
        if (json)
            printf("{\"unit\":\"%s\",\"node\":\"%s\",\"measured_compute_s\":%.9f}\n", unit, node,
                   json_real_value(json_object_get(mu, "measured_compute_s")));
        else
            printf("%s -> %s (measured compute %.3f ms)\n", unit, node,
                   json_real_value(json_object_get(mu, "measured_compute_s")) * 1e3);
        json_decref(j);
        return DSCTL_EXIT_OK;
    }
    if (json) {
        char *s = json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS);
        printf("%s\n", s);
        free(s);
        json_decref(j);
        return DSCTL_EXIT_OK;
    }
    printf("plan v%lld   embed -> %s   head -> %s\n",
           (long long)json_integer_value(json_object_get(json_object_get(j, "plan"), "version")),
           unit_node(units, "embed"), unit_node(units, "head"));
    printf("%-6s %-14s %-14s %s\n", "LAYER", "ATTENTION", "MEASURED", "EXPERTS (expert:node)");
    json_t *mus = json_object_get(meas, "units");
    char name[64];
    for (long l = 0; l < 100000; l++) {
        snprintf(name, sizeof(name), "attn[%ld]", l);
        if (!json_object_get(units, name))
            break;
        if (only_layer >= 0 && l != only_layer)
            continue;
        json_t *mu = json_object_get(mus, name);
        double ms = json_real_value(json_object_get(mu, "measured_compute_s")) * 1e3;
        long calls = (long)json_integer_value(json_object_get(mu, "calls"));
        char mbuf[32];
        snprintf(mbuf, sizeof(mbuf), "%.3f ms/call", calls ? ms / (double)calls : 0.0);
        printf("%-6ld %-14s %-14s ", l, unit_node(units, name), mbuf);
        int any = 0;
        for (long e = 0; e < 1 << 16; e++) {
            snprintf(name, sizeof(name), "expert[%ld][%ld]", l, e);
            const char *n = json_string_value(json_object_get(units, name));
            if (!n)
                break;
            printf("%s%ld:%s", any++ ? " " : "", e, n);
        }
        printf("%s\n", any ? "" : "(dense)");
    }
    printf("\n%-16s %-12s %-12s %-14s %-14s %-10s %s\n", "LINK", "LATENCY", "BANDWIDTH", "PRED/MSG",
           "MEAS XFER/MSG", "MESSAGES", "EXPERT COMPUTE");
    size_t i;
    json_t *lk;
    json_array_foreach(json_object_get(meas, "links"), i, lk)
    {
        double lat = json_real_value(json_object_get(lk, "latency_s"));
        double bw = json_real_value(json_object_get(lk, "bandwidth_bytes_per_s"));
        double msgs = (double)json_integer_value(json_object_get(lk, "messages"));
        double bytes = (double)json_integer_value(json_object_get(lk, "bytes"));
        double tr = json_real_value(json_object_get(lk, "measured_transfer_s"));
        /* predicted per message from calibration: 2 x latency (there and back) + bytes/bw */
        double pred = msgs > 0 ? 2 * lat + (bw > 0 ? bytes / msgs / bw : 0) : 0;
        char l1[32], l2[32];
        snprintf(l1, sizeof(l1), "%s->%s", json_string_value(json_object_get(lk, "from")),
                 json_string_value(json_object_get(lk, "to")));
        snprintf(l2, sizeof(l2), "%.1f MB/s", bw / 1e6);
        printf("%-16s %-9.1f us %-12s %-11.1f us %-11.1f us %-10.0f %.3f ms\n", l1, lat * 1e6, l2,
               pred * 1e6, msgs > 0 ? tr / msgs * 1e6 : 0.0, msgs,
               json_real_value(json_object_get(lk, "expert_compute_s")) * 1e3);
    }
    if (explain)
        printf("\nwhy: embed and head stay on the coordinator, which samples; attention layers "
               "start at the first worker and go round the nodes; experts of layer l go round "
               "the nodes starting at l, so every node hosts both kinds of unit; shared experts "
               "and dense FFNs run beside their attention. Predicted per message = 2 x link "
               "latency + bytes / bandwidth (calibrated at start); measured = round trip minus "
               "the host's reported compute time.\n");
    json_decref(j);
    return DSCTL_EXIT_OK;
}

DSCTL_COMMAND(placement, "unit -> node map, predicted vs measured", cmd_placement);
