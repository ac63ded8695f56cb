"""The C dot-product kernels of `cpu_kernel` (its docstring describes the formats and the layout):
int8 rounding of activations, Q8_0 / Q4_0 / F32 dots per row, and the AVX-512 VNNI kernels that take
four weight rows per pass. Kept apart so each module stays readable; `cpu_kernel.SOURCE` starts with it.
"""

DOTS = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define VNNI 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define AVX2 1
#endif

static float h2f(uint16_t h) {  /* IEEE half -> float, portable (the scalar path) */
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023, bits;
    if (e == 0) {
        float f = ldexpf((float)m, -24);
        return s ? -f : f;
    }
    bits = e == 31 ? s | 0x7f800000u | (m << 13) : s | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

int kernel_path(void) {
#if defined(VNNI)
    return 2;
#elif defined(AVX2)
    return 1;
#else
    return 0;
#endif
}

/* Group-transposed layout (weights and rounded activations alike): blocks go in groups of 16 (the last
   of 8 when the block count is not a multiple of 16); inside a group the data is stored unit-major:
   4-byte unit t of block 0, of block 1, ..., of block g-1, then unit t + 1. One 64-byte vector then
   holds unit t of 16 blocks, so vpdpbusd's 16 int32 lanes are 16 blocks' partial dots and one
   convert + one FMA with the 16 block scales finish a group: no per-block shuffles. */
static inline int64_t group_size(int64_t nb, int64_t b) { return nb - b >= 16 ? 16 : 8; }

/* x [m, k] fp32 -> int8 [m, kp] (zero padded, group-transposed), scales d, -8 and -128 x block sums c, c8 [m, kp/32] */
static void quantize_rows(const float *x, int64_t m_rows, int64_t k, int64_t kp, int8_t *q, float *d, int32_t *c,
                          int32_t *c8) {
    int64_t nb = kp / 32;
    for (int64_t m = 0; m < m_rows; m++)
        for (int64_t g0 = 0; g0 < nb; g0 += group_size(nb, g0)) {
            int64_t g = group_size(nb, g0);
            for (int64_t j = 0; j < g; j++) {
                int64_t b = g0 + j;
                const float *xr = x + m * k + 32 * b;
                int64_t n = k - 32 * b < 32 ? (k - 32 * b > 0 ? k - 32 * b : 0) : 32;
                int8_t *qg = q + m * kp + 32 * g0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
                /* the same arithmetic on two vectors (roundscale to nearest = nearbyintf's default mode):
                   a scalar loop cost ~3% of a Q8_0 decode step */
                __mmask16 m0 = n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1);
                __mmask16 m1 = n >= 32 ? 0xffff : n <= 16 ? 0 : (__mmask16)((1u << (n - 16)) - 1);
                __m512 v0 = _mm512_maskz_loadu_ps(m0, xr), v1 = _mm512_maskz_loadu_ps(m1, xr + 16);
                float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
                float db = amax / 127.0f, id = db > 0.0f ? 1.0f / db : 0.0f;
                const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
                __m512i q0 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v0, _mm512_set1_ps(id)), rnd));
                __m512i q1 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v1, _mm512_set1_ps(id)), rnd));
                int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)), units[8];
                _mm_storeu_si128((__m128i *)units, _mm512_cvtepi32_epi8(q0));
                _mm_storeu_si128((__m128i *)(units + 4), _mm512_cvtepi32_epi8(q1));
                for (int u = 0; u < 8; u++) memcpy(qg + u * 4 * g + 4 * j, units + u, 4);
#else
                float amax = 0.0f;
                for (int64_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(xr[i]));
                float db = amax / 127.0f, id = db > 0.0f ? 1.0f / db : 0.0f;
                int32_t sum = 0;
                for (int64_t i = 0; i < 32; i++) {
                    int v = i < n ? (int)nearbyintf(xr[i] * id) : 0;
                    qg[(i / 4) * 4 * g + 4 * j + i % 4] = (int8_t)v;
                    sum += v;
                }
#endif
                d[m * nb + b] = db;
                c[m * nb + b] = -8 * sum, c8[m * nb + b] = -128 * sum;
            }
        }
}

#if defined(AVX2)
static float hsum8(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_hadd_ps(r, r);
    r = _mm_hadd_ps(r, r);
    return _mm_cvtss_f32(r);
}
/* the 8 blocks from b: one half of a group of 16, or a group of 8 -> (group start, group size, offset) */
static inline void half_group(int64_t nb, int64_t b, int64_t *g0, int64_t *g, int64_t *h) {
    *g0 = (b % 16 == 8 && group_size(nb, b - 8) == 16) ? b - 8 : b;
    *g = group_size(nb, *g0);
    *h = b - *g0;
}
#endif

