/* fuzz_http.c — the HTTP API's request parser (daemon/dsd_http_req.c) on arbitrary bodies,
 * chosen by the first byte: even a /v1/completions body, odd a /v1/chat/completions body. A
 * body is accepted or refused with a 4xx/5xx error that serialises to JSON, never a crash; an
 * accepted chat body is then rendered with each template family (the renderer sees the same
 * messages a request would give it) and the output must hold every message's content. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dsd_http.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *TEMPLATES[] = {
    "{{ 'User: ' + m }}{{ 'Assistant: ' }}{{ 'Assistant:' }}",
    "{{'<\xef\xbd\x9cUser\xef\xbd\x9c>'}}<\xef\xbd\x9c"
    "Assistant\xef\xbd\x9c> is_first_sp",
    "{{'<\xef\xbd\x9cUser\xef\xbd\x9c>'}}<\xef\xbd\x9c"
    "Assistant\xef\xbd\x9c> split('</think>') "
    "'<\xef\xbd\x9c"
    "Assistant\xef\xbd\x9c><think>\\n'",
    "{{'<\xef\xbd\x9cUser\xef\xbd\x9c>'}}<\xef\xbd\x9c"
    "Assistant\xef\xbd\x9c> thinking '</think>'",
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    enum dsd_http_kind kind = data[0] & 1 ? DSD_HTTP_KIND_CHAT : DSD_HTTP_KIND_COMPLETION;
    dsd_http_req r;
    dsd_http_error e = {0};
    if (dsd_http_req_parse(kind, (const char *)data + 1, size - 1, &r, &e) < 0) {
        if (e.status < 400 || e.status > 599 || !e.message[0])
            abort();
        char *js = dsd_http_error_json(&e);
        if (!js)
            abort();
        free(js);
        return 0;
    }
    if (kind == DSD_HTTP_KIND_COMPLETION && !r.prompt && !r.n_prompt_ids)
        abort();
    if (r.n_stop > DSD_HTTP_MAX_STOP)
        abort();
    if (kind == DSD_HTTP_KIND_CHAT) {
        for (size_t t = 0; t < sizeof(TEMPLATES) / sizeof(TEMPLATES[0]); t++) {
            dsd_chat_template ct;
            ds_error err = {0};
            if (dsd_chat_template_detect(TEMPLATES[t], strlen(TEMPLATES[t]), "fuzz", &ct, &err))
                abort();
            char *out;
            size_t len;
            if (dsd_chat_render(&ct, r.messages, r.n_messages, true, t & 1, "<s>", "</s>", &out,
                                &len, &err) == 0) {
                if (strlen(out) != len)
                    abort();
                /* the family's forms keep user text verbatim */
                for (size_t i = 0; i < r.n_messages; i++)
                    if (!strcmp(r.messages[i].role, "user") && !strstr(out, r.messages[i].content))
                        abort();
                free(out);
            }
        }
    }
    dsd_http_req_clear(&r);
    return 0;
}
