/* dsd_http.c — the coordinator's OpenAI-compatible HTTP server (libmicrohttpd).
 *
 * libmicrohttpd runs the sockets: an accept thread and a thread per connection (bounded by
 * http_max_connections), with limits on header memory, body size and idle time. A request is
 * answered on its connection's thread and never touches the event loop's state: it opens a
 * DEALER on the coordinator's client ROUTER over inproc ZeroMQ and speaks the client protocol
 * (Submit, Token, Cancel, StatusRequest), exactly as libdsclient does over TCP. The loop
 * therefore never waits on HTTP, and a job started here is scheduled, replayed and cancelled
 * like any other. While a request waits for tokens it also watches its TCP socket: a client
 * that hangs up has its job cancelled at once.
 *
 * Invariants: every wait is sliced (DSD_HTTP_SLICE_MS) so shutdown ends every connection
 * promptly; the metrics are the only state shared between connections (one mutex). */
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <microhttpd.h>

#include "ds_config.h"
#include "ds_gguf.h"
#include "ds_log.h"
#include "ds_tokenizer.h"
#include "ds_version.h"
#include "dsd.h"
#include "dsd_http.h"

#define DSD_HTTP_SLICE_MS 200
#define MAX_KEYS          256
#define N_BUCKETS         14

extern const char dsd_http_status_page[]; /* daemon/www/status.html, compiled in */

static const double BUCKETS[N_BUCKETS] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08,
                                          0.1,   0.25,  0.5,  1,    2.5,  5,    10};

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

/* ---- small helpers ------------------------------------------------------------------------ */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void hist_add(struct histogram *hg, double v)
{
    size_t i = 0;
    while (i < N_BUCKETS && v > BUCKETS[i])
        i++;
    hg->counts[i]++;
    hg->sum += v;
    hg->n++;
}

static void count_request(struct dsd_http *h, int endpoint, unsigned status)
{
    unsigned cls = status / 100;
    if (cls < 2 || cls > 5)
        cls = 5;
    pthread_mutex_lock(&h->mu);
    h->m.requests[endpoint][cls]++;
    pthread_mutex_unlock(&h->mu);
}

struct sbuf {
    char *p;
    size_t n, cap;
    bool oom;
};

static void sb_put(struct sbuf *b, const char *s, size_t l)
{
    if (b->oom)
        return;
    if (b->n + l + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->n + l + 1)
            cap *= 2;
        char *np = realloc(b->p, cap);
        if (!np) {
            b->oom = true;
            return;
        }
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, l);
    b->n += l;
    b->p[b->n] = 0;
}

static void sb_printf(struct sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(struct sbuf *b, const char *fmt, ...)
{
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n < sizeof(tmp)) {
        sb_put(b, tmp, (size_t)n);
        return;
    }
    char *big = malloc((size_t)n + 1);
    if (!big) {
        b->oom = true;
        return;
    }
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    sb_put(b, big, (size_t)n);
    free(big);
}

/* Queues a response of `len` bytes copied from body. */
static enum MHD_Result reply(struct MHD_Connection *c, unsigned status, const char *type,
                             const char *body, size_t len)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!r)
        return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    MHD_add_response_header(r, "Cache-Control", "no-store");
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result reply_json(struct MHD_Connection *c, unsigned status, json_t *o)
{
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (!s)
        return reply(c, 500, "application/json", "{}", 2);
    enum MHD_Result r = reply(c, status, "application/json", s, strlen(s));
    free(s);
    return r;
}

static enum MHD_Result reply_error(struct MHD_Connection *c, const dsd_http_error *e)
{
    char *s = dsd_http_error_json(e);
    if (!s)
        return reply(c, 500, "application/json", "{}", 2);
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(s), s, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(s);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    if (e->status == 401)
        MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    enum MHD_Result ret = MHD_queue_response(c, (unsigned)e->status, r);
    MHD_destroy_response(r);
    return ret;
}

/* ---- the client protocol over inproc ------------------------------------------------------ */

static void *zsock_open(struct dsd_http *h)
{
    void *s = zmq_socket(h->zctx, ZMQ_DEALER);
    if (!s)
        return NULL;
    int linger = 200; /* a Cancel sent just before closing still goes out */
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof(linger));
    if (zmq_connect(s, h->client_ep) < 0) {
        zmq_close(s);
        return NULL;
    }
    return s;
}

static int zsend(void *s, Dsd__Envelope *env)
{
    uint8_t *buf;
    size_t len;
    int rc = ds_wire_pack(env, &buf, &len);
    if (rc < 0)
        return rc;
    rc = zmq_send(s, buf, len, 0) < 0 ? -EIO : 0;
    free(buf);
    return rc;
}

/* Whether the client of TCP socket fd has hung up (a read would return end of file). *fd is
 * set to -1 once the client sent more bytes (a pipelined request): those are not ours to read. */
static bool client_gone(int *fd)
{
    if (*fd < 0)
        return false;
    struct pollfd p = {.fd = *fd, .events = POLLIN | POLLRDHUP};
    if (poll(&p, 1, 0) <= 0)
        return false;
    if (p.revents & (POLLHUP | POLLERR | POLLRDHUP))
        return true;
    char ch;
    ssize_t r = recv(*fd, &ch, 1, MSG_PEEK | MSG_DONTWAIT);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
        return true;
    if (r > 0)
        *fd = -1;
    return false;
}

/* Receives one envelope, waiting at most timeout_ms in slices: -ETIMEDOUT, -ECONNRESET (the
 * HTTP client hung up), -ESHUTDOWN (the server stops), -EPROTO. */
static int zrecv(struct dsd_http *h, void *s, int timeout_ms, int *fd, Dsd__Envelope **out)
{
    uint64_t end = now_ns() + (uint64_t)timeout_ms * 1000000ull;
    for (;;) {
        if (atomic_load(&h->stopping))
            return -ESHUTDOWN;
        zmq_pollitem_t it[2] = {{.socket = s, .events = ZMQ_POLLIN}};
        int n = 1;
        if (fd && *fd >= 0)
            it[n++] = (zmq_pollitem_t){.fd = *fd, .events = ZMQ_POLLIN};
        int rc = zmq_poll(it, n, DSD_HTTP_SLICE_MS);
        if (rc < 0 && zmq_errno() != EINTR)
            return -EIO;
        if (fd && client_gone(fd))
            return -ECONNRESET;
        if (rc > 0 && (it[0].revents & ZMQ_POLLIN)) {
            zmq_msg_t m;
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, s, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(&m);
                continue;
            }
            /* the envelope is the first frame; a Token carries no tensor frames */
            int more = zmq_msg_more(&m);
            int u = ds_wire_unpack(zmq_msg_data(&m), zmq_msg_size(&m), out, NULL);
            zmq_msg_close(&m);
            while (more) {
                zmq_msg_init(&m);
                zmq_msg_recv(&m, s, 0);
                more = zmq_msg_more(&m);
                zmq_msg_close(&m);
            }
            if (u < 0)
                return -EPROTO;
            return 0;
        }
        if (now_ns() >= end)
            return -ETIMEDOUT;
    }
}

