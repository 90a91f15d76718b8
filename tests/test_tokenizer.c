/* test_tokenizer.c — the C tokenizer against HF tokenizers' own ids (tests/data/tokenizer, made
 * by tools/gen_tokenizer_ref.py) on a varied corpus, for three configurations (GPT-2 regex
 * ByteLevel; DeepSeek-V3 style Sequence of Split regexes; add_prefix_space with lstrip/rstrip
 * added tokens); HF's decode of the same ids; streaming decode == whole decode with only
 * complete UTF-8 per chunk; BOS per tokenizer_config.json; hostile tokenizer.json files. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ds_tokenizer.h"

#define TOKDATA DS_TEST_DATA "/tokenizer/"

static const char *const tok_names[] = {"tiny", "v3style", "prefix", "behaviors"};

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* Parses a hex string ("-" = empty) into a malloc'd buffer. */
static char *unhex(const char *s, size_t n, size_t *len)
{
    char *o = malloc(n / 2 + 1);
    assert_non_null(o);
    *len = 0;
    if (n == 1 && s[0] == '-')
        return o;
    assert_true(n % 2 == 0);
    for (size_t i = 0; i < n; i += 2) {
        int a = hexval(s[i]), b = hexval(s[i + 1]);
        assert_true(a >= 0 && b >= 0);
        o[(*len)++] = (char)(a * 16 + b);
    }
    return o;
}

static size_t read_lines(const char *path, char ***lines)
{
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    size_t n = 0, cap = 0;
    char *line = NULL;
    size_t lcap = 0;
    ssize_t l;
    *lines = NULL;
    while ((l = getline(&line, &lcap, f)) >= 0) {
        if (l > 0 && line[l - 1] == '\n')
            line[--l] = '\0';
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            *lines = realloc(*lines, cap * sizeof(**lines));
            assert_non_null(*lines);
        }
        (*lines)[n++] = strdup(line);
    }
    free(line);
    fclose(f);
    return n;
}

static void free_lines(char **lines, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(lines[i]);
    free(lines);
}

static size_t parse_ids(const char *s, int32_t *out, size_t max)
{
    size_t n = 0;
    if (s[0] == '-')
        return 0;
    while (*s && *s != '\t' && n < max) {
        char *end;
        out[n++] = (int32_t)strtol(s, &end, 10);
        s = *end == ',' ? end + 1 : end;
    }
    return n;
}

static bool utf8_valid(const char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        size_t k = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (k == 0 || i + k > n)
            return false;
        for (size_t j = 1; j < k; j++)
            if (((unsigned char)s[i + j] & 0xC0) != 0x80)
                return false;
        i += k;
    }
    return true;
}

