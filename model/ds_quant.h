/* ds_quant.h — ggml tensor types: block geometry and reference dequantisers.
 *
 * The ids are ggml's (gguf-py constants.py GGMLQuantizationType); they appear as-is in GGUF
 * tensor infos. Every id ggml defines has a block geometry here, so a GGUF reader can size and
 * bound-check any tensor; only some have a dequantiser (ds_quant_can_dequant). A loader refuses
 * the others by name ("tensor X has type IQ2_XXS, not supported").
 *
 * The dequantisers are the reference, not the fast path: scalar C whose float32 results equal
 * gguf-py's numpy dequantisation (gguf/quants.py) bit for bit. That holds because each output is
 * the same sequence of IEEE float32 operations numpy performs (e.g. Q4_K: dl = d * sc,
 * ml = dmin * m, y = dl * q - ml, each rounded to float32), with F16 scales widened exactly
 * (NaN payloads kept, as numpy does). quant.c is compiled with -ffp-contract=off (model/
 * CMakeLists.txt) so the compiler cannot fuse a multiply and an add into one rounding. */
#ifndef DS_QUANT_H
#define DS_QUANT_H

#include <stdbool.h>
#include <stdint.h>

enum ds_quant_type {
    DS_QUANT_F32 = 0,
    DS_QUANT_F16 = 1,
    DS_QUANT_Q4_0 = 2,
    DS_QUANT_Q4_1 = 3,
    DS_QUANT_Q5_0 = 6,
    DS_QUANT_Q5_1 = 7,
    DS_QUANT_Q8_0 = 8,
    DS_QUANT_Q8_1 = 9,
    DS_QUANT_Q2_K = 10,
    DS_QUANT_Q3_K = 11,
    DS_QUANT_Q4_K = 12,
    DS_QUANT_Q5_K = 13,
    DS_QUANT_Q6_K = 14,
    DS_QUANT_Q8_K = 15,
    DS_QUANT_IQ2_XXS = 16,
    DS_QUANT_IQ2_XS = 17,
    DS_QUANT_IQ3_XXS = 18,
    DS_QUANT_IQ1_S = 19,
    DS_QUANT_IQ4_NL = 20,
    DS_QUANT_IQ3_S = 21,
    DS_QUANT_IQ2_S = 22,
    DS_QUANT_IQ4_XS = 23,
    DS_QUANT_I8 = 24,
    DS_QUANT_I16 = 25,
    DS_QUANT_I32 = 26,
    DS_QUANT_I64 = 27,
    DS_QUANT_F64 = 28,
    DS_QUANT_IQ1_M = 29,
    DS_QUANT_BF16 = 30,
    DS_QUANT_TQ1_0 = 34,
    DS_QUANT_TQ2_0 = 35,
    DS_QUANT_MXFP4 = 39,
    DS_QUANT_NVFP4 = 40,
    DS_QUANT_Q1_0 = 41,
};

/* Values per block (1 for the plain types, 32 or 256 for quantised ones); 0 for an id ggml
 * does not define. */
uint32_t ds_quant_block_values(uint32_t type);
/* Bytes per block; 0 for an unknown id. */
uint32_t ds_quant_block_bytes(uint32_t type);
/* True when type is an id ggml defines (the geometry above is known). */
bool ds_quant_type_known(uint32_t type);
/* True when ds_quant_dequant_row handles type. */
bool ds_quant_can_dequant(uint32_t type);
/* "Q4_K", "IQ2_XXS", ...; "unknown" for an id ggml does not define. Never NULL. */
const char *ds_quant_type_name(uint32_t type);

/* Bytes that n_values of type take: n_values / block_values * block_bytes. -EINVAL when type
 * is unknown or n_values is not a whole number of blocks, -ERANGE past UINT64_MAX. */
int ds_quant_row_bytes(uint32_t type, uint64_t n_values, uint64_t *bytes);

/* Dequantises n_values of type from src (n_values / block_values blocks, packed, any
 * alignment) into dst[n_values] as float32, bit-identical to gguf-py's numpy dequantisation.
 * 0, or -ENOTSUP for a type without a dequantiser, -EINVAL when n_values is not a whole
 * number of blocks. */
int ds_quant_dequant_row(uint32_t type, const void *src, uint64_t n_values, float *dst);

/* Quantises n_values float32 from src into type's blocks at dst (n_values / block_values
 * blocks, packed). Q8_0 exactly as ggml defines it (d = amax / 127 stored as f16, q = round(x /
 * d)): the bytes of gguf-py's numpy quantize. Q4_K by a min-max fit of our own whose every
 * dequantised value is within half its sub-block's step of x, or within the min's 6-bit rounding
 * (model/quant.c, docs/gguf.md). 0, -ENOTSUP for another type, -EINVAL when n_values is not a
 * whole number of blocks. */
int ds_quant_quantize_row(uint32_t type, const float *src, uint64_t n_values, void *dst);

#endif
