/* dsd_stream.c — weights for a node without a checkpoint copy (an edge box), streamed from the
 * coordinator over the control socket.
 *
 * A GGUF model streams as one file, model.gguf: a header the coordinator writes
 * (ds_gguf_subset_header: the model's metadata, and the tensor infos of only the tensors the
 * node's units read) and those tensors' bytes straight from the mapping, in their ggml types (no
 * dequantisation on the wire). A stacked ffn_*_exps tensor keeps its shape, so the same loader
 * opens the file, but only the node's experts' slices are sent: the node writes each chunk at
 * its offset and the slices of other experts stay holes of the file (sparse on disk, never
 * read: those experts are not bound there).
 *
 * An HF checkpoint streams as two files:
 * The coordinator opens its own copy with only that node's units bound, asks the model which
 * checkpoint tensors those units read (ds_model_tensors_used) and streams a small checkpoint
 * made of exactly them: config.json, then model.safetensors (a header it writes, the tensors'
 * bytes straight from its mmap: F32 first, then 2-byte, then 1-byte types, so every tensor
 * stays aligned for its dtype). The node writes the files under its state directory and opens
 * them like any checkpoint. Streaming a file format the loader already validates, rather than
 * tensors into memory, keeps one loading path and lets a restarted node reuse nothing
 * silently: every plan streams afresh.
 *
 * Flow control: chunks of 1 MiB; the node acknowledges each with LoadProgress{bytes_loaded};
 * at most STREAM_WINDOW unacknowledged bytes are in flight, so a slow edge link never makes
 * the coordinator queue the whole model in memory. */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "ds_gguf.h"
#include "ds_log.h"
#include "dsd.h"

#define STREAM_CHUNK      (1u << 20)
#define STREAM_WINDOW     (8u << 20)
#define STREAM_MAX_CONFIG (1u << 20)
#define STREAM_MAX_HEADER (256u << 20)
#define STREAM_MAX_BYTES  (1ull << 42) /* 4 TiB: more than any DeepSeek checkpoint */

enum { F_CONFIG, F_ST, F_GGUF, N_FILES };
static const char *const FILES[N_FILES] = {"config.json", "model.safetensors", "model.gguf"};

/* ---- coordinator -------------------------------------------------------------------------- */

/* A GGUF stream: bytes of model.gguf from `src`, at file offset `off` (ascending, not
 * overlapping; the gaps are holes). */
struct region {
    uint64_t off, len;
    const uint8_t *src;
};

struct dsd_stream_out {
    ds_model *m;
    /* GGUF (gguf true): one file, the regions in order; else config.json + model.safetensors */
    bool gguf;
    struct region *reg;
    size_t n_reg, reg_i; /* next region to send from */
    uint64_t gguf_len;   /* model.gguf size */
    const struct ds_gguf_tensor **gt;
    const ds_st_tensor **t; /* in file order */
    size_t n;
    uint64_t *t_off; /* [n] offset of each tensor's bytes in model.safetensors */
    uint8_t *config; /* config.json bytes */
    size_t config_len;
    uint8_t *head; /* u64 length + JSON header (padded) */
    size_t head_len;
    uint64_t st_len; /* model.safetensors size */
    uint64_t plan_version;
    uint64_t sent, acked; /* positions: config.json length + model.safetensors offset, or
                           * the model.gguf offset reached (holes included) */
};

static int align_rank(enum ds_st_dtype dt)
{
    size_t s = ds_st_dtype_size(dt);
    return s >= 4 ? 0 : s == 2 ? 1 : 2;
}

static int by_alignment(const void *a, const void *b)
{
    const ds_st_tensor *x = *(const ds_st_tensor *const *)a, *y = *(const ds_st_tensor *const *)b;
    int rx = align_rank(x->dtype), ry = align_rank(y->dtype);
    if (rx != ry)
        return rx - ry;
    return strcmp(x->name, y->name);
}

