/* tokenizer.c — HF tokenizer.json byte-level BPE: load, encode, decode, streaming decode.
 *
 * Encode pipeline (the order HF tokenizers applies, see docs/tokenizer.md):
 *   bytes -> valid UTF-8 (invalid sequences -> U+FFFD, maximal-subpart rule as Python's
 *   errors="replace") -> added tokens split out (non-normalized ones first, then normalized;
 *   leftmost, longest) -> per remaining segment the pre-tokenizer steps (Split regexes, then
 *   ByteLevel with optional GPT-2 regex) -> per piece: bytes -> byte-level symbol ids -> BPE
 *   merges by rank (lowest rank first, leftmost on ties) -> ids.
 *
 * BPE keeps the symbols of one piece in a doubly linked array and candidate merges in a binary
 * heap keyed (rank, position); a popped candidate is applied only if the pair at that position
 * still has that rank (ranks are unique per pair), so each piece costs O(n log n).
 *
 * The decoded bytes of every id are computed once at load (ByteLevel decoder: a token whose
 * every code point is in the byte map becomes those bytes, any other token its own UTF-8). */
#include "ds_hash.h"
#include "ds_tokenizer.h"

#include "ds_gguf.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <jansson.h>
#include <pcre2.h>

#define MAX_PRETOK_STEPS 16
#define MAX_MERGES       (4u << 20)

/* GPT-2's pre-tokenizer regex (ByteLevel use_regex=true). */
static const char GPT2_PATTERN[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

enum split_behavior {
    SPLIT_ISOLATED,
    SPLIT_REMOVED,
    SPLIT_MERGED_PREV,
    SPLIT_MERGED_NEXT,
    SPLIT_CONTIGUOUS,
};

struct pretok_step {
    pcre2_code *re;        /* NULL for a ByteLevel step without regex */
    int behavior;          /* enum split_behavior */
    bool byte_level;       /* ByteLevel step (prefix space + optional GPT-2 regex) */
    bool add_prefix_space; /* ByteLevel only */
};

struct str_map { /* open addressing, string -> id; keys borrowed from the tokenizer */
    const char **keys;
    int32_t *vals;
    uint32_t cap; /* power of two */
};

struct pair_entry {
    uint64_t key;   /* (left id << 32) | right id; UINT64_MAX = empty */
    uint32_t rank;  /* index in merges */
    int32_t merged; /* id of left+right */
};

struct added_token {
    char *content;
    uint32_t len; /* bytes */
    int32_t id;
    bool special, normalized, lstrip, rstrip;
};

struct ds_tokenizer {
    uint32_t n_ids;       /* max id + 1 */
    char **tok_str;       /* [n_ids] vocab/added spelling, NULL for holes */
    uint8_t *dec;         /* decoded bytes of all ids back to back */
    uint32_t *dec_off;    /* [n_ids + 1] offsets into dec */
    uint8_t *special;     /* [n_ids] 1 for special added tokens */
    struct str_map vocab; /* model vocab spelling -> id */
    struct pair_entry *pairs;
    uint32_t pair_cap;    /* power of two */
    int32_t byte_id[256]; /* id of the byte-level symbol of each byte, -1 if absent */
    struct added_token *added;
    uint32_t n_added;
    /* added tokens by first byte: first_idx[first_off[b] .. first_off[b + 1]) index `added`,
     * so matching looks only at tokens that can start at a position */
    uint32_t first_off[257];
    uint32_t *first_idx;
    struct pretok_step steps[MAX_PRETOK_STEPS];
    uint32_t n_steps;
    bool ignore_merges;
    bool add_bos;
    int32_t bos, eos;
};

/* ---- byte-level map -------------------------------------------------------------------- */

/* GPT-2's table: printable Latin-1 bytes map to themselves, the other 68 to 256, 257, ... in
 * byte order. */
static void byte_map_build(uint32_t cp_of[256])
{
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; b++) {
        bool keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
        cp_of[b] = keep ? b : next++;
    }
}

static size_t utf8_put(uint32_t cp, char *o)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Length of the valid UTF-8 sequence at s[0..n), or -k (k >= 1) when invalid: k is the length
 * of the maximal valid prefix (at least 1), the bytes one U+FFFD replaces. */
static int utf8_seq(const uint8_t *s, size_t n)
{
    uint8_t b = s[0];
    int need;
    uint8_t lo = 0x80, hi = 0xBF;
    if (b < 0x80)
        return 1;
    if (b >= 0xC2 && b <= 0xDF)
        need = 1;
    else if (b >= 0xE0 && b <= 0xEF) {
        need = 2;
        if (b == 0xE0)
            lo = 0xA0;
        if (b == 0xED)
            hi = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
        need = 3;
        if (b == 0xF0)
            lo = 0x90;
        if (b == 0xF4)
            hi = 0x8F;
    } else
        return -1;
    for (int i = 1; i <= need; i++) {
        if ((size_t)i >= n)
            return -i;
        uint8_t c = s[i];
        if (i == 1 ? (c < lo || c > hi) : (c < 0x80 || c > 0xBF))
            return -i;
    }
    return need + 1;
}

/* Decodes one code point of valid UTF-8 (used on the vocab strings, already checked). */
static uint32_t utf8_get(const uint8_t *s, int len)
{
    if (len == 1)
        return s[0];
    uint32_t cp = s[0] & (0x7F >> len);
    for (int i = 1; i < len; i++)
        cp = (cp << 6) | (s[i] & 0x3F);
    return cp;
}

/* ---- hash maps ------------------------------------------------------------------------- */

static uint64_t hash_bytes(const char *s, size_t n)
{
    return ds_hash_fnv1a(DS_HASH_FNV1A_INIT, s, n);
}

static uint64_t hash_u64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}

static int str_map_init(struct str_map *m, uint32_t n)
{
    uint32_t cap = 16;
    while (cap < 2 * n + 16)
        cap <<= 1;
    m->keys = calloc(cap, sizeof(*m->keys));
    m->vals = calloc(cap, sizeof(*m->vals));
    m->cap = cap;
    return m->keys && m->vals ? 0 : -ENOMEM;
}

/* Inserts key -> val; returns false when key was already present (value kept). */
static bool str_map_put(struct str_map *m, const char *key, int32_t val)
{
    uint32_t i = (uint32_t)hash_bytes(key, strlen(key)) & (m->cap - 1);
    while (m->keys[i]) {
        if (strcmp(m->keys[i], key) == 0)
            return false;
        i = (i + 1) & (m->cap - 1);
    }
    m->keys[i] = key;
    m->vals[i] = val;
    return true;
}

static int32_t str_map_get(const struct str_map *m, const char *key, size_t n)
{
    if (!m->keys)
        return -1;
    uint32_t i = (uint32_t)hash_bytes(key, n) & (m->cap - 1);
    while (m->keys[i]) {
        if (strncmp(m->keys[i], key, n) == 0 && m->keys[i][n] == '\0')
            return m->vals[i];
        i = (i + 1) & (m->cap - 1);
    }
    return -1;
}

static const struct pair_entry *pair_get(const ds_tokenizer *t, int32_t a, int32_t b)
{
    if (!t->pairs)
        return NULL;
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    uint32_t i = (uint32_t)hash_u64(key) & (t->pair_cap - 1);
    while (t->pairs[i].key != UINT64_MAX) {
        if (t->pairs[i].key == key)
            return &t->pairs[i];
        i = (i + 1) & (t->pair_cap - 1);
    }
    return NULL;
}

/* ---- loading --------------------------------------------------------------------------- */

ds_tokenizer *ds_tokenizer_free(ds_tokenizer *t)
{
    if (!t)
        return NULL;
    if (t->tok_str)
        for (uint32_t i = 0; i < t->n_ids; i++)
            free(t->tok_str[i]);
    free(t->tok_str);
    free(t->dec);
    free(t->dec_off);
    free(t->special);
    free(t->vocab.keys);
    free(t->vocab.vals);
    free(t->pairs);
    for (uint32_t i = 0; i < t->n_added; i++)
        free(t->added[i].content);
    free(t->added);
    free(t->first_idx);
    for (uint32_t i = 0; i < t->n_steps; i++)
        pcre2_code_free(t->steps[i].re);
    free(t);
    return NULL;
}

