"""Inference-time module swaps that make CPU decode faster without changing any result.

At batch 1 decode is memory-bound: every weight is read once per token. On CPU, oneDNN/MKL read a
weight stored pre-transposed ([in, out], as GPT-2's Conv1D keeps it) faster than `F.linear`'s [out, in]
at small batch. `prepare_for_inference` swaps plain `nn.Linear` modules for `TransposedLinear`
(quantized and adapter modules are left alone: they own their layouts).

With lmforge's C kernels (`lmforge.quant.cpu_kernel`, built on first use) Llama-style blocks (and,
when all qualify, the whole decode step) also get the one-call C batch-1 decode of `fused_block`.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class TransposedLinear(nn.Module):
    """y = x @ W^T + b with W kept as [in_features, out_features] (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()

    # Checkpoints see an ordinary Linear: `weight` [out, in], so saving a prepared model stays correct.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight_t.t() if keep_vars else self.weight_t.detach().t()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "weight" in state_dict:
            state_dict = dict(state_dict)
            state_dict[prefix + "weight_t"] = state_dict.pop(prefix + "weight").t().contiguous()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ self.weight_t
        flat = x.reshape(-1, self.in_features)
        return torch.addmm(self.bias, flat, self.weight_t).view(*x.shape[:-1], self.out_features)


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Give Llama-style blocks the C decode step (`fused_block.fuse_blocks`, when the C kernels build)
    and swap the other plain nn.Linear for TransposedLinear on CPU, large weights moved to huge pages
    (`hugepages`); eval mode, no grads. Returns the model."""
    from .fused_block import fuse_blocks
    from .hugepages import move_to_hugepages

    model.eval().requires_grad_(False)
    if next(model.parameters()).device.type != "cpu":
        return model
    move_to_hugepages(model)  # decode streams every weight per token: 2 MB pages read ~1.2-1.6x faster
    fuse_blocks(model, transposed=(TransposedLinear,))
    # The C step reads an fp32 W [out, in] row after row, one sequential stream, ~25% faster than the
    # transposed layout (several strided streams): the linears it runs stay nn.Linear.
    in_c = {id(m) for b in model.modules() if hasattr(b, "_lmforge_layer_spec") for m in b.modules()}
    if hasattr(model, "_lmforge_step_spec"):
        in_c.add(id(model.lm_head))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and id(child) not in in_c:
                setattr(parent, name, TransposedLinear(child))
    return model
