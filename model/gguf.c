/* gguf.c — read-only mmap of GGUF files with a fully validated header (see ds_gguf.h).
 *
 * Layout (little-endian): "GGUF", u32 version, u64 tensor count, u64 kv count; kv pairs
 * (string key, u32 value type, value; strings are u64 length + bytes; arrays are u32 element
 * type + u64 count + elements); tensor infos (string name, u32 n_dims, u64 ne[n_dims], u32 ggml
 * type, u64 offset); padding to general.alignment; the data section, which tensor offsets are
 * relative to.
 *
 * Invariant: every byte the parser reads is first checked to lie inside the image (the cursor
 * refuses to run past it), every count is checked against both a limit and the bytes left
 * before anything is allocated for it (so memory stays proportional to the file), and a
 * ds_gguf only exists once every file of it passed every check. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "ds_gguf.h"

#include "ds_file.h"

#define GGUF_MAGIC_LE      0x46554747u /* "GGUF" read as a little-endian u32 */
#define GGUF_DEFAULT_ALIGN 32u
#define GGUF_MAX_PATH      4096
/* Smallest encodings, used to bound counts by the bytes left: a kv is a key length (8), at
 * least one key byte and a value type (4) and a 1-byte value; a tensor info is a name length
 * (8), one name byte, n_dims (4), one dim (8), a type (4) and an offset (8). */
#define GGUF_MIN_KV_BYTES     14u
#define GGUF_MIN_TENSOR_BYTES 33u

struct ds_gguf_kv {
    char *key;          /* NUL-terminated copy */
    const char *file;   /* owning file's path */
    uint32_t type;      /* enum ds_gguf_vtype */
    uint32_t elem;      /* arrays: element type; else == type */
    uint64_t n;         /* arrays: element count; else 1 */
    const uint8_t *val; /* numeric scalar or numeric array elements (packed, unaligned) */
    ds_gguf_str *strs;  /* string value (1) or string array elements (n) */
    const uint8_t *raw; /* the value as in the file: type id, then the value (writers copy it) */
    uint64_t raw_len;
};

typedef struct gguf_file {
    char *path;
    void *map;   /* whole-file mapping; NULL for a caller buffer */
    size_t size; /* mapping length */
    uint32_t version, alignment;
    ds_gguf_kv *kvs; /* file order */
    size_t n_kvs;
    ds_gguf_kv **kv_sorted; /* by key, for lookup */
} gguf_file;

struct ds_gguf {
    gguf_file *files;
    size_t n_files;
    ds_gguf_tensor *tensors; /* file order, part by part */
    size_t n_tensors, cap_tensors;
    ds_gguf_tensor **sorted; /* by name, for lookup */
};

/* ---- value types ---- */

static const struct {
    const char *name;
    uint32_t size; /* bytes of a scalar; 0 for string and array */
} vtypes[] = {
    [DS_GGUF_UINT8] = {"u8", 1},    [DS_GGUF_INT8] = {"i8", 1},    [DS_GGUF_UINT16] = {"u16", 2},
    [DS_GGUF_INT16] = {"i16", 2},   [DS_GGUF_UINT32] = {"u32", 4}, [DS_GGUF_INT32] = {"i32", 4},
    [DS_GGUF_FLOAT32] = {"f32", 4}, [DS_GGUF_BOOL] = {"bool", 1},  [DS_GGUF_STRING] = {"string", 0},
    [DS_GGUF_ARRAY] = {"array", 0}, [DS_GGUF_UINT64] = {"u64", 8}, [DS_GGUF_INT64] = {"i64", 8},
    [DS_GGUF_FLOAT64] = {"f64", 8},
};

#define N_VTYPES (sizeof(vtypes) / sizeof(vtypes[0]))

const char *ds_gguf_vtype_name(uint32_t vtype)
{
    return vtype < N_VTYPES ? vtypes[vtype].name : "unknown";
}

static uint64_t rd_le(const uint8_t *p, unsigned n)
{
    uint64_t v = 0;
    for (unsigned i = n; i-- > 0;)
        v = v << 8 | p[i];
    return v;
}

/* ---- cursor ---- */

typedef struct cur {
    const uint8_t *buf;
    size_t len, off;
    const char *path;
    ds_error *err;
    char what[DS_GGUF_MAX_NAME + 64]; /* what is being read, for errors */
} cur;

static int cur_short(cur *c, uint64_t need)
{
    return ds_error_set(c->err, -EBADMSG,
                        "%s: %s: truncated (needs %llu bytes at offset %zu, the file has %zu)",
                        c->path, c->what, (unsigned long long)need, c->off, c->len);
}

static int cur_take(cur *c, uint64_t n, const uint8_t **p)
{
    if (n > c->len - c->off)
        return cur_short(c, n);
    *p = c->buf + c->off;
    c->off += (size_t)n;
    return 0;
}

static int cur_u32(cur *c, uint32_t *v)
{
    const uint8_t *p = NULL;
    int rc = cur_take(c, 4, &p);
    if (rc == 0)
        *v = (uint32_t)rd_le(p, 4);
    return rc;
}

