# bench_matvec: matrix-vector GB/s per backend (cpu, opencl, cuda) vs a copy measured in the
# same run, printed as a ratio (docs/backends.md).
add_executable(bench_matvec bench_matvec.c)
target_link_libraries(bench_matvec PRIVATE ds_devices ds_model ds_common)
if(TARGET ds_backend_cuda)
    add_dependencies(bench_matvec ds_backend_cuda)
endif()
