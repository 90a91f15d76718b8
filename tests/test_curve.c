/* test_curve.c — CURVE on the daemon side against real dsd processes: the key file format
 * (common/ds_keyfile.c); a coordinator with a cluster key and curve_authorized_keys serves an
 * authorized libdsclient client (tokens equal to `dsctl generate --local`), gives a plain
 * client and a client with an unlisted key pair no reply (the refusal is logged and counted);
 * a group/world-readable or malformed secret key file stops dsd at start with a message naming
 * the file; a worker holding the cluster key joins, serves a plan over both nodes (control
 * and data sockets under CURVE) and generates the same tokens, and one holding another key is
 * refused; with curve_operator_keys, only an operator key may replan or drain. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>

#include <cmocka.h>
#include <zmq.h>

#include "ds_client.h"
#include "ds_keyfile.h"
#include "client_expect.h"
#include "cluster/dsd_spawn.h"

#define KEY_LEN (DS_KEY_Z85_LEN + 1)

static struct dsd_proc g_dsd;
static struct dsd_proc g_worker; /* slot 1; stopped by teardown too when a test fails */
static char g_dir[128];          /* key files of this run */
static char g_cluster_file[200]; /* the cluster key pair */
static char g_cluster_pub[KEY_LEN];
static char g_client_pub[KEY_LEN], g_client_sec[KEY_LEN]; /* listed in authorized_keys */
static char g_other_pub[KEY_LEN], g_other_sec[KEY_LEN];   /* not listed */

static int local_tokens(const char *prompt, int n, uint32_t *out)
{
    char args[256];
    snprintf(args, sizeof(args), "--tokens %s", prompt);
    return dsd_local_ids(args, n, out);
}

static void path_in_dir(char *out, size_t size, const char *name)
{
    snprintf(out, size, "%s/%s", g_dir, name);
}

static int write_text(const char *path, const char *text, mode_t mode)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fputs(text, f);
    fclose(f);
    return chmod(path, mode);
}

static void dump_log(const struct dsd_proc *p)
{
    fprintf(stderr, "--- %s\n", p->log);
    FILE *f = fopen(p->log, "r");
    char line[1024];
    while (f && fgets(line, sizeof(line), f))
        fputs(line, stderr);
    if (f)
        fclose(f);
}

/* key: NULL = plain TCP; else the client's pair (pub, sec) with the cluster key as server key */
static int connect_as(const char *pub, const char *sec, int timeout_ms, ds_client **c)
{
    ds_client_opts o = {.timeout_ms = timeout_ms};
    if (pub) {
        o.server_public_key = g_cluster_pub;
        o.public_key = pub;
        o.secret_key = sec;
    }
    return ds_client_connect(g_dsd.client_ep, &o, c);
}

/* The coordinator's status as an authorized client sees it (malloc'd), or NULL. */
static char *status_json(int timeout_ms)
{
    ds_client *c = NULL;
    char *js = NULL;
    if (connect_as(g_client_pub, g_client_sec, timeout_ms, &c) == 0 &&
        ds_client_status(c, "status", &js) < 0) {
        free(js);
        js = NULL;
    }
    ds_client_close(c);
    return js;
}

/* Waits (bounded) until the status contains every needle. */
static bool wait_status(const char *const *needles, int tries)
{
    for (int i = 0; i < tries; i++) {
        char *js = status_json(300);
        bool all = js != NULL;
        for (int k = 0; all && needles[k]; k++)
            all = strstr(js, needles[k]) != NULL;
        free(js);
        if (all)
            return true;
        dsd_sleep_ms(50);
    }
    return false;
}

/* Waits (bounded) for a daemon that should refuse to start; returns its exit status, or -1 when
 * it is still running after 20 s (then stopped). The log is kept for the caller. */
static int wait_exit(struct dsd_proc *p)
{
    for (int i = 0; i < 400; i++) {
        int st;
        if (waitpid(p->pid, &st, WNOHANG) == p->pid) {
            p->pid = 0;
            return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        }
        dsd_sleep_ms(50);
    }
    dsd_stop(p);
    return -1;
}

