# model/ and experts/: the engine (see docs/engine.md).
ds_add_test(NAME test_model SOURCES test_model.c LIBS ds_experts ds_model LABELS unit TIMEOUT 300)
target_compile_definitions(test_model PRIVATE _GNU_SOURCE)
add_dependencies(test_model dsctl) # test_dsctl_generate runs the real command
ds_add_fuzz(NAME fuzz_safetensors SOURCES fuzz_safetensors.c LIBS ds_model
            CORPUS ${CMAKE_CURRENT_SOURCE_DIR}/corpus/safetensors ITERATIONS 200000)
ds_add_fuzz(NAME fuzz_config SOURCES fuzz_config.c LIBS ds_model
            CORPUS ${CMAKE_CURRENT_SOURCE_DIR}/corpus/config ITERATIONS 100000)
