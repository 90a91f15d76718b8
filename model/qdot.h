/* qdot.h — the integer kernels of the ggml block types (model/qdot.c), used by tensor.c. */
#ifndef DS_QDOT_H
#define DS_QDOT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ds_tensor.h"

/* The activation format a weight dtype's integer kernel takes (DS_QX_NONE: no integer kernel,
 * the float path). */
uint32_t ds_qx_format(enum ds_dtype dt);
/* Bytes of buffer n rows of cols values take in format fmt (64-byte aligned pieces). */
size_t ds_qx_bytes(uint32_t fmt, uint32_t n, uint32_t cols);
/* Quantises x [n, cols] into buf (ds_qx_bytes long, 64-byte aligned) and describes it in out
 * (out->x is left to the caller). cols must be a whole number of the format's blocks. */
void ds_qx_quantize(uint32_t fmt, const float *x, uint32_t n, uint32_t cols, void *buf,
                    ds_matmul_in *out);
/* y[i * rows + o] for output rows [r0, r1) of the block weight w (a type with an integer
 * kernel) and the quantised rows of in: isa 2 AVX-512 (BW, VNNI), 1 AVX2, 0 the portable reference
 * (the same bits). */
void ds_qdot_rows(const ds_weight *w, const ds_matmul_in *in, float *y, uint32_t r0, uint32_t r1,
                  int isa);
/* True when the CPU has AVX-512F, BW, VL and VNNI (isa 2 may be used). */
bool ds_qdot_avx512_supported(void);

#endif
