/* backend_cuda.cu — the cuda backend, built as the plugin libds_backend_cuda.so (dlopen'ed by
 * devices/backend.c, exporting one symbol: ds_backend_cuda_ops).
 *
 * Kernels mirror kernels/ops.cl. matmul for small batches (n < CUBLAS_MIN_N) uses the fixed
 * accumulation order of ds_backend.h (built with -fmad=false so nothing else is fused), the
 * same values as the cpu and opencl backends; for batches it calls cuBLAS SGEMM (F32 weights
 * directly, BF16/FP8 after widening the weight into a float32 scratch), where the tensor-core
 * order differs (tolerance, not bit-identity). Two streams: uploads go through pinned staging
 * on a copy stream and the compute stream waits on an event, so a write overlaps the kernels
 * already queued. This file does not link ds_common: errors are written into ds_error here. */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds_backend.h"

#define NB           4          /* input rows per matmul thread */
#define RPG          16         /* matmul rows per block: block (16, RPG) = 256 threads */
#define CUBLAS_MIN_N 16         /* batches at least this large go to cuBLAS */
#define STAGE        (8u << 20) /* bytes per pinned staging slot */

static int set_err(ds_error *err, int code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

/* Exact FP8 E4M3 value (a copy of ds_fp8_e4m3_to_f32: the plugin links nothing of dsd). */
static float fp8_value(unsigned v)
{
    unsigned s = v >> 7, e = (v >> 3) & 0xf, m = v & 7;
    float f = e == 15 && m == 7 ? NAN
              : e == 0          ? ldexpf((float)m, -9)
                                : ldexpf((float)(m | 8), (int)e - 10);
    return s ? -f : f;
}

static int cu_fail(ds_error *err, cudaError_t e, const char *what)
{
    return set_err(err, e == cudaErrorMemoryAllocation ? -ENOMEM : -EIO, "cuda: %s: %s", what,
                   cudaGetErrorString(e));
}

#define CU(call, what)                                                                             \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess)                                                                     \
            return cu_fail(err, e_, what);                                                         \
    } while (0)

typedef struct cu_ctx {
    int dev;
    cudaStream_t compute, copy;
    cudaEvent_t copied;        /* recorded on copy after a write; compute waits on it */
    unsigned char *stage[2];   /* pinned staging slots */
    cudaEvent_t stage_free[2]; /* recorded when a slot's copy is done */
    cublasHandle_t blas;
    float *scratch;   /* widened weight for cuBLAS (float32), grown on demand */
    size_t scratch_n; /* floats */
    float *lut;       /* [256] FP8 values on the device */
    bool exact;       /* matmul in the fixed order for every batch (no cuBLAS) */
} cu_ctx;

typedef struct cu_weight {
    void *data;   /* checkpoint format */
    float *scale; /* F8 block scales or NULL */
} cu_weight;

/* ---- kernels ---- */

/* ds_expf (common/ds_numeric.c), the same sequence of float roundings (every operation an
 * explicit round-to-nearest intrinsic): bit-identical to the engine's exp. */
__device__ __forceinline__ float ds_expf_dev(float x)
{
    if (isnan(x))
        return x;
    if (x > 88.0f)
        return INFINITY;
    if (x < -87.0f)
        return 0.0f;
    float kf = __fmul_rn(x, 1.44269502f);
    int k = (int)(kf >= 0.0f ? __fadd_rn(kf, 0.5f) : __fsub_rn(kf, 0.5f));
    float r = __fsub_rn(x, __fmul_rn((float)k, 0.693359375f));
    r = __fsub_rn(r, __fmul_rn((float)k, -2.12194440e-4f));
    float p = 1.98412698e-4f;
    p = __fadd_rn(__fmul_rn(p, r), 1.38888889e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 8.33333333e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 4.16666667e-2f);
    p = __fadd_rn(__fmul_rn(p, r), 1.66666667e-1f);
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    return __fmul_rn(p, __uint_as_float((unsigned)(k + 127) << 23));
}

__device__ __forceinline__ float wload(int dt, const void *w, size_t i, unsigned c,
                                       const float *srow, const float *lut, unsigned bcol)
{
    if (dt == DS_BK_F32)
        return ((const float *)w)[i];
    if (dt == DS_BK_BF16)
        return __uint_as_float((unsigned)((const unsigned short *)w)[i] << 16);
    /* bcol with the top bit set: log2 of a power-of-two block width (a shift, not a division) */
    unsigned cb = (bcol & 0x80000000u) ? c >> (bcol & 31u) : c / bcol;
    return __fmul_rn(lut[((const unsigned char *)w)[i]], srow[cb]);
}

