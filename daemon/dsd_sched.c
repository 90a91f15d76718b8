/* dsd_sched.c — the coordinator's scheduler (dsd_sched.h): jobs, continuous batching,
 * micro-batches, chunked prefill, embed, head and sampling; no I/O.
 *
 * At a tick, the active jobs that are not in flight form new micro-batches while fewer than
 * `micro_batches` are in flight: the jobs are split evenly over the free slots so that one
 * micro-batch computes on one node while another crosses a link. A micro-batch takes one row
 * of each decoding job and the next prompt rows of each job in prefill, at most
 * max_rows_per_step rows in all: a longer prompt is fed in chunks over several steps and
 * samples its first token when its last chunk comes back. A micro-batch is embedded here and
 * handed to the port (launch); its final rows come back (dsd_sched_on_result), the head runs
 * on the last row of every job that completed its prompt or decodes, and each job samples
 * its next token with its own sampler. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "ds_log.h"
#include "dsd_sched_impl.h"

/* ---- helpers ------------------------------------------------------------------------------ */

void dsd_sched_client_reply(dsd_sched *s, const uint8_t *peer, size_t peer_len,
                            const Dsd__Envelope *env)
{
    if (peer_len)
        s->port->reply(s->ctx, peer, peer_len, env);
}

void dsd_sched_jobs_changed(dsd_sched *s)
{
    if (s->port->jobs_changed)
        s->port->jobs_changed(s->ctx);
}

void dsd_sched_client_error(dsd_sched *s, const uint8_t *peer, size_t peer_len, uint64_t req,
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
    dsd_sched_client_reply(s, peer, peer_len, &env);
}

/* Ends a job: the final Token (last = true, with why for an error) to its client when it is
 * still there, the KV caches freed on every attention host. Never called while the job is in
 * flight. */
static void job_finish_why(dsd_sched *s, struct job *j, const char *reason, const char *why)
{
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__Token t = DSD__TOKEN__INIT;
    t.job = j->id;
    t.last = true;
    t.finish_reason = (char *)reason;
    char why_buf[512];
    snprintf(why_buf, sizeof(why_buf), "%s", why ? why : "");
    t.error = why_buf;
    env.request_id = j->request_id;
    env.body_case = DSD__ENVELOPE__BODY_TOKEN;
    env.token = &t;
    uint8_t peer[DSD_SCHED_MAX_CLIENT_ID];
    size_t pl = j->peer_len;
    memcpy(peer, j->peer, pl);
    s->port->release(s->ctx, j->id);
    if (why && why[0])
        ds_log_notice("job %llu finished (%s) after %u tokens: %s", (unsigned long long)j->id,
                      reason, j->n_gen, why);
    else
        ds_log_info("job %llu finished (%s) after %u tokens", (unsigned long long)j->id, reason,
                    j->n_gen);
    free(j->prompt);
    free(j->gen);
    for (uint32_t i = 0; i < j->n_stop_text; i++)
        free(j->stop_text[i]);
    ds_tok_stream_free(j->ts);
    free(j->held);
    memset(j, 0, sizeof(*j));
    j->mb = -1;
    s->jobs_done++;
    /* the job list a client reads after the last token must not show the job any more */
    dsd_sched_jobs_changed(s);
    dsd_sched_client_reply(s, peer, pl, &env);
}

static void job_finish(dsd_sched *s, struct job *j, const char *reason)
{
    job_finish_why(s, j, reason, NULL);
}

/* Makes job j start again from position 0: its prompt followed by every token it sent but the
 * last (which is `next`, the token it feeds at its next decode step); a job still in its
 * prompt just feeds it again. The KV caches it had are overwritten from position 0 (a lower
 * position rewinds a cache). Its sampler is untouched: the token the replayed prefill's last
 * row would sample was sampled already (skip_sample). */
