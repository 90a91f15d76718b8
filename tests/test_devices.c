/* test_devices.c — discovery, configuration and the calibration cache (docs/devices.md).
 *
 * Unit tests: no OpenCL device is touched — main() points the ICD loader at an empty vendor
 * directory first (the "missing ICD" case), so the suite is safe under ASan. Topologies come
 * from tests/data/hwloc (an XML recorded from the synthetic description "pack:2
 * numa:2(memory=4GiB) l3:1(size=16MiB) core:4 l2:1(size=1MiB) pu:2") and synthetic strings.
 * argv[1]: the tests/data/hwloc directory. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "devices_impl.h" /* ds_devices_cuda_calibrate */
#include "ds_devices.h"

static char xml_2p4n[4096];
static char empty_dir[64];

static ds_device_list *discover(const char *xml, const char *synth, const char *config)
{
    ds_devices_options o = {
        .hwloc_xml = xml,
        .hwloc_synthetic = synth,
        .config_text = config,
        .cuda_library = "/nonexistent/libcuda.so.1",
    };
    ds_error err = {0};
    ds_device_list *l = NULL;
    int r = ds_device_list_discover(&o, &l, &err);
    if (r < 0)
        fprintf(stderr, "discover: %s\n", ds_error_str(&err));
    assert_int_equal(r, 0);
    assert_non_null(l);
    return l;
}

static void test_two_sockets_four_numa(void **state)
{
    (void)state;
    ds_device_list *l = discover(xml_2p4n, NULL, NULL);
    /* OpenCL has no ICD (empty vendors dir) and CUDA no driver: only the 4 NUMA domains. */
    assert_int_equal(ds_device_list_count(l), 4);
    static const char *const sets[] = {"0-7", "8-15", "16-23", "24-31"};
    for (size_t i = 0; i < 4; i++) {
        const ds_device_info *d = ds_device_list_get(l, i);
        char name[8];
        snprintf(name, sizeof(name), "cpu%zu", i);
        assert_string_equal(d->name, name);
        assert_int_equal(d->kind, DS_DEVICE_KIND_CPU);
        assert_int_equal(d->cores, 4);
        assert_int_equal(d->pus, 8);
        assert_int_equal(d->memory_bytes, 4ull << 30);
        assert_int_equal(d->package, i / 2);
        assert_int_equal(d->numa_node, (int)i);
        assert_int_equal(d->l3_bytes, 16ull << 20);
        assert_int_equal(d->l2_bytes, 1ull << 20);
        assert_string_equal(d->cpuset, sets[i]);
        assert_int_equal(d->isa, 0); /* not this machine: no ISA claims */
        assert_false(d->excluded);
    }
    assert_null(ds_device_list_get(l, 4));
    assert_string_equal(ds_device_list_node_class(l), "server");
    ds_device_list_free(l);
}

static void test_synthetic_no_numa_level(void **state)
{
    (void)state;
    /* hwloc adds one NUMA node covering the machine: one device with every core. */
    ds_device_list *l = discover(NULL, "pack:2 core:3 pu:2", NULL);
    assert_int_equal(ds_device_list_count(l), 1);
    assert_int_equal(ds_device_list_get(l, 0)->cores, 6);
    assert_int_equal(ds_device_list_get(l, 0)->pus, 12);
    ds_device_list_free(l);
}

static void test_no_opencl_no_cuda_is_empty(void **state)
{
    (void)state;
    /* The stub libcuda (present where the toolkit is) loads but cuInit fails: still empty. */
    const char *libs[] = {"/nonexistent/libcuda.so.1", "/usr/local/cuda/lib64/stubs/libcuda.so",
                          xml_2p4n /* not a library at all */};
    for (size_t k = 0; k < sizeof(libs) / sizeof(libs[0]); k++) {
        ds_devices_options o = {.hwloc_synthetic = "numa:1(memory=1GiB) core:2 pu:1",
                                .cuda_library = libs[k]};
        ds_error err = {0};
        ds_device_list *l = NULL;
        assert_int_equal(ds_device_list_discover(&o, &l, &err), 0);
        assert_int_equal(ds_device_list_count(l), 1);
        assert_string_equal(ds_device_list_get(l, 0)->source, "cpu");
        ds_device_list_free(l);
    }
}

