# bench_decode: engine decode tokens/s and weight-streaming GB/s against a STREAM copy.
# bench_engine: prefill and decode tokens/s and GB/s against the read bandwidth, on a checkpoint
# it writes (bench_engine write) or any other; bench_vs_llama.sh runs it beside llama.cpp.
add_library(bench_ckpt STATIC bench_ckpt.c)
target_include_directories(bench_ckpt PUBLIC ${CMAKE_CURRENT_SOURCE_DIR})
target_link_libraries(bench_ckpt PUBLIC ds_model PRIVATE PkgConfig::JANSSON)

add_executable(bench_decode bench_decode.c)
target_link_libraries(bench_decode PRIVATE bench_ckpt ds_experts ds_model)

add_executable(bench_engine bench_engine.c)
target_link_libraries(bench_engine PRIVATE bench_ckpt ds_experts ds_model)
target_compile_definitions(bench_engine PRIVATE DS_SOURCE_ROOT="${PROJECT_SOURCE_DIR}")
