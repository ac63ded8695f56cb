"""AWQ (Lin et al. 2023): protect the weights that meet large activations. The linears of a block
are taken in groups that share one input (q/k/v after the attention norm, gate/up after the MLP
norm, o_proj after v_proj, down_proj after up_proj). Per group:

1. grid search alpha in s = mean|x|^alpha (per input channel, normalised around 1), keeping the s
   whose fake-quantized Q(W diag(s)) diag(s)^-1 gives the smallest error on the output of the
   smallest module holding the whole group (the attention, the MLP, or the linear itself), run
   on the activations that reach it once the earlier parts of the model are quantized;
2. fold 1/s into the op that produces the input (norm weight and bias, or the rows of the previous
   linear), so the quantized model costs nothing at run time; where no such op exists (the
   activation between a classic MLP's up and down, an MoE expert) the scale stays in the module
   as `input_scale`;
3. search, per (row, group) of the scaled weight, how far to shrink the min/max range (clipping,
   MLP linears only) and a gain on the group's scale that undoes the shrink's pull towards zero,
   minimising that group's share of the output error on the scaled activations; then quantize.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.model.layers import MLP, RMSNorm

from . import formats as fmt
from .calibrate import BlockInputs, capture
from .linear import IntNLinear
from .scheme import set_module

# Clipping is searched for the MLP linears only. On the attention projections it lowered each
# layer's output error yet raised perplexity on both shapes measured (Llama and GPT-2 style);
# AutoAWQ likewise leaves q/k unclipped (attention logits are products of two clipped outputs).
NO_CLIP: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
CLIP_RATIOS = tuple(1 - i / 20 for i in range(11))  # range shrink factors tried, 1.0 .. 0.5


@dataclass
class ScaleGroup:
    linears: list[str]  # block-relative names of linears reading the same input
    inspect: str  # the module whose output error the scale search minimises
    prev: str | None = None  # where 1/s is folded (a norm or a linear); None: keep s as input_scale
    index: torch.Tensor | None = None  # input channel -> output channel of prev (GQA: heads share v rows)


def _rtn_dequant(w: torch.Tensor, bits: int, g: int, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    scale, zero = fmt.group_params(w, bits, g, clip)
    return fmt.group_dequantize(fmt.group_quantize(w, scale, zero, bits), scale, zero)


def _tie(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Average x [K] over the input channels that share one output channel of prev, broadcast back."""
    if index is None:
        return x
    n = int(index.max()) + 1
    total = torch.zeros(n, dtype=x.dtype).index_add_(0, index, x)
    return (total / torch.zeros(n, dtype=x.dtype).index_add_(0, index, torch.ones_like(x)))[index]


def scale_candidates(x_mean: torch.Tensor, n_grid: int, index: torch.Tensor | None = None):
    """(alpha, s) over alpha in [0, 1); alpha 0 is s = 1, i.e. plain round-to-nearest."""
    x_mean = _tie(x_mean.float().clamp(min=1e-6), index)
    for alpha in torch.arange(n_grid) / n_grid:
        s = x_mean.pow(alpha)
        yield float(alpha), s / (s.max() * s.min()).sqrt()  # centred around 1 so neither side explodes


