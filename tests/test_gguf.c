/* test_gguf.c — the GGUF reader and the reference dequantisers.
 *
 * tests/data/gguf (written by tools/gen_gguf_ref.py with PyPI gguf-py): metadata of every value
 * type, tensor infos, and ds_quant_dequant_row against gguf-py's numpy dequantisation bit for
 * bit (memcmp of the float32s) for every type the C code handles; files quantised by llama.cpp's
 * llama-quantize against hashes of numpy's dequantisation; a split set written by GGUFWriter. Then
 * hostile files built here from a valid one — truncated at every length, absurd counts and lengths,
 * overlapping, misaligned or out-of-range tensors, unknown types, rows that are not whole blocks,
 * duplicates, other versions, bad alignment, broken split sets — each of which must give the
 * expected negative errno and a message naming the thing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ds_gguf.h"
#include "ds_quant.h"

#define GG DS_TEST_DATA "/gguf/"

/* ---- expectations ---- */

/* Fails the test (with the message) unless rc == code and err names want. */
static void expect_err(int rc, const ds_error *err, int code, const char *want)
{
    if (rc != code || !strstr(err->msg, want)) {
        print_error("expected %d naming '%s', got %d: %s\n", code, want, rc, err->msg);
        fail();
    }
}

static void open_buf_fails(const void *buf, size_t len, int code, const char *want)
{
    ds_gguf *g = NULL;
    ds_error err = {0};
    int rc = ds_gguf_open_buffer(buf, len, "hostile.gguf", &g, &err);
    assert_null(g);
    expect_err(rc, &err, code, want);
    assert_non_null(strstr(err.msg, "hostile.gguf"));
}

/* ---- the committed files ---- */

static ds_gguf *open_ok(const char *path)
{
    ds_gguf *g = NULL;
    ds_error err = {0};
    int rc = ds_gguf_open_file(path, &g, &err);
    if (rc != 0)
        print_error("%s: %s\n", path, err.msg);
    assert_int_equal(rc, 0);
    return g;
}

static void test_metadata(void **state)
{
    ds_gguf *g = open_ok(GG "quants.gguf");
    ds_error err = {0};
    assert_int_equal(ds_gguf_version(g), 3);
    assert_int_equal(ds_gguf_alignment(g), 32);
    assert_int_equal(ds_gguf_kv_count(g), 19);
    assert_string_equal(ds_gguf_kv_key(ds_gguf_kv_at(g, 0)), "general.architecture");

    ds_gguf_str s;
    assert_int_equal(ds_gguf_get_str(g, "general.architecture", &s, &err), 0);
    assert_int_equal(s.len, 4);
    assert_memory_equal(s.ptr, "test", 4);
    assert_int_equal(ds_gguf_get_str(g, "test.string", &s, &err), 0);
    assert_int_equal(s.len, strlen("h\xc3\xa9llo w\xc3\xb6rld"));
    assert_memory_equal(s.ptr, "h\xc3\xa9llo w\xc3\xb6rld", s.len);

    uint32_t u32;
    uint64_t u64;
    int32_t i32;
    int64_t i64;
    float f;
    bool b;
    assert_int_equal(ds_gguf_get_u32(g, "test.u8", &u32, &err), 0);
    assert_int_equal(u32, 200);
    assert_int_equal(ds_gguf_get_i32(g, "test.i8", &i32, &err), 0);
    assert_int_equal(i32, -100);
    assert_int_equal(ds_gguf_get_u32(g, "test.u16", &u32, &err), 0);
    assert_int_equal(u32, 60000);
    assert_int_equal(ds_gguf_get_i32(g, "test.i16", &i32, &err), 0);
    assert_int_equal(i32, -30000);
    assert_int_equal(ds_gguf_get_u32(g, "test.u32", &u32, &err), 0);
    assert_int_equal(u32, 4000000000u);
    assert_int_equal(ds_gguf_get_i32(g, "test.i32", &i32, &err), 0);
    assert_int_equal(i32, -2000000000);
    assert_int_equal(ds_gguf_get_f32(g, "test.f32", &f, &err), 0);
    assert_true(f == 3.140625f);
    assert_int_equal(ds_gguf_get_bool(g, "test.bool", &b, &err), 0);
    assert_true(b);
    assert_int_equal(ds_gguf_get_u64(g, "test.u64", &u64, &err), 0);
    assert_true(u64 == (1ull << 63) + 5);
    assert_int_equal(ds_gguf_kv_i64(ds_gguf_kv_find(g, "test.i64"), &i64, &err), 0);
    assert_true(i64 == -(1ll << 62));
    assert_int_equal(ds_gguf_get_f32(g, "test.f64", &f, &err), 0);
    assert_true(f == 2.5f);

    /* Type mismatches and ranges fail cleanly, outputs untouched. */
    u32 = 77;
    expect_err(ds_gguf_get_u32(g, "test.string", &u32, &err), &err, -EBADMSG,
               "'test.string' has type string, expected u32");
    assert_int_equal(u32, 77);
    expect_err(ds_gguf_get_u32(g, "test.u64", &u32, &err), &err, -ERANGE, "test.u64");
    expect_err(ds_gguf_get_u64(g, "test.i8", &u64, &err), &err, -ERANGE, "test.i8");
    expect_err(ds_gguf_get_i32(g, "test.u32", &i32, &err), &err, -ERANGE, "test.u32");
    expect_err(ds_gguf_get_f32(g, "test.u32", &f, &err), &err, -EBADMSG, "expected f32");
    expect_err(ds_gguf_get_bool(g, "test.u8", &b, &err), &err, -EBADMSG, "test.u8");
    expect_err(ds_gguf_get_str(g, "test.arr_str", &s, &err), &err, -EBADMSG,
               "'test.arr_str' is an array of string");
    expect_err(ds_gguf_get_u32(g, "no.such.key", &u32, &err), &err, -ENOENT, "'no.such.key'");
    assert_non_null(strstr(err.msg, "quants.gguf"));
    assert_null(ds_gguf_kv_find(g, "no.such.key"));

    /* Arrays. */
    const ds_gguf_kv *kv;
    uint64_t n;
    assert_int_equal(ds_gguf_get_array(g, "test.arr_i32", &kv, &n, &err), 0);
    assert_int_equal(n, 3);
    assert_int_equal(ds_gguf_kv_elem_type(kv), DS_GGUF_INT32);
    const int64_t want_i[] = {1, -2, 3};
    for (uint64_t i = 0; i < n; i++) {
        assert_int_equal(ds_gguf_kv_array_i64(kv, i, &i64, &err), 0);
        assert_true(i64 == want_i[i]);
    }
    expect_err(ds_gguf_kv_array_i64(kv, 3, &i64, &err), &err, -ERANGE, "index 3");
    expect_err(ds_gguf_kv_array_f32(kv, 0, &f, &err), &err, -EBADMSG, "expected floats");
    assert_int_equal(ds_gguf_get_array(g, "test.arr_u8", &kv, &n, &err), 0);
    assert_int_equal(n, 4);
    assert_int_equal(ds_gguf_kv_array_i64(kv, 3, &i64, &err), 0);
    assert_int_equal(i64, 10);
    assert_int_equal(ds_gguf_get_array(g, "test.arr_f32", &kv, &n, &err), 0);
    assert_int_equal(n, 2);
    assert_int_equal(ds_gguf_kv_array_f32(kv, 1, &f, &err), 0);
    assert_true(f == -1.25f);
    assert_int_equal(ds_gguf_get_array(g, "test.arr_bool", &kv, &n, &err), 0);
    assert_int_equal(n, 3);
    assert_int_equal(ds_gguf_kv_elem_type(kv), DS_GGUF_BOOL);
    assert_int_equal(ds_gguf_get_array(g, "test.arr_str", &kv, &n, &err), 0);
    assert_int_equal(n, 3);
    assert_int_equal(ds_gguf_kv_array_str(kv, 0, &s, &err), 0);
    assert_true(s.len == 1 && s.ptr[0] == 'a');
    assert_int_equal(ds_gguf_kv_array_str(kv, 1, &s, &err), 0);
    assert_int_equal(s.len, 0);
    assert_int_equal(ds_gguf_kv_array_str(kv, 2, &s, &err), 0);
    assert_int_equal(s.len, strlen("tokens \xe2\x96\x81x"));
    assert_memory_equal(s.ptr, "tokens \xe2\x96\x81x", s.len);
    expect_err(ds_gguf_kv_array_i64(kv, 0, &i64, &err), &err, -EBADMSG, "expected integers");
    expect_err(ds_gguf_get_array(g, "test.u8", &kv, &n, &err), &err, -EBADMSG, "expected an array");
    ds_gguf_free(g);
}

