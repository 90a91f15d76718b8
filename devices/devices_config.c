/* devices_config.c — the operator's device configuration: key = value lines.
 *
 *   node.name = edge-3            node.class = server|gpu|edge
 *   exclude = opencl0, cuda       (device names or whole sources)
 *   opencl.cpu_device = true      (use PoCL-style CPU devices; they share the CPU's silicon)
 *   source.<name> = true|false    (enable/disable a discovery source)
 *   device.<name>.exclude = true  device.<name>.memory_cap = 8GiB
 *   device.<name>.class = edge    device.<name>.labels = fast,numa0
 *
 * Invariant: everything is validated here with limits (line length, entry count, name
 * characters); applying a parsed config cannot fail. Settings for devices this node does not
 * have are ignored with a notice, so one file can serve a cluster. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "devices_impl.h"
#include "ds_log.h"

#define CONFIG_MAX_BYTES   (1u << 20)
#define CONFIG_LINE_MAX    1024
#define CONFIG_ENTRIES_MAX DS_DEVICES_MAX

struct dev_setting {
    char name[DS_DEVICE_NAME_MAX];
    bool exclude;
    uint64_t memory_cap; /* bytes, 0 = none */
    char class_name[DS_DEVICE_CLASS_MAX];
    char labels[DS_DEVICE_TEXT_MAX];
    bool has_labels;
};

struct ds_devices_config {
    char node_name[64];
    char node_class[DS_DEVICE_CLASS_MAX];
    bool opencl_cpu; /* default true: reported, measured, placed only as an alternative */
    int source_cpu, source_opencl, source_cuda; /* -1 default, 0 off, 1 on */
    char exclude[CONFIG_ENTRIES_MAX][DS_DEVICE_NAME_MAX];
    size_t n_exclude;
    struct dev_setting dev[CONFIG_ENTRIES_MAX];
    size_t n_dev;
};

ds_devices_config *ds_devices_config_free(ds_devices_config *c)
{
    free(c);
    return NULL;
}

static bool valid_name(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n >= DS_DEVICE_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && s[i] != '-' && s[i] != '_' && s[i] != '.')
            return false;
    return true;
}

static bool valid_class(const char *s)
{
    return !strcmp(s, "server") || !strcmp(s, "gpu") || !strcmp(s, "edge");
}

static int parse_bool(const char *s, bool *out)
{
    if (!strcmp(s, "true") || !strcmp(s, "yes") || !strcmp(s, "on") || !strcmp(s, "1"))
        *out = true;
    else if (!strcmp(s, "false") || !strcmp(s, "no") || !strcmp(s, "off") || !strcmp(s, "0"))
        *out = false;
    else
        return -EINVAL;
    return 0;
}

int ds_devices_parse_bytes(const char *s, uint64_t *ret)
{
    if (!s || !*s)
        return -EINVAL;
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno || !(v >= 0) || v > 1e18)
        return -ERANGE;
    while (*end == ' ')
        end++;
    double mul = 1;
    if (*end) {
        char u = (char)toupper((unsigned char)*end);
        const char *rest = end + 1;
        bool dec = false;
        if (!strcmp(rest, "") || !strcmp(rest, "iB") || !strcmp(rest, "i"))
            dec = false;
        else if (!strcmp(rest, "B"))
            dec = true;
        else if (u == 'B' && !*rest)
            dec = false;
        else
            return -EINVAL;
        double base = dec ? 1000.0 : 1024.0;
        switch (u) {
        case 'B':
            mul = 1;
            break;
        case 'K':
            mul = base;
            break;
        case 'M':
            mul = base * base;
            break;
        case 'G':
            mul = base * base * base;
            break;
        case 'T':
            mul = base * base * base * base;
            break;
        default:
            return -EINVAL;
        }
    }
    double b = v * mul;
    if (b > 1.8e19)
        return -ERANGE;
    *ret = (uint64_t)b;
    return 0;
}

static struct dev_setting *dev_setting(ds_devices_config *c, const char *name)
{
    for (size_t i = 0; i < c->n_dev; i++)
        if (!strcmp(c->dev[i].name, name))
            return &c->dev[i];
    if (c->n_dev == CONFIG_ENTRIES_MAX)
        return NULL;
    struct dev_setting *d = &c->dev[c->n_dev++];
    memset(d, 0, sizeof(*d));
    snprintf(d->name, sizeof(d->name), "%s", name);
    return d;
}

