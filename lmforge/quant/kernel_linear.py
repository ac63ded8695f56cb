"""llama.cpp's Q8_0 and Q4_0 as lmforge quantized linears (`lmforge quantize --scheme q8_0|q4_0`),
computed on CPU by the C kernels of `cpu_kernel`.

Weights: blocks of 32 along K with an fp16 scale, rounded exactly as ggml's reference quantizer
(`quantize_row_q8_0_ref` / `quantize_row_q4_0_ref`, also gguf-py's), so the blocks hold the bytes a
GGUF Q8_0/Q4_0 file holds. Activations are rounded to int8 per block of 32 at every call, as ggml
does; that rounding is part of the format's arithmetic on every path: the C kernel, and the torch
fallback (no compiler, other devices, autograd), which multiplies the dequantized activations by the
dequantized weights (a straight-through estimator lets gradients reach x, for QLoRA on these formats).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernel
from . import formats as fmt
from .linear import QuantLinear, register

BLOCK = 32


def _pad_to(k: int, multiple: int) -> int:
    return -(-k // multiple) * multiple


def _blocks(w: torch.Tensor, kp: int) -> torch.Tensor:
    """[N, K] float -> [N, kp / 32, 32] fp32, zero padded along K."""
    return F.pad(w.float(), (0, kp - w.shape[1])).reshape(w.shape[0], -1, BLOCK)


def q8_0_quantize(w: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's Q8_0: d = max|w| / 127, q = round-half-away(w / d) -> (int8 [N, kp], fp16 [N, kp/32])."""
    b = _blocks(w, kp)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    v = b * inv
    q = torch.sign(v) * torch.floor(v.abs() + 0.5)
    return q.to(torch.int8).reshape(w.shape[0], kp), d.squeeze(-1).to(torch.float16)


def q4_0_quantize(w: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's Q4_0: m = the value of largest magnitude (first one), d = m / -8, c = min(15, trunc(w / d + 8.5))
    -> (codes uint8 0..15 [N, kp], fp16 [N, kp/32])."""
    b = _blocks(w, kp)
    m = b.gather(-1, b.abs().argmax(-1, keepdim=True))
    d = m / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    c = torch.trunc(b * inv + 8.5).clamp(max=15)
    return c.to(torch.uint8).reshape(w.shape[0], kp), d.squeeze(-1).to(torch.float16)


def _byte_order(nb: int, unit_blocks: int) -> torch.Tensor:
    """The kernels' group-transposed order: blocks in groups of 16 (the last of 8), and inside a group
    4-byte unit t of every block before unit t + 1 (`unit_blocks` units per block). Returns, for each
    stored byte, its index in the block-major row."""
    order, b0 = [], 0
    while b0 < nb:
        g = 16 if nb - b0 >= 16 else 8
        order += [(b0 + j) * unit_blocks + t for t in range(unit_blocks) for j in range(g)]
        b0 += g
    return (torch.tensor(order)[:, None] * 4 + torch.arange(4)).reshape(-1)


def to_kernel_order(rows: torch.Tensor, unit_blocks: int) -> torch.Tensor:
    """Block-major [N, nb * 4 * unit_blocks] bytes -> the kernels' order."""
    return rows[:, _byte_order(rows.shape[1] // (4 * unit_blocks), unit_blocks)]


def from_kernel_order(rows: torch.Tensor, unit_blocks: int) -> torch.Tensor:
    out = torch.empty_like(rows)
    out[:, _byte_order(rows.shape[1] // (4 * unit_blocks), unit_blocks)] = rows
    return out


def pack_q4(codes: torch.Tensor) -> torch.Tensor:
    """[N, Kp] codes -> [N, Kp/2] bytes: ggml's block bytes (byte i = code i | code i + 16 << 4) in kernel order."""
    n, kp = codes.shape
    c = codes.reshape(n, kp // 32, 2, 16)
    return to_kernel_order((c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, kp // 2), 4)


def unpack_q4(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    b = from_kernel_order(packed, 4).reshape(n, half // 16, 1, 16)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(n, half * 2)


def act_dequantize(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernels round it (int8 per block of 32, d = max|x| / 127, half to even), back
    in float: x's float stand-in in the fallback. Gradients pass straight through."""
    k = x.shape[-1]
    b = _blocks(x.detach().reshape(-1, k), _pad_to(k, BLOCK))
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    xq = (torch.round(b * inv) * d).reshape(b.shape[0], -1)[:, :k].reshape(x.shape).to(x.dtype)
    return x + (xq - x).detach()


class BlockLinear(QuantLinear):
    """Shared by Q8_0 and Q4_0: fp16 block scales [N, Kp/32]; `kernel` names the C path (native, avx2,
    scalar: tests force the narrower ones); `use_kernels = False` forces the torch fallback."""

    bits = 8
    pad_multiple = 256  # the kernels take blocks in groups of 8 or 16
    kernel = "native"

    def __init__(self, in_features, out_features, bias=True, input_scale=False, device=None, dtype=torch.float32):
        super().__init__(in_features, out_features, bias, input_scale, device, dtype)
        kp = _pad_to(in_features, self.pad_multiple)
        cols = kp if self.bits == 8 else kp // 2
        qdtype = torch.int8 if self.bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.empty(out_features, cols, dtype=qdtype, device=device))
        self.register_buffer("scales", torch.empty(out_features, kp // BLOCK, dtype=fmt.SCALE_DTYPE, device=device))

    @property
    def padded_in_features(self) -> int:
        return self.scales.shape[1] * BLOCK

    def _codes(self) -> torch.Tensor:
        """Signed integer weight values [N, Kp] (w = d * value)."""
        raise NotImplementedError

    def _weight(self):
        n, kp = self.out_features, self.padded_in_features
        w = self._codes().float().reshape(n, -1, BLOCK) * self.scales.float()[..., None]
        return w.reshape(n, kp)[:, : self.in_features]

    def _kernel(self, x):
        lib = cpu_kernel.library(self.kernel)
        if lib is None:
            return None
        return cpu_kernel.quant_linear(x, self.qweight, self.scales, self.bits, lib)

    def _fallback(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return F.linear(act_dequantize(x), self._weight().to(x.dtype))
        return self._dense_mm(act_dequantize(x))


@register
class Q8_0Linear(BlockLinear):
    """llama.cpp's Q8_0: int8 blocks of 32 with an fp16 scale (8.5 bits per weight)."""

    format = "q8_0"

    def set_weight(self, w):
        q, d = q8_0_quantize(w, self.padded_in_features)
        self.qweight.copy_(to_kernel_order(q, 8)), self.scales.copy_(d)
        self._cache = self._dense = None

    def _codes(self):
        return from_kernel_order(self.qweight, 8)


@register
class Q4_0Linear(BlockLinear):
    """llama.cpp's Q4_0: 4-bit codes c in blocks of 32 with an fp16 scale, w = d (c - 8) (4.5 bits per weight)."""

    format = "q4_0"
    bits = 4

    def set_weight(self, w):
        c, d = q4_0_quantize(w, self.padded_in_features)
        self.qweight.copy_(pack_q4(c)), self.scales.copy_(d)
        self._cache = self._dense = None

    def _codes(self):
        return unpack_q4(self.qweight).to(torch.int16) - 8
