"""Ternary weights, BitNet b1.58 (Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models
are in 1.58 Bits"): every weight of a linear is -1, 0 or +1 times one per-tensor scale, the mean
absolute weight (absmean), and the activations entering it are rounded to 8 bits per token (absmax).
Rounding a float model to three levels after training ruins it, so the weights are learned under
that rounding (quantization-aware training with the straight-through estimator):

    prepare_bitnet(model)   # nn.Linear -> BitLinear: same parameters, forward sees ternary W and int8 x
    ...train...             # (`lmforge quantize --method bitnet` runs a short fine-tune here)
    convert_bitnet(model)   # BitLinear -> TernaryLinear (2-bit packed), recorded in the manifest

Storage: codes q + 1 in {0, 1, 2}, four per byte along K (`pack_bits`, 2 bits), and one fp32 scale
per matrix. Forward: y = (x_q @ q^T) * s_x * s_w; the integer product is exact (ternary_kernel).
The paper's extra RMSNorm inside each BitLinear is not added: the swap keeps the model's
architecture and parameters, so a float checkpoint fine-tunes into a ternary one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.common import LmforgeError

from . import ternary_kernel
from .linear import QuantLinear, _aligned, quantize_per_token, register
from .pack import pack_bits, packed_size
from .qat import FakeQuantLinear
from .scheme import DEFAULT_SKIP, linear_names, make_quant_linear, quant_config, record, set_module

EPS = 1e-5  # the scale's floor: an all-zero matrix stays zero instead of dividing by zero
KERNELS = ("auto", "c", "int8", "unpack")
# The C kernel is a matrix-vector product per token; above this many rows (long prefills) unpacking
# once and oneDNN's int8 GEMM is faster (2048 x 768 layer, 1 thread, AVX-512 Xeon: equal at 64-128
# rows, unpacking 2.3x faster at 256; the C kernel 18x faster at 1 row).
C_MAX_TOKENS = 64


def absmean_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 in {-1, 0, 1}, fp32 scale []): scale = mean|w|, q = round(clip(w / scale, -1, 1))."""
    w = w.detach().float()
    scale = w.abs().mean().clamp(min=EPS)
    return torch.round((w / scale).clamp(-1, 1)).to(torch.int8), scale


def fake_ternary(w: torch.Tensor) -> torch.Tensor:
    """The ternary weight in the forward, the identity in the backward (straight-through estimator)."""
    q, scale = absmean_quantize(w)
    return w + (q.to(w.dtype) * scale.to(w.dtype) - w).detach()


def fake_act8(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax 8-bit activations in the forward, the identity in the backward."""
    xq, xs = quantize_per_token(x.detach().reshape(-1, x.shape[-1]))
    return x + ((xq.float() * xs).reshape(x.shape).to(x.dtype) - x).detach()


def unpack_ternary(packed: torch.Tensor, k: int) -> torch.Tensor:
    """[N, ceil(K/4)] packed codes -> int8 [N, K] weights in {-1, 0, 1}. One uint8 shift by a scalar
    per bit plane: 2-6x faster than a broadcast shift tensor, an int64 detour or a lookup table."""
    planes = torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], -1)
    return planes.reshape(*packed.shape[:-1], -1)[..., :k].view(torch.int8) - 1


class BitLinear(nn.Linear):
    """QAT stand-in for nn.Linear (same parameters and state-dict keys, so training loops, optimizers
    and checkpoints work unchanged): F.linear(act8(x), ternary(W)) with straight-through gradients."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BitLinear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        m.weight, m.bias = linear.weight, linear.bias  # shared: no copy, optimizer state carries over
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_act8(x), fake_ternary(self.weight), self.bias)


@register
class TernaryLinear(QuantLinear):
    """W1.58A8: 2-bit packed ternary codes + one fp32 scale; activations rounded to int8 per token.

    `kernel` picks the CPU matmul (all give the same int32 products): "c" the packed C kernel,
    "int8" an int8 copy of the weight kept for `torch._int_mm` (fast, 4x the memory), "unpack"
    unpacking to int8 at every call, "auto" the C kernel up to C_MAX_TOKENS rows and unpacking for
    longer inputs, or unpacking alone when the C kernel cannot be built."""

    format = "ternary"
    kernel = "auto"

    def __init__(self, in_features, out_features, bias=True, input_scale=False, device=None, dtype=torch.float32):
        super().__init__(in_features, out_features, bias, input_scale, device, dtype)
        k_bytes = packed_size(in_features, 2)
        self.register_buffer("qweight", torch.empty(out_features, k_bytes, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.empty((), dtype=torch.float32, device=device))

    def set_weight(self, w: torch.Tensor) -> None:
        q, scale = absmean_quantize(w)
        self.qweight.copy_(pack_bits(q + 1, 2))
        self.weight_scale.copy_(scale)
        self._cache = self._dense = None

    def codes(self) -> torch.Tensor:
        """int8 [N, K] in {-1, 0, 1}."""
        return unpack_ternary(self.qweight, self.in_features)

    def _weight(self) -> torch.Tensor:
        return self.codes().float() * self.weight_scale.float()

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        """The dequantized float matmul on 8-bit activations (autograd: straight-through for x)."""
        return F.linear(fake_act8(x), self._weight().to(x.dtype))

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel
        if kernel not in KERNELS:
            raise LmforgeError(f"TernaryLinear.kernel {kernel!r}: choose from {', '.join(KERNELS)}")
        if kernel == "c" and not ternary_kernel.available():
            raise LmforgeError("TernaryLinear.kernel 'c': the C kernel could not be built (see the warning)")
        if kernel == "auto":
            small = x.shape[0] <= C_MAX_TOKENS and ternary_kernel.available()
            kernel = "c" if small else "unpack"
        if kernel == "c":
            return ternary_kernel.ternary_linear(x, self.qweight, self.weight_scale)
        if kernel == "int8":
            if self._cache is None:
                self._cache = _aligned(self.codes())
            w = self._cache
        else:
            w = self.codes()
        xq, xs = quantize_per_token(x)
        # (K == 1: _int_mm misreads the transpose of an [N, 1] matrix, strides (1, 1); a view has (N, 1))
        acc = torch._int_mm(xq, w.t() if w.shape[1] > 1 else w.view(1, -1))
        return acc.float() * (xs * self.weight_scale)


def prepare_bitnet(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> nn.Module:
    """Swap the float nn.Linear modules (those `skip` leaves) for BitLinear, in place."""
    if any(isinstance(m, (QuantLinear, FakeQuantLinear)) for m in model.modules()):
        raise LmforgeError("bitnet QAT starts from a float model: this one is already quantized (or in int QAT)")
    names = linear_names(model, skip)
    if not names:
        raise LmforgeError("bitnet QAT: no linear layer left to make ternary (check --skip)")
    for name in names:
        if type(model.get_submodule(name)) is nn.Linear:
            set_module(model, name, BitLinear.from_linear(model.get_submodule(name)))
    return model


def convert_bitnet(model: nn.Module) -> nn.Module:
    """BitLinear -> TernaryLinear (rounded exactly as training saw it), recorded in the manifest."""
    found = False
    for name, m in list(model.named_modules()):
        if isinstance(m, BitLinear):
            set_module(model, name, make_quant_linear(m, {"format": "ternary"}))
            found = True
    if not found:
        raise LmforgeError("convert_bitnet: the model has no BitLinear layer (run prepare_bitnet and train first)")
    record(model, quant_config(model, "bitnet"))
    return model
