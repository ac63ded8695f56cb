"""Batch-1 CPU matmuls in C, at llama.cpp's level: Q8_0 and Q4_0 (ggml's block formats) and F32.

Why: at batch 1 a decode step reads every weight once; torch's packed int8/int4 CPU kernels take
bf16 activations and ran at 0.4-0.5x llama.cpp's rate on the same bytes. Here each linear is one C
call doing what ggml's CPU backend does:

* Q8_0 weights: blocks of 32 int8 with an fp16 scale d (w = d q). Q4_0: blocks of 32 4-bit codes c
  with an fp16 scale (w = d (c - 8)), ggml's 16 bytes per block. The rounding is ggml's reference, so
  the blocks hold the bytes llama.cpp's quantizer writes; only their order differs (below).
* Activations are rounded to int8 per block of 32 (d_x = max|x| / 127, round half to even), as ggml
  does for both formats, so each block's dot product is an exact int32:
  y = sum_b d_w[b] d_x[b] dot(q_w[b], q_x[b])   (Q4_0: dot(c - 8, q_x) = dot(c, q_x) - 8 sum(q_x)).
* Order: blocks in groups of 16 (the last of 8), each group stored unit-major (4-byte unit t of all
  its blocks, then unit t + 1), weights and activations alike. A 64-byte vector then holds one unit of
  16 blocks, so `vpdpbusd` (AVX-512 VNNI, u8 x s8 -> s32) accumulates 16 blocks' dots in its 16 lanes
  and one convert + FMA with the 16 scales closes the group (a block-major order needed a shuffle of
  the scales per pair of blocks: this order made the Q4_0 decode step ~20% faster). Q8_0's signed
  weights go through |w| and sign(w) x. AVX2: the same order, 8 blocks per vector, `maddubs`/`madd`.
  Otherwise a plain loop. All three give the same int32 per block; only the float summation order
  differs (~1e-6 relative). Widths are padded with zero blocks (scale 0) to a multiple of 256.
* F32: a dot product per row of W [N, K], or, for a transposed weight [K, N] (`TransposedLinear`),
  rows of W^T added into an L1-resident tile of outputs.
* Two or more threads split the output rows with OpenMP (torch.get_num_threads()); one thread skips it.

Built with gcc -O3 -march=native once per source/compiler/CPU into `ternary_kernel`'s cache; without
a compiler (or with LMFORGE_CPU_KERNEL=0) the formats run in torch with the same arithmetic.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import warnings

import torch

from . import ternary_kernel

SOURCE = r"""
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

