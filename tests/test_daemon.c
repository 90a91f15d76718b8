/* test_daemon.c — dsd internals (the options table, the plan builder and wire plan, unit
 * names) and bad peers against a live daemon: a wrong protocol version on the control socket,
 * a garbled frame, an oversized message, a step for a layer this node does not host, a
 * dispatch for an unknown expert, a cancel for an unknown job: each is refused with an Error
 * and a log line, and the daemon keeps serving. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <malloc.h>
#include <math.h>

#include <cmocka.h>

#include <poll.h>

#include "dsd.h"
#include "dsd_loop.h"
#include "cluster/dsd_spawn.h"

/* The shipped example /etc/dsd/dsd.conf loads, and documents every option of the table
 * (`dsd --help` is generated from the same table). */
static void test_example_config_complete(void **state)
{
    (void)state;
    const char *path = DS_TEST_DATA "/../../systemd/dsd.conf";
    dsd_opts o;
    dsd_opts_defaults(&o);
    ds_error err = {0};
    assert_int_equal(dsd_opts_load_file(&o, path, &err), 0);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    static char conf[1 << 16];
    size_t n = fread(conf, 1, sizeof(conf) - 1, f);
    conf[n] = 0;
    fclose(f);
    char *help = NULL;
    size_t hl = 0;
    FILE *h = open_memstream(&help, &hl);
    dsd_opts_help(h);
    fclose(h);
    int checked = 0;
    for (char *line = strtok(help, "\n"); line; line = strtok(NULL, "\n")) {
        char name[64];
        /* option lines: two spaces, the name, spaces, the help text */
        if (strncmp(line, "  ", 2) || line[2] == ' ' || sscanf(line + 2, "%63[a-z_]", name) != 1)
            continue;
        char want[80];
        snprintf(want, sizeof(want), "%s", name);
        if (!strstr(conf, want))
            fail_msg("systemd/dsd.conf does not document option '%s'", name);
        checked++;
    }
    free(help);
    assert_true(checked >= 20);
}

