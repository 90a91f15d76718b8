/* fuzz_gguf.c — arbitrary bytes as a GGUF image: the reader must reject or accept without
 * crashing; every accepted tensor must lie inside the buffer with a consistent size, every
 * metadata value must be readable through the getters, and a supported tensor's first row must
 * dequantise (the reference dequantisers see arbitrary block bytes too). The deepseek2 config
 * mapping and the tokenizer from tokenizer.ggml.* run on every accepted image (seed
 * deepseek2_meta.gguf: the metadata of a real converted file). The subset GGUF the daemon
 * streams is written from every accepted image and read back; the load-time quantisers run on
 * every dequantised first row. */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ds_config.h"
#include "ds_gguf.h"
#include "ds_tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void touch_kv(const ds_gguf_kv *kv)
{
    ds_error err = {0};
    uint32_t u32;
    uint64_t u64;
    int64_t i64;
    float f;
    bool b;
    ds_gguf_str s;
    volatile uint8_t sink = 0;
    (void)ds_gguf_kv_u32(kv, &u32, &err);
    (void)ds_gguf_kv_u64(kv, &u64, &err);
    (void)ds_gguf_kv_i64(kv, &i64, &err);
    (void)ds_gguf_kv_f32(kv, &f, &err);
    (void)ds_gguf_kv_bool(kv, &b, &err);
    if (ds_gguf_kv_str(kv, &s, &err) == 0 && s.len)
        sink ^= (uint8_t)(s.ptr[0] ^ s.ptr[s.len - 1]);
    uint64_t n = ds_gguf_kv_len(kv);
    /* First, last and one past the last element. */
    uint64_t idx[3] = {0, n ? n - 1 : 0, n};
    for (int k = 0; k < 3; k++) {
        if (ds_gguf_kv_array_str(kv, idx[k], &s, &err) == 0 && s.len)
            sink ^= (uint8_t)(s.ptr[0] ^ s.ptr[s.len - 1]);
        (void)ds_gguf_kv_array_i64(kv, idx[k], &i64, &err);
        (void)ds_gguf_kv_array_f32(kv, idx[k], &f, &err);
    }
    (void)sink;
}

/* The image the daemon streams (ds_gguf_subset_header + every other tensor) must be a GGUF the
 * reader accepts, with the same metadata (less split.*) and those tensors, byte for byte. */
static void subset_roundtrip(const ds_gguf *g)
{
    size_t nt = ds_gguf_tensor_count(g), n = 0;
    const ds_gguf_tensor **t = malloc((nt + 1) * sizeof(*t));
    uint64_t *off = malloc((nt + 1) * sizeof(*off)), data_len = 0, bytes = 0;
    if (!t || !off)
        abort();
    for (size_t i = 0; i < nt; i += 2) {
        t[n] = ds_gguf_tensor_at(g, i);
        bytes += t[n++]->nbytes;
    }
    uint8_t *hdr = NULL;
    size_t hl = 0;
    ds_error err = {0};
    if (bytes > (64u << 20) || ds_gguf_subset_header(g, t, n, &hdr, &hl, off, &data_len, &err))
        goto out; /* large images: not worth a copy here */
    uint8_t *img = calloc(1, hl + data_len + 1);
    if (!img)
        abort();
    memcpy(img, hdr, hl);
    for (size_t i = 0; i < n; i++)
        memcpy(img + hl + off[i], t[i]->data, t[i]->nbytes);
    ds_gguf *s = NULL;
    if (ds_gguf_open_buffer(img, hl + data_len, "subset.gguf", &s, &err) != 0 ||
        ds_gguf_tensor_count(s) != n)
        abort();
    for (size_t i = 0; i < n; i++) {
        const ds_gguf_tensor *a = ds_gguf_tensor_find(s, t[i]->name);
        if (!a || a->type != t[i]->type || memcmp(a->ne, t[i]->ne, sizeof(a->ne)) ||
            a->nbytes != t[i]->nbytes || memcmp(a->data, t[i]->data, a->nbytes))
            abort();
    }
    for (size_t i = 0; i < ds_gguf_kv_count(g); i++) {
        const ds_gguf_kv *kv = ds_gguf_kv_at(g, i);
        bool split = !strncmp(ds_gguf_kv_key(kv), "split.", 6);
        if (!ds_gguf_kv_find(s, ds_gguf_kv_key(kv)) != split)
            abort();
    }
    ds_gguf_free(s);
    free(img);
out:
    free(hdr);
    free(t);
    free(off);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ds_gguf *g = NULL;
    ds_error err = {0};
    if (ds_gguf_open_buffer(data, size, "fuzz.gguf", &g, &err) != 0)
        return 0;
    for (size_t i = 0; i < ds_gguf_kv_count(g); i++) {
        const ds_gguf_kv *kv = ds_gguf_kv_at(g, i);
        touch_kv(kv);
        if (ds_gguf_kv_find(g, ds_gguf_kv_key(kv)) != kv)
            abort();
    }
    for (size_t i = 0; i < ds_gguf_tensor_count(g); i++) {
        const ds_gguf_tensor *t = ds_gguf_tensor_at(g, i);
        const uint8_t *p = t->data;
        uint64_t row_bytes = 0;
        if (p < data || t->nbytes > size || p + t->nbytes > data + size || t->nbytes == 0)
            abort();
        if (ds_quant_row_bytes(t->type, t->ne[0], &row_bytes) != 0 || row_bytes > t->nbytes)
            abort();
        if (ds_gguf_tensor_find(g, t->name) != t)
            abort();
        /* Rows of at most 64 Ki values keep one input fast. */
        if (ds_quant_can_dequant(t->type) && t->ne[0] <= 65536) {
            float *y = malloc(t->ne[0] * sizeof(float));
            if (!y || ds_quant_dequant_row(t->type, p, t->ne[0], y) != 0)
                abort();
            /* --quantize's quantisers on whatever values a file holds (inf, NaN, subnormal) */
            uint8_t *q = malloc(t->ne[0] / 32 * 34 + 1);
            if (!q)
                abort();
            if (t->ne[0] % 32 == 0 && ds_quant_quantize_row(DS_QUANT_Q8_0, y, t->ne[0], q) != 0)
                abort();
            if (t->ne[0] % 256 == 0 && ds_quant_quantize_row(DS_QUANT_Q4_K, y, t->ne[0], q) != 0)
                abort();
            free(q);
            free(y);
        }
    }
    subset_roundtrip(g);
    ds_model_config cfg;
    (void)ds_model_config_from_gguf(g, &cfg, &err);
    ds_tokenizer *tok = NULL;
    if (ds_tokenizer_load_gguf(g, &tok, &err) == 0) {
        int32_t *ids = NULL;
        size_t n = 0;
        static const char text[] = "Hello, world! 123 <\xef\xbd\x9c>";
        if (ds_tokenizer_encode(tok, text, sizeof(text) - 1, true, &ids, &n, &err) == 0)
            for (size_t i = 0; i < n; i++)
                if (ids[i] < 0 || (uint32_t)ids[i] >= ds_tokenizer_vocab_size(tok))
                    abort();
        free(ids);
        ds_tokenizer_free(tok);
    }
    ds_gguf_free(g);
    return 0;
}
