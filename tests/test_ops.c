/* test_ops.c — the one op suite every backend must pass: `test_ops SPEC` (cpu, opencl, cuda).
 *
 * References are independent of the backend under test: matmul against the engine's own
 * kernel (ds_weight_matmul, bit-exact for cpu/opencl; cuda's cuBLAS path within a tolerance)
 * and a float64 dot product; the other ops against float64 host formulas with per-op
 * tolerances, topk/add/scale/rope exactly. Shapes are random (odd sizes included) from a
 * seed printed at start (DS_TEST_SEED overrides it). A spec whose device is absent fails,
 * except cuda, which exits 77 (ctest: skipped) on a machine without a CUDA device. */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "ds_backend.h"
#include "ds_model.h"
#include "ds_tensor.h"

static const char *spec = "cpu";
static ds_backend *B;
static uint64_t rng_state;
static bool exact_matmul = true; /* false for cuda (cuBLAS order for batches) */

static uint32_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}

static float frnd(void) /* uniform in [-1, 1) */
{
    return (float)((double)(rnd() & 0xffffff) / (1 << 23) - 1.0);
}

static uint32_t pick(const uint32_t *v, size_t n)
{
    return v[rnd() % n];
}

static ds_bk_buf *up(const void *src, size_t bytes)
{
    ds_bk_buf *b = NULL;
    ds_error err = {0};
    int rc = ds_bk_buf_new(B, bytes, &b, &err);
    if (rc < 0)
        fail_msg("buf_new %zu: %s", bytes, ds_error_str(&err));
    if (src && (rc = ds_bk_buf_write(b, 0, src, bytes, &err)) < 0)
        fail_msg("buf_write: %s", ds_error_str(&err));
    return b;
}

static void down(ds_bk_buf *b, void *dst, size_t bytes)
{
    ds_error err = {0};
    if (ds_bk_buf_read(b, 0, dst, bytes, &err) < 0)
        fail_msg("buf_read: %s", ds_error_str(&err));
}

static bool close_to(double got, double want, double rel, double abs_)
{
    return fabs(got - want) <= abs_ + rel * fabs(want);
}

/* ---- matmul ---- */

static void check_matmul(enum ds_bk_dtype dt, uint32_t rows, uint32_t cols, uint32_t n, uint32_t br,
                         uint32_t bc)
{
    size_t el = dt == DS_BK_F32 ? 4 : dt == DS_BK_BF16 ? 2 : 1;
    uint8_t *data = malloc((size_t)rows * cols * el);
    uint32_t nbr = (rows + br - 1) / br, nbc = (cols + bc - 1) / bc;
    float *scale = malloc((size_t)nbr * nbc * sizeof(float));
    for (size_t i = 0; i < (size_t)rows * cols; i++) {
        if (dt == DS_BK_F32)
            ((float *)data)[i] = frnd();
        else if (dt == DS_BK_BF16)
            ((uint16_t *)data)[i] = ds_f32_to_bf16(frnd());
        else {
            uint8_t v = (uint8_t)rnd();
            data[i] = (v & 0x7f) == 0x7f ? 0x3f : v; /* no NaN */
        }
    }
    for (size_t i = 0; i < (size_t)nbr * nbc; i++)
        scale[i] = ldexpf(1.0f + (float)(rnd() % 64) / 64.0f, -(int)(rnd() % 8));
    uint32_t x_off = rnd() % 5, y_off = rnd() % 3;
    float *x = calloc((size_t)n * cols + x_off, sizeof(float));
    for (size_t i = 0; i < (size_t)n * cols; i++)
        x[x_off + i] = frnd();
    size_t ny = (size_t)n * rows + y_off;
    float *y = calloc(ny, sizeof(float)), *ref = calloc(ny, sizeof(float));

    enum ds_dtype mdt = dt == DS_BK_F32    ? DS_DTYPE_F32
                        : dt == DS_BK_BF16 ? DS_DTYPE_BF16
                                           : DS_DTYPE_F8_E4M3;
    ds_weight w = {mdt, rows, cols, data, dt == DS_BK_F8_E4M3 ? scale : NULL, br, bc};
    ds_weight_matmul(&w, x + x_off, n, ref + y_off, NULL);

    ds_bk_weight_desc d = {dt, rows, cols, data, dt == DS_BK_F8_E4M3 ? scale : NULL, br, bc};
    ds_bk_weight *bw = NULL;
    ds_error err = {0};
    if (ds_bk_weight_new(B, &d, &bw, &err) < 0)
        fail_msg("weight upload: %s", ds_error_str(&err));
    ds_bk_buf *bx = up(x, ((size_t)n * cols + x_off) * 4), *by = up(NULL, ny * 4);
    if (ds_bk_matmul(bw, bx, x_off, n, by, y_off, &err) < 0)
        fail_msg("matmul: %s", ds_error_str(&err));
    down(by, y, ny * 4);
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t r = 0; r < rows; r++) {
            size_t o = y_off + (size_t)i * rows + r;
            /* Independent check of the value: float64 dot product, bound by the sum of
             * |products| (float32 accumulation error). */
            double dot = 0, mag = 0;
            for (uint32_t c = 0; c < cols; c++) {
                float wv;
                size_t k = (size_t)r * cols + c;
                if (dt == DS_BK_F32)
                    wv = ((float *)data)[k];
                else if (dt == DS_BK_BF16)
                    wv = ds_bf16_to_f32(((uint16_t *)data)[k]);
                else
                    wv = ds_fp8_e4m3_to_f32(data[k]) * scale[(r / br) * nbc + c / bc];
                dot += (double)wv * x[x_off + (size_t)i * cols + c];
                mag += fabs((double)wv * x[x_off + (size_t)i * cols + c]);
            }
            /* Fixed-order float32 sums stay within 1e-6 of |terms| at these sizes; a library
             * GEMM (cuBLAS) gets the classic worst-case bound cols * 2^-23. */
            double tol = exact_matmul ? 1e-6 : 1e-6 + cols * 1.2e-7;
            if (!close_to(y[o], dot, 0, mag * tol + 1e-30))
                fail_msg("%s matmul dt %d [%u x %u] n %u: y[%u,%u] = %.9g, float64 %.9g", spec,
                         (int)dt, rows, cols, n, i, r, y[o], dot);
            if (exact_matmul && memcmp(&y[o], &ref[o], 4) != 0)
                fail_msg("%s matmul dt %d [%u x %u] n %u: y[%u,%u] = %.9g, engine %.9g (not "
                         "bit-identical)",
                         spec, (int)dt, rows, cols, n, i, r, y[o], ref[o]);
        }
    ds_bk_weight_free(bw);
    ds_bk_buf_free(bx);
    ds_bk_buf_free(by);
    free(data);
    free(scale);
    free(x);
    free(y);
    free(ref);
}