static void test_options_table(void **state)
{
    (void)state;
    dsd_opts o;
    dsd_opts_defaults(&o);
    assert_string_equal(o.role, "coordinator");
    assert_int_equal(o.heartbeat_ms, 1000);
    assert_true(o.compute);
    ds_error err = {0};
    assert_int_equal(dsd_opts_set(&o, "heartbeat_ms", "5", &err), -ERANGE);
    assert_non_null(strstr(err.msg, "heartbeat_ms"));
    assert_int_equal(dsd_opts_set(&o, "heartbeat_ms", "250", &err), 0);
    assert_int_equal(o.heartbeat_ms, 250);
    assert_int_equal(dsd_opts_set(&o, "role", "boss", &err), -EINVAL);
    assert_int_equal(dsd_opts_set(&o, "nosuch", "1", &err), -ENOENT);
    assert_int_equal(dsd_opts_set(&o, "compute", "maybe", &err), -EINVAL);
    assert_int_equal(dsd_opts_set(&o, "compute", "off", &err), 0);
    assert_false(o.compute);
    /* config file, then command line wins */
    char path[] = "/tmp/dsd-conf-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char *conf = "# comment\n\nrole = worker\n node = edge-1 \ncoordinator = \"tcp://h:1\"\n"
                       "heartbeat_ms = 300\n";
    assert_int_equal(write(fd, conf, strlen(conf)), (ssize_t)strlen(conf));
    close(fd);
    char cfg_arg[64];
    snprintf(cfg_arg, sizeof(cfg_arg), "--config=%s", path);
    char *argv[] = {"dsd", cfg_arg, "--heartbeat-ms=400", NULL};
    const char *cfg;
    dsd_opts_defaults(&o);
    assert_int_equal(dsd_opts_parse(&o, 3, argv, &cfg, &err), 0);
    assert_string_equal(o.role, "worker");
    assert_string_equal(o.node, "edge-1");
    assert_string_equal(o.coordinator, "tcp://h:1");
    assert_int_equal(o.heartbeat_ms, 400);
    assert_int_equal(dsd_opts_check(&o, &err), 0);
    /* getopt_long over the table: --key value and --key=value alike, '-' or '_' */
    {
        char *av[] = {"dsd",       "--config",     "/dev/null",     "--model",
                      "/srv/m",    "--max_jobs=3", "--max-context", "1024",
                      "--compute", "false",        "--role=worker", NULL};
        dsd_opts_defaults(&o);
        assert_int_equal(dsd_opts_parse(&o, 11, av, &cfg, &err), 0);
        assert_string_equal(cfg, "/dev/null");
        assert_string_equal(o.model, "/srv/m");
        assert_int_equal(o.max_jobs, 3);
        assert_int_equal(o.max_context, 1024);
        assert_false(o.compute);
        assert_string_equal(o.role, "worker");
        char *av2[] = {"dsd", "--config=/dev/null", "--model=/srv/other", NULL};
        assert_int_equal(dsd_opts_parse(&o, 3, av2, &cfg, &err), 0);
        assert_string_equal(o.model, "/srv/other");
        /* refusals name the argument */
        char *bad1[] = {"dsd", "--config=/dev/null", "--no-such-option=1", NULL};
        assert_int_equal(dsd_opts_parse(&o, 3, bad1, &cfg, &err), -EINVAL);
        assert_non_null(strstr(err.msg, "--no-such-option=1"));
        assert_non_null(strstr(err.msg, "unknown option"));
        char *bad2[] = {"dsd", "--config=/dev/null", "--model", NULL};
        assert_int_equal(dsd_opts_parse(&o, 3, bad2, &cfg, &err), -EINVAL);
        assert_non_null(strstr(err.msg, "needs a value"));
        char *bad3[] = {"dsd", "--config=/dev/null", "stray", NULL};
        assert_int_equal(dsd_opts_parse(&o, 3, bad3, &cfg, &err), -EINVAL);
        assert_non_null(strstr(err.msg, "'stray'"));
        char *bad4[] = {"dsd", "--config=/dev/null", "--max-jobs", "0", NULL};
        assert_int_equal(dsd_opts_parse(&o, 4, bad4, &cfg, &err), -ERANGE);
        /* --version prints and says so (1, like --help) */
        char *ver[] = {"dsd", "--version", NULL};
        assert_int_equal(dsd_opts_parse(&o, 2, ver, &cfg, &err), 1);
    }
    /* a bad line names file and line */
    FILE *f = fopen(path, "w");
    fputs("role = worker\nthis is not an option line\n", f);
    fclose(f);
    dsd_opts_defaults(&o);
    assert_int_equal(dsd_opts_load_file(&o, path, &err), -EINVAL);
    assert_non_null(strstr(err.msg, ":2:"));
    unlink(path);
    /* reload applies only reloadable options */
    dsd_opts cur, next;
    dsd_opts_defaults(&cur);
    next = cur;
    next.heartbeat_ms = 777;
    snprintf(next.role, sizeof(next.role), "worker");
    dsd_opts_apply_reload(&cur, &next);
    assert_int_equal(cur.heartbeat_ms, 777);
    assert_string_equal(cur.role, "coordinator");
    /* worker without coordinator is refused */
    dsd_opts_defaults(&o);
    snprintf(o.role, sizeof(o.role), "worker");
    snprintf(o.node, sizeof(o.node), "n1");
    assert_int_equal(dsd_opts_check(&o, &err), -EINVAL);
}

static void test_unit_names(void **state)
{
    (void)state;
    enum ds_unit_kind k;
    uint32_t l, e;
    assert_int_equal(ds_unit_parse("expert[3][17]", &k, &l, &e), 0);
    assert_int_equal(k, DS_UNIT_EXPERT);
    assert_int_equal(l, 3);
    assert_int_equal(e, 17);
    assert_int_equal(ds_unit_parse("attn[2]", &k, &l, &e), 0);
    assert_int_equal(k, DS_UNIT_ATTN);
    assert_int_equal(l, 2);
    assert_int_equal(ds_unit_parse("head", &k, &l, &e), 0);
    assert_int_equal(k, DS_UNIT_HEAD);
    assert_int_equal(ds_unit_parse("attn[2]x", &k, &l, &e), -EINVAL);
    assert_int_equal(ds_unit_parse("expert[1]", &k, &l, &e), -EINVAL);
    assert_int_equal(ds_unit_parse("", &k, &l, &e), -EINVAL);
}

