/* tensor.c — element conversions and the matmul kernels every linear layer uses.
 *
 * Every output element is one dot product in the canonical order: 16 interleaved partial sums
 * (lane j accumulates elements j, j+16, j+32, ... with fmaf), combined a_j = acc_j + acc_{j+8},
 * then ((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7)), then the tail elements in order with fmaf. Each lane
 * is its own chain, so the kernels may interleave lanes, rows and weight rows any way they like
 * and still give the same bits; they only never split or reorder one lane's chain. Three
 * kernels run that order:
 *   - the decode tile (n = 1 or 2 input rows): weight rows widened in registers straight from
 *     the mapping (BF16 shift, F16 vcvtph2ps, FP8 bit arithmetic times the block scale, Q8_0
 *     q * d), one row at a time for one input row (one sequential stream, prefetched ahead),
 *     3 at a time for two;
 *   - the GEMM tile (n >= 3, prefill): 3 weight rows are widened once into a per-thread f32
 *     scratch and reused by every pair of input rows of a cache-sized block of X, a 3 x 2
 *     register tile (12 accumulators) per step;
 *   - the portable kernel (no AVX2, or forced by tests): the reference, element by element.
 * Threads split output rows of W, never a sum, so the value of an element does not depend on n,
 * the other rows, the thread count or the ISA. The library is built with -ffp-contract=off so
 * the compiler cannot fuse differently between paths.
 *
 * ggml block dtypes (DS_DTYPE_Q*, from GGUF files) have no kernel of their own yet: each row is
 * dequantised by the reference dequantiser (model/quant.c) into a per-thread f32 row and goes
 * through the F32 paths, in the same canonical order (the fallback, not the fast path). */
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ds_pool.h"
#include "ds_quant.h"
#include "ds_tensor.h"
#include "gemm512.h"
#include "qdot.h"

static float fp8_lut[256];
static void fp8_lut_init(void)
{
    for (int i = 0; i < 256; i++)
        fp8_lut[i] = ds_fp8_e4m3_to_f32((uint8_t)i);
}
static pthread_once_t fp8_once = PTHREAD_ONCE_INIT;

static bool force_portable;

/* ---- per-thread scratch (widened weight rows) ----
 * Grown to the largest size a thread has needed and kept, so the hot path allocates nothing
 * once warm; freed by the key's destructor when a pool thread exits. */
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

#define SCRATCH_SLOTS 3

typedef struct scratch {
    size_t cap[SCRATCH_SLOTS]; /* floats */
    float *p[SCRATCH_SLOTS];
} scratch;

static void scratch_free(void *v)
{
    scratch *s = v;
    if (s) {
        for (int i = 0; i < SCRATCH_SLOTS; i++)
            free(s->p[i]);
        free(s);
    }
}

static void scratch_key_init(void)
{
    (void)pthread_key_create(&scratch_key, scratch_free);
}

float *ds_thread_scratch(unsigned slot, size_t n)
{
    pthread_once(&scratch_once, scratch_key_init);
    scratch *s = pthread_getspecific(scratch_key);
    if (!s) {
        s = calloc(1, sizeof(*s));
        if (!s || pthread_setspecific(scratch_key, s)) {
            free(s);
            return NULL;
        }
    }
    slot %= SCRATCH_SLOTS;
    if (s->cap[slot] < n) {
        free(s->p[slot]);
        size_t cap = n < 4096 ? 4096 : n;
        if (cap > SIZE_MAX / sizeof(float) ||
            posix_memalign((void **)&s->p[slot], 64, cap * sizeof(float))) {
            s->p[slot] = NULL;
            s->cap[slot] = 0;
            return NULL;
        }
        s->cap[slot] = cap;
    }
    return s->p[slot];
}

/* Slot 0 belongs to the kernels of this file (never held across a call into another). Their
 * buffers are a few weight rows (at most 3 rows and a tile state, ~100 KB for V3): a process
 * that cannot get that much has lost its memory, and the kernels have no error path. */
static float *scratch_get(size_t n)
{
    float *p = ds_thread_scratch(0, n);
    if (!p)
        abort();
    return p;
}

static inline size_t dtype_bytes(enum ds_dtype dt)
{
    return dt == DS_DTYPE_F32 ? 4 : dt == DS_DTYPE_F8_E4M3 ? 1 : 2;
}

static const struct {
    enum ds_dtype dt;
    uint32_t quant;
} quant_dtypes[] = {
    {DS_DTYPE_Q4_0, DS_QUANT_Q4_0}, {DS_DTYPE_Q4_1, DS_QUANT_Q4_1}, {DS_DTYPE_Q5_0, DS_QUANT_Q5_0},
    {DS_DTYPE_Q5_1, DS_QUANT_Q5_1}, {DS_DTYPE_Q8_0, DS_QUANT_Q8_0}, {DS_DTYPE_Q2_K, DS_QUANT_Q2_K},
    {DS_DTYPE_Q3_K, DS_QUANT_Q3_K}, {DS_DTYPE_Q4_K, DS_QUANT_Q4_K}, {DS_DTYPE_Q5_K, DS_QUANT_Q5_K},
    {DS_DTYPE_Q6_K, DS_QUANT_Q6_K},
};

int ds_dtype_quant_type(enum ds_dtype dt)
{
    for (size_t i = 0; i < sizeof(quant_dtypes) / sizeof(quant_dtypes[0]); i++)
        if (quant_dtypes[i].dt == dt)
            return (int)quant_dtypes[i].quant;
    return -1;
}

int ds_dtype_from_quant_type(uint32_t type)
{
    switch (type) {
    case DS_QUANT_F32:
        return DS_DTYPE_F32;
    case DS_QUANT_F16:
        return DS_DTYPE_F16;
    case DS_QUANT_BF16:
        return DS_DTYPE_BF16;
    default:
        for (size_t i = 0; i < sizeof(quant_dtypes) / sizeof(quant_dtypes[0]); i++)
            if (quant_dtypes[i].quant == type)
                return (int)quant_dtypes[i].dt;
        return -1;
    }
}

static inline bool dtype_is_quant(enum ds_dtype dt)
{
    return dt >= DS_DTYPE_Q4_0;
}

/* Row r of a block-quantised weight, dequantised (rows are packed blocks, row_bytes apart). */
static void quant_row_f32(const ds_weight *w, uint32_t r, float *out)
{
    uint32_t qt = (uint32_t)ds_dtype_quant_type(w->dtype);
    uint64_t rb = 0;
    if (ds_quant_row_bytes(qt, w->cols, &rb) < 0 ||
        ds_quant_dequant_row(qt, (const uint8_t *)w->data + (size_t)r * rb, w->cols, out) < 0)
        memset(out, 0, w->cols * sizeof(float)); /* the loader checked the geometry */
}

static void fp8_dequant_portable(const uint8_t *p, uint32_t len, float scale, float *out)
{
    for (uint32_t c = 0; c < len; c++)
        out[c] = fp8_lut[p[c]] * scale;
}

#if defined(__x86_64__)
#include <immintrin.h>

