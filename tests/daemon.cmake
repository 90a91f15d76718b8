# daemon/ and client/ (libdsclient, dsctl cluster commands): see docs/daemon.md, docs/client.md.
ds_add_test(NAME test_daemon SOURCES test_daemon.c LIBS ds_daemon LABELS unit TIMEOUT 120)
ds_add_test(NAME test_client SOURCES test_client.c LIBS dsclient_static ds_proto LABELS unit
            TIMEOUT 180)
add_dependencies(test_client dsd dsctl)
ds_add_test(NAME test_notify SOURCES test_notify.c LABELS unit TIMEOUT 60)
add_dependencies(test_notify dsd)
add_dependencies(test_daemon dsd)
ds_add_script_test(NAME test_cluster COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_cluster.sh
                   LABELS cluster TIMEOUT 600)
ds_add_script_test(NAME test_systemd_verify
                   COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_systemd_verify.sh
                   LABELS unit TIMEOUT 60)
ds_add_fuzz(NAME fuzz_daemon SOURCES fuzz_daemon.c LIBS ds_daemon ITERATIONS 30000)
target_compile_definitions(fuzz_daemon PRIVATE DS_TEST_DATA="${DS_TEST_DATA}")
ds_add_script_test(NAME test_netns COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cluster/test_netns.sh
                   LABELS netns TIMEOUT 300)
