/* dsctl_version.c — `dsctl version`: the client's version and build features. */
#include <stdio.h>

#include "ds_version.h"
#include "dsctl.h"

static int cmd_version(int argc, char **argv)
{
    printf("dsctl %s\n", ds_version());
    return DSCTL_EXIT_OK;
}

DSCTL_COMMAND(version, "print the version", cmd_version);
