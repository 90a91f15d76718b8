/* bench_placement — predicted decode tokens/s of the solver against every baseline over the
 * committed cluster suite (bench/clusters/ (*.json)) and models, the heuristic's gap to the exact
 * MILP over random small clusters, and the plan time of DeepSeek-V3 on 64 devices.
 * usage: bench_placement [SOURCE_ROOT] [N_RANDOM] */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ds_config.h"
#include "ds_placement.h"

static const char *clusters[] = {"cpu-server-2gpu", "gpu-plus-edge-slow", "memory-starved-v3",
                                 "memory-starved-small", "homogeneous-8x2gpu", "mixed-64dev"};
static const enum ds_strategy strats[] = {DS_STRAT_AUTO, DS_STRAT_MEM_PROPORTIONAL,
                                          DS_STRAT_EXPERTS_ON_CPU, DS_STRAT_BALANCED_EXPERTS};

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* deterministic LCG so every run benches the same random clusters */
static uint64_t rng = 88172645463325252ull;
static double urand(void)
{
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(rng >> 11) / 9007199254740992.0;
}

static int suite(const char *root)
{
    const char *models[3][2] = {{"V3-671B", "tests/data/configs/deepseek-v3/config.json"},
                                {"V2-Lite", "tests/data/configs/deepseek-v2-lite/config.json"},
                                {"tiny", "models/tiny/config.json"}};
    int losses = 0;
    printf("predicted decode tokens/s (batch 1, context 4096, latency objective)\n");
    printf("%-22s %-8s %10s %-24s %10s %10s %10s %8s\n", "cluster", "model", "solver", "(ran)",
           "mem-prop", "cpu-moe", "balanced", "ratio");
    for (size_t c = 0; c < sizeof clusters / sizeof *clusters; c++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/bench/clusters/%s.json", root, clusters[c]);
        ds_cluster *cl;
        ds_error err = {0};
        if (ds_cluster_load(path, &cl, &err)) {
            fprintf(stderr, "%s\n", ds_error_str(&err));
            return 1;
        }
        for (int m = 0; m < 3; m++) {
            ds_model_config cfg;
            snprintf(path, sizeof path, "%s/%s", root, models[m][1]);
            if (ds_model_config_load(path, &cfg, &err))
                continue; /* the tiny model is optional */
            double tps[4];
            char ran[64] = "";
            for (int s = 0; s < 4; s++) {
                ds_plan_options o = {.batch = 1, .context = 4096, .strategy = strats[s]};
                ds_plan *p;
                tps[s] = NAN;
                if (ds_plan_solve(cl, &cfg, &o, &p, &err) == 0) {
                    ds_plan_summary sm;
                    ds_plan_get_summary(p, &sm);
                    tps[s] = sm.decode_tokens_per_s;
                    if (s == 0)
                        snprintf(ran, sizeof ran, "%s", sm.solver);
                    ds_plan_free(p);
                }
            }
            double best = 0;
            for (int s = 1; s < 4; s++)
                if (!isnan(tps[s]) && tps[s] > best)
                    best = tps[s];
            if (isnan(tps[0])) {
                printf("%-22s %-8s %10s %-24s (does not fit)\n", clusters[c], models[m][0], "-",
                       "");
                continue;
            }
            char r[32];
            if (best > 0)
                snprintf(r, sizeof r, "%.2fx", tps[0] / best);
            else
                snprintf(r, sizeof r, "only");
            if (best > 0 && tps[0] < best * (1 - 1e-9))
                losses++;
            printf("%-22s %-8s %10.2f %-24s %10.2f %10.2f %10.2f %8s\n", clusters[c],
                   models[m][0], tps[0], ran, tps[1], tps[2], tps[3], r);
        }
        ds_cluster_free(cl);
    }
    printf("(nan = that baseline does not fit the memory; ratio = solver / best baseline)\n");
    printf("solver lost to a baseline: %d times\n\n", losses);
    return losses;
}