static int cur_u64(cur *c, uint64_t *v)
{
    const uint8_t *p = NULL;
    int rc = cur_take(c, 8, &p);
    if (rc == 0)
        *v = rd_le(p, 8);
    return rc;
}

/* A GGUF string: the length must fit in what is left of the file. */
static int cur_str(cur *c, ds_gguf_str *s)
{
    uint64_t n = 0;
    const uint8_t *p = NULL;
    int rc = cur_u64(c, &n);
    if (rc < 0)
        return rc;
    if (n > c->len - c->off)
        return ds_error_set(c->err, -EBADMSG,
                            "%s: %s: string length %llu runs past the end of the file "
                            "(%zu bytes left)",
                            c->path, c->what, (unsigned long long)n, c->len - c->off);
    if ((rc = cur_take(c, n, &p)) < 0)
        return rc;
    s->ptr = (const char *)p;
    s->len = n;
    return 0;
}

/* A key or tensor name: non-empty, bounded, no NUL (it becomes a C string); returns a copy. */
static int cur_name(cur *c, const char *kind, char **out)
{
    ds_gguf_str s = {0};
    int rc = cur_str(c, &s);
    if (rc < 0)
        return rc;
    if (s.len == 0 || s.len > DS_GGUF_MAX_NAME)
        return ds_error_set(c->err, s.len ? -ERANGE : -EBADMSG,
                            "%s: %s: %s length %llu (must be 1..%u)", c->path, c->what, kind,
                            (unsigned long long)s.len, DS_GGUF_MAX_NAME);
    if (memchr(s.ptr, 0, s.len))
        return ds_error_set(c->err, -EBADMSG, "%s: %s: %s contains a NUL byte", c->path, c->what,
                            kind);
    *out = strndup(s.ptr, s.len);
    return *out ? 0 : -ENOMEM;
}

/* ---- metadata ---- */

static int kv_parse_value(cur *c, ds_gguf_kv *kv)
{
    const uint8_t *p = NULL;
    int rc;
    if (kv->type >= N_VTYPES)
        return ds_error_set(c->err, -EBADMSG, "%s: %s has unknown value type %u", c->path, c->what,
                            kv->type);
    kv->elem = kv->type;
    kv->n = 1;
    if (kv->type == DS_GGUF_STRING) {
        if (!(kv->strs = malloc(sizeof(*kv->strs))))
            return -ENOMEM;
        return cur_str(c, kv->strs);
    }
    if (kv->type != DS_GGUF_ARRAY) {
        if ((rc = cur_take(c, vtypes[kv->type].size, &p)) < 0)
            return rc;
        kv->val = p;
        return 0;
    }
    if ((rc = cur_u32(c, &kv->elem)) < 0 || (rc = cur_u64(c, &kv->n)) < 0)
        return rc;
    if (kv->elem == DS_GGUF_ARRAY)
        return ds_error_set(c->err, -ENOTSUP, "%s: %s is an array of arrays (not supported)",
                            c->path, c->what);
    if (kv->elem >= N_VTYPES)
        return ds_error_set(c->err, -EBADMSG, "%s: %s is an array of unknown value type %u",
                            c->path, c->what, kv->elem);
    /* Every element takes at least 1 byte (a string 8), so a count above the bytes left is a
     * lie; checking before allocating keeps memory proportional to the file. */
    uint64_t min = kv->elem == DS_GGUF_STRING ? 8 : vtypes[kv->elem].size;
    if (kv->n > (c->len - c->off) / min)
        return ds_error_set(c->err, -EBADMSG,
                            "%s: %s: array of %llu %s runs past the end of the file (%zu bytes "
                            "left)",
                            c->path, c->what, (unsigned long long)kv->n,
                            ds_gguf_vtype_name(kv->elem), c->len - c->off);
    if (kv->elem != DS_GGUF_STRING) {
        if ((rc = cur_take(c, kv->n * min, &p)) < 0)
            return rc;
        kv->val = p;
        return 0;
    }
    if (kv->n && !(kv->strs = malloc(kv->n * sizeof(*kv->strs))))
        return -ENOMEM;
    for (uint64_t i = 0; i < kv->n; i++)
        if ((rc = cur_str(c, &kv->strs[i])) < 0)
            return rc;
    return 0;
}

static int kv_cmp(const void *a, const void *b)
{
    return strcmp((*(ds_gguf_kv *const *)a)->key, (*(ds_gguf_kv *const *)b)->key);
}

