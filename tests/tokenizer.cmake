# model/tokenizer.c (docs/tokenizer.md) and the shipped tiny model (docs/tiny-model.md).
ds_add_test(NAME test_tokenizer SOURCES test_tokenizer.c LIBS ds_model LABELS unit TIMEOUT 300)
ds_add_fuzz(NAME fuzz_tokenizer SOURCES fuzz_tokenizer.c LIBS ds_model
            CORPUS ${CMAKE_CURRENT_SOURCE_DIR}/corpus/tokenizer ITERATIONS 60000)
target_compile_definitions(fuzz_tokenizer PRIVATE DS_TEST_DATA="${DS_TEST_DATA}")
if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/test_tiny_model.c)
    ds_add_test(NAME test_tiny_model SOURCES test_tiny_model.c LIBS ds_experts ds_model
                LABELS unit TIMEOUT 300)
endif()
