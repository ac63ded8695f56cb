"""Training checkpoints: `<root>/step-00000100/` holding

    model/                      an lmforge checkpoint (save_model): loadable, HF-exportable
    train_state.safetensors     optimizer moments + RNG states as tensors; step, loader state and
                                counters as JSON in the safetensors metadata (nothing is unpickled)
    manifest.json               sha256 of every file, written last

The folder is built under a temporary name and renamed when complete, so a crash leaves either
the whole checkpoint or none. On resume, a folder whose manifest is missing or whose hashes do
not match is reported and skipped, and the previous good one is used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from lmforge.checkpoint import build_and_load, save_model
from lmforge.common import LmforgeError, atomic_dir, atomic_write_json, get_logger
from lmforge.model import Transformer, transforms

from .distributed import full_model_state, full_optimizer_state, load_full_state, unwrap

log = get_logger("lmforge.train")
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _flatten_optimizer(optim_state: dict) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {}
    for name, slots in optim_state["state"].items():
        for key, value in slots.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim/{name}/{key}"] = t.detach().cpu().contiguous()
    return tensors, optim_state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[str, dict] = {}
    for full, t in tensors.items():
        if full.startswith("optim/"):
            name, key = full[len("optim/") :].rsplit("/", 1)
            state.setdefault(name, {})[key] = t
    return {"state": state, "param_groups": groups}


def model_to_save(model: torch.nn.Module) -> torch.nn.Module | dict | None:
    """A plain Transformer holding full tensors, whatever the wrapping (collective under FSDP:
    every rank calls it; ranks other than 0 get None, the gathered state lives on rank 0). Any
    other module (CLIP, a VLM, a reward model, Medusa heads) -> its full state dict."""
    inner = unwrap(model)
    state = full_model_state(model)
    if not state:
        return None
    if not isinstance(inner, Transformer):
        return dict(state)
    return build_and_load(inner.config, dict(state), transforms(inner))


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict,
    tokenizer=None,
    keep_last: int = 3,
    is_main: bool = True,
) -> Path | None:
    """Collective: every rank calls it (gathering shards); rank 0 writes. Returns the folder."""
    plain = model_to_save(model)
    optim_state = full_optimizer_state(model, optimizer)
    if not is_main:
        return None
    tensors, groups = _flatten_optimizer(optim_state)
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    root = Path(root)
    clean_stale(root)
    path = root / f"step-{step:08d}"
    with atomic_dir(path) as tmp:
        if isinstance(plain, dict):  # not a Transformer: the weights alone (the recipe knows the module)
            (tmp / "model").mkdir()
            # clone: safetensors refuses tensors that share storage (tied weights)
            save_file(
                {k: v.detach().clone().contiguous() for k, v in plain.items()}, str(tmp / "model" / "model.safetensors")
            )
        else:
            save_model(plain, tmp / "model", tokenizer=tokenizer)
        meta = {"train": json.dumps({**train_state, "step": step}), "param_groups": json.dumps(groups)}
        save_file(tensors, str(tmp / TRAIN_STATE), metadata=meta)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        atomic_write_json(tmp / MANIFEST, {"step": step, "files": {str(p.relative_to(tmp)): _sha256(p) for p in files}})
    _prune(root, keep_last)
    return path


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def clean_stale(root: str | Path) -> None:
    """Remove the leftovers of checkpoint writes a crash interrupted: `.step-*.tmp` folders being
    built and `.step-*.old-*` ones being replaced (atomic_dir). Only the main rank writes
    checkpoints, and it calls this before writing, so none of them is in use."""
    root = Path(root)
    if not root.is_dir():
        return
    for stale in [*root.glob(".step-*.tmp"), *root.glob(".step-*.old-*")]:
        log.info("removing %s, left by an interrupted checkpoint write", stale)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def verify(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the write did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"unreadable manifest.json ({e})"
    for rel, digest in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if _sha256(f) != digest:
            return f"{rel} does not match its sha256 in manifest.json (corrupt)"
    return None


def latest_good(root: str | Path) -> Path | None:
    """The newest checkpoint that verifies; bad ones are reported and skipped."""
    for path in reversed(list_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is unusable: %s; trying the previous one", path, problem)
    return None


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore weights, optimizer and RNG into a (possibly wrapped) model; returns the train state."""
    path = Path(path)
    try:
        model_state = load_file(str(path / "model" / "model.safetensors"))
        tensors = load_file(str(path / TRAIN_STATE))
        with safe_open(str(path / TRAIN_STATE), "pt") as f:
            meta = f.metadata()
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"{path}: cannot read checkpoint ({e})") from None
    if (
        isinstance(unwrap(model), Transformer)
        and "lm_head.weight" not in model_state
        and "model.embed_tokens.weight" in model_state
    ):
        model_state["lm_head.weight"] = model_state["model.embed_tokens.weight"]  # tied
    optim_state = _unflatten_optimizer(tensors, json.loads(meta["param_groups"]))
    load_full_state(model, optimizer, model_state, optim_state if optimizer is not None else None)
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return json.loads(meta["train"])
