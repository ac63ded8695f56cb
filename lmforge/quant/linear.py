"""Quantized replacements for nn.Linear. Every one has `in_features`, `out_features`,
`from_float(linear, ...)`, `dequantize() -> float weight [N, K]` and a short `forward`; that is
the protocol PEFT (QLoRA) and the rest of lmforge rely on, never the concrete classes.

On CPU the forward uses torch's packed-weight kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`, `_int_mm`) when no gradient has to flow through them; they take
bf16 activations (the fp32 variants are several times slower). Anything else dequantises and
calls F.linear. Kernel-ready copies of the weights are built once, on first use, and dropped
whenever the module is moved or loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import formats as fmt
from .pack import pack_bits, packed_size, unpack_bits

FORMATS: dict[str, type[QuantLinear]] = {}


def register(cls: type[QuantLinear]) -> type[QuantLinear]:
    FORMATS[cls.format] = cls
    return cls


class QuantLinear(nn.Module):
    """Shared plumbing: bias, the optional per-input-channel pre-scale (AWQ / SmoothQuant:
    y = Q(W diag(s)) (x / s)), reshaping and the kernel cache."""

    format = ""
    use_kernels = True  # set False (class or instance) to force dequantise + matmul

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        input_scale: bool = False,
        device=None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.empty(out_features, device=device, dtype=dtype) if bias else None)
        self.register_buffer(
            "input_scale", torch.empty(in_features, device=device, dtype=dtype) if input_scale else None
        )
        self._cache = self._dense = None

    # -- construction
    @classmethod
    def from_float(cls, linear: nn.Linear, input_scale: torch.Tensor | None = None, **spec) -> QuantLinear:
        """Quantise `linear` (round to nearest). `input_scale` s: store Q(W * s) and divide x by s."""
        w = linear.weight.detach()
        m = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            input_scale is not None,
            device=w.device,
            dtype=w.dtype if w.is_floating_point() else torch.float32,
            **spec,
        )
        if input_scale is not None:
            m.input_scale.copy_(input_scale)
            w = w.float() * input_scale.float()
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        m.set_weight(w)
        return m

    def set_weight(self, w: torch.Tensor) -> None:  # pre-scaled float weight [N, K]
        raise NotImplementedError

    def spec(self) -> dict:
        """What `swap` needs to rebuild an empty module of this kind (saved in the quant config)."""
        return {
            "format": self.format,
            **self._spec(),
            **({"input_scale": True} if self.input_scale is not None else {}),
        }

    def _spec(self) -> dict:
        return {}

    # -- maths
    def _weight(self) -> torch.Tensor:
        """The stored (pre-scaled) weight, dequantised to fp32 [N, K]."""
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The float weight this module stands for: y ~= F.linear(x, dequantize(), bias)."""
        w = self._weight()
        return w if self.input_scale is None else w / self.input_scale.float()

    def _kernel(self, x: torch.Tensor) -> torch.Tensor | None:
        """Packed-kernel matmul of x [M, K] -> [M, N], or None when unavailable."""
        return None

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.use_kernels and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)
        y = self._kernel(x) if fast else None
        return self._fallback(x) if y is None else y.to(x.dtype)

    def _dense_mm(self, x: torch.Tensor) -> torch.Tensor:
        """For shapes no packed kernel takes (e.g. a width that is not a multiple of the group size):
        the weight dequantised once and kept in float for inference, instead of unpacking and
        dequantising it at every call (which made such layers many times slower than float)."""
        dense = getattr(self, "_dense", None)
        if dense is None or dense.dtype != x.dtype:
            dense = self._dense = self._weight().to(x.dtype).t().contiguous()
        return x @ dense

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight().to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        y = self._mm(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    # -- cache invalidation: any move / cast / load rebuilds the kernel-ready copies
    def _apply(self, fn, recurse=True):
        self._cache = self._dense = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = self._dense = None
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self._spec().items())
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}" + (
            f", {extra}" if extra else ""
        )


