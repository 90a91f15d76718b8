/* calibrate.c — short measurements on each device, cached by hardware fingerprint.
 *
 * cpu: a multi-threaded float32 matrix-vector product over `matvec_bytes` of weights (the
 *   weight-streaming bandwidth that bounds decode), a batch-of-32-rows matmul over a cache-sized
 *   weight (FLOP/s), and a STREAM-style copy in the same process (bytes read + written) as the
 *   yardstick the report compares the matvec against. Threads are bound to the device's cpuset
 *   when the topology is this machine's.
 * opencl / cuda: the compute backends' own kernels (ds_backend.h): matmul n=1 over an F32
 *   weight (bandwidth), n=32 (FLOP/s), host->device buffer writes (host link), and a one-element
 *   scale + finish (launch latency) — so the cost model sees what our kernels achieve.
 * Every figure is the median of `repeats` timed runs after a warm-up, with (max-min)/median.
 *
 * Cache: <state_dir>/devices-calibration.json = {"version", "fingerprint", "devices": {name:
 * {figure: [value, spread, repeats]}}}. A hit needs the same fingerprint and every device
 * measured; anything malformed is a miss that re-measures (and rewrites the file). */

#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "devices_impl.h"
#include "ds_backend.h"
#include "ds_hash.h"
#include "ds_log.h"

#define CALIB_VERSION   1
#define CACHE_FILE      "devices-calibration.json"
#define CACHE_MAX_BYTES (1u << 20)
#define MATVEC_COLS     7168u /* DeepSeek-V3 hidden size: rows of this length, as decode streams */
#define BATCH_ROWS      32u
#define FLOPS_DIM       1024u
#define MAX_REPEATS     50u
#define MAX_THREADS     256u

typedef float v8f __attribute__((vector_size(32)));

/* ---- figures ---- */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* rates[i] already in the figure's unit (higher is better or a latency: same formula). */
static ds_measure summarize(double *v, uint32_t n)
{
    ds_measure m = {0};
    if (n == 0)
        return m;
    qsort(v, n, sizeof(double), cmp_double);
    m.value = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
    m.spread = m.value > 0 ? (v[n - 1] - v[0]) / m.value : 0;
    m.repeats = n;
    return m;
}

/* ---- cpu ---- */

enum cpu_job { JOB_MATVEC, JOB_MATMUL, JOB_COPY };

struct cpu_ctx {
    enum cpu_job job;
    const float *w; /* matvec: [rows, cols]; matmul: [FLOPS_DIM, FLOPS_DIM] */
    const float *x; /* matvec: [cols]; matmul: [BATCH_ROWS, FLOPS_DIM] */
    float *y;       /* matvec: [rows]; matmul: [BATCH_ROWS, FLOPS_DIM] */
    size_t rows, cols;
    float *dst;       /* copy */
    const float *src; /* copy */
    size_t count;     /* copy: floats */
    unsigned nthreads;
    cpu_set_t set;
    bool bind;
};

struct cpu_thread {
    struct cpu_ctx *c;
    unsigned id;
    pthread_t t;
};

static float dot(const float *a, const float *b, size_t n)
{
    v8f acc0 = {0}, acc1 = {0};
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        v8f a0, a1, b0, b1;
        memcpy(&a0, a + i, sizeof(a0));
        memcpy(&a1, a + i + 8, sizeof(a1));
        memcpy(&b0, b + i, sizeof(b0));
        memcpy(&b1, b + i + 8, sizeof(b1));
        acc0 += a0 * b0;
        acc1 += a1 * b1;
    }
    acc0 += acc1;
    float s = 0;
    for (int k = 0; k < 8; k++)
        s += acc0[k];
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static void *cpu_worker(void *arg)
{
    struct cpu_thread *t = arg;
    struct cpu_ctx *c = t->c;
    if (c->bind)
        pthread_setaffinity_np(pthread_self(), sizeof(c->set), &c->set);
    size_t total = c->job == JOB_COPY ? c->count : c->rows;
    size_t lo = total * t->id / c->nthreads, hi = total * (t->id + 1) / c->nthreads;
    if (c->job == JOB_MATVEC) {
        for (size_t r = lo; r < hi; r++)
            c->y[r] = dot(c->w + r * c->cols, c->x, c->cols);
    } else if (c->job == JOB_MATMUL) {
        for (size_t r = lo; r < hi; r++)
            for (size_t b = 0; b < BATCH_ROWS; b++)
                c->y[b * c->rows + r] = dot(c->w + r * c->cols, c->x + b * c->cols, c->cols);
    } else {
        memcpy(c->dst + lo, c->src + lo, (hi - lo) * sizeof(float));
    }
    return NULL;
}

