/* ds_unit.h — the placeable pieces of a DeepSeek-V3-family model, defined once for the model
 * loader (which binds units), the placement library (which places them) and the daemon (which
 * hosts them and names them on the wire and in plan JSON).
 *
 * A unit is a kind with a layer and an expert index where the kind has them. Its name is
 * canonical and the one spelling every module writes and accepts: "embed", "head",
 * "attn[l]", "dense[l]", "shared[l]", "expert[l][e]" (decimal, no sign, no leading zeros, no
 * spaces). */
#ifndef DS_UNIT_H
#define DS_UNIT_H

#include <stddef.h>
#include <stdint.h>

enum ds_unit_kind {
    DS_UNIT_EMBED,
    DS_UNIT_ATTN,   /* layer l: norms, MLA, router gate (+ bias), that layer's KV cache */
    DS_UNIT_DENSE,  /* layer l < first_k_dense_replace (or non-MoE layer) */
    DS_UNIT_SHARED, /* layer l: shared experts */
    DS_UNIT_EXPERT, /* layer l, expert e */
    DS_UNIT_HEAD,   /* final norm + lm_head */
};

#define DS_UNIT_NAME_MAX 32 /* bytes of the longest name ("expert[4294967295][4294967295]") */

/* Parses a canonical unit name. *layer and *expert are 0 where the kind has none. Returns 0,
 * or -EINVAL for anything that is not exactly a canonical name (outputs then undefined). */
int ds_unit_parse(const char *s, enum ds_unit_kind *kind, uint32_t *layer, uint32_t *expert);
/* Writes the canonical name of a unit into buf (n bytes, at least DS_UNIT_NAME_MAX to never
 * truncate). Returns the length written, or -EINVAL for an unknown kind. */
int ds_unit_format(char *buf, size_t n, enum ds_unit_kind kind, uint32_t layer, uint32_t expert);

#endif