static void test_plan_spreads_units(void **state)
{
    (void)state;
    ds_model *m;
    ds_error err = {0};
    assert_int_equal(ds_model_open(DS_TEST_DATA "/ref/v3_bf16", NULL, &m, &err), 0);
    const ds_model_config *c = ds_model_get_config(m);
    char names[3][64] = {"coord", "w1", "w2"};
    char eps[3][DSD_STR_MAX] = {"tcp://a:1", "tcp://b:1", "tcp://c:1"};
    dsd_plan p;
    assert_int_equal(dsd_plan_build(&p, c, 3, (const char(*)[64])names,
                                    (const char(*)[DSD_STR_MAX])eps, true, 1),
                     0);
    /* every node hosts at least one expert; attention goes to workers first */
    int experts[3] = {0};
    for (uint32_t l = 0; l < p.n_layers; l++)
        for (uint32_t e = 0; e < p.n_experts; e++) {
            int32_t h = p.expert[l * p.n_experts + e];
            assert_true(ds_model_config_layer_is_moe(c, l) ? h >= 0 && h < 3 : h == -1);
            if (h >= 0)
                experts[h]++;
        }
    for (int i = 0; i < 3; i++)
        assert_true(experts[i] > 0);
    assert_int_equal(p.attn[0], 1);
    assert_int_equal(p.attn[1], 2);
    /* extra copies of a hot expert on the two other nodes (as the solver's replicas) */
    uint32_t hl = 1, he = 0; /* layer 1 is MoE in v3_bf16 */
    assert_true(ds_model_config_layer_is_moe(c, hl));
    int32_t prim = p.expert[hl * p.n_experts + he];
    for (uint32_t n = 0; n < 3; n++)
        if ((int32_t)n != prim)
            p.replicas[hl * p.n_experts + he] |= 1ull << n;
    /* nodes are found in a plan by name; one that joined after it was made (during a solve)
     * is not in it, and is never taken for node 0 (the coordinator) */
    for (uint32_t node = 0; node < 3; node++)
        assert_int_equal(dsd_plan_node_index(&p, names[node]), (int32_t)node);
    assert_int_equal(dsd_plan_node_index(&p, "late-joiner"), -1);
    assert_int_equal(dsd_plan_node_index(&p, ""), -1);
    /* wire round trip: each node gets exactly its units, replicas included */
    Dsd__Plan w;
    assert_int_equal(dsd_plan_to_wire(&p, &w), 0);
    for (uint32_t node = 0; node < 3; node++) {
        dsd_units a, b;
        assert_int_equal(dsd_plan_units_of(&p, node, &a), 0);
        assert_int_equal(dsd_plan_units_from_wire(&w, names[node], c, &b, &err), 0);
        assert_int_equal(a.embed, b.embed);
        assert_int_equal(a.head, b.head);
        assert_memory_equal(a.attn, b.attn, p.n_layers * sizeof(bool));
        assert_memory_equal(a.expert, b.expert, (size_t)p.n_layers * p.n_experts * sizeof(bool));
        assert_true(a.expert[hl * p.n_experts + he]); /* every node holds the hot expert */
        dsd_units_clear(&a);
        dsd_units_clear(&b);
    }
    /* the whole plan back from the wire: primaries and replica sets unchanged */
    dsd_plan q;
    assert_int_equal(dsd_plan_from_wire(&w, c, &q, &err), 0);
    assert_int_equal(q.n_nodes, 3);
    assert_memory_equal(q.attn, p.attn, p.n_layers * sizeof(int32_t));
    assert_memory_equal(q.expert, p.expert, (size_t)p.n_layers * p.n_experts * sizeof(int32_t));
    assert_memory_equal(q.replicas, p.replicas,
                        (size_t)p.n_layers * p.n_experts * sizeof(uint64_t));
    char *pj = dsd_plan_json(&q);
    assert_non_null(strstr(pj, "\"replicas\":{\"expert[1][0]\":["));
    free(pj);
    dsd_plan_clear(&q);
    /* a unit the model does not have is refused */
    char *saved = w.units[1]->unit;
    w.units[1]->unit = "expert[0][99]";
    dsd_units u;
    assert_int_equal(dsd_plan_units_from_wire(&w, "w1", c, &u, &err), -EPROTO);
    w.units[1]->unit = saved;
    dsd_plan_wire_clear(&w);
    dsd_plan_clear(&p);
    ds_model_free(m);
}

/* ---- attention / embed / head on a device: plan_pin through the solver, the plan's wire and
 * JSON forms, and each node's units ------------------------------------------------------- */

