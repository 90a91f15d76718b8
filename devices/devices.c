/* devices.c — the device list: the discovery registry, configuration, fingerprint, and the
 * cluster-spec JSON a node reports (docs/cluster-spec.md).
 *
 * Invariant: names are unique within the list and never change after discovery; only the
 * configuration (exclude, cap, class, labels) and calibration (measures) edit a device. */
#include <ctype.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "devices_impl.h"
#include "ds_cleanup.h"
#include "ds_hash.h"
#include "ds_log.h"

/* One registry; sorted by priority at discovery. Adding a source: its file + one line here. */
static const ds_discovery_source *const sources[] = {
    &ds_discovery_cpu,
    &ds_discovery_opencl,
    &ds_discovery_cuda,
};

double ds_devices_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

const char *ds_device_kind_name(ds_device_kind k)
{
    switch (k) {
    case DS_DEVICE_KIND_CPU:
        return "cpu";
    case DS_DEVICE_KIND_GPU:
        return "gpu";
    case DS_DEVICE_KIND_ACCEL:
        return "accel";
    }
    return "?";
}

void ds_devices_copy_text(char *dst, size_t cap, const char *src)
{
    if (!cap)
        return;
    if (!src)
        src = "";
    while (*src == ' ')
        src++;
    size_t n = strnlen(src, cap - 1);
    memcpy(dst, src, n);
    dst[n] = 0;
    for (size_t i = 0; i < n; i++) /* drivers' strings end up in JSON and tables */
        if (!isprint((unsigned char)dst[i]))
            dst[i] = '?';
    while (n && dst[n - 1] == ' ')
        dst[--n] = 0;
}

int ds_devices_append(ds_device_list *l, const char *prefix, ds_device_info **ret, ds_error *err)
{
    if (l->n == DS_DEVICES_MAX)
        return ds_error_set(err, -ENOSPC, "devices: more than %d devices", DS_DEVICES_MAX);
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8;
        ds_device_info *d = realloc(l->dev, cap * sizeof(*d));
        if (!d)
            return -ENOMEM;
        l->dev = d;
        l->cap = cap;
    }
    unsigned idx = 0;
    for (size_t i = 0; i < l->n; i++)
        if (!strncmp(l->dev[i].name, prefix, strlen(prefix)) &&
            isdigit((unsigned char)l->dev[i].name[strlen(prefix)]))
            idx++;
    ds_device_info *d = &l->dev[l->n++];
    memset(d, 0, sizeof(*d));
    snprintf(d->name, sizeof(d->name), "%s%u", prefix, idx);
    d->numa_node = -1;
    *ret = d;
    return 0;
}

ds_device_list *ds_device_list_free(ds_device_list *l)
{
    if (l) {
        free(l->dev);
        free(l);
    }
    return NULL;
}

size_t ds_device_list_count(const ds_device_list *l)
{
    return l ? l->n : 0;
}

const ds_device_info *ds_device_list_get(const ds_device_list *l, size_t i)
{
    return l && i < l->n ? &l->dev[i] : NULL;
}

const ds_device_info *ds_device_list_find(const ds_device_list *l, const char *name)
{
    for (size_t i = 0; l && name && i < l->n; i++)
        if (!strcmp(l->dev[i].name, name))
            return &l->dev[i];
    return NULL;
}

const char *ds_device_list_node_name(const ds_device_list *l)
{
    return l->node_name;
}

const char *ds_device_list_node_class(const ds_device_list *l)
{
    return l->node_class;
}

const char *ds_device_list_fingerprint(const ds_device_list *l)
{
    return l->fingerprint;
}

/* What the hardware is, not what it is doing: free memory, config caps and labels stay out so
 * the cache survives reboots and edits of the operator config; exclusion stays out too. */