template <int DT>
__global__ void k_matmul(const void *w, const float *scale, const float *lut, unsigned rows,
                         unsigned cols, unsigned nbc, unsigned brow, unsigned bcol, const float *x,
                         unsigned n, float *y)
{
    __shared__ float part[RPG][NB][16];
    unsigned lane = threadIdx.x, lr = threadIdx.y;
    unsigned r = blockIdx.x * RPG + lr, i0 = blockIdx.y * NB;
    unsigned nr = n - i0 < NB ? n - i0 : NB;
    unsigned c16 = cols & ~15u;
    float acc[NB] = {0.0f, 0.0f, 0.0f, 0.0f};
    const float *srow = DT == DS_BK_F8_E4M3 && r < rows ? scale + (size_t)(r / brow) * nbc : 0;
    size_t base = (size_t)r * cols;
    if (r < rows) {
        const float *xb = x + (size_t)i0 * cols;
        for (unsigned c = lane; c < c16; c += 16) {
            float wv = wload(DT, w, base + c, c, srow, lut, bcol);
#pragma unroll
            for (unsigned q = 0; q < NB; q++)
                if (q < nr)
                    acc[q] = __fmaf_rn(wv, xb[(size_t)q * cols + c], acc[q]);
        }
    }
#pragma unroll
    for (unsigned q = 0; q < NB; q++)
        part[lr][q][lane] = acc[q];
    __syncthreads();
    if (r < rows && lane < nr) {
        const float *p = part[lr][lane];
        float a0 = p[0] + p[8], a1 = p[1] + p[9], a2 = p[2] + p[10], a3 = p[3] + p[11];
        float a4 = p[4] + p[12], a5 = p[5] + p[13], a6 = p[6] + p[14], a7 = p[7] + p[15];
        float s = ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7));
        const float *xi = x + (size_t)(i0 + lane) * cols;
        for (unsigned c = c16; c < cols; c++)
            s = __fmaf_rn(wload(DT, w, base + c, c, srow, lut, bcol), xi[c], s);
        y[(size_t)(i0 + lane) * rows + r] = s;
    }
}

/* Widens rows*cols weight elements into float32 (cuBLAS path). */
template <int DT>
__global__ void k_widen(const void *w, const float *scale, const float *lut, unsigned rows,
                        unsigned cols, unsigned nbc, unsigned brow, unsigned bcol, float *out)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * cols)
        return;
    unsigned r = (unsigned)(i / cols), c = (unsigned)(i % cols);
    const float *srow = DT == DS_BK_F8_E4M3 ? scale + (size_t)(r / brow) * nbc : 0;
    out[i] = wload(DT, w, i, c, srow, lut, bcol);
}

__global__ void k_rmsnorm(const float *x, const float *gamma, unsigned d, float eps, float *y)
{
    __shared__ float red[256];
    unsigned row = blockIdx.x, lid = threadIdx.x, L = blockDim.x;
    const float *xr = x + (size_t)row * d;
    float *yr = y + (size_t)row * d;
    float ss = 0.0f;
    for (unsigned c = lid; c < d; c += L)
        ss = __fmaf_rn(xr[c], xr[c], ss);
    red[lid] = ss;
    __syncthreads();
    for (unsigned s = L / 2; s > 0; s >>= 1) {
        if (lid < s)
            red[lid] += red[lid + s];
        __syncthreads();
    }
    float r = 1.0f / sqrtf(red[0] / (float)d + eps);
    for (unsigned c = lid; c < d; c += L)
        yr[c] = gamma[c] * (xr[c] * r);
}

/* One thread per (vector, pair): 1-D, so n x heads is not bound by the 65535 grid.y limit. */
__global__ void k_rope(float *x, unsigned nv, unsigned heads, unsigned stride, unsigned off,
                       unsigned dim, const float *cs, const float *sn)
{
    unsigned hd = dim / 2;
    size_t g = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= (size_t)nv * hd)
        return;
    unsigned v = (unsigned)(g / hd), p = (unsigned)(g % hd);
    unsigned i = v / heads;
    float *xv = x + (size_t)v * stride + off;
    float c = cs[(size_t)i * hd + p], s = sn[(size_t)i * hd + p];
    float a = xv[2 * p], b = xv[2 * p + 1];
    xv[2 * p] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    xv[2 * p + 1] = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
}

__global__ void k_mla(const float *q_lat, const float *q_pe, const float *cache, unsigned C,
                      unsigned R, unsigned t, float scale, float *out, float *scores)
{
    __shared__ float red[256];
    unsigned h = blockIdx.x, lid = threadIdx.x, L = blockDim.x;
    const float *ql = q_lat + (size_t)h * C, *qp = q_pe + (size_t)h * R;
    float *s = scores + (size_t)h * t;
    float mx = -INFINITY;
    for (unsigned j = lid; j < t; j += L) {
        const float *row = cache + (size_t)j * (C + R);
        float a = 0.0f;
        for (unsigned c = 0; c < C; c++)
            a = __fmaf_rn(ql[c], row[c], a);
        for (unsigned c = 0; c < R; c++)
            a = __fmaf_rn(qp[c], row[C + c], a);
        s[j] = a * scale;
        mx = fmaxf(mx, s[j]);
    }
    red[lid] = mx;
    __syncthreads();
    for (unsigned k = L / 2; k > 0; k >>= 1) {
        if (lid < k)
            red[lid] = fmaxf(red[lid], red[lid + k]);
        __syncthreads();
    }
    mx = red[0];
    __syncthreads();
    float sum = 0.0f;
    for (unsigned j = lid; j < t; j += L) {
        float e = expf(s[j] - mx);
        s[j] = e;
        sum += e;
    }
    red[lid] = sum;
    __syncthreads();
    for (unsigned k = L / 2; k > 0; k >>= 1) {
        if (lid < k)
            red[lid] += red[lid + k];
        __syncthreads();
    }
    sum = red[0];
    for (unsigned c = lid; c < C; c += L) {
        float o = 0.0f;
        for (unsigned j = 0; j < t; j++)
            o = __fmaf_rn(s[j] / sum, cache[(size_t)j * (C + R) + c], o);
        out[(size_t)h * C + c] = o;
    }
}

