/* cluster.c — parse and validate a cluster spec (docs/cluster-spec.md).
 *
 * Everything in a spec comes from outside (a file, a peer), so every field is type-checked
 * and bounded, and names are checked for uniqueness before anything refers to them. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "ds_placement.h"

typedef struct pl_link {
    int a, b;          /* node indices */
    double latency_s;  /* seconds */
    double bw;         /* bytes/s */
} pl_link;

struct ds_cluster {
    int n_nodes, n_devices, n_links;
    char (*node_names)[DS_PL_MAX_NAME]; /* [n_nodes] */
    ds_pl_device *dev;                  /* [n_devices] */
    pl_link *links;                     /* [n_links] */
    double def_latency_s, def_bw;       /* default_link */
};

/* Figures must be finite and within what any hardware could report. */
#define MAX_FIGURE 1e20

static int get_str(json_t *o, const char *key, bool required, char *dst, size_t cap,
                   const char *where, ds_error *err)
{
    json_t *v = json_object_get(o, key);
    if (!v) {
        if (required)
            return ds_error_set(err, -EBADMSG, "cluster spec: %s: missing '%s'", where, key);
        dst[0] = 0;
        return 0;
    }
    if (!json_is_string(v))
        return ds_error_set(err, -EBADMSG, "cluster spec: %s: '%s' is not a string", where, key);
    size_t n = json_string_length(v);
    if (n == 0 || n >= cap)
        return ds_error_set(err, -ERANGE, "cluster spec: %s: '%s' must be 1..%zu bytes", where,
                            key, cap - 1);
    const char *s = json_string_value(v);
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == '/')
            return ds_error_set(err, -EINVAL, "cluster spec: %s: '%s' has a control character "
                                "or '/'", where, key);
    memcpy(dst, s, n + 1);
    return 0;
}

static int get_num(json_t *o, const char *key, bool required, double lo, double *dst,
                   const char *where, ds_error *err)
{
    json_t *v = json_object_get(o, key);
    if (!v) {
        if (required)
            return ds_error_set(err, -EBADMSG, "cluster spec: %s: missing '%s'", where, key);
        *dst = 0;
        return 0;
    }
    if (!json_is_number(v))
        return ds_error_set(err, -EBADMSG, "cluster spec: %s: '%s' is not a number", where, key);
    double x = json_number_value(v);
    if (!isfinite(x) || x < lo || x > MAX_FIGURE)
        return ds_error_set(err, -ERANGE, "cluster spec: %s: '%s' = %g out of range [%g, %g]",
                            where, key, x, lo, MAX_FIGURE);
    *dst = x;
    return 0;
}

static int find_node(const ds_cluster *c, const char *name)
{
    for (int i = 0; i < c->n_nodes; i++)
        if (!strcmp(c->node_names[i], name))
            return i;
    return -1;
}

static int parse_link(json_t *l, double *lat, double *bw, const char *where, ds_error *err)
{
    int rc = get_num(l, "latency_s", true, 0, lat, where, err);
    if (!rc)
        rc = get_num(l, "bandwidth_bytes_per_s", true, 1, bw, where, err);
    if (!rc && *lat > 3600)
        rc = ds_error_set(err, -ERANGE, "cluster spec: %s: latency_s %g above 3600", where, *lat);
    return rc;
}