static void test_matmul(void **state)
{
    static const uint32_t R[] = {1, 3, 16, 17, 33, 64, 129, 300};
    static const uint32_t Cs[] = {1, 5, 15, 16, 17, 31, 128, 257, 1000};
    static const uint32_t N[] = {1, 1, 2, 3, 4, 5, 8, 9};
    for (int dt = 0; dt < 3; dt++)
        for (int t = 0; t < 14; t++) {
            uint32_t br = 128, bc = 128;
            if (dt == DS_BK_F8_E4M3 && t % 2) {
                br = 1 + rnd() % 40;
                bc = 1 + rnd() % 40;
            }
            check_matmul((enum ds_bk_dtype)dt, pick(R, 8), pick(Cs, 9), pick(N, 8), br, bc);
        }
    /* A model-sized expert projection (DeepSeek-V3 moe_intermediate x hidden, scaled down). */
    check_matmul(DS_BK_BF16, 256, 1024, 1, 128, 128);
    check_matmul(DS_BK_F8_E4M3, 384, 896, 4, 128, 128);
    /* Batches (prefill): cuda switches to cuBLAS from 16 rows; the others keep the order. */
    for (int dt = 0; dt < 3; dt++) {
        check_matmul((enum ds_bk_dtype)dt, 67, 300, 16, 128, 128);
        check_matmul((enum ds_bk_dtype)dt, 130, 129, 37, 128, 128);
    }
}

/* Exact mode (ds_backend_set_exact): batches too in the engine's order on every backend
 * (cuda: no cuBLAS), bit-identical to ds_weight_matmul. */
static void test_matmul_exact_mode(void **state)
{
    bool was = exact_matmul;
    ds_backend_set_exact(B, true);
    exact_matmul = true;
    for (int dt = 0; dt < 3; dt++) {
        check_matmul((enum ds_bk_dtype)dt, 67, 300, 16, 128, 128);
        check_matmul((enum ds_bk_dtype)dt, 130, 129, 37, 128, 128);
    }
    exact_matmul = was;
    ds_backend_set_exact(B, false);
}

/* ---- rmsnorm ---- */

static void test_rmsnorm(void **state)
{
    for (int t = 0; t < 8; t++) {
        uint32_t n = 1 + rnd() % 5, d = 1 + rnd() % 700;
        float eps = t % 2 ? 1e-6f : 1e-5f;
        float *x = malloc((size_t)n * d * 4), *g = malloc(d * 4), *y = malloc((size_t)n * d * 4);
        for (size_t i = 0; i < (size_t)n * d; i++)
            x[i] = frnd() * 3;
        for (uint32_t i = 0; i < d; i++)
            g[i] = frnd();
        ds_bk_buf *bx = up(x, (size_t)n * d * 4), *bg = up(g, d * 4);
        ds_error err = {0};
        /* in place: y == x */
        if (ds_bk_rmsnorm(bx, bg, n, d, eps, bx, &err) < 0)
            fail_msg("rmsnorm: %s", ds_error_str(&err));
        down(bx, y, (size_t)n * d * 4);
        for (uint32_t i = 0; i < n; i++) {
            double ss = 0;
            for (uint32_t c = 0; c < d; c++)
                ss += (double)x[i * d + c] * x[i * d + c];
            double r = 1.0 / sqrt(ss / d + eps);
            for (uint32_t c = 0; c < d; c++) {
                double want = g[c] * (x[i * d + c] * r);
                if (!close_to(y[i * d + c], want, 2e-6, 1e-7))
                    fail_msg("%s rmsnorm [%u, %u] at %u,%u: %.9g want %.9g", spec, n, d, i, c,
                             y[i * d + c], want);
            }
        }
        ds_bk_buf_free(bx);
        ds_bk_buf_free(bg);
        free(x);
        free(g);
        free(y);
    }
}

/* ---- rope (exact: the formula has no reduction) ---- */

static void test_rope(void **state)
{
    for (int t = 0; t < 6; t++) {
        uint32_t n = 1 + rnd() % 4, heads = 1 + rnd() % 5, dim = 2 * (1 + rnd() % 32);
        uint32_t off = rnd() % 9, stride = off + dim + rnd() % 7;
        size_t nx = (size_t)n * heads * stride;
        float *x = malloc(nx * 4), *y = malloc(nx * 4);
        float *cs = malloc((size_t)n * dim / 2 * 4), *sn = malloc((size_t)n * dim / 2 * 4);
        for (size_t i = 0; i < nx; i++)
            x[i] = frnd();
        for (size_t i = 0; i < (size_t)n * dim / 2; i++) {
            double a = frnd() * 10;
            cs[i] = (float)cos(a);
            sn[i] = (float)sin(a);
        }
        ds_bk_buf *bx = up(x, nx * 4), *bc = up(cs, (size_t)n * dim / 2 * 4),
                  *bs = up(sn, (size_t)n * dim / 2 * 4);
        ds_error err = {0};
        if (ds_bk_rope(bx, n, heads, stride, off, dim, bc, bs, &err) < 0)
            fail_msg("rope: %s", ds_error_str(&err));
        down(bx, y, nx * 4);
        for (size_t v = 0; v < (size_t)n * heads; v++)
            for (uint32_t k = 0; k < stride; k++) {
                size_t o = v * stride + k;
                float want = x[o];
                if (k >= off && k < off + dim) {
                    uint32_t p = (k - off) / 2;
                    size_t ci = (v / heads) * (dim / 2) + p;
                    float a = x[v * stride + off + 2 * p], b = x[v * stride + off + 2 * p + 1];
                    /* two products rounded, then the sum: what every backend must do */
                    volatile float p1, p2;
                    if ((k - off) % 2 == 0) {
                        p1 = a * cs[ci];
                        p2 = b * sn[ci];
                        want = p1 - p2;
                    } else {
                        p1 = a * sn[ci];
                        p2 = b * cs[ci];
                        want = p1 + p2;
                    }
                }
                if (memcmp(&y[o], &want, 4) != 0)
                    fail_msg("%s rope at %zu: %.9g want %.9g", spec, o, y[o], want);
            }
        ds_bk_buf_free(bx);
        ds_bk_buf_free(bc);
        ds_bk_buf_free(bs);
        free(x);
        free(y);
        free(cs);
        free(sn);
    }
}

