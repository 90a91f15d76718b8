/* ds_placement.h — where every unit of a DeepSeek-V2/V3 model runs on a mixed cluster.
 *
 * Pure computation on descriptions: a cluster spec (docs/cluster-spec.md), a model config
 * (model/ds_config.h) and a workload go in; a plan (unit -> device, with replicas of hot
 * experts) and its predicted cost come out. No sockets, no clocks, deterministic.
 * Formulas: docs/placement.md. Plan JSON: docs/plan-format.md. */
#ifndef DS_PLACEMENT_H
#define DS_PLACEMENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ds_config.h"
#include "ds_err.h"
#include "ds_unit.h"

/* Limits on a parsed cluster spec: a spec from a file or a peer cannot make us allocate
 * unbounded memory or loop for ever. */
#define DS_PL_MAX_NODES      256
#define DS_PL_MAX_DEVICES    1024 /* over all nodes */
#define DS_PL_MAX_NAME       64   /* node and device names, bytes incl. NUL */
#define DS_PL_MAX_SPEC_BYTES (16u << 20)

/* ---- cluster spec ---------------------------------------------------------------------- */

typedef struct ds_pl_device {
    char node[DS_PL_MAX_NAME]; /* owning node's name */
    char name[DS_PL_MAX_NAME]; /* unique within the node */
    char kind[8];              /* "cpu" | "gpu" | "accel" */
    int node_index;            /* index into the spec's nodes */
    uint64_t memory_bytes;     /* capacity placement may use, bytes */
    double mem_bw;             /* weight-streaming bandwidth, bytes/s (> 0 after parse) */
    double flops;              /* matmul FLOP/s (> 0 after parse) */
    double host_link_bw;       /* host <-> device copies, bytes/s; 0 = same memory as host */
    double launch_s;           /* fixed seconds per op */
    int shares_with;           /* index of the device it shares silicon with, -1 when none */
} ds_pl_device;

typedef struct ds_cluster ds_cluster;

/* Parses and validates a cluster spec (JSON text). -EBADMSG malformed JSON / bad field type,
 * -ERANGE value out of limits, -EINVAL inconsistent (duplicate or unknown names); err names
 * the node, device or link and the field. */
int ds_cluster_parse(const char *json_text, size_t len, ds_cluster **out, ds_error *err);
int ds_cluster_load(const char *path, ds_cluster **out, ds_error *err);
ds_cluster *ds_cluster_free(ds_cluster *c);

int ds_cluster_n_devices(const ds_cluster *c);
int ds_cluster_n_nodes(const ds_cluster *c);
const ds_pl_device *ds_cluster_device(const ds_cluster *c, int i);
const char *ds_cluster_node_name(const ds_cluster *c, int node);
/* Link between two nodes (symmetric; default_link when not listed; a == b gives 0, inf). */
void ds_cluster_link(const ds_cluster *c, int node_a, int node_b, double *latency_s,
                     double *bandwidth_bytes_per_s);

/* ---- unit inventory --------------------------------------------------------------------- */

/* enum ds_unit_kind and unit names: common/ds_unit.h (shared with model and daemon) */

/* Per-unit figures, for one token (one row) unless said otherwise. */
typedef struct ds_unit_cost {
    uint64_t weight_bytes;        /* bytes of weights (incl. FP8 scales) */
    double flops_per_token;       /* FLOPs for one row, excluding attention over the context */
    double attn_flops_per_ctx;    /* attn[l]: extra FLOPs per row per token of context */
    uint64_t kv_bytes_per_token;  /* attn[l]: MLA latent + rope key, bytes per cached token */
    uint64_t act_bytes_per_token; /* bytes one row carries across a link (hidden state) */
} ds_unit_cost;

typedef struct ds_inventory {
    uint32_t n_layers;  /* num_hidden_layers (MTP layers are not placed) */
    uint32_t n_experts; /* routed experts per MoE layer */
    uint32_t top_k;     /* num_experts_per_tok */
    uint32_t n_group, topk_group;
    ds_unit_cost embed, head;
    ds_unit_cost attn;        /* every layer's attention is the same (incl. router on MoE layers) */
    ds_unit_cost attn_router; /* bytes / flops the router gate adds to attn[l] of a MoE layer */
    ds_unit_cost dense;       /* dense FFN of one layer below first_k_dense_replace */
    ds_unit_cost shared;      /* shared experts of one MoE layer (weight_bytes 0 when none) */
    ds_unit_cost expert;      /* one routed expert */
    bool *is_moe;             /* [n_layers] */
    /* Weight bytes of every unit, layer by layer: what the memory model and the streaming
     * cost use. From the figures above (every layer alike) unless the model file's real
     * tensor types were given (ds_inventory_set_bytes; a GGUF differs layer by layer). */
    ds_unit_bytes bytes;
    bool bytes_from_file; /* bytes came from the file's tensor table */
} ds_inventory;

/* Builds the inventory from a config; weights in cfg->dtype (FP8: 1 byte + one f32 scale per
 * block; embeddings, norms and the router stay BF16 as in the checkpoints). */
int ds_inventory_build(const ds_model_config *cfg, ds_inventory *inv, ds_error *err);
/* Replaces the per-layer bytes (and embed/head weight_bytes) with b, the model file's real
 * figures (ds_model_unit_bytes); -EINVAL when b has another layer count. */
