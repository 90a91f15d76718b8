/* dsd_sched.c — the coordinator's scheduler: jobs, continuous batching, micro-batches.
 *
 * It runs inside the coordinator's data thread (dsd_data.c), which feeds it client requests
 * (dsd_sched_on_pipe), finished micro-batches (dsd_sched_on_result) and a tick after every
 * poll (dsd_sched_tick). At a tick, the active jobs that are not in flight form a new
 * micro-batch (one row per decoding job, every remaining prompt row of a job in prefill)
 * while fewer than `micro_batches` are in flight: the jobs are split evenly over the free
 * micro-batch slots so that one micro-batch computes on one node while another crosses a
 * link. A micro-batch is embedded here and launched down the chain of attention hosts
 * (dsd_data_launch); its final rows come back here, where the head runs and each job samples
 * its next token with its own sampler. Every unit is row-independent (ds_model.h), so the
 * split into micro-batches never changes a token: the cluster answers exactly like
 * `dsctl generate --local`. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "ds_experts.h"
#include "ds_tokenizer.h"
#include "ds_log.h"
#include "dsd.h"

#define SCHED_MAX_STOP      16
#define SCHED_MAX_STOP_TEXT 256 /* bytes of one stop string */

struct job {
    bool active;
    uint64_t id;
    uint8_t peer[DSD_MAX_PEER_ID];
    size_t peer_len;
    uint64_t request_id;
    int32_t *prompt;
    uint32_t n_prompt;
    uint32_t fed; /* positions already fed */
    uint32_t max_tokens;
    uint32_t n_gen;
    int32_t next; /* token to feed next (decode) */
    ds_sampler smp;
    int32_t stop_ids[SCHED_MAX_STOP];
    uint32_t n_stop;
    /* text (coordinator with a tokenizer): stop strings, the streaming decoder, and generated
     * text not yet sent because it may be the start of a stop string */
    char *stop_text[SCHED_MAX_STOP];
    uint32_t n_stop_text;
    ds_tok_stream *ts;
    char *held;
    size_t n_held;
    int32_t mb;     /* micro-batch slot it is in flight in, -1 when not */
    bool cancelled; /* cancel asked while in flight: finish when the micro-batch returns */
};

struct mbatch {
    bool used;
    uint64_t rid, step;
    uint32_t nj;
    uint32_t *jobs; /* [nj] job slots */
    uint32_t *last; /* [nj] the row of each job whose logits it samples from */
    uint64_t deadline;
};

struct dsd_sched {
    void *pipe;
    dsd_data *data;
    dsd_opts o;
    const ds_model_config *c;
    ds_tokenizer *tok; /* NULL: token ids only (no tokenizer.json in the model directory) */
    struct job *jobs;
    uint32_t max_jobs;
    struct mbatch *mbs;
    uint32_t max_mbs;
    uint64_t next_job, next_rid, step, jobs_done;
};

/* ---- helpers ------------------------------------------------------------------------------ */

static void pipe_reply(void *pipe, const uint8_t *peer, size_t peer_len, Dsd__Envelope *env)
{
    uint8_t *buf;
    size_t len;
    if (!peer_len || ds_wire_pack(env, &buf, &len) < 0)
        return;
    zmq_send(pipe, peer, peer_len, ZMQ_SNDMORE);
    zmq_send(pipe, buf, len, 0);
    free(buf);
}

static void pipe_error(void *pipe, const uint8_t *peer, size_t peer_len, uint64_t req,
                       Dsd__ErrorCode code, const char *msg)
{
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__Error e = DSD__ERROR__INIT;
    e.code = code;
    e.message = (char *)msg;
    env.request_id = req;
    env.body_case = DSD__ENVELOPE__BODY_ERROR;
    env.error = &e;
    ds_log_warn("client request %llu refused: %s", (unsigned long long)req, msg);
    pipe_reply(pipe, peer, peer_len, &env);
}

/* Ends a job: the final Token (last = true) to its client when it is still there, the KV
 * caches freed on every attention host. Never called while the job is in flight. */