static void plan_time(const char *root)
{
    char path[4096];
    ds_cluster *cl;
    ds_model_config cfg;
    ds_error err = {0};
    snprintf(path, sizeof path, "%s/bench/clusters/mixed-64dev.json", root);
    if (ds_cluster_load(path, &cl, &err))
        return;
    snprintf(path, sizeof path, "%s/tests/data/configs/deepseek-v3/config.json", root);
    if (ds_model_config_load(path, &cfg, &err)) {
        ds_cluster_free(cl);
        return;
    }
    ds_plan_options o = {.batch = 1, .context = 4096};
    double t0 = now();
    ds_plan *p;
    int rc = ds_plan_solve(cl, &cfg, &o, &p, &err);
    double t1 = now();
    /* with observed (skewed) expert statistics every layer is a different problem */
    size_t L = cfg.num_hidden_layers, E = cfg.n_routed_experts;
    double *st = malloc(L * E * sizeof *st);
    for (size_t i = 0; i < L * E && st; i++)
        st[i] = 1.0 / (1.0 + (double)(((i / E) * 7919u + (i % E) * 2654435761u) % E));
    o.expert_stats = st;
    ds_plan *p2 = NULL;
    double t2 = now();
    int rc2 = ds_plan_solve(cl, &cfg, &o, &p2, &err);
    double t3 = now();
    printf("plan time, DeepSeek-V3 671B on %d devices: %.3f s uniform (rc %d), %.3f s with "
           "skewed expert stats (rc %d)\n\n", ds_cluster_n_devices(cl), t1 - t0, rc, t3 - t2,
           rc2);
    free(st);
    ds_plan_free(p);
    ds_plan_free(p2);
    ds_cluster_free(cl);
}

/* Heuristic vs exact MILP on random small clusters and a small MoE. */
static void gap(int n)
{
    ds_model_config c;
    memset(&c, 0, sizeof c);
    c.arch = DS_ARCH_DEEPSEEK_V3;
    c.vocab_size = 4096;
    c.hidden_size = 512;
    c.intermediate_size = 1024;
    c.moe_intermediate_size = 256;
    c.num_hidden_layers = 3;
    c.num_attention_heads = 4;
    c.kv_lora_rank = 64;
    c.qk_nope_head_dim = 32;
    c.qk_rope_head_dim = 16;
    c.v_head_dim = 32;
    c.n_routed_experts = 16;
    c.num_experts_per_tok = 4;
    c.n_group = 1;
    c.topk_group = 1;
    c.first_k_dense_replace = 1;
    c.moe_layer_freq = 1;
    c.dtype = DS_DTYPE_BF16;
    double worst = 0, sum = 0;
    int done = 0;
    for (int i = 0; i < n; i++) {
        char spec[8192];
        size_t o = 0;
        int nodes = 1 + (int)(urand() * 3);
        o += (size_t)snprintf(spec + o, sizeof spec - o, "{\"nodes\":[");
        for (int k = 0; k < nodes; k++) {
            int nd = 1 + (int)(urand() * 2);
            o += (size_t)snprintf(spec + o, sizeof spec - o, "%s{\"name\":\"n%d\",\"devices\":[",
                                  k ? "," : "", k);
            for (int d = 0; d < nd; d++)
                o += (size_t)snprintf(
                    spec + o, sizeof spec - o,
                    "%s{\"name\":\"d%d\",\"kind\":\"%s\",\"memory_bytes\":%.0f,"
                    "\"mem_bw_bytes_per_s\":%g,\"flops\":%g,\"launch_s\":%g}",
                    d ? "," : "", d, d ? "gpu" : "cpu", 2e7 + urand() * 3e7,
                    1e9 * (1 + 20 * urand()), 1e11 * (1 + 50 * urand()), 1e-5 * urand());
            o += (size_t)snprintf(spec + o, sizeof spec - o, "]}");
        }
        o += (size_t)snprintf(spec + o, sizeof spec - o,
                              "],\"default_link\":{\"latency_s\":%g,"
                              "\"bandwidth_bytes_per_s\":%g}}",
                              1e-5 + 1e-4 * urand(), 1e8 * (1 + 100 * urand()));
        ds_cluster *cl;
        ds_error err = {0};
        if (ds_cluster_parse(spec, o, &cl, &err))
            continue;
        ds_plan_options po = {.batch = 1 + (uint32_t)(urand() * 32), .context = 512,
                              .no_replicas = true, .exact_time_limit_s = 1};
        double h = ds_plan_eval_strategy(cl, &c, &po, DS_STRAT_HEURISTIC, &err);
        double x = ds_plan_eval_strategy(cl, &c, &po, DS_STRAT_EXACT, &err);
        ds_cluster_free(cl);
        if (h <= 0 || x <= 0)
            continue;
        double g = (h - x) / x;
        worst = fmax(worst, g);
        sum += g;
        done++;
    }
    printf("heuristic vs exact MILP over %d random small clusters (16 experts, 2-6 devices): "
           "worst gap %.3f%%, mean gap %.3f%% (negative = heuristic better than the "
           "per-layer MILP)\n", done, worst * 100, done ? sum / done * 100 : 0);
}

int main(int argc, char **argv)
{
    const char *root = argc > 1 ? argv[1] : ".";
    int n = argc > 2 ? atoi(argv[2]) : 10;
    int losses = suite(root);
    plan_time(root);
    gap(n);
    return losses ? 1 : 0;
}