static int load_json(const char *path, size_t limit, bool optional, json_t **ret, ds_error *err)
{
    struct stat st;
    *ret = NULL;
    if (stat(path, &st) != 0) {
        if (optional && errno == ENOENT)
            return 0;
        return ds_error_set(err, -errno, "%s: %s", path, strerror(errno));
    }
    if (!S_ISREG(st.st_mode))
        return ds_error_set(err, -EINVAL, "%s: not a regular file", path);
    if ((uint64_t)st.st_size > limit)
        return ds_error_set(err, -ERANGE, "%s: %lld bytes, the limit is %zu", path,
                            (long long)st.st_size, limit);
    json_error_t je;
    json_t *j = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!j)
        return ds_error_set(err, -EBADMSG, "%s:%d: %s", path, je.line, je.text);
    *ret = j;
    return 0;
}

static bool valid_utf8(const char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        int k = utf8_seq((const uint8_t *)s + i, n - i);
        if (k < 0)
            return false;
        i += (size_t)k;
    }
    return true;
}

static int compile_re(const char *pat, size_t len, bool literal, pcre2_code **ret, const char *path,
                      ds_error *err)
{
    int ec;
    PCRE2_SIZE eo;
    uint32_t opts = PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK;
    if (literal)
        opts = PCRE2_UTF | PCRE2_LITERAL;
    if (!valid_utf8(pat, len))
        return ds_error_set(err, -EBADMSG, "%s: pre_tokenizer pattern is not UTF-8", path);
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, len, opts, &ec, &eo, NULL);
    if (!re) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(ec, msg, sizeof(msg));
        return ds_error_set(err, -EBADMSG, "%s: pre_tokenizer regex at offset %zu: %s", path,
                            (size_t)eo, (const char *)msg);
    }
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* optional speed-up */
    *ret = re;
    return 0;
}

static bool json_is_true_or_missing(json_t *o, const char *k, bool dflt)
{
    json_t *v = json_object_get(o, k);
    if (!v || json_is_null(v))
        return dflt;
    return json_is_true(v);
}

static int add_step(ds_tokenizer *t, json_t *pt, const char *path, ds_error *err)
{
    const char *type = json_string_value(json_object_get(pt, "type"));
    if (!type)
        return ds_error_set(err, -EBADMSG, "%s: pre_tokenizer without a \"type\"", path);
    if (strcmp(type, "Sequence") == 0) {
        json_t *arr = json_object_get(pt, "pretokenizers");
        if (!json_is_array(arr))
            return ds_error_set(err, -EBADMSG, "%s: Sequence without \"pretokenizers\"", path);
        size_t i;
        json_t *el;
        json_array_foreach(arr, i, el)
        {
            if (!json_is_object(el))
                return ds_error_set(err, -EBADMSG, "%s: pretokenizers[%zu] not an object", path, i);
            const char *ty = json_string_value(json_object_get(el, "type"));
            if (ty && strcmp(ty, "Sequence") == 0)
                return ds_error_set(err, -EBADMSG, "%s: nested pre_tokenizer Sequence", path);
            int r = add_step(t, el, path, err);
            if (r < 0)
                return r;
        }
        return 0;
    }
    if (t->n_steps >= MAX_PRETOK_STEPS)
        return ds_error_set(err, -ERANGE, "%s: more than %d pre_tokenizer steps", path,
                            MAX_PRETOK_STEPS);
    if (t->n_steps > 0 && t->steps[t->n_steps - 1].byte_level)
        return ds_error_set(err, -EINVAL, "%s: pre_tokenizer %s after ByteLevel (unsupported)",
                            path, type);
    struct pretok_step *s = &t->steps[t->n_steps];
    memset(s, 0, sizeof(*s));
    if (strcmp(type, "ByteLevel") == 0) {
        s->byte_level = true;
        s->add_prefix_space = json_is_true_or_missing(pt, "add_prefix_space", false);
        s->behavior = SPLIT_ISOLATED;
        if (json_is_true_or_missing(pt, "use_regex", true)) {
            int r = compile_re(GPT2_PATTERN, strlen(GPT2_PATTERN), false, &s->re, path, err);
            if (r < 0)
                return r;
        }
        t->n_steps++;
        return 0;
    }
    if (strcmp(type, "Split") != 0)
        return ds_error_set(err, -EINVAL, "%s: pre_tokenizer type \"%s\" is not supported", path,
                            type);
    if (json_is_true(json_object_get(pt, "invert")))
        return ds_error_set(err, -EINVAL, "%s: Split with invert=true is not supported", path);
    const char *beh = json_string_value(json_object_get(pt, "behavior"));
    static const char *const names[] = {"Isolated", "Removed", "MergedWithPrevious",
                                        "MergedWithNext", "Contiguous"};
    s->behavior = -1;
    for (int i = 0; beh && i < 5; i++)
        if (strcmp(beh, names[i]) == 0)
            s->behavior = i;
    if (s->behavior < 0)
        return ds_error_set(err, -EINVAL, "%s: Split behavior \"%s\" is not supported", path,
                            beh ? beh : "(missing)");
    json_t *pat = json_object_get(pt, "pattern");
    json_t *rx = json_object_get(pat, "Regex"), *lit = json_object_get(pat, "String");
    json_t *p = rx ? rx : lit;
    if (!json_is_string(p))
        return ds_error_set(err, -EBADMSG, "%s: Split pattern needs \"Regex\" or \"String\"", path);
    int r = compile_re(json_string_value(p), json_string_length(p), !rx, &s->re, path, err);
    if (r < 0)
        return r;
    t->n_steps++;
    return 0;
}

/* Splits "a b" or ["a", "b"] into two freshly allocated strings. */
static int merge_parts(json_t *m, char **a, char **b)
{
    if (json_is_string(m)) {
        const char *s = json_string_value(m);
        const char *sp = strchr(s, ' ');
        if (!sp || strchr(sp + 1, ' '))
            return -EBADMSG;
        *a = strndup(s, (size_t)(sp - s));
        *b = strdup(sp + 1);
    } else if (json_is_array(m) && json_array_size(m) == 2 &&
               json_is_string(json_array_get(m, 0)) && json_is_string(json_array_get(m, 1))) {
        *a = strdup(json_string_value(json_array_get(m, 0)));
        *b = strdup(json_string_value(json_array_get(m, 1)));
    } else
        return -EBADMSG;
    if (!*a || !*b)
        return -ENOMEM;
    return 0;
}

static int set_token(ds_tokenizer *t, int64_t id, const char *s, const char *path, ds_error *err)
{
    if (id < 0 || id >= (int64_t)t->n_ids)
        return ds_error_set(err, -ERANGE, "%s: token id %lld out of range", path, (long long)id);
    if (t->tok_str[id] && strcmp(t->tok_str[id], s) != 0)
        return ds_error_set(err, -EBADMSG, "%s: id %lld given to both \"%s\" and \"%s\"", path,
                            (long long)id, t->tok_str[id], s);
    if (!t->tok_str[id] && !(t->tok_str[id] = strdup(s)))
        return -ENOMEM;
    return 0;
}