static int job_rewind(struct job *j)
{
    if (!j->n_prompt0)
        j->n_prompt0 = j->n_prompt;
    uint32_t keep = j->n_gen ? j->n_gen - 1 : 0, n = j->n_prompt0 + keep;
    int32_t *p = realloc(j->prompt, (n ? n : 1) * sizeof(*p));
    if (!p)
        return -ENOMEM;
    if (keep)
        memcpy(p + j->n_prompt0, j->gen, keep * sizeof(*p));
    j->prompt = p;
    j->n_prompt = n;
    j->fed = 0;
    j->skip_sample = j->n_gen > 0;
    j->mb = -1;
    j->replays++;
    return 0;
}

void dsd_sched_get_stats(const dsd_sched *s, dsd_sched_stats *st)
{
    memset(st, 0, sizeof(*st));
    for (uint32_t i = 0; i < s->max_jobs; i++)
        st->jobs += s->jobs[i].active;
    for (uint32_t i = 0; i < s->max_mbs; i++)
        st->in_flight += s->mbs[i].used;
    st->finished = s->jobs_done;
    st->steps = s->step;
    st->micro_batches = s->max_mbs;
}

char *dsd_sched_jobs_json(const dsd_sched *s)
{
    json_t *jobs = json_array();
    for (uint32_t i = 0; i < s->max_jobs; i++) {
        const struct job *j = &s->jobs[i];
        if (!j->active)
            continue;
        json_array_append_new(jobs, json_pack("{s:I,s:s,s:i,s:i,s:i,s:b}", "id", (json_int_t)j->id,
                                              "state", j->fed < j->n_prompt ? "prefill" : "decode",
                                              "prompt_tokens",
                                              (int)(j->n_prompt0 ? j->n_prompt0 : j->n_prompt),
                                              "generated", (int)j->n_gen, "max_tokens",
                                              (int)j->max_tokens, "in_flight", j->mb >= 0));
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

void dsd_sched_cancel(dsd_sched *s, const uint8_t *peer, size_t pl, uint64_t request_id,
                      uint64_t job)
{
    for (uint32_t i = 0; i < s->max_jobs; i++) {
        struct job *j = &s->jobs[i];
        if (j->active && j->id == job) {
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
        dsd_sched_client_error(s, peer, pl, request_id, DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_JOB,
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

/* A micro-batch failed (a node died or refused the step): its jobs are fed again from
 * position 0 while they have replays left (max_replays), else they end with the error. */
static void mb_fail(dsd_sched *s, struct mbatch *mb, const char *why)
{
    ds_log_err("step %llu (micro-batch %llu) failed: %s", (unsigned long long)mb->step,
               (unsigned long long)mb->rid, why);
    for (uint32_t q = 0; q < mb->nj; q++) {
        struct job *j = &s->jobs[mb->jobs[q]];
        j->mb = -1;
        if (j->cancelled) {
            job_finish(s, j, "cancelled");
        } else if (j->replays < s->lim.max_replays && job_rewind(j) == 0) {
            ds_log_notice("job %llu: fed again from position 0 (%u tokens sent so far; replay "
                          "%u of %u)",
                          (unsigned long long)j->id, j->n_gen, j->replays, s->lim.max_replays);
        } else {
            char msg[512];
            snprintf(msg, sizeof(msg), "%s%s", why, s->lim.max_replays ? " (no replays left)" : "");
            job_finish_why(s, j, "error", msg);
        }
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

/* Sends job j the token t it sampled (text decoded, stops checked) and ends it when it is
 * done or was cancelled while in flight. */
static void job_emit(dsd_sched *s, struct job *j, int32_t t)
{
    if (j->n_gen >= j->gen_cap) { /* kept for a replay */
        uint32_t cap = j->gen_cap ? j->gen_cap * 2 : 64;
        int32_t *g = realloc(j->gen, cap * sizeof(*g));
        if (g) {
            j->gen = g;
            j->gen_cap = cap;
        }
    }
    if (j->n_gen < j->gen_cap)
        j->gen[j->n_gen] = t;
    else
        j->replays = UINT32_MAX; /* cannot be replayed without its tokens */
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
    dsd_sched_client_reply(s, j->peer, j->peer_len, &env);
    free(text);
    if (reason) {
        j->peer_len = 0; /* the final token carried last = true */
        job_finish(s, j, reason);
    } else if (j->cancelled) {
        job_finish(s, j, "cancelled");
    }
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
    ds_error err = {0};
    if (error) {
        mb_fail(s, mb, error);
        return;
    }
    if (!x || n <= mb->last[mb->nj - 1]) {
        mb_fail(s, mb, "the final rows came back short");
        return;
    }
    /* the jobs that sample now: decoding ones, and those whose last prompt chunk this was */
    uint32_t ns = 0;
    for (uint32_t q = 0; q < mb->nj; q++) {
        struct job *j = &s->jobs[mb->jobs[q]];
        ns += j->fed + mb->rows[q] >= j->n_prompt && !j->skip_sample;
    }
    float *sel = ns ? malloc((size_t)ns * D * sizeof(float)) : NULL;
    float *logits = ns ? malloc((size_t)ns * V * sizeof(float)) : NULL;
    if (ns && (!sel || !logits)) {
        free(sel);
        free(logits);
        mb_fail(s, mb, "out of memory");
        return;
    }
    for (uint32_t q = 0, k = 0; q < mb->nj; q++) {
        struct job *j = &s->jobs[mb->jobs[q]];
        if (j->fed + mb->rows[q] >= j->n_prompt && !j->skip_sample)
            memcpy(sel + (size_t)k++ * D, x + (size_t)mb->last[q] * D, D * sizeof(float));
    }
    if (ns &&
        (s->units && s->units->head ? s->units->head(s->units_ctx, sel, ns, logits, &err)
                                    : ds_unit_head(s->m, s->pool, sel, ns, logits, &err)) < 0) {
        free(sel);
        free(logits);
        mb_fail(s, mb, ds_error_str(&err));
        return;
    }
    for (uint32_t q = 0, k = 0; q < mb->nj; q++) {
        struct job *j = &s->jobs[mb->jobs[q]];
        j->mb = -1;
        j->fed += mb->rows[q];
        if (j->fed < j->n_prompt) { /* a prompt chunk: more of the prompt to feed */
            if (j->cancelled)
                job_finish(s, j, "cancelled");
            continue;
        }
        if (j->skip_sample) { /* a replay caught up: it decodes `next` from here on */
            j->skip_sample = false;
            if (j->cancelled)
                job_finish(s, j, "cancelled");
            continue;
        }
        job_emit(s, j, ds_sampler_pick(&j->smp, logits + (size_t)k++ * V, V));
    }
    free(sel);
    free(logits);
    mb_release(mb);
}

/* Launches one micro-batch of (the first of) the given ready job slots: one row of each
 * decoding job, the next prompt rows of each job in prefill, max_rows_per_step rows at most.
 * Returns how many of the slots it took (at least one). */
static uint32_t launch(dsd_sched *s, struct mbatch *mb, const uint32_t *slots, uint32_t nj)
{
    uint32_t n = 0, D = s->c->hidden_size, budget = s->lim.max_rows_per_step, taken = 0;
    for (uint32_t q = 0; q < nj && n < budget; q++, taken++) {
        struct job *j = &s->jobs[slots[q]];
        uint32_t want = j->fed < j->n_prompt ? j->n_prompt - j->fed : 1;
        mb->rows[q] = want < budget - n ? want : budget - n;
        n += mb->rows[q];
    }
    int32_t *tok = malloc(n * sizeof(*tok));
    uint64_t *ids = malloc(n * sizeof(*ids));
    uint32_t *pos = malloc(n * sizeof(*pos));
    float *x = malloc((size_t)n * D * sizeof(float));
    ds_error err = {0};
    mb->used = true;
    mb->rid = ++s->next_rid;
    mb->step = ++s->step;
    mb->nj = taken;
    mb->deadline = s->now_ns + s->lim.step_timeout_ns;
    uint32_t r = 0;
    for (uint32_t q = 0; q < taken; q++) {
        struct job *j = &s->jobs[slots[q]];
        mb->jobs[q] = slots[q];
        j->mb = (int32_t)(mb - s->mbs);
        if (!tok || !ids || !pos)
            continue;
        for (uint32_t k = 0; k < mb->rows[q]; k++, r++) {
            uint32_t p = j->fed + k;
            tok[r] = p < j->n_prompt ? j->prompt[p] : j->next;
            ids[r] = j->id;
            pos[r] = p;
        }
        mb->last[q] = r - 1;
    }
    int rc = !tok || !ids || !pos || !x ? ds_error_set(&err, -ENOMEM, "out of memory") : 0;
    if (rc == 0)
        rc = s->units && s->units->embed ? s->units->embed(s->units_ctx, tok, n, x, &err)
                                         : ds_unit_embed(s->m, s->pool, tok, n, x, &err);
    uint64_t rid = mb->rid;
    dsd_sched_batch b = {.rid = rid,
                         .step = mb->step,
                         .mb = (uint32_t)(mb - s->mbs),
                         .n = n,
                         .seq = ids,
                         .pos = pos,
                         .x = x};
    /* the chain may complete (and release mb) inside launch when every unit is local */
    if (rc == 0)
        rc = s->port->launch(s->ctx, &b, &err);
    if (rc < 0 && mb_find(s, rid))
        mb_fail(s, mb, ds_error_str(&err));
    free(tok);
    free(ids);
    free(pos);
    free(x);
    return taken;
}

void dsd_sched_tick(dsd_sched *s, uint64_t now_ns)
{
    s->now_ns = now_ns;
    uint32_t inflight = 0;
    for (uint32_t i = 0; i < s->max_mbs; i++) {
        struct mbatch *mb = &s->mbs[i];
        if (mb->used && now_ns > mb->deadline) {
            char why[96];
            snprintf(why, sizeof(why), "no result within %llu ms (step_timeout_ms)",
                     (unsigned long long)(s->lim.step_timeout_ns / 1000000u));
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
        at += launch(s, mb, ready + at, take);
        inflight = 0;
        for (uint32_t i = 0; i < s->max_mbs; i++)
            inflight += s->mbs[i].used;
    }
    free(ready);
}

void dsd_sched_set_step_timeout(dsd_sched *s, uint64_t step_timeout_ns)
{
    s->lim.step_timeout_ns = step_timeout_ns;
}

long dsd_sched_wait_ms(const dsd_sched *s)
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

int dsd_sched_new(const ds_model *m, ds_pool *pool, ds_tokenizer **tok, const dsd_sched_limits *lim,
                  const dsd_sched_port *port, void *ctx, dsd_sched **ret, ds_error *err)
{
    if (!m || !lim || !port || !port->launch || !port->release || !port->reply || !lim->max_jobs ||
        !lim->max_rows_per_step)
        return ds_error_set(err, -EINVAL, "scheduler: bad arguments");
    dsd_sched *s = calloc(1, sizeof(*s));
    if (!s)
        return ds_error_set(err, -ENOMEM, "scheduler: out of memory");
    s->m = m;
    s->pool = pool;
    s->c = ds_model_get_config(m);
    s->port = port;
    s->ctx = ctx;
    s->lim = *lim;
    s->ctx_len = lim->max_context < s->c->max_position_embeddings ? lim->max_context
                                                                  : s->c->max_position_embeddings;
    if (tok) {
        s->tok = *tok;
        *tok = NULL;
    }
    s->max_jobs = lim->max_jobs;
    s->max_mbs = lim->micro_batches > 0 ? lim->micro_batches : 1;
    /* pipelining needs a second node to overlap with: a plan that keeps every attention layer
     * and expert on one node gains nothing from splitting a step, and each micro-batch pays
     * the per-step costs (measured: 0.78x on a one-node plan) */
    if (lim->one_node && s->max_mbs > 1) {
        ds_log_info("scheduler: the plan runs on one node: 1 micro-batch in flight");
        s->max_mbs = 1;
    }
    s->jobs = calloc(s->max_jobs, sizeof(*s->jobs));
    s->mbs = calloc(s->max_mbs, sizeof(*s->mbs));
    bool ok = s->jobs && s->mbs;
    for (uint32_t i = 0; ok && i < s->max_mbs; i++) {
        s->mbs[i].jobs = malloc(s->max_jobs * sizeof(uint32_t));
        s->mbs[i].last = malloc(s->max_jobs * sizeof(uint32_t));
        s->mbs[i].rows = malloc(s->max_jobs * sizeof(uint32_t));
        ok = s->mbs[i].jobs && s->mbs[i].last && s->mbs[i].rows;
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

uint32_t dsd_sched_adopt(dsd_sched *s, dsd_sched *src)
{
    if (!src)
        return 0;
    /* ids go on from the old scheduler's (clients hold them; a late result of an old
     * micro-batch must not match a new one) */
    s->next_job = src->next_job > s->next_job ? src->next_job : s->next_job;
    s->next_rid = src->next_rid > s->next_rid ? src->next_rid : s->next_rid;
    s->step = src->step > s->step ? src->step : s->step;
    if (src->tok) { /* the jobs' text decoders point into it */
        ds_tokenizer_free(s->tok);
        s->tok = src->tok;
        src->tok = NULL;
    }
    uint32_t taken = 0, at = 0;
    for (uint32_t i = 0; i < src->max_jobs; i++) {
        struct job *j = &src->jobs[i];
        if (!j->active)
            continue;
        while (at < s->max_jobs && s->jobs[at].active)
            at++;
        const char *why = NULL;
        if (j->cancelled)
            why = "cancelled";
        else if (at == s->max_jobs)
            why = "the new plan has fewer job slots (max_jobs)";
        else if (j->replays >= s->lim.max_replays)
            why = "the plan changed under it and it has no replays left";
        else if (job_rewind(j) < 0)
            why = "out of memory";
        if (why) {
            j->mb = -1;
            if (!strcmp(why, "cancelled"))
                job_finish(src, j, "cancelled");
            else
                job_finish_why(src, j, "error", why);
            continue;
        }
        ds_log_notice("job %llu: replayed on the new plan from position 0 (%u prompt + %u sent "
                      "tokens)",
                      (unsigned long long)j->id, j->n_prompt0, j->n_gen);
        s->jobs[at] = *j; /* the job and what it owns move over */
        memset(j, 0, sizeof(*j));
        j->mb = -1;
        taken++;
    }
    s->jobs_done += src->jobs_done;
    dsd_sched_free(src, "error"); /* nothing active is left in it */
    if (taken)
        dsd_sched_jobs_changed(s);
    return taken;
}

void dsd_sched_fail_all(dsd_sched *s, const char *why)
{
    for (uint32_t i = 0; s && i < s->max_jobs; i++)
        if (s->jobs[i].active) {
            s->jobs[i].mb = -1;
            if (s->jobs[i].cancelled)
                job_finish(s, &s->jobs[i], "cancelled");
            else
                job_finish_why(s, &s->jobs[i], "error", why);
        }
    for (uint32_t i = 0; s && i < s->max_mbs; i++)
        mb_release(&s->mbs[i]);
}

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
        free(s->mbs[i].rows);
    }
    free(s->mbs);
    free(s->jobs);
    ds_tokenizer_free(s->tok);
    free(s);
    return NULL;
}

void dsd_sched_set_units(dsd_sched *s, const ds_unit_runner_ops *ops, void *ctx)
{
    s->units = ops;
    s->units_ctx = ops ? ctx : NULL;
}