static void test_tensor_infos(void **state)
{
    ds_gguf *g = open_ok(GG "quants.gguf");
    assert_int_equal(ds_gguf_tensor_count(g), 24);
    const ds_gguf_tensor *t = ds_gguf_tensor_at(g, 0);
    assert_string_equal(t->name, "q.F32");
    assert_int_equal(t->offset, 0);
    t = ds_gguf_tensor_find(g, "r.Q4_K");
    assert_non_null(t);
    assert_int_equal(t->type, DS_QUANT_Q4_K);
    assert_int_equal(t->n_dims, 2);
    assert_int_equal(t->ne[0], 1024);
    assert_int_equal(t->ne[1], 4);
    assert_int_equal(t->ne[2], 1);
    assert_int_equal(t->n_elements, 4096);
    assert_int_equal(t->nbytes, 16 * 144);
    assert_string_equal(ds_quant_type_name(t->type), "Q4_K");
    t = ds_gguf_tensor_find(g, "shape.3d");
    assert_int_equal(t->n_dims, 3);
    assert_int_equal(t->ne[0], 64);
    assert_int_equal(t->ne[1], 2);
    assert_int_equal(t->ne[2], 3);
    assert_int_equal(t->nbytes, 12 * 34);
    t = ds_gguf_tensor_find(g, "shape.1d");
    assert_int_equal(t->n_dims, 1);
    assert_int_equal(t->ne[0], 7);
    assert_int_equal(t->ne[1], 1);
    /* An IQ type is parsed and flagged, not refused: the loader names it. */
    t = ds_gguf_tensor_find(g, "unsupported.iq4_nl");
    assert_non_null(t);
    assert_int_equal(t->type, DS_QUANT_IQ4_NL);
    assert_false(ds_quant_can_dequant(t->type));
    assert_string_equal(ds_quant_type_name(t->type), "IQ4_NL");
    float y[64];
    assert_int_equal(ds_quant_dequant_row(t->type, t->data, 64, y), -ENOTSUP);
    assert_null(ds_gguf_tensor_find(g, "no.such.tensor"));
    /* Every tensor lies inside the file, aligned, in order of offset without overlap. */
    const ds_gguf_tensor *prev = NULL;
    for (size_t i = 0; i < ds_gguf_tensor_count(g); i++) {
        t = ds_gguf_tensor_at(g, i);
        assert_int_equal(t->offset % 32, 0);
        assert_true(ds_gguf_tensor_find(g, t->name) == t);
        if (prev)
            assert_true(t->offset >= prev->offset + prev->nbytes);
        prev = t;
    }
    ds_gguf_free(g);
}

