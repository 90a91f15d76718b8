/* qdot.c — ggml block weights times 8-bit activations: the integer kernels of Q8_0, Q4_0, Q5_0
 * and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (Q4_1 and Q5_1 take the float path).
 *
 * A block weight holds small integers q with a float scale per block (and a min for some). Its
 * product with an activation row is done the way the format invites: the row is quantised to 8
 * bits once per matmul (ds_matmul_in_prepare), the products of a block are summed in integers —
 * exactly, in any order — and only the per-block scales are floating point. The activation
 * formats:
 *   Q8_0 (for Q8_0, Q4_0, Q5_0 weights): per 32 values a float32 scale d = amax / 127 and
 *     q = nearbyint(x * (127 / amax)) in [-127, 127];
 *   Q8_K (for the K-quants): the same per 256 values;
 *   both keep the sum of q per 16 (the mins and biases of the K-quants need it).
 * The float order of one output element (the contract every backend must keep to match):
 *   32-blocks (signed weights w = q - bias): 8 lanes; lane l of block b takes the integer
 *     s = sum_k w[4l+k] * x[4l+k] (k < 4) and acc_l = fmaf(dw_b * dx_b, (float)s, acc_l), blocks
 *     ascending; then ((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7)).
 *   K-quants: a super-block is 256 unsigned values u (the quant plus its bias), an integer scale
 *     sc per 16 values and an integer mv per 16; S1 = sum sc_g u_i x_i, S2 = sum mv_g xsum_g
 *     (xsum_g the activation sum of group g), both split into 8 lanes: lane l of S1 takes
 *     values 4l..4l+3 of each 32-value chunk, lane l of S2 groups 2l and 2l+1. Per lane a chain
 *     over the super-blocks ascending from +0: with a min (Q2_K, Q4_K, Q5_K; mv = the min):
 *     acc_l = fmaf(dx*d, (float)S1_l, acc_l), then acc_l = fmaf(dx*(-dmin), (float)S2_l, acc_l);
 *     with a bias (Q3_K: -4, Q6_K: -32; mv = sc): acc_l = fmaf(dx*d, (float)(S1_l + bias*S2_l),
 *     acc_l); then the 8-lane tree.
 * The integers fit int32 with room (a Q6_K super-block is at most 16 * 16 * 63 * 127 * 128), so
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
    case DS_DTYPE_Q4_0:
    case DS_DTYPE_Q5_0:
        return DS_QX_Q8_0;
    case DS_DTYPE_Q2_K:
    case DS_DTYPE_Q3_K:
    case DS_DTYPE_Q4_K:
    case DS_DTYPE_Q5_K:
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
    return up64((size_t)n * cols) + up64(nb * sizeof(float)) +
           up64((size_t)n * (cols / 16) * sizeof(int16_t));
}

/* One block of len values: the scale and the 8-bit values (the scalar reference of the rule in
 * the header; the vector code below gives the same bits). */
static float quant_block(const float *x, uint32_t len, int8_t *q)
{
    float amax = 0;
    bool nan = false;
    for (uint32_t i = 0; i < len; i++) {
        amax = fmaxf(amax, fabsf(x[i]));
        nan |= isnan(x[i]); /* fmaxf drops a NaN */
    }
    if (nan || !isfinite(amax) || !(amax > 0)) {
        memset(q, 0, len);
        return nan || !isfinite(amax) ? NAN : 0; /* inf/NaN rows stay poisoned, not zero */
    }
    float id = 127.0f / amax;
    for (uint32_t i = 0; i < len; i++) {
        float v = nearbyintf(x[i] * id); /* NaN only as 0 * inf, when amax is subnormal */
        q[i] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v == v ? v : 0);
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
    out->bsum = (int16_t *)(p + up64((size_t)n * cols) + up64((size_t)n * nb * sizeof(float)));
    int8_t *q = (int8_t *)out->q;
    float *d = (float *)out->d;
    int16_t *bs = (int16_t *)out->bsum;
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t b = 0; b < nb; b++) {
            size_t o = (size_t)i * cols + (size_t)b * bl;
            d[(size_t)i * nb + b] = quant_block(x + o, bl, q + o);
        }
    for (size_t g = 0; g < (size_t)n * (cols / 16); g++) {
        int s = 0;
        for (int k = 0; k < 16; k++)
            s += q[g * 16 + (size_t)k];
        bs[g] = (int16_t)s;
    }
}

