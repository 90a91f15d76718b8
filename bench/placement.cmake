# bench_placement: solver vs baselines over bench/clusters/*.json, heuristic-vs-MILP gap over
# random small clusters, plan time of V3 671B on 64 devices. Run: bench_placement <src root>.
add_executable(bench_placement bench_placement.c)
target_link_libraries(bench_placement PRIVATE ds_placement)
