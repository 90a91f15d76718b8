/* dsd_hf.c — `model` as a Hugging Face hub cache entry, as llama.cpp and vLLM take it.
 *
 * The hub cache (huggingface_hub's layout) keeps a repository as
 *   <cache>/models--<org>--<name>/snapshots/<revision>/{config.json, *.safetensors, ...}
 * (files there are links into blobs/). `model` may name such an entry directory, or be
 * `org/name` looked up in $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub
 * (~/.cache/huggingface/hub). The entry resolves to its newest snapshot (modification time).
 * Anything else is left as it is: a path that does not exist stays a worker without a copy. */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ds_log.h"
#include "dsd.h"

static bool is_dir(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* entry/snapshots/<newest> into out; -ENOENT when the entry has no snapshot. */
static int newest_snapshot(const char *entry, char *out, size_t n)
{
    char snaps[PATH_MAX];
    if ((size_t)snprintf(snaps, sizeof(snaps), "%s/snapshots", entry) >= sizeof(snaps))
        return -ENAMETOOLONG;
    DIR *d = opendir(snaps);
    if (!d)
        return -ENOENT;
    struct dirent *e;
    struct timespec best = {0};
    int rc = -ENOENT;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char p[PATH_MAX];
        struct stat st;
        if ((size_t)snprintf(p, sizeof(p), "%s/%s", snaps, e->d_name) >= sizeof(p) ||
            stat(p, &st) < 0 || !S_ISDIR(st.st_mode))
            continue;
        if (rc < 0 || st.st_mtim.tv_sec > best.tv_sec ||
            (st.st_mtim.tv_sec == best.tv_sec && st.st_mtim.tv_nsec > best.tv_nsec)) {
            best = st.st_mtim;
            if ((size_t)snprintf(out, n, "%s", p) < n)
                rc = 0;
        }
    }
    closedir(d);
    return rc;
}

/* The hub cache directory this environment names. */
static void hub_cache(char *out, size_t n)
{
    const char *v;
    if ((v = getenv("HF_HUB_CACHE")) && *v)
        snprintf(out, n, "%s", v);
    else if ((v = getenv("HF_HOME")) && *v)
        snprintf(out, n, "%s/hub", v);
    else if ((v = getenv("XDG_CACHE_HOME")) && *v)
        snprintf(out, n, "%s/huggingface/hub", v);
    else
        snprintf(out, n, "%s/.cache/huggingface/hub", (v = getenv("HOME")) && *v ? v : "/");
}

int dsd_model_resolve(char *model, size_t n, char *repo_id, size_t rn, ds_error *err)
{
    char entry[PATH_MAX], snap[PATH_MAX];
    snprintf(entry, sizeof(entry), "%s", model);
    for (size_t l = strlen(entry); l > 1 && entry[l - 1] == '/';)
        entry[--l] = 0;
    const char *base = strrchr(entry, '/');
    base = base ? base + 1 : entry;
    if (is_dir(model)) {
        if (strncmp(base, "models--", 8))
            return 0; /* an ordinary checkpoint directory */
        if (newest_snapshot(entry, snap, sizeof(snap)) < 0)
            return ds_error_set(err, -ENOENT, "model %s: a hub cache entry without snapshots",
                                model);
    } else {
        /* org/name: one slash, neither part empty nor a path of its own */
        const char *slash = strchr(model, '/');
        if (!slash || slash == model || !slash[1] || strchr(slash + 1, '/') || model[0] == '.')
            return 0;
        char cache[PATH_MAX - 128];
        hub_cache(cache, sizeof(cache));
        int org = (int)(slash - model);
        if ((size_t)snprintf(entry, sizeof(entry), "%s/models--%.*s--%s", cache, org, model,
                             slash + 1) >= sizeof(entry) ||
            !is_dir(entry))
            return 0; /* not in the cache: left as it is (a worker without a copy) */
        if (newest_snapshot(entry, snap, sizeof(snap)) < 0)
            return ds_error_set(err, -ENOENT, "model %s: %s has no snapshot", model, entry);
    }
    if (strlen(snap) >= n)
        return ds_error_set(err, -ENAMETOOLONG, "model %s: the snapshot path is too long", model);
    /* the repository's id from the entry's name: models--org--name -> org/name */
    const char *eb = strrchr(entry, '/');
    eb = eb ? eb + 1 : entry;
    const char *sep = strstr(eb + 8, "--");
    if (repo_id && rn && sep)
        snprintf(repo_id, rn, "%.*s/%s", (int)(sep - (eb + 8)), eb + 8, sep + 2);
    ds_log_notice("model %s: the hub cache snapshot %s", model, snap);
    snprintf(model, n, "%s", snap);
    return 1;
}
