/* backend.c — the generic layer over the ops tables: opening by spec, the CUDA plugin loader,
 * and the range checks every op goes through before a backend sees it (a backend can then
 * trust its arguments; out-of-range requests become -ERANGE with a message, never a fault). */
#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds_backend.h"

#ifndef DS_BACKEND_PLUGIN_DIR
#define DS_BACKEND_PLUGIN_DIR ""
#endif

struct ds_backend {
    const ds_backend_ops *ops;
    void *impl;       /* the backend's device context */
    void *dl;         /* dlopen handle of a plugin, or NULL */
    char device[256]; /* device name from the driver */
};

struct ds_bk_buf {
    ds_backend *b;
    void *h;      /* backend handle */
    size_t bytes; /* size */
};

struct ds_bk_weight {
    ds_backend *b;
    void *h;                /* backend handle */
    ds_bk_weight_desc desc; /* shape/dtype (host pointers cleared: not kept) */
};

/* Loads libds_backend_cuda.so: $DS_BACKEND_PLUGIN_DIR, then the build's plugin dir, then the
 * dynamic linker's search path. */
static int load_plugin(const char *kind, void **dl, const ds_backend_ops **ops, ds_error *err)
{
    char file[64], path[4096], sym[64];
    snprintf(file, sizeof(file), "libds_backend_%s.so", kind);
    snprintf(sym, sizeof(sym), "ds_backend_%s_ops", kind);
    const char *dirs[3] = {getenv("DS_BACKEND_PLUGIN_DIR"), DS_BACKEND_PLUGIN_DIR, ""};
    char last[512] = "not found";
    for (int i = 0; i < 3; i++) {
        if (!dirs[i] || (i < 2 && !dirs[i][0]))
            continue;
        if (dirs[i][0])
            snprintf(path, sizeof(path), "%s/%s", dirs[i], file);
        else
            snprintf(path, sizeof(path), "%s", file);
        void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            snprintf(last, sizeof(last), "%s", dlerror());
            continue;
        }
        const ds_backend_ops *o = dlsym(h, sym);
        if (!o || o->abi != DS_BACKEND_ABI) {
            dlclose(h);
            return ds_error_set(err, -ENOENT, "%s: %s", path,
                                o ? "plugin built for another backend ABI" : "no ops table");
        }
        *dl = h;
        *ops = o;
        return 0;
    }
    return ds_error_set(err, -ENOENT, "%s backend not available: %s", kind, last);
}

/* Every backend kind: built in (ops) or a plugin loaded on first use (ops NULL). Adding a
 * backend adds one line here. */
static const struct {
    const char *kind;
    const ds_backend_ops *ops;
} registry[] = {
    {"cpu", &ds_backend_cpu_ops},
    {"opencl", &ds_backend_opencl_ops},
    {"cuda", NULL},
};

int ds_backend_open(const char *spec, ds_backend **ret, ds_error *err)
{
    *ret = NULL;
    if (!spec)
        spec = "cpu";
    char kind[32];
    const char *colon = strchr(spec, ':');
    size_t kl = colon ? (size_t)(colon - spec) : strlen(spec);
    if (kl == 0 || kl >= sizeof(kind))
        return ds_error_set(err, -EINVAL, "backend '%s': expected cpu, opencl[:N] or cuda[:N]",
                            spec);
    memcpy(kind, spec, kl);
    kind[kl] = 0;
    const char *arg = colon ? colon + 1 : NULL;
    if (arg) {
        char *end;
        long v = strtol(arg, &end, 10);
        if (!*arg || *end || v < 0 || v > 64)
            return ds_error_set(err, -EINVAL, "backend '%s': bad device index", spec);
    }
    ds_backend *b = calloc(1, sizeof(*b));
    if (!b)
        return ds_error_set(err, -ENOMEM, "backend: out of memory");
    int rc = 1; /* no such kind */
    for (size_t i = 0; i < sizeof(registry) / sizeof(registry[0]); i++) {
        if (strcmp(kind, registry[i].kind))
            continue;
        if (registry[i].ops) {
            b->ops = registry[i].ops;
            rc = 0;
        } else {
            rc = load_plugin(kind, &b->dl, &b->ops, err);
        }
        break;
    }
    if (rc == 1)
        rc = ds_error_set(err, -EINVAL, "backend '%s': unknown kind '%s'", spec, kind);
    if (rc == 0)
        rc = b->ops->open(arg, &b->impl, b->device, sizeof(b->device), err);
    if (rc < 0) {
        /* A plugin stays loaded even when its device is absent: its runtime may already have
         * registered exit handlers (see ds_backend_free). */
        free(b);
        return rc;
    }
    *ret = b;
    return 0;
}