/* A status document of the coordinator (dsd_status_json), or NULL with why. */
static json_t *status_doc(struct dsd_http *h, const char *what, char *why, size_t wl)
{
    void *s = zsock_open(h);
    if (!s) {
        snprintf(why, wl, "cannot reach the coordinator loop");
        return NULL;
    }
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__StatusRequest sr = DSD__STATUS_REQUEST__INIT;
    sr.what = (char *)what;
    env.request_id = atomic_fetch_add(&h->next_req, 1) + 1;
    env.body_case = DSD__ENVELOPE__BODY_STATUS_REQUEST;
    env.status_request = &sr;
    json_t *r = NULL;
    Dsd__Envelope *rep = NULL;
    if (zsend(s, &env) < 0)
        snprintf(why, wl, "cannot reach the coordinator loop");
    else if (zrecv(h, s, 3000, NULL, &rep) < 0)
        snprintf(why, wl, "the coordinator loop did not answer in 3 s");
    else if (rep->body_case != DSD__ENVELOPE__BODY_STATUS_REPLY || !rep->status_reply->json)
        snprintf(why, wl, "the coordinator refused the status request");
    else if (!(r = json_loads(rep->status_reply->json, 0, NULL)))
        snprintf(why, wl, "the coordinator's status is not JSON");
    ds_wire_free(rep);
    zmq_close(s);
    return r;
}

/* ---- generation --------------------------------------------------------------------------- */

struct gen {
    struct dsd_http *h;
    dsd_http_req req;
    void *sock;
    int fd; /* the client's TCP socket, watched for a hang-up (-1: not watched) */
    uint64_t job;
    int32_t *prompt;
    size_t n_prompt;
    uint32_t max_tokens;
    struct sbuf text; /* the text so far (non-streaming) */
    uint32_t *ids;    /* generated ids */
    size_t n_ids, cap_ids;
    const char *finish; /* stop | length | cancelled | error, once done */
    bool done, gone;
    uint64_t t_start, t_first, t_last;
    char id[48];
    long long created;
    /* streaming */
    struct sbuf out; /* SSE bytes not yet handed to MHD */
    size_t out_off;
    bool sent_role, ended;
};

static void gen_free(struct gen *g)
{
    if (!g)
        return;
    if (g->sock) {
        if (g->job && !g->done) { /* the client went away or the server stops: cancel */
            Dsd__Envelope env = DSD__ENVELOPE__INIT;
            Dsd__Cancel cc = DSD__CANCEL__INIT;
            cc.job = g->job;
            env.body_case = DSD__ENVELOPE__BODY_CANCEL;
            env.cancel = &cc;
            zsend(g->sock, &env);
            ds_log_notice("http: job %llu cancelled: its client is gone",
                          (unsigned long long)g->job);
        }
        zmq_close(g->sock);
    }
    dsd_http_req_clear(&g->req);
    free(g->prompt);
    free(g->text.p);
    free(g->out.p);
    free(g->ids);
    free(g);
}

static void map_submit_error(const Dsd__Error *er, dsd_http_error *e)
{
    const char *msg = er->message ? er->message : "refused";
    switch (er->code) {
    case DSD__ERROR_CODE__ERROR_CODE_BUSY:
        if (strstr(msg, "max_jobs"))
            dsd_http_error_set(e, 429, "rate_limit_error", "too_many_requests", NULL, "%s", msg);
        else
            dsd_http_error_set(e, 503, "server_error", "not_serving", NULL, "%s", msg);
        break;
    case DSD__ERROR_CODE__ERROR_CODE_TOO_LARGE:
        dsd_http_error_set(e, 400, "invalid_request_error", "context_length_exceeded", "max_tokens",
                           "%s", msg);
        break;
    case DSD__ERROR_CODE__ERROR_CODE_MALFORMED:
        dsd_http_error_set(e, 400, "invalid_request_error", NULL, NULL, "%s", msg);
        break;
    default:
        dsd_http_error_set(e, 500, "server_error", NULL, NULL, "%s", msg);
    }
}

/* Tokenizes (or renders and tokenizes) the request's prompt into g->prompt. */
static int gen_prompt(struct gen *g, dsd_http_error *e)
{
    struct dsd_http *h = g->h;
    dsd_http_req *r = &g->req;
    ds_error err = {0};
    if (r->kind == DSD_HTTP_KIND_COMPLETION && r->prompt_ids) {
        g->prompt = malloc(r->n_prompt_ids * sizeof(int32_t));
        if (!g->prompt)
            goto oom;
        for (size_t i = 0; i < r->n_prompt_ids; i++)
            g->prompt[i] = (int32_t)r->prompt_ids[i];
        g->n_prompt = r->n_prompt_ids;
        return 0;
    }
    if (!h->tok) {
        dsd_http_error_set(e, 400, "invalid_request_error", NULL, "prompt",
                           "the model has no tokenizer.json: send the prompt as token ids");
        return -EINVAL;
    }
    if (r->kind == DSD_HTTP_KIND_COMPLETION) {
        /* BOS as the tokenizer config says, like a text prompt to the coordinator */
        if (ds_tokenizer_encode(h->tok, r->prompt, strlen(r->prompt), true, &g->prompt,
                                &g->n_prompt, &err) < 0)
            goto bad;
        return 0;
    }
    if (!h->have_chat) {
        dsd_http_error_set(e, 400, "invalid_request_error", "chat_template_unsupported", NULL, "%s",
                           h->chat_error);
        return -EINVAL;
    }
    char *text;
    size_t len;
    if (dsd_chat_render(&h->chat, r->messages, r->n_messages, true, r->thinking, h->bos, h->eos,
                        &text, &len, &err) < 0)
        goto bad;
    /* the template writes BOS itself (HF tokenizes its output without special tokens) */
    int rc = ds_tokenizer_encode(h->tok, text, len, false, &g->prompt, &g->n_prompt, &err);
    free(text);
    if (rc < 0)
        goto bad;
    return 0;
bad:
    dsd_http_error_set(e, 400, "invalid_request_error", NULL,
                       r->kind == DSD_HTTP_KIND_CHAT ? "messages" : "prompt", "%s",
                       ds_error_str(&err));
    return -EINVAL;
oom:
    dsd_http_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
    return -ENOMEM;
}