/* Q8_0 row: w int8 [kp] group-transposed, wd fp16 [nb]; x the rounded activation, xd its scales */
static float dot_q8(const int8_t *w, const uint16_t *wd, const int8_t *x, const float *xd, int64_t nb) {
    float acc = 0.0f;
#if defined(AVX2)
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 f = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b += 8) {
        int64_t g0, g, h;
        half_group(nb, b, &g0, &g, &h);
        const int8_t *wg = w + 32 * g0 + 4 * h, *xg = x + 32 * g0 + 4 * h;
        __m256i a = _mm256_setzero_si256();
        for (int t = 0; t < 8; t++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(wg + 4 * g * t));
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xg + 4 * g * t));
            /* |w| (<= 127) x sign(w) x: pair sums <= 2 * 127 * 127, no int16 saturation */
            __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
            a = _mm256_add_epi32(a, _mm256_madd_epi16(p, ones));
        }
        __m256 s = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + b))), _mm256_loadu_ps(xd + b));
        f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), s, f);
    }
    acc = hsum8(f);
#else
    for (int64_t g0 = 0; g0 < nb; g0 += group_size(nb, g0)) {
        int64_t g = group_size(nb, g0);
        for (int64_t j = 0; j < g; j++) {
            int32_t s = 0;
            for (int i = 0; i < 32; i++) {
                int64_t pos = 32 * g0 + (i / 4) * 4 * g + 4 * j + i % 4;
                s += (int32_t)w[pos] * x[pos];
            }
            acc += (float)s * (h2f(wd[g0 + j]) * xd[g0 + j]);
        }
    }
#endif
    return acc;
}

/* Q4_0 row: ggml's 16 bytes per block (byte i = code i | code i + 16 << 4), group-transposed in 4-byte
   units; c: -8 x the activation block sums (unsigned codes: dot(c - 8, x) = dot(c, x) - 8 sum x) */
static float dot_q4(const uint8_t *w, const uint16_t *wd, const int8_t *x, const float *xd, const int32_t *c,
                    int64_t nb) {
    float acc = 0.0f;
#if defined(AVX2)
    const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(15);
    __m256 f = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b += 8) {
        int64_t g0, g, h;
        half_group(nb, b, &g0, &g, &h);
        const uint8_t *wg = w + 16 * g0 + 4 * h;
        const int8_t *xg = x + 32 * g0 + 4 * h;
        __m256i a = _mm256_loadu_si256((const __m256i *)(c + b));
        for (int t = 0; t < 4; t++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(wg + 4 * g * t));
            __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            __m256i xl = _mm256_loadu_si256((const __m256i *)(xg + 4 * g * t));
            __m256i xh = _mm256_loadu_si256((const __m256i *)(xg + 4 * g * (t + 4)));
            a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), ones));
            a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), ones));
        }
        __m256 s = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + b))), _mm256_loadu_ps(xd + b));
        f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), s, f);
    }
    acc = hsum8(f);
#else
    for (int64_t g0 = 0; g0 < nb; g0 += group_size(nb, g0)) {
        int64_t g = group_size(nb, g0);
        for (int64_t j = 0; j < g; j++) {
            int32_t s = c[g0 + j];
            for (int i = 0; i < 16; i++) {
                int64_t off = (i / 4) * 4 * g + 4 * j + i % 4;
                int64_t xhi = 32 * g0 + ((i / 4) + 4) * 4 * g + 4 * j + i % 4;
                s += (w[16 * g0 + off] & 15) * x[32 * g0 + off] + (w[16 * g0 + off] >> 4) * x[xhi];
            }
            acc += (float)s * (h2f(wd[g0 + j]) * xd[g0 + j]);
        }
    }
#endif
    return acc;
}

static float dot_f32(const float *w, const float *x, int64_t k) {
    int64_t i = 0;
    float acc = 0.0f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; i + 32 <= k; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(AVX2)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; i + 16 <= k; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    }
    a0 = _mm256_add_ps(a0, a1);
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
    r = _mm_hadd_ps(r, r);
    r = _mm_hadd_ps(r, r);
    acc = _mm_cvtss_f32(r);
#endif
    for (; i < k; i++) acc += w[i] * x[i];
    return acc;
}


