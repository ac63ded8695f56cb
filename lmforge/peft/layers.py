"""Adapter layers that wrap a linear `base_layer`: LoRA (with rsLoRA and DoRA) and IA3.

The base layer is anything with `in_features`, `out_features`, an optional `bias`, and either a
`weight` (nn.Linear) or a `dequantize()` method returning the float weight [out, in] (a quantized
linear from lmforge.quant: that is the QLoRA path). Only `base_layer(x)` is called in forward, so
a 4-bit base runs its own kernel; `dequantize()` is needed for DoRA's norm and for merging.

Several named adapters can live in one layer (`nn.ModuleDict`s keyed by adapter name, the PEFT
layout). `active` lists the adapters added to the output; `merged` those folded into the weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.common import LmforgeError


class NamedAdapters(nn.ModuleDict):
    """A container of named adapters (bottleneck slots, soft prompts); the `active` ones are used."""

    def __init__(self):
        super().__init__()
        self.active: list[str] = []

    def set_active(self, names: list[str]) -> None:
        self.active = [n for n in names if n in self]

    def adapter_names(self) -> list[str]:
        return list(self.keys())


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or a quantized linear following the `dequantize()` protocol."""
    if isinstance(module, WrappedLinear):
        return False
    return isinstance(module, nn.Linear) or (
        callable(getattr(module, "dequantize", None))
        and hasattr(module, "in_features")
        and hasattr(module, "out_features")
    )


class WrappedLinear(nn.Module):
    """What LoRA, AdaLoRA and IA3 share: the base layer, its float weight, and merge bookkeeping."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.active: list[str] = []
        self.merged: list[str] = []
        # The original quantized base while a merge replaced it by a float copy. A plain list so
        # it stays out of state_dict/parameters (unmerge puts it back bit-exactly).
        self._quantized_base: list[nn.Module] = []

    def base_weight(self) -> torch.Tensor:
        """The base weight [out, in] as float (dequantized for a quantized base)."""
        b = self.base_layer
        return b.dequantize() if callable(getattr(b, "dequantize", None)) else b.weight

    def _factory(self) -> dict:
        """device/dtype for new adapter tensors: the base's float dtype (fp32 under a quantized base
        without a float bias). Read from tensors, not dequantize(): the base may be on the meta device."""
        b = self.base_layer
        ref = b.weight if isinstance(b, nn.Linear) else getattr(b, "bias", None)
        if ref is None:
            ref = next(iter(b.state_dict().values()))
        dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32
        return {"device": ref.device, "dtype": dtype}

    def _float_base(self) -> nn.Linear:
        """The nn.Linear a merge writes into; a quantized base is swapped for a float copy."""
        b = self.base_layer
        if isinstance(b, nn.Linear):
            return b
        w = self.base_weight().detach()
        bias = getattr(b, "bias", None)
        # The model's compute dtype (dequantize() may return fp32 under a bf16 model).
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, **self._factory())
        lin.weight.data.copy_(w)
        if bias is not None:
            lin.bias.data.copy_(bias.detach())
        lin.requires_grad_(False)
        self._quantized_base.append(b)
        self.base_layer = lin
        return lin

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapters into the base weight (forward then costs one matmul)."""
        todo = [n for n in self.active if n not in self.merged]
        if not todo:
            return
        lin = self._float_base()
        for name in todo:
            self._merge_one(name, lin)
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._quantized_base:  # the float copy is dropped, the untouched quantized base returns
            self.base_layer = self._quantized_base.pop()
        else:
            for name in reversed(self.merged):
                self._unmerge_one(name, self.base_layer)
        self.merged = []

    def set_active(self, names: list[str]) -> None:
        if self.merged:
            raise LmforgeError(f"cannot switch adapters while {self.merged} are merged; call peft.unmerge(model) first")
        self.active = [n for n in names if n in self.adapter_names()]

    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def _merge_one(self, name: str, lin: nn.Linear) -> None:
        raise NotImplementedError

    def _unmerge_one(self, name: str, lin: nn.Linear) -> None:
        raise NotImplementedError

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._quantized_base:  # merged float copy of a quantized base: it may be fp32 under bf16 inputs
            return self.base_layer(x.to(self.base_layer.weight.dtype)).to(x.dtype)
        return self.base_layer(x)

    def _pending(self) -> list[str]:
        return [n for n in self.active if n not in self.merged]


