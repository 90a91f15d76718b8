/* client.c — libdsclient (ds_client.h).
 *
 * A handle owns one DEALER socket and a queue of messages that arrived for someone else
 * (another job or request of the same handle). Calls hold the handle's mutex only while they
 * touch the socket or the queue, and wait in short slices, so threads pulling different jobs
 * on one handle make progress together. The last error message has a lock of its own (it is
 * set with or without the handle's mutex held) and is read out as a per-thread copy.
 *
 * A job the caller cancelled keeps streaming until the coordinator hears of it: its tokens
 * are dropped as they arrive (and those already queued at the cancel), only the final
 * notice is kept for a caller who pulls to the end; a job abandoned by ds_client_generate
 * (nobody will pull it) has its final notice dropped too. So nothing of a cancelled job stays
 * queued for ever. */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <zmq.h>

#include "ds_client.h"
#include "ds_wire.h"

#define SLICE_MS      20
#define NEXT_PROBE_MS 2000 /* a job silent this long: ask whether the coordinator still runs it */
#define MAX_QUEUE     65536
#define MAX_CANCELLED 256 /* cancelled jobs whose stream may still be arriving */

struct qmsg {
    struct qmsg *next;
    Dsd__Envelope *env;
};

struct ds_client {
    pthread_mutex_t mu;
    void *ctx, *sock;
    int timeout_ms;
    int submit_retry_ms; /* ds_client_opts.submit_retry_ms */
    uint64_t next_req;
    struct qmsg *head, *tail;
    size_t n_queued;
    /* cancelled jobs (a ring: the oldest entry is reused when full) */
    struct {
        uint64_t job;   /* 0: free */
        bool keep_last; /* keep the final notice (ds_client_cancel) or drop it too */
    } cancelled[MAX_CANCELLED];
    uint32_t next_cancelled;
    /* request ids of the cancels sent: nobody waits for their answer (an Error for a job that
     * already ended), so it is dropped on arrival */
    uint64_t cancel_reqs[MAX_CANCELLED];
    uint32_t next_cancel_req;
    pthread_mutex_t err_mu; /* guards err */
    char err[512];
    char instance[40]; /* the coordinator process whose jobs this handle follows ("" unknown) */
};

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static int set_err(ds_client *c, int code, const char *fmt, ...)
{
    char msg[sizeof(c->err)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&c->err_mu);
    memcpy(c->err, msg, sizeof(msg));
    pthread_mutex_unlock(&c->err_mu);
    return code;
}

static int map_code(Dsd__ErrorCode code)
{
    switch (code) {
    case DSD__ERROR_CODE__ERROR_CODE_VERSION:
        return -EPROTONOSUPPORT;
    case DSD__ERROR_CODE__ERROR_CODE_MALFORMED:
        return -EINVAL;
    case DSD__ERROR_CODE__ERROR_CODE_TOO_LARGE:
        return -EMSGSIZE;
    case DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_JOB:
        return -ESRCH;
    case DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT:
        return -ENOENT;
    case DSD__ERROR_CODE__ERROR_CODE_BUSY:
        return -EBUSY;
    case DSD__ERROR_CODE__ERROR_CODE_FORBIDDEN:
        return -EPERM;
    default:
        return -EIO;
    }
}

int ds_client_connect(const char *endpoint, const ds_client_opts *opts, ds_client **ret)
{
    ds_client *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    pthread_mutex_init(&c->mu, NULL);
    pthread_mutex_init(&c->err_mu, NULL);
    c->timeout_ms = opts && opts->timeout_ms > 0 ? opts->timeout_ms : 30000;
    c->submit_retry_ms = opts && opts->submit_retry_ms > 0 ? opts->submit_retry_ms : 0;
    c->ctx = zmq_ctx_new();
    c->sock = c->ctx ? zmq_socket(c->ctx, ZMQ_DEALER) : NULL;
    if (!c->sock) {
        ds_client_close(c);
        return -ENOMEM;
    }
    int zero = 0;
    zmq_setsockopt(c->sock, ZMQ_LINGER, &zero, sizeof(zero));
    if (opts && opts->server_public_key) {
        char pub[41], sec[41];
        const char *p = opts->public_key, *s = opts->secret_key;
        if (!p || !s) {
            if (zmq_curve_keypair(pub, sec) < 0) {
                ds_client_close(c);
                return -ENOTSUP;
            }
            p = pub;
            s = sec;
        }
        if (zmq_setsockopt(c->sock, ZMQ_CURVE_SERVERKEY, opts->server_public_key, 40) < 0 ||
            zmq_setsockopt(c->sock, ZMQ_CURVE_PUBLICKEY, p, 40) < 0 ||
            zmq_setsockopt(c->sock, ZMQ_CURVE_SECRETKEY, s, 40) < 0) {
            ds_client_close(c);
            return -EINVAL;
        }
    }
    if (zmq_connect(c->sock, endpoint) < 0) {
        ds_client_close(c);
        return -EINVAL;
    }
    *ret = c;
    return 0;
}