#define KTARGET __attribute__((target("avx2,fma,f16c")))
#define KINLINE __attribute__((always_inline)) inline

/* 8 bytes -> 8 floats by bit arithmetic (exactly the LUT's values), times the scale: the same
 * products as the portable loop, so bit-identical. E4M3 s.eeee.mmm: normal (e > 0) is the f32
 * with exponent e - 7 + 127 = e + 120 and mantissa m << 20, i.e. ((v & 0x7f) << 20) + (120 << 23)
 * as integers; subnormal (e = 0) is m * 2^-9 (exact int -> float and power-of-two product);
 * 0x7f / 0xff are NaN (the LUT's +-NAN); the sign is or-ed in. No f32 denormal is ever an
 * operand: those cost a microcode assist per multiply on common x86 cores (measured 2x slower
 * here with the shorter "bits * 2^120" form), and a gather from the LUT is slower still. */
KTARGET static KINLINE __m256 fp8x8(const uint8_t *p, __m256 s)
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

KTARGET static void fp8_dequant_avx2(const uint8_t *p, uint32_t len, float scale, float *out)
{
    const __m256 s = _mm256_set1_ps(scale);
    uint32_t c = 0;
    for (; c + 8 <= len; c += 8)
        _mm256_storeu_ps(out + c, fp8x8(p + c, s));
    for (; c < len; c++)
        out[c] = fp8_lut[p[c]] * scale;
}

/* 8 weights of a row from column c, widened to f32; kind is a constant at every call. */
KTARGET static KINLINE __m256 widen8(enum ds_dtype kind, const void *row, uint32_t c, __m256 sc)
{
    switch (kind) {
    case DS_DTYPE_F32:
        return _mm256_loadu_ps((const float *)row + c);
    case DS_DTYPE_BF16:
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + c))),
            16));
    case DS_DTYPE_F16:
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + c)));
    case DS_DTYPE_Q8_0: {
        /* block_q8_0 {f16 d; i8 q[32]}: q * d, d (the block's scale) in sc */
        const uint8_t *q = (const uint8_t *)row + (size_t)(c >> 5) * 34 + 2 + (c & 31);
        return _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q))), sc);
    }
    default:
        return fp8x8((const uint8_t *)row + c, sc);
    }
}

/* The canonical combine of 16 lanes (lo = lanes 0-7, hi = 8-15): a = lo + hi, then
 * ((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7)). */
KTARGET static KINLINE float hsum16(__m256 lo, __m256 hi)
{
    __m256 a = _mm256_add_ps(lo, hi);
    __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 a2 = _mm_add_ps(a4, _mm_movehl_ps(a4, a4));
    return _mm_cvtss_f32(_mm_add_ss(a2, _mm_movehdup_ps(a2)));
}

KTARGET static KINLINE float fma1(float a, float b, float c)
{
    return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
}
#endif

static bool use_avx2(void)
{
#if defined(__x86_64__)
    static int have = -1;
    if (have < 0)
        have = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    return have && !force_portable;
#else
    return false;
#endif
}

bool ds_tensor_use_avx2(void)
{
    return use_avx2();
}

/* AVX-512 for the prefill GEMM tile (gemm512.c) where the CPU has it; tests and
 * DS_NO_AVX512=1 can keep the AVX2 tile (the same bits). */
static bool force_avx2;

static bool use_avx512(void)
{
    static int env = -1;
    if (env < 0) {
        const char *e = getenv("DS_NO_AVX512");
        env = e && *e && strcmp(e, "0") != 0;
    }
    return use_avx2() && !force_avx2 && !env && ds_gemm512_supported();
}

void ds_tensor_force_avx2(bool on)
{
    force_avx2 = on;
}

bool ds_tensor_use_avx512(void)
{
    return use_avx512();
}

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

static void row_f32_portable(const ds_weight *w, uint32_t r, float *out)
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
    case DS_DTYPE_F16: {
        const uint16_t *p = (const uint16_t *)w->data + base;
        for (uint32_t c = 0; c < w->cols; c++)
            out[c] = ds_f16_to_f32(p[c]);
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
        if (dtype_is_quant(w->dtype))
            quant_row_f32(w, r, out);
        else
            memset(out, 0, w->cols * sizeof(float));
    }
}

#if defined(__x86_64__)
KTARGET static void widen_rows(const ds_weight *w, uint32_t r, uint32_t mr, float *dst);
#endif

void ds_weight_row_f32(const ds_weight *w, uint32_t r, float *out)
{
#if defined(__x86_64__)
    if (use_avx2() && (w->dtype == DS_DTYPE_BF16 || w->dtype == DS_DTYPE_F16)) {
        widen_rows(w, r, 1, out);
        return;
    }
#endif
    row_f32_portable(w, r, out);
}

void ds_tensor_force_portable(bool on)
{
    force_portable = on;
}

/* ---- the portable kernel (reference) ---- */

