/* backend_opencl.c — the opencl backend: kernels/ops.cl built at run time per device.
 *
 * Program build cache: the program binary is kept in DIR/<hash>.clbin, hash = FNV-1a 64 of
 * platform name, device name, driver version, build options and kernel source, so a driver
 * update or a kernel change builds afresh. DIR = $DS_OPENCL_CACHE, else
 * $XDG_CACHE_HOME/dsd/opencl, else ~/.cache/dsd/opencl; "off" disables it. A bad or stale
 * binary is ignored (rebuilt from source). Work-group sizes come from the device's and the
 * kernel's limits (CL_DEVICE_MAX_WORK_GROUP_SIZE, CL_KERNEL_WORK_GROUP_SIZE, local memory).
 * One in-order queue per device: ops run asynchronously in submission order; reads block. */
#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ds_backend.h"
#include "ds_backend_kernels.h" /* generated: ds_backend_kernels_cl[], _len */
#include "ds_hash.h"
#include "ds_log.h"

#define NB 4 /* input rows per matmul work-item (kernels/ops.cl) */

enum {
    K_MM_F32,
    K_MM_BF16,
    K_MM_F8,
    K_MV_F32,
    K_MV_BF16,
    K_MV_F8,
    K_RMSNORM,
    K_ROPE,
    K_MLA,
    K_SWIGLU,
    K_TOPK,
    K_ADD,
    K_SCALE,
    K_COPY4,
    K_RMS_ROWS, /* absent without cl_khr_fp64 */
    K_MLA_QLAT,
    K_MLA_SCORES,
    K_MLA_SOFTMAX,
    K_MLA_WSUM,
    K_MLA_OUT,
    K_ROUTER,
    K_GATHER,
    K_N
};
static const char *const kernel_names[K_N] = {
    "matmul_f32", "matmul_bf16", "matmul_f8",    "matvec_f32", "matvec_bf16", "matvec_f8",
    "rmsnorm",    "rope",        "mla_decode",   "swiglu",     "topk",        "add",
    "scale",      "copy4",       "rmsnorm_rows", "mla_qlat",   "mla_scores",  "mla_softmax",
    "mla_wsum",   "mla_out",     "router",       "gather_rows"};

typedef struct ocl {
    cl_context ctx;
    cl_device_id dev;
    cl_command_queue q;
    cl_program prog;
    cl_kernel k[K_N];
    cl_mem lut;         /* [256] float: FP8 E4M3 values */
    size_t max_wg;      /* CL_DEVICE_MAX_WORK_GROUP_SIZE */
    size_t mm_rpg;      /* matmul rows per work-group (local size 16 x mm_rpg) */
    size_t red_wg;      /* rmsnorm / mla work-group size (power of two) */
    cl_ulong local_mem; /* bytes of local memory */
    cl_uint units;      /* CL_DEVICE_MAX_COMPUTE_UNITS */
} ocl;

typedef struct ocl_weight {
    cl_mem data;  /* checkpoint format: the kernels widen while streaming */
    cl_mem scale; /* F8 block scales, or NULL */
} ocl_weight;

static int cl_fail(ds_error *err, cl_int e, const char *what)
{
    return ds_error_set(
        err, e == CL_MEM_OBJECT_ALLOCATION_FAILURE || e == CL_OUT_OF_HOST_MEMORY ? -ENOMEM : -EIO,
        "opencl: %s failed (error %d)", what, (int)e);
}

static void dev_str(cl_device_id d, cl_device_info what, char *out, size_t len)
{
    out[0] = 0;
    if (clGetDeviceInfo(d, what, len - 1, out, NULL) != CL_SUCCESS)
        out[0] = 0;
    out[len - 1] = 0;
}

static int mkdir_p(const char *path)
{
    char tmp[1024];
    snprintf(tmp, sizeof(tmp), "%s", path);
    for (char *p = tmp + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            mkdir(tmp, 0755);
            *p = '/';
        }
    return mkdir(tmp, 0755) == 0 || errno == EEXIST ? 0 : -errno;
}

/* The cache directory, or "" when disabled / no home. */
static void cache_dir(char *out, size_t len)
{
    const char *e = getenv("DS_OPENCL_CACHE"), *x = getenv("XDG_CACHE_HOME"), *h = getenv("HOME");
    if (e && !strcmp(e, "off"))
        out[0] = 0;
    else if (e && *e)
        snprintf(out, len, "%s", e);
    else if (x && *x)
        snprintf(out, len, "%s/dsd/opencl", x);
    else if (h && *h)
        snprintf(out, len, "%s/.cache/dsd/opencl", h);
    else
        out[0] = 0;
}

static const char build_opts[] = "-cl-std=CL1.2";

