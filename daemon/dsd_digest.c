/* dsd_digest.c — what a node proves about its checkpoint copy at join: a digest, and that the
 * copy is whole.
 *
 * The digest folds, for config.json and every *.safetensors / *.gguf file of the checkpoint
 * (sorted by name; or the one file when `model` names a file): its name (in a directory), its
 * size, its header
 * (safetensors: the 8-byte length and the JSON tensor table; GGUF and others: the first MiB)
 * and DIGEST_SAMPLES blocks of DIGEST_BLOCK bytes spread evenly over the rest, with 64-bit
 * FNV-1a (common/ds_hash.h) — two chains with different seeds, printed as "fnv2x64:<32 hex>".
 * Reading a few hundred KiB per file keeps the check quick on a 700 GB checkpoint, and a
 * checkpoint with the same shapes but other weights differs in nearly every block, so two
 * nodes whose digests agree hold the same model. It is not a cryptographic proof against a
 * peer that forges a digest (CURVE authenticates nodes; see docs/operations.md).
 *
 * "Whole": a safetensors file whose tensor table reaches past the end of the file is
 * truncated (-EBADMSG naming the file and both sizes); the loader maps such a file lazily, so
 * without this check it fails only when a job touches the missing bytes. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "ds_hash.h"
#include "dsd.h"

#define DIGEST_SAMPLES    64
#define DIGEST_BLOCK      4096
#define DIGEST_HEAD_BYTES (1u << 20)
#define DIGEST_MAX_FILES  4096
#define ST_MAX_HEADER     (100u << 20) /* safetensors' own limit on the JSON header */

struct digest {
    uint64_t a, b;
};

static void fold(struct digest *d, const void *p, size_t n)
{
    d->a = ds_hash_fnv1a(d->a, p, n);
    /* the second chain sees every byte too, seeded apart and fed the length first */
    uint64_t len = n;
    d->b = ds_hash_fnv1a(d->b, &len, sizeof(len));
    d->b = ds_hash_fnv1a(d->b, p, n);
}

static int read_at(int fd, void *buf, size_t n, uint64_t off)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, (char *)buf + got, n - got, (off_t)(off + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return r < 0 ? -errno : -EBADMSG;
        got += (size_t)r;
    }
    return 0;
}

/* The end of a safetensors file's data according to its tensor table (8 + header + the
 * largest data_offsets end), or a negative errno with err naming the file. */
static int64_t st_data_end(const char *path, const char *hdr, size_t hlen, ds_error *err)
{
    json_error_t je;
    json_t *j = json_loadb(hdr, hlen, 0, &je);
    if (!json_is_object(j)) {
        json_decref(j);
        return ds_error_set(err, -EBADMSG, "%s: the tensor table is not JSON (%s)", path, je.text);
    }
    uint64_t end = 0;
    const char *k;
    json_t *v;
    json_object_foreach(j, k, v)
    {
        json_t *off = json_object_get(v, "data_offsets");
        if (!strcmp(k, "__metadata__") || !json_is_array(off))
            continue;
        json_int_t e = json_integer_value(json_array_get(off, 1));
        if (e > 0 && (uint64_t)e > end)
            end = (uint64_t)e;
    }
    json_decref(j);
    return (int64_t)(8 + hlen + end);
}

