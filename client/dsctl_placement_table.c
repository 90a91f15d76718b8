/* dsctl_placement_table.c — the human table of `dsctl placement`: where every unit runs (per
 * layer: the attention host; per MoE layer: expert -> node), the measured compute time per
 * unit and per link beside the calibrated link figures, and the solver's predicted time per
 * decode step per node/device and per link beside the measured one.
 *
 * Reads only the JSON of the coordinator's "placement" reply; a missing or null part prints
 * "-" (a round-robin plan has "predicted": null). The lines before the predicted-vs-measured
 * section are the historical output, kept as they were for tools that read them. */
#include "dsctl_placement_table.h"

#include <string.h>

#define MAX_NODES 256

static const char *unit_node(json_t *units, const char *name)
{
    const char *s = json_string_value(json_object_get(units, name));
    return s ? s : "-";
}

static double num(json_t *o, const char *key)
{
    return json_number_value(json_object_get(o, key));
}

/* "1.234 ms", or "-" when !have */
static const char *fmt_ms(char *buf, size_t n, bool have, double s)
{
    if (!have)
        return "-";
    snprintf(buf, n, "%.3f ms", s * 1e3);
    return buf;
}

static void print_layers(FILE *f, json_t *units, json_t *reps, json_t *devs, json_t *meas,
                         long only_layer)
{
    fprintf(f, "%-6s %-14s %-14s %s\n", "LAYER", "ATTENTION", "MEASURED",
            "EXPERTS (expert:node[/accelerator], +extra copies)");
    json_t *mus = json_object_get(meas, "units");
    char name[64];
    for (long l = 0; l < 100000; l++) {
        snprintf(name, sizeof(name), "attn[%ld]", l);
        if (!json_object_get(units, name))
            break;
        if (only_layer >= 0 && l != only_layer)
            continue;
        json_t *mu = json_object_get(mus, name);
        double ms = num(mu, "measured_compute_s") * 1e3;
        long calls = (long)json_integer_value(json_object_get(mu, "calls"));
        char mbuf[32];
        snprintf(mbuf, sizeof(mbuf), "%.3f ms/call", calls ? ms / (double)calls : 0.0);
        /* node, or node/accelerator when the plan puts the attention on one */
        char host[160];
        const char *adev = json_string_value(json_object_get(devs, name));
        snprintf(host, sizeof(host), "%s%s%s", unit_node(units, name), adev ? "/" : "",
                 adev ? adev : "");
        fprintf(f, "%-6ld %-14s %-14s ", l, host, mbuf);
        int any = 0;
        for (long e = 0; e < 1 << 16; e++) {
            snprintf(name, sizeof(name), "expert[%ld][%ld]", l, e);
            const char *n = json_string_value(json_object_get(units, name));
            if (!n)
                break;
            fprintf(f, "%s%ld:%s", any++ ? " " : "", e, n);
            const char *dv = json_string_value(json_object_get(devs, name));
            if (dv)
                fprintf(f, "/%s", dv);
            size_t k;
            json_t *r;
            json_array_foreach(json_object_get(reps, name), k, r)
                fprintf(f, "+%s", json_string_value(r) ? json_string_value(r) : "?");
        }
        fprintf(f, "%s\n", any ? "" : "(dense)");
    }
}

static void print_links(FILE *f, json_t *meas)
{
    fprintf(f, "\n%-16s %-12s %-12s %-14s %-14s %-10s %s\n", "LINK", "LATENCY", "BANDWIDTH",
            "PRED/MSG", "MEAS XFER/MSG", "MESSAGES", "EXPERT COMPUTE");
    size_t i;
    json_t *lk;
    json_array_foreach(json_object_get(meas, "links"), i, lk)
    {
        double lat = num(lk, "latency_s");
        double bw = num(lk, "bandwidth_bytes_per_s");
        double msgs = (double)json_integer_value(json_object_get(lk, "messages"));
        double bytes = (double)json_integer_value(json_object_get(lk, "bytes"));
        double tr = num(lk, "measured_transfer_s");
        /* predicted per message from calibration: 2 x latency (there and back) + bytes/bw */
        double pred = msgs > 0 ? 2 * lat + (bw > 0 ? bytes / msgs / bw : 0) : 0;
        const char *from = json_string_value(json_object_get(lk, "from"));
        const char *to = json_string_value(json_object_get(lk, "to"));
        char l1[32], l2[32];
        snprintf(l1, sizeof(l1), "%s->%s", from ? from : "?", to ? to : "?");
        snprintf(l2, sizeof(l2), "%.1f MB/s", bw / 1e6);
        fprintf(f, "%-16s %-9.1f us %-12s %-11.1f us %-11.1f us %-10.0f %.3f ms\n", l1, lat * 1e6,
                l2, pred * 1e6, msgs > 0 ? tr / msgs * 1e6 : 0.0, msgs,
                num(lk, "expert_compute_s") * 1e3);
    }
}

