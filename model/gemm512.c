/* gemm512.c — AVX-512 kernels: the prefill GEMM's register tile (4 weight rows x 6 input rows)
 * and the one-row decode of BF16/F16 weights (3 rows interleaved, 16 lanes per zmm).
 *
 * The canonical order keeps 16 interleaved partial sums per output; a zmm register holds
 * exactly those 16 lanes, so a tile of 4 widened weight rows by 6 input rows is 24 accumulators
 * (of 32 registers) and each step of 16 columns is 4 + 6 loads for 24 FMAs — against 10 loads
 * for 12 FMAs of half the width in the AVX2 tile. Lane j still sees its columns in ascending
 * order with one fused multiply-add each, K blocks continue the same chains through `state`, and
 * the combine and the tail are those of tensor.c, so the bits equal the AVX2 and portable
 * kernels' (test_kernel_identity runs all three). */
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gemm512.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define T512    __attribute__((target("avx512f,fma,f16c")))
#define INLINE_ __attribute__((always_inline)) inline

/* Columns per K block: 4 rows of it (8 KB) stay in L1 while the block's input rows stream. */
#define KC512 512u
#define NR    6u

bool ds_gemm512_supported(void)
{
    static int have = -1;
    if (have < 0)
        have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
    return have;
}

size_t ds_gemm512_state_floats(uint32_t nb)
{
    return (size_t)nb * 4 * 16;
}

/* MR x NRR outputs, columns [cb, ce) (multiples of 16), partial sums in st[i][m][16]. */
T512 static INLINE_ void tile(uint32_t MR, uint32_t NRR, const float *const *wr, const float *x,
                              size_t xs, uint32_t cb, uint32_t ce, bool first, float *st)
{
    __m512 acc[4][NR];
#pragma GCC unroll 4
    for (uint32_t m = 0; m < MR; m++)
#pragma GCC unroll 6
        for (uint32_t i = 0; i < NRR; i++)
            acc[m][i] = first ? _mm512_setzero_ps() : _mm512_load_ps(st + (i * 4 + m) * 16);
    for (uint32_t c = cb; c < ce; c += 16) {
        __m512 wv[4];
#pragma GCC unroll 4
        for (uint32_t m = 0; m < MR; m++)
            wv[m] = _mm512_loadu_ps(wr[m] + c);
#pragma GCC unroll 6
        for (uint32_t i = 0; i < NRR; i++) {
            __m512 xv = _mm512_loadu_ps(x + i * xs + c);
#pragma GCC unroll 4
            for (uint32_t m = 0; m < MR; m++)
                acc[m][i] = _mm512_fmadd_ps(wv[m], xv, acc[m][i]);
        }
    }
#pragma GCC unroll 4
    for (uint32_t m = 0; m < MR; m++)
#pragma GCC unroll 6
        for (uint32_t i = 0; i < NRR; i++)
            _mm512_store_ps(st + (i * 4 + m) * 16, acc[m][i]);
}

/* The tile for any NRR < NR (a constant per call so the loops unroll). */
T512 static void tile_tail(uint32_t MR, uint32_t nrr, const float *const *wr, const float *x,
                           size_t xs, uint32_t cb, uint32_t ce, bool first, float *st)
{
    switch (nrr) {
    case 5:
        tile(MR, 5, wr, x, xs, cb, ce, first, st);
        break;
    case 4:
        tile(MR, 4, wr, x, xs, cb, ce, first, st);
        break;
    case 3:
        tile(MR, 3, wr, x, xs, cb, ce, first, st);
        break;
    case 2:
        tile(MR, 2, wr, x, xs, cb, ce, first, st);
        break;
    default:
        tile(MR, 1, wr, x, xs, cb, ce, first, st);
        break;
    }
}

/* The canonical combine of one output's 16 lanes: a_j = acc_j + acc_{j+8}, then the tree. */
T512 static INLINE_ float combine16(const float *s)
{
    __m256 a = _mm256_add_ps(_mm256_load_ps(s), _mm256_load_ps(s + 8));
    __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 a2 = _mm_add_ps(a4, _mm_movehl_ps(a4, a4));
    return _mm_cvtss_f32(_mm_add_ss(a2, _mm_movehdup_ps(a2)));
}

T512 static INLINE_ float fma1(float a, float b, float c)
{
    return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
}

T512 void ds_gemm512_widen(const uint16_t *p, bool f16, uint32_t cols, float *dst)
{
    uint32_t c = 0;
    if (f16) {
        for (; c + 16 <= cols; c += 16)
            _mm512_storeu_ps(dst + c,
                             _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + c))));
        for (; c < cols; c++)
            dst[c] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(p[c])));
    } else {
        for (; c + 16 <= cols; c += 16)
            _mm512_storeu_ps(
                dst + c,
                _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p + c))), 16)));
        for (; c < cols; c++) {
            uint32_t u = (uint32_t)p[c] << 16;
            float f;
            __builtin_memcpy(&f, &u, 4);
            dst[c] = f;
        }
    }
}

/* One 16-column step of a BF16/F16 row, widened in a zmm (exact). */
T512 static INLINE_ __m512 wide16(const uint16_t *p, bool f16)
{
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return f16 ? _mm512_cvtph_ps(h)
               : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

T512 static INLINE_ float wval1(const uint16_t *p, bool f16)
{
    if (f16)
        return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(*p)));
    uint32_t u = (uint32_t)*p << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