/* The tentpole: for every tensor of quants.gguf that has a numpy reference, the C
 * dequantisation is the same bytes. */
static void test_dequant_bit_exact(void **state)
{
    ds_gguf *g = open_ok(GG "quants.gguf"), *ref = open_ok(GG "quants_ref.gguf");
    uint32_t covered[64] = {0};
    size_t n_checked = 0;
    for (size_t i = 0; i < ds_gguf_tensor_count(ref); i++) {
        const ds_gguf_tensor *r = ds_gguf_tensor_at(ref, i);
        const ds_gguf_tensor *t = ds_gguf_tensor_find(g, r->name);
        assert_non_null(t);
        assert_int_equal(r->type, DS_QUANT_F32);
        assert_int_equal(r->n_elements, t->n_elements);
        assert_memory_equal(r->ne, t->ne, sizeof(t->ne));
        float *y = malloc(t->n_elements * sizeof(float));
        assert_non_null(y);
        memset(y, 0xA5, t->n_elements * sizeof(float));
        /* Row by row, as a loader streams them. */
        uint64_t rows = t->n_elements / t->ne[0], row_bytes = 0;
        assert_int_equal(ds_quant_row_bytes(t->type, t->ne[0], &row_bytes), 0);
        for (uint64_t row = 0; row < rows; row++)
            assert_int_equal(ds_quant_dequant_row(t->type,
                                                  (const uint8_t *)t->data + row * row_bytes,
                                                  t->ne[0], y + row * t->ne[0]),
                             0);
        if (memcmp(y, r->data, t->n_elements * sizeof(float))) {
            for (uint64_t k = 0; k < t->n_elements; k++) {
                uint32_t a, b;
                memcpy(&a, &y[k], 4);
                memcpy(&b, (const uint8_t *)r->data + 4 * k, 4);
                if (a != b) {
                    print_error("%s (%s): value %llu is 0x%08x, numpy has 0x%08x\n", t->name,
                                ds_quant_type_name(t->type), (unsigned long long)k, a, b);
                    break;
                }
            }
            fail();
        }
        free(y);
        covered[t->type]++;
        n_checked++;
    }
    const uint32_t types[] = {DS_QUANT_F32,  DS_QUANT_F16,  DS_QUANT_BF16, DS_QUANT_Q4_0,
                              DS_QUANT_Q4_1, DS_QUANT_Q5_0, DS_QUANT_Q5_1, DS_QUANT_Q8_0,
                              DS_QUANT_Q2_K, DS_QUANT_Q3_K, DS_QUANT_Q4_K, DS_QUANT_Q5_K,
                              DS_QUANT_Q6_K};
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        assert_true(ds_quant_can_dequant(types[i]));
        if (!covered[types[i]]) {
            print_error("no reference tensor of type %s\n", ds_quant_type_name(types[i]));
            fail();
        }
    }
    assert_int_equal(n_checked, 23);
    ds_gguf_free(ref);
    ds_gguf_free(g);
}

static uint64_t fnv1a64(const void *p, size_t n)
{
    const uint8_t *b = p;
    uint64_t h = 0xCBF29CE484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001B3ull;
    return h;
}

/* Files quantised by llama.cpp's own llama-quantize (its C++ writer, its real K-quant search):
 * opened by the reader, every tensor dequantised to the FNV-1a hash of numpy's result. */
static void test_llama_quantized(void **state)
{
    FILE *f = fopen(GG "llama.fnv", "r");
    assert_non_null(f);
    char line[512], file[128], name[128], type[16], path[512], open_name[128] = "";
    unsigned long long n, hash;
    ds_gguf *g = NULL;
    ds_error err = {0};
    size_t checked = 0;
    uint32_t covered[64] = {0};
    while (fgets(line, sizeof(line), f)) {
        if (line[0] == '#')
            continue;
        assert_int_equal(sscanf(line, "%127s %127s %15s %llu %llx", file, name, type, &n, &hash),
                         5);
        if (strcmp(file, open_name)) {
            ds_gguf_free(g);
            snprintf(path, sizeof(path), GG "%s", file);
            g = open_ok(path);
            snprintf(open_name, sizeof(open_name), "%s", file);
            ds_gguf_str arch;
            uint32_t blocks;
            assert_int_equal(ds_gguf_get_str(g, "general.architecture", &arch, &err), 0);
            assert_true(arch.len == 5 && !memcmp(arch.ptr, "llama", 5));
            assert_int_equal(ds_gguf_get_u32(g, "llama.block_count", &blocks, &err), 0);
            assert_int_equal(blocks, 1);
        }
        const ds_gguf_tensor *t = ds_gguf_tensor_find(g, name);
        assert_non_null(t);
        assert_string_equal(ds_quant_type_name(t->type), type);
        assert_int_equal(t->n_elements, n);
        float *y = malloc(n * sizeof(float));
        assert_non_null(y);
        assert_int_equal(ds_quant_dequant_row(t->type, t->data, n, y), 0);
        if (fnv1a64(y, n * sizeof(float)) != hash) {
            print_error("%s: %s (%s) differs from numpy\n", file, name, type);
            fail();
        }
        free(y);
        covered[t->type]++;
        checked++;
    }
    fclose(f);
    ds_gguf_free(g);
    assert_int_equal(checked, 14);
    const uint32_t kq[] = {DS_QUANT_Q2_K, DS_QUANT_Q3_K, DS_QUANT_Q4_K, DS_QUANT_Q5_K,
                           DS_QUANT_Q6_K};
    for (size_t i = 0; i < 5; i++)
        assert_true(covered[kq[i]] > 0);
}

