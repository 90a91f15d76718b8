/* test_guard.c — the limits of daemon/dsd_guard.c on their own: hello profiles that cannot be
 * true are refused with the field named (negative, NaN, infinite, absurd), real ones pass;
 * node names; the rows a micro-batch may carry under max_frame_bytes; a step's new sequences
 * counted without creating any, and removed again after a failed step; the checkpoint digest
 * (same bytes agree, other weights or a truncated file do not). The live-daemon side
 * (oversized frames, floods, bogus hellos, a failed replan) is tests/cluster/test_guard.sh. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "dsd.h"

static Dsd__Device g_dev;
static Dsd__Device *g_devs[2];
static Dsd__Hello g_h;

static void hello_reset(void)
{
    dsd__device__init(&g_dev);
    g_dev.name = "cpu0";
    g_dev.kind = "cpu";
    g_dev.klass = "server";
    g_dev.memory_bytes = 64ull << 30;
    g_dev.mem_bw_bytes_per_s = 2e11;
    g_dev.flops = 3e12;
    dsd__hello__init(&g_h);
    g_h.node = "w1";
    g_h.data_endpoint = "tcp://10.0.0.2:7102";
    g_devs[0] = &g_dev;
    g_h.n_devices = 1;
    g_h.devices = g_devs;
}

static void expect_refused(const char *field)
{
    ds_error err = {0};
    assert_int_equal(dsd_guard_hello(&g_h, &err), -EINVAL);
    if (!strstr(ds_error_str(&err), field))
        fail_msg("'%s' does not name %s", ds_error_str(&err), field);
}

static void test_hello_profiles(void **state)
{
    (void)state;
    ds_error err = {0};
    hello_reset();
    assert_int_equal(dsd_guard_hello(&g_h, &err), 0);
    g_dev.flops = 0; /* 0 = unknown: allowed */
    g_dev.mem_bw_bytes_per_s = 0;
    assert_int_equal(dsd_guard_hello(&g_h, &err), 0);
    const double bad[] = {-1, NAN, INFINITY, -INFINITY, 1e300};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        hello_reset();
        g_dev.flops = bad[i];
        expect_refused("flops");
        hello_reset();
        g_dev.mem_bw_bytes_per_s = bad[i];
        expect_refused("mem_bw_bytes_per_s");
        hello_reset();
        g_dev.host_link_bytes_per_s = bad[i];
        expect_refused("host_link_bytes_per_s");
        hello_reset();
        g_dev.launch_s = bad[i];
        expect_refused("launch_s");
    }
    hello_reset();
    g_dev.memory_bytes = UINT64_MAX;
    expect_refused("memory_bytes");
    hello_reset();
    g_devs[1] = &g_dev; /* the same device twice */
    g_h.n_devices = 2;
    expect_refused("twice");
    hello_reset();
    g_h.n_devices = DSD_GUARD_MAX_DEVICES + 1;
    expect_refused("devices");
    hello_reset();
    g_dev.name = "";
    expect_refused("name");
    hello_reset();
    g_h.data_endpoint = "";
    expect_refused("endpoint");
}

static void test_node_names(void **state)
{
    (void)state;
    assert_true(dsd_guard_node_name_ok("w1"));
    assert_true(dsd_guard_node_name_ok("edge-1.rack_2"));
    assert_false(dsd_guard_node_name_ok(""));
    assert_false(dsd_guard_node_name_ok(NULL));
    assert_false(dsd_guard_node_name_ok("w 1"));
    assert_false(dsd_guard_node_name_ok("w1/../x"));
    char longname[80];
    memset(longname, 'a', sizeof(longname) - 1);
    longname[sizeof(longname) - 1] = 0;
    assert_false(dsd_guard_node_name_ok(longname)); /* would be cut to 63 and collide */
    longname[DSD_NODE_NAME_MAX - 1] = 0;
    assert_true(dsd_guard_node_name_ok(longname));
}