__global__ void k_swiglu(float *g, const float *u, size_t count)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count)
        g[i] = __fdiv_rn(g[i], __fadd_rn(1.0f, ds_expf_dev(-g[i]))) * u[i];
}

__global__ void k_topk(const float *scores, const float *bias, unsigned n, unsigned E, unsigned k,
                       int *ids, float *weights)
{
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    const float *s = scores + (size_t)i * E;
    int *id = ids + (size_t)i * k;
    for (unsigned j = 0; j < k; j++) {
        int best = -1;
        float bv = 0.0f;
        for (unsigned e = 0; e < E; e++) {
            bool taken = false;
            for (unsigned q = 0; q < j; q++)
                taken |= id[q] == (int)e;
            if (taken)
                continue;
            float v = bias ? __fadd_rn(s[e], bias[e]) : s[e];
            if (best < 0 || v > bv) {
                best = (int)e;
                bv = v;
            }
        }
        id[j] = best;
        weights[(size_t)i * k + j] = s[best];
    }
}

__global__ void k_add(float *y, const float *x, size_t count)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count)
        y[i] += x[i];
}

__global__ void k_scale(float *y, float f, size_t count)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count)
        y[i] *= f;
}

/* ---- ops ---- */

static void cu_close(void *impl)
{
    cu_ctx *c = (cu_ctx *)impl;
    if (!c)
        return;
    cudaSetDevice(c->dev);
    if (c->compute)
        cudaStreamSynchronize(c->compute);
    if (c->copy)
        cudaStreamSynchronize(c->copy);
    if (c->blas)
        cublasDestroy(c->blas);
    for (int i = 0; i < 2; i++) {
        if (c->stage[i])
            cudaFreeHost(c->stage[i]);
        if (c->stage_free[i])
            cudaEventDestroy(c->stage_free[i]);
    }
    if (c->copied)
        cudaEventDestroy(c->copied);
    cudaFree(c->scratch);
    cudaFree(c->lut);
    if (c->compute)
        cudaStreamDestroy(c->compute);
    if (c->copy)
        cudaStreamDestroy(c->copy);
    free(c);
}

