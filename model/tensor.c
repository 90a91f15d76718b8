/* tensor.c — element conversions and the one matmul kernel every linear layer uses.
 *
 * The kernel computes each output element as a dot product with 16 interleaved partial sums
 * (lane j accumulates elements j, j+16, j+32, ... with fmaf), then combines the lanes in a
 * fixed tree and adds the tail in order. The same order runs on every path: an AVX2+FMA kernel
 * chosen at run time and a portable one, so results are identical across machines (the product is
 * built with -ffp-contract=off so the compiler cannot fuse differently). Threads split output
 * rows of W; several input rows share one pass over W's row (weight streaming). BF16 rows are
 * widened in registers (no staging buffer); FP8 rows are dequantised into a row buffer. */
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "ds_pool.h"
#include "ds_tensor.h"

float ds_bf16_to_f32(uint16_t v)
{
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t ds_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

float ds_f16_to_f32(uint16_t v)
{
    uint32_t s = (uint32_t)(v >> 15), e = (v >> 10) & 0x1f, m = v & 0x3ff;
    float f;
    if (e == 0)
        f = ldexpf((float)m, -24);
    else if (e == 31)
        f = m ? NAN : INFINITY;
    else
        f = ldexpf((float)(m | 0x400), (int)e - 25);
    return s ? -f : f;
}

float ds_fp8_e4m3_to_f32(uint8_t v)
{
    uint32_t s = v >> 7, e = (v >> 3) & 0xf, m = v & 7;
    float f;
    if (e == 15 && m == 7)
        f = NAN;
    else if (e == 0)
        f = ldexpf((float)m, -9);
    else
        f = ldexpf((float)(m | 8), (int)e - 10);
    return s ? -f : f;
}

static float fp8_lut[256];
static void fp8_lut_init(void)
{
    for (int i = 0; i < 256; i++)
        fp8_lut[i] = ds_fp8_e4m3_to_f32((uint8_t)i);
}
static pthread_once_t fp8_once = PTHREAD_ONCE_INIT;

void ds_weight_row_f32(const ds_weight *w, uint32_t r, float *out)
{
    size_t base = (size_t)r * w->cols;
    switch (w->dtype) {
    case DS_DTYPE_F32:
        memcpy(out, (const float *)w->data + base, w->cols * sizeof(float));
        break;
    case DS_DTYPE_BF16: {
        const uint16_t *p = (const uint16_t *)w->data + base;
        for (uint32_t c = 0; c < w->cols; c++)
            out[c] = ds_bf16_to_f32(p[c]);
        break;
    }
    case DS_DTYPE_F8_E4M3: {
        pthread_once(&fp8_once, fp8_lut_init);
        const uint8_t *p = (const uint8_t *)w->data + base;
        uint32_t nbc = (w->cols + w->block_cols - 1) / w->block_cols;
        const float *srow = w->scale_inv + (size_t)(r / w->block_rows) * nbc;
        for (uint32_t c = 0; c < w->cols; c++)
            out[c] = fp8_lut[p[c]] * srow[c / w->block_cols];
        break;
    }
    default:
        memset(out, 0, w->cols * sizeof(float));
    }
}

/* Up to DOT_ROWS input rows share one pass over a weight row. */
#define DOT_ROWS 4

static bool force_portable;

void ds_tensor_force_portable(bool on)
{
    force_portable = on;
}

/* The canonical order, shared by every path: 16 partial sums, lane j accumulating (fmaf) the
 * elements c = j mod 16 below cols rounded down to 16; then a[j] = acc[j] + acc[j + 8]; then
 * ((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7)); then the tail elements in order with fmaf. Two
 * independent 8-wide chains hide the FMA latency on one row. */
static inline float lane_sum(const float *acc16)
{
    float a[8];
    for (int j = 0; j < 8; j++)
        a[j] = acc16[j] + acc16[j + 8];
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* Portable path; wr is f32 (F32 weights or a dequantised row), or bf16 when wb != NULL. */
static void dot_rows_portable(const float *wr, const uint16_t *wb, const float *x, uint32_t cols,
                              uint32_t nr, float *out, size_t out_stride)
{
    uint32_t c16 = cols & ~15u;
    for (uint32_t i = 0; i < nr; i++) {
        const float *xi = x + (size_t)i * cols;
        float acc[16] = {0};
        for (uint32_t c = 0; c < c16; c++) {
            float w = wb ? ds_bf16_to_f32(wb[c]) : wr[c];
            acc[c & 15] = fmaf(w, xi[c], acc[c & 15]);
        }
        float s = lane_sum(acc);
        for (uint32_t c = c16; c < cols; c++)
            s = fmaf(wb ? ds_bf16_to_f32(wb[c]) : wr[c], xi[c], s);
        out[i * out_stride] = s;
    }
}

#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("avx2,fma"))) static inline __m256 load8(const float *wr, const uint16_t *wb,
                                                               uint32_t c)
{
    if (wb)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(wb + c))), 16));
    return _mm256_loadu_ps(wr + c);
}

