/* dsd_sched.h — the coordinator's scheduler: jobs, continuous batching, micro-batches, embed,
 * head and sampling, with no I/O.
 *
 * It owns no socket, no thread and no clock. Inputs are calls: a client's Submit or Cancel,
 * the final rows of a micro-batch (dsd_sched_on_result) and a tick with the time now. Outputs
 * go through a port, a small table of functions its owner provides: launch a micro-batch of
 * embedded rows down the chain of attention hosts, release a finished sequence's KV caches,
 * reply to a client. The data thread (dsd_data.c) is its owner in the daemon; the cmocka
 * test (tests/test_sched.c) drives it with an in-process port and checks its tokens against
 * the single-process engine.
 *
 * Invariant: every unit is row-independent (ds_model.h), so neither the split of jobs into
 * micro-batches nor the split of a long prompt into chunks of max_rows_per_step rows changes
 * a token: the cluster answers exactly like `dsctl generate --local`. */
#ifndef DSD_SCHED_H
#define DSD_SCHED_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ds_err.h"
#include "ds_layer.h" /* ds_unit_runner_ops */
#include "ds_model.h"
#include "ds_tokenizer.h"
#include "ds_wire.h"

#define DSD_SCHED_MAX_CLIENT_ID 256 /* bytes of a client's identity (a ZeroMQ routing id) */

typedef struct dsd_sched dsd_sched;

/* One micro-batch to start: n rows x[n, D] (embedded), row i of sequence (job id) seq[i] at
 * position pos[i]; rows of one job consecutive. Borrowed for the call only. */
typedef struct dsd_sched_batch {
    uint64_t rid;  /* request id: the result comes back with it */
    uint64_t step; /* scheduler step number (chooses among expert replicas) */
    uint32_t mb;   /* micro-batch slot */
    uint32_t n;
    const uint64_t *seq;
    const uint32_t *pos;
    const float *x;
} dsd_sched_batch;

/* What the scheduler asks of its owner. ctx is the owner's. */
typedef struct dsd_sched_port {
    /* Starts micro-batch b. May call dsd_sched_on_result(b->rid) before it returns (every
     * unit local). A negative errno (err says why) fails the micro-batch's jobs. */
    int (*launch)(void *ctx, const dsd_sched_batch *b, ds_error *err);
    /* A job ended: free its KV caches wherever they are. */
    void (*release)(void *ctx, uint64_t job);
    /* Sends env to the client whose identity is id[id_len] (never called with id_len 0). */
    void (*reply)(void *ctx, const uint8_t *id, size_t id_len, const Dsd__Envelope *env);
    /* (optional) The job list changed (a job started or ended). */
    void (*jobs_changed)(void *ctx);
} dsd_sched_port;

typedef struct dsd_sched_limits {
    uint32_t max_jobs;          /* jobs at once (>= 1) */
    uint32_t micro_batches;     /* micro-batches in flight at once (>= 1) */
    uint32_t max_context;       /* positions per job, prompt + generated (capped by the model) */
    uint32_t max_rows_per_step; /* rows of one micro-batch (>= 1): a longer prefill is chunked */
    uint64_t step_timeout_ns;   /* a micro-batch with no result this long after launch fails */
    bool one_node;              /* the plan runs on one node: one micro-batch in flight */
    uint32_t max_replays;       /* times a job is fed again (its prompt and tokens so far) after
                                 * a failed micro-batch or a plan change before it ends with an
                                 * error; 0: a failed micro-batch ends its jobs at once */
} dsd_sched_limits;

/* A scheduler over model m (embed and head bound; borrowed, must outlive it) computing with
 * pool (borrowed, may be NULL). tok: the tokenizer for text prompts and stop strings, or NULL
 * (token ids only); TAKES OWNERSHIP of *tok and sets it to NULL. port and ctx are borrowed. */
int dsd_sched_new(const ds_model *m, ds_pool *pool, ds_tokenizer **tok, const dsd_sched_limits *lim,
                  const dsd_sched_port *port, void *ctx, dsd_sched **ret, ds_error *err);
/* Runs embed and head through a unit runner (experts/ds_layer.h: the node's units on the
 * device the plan names); ops NULL: the model's CPU units. ctx is borrowed. */
void dsd_sched_set_units(dsd_sched *s, const ds_unit_runner_ops *ops, void *ctx);
/* Ends every job with `reason` ("error": the plan changed under it; "cancelled": the node
 * stops) through the port, frees the scheduler. NULL-safe; returns NULL. */
dsd_sched *dsd_sched_free(dsd_sched *s, const char *reason);

/* Takes over every job of src (a scheduler of the plan being replaced), which is freed: each
 * job is fed again from position 0 here, its prompt and the tokens streamed so far, and goes
 * on where it was with its own sampler, so its client sees one uninterrupted stream,
 * identical to an uninterrupted run (every unit is row-independent, the sampler's state
 * travels with the job). Job ids, request ids and the tokenizer continue from src. A job
 * that does not fit (fewer slots, or past max_replays) ends with an error saying why.
 * Returns the number of jobs taken. src NULL: 0. */
uint32_t dsd_sched_adopt(dsd_sched *s, dsd_sched *src);
/* Ends every job (a cancelled one "cancelled") with finish_reason "error" and why in its final
 * Token's `error`; micro-batches in flight are forgotten (their late results ignored). */
void dsd_sched_fail_all(dsd_sched *s, const char *why);
/* A client's Submit (request request_id from client id[id_len]): accepted (the port replies
 * with the job id) or refused with an Error reply. */
void dsd_sched_submit(dsd_sched *s, const uint8_t *id, size_t id_len, uint64_t request_id,
                      const Dsd__Submit *sb);
/* A client's Cancel of one of its jobs; id_len 0: the client is gone (no reply, no final
 * token). A job in flight ends when its micro-batch comes back. */
void dsd_sched_cancel(dsd_sched *s, const uint8_t *id, size_t id_len, uint64_t request_id,
                      uint64_t job);
/* Micro-batch rid came back: x[n, D] its final rows, or error != NULL (its jobs fail).
 * Unknown rids (late, or another scheduler's) are ignored. */
void dsd_sched_on_result(dsd_sched *s, uint64_t rid, const float *x, uint32_t n, const char *error);
/* Fails micro-batches past their deadline and launches new ones while slots are free. */
void dsd_sched_tick(dsd_sched *s, uint64_t now_ns);
/* How long the owner may wait for input before the next tick: 0 when work is ready. */
long dsd_sched_wait_ms(const dsd_sched *s);
/* The step timeout of the next micro-batches (a reload). */
void dsd_sched_set_step_timeout(dsd_sched *s, uint64_t step_timeout_ns);

typedef struct dsd_sched_stats {
    uint32_t jobs;          /* running */
    uint64_t finished;      /* jobs ended since the start */
    uint64_t steps;         /* micro-batches launched */
    uint32_t in_flight;     /* micro-batches in flight */
    uint32_t micro_batches; /* slots */
} dsd_sched_stats;
void dsd_sched_get_stats(const dsd_sched *s, dsd_sched_stats *st);
/* The job list as the client "jobs" status document (JSON, caller frees): {"jobs": [{id,
 * state, prompt_tokens, generated, max_tokens, in_flight}], "finished", "steps",
 * "micro_batches_in_flight", "micro_batches"}. */
char *dsd_sched_jobs_json(const dsd_sched *s);

#endif