static int cu_open(const char *arg, void **impl, char *name, size_t name_len, ds_error *err)
{
    *impl = NULL;
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0)
        return set_err(err, -ENOENT, "cuda: no CUDA device (%s)",
                       e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    int dev = arg ? atoi(arg) : 0;
    if (dev < 0 || dev >= count)
        return set_err(err, -ENOENT, "cuda: device %d not found (%d devices)", dev, count);
    cu_ctx *c = (cu_ctx *)calloc(1, sizeof(*c));
    if (!c)
        return set_err(err, -ENOMEM, "cuda: out of memory");
    c->dev = dev;
    int rc = 0;
    float lut[256];
    cudaDeviceProp prop;
#define TRY(call, what)                                                                            \
    if ((e = (call)) != cudaSuccess) {                                                             \
        rc = cu_fail(err, e, what);                                                                \
        goto fail;                                                                                 \
    }
    TRY(cudaSetDevice(dev), "cudaSetDevice");
    TRY(cudaStreamCreateWithFlags(&c->compute, cudaStreamNonBlocking), "stream");
    TRY(cudaStreamCreateWithFlags(&c->copy, cudaStreamNonBlocking), "stream");
    TRY(cudaEventCreateWithFlags(&c->copied, cudaEventDisableTiming), "event");
    for (int i = 0; i < 2; i++) {
        TRY(cudaMallocHost((void **)&c->stage[i], STAGE), "pinned staging");
        TRY(cudaEventCreateWithFlags(&c->stage_free[i], cudaEventDisableTiming), "event");
    }
    for (int i = 0; i < 256; i++)
        lut[i] = fp8_value((unsigned)i);
    TRY(cudaMalloc((void **)&c->lut, sizeof(lut)), "lut");
    TRY(cudaMemcpy(c->lut, lut, sizeof(lut), cudaMemcpyHostToDevice), "lut");
    if (cublasCreate(&c->blas) != CUBLAS_STATUS_SUCCESS) {
        rc = set_err(err, -EIO, "cuda: cublasCreate failed");
        goto fail;
    }
    cublasSetStream(c->blas, c->compute);
    /* Plain float32 SGEMM: no TF32 tensor-core rounding of the inputs. */
    cublasSetMathMode(c->blas, CUBLAS_PEDANTIC_MATH);
    TRY(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
    snprintf(name, name_len, "%s", prop.name);
    *impl = c;
    return 0;
fail:
    cu_close(c);
    return rc;
#undef TRY
}

static int cu_buf_alloc(void *impl, size_t bytes, void **buf, ds_error *err)
{
    cu_ctx *c = (cu_ctx *)impl;
    CU(cudaSetDevice(c->dev), "cudaSetDevice");
    CU(cudaMalloc(buf, bytes), "cudaMalloc");
    return 0;
}

static void cu_buf_free(void *impl, void *buf)
{
    cu_ctx *c = (cu_ctx *)impl;
    /* Queued kernels may still use it. */
    cudaStreamSynchronize(c->compute);
    cudaFree(buf);
}

/* Host -> device through the two pinned slots on the copy stream; the compute stream waits on
 * the copy, the host does not (src is already consumed into pinned memory). */
static int cu_buf_write(void *impl, void *buf, size_t off, const void *src, size_t bytes,
                        ds_error *err)
{
    cu_ctx *c = (cu_ctx *)impl;
    CU(cudaSetDevice(c->dev), "cudaSetDevice");
    /* The copy must not overtake kernels that still read the old contents. */
    CU(cudaEventRecord(c->copied, c->compute), "event");
    CU(cudaStreamWaitEvent(c->copy, c->copied, 0), "event");
    int slot = 0;
    for (size_t done = 0; done < bytes; done += STAGE, slot ^= 1) {
        size_t n = bytes - done < STAGE ? bytes - done : STAGE;
        CU(cudaEventSynchronize(c->stage_free[slot]), "staging");
        memcpy(c->stage[slot], (const char *)src + done, n);
        CU(cudaMemcpyAsync((char *)buf + off + done, c->stage[slot], n, cudaMemcpyHostToDevice,
                           c->copy),
           "cudaMemcpyAsync");
        CU(cudaEventRecord(c->stage_free[slot], c->copy), "event");
    }
    CU(cudaEventRecord(c->copied, c->copy), "event");
    CU(cudaStreamWaitEvent(c->compute, c->copied, 0), "event");
    return 0;
}

static int cu_buf_read(void *impl, void *buf, size_t off, void *dst, size_t bytes, ds_error *err)
{
    cu_ctx *c = (cu_ctx *)impl;
    CU(cudaSetDevice(c->dev), "cudaSetDevice");
    CU(cudaMemcpyAsync(dst, (const char *)buf + off, bytes, cudaMemcpyDeviceToHost, c->compute),
       "cudaMemcpyAsync");
    CU(cudaStreamSynchronize(c->compute), "read");
    return 0;
}

static int cu_copy(void *impl, void *dst, size_t dst_off, void *src, size_t src_off, size_t bytes,
                   ds_error *err)
{
    cu_ctx *c = (cu_ctx *)impl;
    CU(cudaSetDevice(c->dev), "cudaSetDevice");
    CU(cudaMemcpyAsync((char *)dst + dst_off, (const char *)src + src_off, bytes,
                       cudaMemcpyDeviceToDevice, c->compute),
       "cudaMemcpyAsync");
    return 0;
}

static void cu_weight_free(void *impl, void *p)
{
    cu_weight *w = (cu_weight *)p;
    if (!w)
        return;
    cudaStreamSynchronize(((cu_ctx *)impl)->compute);
    cudaFree(w->data);
    cudaFree(w->scale);
    free(w);
}

static int cu_weight_upload(void *impl, const ds_bk_weight_desc *d, void **ret, ds_error *err)
{
    cu_ctx *c = (cu_ctx *)impl;
    size_t el = d->dtype == DS_BK_F32 ? 4 : d->dtype == DS_BK_BF16 ? 2 : 1;
    size_t bytes = (size_t)d->rows * d->cols * el;
    cu_weight *w = (cu_weight *)calloc(1, sizeof(*w));
    if (!w)
        return set_err(err, -ENOMEM, "cuda: out of memory");
    int rc = cu_buf_alloc(c, bytes, &w->data, err);
    if (rc == 0)
        rc = cu_buf_write(c, w->data, 0, d->data, bytes, err);
    if (rc == 0 && d->dtype == DS_BK_F8_E4M3) {
        size_t ns = (size_t)((d->rows + d->block_rows - 1) / d->block_rows) *
                    ((d->cols + d->block_cols - 1) / d->block_cols);
        rc = cu_buf_alloc(c, ns * sizeof(float), (void **)&w->scale, err);
        if (rc == 0)
            rc = cu_buf_write(c, w->scale, 0, d->scale_inv, ns * sizeof(float), err);
    }
    if (rc < 0) {
        cu_weight_free(c, w);
        return rc;
    }
    *ret = w;
    return 0;
}

static int launch_check(ds_error *err, const char *what)
{
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? 0 : cu_fail(err, e, what);
}

static int cu_matmul(void *impl, void *wp, const ds_bk_weight_desc *d, void *xp, size_t x_off,
                     uint32_t n, void *yp, size_t y_off, ds_error *err)
{
    cu_ctx *c = (cu_ctx *)impl;
    cu_weight *w = (cu_weight *)wp;
    const float *x = (const float *)xp + x_off;
    float *y = (float *)yp + y_off;
    unsigned brow = d->block_rows ? d->block_rows : 1, bcol = d->block_cols ? d->block_cols : 1;
    unsigned nbc = (d->cols + bcol - 1) / bcol;
    if ((bcol & (bcol - 1)) == 0)
        bcol = 0x80000000u | (unsigned)__builtin_ctz(bcol);
    CU(cudaSetDevice(c->dev), "cudaSetDevice");
    if (n >= CUBLAS_MIN_N && !c->exact) {
        /* y^T [rows, n] = W [rows, cols] x^T: in cuBLAS's column-major terms
         * Y (rows x n, ld rows) = W^T' ... i.e. op(A) = A^T with A = W stored as cols x rows. */
        const float *A = (const float *)w->data;
        if (d->dtype != DS_BK_F32) {
            size_t need = (size_t)d->rows * d->cols;
            if (c->scratch_n < need) {
                cudaStreamSynchronize(c->compute);
                cudaFree(c->scratch);
                c->scratch = NULL;
                c->scratch_n = 0;
                CU(cudaMalloc((void **)&c->scratch, need * sizeof(float)), "cuBLAS scratch");
                c->scratch_n = need;
            }
            unsigned blocks = (unsigned)((need + 255) / 256);
            if (d->dtype == DS_BK_BF16)
                k_widen<DS_BK_BF16><<<blocks, 256, 0, c->compute>>>(
                    w->data, w->scale, c->lut, d->rows, d->cols, nbc, brow, bcol, c->scratch);
            else
                k_widen<DS_BK_F8_E4M3><<<blocks, 256, 0, c->compute>>>(
                    w->data, w->scale, c->lut, d->rows, d->cols, nbc, brow, bcol, c->scratch);
            int rc = launch_check(err, "widen");
            if (rc < 0)
                return rc;
            A = c->scratch;
        }
        const float one = 1.0f, zero = 0.0f;
        cublasStatus_t st =
            cublasSgemm(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)d->rows, (int)n, (int)d->cols, &one,
                        A, (int)d->cols, x, (int)d->cols, &zero, y, (int)d->rows);
        return st == CUBLAS_STATUS_SUCCESS
                   ? 0
                   : set_err(err, -EIO, "cuda: cublasSgemm failed (%d)", (int)st);
    }
    dim3 block(16, RPG), grid((d->rows + RPG - 1) / RPG, (n + NB - 1) / NB);
    if (d->dtype == DS_BK_F32)
        k_matmul<DS_BK_F32><<<grid, block, 0, c->compute>>>(w->data, w->scale, c->lut, d->rows,
                                                            d->cols, nbc, brow, bcol, x, n, y);
    else if (d->dtype == DS_BK_BF16)
        k_matmul<DS_BK_BF16><<<grid, block, 0, c->compute>>>(w->data, w->scale, c->lut, d->rows,
                                                             d->cols, nbc, brow, bcol, x, n, y);
    else
        k_matmul<DS_BK_F8_E4M3><<<grid, block, 0, c->compute>>>(w->data, w->scale, c->lut, d->rows,
                                                                d->cols, nbc, brow, bcol, x, n, y);
    return launch_check(err, "matmul");
}

