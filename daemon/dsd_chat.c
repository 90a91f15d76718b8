/* dsd_chat.c — the chat templates of the DeepSeek family, rendered in C.
 *
 * A model ships its chat template as Jinja (tokenizer_config.json `chat_template`, GGUF
 * `tokenizer.chat_template`). Debian has no C Jinja, and the family's templates are few and
 * small, so a template is recognised by the literal pieces it emits and the switches it reads,
 * and rendered by the code of its form below. Anything else is refused rather than rendered
 * wrongly: a model answers well only with its own prompt format. Each form follows the
 * template's text, message by message; tests/test_chat.c compares the output with HF
 * transformers' apply_chat_template on the templates in tests/data/chat/. */
#include <errno.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "dsd_chat.h"

#define U_USER "<\xef\xbd\x9cUser\xef\xbd\x9c>"
#define U_ASSISTANT                                                                                \
    "<\xef\xbd\x9c"                                                                                \
    "Assistant\xef\xbd\x9c>"
#define U_EOS                                                                                      \
    "<\xef\xbd\x9c"                                                                                \
    "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>"
#define U_OUTS_BEG                                                                                 \
    "<\xef\xbd\x9ctool\xe2\x96\x81outputs\xe2\x96\x81"                                             \
    "begin\xef\xbd\x9c>"
#define U_OUTS_END                                                                                 \
    "<\xef\xbd\x9ctool\xe2\x96\x81outputs\xe2\x96\x81"                                             \
    "end\xef\xbd\x9c>"
#define U_OUT_BEG                                                                                  \
    "<\xef\xbd\x9ctool\xe2\x96\x81output\xe2\x96\x81"                                              \
    "begin\xef\xbd\x9c>"
#define U_OUT_END                                                                                  \
    "<\xef\xbd\x9ctool\xe2\x96\x81output\xe2\x96\x81"                                              \
    "end\xef\xbd\x9c>"

static bool has(const char *text, size_t len, const char *needle)
{
    return memmem(text, len, needle, strlen(needle)) != NULL;
}

int dsd_chat_template_detect(const char *text, size_t len, const char *source, dsd_chat_template *t,
                             ds_error *err)
{
    memset(t, 0, sizeof(*t));
    if (!text || !len)
        return ds_error_set(err, -ENOTSUP,
                            "%s has no chat template; set chat_template_file to a DeepSeek "
                            "chat template (docs/http.md)",
                            source);
    if (has(text, len, "'" U_USER "'") && has(text, len, U_ASSISTANT)) {
        t->system_concat = has(text, len, "is_first_sp");
        t->tool_output_nl = has(text, len, "'\\n" U_OUT_BEG "'");
        /* V3.1 reads a `thinking` switch and opens its answer with </think> */
        if (has(text, len, "thinking") && has(text, len, "'</think>'")) {
            t->family = DSD_CHAT_FAMILY_V31;
            snprintf(t->name, sizeof(t->name), "deepseek-v3.1");
        } else if (has(text, len, "split('</think>')")) {
            t->family = DSD_CHAT_FAMILY_R1;
            t->strip_think = true;
            t->gen_think = has(text, len, "'" U_ASSISTANT "<think>\\n'");
            snprintf(t->name, sizeof(t->name), "deepseek-r1");
        } else {
            t->family = DSD_CHAT_FAMILY_V3;
            snprintf(t->name, sizeof(t->name), "deepseek-v3");
        }
        return 0;
    }
    if (has(text, len, "'User: '") && has(text, len, "'Assistant: '") &&
        has(text, len, "'Assistant:'")) {
        t->family = DSD_CHAT_FAMILY_V2;
        snprintf(t->name, sizeof(t->name), "deepseek-v2");
        return 0;
    }
    return ds_error_set(err, -ENOTSUP,
                        "the chat template of %s is not one dsd renders (DeepSeek V2, V2.5, V3, "
                        "R1, V3.1 are); set chat_template_file to a file holding one of those "
                        "templates (docs/http.md)",
                        source);
}

/* ---- output buffer ------------------------------------------------------------------------ */

struct buf {
    char *p;
    size_t n, cap;
    int rc;
};

static void put(struct buf *b, const char *s)
{
    size_t l = strlen(s);
    if (b->rc)
        return;
    if (b->n + l + 1 > DSD_CHAT_MAX_BYTES) {
        b->rc = -ERANGE;
        return;
    }
    if (b->n + l + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + l + 1)
            cap *= 2;
        char *np = realloc(b->p, cap);
        if (!np) {
            b->rc = -ENOMEM;
            return;
        }
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, l);
    b->n += l;
    b->p[b->n] = 0;
}

/* The text after the last </think> (Python's content.split('</think>')[-1]), or after the
 * first one (split('</think>', 1)[1], V3.1). */
static const char *after_think(const char *c, bool last)
{
    const char *p = strstr(c, "</think>"), *r = NULL;
    while (p) {
        r = p + 8;
        if (!last)
            break;
        p = strstr(r, "</think>");
    }
    return r ? r : c;
}

static bool is_role(const dsd_chat_msg *m, const char *r)
{
    return m->role && !strcmp(m->role, r);
}

/* The system prompt of the V3 forms: every system message's text joined with "\n\n"
 * (system_concat), or the last one's. */
