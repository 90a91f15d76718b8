/* qdot.c — ggml block weights times 8-bit activations: the integer kernels of Q8_0, Q4_K, Q6_K.
 *
 * A block weight holds small integers q with a float scale per block (and a min for Q4_K). Its
 * product with an activation row is done the way the format invites: the row is quantised to 8
 * bits once per matmul (ds_matmul_in_prepare), the products of a block are summed in integers —
 * exactly, in any order — and only the per-block scales are floating point. The activation
 * formats:
 *   Q8_0 (for Q8_0 weights): per 32 values a float32 scale d = amax / 127 and
 *     q = nearbyint(x * (127 / amax)) in [-127, 127];
 *   Q8_K (for Q4_K, Q6_K): the same per 256 values, plus the sum of q per 16 (the min and bias
 *     terms of the K-quants need it).
 * The float order of one output element (the contract every backend must keep to match):
 *   Q8_0: 8 lanes; lane l of block b takes the integer s = sum_k w[4l+k] * x[4l+k] (k < 4) and
 *     acc_l = fmaf(dw_b * dx_b, (float)s, acc_l), blocks ascending; then
 *     ((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7)).
 *   Q4_K: one chain over super-blocks b ascending from +0: S1 = sum_g sc_g * sum_{i in g} q_i x_i,
 *     S2 = sum_g m_g * sum_{i in g} x_i (integers), acc = fmaf(dx*d, (float)S1, acc), then
 *     acc = fmaf(-(dx*dmin), (float)S2, acc).
 *   Q6_K: one chain: S = sum_g sc_g * sum_{i in g} (q_i - 32) x_i, acc = fmaf(dx*d, (float)S, acc).
 * The integers fit int32 with room (a Q6_K super-block is at most 16 * 16 * 32 * 127 * 128), so
 * they are the same in the AVX2 and the portable code; a row's value does not depend on the
 * batch, the threads or the ISA. The result differs from dequantise-then-float32 by the
 * activation rounding (|x - q*d| <= d/2): that is the cost of the speed, the same llama.cpp
 * pays; ds_tensor_set_qdot(DS_QDOT_DEQUANT) (or DS_QDOT=dequant) restores the float path. */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ds_numeric.h"
#include "ds_tensor.h"
#include "qdot.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define QTARGET __attribute__((target("avx2,fma,f16c")))
#define QINLINE __attribute__((always_inline)) inline
#endif

enum { QK8_0 = 32, QK_K = 256 };

static inline float f16_at(const uint8_t *p)
{
    return ds_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
}

/* ---- formats and buffers ---- */

uint32_t ds_qx_format(enum ds_dtype dt)
{
    switch (dt) {
    case DS_DTYPE_Q8_0:
        return DS_QX_Q8_0;
    case DS_DTYPE_Q4_K:
    case DS_DTYPE_Q6_K:
        return DS_QX_Q8_K;
    default:
        return DS_QX_NONE;
    }
}

static uint32_t qx_block(uint32_t fmt)
{
    return fmt == DS_QX_Q8_0 ? QK8_0 : QK_K;
}

static size_t up64(size_t n)
{
    return (n + 63) & ~(size_t)63;
}

size_t ds_qx_bytes(uint32_t fmt, uint32_t n, uint32_t cols)
{
    if (fmt == DS_QX_NONE)
        return 0;
    size_t nb = (size_t)n * (cols / qx_block(fmt));
    size_t b = up64((size_t)n * cols) + up64(nb * sizeof(float));
    if (fmt == DS_QX_Q8_K)
        b += up64((size_t)n * (cols / 16) * sizeof(int16_t));
    return b;
}

/* One block of len values: the scale and the 8-bit values (the scalar reference of the rule in
 * the header; the vector code below gives the same bits). */
