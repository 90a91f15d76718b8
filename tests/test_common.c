/* test_common.c — error record, log level parsing, arena. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "ds_arena.h"
#include "ds_cleanup.h"
#include "ds_err.h"
#include "ds_hash.h"
#include "ds_log.h"
#include "ds_unit.h"

static void test_error_set_and_prefix(void **state)
{
    ds_error e = {0};
    assert_int_equal(ds_error_set(&e, -EBADMSG, "tensor %s: %d bytes", "w", 12), -EBADMSG);
    assert_int_equal(e.code, -EBADMSG);
    ds_error_prefix(&e, "%s", "model.safetensors");
    assert_string_equal(ds_error_str(&e), "model.safetensors: tensor w: 12 bytes");
    ds_error_clear(&e);
    assert_int_equal(e.code, 0);
    e.code = -ENOENT; /* no message: falls back to strerror */
    assert_string_equal(ds_error_str(&e), strerror(ENOENT));
    assert_int_equal(ds_error_set(NULL, -EINVAL, "x"), -EINVAL);
}

static void test_log_level_parse(void **state)
{
    enum ds_log_level l;
    assert_int_equal(ds_log_level_parse("debug", &l), 0);
    assert_int_equal(l, DS_LOG_DEBUG);
    assert_int_equal(ds_log_level_parse("4", &l), 0);
    assert_int_equal(l, DS_LOG_WARNING);
    assert_int_equal(ds_log_level_parse("loud", &l), -EINVAL);
    assert_int_equal(ds_log_level_parse(NULL, &l), -EINVAL);
}

static void test_arena_alignment_zero_and_limit(void **state)
{
    ds_arena *a = ds_arena_new(4096, 10000);
    assert_non_null(a);
    unsigned char *p = ds_arena_alloc(a, 3);
    unsigned char *q = ds_arena_alloc(a, 5000);
    assert_non_null(p);
    assert_non_null(q);
    assert_int_equal((uintptr_t)p % 16, 0);
    assert_int_equal((uintptr_t)q % 16, 0);
    for (int i = 0; i < 5000; i++)
        assert_int_equal(q[i], 0);
    assert_int_equal(ds_arena_used(a), 16 + 5008);
    assert_null(ds_arena_alloc(a, 6000)); /* would pass the 10000-byte limit */
    assert_null(ds_arena_alloc(a, SIZE_MAX));
    char *s = ds_arena_strdup(a, "node-a");
    assert_string_equal(s, "node-a");
    assert_null(ds_arena_free(a));
    assert_null(ds_arena_free(NULL));
}

static void test_take_ptr(void **state)
{
    _cleanup_free_ char *s = strdup("x");
    char *t = DS_TAKE_PTR(s);
    assert_null(s);
    assert_string_equal(t, "x");
    free(t);
}

/* The published FNV-1a 64 test vectors (Fowler/Noll/Vo reference code), and chaining. */
static void test_hash_fnv1a_vectors(void **state)
{
    (void)state;
    assert_true(ds_hash_fnv1a(DS_HASH_FNV1A_INIT, "", 0) == 0xcbf29ce484222325ull);
    assert_true(ds_hash_fnv1a(DS_HASH_FNV1A_INIT, "a", 1) == 0xaf63dc4c8601ec8cull);
    assert_true(ds_hash_fnv1a(DS_HASH_FNV1A_INIT, "foobar", 6) == 0x85944171f73967e8ull);
    assert_true(ds_hash_fnv1a_str(DS_HASH_FNV1A_INIT, "foobar") == 0x85944171f73967e8ull);
    uint64_t h = ds_hash_fnv1a(DS_HASH_FNV1A_INIT, "foo", 3);
    assert_true(ds_hash_fnv1a(h, "bar", 3) == 0x85944171f73967e8ull);
}

static void test_unit_parse_format(void **state)
{
    (void)state;
    enum ds_unit_kind k;
    uint32_t l, e;
    char buf[DS_UNIT_NAME_MAX];
    static const char *good[] = {"embed",    "head",           "attn[0]",
                                 "dense[2]", "shared[60]",     "expert[3][17]",
                                 "attn[10]", "expert[0][255]", "expert[4294967295][4294967295]"};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        assert_int_equal(ds_unit_parse(good[i], &k, &l, &e), 0);
        assert_int_equal(ds_unit_format(buf, sizeof(buf), k, l, e), (int)strlen(good[i]));
        assert_string_equal(buf, good[i]);
    }
    assert_int_equal(ds_unit_parse("expert[3][17]", &k, &l, &e), 0);
    assert_int_equal(k, DS_UNIT_EXPERT);
    assert_int_equal(l, 3);
    assert_int_equal(e, 17);
    assert_int_equal(ds_unit_parse("shared[5]", &k, &l, &e), 0);
    assert_int_equal(k, DS_UNIT_SHARED);
    assert_int_equal(l, 5);
    assert_int_equal(e, 0);
    static const char *bad[] = {"",
                                "embe",
                                "embedx",
                                "attn",
                                "attn[]",
                                "attn[+3]",
                                "attn[ 3]",
                                "attn[03]",
                                "attn[3]x",
                                "attn[3",
                                "expert[1]",
                                "expert[1][2][3]",
                                "attn[4294967296]",
                                "Attn[1]",
                                "head[0]",
                                "dense[-1]"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(ds_unit_parse(bad[i], &k, &l, &e), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_error_set_and_prefix),
        cmocka_unit_test(test_log_level_parse),
        cmocka_unit_test(test_arena_alignment_zero_and_limit),
        cmocka_unit_test(test_take_ptr),
        cmocka_unit_test(test_hash_fnv1a_vectors),
        cmocka_unit_test(test_unit_parse_format),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