static inline float lane_sum(const float *acc16)
{
    float a[8];
    for (int j = 0; j < 8; j++)
        a[j] = acc16[j] + acc16[j + 8];
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* Rows [r0, r1) of y = W x for n input rows, element by element (FP8 through a row buffer). */
static void mm_rows_portable(const ds_weight *w, const float *x, uint32_t n, float *y, uint32_t r0,
                             uint32_t r1)
{
    uint32_t cols = w->cols, c16 = cols & ~15u;
    float *buf = NULL;
    if (w->dtype != DS_DTYPE_F32)
        buf = scratch_get(cols);
    for (uint32_t r = r0; r < r1; r++) {
        const float *wr;
        if (w->dtype == DS_DTYPE_F32) {
            wr = (const float *)w->data + (size_t)r * cols;
        } else {
            ds_weight_row_f32(w, r, buf); /* exact widening: the same values as in registers */
            wr = buf;
        }
        for (uint32_t i = 0; i < n; i++) {
            const float *xi = x + (size_t)i * cols;
            float acc[16] = {0};
            for (uint32_t c = 0; c < c16; c++)
                acc[c & 15] = fmaf(wr[c], xi[c], acc[c & 15]);
            float s = lane_sum(acc);
            for (uint32_t c = c16; c < cols; c++)
                s = fmaf(wr[c], xi[c], s);
            y[(size_t)i * w->rows + r] = s;
        }
    }
}

#if defined(__x86_64__)
/* ---- the AVX2 kernels ---- */

/* Where one weight row's bytes and (FP8) block scales are. */
typedef struct wsrc {
    const void *row;    /* start of the row */
    const float *scale; /* FP8: this row's block row of scale_inv, else NULL */
} wsrc;

/* Scalar weight (tails): the same value as the vector widening and the portable row. */
static inline float wval(enum ds_dtype kind, const wsrc *s, uint32_t c, uint32_t bc)
{
    switch (kind) {
    case DS_DTYPE_F32:
        return ((const float *)s->row)[c];
    case DS_DTYPE_BF16:
        return ds_bf16_to_f32(((const uint16_t *)s->row)[c]);
    case DS_DTYPE_F16:
        return ds_f16_to_f32(((const uint16_t *)s->row)[c]);
    case DS_DTYPE_Q8_0: {
        const uint8_t *b = (const uint8_t *)s->row + (size_t)(c / 32) * 34;
        return (float)(int8_t)b[2 + c % 32] * ds_f16_to_f32((uint16_t)(b[0] | b[1] << 8));
    }
    default:
        return fp8_lut[((const uint8_t *)s->row)[c]] * s->scale[c / bc];
    }
}

#define PF_BYTES 16384

/* Weight rows per step of the one-input-row decode tile: 3 interleaved rows (6 independent FMA
 * chains) by default, 1 (one sequential stream) with DS_DECODE_ROWS=1 or
 * ds_tensor_set_decode_rows(1). Which is faster depends on the core: measured on the Xeon
 * (AVX-512 machine), v2-4g BF16 decode 12.8 vs 11.6 tokens/s at 1 thread and 23.3-24.1 vs
 * 21.0-21.7 at 2; on the EPYC of an earlier session one row was ahead by ~4 %. The bits are
 * the same either way (each output is its own chains). */
static int decode_rows = -1;

void ds_tensor_set_decode_rows(uint32_t rows)
{
    decode_rows = rows == 1 ? 1 : 3;
}

static uint32_t dec_step(void)
{
    if (decode_rows < 0) {
        const char *e = getenv("DS_DECODE_ROWS");
        decode_rows = e && atoi(e) == 1 ? 1 : 3;
    }
    return (uint32_t)decode_rows;
}

/* The f16 scale of block blk of a Q8_0 row, exactly widened (vcvtph2ps). */
KTARGET static KINLINE float q8_0_scale(const void *row, uint32_t blk)
{
    uint16_t d;
    memcpy(&d, (const uint8_t *)row + (size_t)blk * 34, 2);
    return _cvtsh_ss(d);
}

/* MR weight rows x NR input rows, lanes over [0, c16), then combine + tail. Block step bs: the
 * FP8 block width (a multiple of 16, the scale is constant inside), else c16. MR, NR, kind are
 * constants at each call site, so the arrays live in registers. */
KTARGET static KINLINE void tile(enum ds_dtype kind, uint32_t MR, uint32_t NR, const wsrc *ws,
                                 uint32_t bc, const float *x, uint32_t cols, float *y,
                                 size_t ystride)
{
    __m256 lo[3][3], hi[3][3];
    uint32_t c16 = cols & ~15u;
#pragma GCC unroll 3
    for (uint32_t m = 0; m < MR; m++)
#pragma GCC unroll 3
        for (uint32_t i = 0; i < NR; i++)
            lo[m][i] = hi[m][i] = _mm256_setzero_ps();
    uint32_t bs = kind == DS_DTYPE_F8_E4M3 ? bc : kind == DS_DTYPE_Q8_0 ? 32 : (c16 ? c16 : 16);
    const size_t el = kind == DS_DTYPE_Q8_0 ? 1 : dtype_bytes(kind);
    /* one prefetch per 64-byte line: every 64/el columns */
    const uint32_t pf_mask = (uint32_t)(64 / el - 1) & ~15u;
    for (uint32_t cb = 0, blk = 0; cb < c16; cb += bs, blk++) {
        __m256 sc[3];
        uint32_t ce = cb + bs < c16 ? cb + bs : c16;
#pragma GCC unroll 3
        for (uint32_t m = 0; m < MR; m++)
            sc[m] = kind == DS_DTYPE_F8_E4M3 ? _mm256_set1_ps(ws[m].scale[blk])
                    : kind == DS_DTYPE_Q8_0  ? _mm256_set1_ps(q8_0_scale(ws[m].row, blk))
                                             : _mm256_setzero_ps();
        for (uint32_t c = cb; c < ce; c += 16) {
            __m256 xv[3];
#pragma GCC unroll 3
            for (uint32_t i = 0; i < NR; i++)
                xv[i] = _mm256_loadu_ps(x + (size_t)i * cols + c);
            /* Rows are short streams (a few KB): the hardware prefetcher ramps up too late
             * for each, so ask for the line PF_BYTES ahead (measured: 1536-column BF16 rows
             * 7.6 -> 9.3 GB/s, 224-column 4.3 -> 8.0; long rows unchanged). */
            if ((c & pf_mask) == 0) {
#pragma GCC unroll 3
                for (uint32_t m = 0; m < MR; m++)
                    _mm_prefetch((const char *)ws[m].row + (size_t)c * el + PF_BYTES, _MM_HINT_T0);
            }
#pragma GCC unroll 3
            for (uint32_t m = 0; m < MR; m++) {
                __m256 wv = widen8(kind, ws[m].row, c, sc[m]);
#pragma GCC unroll 3
                for (uint32_t i = 0; i < NR; i++)
                    lo[m][i] = _mm256_fmadd_ps(wv, xv[i], lo[m][i]);
            }
#pragma GCC unroll 3
            for (uint32_t i = 0; i < NR; i++)
                xv[i] = _mm256_loadu_ps(x + (size_t)i * cols + c + 8);
#pragma GCC unroll 3
            for (uint32_t m = 0; m < MR; m++) {
                __m256 wv = widen8(kind, ws[m].row, c + 8, sc[m]);
#pragma GCC unroll 3
                for (uint32_t i = 0; i < NR; i++)
                    hi[m][i] = _mm256_fmadd_ps(wv, xv[i], hi[m][i]);
            }
        }
    }
#pragma GCC unroll 3
    for (uint32_t m = 0; m < MR; m++)
#pragma GCC unroll 3
        for (uint32_t i = 0; i < NR; i++) {
            float s = hsum16(lo[m][i], hi[m][i]);
            const float *xi = x + (size_t)i * cols;
            for (uint32_t c = c16; c < cols; c++)
                s = fma1(wval(kind, &ws[m], c, bc), xi[c], s);
            y[(size_t)i * ystride + m] = s;
        }
}

/* Decode: n = 1 (4 weight rows per step) or n = 2 (3 per step), widened in registers. */
#define DECODE_KERNEL(NAME, KIND)                                                                  \
    KTARGET static void NAME(const ds_weight *w, const float *x, uint32_t n, float *y,             \
                             uint32_t r0, uint32_t r1)                                             \
    {                                                                                              \
        uint32_t cols = w->cols, nbc = 0;                                                          \
        size_t rb =                                                                                \
            KIND == DS_DTYPE_Q8_0 ? (size_t)cols / 32 * 34 : (size_t)cols * dtype_bytes(KIND);     \
        if (KIND == DS_DTYPE_F8_E4M3)                                                              \
            nbc = (cols + w->block_cols - 1) / w->block_cols;                                      \
        /* n = 1: dec_step() weight rows at a time (3, or 1: a single sequential stream; on the    \
         * EPYC, 1 thread, BF16: 1536 columns 11.2 GB/s vs 10.7 for 4 rows at a time, 448          \
         * columns 9.8 vs 8.6, 7168 equal; on the Xeon 3 rows are ahead, see dec_step) */          \
        uint32_t step = n == 1 ? dec_step() : 3, r = r0;                                           \
        wsrc ws[3];                                                                                \
        for (; r < r1; r += step) {                                                                \
            uint32_t mr = r1 - r < step ? r1 - r : step;                                           \
            for (uint32_t m = 0; m < mr; m++) {                                                    \
                ws[m].row = (const uint8_t *)w->data + (size_t)(r + m) * rb;                       \
                ws[m].scale = KIND == DS_DTYPE_F8_E4M3                                             \
                                  ? w->scale_inv + (size_t)((r + m) / w->block_rows) * nbc         \
                                  : NULL;                                                          \
            }                                                                                      \
            float *yr = y + r;                                                                     \
            if (n == 2 && mr == 3)                                                                 \
                tile(KIND, 3, 2, ws, w->block_cols, x, cols, yr, w->rows);                         \
            else if (n == 1 && mr == 3)                                                            \
                tile(KIND, 3, 1, ws, w->block_cols, x, cols, yr, w->rows);                         \
            else                                                                                   \
                for (uint32_t m = 0; m < mr; m++)                                                  \
                    for (uint32_t i = 0; i < n; i++)                                               \
                        tile(KIND, 1, 1, ws + m, w->block_cols, x + (size_t)i * cols, cols,        \
                             yr + (size_t)i * w->rows + m, w->rows);                               \
        }                                                                                          \
    }

DECODE_KERNEL(decode_f32, DS_DTYPE_F32)
DECODE_KERNEL(decode_bf16, DS_DTYPE_BF16)
DECODE_KERNEL(decode_f16, DS_DTYPE_F16)
DECODE_KERNEL(decode_fp8, DS_DTYPE_F8_E4M3)
DECODE_KERNEL(decode_q8_0, DS_DTYPE_Q8_0)

/* Widens rows [r, r + mr) into f32 rows of the scratch (stride cols): exactly the values the
 * registers would hold (FP8: the products fp8 * scale). */
KTARGET static void widen_rows(const ds_weight *w, uint32_t r, uint32_t mr, float *dst)
{
    uint32_t cols = w->cols, c8 = cols & ~7u;
    for (uint32_t m = 0; m < mr; m++) {
        float *d = dst + (size_t)m * cols;
        size_t base = (size_t)(r + m) * cols;
        switch (w->dtype) {
        case DS_DTYPE_BF16: {
            const uint16_t *p = (const uint16_t *)w->data + base;
            uint32_t c = 0;
            for (; c < c8; c += 8)
                _mm256_storeu_ps(d + c, widen8(DS_DTYPE_BF16, p, c, _mm256_setzero_ps()));
            for (; c < cols; c++)
                d[c] = ds_bf16_to_f32(p[c]);
            break;
        }
        case DS_DTYPE_F16: {
            const uint16_t *p = (const uint16_t *)w->data + base;
            uint32_t c = 0;
            for (; c < c8; c += 8)
                _mm256_storeu_ps(d + c, widen8(DS_DTYPE_F16, p, c, _mm256_setzero_ps()));
            for (; c < cols; c++)
                d[c] = ds_f16_to_f32(p[c]);
            break;
        }
        default:
            row_f32_portable(w, r + m, d);
        }
    }
}

/* Part of a 3 x 2 (or 3 x 1) tile over widened f32 rows: lanes of columns [cb, ce) (multiples
 * of 16) added to the partial sums in st[MR][NR][16] (zeroed first when first is set). Lane j
 * still sees its columns in ascending order, so blocking K does not change any bits. */
KTARGET static KINLINE void tile_part(uint32_t MR, uint32_t NR, const float *const *wr,
                                      const float *x, size_t xs, uint32_t cb, uint32_t ce,
                                      bool first, float *st)
{
    __m256 lo[3][2], hi[3][2];
#pragma GCC unroll 3
    for (uint32_t m = 0; m < MR; m++)
#pragma GCC unroll 2
        for (uint32_t i = 0; i < NR; i++) {
            float *p = st + (m * 2 + i) * 16;
            lo[m][i] = first ? _mm256_setzero_ps() : _mm256_load_ps(p);
            hi[m][i] = first ? _mm256_setzero_ps() : _mm256_load_ps(p + 8);
        }
    for (uint32_t c = cb; c < ce; c += 16) {
        __m256 xv[2];
#pragma GCC unroll 2
        for (uint32_t i = 0; i < NR; i++)
            xv[i] = _mm256_loadu_ps(x + i * xs + c);
#pragma GCC unroll 3
        for (uint32_t m = 0; m < MR; m++) {
            __m256 wv = _mm256_loadu_ps(wr[m] + c);
#pragma GCC unroll 2
            for (uint32_t i = 0; i < NR; i++)
                lo[m][i] = _mm256_fmadd_ps(wv, xv[i], lo[m][i]);
        }
#pragma GCC unroll 2
        for (uint32_t i = 0; i < NR; i++)
            xv[i] = _mm256_loadu_ps(x + i * xs + c + 8);
#pragma GCC unroll 3
        for (uint32_t m = 0; m < MR; m++) {
            __m256 wv = _mm256_loadu_ps(wr[m] + c + 8);
#pragma GCC unroll 2
            for (uint32_t i = 0; i < NR; i++)
                hi[m][i] = _mm256_fmadd_ps(wv, xv[i], hi[m][i]);
        }
    }
#pragma GCC unroll 3
    for (uint32_t m = 0; m < MR; m++)
#pragma GCC unroll 2
        for (uint32_t i = 0; i < NR; i++) {
            float *p = st + (m * 2 + i) * 16;
            _mm256_store_ps(p, lo[m][i]);
            _mm256_store_ps(p + 8, hi[m][i]);
        }
}

/* Columns per K block of the GEMM: 3 widened rows of it (6 KB) stay in L1 while every pair of
 * input rows of the block streams past. A multiple of 16 (lane alignment). */
#define GEMM_KC 512u

/* Prefill on AVX-512: per 4 weight rows (widened once, F32 rows used in place), the 4 x 6 zmm
 * tile of gemm512.c over every input row, K blocked, in the canonical order. */
static void gemm_rows512(const ds_weight *w, const float *x, uint32_t n, float *y, uint32_t r0,
                         uint32_t r1)
{
    uint32_t cols = w->cols;
    /* input rows per block: their 512-column K block (2 KB a row) within ~192 KB of L2 */
    uint32_t nb = n < 96 ? n : 96;
    size_t wfl = ((size_t)4 * cols + 15) & ~(size_t)15;
    float *buf = scratch_get(wfl + ds_gemm512_state_floats(nb));
    const float *wr[4];
    for (uint32_t r = r0; r < r1; r += 4) {
        uint32_t mr = r1 - r < 4 ? r1 - r : 4;
        if (w->dtype == DS_DTYPE_F32) {
            for (uint32_t m = 0; m < mr; m++)
                wr[m] = (const float *)w->data + (size_t)(r + m) * cols;
        } else if (w->dtype == DS_DTYPE_BF16 || w->dtype == DS_DTYPE_F16) {
            for (uint32_t m = 0; m < mr; m++) {
                ds_gemm512_widen((const uint16_t *)w->data + (size_t)(r + m) * cols,
                                 w->dtype == DS_DTYPE_F16, cols, buf + (size_t)m * cols);
                wr[m] = buf + (size_t)m * cols;
            }
        } else {
            widen_rows(w, r, mr, buf);
            for (uint32_t m = 0; m < mr; m++)
                wr[m] = buf + (size_t)m * cols;
        }
        ds_gemm512_rows(wr, mr, x, cols, n, cols, y + r, w->rows, buf + wfl, nb);
    }
}

/* Prefill: n >= 3. Per block of input rows whose K-block fits in L2, per 3 weight rows: widen
 * once (whole rows), then per K block a 3 x 2 register tile over every pair of input rows,
 * partial sums kept per tile between K blocks; then the lanes are combined and the tail added. */
KTARGET static void gemm_rows(const ds_weight *w, const float *x, uint32_t n, float *y, uint32_t r0,
                              uint32_t r1)
{
    uint32_t cols = w->cols, c16 = cols & ~15u;
    uint32_t kc = c16 < GEMM_KC ? (c16 ? c16 : 16) : GEMM_KC;
    uint32_t nb = (uint32_t)((192u << 10) / ((size_t)kc * sizeof(float)));
    nb = nb < 4 ? 4 : nb & ~1u;
    if (nb > n + (n & 1))
        nb = n + (n & 1);
    /* the widened rows, then 96 floats of partial sums per pair of input rows */
    size_t wfl = ((size_t)3 * cols + 15) & ~(size_t)15;
    float *buf = scratch_get(wfl + (size_t)(nb / 2) * 96);
    float *state = buf + wfl;
    const float *wr[3];
    for (uint32_t i0 = 0; i0 < n; i0 += nb) {
        uint32_t i1 = i0 + nb < n ? i0 + nb : n;
        for (uint32_t r = r0; r < r1; r += 3) {
            uint32_t mr = r1 - r < 3 ? r1 - r : 3;
            if (w->dtype == DS_DTYPE_F32) {
                for (uint32_t m = 0; m < mr; m++)
                    wr[m] = (const float *)w->data + (size_t)(r + m) * cols;
            } else {
                widen_rows(w, r, mr, buf);
                for (uint32_t m = 0; m < mr; m++)
                    wr[m] = buf + (size_t)m * cols;
            }
            for (uint32_t cb = 0; cb < c16; cb += kc) {
                uint32_t ce = cb + kc < c16 ? cb + kc : c16;
                for (uint32_t i = i0; i < i1; i += 2) {
                    float *st = state + (size_t)((i - i0) / 2) * 96;
                    const float *xi = x + (size_t)i * cols;
                    bool two = i + 1 < i1;
                    if (mr == 3 && two)
                        tile_part(3, 2, wr, xi, cols, cb, ce, cb == 0, st);
                    else if (mr == 3)
                        tile_part(3, 1, wr, xi, cols, cb, ce, cb == 0, st);
                    else if (two)
                        for (uint32_t m = 0; m < mr; m++) {
                            tile_part(1, 2, wr + m, xi, cols, cb, ce, cb == 0, st + m * 32);
                        }
                    else
                        for (uint32_t m = 0; m < mr; m++)
                            tile_part(1, 1, wr + m, xi, cols, cb, ce, cb == 0, st + m * 32);
                }
            }
            for (uint32_t i = i0; i < i1; i++) {
                const float *st = state + (size_t)((i - i0) / 2) * 96 + ((i - i0) & 1) * 16;
                const float *xi = x + (size_t)i * cols;
                for (uint32_t m = 0; m < mr; m++) {
                    const float *sm = st + m * 32;
                    float v = c16 ? hsum16(_mm256_load_ps(sm), _mm256_load_ps(sm + 8)) : 0.0f;
                    for (uint32_t c = c16; c < cols; c++)
                        v = fma1(wr[m][c], xi[c], v);
                    y[(size_t)i * w->rows + r + m] = v;
                }
            }
        }
    }
}

KTARGET static void f32_row_dot(const wsrc *ws, const float *x, uint32_t cols, float *y)
{
    tile(DS_DTYPE_F32, 1, 1, ws, 0, x, cols, y, 0);
}

static bool fp8_fusable(const ds_weight *w)
{
    return w->block_cols >= 16 && w->block_cols % 16 == 0;
}
#endif

/* ---- prepared inputs: the integer kernels of the block types (qdot.c) ---- */

static ds_qdot_mode qdot_mode;
static pthread_once_t qdot_once = PTHREAD_ONCE_INIT;
static bool qdot_set;

static void qdot_env(void)
{
    const char *e = getenv("DS_QDOT");
    if (!qdot_set && e && !strcmp(e, "dequant"))
        qdot_mode = DS_QDOT_DEQUANT;
}

void ds_tensor_set_qdot(ds_qdot_mode mode)
{
    pthread_once(&qdot_once, qdot_env);
    qdot_set = true;
    qdot_mode = mode;
}

ds_qdot_mode ds_tensor_qdot(void)
{
    pthread_once(&qdot_once, qdot_env);
    return qdot_mode;
}

static int qdot_isa(void)
{
    return use_avx512() && ds_qdot_avx512_supported() ? 2 : use_avx2() ? 1 : 0;
}

static uint32_t in_format(const ds_weight *w)
{
    return ds_tensor_qdot() == DS_QDOT_INT8 ? ds_qx_format(w->dtype) : DS_QX_NONE;
}

size_t ds_matmul_in_bytes(const ds_weight *w, uint32_t n)
{
    return ds_qx_bytes(in_format(w), n, w->cols);
}

void ds_matmul_in_prepare(const ds_weight *w, const float *x, uint32_t n, void *buf,
                          ds_matmul_in *in)
{
    uint32_t fmt = in_format(w);
    *in = (ds_matmul_in){.x = x, .n = n, .cols = w->cols, .fmt = DS_QX_NONE};
    if (fmt != DS_QX_NONE && n)
        ds_qx_quantize(fmt, x, n, w->cols, buf, in);
    in->x = x;
}

bool ds_matmul_in_fits(const ds_matmul_in *in, const ds_weight *w)
{
    return in->cols == w->cols && in->fmt == in_format(w);
}

void ds_weight_matmul_rows_in(const ds_weight *w, const ds_matmul_in *in, float *y, uint32_t r0,
                              uint32_t r1)
{
    if (in->n == 0 || r0 >= r1)
        return;
    if (in->fmt == DS_QX_NONE)
        ds_weight_matmul_rows(w, in->x, in->n, y, r0, r1);
    else
        ds_qdot_rows(w, in, y, r0, r1, qdot_isa());
}

/* Slot 2 holds a thread's prepared input (the scratch is in floats). */
static void *in_scratch(size_t bytes)
{
    void *p = ds_thread_scratch(2, (bytes + sizeof(float) - 1) / sizeof(float));
    if (!p)
        abort(); /* an activation block: see scratch_get */
    return p;
}

void ds_weight_matmul_rows(const ds_weight *w, const float *x, uint32_t n, float *y, uint32_t r0,
                           uint32_t r1)
{
    if (n == 0 || r0 >= r1)
        return;
    if (in_format(w) != DS_QX_NONE) {
        ds_matmul_in in;
        ds_matmul_in_prepare(w, x, n, in_scratch(ds_matmul_in_bytes(w, n)), &in);
        ds_qdot_rows(w, &in, y, r0, r1, qdot_isa());
        return;
    }
    if (w->dtype == DS_DTYPE_F8_E4M3)
        pthread_once(&fp8_once, fp8_lut_init);
#if defined(__x86_64__)
    if (use_avx2()) {
        if (n >= 3) {
            if (use_avx512())
                gemm_rows512(w, x, n, y, r0, r1);
            else
                gemm_rows(w, x, n, y, r0, r1);
            return;
        }
        switch (w->dtype) {
        case DS_DTYPE_F32:
            decode_f32(w, x, n, y, r0, r1);
            return;
        case DS_DTYPE_BF16:
        case DS_DTYPE_F16:
            if (n == 1 && use_avx512() && dec_step() != 1)
                ds_gemv512_rows((const uint16_t *)w->data + (size_t)r0 * w->cols,
                                w->dtype == DS_DTYPE_F16, w->cols, r1 - r0, x, y + r0);
            else if (w->dtype == DS_DTYPE_BF16)
                decode_bf16(w, x, n, y, r0, r1);
            else
                decode_f16(w, x, n, y, r0, r1);
            return;
        case DS_DTYPE_Q8_0:
            /* rows are whole blocks of 32 (the loader checks), widened in registers */
            decode_q8_0(w, x, n, y, r0, r1);
            return;
        case DS_DTYPE_F8_E4M3:
            if (fp8_fusable(w)) {
                decode_fp8(w, x, n, y, r0, r1);
                return;
            }
            /* fall through */
        default:
            /* FP8 with odd block widths and the ggml block types: one widened (dequantised)
             * row at a time through the F32 tile */
            {
                float *buf = scratch_get(w->cols);
                wsrc ws = {buf, NULL};
                for (uint32_t r = r0; r < r1; r++) {
                    ds_weight_row_f32(w, r, buf);
                    for (uint32_t i = 0; i < n; i++)
                        f32_row_dot(&ws, x + (size_t)i * w->cols, w->cols,
                                    y + (size_t)i * w->rows + r);
                }
            }
            return;
        }
    }
#endif
    mm_rows_portable(w, x, n, y, r0, r1);
}

typedef struct mm_ctx {
    const ds_weight *w;
    const ds_matmul_in *in;
    float *y;
    uint32_t rows_per_task;
} mm_ctx;

static void mm_task(void *arg, uint32_t t)
{
    mm_ctx *m = arg;
    uint32_t r0 = t * m->rows_per_task;
    uint32_t r1 = r0 + m->rows_per_task < m->w->rows ? r0 + m->rows_per_task : m->w->rows;
    ds_weight_matmul_rows_in(m->w, m->in, m->y, r0, r1);
}

uint32_t ds_weight_matmul_task_rows(const ds_weight *w, uint32_t n, uint32_t threads)
{
    uint32_t tasks = threads * 4;
    /* Enough rows per task to amortise the hand-out, small enough to balance; a multiple of
     * 12 so the 3-row tiles (decode of 2 rows, prefill) stay whole. */
    uint32_t rpt = (w->rows + tasks - 1) / tasks;
    uint32_t min = n >= 3 ? 24 : 48;
    if (rpt < min)
        rpt = min;
    return (rpt + 11) / 12 * 12;
}

void ds_weight_matmul(const ds_weight *w, const float *x, uint32_t n, float *y, ds_pool *pool)
{
    if (n == 0 || w->rows == 0)
        return;
    uint32_t threads = ds_pool_size(pool);
    if (threads == 1) {
        ds_weight_matmul_rows(w, x, n, y, 0, w->rows);
        return;
    }
    uint32_t rpt = ds_weight_matmul_task_rows(w, n, threads);
    /* the input quantised once (block types), on the caller's slot; the tasks only read it */
    ds_matmul_in in;
    size_t qb = ds_matmul_in_bytes(w, n);
    ds_matmul_in_prepare(w, x, n, qb ? in_scratch(qb) : NULL, &in);
    mm_ctx m = {w, &in, y, rpt};
    ds_pool_run(pool, (w->rows + rpt - 1) / rpt, mm_task, &m);
}

/* ---- attention helpers: the 8-lane dot of forward.c and the transposed product ----
 * ds_dot8's order: 8 partial sums (lane j takes elements j, j+8, ...), then
 * ((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7)), then the tail in order. ds_vecmat's: each output a
 * single fmaf chain over the weight rows in ascending order starting at +0. */

static float dot8_portable(const float *a, const float *b, uint32_t n)
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

#if defined(__x86_64__)
KTARGET static KINLINE float hsum8(__m256 a)
{
    __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 a2 = _mm_add_ps(a4, _mm_movehl_ps(a4, a4));
    return _mm_cvtss_f32(_mm_add_ss(a2, _mm_movehdup_ps(a2)));
}

/* MB rows of b (stride bs) against a, 8 lanes each: MB independent chains. */
KTARGET static KINLINE void dot8_tile(uint32_t MB, const float *a, const float *b, size_t bs,
                                      uint32_t n, float *out)
{
    __m256 acc[4];
    uint32_t n8 = n & ~7u;
#pragma GCC unroll 4
    for (uint32_t t = 0; t < MB; t++)
        acc[t] = _mm256_setzero_ps();
    for (uint32_t c = 0; c < n8; c += 8) {
        __m256 av = _mm256_loadu_ps(a + c);
#pragma GCC unroll 4
        for (uint32_t t = 0; t < MB; t++)
            acc[t] = _mm256_fmadd_ps(av, _mm256_loadu_ps(b + t * bs + c), acc[t]);
    }
#pragma GCC unroll 4
    for (uint32_t t = 0; t < MB; t++) {
        float s = hsum8(acc[t]);
        for (uint32_t c = n8; c < n; c++)
            s = fma1(a[c], b[t * bs + c], s);
        out[t] = s;
    }
}

KTARGET static void dot8_many_avx2(const float *a, const float *b, size_t bs, uint32_t m,
                                   uint32_t n, float *out)
{
    uint32_t t = 0;
    for (; t + 4 <= m; t += 4)
        dot8_tile(4, a, b + t * bs, bs, n, out + t);
    for (; t < m; t++)
        dot8_tile(1, a, b + t * bs, bs, n, out + t);
}

/* out[c] = sum_t w[t] * e[t][c] over 64 columns at a time (8 chains), then 8, then scalars. */
KTARGET static void wsum_avx2(const float *w, const float *e, size_t es, uint32_t m, uint32_t n,
                              float *out)
{
    uint32_t c = 0;
    for (; c + 64 <= n; c += 64) {
        __m256 acc[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++)
            acc[j] = _mm256_setzero_ps();
        for (uint32_t t = 0; t < m; t++) {
            __m256 wv = _mm256_set1_ps(w[t]);
            const float *et = e + t * es + c;
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++)
                acc[j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(et + 8 * j), acc[j]);
        }
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++)
            _mm256_storeu_ps(out + c + 8 * j, acc[j]);
    }
    for (; c + 8 <= n; c += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (uint32_t t = 0; t < m; t++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(w[t]), _mm256_loadu_ps(e + t * es + c), acc);
        _mm256_storeu_ps(out + c, acc);
    }
    for (; c < n; c++) {
        float s = 0;
        for (uint32_t t = 0; t < m; t++)
            s = fma1(w[t], e[t * es + c], s);
        out[c] = s;
    }
}
#endif

