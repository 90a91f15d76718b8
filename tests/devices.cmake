# Devices (docs/devices.md): discovery from recorded/synthetic hwloc topologies, operator
# configuration, calibration cache. No OpenCL device is used by the unit test (it points the
# ICD loader at an empty directory), so it runs under the sanitizers too.
ds_add_test(NAME test_devices SOURCES test_devices.c LIBS ds_devices PkgConfig::JANSSON
            ARGS ${CMAKE_CURRENT_SOURCE_DIR}/data/hwloc LABELS unit TIMEOUT 120)
# The real OpenCL ICD (PoCL in CI): discovery marks the CPU device, calibration through the
# backend kernels. Label opencl: outside the sanitizer run.
ds_add_test(NAME test_devices_opencl SOURCES test_devices_opencl.c LIBS ds_devices
            PkgConfig::JANSSON LABELS opencl TIMEOUT 300)
ds_add_fuzz(NAME fuzz_devices SOURCES fuzz_devices.c LIBS ds_devices ITERATIONS 20000)
