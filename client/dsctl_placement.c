/* dsctl_placement.c — `dsctl placement`: where every unit runs (per layer: the attention host;
 * per MoE layer: expert -> node), with the measured compute time per unit and per node and the
 * measured transfer time per link, side by side with the calibrated link figures and the
 * solver's predicted times per step. The table itself: dsctl_placement_table.c. */
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "dsctl.h"
#include "dsctl_placement_table.h"

int dsctl_exit_code(int rc);
const char *dsctl_endpoint(const char *opt);
int dsctl_fetch(const char *cmd, const char *endpoint, const char *what, json_t **out);

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
    if (optind < argc) {
        fprintf(stderr, "dsctl placement: unexpected argument '%s' (see --help)\n", argv[optind]);
        return DSCTL_EXIT_USAGE;
    }
    json_t *j;
    int rc = dsctl_fetch("placement", dsctl_endpoint(ep), "placement", &j);
    if (rc < 0)
        return dsctl_exit_code(rc);
    json_t *units = json_object_get(json_object_get(j, "plan"), "units");
    if (only_layer >= 0) {
        char an[32];
        snprintf(an, sizeof(an), "attn[%ld]", only_layer);
        if (!json_object_get(units, an)) {
            fprintf(stderr, "dsctl placement: no layer %ld in the plan\n", only_layer);
            json_decref(j);
            return DSCTL_EXIT_NOT_FOUND;
        }
    }
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
    dsctl_placement_print(stdout, j, only_layer, explain);
    json_decref(j);
    return DSCTL_EXIT_OK;
}

DSCTL_COMMAND(placement, "unit -> node map, predicted vs measured", cmd_placement);