/* Decode steps the measurements cover: every step calls every attention layer once, so the
 * most calls of any attention unit (0 when nothing ran yet). */
static long measured_steps(json_t *meas)
{
    long steps = 0;
    const char *name;
    json_t *mu;
    json_object_foreach(json_object_get(meas, "units"), name, mu)
    {
        long calls = (long)json_integer_value(json_object_get(mu, "calls"));
        if (!strncmp(name, "attn[", 5) && calls > steps)
            steps = calls;
    }
    return steps;
}

/* whether device name "node/dev" belongs to node */
static bool device_on(const char *dev, const char *node)
{
    size_t n = strlen(node);
    return dev && !strncmp(dev, node, n) && dev[n] == '/';
}

#define MAX_NODE_NAME 128

static void node_add(char (*nodes)[MAX_NODE_NAME], int *n, const char *name, size_t len)
{
    if (!name || *n >= MAX_NODES || len >= MAX_NODE_NAME)
        return;
    for (int i = 0; i < *n; i++)
        if (strlen(nodes[i]) == len && !strncmp(nodes[i], name, len))
            return;
    memcpy(nodes[*n], name, len);
    nodes[(*n)++][len] = '\0';
}

/* Measured compute of a node: the sum over the units it ran (attention layers with the shared
 * experts / dense FFN beside them, and routed experts). false when it reported none. */
static bool measured_compute_of(json_t *meas, const char *node, double *s)
{
    const char *name;
    json_t *mu;
    bool any = false;
    *s = 0;
    /* the node's own report when there is one (a replicated expert runs on several nodes) */
    json_t *own = json_object_get(json_object_get(json_object_get(meas, "nodes"), node), "units");
    json_object_foreach(own, name, mu)
    {
        *s += num(mu, "compute_s");
        any = true;
    }
    if (any)
        return true;
    json_object_foreach(json_object_get(meas, "units"), name, mu)
    {
        const char *n = json_string_value(json_object_get(mu, "node"));
        if (n && !strcmp(n, node)) {
            *s += num(mu, "measured_compute_s");
            any = true;
        }
    }
    (void)name;
    return any;
}

/* the predicted link between a and b in either direction, or NULL */
static json_t *predicted_link(json_t *pred, const char *a, const char *b)
{
    size_t i;
    json_t *lk;
    json_array_foreach(json_object_get(pred, "links"), i, lk)
    {
        const char *x = json_string_value(json_object_get(lk, "a"));
        const char *y = json_string_value(json_object_get(lk, "b"));
        if (x && y && ((!strcmp(x, a) && !strcmp(y, b)) || (!strcmp(x, b) && !strcmp(y, a))))
            return lk;
    }
    return NULL;
}

/* Measured compute of device `dev` ("node/name"): the node's own report of the units it ran,
 * each attributed to the device the plan gave it (`on_dev`: the plan's "devices" map, the
 * experts on accelerators) or else to the node's CPU engine, i.e. its first cpu* device in the
 * prediction (`cpu_dev`). false when the node reported nothing. */