static int setup(void **state)
{
    (void)state;
    snprintf(g_dir, sizeof(g_dir), "/tmp/dsd-curve-%d", (int)getpid());
    if (mkdir(g_dir, 0700) < 0 && errno != EEXIST)
        return -1;
    char sec[KEY_LEN], auth[200], text[512];
    ds_error err = {0};
    path_in_dir(g_cluster_file, sizeof(g_cluster_file), "cluster.key");
    unlink(g_cluster_file);
    if (!zmq_has("curve") || zmq_curve_keypair(g_cluster_pub, sec) < 0 ||
        zmq_curve_keypair(g_client_pub, g_client_sec) < 0 ||
        zmq_curve_keypair(g_other_pub, g_other_sec) < 0 ||
        ds_keyfile_write(g_cluster_file, g_cluster_pub, sec, &err) < 0) {
        fprintf(stderr, "keys: %s\n", ds_error_str(&err));
        return -1;
    }
    /* a comment, a commented-out key, then the client's key with a trailing comment */
    path_in_dir(auth, sizeof(auth), "authorized_keys");
    snprintf(text, sizeof(text), "# clients of the test cluster\n#%s\n\n%s  # the test client\n",
             g_other_pub, g_client_pub);
    if (write_text(auth, text, 0644) < 0)
        return -1;
    char a1[300], a2[300];
    snprintf(a1, sizeof(a1), "--curve_secret_key_file=%s", g_cluster_file);
    snprintf(a2, sizeof(a2), "--curve_authorized_keys=%s", auth);
    if (dsd_spawn(&g_dsd,
                  (const char *const[]){"--model=" DS_TEST_DATA "/../../models/tiny",
                                        "--plan_strategy=round-robin", a1, a2, NULL},
                  NULL) < 0)
        return -1;
    if (wait_status((const char *const[]){"\"state\":\"serving\"", NULL}, 200))
        return 0;
    fprintf(stderr, "dsd did not reach serving\n");
    dump_log(&g_dsd);
    return -1;
}

static int teardown(void **state)
{
    (void)state;
    dsd_stop(&g_worker);
    int rc = dsd_stop(&g_dsd);
    char p[200];
    const char *names[] = {"cluster.key", "authorized_keys", "open.key",
                           "bad.key",     "other.key",       "rt.key"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        path_in_dir(p, sizeof(p), names[i]);
        unlink(p);
    }
    rmdir(g_dir);
    return rc == 0 ? 0 : -1;
}

static void test_keyfile_format(void **state)
{
    (void)state;
    char path[200], pub[KEY_LEN], sec[KEY_LEN], p2[KEY_LEN], s2[KEY_LEN];
    ds_error err = {0};
    path_in_dir(path, sizeof(path), "rt.key");
    unlink(path);
    assert_int_equal(zmq_curve_keypair(pub, sec), 0);
    assert_int_equal(ds_keyfile_write(path, pub, sec, &err), 0);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    assert_int_equal(ds_keyfile_write(path, pub, sec, &err), -EEXIST); /* never overwritten */
    assert_int_equal(ds_keyfile_read(path, true, p2, s2, &err), 0);
    assert_string_equal(p2, pub);
    assert_string_equal(s2, sec);
    /* readable by others: refused when the secret matters, fine for a public key */
    assert_int_equal(chmod(path, 0640), 0);
    assert_int_equal(ds_keyfile_read(path, true, p2, s2, &err), -EACCES);
    assert_non_null(strstr(err.msg, path));
    assert_non_null(strstr(err.msg, "0640"));
    assert_int_equal(ds_keyfile_read(path, false, p2, s2, &err), 0);
    assert_string_equal(p2, pub);
    unlink(path);
    /* a short key, an unknown name, a line without '=': refused naming the file and line */
    const char *bad[] = {"public = abc\n", "# c\nprivate = x\n", "\nsecret\n", "# only\n"};
    const char *where[] = {":1:", ":2:", ":2:", path};
    for (int i = 0; i < 4; i++) {
        assert_int_equal(write_text(path, bad[i], 0600), 0);
        ds_error_clear(&err);
        assert_int_equal(ds_keyfile_read(path, false, p2, s2, &err), -EBADMSG);
        assert_non_null(strstr(err.msg, path));
        assert_non_null(strstr(err.msg, where[i]));
        unlink(path);
    }
    assert_true(ds_key_is_z85(pub));
    assert_false(ds_key_is_z85("abc"));
    char bad_char[KEY_LEN];
    memcpy(bad_char, pub, KEY_LEN);
    bad_char[3] = ' ';
    assert_false(ds_key_is_z85(bad_char));
}