static void compute_fingerprint(ds_device_list *l)
{
    uint64_t h = DS_HASH_FNV1A_INIT;
    for (size_t i = 0; i < l->n; i++) {
        const ds_device_info *d = &l->dev[i];
        h = ds_hash_fnv1a(h, d->name, strlen(d->name) + 1);
        h = ds_hash_fnv1a(h, d->model, strlen(d->model) + 1);
        h = ds_hash_fnv1a(h, d->vendor, strlen(d->vendor) + 1);
        h = ds_hash_fnv1a(h, d->driver, strlen(d->driver) + 1);
        h = ds_hash_fnv1a(h, d->cpuset, strlen(d->cpuset) + 1);
        h = ds_hash_fnv1a(h, &d->memory_found_bytes, sizeof(d->memory_found_bytes));
        h = ds_hash_fnv1a(h, &d->cores, sizeof(d->cores));
        h = ds_hash_fnv1a(h, &d->pus, sizeof(d->pus));
        h = ds_hash_fnv1a(h, &d->compute_units, sizeof(d->compute_units));
    }
    snprintf(l->fingerprint, sizeof(l->fingerprint), "%016llx", (unsigned long long)h);
}

static int read_file(const char *path, char **text, size_t *len, ds_error *err)
{
    _cleanup_fclose_ FILE *f = fopen(path, "re");
    if (!f)
        return ds_error_set(err, -errno, "%s: %s", path, strerror(errno));
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    if (!buf)
        return -ENOMEM;
    for (;;) {
        if (n == cap) {
            if (cap >= (1u << 20)) {
                free(buf);
                return ds_error_set(err, -ERANGE, "%s: larger than 1 MiB", path);
            }
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                return -ENOMEM;
            }
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0)
            break;
    }
    *text = buf;
    *len = n;
    return 0;
}

int ds_device_list_discover(const ds_devices_options *opt, ds_device_list **ret, ds_error *err)
{
    static const ds_devices_options none;
    if (!opt)
        opt = &none;
    ds_devices_config *cfg = NULL;
    int r;
    if (opt->config_path) {
        char *text = NULL;
        size_t len = 0;
        r = read_file(opt->config_path, &text, &len, err);
        if (r < 0)
            return r;
        r = ds_devices_config_parse(text, len, opt->config_path, &cfg, err);
        free(text);
        if (r < 0)
            return r;
    } else if (opt->config_text) {
        r = ds_devices_config_parse(opt->config_text, strlen(opt->config_text), "<config>", &cfg,
                                    err);
        if (r < 0)
            return r;
    }
    ds_device_list *l = calloc(1, sizeof(*l));
    if (!l) {
        ds_devices_config_free(cfg);
        return -ENOMEM;
    }
    if (gethostname(l->node_name, sizeof(l->node_name) - 1) < 0 || !l->node_name[0])
        snprintf(l->node_name, sizeof(l->node_name), "localhost");
    for (char *p = l->node_name; *p; p++)
        if (!isalnum((unsigned char)*p) && *p != '-' && *p != '_' && *p != '.')
            *p = '_';

    /* Registry order by priority (a tiny insertion sort over a handful of sources). */
    const ds_discovery_source *order[sizeof(sources) / sizeof(sources[0])];
    size_t ns = 0;
    for (size_t i = 0; i < sizeof(sources) / sizeof(sources[0]); i++) {
        size_t j = ns++;
        while (j > 0 && order[j - 1]->priority > sources[i]->priority) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = sources[i];
    }
    for (size_t i = 0; i < ns; i++) {
        const ds_discovery_source *s = order[i];
        bool on = ds_devices_config_source_enabled(cfg, s->name, s->enabled_default);
        if ((!strcmp(s->name, "opencl") && opt->no_opencl) ||
            (!strcmp(s->name, "cuda") && opt->no_cuda))
            on = false;
        if (!on)
            continue;
        r = s->discover(l, opt, err);
        if (r < 0) {
            ds_error_prefix(err, "discovery source %s", s->name);
            ds_devices_config_free(cfg);
            ds_device_list_free(l);
            return r;
        }
    }
    for (size_t i = 0; i < l->n; i++) {
        l->dev[i].memory_found_bytes = l->dev[i].memory_bytes;
        if (!l->dev[i].class_name[0])
            snprintf(l->dev[i].class_name, sizeof(l->dev[i].class_name), "%s",
                     l->dev[i].kind == DS_DEVICE_KIND_CPU ? "server" : "gpu");
    }
    compute_fingerprint(l);
    ds_devices_config_apply(cfg, l);
    ds_devices_config_free(cfg);
    if (!l->node_class[0]) {
        bool gpu = false;
        for (size_t i = 0; i < l->n; i++)
            if (!l->dev[i].excluded && l->dev[i].kind == DS_DEVICE_KIND_GPU &&
                !l->dev[i].shares_silicon_with[0])
                gpu = true;
        snprintf(l->node_class, sizeof(l->node_class), "%s", gpu ? "gpu" : "server");
    }
    *ret = l;
    return 0;
}