static int parse_root(json_t *root, ds_cluster *c, ds_error *err)
{
    if (!json_is_object(root))
        return ds_error_set(err, -EBADMSG, "cluster spec: top level is not an object");
    json_t *nodes = json_object_get(root, "nodes");
    if (!json_is_array(nodes))
        return ds_error_set(err, -EBADMSG, "cluster spec: 'nodes' missing or not an array");
    size_t nn = json_array_size(nodes);
    if (nn == 0)
        return ds_error_set(err, -ENOENT, "cluster spec: no nodes (need at least one device)");
    if (nn > DS_PL_MAX_NODES)
        return ds_error_set(err, -ERANGE, "cluster spec: %zu nodes, limit %d", nn,
                            DS_PL_MAX_NODES);
    size_t nd = 0;
    for (size_t i = 0; i < nn; i++) {
        json_t *n = json_array_get(nodes, i);
        json_t *d = json_is_object(n) ? json_object_get(n, "devices") : NULL;
        if (!json_is_array(d))
            return ds_error_set(err, -EBADMSG, "cluster spec: nodes[%zu]: not an object with a "
                                "'devices' array", i);
        nd += json_array_size(d);
        if (nd > DS_PL_MAX_DEVICES)
            return ds_error_set(err, -ERANGE, "cluster spec: more than %d devices",
                                DS_PL_MAX_DEVICES);
    }
    if (nd == 0)
        return ds_error_set(err, -ENOENT, "cluster spec: no devices in any node");
    c->node_names = calloc(nn, sizeof *c->node_names);
    c->dev = calloc(nd, sizeof *c->dev);
    if (!c->node_names || !c->dev)
        return ds_error_set(err, -ENOMEM, "cluster spec: out of memory");
    char where[160];
    for (size_t i = 0; i < nn; i++) {
        json_t *n = json_array_get(nodes, i);
        snprintf(where, sizeof where, "nodes[%zu]", i);
        int rc = get_str(n, "name", true, c->node_names[i], DS_PL_MAX_NAME, where, err);
        if (rc)
            return rc;
        if (find_node(c, c->node_names[i]) >= 0)
            return ds_error_set(err, -EINVAL, "cluster spec: node name '%s' used twice",
                                c->node_names[i]);
        c->n_nodes++;
        json_t *devs = json_object_get(n, "devices");
        int first = c->n_devices;
        for (size_t j = 0; j < json_array_size(devs); j++) {
            json_t *d = json_array_get(devs, j);
            ds_pl_device *v = &c->dev[c->n_devices];
            snprintf(where, sizeof where, "node '%s' devices[%zu]", c->node_names[i], j);
            if (!json_is_object(d))
                return ds_error_set(err, -EBADMSG, "cluster spec: %s: not an object", where);
            rc = get_str(d, "name", true, v->name, DS_PL_MAX_NAME, where, err);
            if (rc)
                return rc;
            snprintf(where, sizeof where, "device '%s/%s'", c->node_names[i], v->name);
            for (int k = first; k < c->n_devices; k++)
                if (!strcmp(c->dev[k].name, v->name))
                    return ds_error_set(err, -EINVAL, "cluster spec: %s: name used twice", where);
            if ((rc = get_str(d, "kind", true, v->kind, sizeof v->kind, where, err)))
                return rc;
            if (strcmp(v->kind, "cpu") && strcmp(v->kind, "gpu") && strcmp(v->kind, "accel"))
                return ds_error_set(err, -EINVAL, "cluster spec: %s: kind '%s' is not cpu, gpu "
                                    "or accel", where, v->kind);
            double mem, tmp;
            if ((rc = get_num(d, "memory_bytes", true, 0, &mem, where, err)) ||
                (rc = get_num(d, "mem_bw_bytes_per_s", true, 0, &v->mem_bw, where, err)) ||
                (rc = get_num(d, "flops", true, 0, &v->flops, where, err)) ||
                (rc = get_num(d, "host_link_bytes_per_s", false, 0, &v->host_link_bw, where,
                              err)) ||
                (rc = get_num(d, "launch_s", false, 0, &v->launch_s, where, err)))
                return rc;
            if (mem > 1e18)
                return ds_error_set(err, -ERANGE, "cluster spec: %s: memory_bytes %g above 1e18",
                                    where, mem);
            if (v->launch_s > 10)
                return ds_error_set(err, -ERANGE, "cluster spec: %s: launch_s %g above 10 s",
                                    where, v->launch_s);
            (void)tmp;
            v->memory_bytes = (uint64_t)mem;
            /* Unknown figures (0) would make a device look infinitely slow or free; a
             * conservative stand-in keeps it usable but unattractive. */
            if (v->mem_bw <= 0)
                v->mem_bw = 1e9;
            if (v->flops <= 0)
                v->flops = 1e10;
            snprintf(v->node, sizeof v->node, "%s", c->node_names[i]);
            v->node_index = (int)i;
            v->shares_with = -1;
            c->n_devices++;
        }
        /* shares_silicon_with refers to a device of the same node; resolved after the node. */
        for (size_t j = 0; j < json_array_size(devs); j++) {
            json_t *d = json_array_get(devs, j);
            char other[DS_PL_MAX_NAME];
            snprintf(where, sizeof where, "device '%s/%s'", c->node_names[i],
                     c->dev[first + (int)j].name);
            rc = get_str(d, "shares_silicon_with", false, other, sizeof other, where, err);
            if (rc)
                return rc;
            if (!other[0])
                continue;
            int found = -1;
            for (int k = first; k < c->n_devices; k++)
                if (!strcmp(c->dev[k].name, other))
                    found = k;
            if (found < 0 || found == first + (int)j)
                return ds_error_set(err, -EINVAL, "cluster spec: %s: shares_silicon_with '%s' "
                                    "is not another device of node '%s'", where, other,
                                    c->node_names[i]);
            c->dev[first + (int)j].shares_with = found;
        }
        for (int k = first; k < c->n_devices; k++) {
            int o = c->dev[k].shares_with;
            if (o >= 0 && c->dev[o].shares_with >= 0)
                return ds_error_set(err, -EINVAL, "cluster spec: device '%s/%s': shares silicon "
                                    "with '%s', which itself shares with another; name the "
                                    "primary device", c->node_names[i], c->dev[k].name,
                                    c->dev[o].name);
        }
    }
    c->def_latency_s = 1e-4;
    c->def_bw = 1.25e9;
    json_t *dl = json_object_get(root, "default_link");
    if (dl) {
        if (!json_is_object(dl))
            return ds_error_set(err, -EBADMSG, "cluster spec: 'default_link' is not an object");
        int rc = parse_link(dl, &c->def_latency_s, &c->def_bw, "default_link", err);
        if (rc)
            return rc;
    }
    json_t *links = json_object_get(root, "links");
    if (links) {
        if (!json_is_array(links))
            return ds_error_set(err, -EBADMSG, "cluster spec: 'links' is not an array");
        size_t nl = json_array_size(links);
        if (nl > (size_t)DS_PL_MAX_NODES * DS_PL_MAX_NODES)
            return ds_error_set(err, -ERANGE, "cluster spec: too many links (%zu)", nl);
        c->links = calloc(nl ? nl : 1, sizeof *c->links);
        if (!c->links)
            return ds_error_set(err, -ENOMEM, "cluster spec: out of memory");
        for (size_t i = 0; i < nl; i++) {
            json_t *l = json_array_get(links, i);
            char a[DS_PL_MAX_NAME], b[DS_PL_MAX_NAME];
            snprintf(where, sizeof where, "links[%zu]", i);
            if (!json_is_object(l))
                return ds_error_set(err, -EBADMSG, "cluster spec: %s: not an object", where);
            int rc = get_str(l, "a", true, a, sizeof a, where, err);
            if (!rc)
                rc = get_str(l, "b", true, b, sizeof b, where, err);
            if (rc)
                return rc;
            pl_link *k = &c->links[c->n_links];
            k->a = find_node(c, a);
            k->b = find_node(c, b);
            if (k->a < 0 || k->b < 0)
                return ds_error_set(err, -EINVAL, "cluster spec: %s: unknown node '%s'", where,
                                    k->a < 0 ? a : b);
            if (k->a == k->b)
                return ds_error_set(err, -EINVAL, "cluster spec: %s: links node '%s' to itself",
                                    where, a);
            if ((rc = parse_link(l, &k->latency_s, &k->bw, where, err)))
                return rc;
            c->n_links++;
        }
    }
    return 0;
}