/* x [m, k] fp32 -> int8 [m, kp] (zero padded, group-transposed), scales d and -8 x block sums c [m, kp/32] */
static void quantize_rows(const float *x, int64_t m_rows, int64_t k, int64_t kp, int8_t *q, float *d, int32_t *c) {
    int64_t nb = kp / 32;
    for (int64_t m = 0; m < m_rows; m++)
        for (int64_t g0 = 0; g0 < nb; g0 += group_size(nb, g0)) {
            int64_t g = group_size(nb, g0);
            for (int64_t j = 0; j < g; j++) {
                int64_t b = g0 + j;
                const float *xr = x + m * k + 32 * b;
                int64_t n = k - 32 * b < 32 ? (k - 32 * b > 0 ? k - 32 * b : 0) : 32;
                float amax = 0.0f;
                for (int64_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(xr[i]));
                float db = amax / 127.0f, id = db > 0.0f ? 1.0f / db : 0.0f;
                int32_t sum = 0;
                int8_t *qg = q + m * kp + 32 * g0;
                for (int64_t i = 0; i < 32; i++) {
                    int v = i < n ? (int)nearbyintf(xr[i] * id) : 0;
                    qg[(i / 4) * 4 * g + 4 * j + i % 4] = (int8_t)v;
                    sum += v;
                }
                d[m * nb + b] = db;
                c[m * nb + b] = -8 * sum;
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
#if defined(VNNI)
    __m512 f = _mm512_setzero_ps();
    __m256 f8 = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b += group_size(nb, b)) {
        const int8_t *wg = w + 32 * b, *xg = x + 32 * b;
        if (group_size(nb, b) == 16) {
            __m512i a = _mm512_setzero_si512();
            for (int t = 0; t < 8; t++) {
                __m512i wv = _mm512_loadu_si512((const void *)(wg + 64 * t));
                __m512i xv = _mm512_loadu_si512((const void *)(xg + 64 * t));
                __m512i sx = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(wv), _mm512_setzero_si512(), xv);
                a = _mm512_dpbusd_epi32(a, _mm512_abs_epi8(wv), sx);
            }
            __m512 s = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wd + b))), _mm512_loadu_ps(xd + b));
            f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), s, f);
        } else {
            __m256i a = _mm256_setzero_si256();
            for (int t = 0; t < 8; t++) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(wg + 32 * t));
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xg + 32 * t));
                __m256i sx = _mm256_mask_sub_epi8(xv, _mm256_movepi8_mask(wv), _mm256_setzero_si256(), xv);
                a = _mm256_dpbusd_epi32(a, _mm256_abs_epi8(wv), sx);
            }
            __m256 s = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + b))), _mm256_loadu_ps(xd + b));
            f8 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), s, f8);
        }
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(f, _mm512_castps256_ps512(f8)));
#elif defined(AVX2)
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
#if defined(VNNI)
    __m512 f = _mm512_setzero_ps();
    __m256 f8 = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b += group_size(nb, b)) {
        const uint8_t *wg = w + 16 * b;
        const int8_t *xg = x + 32 * b;
        if (group_size(nb, b) == 16) {
            const __m512i low = _mm512_set1_epi8(15);
            __m512i a = _mm512_loadu_si512((const void *)(c + b));
            for (int t = 0; t < 4; t++) {
                __m512i v = _mm512_loadu_si512((const void *)(wg + 64 * t));
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                a = _mm512_dpbusd_epi32(a, _mm512_and_si512(v, low), _mm512_loadu_si512((const void *)(xg + 64 * t)));
                a = _mm512_dpbusd_epi32(a, hi, _mm512_loadu_si512((const void *)(xg + 64 * (t + 4))));
            }
            __m512 s = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wd + b))), _mm512_loadu_ps(xd + b));
            f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), s, f);
        } else {
            const __m256i low = _mm256_set1_epi8(15);
            __m256i a = _mm256_loadu_si256((const __m256i *)(c + b));
            for (int t = 0; t < 4; t++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(wg + 32 * t));
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                a = _mm256_dpbusd_epi32(a, _mm256_and_si256(v, low), _mm256_loadu_si256((const __m256i *)(xg + 32 * t)));
                a = _mm256_dpbusd_epi32(a, hi, _mm256_loadu_si256((const __m256i *)(xg + 32 * (t + 4))));
            }
            __m256 s = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + b))), _mm256_loadu_ps(xd + b));
            f8 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), s, f8);
        }
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(f, _mm512_castps256_ps512(f8)));
#elif defined(AVX2)
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

/* y[c0:c1] = x [k] @ wt[:, c0:c1], wt fp32 [k, n] (a transposed weight, as TransposedLinear keeps it):
   row k of the weight streams through once; a tile of 2048 outputs stays in L1 while 4 rows of the
   weight are added into it (this reads memory faster here than a dot product per output row). */
static void gemv_t_f32(const float *x, const float *wt, float *y, int64_t k, int64_t n, int64_t c0, int64_t c1) {
    for (int64_t t0 = c0; t0 < c1; t0 += 2048) {
        int64_t len = c1 - t0 < 2048 ? c1 - t0 : 2048, kk = 0;
        float *yt = y + t0;
        for (int64_t j = 0; j < len; j++) yt[j] = 0.0f;
        for (; kk + 4 <= k; kk += 4) {
            const float *r0 = wt + kk * n + t0, *r1 = r0 + n, *r2 = r1 + n, *r3 = r2 + n;
            float x0 = x[kk], x1 = x[kk + 1], x2 = x[kk + 2], x3 = x[kk + 3];
            int64_t j = 0;
#if defined(__AVX512F__)
            __m512 v0 = _mm512_set1_ps(x0), v1 = _mm512_set1_ps(x1), v2 = _mm512_set1_ps(x2), v3 = _mm512_set1_ps(x3);
            for (; j + 16 <= len; j += 16) {
                __m512 a = _mm512_fmadd_ps(_mm512_loadu_ps(r0 + j), v0, _mm512_loadu_ps(yt + j));
                a = _mm512_fmadd_ps(_mm512_loadu_ps(r1 + j), v1, a);
                a = _mm512_fmadd_ps(_mm512_loadu_ps(r2 + j), v2, a);
                _mm512_storeu_ps(yt + j, _mm512_fmadd_ps(_mm512_loadu_ps(r3 + j), v3, a));
            }
#elif defined(AVX2)
            __m256 v0 = _mm256_set1_ps(x0), v1 = _mm256_set1_ps(x1), v2 = _mm256_set1_ps(x2), v3 = _mm256_set1_ps(x3);
            for (; j + 8 <= len; j += 8) {
                __m256 a = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + j), v0, _mm256_loadu_ps(yt + j));
                a = _mm256_fmadd_ps(_mm256_loadu_ps(r1 + j), v1, a);
                a = _mm256_fmadd_ps(_mm256_loadu_ps(r2 + j), v2, a);
                _mm256_storeu_ps(yt + j, _mm256_fmadd_ps(_mm256_loadu_ps(r3 + j), v3, a));
            }
#endif
            for (; j < len; j++) yt[j] += r0[j] * x0 + r1[j] * x1 + r2[j] * x2 + r3[j] * x3;
        }
        for (; kk < k; kk++)
            for (int64_t j = 0; j < len; j++) yt[j] += wt[kk * n + t0 + j] * x[kk];
    }
}

