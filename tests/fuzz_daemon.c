/* fuzz_daemon.c — the daemon's parsers of outside input: the config file (key = value lines
 * through the options table) and a wire Plan turned into this node's units (unit names, layer
 * and expert indices checked against the model). Input: first byte selects the parser. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "dsd.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static ds_model *g_model;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    ds_error err = {0};
    if (data[0] & 1) {
        int fd = memfd_create("conf", MFD_CLOEXEC);
        if (fd < 0)
            return 0;
        if (write(fd, data + 1, size - 1) == (ssize_t)(size - 1)) {
            char path[64];
            snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
            dsd_opts o;
            dsd_opts_defaults(&o);
            if (dsd_opts_load_file(&o, path, &err) == 0)
                dsd_opts_check(&o, &err);
        }
        close(fd);
        return 0;
    }
    if (!g_model && ds_model_open(DS_TEST_DATA "/ref/v3_bf16", NULL, &g_model, &err) < 0)
        abort();
    Dsd__Plan *p = dsd__plan__unpack(NULL, size - 1, data + 1);
    if (!p)
        return 0;
    dsd_units u;
    if (dsd_plan_units_from_wire(p, "w1", ds_model_get_config(g_model), &u, &err) == 0)
        dsd_units_clear(&u);
    dsd__plan__free_unpacked(p, NULL);
    return 0;
}