static void test_plan_unit_devices(void **state)
{
    (void)state;
    ds_model *m;
    ds_error err = {0};
    assert_int_equal(ds_model_open(DS_TEST_DATA "/ref/v3_bf16", NULL, &m, &err), 0);
    const ds_model_config *c = ds_model_get_config(m);
    char names[2][64] = {"coord", "w1"};
    char eps[2][DSD_STR_MAX] = {"tcp://a:1", "tcp://b:1"};
    const char *spec =
        "{\"nodes\":[{\"name\":\"coord\",\"class\":\"server\",\"devices\":["
        "{\"name\":\"cpu0\",\"kind\":\"cpu\",\"class\":\"server\",\"memory_bytes\":1000000000,"
        "\"mem_bw_bytes_per_s\":1e10,\"flops\":1e11},"
        "{\"name\":\"opencl0\",\"kind\":\"gpu\",\"class\":\"gpu\",\"memory_bytes\":1000000000,"
        "\"mem_bw_bytes_per_s\":1e11,\"flops\":1e12}]},"
        "{\"name\":\"w1\",\"class\":\"server\",\"devices\":["
        "{\"name\":\"cpu0\",\"kind\":\"cpu\",\"class\":\"server\",\"memory_bytes\":1000000000,"
        "\"mem_bw_bytes_per_s\":1e10,\"flops\":1e11}]}]}";
    dsd_plan p;
    /* attention, embed and head pinned to coord/opencl0, every expert to w1's CPU */
    int rc = dsd_plan_solve(&p, c, spec, 2, (const char(*)[64])names,
                            (const char(*)[DSD_STR_MAX])eps, "auto", 1, 16, NULL, NULL,
                            "attn[*]=coord/opencl0, embed=coord/opencl0,head=coord/opencl0,"
                            "expert[*][*]=w1/cpu0",
                            1, &err);
    if (rc < 0)
        fail_msg("solve: %s", ds_error_str(&err));
    uint8_t dev = dsd_plan_dev_index(&p, "opencl0");
    assert_true(dev > 0);
    assert_int_equal(p.embed, 0);
    assert_int_equal(p.embed_dev, dev);
    assert_int_equal(p.head_dev, dev);
    for (uint32_t l = 0; l < p.n_layers; l++) {
        assert_int_equal(p.attn[l], 0);
        assert_int_equal(p.attn_dev[l], dev);
        for (uint32_t e = 0; ds_model_config_layer_is_moe(c, l) && e < p.n_experts; e++) {
            assert_int_equal(p.expert[l * p.n_experts + e], 1);
            assert_int_equal(p.expert_dev[l * p.n_experts + e], 0); /* the CPU engine */
        }
    }
    char *pj = dsd_plan_json(&p);
    assert_non_null(strstr(pj, "\"attn[0]\":\"opencl0\""));
    assert_non_null(strstr(pj, "\"head\":\"opencl0\""));
    free(pj);
    /* the wire carries node/device for them; the coordinator's units name the device */
    Dsd__Plan w;
    assert_int_equal(dsd_plan_to_wire(&p, &w), 0);
    dsd_plan q;
    assert_int_equal(dsd_plan_from_wire(&w, c, &q, &err), 0);
    uint8_t qd = dsd_plan_dev_index(&q, "opencl0");
    assert_true(qd > 0);
    assert_int_equal(q.embed_dev, qd);
    assert_int_equal(q.head_dev, qd);
    for (uint32_t l = 0; l < q.n_layers; l++)
        assert_int_equal(q.attn_dev[l], qd);
    dsd_units u;
    assert_int_equal(dsd_plan_units_of(&q, 0, &u), 0);
    assert_true(u.embed && u.head && u.embed_dev == qd && u.head_dev == qd);
    for (uint32_t l = 0; l < q.n_layers; l++)
        assert_true(u.attn[l] && u.attn_dev[l] == qd);
    assert_string_equal(u.dev_names[qd], "opencl0");
    dsd_units_clear(&u);
    assert_int_equal(dsd_plan_units_of(&q, 1, &u), 0); /* w1: experts only, on its CPU */
    assert_true(!u.embed && !u.head && !u.attn[0]);
    dsd_units_clear(&u);
    dsd_plan_clear(&q);
    dsd_plan_wire_clear(&w);
    dsd_plan_clear(&p);
    /* malformed pins are refused with the entry named */
    const char *bad[] = {"attn[0]", "attn[0]=opencl0", "=coord/cpu0", "expert[9][*]=w1/cpu0"};
    for (int i = 0; i < 4; i++) {
        ds_error e2 = {0};
        assert_int_equal(dsd_plan_solve(&p, c, spec, 2, (const char(*)[64])names,
                                        (const char(*)[DSD_STR_MAX])eps, "auto", 1, 16, NULL, NULL,
                                        bad[i], 1, &e2),
                         -EINVAL);
        assert_non_null(strstr(e2.msg, "plan_pin: bad entry"));
    }
    ds_model_free(m);
}

/* ---- a host's KV caches cover exactly its attention layers -------------------------------- */

static int all_pairs_on_host(void *ctx, uint32_t layer, const float *ffn_in, uint32_t n,
                             const int32_t *ids, const float *weights, float *out, ds_error *err)
{
    dsd_host *h = ctx;
    uint32_t K = ds_model_get_config(dsd_host_model(h))->num_experts_per_tok;
    uint32_t *pr = malloc((size_t)n * K * 4), *pe = malloc((size_t)n * K * 4);
    (void)weights;
    for (uint32_t i = 0; pr && pe && i < n * K; i++) {
        pr[i] = i / K;
        pe[i] = (uint32_t)ids[i];
    }
    Dsd__ErrorCode code = 0;
    double cs;
    int rc = pr && pe ? dsd_host_experts(h, layer, n, ffn_in, n * K, pr, pe, out, &cs, &code, err)
                      : -ENOMEM;
    free(pr);
    free(pe);
    return rc < 0 ? rc : DS_LAYER_DONE;
}

