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
