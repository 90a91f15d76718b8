/* dsctl_cluster.c — `dsctl cluster`: the cluster spec the planner uses — every node's devices
 * and the measured links (latency, bandwidth calibrated over the real sockets). */
#include <stdio.h>

#include <jansson.h>

#include "dsctl.h"

int dsctl_simple_query(int argc, char **argv, const char *what, const char *usage,
                       void (*table)(json_t *));

static void cluster_table(json_t *j)
{
    size_t i, k;
    json_t *n, *d;
    printf("%-16s %-8s %-8s %-8s %s\n", "NODE", "DEVICE", "KIND", "CLASS", "MEMORY");
    json_array_foreach(json_object_get(j, "nodes"), i, n)
        json_array_foreach(json_object_get(n, "devices"), k, d)
            printf("%-16s %-8s %-8s %-8s %.1f GiB\n", json_string_value(json_object_get(n, "name")),
                   json_string_value(json_object_get(d, "name")),
                   json_string_value(json_object_get(d, "kind")),
                   json_string_value(json_object_get(d, "class")),
                   (double)json_integer_value(json_object_get(d, "memory_bytes")) / (1 << 30));
    printf("\n%-16s %-16s %-12s %s\n", "A", "B", "LATENCY", "BANDWIDTH");
    json_array_foreach(json_object_get(j, "links"), i, n)
        printf("%-16s %-16s %8.1f us  %.1f MB/s\n", json_string_value(json_object_get(n, "a")),
               json_string_value(json_object_get(n, "b")),
               json_real_value(json_object_get(n, "latency_s")) * 1e6,
               json_real_value(json_object_get(n, "bandwidth_bytes_per_s")) / 1e6);
}

static int cmd_cluster(int argc, char **argv)
{
    return dsctl_simple_query(argc, argv, "cluster",
                              "usage: dsctl cluster [--endpoint E] [--json]\n"
                              "  the cluster spec: nodes, devices and calibrated links\n",
                              cluster_table);
}

DSCTL_COMMAND(cluster, "cluster spec (devices, calibrated links)", cmd_cluster);
