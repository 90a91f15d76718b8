/* ds_wire.c — envelope validation; see ds_wire.h. */
#include "ds_wire.h"

#include <stdlib.h>

size_t ds_wire_dtype_size(Dsd__Dtype dt)
{
    switch (dt) {
    case DSD__DTYPE__DTYPE_F32:
    case DSD__DTYPE__DTYPE_I32:
        return 4;
    case DSD__DTYPE__DTYPE_F16:
    case DSD__DTYPE__DTYPE_BF16:
        return 2;
    case DSD__DTYPE__DTYPE_F8_E4M3:
    case DSD__DTYPE__DTYPE_U8:
        return 1;
    default:
        return 0;
    }
}

int64_t ds_wire_tensor_bytes(const Dsd__TensorDesc *td)
{
    size_t es = ds_wire_dtype_size(td->dtype);
    if (!es || td->n_shape == 0 || td->n_shape > DS_WIRE_MAX_TENSOR_DIMS)
        return -EPROTO;
    uint64_t n = es;
    for (size_t i = 0; i < td->n_shape; i++) {
        if (td->shape[i] == 0 || n > DS_WIRE_MAX_TENSOR_BYTES / td->shape[i])
            return -EPROTO;
        n *= td->shape[i];
    }
    return (int64_t)n;
}

int ds_wire_unpack(const void *data, size_t len, Dsd__Envelope **out, ds_error *err)
{
    *out = NULL;
    if (len > DS_WIRE_MAX_ENVELOPE_BYTES)
        return ds_error_set(err, -EMSGSIZE, "envelope of %zu bytes exceeds the %u byte limit",
                            len, DS_WIRE_MAX_ENVELOPE_BYTES);
    Dsd__Envelope *env = dsd__envelope__unpack(NULL, len, data);
    if (!env)
        return ds_error_set(err, -EPROTO, "envelope of %zu bytes is not a valid protobuf", len);
    int r;
    if (env->protocol_version != DS_PROTOCOL_VERSION) {
        r = ds_error_set(err, -EPROTO, "protocol version %u, this node speaks %u",
                         env->protocol_version, DS_PROTOCOL_VERSION);
        goto fail;
    }
    if (env->body_case == DSD__ENVELOPE__BODY__NOT_SET) {
        r = ds_error_set(err, -EPROTO, "envelope without a body");
        goto fail;
    }
    if (env->n_tensor_frames > DS_WIRE_MAX_TENSOR_FRAMES ||
        env->n_tensors != env->n_tensor_frames) {
        r = ds_error_set(err, -EPROTO, "envelope announces %u tensor frames with %zu descriptors",
                         env->n_tensor_frames, env->n_tensors);
        goto fail;
    }
    for (size_t i = 0; i < env->n_tensors; i++) {
        if (ds_wire_tensor_bytes(env->tensors[i]) < 0) {
            r = ds_error_set(err, -EPROTO, "tensor descriptor %zu: bad dtype or shape", i);
            goto fail;
        }
    }
    *out = env;
    return 0;
fail:
    dsd__envelope__free_unpacked(env, NULL);
    return r;
}

void ds_wire_free(Dsd__Envelope *env)
{
    if (env)
        dsd__envelope__free_unpacked(env, NULL);
}

int ds_wire_pack(Dsd__Envelope *env, uint8_t **buf, size_t *len)
{
    env->protocol_version = DS_PROTOCOL_VERSION;
    size_t n = dsd__envelope__get_packed_size(env);
    uint8_t *b = malloc(n ? n : 1);
    if (!b)
        return -ENOMEM;
    dsd__envelope__pack(env, b);
    *buf = b;
    *len = n;
    return 0;
}

const char *ds_wire_body_name(const Dsd__Envelope *env)
{
    const ProtobufCFieldDescriptor *f =
        protobuf_c_message_descriptor_get_field(&dsd__envelope__descriptor, env->body_case);
    return f ? f->name : "none";
}
