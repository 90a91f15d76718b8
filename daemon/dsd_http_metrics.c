/* dsd_http_metrics.c — what the HTTP server says about the cluster: /health (200 serving, 503
 * with the reason), /v1/models, /metrics (Prometheus text format: the server's own counters and
 * histograms, then the coordinator's status, jobs, placement and expert_stats documents as
 * gauges and counters, names prefixed dsd_) and /api/status (the status page's data). */
#include <stdlib.h>
#include <string.h>

#include "dsd_http_impl.h"

/* ---- /health, /v1/models, /metrics, the status page --------------------------------------- */

enum MHD_Result http_handle_health(struct dsd_http *h, struct MHD_Connection *c)
{
    char why[160];
    json_t *st = http_status_doc(h, "status", why, sizeof(why));
    if (!st)
        return http_reply_json(c, 503,
                               json_pack("{s:s,s:s}", "status", "unavailable", "reason", why));
    const char *state = json_string_value(json_object_get(st, "state"));
    state = state ? state : "unknown";
    bool ok = !strcmp(state, "serving") || !strcmp(state, "degraded");
    json_t *o = json_pack("{s:s,s:s,s:O}", "status", ok ? "ok" : "unavailable", "state", state,
                          "plan_version", json_object_get(st, "plan_version"));
    if (!ok) {
        json_t *pe = json_object_get(st, "plan_error");
        char reason[600];
        snprintf(reason, sizeof(reason), "%s%s%s",
                 !strcmp(state, "joining")    ? "waiting for workers to join"
                 : !strcmp(state, "planning") ? "making a plan"
                 : !strcmp(state, "loading")  ? "loading weights"
                 : !strcmp(state, "no-plan")  ? "no plan"
                                              : state,
                 pe ? ": " : "", pe ? json_string_value(pe) : "");
        json_object_set_new(o, "reason", json_string(reason));
    }
    json_t *prog = json_object_get(st, "progress");
    if (prog)
        json_object_set(o, "progress", prog);
    json_decref(st);
    return http_reply_json(c, ok ? 200 : 503, o);
}

json_t *http_model_obj(struct dsd_http *h)
{
    json_t *o = json_pack("{s:s,s:s,s:I,s:s,s:I}", "id", h->model_id, "object", "model", "created",
                          (json_int_t)h->created, "owned_by", "dsd", "max_model_len",
                          (json_int_t)h->ctx_len);
    if (o && h->have_chat)
        json_object_set_new(o, "chat_template", json_string(h->chat.name));
    return o;
}

static void metric_hist(struct sbuf *b, const char *name, const char *help,
                        const struct histogram *hg)
{
    http_sb_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (size_t i = 0; i < N_BUCKETS; i++) {
        cum += hg->counts[i];
        http_sb_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, DSD_HTTP_BUCKETS[i],
                       (unsigned long long)cum);
    }
    cum += hg->counts[N_BUCKETS];
    http_sb_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.9g\n%s_count %llu\n", name,
                   (unsigned long long)cum, name, hg->sum, name, (unsigned long long)hg->n);
}

