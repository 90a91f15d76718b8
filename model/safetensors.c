/* safetensors.c — read-only mmap of safetensors files with a fully validated header.
 *
 * Format: u64 LE header length N, N bytes of JSON {name: {dtype, shape, data_offsets}, ...,
 * "__metadata__": {str: str}}, then the data area; offsets are [begin, end) relative to it.
 * Nothing of a tensor is exposed before all of: N inside the file and below a limit, a JSON
 * object, a known dtype, at most DS_ST_MAX_DIMS dims, shape product * dtype size equal to
 * end - begin without overflow, end inside the data area, no two tensors overlapping, no name
 * duplicated across shards. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ds_file.h"
#include "ds_tensor.h"

#define ST_MAX_HEADER (256u << 20) /* 256 MiB of JSON is far above any real checkpoint */
#define ST_MAX_FILES  4096
#define ST_MAX_PATH   4096

typedef struct st_file {
    char *path;
    void *map; /* whole file mapping (NULL for a caller buffer) */
    size_t size;
} st_file;

struct ds_st {
    st_file *files;
    size_t n_files;
    ds_st_tensor *tensors;
    size_t n_tensors, cap_tensors;
};

static const struct {
    const char *name;
    enum ds_st_dtype dt;
    size_t size;
} st_dtypes[] = {
    {"F32", DS_ST_F32, 4},         {"F16", DS_ST_F16, 2}, {"BF16", DS_ST_BF16, 2},
    {"F8_E4M3", DS_ST_F8_E4M3, 1}, {"I32", DS_ST_I32, 4}, {"I64", DS_ST_I64, 8},
    {"U8", DS_ST_U8, 1},           {"I8", DS_ST_I8, 1},
};

size_t ds_st_dtype_size(enum ds_st_dtype dt)
{
    for (size_t i = 0; i < sizeof(st_dtypes) / sizeof(st_dtypes[0]); i++)
        if (st_dtypes[i].dt == dt)
            return st_dtypes[i].size;
    return 0;
}

const char *ds_st_dtype_name(enum ds_st_dtype dt)
{
    for (size_t i = 0; i < sizeof(st_dtypes) / sizeof(st_dtypes[0]); i++)
        if (st_dtypes[i].dt == dt)
            return st_dtypes[i].name;
    return "?";
}

ds_st *ds_st_free(ds_st *st)
{
    if (!st)
        return NULL;
    for (size_t i = 0; i < st->n_files; i++) {
        if (st->files[i].map)
            munmap(st->files[i].map, st->files[i].size);
        free(st->files[i].path);
    }
    for (size_t i = 0; i < st->n_tensors; i++)
        free((char *)st->tensors[i].name);
    free(st->files);
    free(st->tensors);
    free(st);
    return NULL;
}

size_t ds_st_count(const ds_st *st)
{
    return st->n_tensors;
}

const ds_st_tensor *ds_st_at(const ds_st *st, size_t i)
{
    return i < st->n_tensors ? &st->tensors[i] : NULL;
}

static int st_cmp_name(const void *a, const void *b)
{
    return strcmp(((const ds_st_tensor *)a)->name, ((const ds_st_tensor *)b)->name);
}

const ds_st_tensor *ds_st_find(const ds_st *st, const char *name)
{
    ds_st_tensor key = {.name = name};
    return bsearch(&key, st->tensors, st->n_tensors, sizeof(key), st_cmp_name);
}

typedef struct st_span {
    uint64_t begin, end;
    const char *name;
} st_span;

static int st_cmp_span(const void *a, const void *b)
{
    const st_span *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : 0;
}