static double cpu_run(struct cpu_ctx *c)
{
    struct cpu_thread th[MAX_THREADS];
    double t0 = ds_devices_now();
    for (unsigned i = 0; i < c->nthreads; i++) {
        th[i].c = c;
        th[i].id = i;
        if (i > 0 && pthread_create(&th[i].t, NULL, cpu_worker, &th[i]) != 0) {
            c->nthreads = i; /* fewer threads still measure something */
            break;
        }
    }
    cpu_worker(&th[0]);
    for (unsigned i = 1; i < c->nthreads; i++)
        pthread_join(th[i].t, NULL);
    return ds_devices_now() - t0;
}

/* "0-3,8-11" -> set; false when it does not parse or is empty. */
static bool parse_cpuset(const char *s, cpu_set_t *set)
{
    CPU_ZERO(set);
    bool any = false;
    while (*s) {
        char *end;
        long a = strtol(s, &end, 10), b = a;
        if (end == s || a < 0)
            return false;
        s = end;
        if (*s == '-') {
            b = strtol(s + 1, &end, 10);
            if (end == s + 1 || b < a)
                return false;
            s = end;
        }
        for (long i = a; i <= b && i < CPU_SETSIZE; i++) {
            CPU_SET((int)i, set);
            any = true;
        }
        if (*s == ',')
            s++;
        else if (*s)
            return false;
    }
    return any;
}

static int calibrate_cpu(ds_device_info *d, uint64_t matvec_bytes, uint32_t repeats, bool here,
                         ds_error *err)
{
    struct cpu_ctx c = {0};
    c.nthreads = d->cores ? d->cores : 1;
    if (c.nthreads > MAX_THREADS)
        c.nthreads = MAX_THREADS;
    c.bind = here && parse_cpuset(d->cpuset, &c.set);
    size_t rows = (size_t)(matvec_bytes / (MATVEC_COLS * sizeof(float)));
    if (rows < 64)
        rows = 64;
    size_t wcount = rows * MATVEC_COLS;
    /* The matmul reuses the buffer: [1024, 1024] weights then [32, 1024] inputs. */
    size_t alloc = wcount > (size_t)FLOPS_DIM * (FLOPS_DIM + BATCH_ROWS)
                       ? wcount
                       : (size_t)FLOPS_DIM * (FLOPS_DIM + BATCH_ROWS);
    float *w = malloc(alloc * sizeof(float));
    float *x = malloc(MATVEC_COLS * sizeof(float));
    float *y = malloc(rows * sizeof(float) > FLOPS_DIM * BATCH_ROWS * sizeof(float)
                          ? rows * sizeof(float)
                          : FLOPS_DIM * BATCH_ROWS * sizeof(float));
    float *copy_dst = malloc(wcount / 2 * sizeof(float));
    double *v = calloc(repeats, sizeof(double));
    int r = 0;
    if (!w || !x || !y || !copy_dst || !v) {
        r = ds_error_set(err, -ENOMEM, "%s: calibration buffers (%zu MiB)", d->name,
                         wcount * sizeof(float) >> 20);
        goto out;
    }
    /* Touch everything first: a first pass would measure page faults, not memory. */
    for (size_t i = 0; i < alloc; i++)
        w[i] = (float)((i * 2654435761u) & 1023) * (1.0f / 1024);
    for (size_t i = 0; i < MATVEC_COLS; i++)
        x[i] = 1.0f / (float)(i + 1);
    memset(copy_dst, 0, wcount / 2 * sizeof(float));

    c.job = JOB_MATVEC;
    c.w = w;
    c.x = x;
    c.y = y;
    c.rows = rows;
    c.cols = MATVEC_COLS;
    cpu_run(&c);
    for (uint32_t i = 0; i < repeats; i++)
        v[i] = (double)(wcount * sizeof(float)) / cpu_run(&c);
    d->mem_bw = summarize(v, repeats);

    /* STREAM "copy": b = a over half the buffer, counting bytes read + written. */
    c.job = JOB_COPY;
    c.src = w;
    c.dst = copy_dst;
    c.count = wcount / 2;
    cpu_run(&c);
    for (uint32_t i = 0; i < repeats; i++)
        v[i] = (double)(2 * c.count * sizeof(float)) / cpu_run(&c);
    d->stream_copy = summarize(v, repeats);

    /* Matmul over a [1024, 1024] weight that stays in cache: compute, not memory. */
    c.job = JOB_MATMUL;
    c.rows = FLOPS_DIM;
    c.cols = FLOPS_DIM;
    c.x = w + (size_t)FLOPS_DIM * FLOPS_DIM; /* [32, 1024] inputs taken from the same buffer */
    cpu_run(&c);
    for (uint32_t i = 0; i < repeats; i++)
        v[i] = 2.0 * BATCH_ROWS * FLOPS_DIM * FLOPS_DIM / cpu_run(&c);
    d->flops = summarize(v, repeats);
out:
    free(w);
    free(x);
    free(y);
    free(copy_dst);
    free(v);
    return r;
}

