/* gemm512.h — the AVX-512 tile of the prefill GEMM (model/gemm512.c), used by tensor.c. */
#ifndef DS_GEMM512_H
#define DS_GEMM512_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* True when the CPU has AVX-512F (and the OS saves its registers). */
bool ds_gemm512_supported(void);

/* y[i * ys + m] = sum_c wr[m][c] * x[i * xs + c] for m < mr (1..4) and i < n, every element in
 * the canonical order of tensor.c (16 lanes, lane j over columns j, j+16, ... with fmaf, then
 * a_j = acc_j + acc_{j+8}, ((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7)), then the tail in order): one
 * zmm register is exactly the 16 lanes of one output. state: 64-byte aligned scratch of
 * ds_gemm512_state_floats(nb) floats, nb = the input rows per cache block. */
void ds_gemm512_rows(const float *const *wr, uint32_t mr, const float *x, size_t xs, uint32_t n,
                     uint32_t cols, float *y, size_t ys, float *state, uint32_t nb);
size_t ds_gemm512_state_floats(uint32_t nb);
/* cols BF16 (or F16) values widened to float32 exactly (the values every other path uses). */
void ds_gemm512_widen(const uint16_t *p, bool f16, uint32_t cols, float *dst);
/* y[r] = the canonical dot of BF16 (or F16) row r of w [nrows, cols] with x, for one input row
 * (decode): 3 rows at a time, one zmm chain each, widened in registers, prefetched ahead. */
void ds_gemv512_rows(const uint16_t *w, bool f16, uint32_t cols, uint32_t nrows, const float *x,
                     float *y);

#endif