static void test_cuda_calibrate_without_driver(void **state)
{
    (void)state;
    /* The driver-API fallback of calibration refuses cleanly where there is no driver. */
    ds_device_info d = {.name = "cuda0", .source = "cuda", .backend_spec = "cuda:0"};
    const char *libs[] = {"/nonexistent/libcuda.so.1", "/usr/local/cuda/lib64/stubs/libcuda.so"};
    for (size_t k = 0; k < 2; k++) {
        ds_error err = {0};
        assert_int_equal(ds_devices_cuda_calibrate(&d, libs[k], 1u << 20, 3, &err), -ENOENT);
        assert_non_null(strstr(err.msg, "cuda0"));
        assert_true(d.mem_bw.value == 0 && d.host_link.value == 0);
    }
    ds_device_info bad = {.name = "x", .source = "cuda", .backend_spec = "opencl:0"};
    assert_int_equal(ds_devices_cuda_calibrate(&bad, NULL, 1u << 20, 3, NULL), -EINVAL);
}

static void test_bad_topology(void **state)
{
    (void)state;
    ds_devices_options o = {
        .hwloc_xml = "/nonexistent/topo.xml", .no_opencl = true, .no_cuda = true};
    ds_error err = {0};
    ds_device_list *l = NULL;
    assert_true(ds_device_list_discover(&o, &l, &err) < 0);
    assert_null(l);
    assert_non_null(strstr(err.msg, "/nonexistent/topo.xml"));
}

static json_t *spec(const ds_device_list *l)
{
    char *s = NULL;
    ds_error err = {0};
    assert_int_equal(ds_device_list_spec_json(l, &s, &err), 0);
    json_t *j = json_loads(s, 0, NULL);
    free(s);
    assert_non_null(j);
    return j;
}

static void test_config_exclude_cap_class(void **state)
{
    (void)state;
    ds_device_list *l = discover(xml_2p4n, NULL,
                                 "# operator settings\n"
                                 "node.name = edge-7\n"
                                 "node.class = edge\n"
                                 "exclude = cpu1\n"
                                 "device.cpu2.memory_cap = 1GiB\n"
                                 "device.cpu0.memory_cap = 64GiB   # above what exists: no-op\n"
                                 "device.cpu3.class = gpu\n"
                                 "device.cpu3.labels = fast,numa3\n"
                                 "device.cpu9.exclude = true       # not on this node\n");
    assert_true(ds_device_list_find(l, "cpu1")->excluded);
    assert_int_equal(ds_device_list_find(l, "cpu2")->memory_bytes, 1ull << 30);
    assert_int_equal(ds_device_list_find(l, "cpu2")->memory_found_bytes, 4ull << 30);
    assert_int_equal(ds_device_list_find(l, "cpu0")->memory_bytes, 4ull << 30);
    assert_string_equal(ds_device_list_find(l, "cpu3")->class_name, "gpu");
    json_t *j = spec(l);
    assert_string_equal(json_string_value(json_object_get(j, "name")), "edge-7");
    assert_string_equal(json_string_value(json_object_get(j, "class")), "edge");
    json_t *devs = json_object_get(j, "devices");
    assert_int_equal(json_array_size(devs), 3); /* cpu1 left out */
    static const char *const names[] = {"cpu0", "cpu2", "cpu3"};
    static const uint64_t mem[] = {4ull << 30, 1ull << 30, 4ull << 30};
    for (size_t i = 0; i < 3; i++) {
        json_t *d = json_array_get(devs, i);
        assert_string_equal(json_string_value(json_object_get(d, "name")), names[i]);
        assert_string_equal(json_string_value(json_object_get(d, "kind")), "cpu");
        assert_int_equal(json_integer_value(json_object_get(d, "memory_bytes")), mem[i]);
        assert_true(json_is_number(json_object_get(d, "mem_bw_bytes_per_s")));
        assert_true(json_is_number(json_object_get(d, "flops")));
        assert_null(json_object_get(d, "shares_silicon_with"));
    }
    assert_string_equal(json_string_value(json_object_get(json_array_get(devs, 2), "class")),
                        "gpu");
    json_t *labels = json_object_get(json_array_get(devs, 2), "labels");
    assert_int_equal(json_array_size(labels), 2);
    assert_string_equal(json_string_value(json_array_get(labels, 1)), "numa3");
    json_decref(j);
    ds_device_list_free(l);

    /* Excluding a whole source by name. */
    l = discover(xml_2p4n, NULL, "exclude = cpu\n");
    for (size_t i = 0; i < ds_device_list_count(l); i++)
        assert_true(ds_device_list_get(l, i)->excluded);
    ds_device_list_free(l);
}

