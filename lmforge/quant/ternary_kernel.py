"""CPU matmul of int8 activations with 2-bit packed ternary weights, without unpacking the weights.

Why a C kernel and not torch: torch has no 2-bit matmul. Its options are unpacking to int8 at every
call (`unpack`: reads 2 bits per weight, then writes and reads 8) or keeping an int8 copy (`int8`:
4x the packed bytes in memory, which is what ternary storage exists to avoid); both then call
`torch._int_mm`. The kernel here reads the packed bytes directly: each 2-bit code c in {0, 1, 2}
(weight c - 1) multiplies an int8 activation with `maddubs` (AVX-512BW, else AVX2, else a scalar
loop the compiler vectorises), and sum(x (c - 1)) = sum(x c) - sum(x), so the result is the exact
int32 that `_int_mm` would return. All three paths return identical integers.

Why gcc + ctypes and not `torch.utils.cpp_extension.load_inline`: a torch extension includes the
torch headers and takes 1-2 minutes to compile on a small machine; this file is plain C (no torch
headers, < 1 s with gcc -O3 -march=native), built once per source/compiler/CPU into the user's cache
(~/.cache/lmforge/kernels, or $LMFORGE_KERNEL_CACHE) by an atomic rename. When no compiler is found
or the build fails, `available()` is False and callers use the torch paths (a warning says why).

One C call does the whole linear (per-token int8 rounding of x, matmul, scaling): at batch 1 the
overhead of a chain of small torch ops costs more than the matmul itself. Activation layout: within
each block of 4*B values (B = 64 bytes of codes with AVX-512, 32 with AVX2) the int8 activations are
reordered so that a vector of codes extracted from one bit plane meets its
activations contiguously: xp[4B j + B s + b] = x[4B j + 4b + s]. The tail after the last full block
stays in order and is done by the scalar loop.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import torch

from lmforge.common import atomic_path, atomic_write_text

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* One SIMD loop for both widths: the macros name the AVX-512BW or the AVX2 form of each operation. */
#if defined(__AVX512BW__)
#define BLOCK 64
#define SIMD 1
typedef __m512i vec;
#define LOAD(p) _mm512_loadu_si512((const void *)(p))
#define SET8 _mm512_set1_epi8
#define SET16 _mm512_set1_epi16
#define ZERO _mm512_setzero_si512
#define AND _mm512_and_si512
#define SRL16 _mm512_srli_epi16
#define MADDUBS _mm512_maddubs_epi16
#define MADD _mm512_madd_epi16
#define ADD16 _mm512_add_epi16
#define ADD32 _mm512_add_epi32
static int32_t hsum(vec v) { return _mm512_reduce_add_epi32(v); }
#elif defined(__AVX2__)
#define BLOCK 32
#define SIMD 1
typedef __m256i vec;
#define LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define SET8 _mm256_set1_epi8
#define SET16 _mm256_set1_epi16
#define ZERO _mm256_setzero_si256
#define AND _mm256_and_si256
#define SRL16 _mm256_srli_epi16
#define MADDUBS _mm256_maddubs_epi16
#define MADD _mm256_madd_epi16
#define ADD16 _mm256_add_epi16
#define ADD32 _mm256_add_epi32
static int32_t hsum(vec v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_hadd_epi32(s, s);
    s = _mm_hadd_epi32(s, s);
    return _mm_cvtsi128_si32(s);
}
#else
#define BLOCK 32
#endif

static int32_t dot_row(const uint8_t *w, const int8_t *xp, int64_t kb) {
    int64_t blocks = kb / BLOCK, b;
    int32_t acc = 0;
#ifdef SIMD
    const vec mask = SET8(3), ones = SET16(1);
    vec acc32 = ZERO();
    for (int64_t j = 0; j < blocks; j++) {
        vec v = LOAD(w + BLOCK * j);
        const int8_t *x = xp + 4 * BLOCK * j;
        /* bit plane s of the codes (c in 0..2) times its activations; 4 planes of pair sums <= 508
           add up to at most 2032 in int16: no saturation before widening to int32 */
        vec s16 = MADDUBS(AND(v, mask), LOAD(x));
        s16 = ADD16(s16, MADDUBS(AND(SRL16(v, 2), mask), LOAD(x + BLOCK)));
        s16 = ADD16(s16, MADDUBS(AND(SRL16(v, 4), mask), LOAD(x + 2 * BLOCK)));
        s16 = ADD16(s16, MADDUBS(AND(SRL16(v, 6), mask), LOAD(x + 3 * BLOCK)));
        acc32 = ADD32(acc32, MADD(s16, ones));
    }
    acc = hsum(acc32);
#else
    for (int64_t j = 0; j < blocks; j++)
        for (int s = 0; s < 4; s++)
            for (int64_t i = 0; i < BLOCK; i++)
                acc += ((w[BLOCK * j + i] >> (2 * s)) & 3) * xp[4 * BLOCK * j + BLOCK * s + i];
#endif
    for (b = blocks * BLOCK; b < kb; b++)  /* tail: activations in their original order */
        for (int s = 0; s < 4; s++)
            acc += ((w[b] >> (2 * s)) & 3) * xp[4 * b + s];
    return acc;
}

/* y[m, n] = s_x[m] * s_w * sum_k (code[n, k] - 1) * x_q[m, k], with x_q the int8 per-token absmax
   rounding of the fp32 activations x [m_rows, k] (as quantize_per_token: s_x = max|x| / 127, floored at
   1e-8, round half to even, clamp +-127). w [n_out, kb] packed. Everything happens in this one call:
   per-op overhead of a chain of small torch ops would cost more than the matmul at batch 1. */
void ternary_linear(const float *x, const uint8_t *w, float w_scale, float *y,
                    int64_t m_rows, int64_t n_out, int64_t k, int64_t kb, int threads) {
    int8_t *xp = (int8_t *)calloc((size_t)(m_rows * 4 * kb), 1);
    int32_t *xsum = (int32_t *)calloc((size_t)m_rows, sizeof(int32_t));
    float *scale = (float *)malloc((size_t)m_rows * sizeof(float));
    int64_t full = (kb / BLOCK) * 4 * BLOCK;
    for (int64_t m = 0; m < m_rows; m++) {
        const float *xr = x + m * k;
        float amax = 0.0f;
        for (int64_t i = 0; i < k; i++) amax = fmaxf(amax, fabsf(xr[i]));
        float s = fmaxf(amax / 127.0f, 1e-8f);
        int32_t sum = 0;
        for (int64_t i = 0; i < k; i++) {
            float q = fminf(fmaxf(nearbyintf(xr[i] / s), -127.0f), 127.0f);
            /* position in the kernel layout: inside full blocks, plane i % 4 of block i / (4 BLOCK) */
            int64_t j = i / (4 * BLOCK), r = i % (4 * BLOCK);
            int64_t pos = i < full ? 4 * BLOCK * j + BLOCK * (r % 4) + r / 4 : i;
            xp[m * 4 * kb + pos] = (int8_t)q;
            sum += (int32_t)q;
        }
        xsum[m] = sum;
        scale[m] = s * w_scale;
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < n_out; n++)
        for (int64_t m = 0; m < m_rows; m++)
            y[m * n_out + n] = (float)(dot_row(w + n * kb, xp + m * 4 * kb, kb) - xsum[m]) * scale[m];
    free(xp); free(xsum); free(scale);
}
"""