/* Submits g's prompt; 0 with g->job set, or e filled. */
static int gen_submit(struct gen *g, dsd_http_error *e)
{
    struct dsd_http *h = g->h;
    dsd_http_req *r = &g->req;
    if (!g->n_prompt) {
        dsd_http_error_set(e, 400, "invalid_request_error", NULL, "prompt", "the prompt is empty");
        return -EINVAL;
    }
    if (g->n_prompt >= h->ctx_len) {
        dsd_http_error_set(e, 400, "invalid_request_error", "context_length_exceeded",
                           r->kind == DSD_HTTP_KIND_CHAT ? "messages" : "prompt",
                           "the prompt has %zu tokens; the context holds %u", g->n_prompt,
                           h->ctx_len);
        return -EINVAL;
    }
    /* OpenAI's defaults: 16 tokens for a completion, the rest of the context for a chat */
    uint64_t room = h->ctx_len - g->n_prompt;
    g->max_tokens = r->max_tokens                   ? (uint32_t)r->max_tokens
                    : r->kind == DSD_HTTP_KIND_CHAT ? (uint32_t)room
                                                    : (uint32_t)(room < 16 ? room : 16);
    if (!(g->sock = zsock_open(h))) {
        dsd_http_error_set(e, 500, "server_error", NULL, NULL, "cannot reach the coordinator");
        return -EIO;
    }
    uint32_t *ids = malloc(g->n_prompt * sizeof(uint32_t));
    if (!ids) {
        dsd_http_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
        return -ENOMEM;
    }
    for (size_t i = 0; i < g->n_prompt; i++)
        ids[i] = (uint32_t)g->prompt[i];
    char *stops[DSD_HTTP_MAX_STOP + 1];
    size_t n_stop = 0;
    if (!r->ignore_eos)
        stops[n_stop++] = "eos"; /* a model's end of sequence ends its answer (finish "stop") */
    for (uint32_t i = 0; i < r->n_stop; i++)
        stops[n_stop++] = (char *)r->stop[i];
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__Submit sb = DSD__SUBMIT__INIT;
    Dsd__Sampling smp = DSD__SAMPLING__INIT;
    smp.temperature = (float)r->temperature;
    smp.top_p = (float)r->top_p;
    smp.top_k = (uint32_t)r->top_k;
    smp.seed = r->has_seed ? r->seed : 1;
    sb.tokens = ids;
    sb.n_tokens = g->n_prompt;
    sb.sampling = &smp;
    sb.max_tokens = g->max_tokens;
    sb.stop = stops;
    sb.n_stop = n_stop;
    env.request_id = atomic_fetch_add(&h->next_req, 1) + 1;
    env.body_case = DSD__ENVELOPE__BODY_SUBMIT;
    env.submit = &sb;
    int rc = zsend(g->sock, &env);
    free(ids);
    if (rc < 0) {
        dsd_http_error_set(e, 500, "server_error", NULL, NULL, "cannot reach the coordinator");
        return rc;
    }
    g->t_start = now_ns();
    Dsd__Envelope *rep = NULL;
    rc = zrecv(h, g->sock, 10000, &g->fd, &rep);
    if (rc == -ECONNRESET) {
        g->gone = true;
        dsd_http_error_set(e, 499, "server_error", NULL, NULL, "the client hung up");
        return rc;
    }
    if (rc < 0) {
        dsd_http_error_set(e, 503, "server_error", "not_serving", NULL,
                           "the coordinator did not accept the job (%s)", strerror(-rc));
        return rc;
    }
    rc = 0;
    if (rep->body_case == DSD__ENVELOPE__BODY_ERROR) {
        map_submit_error(rep->error, e);
        rc = -EINVAL;
    } else if (rep->body_case == DSD__ENVELOPE__BODY_STATUS_REPLY && rep->status_reply->job) {
        g->job = rep->status_reply->job;
    } else {
        dsd_http_error_set(e, 500, "server_error", NULL, NULL, "unexpected reply to Submit");
        rc = -EPROTO;
    }
    ds_wire_free(rep);
    return rc;
}

/* Waits for the job's next token: 1 with *text (borrowed until the next call, in *env) for a
 * token, 0 when the job ended (g->finish), <0 when the client hung up or the wait failed. */
static int gen_next(struct gen *g, Dsd__Envelope **env, const char **text, size_t *text_len)
{
    struct dsd_http *h = g->h;
    *env = NULL;
    for (;;) {
        int rc = zrecv(h, g->sock, (int)h->step_timeout_ms * 2 + 5000, &g->fd, env);
        if (rc == -ECONNRESET) {
            g->gone = true;
            pthread_mutex_lock(&h->mu);
            h->m.disconnects++;
            pthread_mutex_unlock(&h->mu);
            return rc;
        }
        if (rc < 0) {
            g->finish = "error";
            g->done = rc != -ESHUTDOWN && rc != -ETIMEDOUT ? true : false;
            return rc;
        }
        Dsd__Envelope *m = *env;
        if (m->body_case == DSD__ENVELOPE__BODY_ERROR) {
            ds_log_warn("http: job %llu: %s", (unsigned long long)g->job,
                        m->error->message ? m->error->message : "error");
            g->finish = "error";
            g->done = true;
            return 0;
        }
        if (m->body_case != DSD__ENVELOPE__BODY_TOKEN || m->token->job != g->job) {
            ds_wire_free(m);
            *env = NULL;
            continue;
        }
        Dsd__Token *t = m->token;
        uint64_t now = now_ns();
        const char *fr = t->finish_reason ? t->finish_reason : "";
        /* a cancel or error notice carries no token (libdsclient's has_id = false) */
        bool has_id = !(t->last && (!strcmp(fr, "cancelled") || !strcmp(fr, "error")));
        if (has_id) {
            if (g->n_ids == g->cap_ids) {
                size_t cap = g->cap_ids ? g->cap_ids * 2 : 64;
                uint32_t *ni = realloc(g->ids, cap * sizeof(uint32_t));
                if (!ni)
                    return -ENOMEM;
                g->ids = ni;
                g->cap_ids = cap;
            }
            g->ids[g->n_ids++] = t->id;
            pthread_mutex_lock(&h->mu);
            if (g->n_ids == 1)
                hist_add(&h->m.ttft, (double)(now - g->t_start) / 1e9);
            else
                hist_add(&h->m.tpot, (double)(now - g->t_last) / 1e9);
            h->m.generation_tokens++;
            pthread_mutex_unlock(&h->mu);
            if (g->n_ids == 1)
                g->t_first = now;
            g->t_last = now;
        }
        *text = t->text ? t->text : "";
        *text_len = strlen(*text);
        if (t->last) {
            /* a constant: the envelope holding the reason is freed before g is */
            g->finish = !strcmp(fr, "stop")        ? "stop"
                        : !strcmp(fr, "cancelled") ? "cancelled"
                        : !strcmp(fr, "error")     ? "error"
                                                   : "length";
            g->done = true;
        }
        return 1;
    }
}

static const char *openai_finish(const char *f)
{
    return !strcmp(f, "stop") ? "stop" : !strcmp(f, "length") ? "length" : f;
}

static void gen_account(struct gen *g)
{
    struct dsd_http *h = g->h;
    pthread_mutex_lock(&h->mu);
    h->m.prompt_tokens += g->n_prompt;
    const char *f = g->finish ? g->finish : "cancelled";
    int k = !strcmp(f, "stop") ? 0 : !strcmp(f, "length") ? 1 : !strcmp(f, "cancelled") ? 2 : 3;
    h->m.finished[k]++;
    if (g->t_start)
        hist_add(&h->m.e2e, (double)(now_ns() - g->t_start) / 1e9);
    pthread_mutex_unlock(&h->mu);
}

static json_t *usage_json(const struct gen *g)
{
    return json_pack("{s:I,s:I,s:I}", "prompt_tokens", (json_int_t)g->n_prompt, "completion_tokens",
                     (json_int_t)g->n_ids, "total_tokens", (json_int_t)(g->n_prompt + g->n_ids));
}

static json_t *ids_json(const uint32_t *ids, size_t n)
{
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(a, json_integer(ids[i]));
    return a;
}

/* The non-streaming answer once the job ended. */
static json_t *gen_result(struct gen *g)
{
    bool chat = g->req.kind == DSD_HTTP_KIND_CHAT;
    json_t *choice;
    const char *text = g->text.p ? g->text.p : "";
    if (chat)
        choice = json_pack("{s:i,s:{s:s,s:s%},s:n,s:s}", "index", 0, "message", "role", "assistant",
                           "content", text, g->text.n, "logprobs", "finish_reason",
                           openai_finish(g->finish));
    else
        choice = json_pack("{s:i,s:s%,s:n,s:s}", "index", 0, "text", text, g->text.n, "logprobs",
                           "finish_reason", openai_finish(g->finish));
    if (!choice)
        return NULL;
    if (g->req.return_token_ids)
        json_object_set_new(choice, "token_ids", ids_json(g->ids, g->n_ids));
    json_t *o =
        json_pack("{s:s,s:s,s:I,s:s,s:[o],s:o}", "id", g->id, "object",
                  chat ? "chat.completion" : "text_completion", "created", (json_int_t)g->created,
                  "model", g->h->model_id, "choices", choice, "usage", usage_json(g));
    if (o && g->req.return_token_ids)
        json_object_set_new(o, "prompt_token_ids",
                            ids_json((const uint32_t *)g->prompt, g->n_prompt));
    return o;
}

