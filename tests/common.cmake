# common/ and proto/
ds_add_test(NAME test_common SOURCES test_common.c LIBS ds_common LABELS unit)
ds_add_test(NAME test_wire SOURCES test_wire.c LIBS ds_proto LABELS unit)
ds_add_fuzz(NAME fuzz_wire SOURCES fuzz_wire.c LIBS ds_proto ITERATIONS 50000)
