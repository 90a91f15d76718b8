# bench_decode: engine decode tokens/s and weight-streaming GB/s against a STREAM copy.
add_executable(bench_decode bench_decode.c)
target_link_libraries(bench_decode PRIVATE ds_experts ds_model PkgConfig::JANSSON)