/* ---- MLA decode attention ---- */

static void test_mla(void **state)
{
    for (int t = 0; t < 6; t++) {
        uint32_t H = 1 + rnd() % 6, C = 1 + rnd() % 80, R = rnd() % 20, T = 1 + rnd() % 70;
        float scale = 0.1f + (float)(rnd() % 100) / 100.0f;
        float *ql = malloc((size_t)H * C * 4), *qp = malloc((size_t)H * R * 4 + 4);
        float *cache = malloc((size_t)T * (C + R) * 4), *out = malloc((size_t)H * C * 4);
        for (size_t i = 0; i < (size_t)H * C; i++)
            ql[i] = frnd();
        for (size_t i = 0; i < (size_t)H * R; i++)
            qp[i] = frnd();
        for (size_t i = 0; i < (size_t)T * (C + R); i++)
            cache[i] = frnd();
        ds_bk_buf *bl = up(ql, (size_t)H * C * 4), *bp = up(qp, (size_t)H * R * 4 + 4),
                  *bc = up(cache, (size_t)T * (C + R) * 4), *bo = up(NULL, (size_t)H * C * 4);
        ds_error err = {0};
        if (ds_bk_mla_decode(bl, bp, bc, H, C, R, T, scale, bo, &err) < 0)
            fail_msg("mla: %s", ds_error_str(&err));
        down(bo, out, (size_t)H * C * 4);
        double *s = malloc(T * sizeof(double));
        for (uint32_t h = 0; h < H; h++) {
            double mx = -INFINITY, sum = 0;
            for (uint32_t j = 0; j < T; j++) {
                double a = 0;
                for (uint32_t c = 0; c < C; c++)
                    a += (double)ql[h * C + c] * cache[(size_t)j * (C + R) + c];
                for (uint32_t c = 0; c < R; c++)
                    a += (double)qp[h * R + c] * cache[(size_t)j * (C + R) + C + c];
                s[j] = a * scale;
                mx = fmax(mx, s[j]);
            }
            for (uint32_t j = 0; j < T; j++)
                sum += s[j] = exp(s[j] - mx);
            for (uint32_t c = 0; c < C; c++) {
                double o = 0;
                for (uint32_t j = 0; j < T; j++)
                    o += s[j] / sum * cache[(size_t)j * (C + R) + c];
                if (!close_to(out[h * C + c], o, 1e-4, 1e-5))
                    fail_msg("%s mla H%u C%u R%u T%u at %u,%u: %.9g want %.9g", spec, H, C, R, T, h,
                             c, out[h * C + c], o);
            }
        }
        free(s);
        ds_bk_buf_free(bl);
        ds_bk_buf_free(bp);
        ds_bk_buf_free(bc);
        ds_bk_buf_free(bo);
        free(ql);
        free(qp);
        free(cache);
        free(out);
    }
}

/* ---- swiglu, add, scale ---- */

static void test_elementwise(void **state)
{
    size_t n = 1 + rnd() % 5000;
    float *g = malloc(n * 4), *u = malloc(n * 4), *y = malloc(n * 4);
    for (size_t i = 0; i < n; i++) {
        g[i] = frnd() * 12;
        u[i] = frnd() * 2;
    }
    ds_bk_buf *bg = up(g, n * 4), *bu = up(u, n * 4);
    ds_error err = {0};
    assert_int_equal(ds_bk_swiglu(bg, bu, n, &err), 0);
    down(bg, y, n * 4);
    for (size_t i = 0; i < n; i++) {
        double want = g[i] / (1.0 + exp(-(double)g[i])) * u[i];
        if (!close_to(y[i], want, 1e-6, 1e-7))
            fail_msg("%s swiglu(%g, %g) = %.9g want %.9g", spec, g[i], u[i], y[i], want);
    }
    /* add and scale: one rounding each, exact */
    assert_int_equal(ds_bk_buf_write(bg, 0, g, n * 4, &err), 0);
    assert_int_equal(ds_bk_add(bg, bu, n, &err), 0);
    assert_int_equal(ds_bk_scale(bg, 0.37f, n, &err), 0);
    down(bg, y, n * 4);
    for (size_t i = 0; i < n; i++) {
        volatile float s = g[i] + u[i];
        float want = s * 0.37f;
        if (memcmp(&y[i], &want, 4))
            fail_msg("%s add/scale at %zu: %.9g want %.9g", spec, i, y[i], want);
    }
    /* device copy */
    assert_int_equal(ds_bk_copy(bg, 4, bu, 0, (n - 1) * 4, &err), 0);
    down(bg, y, n * 4);
    assert_memory_equal(y + 1, u, (n - 1) * 4);
    ds_bk_buf_free(bg);
    ds_bk_buf_free(bu);
    free(g);
    free(u);
    free(y);
}

