/* dsd_stream.c — weights for a node without a checkpoint copy (an edge box), streamed from the
 * coordinator over the control socket.
 *
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

#include "ds_log.h"
#include "dsd.h"

#define STREAM_CHUNK       (1u << 20)
#define STREAM_WINDOW      (8u << 20)
#define STREAM_MAX_CONFIG  (1u << 20)
#define STREAM_MAX_HEADER  (256u << 20)
#define STREAM_MAX_BYTES   (1ull << 42) /* 4 TiB: more than any DeepSeek checkpoint */

static const char *const FILES[2] = {"config.json", "model.safetensors"};

/* ---- coordinator -------------------------------------------------------------------------- */

struct dsd_stream_out {
    ds_model *m;
    const ds_st_tensor **t; /* in file order */
    size_t n;
    uint64_t *t_off;         /* [n] offset of each tensor's bytes in model.safetensors */
    uint8_t *config;         /* config.json bytes */
    size_t config_len;
    uint8_t *head;           /* u64 length + JSON header (padded) */
    size_t head_len;
    uint64_t st_len;         /* model.safetensors size */
    uint64_t plan_version;
    uint64_t sent, acked;    /* bytes over both files */
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
    free(s->t_off);
    free(s->config);
    free(s->head);
    ds_model_free(s->m);
    free(s);
}

uint64_t dsd_stream_out_total(const dsd_stream_out *s)
{
    return s->config_len + s->st_len;
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
        bool cfg = s->sent < s->config_len;
        uint64_t base = cfg ? 0 : s->config_len;
        uint64_t flen = cfg ? s->config_len : s->st_len, off = s->sent - base;
        size_t len = (size_t)(flen - off < STREAM_CHUNK ? flen - off : STREAM_CHUNK);
        uint8_t *buf = malloc(len ? len : 1);
        if (!buf)
            return -ENOMEM;
        if (cfg)
            memcpy(buf, s->config + off, len);
        else
            st_read(s, off, buf, len);
        Dsd__Envelope env = DSD__ENVELOPE__INIT;
        Dsd__WeightChunk wc = DSD__WEIGHT_CHUNK__INIT;
        Dsd__TensorDesc td, *tdp = &td;
        uint32_t shp[2];
        dsd_tensor_desc(&td, shp, DSD__DTYPE__DTYPE_U8, 1, (uint32_t)len);
        wc.file = (char *)FILES[cfg ? 0 : 1];
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
        s->sent += len;
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
    uint64_t plan_version;
    int fd[2];
    uint64_t total[2], got[2];
    bool started[2];
};

int dsd_stream_in_new(const char *dir, uint64_t plan_version, dsd_stream_in **ret, ds_error *err)
{
    dsd_stream_in *s = calloc(1, sizeof(*s));
    if (!s)
        return ds_error_set(err, -ENOMEM, "out of memory");
    snprintf(s->dir, sizeof(s->dir), "%s", dir);
    s->plan_version = plan_version;
    s->fd[0] = s->fd[1] = -1;
    if (mkdir(dir, 0750) < 0 && errno != EEXIST) {
        int rc = ds_error_set(err, -errno, "%s: %s", dir, strerror(errno));
        free(s);
        return rc;
    }
    for (int i = 0; i < 2; i++) {
        char p[PATH_MAX + 32];
        snprintf(p, sizeof(p), "%s/%s", dir, FILES[i]);
        unlink(p); /* the previous plan's files: this node's units may have changed */
        snprintf(p, sizeof(p), "%s/%s.part", dir, FILES[i]);
        s->fd[i] = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
        if (s->fd[i] < 0) {
            int rc = ds_error_set(err, -errno, "%s: %s", p, strerror(errno));
            dsd_stream_in_free(s);
            return rc;
        }
    }
    *ret = s;
    return 0;
}

void dsd_stream_in_free(dsd_stream_in *s)
{
    if (!s)
        return;
    for (int i = 0; i < 2; i++)
        if (s->fd[i] >= 0)
            close(s->fd[i]);
    free(s);
}

const char *dsd_stream_in_dir(const dsd_stream_in *s)
{
    return s->dir;
}

uint64_t dsd_stream_in_bytes(const dsd_stream_in *s)
{
    return s->got[0] + s->got[1];
}

bool dsd_stream_in_complete(const dsd_stream_in *s)
{
    return s->started[0] && s->started[1] && s->got[0] == s->total[0] &&
           s->got[1] == s->total[1];
}

int dsd_stream_in_chunk(dsd_stream_in *s, const Dsd__WeightChunk *c, const void *data,
                        size_t len, ds_error *err)
{
    int i = c->file && !strcmp(c->file, FILES[0]) ? 0 : c->file && !strcmp(c->file, FILES[1]) ? 1 : -1;
    if (i < 0)
        return ds_error_set(err, -EPROTO, "weight chunk for unknown file '%.64s'",
                            c->file ? c->file : "");
    if (c->plan_version != s->plan_version) /* a previous plan's, still in flight: drop it */
        return ds_error_set(err, -ESTALE, "weight chunk for plan v%llu, loading v%llu",
                            (unsigned long long)c->plan_version,
                            (unsigned long long)s->plan_version);
    uint64_t max = i == 0 ? STREAM_MAX_CONFIG : STREAM_MAX_BYTES;
    if (c->total_bytes == 0 || c->total_bytes > max || (s->started[i] && c->total_bytes != s->total[i]))
        return ds_error_set(err, -EPROTO, "%s: size %llu invalid", FILES[i],
                            (unsigned long long)c->total_bytes);
    if (len == 0 || c->offset != s->got[i] || c->offset + len > c->total_bytes)
        return ds_error_set(err, -EPROTO, "%s: chunk [%llu, +%zu) out of order (have %llu)",
                            FILES[i], (unsigned long long)c->offset, len,
                            (unsigned long long)s->got[i]);
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
    s->got[i] += len;
    if (s->got[i] == s->total[i]) {
        char a[PATH_MAX + 32], b[PATH_MAX + 32];
        snprintf(a, sizeof(a), "%s/%s.part", s->dir, FILES[i]);
        snprintf(b, sizeof(b), "%s/%s", s->dir, FILES[i]);
        if (fsync(s->fd[i]) < 0 || rename(a, b) < 0)
            return ds_error_set(err, -errno, "%s: %s", b, strerror(errno));
    }
    return 0;
}