/* Parses one file image into st (tensors appended). path names the file in errors. */
static int st_parse(ds_st *st, const uint8_t *buf, size_t len, const char *path, ds_error *err)
{
    if (len < 8)
        return ds_error_set(err, -EBADMSG, "%s: truncated (%zu bytes, no header length)", path,
                            len);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | buf[i];
    if (hlen > ST_MAX_HEADER)
        return ds_error_set(err, -EBADMSG, "%s: header length %llu exceeds the %u limit", path,
                            (unsigned long long)hlen, ST_MAX_HEADER);
    if (hlen > len - 8)
        return ds_error_set(err, -EBADMSG,
                            "%s: header length %llu runs past the end of the "
                            "file (%zu bytes)",
                            path, (unsigned long long)hlen, len);
    const uint8_t *data = buf + 8 + hlen;
    uint64_t data_len = len - 8 - hlen;
    json_error_t jerr;
    json_t *root = json_loadb((const char *)buf + 8, hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return ds_error_set(err, -EBADMSG, "%s: header is not valid JSON (%s at column %d)", path,
                            jerr.text, jerr.column);
    int rc = 0;
    st_span *spans = NULL;
    size_t n_spans = 0;
    if (!json_is_object(root)) {
        rc = ds_error_set(err, -EBADMSG, "%s: header is not a JSON object", path);
        goto out;
    }
    spans = calloc(json_object_size(root) + 1, sizeof(*spans));
    if (!spans) {
        rc = -ENOMEM;
        goto out;
    }
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val)
    {
        if (!strcmp(key, "__metadata__")) {
            if (!json_is_object(val)) {
                rc = ds_error_set(err, -EBADMSG, "%s: __metadata__ is not an object", path);
                goto out;
            }
            continue;
        }
        if (!json_is_object(val)) {
            rc = ds_error_set(err, -EBADMSG, "%s: tensor '%s': entry is not an object", path, key);
            goto out;
        }
        const char *dts = json_string_value(json_object_get(val, "dtype"));
        json_t *shape = json_object_get(val, "shape");
        json_t *offs = json_object_get(val, "data_offsets");
        if (!dts || !json_is_array(shape) || !json_is_array(offs) || json_array_size(offs) != 2) {
            rc = ds_error_set(err, -EBADMSG,
                              "%s: tensor '%s': needs dtype, shape and "
                              "data_offsets [begin, end]",
                              path, key);
            goto out;
        }
        ds_st_tensor t;
        memset(&t, 0, sizeof(t));
        size_t esz = 0;
        for (size_t i = 0; i < sizeof(st_dtypes) / sizeof(st_dtypes[0]); i++)
            if (!strcmp(dts, st_dtypes[i].name)) {
                t.dtype = st_dtypes[i].dt;
                esz = st_dtypes[i].size;
            }
        if (!esz) {
            rc = ds_error_set(err, -EBADMSG, "%s: tensor '%s': unsupported dtype '%s'", path, key,
                              dts);
            goto out;
        }
        if (json_array_size(shape) > DS_ST_MAX_DIMS) {
            rc = ds_error_set(err, -EBADMSG, "%s: tensor '%s': %zu dims (max %d)", path, key,
                              json_array_size(shape), DS_ST_MAX_DIMS);
            goto out;
        }
        t.ndim = (uint32_t)json_array_size(shape);
        unsigned __int128 bytes = esz;
        for (uint32_t d = 0; d < t.ndim; d++) {
            json_t *dim = json_array_get(shape, d);
            if (!json_is_integer(dim) || json_integer_value(dim) < 0) {
                rc = ds_error_set(err, -EBADMSG,
                                  "%s: tensor '%s': shape[%u] is not a "
                                  "non-negative integer",
                                  path, key, d);
                goto out;
            }
            t.shape[d] = (uint64_t)json_integer_value(dim);
            bytes *= t.shape[d];
            if (bytes > (unsigned __int128)UINT64_MAX / 2) {
                rc = ds_error_set(err, -EBADMSG, "%s: tensor '%s': shape too large", path, key);
                goto out;
            }
        }
        json_t *b = json_array_get(offs, 0), *e = json_array_get(offs, 1);
        if (!json_is_integer(b) || !json_is_integer(e) || json_integer_value(b) < 0 ||
            json_integer_value(e) < json_integer_value(b)) {
            rc = ds_error_set(err, -EBADMSG, "%s: tensor '%s': bad data_offsets", path, key);
            goto out;
        }
        uint64_t ob = (uint64_t)json_integer_value(b), oe = (uint64_t)json_integer_value(e);
        if (oe > data_len) {
            rc = ds_error_set(err, -EBADMSG,
                              "%s: tensor '%s': data_offsets [%llu, %llu) run "
                              "past the data area (%llu bytes; file truncated?)",
                              path, key, (unsigned long long)ob, (unsigned long long)oe,
                              (unsigned long long)data_len);
            goto out;
        }
        if ((uint64_t)bytes != oe - ob) {
            rc = ds_error_set(err, -EBADMSG,
                              "%s: tensor '%s': shape and dtype %s need %llu "
                              "bytes but data_offsets span %llu",
                              path, key, dts, (unsigned long long)bytes,
                              (unsigned long long)(oe - ob));
            goto out;
        }
        if (st->n_tensors == st->cap_tensors) {
            size_t cap = st->cap_tensors ? st->cap_tensors * 2 : 64;
            ds_st_tensor *nt = realloc(st->tensors, cap * sizeof(*nt));
            if (!nt) {
                rc = -ENOMEM;
                goto out;
            }
            st->tensors = nt;
            st->cap_tensors = cap;
        }
        t.name = strdup(key);
        if (!t.name) {
            rc = -ENOMEM;
            goto out;
        }
        t.file = path;
        t.data = data + ob;
        t.nbytes = oe - ob;
        st->tensors[st->n_tensors++] = t;
        spans[n_spans++] = (st_span){ob, oe, t.name};
    }
    qsort(spans, n_spans, sizeof(*spans), st_cmp_span);
    /* Sorted by begin, a tensor overlaps an earlier one iff it starts before the furthest end
     * seen so far (empty tensors occupy nothing). */
    uint64_t max_end = 0;
    const char *max_name = NULL;
    for (size_t i = 0; i < n_spans; i++) {
        if (spans[i].end == spans[i].begin)
            continue;
        if (max_name && spans[i].begin < max_end) {
            rc = ds_error_set(err, -EBADMSG, "%s: tensors '%s' and '%s' overlap", path, max_name,
                              spans[i].name);
            goto out;
        }
        if (spans[i].end > max_end) {
            max_end = spans[i].end;
            max_name = spans[i].name;
        }
    }
out:
    free(spans);
    json_decref(root);
    return rc;
}

