/* dsd.h — internals shared by the files of the dsd daemon (not a public header).
 *
 * The daemon is a few subsystems: the options table (dsd_options.c), message framing over
 * ZeroMQ (dsd_net.c), the plan and its solver call (dsd_plan.c, dsd_solve.c), the node's unit
 * host (dsd_host.c: its units, a sequence table whose KV covers exactly its attention layers,
 * dispatched experts), the data thread that moves micro-batches through the cluster
 * (dsd_data.c, dsd_chain.c, dsd_links.c; the layer step itself is experts/ds_layer.h), the
 * coordinator's scheduler, which has no I/O and its own header (dsd_sched.h), weight
 * streaming (dsd_stream.c), CURVE (dsd_curve.c), and the event loop's lifecycle and
 * subsystems (dsd_main.c and the files of dsd_loop.h). The event loop owns membership and the
 * control/client sockets; the data thread owns the data socket, the peers' sockets, the units
 * and the jobs, and talks to the loop only over inproc PAIR sockets. */
#ifndef DSD_H
#define DSD_H

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include <jansson.h>
#include <zmq.h>

#include "ds_err.h"
#include "ds_layer.h"
#include "ds_model.h"
#include "ds_wire.h"

/* ---- options (dsd_options.c) -------------------------------------------------------------- */
#define DSD_STR_MAX 256

typedef struct dsd_opts {
    char role[16];                 /* coordinator | worker */
    char node[64];                 /* node name, unique in the cluster */
    char coordinator[DSD_STR_MAX]; /* worker: control endpoint of the coordinator */
    char control_bind[DSD_STR_MAX];
    char client_bind[DSD_STR_MAX];
    char data_bind[DSD_STR_MAX];
    char data_advertise[DSD_STR_MAX]; /* endpoint peers connect to; default data_bind */
    char model[PATH_MAX];             /* checkpoint directory */
    char state_dir[PATH_MAX];
    char log_level[16];
    char cluster[64];
    int64_t expect_workers;    /* coordinator: workers to wait for before planning */
    int64_t heartbeat_ms;      /* heartbeat period */
    int64_t heartbeat_misses;  /* missed periods before a peer is declared failed */
    int64_t threads;           /* compute threads, 0 = all CPUs */
    int64_t max_jobs;          /* concurrent jobs the coordinator accepts */
    int64_t max_context;       /* positions per sequence (prompt + generated) */
    int64_t step_timeout_ms;   /* a unit host that does not answer in this time fails the step */
    int64_t max_request_bytes; /* largest client request accepted */
    int64_t max_frame_bytes;   /* largest frame a data-plane peer may send */
    bool compute;              /* coordinator also hosts units */
    bool auto_replan;          /* coordinator: replan around failed / returning nodes */
    bool calibrate;            /* measure devices at start (cached in state_dir) */
    bool discover_opencl;      /* include OpenCL devices in discovery */
    char devices_config[PATH_MAX]; /* devices operator config (memory_cap, ...), "" = none */
    char plan_strategy[32];        /* coordinator: auto | <ds_strategy name> | round-robin */
    char quantize[8];              /* none | q8_0 | q4_k: linear weights quantised at load */
    int64_t plan_batch;            /* workload the planner optimises: rows per decode step */
    int64_t plan_context;          /* tokens of context per sequence, 0 = max_context */
    char plan_pin[1024];           /* coordinator: "UNIT=NODE/DEV,..." pins for the solver */
    int64_t micro_batches;         /* coordinator: micro-batches in flight at once */
    int64_t max_rows_per_step;     /* coordinator: rows of one micro-batch (chunked prefill) */
    int64_t link_wait_ms; /* coordinator: first plan waits this long for link calibration */
    char curve_secret_key_file[PATH_MAX]; /* cluster key pair file; "" = CURVE off */
    char curve_authorized_keys[PATH_MAX]; /* client public keys allowed; "" = any client key */
    char curve_server_public_key[41];     /* Z85; "" = the public key of the key file */
    char http_bind[DSD_STR_MAX];          /* coordinator: HOST:PORT of the HTTP API, "" = off */
    char http_api_keys_file[PATH_MAX];    /* Bearer keys, one a line; "" = loopback only */
    char http_model_name[128];            /* the model's id in /v1/models; "" = model's name */
    char chat_template_file[PATH_MAX];    /* a chat template to use instead of the model's */
    int64_t http_max_connections;         /* concurrent HTTP connections */
    int64_t http_max_body_bytes;          /* largest HTTP request body */
    int64_t http_timeout_s;               /* an idle HTTP connection is closed after this */
    char curve_operator_keys[PATH_MAX];   /* client keys that may also drain/replan; "" = all */
} dsd_opts;