static void check_tokenizer(const char *name, char **cases, size_t n_cases)
{
    char dir[512], path[600];
    snprintf(dir, sizeof(dir), TOKDATA "%s", name);
    snprintf(path, sizeof(path), "%s/expected.txt", dir);
    ds_tokenizer *t = NULL;
    ds_error err = {0};
    int r = ds_tokenizer_load(dir, &t, &err);
    if (r < 0)
        fail_msg("%s: %s", name, ds_error_str(&err));
    char **exp;
    size_t n_exp = read_lines(path, &exp);
    assert_int_equal(n_exp, n_cases);
    static int32_t want[1 << 16];
    size_t mismatches = 0;
    for (size_t c = 0; c < n_cases; c++) {
        size_t tlen;
        char *text = unhex(cases[c], strlen(cases[c]), &tlen);
        size_t nw = parse_ids(exp[c], want, sizeof(want) / sizeof(want[0]));
        int32_t *ids;
        size_t n;
        assert_int_equal(ds_tokenizer_encode(t, text, tlen, false, &ids, &n, &err), 0);
        bool same = n == nw && memcmp(ids, want, n * sizeof(*ids)) == 0;
        if (!same) {
            mismatches++;
            fprintf(stderr, "%s case %zu (%s): C gives %zu ids, HF %zu:", name, c, cases[c], n, nw);
            for (size_t i = 0; i < n && i < 24; i++)
                fprintf(stderr, " %d%s", ids[i], i < nw && ids[i] == want[i] ? "" : "*");
            fprintf(stderr, "\n");
        }
        /* HF's decode of the same ids. */
        const char *tab = strchr(exp[c], '\t');
        assert_non_null(tab);
        size_t dlen;
        char *want_dec = unhex(tab + 1, strlen(tab + 1), &dlen);
        char *dec;
        size_t declen;
        assert_int_equal(ds_tokenizer_decode(t, want, nw, false, &dec, &declen, &err), 0);
        assert_int_equal(declen, dlen);
        assert_memory_equal(dec, want_dec, dlen);
        /* Streaming: same bytes in total, each chunk complete UTF-8 when the whole is valid. */
        ds_tok_stream *s;
        assert_int_equal(ds_tok_stream_new(t, false, &s), 0);
        char *acc = malloc(declen + 1);
        size_t k = 0;
        bool valid = utf8_valid(dec, declen);
        for (size_t i = 0; i < nw; i++) {
            const char *o;
            size_t ol;
            assert_int_equal(ds_tok_stream_push(s, want[i], &o, &ol, &err), 0);
            assert_true(k + ol <= declen);
            if (valid)
                assert_true(utf8_valid(o, ol));
            memcpy(acc + k, o, ol);
            k += ol;
        }
        const char *o;
        size_t ol;
        ds_tok_stream_flush(s, &o, &ol);
        assert_true(k + ol <= declen);
        memcpy(acc + k, o, ol);
        k += ol;
        assert_int_equal(k, declen);
        assert_memory_equal(acc, dec, declen);
        ds_tok_stream_free(s);
        free(acc);
        free(dec);
        free(want_dec);
        free(ids);
        free(text);
    }
    assert_int_equal(mismatches, 0);
    free_lines(exp, n_exp);
    ds_tokenizer_free(t);
}

static void test_hf_ids(void **state)
{
    (void)state;
    char **cases;
    size_t n = read_lines(TOKDATA "corpus.hex", &cases);
    assert_true(n >= 50);
    for (size_t i = 0; i < sizeof(tok_names) / sizeof(tok_names[0]); i++)
        check_tokenizer(tok_names[i], cases, n);
    free_lines(cases, n);
}

static void test_bos_and_lookups(void **state)
{
    (void)state;
    ds_tokenizer *t;
    ds_error err = {0};
    const char *bos = "<｜begin▁of▁sentence｜>", *eos = "<｜end▁of▁sentence｜>";
    /* tiny: bos_token given as an AddedToken object; v3style: as a string; prefix: no BOS. */
    for (int k = 0; k < 3; k++) {
        char dir[512];
        snprintf(dir, sizeof(dir), TOKDATA "%s", tok_names[k]);
        assert_int_equal(ds_tokenizer_load(dir, &t, &err), 0);
        assert_int_equal(ds_tokenizer_bos_id(t), ds_tokenizer_token_to_id(t, bos));
        assert_int_equal(ds_tokenizer_eos_id(t), ds_tokenizer_token_to_id(t, eos));
        assert_true(ds_tokenizer_is_special(t, ds_tokenizer_bos_id(t)));
        assert_string_equal(ds_tokenizer_id_to_token(t, ds_tokenizer_eos_id(t)), eos);
        assert_null(ds_tokenizer_id_to_token(t, -1));
        assert_null(ds_tokenizer_id_to_token(t, (int32_t)ds_tokenizer_vocab_size(t)));
        assert_int_equal(ds_tokenizer_adds_bos(t), k < 2);
        int32_t *a, *b;
        size_t na, nb;
        assert_int_equal(ds_tokenizer_encode(t, "Hello", 5, true, &a, &na, &err), 0);
        assert_int_equal(ds_tokenizer_encode(t, "Hello", 5, false, &b, &nb, &err), 0);
        assert_int_equal(na, nb + (k < 2));
        if (k < 2)
            assert_int_equal(a[0], ds_tokenizer_bos_id(t));
        assert_memory_equal(a + (na - nb), b, nb * sizeof(*b));
        /* skip_special drops BOS/EOS in decode. */
        int32_t ids[3] = {ds_tokenizer_bos_id(t), b[0], ds_tokenizer_eos_id(t)};
        char *d;
        size_t dl;
        assert_int_equal(ds_tokenizer_decode(t, ids, 3, true, &d, &dl, &err), 0);
        char *d1;
        size_t dl1;
        assert_int_equal(ds_tokenizer_decode(t, b, 1, false, &d1, &dl1, &err), 0);
        assert_int_equal(dl, dl1);
        assert_memory_equal(d, d1, dl);
        free(d);
        free(d1);
        /* Unknown ids are refused. */
        ids[1] = (int32_t)ds_tokenizer_vocab_size(t);
        assert_int_equal(ds_tokenizer_decode(t, ids, 3, false, &d, &dl, &err), -ERANGE);
        free(a);
        free(b);
        ds_tokenizer_free(t);
    }
}