static void test_rows_per_frame(void **state)
{
    (void)state;
    ds_model_config c = {0};
    c.hidden_size = 7168;
    c.num_experts_per_tok = 8;
    /* 256 MiB / (7168 * 4 * 8) = 1170 rows: their combine reply is the largest frame */
    assert_int_equal(dsd_guard_rows_per_frame(&c, 256ll << 20), 1170);
    assert_true((uint64_t)1170 * 7168 * 4 * 8 <= (256ull << 20));
    assert_true((uint64_t)1171 * 7168 * 4 * 8 > (256ull << 20));
    c.hidden_size = 4;
    c.num_experts_per_tok = 1;
    assert_int_equal(dsd_guard_rows_per_frame(&c, 1ll << 30), DSD_MAX_ROWS);
    c.hidden_size = 1 << 20;
    assert_int_equal(dsd_guard_rows_per_frame(&c, 1 << 20), 1); /* never 0 */
}

static void test_step_seqs(void **state)
{
    (void)state;
    ds_model *m = NULL;
    ds_error err = {0};
    assert_int_equal(ds_model_open(DS_TEST_DATA "/../../models/tiny", NULL, &m, &err), 0);
    ds_seqs *t = NULL;
    assert_int_equal(ds_seqs_new(ds_model_get_config(m), NULL, 16, 8, &t), 0);
    assert_true(ds_seqs_find(t, 100, true) >= 0);
    uint64_t ids[] = {100, 100, 7, 8, 8, 9};
    uint32_t pos[] = {1, 2, 0, 0, 1, 0};
    /* 7, 8, 9 are new; 100 exists */
    assert_int_equal(dsd_guard_step_seqs(t, 6, ids, 3, &err), 3);
    assert_int_equal(dsd_guard_step_seqs(t, 6, ids, 2, &err), -ENOSPC);
    assert_non_null(strstr(ds_error_str(&err), "new sequences"));
    assert_int_equal(ds_seqs_find(t, 7, false), -ENOENT); /* counting created nothing */
    for (size_t i = 0; i < 6; i++)
        assert_true(ds_seqs_find(t, ids[i], true) >= 0);
    dsd_guard_step_rollback(t, 6, ids, pos);
    assert_true(ds_seqs_find(t, 100, false) >= 0); /* it started before this step */
    assert_int_equal(ds_seqs_find(t, 7, false), -ENOENT);
    assert_int_equal(ds_seqs_find(t, 8, false), -ENOENT);
    assert_int_equal(ds_seqs_find(t, 9, false), -ENOENT);
    ds_seqs_free(t);
    ds_model_free(m);
}

/* A copy digests the same; a changed byte of the data region (same shapes) or a truncated
 * file does not; a missing path is -ENOENT. */
static void test_digest(void **state)
{
    (void)state;
    ds_error err = {0};
    char a[DSD_DIGEST_LEN], b[DSD_DIGEST_LEN];
    const char *src = DS_TEST_DATA "/../../models/tiny/model.safetensors";
    assert_int_equal(dsd_digest_model(src, a, sizeof(a), &err), 0);
    assert_int_equal(strncmp(a, "fnv2x64:", 8), 0);
    assert_int_equal(strlen(a), 8 + 32);
    FILE *f = fopen(src, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    rewind(f);
    unsigned char *buf = malloc((size_t)size);
    assert_int_equal(fread(buf, 1, (size_t)size, f), (size_t)size);
    fclose(f);
    char path[] = "/tmp/dsd-digest-XXXXXX.safetensors";
    int fd = mkstemps(path, 12);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, buf, (size_t)size), size);
    assert_int_equal(dsd_digest_model(path, b, sizeof(b), &err), 0);
    assert_string_equal(a, b); /* same bytes, same digest (the name is the same too) */
    /* flip every 4th byte of the data region: the header (shapes) stays */
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | buf[i];
    for (long i = (long)(8 + hlen) + 1; i < size; i += 4)
        buf[i] ^= 1;
    assert_int_equal(pwrite(fd, buf, (size_t)size, 0), size);
    assert_int_equal(dsd_digest_model(path, b, sizeof(b), &err), 0);
    assert_string_not_equal(a, b);
    assert_int_equal(ftruncate(fd, size / 2), 0);
    assert_int_equal(dsd_digest_model(path, b, sizeof(b), &err), -EBADMSG);
    assert_non_null(strstr(ds_error_str(&err), "truncated"));
    close(fd);
    unlink(path);
    free(buf);
    assert_true(dsd_digest_model("/nonexistent/model", b, sizeof(b), &err) == -ENOENT);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hello_profiles), cmocka_unit_test(test_node_names),
        cmocka_unit_test(test_rows_per_frame), cmocka_unit_test(test_step_seqs),
        cmocka_unit_test(test_digest),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