class LoraLinear(WrappedLinear):
    """y = base(x) + sum_active scale * B(A(dropout(x))), A: [r, in] Kaiming, B: [out, r] zeros.

    DoRA (use_dora): y = m / ||W + scale B A||_row * (W + scale B A) x + bias, with the norm
    detached from the graph as the DoRA paper (sec. 4.3) and peft do.

    Per-row adapters (multi-LoRA serving): while `row_index` is set (see `peft.adapter_rows`),
    row b of the batch gets only the adapter whose index list contains b; rows in no list get the
    base output. x's first dimension is the row dimension.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA, PEFT's name
        self.scaling: dict[str, float] = {}
        self.row_index: dict[str, torch.Tensor] | None = None
        self.row_count: int = 0
        self._dora_norm: dict[str, torch.Tensor] = {}

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(
        self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False, use_dora: bool = False
    ) -> None:
        kw = self._factory()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **kw)
        # Kaiming-uniform A (nn.Linear's default, as in peft) and zero B: the adapter starts as identity.
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # rsLoRA: alpha / sqrt(r) keeps the update's scale stable as r grows (Kalajdzievski 2023).
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        if use_dora:
            with torch.no_grad():  # m starts at ||W||_row so that DoRA is the identity at init
                norm = (
                    torch.empty(self.out_features, **kw)
                    if kw["device"].type == "meta"
                    else self.base_weight().detach().float().norm(dim=1).to(kw["dtype"])
                )
            self.lora_magnitude_vector[name] = nn.Parameter(norm)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale * B A, [out, in]."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        if self.row_index is not None:
            return self._forward_rows(x, out)
        for name in self._pending():
            out = out + self._delta(name, x, out)
        return out

    def _delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What adapter `name` adds to the base output for input x."""
        A, B, drop = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        xd = drop(x).to(A.weight.dtype)
        lora = B(A(xd)) * self.scaling[name]
        if name not in self.lora_magnitude_vector:
            return lora.to(base_out.dtype)
        w = self.base_weight().to(xd.dtype)
        norm = (w + self.delta_weight(name).detach()).norm(dim=1).detach()
        mag = self.lora_magnitude_vector[name] / norm  # [out]
        bias = getattr(self.base_layer, "bias", None)
        if isinstance(drop, nn.Identity) or not self.training:
            base_nb = base_out.to(xd.dtype) - (bias if bias is not None else 0)
        else:  # the base term must see the same dropped-out input as the LoRA term
            base_nb = F.linear(xd, w)
        return ((mag - 1) * base_nb + mag * lora).to(base_out.dtype)

    def _forward_rows(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.merged:
            raise LmforgeError("per-row adapter selection needs unmerged adapters; call peft.unmerge(model) first")
        if x.shape[0] != self.row_count:
            raise LmforgeError(f"adapter_rows was given {self.row_count} rows but the batch has {x.shape[0]}")
        for name, idx in self.row_index.items():
            if idx.numel():
                out = out.index_add(0, idx, self._delta(name, x.index_select(0, idx), out.index_select(0, idx)))
        return out

    def _merge_one(self, name: str, lin: nn.Linear) -> None:
        w = lin.weight.data
        merged = w + self.delta_weight(name).to(w.dtype)
        if name in self.lora_magnitude_vector:
            norm = merged.norm(dim=1)
            self._dora_norm[name] = norm
            merged = merged * (self.lora_magnitude_vector[name] / norm).unsqueeze(1)
        w.copy_(merged)

    def _unmerge_one(self, name: str, lin: nn.Linear) -> None:
        w = lin.weight.data
        if name in self.lora_magnitude_vector:
            w.copy_(w / (self.lora_magnitude_vector[name] / self._dora_norm.pop(name)).unsqueeze(1))
        w.sub_(self.delta_weight(name).to(w.dtype))


class IA3Linear(WrappedLinear):
    """IA3: a learned vector l (init 1). feedforward: base(x * l) (l over in_features, the MLP's
    intermediate activation); otherwise base(x) * l (l over out_features: keys, values)."""

    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__(base_layer)
        self.feedforward = feedforward
        self.ia3_l = nn.ParameterDict()

    def adapter_names(self) -> list[str]:
        return list(self.ia3_l.keys())

    def add_adapter(self, name: str) -> None:
        size = self.in_features if self.feedforward else self.out_features
        self.ia3_l[name] = nn.Parameter(torch.ones(size, **self._factory()))

    def _scale(self) -> torch.Tensor | None:
        scale = None
        for name in self._pending():
            scale = self.ia3_l[name] if scale is None else scale * self.ia3_l[name]
        return scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._scale()
        if scale is None:
            return self.base_forward(x)
        if self.feedforward:
            return self.base_forward(x * scale.to(x.dtype))
        out = self.base_forward(x)
        return out * scale.to(out.dtype)

    def _merge_one(self, name: str, lin: nn.Linear) -> None:
        self._rescale(lin, self.ia3_l[name].to(lin.weight.dtype))

    def _unmerge_one(self, name: str, lin: nn.Linear) -> None:
        self._rescale(lin, 1.0 / self.ia3_l[name].to(lin.weight.dtype))

    def _rescale(self, lin: nn.Linear, l: torch.Tensor) -> None:
        """Fold x * l (feedforward: weight columns) or out * l (weight rows and bias) into `lin`."""
        if self.feedforward:
            lin.weight.data.mul_(l.unsqueeze(0))
            return
        lin.weight.data.mul_(l.unsqueeze(1))
        if lin.bias is not None:
            lin.bias.data.mul_(l)