/* Streaming holds an emoji split across tokens until complete (byte-level tokens). */
static void test_stream_partial_utf8(void **state)
{
    (void)state;
    ds_tokenizer *t;
    ds_error err = {0};
    assert_int_equal(ds_tokenizer_load(TOKDATA "tiny", &t, &err), 0);
    /* The byte-level symbols of F0 9F 98 80 (U+1F600) are single tokens: ð Ł ĺ Ģ. */
    const char *syms[4] = {"ð", "Ł", "ĺ", "Ģ"};
    ds_tok_stream *s;
    assert_int_equal(ds_tok_stream_new(t, false, &s), 0);
    const char *o;
    size_t ol;
    for (int i = 0; i < 4; i++) {
        int32_t id = ds_tokenizer_token_to_id(t, syms[i]);
        assert_true(id >= 0);
        assert_int_equal(ds_tok_stream_push(s, id, &o, &ol, &err), 0);
        if (i < 3)
            assert_int_equal(ol, 0);
    }
    assert_int_equal(ol, 4);
    assert_memory_equal(o, "\xF0\x9F\x98\x80", 4);
    /* An invalid continuation releases the held bytes as they are. */
    assert_int_equal(ds_tok_stream_push(s, ds_tokenizer_token_to_id(t, "ð"), &o, &ol, &err), 0);
    assert_int_equal(ol, 0);
    assert_int_equal(ds_tok_stream_push(s, ds_tokenizer_token_to_id(t, "a"), &o, &ol, &err), 0);
    assert_int_equal(ol, 2);
    assert_memory_equal(o,
                        "\xF0"
                        "a",
                        2);
    /* A trailing partial sequence comes out at flush. */
    assert_int_equal(ds_tok_stream_push(s, ds_tokenizer_token_to_id(t, "ð"), &o, &ol, &err), 0);
    ds_tok_stream_flush(s, &o, &ol);
    assert_int_equal(ol, 1);
    assert_int_equal((unsigned char)o[0], 0xF0);
    assert_int_equal(ds_tok_stream_push(s, -5, &o, &ol, &err), -ERANGE);
    ds_tok_stream_free(s);
    ds_tokenizer_free(t);
}

/* A long text: encode is linear in pieces (no quadratic blow-up on a 1 MB input), round-trips,
 * and a 100 kB single piece (one run of letters) goes through the heap BPE. */
