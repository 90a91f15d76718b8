/* test_wire.c — envelope pack/unpack and the validation at the wire's door. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "ds_wire.h"

static void test_roundtrip_hello(void **state)
{
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__Hello hello = DSD__HELLO__INIT;
    hello.node = "edge-1";
    hello.data_endpoint = "tcp://127.0.0.1:7001";
    env.body_case = DSD__ENVELOPE__BODY_HELLO;
    env.hello = &hello;
    env.request_id = 42;
    uint8_t *buf;
    size_t len;
    assert_int_equal(ds_wire_pack(&env, &buf, &len), 0);
    Dsd__Envelope *out = NULL;
    ds_error err = {0};
    assert_int_equal(ds_wire_unpack(buf, len, &out, &err), 0);
    assert_int_equal(out->protocol_version, DS_PROTOCOL_VERSION);
    assert_int_equal(out->request_id, 42);
    assert_int_equal(out->body_case, DSD__ENVELOPE__BODY_HELLO);
    assert_string_equal(out->hello->node, "edge-1");
    assert_string_equal(ds_wire_body_name(out), "hello");
    ds_wire_free(out);
    free(buf);
}

static void test_wrong_version_refused(void **state)
{
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__Heartbeat hb = DSD__HEARTBEAT__INIT;
    env.body_case = DSD__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &hb;
    env.protocol_version = 99; /* packed by hand, not through ds_wire_pack */
    size_t n = dsd__envelope__get_packed_size(&env);
    uint8_t *buf = malloc(n);
    dsd__envelope__pack(&env, buf);
    Dsd__Envelope *out = (Dsd__Envelope *)1;
    ds_error err = {0};
    assert_int_equal(ds_wire_unpack(buf, n, &out, &err), -EPROTO);
    assert_null(out);
    assert_non_null(strstr(err.msg, "protocol version 99"));
    free(buf);
}

static void test_garbage_and_oversize_refused(void **state)
{
    uint8_t junk[] = {0xff, 0xff, 0xff, 0xff, 0x0f, 0x12};
    Dsd__Envelope *out;
    ds_error err = {0};
    assert_int_equal(ds_wire_unpack(junk, sizeof(junk), &out, &err), -EPROTO);
    assert_int_equal(ds_wire_unpack(junk, DS_WIRE_MAX_ENVELOPE_BYTES + 1u, &out, &err),
                     -EMSGSIZE);
}

static void test_tensor_descriptor_limits(void **state)
{
    uint32_t shape_ok[] = {4, 7168};
    uint32_t shape_big[] = {65536, 65536};
    Dsd__TensorDesc td = DSD__TENSOR_DESC__INIT;
    td.dtype = DSD__DTYPE__DTYPE_BF16;
    td.n_shape = 2;
    td.shape = shape_ok;
    assert_int_equal(ds_wire_tensor_bytes(&td), 4 * 7168 * 2);
    td.shape = shape_big;
    assert_int_equal(ds_wire_tensor_bytes(&td), -EPROTO);
    td.dtype = 77;
    td.shape = shape_ok;
    assert_int_equal(ds_wire_tensor_bytes(&td), -EPROTO);

    /* an envelope announcing 2 frames with 1 descriptor is refused */
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__StepHeader step = DSD__STEP_HEADER__INIT;
    Dsd__TensorDesc *tds[1] = {&td};
    td.dtype = DSD__DTYPE__DTYPE_F32;
    env.body_case = DSD__ENVELOPE__BODY_STEP;
    env.step = &step;
    env.n_tensor_frames = 2;
    env.n_tensors = 1;
    env.tensors = tds;
    uint8_t *buf;
    size_t len;
    assert_int_equal(ds_wire_pack(&env, &buf, &len), 0);
    Dsd__Envelope *out;
    ds_error err = {0};
    assert_int_equal(ds_wire_unpack(buf, len, &out, &err), -EPROTO);
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_hello),
        cmocka_unit_test(test_wrong_version_refused),
        cmocka_unit_test(test_garbage_and_oversize_refused),
        cmocka_unit_test(test_tensor_descriptor_limits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
