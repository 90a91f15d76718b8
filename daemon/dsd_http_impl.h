/* dsd_http_impl.h — the HTTP server's state shared by its files (not a header for others):
 *   dsd_http.c          the server: routes, auth, limits, start/stop
 *   dsd_http_io.c       the shared helpers below
 *   dsd_http_gen.c      completions and chat completions: submit, tokens, SSE, disconnects
 *   dsd_http_metrics.c  /health, /v1/models, /metrics, /api/status
 * Only the metrics (under mu) are written by several connection threads. */
#ifndef DSD_HTTP_IMPL_H
#define DSD_HTTP_IMPL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include <microhttpd.h>

#include "ds_tokenizer.h"
#include "dsd.h"
#include "dsd_chat.h"
#include "dsd_http_req.h"

typedef struct dsd_http dsd_http;

#define DSD_HTTP_SLICE_MS 200
#define MAX_KEYS          256
#define N_BUCKETS         14

extern const double DSD_HTTP_BUCKETS[N_BUCKETS]; /* histogram bounds, seconds */

struct histogram {
    uint64_t counts[N_BUCKETS + 1]; /* the last: +Inf */
    double sum;
    uint64_t n;
};

/* What /metrics counts itself (the rest comes from the coordinator's status documents). */
struct metrics {
    uint64_t requests[3][6]; /* [endpoint][status class]: completions, chat, other x 2xx..5xx */
    uint64_t prompt_tokens, generation_tokens, disconnects;
    uint64_t finished[4]; /* stop, length, cancelled, error */
    struct histogram ttft, tpot, e2e;
};

struct dsd_http {
    struct MHD_Daemon *mhd;
    void *zctx;
    char client_ep[128];
    ds_tokenizer *tok;
    bool have_chat;
    dsd_chat_template chat;
    char chat_error[512];
    char bos[128], eos[128]; /* the template's bos_token / eos_token */
    char model_id[128];
    long long created;
    char (*keys)[128];
    size_t n_keys;
    size_t max_body;
    uint32_t ctx_len;
    int64_t step_timeout_ms;
    atomic_bool stopping;
    atomic_uint_fast64_t next_req;
    pthread_mutex_t mu;
    struct metrics m;
};

struct sbuf {
    char *p;
    size_t n, cap;
    bool oom;
};

/* ---- helpers (dsd_http_io.c) ---- */
uint64_t http_now_ns(void);
void http_hist_add(struct histogram *hg, double v);
/* Counts an answered request: endpoint 0 completions, 1 chat, 2 other. */
void http_count_request(struct dsd_http *h, int endpoint, unsigned status);
void http_sb_put(struct sbuf *b, const char *s, size_t l);
void http_sb_printf(struct sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Queue a response: body copied; o consumed; e in OpenAI's shape. */
enum MHD_Result http_reply(struct MHD_Connection *c, unsigned status, const char *type,
                           const char *body, size_t len);
enum MHD_Result http_reply_json(struct MHD_Connection *c, unsigned status, json_t *o);
enum MHD_Result http_reply_error(struct MHD_Connection *c, const dsd_http_error *e);
/* A DEALER on the coordinator's client ROUTER (inproc); NULL when it cannot connect. */
void *http_zsock_open(struct dsd_http *h);
int http_zsend(void *s, Dsd__Envelope *env);
/* One envelope within timeout_ms (sliced): -ETIMEDOUT, -ECONNRESET (the HTTP client of *fd
 * hung up), -ESHUTDOWN (the server stops), -EPROTO. fd may be NULL. */
int http_zrecv(struct dsd_http *h, void *s, int timeout_ms, int *fd, Dsd__Envelope **out);
/* A status document of the coordinator, or NULL with why. */
json_t *http_status_doc(struct dsd_http *h, const char *what, char *why, size_t wl);

/* ---- routes ---- */
enum MHD_Result http_handle_generate(struct dsd_http *h, struct MHD_Connection *c,
                                     enum dsd_http_kind kind, const char *body, size_t len);
enum MHD_Result http_handle_health(struct dsd_http *h, struct MHD_Connection *c);
enum MHD_Result http_handle_metrics(struct dsd_http *h, struct MHD_Connection *c);
enum MHD_Result http_handle_api_status(struct dsd_http *h, struct MHD_Connection *c);
json_t *http_model_obj(struct dsd_http *h);

#endif