/* ---- accelerators through the backends ---- */

static int calibrate_backend(ds_device_info *d, uint64_t matvec_bytes, uint32_t repeats,
                             ds_error *err)
{
    ds_backend *b = NULL;
    int r = ds_backend_open(d->backend_spec, &b, err);
    if (r < 0)
        return r;
    uint64_t budget = matvec_bytes;
    if (d->max_alloc_bytes && budget > d->max_alloc_bytes / 2)
        budget = d->max_alloc_bytes / 2;
    if (d->memory_bytes && budget > d->memory_bytes / 4)
        budget = d->memory_bytes / 4;
    uint32_t rows = (uint32_t)(budget / (MATVEC_COLS * sizeof(float)));
    if (rows < 64)
        rows = 64;
    size_t wcount = (size_t)rows * MATVEC_COLS;
    size_t big = wcount > (size_t)FLOPS_DIM * (FLOPS_DIM + BATCH_ROWS)
                     ? wcount
                     : (size_t)FLOPS_DIM * (FLOPS_DIM + BATCH_ROWS);
    float *host = malloc(big * sizeof(float));
    double *v = calloc(repeats, sizeof(double));
    ds_bk_weight *w = NULL, *wf = NULL;
    ds_bk_buf *x = NULL, *y = NULL, *link = NULL;
    if (!host || !v) {
        r = -ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < big; i++)
        host[i] = (float)((i * 2654435761u) & 1023) * (1.0f / 1024);
    size_t ybytes = (rows > BATCH_ROWS * FLOPS_DIM ? rows : BATCH_ROWS * FLOPS_DIM) * sizeof(float);
    ds_bk_weight_desc desc = {.dtype = DS_BK_F32, .rows = rows, .cols = MATVEC_COLS, .data = host};
    ds_bk_weight_desc fdesc = {
        .dtype = DS_BK_F32, .rows = FLOPS_DIM, .cols = FLOPS_DIM, .data = host};
    if ((r = ds_bk_weight_new(b, &desc, &w, err)) < 0 ||
        (r = ds_bk_weight_new(b, &fdesc, &wf, err)) < 0 ||
        (r = ds_bk_buf_new(b, (size_t)BATCH_ROWS * MATVEC_COLS * sizeof(float), &x, err)) < 0 ||
        (r = ds_bk_buf_new(b, ybytes, &y, err)) < 0 ||
        (r = ds_bk_buf_write(x, 0, host, (size_t)BATCH_ROWS * FLOPS_DIM * sizeof(float), err)) < 0)
        goto out;
    double s;
    for (uint32_t i = 0; i <= repeats && r == 0; i++) {
        double t0 = ds_devices_now();
        r = ds_bk_matmul(w, x, 0, 1, y, 0, err);
        if (r == 0)
            r = ds_backend_finish(b, err);
        s = ds_devices_now() - t0;
        if (i > 0) /* the first run builds/caches kernels */
            v[i - 1] = (double)(wcount * sizeof(float)) / s;
    }
    if (r < 0)
        goto out;
    d->mem_bw = summarize(v, repeats);
    for (uint32_t i = 0; i <= repeats && r == 0; i++) {
        double t0 = ds_devices_now();
        r = ds_bk_matmul(wf, x, 0, BATCH_ROWS, y, 0, err);
        if (r == 0)
            r = ds_backend_finish(b, err);
        s = ds_devices_now() - t0;
        if (i > 0)
            v[i - 1] = 2.0 * BATCH_ROWS * FLOPS_DIM * FLOPS_DIM / s;
    }
    if (r < 0)
        goto out;
    d->flops = summarize(v, repeats);
    size_t link_bytes = wcount * sizeof(float) / 2;
    if ((r = ds_bk_buf_new(b, link_bytes, &link, err)) < 0)
        goto out;
    for (uint32_t i = 0; i <= repeats && r == 0; i++) {
        double t0 = ds_devices_now();
        r = ds_bk_buf_write(link, 0, host, link_bytes, err);
        if (r == 0)
            r = ds_backend_finish(b, err);
        s = ds_devices_now() - t0;
        if (i > 0)
            v[i - 1] = (double)link_bytes / s;
    }
    if (r < 0)
        goto out;
    d->host_link = summarize(v, repeats);
    /* Launch latency: the smallest op end to end, median of more repeats (it is short). */
    uint32_t nl = repeats * 4 > MAX_REPEATS ? MAX_REPEATS : repeats * 4;
    double lat[MAX_REPEATS];
    for (uint32_t i = 0; i <= nl && r == 0; i++) {
        double t0 = ds_devices_now();
        r = ds_bk_scale(y, 1.0f, 1, err);
        if (r == 0)
            r = ds_backend_finish(b, err);
        if (i > 0)
            lat[i - 1] = ds_devices_now() - t0;
    }
    if (r == 0)
        d->launch = summarize(lat, nl);
out:
    ds_bk_buf_free(link);
    ds_bk_buf_free(x);
    ds_bk_buf_free(y);
    ds_bk_weight_free(w);
    ds_bk_weight_free(wf);
    ds_backend_free(b);
    free(host);
    free(v);
    if (r < 0)
        ds_error_prefix(err, "%s (%s)", d->name, d->backend_spec);
    return r;
}