float ds_dot8(const float *a, const float *b, uint32_t n)
{
    float s;
    ds_dot8_many(a, b, 0, 1, n, &s);
    return s;
}

void ds_dot8_many(const float *a, const float *b, size_t b_stride, uint32_t m, uint32_t n,
                  float *out)
{
#if defined(__x86_64__)
    if (use_avx2()) {
        dot8_many_avx2(a, b, b_stride, m, n, out);
        return;
    }
#endif
    for (uint32_t t = 0; t < m; t++)
        out[t] = dot8_portable(a, b + t * b_stride, n);
}

void ds_wsum(const float *w, const float *e, size_t e_stride, uint32_t m, uint32_t n, float *out)
{
#if defined(__x86_64__)
    if (use_avx2()) {
        wsum_avx2(w, e, e_stride, m, n, out);
        return;
    }
#endif
    for (uint32_t c = 0; c < n; c++)
        out[c] = 0;
    for (uint32_t t = 0; t < m; t++)
        for (uint32_t c = 0; c < n; c++)
            out[c] = fmaf(w[t], e[t * e_stride + c], out[c]);
}

#if defined(__x86_64__)
/* out_i[c] for NV vectors and CW*8 columns from c0: chains over d in registers. */
KTARGET static KINLINE void vecmat_tile(enum ds_dtype kind, uint32_t CW, uint32_t NV,
                                        const ds_weight *w, uint32_t r0, uint32_t nr,
                                        const float *a, size_t as, uint32_t c0, float *out,
                                        size_t os)
{
    __m256 acc[3][8];
    size_t rb = (size_t)w->cols * dtype_bytes(kind);
    uint32_t nbc = kind == DS_DTYPE_F8_E4M3 ? (w->cols + w->block_cols - 1) / w->block_cols : 0;
#pragma GCC unroll 3
    for (uint32_t i = 0; i < NV; i++)
#pragma GCC unroll 8
        for (uint32_t j = 0; j < CW; j++)
            acc[i][j] = _mm256_setzero_ps();
    for (uint32_t d = 0; d < nr; d++) {
        const void *row = (const uint8_t *)w->data + (size_t)(r0 + d) * rb;
        __m256 sc = _mm256_setzero_ps();
        if (kind == DS_DTYPE_F8_E4M3)
            sc = _mm256_set1_ps(
                w->scale_inv[(size_t)((r0 + d) / w->block_rows) * nbc + c0 / w->block_cols]);
        __m256 wv[8];
#pragma GCC unroll 8
        for (uint32_t j = 0; j < CW; j++)
            wv[j] = widen8(kind, row, c0 + 8 * j, sc);
#pragma GCC unroll 3
        for (uint32_t i = 0; i < NV; i++) {
            __m256 av = _mm256_set1_ps(a[i * as + d]);
#pragma GCC unroll 8
            for (uint32_t j = 0; j < CW; j++)
                acc[i][j] = _mm256_fmadd_ps(av, wv[j], acc[i][j]);
        }
    }
#pragma GCC unroll 3
    for (uint32_t i = 0; i < NV; i++)
#pragma GCC unroll 8
        for (uint32_t j = 0; j < CW; j++)
            _mm256_storeu_ps(out + i * os + c0 + 8 * j, acc[i][j]);
}