/* ---- router top-k ---- */

static void test_topk(void **state)
{
    for (int t = 0; t < 6; t++) {
        uint32_t n = 1 + rnd() % 7, E = 1 + rnd() % 300, k = 1 + rnd() % (E < 8 ? E : 8);
        bool with_bias = t % 2;
        float *s = malloc((size_t)n * E * 4), *bias = malloc(E * 4);
        for (size_t i = 0; i < (size_t)n * E; i++)
            s[i] = (float)(rnd() % 50) / 50.0f; /* many ties */
        for (uint32_t e = 0; e < E; e++)
            bias[e] = (float)(rnd() % 4) / 100.0f;
        int32_t *ids = malloc((size_t)n * k * 4);
        float *w = malloc((size_t)n * k * 4);
        ds_bk_buf *bs = up(s, (size_t)n * E * 4), *bb = up(bias, E * 4),
                  *bi = up(NULL, (size_t)n * k * 4), *bw = up(NULL, (size_t)n * k * 4);
        ds_error err = {0};
        if (ds_bk_topk(bs, with_bias ? bb : NULL, n, E, k, bi, bw, &err) < 0)
            fail_msg("topk: %s", ds_error_str(&err));
        down(bi, ids, (size_t)n * k * 4);
        down(bw, w, (size_t)n * k * 4);
        for (uint32_t i = 0; i < n; i++) {
            /* Independent: sort all indices by (value desc, index asc) and take k. */
            for (uint32_t j = 0; j < k; j++) {
                int32_t id = ids[i * k + j];
                assert_true(id >= 0 && (uint32_t)id < E);
                volatile float vid = with_bias ? s[i * E + id] + bias[id] : s[i * E + id];
                uint32_t better = 0; /* experts ranking strictly before id */
                for (uint32_t e = 0; e < E; e++) {
                    volatile float v = with_bias ? s[i * E + e] + bias[e] : s[i * E + e];
                    better += v > vid || (v == vid && e < (uint32_t)id);
                }
                if (better != j)
                    fail_msg("%s topk row %u slot %u: id %d ranks %u", spec, i, j, id, better);
                assert_true(w[i * k + j] == s[i * E + id]);
            }
        }
        ds_bk_buf_free(bs);
        ds_bk_buf_free(bb);
        ds_bk_buf_free(bi);
        ds_bk_buf_free(bw);
        free(s);
        free(bias);
        free(ids);
        free(w);
    }
}

/* ---- the generic layer's checks ---- */

static void test_ranges(void **state)
{
    ds_error err = {0};
    uint16_t wdata[6 * 10] = {0};
    ds_bk_weight_desc d = {DS_BK_BF16, 6, 10, wdata, NULL, 0, 0};
    ds_bk_weight *w = NULL;
    assert_int_equal(ds_bk_weight_new(B, &d, &w, &err), 0);
    ds_bk_buf *x = up(NULL, 2 * 10 * 4), *y = up(NULL, 2 * 6 * 4);
    assert_int_equal(ds_bk_matmul(w, x, 0, 2, y, 0, &err), 0);
    assert_int_equal(ds_bk_matmul(w, x, 1, 2, y, 0, &err), -ERANGE); /* x too short */
    assert_int_equal(ds_bk_matmul(w, x, 0, 2, y, 1, &err), -ERANGE);
    assert_int_equal(ds_bk_matmul(w, x, 0, 3, y, 0, &err), -ERANGE);
    assert_int_equal(ds_bk_matmul(w, x, SIZE_MAX / 2, 1, y, 0, &err), -ERANGE);
    assert_int_equal(ds_bk_buf_write(x, 79, wdata, 2, &err), -ERANGE);
    assert_int_equal(ds_bk_topk(x, NULL, 1, 10, 11, y, y, &err), -ERANGE);
    assert_int_equal(ds_bk_rope(x, 1, 1, 10, 5, 6, y, y, &err), -ERANGE);
    d.dtype = DS_BK_F8_E4M3; /* no scales */
    ds_bk_weight *w2 = NULL;
    assert_int_equal(ds_bk_weight_new(B, &d, &w2, &err), -EINVAL);
    d.dtype = (enum ds_bk_dtype)7;
    assert_int_equal(ds_bk_weight_new(B, &d, &w2, &err), -EINVAL);
    d.dtype = DS_BK_F32;
    d.rows = 0;
    assert_int_equal(ds_bk_weight_new(B, &d, &w2, &err), -ERANGE);
    assert_null(w2);
    ds_backend *bad = NULL;
    assert_int_equal(ds_backend_open("vulkan", &bad, &err), -EINVAL);
    assert_int_equal(ds_backend_open("opencl:x", &bad, &err), -EINVAL);
    assert_int_equal(ds_backend_open("opencl:63", &bad, &err), -ENOENT);
    assert_null(bad);
    ds_bk_weight_free(w);
    ds_bk_buf_free(x);
    ds_bk_buf_free(y);
}

/* ---- OpenCL program cache: written, reused, and a corrupt entry rebuilt ---- */

#include <dirent.h>
#include <unistd.h>

static int count_bins(const char *dir, char *last, size_t len)
{
    DIR *d = opendir(dir);
    int n = 0;
    if (!d)
        return 0;
    for (struct dirent *e; (e = readdir(d));)
        if (strstr(e->d_name, ".clbin")) {
            n++;
            snprintf(last, len, "%s/%s", dir, e->d_name);
        }
    closedir(d);
    return n;
}