static void job_finish(dsd_sched *s, struct job *j, const char *reason)
{
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__Token t = DSD__TOKEN__INIT;
    t.job = j->id;
    t.last = true;
    t.finish_reason = (char *)reason;
    env.request_id = j->request_id;
    env.body_case = DSD__ENVELOPE__BODY_TOKEN;
    env.token = &t;
    uint8_t peer[DSD_MAX_PEER_ID];
    size_t pl = j->peer_len;
    memcpy(peer, j->peer, pl);
    dsd_data_release(s->data, j->id);
    ds_log_info("job %llu finished (%s) after %u tokens", (unsigned long long)j->id, reason,
                j->n_gen);
    free(j->prompt);
    for (uint32_t i = 0; i < j->n_stop_text; i++)
        free(j->stop_text[i]);
    ds_tok_stream_free(j->ts);
    free(j->held);
    memset(j, 0, sizeof(*j));
    j->mb = -1;
    s->jobs_done++;
    /* the job list a client reads after the last token must not show the job any more */
    dsd_data_publish_jobs(s->data);
    pipe_reply(s->pipe, peer, pl, &env);
}

char *dsd_sched_jobs_json(dsd_sched *s)
{
    json_t *jobs = json_array();
    for (uint32_t i = 0; i < s->max_jobs; i++) {
        struct job *j = &s->jobs[i];
        if (!j->active)
            continue;
        json_array_append_new(jobs, json_pack("{s:I,s:s,s:i,s:i,s:i,s:b}", "id", (json_int_t)j->id,
                                              "state", j->fed < j->n_prompt ? "prefill" : "decode",
                                              "prompt_tokens", (int)j->n_prompt, "generated",
                                              (int)j->n_gen, "max_tokens", (int)j->max_tokens,
                                              "in_flight", j->mb >= 0));
    }
    uint32_t inflight = 0;
    for (uint32_t i = 0; i < s->max_mbs; i++)
        inflight += s->mbs[i].used;
    json_t *jr = json_pack("{s:o,s:I,s:I,s:i,s:i}", "jobs", jobs, "finished",
                           (json_int_t)s->jobs_done, "steps", (json_int_t)s->step,
                           "micro_batches_in_flight", (int)inflight, "micro_batches",
                           (int)s->max_mbs);
    char *r = json_dumps(jr, JSON_COMPACT);
    json_decref(jr);
    return r;
}

/* ---- jobs --------------------------------------------------------------------------------- */

