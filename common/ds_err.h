/* ds_err.h — error conventions shared by every dsd module.
 *
 * Functions that act return int: 0 (or a positive count) on success, a negative errno on
 * failure. -EINVAL bad argument, -ENOMEM, -EPROTO bad wire message, -EBADMSG corrupt file,
 * -ENOENT missing thing, -ERANGE value past a limit, -ENOSPC does not fit.
 *
 * Where a caller needs to know *what* was wrong (which file, which tensor, which field), the
 * function also takes a `ds_error *` and fills its message; the message is written only on
 * failure and the caller logs it once, at the boundary. */
#ifndef DS_ERR_H
#define DS_ERR_H

#include <errno.h>
#include <stdarg.h>

typedef struct ds_error {
    int code;      /* negative errno, 0 when clear */
    char msg[512]; /* human-readable context: names the file/peer and the field */
} ds_error;

/* Records code and a printf-style message in err (when err is not NULL); returns code so a
 * caller can `return ds_error_set(err, -EBADMSG, "%s: ...", path);`. code must be negative. */
int ds_error_set(ds_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prepends "prefix: " to an error message already set (adds context as it travels up). */
void ds_error_prefix(ds_error *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Clears err. */
void ds_error_clear(ds_error *err);

/* The message of err, or strerror(-code) if no message was set. Never NULL. */
const char *ds_error_str(const ds_error *err);

#endif
