/* ds_tensor.h — safetensors checkpoints (mmap) and the weight formats the engine computes on.
 *
 * A ds_st is a set of safetensors files opened read-only and mapped: one file
 * (model.safetensors) or the shards listed in model.safetensors.index.json. Every header is
 * validated before any tensor is exposed: header length inside the file, JSON well formed,
 * known dtype, shape product * dtype size == data_offsets length, offsets inside the data
 * area, no two tensors overlapping, no duplicate names. Errors name the file and the tensor.
 *
 * A ds_weight is a 2-D linear weight [rows, cols] (row-major, out x in) kept at checkpoint
 * precision: F32, BF16 or F16 (widened in registers while streaming) or F8_E4M3 with its
 * weight_scale_inv block scales (dequantised per element: fp8 * scale_inv[r/br][c/bc]), or a
 * ggml block type from a GGUF file (DS_DTYPE_Q*: each row ds_quant_row_bytes(type, cols) bytes
 * of packed blocks, dequantised per row by model/quant.c into float32, then the F32 paths). */
#ifndef DS_TENSOR_H
#define DS_TENSOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ds_config.h"
#include "ds_err.h"
#include "ds_numeric.h"

enum ds_st_dtype {
    DS_ST_F32,
    DS_ST_F16,
    DS_ST_BF16,
    DS_ST_F8_E4M3,
    DS_ST_I32,
    DS_ST_I64,
    DS_ST_U8,
    DS_ST_I8,
};

#define DS_ST_MAX_DIMS 8

typedef struct ds_st_tensor {
    const char *name; /* tensor name (owned by the ds_st) */
    const char *file; /* path of the file holding it */
    enum ds_st_dtype dtype;
    uint32_t ndim;
    uint64_t shape[DS_ST_MAX_DIMS]; /* elements per dim */
    const void *data;               /* inside the mapping; nbytes long */
    uint64_t nbytes;
} ds_st_tensor;

typedef struct ds_st ds_st;

/* Opens DIR/model.safetensors.index.json's shards, else DIR/model.safetensors. */
int ds_st_open_dir(const char *dir, ds_st **ret, ds_error *err);
/* Opens a single safetensors file. */
int ds_st_open_file(const char *path, ds_st **ret, ds_error *err);
/* Parses an in-memory safetensors image (not copied: buf must outlive the ds_st); name is used
 * in errors. The fuzz target uses this. */
int ds_st_open_buffer(const void *buf, size_t len, const char *name, ds_st **ret, ds_error *err);
ds_st *ds_st_free(ds_st *st);

/* The tensor called name, or NULL. */
const ds_st_tensor *ds_st_find(const ds_st *st, const char *name);
size_t ds_st_count(const ds_st *st);
const ds_st_tensor *ds_st_at(const ds_st *st, size_t i);
size_t ds_st_dtype_size(enum ds_st_dtype dt);
const char *ds_st_dtype_name(enum ds_st_dtype dt);

/* A linear weight y = W x with W [rows, cols]. */
typedef struct ds_weight {
    enum ds_dtype dtype;             /* F32, F16, BF16, F8_E4M3 or a block type (Q*) */
    uint32_t rows, cols;             /* out features, in features */
    const void *data;                /* rows*cols elements of dtype, row-major (Q*: rows of
                                      * packed blocks) */
    const float *scale_inv;          /* F8 only: [ceil(rows/br), ceil(cols/bc)] */
    uint32_t block_rows, block_cols; /* F8 block size (128x128) */
} ds_weight;

/* Scalar conversions (exact): ds_numeric.h. */

/* Row r of W as float32 into out[cols]. */
void ds_weight_row_f32(const ds_weight *w, uint32_t r, float *out);

/* y[i*rows + o] = sum_c W[o,c] * x[i*cols + c] for n input rows. Each output element is one
 * dot product with a fixed accumulation order (16 interleaved fp32 partial sums combined in a
 * fixed tree, fused multiply-add), so the value does not depend on n, on the other rows, on
 * the thread count or on the CPU's vector ISA. pool may be NULL. */
struct ds_pool;
/* Tests: force the portable kernel instead of AVX2+FMA (results must not change). */
void ds_tensor_force_portable(bool on);
void ds_weight_matmul(const ds_weight *w, const float *x, uint32_t n, float *y,
                      struct ds_pool *pool);
/* The same for output rows [r0, r1) only, on the calling thread: y[i*rows + o] for o in the
 * range (the other elements of y are not touched). Lets a caller put several matmuls into one
 * parallel job (the experts of a layer); the values are those of ds_weight_matmul. */
void ds_weight_matmul_rows(const ds_weight *w, const float *x, uint32_t n, float *y, uint32_t r0,
                           uint32_t r1);
/* The input rows of a matmul, prepared for the weight's kernel. For the ggml block types with an
 * integer kernel (Q8_0, Q4_0, Q5_0, Q2_K..Q6_K; see model/qdot.c) the rows are quantised to 8
 * bits once (fmt DS_QX_Q8_0: a float scale per 32 values, DS_QX_Q8_K: per 256; both with the
 * sums per 16) and every task reads them; for every other weight fmt is DS_QX_NONE and only x
 * is used. A row's result still depends only on that row. */