@register
class Int8Linear(QuantLinear):
    """Weight-only int8, symmetric per output channel."""

    format = "int8"

    def __init__(self, in_features, out_features, bias=True, input_scale=False, device=None, dtype=torch.float32):
        super().__init__(in_features, out_features, bias, input_scale, device, dtype)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=fmt.SCALE_DTYPE, device=device))

    def set_weight(self, w):
        q, s = fmt.sym_quantize(w, 8)
        self.weight.copy_(q), self.scales.copy_(s)
        self._cache = self._dense = None

    def _weight(self):
        return fmt.sym_dequantize(self.weight, self.scales)

    def _kernel(self, x):
        if self._cache is None:
            self._cache = self._prepack()
        if self._cache[0] == "none":
            return self._dense_mm(x)
        if self._cache[0] == "int4x2":
            _, packed, group, scales_zeros, scales = self._cache
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group, scales_zeros)
            n = self.out_features
            return (y[:, :n].float() + y[:, n:].float()) * scales
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self._cache[1], self._cache[2])

    def _prepack(self) -> tuple:
        """Kernel-ready copies. torch's int4 kernel reads memory faster at batch 1 than its int8 one,
        so an int8 code q is split into two 4-bit planes, q = 16 * hi + lo (hi in -8..7, lo in 0..15),
        stacked as one [2N, K] int4 weight: one call reads the same bytes as int8 and returns
        [16 * x.hi | x.lo], whose halves add up to x.q exactly; the fp32 channel scale is applied after.
        Shapes the int4 kernel cannot take use the int8 kernel (which crashes unless K % 16 == 0)."""
        group = next((g for g in (256, 128, 64, 32) if self.in_features % g == 0), None)
        if group is None or self.out_features % 8:
            if self.in_features % 16:
                return ("none",)
            return "int8", _aligned(self.weight), self.scales.to(torch.bfloat16)
        q = self.weight.to(torch.int32)
        lo = q & 15
        codes = torch.cat([(q - lo) // 16 + 8, lo])  # both planes as unsigned 0..15 codes
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        n, groups = self.out_features, self.in_features // group
        # tinygemm dequantises (c - 8) * scale + zero. Planes 16 * hi + 7.5 and lo - 7.5 (zeros 7.5 and
        # 0.5) still add up to q, but are centred: with lo's mean of 7.5 left in, x.lo ~ 7.5 * sum(x)
        # and the two bf16 outputs would cancel, losing precision.
        scale = torch.cat([torch.full((n, groups), 16.0), torch.ones(n, groups)])
        zero = torch.cat([torch.full((n, groups), 7.5), torch.full((n, groups), 0.5)])
        scales_zeros = torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous()
        return "int4x2", packed, group, scales_zeros, self.scales.float()


@register
class IntNLinear(QuantLinear):
    """Weight-only int2/3/4, group-wise asymmetric (scale + integer zero per group of K), packed
    densely on disk. The CPU kernel is torch's int4 one, which holds any 2..4-bit value."""

    format = "intn"

    def __init__(
        self,
        in_features,
        out_features,
        bias=True,
        input_scale=False,
        device=None,
        dtype=torch.float32,
        bits: int = 4,
        group_size: int = 128,
    ):
        super().__init__(in_features, out_features, bias, input_scale, device, dtype)
        self.bits, self.group_size = bits, fmt.check_group(in_features, group_size)
        groups = in_features // self.group_size
        self.register_buffer(
            "qweight", torch.empty(out_features, packed_size(in_features, bits), dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=fmt.SCALE_DTYPE, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.uint8, device=device))

    def _spec(self):
        return {"bits": self.bits, "group_size": self.group_size}

    def set_weight(self, w):
        self.set_quantized(*fmt.rtn_group(w, self.bits, self.group_size))

    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Store integer codes q [N, K] with scale/zero [N, G] (GPTQ/AWQ hand their own in)."""
        self.qweight.copy_(pack_bits(q, self.bits))
        self.scales.copy_(scale), self.zeros.copy_(zero)
        self._cache = self._dense = None

    def codes(self) -> torch.Tensor:
        return unpack_bits(self.qweight, self.bits, self.in_features)

    def _weight(self):
        return fmt.group_dequantize(self.codes(), self.scales, self.zeros)

    def _kernel(self, x):
        if self._cache is None:
            self._cache = self._prepack()
        if self._cache is False:
            return self._dense_mm(x)
        packed, scales_zeros = self._cache
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, self.group_size, scales_zeros)

    def _prepack(self):
        """tinygemm layout: w = (c - 8) * scale + z' with c = q + shift and z' = (8 - shift - zero) * scale,
        [G, N, 2] bf16. The shift centres 2/3-bit codes on 8 so that z', rounded to bf16, stays small."""
        if self.out_features % 16 or self.group_size not in (32, 64, 128, 256) or self.bits > 4:
            return False
        shift = 8 - 2 ** (self.bits - 1)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32) + shift, 1)
        s = self.scales.float()
        scales_zeros = torch.stack([s.t(), ((8 - shift - self.zeros.float()) * s).t()], -1)
        return packed, scales_zeros.to(torch.bfloat16).contiguous()