/* Builds the program from a cached binary if one matches, else from source (and caches it). */
static int build_program(ocl *o, cl_platform_id plat, ds_error *err)
{
    char pname[256], dname[256], dver[256], dir[900], path[1024];
    clGetPlatformInfo(plat, CL_PLATFORM_NAME, sizeof(pname) - 1, pname, NULL);
    pname[sizeof(pname) - 1] = 0;
    dev_str(o->dev, CL_DEVICE_NAME, dname, sizeof(dname));
    dev_str(o->dev, CL_DRIVER_VERSION, dver, sizeof(dver));
    uint64_t h = DS_HASH_FNV1A_INIT;
    h = ds_hash_fnv1a(h, pname, strlen(pname) + 1);
    h = ds_hash_fnv1a(h, dname, strlen(dname) + 1);
    h = ds_hash_fnv1a(h, dver, strlen(dver) + 1);
    h = ds_hash_fnv1a(h, build_opts, sizeof(build_opts));
    h = ds_hash_fnv1a(h, ds_backend_kernels_cl, ds_backend_kernels_cl_len);
    cache_dir(dir, sizeof(dir));
    path[0] = 0;
    if (dir[0])
        snprintf(path, sizeof(path), "%s/%016llx.clbin", dir, (unsigned long long)h);
    cl_int e;
    if (path[0]) {
        FILE *f = fopen(path, "rb");
        if (f) {
            unsigned char *bin = NULL;
            long n = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
            if (n > 0 && n < (64l << 20) && fseek(f, 0, SEEK_SET) == 0 &&
                (bin = malloc((size_t)n)) && fread(bin, 1, (size_t)n, f) == (size_t)n) {
                size_t sz = (size_t)n;
                const unsigned char *bp = bin;
                cl_int st;
                o->prog = clCreateProgramWithBinary(o->ctx, 1, &o->dev, &sz, &bp, &st, &e);
                if (o->prog &&
                    (e != CL_SUCCESS || st != CL_SUCCESS ||
                     clBuildProgram(o->prog, 1, &o->dev, build_opts, NULL, NULL) != CL_SUCCESS)) {
                    clReleaseProgram(o->prog);
                    o->prog = NULL;
                }
            }
            free(bin);
            fclose(f);
            if (o->prog) {
                ds_log(DS_LOG_DEBUG, "opencl: program from cache %s", path);
                return 0;
            }
        }
    }
    const char *src = (const char *)ds_backend_kernels_cl;
    size_t len = ds_backend_kernels_cl_len;
    o->prog = clCreateProgramWithSource(o->ctx, 1, &src, &len, &e);
    if (!o->prog)
        return cl_fail(err, e, "clCreateProgramWithSource");
    e = clBuildProgram(o->prog, 1, &o->dev, build_opts, NULL, NULL);
    if (e != CL_SUCCESS) {
        char log[2048] = "";
        clGetProgramBuildInfo(o->prog, o->dev, CL_PROGRAM_BUILD_LOG, sizeof(log) - 1, log, NULL);
        log[sizeof(log) - 1] = 0;
        return ds_error_set(err, -EIO, "opencl: building kernels for %s failed: %s", dname, log);
    }
    size_t bsz = 0;
    if (path[0] && mkdir_p(dir) == 0 &&
        clGetProgramInfo(o->prog, CL_PROGRAM_BINARY_SIZES, sizeof(bsz), &bsz, NULL) == CL_SUCCESS &&
        bsz > 0) {
        unsigned char *bin = malloc(bsz);
        char tmp[1100];
        snprintf(tmp, sizeof(tmp), "%s.%d.tmp", path, (int)getpid());
        if (bin &&
            clGetProgramInfo(o->prog, CL_PROGRAM_BINARIES, sizeof(bin), &bin, NULL) == CL_SUCCESS) {
            FILE *f = fopen(tmp, "wb");
            /* Written aside then renamed: a concurrent reader never sees half a binary. */
            if (f && fwrite(bin, 1, bsz, f) == bsz && fclose(f) == 0)
                rename(tmp, path);
            else {
                if (f)
                    fclose(f);
                unlink(tmp);
            }
        }
        free(bin);
    }
    return 0;
}

static void ocl_close(void *impl)
{
    ocl *o = impl;
    if (!o)
        return;
    if (o->q)
        clFinish(o->q);
    for (int i = 0; i < K_N; i++)
        if (o->k[i])
            clReleaseKernel(o->k[i]);
    if (o->lut)
        clReleaseMemObject(o->lut);
    if (o->prog)
        clReleaseProgram(o->prog);
    if (o->q)
        clReleaseCommandQueue(o->q);
    if (o->ctx)
        clReleaseContext(o->ctx);
    free(o);
}

