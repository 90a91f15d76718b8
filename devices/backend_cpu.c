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
            s[j] = ds_expf(s[j] - mx);
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
        g[i] = g[i] / (1.0f + ds_expf(-g[i])) * u[i];
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

/* ---- ABI 2 ops: the engine's own orders (model/forward.c, model/router.c) ---- */

static int cpu_rmsnorm_rows(void *impl, void *xp, size_t x_off, size_t x_stride, void *gp,
                            uint32_t n, uint32_t d, double eps, void *yp, size_t y_off,
                            size_t y_stride, ds_error *err)
{
    const float *gamma = gp;
    for (uint32_t i = 0; i < n; i++) {
        const float *x = (const float *)xp + x_off + (size_t)i * x_stride;
        float *y = (float *)yp + y_off + (size_t)i * y_stride;
        double ss = 0;
        for (uint32_t c = 0; c < d; c++)
            ss += (double)x[c] * x[c];
        float r = (float)(1.0 / sqrt(ss / d + eps));
        for (uint32_t c = 0; c < d; c++)
            y[c] = gamma[c] * (x[c] * r);
    }
    return 0;
}

/* ds_dot8's order: lane j takes elements j, j+8, ... below n & ~7, the fixed tree, the tail. */
static float dot8(const float *a, const float *b, uint32_t n)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint32_t n8 = n & ~7u;
    for (uint32_t c = 0; c < n8; c += 8)
        for (int j = 0; j < 8; j++)
            acc[j] = fmaf(a[c + j], b[c + j], acc[j]);
    float s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for (uint32_t c = n8; c < n; c++)
        s = fmaf(a[c], b[c], s);
    return s;
}

static void row_f32(const cpu_weight *w, const ds_bk_weight_desc *d, uint32_t r, float *out)
{
    uint32_t nbc = d->dtype == DS_BK_F8_E4M3 ? (d->cols + d->block_cols - 1) / d->block_cols : 0;
    const float *srow =
        d->dtype == DS_BK_F8_E4M3 ? w->scale_inv + (size_t)(r / d->block_rows) * nbc : NULL;
    for (uint32_t c = 0; c < d->cols; c++)
        out[c] = w_at(w, d, srow, (size_t)r * d->cols, c);
}

static int cpu_mla_attn(void *impl, const ds_bk_mla_desc *m, void *qp, size_t q_off, void *wp,
                        const ds_bk_weight_desc *d, void *cp, uint32_t pos0, uint32_t n,
                        void *scratch, void *ap, size_t att_off, ds_error *err)
{
    const cpu_weight *w = wp;
    uint32_t H = m->heads, dn = m->nope, dr = m->rope, dv = m->v, C = m->C;
    size_t qw = (size_t)H * (dn + dr), kvw = (size_t)C + dr;
    const float *cache = cp;
    float *qlat = scratch, *olat = qlat + C, *p = olat + C; /* per (row, head), reused */
    float *wrow = malloc((size_t)C * sizeof(float));
    if (!wrow)
        return ds_error_set(err, -ENOMEM, "cpu: mla row");
    for (uint32_t i = 0; i < n; i++) {
        uint32_t T = pos0 + i + 1;
        for (uint32_t h = 0; h < H; h++) {
            const float *q = (const float *)qp + q_off + (size_t)i * qw + (size_t)h * (dn + dr);
            for (uint32_t c = 0; c < C; c++)
                qlat[c] = 0;
            for (uint32_t e = 0; e < dn; e++) {
                row_f32(w, d, h * (dn + dv) + e, wrow);
                for (uint32_t c = 0; c < C; c++)
                    qlat[c] = fmaf(q[e], wrow[c], qlat[c]);
            }
            float mx = -INFINITY;
            for (uint32_t t = 0; t < T; t++) {
                const float *ct = cache + (size_t)t * kvw;
                p[t] = (dot8(qlat, ct, C) + dot8(q + dn, ct + C, dr)) * m->scale;
                if (p[t] > mx)
                    mx = p[t];
            }
            float sum = 0;
            for (uint32_t t = 0; t < T; t++) {
                p[t] = ds_expf(p[t] - mx);
                sum += p[t];
            }
            for (uint32_t t = 0; t < T; t++)
                p[t] = p[t] / sum;
            for (uint32_t c = 0; c < C; c++)
                olat[c] = 0;
            for (uint32_t t = 0; t < T; t++)
                for (uint32_t c = 0; c < C; c++)
                    olat[c] = fmaf(p[t], cache[(size_t)t * kvw + c], olat[c]);
            float *att = (float *)ap + att_off + (size_t)i * H * dv + (size_t)h * dv;
            for (uint32_t j = 0; j < dv; j++) {
                row_f32(w, d, h * (dn + dv) + dn + j, wrow);
                att[j] = dot8(olat, wrow, C);
            }
        }
    }
    free(wrow);
    return 0;
}

