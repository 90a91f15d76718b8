/* ds_wire.h — one wire message = a Dsd__Envelope frame + raw tensor frames.
 *
 * ds_wire_unpack is the single door through which bytes from a peer become an envelope: it
 * enforces the size limit, the protocol version, that a body is present, that the tensor
 * descriptors match the announced frame count, and that each descriptor's shape and dtype give
 * a byte size within limits. Handlers may then trust those fields; they still check ids
 * (layers, jobs, experts) against their own state. */
#ifndef DS_WIRE_H
#define DS_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "dsd.pb-c.h"
#include "ds_err.h"

#define DS_PROTOCOL_VERSION 1u
/* Limits on what a peer can make us allocate. */
#define DS_WIRE_MAX_ENVELOPE_BYTES (16u << 20) /* a plan JSON for 671B fits well within */
#define DS_WIRE_MAX_TENSOR_FRAMES 8u
#define DS_WIRE_MAX_TENSOR_DIMS 4u
#define DS_WIRE_MAX_TENSOR_BYTES (1ull << 30)

/* Bytes per element of a wire dtype; 0 when unknown. */
size_t ds_wire_dtype_size(Dsd__Dtype dt);

/* Byte size a tensor descriptor announces; -EPROTO when the dtype is unknown, a dimension is
 * zero, there are too many dims, or the size passes DS_WIRE_MAX_TENSOR_BYTES. */
int64_t ds_wire_tensor_bytes(const Dsd__TensorDesc *td);

/* Unpacks and validates an envelope of len bytes. On success *out is owned by the caller
 * (free with ds_wire_free). On failure returns -EPROTO (or -EMSGSIZE, -ENOMEM) with err set. */
int ds_wire_unpack(const void *data, size_t len, Dsd__Envelope **out, ds_error *err);
void ds_wire_free(Dsd__Envelope *env);

/* Sets protocol_version and packs env into a malloc'd buffer; caller frees *buf. */
int ds_wire_pack(Dsd__Envelope *env, uint8_t **buf, size_t *len);

/* Name of the envelope's body ("hello", "step", ...) for logs; "none" when empty. */
const char *ds_wire_body_name(const Dsd__Envelope *env);

#endif