static void test_opencl_cache(void **state)
{
    if (strncmp(spec, "opencl", 6)) {
        skip();
        return;
    }
    char dir[] = "/tmp/ds_test_clcache_XXXXXX", bin[512];
    assert_non_null(mkdtemp(dir));
    setenv("DS_OPENCL_CACHE", dir, 1);
    ds_error err = {0};
    ds_backend *b = NULL;
    assert_int_equal(ds_backend_open(spec, &b, &err), 0);
    ds_backend_free(b);
    assert_int_equal(count_bins(dir, bin, sizeof(bin)), 1);
    /* Corrupt entry: ignored, rebuilt from source, and the backend still computes. */
    FILE *f = fopen(bin, "wb");
    assert_non_null(f);
    fputs("not a program binary", f);
    fclose(f);
    assert_int_equal(ds_backend_open(spec, &b, &err), 0);
    ds_backend *keep = B;
    B = b;
    check_matmul(DS_BK_BF16, 19, 37, 2, 128, 128);
    B = keep;
    ds_backend_free(b);
    assert_int_equal(count_bins(dir, bin, sizeof(bin)), 1);
    unlink(bin);
    rmdir(dir);
    unsetenv("DS_OPENCL_CACHE");
}

/* ---- ABI 2: the ops of whole units, bit-identical to the engine ----
 * References: the engine's own functions (ds_weight_row_f32, ds_weight_vecmat, ds_dot8_many,
 * ds_wsum, ds_weight_dot8_rows, ds_router_select, ds_expf) composed on the host as
 * model/forward.c composes them, compared with memcmp; and float64 formulas with a tolerance,
 * so a reference that drifted from the maths would be caught too. */

typedef struct rnd_weight {
    ds_bk_weight_desc d; /* what the backend gets */
    ds_weight w;         /* the same bytes as the engine reads them */
    void *data;
    float *scale;
} rnd_weight;

static void rnd_weight_make(rnd_weight *rw, enum ds_bk_dtype dt, uint32_t rows, uint32_t cols,
                            uint32_t br, uint32_t bc, float amp)
{
    size_t el = dt == DS_BK_F32 ? 4 : dt == DS_BK_BF16 ? 2 : 1;
    uint8_t *data = malloc((size_t)rows * cols * el);
    uint32_t nbr = (rows + br - 1) / br, nbc = (cols + bc - 1) / bc;
    float *scale = malloc((size_t)nbr * nbc * sizeof(float));
    for (size_t i = 0; i < (size_t)rows * cols; i++) {
        if (dt == DS_BK_F32)
            ((float *)data)[i] = frnd() * amp;
        else if (dt == DS_BK_BF16)
            ((uint16_t *)data)[i] = ds_f32_to_bf16(frnd() * amp);
        else {
            uint8_t v = (uint8_t)rnd();
            data[i] = (v & 0x7f) == 0x7f ? 0x3f : v;
        }
    }
    for (size_t i = 0; i < (size_t)nbr * nbc; i++)
        scale[i] = ldexpf(1.0f + (float)(rnd() % 64) / 64.0f, -(int)(rnd() % 4) - 6) * amp;
    bool f8 = dt == DS_BK_F8_E4M3;
    rw->d = (ds_bk_weight_desc){dt, rows, cols, data, f8 ? scale : NULL, f8 ? br : 0, f8 ? bc : 0};
    enum ds_dtype mdt = dt == DS_BK_F32    ? DS_DTYPE_F32
                        : dt == DS_BK_BF16 ? DS_DTYPE_BF16
                                           : DS_DTYPE_F8_E4M3;
    rw->w = (ds_weight){mdt, rows, cols, data, f8 ? scale : NULL, br, bc};
    rw->data = data;
    rw->scale = scale;
}

static void rnd_weight_clear(rnd_weight *rw)
{
    free(rw->data);
    free(rw->scale);
}

static ds_bk_weight *bk_weight(const rnd_weight *rw)
{
    ds_bk_weight *bw = NULL;
    ds_error err = {0};
    if (ds_bk_weight_new(B, &rw->d, &bw, &err) < 0)
        fail_msg("weight upload: %s", ds_error_str(&err));
    return bw;
}

static void check_bits(const float *got, const float *want, size_t n, const char *what)
{
    for (size_t i = 0; i < n; i++)
        if (memcmp(&got[i], &want[i], 4))
            fail_msg("%s %s at %zu: %.9g, the engine's %.9g", spec, what, i, got[i], want[i]);
}

static void test_expf(void **state)
{
    /* ds_expf against exp in double: within 2 ulp over its range, 0 below, inf above */
    for (int i = 0; i < 200000; i++) {
        float x = -87.0f + (float)(rnd() % 1750001) * 1e-4f;
        double want = exp((double)x);
        float got = ds_expf(x);
        if (fabs(got - want) > 2.5 * 1.1920929e-7 * want)
            fail_msg("ds_expf(%.9g) = %.9g, exp %.9g", x, got, want);
    }
    assert_true(ds_expf(-87.5f) == 0.0f && isinf(ds_expf(88.5f)) && isnan(ds_expf(NAN)));
    assert_true(ds_expf(0.0f) == 1.0f);
}

static void test_rmsnorm_rows(void **state)
{
    for (int t = 0; t < 6; t++) {
        uint32_t n = 1 + rnd() % 5, d = 1 + rnd() % 900, stride = d + rnd() % 7, off = rnd() % 5;
        double eps = t % 2 ? 1e-6 : 1e-5;
        size_t len = off + (size_t)n * stride;
        float *x = malloc(len * 4), *g = malloc(d * 4), *y = malloc(len * 4),
              *want = malloc(len * 4);
        for (size_t i = 0; i < len; i++)
            x[i] = frnd() * 3;
        for (uint32_t i = 0; i < d; i++)
            g[i] = frnd();
        memcpy(want, x, len * 4);
        /* model/forward.c's rmsnorm: double sum in order, (float)(1/sqrt(mean + eps)) */
        for (uint32_t i = 0; i < n; i++) {
            const float *xr = x + off + (size_t)i * stride;
            double ss = 0;
            for (uint32_t c = 0; c < d; c++)
                ss += (double)xr[c] * xr[c];
            float r = (float)(1.0 / sqrt(ss / d + eps));
            for (uint32_t c = 0; c < d; c++) {
                want[off + (size_t)i * stride + c] = g[c] * (xr[c] * r);
                if (!close_to(want[off + (size_t)i * stride + c],
                              g[c] * (xr[c] / sqrt(ss / d + eps)), 2e-6, 1e-7))
                    fail_msg("rmsnorm reference off");
            }
        }
        ds_bk_buf *bx = up(x, len * 4), *bg = up(g, d * 4);
        ds_error err = {0};
        int rc = ds_bk_rmsnorm_rows(bx, off, stride, bg, n, d, eps, bx, off, stride, &err);
        if (rc == -ENOTSUP) { /* an OpenCL device without fp64 */
            fprintf(stderr, "%s: rmsnorm_rows: %s\n", spec, ds_error_str(&err));
            skip();
        }
        if (rc < 0)
            fail_msg("rmsnorm_rows: %s", ds_error_str(&err));
        down(bx, y, len * 4);
        check_bits(y, want, len, "rmsnorm_rows (in place, strided)");
        ds_bk_buf_free(bx);
        ds_bk_buf_free(bg);
        free(x);
        free(g);
        free(y);
        free(want);
    }
}

