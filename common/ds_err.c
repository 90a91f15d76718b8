/* ds_err.c — the error record; see ds_err.h. */
#include "ds_err.h"

#include <stdio.h>
#include <string.h>

int ds_error_set(ds_error *err, int code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        err->code = code;
        vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
        va_end(ap);
    }
    return code;
}

void ds_error_prefix(ds_error *err, const char *fmt, ...)
{
    if (!err)
        return;
    char head[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(head, sizeof(head), fmt, ap);
    va_end(ap);
    char old[sizeof(err->msg)];
    memcpy(old, err->msg, sizeof(old));
    snprintf(err->msg, sizeof(err->msg), "%s: %s", head, old);
}

void ds_error_clear(ds_error *err)
{
    if (err) {
        err->code = 0;
        err->msg[0] = '\0';
    }
}

const char *ds_error_str(const ds_error *err)
{
    if (!err)
        return "unknown error";
    if (err->msg[0])
        return err->msg;
    return err->code ? strerror(-err->code) : "no error";
}