static void sse(struct gen *g, json_t *o)
{
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (!s) {
        g->out.oom = true;
        return;
    }
    sb_put(&g->out, "data: ", 6);
    sb_put(&g->out, s, strlen(s));
    sb_put(&g->out, "\n\n", 2);
    free(s);
}

/* One streamed chunk: text (may be empty) and, on the last, the finish reason. */
static void sse_chunk(struct gen *g, const char *text, size_t len, const char *finish)
{
    bool chat = g->req.kind == DSD_HTTP_KIND_CHAT;
    json_t *choice;
    if (chat) {
        json_t *delta = json_object();
        if (!g->sent_role) {
            json_object_set_new(delta, "role", json_string("assistant"));
            g->sent_role = true;
        }
        if (len || !finish)
            json_object_set_new(delta, "content", json_stringn(text, len));
        choice = json_pack("{s:i,s:o,s:n,s:o}", "index", 0, "delta", delta, "logprobs",
                           "finish_reason", finish ? json_string(finish) : json_null());
    } else
        choice = json_pack("{s:i,s:s%,s:n,s:o}", "index", 0, "text", text, len, "logprobs",
                           "finish_reason", finish ? json_string(finish) : json_null());
    json_t *o = json_pack("{s:s,s:s,s:I,s:s,s:[o]}", "id", g->id, "object",
                          chat ? "chat.completion.chunk" : "text_completion", "created",
                          (json_int_t)g->created, "model", g->h->model_id, "choices", choice);
    if (o && g->req.include_usage)
        json_object_set_new(o, "usage", json_null());
    sse(g, o);
}

/* The stream's end: the finish chunk, the usage chunk when asked for, [DONE]. */
static void sse_end(struct gen *g)
{
    if (!strcmp(g->finish, "error") || !strcmp(g->finish, "cancelled")) {
        dsd_http_error e;
        dsd_http_error_set(&e, 500, "server_error", NULL, NULL, "the job ended: %s", g->finish);
        char *s = dsd_http_error_json(&e);
        if (s) {
            sb_put(&g->out, "data: ", 6);
            sb_put(&g->out, s, strlen(s));
            sb_put(&g->out, "\n\n", 2);
            free(s);
        }
    } else
        sse_chunk(g, "", 0, openai_finish(g->finish));
    if (g->req.include_usage) {
        bool chat = g->req.kind == DSD_HTTP_KIND_CHAT;
        sse(g, json_pack("{s:s,s:s,s:I,s:s,s:[],s:o}", "id", g->id, "object",
                         chat ? "chat.completion.chunk" : "text_completion", "created",
                         (json_int_t)g->created, "model", g->h->model_id, "choices", "usage",
                         usage_json(g)));
    }
    sb_put(&g->out, "data: [DONE]\n\n", 14);
    g->ended = true;
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    struct gen *g = cls;
    (void)pos;
    while (g->out_off == g->out.n) {
        g->out.n = g->out_off = 0;
        if (g->ended || g->out.oom)
            return MHD_CONTENT_READER_END_OF_STREAM;
        if (g->done) {
            sse_end(g);
            gen_account(g);
            break;
        }
        Dsd__Envelope *env;
        const char *text;
        size_t len;
        int rc = gen_next(g, &env, &text, &len);
        if (rc < 0) {
            ds_wire_free(env);
            if (g->gone)
                return MHD_CONTENT_READER_END_WITH_ERROR;
            if (!g->finish)
                g->finish = "error";
            g->done = true;
            continue;
        }
        if (rc > 0 && len)
            sse_chunk(g, text, len, NULL);
        ds_wire_free(env);
    }
    size_t n = g->out.n - g->out_off;
    if (n > max)
        n = max;
    memcpy(buf, g->out.p + g->out_off, n);
    g->out_off += n;
    return (ssize_t)n;
}

static void stream_free(void *cls)
{
    struct gen *g = cls;
    if (!g->ended && g->job) {
        /* the connection ended before the stream did: the client hung up */
        if (!g->gone) {
            pthread_mutex_lock(&g->h->mu);
            g->h->m.disconnects++;
            pthread_mutex_unlock(&g->h->mu);
        }
        gen_account(g);
    }
    gen_free(g);
}

static int connection_fd(struct MHD_Connection *c)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    return ci ? ci->connect_fd : -1;
}

static enum MHD_Result handle_generate(struct dsd_http *h, struct MHD_Connection *c,
                                       enum dsd_http_kind kind, const char *body, size_t len)
{
    int ep = kind == DSD_HTTP_KIND_CHAT ? 1 : 0;
    dsd_http_error e = {0};
    struct gen *g = calloc(1, sizeof(*g));
    if (!g)
        return MHD_NO;
    g->h = h;
    g->fd = connection_fd(c);
    g->created = (long long)time(NULL);
    snprintf(g->id, sizeof(g->id), "%s-%llx%04llx",
             kind == DSD_HTTP_KIND_CHAT ? "chatcmpl" : "cmpl", (unsigned long long)g->created,
             (unsigned long long)(atomic_fetch_add(&h->next_req, 1) & 0xffff));
    if (dsd_http_req_parse(kind, body, len, &g->req, &e) < 0)
        goto fail;
    if (g->req.model && g->req.model[0] && strcmp(g->req.model, h->model_id)) {
        dsd_http_error_set(&e, 404, "invalid_request_error", "model_not_found", "model",
                           "the model '%.100s' does not exist (this server serves '%s')",
                           g->req.model, h->model_id);
        goto fail;
    }
    if (gen_prompt(g, &e) < 0 || gen_submit(g, &e) < 0)
        goto fail;
    if (g->req.stream) {
        struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384,
                                                                   stream_reader, g, stream_free);
        if (!r) {
            gen_free(g);
            return MHD_NO;
        }
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(r, "Cache-Control", "no-cache");
        enum MHD_Result ret = MHD_queue_response(c, 200, r);
        MHD_destroy_response(r);
        count_request(h, ep, 200);
        return ret;
    }
    for (;;) {
        Dsd__Envelope *env;
        const char *text;
        size_t tl;
        int rc = gen_next(g, &env, &text, &tl);
        if (rc > 0)
            sb_put(&g->text, text, tl);
        ds_wire_free(env);
        if (rc < 0 && g->gone) {
            gen_account(g);
            gen_free(g);
            count_request(h, ep, 499);
            return MHD_NO; /* nobody to answer */
        }
        if (rc < 0 || g->done)
            break;
    }
    gen_account(g);
    if (!g->finish || !strcmp(g->finish, "error") || !strcmp(g->finish, "cancelled") ||
        g->text.oom) {
        dsd_http_error_set(&e, g->finish && !strcmp(g->finish, "cancelled") ? 503 : 500,
                           "server_error", NULL, NULL, "the job ended: %s",
                           g->finish ? g->finish : "error");
        goto fail;
    }
    json_t *res = gen_result(g);
    gen_free(g);
    count_request(h, ep, res ? 200 : 500);
    return reply_json(c, 200, res);
fail:
    if (g->gone) {
        gen_free(g);
        count_request(h, ep, 499);
        return MHD_NO;
    }
    gen_free(g);
    count_request(h, ep, (unsigned)e.status);
    return reply_error(c, &e);
}

/* ---- /health, /v1/models, /metrics, the status page --------------------------------------- */