/* Folds one file into d; checks a safetensors file is whole. */
static int digest_file(struct digest *d, const char *path, const char *name, bool with_name,
                       ds_error *err)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return ds_error_set(err, -errno, "%s: %s", path, strerror(errno));
    struct stat st;
    char *buf = NULL;
    int rc = 0;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        rc = ds_error_set(err, -EBADMSG, "%s: not a regular file", path);
        goto out;
    }
    uint64_t size = (uint64_t)st.st_size, head = size < DIGEST_HEAD_BYTES ? size : 0;
    if (with_name) /* a checkpoint directory's file names are part of it, a lone file's not */
        fold(d, name, strlen(name) + 1);
    fold(d, &size, sizeof(size));
    size_t nl = strlen(name);
    if (nl > 12 && !strcmp(name + nl - 12, ".safetensors")) {
        uint64_t hlen = 0;
        uint8_t le[8];
        if (size < 8 || read_at(fd, le, 8, 0) < 0) {
            rc = ds_error_set(err, -EBADMSG, "%s: truncated: %llu bytes, no header", path,
                              (unsigned long long)size);
            goto out;
        }
        for (int i = 7; i >= 0; i--)
            hlen = hlen << 8 | le[i];
        if (hlen > ST_MAX_HEADER || 8 + hlen > size) {
            rc = ds_error_set(err, -EBADMSG,
                              "%s: truncated or corrupt: its header says %llu bytes of tensor "
                              "table, the file has %llu bytes",
                              path, (unsigned long long)hlen, (unsigned long long)size);
            goto out;
        }
        head = 8 + hlen;
    } else if (!head) {
        head = DIGEST_HEAD_BYTES;
    }
    if (!(buf = malloc(head > DIGEST_BLOCK ? head : DIGEST_BLOCK))) {
        rc = ds_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    if ((rc = read_at(fd, buf, head, 0)) < 0) {
        ds_error_set(err, rc, "%s: %s", path, strerror(-rc));
        goto out;
    }
    fold(d, buf, head);
    if (nl > 12 && !strcmp(name + nl - 12, ".safetensors")) {
        int64_t need = st_data_end(path, buf + 8, head - 8, err);
        if (need < 0) {
            rc = (int)need;
            goto out;
        }
        if ((uint64_t)need > size) {
            rc = ds_error_set(err, -EBADMSG,
                              "%s is truncated: %llu bytes, its tensor table needs %lld", path,
                              (unsigned long long)size, (long long)need);
            goto out;
        }
    }
    uint64_t rest = size - head;
    for (int s = 0; rest >= DIGEST_BLOCK && s < DIGEST_SAMPLES; s++) {
        uint64_t off = head + (rest - DIGEST_BLOCK) * (uint64_t)s / (DIGEST_SAMPLES - 1);
        if ((rc = read_at(fd, buf, DIGEST_BLOCK, off)) < 0) {
            ds_error_set(err, rc, "%s: %s", path, strerror(-rc));
            goto out;
        }
        fold(d, buf, DIGEST_BLOCK);
    }
    if (rest && rest < DIGEST_BLOCK) {
        if ((rc = read_at(fd, buf, rest, head)) < 0) {
            ds_error_set(err, rc, "%s: %s", path, strerror(-rc));
            goto out;
        }
        fold(d, buf, rest);
    }
out:
    free(buf);
    close(fd);
    return rc;
}