static void handle_submit(dsd_sched *s, void *pipe, const uint8_t *peer, size_t pl,
                          Dsd__Envelope *env)
{
    const Dsd__Submit *sb = env->submit;
    const ds_model_config *c = s->c;
    uint32_t ctx = (uint32_t)s->o.max_context < c->max_position_embeddings
                       ? (uint32_t)s->o.max_context
                       : c->max_position_embeddings;
    char msg[256];
#define BAD(code, ...)                                                                             \
    do {                                                                                           \
        snprintf(msg, sizeof(msg), __VA_ARGS__);                                                   \
        pipe_error(pipe, peer, pl, env->request_id, code, msg);                                    \
        return;                                                                                    \
    } while (0)
    /* the prompt: token ids, or text tokenized here (BOS as the tokenizer config asks) */
    int32_t *text_ids = NULL;
    size_t n_prompt = sb->n_tokens;
    if (sb->n_tokens && sb->prompt && sb->prompt[0])
        BAD(DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "send either token ids or text, not both");
    if (!sb->n_tokens && sb->prompt && sb->prompt[0]) {
        if (!s->tok)
            BAD(DSD__ERROR_CODE__ERROR_CODE_MALFORMED,
                "text prompts need the tokenizer, which this coordinator's model directory "
                "does not have (tokenizer.json): send token ids");
        ds_error terr = {0};
        if (ds_tokenizer_encode(s->tok, sb->prompt, strlen(sb->prompt), true, &text_ids,
                                &n_prompt, &terr) < 0)
            BAD(DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "prompt: %s", ds_error_str(&terr));
    }
    /* from here on, BAD must free text_ids */
#undef BAD
#define BAD(code, ...)                                                                             \
    do {                                                                                           \
        snprintf(msg, sizeof(msg), __VA_ARGS__);                                                   \
        pipe_error(pipe, peer, pl, env->request_id, code, msg);                                    \
        free(text_ids);                                                                            \
        return;                                                                                    \
    } while (0)
    if (!n_prompt)
        BAD(DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "empty prompt");
    if (n_prompt >= ctx || sb->max_tokens == 0 || n_prompt + sb->max_tokens > ctx)
        BAD(DSD__ERROR_CODE__ERROR_CODE_TOO_LARGE,
            "prompt (%zu tokens) + max_tokens (%u) must fit the context of %u and max_tokens "
            "must be > 0",
            n_prompt, sb->max_tokens, ctx);
    for (size_t i = 0; i < sb->n_tokens; i++)
        if (sb->tokens[i] >= c->vocab_size)
            BAD(DSD__ERROR_CODE__ERROR_CODE_MALFORMED,
                "token %zu: id %u outside the vocabulary (%u)", i, sb->tokens[i], c->vocab_size);
    float temp = sb->sampling ? sb->sampling->temperature : 0;
    float top_p = sb->sampling && sb->sampling->top_p > 0 ? sb->sampling->top_p : 1;
    if (!(temp >= 0 && temp <= 1e6) || !(top_p > 0 && top_p <= 1))
        BAD(DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "sampling: temperature must be in [0, 1e6] "
                                                   "and top_p in (0, 1]");
    if (sb->n_stop > SCHED_MAX_STOP)
        BAD(DSD__ERROR_CODE__ERROR_CODE_TOO_LARGE, "at most %d stop entries", SCHED_MAX_STOP);
    struct job *j = NULL;
    for (uint32_t i = 0; i < s->max_jobs && !j; i++)
        if (!s->jobs[i].active)
            j = &s->jobs[i];
    if (!j)
        BAD(DSD__ERROR_CODE__ERROR_CODE_BUSY, "%u jobs running, the limit (max_jobs)", s->max_jobs);
    /* stops: "eos", "id:N" (token ids) or any other text (a stop string: needs the
     * tokenizer; the text up to it is sent, the stop string itself is not) */
    int32_t stops[SCHED_MAX_STOP];
    uint32_t n_id_stop = 0, n_text_stop = 0;
    const char *text_stops[SCHED_MAX_STOP];
    for (size_t i = 0; i < sb->n_stop; i++) {
        const char *st = sb->stop[i];
        char *end;
        int32_t id;
        if (!strcmp(st, "eos"))
            stops[n_id_stop++] = c->eos_token_id;
        else if (!strncmp(st, "id:", 3) && (id = (int32_t)strtol(st + 3, &end, 10)) >= 0 &&
                 end != st + 3 && !*end)
            stops[n_id_stop++] = id;
        else if (!st[0] || strlen(st) > SCHED_MAX_STOP_TEXT)
            BAD(DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "stop %zu: a stop string has 1..%d bytes",
                i, SCHED_MAX_STOP_TEXT);
        else if (!s->tok)
            BAD(DSD__ERROR_CODE__ERROR_CODE_MALFORMED,
                "stop '%.64s': without a tokenizer only 'eos' and 'id:N' are understood", st);
        else
            text_stops[n_text_stop++] = st;
    }
    memset(j, 0, sizeof(*j));
    j->mb = -1;
    j->prompt = malloc(n_prompt * sizeof(int32_t));
    bool ok = j->prompt != NULL;
    for (uint32_t i = 0; ok && i < n_text_stop; i++)
        ok = (j->stop_text[j->n_stop_text++] = strdup(text_stops[i])) != NULL;
    if (ok && s->tok)
        ok = ds_tok_stream_new(s->tok, true, &j->ts) == 0;
    if (!ok) {
        free(j->prompt);
        for (uint32_t i = 0; i < j->n_stop_text; i++)
            free(j->stop_text[i]);
        ds_tok_stream_free(j->ts);
        memset(j, 0, sizeof(*j));
        j->mb = -1;
        BAD(DSD__ERROR_CODE__ERROR_CODE_INTERNAL, "out of memory");
    }
    for (size_t i = 0; i < n_prompt; i++)
        j->prompt[i] = text_ids ? text_ids[i] : (int32_t)sb->tokens[i];
    free(text_ids);
    text_ids = NULL;
    j->active = true;
    j->id = ++s->next_job;
    memcpy(j->peer, peer, pl);
    j->peer_len = pl;
    j->request_id = env->request_id;
    j->n_prompt = (uint32_t)n_prompt;
    j->max_tokens = sb->max_tokens;
    j->n_stop = n_id_stop;
    memcpy(j->stop_ids, stops, n_id_stop * sizeof(int32_t));
    j->smp = (ds_sampler){.greedy = temp == 0,
                          .temperature = temp > 0 ? temp : 1,
                          .top_p = top_p,
                          .top_k = sb->sampling ? sb->sampling->top_k : 0};
    ds_sampler_seed(&j->smp, sb->sampling ? sb->sampling->seed : 1);
    /* acknowledge with the job id so the client can cancel before the first token */
    Dsd__Envelope ack = DSD__ENVELOPE__INIT;
    Dsd__StatusReply sr = DSD__STATUS_REPLY__INIT;
    char js[64];
    snprintf(js, sizeof(js), "{\"job\":%llu}", (unsigned long long)j->id);
    sr.json = js;
    ack.request_id = env->request_id;
    ack.body_case = DSD__ENVELOPE__BODY_STATUS_REPLY;
    ack.status_reply = &sr;
    dsd_data_publish_jobs(s->data);
    pipe_reply(pipe, peer, pl, &ack);
    ds_log_info("job %llu accepted: %u prompt tokens, max %u", (unsigned long long)j->id,
                j->n_prompt, j->max_tokens);
#undef BAD
}