static bool measured_compute_of_device(json_t *meas, json_t *on_dev, const char *node,
                                       const char *dev, const char *cpu_dev, double *s)
{
    json_t *own = json_object_get(json_object_get(json_object_get(meas, "nodes"), node), "units");
    const char *name;
    json_t *mu;
    bool any = false;
    *s = 0;
    const char *devname = strchr(dev, '/') ? strchr(dev, '/') + 1 : dev;
    json_object_foreach(own, name, mu)
    {
        const char *d = json_string_value(json_object_get(on_dev, name));
        if (d ? !strcmp(d, devname) : (cpu_dev && !strcmp(dev, cpu_dev)))
            *s += num(mu, "compute_s");
        any = true;
    }
    return any;
}

static void print_predicted_vs_measured(FILE *f, json_t *pred, json_t *meas, json_t *on_dev)
{
    bool have_pred = json_is_object(pred);
    long steps = measured_steps(meas);
    char b1[32], b2[32];
    json_t *ps = json_object_get(pred, "predicted");
    fprintf(f, "\nPREDICTED VS MEASURED per decode step (predicted step %s",
            fmt_ms(b1, sizeof(b1),
                   have_pred && json_is_number(json_object_get(ps, "decode_step_s")),
                   num(ps, "decode_step_s")));
    const char *bneck = json_string_value(json_object_get(ps, "bottleneck"));
    const char *solver = json_string_value(json_object_get(pred, "solver"));
    if (bneck)
        fprintf(f, ", bottleneck %s", bneck);
    if (solver)
        fprintf(f, ", solver %s", solver);
    if (!have_pred)
        fprintf(f, ", no solver prediction for this plan");
    fprintf(f, "; measured over %ld steps)\n", steps);

    /* the nodes that reported measurements, the ends of measured links, then any only the
     * solver names */
    static char nodes[MAX_NODES][MAX_NODE_NAME]; /* 32 KiB: off the stack; dsctl is one thread */
    int nn = 0;
    size_t i;
    json_t *o;
    const char *key;
    json_object_foreach(json_object_get(meas, "nodes"), key, o) node_add(nodes, &nn, key, strlen(key));
    json_array_foreach(json_object_get(meas, "links"), i, o)
    {
        const char *from = json_string_value(json_object_get(o, "from"));
        const char *to = json_string_value(json_object_get(o, "to"));
        if (from)
            node_add(nodes, &nn, from, strlen(from));
        if (to)
            node_add(nodes, &nn, to, strlen(to));
    }
    json_array_foreach(json_object_get(pred, "devices"), i, o)
    {
        const char *dev = json_string_value(json_object_get(o, "device"));
        const char *slash = dev ? strchr(dev, '/') : NULL;
        if (slash)
            node_add(nodes, &nn, dev, (size_t)(slash - dev));
    }

    fprintf(f, "%-24s %-16s %s\n", "NODE/DEVICE", "PRED BUSY/STEP", "MEAS COMPUTE/STEP");
    for (int n = 0; n < nn; n++) {
        const char *node = nodes[n];
        double busy = 0;
        bool any_dev = false;
        json_array_foreach(json_object_get(pred, "devices"), i, o)
        {
            if (device_on(json_string_value(json_object_get(o, "device")), node)) {
                busy += num(o, "busy_s");
                any_dev = true;
            }
        }
        double comp;
        bool have = measured_compute_of(meas, node, &comp);
        fprintf(f, "%-24s %-16s %s\n", node, fmt_ms(b1, sizeof(b1), have_pred && any_dev, busy),
                fmt_ms(b2, sizeof(b2), have && steps > 0, steps > 0 ? comp / (double)steps : 0));
        const char *cpu_dev = NULL; /* where the node's CPU engine runs: its first cpu* */
        json_array_foreach(json_object_get(pred, "devices"), i, o)
        {
            const char *dev = json_string_value(json_object_get(o, "device"));
            const char *slash = dev ? strchr(dev, '/') : NULL;
            if (!cpu_dev && device_on(dev, node) && slash && !strncmp(slash + 1, "cpu", 3))
                cpu_dev = dev;
        }
        json_array_foreach(json_object_get(pred, "devices"), i, o)
        {
            const char *dev = json_string_value(json_object_get(o, "device"));
            if (!device_on(dev, node))
                continue;
            char label[160];
            snprintf(label, sizeof(label), "  %s", dev);
            double dc;
            bool dh = measured_compute_of_device(meas, on_dev, node, dev, cpu_dev, &dc);
            fprintf(f, "%-24s %-16s %s\n", label, fmt_ms(b1, sizeof(b1), true, num(o, "busy_s")),
                    fmt_ms(b2, sizeof(b2), dh && steps > 0, steps > 0 ? dc / (double)steps : 0));
        }
    }

    /* links: the measured ones (each node times the dispatches it sends; one row per
     * direction, beside the solver's figure for the pair), then any only the solver predicts.
     * A link the solver does not list carries no traffic in its plan: predicted 0. */
    fprintf(f, "%-24s %-16s %s\n", "NODE PAIR", "PRED XFER/STEP", "MEAS XFER/STEP");
    json_array_foreach(json_object_get(meas, "links"), i, o)
    {
        const char *from = json_string_value(json_object_get(o, "from"));
        const char *to = json_string_value(json_object_get(o, "to"));
        if (!from || !to || !strcmp(from, to))
            continue; /* the coordinator's own units: no network link */
        json_t *pl = predicted_link(pred, from, to);
        char label[160];
        snprintf(label, sizeof(label), "%s=>%s", from, to);
        fprintf(f, "%-24s %-16s %s\n", label,
                fmt_ms(b1, sizeof(b1), have_pred, pl ? num(pl, "seconds_per_step") : 0),
                fmt_ms(b2, sizeof(b2), steps > 0,
                       steps > 0 ? num(o, "measured_transfer_s") / (double)steps : 0));
    }
    json_array_foreach(json_object_get(pred, "links"), i, o)
    {
        const char *a = json_string_value(json_object_get(o, "a"));
        const char *b = json_string_value(json_object_get(o, "b"));
        if (!a || !b)
            continue;
        bool measured = false;
        size_t k;
        json_t *m;
        json_array_foreach(json_object_get(meas, "links"), k, m)
        {
            const char *from = json_string_value(json_object_get(m, "from"));
            const char *to = json_string_value(json_object_get(m, "to"));
            if (from && to &&
                ((!strcmp(from, a) && !strcmp(to, b)) || (!strcmp(from, b) && !strcmp(to, a))))
                measured = true;
        }
        if (measured)
            continue;
        char label[160];
        snprintf(label, sizeof(label), "%s<->%s", a, b);
        fprintf(f, "%-24s %-16s %s\n", label,
                fmt_ms(b1, sizeof(b1), true, num(o, "seconds_per_step")), "-");
    }
}