ds_client *ds_client_close(ds_client *c)
{
    if (!c)
        return NULL;
    while (c->head) {
        struct qmsg *q = c->head;
        c->head = q->next;
        ds_wire_free(q->env);
        free(q);
    }
    if (c->sock)
        zmq_close(c->sock);
    if (c->ctx)
        zmq_ctx_term(c->ctx);
    pthread_mutex_destroy(&c->mu);
    pthread_mutex_destroy(&c->err_mu);
    free(c);
    return NULL;
}

const char *ds_client_error(ds_client *c)
{
    static __thread char copy[sizeof(((ds_client *)0)->err)];
    if (!c)
        return "no handle";
    pthread_mutex_lock(&c->err_mu);
    memcpy(copy, c->err, sizeof(copy));
    pthread_mutex_unlock(&c->err_mu);
    return copy;
}

/* The cancelled-jobs entry of job, or NULL (locked by the caller). */
static int cancelled_find(ds_client *c, uint64_t job)
{
    for (int i = 0; job && i < MAX_CANCELLED; i++)
        if (c->cancelled[i].job == job)
            return i;
    return -1;
}

/* Whether a message that arrived should be dropped (locked by the caller): any token of a
 * cancelled job but its final notice, which is kept when the caller may still pull it (the
 * final notice ends the entry: nothing of the job comes after it); the answer to a cancel. */
static bool drop_token(ds_client *c, const Dsd__Envelope *env)
{
    if (env->body_case == DSD__ENVELOPE__BODY_ERROR) {
        for (int i = 0; env->request_id && i < MAX_CANCELLED; i++)
            if (c->cancel_reqs[i] == env->request_id)
                return true;
        return false;
    }
    if (env->body_case != DSD__ENVELOPE__BODY_TOKEN)
        return false;
    int i = cancelled_find(c, env->token->job);
    if (i < 0)
        return false;
    if (!env->token->last)
        return true;
    bool keep = c->cancelled[i].keep_last;
    c->cancelled[i].job = 0;
    return !keep;
}

/* Drops the queued messages drop_token refuses now (locked by the caller). */
static void queue_purge(ds_client *c)
{
    struct qmsg *prev = NULL, *q = c->head;
    while (q) {
        struct qmsg *next = q->next;
        if (drop_token(c, q->env)) {
            if (prev)
                prev->next = next;
            else
                c->head = next;
            if (c->tail == q)
                c->tail = prev;
            c->n_queued--;
            ds_wire_free(q->env);
            free(q);
        } else {
            prev = q;
        }
        q = next;
    }
}

/* Sends env (locked by the caller). */
static int send_env(ds_client *c, Dsd__Envelope *env)
{
    uint8_t *buf;
    size_t len;
    int rc = ds_wire_pack(env, &buf, &len);
    if (rc < 0)
        return set_err(c, rc, "cannot encode the request");
    rc = zmq_send(c->sock, buf, len, ZMQ_DONTWAIT) < 0 ? -zmq_errno() : 0;
    free(buf);
    if (rc == -EAGAIN)
        return set_err(c, -ETIMEDOUT, "the coordinator is not reachable");
    return rc < 0 ? set_err(c, rc, "send: %s", zmq_strerror(-rc)) : 0;
}