static int kvs_parse(cur *c, gguf_file *f, uint64_t n_kv)
{
    int rc;
    if (n_kv > DS_GGUF_MAX_KV)
        return ds_error_set(c->err, -ERANGE, "%s: %llu metadata entries (limit %u)", c->path,
                            (unsigned long long)n_kv, DS_GGUF_MAX_KV);
    if (n_kv > (c->len - c->off) / GGUF_MIN_KV_BYTES)
        return ds_error_set(c->err, -EBADMSG,
                            "%s: %llu metadata entries cannot fit in the %zu bytes left", c->path,
                            (unsigned long long)n_kv, c->len - c->off);
    if (n_kv && (!(f->kvs = calloc(n_kv, sizeof(*f->kvs))) ||
                 !(f->kv_sorted = calloc(n_kv, sizeof(*f->kv_sorted)))))
        return -ENOMEM;
    for (uint64_t i = 0; i < n_kv; i++) {
        ds_gguf_kv *kv = &f->kvs[i];
        kv->file = f->path;
        f->n_kvs++; /* counted now so a failure frees what this entry allocated */
        snprintf(c->what, sizeof(c->what), "metadata entry %llu (key)", (unsigned long long)i);
        if ((rc = cur_name(c, "key", &kv->key)) < 0)
            return rc;
        snprintf(c->what, sizeof(c->what), "key '%s'", kv->key);
        size_t at = c->off;
        if ((rc = cur_u32(c, &kv->type)) < 0 || (rc = kv_parse_value(c, kv)) < 0)
            return rc;
        kv->raw = c->buf + at;
        kv->raw_len = c->off - at;
        f->kv_sorted[i] = kv;
    }
    if (f->n_kvs > 1)
        qsort(f->kv_sorted, f->n_kvs, sizeof(*f->kv_sorted), kv_cmp);
    for (size_t i = 1; i < f->n_kvs; i++)
        if (!strcmp(f->kv_sorted[i]->key, f->kv_sorted[i - 1]->key))
            return ds_error_set(c->err, -EBADMSG, "%s: key '%s' appears twice", c->path,
                                f->kv_sorted[i]->key);
    return 0;
}

static const ds_gguf_kv *file_kv_find(const gguf_file *f, const char *key)
{
    ds_gguf_kv k = {.key = (char *)key}, *kp = &k, **r;
    if (!f->n_kvs)
        return NULL;
    r = bsearch(&kp, f->kv_sorted, f->n_kvs, sizeof(*f->kv_sorted), kv_cmp);
    return r ? *r : NULL;
}

/* ---- tensor infos ---- */

typedef struct span {
    uint64_t begin, end;
    const char *name;
} span;

static int span_cmp(const void *a, const void *b)
{
    const span *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : 0;
}

static int tensor_info_parse(cur *c, ds_gguf_tensor *t)
{
    int rc;
    uint32_t n_dims = 0;
    char *name = NULL;
    if ((rc = cur_name(c, "tensor name", &name)) < 0)
        return rc;
    t->name = name;
    snprintf(c->what, sizeof(c->what), "tensor '%s'", name);
    if ((rc = cur_u32(c, &n_dims)) < 0)
        return rc;
    if (n_dims < 1 || n_dims > DS_GGUF_MAX_DIMS)
        return ds_error_set(c->err, -EBADMSG, "%s: tensor '%s': %u dims (must be 1..%d)", c->path,
                            name, n_dims, DS_GGUF_MAX_DIMS);
    t->n_dims = n_dims;
    unsigned __int128 n = 1;
    for (uint32_t d = 0; d < DS_GGUF_MAX_DIMS; d++) {
        t->ne[d] = 1;
        if (d >= n_dims)
            continue;
        if ((rc = cur_u64(c, &t->ne[d])) < 0)
            return rc;
        if (t->ne[d] == 0)
            return ds_error_set(c->err, -EBADMSG, "%s: tensor '%s': ne[%u] is 0", c->path, name, d);
        /* Each factor is < 2^64 and the running product is kept <= INT64_MAX, so the 128-bit
         * product cannot wrap. */
        n *= t->ne[d];
        if (n > INT64_MAX)
            return ds_error_set(c->err, -ERANGE, "%s: tensor '%s': %u dims multiply past 2^63",
                                c->path, name, n_dims);
    }
    t->n_elements = (uint64_t)n;
    if ((rc = cur_u32(c, &t->type)) < 0 || (rc = cur_u64(c, &t->offset)) < 0)
        return rc;
    if (!ds_quant_type_known(t->type))
        return ds_error_set(c->err, -ENOTSUP, "%s: tensor '%s': unknown ggml type id %u", c->path,
                            name, t->type);
    uint32_t bv = ds_quant_block_values(t->type);
    if (t->ne[0] % bv)
        return ds_error_set(c->err, -EBADMSG,
                            "%s: tensor '%s': ne[0] = %llu is not a multiple of %s's block of %u "
                            "values",
                            c->path, name, (unsigned long long)t->ne[0],
                            ds_quant_type_name(t->type), bv);
    if ((rc = ds_quant_row_bytes(t->type, t->n_elements, &t->nbytes)) < 0)
        return ds_error_set(c->err, -ERANGE, "%s: tensor '%s': size in bytes overflows", c->path,
                            name);
    return 0;
}

static int tensors_push(ds_gguf *g, size_t extra)
{
    if (g->n_tensors + extra <= g->cap_tensors)
        return 0;
    size_t cap = g->n_tensors + extra;
    ds_gguf_tensor *nt = realloc(g->tensors, cap * sizeof(*nt));
    if (!nt)
        return -ENOMEM;
    g->tensors = nt;
    g->cap_tensors = cap;
    return 0;
}

