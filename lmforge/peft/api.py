"""Model-level PEFT operations: apply a method, freeze the base, merge, switch adapters, and
pick out the adapter tensors.

Which parameters belong to an adapter is decided by name: a dotted-name component starting with
`lora_`, `ia3_` or `peft_` (PEFT's own names plus our `peft_adapter`/`peft_prompt`/`peft_prefix`
slots). Base weights of wrapped linears sit under `<name>.base_layer.`; `base_state_dict`
gives them back under their original names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lmforge.common import LmforgeError
from lmforge.model.manifest import drop_transforms, record_transform, transforms

from .adalora import AdaLoraLinear
from .bottleneck import add_bottleneck
from .config import (
    ALL_LINEAR,
    AdaLoraConfig,
    AdapterConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixConfig,
    PromptTuningConfig,
    PTuningConfig,
    config_from_dict,
    config_to_dict,
    expand_targets,
    matches,
    validate,
)
from .layers import IA3Linear, LoraLinear, NamedAdapters, WrappedLinear, is_linear_like
from .prompt import add_prefix, add_prompt, prompt_modules

ADAPTER_MARKERS = ("lora_", "ia3_", "peft_")
_LAYER_CLASS = {"lora": LoraLinear, "adalora": AdaLoraLinear, "ia3": IA3Linear}


def is_adapter_key(key: str) -> bool:
    return any(part.startswith(ADAPTER_MARKERS) for part in key.split("."))


def peft_configs(model: nn.Module) -> list[PeftConfig]:
    """The configs applied to `model`, oldest first, read from its transform manifest
    (`model.lmforge_transforms`, entries {"kind": "peft", "config": {...}}) that checkpoints store."""
    return [config_from_dict(e["config"]) for e in transforms(model, "peft")]


def apply(model: nn.Module, config: PeftConfig) -> nn.Module:
    """Add the adapter described by `config` to `model` (in place; returned for chaining), make
    it the active adapter of its kind, freeze everything else, and record it in the manifest."""
    for old in peft_configs(model):
        if old.method == config.method and old.adapter_name == config.adapter_name:
            raise LmforgeError(
                f"adapter {config.adapter_name!r} ({config.method}) is already on this model; "
                "give the new one another adapter_name"
            )
    _add(model, config)
    record_transform(model, {"kind": "peft", "config": config_to_dict(config)})
    return model


def replay(model: nn.Module, entry: dict) -> None:
    """Checkpoint hook: recreate the (empty) adapter modules a manifest entry describes, typically on
    the meta device before the weights are loaded. lmforge.checkpoint records the entry itself."""
    _add(model, config_from_dict(entry.get("config", {}), "checkpoint manifest"))


def _add(model: nn.Module, config: PeftConfig) -> None:
    validate(config)
    if isinstance(config, (LoraConfig, AdaLoraConfig, IA3Config)):
        _wrap_linears(model, config)
    elif isinstance(config, AdapterConfig):
        add_bottleneck(model, config)
    elif isinstance(config, (PromptTuningConfig, PTuningConfig)):
        add_prompt(model, config)
    elif isinstance(config, PrefixConfig):
        add_prefix(model, config)
    else:
        raise LmforgeError(f"not a PEFT config: {type(config).__name__}")
    model.train(model.training)  # new modules (dropout) follow the model's train/eval mode
    mark_only_adapters_trainable(model)


def _target_names(model: nn.Module, config: LoraConfig | AdaLoraConfig | IA3Config) -> list[str]:
    targets = expand_targets(config.target_modules)
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if "base_layer" in parts or is_adapter_key(name):
            continue  # inside a wrapper or an adapter
        linear = is_linear_like(module) or isinstance(module, WrappedLinear)
        if linear and (parts[-1] != "lm_head" if ALL_LINEAR in targets else matches(name, targets)):
            names.append(name)
    if not names:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if is_linear_like(m)})
        raise LmforgeError(
            f"{type(config).__name__}.target_modules={config.target_modules!r} matches no linear "
            f"module of the model (its linear modules: {', '.join(linear)})"
        )
    return names


def _wrap_linears(model: nn.Module, config: LoraConfig | AdaLoraConfig | IA3Config) -> None:
    cls = _LAYER_CLASS[config.method]
    names = _target_names(model, config)
    for name in names:  # check all before changing any, so a refused apply leaves the model as it was
        module = model.get_submodule(name)
        if isinstance(module, WrappedLinear) and not isinstance(module, cls):
            raise LmforgeError(
                f"{name} already carries a {type(module).__name__}; {config.method} cannot wrap "
                "the same linear (apply it to other target_modules)"
            )
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, cls):
            module = (
                cls(module, matches(name, expand_targets(config.feedforward_modules)))
                if isinstance(config, IA3Config)
                else cls(module)
            )
            model.set_submodule(name, module)
        if isinstance(config, LoraConfig):
            module.add_adapter(
                config.adapter_name, config.r, config.alpha, config.dropout, config.use_rslora, config.use_dora
            )
        elif isinstance(config, AdaLoraConfig):
            module.add_adapter(config.adapter_name, config.init_r, config.alpha, config.dropout)
        else:
            module.add_adapter(config.adapter_name)
        module.active = [config.adapter_name]


def mark_only_adapters_trainable(model: nn.Module) -> int:
    """requires_grad only on adapter parameters; returns how many elements are trainable."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_key(name))
        n += p.numel() if p.requires_grad else 0
    return n


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter elements."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _containers(model: nn.Module) -> list[nn.Module]:
    """Every module that holds named adapters and has `set_active`."""
    return [m for m in model.modules() if isinstance(m, (WrappedLinear, NamedAdapters))]


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the active adapters everywhere (others stay loaded but unused)."""
    names = [names] if isinstance(names, str) else list(names)
    known = {n for c in _containers(model) for n in c.adapter_names()}
    missing = [n for n in names if n not in known]
    if missing:
        raise LmforgeError(f"no adapter named {missing} on this model (loaded: {sorted(known)})")
    for c in _containers(model):
        c.set_active(names)


@contextlib.contextmanager
def adapter_rows(model: nn.Module, rows: list[str | None]) -> Iterator[None]:
    """Per-row LoRA selection for multi-LoRA serving: inside the context, batch row b uses the
    LoRA adapter named rows[b] (None: the base model). Only LoRA/DoRA layers take part; every
    forward inside must have len(rows) rows (prefill and decode steps of the same batch)."""
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    known = {n for m in layers for n in m.adapter_names()}
    bad = sorted({r for r in rows if r is not None and r not in known})
    if bad:
        raise LmforgeError(f"unknown LoRA adapter(s) {bad} (loaded: {sorted(known)})")
    device = next(model.parameters()).device
    index = {
        n: torch.tensor([i for i, r in enumerate(rows) if r == n], dtype=torch.long, device=device)
        for n in sorted({r for r in rows if r is not None})
    }
    for m in layers:
        m.row_index = {n: i for n, i in index.items() if n in m.lora_A}
        m.row_count = len(rows)
    try:
        yield
    finally:
        for m in layers:
            m.row_index, m.row_count = None, 0


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove LoRA/DoRA adapter `name` from `model` (the inverse of loading it: runtime unloading
    in the server). A wrapped linear left without adapters becomes its plain base layer again, so
    the model runs as fast as before the adapter came."""
    if not any(c.adapter_name == name and c.method == "lora" for c in peft_configs(model)):
        raise LmforgeError(f"no LoRA adapter named {name!r} on this model")
    for path, m in list(model.named_modules()):
        if not isinstance(m, LoraLinear) or name not in m.lora_A:
            continue
        if name in m.merged:
            raise LmforgeError(f"adapter {name!r} is merged into {path}; call peft.unmerge(model) first")
        for table in (m.lora_A, m.lora_B, m.lora_dropout, m.lora_magnitude_vector):
            if name in table:
                del table[name]
        m.scaling.pop(name, None)
        m._dora_norm.pop(name, None)
        m.active = [n for n in m.active if n != name]
        if not m.adapter_names():
            model.set_submodule(path, m.base_layer)
    drop_transforms(
        model, "peft", where=lambda e: e["config"]["method"] == "lora" and e["config"]["adapter_name"] == name
    )


def _mergeables(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, WrappedLinear)] + prompt_modules(model)


def merge(model: nn.Module) -> nn.Module:
    """Fold active LoRA/DoRA/AdaLoRA/IA3 adapters into the base weights (reversible with `unmerge`;
    a quantized base is replaced by a float copy while merged) and prompt/prefix encoders into
    plain tensors. Bottleneck adapters are not linear and stay as they are."""
    for m in _mergeables(model):
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for m in _mergeables(model):
        m.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put the plain base layers back (nn.Linear; a float nn.Linear where the base was
    quantized: re-quantize with lmforge.quant to get a small model again)."""
    merge(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, WrappedLinear):
            model.set_submodule(name, m.base_layer)
    drop_transforms(model, "peft", where=lambda e: e["config"]["method"] in _LAYER_CLASS)
    return model


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors (all adapters, or those of `adapter_name`), keyed as in model.state_dict()."""
    return {
        k: v
        for k, v in model.state_dict().items()
        if is_adapter_key(k) and (adapter_name is None or adapter_name in k.split("."))
    }


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under their original names (no adapters, no `.base_layer`)."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if not is_adapter_key(k)}
