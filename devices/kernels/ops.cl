/* ops.cl — the OpenCL C kernels of the opencl backend (OpenCL C 1.2, float32 arithmetic).
 * Embedded into the binary at build time (devices/backend.cmake) and compiled at run time per
 * device, with a program-binary cache (backend_opencl.c).
 *
 * Contraction is off: OpenCL C allows the compiler to fuse a*b+c by default, which would
 * change the rounding of the FP8 dequantisation and of rope. Every fma below is explicit. */
#pragma OPENCL FP_CONTRACT OFF

/* NB (a macro parameter below): input rows per work-item; the weight element is loaded once
 * for NB rows. */

static inline float w_f32(__global const void *w, ulong i, uint c, __global const float *srow,
                          __constant float *lut, uint bcol)
{
    return ((__global const float *)w)[i];
}

static inline float w_bf16(__global const void *w, ulong i, uint c, __global const float *srow,
                           __constant float *lut, uint bcol)
{
    return as_float((uint)((__global const ushort *)w)[i] << 16);
}

static inline float w_f8(__global const void *w, ulong i, uint c, __global const float *srow,
                         __constant float *lut, uint bcol)
{
    /* (value * block scale) rounded to float, then the fma: the engine's order. bcol with the
     * top bit set is log2 of a power-of-two block width (128 in DeepSeek-V3): a shift instead
     * of an integer division per element. */
    uint cb = (bcol & 0x80000000u) ? c >> (bcol & 31u) : c / bcol;
    return lut[((__global const uchar *)w)[i]] * srow[cb];
}

/* y[i, r] = sum_c W[r, c] x[i, c]. Work-group (16, RPG): lane j of the 16 accumulates the
 * elements c = j mod 16 below cols & ~15 for NB input rows — the 16 interleaved partial sums
 * of the engine's fixed order; the lanes are then combined in the engine's tree and the tail
 * added in order, so each y element is bit-identical to ds_weight_matmul. part: local
 * [RPG][NB][16] floats. Global (16, RPG-rounded rows, ceil(n/NB)). */
#define MATMUL_KERNEL(NAME, LOAD, NB)                                                                \
    __kernel void NAME(__global const void *w, __global const float *scale,                      \
                       __constant float *lut, uint rows, uint cols, uint nbc, uint brow,          \
                       uint bcol, __global const float *x, ulong x_off, uint n,                  \
                       __global float *y, ulong y_off, __local float *part)                      \
    {                                                                                            \
        uint lane = get_local_id(0), lr = get_local_id(1);                                      \
        uint r = get_global_id(1), i0 = get_global_id(2) * NB;                                  \
        uint nr = n - i0 < NB ? n - i0 : NB;                                                     \
        uint c16 = cols & ~15u;                                                                  \
        float acc[NB];                                                                           \
        for (uint q = 0; q < NB; q++)                                                            \
            acc[q] = 0.0f;                                                                       \
        __global const float *srow = 0;                                                          \
        if (r < rows) {                                                                          \
            if (scale)                                                                           \
                srow = scale + (ulong)(r / brow) * nbc;                                          \
            ulong base = (ulong)r * cols;                                                        \
            __global const float *xb = x + x_off + (ulong)i0 * cols;                             \
            for (uint c = lane; c < c16; c += 16) {                                              \
                float wv = LOAD(w, base + c, c, srow, lut, bcol);                                \
                for (uint q = 0; q < NB; q++)                                                    \
                    if (q < nr)                                                                  \
                        acc[q] = fma(wv, xb[(ulong)q * cols + c], acc[q]);                       \
            }                                                                                    \
        }                                                                                        \
        for (uint q = 0; q < NB; q++)                                                            \
            part[(lr * NB + q) * 16 + lane] = acc[q];                                            \
        barrier(CLK_LOCAL_MEM_FENCE);                                                            \
        if (r < rows && lane < nr) {                                                             \
            __local const float *p = part + (lr * NB + lane) * 16;                               \
            float a0 = p[0] + p[8], a1 = p[1] + p[9], a2 = p[2] + p[10], a3 = p[3] + p[11];      \
            float a4 = p[4] + p[12], a5 = p[5] + p[13], a6 = p[6] + p[14], a7 = p[7] + p[15];    \
            float s = ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7));                         \
            ulong base = (ulong)r * cols;                                                        \
            __global const float *xi = x + x_off + (ulong)(i0 + lane) * cols;                    \
            for (uint c = c16; c < cols; c++)                                                    \
                s = fma(LOAD(w, base + c, c, srow, lut, bcol), xi[c], s);                        \
            y[y_off + (ulong)(i0 + lane) * rows + r] = s;                                        \
        }                                                                                        \
    }

MATMUL_KERNEL(matmul_f32, w_f32, 4)
MATMUL_KERNEL(matmul_bf16, w_bf16, 4)
MATMUL_KERNEL(matmul_f8, w_f8, 4)
/* n = 1 (decode): the same order, one input row per work-item. */
MATMUL_KERNEL(matvec_f32, w_f32, 1)
MATMUL_KERNEL(matvec_bf16, w_bf16, 1)
MATMUL_KERNEL(matvec_f8, w_f8, 1)