ds_backend *ds_backend_free(ds_backend *b)
{
    if (!b)
        return NULL;
    b->ops->close(b->impl);
    /* The CUDA runtime registers exit handlers inside the plugin; unloading it would leave
     * them dangling, so a plugin stays loaded for the life of the process. */
    free(b);
    return NULL;
}

const char *ds_backend_kind(const ds_backend *b)
{
    return b->ops->name;
}

const char *ds_backend_device(const ds_backend *b)
{
    return b->device;
}

int ds_backend_finish(ds_backend *b, ds_error *err)
{
    return b->ops->finish(b->impl, err);
}

/* ---- buffers ---- */

int ds_bk_buf_new(ds_backend *b, size_t bytes, ds_bk_buf **ret, ds_error *err)
{
    *ret = NULL;
    if (bytes == 0 || bytes > ((size_t)1 << 40))
        return ds_error_set(err, -ERANGE, "%s: buffer of %zu bytes", b->ops->name, bytes);
    ds_bk_buf *buf = calloc(1, sizeof(*buf));
    if (!buf)
        return ds_error_set(err, -ENOMEM, "%s: out of memory", b->ops->name);
    int rc = b->ops->buf_alloc(b->impl, bytes, &buf->h, err);
    if (rc < 0) {
        free(buf);
        return rc;
    }
    buf->b = b;
    buf->bytes = bytes;
    *ret = buf;
    return 0;
}

ds_bk_buf *ds_bk_buf_free(ds_bk_buf *buf)
{
    if (!buf)
        return NULL;
    buf->b->ops->buf_free(buf->b->impl, buf->h);
    free(buf);
    return NULL;
}

size_t ds_bk_buf_size(const ds_bk_buf *buf)
{
    return buf->bytes;
}

/* True when [off, off+len) (in units of el bytes) lies inside buf. */
static bool in_range(const ds_bk_buf *buf, size_t off, size_t len, size_t el)
{
    if (!buf)
        return false;
    size_t cap = buf->bytes / el;
    return off <= cap && len <= cap - off;
}

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond))                                                                               \
            return ds_error_set(err, -ERANGE, __VA_ARGS__);                                        \
    } while (0)

int ds_bk_buf_write(ds_bk_buf *buf, size_t off, const void *src, size_t bytes, ds_error *err)
{
    CHECK(in_range(buf, off, bytes, 1), "buffer write [%zu, +%zu) outside the buffer", off, bytes);
    if (!bytes)
        return 0;
    return buf->b->ops->buf_write(buf->b->impl, buf->h, off, src, bytes, err);
}

int ds_bk_buf_read(ds_bk_buf *buf, size_t off, void *dst, size_t bytes, ds_error *err)
{
    CHECK(in_range(buf, off, bytes, 1), "buffer read [%zu, +%zu) outside the buffer", off, bytes);
    if (!bytes)
        return 0;
    return buf->b->ops->buf_read(buf->b->impl, buf->h, off, dst, bytes, err);
}

/* ---- weights ---- */

#define MAX_SIDE (1u << 20)