static enum MHD_Result handle_health(struct dsd_http *h, struct MHD_Connection *c)
{
    char why[160];
    json_t *st = status_doc(h, "status", why, sizeof(why));
    if (!st)
        return reply_json(c, 503, json_pack("{s:s,s:s}", "status", "unavailable", "reason", why));
    const char *state = json_string_value(json_object_get(st, "state"));
    state = state ? state : "unknown";
    bool ok = !strcmp(state, "serving") || !strcmp(state, "degraded");
    json_t *o = json_pack("{s:s,s:s,s:O}", "status", ok ? "ok" : "unavailable", "state", state,
                          "plan_version", json_object_get(st, "plan_version"));
    if (!ok) {
        json_t *pe = json_object_get(st, "plan_error");
        char reason[600];
        snprintf(reason, sizeof(reason), "%s%s%s",
                 !strcmp(state, "joining")    ? "waiting for workers to join"
                 : !strcmp(state, "planning") ? "making a plan"
                 : !strcmp(state, "loading")  ? "loading weights"
                 : !strcmp(state, "no-plan")  ? "no plan"
                                              : state,
                 pe ? ": " : "", pe ? json_string_value(pe) : "");
        json_object_set_new(o, "reason", json_string(reason));
    }
    json_t *prog = json_object_get(st, "progress");
    if (prog)
        json_object_set(o, "progress", prog);
    json_decref(st);
    return reply_json(c, ok ? 200 : 503, o);
}

static json_t *model_obj(struct dsd_http *h)
{
    json_t *o = json_pack("{s:s,s:s,s:I,s:s,s:I}", "id", h->model_id, "object", "model", "created",
                          (json_int_t)h->created, "owned_by", "dsd", "max_model_len",
                          (json_int_t)h->ctx_len);
    if (o && h->have_chat)
        json_object_set_new(o, "chat_template", json_string(h->chat.name));
    return o;
}

static void metric_hist(struct sbuf *b, const char *name, const char *help,
                        const struct histogram *hg)
{
    sb_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (size_t i = 0; i < N_BUCKETS; i++) {
        cum += hg->counts[i];
        sb_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, BUCKETS[i], (unsigned long long)cum);
    }
    cum += hg->counts[N_BUCKETS];
    sb_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.9g\n%s_count %llu\n", name,
              (unsigned long long)cum, name, hg->sum, name, (unsigned long long)hg->n);
}