#if defined(__AVX512F__)
/* Software prefetch into L2, PF_DIST bytes ahead of the weight stream, a line per 256 (or 512) bytes
   read: measured on a 2-vCPU EPYC in 4 KB pages, a sequential read reaches ~23 GB/s on one core this way
   vs ~16 GB/s with the hardware prefetchers alone (prefetching every line, or into L1, or 1-4 KB ahead
   gained little); in 2 MB pages (`lmforge.infer.hugepages`) it still adds ~12% to F32. */
#define PF_DIST 16384
#define PREFETCH(p) _mm_prefetch((const char *)(p) + PF_DIST, _MM_HINT_T1)

/* the sums of 4 vectors -> one vector [sum v0, sum v1, sum v2, sum v3] */
static inline __m128 hsum4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
#define HALVES(v) _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))
    __m256 a = _mm256_hadd_ps(HALVES(v0), HALVES(v1)), b = _mm256_hadd_ps(HALVES(v2), HALVES(v3));
#undef HALVES
    __m256 c = _mm256_hadd_ps(a, b);
    return _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
}

/* out[r] = the sum of f[r], r < R (1 or 4, a constant once inlined): one reduction for 4 rows */
static inline __attribute__((always_inline)) void close_rows(const __m512 *f, int R, float *out) {
    if (R == 4)
        _mm_storeu_ps(out, hsum4(f[0], f[1], f[2], f[3]));
    else
        for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(f[r]);
}

/* F32: R consecutive rows of W [., k] (row stride ws) times M rows of x (row stride xs), out[4 m + r].
   The rows are read one after the other (one sequential stream: reading 4 rows side by side ran ~35%
   slower), each weight vector loaded once for the M rows of x; 4 accumulators per output, added in
   the same order whatever M (a row of x gets the same bits alone or in a batch); one reduction per 4. */
static inline __attribute__((always_inline)) void tile_f32(const float *w, int64_t ws, const float *x, int64_t xs,
                                                            int64_t k, int R, int M, float *out) {
    __m512 f[4][4];
    for (int r = 0; r < R; r++) {
        const float *wr = w + r * ws;
        __m512 a[4][4];
        for (int m = 0; m < M; m++)
            for (int j = 0; j < 4; j++) a[m][j] = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 64 <= k; i += 64) {
            PREFETCH(wr + i);
            for (int j = 0; j < 4; j++) {
                __m512 v = _mm512_loadu_ps(wr + i + 16 * j);
                for (int m = 0; m < M; m++) a[m][j] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + m * xs + i + 16 * j), a[m][j]);
            }
        }
        for (; i + 16 <= k; i += 16) {
            __m512 v = _mm512_loadu_ps(wr + i);
            for (int m = 0; m < M; m++) a[m][0] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + m * xs + i), a[m][0]);
        }
        if (i < k) {
            __mmask16 mk = (__mmask16)((1u << (k - i)) - 1);
            __m512 v = _mm512_maskz_loadu_ps(mk, wr + i);
            for (int m = 0; m < M; m++) a[m][1] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(mk, x + m * xs + i), a[m][1]);
        }
        for (int m = 0; m < M; m++) f[m][r] = _mm512_add_ps(_mm512_add_ps(a[m][0], a[m][1]), _mm512_add_ps(a[m][2], a[m][3]));
    }
    for (int m = 0; m < M; m++) close_rows(f[m], R, out + 4 * m);
}
#endif

#if defined(VNNI)
/* Q8_0 and Q4_0: R consecutive weight rows (read one after the other) times M rows of the rounded
   activation (row stride xs bytes; their scales and sums nb apart), out[4 m + r]; each weight vector is
   loaded and converted once for the M rows, and a row's sums are formed in the same order whatever M.
   Q8_0 as unsigned bytes w ^ 0x80 = w + 128, so vpdpbusd takes them as they are (no |w| and sign(w) x);
   the lanes start at c8 = -128 x sum(x) per block, which removes the +128 exactly (|int32| < 2^21).
   Q4_0: codes c in 0..15 (the low and high nibbles), lanes start at -8 sum(x). w: row 0's bytes, ws the
   row stride in bytes; wd row 0's fp16 scales, ds their stride. */
