/* dsd_guard.c — the limits the daemon puts on what a peer can make it hold or believe.
 *
 * Every socket gets a message-size limit before it binds or connects (ZMQ_MAXMSGSIZE: libzmq
 * drops a connection whose frame header announces more, before it buffers a byte of it), a
 * node's hello is checked for a profile that cannot be true before it can reach the planner,
 * and a step may open only a bounded number of new sequences, all or none. Invariant: nothing
 * a peer sends can grow the daemon past these bounds or take away a working plan. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "dsd.h"

int dsd_guard_sock_limit(void *sock, int64_t max_bytes)
{
    if (max_bytes <= 0)
        return -EINVAL;
    return zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &max_bytes, sizeof(max_bytes)) < 0 ? -zmq_errno()
                                                                                   : 0;
}

int dsd_guard_new_token(char *token)
{
    unsigned char r[16];
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    ssize_t n = read(fd, r, sizeof(r));
    close(fd);
    if (n != (ssize_t)sizeof(r))
        return -EIO;
    for (int i = 0; i < 16; i++)
        snprintf(token + 2 * i, 3, "%02x", r[i]);
    return 0;
}

bool dsd_guard_member(const dsd_plan *p, const Dsd__Envelope *env)
{
    if (!p->token[0])
        return true;
    const char *t = env->data_token ? env->data_token : "";
    if (strlen(t) != strlen(p->token))
        return false;
    unsigned diff = 0; /* the same time whatever the first wrong digit */
    for (size_t i = 0; t[i]; i++)
        diff |= (unsigned)(t[i] ^ p->token[i]);
    return diff == 0;
}

bool dsd_guard_node_name_ok(const char *name)
{
    size_t n = name ? strlen(name) : 0;
    if (n == 0 || n >= DSD_NODE_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char ch = name[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '.' || ch == '_' || ch == '-'))
            return false;
    }
    return true;
}

/* x is a number in [0, max] (NaN and infinities fail both comparisons or the bound). */
static bool in_range(double x, double max)
{
    return x >= 0 && x <= max;
}

int dsd_guard_hello(const Dsd__Hello *h, ds_error *err)
{
    if (!dsd_guard_node_name_ok(h->node))
        return ds_error_set(err, -EINVAL,
                            "node name '%.80s' must be 1..%d characters of [A-Za-z0-9._-]",
                            h->node ? h->node : "", DSD_NODE_NAME_MAX - 1);
    if (!h->data_endpoint || !h->data_endpoint[0] || strlen(h->data_endpoint) >= DSD_STR_MAX)
        return ds_error_set(err, -EINVAL, "node %s: a data endpoint (< %d bytes) is required",
                            h->node, DSD_STR_MAX);
    if (h->n_devices > DSD_GUARD_MAX_DEVICES)
        return ds_error_set(err, -EINVAL, "node %s: %zu devices, at most %d", h->node, h->n_devices,
                            DSD_GUARD_MAX_DEVICES);
    if (h->model_digest && strlen(h->model_digest) > 128)
        return ds_error_set(err, -EINVAL, "node %s: model digest longer than 128 bytes", h->node);
    for (size_t i = 0; i < h->n_devices; i++) {
        const Dsd__Device *v = h->devices[i];
        const char *name = v->name ? v->name : "";
        if (!name[0] || strlen(name) >= 32)
            return ds_error_set(err, -EINVAL, "node %s: device %zu: name must be 1..31 bytes",
                                h->node, i);
        for (size_t k = 0; k < i; k++)
            if (!strcmp(h->devices[k]->name ? h->devices[k]->name : "", name))
                return ds_error_set(err, -EINVAL, "node %s: device %s listed twice", h->node, name);
        const char *bad = NULL;
        double val = 0;
        if ((double)v->memory_bytes > DSD_GUARD_MAX_MEMORY_BYTES)
            bad = "memory_bytes", val = (double)v->memory_bytes;
        else if (!in_range(v->mem_bw_bytes_per_s, DSD_GUARD_MAX_MEM_BW))
            bad = "mem_bw_bytes_per_s", val = v->mem_bw_bytes_per_s;
        else if (!in_range(v->flops, DSD_GUARD_MAX_FLOPS))
            bad = "flops", val = v->flops;
        else if (!in_range(v->host_link_bytes_per_s, DSD_GUARD_MAX_MEM_BW))
            bad = "host_link_bytes_per_s", val = v->host_link_bytes_per_s;
        else if (!in_range(v->launch_s, 60.0))
            bad = "launch_s", val = v->launch_s;
        if (bad)
            return ds_error_set(err, -EINVAL,
                                "node %s: device %s: %s = %g cannot be true (a profile is finite, "
                                "non-negative and below %g)",
                                h->node, name, bad, val,
                                !strcmp(bad, "memory_bytes") ? DSD_GUARD_MAX_MEMORY_BYTES
                                : !strcmp(bad, "flops")      ? DSD_GUARD_MAX_FLOPS
                                : !strcmp(bad, "launch_s")   ? 60.0
                                                             : DSD_GUARD_MAX_MEM_BW);
        if (v->shares_silicon_with && strlen(v->shares_silicon_with) >= 32)
            return ds_error_set(err, -EINVAL, "node %s: device %s: shares_silicon_with too long",
                                h->node, name);
    }
    return 0;
}

uint32_t dsd_guard_rows_per_frame(const ds_model_config *c, int64_t max_frame_bytes)
{
    /* the largest frame of a micro-batch of R rows is an expert host's combine reply: up to
     * R * num_experts_per_tok unweighted rows of hidden_size floats */
    uint64_t K = c->num_experts_per_tok ? c->num_experts_per_tok : 1;
    uint64_t row = (uint64_t)c->hidden_size * sizeof(float) * K;
    uint64_t r = row ? (uint64_t)max_frame_bytes / row : DSD_MAX_ROWS;
    if (r > DSD_MAX_ROWS)
        r = DSD_MAX_ROWS;
    return r ? (uint32_t)r : 1;
}

int dsd_guard_step_seqs(ds_seqs *seqs, uint32_t n, const uint64_t *seq_ids, uint32_t max_new,
                        ds_error *err)
{
    uint32_t fresh = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (i > 0 && seq_ids[i - 1] == seq_ids[i])
            continue;
        if (ds_seqs_find(seqs, seq_ids[i], false) < 0 && ++fresh > max_new)
            return ds_error_set(err, -ENOSPC,
                                "step opens more than %u new sequences (at most %u per step)",
                                max_new, max_new);
    }
    return (int)fresh;
}

void dsd_guard_step_rollback(ds_seqs *seqs, uint32_t n, const uint64_t *seq_ids,
                             const uint32_t *positions)
{
    /* a sequence this step opened has its first row at position 0 and holds nothing useful
     * once the step failed */
    for (uint32_t i = 0; i < n; i++)
        if ((i == 0 || seq_ids[i - 1] != seq_ids[i]) && positions[i] == 0)
            ds_seqs_remove(seqs, seq_ids[i]);
}
