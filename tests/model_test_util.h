/* model_test_util.h — helpers the model tests share (test_model, test_gguf_model,
 * test_tiny_model): reading a reference file of float32, opening a model, greedy pick. */
#ifndef DS_MODEL_TEST_UTIL_H
#define DS_MODEL_TEST_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "ds_model.h"

/* The whole file as float32 little-endian values (caller frees); *count values. */
static inline float *test_read_f32_file(const char *path, size_t *count)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        fail_msg("cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    float *v = malloc((size_t)sz + 1);
    assert_non_null(v);
    assert_int_equal(fread(v, 1, (size_t)sz, f), (size_t)sz);
    fclose(f);
    *count = (size_t)sz / 4;
    return v;
}

/* ds_model_open of path (a checkpoint directory or a .gguf), failing the test with the error. */
static inline ds_model *test_open_model_path(const char *path)
{
    ds_model *m = NULL;
    ds_error err = {0};
    if (ds_model_open(path, NULL, &m, &err) < 0)
        fail_msg("open %s: %s", path, ds_error_str(&err));
    return m;
}

/* Greedy choice: the highest value, lowest index on ties. */
static inline int32_t test_argmax(const float *v, uint32_t n)
{
    int32_t b = 0;
    for (uint32_t i = 1; i < n; i++)
        if (v[i] > v[b])
            b = (int32_t)i;
    return b;
}

#endif
