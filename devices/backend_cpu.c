/* backend_cpu.c — the reference backend: host memory, plain C in the engine's exact order.
 *
 * Every other backend is tested against this one. matmul follows the fixed accumulation order
 * of ds_backend.h with fmaf (the product is built with -ffp-contract=off, so nothing else is
 * fused), which is the same order as the engine's ds_weight_matmul: results are bit-identical
 * to the CPU engine. It runs on one thread — it is the reference, not the fast CPU path (the
 * engine's own kernels are). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds_backend.h"

typedef struct cpu_weight {
    void *data;       /* copy of the checkpoint data */
    float *scale_inv; /* F8: copy of the block scales */
} cpu_weight;

static float fp8_lut[256];

static int cpu_open(const char *arg, void **impl, char *name, size_t name_len, ds_error *err)
{
    if (arg && strcmp(arg, "0"))
        return ds_error_set(err, -ENOENT, "cpu backend: only device 0 exists");
    for (int i = 0; i < 256; i++)
        fp8_lut[i] = ds_fp8_e4m3_to_f32((uint8_t)i);
    snprintf(name, name_len, "host cpu (reference)");
    *impl = NULL;
    return 0;
}

static void cpu_close(void *impl)
{
}

static int cpu_buf_alloc(void *impl, size_t bytes, void **buf, ds_error *err)
{
    *buf = calloc(1, bytes);
    return *buf ? 0 : ds_error_set(err, -ENOMEM, "cpu: %zu bytes", bytes);
}

static void cpu_buf_free(void *impl, void *buf)
{
    free(buf);
}

static int cpu_buf_write(void *impl, void *buf, size_t off, const void *src, size_t bytes,
                         ds_error *err)
{
    memcpy((char *)buf + off, src, bytes);
    return 0;
}

static int cpu_buf_read(void *impl, void *buf, size_t off, void *dst, size_t bytes, ds_error *err)
{
    memcpy(dst, (const char *)buf + off, bytes);
    return 0;
}

static int cpu_weight_upload(void *impl, const ds_bk_weight_desc *d, void **ret, ds_error *err)
{
    size_t el = d->dtype == DS_BK_F32 ? 4 : d->dtype == DS_BK_BF16 ? 2 : 1;
    size_t bytes = (size_t)d->rows * d->cols * el;
    cpu_weight *w = calloc(1, sizeof(*w));
    if (!w || !(w->data = malloc(bytes)))
        goto oom;
    memcpy(w->data, d->data, bytes);
    if (d->dtype == DS_BK_F8_E4M3) {
        size_t ns = (size_t)((d->rows + d->block_rows - 1) / d->block_rows) *
                    ((d->cols + d->block_cols - 1) / d->block_cols);
        if (!(w->scale_inv = malloc(ns * sizeof(float))))
            goto oom;
        memcpy(w->scale_inv, d->scale_inv, ns * sizeof(float));
    }
    *ret = w;
    return 0;
oom:
    if (w)
        free(w->data);
    free(w);
    return ds_error_set(err, -ENOMEM, "cpu: weight of %zu bytes", bytes);
}

static void cpu_weight_free(void *impl, void *p)
{
    cpu_weight *w = p;
    if (!w)
        return;
    free(w->data);
    free(w->scale_inv);
    free(w);
}

/* Element c of row r as float (F8: value times block scale, rounded — like the engine). */
static inline float w_at(const cpu_weight *w, const ds_bk_weight_desc *d, const float *srow,
                         size_t base, uint32_t c)
{
    switch (d->dtype) {
    case DS_BK_F32:
        return ((const float *)w->data)[base + c];
    case DS_BK_BF16:
        return ds_bf16_to_f32(((const uint16_t *)w->data)[base + c]);
    default:
        return fp8_lut[((const uint8_t *)w->data)[base + c]] * srow[c / d->block_cols];
    }
}

static int cpu_matmul(void *impl, void *wp, const ds_bk_weight_desc *d, void *xp, size_t x_off,
                      uint32_t n, void *yp, size_t y_off, ds_error *err)
{
    const cpu_weight *w = wp;
    const float *x = (const float *)xp + x_off;
    float *y = (float *)yp + y_off;
    uint32_t cols = d->cols, c16 = cols & ~15u;
    uint32_t nbc = d->dtype == DS_BK_F8_E4M3 ? (cols + d->block_cols - 1) / d->block_cols : 0;
    for (uint32_t r = 0; r < d->rows; r++) {
        size_t base = (size_t)r * cols;
        const float *srow =
            d->dtype == DS_BK_F8_E4M3 ? w->scale_inv + (size_t)(r / d->block_rows) * nbc : NULL;
        for (uint32_t i = 0; i < n; i++) {
            const float *xi = x + (size_t)i * cols;
            float acc[16] = {0};
            for (uint32_t c = 0; c < c16; c++)
                acc[c & 15] = fmaf(w_at(w, d, srow, base, c), xi[c], acc[c & 15]);
            float a[8];
            for (int j = 0; j < 8; j++)
                a[j] = acc[j] + acc[j + 8];
            float s = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
            for (uint32_t c = c16; c < cols; c++)
                s = fmaf(w_at(w, d, srow, base, c), xi[c], s);
            y[(size_t)i * d->rows + r] = s;
        }
    }
    return 0;
}