void dsd_opts_defaults(dsd_opts *o);
/* Sets one option from text; -EINVAL/-ERANGE with err naming the key. reload_only: refuse
 * (-EPERM) an option that cannot change while running. */
int dsd_opts_set(dsd_opts *o, const char *key, const char *value, ds_error *err);
/* Reads a key = value file (# comments, blank lines). Errors name file and line. */
int dsd_opts_load_file(dsd_opts *o, const char *path, ds_error *err);
/* Parses argv: --config=PATH, --key=value overrides, --help. Fills *config with the config
 * path used (may be NULL when none). Returns 1 when --help was printed. */
int dsd_opts_parse(dsd_opts *o, int argc, char **argv, const char **config, ds_error *err);
/* Applies the reloadable options of next onto cur and logs the ones that changed; a
 * non-reloadable difference is logged as ignored. */
void dsd_opts_apply_reload(dsd_opts *cur, const dsd_opts *next);
void dsd_opts_help(FILE *f);
/* Checks cross-option rules (worker needs coordinator, ...). */
int dsd_opts_check(const dsd_opts *o, ds_error *err);
/* model as a Hugging Face hub cache entry (dsd_hf.c): a models--org--name directory, or
 * org/name in $HF_HUB_CACHE / $HF_HOME/hub / ~/.cache/huggingface/hub, becomes its newest
 * snapshot directory (1) and repo_id to "org/name"; anything else is left as it is (0).
 * -ENOENT for an entry without snapshots. */
int dsd_model_resolve(char *model, size_t n, char *repo_id, size_t rn, ds_error *err);
/* Writes the resolved options as JSON-able key = value lines (for `dsd --print-config`). */
void dsd_opts_print(const dsd_opts *o, FILE *f);

/* ---- messages (dsd_net.c) ----------------------------------------------------------------- */
#define DSD_MAX_PEER_ID 256

typedef struct dsd_msg {
    uint8_t peer[DSD_MAX_PEER_ID]; /* ROUTER identity of the sender */
    size_t peer_len;               /* 0 when received on a DEALER/PAIR */
    Dsd__Envelope *env;            /* validated envelope; NULL when refused */
    zmq_msg_t frames[DS_WIRE_MAX_TENSOR_FRAMES];
    uint32_t n_frames;
    void *aligned[DS_WIRE_MAX_TENSOR_FRAMES]; /* copies of frames zmq delivered misaligned */
    Dsd__ErrorCode refused;                   /* why the message was refused (when env == NULL) */
    char user_id[16]; /* the connection's ZAP User-Id (CURVE: its role), "" without one */
} dsd_msg;

/* Receives one multipart message. router: the first frame is the peer identity. Returns 0
 * with m->env set, or a negative errno: -EAGAIN nothing to read, -EPROTO the message was
 * refused (m->refused and err say why; m->peer is kept so the caller can answer). Frames
 * beyond the envelope are checked against its tensor descriptors (count and byte size). */
int dsd_msg_recv(void *sock, bool router, size_t max_envelope, dsd_msg *m, ds_error *err);
void dsd_msg_close(dsd_msg *m);
/* Frame i's data, 16-byte aligned: zmq's receive buffers may put a frame at any offset, and
 * the kernels read floats, so a misaligned frame is copied once (kept until dsd_msg_close);
 * an aligned one is used in place. NULL when i is out of range or memory runs out. */
const void *dsd_msg_frame(dsd_msg *m, uint32_t i, size_t *len);

/* Sends [peer,] envelope, frames. TAKES OWNERSHIP of every frames[i] (malloc'd; set to NULL):
 * they go out without a copy (zmq_msg_init_data) and zmq frees them once written, which is
 * safe even when a peer dies with the message still queued. n_frames must match env->tensors. */
