/* ds_keyfile.c — CURVE key files (ds_keyfile.h). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ds_keyfile.h"

static const char Z85[] = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                          ".-:+=^!/*?&<>()[]{}@%$#";

bool ds_key_is_z85(const char *s)
{
    size_t n = strlen(s);
    return n == DS_KEY_Z85_LEN && strspn(s, Z85) == n;
}

char *ds_trim(char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    char *e = s + strlen(s);
    while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' || e[-1] == '\r'))
        *--e = 0;
    return s;
}

int ds_keyfile_read(const char *path, bool need_secret, char *pub, char *sec, ds_error *err)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return ds_error_set(err, -errno, "%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        return ds_error_set(err, -e, "%s: %s", path, strerror(e));
    }
    if (need_secret && (st.st_mode & 077)) {
        close(fd);
        return ds_error_set(err, -EACCES,
                            "%s: mode %04o lets group or others read the secret key; "
                            "chmod 600 it (and keep it owned by the daemon's user)",
                            path, (unsigned)(st.st_mode & 07777));
    }
    FILE *f = fdopen(fd, "r");
    if (!f) {
        int e = errno;
        close(fd);
        return ds_error_set(err, -e, "%s: %s", path, strerror(e));
    }
    char p[DS_KEY_Z85_LEN + 1] = "", s[DS_KEY_Z85_LEN + 1] = "", line[256];
    unsigned ln = 0;
    int rc = 0;
    while (rc == 0 && fgets(line, sizeof(line), f)) {
        ln++;
        if (!strchr(line, '\n') && !feof(f)) {
            rc = ds_error_set(err, -EBADMSG, "%s:%u: line too long", path, ln);
            break;
        }
        char *l = ds_trim(line);
        if (!*l || *l == '#')
            continue;
        char *eq = strchr(l, '=');
        if (!eq) {
            rc = ds_error_set(err, -EBADMSG, "%s:%u: expected 'public = KEY' or 'secret = KEY'",
                              path, ln);
            break;
        }
        /* '=' is also a Z85 character: the key is everything after the first '=' */
        *eq = 0;
        char *k = ds_trim(l), *v = ds_trim(eq + 1);
        char *dst = !strcmp(k, "public") ? p : !strcmp(k, "secret") ? s : NULL;
        if (!dst)
            rc = ds_error_set(err, -EBADMSG, "%s:%u: unknown key '%s' (public or secret)", path, ln,
                              k);
        else if (!ds_key_is_z85(v))
            rc = ds_error_set(err, -EBADMSG,
                              "%s:%u: %s key is not %d Z85 characters (dsctl keygen makes one)",
                              path, ln, k, DS_KEY_Z85_LEN);
        else
            memcpy(dst, v, DS_KEY_Z85_LEN + 1);
    }
    fclose(f);
    if (rc < 0)
        return rc;
    if (need_secret && !s[0])
        return ds_error_set(err, -EBADMSG, "%s: no 'secret = KEY' line", path);
    if (!p[0] && !s[0])
        return ds_error_set(err, -EBADMSG, "%s: no 'public = KEY' line", path);
    memcpy(pub, p, sizeof(p));
    memcpy(sec, s, sizeof(s));
    return 0;
}

int ds_keyfile_write(const char *path, const char *pub, const char *sec, ds_error *err)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return ds_error_set(err, -errno, "%s: %s", path, strerror(errno));
    char buf[160];
    int n = snprintf(buf, sizeof(buf),
                     "# CURVE key pair (dsctl keygen)\npublic = %s\nsecret = %s\n", pub, sec);
    int rc = 0;
    if (n < 0 || (size_t)n >= sizeof(buf) || write(fd, buf, (size_t)n) != n)
        rc = ds_error_set(err, -EIO, "%s: write: %s", path, strerror(errno));
    if (close(fd) < 0 && rc == 0)
        rc = ds_error_set(err, -EIO, "%s: close: %s", path, strerror(errno));
    if (rc < 0)
        unlink(path);
    return rc;
}