/* ---- block layouts: the values as the kernels see them (scalar; the reference) ---- */

/* A K-quant super-block: its 256 unsigned values, scale and sum multiplier per 16, and how S1 and
 * S2 become float (see the header). */
typedef struct kdesc {
    float c1, c2; /* d, and -dmin (with a min) */
    int bias;     /* 0 with a min, else -4 (Q3_K) or -32 (Q6_K) */
} kdesc;

/* The 6-bit scale and min of sub-block g of a Q4_K/Q5_K block (the packing of model/quant.c). */
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

/* Q3_K's 16 scales, 6 bits biased by 32. */
static inline void k3_scales(const uint8_t *sc, int16_t *out)
{
    for (int g = 0; g < 16; g++) {
        int lo = g < 8 ? sc[g] & 0xf : sc[g - 8] >> 4;
        int hi = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
        out[g] = (int16_t)((lo | hi << 4) - 32);
    }
}

static void ku_q2_k(const uint8_t *b, uint8_t *u, int16_t *sc, int16_t *mv, kdesc *k)
{
    for (int j = 0; j < 256; j++)
        u[j] = (b[16 + 32 * (j / 128) + j % 32] >> (2 * ((j / 32) % 4))) & 3;
    for (int g = 0; g < 16; g++) {
        sc[g] = b[g] & 0xf;
        mv[g] = b[g] >> 4;
    }
    *k = (kdesc){f16_at(b + 80), -f16_at(b + 82), 0};
}

static void ku_q3_k(const uint8_t *b, uint8_t *u, int16_t *sc, int16_t *mv, kdesc *k)
{
    for (int j = 0; j < 256; j++) {
        int grp = j / 32, l = j % 32;
        int ql = (b[32 + 32 * (grp / 4) + l] >> (2 * (grp % 4))) & 3;
        u[j] = (uint8_t)(ql | ((b[l] >> grp) & 1) << 2); /* q = u - 4 */
    }
    k3_scales(b + 96, sc);
    memcpy(mv, sc, 16 * sizeof(int16_t));
    *k = (kdesc){f16_at(b + 108), 0, -4};
}

static void ku_q4_k(const uint8_t *b, uint8_t *u, int16_t *sc, int16_t *mv, kdesc *k)
{
    for (int g = 0; g < 8; g++) {
        int s, m;
        k4_sm(b + 4, g, &s, &m);
        sc[2 * g] = sc[2 * g + 1] = (int16_t)s;
        mv[2 * g] = mv[2 * g + 1] = (int16_t)m;
        for (int l = 0; l < 32; l++)
            u[32 * g + l] = (b[16 + 32 * (g / 2) + l] >> (4 * (g % 2))) & 0xf;
    }
    *k = (kdesc){f16_at(b), -f16_at(b + 2), 0};
}

static void ku_q5_k(const uint8_t *b, uint8_t *u, int16_t *sc, int16_t *mv, kdesc *k)
{
    for (int g = 0; g < 8; g++) {
        int s, m;
        k4_sm(b + 4, g, &s, &m);
        sc[2 * g] = sc[2 * g + 1] = (int16_t)s;
        mv[2 * g] = mv[2 * g + 1] = (int16_t)m;
        for (int l = 0; l < 32; l++)
            u[32 * g + l] = (uint8_t)(((b[48 + 32 * (g / 2) + l] >> (4 * (g % 2))) & 0xf) |
                                      ((b[16 + l] >> g) & 1) << 4);
    }
    *k = (kdesc){f16_at(b), -f16_at(b + 2), 0};
}

static void ku_q6_k(const uint8_t *b, uint8_t *u, int16_t *sc, int16_t *mv, kdesc *k)
{
    for (int j = 0; j < 256; j++) {
        int h = j / 128, r = j % 128;
        int lo = (b[64 * h + r % 64] >> (4 * (r / 64))) & 0xf;
        int hi = (b[128 + 32 * h + r % 32] >> (2 * (r / 32))) & 3;
        u[j] = (uint8_t)(lo | hi << 4); /* q = u - 32 */
    }
    for (int g = 0; g < 16; g++)
        sc[g] = mv[g] = (int8_t)b[192 + g];
    *k = (kdesc){f16_at(b + 208), 0, -32};
}