static void metric_head(struct sbuf *b, const char *name, const char *type, const char *help)
{
    http_sb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A label value escaped for the text format (backslash, quote, newline). */
static const char *lv(const char *s, char *buf, size_t n)
{
    size_t o = 0;
    for (const char *p = s ? s : ""; *p && o + 3 < n; p++) {
        if (*p == '\\' || *p == '"') {
            buf[o++] = '\\';
            buf[o++] = *p;
        } else if (*p == '\n') {
            buf[o++] = '\\';
            buf[o++] = 'n';
        } else
            buf[o++] = *p;
    }
    buf[o] = 0;
    return buf;
}

static double num(json_t *o, const char *k)
{
    return json_number_value(json_object_get(o, k));
}

static void metrics_cluster(struct dsd_http *h, struct sbuf *b)
{
    char why[160], l1[160], l2[160], l3[160];
    json_t *st = http_status_doc(h, "status", why, sizeof(why));
    json_t *jobs = http_status_doc(h, "jobs", why, sizeof(why));
    json_t *pl = http_status_doc(h, "placement", why, sizeof(why));
    json_t *es = http_status_doc(h, "expert_stats", why, sizeof(why));
    size_t i, k;
    json_t *x, *y;
    if (st) {
        metric_head(b, "dsd_plan_version", "gauge", "Version of the plan the cluster runs.");
        http_sb_printf(b, "dsd_plan_version %.0f\n", num(st, "plan_version"));
        const char *state = json_string_value(json_object_get(st, "state"));
        metric_head(b, "dsd_serving", "gauge", "1 when the cluster serves jobs.");
        http_sb_printf(b, "dsd_serving %d\n",
                       state && (!strcmp(state, "serving") || !strcmp(state, "degraded")));
        metric_head(b, "dsd_node_state", "gauge", "1 for each node's current state.");
        json_array_foreach(json_object_get(st, "nodes"), i, x)
            http_sb_printf(b, "dsd_node_state{node=\"%s\",role=\"%s\",state=\"%s\"} 1\n",
                           lv(json_string_value(json_object_get(x, "name")), l1, sizeof(l1)),
                           lv(json_string_value(json_object_get(x, "role")), l2, sizeof(l2)),
                           lv(json_string_value(json_object_get(x, "state")), l3, sizeof(l3)));
        metric_head(b, "dsd_node_heartbeat_age_seconds", "gauge",
                    "Time since each node's last heartbeat.");
        json_array_foreach(json_object_get(st, "nodes"), i, x)
            http_sb_printf(b, "dsd_node_heartbeat_age_seconds{node=\"%s\"} %.3f\n",
                           lv(json_string_value(json_object_get(x, "name")), l1, sizeof(l1)),
                           num(x, "heartbeat_age_ms") / 1000);
    }
    if (jobs) {
        size_t running = 0, prefill = 0;
        json_array_foreach(json_object_get(jobs, "jobs"), i, x)
        {
            running++;
            const char *s = json_string_value(json_object_get(x, "state"));
            prefill += s && !strcmp(s, "prefill");
        }
        metric_head(b, "dsd_num_requests_running", "gauge", "Jobs the scheduler runs now.");
        http_sb_printf(b, "dsd_num_requests_running %zu\n", running);
        metric_head(b, "dsd_num_requests_prefill", "gauge",
                    "Running jobs still reading their prompt.");
        http_sb_printf(b, "dsd_num_requests_prefill %zu\n", prefill);
        metric_head(b, "dsd_num_requests_waiting", "gauge",
                    "Jobs waiting for a slot (the scheduler refuses past max_jobs: always 0).");
        http_sb_printf(b, "dsd_num_requests_waiting 0\n");
        metric_head(b, "dsd_jobs_finished_total", "counter", "Jobs finished by the scheduler.");
        http_sb_printf(b, "dsd_jobs_finished_total %.0f\n", num(jobs, "finished"));
        metric_head(b, "dsd_steps_total", "counter", "Scheduler steps run.");
        http_sb_printf(b, "dsd_steps_total %.0f\n", num(jobs, "steps"));
        metric_head(b, "dsd_micro_batches_in_flight", "gauge", "Micro-batches in flight.");
        http_sb_printf(b, "dsd_micro_batches_in_flight %.0f\n",
                       num(jobs, "micro_batches_in_flight"));
    }
    if (pl) {
        json_t *meas = json_object_get(pl, "measured");
        json_t *links = json_object_get(meas, "links");
        static const struct {
            const char *key, *name, *type, *help;
        } LINK[] = {
            {"bytes", "dsd_link_bytes_total", "counter", "Bytes of dispatches sent on a link."},
            {"messages", "dsd_link_messages_total", "counter", "Dispatches sent on a link."},
            {"forward_bytes", "dsd_link_forward_bytes_total", "counter",
             "Bytes of steps passed on along a link."},
            {"measured_transfer_s", "dsd_link_transfer_seconds_total", "counter",
             "Measured transfer time of a link's dispatches."},
            {"latency_s", "dsd_link_latency_seconds", "gauge", "Calibrated one-way latency."},
            {"bandwidth_bytes_per_s", "dsd_link_bandwidth_bytes_per_second", "gauge",
             "Calibrated bandwidth."},
        };
        for (size_t m = 0; m < sizeof(LINK) / sizeof(LINK[0]); m++) {
            metric_head(b, LINK[m].name, LINK[m].type, LINK[m].help);
            json_array_foreach(links, i, x)
                http_sb_printf(b, "%s{from=\"%s\",to=\"%s\"} %.9g\n", LINK[m].name,
                               lv(json_string_value(json_object_get(x, "from")), l1, sizeof(l1)),
                               lv(json_string_value(json_object_get(x, "to")), l2, sizeof(l2)),
                               num(x, LINK[m].key));
        }
        /* measured compute per node: the sum over the units it ran */
        metric_head(b, "dsd_node_busy_seconds_total", "counter",
                    "Measured compute time of the units a node ran.");
        json_t *per = json_object();
        const char *unit;
        json_object_foreach(json_object_get(meas, "units"), unit, x)
        {
            const char *node = json_string_value(json_object_get(x, "node"));
            if (!node)
                continue;
            json_object_set_new(per, node,
                                json_real(num(per, node) + num(x, "measured_compute_s")));
        }
        const char *node;
        json_object_foreach(per, node, x)
            http_sb_printf(b, "dsd_node_busy_seconds_total{node=\"%s\"} %.9g\n",
                           lv(node, l1, sizeof(l1)), json_number_value(x));
        json_decref(per);
        json_t *pred = json_object_get(pl, "predicted");
        metric_head(b, "dsd_device_predicted_busy_seconds_per_step", "gauge",
                    "The solver's predicted busy time of a device per decode step.");
        json_array_foreach(json_object_get(pred, "devices"), i, x)
        {
            const char *dev = json_string_value(json_object_get(x, "device"));
            if (!dev)
                dev = json_string_value(json_object_get(x, "name"));
            http_sb_printf(b, "dsd_device_predicted_busy_seconds_per_step{device=\"%s\"} %.9g\n",
                           lv(dev, l1, sizeof(l1)), num(x, "busy_s"));
        }
        metric_head(b, "dsd_predicted_step_seconds", "gauge",
                    "The solver's predicted decode step time.");
        http_sb_printf(b, "dsd_predicted_step_seconds %.9g\n",
                       num(json_object_get(pred, "predicted"), "decode_step_s"));
    }
    if (es) {
        metric_head(b, "dsd_expert_routed_total", "counter",
                    "Rows the router sent to each routed expert.");
        json_array_foreach(json_object_get(es, "layers"), i, x)
        {
            int layer = (int)num(x, "layer");
            json_array_foreach(json_object_get(x, "counts"), k, y)
                http_sb_printf(b, "dsd_expert_routed_total{layer=\"%d\",expert=\"%zu\"} %.0f\n",
                               layer, k, json_number_value(y));
        }
    }
    json_decref(st);
    json_decref(jobs);
    json_decref(pl);
    json_decref(es);
}

enum MHD_Result http_handle_metrics(struct dsd_http *h, struct MHD_Connection *c)
{
    struct sbuf b = {0};
    struct metrics m;
    pthread_mutex_lock(&h->mu);
    m = h->m;
    pthread_mutex_unlock(&h->mu);
    static const char *EP[] = {"/v1/completions", "/v1/chat/completions", "other"};
    metric_head(&b, "dsd_http_requests_total", "counter",
                "HTTP requests answered, by endpoint and status class.");
    for (int e = 0; e < 3; e++)
        for (int s = 2; s <= 5; s++)
            http_sb_printf(&b, "dsd_http_requests_total{endpoint=\"%s\",code=\"%dxx\"} %llu\n",
                           EP[e], s, (unsigned long long)m.requests[e][s]);
    metric_head(&b, "dsd_prompt_tokens_total", "counter", "Prompt tokens of HTTP jobs.");
    http_sb_printf(&b, "dsd_prompt_tokens_total %llu\n", (unsigned long long)m.prompt_tokens);
    metric_head(&b, "dsd_generation_tokens_total", "counter", "Tokens generated for HTTP jobs.");
    http_sb_printf(&b, "dsd_generation_tokens_total %llu\n",
                   (unsigned long long)m.generation_tokens);
    metric_head(&b, "dsd_request_success_total", "counter",
                "HTTP jobs finished, by finish reason.");
    static const char *FR[] = {"stop", "length", "cancelled", "error"};
    for (int i = 0; i < 4; i++)
        http_sb_printf(&b, "dsd_request_success_total{finish_reason=\"%s\"} %llu\n", FR[i],
                       (unsigned long long)m.finished[i]);
    metric_head(&b, "dsd_client_disconnects_total", "counter",
                "HTTP clients that hung up before their job ended (the job was cancelled).");
    http_sb_printf(&b, "dsd_client_disconnects_total %llu\n", (unsigned long long)m.disconnects);
    metric_hist(&b, "dsd_time_to_first_token_seconds", "Time from submit to the first token.",
                &m.ttft);
    metric_hist(&b, "dsd_time_per_output_token_seconds", "Time between output tokens.", &m.tpot);
    metric_hist(&b, "dsd_e2e_request_latency_seconds", "Time from submit to the job's end.",
                &m.e2e);
    metrics_cluster(h, &b);
    if (b.oom) {
        free(b.p);
        return http_reply(c, 500, "text/plain", "out of memory\n", 14);
    }
    enum MHD_Result r =
        http_reply(c, 200, "text/plain; version=0.0.4; charset=utf-8", b.p ? b.p : "", b.n);
    free(b.p);
    return r;
}

/* The status page's data: the status, jobs and placement documents in one. */
enum MHD_Result http_handle_api_status(struct dsd_http *h, struct MHD_Connection *c)
{
    char why[160];
    json_t *st = http_status_doc(h, "status", why, sizeof(why));
    if (!st)
        return http_reply_json(c, 503, json_pack("{s:s}", "error", why));
    json_t *jobs = http_status_doc(h, "jobs", why, sizeof(why));
    json_t *pl = http_status_doc(h, "placement", why, sizeof(why));
    struct metrics m;
    pthread_mutex_lock(&h->mu);
    m = h->m;
    pthread_mutex_unlock(&h->mu);
    return http_reply_json(
        c, 200,
        json_pack("{s:o,s:o,s:o,s:s,s:I,s:I}", "status", st, "jobs", jobs ? jobs : json_null(),
                  "placement", pl ? pl : json_null(), "model", h->model_id, "generation_tokens",
                  (json_int_t)m.generation_tokens, "prompt_tokens", (json_int_t)m.prompt_tokens));
}
