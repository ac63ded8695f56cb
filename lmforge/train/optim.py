"""Optimizer and learning-rate schedule.

AdamW with decoupled weight decay on the matrices only: norms, biases and embeddings are left
alone (decaying a norm gain or an embedding row pulls it to zero for no regularisation benefit).
The schedule is a pure function of the step, so resuming needs only the step number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from lmforge.common import LmforgeError, checked


@dataclass
class OptimConfig:
    # adamw, or muon: Muon (orthogonalised momentum) on the hidden matrices, AdamW on the rest (train/muon.py)
    name: str = checked("adamw", choices=("adamw", "muon"))
    momentum: float = checked(0.95, ge=0, lt=1)  # muon
    lr: float = checked(3e-4, gt=0)
    min_lr_ratio: float = checked(0.1, ge=0, le=1)  # the schedule ends at lr * min_lr_ratio
    weight_decay: float = checked(0.1, ge=0)
    betas: tuple[float, float] = checked((0.9, 0.95), ge=0, lt=1)
    eps: float = checked(1e-8, gt=0)
    schedule: str = checked("cosine", choices=("cosine", "wsd", "constant"))  # wsd: warmup-stable-decay
    warmup_steps: int = checked(10, ge=0)
    decay_fraction: float = checked(0.2, ge=0, le=1)  # wsd: the last fraction of steps decays linearly
    fused: bool | None = None  # None: fused kernel where torch has one for the device


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: 2-D+ weights of Linear layers decay; norms, biases and embeddings do not."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # tied weights appear once
        (decay if p.ndim >= 2 and id(p) not in no_decay_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "muon":
        from .muon import build_muon

        return build_muon(model, cfg.lr, cfg.weight_decay, tuple(cfg.betas), cfg.eps, cfg.momentum)
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    if not groups:
        raise LmforgeError("the model has no trainable parameters (all frozen?)")
    kwargs = {}
    if cfg.fused is not False:
        device = groups[0]["params"][0].device
        is_dtensor = type(groups[0]["params"][0]).__name__ == "DTensor"
        if cfg.fused or (device.type in ("cpu", "cuda") and not is_dtensor):
            kwargs["fused"] = True
    kinds = {type(p).__name__ == "DTensor" for g in groups for p in g["params"]}
    if len(kinds) > 1:  # tensor parallelism: sharded and replicated tensors cannot share a foreach kernel
        kwargs["foreach"] = False
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine or WSD."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(total_steps * cfg.decay_fraction))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return peak
        return peak - (peak - floor) * min(1.0, (step - decay_start) / decay_steps)
    raise LmforgeError(f"unknown schedule {cfg.schedule!r}: use cosine, wsd or constant")


def set_lr(optimizer: torch.optim.Optimizer, lr: float, peak: float | None = None) -> None:
    """Every group at `lr`, except a group with its own peak `base_lr` (e.g. a VLM's projector vs its
    LM), which gets base_lr * lr / peak: the same schedule, scaled."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr / peak if peak and "base_lr" in group else lr