static float quant_block(const float *x, uint32_t len, int8_t *q)
{
    float amax = 0;
    for (uint32_t i = 0; i < len; i++)
        amax = fmaxf(amax, fabsf(x[i]));
    if (!(amax > 0) || !isfinite(amax)) {
        memset(q, 0, len);
        return amax > 0 ? NAN : 0; /* inf/NaN rows stay poisoned, not silently zero */
    }
    float id = 127.0f / amax;
    for (uint32_t i = 0; i < len; i++) {
        float v = nearbyintf(x[i] * id);
        q[i] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
    }
    return amax / 127.0f;
}

void ds_qx_quantize(uint32_t fmt, const float *x, uint32_t n, uint32_t cols, void *buf,
                    ds_matmul_in *out)
{
    uint32_t bl = qx_block(fmt), nb = cols / bl;
    uint8_t *p = buf;
    out->fmt = fmt;
    out->n = n;
    out->cols = cols;
    out->q = (int8_t *)p;
    out->d = (float *)(p + up64((size_t)n * cols));
    out->bsum = fmt == DS_QX_Q8_K
                    ? (int16_t *)(p + up64((size_t)n * cols) + up64((size_t)n * nb * sizeof(float)))
                    : NULL;
    int8_t *q = (int8_t *)out->q;
    float *d = (float *)out->d;
    int16_t *bs = (int16_t *)out->bsum;
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t b = 0; b < nb; b++) {
            size_t o = (size_t)i * cols + (size_t)b * bl;
            d[(size_t)i * nb + b] = quant_block(x + o, bl, q + o);
        }
    if (bs)
        for (size_t g = 0; g < (size_t)n * (cols / 16); g++) {
            int s = 0;
            for (int k = 0; k < 16; k++)
                s += q[g * 16 + (size_t)k];
            bs[g] = (int16_t)s;
        }
}

/* ---- the portable kernels (reference) ---- */

static float q8_0_dot_ref(const uint8_t *w, const int8_t *x, const float *xd, uint32_t nb)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (uint32_t b = 0; b < nb; b++, w += 34, x += QK8_0) {
        float dd = f16_at(w) * xd[b];
        const int8_t *wq = (const int8_t *)(w + 2);
        for (int l = 0; l < 8; l++) {
            int s = 0;
            for (int k = 0; k < 4; k++)
                s += wq[4 * l + k] * x[4 * l + k];
            acc[l] = fmaf(dd, (float)s, acc[l]);
        }
    }
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

/* The 6-bit scale and min of sub-block g of a Q4_K block (the packing of model/quant.c). */
static inline void k4_sm(const uint8_t *s, int g, int *sc, int *m)
{
    if (g < 4) {
        *sc = s[g] & 63;
        *m = s[g + 4] & 63;
    } else {
        *sc = (s[g + 4] & 0xf) | ((s[g - 4] >> 2) & 0x30);
        *m = (s[g + 4] >> 4) | ((s[g] >> 2) & 0x30);
    }
}

static float q4_k_dot_ref(const uint8_t *w, const int8_t *x, const float *xd, const int16_t *bs,
                          uint32_t nb)
{
    float acc = 0;
    for (uint32_t b = 0; b < nb; b++, w += 144, x += QK_K, bs += 16) {
        int32_t s1 = 0, s2 = 0;
        for (int g = 0; g < 8; g++) {
            int sc, m, s = 0;
            k4_sm(w + 4, g, &sc, &m);
            for (int l = 0; l < 32; l++)
                s += ((w[16 + 32 * (g / 2) + l] >> (4 * (g % 2))) & 0xf) * x[32 * g + l];
            s1 += sc * s;
            s2 += m * (bs[2 * g] + bs[2 * g + 1]);
        }
        acc = fmaf(xd[b] * f16_at(w), (float)s1, acc);
        acc = fmaf(-(xd[b] * f16_at(w + 2)), (float)s2, acc);
    }
    return acc;
}

