/* ops.cl — the OpenCL C kernels of the opencl backend (OpenCL C 1.2, float32 arithmetic).
 * Embedded into the binary at build time (devices/backend.cmake) and compiled at run time per
 * device, with a program-binary cache (backend_opencl.c).
 *
 * Contraction is off: OpenCL C allows the compiler to fuse a*b+c by default, which would
 * change the rounding of the FP8 dequantisation and of rope. Every fma below is explicit. */
#pragma OPENCL FP_CONTRACT OFF
#ifdef cl_khr_fp64
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
/* A correctly rounded float division: the double quotient rounded to float is the float
 * quotient (53 >= 2*24 + 2 bits, so the double rounding is innocuous). OpenCL's float `/` may
 * be off by 2.5 ulp. */
#define DIVF(a, b) ((float)((double)(a) / (double)(b)))
#else
#define DIVF(a, b) ((a) / (b))
#endif

/* ds_expf (common/ds_numeric.c), the same sequence of float roundings: bit-identical to the
 * engine's exp on a device that rounds +, -, * correctly (every OpenCL full-profile device). */
static inline float ds_expf(float x)
{
    if (isnan(x))
        return x;
    if (x > 88.0f)
        return INFINITY;
    if (x < -87.0f)
        return 0.0f;
    float kf = x * 1.44269502f;
    int k = (int)(kf >= 0.0f ? kf + 0.5f : kf - 0.5f);
    float r = x - (float)k * 0.693359375f;
    r = r - (float)k * -2.12194440e-4f;
    float p = 1.98412698e-4f;
    p = p * r + 1.38888889e-3f;
    p = p * r + 8.33333333e-3f;
    p = p * r + 4.16666667e-2f;
    p = p * r + 1.66666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * as_float((uint)(k + 127) << 23);
}

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
        g[i] = DIVF(g[i], 1.0f + ds_expf(-g[i])) * u[i];
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

/* ---- ABI 2: the ops of whole units, in the engine's orders (model/forward.c, router.c) ---- */

/* Element (r, c) of a weight of kind 0 F32, 1 BF16, 2 FP8 (value * block scale, rounded). */
static inline float w_elem(uint kind, __global const void *w, __global const float *scale,
                           __constant float *lut, uint r, uint c, uint cols, uint nbc, uint brow,
                           uint bcol)
{
    ulong i = (ulong)r * cols + c;
    if (kind == 0)
        return ((__global const float *)w)[i];
    if (kind == 1)
        return as_float((uint)((__global const ushort *)w)[i] << 16);
    return lut[((__global const uchar *)w)[i]] * scale[(ulong)(r / brow) * nbc + c / bcol];
}

/* ds_dot8's order (model/ds_tensor.h) over n elements. */
static inline float dot8_gg(__global const float *a, __global const float *b, uint n)
{
    float acc[8];
    for (int j = 0; j < 8; j++)
        acc[j] = 0.0f;
    uint n8 = n & ~7u;
    for (uint c = 0; c < n8; c += 8)
        for (int j = 0; j < 8; j++)
            acc[j] = fma(a[c + j], b[c + j], acc[j]);
    float s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for (uint c = n8; c < n; c++)
        s = fma(a[c], b[c], s);
    return s;
}

#ifdef cl_khr_fp64
/* One work-group per row: work-item 0 sums the squares in double in element order (the
 * engine's sequential sum), then every work-item scales its elements. Needs fp64: without it
 * the kernel is absent and the op is -ENOTSUP. */
