/* fuzz_devices.c — the operator device configuration and the calibration cache parsers take
 * bytes from files: any input must give 0 or a negative errno with a message, never a crash. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ds_devices.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ds_error err = {0};
    int r = ds_devices_config_check((const char *)data, size, &err);
    if (r < 0 && !err.msg[0] && r != -ENOMEM)
        __builtin_trap(); /* every refusal names its line */
    ds_error_clear(&err);
    ds_devices_cache_check((const char *)data, size, "0123456789abcdef", &err);
    char buf[64];
    size_t n = size < sizeof(buf) - 1 ? size : sizeof(buf) - 1;
    memcpy(buf, data, n);
    buf[n] = 0;
    uint64_t v;
    ds_devices_parse_bytes(buf, &v);
    return 0;
}

/* Valid seeds, so that mutations explore near-valid configs and caches. */
size_t ds_fuzz_seeds(uint8_t **bufs, size_t *sizes, size_t max);
size_t ds_fuzz_seeds(uint8_t **bufs, size_t *sizes, size_t max)
{
    static const char *const seeds[] = {
        "# node\nnode.name = edge-1\nnode.class = edge\nexclude = opencl0, cuda\n"
        "opencl.cpu_device = false\nsource.cuda = off\ndevice.cpu0.memory_cap = 8GiB\n"
        "device.cpu1.class = gpu\ndevice.cpu1.labels = a,b\ndevice.cpu2.exclude = yes\n",
        "{\"version\": 1, \"fingerprint\": \"0123456789abcdef\", \"devices\": {\"cpu0\": "
        "{\"mem_bw\": [2.5e10, 0.05, 5], \"flops\": [2e10, 0.1, 5], \"stream_copy\": [4e10, "
        "0.02, 5], \"host_link\": [0, 0, 0], \"launch\": [0, 0, 0]}}}",
    };
    size_t n = 0;
    for (; n < max && n < sizeof(seeds) / sizeof(seeds[0]); n++) {
        sizes[n] = strlen(seeds[n]);
        bufs[n] = malloc(sizes[n]);
        if (!bufs[n])
            break;
        memcpy(bufs[n], seeds[n], sizes[n]);
    }
    return n;
}