static void test_quant_table(void **state)
{
    static const struct {
        uint32_t type, values, bytes;
        const char *name;
    } want[] = {
        {DS_QUANT_F32, 1, 4, "F32"},
        {DS_QUANT_F16, 1, 2, "F16"},
        {DS_QUANT_BF16, 1, 2, "BF16"},
        {DS_QUANT_Q4_0, 32, 18, "Q4_0"},
        {DS_QUANT_Q4_1, 32, 20, "Q4_1"},
        {DS_QUANT_Q5_0, 32, 22, "Q5_0"},
        {DS_QUANT_Q5_1, 32, 24, "Q5_1"},
        {DS_QUANT_Q8_0, 32, 34, "Q8_0"},
        {DS_QUANT_Q2_K, 256, 84, "Q2_K"},
        {DS_QUANT_Q3_K, 256, 110, "Q3_K"},
        {DS_QUANT_Q4_K, 256, 144, "Q4_K"},
        {DS_QUANT_Q5_K, 256, 176, "Q5_K"},
        {DS_QUANT_Q6_K, 256, 210, "Q6_K"},
        {DS_QUANT_Q8_K, 256, 292, "Q8_K"},
        {DS_QUANT_IQ2_XXS, 256, 66, "IQ2_XXS"},
    };
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        assert_int_equal(ds_quant_block_values(want[i].type), want[i].values);
        assert_int_equal(ds_quant_block_bytes(want[i].type), want[i].bytes);
        assert_string_equal(ds_quant_type_name(want[i].type), want[i].name);
    }
    assert_false(ds_quant_type_known(4)); /* the removed Q4_2 */
    assert_string_equal(ds_quant_type_name(4), "unknown");
    assert_false(ds_quant_can_dequant(DS_QUANT_IQ2_XXS));
    uint64_t b;
    assert_int_equal(ds_quant_row_bytes(DS_QUANT_Q4_K, 512, &b), 0);
    assert_int_equal(b, 288);
    assert_int_equal(ds_quant_row_bytes(DS_QUANT_Q4_K, 500, &b), -EINVAL);
    assert_int_equal(ds_quant_row_bytes(4, 32, &b), -EINVAL);
    assert_int_equal(ds_quant_row_bytes(DS_QUANT_F32, UINT64_MAX, &b), -ERANGE);
    float y[32];
    uint8_t blk[34] = {0};
    assert_int_equal(ds_quant_dequant_row(DS_QUANT_Q8_0, blk, 31, y), -EINVAL);
    /* One hand-made block: Q8_0 with d = 0.5 (0x3800): q * d. */
    blk[0] = 0x00;
    blk[1] = 0x38;
    for (int j = 0; j < 32; j++)
        blk[2 + j] = (uint8_t)(int8_t)(j - 16);
    assert_int_equal(ds_quant_dequant_row(DS_QUANT_Q8_0, blk, 32, y), 0);
    for (int j = 0; j < 32; j++)
        assert_true(y[j] == 0.5f * (float)(j - 16));
}

static void test_alignment_file(void **state)
{
    ds_gguf *g = open_ok(GG "align64.gguf");
    assert_int_equal(ds_gguf_alignment(g), 64);
    assert_int_equal(ds_gguf_tensor_count(g), 4);
    for (size_t i = 0; i < ds_gguf_tensor_count(g); i++) {
        const ds_gguf_tensor *t = ds_gguf_tensor_at(g, i);
        assert_int_equal(t->offset % 64, 0);
        /* mmap is page aligned, so the data pointer has the file's alignment. */
        assert_int_equal((uintptr_t)t->data % 64, 0);
    }
    ds_gguf_free(g);
}

static void test_split_committed(void **state)
{
    ds_gguf *g = NULL;
    ds_error err = {0};
    assert_int_equal(ds_gguf_open_split(GG "split-00001-of-00003.gguf", &g, &err), 0);
    assert_int_equal(ds_gguf_file_count(g), 3);
    assert_int_equal(ds_gguf_tensor_count(g), 5);
    uint32_t bc;
    assert_int_equal(ds_gguf_get_u32(g, "test.block_count", &bc, &err), 0);
    assert_int_equal(bc, 5);
    for (int i = 0; i < 5; i++) {
        char name[8];
        snprintf(name, sizeof(name), "t%d", i);
        const ds_gguf_tensor *t = ds_gguf_tensor_find(g, name);
        assert_non_null(t);
        assert_true(t == ds_gguf_tensor_at(g, (size_t)i));
        assert_non_null(strstr(t->file, i < 2 ? "00001-of" : i < 4 ? "00002-of" : "00003-of"));
        float v;
        memcpy(&v, (const uint8_t *)t->data + 4 * 15, 4);
        assert_true(v == (float)i);
    }
    g = ds_gguf_free(g);
    /* Any part finds the set. */
    assert_int_equal(ds_gguf_open_split(GG "split-00003-of-00003.gguf", &g, &err), 0);
    assert_int_equal(ds_gguf_tensor_count(g), 5);
    g = ds_gguf_free(g);
    /* A part opened alone is just a file. */
    g = open_ok(GG "split-00002-of-00003.gguf");
    assert_int_equal(ds_gguf_tensor_count(g), 2);
    ds_gguf_free(g);
    /* A plain file is a set of one. */
    assert_int_equal(ds_gguf_open_split(GG "quants.gguf", &g, &err), 0);
    assert_int_equal(ds_gguf_file_count(g), 1);
    ds_gguf_free(g);
    assert_null(ds_gguf_free(NULL));
}