/* model/forward.c's attn_task for rows pos0..pos0+n-1, with the engine's kernels. */
static void mla_reference(const ds_bk_mla_desc *m, const ds_weight *kvb, const float *q,
                          const float *cache, uint32_t pos0, uint32_t n, float *att)
{
    uint32_t H = m->heads, dn = m->nope, dr = m->rope, dv = m->v, C = m->C;
    size_t qw = (size_t)H * (dn + dr), kvw = (size_t)C + dr, T = pos0 + n;
    float *qlat = malloc(C * 4), *olat = malloc(C * 4), *p = malloc(T * 4), *pe = malloc(T * 4);
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t h = 0; h < H; h++) {
            const float *q0 = q + i * qw + (size_t)h * (dn + dr);
            uint32_t t = pos0 + i + 1;
            ds_weight_vecmat(kvb, h * (dn + dv), dn, q0, qw, 1, qlat, C);
            ds_dot8_many(qlat, cache, kvw, t, C, p);
            ds_dot8_many(q0 + dn, cache + C, kvw, t, dr, pe);
            float mx = -INFINITY;
            for (uint32_t s = 0; s < t; s++) {
                p[s] = (p[s] + pe[s]) * m->scale;
                if (p[s] > mx)
                    mx = p[s];
            }
            float sum = 0;
            for (uint32_t s = 0; s < t; s++) {
                p[s] = ds_expf(p[s] - mx);
                sum += p[s];
            }
            for (uint32_t s = 0; s < t; s++)
                p[s] = p[s] / sum;
            ds_wsum(p, cache, kvw, t, C, olat);
            ds_weight_dot8_rows(kvb, h * (dn + dv) + dn, dv, olat, C, 1,
                                att + (size_t)i * H * dv + (size_t)h * dv, (size_t)H * dv);
        }
    free(qlat);
    free(olat);
    free(p);
    free(pe);
}

/* The same in float64 straight from the formula (no order): the tolerance check. */
static double mla_f64(const ds_bk_mla_desc *m, const ds_weight *kvb, const float *q,
                      const float *cache, uint32_t pos, uint32_t h, uint32_t j)
{
    uint32_t dn = m->nope, dr = m->rope, dv = m->v, C = m->C;
    size_t kvw = (size_t)C + dr;
    float *row = malloc(C * 4);
    double *qlat = calloc(C, sizeof(double)), *s = malloc((pos + 1) * sizeof(double));
    for (uint32_t d = 0; d < dn; d++) {
        ds_weight_row_f32(kvb, h * (dn + dv) + d, row);
        for (uint32_t c = 0; c < C; c++)
            qlat[c] += (double)q[d] * row[c];
    }
    double mx = -INFINITY, sum = 0, out = 0;
    for (uint32_t t = 0; t <= pos; t++) {
        double a = 0;
        for (uint32_t c = 0; c < C; c++)
            a += qlat[c] * cache[t * kvw + c];
        for (uint32_t c = 0; c < dr; c++)
            a += (double)q[dn + c] * cache[t * kvw + C + c];
        s[t] = a * m->scale;
        mx = s[t] > mx ? s[t] : mx;
    }
    for (uint32_t t = 0; t <= pos; t++)
        sum += s[t] = exp(s[t] - mx);
    ds_weight_row_f32(kvb, h * (dn + dv) + dn + j, row);
    for (uint32_t c = 0; c < C; c++) {
        double o = 0;
        for (uint32_t t = 0; t <= pos; t++)
            o += s[t] / sum * cache[t * kvw + c];
        out += o * row[c];
    }
    free(row);
    free(qlat);
    free(s);
    return out;
}

