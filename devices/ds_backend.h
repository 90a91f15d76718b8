/* ds_backend.h — one compute interface (an ops table) for every device kind: cpu, opencl, cuda.
 *
 * Units never call a backend directly: they open a ds_backend by name and call the
 * ds_backend_* functions below, which check every size and offset against the buffers before
 * a backend sees them. A backend implements ds_backend_ops; cpu and opencl are built in, cuda
 * is a plugin (libds_backend_cuda.so, loaded with dlopen, exporting one symbol
 * `ds_backend_cuda_ops`) so that nodes without CUDA run the same binary.
 *
 * This API knows buffers, dtypes and shapes only — nothing of models. All activations are
 * float32 row-major. Weights are uploaded once in their checkpoint format (F32, BF16, or
 * F8_E4M3 with float32 block scales) and each backend stores them the way it computes on them.
 *
 * Numerics. matmul computes every output element with the engine's fixed accumulation order:
 * lane j (of 16) accumulates elements c = j mod 16 below cols rounded down to 16 with fused
 * multiply-add, lanes combine as a[j] = l[j] + l[j+8], ((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7)),
 * then the tail elements in order with fma; FP8 elements are (fp8 value * block scale) rounded
 * to float before the fma. The cpu and opencl backends follow it exactly (bit-identical to
 * ds_weight_matmul); cuda's cuBLAS path for large batches does not (documented tolerance).
 * Other ops are within the per-op tolerances of tests/test_ops.c (exp/sqrt and reductions may
 * differ in the last bits between devices). */
#ifndef DS_BACKEND_H
#define DS_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ds_err.h"
#include "ds_numeric.h" /* exact scalar conversions, shared with the engine */

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever ds_backend_ops changes; a plugin built for another ABI is refused. */
#define DS_BACKEND_ABI 2

enum ds_bk_dtype {
    DS_BK_F32 = 0,
    DS_BK_BF16 = 1,
    DS_BK_F8_E4M3 = 2,
};

/* A linear weight y = W x, W [rows, cols] row-major, as found in a checkpoint. */
typedef struct ds_bk_weight_desc {
    enum ds_bk_dtype dtype;
    uint32_t rows, cols;             /* out features, in features */
    const void *data;                /* rows*cols elements of dtype */
    const float *scale_inv;          /* F8 only: [ceil(rows/block_rows), ceil(cols/block_cols)] */
    uint32_t block_rows, block_cols; /* F8 only: block size (128x128 in DeepSeek-V3) */
} ds_bk_weight_desc;

/* Absorbed MLA attention (ds_bk_mla_attn): the shapes of one layer. */
typedef struct ds_bk_mla_desc {
    uint32_t heads;      /* H */
    uint32_t nope, rope; /* qk_nope_head_dim, qk_rope_head_dim */
    uint32_t v;          /* v_head_dim */
    uint32_t C;          /* kv_lora_rank: the cache holds C + rope floats per position */
    float scale;         /* softmax scale */
} ds_bk_mla_desc;

/* The router's rules (ds_bk_router), as model/router.c applies them. */
enum ds_bk_router_method {
    DS_BK_ROUTER_GREEDY = 0,        /* top-k over all experts */
    DS_BK_ROUTER_GROUP_MAX = 1,     /* group score: the max (group_limited_greedy) */
    DS_BK_ROUTER_GROUP_TOP2SUM = 2, /* group score: sum of the top 2 (noaux_tc) */
};
typedef struct ds_bk_router_desc {
    uint32_t E, k; /* routed experts, experts per token (k <= 64) */
    uint32_t n_group, topk_group;
    uint32_t sigmoid; /* 1: sigmoid scores (V3), 0: softmax (V2) */
    uint32_t method;  /* enum ds_bk_router_method */
    uint32_t norm;    /* divide the weights by their sum (+1e-20) when k > 1 */
    float scaling;    /* routed_scaling_factor, times every weight */
} ds_bk_router_desc;

/* What a backend implements. `impl` is the backend's own device context; buffers and weights
 * are its own handles. Sizes are already validated by the generic layer. Returns 0 or a
 * negative errno; err (may be NULL) gets the device's message. Ops may run asynchronously
 * (in order on one queue/stream); buf_read waits for them. */
