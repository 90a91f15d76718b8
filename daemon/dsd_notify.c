/* dsd_notify.c — the systemd notify protocol (READY, STATUS, WATCHDOG) through libsystemd.
 * sd_notify is a no-op when NOTIFY_SOCKET is unset, so the daemon calls it unconditionally. */
#include <stdarg.h>
#include <stdio.h>

#include <systemd/sd-daemon.h>

#include "dsd.h"

void dsd_notify(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    sd_notify(0, buf);
}