/* ---- a GGUF builder for hostile files ---- */

typedef struct gb {
    uint8_t *p;
    size_t n, cap;
} gb;

static void gb_bytes(gb *b, const void *src, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    if (n)
        memcpy(b->p + b->n, src, n);
    b->n += n;
}

static void gb_le(gb *b, uint64_t v, int n)
{
    uint8_t t[8];
    for (int i = 0; i < n; i++)
        t[i] = (uint8_t)(v >> (8 * i));
    gb_bytes(b, t, (size_t)n);
}

static void gb_str(gb *b, const char *s)
{
    gb_le(b, strlen(s), 8);
    gb_bytes(b, s, strlen(s));
}

static void kv_u32(gb *b, const char *key, uint32_t v)
{
    gb_str(b, key);
    gb_le(b, DS_GGUF_UINT32, 4);
    gb_le(b, v, 4);
}

static void kv_u16(gb *b, const char *key, uint16_t v)
{
    gb_str(b, key);
    gb_le(b, DS_GGUF_UINT16, 4);
    gb_le(b, v, 2);
}

static void kv_string(gb *b, const char *key, const char *v)
{
    gb_str(b, key);
    gb_le(b, DS_GGUF_STRING, 4);
    gb_str(b, v);
}

typedef struct tspec {
    const char *name;
    uint32_t n_dims;
    uint64_t ne[4];
    uint32_t type;
    uint64_t offset;
} tspec;

typedef struct fspec {
    uint32_t version; /* 0: 3 */
    const gb *kvs;    /* extra kv bytes */
    uint64_t n_kv;    /* entries in kvs */
    const tspec *t;
    size_t n_t;
    uint32_t alignment;    /* for the padding (0: 32); the kv is the caller's */
    uint64_t data_bytes;   /* size of the data section */
    int64_t claim_tensors; /* -1: n_t */
    int64_t claim_kv;      /* -1: n_kv */
} fspec;

/* The valid base: a Q8_0 [2 x 64] and an F32 [8], both inside 256 bytes of data. */
static const tspec base_t[] = {
    {"w.q8", 2, {64, 2}, DS_QUANT_Q8_0, 0},
    {"w.f32", 1, {8}, DS_QUANT_F32, 160},
};

static gb build(const fspec *s)
{
    gb b = {0};
    gb_le(&b, 0x46554747u, 4);
    gb_le(&b, s->version ? s->version : 3, 4);
    gb_le(&b, s->claim_tensors >= 0 ? (uint64_t)s->claim_tensors : s->n_t, 8);
    gb_le(&b, (s->claim_kv >= 0 ? (uint64_t)s->claim_kv : s->n_kv) + 1, 8);
    kv_string(&b, "general.architecture", "deepseek2");
    if (s->kvs)
        gb_bytes(&b, s->kvs->p, s->kvs->n);
    for (size_t i = 0; i < s->n_t; i++) {
        gb_str(&b, s->t[i].name);
        gb_le(&b, s->t[i].n_dims, 4);
        for (uint32_t d = 0; d < s->t[i].n_dims && d < 8; d++)
            gb_le(&b, s->t[i].ne[d < 4 ? d : 3], 8);
        gb_le(&b, s->t[i].type, 4);
        gb_le(&b, s->t[i].offset, 8);
    }
    uint32_t al = s->alignment ? s->alignment : 32;
    while (b.n % al)
        gb_le(&b, 0, 1);
    for (uint64_t i = 0; i < s->data_bytes; i++)
        gb_le(&b, (uint8_t)(i * 7 + 1), 1);
    return b;
}

static fspec base_spec(void)
{
    return (fspec){.t = base_t, .n_t = 2, .data_bytes = 192, .claim_tensors = -1, .claim_kv = -1};
}

static void spec_fails(const fspec *s, int code, const char *want)
{
    gb b = build(s);
    open_buf_fails(b.p, b.n, code, want);
    free(b.p);
}

