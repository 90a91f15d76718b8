/* test_ops.c — the one op suite every backend must pass: `test_ops SPEC` (cpu, opencl, cuda).
 *
 * References are independent of the backend under test: matmul against the engine's own
 * kernel (ds_weight_matmul, bit-exact for cpu/opencl; cuda's cuBLAS path within a tolerance)
 * and a float64 dot product; the other ops against float64 host formulas with per-op
 * tolerances, topk/add/scale/rope exactly. Shapes are random (odd sizes included) from a
 * seed printed at start (DS_TEST_SEED overrides it). A spec whose device is absent fails,
 * except cuda, which exits 77 (ctest: skipped) on a machine without a CUDA device. */
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
        cmocka_unit_test(test_matmul),      cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_rope),        cmocka_unit_test(test_mla),
        cmocka_unit_test(test_elementwise), cmocka_unit_test(test_topk),
        cmocka_unit_test(test_ranges),      cmocka_unit_test(test_opencl_cache),
    };
    rc = cmocka_run_group_tests_name(spec, tests, NULL, NULL);
    ds_backend_free(B);
    return rc;
}
