/* dsd_stats.c — a worker's StepStats (wire) as the coordinator keeps it: the JSON form of
 * dsd_data's "stats" snapshot (units, links, routing counts). Everything read from the wire is
 * checked: unit names parsed against the model's shape, numbers finite, peer names bounded,
 * routing counts only with the model's expert count and layer range. */
#include <math.h>
#include <string.h>

#include <jansson.h>

#include "dsd.h"

json_t *dsd_stats_from_wire(const Dsd__StepStats *st, const char *node, uint32_t L, uint32_t E)
{
    if (st->n_units > 1u << 20 || st->n_links > 4096)
        return NULL;
    uint32_t f = st->first_moe_layer;
    json_t *units = json_object(), *links = json_array(), *layers = json_array();
    for (size_t i = 0; i < st->n_units; i++) {
        const Dsd__UnitStat *u = st->units[i];
        enum ds_unit_kind kind;
        uint32_t l, e;
        if (!u->unit || ds_unit_parse(u->unit, &kind, &l, &e) < 0 || l >= L ||
            (kind == DS_UNIT_EXPERT && e >= E) || !isfinite(u->compute_s))
            continue;
        json_object_set_new(units, u->unit,
                            json_pack("{s:f,s:I}", "compute_s", u->compute_s,
                                      kind == DS_UNIT_EXPERT ? "rows" : "calls",
                                      (json_int_t)u->calls));
    }
    for (size_t i = 0; i < st->n_links; i++) {
        const Dsd__LinkStat *k = st->links[i];
        if (!k->peer || strlen(k->peer) >= 64 || !isfinite(k->transfer_s) ||
            !isfinite(k->latency_s) || !isfinite(k->bandwidth_bytes_per_s) ||
            !isfinite(k->compute_s))
            continue;
        json_array_append_new(
            links, json_pack("{s:s,s:s,s:f,s:f,s:f,s:f,s:f,s:I,s:I,s:I,s:I,s:b}", "from", node,
                             "to", k->peer, "latency_s", k->latency_s, "bandwidth_bytes_per_s",
                             k->bandwidth_bytes_per_s, "measured_transfer_s", k->transfer_s,
                             "measured_compute_s", k->compute_s, "expert_compute_s",
                             k->compute_s, "messages", (json_int_t)k->messages, "bytes",
                             (json_int_t)k->bytes, "forwards", (json_int_t)k->forwards,
                             "forward_bytes", (json_int_t)k->forward_bytes, "calibrated",
                             k->calibrated));
    }
    if (st->n_routed_experts == E && E && f < L &&
        st->n_expert_counts == (size_t)(L - f) * E) {
        for (uint32_t l = f; l < L; l++) {
            const uint64_t *c = st->expert_counts + (size_t)(l - f) * E;
            bool any = false;
            for (uint32_t e = 0; e < E && !any; e++)
                any = c[e] != 0;
            if (!any)
                continue;
            json_t *row = json_array();
            for (uint32_t e = 0; e < E; e++)
                json_array_append_new(row, json_integer((json_int_t)c[e]));
            json_array_append_new(layers, json_pack("{s:i,s:o}", "layer", (int)l, "counts", row));
        }
    }
    return json_pack("{s:s,s:o,s:o,s:{s:i,s:o}}", "node", node, "units", units, "links",
                         links, "expert_counts", "n_routed_experts", (int)E, "layers", layers);
}

