/* gguf_write.c — the header of a GGUF holding a subset of another's tensors (ds_gguf.h).
 *
 * Layout written (GGUF v3, little-endian): magic, version, tensor count, kv count; every
 * metadata entry of the source's first part except split.* (key, then the value bytes copied as
 * the source holds them: ds_gguf_kv_raw), so the tokenizer, the model's hyper-parameters and
 * general.alignment travel unchanged; the tensor infos (name, dims, type, offset); zeros up to
 * the alignment. The tensors' bytes are not copied here: the caller sends them from the
 * source's mapping at the offsets given, which the reader then validates like any file. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "ds_gguf.h"

typedef struct wbuf {
    uint8_t *p;
    size_t len, cap;
    bool oom;
} wbuf;

static void put(wbuf *b, const void *src, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        uint8_t *q = realloc(b->p, cap);
        if (!q) {
            b->oom = true;
            return;
        }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->len, src, n);
    b->len += n;
}

static void put_le(wbuf *b, uint64_t v, unsigned n)
{
    uint8_t x[8];
    for (unsigned i = 0; i < n; i++)
        x[i] = (uint8_t)(v >> (8 * i));
    put(b, x, n);
}

static void put_str(wbuf *b, const char *s)
{
    size_t n = strlen(s);
    put_le(b, n, 8);
    put(b, s, n);
}

int ds_gguf_subset_header(const ds_gguf *g, const ds_gguf_tensor *const *t, size_t n,
                          uint8_t **header, size_t *header_len, uint64_t *offsets,
                          uint64_t *data_len, ds_error *err)
{
    wbuf b = {0};
    uint64_t align = ds_gguf_alignment(g);
    size_t nkv = 0;
    for (size_t i = 0; i < ds_gguf_kv_count(g); i++)
        nkv += strncmp(ds_gguf_kv_key(ds_gguf_kv_at(g, i)), "split.", 6) != 0;
    put(&b, "GGUF", 4);
    put_le(&b, 3, 4);
    put_le(&b, n, 8);
    put_le(&b, nkv, 8);
    for (size_t i = 0; i < ds_gguf_kv_count(g); i++) {
        const ds_gguf_kv *kv = ds_gguf_kv_at(g, i);
        if (!strncmp(ds_gguf_kv_key(kv), "split.", 6))
            continue; /* one file now */
        const void *raw;
        size_t rl;
        ds_gguf_kv_raw(kv, &raw, &rl);
        put_str(&b, ds_gguf_kv_key(kv));
        put(&b, raw, rl);
    }
    uint64_t off = 0;
    for (size_t i = 0; i < n; i++) {
        put_str(&b, t[i]->name);
        put_le(&b, t[i]->n_dims, 4);
        for (uint32_t d = 0; d < t[i]->n_dims; d++)
            put_le(&b, t[i]->ne[d], 8);
        put_le(&b, t[i]->type, 4);
        off = (off + align - 1) / align * align;
        offsets[i] = off;
        put_le(&b, off, 8);
        off += t[i]->nbytes;
    }
    static const uint8_t zero[64];
    while (!b.oom && b.len % align)
        put(&b, zero,
            (size_t)(align - b.len % align) < sizeof zero ? (size_t)(align - b.len % align)
                                                          : sizeof zero);
    if (b.oom) {
        free(b.p);
        return ds_error_set(err, -ENOMEM, "GGUF header: out of memory");
    }
    *header = b.p;
    *header_len = b.len;
    *data_len = off;
    return 0;
}
