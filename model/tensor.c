/* tensor.c — element conversions and the one matmul kernel every linear layer uses.
 *
 * The kernel computes each output element as a dot product with 16 interleaved partial sums
 * (lane j accumulates elements j, j+16, j+32, ... with fmaf), then combines the lanes in a
 * fixed tree and adds the tail in order. The same order runs on every path: an AVX2+FMA kernel
 * chosen at run time and a portable one, so results are identical across machines (the product is
 * built with -ffp-contract=off so the compiler cannot fuse differently). Threads split output
 * rows of W; several input rows share one pass over W's row (weight streaming). BF16 rows are
 * widened in registers (no staging buffer). FP8 with AVX2 (block width a multiple of 16) is
 * dequantised in registers inside the same kernel, the block scale loaded once per block;
 * otherwise FP8 rows go through a row buffer filled one scale block at a time. Either way each
 * weight is the single product fp8 * scale, so the values and the order are those above. */
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "ds_pool.h"
#include "ds_tensor.h"

static float fp8_lut[256];
static void fp8_lut_init(void)
{
    for (int i = 0; i < 256; i++)
        fp8_lut[i] = ds_fp8_e4m3_to_f32((uint8_t)i);
}
static pthread_once_t fp8_once = PTHREAD_ONCE_INIT;

static bool force_portable;

static void fp8_dequant_portable(const uint8_t *p, uint32_t len, float scale, float *out)
{
    for (uint32_t c = 0; c < len; c++)
        out[c] = fp8_lut[p[c]] * scale;
}

#if defined(__x86_64__)
#include <immintrin.h>

/* 8 bytes -> 8 floats by bit arithmetic (exactly the LUT's values), times the scale: the same
 * products as the portable loop, so bit-identical. E4M3 s.eeee.mmm: normal (e > 0) is the f32
 * with exponent e - 7 + 127 = e + 120 and mantissa m << 20, i.e. ((v & 0x7f) << 20) + (120 << 23)
 * as integers; subnormal (e = 0) is m * 2^-9 (exact int -> float and power-of-two product);
 * 0x7f / 0xff are NaN (the LUT's +-NAN); the sign is or-ed in. No f32 denormal is ever an
 * operand: those cost a microcode assist per multiply on common x86 cores (measured 2x slower
 * here with the shorter "bits * 2^120" form), and a gather from the LUT is slower still. */
__attribute__((target("avx2,fma"))) static inline __m256 fp8x8(const uint8_t *p, __m256 s)
{
    const __m256 sub = _mm256_set1_ps(0x1p-9f);
    const __m256i m7f = _mm256_set1_epi32(0x7f), m78 = _mm256_set1_epi32(0x78);
    const __m256i m07 = _mm256_set1_epi32(7), m80 = _mm256_set1_epi32(0x80);
    const __m256i bias = _mm256_set1_epi32(120 << 23), qnan = _mm256_set1_epi32(0x7fc00000);
    const __m256i zero = _mm256_setzero_si256();
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i mag = _mm256_and_si256(v, m7f);
    __m256i sign = _mm256_slli_epi32(_mm256_and_si256(v, m80), 24);
    __m256 nrm = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(mag, 20), bias));
    __m256 den = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m07)), sub);
    __m256 is_den = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(v, m78), zero));
    __m256 is_nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, m7f));
    __m256 f = _mm256_blendv_ps(nrm, den, is_den);
    f = _mm256_blendv_ps(f, _mm256_castsi256_ps(qnan), is_nan);
    f = _mm256_or_ps(f, _mm256_castsi256_ps(sign));
    return _mm256_mul_ps(f, s);
}

__attribute__((target("avx2,fma"))) static void fp8_dequant_avx2(const uint8_t *p, uint32_t len,
                                                                 float scale, float *out)
{
    const __m256 s = _mm256_set1_ps(scale);
    uint32_t c = 0;
    for (; c + 8 <= len; c += 8)
        _mm256_storeu_ps(out + c, fp8x8(p + c, s));
    for (; c < len; c++)
        out[c] = fp8_lut[p[c]] * scale;
}
#endif

static bool use_avx2(void);