static int st_finish(ds_st *st, ds_error *err)
{
    qsort(st->tensors, st->n_tensors, sizeof(*st->tensors), st_cmp_name);
    for (size_t i = 1; i < st->n_tensors; i++)
        if (!strcmp(st->tensors[i].name, st->tensors[i - 1].name))
            return ds_error_set(err, -EBADMSG, "%s: tensor '%s' appears twice (also in %s)",
                                st->tensors[i].file, st->tensors[i].name, st->tensors[i - 1].file);
    return 0;
}

static int st_add_file(ds_st *st, const char *path, ds_error *err)
{
    if (st->n_files >= ST_MAX_FILES)
        return ds_error_set(err, -ERANGE, "%s: more than %d shards", path, ST_MAX_FILES);
    st_file *nf = realloc(st->files, (st->n_files + 1) * sizeof(*nf));
    if (!nf)
        return -ENOMEM;
    st->files = nf;
    st_file *f = &st->files[st->n_files];
    memset(f, 0, sizeof(*f));
    f->path = strdup(path);
    if (!f->path)
        return -ENOMEM;
    st->n_files++;
    void *map = NULL;
    int rc = ds_file_map(path, &map, &f->size, err);
    if (rc < 0)
        return rc;
    f->map = map;
    return st_parse(st, map, f->size, f->path, err);
}

int ds_st_open_file(const char *path, ds_st **ret, ds_error *err)
{
    ds_st *st = calloc(1, sizeof(*st));
    if (!st)
        return -ENOMEM;
    int rc = st_add_file(st, path, err);
    if (rc == 0)
        rc = st_finish(st, err);
    if (rc < 0) {
        ds_st_free(st);
        return rc;
    }
    *ret = st;
    return 0;
}

