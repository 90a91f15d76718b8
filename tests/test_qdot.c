/* test_qdot.c — the integer kernels of the ggml block types (model/qdot.c).
 *
 * Checked against things the kernels do not compute themselves:
 *   - the activation rounding rule: d = amax / 127 per block and |q * d - x| <= d / 2;
 *   - the value: a float64 sum over the reference dequantiser's weights (model/quant.c, bit-exact
 *     with gguf-py) times the quantised activations q * d, within float32 rounding of the
 *     per-block terms;
 *   - the invariant the cluster needs: the same bits for a row alone or in any batch, on 1 or 2
 *     threads, for any split of the output rows, with AVX-512BW, AVX2 or the portable reference;
 *   - DS_QDOT_DEQUANT: exactly the float path (dequantised rows, canonical order). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "ds_numeric.h"
#include "ds_pool.h"
#include "ds_quant.h"
#include "ds_tensor.h"

static uint64_t rng = 88172645463325252ull;
static uint32_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
static float rndf(void) /* [-1, 1) */
{
    return (float)(rnd() % 2000001) / 1000000.0f - 1.0f;
}

/* An f16 of a small positive scale (normal range), little-endian at p. */
static void put_f16_scale(uint8_t *p)
{
    /* exponent/mantissa picked directly: 2^e * (1 + m/1024) for e in [-12, -4] */
    uint16_t e = (uint16_t)(15 - 12 + rnd() % 9), m = (uint16_t)(rnd() % 1024);
    uint16_t h = (uint16_t)(e << 10 | m);
    p[0] = (uint8_t)h;
    p[1] = (uint8_t)(h >> 8);
}

static const struct qtype {
    enum ds_dtype dt;
    uint32_t qt, bv, bb;
    int scale_at[2]; /* byte offsets of the f16 scales (d, dmin) in a block; -1: none */
} qtypes[] = {
    {DS_DTYPE_Q8_0, DS_QUANT_Q8_0, 32, 34, {0, -1}},
    {DS_DTYPE_Q4_0, DS_QUANT_Q4_0, 32, 18, {0, -1}},
    {DS_DTYPE_Q5_0, DS_QUANT_Q5_0, 32, 22, {0, -1}},
    {DS_DTYPE_Q2_K, DS_QUANT_Q2_K, 256, 84, {80, 82}},
    {DS_DTYPE_Q3_K, DS_QUANT_Q3_K, 256, 110, {108, -1}},
    {DS_DTYPE_Q4_K, DS_QUANT_Q4_K, 256, 144, {0, 2}},
    {DS_DTYPE_Q5_K, DS_QUANT_Q5_K, 256, 176, {0, 2}},
    {DS_DTYPE_Q6_K, DS_QUANT_Q6_K, 256, 210, {208, -1}},
};

/* rows x cols random blocks of type t with sane scales. */
static uint8_t *random_weight(const struct qtype *t, uint32_t rows, uint32_t cols)
{
    size_t nb = (size_t)rows * cols / t->bv;
    uint8_t *w = malloc(nb * t->bb);
    assert_non_null(w);
    for (size_t i = 0; i < nb * t->bb; i++)
        w[i] = (uint8_t)rnd();
    for (size_t b = 0; b < nb; b++) {
        uint8_t *blk = w + b * t->bb;
        for (int k = 0; k < 2; k++)
            if (t->scale_at[k] >= 0)
                put_f16_scale(blk + t->scale_at[k]);
    }
    return w;
}

static float *random_x(uint32_t n, uint32_t cols)
{
    float *x = malloc((size_t)n * cols * sizeof(float));
    assert_non_null(x);
    for (size_t i = 0; i < (size_t)n * cols; i++)
        x[i] = rndf() * (i % 7 == 0 ? 8.0f : 1.0f); /* some outliers, as real activations */
    return x;
}

static void *qbuf(const ds_weight *w, uint32_t n)
{
    size_t b = ds_matmul_in_bytes(w, n);
    void *p = aligned_alloc(64, (b + 63) & ~(size_t)63);
    assert_non_null(p);
    return p;
}