static void fp8_dequant(const uint8_t *p, uint32_t len, float scale, float *out)
{
#if defined(__x86_64__)
    if (use_avx2()) {
        fp8_dequant_avx2(p, len, scale, out);
        return;
    }
#endif
    fp8_dequant_portable(p, len, scale, out);
}

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
        uint32_t bc = w->block_cols, nbc = (w->cols + bc - 1) / bc;
        const float *srow = w->scale_inv + (size_t)(r / w->block_rows) * nbc;
        /* One column block (128) at a time with its scale hoisted: no division per element.
         * Each element is still the single product fp8 * scale, so the values are exact the
         * same as element-wise dequantisation. */
        for (uint32_t b = 0, c0 = 0; b < nbc; b++, c0 += bc) {
            uint32_t len = w->cols - c0 < bc ? w->cols - c0 : bc;
            fp8_dequant(p + c0, len, srow[b], out + c0);
        }
        break;
    }
    default:
        memset(out, 0, w->cols * sizeof(float));
    }
}

/* Up to DOT_ROWS input rows share one pass over a weight row. */
#define DOT_ROWS 4

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
/* FP8 source of the fused kernel: the row's bytes, its block scales and the block width (a
 * multiple of 16, so a 16-column step never straddles two scales). */
typedef struct fp8_row {
    const uint8_t *p;   /* [cols] E4M3 bytes, NULL when the row is not FP8 */
    const float *scale; /* [ceil(cols / bc)] scale_inv of this row's block row */
    uint32_t bc;        /* block_cols */
} fp8_row;

__attribute__((target("avx2,fma"))) static inline __m256 load8(const float *wr, const uint16_t *wb,
                                                               uint32_t c)
{
    if (wb)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(wb + c))), 16));
    return _mm256_loadu_ps(wr + c);
}

__attribute__((target("avx2,fma"))) static void dot_rows_avx2(const float *wr, const uint16_t *wb,
                                                              const fp8_row *f8, const float *x,
                                                              uint32_t cols, uint32_t nr,
                                                              float *out, size_t out_stride)
{
    __m256 sc = _mm256_setzero_ps();
    uint32_t next_block = 0, blk = 0;
    uint32_t c16 = cols & ~15u;
    __m256 lo[DOT_ROWS], hi[DOT_ROWS];
    for (uint32_t i = 0; i < DOT_ROWS; i++)
        lo[i] = hi[i] = _mm256_setzero_ps();
    for (uint32_t c = 0; c < c16; c += 16) {
        __m256 w0, w1;
        if (f8) {
            /* Dequantised in registers: the same products fp8 * scale as the row buffer. */
            if (c == next_block) {
                sc = _mm256_set1_ps(f8->scale[blk++]);
                next_block += f8->bc;
            }
            w0 = fp8x8(f8->p + c, sc);
            w1 = fp8x8(f8->p + c + 8, sc);
        } else {
            w0 = load8(wr, wb, c);
            w1 = load8(wr, wb, c + 8);
        }
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
        for (uint32_t c = c16; c < cols; c++) {
            float wv = f8   ? fp8_lut[f8->p[c]] * f8->scale[c / f8->bc]
                       : wb ? ds_bf16_to_f32(wb[c])
                            : wr[c];
            s = fmaf(wv, xi[c], s);
        }
        out[i * out_stride] = s;
    }
}
#endif

static bool use_avx2(void)
{
#if defined(__x86_64__)
    static int have = -1;
    if (have < 0)
        have = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return have && !force_portable;
#else
    return false;
#endif
}

static void dot_rows(const float *wr, const uint16_t *wb, const float *x, uint32_t cols,
                     uint32_t nr, float *out, size_t out_stride)
{
#if defined(__x86_64__)
    if (use_avx2()) {
        dot_rows_avx2(wr, wb, NULL, x, cols, nr, out, out_stride);
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
#if defined(__x86_64__)
    /* FP8 with AVX2: dequantised in registers inside the dot kernel (no row buffer). */
    if (w->dtype == DS_DTYPE_F8_E4M3 && w->block_cols >= 16 && w->block_cols % 16 == 0 &&
        use_avx2()) {
        uint32_t nbc = (w->cols + w->block_cols - 1) / w->block_cols;
        for (uint32_t r = r0; r < r1; r++) {
            fp8_row f = {(const uint8_t *)w->data + (size_t)r * w->cols,
                         w->scale_inv + (size_t)(r / w->block_rows) * nbc, w->block_cols};
            for (uint32_t i = 0; i < m->n; i += DOT_ROWS) {
                uint32_t nr = m->n - i < DOT_ROWS ? m->n - i : DOT_ROWS;
                dot_rows_avx2(NULL, NULL, &f, m->x + (size_t)i * w->cols, w->cols, nr,
                              m->y + (size_t)i * w->rows + r, w->rows);
            }
        }
        return;
    }
#endif
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