@register
class NF4Linear(QuantLinear):
    """QLoRA's NormalFloat4: block-wise absmax, double-quantised scales; dequantise + matmul."""

    format = "nf4"

    def __init__(
        self,
        in_features,
        out_features,
        bias=True,
        input_scale=False,
        device=None,
        dtype=torch.float32,
        block_size: int = 64,
        scale_block: int = 256,
    ):
        super().__init__(in_features, out_features, bias, input_scale, device, dtype)
        self.block_size, self.scale_block = block_size, scale_block
        numel = in_features * out_features
        blocks = -(-numel // block_size)
        self.register_buffer("qweight", torch.empty(packed_size(numel, 4), dtype=torch.uint8, device=device))
        self.register_buffer("absmax_q", torch.empty(blocks, dtype=torch.int8, device=device))
        self.register_buffer("absmax_scale", torch.empty(-(-blocks // scale_block), device=device))
        self.register_buffer("absmax_offset", torch.empty((), device=device))

    def _spec(self):
        return {"block_size": self.block_size, "scale_block": self.scale_block}

    def set_weight(self, w):
        out = fmt.nf4_quantize(w, self.block_size, self.scale_block)
        self.qweight.copy_(pack_bits(out["codes"], 4))
        for name in ("absmax_q", "absmax_scale", "absmax_offset"):
            getattr(self, name).copy_(out[name])

    def _weight(self):
        numel = self.in_features * self.out_features
        codes = unpack_bits(self.qweight, 4, numel)
        flat = fmt.nf4_dequantize(
            codes, self.absmax_q, self.absmax_scale, self.absmax_offset, self.block_size, self.scale_block
        )
        return flat.reshape(self.out_features, self.in_features)


@register
class W8A8Linear(Int8Linear):
    """SmoothQuant W8A8: int8 weights per channel, int8 activations per token (dynamic), int32
    accumulation with torch._int_mm; the smoothing factors live in `input_scale`."""

    format = "w8a8"

    def _kernel(self, x):
        if self._cache is None:
            self.weight = _aligned(self.weight)
            self._cache = (self.weight.t(), self.scales.float())
        w_t, w_scale = self._cache
        xq, x_scale = quantize_per_token(x)
        return torch._int_mm(xq, w_t).float() * x_scale * w_scale

    def _fallback(self, x):
        """Same arithmetic as the kernel, in float (autograd, other devices)."""
        xq, x_scale = quantize_per_token(x)
        return (F.linear(xq.to(x.dtype), self.weight.to(x.dtype)) * x_scale * self.scales.to(x.dtype)).to(x.dtype)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """The int8 kernels use aligned vector loads; tensors read from a safetensors file may sit at
    any byte offset (and crash them), so those get one aligned copy."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> int8 [M, K] and fp32 scale [M, 1] (symmetric, one scale per row)."""
    scale = (x.detach().float().abs().amax(-1, keepdim=True) / 127).clamp(min=1e-8)
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale
