/* router.c — MoE expert selection per DeepSeek's reference code, and token sampling. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ds_model.h"

#define ROUTER_MAX_EXPERTS 65536

/* Index of the largest v[i] among i with !taken[i] (lowest index on ties), or -1. */
static int argmax_free(const float *v, const unsigned char *taken, uint32_t n)
{
    int best = -1;
    for (uint32_t i = 0; i < n; i++) {
        if (taken[i] || isnan(v[i]))
            continue;
        if (best < 0 || v[i] > v[best])
            best = (int)i;
    }
    return best;
}

void ds_router_select(const ds_model_config *c, const float *logits, const float *bias,
                      int32_t *ids, float *weights)
{
    uint32_t E = c->n_routed_experts, k = c->num_experts_per_tok;
    float *score = malloc(E * sizeof(float) * 2 + E + c->n_group * (sizeof(float) + 1) + 8);
    if (!score) {
        for (uint32_t s = 0; s < k; s++) {
            ids[s] = (int32_t)s;
            weights[s] = 0;
        }
        return;
    }
    float *choice = score + E;
    unsigned char *taken = (unsigned char *)(choice + E);
    float *gscore = (float *)(((uintptr_t)(taken + E) + 3) & ~(uintptr_t)3);
    unsigned char *gtaken = (unsigned char *)(gscore + c->n_group);
    if (c->scoring_func == DS_SCORING_SIGMOID) {
        for (uint32_t e = 0; e < E; e++)
            score[e] = 1.0f / (1.0f + ds_expf(-logits[e]));
    } else {
        float mx = -INFINITY, sum = 0;
        for (uint32_t e = 0; e < E; e++)
            mx = logits[e] > mx ? logits[e] : mx;
        for (uint32_t e = 0; e < E; e++) {
            score[e] = ds_expf(logits[e] - mx);
            sum += score[e];
        }
        for (uint32_t e = 0; e < E; e++)
            score[e] /= sum;
    }
    for (uint32_t e = 0; e < E; e++)
        choice[e] = bias ? score[e] + bias[e] : score[e];
    uint32_t G = c->n_group, per = E / G;
    if (G > 1 && c->topk_method != DS_TOPK_GREEDY) {
        for (uint32_t g = 0; g < G; g++) {
            const float *v = choice + g * per;
            if (c->topk_method == DS_TOPK_NOAUX_TC) {
                /* sum of the two largest biased scores of the group */
                float a = -INFINITY, b = -INFINITY;
                for (uint32_t j = 0; j < per; j++) {
                    if (v[j] > a) {
                        b = a;
                        a = v[j];
                    } else if (v[j] > b) {
                        b = v[j];
                    }
                }
                gscore[g] = a + b;
            } else {
                float a = -INFINITY;
                for (uint32_t j = 0; j < per; j++)
                    a = v[j] > a ? v[j] : a;
                gscore[g] = a;
            }
        }
        memset(gtaken, 0, G);
        for (uint32_t t = 0; t < c->topk_group; t++) {
            int g = argmax_free(gscore, gtaken, G);
            if (g >= 0)
                gtaken[g] = 1;
        }
        /* The reference masks unselected groups with -inf. */
        for (uint32_t g = 0; g < G; g++)
            if (!gtaken[g])
                for (uint32_t j = 0; j < per; j++)
                    choice[g * per + j] = -INFINITY;
    }
    memset(taken, 0, E);
    float sum = 0;
    for (uint32_t s = 0; s < k; s++) {
        int e = argmax_free(choice, taken, E);
        if (e < 0) /* all NaN: pick the lowest free index, deterministically */
            for (e = 0; taken[e]; e++)
                ;
        taken[e] = 1;
        ids[s] = e;
        weights[s] = score[e];
        sum += score[e];
    }
    if (c->norm_topk_prob && k > 1) {
        float den = sum + 1e-20f;
        for (uint32_t s = 0; s < k; s++)
            weights[s] /= den;
    }
    for (uint32_t s = 0; s < k; s++)
        weights[s] *= (float)c->routed_scaling_factor;
    free(score);
}

/* ---- sampling ---- */

void ds_sampler_seed(ds_sampler *s, uint64_t seed)
{
    s->state = seed ? seed : 0x9E3779B97F4A7C15ull;
}

static double rng_uniform(ds_sampler *s)
{
    uint64_t x = s->state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    s->state = x;
    return (double)((x * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0;
}

typedef struct cand {
    float p;
    int32_t id;
} cand;

static int cand_cmp(const void *a, const void *b)
{
    const cand *x = a, *y = b;
    if (x->p != y->p)
        return x->p > y->p ? -1 : 1;
    return x->id < y->id ? -1 : 1;
}

int32_t ds_sampler_pick(ds_sampler *s, const float *logits, uint32_t vocab)
{
    int32_t best = 0;
    for (uint32_t i = 1; i < vocab; i++)
        if (logits[i] > logits[best])
            best = (int32_t)i;
    if (s->greedy || s->temperature <= 0)
        return best;
    cand *c = malloc(vocab * sizeof(*c));
    if (!c)
        return best;
    double mx = logits[best], sum = 0;
    for (uint32_t i = 0; i < vocab; i++) {
        c[i].id = (int32_t)i;
        c[i].p = (float)exp((logits[i] - mx) / s->temperature);
    }
    qsort(c, vocab, sizeof(*c), cand_cmp);
    uint32_t n = vocab;
    if (s->top_k && s->top_k < n)
        n = s->top_k;
    for (uint32_t i = 0; i < n; i++)
        sum += c[i].p;
    if (s->top_p > 0 && s->top_p < 1) {
        double acc = 0;
        for (uint32_t i = 0; i < n; i++) {
            acc += c[i].p;
            if (acc >= s->top_p * sum) {
                n = i + 1;
                sum = acc;
                break;
            }
        }
    }
    double r = rng_uniform(s) * sum, acc = 0;
    int32_t pick = c[n - 1].id;
    for (uint32_t i = 0; i < n; i++) {
        acc += c[i].p;
        if (r < acc) {
            pick = c[i].id;
            break;
        }
    }
    free(c);
    return pick;
}