static void handle_cancel(dsd_sched *s, void *pipe, const uint8_t *peer, size_t pl,
                          Dsd__Envelope *env)
{
    for (uint32_t i = 0; i < s->max_jobs; i++) {
        struct job *j = &s->jobs[i];
        if (j->active && j->id == env->cancel->job) {
            /* a client may cancel only its own jobs; the loop cancels on disconnect (pl == 0) */
            if (pl && (pl != j->peer_len || memcmp(peer, j->peer, pl)))
                break;
            if (!pl)
                j->peer_len = 0; /* the client is gone: no final token to send */
            if (j->mb >= 0)
                j->cancelled = true; /* finished when its micro-batch comes back */
            else
                job_finish(s, j, "cancelled");
            return;
        }
    }
    if (pl)
        pipe_error(pipe, peer, pl, env->request_id, DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_JOB,
                   "no such job");
}

static struct mbatch *mb_find(dsd_sched *s, uint64_t rid)
{
    for (uint32_t i = 0; i < s->max_mbs; i++)
        if (s->mbs[i].used && s->mbs[i].rid == rid)
            return &s->mbs[i];
    return NULL;
}

static void mb_release(struct mbatch *mb)
{
    mb->used = false;
    mb->nj = 0;
}

/* Fails every job of a micro-batch (a node died or refused the step). */
static void mb_fail(dsd_sched *s, struct mbatch *mb, const char *why)
{
    ds_log_err("step %llu (micro-batch %llu) failed: %s", (unsigned long long)mb->step,
               (unsigned long long)mb->rid, why);
    for (uint32_t q = 0; q < mb->nj; q++) {
        struct job *j = &s->jobs[mb->jobs[q]];
        j->mb = -1;
        job_finish(s, j, j->cancelled ? "cancelled" : "error");
    }
    mb_release(mb);
}