/* One vector (decode): the weight rows are read in order, each once and whole (a sequential
 * stream for the prefetchers, where the column tiles above revisit every row per tile), the
 * partial sums kept in out (L1) between rows: each element is still one fmaf chain over d in
 * ascending order from +0. Columns in steps of 8 (the caller does the tail). */
KTARGET static KINLINE void vecmat_stream(enum ds_dtype kind, const ds_weight *w, uint32_t r0,
                                          uint32_t nr, const float *a, float *out)
{
    uint32_t c8 = w->cols & ~7u;
    size_t rb = (size_t)w->cols * dtype_bytes(kind);
    for (uint32_t c = 0; c < c8; c += 8)
        _mm256_storeu_ps(out + c, _mm256_setzero_ps());
    for (uint32_t d = 0; d < nr; d++) {
        const void *row = (const uint8_t *)w->data + (size_t)(r0 + d) * rb;
        __m256 av = _mm256_set1_ps(a[d]);
        uint32_t c = 0;
        for (; c + 32 <= c8; c += 32) {
            _mm_prefetch((const char *)row + (size_t)c * dtype_bytes(kind) + 4096, _MM_HINT_T0);
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                __m256 o = _mm256_loadu_ps(out + c + 8 * j);
                o = _mm256_fmadd_ps(av, widen8(kind, row, c + 8 * j, _mm256_setzero_ps()), o);
                _mm256_storeu_ps(out + c + 8 * j, o);
            }
        }
        for (; c < c8; c += 8) {
            __m256 o = _mm256_loadu_ps(out + c);
            o = _mm256_fmadd_ps(av, widen8(kind, row, c, _mm256_setzero_ps()), o);
            _mm256_storeu_ps(out + c, o);
        }
    }
}