static void test_config_errors(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        const char *needle; /* in the message */
    } bad[] = {
        {"bogus = 1\n", ":1: unknown key"},
        {"node.class = server\ndevice.cpu0.memory_cap = lots\n", ":2:"},
        {"device.cpu0.memory_cap = 0\n", "memory_cap"},
        {"node.class = mainframe\n", "node.class"},
        {"exclude = cpu0, bad name\n", "exclude"},
        {"device..class = gpu\n", ":1:"},
        {"device.cpu0.colour = red\n", "unknown device setting"},
        {"just words\n", "key = value"},
        {"source.tpu = true\n", "unknown source"},
        {"opencl.cpu_device = maybe\n", "opencl.cpu_device"},
        {"node.name = \n", "empty"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        ds_error err = {0};
        int r = ds_devices_config_check(bad[i].text, strlen(bad[i].text), &err);
        assert_int_equal(r, -EINVAL);
        if (!strstr(err.msg, bad[i].needle))
            fail_msg("config %zu: message '%s' lacks '%s'", i, err.msg, bad[i].needle);
    }
    /* A line over the limit is refused, not truncated into something else. */
    char *longline = malloc(5000);
    memset(longline, 'a', 4999);
    longline[4999] = 0;
    ds_error err = {0};
    assert_int_equal(ds_devices_config_check(longline, 4999, &err), -ERANGE);
    free(longline);
    /* Discovery refuses a bad config with the same message. */
    ds_devices_options o = {.hwloc_xml = xml_2p4n, .config_text = "bogus = 1"};
    ds_device_list *l = NULL;
    assert_int_equal(ds_device_list_discover(&o, &l, &err), -EINVAL);
    assert_null(l);
}

static void test_parse_bytes(void **state)
{
    (void)state;
    static const struct {
        const char *s;
        uint64_t v;
    } ok[] = {
        {"123", 123},         {"8GiB", 8ull << 30}, {"8G", 8ull << 30},  {"8GB", 8000000000ull},
        {"512M", 512u << 20}, {"1.5KiB", 1536},     {"1e9", 1000000000}, {"2T", 2ull << 40},
        {"4 MiB", 4u << 20},  {"3kB", 3000},
    };
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        uint64_t v = 0;
        assert_int_equal(ds_devices_parse_bytes(ok[i].s, &v), 0);
        assert_int_equal(v, ok[i].v);
    }
    static const char *const bad[] = {"", "G", "-1", "8X", "8GiBs", "1e30", "nan"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        uint64_t v = 0;
        if (ds_devices_parse_bytes(bad[i], &v) == 0)
            fail_msg("'%s' parsed as %llu", bad[i], (unsigned long long)v);
    }
}