/* The index-th device over all platforms, in platform then device order. */
static int pick_device(unsigned index, cl_platform_id *plat, cl_device_id *dev, ds_error *err)
{
    cl_platform_id ps[16];
    cl_uint np = 0;
    if (clGetPlatformIDs(16, ps, &np) != CL_SUCCESS || np == 0)
        return ds_error_set(err, -ENOENT, "opencl: no OpenCL platform");
    if (np > 16)
        np = 16;
    unsigned seen = 0;
    for (cl_uint p = 0; p < np; p++) {
        cl_device_id ds[32];
        cl_uint nd = 0;
        if (clGetDeviceIDs(ps[p], CL_DEVICE_TYPE_ALL, 32, ds, &nd) != CL_SUCCESS)
            continue;
        if (nd > 32)
            nd = 32;
        if (index < seen + nd) {
            *plat = ps[p];
            *dev = ds[index - seen];
            return 0;
        }
        seen += nd;
    }
    return ds_error_set(err, -ENOENT, "opencl: device %u not found (%u devices)", index, seen);
}

static int ocl_open(const char *arg, void **impl, char *name, size_t name_len, ds_error *err)
{
    *impl = NULL;
    unsigned index = arg ? (unsigned)strtoul(arg, NULL, 10) : 0;
    cl_platform_id plat = NULL;
    cl_device_id dev = NULL;
    int rc = pick_device(index, &plat, &dev, err);
    if (rc < 0)
        return rc;
    ocl *o = calloc(1, sizeof(*o));
    if (!o)
        return ds_error_set(err, -ENOMEM, "opencl: out of memory");
    o->dev = dev;
    cl_int e;
    o->ctx = clCreateContext(NULL, 1, &dev, NULL, NULL, &e);
    if (!o->ctx) {
        rc = cl_fail(err, e, "clCreateContext");
        goto fail;
    }
    o->q = clCreateCommandQueue(o->ctx, dev, 0, &e);
    if (!o->q) {
        rc = cl_fail(err, e, "clCreateCommandQueue");
        goto fail;
    }
    if ((rc = build_program(o, plat, err)) < 0)
        goto fail;
    for (int i = 0; i < K_N; i++) {
        o->k[i] = clCreateKernel(o->prog, kernel_names[i], &e);
        if (!o->k[i] && i == K_RMS_ROWS) /* a device without fp64 */
            continue;
        if (!o->k[i]) {
            rc = cl_fail(err, e, kernel_names[i]);
            goto fail;
        }
    }
    float lut[256];
    for (int i = 0; i < 256; i++)
        lut[i] = ds_fp8_e4m3_to_f32((uint8_t)i);
    o->lut = clCreateBuffer(o->ctx, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR, sizeof(lut), lut, &e);
    if (!o->lut) {
        rc = cl_fail(err, e, "lut buffer");
        goto fail;
    }
    clGetDeviceInfo(dev, CL_DEVICE_MAX_WORK_GROUP_SIZE, sizeof(o->max_wg), &o->max_wg, NULL);
    clGetDeviceInfo(dev, CL_DEVICE_MAX_COMPUTE_UNITS, sizeof(o->units), &o->units, NULL);
    if (o->units < 1)
        o->units = 1;
    clGetDeviceInfo(dev, CL_DEVICE_LOCAL_MEM_SIZE, sizeof(o->local_mem), &o->local_mem, NULL);
    /* matmul: 16 lanes per row, as many rows per group as the kernel allows up to 16
     * (256 work-items: a good occupancy on GPUs, small enough for low-end ones). */
    size_t lim = o->max_wg;
    for (int i = K_MM_F32; i <= K_MV_F8; i++) { /* the smallest limit of the matmul kernels */
        if (!o->k[i])
            continue;
        size_t kwg = 0;
        if (clGetKernelWorkGroupInfo(o->k[i], dev, CL_KERNEL_WORK_GROUP_SIZE, sizeof(kwg), &kwg,
                                     NULL) == CL_SUCCESS &&
            kwg && kwg < lim)
            lim = kwg;
    }
    o->mm_rpg = lim / 16;
    if (o->mm_rpg > 16)
        o->mm_rpg = 16;
    if (o->mm_rpg < 1)
        o->mm_rpg = 1;
    while (o->mm_rpg * NB * 16 * sizeof(float) > o->local_mem / 2 && o->mm_rpg > 1)
        o->mm_rpg /= 2;
    if (lim < 16) {
        rc = ds_error_set(err, -ENOTSUP, "opencl: work-groups of %zu items are too small", lim);
        goto fail;
    }
    o->red_wg = 1;
    while (o->red_wg * 2 <= lim && o->red_wg * 2 <= 256)
        o->red_wg *= 2;
    char dname[200];
    dev_str(dev, CL_DEVICE_NAME, dname, sizeof(dname));
    snprintf(name, name_len, "%s", dname);
    *impl = o;
    return 0;
fail:
    ocl_close(o);
    return rc;
}

