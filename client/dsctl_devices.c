/* dsctl_devices.c — `dsctl devices`: this node's compute devices, discovered and measured.
 *
 * Discovery and calibration are devices/ (ds_devices.h); this file only parses flags and
 * prints. Calibration figures come from the cache in the state directory unless --calibrate
 * asks for a new measurement (or the hardware fingerprint changed). */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ds_devices.h"
#include "ds_log.h"
#include "dsctl.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: dsctl devices [--json] [--calibrate] [--no-measure] [--state-dir DIR]\n"
               "                     [--config FILE] [--hwloc-xml FILE] [--quick]\n"
               "  --json          the node as cluster-spec data plus everything discovered\n"
               "  --calibrate     measure again even when the cache matches this hardware\n"
               "  --no-measure    discovery only\n"
               "  --state-dir DIR calibration cache directory (default $DSD_STATE_DIR,\n"
               "                  /var/lib/dsd when writable, else ~/.cache/dsd)\n"
               "  --config FILE   operator device configuration (docs/devices.md)\n"
               "  --hwloc-xml F   CPU topology from an hwloc XML file instead of this machine\n"
               "  --quick         smaller calibration (32 MiB matvec, 3 repeats)\n");
}

static const char *default_state_dir(char *buf, size_t cap)
{
    const char *e = getenv("DSD_STATE_DIR");
    if (e && *e)
        return e;
    if (access("/var/lib/dsd", W_OK) == 0)
        return "/var/lib/dsd";
    const char *home = getenv("HOME");
    if (!home || !*home)
        return NULL;
    snprintf(buf, cap, "%s/.cache", home);
    mkdir(buf, 0755);
    snprintf(buf, cap, "%s/.cache/dsd", home);
    return buf;
}

static void human_bytes(char *b, size_t cap, double v)
{
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int i = 0;
    while (v >= 1024 && i < 4) {
        v /= 1024;
        i++;
    }
    snprintf(b, cap, "%.1f%s", v, u[i]);
}

static void fig(char *b, size_t cap, const ds_measure *m, double scale, const char *fmt)
{
    if (m->value <= 0) {
        snprintf(b, cap, "-");
        return;
    }
    char v[32];
    snprintf(v, sizeof(v), fmt, m->value * scale);
    snprintf(b, cap, "%s ±%.0f%%", v, m->spread * 100);
}

static void print_table(const ds_device_list *l)
{
    printf("node %s  class %s  hardware fingerprint %s\n", ds_device_list_node_name(l),
           ds_device_list_node_class(l), ds_device_list_fingerprint(l));
    printf("%-9s %-6s %-5s %-6s %-9s %4s %-30s %-16s %-16s %-14s %-12s %s\n", "NAME", "SOURCE",
           "KIND", "CLASS", "MEMORY", "CU", "MODEL", "MATVEC GB/s", "GFLOP/s", "LINK GB/s",
           "LAUNCH us", "NOTES");
    for (size_t i = 0; i < ds_device_list_count(l); i++) {
        const ds_device_info *d = ds_device_list_get(l, i);
        char mem[24], bw[32], fl[32], link[32], lat[32], notes[256] = "";
        human_bytes(mem, sizeof(mem), (double)d->memory_bytes);
        fig(bw, sizeof(bw), &d->mem_bw, 1e-9, "%.2f");
        fig(fl, sizeof(fl), &d->flops, 1e-9, "%.1f");
        fig(link, sizeof(link), &d->host_link, 1e-9, "%.2f");
        fig(lat, sizeof(lat), &d->launch, 1e6, "%.0f");
        size_t n = 0;
#define NOTE(...)                                                                                  \
    n += (size_t)snprintf(notes + n, n < sizeof(notes) ? sizeof(notes) - n : 0, __VA_ARGS__)
        if (d->excluded)
            NOTE("excluded; ");
        if (d->memory_bytes != d->memory_found_bytes)
            NOTE("capped from %.1fGiB; ", (double)d->memory_found_bytes / (1 << 30));
        if (d->shares_silicon_with[0])
            NOTE("shares silicon with %s; ", d->shares_silicon_with);
        if (!strcmp(d->source, "cpu"))
            NOTE("%u cores/%u PUs cpus %s L3 %.0fMiB numa %d; ", d->cores, d->pus, d->cpuset,
                 (double)d->l3_bytes / (1 << 20), d->numa_node);
        else
            NOTE("%s; ", d->driver);
        if (d->calibrated)
            NOTE("%s", d->from_cache ? "cached" : "measured now");
#undef NOTE
        printf("%-9s %-6s %-5s %-6s %-9s %4u %-30.30s %-16s %-16s %-14s %-12s %s\n", d->name,
               d->source, ds_device_kind_name(d->kind), d->class_name, mem, d->compute_units,
               d->model, bw, fl, link, lat, notes);
    }
    for (size_t i = 0; i < ds_device_list_count(l); i++) {
        const ds_device_info *d = ds_device_list_get(l, i);
        if (strcmp(d->source, "cpu") || d->mem_bw.value <= 0 || d->stream_copy.value <= 0)
            continue;
        double ratio = d->mem_bw.value / d->stream_copy.value;
        bool sane = ratio >= 0.25 && ratio <= 4.0;
        printf("%s: matvec weight streaming %.2f GB/s vs STREAM-style copy %.2f GB/s measured "
               "in this process: ratio %.2f — %s (sane range 0.25..4)\n",
               d->name, d->mem_bw.value * 1e-9, d->stream_copy.value * 1e-9, ratio,
               sane ? "sane" : "NOT sane, check the measurement");
    }
}

