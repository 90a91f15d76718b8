/* fuzz_tokenizer.c — two targets in one, chosen by the first byte:
 *   even: the rest is a tokenizer.json (read through a memfd): load or reject, never crash;
 *         an accepted one encodes and decodes a fixed text;
 *   odd:  the rest is text for the shipped tiny tokenizer: encode, decode, streaming decode;
 *         valid UTF-8 must round-trip exactly and the stream must equal the whole decode. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ds_tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static ds_tokenizer *tiny;

static bool valid_utf8(const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        uint8_t c = s[i];
        size_t k = c < 0x80                   ? 1
                   : (c >= 0xC2 && c <= 0xDF) ? 2
                   : (c >= 0xE0 && c <= 0xEF) ? 3
                   : (c >= 0xF0 && c <= 0xF4) ? 4
                                              : 0;
        if (k == 0 || i + k > n)
            return false;
        for (size_t j = 1; j < k; j++)
            if ((s[i + j] & 0xC0) != 0x80)
                return false;
        if ((c == 0xE0 && s[i + 1] < 0xA0) || (c == 0xED && s[i + 1] > 0x9F) ||
            (c == 0xF0 && s[i + 1] < 0x90) || (c == 0xF4 && s[i + 1] > 0x8F))
            return false;
        i += k;
    }
    return true;
}

static void roundtrip(ds_tokenizer *t, const char *text, size_t n, bool check)
{
    int32_t *ids;
    size_t nids;
    ds_error err = {0};
    if (ds_tokenizer_encode(t, text, n, true, &ids, &nids, &err) < 0)
        abort();
    char *dec;
    size_t dl;
    if (ds_tokenizer_decode(t, ids, nids, true, &dec, &dl, &err) < 0)
        abort();
    if (check && (dl != n || memcmp(dec, text, n) != 0))
        abort();
    ds_tok_stream *s;
    if (ds_tok_stream_new(t, true, &s) < 0)
        abort();
    size_t k = 0;
    for (size_t i = 0; i < nids; i++) {
        const char *o;
        size_t ol;
        if (ds_tok_stream_push(s, ids[i], &o, &ol, &err) < 0 || k + ol > dl ||
            memcmp(dec + k, o, ol) != 0)
            abort();
        k += ol;
    }
    const char *o;
    size_t ol;
    ds_tok_stream_flush(s, &o, &ol);
    if (k + ol != dl || memcmp(dec + k, o, ol) != 0)
        abort();
    ds_tok_stream_free(s);
    free(dec);
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    if (data[0] & 1) {
        ds_error err = {0};
        if (!tiny && ds_tokenizer_load(DS_TEST_DATA "/tokenizer/tiny", &tiny, &err) < 0)
            abort();
        /* No special tokens in the text for the exact check (they decode-skip). */
        bool check =
            valid_utf8(data + 1, size - 1) && !memmem(data + 1, size - 1, "<\xEF\xBD\x9C", 4);
        roundtrip(tiny, (const char *)data + 1, size - 1, check);
        return 0;
    }
    int fd = memfd_create("tokjson", MFD_CLOEXEC);
    if (fd < 0)
        return 0;
    if (write(fd, data + 1, size - 1) == (ssize_t)(size - 1)) {
        char path[64];
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
        ds_tokenizer *t = NULL;
        ds_error err = {0};
        if (ds_tokenizer_load_files(path, NULL, &t, &err) == 0) {
            static const char txt[] = "Hello  world 123 \xE6\x97\xA5\xE6\x9C\xAC!\n\xFF";
            roundtrip(t, txt, sizeof(txt) - 1, false);
            ds_tokenizer_free(t);
        }
    }
    close(fd);
    return 0;
}
