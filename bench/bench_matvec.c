/* bench_matvec — matrix-vector bandwidth per backend against the device's own measured peak.
 *
 *   bench_matvec [--backends cpu,opencl,cuda] [--rows R] [--cols C] [--seconds S]
 *
 * For each backend that opens here, ds_backend_probe (the calibration's measurement): a
 * device-to-device copy of a large buffer gives the measured peak (bytes read + written per
 * second), then the matvec (n = 1, the decode case) of a DeepSeek-V3 expert projection
 * [R x C] (default 2048 x 7168) in F32, BF16 and FP8 streams the weight; achieved GB/s =
 * (weight + x + y bytes) / time. Printed side by side as
 * the ratio matvec / copy, both measured in this run. A backend that is absent is listed as
 * such. The engine's own CPU kernel (ds_weight_matmul, multi-threaded) is printed for
 * context against the same copy peak as the cpu backend. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ds_backend.h"
#include "ds_pool.h"
#include "ds_tensor.h"

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static uint64_t rng = 0x2545F4914F6CDD1Dull;
static uint32_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 11);
}

/* The weight in each dtype, for the engine's own kernel (context line). */
typedef struct wdata {
    void *data[3]; /* F32, BF16, FP8 */
    float *scale;  /* FP8 block scales */
    uint32_t rows, cols;
} wdata;

static const char *const dt_name[3] = {"F32", "BF16", "FP8"};

int main(int argc, char **argv)
{
    const char *list = "cpu,opencl,cuda";
    uint32_t rows = 2048, cols = 7168;
    double seconds = 1.0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--backends") && i + 1 < argc)
            list = argv[++i];
        else if (!strcmp(argv[i], "--rows") && i + 1 < argc)
            rows = (uint32_t)strtoul(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--cols") && i + 1 < argc)
            cols = (uint32_t)strtoul(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            seconds = strtod(argv[++i], NULL);
        else {
            fprintf(stderr, "usage: bench_matvec [--backends cpu,opencl,cuda] [--rows R] "
                            "[--cols C] [--seconds S]\n");
            return 2;
        }
    }
    if (rows < 1 || cols < 1 || rows > 65536 || cols > 65536 || seconds <= 0 || seconds > 60) {
        fprintf(stderr, "bench_matvec: rows/cols in [1, 65536], seconds in (0, 60]\n");
        return 2;
    }
    wdata w = {{NULL, NULL, NULL}, NULL, rows, cols};
    size_t n = (size_t)rows * cols;
    w.data[0] = malloc(n * 4);
    w.data[1] = malloc(n * 2);
    w.data[2] = malloc(n);
    size_t ns = (size_t)((rows + 127) / 128) * ((cols + 127) / 128);
    w.scale = malloc(ns * 4);
    if (!w.data[0] || !w.data[1] || !w.data[2] || !w.scale)
        return 1;
    for (size_t i = 0; i < n; i++) {
        float v = (float)((int)(rnd() % 2001) - 1000) / 1000.0f;
        ((float *)w.data[0])[i] = v;
        ((uint16_t *)w.data[1])[i] = ds_f32_to_bf16(v);
        ((uint8_t *)w.data[2])[i] = (uint8_t)(rnd() & 0x77); /* finite values */
    }
    for (size_t i = 0; i < ns; i++)
        w.scale[i] = 1.0f / 256;

    printf("matvec [%u x %u], n = 1; copy = device-to-device copy, (read + write) / time\n", rows,
           cols);
    printf("%-8s %-34s %-5s %10s %10s %7s\n", "backend", "device", "dtype", "matvec", "copy",
           "ratio");
    char buf[256];
    snprintf(buf, sizeof(buf), "%s", list);
    double cpu_copy = 0;
    for (char *save = NULL, *spec = strtok_r(buf, ",", &save); spec;
         spec = strtok_r(NULL, ",", &save)) {
        ds_backend *b = NULL;
        ds_error err = {0};
        if (ds_backend_open(spec, &b, &err) < 0) {
            printf("%-8s absent: %s\n", spec, ds_error_str(&err));
            continue;
        }
        /* Well above the last-level cache of any CPU; 1 GiB on a CUDA card. */
        size_t cbytes = strncmp(spec, "cuda", 4) ? (size_t)256 << 20 : (size_t)1 << 30;
        /* The reference cpu backend is one scalar thread: a shorter run is enough. */
        ds_bk_probe p;
        if (ds_backend_probe(b, rows, cols, cbytes, !strcmp(spec, "cpu") ? seconds / 4 : seconds,
                             &p, &err) < 0) {
            printf("%-8s failed: %s\n", spec, ds_error_str(&err));
            ds_backend_free(b);
            continue;
        }
        if (!strcmp(spec, "cpu"))
            cpu_copy = p.copy_gbs;
        for (int dt = 0; dt < 3; dt++)
            printf("%-8s %-34.34s %-5s %7.2f GB/s %7.2f GB/s %6.3f\n", spec, ds_backend_device(b),
                   dt_name[dt], p.matvec_gbs[dt], p.copy_gbs,
                   p.copy_gbs > 0 ? p.matvec_gbs[dt] / p.copy_gbs : 0);
        ds_backend_free(b);
    }
    /* Context: the engine's own CPU kernel (all cores) against the cpu backend's copy peak. */
    if (cpu_copy > 0) {
        ds_pool *pool = NULL;
        ds_pool_new(0, NULL, 0, &pool);
        float *x = calloc(cols, 4), *y = calloc(rows, 4);
        static const enum ds_dtype mdt[3] = {DS_DTYPE_F32, DS_DTYPE_BF16, DS_DTYPE_F8_E4M3};
        for (int dt = 0; dt < 3; dt++) {
            ds_weight mw = {mdt[dt], rows, cols, w.data[dt], dt == 2 ? w.scale : NULL, 128, 128};
            size_t wb = n * (dt == 0 ? 4 : dt == 1 ? 2 : 1);
            ds_weight_matmul(&mw, x, 1, y, pool);
            double t0 = now(), t;
            int it = 0;
            do {
                ds_weight_matmul(&mw, x, 1, y, pool);
                it++;
            } while ((t = now() - t0) < seconds || it < 3);
            double g = ((double)wb + (rows + cols) * 4.0) / (t / it) / 1e9;
            printf("%-8s %-34s %-5s %7.2f GB/s %7.2f GB/s %6.3f\n", "engine",
                   "ds_weight_matmul, all threads", dt_name[dt], g, cpu_copy, g / cpu_copy);
        }
        free(x);
        free(y);
        ds_pool_free(pool);
    }
    for (int i = 0; i < 3; i++)
        free(w.data[i]);
    free(w.scale);
    return 0;
}
