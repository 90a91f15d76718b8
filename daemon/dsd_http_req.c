/* dsd_http_req.c — an OpenAI request body checked and turned into a dsd_http_req.
 *
 * Pure: text in, a request or an error in OpenAI's shape out. Every field is type- and
 * range-checked before use; fields a client library sends by default with their neutral value
 * (frequency_penalty: 0, logprobs: false, n: 1, user) are accepted, a feature that is not
 * served (n > 1, penalties, logprobs, tools, echo) is refused with 400 naming the field, and
 * unknown fields are ignored, as OpenAI's servers do. fuzz_http feeds it arbitrary bodies. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dsd_http_req.h"

void dsd_http_error_set(dsd_http_error *e, int status, const char *type, const char *code,
                        const char *param, const char *fmt, ...)
{
    e->status = status;
    e->type = type;
    e->code = code;
    e->param = param;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof(e->message), fmt, ap);
    va_end(ap);
}

/* s with every byte that is not part of a well-formed UTF-8 sequence replaced by '?' (a
 * message may quote the client's bytes, and JSON text must be UTF-8). */
static void utf8_clean(const char *s, char *out, size_t n)
{
    size_t o = 0;
    const unsigned char *p = (const unsigned char *)s;
    while (*p && o + 5 < n) {
        unsigned c = *p;
        size_t k = c < 0x80                   ? 1
                   : (c >= 0xC2 && c <= 0xDF) ? 2
                   : (c >= 0xE0 && c <= 0xEF) ? 3
                   : (c >= 0xF0 && c <= 0xF4) ? 4
                                              : 0;
        bool ok = k > 0;
        for (size_t j = 1; ok && j < k; j++)
            ok = (p[j] & 0xC0) == 0x80;
        if (ok && k > 2)
            ok = !((c == 0xE0 && p[1] < 0xA0) || (c == 0xED && p[1] > 0x9F) ||
                   (c == 0xF0 && p[1] < 0x90) || (c == 0xF4 && p[1] > 0x8F));
        if (!ok) {
            out[o++] = '?';
            p++;
            continue;
        }
        memcpy(out + o, p, k);
        o += k;
        p += k;
    }
    out[o] = 0;
}

char *dsd_http_error_json(const dsd_http_error *e)
{
    char msg[sizeof(e->message) + 8];
    utf8_clean(e->message, msg, sizeof(msg));
    json_t *o = json_pack("{s:{s:s,s:s,s:o,s:o}}", "error", "message", msg, "type",
                          e->type ? e->type : "invalid_request_error", "param",
                          e->param ? json_string(e->param) : json_null(), "code",
                          e->code ? json_string(e->code) : json_null());
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    return s;
}

void dsd_http_req_clear(dsd_http_req *r)
{
    if (r->texts)
        for (size_t i = 0; i < r->n_messages; i++)
            free(r->texts[i]);
    free(r->texts);
    free(r->messages);
    free(r->prompt_ids);
    json_decref(r->root);
    memset(r, 0, sizeof(*r));
}

#define BAD(param, ...)                                                                            \
    do {                                                                                           \
        dsd_http_error_set(e, 400, "invalid_request_error", NULL, param, __VA_ARGS__);             \
        return -EINVAL;                                                                            \
    } while (0)

/* A number field: absent (keeps *v), null (keeps *v) or a number in [lo, hi]. */
static int get_num(json_t *root, const char *key, double lo, double hi, double *v, bool *given,
                   dsd_http_error *e)
{
    json_t *x = json_object_get(root, key);
    if (!x || json_is_null(x))
        return 0;
    if (!json_is_number(x))
        BAD(key, "'%s' must be a number", key);
    double d = json_number_value(x);
    if (!(d >= lo && d <= hi))
        BAD(key, "'%s' must be in [%g, %g]", key, lo, hi);
    *v = d;
    if (given)
        *given = true;
    return 0;
}

static int get_int(json_t *root, const char *key, int64_t lo, int64_t hi, int64_t *v,
                   dsd_http_error *e)
{
    json_t *x = json_object_get(root, key);
    if (!x || json_is_null(x))
        return 0;
    if (!json_is_integer(x))
        BAD(key, "'%s' must be an integer", key);
    json_int_t d = json_integer_value(x);
    if (d < lo || d > hi)
        BAD(key, "'%s' must be in [%lld, %lld]", key, (long long)lo, (long long)hi);
    *v = d;
    return 0;
}