static int ocl_buf_alloc(void *impl, size_t bytes, void **buf, ds_error *err)
{
    ocl *o = impl;
    cl_int e;
    cl_mem m = clCreateBuffer(o->ctx, CL_MEM_READ_WRITE, bytes, NULL, &e);
    if (!m)
        return cl_fail(err, e, "clCreateBuffer");
    *buf = m;
    return 0;
}

static void ocl_buf_free(void *impl, void *buf)
{
    if (buf)
        clReleaseMemObject((cl_mem)buf);
}

static int ocl_buf_write(void *impl, void *buf, size_t off, const void *src, size_t bytes,
                         ds_error *err)
{
    ocl *o = impl;
    /* Blocking: the caller may reuse src at once. */
    cl_int e = clEnqueueWriteBuffer(o->q, (cl_mem)buf, CL_TRUE, off, bytes, src, 0, NULL, NULL);
    return e == CL_SUCCESS ? 0 : cl_fail(err, e, "clEnqueueWriteBuffer");
}

static int ocl_buf_read(void *impl, void *buf, size_t off, void *dst, size_t bytes, ds_error *err)
{
    ocl *o = impl;
    cl_int e = clEnqueueReadBuffer(o->q, (cl_mem)buf, CL_TRUE, off, bytes, dst, 0, NULL, NULL);
    return e == CL_SUCCESS ? 0 : cl_fail(err, e, "clEnqueueReadBuffer");
}

static int run_1d(struct ocl *o, int ki, size_t count, ds_error *err);
#define ARG(k, i, v) e |= clSetKernelArg(k, i, sizeof(v), &(v))

static int ocl_copy(void *impl, void *dst, size_t dst_off, void *src, size_t src_off, size_t bytes,
                    ds_error *err)
{
    ocl *o = impl;
    cl_int e = 0;
    if (dst_off == 0 && src_off == 0 && bytes % 16 == 0 && dst != src) {
        /* Whole-buffer copies run as a kernel (PoCL copies buffers on one thread). */
        cl_kernel k = o->k[K_COPY4];
        cl_mem dm = dst, sm = src;
        cl_ulong n4 = bytes / 16;
        ARG(k, 0, dm);
        ARG(k, 1, sm);
        ARG(k, 2, n4);
        if (e != CL_SUCCESS)
            return cl_fail(err, e, "copy arguments");
        size_t cap = (size_t)o->units * 4 * 256;
        return run_1d(o, K_COPY4, (size_t)n4 < cap ? (size_t)n4 : cap, err);
    }
    e = clEnqueueCopyBuffer(o->q, (cl_mem)src, (cl_mem)dst, src_off, dst_off, bytes, 0, NULL, NULL);
    return e == CL_SUCCESS ? 0 : cl_fail(err, e, "clEnqueueCopyBuffer");
}

static void ocl_weight_free(void *impl, void *p)
{
    ocl_weight *w = p;
    if (!w)
        return;
    if (w->data)
        clReleaseMemObject(w->data);
    if (w->scale)
        clReleaseMemObject(w->scale);
    free(w);
}

static int ocl_weight_upload(void *impl, const ds_bk_weight_desc *d, void **ret, ds_error *err)
{
    ocl *o = impl;
    size_t el = d->dtype == DS_BK_F32 ? 4 : d->dtype == DS_BK_BF16 ? 2 : 1;
    ocl_weight *w = calloc(1, sizeof(*w));
    if (!w)
        return ds_error_set(err, -ENOMEM, "opencl: out of memory");
    cl_int e;
    /* Kept in checkpoint format: matvec is bandwidth-bound, so widening on the device would
     * only multiply the bytes streamed per token. */
    w->data = clCreateBuffer(o->ctx, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR,
                             (size_t)d->rows * d->cols * el, (void *)d->data, &e);
    if (!w->data) {
        ocl_weight_free(o, w);
        return cl_fail(err, e, "weight upload");
    }
    if (d->dtype == DS_BK_F8_E4M3) {
        size_t ns = (size_t)((d->rows + d->block_rows - 1) / d->block_rows) *
                    ((d->cols + d->block_cols - 1) / d->block_cols);
        w->scale = clCreateBuffer(o->ctx, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR,
                                  ns * sizeof(float), (void *)d->scale_inv, &e);
        if (!w->scale) {
            ocl_weight_free(o, w);
            return cl_fail(err, e, "weight scale upload");
        }
    }
    *ret = w;
    return 0;
}

