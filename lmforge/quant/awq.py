"""AWQ (Lin et al. 2023): protect the weights that meet large activations. Search a
per-input-channel scale s = mean|x|^alpha over a grid of alpha, quantise W diag(s) and feed x / s,
keeping the alpha with the smallest output error; then search, per group, how far to clip the
weight range. The scale stays in the module (`input_scale`) rather than folded into the previous
norm, so any linear can use it.
"""

from __future__ import annotations

import torch
from torch import nn

from . import formats as fmt
from .linear import IntNLinear


def _rtn_dequant(w: torch.Tensor, bits: int, g: int, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    scale, zero = fmt.group_params(w, bits, g, clip)
    return fmt.group_dequantize(fmt.group_quantize(w, scale, zero, bits), scale, zero)


def search_scale(w: torch.Tensor, x: torch.Tensor, bits: int, g: int, n_grid: int = 20) -> torch.Tensor:
    """Best s [K] for ||x W^T - (x/s) Q(W s)^T|| over alpha in [0, 1) (alpha = 0: plain RTN)."""
    ref = x @ w.t()
    x_mean = x.abs().mean(0).clamp(min=1e-6)
    best, best_s = float("inf"), torch.ones_like(x_mean)
    for alpha in torch.arange(n_grid) / n_grid:
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 so neither side explodes
        err = ((x / s) @ _rtn_dequant(w * s, bits, g).t() - ref).pow(2).mean().item()
        if err < best:
            best, best_s = err, s
    return best_s


def search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, g: int,
                ratios: tuple[float, ...] = tuple(1 - i / 20 for i in range(11))) -> torch.Tensor:
    """Per (row, group) shrink factor of the min/max range minimising that group's output error."""
    n, k = w.shape
    xg = x.reshape(x.shape[0], k // g, g)  # [T, G, g]
    wg = w.reshape(n, k // g, g)
    ref = torch.einsum("tgc,ngc->tng", xg, wg)
    best_err = torch.full((n, k // g), float("inf"), device=w.device)
    best = torch.ones(n, k // g, device=w.device)
    for r in ratios:
        q = _rtn_dequant(w, bits, g, r).reshape(n, k // g, g)
        err = (torch.einsum("tgc,ngc->tng", xg, q) - ref).pow(2).mean(0)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, torch.full_like(best, r), best)
    return best


def awq_linear(linear: nn.Linear, x: torch.Tensor, bits: int = 4, group_size: int = 128,
               n_grid: int = 20, max_tokens: int = 1024) -> IntNLinear:
    """Quantise `linear` given calibration inputs x [T, K] (subsampled to max_tokens)."""
    w = linear.weight.detach().float()
    g = fmt.check_group(w.shape[1], group_size)
    x = x.reshape(-1, w.shape[1]).float()
    if x.shape[0] > max_tokens:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:max_tokens].to(x.device)]
    s = search_scale(w, x, bits, g, n_grid)
    clip = search_clip(w * s, x / s, bits, g)
    m = IntNLinear.from_float(linear, input_scale=s.to(w.dtype), bits=bits, group_size=g)
    scale, zero = fmt.group_params(w * s, bits, g, clip)
    m.set_quantized(fmt.group_quantize(w * s, scale, zero, bits), scale, zero)
    return m