/* One work-group (power-of-two size L) per row: tree sum of squares in local memory. */
__kernel void rmsnorm(__global const float *x, __global const float *gamma, uint d, float eps,
                      __global float *y, __local float *red)
{
    uint row = get_group_id(0), lid = get_local_id(0), L = get_local_size(0);
    __global const float *xr = x + (ulong)row * d;
    __global float *yr = y + (ulong)row * d;
    float ss = 0.0f;
    for (uint c = lid; c < d; c += L)
        ss = fma(xr[c], xr[c], ss);
    red[lid] = ss;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint s = L / 2; s > 0; s >>= 1) {
        if (lid < s)
            red[lid] += red[lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    float r = 1.0f / sqrt(red[0] / (float)d + eps);
    for (uint c = lid; c < d; c += L)
        yr[c] = gamma[c] * (xr[c] * r);
}

/* Global (dim/2, n*heads). */
__kernel void rope(__global float *x, uint heads, uint stride, uint off, uint dim,
                   __global const float *cs, __global const float *sn)
{
    uint p = get_global_id(0), v = get_global_id(1);
    uint i = v / heads, hd = dim / 2;
    __global float *xv = x + (ulong)v * stride + off;
    float c = cs[(ulong)i * hd + p], s = sn[(ulong)i * hd + p];
    float a = xv[2 * p], b = xv[2 * p + 1];
    xv[2 * p] = a * c - b * s;
    xv[2 * p + 1] = a * s + b * c;
}

/* One work-group (power-of-two size L) per head. scores: global scratch [heads, t]. */
__kernel void mla_decode(__global const float *q_lat, __global const float *q_pe,
                         __global const float *cache, uint C, uint R, uint t, float scale,
                         __global float *out, __global float *scores, __local float *red)
{
    uint h = get_group_id(0), lid = get_local_id(0), L = get_local_size(0);
    __global const float *ql = q_lat + (ulong)h * C, *qp = q_pe + (ulong)h * R;
    __global float *s = scores + (ulong)h * t;
    float mx = -INFINITY;
    for (uint j = lid; j < t; j += L) {
        __global const float *row = cache + (ulong)j * (C + R);
        float a = 0.0f;
        for (uint c = 0; c < C; c++)
            a = fma(ql[c], row[c], a);
        for (uint c = 0; c < R; c++)
            a = fma(qp[c], row[C + c], a);
        s[j] = a * scale;
        mx = fmax(mx, s[j]);
    }
    red[lid] = mx;
    barrier(CLK_LOCAL_MEM_FENCE | CLK_GLOBAL_MEM_FENCE);
    for (uint k = L / 2; k > 0; k >>= 1) {
        if (lid < k)
            red[lid] = fmax(red[lid], red[lid + k]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    mx = red[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    float sum = 0.0f;
    for (uint j = lid; j < t; j += L) {
        float e = exp(s[j] - mx);
        s[j] = e;
        sum += e;
    }
    red[lid] = sum;
    barrier(CLK_LOCAL_MEM_FENCE | CLK_GLOBAL_MEM_FENCE);
    for (uint k = L / 2; k > 0; k >>= 1) {
        if (lid < k)
            red[lid] += red[lid + k];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    sum = red[0];
    for (uint c = lid; c < C; c += L) {
        float o = 0.0f;
        for (uint j = 0; j < t; j++)
            o = fma(s[j] / sum, cache[(ulong)j * (C + R) + c], o);
        out[(ulong)h * C + c] = o;
    }
}

__kernel void swiglu(__global float *g, __global const float *u, ulong count)
{
    ulong i = get_global_id(0);
    if (i < count)
        g[i] = g[i] / (1.0f + exp(-g[i])) * u[i];
}

/* One work-item per row: k passes of arg-max over the unchosen (ties: lower index). */
__kernel void topk(__global const float *scores, __global const float *bias, uint has_bias,
                   uint n, uint E, uint k, __global int *ids, __global float *weights)
{
    uint i = get_global_id(0);
    if (i >= n)
        return;
    __global const float *s = scores + (ulong)i * E;
    __global int *id = ids + (ulong)i * k;
    for (uint j = 0; j < k; j++) {
        int best = -1;
        float bv = 0.0f;
        for (uint e = 0; e < E; e++) {
            bool taken = false;
            for (uint q = 0; q < j; q++)
                taken |= id[q] == (int)e;
            if (taken)
                continue;
            float v = has_bias ? s[e] + bias[e] : s[e];
            if (best < 0 || v > bv) {
                best = (int)e;
                bv = v;
            }
        }
        id[j] = best;
        weights[(ulong)i * k + j] = s[best];
    }
}

__kernel void add(__global float *y, __global const float *x, ulong count)
{
    ulong i = get_global_id(0);
    if (i < count)
        y[i] += x[i];
}

__kernel void scale(__global float *y, float f, ulong count)
{
    ulong i = get_global_id(0);
    if (i < count)
        y[i] *= f;
}

/* Device copy in float4 units (the bench's bandwidth probe runs through the same machinery as
 * the other kernels: some runtimes, PoCL among them, copy buffers on one thread). */
__kernel void copy4(__global float4 *dst, __global const float4 *src, ulong count4)
{
    /* Grid-stride: a few work-groups per compute unit, whatever the size (per-group overhead
     * dominates on CPU runtimes otherwise). */
    for (ulong i = get_global_id(0); i < count4; i += get_global_size(0))
        dst[i] = src[i];
}