/* (a) an authorized key pair: status, and tokens equal to the in-process engine's */
static void test_authorized_client_generates(void **state)
{
    (void)state;
    uint32_t want[12];
    assert_int_equal(local_tokens("5,6,7", 12, want), 12);
    ds_client *c = NULL;
    assert_int_equal(connect_as(g_client_pub, g_client_sec, 20000, &c), 0);
    char *js = NULL;
    assert_int_equal(ds_client_status(c, "status", &js), 0);
    assert_non_null(strstr(js, "\"coordinator\":\"solo\""));
    assert_non_null(strstr(js, "\"curve_refused\":"));
    free(js);
    static const uint32_t prompt[] = {5, 6, 7};
    expect_stream(c, prompt, 3, want, 12);
    ds_client_close(c);
}

/* (b) no CURVE at all: the handshake never completes, no reply */
static void test_plain_client_gets_no_reply(void **state)
{
    (void)state;
    ds_client *c = NULL;
    char *js = NULL;
    assert_int_equal(connect_as(NULL, NULL, 1000, &c), 0);
    assert_int_equal(ds_client_status(c, "status", &js), -ETIMEDOUT);
    assert_null(js);
    ds_client_close(c);
}

/* (c) a key pair not in curve_authorized_keys (and an ephemeral one): no reply, the daemon
 * logs the refused key and counts it */
static void test_unlisted_key_refused(void **state)
{
    (void)state;
    char needle[128];
    snprintf(needle, sizeof(needle), "curve: refused key %s", g_other_pub);
    int before = dsd_log_count(&g_dsd, needle);
    ds_client *c = NULL;
    char *js = NULL;
    assert_int_equal(connect_as(g_other_pub, g_other_sec, 1000, &c), 0);
    assert_int_equal(ds_client_status(c, "status", &js), -ETIMEDOUT);
    assert_null(js);
    ds_client_close(c);
    assert_true(dsd_log_count(&g_dsd, needle) > before);
    ds_client_opts o = {.timeout_ms = 1000, .server_public_key = g_cluster_pub};
    assert_int_equal(ds_client_connect(g_dsd.client_ep, &o, &c), 0); /* ephemeral pair */
    assert_int_equal(ds_client_status(c, "status", &js), -ETIMEDOUT);
    ds_client_close(c);
    /* counted, and the coordinator still serves the authorized client */
    js = status_json(5000);
    assert_non_null(js);
    const char *n = strstr(js, "\"curve_refused\":");
    assert_non_null(n);
    assert_true(strtol(n + strlen("\"curve_refused\":"), NULL, 10) >= 2);
    free(js);
}

/* Starts dsd in slot 1 with key_file as its cluster key and expects it to exit non-zero at
 * start with a message that names the file and contains `what`. */
static void expect_start_refused(const char *key_file, const char *what)
{
    struct dsd_proc p;
    char a1[300];
    snprintf(a1, sizeof(a1), "--curve_secret_key_file=%s", key_file);
    assert_int_equal(dsd_spawn_at(&p, 1, (const char *const[]){"--node=refused", a1, NULL}, NULL),
                     0);
    int st = wait_exit(&p);
    if (st <= 0 || !dsd_log_count(&p, key_file) || !dsd_log_count(&p, what))
        dump_log(&p);
    assert_true(st > 0);
    assert_true(dsd_log_count(&p, key_file) > 0);
    assert_true(dsd_log_count(&p, what) > 0);
    dsd_cleanup_files(&p);
}

/* (d) a secret key file readable by group/others, or malformed, stops dsd at start */
static void test_bad_secret_file_refused(void **state)
{
    (void)state;
    char path[200], text[256], pub[KEY_LEN], sec[KEY_LEN];
    assert_int_equal(zmq_curve_keypair(pub, sec), 0);
    snprintf(text, sizeof(text), "public = %s\nsecret = %s\n", pub, sec);
    path_in_dir(path, sizeof(path), "open.key");
    assert_int_equal(write_text(path, text, 0644), 0);
    expect_start_refused(path, "mode 0644");
    path_in_dir(path, sizeof(path), "bad.key");
    assert_int_equal(write_text(path, "public = tooshort\nsecret = tooshort\n", 0600), 0);
    expect_start_refused(path, "not 40 Z85 characters");
    /* a public line that does not belong to the secret */
    snprintf(text, sizeof(text), "public = %s\nsecret = %s\n", g_cluster_pub, sec);
    unlink(path);
    assert_int_equal(write_text(path, text, 0600), 0);
    expect_start_refused(path, "is not the one of the secret key");
}

