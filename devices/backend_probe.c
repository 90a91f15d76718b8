/* backend_probe.c — measured copy and matvec bandwidth of a backend (ds_backend_probe). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ds_backend.h"

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Seconds per call of op(ctx), repeated for about `seconds` (>= 3 runs); the queue is
 * drained every 4 calls so a deep asynchronous queue does not hide the cost. */
static double timed(ds_backend *b, double seconds, int (*op)(void *), void *ctx, ds_error *err)
{
    int rc = op(ctx); /* warm-up: first touch, program caches */
    if (rc < 0 || (rc = ds_backend_finish(b, err)) < 0)
        return rc;
    double t0 = now(), t;
    int it = 0;
    do {
        if ((rc = op(ctx)) < 0)
            return rc;
        if (++it % 4 == 0 && (rc = ds_backend_finish(b, err)) < 0)
            return rc;
        t = now() - t0;
    } while (t < seconds || it < 3);
    if ((rc = ds_backend_finish(b, err)) < 0)
        return rc;
    return (now() - t0) / it;
}

typedef struct copy_ctx {
    ds_bk_buf *x, *y;
    size_t bytes;
    ds_error *err;
} copy_ctx;

static int copy_op(void *p)
{
    copy_ctx *c = p;
    return ds_bk_copy(c->y, 0, c->x, 0, c->bytes, c->err);
}

typedef struct mv_ctx {
    ds_bk_weight *w;
    ds_bk_buf *x, *y;
    ds_error *err;
} mv_ctx;

static int mv_op(void *p)
{
    mv_ctx *c = p;
    return ds_bk_matmul(c->w, c->x, 0, 1, c->y, 0, c->err);
}

int ds_backend_probe(ds_backend *b, uint32_t rows, uint32_t cols, size_t copy_bytes, double seconds,
                     ds_bk_probe *out, ds_error *err)
{
    memset(out, 0, sizeof(*out));
    if (!rows || !cols || rows > 65536 || cols > 65536 || copy_bytes < 16 ||
        copy_bytes > ((size_t)16 << 30) || !(seconds > 0 && seconds <= 60))
        return ds_error_set(err, -ERANGE, "probe: [%u, %u], %zu copy bytes, %g s out of range",
                            rows, cols, copy_bytes, seconds);
    copy_bytes &= ~(size_t)15;
    int rc;
    copy_ctx cc = {NULL, NULL, copy_bytes, err};
    if ((rc = ds_bk_buf_new(b, copy_bytes, &cc.x, err)) < 0 ||
        (rc = ds_bk_buf_new(b, copy_bytes, &cc.y, err)) < 0)
        goto out;
    double t = timed(b, seconds, copy_op, &cc, err);
    if (t < 0) {
        rc = (int)t;
        goto out;
    }
    out->copy_gbs = 2.0 * (double)copy_bytes / t / 1e9;
    ds_bk_buf_free(cc.x);
    ds_bk_buf_free(cc.y);
    cc.x = cc.y = NULL;

    /* Random weights: finite values of every dtype; the content does not change the time. */
    size_t n = (size_t)rows * cols, ns = (size_t)((rows + 127) / 128) * ((cols + 127) / 128);
    uint8_t *data = malloc(n * 4);
    float *scale = malloc(ns * 4), *xh = malloc((size_t)cols * 4);
    mv_ctx mc = {NULL, NULL, NULL, err};
    if (!data || !scale || !xh) {
        rc = ds_error_set(err, -ENOMEM, "probe: out of memory");
        goto mv_out;
    }
    uint64_t s = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < n * 4; i += 4) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        uint32_t v = (uint32_t)(s >> 32) & 0x3f773f77u; /* finite as F32, BF16 and FP8 */
        memcpy(data + i, &v, 4);
    }
    for (size_t i = 0; i < ns; i++)
        scale[i] = 1.0f / 256;
    for (uint32_t c = 0; c < cols; c++)
        xh[c] = (float)(c % 13) / 13.0f;
    if ((rc = ds_bk_buf_new(b, (size_t)cols * 4, &mc.x, err)) < 0 ||
        (rc = ds_bk_buf_new(b, (size_t)rows * 4, &mc.y, err)) < 0 ||
        (rc = ds_bk_buf_write(mc.x, 0, xh, (size_t)cols * 4, err)) < 0)
        goto mv_out;
    for (int dt = 0; dt < 3; dt++) {
        ds_bk_weight_desc d = {
            (enum ds_bk_dtype)dt, rows, cols, data, dt == DS_BK_F8_E4M3 ? scale : NULL, 128, 128};
        if ((rc = ds_bk_weight_new(b, &d, &mc.w, err)) < 0)
            goto mv_out;
        t = timed(b, seconds, mv_op, &mc, err);
        double bytes = (double)ds_bk_weight_bytes(mc.w) + ((double)rows + cols) * 4.0;
        mc.w = ds_bk_weight_free(mc.w);
        if (t < 0) {
            rc = (int)t;
            goto mv_out;
        }
        out->matvec_gbs[dt] = bytes / t / 1e9;
    }
    rc = 0;
mv_out:
    ds_bk_weight_free(mc.w);
    ds_bk_buf_free(mc.x);
    ds_bk_buf_free(mc.y);
    free(data);
    free(scale);
    free(xh);
out:
    ds_bk_buf_free(cc.x);
    ds_bk_buf_free(cc.y);
    return rc;
}
