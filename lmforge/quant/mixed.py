"""Mixed precision: measure how much the validation loss rises when only one layer is quantized
(at each candidate width), then choose the widths that minimise the summed increase while the
parameter-weighted average width stays within the budget (e.g. 4.5 bits)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.common import LmforgeError

from .scheme import bits_of, make_quant_linear, parse_scheme, scheme_name, set_module


@torch.no_grad()
def lm_loss(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """Mean next-token cross-entropy over token batches [B, T]."""
    total, count = 0.0, 0
    for ids in batches:
        logits = model(ids)
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    return total / max(count, 1)


@torch.no_grad()
def sensitivity(
    model: nn.Module, names: list[str], choices: list[str], loss_fn: Callable[[], float], progress: bool = True
) -> dict[str, dict[str, float]]:
    """{layer: {scheme: loss increase when only that layer is quantized with that scheme}}."""
    from tqdm.auto import tqdm

    base = loss_fn()
    out: dict[str, dict[str, float]] = {}
    for name in tqdm(names, desc="sensitivity", disable=not progress):
        linear = model.get_submodule(name)
        out[name] = {}
        for choice in choices:
            set_module(model, name, make_quant_linear(linear, parse_scheme(choice)))
            out[name][choice] = loss_fn() - base
        set_module(model, name, linear)
    return out


def allocate(
    sens: dict[str, dict[str, float]],
    sizes: dict[str, int],
    choices: list[str],
    budget_bits: float,
    max_units: int = 100_000,
) -> dict[str, str]:
    """Pick one choice per layer minimising the summed loss increase subject to
    sum(bits * params) <= budget_bits * sum(params): a multiple-choice knapsack, solved exactly by
    dynamic programming over the budget in units of the gcd of all costs (exact), or of
    budget / max_units with costs rounded up (never over budget) when that is finer."""
    names = list(sens)
    bits = [bits_of(parse_scheme(c)) for c in choices]
    capacity = budget_bits * sum(sizes[n] for n in names)
    unit = float(math.gcd(*(int(b * sizes[n]) for b in bits for n in names)))
    unit = max(unit, capacity / max_units)
    resolution = int(capacity / unit + 1e-9)
    inf = float("inf")
    best = np.full(resolution + 1, inf)
    best[0] = 0.0  # best[c]: least loss with cost exactly c units
    picks = []
    for n in names:
        new, pick = np.full(resolution + 1, inf), np.full(resolution + 1, -1)
        for j, c in enumerate(choices):
            w = int(np.ceil(bits[j] * sizes[n] / unit - 1e-9))
            if w > resolution:
                continue
            cand = np.full(resolution + 1, inf)
            cand[w:] = best[: resolution + 1 - w] + sens[n][c]
            better = cand < new
            new[better], pick[better] = cand[better], j
        best = new
        picks.append(pick)
    if not np.isfinite(best).any():
        narrowest = min(choices, key=lambda c: bits_of(parse_scheme(c)))
        raise LmforgeError(f"--budget-bits {budget_bits} is below the narrowest choice {narrowest}")
    cost, plan = int(np.argmin(best)), {}
    for n, pick in zip(reversed(names), reversed(picks)):
        j = int(pick[cost])
        plan[n] = choices[j]
        cost -= int(np.ceil(bits[j] * sizes[n] / unit - 1e-9))
    return plan


def mixed_precision(
    model: nn.Module,
    names: list[str],
    loss_fn: Callable[[], float],
    budget_bits: float = 4.5,
    choices: Sequence[str] = ("int4-g128", "int8"),
    progress: bool = True,
) -> dict:
    """Quantize `names` with per-layer widths meeting the budget; returns the plan and sensitivities."""
    choices = [scheme_name(parse_scheme(c)) for c in choices]
    sens = sensitivity(model, names, choices, loss_fn, progress)
    sizes = {n: model.get_submodule(n).weight.numel() for n in names}
    plan = allocate(sens, sizes, choices, budget_bits)
    for name, choice in plan.items():
        set_module(model, name, make_quant_linear(model.get_submodule(name), parse_scheme(choice)))
    avg = sum(bits_of(parse_scheme(plan[n])) * sizes[n] for n in names) / max(sum(sizes.values()), 1)
    return {"plan": plan, "sensitivity": sens, "average_bits": avg}
