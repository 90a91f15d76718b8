/* ds_numeric.h — exact scalar conversions to and from float32 (see ds_numeric.c). */
#ifndef DS_NUMERIC_H
#define DS_NUMERIC_H

#include <stdint.h>

float ds_bf16_to_f32(uint16_t v);
float ds_f16_to_f32(uint16_t v);
/* e4m3fn: 0x7F/0xFF are NaN, no infinities, max 448. */
float ds_fp8_e4m3_to_f32(uint8_t v);
uint16_t ds_f32_to_bf16(float f); /* round to nearest even */

/* exp(x) in float32 from IEEE float +, -, * and exponent bits only, in one fixed sequence, so
 * it gives the same bits on every device that rounds those correctly (the engine on any CPU,
 * devices/kernels/ops.cl, devices/cuda/backend_cuda.cu carry the same sequence): the engine's
 * softmax, SiLU and router sigmoid use it, which lets an accelerator reproduce them exactly.
 * Within 2 ulp of exp over [-87, 88]; x < -87 gives 0 (never a denormal), x > 88 gives +inf,
 * NaN gives NaN. */
float ds_expf(float x);

#endif
