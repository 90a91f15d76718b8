/* test_sched.c — the coordinator's scheduler alone (daemon/dsd_sched.h), with no socket and
 * no thread: an in-process port runs every micro-batch it launches through the daemon's own
 * unit host (dsd_host, all units, its rows checked per layer) with the layer step
 * (experts/ds_layer.h) and hands the final rows back. The tokens it streams are
 * checked against the single-process engine (experts/ds_engine.h) run independently on the
 * same checkpoint: several concurrent jobs, greedy and sampled, prompts fed in chunks of
 * max_rows_per_step rows, cancel, step timeout, refusals. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "ds_engine.h"
#include "ds_layer.h"
#include "dsd.h"
#include "dsd_sched.h"

#define MODEL_DIR DS_TEST_DATA "/ref/v3_bf16"
#define MAX_OUT   64
#define MAX_JOBS  8

/* What the port saw. */
struct tport {
    dsd_sched *s;
    dsd_host *h;
    const ds_model_config *c;
    bool hold; /* launch accepts the micro-batch and never answers */
    uint32_t launches, max_rows, released;
    uint64_t released_ids[64];
    /* replies: per job its tokens and how it ended; acks and errors */
    uint64_t acked[MAX_JOBS]; /* job ids in order of acceptance */
    uint32_t n_acked;
    Dsd__ErrorCode last_error;
    uint32_t n_errors;
    struct {
        uint64_t job;
        int32_t ids[MAX_OUT];
        uint32_t n;
        bool ended;
        char reason[16];
    } out[MAX_JOBS];
    uint32_t n_out;
    char last_why[512]; /* the last error token's reason */
};

/* The expert runner of a node that hosts every expert: the daemon host's own dispatch
 * handler (dsd_host_experts) over every (row, slot) pair. */
static int host_experts(void *ctx, uint32_t layer, const float *ffn_in, uint32_t n,
                        const int32_t *ids, const float *weights, float *out, ds_error *err)
{
    struct tport *t = ctx;
    uint32_t K = t->c->num_experts_per_tok;
    uint32_t *pr = malloc((size_t)n * K * 4), *pe = malloc((size_t)n * K * 4);
    (void)weights;
    int rc = pr && pe ? 0 : ds_error_set(err, -ENOMEM, "out of memory");
    for (uint32_t i = 0; rc == 0 && i < n * K; i++) {
        pr[i] = i / K;
        pe[i] = (uint32_t)ids[i];
    }
    Dsd__ErrorCode code = 0;
    double cs;
    if (rc == 0)
        rc = dsd_host_experts(t->h, layer, n, ffn_in, n * K, pr, pe, out, &cs, &code, err);
    free(pr);
    free(pe);
    return rc < 0 ? rc : DS_LAYER_DONE;
}

static const ds_expert_runner_ops host_runner = {.run = host_experts};

/* A node hosting every unit, as the data plane runs it: each layer's rows checked against
 * the host's KV caches, then the layer step (experts/ds_layer.h) over them. */
static int run_layers(struct tport *t, const dsd_sched_batch *b, float *x, ds_error *err)
{
    size_t bytes = (size_t)b->n * t->c->hidden_size * sizeof(float);
    int *slots = calloc(b->n, sizeof(int));
    ds_layer_step *st = NULL;
    int rc = slots ? ds_layer_step_new(dsd_host_model(t->h), dsd_host_pool(t->h),
                                       dsd_host_seqs(t->h), b->n, &st, err)
                   : -ENOMEM;
    if (rc == 0)
        memcpy(ds_layer_step_x(st), x, bytes);
    for (uint32_t l = 0; rc == 0 && l < t->c->num_hidden_layers; l++) {
        Dsd__ErrorCode code = 0;
        rc = dsd_host_rows(t->h, l, b->n, b->seq, b->pos, slots, &code, err);
        if (rc == 0)
            rc = ds_layer_step_set_rows(st, b->n, slots, b->pos);
        if (rc == 0)
            rc = ds_layer_step_run(st, l, &host_runner, t, err);
    }
    if (rc == 0)
        memcpy(x, ds_layer_step_x(st), bytes);
    ds_layer_step_free(st);
    free(slots);
    return rc;
}

