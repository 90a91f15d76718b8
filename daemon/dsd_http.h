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
#include "dsd_chat.h"
#include "dsd_http_req.h"

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
