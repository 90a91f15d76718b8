# bench_ops: the engine's time per op (each matmul shape, decode and prefill) against the whole
# decode step and prefill, the pool's hand-off and the read bandwidth (docs/engine.md).
add_executable(bench_ops bench_ops.c)
target_link_libraries(bench_ops PRIVATE bench_ckpt ds_experts ds_model)