/* ---- cache ---- */

static bool finite_nonneg(double x)
{
    return isfinite(x) && x >= 0 && x < 1e18;
}

static int measure_from(json_t *o, const char *key, ds_measure *m, const char *dev, ds_error *err)
{
    json_t *a = json_object_get(o, key);
    double v, s;
    json_int_t n;
    if (!json_is_array(a) || json_array_size(a) != 3 || !json_is_number(json_array_get(a, 0)) ||
        !json_is_number(json_array_get(a, 1)) || !json_is_integer(json_array_get(a, 2)))
        return ds_error_set(err, -EBADMSG, "device %s: %s: expected [value, spread, repeats]", dev,
                            key);
    v = json_number_value(json_array_get(a, 0));
    s = json_number_value(json_array_get(a, 1));
    n = json_integer_value(json_array_get(a, 2));
    if (!finite_nonneg(v) || !finite_nonneg(s) || n < 0 || n > (json_int_t)MAX_REPEATS)
        return ds_error_set(err, -EBADMSG, "device %s: %s: value out of range", dev, key);
    m->value = v;
    m->spread = s;
    m->repeats = (uint32_t)n;
    return 0;
}

static const char *const figures[] = {"mem_bw", "flops", "stream_copy", "host_link", "launch"};

static ds_measure *figure(ds_device_info *d, size_t i)
{
    ds_measure *f[] = {&d->mem_bw, &d->flops, &d->stream_copy, &d->host_link, &d->launch};
    return f[i];
}