static int run(ocl *o, int k, cl_uint dims, const size_t *global, const size_t *local,
               ds_error *err)
{
    cl_int e = clEnqueueNDRangeKernel(o->q, o->k[k], dims, NULL, global, local, 0, NULL, NULL);
    return e == CL_SUCCESS ? 0 : cl_fail(err, e, kernel_names[k]);
}

static int ocl_matmul(void *impl, void *wp, const ds_bk_weight_desc *d, void *x, size_t x_off,
                      uint32_t n, void *y, size_t y_off, ds_error *err)
{
    ocl *o = impl;
    ocl_weight *w = wp;
    int ki = d->dtype == DS_BK_F32 ? K_MM_F32 : d->dtype == DS_BK_BF16 ? K_MM_BF16 : K_MM_F8;
    size_t nb = NB;
    if (n == 1) { /* decode: the one-row variant (no per-row loop) */
        ki += K_MV_F32 - K_MM_F32;
        nb = 1;
    }
    cl_kernel k = o->k[ki];
    cl_uint rows = d->rows, cols = d->cols, n_ = n;
    cl_uint brow = d->block_rows ? d->block_rows : 1, bcol = d->block_cols ? d->block_cols : 1;
    cl_uint nbc = (cols + bcol - 1) / bcol;
    if ((bcol & (bcol - 1)) == 0) /* power of two: the kernel shifts (kernels/ops.cl, w_f8) */
        bcol = 0x80000000u | (cl_uint)__builtin_ctz(bcol);
    cl_ulong xo = x_off, yo = y_off;
    cl_mem xm = x, ym = y;
    cl_int e = 0;
    ARG(k, 0, w->data);
    e |= clSetKernelArg(k, 1, sizeof(cl_mem), w->scale ? &w->scale : NULL);
    ARG(k, 2, o->lut);
    ARG(k, 3, rows);
    ARG(k, 4, cols);
    ARG(k, 5, nbc);
    ARG(k, 6, brow);
    ARG(k, 7, bcol);
    ARG(k, 8, xm);
    ARG(k, 9, xo);
    ARG(k, 10, n_);
    ARG(k, 11, ym);
    ARG(k, 12, yo);
    e |= clSetKernelArg(k, 13, o->mm_rpg * nb * 16 * sizeof(float), NULL);
    if (e != CL_SUCCESS)
        return cl_fail(err, e, "matmul arguments");
    size_t local[3] = {16, o->mm_rpg, 1};
    size_t global[3] = {16, (rows + o->mm_rpg - 1) / o->mm_rpg * o->mm_rpg, (n + nb - 1) / nb};
    return run(o, ki, 3, global, local, err);
}

static int ocl_rmsnorm(void *impl, void *x, void *gamma, uint32_t n, uint32_t d, float eps, void *y,
                       ds_error *err)
{
    ocl *o = impl;
    cl_kernel k = o->k[K_RMSNORM];
    cl_mem xm = x, gm = gamma, ym = y;
    cl_uint d_ = d;
    cl_int e = 0;
    ARG(k, 0, xm);
    ARG(k, 1, gm);
    ARG(k, 2, d_);
    ARG(k, 3, eps);
    ARG(k, 4, ym);
    e |= clSetKernelArg(k, 5, o->red_wg * sizeof(float), NULL);
    if (e != CL_SUCCESS)
        return cl_fail(err, e, "rmsnorm arguments");
    size_t local = o->red_wg, global = (size_t)n * o->red_wg;
    return run(o, K_RMSNORM, 1, &global, &local, err);
}

static int ocl_rope(void *impl, void *x, uint32_t n, uint32_t heads, uint32_t stride, uint32_t off,
                    uint32_t dim, void *cs, void *sn, ds_error *err)
{
    ocl *o = impl;
    cl_kernel k = o->k[K_ROPE];
    cl_mem xm = x, cm = cs, sm = sn;
    cl_uint h = heads, st = stride, of = off, dm = dim;
    cl_int e = 0;
    ARG(k, 0, xm);
    ARG(k, 1, h);
    ARG(k, 2, st);
    ARG(k, 3, of);
    ARG(k, 4, dm);
    ARG(k, 5, cm);
    ARG(k, 6, sm);
    if (e != CL_SUCCESS)
        return cl_fail(err, e, "rope arguments");
    size_t global[2] = {dim / 2, (size_t)n * heads};
    return run(o, K_ROPE, 2, global, NULL, err);
}