static int get_bool(json_t *root, const char *key, bool *v, dsd_http_error *e)
{
    json_t *x = json_object_get(root, key);
    if (!x || json_is_null(x))
        return 0;
    if (!json_is_boolean(x))
        BAD(key, "'%s' must be true or false", key);
    *v = json_is_true(x);
    return 0;
}

/* Fields OpenAI defines that are not served: accepted only with their neutral value. */
static int refuse_unsupported(json_t *root, dsd_http_error *e)
{
    static const char *zero_nums[] = {"frequency_penalty", "presence_penalty"};
    for (size_t i = 0; i < sizeof(zero_nums) / sizeof(zero_nums[0]); i++) {
        json_t *x = json_object_get(root, zero_nums[i]);
        if (x && !json_is_null(x) && !(json_is_number(x) && json_number_value(x) == 0))
            BAD(zero_nums[i], "'%s' is not supported (only 0)", zero_nums[i]);
    }
    json_t *x = json_object_get(root, "logprobs");
    if (x && !json_is_null(x) && !json_is_false(x))
        BAD("logprobs", "'logprobs' is not supported");
    x = json_object_get(root, "top_logprobs");
    if (x && !json_is_null(x))
        BAD("top_logprobs", "'top_logprobs' is not supported");
    x = json_object_get(root, "echo");
    if (x && !json_is_null(x) && !json_is_false(x))
        BAD("echo", "'echo' is not supported");
    x = json_object_get(root, "best_of");
    if (x && !json_is_null(x) && !(json_is_integer(x) && json_integer_value(x) == 1))
        BAD("best_of", "'best_of' must be 1");
    x = json_object_get(root, "tools");
    if (x && !json_is_null(x) && !(json_is_array(x) && json_array_size(x) == 0))
        BAD("tools", "tool calling is not supported");
    x = json_object_get(root, "response_format");
    if (x && !json_is_null(x)) {
        const char *t = json_string_value(json_object_get(x, "type"));
        if (!t || strcmp(t, "text"))
            BAD("response_format", "only response_format {\"type\": \"text\"} is supported");
    }
    int64_t n = 1;
    if (get_int(root, "n", 1, 1, &n, e) < 0) {
        dsd_http_error_set(e, 400, "invalid_request_error", NULL, "n", "only n = 1 is supported");
        return -EINVAL;
    }
    return 0;
}

static int parse_stop(json_t *root, dsd_http_req *r, dsd_http_error *e)
{
    json_t *x = json_object_get(root, "stop");
    if (!x || json_is_null(x))
        return 0;
    if (json_is_string(x)) {
        if (!json_string_length(x) || json_string_length(x) > 256 ||
            strlen(json_string_value(x)) != json_string_length(x))
            BAD("stop", "a stop string has 1..256 bytes");
        r->stop[r->n_stop++] = json_string_value(x);
        return 0;
    }
    if (!json_is_array(x))
        BAD("stop", "'stop' must be a string or an array of strings");
    if (json_array_size(x) > DSD_HTTP_MAX_STOP)
        BAD("stop", "at most %d stop strings", DSD_HTTP_MAX_STOP);
    size_t i;
    json_t *s;
    json_array_foreach(x, i, s)
    {
        if (!json_is_string(s) || !json_string_length(s) || json_string_length(s) > 256 ||
            strlen(json_string_value(s)) != json_string_length(s))
            BAD("stop", "stop[%zu]: a stop string has 1..256 bytes", i);
        r->stop[r->n_stop++] = json_string_value(s);
    }
    return 0;
}

/* An array of token ids (a completion's prompt given as ids). */
static int parse_ids(json_t *a, dsd_http_req *r, dsd_http_error *e)
{
    size_t n = json_array_size(a);
    if (!n)
        BAD("prompt", "'prompt' is empty");
    if (n > DSD_HTTP_MAX_PROMPT_IDS)
        BAD("prompt", "'prompt' has more than %u token ids", DSD_HTTP_MAX_PROMPT_IDS);
    r->prompt_ids = malloc(n * sizeof(uint32_t));
    if (!r->prompt_ids) {
        dsd_http_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
        return -ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(a, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) > (json_int_t)UINT32_MAX)
            BAD("prompt", "prompt[%zu]: a token id is an integer >= 0", i);
        r->prompt_ids[i] = (uint32_t)json_integer_value(v);
    }
    r->n_prompt_ids = n;
    return 0;
}

