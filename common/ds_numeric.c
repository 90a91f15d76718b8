/* ds_numeric.c — exact scalar conversions between the number formats of checkpoints and the
 * wire (BF16, F16, FP8 e4m3fn) and float32; shared by the engine and the compute backends. */
#include "ds_numeric.h"

#include <math.h>
#include <string.h>

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

/* Range reduction x = k ln2 + r, |r| <= ln2/2 (ln2 split in a short high part, so k * hi is
 * exact for |k| <= 127, and a low part), a degree-7 Taylor polynomial for e^r in Horner form,
 * then 2^k put into the exponent bits. Every operation is a single rounded float op (this file
 * is built with -ffp-contract=off); the kernels repeat the sequence literally. */
float ds_expf(float x)
{
    if (x != x)
        return x;
    if (x > 88.0f)
        return INFINITY;
    if (x < -87.0f)
        return 0.0f;
    float kf = x * 1.44269502f;
    int k = (int)(kf >= 0.0f ? kf + 0.5f : kf - 0.5f);
    float r = x - (float)k * 0.693359375f;
    r = r - (float)k * -2.12194440e-4f;
    float p = 1.98412698e-4f;
    p = p * r + 1.38888889e-3f;
    p = p * r + 8.33333333e-3f;
    p = p * r + 4.16666667e-2f;
    p = p * r + 1.66666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    uint32_t bits = (uint32_t)(k + 127) << 23;
    float s;
    memcpy(&s, &bits, 4);
    return p * s;
}