static void test_hostile_base_and_truncation(void **state)
{
    fspec s = base_spec();
    gb b = build(&s);
    ds_gguf *g = NULL;
    ds_error err = {0};
    assert_int_equal(ds_gguf_open_buffer(b.p, b.n, "base.gguf", &g, &err), 0);
    assert_int_equal(ds_gguf_tensor_count(g), 2);
    assert_int_equal(ds_gguf_tensor_find(g, "w.f32")->nbytes, 32);
    g = ds_gguf_free(g);
    /* Version 2 has the same layout. */
    b.p[4] = 2;
    assert_int_equal(ds_gguf_open_buffer(b.p, b.n, "v2.gguf", &g, &err), 0);
    assert_int_equal(ds_gguf_version(g), 2);
    g = ds_gguf_free(g);
    b.p[4] = 3;
    /* Cut anywhere, the file is refused: every cut loses a header byte or a tensor byte. */
    for (size_t len = 0; len < b.n; len++) {
        uint8_t *copy = malloc(len + 1); /* exact size, so ASan sees any over-read */
        memcpy(copy, b.p, len);
        int rc = ds_gguf_open_buffer(copy, len, "cut.gguf", &g, &err);
        if (rc != -EBADMSG || g) {
            print_error("cut at %zu: rc %d (%s)\n", len, rc, err.msg);
            fail();
        }
        assert_non_null(strstr(err.msg, "cut.gguf"));
        free(copy);
    }
    /* A cut inside the data names the tensor. */
    open_buf_fails(b.p, b.n - 1, -EBADMSG, "tensor 'w.f32'");
    free(b.p);
}

static void test_hostile_header(void **state)
{
    fspec s = base_spec();
    gb b = build(&s);
    b.p[0] = 'X';
    open_buf_fails(b.p, b.n, -EBADMSG, "not a GGUF file");
    b.p[0] = 'G';
    b.p[4] = 1;
    open_buf_fails(b.p, b.n, -ENOTSUP, "version 1");
    b.p[4] = 4;
    open_buf_fails(b.p, b.n, -ENOTSUP, "version 4");
    b.p[4] = 0;
    b.p[7] = 3; /* what a big-endian writer puts there */
    open_buf_fails(b.p, b.n, -ENOTSUP, "big-endian");
    free(b.p);

    s.claim_tensors = 1ll << 40;
    spec_fails(&s, -ERANGE, "tensors (limit");
    s.claim_tensors = 1000; /* under the limit, but cannot fit */
    spec_fails(&s, -EBADMSG, "1000 tensor infos cannot fit");
    s.claim_tensors = -1;
    s.claim_kv = 1ll << 21;
    spec_fails(&s, -ERANGE, "metadata entries (limit");
    s.claim_kv = 500;
    spec_fails(&s, -EBADMSG, "cannot fit");
}

static void test_hostile_metadata(void **state)
{
    fspec s = base_spec();
    gb kv = {0};
    s.kvs = &kv;
    s.n_kv = 1;

    /* A string length past the end of the file. */
    gb_str(&kv, "general.name");
    gb_le(&kv, DS_GGUF_STRING, 4);
    gb_le(&kv, 1ull << 60, 8);
    spec_fails(&s, -EBADMSG, "key 'general.name': string length 1152921504606846976 runs past");
    kv.n = 0;
    gb_le(&kv, 1ull << 60, 8); /* a key length past the end */
    spec_fails(&s, -EBADMSG, "metadata entry 1 (key): string length");
    kv.n = 0;
    gb_str(&kv, "");
    gb_le(&kv, DS_GGUF_UINT8, 4);
    gb_le(&kv, 1, 1);
    spec_fails(&s, -EBADMSG, "key length 0");
    kv.n = 0;
    gb_le(&kv, 3, 8);
    gb_bytes(&kv, "a\0b", 3);
    gb_le(&kv, DS_GGUF_UINT8, 4);
    gb_le(&kv, 1, 1);
    spec_fails(&s, -EBADMSG, "key contains a NUL");
    kv.n = 0;
    char longkey[DS_GGUF_MAX_NAME + 2];
    memset(longkey, 'k', sizeof(longkey) - 1);
    longkey[sizeof(longkey) - 1] = 0;
    kv_u32(&kv, longkey, 1);
    spec_fails(&s, -ERANGE, "key length 1025");

    /* Unknown value type, nested arrays, absurd array counts. */
    kv.n = 0;
    gb_str(&kv, "x.weird");
    gb_le(&kv, 13, 4);
    gb_le(&kv, 0, 8);
    spec_fails(&s, -EBADMSG, "key 'x.weird' has unknown value type 13");
    kv.n = 0;
    gb_str(&kv, "x.nested");
    gb_le(&kv, DS_GGUF_ARRAY, 4);
    gb_le(&kv, DS_GGUF_ARRAY, 4);
    gb_le(&kv, 1, 8);
    spec_fails(&s, -ENOTSUP, "key 'x.nested' is an array of arrays");
    kv.n = 0;
    gb_str(&kv, "x.many");
    gb_le(&kv, DS_GGUF_ARRAY, 4);
    gb_le(&kv, DS_GGUF_UINT32, 4);
    gb_le(&kv, 1ull << 62, 8);
    spec_fails(&s, -EBADMSG, "key 'x.many': array of 4611686018427387904 u32 runs past");
    kv.n = 0;
    gb_str(&kv, "x.strs");
    gb_le(&kv, DS_GGUF_ARRAY, 4);
    gb_le(&kv, DS_GGUF_STRING, 4);
    gb_le(&kv, 2, 8);
    gb_str(&kv, "ok");
    gb_le(&kv, 1ull << 40, 8);
    spec_fails(&s, -EBADMSG, "key 'x.strs': string length");

    /* An empty array is fine; duplicate keys are not. */
    kv.n = 0;
    gb_str(&kv, "x.empty");
    gb_le(&kv, DS_GGUF_ARRAY, 4);
    gb_le(&kv, DS_GGUF_INT32, 4);
    gb_le(&kv, 0, 8);
    gb b = build(&s);
    ds_gguf *g = NULL;
    ds_error err = {0};
    assert_int_equal(ds_gguf_open_buffer(b.p, b.n, "empty.gguf", &g, &err), 0);
    const ds_gguf_kv *k;
    uint64_t n = 9;
    assert_int_equal(ds_gguf_get_array(g, "x.empty", &k, &n, &err), 0);
    assert_int_equal(n, 0);
    ds_gguf_free(g);
    free(b.p);
    kv.n = 0;
    kv_u32(&kv, "x.dup", 1);
    kv_u32(&kv, "x.dup", 2);
    s.n_kv = 2;
    spec_fails(&s, -EBADMSG, "key 'x.dup' appears twice");

    /* general.alignment: u32, a power of two, bounded. */
    s.n_kv = 1;
    const uint32_t bad[] = {0, 48, 3};
    for (size_t i = 0; i < 3; i++) {
        kv.n = 0;
        kv_u32(&kv, "general.alignment", bad[i]);
        spec_fails(&s, -EBADMSG, "is not a power of two");
    }
    kv.n = 0;
    kv_u32(&kv, "general.alignment", 1u << 30);
    spec_fails(&s, -ERANGE, "'general.alignment' = 1073741824 (limit");
    kv.n = 0;
    gb_str(&kv, "general.alignment");
    gb_le(&kv, DS_GGUF_UINT64, 4);
    gb_le(&kv, 64, 8);
    spec_fails(&s, -EBADMSG, "'general.alignment' has type u64, not u32");
    /* Alignment 64: the base's offset 160 is no longer aligned. */
    kv.n = 0;
    kv_u32(&kv, "general.alignment", 64);
    s.alignment = 64;
    spec_fails(&s, -EBADMSG, "tensor 'w.f32': offset 160 is not a multiple of the alignment 64");
    tspec t64[] = {base_t[0], base_t[1]};
    t64[1].offset = 192;
    s.t = t64;
    s.data_bytes = 224;
    b = build(&s);
    assert_int_equal(ds_gguf_open_buffer(b.p, b.n, "a64.gguf", &g, &err), 0);
    assert_int_equal(ds_gguf_alignment(g), 64);
    ds_gguf_free(g);
    free(b.p);
    free(kv.p);
}