static int load_model(ds_tokenizer *t, json_t *root, const char *path, ds_error *err)
{
    json_t *model = json_object_get(root, "model");
    if (!json_is_object(model))
        return ds_error_set(err, -EBADMSG, "%s: no \"model\" object", path);
    const char *type = json_string_value(json_object_get(model, "type"));
    if (type && strcmp(type, "BPE") != 0)
        return ds_error_set(err, -EINVAL, "%s: model type \"%s\" is not supported (BPE only)", path,
                            type);
    const char *pfx = json_string_value(json_object_get(model, "continuing_subword_prefix"));
    const char *sfx = json_string_value(json_object_get(model, "end_of_word_suffix"));
    if ((pfx && *pfx) || (sfx && *sfx) || json_is_true(json_object_get(model, "byte_fallback")))
        return ds_error_set(
            err, -EINVAL, "%s: BPE subword prefix/suffix or byte_fallback is not supported", path);
    json_t *dropout = json_object_get(model, "dropout");
    if (dropout && !json_is_null(dropout) && json_number_value(dropout) != 0.0)
        return ds_error_set(err, -EINVAL, "%s: BPE dropout is not supported", path);
    t->ignore_merges = json_is_true(json_object_get(model, "ignore_merges"));

    json_t *vocab = json_object_get(model, "vocab");
    json_t *merges = json_object_get(model, "merges");
    json_t *added = json_object_get(root, "added_tokens");
    if (!json_is_object(vocab) || json_object_size(vocab) == 0)
        return ds_error_set(err, -EBADMSG, "%s: model.vocab missing or empty", path);
    if (merges && !json_is_array(merges))
        return ds_error_set(err, -EBADMSG, "%s: model.merges is not an array", path);
    if (added && !json_is_null(added) && !json_is_array(added))
        return ds_error_set(err, -EBADMSG, "%s: added_tokens is not an array", path);
    if (json_array_size(merges) > MAX_MERGES)
        return ds_error_set(err, -ERANGE, "%s: %zu merges, the limit is %u", path,
                            json_array_size(merges), MAX_MERGES);

    /* Ids: vocab values and added ids, all below DS_TOK_MAX_VOCAB. */
    int64_t max_id = -1;
    const char *k;
    json_t *v;
    json_object_foreach(vocab, k, v)
    {
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) >= DS_TOK_MAX_VOCAB)
            return ds_error_set(err, -ERANGE, "%s: vocab id of \"%.64s\" not in [0, %u)", path, k,
                                DS_TOK_MAX_VOCAB);
        if (json_integer_value(v) > max_id)
            max_id = json_integer_value(v);
    }
    size_t i;
    json_t *el;
    json_array_foreach(added, i, el)
    {
        json_t *id = json_object_get(el, "id");
        if (!json_is_integer(id) || json_integer_value(id) < 0 ||
            json_integer_value(id) >= DS_TOK_MAX_VOCAB ||
            !json_is_string(json_object_get(el, "content")))
            return ds_error_set(err, -EBADMSG,
                                "%s: added_tokens[%zu] needs an id in [0, %u) "
                                "and a content string",
                                path, i, DS_TOK_MAX_VOCAB);
        if (json_integer_value(id) > max_id)
            max_id = json_integer_value(id);
    }
    t->n_ids = (uint32_t)max_id + 1;
    t->tok_str = calloc(t->n_ids, sizeof(*t->tok_str));
    t->special = calloc(t->n_ids, 1);
    if (!t->tok_str || !t->special)
        return -ENOMEM;
    int r = str_map_init(&t->vocab, (uint32_t)json_object_size(vocab));
    if (r < 0)
        return r;
    json_object_foreach(vocab, k, v)
    {
        size_t kl = strlen(k);
        if (kl == 0 || kl > 4 * DS_TOK_MAX_TOKEN_BYTES)
            return ds_error_set(err, -ERANGE, "%s: vocab token of %zu bytes", path, kl);
        r = set_token(t, json_integer_value(v), k, path, err);
        if (r < 0)
            return r;
        if (!str_map_put(&t->vocab, t->tok_str[json_integer_value(v)],
                         (int32_t)json_integer_value(v)))
            return ds_error_set(err, -EBADMSG, "%s: vocab token \"%.64s\" twice", path, k);
    }

    t->n_added = (uint32_t)json_array_size(added);
    if (t->n_added) {
        t->added = calloc(t->n_added, sizeof(*t->added));
        if (!t->added)
            return -ENOMEM;
    }
    json_array_foreach(added, i, el)
    {
        struct added_token *a = &t->added[i];
        json_t *c = json_object_get(el, "content");
        a->len = (uint32_t)json_string_length(c);
        if (a->len == 0 || a->len > DS_TOK_MAX_TOKEN_BYTES)
            return ds_error_set(err, -ERANGE, "%s: added_tokens[%zu] content of %u bytes", path, i,
                                a->len);
        if (json_is_true(json_object_get(el, "single_word")))
            return ds_error_set(err, -EINVAL,
                                "%s: added_tokens[%zu] single_word=true is not supported", path, i);
        a->content = strndup(json_string_value(c), a->len);
        if (!a->content || strlen(a->content) != a->len)
            return a->content ? ds_error_set(err, -EBADMSG, "%s: added token with NUL", path)
                              : -ENOMEM;
        a->id = (int32_t)json_integer_value(json_object_get(el, "id"));
        a->special = json_is_true(json_object_get(el, "special"));
        a->normalized = json_is_true_or_missing(el, "normalized", !a->special);
        a->lstrip = json_is_true(json_object_get(el, "lstrip"));
        a->rstrip = json_is_true(json_object_get(el, "rstrip"));
        r = set_token(t, a->id, a->content, path, err);
        if (r < 0)
            return r;
        t->special[a->id] = a->special;
    }
    /* the first-byte index (counting sort, stable: file order within a byte) */
    if (t->n_added && !(t->first_idx = malloc(t->n_added * sizeof(uint32_t))))
        return -ENOMEM;
    memset(t->first_off, 0, sizeof(t->first_off));
    for (uint32_t ai = 0; ai < t->n_added; ai++)
        t->first_off[(uint8_t)t->added[ai].content[0] + 1]++;
    for (int b = 0; b < 256; b++)
        t->first_off[b + 1] += t->first_off[b];
    uint32_t fill[256];
    memcpy(fill, t->first_off, sizeof(fill));
    for (uint32_t ai = 0; ai < t->n_added; ai++)
        t->first_idx[fill[(uint8_t)t->added[ai].content[0]]++] = ai;

    /* Byte-level symbols: all 256 are needed to encode arbitrary text. */
    uint32_t cp_of[256];
    byte_map_build(cp_of);
    for (int b = 0; b < 256; b++) {
        char u[5] = {0};
        size_t n = utf8_put(cp_of[b], u);
        t->byte_id[b] = str_map_get(&t->vocab, u, n);
    }

    /* Merges: pair (left id, right id) -> (rank, merged id). */
    size_t nm = json_array_size(merges);
    t->pair_cap = 16;
    while (t->pair_cap < 2 * nm + 16)
        t->pair_cap <<= 1;
    t->pairs = malloc(t->pair_cap * sizeof(*t->pairs));
    if (!t->pairs)
        return -ENOMEM;
    for (uint32_t j = 0; j < t->pair_cap; j++)
        t->pairs[j].key = UINT64_MAX;
    json_array_foreach(merges, i, el)
    {
        char *a = NULL, *b = NULL;
        r = merge_parts(el, &a, &b);
        if (r < 0) {
            free(a);
            free(b);
            return r == -ENOMEM ? r
                                : ds_error_set(err, r,
                                               "%s: merges[%zu] is neither \"a b\" nor "
                                               "[\"a\", \"b\"]",
                                               path, i);
        }
        size_t la = strlen(a), lb = strlen(b);
        char *ab = malloc(la + lb + 1);
        if (!ab) {
            free(a);
            free(b);
            return -ENOMEM;
        }
        memcpy(ab, a, la);
        memcpy(ab + la, b, lb + 1);
        int32_t ia = str_map_get(&t->vocab, a, la), ib = str_map_get(&t->vocab, b, lb);
        int32_t iab = str_map_get(&t->vocab, ab, la + lb);
        free(ab);
        if (ia < 0 || ib < 0 || iab < 0) {
            r = ds_error_set(err, -EBADMSG,
                             "%s: merges[%zu] \"%.64s\" + \"%.64s\" uses a "
                             "token missing from the vocab",
                             path, i, a, b);
            free(a);
            free(b);
            return r;
        }
        free(a);
        free(b);
        uint64_t key = ((uint64_t)(uint32_t)ia << 32) | (uint32_t)ib;
        uint32_t h = (uint32_t)hash_u64(key) & (t->pair_cap - 1);
        while (t->pairs[h].key != UINT64_MAX && t->pairs[h].key != key)
            h = (h + 1) & (t->pair_cap - 1);
        if (t->pairs[h].key == key)
            continue; /* a repeated merge keeps its first (best) rank */
        t->pairs[h] = (struct pair_entry){.key = key, .rank = (uint32_t)i, .merged = iab};
    }
    return 0;
}