static unsigned blocks_for(size_t count)
{
    return (unsigned)((count + 255) / 256);
}

static int cu_rmsnorm(void *impl, void *x, void *gamma, uint32_t n, uint32_t d, float eps, void *y,
                      ds_error *err)
{
    cu_ctx *c = (cu_ctx *)impl;
    cudaSetDevice(c->dev);
    k_rmsnorm<<<n, 256, 0, c->compute>>>((const float *)x, (const float *)gamma, d, eps,
                                         (float *)y);
    return launch_check(err, "rmsnorm");
}

static int cu_rope(void *impl, void *x, uint32_t n, uint32_t heads, uint32_t stride, uint32_t off,
                   uint32_t dim, void *cs, void *sn, ds_error *err)
{
    cu_ctx *c = (cu_ctx *)impl;
    unsigned nv = n * heads;
    k_rope<<<blocks_for((size_t)nv * (dim / 2)), 256, 0, c->compute>>>(
        (float *)x, nv, heads, stride, off, dim, (const float *)cs, (const float *)sn);
    return launch_check(err, "rope");
}

static int cu_mla(void *impl, void *q_lat, void *q_pe, void *cache, uint32_t heads, uint32_t C,
                  uint32_t R, uint32_t t, float scale, void *out, ds_error *err)
{
    cu_ctx *c = (cu_ctx *)impl;
    cudaSetDevice(c->dev);
    float *scores = NULL;
    CU(cudaMallocAsync((void **)&scores, (size_t)heads * t * sizeof(float), c->compute),
       "mla scratch");
    k_mla<<<heads, 256, 0, c->compute>>>((const float *)q_lat, (const float *)q_pe,
                                         (const float *)cache, C, R, t, scale, (float *)out,
                                         scores);
    int rc = launch_check(err, "mla");
    cudaFreeAsync(scores, c->compute);
    return rc;
}

static int cu_swiglu(void *impl, void *g, void *u, size_t count, ds_error *err)
{
    cu_ctx *c = (cu_ctx *)impl;
    cudaSetDevice(c->dev);
    k_swiglu<<<blocks_for(count), 256, 0, c->compute>>>((float *)g, (const float *)u, count);
    return launch_check(err, "swiglu");
}

static int cu_topk(void *impl, void *scores, void *bias, uint32_t n, uint32_t E, uint32_t k,
                   void *ids, void *weights, ds_error *err)
{
    cu_ctx *c = (cu_ctx *)impl;
    cudaSetDevice(c->dev);
    k_topk<<<blocks_for(n), 256, 0, c->compute>>>((const float *)scores, (const float *)bias, n, E,
                                                  k, (int *)ids, (float *)weights);
    return launch_check(err, "topk");
}

static int cu_add(void *impl, void *y, void *x, size_t count, ds_error *err)
{
    cu_ctx *c = (cu_ctx *)impl;
    cudaSetDevice(c->dev);
    k_add<<<blocks_for(count), 256, 0, c->compute>>>((float *)y, (const float *)x, count);
    return launch_check(err, "add");
}

static int cu_scale(void *impl, void *y, float s, size_t count, ds_error *err)
{
    cu_ctx *c = (cu_ctx *)impl;
    cudaSetDevice(c->dev);
    k_scale<<<blocks_for(count), 256, 0, c->compute>>>((float *)y, s, count);
    return launch_check(err, "scale");
}