static size_t heap_bytes(void)
{
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
}

/* A worker hosting attn[1] alone of models/tiny's 4 layers: after a 500-token prefill through
 * that layer, each sequence holds one KV cache (layer 1) and the heap grew by one layer's
 * cache (512 positions x (kv_lora_rank + qk_rope_head_dim) floats), not by four. */
static void test_host_kv_hosted_layers_only(void **state)
{
    (void)state;
    const char *dir = DS_TEST_DATA "/../../models/tiny";
    ds_model *probe;
    ds_error err = {0};
    assert_int_equal(ds_model_open(dir, NULL, &probe, &err), 0);
    const ds_model_config *c = ds_model_get_config(probe);
    uint32_t L = c->num_hidden_layers, E = c->n_routed_experts, D = c->hidden_size;
    assert_int_equal(L, 4);
    assert_true(ds_model_config_layer_is_moe(c, 1));
    dsd_units u = {0};
    u.n_layers = L;
    u.n_experts = E;
    u.attn = calloc(L, sizeof(bool));
    u.expert = calloc((size_t)L * E, sizeof(bool));
    u.attn[1] = true;
    for (uint32_t e = 0; e < E; e++)
        u.expert[1 * E + e] = true;
    dsd_host *h;
    assert_int_equal(dsd_host_new(dir, &u, 1, 512, &h, &err), 0);
    dsd_units_clear(&u);
    assert_int_equal(dsd_host_kv_layers(h), 1);
    const uint32_t P = 500;
    uint64_t *seq = malloc(P * sizeof(uint64_t));
    uint32_t *pos = malloc(P * sizeof(uint32_t));
    int *slots = malloc(P * sizeof(int));
    int32_t *tok = malloc(P * sizeof(int32_t));
    for (uint32_t i = 0; i < P; i++) {
        seq[i] = 42;
        pos[i] = i;
        tok[i] = (int32_t)(i % c->vocab_size);
    }
    ds_layer_step *st;
    assert_int_equal(
        ds_layer_step_new(dsd_host_model(h), dsd_host_pool(h), dsd_host_seqs(h), P, &st, &err), 0);
    /* layer 1's input: the embedded tokens (any rows do: the KV written is what is counted) */
    assert_int_equal(ds_unit_embed(probe, NULL, tok, P, ds_layer_step_x(st), &err), 0);
    size_t before = heap_bytes();
    Dsd__ErrorCode code = 0;
    /* layer 0 is not hosted here: refused */
    assert_int_equal(dsd_host_rows(h, 0, P, seq, pos, slots, &code, &err), -EINVAL);
    assert_int_equal(code, DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT);
    assert_int_equal(dsd_host_rows(h, 1, P, seq, pos, slots, &code, &err), 0);
    assert_int_equal(ds_layer_step_set_rows(st, P, slots, pos), 0);
    assert_int_equal(ds_layer_step_run(st, 1, &(ds_expert_runner_ops){all_pairs_on_host}, h, &err),
                     DS_LAYER_DONE);
    for (size_t i = 0; i < (size_t)P * D; i++)
        assert_true(isfinite(ds_layer_step_x(st)[i]));
    size_t grown = heap_bytes() - before;
    ds_seqs *sq = dsd_host_seqs(h);
    assert_int_equal(ds_seqs_count(sq), 1);
    assert_int_equal(ds_seqs_len(sq, slots[0], 1), P);
    for (uint32_t l = 0; l < L; l++)
        if (l != 1)
            assert_null(ds_seqs_kv(sq, slots[0], l));
    size_t one_layer = (size_t)512 * (c->kv_lora_rank + c->qk_rope_head_dim) * sizeof(float);
#if defined(__SANITIZE_ADDRESS__)
    (void)grown; /* ASan's allocator does not report through mallinfo2 */
    (void)one_layer;
#else
    assert_true(grown >= one_layer);
    assert_true(grown < 2 * one_layer); /* every layer's cache would be 4 x one_layer */
#endif
    /* the job ends: its caches go */
    dsd_host_release(h, 42);
    assert_int_equal(ds_seqs_count(sq), 0);
    ds_layer_step_free(st);
    free(seq);
    free(pos);
    free(slots);
    free(tok);
    dsd_host_free(h);
    ds_model_free(probe);
}

/* ---- the loader: a plan's units opened on a thread, signalled over an eventfd ------------ */

static void wait_loader(dsd_loader *l)
{
    struct pollfd pf = {.fd = dsd_loader_fd(l), .events = POLLIN};
    assert_int_equal(poll(&pf, 1, 60000), 1); /* the loop would keep polling meanwhile */
    assert_true(dsd_loader_done(l));
}

