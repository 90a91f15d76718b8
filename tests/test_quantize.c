/* test_quantize.c — load-time quantisation (--quantize q8_0|q4_k): the block quantisers of
 * model/quant.c, which weights the policy picks, and the real command on models/tiny.
 *
 * Against independent references:
 *   Q8_0: the bytes llama.cpp's gguf-py (numpy `gguf.quants.quantize`) made of the same float32
 *         inputs (tests/data/quant, tools/gen_quant_ref.py), bit for bit;
 *   Q4_K: gguf-py cannot quantise K-quants, so an invariant of the fit checked on every value:
 *         the dequantised value (ds_quant_dequant_row, itself bit-exact to gguf-py) is within
 *         half its sub-block's step d*sc of the input, plus the 6-bit rounding of the sub-block's
 *         min (|dmin*m - max(0, -min x)|), with d, dmin, sc, m unpacked here from the block bytes
 *         by this file's own reading of ggml's layout, and the min computed from the input;
 *   the model: logits of `dsctl generate --local --quantize` against the unquantised run of the
 *         same command (tolerances below, with why). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds_model.h"
#include "ds_quant.h"

static void *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        fail_msg("cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *b = malloc((size_t)n + 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return b;
}

static void test_q8_0_bit_exact(void **state)
{
    (void)state;
    size_t nin, nref;
    float *x = read_file(DS_TEST_DATA "/quant/q8_0_in.f32", &nin);
    uint8_t *ref = read_file(DS_TEST_DATA "/quant/q8_0_ref.bin", &nref);
    size_t n = nin / 4;
    assert_int_equal(nref, n / 32 * 34);
    uint8_t *got = malloc(nref);
    assert_int_equal(ds_quant_quantize_row(DS_QUANT_Q8_0, x, n, got), 0);
    for (size_t b = 0; b < n / 32; b++)
        if (memcmp(got + 34 * b, ref + 34 * b, 34))
            fail_msg("Q8_0 block %zu (row %zu) differs from gguf-py's", b, b / 8);
    free(got);
    free(ref);
    free(x);
}

static float half(const uint8_t *p)
{
    float f;
    uint16_t h = (uint16_t)(p[0] | p[1] << 8);
    int e = (h >> 10) & 31, m = h & 1023;
    f = e == 31 ? INFINITY : e == 0 ? ldexpf((float)m, -24) : ldexpf((float)(m | 1024), e - 25);
    return h & 0x8000 ? -f : f;
}

/* ggml's block_q4_K scales, read independently: 12 bytes, sub-blocks 0..3 in the low 6 bits of
 * bytes 0..3 (scale) and 4..7 (min); 4..7 in the nibbles of bytes 8..11 (scale low, min high)
 * with their top 2 bits in bits 6..7 of bytes 0..3 (scale) and 4..7 (min). */
static void q4k_unpack(const uint8_t *s, int g, int *sc, int *m)
{
    if (g < 4) {
        *sc = s[g] & 0x3f;
        *m = s[4 + g] & 0x3f;
    } else {
        *sc = (s[4 + g] & 0x0f) | (s[g - 4] >> 6) << 4;
        *m = (s[4 + g] >> 4) | (s[g] >> 6) << 4;
    }
}

static uint64_t rng = 88172645463325252ull;
static float frand(void) /* uniform in [-1, 1) */
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 11) / (double)(1ull << 53) * 2 - 1);
}

