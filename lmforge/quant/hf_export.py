"""Quantized linears as compressed-tensors tensors, the format `transformers` loads quantized models
from (`quantization_config.quant_method = "compressed-tensors"`; loading needs the
`compressed-tensors` package, writing does not).

Layout: "naive-quantized", one int8 per weight value (`<module>.weight`), `weight_scale` [N, G] and,
for asymmetric (group-wise) codes, `weight_zero_point` [N, G] int8; dequantized as
(q - zero_point) * scale. Codes are moved from lmforge's unsigned range [0, 2^b) to
compressed-tensors' signed one [-2^(b-1), 2^(b-1)) by subtracting 2^(b-1) from codes and zeros
alike, so the dequantized weights are identical. Why not the 4-bit "pack-quantized" layout: with
compressed-tensors 0.20 and transformers 5.x, packed asymmetric zero points fail to load (the
loader expects them unpacked, the decompressor packed); the naive layout loads and runs on CPU.
NF4 and pre-scaled (AWQ/SmoothQuant input_scale) linears have no compressed-tensors equivalent.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.common import LmforgeError

from .linear import Int8Linear, IntNLinear, QuantLinear

CT_FORMAT = "naive-quantized"


def _args(bits: int, symmetric: bool, group_size: int | None) -> dict:
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "group" if group_size else "channel",
        "group_size": group_size,
        "dynamic": False,
    }


def compressed_tensors_export(model: nn.Module, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors of every quantized linear, by state-dict name; the `quantization_config` for
    config.json). Scales are written in `dtype` (the exported model's float dtype)."""
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[tuple, list[str]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        if m.input_scale is not None:
            raise LmforgeError(
                f"{name}: a pre-scaled ({m.format} with input_scale, AWQ/SmoothQuant) linear has no "
                "compressed-tensors equivalent; export the dequantized model instead"
            )
        if isinstance(m, Int8Linear):
            q, scale, zero, key = m.weight, m.scales[:, None], None, (8, True, None)
        elif isinstance(m, IntNLinear):
            offset = 2 ** (m.bits - 1)
            q = (m.codes().to(torch.int16) - offset).to(torch.int8)
            zero = (m.zeros.to(torch.int16) - offset).to(torch.int8)
            per_row = m.group_size == m.in_features
            scale, key = m.scales, (m.bits, False, None if per_row else m.group_size)
        else:
            raise LmforgeError(f"{name}: quantization format {m.format!r} has no compressed-tensors equivalent")
        tensors[f"{name}.weight"] = q.contiguous()
        tensors[f"{name}.weight_scale"] = scale.to(dtype).contiguous()
        if zero is not None:
            tensors[f"{name}.weight_zero_point"] = zero.contiguous()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.to(dtype).contiguous()
        groups.setdefault(key, []).append(name)
    config = {
        "quant_method": "compressed-tensors",
        "format": CT_FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{i}": {
                "targets": names,
                "weights": _args(*key),
                "input_activations": None,
                "output_activations": None,
                "format": CT_FORMAT,
            }
            for i, (key, names) in enumerate(groups.items())
        },
        "ignore": [],
    }
    return tensors, config