static int ocl_mla_decode(void *impl, void *q_lat, void *q_pe, void *cache, uint32_t heads,
                          uint32_t C, uint32_t R, uint32_t t, float scale, void *out, ds_error *err)
{
    ocl *o = impl;
    cl_kernel k = o->k[K_MLA];
    cl_int e;
    cl_mem scores =
        clCreateBuffer(o->ctx, CL_MEM_READ_WRITE, (size_t)heads * t * sizeof(float), NULL, &e);
    if (!scores)
        return cl_fail(err, e, "mla scratch");
    cl_mem a = q_lat, b = q_pe, c = cache, om = out;
    cl_uint C_ = C, R_ = R, t_ = t;
    e = 0;
    ARG(k, 0, a);
    ARG(k, 1, b);
    ARG(k, 2, c);
    ARG(k, 3, C_);
    ARG(k, 4, R_);
    ARG(k, 5, t_);
    ARG(k, 6, scale);
    ARG(k, 7, om);
    ARG(k, 8, scores);
    e |= clSetKernelArg(k, 9, o->red_wg * sizeof(float), NULL);
    int rc = e == CL_SUCCESS ? 0 : cl_fail(err, e, "mla arguments");
    size_t local = o->red_wg, global = (size_t)heads * o->red_wg;
    if (rc == 0)
        rc = run(o, K_MLA, 1, &global, &local, err);
    /* Released now; the runtime keeps it alive until the kernel is done. */
    clReleaseMemObject(scores);
    return rc;
}

/* 1-D elementwise launch, rounded up to 256. */
static int run_1d(struct ocl *o, int ki, size_t count, ds_error *err)
{
    size_t global = (count + 255) / 256 * 256;
    return run(o, ki, 1, &global, NULL, err);
}

static int ocl_swiglu(void *impl, void *g, void *u, size_t count, ds_error *err)
{
    ocl *o = impl;
    cl_kernel k = o->k[K_SWIGLU];
    cl_mem gm = g, um = u;
    cl_ulong cnt = count;
    cl_int e = 0;
    ARG(k, 0, gm);
    ARG(k, 1, um);
    ARG(k, 2, cnt);
    return e == CL_SUCCESS ? run_1d(o, K_SWIGLU, count, err) : cl_fail(err, e, "swiglu arguments");
}

static int ocl_topk(void *impl, void *scores, void *bias, uint32_t n, uint32_t E, uint32_t k_,
                    void *ids, void *weights, ds_error *err)
{
    ocl *o = impl;
    cl_kernel k = o->k[K_TOPK];
    cl_mem sm = scores, bm = bias ? bias : scores, im = ids, wm = weights;
    cl_uint hb = bias != NULL, n_ = n, E_ = E, kk = k_;
    cl_int e = 0;
    ARG(k, 0, sm);
    ARG(k, 1, bm);
    ARG(k, 2, hb);
    ARG(k, 3, n_);
    ARG(k, 4, E_);
    ARG(k, 5, kk);
    ARG(k, 6, im);
    ARG(k, 7, wm);
    return e == CL_SUCCESS ? run_1d(o, K_TOPK, n, err) : cl_fail(err, e, "topk arguments");
}

static int ocl_add(void *impl, void *y, void *x, size_t count, ds_error *err)
{
    ocl *o = impl;
    cl_kernel k = o->k[K_ADD];
    cl_mem ym = y, xm = x;
    cl_ulong cnt = count;
    cl_int e = 0;
    ARG(k, 0, ym);
    ARG(k, 1, xm);
    ARG(k, 2, cnt);
    return e == CL_SUCCESS ? run_1d(o, K_ADD, count, err) : cl_fail(err, e, "add arguments");
}

static int ocl_scale(void *impl, void *y, float s, size_t count, ds_error *err)
{
    ocl *o = impl;
    cl_kernel k = o->k[K_SCALE];
    cl_mem ym = y;
    cl_ulong cnt = count;
    cl_int e = 0;
    ARG(k, 0, ym);
    ARG(k, 1, s);
    ARG(k, 2, cnt);
    return e == CL_SUCCESS ? run_1d(o, K_SCALE, count, err) : cl_fail(err, e, "scale arguments");
}

static int ocl_finish(void *impl, ds_error *err)
{
    ocl *o = impl;
    cl_int e = clFinish(o->q);
    return e == CL_SUCCESS ? 0 : cl_fail(err, e, "clFinish");
}

/* ---- ABI 2 ops ---- */

/* The weight arguments of w_elem (kernels/ops.cl) at index i..i+6. */
static cl_int weight_args(ocl *o, cl_kernel k, cl_uint i, ocl_weight *w, const ds_bk_weight_desc *d)
{
    cl_uint kind = d->dtype == DS_BK_F32 ? 0 : d->dtype == DS_BK_BF16 ? 1 : 2;
    cl_uint brow = d->block_rows ? d->block_rows : 1, bcol = d->block_cols ? d->block_cols : 1;
    cl_uint nbc = (d->cols + bcol - 1) / bcol;
    cl_int e = 0;
    ARG(k, i, kind);
    ARG(k, i + 1, w->data);
    e |= clSetKernelArg(k, i + 2, sizeof(cl_mem), w->scale ? &w->scale : NULL);
    ARG(k, i + 3, o->lut);
    ARG(k, i + 4, nbc);
    ARG(k, i + 5, brow);
    ARG(k, i + 6, bcol);
    return e;
}