static void test_mla_attn(void **state)
{
    static const enum ds_bk_dtype dts[] = {DS_BK_F32, DS_BK_BF16, DS_BK_F8_E4M3};
    for (int t = 0; t < 6; t++) {
        enum ds_bk_dtype dt = dts[t % 3];
        ds_bk_mla_desc m = {1 + rnd() % 4,  1 + rnd() % 24, 2 * (rnd() % 6),
                            1 + rnd() % 20, 1 + rnd() % 70, 0};
        if (t == 5) /* a wider latent, whole 8-lane blocks and 128 FP8 blocks */
            m = (ds_bk_mla_desc){3, 16, 8, 16, 256, 0};
        m.scale = 1.0f / sqrtf((float)(m.nope + m.rope));
        uint32_t pos0 = rnd() % 40, n = 1 + rnd() % 4;
        uint32_t bsz = t == 5 ? 128 : 1 + rnd() % 40;
        size_t qw = (size_t)m.heads * (m.nope + m.rope), kvw = (size_t)m.C + m.rope;
        size_t T = pos0 + n, nq = (size_t)n * qw, natt = (size_t)n * m.heads * m.v;
        rnd_weight kvb;
        rnd_weight_make(&kvb, dt, m.heads * (m.nope + m.v), m.C, bsz, bsz, 0.5f);
        float *q = malloc(nq * 4), *cache = malloc(T * kvw * 4), *att = malloc(natt * 4),
              *want = malloc(natt * 4);
        for (size_t i = 0; i < nq; i++)
            q[i] = frnd() * 2;
        for (size_t i = 0; i < T * kvw; i++)
            cache[i] = frnd();
        mla_reference(&m, &kvb.w, q, cache, pos0, n, want);
        for (uint32_t i = 0; i < n; i++)
            for (uint32_t h = 0; h < m.heads; h++)
                for (uint32_t j = 0; j < m.v; j++) {
                    double f = mla_f64(&m, &kvb.w, q + i * qw + (size_t)h * (m.nope + m.rope),
                                       cache, pos0 + i, h, j);
                    if (!close_to(want[(size_t)i * m.heads * m.v + h * m.v + j], f, 1e-3, 1e-4))
                        fail_msg("mla reference off at %u,%u,%u: %.9g vs %.9g", i, h, j,
                                 want[(size_t)i * m.heads * m.v + h * m.v + j], f);
                }
        uint32_t q_off = rnd() % 3, a_off = rnd() % 3;
        float *qq = calloc(nq + q_off, 4);
        memcpy(qq + q_off, q, nq * 4);
        ds_bk_weight *bw = bk_weight(&kvb);
        ds_bk_buf *bq = up(qq, (nq + q_off) * 4), *bc = up(cache, T * kvw * 4);
        ds_bk_buf *bs = up(NULL, ds_bk_mla_attn_scratch(&m, pos0, n) * 4);
        ds_bk_buf *ba = up(NULL, (natt + a_off) * 4);
        ds_error err = {0};
        if (ds_bk_mla_attn(&m, bq, q_off, bw, bc, pos0, n, bs, ba, a_off, &err) < 0)
            fail_msg("mla_attn: %s", ds_error_str(&err));
        float *got = malloc((natt + a_off) * 4);
        down(ba, got, (natt + a_off) * 4);
        char what[128];
        snprintf(what, sizeof(what), "mla_attn dtype %d H %u nope %u rope %u v %u C %u pos %u+%u",
                 dt, m.heads, m.nope, m.rope, m.v, m.C, pos0, n);
        check_bits(got + a_off, want, natt, what);
        /* a scratch too small, a cache too short: refused, not run */
        ds_bk_buf *small = up(NULL, 4);
        assert_int_equal(ds_bk_mla_attn(&m, bq, q_off, bw, bc, pos0, n, small, ba, a_off, &err),
                         -ERANGE);
        assert_int_equal(ds_bk_mla_attn(&m, bq, q_off, bw, bc, pos0 + 1, n, bs, ba, a_off, &err),
                         -ERANGE);
        ds_bk_buf_free(small);
        ds_bk_weight_free(bw);
        ds_bk_buf_free(bq);
        ds_bk_buf_free(bc);
        ds_bk_buf_free(bs);
        ds_bk_buf_free(ba);
        rnd_weight_clear(&kvb);
        free(q);
        free(qq);
        free(cache);
        free(att);
        free(want);
        free(got);
    }
}

static void test_router(void **state)
{
    static const struct {
        enum ds_scoring sf;
        enum ds_topk_method tm;
        uint32_t E, k, G, tg;
        bool norm, bias;
    } cases[] = {
        {DS_SCORING_SIGMOID, DS_TOPK_NOAUX_TC, 64, 6, 8, 3, true, true},
        {DS_SCORING_SIGMOID, DS_TOPK_NOAUX_TC, 256, 8, 8, 4, true, true},
        {DS_SCORING_SIGMOID, DS_TOPK_GREEDY, 24, 4, 1, 1, false, false},
        {DS_SCORING_SOFTMAX, DS_TOPK_GREEDY, 33, 5, 1, 1, false, false},
        {DS_SCORING_SOFTMAX, DS_TOPK_GROUP_LIMITED_GREEDY, 32, 4, 4, 2, true, false},
        {DS_SCORING_SIGMOID, DS_TOPK_NOAUX_TC, 16, 1, 4, 1, true, true},
    };
    for (size_t t = 0; t < sizeof(cases) / sizeof(cases[0]); t++) {
        ds_model_config c = {0};
        c.n_routed_experts = cases[t].E;
        c.num_experts_per_tok = cases[t].k;
        c.n_group = cases[t].G;
        c.topk_group = cases[t].tg;
        c.scoring_func = cases[t].sf;
        c.topk_method = cases[t].tm;
        c.norm_topk_prob = cases[t].norm;
        c.routed_scaling_factor = t % 2 ? 2.5 : 1.0;
        uint32_t n = 1 + rnd() % 6, E = c.n_routed_experts, k = c.num_experts_per_tok;
        float *lg = malloc((size_t)n * E * 4), *bias = malloc(E * 4);
        for (size_t i = 0; i < (size_t)n * E; i++)
            lg[i] = frnd() * 4;
        if (n > 1) /* ties: the lower index must win */
            lg[E] = lg[E + 1];
        for (uint32_t e = 0; e < E; e++)
            bias[e] = frnd() * 0.1f;
        int32_t *ids = malloc((size_t)n * k * 4), *want_ids = malloc((size_t)n * k * 4);
        float *w = malloc((size_t)n * k * 4), *want_w = malloc((size_t)n * k * 4);
        for (uint32_t i = 0; i < n; i++)
            ds_router_select(&c, lg + (size_t)i * E, cases[t].bias ? bias : NULL,
                             want_ids + (size_t)i * k, want_w + (size_t)i * k);
        ds_bk_router_desc r = {E,
                               k,
                               c.n_group,
                               c.topk_group,
                               c.scoring_func == DS_SCORING_SIGMOID,
                               c.topk_method == DS_TOPK_GREEDY     ? DS_BK_ROUTER_GREEDY
                               : c.topk_method == DS_TOPK_NOAUX_TC ? DS_BK_ROUTER_GROUP_TOP2SUM
                                                                   : DS_BK_ROUTER_GROUP_MAX,
                               c.norm_topk_prob,
                               (float)c.routed_scaling_factor};
        ds_bk_buf *bl = up(lg, (size_t)n * E * 4), *bb = cases[t].bias ? up(bias, E * 4) : NULL;
        ds_bk_buf *bs = up(NULL, ds_bk_router_scratch(&r, n) * 4);
        ds_bk_buf *bi = up(NULL, (size_t)n * k * 4), *bwt = up(NULL, (size_t)n * k * 4);
        ds_error err = {0};
        if (ds_bk_router(&r, bl, bb, n, bs, bi, bwt, &err) < 0)
            fail_msg("router: %s", ds_error_str(&err));
        down(bi, ids, (size_t)n * k * 4);
        down(bwt, w, (size_t)n * k * 4);
        for (size_t i = 0; i < (size_t)n * k; i++)
            if (ids[i] != want_ids[i])
                fail_msg("%s router case %zu slot %zu: expert %d, the engine's %d", spec, t, i,
                         ids[i], want_ids[i]);
        check_bits(w, want_w, (size_t)n * k, "router weights");
        ds_bk_buf_free(bl);
        ds_bk_buf_free(bb);
        ds_bk_buf_free(bs);
        ds_bk_buf_free(bi);
        ds_bk_buf_free(bwt);
        free(lg);
        free(bias);
        free(ids);
        free(want_ids);
        free(w);
        free(want_w);
    }
}