static int cu_finish(void *impl, ds_error *err)
{
    cu_ctx *c = (cu_ctx *)impl;
    CU(cudaSetDevice(c->dev), "cudaSetDevice");
    CU(cudaStreamSynchronize(c->copy), "finish");
    CU(cudaStreamSynchronize(c->compute), "finish");
    return 0;
}

/* ---- ABI 2 ops: the engine's orders (model/forward.c, model/router.c), as kernels/ops.cl ---- */

__device__ __forceinline__ float welem(int dt, const void *w, const float *scale, const float *lut,
                                       unsigned r, unsigned c, unsigned cols, unsigned nbc,
                                       unsigned brow, unsigned bcol)
{
    size_t i = (size_t)r * cols + c;
    if (dt == DS_BK_F32)
        return ((const float *)w)[i];
    if (dt == DS_BK_BF16)
        return __uint_as_float((unsigned)((const unsigned short *)w)[i] << 16);
    return __fmul_rn(lut[((const unsigned char *)w)[i]],
                     scale[(size_t)(r / brow) * nbc + c / bcol]);
}

__device__ __forceinline__ float dot8_dev(const float *a, const float *b, unsigned n)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    unsigned n8 = n & ~7u;
    for (unsigned c = 0; c < n8; c += 8)
#pragma unroll
        for (int j = 0; j < 8; j++)
            acc[j] = __fmaf_rn(a[c + j], b[c + j], acc[j]);
    float s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for (unsigned c = n8; c < n; c++)
        s = __fmaf_rn(a[c], b[c], s);
    return s;
}

/* One block per row; thread 0 sums the squares in double in element order. */
__global__ void k_rmsnorm_rows(const float *x, size_t xs, const float *gamma, unsigned d,
                               double eps, float *y, size_t ys)
{
    __shared__ float rs;
    const float *xr = x + (size_t)blockIdx.x * xs;
    float *yr = y + (size_t)blockIdx.x * ys;
    if (threadIdx.x == 0) {
        double ss = 0;
        for (unsigned c = 0; c < d; c++)
            ss = __dadd_rn(ss, __dmul_rn((double)xr[c], (double)xr[c]));
        rs = (float)__ddiv_rn(1.0, __dsqrt_rn(__dadd_rn(__ddiv_rn(ss, (double)d), eps)));
    }
    __syncthreads();
    float r = rs;
    for (unsigned c = threadIdx.x; c < d; c += blockDim.x)
        yr[c] = __fmul_rn(gamma[c], __fmul_rn(xr[c], r));
}

struct mla_args {
    const float *q, *cache;
    const void *w;
    const float *scale, *lut;
    int dt;
    unsigned nbc, brow, bcol, H, dn, dr, dv, C, pos0, tmax;
    float sc;
    float *qlat, *olat, *scores, *att;
};

/* grid (ceil(C/64), H, n) */
__global__ void k_mla_qlat(mla_args a)
{
    unsigned c = blockIdx.x * blockDim.x + threadIdx.x, h = blockIdx.y, i = blockIdx.z;
    if (c >= a.C)
        return;
    const float *qi = a.q + ((size_t)i * a.H + h) * (a.dn + a.dr);
    float acc = 0.0f;
    for (unsigned d = 0; d < a.dn; d++)
        acc = __fmaf_rn(
            qi[d],
            welem(a.dt, a.w, a.scale, a.lut, h * (a.dn + a.dv) + d, c, a.C, a.nbc, a.brow, a.bcol),
            acc);
    a.qlat[((size_t)i * a.H + h) * a.C + c] = acc;
}

__global__ void k_mla_scores(mla_args a)
{
    unsigned t = blockIdx.x * blockDim.x + threadIdx.x, h = blockIdx.y, i = blockIdx.z;
    if (t > a.pos0 + i || t >= a.tmax)
        return;
    const float *ct = a.cache + (size_t)t * (a.C + a.dr);
    const float *qp = a.q + ((size_t)i * a.H + h) * (a.dn + a.dr) + a.dn;
    float x = dot8_dev(a.qlat + ((size_t)i * a.H + h) * a.C, ct, a.C);
    float y = dot8_dev(qp, ct + a.C, a.dr);
    a.scores[((size_t)i * a.H + h) * a.tmax + t] = __fmul_rn(__fadd_rn(x, y), a.sc);
}

/* grid (ceil(H/32), n) */
__global__ void k_mla_softmax(mla_args a)
{
    unsigned h = blockIdx.x * blockDim.x + threadIdx.x, i = blockIdx.y;
    if (h >= a.H)
        return;
    float *p = a.scores + ((size_t)i * a.H + h) * a.tmax;
    unsigned T = a.pos0 + i + 1;
    float mx = -INFINITY;
    for (unsigned t = 0; t < T; t++)
        if (p[t] > mx)
            mx = p[t];
    float sum = 0.0f;
    for (unsigned t = 0; t < T; t++) {
        p[t] = ds_expf_dev(__fsub_rn(p[t], mx));
        sum = __fadd_rn(sum, p[t]);
    }
    for (unsigned t = 0; t < T; t++)
        p[t] = __fdiv_rn(p[t], sum);
}