static int ocl_rmsnorm_rows(void *impl, void *x, size_t x_off, size_t x_stride, void *gamma,
                            uint32_t n, uint32_t d, double eps, void *y, size_t y_off,
                            size_t y_stride, ds_error *err)
{
    ocl *o = impl;
    cl_kernel k = o->k[K_RMS_ROWS];
    if (!k)
        return ds_error_set(err, -ENOTSUP,
                            "opencl: the device has no fp64 (cl_khr_fp64): the engine's RMSNorm "
                            "sums in double");
    cl_mem xm = x, gm = gamma, ym = y;
    cl_ulong xo = x_off, xs = x_stride, yo = y_off, ys = y_stride;
    cl_uint d_ = d;
    cl_double ep = eps;
    cl_int e = 0;
    ARG(k, 0, xm);
    ARG(k, 1, xo);
    ARG(k, 2, xs);
    ARG(k, 3, gm);
    ARG(k, 4, d_);
    ARG(k, 5, ep);
    ARG(k, 6, ym);
    ARG(k, 7, yo);
    ARG(k, 8, ys);
    e |= clSetKernelArg(k, 9, sizeof(float), NULL);
    if (e != CL_SUCCESS)
        return cl_fail(err, e, "rmsnorm_rows arguments");
    size_t local = o->red_wg, global = (size_t)n * o->red_wg;
    return run(o, K_RMS_ROWS, 1, &global, &local, err);
}

static int ocl_mla_attn(void *impl, const ds_bk_mla_desc *m, void *q, size_t q_off, void *wp,
                        const ds_bk_weight_desc *d, void *cache, uint32_t pos0, uint32_t n,
                        void *scratch, void *att, size_t att_off, ds_error *err)
{
    ocl *o = impl;
    ocl_weight *w = wp;
    cl_mem qm = q, cm = cache, sm = scratch, am = att;
    cl_ulong qo = q_off, ao = att_off;
    cl_uint H = m->heads, dn = m->nope, dr = m->rope, dv = m->v, C = m->C, p0 = pos0;
    cl_uint tmax = pos0 + n;
    float scale = m->scale;
    /* scratch (floats): q_lat [n, H, C], o_lat [n, H, C], scores [n, H, tmax] */
    cl_ulong qlo = 0, olo = (cl_ulong)n * H * C, sco = 2 * olo;
    int rc;
    cl_kernel k = o->k[K_MLA_QLAT];
    cl_int e = 0;
    ARG(k, 0, qm);
    ARG(k, 1, qo);
    e |= weight_args(o, k, 2, w, d);
    ARG(k, 9, H);
    ARG(k, 10, dn);
    ARG(k, 11, dr);
    ARG(k, 12, dv);
    ARG(k, 13, C);
    ARG(k, 14, sm);
    ARG(k, 15, qlo);
    size_t g1[3] = {(C + 63) / 64 * 64, H, n};
    if (e != CL_SUCCESS)
        return cl_fail(err, e, "mla_qlat arguments");
    if ((rc = run(o, K_MLA_QLAT, 3, g1, NULL, err)) < 0)
        return rc;
    k = o->k[K_MLA_SCORES];
    ARG(k, 0, qm);
    ARG(k, 1, qo);
    ARG(k, 2, sm);
    ARG(k, 3, qlo);
    ARG(k, 4, cm);
    ARG(k, 5, H);
    ARG(k, 6, dn);
    ARG(k, 7, dr);
    ARG(k, 8, C);
    ARG(k, 9, p0);
    ARG(k, 10, tmax);
    ARG(k, 11, scale);
    ARG(k, 12, sco);
    size_t g2[3] = {(tmax + 63) / 64 * 64, H, n};
    if (e != CL_SUCCESS)
        return cl_fail(err, e, "mla_scores arguments");
    if ((rc = run(o, K_MLA_SCORES, 3, g2, NULL, err)) < 0)
        return rc;
    k = o->k[K_MLA_SOFTMAX];
    ARG(k, 0, H);
    ARG(k, 1, p0);
    ARG(k, 2, tmax);
    ARG(k, 3, sm);
    ARG(k, 4, sco);
    size_t g3[2] = {H, n};
    if (e != CL_SUCCESS)
        return cl_fail(err, e, "mla_softmax arguments");
    if ((rc = run(o, K_MLA_SOFTMAX, 2, g3, NULL, err)) < 0)
        return rc;
    k = o->k[K_MLA_WSUM];
    ARG(k, 0, sm);
    ARG(k, 1, sco);
    ARG(k, 2, cm);
    ARG(k, 3, H);
    ARG(k, 4, dr);
    ARG(k, 5, C);
    ARG(k, 6, p0);
    ARG(k, 7, tmax);
    ARG(k, 8, olo);
    if (e != CL_SUCCESS)
        return cl_fail(err, e, "mla_wsum arguments");
    if ((rc = run(o, K_MLA_WSUM, 3, g1, NULL, err)) < 0)
        return rc;
    k = o->k[K_MLA_OUT];
    ARG(k, 0, sm);
    ARG(k, 1, olo);
    e |= weight_args(o, k, 2, w, d);
    ARG(k, 9, H);
    ARG(k, 10, dn);
    ARG(k, 11, dv);
    ARG(k, 12, C);
    ARG(k, 13, am);
    ARG(k, 14, ao);
    size_t g5[3] = {(dv + 31) / 32 * 32, H, n};
    if (e != CL_SUCCESS)
        return cl_fail(err, e, "mla_out arguments");
    return run(o, K_MLA_OUT, 3, g5, NULL, err);
}

