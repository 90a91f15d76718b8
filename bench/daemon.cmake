# bench_cluster.sh (run it directly): cluster tokens/s vs the single-process engine and the
# per-layer routing overhead vs a raw ZeroMQ round trip (bench_cluster_rtt).
add_executable(bench_cluster_rtt bench_cluster_rtt.c)
target_link_libraries(bench_cluster_rtt PRIVATE PkgConfig::ZMQ Threads::Threads)