/* A 32-block's signed values in order and its scale. */
static float wu_q8_0(const uint8_t *b, int8_t *w)
{
    memcpy(w, b + 2, 32);
    return f16_at(b);
}

static float wu_q4_0(const uint8_t *b, int8_t *w)
{
    for (int j = 0; j < 32; j++)
        w[j] = (int8_t)((j < 16 ? b[2 + j] & 0xf : b[2 + j - 16] >> 4) - 8);
    return f16_at(b);
}

static float wu_q5_0(const uint8_t *b, int8_t *w)
{
    uint32_t qh =
        (uint32_t)b[2] | (uint32_t)b[3] << 8 | (uint32_t)b[4] << 16 | (uint32_t)b[5] << 24;
    for (int j = 0; j < 32; j++) {
        int lo = j < 16 ? b[6 + j] & 0xf : b[6 + j - 16] >> 4;
        w[j] = (int8_t)((lo | (int)((qh >> j) & 1) << 4) - 16);
    }
    return f16_at(b);
}

typedef struct qtype {
    enum ds_dtype dt;
    uint32_t bb; /* bytes per block (32 or 256 values) */
    float (*wu)(const uint8_t *, int8_t *);
    void (*ku)(const uint8_t *, uint8_t *, int16_t *, int16_t *, kdesc *);
} qtype;

static const qtype qtypes[] = {
    {DS_DTYPE_Q8_0, 34, wu_q8_0, NULL},  {DS_DTYPE_Q4_0, 18, wu_q4_0, NULL},
    {DS_DTYPE_Q5_0, 22, wu_q5_0, NULL},  {DS_DTYPE_Q2_K, 84, NULL, ku_q2_k},
    {DS_DTYPE_Q3_K, 110, NULL, ku_q3_k}, {DS_DTYPE_Q4_K, 144, NULL, ku_q4_k},
    {DS_DTYPE_Q5_K, 176, NULL, ku_q5_k}, {DS_DTYPE_Q6_K, 210, NULL, ku_q6_k},
};

static const qtype *qtype_of(enum ds_dtype dt)
{
    for (size_t i = 0; i < sizeof(qtypes) / sizeof(qtypes[0]); i++)
        if (qtypes[i].dt == dt)
            return &qtypes[i];
    return NULL;
}

/* ---- the portable kernels (reference) ---- */

static float dot32_ref(const qtype *t, const uint8_t *w, const int8_t *x, const float *xd,
                       uint32_t nb)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int8_t wq[32];
    for (uint32_t b = 0; b < nb; b++, w += t->bb, x += QK8_0) {
        float dd = t->wu(w, wq) * xd[b];
        for (int l = 0; l < 8; l++) {
            int s = 0;
            for (int k = 0; k < 4; k++)
                s += wq[4 * l + k] * x[4 * l + k];
            acc[l] = fmaf(dd, (float)s, acc[l]);
        }
    }
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

/* The canonical 8-lane tree. */
static inline float tree8(const float *a)
{
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

static float dotk_ref(const qtype *t, const uint8_t *w, const int8_t *x, const float *xd,
                      const int16_t *bs, uint32_t nb)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint8_t u[256];
    int16_t sc[16], mv[16];
    kdesc k;
    for (uint32_t b = 0; b < nb; b++, w += t->bb, x += QK_K, bs += 16) {
        t->ku(w, u, sc, mv, &k);
        for (int l = 0; l < 8; l++) {
            /* lane l: values 4l..4l+3 of every 32-value chunk, and groups 2l, 2l+1 of the sums */
            int32_t s1 = 0, s2 = mv[2 * l] * bs[2 * l] + mv[2 * l + 1] * bs[2 * l + 1];
            for (int c = 0; c < 8; c++)
                for (int q = 0; q < 4; q++) {
                    int j = 32 * c + 4 * l + q;
                    s1 += sc[j / 16] * u[j] * x[j];
                }
            if (k.bias) {
                acc[l] = fmaf(xd[b] * k.c1, (float)(s1 + k.bias * s2), acc[l]);
            } else {
                acc[l] = fmaf(xd[b] * k.c1, (float)s1, acc[l]);
                acc[l] = fmaf(xd[b] * k.c2, (float)s2, acc[l]);
            }
        }
    }
    return tree8(acc);
}