static void metric_head(struct sbuf *b, const char *name, const char *type, const char *help)
{
    sb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A label value escaped for the text format (backslash, quote, newline). */
static const char *lv(const char *s, char *buf, size_t n)
{
    size_t o = 0;
    for (const char *p = s ? s : ""; *p && o + 3 < n; p++) {
        if (*p == '\\' || *p == '"') {
            buf[o++] = '\\';
            buf[o++] = *p;
        } else if (*p == '\n') {
            buf[o++] = '\\';
            buf[o++] = 'n';
        } else
            buf[o++] = *p;
    }
    buf[o] = 0;
    return buf;
}

static double num(json_t *o, const char *k)
{
    return json_number_value(json_object_get(o, k));
}

static void metrics_cluster(struct dsd_http *h, struct sbuf *b)
{
    char why[160], l1[160], l2[160], l3[160];
    json_t *st = status_doc(h, "status", why, sizeof(why));
    json_t *jobs = status_doc(h, "jobs", why, sizeof(why));
    json_t *pl = status_doc(h, "placement", why, sizeof(why));
    json_t *es = status_doc(h, "expert_stats", why, sizeof(why));
    size_t i, k;
    json_t *x, *y;
    if (st) {
        metric_head(b, "dsd_plan_version", "gauge", "Version of the plan the cluster runs.");
        sb_printf(b, "dsd_plan_version %.0f\n", num(st, "plan_version"));
        const char *state = json_string_value(json_object_get(st, "state"));
        metric_head(b, "dsd_serving", "gauge", "1 when the cluster serves jobs.");
        sb_printf(b, "dsd_serving %d\n",
                  state && (!strcmp(state, "serving") || !strcmp(state, "degraded")));
        metric_head(b, "dsd_node_state", "gauge", "1 for each node's current state.");
        json_array_foreach(json_object_get(st, "nodes"), i, x)
            sb_printf(b, "dsd_node_state{node=\"%s\",role=\"%s\",state=\"%s\"} 1\n",
                      lv(json_string_value(json_object_get(x, "name")), l1, sizeof(l1)),
                      lv(json_string_value(json_object_get(x, "role")), l2, sizeof(l2)),
                      lv(json_string_value(json_object_get(x, "state")), l3, sizeof(l3)));
        metric_head(b, "dsd_node_heartbeat_age_seconds", "gauge",
                    "Time since each node's last heartbeat.");
        json_array_foreach(json_object_get(st, "nodes"), i, x)
            sb_printf(b, "dsd_node_heartbeat_age_seconds{node=\"%s\"} %.3f\n",
                      lv(json_string_value(json_object_get(x, "name")), l1, sizeof(l1)),
                      num(x, "heartbeat_age_ms") / 1000);
    }
    if (jobs) {
        size_t running = 0, prefill = 0;
        json_array_foreach(json_object_get(jobs, "jobs"), i, x)
        {
            running++;
            const char *s = json_string_value(json_object_get(x, "state"));
            prefill += s && !strcmp(s, "prefill");
        }
        metric_head(b, "dsd_num_requests_running", "gauge", "Jobs the scheduler runs now.");
        sb_printf(b, "dsd_num_requests_running %zu\n", running);
        metric_head(b, "dsd_num_requests_prefill", "gauge",
                    "Running jobs still reading their prompt.");
        sb_printf(b, "dsd_num_requests_prefill %zu\n", prefill);
        metric_head(b, "dsd_num_requests_waiting", "gauge",
                    "Jobs waiting for a slot (the scheduler refuses past max_jobs: always 0).");
        sb_printf(b, "dsd_num_requests_waiting 0\n");
        metric_head(b, "dsd_jobs_finished_total", "counter", "Jobs finished by the scheduler.");
        sb_printf(b, "dsd_jobs_finished_total %.0f\n", num(jobs, "finished"));
        metric_head(b, "dsd_steps_total", "counter", "Scheduler steps run.");
        sb_printf(b, "dsd_steps_total %.0f\n", num(jobs, "steps"));
        metric_head(b, "dsd_micro_batches_in_flight", "gauge", "Micro-batches in flight.");
        sb_printf(b, "dsd_micro_batches_in_flight %.0f\n", num(jobs, "micro_batches_in_flight"));
    }
    if (pl) {
        json_t *meas = json_object_get(pl, "measured");
        json_t *links = json_object_get(meas, "links");
        static const struct {
            const char *key, *name, *type, *help;
        } LINK[] = {
            {"bytes", "dsd_link_bytes_total", "counter", "Bytes of dispatches sent on a link."},
            {"messages", "dsd_link_messages_total", "counter", "Dispatches sent on a link."},
            {"forward_bytes", "dsd_link_forward_bytes_total", "counter",
             "Bytes of steps passed on along a link."},
            {"measured_transfer_s", "dsd_link_transfer_seconds_total", "counter",
             "Measured transfer time of a link's dispatches."},
            {"latency_s", "dsd_link_latency_seconds", "gauge", "Calibrated one-way latency."},
            {"bandwidth_bytes_per_s", "dsd_link_bandwidth_bytes_per_second", "gauge",
             "Calibrated bandwidth."},
        };
        for (size_t m = 0; m < sizeof(LINK) / sizeof(LINK[0]); m++) {
            metric_head(b, LINK[m].name, LINK[m].type, LINK[m].help);
            json_array_foreach(links, i, x)
                sb_printf(b, "%s{from=\"%s\",to=\"%s\"} %.9g\n", LINK[m].name,
                          lv(json_string_value(json_object_get(x, "from")), l1, sizeof(l1)),
                          lv(json_string_value(json_object_get(x, "to")), l2, sizeof(l2)),
                          num(x, LINK[m].key));
        }
        /* measured compute per node: the sum over the units it ran */
        metric_head(b, "dsd_node_busy_seconds_total", "counter",
                    "Measured compute time of the units a node ran.");
        json_t *per = json_object();
        const char *unit;
        json_object_foreach(json_object_get(meas, "units"), unit, x)
        {
            const char *node = json_string_value(json_object_get(x, "node"));
            if (!node)
                continue;
            json_object_set_new(per, node,
                                json_real(num(per, node) + num(x, "measured_compute_s")));
        }
        const char *node;
        json_object_foreach(per, node, x)
            sb_printf(b, "dsd_node_busy_seconds_total{node=\"%s\"} %.9g\n",
                      lv(node, l1, sizeof(l1)), json_number_value(x));
        json_decref(per);
        json_t *pred = json_object_get(pl, "predicted");
        metric_head(b, "dsd_device_predicted_busy_seconds_per_step", "gauge",
                    "The solver's predicted busy time of a device per decode step.");
        json_array_foreach(json_object_get(pred, "devices"), i, x)
        {
            const char *dev = json_string_value(json_object_get(x, "device"));
            if (!dev)
                dev = json_string_value(json_object_get(x, "name"));
            sb_printf(b, "dsd_device_predicted_busy_seconds_per_step{device=\"%s\"} %.9g\n",
                      lv(dev, l1, sizeof(l1)), num(x, "busy_s"));
        }
        metric_head(b, "dsd_predicted_step_seconds", "gauge",
                    "The solver's predicted decode step time.");
        sb_printf(b, "dsd_predicted_step_seconds %.9g\n",
                  num(json_object_get(pred, "predicted"), "decode_step_s"));
    }
    if (es) {
        metric_head(b, "dsd_expert_routed_total", "counter",
                    "Rows the router sent to each routed expert.");
        json_array_foreach(json_object_get(es, "layers"), i, x)
        {
            int layer = (int)num(x, "layer");
            json_array_foreach(json_object_get(x, "counts"), k, y)
                sb_printf(b, "dsd_expert_routed_total{layer=\"%d\",expert=\"%zu\"} %.0f\n", layer,
                          k, json_number_value(y));
        }
    }
    json_decref(st);
    json_decref(jobs);
    json_decref(pl);
    json_decref(es);
}

static enum MHD_Result handle_metrics(struct dsd_http *h, struct MHD_Connection *c)
{
    struct sbuf b = {0};
    struct metrics m;
    pthread_mutex_lock(&h->mu);
    m = h->m;
    pthread_mutex_unlock(&h->mu);
    static const char *EP[] = {"/v1/completions", "/v1/chat/completions", "other"};
    metric_head(&b, "dsd_http_requests_total", "counter",
                "HTTP requests answered, by endpoint and status class.");
    for (int e = 0; e < 3; e++)
        for (int s = 2; s <= 5; s++)
            sb_printf(&b, "dsd_http_requests_total{endpoint=\"%s\",code=\"%dxx\"} %llu\n", EP[e], s,
                      (unsigned long long)m.requests[e][s]);
    metric_head(&b, "dsd_prompt_tokens_total", "counter", "Prompt tokens of HTTP jobs.");
    sb_printf(&b, "dsd_prompt_tokens_total %llu\n", (unsigned long long)m.prompt_tokens);
    metric_head(&b, "dsd_generation_tokens_total", "counter", "Tokens generated for HTTP jobs.");
    sb_printf(&b, "dsd_generation_tokens_total %llu\n", (unsigned long long)m.generation_tokens);
    metric_head(&b, "dsd_request_success_total", "counter",
                "HTTP jobs finished, by finish reason.");
    static const char *FR[] = {"stop", "length", "cancelled", "error"};
    for (int i = 0; i < 4; i++)
        sb_printf(&b, "dsd_request_success_total{finish_reason=\"%s\"} %llu\n", FR[i],
                  (unsigned long long)m.finished[i]);
    metric_head(&b, "dsd_client_disconnects_total", "counter",
                "HTTP clients that hung up before their job ended (the job was cancelled).");
    sb_printf(&b, "dsd_client_disconnects_total %llu\n", (unsigned long long)m.disconnects);
    metric_hist(&b, "dsd_time_to_first_token_seconds", "Time from submit to the first token.",
                &m.ttft);
    metric_hist(&b, "dsd_time_per_output_token_seconds", "Time between output tokens.", &m.tpot);
    metric_hist(&b, "dsd_e2e_request_latency_seconds", "Time from submit to the job's end.",
                &m.e2e);
    metrics_cluster(h, &b);
    if (b.oom) {
        free(b.p);
        return reply(c, 500, "text/plain", "out of memory\n", 14);
    }
    enum MHD_Result r =
        reply(c, 200, "text/plain; version=0.0.4; charset=utf-8", b.p ? b.p : "", b.n);
    free(b.p);
    return r;
}

/* The status page's data: the status, jobs and placement documents in one. */
static enum MHD_Result handle_api_status(struct dsd_http *h, struct MHD_Connection *c)
{
    char why[160];
    json_t *st = status_doc(h, "status", why, sizeof(why));
    if (!st)
        return reply_json(c, 503, json_pack("{s:s}", "error", why));
    json_t *jobs = status_doc(h, "jobs", why, sizeof(why));
    json_t *pl = status_doc(h, "placement", why, sizeof(why));
    struct metrics m;
    pthread_mutex_lock(&h->mu);
    m = h->m;
    pthread_mutex_unlock(&h->mu);
    return reply_json(
        c, 200,
        json_pack("{s:o,s:o,s:o,s:s,s:I,s:I}", "status", st, "jobs", jobs ? jobs : json_null(),
                  "placement", pl ? pl : json_null(), "model", h->model_id, "generation_tokens",
                  (json_int_t)m.generation_tokens, "prompt_tokens", (json_int_t)m.prompt_tokens));
}

/* ---- routing ------------------------------------------------------------------------------ */

struct conn {
    char *body;
    size_t len;
    bool too_large;
};

static bool authorized(struct dsd_http *h, struct MHD_Connection *c)
{
    if (!h->n_keys)
        return true;
    const char *a = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!a || strncasecmp(a, "Bearer ", 7))
        return false;
    a += 7;
    size_t al = strlen(a);
    bool ok = false;
    for (size_t i = 0; i < h->n_keys; i++) {
        size_t kl = strlen(h->keys[i]);
        unsigned diff = (unsigned)(kl != al);
        for (size_t j = 0; j < kl; j++) /* the same time whatever matches */
            diff |= (unsigned char)h->keys[i][j] ^ (unsigned char)(j < al ? a[j] : 0);
        ok |= diff == 0;
    }
    return ok;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls)
{
    struct dsd_http *h = cls;
    (void)version;
    struct conn *cn = *con_cls;
    dsd_http_error e = {0};
    bool post = !strcmp(method, "POST");
    if (!cn) {
        if (!(cn = calloc(1, sizeof(*cn))))
            return MHD_NO;
        *con_cls = cn;
        const char *cl =
            MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > h->max_body)
            cn->too_large = true; /* answered once the body is drained (or at once, below) */
        if (!cn->too_large)
            return MHD_YES;
    }
    if (*upload_size) {
        if (!cn->too_large && cn->len + *upload_size > h->max_body) {
            cn->too_large = true;
            free(cn->body);
            cn->body = NULL;
        }
        if (!cn->too_large) {
            char *nb = realloc(cn->body, cn->len + *upload_size + 1);
            if (!nb)
                return MHD_NO;
            memcpy(nb + cn->len, upload, *upload_size);
            cn->body = nb;
            cn->len += *upload_size;
            cn->body[cn->len] = 0;
        }
        *upload_size = 0;
        if (!cn->too_large)
            return MHD_YES;
    }
    int ep = !strcmp(url, "/v1/completions") ? 0 : !strcmp(url, "/v1/chat/completions") ? 1 : 2;
    if (cn->too_large) {
        dsd_http_error_set(&e, 413, "invalid_request_error", "request_too_large", NULL,
                           "the body is over %zu bytes (http_max_body_bytes)", h->max_body);
        count_request(h, ep, 413);
        return reply_error(c, &e);
    }
    /* public: the load balancer's probe and the static page (its data needs the key) */
    if (!strcmp(url, "/health") && !strcmp(method, "GET"))
        return handle_health(h, c);
    if (!strcmp(url, "/") && !strcmp(method, "GET"))
        return reply(c, 200, "text/html; charset=utf-8", dsd_http_status_page,
                     strlen(dsd_http_status_page));
    if (!authorized(h, c)) {
        dsd_http_error_set(&e, 401, "authentication_error", "invalid_api_key", NULL,
                           "a valid API key is required (Authorization: Bearer KEY)");
        count_request(h, ep, 401);
        return reply_error(c, &e);
    }
    if (ep < 2) {
        if (!post) {
            dsd_http_error_set(&e, 405, "invalid_request_error", NULL, NULL, "use POST");
            count_request(h, ep, 405);
            return reply_error(c, &e);
        }
        return handle_generate(h, c, ep ? DSD_HTTP_KIND_CHAT : DSD_HTTP_KIND_COMPLETION,
                               cn->body ? cn->body : "", cn->len);
    }
    enum MHD_Result r;
    unsigned code = 200; /* /metrics and /api/status answer 200 or 5xx: counted as 2xx here */
    if (!strcmp(method, "GET") && !strcmp(url, "/v1/models"))
        r = reply_json(c, 200, json_pack("{s:s,s:[o]}", "object", "list", "data", model_obj(h)));
    else if (!strcmp(method, "GET") && !strncmp(url, "/v1/models/", 11)) {
        if (strcmp(url + 11, h->model_id)) {
            dsd_http_error_set(&e, 404, "invalid_request_error", "model_not_found", "model",
                               "the model '%.100s' does not exist", url + 11);
            r = reply_error(c, &e);
            code = 404;
        } else
            r = reply_json(c, 200, model_obj(h));
    } else if (!strcmp(method, "GET") && !strcmp(url, "/metrics"))
        r = handle_metrics(h, c);
    else if (!strcmp(method, "GET") && !strcmp(url, "/api/status"))
        r = handle_api_status(h, c);
    else {
        dsd_http_error_set(&e, 404, "invalid_request_error", "not_found", NULL,
                           "no route %.16s %.200s", method, url);
        r = reply_error(c, &e);
        code = 404;
    }
    count_request(h, 2, code);
    return r;
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)cls;
    (void)c;
    (void)toe;
    struct conn *cn = *con_cls;
    if (cn) {
        free(cn->body);
        free(cn);
    }
    *con_cls = NULL;
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char buf[512];
    vsnprintf(buf, sizeof(buf), fmt, ap);
    size_t l = strlen(buf);
    while (l && buf[l - 1] == '\n')
        buf[--l] = 0;
    ds_log_info("http: %s", buf);
}

