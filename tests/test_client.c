/* test_client.c — libdsclient against a real coordinator (a dsd process that also computes):
 * streaming (tokens equal to the in-process engine's, via `dsctl generate --local`), pull and
 * callback modes, cancel mid-generation, many concurrent clients, a client that disconnects
 * mid-stream (its job is cancelled), malformed and oversized requests (refused, server
 * unharmed). */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <zmq.h>

#include "ds_client.h"
#include "ds_wire.h"
#include "client_expect.h"
#include "cluster/dsd_spawn.h"
#include "ds_tokenizer.h"

static struct dsd_proc g_dsd;

static int local_tokens(const char *prompt, int n, uint32_t *out)
{
    char args[256];
    snprintf(args, sizeof(args), "--tokens %s", prompt);
    return dsd_local_ids(args, n, out);
}

static int setup(void **state)
{
    (void)state;
    /* models/tiny: its 512 positions let a job run long enough (hundreds of tokens) that a
     * cancel or a disconnect lands mid-generation whatever the machine's speed */
    if (dsd_spawn(&g_dsd, (const char *const[]){"--max_request_bytes=4096", "--max_jobs=32",
                                            "--model=" DS_TEST_DATA "/../../models/tiny",
                                            /* protocol tests: a trivial plan keeps start-up
                                             * fast under ASan on a loaded machine */
                                            "--plan_strategy=round-robin", NULL},
                  NULL) < 0)
        return -1;
    /* wait (bounded) for it to serve */
    for (int i = 0; i < 200; i++) {
        ds_client *c;
        char *js = NULL;
        ds_client_opts o = {.timeout_ms = 200};
        if (ds_client_connect(g_dsd.client_ep, &o, &c) == 0) {
            int rc = ds_client_status(c, "status", &js);
            ds_client_close(c);
            if (rc == 0 && strstr(js, "\"state\":\"serving\"")) {
                free(js);
                return 0;
            }
            free(js);
        }
        dsd_sleep_ms(50);
    }
    fprintf(stderr, "dsd did not reach serving; its log (%s):\n", g_dsd.log);
    FILE *f = fopen(g_dsd.log, "r");
    char line[1024];
    while (f && fgets(line, sizeof(line), f))
        fputs(line, stderr);
    if (f)
        fclose(f);
    return -1;
}

static int teardown(void **state)
{
    (void)state;
    return dsd_stop(&g_dsd) == 0 ? 0 : -1;
}

static ds_client *conn(void)
{
    ds_client *c = NULL;
    ds_client_opts o = {.timeout_ms = 20000};
    assert_int_equal(ds_client_connect(g_dsd.client_ep, &o, &c), 0);
    return c;
}

static void test_stream_matches_local(void **state)
{
    (void)state;
    uint32_t want[12];
    assert_int_equal(local_tokens("5,6,7", 12, want), 12);
    ds_client *c = conn();
    static const uint32_t prompt[] = {5, 6, 7};
    expect_stream(c, prompt, 3, want, 12);
    ds_client_close(c);
}

struct cb_ctx {
    uint32_t ids[64];
    int n;
    int stop_after;
};

static int on_token(void *ctx, const ds_client_token *t)
{
    struct cb_ctx *x = ctx;
    if (t->has_id && x->n < 64)
        x->ids[x->n++] = t->id;
    return x->stop_after > 0 && x->n >= x->stop_after;
}

static void test_callback_and_stop_id(void **state)
{
    (void)state;
    uint32_t want[12];
    assert_int_equal(local_tokens("5,6,7", 12, want), 12);
    ds_client *c = conn();
    uint32_t prompt[] = {5, 6, 7};
    char stop[32];
    snprintf(stop, sizeof(stop), "id:%u", want[3]); /* stops at the 4th token (first match) */
    int first = 0;
    while (want[first] != want[3])
        first++;
    const char *stops[] = {stop};
    ds_client_request r = {
        .tokens = prompt, .n_tokens = 3, .max_tokens = 12, .seed = 1, .stop = stops, .n_stop = 1};
    struct cb_ctx x = {0};
    assert_int_equal(ds_client_generate(c, &r, on_token, &x, NULL), 0);
    assert_int_equal(x.n, first + 1);
    for (int i = 0; i < x.n; i++)
        assert_int_equal(x.ids[i], want[i]);
    ds_client_close(c);
}