__global__ void k_mla_wsum(mla_args a)
{
    unsigned c = blockIdx.x * blockDim.x + threadIdx.x, h = blockIdx.y, i = blockIdx.z;
    if (c >= a.C)
        return;
    const float *p = a.scores + ((size_t)i * a.H + h) * a.tmax;
    unsigned T = a.pos0 + i + 1;
    float o = 0.0f;
    for (unsigned t = 0; t < T; t++)
        o = __fmaf_rn(p[t], a.cache[(size_t)t * (a.C + a.dr) + c], o);
    a.olat[((size_t)i * a.H + h) * a.C + c] = o;
}

/* grid (ceil(dv/32), H, n) */
__global__ void k_mla_out(mla_args a)
{
    unsigned j = blockIdx.x * blockDim.x + threadIdx.x, h = blockIdx.y, i = blockIdx.z;
    if (j >= a.dv)
        return;
    const float *o = a.olat + ((size_t)i * a.H + h) * a.C;
    unsigned r = h * (a.dn + a.dv) + a.dn + j, n8 = a.C & ~7u;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (unsigned c = 0; c < n8; c += 8)
#pragma unroll
        for (int q = 0; q < 8; q++)
            acc[q] = __fmaf_rn(
                o[c + q], welem(a.dt, a.w, a.scale, a.lut, r, c + q, a.C, a.nbc, a.brow, a.bcol),
                acc[q]);
    float s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for (unsigned c = n8; c < a.C; c++)
        s = __fmaf_rn(o[c], welem(a.dt, a.w, a.scale, a.lut, r, c, a.C, a.nbc, a.brow, a.bcol), s);
    a.att[((size_t)i * a.H + h) * a.dv + j] = s;
}

__device__ int argmax_free_dev(const float *v, const float *taken, unsigned n)
{
    int best = -1;
    for (unsigned i = 0; i < n; i++) {
        if (taken[i] != 0.0f || isnan(v[i]))
            continue;
        if (best < 0 || v[i] > v[best])
            best = (int)i;
    }
    return best;
}

/* One thread per row: ds_router_select step for step. */
__global__ void k_router(const float *logits, const float *bias, ds_bk_router_desc r, unsigned n,
                         float *scr, int *ids, float *weights)
{
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    unsigned E = r.E, k = r.k, G = r.n_group;
    const float *lg = logits + (size_t)i * E;
    float *score = scr + (size_t)i * (3 * E + 2 * G), *choice = score + E;
    float *taken = choice + E, *gscore = taken + E, *gtaken = gscore + G;
    int *id = ids + (size_t)i * k;
    float *wt = weights + (size_t)i * k;
    if (r.sigmoid) {
        for (unsigned e = 0; e < E; e++)
            score[e] = __fdiv_rn(1.0f, __fadd_rn(1.0f, ds_expf_dev(-lg[e])));
    } else {
        float mx = -INFINITY, sum = 0.0f;
        for (unsigned e = 0; e < E; e++)
            mx = lg[e] > mx ? lg[e] : mx;
        for (unsigned e = 0; e < E; e++) {
            score[e] = ds_expf_dev(__fsub_rn(lg[e], mx));
            sum = __fadd_rn(sum, score[e]);
        }
        for (unsigned e = 0; e < E; e++)
            score[e] = __fdiv_rn(score[e], sum);
    }
    for (unsigned e = 0; e < E; e++)
        choice[e] = bias ? __fadd_rn(score[e], bias[e]) : score[e];
    if (G > 1 && r.method != DS_BK_ROUTER_GREEDY) {
        unsigned per = E / G;
        for (unsigned g = 0; g < G; g++) {
            const float *v = choice + g * per;
            float a = -INFINITY, b = -INFINITY;
            for (unsigned j = 0; j < per; j++) {
                if (r.method == DS_BK_ROUTER_GROUP_TOP2SUM) {
                    if (v[j] > a) {
                        b = a;
                        a = v[j];
                    } else if (v[j] > b) {
                        b = v[j];
                    }
                } else {
                    a = v[j] > a ? v[j] : a;
                }
            }
            gscore[g] = r.method == DS_BK_ROUTER_GROUP_TOP2SUM ? __fadd_rn(a, b) : a;
            gtaken[g] = 0.0f;
        }
        for (unsigned t = 0; t < r.topk_group; t++) {
            int g = argmax_free_dev(gscore, gtaken, G);
            if (g >= 0)
                gtaken[g] = 1.0f;
        }
        for (unsigned g = 0; g < G; g++)
            if (gtaken[g] == 0.0f)
                for (unsigned j = 0; j < per; j++)
                    choice[g * per + j] = -INFINITY;
    }
    for (unsigned e = 0; e < E; e++)
        taken[e] = 0.0f;
    float sum = 0.0f;
    for (unsigned s = 0; s < k; s++) {
        int e = argmax_free_dev(choice, taken, E);
        if (e < 0)
            for (e = 0; taken[e] != 0.0f; e++)
                ;
        taken[e] = 1.0f;
        id[s] = e;
        wt[s] = score[e];
        sum = __fadd_rn(sum, score[e]);
    }
    if (r.norm && k > 1) {
        float den = __fadd_rn(sum, 1e-20f);
        for (unsigned s = 0; s < k; s++)
            wt[s] = __fdiv_rn(wt[s], den);
    }
    for (unsigned s = 0; s < k; s++)
        wt[s] = __fmul_rn(wt[s], r.scaling);
}

__global__ void k_gather(int dt, const void *w, const float *scale, const float *lut, unsigned cols,
                         unsigned nbc, unsigned brow, unsigned bcol, const int *ids, float *y)
{
    unsigned c = blockIdx.x * blockDim.x + threadIdx.x, i = blockIdx.y;
    if (c >= cols)
        return;
    y[(size_t)i * cols + c] = welem(dt, w, scale, lut, (unsigned)ids[i], c, cols, nbc, brow, bcol);
}