static void rows_portable(const qtype *t, const ds_weight *w, size_t rb, const ds_matmul_in *in,
                          float *y, uint32_t r0, uint32_t r1)
{
    uint32_t cols = in->cols, nb = cols / qx_block(in->fmt);
    for (uint32_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)r * rb;
        for (uint32_t i = 0; i < in->n; i++) {
            const int8_t *x = in->q + (size_t)i * cols;
            const float *xd = in->d + (size_t)i * nb;
            y[(size_t)i * w->rows + r] =
                t->wu ? dot32_ref(t, row, x, xd, nb)
                      : dotk_ref(t, row, x, xd, in->bsum + (size_t)i * (cols / 16), nb);
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

QTARGET static QINLINE void prefetch_block(const uint8_t *w, uint32_t bb)
{
    for (uint32_t o = 0; o < bb; o += 64)
        _mm_prefetch((const char *)w + QPF + o, _MM_HINT_T0);
}

/* 16 nibbles per byte pair: low nibbles of qs[0..15] then the high ones (values 0..31). */
QTARGET static QINLINE __m256i nibbles32(const uint8_t *qs)
{
    __m128i q = _mm_loadu_si128((const __m128i *)qs), m4 = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m4), _mm_and_si128(q, m4));
}

/* 0x10 in byte j where bit j of the 32-bit qh is set. */
QTARGET static QINLINE __m256i bits32(uint32_t qh)
{
    const __m256i sh = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2,
                                        2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bm = _mm256_set1_epi64x(0x8040201008040201ll);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), sh);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bm), bm);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

/* A 32-block's signed values (in value order) and scale, as wu_* above. */
QTARGET static QINLINE __m256i wv32(enum ds_dtype dt, const uint8_t *b, float *d)
{
    *d = f16_avx(b);
    if (dt == DS_DTYPE_Q8_0)
        return _mm256_loadu_si256((const __m256i *)(b + 2));
    if (dt == DS_DTYPE_Q4_0)
        return _mm256_sub_epi8(nibbles32(b + 2), _mm256_set1_epi8(8));
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    return _mm256_sub_epi8(_mm256_or_si256(nibbles32(b + 6), bits32(qh)), _mm256_set1_epi8(16));
}

/* One 32-block weight row against NX activation rows (NX <= 4): lane sums of the signed bytes via
 * |w| * (x with w's sign) (vpmaddubsw; |w| <= 128 and |x| <= 127 cannot saturate), pairs summed
 * by vpmaddwd with ones: lane l = sum of bytes 4l..4l+3, as the reference. */