static int jobs_running(void)
{
    ds_client *c = conn();
    char *js = NULL;
    assert_int_equal(ds_client_status(c, "jobs", &js), 0);
    ds_client_close(c);
    int n = 0;
    for (char *p = js; (p = strstr(p, "\"id\":")); p++)
        n++;
    free(js);
    return n;
}

static void test_cancel_mid_generation(void **state)
{
    (void)state;
    ds_client *c = conn();
    uint32_t prompt[] = {1, 2};
    ds_client_request r = {.tokens = prompt, .n_tokens = 2, .max_tokens = 500, .seed = 1};
    uint64_t job;
    assert_int_equal(ds_client_submit(c, &r, &job), 0);
    ds_client_token t;
    assert_int_equal(ds_client_next(c, job, &t, -1), 0);
    assert_int_equal(ds_client_cancel(c, job), 0);
    int n = 1;
    for (int guard = 0; guard < 600; guard++) {
        assert_int_equal(ds_client_next(c, job, &t, -1), 0);
        if (t.last)
            break;
        n++;
    }
    assert_true(t.last);
    assert_string_equal(t.finish_reason, "cancelled");
    assert_true(n < 500);
    /* cancelling it again: unknown job now */
    assert_int_equal(ds_client_cancel(c, job), 0);
    ds_client_close(c);
    assert_int_equal(jobs_running(), 0);
}

/* Tokens a cancelled job generates before the coordinator stops it are not left queued on
 * the handle: once the job has ended there, the first pull is its final notice. */
static void test_cancel_drops_queued_tokens(void **state)
{
    (void)state;
    ds_client *c = conn();
    uint32_t prompt[] = {7, 1};
    ds_client_request r = {.tokens = prompt, .n_tokens = 2, .max_tokens = 500, .seed = 1};
    uint64_t job;
    assert_int_equal(ds_client_submit(c, &r, &job), 0);
    ds_client_token t;
    assert_int_equal(ds_client_next(c, job, &t, -1), 0);
    assert_false(t.last);
    /* more tokens arrive meanwhile (models/tiny: thousands per second with the integer
     * kernels, so 500 of them take well under 300 ms: the job must still run at the cancel) */
    dsd_sleep_ms(30);
    assert_int_equal(ds_client_cancel(c, job), 0);
    int running = 1;
    for (int i = 0; i < 200 && running; i++) {
        running = jobs_running();
        if (running)
            dsd_sleep_ms(50);
    }
    assert_int_equal(running, 0);
    assert_int_equal(ds_client_next(c, job, &t, -1), 0);
    assert_true(t.last);
    assert_false(t.has_id);
    assert_string_equal(t.finish_reason, "cancelled");
    /* nothing else of it is left: a further pull times out */
    assert_int_equal(ds_client_next(c, job, &t, 200), -ETIMEDOUT);
    assert_non_null(strstr(ds_client_error(c), "no answer"));
    ds_client_close(c);
}

#define N_CLIENTS 8
static uint32_t g_want[N_CLIENTS][10];

static void *client_thread(void *arg)
{
    intptr_t k = (intptr_t)arg;
    ds_client *c = NULL;
    ds_client_opts o = {.timeout_ms = 60000};
    if (ds_client_connect(g_dsd.client_ep, &o, &c) < 0)
        return (void *)1;
    uint32_t prompt[] = {(uint32_t)(10 + k), 3};
    ds_client_request r = {.tokens = prompt, .n_tokens = 2, .max_tokens = 10, .seed = 1};
    struct cb_ctx x = {0};
    intptr_t bad = ds_client_generate(c, &r, on_token, &x, NULL) != 0 || x.n != 10;
    for (int i = 0; i < x.n && !bad; i++)
        bad = x.ids[i] != g_want[k][i];
    ds_client_close(c);
    return (void *)bad;
}