static bool held_append(struct job *j, const char *p, size_t n)
{
    if (!n)
        return true;
    char *h = realloc(j->held, j->n_held + n + 1);
    if (!h)
        return false;
    memcpy(h + j->n_held, p, n);
    j->n_held += n;
    h[j->n_held] = 0;
    j->held = h;
    return true;
}

/* The text token t adds to job j, as it may be sent now: complete UTF-8 characters, minus any
 * tail that could still turn into a stop string (held back until it does or cannot). final:
 * the job ends with this token (everything held goes out). A stop string found cuts the text
 * before it and sets *reason = "stop". *out (malloc'd, NUL-terminated) may be "". */
static int job_text(dsd_sched *s, struct job *j, int32_t t, bool final, const char **reason,
                    char **out)
{
    *out = NULL;
    const char *p = NULL;
    size_t n = 0;
    ds_error err = {0};
    if (j->ts && ds_tok_stream_push(j->ts, t, &p, &n, &err) == 0 && !held_append(j, p, n))
        return -ENOMEM;
    /* the earliest stop string in the held text */
    size_t cut = SIZE_MAX;
    for (uint32_t k = 0; k < j->n_stop_text; k++) {
        const char *m = j->held ? strstr(j->held, j->stop_text[k]) : NULL;
        if (m && (size_t)(m - j->held) < cut)
            cut = (size_t)(m - j->held);
    }
    if (cut != SIZE_MAX) {
        *reason = "stop";
    } else if (final || *reason) {
        if (j->ts && ds_tok_stream_flush(j->ts, &p, &n) == 0 && !held_append(j, p, n))
            return -ENOMEM;
        cut = j->n_held;
    } else {
        /* hold the longest tail that is a proper prefix of some stop string */
        size_t hold = 0;
        for (uint32_t k = 0; k < j->n_stop_text; k++) {
            size_t sl = strlen(j->stop_text[k]);
            for (size_t h = sl - 1; h > hold; h--)
                if (h <= j->n_held && !memcmp(j->held + j->n_held - h, j->stop_text[k], h)) {
                    hold = h;
                    break;
                }
        }
        cut = j->n_held - hold;
    }
    if (!(*out = malloc(cut + 1)))
        return -ENOMEM;
    if (cut)
        memcpy(*out, j->held, cut);
    (*out)[cut] = 0;
    memmove(j->held ? j->held : *out, j->held ? j->held + cut : *out, j->n_held - cut);
    j->n_held -= cut;
    if (j->held)
        j->held[j->n_held] = 0;
    (void)s;
    return 0;
}