QTARGET static QINLINE void row32(enum ds_dtype dt, uint32_t bb, const uint8_t *w, uint32_t nb,
                                  const ds_matmul_in *in, uint32_t i0, uint32_t NX, float *out,
                                  size_t os)
{
    __m256 acc[4];
    const __m256i ones = _mm256_set1_epi16(1);
    uint32_t cols = in->cols, nbx = cols / QK8_0;
#pragma GCC unroll 4
    for (uint32_t i = 0; i < NX; i++)
        acc[i] = _mm256_setzero_ps();
    for (uint32_t b = 0; b < nb; b++, w += bb) {
        prefetch_block(w, bb);
        float dw;
        __m256i wq = wv32(dt, w, &dw);
        __m256i aw = _mm256_sign_epi8(wq, wq);
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

/* Scale vectors from 16 scale bytes (b16, both 128-bit halves the same): for chunk c the low
 * half is byte 2c, the high half byte 2c+1 (the two 16-value groups of the chunk), each as int16
 * (signed bytes sign-extended: the byte is put in the high half of each int16, then shifted). */
QTARGET static QINLINE void sc_pairs(__m256i b16, bool is_signed, __m256i *sc)
{
#pragma GCC unroll 8
    for (int c = 0; c < 8; c++) {
        char lo = (char)(2 * c), hi = (char)(2 * c + 1), z = (char)0x80;
        __m256i m = _mm256_setr_epi8(z, lo, z, lo, z, lo, z, lo, z, lo, z, lo, z, lo, z, lo, z, hi,
                                     z, hi, z, hi, z, hi, z, hi, z, hi, z, hi, z, hi);
        __m256i v = _mm256_shuffle_epi8(b16, m);
        sc[c] = is_signed ? _mm256_srai_epi16(v, 8) : _mm256_srli_epi16(v, 8);
    }
}

/* Q4_K/Q5_K's 8 scales and 8 mins from the 12 packed bytes: bytes 0..7 the scales, 8..15 the
 * mins (the k4_sm rule on 32-bit words). */
static inline __m128i k4_unpack(const uint8_t *s)
{
    uint32_t u[3], o[4];
    memcpy(u, s, 12);
    o[0] = u[0] & 0x3f3f3f3fu;                                             /* sc 0..3 */
    o[1] = (u[2] & 0x0f0f0f0fu) | ((u[0] >> 6) & 0x03030303u) << 4;        /* sc 4..7 */
    o[2] = u[1] & 0x3f3f3f3fu;                                             /* m 0..3 */
    o[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | ((u[1] >> 6) & 0x03030303u) << 4; /* m 4..7 */
    __m128i r;
    memcpy(&r, o, 16);
    return r;
}

/* A K-quant super-block in registers: p[k] the unsigned values 32k..32k+31, sc[k] their scales,
 * mv the 16 sum multipliers (the same values as ku_* above). */
QTARGET static QINLINE void kv(enum ds_dtype dt, const uint8_t *b, __m256i *p, __m256i *sc,
                               __m256i *mv, kdesc *k)
{
    const __m256i m4 = _mm256_set1_epi8(0x0f), m3 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    switch (dt) {
    case DS_DTYPE_Q2_K: {
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * (c / 4)));
            p[c] = _mm256_and_si256(_mm256_srli_epi16(q, 2 * (c % 4)), m3);
        }
        __m128i s = _mm_loadu_si128((const __m128i *)b);
        __m128i lo = _mm_and_si128(s, _mm_set1_epi8(0x0f));
        __m128i hi = _mm_and_si128(_mm_srli_epi16(s, 4), _mm_set1_epi8(0x0f));
        sc_pairs(_mm256_broadcastsi128_si256(lo), false, sc);
        *mv = _mm256_cvtepu8_epi16(hi);
        *k = (kdesc){f16_avx(b + 80), -f16_avx(b + 82), 0};
        break;
    }
    case DS_DTYPE_Q3_K: {
        __m256i hm = _mm256_loadu_si256((const __m256i *)b);
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(b + 32 + 32 * (c / 4)));
            __m256i ql = _mm256_and_si256(_mm256_srli_epi16(q, 2 * (c % 4)), m3);
            __m256i h = _mm256_and_si256(_mm256_srli_epi16(hm, c), one);
            p[c] = _mm256_or_si256(ql, _mm256_slli_epi16(h, 2));
        }
        int16_t s16[16];
        int8_t s8[16];
        k3_scales(b + 96, s16);
        for (int g = 0; g < 16; g++)
            s8[g] = (int8_t)s16[g];
        sc_pairs(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)s8)), true, sc);
        *mv = _mm256_loadu_si256((const __m256i *)s16);
        *k = (kdesc){f16_avx(b + 108), 0, -4};
        break;
    }
    case DS_DTYPE_Q4_K:
    case DS_DTYPE_Q5_K: {
        __m128i sm = k4_unpack(b + 4); /* 8 scales, 8 mins */
        bool five = dt == DS_DTYPE_Q5_K;
        const uint8_t *qs = b + (five ? 48 : 16);
        __m256i qh = five ? _mm256_loadu_si256((const __m256i *)(b + 16)) : _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            p[2 * c] = _mm256_and_si256(q, m4);
            p[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            if (five) {
                __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * c), one);
                __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * c + 1), one);
                p[2 * c] = _mm256_or_si256(p[2 * c], _mm256_slli_epi16(h0, 4));
                p[2 * c + 1] = _mm256_or_si256(p[2 * c + 1], _mm256_slli_epi16(h1, 4));
            }
        }
        /* each scale covers a whole chunk: bytes [s0 s0 s1 s1 ... s7 s7] give pairs (g, g) */
        sc_pairs(_mm256_broadcastsi128_si256(_mm_unpacklo_epi8(sm, sm)), false, sc);
        *mv = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm));
        *k = (kdesc){f16_avx(b), -f16_avx(b + 2), 0};
        break;
    }
    default: { /* Q6_K */
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            __m256i l0 = _mm256_loadu_si256((const __m256i *)(b + 64 * h));
            __m256i l1 = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32));
            __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
            p[4 * h + 0] = _mm256_or_si256(_mm256_and_si256(l0, m4),
                                           _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4));
            p[4 * h + 1] = _mm256_or_si256(
                _mm256_and_si256(l1, m4),
                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m3), 4));
            p[4 * h + 2] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m3), 4));
            p[4 * h + 3] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m3), 4));
        }
        __m128i s8 = _mm_loadu_si128((const __m128i *)(b + 192));
        sc_pairs(_mm256_broadcastsi128_si256(s8), true, sc);
        *mv = _mm256_cvtepi8_epi16(s8);
        *k = (kdesc){f16_avx(b + 208), 0, -32};
        break;
    }
    }
}