static int devices_run(int argc, char **argv)
{
    static const struct option opts[] = {
        {"json", no_argument, NULL, 'j'},
        {"calibrate", no_argument, NULL, 'c'},
        {"no-measure", no_argument, NULL, 'n'},
        {"state-dir", required_argument, NULL, 's'},
        {"config", required_argument, NULL, 'f'},
        {"hwloc-xml", required_argument, NULL, 'x'},
        {"quick", no_argument, NULL, 'q'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    bool json = false, measure = true;
    ds_devices_options dopt = {0};
    ds_calibrate_options copt = {0};
    char sbuf[4096];
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'j':
            json = true;
            break;
        case 'c':
            copt.force = true;
            break;
        case 'n':
            measure = false;
            break;
        case 's':
            copt.state_dir = optarg;
            break;
        case 'f':
            dopt.config_path = optarg;
            break;
        case 'x':
            dopt.hwloc_xml = optarg;
            break;
        case 'q':
            copt.matvec_bytes = 32u << 20;
            copt.repeats = 3;
            break;
        case 'h':
            usage(stdout);
            return DSCTL_EXIT_OK;
        default:
            usage(stderr);
            return DSCTL_EXIT_USAGE;
        }
    }
    if (optind < argc) {
        usage(stderr);
        return DSCTL_EXIT_USAGE;
    }
    /* A recorded topology is not this machine: measuring it would time this CPU under its
     * names. Only an explicit --calibrate does (to exercise the code path). */
    if (dopt.hwloc_xml && !copt.force)
        measure = false;
    if (!copt.state_dir)
        copt.state_dir = default_state_dir(sbuf, sizeof(sbuf));
    ds_error err = {0};
    ds_device_list *l = NULL;
    int r = ds_device_list_discover(&dopt, &l, &err);
    if (r < 0) {
        fprintf(stderr, "dsctl devices: %s\n", ds_error_str(&err));
        return r == -EINVAL ? DSCTL_EXIT_USAGE : DSCTL_EXIT_FAILURE;
    }
    if (measure) {
        r = ds_device_list_calibrate(l, &copt, &err);
        if (r < 0)
            fprintf(stderr, "dsctl devices: calibration: %s\n", ds_error_str(&err));
    }
    int rc = DSCTL_EXIT_OK;
    if (json) {
        char *s = NULL;
        if (ds_device_list_report_json(l, &s, &err) < 0) {
            fprintf(stderr, "dsctl devices: %s\n", ds_error_str(&err));
            rc = DSCTL_EXIT_FAILURE;
        } else {
            printf("%s\n", s);
            free(s);
        }
    } else {
        print_table(l);
    }
    ds_device_list_free(l);
    return rc;
}

DSCTL_COMMAND(devices, "this node's compute devices, discovered and measured", devices_run);
