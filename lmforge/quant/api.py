"""One entry point per model: `quantize_model(model, QuantOptions(...), calib)` runs the chosen
method, swaps the modules and records a `{"kind": "quant", ...}` entry in
`model.lmforge_transforms`, which `lmforge.checkpoint` saves and replays via `replay`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.common import LmforgeError

from .awq import awq_block
from .calibrate import BlockInputs, calibrate_blocks, check_calibration, observe, peak_rss_bytes, reset_peak_rss
from .gptq import Hessian, gptq_quantize
from .linear import IntNLinear, QuantLinear
from .mixed import lm_loss, mixed_precision
from .scheme import (
    DEFAULT_SKIP,
    check_config,
    linear_names,
    make_quant_linear,
    parse_scheme,
    quant_config,
    record,
    set_module,
    swap,
)
from .smooth import smoothquant_linear

METHODS = ("rtn", "gptq", "awq", "smoothquant", "mixed")
CALIBRATED = ("gptq", "awq", "smoothquant", "mixed")


@dataclass
class QuantOptions:
    method: str = "rtn"  # rtn | gptq | awq | smoothquant | mixed
    scheme: str = "int4-g128"  # rtn/gptq/awq; smoothquant is always w8a8
    skip: tuple[str, ...] = DEFAULT_SKIP  # regexes of module names kept in float
    damp: float = 0.01  # GPTQ: dampening, fraction of mean(diag H)
    act_order: bool = False  # GPTQ: visit columns by decreasing activation energy
    block_size: int = 128  # GPTQ: lazy-update block width
    n_grid: int = 20  # AWQ: alpha grid size
    alpha: float = 0.5  # SmoothQuant: migration strength
    budget_bits: float = 4.5  # mixed: average weight bits
    choices: tuple[str, ...] = ("int4-g128", "int8")  # mixed: candidate schemes (add int3-g128 for budgets < 4)
    min_calib_tokens: int = 512


def quantize_model(
    model: nn.Module, opts: QuantOptions, calib: Sequence[torch.Tensor] | None = None, progress: bool = True
) -> dict:
    """Quantize in place; returns stats (peak memory, and the plan for mixed precision)."""
    if opts.method not in METHODS:
        raise LmforgeError(f"unknown quantization method {opts.method!r}: choose from {', '.join(METHODS)}")
    if opts.method in CALIBRATED:
        check_calibration(calib, opts.min_calib_tokens)
    names = linear_names(model, opts.skip)
    reset_peak_rss()
    stats: dict = {}
    if opts.method == "rtn":
        swap(model, opts.scheme, opts.skip, record_transform=False)
    elif opts.method == "mixed":
        stats = mixed_precision(model, names, lambda: lm_loss(model, calib), opts.budget_bits, opts.choices, progress)
    else:
        spec = parse_scheme("w8a8" if opts.method == "smoothquant" else opts.scheme)
        if opts.method in ("gptq", "awq") and spec["format"] != "intn":
            raise LmforgeError(
                f"{opts.method} needs a group-wise int scheme (int4-g128, int3-g64, ...), not {opts.scheme!r}"
            )
        block_fn = {"gptq": _gptq_block, "awq": _awq_block, "smoothquant": _smooth_block}[opts.method]
        stats = calibrate_blocks(model, calib, names, lambda b, x, n: block_fn(b, x, n, spec, opts), progress)
        for name in names:  # linears outside the decoder blocks: round to nearest
            if type(model.get_submodule(name)) is nn.Linear:
                set_module(model, name, make_quant_linear(model.get_submodule(name), spec))
    stats.setdefault("peak_rss_bytes", peak_rss_bytes())
    record(model, quant_config(model, opts.method, options=_options_json(opts)))
    return stats


def _gptq_block(block: nn.Module, inputs: BlockInputs, names: list[str], spec: dict, opts: QuantOptions) -> None:
    hess = {n: Hessian(block.get_submodule(n).in_features) for n in names}
    observe(block, inputs, names, lambda n, x: hess[n].add(x))
    for n in names:
        linear = block.get_submodule(n)
        m = make_quant_linear(linear, spec)
        assert isinstance(m, IntNLinear)
        codes, scale, zero = gptq_quantize(
            linear.weight.detach(), hess[n].h, spec["bits"], m.group_size, opts.damp, opts.block_size, opts.act_order
        )
        m.set_quantized(codes, scale, zero)
        set_module(block, n, m)


def _awq_block(block: nn.Module, inputs: BlockInputs, names: list[str], spec: dict, opts: QuantOptions) -> None:
    awq_block(block, inputs, names, spec["bits"], spec["group_size"], opts.n_grid)


def _smooth_block(block: nn.Module, inputs: BlockInputs, names: list[str], spec: dict, opts: QuantOptions) -> None:
    absmax: dict[str, torch.Tensor] = {}

    def track(n: str, x: torch.Tensor) -> None:
        m = x.abs().amax(0).float()
        absmax[n] = m if n not in absmax else torch.maximum(absmax[n], m)

    observe(block, inputs, names, track)
    for n in names:
        set_module(block, n, smoothquant_linear(block.get_submodule(n), absmax.get(n), opts.alpha))


def _options_json(opts: QuantOptions) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(opts).items()}


def replay(model: nn.Module, entry: dict, source: str = "checkpoint") -> None:
    """Checkpoint hook: recreate the empty quantized modules an entry describes (meta device)."""
    config = {k: v for k, v in entry.items() if k != "kind"}
    check_config(config, f"{source}: quantization config")
    swap(model, config, record_transform=False)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Undo quantization: every quantized linear becomes a float nn.Linear of its dequantized weights
    (the rounding error stays), and the quant entries leave the manifest. Re-quantize to get a small
    model again (QLoRA -> merged float model -> `quantize_model`)."""
    from lmforge.model.manifest import drop_transforms

    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            bias = getattr(m, "bias", None)
            linear = nn.Linear(m.in_features, m.out_features, bias=bias is not None)
            linear.weight.data = m.dequantize().float()
            if bias is not None:
                linear.bias.data = bias.detach().float()
            model.set_submodule(name, linear)
    drop_transforms(model, "quant")
    return model
