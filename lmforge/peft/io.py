"""Adapter files: lmforge's own format (any method) and Hugging Face PEFT's format (LoRA/DoRA).

lmforge format, a folder with
  lmforge_adapter.json         {"format": "lmforge-adapter", "base_model": name, "base_shape": {...},
                                "adapters": [config dicts]}
  lmforge_adapter.safetensors  the adapter tensors under the model's state_dict names
PEFT format, a folder with
  adapter_config.json          {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
  adapter_model.safetensors    base_model.model.<module>.lora_A.weight, .lora_B.weight
                               (and .lora_magnitude_vector for DoRA)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.common import LmforgeError, atomic_path, atomic_write_json, read_json

from .api import adapter_state_dict, apply, peft_configs
from .config import LoraConfig, PeftConfig, config_from_dict, config_to_dict
from .layers import LoraLinear

NATIVE_JSON, NATIVE_WEIGHTS = "lmforge_adapter.json", "lmforge_adapter.safetensors"
PEFT_JSON, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Module names that hold per-adapter entries: the component after them is the adapter name.
_CONTAINERS = {
    "lora_A",
    "lora_B",
    "lora_E",
    "lora_dropout",
    "lora_magnitude_vector",
    "ia3_l",
    "peft_adapter",
    "peft_prompt",
    "peft_prefix",
}


def _base_shape(model: nn.Module) -> dict:
    c = getattr(model, "config", None)
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    return {f: getattr(c, f) for f in fields if hasattr(c, f)}


def _rename(key: str, old: str, new: str) -> str:
    parts = key.split(".")
    for i in range(1, len(parts)):
        if parts[i] == old and parts[i - 1] in _CONTAINERS:
            parts[i] = new
    return ".".join(parts)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save_adapter(
    model: nn.Module, directory: str | Path, base_model_name: str | None = None, adapter_name: str | None = None
) -> Path:
    """Write the adapter(s) (all, or just `adapter_name`) and their configs; the base is not saved."""
    configs = [c for c in peft_configs(model) if adapter_name is None or c.adapter_name == adapter_name]
    if not configs:
        raise LmforgeError(f"no adapter {adapter_name or ''} on this model to save".replace("  ", " "))
    directory = Path(directory)
    _save_tensors(adapter_state_dict(model, adapter_name), directory / NATIVE_WEIGHTS)
    atomic_write_json(
        directory / NATIVE_JSON,
        {
            "format": "lmforge-adapter",
            "version": 1,
            "base_model": base_model_name,
            "base_shape": _base_shape(model),
            "adapters": [config_to_dict(c) for c in configs],
        },
    )
    return directory


def _check_base(meta: dict, model: nn.Module, path: Path, base_model_name: str | None) -> None:
    want, have = meta.get("base_model"), base_model_name
    if want and have and want != have:
        raise LmforgeError(f"{path}: adapter was trained on base model {want!r}, not {have!r}")
    shape = _base_shape(model)
    diff = {k: (v, shape[k]) for k, v in (meta.get("base_shape") or {}).items() if k in shape and shape[k] != v}
    if diff:
        detail = ", ".join(f"{k}: adapter {a} vs model {b}" for k, (a, b) in diff.items())
        raise LmforgeError(f"{path}: adapter does not fit this base model ({detail}); it was made for {want!r}")


def _load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    for k, v in tensors.items():
        if k not in own:
            raise LmforgeError(f"{path}: tensor {k!r} has no place in this model")
        if own[k].shape != v.shape:
            raise LmforgeError(
                f"{path}: tensor {k!r} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}"
            )
    model.load_state_dict(tensors, strict=False)


def load_adapter(
    model: nn.Module, directory: str | Path, base_model_name: str | None = None, adapter_name: str | None = None
) -> nn.Module:
    """Add the adapter(s) saved in `directory` (lmforge or PEFT format) to `model` and load them.
    `adapter_name` renames a single saved adapter (to load several that were all "default")."""
    directory = Path(directory)
    if not (directory / NATIVE_JSON).is_file():
        if (directory / PEFT_JSON).is_file():
            return import_peft(model, directory, adapter_name or "default")
        raise LmforgeError(f"{directory}: no {NATIVE_JSON} or {PEFT_JSON} (not an adapter folder)")
    meta = read_json(directory / NATIVE_JSON, "adapter config")
    _check_base(meta, model, directory, base_model_name)
    configs: list[PeftConfig] = [config_from_dict(d, str(directory / NATIVE_JSON)) for d in meta.get("adapters", [])]
    tensors = load_file(str(directory / NATIVE_WEIGHTS))
    if adapter_name is not None:
        if len({c.adapter_name for c in configs}) != 1:
            raise LmforgeError(f"{directory}: holds several adapters; cannot rename them all to {adapter_name!r}")
        old = configs[0].adapter_name
        for c in configs:
            c.adapter_name = adapter_name
        tensors = {_rename(k, old, adapter_name): v for k, v in tensors.items()}
    present = peft_configs(model)
    for c in configs:
        if c not in present:  # the same adapter already there (e.g. resuming): just load its tensors
            apply(model, c)
    _load_tensors(model, tensors, directory)
    return model


# ----------------------------------------------------------------------------- PEFT format


def keeps_hf_names(modules: Iterable[str], config) -> bool:
    """Whether these linears keep their names (and shapes) in the model's Hugging Face layout, so
    tensors keyed by them (a PEFT adapter's, a quantized weight's) fit the transformers model. GPT-2's
    fused, transposed c_attn or Mixtral's renamed experts do not."""
    from lmforge.model.hf_keys import state_dict_to_hf

    probe = {f"{n}.weight": torch.zeros(1) for n in modules}
    try:
        return set(state_dict_to_hf(probe, config)) == set(probe)
    except (KeyError, RuntimeError, ValueError, LmforgeError):
        return False