#define VECMAT_KERNEL(NAME, KIND)                                                                  \
    KTARGET static void NAME(const ds_weight *w, uint32_t r0, uint32_t nr, const float *a,         \
                             size_t as, uint32_t n, float *out, size_t os)                         \
    {                                                                                              \
        uint32_t cols = w->cols, i = 0;                                                            \
        for (; i + 3 <= n; i += 3) {                                                               \
            uint32_t c = 0;                                                                        \
            for (; c + 32 <= cols; c += 32)                                                        \
                vecmat_tile(KIND, 4, 3, w, r0, nr, a + i * as, as, c, out + i * os, os);           \
            for (; c + 8 <= cols; c += 8)                                                          \
                vecmat_tile(KIND, 1, 3, w, r0, nr, a + i * as, as, c, out + i * os, os);           \
        }                                                                                          \
        for (; i < n; i++) {                                                                       \
            if (KIND != DS_DTYPE_F8_E4M3) {                                                        \
                vecmat_stream(KIND, w, r0, nr, a + i * as, out + i * os);                          \
                continue;                                                                          \
            }                                                                                      \
            uint32_t c = 0;                                                                        \
            for (; c + 64 <= cols; c += 64)                                                        \
                vecmat_tile(KIND, 8, 1, w, r0, nr, a + i * as, as, c, out + i * os, os);           \
            for (; c + 8 <= cols; c += 8)                                                          \
                vecmat_tile(KIND, 1, 1, w, r0, nr, a + i * as, as, c, out + i * os, os);           \
        }                                                                                          \
    }