static void check_q4_k(const float *x, size_t n, const char *what)
{
    uint8_t *b = malloc(n / 256 * 144);
    float *y = malloc(n * sizeof(float));
    assert_int_equal(ds_quant_quantize_row(DS_QUANT_Q4_K, x, n, b), 0);
    assert_int_equal(ds_quant_dequant_row(DS_QUANT_Q4_K, b, n, y), 0);
    double worst = 0;
    for (size_t blk = 0; blk < n / 256; blk++) {
        const uint8_t *q = b + 144 * blk;
        float d = half(q), dmin = half(q + 2);
        assert_true(d >= 0 && dmin >= 0 && isfinite(d) && isfinite(dmin));
        for (int g = 0; g < 8; g++) {
            int sc, m;
            q4k_unpack(q + 4, g, &sc, &m);
            const float *xs = x + 256 * blk + 32 * g;
            const float *ys = y + 256 * blk + 32 * g;
            float lo = 0, amax = 0;
            for (int l = 0; l < 32; l++) {
                lo = fminf(lo, xs[l]);
                amax = fmaxf(amax, fabsf(xs[l]));
            }
            double step = (double)d * sc, minr = fabs((double)dmin * m - (double)-lo);
            /* float32 rounding of d*sc*q - dmin*m and of the fit: a few ulps of the range */
            double eps = 8 * FLT_EPSILON * (amax + 16 * step + (double)dmin * m);
            for (int l = 0; l < 32; l++) {
                double e = fabs((double)ys[l] - xs[l]), bound = step / 2 + minr + eps;
                if (e > bound)
                    fail_msg("%s: block %zu sub-block %d value %d: x %.9g dequantised %.9g, "
                             "error %.3g above half the step %.3g + the min's rounding %.3g",
                             what, blk, g, l, xs[l], ys[l], e, step / 2, minr);
                if (step > 0)
                    worst = fmax(worst, e / step);
            }
        }
    }
    /* the bound is not vacuous: errors reach about half a step and no further */
    if (n >= 4096)
        assert_true(worst > 0.3 && worst < 0.51);
    free(b);
    free(y);
}

static void test_q4_k_invariant(void **state)
{
    (void)state;
    enum { N = 256 * 64 };
    float *x = malloc(N * sizeof(float));
    const float scales[] = {1.0f, 0.02f, 3e-4f, 50.0f};
    for (int s = 0; s < 4; s++) {
        for (int i = 0; i < N; i++)
            x[i] = scales[s] * (frand() + frand() + frand()); /* roughly normal */
        check_q4_k(x, N, "random");
    }
    for (int i = 0; i < N; i++) /* all positive, all negative, offset blocks */
        x[i] = (i / 256) % 3 == 0   ? fabsf(frand())
               : (i / 256) % 3 == 1 ? -fabsf(frand()) - 0.5f
                                    : frand() + 3.0f;
    check_q4_k(x, N, "one-signed");
    memset(x, 0, 256 * 2 * sizeof(float)); /* zero super-blocks */
    for (int i = 512; i < 768; i++)
        x[i] = i % 32 == 0 ? 7.0f : 1e-3f * frand(); /* spikes */
    check_q4_k(x, 768, "zeros and spikes");
    free(x);
}

static void test_policy(void **state)
{
    (void)state;
    uint32_t t = 0;
    assert_true(ds_quantize_weight_type(DS_QUANTIZE_Q4_K, DS_QUANT_BF16, 512, &t));
    assert_int_equal(t, DS_QUANT_Q4_K);
    /* a row not a multiple of 256 falls back to Q8_0 */
    assert_true(ds_quantize_weight_type(DS_QUANTIZE_Q4_K, DS_QUANT_F16, 128, &t));
    assert_int_equal(t, DS_QUANT_Q8_0);
    assert_true(ds_quantize_weight_type(DS_QUANTIZE_Q8_0, DS_QUANTIZE_SRC_F8, 64, &t));
    assert_int_equal(t, DS_QUANT_Q8_0);
    assert_false(ds_quantize_weight_type(DS_QUANTIZE_Q8_0, DS_QUANT_F32, 100, &t));  /* stays */
    assert_false(ds_quantize_weight_type(DS_QUANTIZE_Q8_0, DS_QUANT_Q6_K, 256, &t)); /* a block */
    assert_false(ds_quantize_weight_type(DS_QUANTIZE_NONE, DS_QUANT_F32, 256, &t));
    enum ds_quantize q;
    assert_int_equal(ds_quantize_parse("q4_k", &q), 0);
    assert_int_equal(q, DS_QUANTIZE_Q4_K);
    assert_int_equal(ds_quantize_parse("Q8_0", &q), 0);
    assert_int_equal(q, DS_QUANTIZE_Q8_0);
    assert_int_equal(ds_quantize_parse("q5_k", &q), -EINVAL);
    assert_int_equal(ds_quant_quantize_row(DS_QUANT_Q6_K, NULL, 256, NULL), -ENOTSUP);
}