/* y[:, c0:c1] = x [m, k] @ wt[:, c0:c1] for several rows m (a speculative verification, a prefill chunk): the
   products are then bound by FMA throughput, not memory, so 4 rows x 64 columns of outputs stay in registers
   while 16 rows of the weight pass (each 16-float weight vector feeds 4 FMAs); the 16-row blocks keep the
   weight's reads to 16 sequential streams. A group of fewer than 4 rows repeats its first (not stored). */
static void gemm_t_f32(const float *x, int64_t m_rows, const float *wt, float *y, int64_t k, int64_t n, int64_t c0,
                       int64_t c1) {
    int64_t j0 = c0;
#if defined(__AVX512F__)
    for (int64_t m0 = 0; m0 < m_rows && m_rows > 1; m0 += 4) {  /* one row: gemv_t_f32's memory-bound stream */
        int64_t mr = m_rows - m0 < 4 ? m_rows - m0 : 4;
        const float *xr[4];
        for (int64_t m = 0; m < 4; m++) xr[m] = x + (m0 + (m < mr ? m : 0)) * k;
        for (int64_t m = 0; m < mr; m++) memset(y + (m0 + m) * n + c0, 0, (size_t)(c1 - c0) * sizeof(float));
        for (int64_t k0 = 0; k0 < k; k0 += 16) {
            int64_t k1 = k0 + 16 < k ? k0 + 16 : k;
            for (j0 = c0; j0 + 64 <= c1; j0 += 64) {
                __m512 acc[4][4];
                for (int m = 0; m < 4; m++)
                    for (int i = 0; i < 4; i++) acc[m][i] = _mm512_loadu_ps(y + (m0 + (m < mr ? m : 0)) * n + j0 + 16 * i);
                for (int64_t kk = k0; kk < k1; kk++) {
                    const float *r = wt + kk * n + j0;
                    __m512 w[4] = {_mm512_loadu_ps(r), _mm512_loadu_ps(r + 16), _mm512_loadu_ps(r + 32), _mm512_loadu_ps(r + 48)};
                    for (int m = 0; m < 4; m++) {
                        __m512 xv = _mm512_set1_ps(xr[m][kk]);
                        for (int i = 0; i < 4; i++) acc[m][i] = _mm512_fmadd_ps(w[i], xv, acc[m][i]);
                    }
                }
                for (int64_t m = 0; m < mr; m++)
                    for (int i = 0; i < 4; i++) _mm512_storeu_ps(y + (m0 + m) * n + j0 + 16 * i, acc[m][i]);
            }
        }
    }
#endif
    for (int64_t m = 0; m < m_rows && j0 < c1; m++) gemv_t_f32(x + m * k, wt, y + m * n, k, n, j0, c1);  /* the rest */
}

/* A linear layer's weights: type 0 fp32 [n, k]; 1 fp32 transposed [k, n]; 8 Q8_0 int8 [n, kp]; 4 Q4_0 [n, kp/2] (fp16 scales d
   [n, kp/32]); bias fp32 [n] or NULL. */
