/* ds_log.h — leveled logging to stderr; under systemd (stderr connected to the journal) each
 * line carries a syslog "<N>" priority prefix so journald records the level. */
#ifndef DS_LOG_H
#define DS_LOG_H

#include <stdarg.h>

enum ds_log_level {
    DS_LOG_ERR = 3,
    DS_LOG_WARNING = 4,
    DS_LOG_NOTICE = 5,
    DS_LOG_INFO = 6,
    DS_LOG_DEBUG = 7,
};

/* Messages above this level are dropped. Default DS_LOG_INFO, or $DS_LOG_LEVEL (a number or
 * err/warning/notice/info/debug). */
void ds_log_set_level(enum ds_log_level level);
enum ds_log_level ds_log_get_level(void);
/* Parses "err".."debug" or "3".."7"; returns -EINVAL when unknown. */
int ds_log_level_parse(const char *s, enum ds_log_level *out);

void ds_log(enum ds_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void ds_logv(enum ds_log_level level, const char *fmt, va_list ap);

#define ds_log_err(...) ds_log(DS_LOG_ERR, __VA_ARGS__)
#define ds_log_warn(...) ds_log(DS_LOG_WARNING, __VA_ARGS__)
#define ds_log_notice(...) ds_log(DS_LOG_NOTICE, __VA_ARGS__)
#define ds_log_info(...) ds_log(DS_LOG_INFO, __VA_ARGS__)
#define ds_log_debug(...) ds_log(DS_LOG_DEBUG, __VA_ARGS__)

#endif