int ds_bk_weight_new(ds_backend *b, const ds_bk_weight_desc *d, ds_bk_weight **ret, ds_error *err)
{
    *ret = NULL;
    if (d->dtype != DS_BK_F32 && d->dtype != DS_BK_BF16 && d->dtype != DS_BK_F8_E4M3)
        return ds_error_set(err, -EINVAL, "weight: unknown dtype %d", (int)d->dtype);
    if (!d->rows || !d->cols || d->rows > MAX_SIDE || d->cols > MAX_SIDE || !d->data)
        return ds_error_set(err, -ERANGE, "weight: shape [%u, %u] outside [1, %u]", d->rows,
                            d->cols, MAX_SIDE);
    if (d->dtype == DS_BK_F8_E4M3 && (!d->scale_inv || !d->block_rows || !d->block_cols ||
                                      d->block_rows > MAX_SIDE || d->block_cols > MAX_SIDE))
        return ds_error_set(err, -EINVAL, "weight: FP8 needs scale_inv and block sizes");
    ds_bk_weight *w = calloc(1, sizeof(*w));
    if (!w)
        return ds_error_set(err, -ENOMEM, "%s: out of memory", b->ops->name);
    int rc = b->ops->weight_upload(b->impl, d, &w->h, err);
    if (rc < 0) {
        free(w);
        return rc;
    }
    w->b = b;
    w->desc = *d;
    w->desc.data = NULL;
    w->desc.scale_inv = NULL;
    if (d->dtype != DS_BK_F8_E4M3)
        w->desc.block_rows = w->desc.block_cols = 0;
    *ret = w;
    return 0;
}

ds_bk_weight *ds_bk_weight_free(ds_bk_weight *w)
{
    if (!w)
        return NULL;
    w->b->ops->weight_free(w->b->impl, w->h);
    free(w);
    return NULL;
}

uint32_t ds_bk_weight_rows(const ds_bk_weight *w)
{
    return w->desc.rows;
}

uint32_t ds_bk_weight_cols(const ds_bk_weight *w)
{
    return w->desc.cols;
}

size_t ds_bk_weight_bytes(const ds_bk_weight *w)
{
    size_t el = w->desc.dtype == DS_BK_F32 ? 4 : w->desc.dtype == DS_BK_BF16 ? 2 : 1;
    return (size_t)w->desc.rows * w->desc.cols * el;
}

/* ---- ops ---- */

static bool same(const ds_backend *b, const ds_bk_buf *x)
{
    return !x || x->b == b;
}

#define SAME(b, ...)                                                                               \
    do {                                                                                           \
        const ds_bk_buf *bufs_[] = {__VA_ARGS__};                                                  \
        for (size_t i_ = 0; i_ < sizeof(bufs_) / sizeof(bufs_[0]); i_++)                           \
            if (!same(b, bufs_[i_]))                                                               \
                return ds_error_set(err, -EINVAL, "buffers of another backend");                   \
    } while (0)

int ds_bk_matmul(ds_bk_weight *w, ds_bk_buf *x, size_t x_off, uint32_t n, ds_bk_buf *y,
                 size_t y_off, ds_error *err)
{
    ds_backend *b = w->b;
    SAME(b, x, y);
    CHECK(in_range(x, x_off, (size_t)n * w->desc.cols, 4), "matmul: x [%u, %u] at %zu outside", n,
          w->desc.cols, x_off);
    CHECK(in_range(y, y_off, (size_t)n * w->desc.rows, 4), "matmul: y [%u, %u] at %zu outside", n,
          w->desc.rows, y_off);
    if (!n)
        return 0;
    return b->ops->matmul(b->impl, w->h, &w->desc, x->h, x_off, n, y->h, y_off, err);
}

int ds_bk_rmsnorm(ds_bk_buf *x, ds_bk_buf *gamma, uint32_t n, uint32_t d, float eps, ds_bk_buf *y,
                  ds_error *err)
{
    CHECK(x && gamma && y, "rmsnorm: missing buffer");
    SAME(x->b, gamma, y);
    CHECK(d > 0 && in_range(x, 0, (size_t)n * d, 4) && in_range(y, 0, (size_t)n * d, 4) &&
              in_range(gamma, 0, d, 4),
          "rmsnorm: [%u, %u] outside the buffers", n, d);
    if (!n)
        return 0;
    return x->b->ops->rmsnorm(x->b->impl, x->h, gamma->h, n, d, eps, y->h, err);
}