typedef struct {
    int64_t type;
    const void *w;
    const uint16_t *d;
    const float *bias;
    int64_t n, k, kp;
} mat_t;

/* activation rows rounded to int8 blocks, shared by every quantized matrix that reads them */
typedef struct {
    int64_t kp;
    int8_t *q;
    float *d;
    int32_t *c;
} act_t;

static void act_init(act_t *a, const float *x, int64_t m_rows, int64_t k, int64_t kp) {
    int64_t nb = kp / 32;
    a->kp = kp;
    a->q = (int8_t *)aligned_alloc(64, (size_t)((m_rows * kp + 63) / 64 * 64));
    a->d = (float *)malloc((size_t)(m_rows * nb) * sizeof(float));
    a->c = (int32_t *)malloc((size_t)(m_rows * nb) * sizeof(int32_t));
    quantize_rows(x, m_rows, k, kp, a->q, a->d, a->c);
}

static void act_free(act_t *a) { free(a->q); free(a->d); free(a->c); }

/* row r of mat for activation row m (x fp32 for type 0, else the rounded act) */
static float mat_row(const mat_t *mt, int64_t r, const float *x, const act_t *a, int64_t m) {
    int64_t nb = mt->kp / 32;
    float v;
    if (mt->type == 0)
        v = dot_f32((const float *)mt->w + r * mt->k, x + m * mt->k, mt->k);
    else if (mt->type == 8)
        v = dot_q8((const int8_t *)mt->w + r * mt->kp, mt->d + r * nb, a->q + m * a->kp, a->d + m * nb, nb);
    else
        v = dot_q4((const uint8_t *)mt->w + r * (mt->kp / 2), mt->d + r * nb, a->q + m * a->kp, a->d + m * nb,
                   a->c + m * nb, nb);
    return mt->bias ? v + mt->bias[r] : v;
}

/* ys[j] [m, n_j] = x [m, k] @ mats[j]^T (+ bias) for `count` matrices that share the input (q/k/v,
   gate/up): one rounding of x, one loop over all their rows. Called by every thread of an enclosing
   OpenMP team (the work is split; one team per decode step, so the threads are woken once per token,
   not once per matmul: under load a woken thread may wait a whole time slice), or outside any team
   (then serially). Returns with the team synchronized. */
static void matvecs(const mat_t *mats, int count, const float *x, int64_t m_rows, float **ys) {
    act_t a = {0};
    int64_t quant_kp = 0, total = 0;  /* total: rows of the row-major matrices (types 0, 8, 4) */
    for (int j = 0; j < count; j++) {
        if (mats[j].type >= 4) quant_kp = mats[j].kp;  /* matrices sharing an input share its padded width */
        total += mats[j].type == 1 ? 0 : mats[j].n;
    }
    if (quant_kp) {
        #pragma omp single copyprivate(a)
        act_init(&a, x, m_rows, mats[0].k, quant_kp);
    }
    #pragma omp for schedule(static) nowait
    for (int64_t r = 0; r < total; r++) {
        int j = 0;
        int64_t rr = r;
        while (mats[j].type == 1 || rr >= mats[j].n) rr -= mats[j].type == 1 ? 0 : mats[j].n, j++;
        for (int64_t m = 0; m < m_rows; m++) ys[j][m * mats[j].n + rr] = mat_row(&mats[j], rr, x, &a, m);
    }
    /* transposed fp32: each thread takes a slice of the columns (16-aligned) */
    int tid = 0, nth = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num(), nth = omp_get_num_threads();
#endif
    for (int j = 0; j < count; j++) {
        const mat_t *mt = &mats[j];
        if (mt->type != 1) continue;
        int64_t per = (mt->n / nth + 15) / 16 * 16, c0 = per * tid, c1 = tid == nth - 1 ? mt->n : per * (tid + 1);
        if (c1 > mt->n) c1 = mt->n;
        if (c0 < c1) gemm_t_f32(x, m_rows, (const float *)mt->w, ys[j], mt->k, mt->n, c0, c1);
        for (int64_t m = 0; m < m_rows && c0 < c1 && mt->bias; m++)
            for (int64_t c = c0; c < c1; c++) ys[j][m * mt->n + c] += mt->bias[c];
    }
    #pragma omp barrier
    if (quant_kp) {
        #pragma omp single
        act_free(&a);
    }
}