static float q6_k_dot_ref(const uint8_t *w, const int8_t *x, const float *xd, uint32_t nb)
{
    float acc = 0;
    for (uint32_t b = 0; b < nb; b++, w += 210, x += QK_K) {
        const uint8_t *ql = w, *qh = w + 128;
        const int8_t *sc = (const int8_t *)(w + 192);
        int32_t s = 0;
        for (int g = 0; g < 16; g++) {
            int sg = 0;
            for (int k = 0; k < 16; k++) {
                int j = 16 * g + k, h = j / 128, r = j % 128;
                int lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0xf;
                int hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
                sg += ((lo | hi << 4) - 32) * x[j];
            }
            s += sc[g] * sg;
        }
        acc = fmaf(xd[b] * f16_at(w + 208), (float)s, acc);
    }
    return acc;
}

static void rows_portable(const ds_weight *w, size_t rb, const ds_matmul_in *in, float *y,
                          uint32_t r0, uint32_t r1)
{
    uint32_t cols = in->cols, nb = cols / qx_block(in->fmt);
    for (uint32_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)r * rb;
        for (uint32_t i = 0; i < in->n; i++) {
            const int8_t *x = in->q + (size_t)i * cols;
            const float *xd = in->d + (size_t)i * nb;
            float v;
            if (w->dtype == DS_DTYPE_Q8_0)
                v = q8_0_dot_ref(row, x, xd, nb);
            else if (w->dtype == DS_DTYPE_Q4_K)
                v = q4_k_dot_ref(row, x, xd, in->bsum + (size_t)i * (cols / 16), nb);
            else
                v = q6_k_dot_ref(row, x, xd, nb);
            y[(size_t)i * w->rows + r] = v;
        }
    }
}

#if defined(__x86_64__)
/* ---- AVX2 ---- */

#define QPF 16384 /* prefetch distance in the weight stream (as the float decode tile) */

QTARGET static QINLINE int hsum_i32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

QTARGET static QINLINE float hsum_f8(__m256 a)
{
    __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 a2 = _mm_add_ps(a4, _mm_movehl_ps(a4, a4));
    return _mm_cvtss_f32(_mm_add_ss(a2, _mm_movehdup_ps(a2)));
}

QTARGET static QINLINE float f16_avx(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* One Q8_0 weight row against NX activation rows (NX <= 4): lane sums of the signed bytes via
 * |w| * (x with w's sign) (vpmaddubsw; |w| <= 128 and |x| <= 127 cannot saturate), pairs summed
 * by vpmaddwd with ones: lane l = sum of bytes 4l..4l+3, as the reference. */
QTARGET static QINLINE void q8_0_row(const uint8_t *w, uint32_t nb, const ds_matmul_in *in,
                                     uint32_t i0, uint32_t NX, float *out, size_t os)
{
    __m256 acc[4];
    const __m256i ones = _mm256_set1_epi16(1);
    uint32_t cols = in->cols, nbx = cols / QK8_0;
#pragma GCC unroll 4
    for (uint32_t i = 0; i < NX; i++)
        acc[i] = _mm256_setzero_ps();
    for (uint32_t b = 0; b < nb; b++, w += 34) {
        _mm_prefetch((const char *)w + QPF, _MM_HINT_T0);
        __m256i wq = _mm256_loadu_si256((const __m256i *)(w + 2));
        __m256i aw = _mm256_sign_epi8(wq, wq);
        float dw = f16_avx(w);
#pragma GCC unroll 4
        for (uint32_t i = 0; i < NX; i++) {
            const int8_t *x = in->q + (size_t)(i0 + i) * cols + (size_t)b * QK8_0;
            __m256i xq = _mm256_loadu_si256((const __m256i *)x);
            __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xq, wq)), ones);
            __m256 dd = _mm256_set1_ps(dw * in->d[(size_t)(i0 + i) * nbx + b]);
            acc[i] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(p), acc[i]);
        }
    }
#pragma GCC unroll 4
    for (uint32_t i = 0; i < NX; i++)
        out[i * os] = hsum_f8(acc[i]);
}