/* One super-block's float steps for activation row i (the order of the header): the lane sums
 * s of S1, the 16-value sums of x times mv for S2. */
QTARGET static QINLINE __m256 kstep(__m256 acc, __m256i s, const ds_matmul_in *in, uint32_t i,
                                    uint32_t b, __m256i mv, const kdesc *k)
{
    uint32_t cols = in->cols;
    const int16_t *bs = in->bsum + (size_t)i * (cols / 16) + (size_t)b * 16;
    __m256i s2 = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)bs), mv);
    float dx = in->d[(size_t)i * (cols / QK_K) + b];
    if (k->bias) {
        __m256i t = _mm256_add_epi32(s, _mm256_mullo_epi32(s2, _mm256_set1_epi32(k->bias)));
        return _mm256_fmadd_ps(_mm256_set1_ps(dx * k->c1), _mm256_cvtepi32_ps(t), acc);
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(dx * k->c1), _mm256_cvtepi32_ps(s), acc);
    return _mm256_fmadd_ps(_mm256_set1_ps(dx * k->c2), _mm256_cvtepi32_ps(s2), acc);
}

/* One K-quant weight row against NX activation rows: each super-block unpacked once; the int32
 * lane sums go into 8 float lanes per row (no reduction per super-block). */
QTARGET static QINLINE void rowk(enum ds_dtype dt, uint32_t bb, const uint8_t *w, uint32_t nb,
                                 const ds_matmul_in *in, uint32_t i0, uint32_t NX, float *out,
                                 size_t os)
{
    __m256 acc[4];
    uint32_t cols = in->cols;
#pragma GCC unroll 4
    for (uint32_t i = 0; i < NX; i++)
        acc[i] = _mm256_setzero_ps();
    for (uint32_t b = 0; b < nb; b++, w += bb) {
        prefetch_block(w, bb);
        __m256i p[8], sc[8], mv;
        kdesc k;
        kv(dt, w, p, sc, &mv, &k);
#pragma GCC unroll 4
        for (uint32_t i = 0; i < NX; i++) {
            const int8_t *x = in->q + (size_t)(i0 + i) * cols + (size_t)b * QK_K;
            __m256i s = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(x + 32 * c));
                s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(p[c], xv), sc[c]));
            }
            acc[i] = kstep(acc[i], s, in, i0 + i, b, mv, &k);
        }
    }
#pragma GCC unroll 4
    for (uint32_t i = 0; i < NX; i++)
        out[i * os] = hsum_f8(acc[i]);
}

/* ---- AVX-512 (BW, VNNI) ----
 * The same integers as above in fewer instructions: a K-quant super-block is 4 zmm of values
 * and 4 of scales, the per-lane int32 sums of the two halves added at the end (exact, so S1_l
 * is the same). */
#define Q512 __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))

