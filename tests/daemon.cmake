# daemon/ and client/ (libdsclient, dsctl cluster commands): see docs/daemon.md, docs/client.md.
ds_add_test(NAME test_daemon SOURCES test_daemon.c LIBS ds_daemon LABELS unit TIMEOUT 120)
# the scheduler alone (no sockets): its tokens against the in-process engine
# dsd_guard.c alone: hello profiles, node names, frame-sized micro-batches, a step's sequences
ds_add_test(NAME test_guard_unit SOURCES test_guard.c LIBS ds_daemon LABELS unit TIMEOUT 60)
ds_add_test(NAME test_sched SOURCES test_sched.c LIBS ds_daemon LABELS unit TIMEOUT 120)
ds_add_test(NAME test_client SOURCES test_client.c LIBS dsclient_static ds_proto ds_model LABELS unit
            TIMEOUT 180)
add_dependencies(test_client dsd dsctl)
# CURVE on the daemon side (docs/operations.md, "Securing a cluster"): real dsd processes
ds_add_test(NAME test_curve SOURCES test_curve.c LIBS dsclient_static LABELS unit TIMEOUT 180)
add_dependencies(test_curve dsd dsctl)
ds_add_test(NAME test_notify SOURCES test_notify.c LABELS unit TIMEOUT 60)
add_dependencies(test_notify dsd)
add_dependencies(test_daemon dsd)
ds_add_script_test(NAME test_cluster COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_cluster.sh
                   LABELS cluster TIMEOUT 600)
ds_add_script_test(NAME test_dsctl COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_dsctl.sh
                   LABELS cluster TIMEOUT 600)
ds_add_script_test(NAME test_systemd_verify
                   COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_systemd_verify.sh
                   LABELS unit TIMEOUT 60)
ds_add_fuzz(NAME fuzz_daemon SOURCES fuzz_daemon.c LIBS ds_daemon ITERATIONS 30000)
target_compile_definitions(fuzz_daemon PRIVATE DS_TEST_DATA="${DS_TEST_DATA}")
ds_add_script_test(NAME test_netns COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_netns.sh
                   LABELS netns TIMEOUT 300)
# client/dsctl.bash-completion against the build's dsctl --help texts.
ds_add_script_test(NAME test_completion COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_completion.sh
                   LABELS unit TIMEOUT 60)
# the .deb: contents always; a real install + purge only as root on a host without dsd
# installed (exit 77 = skipped otherwise).
ds_add_script_test(NAME test_deb_package COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_deb_package.sh
                   LABELS package TIMEOUT 600)
set_tests_properties(test_deb_package PROPERTIES SKIP_RETURN_CODE 77)
# the human table of dsctl placement (predicted vs measured) on hand-written replies
ds_add_test(NAME test_dsctl_placement
            SOURCES test_dsctl_placement.c ${PROJECT_SOURCE_DIR}/client/dsctl_placement_table.c
            LIBS PkgConfig::JANSSON LABELS unit TIMEOUT 30)
target_include_directories(test_dsctl_placement PRIVATE ${PROJECT_SOURCE_DIR}/client)
# a worker without a checkpoint copy: the coordinator streams it its units' weights
ds_add_script_test(NAME test_stream COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_stream.sh
                   LABELS cluster TIMEOUT 300)
# the cluster on a GGUF (Q4_K_M): split by memory caps, a worker without a copy gets its
# quantised units streamed; token-identical to dsctl generate --local on the file
ds_add_script_test(NAME test_gguf_cluster COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_gguf_cluster.sh
                   LABELS cluster TIMEOUT 300)
# prompts longer than max_rows_per_step fed in chunks across the cluster, token-identical
ds_add_script_test(NAME test_chunked_prefill
                   COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_chunked_prefill.sh
                   LABELS cluster TIMEOUT 300)
# a worker dies and comes back: the coordinator replans around it by itself
ds_add_script_test(NAME test_failover COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_failover.sh
                   LABELS cluster TIMEOUT 300)
# experts on a worker's OpenCL device (PoCL here), run by its host through the backend
ds_add_script_test(NAME test_accel COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_accel.sh
                   LABELS "cluster;opencl" TIMEOUT 300)
set_tests_properties(test_accel PROPERTIES SKIP_RETURN_CODE 77)
# the HTTP API's pure layers: chat templates against HF's renderings, request bodies
ds_add_test(NAME test_http SOURCES test_http.c LIBS ds_daemon LABELS unit TIMEOUT 60)
ds_add_fuzz(NAME fuzz_http SOURCES fuzz_http.c LIBS ds_daemon
            CORPUS ${CMAKE_CURRENT_SOURCE_DIR}/corpus/http ITERATIONS 100000)
# the OpenAI-compatible HTTP API with the real openai client and curl (docs/http.md); skips
# (77) when PyPI cannot be reached for the test's venv
ds_add_script_test(NAME test_http_api COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_http.sh
                   LABELS cluster TIMEOUT 600)
set_tests_properties(test_http_api PROPERTIES SKIP_RETURN_CODE 77)
# the status page rendered by headless Chromium (skips, 77, without it)
ds_add_script_test(NAME test_http_page COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_http_page.sh
                   LABELS cluster TIMEOUT 300)
set_tests_properties(test_http_page PROPERTIES SKIP_RETURN_CODE 77)
# attention + KV cache + router + dense/shared FFN + embed + head on the coordinator's OpenCL
# device (PoCL here), routed experts on two workers' CPUs, pinned with plan_pin
ds_add_script_test(NAME test_attn_device COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_attn_device.sh
                   LABELS "cluster;opencl" TIMEOUT 300)
set_tests_properties(test_attn_device PROPERTIES SKIP_RETURN_CODE 77)
# bounds on what a peer can make a node hold or believe: oversized frames, a sequence flood,
# impossible profiles, a replan that cannot succeed (tests/cluster/zmtp_peer.py: raw ZMTP)
ds_add_script_test(NAME test_guard COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_guard.sh
                   LABELS cluster TIMEOUT 300)
# names and identity: a duplicate node name, two daemons on one state_dir, other weights
# (model digest), a truncated checkpoint, a state_dir that cannot store streamed weights, a
# coordinator without its model
ds_add_script_test(NAME test_identity COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_identity.sh
                   LABELS cluster TIMEOUT 300)
# data-plane membership: forged and replayed rows, errors and cancels from a raw ZeroMQ peer
# (tests/cluster/zmtp_peer.py) cannot change any job's output
ds_add_script_test(NAME test_inject COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_inject.sh
                   LABELS cluster TIMEOUT 300)
# chaos, bounded: kill -9 a worker, SIGSTOP one past the failure timeout, SIGSTOP the
# coordinator, lose every worker; jobs replayed token-identical or ended with a clear error
ds_add_script_test(NAME test_chaos COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_chaos.sh
                   LABELS cluster TIMEOUT 600)