static void test_long_text(void **state)
{
    (void)state;
    ds_tokenizer *t;
    ds_error err = {0};
    assert_int_equal(ds_tokenizer_load(TOKDATA "v3style", &t, &err), 0);
    const char *unit = "The quick brown fox, 12345 jumps; 日本語 over\u00a0the lazy dog.\n";
    size_t ul = strlen(unit), n = (1u << 20) / ul;
    char *big = malloc(n * ul + 100001);
    for (size_t i = 0; i < n; i++)
        memcpy(big + i * ul, unit, ul);
    int32_t *ids, *one;
    size_t nids, none;
    assert_int_equal(ds_tokenizer_encode(t, unit, ul, false, &one, &none, &err), 0);
    assert_int_equal(ds_tokenizer_encode(t, big, n * ul, false, &ids, &nids, &err), 0);
    assert_int_equal(nids, n * none); /* the unit ends in \n: pieces never straddle units */
    for (size_t i = 0; i < nids; i++)
        assert_int_equal(ids[i], one[i % none]);
    char *d;
    size_t dl;
    assert_int_equal(ds_tokenizer_decode(t, ids, nids, false, &d, &dl, &err), 0);
    assert_int_equal(dl, n * ul);
    assert_memory_equal(d, big, dl);
    free(d);
    free(ids);
    memset(big, 'e', 100000);
    assert_int_equal(ds_tokenizer_encode(t, big, 100000, false, &ids, &nids, &err), 0);
    assert_int_equal(ds_tokenizer_decode(t, ids, nids, false, &d, &dl, &err), 0);
    assert_int_equal(dl, 100000);
    assert_memory_equal(d, big, dl);
    free(d);
    free(ids);
    free(one);
    free(big);
    ds_tokenizer_free(t);
}

static int load_str(const char *json, const char *cfg, ds_error *err)
{
    char p[] = "/tmp/dstokXXXXXX", q[] = "/tmp/dstokcXXXXXX";
    int fd = mkstemp(p), fq = mkstemp(q);
    assert_true(fd >= 0 && fq >= 0);
    assert_int_equal(write(fd, json, strlen(json)), (ssize_t)strlen(json));
    if (cfg)
        assert_int_equal(write(fq, cfg, strlen(cfg)), (ssize_t)strlen(cfg));
    close(fd);
    close(fq);
    ds_tokenizer *t = NULL;
    ds_error_clear(err);
    int r = ds_tokenizer_load_files(p, cfg ? q : NULL, &t, err);
    ds_tokenizer_free(t);
    unlink(p);
    unlink(q);
    return r;
}

/* A minimal valid byte-level tokenizer.json text with the given extra parts. */
static char *mini(const char *model_extra, const char *pre, const char *rest)
{
    static const uint32_t dummy = 0;
    (void)dummy;
    size_t cap = 1 << 16;
    char *s = malloc(cap);
    size_t k = (size_t)snprintf(s, cap, "{\"model\":{\"type\":\"BPE\",\"vocab\":{");
    /* The 256 byte-level symbols: ids 0..255 in GPT-2's byte order. */
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; b++) {
        bool keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
        uint32_t cp = keep ? b : next++;
        char u[8];
        if (cp < 0x80)
            snprintf(u, sizeof(u), cp == '"' ? "\\\"" : cp == '\\' ? "\\\\" : "%c", (char)cp);
        else
            snprintf(u, sizeof(u), "%c%c", (char)(0xC0 | (cp >> 6)), (char)(0x80 | (cp & 0x3F)));
        k += (size_t)snprintf(s + k, cap - k, "%s\"%s\":%u", b ? "," : "", u, b);
    }
    k += (size_t)snprintf(s + k, cap - k, ",\"ab\":256}%s},\"pre_tokenizer\":%s%s}", model_extra,
                          pre, rest);
    return s;
}