/* ---- start / stop ------------------------------------------------------------------------- */

static int load_keys(struct dsd_http *h, const char *path, ds_error *err)
{
    FILE *f = fopen(path, "re");
    if (!f)
        return ds_error_set(err, -errno, "http_api_keys_file %s: %s", path, strerror(errno));
    h->keys = calloc(MAX_KEYS, sizeof(*h->keys));
    if (!h->keys) {
        fclose(f);
        return ds_error_set(err, -ENOMEM, "out of memory");
    }
    char line[512];
    int lineno = 0, rc = 0;
    while (fgets(line, sizeof(line), f)) {
        lineno++;
        char *p = line, *end;
        while (*p == ' ' || *p == '\t')
            p++;
        end = p + strlen(p);
        while (end > p && (end[-1] == '\n' || end[-1] == '\r' || end[-1] == ' ' || end[-1] == '\t'))
            *--end = 0;
        if (!*p || *p == '#')
            continue;
        if ((size_t)(end - p) >= sizeof(h->keys[0]) || h->n_keys == MAX_KEYS || strpbrk(p, " \t")) {
            rc = ds_error_set(err, -EINVAL,
                              "http_api_keys_file %s:%d: a key is one word of at most %zu "
                              "bytes, at most %d keys",
                              path, lineno, sizeof(h->keys[0]) - 1, MAX_KEYS);
            break;
        }
        snprintf(h->keys[h->n_keys++], sizeof(h->keys[0]), "%s", p);
    }
    fclose(f);
    if (!rc && !h->n_keys)
        rc = ds_error_set(err, -EINVAL, "http_api_keys_file %s holds no key", path);
    return rc;
}

/* host:port (host may be *, an IPv4 address or [IPv6]) into a socket address. */
static int parse_bind(const char *bind, struct sockaddr_storage *ss, bool *loopback, ds_error *err)
{
    char host[128];
    const char *colon = strrchr(bind, ':');
    if (!colon || colon == bind || (size_t)(colon - bind) >= sizeof(host))
        return ds_error_set(err, -EINVAL, "http_bind '%s': expected HOST:PORT", bind);
    memcpy(host, bind, (size_t)(colon - bind));
    host[colon - bind] = 0;
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || port < 1 || port > 65535)
        return ds_error_set(err, -EINVAL, "http_bind '%s': bad port", bind);
    memset(ss, 0, sizeof(*ss));
    if (host[0] == '[') {
        size_t hl = strlen(host);
        if (hl < 3 || host[hl - 1] != ']')
            return ds_error_set(err, -EINVAL, "http_bind '%s': bad IPv6 address", bind);
        host[hl - 1] = 0;
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, host + 1, &a->sin6_addr) != 1)
            return ds_error_set(err, -EINVAL, "http_bind '%s': bad IPv6 address", bind);
        *loopback = IN6_IS_ADDR_LOOPBACK(&a->sin6_addr);
        return 0;
    }
    struct sockaddr_in *a = (struct sockaddr_in *)ss;
    a->sin_family = AF_INET;
    a->sin_port = htons((uint16_t)port);
    if (!strcmp(host, "*") || !strcmp(host, "0.0.0.0"))
        a->sin_addr.s_addr = htonl(INADDR_ANY);
    else if (!strcmp(host, "localhost"))
        a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    else if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
        return ds_error_set(err, -EINVAL, "http_bind '%s': bad IPv4 address", bind);
    *loopback = (ntohl(a->sin_addr.s_addr) >> 24) == 127;
    return 0;
}