void dsd_sched_on_result(dsd_sched *s, uint64_t rid, const float *x, uint32_t n, const char *error)
{
    struct mbatch *mb = mb_find(s, rid);
    if (!mb) {
        ds_log_debug("scheduler: result for unknown micro-batch %llu (late or foreign)",
                     (unsigned long long)rid);
        return;
    }
    const ds_model_config *c = s->c;
    uint32_t D = c->hidden_size, V = c->vocab_size;
    float *sel = NULL, *logits = NULL;
    ds_error err = {0};
    if (error) {
        mb_fail(s, mb, error);
        return;
    }
    if (n <= mb->last[mb->nj - 1]) {
        mb_fail(s, mb, "the final rows came back short");
        return;
    }
    sel = malloc((size_t)mb->nj * D * sizeof(float));
    logits = malloc((size_t)mb->nj * V * sizeof(float));
    if (!sel || !logits) {
        free(sel);
        free(logits);
        mb_fail(s, mb, "out of memory");
        return;
    }
    for (uint32_t q = 0; q < mb->nj; q++)
        memcpy(sel + (size_t)q * D, x + (size_t)mb->last[q] * D, D * sizeof(float));
    if (ds_unit_head(dsd_data_model(s->data), dsd_data_pool(s->data), sel, mb->nj, logits, &err) <
        0) {
        free(sel);
        free(logits);
        mb_fail(s, mb, ds_error_str(&err));
        return;
    }
    for (uint32_t q = 0; q < mb->nj; q++) {
        struct job *j = &s->jobs[mb->jobs[q]];
        j->mb = -1;
        j->fed = j->fed < j->n_prompt ? j->n_prompt : j->fed + 1;
        int32_t t = ds_sampler_pick(&j->smp, logits + (size_t)q * V, V);
        j->n_gen++;
        j->next = t;
        const char *reason = j->n_gen >= j->max_tokens ? "length" : NULL;
        for (uint32_t k = 0; k < j->n_stop && !reason; k++)
            if (j->stop_ids[k] == t)
                reason = "stop";
        char *text = NULL;
        if (s->tok && job_text(s, j, t, j->cancelled, &reason, &text) < 0)
            reason = "error";
        Dsd__Envelope env = DSD__ENVELOPE__INIT;
        Dsd__Token tk = DSD__TOKEN__INIT;
        tk.job = j->id;
        tk.id = (uint32_t)t;
        tk.text = text ? text : (char *)"";
        tk.last = reason != NULL;
        tk.finish_reason = (char *)(reason ? reason : "");
        env.request_id = j->request_id;
        env.body_case = DSD__ENVELOPE__BODY_TOKEN;
        env.token = &tk;
        pipe_reply(s->pipe, j->peer, j->peer_len, &env);
        free(text);
        if (reason) {
            j->peer_len = 0; /* the final token carried last = true */
            job_finish(s, j, reason);
        } else if (j->cancelled) {
            job_finish(s, j, "cancelled");
        }
    }
    free(sel);
    free(logits);
    mb_release(mb);
}

/* Launches one micro-batch of the given job slots. */
static void launch(dsd_sched *s, struct mbatch *mb, const uint32_t *slots, uint32_t nj)
{
    uint32_t n = 0, D = s->c->hidden_size;
    for (uint32_t q = 0; q < nj; q++) {
        struct job *j = &s->jobs[slots[q]];
        n += j->fed < j->n_prompt ? j->n_prompt - j->fed : 1;
    }
    int32_t *tok = malloc(n * sizeof(*tok));
    uint64_t *ids = malloc(n * sizeof(*ids));
    uint32_t *pos = malloc(n * sizeof(*pos));
    float *x = malloc((size_t)n * D * sizeof(float));
    ds_error err = {0};
    mb->used = true;
    mb->rid = ++s->next_rid;
    mb->step = ++s->step;
    mb->nj = nj;
    mb->deadline = dsd_now_ns() + (uint64_t)s->o.step_timeout_ms * 1000000ull;
    uint32_t r = 0;
    for (uint32_t q = 0; q < nj; q++) {
        struct job *j = &s->jobs[slots[q]];
        mb->jobs[q] = slots[q];
        j->mb = (int32_t)(mb - s->mbs);
        if (!tok || !ids || !pos)
            continue;
        if (j->fed < j->n_prompt) {
            for (uint32_t p = j->fed; p < j->n_prompt; p++, r++) {
                tok[r] = j->prompt[p];
                ids[r] = j->id;
                pos[r] = p;
            }
        } else {
            tok[r] = j->next;
            ids[r] = j->id;
            pos[r] = j->fed;
            r++;
        }
        mb->last[q] = r - 1;
    }
    int rc = !tok || !ids || !pos || !x ? ds_error_set(&err, -ENOMEM, "out of memory") : 0;
    if (rc == 0)
        rc = ds_unit_embed(dsd_data_model(s->data), dsd_data_pool(s->data), tok, n, x, &err);
    uint64_t rid = mb->rid;
    /* the chain may complete (and release mb) inside launch when every unit is local */
    if (rc == 0)
        rc = dsd_data_launch(s->data, rid, mb->step, (uint32_t)(mb - s->mbs), n, ids, pos, x, &err);
    if (rc < 0 && mb_find(s, rid))
        mb_fail(s, mb, ds_error_str(&err));
    free(tok);
    free(ids);
    free(pos);
    free(x);
}

