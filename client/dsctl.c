/* dsctl.c — the operator's command line: dispatches to the subcommands registered with
 * DSCTL_COMMAND (see dsctl.h). */
#include <stdio.h>
#include <string.h>

#include "ds_log.h"
#include "ds_version.h"
#include "dsctl.h"

extern const struct dsctl_command __start_dsctl_cmds[];
extern const struct dsctl_command __stop_dsctl_cmds[];

static void usage(FILE *f)
{
    fprintf(f, "usage: dsctl [--verbose] COMMAND [ARGS...]\n\n"
               "Inspect and drive a dsd cluster. `dsctl COMMAND --help` for each command.\n\n"
               "commands:\n");
    for (const struct dsctl_command *c = __start_dsctl_cmds; c < __stop_dsctl_cmds; c++)
        fprintf(f, "  %-12s %s\n", c->name, c->summary);
    fprintf(f, "\nexit status: 0 ok, 1 failure, 2 usage or invalid input, 3 not found\n");
}

int main(int argc, char **argv)
{
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return DSCTL_EXIT_OK;
        } else if (strcmp(argv[i], "--version") == 0) {
            printf("dsctl %s\n", ds_version());
            return DSCTL_EXIT_OK;
        } else if (strcmp(argv[i], "--verbose") == 0 || strcmp(argv[i], "-v") == 0) {
            ds_log_set_level(DS_LOG_DEBUG);
        } else {
            fprintf(stderr, "dsctl: unknown option %s\n", argv[i]);
            usage(stderr);
            return DSCTL_EXIT_USAGE;
        }
    }
    if (i >= argc) {
        usage(stderr);
        return DSCTL_EXIT_USAGE;
    }
    for (const struct dsctl_command *c = __start_dsctl_cmds; c < __stop_dsctl_cmds; c++)
        if (strcmp(c->name, argv[i]) == 0)
            return c->run(argc - i, argv + i);
    fprintf(stderr, "dsctl: unknown command '%s'\n", argv[i]);
    usage(stderr);
    return DSCTL_EXIT_USAGE;
}
