/* fuzz_daemon.c — the daemon's parsers of outside input: the config file (key = value lines
 * through the options table), a wire Plan turned into this node's units and into the whole
 * plan (unit names, node names, layer and expert indices checked against the model), and a
 * sequence of WeightChunks written by the streamed-weights receiver (file names, sizes,
 * offsets, plan version), a worker's StepStats as the coordinator keeps it, a Hello's
 * checks (dsd_guard_hello: names, devices, profiles) and a checkpoint file's digest and
 * truncation check (dsd_digest_model: the safetensors tensor table). Input: the
 * first byte selects the parser. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "dsd.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static ds_model *g_model;
static char g_dir[64];

static void remove_dir(void)
{
    static const char *const names[] = {"config.json", "config.json.part", "model.safetensors",
                                        "model.safetensors.part"};
    char p[128];
    for (size_t i = 0; i < 4; i++) {
        snprintf(p, sizeof(p), "%s/%s", g_dir, names[i]);
        unlink(p);
    }
    rmdir(g_dir);
}

/* Valid seeds (selector byte + packed message), so mutations explore near-valid input. */
size_t ds_fuzz_seeds(uint8_t **bufs, size_t *sizes, size_t max);
size_t ds_fuzz_seeds(uint8_t **bufs, size_t *sizes, size_t max)
{
    size_t n = 0;
    /* StepStats: units, a link, routing counts of layers 1..3 */
    Dsd__StepStats st = DSD__STEP_STATS__INIT;
    Dsd__UnitStat u0 = DSD__UNIT_STAT__INIT, u1 = DSD__UNIT_STAT__INIT, *us[2] = {&u0, &u1};
    Dsd__LinkStat lk = DSD__LINK_STAT__INIT, *ls[1] = {&lk};
    uint64_t counts[24];
    for (int i = 0; i < 24; i++)
        counts[i] = (uint64_t)(i * 7 % 5);
    u0.unit = "attn[1]";
    u0.compute_s = 0.001;
    u0.calls = 3;
    u1.unit = "expert[2][5]";
    u1.compute_s = 0.002;
    u1.calls = 9;
    lk.peer = "w2";
    lk.transfer_s = 0.0004;
    lk.bytes = 4096;
    lk.messages = 4;
    lk.latency_s = 2e-5;
    lk.bandwidth_bytes_per_s = 1e9;
    lk.calibrated = true;
    st.n_units = 2;
    st.units = us;
    st.n_links = 1;
    st.links = ls;
    st.first_moe_layer = 1;
    st.n_routed_experts = 8;
    st.n_expert_counts = 24;
    st.expert_counts = counts;
    size_t len = dsd__step_stats__get_packed_size(&st);
    if (n < max && (bufs[n] = malloc(len + 1))) {
        bufs[n][0] = 4;
        dsd__step_stats__pack(&st, bufs[n] + 1);
        sizes[n++] = len + 1;
    }
    /* a Hello with one device */
    Dsd__Hello h = DSD__HELLO__INIT;
    Dsd__Device dv = DSD__DEVICE__INIT, *dvs[1] = {&dv};
    h.node = "w1";
    h.data_endpoint = "tcp://127.0.0.1:7102";
    h.n_devices = 1;
    h.devices = dvs;
    h.model_digest = "sha256:00";
    dv.name = "cpu0";
    dv.kind = "cpu";
    dv.klass = "server";
    dv.memory_bytes = 1 << 30;
    dv.mem_bw_bytes_per_s = 1e10;
    dv.flops = 1e11;
    len = dsd__hello__get_packed_size(&h);
    if (n < max && (bufs[n] = malloc(len + 1))) {
        bufs[n][0] = 8;
        dsd__hello__pack(&h, bufs[n] + 1);
        sizes[n++] = len + 1;
    }
    /* a small safetensors file: one F32 tensor of 2 values */
    static const char st_hdr[] = "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],"
                                 "\"data_offsets\":[0,8]}}";
    size_t hl = sizeof(st_hdr) - 1;
    if (n < max && (bufs[n] = calloc(1, 1 + 8 + hl + 8))) {
        bufs[n][0] = 16;
        bufs[n][1] = (uint8_t)hl;
        memcpy(bufs[n] + 9, st_hdr, hl);
        sizes[n++] = 1 + 8 + hl + 8;
    }
    /* a WeightChunk sequence: [len][chunk][frame len][frame] */
    Dsd__WeightChunk wc = DSD__WEIGHT_CHUNK__INIT;
    wc.file = "config.json";
    wc.offset = 0;
    wc.total_bytes = 4;
    wc.plan_version = 7;
    len = dsd__weight_chunk__get_packed_size(&wc);
    if (n < max && len < 250 && (bufs[n] = malloc(len + 7))) {
        bufs[n][0] = 2;
        bufs[n][1] = (uint8_t)len;
        dsd__weight_chunk__pack(&wc, bufs[n] + 2);
        bufs[n][2 + len] = 4;
        memcpy(bufs[n] + 3 + len, "{}\n ", 4);
        sizes[n++] = len + 7;
    }
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    ds_error err = {0};
    if (data[0] & 1) {
        int fd = memfd_create("conf", MFD_CLOEXEC);
        if (fd < 0)
            return 0;
        if (write(fd, data + 1, size - 1) == (ssize_t)(size - 1)) {
            char path[64];
            snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
            dsd_opts o;
            dsd_opts_defaults(&o);
            if (dsd_opts_load_file(&o, path, &err) == 0)
                dsd_opts_check(&o, &err);
        }
        close(fd);
        return 0;
    }
    if (data[0] & 16) { /* a checkpoint file as dsd_digest_model reads it (safetensors) */
        char path[64];
        snprintf(path, sizeof(path), "/tmp/fuzz-digest-%d.safetensors", (int)getpid());
        FILE *f = fopen(path, "wb");
        if (!f)
            return 0;
        size_t w = fwrite(data + 1, 1, size - 1, f);
        fclose(f);
        char digest[DSD_DIGEST_LEN];
        if (w == size - 1)
            dsd_digest_model(path, digest, sizeof(digest), &err);
        unlink(path);
        return 0;
    }
    if (data[0] & 8) { /* a Hello as the coordinator checks it before membership sees it */
        Dsd__Hello *h = dsd__hello__unpack(NULL, size - 1, data + 1);
        if (h) {
            dsd_guard_hello(h, &err);
            dsd__hello__free_unpacked(h, NULL);
        }
        return 0;
    }
    if (data[0] & 4) { /* StepStats from a worker, for a 4-layer, 8-expert model */
        Dsd__StepStats *st = dsd__step_stats__unpack(NULL, size - 1, data + 1);
        if (st) {
            json_t *j = dsd_stats_from_wire(st, "w1", 4, 8);
            char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
            free(s);
            json_decref(j);
            dsd__step_stats__free_unpacked(st, NULL);
        }
        return 0;
    }
    if (data[0] & 2) {
        /* chunks: [u8 len][WeightChunk bytes][u8 frame len][frame bytes]... into a temp dir */
        if (!g_dir[0]) {
            snprintf(g_dir, sizeof(g_dir), "/tmp/fuzz-stream-%d", (int)getpid());
            atexit(remove_dir);
        }
        dsd_stream_in *in = NULL;
        if (dsd_stream_in_new(g_dir, 7, &in, &err) < 0)
            return 0;
        size_t at = 1;
        for (int k = 0; k < 16 && at + 2 <= size; k++) {
            size_t hl = data[at++];
            if (at + hl + 1 > size)
                break;
            Dsd__WeightChunk *c = dsd__weight_chunk__unpack(NULL, hl, data + at);
            at += hl;
            size_t fl = data[at++];
            if (at + fl > size)
                fl = size - at;
            if (c && dsd_stream_in_chunk(in, c, data + at, fl, &err) < 0)
                k = 16;
            at += fl;
            if (c)
                dsd__weight_chunk__free_unpacked(c, NULL);
        }
        dsd_stream_in_complete(in);
        dsd_stream_in_free(in);
        return 0;
    }
    if (!g_model && ds_model_open(DS_TEST_DATA "/ref/v3_bf16", NULL, &g_model, &err) < 0)
        abort();
    Dsd__Plan *p = dsd__plan__unpack(NULL, size - 1, data + 1);
    if (!p)
        return 0;
    dsd_units u;
    if (dsd_plan_units_from_wire(p, "w1", ds_model_get_config(g_model), &u, &err) == 0)
        dsd_units_clear(&u);
    dsd_plan pl;
    if (dsd_plan_from_wire(p, ds_model_get_config(g_model), &pl, &err) == 0)
        dsd_plan_clear(&pl);
    dsd__plan__free_unpacked(p, NULL);
    return 0;
}
