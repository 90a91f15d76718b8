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
 * This file: the routes, auth, limits, start/stop; the helpers every part shares are
 * dsd_http_io.c (dsd_http_impl.h), generation is dsd_http_gen.c, health and metrics
 * dsd_http_metrics.c.
 * Invariants: every wait is sliced (DSD_HTTP_SLICE_MS) so shutdown ends every connection
 * promptly; the metrics are the only state shared between connections (one mutex). */
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
#include "ds_gguf.h"
#include "ds_log.h"
#include "dsd_http.h"
#include "dsd_http_impl.h"

extern const char dsd_http_status_page[]; /* daemon/www/status.html, compiled in */

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
        http_count_request(h, ep, 413);
        return http_reply_error(c, &e);
    }
    /* public: the load balancer's probe and the static page (its data needs the key) */
    if (!strcmp(url, "/health") && !strcmp(method, "GET"))
        return http_handle_health(h, c);
    if (!strcmp(url, "/") && !strcmp(method, "GET"))
        return http_reply(c, 200, "text/html; charset=utf-8", dsd_http_status_page,
                          strlen(dsd_http_status_page));
    if (!authorized(h, c)) {
        dsd_http_error_set(&e, 401, "authentication_error", "invalid_api_key", NULL,
                           "a valid API key is required (Authorization: Bearer KEY)");
        http_count_request(h, ep, 401);
        return http_reply_error(c, &e);
    }
    if (ep < 2) {
        if (!post) {
            dsd_http_error_set(&e, 405, "invalid_request_error", NULL, NULL, "use POST");
            http_count_request(h, ep, 405);
            return http_reply_error(c, &e);
        }
        return http_handle_generate(h, c, ep ? DSD_HTTP_KIND_CHAT : DSD_HTTP_KIND_COMPLETION,
                                    cn->body ? cn->body : "", cn->len);
    }
    enum MHD_Result r;
    unsigned code = 200; /* /metrics and /api/status answer 200 or 5xx: counted as 2xx here */
    if (!strcmp(method, "GET") && !strcmp(url, "/v1/models"))
        r = http_reply_json(c, 200,
                            json_pack("{s:s,s:[o]}", "object", "list", "data", http_model_obj(h)));
    else if (!strcmp(method, "GET") && !strncmp(url, "/v1/models/", 11)) {
        if (strcmp(url + 11, h->model_id)) {
            dsd_http_error_set(&e, 404, "invalid_request_error", "model_not_found", "model",
                               "the model '%.100s' does not exist", url + 11);
            r = http_reply_error(c, &e);
            code = 404;
        } else
            r = http_reply_json(c, 200, http_model_obj(h));
    } else if (!strcmp(method, "GET") && !strcmp(url, "/metrics"))
        r = http_handle_metrics(h, c);
    else if (!strcmp(method, "GET") && !strcmp(url, "/api/status"))
        r = http_handle_api_status(h, c);
    else {
        dsd_http_error_set(&e, 404, "invalid_request_error", "not_found", NULL,
                           "no route %.16s %.200s", method, url);
        r = http_reply_error(c, &e);
        code = 404;
    }
    http_count_request(h, 2, code);
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
            http_sb_put(&b, chunk, n);
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
    int crc = ds_model_config_load(cfgp, &mc, &cerr);
    ds_gguf *g;
    if (crc < 0 && ds_gguf_open_split(o->model, &g, &cerr) == 0) { /* a GGUF model */
        crc = ds_model_config_from_gguf(g, &mc, &cerr);
        ds_gguf_free(g);
    }
    if (crc == 0 && mc.max_position_embeddings && mc.max_position_embeddings < h->ctx_len)
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