/* JSON numbers for byte counts: exact up to 2^53, which memory sizes are. */
static int set_num(json_t *o, const char *k, double v)
{
    return json_object_set_new(o, k, json_real(v));
}

static int set_int(json_t *o, const char *k, uint64_t v)
{
    return json_object_set_new(o, k, json_integer((json_int_t)v));
}

static json_t *measure_json(const ds_measure *m)
{
    return json_pack("{s:f, s:f, s:i}", "value", m->value, "spread", m->spread, "repeats",
                     (int)m->repeats);
}

/* The cluster-spec device object (docs/cluster-spec.md). Unmeasured figures are 0 — the
 * placement reader treats 0 bandwidth/flops as "unknown, do not place". */
static json_t *spec_device(const ds_device_info *d)
{
    json_t *o = json_object();
    if (!o)
        return NULL;
    json_object_set_new(o, "name", json_string(d->name));
    json_object_set_new(o, "kind", json_string(ds_device_kind_name(d->kind)));
    json_object_set_new(o, "class", json_string(d->class_name));
    set_int(o, "memory_bytes", d->memory_bytes);
    set_num(o, "mem_bw_bytes_per_s", d->mem_bw.value);
    set_num(o, "flops", d->flops.value);
    if (d->kind != DS_DEVICE_KIND_CPU || d->host_link.value > 0) {
        if (d->host_link.value > 0)
            set_num(o, "host_link_bytes_per_s", d->host_link.value);
        if (d->launch.value > 0)
            set_num(o, "launch_s", d->launch.value);
    }
    if (d->shares_silicon_with[0])
        json_object_set_new(o, "shares_silicon_with", json_string(d->shares_silicon_with));
    if (d->labels[0]) {
        json_t *a = json_array();
        char tmp[DS_DEVICE_TEXT_MAX];
        snprintf(tmp, sizeof(tmp), "%s", d->labels);
        char *save = NULL;
        for (char *t = strtok_r(tmp, ",", &save); t; t = strtok_r(NULL, ",", &save))
            json_array_append_new(a, json_string(t));
        json_object_set_new(o, "labels", a);
    }
    return o;
}

static json_t *spec_node(const ds_device_list *l)
{
    json_t *devs = json_array();
    for (size_t i = 0; i < l->n; i++) {
        if (l->dev[i].excluded)
            continue;
        json_t *o = spec_device(&l->dev[i]);
        /* a device whose silicon partner is excluded shares nothing with the placed ones */
        const char *partner = l->dev[i].shares_silicon_with;
        bool listed = false;
        for (size_t k = 0; partner[0] && k < l->n && !listed; k++)
            listed = !l->dev[k].excluded && !strcmp(l->dev[k].name, partner);
        if (partner[0] && !listed)
            json_object_del(o, "shares_silicon_with");
        json_array_append_new(devs, o);
    }
    return json_pack("{s:s, s:s, s:o}", "name", l->node_name, "class", l->node_class, "devices",
                     devs);
}

static int dump(json_t *j, char **out, ds_error *err)
{
    if (!j)
        return ds_error_set(err, -ENOMEM, "devices: building JSON");
    char *s = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(6));
    json_decref(j);
    if (!s)
        return ds_error_set(err, -ENOMEM, "devices: encoding JSON");
    *out = s;
    return 0;
}