static bool digested(const char *name)
{
    size_t n = strlen(name);
    return !strcmp(name, "config.json") || (n > 12 && !strcmp(name + n - 12, ".safetensors")) ||
           (n > 5 && !strcmp(name + n - 5, ".gguf"));
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int dsd_digest_model(const char *model, char *out, size_t out_len, ds_error *err)
{
    struct digest d = {DS_HASH_FNV1A_INIT, DS_HASH_FNV1A_INIT ^ 0x9e3779b97f4a7c15ull};
    struct stat st;
    if (stat(model, &st) < 0)
        return ds_error_set(err, -errno, "%s: %s", model, strerror(errno));
    int rc = 0;
    if (S_ISREG(st.st_mode)) {
        const char *base = strrchr(model, '/');
        rc = digest_file(&d, model, base ? base + 1 : model, false, err);
    } else {
        DIR *dir = opendir(model);
        if (!dir)
            return ds_error_set(err, -errno, "%s: %s", model, strerror(errno));
        char **names = NULL;
        size_t n = 0, cap = 0;
        struct dirent *e;
        while (rc == 0 && (e = readdir(dir))) {
            if (!digested(e->d_name))
                continue;
            if (n >= DIGEST_MAX_FILES) {
                rc = ds_error_set(err, -E2BIG, "%s: more than %d model files", model,
                                  DIGEST_MAX_FILES);
                break;
            }
            if (n == cap) {
                cap = cap ? cap * 2 : 16;
                char **nn = realloc(names, cap * sizeof(*names));
                if (!nn) {
                    rc = ds_error_set(err, -ENOMEM, "out of memory");
                    break;
                }
                names = nn;
            }
            if (!(names[n] = strdup(e->d_name)))
                rc = ds_error_set(err, -ENOMEM, "out of memory");
            else
                n++;
        }
        closedir(dir);
        if (rc == 0 && n == 0)
            rc = ds_error_set(err, -ENOENT, "%s: no config.json, *.safetensors or *.gguf", model);
        if (rc == 0)
            qsort(names, n, sizeof(*names), cmp_names);
        for (size_t i = 0; rc == 0 && i < n; i++) {
            char path[PATH_MAX + 256];
            snprintf(path, sizeof(path), "%s/%s", model, names[i]);
            rc = digest_file(&d, path, names[i], true, err);
        }
        for (size_t i = 0; i < n; i++)
            free(names[i]);
        free(names);
    }
    if (rc < 0)
        return rc;
    snprintf(out, out_len, "fnv2x64:%016llx%016llx", (unsigned long long)d.a,
             (unsigned long long)d.b);
    return 0;
}

int dsd_state_dir_check(const char *dir, ds_error *err)
{
    char path[PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/.dsd-write-test", dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return ds_error_set(err, -errno, "state_dir %s cannot store files: %s", dir,
                            strerror(errno));
    int rc = write(fd, "ok\n", 3) == 3 ? 0 : -errno;
    if (close(fd) < 0 && rc == 0)
        rc = -errno;
    unlink(path);
    if (rc < 0)
        return ds_error_set(err, rc, "state_dir %s cannot store files: %s", dir, strerror(-rc));
    return 0;
}

int dsd_state_dir_lock(const char *dir, int *fd_out, ds_error *err)
{
    char path[PATH_MAX + 16];
    snprintf(path, sizeof(path), "%s/dsd.lock", dir);
    *fd_out = -1;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0640);
    if (fd < 0)
        return ds_error_set(err, -errno, "%s: %s", path, strerror(errno));
    if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
        int e = errno;
        char pid[32] = "";
        ssize_t r = pread(fd, pid, sizeof(pid) - 1, 0);
        if (r > 0)
            pid[strcspn(pid, "\n")] = 0;
        close(fd);
        if (e == EWOULDBLOCK)
            return ds_error_set(err, -EBUSY,
                                "state_dir %s is in use by another dsd (pid %s, lock %s): one "
                                "daemon per state_dir",
                                dir, r > 0 ? pid : "?", path);
        return ds_error_set(err, -e, "%s: %s", path, strerror(e));
    }
    char pid[32];
    int n = snprintf(pid, sizeof(pid), "%d\n", (int)getpid());
    if (ftruncate(fd, 0) < 0 || pwrite(fd, pid, (size_t)n, 0) != n) {
        /* the lock holds without the pid in it */
    }
    *fd_out = fd;
    return 0;
}

void dsd_node_check(const dsd_opts *o, char *digest, size_t digest_len, char *problem,
                    size_t problem_len)
{
    ds_error err = {0};
    digest[0] = problem[0] = 0;
    if (access(o->model, F_OK) == 0) {
        if (dsd_digest_model(o->model, digest, digest_len, &err) < 0) {
            digest[0] = 0;
            snprintf(problem, problem_len, "checkpoint %s cannot be used: %s", o->model,
                     ds_error_str(&err));
        }
        return;
    }
    /* no copy: the weights are streamed into state_dir/stream */
    if (dsd_state_dir_check(o->state_dir, &err) < 0)
        snprintf(problem, problem_len,
                 "no checkpoint copy at %s, and streamed weights cannot be stored: %s", o->model,
                 ds_error_str(&err));
}