int ds_bk_rope(ds_bk_buf *x, uint32_t n, uint32_t heads, uint32_t stride, uint32_t off,
               uint32_t dim, ds_bk_buf *cs, ds_bk_buf *sn, ds_error *err)
{
    CHECK(x && cs && sn, "rope: missing buffer");
    SAME(x->b, cs, sn);
    CHECK(dim % 2 == 0 && heads > 0 && (size_t)off + dim <= stride, "rope: dim %u off %u stride %u",
          dim, off, stride);
    CHECK(in_range(x, 0, (size_t)n * heads * stride, 4) &&
              in_range(cs, 0, (size_t)n * dim / 2, 4) && in_range(sn, 0, (size_t)n * dim / 2, 4),
          "rope: [%u x %u, %u] outside the buffers", n, heads, stride);
    if (!n || !dim)
        return 0;
    return x->b->ops->rope(x->b->impl, x->h, n, heads, stride, off, dim, cs->h, sn->h, err);
}

int ds_bk_mla_decode(ds_bk_buf *q_lat, ds_bk_buf *q_pe, ds_bk_buf *cache, uint32_t heads,
                     uint32_t C, uint32_t R, uint32_t t, float scale, ds_bk_buf *out, ds_error *err)
{
    CHECK(q_lat && q_pe && cache && out, "mla: missing buffer");
    SAME(q_lat->b, q_pe, cache, out);
    CHECK(heads && C && t, "mla: empty shape (heads %u, C %u, t %u)", heads, C, t);
    CHECK(in_range(q_lat, 0, (size_t)heads * C, 4) && in_range(q_pe, 0, (size_t)heads * R, 4) &&
              in_range(cache, 0, (size_t)t * (C + R), 4) && in_range(out, 0, (size_t)heads * C, 4),
          "mla: H %u C %u R %u t %u outside the buffers", heads, C, R, t);
    return q_lat->b->ops->mla_decode(q_lat->b->impl, q_lat->h, q_pe->h, cache->h, heads, C, R, t,
                                     scale, out->h, err);
}

int ds_bk_swiglu(ds_bk_buf *g, ds_bk_buf *u, size_t count, ds_error *err)
{
    CHECK(g && u, "swiglu: missing buffer");
    SAME(g->b, u);
    CHECK(in_range(g, 0, count, 4) && in_range(u, 0, count, 4), "swiglu: %zu outside", count);
    if (!count)
        return 0;
    return g->b->ops->swiglu(g->b->impl, g->h, u->h, count, err);
}

int ds_bk_topk(ds_bk_buf *scores, ds_bk_buf *bias, uint32_t n, uint32_t E, uint32_t k,
               ds_bk_buf *ids, ds_bk_buf *weights, ds_error *err)
{
    CHECK(scores && ids && weights, "topk: missing buffer");
    SAME(scores->b, bias, ids, weights);
    CHECK(E > 0 && E <= 4096 && k > 0 && k <= E && k <= 64, "topk: k %u of E %u", k, E);
    CHECK(in_range(scores, 0, (size_t)n * E, 4) && (!bias || in_range(bias, 0, E, 4)) &&
              in_range(ids, 0, (size_t)n * k, 4) && in_range(weights, 0, (size_t)n * k, 4),
          "topk: [%u, %u] k %u outside the buffers", n, E, k);
    if (!n)
        return 0;
    return scores->b->ops->topk(scores->b->impl, scores->h, bias ? bias->h : NULL, n, E, k, ids->h,
                                weights->h, err);
}

int ds_bk_add(ds_bk_buf *y, ds_bk_buf *x, size_t count, ds_error *err)
{
    CHECK(y && x, "add: missing buffer");
    SAME(y->b, x);
    CHECK(in_range(y, 0, count, 4) && in_range(x, 0, count, 4), "add: %zu outside", count);
    if (!count)
        return 0;
    return y->b->ops->add(y->b->impl, y->h, x->h, count, err);
}

int ds_bk_scale(ds_bk_buf *y, float s, size_t count, ds_error *err)
{
    CHECK(y, "scale: missing buffer");
    CHECK(in_range(y, 0, count, 4), "scale: %zu outside", count);
    if (!count)
        return 0;
    return y->b->ops->scale(y->b->impl, y->h, s, count, err);
}