/* Decoded bytes of each id (ByteLevel decoder rule, see the file comment). */
static int build_decode(ds_tokenizer *t, const char *path, ds_error *err)
{
    uint32_t cp_of[256];
    int16_t byte_of[512];
    byte_map_build(cp_of);
    for (int i = 0; i < 512; i++)
        byte_of[i] = -1;
    for (int b = 0; b < 256; b++)
        byte_of[cp_of[b]] = (int16_t)b;
    size_t total = 0;
    for (uint32_t id = 0; id < t->n_ids; id++)
        total += t->tok_str[id] ? strlen(t->tok_str[id]) : 0;
    t->dec = malloc(total + 1);
    t->dec_off = malloc((t->n_ids + 1) * sizeof(*t->dec_off));
    if (!t->dec || !t->dec_off)
        return -ENOMEM;
    size_t o = 0;
    for (uint32_t id = 0; id < t->n_ids; id++) {
        t->dec_off[id] = (uint32_t)o;
        const char *s = t->tok_str[id];
        if (!s)
            continue;
        size_t n = strlen(s), start = o;
        bool mapped = valid_utf8(s, n);
        for (size_t i = 0; mapped && i < n;) {
            int k = utf8_seq((const uint8_t *)s + i, n - i);
            uint32_t cp = utf8_get((const uint8_t *)s + i, k);
            if (cp >= 512 || byte_of[cp] < 0) {
                mapped = false;
                break;
            }
            t->dec[o++] = (uint8_t)byte_of[cp];
            i += (size_t)k;
        }
        if (!mapped) {
            o = start;
            memcpy(t->dec + o, s, n);
            o += n;
        }
        if (o - start > DS_TOK_MAX_TOKEN_BYTES)
            return ds_error_set(err, -ERANGE, "%s: token %u decodes to %zu bytes (limit %u)", path,
                                id, o - start, DS_TOK_MAX_TOKEN_BYTES);
    }
    t->dec_off[t->n_ids] = (uint32_t)o;
    return 0;
}

static int32_t lookup_special(const ds_tokenizer *t, json_t *v)
{
    if (json_is_object(v))
        v = json_object_get(v, "content");
    if (!json_is_string(v))
        return -1;
    return ds_tokenizer_token_to_id(t, json_string_value(v));
}

/* Builds the tokenizer from a parsed tokenizer.json (root) and tokenizer_config.json (cfg, may
 * be NULL); name and cfg_name are used in errors. Takes neither reference. */
static int tok_from_json(json_t *root, json_t *cfg, const char *name, const char *cfg_name,
                         ds_tokenizer **ret, ds_error *err)
{
    ds_tokenizer *t = calloc(1, sizeof(*t));
    int r;
    *ret = NULL;
    if (!t)
        return -ENOMEM;
    t->bos = t->eos = -1;
    if (!json_is_object(root)) {
        r = ds_error_set(err, -EBADMSG, "%s: not a JSON object", name);
        goto fail;
    }
    json_t *norm = json_object_get(root, "normalizer");
    if (norm && !json_is_null(norm)) {
        r = ds_error_set(err, -EINVAL, "%s: normalizers are not supported", name);
        goto fail;
    }
    json_t *dec = json_object_get(root, "decoder");
    const char *dty = json_string_value(json_object_get(dec, "type"));
    if (dec && !json_is_null(dec) && (!dty || strcmp(dty, "ByteLevel") != 0)) {
        r = ds_error_set(err, -EINVAL, "%s: decoder \"%s\" is not supported (ByteLevel only)", name,
                         dty ? dty : "?");
        goto fail;
    }
    r = load_model(t, root, name, err);
    if (r < 0)
        goto fail;
    json_t *pt = json_object_get(root, "pre_tokenizer");
    if (!json_is_object(pt)) {
        r = ds_error_set(err, -EINVAL, "%s: a pre_tokenizer is required", name);
        goto fail;
    }
    r = add_step(t, pt, name, err);
    if (r < 0)
        goto fail;
    if (t->n_steps == 0 || !t->steps[t->n_steps - 1].byte_level) {
        r = ds_error_set(err, -EINVAL, "%s: the pre_tokenizer must end with ByteLevel", name);
        goto fail;
    }
    /* every byte that valid UTF-8 can hold needs its symbol (encode sanitises the text first,
     * so 0xC0, 0xC1 and 0xF5..0xFF never reach BPE; DeepSeek-LLM's vocab lacks them) */
    for (int b = 0; b < 256; b++)
        if (t->byte_id[b] < 0 && b != 0xC0 && b != 0xC1 && b < 0xF5) {
            r = ds_error_set(err, -EBADMSG, "%s: byte 0x%02x has no byte-level token", name, b);
            goto fail;
        }
    r = build_decode(t, name, err);
    if (r < 0)
        goto fail;
    if (cfg) {
        json_t *b = json_object_get(cfg, "bos_token"), *e = json_object_get(cfg, "eos_token");
        t->bos = lookup_special(t, b);
        t->eos = lookup_special(t, e);
        t->add_bos = json_is_true(json_object_get(cfg, "add_bos_token"));
        if (t->add_bos && t->bos < 0) {
            r = ds_error_set(err, -EBADMSG, "%s: add_bos_token without a known bos_token",
                             cfg_name);
            goto fail;
        }
    }
    *ret = t;
    return 0;
fail:
    if (r == -ENOMEM && err && !err->code)
        ds_error_set(err, r, "%s: out of memory", name);
    ds_tokenizer_free(t);
    return r;
}

int ds_tokenizer_load_files(const char *tokenizer_json, const char *config_path, ds_tokenizer **ret,
                            ds_error *err)
{
    json_t *root = NULL, *cfg = NULL;
    *ret = NULL;
    int r = load_json(tokenizer_json, DS_TOK_MAX_FILE_BYTES, false, &root, err);
    if (r >= 0 && config_path)
        r = load_json(config_path, 1u << 20, true, &cfg, err);
    if (r >= 0)
        r = tok_from_json(root, cfg, tokenizer_json, config_path, ret, err);
    json_decref(root);
    json_decref(cfg);
    return r;
}

/* ---- GGUF metadata (tokenizer.ggml.*) ----------------------------------------------------
 * llama.cpp's converter stores the HF tokenizer as arrays: tokens (the vocab spellings, id =
 * index), token_type, merges ("a b"), bos/eos ids, add_bos_token, and the pre-tokenizer by name
 * (tokenizer.ggml.pre). The same tokenizer.json structure is rebuilt from them — vocab, merges,
 * CONTROL / USER_DEFINED tokens as added tokens (special / not), the pre-tokenizer steps of that
 * name (the regexes of HF's tokenizer.json for those models, which are llama.cpp's
 * llama-vocab.cpp lists) — and goes through the loader above, so every check applies. */

static void split_step(json_t *seq, const char *regex)
{
    json_array_append_new(seq, json_pack("{s:s, s:{s:s}, s:s, s:b}", "type", "Split", "pattern",
                                         "Regex", regex, "behavior", "Isolated", "invert", 0));
}