/* A worker holding another key pair never joins (and still stops cleanly); a client key is
 * refused on the control socket; a worker with the cluster key joins over CURVE (control) and,
 * after a replan, the plan runs over both nodes (data DEALERs/ROUTERs under CURVE) with the
 * same tokens. */
static void test_two_nodes(void **state)
{
    (void)state;
    char other[200], text[256], a1[300], a2[300];
    path_in_dir(other, sizeof(other), "other.key");
    snprintf(text, sizeof(text), "public = %s\nsecret = %s\n", g_other_pub, g_other_sec);
    assert_int_equal(write_text(other, text, 0600), 0);
    snprintf(a2, sizeof(a2), "--coordinator=%s", g_dsd.control_ep);

    /* another key pair as its cluster key: its handshake with the coordinator fails (wrong
     * server key), it never joins, and it still stops on SIGTERM */
    struct dsd_proc *w = &g_worker;
    snprintf(a1, sizeof(a1), "--curve_secret_key_file=%s", other);
    assert_int_equal(
        dsd_spawn_at(w, 1,
                     (const char *const[]){"--role=worker", "--node=intruder", a1, a2,
                                           "--model=" DS_TEST_DATA "/../../models/tiny", NULL},
                     NULL),
        0);
    dsd_sleep_ms(1500);
    assert_true(dsd_alive(w));
    char *js = status_json(5000);
    assert_non_null(js);
    assert_null(strstr(js, "intruder"));
    free(js);
    assert_int_equal(dsd_stop(w), 0);
    /* a client that knows the cluster public key cannot pose as a node: its (authorized)
     * client key is refused on the control socket (ZAP domain "cluster") */
    char needle[160];
    snprintf(needle, sizeof(needle), "curve: refused key %s from 127.0.0.1 on the cluster socket",
             g_client_pub);
    ds_client *c = NULL;
    ds_client_opts o = {.timeout_ms = 1000,
                        .server_public_key = g_cluster_pub,
                        .public_key = g_client_pub,
                        .secret_key = g_client_sec};
    assert_int_equal(ds_client_connect(g_dsd.control_ep, &o, &c), 0);
    js = NULL;
    assert_int_equal(ds_client_status(c, "status", &js), -ETIMEDOUT);
    ds_client_close(c);
    assert_true(dsd_log_count(&g_dsd, needle) > 0);

    snprintf(a1, sizeof(a1), "--curve_secret_key_file=%s", g_cluster_file);
    assert_int_equal(
        dsd_spawn_at(w, 1,
                     (const char *const[]){"--role=worker", "--node=w1", a1, a2,
                                           "--model=" DS_TEST_DATA "/../../models/tiny", NULL},
                     NULL),
        0);
    if (!wait_status((const char *const[]){"\"name\":\"w1\"", NULL}, 200)) {
        dump_log(w);
        dump_log(&g_dsd);
        fail_msg("the worker with the cluster key did not join");
    }
    assert_int_equal(connect_as(g_client_pub, g_client_sec, 20000, &c), 0);
    /* (auto_replan may already have taken w1 in; this replan's version is in its reply) */
    js = NULL;
    int rc = ds_client_replan(c, &js);
    assert_int_equal(rc, 0);
    unsigned long long pv = 0;
    assert_int_equal(sscanf(js, "{\"plan_version\":%llu}", &pv), 1);
    free(js);
    char want_pv[48];
    snprintf(want_pv, sizeof(want_pv), "\"plan_version\":%llu", pv);
    if (!wait_status((const char *const[]){want_pv, "\"state\":\"serving\"", NULL}, 400)) {
        dump_log(w);
        dump_log(&g_dsd);
        fail_msg("no plan over both nodes");
    }
    /* the plan really uses the worker */
    js = NULL;
    assert_int_equal(ds_client_status(c, "placement", &js), 0);
    assert_non_null(strstr(js, "\"w1\""));
    free(js);
    uint32_t want[12];
    assert_int_equal(local_tokens("5,6,7", 12, want), 12);
    static const uint32_t prompt[] = {5, 6, 7};
    expect_stream(c, prompt, 3, want, 12);
    ds_client_close(c);
    assert_int_equal(dsd_log_count(w, "curve: refused"), 0);
    assert_int_equal(dsd_stop(w), 0);
}

