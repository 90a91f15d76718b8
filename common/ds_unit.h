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

/* What each unit of one model FILE weighs, layer by layer, counted from the file's tensor table
 * (model/ds_model.h: ds_model_unit_bytes): the bytes a host holds in memory and streams per
 * token. A GGUF mixes types per tensor (a Q4_K_M file has Q4_K, Q6_K, F32 ...), so layers
 * differ; the placement inventory takes these figures instead of its config-derived ones.
 * Arrays are [n_layers], malloc'd; free with ds_unit_bytes_release. */
typedef struct ds_unit_bytes {
    uint32_t n_layers;
    uint64_t embed;   /* token embeddings */
    uint64_t head;    /* final norm + lm_head (the embeddings again when tied) */
    uint64_t *attn;   /* [n_layers] attn[l]: the two layer norms, MLA, its norms */
    uint64_t *router; /* [n_layers] router gate (+ correction bias), hosted with attn[l]; 0 on
                       * dense layers */
    uint64_t *dense;  /* [n_layers] dense FFN; 0 on MoE layers */
    uint64_t *shared; /* [n_layers] shared experts; 0 on dense layers or without them */
    uint64_t *expert; /* [n_layers] one routed expert (the largest of the layer's); 0 on dense
                       * layers */
} ds_unit_bytes;

/* Allocates the arrays for n_layers layers (zeroed). -ENOMEM (nothing kept) or 0. */
int ds_unit_bytes_init(ds_unit_bytes *b, uint32_t n_layers);
void ds_unit_bytes_release(ds_unit_bytes *b);
/* Sum over every unit (each routed expert counted n_experts times). */
uint64_t ds_unit_bytes_total(const ds_unit_bytes *b, uint32_t n_experts);

#define DS_UNIT_NAME_MAX 32 /* bytes of the longest name ("expert[4294967295][4294967295]") */

/* Parses a canonical unit name. *layer and *expert are 0 where the kind has none. Returns 0,
 * or -EINVAL for anything that is not exactly a canonical name (outputs then undefined). */
int ds_unit_parse(const char *s, enum ds_unit_kind *kind, uint32_t *layer, uint32_t *expert);
/* Writes the canonical name of a unit into buf (n bytes, at least DS_UNIT_NAME_MAX to never
 * truncate). Returns the length written, or -EINVAL for an unknown kind. */
int ds_unit_format(char *buf, size_t n, enum ds_unit_kind kind, uint32_t layer, uint32_t expert);

#endif