/* Q4_K: the nibbles of a 32-byte group are split once per weight row and reused for NX rows. */
QTARGET static QINLINE void q4_k_row(const uint8_t *w, uint32_t nb, const ds_matmul_in *in,
                                     uint32_t i0, uint32_t NX, float *out, size_t os)
{
    float acc[4] = {0, 0, 0, 0};
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    uint32_t cols = in->cols, nbx = cols / QK_K;
    for (uint32_t b = 0; b < nb; b++, w += 144) {
        _mm_prefetch((const char *)w + QPF, _MM_HINT_T0);
        _mm_prefetch((const char *)w + QPF + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)w + QPF + 128, _MM_HINT_T0);
        int sc[8], mn[8];
        for (int g = 0; g < 8; g++)
            k4_sm(w + 4, g, &sc[g], &mn[g]);
        __m256i lo[4], hi[4];
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * k));
            lo[k] = _mm256_and_si256(q, m4);
            hi[k] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
        }
        __m128i mv = _mm_setr_epi16((short)mn[0], (short)mn[1], (short)mn[2], (short)mn[3],
                                    (short)mn[4], (short)mn[5], (short)mn[6], (short)mn[7]);
        float d = f16_avx(w), dmin = f16_avx(w + 2);
#pragma GCC unroll 4
        for (uint32_t i = 0; i < NX; i++) {
            const int8_t *x = in->q + (size_t)(i0 + i) * cols + (size_t)b * QK_K;
            __m256i s = _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                __m256i xl = _mm256_loadu_si256((const __m256i *)(x + 64 * k));
                __m256i xh = _mm256_loadu_si256((const __m256i *)(x + 64 * k + 32));
                __m256i pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo[k], xl),
                                               _mm256_set1_epi16((short)sc[2 * k]));
                __m256i ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi[k], xh),
                                               _mm256_set1_epi16((short)sc[2 * k + 1]));
                s = _mm256_add_epi32(s, _mm256_add_epi32(pl, ph));
            }
            const int16_t *bs = in->bsum + (size_t)(i0 + i) * (cols / 16) + (size_t)b * 16;
            __m128i b32 = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)bs),
                                         _mm_loadu_si128((const __m128i *)(bs + 8)));
            __m128i m2 = _mm_madd_epi16(b32, mv);
            m2 = _mm_add_epi32(m2, _mm_shuffle_epi32(m2, 0x4e));
            m2 = _mm_add_epi32(m2, _mm_shuffle_epi32(m2, 0xb1));
            float dx = in->d[(size_t)(i0 + i) * nbx + b];
            acc[i] = fmaf(dx * d, (float)hsum_i32(s), acc[i]);
            acc[i] = fmaf(-(dx * dmin), (float)_mm_cvtsi128_si32(m2), acc[i]);
        }
    }
    for (uint32_t i = 0; i < NX; i++)
        out[i * os] = acc[i];
}

/* Q6_K: the four 6-bit planes of each half built once per weight row; the -32 bias is taken
 * out through the 16-value sums of x (S = sum sc * (sum q x - 32 sum x)). */
QTARGET static QINLINE void q6_k_row(const uint8_t *w, uint32_t nb, const ds_matmul_in *in,
                                     uint32_t i0, uint32_t NX, float *out, size_t os)
{
    float acc[4] = {0, 0, 0, 0};
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(0x03);
    uint32_t cols = in->cols, nbx = cols / QK_K;
    for (uint32_t b = 0; b < nb; b++, w += 210) {
        for (int k = 0; k < 4; k++)
            _mm_prefetch((const char *)w + QPF + 64 * k, _MM_HINT_T0);
        const int8_t *sc = (const int8_t *)(w + 192);
        __m256i q[8], scv[8];
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            __m256i l0 = _mm256_loadu_si256((const __m256i *)(w + 64 * h));
            __m256i l1 = _mm256_loadu_si256((const __m256i *)(w + 64 * h + 32));
            __m256i qh = _mm256_loadu_si256((const __m256i *)(w + 128 + 32 * h));
            q[4 * h + 0] = _mm256_or_si256(_mm256_and_si256(l0, m4),
                                           _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4));
            q[4 * h + 1] = _mm256_or_si256(
                _mm256_and_si256(l1, m4),
                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4));
            q[4 * h + 2] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4));
            q[4 * h + 3] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4));
        }
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++)
            scv[k] = _mm256_set_m128i(_mm_set1_epi16(sc[2 * k + 1]), _mm_set1_epi16(sc[2 * k]));
        __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc));
        float d = f16_avx(w + 208);