/* y [m, n] = act8(x [m, k]) @ W^T, W Q8_0 (bits 8: q int8 [n, kp]) or Q4_0 (bits 4: [n, kp/2]), scales fp16 [n, kp/32] */
void quant_linear(const float *x, const void *w, const uint16_t *wd, float *y, int64_t m_rows, int64_t n_out,
                  int64_t k, int64_t kp, int bits, int threads) {
    mat_t mt = {bits, w, wd, NULL, n_out, k, kp};
    #pragma omp parallel if(threads > 1) num_threads(threads)
    matvecs(&mt, 1, x, m_rows, &y);
}

/* y [m, n] = x [m, k] @ W^T, W fp32 [n, k] (transposed = 0) or its transpose [k, n] (transposed = 1) */
void f32_linear(const float *x, const float *w, float *y, int64_t m_rows, int64_t n_out, int64_t k, int transposed,
                int threads) {
    mat_t mt = {transposed, w, NULL, NULL, n_out, k, k};
    #pragma omp parallel if(threads > 1) num_threads(threads)
    matvecs(&mt, 1, x, m_rows, &y);
}

"""

_LOCK = threading.Lock()
_LIBS: dict[tuple[str, ...], ctypes.CDLL | None] = {}
PATHS = {2: "avx512-vnni", 1: "avx2", 0: "scalar"}
PATH_FLAGS = {"native": (), "avx2": ("-mno-avx512f",), "scalar": ("-mno-avx2", "-mno-avx512f", "-mno-fma")}


def _declare(dll: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    dll.quant_linear.restype = dll.f32_linear.restype = None
    dll.quant_linear.argtypes = [ptr] * 4 + [i64] * 4 + [ctypes.c_int] * 2
    dll.f32_linear.argtypes = [ptr] * 3 + [i64] * 3 + [ctypes.c_int] * 2
    dll.kernel_path.restype = ctypes.c_int
    return dll


def library(path: str = "native", extra: str = "") -> ctypes.CDLL | None:
    """The kernels for `path` (native, avx2, scalar), built on first use; None (once warned) when they
    cannot be built. `extra`: more C compiled after SOURCE into the same library (fused_block's step)."""
    key = (*PATH_FLAGS[path], extra)
    with _LOCK:
        if key not in _LIBS:
            _LIBS[key] = None
            if os.environ.get("LMFORGE_CPU_KERNEL", "1") != "0":
                name = "cpu-block" if extra else "cpu"
                try:
                    _LIBS[key] = _declare(ternary_kernel.compile_library(name, SOURCE + extra, PATH_FLAGS[path]))
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    warnings.warn(f"CPU C kernels unavailable ({e}); using the torch paths", stacklevel=2)
    return _LIBS[key]


def available() -> bool:
    return library() is not None


def kernel_path(lib: ctypes.CDLL | None = None) -> str:
    lib = lib or library()
    return "torch" if lib is None else PATHS[lib.kernel_path()]


def quant_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, lib: ctypes.CDLL | None = None
) -> torch.Tensor:
    """fp32 [M, N] = act8(x [M, K]) @ W^T for Q8_0 (bits 8, qweight int8 [N, Kp]) or Q4_0 (bits 4,
    uint8 [N, Kp/2]), fp16 scales [N, Kp/32]; K <= Kp, the padding blocks have scale 0."""
    lib = lib or library()
    x = x.detach().to(torch.float32).contiguous()
    (m, k), n, kp = x.shape, qweight.shape[0], scales.shape[1] * 32
    y = torch.empty(m, n, dtype=torch.float32)
    args = (x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), y.data_ptr(), m, n, k, kp, bits)
    lib.quant_linear(*args, torch.get_num_threads())
    return y


def f32_linear(
    x: torch.Tensor, weight: torch.Tensor, transposed: bool = False, lib: ctypes.CDLL | None = None
) -> torch.Tensor:
    """fp32 [M, N] = x [M, K] @ W^T, `weight` W [N, K] or, `transposed`, W^T [K, N] (contiguous fp32)."""
    lib = lib or library()
    x = x.detach().to(torch.float32).contiguous()
    (m, k), n = x.shape, weight.shape[int(transposed)]
    y = torch.empty(m, n, dtype=torch.float32)
    lib.f32_linear(x.data_ptr(), weight.data_ptr(), y.data_ptr(), m, n, k, int(transposed), torch.get_num_threads())
    return y