_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_TRIED = False


def cache_dir() -> Path:
    return Path(os.environ.get("LMFORGE_KERNEL_CACHE") or Path.home() / ".cache" / "lmforge" / "kernels")


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def compile_library(name: str, source: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile (or reuse) `source` as a shared library named `name` in the kernel cache; `extra_flags`
    (e.g. -mno-avx512bw) select narrower paths in tests. Shared with `cpu_kernel`."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc/cc) on PATH")
    flags = ["-O3", "-march=native", *extra_flags, "-fopenmp", "-shared", "-fPIC"]
    # -march=native: the binary is only valid on this CPU, so the CPU's flags are part of the key.
    key = hashlib.sha256("\0".join([source, cc, *flags, _cpu_flags(), sys.platform]).encode()).hexdigest()[:16]
    lib = cache_dir() / f"{name}-{key}.so"
    if not lib.is_file():
        src = cache_dir() / f"{name}-{key}.c"
        atomic_write_text(src, source)
        with atomic_path(lib) as tmp:  # concurrent builders each write their own file; one rename wins
            run = subprocess.run([cc, *flags, str(src), "-o", str(tmp)], capture_output=True, text=True, timeout=120)
            if run.returncode != 0:
                raise RuntimeError(f"{cc} failed: {run.stderr.strip()[-500:]}")
    return ctypes.CDLL(str(lib))


def _build(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The ternary kernel, compiled (or reused) with `extra_flags`."""
    dll = compile_library("ternary", SOURCE, extra_flags)
    dll.ternary_linear.restype = None
    dll.ternary_linear.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_float, ctypes.c_void_p] + [ctypes.c_int64] * 4
    dll.ternary_linear.argtypes += [ctypes.c_int]
    return dll


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None (once warned) when it cannot be built."""
    global _LIB, _TRIED
    with _LOCK:
        if not _TRIED:
            _TRIED = True
            if os.environ.get("LMFORGE_TERNARY_KERNEL", "1") != "0":
                try:
                    _LIB = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    warnings.warn(f"ternary C kernel unavailable ({e}); using the torch path", stacklevel=2)
    return _LIB


def available() -> bool:
    return library() is not None


def ternary_linear(x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """fp32 [M, N] = act8(x [M, K]) @ ((codes - 1) * w_scale)^T, codes 2-bit packed in `packed`
    [N, ceil(K/4)]; the same numbers as `torch._int_mm` on `quantize_per_token(x)` scaled by s_x * s_w."""
    lib = library()
    if lib is None:
        raise RuntimeError("the ternary C kernel is not available")
    x = x.detach().to(torch.float32).contiguous()
    w = packed.contiguous()
    (m, k), (n, kb) = x.shape, w.shape
    y = torch.empty(m, n, dtype=torch.float32)
    lib.ternary_linear(x.data_ptr(), w.data_ptr(), float(w_scale), y.data_ptr(), m, n, k, kb, torch.get_num_threads())
    return y
