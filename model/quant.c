/* quant.c — ggml block geometry and the reference dequantisers (see ds_quant.h).
 *
 * Each dequantiser walks the block layout of ggml's block_* structs (ggml-common.h) and writes
 * output j of a block with exactly the float32 operations gguf-py's quants.py applies to it, in
 * the same order, so the results are bit-identical to numpy's. Every product and sum is a
 * separate float32 rounding (this file is compiled with -ffp-contract=off; the temporaries are
 * spelled out so the order is visible). Multi-byte fields are read byte by byte (little-endian
 * in the file, any alignment). */
#include <errno.h>
#include <math.h>
#include <string.h>

#include "ds_quant.h"

#define QK_K 256

static const struct {
    uint32_t type;
    const char *name;
    uint32_t values, bytes; /* per block */
} quant_types[] = {
    {DS_QUANT_F32, "F32", 1, 4},
    {DS_QUANT_F16, "F16", 1, 2},
    {DS_QUANT_Q4_0, "Q4_0", 32, 18},
    {DS_QUANT_Q4_1, "Q4_1", 32, 20},
    {DS_QUANT_Q5_0, "Q5_0", 32, 22},
    {DS_QUANT_Q5_1, "Q5_1", 32, 24},
    {DS_QUANT_Q8_0, "Q8_0", 32, 34},
    {DS_QUANT_Q8_1, "Q8_1", 32, 40},
    {DS_QUANT_Q2_K, "Q2_K", QK_K, 84},
    {DS_QUANT_Q3_K, "Q3_K", QK_K, 110},
    {DS_QUANT_Q4_K, "Q4_K", QK_K, 144},
    {DS_QUANT_Q5_K, "Q5_K", QK_K, 176},
    {DS_QUANT_Q6_K, "Q6_K", QK_K, 210},
    {DS_QUANT_Q8_K, "Q8_K", QK_K, 292},
    {DS_QUANT_IQ2_XXS, "IQ2_XXS", QK_K, 66},
    {DS_QUANT_IQ2_XS, "IQ2_XS", QK_K, 74},
    {DS_QUANT_IQ3_XXS, "IQ3_XXS", QK_K, 98},
    {DS_QUANT_IQ1_S, "IQ1_S", QK_K, 50},
    {DS_QUANT_IQ4_NL, "IQ4_NL", 32, 18},
    {DS_QUANT_IQ3_S, "IQ3_S", QK_K, 110},
    {DS_QUANT_IQ2_S, "IQ2_S", QK_K, 82},
    {DS_QUANT_IQ4_XS, "IQ4_XS", QK_K, 136},
    {DS_QUANT_I8, "I8", 1, 1},
    {DS_QUANT_I16, "I16", 1, 2},
    {DS_QUANT_I32, "I32", 1, 4},
    {DS_QUANT_I64, "I64", 1, 8},
    {DS_QUANT_F64, "F64", 1, 8},
    {DS_QUANT_IQ1_M, "IQ1_M", QK_K, 56},
    {DS_QUANT_BF16, "BF16", 1, 2},
    {DS_QUANT_TQ1_0, "TQ1_0", QK_K, 54},
    {DS_QUANT_TQ2_0, "TQ2_0", QK_K, 66},
    {DS_QUANT_MXFP4, "MXFP4", 32, 17},
    {DS_QUANT_NVFP4, "NVFP4", 64, 36},
    {DS_QUANT_Q1_0, "Q1_0", 128, 18},
};

#define N_QUANT_TYPES (sizeof(quant_types) / sizeof(quant_types[0]))

static int quant_index(uint32_t type)
{
    for (size_t i = 0; i < N_QUANT_TYPES; i++)
        if (quant_types[i].type == type)
            return (int)i;
    return -1;
}

uint32_t ds_quant_block_values(uint32_t type)
{
    int i = quant_index(type);
    return i < 0 ? 0 : quant_types[i].values;
}

uint32_t ds_quant_block_bytes(uint32_t type)
{
    int i = quant_index(type);
    return i < 0 ? 0 : quant_types[i].bytes;
}

bool ds_quant_type_known(uint32_t type)
{
    return quant_index(type) >= 0;
}