static void test_many_concurrent_clients(void **state)
{
    (void)state;
    for (int k = 0; k < N_CLIENTS; k++) {
        char p[32];
        snprintf(p, sizeof(p), "%d,3", 10 + k);
        assert_int_equal(local_tokens(p, 10, g_want[k]), 10);
    }
    pthread_t th[N_CLIENTS];
    for (intptr_t k = 0; k < N_CLIENTS; k++)
        assert_int_equal(pthread_create(&th[k], NULL, client_thread, (void *)k), 0);
    for (int k = 0; k < N_CLIENTS; k++) {
        void *r;
        pthread_join(th[k], &r);
        assert_null(r);
    }
}

static void test_disconnect_cancels_job(void **state)
{
    (void)state;
    int before = dsd_log_count(&g_dsd, "disconnected: cancelling");
    ds_client *c = conn();
    uint32_t prompt[] = {4, 4, 4};
    ds_client_request r = {.tokens = prompt, .n_tokens = 3, .max_tokens = 500, .seed = 1};
    uint64_t job;
    assert_int_equal(ds_client_submit(c, &r, &job), 0);
    ds_client_token t;
    assert_int_equal(ds_client_next(c, job, &t, -1), 0);
    ds_client_close(c); /* gone mid-stream */
    int running = 1;
    for (int i = 0; i < 200 && running; i++) {
        dsd_sleep_ms(50);
        running = jobs_running();
    }
    assert_int_equal(running, 0);
    assert_true(dsd_log_count(&g_dsd, "disconnected: cancelling") > before);
    assert_true(dsd_alive(&g_dsd));
}