/* MR (1..3) weight rows against one input row, interleaved: MR independent zmm chains. */
T512 static INLINE_ void gemv_rows(uint32_t MR, const uint16_t *w, size_t rs, bool f16,
                                   const float *x, uint32_t cols, float *y)
{
    __m512 acc[3];
    uint32_t c16 = cols & ~15u;
#pragma GCC unroll 3
    for (uint32_t m = 0; m < MR; m++)
        acc[m] = _mm512_setzero_ps();
    for (uint32_t c = 0; c < c16; c += 16) {
        __m512 xv = _mm512_loadu_ps(x + c);
        if ((c & 31) == 0) /* one prefetch per 64-byte line of each row, 16 KB ahead */
#pragma GCC unroll 3
            for (uint32_t m = 0; m < MR; m++)
                _mm_prefetch((const char *)(w + m * rs + c) + 16384, _MM_HINT_T0);
#pragma GCC unroll 3
        for (uint32_t m = 0; m < MR; m++)
            acc[m] = _mm512_fmadd_ps(wide16(w + m * rs + c, f16), xv, acc[m]);
    }
    float st[16] __attribute__((aligned(64)));
#pragma GCC unroll 3
    for (uint32_t m = 0; m < MR; m++) {
        _mm512_store_ps(st, acc[m]);
        float v = combine16(st);
        for (uint32_t c = c16; c < cols; c++)
            v = fma1(wval1(w + m * rs + c, f16), x[c], v);
        y[m] = v;
    }
}

T512 void ds_gemv512_rows(const uint16_t *w, bool f16, uint32_t cols, uint32_t nrows,
                          const float *x, float *y)
{
    uint32_t r = 0;
    for (; r + 3 <= nrows; r += 3)
        gemv_rows(3, w + (size_t)r * cols, cols, f16, x, cols, y + r);
    for (; r < nrows; r++)
        gemv_rows(1, w + (size_t)r * cols, cols, f16, x, cols, y + r);
}

T512 void ds_gemm512_rows(const float *const *wr, uint32_t mr, const float *x, size_t xs,
                          uint32_t n, uint32_t cols, float *y, size_t ys, float *state, uint32_t nb)
{
    uint32_t c16 = cols & ~15u;
    for (uint32_t i0 = 0; i0 < n; i0 += nb) {
        uint32_t i1 = i0 + nb < n ? i0 + nb : n;
        for (uint32_t cb = 0; cb < c16; cb += KC512) {
            uint32_t ce = cb + KC512 < c16 ? cb + KC512 : c16;
            bool first = cb == 0;
            for (uint32_t i = i0; i < i1; i += NR) {
                const float *xi = x + (size_t)i * xs;
                float *st = state + (size_t)(i - i0) * 64;
                uint32_t nrr = i1 - i < NR ? i1 - i : NR;
                switch (mr) {
                case 4:
                    if (nrr == NR)
                        tile(4, NR, wr, xi, xs, cb, ce, first, st);
                    else
                        tile_tail(4, nrr, wr, xi, xs, cb, ce, first, st);
                    break;
                case 3:
                    if (nrr == NR)
                        tile(3, NR, wr, xi, xs, cb, ce, first, st);
                    else
                        tile_tail(3, nrr, wr, xi, xs, cb, ce, first, st);
                    break;
                case 2:
                    if (nrr == NR)
                        tile(2, NR, wr, xi, xs, cb, ce, first, st);
                    else
                        tile_tail(2, nrr, wr, xi, xs, cb, ce, first, st);
                    break;
                default:
                    if (nrr == NR)
                        tile(1, NR, wr, xi, xs, cb, ce, first, st);
                    else
                        tile_tail(1, nrr, wr, xi, xs, cb, ce, first, st);
                    break;
                }
            }
        }
        for (uint32_t i = i0; i < i1; i++) {
            const float *xi = x + (size_t)i * xs;
            for (uint32_t m = 0; m < mr; m++) {
                float v = c16 ? combine16(state + ((size_t)(i - i0) * 4 + m) * 16) : 0.0f;
                for (uint32_t c = c16; c < cols; c++)
                    v = fma1(wr[m][c], xi[c], v);
                y[(size_t)i * ys + m] = v;
            }
        }
    }
}
#else
bool ds_gemm512_supported(void)
{
    return false;
}
void ds_gemm512_widen(const uint16_t *p, bool f16, uint32_t cols, float *dst)
{
    (void)p, (void)f16, (void)cols, (void)dst;
}
void ds_gemv512_rows(const uint16_t *w, bool f16, uint32_t cols, uint32_t nrows, const float *x,
                     float *y)
{
    (void)w, (void)f16, (void)cols, (void)nrows, (void)x, (void)y;
}
size_t ds_gemm512_state_floats(uint32_t nb)
{
    return (size_t)nb * 64;
}
void ds_gemm512_rows(const float *const *wr, uint32_t mr, const float *x, size_t xs, uint32_t n,
                     uint32_t cols, float *y, size_t ys, float *state, uint32_t nb)
{
    (void)wr, (void)mr, (void)x, (void)xs, (void)n, (void)cols, (void)y, (void)ys, (void)state,
        (void)nb;
}
#endif
