/* ds_log.c — stderr logging with journald priority prefixes; see ds_log.h.
 * One fprintf per line keeps lines whole when threads log at once (stdio locks the stream). */
#include "ds_log.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

static atomic_int log_level = -1;
static atomic_int log_to_journal = -1;

static const char *level_names[] = {
    [DS_LOG_ERR] = "err",     [DS_LOG_WARNING] = "warning", [DS_LOG_NOTICE] = "notice",
    [DS_LOG_INFO] = "info",   [DS_LOG_DEBUG] = "debug",
};

int ds_log_level_parse(const char *s, enum ds_log_level *out)
{
    if (!s)
        return -EINVAL;
    for (int l = DS_LOG_ERR; l <= DS_LOG_DEBUG; l++) {
        if (strcmp(s, level_names[l]) == 0 || (s[0] == '0' + l && s[1] == '\0')) {
            *out = (enum ds_log_level)l;
            return 0;
        }
    }
    if (strcmp(s, "error") == 0 || strcmp(s, "warn") == 0) {
        *out = s[0] == 'e' ? DS_LOG_ERR : DS_LOG_WARNING;
        return 0;
    }
    return -EINVAL;
}

void ds_log_set_level(enum ds_log_level level)
{
    atomic_store(&log_level, (int)level);
}

enum ds_log_level ds_log_get_level(void)
{
    int l = atomic_load(&log_level);
    if (l < 0) {
        enum ds_log_level parsed = DS_LOG_INFO;
        if (ds_log_level_parse(getenv("DS_LOG_LEVEL"), &parsed) < 0)
            parsed = DS_LOG_INFO;
        l = (int)parsed;
        atomic_store(&log_level, l);
    }
    return (enum ds_log_level)l;
}

/* stderr is the journal when $JOURNAL_STREAM names its device:inode (systemd.exec(5)). */
static int stderr_is_journal(void)
{
    int j = atomic_load(&log_to_journal);
    if (j >= 0)
        return j;
    j = 0;
    const char *e = getenv("JOURNAL_STREAM");
    struct stat st;
    unsigned long long dev, ino;
    if (e && sscanf(e, "%llu:%llu", &dev, &ino) == 2 && fstat(2, &st) == 0)
        j = (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
    atomic_store(&log_to_journal, j);
    return j;
}

void ds_logv(enum ds_log_level level, const char *fmt, va_list ap)
{
    if ((int)level > (int)ds_log_get_level())
        return;
    char line[2048];
    vsnprintf(line, sizeof(line), fmt, ap);
    if (stderr_is_journal()) {
        fprintf(stderr, "<%d>%s\n", (int)level, line);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        struct tm tm;
        localtime_r(&ts.tv_sec, &tm);
        fprintf(stderr, "%02d:%02d:%02d.%03ld %-7s %s\n", tm.tm_hour, tm.tm_min, tm.tm_sec,
                ts.tv_nsec / 1000000, level_names[level], line);
    }
}

void ds_log(enum ds_log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    ds_logv(level, fmt, ap);
    va_end(ap);
}