__kernel void rmsnorm_rows(__global const float *x, ulong x_off, ulong x_stride,
                           __global const float *gamma, uint d, double eps, __global float *y,
                           ulong y_off, ulong y_stride, __local float *rs)
{
    uint row = get_group_id(0), lid = get_local_id(0), L = get_local_size(0);
    __global const float *xr = x + x_off + (ulong)row * x_stride;
    __global float *yr = y + y_off + (ulong)row * y_stride;
    if (lid == 0) {
        double ss = 0;
        for (uint c = 0; c < d; c++)
            ss += (double)xr[c] * (double)xr[c];
        rs[0] = (float)(1.0 / sqrt(ss / (double)d + eps));
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    float r = rs[0];
    for (uint c = lid; c < d; c += L)
        yr[c] = gamma[c] * (xr[c] * r);
}
#endif

/* Absorbed MLA, step 1. Global (C, H, n): q_lat[i, h, c] = one fma chain over d < nope. */
__kernel void mla_qlat(__global const float *q, ulong q_off, uint kind, __global const void *w,
                       __global const float *scale, __constant float *lut, uint nbc, uint brow,
                       uint bcol, uint H, uint dn, uint dr, uint dv, uint C,
                       __global float *scr, ulong qlat_o)
{
    __global float *qlat = scr + qlat_o;
    uint c = get_global_id(0), h = get_global_id(1), i = get_global_id(2);
    if (c >= C)
        return;
    __global const float *qi = q + q_off + ((ulong)i * H + h) * (dn + dr);
    float acc = 0.0f;
    for (uint d = 0; d < dn; d++)
        acc = fma(qi[d], w_elem(kind, w, scale, lut, h * (dn + dv) + d, c, C, nbc, brow, bcol),
                  acc);
    qlat[((ulong)i * H + h) * C + c] = acc;
}

/* Step 2. Global (Tmax, H, n): s[i, h, t] = (dot8(q_lat, c_t) + dot8(q_pe, kpe_t)) * scale for
 * t <= pos0 + i. */
__kernel void mla_scores(__global const float *q, ulong q_off, __global float *scr,
                         ulong qlat_o, __global const float *cache, uint H, uint dn, uint dr,
                         uint C, uint pos0, uint tmax, float scale, ulong sc_o)
{
    __global const float *qlat = scr + qlat_o;
    __global float *sc = scr + sc_o;
    uint t = get_global_id(0), h = get_global_id(1), i = get_global_id(2);
    if (t > pos0 + i || t >= tmax)
        return;
    __global const float *ct = cache + (ulong)t * (C + dr);
    __global const float *qp = q + q_off + ((ulong)i * H + h) * (dn + dr) + dn;
    float a = dot8_gg(qlat + ((ulong)i * H + h) * C, ct, C);
    float b = dot8_gg(qp, ct + C, dr);
    sc[((ulong)i * H + h) * tmax + t] = (a + b) * scale;
}

/* Step 3. Global (H, n): the softmax of one row and head in order (max, ds_expf, sum, divide). */
__kernel void mla_softmax(uint H, uint pos0, uint tmax, __global float *scr, ulong sc_o)
{
    __global float *sc = scr + sc_o;
    uint h = get_global_id(0), i = get_global_id(1);
    if (h >= H)
        return;
    __global float *p = sc + ((ulong)i * H + h) * tmax;
    uint T = pos0 + i + 1;
    float mx = -INFINITY;
    for (uint t = 0; t < T; t++)
        if (p[t] > mx)
            mx = p[t];
    float sum = 0.0f;
    for (uint t = 0; t < T; t++) {
        p[t] = ds_expf(p[t] - mx);
        sum += p[t];
    }
    for (uint t = 0; t < T; t++)
        p[t] = DIVF(p[t], sum);
}

/* Step 4. Global (C, H, n): o_lat[i, h, c] = one fma chain over t of p_t * c_t[c]. */
__kernel void mla_wsum(__global float *scr, ulong sc_o, __global const float *cache, uint H,
                       uint dr, uint C, uint pos0, uint tmax, ulong olat_o)
{
    __global const float *sc = scr + sc_o;
    __global float *olat = scr + olat_o;
    uint c = get_global_id(0), h = get_global_id(1), i = get_global_id(2);
    if (c >= C)
        return;
    __global const float *p = sc + ((ulong)i * H + h) * tmax;
    uint T = pos0 + i + 1;
    float o = 0.0f;
    for (uint t = 0; t < T; t++)
        o = fma(p[t], cache[(ulong)t * (C + dr) + c], o);
    olat[((ulong)i * H + h) * C + c] = o;
}

/* Step 5. Global (dv, H, n): att[i, h*dv + j] = dot8(o_lat, W_UV[h] row j). */
__kernel void mla_out(__global const float *scr, ulong olat_o, uint kind, __global const void *w,
                      __global const float *scale, __constant float *lut, uint nbc, uint brow,
                      uint bcol, uint H, uint dn, uint dv, uint C, __global float *att,
                      ulong att_off)
{
    uint j = get_global_id(0), h = get_global_id(1), i = get_global_id(2);
    if (j >= dv)
        return;
    __global const float *o = scr + olat_o + ((ulong)i * H + h) * C;
    uint r = h * (dn + dv) + dn + j;
    float acc[8];
    for (int q = 0; q < 8; q++)
        acc[q] = 0.0f;
    uint n8 = C & ~7u;
    for (uint c = 0; c < n8; c += 8)
        for (int q = 0; q < 8; q++)
            acc[q] = fma(o[c + q], w_elem(kind, w, scale, lut, r, c + q, C, nbc, brow, bcol),
                         acc[q]);
    float s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for (uint c = n8; c < C; c++)
        s = fma(o[c], w_elem(kind, w, scale, lut, r, c, C, nbc, brow, bcol), s);
    att[att_off + ((ulong)i * H + h) * dv + j] = s;
}

/* Index of the largest v[i] with taken[i] == 0 (lowest on ties, NaN skipped), or -1. */
static inline int argmax_free(__global const float *v, __global const float *taken, uint n)
{
    int best = -1;
    for (uint i = 0; i < n; i++) {
        if (taken[i] != 0.0f || isnan(v[i]))
            continue;
        if (best < 0 || v[i] > v[best])
            best = (int)i;
    }
    return best;
}

/* One work-item per row: ds_router_select (model/router.c), step for step. */
__kernel void router(__global const float *logits, __global const float *bias, uint has_bias,
                     uint n, uint E, uint k, uint G, uint topk_group, uint sigmoid_, uint method,
                     uint norm, float scaling, __global float *scr, __global int *ids,
                     __global float *weights)
{
    uint i = get_global_id(0);
    if (i >= n)
        return;
    __global const float *lg = logits + (ulong)i * E;
    __global float *score = scr + (ulong)i * (3 * E + 2 * G), *choice = score + E;
    __global float *taken = choice + E, *gscore = taken + E, *gtaken = gscore + G;
    __global int *id = ids + (ulong)i * k;
    __global float *wt = weights + (ulong)i * k;
    if (sigmoid_) {
        for (uint e = 0; e < E; e++)
            score[e] = DIVF(1.0f, 1.0f + ds_expf(-lg[e]));
    } else {
        float mx = -INFINITY, sum = 0.0f;
        for (uint e = 0; e < E; e++)
            mx = lg[e] > mx ? lg[e] : mx;
        for (uint e = 0; e < E; e++) {
            score[e] = ds_expf(lg[e] - mx);
            sum += score[e];
        }
        for (uint e = 0; e < E; e++)
            score[e] = DIVF(score[e], sum);
    }
    for (uint e = 0; e < E; e++)
        choice[e] = has_bias ? score[e] + bias[e] : score[e];
    if (G > 1 && method != 0) {
        uint per = E / G;
        for (uint g = 0; g < G; g++) {
            __global const float *v = choice + g * per;
            float a = -INFINITY, b = -INFINITY;
            for (uint j = 0; j < per; j++) {
                if (method == 2) {
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
            gscore[g] = method == 2 ? a + b : a;
            gtaken[g] = 0.0f;
        }
        for (uint t = 0; t < topk_group; t++) {
            int g = argmax_free(gscore, gtaken, G);
            if (g >= 0)
                gtaken[g] = 1.0f;
        }
        for (uint g = 0; g < G; g++)
            if (gtaken[g] == 0.0f)
                for (uint j = 0; j < per; j++)
                    choice[g * per + j] = -INFINITY;
    }
    for (uint e = 0; e < E; e++)
        taken[e] = 0.0f;
    float sum = 0.0f;
    for (uint s = 0; s < k; s++) {
        int e = argmax_free(choice, taken, E);
        if (e < 0)
            for (e = 0; taken[e] != 0.0f; e++)
                ;
        taken[e] = 1.0f;
        id[s] = e;
        wt[s] = score[e];
        sum += score[e];
    }
    if (norm && k > 1) {
        float den = sum + 1e-20f;
        for (uint s = 0; s < k; s++)
            wt[s] = DIVF(wt[s], den);
    }
    for (uint s = 0; s < k; s++)
        wt[s] *= scaling;
}

/* Global (cols, n): y[i, c] = W[ids[i], c] widened. */
__kernel void gather_rows(uint kind, __global const void *w, __global const float *scale,
                          __constant float *lut, uint nbc, uint brow, uint bcol, uint cols,
                          __global const int *ids, __global float *y, ulong y_off)
{
    uint c = get_global_id(0), i = get_global_id(1);
    if (c >= cols)
        return;
    y[y_off + (ulong)i * cols + c] = w_elem(kind, w, scale, lut, (uint)ids[i], c, cols, nbc, brow,
                                            bcol);
}
