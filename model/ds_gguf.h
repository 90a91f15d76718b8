/* ds_gguf.h — GGUF files (llama.cpp's model format), mapped read-only and fully validated.
 *
 * A ds_gguf is one GGUF file (v2 or v3, little-endian) or a split set (NAME-00001-of-0000N.gguf
 * ... NAME-0000N-of-0000N.gguf), mmapped. Nothing is exposed before the whole header of every
 * file has been checked: counts and lengths inside the file and below limits, known value types
 * (no nested arrays), no duplicate keys, general.alignment a bounded power of two, 1..4 dims
 * each > 0 with a product that fits, a known ggml type id, ne[0] a whole number of blocks,
 * offset aligned and the tensor's bytes inside the data section, no two tensors overlapping,
 * no duplicate tensor names (across the parts of a split set too). Errors are negative errno
 * (-EBADMSG corrupt, -ERANGE past a limit, -ENOTSUP a version, byte order or type id this
 * reader does not know, -ENOENT a missing key or part) with a message naming the file and the
 * key or tensor. See docs/gguf.md.
 *
 * A tensor of a type that has a geometry but no dequantiser here (IQ2_XXS, ...) is parsed like
 * any other: the loader decides, using ds_quant_can_dequant() and ds_quant_type_name(). */
#ifndef DS_GGUF_H
#define DS_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ds_err.h"
#include "ds_quant.h"

#define DS_GGUF_MAX_DIMS    4
#define DS_GGUF_MAX_TENSORS (1u << 20) /* per file */
#define DS_GGUF_MAX_KV      (1u << 20) /* per file */
#define DS_GGUF_MAX_NAME    1024       /* bytes of a key or tensor name */
#define DS_GGUF_MAX_ALIGN   (1u << 20) /* general.alignment */
#define DS_GGUF_MAX_SPLITS  4096

/* GGUF metadata value types (the ids in the file). */
enum ds_gguf_vtype {
    DS_GGUF_UINT8 = 0,
    DS_GGUF_INT8 = 1,
    DS_GGUF_UINT16 = 2,
    DS_GGUF_INT16 = 3,
    DS_GGUF_UINT32 = 4,
    DS_GGUF_INT32 = 5,
    DS_GGUF_FLOAT32 = 6,
    DS_GGUF_BOOL = 7,
    DS_GGUF_STRING = 8,
    DS_GGUF_ARRAY = 9,
    DS_GGUF_UINT64 = 10,
    DS_GGUF_INT64 = 11,
    DS_GGUF_FLOAT64 = 12,
};

/* A string inside the mapping: len bytes, not NUL-terminated (GGUF strings carry no NUL). */
typedef struct ds_gguf_str {
    const char *ptr;
    uint64_t len;
} ds_gguf_str;

typedef struct ds_gguf_tensor {
    const char *name;              /* NUL-terminated, owned by the ds_gguf */
    const char *file;              /* path of the file holding it (owned by the ds_gguf) */
    uint32_t type;                 /* enum ds_quant_type id; known, maybe without dequantiser */
    uint32_t n_dims;               /* 1..DS_GGUF_MAX_DIMS */
    uint64_t ne[DS_GGUF_MAX_DIMS]; /* ggml order, ne[0] innermost (columns); 1 past n_dims */
    uint64_t n_elements;           /* product of ne */
    uint64_t offset;               /* bytes from the start of its file's data section */
    const void *data;              /* inside the mapping, nbytes long; aligned to the file's
                                    * general.alignment relative to the file start */
    uint64_t nbytes;               /* n_elements / block values * block bytes */
} ds_gguf_tensor;

typedef struct ds_gguf ds_gguf;
typedef struct ds_gguf_kv ds_gguf_kv;

/* Opens and validates one GGUF file (a part of a split set opened this way is just a file). */
int ds_gguf_open_file(const char *path, ds_gguf **ret, ds_error *err);
/* Validates an in-memory GGUF image. Not copied: buf must outlive the ds_gguf. name is used in
 * errors. The fuzz target uses this. */
int ds_gguf_open_buffer(const void *buf, size_t len, const char *name, ds_gguf **ret,
                        ds_error *err);
/* Opens path; when its name is PREFIX-KKKKK-of-NNNNN.gguf (any part), opens all N parts and
 * checks that each has split.count == N and split.no == its 0-based index, that
 * split.tensors.count (when present) equals the total, and that no tensor name repeats across
 * parts. A path without that pattern is one file, which must not claim split.count > 1. The
 * tensors are the union; metadata comes from the first part. */
int ds_gguf_open_split(const char *path, ds_gguf **ret, ds_error *err);
ds_gguf *ds_gguf_free(ds_gguf *g);

size_t ds_gguf_file_count(const ds_gguf *g);
const char *ds_gguf_file_path(const ds_gguf *g, size_t i);
uint32_t ds_gguf_version(const ds_gguf *g);   /* of the first file */
uint32_t ds_gguf_alignment(const ds_gguf *g); /* of the first file */

