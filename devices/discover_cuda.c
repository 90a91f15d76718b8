/* discover_cuda.c — NVIDIA GPUs through the CUDA driver API, loaded at run time.
 *
 * libcuda.so.1 is opened with dlopen so that the same binary runs on nodes without a driver:
 * no library, cuInit failing (no device, driver/kernel mismatch) or zero devices are all the
 * normal empty result. The PCIe link and NUMA affinity come from sysfs by the device's bus id.
 * The function prototypes are declared here by hand (the driver ABI is stable C); no CUDA
 * header is needed to build. */
#include <ctype.h>
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "devices_impl.h"
#include "ds_cleanup.h"
#include "ds_log.h"

typedef int CUresult; /* 0 = CUDA_SUCCESS */
typedef int CUdevice;
typedef void *CUcontext;

enum {                          /* CUdevice_attribute values from the driver API (stable) */
       CU_ATTR_CLOCK_RATE = 13, /* kHz */
       CU_ATTR_MULTIPROCESSOR_COUNT = 16,
       CU_ATTR_INTEGRATED = 18,
       CU_ATTR_PCI_BUS_ID = 33,
       CU_ATTR_PCI_DEVICE_ID = 34,
       CU_ATTR_PCI_DOMAIN_ID = 50,
       CU_ATTR_SHARED_MEM_PER_BLOCK = 8,
       CU_ATTR_CC_MAJOR = 75,
       CU_ATTR_CC_MINOR = 76,
};

struct cuda_api {
    void *lib;
    CUresult (*cuInit)(unsigned);
    CUresult (*cuDriverGetVersion)(int *);
    CUresult (*cuDeviceGetCount)(int *);
    CUresult (*cuDeviceGet)(CUdevice *, int);
    CUresult (*cuDeviceGetName)(char *, int, CUdevice);
    CUresult (*cuDeviceTotalMem)(size_t *, CUdevice);
    CUresult (*cuDeviceGetAttribute)(int *, int, CUdevice);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*cuDevicePrimaryCtxRelease)(CUdevice);
    CUresult (*cuCtxSetCurrent)(CUcontext);
    CUresult (*cuMemGetInfo)(size_t *, size_t *);
    /* calibration without the backend plugin */
    CUresult (*cuMemAlloc)(unsigned long long *, size_t);
    CUresult (*cuMemFree)(unsigned long long);
    CUresult (*cuMemcpyHtoD)(unsigned long long, const void *, size_t);
    CUresult (*cuMemcpyDtoD)(unsigned long long, unsigned long long, size_t);
    CUresult (*cuMemsetD8)(unsigned long long, unsigned char, size_t);
    CUresult (*cuCtxSynchronize)(void);
};

static int load_api(struct cuda_api *a, const char *path)
{
    memset(a, 0, sizeof(*a));
    a->lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!a->lib)
        return -ENOENT;
        /* The _v2 entry points are the 64-bit size_t ones every driver since CUDA 3.2 exports. */