static int t_launch(void *ctx, const dsd_sched_batch *b, ds_error *err)
{
    struct tport *t = ctx;
    t->launches++;
    if (b->n > t->max_rows)
        t->max_rows = b->n;
    if (t->hold)
        return 0;
    size_t bytes = (size_t)b->n * t->c->hidden_size * sizeof(float);
    float *x = malloc(bytes);
    if (!x)
        return ds_error_set(err, -ENOMEM, "out of memory");
    memcpy(x, b->x, bytes);
    int rc = run_layers(t, b, x, err);
    if (rc == 0) /* every unit local: the result comes back before launch returns */
        dsd_sched_on_result(t->s, b->rid, x, b->n, NULL);
    free(x);
    return rc;
}

static void t_release(void *ctx, uint64_t job)
{
    struct tport *t = ctx;
    if (t->released < 64)
        t->released_ids[t->released] = job;
    t->released++;
    dsd_host_release(t->h, job);
}

static void t_reply(void *ctx, const uint8_t *id, size_t id_len, const Dsd__Envelope *env)
{
    struct tport *t = ctx;
    assert_int_equal(id_len, 6);
    assert_memory_equal(id, "client", 6);
    switch (env->body_case) {
    case DSD__ENVELOPE__BODY_STATUS_REPLY: {
        uint64_t job = env->status_reply->job;
        assert_true(job > 0);
        /* and the same id in the JSON form of the acknowledgement */
        char js[64];
        snprintf(js, sizeof(js), "{\"job\":%llu}", (unsigned long long)job);
        assert_string_equal(env->status_reply->json, js);
        assert_true(t->n_acked < MAX_JOBS);
        t->acked[t->n_acked++] = job;
        break;
    }
    case DSD__ENVELOPE__BODY_ERROR:
        t->last_error = env->error->code;
        t->n_errors++;
        break;
    case DSD__ENVELOPE__BODY_TOKEN: {
        uint32_t k = 0;
        while (k < t->n_out && t->out[k].job != env->token->job)
            k++;
        if (k == t->n_out) {
            assert_true(t->n_out < MAX_JOBS);
            t->out[t->n_out++].job = env->token->job;
        }
        assert_false(t->out[k].ended); /* nothing after the last token */
        bool notice = env->token->last && (!strcmp(env->token->finish_reason, "cancelled") ||
                                           !strcmp(env->token->finish_reason, "error"));
        if (!notice) {
            assert_true(t->out[k].n < MAX_OUT);
            t->out[k].ids[t->out[k].n++] = (int32_t)env->token->id;
        }
        if (env->token->last && env->token->error)
            snprintf(t->last_why, sizeof(t->last_why), "%s", env->token->error);
        if (env->token->last) {
            t->out[k].ended = true;
            snprintf(t->out[k].reason, sizeof(t->out[k].reason), "%s", env->token->finish_reason);
        }
        break;
    }
    default:
        fail_msg("unexpected reply %d", env->body_case);
    }
}

static const dsd_sched_port PORT = {.launch = t_launch, .release = t_release, .reply = t_reply};

struct fixture {
    ds_model *m; /* embed + head for the scheduler, and the engine's reference */
    ds_pool *pool;
    struct tport t;
};

static void units_all(dsd_units *u, const ds_model_config *c)
{
    memset(u, 0, sizeof(*u));
    u->embed = u->head = true;
    u->n_layers = c->num_hidden_layers;
    u->n_experts = c->n_routed_experts;
    u->attn = calloc(u->n_layers, sizeof(bool));
    u->expert = calloc((size_t)u->n_layers * u->n_experts, sizeof(bool));
    for (uint32_t l = 0; l < u->n_layers; l++)
        u->attn[l] = true;
    for (size_t i = 0; i < (size_t)u->n_layers * u->n_experts; i++)
        u->expert[i] = true;
}

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    ds_error err = {0};
    if (!f || ds_model_open(MODEL_DIR, NULL, &f->m, &err) < 0 ||
        ds_pool_new(1, NULL, 0, &f->pool) < 0)
        return -1;
    dsd_units u;
    units_all(&u, ds_model_get_config(f->m));
    int rc = dsd_host_new(MODEL_DIR, &u, 1, 256, &f->t.h, &err);
    dsd_units_clear(&u);
    if (rc < 0)
        return -1;
    f->t.c = ds_model_get_config(f->m);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    dsd_host_free(f->t.h);
    ds_pool_free(f->pool);
    ds_model_free(f->m);
    free(f);
    return 0;
}