Q512 static QINLINE __m512i cat512(__m256i lo, __m256i hi)
{
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

Q512 static QINLINE void rowk512(enum ds_dtype dt, uint32_t bb, const uint8_t *w, uint32_t nb,
                                 const ds_matmul_in *in, uint32_t i0, uint32_t NX, float *out,
                                 size_t os)
{
    __m256 acc[4];
    uint32_t cols = in->cols;
#pragma GCC unroll 4
    for (uint32_t i = 0; i < NX; i++)
        acc[i] = _mm256_setzero_ps();
    for (uint32_t b = 0; b < nb; b++, w += bb) {
        prefetch_block(w, bb);
        __m256i p[8], sc[8], mv;
        kdesc k;
        kv(dt, w, p, sc, &mv, &k);
        __m512i P[4], S[4];
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            P[c] = cat512(p[2 * c], p[2 * c + 1]);
            S[c] = cat512(sc[2 * c], sc[2 * c + 1]);
        }
#pragma GCC unroll 4
        for (uint32_t i = 0; i < NX; i++) {
            const int8_t *x = in->q + (size_t)(i0 + i) * cols + (size_t)b * QK_K;
            __m512i s = _mm512_setzero_si512();
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                __m512i xv = _mm512_loadu_si512((const void *)(x + 64 * c));
                s = _mm512_add_epi32(s, _mm512_madd_epi16(_mm512_maddubs_epi16(P[c], xv), S[c]));
            }
            __m256i s8 =
                _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
            acc[i] = kstep(acc[i], s8, in, i0 + i, b, mv, &k);
        }
    }
#pragma GCC unroll 4
    for (uint32_t i = 0; i < NX; i++)
        out[i * os] = hsum_f8(acc[i]);
}

/* 32-blocks on AVX512-VNNI: vpdpbusd sums the 4 products of each lane in one instruction (the
 * same exact int32 as vpmaddubsw + vpmaddwd); 256 bits wide, since two blocks in one zmm would
 * cost more in sign masks than they save here. */
#define QVNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

QVNNI static QINLINE void row32_vnni(enum ds_dtype dt, uint32_t bb, const uint8_t *w, uint32_t nb,
                                     const ds_matmul_in *in, uint32_t i0, uint32_t NX, float *out,
                                     size_t os)
{
    __m256 acc[4];
    uint32_t cols = in->cols, nbx = cols / QK8_0;
#pragma GCC unroll 4
    for (uint32_t i = 0; i < NX; i++)
        acc[i] = _mm256_setzero_ps();
    for (uint32_t b = 0; b < nb; b++, w += bb) {
        prefetch_block(w, bb);
        float dw;
        __m256i wq = wv32(dt, w, &dw);
        __m256i aw = _mm256_sign_epi8(wq, wq);
#pragma GCC unroll 4
        for (uint32_t i = 0; i < NX; i++) {
            const int8_t *x = in->q + (size_t)(i0 + i) * cols + (size_t)b * QK8_0;
            __m256i xq = _mm256_loadu_si256((const __m256i *)x);
            __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, _mm256_sign_epi8(xq, wq));
            __m256 dd = _mm256_set1_ps(dw * in->d[(size_t)(i0 + i) * nbx + b]);
            acc[i] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(p), acc[i]);
        }
    }
#pragma GCC unroll 4
    for (uint32_t i = 0; i < NX; i++)
        out[i * os] = hsum_f8(acc[i]);
}

/* Rows [r0, r1): 4 activation rows at a time, then the rest, the weight row unpacked once per
 * group. One function per type so that the unpacking is inlined with constants. */
#define QROWS_KERNEL(NAME, ROW, DT, BB)                                                            \
    QTARGET static void NAME(const ds_weight *w, size_t rb, const ds_matmul_in *in, float *y,      \
                             uint32_t r0, uint32_t r1)                                             \
    {                                                                                              \
        uint32_t nb = in->cols / qx_block(in->fmt), n = in->n;                                     \
        for (uint32_t r = r0; r < r1; r++) {                                                       \
            const uint8_t *row = (const uint8_t *)w->data + (size_t)r * rb;                        \
            float *yr = y + r;                                                                     \
            uint32_t i = 0;                                                                        \
            for (; i + 4 <= n; i += 4)                                                             \
                ROW(DT, BB, row, nb, in, i, 4, yr + (size_t)i * w->rows, w->rows);                 \
            switch (n - i) {                                                                       \
            case 3:                                                                                \
                ROW(DT, BB, row, nb, in, i, 3, yr + (size_t)i * w->rows, w->rows);                 \
                break;                                                                             \
            case 2:                                                                                \
                ROW(DT, BB, row, nb, in, i, 2, yr + (size_t)i * w->rows, w->rows);                 \
                break;                                                                             \
            case 1:                                                                                \
                ROW(DT, BB, row, nb, in, i, 1, yr + (size_t)i * w->rows, w->rows);                 \
                break;                                                                             \
            default:                                                                               \
                break;                                                                             \
            }                                                                                      \
        }                                                                                          \
    }