static int parse_prompt(json_t *root, dsd_http_req *r, dsd_http_error *e)
{
    json_t *p = json_object_get(root, "prompt");
    if (!p || json_is_null(p))
        BAD("prompt", "'prompt' is required");
    if (json_is_array(p) && json_array_size(p) == 1 &&
        (json_is_string(json_array_get(p, 0)) || json_is_array(json_array_get(p, 0))))
        p = json_array_get(p, 0); /* a batch of one */
    if (json_is_string(p)) {
        if (!json_string_length(p))
            BAD("prompt", "'prompt' is empty");
        if (strlen(json_string_value(p)) != json_string_length(p))
            BAD("prompt", "'prompt' contains a NUL character");
        r->prompt = json_string_value(p);
        return 0;
    }
    if (json_is_array(p)) {
        json_t *first = json_array_get(p, 0);
        if (first && (json_is_string(first) || json_is_array(first)))
            BAD("prompt", "a batch of several prompts is not supported (send one per request)");
        return parse_ids(p, r, e);
    }
    BAD("prompt", "'prompt' must be a string, an array of token ids, or an array of one of "
                  "those");
}

/* A message's content: a string, or an array of parts of which only {"type":"text"} are
 * understood (joined without separator, as the templates see one string). */
static int message_text(json_t *c, size_t i, const char **out, char **owned, dsd_http_error *e)
{
    *owned = NULL;
    if (json_is_string(c)) {
        if (strlen(json_string_value(c)) != json_string_length(c))
            BAD("messages", "messages[%zu].content contains a NUL character", i);
        *out = json_string_value(c);
        return 0;
    }
    if (!json_is_array(c))
        BAD("messages", "messages[%zu].content must be a string or an array of text parts", i);
    size_t len = 0, k;
    json_t *part;
    json_array_foreach(c, k, part)
    {
        const char *type = json_string_value(json_object_get(part, "type"));
        json_t *t = json_object_get(part, "text");
        if (!type || strcmp(type, "text") || !json_is_string(t))
            BAD("messages", "messages[%zu].content[%zu]: only text parts are supported", i, k);
        if (strlen(json_string_value(t)) != json_string_length(t))
            BAD("messages", "messages[%zu].content[%zu] contains a NUL character", i, k);
        len += json_string_length(t);
        if (len > DSD_CHAT_MAX_BYTES)
            BAD("messages", "messages[%zu].content is too long", i);
    }
    char *s = malloc(len + 1);
    if (!s) {
        dsd_http_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
        return -ENOMEM;
    }
    size_t at = 0;
    json_array_foreach(c, k, part)
    {
        json_t *t = json_object_get(part, "text");
        memcpy(s + at, json_string_value(t), json_string_length(t));
        at += json_string_length(t);
    }
    s[at] = 0;
    *out = *owned = s;
    return 0;
}

static int parse_messages(json_t *root, dsd_http_req *r, dsd_http_error *e)
{
    json_t *ms = json_object_get(root, "messages");
    if (!json_is_array(ms))
        BAD("messages", "'messages' must be an array");
    size_t n = json_array_size(ms);
    if (!n)
        BAD("messages", "'messages' is empty");
    if (n > DSD_HTTP_MAX_MESSAGES)
        BAD("messages", "at most %d messages", DSD_HTTP_MAX_MESSAGES);
    r->messages = calloc(n, sizeof(*r->messages));
    r->texts = calloc(n, sizeof(*r->texts));
    if (!r->messages || !r->texts) {
        dsd_http_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
        return -ENOMEM;
    }
    r->n_messages = n;
    for (size_t i = 0; i < n; i++) {
        json_t *m = json_array_get(ms, i);
        if (!json_is_object(m))
            BAD("messages", "messages[%zu] must be an object", i);
        const char *role = json_string_value(json_object_get(m, "role"));
        if (!role)
            BAD("messages", "messages[%zu].role must be a string", i);
        if (strcmp(role, "system") && strcmp(role, "user") && strcmp(role, "assistant") &&
            strcmp(role, "tool") && strcmp(role, "developer"))
            BAD("messages", "messages[%zu].role '%.32s' is not system, user, assistant or tool", i,
                role);
        json_t *tc = json_object_get(m, "tool_calls");
        if (tc && !json_is_null(tc) && !(json_is_array(tc) && !json_array_size(tc)))
            BAD("messages", "messages[%zu]: tool calls are not supported", i);
        json_t *c = json_object_get(m, "content");
        if (!c || json_is_null(c))
            BAD("messages", "messages[%zu].content is required", i);
        /* OpenAI's newer name for the system role */
        r->messages[i].role = strcmp(role, "developer") ? role : "system";
        if (message_text(c, i, &r->messages[i].content, &r->texts[i], e) < 0)
            return -EINVAL;
    }
    return 0;
}