/* The pre_tokenizer of a tokenizer.ggml.pre name, or NULL when the name is unknown. */
static json_t *gguf_pretok(const char *pre)
{
    static const char *const v3[] = {
        "\\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{"
        "P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!"
        "\\S)|\\s+",
        NULL};
    static const char *const llm[] = {
        "[\r\n]",
        "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ"
        "-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-"
        "ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴ"
        "ᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-"
        "ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻ"
        "Ȿ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆ"
        "ﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠"
        "-𑣟𞤀-𞥃]+",
        "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
        "\\s+$",
        "[一-龥ࠀ-一가-퟿]+",
        "\\p{N}+",
        NULL};
    static const char *const coder[] = {
        "[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥ࠀ-一가-퟿]+", "\\p{N}", NULL};
    const char *const *rx;
    if (!strcmp(pre, "gpt-2") || !strcmp(pre, "default"))
        return json_pack("{s:s, s:b, s:b}", "type", "ByteLevel", "add_prefix_space", 0, "use_regex",
                         1);
    else if (!strcmp(pre, "deepseek-v3"))
        rx = v3;
    else if (!strcmp(pre, "deepseek-llm"))
        rx = llm;
    else if (!strcmp(pre, "deepseek-coder"))
        rx = coder;
    else
        return NULL;
    json_t *seq = json_array();
    for (; *rx; rx++)
        split_step(seq, *rx);
    json_array_append_new(seq, json_pack("{s:s, s:b, s:b}", "type", "ByteLevel", "add_prefix_space",
                                         0, "use_regex", 0));
    return json_pack("{s:s, s:o}", "type", "Sequence", "pretokenizers", seq);
}

enum { GGUF_TOK_NORMAL = 1, GGUF_TOK_CONTROL = 3, GGUF_TOK_USER_DEFINED = 4 };

int ds_tokenizer_load_gguf(const ds_gguf *g, ds_tokenizer **ret, ds_error *err)
{
    const char *file = ds_gguf_file_path(g, 0);
    json_t *root = NULL, *cfg = NULL;
    char *tmp = NULL;
    ds_gguf_str s;
    const ds_gguf_kv *toks, *types = NULL, *merges = NULL;
    uint64_t n_tok, n_types = 0, n_merges = 0;
    int r;
    *ret = NULL;
    if ((r = ds_gguf_get_str(g, "tokenizer.ggml.model", &s, err)) < 0)
        return r;
    if (s.len != 4 || memcmp(s.ptr, "gpt2", 4))
        return ds_error_set(err, -EINVAL,
                            "%s: key 'tokenizer.ggml.model' = '%.*s', only gpt2 (byte-level BPE) "
                            "is supported",
                            file, (int)(s.len > 64 ? 64 : s.len), s.ptr);
    char pre[64] = "default";
    if (ds_gguf_kv_find(g, "tokenizer.ggml.pre")) {
        if ((r = ds_gguf_get_str(g, "tokenizer.ggml.pre", &s, err)) < 0)
            return r;
        if (s.len >= sizeof(pre))
            return ds_error_set(err, -ERANGE, "%s: key 'tokenizer.ggml.pre' longer than %zu bytes",
                                file, sizeof(pre) - 1);
        memcpy(pre, s.ptr, s.len);
        pre[s.len] = 0;
    }
    json_t *pt = gguf_pretok(pre);
    if (!pt)
        return ds_error_set(err, -ENOTSUP,
                            "%s: key 'tokenizer.ggml.pre' = '%s' is not supported (gpt-2, "
                            "deepseek-v3, deepseek-llm, deepseek-coder)",
                            file, pre);
    if ((r = ds_gguf_get_array(g, "tokenizer.ggml.tokens", &toks, &n_tok, err)) < 0)
        goto out;
    if (n_tok < 1 || n_tok > DS_TOK_MAX_VOCAB) {
        r = ds_error_set(err, -ERANGE, "%s: key 'tokenizer.ggml.tokens' has %llu tokens (1..%u)",
                         file, (unsigned long long)n_tok, DS_TOK_MAX_VOCAB);
        goto out;
    }
    if (ds_gguf_kv_find(g, "tokenizer.ggml.token_type") &&
        (r = ds_gguf_get_array(g, "tokenizer.ggml.token_type", &types, &n_types, err)) < 0)
        goto out;
    if (types && n_types != n_tok) {
        r = ds_error_set(err, -EBADMSG, "%s: %llu token types for %llu tokens", file,
                         (unsigned long long)n_types, (unsigned long long)n_tok);
        goto out;
    }
    if (ds_gguf_kv_find(g, "tokenizer.ggml.merges") &&
        (r = ds_gguf_get_array(g, "tokenizer.ggml.merges", &merges, &n_merges, err)) < 0)
        goto out;
    if (n_merges > MAX_MERGES) {
        r = ds_error_set(err, -ERANGE, "%s: %llu merges, the limit is %u", file,
                         (unsigned long long)n_merges, MAX_MERGES);
        goto out;
    }
    json_t *vocab = json_object(), *added = json_array(), *mj = json_array();
    root = json_pack("{s:o, s:n, s:o, s:{s:s}, s:{s:s, s:o, s:o}}", "pre_tokenizer", pt,
                     "normalizer", "added_tokens", added, "decoder", "type", "ByteLevel", "model",
                     "type", "BPE", "vocab", vocab, "merges", mj);
    pt = NULL;
    if (!root || !(tmp = malloc(4 * DS_TOK_MAX_TOKEN_BYTES + 1))) {
        r = -ENOMEM;
        goto out;
    }
    for (uint64_t i = 0; i < n_tok; i++) {
        int64_t ty = GGUF_TOK_NORMAL;
        if ((r = ds_gguf_kv_array_str(toks, i, &s, err)) < 0 ||
            (types && (r = ds_gguf_kv_array_i64(types, i, &ty, err)) < 0))
            goto out;
        if (s.len == 0 || s.len > 4 * DS_TOK_MAX_TOKEN_BYTES || memchr(s.ptr, 0, s.len)) {
            r = ds_error_set(err, -EBADMSG, "%s: token %llu is empty, too long or has a NUL byte",
                             file, (unsigned long long)i);
            goto out;
        }
        memcpy(tmp, s.ptr, s.len);
        tmp[s.len] = 0;
        if (ty == GGUF_TOK_CONTROL || ty == GGUF_TOK_USER_DEFINED) {
            bool special = ty == GGUF_TOK_CONTROL;
            json_array_append_new(added,
                                  json_pack("{s:I, s:s, s:b, s:b}", "id", (json_int_t)i, "content",
                                            tmp, "special", special, "normalized", 0));
        } else if (!json_object_get(vocab, tmp)) {
            json_object_set_new(vocab, tmp, json_integer((json_int_t)i));
        }
    }
    for (uint64_t i = 0; i < n_merges; i++) {
        if ((r = ds_gguf_kv_array_str(merges, i, &s, err)) < 0)
            goto out;
        if (s.len > 8 * DS_TOK_MAX_TOKEN_BYTES || memchr(s.ptr, 0, s.len)) {
            r = ds_error_set(err, -EBADMSG, "%s: merge %llu is too long or has a NUL byte", file,
                             (unsigned long long)i);
            goto out;
        }
        json_array_append_new(mj, json_stringn(s.ptr, s.len));
    }
    bool add_bos = false;
    int32_t bos = -1, eos = -1;
    if ((ds_gguf_kv_find(g, "tokenizer.ggml.add_bos_token") &&
         (r = ds_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &add_bos, err)) < 0) ||
        (ds_gguf_kv_find(g, "tokenizer.ggml.bos_token_id") &&
         (r = ds_gguf_get_i32(g, "tokenizer.ggml.bos_token_id", &bos, err)) < 0) ||
        (ds_gguf_kv_find(g, "tokenizer.ggml.eos_token_id") &&
         (r = ds_gguf_get_i32(g, "tokenizer.ggml.eos_token_id", &eos, err)) < 0))
        goto out;
    if (bos >= (int64_t)n_tok || eos >= (int64_t)n_tok || (add_bos && bos < 0)) {
        r = ds_error_set(err, -ERANGE, "%s: bos %d / eos %d outside the %llu tokens", file, bos,
                         eos, (unsigned long long)n_tok);
        goto out;
    }
    cfg = json_pack("{s:b}", "add_bos_token", add_bos);
    for (int k = 0; k < 2; k++) { /* by spelling for the loader; the ids are set after it */
        int32_t id = k ? eos : bos;
        if (id >= 0 && ds_gguf_kv_array_str(toks, (uint64_t)id, &s, err) == 0)
            json_object_set_new(cfg, k ? "eos_token" : "bos_token", json_stringn(s.ptr, s.len));
    }
    if ((r = tok_from_json(root, cfg, file, file, ret, err)) < 0)
        goto out;
    (*ret)->bos = bos; /* by id: a token's spelling need not be unique in a GGUF */
    (*ret)->eos = eos;
    r = 0;
