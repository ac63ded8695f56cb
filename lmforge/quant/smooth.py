"""SmoothQuant (Xiao et al. 2022): activations have a few outlier channels that ruin per-token
int8; weights are easy. Divide activation channel j by s_j and multiply weight column j by s_j
(the product is unchanged), with s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), then quantise both
to int8 (W8A8Linear: weights per channel, activations per token at run time)."""

from __future__ import annotations

import torch
from torch import nn

from .linear import W8A8Linear


def smooth_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """s [K] from the per-input-channel activation max [K] and the weight [N, K]."""
    w_max = weight.detach().float().abs().amax(0).clamp(min=1e-5)
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp(min=1e-5)


def smoothquant_linear(linear: nn.Linear, act_absmax: torch.Tensor | None, alpha: float = 0.5) -> W8A8Linear:
    """W8A8 module for `linear`; without activation statistics it is plain W8A8 (s = 1)."""
    s = None if act_absmax is None else smooth_scales(act_absmax, linear.weight, alpha)
    return W8A8Linear.from_float(linear, input_scale=s)