void dsd_sched_tick(dsd_sched *s)
{
    uint64_t now = dsd_now_ns();
    uint32_t inflight = 0;
    for (uint32_t i = 0; i < s->max_mbs; i++) {
        struct mbatch *mb = &s->mbs[i];
        if (mb->used && now > mb->deadline) {
            char why[96];
            snprintf(why, sizeof(why), "no result within %lld ms (step_timeout_ms)",
                     (long long)s->o.step_timeout_ms);
            mb_fail(s, mb, why);
        }
        inflight += mb->used;
    }
    uint32_t *ready = malloc(s->max_jobs * sizeof(uint32_t)), nr = 0;
    if (!ready)
        return;
    for (uint32_t i = 0; i < s->max_jobs; i++)
        if (s->jobs[i].active && s->jobs[i].mb < 0)
            ready[nr++] = i;
    uint32_t at = 0;
    while (at < nr && inflight < s->max_mbs) {
        struct mbatch *mb = NULL;
        for (uint32_t i = 0; i < s->max_mbs && !mb; i++)
            if (!s->mbs[i].used)
                mb = &s->mbs[i];
        if (!mb)
            break;
        uint32_t free_slots = s->max_mbs - inflight, left = nr - at;
        uint32_t take = (left + free_slots - 1) / free_slots;
        launch(s, mb, ready + at, take);
        at += take;
        inflight = 0;
        for (uint32_t i = 0; i < s->max_mbs; i++)
            inflight += s->mbs[i].used;
    }
    free(ready);
}

/* A reload: the step timeout applies to the next micro-batch; max_jobs to the next plan. */
void dsd_sched_set_opts(dsd_sched *s, const dsd_opts *o)
{
    uint32_t max_jobs = (uint32_t)s->o.max_jobs;
    s->o = *o;
    s->o.max_jobs = max_jobs; /* the job table is sized at start */
}

long dsd_sched_wait_ms(dsd_sched *s)
{
    /* ready jobs and a free micro-batch slot: come back at once */
    uint32_t inflight = 0;
    for (uint32_t i = 0; i < s->max_mbs; i++)
        inflight += s->mbs[i].used;
    if (inflight < s->max_mbs)
        for (uint32_t i = 0; i < s->max_jobs; i++)
            if (s->jobs[i].active && s->jobs[i].mb < 0)
                return 0;
    return 50;
}

/* Client requests the event loop forwards as [client-id, envelope]. */
void dsd_sched_on_pipe(dsd_sched *s)
{
    for (int guard = 0; guard < 1024; guard++) {
        zmq_msg_t a, b;
        zmq_msg_init(&a);
        zmq_msg_init(&b);
        if (zmq_msg_recv(&a, s->pipe, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&a);
            zmq_msg_close(&b);
            return;
        }
        zmq_msg_recv(&b, s->pipe, 0);
        Dsd__Envelope *env = NULL;
        ds_error err = {0};
        if (ds_wire_unpack(zmq_msg_data(&b), zmq_msg_size(&b), &env, &err) == 0) {
            const uint8_t *peer = zmq_msg_data(&a);
            size_t pl = zmq_msg_size(&a);
            if (env->body_case == DSD__ENVELOPE__BODY_SUBMIT)
                handle_submit(s, s->pipe, peer, pl, env);
            else if (env->body_case == DSD__ENVELOPE__BODY_CANCEL)
                handle_cancel(s, s->pipe, peer, pl, env);
            ds_wire_free(env);
        }
        zmq_msg_close(&a);
        zmq_msg_close(&b);
    }
}

