/* ds_hash.h — the project's one non-cryptographic hash: 64-bit FNV-1a.
 *
 * Used for fingerprints that are written to disk (calibration cache keys, OpenCL program
 * caches, plan digests) and for the tokenizer's hash maps, so its value must never change:
 * the standard FNV-1a offset basis and prime, one byte at a time. Chain calls to hash several
 * fields: h = ds_hash_fnv1a(h, a, na); h = ds_hash_fnv1a(h, b, nb); starting from
 * DS_HASH_FNV1A_INIT. */
#ifndef DS_HASH_H
#define DS_HASH_H

#include <stddef.h>
#include <stdint.h>

#define DS_HASH_FNV1A_INIT  0xcbf29ce484222325ull /* offset basis (14695981039346656037) */
#define DS_HASH_FNV1A_PRIME 0x100000001b3ull      /* 1099511628211 */

/* h folded with the n bytes at p. */
static inline uint64_t ds_hash_fnv1a(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * DS_HASH_FNV1A_PRIME;
    return h;
}

/* FNV-1a of a NUL-terminated string (the NUL not included). */
static inline uint64_t ds_hash_fnv1a_str(uint64_t h, const char *s)
{
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * DS_HASH_FNV1A_PRIME;
    return h;
}

#endif
