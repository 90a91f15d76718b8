/* ds_version.c — the project version string. */
#include "ds_version.h"

const char *ds_version(void)
{
    return DS_VERSION_STRING;
}