static inline __attribute__((always_inline)) void tile_q(int bits, const uint8_t *w, int64_t ws, const uint16_t *wd,
                                                          int64_t ds, const int8_t *x, int64_t xs, const float *xd,
                                                          const int32_t *c, int64_t nb, int R, int M, float *out) {
    const __m512i flip = _mm512_set1_epi8((char)0x80), low = _mm512_set1_epi8(15);
    __m512 f[4][4];
    for (int r = 0; r < R; r++) {
        const uint8_t *wr = w + r * ws;
        const uint16_t *dr = wd + r * ds;
        __m512 fr[4];
        __m256 f8[4];
        for (int m = 0; m < M; m++) fr[m] = _mm512_setzero_ps(), f8[m] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b += group_size(nb, b)) {
            const uint8_t *wg = wr + (bits == 8 ? 32 : 16) * b;
            const int8_t *xg = x + 32 * b;
            if (group_size(nb, b) == 16) {
                __m512i a0[4], a1[4];
                for (int m = 0; m < M; m++)
                    a0[m] = _mm512_loadu_si512((const void *)(c + m * nb + b)), a1[m] = _mm512_setzero_si512();
                for (int t = 0; t < (bits == 8 ? 8 : 4); t++) {
                    __m512i v = _mm512_loadu_si512((const void *)(wg + 64 * t));
                    /* Q8_0: a line per 256 bytes; Q4_0: per 512 (per 256 ran ~10% slower in 2 MB pages) */
                    if (bits == 8 ? t % 4 == 0 : t == 0 && b % 32 == 0) PREFETCH(wg + 64 * t);
                    if (bits == 8) {
                        __m512i u = _mm512_xor_si512(v, flip);
                        for (int m = 0; m < M; m++) {
                            __m512i xv = _mm512_loadu_si512((const void *)(xg + m * xs + 64 * t));
                            if (t % 2) a1[m] = _mm512_dpbusd_epi32(a1[m], u, xv);
                            else a0[m] = _mm512_dpbusd_epi32(a0[m], u, xv);
                        }
                    } else {
                        __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                        for (int m = 0; m < M; m++) {
                            const int8_t *xm = xg + m * xs;
                            a0[m] = _mm512_dpbusd_epi32(a0[m], lo, _mm512_loadu_si512((const void *)(xm + 64 * t)));
                            a1[m] = _mm512_dpbusd_epi32(a1[m], hi, _mm512_loadu_si512((const void *)(xm + 64 * (t + 4))));
                        }
                    }
                }
                __m512 sw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dr + b)));
                for (int m = 0; m < M; m++) {
                    __m512 s = _mm512_mul_ps(sw, _mm512_loadu_ps(xd + m * nb + b));
                    fr[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0[m], a1[m])), s, fr[m]);
                }
            } else {  /* a last group of 8 blocks: the same on 256-bit vectors */
                __m256i a0[4], a1[4];
                for (int m = 0; m < M; m++)
                    a0[m] = _mm256_loadu_si256((const __m256i *)(c + m * nb + b)), a1[m] = _mm256_setzero_si256();
                for (int t = 0; t < (bits == 8 ? 8 : 4); t++) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(wg + 32 * t));
                    if (bits == 8) {
                        __m256i u = _mm256_xor_si256(v, _mm512_castsi512_si256(flip));
                        for (int m = 0; m < M; m++) {
                            __m256i xv = _mm256_loadu_si256((const __m256i *)(xg + m * xs + 32 * t));
                            if (t % 2) a1[m] = _mm256_dpbusd_epi32(a1[m], u, xv);
                            else a0[m] = _mm256_dpbusd_epi32(a0[m], u, xv);
                        }
                    } else {
                        __m256i l4 = _mm512_castsi512_si256(low);
                        __m256i lo = _mm256_and_si256(v, l4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), l4);
                        for (int m = 0; m < M; m++) {
                            const int8_t *xm = xg + m * xs;
                            a0[m] = _mm256_dpbusd_epi32(a0[m], lo, _mm256_loadu_si256((const __m256i *)(xm + 32 * t)));
                            a1[m] = _mm256_dpbusd_epi32(a1[m], hi, _mm256_loadu_si256((const __m256i *)(xm + 32 * (t + 4))));
                        }
                    }
                }
                __m256 sw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dr + b)));
                for (int m = 0; m < M; m++) {
                    __m256 s = _mm256_mul_ps(sw, _mm256_loadu_ps(xd + m * nb + b));
                    f8[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a0[m], a1[m])), s, f8[m]);
                }
            }
        }
        for (int m = 0; m < M; m++) f[m][r] = _mm512_add_ps(fr[m], _mm512_zextps256_ps512(f8[m]));
    }
    for (int m = 0; m < M; m++) close_rows(f[m], R, out + 4 * m);
}
#endif
"""
