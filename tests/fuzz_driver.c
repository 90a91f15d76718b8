/* fuzz_driver.c — runs a libFuzzer-style target without libFuzzer, for ctest.
 *
 * Usage: fuzz_xxx [-iterations=N] [-seed=S] [corpus files or dirs...]
 * Replays every corpus file, then runs N seeded mutations (bit flips, byte sets, truncation,
 * insertion of interesting values, splices of two inputs). Deterministic for a seed, so a crash
 * found in CI reproduces. Coverage guidance is what libFuzzer adds (-DDS_LIBFUZZER=ON). */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
/* Optional: a target may build valid seed inputs in code (e.g. packed protobuf envelopes)
 * instead of committing binary corpus files. Returns the number of seeds written (each a
 * malloc'd buffer the driver frees). */
size_t ds_fuzz_seeds(uint8_t **bufs, size_t *sizes, size_t max) __attribute__((weak));

#define MAX_INPUTS 512
#define MAX_INPUT_BYTES (1u << 20)

static uint8_t *inputs[MAX_INPUTS];
static size_t sizes[MAX_INPUTS];
static size_t n_inputs;

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rng(void)
{
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static void add_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f || n_inputs >= MAX_INPUTS) {
        if (f)
            fclose(f);
        return;
    }
    uint8_t *buf = malloc(MAX_INPUT_BYTES);
    size_t n = fread(buf, 1, MAX_INPUT_BYTES, f);
    fclose(f);
    inputs[n_inputs] = buf;
    sizes[n_inputs++] = n;
}

static void add_path(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(stderr, "fuzz: no such corpus path %s\n", path);
        exit(2);
    }
    if (!S_ISDIR(st.st_mode)) {
        add_file(path);
        return;
    }
    DIR *d = opendir(path);
    struct dirent *e;
    char full[4096];
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(full, sizeof(full), "%s/%s", path, e->d_name);
        add_path(full);
    }
    if (d)
        closedir(d);
}

static size_t mutate(uint8_t *buf, size_t n, size_t cap)
{
    int ops = 1 + (int)(rng() % 4);
    for (int k = 0; k < ops; k++) {
        switch (rng() % 7) {
        case 0: /* bit flip */
            if (n)
                buf[rng() % n] ^= (uint8_t)(1u << (rng() % 8));
            break;
        case 1: /* random byte */
            if (n)
                buf[rng() % n] = (uint8_t)rng();
            break;
        case 2: /* truncate */
            if (n)
                n = rng() % n;
            break;
        case 3: { /* interesting values */
            static const uint8_t vals[] = {0, 0xff, 0x7f, 0x80, '"', '{', '}', '[', ']', ',',
                                           ':', '-', '9', '\\', 0x01};
            if (n)
                buf[rng() % n] = vals[rng() % sizeof(vals)];
            break;
        }
        case 4: /* insert bytes */
            if (n + 8 < cap) {
                size_t at = n ? rng() % n : 0;
                size_t k2 = 1 + rng() % 8;
                memmove(buf + at + k2, buf + at, n - at);
                for (size_t i = 0; i < k2; i++)
                    buf[at + i] = (uint8_t)rng();
                n += k2;
            }
            break;
        case 5: /* splice from another input */
            if (n_inputs > 1 && n) {
                size_t j = rng() % n_inputs;
                if (sizes[j]) {
                    size_t from = rng() % sizes[j];
                    size_t at = rng() % n;
                    size_t len = sizes[j] - from;
                    if (len > cap - at)
                        len = cap - at;
                    memcpy(buf + at, inputs[j] + from, len);
                    if (at + len > n)
                        n = at + len;
                }
            }
            break;
        case 6: /* duplicate a chunk */
            if (n > 2 && n * 2 < cap) {
                size_t from = rng() % n, len = 1 + rng() % (n - from);
                memcpy(buf + n, buf + from, len);
                n += len;
            }
            break;
        }
    }
    return n;
}

int main(int argc, char **argv)
{
    long iterations = 10000;
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "-iterations=", 12) == 0)
            iterations = atol(argv[i] + 12);
        else if (strncmp(argv[i], "-seed=", 6) == 0)
            rng_state = strtoull(argv[i] + 6, NULL, 0) | 1;
        else if (argv[i][0] != '-')
            add_path(argv[i]);
    }
    if (ds_fuzz_seeds)
        n_inputs += ds_fuzz_seeds(inputs + n_inputs, sizes + n_inputs, MAX_INPUTS - n_inputs);
    for (size_t i = 0; i < n_inputs; i++)
        LLVMFuzzerTestOneInput(inputs[i], sizes[i]);
    if (n_inputs == 0) { /* start from a few generic seeds */
        static const char *seeds[] = {"{}", "[]", "{\"a\":1}", "", "\x08\0\0\0\0\0\0\0{}      "};
        for (size_t i = 0; i < sizeof(seeds) / sizeof(seeds[0]); i++) {
            size_t n = strlen(seeds[i]);
            if (i == 4)
                n = 16;
            inputs[n_inputs] = malloc(MAX_INPUT_BYTES);
            memcpy(inputs[n_inputs], seeds[i], n);
            sizes[n_inputs++] = n;
        }
    }
    size_t cap = 0;
    for (size_t i = 0; i < n_inputs; i++)
        cap = sizes[i] > cap ? sizes[i] : cap;
    cap = cap * 2 + 64;
    if (cap > MAX_INPUT_BYTES)
        cap = MAX_INPUT_BYTES;
    uint8_t *buf = malloc(cap);
    for (long it = 0; it < iterations; it++) {
        size_t j = rng() % n_inputs;
        size_t n = sizes[j] < cap ? sizes[j] : cap;
        memcpy(buf, inputs[j], n);
        n = mutate(buf, n, cap);
        /* hand the target an exact-size heap copy so ASan sees any overread */
        uint8_t *exact = malloc(n ? n : 1);
        memcpy(exact, buf, n);
        LLVMFuzzerTestOneInput(exact, n);
        free(exact);
    }
    printf("fuzz: %zu corpus inputs, %ld mutations, no crash\n", n_inputs, iterations);
    free(buf);
    for (size_t i = 0; i < n_inputs; i++)
        free(inputs[i]);
    return 0;
}
