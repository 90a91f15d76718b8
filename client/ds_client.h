/* ds_client.h — libdsclient: submit inference jobs to a dsd coordinator and stream tokens.
 *
 * One handle = one connection (a ZeroMQ DEALER) to the coordinator's client endpoint. Every
 * function is thread-safe: several threads may submit and pull tokens on one handle at once.
 * Errors are negative errno values; ds_client_error() gives the last message of the calling
 * handle (the server's words when the server refused the request):
 *   -ETIMEDOUT   nothing arrived in time          -EINVAL     request refused as malformed
 *   -EMSGSIZE    request or prompt too large      -EBUSY      too many jobs / not serving yet
 *   -ESRCH       unknown job                      -ENOENT     unknown node or unit
 *   -EPROTONOSUPPORT  protocol version mismatch   -EIO        server-side failure
 *   -ENOMEM      out of memory                    -ECANCELED  a callback asked to stop
 * Ownership: strings returned through char ** are malloc'd; the caller frees them. */
#ifndef DS_CLIENT_H
#define DS_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ds_client ds_client;

#define DS_CLIENT_MAX_TEXT 2048 /* bytes of text one token carries (the server sends less) */

typedef struct ds_client_opts {
    int timeout_ms;                /* per-call wait limit (0: 30000) */
    const char *server_public_key; /* CURVE: Z85 server key; NULL = plain TCP */
    const char *public_key;        /* CURVE: this client's Z85 key pair (NULL: ephemeral) */
    const char *secret_key;
    /* a Submit refused because the cluster is not serving yet (a plan being made or loaded,
     * e.g. after a node was lost) never started: it is sent again, every 100 ms, for up to
     * this long (0: refused at once, -EBUSY) */
    int submit_retry_ms;
} ds_client_opts;

typedef struct ds_client_request {
    const uint32_t *tokens; /* prompt token ids (n_tokens > 0), or */
    size_t n_tokens;
    const char *prompt;      /* text, tokenized by the coordinator (its model directory's
                              * tokenizer.json; BOS added as tokenizer_config.json says) */
    float temperature;       /* 0 = greedy */
    float top_p;             /* (0, 1]; 0 = off */
    uint32_t top_k;          /* 0 = off */
    uint64_t seed;           /* sampler seed (dsctl's default is 1) */
    uint32_t max_tokens;     /* > 0 */
    const char *const *stop; /* "eos", "id:N", or a stop string (1..256 bytes; needs the
                              * coordinator's tokenizer): generation stops when the text
                              * contains it; the text before it is sent, the string is not */
    size_t n_stop;
} ds_client_request;

typedef struct ds_client_token {
    uint64_t job;
    uint32_t id;            /* token id (meaningless when last && n == 0) */
    bool has_id;            /* false for a bare end-of-job notice (cancel, error) */
    bool last;              /* the job is over after this one */
    char finish_reason[16]; /* length | stop | cancelled | error when last */
    /* the text this token adds, decoded by the coordinator (empty without its tokenizer, for a
     * partial UTF-8 character, or while it may be the start of a stop string: it comes with a
     * later token). Concatenating every token's text gives the job's output. */
    char text[DS_CLIENT_MAX_TEXT];
    size_t text_len;
} ds_client_token;

/* Connects to endpoint (e.g. "tcp://127.0.0.1:7101"). opts may be NULL. */
int ds_client_connect(const char *endpoint, const ds_client_opts *opts, ds_client **ret);
/* Closes the handle; NULL-safe; returns NULL. Jobs still running are cancelled by the server
 * when it notices the client is gone. */
ds_client *ds_client_close(ds_client *c);
/* Last error message of this handle ("" when none): a copy for the calling thread, valid
 * until that thread calls ds_client_error again. */
const char *ds_client_error(ds_client *c);

/* Submits a job; *job receives its id once the coordinator has accepted it. */
int ds_client_submit(ds_client *c, const ds_client_request *req, uint64_t *job);
/* Pulls the next token of job (waits up to timeout_ms; < 0: the handle's timeout). */
int ds_client_next(ds_client *c, uint64_t job, ds_client_token *tok, int timeout_ms);
/* Callback mode: fn gets every token; returning non-zero cancels the job (-ECANCELED). */
typedef int (*ds_client_token_fn)(void *ctx, const ds_client_token *tok);
int ds_client_generate(ds_client *c, const ds_client_request *req, ds_client_token_fn fn, void *ctx,
                       uint64_t *job);
/* Cancels a job of this handle; its stream ends with finish_reason "cancelled" (or the reason
 * it ended with before the cancel arrived). Tokens it still generates are dropped: the next
 * pull after the coordinator has stopped it gives the final notice. */
int ds_client_cancel(ds_client *c, uint64_t job);
/* Status document (JSON) of "status", "cluster", "jobs", "placement", "devices",
 * "expert_stats"; *json is malloc'd. */
int ds_client_status(ds_client *c, const char *what, char **json);
/* Drains (undrain = false) or undrains a node; *json (may be NULL) gets the reply. */
int ds_client_drain(ds_client *c, const char *node, bool undrain, char **json);
/* Asks the coordinator to build and roll out a new plan (refused while jobs run). */
int ds_client_replan(ds_client *c, char **json);

#ifdef __cplusplus
}
#endif
#endif