static int ocl_router(void *impl, const ds_bk_router_desc *r, void *logits, void *bias, uint32_t n,
                      void *scratch, void *ids, void *weights, ds_error *err)
{
    ocl *o = impl;
    cl_kernel k = o->k[K_ROUTER];
    cl_mem lm = logits, bm = bias ? bias : logits, sm = scratch, im = ids, wm = weights;
    cl_uint hb = bias != NULL, n_ = n, E = r->E, kk = r->k, G = r->n_group, tg = r->topk_group;
    cl_uint sg = r->sigmoid, me = r->method, no = r->norm;
    float sf = r->scaling;
    cl_int e = 0;
    ARG(k, 0, lm);
    ARG(k, 1, bm);
    ARG(k, 2, hb);
    ARG(k, 3, n_);
    ARG(k, 4, E);
    ARG(k, 5, kk);
    ARG(k, 6, G);
    ARG(k, 7, tg);
    ARG(k, 8, sg);
    ARG(k, 9, me);
    ARG(k, 10, no);
    ARG(k, 11, sf);
    ARG(k, 12, sm);
    ARG(k, 13, im);
    ARG(k, 14, wm);
    return e == CL_SUCCESS ? run_1d(o, K_ROUTER, n, err) : cl_fail(err, e, "router arguments");
}

static int ocl_gather_rows(void *impl, void *wp, const ds_bk_weight_desc *d, const int32_t *ids,
                           uint32_t n, void *y, size_t y_off, ds_error *err)
{
    ocl *o = impl;
    cl_int e;
    cl_mem idm = clCreateBuffer(o->ctx, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR,
                                (size_t)n * sizeof(int32_t), (void *)ids, &e);
    if (!idm)
        return cl_fail(err, e, "gather ids");
    cl_kernel k = o->k[K_GATHER];
    cl_mem ym = y;
    cl_uint cols = d->cols;
    cl_ulong yo = y_off;
    e = weight_args(o, k, 0, wp, d);
    ARG(k, 7, cols);
    ARG(k, 8, idm);
    ARG(k, 9, ym);
    ARG(k, 10, yo);
    size_t g[2] = {(cols + 63) / 64 * 64, n};
    int rc = e == CL_SUCCESS ? run(o, K_GATHER, 2, g, NULL, err)
                             : cl_fail(err, e, "gather_rows arguments");
    clReleaseMemObject(idm);
    return rc;
}

const ds_backend_ops ds_backend_opencl_ops = {
    .abi = DS_BACKEND_ABI,
    .name = "opencl",
    .open = ocl_open,
    .close = ocl_close,
    .buf_alloc = ocl_buf_alloc,
    .buf_free = ocl_buf_free,
    .buf_write = ocl_buf_write,
    .buf_read = ocl_buf_read,
    .weight_upload = ocl_weight_upload,
    .weight_free = ocl_weight_free,
    .matmul = ocl_matmul,
    .rmsnorm = ocl_rmsnorm,
    .rope = ocl_rope,
    .mla_decode = ocl_mla_decode,
    .swiglu = ocl_swiglu,
    .topk = ocl_topk,
    .add = ocl_add,
    .scale = ocl_scale,
    .copy = ocl_copy,
    .finish = ocl_finish,
    .rmsnorm_rows = ocl_rmsnorm_rows,
    .mla_attn = ocl_mla_attn,
    .router = ocl_router,
    .gather_rows = ocl_gather_rows,
};