/* ---- calibration cache ---- */

#define SMALL  "numa:1(memory=1GiB) core:2 pu:1"
#define SMALL2 "numa:1(memory=2GiB) core:2 pu:1"

static int calibrate(ds_device_list *l, const char *dir, const char *salt, bool force)
{
    ds_calibrate_options o = {.state_dir = dir,
                              .matvec_bytes = 1u << 20,
                              .repeats = 2,
                              .fingerprint_salt = salt,
                              .force = force};
    ds_error err = {0};
    int r = ds_device_list_calibrate(l, &o, &err);
    if (r < 0)
        fprintf(stderr, "calibrate: %s\n", ds_error_str(&err));
    return r;
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_calibration_cache(void **state)
{
    (void)state;
    char dir[] = "/tmp/ds_test_devices_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[128];
    snprintf(path, sizeof(path), "%s/devices-calibration.json", dir);

    /* Miss: nothing cached, the one device is measured and the file written. */
    ds_device_list *a = discover(NULL, SMALL, NULL);
    assert_int_equal(calibrate(a, dir, NULL, false), 1);
    const ds_device_info *da = ds_device_list_get(a, 0);
    assert_true(da->calibrated);
    assert_false(da->from_cache);
    assert_true(da->mem_bw.value > 0 && da->flops.value > 0 && da->stream_copy.value > 0);
    assert_int_equal(da->mem_bw.repeats, 2);
    assert_true(da->mem_bw.spread >= 0);
    assert_int_equal(access(path, R_OK), 0);

    /* Hit: same hardware, figures are the first run's exactly (JSON keeps doubles). */
    ds_device_list *b = discover(NULL, SMALL, NULL);
    assert_int_equal(calibrate(b, dir, NULL, false), 0);
    const ds_device_info *db = ds_device_list_get(b, 0);
    assert_true(db->calibrated && db->from_cache);
    assert_true(db->mem_bw.value == da->mem_bw.value);
    assert_true(db->flops.value == da->flops.value);
    assert_true(db->stream_copy.spread == da->stream_copy.spread);
    ds_device_list_free(b);

    /* Miss on a changed hardware fingerprint (more memory) and on a changed salt. */
    b = discover(NULL, SMALL2, NULL);
    assert_string_not_equal(ds_device_list_fingerprint(a), ds_device_list_fingerprint(b));
    assert_int_equal(calibrate(b, dir, NULL, false), 1);
    assert_false(ds_device_list_get(b, 0)->from_cache);
    ds_device_list_free(b);
    b = discover(NULL, SMALL2, NULL);
    assert_int_equal(calibrate(b, dir, NULL, false), 0); /* the rewrite is for SMALL2 now */
    assert_int_equal(calibrate(b, dir, "kernels-v2", false), 1);
    ds_device_list_free(b);

    /* --calibrate forces a measurement on a hit. */
    assert_int_equal(calibrate(a, dir, NULL, false), 1); /* file holds salted SMALL2: miss */
    assert_int_equal(calibrate(a, dir, NULL, false), 0);
    assert_int_equal(calibrate(a, dir, NULL, true), 1);

    /* Corrupt files of several kinds: re-measured, then the rewritten file hits again. */
    static const char *const corrupt[] = {
        "{garbage", "", "[1,2,3]", "{\"version\": 1, \"fingerprint\": 7, \"devices\": {}}",
        NULL, /* right fingerprint, a negative bandwidth: filled below */
        NULL, /* right fingerprint, device missing */
    };
    char good_fp[64];
    {
        /* the fingerprint in the file written by the last run */
        json_t *j = json_load_file(path, 0, NULL);
        assert_non_null(j);
        snprintf(good_fp, sizeof(good_fp), "%s",
                 json_string_value(json_object_get(j, "fingerprint")));
        json_decref(j);
    }
    for (size_t i = 0; i < sizeof(corrupt) / sizeof(corrupt[0]); i++) {
        char text[512];
        if (i == 4)
            snprintf(text, sizeof(text),
                     "{\"version\": 1, \"fingerprint\": \"%s\", \"devices\": {\"cpu0\": "
                     "{\"mem_bw\": [-5, 0, 2], \"flops\": [1, 0, 2], \"stream_copy\": [1, 0, 2],"
                     " \"host_link\": [0, 0, 0], \"launch\": [0, 0, 0]}}}",
                     good_fp);
        else if (i == 5)
            snprintf(text, sizeof(text),
                     "{\"version\": 1, \"fingerprint\": \"%s\", \"devices\": {}}", good_fp);
        else
            snprintf(text, sizeof(text), "%s", corrupt[i]);
        write_text(path, text);
        ds_device_list *c = discover(NULL, SMALL, NULL);
        if (calibrate(c, dir, NULL, false) != 1)
            fail_msg("corrupt cache %zu was not re-measured", i);
        assert_true(ds_device_list_get(c, 0)->mem_bw.value > 0);
        assert_int_equal(calibrate(c, dir, NULL, false), 0);
        ds_device_list_free(c);
    }
    ds_device_list_free(a);
    unlink(path);
    rmdir(dir);
}

static void test_cache_check(void **state)
{
    (void)state;
    const char *ok = "{\"version\": 1, \"fingerprint\": \"abc\", \"devices\": {\"x\": "
                     "{\"mem_bw\": [1e10, 0.1, 5], \"flops\": [1, 0, 5], \"stream_copy\": [1, "
                     "0, 5], \"host_link\": [0, 0, 0], \"launch\": [0, 0, 0]}}}";
    assert_int_equal(ds_devices_cache_check(ok, strlen(ok), "abc", NULL), 0);
    assert_int_equal(ds_devices_cache_check(ok, strlen(ok), "abd", NULL), -ESTALE);
    const char *dup = "{\"version\": 1, \"version\": 1}";
    assert_int_equal(ds_devices_cache_check(dup, strlen(dup), "abc", NULL), -EBADMSG);
    const char *many = "{\"version\": 1, \"fingerprint\": \"abc\", \"devices\": {\"x\": "
                       "{\"mem_bw\": [1e10, 0.1, 5000], \"flops\": [1, 0, 5], \"stream_copy\": "
                       "[1, 0, 5], \"host_link\": [0, 0, 0], \"launch\": [0, 0, 0]}}}";
    assert_int_equal(ds_devices_cache_check(many, strlen(many), "abc", NULL), -EBADMSG);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_devices DATA_DIR (tests/data/hwloc)\n");
        return 2;
    }
    snprintf(xml_2p4n, sizeof(xml_2p4n), "%s/2pack4numa.xml", argv[1]);
    /* Before any OpenCL call: an ICD vendors directory with nothing in it = no OpenCL. */
    snprintf(empty_dir, sizeof(empty_dir), "/tmp/ds_no_icd_XXXXXX");
    if (!mkdtemp(empty_dir))
        return 1;
    setenv("OCL_ICD_VENDORS", empty_dir, 1);
    setenv("OPENCL_VENDOR_PATH", empty_dir, 1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_two_sockets_four_numa),
        cmocka_unit_test(test_synthetic_no_numa_level),
        cmocka_unit_test(test_no_opencl_no_cuda_is_empty),
        cmocka_unit_test(test_bad_topology),
        cmocka_unit_test(test_cuda_calibrate_without_driver),
        cmocka_unit_test(test_config_exclude_cap_class),
        cmocka_unit_test(test_config_errors),
        cmocka_unit_test(test_parse_bytes),
        cmocka_unit_test(test_calibration_cache),
        cmocka_unit_test(test_cache_check),
    };
    int r = cmocka_run_group_tests(tests, NULL, NULL);
    rmdir(empty_dir);
    return r;
}