static void test_hostile_tensors(void **state)
{
    fspec s = base_spec();
    tspec t[2] = {base_t[0], base_t[1]};
    s.t = t;

    t[1].offset = 96; /* inside w.q8's 136 bytes */
    spec_fails(&s, -EBADMSG, "tensors 'w.q8' and 'w.f32' overlap");
    t[1].offset = 161;
    spec_fails(&s, -EBADMSG, "tensor 'w.f32': offset 161 is not a multiple of the alignment 32");
    t[1].offset = 192; /* 32 bytes from the end of the 192-byte data section */
    spec_fails(&s, -EBADMSG, "tensor 'w.f32': 32 bytes at offset 192 run past");
    t[1].offset = 1ull << 63;
    spec_fails(&s, -EBADMSG, "tensor 'w.f32'");
    t[1] = base_t[1];

    t[1].type = 99;
    spec_fails(&s, -ENOTSUP, "tensor 'w.f32': unknown ggml type id 99");
    t[1].type = 4; /* the removed Q4_2 */
    spec_fails(&s, -ENOTSUP, "unknown ggml type id 4");
    t[1] = base_t[1];
    t[0].ne[0] = 48; /* not a whole Q8_0 block */
    spec_fails(&s, -EBADMSG, "tensor 'w.q8': ne[0] = 48 is not a multiple of Q8_0's block of 32");
    t[0] = base_t[0];
    t[0].type = DS_QUANT_Q4_K; /* 64 values are not a K-block either */
    spec_fails(&s, -EBADMSG, "of Q4_K's block of 256");
    t[0] = base_t[0];

    t[0].n_dims = 0;
    spec_fails(&s, -EBADMSG, "tensor 'w.q8': 0 dims");
    t[0].n_dims = 5;
    spec_fails(&s, -EBADMSG, "tensor 'w.q8': 5 dims");
    t[0] = base_t[0];
    t[0].ne[1] = 0;
    spec_fails(&s, -EBADMSG, "tensor 'w.q8': ne[1] is 0");
    t[0].n_dims = 4;
    t[0].ne[0] = 1ull << 32;
    t[0].ne[1] = 1ull << 32;
    t[0].ne[2] = 2;
    t[0].ne[3] = 2;
    spec_fails(&s, -ERANGE, "tensor 'w.q8': 4 dims multiply past 2^63");
    t[0] = base_t[0];
    t[0].ne[1] = 1ull << 40; /* fits in 2^63 values, far past the file */
    spec_fails(&s, -EBADMSG, "tensor 'w.q8'");
    t[0] = base_t[0];

    t[1].name = "w.q8";
    t[1].offset = 160;
    spec_fails(&s, -EBADMSG, "tensor 'w.q8' appears twice");
    t[1].name = "";
    spec_fails(&s, -EBADMSG, "tensor name length 0");

    /* An IQ type is accepted by the reader (the loader refuses it by name). */
    t[1] = base_t[1];
    t[0].type = DS_QUANT_IQ4_NL; /* 32 values in 18 bytes: 2 x 64 -> 72 bytes */
    gb b = build(&s);
    ds_gguf *g = NULL;
    ds_error err = {0};
    assert_int_equal(ds_gguf_open_buffer(b.p, b.n, "iq.gguf", &g, &err), 0);
    assert_int_equal(ds_gguf_tensor_find(g, "w.q8")->nbytes, 72);
    assert_string_equal(ds_quant_type_name(ds_gguf_tensor_find(g, "w.q8")->type), "IQ4_NL");
    ds_gguf_free(g);
    free(b.p);
}

