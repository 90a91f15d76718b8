# Compute backends (docs/backends.md): the OpenCL kernels embedded as a generated header, the
# CUDA plugin (a separate shared library loaded with dlopen) when nvcc is present.

# kernels/*.cl -> ds_backend_kernels.h (a byte array). Regenerated when a .cl file changes.
file(GLOB DS_BACKEND_CL CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/kernels/*.cl)
set(DS_BACKEND_KERNELS_H ${CMAKE_CURRENT_BINARY_DIR}/generated/ds_backend_kernels.h)
add_custom_command(
    OUTPUT ${DS_BACKEND_KERNELS_H}
    COMMAND ${CMAKE_COMMAND} -DOUT=${DS_BACKEND_KERNELS_H} "-DSRCS=${DS_BACKEND_CL}"
            -P ${CMAKE_CURRENT_SOURCE_DIR}/kernels/embed.cmake
    DEPENDS ${DS_BACKEND_CL} ${CMAKE_CURRENT_SOURCE_DIR}/kernels/embed.cmake
    COMMENT "Embedding OpenCL kernels")
add_custom_target(ds_backend_kernels DEPENDS ${DS_BACKEND_KERNELS_H})
add_dependencies(ds_devices ds_backend_kernels)
target_include_directories(ds_devices PRIVATE ${CMAKE_CURRENT_BINARY_DIR}/generated)
# The backends reproduce the engine's fixed accumulation order: nothing may be fused but the
# explicit fmaf calls.
set_source_files_properties(${CMAKE_CURRENT_SOURCE_DIR}/backend_cpu.c PROPERTIES
                            COMPILE_OPTIONS "-ffp-contract=off")
set_source_files_properties(${CMAKE_CURRENT_SOURCE_DIR}/backend_cpu.c
                            ${CMAKE_CURRENT_SOURCE_DIR}/backend_opencl.c
                            PROPERTIES OBJECT_DEPENDS ${DS_BACKEND_KERNELS_H})

# Where ds_backend_open looks for plugins first (a build-tree run); installed nodes use
# $DS_BACKEND_PLUGIN_DIR or the linker path.
target_compile_definitions(ds_devices PRIVATE
                           DS_BACKEND_PLUGIN_DIR="${CMAKE_CURRENT_BINARY_DIR}/cuda")

if(DS_HAVE_CUDA)
    add_subdirectory(${CMAKE_CURRENT_SOURCE_DIR}/cuda ${CMAKE_CURRENT_BINARY_DIR}/cuda)
endif()