int ds_bk_copy(ds_bk_buf *dst, size_t dst_off, ds_bk_buf *src, size_t src_off, size_t bytes,
               ds_error *err)
{
    CHECK(dst && src, "copy: missing buffer");
    SAME(dst->b, src);
    CHECK(in_range(dst, dst_off, bytes, 1) && in_range(src, src_off, bytes, 1),
          "copy: %zu bytes outside the buffers", bytes);
    if (!bytes)
        return 0;
    return dst->b->ops->copy(dst->b->impl, dst->h, dst_off, src->h, src_off, bytes, err);
}

/* ---- ABI 2: the ops of whole units ---- */

/* The last float row i < n of a strided range: off + (n-1)*stride + d <= buffer floats. */
static bool rows_in_range(const ds_bk_buf *buf, size_t off, size_t stride, uint32_t n, uint32_t d)
{
    if (!n)
        return true;
    if (stride < d || stride > (SIZE_MAX / 8) / n)
        return false;
    return in_range(buf, off, (size_t)(n - 1) * stride + d, 4);
}

static int need_op(const ds_backend *b, const void *op, const char *what, ds_error *err)
{
    return op ? 0
              : ds_error_set(err, -ENOTSUP, "%s: the %s backend has no %s op", what, b->ops->name,
                             what);
}

int ds_bk_rmsnorm_rows(ds_bk_buf *x, size_t x_off, size_t x_stride, ds_bk_buf *gamma, uint32_t n,
                       uint32_t d, double eps, ds_bk_buf *y, size_t y_off, size_t y_stride,
                       ds_error *err)
{
    CHECK(x && gamma && y, "rmsnorm_rows: missing buffer");
    SAME(x->b, gamma, y);
    CHECK(d > 0 && rows_in_range(x, x_off, x_stride, n, d) &&
              rows_in_range(y, y_off, y_stride, n, d) && in_range(gamma, 0, d, 4),
          "rmsnorm_rows: [%u, %u] (strides %zu, %zu) outside the buffers", n, d, x_stride,
          y_stride);
    CHECK(eps >= 0 && isfinite(eps), "rmsnorm_rows: eps %g", eps);
    int rc = need_op(x->b, (const void *)x->b->ops->rmsnorm_rows, "rmsnorm_rows", err);
    if (rc < 0 || !n)
        return rc;
    return x->b->ops->rmsnorm_rows(x->b->impl, x->h, x_off, x_stride, gamma->h, n, d, eps, y->h,
                                   y_off, y_stride, err);
}

size_t ds_bk_mla_attn_scratch(const ds_bk_mla_desc *m, uint32_t pos0, uint32_t n)
{
    return (size_t)n * m->heads * (2 * (size_t)m->C + pos0 + n);
}

int ds_bk_mla_attn(const ds_bk_mla_desc *m, ds_bk_buf *q, size_t q_off, ds_bk_weight *kv_b,
                   ds_bk_buf *cache, uint32_t pos0, uint32_t n, ds_bk_buf *scratch, ds_bk_buf *att,
                   size_t att_off, ds_error *err)
{
    CHECK(m && q && kv_b && cache && scratch && att, "mla_attn: missing argument");
    ds_backend *b = kv_b->b;
    SAME(b, q, cache, scratch, att);
    CHECK(m->heads && m->nope && m->v && m->C && m->heads <= 4096 && m->nope <= 4096 &&
              m->rope <= 4096 && m->v <= 4096 && m->C <= 65536 && isfinite(m->scale),
          "mla_attn: shape H %u nope %u rope %u v %u C %u", m->heads, m->nope, m->rope, m->v, m->C);
    CHECK(kv_b->desc.rows == m->heads * (m->nope + m->v) && kv_b->desc.cols == m->C,
          "mla_attn: kv_b is [%u, %u], the shape needs [%u, %u]", kv_b->desc.rows, kv_b->desc.cols,
          m->heads * (m->nope + m->v), m->C);
    CHECK(pos0 < (1u << 24) && n < (1u << 24), "mla_attn: positions %u + %u", pos0, n);
    size_t qw = (size_t)m->heads * (m->nope + m->rope), kvw = (size_t)m->C + m->rope;
    CHECK(in_range(q, q_off, (size_t)n * qw, 4) &&
              in_range(cache, 0, (pos0 + (size_t)n) * kvw, 4) &&
              in_range(att, att_off, (size_t)n * m->heads * m->v, 4) &&
              in_range(scratch, 0, ds_bk_mla_attn_scratch(m, pos0, n), 4),
          "mla_attn: %u rows at position %u outside the buffers", n, pos0);
    int rc = need_op(b, (const void *)b->ops->mla_attn, "mla_attn", err);
    if (rc < 0 || !n)
        return rc;
    return b->ops->mla_attn(b->impl, m, q->h, q_off, kv_b->h, &kv_b->desc, cache->h, pos0, n,
                            scratch->h, att->h, att_off, err);
}