int ds_st_open_buffer(const void *buf, size_t len, const char *name, ds_st **ret, ds_error *err)
{
    ds_st *st = calloc(1, sizeof(*st));
    if (!st)
        return -ENOMEM;
    st->files = calloc(1, sizeof(*st->files));
    int rc = -ENOMEM;
    if (st->files && (st->files[0].path = strdup(name ? name : "<buffer>"))) {
        st->n_files = 1;
        rc = st_parse(st, buf, len, st->files[0].path, err);
        if (rc == 0)
            rc = st_finish(st, err);
    }
    if (rc < 0) {
        ds_st_free(st);
        return rc;
    }
    *ret = st;
    return 0;
}

static int st_cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int ds_st_open_dir(const char *dir, ds_st **ret, ds_error *err)
{
    char path[ST_MAX_PATH];
    if (snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir) >= (int)sizeof(path))
        return ds_error_set(err, -ENAMETOOLONG, "%s: path too long", dir);
    if (access(path, F_OK) != 0) {
        snprintf(path, sizeof(path), "%s/model.safetensors", dir);
        return ds_st_open_file(path, ret, err);
    }
    json_error_t jerr;
    json_t *idx = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!idx)
        return ds_error_set(err, -EBADMSG, "%s: bad JSON at line %d: %s", path, jerr.line,
                            jerr.text);
    int rc = 0;
    ds_st *st = NULL;
    char **names = NULL;
    json_t *wm = json_object_get(idx, "weight_map");
    if (!json_is_object(wm) || json_object_size(wm) == 0) {
        rc = ds_error_set(err, -EBADMSG, "%s: no weight_map object", path);
        goto out;
    }
    /* Distinct shard file names; each must be a plain name inside dir. */
    size_t n = 0;
    names = calloc(json_object_size(wm), sizeof(*names));
    if (!names) {
        rc = -ENOMEM;
        goto out;
    }
    const char *key;
    json_t *v;
    json_object_foreach(wm, key, v)
    {
        const char *fn = json_string_value(v);
        if (!fn || !*fn || strchr(fn, '/') || !strcmp(fn, "..") || !strcmp(fn, ".")) {
            rc = ds_error_set(err, -EBADMSG,
                              "%s: weight_map['%s'] is not a file name in the "
                              "checkpoint directory",
                              path, key);
            goto out;
        }
        names[n++] = (char *)fn;
    }
    qsort(names, n, sizeof(*names), st_cmp_str);
    st = calloc(1, sizeof(*st));
    if (!st) {
        rc = -ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        if (i && !strcmp(names[i], names[i - 1]))
            continue;
        char shard[ST_MAX_PATH];
        if (snprintf(shard, sizeof(shard), "%s/%s", dir, names[i]) >= (int)sizeof(shard)) {
            rc = ds_error_set(err, -ENAMETOOLONG, "%s: shard path too long", dir);
            goto out;
        }
        if ((rc = st_add_file(st, shard, err)) < 0)
            goto out;
    }
    if ((rc = st_finish(st, err)) < 0)
        goto out;
    /* Every tensor the index names must be in the shard it names. */
    json_object_foreach(wm, key, v)
    {
        const ds_st_tensor *t = ds_st_find(st, key);
        const char *fn = json_string_value(v);
        size_t fl = strlen(fn), pl = t ? strlen(t->file) : 0;
        if (!t || pl < fl + 1 || strcmp(t->file + pl - fl, fn) || t->file[pl - fl - 1] != '/') {
            rc = ds_error_set(err, -EBADMSG, "%s: tensor '%s' is not in %s as the index says", path,
                              key, fn);
            goto out;
        }
    }
    *ret = st;
    st = NULL;
out:
    ds_st_free(st);
    free(names);
    json_decref(idx);
    return rc;
}