#pragma GCC unroll 4
        for (uint32_t i = 0; i < NX; i++) {
            const int8_t *x = in->q + (size_t)(i0 + i) * cols + (size_t)b * QK_K;
            __m256i s = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(x + 32 * k));
                s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(q[k], xv), scv[k]));
            }
            const int16_t *bs = in->bsum + (size_t)(i0 + i) * (cols / 16) + (size_t)b * 16;
            __m256i s2 = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)bs), sc16);
            int32_t tot = hsum_i32(s) - 32 * hsum_i32(s2);
            acc[i] = fmaf(in->d[(size_t)(i0 + i) * nbx + b] * d, (float)tot, acc[i]);
        }
    }
    for (uint32_t i = 0; i < NX; i++)
        out[i * os] = acc[i];
}

#define QROWS_KERNEL(NAME, ROW)                                                                    \
    QTARGET static void NAME(const ds_weight *w, size_t rb, const ds_matmul_in *in, float *y,      \
                             uint32_t r0, uint32_t r1)                                             \
    {                                                                                              \
        uint32_t nb = in->cols / qx_block(in->fmt), n = in->n;                                     \
        for (uint32_t r = r0; r < r1; r++) {                                                       \
            const uint8_t *row = (const uint8_t *)w->data + (size_t)r * rb;                        \
            uint32_t i = 0;                                                                        \
            for (; i + 4 <= n; i += 4)                                                             \
                ROW(row, nb, in, i, 4, y + (size_t)i * w->rows + r, w->rows);                      \
            switch (n - i) {                                                                       \
            case 3:                                                                                \
                ROW(row, nb, in, i, 3, y + (size_t)i * w->rows + r, w->rows);                      \
                break;                                                                             \
            case 2:                                                                                \
                ROW(row, nb, in, i, 2, y + (size_t)i * w->rows + r, w->rows);                      \
                break;                                                                             \
            case 1:                                                                                \
                ROW(row, nb, in, i, 1, y + (size_t)i * w->rows + r, w->rows);                      \
                break;                                                                             \
            default:                                                                               \
                break;                                                                             \
            }                                                                                      \
        }                                                                                          \
    }
QROWS_KERNEL(q8_0_rows_avx2, q8_0_row)
QROWS_KERNEL(q4_k_rows_avx2, q4_k_row)
QROWS_KERNEL(q6_k_rows_avx2, q6_k_row)
#endif

void ds_qdot_rows(const ds_weight *w, const ds_matmul_in *in, float *y, uint32_t r0, uint32_t r1,
                  bool avx2)
{
    size_t rb = w->dtype == DS_DTYPE_Q8_0   ? (size_t)w->cols / 32 * 34
                : w->dtype == DS_DTYPE_Q4_K ? (size_t)w->cols / 256 * 144
                                            : (size_t)w->cols / 256 * 210;
#if defined(__x86_64__)
    if (avx2) {
        if (w->dtype == DS_DTYPE_Q8_0)
            q8_0_rows_avx2(w, rb, in, y, r0, r1);
        else if (w->dtype == DS_DTYPE_Q4_K)
            q4_k_rows_avx2(w, rb, in, y, r0, r1);
        else
            q6_k_rows_avx2(w, rb, in, y, r0, r1);
        return;
    }
#else
    (void)avx2;
#endif
    rows_portable(w, rb, in, y, r0, r1);
}