bool ds_quant_can_dequant(uint32_t type)
{
    switch (type) {
    case DS_QUANT_F32:
    case DS_QUANT_F16:
    case DS_QUANT_BF16:
    case DS_QUANT_Q4_0:
    case DS_QUANT_Q4_1:
    case DS_QUANT_Q5_0:
    case DS_QUANT_Q5_1:
    case DS_QUANT_Q8_0:
    case DS_QUANT_Q2_K:
    case DS_QUANT_Q3_K:
    case DS_QUANT_Q4_K:
    case DS_QUANT_Q5_K:
    case DS_QUANT_Q6_K:
        return true;
    default:
        return false;
    }
}

const char *ds_quant_type_name(uint32_t type)
{
    int i = quant_index(type);
    return i < 0 ? "unknown" : quant_types[i].name;
}

int ds_quant_row_bytes(uint32_t type, uint64_t n_values, uint64_t *bytes)
{
    int i = quant_index(type);
    if (i < 0 || n_values % quant_types[i].values)
        return -EINVAL;
    unsigned __int128 b =
        (unsigned __int128)(n_values / quant_types[i].values) * quant_types[i].bytes;
    if (b > UINT64_MAX)
        return -ERANGE;
    *bytes = (uint64_t)b;
    return 0;
}

static float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

/* IEEE half to float, exact; NaN payloads are kept (shifted into the top of the float
 * mantissa, quiet bit as it was), which is what numpy's float16 -> float32 cast does. */
static float f16_f32(const uint8_t *p)
{
    uint32_t h = (uint32_t)p[0] | (uint32_t)p[1] << 8;
    uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 31)
        return bits_f32(sign | 0x7f800000u | m << 13);
    if (e == 0) {
        if (m == 0)
            return bits_f32(sign);
        /* Subnormal half: normalise into the float's wider exponent range. */
        e = 1;
        while (!(m & 0x400)) {
            m <<= 1;
            e--;
        }
        m &= 0x3ff;
        return bits_f32(sign | (uint32_t)(e + 112) << 23 | m << 13);
    }
    return bits_f32(sign | (e + 112) << 23 | m << 13);
}

static void dq_f32(const uint8_t *s, uint64_t n, float *y)
{
    memcpy(y, s, n * sizeof(float));
}

static void dq_f16(const uint8_t *s, uint64_t n, float *y)
{
    for (uint64_t i = 0; i < n; i++)
        y[i] = f16_f32(s + 2 * i);
}

static void dq_bf16(const uint8_t *s, uint64_t n, float *y)
{
    for (uint64_t i = 0; i < n; i++)
        y[i] = bits_f32(((uint32_t)s[2 * i] | (uint32_t)s[2 * i + 1] << 8) << 16);
}

/* block_q4_0 {f16 d; u8 qs[16]}: value j < 16 is the low nibble of qs[j], j >= 16 the high
 * nibble of qs[j-16]; y = d * (q - 8). */
static void dq_q4_0(const uint8_t *b, uint64_t nb, float *y)
{
    for (uint64_t i = 0; i < nb; i++, b += 18, y += 32) {
        float d = f16_f32(b);
        for (int j = 0; j < 32; j++) {
            int q = (j < 16 ? b[2 + j] & 0xf : b[2 + j - 16] >> 4) - 8;
            y[j] = d * (float)q;
        }
    }
}

/* block_q4_1 {f16 d, m; u8 qs[16]}: y = (d * q) + m. */
static void dq_q4_1(const uint8_t *b, uint64_t nb, float *y)
{
    for (uint64_t i = 0; i < nb; i++, b += 20, y += 32) {
        float d = f16_f32(b), m = f16_f32(b + 2);
        for (int j = 0; j < 32; j++) {
            int q = j < 16 ? b[4 + j] & 0xf : b[4 + j - 16] >> 4;
            float dq = d * (float)q;
            y[j] = dq + m;
        }
    }
}

/* block_q5_0 {f16 d; u32 qh; u8 qs[16]}: the fifth bit of value j is bit j of qh;
 * y = d * (q - 16). */