/* Parses one file image; its tensors are appended to g. f->path names it in errors. */
static int gguf_parse(ds_gguf *g, gguf_file *f, const uint8_t *buf, size_t len, ds_error *err)
{
    cur c = {.buf = buf, .len = len, .path = f->path, .err = err};
    uint32_t magic;
    uint64_t n_tensors = 0, n_kv = 0;
    int rc;
    snprintf(c.what, sizeof(c.what), "header");
    if (len < 4 || (magic = (uint32_t)rd_le(buf, 4)) != GGUF_MAGIC_LE)
        return ds_error_set(err, -EBADMSG, "%s: not a GGUF file (no 'GGUF' magic)", f->path);
    c.off = 4;
    if ((rc = cur_u32(&c, &f->version)) < 0)
        return rc;
    /* A big-endian file's version reads as (v << 24): low half zero, as gguf-py detects it. */
    if (f->version && !(f->version & 0xffff))
        return ds_error_set(err, -ENOTSUP, "%s: big-endian GGUF is not supported", f->path);
    if (f->version == 1)
        return ds_error_set(err, -ENOTSUP,
                            "%s: GGUF version 1 is not supported (32-bit counts; re-convert the "
                            "model to version 3)",
                            f->path);
    if (f->version != 2 && f->version != 3)
        return ds_error_set(err, -ENOTSUP, "%s: GGUF version %u is not supported (only 2 and 3)",
                            f->path, f->version);
    if ((rc = cur_u64(&c, &n_tensors)) < 0 || (rc = cur_u64(&c, &n_kv)) < 0)
        return rc;
    if ((rc = kvs_parse(&c, f, n_kv)) < 0)
        return rc;

    f->alignment = GGUF_DEFAULT_ALIGN;
    const ds_gguf_kv *al = file_kv_find(f, "general.alignment");
    if (al) {
        if (al->type != DS_GGUF_UINT32)
            return ds_error_set(err, -EBADMSG, "%s: key 'general.alignment' has type %s, not u32",
                                f->path, ds_gguf_vtype_name(al->type));
        uint32_t a = (uint32_t)rd_le(al->val, 4);
        if (a == 0 || (a & (a - 1)))
            return ds_error_set(err, -EBADMSG,
                                "%s: key 'general.alignment' = %u is not a power of two", f->path,
                                a);
        if (a > DS_GGUF_MAX_ALIGN)
            return ds_error_set(err, -ERANGE, "%s: key 'general.alignment' = %u (limit %u)",
                                f->path, a, DS_GGUF_MAX_ALIGN);
        f->alignment = a;
    }

    snprintf(c.what, sizeof(c.what), "tensor infos");
    if (n_tensors > DS_GGUF_MAX_TENSORS)
        return ds_error_set(err, -ERANGE, "%s: %llu tensors (limit %u)", f->path,
                            (unsigned long long)n_tensors, DS_GGUF_MAX_TENSORS);
    if (n_tensors > (c.len - c.off) / GGUF_MIN_TENSOR_BYTES)
        return ds_error_set(err, -EBADMSG, "%s: %llu tensor infos cannot fit in the %zu bytes left",
                            f->path, (unsigned long long)n_tensors, c.len - c.off);
    if ((rc = tensors_push(g, (size_t)n_tensors)) < 0)
        return rc;
    size_t first = g->n_tensors;
    for (uint64_t i = 0; i < n_tensors; i++) {
        ds_gguf_tensor *t = &g->tensors[g->n_tensors];
        memset(t, 0, sizeof(*t));
        t->file = f->path;
        g->n_tensors++; /* so its name is freed on failure */
        snprintf(c.what, sizeof(c.what), "tensor info %llu (name)", (unsigned long long)i);
        if ((rc = tensor_info_parse(&c, t)) < 0)
            return rc;
    }

    /* The data section starts at the next multiple of the alignment. A file without tensors
     * may end before that padding. */
    uint64_t data_off = ((uint64_t)c.off + f->alignment - 1) / f->alignment * f->alignment;
    uint64_t data_len = data_off <= len ? len - data_off : 0;
    if (data_off > len && n_tensors)
        return ds_error_set(err, -EBADMSG,
                            "%s: truncated: the data section would start at offset %llu, past "
                            "the end of the file (%zu bytes)",
                            f->path, (unsigned long long)data_off, len);

    span *spans = calloc(n_tensors + 1, sizeof(*spans));
    if (!spans)
        return -ENOMEM;
    for (size_t i = first; i < g->n_tensors; i++) {
        ds_gguf_tensor *t = &g->tensors[i];
        if (t->offset % f->alignment) {
            rc = ds_error_set(err, -EBADMSG,
                              "%s: tensor '%s': offset %llu is not a multiple of the alignment "
                              "%u",
                              f->path, t->name, (unsigned long long)t->offset, f->alignment);
            goto out;
        }
        if (t->offset > data_len || t->nbytes > data_len - t->offset) {
            rc = ds_error_set(err, -EBADMSG,
                              "%s: tensor '%s': %llu bytes at offset %llu run past the end of "
                              "the data section (%llu bytes; file truncated?)",
                              f->path, t->name, (unsigned long long)t->nbytes,
                              (unsigned long long)t->offset, (unsigned long long)data_len);
            goto out;
        }
        t->data = buf + data_off + t->offset;
        spans[i - first] = (span){t->offset, t->offset + t->nbytes, t->name};
    }
    /* Sorted by start, a tensor overlaps an earlier one iff it starts before the furthest end
     * seen so far (every tensor has at least one byte). */
    if (n_tensors > 1)
        qsort(spans, n_tensors, sizeof(*spans), span_cmp);
    uint64_t max_end = 0;
    const char *max_name = NULL;
    for (size_t i = 0; i < n_tensors; i++) {
        if (max_name && spans[i].begin < max_end) {
            rc = ds_error_set(err, -EBADMSG, "%s: tensors '%s' and '%s' overlap", f->path, max_name,
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
    return rc;
}

/* ---- lifetime ---- */

static void file_clear(gguf_file *f)
{
    if (f->map)
        munmap(f->map, f->size);
    for (size_t i = 0; i < f->n_kvs; i++) {
        free(f->kvs[i].key);
        free(f->kvs[i].strs);
    }
    free(f->kvs);
    free(f->kv_sorted);
    free(f->path);
}

ds_gguf *ds_gguf_free(ds_gguf *g)
{
    if (!g)
        return NULL;
    for (size_t i = 0; i < g->n_tensors; i++)
        free((char *)g->tensors[i].name);
    for (size_t i = 0; i < g->n_files; i++)
        file_clear(&g->files[i]);
    free(g->files);
    free(g->tensors);
    free(g->sorted);
    free(g);
    return NULL;
}

static int tensor_ptr_cmp(const void *a, const void *b)
{
    return strcmp((*(ds_gguf_tensor *const *)a)->name, (*(ds_gguf_tensor *const *)b)->name);
}

/* Builds the name index; a name in two places (one file or two parts) is an error. */
static int gguf_finish(ds_gguf *g, ds_error *err)
{
    if (g->n_tensors && !(g->sorted = malloc(g->n_tensors * sizeof(*g->sorted))))
        return -ENOMEM;
    for (size_t i = 0; i < g->n_tensors; i++)
        g->sorted[i] = &g->tensors[i];
    if (g->n_tensors > 1)
        qsort(g->sorted, g->n_tensors, sizeof(*g->sorted), tensor_ptr_cmp);
    for (size_t i = 1; i < g->n_tensors; i++)
        if (!strcmp(g->sorted[i]->name, g->sorted[i - 1]->name)) {
            const ds_gguf_tensor *a = g->sorted[i - 1], *b = g->sorted[i];
            if (a > b) {
                const ds_gguf_tensor *t = a;
                a = b;
                b = t;
            }
            if (a->file == b->file)
                return ds_error_set(err, -EBADMSG, "%s: tensor '%s' appears twice", a->file,
                                    a->name);
            return ds_error_set(err, -EBADMSG, "%s: tensor '%s' appears twice (also in %s)",
                                b->file, b->name, a->file);
        }
    return 0;
}

static int gguf_add_file(ds_gguf *g, const char *path, ds_error *err)
{
    if (g->n_files >= DS_GGUF_MAX_SPLITS)
        return ds_error_set(err, -ERANGE, "%s: more than %d files", path, DS_GGUF_MAX_SPLITS);
    gguf_file *nf = realloc(g->files, (g->n_files + 1) * sizeof(*nf));
    if (!nf)
        return -ENOMEM;
    g->files = nf;
    gguf_file *f = &g->files[g->n_files];
    memset(f, 0, sizeof(*f));
    if (!(f->path = strdup(path)))
        return -ENOMEM;
    g->n_files++;
    void *map = NULL;
    int rc = ds_file_map(path, &map, &f->size, err);
    if (rc < 0)
        return rc;
    f->map = map;
    return gguf_parse(g, f, map, f->size, err);
}

int ds_gguf_open_file(const char *path, ds_gguf **ret, ds_error *err)
{
    ds_gguf *g = calloc(1, sizeof(*g));
    if (!g)
        return -ENOMEM;
    int rc = gguf_add_file(g, path, err);
    if (rc == 0)
        rc = gguf_finish(g, err);
    if (rc < 0) {
        ds_gguf_free(g);
        return rc;
    }
    *ret = g;
    return 0;
}

int ds_gguf_open_buffer(const void *buf, size_t len, const char *name, ds_gguf **ret, ds_error *err)
{
    ds_gguf *g = calloc(1, sizeof(*g));
    if (!g)
        return -ENOMEM;
    int rc = -ENOMEM;
    if ((g->files = calloc(1, sizeof(*g->files))) &&
        (g->files[0].path = strdup(name ? name : "<buffer>"))) {
        g->n_files = 1;
        rc = gguf_parse(g, &g->files[0], buf, len, err);
        if (rc == 0)
            rc = gguf_finish(g, err);
    }
    if (rc < 0) {
        ds_gguf_free(g);
        return rc;
    }
    *ret = g;
    return 0;
}

/* ---- split sets ---- */

/* PREFIX-KKKKK-of-NNNNN.gguf (llama.cpp's "%s-%05d-of-%05d.gguf"): the prefix length, K, N. */
static bool split_name_parse(const char *path, size_t *prefix_len, unsigned *k, unsigned *n)
{
    static const char tail[] = "-00000-of-00000.gguf";
    size_t len = strlen(path), tl = sizeof(tail) - 1;
    if (len < tl + 1)
        return false;
    const char *s = path + len - tl;
    for (size_t i = 0; i < tl; i++) {
        bool digit = tail[i] == '0';
        if (digit ? (s[i] < '0' || s[i] > '9') : s[i] != tail[i])
            return false;
    }
    *k = (unsigned)strtoul(s + 1, NULL, 10);
    *n = (unsigned)strtoul(s + 10, NULL, 10);
    *prefix_len = len - tl;
    return true;
}

/* A split.* key of file f as an integer (gguf-py and gguf-split write u16 / i32). */
static int split_key(const gguf_file *f, const char *key, uint64_t *v, ds_error *err)
{
    const ds_gguf_kv *kv = file_kv_find(f, key);
    if (!kv)
        return ds_error_set(err, -EBADMSG, "%s: key '%s' missing (part of a split set)", f->path,
                            key);
    return ds_gguf_kv_u64(kv, v, err);
}

int ds_gguf_open_split(const char *path, ds_gguf **ret, ds_error *err)
{
    size_t plen;
    unsigned k, n;
    uint64_t v = 0;
    int rc;
    if (!split_name_parse(path, &plen, &k, &n)) {
        ds_gguf *g = NULL;
        if ((rc = ds_gguf_open_file(path, &g, err)) < 0)
            return rc;
        const ds_gguf_kv *kv = file_kv_find(&g->files[0], "split.count");
        if (kv && (rc = ds_gguf_kv_u64(kv, &v, err)) == 0 && v > 1)
            rc = ds_error_set(err, -EBADMSG,
                              "%s: key 'split.count' = %llu, but the name is not "
                              "NAME-00001-of-%05llu.gguf (cannot find the other parts)",
                              path, (unsigned long long)v, (unsigned long long)v);
        if (rc < 0) {
            ds_gguf_free(g);
            return rc;
        }
        *ret = g;
        return 0;
    }
    if (n < 1 || k < 1 || k > n)
        return ds_error_set(err, -EINVAL, "%s: part %u of %u is not a valid split name", path, k,
                            n);
    if (n > DS_GGUF_MAX_SPLITS)
        return ds_error_set(err, -ERANGE, "%s: %u parts (limit %d)", path, n, DS_GGUF_MAX_SPLITS);
    if (plen + 32 > GGUF_MAX_PATH)
        return ds_error_set(err, -ENAMETOOLONG, "%s: path too long", path);
    ds_gguf *g = calloc(1, sizeof(*g));
    if (!g)
        return -ENOMEM;
    char part[GGUF_MAX_PATH];
    for (unsigned i = 0; i < n; i++) {
        snprintf(part, sizeof(part), "%.*s-%05u-of-%05u.gguf", (int)plen, path, i + 1, n);
        if ((rc = gguf_add_file(g, part, err)) < 0) {
            if (rc == -ENOENT)
                ds_error_prefix(err, "split set %s: part %u of %u missing", path, i + 1, n);
            goto fail;
        }
        gguf_file *f = &g->files[i];
        if ((rc = split_key(f, "split.count", &v, err)) < 0)
            goto fail;
        if (v != n) {
            rc = ds_error_set(err, -EBADMSG,
                              "%s: key 'split.count' = %llu, the file name says %u parts", f->path,
                              (unsigned long long)v, n);
            goto fail;
        }
        if ((rc = split_key(f, "split.no", &v, err)) < 0)
            goto fail;
        if (v != i) {
            rc = ds_error_set(err, -EBADMSG,
                              "%s: key 'split.no' = %llu, expected %u for part %u of %u", f->path,
                              (unsigned long long)v, i, i + 1, n);
            goto fail;
        }
    }
    const ds_gguf_kv *tc = file_kv_find(&g->files[0], "split.tensors.count");
    if (tc) {
        if ((rc = ds_gguf_kv_u64(tc, &v, err)) < 0)
            goto fail;
        if (v != g->n_tensors) {
            rc = ds_error_set(err, -EBADMSG,
                              "%s: key 'split.tensors.count' = %llu, but the %u parts hold %zu "
                              "tensors",
                              g->files[0].path, (unsigned long long)v, n, g->n_tensors);
            goto fail;
        }
    }
    if ((rc = gguf_finish(g, err)) < 0)
        goto fail;
    *ret = g;
    return 0;
fail:
    ds_gguf_free(g);
    return rc;
}

/* ---- accessors ---- */

size_t ds_gguf_file_count(const ds_gguf *g)
{
    return g->n_files;
}

const char *ds_gguf_file_path(const ds_gguf *g, size_t i)
{
    return i < g->n_files ? g->files[i].path : NULL;
}

uint32_t ds_gguf_version(const ds_gguf *g)
{
    return g->files[0].version;
}

uint32_t ds_gguf_alignment(const ds_gguf *g)
{
    return g->files[0].alignment;
}

size_t ds_gguf_tensor_count(const ds_gguf *g)
{
    return g->n_tensors;
}

const ds_gguf_tensor *ds_gguf_tensor_at(const ds_gguf *g, size_t i)
{
    return i < g->n_tensors ? &g->tensors[i] : NULL;
}

const ds_gguf_tensor *ds_gguf_tensor_find(const ds_gguf *g, const char *name)
{
    ds_gguf_tensor k = {.name = name}, *kp = &k, **r;
    if (!g->n_tensors)
        return NULL;
    r = bsearch(&kp, g->sorted, g->n_tensors, sizeof(*g->sorted), tensor_ptr_cmp);
    return r ? *r : NULL;
}

size_t ds_gguf_kv_count(const ds_gguf *g)
{
    return g->files[0].n_kvs;
}

const ds_gguf_kv *ds_gguf_kv_at(const ds_gguf *g, size_t i)
{
    return i < g->files[0].n_kvs ? &g->files[0].kvs[i] : NULL;
}

const ds_gguf_kv *ds_gguf_kv_find(const ds_gguf *g, const char *key)
{
    return file_kv_find(&g->files[0], key);
}

const char *ds_gguf_kv_key(const ds_gguf_kv *kv)
{
    return kv->key;
}

enum ds_gguf_vtype ds_gguf_kv_type(const ds_gguf_kv *kv)
{
    return (enum ds_gguf_vtype)kv->type;
}

enum ds_gguf_vtype ds_gguf_kv_elem_type(const ds_gguf_kv *kv)
{
    return (enum ds_gguf_vtype)kv->elem;
}

uint64_t ds_gguf_kv_len(const ds_gguf_kv *kv)
{
    return kv->n;
}

/* Integer value of type t at p, widened to 128 bits; false when t is not an integer type. */
static bool val_int(uint32_t t, const uint8_t *p, __int128 *v)
{
    switch (t) {
    case DS_GGUF_UINT8:
    case DS_GGUF_UINT16:
    case DS_GGUF_UINT32:
    case DS_GGUF_UINT64:
        *v = (__int128)rd_le(p, vtypes[t].size);
        return true;
    case DS_GGUF_INT8:
        *v = (int8_t)p[0];
        return true;
    case DS_GGUF_INT16:
        *v = (int16_t)rd_le(p, 2);
        return true;
    case DS_GGUF_INT32:
        *v = (int32_t)rd_le(p, 4);
        return true;
    case DS_GGUF_INT64:
        *v = (int64_t)rd_le(p, 8);
        return true;
    default:
        return false;
    }
}

static int kv_mismatch(const ds_gguf_kv *kv, const char *want, ds_error *err)
{
    if (kv->type == DS_GGUF_ARRAY)
        return ds_error_set(err, -EBADMSG, "%s: key '%s' is an array of %s, expected %s", kv->file,
                            kv->key, ds_gguf_vtype_name(kv->elem), want);
    return ds_error_set(err, -EBADMSG, "%s: key '%s' has type %s, expected %s", kv->file, kv->key,
                        ds_gguf_vtype_name(kv->type), want);
}

static int kv_int_range(const ds_gguf_kv *kv, const char *want, __int128 lo, __int128 hi,
                        __int128 *v, ds_error *err)
{
    if (kv->type == DS_GGUF_ARRAY || !val_int(kv->type, kv->val, v))
        return kv_mismatch(kv, want, err);
    if (*v < lo || *v > hi)
        return ds_error_set(err, -ERANGE, "%s: key '%s' = %lld%s does not fit in %s", kv->file,
                            kv->key, (long long)*v, *v > INT64_MAX ? " (or more)" : "", want);
    return 0;
}

int ds_gguf_kv_u32(const ds_gguf_kv *kv, uint32_t *out, ds_error *err)
{
    __int128 v = 0;
    int rc = kv_int_range(kv, "u32", 0, UINT32_MAX, &v, err);
    if (rc == 0)
        *out = (uint32_t)v;
    return rc;
}

int ds_gguf_kv_u64(const ds_gguf_kv *kv, uint64_t *out, ds_error *err)
{
    __int128 v = 0;
    int rc = kv_int_range(kv, "u64", 0, UINT64_MAX, &v, err);
    if (rc == 0)
        *out = (uint64_t)v;
    return rc;
}

int ds_gguf_kv_i32(const ds_gguf_kv *kv, int32_t *out, ds_error *err)
{
    __int128 v = 0;
    int rc = kv_int_range(kv, "i32", INT32_MIN, INT32_MAX, &v, err);
    if (rc == 0)
        *out = (int32_t)v;
    return rc;
}

int ds_gguf_kv_i64(const ds_gguf_kv *kv, int64_t *out, ds_error *err)
{
    __int128 v = 0;
    int rc = kv_int_range(kv, "i64", INT64_MIN, INT64_MAX, &v, err);
    if (rc == 0)
        *out = (int64_t)v;
    return rc;
}

static float val_f32(uint32_t t, const uint8_t *p)
{
    if (t == DS_GGUF_FLOAT32) {
        uint32_t u = (uint32_t)rd_le(p, 4);
        float f;
        memcpy(&f, &u, sizeof(f));
        return f;
    }
    uint64_t u = rd_le(p, 8);
    double d;
    memcpy(&d, &u, sizeof(d));
    return (float)d;
}

int ds_gguf_kv_f32(const ds_gguf_kv *kv, float *out, ds_error *err)
{
    if (kv->type != DS_GGUF_FLOAT32 && kv->type != DS_GGUF_FLOAT64)
        return kv_mismatch(kv, "f32", err);
    *out = val_f32(kv->type, kv->val);
    return 0;
}

int ds_gguf_kv_bool(const ds_gguf_kv *kv, bool *out, ds_error *err)
{
    if (kv->type != DS_GGUF_BOOL)
        return kv_mismatch(kv, "bool", err);
    *out = kv->val[0] != 0;
    return 0;
}

int ds_gguf_kv_str(const ds_gguf_kv *kv, ds_gguf_str *out, ds_error *err)
{
    if (kv->type != DS_GGUF_STRING)
        return kv_mismatch(kv, "string", err);
    *out = kv->strs[0];
    return 0;
}

static int kv_index(const ds_gguf_kv *kv, uint64_t i, const char *want, bool ok, ds_error *err)
{
    if (kv->type != DS_GGUF_ARRAY || !ok)
        return kv->type == DS_GGUF_ARRAY
                   ? ds_error_set(err, -EBADMSG, "%s: key '%s' is an array of %s, expected %s",
                                  kv->file, kv->key, ds_gguf_vtype_name(kv->elem), want)
                   : ds_error_set(err, -EBADMSG, "%s: key '%s' has type %s, expected an array",
                                  kv->file, kv->key, ds_gguf_vtype_name(kv->type));
    if (i >= kv->n)
        return ds_error_set(err, -ERANGE, "%s: key '%s': index %llu past the %llu elements",
                            kv->file, kv->key, (unsigned long long)i, (unsigned long long)kv->n);
    return 0;
}

int ds_gguf_kv_array_str(const ds_gguf_kv *kv, uint64_t i, ds_gguf_str *out, ds_error *err)
{
    int rc = kv_index(kv, i, "strings", kv->elem == DS_GGUF_STRING, err);
    if (rc == 0)
        *out = kv->strs[i];
    return rc;
}

int ds_gguf_kv_array_i64(const ds_gguf_kv *kv, uint64_t i, int64_t *out, ds_error *err)
{
    __int128 v = 0;
    bool is_int = kv->elem != DS_GGUF_STRING && kv->elem != DS_GGUF_BOOL &&
                  kv->elem != DS_GGUF_FLOAT32 && kv->elem != DS_GGUF_FLOAT64;
    int rc = kv_index(kv, i, "integers", is_int, err);
    if (rc < 0)
        return rc;
    val_int(kv->elem, kv->val + i * vtypes[kv->elem].size, &v);
    if (v > INT64_MAX)
        return ds_error_set(err, -ERANGE, "%s: key '%s'[%llu] does not fit in i64", kv->file,
                            kv->key, (unsigned long long)i);
    *out = (int64_t)v;
    return 0;
}

int ds_gguf_kv_array_f32(const ds_gguf_kv *kv, uint64_t i, float *out, ds_error *err)
{
    bool is_float = kv->elem == DS_GGUF_FLOAT32 || kv->elem == DS_GGUF_FLOAT64;
    int rc = kv_index(kv, i, "floats", is_float, err);
    if (rc == 0)
        *out = val_f32(kv->elem, kv->val + i * vtypes[kv->elem].size);
    return rc;
}

static int get_kv(const ds_gguf *g, const char *key, const ds_gguf_kv **kv, ds_error *err)
{
    *kv = file_kv_find(&g->files[0], key);
    if (!*kv)
        return ds_error_set(err, -ENOENT, "%s: key '%s' missing", g->files[0].path, key);
    return 0;
}

#define GGUF_GETTER(name, type)                                                                    \
    int ds_gguf_get_##name(const ds_gguf *g, const char *key, type *out, ds_error *err)            \
    {                                                                                              \
        const ds_gguf_kv *kv;                                                                      \
        int rc = get_kv(g, key, &kv, err);                                                         \
        return rc < 0 ? rc : ds_gguf_kv_##name(kv, out, err);                                      \
    }

GGUF_GETTER(u32, uint32_t)
GGUF_GETTER(u64, uint64_t)
GGUF_GETTER(i32, int32_t)
GGUF_GETTER(f32, float)
GGUF_GETTER(bool, bool)
GGUF_GETTER(str, ds_gguf_str)

int ds_gguf_get_array(const ds_gguf *g, const char *key, const ds_gguf_kv **kv, uint64_t *len,
                      ds_error *err)
{
    const ds_gguf_kv *k;
    int rc = get_kv(g, key, &k, err);
    if (rc < 0)
        return rc;
    if (k->type != DS_GGUF_ARRAY)
        return ds_error_set(err, -EBADMSG, "%s: key '%s' has type %s, expected an array", k->file,
                            k->key, ds_gguf_vtype_name(k->type));
    *kv = k;
    *len = k->n;
    return 0;
}

void ds_gguf_kv_raw(const ds_gguf_kv *kv, const void **bytes, size_t *len)
{
    *bytes = kv->raw;
    *len = (size_t)kv->raw_len;
}