static void test_gather_swiglu_exact(void **state)
{
    static const enum ds_bk_dtype dts[] = {DS_BK_F32, DS_BK_BF16, DS_BK_F8_E4M3};
    for (int t = 0; t < 3; t++) {
        rnd_weight rw;
        uint32_t rows = 5 + rnd() % 60, cols = 1 + rnd() % 300, n = 1 + rnd() % 7;
        rnd_weight_make(&rw, dts[t], rows, cols, 1 + rnd() % 40, 1 + rnd() % 40, 1.0f);
        int32_t *ids = malloc(n * 4);
        for (uint32_t i = 0; i < n; i++)
            ids[i] = (int32_t)(rnd() % rows);
        float *want = malloc((size_t)n * cols * 4), *got = malloc(((size_t)n * cols + 2) * 4);
        for (uint32_t i = 0; i < n; i++)
            ds_weight_row_f32(&rw.w, (uint32_t)ids[i], want + (size_t)i * cols);
        ds_bk_weight *bw = bk_weight(&rw);
        ds_bk_buf *by = up(NULL, ((size_t)n * cols + 2) * 4);
        ds_error err = {0};
        if (ds_bk_gather_rows(bw, ids, n, by, 2, &err) < 0)
            fail_msg("gather_rows: %s", ds_error_str(&err));
        down(by, got, ((size_t)n * cols + 2) * 4);
        check_bits(got + 2, want, (size_t)n * cols, "gather_rows");
        int32_t bad[2] = {0, (int32_t)rows};
        assert_int_equal(ds_bk_gather_rows(bw, bad, 2, by, 0, &err), -ERANGE);
        bad[1] = -1;
        assert_int_equal(ds_bk_gather_rows(bw, bad, 2, by, 0, &err), -ERANGE);
        ds_bk_weight_free(bw);
        ds_bk_buf_free(by);
        rnd_weight_clear(&rw);
        free(ids);
        free(want);
        free(got);
    }
    /* swiglu: the engine's silu(g) * u bit for bit (ds_expf, a correctly rounded division),
     * including both ends of ds_expf's range */
    size_t n = 4000;
    float *g = malloc(n * 4), *u = malloc(n * 4), *y = malloc(n * 4), *want = malloc(n * 4);
    for (size_t i = 0; i < n; i++) {
        g[i] = i < 8 ? (float)((int)i - 4) * 30.0f : frnd() * 12;
        u[i] = frnd() * 2;
        want[i] = g[i] / (1.0f + ds_expf(-g[i])) * u[i];
    }
    ds_bk_buf *bg = up(g, n * 4), *bu = up(u, n * 4);
    ds_error err = {0};
    assert_int_equal(ds_bk_swiglu(bg, bu, n, &err), 0);
    down(bg, y, n * 4);
    check_bits(y, want, n, "swiglu");
    ds_bk_buf_free(bg);
    ds_bk_buf_free(bu);
    free(g);
    free(u);
    free(y);
    free(want);
}

int main(int argc, char **argv)
{
    if (argc > 1)
        spec = argv[1];
    const char *seed = getenv("DS_TEST_SEED");
    rng_state = seed ? strtoull(seed, NULL, 0) : 0x9e3779b97f4a7c15ull;
    if (!rng_state)
        rng_state = 1;
    fprintf(stderr, "test_ops %s: seed 0x%llx\n", spec, (unsigned long long)rng_state);
    ds_error err = {0};
    int rc = ds_backend_open(spec, &B, &err);
    if (rc < 0) {
        fprintf(stderr, "test_ops: %s: %s\n", spec, ds_error_str(&err));
        return !strncmp(spec, "cuda", 4) && rc == -ENOENT ? 77 : 1;
    }
    fprintf(stderr, "test_ops: %s device '%s'\n", spec, ds_backend_device(B));
    exact_matmul = strncmp(spec, "cuda", 4) != 0;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_mla),
        cmocka_unit_test(test_elementwise),
        cmocka_unit_test(test_topk),
        cmocka_unit_test(test_ranges),
        cmocka_unit_test(test_opencl_cache),
        cmocka_unit_test(test_expf),
        cmocka_unit_test(test_rmsnorm_rows),
        cmocka_unit_test(test_mla_attn),
        cmocka_unit_test(test_router),
        cmocka_unit_test(test_gather_swiglu_exact),
        cmocka_unit_test(test_matmul_exact_mode),
    };
    rc = cmocka_run_group_tests_name(spec, tests, NULL, NULL);
    ds_backend_free(B);
    return rc;
}