static void dq_q5_0(const uint8_t *b, uint64_t nb, float *y)
{
    for (uint64_t i = 0; i < nb; i++, b += 22, y += 32) {
        float d = f16_f32(b);
        uint32_t qh =
            (uint32_t)b[2] | (uint32_t)b[3] << 8 | (uint32_t)b[4] << 16 | (uint32_t)b[5] << 24;
        for (int j = 0; j < 32; j++) {
            int lo = j < 16 ? b[6 + j] & 0xf : b[6 + j - 16] >> 4;
            int q = (lo | (int)((qh >> j) & 1) << 4) - 16;
            y[j] = d * (float)q;
        }
    }
}

/* block_q5_1 {f16 d, m; u32 qh; u8 qs[16]}: y = (d * q) + m. */
static void dq_q5_1(const uint8_t *b, uint64_t nb, float *y)
{
    for (uint64_t i = 0; i < nb; i++, b += 24, y += 32) {
        float d = f16_f32(b), m = f16_f32(b + 2);
        uint32_t qh =
            (uint32_t)b[4] | (uint32_t)b[5] << 8 | (uint32_t)b[6] << 16 | (uint32_t)b[7] << 24;
        for (int j = 0; j < 32; j++) {
            int lo = j < 16 ? b[8 + j] & 0xf : b[8 + j - 16] >> 4;
            int q = lo | (int)((qh >> j) & 1) << 4;
            float dq = d * (float)q;
            y[j] = dq + m;
        }
    }
}

/* block_q8_0 {f16 d; i8 qs[32]}: y = q * d. */
static void dq_q8_0(const uint8_t *b, uint64_t nb, float *y)
{
    for (uint64_t i = 0; i < nb; i++, b += 34, y += 32) {
        float d = f16_f32(b);
        for (int j = 0; j < 32; j++)
            y[j] = (float)(int8_t)b[2 + j] * d;
    }
}

/* block_q2_K {u8 scales[16]; u8 qs[64]; f16 d, dmin}: 16 groups of 16 values; group g has scale
 * scales[g] & 15 and min scales[g] >> 4. Value j (half h = j / 128, shift s = (j / 32) % 4,
 * lane l = j % 32) is (qs[32h + l] >> 2s) & 3. y = (d * sc) * q - (dmin * m). */
static void dq_q2_k(const uint8_t *b, uint64_t nb, float *y)
{
    for (uint64_t i = 0; i < nb; i++, b += 84, y += QK_K) {
        float d = f16_f32(b + 80), dmin = f16_f32(b + 82);
        for (int g = 0; g < 16; g++) {
            float dl = d * (float)(b[g] & 0xf);
            float ml = dmin * (float)(b[g] >> 4);
            for (int k = 0; k < 16; k++) {
                int j = 16 * g + k, h = j / 128, s = (j / 32) % 4, l = j % 32;
                int q = (b[16 + 32 * h + l] >> (2 * s)) & 3;
                float dq = dl * (float)q;
                y[j] = dq - ml;
            }
        }
    }
}

/* block_q3_K {u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}: 16 groups of 16 with 6-bit
 * scales (low 4 bits from scales[0..7] nibbles, high 2 from scales[8..11]) biased by 32. Value j
 * has 2 low bits from qs like Q2_K and loses 4 when bit j / 32 of hmask[j % 32] is clear.
 * y = (d * sc) * q. */
static void dq_q3_k(const uint8_t *b, uint64_t nb, float *y)
{
    for (uint64_t i = 0; i < nb; i++, b += 110, y += QK_K) {
        const uint8_t *hm = b, *qs = b + 32, *sc = b + 96;
        float d = f16_f32(b + 108);
        for (int g = 0; g < 16; g++) {
            int lo = g < 8 ? sc[g] & 0xf : sc[g - 8] >> 4;
            int hi = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
            float dl = d * (float)((lo | hi << 4) - 32);
            for (int k = 0; k < 16; k++) {
                int j = 16 * g + k, l = j % 32, grp = j / 32;
                int ql = (qs[32 * (grp / 4) + l] >> (2 * (grp % 4))) & 3;
                int q = ql - (((hm[l] >> grp) & 1) ? 0 : 4);
                y[j] = dl * (float)q;
            }
        }
    }
}

