# Compute backends (docs/backends.md): one op suite, run once per backend.
ds_add_test(NAME test_ops SOURCES test_ops.c LIBS ds_devices ds_model ARGS cpu LABELS unit TIMEOUT 120)
# The same suite on the first OpenCL device (PoCL in CI): label opencl, outside the sanitizer run.
add_test(NAME test_ops_opencl COMMAND test_ops opencl)
set_tests_properties(test_ops_opencl PROPERTIES LABELS opencl TIMEOUT 300)
if(TARGET ds_backend_cuda)
    # Skipped (exit 77) where the plugin finds no CUDA device.
    add_test(NAME test_ops_cuda COMMAND test_ops cuda)
    set_tests_properties(test_ops_cuda PROPERTIES LABELS cuda TIMEOUT 300 SKIP_RETURN_CODE 77)
    add_dependencies(test_ops ds_backend_cuda)
endif()
include(${PROJECT_SOURCE_DIR}/experts/backend.cmake) # no-op once experts/CMakeLists.txt has it
# End to end: the reference models with every routed expert on the OpenCL device vs the CPU engine.
ds_add_test(NAME test_backend_e2e SOURCES test_backend_e2e.c LIBS ds_experts ds_devices ds_model
            ARGS opencl LABELS opencl TIMEOUT 300)
# The same run with the reference cpu backend: bit-identical logits required (unit, sanitized).
add_test(NAME test_backend_e2e_cpu COMMAND test_backend_e2e cpu)
set_tests_properties(test_backend_e2e_cpu PROPERTIES LABELS unit TIMEOUT 120)
if(TARGET ds_backend_cuda)
    add_test(NAME test_backend_e2e_cuda COMMAND test_backend_e2e cuda)
    set_tests_properties(test_backend_e2e_cuda PROPERTIES LABELS cuda TIMEOUT 300 SKIP_RETURN_CODE 77)
endif()