static uint8_t *read_small_file(const char *path, size_t max, size_t *len, ds_error *err)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        ds_error_set(err, -errno, "%s: %s", path, strerror(errno));
        return NULL;
    }
    uint8_t *buf = malloc(max + 1);
    size_t n = buf ? fread(buf, 1, max + 1, f) : 0;
    fclose(f);
    if (!buf || n > max) {
        free(buf);
        ds_error_set(err, -EFBIG, "%s: larger than %zu bytes", path, max);
        return NULL;
    }
    *len = n;
    return buf;
}

static int by_offset(const void *a, const void *b)
{
    const struct region *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

/* The GGUF stream of s->m's bound units: header + the tensors (or, for stacked experts, the
 * bound experts' slices). */
static int gguf_out_init(dsd_stream_out *s, const dsd_units *u, ds_error *err)
{
    const ds_gguf *g = ds_model_gguf(s->m);
    size_t n = 0;
    int rc = ds_model_gguf_tensors_used(s->m, &s->gt, &n);
    if (rc < 0)
        return ds_error_set(err, rc, "out of memory");
    uint64_t *off = malloc((n ? n : 1) * sizeof(*off)), data_len = 0;
    size_t cap = n + 2;
    for (size_t i = 0; i < n; i++) {
        unsigned l;
        char which[8];
        if (sscanf(s->gt[i]->name, "blk.%u.ffn_%7[a-z]_exps.weight", &l, which) == 2)
            cap += u->n_experts;
    }
    s->reg = calloc(cap, sizeof(*s->reg));
    if (!off || !s->reg) {
        free(off);
        return ds_error_set(err, -ENOMEM, "out of memory");
    }
    if ((rc = ds_gguf_subset_header(g, s->gt, n, &s->head, &s->head_len, off, &data_len, err)) <
        0) {
        free(off);
        return rc;
    }
    s->reg[s->n_reg++] = (struct region){0, s->head_len, s->head};
    for (size_t i = 0; i < n; i++) {
        const ds_gguf_tensor *t = s->gt[i];
        uint64_t at = s->head_len + off[i];
        unsigned l;
        char which[8];
        bool stacked = sscanf(t->name, "blk.%u.ffn_%7[a-z]_exps.weight", &l, which) == 2 &&
                       t->n_dims == 3 && l < u->n_layers && t->ne[2] == u->n_experts;
        if (!stacked) {
            s->reg[s->n_reg++] = (struct region){at, t->nbytes, t->data};
            continue;
        }
        uint64_t per = t->nbytes / t->ne[2];
        for (uint32_t e = 0; e < u->n_experts; e++)
            if (dsd_units_want((void *)u, DS_UNIT_EXPERT, l, e))
                s->reg[s->n_reg++] =
                    (struct region){at + e * per, per, (const uint8_t *)t->data + e * per};
    }
    free(off);
    qsort(s->reg, s->n_reg, sizeof(*s->reg), by_offset);
    s->gguf_len = s->head_len + data_len;
    /* the last byte is always sent, so the node knows the file is whole when it has it */
    static const uint8_t zero;
    const struct region *last = &s->reg[s->n_reg - 1];
    if (last->off + last->len < s->gguf_len)
        s->reg[s->n_reg++] = (struct region){s->gguf_len - 1, 1, &zero};
    s->gguf = true;
    return 0;
}

int dsd_stream_out_new(const char *model_dir, const dsd_units *u, uint64_t plan_version,
                       dsd_stream_out **ret, ds_error *err)
{
    dsd_stream_out *s = calloc(1, sizeof(*s));
    if (!s)
        return ds_error_set(err, -ENOMEM, "out of memory");
    s->plan_version = plan_version;
    ds_model_open_opts oo = {.want = dsd_units_want, .want_ctx = (void *)u};
    char path[PATH_MAX + 16];
    json_t *hdr = NULL;
    char *js = NULL;
    int rc = ds_model_open(model_dir, &oo, &s->m, err);
    if (rc < 0)
        goto fail;
    if (ds_model_gguf(s->m)) {
        if ((rc = gguf_out_init(s, u, err)) < 0)
            goto fail;
        *ret = s;
        return 0;
    }
    snprintf(path, sizeof(path), "%s/config.json", model_dir);
    if (!(s->config = read_small_file(path, STREAM_MAX_CONFIG, &s->config_len, err))) {
        rc = err->code ? err->code : -EIO;
        goto fail;
    }
    if ((rc = ds_model_tensors_used(s->m, &s->t, &s->n)) < 0)
        goto fail;
    qsort(s->t, s->n, sizeof(*s->t), by_alignment);
    s->t_off = malloc((s->n ? s->n : 1) * sizeof(uint64_t));
    hdr = json_object();
    rc = -ENOMEM;
    if (!s->t_off || !hdr)
        goto fail;
    uint64_t off = 0;
    for (size_t i = 0; i < s->n; i++) {
        const ds_st_tensor *t = s->t[i];
        json_t *shape = json_array();
        for (uint32_t d = 0; d < t->ndim; d++)
            json_array_append_new(shape, json_integer((json_int_t)t->shape[d]));
        json_object_set_new(hdr, t->name,
                            json_pack("{s:s,s:o,s:[I,I]}", "dtype", ds_st_dtype_name(t->dtype),
                                      "shape", shape, "data_offsets", (json_int_t)off,
                                      (json_int_t)(off + t->nbytes)));
        s->t_off[i] = off;
        off += t->nbytes;
    }
    if (!(js = json_dumps(hdr, JSON_COMPACT)))
        goto fail;
    size_t jl = strlen(js), padded = (jl + 7) / 8 * 8; /* the data starts 8-byte aligned */
    if (padded > STREAM_MAX_HEADER) {
        rc = ds_error_set(err, -EFBIG, "safetensors header of %zu bytes", padded);
        goto fail;
    }
    s->head_len = 8 + padded;
    if (!(s->head = malloc(s->head_len)))
        goto fail;
    for (int b = 0; b < 8; b++)
        s->head[b] = (uint8_t)((uint64_t)padded >> (8 * b));
    memcpy(s->head + 8, js, jl);
    memset(s->head + 8 + jl, ' ', padded - jl);
    s->st_len = s->head_len + off;
    json_decref(hdr);
    free(js);
    *ret = s;
    return 0;
fail:
    if (rc == -ENOMEM && !err->code)
        ds_error_set(err, rc, "out of memory");
    json_decref(hdr);
    free(js);
    dsd_stream_out_free(s);
    return rc;
}

void dsd_stream_out_free(dsd_stream_out *s)
{
    if (!s)
        return;
    free(s->t);
    free(s->gt);
    free(s->reg);
    free(s->t_off);
    free(s->config);
    free(s->head);
    ds_model_free(s->m);
    free(s);
}

uint64_t dsd_stream_out_total(const dsd_stream_out *s)
{
    return s->gguf ? s->gguf_len : s->config_len + s->st_len;
}

uint64_t dsd_stream_out_wire_bytes(const dsd_stream_out *s)
{
    if (!s->gguf)
        return dsd_stream_out_total(s);
    uint64_t b = 0;
    for (size_t i = 0; i < s->n_reg; i++)
        b += s->reg[i].len;
    return b;
}

bool dsd_stream_out_done(const dsd_stream_out *s)
{
    return s->acked >= dsd_stream_out_total(s);
}

/* Copies model.safetensors bytes [pos, pos + len) into dst. */
static void st_read(const dsd_stream_out *s, uint64_t pos, uint8_t *dst, size_t len)
{
    while (len) {
        size_t k;
        if (pos < s->head_len) {
            k = (size_t)(s->head_len - pos) < len ? (size_t)(s->head_len - pos) : len;
            memcpy(dst, s->head + pos, k);
        } else {
            uint64_t d = pos - s->head_len;
            /* the tensor holding byte d: binary search over the offsets */
            size_t lo = 0, hi = s->n;
            while (hi - lo > 1) {
                size_t mid = (lo + hi) / 2;
                if (s->t_off[mid] <= d)
                    lo = mid;
                else
                    hi = mid;
            }
            /* skip empty tensors sharing the offset */
            while (lo + 1 < s->n && s->t_off[lo + 1] <= d)
                lo++;
            const ds_st_tensor *t = s->t[lo];
            uint64_t in = d - s->t_off[lo], left = t->nbytes - in;
            k = left < len ? (size_t)left : len;
            memcpy(dst, (const uint8_t *)t->data + in, k);
        }
        pos += k;
        dst += k;
        len -= k;
    }
}

int dsd_stream_out_pump(dsd_stream_out *s, void *sock, const char *peer)
{
    uint64_t total = dsd_stream_out_total(s);
    while (s->sent < total && s->sent - s->acked < STREAM_WINDOW) {
        bool cfg = !s->gguf && s->sent < s->config_len;
        uint64_t base = cfg || s->gguf ? 0 : s->config_len;
        uint64_t flen = s->gguf ? s->gguf_len : cfg ? s->config_len : s->st_len;
        uint64_t off = s->sent - base;
        const struct region *r = NULL;
        if (s->gguf) { /* from the next region: a hole before it is skipped */
            r = &s->reg[s->reg_i];
            if (off < r->off)
                off = r->off;
        }
        uint64_t left = r ? r->off + r->len - off : flen - off;
        size_t len = (size_t)(left < STREAM_CHUNK ? left : STREAM_CHUNK);
        uint8_t *buf = malloc(len ? len : 1);
        if (!buf)
            return -ENOMEM;
        if (r)
            memcpy(buf, r->src + (off - r->off), len);
        else if (cfg)
            memcpy(buf, s->config + off, len);
        else
            st_read(s, off, buf, len);
        Dsd__Envelope env = DSD__ENVELOPE__INIT;
        Dsd__WeightChunk wc = DSD__WEIGHT_CHUNK__INIT;
        Dsd__TensorDesc td, *tdp = &td;
        uint32_t shp[2];
        dsd_tensor_desc(&td, shp, DSD__DTYPE__DTYPE_U8, 1, (uint32_t)len);
        wc.file = (char *)FILES[s->gguf ? F_GGUF : cfg ? F_CONFIG : F_ST];
        wc.offset = off;
        wc.total_bytes = flen;
        wc.plan_version = s->plan_version;
        env.body_case = DSD__ENVELOPE__BODY_WEIGHT_CHUNK;
        env.weight_chunk = &wc;
        env.n_tensors = 1;
        env.tensors = &tdp;
        void *fr = buf;
        int rc = dsd_send(sock, peer, strlen(peer), &env, &fr, &len, 1);
        if (rc < 0)
            return rc;
        s->sent = base + off + len;
        if (r && off + len == r->off + r->len)
            s->reg_i++;
    }
    return 0;
}

void dsd_stream_out_ack(dsd_stream_out *s, uint64_t bytes_loaded)
{
    if (bytes_loaded > s->acked && bytes_loaded <= s->sent)
        s->acked = bytes_loaded;
}

/* ---- node --------------------------------------------------------------------------------- */

struct dsd_stream_in {
    char dir[PATH_MAX];
    char model[PATH_MAX + 16]; /* what to open once complete: dir, or dir/model.gguf */
    uint64_t plan_version;
    int fd[N_FILES];
    uint64_t total[N_FILES], got[N_FILES]; /* got: the offset reached (a GGUF's holes too) */
    bool started[N_FILES];
};

int dsd_stream_in_new(const char *dir, uint64_t plan_version, dsd_stream_in **ret, ds_error *err)
{
    dsd_stream_in *s = calloc(1, sizeof(*s));
    if (!s)
        return ds_error_set(err, -ENOMEM, "out of memory");
    snprintf(s->dir, sizeof(s->dir), "%s", dir);
    s->plan_version = plan_version;
    for (int i = 0; i < N_FILES; i++)
        s->fd[i] = -1;
    if (mkdir(dir, 0750) < 0 && errno != EEXIST) {
        int rc = ds_error_set(err, -errno, "%s: %s", dir, strerror(errno));
        free(s);
        return rc;
    }
    for (int i = 0; i < N_FILES; i++) {
        char p[PATH_MAX + 32];
        snprintf(p, sizeof(p), "%s/%s", dir, FILES[i]);
        unlink(p); /* the previous plan's files: this node's units may have changed */
        snprintf(p, sizeof(p), "%s/%s.part", dir, FILES[i]);
        unlink(p);
    }
    *ret = s;
    return 0;
}

void dsd_stream_in_free(dsd_stream_in *s)
{
    if (!s)
        return;
    for (int i = 0; i < N_FILES; i++)
        if (s->fd[i] >= 0)
            close(s->fd[i]);
    free(s);
}

const char *dsd_stream_in_dir(const dsd_stream_in *s)
{
    return s->dir;
}

const char *dsd_stream_in_model(const dsd_stream_in *s)
{
    return s->model;
}

uint64_t dsd_stream_in_bytes(const dsd_stream_in *s)
{
    return s->got[F_CONFIG] + s->got[F_ST] + s->got[F_GGUF];
}

static bool file_done(const dsd_stream_in *s, int i)
{
    return s->started[i] && s->got[i] == s->total[i];
}

bool dsd_stream_in_complete(const dsd_stream_in *s)
{
    return (file_done(s, F_CONFIG) && file_done(s, F_ST) && !s->started[F_GGUF]) ||
           (file_done(s, F_GGUF) && !s->started[F_CONFIG] && !s->started[F_ST]);
}

int dsd_stream_in_chunk(dsd_stream_in *s, const Dsd__WeightChunk *c, const void *data, size_t len,
                        ds_error *err)
{
    int i = -1;
    for (int k = 0; k < N_FILES && i < 0; k++)
        if (c->file && !strcmp(c->file, FILES[k]))
            i = k;
    if (i < 0)
        return ds_error_set(err, -EPROTO, "weight chunk for unknown file '%.64s'",
                            c->file ? c->file : "");
    if (c->plan_version != s->plan_version) /* a previous plan's, still in flight: drop it */
        return ds_error_set(err, -ESTALE, "weight chunk for plan v%llu, loading v%llu",
                            (unsigned long long)c->plan_version,
                            (unsigned long long)s->plan_version);
    uint64_t max = i == F_CONFIG ? STREAM_MAX_CONFIG : STREAM_MAX_BYTES;
    if (c->total_bytes == 0 || c->total_bytes > max ||
        (s->started[i] && c->total_bytes != s->total[i]))
        return ds_error_set(err, -EPROTO, "%s: size %llu invalid", FILES[i],
                            (unsigned long long)c->total_bytes);
    /* in order; a GGUF's chunks may skip ahead (the slices of experts hosted elsewhere) */
    if (len == 0 || c->offset + len > c->total_bytes ||
        (i == F_GGUF ? c->offset < s->got[i] : c->offset != s->got[i]))
        return ds_error_set(err, -EPROTO, "%s: chunk [%llu, +%zu) out of order (have %llu)",
                            FILES[i], (unsigned long long)c->offset, len,
                            (unsigned long long)s->got[i]);
    if (!s->started[i]) {
        char p[PATH_MAX + 32];
        snprintf(p, sizeof(p), "%s/%s.part", s->dir, FILES[i]);
        s->fd[i] = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
        if (s->fd[i] < 0)
            return ds_error_set(err, -errno, "%s: %s", p, strerror(errno));
    }
    s->started[i] = true;
    s->total[i] = c->total_bytes;
    const uint8_t *p = data;
    size_t left = len;
    while (left) {
        ssize_t w = pwrite(s->fd[i], p, left, (off_t)(c->offset + (len - left)));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return ds_error_set(err, -errno, "%s/%s: %s", s->dir, FILES[i], strerror(errno));
        p += w;
        left -= (size_t)w;
    }
    s->got[i] = c->offset + len;
    if (s->got[i] == s->total[i]) {
        char a[PATH_MAX + 32], b[PATH_MAX + 32];
        snprintf(a, sizeof(a), "%s/%s.part", s->dir, FILES[i]);
        snprintf(b, sizeof(b), "%s/%s", s->dir, FILES[i]);
        if (fsync(s->fd[i]) < 0 || rename(a, b) < 0)
            return ds_error_set(err, -errno, "%s: %s", b, strerror(errno));
    }
    if (dsd_stream_in_complete(s))
        snprintf(s->model, sizeof(s->model), i == F_GGUF ? "%s/model.gguf" : "%s", s->dir);
    return 0;
}