/* The 6-bit scale and min of sub-block g (0..7) of a Q4_K/Q5_K block (ggml's
 * get_scale_min_k4): g < 4 in the low 6 bits of s[g] / s[g + 4]; g >= 4 in the nibbles of
 * s[g + 4] with the high 2 bits taken from the top of s[g - 4] / s[g]. */
static void k4_scale_min(const uint8_t *s, int g, int *sc, int *m)
{
    if (g < 4) {
        *sc = s[g] & 63;
        *m = s[g + 4] & 63;
    } else {
        *sc = (s[g + 4] & 0xf) | ((s[g - 4] >> 2) & 0x30);
        *m = (s[g + 4] >> 4) | ((s[g] >> 2) & 0x30);
    }
}

/* block_q4_K {f16 d, dmin; u8 scales[12]; u8 qs[128]}: 8 sub-blocks of 32; sub-block g takes
 * the low (g even) or high (g odd) nibbles of qs[32 * (g / 2) ..]. y = (d * sc) * q - (dmin * m).
 */
static void dq_q4_k(const uint8_t *b, uint64_t nb, float *y)
{
    for (uint64_t i = 0; i < nb; i++, b += 144, y += QK_K) {
        float d = f16_f32(b), dmin = f16_f32(b + 2);
        const uint8_t *qs = b + 16;
        for (int g = 0; g < 8; g++) {
            int sc, m;
            k4_scale_min(b + 4, g, &sc, &m);
            float dl = d * (float)sc, ml = dmin * (float)m;
            for (int l = 0; l < 32; l++) {
                int q = (qs[32 * (g / 2) + l] >> (4 * (g % 2))) & 0xf;
                float dq = dl * (float)q;
                y[32 * g + l] = dq - ml;
            }
        }
    }
}

/* block_q5_K {f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}: as Q4_K, with the fifth bit
 * of value 32g + l being bit g of qh[l]. */
static void dq_q5_k(const uint8_t *b, uint64_t nb, float *y)
{
    for (uint64_t i = 0; i < nb; i++, b += 176, y += QK_K) {
        float d = f16_f32(b), dmin = f16_f32(b + 2);
        const uint8_t *qh = b + 16, *qs = b + 48;
        for (int g = 0; g < 8; g++) {
            int sc, m;
            k4_scale_min(b + 4, g, &sc, &m);
            float dl = d * (float)sc, ml = dmin * (float)m;
            for (int l = 0; l < 32; l++) {
                int q = ((qs[32 * (g / 2) + l] >> (4 * (g % 2))) & 0xf) | ((qh[l] >> g) & 1) << 4;
                float dq = dl * (float)q;
                y[32 * g + l] = dq - ml;
            }
        }
    }
}

/* block_q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: value j (half h = j / 128,
 * r = j % 128) has low nibble (ql[64h + r % 64] >> 4 * (r / 64)) & 15 and high 2 bits
 * (qh[32h + r % 32] >> 2 * (r / 32)) & 3, biased by 32; group j / 16 has scale scales[j / 16].
 * y = (d * sc) * q. */
static void dq_q6_k(const uint8_t *b, uint64_t nb, float *y)
{
    for (uint64_t i = 0; i < nb; i++, b += 210, y += QK_K) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        float d = f16_f32(b + 208);
        for (int g = 0; g < 16; g++) {
            float dl = d * (float)sc[g];
            for (int k = 0; k < 16; k++) {
                int j = 16 * g + k, h = j / 128, r = j % 128;
                int lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0xf;
                int hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
                y[j] = dl * (float)((lo | hi << 4) - 32);
            }
        }
    }
}