static void system_prompt(const dsd_chat_template *t, const dsd_chat_msg *m, size_t n,
                          struct buf *b)
{
    const char *last = NULL;
    bool first = true;
    for (size_t i = 0; i < n; i++) {
        if (!is_role(&m[i], "system"))
            continue;
        if (t->system_concat) {
            if (!first)
                put(b, "\n\n");
            put(b, m[i].content);
            first = false;
        } else
            last = m[i].content;
    }
    if (last)
        put(b, last);
}

static void render_v2(const dsd_chat_msg *m, size_t n, bool gen, const char *bos, const char *eos,
                      struct buf *b)
{
    put(b, bos);
    for (size_t i = 0; i < n; i++) {
        if (is_role(&m[i], "user")) {
            put(b, "User: ");
            put(b, m[i].content);
            put(b, "\n\n");
        } else if (is_role(&m[i], "assistant")) {
            put(b, "Assistant: ");
            put(b, m[i].content);
            put(b, eos);
        } else if (is_role(&m[i], "system")) {
            put(b, m[i].content);
            put(b, "\n\n");
        }
    }
    if (gen)
        put(b, "Assistant:");
}

static void render_v3(const dsd_chat_template *t, const dsd_chat_msg *m, size_t n, bool gen,
                      const char *bos, struct buf *b)
{
    bool is_tool = false, output_first = true;
    put(b, bos);
    system_prompt(t, m, n, b);
    for (size_t i = 0; i < n; i++) {
        if (is_role(&m[i], "user")) {
            is_tool = false;
            put(b, U_USER);
            put(b, m[i].content);
        } else if (is_role(&m[i], "assistant")) {
            if (is_tool) {
                put(b, U_OUTS_END);
                put(b, m[i].content);
                put(b, U_EOS);
                is_tool = false;
            } else {
                put(b, U_ASSISTANT);
                put(b, t->strip_think ? after_think(m[i].content, true) : m[i].content);
                put(b, U_EOS);
            }
        } else if (is_role(&m[i], "tool")) {
            is_tool = true;
            if (output_first) {
                put(b, U_OUTS_BEG);
                output_first = false;
            } else if (t->tool_output_nl)
                put(b, "\n");
            put(b, U_OUT_BEG);
            put(b, m[i].content);
            put(b, U_OUT_END);
        }
    }
    if (is_tool)
        put(b, U_OUTS_END);
    if (gen && !is_tool) {
        put(b, U_ASSISTANT);
        if (t->gen_think)
            put(b, "<think>\n");
    }
}

/* V3.1: the assistant turn after a user opens with <｜Assistant｜></think> (an answer without
 * reasoning); a generation prompt after a user ends with </think> or, thinking, <think>. */
static void render_v31(const dsd_chat_template *t, const dsd_chat_msg *m, size_t n, bool gen,
                       bool thinking, const char *bos, struct buf *b)
{
    bool is_tool = false, last_user = false;
    put(b, bos);
    system_prompt(t, m, n, b);
    for (size_t i = 0; i < n; i++) {
        if (is_role(&m[i], "user")) {
            is_tool = false;
            last_user = true;
            put(b, U_USER);
            put(b, m[i].content);
        } else if (is_role(&m[i], "assistant")) {
            if (last_user) {
                put(b, U_ASSISTANT);
                put(b, "</think>");
            }
            last_user = false;
            if (is_tool) {
                put(b, m[i].content);
                is_tool = false;
            } else
                put(b, after_think(m[i].content, false));
            put(b, U_EOS);
        } else if (is_role(&m[i], "tool")) {
            last_user = false;
            is_tool = true;
            put(b, U_OUT_BEG);
            put(b, m[i].content);
            put(b, U_OUT_END);
        }
    }
    if (gen && last_user && !is_tool) {
        put(b, U_ASSISTANT);
        put(b, thinking ? "<think>" : "</think>");
    }
}

int dsd_chat_render(const dsd_chat_template *t, const dsd_chat_msg *m, size_t n,
                    bool add_generation_prompt, bool thinking, const char *bos, const char *eos,
                    char **out, size_t *len, ds_error *err)
{
    for (size_t i = 0; i < n; i++) {
        if (!is_role(&m[i], "system") && !is_role(&m[i], "user") && !is_role(&m[i], "assistant") &&
            !(is_role(&m[i], "tool") && t->family != DSD_CHAT_FAMILY_V2))
            return ds_error_set(err, -EINVAL,
                                "messages[%zu]: role '%.32s' is not one the %s "
                                "template knows",
                                i, m[i].role ? m[i].role : "", t->name);
        if (!m[i].content)
            return ds_error_set(err, -EINVAL, "messages[%zu]: no content", i);
    }
    struct buf b = {0};
    put(&b, ""); /* an empty conversation still renders as a string */
    bos = bos ? bos : "";
    eos = eos ? eos : "";
    switch (t->family) {
    case DSD_CHAT_FAMILY_V2:
        render_v2(m, n, add_generation_prompt, bos, eos, &b);
        break;
    case DSD_CHAT_FAMILY_V3:
    case DSD_CHAT_FAMILY_R1:
        render_v3(t, m, n, add_generation_prompt, bos, &b);
        break;
    case DSD_CHAT_FAMILY_V31:
        render_v31(t, m, n, add_generation_prompt, thinking, bos, &b);
        break;
    }
    if (b.rc) {
        free(b.p);
        return ds_error_set(err, b.rc, "the rendered conversation is over %u bytes",
                            DSD_CHAT_MAX_BYTES);
    }
    *out = b.p;
    *len = b.n;
    return 0;
}
