"""Schemes ("int4-g128"), the module swap, and the JSON quantization config saved with a
checkpoint. The config lists every swapped module with its spec, so `swap(meta_model, config)`
rebuilds the exact empty modules before `load_state_dict(assign=True)`; nothing is re-quantized."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lmforge.common import LmforgeError
from lmforge.model.manifest import record_transform, transforms

from .linear import FORMATS, QuantLinear

CONFIG_VERSION = 1
# Kept in float by default: the output head (often tied to the embeddings, and the most
# sensitive matmul) and MoE routers (a flipped expert choice costs more than it saves).
HEAD_PATTERN = r"(^|\.)lm_head$"
DEFAULT_SKIP: tuple[str, ...] = (HEAD_PATTERN, r"(^|\.)mlp\.gate$", r"embed")
SCHEMES = "int8, int4, int3, int2 (optionally -g32/-g64/-g128, default g128), nf4, w8a8, ternary, q8_0, q4_0"

_INTN = re.compile(r"^int([234])(?:-g(-?\d+))?$")


def parse_scheme(scheme: str | dict) -> dict[str, Any]:
    """'int4-g64' -> {'format': 'intn', 'bits': 4, 'group_size': 64}; a dict spec passes through."""
    if isinstance(scheme, dict):
        check_spec(scheme, "scheme")
        return dict(scheme)
    name = scheme.strip().lower()
    if m := _INTN.match(name):
        return {"format": "intn", "bits": int(m.group(1)), "group_size": int(m.group(2) or 128)}
    if name in ("int8", "nf4", "w8a8", "ternary", "q8_0", "q4_0"):
        return {"format": name}
    raise LmforgeError(f"unknown quantization scheme {scheme!r}: use one of {SCHEMES}")


def scheme_name(spec: dict) -> str:
    if spec["format"] == "intn":
        return f"int{spec['bits']}-g{spec['group_size']}"
    return spec["format"]


def bits_of(spec: dict) -> float:
    """Nominal weight bits (no scale overhead), for mixed-precision budgets."""
    return {"int8": 8, "w8a8": 8, "nf4": 4, "ternary": 2, "q8_0": 8, "q4_0": 4}.get(
        spec["format"], spec.get("bits", 16)
    )


def check_spec(spec: dict, where: str) -> None:
    fmt = spec.get("format") if isinstance(spec, dict) else None
    if fmt not in FORMATS:
        raise LmforgeError(
            f"{where}: quantization format {fmt!r} is not supported by this build of lmforge "
            f"(known: {', '.join(sorted(FORMATS))}); upgrade lmforge or re-quantize the model"
        )


def linear_names(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> list[str]:
    """Names of the float nn.Linear modules `swap` would replace."""
    pats = [re.compile(p) for p in skip]
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not any(p.search(n) for p in pats)]


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
    config = getattr(model, "config", None)
    if name == "lm_head" and isinstance(module, QuantLinear) and getattr(config, "tie_word_embeddings", False):
        # A quantized head no longer shares the embedding's tensor: untie, so that checkpoints save the
        # head's own tensors and loading does not tie a float weight over them.
        config.tie_word_embeddings = False


def make_quant_linear(linear: nn.Module, spec: dict, input_scale: torch.Tensor | None = None) -> QuantLinear:
    """Quantise a float linear with `spec`; on the meta device build an empty module to load into."""
    params = {k: v for k, v in spec.items() if k not in ("format", "input_scale")}
    cls = FORMATS[spec["format"]]
    if linear.weight.is_meta:
        return cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            bool(spec.get("input_scale")),
            device="meta",
            dtype=linear.weight.dtype,
            **params,
        )
    return cls.from_float(linear, input_scale=input_scale, **params)


def swap(
    model: nn.Module, scheme: str | dict, skip: Iterable[str] = DEFAULT_SKIP, record_transform: bool = True
) -> nn.Module:
    """Replace nn.Linear children by quantized ones, in place; returns the model.

    `scheme` is a name ('int4-g128'), a spec dict, or a saved quant config (its `modules` map says
    exactly which module gets which spec; `skip` is then ignored). Real weights are quantised by
    round-to-nearest and the result is recorded in the model's transform manifest (so a saved
    checkpoint reloads it); weights on the meta device give empty modules for a checkpoint load."""
    quantized = False
    for name, spec in plan(model, scheme, skip):
        linear = get_module(model, name)
        if isinstance(linear, QuantLinear):
            continue
        set_module(model, name, make_quant_linear(linear, spec))
        quantized = quantized or not linear.weight.is_meta
    if quantized and record_transform:
        record(model, quant_config(model, "rtn"))
    return model


def record(model: nn.Module, config: dict) -> None:
    """Append a quant entry to the model's transform manifest (saved and replayed by lmforge.checkpoint);
    recording the same modules with the same specs twice adds nothing."""
    entry = {"kind": "quant", **config}
    if any(e.get("modules") == entry["modules"] for e in transforms(model, "quant")):
        return
    record_transform(model, entry)


def plan(model: nn.Module, scheme: str | dict, skip: Iterable[str] = DEFAULT_SKIP) -> Iterator[tuple[str, dict]]:
    if isinstance(scheme, dict) and "modules" in scheme:
        check_config(scheme)
        known = dict(model.named_modules())
        for name, spec in scheme["modules"].items():
            if name not in known:
                raise LmforgeError(f"quantization config names module {name!r}, which this model does not have")
            yield name, spec
        return
    spec = parse_scheme(scheme)
    for name in linear_names(model, skip):
        yield name, spec


def quant_config(model: nn.Module, method: str = "rtn", **extra: Any) -> dict[str, Any]:
    """The JSON-able record of what was quantized how (stored in the checkpoint manifest)."""
    modules = {n: m.spec() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    return {"quant_method": "lmforge", "version": CONFIG_VERSION, "method": method, "modules": modules, **extra}


def check_config(config: dict, source: str = "quantization config") -> None:
    """Fail early, naming the file and the format, on a config this build cannot load."""
    if not isinstance(config, dict) or config.get("quant_method") != "lmforge" or "modules" not in config:
        raise LmforgeError(
            f"{source}: not an lmforge quantization config (expected quant_method 'lmforge' and 'modules')"
        )
    if int(config.get("version", 0)) > CONFIG_VERSION:
        raise LmforgeError(
            f"{source}: quantization config version {config['version']} is newer than this "
            f"lmforge supports ({CONFIG_VERSION}); upgrade lmforge"
        )
    for name, spec in config["modules"].items():
        check_spec(spec, f"{source}: module {name}")


def quantize_state_dict(
    state_dict: dict[str, torch.Tensor], scheme: str | dict, skip: Iterable[str] = DEFAULT_SKIP
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Quantize a float state dict without a model: every 2-D float `<name>.weight` not matched by
    `skip` is treated as a Linear. Returns (quantized state dict, quant config)."""
    spec = parse_scheme(scheme)
    pats = [re.compile(p) for p in skip]
    out, modules = dict(state_dict), {}
    for key, w in state_dict.items():
        name = key.removesuffix(".weight")
        if not key.endswith(".weight") or w.ndim != 2 or not w.is_floating_point() or any(p.search(name) for p in pats):
            continue
        linear = nn.Linear(w.shape[1], w.shape[0], bias=f"{name}.bias" in state_dict, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)
        if linear.bias is not None:
            linear.bias = nn.Parameter(state_dict[f"{name}.bias"], requires_grad=False)
        q = make_quant_linear(linear, spec)
        del out[key]
        out.update({f"{name}.{k}": v for k, v in q.state_dict().items()})
        modules[name] = q.spec()
    return out, {"quant_method": "lmforge", "version": CONFIG_VERSION, "method": "rtn", "modules": modules}
