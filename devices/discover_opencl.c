/* discover_opencl.c — OpenCL devices through the ICD loader: every device of every platform,
 * numbered like ds_backend_open("opencl:N") numbers them (platform order, then device order).
 *
 * A CPU-type device (PoCL's pthread device) runs on the cores the cpu devices already
 * describe: it is reported, marked shares_silicon_with the first cpu device, and placement
 * uses it only as an alternative to that CPU. No ICD, no platform: an empty, normal result. */
#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>
#include <stdio.h>
#include <string.h>

#include "devices_impl.h"

#define MAX_PLATFORMS 16
#define MAX_DEVICES   32

static void info_text(cl_device_id dev, cl_device_info what, char *dst, size_t cap)
{
    char buf[1024];
    size_t n = 0;
    if (clGetDeviceInfo(dev, what, sizeof(buf) - 1, buf, &n) != CL_SUCCESS)
        n = 0;
    buf[n < sizeof(buf) ? n : sizeof(buf) - 1] = 0;
    ds_devices_copy_text(dst, cap, buf);
}

static uint64_t info_u64(cl_device_id dev, cl_device_info what)
{
    cl_ulong v = 0;
    if (clGetDeviceInfo(dev, what, sizeof(v), &v, NULL) != CL_SUCCESS)
        return 0;
    return v;
}

static uint32_t info_u32(cl_device_id dev, cl_device_info what)
{
    cl_uint v = 0;
    if (clGetDeviceInfo(dev, what, sizeof(v), &v, NULL) != CL_SUCCESS)
        return 0;
    return v;
}

static int opencl_discover(ds_device_list *l, const ds_devices_options *opt, ds_error *err)
{
    cl_platform_id ps[MAX_PLATFORMS];
    cl_uint np = 0;
    /* -1001 (CL_PLATFORM_NOT_FOUND_KHR) is the loader's "no ICD": not an error here. */
    if (clGetPlatformIDs(MAX_PLATFORMS, ps, &np) != CL_SUCCESS || np == 0)
        return 0;
    if (np > MAX_PLATFORMS)
        np = MAX_PLATFORMS;
    const char *first_cpu = NULL;
    for (size_t i = 0; i < l->n; i++)
        if (l->dev[i].kind == DS_DEVICE_KIND_CPU) {
            first_cpu = l->dev[i].name;
            break;
        }
    unsigned global = 0;
    for (cl_uint p = 0; p < np; p++) {
        cl_device_id ds[MAX_DEVICES];
        cl_uint nd = 0;
        if (clGetDeviceIDs(ps[p], CL_DEVICE_TYPE_ALL, MAX_DEVICES, ds, &nd) != CL_SUCCESS)
            continue;
        if (nd > MAX_DEVICES)
            nd = MAX_DEVICES;
        for (cl_uint k = 0; k < nd; k++, global++) {
            ds_device_info *d;
            int r = ds_devices_append(l, "opencl", &d, err);
            if (r < 0)
                return r;
            cl_device_type type = 0;
            clGetDeviceInfo(ds[k], CL_DEVICE_TYPE, sizeof(type), &type, NULL);
            snprintf(d->source, sizeof(d->source), "opencl");
            snprintf(d->backend_spec, sizeof(d->backend_spec), "opencl:%u", global);
            d->kind = (type & CL_DEVICE_TYPE_GPU) ? DS_DEVICE_KIND_GPU : DS_DEVICE_KIND_ACCEL;
            info_text(ds[k], CL_DEVICE_NAME, d->model, sizeof(d->model));
            info_text(ds[k], CL_DEVICE_VENDOR, d->vendor, sizeof(d->vendor));
            info_text(ds[k], CL_DEVICE_VERSION, d->driver, sizeof(d->driver));
            d->compute_units = info_u32(ds[k], CL_DEVICE_MAX_COMPUTE_UNITS);
            d->clock_mhz = info_u32(ds[k], CL_DEVICE_MAX_CLOCK_FREQUENCY);
            d->memory_bytes = info_u64(ds[k], CL_DEVICE_GLOBAL_MEM_SIZE);
            d->max_alloc_bytes = info_u64(ds[k], CL_DEVICE_MAX_MEM_ALLOC_SIZE);
            d->local_mem_bytes = info_u64(ds[k], CL_DEVICE_LOCAL_MEM_SIZE);
            cl_bool unified = CL_FALSE;
            clGetDeviceInfo(ds[k], CL_DEVICE_HOST_UNIFIED_MEMORY, sizeof(unified), &unified, NULL);
            d->unified_memory = unified == CL_TRUE;
            char ext[4096];
            size_t n = 0;
            if (clGetDeviceInfo(ds[k], CL_DEVICE_EXTENSIONS, sizeof(ext) - 1, ext, &n) !=
                CL_SUCCESS)
                n = 0;
            ext[n < sizeof(ext) ? n : sizeof(ext) - 1] = 0;
            d->fp16 = strstr(ext, "cl_khr_fp16") != NULL;
            d->fp64 = strstr(ext, "cl_khr_fp64") != NULL;
            if (type & CL_DEVICE_TYPE_CPU) {
                d->kind = DS_DEVICE_KIND_CPU;
                d->unified_memory = true;
                if (first_cpu)
                    snprintf(d->shares_silicon_with, sizeof(d->shares_silicon_with), "%s",
                             first_cpu);
                snprintf(d->class_name, sizeof(d->class_name), "server");
            } else {
                snprintf(d->class_name, sizeof(d->class_name), "gpu");
            }
        }
    }
    (void)opt;
    return 0;
}

const ds_discovery_source ds_discovery_opencl = {
    .name = "opencl",
    .priority = 10,
    .enabled_default = true,
    .discover = opencl_discover,
};