static void test_malformed_and_oversized(void **state)
{
    (void)state;
    ds_client *c = conn();
    /* token outside the vocabulary */
    uint32_t bad_tok[] = {999999};
    ds_client_request r = {.tokens = bad_tok, .n_tokens = 1, .max_tokens = 4};
    uint64_t job;
    assert_int_equal(ds_client_submit(c, &r, &job), -EINVAL);
    assert_non_null(strstr(ds_client_error(c), "vocabulary"));
    /* max_tokens 0 / beyond the context */
    uint32_t ok_tok[] = {5};
    r = (ds_client_request){.tokens = ok_tok, .n_tokens = 1, .max_tokens = 100000};
    assert_int_equal(ds_client_submit(c, &r, &job), -EMSGSIZE);
    /* oversized request: more than max_request_bytes (4096) */
    uint32_t *big = calloc(4000, sizeof(uint32_t));
    r = (ds_client_request){.tokens = big, .n_tokens = 4000, .max_tokens = 1};
    assert_int_equal(ds_client_submit(c, &r, &job), -EMSGSIZE);
    free(big);
    /* token ids and text at once */
    r = (ds_client_request){.tokens = ok_tok, .n_tokens = 1, .prompt = "hello", .max_tokens = 1};
    assert_int_equal(ds_client_submit(c, &r, &job), -EINVAL);
    assert_non_null(strstr(ds_client_error(c), "not both"));
    /* unknown status / cancel of an unknown job */
    char *js = NULL;
    assert_int_equal(ds_client_status(c, "nonsense", &js), -EINVAL);
    ds_client_close(c);
    /* raw garbage and a wrong protocol version on the client socket */
    void *ctx = zmq_ctx_new(), *s = zmq_socket(ctx, ZMQ_DEALER);
    int zero = 0, tmo = 5000;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof(zero));
    zmq_setsockopt(s, ZMQ_RCVTIMEO, &tmo, sizeof(tmo));
    assert_int_equal(zmq_connect(s, g_dsd.client_ep), 0);
    zmq_send(s, "\xff\xff\xff garbage", 12, 0);
    uint8_t buf[1024];
    int n = zmq_recv(s, buf, sizeof(buf), 0);
    assert_true(n > 0);
    Dsd__Envelope *e = dsd__envelope__unpack(NULL, (size_t)n, buf);
    assert_non_null(e);
    assert_int_equal(e->body_case, DSD__ENVELOPE__BODY_ERROR);
    assert_int_equal(e->error->code, DSD__ERROR_CODE__ERROR_CODE_MALFORMED);
    dsd__envelope__free_unpacked(e, NULL);
    Dsd__Envelope v = DSD__ENVELOPE__INIT;
    Dsd__StatusRequest sr = DSD__STATUS_REQUEST__INIT;
    sr.what = "status";
    v.protocol_version = 99;
    v.body_case = DSD__ENVELOPE__BODY_STATUS_REQUEST;
    v.status_request = &sr;
    size_t len = dsd__envelope__pack(&v, buf);
    zmq_send(s, buf, len, 0);
    n = zmq_recv(s, buf, sizeof(buf), 0);
    assert_true(n > 0);
    e = dsd__envelope__unpack(NULL, (size_t)n, buf);
    assert_non_null(e);
    assert_int_equal(e->error->code, DSD__ERROR_CODE__ERROR_CODE_VERSION);
    dsd__envelope__free_unpacked(e, NULL);
    zmq_close(s);
    zmq_ctx_term(ctx);
    /* still serving, and each refusal was logged */
    assert_true(dsd_alive(&g_dsd));
    assert_true(dsd_log_count(&g_dsd, "refused") >= 4);
    uint32_t want[4];
    assert_int_equal(local_tokens("5,6,7", 4, want), 4);
    c = conn();
    uint32_t prompt[] = {5, 6, 7};
    r = (ds_client_request){.tokens = prompt, .n_tokens = 3, .max_tokens = 4, .seed = 1};
    struct cb_ctx x = {0};
    assert_int_equal(ds_client_generate(c, &r, on_token, &x, NULL), 0);
    assert_int_equal(x.n, 4);
    assert_memory_equal(x.ids, want, sizeof(want));
    ds_client_close(c);
}

static void test_timeout_without_server(void **state)
{
    (void)state;
    ds_client *c = NULL;
    ds_client_opts o = {.timeout_ms = 300};
    assert_int_equal(ds_client_connect("tcp://127.0.0.1:9", &o, &c), 0);
    char *js = NULL;
    int rc = ds_client_status(c, "status", &js);
    assert_true(rc == -ETIMEDOUT);
    ds_client_close(c);
    assert_null(ds_client_close(NULL));
}

/* ids of the in-process engine for a text prompt (tokenized by dsctl --local) */
static int local_text_tokens(const char *text, int n, uint32_t *out)
{
    char args[256];
    snprintf(args, sizeof(args), "'%s'", text);
    return dsd_local_ids(args, n, out);
}

static __attribute__((noinline)) char *decode(const ds_tokenizer *tok, const uint32_t *ids,
                                               int n)
{
    int32_t v[256];
    for (int i = 0; i < n; i++)
        v[i] = (int32_t)ids[i];
    char *out = NULL;
    size_t len = 0;
    ds_error err = {0};
    assert_int_equal(ds_tokenizer_decode(tok, v, (size_t)n, true, &out, &len, &err), 0);
    return out;
}

/* Runs a text job; returns the number of tokens, their ids in ids[], the concatenated text in
 * *text (malloc'd) and the finish reason. */