out:
    json_decref(pt);
    json_decref(root);
    json_decref(cfg);
    free(tmp);
    return r;
}

static bool path_is_gguf(const char *path)
{
    FILE *f = fopen(path, "rbe");
    if (!f)
        return false;
    char m[4];
    bool yes = fread(m, 1, 4, f) == 4 && !memcmp(m, "GGUF", 4);
    fclose(f);
    return yes;
}

int ds_tokenizer_load(const char *dir, ds_tokenizer **ret, ds_error *err)
{
    char a[4096], b[4096];
    if (path_is_gguf(dir)) {
        ds_gguf *g = NULL;
        int r = ds_gguf_open_split(dir, &g, err);
        if (r >= 0)
            r = ds_tokenizer_load_gguf(g, ret, err);
        ds_gguf_free(g);
        return r;
    }
    if (snprintf(a, sizeof(a), "%s/tokenizer.json", dir) >= (int)sizeof(a) ||
        snprintf(b, sizeof(b), "%s/tokenizer_config.json", dir) >= (int)sizeof(b))
        return ds_error_set(err, -ENAMETOOLONG, "%s: path too long", dir);
    return ds_tokenizer_load_files(a, b, ret, err);
}

/* ---- lookups --------------------------------------------------------------------------- */

uint32_t ds_tokenizer_vocab_size(const ds_tokenizer *t)
{
    return t->n_ids;
}
int32_t ds_tokenizer_bos_id(const ds_tokenizer *t)
{
    return t->bos;
}
int32_t ds_tokenizer_eos_id(const ds_tokenizer *t)
{
    return t->eos;
}
bool ds_tokenizer_adds_bos(const ds_tokenizer *t)
{
    return t->add_bos;
}
bool ds_tokenizer_is_special(const ds_tokenizer *t, int32_t id)
{
    return id >= 0 && (uint32_t)id < t->n_ids && t->special[id];
}

const char *ds_tokenizer_id_to_token(const ds_tokenizer *t, int32_t id)
{
    if (id < 0 || (uint32_t)id >= t->n_ids)
        return NULL;
    return t->tok_str[id];
}

int32_t ds_tokenizer_token_to_id(const ds_tokenizer *t, const char *token)
{
    for (uint32_t i = 0; i < t->n_added; i++)
        if (strcmp(t->added[i].content, token) == 0)
            return t->added[i].id;
    return str_map_get(&t->vocab, token, strlen(token));
}

/* ---- encode ---------------------------------------------------------------------------- */

struct ids_buf {
    int32_t *v;
    size_t n, cap;
};

static int ids_push(struct ids_buf *b, int32_t id)
{
    if (b->n == b->cap) {
        size_t nc = b->cap ? 2 * b->cap : 64;
        int32_t *nv = realloc(b->v, nc * sizeof(*nv));
        if (!nv)
            return -ENOMEM;
        b->v = nv;
        b->cap = nc;
    }
    b->v[b->n++] = id;
    return 0;
}

struct span {
    size_t off, len; /* into the working text */
};

struct spans {
    struct span *v;
    size_t n, cap;
};

static int spans_push(struct spans *s, size_t off, size_t len)
{
    if (s->n == s->cap) {
        size_t nc = s->cap ? 2 * s->cap : 32;
        struct span *nv = realloc(s->v, nc * sizeof(*nv));
        if (!nv)
            return -ENOMEM;
        s->v = nv;
        s->cap = nc;
    }
    s->v[s->n++] = (struct span){off, len};
    return 0;
}

struct bpe_sym {
    int32_t id;
    int32_t prev, next; /* indices, -1 at the ends */
};

struct bpe_cand {
    uint32_t rank;
    uint32_t pos; /* index of the left symbol */
};

static bool cand_less(const struct bpe_cand *a, const struct bpe_cand *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(struct bpe_cand *h, size_t *n, struct bpe_cand c)
{
    size_t i = (*n)++;
    h[i] = c;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!cand_less(&h[i], &h[p]))
            break;
        struct bpe_cand tmp = h[i];
        h[i] = h[p];
        h[p] = tmp;
        i = p;
    }
}

static struct bpe_cand heap_pop(struct bpe_cand *h, size_t *n)
{
    struct bpe_cand top = h[0];
    h[0] = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < *n && cand_less(&h[l], &h[m]))
            m = l;
        if (r < *n && cand_less(&h[r], &h[m]))
            m = r;
        if (m == i)
            break;
        struct bpe_cand tmp = h[i];
        h[i] = h[m];
        h[m] = tmp;
        i = m;
    }
    return top;
}

struct bpe_work {
    struct bpe_sym *sym;
    struct bpe_cand *heap;
    size_t cap;
    char *mapped; /* byte-level spelling of a piece (ignore_merges lookup) */
    size_t mapped_cap;
};

static void bpe_try_pair(const ds_tokenizer *t, struct bpe_work *w, size_t *hn, int32_t pos)
{
    if (pos < 0 || w->sym[pos].next < 0)
        return;
    const struct pair_entry *p = pair_get(t, w->sym[pos].id, w->sym[w->sym[pos].next].id);
    if (p)
        heap_push(w->heap, hn, (struct bpe_cand){p->rank, (uint32_t)pos});
}

static int bpe_piece(const ds_tokenizer *t, struct bpe_work *w, const uint8_t *s, size_t n,
                     struct ids_buf *out)
{
    if (n == 0)
        return 0;
    if (t->ignore_merges) {
        uint32_t cp_of[256];
        byte_map_build(cp_of);
        if (w->mapped_cap < 2 * n + 1) {
            free(w->mapped);
            w->mapped_cap = 2 * n + 1;
            if (!(w->mapped = malloc(w->mapped_cap)))
                return -ENOMEM;
        }
        size_t m = 0;
        for (size_t i = 0; i < n; i++)
            m += utf8_put(cp_of[s[i]], w->mapped + m);
        int32_t id = str_map_get(&t->vocab, w->mapped, m);
        if (id >= 0)
            return ids_push(out, id);
    }
    if (w->cap < n) {
        free(w->sym);
        free(w->heap);
        w->cap = n;
        w->sym = malloc(n * sizeof(*w->sym));
        w->heap = malloc(n * 2 * sizeof(*w->heap));
        if (!w->sym || !w->heap) {
            w->cap = 0;
            return -ENOMEM;
        }
    }
    for (size_t i = 0; i < n; i++)
        w->sym[i] =
            (struct bpe_sym){t->byte_id[s[i]], (int32_t)i - 1, i + 1 < n ? (int32_t)i + 1 : -1};
    /* The heap starts with at most n - 1 candidates; each applied merge pops one and pushes at
     * most 2, and there are at most n - 1 merges, so it never holds more than 2n. */
    size_t hn = 0;
    for (size_t i = 0; i + 1 < n; i++)
        bpe_try_pair(t, w, &hn, (int32_t)i);
    while (hn > 0) {
        struct bpe_cand c = heap_pop(w->heap, &hn);
        struct bpe_sym *a = &w->sym[c.pos];
        if (a->id < 0 || a->next < 0)
            continue;
        const struct pair_entry *p = pair_get(t, a->id, w->sym[a->next].id);
        if (!p || p->rank != c.rank)
            continue; /* stale: one side was merged away since */
        int32_t bi = a->next;
        a->id = p->merged;
        a->next = w->sym[bi].next;
        if (a->next >= 0)
            w->sym[a->next].prev = (int32_t)c.pos;
        w->sym[bi].id = -1;
        if (hn + 2 > 2 * w->cap)
            continue; /* cannot happen (see above); never overflow */
        bpe_try_pair(t, w, &hn, a->prev);
        bpe_try_pair(t, w, &hn, (int32_t)c.pos);
    }
    for (int32_t i = 0; i >= 0; i = w->sym[i].next) {
        int r = ids_push(out, w->sym[i].id);
        if (r < 0)
            return r;
    }
    return 0;
}

