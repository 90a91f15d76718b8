/* dsd_sched_submit.c — a client's Submit to the scheduler: the prompt (token ids, or text
 * tokenized here), the context and vocabulary limits, sampling, stops ("eos", "id:N", stop
 * strings), a free job slot; accepted with the job id, or refused with an Error naming why. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds_log.h"
#include "dsd_sched_impl.h"

/* ---- jobs --------------------------------------------------------------------------------- */

void dsd_sched_submit(dsd_sched *s, const uint8_t *peer, size_t pl, uint64_t request_id,
                      const Dsd__Submit *sb)
{
    const ds_model_config *c = s->c;
    uint32_t ctx = s->ctx_len;
    char msg[256];
    if (!pl || pl > DSD_SCHED_MAX_CLIENT_ID)
        return; /* nobody to answer (the owner checks identities) */
#define BAD(code, ...)                                                                             \
    do {                                                                                           \
        snprintf(msg, sizeof(msg), __VA_ARGS__);                                                   \
        dsd_sched_client_error(s, peer, pl, request_id, code, msg);                                \
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
        if (ds_tokenizer_encode(s->tok, sb->prompt, strlen(sb->prompt), true, &text_ids, &n_prompt,
                                &terr) < 0)
            BAD(DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "prompt: %s", ds_error_str(&terr));
    }
    /* from here on, BAD must free text_ids */
#undef BAD
#define BAD(code, ...)                                                                             \
    do {                                                                                           \
        snprintf(msg, sizeof(msg), __VA_ARGS__);                                                   \
        dsd_sched_client_error(s, peer, pl, request_id, code, msg);                                \
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
            BAD(DSD__ERROR_CODE__ERROR_CODE_MALFORMED, "stop %zu: a stop string has 1..%d bytes", i,
                SCHED_MAX_STOP_TEXT);
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
    j->request_id = request_id;
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
    sr.job = j->id;
    ack.request_id = request_id;
    ack.body_case = DSD__ENVELOPE__BODY_STATUS_REPLY;
    ack.status_reply = &sr;
    dsd_sched_jobs_changed(s);
    dsd_sched_client_reply(s, peer, pl, &ack);
    ds_log_info("job %llu accepted: %u prompt tokens, max %u", (unsigned long long)j->id,
                j->n_prompt, j->max_tokens);
#undef BAD
}
