/* dsd_http_gen.c — /v1/completions and /v1/chat/completions: a checked request becomes a
 * prompt (token ids, or text tokenized here, or messages rendered with the chat template), a
 * Submit on the client socket, then tokens: collected into one answer, or streamed as
 * server-sent events. A client that hangs up (its socket watched while waiting) has its job
 * cancelled; usage and the latency histograms are counted. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ds_log.h"
#include "dsd_http_impl.h"

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
    bool done;          /* nothing more to wait for (the job ended, or waiting failed) */
    bool job_over;      /* the coordinator ended the job (its last token, or an error) */
    bool gone;          /* the client hung up */
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
        if (g->job && !g->job_over) { /* the client went away, the server stops, a timeout */
            Dsd__Envelope env = DSD__ENVELOPE__INIT;
            Dsd__Cancel cc = DSD__CANCEL__INIT;
            cc.job = g->job;
            env.body_case = DSD__ENVELOPE__BODY_CANCEL;
            env.cancel = &cc;
            http_zsend(g->sock, &env);
            ds_log_notice("http: job %llu cancelled: %s", (unsigned long long)g->job,
                          g->gone                        ? "its client is gone"
                          : atomic_load(&g->h->stopping) ? "the server stops"
                                                         : "no token within the step timeout");
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
    if (!(g->sock = http_zsock_open(h))) {
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
    int rc = http_zsend(g->sock, &env);
    free(ids);
    if (rc < 0) {
        dsd_http_error_set(e, 500, "server_error", NULL, NULL, "cannot reach the coordinator");
        return rc;
    }
    g->t_start = http_now_ns();
    Dsd__Envelope *rep = NULL;
    rc = http_zrecv(h, g->sock, 10000, &g->fd, &rep);
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
        int rc = http_zrecv(h, g->sock, (int)h->step_timeout_ms * 2 + 5000, &g->fd, env);
        if (rc == -ECONNRESET) {
            g->gone = true;
            pthread_mutex_lock(&h->mu);
            h->m.disconnects++;
            pthread_mutex_unlock(&h->mu);
            return rc;
        }
        if (rc < 0) {
            g->finish = "error"; /* the job still runs: gen_free cancels it */
            g->done = true;
            return rc;
        }
        Dsd__Envelope *m = *env;
        if (m->body_case == DSD__ENVELOPE__BODY_ERROR) {
            ds_log_warn("http: job %llu: %s", (unsigned long long)g->job,
                        m->error->message ? m->error->message : "error");
            g->finish = "error";
            g->done = g->job_over = true;
            return 0;
        }
        if (m->body_case != DSD__ENVELOPE__BODY_TOKEN || m->token->job != g->job) {
            ds_wire_free(m);
            *env = NULL;
            continue;
        }
        Dsd__Token *t = m->token;
        uint64_t now = http_now_ns();
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
                http_hist_add(&h->m.ttft, (double)(now - g->t_start) / 1e9);
            else
                http_hist_add(&h->m.tpot, (double)(now - g->t_last) / 1e9);
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
            g->done = g->job_over = true;
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
        http_hist_add(&h->m.e2e, (double)(http_now_ns() - g->t_start) / 1e9);
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
    http_sb_put(&g->out, "data: ", 6);
    http_sb_put(&g->out, s, strlen(s));
    http_sb_put(&g->out, "\n\n", 2);
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
            http_sb_put(&g->out, "data: ", 6);
            http_sb_put(&g->out, s, strlen(s));
            http_sb_put(&g->out, "\n\n", 2);
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
    http_sb_put(&g->out, "data: [DONE]\n\n", 14);
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
        /* the connection ended before the stream did: the client hung up (noticed by us, or
         * by libmicrohttpd when a write failed), unless the server stops */
        if (!g->gone && !atomic_load(&g->h->stopping)) {
            g->gone = true;
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

enum MHD_Result http_handle_generate(struct dsd_http *h, struct MHD_Connection *c,
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
        http_count_request(h, ep, 200);
        return ret;
    }
    for (;;) {
        Dsd__Envelope *env;
        const char *text;
        size_t tl;
        int rc = gen_next(g, &env, &text, &tl);
        if (rc > 0)
            http_sb_put(&g->text, text, tl);
        ds_wire_free(env);
        if (rc < 0 && g->gone) {
            gen_account(g);
            gen_free(g);
            http_count_request(h, ep, 499);
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
    http_count_request(h, ep, res ? 200 : 500);
    return http_reply_json(c, 200, res);
fail:
    if (g->gone) {
        gen_free(g);
        http_count_request(h, ep, 499);
        return MHD_NO;
    }
    gen_free(g);
    http_count_request(h, ep, (unsigned)e.status);
    return http_reply_error(c, &e);
}