/* Reads every waiting message into the queue (locked by the caller). */
static void pump(ds_client *c)
{
    for (int guard = 0; guard < 4096; guard++) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, c->sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            return;
        }
        int more = 0;
        size_t sz = sizeof(more);
        zmq_getsockopt(c->sock, ZMQ_RCVMORE, &more, &sz);
        Dsd__Envelope *env = NULL;
        bool ok = !more && ds_wire_unpack(zmq_msg_data(&m), zmq_msg_size(&m), &env, NULL) == 0;
        zmq_msg_close(&m);
        while (more) { /* the server never sends tensor frames to clients: drop them */
            zmq_msg_init(&m);
            zmq_msg_recv(&m, c->sock, 0);
            zmq_msg_close(&m);
            zmq_getsockopt(c->sock, ZMQ_RCVMORE, &more, &sz);
        }
        if (!ok || c->n_queued >= MAX_QUEUE || drop_token(c, env)) {
            if (env)
                ds_wire_free(env);
            continue;
        }
        struct qmsg *q = calloc(1, sizeof(*q));
        if (!q) {
            ds_wire_free(env);
            continue;
        }
        q->env = env;
        if (c->tail)
            c->tail->next = q;
        else
            c->head = q;
        c->tail = q;
        c->n_queued++;
    }
}

typedef bool (*match_fn)(const Dsd__Envelope *env, uint64_t key);

/* Waits for a queued message that match() accepts and removes it from the queue. */
static int wait_for(ds_client *c, match_fn match, uint64_t key, int timeout_ms, Dsd__Envelope **out)
{
    uint64_t deadline = now_ms() + (uint64_t)(timeout_ms < 0 ? c->timeout_ms : timeout_ms);
    for (;;) {
        pthread_mutex_lock(&c->mu);
        pump(c);
        struct qmsg *prev = NULL;
        for (struct qmsg *q = c->head; q; prev = q, q = q->next)
            if (match(q->env, key)) {
                if (prev)
                    prev->next = q->next;
                else
                    c->head = q->next;
                if (c->tail == q)
                    c->tail = prev;
                c->n_queued--;
                pthread_mutex_unlock(&c->mu);
                *out = q->env;
                free(q);
                return 0;
            }
        uint64_t now = now_ms();
        if (now >= deadline) {
            pthread_mutex_unlock(&c->mu);
            return set_err(c, -ETIMEDOUT, "no answer from the coordinator in time");
        }
        zmq_pollitem_t it = {.socket = c->sock, .events = ZMQ_POLLIN};
        long slice = (long)(deadline - now) < SLICE_MS ? (long)(deadline - now) : SLICE_MS;
        zmq_poll(&it, 1, slice);
        pthread_mutex_unlock(&c->mu);
    }
}

static bool match_req(const Dsd__Envelope *env, uint64_t req)
{
    return env->request_id == req && (env->body_case == DSD__ENVELOPE__BODY_STATUS_REPLY ||
                                      env->body_case == DSD__ENVELOPE__BODY_ERROR);
}

static bool match_job(const Dsd__Envelope *env, uint64_t job)
{
    return env->body_case == DSD__ENVELOPE__BODY_TOKEN && env->token->job == job;
}

/* Sends env and waits for its StatusReply; *json gets a copy, *job (may be NULL) its job. */
static int call_reply(ds_client *c, Dsd__Envelope *env, char **json, uint64_t *job)
{
    pthread_mutex_lock(&c->mu);
    uint64_t req = env->request_id = ++c->next_req;
    int rc = send_env(c, env);
    pthread_mutex_unlock(&c->mu);
    if (rc < 0)
        return rc;
    Dsd__Envelope *r = NULL;
    if ((rc = wait_for(c, match_req, req, -1, &r)) < 0)
        return rc;
    if (r->body_case == DSD__ENVELOPE__BODY_ERROR) {
        rc = set_err(c, map_code(r->error->code), "%s", r->error->message ? r->error->message : "");
    } else {
        if (job)
            *job = r->status_reply->job;
        if (json) {
            *json = strdup(r->status_reply->json ? r->status_reply->json : "null");
            rc = *json ? 0 : -ENOMEM;
        }
    }
    ds_wire_free(r);
    return rc;
}

static int call(ds_client *c, Dsd__Envelope *env, char **json)
{
    return call_reply(c, env, json, NULL);
}

