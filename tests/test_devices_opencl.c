/* test_devices_opencl.c — discovery and calibration against the real OpenCL ICD (PoCL in CI).
 * Label opencl: PoCL is kept out of the sanitizer run. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "ds_devices.h"

static ds_device_list *discover(const char *config)
{
    ds_devices_options o = {.config_text = config, .no_cuda = true};
    ds_error err = {0};
    ds_device_list *l = NULL;
    assert_int_equal(ds_device_list_discover(&o, &l, &err), 0);
    return l;
}

/* The first OpenCL device, or NULL (then the test is skipped: no ICD here). */
static const ds_device_info *first_opencl(const ds_device_list *l)
{
    for (size_t i = 0; i < ds_device_list_count(l); i++)
        if (!strcmp(ds_device_list_get(l, i)->source, "opencl"))
            return ds_device_list_get(l, i);
    return NULL;
}

static void test_discover_and_share(void **state)
{
    (void)state;
    ds_device_list *l = discover(NULL);
    const ds_device_info *d = first_opencl(l);
    if (!d) {
        ds_device_list_free(l);
        skip();
    }
    assert_string_equal(d->name, "opencl0");
    assert_string_equal(d->backend_spec, "opencl:0");
    assert_true(d->compute_units > 0);
    assert_true(d->memory_bytes > 0);
    assert_true(d->max_alloc_bytes > 0 && d->max_alloc_bytes <= d->memory_bytes);
    if (d->kind == DS_DEVICE_KIND_CPU) { /* PoCL: the same cores as cpu0 */
        assert_string_equal(d->shares_silicon_with, "cpu0");
        assert_true(d->unified_memory);
    }
    ds_device_list_free(l);

    /* Configuration can refuse CPU-type OpenCL devices: listed, excluded, not in the spec. */
    l = discover("opencl.cpu_device = false\n");
    d = first_opencl(l);
    if (d->kind == DS_DEVICE_KIND_CPU) {
        assert_true(d->excluded);
        char *s = NULL;
        assert_int_equal(ds_device_list_spec_json(l, &s, NULL), 0);
        assert_null(strstr(s, "\"opencl0\""));
        free(s);
    }
    ds_device_list_free(l);

    /* Excluding the CPU that PoCL shares: opencl0 stays, with no partner left in the spec
     * (a cluster spec naming an absent partner is refused by the planner). */
    l = discover("device.cpu0.exclude = true\n");
    d = first_opencl(l);
    if (d->kind == DS_DEVICE_KIND_CPU) {
        char *s = NULL;
        assert_int_equal(ds_device_list_spec_json(l, &s, NULL), 0);
        json_t *j = json_loads(s, 0, NULL);
        assert_non_null(j);
        json_t *devs = json_object_get(j, "devices"); /* the spec node object */
        assert_int_equal(json_array_size(devs), 1);
        json_t *o = json_array_get(devs, 0);
        assert_string_equal(json_string_value(json_object_get(o, "name")), "opencl0");
        assert_null(json_object_get(o, "shares_silicon_with"));
        json_decref(j);
        free(s);
    }
    ds_device_list_free(l);
}

static void test_calibrate_opencl(void **state)
{
    (void)state;
    ds_device_list *l = discover("exclude = cpu\n"); /* only the OpenCL devices */
    const ds_device_info *d = first_opencl(l);
    if (!d) {
        ds_device_list_free(l);
        skip();
    }
    ds_calibrate_options o = {.matvec_bytes = 8u << 20, .repeats = 3};
    ds_error err = {0};
    int r = ds_device_list_calibrate(l, &o, &err);
    assert_true(r >= 1);
    assert_true(d->calibrated);
    assert_true(d->mem_bw.value > 0 && d->flops.value > 0);
    assert_true(d->host_link.value > 0 && d->launch.value > 0);
    assert_int_equal(d->mem_bw.repeats, 3);
    /* The spec carries the accelerator's link and launch figures. */
    char *s = NULL;
    assert_int_equal(ds_device_list_spec_json(l, &s, &err), 0);
    json_t *j = json_loads(s, 0, NULL);
    free(s);
    json_t *dev = json_array_get(json_object_get(j, "devices"), 0);
    assert_string_equal(json_string_value(json_object_get(dev, "name")), "opencl0");
    assert_true(json_real_value(json_object_get(dev, "host_link_bytes_per_s")) > 0);
    assert_true(json_real_value(json_object_get(dev, "launch_s")) > 0);
    json_decref(j);
    ds_device_list_free(l);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_discover_and_share),
        cmocka_unit_test(test_calibrate_opencl),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