/* (f) roles: a coordinator with curve_operator_keys = the "other" key (not in
 * curve_authorized_keys): the listed client may read status and generate but not replan or
 * drain (-EPERM, the reply says why); the operator key may connect and replan; nobody may
 * drain the coordinator. */
static void test_operator_role(void **state)
{
    (void)state;
    char ops[200], auth[200], text[128], a1[300], a2[300], a3[300];
    path_in_dir(ops, sizeof(ops), "operator_keys");
    path_in_dir(auth, sizeof(auth), "authorized_keys");
    snprintf(text, sizeof(text), "%s # the operator\n", g_other_pub);
    assert_int_equal(write_text(ops, text, 0644), 0);
    snprintf(a1, sizeof(a1), "--curve_secret_key_file=%s", g_cluster_file);
    snprintf(a2, sizeof(a2), "--curve_authorized_keys=%s", auth);
    snprintf(a3, sizeof(a3), "--curve_operator_keys=%s", ops);
    struct dsd_proc *p = &g_worker;
    assert_int_equal(dsd_spawn_at(p, 1,
                                  (const char *const[]){
                                      "--node=roles", "--model=" DS_TEST_DATA "/../../models/tiny",
                                      "--plan_strategy=round-robin", a1, a2, a3, NULL},
                                  NULL),
                     0);
    ds_client_opts o = {.timeout_ms = 20000,
                        .server_public_key = g_cluster_pub,
                        .public_key = g_client_pub,
                        .secret_key = g_client_sec};
    ds_client *user = NULL, *op = NULL;
    assert_int_equal(ds_client_connect(p->client_ep, &o, &user), 0);
    char *js = NULL;
    for (int i = 0; i < 200; i++) { /* serving */
        free(js);
        js = NULL;
        if (ds_client_status(user, "status", &js) == 0 && strstr(js, "\"state\":\"serving\""))
            break;
        dsd_sleep_ms(50);
    }
    assert_non_null(strstr(js, "\"state\":\"serving\""));
    free(js);
    js = NULL;
    assert_int_equal(ds_client_replan(user, &js), -EPERM);
    assert_non_null(strstr(ds_client_error(user), "needs an operator key"));
    assert_int_equal(ds_client_drain(user, "roles", false, &js), -EPERM);
    uint32_t want[8];
    assert_int_equal(local_tokens("5,6,7", 8, want), 8);
    static const uint32_t prompt[] = {5, 6, 7};
    expect_stream(user, prompt, 3, want, 8); /* a client may still generate */
    o.public_key = g_other_pub;
    o.secret_key = g_other_sec;
    assert_int_equal(ds_client_connect(p->client_ep, &o, &op), 0);
    int rc = -EBUSY;
    for (int i = 0; i < 100 && rc == -EBUSY; i++) /* the job just ended may still count */
        if ((rc = ds_client_replan(op, &js)) == -EBUSY)
            dsd_sleep_ms(50);
    assert_int_equal(rc, 0);
    assert_non_null(strstr(js, "\"plan_version\":2"));
    free(js);
    js = NULL;
    assert_int_equal(ds_client_drain(op, "roles", false, &js), -EINVAL);
    assert_non_null(strstr(ds_client_error(op), "is the coordinator"));
    ds_client_close(user);
    ds_client_close(op);
    assert_true(dsd_log_count(p, "without the operator role") >= 2);
    assert_int_equal(dsd_stop(p), 0);
    unlink(ops);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keyfile_format),
        cmocka_unit_test(test_authorized_client_generates),
        cmocka_unit_test(test_plain_client_gets_no_reply),
        cmocka_unit_test(test_unlisted_key_refused),
        cmocka_unit_test(test_bad_secret_file_refused),
        cmocka_unit_test(test_two_nodes),
        cmocka_unit_test(test_operator_role),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