int ds_client_submit(ds_client *c, const ds_client_request *req, uint64_t *job)
{
    if (!c || !req || !job || (!req->n_tokens && !req->prompt))
        return -EINVAL;
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__Submit sb = DSD__SUBMIT__INIT;
    Dsd__Sampling sm = DSD__SAMPLING__INIT;
    sm.temperature = req->temperature;
    sm.top_p = req->top_p;
    sm.top_k = req->top_k;
    sm.seed = req->seed;
    sb.prompt = (char *)(req->prompt ? req->prompt : "");
    sb.n_tokens = req->n_tokens;
    sb.tokens = (uint32_t *)req->tokens;
    sb.sampling = &sm;
    sb.max_tokens = req->max_tokens;
    sb.n_stop = req->n_stop;
    sb.stop = (char **)req->stop;
    env.body_case = DSD__ENVELOPE__BODY_SUBMIT;
    env.submit = &sb;
    uint64_t id = 0, t0 = now_ms();
    int rc;
    for (;;) {
        rc = call_reply(c, &env, NULL, &id);
        /* refused before it started (no plan serving): safe to send again */
        bool not_started = rc == -EBUSY && (strstr(ds_client_error(c), "not serving") ||
                                            strstr(ds_client_error(c), "no plan is installed"));
        if (!not_started ||
            now_ms() - t0 >= (uint64_t)(c->submit_retry_ms > 0 ? c->submit_retry_ms : 0))
            break;
        struct timespec ts = {0, 100 * 1000000L};
        nanosleep(&ts, NULL);
    }
    if (rc < 0)
        return rc;
    if (!id)
        return set_err(c, -EIO, "bad acknowledgement (no job id)");
    *job = id;
    return 0;
}

/* Whether the coordinator still runs job: 1 when it answers that it does not (another
 * process answers: it restarted, or the job is not in its list), 0 when it does, < 0 when it
 * does not answer within timeout_ms. */
static int job_lost(ds_client *c, uint64_t job, int timeout_ms, char *why, size_t why_len)
{
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__StatusRequest sr = DSD__STATUS_REQUEST__INIT;
    sr.what = "jobs";
    env.body_case = DSD__ENVELOPE__BODY_STATUS_REQUEST;
    env.status_request = &sr;
    pthread_mutex_lock(&c->mu);
    uint64_t req = env.request_id = ++c->next_req;
    int rc = send_env(c, &env);
    pthread_mutex_unlock(&c->mu);
    Dsd__Envelope *r = NULL;
    if (rc < 0 || (rc = wait_for(c, match_req, req, timeout_ms, &r)) < 0)
        return rc < 0 ? rc : -ETIMEDOUT;
    const char *js = r->body_case == DSD__ENVELOPE__BODY_STATUS_REPLY && r->status_reply->json
                         ? r->status_reply->json
                         : "";
    char inst[40] = "", pat[48];
    const char *ip = strstr(js, "\"instance\":\"");
    if (ip)
        sscanf(ip + 12, "%39[0-9a-f]", inst);
    snprintf(pat, sizeof(pat), "{\"id\":%llu,", (unsigned long long)job);
    int lost = 0;
    pthread_mutex_lock(&c->mu);
    if (inst[0] && !c->instance[0])
        snprintf(c->instance, sizeof(c->instance), "%s", inst);
    if (inst[0] && strcmp(inst, c->instance)) {
        snprintf(why, why_len,
                 "the coordinator restarted (process %s, now %s): job %llu is lost; submit it "
                 "again",
                 c->instance, inst, (unsigned long long)job);
        lost = 1;
    } else if (inst[0] && !strstr(js, pat)) { /* a jobs list (it has the instance) without it */
        snprintf(why, why_len, "the coordinator does not run job %llu (any more); submit it again",
                 (unsigned long long)job);
        lost = 1;
    }
    pthread_mutex_unlock(&c->mu);
    ds_wire_free(r);
    return lost;
}