int dsd_send(void *sock, const void *peer, size_t peer_len, Dsd__Envelope *env, void **frames,
             const size_t *sizes, uint32_t n_frames);
int dsd_send_error(void *sock, const void *peer, size_t peer_len, uint64_t request_id,
                   Dsd__ErrorCode code, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
void dsd_tensor_desc(Dsd__TensorDesc *td, uint32_t *shape_buf, Dsd__Dtype dt, uint32_t d0,
                     uint32_t d1);
uint64_t dsd_now_ns(void);

/* ---- unit host (dsd_host.c) --------------------------------------------------------------- */
typedef struct dsd_host dsd_host;

/* Units a host serves, as parsed from a plan for one node. */
typedef struct dsd_units {
    bool embed, head;
    uint32_t n_layers, n_experts;
    bool *attn;          /* [n_layers] (attention + router + shared/dense beside it) */
    bool *expert;        /* [n_layers * n_experts] */
    uint8_t quantize;    /* enum ds_quantize: the plan's load-time quantisation */
    uint8_t *expert_dev; /* [n_layers * n_experts] 0: CPU engine, else dev_names[i]; may be NULL */
    /* [n_layers] where attn[l] (with its KV cache, router, dense/shared FFN) runs: 0 the CPU
     * engine, else the accelerator dev_names[i]; may be NULL (all on the CPU engine) */
    uint8_t *attn_dev;
    uint8_t embed_dev, head_dev; /* the same for embed and head */
    char dev_names[16][32];
    /* what ds_backend_open takes for dev_names[i] ("opencl:1"), as this node's device discovery
     * found it (dsd_local_backend_spec); "" when this node has no such device */
    char dev_specs[16][24];
} dsd_units;

void dsd_units_clear(dsd_units *u);
/* ds_model_open_opts.want over a dsd_units (ctx): binds exactly those units. */
bool dsd_units_want(void *ctx, enum ds_unit_kind kind, uint32_t layer, uint32_t expert);
#define DSD_MAX_ROWS 65536u /* rows per step message */
int dsd_host_new(const char *model_dir, const dsd_units *units, uint32_t threads,
                 uint32_t max_context, dsd_host **ret, ds_error *err);
dsd_host *dsd_host_free(dsd_host *h);
const ds_model *dsd_host_model(const dsd_host *h);
ds_pool *dsd_host_pool(const dsd_host *h);
bool dsd_host_has_attn(const dsd_host *h, uint32_t layer);
/* Frees the KV cache of a sequence (job id); unknown ids are ignored. */
void dsd_host_release(dsd_host *h, uint64_t seq);

/* Checks n rows of a step for attn[layer] against this node's KV caches (layer hosted, rows
 * of one sequence consecutive, positions contiguous with the cache) and gives each row's slot
 * in the host's sequence table (dsd_host_seqs), adding sequences seen for the first time. On
 * error *code is the wire error code and err says why. */
int dsd_host_rows(dsd_host *h, uint32_t layer, uint32_t n, const uint64_t *seq_ids,
                  const uint32_t *positions, int *slots, Dsd__ErrorCode *code, ds_error *err);
/* The sequence table the layer step runs over (its KV caches cover exactly the hosted
 * attention layers). */
ds_seqs *dsd_host_seqs(dsd_host *h);
/* KV caches each sequence holds here: the number of hosted attention layers. */
uint32_t dsd_host_kv_layers(const dsd_host *h);
/* The host's unit runner (experts/ds_layer.h; ctx: the dsd_host): attention (with its KV
 * cache and router) and the dense/shared FFN beside it, embed and head, each on the device the
 * plan named (a ds_backend_units of that accelerator) or on the CPU engine. */
extern const struct ds_unit_runner_ops dsd_host_unit_ops;
/* Records seconds of attention (+ shared/dense beside it) computed for attn[layer]. */
void dsd_host_note_attn(dsd_host *h, uint32_t layer, double seconds);
/* Runs the routed experts of `layer` for P (row, expert) pairs over R input rows:
 * out[p] = expert_{pair_experts[p]}(rows[pair_rows[p]]), unweighted. Every id is checked
 * against this node's units. */
int dsd_host_experts(dsd_host *h, uint32_t layer, uint32_t R, const float *rows, uint32_t P,
                     const uint32_t *pair_rows, const uint32_t *pair_experts, float *out,
                     double *compute_s, Dsd__ErrorCode *code, ds_error *err);
/* JSON object of this node's measured per-unit compute times: {"attn[3]": {"s":..,"calls":..}}. */
char *dsd_host_stats_json(dsd_host *h);

/* ---- plan (dsd_plan.c) -------------------------------------------------------------------- */
#define DSD_MAX_DEVNAMES 16
#define DSD_TOKEN_LEN    33 /* 32 hex digits + NUL */
typedef struct dsd_plan {
    uint64_t version;
    uint32_t n_nodes;
    char (*nodes)[64];              /* [n_nodes] node names; nodes[0] = coordinator */
    char (*endpoints)[DSD_STR_MAX]; /* [n_nodes] data endpoints */
    uint32_t n_layers, n_experts, first_moe;
    int32_t embed, head; /* node index */
    int32_t *attn;       /* [n_layers] node index */
    int32_t *expert;     /* [n_layers * n_experts] node index, -1 for dense layers */
    uint64_t *replicas;  /* [n_layers * n_experts] bit n: node n (< 64) holds an extra copy */
    uint8_t *expert_dev; /* [n_layers * n_experts] 0: the primary node's CPU engine; i > 0: its
                          * accelerator dev_names[i] (opencl0, cuda0, ...) */
    uint8_t *attn_dev;   /* [n_layers] the same for attn[l] (and the dense/shared FFN beside it) */
    uint8_t embed_dev, head_dev;
    char dev_names[DSD_MAX_DEVNAMES][32]; /* [0] = "" */
    uint32_t n_dev_names;
    char strategy[32]; /* strategy requested ("round-robin" or a ds_strategy name) */
    char solver[32];   /* what produced it ("round-robin", "exact-milp", "heuristic", ...) */
    uint8_t quantize;  /* enum ds_quantize every node applies to its units at load */
    char *solver_json; /* the placement library's plan JSON (predicted times), or NULL */
    char token[DSD_TOKEN_LEN]; /* members' data-plane token (Plan.data_token), "" = none; never
                                * in the plan JSON */
} dsd_plan;

/* A plan's tables for model c over n_nodes named nodes, zeroed (embed/head/attn = node 0,
 * experts on node 0, no replicas, every expert on the CPU engine). -ENOMEM. */
int dsd_plan_alloc(dsd_plan *p, const ds_model_config *c, uint32_t n_nodes, const char (*names)[64],
                   const char (*endpoints)[DSD_STR_MAX], uint64_t version);
/* Round-robin plan that spreads attention layers and experts over every node (the coordinator
 * keeps embed and head). */
int dsd_plan_build(dsd_plan *p, const ds_model_config *c, uint32_t n_nodes, const char (*names)[64],
                   const char (*endpoints)[DSD_STR_MAX], bool coord_computes, uint64_t version);
void dsd_plan_clear(dsd_plan *p);
/* Deep copy (solver_json included). */
int dsd_plan_copy(dsd_plan *dst, const dsd_plan *src);
/* Plan from the placement solver (placement/ds_placement.h) over a cluster spec whose nodes
 * are exactly names[0..n_nodes) (spec_json: docs/cluster-spec.md, built by the coordinator
 * from the nodes' reported devices and the measured links). embed and head are pinned to the
 * coordinator (names[0]), which embeds and samples; each unit goes to the node hosting the
 * device the solver chose. pins (may be NULL or ""): "UNIT=NODE/DEV" entries separated by
 * commas or spaces, UNIT a unit name or attn[*] (every layer), kept where they say (the
 * operator's plan_pin; embed/head pins must name a device of the coordinator). -ENOSPC
 * infeasible, -EINVAL bad spec/strategy/pin; err says why. */
int dsd_plan_solve(dsd_plan *p, const ds_model_config *c, const char *spec_json, uint32_t n_nodes,
                   const char (*names)[64], const char (*endpoints)[DSD_STR_MAX],
                   const char *strategy, uint32_t batch, uint32_t context,
                   const double *expert_stats, const ds_unit_bytes *unit_bytes, const char *pins,
                   uint64_t version, ds_error *err);
/* Index of accelerator `name` in p's device table (added when new); 0 for a CPU device or an
 * empty name (the node's CPU engine runs those units). */
uint8_t dsd_plan_dev_index(dsd_plan *p, const char *name);
/* A thread that ran dsd_plan_solve calls this before it exits (frees the solver's per-thread
 * state). */
void dsd_solve_thread_done(void);
/* Plan JSON document: {"version":..,"units":{"attn[0]":"node",..},"nodes":{..}}. */
char *dsd_plan_json(const dsd_plan *p);
/* The plan index of node `name`, or -1 when the plan does not list it (a node that joined
 * after the plan was made). */
int32_t dsd_plan_node_index(const dsd_plan *p, const char *name);
/* Writes a plan's JSON to state_dir/plan.json (what `dsctl placement` and operators read);
 * a failure is logged and returned. */
int dsd_plan_write_file(const char *state_dir, const char *json);
/* The units node `idx` hosts. */
int dsd_plan_units_of(const dsd_plan *p, uint32_t idx, dsd_units *u);
/* Fills a wire Plan (units + data endpoints); the strings point into p. Free with
 * dsd_plan_wire_clear. */
int dsd_plan_to_wire(const dsd_plan *p, Dsd__Plan *w);
void dsd_plan_wire_clear(Dsd__Plan *w);
/* The whole plan from a received wire plan (every unit placed once, on a listed node). */
int dsd_plan_from_wire(const Dsd__Plan *w, const ds_model_config *c, dsd_plan *p, ds_error *err);
/* Units of node `self` from a received wire plan; validates every unit name and index. */
int dsd_plan_units_from_wire(const Dsd__Plan *w, const char *self, const ds_model_config *c,
                             dsd_units *u, ds_error *err);

/* ---- data thread (dsd_data.c) ------------------------------------------------------------ */
typedef struct dsd_data dsd_data;

/* Starts the node's data thread. It owns `router` (the bound data ROUTER) and, on the
 * coordinator, `spipe` (a PAIR connected to the loop's client pipe) from now on. */
int dsd_data_start(void *zctx, void *router, void *spipe, const dsd_opts *o, bool coordinator,
                   dsd_data **ret, ds_error *err);
/* Stops the thread (active jobs end "cancelled"), closes its sockets, frees everything. */
void dsd_data_stop(dsd_data *d);
/* Installs plan (copied) with this node's units `host` (ownership passes, also on error);
 * self = this node's index in plan. The old units, micro-batches and (coordinator) jobs go.
 * plan NULL: uninstall. Returns once the thread has it. */
int dsd_data_install(dsd_data *d, const dsd_plan *plan, uint32_t self, dsd_host *host,
                     ds_error *err);
/* The reloadable options changed (SIGHUP): step_timeout_ms now, max_jobs from the next plan. */
void dsd_data_set_opts(dsd_data *d, const dsd_opts *o);
/* Ends the coordinator's jobs with an error saying why (no plan can run them); the plan stays
 * installed. Does not wait. */
void dsd_data_fail_jobs(dsd_data *d, const char *why);
/* Starts measuring the link to a node (latency, bandwidth) without waiting. */
void dsd_data_probe(dsd_data *d, const char *name, const char *endpoint);
/* Snapshots (JSON, caller frees): "stats" this node's units, links and routing counts;
 * "jobs" the coordinator's jobs. NULL before the first snapshot. */
char *dsd_data_json(dsd_data *d, const char *what);
/* The coordinator's running jobs, as of the last snapshot (0 on a worker). */
uint32_t dsd_data_jobs_running(dsd_data *d);
/* The coordinator's scheduler (dsd_sched.h) runs inside the data thread, which owns it and
 * is its port: it feeds it the client pipe, the results and the ticks. */

/* ---- statistics (dsd_stats.c) ------------------------------------------------------------- */
/* A node's StepStats as {"node", "units", "links", "expert_counts"} (dsd_data's "stats" form)
 * for a model of L layers, E routed experts; entries that do not check out are left out.
 * NULL for an oversized message. */
json_t *dsd_stats_from_wire(const Dsd__StepStats *st, const char *node, uint32_t L, uint32_t E);

/* ---- weight streaming (dsd_stream.c) ------------------------------------------------------ */
typedef struct dsd_stream_out dsd_stream_out;
typedef struct dsd_stream_in dsd_stream_in;

/* Coordinator: the checkpoint of exactly units u (config.json + model.safetensors; for a GGUF
 * model one model.gguf of its metadata and those units' tensors in their types) from its copy
 * at model_dir, to stream to a node without a copy. */
int dsd_stream_out_new(const char *model_dir, const dsd_units *u, uint64_t plan_version,
                       dsd_stream_out **ret, ds_error *err);
void dsd_stream_out_free(dsd_stream_out *s);
/* Sends WeightChunks to `peer` (control ROUTER identity) while the window allows. */
int dsd_stream_out_pump(dsd_stream_out *s, void *sock, const char *peer);
/* The node has written bytes_loaded bytes (its LoadProgress). */
void dsd_stream_out_ack(dsd_stream_out *s, uint64_t bytes_loaded);
bool dsd_stream_out_done(const dsd_stream_out *s);
uint64_t dsd_stream_out_total(const dsd_stream_out *s);

/* Node: receives the streamed checkpoint of plan plan_version into dir. */
int dsd_stream_in_new(const char *dir, uint64_t plan_version, dsd_stream_in **ret, ds_error *err);
void dsd_stream_in_free(dsd_stream_in *s);
/* Writes one chunk (checked: known file, this plan, in order, within the size limits);
 * -ESTALE for a chunk of another plan version (to drop, not an error of this stream). */
int dsd_stream_in_chunk(dsd_stream_in *s, const Dsd__WeightChunk *c, const void *data, size_t len,
                        ds_error *err);
bool dsd_stream_in_complete(const dsd_stream_in *s);
uint64_t dsd_stream_in_bytes(const dsd_stream_in *s);
const char *dsd_stream_in_dir(const dsd_stream_in *s);
/* Once complete: the model path to open (the directory of an HF checkpoint, or its model.gguf). */
const char *dsd_stream_in_model(const dsd_stream_in *s);
/* Bytes that cross the link (a GGUF's holes are not sent). */
uint64_t dsd_stream_out_wire_bytes(const dsd_stream_out *s);

/* ---- CURVE (dsd_curve.c) ------------------------------------------------------------------ */
/* ZAP domains: who may connect to a CURVE server socket. */
#define DSD_CURVE_DOMAIN_CLUSTER "cluster" /* control and data ROUTERs: the cluster key only */
#define DSD_CURVE_DOMAIN_CLIENT  "client"  /* client ROUTER: curve_authorized_keys, or any key */

/* Loads the cluster key pair (and the authorized client keys) named by the options and starts
 * the ZAP handler in zctx. Call before any socket of zctx is bound or connected. Returns 0
 * without doing anything when curve_secret_key_file is empty (CURVE off); an unreadable,
 * group/world-readable or malformed key file is an error naming the option and the file. */
int dsd_curve_start(void *zctx, const dsd_opts *o, ds_error *err);
/* Joins the ZAP thread and forgets the keys; call after zmq_ctx_term (which ends the thread). */
void dsd_curve_stop(void);
bool dsd_curve_enabled(void);
/* Roles of a client connection (the ZAP User-Id of its messages, dsd_msg.user_id). */
#define DSD_ROLE_OPERATOR "operator"
#define DSD_ROLE_CLIENT   "client"
/* Whether a client whose messages carry user_id may drain, undrain and replan: an operator
 * key (curve_operator_keys, or the cluster key), or anyone when no operator keys are set or
 * CURVE is off. */
bool dsd_curve_may_operate(const char *user_id);
/* Connections refused by the ZAP handler since the start. */
uint64_t dsd_curve_refused(void);
/* Makes sock a CURVE server with the cluster secret in ZAP domain `domain` (call before
 * zmq_bind); 0 without doing anything when CURVE is off, else a negative errno. */
int dsd_curve_server(void *sock, const char *domain);
/* Makes sock a CURVE client of another node: the cluster key pair, the cluster public key as
 * server key (call before zmq_connect); 0 without doing anything when CURVE is off. */
int dsd_curve_client(void *sock);

/* ---- limits on peers (dsd_guard.c) --------------------------------------------------------- */
#define DSD_NODE_NAME_MAX          64    /* bytes of a node name, NUL included */
#define DSD_GUARD_MAX_DEVICES      64    /* devices one node may report */
#define DSD_GUARD_MAX_MEMORY_BYTES 1e15  /* 1 PB: more memory than any one device has */
#define DSD_GUARD_MAX_MEM_BW       1e14  /* 100 TB/s */
#define DSD_GUARD_MAX_FLOPS        1e18  /* 1 EFLOP/s */
#define DSD_GUARD_MAX_NEW_SEQS     4096u /* new sequences one step may open (= max_jobs' bound) */
#define DSD_GUARD_CONTROL_BYTES    ((int64_t)DS_WIRE_MAX_ENVELOPE_BYTES + (1 << 20))
/* the client socket: a request up to 4 x max_request_bytes is read and answered TOO_LARGE, a
 * frame beyond drops the connection */
#define DSD_GUARD_CLIENT_BYTES(max_request) ((int64_t)(max_request)*4 + (64 << 10))

/* Sets sock's ZMQ_MAXMSGSIZE (bytes per frame; call before bind/connect: a connection whose
 * frame announces more is dropped before anything is buffered). 0 or a negative errno. */
int dsd_guard_sock_limit(void *sock, int64_t max_bytes);
/* Fills token (DSD_TOKEN_LEN) with 128 random bits in hex: a plan's member token. */
int dsd_guard_new_token(char *token);
/* Whether a data-plane message carries the installed plan's token (a plan without one, from
 * an older coordinator, admits every message). */
bool dsd_guard_member(const dsd_plan *p, const Dsd__Envelope *env);
/* Whether name is 1..63 bytes of [A-Za-z0-9._-]. */
bool dsd_guard_node_name_ok(const char *name);
/* Checks a Hello before it touches membership or the plan: the node name, the data endpoint,
 * and every device's profile (finite, non-negative, below physical bounds). -EINVAL with err
 * naming the node, device and field. */
int dsd_guard_hello(const Dsd__Hello *h, ds_error *err);
/* Rows of one micro-batch whose largest frame (an expert host's combine reply) fits
 * max_frame_bytes (>= 1, <= DSD_MAX_ROWS). */
uint32_t dsd_guard_rows_per_frame(const ds_model_config *c, int64_t max_frame_bytes);
/* The sequences a step's rows would open in seqs (rows of one sequence consecutive): their
 * count, or -ENOSPC (err says why) when more than max_new; nothing is created. */
int dsd_guard_step_seqs(ds_seqs *seqs, uint32_t n, const uint64_t *seq_ids, uint32_t max_new,
                        ds_error *err);
/* After a step failed: removes the sequences it opened (those starting at position 0). */
void dsd_guard_step_rollback(ds_seqs *seqs, uint32_t n, const uint64_t *seq_ids,
                             const uint32_t *positions);

/* ---- checkpoint digest, state directory (dsd_digest.c) ------------------------------------- */
#define DSD_DIGEST_LEN 48 /* "fnv2x64:" + 32 hex digits + NUL, rounded up */
/* The digest of the checkpoint at model (a directory, or one file) into out: its files' names,
 * sizes, headers (the safetensors tensor tables) and sampled blocks; -ENOENT when it does not
 * exist, -EBADMSG when a safetensors file is truncated or corrupt (err names the file and the
 * sizes). */
int dsd_digest_model(const char *model, char *out, size_t out_len, ds_error *err);
/* Whether dir can store files (a file created, written and removed). */
int dsd_state_dir_check(const char *dir, ds_error *err);
/* Takes dir/dsd.lock (flock, held while *fd_out stays open; the pid written in it): -EBUSY
 * with err naming the other daemon's pid when one holds it. */
int dsd_state_dir_lock(const char *dir, int *fd_out, ds_error *err);
/* What this node can offer, checked once at start: the digest of its checkpoint copy ("" with
 * no copy), or in problem why it cannot host units (a copy that is truncated or unreadable; no
 * copy and a state_dir that cannot store streamed weights); "" when it can. */
void dsd_node_check(const dsd_opts *o, char *digest, size_t digest_len, char *problem,
                    size_t problem_len);

/* ---- notify (dsd_notify.c) ---------------------------------------------------------------- */
void dsd_notify(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