/* Parses cache text; with l, fills every non-excluded device of l (all or nothing). Returns 0
 * on a hit, -ESTALE on another fingerprint, -ENOENT when a device is missing, -EBADMSG. */
static int cache_parse(const char *text, size_t len, const char *fp, ds_device_list *l,
                       ds_error *err)
{
    if (len > CACHE_MAX_BYTES)
        return ds_error_set(err, -EBADMSG, "calibration cache larger than %u bytes",
                            CACHE_MAX_BYTES);
    json_error_t je;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return ds_error_set(err, -EBADMSG, "calibration cache: line %d: %s", je.line, je.text);
    int r = 0;
    json_t *ver = json_object_get(root, "version"), *f = json_object_get(root, "fingerprint"),
           *devs = json_object_get(root, "devices");
    if (!json_is_integer(ver) || !json_is_string(f) || !json_is_object(devs)) {
        r = ds_error_set(err, -EBADMSG, "calibration cache: version, fingerprint, devices");
        goto out;
    }
    if (json_integer_value(ver) != CALIB_VERSION || strcmp(json_string_value(f), fp)) {
        r = -ESTALE;
        goto out;
    }
    if (json_object_size(devs) > DS_DEVICES_MAX) {
        r = ds_error_set(err, -EBADMSG, "calibration cache: too many devices");
        goto out;
    }
    /* Validate every entry first so that a half-good file changes nothing. */
    const char *name;
    json_t *o;
    json_object_foreach(devs, name, o)
    {
        ds_device_info tmp;
        if (!json_is_object(o)) {
            r = ds_error_set(err, -EBADMSG, "calibration cache: device %.40s: not an object", name);
            goto out;
        }
        for (size_t i = 0; i < sizeof(figures) / sizeof(figures[0]); i++)
            if ((r = measure_from(o, figures[i], figure(&tmp, i), name, err)) < 0)
                goto out;
    }
    for (size_t k = 0; l && k < l->n; k++) {
        ds_device_info *d = &l->dev[k];
        if (d->excluded)
            continue;
        if (!json_is_object(json_object_get(devs, d->name))) {
            r = -ENOENT;
            goto out;
        }
    }
    for (size_t k = 0; l && k < l->n; k++) {
        ds_device_info *d = &l->dev[k];
        if (d->excluded)
            continue;
        o = json_object_get(devs, d->name);
        for (size_t i = 0; i < sizeof(figures) / sizeof(figures[0]); i++)
            measure_from(o, figures[i], figure(d, i), d->name, NULL);
        d->calibrated = d->from_cache = true;
    }
out:
    json_decref(root);
    return r;
}

int ds_devices_cache_check(const char *text, size_t len, const char *fingerprint, ds_error *err)
{
    return cache_parse(text, len, fingerprint ? fingerprint : "", NULL, err);
}

static int cache_write(const char *dir, const char *fp, const ds_device_list *l, ds_error *err)
{
    json_t *devs = json_object();
    for (size_t k = 0; k < l->n; k++) {
        ds_device_info *d = &l->dev[k];
        if (d->excluded || !d->calibrated)
            continue;
        json_t *o = json_object();
        for (size_t i = 0; i < sizeof(figures) / sizeof(figures[0]); i++) {
            const ds_measure *m = figure(d, i);
            json_object_set_new(o, figures[i],
                                json_pack("[f, f, i]", m->value, m->spread, (int)m->repeats));
        }
        json_object_set_new(devs, d->name, o);
    }
    json_t *root =
        json_pack("{s:i, s:s, s:o}", "version", CALIB_VERSION, "fingerprint", fp, "devices", devs);
    char path[4096], tmp[4200];
    snprintf(path, sizeof(path), "%s/%s", dir, CACHE_FILE);
    snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)getpid());
    mkdir(dir, 0755); /* one level; an existing directory is fine */
    int r = root ? json_dump_file(root, tmp, JSON_INDENT(1) | JSON_PRESERVE_ORDER) : -1;
    json_decref(root);
    if (r < 0 || rename(tmp, path) < 0) {
        unlink(tmp);
        return ds_error_set(err, -EIO, "%s: cannot write the calibration cache", path);
    }
    return 0;
}

