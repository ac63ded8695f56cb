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
  weights enter vpdpbusd as w ^ 0x80 = w + 128, the lanes starting at -128 sum(x). AVX2: the same
  order, 8 blocks per vector, `maddubs`/`madd` on |w| and sign(w) x (w + 128 would saturate int16).
  Otherwise a plain loop. All three give the same int32 per block; only the float summation order
  differs (~1e-6 relative). Widths are padded with zero blocks (scale 0) to a multiple of 256.
* F32: a dot product per row of W [N, K], or, for a transposed weight [K, N] (`TransposedLinear`),
  rows of W^T added into an L1-resident tile of outputs.
* AVX-512 (`cpu_kernel_dots`): tiles of 4 weight rows x up to 4 activation rows, the rows read one
  after the other (a single sequential stream), software prefetch into L2 16 KB ahead; with the
  weights in 2 MB pages (`lmforge.infer.hugepages`) one core streams ~32 GB/s of F32 on a 2-vCPU EPYC.
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

from . import cpu_kernel_dots, ternary_kernel

SOURCE = (
    cpu_kernel_dots.DOTS
    + r"""
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
    int32_t *c, *c8;
} act_t;

static void act_init(act_t *a, const float *x, int64_t m_rows, int64_t k, int64_t kp) {
    int64_t nb = kp / 32;
    a->kp = kp;
    a->q = (int8_t *)aligned_alloc(64, (size_t)((m_rows * kp + 63) / 64 * 64));
    a->d = (float *)malloc((size_t)(m_rows * nb) * sizeof(float));
    a->c = (int32_t *)malloc((size_t)(m_rows * nb) * sizeof(int32_t));
    a->c8 = (int32_t *)malloc((size_t)(m_rows * nb) * sizeof(int32_t));
    quantize_rows(x, m_rows, k, kp, a->q, a->d, a->c, a->c8);
}

static void act_free(act_t *a) { free(a->q); free(a->d); free(a->c); free(a->c8); }

/* out[4 mi + i] = row r + i of mat (i < nr <= 4) for activation row m + mi (mi < nm <= 4); x fp32 for
   type 0, else the rounded act. The AVX-512 kernels take 4 weight rows and 4 activation rows per call. */
static void mat_rows(const mat_t *mt, int64_t r, int nr, const float *x, const act_t *a, int64_t m, int nm,
                     float *out) {
    int64_t nb = mt->kp / 32, ws = mt->type == 0 ? mt->k : mt->type == 8 ? mt->kp : mt->kp / 2;
#if defined(__AVX512F__)
    if (mt->type == 0) {
        for (int mi = 0; mi < nm; mi += nm == 4 ? 4 : 1)
            for (int i = 0; i < nr; i += nr == 4 ? 4 : 1) {
                const float *w = (const float *)mt->w + (r + i) * ws, *xm = x + (m + mi) * mt->k;
                float *o = out + 4 * mi + i;
                if (nr == 4 && nm == 4) tile_f32(w, ws, xm, mt->k, mt->k, 4, 4, o);
                else if (nr == 4) tile_f32(w, ws, xm, mt->k, mt->k, 4, 1, o);
                else if (nm == 4) tile_f32(w, ws, xm, mt->k, mt->k, 1, 4, o);
                else tile_f32(w, ws, xm, mt->k, mt->k, 1, 1, o);
            }
        return;
    }
#endif
#if defined(VNNI)
    for (int mi = 0; mi < nm; mi += nm == 4 ? 4 : 1)
        for (int i = 0; i < nr; i += nr == 4 ? 4 : 1) {
            const uint8_t *w = (const uint8_t *)mt->w + (r + i) * ws;
            const uint16_t *wd = mt->d + (r + i) * nb;
            const int8_t *xq = a->q + (m + mi) * a->kp;
            const float *xd = a->d + (m + mi) * nb;
            const int32_t *c = (mt->type == 8 ? a->c8 : a->c) + (m + mi) * nb;
            float *o = out + 4 * mi + i;
#define TILE(R, M) mt->type == 8 ? tile_q(8, w, ws, wd, nb, xq, a->kp, xd, c, nb, R, M, o) \
                                 : tile_q(4, w, ws, wd, nb, xq, a->kp, xd, c, nb, R, M, o)
            if (nr == 4 && nm == 4) TILE(4, 4);
            else if (nr == 4) TILE(4, 1);
            else if (nm == 4) TILE(1, 4);
            else TILE(1, 1);
#undef TILE
        }
#else
    for (int mi = 0; mi < nm; mi++)
        for (int i = 0; i < nr; i++) {
            int64_t ri = r + i, mm = m + mi;
            float *o = out + 4 * mi + i;
            if (mt->type == 0)
                *o = dot_f32((const float *)mt->w + ri * ws, x + mm * mt->k, mt->k);
            else if (mt->type == 8)
                *o = dot_q8((const int8_t *)mt->w + ri * ws, mt->d + ri * nb, a->q + mm * a->kp, a->d + mm * nb, nb);
            else
                *o = dot_q4((const uint8_t *)mt->w + ri * ws, mt->d + ri * nb, a->q + mm * a->kp, a->d + mm * nb,
                            a->c + mm * nb, nb);
        }
#endif
}

/* ys[j] [m, n_j] = x [m, k] @ mats[j]^T (+ bias) for `count` matrices that share the input (q/k/v,
   gate/up): one rounding of x, one loop over all their rows. Called by every thread of an enclosing
   OpenMP team (the work is split; one team per decode step, so the threads are woken once per token,
   not once per matmul: under load a woken thread may wait a whole time slice), or outside any team
   (then serially). Returns with the team synchronized. */
static void matvecs(const mat_t *mats, int count, const float *x, int64_t m_rows, float **ys) {
    act_t a = {0};
    int64_t quant_kp = 0, total = 0;  /* total: tiles of 4 rows of the row-major matrices (types 0, 8, 4) */
    for (int j = 0; j < count; j++) {
        if (mats[j].type >= 4) quant_kp = mats[j].kp;  /* matrices sharing an input share its padded width */
        total += mats[j].type == 1 ? 0 : (mats[j].n + 3) / 4;
    }
    if (quant_kp) {
        #pragma omp single copyprivate(a)
        act_init(&a, x, m_rows, mats[0].k, quant_kp);
    }
    #pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < total; t++) {
        int j = 0;
        int64_t tt = t;
        while (mats[j].type == 1 || tt >= (mats[j].n + 3) / 4) tt -= mats[j].type == 1 ? 0 : (mats[j].n + 3) / 4, j++;
        const mat_t *mt = &mats[j];
        int64_t r = 4 * tt;
        int nr = mt->n - r < 4 ? (int)(mt->n - r) : 4;
        for (int64_t m = 0; m < m_rows; m += 4) {  /* the tile's weights stay in L1 for the next rows of x */
            int nm = m_rows - m < 4 ? (int)(m_rows - m) : 4;
            float out[16];
            mat_rows(mt, r, nr, x, &a, m, nm, out);
            for (int mi = 0; mi < nm; mi++)
                for (int i = 0; i < nr; i++)
                    ys[j][(m + mi) * mt->n + r + i] = mt->bias ? out[4 * mi + i] + mt->bias[r + i] : out[4 * mi + i];
        }
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
        for (int64_t m = 0; m < m_rows && c0 < c1; m++)  /* a few rows at most: the C step keeps nn.Linear */
            gemv_t_f32(x + m * mt->k, (const float *)mt->w, ys[j] + m * mt->n, mt->k, mt->n, c0, c1);
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
)

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