typedef struct ds_backend_ops {
    uint32_t abi;     /* DS_BACKEND_ABI */
    const char *name; /* "cpu", "opencl", "cuda" */
    /* arg: device index as text or NULL (first device). name gets the device's name. */
    int (*open)(const char *arg, void **impl, char *name, size_t name_len, ds_error *err);
    void (*close)(void *impl);
    int (*buf_alloc)(void *impl, size_t bytes, void **buf, ds_error *err);
    void (*buf_free)(void *impl, void *buf);
    int (*buf_write)(void *impl, void *buf, size_t off, const void *src, size_t bytes,
                     ds_error *err);
    int (*buf_read)(void *impl, void *buf, size_t off, void *dst, size_t bytes, ds_error *err);
    int (*weight_upload)(void *impl, const ds_bk_weight_desc *d, void **w, ds_error *err);
    void (*weight_free)(void *impl, void *w);
    /* y[n, rows] = x[n, cols] W^T (offsets in floats into x and y). */
    int (*matmul)(void *impl, void *w, const ds_bk_weight_desc *d, void *x, size_t x_off,
                  uint32_t n, void *y, size_t y_off, ds_error *err);
    /* y[n, d] = gamma[d] * (x * 1/sqrt(mean(x^2) + eps)), row by row; y may equal x. */
    int (*rmsnorm)(void *impl, void *x, void *gamma, uint32_t n, uint32_t d, float eps, void *y,
                   ds_error *err);
    /* For v in 0..n*heads-1 (row i = v / heads): pairs (x[v*stride+off+2p], x[..+2p+1])
     * rotated by cs[i*dim/2+p], sn[i*dim/2+p]: (a*c - b*s, a*s + b*c). */
    int (*rope)(void *impl, void *x, uint32_t n, uint32_t heads, uint32_t stride, uint32_t off,
                uint32_t dim, void *cs, void *sn, ds_error *err);
    /* MLA decode over the latent cache of one sequence: cache [t, C + R] (latent then rope
     * part per position), q_lat [H, C], q_pe [H, R]; per head s_j = (q_lat.c_j + q_pe.kpe_j)
     * * scale, p = softmax(s), out[H, C] = sum_j p_j c_j. */
    int (*mla_decode)(void *impl, void *q_lat, void *q_pe, void *cache, uint32_t heads, uint32_t C,
                      uint32_t R, uint32_t t, float scale, void *out, ds_error *err);
    /* g[i] = silu(g[i]) * u[i] = g/(1+exp(-g)) * u for count elements. */
    int (*swiglu)(void *impl, void *g, void *u, size_t count, ds_error *err);
    /* Per row of scores [n, E]: the k largest of scores + bias (bias [E] may be NULL), ties to
     * the lower index, in descending order: ids [n, k] (int32), weights [n, k] = the unbiased
     * scores of the chosen ids. */
    int (*topk)(void *impl, void *scores, void *bias, uint32_t n, uint32_t E, uint32_t k, void *ids,
                void *weights, ds_error *err);
    /* y[i] += x[i] */
    int (*add)(void *impl, void *y, void *x, size_t count, ds_error *err);
    /* y[i] *= s */
    int (*scale)(void *impl, void *y, float s, size_t count, ds_error *err);
    /* dst[dst_off..+bytes) = src[src_off..+bytes) on the device (byte offsets). */
    int (*copy)(void *impl, void *dst, size_t dst_off, void *src, size_t src_off, size_t bytes,
                ds_error *err);
    /* Waits until every queued op is done. */
    int (*finish)(void *impl, ds_error *err);

    /* ---- ABI 2: the ops of whole units, each bit-identical to the CPU engine's own code
     * (model/forward.c, model/router.c): what lets attention, its KV cache, the router, the
     * dense and shared FFNs, the embedding and the head run on a device in exact mode. ---- */
    /* Rows i < n of x (x_off + i*x_stride, d floats): y = gamma * (x * r) with
     * r = (float)(1 / sqrt(ss / d + eps)), ss the sum of x^2 in double in element order. */
    int (*rmsnorm_rows)(void *impl, void *x, size_t x_off, size_t x_stride, void *gamma, uint32_t n,
                        uint32_t d, double eps, void *y, size_t y_off, size_t y_stride,
                        ds_error *err);
    /* Absorbed MLA for n consecutive positions pos0..pos0+n-1 of one sequence. q [n, H*(nope +
     * rope)] (rope part already rotated); cache [>= pos0+n, C+rope] holds the normalised latent
     * and roped k_pe of every position up to pos0+n-1; w = kv_b [H*(nope+v), C]. Row i, head h:
     * q_lat[c] = one fma chain over d < nope of q_nope[d] * W[h*(nope+v)+d][c] (from +0);
     * s_t = (dot8(q_lat, c_t) + dot8(q_pe, kpe_t)) * scale for t <= pos0+i; softmax in order
     * (ds_expf); o_lat[c] = one fma chain over t of p_t * c_t[c]; att[i, h*v + j] =
     * dot8(W[h*(nope+v)+nope+j], o_lat). dot8: ds_dot8's 8-lane order (model/ds_tensor.h).
     * scratch: at least n*H*(2C + pos0+n) floats. */
    int (*mla_attn)(void *impl, const ds_bk_mla_desc *m, void *q, size_t q_off, void *w,
                    const ds_bk_weight_desc *d, void *cache, uint32_t pos0, uint32_t n,
                    void *scratch, void *att, size_t att_off, ds_error *err);
    /* ds_router_select for n rows of gate logits [n, E] (bias [E] may be NULL): ids [n, k]
     * int32, weights [n, k]. scratch: at least n*(3E + 2*n_group) floats. */
    int (*router)(void *impl, const ds_bk_router_desc *r, void *logits, void *bias, uint32_t n,
                  void *scratch, void *ids, void *weights, ds_error *err);
    /* y[i, :] = row ids[i] of W widened to float32 (exact), for n rows; ids are host values,
     * already checked against rows. */
    int (*gather_rows)(void *impl, void *w, const ds_bk_weight_desc *d, const int32_t *ids,
                       uint32_t n, void *y, size_t y_off, ds_error *err);
    /* (optional) exact true: every op in the engine's order (cuda: no cuBLAS for batches);
     * false: the backend's fast paths. NULL: the backend is always exact. */
    void (*set_exact)(void *impl, bool exact);
} ds_backend_ops;

