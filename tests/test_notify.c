/* test_notify.c — the systemd notify protocol against a real NOTIFY_SOCKET this test listens
 * on: dsd (a coordinator alone, which serves as soon as its own units are loaded) must send
 * STATUS lines, READY=1 once serving, and WATCHDOG=1 keep-alives when WATCHDOG_USEC is set, in
 * that order: no READY before a STATUS, no WATCHDOG before READY; then SIGHUP gives
 * RELOADING=1 followed by READY=1, and SIGTERM a clean exit 0. */
#include <setjmp.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cmocka.h>

#include "cluster/dsd_spawn.h"

static void test_ready_status_watchdog(void **state)
{
    (void)state;
    char path[108];
    snprintf(path, sizeof(path), "/tmp/dsd-notify-%d.sock", (int)getpid());
    unlink(path);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    static char env1[160], env2[64];
    snprintf(env1, sizeof(env1), "NOTIFY_SOCKET=%s", path);
    snprintf(env2, sizeof(env2), "WATCHDOG_USEC=200000"); /* 0.2 s: keep-alives every 0.1 s */
    putenv(env2);
    struct dsd_proc p;
    assert_int_equal(dsd_spawn(&p, NULL, env1), 0);
    unsetenv("WATCHDOG_USEC");
    int seen_status = -1, seen_ready = -1, seen_wd = -1, n_wd = 0;
    /* until READY and 3 keep-alives after it (bounded: 400 messages or 6 receive timeouts of
     * 10 s: a loaded machine can take a while to start a daemon) */
    for (int i = 0, idle = 0; i < 400 && n_wd < 3 && idle < 6; i++) {
        char buf[1024];
        ssize_t n = recv(fd, buf, sizeof(buf) - 1, 0);
        if (n <= 0) {
            idle++;
            continue;
        }
        buf[n] = 0;
        if (!strncmp(buf, "STATUS=", 7) && seen_status < 0)
            seen_status = i;
        if (strstr(buf, "READY=1") && seen_ready < 0)
            seen_ready = i;
        if (strstr(buf, "WATCHDOG=1")) {
            if (seen_wd < 0)
                seen_wd = i;
            n_wd += seen_ready >= 0;
        }
    }
    /* SIGHUP: reload, announced as RELOADING=1 then READY=1 (only once it is READY: before
     * that its signal handling may not be set up yet) */
    assert_true(seen_ready >= 0);
    kill(p.pid, SIGHUP);
    int seen_reloading = -1, seen_ready2 = -1;
    for (int i = 0; i < 400 && seen_ready2 < 0; i++) {
        char buf[1024];
        ssize_t n = recv(fd, buf, sizeof(buf) - 1, 0);
        if (n <= 0)
            break;
        buf[n] = 0;
        if (strstr(buf, "RELOADING=1") && seen_reloading < 0)
            seen_reloading = i;
        if (strstr(buf, "READY=1") && seen_reloading >= 0)
            seen_ready2 = i;
    }
    assert_true(seen_reloading >= 0);
    assert_true(seen_ready2 > seen_reloading);
    assert_true(dsd_log_count(&p, "signal") == 0); /* SIGHUP did not stop it */
    int st = dsd_stop(&p);
    close(fd);
    unlink(path);
    assert_int_equal(st, 0); /* clean shutdown on SIGTERM */
    assert_true(seen_status >= 0);
    assert_true(seen_ready > seen_status);
    assert_true(n_wd >= 3);
    assert_true(seen_wd >= 0);
}

/* Long work is visible (daemon/dsd_progress.c): a coordinator alone pages in its units before
 * READY=1, announcing the load in STATUS (100% of the bytes at the end) and extending its
 * start timeout (EXTEND_TIMEOUT_USEC) while it progresses; its journal line, written before
 * READY, counts exactly the tensor bytes of the checkpoint (the safetensors file less its
 * header: it hosts every unit). */
static void test_load_progress(void **state)
{
    (void)state;
    char path[108];
    snprintf(path, sizeof(path), "/tmp/dsd-notify-p-%d.sock", (int)getpid());
    unlink(path);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    static char env1[160];
    snprintf(env1, sizeof(env1), "NOTIFY_SOCKET=%s", path);
    struct dsd_proc p;
    assert_int_equal(dsd_spawn(&p, NULL, env1), 0);
    int seen_extend = -1, seen_full = -1, seen_ready = -1;
    for (int i = 0, idle = 0; i < 400 && seen_ready < 0 && idle < 6; i++) {
        char buf[1024];
        ssize_t n = recv(fd, buf, sizeof(buf) - 1, 0);
        if (n <= 0) {
            idle++;
            continue;
        }
        buf[n] = 0;
        if (strstr(buf, "EXTEND_TIMEOUT_USEC=") && seen_extend < 0)
            seen_extend = i;
        if (strstr(buf, "STATUS=loading: paging in weights 100%") && seen_full < 0)
            seen_full = i;
        if (strstr(buf, "READY=1"))
            seen_ready = i;
    }
    assert_true(seen_ready >= 0);
    assert_true(seen_extend >= 0 && seen_extend < seen_ready);
    assert_true(seen_full >= 0 && seen_full < seen_ready);
    /* the bytes: the file's data section (safetensors: u64 header length, header, data) */
    FILE *f = fopen(DS_TEST_DATA "/ref/v3_bf16/model.safetensors", "rb");
    assert_non_null(f);
    uint64_t hl = 0;
    assert_int_equal(fread(&hl, 8, 1, f), 1);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    char want[96];
    snprintf(want, sizeof(want), "paging in weights: ");
    char bytes[48];
    unsigned long long data = (unsigned long long)(size - 8 - (long)hl);
    snprintf(bytes, sizeof(bytes), "(100%%: %llu of %llu bytes)", data, data);
    f = fopen(p.log, "r");
    assert_non_null(f);
    char line[512];
    bool found = false;
    while (fgets(line, sizeof(line), f))
        found |= strstr(line, want) && strstr(line, bytes);
    fclose(f);
    int st = dsd_stop(&p); /* removes the log */
    close(fd);
    unlink(path);
    assert_int_equal(st, 0);
    if (!found)
        fail_msg("no '%s...%s' line in the log", want, bytes);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_ready_status_watchdog),
                                       cmocka_unit_test(test_load_progress)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