/* ---- split sets built here ---- */

static char tmpdir[256];

static void write_file(const char *name, const gb *b)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b->p, 1, b->n, f), b->n);
    fclose(f);
}

/* Part `no` (0-based) of a set, claiming `count` parts and `total` tensors, holding one F32
 * tensor called name. */
static void write_part(const char *file, unsigned no, unsigned count, int total, const char *name)
{
    gb kv = {0};
    kv_u16(&kv, "split.no", (uint16_t)no);
    kv_u16(&kv, "split.count", (uint16_t)count);
    uint64_t n_kv = 2;
    if (total >= 0) {
        gb_str(&kv, "split.tensors.count");
        gb_le(&kv, DS_GGUF_INT32, 4);
        gb_le(&kv, (uint32_t)total, 4);
        n_kv++;
    }
    tspec t = {name, 1, {8}, DS_QUANT_F32, 0};
    fspec s = {.kvs = &kv,
               .n_kv = n_kv,
               .t = &t,
               .n_t = 1,
               .data_bytes = 32,
               .claim_tensors = -1,
               .claim_kv = -1};
    gb b = build(&s);
    write_file(file, &b);
    free(b.p);
    free(kv.p);
}

static void split_open(const char *file, int code, const char *want)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", tmpdir, file);
    ds_gguf *g = NULL;
    ds_error err = {0};
    int rc = ds_gguf_open_split(path, &g, &err);
    if (code == 0) {
        if (rc != 0)
            print_error("%s: %s\n", path, err.msg);
        assert_int_equal(rc, 0);
        assert_int_equal(ds_gguf_file_count(g), 2);
        assert_int_equal(ds_gguf_tensor_count(g), 2);
        assert_non_null(ds_gguf_tensor_find(g, "a"));
        assert_non_null(ds_gguf_tensor_find(g, "b"));
        ds_gguf_free(g);
        return;
    }
    assert_null(g);
    expect_err(rc, &err, code, want);
}

static void test_split_hostile(void **state)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/test_gguf.XXXXXX");
    assert_non_null(mkdtemp(tmpdir));
    const char *p1 = "m-00001-of-00002.gguf", *p2 = "m-00002-of-00002.gguf";

    write_part(p1, 0, 2, 2, "a");
    split_open(p1, -ENOENT, "part 2 of 2 missing");
    write_part(p2, 1, 2, -1, "b");
    split_open(p1, 0, NULL);
    split_open(p2, 0, NULL);

    write_part(p2, 1, 3, -1, "b");
    split_open(p1, -EBADMSG, "m-00002-of-00002.gguf: key 'split.count' = 3, the file name says 2");
    write_part(p2, 0, 2, -1, "b");
    split_open(p1, -EBADMSG, "m-00002-of-00002.gguf: key 'split.no' = 0, expected 1");
    write_part(p2, 1, 2, -1, "a");
    split_open(p1, -EBADMSG, "tensor 'a' appears twice (also in");
    write_part(p2, 1, 2, -1, "b");
    write_part(p1, 0, 2, 5, "a");
    split_open(p1, -EBADMSG, "'split.tensors.count' = 5, but the 2 parts hold 2");
    /* A part without split keys. */
    fspec s = base_spec();
    gb b = build(&s);
    write_file(p2, &b);
    write_part(p1, 0, 2, 2, "a");
    split_open(p1, -EBADMSG, "m-00002-of-00002.gguf: key 'split.count' missing");
    free(b.p);
    /* A first part renamed without the pattern cannot find the others. */
    write_part("renamed.gguf", 0, 2, 2, "a");
    split_open("renamed.gguf", -EBADMSG, "'split.count' = 2, but the name is not");
    split_open("m-00003-of-00002.gguf", -EINVAL, "part 3 of 2");

    const char *files[] = {p1, p2, "renamed.gguf"};
    for (size_t i = 0; i < 3; i++) {
        char path[512];
        snprintf(path, sizeof(path), "%s/%s", tmpdir, files[i]);
        unlink(path);
    }
    rmdir(tmpdir);
}

static void test_open_file_errors(void **state)
{
    ds_gguf *g = NULL;
    ds_error err = {0};
    expect_err(ds_gguf_open_file(GG "no-such-file.gguf", &g, &err), &err, -ENOENT,
               "no-such-file.gguf: cannot open");
    assert_null(g);
    expect_err(ds_gguf_open_file(GG, &g, &err), &err, -EBADMSG, "not a regular file");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_metadata),
        cmocka_unit_test(test_tensor_infos),
        cmocka_unit_test(test_dequant_bit_exact),
        cmocka_unit_test(test_llama_quantized),
        cmocka_unit_test(test_quant_table),
        cmocka_unit_test(test_alignment_file),
        cmocka_unit_test(test_split_committed),
        cmocka_unit_test(test_hostile_base_and_truncation),
        cmocka_unit_test(test_hostile_header),
        cmocka_unit_test(test_hostile_metadata),
        cmocka_unit_test(test_hostile_tensors),
        cmocka_unit_test(test_split_hostile),
        cmocka_unit_test(test_open_file_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
