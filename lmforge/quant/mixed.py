"""Mixed precision: measure how much the validation loss rises when only one layer is quantized
(at each candidate width), then give bits to the layers where they buy the most loss per bit,
until the parameter-weighted average width reaches the budget (e.g. 4.5 bits)."""

from __future__ import annotations

from typing import Callable, Sequence

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
def sensitivity(model: nn.Module, names: list[str], choices: list[str], loss_fn: Callable[[], float],
                progress: bool = True) -> dict[str, dict[str, float]]:
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


def allocate(sens: dict[str, dict[str, float]], sizes: dict[str, int], choices: list[str],
             budget_bits: float) -> dict[str, str]:
    """Greedy: start every layer at the narrowest choice; repeatedly take the upgrade with the
    largest loss decrease per extra bit that keeps the average within the budget."""
    order = sorted(choices, key=lambda c: bits_of(parse_scheme(c)))
    bits = {c: bits_of(parse_scheme(c)) for c in order}
    total = sum(sizes.values())
    plan = {n: order[0] for n in sens}
    used = sum(bits[order[0]] * sizes[n] for n in sens)
    if used > budget_bits * total + 1e-6:
        raise LmforgeError(f"--budget-bits {budget_bits} is below the narrowest choice {order[0]} ({bits[order[0]]} bits)")
    while True:
        best, best_gain = None, float("-inf")
        for n, cur in plan.items():
            i = order.index(cur)
            if i + 1 == len(order):
                continue
            nxt = order[i + 1]
            extra = (bits[nxt] - bits[cur]) * sizes[n]
            if used + extra > budget_bits * total + 1e-6:
                continue
            gain = (sens[n][cur] - sens[n][nxt]) / extra
            if gain > best_gain:
                best, best_gain = (n, nxt, extra), gain
        if best is None:
            return plan
        n, nxt, extra = best
        plan[n], used = nxt, used + extra


def mixed_precision(model: nn.Module, names: list[str], loss_fn: Callable[[], float], budget_bits: float = 4.5,
                    choices: Sequence[str] = ("int3-g128", "int4-g128", "int8"), progress: bool = True) -> dict:
    """Quantize `names` with per-layer widths meeting the budget; returns the plan and sensitivities."""
    choices = [scheme_name(parse_scheme(c)) for c in choices]
    sens = sensitivity(model, names, choices, loss_fn, progress)
    sizes = {n: model.get_submodule(n).weight.numel() for n in names}
    plan = allocate(sens, sizes, choices, budget_bits)
    for name, choice in plan.items():
        set_module(model, name, make_quant_linear(model.get_submodule(name), parse_scheme(choice)))
    avg = sum(bits_of(parse_scheme(plan[n])) * sizes[n] for n in names) / max(sum(sizes.values()), 1)
    return {"plan": plan, "sensitivity": sens, "average_bits": avg}