/* Runs the real dsctl; returns its last output line (static buffer) and exit status. */
static const char *dsctl(const char *args, int *status)
{
    static char last[65536];
    char cmd[4096], line[65536];
    snprintf(cmd, sizeof cmd, "%s/client/dsctl %s 2>&1", DS_BINARY_ROOT, args);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    last[0] = 0;
    size_t total = 0;
    while (fgets(line, sizeof line, p)) {
        total += strlen(line);
        snprintf(last, sizeof last, "%s", line);
    }
    *status = pclose(p);
    assert_true(total > strlen(last)); /* text came before the tokens line */
    return last;
}

/* `dsctl generate --local --quantize` on models/tiny against the unquantised run: the greedy
 * tokens and, position by position, the logits.
 *
 * Why these tolerances: Q8_0 rounds every weight to within half a step of amax/127 of its block
 * of 32 (at most 0.4% of the block's largest magnitude); these errors reach the logits as noise
 * through 4 layers and the head. Measured here: max |Δlogit| 0.092 over the 38 fed positions,
 * logits up to 19.6 — the size llama.cpp's own Q8_0 file of this model differs from dsd by
 * (0.16, docs/gguf.md). The tolerance is 0.25 (2.7× that). Q4_K has 16 levels per sub-block
 * (steps ~ range/15, an error up to 3% of the range): measured 1.07; tolerance 2.5. Both keep
 * all 32 greedy tokens here; the Q8_0 case asserts that, the Q4_K one the first 16 (a margin
 * below its noise could flip later ones). */
static void test_generate_quantized(void **state)
{
    (void)state;
    const char *M = DS_SOURCE_ROOT "/models/tiny";
    char args[2048], ref_tokens[65536];
    int st;
    snprintf(args, sizeof args,
             "generate --local --model %s --max-tokens 32 --threads 2 --logits-out "
             "/tmp/test_quantize_ref.f32 'The meaning of life is'",
             M);
    snprintf(ref_tokens, sizeof ref_tokens, "%s", dsctl(args, &st));
    assert_int_equal(st, 0);
    assert_non_null(strstr(ref_tokens, "tokens: "));
    const struct {
        const char *q;
        double tol;
        int same_tokens;
    } cases[] = {{"q8_0", 0.25, 32}, {"q4_k", 2.5, 16}};
    for (int c = 0; c < 2; c++) {
        snprintf(args, sizeof args,
                 "generate --local --model %s --max-tokens 32 --threads 2 --quantize %s "
                 "--logits-out /tmp/test_quantize_%s.f32 'The meaning of life is'",
                 M, cases[c].q, cases[c].q);
        const char *tok = dsctl(args, &st);
        assert_int_equal(st, 0);
        /* the first same_tokens ids agree */
        const char *a = strstr(ref_tokens, "tokens: "), *b = strstr(tok, "tokens: ");
        assert_non_null(b);
        int commas = 0;
        size_t k = 0;
        while (a[k] && a[k] == b[k] && commas < cases[c].same_tokens - 1)
            commas += a[k++] == ',';
        if (commas < cases[c].same_tokens - 1)
            fail_msg("--quantize %s: tokens part after %d: '%s' vs '%s'", cases[c].q, commas,
                     ref_tokens, tok);
        char path[256];
        snprintf(path, sizeof path, "/tmp/test_quantize_%s.f32", cases[c].q);
        size_t nr, nq;
        float *r = read_file("/tmp/test_quantize_ref.f32", &nr), *x = read_file(path, &nq);
        assert_int_equal(nr, nq);
        assert_true(nr >= 4 * 3072 * 32);
        double worst = 0;
        for (size_t i = 0; i < nr / 4; i++)
            worst = fmax(worst, fabs((double)r[i] - x[i]));
        printf("--quantize %s: max |logit - unquantised| = %.4f (tolerance %.2f)\n", cases[c].q,
               worst, cases[c].tol);
        assert_true(worst > 0); /* it did quantise */
        assert_true(worst < cases[c].tol);
        free(r);
        free(x);
        remove(path);
    }
    remove("/tmp/test_quantize_ref.f32");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_q8_0_bit_exact),
        cmocka_unit_test(test_q4_k_invariant),
        cmocka_unit_test(test_policy),
        cmocka_unit_test(test_generate_quantized),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