@torch.no_grad()
def search_scale(
    linears: list[nn.Linear],
    forward: Callable[[], list[torch.Tensor]],
    x_mean: torch.Tensor,
    bits: int,
    g: int,
    n_grid: int = 20,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The s [K] whose fake-quantized weights W' = Q(W s) / s minimise ||forward() - reference||^2,
    where forward() runs the module holding `linears` on calibration inputs."""
    originals = [lin.weight.data for lin in linears]
    ref = forward()
    best, best_s = float("inf"), torch.ones_like(x_mean, dtype=torch.float32)
    try:
        for _alpha, s in scale_candidates(x_mean, n_grid, index):
            for lin, w in zip(linears, originals):
                lin.weight.data = (_rtn_dequant(w.float() * s, bits, g) / s).to(w.dtype)
            err = sum((y - r).float().pow(2).sum().item() for y, r in zip(forward(), ref))
            if err < best:
                best, best_s = err, s
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.data = w
    return best_s


def search_clip(
    w: torch.Tensor, x: torch.Tensor, bits: int, g: int, ratios: tuple[float, ...] = CLIP_RATIOS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group): the shrink factor r of the min/max range and the gain gamma on its scale
    minimising that group's share of the output error, E_x[(x_g . (w_g - gamma q_g))^2] =
    d^T C_g d with C_g the inputs' covariance over the group's g channels (all calibration tokens
    count, at a cost independent of their number). gamma = <w, w>_C / <w, q>_C makes the group's
    quantized output regress on its float output with slope 1: shrinking the range trades rounding
    noise for a pull towards zero, and while the noise averages out downstream the pull is
    systematic (softer logits: a perplexity rise despite a lower output error)."""
    n, k = w.shape
    xg = x.float().reshape(-1, k // g, g)
    cov = torch.einsum("tgc,tgd->gcd", xg, xg) / xg.shape[0]  # [G, g, g]
    wg = w.float().reshape(n, k // g, g)
    wc = torch.einsum("ngc,gcd->ngd", wg, cov)
    ww = (wc * wg).sum(-1)
    best_err = torch.full((n, k // g), float("inf"), device=w.device)
    best, best_gain = torch.ones(n, k // g, device=w.device), torch.ones(n, k // g, device=w.device)
    for r in ratios:
        q = _rtn_dequant(w, bits, g, r).reshape(n, k // g, g)
        wq = (wc * q).sum(-1)
        gain = torch.where(wq > 0, ww / wq.clamp(min=1e-30), torch.ones_like(ww)).clamp(0.5, 2.0)
        d = wg - gain[..., None] * q
        err = torch.einsum("ngc,gcd,ngd->ng", d, cov, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best, best_gain = torch.where(better, r, best), torch.where(better, gain, best_gain)
    return best, best_gain


def quantize_scaled(
    linear: nn.Linear, s: torch.Tensor, x: torch.Tensor, bits: int, g: int, keep_scale: bool, clip: bool = True
) -> IntNLinear:
    """IntNLinear storing Q(W diag(s)) with searched clipping and gain; x [T, K] are the unscaled
    inputs. keep_scale: the module divides its input by s (nothing upstream was folded)."""
    w, xs = linear.weight.detach().float() * s, x.float() / s
    ratio, gain = search_clip(w, xs, bits, g, CLIP_RATIOS if clip else (1.0,))
    scale, zero = fmt.group_params(w, bits, g, ratio)
    m = IntNLinear.from_float(
        linear, input_scale=s.to(linear.weight.dtype) if keep_scale else None, bits=bits, group_size=g
    )
    m.set_quantized(fmt.group_quantize(w, scale, zero, bits), scale * gain, zero)
    return m


def _subsample(x: torch.Tensor, max_tokens: int) -> torch.Tensor:
    if x.shape[0] <= max_tokens:
        return x
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:max_tokens].to(x.device)]


def awq_linear(
    linear: nn.Linear, x: torch.Tensor, bits: int = 4, group_size: int = 128, n_grid: int = 20, max_tokens: int = 1024
) -> IntNLinear:
    """AWQ for a lone linear given its inputs x [T, K]: the scale is kept as `input_scale`."""
    g = fmt.check_group(linear.in_features, group_size)
    x = _subsample(x.reshape(-1, linear.in_features).float(), max_tokens)
    s = search_scale([linear], lambda: [linear(x.to(linear.weight.dtype))], x.abs().mean(0), bits, g, n_grid)
    return quantize_scaled(linear, s, x, bits, g, keep_scale=True)


# ----------------------------------------------------------------------------- groups and folding


def _foldable(block: nn.Module, prev: str, names: list[str]) -> bool:
    m = block.get_submodule(prev)
    if isinstance(m, (RMSNorm, nn.LayerNorm)):
        return getattr(m, "weight", None) is not None
    return prev in names or type(m) is nn.Linear or isinstance(m, IntNLinear)


def _kv_index(attn: nn.Module) -> torch.Tensor:
    """o_proj input channel h*hd + d reads v_proj row (h // heads_per_kv)*hd + d."""
    rep, hd = attn.num_heads // attn.num_kv_heads, attn.head_dim
    return ((torch.arange(attn.num_heads) // rep)[:, None] * hd + torch.arange(hd)).flatten()


def scale_groups(block: nn.Module, names: list[str]) -> list[ScaleGroup]:
    """The block's linears (block-relative `names`) grouped by shared input, in forward order."""
    groups: list[ScaleGroup] = []

    def take(prev: str, linears: list[str], inspect: str, index: torch.Tensor | None = None) -> None:
        if all(n in names for n in linears) and _foldable(block, prev, names):
            groups.append(ScaleGroup(linears, inspect, prev, index))

    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if attn is not None:
        take("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn")
        if attn.kv_prefix is None:  # prefix values do not pass through v_proj
            take("self_attn.v_proj", ["self_attn.o_proj"], "self_attn.o_proj", _kv_index(attn))
    if isinstance(mlp, MLP):
        if mlp.gate_proj is not None:
            take("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "mlp")
            take("mlp.up_proj", ["mlp.down_proj"], "mlp.down_proj")
        else:
            take("post_attention_layernorm", ["mlp.up_proj"], "mlp")
    grouped = {n for grp in groups for n in grp.linears}
    groups += [ScaleGroup([n], n) for n in names if n not in grouped]
    return sorted(groups, key=lambda grp: names.index(grp.linears[0]))


@torch.no_grad()
def fold(module: nn.Module, s: torch.Tensor) -> None:
    """Divide the output channels of `module` (a norm, a float or group-quantized linear) by s."""
    if isinstance(module, IntNLinear):  # row scaling commutes with group-wise rounding: scale the scales
        module.set_quantized(module.codes(), module.scales.float() / s[:, None], module.zeros)
    elif isinstance(module, nn.Linear):
        module.weight.div_(s[:, None].to(module.weight.dtype))
    else:
        module.weight.div_(s.to(module.weight.dtype))
    if getattr(module, "bias", None) is not None:
        module.bias.div_(s.to(module.bias.dtype))


@torch.no_grad()
def apply_scale(block: nn.Module, grp: ScaleGroup, s: torch.Tensor) -> None:
    """Output-preserving in float: prev's outputs / s, the group's weight columns * s."""
    assert grp.prev is not None
    prev_s = s if grp.index is None else torch.ones(int(grp.index.max()) + 1).index_copy_(0, grp.index, s)
    fold(block.get_submodule(grp.prev), prev_s)
    for n in grp.linears:
        w = block.get_submodule(n).weight
        w.mul_(s.to(w.dtype))


def _first(y):
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def awq_block(
    block: nn.Module, inputs: BlockInputs, names: list[str], bits: int, group_size: int, n_grid: int = 20
) -> None:
    """Quantize the block's linears `names` in place, group by group in forward order: each group's
    inputs come from running the block with the earlier groups already quantized."""
    for grp in scale_groups(block, names):
        calls = capture(block, inputs, [grp.inspect, grp.linears[0]])
        linears = [block.get_submodule(n) for n in grp.linears]
        k = linears[0].in_features
        g = fmt.check_group(k, group_size)
        if not calls[grp.linears[0]]:  # e.g. an MoE expert no calibration token was routed to
            for n, lin in zip(grp.linears, linears):
                set_module(block, n, IntNLinear.from_float(lin, bits=bits, group_size=g))
            continue
        x = torch.cat([a[0].reshape(-1, k).float() for a, _ in calls[grp.linears[0]]])
        inspect = block.get_submodule(grp.inspect)
        forward = lambda: [_first(inspect(*a, **kw)) for a, kw in calls[grp.inspect]]  # noqa: E731
        s = search_scale(linears, forward, x.abs().mean(0), bits, g, n_grid, grp.index)
        if grp.prev is not None:
            apply_scale(block, grp, s)
            x = x / s  # what the linears see after the fold; their weights now hold W s
            s = torch.ones_like(s)
        for n, lin in zip(grp.linears, linears):
            set_module(
                block, n, quantize_scaled(lin, s, x, bits, g, keep_scale=grp.prev is None, clip=not n.endswith(NO_CLIP))
            )
