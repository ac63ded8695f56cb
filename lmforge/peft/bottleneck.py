"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020).

Each decoder layer's sub-block output h becomes h + up(act(down(h))) with `up` zero-initialised,
so the model is unchanged at init. Houlsby adds one after the attention block and one after the
MLP; Pfeiffer only after the MLP. The adapters live at `<sub-block>.peft_adapter` (an
`AdapterSlot`, one entry per adapter name) and are applied by a forward hook on the sub-block,
so the attention/MLP modules keep their class and attributes (the inference code reads them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.common import LmforgeError

from .config import AdapterConfig
from .layers import NamedAdapters

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, size: int, activation: str, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(hidden, size, device=device, dtype=dtype)
        self.up = nn.Linear(size, hidden, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.activation = activation

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(_ACTIVATIONS[self.activation](self.down(h)))


class AdapterSlot(NamedAdapters):
    """Named bottleneck adapters of one sub-block; the active ones are applied in order."""

    def apply_to(self, out):
        h = out[0] if isinstance(out, tuple) else out  # some blocks return (hidden, extras)
        for name in self.active:
            h = self[name](h)
        return (h, *out[1:]) if isinstance(out, tuple) else h


def _after_block_hook(module: nn.Module, args, out):
    return module.peft_adapter.apply_to(out)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Modules with both `self_attn` and `mlp`: the HF-style decoder layers."""
    layers = [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")]
    if not layers:
        raise LmforgeError("model has no decoder layers with .self_attn and .mlp; bottleneck adapters need them")
    return layers


def add_bottleneck(model: nn.Module, config: AdapterConfig) -> None:
    if config.activation not in _ACTIVATIONS:
        raise LmforgeError(f"AdapterConfig.activation={config.activation!r}: choose from {', '.join(_ACTIVATIONS)}")
    hidden = model.config.hidden_size
    ref = next(model.parameters())
    for layer in decoder_layers(model):
        blocks = [layer.self_attn, layer.mlp] if config.kind == "houlsby" else [layer.mlp]
        for block in blocks:
            if not hasattr(block, "peft_adapter"):
                block.peft_adapter = AdapterSlot()
                block.register_forward_hook(_after_block_hook)
            dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32
            block.peft_adapter[config.adapter_name] = Bottleneck(
                hidden, config.bottleneck, config.activation, device=ref.device, dtype=dtype
            )
            block.peft_adapter.active = [config.adapter_name]