/* Tensors of all parts, in file order (part by part); find by name across parts (NULL when
 * absent). */
size_t ds_gguf_tensor_count(const ds_gguf *g);
const ds_gguf_tensor *ds_gguf_tensor_at(const ds_gguf *g, size_t i);
const ds_gguf_tensor *ds_gguf_tensor_find(const ds_gguf *g, const char *name);

/* Metadata of the first file, in file order; find by key (NULL when absent). */
size_t ds_gguf_kv_count(const ds_gguf *g);
const ds_gguf_kv *ds_gguf_kv_at(const ds_gguf *g, size_t i);
const ds_gguf_kv *ds_gguf_kv_find(const ds_gguf *g, const char *key);
const char *ds_gguf_kv_key(const ds_gguf_kv *kv);
enum ds_gguf_vtype ds_gguf_kv_type(const ds_gguf_kv *kv);
/* Arrays: the element type and count. Not an array: the value's own type and 1. */
enum ds_gguf_vtype ds_gguf_kv_elem_type(const ds_gguf_kv *kv);
uint64_t ds_gguf_kv_len(const ds_gguf_kv *kv);
const char *ds_gguf_vtype_name(uint32_t vtype); /* "u32", "string", ...; never NULL */

/* The value as the file holds it (u32 type id, then the value: for arrays the element type,
 * count and elements), inside the mapping; what a writer copies to carry the key over. */
void ds_gguf_kv_raw(const ds_gguf_kv *kv, const void **bytes, size_t *len);

/* A GGUF image holding g's metadata (every key of the first part except split.*) and the n
 * tensors t[] (of g, in that order) at offsets of their own: *header (malloc'd, caller frees)
 * is everything before the data section, header_len bytes (a multiple of g's alignment);
 * tensor i's bytes go at data offset offsets[i] (each aligned; zeros between), and the data
 * section is *data_len bytes. What the daemon streams to a node without a copy of the model:
 * its units' tensors as they are, opened by the same reader (model/gguf_write.c). */
int ds_gguf_subset_header(const ds_gguf *g, const ds_gguf_tensor *const *t, size_t n,
                          uint8_t **header, size_t *header_len, uint64_t *offsets,
                          uint64_t *data_len, ds_error *err);

/* Typed getters. Integers accept any integer type whose value fits (u16 split.count read as
 * u32 is fine), else -ERANGE; f32 accepts f32 and f64 (rounded); bool only bool; string only
 * string. A value of another kind is -EBADMSG naming the file, key and both types. Outputs
 * are written only on success. */
int ds_gguf_kv_u32(const ds_gguf_kv *kv, uint32_t *out, ds_error *err);
int ds_gguf_kv_u64(const ds_gguf_kv *kv, uint64_t *out, ds_error *err);
int ds_gguf_kv_i32(const ds_gguf_kv *kv, int32_t *out, ds_error *err);
int ds_gguf_kv_i64(const ds_gguf_kv *kv, int64_t *out, ds_error *err);
int ds_gguf_kv_f32(const ds_gguf_kv *kv, float *out, ds_error *err);
int ds_gguf_kv_bool(const ds_gguf_kv *kv, bool *out, ds_error *err);
int ds_gguf_kv_str(const ds_gguf_kv *kv, ds_gguf_str *out, ds_error *err);
/* Element i of an array (-EBADMSG when kv is not an array of that kind, -ERANGE when i is past
 * the end or the value does not fit). */
int ds_gguf_kv_array_str(const ds_gguf_kv *kv, uint64_t i, ds_gguf_str *out, ds_error *err);
int ds_gguf_kv_array_i64(const ds_gguf_kv *kv, uint64_t i, int64_t *out, ds_error *err);
int ds_gguf_kv_array_f32(const ds_gguf_kv *kv, uint64_t i, float *out, ds_error *err);

/* The same getters by key: -ENOENT naming the file and key when it is absent. */
int ds_gguf_get_u32(const ds_gguf *g, const char *key, uint32_t *out, ds_error *err);
int ds_gguf_get_u64(const ds_gguf *g, const char *key, uint64_t *out, ds_error *err);
int ds_gguf_get_i32(const ds_gguf *g, const char *key, int32_t *out, ds_error *err);
int ds_gguf_get_f32(const ds_gguf *g, const char *key, float *out, ds_error *err);
int ds_gguf_get_bool(const ds_gguf *g, const char *key, bool *out, ds_error *err);
int ds_gguf_get_str(const ds_gguf *g, const char *key, ds_gguf_str *out, ds_error *err);
/* An array by key: its kv (for the element getters) and length; -EBADMSG when it is not an
 * array. */
int ds_gguf_get_array(const ds_gguf *g, const char *key, const ds_gguf_kv **kv, uint64_t *len,
                      ds_error *err);

#endif