/* Applies one pre-tokenizer step to every piece of in, appending pieces to out. Pieces
 * created with a prefix space are appended to *text (which may move). */
static int pretok_apply(const struct pretok_step *st, char **text, size_t *text_len,
                        size_t *text_cap, const struct spans *in, struct spans *out,
                        pcre2_match_data *md)
{
    int r = 0;
    for (size_t p = 0; p < in->n; p++) {
        size_t off = in->v[p].off, len = in->v[p].len;
        if (len == 0)
            continue;
        if (st->byte_level && st->add_prefix_space && (*text)[off] != ' ') {
            if (*text_len + len + 1 > *text_cap) {
                size_t nc = 2 * (*text_len + len + 1);
                char *nt = realloc(*text, nc);
                if (!nt)
                    return -ENOMEM;
                *text = nt;
                *text_cap = nc;
            }
            (*text)[*text_len] = ' ';
            memmove(*text + *text_len + 1, *text + off, len);
            off = *text_len;
            len += 1;
            *text_len += len;
        }
        if (!st->re) {
            if ((r = spans_push(out, off, len)) < 0)
                return r;
            continue;
        }
        /* Matches and the gaps between them, in order, then folded by the behaviour. */
        struct mspan {
            size_t s, e;
            bool match;
        } *ms = NULL;
        size_t nms = 0, cms = 0, pos = 0;
        const char *subj = *text + off;
        for (;;) {
            size_t ms0 = len, me0 = len;
            while (pos < len) {
                int rc =
                    pcre2_match(st->re, (PCRE2_SPTR)subj, len, pos, PCRE2_NO_UTF_CHECK, md, NULL);
                if (rc < 0)
                    break;
                PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
                if (ov[1] > ov[0]) {
                    ms0 = ov[0];
                    me0 = ov[1];
                    break;
                }
                /* Empty match: search again from the next character. */
                size_t nx = ov[0] + 1;
                while (nx < len && ((uint8_t)subj[nx] & 0xC0) == 0x80)
                    nx++;
                pos = nx;
            }
            if (nms + 2 > cms) {
                size_t nc = cms ? 2 * cms : 16;
                struct mspan *nv = realloc(ms, nc * sizeof(*nv));
                if (!nv) {
                    free(ms);
                    return -ENOMEM;
                }
                ms = nv;
                cms = nc;
            }
            size_t gap_start = nms ? ms[nms - 1].e : 0;
            if (ms0 > gap_start)
                ms[nms++] = (struct mspan){gap_start, ms0, false};
            if (ms0 == len)
                break;
            ms[nms++] = (struct mspan){ms0, me0, true};
            pos = me0;
        }
        /* Fold (HF semantics): each entry becomes a piece or joins a neighbour. */
        size_t first = out->n;
        bool prev_match = false;
        if (st->behavior == SPLIT_MERGED_NEXT) {
            /* Right to left: a match joins the piece after it unless that piece is a match
             * already joined. Build reversed, then reverse. */
            for (size_t i = nms; i-- > 0;) {
                if (ms[i].match && !prev_match && out->n > first) {
                    out->v[out->n - 1].off = off + ms[i].s;
                    out->v[out->n - 1].len += ms[i].e - ms[i].s;
                } else if ((r = spans_push(out, off + ms[i].s, ms[i].e - ms[i].s)) < 0)
                    break;
                prev_match = ms[i].match;
            }
            for (size_t a = first, b = out->n; r == 0 && a + 1 < b; a++, b--) {
                struct span tmp = out->v[a];
                out->v[a] = out->v[b - 1];
                out->v[b - 1] = tmp;
            }
        } else {
            for (size_t i = 0; i < nms && r == 0; i++) {
                bool m = ms[i].match;
                size_t l = ms[i].e - ms[i].s;
                if (m && st->behavior == SPLIT_REMOVED) {
                    /* dropped */
                } else if (m && st->behavior == SPLIT_MERGED_PREV && !prev_match &&
                           out->n > first) {
                    out->v[out->n - 1].len += l;
                } else if (m && st->behavior == SPLIT_CONTIGUOUS && prev_match && out->n > first) {
                    out->v[out->n - 1].len += l;
                } else
                    r = spans_push(out, off + ms[i].s, l);
                prev_match = m;
            }
        }
        free(ms);
        if (r < 0)
            return r;
    }
    return 0;
}

/* Replaces invalid UTF-8 with U+FFFD (one per maximal invalid subpart). */
static char *sanitize_utf8(const char *s, size_t n, size_t *out_len)
{
    char *o = malloc(3 * n + 1);
    if (!o)
        return NULL;
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        int l = utf8_seq((const uint8_t *)s + i, n - i);
        if (l > 0) {
            memcpy(o + k, s + i, (size_t)l);
            k += (size_t)l;
            i += (size_t)l;
        } else {
            memcpy(o + k, "\xEF\xBF\xBD", 3);
            k += 3;
            i += (size_t)-l;
        }
    }
    o[k] = '\0';
    *out_len = k;
    return o;
}

static bool is_ascii_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* Encodes a segment with no added tokens in it. */
static int encode_segment(const ds_tokenizer *t, char **text, size_t *text_len, size_t *text_cap,
                          size_t off, size_t len, struct bpe_work *w, pcre2_match_data **md,
                          struct ids_buf *out)
{
    struct spans a = {0}, b = {0};
    int r = spans_push(&a, off, len);
    for (uint32_t s = 0; r == 0 && s < t->n_steps; s++) {
        b.n = 0;
        r = pretok_apply(&t->steps[s], text, text_len, text_cap, &a, &b, md[s]);
        struct spans tmp = a;
        a = b;
        b = tmp;
    }
    for (size_t i = 0; r == 0 && i < a.n; i++)
        r = bpe_piece(t, w, (const uint8_t *)*text + a.v[i].off, a.v[i].len, out);
    free(a.v);
    free(b.v);
    return r;
}

/* Leftmost-longest added token (of the given normalized class) in text[from, to). */
static bool find_added(const ds_tokenizer *t, const char *text, size_t from, size_t to,
                       bool normalized, size_t *ms, size_t *me, int32_t *id)
{
    for (size_t i = from; i < to; i++) {
        const struct added_token *best = NULL;
        uint8_t b = (uint8_t)text[i];
        for (uint32_t q = t->first_off[b]; q < t->first_off[b + 1]; q++) {
            const struct added_token *a = &t->added[t->first_idx[q]];
            if (a->normalized != normalized || a->len > to - i)
                continue;
            if (memcmp(a->content, text + i, a->len) == 0 && (!best || a->len > best->len))
                best = a;
        }
        if (best) {
            size_t s = i, e = i + best->len;
            if (best->lstrip)
                while (s > from && is_ascii_space(text[s - 1]))
                    s--;
            if (best->rstrip)
                while (e < to && is_ascii_space(text[e]))
                    e++;
            *ms = s;
            *me = e;
            *id = best->id;
            return true;
        }
    }
    return false;
}

