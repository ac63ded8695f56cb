"""Save/load multimodal models as folders: config.json + model.safetensors (+ the tokenizer).

    config.json   {"lmforge_multimodal": "clip" | "vlm" | "alm", "config": {...}}
    vision/       the image encoder alone as a Hugging Face CLIPVisionModel folder (interop)

Hugging Face CLIP vision towers (a CLIPVisionModel or CLIPModel folder) load with
`load_hf_vision(folder)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.common import LmforgeError, atomic_dir, atomic_write_json, read_json

from .alm import AlmConfig, AudioLanguageModel
from .clip import CLIP, ClipConfig
from .vit import VisionConfig, VisionTransformer, hf_to_lmforge, lmforge_to_hf
from .vlm import VisionLanguageModel, VlmConfig

KINDS = {"clip": (CLIP, ClipConfig), "vlm": (VisionLanguageModel, VlmConfig), "alm": (AudioLanguageModel, AlmConfig)}


def _contiguous_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied embeddings): keep the first name of each tensor.
    seen, state = set(), {}
    for key, value in module.state_dict().items():
        if value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        state[key] = value.detach().contiguous().cpu()
    return state


def save_hf_vision(vision: VisionTransformer, out_dir: str | Path) -> None:
    """The image encoder as a transformers CLIPVisionModel folder."""
    with atomic_dir(out_dir) as tmp:
        save_file(lmforge_to_hf(_contiguous_state(vision)), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", vision.config.to_hf())


def load_hf_vision(folder: str | Path) -> VisionTransformer:
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise LmforgeError(f"{folder}: expected a CLIP vision folder with config.json and model.safetensors")
    vision = VisionTransformer(VisionConfig.from_hf(read_json(folder / "config.json")))
    state = hf_to_lmforge(load_file(str(folder / "model.safetensors")))
    missing, unexpected = vision.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LmforgeError(
            f"{folder}: vision weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return vision


def save_multimodal(
    model: CLIP | VisionLanguageModel | AudioLanguageModel,
    out_dir: str | Path,
    tokenizer=None,
    extra: dict | None = None,
) -> Path:
    kind = "clip" if isinstance(model, CLIP) else "alm" if isinstance(model, AudioLanguageModel) else "vlm"
    config = {"clip": lambda: model.config, "vlm": lambda: model.vlm_config, "alm": lambda: model.alm_config}[kind]()
    with atomic_dir(out_dir, mark=True) as tmp:
        save_file(_contiguous_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(
            tmp / "config.json",
            {"lmforge_multimodal": kind, "config": config.to_dict(), **({"extra": extra} if extra else {})},
        )
        if tokenizer is not None:
            tokenizer.save(tmp)
        if kind != "alm":
            save_hf_vision(model.vision, tmp / "vision")
    return Path(out_dir)


def is_multimodal(path: str | Path) -> bool:
    file = Path(path) / "config.json"
    return file.is_file() and "lmforge_multimodal" in read_json(file)


def load_multimodal(path: str | Path, device=None, kind: str | None = None):
    """-> the model (its tokenizer, when saved, is the folder's tokenizer.json). `kind` ("clip"/"vlm"/"alm")
    checks what the folder holds."""
    path = Path(path)
    if not is_multimodal(path):
        raise LmforgeError(f"{path}: not an lmforge CLIP/VLM/ALM folder (config.json without 'lmforge_multimodal')")
    meta = read_json(path / "config.json")
    found = meta["lmforge_multimodal"]
    if found not in KINDS or (kind and found != kind):
        raise LmforgeError(f"{path}: holds a {found!r} model, expected {kind!r}")
    cls, config_cls = KINDS[found]
    model = cls(config_cls.from_dict(meta["config"]))
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight", "text.lm_head.weight", "language_model.lm_head.weight"}
    if [k for k in missing if k not in tied] or unexpected:
        raise LmforgeError(
            f"{path}/model.safetensors does not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for lm in (getattr(model, "text", None), getattr(model, "language_model", None)):
        if lm is not None:
            lm.tie_weights()
    return model.to(device or "cpu").eval()