static void test_loader_thread(void **state)
{
    (void)state;
    ds_model *m;
    ds_error err = {0};
    assert_int_equal(ds_model_open(DS_TEST_DATA "/ref/v3_bf16", NULL, &m, &err), 0);
    const ds_model_config *c = ds_model_get_config(m);
    char names[2][64] = {"coord", "w1"};
    char eps[2][DSD_STR_MAX] = {"tcp://a:1", "tcp://b:1"};
    dsd_plan p;
    assert_int_equal(dsd_plan_build(&p, c, 2, (const char(*)[64])names,
                                    (const char(*)[DSD_STR_MAX])eps, true, 7),
                     0);
    /* node 1's units of the plan, opened off the caller's thread */
    dsd_loader *l;
    assert_int_equal(dsd_loader_start(DS_TEST_DATA "/ref/v3_bf16", &p, 1, 1, 64, &l, &err), 0);
    dsd_plan_clear(&p); /* the loader has its own copy */
    wait_loader(l);
    assert_int_equal(dsd_loader_plan(l)->version, 7);
    assert_int_equal(dsd_loader_self(l), 1);
    dsd_host *h = NULL;
    assert_int_equal(dsd_loader_take(l, &h, &err), 0);
    assert_non_null(h);
    for (uint32_t layer = 0; layer < c->num_hidden_layers; layer++)
        assert_int_equal(dsd_host_has_attn(h, layer), dsd_loader_plan(l)->attn[layer] == 1);
    dsd_host_free(h);
    dsd_loader_free(l);
    /* a checkpoint that cannot be opened: the error comes back through take */
    assert_int_equal(dsd_plan_build(&p, c, 2, (const char(*)[64])names,
                                    (const char(*)[DSD_STR_MAX])eps, true, 8),
                     0);
    assert_int_equal(dsd_loader_start("/nonexistent/model", &p, 1, 1, 64, &l, &err), 0);
    dsd_plan_clear(&p);
    wait_loader(l);
    h = NULL;
    assert_true(dsd_loader_take(l, &h, &err) < 0);
    assert_null(h);
    assert_non_null(strstr(ds_error_str(&err), "/nonexistent/model"));
    dsd_loader_free(l);
    /* freed before it signalled: waits for the open, frees its units */
    assert_int_equal(dsd_plan_build(&p, c, 2, (const char(*)[64])names,
                                    (const char(*)[DSD_STR_MAX])eps, true, 9),
                     0);
    assert_int_equal(dsd_loader_start(DS_TEST_DATA "/ref/v3_bf16", &p, 0, 1, 64, &l, &err), 0);
    dsd_plan_clear(&p);
    assert_null(dsd_loader_free(l));
    ds_model_free(m);
}

/* ---- bad peers against a live daemon ------------------------------------------------------ */

static Dsd__Envelope *ask(void *s, const void *data, size_t len, int more_frames, const void *frame,
                          size_t flen)
{
    zmq_send(s, data, len, more_frames ? ZMQ_SNDMORE : 0);
    if (more_frames)
        zmq_send(s, frame, flen, 0);
    static uint8_t buf[1 << 16];
    int n = zmq_recv(s, buf, sizeof(buf), 0);
    if (n <= 0)
        return NULL;
    return dsd__envelope__unpack(NULL, (size_t)n, buf);
}

static void *dealer(void *ctx, const char *ep, const char *id)
{
    void *s = zmq_socket(ctx, ZMQ_DEALER);
    int zero = 0, tmo = 20000;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof(zero));
    zmq_setsockopt(s, ZMQ_RCVTIMEO, &tmo, sizeof(tmo));
    if (id)
        zmq_setsockopt(s, ZMQ_ROUTING_ID, id, strlen(id));
    zmq_connect(s, ep);
    return s;
}

static size_t pack(Dsd__Envelope *e, uint32_t version, uint8_t *buf)
{
    e->protocol_version = version;
    return dsd__envelope__pack(e, buf);
}

static void expect_error(Dsd__Envelope *r, Dsd__ErrorCode code)
{
    assert_non_null(r);
    assert_int_equal(r->body_case, DSD__ENVELOPE__BODY_ERROR);
    assert_int_equal(r->error->code, code);
    dsd__envelope__free_unpacked(r, NULL);
}