int ds_cluster_parse(const char *json_text, size_t len, ds_cluster **out, ds_error *err)
{
    *out = NULL;
    if (!json_text || len > DS_PL_MAX_SPEC_BYTES)
        return ds_error_set(err, -ERANGE, "cluster spec: %zu bytes, limit %u", len,
                            DS_PL_MAX_SPEC_BYTES);
    json_error_t je;
    json_t *root = json_loadb(json_text, len, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return ds_error_set(err, -EBADMSG, "cluster spec: bad JSON at line %d column %d: %s",
                            je.line, je.column, je.text);
    ds_cluster *c = calloc(1, sizeof *c);
    if (!c) {
        json_decref(root);
        return ds_error_set(err, -ENOMEM, "cluster spec: out of memory");
    }
    int rc = parse_root(root, c, err);
    json_decref(root);
    if (rc) {
        ds_cluster_free(c);
        return rc;
    }
    *out = c;
    return 0;
}

int ds_cluster_load(const char *path, ds_cluster **out, ds_error *err)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return ds_error_set(err, -errno, "%s: %s", path, strerror(errno));
    char *buf = malloc(DS_PL_MAX_SPEC_BYTES + 1);
    if (!buf) {
        fclose(f);
        return ds_error_set(err, -ENOMEM, "%s: out of memory", path);
    }
    size_t n = fread(buf, 1, DS_PL_MAX_SPEC_BYTES + 1, f);
    int bad = ferror(f);
    fclose(f);
    int rc;
    if (bad)
        rc = ds_error_set(err, -EIO, "%s: read error", path);
    else if (n > DS_PL_MAX_SPEC_BYTES)
        rc = ds_error_set(err, -ERANGE, "%s: larger than %u bytes", path, DS_PL_MAX_SPEC_BYTES);
    else {
        rc = ds_cluster_parse(buf, n, out, err);
        if (rc)
            ds_error_prefix(err, "%s", path);
    }
    free(buf);
    return rc;
}

ds_cluster *ds_cluster_free(ds_cluster *c)
{
    if (c) {
        free(c->node_names);
        free(c->dev);
        free(c->links);
        free(c);
    }
    return NULL;
}

int ds_cluster_n_devices(const ds_cluster *c) { return c->n_devices; }
int ds_cluster_n_nodes(const ds_cluster *c) { return c->n_nodes; }
const ds_pl_device *ds_cluster_device(const ds_cluster *c, int i)
{
    return i >= 0 && i < c->n_devices ? &c->dev[i] : NULL;
}
const char *ds_cluster_node_name(const ds_cluster *c, int node)
{
    return node >= 0 && node < c->n_nodes ? c->node_names[node] : NULL;
}

void ds_cluster_link(const ds_cluster *c, int a, int b, double *latency_s, double *bw)
{
    if (a == b) {
        *latency_s = 0;
        *bw = INFINITY;
        return;
    }
    for (int i = 0; i < c->n_links; i++) {
        const pl_link *k = &c->links[i];
        if ((k->a == a && k->b == b) || (k->a == b && k->b == a)) {
            *latency_s = k->latency_s;
            *bw = k->bw;
            return;
        }
    }
    *latency_s = c->def_latency_s;
    *bw = c->def_bw;
}
