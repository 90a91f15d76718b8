/* devices_impl.h — private to devices/: the list's layout and the discovery components. */
#ifndef DS_DEVICES_IMPL_H
#define DS_DEVICES_IMPL_H

#include "ds_devices.h"

struct ds_device_list {
    ds_device_info *dev; /* [n], capacity cap */
    size_t n, cap;
    char node_name[64];
    char node_class[DS_DEVICE_CLASS_MAX]; /* "" until config or derivation sets it */
    char fingerprint[17];                 /* 16 hex digits + NUL */
};

/* A discovery source: finds devices and appends them with ds_devices_append. Returns 0 (an
 * absent driver is 0 with nothing appended) or a negative errno with err. */
typedef struct ds_discovery_source {
    const char *name;
    int priority;         /* lower runs first: cpu devices exist before opencl marks sharing */
    bool enabled_default; /* false: only when configuration enables it */
    int (*discover)(ds_device_list *l, const ds_devices_options *opt, ds_error *err);
} ds_discovery_source;

extern const ds_discovery_source ds_discovery_cpu;
extern const ds_discovery_source ds_discovery_opencl;
extern const ds_discovery_source ds_discovery_cuda;

/* Appends a zeroed device (numa_node -1) named <prefix><index within prefix>; -ENOSPC past
 * DS_DEVICES_MAX. */
int ds_devices_append(ds_device_list *l, const char *prefix, ds_device_info **ret, ds_error *err);

/* Copies src into dst[cap], always NUL-terminated, trimming trailing blanks. */
void ds_devices_copy_text(char *dst, size_t cap, const char *src);

/* Operator configuration (devices_config.c). */
typedef struct ds_devices_config ds_devices_config;
int ds_devices_config_parse(const char *text, size_t len, const char *origin,
                            ds_devices_config **ret, ds_error *err);
ds_devices_config *ds_devices_config_free(ds_devices_config *c);
bool ds_devices_config_use_opencl_cpu(const ds_devices_config *c);
bool ds_devices_config_source_enabled(const ds_devices_config *c, const char *source, bool dflt);
void ds_devices_config_apply(const ds_devices_config *c, ds_device_list *l);

/* CUDA figures through the driver API alone (copies, a memset as the smallest launch, an
 * FP32 peak estimate for FLOP/s): used when the cuda backend plugin is not available. */
int ds_devices_cuda_calibrate(ds_device_info *d, const char *lib, uint64_t bytes, uint32_t repeats,
                              ds_error *err);

/* Monotonic seconds. */
double ds_devices_now(void);

#endif