static char *trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1]))
        s[--n] = 0;
    return s;
}

static int parse_line(ds_devices_config *c, char *key, char *val, const char *origin,
                      unsigned lineno, ds_error *err)
{
    bool b;
    char full[CONFIG_LINE_MAX]; /* the key as written, for messages (parsing cuts it up) */
    snprintf(full, sizeof(full), "%s", key);
    if (!strcmp(key, "node.name")) {
        if (!valid_name(val) || strlen(val) >= sizeof(c->node_name))
            goto bad_value;
        snprintf(c->node_name, sizeof(c->node_name), "%s", val);
        return 0;
    }
    if (!strcmp(key, "node.class")) {
        if (!valid_class(val))
            goto bad_value;
        snprintf(c->node_class, sizeof(c->node_class), "%s", val);
        return 0;
    }
    if (!strcmp(key, "opencl.cpu_device")) {
        if (parse_bool(val, &b))
            goto bad_value;
        c->opencl_cpu = b;
        return 0;
    }
    if (!strncmp(key, "source.", 7)) {
        const char *src = key + 7;
        int *slot = !strcmp(src, "cpu")      ? &c->source_cpu
                    : !strcmp(src, "opencl") ? &c->source_opencl
                    : !strcmp(src, "cuda")   ? &c->source_cuda
                                             : NULL;
        if (!slot)
            return ds_error_set(err, -EINVAL, "%s:%u: unknown source '%s' (cpu, opencl, cuda)",
                                origin, lineno, src);
        if (parse_bool(val, &b))
            goto bad_value;
        *slot = b;
        return 0;
    }
    if (!strcmp(key, "exclude")) {
        char *save = NULL;
        for (char *tok = strtok_r(val, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            tok = trim(tok);
            if (!valid_name(tok))
                return ds_error_set(err, -EINVAL, "%s:%u: exclude: bad device name '%.40s'", origin,
                                    lineno, tok);
            if (c->n_exclude == CONFIG_ENTRIES_MAX)
                return ds_error_set(err, -ERANGE, "%s:%u: exclude: more than %u names", origin,
                                    lineno, CONFIG_ENTRIES_MAX);
            snprintf(c->exclude[c->n_exclude++], DS_DEVICE_NAME_MAX, "%s", tok);
        }
        return 0;
    }
    if (!strncmp(key, "device.", 7)) {
        char *name = key + 7;
        char *dot = strrchr(name, '.');
        if (!dot || dot == name)
            return ds_error_set(err, -EINVAL, "%s:%u: expected device.<name>.<setting>", origin,
                                lineno);
        *dot = 0;
        const char *what = dot + 1;
        if (!valid_name(name))
            return ds_error_set(err, -EINVAL, "%s:%u: bad device name '%.40s'", origin, lineno,
                                name);
        struct dev_setting *d = dev_setting(c, name);
        if (!d)
            return ds_error_set(err, -ERANGE, "%s:%u: more than %u devices configured", origin,
                                lineno, CONFIG_ENTRIES_MAX);
        if (!strcmp(what, "exclude")) {
            if (parse_bool(val, &b))
                goto bad_value;
            d->exclude = b;
        } else if (!strcmp(what, "memory_cap")) {
            if (ds_devices_parse_bytes(val, &d->memory_cap) || d->memory_cap == 0)
                goto bad_value;
        } else if (!strcmp(what, "class")) {
            if (!valid_class(val))
                goto bad_value;
            snprintf(d->class_name, sizeof(d->class_name), "%s", val);
        } else if (!strcmp(what, "labels")) {
            if (strlen(val) >= sizeof(d->labels))
                goto bad_value;
            for (const char *p = val; *p; p++)
                if (!isalnum((unsigned char)*p) && !strchr(",-_.=:", *p))
                    goto bad_value;
            snprintf(d->labels, sizeof(d->labels), "%s", val);
            d->has_labels = true;
        } else {
            return ds_error_set(err, -EINVAL,
                                "%s:%u: unknown device setting '%.40s' (exclude, memory_cap, "
                                "class, labels)",
                                origin, lineno, what);
        }
        return 0;
    }
    return ds_error_set(err, -EINVAL, "%s:%u: unknown key '%.60s'", origin, lineno, key);
bad_value:
    return ds_error_set(err, -EINVAL, "%s:%u: %.80s: bad value '%.60s'", origin, lineno, full, val);
}

int ds_devices_config_parse(const char *text, size_t len, const char *origin,
                            ds_devices_config **ret, ds_error *err)
{
    if (!origin)
        origin = "<config>";
    if (len > CONFIG_MAX_BYTES)
        return ds_error_set(err, -ERANGE, "%s: larger than %u bytes", origin, CONFIG_MAX_BYTES);
    ds_devices_config *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->opencl_cpu = true;
    c->source_cpu = c->source_opencl = c->source_cuda = -1;
    unsigned lineno = 0;
    size_t pos = 0;
    int r = 0;
    while (pos < len) {
        char line[CONFIG_LINE_MAX];
        size_t e = pos;
        while (e < len && text[e] != '\n')
            e++;
        lineno++;
        size_t n = e - pos;
        if (n >= sizeof(line)) {
            r = ds_error_set(err, -ERANGE, "%s:%u: line longer than %u bytes", origin, lineno,
                             CONFIG_LINE_MAX - 1);
            goto fail;
        }
        memcpy(line, text + pos, n);
        line[n] = 0;
        pos = e + 1;
        if (memchr(line, 0, n)) {
            r = ds_error_set(err, -EINVAL, "%s:%u: NUL byte", origin, lineno);
            goto fail;
        }
        char *hash = strchr(line, '#');
        if (hash)
            *hash = 0;
        char *s = trim(line);
        if (!*s)
            continue;
        char *eq = strchr(s, '=');
        if (!eq) {
            r = ds_error_set(err, -EINVAL, "%s:%u: expected key = value", origin, lineno);
            goto fail;
        }
        *eq = 0;
        char *key = trim(s), *val = trim(eq + 1);
        if (!*key || !*val) {
            r = ds_error_set(err, -EINVAL, "%s:%u: empty key or value", origin, lineno);
            goto fail;
        }
        r = parse_line(c, key, val, origin, lineno, err);
        if (r < 0)
            goto fail;
    }
    *ret = c;
    return 0;
fail:
    free(c);
    return r;
}

int ds_devices_config_check(const char *text, size_t len, ds_error *err)
{
    ds_devices_config *c = NULL;
    int r = ds_devices_config_parse(text, len, "<config>", &c, err);
    ds_devices_config_free(c);
    return r;
}

bool ds_devices_config_use_opencl_cpu(const ds_devices_config *c)
{
    return !c || c->opencl_cpu;
}

bool ds_devices_config_source_enabled(const ds_devices_config *c, const char *source, bool dflt)
{
    if (!c)
        return dflt;
    int v = !strcmp(source, "cpu")      ? c->source_cpu
            : !strcmp(source, "opencl") ? c->source_opencl
            : !strcmp(source, "cuda")   ? c->source_cuda
                                        : -1;
    return v < 0 ? dflt : v == 1;
}

void ds_devices_config_apply(const ds_devices_config *c, ds_device_list *l)
{
    if (!c)
        return;
    if (c->node_name[0])
        snprintf(l->node_name, sizeof(l->node_name), "%s", c->node_name);
    if (c->node_class[0])
        snprintf(l->node_class, sizeof(l->node_class), "%s", c->node_class);
    for (size_t i = 0; i < l->n; i++) {
        ds_device_info *d = &l->dev[i];
        for (size_t k = 0; k < c->n_exclude; k++)
            if (!strcmp(c->exclude[k], d->name) || !strcmp(c->exclude[k], d->source))
                d->excluded = true;
        if (!c->opencl_cpu && !strcmp(d->source, "opencl") && d->shares_silicon_with[0])
            d->excluded = true;
    }
    for (size_t k = 0; k < c->n_dev; k++) {
        const struct dev_setting *s = &c->dev[k];
        ds_device_info *d = NULL;
        for (size_t i = 0; i < l->n; i++)
            if (!strcmp(l->dev[i].name, s->name))
                d = &l->dev[i];
        if (!d) {
            ds_log_notice("devices: configuration names device '%s', which this node lacks",
                          s->name);
            continue;
        }
        if (s->exclude)
            d->excluded = true;
        if (s->memory_cap && s->memory_cap < d->memory_bytes)
            d->memory_bytes = s->memory_cap;
        if (s->class_name[0])
            snprintf(d->class_name, sizeof(d->class_name), "%s", s->class_name);
        if (s->has_labels)
            snprintf(d->labels, sizeof(d->labels), "%s", s->labels);
    }
}