def _lora_layers(model: nn.Module, adapter_name: str) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear) and adapter_name in m.lora_A}


def export_peft(
    model: nn.Module, directory: str | Path, adapter_name: str = "default", base_model_name: str | None = None
) -> Path:
    """Write LoRA/DoRA adapter `adapter_name` as PEFT's adapter_config.json + adapter_model.safetensors,
    loadable with `peft.PeftModel.from_pretrained(hf_model, directory)`."""
    config = next(
        (c for c in peft_configs(model) if c.adapter_name == adapter_name and isinstance(c, LoraConfig)), None
    )
    if config is None:
        raise LmforgeError(f"no LoRA adapter {adapter_name!r} on this model (PEFT export covers LoRA and DoRA)")
    layers = _lora_layers(model, adapter_name)
    if getattr(model, "config", None) is not None and not keeps_hf_names(layers, model.config):
        raise LmforgeError(
            f"cannot write PEFT format for a {model.config.arch} model: its Hugging Face layout renames or fuses "
            f"the adapted linears ({', '.join(sorted({n.split('.')[-1] for n in layers}))}); keep lmforge's format"
        )
    tensors = {}
    for name, m in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A[adapter_name].weight
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B[adapter_name].weight
        if adapter_name in m.lora_magnitude_vector:
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector[adapter_name]
    targets = sorted({n.split(".")[-1] for n in _lora_layers(model, adapter_name)})
    directory = Path(directory)
    _save_tensors(tensors, directory / PEFT_WEIGHTS, metadata={"format": "pt"})
    atomic_write_json(
        directory / PEFT_JSON,
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name,
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "target_modules": targets,
            "use_rslora": config.use_rslora,
            "use_dora": config.use_dora,
            "bias": "none",
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "init_lora_weights": True,
            "inference_mode": True,
            "rank_pattern": {},
            "alpha_pattern": {},
        },
    )
    return directory


def import_peft(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> nn.Module:
    """Load a PEFT-format LoRA/DoRA adapter (e.g. made by `peft`) onto `model` as `adapter_name`."""
    directory = Path(directory)
    meta = read_json(directory / PEFT_JSON, "PEFT adapter config")
    where = directory / PEFT_JSON
    if meta.get("peft_type") != "LORA":
        raise LmforgeError(f"{where}: peft_type {meta.get('peft_type')!r} is not supported (only LORA)")
    for key, ok in (
        ("fan_in_fan_out", False),
        ("bias", "none"),
        ("modules_to_save", None),
        ("rank_pattern", {}),
        ("alpha_pattern", {}),
        ("layers_to_transform", None),
    ):
        if meta.get(key) not in (None, ok, [], {}):
            raise LmforgeError(f"{where}: {key}={meta[key]!r} is not supported")
    if not (directory / PEFT_WEIGHTS).is_file():
        raise LmforgeError(f"{directory}: no {PEFT_WEIGHTS} (only safetensors PEFT adapters are read)")
    raw = load_file(str(directory / PEFT_WEIGHTS))
    suffixes = {
        ".lora_A.weight": "lora_A.{}.weight",
        ".lora_B.weight": "lora_B.{}.weight",
        ".lora_magnitude_vector": "lora_magnitude_vector.{}",
    }
    tensors, modules = {}, set()
    for key, value in raw.items():
        name = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if suffix is None:
            raise LmforgeError(f"{directory / PEFT_WEIGHTS}: unexpected tensor {key!r}")
        module = name.removesuffix(suffix)
        modules.add(module)
        tensors[f"{module}.{suffixes[suffix].format(adapter_name)}"] = value
    config = LoraConfig(
        r=int(meta["r"]),
        alpha=float(meta.get("lora_alpha", 8)),
        dropout=float(meta.get("lora_dropout", 0.0)),
        target_modules=sorted(modules),
        use_rslora=bool(meta.get("use_rslora", False)),
        use_dora=bool(meta.get("use_dora", False)),
        adapter_name=adapter_name,
    )
    apply(model, config)
    _load_tensors(model, tensors, directory / PEFT_WEIGHTS)
    return model