enum { DS_QX_NONE, DS_QX_Q8_0, DS_QX_Q8_K };
typedef struct ds_matmul_in {
    const float *x; /* [n, cols] */
    uint32_t n, cols;
    uint32_t fmt;
    const int8_t *q;     /* [n, cols] */
    const float *d;      /* [n, cols / block] */
    const int16_t *bsum; /* [n, cols / 16] */
} ds_matmul_in;
/* Bytes of buffer ds_matmul_in_prepare needs for n rows into w (0: w takes the floats). */
size_t ds_matmul_in_bytes(const ds_weight *w, uint32_t n);
/* Fills in for x [n, w->cols]; buf (ds_matmul_in_bytes long, 64-byte aligned, may be NULL when
 * that is 0) holds the quantised rows and must outlive in. */
void ds_matmul_in_prepare(const ds_weight *w, const float *x, uint32_t n, void *buf,
                          ds_matmul_in *in);
/* True when in (prepared for some weight) is the format w takes, so it can be shared (gate and
 * up of one FFN). */
bool ds_matmul_in_fits(const ds_matmul_in *in, const ds_weight *w);
/* ds_weight_matmul_rows on prepared rows (the same values). */
void ds_weight_matmul_rows_in(const ds_weight *w, const ds_matmul_in *in, float *y, uint32_t r0,
                              uint32_t r1);
/* How ggml block weights with an integer kernel multiply: DS_QDOT_INT8 (the default; 8-bit
 * activations, as above) or DS_QDOT_DEQUANT (dequantised to float32 and the canonical float
 * order: the reference, slower). The environment variable DS_QDOT=dequant sets the latter at
 * start. Every process of a cluster must use the same mode (tokens depend on it). */
typedef enum { DS_QDOT_INT8, DS_QDOT_DEQUANT } ds_qdot_mode;
void ds_tensor_set_qdot(ds_qdot_mode mode);
ds_qdot_mode ds_tensor_qdot(void);
/* How many output rows one task of ds_weight_matmul takes for n input rows on `threads`
 * threads (a multiple of 12, so the kernels' row tiles stay whole). */
uint32_t ds_weight_matmul_task_rows(const ds_weight *w, uint32_t n, uint32_t threads);
/* Attention's products (forward.c), each in a fixed order:
 * ds_dot8: 8 partial sums (lane j takes elements j, j+8, ...), combined
 * ((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7)), then the tail in order with fmaf.
 * ds_dot8_many: out[t] = ds_dot8(a, b + t*b_stride, n) for t < m.
 * ds_wsum: out[c] = sum over t ascending of w[t] * e[t*e_stride + c] (one fmaf chain from +0).
 * ds_weight_vecmat: out_i[c] = sum over d ascending of a_i[d] * W[r0+d][c] for n vectors a_i
 *   (a + i*a_stride, nr values) and every column c (one fmaf chain from +0 per element).
 * ds_weight_dot8_rows: out_i[j] = ds_dot8(W[r0+j], v_i, cols) for j < nr and n vectors. */
float ds_dot8(const float *a, const float *b, uint32_t n);
void ds_dot8_many(const float *a, const float *b, size_t b_stride, uint32_t m, uint32_t n,
                  float *out);
void ds_wsum(const float *w, const float *e, size_t e_stride, uint32_t m, uint32_t n, float *out);
void ds_weight_vecmat(const ds_weight *w, uint32_t r0, uint32_t nr, const float *a, size_t a_stride,
                      uint32_t n, float *out, size_t out_stride);
void ds_weight_dot8_rows(const ds_weight *w, uint32_t r0, uint32_t nr, const float *v,
                         size_t v_stride, uint32_t n, float *out, size_t out_stride);
/* A 64-byte aligned buffer of at least n floats owned by the calling thread, kept (and grown)
 * between calls so hot loops allocate nothing once warm; freed when the thread exits. Slot 0 is
 * used inside the matmul kernels, slot 1 by the attention; the pointer is valid until the next
 * call with the same slot on the same thread. NULL when the memory cannot be had. */
float *ds_thread_scratch(unsigned slot, size_t n);
/* True when the AVX2+FMA+F16C kernels run (the CPU has them and the portable kernel is not
 * forced). */
bool ds_tensor_use_avx2(void);
/* True when the prefill GEMM uses its AVX-512 tile (the CPU has AVX-512F, AVX2 is in use, and
 * neither ds_tensor_force_avx2 nor DS_NO_AVX512=1 keeps the AVX2 tile). Same bits either way. */
bool ds_tensor_use_avx512(void);
void ds_tensor_force_avx2(bool on);
/* Weight rows the one-row decode tile interleaves: 3 (default; the AVX-512 decode where the CPU
 * has it) or 1 (the AVX2 tile one row at a time); also DS_DECODE_ROWS=1. Speed only: the bits
 * are the same. */
void ds_tensor_set_decode_rows(uint32_t rows);

#endif
