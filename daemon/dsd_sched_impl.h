/* dsd_sched_impl.h — the scheduler's state, shared by dsd_sched.c (micro-batches, results,
 * sampling) and dsd_sched_submit.c (a client's Submit checked and turned into a job). Not a
 * public header: the scheduler's API is dsd_sched.h. */
#ifndef DSD_SCHED_IMPL_H
#define DSD_SCHED_IMPL_H

#include "dsd_sched.h"

#define SCHED_MAX_STOP      16
#define SCHED_MAX_STOP_TEXT 256 /* bytes of one stop string */

struct job {
    bool active;
    uint64_t id;
    uint8_t peer[DSD_SCHED_MAX_CLIENT_ID];
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
    /* replay (dsd_sched_adopt, a failed micro-batch): the tokens streamed so far, so the job
     * can be fed again from position 0 on another plan and go on where it was */
    int32_t *gen;       /* [n_gen] every token sampled (and sent) so far */
    uint32_t gen_cap;   /* allocated entries of gen */
    uint32_t n_prompt0; /* the client's prompt length (prompt[0..n_prompt0)); 0 = n_prompt */
    bool skip_sample;   /* a replayed prefill: its last row's token is `next`, already sent */
    uint32_t replays;   /* times it was fed again */
};

struct mbatch {
    bool used;
    uint64_t rid, step;
    uint32_t nj;
    uint32_t *jobs;    /* [nj] job slots */
    uint32_t *last;    /* [nj] the row of each job whose logits it samples from */
    uint32_t *rows;    /* [nj] rows (positions) each job feeds in this micro-batch */
    uint64_t deadline; /* ns, on the clock of dsd_sched_tick */
};

struct dsd_sched {
    const ds_model *m;
    ds_pool *pool;
    const ds_unit_runner_ops *units; /* embed / head elsewhere (dsd_sched_set_units), or NULL */
    void *units_ctx;
    const ds_model_config *c;
    const dsd_sched_port *port;
    void *ctx;
    dsd_sched_limits lim;
    uint32_t ctx_len;  /* positions per job: max_context capped by the model */
    ds_tokenizer *tok; /* NULL: token ids only (no tokenizer.json in the model directory) */
    struct job *jobs;
    uint32_t max_jobs;
    struct mbatch *mbs;
    uint32_t max_mbs;
    uint64_t now_ns; /* the last tick's time */
    uint64_t next_job, next_rid, step, jobs_done;
};

/* Replies through the port (nothing when the client is gone: peer_len 0). */
void dsd_sched_client_reply(dsd_sched *s, const uint8_t *peer, size_t peer_len,
                            const Dsd__Envelope *env);
/* An Error reply to a client request, logged. */
void dsd_sched_client_error(dsd_sched *s, const uint8_t *peer, size_t peer_len, uint64_t req,
                            Dsd__ErrorCode code, const char *msg);
/* The port's jobs_changed, when it has one. */
void dsd_sched_jobs_changed(dsd_sched *s);

#endif