/* d = amax / 127 and |q d - x| <= d / 2 for every value; the sums per 16 for Q8_K. */
static void test_activation_rounding(void **state)
{
    (void)state;
    for (size_t ti = 0; ti < sizeof(qtypes) / sizeof(qtypes[0]); ti++) {
        const struct qtype *t = &qtypes[ti];
        uint32_t n = 3, cols = 512, bl = t->bv;
        uint8_t *wb = random_weight(t, 4, cols);
        ds_weight w = {.dtype = t->dt, .rows = 4, .cols = cols, .data = wb};
        float *x = random_x(n, cols);
        for (uint32_t c = 0; c < bl; c++)
            x[c] = 0; /* an all-zero block: d = 0, q = 0 */
        void *buf = qbuf(&w, n);
        ds_matmul_in in;
        ds_matmul_in_prepare(&w, x, n, buf, &in);
        assert_int_equal(in.fmt, t->bv == 32 ? DS_QX_Q8_0 : DS_QX_Q8_K);
        for (uint32_t i = 0; i < n; i++)
            for (uint32_t b = 0; b < cols / bl; b++) {
                const float *xb = x + (size_t)i * cols + (size_t)b * bl;
                const int8_t *qb = in.q + (size_t)i * cols + (size_t)b * bl;
                float amax = 0;
                for (uint32_t c = 0; c < bl; c++)
                    amax = fmaxf(amax, fabsf(xb[c]));
                float d = in.d[(size_t)i * (cols / bl) + b];
                assert_true(d == amax / 127.0f);
                for (uint32_t c = 0; c < bl; c++) {
                    assert_true(qb[c] >= -127 && qb[c] <= 127);
                    assert_true(fabs((double)qb[c] * d - xb[c]) <= d * 0.5 * (1 + 1e-5) + 1e-30);
                }
            }
        for (size_t g = 0; g < (size_t)n * cols / 16; g++) {
            int s = 0;
            for (int k = 0; k < 16; k++)
                s += in.q[g * 16 + (size_t)k];
            assert_int_equal(in.bsum[g], s);
        }
        free(buf);
        free(x);
        free(wb);
    }
}

/* Rows that are not ordinary numbers: a NaN or an infinity poisons its block (scale NaN, so the
 * products are NaN, as the float path's would be); a subnormal block still rounds into
 * [-127, 127] (127 / amax overflows to infinity there) without a NaN quant. */
static void test_activation_edges(void **state)
{
    (void)state;
    uint8_t *wb = random_weight(&qtypes[0], 2, 64);
    ds_weight w = {.dtype = DS_DTYPE_Q8_0, .rows = 2, .cols = 64, .data = wb};
    float x[3 * 64];
    for (int i = 0; i < 3 * 64; i++)
        x[i] = 0.5f;
    x[5] = NAN;            /* row 0, block 0 */
    x[64 + 40] = INFINITY; /* row 1, block 1 */
    for (int i = 128; i < 192; i++)
        x[i] = (i & 1) ? 1e-45f : 0.0f; /* row 2: subnormal and zero values */
    void *buf = qbuf(&w, 3);
    ds_matmul_in in;
    ds_matmul_in_prepare(&w, x, 3, buf, &in);
    assert_true(isnan(in.d[0]) && in.d[1] == 0.5f / 127.0f);
    assert_true(in.d[2] == 0.5f / 127.0f && isnan(in.d[3]));
    for (int c = 0; c < 32; c++)
        assert_int_equal(in.q[c], 0);
    for (int c = 128; c < 192; c++)
        assert_true(in.q[c] == ((c & 1) ? 127 : 0));
    float y[6];
    ds_weight_matmul(&w, x, 3, y, NULL);
    assert_true(isnan(y[0]) && isnan(y[1]) && isnan(y[2]) && isnan(y[3]));
    assert_true(isfinite(y[4]) && isfinite(y[5]));
    free(buf);
    free(wb);
}

/* The value against float64 over the reference dequantiser: each block's term is a product of
 * a few float32 roundings, so the difference is bounded by a small multiple of eps times the
 * sum of |terms| (plus the fmaf chain's own rounding, of the same size). */
static void test_value_vs_dequantised(void **state)
{
    (void)state;
    for (size_t ti = 0; ti < sizeof(qtypes) / sizeof(qtypes[0]); ti++) {
        const struct qtype *t = &qtypes[ti];
        uint32_t rows = 37, cols = 768, n = 5;
        uint8_t *wb = random_weight(t, rows, cols);
        ds_weight w = {.dtype = t->dt, .rows = rows, .cols = cols, .data = wb};
        float *x = random_x(n, cols), *y = malloc((size_t)n * rows * sizeof(float));
        float *wr = malloc(cols * sizeof(float));
        void *buf = qbuf(&w, n);
        ds_matmul_in in;
        ds_matmul_in_prepare(&w, x, n, buf, &in);
        ds_weight_matmul(&w, x, n, y, NULL);
        uint64_t rbytes;
        assert_int_equal(ds_quant_row_bytes(t->qt, cols, &rbytes), 0);
        uint32_t bl = t->bv;
        double worst = 0;
        for (uint32_t r = 0; r < rows; r++) {
            assert_int_equal(ds_quant_dequant_row(t->qt, wb + (size_t)r * rbytes, cols, wr), 0);
            for (uint32_t i = 0; i < n; i++) {
                double s = 0, mag = 0;
                for (uint32_t c = 0; c < cols; c++) {
                    double xv =
                        (double)in.q[(size_t)i * cols + c] * in.d[(size_t)i * (cols / bl) + c / bl];
                    s += (double)wr[c] * xv;
                    mag += fabs((double)wr[c] * xv);
                }
                double diff = fabs(y[(size_t)i * rows + r] - s);
                if (diff > 1e-6 * mag + 1e-12)
                    fail_msg("%s row %u input %u: %.9g, float64 %.9g (sum |terms| %g)",
                             ds_quant_type_name(t->qt), r, i, y[(size_t)i * rows + r], s, mag);
                worst = fmax(worst, diff / (mag + 1e-30));
            }
        }
        print_message("%-5s worst |diff| / sum|terms| %.2e\n", ds_quant_type_name(t->qt), worst);
        free(buf);
        free(wr);
        free(y);
        free(x);
        free(wb);
    }
}