typedef struct ds_backend ds_backend;
typedef struct ds_bk_buf ds_bk_buf;
typedef struct ds_bk_weight ds_bk_weight;

/* Opens a backend by spec: "cpu", "opencl", "opencl:N" (N-th OpenCL device over all
 * platforms), "cuda", "cuda:N". -ENOENT (with err) when the kind is not available here (no
 * OpenCL device, no CUDA plugin or driver). */
int ds_backend_open(const char *spec, ds_backend **ret, ds_error *err);
ds_backend *ds_backend_free(ds_backend *b);
/* "cpu" / "opencl" / "cuda". */
const char *ds_backend_kind(const ds_backend *b);
/* The device's name as reported by its driver. */
const char *ds_backend_device(const ds_backend *b);

/* Device buffers (bytes). ds_bk_buf_free is NULL-safe and returns NULL. */
int ds_bk_buf_new(ds_backend *b, size_t bytes, ds_bk_buf **ret, ds_error *err);
ds_bk_buf *ds_bk_buf_free(ds_bk_buf *buf);
size_t ds_bk_buf_size(const ds_bk_buf *buf);
int ds_bk_buf_write(ds_bk_buf *buf, size_t off, const void *src, size_t bytes, ds_error *err);
int ds_bk_buf_read(ds_bk_buf *buf, size_t off, void *dst, size_t bytes, ds_error *err);

/* Uploads a weight (validated: dtype, non-zero shape below 2^20 per side, F8 scales and
 * block sizes present). The host data may be released after the call. */
int ds_bk_weight_new(ds_backend *b, const ds_bk_weight_desc *d, ds_bk_weight **ret, ds_error *err);
ds_bk_weight *ds_bk_weight_free(ds_bk_weight *w);
uint32_t ds_bk_weight_rows(const ds_bk_weight *w);
uint32_t ds_bk_weight_cols(const ds_bk_weight *w);
/* Bytes the weight occupies in checkpoint format (what one matvec must stream). */
size_t ds_bk_weight_bytes(const ds_bk_weight *w);

/* The ops (see ds_backend_ops for the formulas). Offsets and counts are in elements (floats
 * / int32); every range is checked against the buffers (-ERANGE with err). */
int ds_bk_matmul(ds_bk_weight *w, ds_bk_buf *x, size_t x_off, uint32_t n, ds_bk_buf *y,
                 size_t y_off, ds_error *err);
int ds_bk_rmsnorm(ds_bk_buf *x, ds_bk_buf *gamma, uint32_t n, uint32_t d, float eps, ds_bk_buf *y,
                  ds_error *err);
int ds_bk_rope(ds_bk_buf *x, uint32_t n, uint32_t heads, uint32_t stride, uint32_t off,
               uint32_t dim, ds_bk_buf *cs, ds_bk_buf *sn, ds_error *err);