QROWS_KERNEL(rows_q8_0, row32, DS_DTYPE_Q8_0, 34)
QROWS_KERNEL(rows_q4_0, row32, DS_DTYPE_Q4_0, 18)
QROWS_KERNEL(rows_q5_0, row32, DS_DTYPE_Q5_0, 22)
QROWS_KERNEL(rows_q2_k, rowk, DS_DTYPE_Q2_K, 84)
QROWS_KERNEL(rows_q3_k, rowk, DS_DTYPE_Q3_K, 110)
QROWS_KERNEL(rows_q4_k, rowk, DS_DTYPE_Q4_K, 144)
QROWS_KERNEL(rows_q5_k, rowk, DS_DTYPE_Q5_K, 176)
QROWS_KERNEL(rows_q6_k, rowk, DS_DTYPE_Q6_K, 210)
#undef QTARGET
#define QTARGET QVNNI
QROWS_KERNEL(rows512_q8_0, row32_vnni, DS_DTYPE_Q8_0, 34)
QROWS_KERNEL(rows512_q4_0, row32_vnni, DS_DTYPE_Q4_0, 18)
QROWS_KERNEL(rows512_q5_0, row32_vnni, DS_DTYPE_Q5_0, 22)
#undef QTARGET
#define QTARGET Q512
QROWS_KERNEL(rows512_q2_k, rowk512, DS_DTYPE_Q2_K, 84)
QROWS_KERNEL(rows512_q3_k, rowk512, DS_DTYPE_Q3_K, 110)
QROWS_KERNEL(rows512_q4_k, rowk512, DS_DTYPE_Q4_K, 144)
QROWS_KERNEL(rows512_q5_k, rowk512, DS_DTYPE_Q5_K, 176)
QROWS_KERNEL(rows512_q6_k, rowk512, DS_DTYPE_Q6_K, 210)
#endif

bool ds_qdot_avx512_supported(void)
{
#if defined(__x86_64__)
    static int have = -1;
    if (have < 0)
        have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    return have;
#else
    return false;
#endif
}

void ds_qdot_rows(const ds_weight *w, const ds_matmul_in *in, float *y, uint32_t r0, uint32_t r1,
                  int isa)
{
    const qtype *t = qtype_of(w->dtype);
    if (!t)
        abort(); /* ds_qx_format gave a format only for the types above */
    size_t rb = (size_t)w->cols / qx_block(in->fmt) * t->bb;
#if defined(__x86_64__)
    typedef void (*rows_fn)(const ds_weight *, size_t, const ds_matmul_in *, float *, uint32_t,
                            uint32_t);
    static const struct {
        enum ds_dtype dt;
        rows_fn avx2, avx512;
    } kernels[] = {
        {DS_DTYPE_Q8_0, rows_q8_0, rows512_q8_0}, {DS_DTYPE_Q4_0, rows_q4_0, rows512_q4_0},
        {DS_DTYPE_Q5_0, rows_q5_0, rows512_q5_0}, {DS_DTYPE_Q2_K, rows_q2_k, rows512_q2_k},
        {DS_DTYPE_Q3_K, rows_q3_k, rows512_q3_k}, {DS_DTYPE_Q4_K, rows_q4_k, rows512_q4_k},
        {DS_DTYPE_Q5_K, rows_q5_k, rows512_q5_k}, {DS_DTYPE_Q6_K, rows_q6_k, rows512_q6_k},
    };
    if (isa >= 1)
        for (size_t i = 0; i < sizeof(kernels) / sizeof(kernels[0]); i++)
            if (kernels[i].dt == w->dtype) {
                (isa >= 2 ? kernels[i].avx512 : kernels[i].avx2)(w, rb, in, y, r0, r1);
                return;
            }
#else
    (void)isa;
#endif
    rows_portable(t, w, rb, in, y, r0, r1);
}