/* A fresh scheduler over the fixture's host (the host's KV caches are keyed by job id, and
 * each scheduler numbers its jobs from 1: every job must have been released). */
static dsd_sched *sched_new(struct fixture *f, uint32_t micro_batches, uint32_t max_rows)
{
    dsd_host *h = f->t.h;
    const ds_model_config *c = f->t.c;
    memset(&f->t, 0, sizeof(f->t));
    f->t.h = h;
    f->t.c = c;
    dsd_sched_limits lim = {.max_jobs = 4,
                            .micro_batches = micro_batches,
                            .max_context = 256,
                            .max_rows_per_step = max_rows,
                            .step_timeout_ns = 1000000000ull};
    ds_error err = {0};
    assert_int_equal(dsd_sched_new(f->m, f->pool, NULL, &lim, &PORT, &f->t, &f->t.s, &err), 0);
    return f->t.s;
}

static void submit(dsd_sched *s, const uint32_t *prompt, size_t n, uint32_t max_tokens, float temp,
                   uint64_t seed)
{
    Dsd__Submit sb = DSD__SUBMIT__INIT;
    Dsd__Sampling sm = DSD__SAMPLING__INIT;
    sm.temperature = temp;
    sm.seed = seed;
    sb.tokens = (uint32_t *)prompt;
    sb.n_tokens = n;
    sb.max_tokens = max_tokens;
    sb.sampling = &sm;
    sb.prompt = "";
    dsd_sched_submit(s, (const uint8_t *)"client", 6, 7, &sb);
}

/* The engine's tokens for one prompt: prefill, then one row per step, sampled like dsctl
 * generate --local (the sampler seeded with `seed`, temperature temp). */
static void engine_tokens(struct fixture *f, const uint32_t *prompt, uint32_t n, uint32_t count,
                          float temp, uint64_t seed, int32_t *out)
{
    const ds_model_config *c = f->t.c;
    uint32_t V = c->vocab_size;
    ds_engine *e;
    ds_error err = {0};
    assert_int_equal(ds_engine_new(f->m, f->pool, 256, &e, &err), 0);
    int sq = ds_engine_seq_add(e);
    assert_true(sq >= 0);
    int seqs[64];
    int32_t toks[64];
    float *logits = malloc((size_t)n * V * sizeof(float));
    assert_non_null(logits);
    for (uint32_t i = 0; i < n; i++) {
        seqs[i] = sq;
        toks[i] = (int32_t)prompt[i];
    }
    ds_sampler smp = {.greedy = temp == 0, .temperature = temp > 0 ? temp : 1, .top_p = 1};
    ds_sampler_seed(&smp, seed);
    assert_int_equal(ds_engine_forward(e, n, seqs, toks, logits, &err), 0);
    out[0] = ds_sampler_pick(&smp, logits + (size_t)(n - 1) * V, V);
    for (uint32_t k = 1; k < count; k++) {
        assert_int_equal(ds_engine_forward(e, 1, &sq, &out[k - 1], logits, &err), 0);
        out[k] = ds_sampler_pick(&smp, logits, V);
    }
    free(logits);
    ds_engine_free(e);
}

static void run_until_done(dsd_sched *s, struct tport *t, uint32_t jobs)
{
    uint64_t now = 1;
    for (int guard = 0; guard < 10000; guard++) {
        uint32_t ended = 0;
        for (uint32_t k = 0; k < t->n_out; k++)
            ended += t->out[k].ended;
        if (ended == jobs)
            return;
        dsd_sched_tick(s, now += 1000);
    }
    fail_msg("jobs did not end");
}

