/* dsd_http_req.h — an HTTP request body (JSON) checked and turned into a dsd_http_req, or an
 * OpenAI-shaped error with its HTTP status (dsd_http_req.c). Pure: no sockets, no clocks. */
#ifndef DSD_HTTP_REQ_H
#define DSD_HTTP_REQ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "ds_err.h"
#include "dsd_chat.h"

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

#endif