int ds_device_list_spec_json(const ds_device_list *l, char **json, ds_error *err)
{
    return dump(spec_node(l), json, err);
}

static json_t *full_device(const ds_device_info *d)
{
    json_t *o = spec_device(d);
    json_object_set_new(o, "source", json_string(d->source));
    json_object_set_new(o, "model", json_string(d->model));
    json_object_set_new(o, "vendor", json_string(d->vendor));
    json_object_set_new(o, "driver", json_string(d->driver));
    json_object_set_new(o, "backend", json_string(d->backend_spec));
    json_object_set_new(o, "excluded", json_boolean(d->excluded));
    json_object_set_new(o, "numa_node", json_integer(d->numa_node));
    set_int(o, "compute_units", d->compute_units);
    set_int(o, "clock_mhz", d->clock_mhz);
    set_int(o, "memory_found_bytes", d->memory_found_bytes);
    set_int(o, "memory_free_bytes", d->memory_free_bytes);
    if (d->kind == DS_DEVICE_KIND_CPU) {
        set_int(o, "package", d->package);
        set_int(o, "cores", d->cores);
        set_int(o, "pus", d->pus);
        json_object_set_new(o, "cpuset", json_string(d->cpuset));
        set_int(o, "l2_bytes", d->l2_bytes);
        set_int(o, "l3_bytes", d->l3_bytes);
        json_t *isa = json_array();
        static const struct {
            unsigned bit;
            const char *name;
        } f[] = {
            {DS_ISA_FMA, "fma"},         {DS_ISA_AVX2, "avx2"},
            {DS_ISA_AVX512F, "avx512f"}, {DS_ISA_AVX512_BF16, "avx512_bf16"},
            {DS_ISA_AMX, "amx"},         {DS_ISA_NEON, "neon"},
            {DS_ISA_SVE, "sve"},
        };
        for (size_t i = 0; i < sizeof(f) / sizeof(f[0]); i++)
            if (d->isa & f[i].bit)
                json_array_append_new(isa, json_string(f[i].name));
        json_object_set_new(o, "isa", isa);
    } else {
        set_int(o, "max_alloc_bytes", d->max_alloc_bytes);
        set_int(o, "local_mem_bytes", d->local_mem_bytes);
        json_object_set_new(o, "fp16", json_boolean(d->fp16));
        json_object_set_new(o, "fp64", json_boolean(d->fp64));
        json_object_set_new(o, "unified_memory", json_boolean(d->unified_memory));
        if (!strcmp(d->source, "cuda")) {
            json_object_set_new(o, "compute_capability",
                                json_sprintf("%u.%u", d->cc_major, d->cc_minor));
            json_object_set_new(o, "pci_bus", json_string(d->pci_bus));
            set_int(o, "pcie_gen", d->pcie_gen);
            set_int(o, "pcie_width", d->pcie_width);
        }
    }
    json_t *m = json_object();
    json_object_set_new(m, "calibrated", json_boolean(d->calibrated));
    json_object_set_new(m, "from_cache", json_boolean(d->from_cache));
    json_object_set_new(m, "mem_bw_bytes_per_s", measure_json(&d->mem_bw));
    json_object_set_new(m, "flops", measure_json(&d->flops));
    if (d->kind == DS_DEVICE_KIND_CPU)
        json_object_set_new(m, "stream_copy_bytes_per_s", measure_json(&d->stream_copy));
    else {
        json_object_set_new(m, "host_link_bytes_per_s", measure_json(&d->host_link));
        json_object_set_new(m, "launch_s", measure_json(&d->launch));
    }
    json_object_set_new(o, "measured", m);
    return o;
}

int ds_device_list_report_json(const ds_device_list *l, char **json, ds_error *err)
{
    json_t *all = json_array();
    for (size_t i = 0; i < l->n; i++)
        json_array_append_new(all, full_device(&l->dev[i]));
    return dump(json_pack("{s:o, s:s, s:o}", "node", spec_node(l), "fingerprint", l->fingerprint,
                          "discovered", all),
                json, err);
}