struct seg {
    size_t off, len;
    int32_t id; /* added token id, or -1 for text to pre-tokenize */
};

static int seg_push(struct seg **v, size_t *n, size_t *cap, struct seg s)
{
    if (*n == *cap) {
        size_t nc = *cap ? 2 * *cap : 16;
        struct seg *nv = realloc(*v, nc * sizeof(*nv));
        if (!nv)
            return -ENOMEM;
        *v = nv;
        *cap = nc;
    }
    (*v)[(*n)++] = s;
    return 0;
}

int ds_tokenizer_encode(const ds_tokenizer *t, const char *text_in, size_t len, bool add_special,
                        int32_t **ids, size_t *n, ds_error *err)
{
    *ids = NULL;
    *n = 0;
    if (len > DS_TOK_MAX_TEXT_BYTES)
        return ds_error_set(err, -ERANGE, "text of %zu bytes, the limit is %u", len,
                            DS_TOK_MAX_TEXT_BYTES);
    size_t text_len;
    char *text = sanitize_utf8(text_in ? text_in : "", text_in ? len : 0, &text_len);
    if (!text)
        return -ENOMEM;
    size_t text_cap = 3 * len + 1;
    struct ids_buf out = {0};
    struct bpe_work w = {0};
    pcre2_match_data *md[MAX_PRETOK_STEPS] = {0};
    struct seg *segs = NULL, *segs2 = NULL;
    size_t ns = 0, cs = 0, ns2 = 0, cs2 = 0;
    int r = 0;
    for (uint32_t s = 0; s < t->n_steps; s++)
        if (t->steps[s].re && !(md[s] = pcre2_match_data_create_from_pattern(t->steps[s].re, NULL)))
            r = -ENOMEM;
    if (r == 0 && add_special && t->add_bos)
        r = ids_push(&out, t->bos);
    /* Added tokens: the non-normalized class first, then the normalized one in what is left
     * (HF's order). */
    if (r == 0)
        r = seg_push(&segs, &ns, &cs, (struct seg){0, text_len, -1});
    for (int pass = 0; pass < 2 && r == 0; pass++) {
        ns2 = 0;
        for (size_t i = 0; i < ns && r == 0; i++) {
            if (segs[i].id >= 0) {
                r = seg_push(&segs2, &ns2, &cs2, segs[i]);
                continue;
            }
            size_t p = segs[i].off, end = segs[i].off + segs[i].len, ms, me;
            int32_t id;
            while (r == 0 && p < end && find_added(t, text, p, end, pass == 1, &ms, &me, &id)) {
                if (ms > p)
                    r = seg_push(&segs2, &ns2, &cs2, (struct seg){p, ms - p, -1});
                if (r == 0)
                    r = seg_push(&segs2, &ns2, &cs2, (struct seg){ms, me - ms, id});
                p = me;
            }
            if (r == 0 && p < end)
                r = seg_push(&segs2, &ns2, &cs2, (struct seg){p, end - p, -1});
        }
        struct seg *tv = segs;
        size_t tc = cs;
        segs = segs2;
        ns = ns2;
        cs = cs2;
        segs2 = tv;
        cs2 = tc;
    }
    for (size_t i = 0; i < ns && r == 0; i++) {
        if (segs[i].id >= 0)
            r = ids_push(&out, segs[i].id);
        else
            r = encode_segment(t, &text, &text_len, &text_cap, segs[i].off, segs[i].len, &w, md,
                               &out);
    }
    for (uint32_t s = 0; s < t->n_steps; s++)
        pcre2_match_data_free(md[s]);
    free(segs);
    free(segs2);
    free(w.sym);
    free(w.heap);
    free(w.mapped);
    free(text);
    if (r < 0) {
        free(out.v);
        return ds_error_set(err, r, "tokenizer encode: %s", strerror(-r));
    }
    if (!out.v && !(out.v = malloc(sizeof(int32_t))))
        return -ENOMEM;
    *ids = out.v;
    *n = out.n;
    return 0;
}

/* ---- decode ---------------------------------------------------------------------------- */

int ds_tokenizer_decode(const ds_tokenizer *t, const int32_t *ids, size_t n, bool skip_special,
                        char **out, size_t *out_len, ds_error *err)
{
    size_t total = 0;
    *out = NULL;
    *out_len = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || (uint32_t)ids[i] >= t->n_ids || !t->tok_str[ids[i]])
            return ds_error_set(err, -ERANGE, "token id %d at %zu is not in the vocab (size %u)",
                                ids[i], i, t->n_ids);
        if (!(skip_special && t->special[ids[i]]))
            total += t->dec_off[ids[i] + 1] - t->dec_off[ids[i]];
    }
    char *o = malloc(total + 1);
    if (!o)
        return -ENOMEM;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (skip_special && t->special[ids[i]])
            continue;
        size_t l = t->dec_off[ids[i] + 1] - t->dec_off[ids[i]];
        memcpy(o + k, t->dec + t->dec_off[ids[i]], l);
        k += l;
    }
    o[k] = '\0';
    *out = o;
    *out_len = k;
    return 0;
}

struct ds_tok_stream {
    const ds_tokenizer *t;
    bool skip_special;
    char held[8]; /* bytes of an incomplete UTF-8 sequence (at most 3) */
    size_t n_held;
    char *buf; /* output of the last call */
    size_t cap;
};

int ds_tok_stream_new(const ds_tokenizer *t, bool skip_special, ds_tok_stream **ret)
{
    ds_tok_stream *s = calloc(1, sizeof(*s));
    *ret = NULL;
    if (!s)
        return -ENOMEM;
    s->t = t;
    s->skip_special = skip_special;
    s->cap = DS_TOK_MAX_TOKEN_BYTES + 16;
    if (!(s->buf = malloc(s->cap))) {
        free(s);
        return -ENOMEM;
    }
    *ret = s;
    return 0;
}

ds_tok_stream *ds_tok_stream_free(ds_tok_stream *s)
{
    if (s) {
        free(s->buf);
        free(s);
    }
    return NULL;
}

/* Length of the tail of b[0..n) that is a valid but incomplete UTF-8 prefix (0 if none). */
static size_t incomplete_tail(const char *b, size_t n)
{
    for (size_t back = 1; back <= 3 && back <= n; back++) {
        uint8_t c = (uint8_t)b[n - back];
        if ((c & 0xC0) == 0x80)
            continue; /* continuation: keep looking for the lead byte */
        if (c < 0xC2 || c > 0xF4)
            return 0;
        /* A lead byte: is b[n-back..n) a proper prefix of a valid sequence? */
        int k = utf8_seq((const uint8_t *)b + n - back, back);
        return (k < 0 && (size_t)-k == back) ? back : 0;
    }
    return 0;
}

int ds_tok_stream_push(ds_tok_stream *s, int32_t id, const char **out, size_t *out_len,
                       ds_error *err)
{
    const ds_tokenizer *t = s->t;
    *out = s->buf;
    *out_len = 0;
    if (id < 0 || (uint32_t)id >= t->n_ids || !t->tok_str[id])
        return ds_error_set(err, -ERANGE, "token id %d is not in the vocab (size %u)", id,
                            t->n_ids);
    size_t n = s->n_held;
    memcpy(s->buf, s->held, n);
    if (!(s->skip_special && t->special[id])) {
        size_t l = t->dec_off[id + 1] - t->dec_off[id];
        memcpy(s->buf + n, t->dec + t->dec_off[id], l);
        n += l;
    }
    size_t tail = incomplete_tail(s->buf, n);
    memcpy(s->held, s->buf + n - tail, tail);
    s->n_held = tail;
    *out_len = n - tail;
    return 0;
}

int ds_tok_stream_flush(ds_tok_stream *s, const char **out, size_t *out_len)
{
    memcpy(s->buf, s->held, s->n_held);
    *out = s->buf;
    *out_len = s->n_held;
    s->n_held = 0;
    return 0;
}
