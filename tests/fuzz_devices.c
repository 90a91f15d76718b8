/* fuzz_devices.c — the operator device configuration and the calibration cache parsers take
 * bytes from files: any input must give 0 or a negative errno with a message, never a crash. */
#include <stddef.h>
#include <stdint.h>
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
