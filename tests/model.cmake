# model/ and experts/: the engine (see docs/engine.md).
ds_add_test(NAME test_model SOURCES test_model.c LIBS ds_experts ds_model LABELS unit TIMEOUT 300)
target_compile_definitions(test_model PRIVATE _GNU_SOURCE)
add_dependencies(test_model dsctl) # test_dsctl_generate runs the real command
ds_add_fuzz(NAME fuzz_safetensors SOURCES fuzz_safetensors.c LIBS ds_model
            CORPUS ${CMAKE_CURRENT_SOURCE_DIR}/corpus/safetensors ITERATIONS 200000)
ds_add_fuzz(NAME fuzz_config SOURCES fuzz_config.c LIBS ds_model
            CORPUS ${CMAKE_CURRENT_SOURCE_DIR}/corpus/config ITERATIONS 100000)
# dsctl generate --experts-on SPEC (every routed expert on a compute backend) against the CPU
# engine: same tokens, byte-identical logits file. opencl (PoCL in CI) outside the sanitizer run;
# the cpu backend as a fast unit test.
ds_add_test(NAME test_model_generate SOURCES test_model_generate.c LIBS ds_devices
            ARGS opencl LABELS opencl TIMEOUT 300)
set_tests_properties(test_model_generate PROPERTIES SKIP_RETURN_CODE 77)
add_dependencies(test_model_generate dsctl)
target_compile_definitions(test_model_generate PRIVATE _GNU_SOURCE)
add_test(NAME test_model_generate_cpu COMMAND test_model_generate cpu)
set_tests_properties(test_model_generate_cpu PROPERTIES LABELS unit TIMEOUT 120)
# GGUF reader and reference dequantisers (docs/gguf.md): tests/data/gguf from tools/gen_gguf_ref.py.
ds_add_test(NAME test_gguf SOURCES test_gguf.c LIBS ds_model LABELS unit TIMEOUT 120)
target_compile_definitions(test_gguf PRIVATE _GNU_SOURCE)
ds_add_fuzz(NAME fuzz_gguf SOURCES fuzz_gguf.c LIBS ds_model
            CORPUS ${CMAKE_CURRENT_SOURCE_DIR}/corpus/gguf ITERATIONS 200000)
# GGUF models through the engine against llama.cpp's tokens and logits (tests/data/gguf_ref from
# tools/gen_gguf_model_ref.sh) and against the HF checkpoint a GGUF was converted from.
ds_add_test(NAME test_gguf_model SOURCES test_gguf_model.c LIBS ds_experts ds_model LABELS unit
            TIMEOUT 300)
target_compile_definitions(test_gguf_model PRIVATE _GNU_SOURCE)
add_dependencies(test_gguf_model dsctl) # test_dsctl_text runs the real command
# The integer kernels of the block types (model/qdot.c) against the reference dequantiser,
# the activation rounding rule and the batch/thread/ISA invariance.
ds_add_test(NAME test_qdot SOURCES test_qdot.c LIBS ds_model LABELS unit TIMEOUT 120)
# Each unit's real bytes from a model file's tensor table (placement's inventory, dsctl plan)
# against tests/data/unit_bytes/*.txt from tools/gen_unit_bytes.py (gguf-py, safetensors headers).
ds_add_test(NAME test_model_bytes SOURCES test_model_bytes.c LIBS ds_model ds_placement
            PkgConfig::JANSSON LABELS unit TIMEOUT 120)
add_dependencies(test_model_bytes dsctl) # test_dsctl_plan_gguf runs the real command
# A GGUF opened for some units reads only theirs; the subset GGUF the daemon streams opens with
# the same loader and computes them bit for bit (docs/daemon.md, weight streaming).
ds_add_test(NAME test_gguf_subset SOURCES test_gguf_subset.c LIBS ds_model LABELS unit
            TIMEOUT 120)
# --quantize q8_0|q4_k: Q8_0 bit-exact to gguf-py (tests/data/quant from tools/gen_quant_ref.py),
# the Q4_K fit's error bound on every value, and dsctl generate --local --quantize on models/tiny.
ds_add_test(NAME test_quantize SOURCES test_quantize.c LIBS ds_model LABELS unit TIMEOUT 120)
add_dependencies(test_quantize dsctl)