int dsd_http_chat_template_find(const char *model, const char *file, char **text, size_t *len,
                                char *src, size_t srcn, ds_error *err)
{
    *text = NULL;
    *len = 0;
    if (file && file[0]) {
        snprintf(src, srcn, "%s", file);
        FILE *f = fopen(file, "re");
        if (!f)
            return ds_error_set(err, -errno, "chat_template_file %s: %s", file, strerror(errno));
        struct sbuf b = {0};
        char chunk[4096];
        size_t n;
        while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0 && b.n < (1u << 20))
            sb_put(&b, chunk, n);
        fclose(f);
        if (b.oom) {
            free(b.p);
            return ds_error_set(err, -ENOMEM, "out of memory");
        }
        *text = b.p;
        *len = b.n;
        return 0;
    }
    snprintf(src, srcn, "%s/tokenizer_config.json", model);
    json_t *j = json_load_file(src, 0, NULL);
    if (j) {
        json_t *t = json_object_get(j, "chat_template");
        if (json_is_array(t)) { /* [{"name": "default", "template": ...}, ...] */
            size_t i;
            json_t *x, *def = NULL;
            json_array_foreach(t, i, x)
            {
                const char *nm = json_string_value(json_object_get(x, "name"));
                if (nm && !strcmp(nm, "default"))
                    def = json_object_get(x, "template");
            }
            t = def;
        }
        if (json_is_string(t) && (*text = malloc(json_string_length(t) + 1))) {
            *len = json_string_length(t);
            memcpy(*text, json_string_value(t), *len + 1);
        }
        json_decref(j);
        return 0;
    }
    ds_gguf *g;
    ds_error gerr = {0};
    if (ds_gguf_open_split(model, &g, &gerr) == 0) {
        snprintf(src, srcn, "%s (tokenizer.chat_template)", model);
        ds_gguf_str s;
        if (ds_gguf_get_str(g, "tokenizer.chat_template", &s, &gerr) == 0 && s.len < (1u << 20) &&
            (*text = malloc(s.len + 1))) {
            memcpy(*text, s.ptr, s.len);
            (*text)[s.len] = 0;
            *len = s.len;
        }
        ds_gguf_free(g);
    }
    return 0;
}

/* The chat template: chat_template_file, else tokenizer_config.json's, else the GGUF's. */
static void load_chat(struct dsd_http *h, const dsd_opts *o)
{
    char *text = NULL, src[PATH_MAX + 64];
    size_t len = 0;
    ds_error err = {0};
    if (dsd_http_chat_template_find(o->model, o->chat_template_file, &text, &len, src, sizeof(src),
                                    &err) < 0)
        snprintf(h->chat_error, sizeof(h->chat_error), "%s", ds_error_str(&err));
    if (!h->chat_error[0]) {
        if (dsd_chat_template_detect(text, len, src, &h->chat, &err) == 0)
            h->have_chat = true;
        else
            snprintf(h->chat_error, sizeof(h->chat_error), "%s", ds_error_str(&err));
    }
    free(text);
    if (h->have_chat)
        ds_log_notice("http: chat template %s (from %s)", h->chat.name, src);
    else
        ds_log_warn("http: chat completions disabled: %s", h->chat_error);
    if (h->tok) {
        int32_t b = ds_tokenizer_bos_id(h->tok), e = ds_tokenizer_eos_id(h->tok);
        const char *bs = b >= 0 ? ds_tokenizer_id_to_token(h->tok, b) : NULL;
        const char *es = e >= 0 ? ds_tokenizer_id_to_token(h->tok, e) : NULL;
        snprintf(h->bos, sizeof(h->bos), "%s", bs ? bs : "");
        snprintf(h->eos, sizeof(h->eos), "%s", es ? es : "");
    }
}

int dsd_http_start(void *zctx, const dsd_opts *o, const char *client_ep, dsd_http **ret,
                   ds_error *err)
{
    struct dsd_http *h = calloc(1, sizeof(*h));
    if (!h)
        return ds_error_set(err, -ENOMEM, "out of memory");
    pthread_mutex_init(&h->mu, NULL);
    h->zctx = zctx;
    snprintf(h->client_ep, sizeof(h->client_ep), "%s", client_ep);
    h->max_body = (size_t)o->http_max_body_bytes;
    h->step_timeout_ms = o->step_timeout_ms;
    h->created = (long long)time(NULL);
    int rc;
    struct sockaddr_storage ss;
    bool loopback = false;
    if ((rc = parse_bind(o->http_bind, &ss, &loopback, err)) < 0)
        goto fail;
    if (o->http_api_keys_file[0] && (rc = load_keys(h, o->http_api_keys_file, err)) < 0)
        goto fail;
    if (!h->n_keys && !loopback) {
        ds_log_warn("http: no http_api_keys_file: serving on loopback only (127.0.0.1), not %s",
                    o->http_bind);
        uint16_t port = ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                 : ((struct sockaddr_in *)&ss)->sin_port;
        memset(&ss, 0, sizeof(ss));
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = port;
        a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    } else if (!h->n_keys)
        ds_log_notice("http: no http_api_keys_file: no authentication (loopback only)");
    /* the model's name for /v1/models: http_model_name, else the checkpoint's last path part */
    if (o->http_model_name[0])
        snprintf(h->model_id, sizeof(h->model_id), "%s", o->http_model_name);
    else {
        char tmp[PATH_MAX];
        snprintf(tmp, sizeof(tmp), "%s", o->model);
        size_t l = strlen(tmp);
        while (l > 1 && tmp[l - 1] == '/')
            tmp[--l] = 0;
        const char *base = strrchr(tmp, '/');
        snprintf(h->model_id, sizeof(h->model_id), "%s", base ? base + 1 : tmp);
    }
    ds_error terr = {0};
    if (ds_tokenizer_load(o->model, &h->tok, &terr) < 0) {
        ds_log_warn("http: no tokenizer (%s): prompts must be token ids", ds_error_str(&terr));
        h->tok = NULL;
    }
    /* the context a job gets: max_context capped by the model (as the scheduler does) */
    h->ctx_len = (uint32_t)o->max_context;
    ds_model_config mc;
    char cfgp[PATH_MAX + 16];
    snprintf(cfgp, sizeof(cfgp), "%s/config.json", o->model);
    ds_error cerr = {0};
    if (ds_model_config_load(cfgp, &mc, &cerr) == 0 && mc.max_position_embeddings &&
        mc.max_position_embeddings < h->ctx_len)
        h->ctx_len = mc.max_position_embeddings;
    load_chat(h, o);
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
                     MHD_USE_POLL | MHD_USE_ERROR_LOG;
    if (ss.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    h->mhd = MHD_start_daemon(flags, 0, NULL, NULL, on_request, h, MHD_OPTION_EXTERNAL_LOGGER,
                              on_mhd_log, h, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                              MHD_OPTION_CONNECTION_LIMIT, (unsigned)o->http_max_connections,
                              MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)o->http_max_connections,
                              MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)o->http_timeout_s,
                              MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(64 * 1024),
                              MHD_OPTION_NOTIFY_COMPLETED, on_completed, h, MHD_OPTION_END);
    if (!h->mhd) {
        rc = ds_error_set(err, -EADDRINUSE, "http_bind %s: cannot listen (%s)", o->http_bind,
                          strerror(errno));
        goto fail;
    }
    char shown[64];
    if (ss.ss_family == AF_INET)
        inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, shown, sizeof(shown));
    else
        inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, shown, sizeof(shown));
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(h->mhd, MHD_DAEMON_INFO_BIND_PORT);
    ds_log_notice("http: OpenAI API on http://%s:%u/v1 (model '%s', %zu API keys)", shown,
                  di ? di->port : 0, h->model_id, h->n_keys);
    *ret = h;
    return 0;
fail:
    dsd_http_stop(h);
    return rc;
}

dsd_http *dsd_http_stop(dsd_http *h)
{
    if (!h)
        return NULL;
    atomic_store(&h->stopping, true);
    if (h->mhd)
        MHD_stop_daemon(h->mhd); /* joins every connection thread (their waits are sliced) */
    ds_tokenizer_free(h->tok);
    free(h->keys);
    pthread_mutex_destroy(&h->mu);
    free(h);
    return NULL;
}