static int run_text(const char *prompt, uint32_t max_tokens, const char *const *stops,
                    size_t n_stop, uint32_t *ids, char **text, char reason[16])
{
    ds_client *c = conn();
    ds_client_request r = {
        .prompt = prompt, .max_tokens = max_tokens, .seed = 1, .stop = stops, .n_stop = n_stop};
    uint64_t job;
    assert_int_equal(ds_client_submit(c, &r, &job), 0);
    size_t cap = 1, len = 0;
    *text = calloc(1, 1);
    int n = 0;
    for (int guard = 0; guard < 1000; guard++) {
        ds_client_token t;
        assert_int_equal(ds_client_next(c, job, &t, -1), 0);
        if (t.has_id && n < 256)
            ids[n++] = t.id;
        if (len + t.text_len + 1 > cap) {
            cap = (len + t.text_len + 1) * 2;
            *text = realloc(*text, cap);
        }
        memcpy(*text + len, t.text, t.text_len);
        len += t.text_len;
        (*text)[len] = 0;
        if (t.last) {
            snprintf(reason, 16, "%s", t.finish_reason);
            break;
        }
    }
    ds_client_close(c);
    return n;
}

/* Text prompts are tokenized by the coordinator, every token carries its text, and a stop
 * string ends the job with the text before it: checked against the in-process engine's ids
 * and the tokenizer's own decoding of them. */
static void test_text_prompt_and_stop_string(void **state)
{
    (void)state;
    const char *prompt = "The meaning of life is";
    enum { N = 24 };
    uint32_t want[N], got[256];
    assert_int_equal(local_text_tokens(prompt, N, want), N);
    ds_tokenizer *tok = NULL;
    ds_error err = {0};
    assert_int_equal(ds_tokenizer_load(DS_TEST_DATA "/../../models/tiny", &tok, &err), 0);
    char *want_text = decode(tok, want, N);
    char *text = NULL, reason[16];
    /* whole output: same ids, text = the tokenizer's decoding of them */
    assert_int_equal(run_text(prompt, N, NULL, 0, got, &text, reason), N);
    for (int i = 0; i < N; i++)
        assert_int_equal(got[i], want[i]);
    assert_string_equal(text, want_text);
    assert_string_equal(reason, "length");
    free(text);
    /* a stop string from the middle of that output */
    size_t wl = strlen(want_text);
    assert_true(wl > 30);
    char stop[8];
    snprintf(stop, sizeof(stop), "%.5s", want_text + wl / 2);
    const char *first = strstr(want_text, stop);
    assert_non_null(first);
    size_t at = (size_t)(first - want_text);
    int k = 1; /* the first k tokens' text contains the stop string */
    for (;; k++) {
        char *pre = decode(tok, want, k);
        bool has = strstr(pre, stop) != NULL;
        free(pre);
        if (has)
            break;
    }
    const char *stops[] = {stop};
    assert_int_equal(run_text(prompt, N, stops, 1, got, &text, reason), k);
    for (int i = 0; i < k; i++)
        assert_int_equal(got[i], want[i]);
    assert_int_equal(strlen(text), at);
    assert_memory_equal(text, want_text, at);
    assert_string_equal(reason, "stop");
    free(text);
    /* a stop string past the limit is refused */
    char big[300];
    memset(big, 'a', sizeof(big) - 1);
    big[sizeof(big) - 1] = 0;
    const char *bad[] = {big};
    ds_client *c = conn();
    ds_client_request r = {.prompt = prompt, .max_tokens = 4, .stop = bad, .n_stop = 1};
    uint64_t job;
    assert_true(ds_client_submit(c, &r, &job) < 0);
    assert_non_null(strstr(ds_client_error(c), "stop"));
    ds_client_close(c);
    free(want_text);
    ds_tokenizer_free(tok);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stream_matches_local),
        cmocka_unit_test(test_callback_and_stop_id),
        cmocka_unit_test(test_cancel_mid_generation),
        cmocka_unit_test(test_cancel_drops_queued_tokens),
        cmocka_unit_test(test_many_concurrent_clients),
        cmocka_unit_test(test_disconnect_cancels_job),
        cmocka_unit_test(test_malformed_and_oversized),
        cmocka_unit_test(test_timeout_without_server),
        cmocka_unit_test(test_text_prompt_and_stop_string),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