VECMAT_KERNEL(vecmat_f32, DS_DTYPE_F32)
VECMAT_KERNEL(vecmat_bf16, DS_DTYPE_BF16)
VECMAT_KERNEL(vecmat_f16, DS_DTYPE_F16)
VECMAT_KERNEL(vecmat_fp8, DS_DTYPE_F8_E4M3)
#endif

void ds_weight_vecmat(const ds_weight *w, uint32_t r0, uint32_t nr, const float *a, size_t a_stride,
                      uint32_t n, float *out, size_t out_stride)
{
    uint32_t cols = w->cols, cv = 0; /* columns done by the vector path */
    if (w->dtype == DS_DTYPE_F8_E4M3)
        pthread_once(&fp8_once, fp8_lut_init);
#if defined(__x86_64__)
    /* FP8 in registers needs 8-column steps inside one scale block (and the 32/64 steps). */
    if (use_avx2() && !dtype_is_quant(w->dtype) &&
        (w->dtype != DS_DTYPE_F8_E4M3 || w->block_cols % 64 == 0)) {
        switch (w->dtype) {
        case DS_DTYPE_F32:
            vecmat_f32(w, r0, nr, a, a_stride, n, out, out_stride);
            break;
        case DS_DTYPE_BF16:
            vecmat_bf16(w, r0, nr, a, a_stride, n, out, out_stride);
            break;
        case DS_DTYPE_F16:
            vecmat_f16(w, r0, nr, a, a_stride, n, out, out_stride);
            break;
        default:
            vecmat_fp8(w, r0, nr, a, a_stride, n, out, out_stride);
        }
        cv = cols & ~7u;
    }
#endif
    if (cv == cols)
        return;
    float *row = scratch_get(cols);
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t c = cv; c < cols; c++)
            out[i * out_stride + c] = 0;
    for (uint32_t d = 0; d < nr; d++) {
        ds_weight_row_f32(w, r0 + d, row);
        for (uint32_t i = 0; i < n; i++) {
            float ad = a[i * a_stride + d], *o = out + i * out_stride;
            for (uint32_t c = cv; c < cols; c++)
                o[c] = fmaf(ad, row[c], o[c]);
        }
    }
}