/* Index of the largest v[i] with !taken[i] (lowest on ties, NaN skipped), or -1. */
static int argmax_free(const float *v, const float *taken, uint32_t n)
{
    int best = -1;
    for (uint32_t i = 0; i < n; i++) {
        if (taken[i] != 0 || isnan(v[i]))
            continue;
        if (best < 0 || v[i] > v[best])
            best = (int)i;
    }
    return best;
}

static int cpu_router(void *impl, const ds_bk_router_desc *r, void *lp, void *bp, uint32_t n,
                      void *sp, void *idp, void *wp, ds_error *err)
{
    uint32_t E = r->E, k = r->k, G = r->n_group;
    const float *bias = bp;
    for (uint32_t i = 0; i < n; i++) {
        const float *logits = (const float *)lp + (size_t)i * E;
        float *score = (float *)sp + (size_t)i * (3 * E + 2 * G), *choice = score + E;
        float *taken = choice + E, *gscore = taken + E, *gtaken = gscore + G;
        int32_t *ids = (int32_t *)idp + (size_t)i * k;
        float *weights = (float *)wp + (size_t)i * k;
        if (r->sigmoid) {
            for (uint32_t e = 0; e < E; e++)
                score[e] = 1.0f / (1.0f + ds_expf(-logits[e]));
        } else {
            float mx = -INFINITY, sum = 0;
            for (uint32_t e = 0; e < E; e++)
                mx = logits[e] > mx ? logits[e] : mx;
            for (uint32_t e = 0; e < E; e++) {
                score[e] = ds_expf(logits[e] - mx);
                sum += score[e];
            }
            for (uint32_t e = 0; e < E; e++)
                score[e] /= sum;
        }
        for (uint32_t e = 0; e < E; e++)
            choice[e] = bias ? score[e] + bias[e] : score[e];
        if (G > 1 && r->method != DS_BK_ROUTER_GREEDY) {
            uint32_t per = E / G;
            for (uint32_t g = 0; g < G; g++) {
                const float *v = choice + g * per;
                float a = -INFINITY, b = -INFINITY;
                for (uint32_t j = 0; j < per; j++) {
                    if (r->method == DS_BK_ROUTER_GROUP_TOP2SUM) {
                        if (v[j] > a) {
                            b = a;
                            a = v[j];
                        } else if (v[j] > b) {
                            b = v[j];
                        }
                    } else {
                        a = v[j] > a ? v[j] : a;
                    }
                }
                gscore[g] = r->method == DS_BK_ROUTER_GROUP_TOP2SUM ? a + b : a;
                gtaken[g] = 0;
            }
            for (uint32_t t = 0; t < r->topk_group; t++) {
                int g = argmax_free(gscore, gtaken, G);
                if (g >= 0)
                    gtaken[g] = 1;
            }
            for (uint32_t g = 0; g < G; g++)
                if (gtaken[g] == 0)
                    for (uint32_t j = 0; j < per; j++)
                        choice[g * per + j] = -INFINITY;
        }
        for (uint32_t e = 0; e < E; e++)
            taken[e] = 0;
        float sum = 0;
        for (uint32_t s = 0; s < k; s++) {
            int e = argmax_free(choice, taken, E);
            if (e < 0)
                for (e = 0; taken[e] != 0; e++)
                    ;
            taken[e] = 1;
            ids[s] = e;
            weights[s] = score[e];
            sum += score[e];
        }
        if (r->norm && k > 1) {
            float den = sum + 1e-20f;
            for (uint32_t s = 0; s < k; s++)
                weights[s] /= den;
        }
        for (uint32_t s = 0; s < k; s++)
            weights[s] *= r->scaling;
    }
    return 0;
}

static int cpu_gather_rows(void *impl, void *wp, const ds_bk_weight_desc *d, const int32_t *ids,
                           uint32_t n, void *yp, size_t y_off, ds_error *err)
{
    for (uint32_t i = 0; i < n; i++)
        row_f32(wp, d, (uint32_t)ids[i], (float *)yp + y_off + (size_t)i * d->cols);
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
    .rmsnorm_rows = cpu_rmsnorm_rows,
    .mla_attn = cpu_mla_attn,
    .router = cpu_router,
    .gather_rows = cpu_gather_rows,
};
