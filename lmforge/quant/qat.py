"""Quantization-aware training: FakeQuantLinear is an nn.Linear (same parameters, same state-dict
keys, so any training loop and checkpoint just work) whose forward sees the group-wise
quantised weight; the straight-through estimator lets gradients reach the float weight.
`convert_qat` then stores the trained weights in the real packed format."""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn.functional as F
from torch import nn

from lmforge.common import LmforgeError

from .formats import check_group, fake_quant
from .scheme import DEFAULT_SKIP, linear_names, make_quant_linear, parse_scheme, quant_config, record, set_module


class FakeQuantLinear(nn.Linear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        group_size: int = 128,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.bits, self.group_size = bits, check_group(in_features, group_size)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int) -> FakeQuantLinear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size, device="meta")
        m.weight, m.bias = linear.weight, linear.bias  # share the parameters: no copy, optimizer state carries over
        return m

    def forward(self, x):
        return F.linear(x, fake_quant(self.weight, self.bits, self.group_size), self.bias)


def prepare_qat(model: nn.Module, scheme: str = "int4-g128", skip: Iterable[str] = DEFAULT_SKIP) -> nn.Module:
    """Swap nn.Linear -> FakeQuantLinear in place (group-wise int2/3/4 schemes)."""
    spec = parse_scheme(scheme)
    if spec["format"] != "intn":
        raise LmforgeError(f"QAT supports the group-wise int schemes (int4-g128, ...), not {scheme!r}")
    for name in linear_names(model, skip):
        set_module(
            model, name, FakeQuantLinear.from_linear(model.get_submodule(name), spec["bits"], spec["group_size"])
        )
    return model


def convert_qat(model: nn.Module) -> nn.Module:
    """Replace every FakeQuantLinear by the packed IntNLinear it was training for (same rounding)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, FakeQuantLinear):
            set_module(
                model, name, make_quant_linear(m, {"format": "intn", "bits": m.bits, "group_size": m.group_size})
            )
    record(model, quant_config(model, "qat"))
    return model
