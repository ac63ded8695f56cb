"""Settings of the `clip` and `vlm` recipes (YAML under lmforge/configs/, every field overridable
with `--set field=value`), and the small training helpers both recipes share."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from lmforge.common import LmforgeError, build_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ClipTrainConfig:
    data: str = "shapes"  # shapes | shapes1 | digits | path/to/data.jsonl
    train_size: int = 4000  # generated sets only
    eval_size: int = 500
    vision: dict = field(default_factory=lambda: {"image_size": 32, "patch_size": 8, "hidden_size": 128,
                                                  "intermediate_size": 512, "num_hidden_layers": 3,
                                                  "num_attention_heads": 4})
    text_preset: str = "tiny"
    text: dict = field(default_factory=lambda: {"max_position_embeddings": 64})
    projection_dim: int = 64
    vocab_size: int = 400
    init_vision: str | None = None  # a Hugging Face CLIP vision folder to start from
    freeze_vision: bool = False  # LiT: keep the (pretrained) image tower fixed
    hard_negatives: bool = False  # half of each batch: near-miss captions of the other half
    text_negatives: int = 0  # per image, this many captions with one word swapped, as extra negatives
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    seed: int = 0
    device: str = "auto"


@dataclass
class VlmTrainConfig:
    data: str = "shapes"
    train_size: int = 6000
    eval_size: int = 300
    vision: str = ""  # a CLIP run folder (lmforge clip train --out) or a HF CLIP vision folder
    lm: str | None = None  # an lmforge/HF language model folder; None: a fresh `lm_preset` model
    lm_preset: str = "tiny"
    lm_overrides: dict = field(default_factory=lambda: {"hidden_size": 128, "intermediate_size": 352,
                                                        "num_hidden_layers": 4, "num_attention_heads": 4,
                                                        "num_key_value_heads": 2, "max_position_embeddings": 256})
    vocab_size: int = 400
    text_warmup_steps: int = 300  # fresh LM only: text-only steps on the dataset's captions/answers first
    feature_layer: int = -2
    pool: int = 2  # 2x2 average pooling of the patch grid: 4x fewer image tokens in the LM
    select_feature: str = "patch"  # "cls_patch": the class token too, first (LLaVA's option)
    stage1_steps: int = 300  # projector only, captions
    stage2_steps: int = 600  # projector + LM (or LoRA), questions and captions
    lora_rank: int = 0  # > 0: stage 2 trains LoRA adapters (merged before saving) instead of the full LM
    batch_size: int = 32
    lr: float = 1e-3
    lm_lr: float = 5e-4
    vision_lr: float = 0.0  # > 0: stage 2 also fine-tunes the image encoder at this LR (0: frozen)
    weight_decay: float = 0.0
    warmup_steps: int = 30
    max_new_tokens: int = 32
    seed: int = 0
    device: str = "auto"


def _coerce(value: str, current):
    """A --set string as the field's current type (YAML syntax, so lists/dicts/null work)."""
    parsed = yaml.safe_load(value)
    if isinstance(current, float) and isinstance(parsed, int):
        return float(parsed)
    return parsed


def load_config(cls, path: str | None, overrides: list[str]):
    """Defaults <- YAML file (a name in lmforge/configs/ or a path) <- `field=value` overrides."""
    values: dict = {}
    if path:
        file = Path(path)
        if not file.is_file():
            file = CONFIG_DIR / (path if path.endswith(".yaml") else f"{path}.yaml")
        if not file.is_file():
            raise LmforgeError(f"config not found: {path} (nor {file})")
        loaded = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise LmforgeError(f"{file}: expected a mapping of settings")
        values.update(loaded)
    defaults = cls()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise LmforgeError(f"--set expects field=value, got {item!r}")
        values[key] = _coerce(value, getattr(defaults, key, None))
    return build_config(cls, values)  # unknown fields, types and ranges, each error naming the field


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup, then cosine to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    # base_lr: the peak the schedule scales each step (groups may differ).
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay, "base_lr": lr},
                              {"params": rest, "weight_decay": 0.0, "base_lr": lr}], lr=lr, betas=(0.9, 0.98))


def run_steps(optimizer: torch.optim.Optimizer, steps: int, warmup: int, batch_loss, log, what: str = "step") -> float:
    """The loop both recipes share: schedule the LR, loss = batch_loss(step), backward, clip, step.
    Returns the last loss."""
    loss = torch.zeros(())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for step in range(steps):
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * warmup_cosine(step, steps, warmup)
        loss = batch_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("%s %d/%d loss %.4f", what, step, steps, loss.item())
    return loss.item()