#if defined(__x86_64__)
/* out[j] = ds_dot8(W[r0+j], v) for BF16/F16 rows widened in registers, 4 rows at a time (4
 * chains): the 8-lane order of ds_dot8 on the same (exactly widened) values. */
#define DOT8_ROWS_KERNEL(NAME, KIND)                                                               \
    KTARGET static void NAME(const ds_weight *w, uint32_t r0, uint32_t nr, const float *v,         \
                             float *out)                                                           \
    {                                                                                              \
        uint32_t cols = w->cols, c8 = cols & ~7u, j = 0;                                           \
        const uint16_t *base = (const uint16_t *)w->data + (size_t)r0 * cols;                      \
        for (; j + 4 <= nr; j += 4) {                                                              \
            __m256 acc[4];                                                                         \
            for (int t = 0; t < 4; t++)                                                            \
                acc[t] = _mm256_setzero_ps();                                                      \
            for (uint32_t c = 0; c < c8; c += 8) {                                                 \
                __m256 vv = _mm256_loadu_ps(v + c);                                                \
                for (int t = 0; t < 4; t++)                                                        \
                    acc[t] = _mm256_fmadd_ps(                                                      \
                        vv, widen8(KIND, base + (size_t)(j + t) * cols, c, vv), acc[t]);           \
            }                                                                                      \
            for (int t = 0; t < 4; t++) {                                                          \
                float sum = hsum8(acc[t]);                                                         \
                const uint16_t *row = base + (size_t)(j + t) * cols;                               \
                for (uint32_t c = c8; c < cols; c++)                                               \
                    sum = fma1(v[c],                                                               \
                               KIND == DS_DTYPE_BF16 ? ds_bf16_to_f32(row[c])                      \
                                                     : ds_f16_to_f32(row[c]),                      \
                               sum);                                                               \
                out[j + t] = sum;                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (; j < nr; j++) {                                                                      \
            __m256 acc = _mm256_setzero_ps();                                                      \
            const uint16_t *row = base + (size_t)j * cols;                                         \
            for (uint32_t c = 0; c < c8; c += 8)                                                   \
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(v + c), widen8(KIND, row, c, acc), acc);     \
            float sum = hsum8(acc);                                                                \
            for (uint32_t c = c8; c < cols; c++)                                                   \
                sum = fma1(v[c],                                                                   \
                           KIND == DS_DTYPE_BF16 ? ds_bf16_to_f32(row[c]) : ds_f16_to_f32(row[c]), \
                           sum);                                                                   \
            out[j] = sum;                                                                          \
        }                                                                                          \
    }
DOT8_ROWS_KERNEL(dot8_rows_bf16, DS_DTYPE_BF16)
DOT8_ROWS_KERNEL(dot8_rows_f16, DS_DTYPE_F16)

static void dot8_rows_avx2(const ds_weight *w, uint32_t r0, uint32_t nr, const float *v, float *out)
{
    if (w->dtype == DS_DTYPE_BF16)
        dot8_rows_bf16(w, r0, nr, v, out);
    else
        dot8_rows_f16(w, r0, nr, v, out);
}
#endif

void ds_weight_dot8_rows(const ds_weight *w, uint32_t r0, uint32_t nr, const float *v,
                         size_t v_stride, uint32_t n, float *out, size_t out_stride)
{
    if (w->dtype == DS_DTYPE_F32) {
        for (uint32_t i = 0; i < n; i++)
            ds_dot8_many(v + i * v_stride, (const float *)w->data + (size_t)r0 * w->cols, w->cols,
                         nr, w->cols, out + i * out_stride);
        return;
    }
#if defined(__x86_64__)
    if (use_avx2() && (w->dtype == DS_DTYPE_BF16 || w->dtype == DS_DTYPE_F16)) {
        for (uint32_t i = 0; i < n; i++)
            dot8_rows_avx2(w, r0, nr, v + i * v_stride, out + i * out_stride);
        return;
    }
#endif
    /* Widened a block of rows at a time (exact values), then the f32 dots. */
    enum { RB = 16 };
    float *buf = scratch_get((size_t)RB * w->cols);
    for (uint32_t j0 = 0; j0 < nr; j0 += RB) {
        uint32_t jn = nr - j0 < RB ? nr - j0 : RB;
        for (uint32_t j = 0; j < jn; j++)
            ds_weight_row_f32(w, r0 + j0 + j, buf + (size_t)j * w->cols);
        for (uint32_t i = 0; i < n; i++)
            ds_dot8_many(v + i * v_stride, buf, w->cols, jn, w->cols, out + i * out_stride + j0);
    }
}
