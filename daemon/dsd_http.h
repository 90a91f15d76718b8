/* dsd_http.h — the coordinator's OpenAI-compatible HTTP front door (not a public header).
 *
 * Three layers, the lower two pure (no sockets, no clocks, fuzzed and unit tested alone):
 *   dsd_chat.c      the chat templates of the DeepSeek family, recognised by their content
 *                   and rendered in C (there is no Jinja here)
 *   dsd_http_req.c  a request body (JSON) checked and turned into a dsd_http_req, or an
 *                   OpenAI-shaped error with its HTTP status
 *   dsd_http.c      the server (libmicrohttpd, a thread per connection): routes, auth, limits,
 *                   SSE, /health, /metrics, the status page. A request becomes a Submit on
 *                   the coordinator's client socket over inproc ZeroMQ, exactly as a
 *                   libdsclient client's would, so the event loop never waits on HTTP.
 */
#ifndef DSD_HTTP_H
#define DSD_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "ds_err.h"

/* ---- chat templates (dsd_chat.c) ---------------------------------------------------------- */

enum dsd_chat_family {
    DSD_CHAT_FAMILY_V2,  /* "User: ...\n\nAssistant: ..." (DeepSeek-V2-Chat) */
    DSD_CHAT_FAMILY_V3,  /* <｜User｜>/<｜Assistant｜> (DeepSeek-V2.5, V3) */
    DSD_CHAT_FAMILY_R1,  /* V3's form, reasoning stripped from the history (DeepSeek-R1) */
    DSD_CHAT_FAMILY_V31, /* V3.1: <think>/</think> after <｜Assistant｜>, `thinking` switch */
};

typedef struct dsd_chat_template {
    enum dsd_chat_family family;
    bool system_concat;  /* several system messages joined with "\n\n" (else the last wins) */
    bool strip_think;    /* assistant history keeps only the text after its last </think> */
    bool gen_think;      /* the generation prompt ends with "<think>\n" (R1-0528) */
    bool tool_output_nl; /* "\n" before every tool output but the first */
    char name[16];       /* "deepseek-v3", ... for logs and /v1/models */
} dsd_chat_template;

/* One message of a conversation; content is UTF-8 text (parts already joined). */
typedef struct dsd_chat_msg {
    const char *role; /* system | user | assistant | tool */
    const char *content;
} dsd_chat_msg;

/* Recognises a chat template (Jinja text from tokenizer_config.json `chat_template` or GGUF
 * `tokenizer.chat_template`) by what it contains. -ENOTSUP with err naming the way out
 * (chat_template_file) when it is not one of the forms above; source names it in the message. */
int dsd_chat_template_detect(const char *text, size_t len, const char *source, dsd_chat_template *t,
                             ds_error *err);
/* Renders messages as the template would with HF's apply_chat_template(tokenize=False).
 * thinking: V3.1's switch (others ignore it). *out is malloc'd, caller frees. -EINVAL with err
 * for a role the template does not know; -ERANGE past DSD_CHAT_MAX_BYTES. */
#define DSD_CHAT_MAX_BYTES (64u << 20)
int dsd_chat_render(const dsd_chat_template *t, const dsd_chat_msg *m, size_t n,
                    bool add_generation_prompt, bool thinking, const char *bos, const char *eos,
                    char **out, size_t *len, ds_error *err);

/* ---- requests (dsd_http_req.c) ------------------------------------------------------------ */

#define DSD_HTTP_MAX_STOP       15 /* the scheduler's 16 stop entries, one kept for eos */
#define DSD_HTTP_MAX_MESSAGES   4096
#define DSD_HTTP_MAX_PROMPT_IDS (1u << 20)

enum dsd_http_kind { DSD_HTTP_KIND_COMPLETION, DSD_HTTP_KIND_CHAT };

/* A checked request. Strings point into root (kept alive by the request). */
typedef struct dsd_http_req {
    enum dsd_http_kind kind;
    json_t *root;         /* the parsed body (owned) */
    const char *model;    /* NULL: the served model */
    const char *prompt;   /* completion: text, or NULL when prompt_ids */
    uint32_t *prompt_ids; /* completion: token ids given directly (owned), n_prompt_ids */
    size_t n_prompt_ids;
    dsd_chat_msg *messages; /* chat: [n_messages] (owned array; strings in root or texts) */
    size_t n_messages;
    char **texts;       /* joined content parts, owned [n_messages] (NULL entries when borrowed) */
    int64_t max_tokens; /* 0: not given */
    double temperature, top_p;
    int64_t top_k;
    uint64_t seed;
    bool has_seed;
    const char *stop[DSD_HTTP_MAX_STOP];
    uint32_t n_stop;
    bool stream, include_usage, return_token_ids, thinking;
    bool ignore_eos; /* vLLM's extension: generate past the end-of-sequence token */
} dsd_http_req;

/* An error for the client in OpenAI's shape; status is the HTTP status. */
typedef struct dsd_http_error {
    int status;        /* 400, 401, 404, 413, 429, 500, 503 */
    const char *type;  /* invalid_request_error | authentication_error | ... */
    const char *code;  /* NULL or model_not_found, context_length_exceeded, ... */
    const char *param; /* NULL or the offending field */
    char message[384];
} dsd_http_error;

/* Parses and checks a request body of `kind`. 0 with *r filled (free with dsd_http_req_clear),
 * or a negative errno with e filled (status 400: not JSON, a field of the wrong type or out of
 * range, n != 1, an unsupported feature). */
int dsd_http_req_parse(enum dsd_http_kind kind, const char *body, size_t len, dsd_http_req *r,
                       dsd_http_error *e);
void dsd_http_req_clear(dsd_http_req *r);
/* The error object {"error": {...}} as malloc'd JSON text. */
char *dsd_http_error_json(const dsd_http_error *e);
void dsd_http_error_set(dsd_http_error *e, int status, const char *type, const char *code,
                        const char *param, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));

/* ---- the server (dsd_http.c) -------------------------------------------------------------- */

struct dsd_opts;
typedef struct dsd_http dsd_http;

/* Starts the server on o->http_bind (loopback only without http_api_keys_file), its requests
 * going to the client ROUTER bound at client_ep (inproc) of zctx. Loads the tokenizer and chat
 * template of o->model (a missing or unknown template only disables chat, with a log line). */
int dsd_http_start(void *zctx, const struct dsd_opts *o, const char *client_ep, dsd_http **ret,
                   ds_error *err);
/* The chat template's Jinja text: the file `file` when given, else model's
 * tokenizer_config.json `chat_template` (a string, or the "default" of a list), else, for a
 * GGUF model, its `tokenizer.chat_template`. 0 with *text malloc'd (NULL when the model has
 * none) and src naming where it came from; an unreadable `file` is an error. */
int dsd_http_chat_template_find(const char *model, const char *file, char **text, size_t *len,
                                char *src, size_t srcn, ds_error *err);
/* Stops accepting, ends every connection, frees. NULL-safe; returns NULL. */
dsd_http *dsd_http_stop(dsd_http *h);

#endif