void dsctl_placement_print(FILE *f, json_t *pl, long only_layer, bool explain)
{
    json_t *plan = json_object_get(pl, "plan");
    json_t *units = json_object_get(plan, "units");
    json_t *meas = json_object_get(pl, "measured");
    fprintf(f, "plan v%lld   embed -> %s   head -> %s\n",
            (long long)json_integer_value(json_object_get(plan, "version")),
            unit_node(units, "embed"), unit_node(units, "head"));
    print_layers(f, units, json_object_get(plan, "replicas"), json_object_get(plan, "devices"),
                 meas, only_layer);
    print_links(f, meas);
    print_predicted_vs_measured(f, json_object_get(pl, "predicted"), meas,
                                json_object_get(plan, "devices"));
    if (explain)
        fprintf(f,
                "\nwhy: embed and head stay on the coordinator, which samples; the placement "
                "solver (or the round-robin debugging plan) chose every other unit's node "
                "(dsctl plan --explain shows the solver's reasoning for a cluster spec); shared "
                "experts and dense FFNs run beside their attention. A micro-batch travels from "
                "attention host to attention host; each sends one dispatch per expert host per "
                "MoE layer. Predicted per message = 2 x link latency + bytes / bandwidth "
                "(calibrated over the real sockets); measured = dispatch round trip minus the "
                "expert host's reported compute time. Per decode step: predicted = the "
                "solver's busy seconds per device (summed per node) and per link; measured = "
                "the compute of the units a node ran and the transfer time per link divided by "
                "the steps run (the most calls of any attention layer).\n");
}
