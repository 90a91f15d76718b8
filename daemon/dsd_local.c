/* dsd_local.c — this node's devices, discovered (and calibrated) once at start: their
 * cluster-spec form for Hello and the coordinator's own spec, the node class, and each
 * device's backend id (what ds_backend_open takes) by name, so a plan's device is opened by
 * the id discovery gave it. Written before any thread starts, read-only afterwards. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ds_devices.h"
#include "ds_log.h"
#include "dsd_loop.h"

static json_t *g_devices; /* this node's cluster-spec device array (devices/ discovery) */
static char g_node_class[16] = "server";
/* name -> ds_backend_open spec of every device discovery found here (written once at start,
 * before any thread, read by the loader threads) */
static struct {
    char name[32];
    char spec[24];
} g_backends[64];
static size_t g_n_backends;

int dsd_local_backend_spec(const char *name, char *spec, size_t n)
{
    for (size_t i = 0; name && i < g_n_backends; i++)
        if (!strcmp(g_backends[i].name, name)) {
            snprintf(spec, n, "%s", g_backends[i].spec);
            return 0;
        }
    return -ENOENT;
}

const char *dsd_local_node_class(void)
{
    return g_node_class;
}

void dsd_local_devices_free(void)
{
    json_decref(g_devices);
    g_devices = NULL;
}

/* Discovers (and, when asked, calibrates) this node's devices; falls back to one CPU device
 * described from sysconf when discovery fails, so a node can still join. */
void dsd_local_devices_discover(const dsd_opts *o)
{
    ds_devices_options dopt = {.no_opencl = !o->discover_opencl,
                               .config_path = o->devices_config[0] ? o->devices_config : NULL};
    ds_device_list *l = NULL;
    ds_error err = {0};
    char *js = NULL;
    json_t *node = NULL;
    if (ds_device_list_discover(&dopt, &l, &err) == 0) {
        ds_calibrate_options copt = {.state_dir = o->state_dir};
        if (o->calibrate && ds_device_list_calibrate(l, &copt, &err) < 0)
            ds_log_warn("device calibration: %s", ds_error_str(&err));
        if (ds_device_list_spec_json(l, &js, &err) == 0)
            node = json_loads(js, 0, NULL);
        for (size_t i = 0; i < ds_device_list_count(l) && g_n_backends < 64; i++) {
            const ds_device_info *di = ds_device_list_get(l, i);
            if (di->excluded || !di->backend_spec[0])
                continue;
            snprintf(g_backends[g_n_backends].name, sizeof(g_backends[0].name), "%s", di->name);
            snprintf(g_backends[g_n_backends].spec, sizeof(g_backends[0].spec), "%s",
                     di->backend_spec);
            g_n_backends++;
        }
        snprintf(g_node_class, sizeof(g_node_class), "%s", ds_device_list_node_class(l));
    } else {
        ds_log_warn("device discovery: %s (reporting one CPU device)", ds_error_str(&err));
    }
    free(js);
    ds_device_list_free(l);
    json_t *devs = node ? json_object_get(node, "devices") : NULL;
    if (devs && json_array_size(devs)) {
        g_devices = json_incref(devs);
    } else {
        long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
        g_devices = json_pack("[{s:s,s:s,s:s,s:I}]", "name", "cpu0", "kind", "cpu", "class",
                              "server", "memory_bytes", (json_int_t)pages * psz);
    }
    json_decref(node);
    ds_log_info("%zu devices discovered", json_array_size(g_devices));
}

json_t *dsd_local_devices(void)
{
    return json_deep_copy(g_devices);
}
