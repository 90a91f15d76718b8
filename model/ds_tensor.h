/* ds_tensor.h — safetensors checkpoints (mmap) and the weight formats the engine computes on.
 *
 * A ds_st is a set of safetensors files opened read-only and mapped: one file
 * (model.safetensors) or the shards listed in model.safetensors.index.json. Every header is
 * validated before any tensor is exposed: header length inside the file, JSON well formed,
 * known dtype, shape product * dtype size == data_offsets length, offsets inside the data
 * area, no two tensors overlapping, no duplicate names. Errors name the file and the tensor.
 *
 * A ds_weight is a 2-D linear weight [rows, cols] (row-major, out x in) kept at checkpoint
 * precision: F32, BF16 (converted per element while streaming) or F8_E4M3 with its
 * weight_scale_inv block scales (dequantised per element: fp8 * scale_inv[r/br][c/bc]).
 * F16 checkpoints are converted once at load to F32 (rare; keeps one less kernel). */
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
    enum ds_dtype dtype;             /* F32, BF16 or F8_E4M3 (F16 is converted to F32 at load) */
    uint32_t rows, cols;             /* out features, in features */
    const void *data;                /* rows*cols elements of dtype, row-major */
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

#endif