static uint32_t out_of(const struct tport *t, uint64_t job)
{
    for (uint32_t k = 0; k < t->n_out; k++)
        if (t->out[k].job == job)
            return k;
    fail_msg("no tokens for job %llu", (unsigned long long)job);
    return 0;
}

static void check_jobs_match_engine(void **state, uint32_t micro_batches, uint32_t max_rows)
{
    struct fixture *f = *state;
    dsd_sched *s = sched_new(f, micro_batches, max_rows);
    static const uint32_t p0[] = {5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, p1[] = {3, 1};
    static const uint32_t p2[] = {100, 42, 7, 7, 7, 7, 7};
    const uint32_t *prompts[] = {p0, p1, p2};
    const uint32_t lens[] = {11, 2, 7}, max_tok[] = {9, 12, 6};
    const float temps[] = {0, 0.8f, 1.3f};
    const uint64_t seeds[] = {1, 7, 12345};
    for (int i = 0; i < 3; i++)
        submit(s, prompts[i], lens[i], max_tok[i], temps[i], seeds[i]);
    assert_int_equal(f->t.n_acked, 3);
    run_until_done(s, &f->t, 3);
    for (int i = 0; i < 3; i++) {
        int32_t want[MAX_OUT];
        engine_tokens(f, prompts[i], lens[i], max_tok[i], temps[i], seeds[i], want);
        uint32_t k = out_of(&f->t, f->t.acked[i]);
        assert_int_equal(f->t.out[k].n, max_tok[i]);
        assert_memory_equal(f->t.out[k].ids, want, max_tok[i] * sizeof(int32_t));
        assert_string_equal(f->t.out[k].reason, "length");
    }
    assert_true(f->t.max_rows <= max_rows);
    assert_int_equal(f->t.released, 3); /* every job's KV caches freed */
    dsd_sched_stats st;
    dsd_sched_get_stats(s, &st);
    assert_int_equal(st.jobs, 0);
    assert_int_equal(st.finished, 3);
    assert_int_equal(st.steps, f->t.launches);
    dsd_sched_free(s, "cancelled");
}

/* Three jobs at once, prompts whole in one step. */
static void test_tokens_match_engine(void **state)
{
    check_jobs_match_engine(state, 1, 65536);
}

/* Two micro-batches in flight share the jobs: the same tokens. */
static void test_micro_batches_match_engine(void **state)
{
    check_jobs_match_engine(state, 2, 65536);
}

/* At most 3 rows per step: the 11-token prompt is fed in 4 chunks, beside the other jobs'
 * rows, and every job still gets exactly the engine's tokens. */
static void test_chunked_prefill_matches_engine(void **state)
{
    check_jobs_match_engine(state, 1, 3);
    struct fixture *f = *state;
    assert_int_equal(f->t.max_rows, 3);
    /* 20 prompt rows at 3 rows per step: at least 7 steps */
    assert_true(f->t.launches >= 7);
}

/* One row per step: even a 2-token prompt is chunked. */
static void test_one_row_per_step(void **state)
{
    struct fixture *f = *state;
    dsd_sched *s = sched_new(f, 1, 1);
    static const uint32_t p[] = {9, 8, 7, 6, 5};
    submit(s, p, 5, 4, 0, 1);
    run_until_done(s, &f->t, 1);
    int32_t want[4];
    engine_tokens(f, p, 5, 4, 0, 1, want);
    uint32_t k = out_of(&f->t, f->t.acked[0]);
    assert_int_equal(f->t.out[k].n, 4);
    assert_memory_equal(f->t.out[k].ids, want, sizeof(want));
    assert_int_equal(f->t.launches, 5 + 3); /* 5 prompt rows, then 3 decode steps */
    assert_int_equal(f->t.max_rows, 1);
    dsd_sched_free(s, "cancelled");
}

static void test_cancel_and_refusals(void **state)
{
    struct fixture *f = *state;
    dsd_sched *s = sched_new(f, 1, 65536);
    static const uint32_t p[] = {1, 2, 3};
    submit(s, p, 3, 40, 0, 1); /* v3_bf16 has 64 positions */
    dsd_sched_tick(s, 1000);
    dsd_sched_tick(s, 2000);
    uint64_t job = f->t.acked[0];
    uint32_t k = out_of(&f->t, job);
    assert_int_equal(f->t.out[k].n, 2);
    /* another client cannot cancel it */
    dsd_sched_cancel(s, (const uint8_t *)"client", 6, 8, job + 100);
    assert_int_equal(f->t.last_error, DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_JOB);
    dsd_sched_cancel(s, (const uint8_t *)"client", 6, 8, job);
    assert_true(f->t.out[k].ended);
    assert_string_equal(f->t.out[k].reason, "cancelled");
    assert_int_equal(f->t.released, 1);
    assert_int_equal(f->t.released_ids[0], job);
    /* refusals: too long for the context, empty, token outside the vocabulary */
    uint32_t e0 = f->t.n_errors;
    static uint32_t longp[64];
    submit(s, longp, 64, 1, 0, 1);
    assert_int_equal(f->t.last_error, DSD__ERROR_CODE__ERROR_CODE_TOO_LARGE);
    submit(s, p, 0, 1, 0, 1);
    assert_int_equal(f->t.last_error, DSD__ERROR_CODE__ERROR_CODE_MALFORMED);
    uint32_t bad = f->t.c->vocab_size;
    submit(s, &bad, 1, 1, 0, 1);
    assert_int_equal(f->t.last_error, DSD__ERROR_CODE__ERROR_CODE_MALFORMED);
    assert_int_equal(f->t.n_errors, e0 + 3);
    /* max_jobs (4): the fifth is refused BUSY */
    for (int i = 0; i < 4; i++)
        submit(s, p, 3, 5, 0, 1);
    submit(s, p, 3, 5, 0, 1);
    assert_int_equal(f->t.last_error, DSD__ERROR_CODE__ERROR_CODE_BUSY);
    assert_int_equal(f->t.n_acked, 5);
    dsd_sched_free(s, "cancelled"); /* the 4 running jobs end "cancelled", released */
    assert_int_equal(f->t.released, 5);
    for (uint32_t i = 1; i < 5; i++)
        assert_string_equal(f->t.out[out_of(&f->t, f->t.acked[i])].reason, "cancelled");
}

/* A micro-batch whose result never comes fails its jobs at the step timeout, on the clock
 * the ticks give (no real time passes). */
static void test_step_timeout(void **state)
{
    struct fixture *f = *state;
    dsd_sched *s = sched_new(f, 1, 65536);
    f->t.hold = true;
    static const uint32_t p[] = {4, 4};
    submit(s, p, 2, 5, 0, 1);
    dsd_sched_tick(s, 1000);
    assert_int_equal(f->t.launches, 1);
    assert_int_equal(dsd_sched_wait_ms(s), 50); /* in flight: nothing ready */
    dsd_sched_tick(s, 1000 + 999999999ull);
    assert_int_equal(f->t.n_out, 0);
    dsd_sched_tick(s, 1000 + 1000000001ull);
    uint32_t k = out_of(&f->t, f->t.acked[0]);
    assert_true(f->t.out[k].ended);
    assert_string_equal(f->t.out[k].reason, "error");
    assert_int_equal(f->t.out[k].n, 0);
    /* the late result is ignored */
    float x[64] = {0};
    dsd_sched_on_result(s, 1, x, 1, NULL);
    assert_int_equal(f->t.out[k].n, 0);
    assert_int_equal(f->t.released, 1);
    dsd_sched_free(s, "cancelled");
}

/* Job replay: three jobs (greedy and sampled) run a few steps on one scheduler, which is then
 * replaced by another (a new plan) that adopts them; one of them also loses a micro-batch (its
 * result never comes) and is fed again. Each job's whole stream equals the engine's
 * uninterrupted tokens: no token lost, repeated or changed, the sampler's state carried. */
static void test_replay_matches_engine(void **state)
{
    struct fixture *f = *state;
    dsd_sched *s = sched_new(f, 2, 4); /* 4 rows a step: the 11-token prompt is chunked */
    static const uint32_t p0[] = {5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, p1[] = {3, 1};
    static const uint32_t p2[] = {100, 42, 7, 7, 7, 7, 7};
    const uint32_t *prompts[] = {p0, p1, p2};
    const uint32_t lens[] = {11, 2, 7}, max_tok[] = {9, 12, 6};
    const float temps[] = {0, 0.8f, 1.3f};
    const uint64_t seeds[] = {1, 7, 12345};
    for (int i = 0; i < 3; i++)
        submit(s, prompts[i], lens[i], max_tok[i], temps[i], seeds[i]);
    uint64_t now = 1;
    for (int k = 0; k < 5; k++)
        dsd_sched_tick(s, now += 1000);
    uint32_t sent = 0;
    for (uint32_t k = 0; k < f->t.n_out; k++) {
        assert_false(f->t.out[k].ended);
        sent += f->t.out[k].n;
    }
    assert_true(sent > 0); /* some tokens streamed before the plan changes */
    dsd_sched_limits lim = {.max_jobs = 4,
                            .micro_batches = 2,
                            .max_context = 256,
                            .max_rows_per_step = 4,
                            .step_timeout_ns = 1000000000ull,
                            .max_replays = 3};
    dsd_sched *s2;
    ds_error err = {0};
    assert_int_equal(dsd_sched_new(f->m, f->pool, NULL, &lim, &PORT, &f->t, &s2, &err), 0);
    f->t.s = s2;
    assert_int_equal(dsd_sched_adopt(s2, s), 3);
    /* a micro-batch of the new plan is lost: its jobs are fed again at the step timeout */
    f->t.hold = true;
    dsd_sched_tick(s2, now += 1000);
    f->t.hold = false;
    dsd_sched_tick(s2, now += 1000000001ull);
    for (uint32_t k = 0; k < f->t.n_out; k++)
        assert_false(f->t.out[k].ended);
    run_until_done(s2, &f->t, 3);
    for (int i = 0; i < 3; i++) {
        int32_t want[MAX_OUT];
        engine_tokens(f, prompts[i], lens[i], max_tok[i], temps[i], seeds[i], want);
        uint32_t k = out_of(&f->t, f->t.acked[i]);
        assert_int_equal(f->t.out[k].n, max_tok[i]);
        assert_memory_equal(f->t.out[k].ids, want, max_tok[i] * sizeof(int32_t));
        assert_string_equal(f->t.out[k].reason, "length");
    }
    dsd_sched_stats st;
    dsd_sched_get_stats(s2, &st);
    assert_int_equal(st.jobs, 0);
    assert_int_equal(st.finished, 3);
    dsd_sched_free(s2, "cancelled");
}

/* A job that cannot go on ends with an error saying why (dsd_sched_fail_all). */
static void test_fail_all_says_why(void **state)
{
    struct fixture *f = *state;
    dsd_sched *s = sched_new(f, 1, 65536);
    f->t.hold = true;
    static const uint32_t p[] = {4, 4};
    submit(s, p, 2, 5, 0, 1);
    dsd_sched_tick(s, 1000);
    dsd_sched_fail_all(s, "no plan fits the 1 nodes left: model does not fit");
    uint32_t k = out_of(&f->t, f->t.acked[0]);
    assert_true(f->t.out[k].ended);
    assert_string_equal(f->t.out[k].reason, "error");
    assert_string_equal(f->t.last_why, "no plan fits the 1 nodes left: model does not fit");
    float x[64] = {0};
    dsd_sched_on_result(s, 1, x, 1, NULL); /* the late result is ignored */
    assert_int_equal(f->t.out[k].n, 0);
    dsd_sched_free(s, "cancelled");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tokens_match_engine),
        cmocka_unit_test(test_micro_batches_match_engine),
        cmocka_unit_test(test_chunked_prefill_matches_engine),
        cmocka_unit_test(test_one_row_per_step),
        cmocka_unit_test(test_cancel_and_refusals),
        cmocka_unit_test(test_step_timeout),
        cmocka_unit_test(test_replay_matches_engine),
        cmocka_unit_test(test_fail_all_says_why),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
