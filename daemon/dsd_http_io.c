/* dsd_http_io.c — what the HTTP server's parts share (dsd_http_impl.h): clocks, the metrics'
 * histograms and counters, a growing string buffer, replies (JSON, OpenAI errors), and the
 * inproc ZeroMQ exchange with the coordinator's client socket (sliced waits that also watch
 * the HTTP client's TCP socket, so a hang-up is seen at once). */
#include <errno.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "ds_config.h"
#include "ds_log.h"
#include "dsd_http_impl.h"

const double DSD_HTTP_BUCKETS[N_BUCKETS] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08,
                                            0.1,   0.25,  0.5,  1,    2.5,  5,    10};

/* ---- small helpers ------------------------------------------------------------------------ */

uint64_t http_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void http_hist_add(struct histogram *hg, double v)
{
    size_t i = 0;
    while (i < N_BUCKETS && v > DSD_HTTP_BUCKETS[i])
        i++;
    hg->counts[i]++;
    hg->sum += v;
    hg->n++;
}

void http_count_request(struct dsd_http *h, int endpoint, unsigned status)
{
    unsigned cls = status / 100;
    if (cls < 2 || cls > 5)
        cls = 5;
    pthread_mutex_lock(&h->mu);
    h->m.requests[endpoint][cls]++;
    pthread_mutex_unlock(&h->mu);
}

void http_sb_put(struct sbuf *b, const char *s, size_t l)
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

void http_sb_printf(struct sbuf *b, const char *fmt, ...)
{
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n < sizeof(tmp)) {
        http_sb_put(b, tmp, (size_t)n);
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
    http_sb_put(b, big, (size_t)n);
    free(big);
}

/* Queues a response of `len` bytes copied from body. */
enum MHD_Result http_reply(struct MHD_Connection *c, unsigned status, const char *type,
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

enum MHD_Result http_reply_json(struct MHD_Connection *c, unsigned status, json_t *o)
{
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (!s)
        return http_reply(c, 500, "application/json", "{}", 2);
    enum MHD_Result r = http_reply(c, status, "application/json", s, strlen(s));
    free(s);
    return r;
}

enum MHD_Result http_reply_error(struct MHD_Connection *c, const dsd_http_error *e)
{
    char *s = dsd_http_error_json(e);
    if (!s)
        return http_reply(c, 500, "application/json", "{}", 2);
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

void *http_zsock_open(struct dsd_http *h)
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

int http_zsend(void *s, Dsd__Envelope *env)
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
int http_zrecv(struct dsd_http *h, void *s, int timeout_ms, int *fd, Dsd__Envelope **out)
{
    uint64_t end = http_now_ns() + (uint64_t)timeout_ms * 1000000ull;
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
        if (http_now_ns() >= end)
            return -ETIMEDOUT;
    }
}

/* A status document of the coordinator (dsd_status_json), or NULL with why. */
json_t *http_status_doc(struct dsd_http *h, const char *what, char *why, size_t wl)
{
    void *s = http_zsock_open(h);
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
    if (http_zsend(s, &env) < 0)
        snprintf(why, wl, "cannot reach the coordinator loop");
    else if (http_zrecv(h, s, 3000, NULL, &rep) < 0)
        snprintf(why, wl, "the coordinator loop did not answer in 3 s");
    else if (rep->body_case != DSD__ENVELOPE__BODY_STATUS_REPLY || !rep->status_reply->json)
        snprintf(why, wl, "the coordinator refused the status request");
    else if (!(r = json_loads(rep->status_reply->json, 0, NULL)))
        snprintf(why, wl, "the coordinator's status is not JSON");
    ds_wire_free(rep);
    zmq_close(s);
    return r;
}