size_t ds_bk_router_scratch(const ds_bk_router_desc *r, uint32_t n)
{
    return (size_t)n * (3 * (size_t)r->E + 2 * (size_t)r->n_group);
}

int ds_bk_router(const ds_bk_router_desc *r, ds_bk_buf *logits, ds_bk_buf *bias, uint32_t n,
                 ds_bk_buf *scratch, ds_bk_buf *ids, ds_bk_buf *weights, ds_error *err)
{
    CHECK(r && logits && scratch && ids && weights, "router: missing argument");
    SAME(logits->b, bias, scratch, ids, weights);
    CHECK(r->E > 0 && r->E <= 65536 && r->k > 0 && r->k <= r->E && r->k <= 64 &&
              r->method <= DS_BK_ROUTER_GROUP_TOP2SUM && isfinite(r->scaling),
          "router: k %u of E %u, method %u", r->k, r->E, r->method);
    CHECK(r->method == DS_BK_ROUTER_GREEDY ||
              (r->n_group > 0 && r->E % r->n_group == 0 && r->topk_group <= r->n_group),
          "router: %u groups (%u kept) of %u experts", r->n_group, r->topk_group, r->E);
    CHECK(in_range(logits, 0, (size_t)n * r->E, 4) && (!bias || in_range(bias, 0, r->E, 4)) &&
              in_range(ids, 0, (size_t)n * r->k, 4) && in_range(weights, 0, (size_t)n * r->k, 4) &&
              in_range(scratch, 0, ds_bk_router_scratch(r, n), 4),
          "router: [%u, %u] k %u outside the buffers", n, r->E, r->k);
    ds_backend *b = logits->b;
    int rc = need_op(b, (const void *)b->ops->router, "router", err);
    if (rc < 0 || !n)
        return rc;
    return b->ops->router(b->impl, r, logits->h, bias ? bias->h : NULL, n, scratch->h, ids->h,
                          weights->h, err);
}

int ds_bk_gather_rows(ds_bk_weight *w, const int32_t *ids, uint32_t n, ds_bk_buf *y, size_t y_off,
                      ds_error *err)
{
    ds_backend *b = w->b;
    SAME(b, y);
    CHECK(y && (ids || !n), "gather_rows: missing argument");
    for (uint32_t i = 0; i < n; i++)
        CHECK(ids[i] >= 0 && (uint32_t)ids[i] < w->desc.rows, "gather_rows: id %d outside [0, %u)",
              ids[i], w->desc.rows);
    CHECK(in_range(y, y_off, (size_t)n * w->desc.cols, 4), "gather_rows: y [%u, %u] at %zu outside",
          n, w->desc.cols, y_off);
    int rc = need_op(b, (const void *)b->ops->gather_rows, "gather_rows", err);
    if (rc < 0 || !n)
        return rc;
    return b->ops->gather_rows(b->impl, w->h, &w->desc, ids, n, y->h, y_off, err);
}

void ds_backend_set_exact(ds_backend *b, bool exact)
{
    if (b && b->ops->set_exact)
        b->ops->set_exact(b->impl, exact);
}