static void test_bad_peers(void **state)
{
    (void)state;
    struct dsd_proc p;
    assert_int_equal(dsd_spawn(&p, NULL, NULL), 0);
    void *ctx = zmq_ctx_new();
    /* wait (bounded) until it serves: on a loaded machine start-up can take seconds */
    {
        static uint8_t b[256];
        Dsd__Envelope qe = DSD__ENVELOPE__INIT;
        Dsd__StatusRequest sr = DSD__STATUS_REQUEST__INIT;
        sr.what = "status";
        qe.body_case = DSD__ENVELOPE__BODY_STATUS_REQUEST;
        qe.status_request = &sr;
        size_t bn = pack(&qe, DS_PROTOCOL_VERSION, b);
        bool up = false;
        for (int i = 0; i < 60 && !up; i++) {
            void *q = dealer(ctx, p.client_ep, NULL);
            int tmo = 500;
            zmq_setsockopt(q, ZMQ_RCVTIMEO, &tmo, sizeof(tmo));
            Dsd__Envelope *r = ask(q, b, bn, 0, NULL, 0);
            up = r && r->body_case == DSD__ENVELOPE__BODY_STATUS_REPLY &&
                 strstr(r->status_reply->json, "\"state\":\"serving\"");
            if (r)
                dsd__envelope__free_unpacked(r, NULL);
            zmq_close(q);
            if (!up)
                dsd_sleep_ms(100);
        }
        assert_true(up);
    }
    void *ctl = dealer(ctx, p.control_ep, "intruder"), *dat = dealer(ctx, p.data_ep, NULL);
    static uint8_t buf[1 << 16];
    /* wrong protocol version */
    Dsd__Envelope e = DSD__ENVELOPE__INIT;
    Dsd__Hello h = DSD__HELLO__INIT;
    h.node = "intruder";
    h.data_endpoint = "tcp://127.0.0.1:1";
    e.body_case = DSD__ENVELOPE__BODY_HELLO;
    e.hello = &h;
    size_t n = pack(&e, 7, buf);
    expect_error(ask(ctl, buf, n, 0, NULL, 0), DSD__ERROR_CODE__ERROR_CODE_VERSION);
    /* garbled frame */
    expect_error(ask(ctl, "\x0a\xff\xff\xff\xff\x0f", 6, 0, NULL, 0),
                 DSD__ERROR_CODE__ERROR_CODE_MALFORMED);
    /* oversized message (over DS_WIRE_MAX_ENVELOPE_BYTES) */
    size_t big_len = DS_WIRE_MAX_ENVELOPE_BYTES + 16;
    uint8_t *big = calloc(1, big_len);
    expect_error(ask(dat, big, big_len, 0, NULL, 0), DSD__ERROR_CODE__ERROR_CODE_TOO_LARGE);
    free(big);
    /* a step for a layer that does not exist on this model / node */
    Dsd__Envelope se = DSD__ENVELOPE__INIT;
    Dsd__StepHeader sh = DSD__STEP_HEADER__INIT;
    Dsd__TensorDesc td = DSD__TENSOR_DESC__INIT, *tdp = &td;
    uint32_t shape[2] = {1, 64};
    uint64_t seq = 1;
    uint32_t pos = 0;
    td.dtype = DSD__DTYPE__DTYPE_F32;
    td.n_shape = 2;
    td.shape = shape;
    sh.plan_version = 1;
    sh.layer = 57;
    sh.n_seq_ids = 1;
    sh.seq_ids = &seq;
    sh.n_positions = 1;
    sh.positions = &pos;
    se.body_case = DSD__ENVELOPE__BODY_STEP;
    se.step = &sh;
    se.n_tensor_frames = 1;
    se.n_tensors = 1;
    se.tensors = &tdp;
    float row[64] = {0};
    n = pack(&se, DS_PROTOCOL_VERSION, buf);
    expect_error(ask(dat, buf, n, 1, row, sizeof(row)), DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT);
    /* a frame whose size does not match its descriptor */
    sh.layer = 0;
    n = pack(&se, DS_PROTOCOL_VERSION, buf);
    expect_error(ask(dat, buf, n, 1, row, 10), DSD__ERROR_CODE__ERROR_CODE_MALFORMED);
    /* a dispatch for an expert id out of range */
    Dsd__Envelope de = DSD__ENVELOPE__INIT;
    Dsd__DispatchHeader dh = DSD__DISPATCH_HEADER__INIT;
    uint32_t pr = 0, pe = 4000;
    float pw = 1;
    dh.plan_version = 1;
    dh.layer = 1;
    dh.rows = 1;
    dh.n_pair_rows = dh.n_pair_experts = dh.n_pair_weights = 1;
    dh.pair_rows = &pr;
    dh.pair_experts = &pe;
    dh.pair_weights = &pw;
    de.body_case = DSD__ENVELOPE__BODY_DISPATCH;
    de.dispatch = &dh;
    de.n_tensor_frames = 1;
    de.n_tensors = 1;
    de.tensors = &tdp;
    n = pack(&de, DS_PROTOCOL_VERSION, buf);
    expect_error(ask(dat, buf, n, 1, row, sizeof(row)), DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT);
    /* more pairs than rows x num_experts_per_tok (2 in v3_bf16): one row, three hosted
     * experts, each valid alone; refused as malformed instead of being run */
    uint32_t pr3[3] = {0, 0, 0}, pe3[3] = {0, 1, 2};
    float pw3[3] = {1, 1, 1};
    dh.n_pair_rows = dh.n_pair_experts = dh.n_pair_weights = 3;
    dh.pair_rows = pr3;
    dh.pair_experts = pe3;
    dh.pair_weights = pw3;
    n = pack(&de, DS_PROTOCOL_VERSION, buf);
    expect_error(ask(dat, buf, n, 1, row, sizeof(row)), DSD__ERROR_CODE__ERROR_CODE_MALFORMED);
    /* an absurd pair count (2 M pairs for one row: 512 MiB of output rows) is refused from the
     * header alone, before anything is allocated for it */
    {
        const uint32_t NP = 2000000;
        uint32_t *hr = calloc(NP, sizeof(uint32_t)), *he = calloc(NP, sizeof(uint32_t));
        float *hw = calloc(NP, sizeof(float));
        assert_true(hr && he && hw);
        dh.n_pair_rows = dh.n_pair_experts = dh.n_pair_weights = NP;
        dh.pair_rows = hr;
        dh.pair_experts = he;
        dh.pair_weights = hw;
        de.protocol_version = DS_PROTOCOL_VERSION;
        size_t hn = dsd__envelope__get_packed_size(&de);
        assert_true(hn < DS_WIRE_MAX_ENVELOPE_BYTES); /* the envelope itself is acceptable */
        uint8_t *hb = malloc(hn);
        assert_non_null(hb);
        assert_int_equal(pack(&de, DS_PROTOCOL_VERSION, hb), hn);
        expect_error(ask(dat, hb, hn, 1, row, sizeof(row)), DSD__ERROR_CODE__ERROR_CODE_MALFORMED);
        free(hb);
        free(hr);
        free(he);
        free(hw);
        assert_int_equal(dsd_log_count(&p, "2000000 pairs for 1 rows, at most 2 per row"), 1);
    }
    /* a heartbeat from a node that never said hello */
    Dsd__Envelope he = DSD__ENVELOPE__INIT;
    Dsd__Heartbeat hb = DSD__HEARTBEAT__INIT;
    he.body_case = DSD__ENVELOPE__BODY_HEARTBEAT;
    he.heartbeat = &hb;
    n = pack(&he, DS_PROTOCOL_VERSION, buf);
    expect_error(ask(ctl, buf, n, 0, NULL, 0), DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_UNIT);
    /* a cancel for an unknown job on the client socket */
    void *cli = dealer(ctx, p.client_ep, NULL);
    Dsd__Envelope ce = DSD__ENVELOPE__INIT;
    Dsd__Cancel cc = DSD__CANCEL__INIT;
    cc.job = 424242;
    ce.body_case = DSD__ENVELOPE__BODY_CANCEL;
    ce.cancel = &cc;
    n = pack(&ce, DS_PROTOCOL_VERSION, buf);
    expect_error(ask(cli, buf, n, 0, NULL, 0), DSD__ERROR_CODE__ERROR_CODE_UNKNOWN_JOB);
    /* still serving: a status request gets an answer */
    Dsd__Envelope qe = DSD__ENVELOPE__INIT;
    Dsd__StatusRequest sr = DSD__STATUS_REQUEST__INIT;
    sr.what = "status";
    qe.body_case = DSD__ENVELOPE__BODY_STATUS_REQUEST;
    qe.status_request = &sr;
    n = pack(&qe, DS_PROTOCOL_VERSION, buf);
    Dsd__Envelope *r = ask(cli, buf, n, 0, NULL, 0);
    assert_non_null(r);
    assert_int_equal(r->body_case, DSD__ENVELOPE__BODY_STATUS_REPLY);
    assert_non_null(strstr(r->status_reply->json, "\"state\":\"serving\""));
    dsd__envelope__free_unpacked(r, NULL);
    zmq_close(ctl);
    zmq_close(dat);
    zmq_close(cli);
    zmq_ctx_term(ctx);
    assert_true(dsd_alive(&p));
    assert_true(dsd_log_count(&p, "refused") >= 9);
    assert_int_equal(dsd_stop(&p), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_options_table),     cmocka_unit_test(test_example_config_complete),
        cmocka_unit_test(test_unit_names),        cmocka_unit_test(test_plan_spreads_units),
        cmocka_unit_test(test_plan_unit_devices), cmocka_unit_test(test_host_kv_hosted_layers_only),
        cmocka_unit_test(test_loader_thread),     cmocka_unit_test(test_bad_peers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