int ds_inventory_set_bytes(ds_inventory *inv, const ds_unit_bytes *b, ds_error *err);
void ds_inventory_release(ds_inventory *inv);
/* Total weight bytes of the model as placed (each unit once). */
uint64_t ds_inventory_total_bytes(const ds_inventory *inv);

/* ---- solving ------------------------------------------------------------------------------ */

enum ds_objective { DS_OBJ_LATENCY, DS_OBJ_THROUGHPUT };

enum ds_strategy {
    DS_STRAT_AUTO,             /* the solver (exact MILP when small, heuristic otherwise) */
    DS_STRAT_MEM_PROPORTIONAL, /* contiguous layers split by memory, experts with their layer */
    DS_STRAT_EXPERTS_ON_CPU,   /* attention/dense/shared on the fastest GPU, experts on CPU */
    DS_STRAT_BALANCED_EXPERTS, /* experts spread evenly by count, blind to speed */
    DS_STRAT_HEURISTIC,        /* the solver's heuristic only (for benchmarks) */
    DS_STRAT_EXACT,            /* the exact MILP only (fails when too large) */
};

const char *ds_strategy_name(enum ds_strategy s);
int ds_strategy_parse(const char *name, enum ds_strategy *out);

typedef struct ds_pin {
    char unit[48];                   /* unit name ("attn[3]", "expert[5][17]", "embed", ...) */
    char device[2 * DS_PL_MAX_NAME]; /* "node/device" */
} ds_pin;

typedef struct ds_plan_options {
    uint32_t batch;   /* sequences decoded together (rows per step), >= 1 */
    uint32_t context; /* tokens of context per sequence (KV cache size), >= 1 */
    enum ds_objective objective;
    enum ds_strategy strategy;
    uint32_t micro_batches;     /* throughput: micro-batches in flight (0 = 4) */
    double reserve_fraction;    /* memory kept free on every device (0 = 0.05) */
    const double *expert_stats; /* [n_layers][n_experts] popularity, or NULL (uniform) */
    const ds_pin *pins;
    size_t n_pins;
    const char *const *exclude; /* "node/device" or "node" names, n_exclude of them */
    size_t n_exclude;
    bool no_replicas;          /* do not replicate hot experts (benchmarks comparing to MILP) */
    uint32_t exact_max_vars;   /* MILP used when experts x devices <= this (0 = 1024) */
    double exact_time_limit_s; /* GLPK time limit per distinct MoE layer problem (0 = 1 s) */
    const ds_unit_bytes *unit_bytes; /* the model file's real per-unit bytes (its tensor types,
                                      * or --quantize), or NULL: from the config's dtype */
} ds_plan_options;

typedef struct ds_plan ds_plan;

/* GLPK keeps per-thread state that the exact solver creates: a thread that ran ds_plan_solve
 * and is about to exit calls this to free it (no-op when there is none). */
void ds_placement_thread_done(void);
/* Plans. -ENOSPC when the model does not fit (err says which memory is short and by how
 * much), -EINVAL bad options / pins / exclusions, -ENOENT no usable device. */
int ds_plan_solve(const ds_cluster *cl, const ds_model_config *cfg, const ds_plan_options *opt,
                  ds_plan **out, ds_error *err);
ds_plan *ds_plan_free(ds_plan *p);

typedef struct ds_plan_summary {
    double decode_step_s;       /* latency of one decode step of `batch` rows */
    double decode_tokens_per_s; /* by objective: batch / step, or pipelined bottleneck */
    double prefill_s_per_1k_tokens;
    double bottleneck_busy_s;                /* the busiest device or link per step */
    char bottleneck[2 * DS_PL_MAX_NAME + 8]; /* its name ("node/device" or "a<->b") */
    const char *solver;                      /* "exact-milp", "heuristic", or the baseline's name */
    const char *strategy;                    /* strategy requested */
    uint32_t replicas;                       /* extra expert copies placed */
} ds_plan_summary;

void ds_plan_get_summary(const ds_plan *p, ds_plan_summary *s);

/* Device index (into the cluster) of a unit: kind, layer (ignored for embed/head), expert
 * (DS_UNIT_EXPERT only), replica r (0 = primary). -ENOENT when absent. */
int ds_plan_unit_device(const ds_plan *p, enum ds_unit_kind kind, uint32_t layer, uint32_t expert,
                        uint32_t replica);
/* Replica count (>= 1) of expert e of layer l; 0 when l is not a MoE layer. */
uint32_t ds_plan_expert_copies(const ds_plan *p, uint32_t layer, uint32_t expert);
/* Per-device bytes used and busy seconds per decode step. */
void ds_plan_device_load(const ds_plan *p, int device, uint64_t *bytes_used, double *busy_s);

/* The plan as JSON (docs/plan-format.md); caller frees with free(). inputs_digest is a
 * digest of the spec, config and options. */
char *ds_plan_to_json(const ds_plan *p);
/* Human-readable report; explain adds the bottleneck and the runner-up. */
void ds_plan_print(const ds_plan *p, void *file, bool explain);

/* The objective value (seconds per step for latency, per pipelined batch for throughput) of
 * one strategy on the same inputs (benchmarks); negative on failure with err set. */
double ds_plan_eval_strategy(const ds_cluster *cl, const ds_model_config *cfg,
                             const ds_plan_options *opt, enum ds_strategy s, ds_error *err);

#endif
