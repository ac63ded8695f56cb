"""L3: save and load models. Two folder formats, both safetensors only (nothing is unpickled):

* lmforge checkpoint: `lmforge_config.json` ({"model": ModelConfig, "transforms": [...]}) +
  `model.safetensors` (lmforge names) + tokenizer files (tokenizer.json, tokenizer_config.json with
  the chat template, the one source of truth for training, serving and evaluation).
* Hugging Face folder: `config.json` + `model.safetensors` or a sharded `model.safetensors.index.json`
  (GPT-2, Llama, Qwen2, Mistral, Mixtral), read and written with the key maps in `model.hf_keys`.

`transforms` is the manifest of what was done to the model (quantization scheme, adapters). Loading
builds the model on the meta device, replays each transform (module swaps), then loads the weights
with `assign=True`, so a quantized checkpoint loads without re-quantizing and without a float copy.
Transforms record themselves in the model's manifest (`lmforge.model.manifest`: a list of dicts with a "kind").
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.common import OUTPUT_MARKER, LmforgeError, atomic_dir, atomic_write_json, get_dtype, read_json
from lmforge.model import ModelConfig, Transformer, record_transform, transforms
from lmforge.model.hf_keys import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf
from lmforge.model.hub import resolve_model_path

LMFORGE_CONFIG = "lmforge_config.json"
FORMAT_VERSION = 1
# transform kind -> module with `replay(model, entry)` that recreates the transform's modules.
TRANSFORM_MODULES = {"quant": "lmforge.quant", "peft": "lmforge.peft"}


def is_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / LMFORGE_CONFIG).is_file() or (path / "config.json").is_file()


def load_model(path: str | Path, device=None, dtype=None) -> Transformer:
    """An lmforge checkpoint, a Hugging Face model folder or a .gguf file -> eval-mode Transformer."""
    path = resolve_model_path(path)  # a folder, a file, or a hub name in the local HF cache
    if not path.exists():
        raise LmforgeError(f"model path not found: {path}")
    transforms = []
    if path.is_file() and path.suffix.lower() == ".gguf":
        from lmforge.gguf_io import read_model  # lazily: the `gguf` package is an optional extra

        config, state, _ = read_model(path)
    elif (path / LMFORGE_CONFIG).is_file():
        meta = read_json(path / LMFORGE_CONFIG, "lmforge config")
        if not isinstance(meta, dict) or "model" not in meta:
            raise LmforgeError(f"{path / LMFORGE_CONFIG}: missing field 'model'")
        config = ModelConfig.from_dict(meta["model"])
        transforms = meta.get("transforms", [])
        state = _read_safetensors(path)
    elif (path / "config.json").is_file():
        config = config_from_hf(read_json(path / "config.json", "config.json"), str(path / "config.json"))
        state = state_dict_from_hf(_read_safetensors(path), config)
    else:
        raise LmforgeError(
            f"{path} is not a model folder: expected {LMFORGE_CONFIG} (lmforge) or config.json "
            "(Hugging Face) with model.safetensors, or a .gguf file"
        )
    model = build_and_load(config, state, transforms, source=str(path))
    if dtype is not None:
        model = model.to(get_dtype(dtype))
    if device is not None:
        model = model.to(device)
    return model.eval()


def build_and_load(
    config: ModelConfig, state: dict, transforms: list[dict] | None = None, source: str = "state dict"
) -> Transformer:
    """Build on the meta device, replay transforms, then load `state` by assignment."""
    with torch.device("meta"):
        model = Transformer(config)
    for entry in transforms or []:
        replay_transform(model, entry, source)
    _check_state(model, state, source)
    model.load_state_dict(state, strict=False, assign=True)
    model.reset_buffers(next(iter(state.values())).device if state else None)
    model.tie_weights()
    return model


def replay_transform(model: torch.nn.Module, entry: dict, source: str = "checkpoint") -> None:
    kind = entry.get("kind") if isinstance(entry, dict) else None
    if kind not in TRANSFORM_MODULES:
        raise LmforgeError(
            f"{source}: unknown transform {kind!r} in the manifest; this build of lmforge knows "
            f"{', '.join(TRANSFORM_MODULES)} (is the checkpoint from a newer lmforge?)"
        )
    module = importlib.import_module(TRANSFORM_MODULES[kind])
    if not hasattr(module, "replay"):
        raise LmforgeError(f"{source}: transform {kind!r} cannot be replayed by this build of lmforge")
    takes_source = "source" in inspect.signature(module.replay).parameters  # for messages naming the file
    module.replay(model, entry, **({"source": source} if takes_source else {}))
    record_transform(model, entry)


def _check_state(model: torch.nn.Module, state: dict, source: str) -> None:
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise LmforgeError(
            f"{source}: missing tensor(s) {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        )
    if unexpected:
        raise LmforgeError(
            f"{source}: unexpected tensor(s) {', '.join(unexpected[:5])}"
            + (" ..." if len(unexpected) > 5 else "")
            + " (config and weights disagree)"
        )
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise LmforgeError(
                f"{source}: tensor {name} has shape {tuple(t.shape)}, the config expects {tuple(expected[name].shape)}"
            )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = [path / "model.safetensors"]
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise LmforgeError(f"{index}: missing 'weight_map'")
        files = sorted({path / f for f in weight_map.values()})
    elif not files[0].is_file():
        bins = list(path.glob("*.bin")) + list(path.glob("*.pt"))
        hint = " (found pickle files: convert them to safetensors; lmforge never unpickles)" if bins else ""
        raise LmforgeError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    state = {}
    for f in files:
        if not f.is_file():
            raise LmforgeError(f"{f}: shard listed in the index is missing")
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise LmforgeError(f"{f}: not a readable safetensors file ({e})") from None
    return state


# ----------------------------------------------------------------------------- saving


# Files of an lmforge checkpoint written before the marker existed (recognised as lmforge's own).
_LEGACY_CHECKPOINT_FILES = {
    "lmforge_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}


def is_lmforge_output(path: str | Path) -> bool:
    """True if the folder holds only what lmforge wrote there (its marker lists every entry, or
    it is a bare lmforge checkpoint); a folder with anything else in it is the user's."""
    path = Path(path)
    entries = {p.name for p in path.iterdir()} if path.is_dir() else set()
    marker = path / OUTPUT_MARKER
    if marker.is_file():
        try:
            listed = set(json.loads(marker.read_text(encoding="utf-8"))["entries"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return False
        return entries - {OUTPUT_MARKER} <= listed
    return "lmforge_config.json" in entries and entries <= _LEGACY_CHECKPOINT_FILES


def check_output_dir(
    out: str | Path, inputs: Iterable[str | Path | None] = (), overwrite: bool = False, flag: str = "--out"
) -> Path:
    """Refuse an output folder whose replacement would lose data; returns it as given.

    Never (even with `overwrite`): the output is an input, or a folder holding an input (a
    trailing slash, `..` or a symlink does not hide it), or the working directory or one above it.
    Without `overwrite`: an existing file, or a non-empty folder lmforge did not write.
    """
    target = Path(out).resolve()
    for src in inputs:
        if src is None or not Path(src).exists():  # a name (a built-in data set), not a file to protect
            continue
        source = Path(src).resolve()
        if target == source or target in source.parents:
            what = "is the input" if target == source else "holds the input"
            raise LmforgeError(f"{flag} {out} {what} {src}: writing there would destroy it; choose another folder")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise LmforgeError(f"{flag} {out} is the working directory or a folder above it; choose a new folder")
    if overwrite or not (target.exists() or target.is_symlink()):
        return Path(out)
    if not target.is_dir():
        raise LmforgeError(f"{flag} {out} exists and is not a folder; pass --overwrite to replace it")
    if any(target.iterdir()) and not is_lmforge_output(target):
        raise LmforgeError(
            f"{flag} {out} is a non-empty folder that lmforge did not write; refusing to replace "
            "it (choose a new folder, or pass --overwrite to replace it and everything in it)"
        )
    return Path(out)


def save_model(model: Transformer, out_dir: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Write an lmforge checkpoint folder atomically (the old folder is replaced only when complete).
    A folder named by the user is checked with `check_output_dir` first: this replaces it whole."""
    out_dir = Path(out_dir)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    meta = {
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "transforms": transforms(model),
        **(extra or {}),
    }
    with atomic_dir(out_dir, mark=True) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "lmforge": "1"})
        atomic_write_json(tmp / LMFORGE_CONFIG, meta)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out_dir


# generation_config.json keys carried from an imported model (sampling defaults); ids are derived.
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def read_generation_defaults(path: str | Path) -> dict:
    """The sampling defaults stored with a model: a Hugging Face folder's generation_config.json, or
    the "generation" entry of an lmforge checkpoint (kept there by `convert --from-hf`). {} if none."""
    path = Path(path)
    if (path / LMFORGE_CONFIG).is_file():
        found = read_json(path / LMFORGE_CONFIG, "lmforge config").get("generation") or {}
    elif (path / "generation_config.json").is_file():
        found = read_json(path / "generation_config.json", "generation_config.json")
    else:
        return {}
    if not isinstance(found, dict):
        raise LmforgeError(f"{path}: the generation config must be a JSON object")
    return {k: found[k] for k in SAMPLING_KEYS if found.get(k) is not None}


def _id_list(value) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def generation_config(config: ModelConfig, tokenizer=None, defaults: dict | None = None) -> dict:
    """generation_config.json: every id a turn may end with (EOS plus the chat template's end of turn,
    e.g. <|im_end|>, so transformers/vLLM stop where lmforge does), bos/pad, and sampling defaults."""
    from lmforge.tokenizer.text import end_of_turn_ids

    eos = _id_list(config.eos_token_id)
    if tokenizer is not None:
        eos += [i for i in end_of_turn_ids(tokenizer) if i not in eos]
    bos = config.bos_token_id if config.bos_token_id is not None else getattr(tokenizer, "bos_id", None)
    pad = config.pad_token_id if config.pad_token_id is not None else getattr(tokenizer, "pad_id", None)
    out = {"bos_token_id": bos, "eos_token_id": eos[0] if len(eos) == 1 else eos or None, "pad_token_id": pad}
    out.update({k: v for k, v in (defaults or {}).items() if k in SAMPLING_KEYS})
    return {k: v for k, v in out.items() if v is not None}


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def save_hf(model: Transformer, out_dir: str | Path, tokenizer=None, generation: dict | None = None) -> Path:
    """Export to a Hugging Face folder that `transformers.AutoModelForCausalLM.from_pretrained` loads:
    config.json with the real dtype, generation_config.json (`generation_config`), the tokenizer, and a
    quantized model's linears in the compressed-tensors layout (`lmforge.quant.hf_export`)."""
    kinds = [e.get("kind", "?") for e in transforms(model)]
    if any(k != "quant" for k in kinds):
        raise LmforgeError(
            f"cannot export a transformed model ({', '.join(kinds)}) to a plain HF folder: merge the adapters "
            "first (`lmforge.peft.export_peft` writes them in PEFT's format)"
        )
    c = model.config
    dtype = _float_dtype(model)
    hf_config = config_to_hf(c)
    dtype_name = str(dtype).removeprefix("torch.")
    hf_config.update(torch_dtype=dtype_name, dtype=dtype_name)  # transformers v4 reads torch_dtype, v5 dtype
    gen = generation_config(c, tokenizer, generation)
    for key in ("bos_token_id", "pad_token_id"):
        hf_config[key] = gen.get(key) if hf_config.get(key) is None else hf_config[key]
    if hf_config.get("eos_token_id") is None and tokenizer is not None:
        hf_config["eos_token_id"] = tokenizer.eos_id
    state = model.state_dict()
    quantized: dict[str, torch.Tensor] = {}
    if kinds:
        from lmforge.peft.io import keeps_hf_names
        from lmforge.quant.hf_export import compressed_tensors_export

        quantized, hf_config["quantization_config"] = compressed_tensors_export(model, dtype)
        modules = {k.rsplit(".", 1)[0] for k in quantized}
        if not keeps_hf_names(modules, c):
            raise LmforgeError(
                f"cannot export a quantized {c.arch} model to Hugging Face: its HF layout renames linears"
            )
        state = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in modules}
    state = {**state_dict_to_hf(state, c), **quantized}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, mark=True) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", hf_config)
        atomic_write_json(tmp / "generation_config.json", gen)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out_dir


def load_tokenizer_if_any(path: str | Path):
    """The tokenizer stored with a model folder (or in a .gguf file), or None when there is none."""
    path = resolve_model_path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from lmforge.gguf_io import read_gguf
        from lmforge.gguf_io.vocab import tokenizer_from_metadata

        return tokenizer_from_metadata(read_gguf(path, tensors=False)[0], str(path))
    if not (path / "tokenizer.json").is_file():
        return None
    from lmforge.tokenizer import load_tokenizer

    return load_tokenizer(path)