static void cache_key(const ds_device_list *l, const ds_calibrate_options *o, uint64_t bytes,
                      char out[17])
{
    char buf[256];
    snprintf(buf, sizeof(buf), "%s|%d|%llu|%s", l->fingerprint, CALIB_VERSION,
             (unsigned long long)bytes, o->fingerprint_salt ? o->fingerprint_salt : "");
    uint64_t h = ds_hash_fnv1a_str(DS_HASH_FNV1A_INIT, buf);
    snprintf(out, 17, "%016llx", (unsigned long long)h);
}

int ds_device_list_calibrate(ds_device_list *l, const ds_calibrate_options *opt, ds_error *err)
{
    static const ds_calibrate_options none;
    if (!opt)
        opt = &none;
    uint64_t bytes = opt->matvec_bytes ? opt->matvec_bytes : (128ull << 20);
    if (bytes > (8ull << 30))
        return ds_error_set(err, -ERANGE, "calibration: matvec_bytes above 8 GiB");
    uint32_t repeats = opt->repeats ? opt->repeats : 5;
    if (repeats > MAX_REPEATS / 4)
        repeats = MAX_REPEATS / 4;
    char fp[17];
    cache_key(l, opt, bytes, fp);
    char path[4096];
    if (opt->state_dir && !opt->force) {
        snprintf(path, sizeof(path), "%s/%s", opt->state_dir, CACHE_FILE);
        FILE *f = fopen(path, "re");
        if (f) {
            char *text = malloc(CACHE_MAX_BYTES + 1);
            size_t len = text ? fread(text, 1, CACHE_MAX_BYTES + 1, f) : 0;
            fclose(f);
            ds_error cerr = {0};
            int r = text ? cache_parse(text, len, fp, l, &cerr) : -ENOMEM;
            free(text);
            if (r == 0)
                return 0;
            if (r == -EBADMSG)
                ds_log_warn("%s: %s; measuring again", path, ds_error_str(&cerr));
            else
                ds_log_info("%s: %s; measuring", path,
                            r == -ESTALE ? "hardware fingerprint changed" : "not every device");
        }
    }
    cpu_set_t mine;
    bool here = sched_getaffinity(0, sizeof(mine), &mine) == 0;
    int measured = 0;
    for (size_t k = 0; k < l->n; k++) {
        ds_device_info *d = &l->dev[k];
        if (d->excluded)
            continue;
        memset(&d->mem_bw, 0, sizeof(d->mem_bw));
        d->flops = d->stream_copy = d->host_link = d->launch = d->mem_bw;
        int r;
        ds_error derr = {0};
        /* isa is read only when the topology is this machine's: bind only then. */
        if (!strcmp(d->source, "cpu"))
            r = calibrate_cpu(d, bytes, repeats, here && d->isa != 0, &derr);
        else {
            r = calibrate_backend(d, bytes, repeats, &derr);
            if (r < 0 && !strcmp(d->source, "cuda")) {
                ds_log_info("calibration: %s; using the CUDA driver API alone",
                            ds_error_str(&derr));
                ds_error_clear(&derr);
                r = ds_devices_cuda_calibrate(d, NULL, bytes, repeats, &derr);
            }
        }
        if (r < 0) {
            /* One device failing to measure must not hide the others: warn, leave it 0. */
            ds_log_warn("calibration: %s", ds_error_str(&derr));
            continue;
        }
        d->calibrated = true;
        d->from_cache = false;
        measured++;
    }
    if (opt->state_dir) {
        int r = cache_write(opt->state_dir, fp, l, err);
        if (r < 0)
            return r;
    }
    return measured;
}