/* One row alone, in batches of 1..9, split over output ranges, on 1 and 2 threads, AVX2 and
 * portable: the same bits. */
static void test_invariance(void **state)
{
    (void)state;
    ds_pool *pool = NULL;
    assert_int_equal(ds_pool_new(2, NULL, 0, &pool), 0);
    for (size_t ti = 0; ti < sizeof(qtypes) / sizeof(qtypes[0]); ti++) {
        const struct qtype *t = &qtypes[ti];
        uint32_t rows = 101, cols = t->bv == 32 ? 544 : 512, N = 9; /* 17 blocks: an odd tail */
        uint8_t *wb = random_weight(t, rows, cols);
        ds_weight w = {.dtype = t->dt, .rows = rows, .cols = cols, .data = wb};
        float *x = random_x(N, cols);
        float *alone = malloc((size_t)N * rows * sizeof(float));
        float *y = malloc((size_t)N * rows * sizeof(float));
        for (uint32_t i = 0; i < N; i++)
            ds_weight_matmul(&w, x + (size_t)i * cols, 1, alone + (size_t)i * rows, NULL);
        /* 0: the widest the CPU has (AVX-512BW where present), 1: AVX2, 2: portable */
        for (int isa = 0; isa < 3; isa++) {
            ds_tensor_force_avx2(isa == 1);
            ds_tensor_force_portable(isa == 2);
            for (uint32_t n = 1; n <= N; n++) {
                for (int th = 0; th < 2; th++) {
                    memset(y, 0xff, (size_t)n * rows * sizeof(float));
                    ds_weight_matmul(&w, x, n, y, th ? pool : NULL);
                    assert_memory_equal(y, alone, (size_t)n * rows * sizeof(float));
                }
                /* odd row ranges through the rows API */
                memset(y, 0xff, (size_t)n * rows * sizeof(float));
                for (uint32_t r0 = 0; r0 < rows;) {
                    uint32_t r1 = r0 + 1 + rnd() % 17;
                    r1 = r1 > rows ? rows : r1;
                    ds_weight_matmul_rows(&w, x, n, y, r0, r1);
                    r0 = r1;
                }
                assert_memory_equal(y, alone, (size_t)n * rows * sizeof(float));
            }
        }
        ds_tensor_force_portable(false);
        ds_tensor_force_avx2(false);
        free(y);
        free(alone);
        free(x);
        free(wb);
    }
    ds_pool_free(pool);
}

/* DS_QDOT_DEQUANT is the float path: each output the canonical dot of the dequantised row
 * (16 lanes, fixed tree) — computed here from ds_quant_dequant_row. */
static void test_dequant_mode(void **state)
{
    (void)state;
    ds_tensor_set_qdot(DS_QDOT_DEQUANT);
    for (size_t ti = 0; ti < sizeof(qtypes) / sizeof(qtypes[0]); ti++) {
        const struct qtype *t = &qtypes[ti];
        uint32_t rows = 13, cols = 512, n = 3;
        uint8_t *wb = random_weight(t, rows, cols);
        ds_weight w = {.dtype = t->dt, .rows = rows, .cols = cols, .data = wb};
        assert_int_equal(ds_matmul_in_bytes(&w, n), 0);
        float *x = random_x(n, cols), *y = malloc((size_t)n * rows * sizeof(float));
        float *wr = malloc(cols * sizeof(float));
        ds_weight_matmul(&w, x, n, y, NULL);
        uint64_t rbytes;
        assert_int_equal(ds_quant_row_bytes(t->qt, cols, &rbytes), 0);
        for (uint32_t r = 0; r < rows; r++) {
            assert_int_equal(ds_quant_dequant_row(t->qt, wb + (size_t)r * rbytes, cols, wr), 0);
            for (uint32_t i = 0; i < n; i++) {
                float acc[16] = {0};
                for (uint32_t c = 0; c < cols; c++)
                    acc[c & 15] = fmaf(wr[c], x[(size_t)i * cols + c], acc[c & 15]);
                float a[8];
                for (int j = 0; j < 8; j++)
                    a[j] = acc[j] + acc[j + 8];
                float s = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
                assert_true(s == y[(size_t)i * rows + r]);
            }
        }
        free(wr);
        free(y);
        free(x);
        free(wb);
    }
    ds_tensor_set_qdot(DS_QDOT_INT8);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_activation_rounding),  cmocka_unit_test(test_activation_edges),
        cmocka_unit_test(test_value_vs_dequantised), cmocka_unit_test(test_invariance),
        cmocka_unit_test(test_dequant_mode),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