int ds_quant_dequant_row(uint32_t type, const void *src, uint64_t n_values, float *dst)
{
    if (!ds_quant_can_dequant(type))
        return -ENOTSUP;
    uint64_t bv = ds_quant_block_values(type);
    if (n_values % bv)
        return -EINVAL;
    const uint8_t *s = src;
    uint64_t nb = n_values / bv;
    switch (type) {
    case DS_QUANT_F32:
        dq_f32(s, n_values, dst);
        break;
    case DS_QUANT_F16:
        dq_f16(s, n_values, dst);
        break;
    case DS_QUANT_BF16:
        dq_bf16(s, n_values, dst);
        break;
    case DS_QUANT_Q4_0:
        dq_q4_0(s, nb, dst);
        break;
    case DS_QUANT_Q4_1:
        dq_q4_1(s, nb, dst);
        break;
    case DS_QUANT_Q5_0:
        dq_q5_0(s, nb, dst);
        break;
    case DS_QUANT_Q5_1:
        dq_q5_1(s, nb, dst);
        break;
    case DS_QUANT_Q8_0:
        dq_q8_0(s, nb, dst);
        break;
    case DS_QUANT_Q2_K:
        dq_q2_k(s, nb, dst);
        break;
    case DS_QUANT_Q3_K:
        dq_q3_k(s, nb, dst);
        break;
    case DS_QUANT_Q4_K:
        dq_q4_k(s, nb, dst);
        break;
    case DS_QUANT_Q5_K:
        dq_q5_k(s, nb, dst);
        break;
    case DS_QUANT_Q6_K:
        dq_q6_k(s, nb, dst);
        break;
    }
    return 0;
}

/* ---- quantisers (load-time --quantize; docs/gguf.md, "Quantising at load") ---------------- */

/* float32 -> IEEE half, round to nearest even (as numpy's astype(float16)): overflow to
 * infinity, subnormal halves, NaN kept quiet. */
static uint16_t f32_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a > 0x7f800000u) /* NaN: quiet, top payload bits kept */
        return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) /* >= 65520 rounds to infinity (infinity itself too) */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) { /* below 2^-14: a subnormal half, units of 2^-24 (exact scaling) */
        float v;
        memcpy(&v, &a, 4);
        return (uint16_t)(sign | (uint32_t)rintf(v * 0x1p24f));
    }
    uint32_t r = a - 0x38000000u; /* rebias the exponent (127 - 15) */
    r = (r + 0x0fffu + ((r >> 13) & 1u)) >> 13;
    return (uint16_t)(sign | r);
}

/* Round half away from zero (numpy's np_roundf in gguf-py, which equals roundf). */
static float round_away(float v)
{
    return roundf(v);
}

/* v as an int in [lo, hi]; NaN gives lo (a weight file may hold non-finite values: no
 * undefined conversion). */
static int clamp_int(float v, int lo, int hi)
{
    return !(v >= (float)lo) ? lo : v > (float)hi ? hi : (int)v;
}

/* block_q8_0 {f16 d; i8 qs[32]}, as ggml's quantize_row_q8_0_ref: d = amax / 127,
 * q = round(x / d) computed as x * (1 / d), in float32. */
static void q_q8_0(const float *x, uint64_t nb, uint8_t *b)
{
    for (uint64_t i = 0; i < nb; i++, x += 32, b += 34) {
        float amax = 0;
        for (int j = 0; j < 32; j++)
            amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
        uint16_t h = f32_f16(d);
        b[0] = (uint8_t)h;
        b[1] = (uint8_t)(h >> 8);
        for (int j = 0; j < 32; j++)
            b[2 + j] = (uint8_t)(int8_t)clamp_int(round_away(x[j] * id), -128, 127);
    }
}

/* The smallest half >= v (v >= 0 finite): f32_f16 rounds to nearest, so step up one when it
 * rounded down. Keeps 63 * scale above every sub-block's need below. */
static uint16_t f16_ceil(float v)
{
    uint16_t h = f32_f16(v);
    uint8_t p[2] = {(uint8_t)h, (uint8_t)(h >> 8)};
    if (f16_f32(p) < v && h < 0x7bffu)
        h++;
    return h;
}

/* block_q4_K {f16 d, dmin; u8 scales[12]; u8 qs[128]}, a min-max fit of our own: each
 * sub-block g of 32 values gets the offset min_g = max(0, -min x) and the step (max x +
 * min_g') / 15, where min_g' = dmin * m_g is the min after its 6-bit rounding (m_g = round(min_g
 * / dmin)); d and dmin are the largest step / min over 63, rounded UP to a half, and the step's
 * 6-bit scale is rounded UP (sc_g = ceil(step / d)), so 15 * d * sc_g - min_g' >= max x: no
 * value of the sub-block is clamped at the top. Each value is then q = round((x + min_g') /
 * (d * sc_g)) in 0..15, so a dequantised value is within half a step (d * sc_g / 2) of x, or,
 * for values below -min_g' (the min rounded down), within the min's rounding |min_g - min_g'|.
 * (llama.cpp searches scales that minimise the squared error instead; this fit is simpler and
 * gives a bound per value.) */
