# Placement (docs/placement.md): inventory byte counts against hand-computed values for
# DeepSeek-V3 671B and V2-Lite (tests/data/configs), the cost model on tiny clusters, solver
# constraints, infeasible inputs, plan JSON keys.
ds_add_test(NAME test_placement SOURCES test_placement.c LIBS ds_placement PkgConfig::JANSSON
            LABELS unit TIMEOUT 120)
ds_add_fuzz(NAME fuzz_cluster_spec SOURCES fuzz_cluster_spec.c LIBS ds_placement
            CORPUS ${CMAKE_CURRENT_SOURCE_DIR}/corpus/cluster ITERATIONS 20000)