int ds_client_next(ds_client *c, uint64_t job, ds_client_token *tok, int timeout_ms)
{
    Dsd__Envelope *r = NULL;
    uint64_t deadline = now_ms() + (uint64_t)(timeout_ms < 0 ? c->timeout_ms : timeout_ms);
    int rc;
    /* waits in slices of NEXT_PROBE_MS; after a silent slice it asks the coordinator whether
     * it still runs the job, so a job lost with a coordinator that restarted ends with an
     * error saying so instead of this wait's timeout */
    for (;;) {
        uint64_t now = now_ms(), left = deadline > now ? deadline - now : 0;
        rc = wait_for(c, match_job, job, (int)(left < NEXT_PROBE_MS ? left : NEXT_PROBE_MS), &r);
        if (rc != -ETIMEDOUT || now_ms() >= deadline)
            break;
        char why[256];
        left = deadline - now_ms();
        if (job_lost(c, job, (int)(left < NEXT_PROBE_MS ? left : NEXT_PROBE_MS), why,
                     sizeof(why)) == 1 &&
            (rc = wait_for(c, match_job, job, 1000, &r)) == -ETIMEDOUT) /* it may just have ended */
            return set_err(c, -EIO, "%s", why);
        if (rc == 0)
            break;
    }
    if (rc < 0)
        return rc;
    memset(tok, 0, sizeof(*tok));
    tok->job = r->token->job;
    tok->id = r->token->id;
    tok->last = r->token->last;
    const char *fr = r->token->finish_reason ? r->token->finish_reason : "";
    /* a bare end notice (cancelled, error) carries no token */
    tok->has_id = !(tok->last && (!strcmp(fr, "cancelled") || !strcmp(fr, "error")));
    snprintf(tok->finish_reason, sizeof(tok->finish_reason), "%s", fr);
    /* why a job could not go on: ds_client_error() says it */
    if (tok->last && !strcmp(fr, "error"))
        set_err(c, 0, "job %llu ended with an error: %s", (unsigned long long)tok->job,
                r->token->error && r->token->error[0] ? r->token->error : "(no reason given)");
    const char *tx = r->token->text ? r->token->text : "";
    tok->text_len = strnlen(tx, sizeof(tok->text) - 1);
    memcpy(tok->text, tx, tok->text_len);
    tok->text[tok->text_len] = 0;
    ds_wire_free(r);
    return 0;
}

/* Cancels job; keep_last: its final notice stays for the caller to pull. */
static int cancel_job(ds_client *c, uint64_t job, bool keep_last)
{
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__Cancel cc = DSD__CANCEL__INIT;
    cc.job = job;
    env.body_case = DSD__ENVELOPE__BODY_CANCEL;
    env.cancel = &cc;
    pthread_mutex_lock(&c->mu);
    env.request_id = ++c->next_req;
    int rc = send_env(c, &env);
    if (rc == 0 && job) {
        pump(c); /* what arrived before the cancel went out */
        int i = cancelled_find(c, job);
        if (i < 0) {
            i = (int)(c->next_cancelled++ % MAX_CANCELLED);
            c->cancelled[i].job = job;
        }
        c->cancelled[i].keep_last = keep_last;
        queue_purge(c);
    }
    if (rc == 0)
        c->cancel_reqs[c->next_cancel_req++ % MAX_CANCELLED] = env.request_id;
    pthread_mutex_unlock(&c->mu);
    return rc;
}

int ds_client_generate(ds_client *c, const ds_client_request *req, ds_client_token_fn fn, void *ctx,
                       uint64_t *job_out)
{
    uint64_t job;
    int rc = ds_client_submit(c, req, &job);
    if (rc < 0)
        return rc;
    if (job_out)
        *job_out = job;
    for (;;) {
        ds_client_token t;
        /* nobody pulls the job after these returns: cancel it and drop all it still sends */
        if ((rc = ds_client_next(c, job, &t, -1)) < 0) {
            cancel_job(c, job, false);
            return rc;
        }
        if (fn(ctx, &t)) {
            cancel_job(c, job, false);
            return set_err(c, -ECANCELED, "cancelled by the callback");
        }
        if (t.last)
            return !strcmp(t.finish_reason, "error") ? set_err(c, -EIO,
                                                               "the job failed on the "
                                                               "cluster")
                                                     : 0;
    }
}

int ds_client_cancel(ds_client *c, uint64_t job)
{
    return cancel_job(c, job, true);
}

int ds_client_status(ds_client *c, const char *what, char **json)
{
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__StatusRequest sr = DSD__STATUS_REQUEST__INIT;
    sr.what = (char *)what;
    env.body_case = DSD__ENVELOPE__BODY_STATUS_REQUEST;
    env.status_request = &sr;
    return call(c, &env, json);
}

int ds_client_drain(ds_client *c, const char *node, bool undrain, char **json)
{
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__Drain dr = DSD__DRAIN__INIT;
    dr.node = (char *)node;
    dr.undrain = undrain;
    env.body_case = DSD__ENVELOPE__BODY_DRAIN;
    env.drain = &dr;
    char *tmp = NULL;
    int rc = call(c, &env, json ? json : &tmp);
    free(tmp);
    return rc;
}

int ds_client_replan(ds_client *c, char **json)
{
    return ds_client_status(c, "replan", json);
}