int ds_bk_mla_decode(ds_bk_buf *q_lat, ds_bk_buf *q_pe, ds_bk_buf *cache, uint32_t heads,
                     uint32_t C, uint32_t R, uint32_t t, float scale, ds_bk_buf *out,
                     ds_error *err);
/* Bit-identical to the engine's silu(g) * u (ds_expf, a correctly rounded division) on cpu,
 * opencl devices with fp64 and cuda. */
int ds_bk_swiglu(ds_bk_buf *g, ds_bk_buf *u, size_t count, ds_error *err);
int ds_bk_topk(ds_bk_buf *scores, ds_bk_buf *bias, uint32_t n, uint32_t E, uint32_t k,
               ds_bk_buf *ids, ds_bk_buf *weights, ds_error *err);
int ds_bk_add(ds_bk_buf *y, ds_bk_buf *x, size_t count, ds_error *err);
int ds_bk_scale(ds_bk_buf *y, float s, size_t count, ds_error *err);
/* Device-to-device copy (byte offsets); the bench's bandwidth probe. */
int ds_bk_copy(ds_bk_buf *dst, size_t dst_off, ds_bk_buf *src, size_t src_off, size_t bytes,
               ds_error *err);
int ds_backend_finish(ds_backend *b, ds_error *err);

/* ---- ABI 2 ops (formulas at ds_backend_ops; offsets and strides in floats). Bit-identical to
 * the engine on cpu, opencl (devices with cl_khr_fp64: -ENOTSUP otherwise) and cuda. ---- */
int ds_bk_rmsnorm_rows(ds_bk_buf *x, size_t x_off, size_t x_stride, ds_bk_buf *gamma, uint32_t n,
                       uint32_t d, double eps, ds_bk_buf *y, size_t y_off, size_t y_stride,
                       ds_error *err);
/* Floats of scratch ds_bk_mla_attn needs. */
size_t ds_bk_mla_attn_scratch(const ds_bk_mla_desc *m, uint32_t pos0, uint32_t n);
int ds_bk_mla_attn(const ds_bk_mla_desc *m, ds_bk_buf *q, size_t q_off, ds_bk_weight *kv_b,
                   ds_bk_buf *cache, uint32_t pos0, uint32_t n, ds_bk_buf *scratch, ds_bk_buf *att,
                   size_t att_off, ds_error *err);
size_t ds_bk_router_scratch(const ds_bk_router_desc *r, uint32_t n);
int ds_bk_router(const ds_bk_router_desc *r, ds_bk_buf *logits, ds_bk_buf *bias, uint32_t n,
                 ds_bk_buf *scratch, ds_bk_buf *ids, ds_bk_buf *weights, ds_error *err);
/* Exact (true): matmul keeps the engine's order for every batch size (cuda then never calls
 * cuBLAS); false: the backend's fast paths (cuda: cuBLAS SGEMM from 16 rows, within the op
 * suite's tolerance). cpu and opencl are always exact. The default is each backend's own
 * (cuda: fast). */
void ds_backend_set_exact(ds_backend *b, bool exact);
/* The embedding lookup: -ERANGE (naming the id) for an id outside [0, rows). */
int ds_bk_gather_rows(ds_bk_weight *w, const int32_t *ids, uint32_t n, ds_bk_buf *y, size_t y_off,
                      ds_error *err);

/* What a backend achieves, for calibration (the devices issue) and bench/bench_matvec: the
 * device-to-device copy bandwidth of a copy_bytes buffer ((read + written bytes) / s), and the
 * matvec (n = 1) bandwidth ((weight + x + y bytes) / s) of a random [rows, cols] weight in
 * each dtype (FP8 with 128x128 blocks), each timed for about `seconds` (at least 3 runs).
 * Uses the same kernels as the units, so the cost model sees what they achieve. */
typedef struct ds_bk_probe {
    double copy_gbs;      /* GB/s, 1e9 bytes */
    double matvec_gbs[3]; /* indexed by enum ds_bk_dtype */
} ds_bk_probe;
int ds_backend_probe(ds_backend *b, uint32_t rows, uint32_t cols, size_t copy_bytes, double seconds,
                     ds_bk_probe *out, ds_error *err);

/* Built-in tables (the generic layer and tests use them; units go through ds_backend_open). */
extern const ds_backend_ops ds_backend_cpu_ops;
extern const ds_backend_ops ds_backend_opencl_ops;

#ifdef __cplusplus
}
#endif
#endif