static int cpu_rmsnorm(void *impl, void *xp, void *gp, uint32_t n, uint32_t d, float eps, void *yp,
                       ds_error *err)
{
    const float *gamma = gp;
    for (uint32_t i = 0; i < n; i++) {
        const float *x = (const float *)xp + (size_t)i * d;
        float *y = (float *)yp + (size_t)i * d;
        double ss = 0;
        for (uint32_t c = 0; c < d; c++)
            ss += (double)x[c] * x[c];
        float r = (float)(1.0 / sqrt(ss / d + (double)eps));
        for (uint32_t c = 0; c < d; c++)
            y[c] = gamma[c] * (x[c] * r);
    }
    return 0;
}

static int cpu_rope(void *impl, void *xp, uint32_t n, uint32_t heads, uint32_t stride, uint32_t off,
                    uint32_t dim, void *csp, void *snp, ds_error *err)
{
    const float *cs = csp, *sn = snp;
    for (size_t v = 0; v < (size_t)n * heads; v++) {
        size_t i = v / heads;
        float *x = (float *)xp + v * stride + off;
        for (uint32_t p = 0; p < dim / 2; p++) {
            float c = cs[i * (dim / 2) + p], s = sn[i * (dim / 2) + p];
            float a = x[2 * p], b = x[2 * p + 1];
            x[2 * p] = a * c - b * s;
            x[2 * p + 1] = a * s + b * c;
        }
    }
    return 0;
}

static int cpu_mla_decode(void *impl, void *qlp, void *qpp, void *cp, uint32_t heads, uint32_t C,
                          uint32_t R, uint32_t t, float scale, void *op, ds_error *err)
{
    const float *cache = cp;
    float *s = malloc((size_t)t * sizeof(float));
    if (!s)
        return ds_error_set(err, -ENOMEM, "cpu: mla scores");
    for (uint32_t h = 0; h < heads; h++) {
        const float *ql = (const float *)qlp + (size_t)h * C,
                    *qp = (const float *)qpp + (size_t)h * R;
        float *o = (float *)op + (size_t)h * C;
        float mx = -INFINITY;
        for (uint32_t j = 0; j < t; j++) {
            const float *row = cache + (size_t)j * (C + R);
            float a = 0;
            for (uint32_t c = 0; c < C; c++)
                a = fmaf(ql[c], row[c], a);
            for (uint32_t c = 0; c < R; c++)
                a = fmaf(qp[c], row[C + c], a);
            s[j] = a * scale;
            mx = s[j] > mx ? s[j] : mx;
        }
        float sum = 0;
        for (uint32_t j = 0; j < t; j++) {
            s[j] = expf(s[j] - mx);
            sum += s[j];
        }
        for (uint32_t c = 0; c < C; c++)
            o[c] = 0;
        for (uint32_t j = 0; j < t; j++) {
            float p = s[j] / sum;
            const float *row = cache + (size_t)j * (C + R);
            for (uint32_t c = 0; c < C; c++)
                o[c] = fmaf(p, row[c], o[c]);
        }
    }
    free(s);
    return 0;
}

static int cpu_swiglu(void *impl, void *gp, void *up, size_t count, ds_error *err)
{
    float *g = gp;
    const float *u = up;
    for (size_t i = 0; i < count; i++)
        g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    return 0;
}

static int cpu_topk(void *impl, void *sp, void *bp, uint32_t n, uint32_t E, uint32_t k, void *idp,
                    void *wp, ds_error *err)
{
    const float *bias = bp;
    for (uint32_t i = 0; i < n; i++) {
        const float *s = (const float *)sp + (size_t)i * E;
        int32_t *ids = (int32_t *)idp + (size_t)i * k;
        float *w = (float *)wp + (size_t)i * k;
        /* k passes of arg-max over the not yet chosen: strictly greater wins, so ties keep the
         * lower index. */
        for (uint32_t j = 0; j < k; j++) {
            int32_t best = -1;
            float bv = 0;
            for (uint32_t e = 0; e < E; e++) {
                bool taken = false;
                for (uint32_t q = 0; q < j; q++)
                    taken |= ids[q] == (int32_t)e;
                if (taken)
                    continue;
                float v = bias ? s[e] + bias[e] : s[e];
                if (best < 0 || v > bv) {
                    best = (int32_t)e;
                    bv = v;
                }
            }
            ids[j] = best;
            w[j] = s[best];
        }
    }
    return 0;
}

static int cpu_add(void *impl, void *yp, void *xp, size_t count, ds_error *err)
{
    float *y = yp;
    const float *x = xp;
    for (size_t i = 0; i < count; i++)
        y[i] += x[i];
    return 0;
}

static int cpu_scale(void *impl, void *yp, float s, size_t count, ds_error *err)
{
    float *y = yp;
    for (size_t i = 0; i < count; i++)
        y[i] *= s;
    return 0;
}

static int cpu_copy(void *impl, void *dst, size_t dst_off, void *src, size_t src_off, size_t bytes,
                    ds_error *err)
{
    memmove((char *)dst + dst_off, (const char *)src + src_off, bytes);
    return 0;
}

static int cpu_finish(void *impl, ds_error *err)
{
    return 0;
}

const ds_backend_ops ds_backend_cpu_ops = {
    .abi = DS_BACKEND_ABI,
    .name = "cpu",
    .open = cpu_open,
    .close = cpu_close,
    .buf_alloc = cpu_buf_alloc,
    .buf_free = cpu_buf_free,
    .buf_write = cpu_buf_write,
    .buf_read = cpu_buf_read,
    .weight_upload = cpu_weight_upload,
    .weight_free = cpu_weight_free,
    .matmul = cpu_matmul,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .mla_decode = cpu_mla_decode,
    .swiglu = cpu_swiglu,
    .topk = cpu_topk,
    .add = cpu_add,
    .scale = cpu_scale,
    .copy = cpu_copy,
    .finish = cpu_finish,
};
