/* dsctl_drain.c — `dsctl drain NODE` / `dsctl undrain NODE`: take a node out of (or back
 * into) the next plan. The node keeps serving the current plan until `dsctl replan`. */
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

static int drain_common(int argc, char **argv, bool undrain)
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
        if (ch == 'e')
            ep = optarg;
        else if (ch == 'j')
            json = true;
        else {
            FILE *f = ch == 'h' ? stdout : stderr;
            fprintf(f,
                    "usage: dsctl %s NODE [--endpoint E] [--json]\n"
                    "  %s a node: %s the next plan (dsctl replan)\n",
                    argv[0], undrain ? "undrain" : "drain",
                    undrain ? "it takes units again from" : "it gets no units in");
            return ch == 'h' ? DSCTL_EXIT_OK : DSCTL_EXIT_USAGE;
        }
    }
    if (optind + 1 != argc) {
        fprintf(stderr, "usage: dsctl %s NODE [--endpoint E] [--json]\n", argv[0]);
        return DSCTL_EXIT_USAGE;
    }
    ds_client *c = NULL;
    char *js = NULL;
    const char *endpoint = dsctl_endpoint(ep);
    int rc = dsctl_connect(endpoint, &c);
    if (rc == 0)
        rc = ds_client_drain(c, argv[optind], undrain, &js);
    if (rc < 0)
        fprintf(stderr, "dsctl %s: %s\n", argv[0],
                c && *ds_client_error(c) ? ds_client_error(c) : strerror(-rc));
    else if (json)
        printf("%s\n", js);
    else
        printf("node %s %s\n", argv[optind], undrain ? "undrained" : "drained");
    free(js);
    ds_client_close(c);
    return dsctl_exit_code(rc);
}

static int cmd_drain(int argc, char **argv)
{
    return drain_common(argc, argv, false);
}

static int cmd_undrain(int argc, char **argv)
{
    return drain_common(argc, argv, true);
}

DSCTL_COMMAND(drain, "take a node out of the next plan", cmd_drain);
DSCTL_COMMAND(undrain, "give a drained node units again", cmd_undrain);