static int cu_rmsnorm_rows(void *impl, void *x, size_t x_off, size_t x_stride, void *gamma,
                           uint32_t n, uint32_t d, double eps, void *y, size_t y_off,
                           size_t y_stride, ds_error *err)
{
    cu_ctx *c = (cu_ctx *)impl;
    cudaSetDevice(c->dev);
    k_rmsnorm_rows<<<n, 256, 0, c->compute>>>((const float *)x + x_off, x_stride,
                                              (const float *)gamma, d, eps, (float *)y + y_off,
                                              y_stride);
    return launch_check(err, "rmsnorm_rows");
}

static int cu_mla_attn(void *impl, const ds_bk_mla_desc *m, void *q, size_t q_off, void *wp,
                       const ds_bk_weight_desc *d, void *cache, uint32_t pos0, uint32_t n,
                       void *scratch, void *att, size_t att_off, ds_error *err)
{
    cu_ctx *c = (cu_ctx *)impl;
    cu_weight *w = (cu_weight *)wp;
    cudaSetDevice(c->dev);
    mla_args a;
    memset(&a, 0, sizeof(a));
    a.q = (const float *)q + q_off;
    a.cache = (const float *)cache;
    a.w = w->data;
    a.scale = w->scale;
    a.lut = c->lut;
    a.dt = d->dtype;
    a.brow = d->block_rows ? d->block_rows : 1;
    a.bcol = d->block_cols ? d->block_cols : 1;
    a.nbc = (d->cols + a.bcol - 1) / a.bcol;
    a.H = m->heads;
    a.dn = m->nope;
    a.dr = m->rope;
    a.dv = m->v;
    a.C = m->C;
    a.pos0 = pos0;
    a.tmax = pos0 + n;
    a.sc = m->scale;
    size_t seg = (size_t)n * a.H * a.C;
    a.qlat = (float *)scratch;
    a.olat = a.qlat + seg;
    a.scores = a.olat + seg;
    a.att = (float *)att + att_off;
    dim3 g1((a.C + 63) / 64, a.H, n), g2((a.tmax + 63) / 64, a.H, n), g3((a.H + 31) / 32, n),
        g5((a.dv + 31) / 32, a.H, n);
    k_mla_qlat<<<g1, 64, 0, c->compute>>>(a);
    k_mla_scores<<<g2, 64, 0, c->compute>>>(a);
    k_mla_softmax<<<g3, 32, 0, c->compute>>>(a);
    k_mla_wsum<<<g1, 64, 0, c->compute>>>(a);
    k_mla_out<<<g5, 32, 0, c->compute>>>(a);
    return launch_check(err, "mla_attn");
}

static int cu_router(void *impl, const ds_bk_router_desc *r, void *logits, void *bias, uint32_t n,
                     void *scratch, void *ids, void *weights, ds_error *err)
{
    cu_ctx *c = (cu_ctx *)impl;
    cudaSetDevice(c->dev);
    k_router<<<(n + 63) / 64, 64, 0, c->compute>>>((const float *)logits, (const float *)bias, *r,
                                                   n, (float *)scratch, (int *)ids,
                                                   (float *)weights);
    return launch_check(err, "router");
}

static int cu_gather_rows(void *impl, void *wp, const ds_bk_weight_desc *d, const int32_t *ids,
                          uint32_t n, void *y, size_t y_off, ds_error *err)
{
    cu_ctx *c = (cu_ctx *)impl;
    cu_weight *w = (cu_weight *)wp;
    void *dids = NULL;
    int rc = cu_buf_alloc(c, (size_t)n * sizeof(int32_t), &dids, err);
    if (rc < 0)
        return rc;
    if ((rc = cu_buf_write(c, dids, 0, ids, (size_t)n * sizeof(int32_t), err)) == 0) {
        unsigned brow = d->block_rows ? d->block_rows : 1, bcol = d->block_cols ? d->block_cols : 1;
        dim3 g((d->cols + 63) / 64, n);
        k_gather<<<g, 64, 0, c->compute>>>(d->dtype, w->data, w->scale, c->lut, d->cols,
                                           (d->cols + bcol - 1) / bcol, brow, bcol,
                                           (const int *)dids, (float *)y + y_off);
        rc = launch_check(err, "gather_rows");
    }
    cu_buf_free(c, dids); /* waits for the compute stream */
    return rc;
}

static void cu_set_exact(void *impl, bool exact)
{
    ((cu_ctx *)impl)->exact = exact;
}

/* The one exported symbol (positional: C++17 has no designated initialisers). */
extern "C" __attribute__((visibility("default"))) const ds_backend_ops ds_backend_cuda_ops = {
    DS_BACKEND_ABI, "cuda",      cu_open,          cu_close,       cu_buf_alloc, cu_buf_free,
    cu_buf_write,   cu_buf_read, cu_weight_upload, cu_weight_free, cu_matmul,    cu_rmsnorm,
    cu_rope,        cu_mla,      cu_swiglu,        cu_topk,        cu_add,       cu_scale,
    cu_copy,        cu_finish,   cu_rmsnorm_rows,  cu_mla_attn,    cu_router,    cu_gather_rows,
    cu_set_exact,
};
