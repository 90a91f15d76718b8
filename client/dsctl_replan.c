/* dsctl_replan.c — `dsctl replan`: the coordinator builds a new plan over the nodes that are
 * up and not drained and rolls it out (refused while jobs run). */
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

static int cmd_replan(int argc, char **argv)
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
            fprintf(ch == 'h' ? stdout : stderr,
                    "usage: dsctl replan [--endpoint E] [--json]\n"
                    "  build and roll out a new plan over the nodes that are up and not drained\n");
            return ch == 'h' ? DSCTL_EXIT_OK : DSCTL_EXIT_USAGE;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "dsctl replan: unexpected argument '%s': replan acts on the whole "
                        "cluster (drain/undrain a node first)\n",
                argv[optind]);
        return DSCTL_EXIT_USAGE;
    }
    ds_client *c = NULL;
    char *js = NULL;
    int rc = dsctl_connect(dsctl_endpoint(ep), &c);
    if (rc == 0)
        rc = ds_client_replan(c, &js);
    if (rc < 0)
        fprintf(stderr, "dsctl replan: %s\n",
                c && *ds_client_error(c) ? ds_client_error(c) : strerror(-rc));
    else
        printf(json ? "%s\n" : "replanned: %s\n", js);
    free(js);
    ds_client_close(c);
    return dsctl_exit_code(rc);
}

DSCTL_COMMAND(replan, "build and roll out a new plan", cmd_replan);
