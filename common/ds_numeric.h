/* ds_numeric.h — exact scalar conversions to and from float32 (see ds_numeric.c). */
#ifndef DS_NUMERIC_H
#define DS_NUMERIC_H

#include <stdint.h>

float ds_bf16_to_f32(uint16_t v);
float ds_f16_to_f32(uint16_t v);
/* e4m3fn: 0x7F/0xFF are NaN, no infinities, max 448. */
float ds_fp8_e4m3_to_f32(uint8_t v);
uint16_t ds_f32_to_bf16(float f); /* round to nearest even */

#endif