int dsd_http_req_parse(enum dsd_http_kind kind, const char *body, size_t len, dsd_http_req *r,
                       dsd_http_error *e)
{
    memset(r, 0, sizeof(*r));
    r->kind = kind;
    r->top_p = 1;
    json_error_t je;
    r->root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
    if (!r->root) {
        dsd_http_error_set(e, 400, "invalid_request_error", NULL, NULL,
                           "the body is not JSON: %s (line %d, column %d)", je.text, je.line,
                           je.column);
        return -EINVAL;
    }
    json_t *root = r->root;
    int rc = -EINVAL;
#undef BAD
#define BAD(param, ...)                                                                            \
    do {                                                                                           \
        dsd_http_error_set(e, 400, "invalid_request_error", NULL, param, __VA_ARGS__);             \
        goto fail;                                                                                 \
    } while (0)
    if (!json_is_object(root))
        BAD(NULL, "the body must be a JSON object");
    json_t *model = json_object_get(root, "model");
    if (model && !json_is_null(model) && !json_is_string(model))
        BAD("model", "'model' must be a string");
    r->model = json_string_value(model);
    if (refuse_unsupported(root, e) < 0)
        goto fail;
    double temp = 1, top_p = 1, topk = 0, seed = 0;
    int64_t max_tokens = 0;
    bool has_temp = false, has_seed = false;
    if (get_num(root, "temperature", 0, 2, &temp, &has_temp, e) < 0 ||
        get_num(root, "top_p", 0, 1, &top_p, NULL, e) < 0 ||
        get_num(root, "top_k", -1, 1 << 20, &topk, NULL, e) < 0 ||
        get_num(root, "seed", -9.2e18, 1.8e19, &seed, &has_seed, e) < 0 ||
        get_int(root, "max_tokens", 1, 1 << 24, &max_tokens, e) < 0 ||
        get_int(root, "max_completion_tokens", 1, 1 << 24, &max_tokens, e) < 0 ||
        get_bool(root, "stream", &r->stream, e) < 0 ||
        get_bool(root, "return_token_ids", &r->return_token_ids, e) < 0 ||
        get_bool(root, "ignore_eos", &r->ignore_eos, e) < 0)
        goto fail;
    if (top_p == 0)
        BAD("top_p", "'top_p' must be in (0, 1]");
    if (topk != floor(topk))
        BAD("top_k", "'top_k' must be an integer");
    json_t *so = json_object_get(root, "stream_options");
    if (so && !json_is_null(so)) {
        if (!json_is_object(so))
            BAD("stream_options", "'stream_options' must be an object");
        if (get_bool(so, "include_usage", &r->include_usage, e) < 0)
            goto fail;
    }
    /* OpenAI's default temperature is 1; a client that wants greedy decoding says 0 */
    r->temperature = has_temp ? temp : 1;
    r->top_p = top_p;
    r->top_k = topk > 0 ? (int64_t)topk : 0;
    if (has_seed) {
        r->has_seed = true;
        r->seed = seed < 0 ? (uint64_t)(int64_t)seed : (uint64_t)seed;
    }
    r->max_tokens = max_tokens;
    if (parse_stop(root, r, e) < 0)
        goto fail;
    if (kind == DSD_HTTP_KIND_COMPLETION) {
        if (parse_prompt(root, r, e) < 0)
            goto fail;
    } else {
        json_t *ct = json_object_get(root, "chat_template_kwargs");
        if (ct && !json_is_null(ct)) {
            if (!json_is_object(ct))
                BAD("chat_template_kwargs", "'chat_template_kwargs' must be an object");
            if (get_bool(ct, "thinking", &r->thinking, e) < 0)
                goto fail;
        }
        if (parse_messages(root, r, e) < 0)
            goto fail;
    }
    return 0;
fail:
    if (e->status == 500)
        rc = -ENOMEM;
    dsd_http_req_clear(r);
    return rc;
#undef BAD
}
