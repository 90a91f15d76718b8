/* dsd_spawn.h — start a real single-node dsd coordinator for the daemon/client tests and stop
 * it (SIGTERM, bounded wait, then SIGKILL). Header-only so each test stays one binary.
 * A test process may run DSD_SPAWN_SLOTS daemons at once (dsd_spawn_at: slot 0 is what
 * dsd_spawn starts); each slot has its own ports, state directory and log. */
#ifndef DSD_SPAWN_H
#define DSD_SPAWN_H

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define DSD_SPAWN_SLOTS 2 /* 3 ports a slot within the 8 reserved per test pid */

struct dsd_proc {
    pid_t pid;
    int base_port;
    char client_ep[64], control_ep[64], data_ep[64], state_dir[128], log[160];
};

static inline void dsd_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Starts dsd in slot (0 .. DSD_SPAWN_SLOTS-1). extra: NULL-terminated list of additional
 * --key=value arguments (later ones win, so they may override the defaults below). env_kv:
 * "K=V" or NULL. */
static inline int dsd_spawn_at(struct dsd_proc *p, int slot, const char *const *extra,
                               const char *env_kv)
{
    memset(p, 0, sizeof(*p));
    if (slot < 0 || slot >= DSD_SPAWN_SLOTS)
        return -1;
    /* 10000..19599: below the script tests' block (tests/cluster/lib.sh, 20000..) and below
     * Linux's ephemeral range (32768..), so no client connection holds the port */
    p->base_port = 10000 + (int)(getpid() % 1200) * 8 + slot * 3;
    snprintf(p->control_ep, sizeof(p->control_ep), "tcp://127.0.0.1:%d", p->base_port);
    snprintf(p->client_ep, sizeof(p->client_ep), "tcp://127.0.0.1:%d", p->base_port + 1);
    snprintf(p->data_ep, sizeof(p->data_ep), "tcp://127.0.0.1:%d", p->base_port + 2);
    if (slot == 0) {
        snprintf(p->state_dir, sizeof(p->state_dir), "/tmp/dsd-test-%d", (int)getpid());
        snprintf(p->log, sizeof(p->log), "/tmp/dsd-test-%d.log", (int)getpid());
    } else {
        snprintf(p->state_dir, sizeof(p->state_dir), "/tmp/dsd-test-%d-%d", (int)getpid(), slot);
        snprintf(p->log, sizeof(p->log), "/tmp/dsd-test-%d-%d.log", (int)getpid(), slot);
    }
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        char a[8][300];
        snprintf(a[0], 300, "--control_bind=%s", p->control_ep);
        snprintf(a[1], 300, "--client_bind=%s", p->client_ep);
        snprintf(a[2], 300, "--data_bind=%s", p->data_ep);
        snprintf(a[3], 300, "--state_dir=%s", p->state_dir);
        snprintf(a[4], 300, "--model=%s/ref/v3_bf16", DS_TEST_DATA);
        const char *argv[32] = {DS_BINARY_ROOT "/daemon/dsd",
                                "--node=solo",
                                "--threads=1",
                                "--heartbeat_ms=100",
                                "--calibrate=false",
                                "--discover_opencl=false",
                                "--http_bind=", /* no HTTP port: parallel tests would share it */
                                a[0],
                                a[1],
                                a[2],
                                a[3],
                                a[4]};
        int n = 12;
        for (int i = 0; extra && extra[i] && n < 30; i++)
            argv[n++] = extra[i];
        argv[n] = NULL;
        if (env_kv)
            putenv((char *)env_kv);
        FILE *f = freopen(p->log, "w", stderr);
        (void)f;
        execv(argv[0], (char **)argv);
        _exit(127);
    }
    p->pid = pid;
    return 0;
}

/* extra: NULL-terminated list of additional --key=value arguments. env_kv: "K=V" or NULL. */
static inline int dsd_spawn(struct dsd_proc *p, const char *const *extra, const char *env_kv)
{
    return dsd_spawn_at(p, 0, extra, env_kv);
}

static inline void dsd_cleanup_files(const struct dsd_proc *p)
{
    char f[200];
    snprintf(f, sizeof(f), "%s/plan.json", p->state_dir);
    unlink(f);
    rmdir(p->state_dir);
    unlink(p->log);
}

/* Returns the exit status (or -signal). Removes the state directory and the log. */
static inline int dsd_stop(struct dsd_proc *p)
{
    if (p->pid <= 0)
        return 0;
    kill(p->pid, SIGTERM);
    int st = 0;
    for (int i = 0; i < 100; i++) {
        if (waitpid(p->pid, &st, WNOHANG) == p->pid) {
            p->pid = 0;
            dsd_cleanup_files(p);
            return WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
        }
        dsd_sleep_ms(50);
    }
    kill(p->pid, SIGKILL);
    waitpid(p->pid, &st, 0);
    p->pid = 0;
    dsd_cleanup_files(p);
    return -SIGKILL;
}

/* 1 when the child is still running. */
static inline int dsd_alive(struct dsd_proc *p)
{
    int st;
    return p->pid > 0 && waitpid(p->pid, &st, WNOHANG) == 0;
}

/* Counts lines of the daemon log that contain needle. */
static inline int dsd_log_count(const struct dsd_proc *p, const char *needle)
{
    FILE *f = fopen(p->log, "r");
    if (!f)
        return 0;
    char line[1024];
    int n = 0;
    while (fgets(line, sizeof(line), f))
        n += strstr(line, needle) != NULL;
    fclose(f);
    return n;
}

/* Token ids from the in-process engine (independent of the daemon): `dsctl generate --local`
 * on models/tiny with `args` (a --tokens list or a quoted text prompt); returns how many. */
static inline int dsd_local_ids(const char *args, int n, uint32_t *out)
{
    char cmd[768];
    snprintf(cmd, sizeof(cmd),
             "%s/client/dsctl generate --local --model %s/../../models/tiny --max-tokens %d "
             "--threads 1 %s",
             DS_BINARY_ROOT, DS_TEST_DATA, n, args);
    FILE *f = popen(cmd, "r");
    if (!f)
        return -1;
    char line[4096], last[4096] = "";
    while (fgets(line, sizeof(line), f))
        snprintf(last, sizeof(last), "%s", line);
    pclose(f);
    if (strncmp(last, "tokens: ", 8))
        return -1;
    int k = 0;
    for (char *p = last + 8; *p && *p != '\n' && k < n;) {
        out[k++] = (uint32_t)strtoul(p, &p, 10);
        if (*p == ',')
            p++;
    }
    return k;
}


#endif