static void q_q4_k(const float *x, uint64_t nb, uint8_t *b)
{
    for (uint64_t i = 0; i < nb; i++, x += QK_K, b += 144) {
        float mn[8], hi[8], need[8], maxmin = 0;
        for (int g = 0; g < 8; g++) {
            float lo = 0, h = 0;
            for (int l = 0; l < 32; l++) {
                lo = fminf(lo, x[32 * g + l]);
                h = fmaxf(h, x[32 * g + l]);
            }
            mn[g] = -lo;
            hi[g] = h;
            maxmin = fmaxf(maxmin, mn[g]);
        }
        uint16_t hdmin = maxmin > 0 ? f16_ceil(maxmin / 63.0f) : 0;
        uint8_t pd[2] = {(uint8_t)hdmin, (uint8_t)(hdmin >> 8)};
        float dmin = f16_f32(pd);
        int m[8], sc[8];
        float maxneed = 0;
        for (int g = 0; g < 8; g++) {
            m[g] = dmin > 0 ? clamp_int(round_away(mn[g] / dmin), 0, 63) : 0;
            need[g] = (hi[g] + dmin * (float)m[g]) / 15.0f;
            maxneed = fmaxf(maxneed, need[g]);
        }
        uint16_t hd = maxneed > 0 ? f16_ceil(maxneed / 63.0f) : 0;
        uint8_t pdd[2] = {(uint8_t)hd, (uint8_t)(hd >> 8)};
        float d = f16_f32(pdd);
        for (int g = 0; g < 8; g++) {
            sc[g] = d > 0 ? clamp_int(ceilf(need[g] / d), 0, 63) : 0;
            while (sc[g] < 63 && 15.0f * (d * (float)sc[g]) - dmin * (float)m[g] < hi[g])
                sc[g]++; /* float rounding in the division above */
        }
        b[0] = (uint8_t)hd;
        b[1] = (uint8_t)(hd >> 8);
        b[2] = (uint8_t)hdmin;
        b[3] = (uint8_t)(hdmin >> 8);
        uint8_t *s = b + 4; /* the inverse of k4_scale_min */
        memset(s, 0, 12);
        for (int g = 0; g < 8; g++) {
            if (g < 4) {
                s[g] |= (uint8_t)sc[g];
                s[g + 4] |= (uint8_t)m[g];
            } else {
                s[g + 4] = (uint8_t)((sc[g] & 0xf) | (m[g] & 0xf) << 4);
                s[g - 4] |= (uint8_t)((sc[g] >> 4) << 6);
                s[g] |= (uint8_t)((m[g] >> 4) << 6);
            }
        }
        uint8_t *qs = b + 16;
        memset(qs, 0, 128);
        for (int g = 0; g < 8; g++) {
            float dl = d * (float)sc[g], ml = dmin * (float)m[g];
            float id = dl > 0 ? 1.0f / dl : 0.0f;
            for (int l = 0; l < 32; l++) {
                int qi = clamp_int(round_away((x[32 * g + l] + ml) * id), 0, 15);
                qs[32 * (g / 2) + l] |= (uint8_t)(qi << (4 * (g % 2)));
            }
        }
    }
}

int ds_quant_quantize_row(uint32_t type, const float *src, uint64_t n_values, void *dst)
{
    uint32_t bv = ds_quant_block_values(type);
    if (type != DS_QUANT_Q8_0 && type != DS_QUANT_Q4_K)
        return -ENOTSUP;
    if (n_values % bv)
        return -EINVAL;
    if (type == DS_QUANT_Q8_0)
        q_q8_0(src, n_values / bv, dst);
    else
        q_q4_k(src, n_values / bv, dst);
    return 0;
}