void dsd_sched_refuse_pipe(void *pipe)
{
    for (int guard = 0; guard < 1024; guard++) {
        zmq_msg_t a, b;
        zmq_msg_init(&a);
        zmq_msg_init(&b);
        if (zmq_msg_recv(&a, pipe, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&a);
            zmq_msg_close(&b);
            return;
        }
        zmq_msg_recv(&b, pipe, 0);
        Dsd__Envelope *env = NULL;
        ds_error err = {0};
        if (ds_wire_unpack(zmq_msg_data(&b), zmq_msg_size(&b), &env, &err) == 0) {
            if (zmq_msg_size(&a))
                pipe_error(pipe, zmq_msg_data(&a), zmq_msg_size(&a), env->request_id,
                           DSD__ERROR_CODE__ERROR_CODE_BUSY, "no plan is installed");
            ds_wire_free(env);
        }
        zmq_msg_close(&a);
        zmq_msg_close(&b);
    }
}

int dsd_sched_new(const dsd_opts *o, const dsd_plan *plan, dsd_data *data, void *pipe,
                  dsd_sched **ret, ds_error *err)
{
    dsd_sched *s = calloc(1, sizeof(*s));
    if (!s)
        return ds_error_set(err, -ENOMEM, "scheduler: out of memory");
    s->pipe = pipe;
    s->data = data;
    s->o = *o;
    s->c = ds_model_get_config(dsd_data_model(data));
    ds_error terr = {0};
    if (ds_tokenizer_load(o->model, &s->tok, &terr) < 0) {
        s->tok = NULL;
        ds_log_info("no tokenizer (%s): clients send token ids; stops 'eos' and 'id:N' only",
                    ds_error_str(&terr));
    }
    s->max_jobs = (uint32_t)o->max_jobs;
    s->max_mbs = (uint32_t)(o->micro_batches > 0 ? o->micro_batches : 1);
    /* pipelining needs a second node to overlap with: a plan that keeps every attention layer
     * and expert on one node gains nothing from splitting a step, and each micro-batch pays
     * the per-step costs (measured: 0.78x on a one-node plan) */
    bool one_node = true;
    for (uint32_t l = 0; l < plan->n_layers && one_node; l++) {
        one_node = plan->attn[l] == plan->attn[0];
        for (uint32_t e = 0; e < plan->n_experts && one_node; e++) {
            size_t i = (size_t)l * plan->n_experts + e;
            one_node = (plan->expert[i] < 0 || plan->expert[i] == plan->attn[0]);
        }
    }
    if (one_node && s->max_mbs > 1) {
        ds_log_info("scheduler: the plan runs on one node: 1 micro-batch in flight");
        s->max_mbs = 1;
    }
    s->jobs = calloc(s->max_jobs, sizeof(*s->jobs));
    s->mbs = calloc(s->max_mbs, sizeof(*s->mbs));
    bool ok = s->jobs && s->mbs;
    for (uint32_t i = 0; ok && i < s->max_mbs; i++) {
        s->mbs[i].jobs = malloc(s->max_jobs * sizeof(uint32_t));
        s->mbs[i].last = malloc(s->max_jobs * sizeof(uint32_t));
        ok = s->mbs[i].jobs && s->mbs[i].last;
    }
    for (uint32_t i = 0; ok && i < s->max_jobs; i++)
        s->jobs[i].mb = -1;
    if (!ok) {
        dsd_sched_free(s, "error");
        return ds_error_set(err, -ENOMEM, "scheduler: out of memory");
    }
    *ret = s;
    return 0;
}

/* Ends every job with `reason` ("error": the plan changed under it; "cancelled": the node
 * stops) and frees the scheduler. */
dsd_sched *dsd_sched_free(dsd_sched *s, const char *reason)
{
    if (!s)
        return NULL;
    for (uint32_t i = 0; s->jobs && i < s->max_jobs; i++)
        if (s->jobs[i].active) {
            s->jobs[i].mb = -1;
            job_finish(s, &s->jobs[i], reason);
        }
    for (uint32_t i = 0; s->mbs && i < s->max_mbs; i++) {
        free(s->mbs[i].jobs);
        free(s->mbs[i].last);
    }
    free(s->mbs);
    free(s->jobs);
    ds_tokenizer_free(s->tok);
    free(s);
    return NULL;
}