__attribute__((target("avx2,fma"))) static void dot_rows_avx2(const float *wr, const uint16_t *wb,
                                                              const float *x, uint32_t cols,
                                                              uint32_t nr, float *out,
                                                              size_t out_stride)
{
    uint32_t c16 = cols & ~15u;
    __m256 lo[DOT_ROWS], hi[DOT_ROWS];
    for (uint32_t i = 0; i < DOT_ROWS; i++)
        lo[i] = hi[i] = _mm256_setzero_ps();
    for (uint32_t c = 0; c < c16; c += 16) {
        __m256 w0 = load8(wr, wb, c), w1 = load8(wr, wb, c + 8);
        switch (nr) {
        case 4:
            lo[3] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + 3 * (size_t)cols + c), lo[3]);
            hi[3] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 3 * (size_t)cols + c + 8), hi[3]);
            /* fall through */
        case 3:
            lo[2] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + 2 * (size_t)cols + c), lo[2]);
            hi[2] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 2 * (size_t)cols + c + 8), hi[2]);
            /* fall through */
        case 2:
            lo[1] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + (size_t)cols + c), lo[1]);
            hi[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + (size_t)cols + c + 8), hi[1]);
            /* fall through */
        default:
            lo[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + c), lo[0]);
            hi[0] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + c + 8), hi[0]);
        }
    }
    for (uint32_t i = 0; i < nr; i++) {
        float a[16];
        _mm256_storeu_ps(a, lo[i]);
        _mm256_storeu_ps(a + 8, hi[i]);
        float s = lane_sum(a);
        const float *xi = x + (size_t)i * cols;
        for (uint32_t c = c16; c < cols; c++)
            s = fmaf(wb ? ds_bf16_to_f32(wb[c]) : wr[c], xi[c], s);
        out[i * out_stride] = s;
    }
}
#endif

static void dot_rows(const float *wr, const uint16_t *wb, const float *x, uint32_t cols,
                     uint32_t nr, float *out, size_t out_stride)
{
#if defined(__x86_64__)
    static int have = -1;
    if (have < 0)
        have = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (have && !force_portable) {
        dot_rows_avx2(wr, wb, x, cols, nr, out, out_stride);
        return;
    }
#endif
    dot_rows_portable(wr, wb, x, cols, nr, out, out_stride);
}

typedef struct mm_ctx {
    const ds_weight *w;
    const float *x;
    uint32_t n;
    float *y;
    uint32_t rows_per_task;
} mm_ctx;

static void mm_task(void *arg, uint32_t t)
{
    mm_ctx *m = arg;
    const ds_weight *w = m->w;
    uint32_t r0 = t * m->rows_per_task;
    uint32_t r1 = r0 + m->rows_per_task < w->rows ? r0 + m->rows_per_task : w->rows;
    float *buf = NULL;
    if (w->dtype == DS_DTYPE_F8_E4M3) {
        buf = malloc(w->cols * sizeof(float));
        if (!buf)
            abort(); /* a few KB: failing here means the process is already lost */
    }
    for (uint32_t r = r0; r < r1; r++) {
        const float *wr = NULL;
        const uint16_t *wb = NULL;
        if (w->dtype == DS_DTYPE_F32)
            wr = (const float *)w->data + (size_t)r * w->cols;
        else if (w->dtype == DS_DTYPE_BF16)
            wb = (const uint16_t *)w->data + (size_t)r * w->cols;
        else {
            ds_weight_row_f32(w, r, buf);
            wr = buf;
        }
        for (uint32_t i = 0; i < m->n; i += DOT_ROWS) {
            uint32_t nr = m->n - i < DOT_ROWS ? m->n - i : DOT_ROWS;
            dot_rows(wr, wb, m->x + (size_t)i * w->cols, w->cols, nr,
                     m->y + (size_t)i * w->rows + r, w->rows);
        }
    }
    free(buf);
}

void ds_weight_matmul(const ds_weight *w, const float *x, uint32_t n, float *y, ds_pool *pool)
{
    if (n == 0 || w->rows == 0)
        return;
    if (w->dtype == DS_DTYPE_F8_E4M3)
        pthread_once(&fp8_once, fp8_lut_init);
    uint32_t threads = ds_pool_size(pool);
    uint32_t tasks = threads * 4;
    /* Enough rows per task to amortise the hand-out, small enough to balance. */
    uint32_t rpt = (w->rows + tasks - 1) / tasks;
    if (rpt < 16)
        rpt = 16;
    mm_ctx m = {w, x, n, y, rpt};
    ds_pool_run(pool, (w->rows + rpt - 1) / rpt, mm_task, &m);
}