#define SYM(field, name)                                                                           \
    do {                                                                                           \
        *(void **)&a->field = dlsym(a->lib, name);                                                 \
        if (!a->field)                                                                             \
            goto missing;                                                                          \
    } while (0)
    SYM(cuInit, "cuInit");
    SYM(cuDriverGetVersion, "cuDriverGetVersion");
    SYM(cuDeviceGetCount, "cuDeviceGetCount");
    SYM(cuDeviceGet, "cuDeviceGet");
    SYM(cuDeviceGetName, "cuDeviceGetName");
    SYM(cuDeviceTotalMem, "cuDeviceTotalMem_v2");
    SYM(cuDeviceGetAttribute, "cuDeviceGetAttribute");
    SYM(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    SYM(cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2");
    SYM(cuCtxSetCurrent, "cuCtxSetCurrent");
    SYM(cuMemGetInfo, "cuMemGetInfo_v2");
    SYM(cuMemAlloc, "cuMemAlloc_v2");
    SYM(cuMemFree, "cuMemFree_v2");
    SYM(cuMemcpyHtoD, "cuMemcpyHtoD_v2");
    SYM(cuMemcpyDtoD, "cuMemcpyDtoD_v2");
    SYM(cuMemsetD8, "cuMemsetD8_v2");
    SYM(cuCtxSynchronize, "cuCtxSynchronize");
#undef SYM
    return 0;
missing:
    dlclose(a->lib);
    a->lib = NULL;
    return -ENOSYS;
}

static unsigned sysfs_uint(const char *bus, const char *file)
{
    char path[160], buf[64];
    snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/%s", bus, file);
    _cleanup_fclose_ FILE *f = fopen(path, "re");
    if (!f || !fgets(buf, sizeof(buf), f))
        return 0;
    if (!strcmp(file, "current_link_speed")) { /* "16.0 GT/s PCIe" -> generation */
        double gts = atof(buf);
        return gts >= 60   ? 6
               : gts >= 30 ? 5
               : gts >= 15 ? 4
               : gts >= 7  ? 3
               : gts >= 4  ? 2
                           : gts > 0;
    }
    long v = strtol(buf, NULL, 10);
    return v > 0 ? (unsigned)v : 0;
}

static int cuda_discover(ds_device_list *l, const ds_devices_options *opt, ds_error *err)
{
    struct cuda_api a;
    const char *path = opt->cuda_library ? opt->cuda_library : "libcuda.so.1";
    if (load_api(&a, path) < 0)
        return 0;
    int count = 0, version = 0, r = 0;
    if (a.cuInit(0) != 0 || a.cuDeviceGetCount(&count) != 0 || count <= 0) {
        dlclose(a.lib);
        return 0;
    }
    a.cuDriverGetVersion(&version);
    if (count > 64)
        count = 64;
    for (int i = 0; i < count && r == 0; i++) {
        CUdevice dev;
        if (a.cuDeviceGet(&dev, i) != 0)
            continue;
        ds_device_info *d;
        r = ds_devices_append(l, "cuda", &d, err);
        if (r < 0)
            break;
        snprintf(d->source, sizeof(d->source), "cuda");
        snprintf(d->backend_spec, sizeof(d->backend_spec), "cuda:%d", i);
        snprintf(d->vendor, sizeof(d->vendor), "NVIDIA");
        snprintf(d->driver, sizeof(d->driver), "CUDA %d.%d", version / 1000, (version % 1000) / 10);
        snprintf(d->class_name, sizeof(d->class_name), "gpu");
        char name[256] = "";
        a.cuDeviceGetName(name, sizeof(name) - 1, dev);
        ds_devices_copy_text(d->model, sizeof(d->model), name);
        size_t total = 0;
        a.cuDeviceTotalMem(&total, dev);
        d->memory_bytes = total;
        int v = 0;
        if (a.cuDeviceGetAttribute(&v, CU_ATTR_MULTIPROCESSOR_COUNT, dev) == 0)
            d->compute_units = (uint32_t)v;
        if (a.cuDeviceGetAttribute(&v, CU_ATTR_CLOCK_RATE, dev) == 0)
            d->clock_mhz = (uint32_t)(v / 1000);
        if (a.cuDeviceGetAttribute(&v, CU_ATTR_CC_MAJOR, dev) == 0)
            d->cc_major = (uint32_t)v;
        if (a.cuDeviceGetAttribute(&v, CU_ATTR_CC_MINOR, dev) == 0)
            d->cc_minor = (uint32_t)v;
        if (a.cuDeviceGetAttribute(&v, CU_ATTR_SHARED_MEM_PER_BLOCK, dev) == 0)
            d->local_mem_bytes = (uint64_t)v;
        if (a.cuDeviceGetAttribute(&v, CU_ATTR_INTEGRATED, dev) == 0)
            d->unified_memory = v != 0;
        d->kind = DS_DEVICE_KIND_GPU;
        d->fp16 = d->fp64 = true;
        int dom = 0, bus = 0, slot = 0;
        if (a.cuDeviceGetAttribute(&dom, CU_ATTR_PCI_DOMAIN_ID, dev) == 0 &&
            a.cuDeviceGetAttribute(&bus, CU_ATTR_PCI_BUS_ID, dev) == 0 &&
            a.cuDeviceGetAttribute(&slot, CU_ATTR_PCI_DEVICE_ID, dev) == 0) {
            snprintf(d->pci_bus, sizeof(d->pci_bus), "%04x:%02x:%02x.0", (unsigned)dom & 0xffff,
                     (unsigned)bus & 0xff, (unsigned)slot & 0xff);
            d->pcie_gen = sysfs_uint(d->pci_bus, "current_link_speed");
            d->pcie_width = sysfs_uint(d->pci_bus, "current_link_width");
            char npath[160];
            snprintf(npath, sizeof(npath), "/sys/bus/pci/devices/%s/numa_node", d->pci_bus);
            _cleanup_fclose_ FILE *f = fopen(npath, "re");
            int node = -1;
            if (f && fscanf(f, "%d", &node) == 1 && node >= 0)
                d->numa_node = node;
        }
        /* Free memory needs a context; the primary one is shared with the backend plugin. */
        CUcontext ctx = NULL;
        if (a.cuDevicePrimaryCtxRetain(&ctx, dev) == 0) {
            size_t fr = 0, tot = 0;
            if (a.cuCtxSetCurrent(ctx) == 0 && a.cuMemGetInfo(&fr, &tot) == 0)
                d->memory_free_bytes = fr;
            a.cuCtxSetCurrent(NULL);
            a.cuDevicePrimaryCtxRelease(dev);
        }
    }
    /* The library stays loaded: unloading a CUDA driver in-process is not supported well. */
    return r;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static ds_measure summarize(double *v, uint32_t n)
{
    ds_measure m = {0};
    qsort(v, n, sizeof(double), cmp_double);
    m.value = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
    m.spread = m.value > 0 ? (v[n - 1] - v[0]) / m.value : 0;
    m.repeats = n;
    return m;
}

int ds_devices_cuda_calibrate(ds_device_info *d, const char *lib, uint64_t bytes, uint32_t repeats,
                              ds_error *err)
{
    struct cuda_api a;
    int ordinal = -1;
    if (sscanf(d->backend_spec, "cuda:%d", &ordinal) != 1 || ordinal < 0)
        return ds_error_set(err, -EINVAL, "%s: not a CUDA device", d->name);
    if (load_api(&a, lib ? lib : "libcuda.so.1") < 0 || a.cuInit(0) != 0)
        return ds_error_set(err, -ENOENT, "%s: CUDA driver not usable", d->name);
    CUdevice dev;
    CUcontext ctx = NULL;
    if (a.cuDeviceGet(&dev, ordinal) != 0 || a.cuDevicePrimaryCtxRetain(&ctx, dev) != 0)
        return ds_error_set(err, -ENODEV, "%s: no CUDA context", d->name);
    if (repeats > 64)
        repeats = 64;
    double v[64];
    unsigned long long src = 0, dst = 0;
    void *host = malloc(bytes);
    int r = 0;
    if (a.cuCtxSetCurrent(ctx) != 0 || !host || a.cuMemAlloc(&src, bytes) != 0 ||
        a.cuMemAlloc(&dst, bytes) != 0) {
        r = ds_error_set(err, -ENOMEM, "%s: %llu MiB on the device", d->name,
                         (unsigned long long)(bytes >> 20));
        goto out;
    }
    memset(host, 1, bytes);
    /* Host -> device over pageable memory, what a weight upload does. */
    for (uint32_t i = 0; i <= repeats && r == 0; i++) {
        double t0 = ds_devices_now();
        if (a.cuMemcpyHtoD(dst, host, bytes) != 0 || a.cuCtxSynchronize() != 0)
            r = ds_error_set(err, -EIO, "%s: cuMemcpyHtoD failed", d->name);
        if (i > 0)
            v[i - 1] = (double)bytes / (ds_devices_now() - t0);
    }
    if (r < 0)
        goto out;
    d->host_link = summarize(v, repeats);
    /* Device memory bandwidth as a device-to-device copy (read + write): without the backend
     * plugin's matvec this is the closest proxy of weight streaming. */
    for (uint32_t i = 0; i <= repeats && r == 0; i++) {
        double t0 = ds_devices_now();
        if (a.cuMemcpyDtoD(dst, src, bytes) != 0 || a.cuCtxSynchronize() != 0)
            r = ds_error_set(err, -EIO, "%s: cuMemcpyDtoD failed", d->name);
        if (i > 0)
            v[i - 1] = 2.0 * (double)bytes / (ds_devices_now() - t0);
    }
    if (r < 0)
        goto out;
    d->mem_bw = summarize(v, repeats);
    for (uint32_t i = 0; i <= repeats && r == 0; i++) {
        double t0 = ds_devices_now();
        if (a.cuMemsetD8(dst, 0, 1) != 0 || a.cuCtxSynchronize() != 0)
            r = ds_error_set(err, -EIO, "%s: cuMemsetD8 failed", d->name);
        if (i > 0)
            v[i - 1] = ds_devices_now() - t0;
    }
    if (r < 0)
        goto out;
    d->launch = summarize(v, repeats);
    /* FLOP/s is not measured without kernels: the FP32 peak estimate (128 lanes per SM, FMA =
     * 2 FLOP), marked by repeats = 0. */
    d->flops.value = (double)d->compute_units * d->clock_mhz * 1e6 * 128 * 2;
    d->flops.spread = 0;
    d->flops.repeats = 0;
out:
    if (dst)
        a.cuMemFree(dst);
    if (src)
        a.cuMemFree(src);
    free(host);
    a.cuCtxSetCurrent(NULL);
    a.cuDevicePrimaryCtxRelease(dev);
    return r;
}

const ds_discovery_source ds_discovery_cuda = {
    .name = "cuda",
    .priority = 20,
    .enabled_default = true,
    .discover = cuda_discover,
};