static void test_hostile_files(void **state)
{
    (void)state;
    ds_error err;
    const char *bl = "{\"type\":\"ByteLevel\",\"add_prefix_space\":false}";
    char *s;
    /* The minimal file loads, with both merge spellings. */
    s = mini(",\"merges\":[\"a b\"]", bl, "");
    assert_int_equal(load_str(s, NULL, &err), 0);
    free(s);
    s = mini(",\"merges\":[[\"a\",\"b\"]]", bl, "");
    assert_int_equal(load_str(s, NULL, &err), 0);
    free(s);
    struct {
        const char *model_extra, *pre, *rest, *cfg;
        int code;
        const char *msg;
    } bad[] = {
        {",\"merges\":[\"a c\"]", NULL, "", NULL, -EBADMSG, "merges[0]"},
        {",\"merges\":[\"abc\"]", NULL, "", NULL, -EBADMSG, "merges[0]"},
        {",\"merges\":[[\"a\"]]", NULL, "", NULL, -EBADMSG, "merges[0]"},
        {",\"merges\":7", NULL, "", NULL, -EBADMSG, "merges"},
        {",\"dropout\":0.1", NULL, "", NULL, -EINVAL, "dropout"},
        {"", "{\"type\":\"Whitespace\"}", "", NULL, -EINVAL, "Whitespace"},
        {"", "{\"type\":\"Split\",\"pattern\":{\"Regex\":\"(\"},\"behavior\":\"Isolated\"}", "",
         NULL, -EBADMSG, "regex"},
        {"", "{\"type\":\"Split\",\"pattern\":{\"Regex\":\"a\"},\"behavior\":\"Isolated\"}", "",
         NULL, -EINVAL, "must end with ByteLevel"},
        {"", "{\"type\":\"Split\",\"pattern\":{\"Regex\":\"a\"},\"behavior\":\"Odd\"}", "", NULL,
         -EINVAL, "behavior"},
        {"", NULL, ",\"normalizer\":{\"type\":\"NFC\"}", NULL, -EINVAL, "normalizer"},
        {"", NULL, ",\"decoder\":{\"type\":\"WordPiece\"}", NULL, -EINVAL, "decoder"},
        {"", NULL, ",\"added_tokens\":[{\"id\":-1,\"content\":\"x\"}]", NULL, -EBADMSG,
         "added_tokens[0]"},
        {"", NULL, ",\"added_tokens\":[{\"id\":5,\"content\":\"zz\"}]", NULL, -EBADMSG,
         "id 5 given to both"},
        {"", NULL, "", "{\"add_bos_token\":true,\"bos_token\":\"<nope>\"}", -EBADMSG, "bos_token"},
        {"", NULL, "", "[1,2", -EBADMSG, ""},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        s = mini(bad[i].model_extra, bad[i].pre ? bad[i].pre : bl, bad[i].rest);
        int r = load_str(s, bad[i].cfg, &err);
        if (r != bad[i].code || !strstr(ds_error_str(&err), bad[i].msg))
            fail_msg("case %zu: got %d '%s'", i, r, ds_error_str(&err));
        free(s);
    }
    /* Not JSON, not an object, a vocab id past the limit, a byte missing. */
    assert_int_equal(load_str("{\"model\":", NULL, &err), -EBADMSG);
    assert_int_equal(load_str("[]", NULL, &err), -EBADMSG);
    assert_int_equal(load_str("{\"model\":{\"vocab\":{\"a\":99999999}},\"pre_tokenizer\":"
                              "{\"type\":\"ByteLevel\"}}",
                              NULL, &err),
                     -ERANGE);
    assert_int_equal(load_str("{\"model\":{\"vocab\":{\"a\":0}},\"pre_tokenizer\":"
                              "{\"type\":\"ByteLevel\"}}",
                              NULL, &err),
                     -EBADMSG);
    assert_non_null(strstr(ds_error_str(&err), "byte 0x00"));
    ds_tokenizer *t;
    assert_true(ds_tokenizer_load("/nonexistent/dir", &t, &err) < 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hf_ids),
        cmocka_unit_test(test_bos_and_lookups),
        cmocka_unit_test(test_stream_partial_utf8),
        cmocka_unit_test(test_long_text),
        cmocka_unit_test(test_hostile_files),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
