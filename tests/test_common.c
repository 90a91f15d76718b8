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
#include "ds_log.h"

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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_error_set_and_prefix),
        cmocka_unit_test(test_log_level_parse),
        cmocka_unit_test(test_arena_alignment_zero_and_limit),
        cmocka_unit_test(test_take_ptr),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
