"""Pieces the multimodal recipes (vlm, audio, video) share: batches of chat-template rows with a
loss mask, the LM loss over them, and the fit options of a training stage."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lmforge.recipes._common import add_config_arguments
from lmforge.recipes._fit import FitOptions, add_resume_argument


def add_train_eval_arguments(p: argparse.ArgumentParser, default_config: str | None, model_help: str) -> None:
    """`train|eval`, the recipe config flags, --out/--overwrite (train), --model (eval), --json, --resume."""
    p.add_argument("action", choices=["train", "eval"])
    add_config_arguments(p, default_config)
    p.add_argument("--out", help="train: output folder")
    p.add_argument("--overwrite", action="store_true", help="train: replace --out even if lmforge did not write it")
    p.add_argument("--model", help=f"eval: {model_help}")
    p.add_argument("--json", help="write the metrics to this JSON file")
    add_resume_argument(p)  # train: checkpoints and metrics.jsonl are in <out>.train/


def stage_options(steps: int, optim_cfg, resume: str | None) -> FitOptions:
    """Clipped at 1.0, checkpoints every quarter of the stage (resume continues from them)."""
    return FitOptions(steps, optim_cfg, clip_grad=1.0, save_every=max(1, steps // 4), resume=resume)


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and next-token labels [B, T] (-100 off the assistant's tokens).
    Right padding needs no attention mask: causal real tokens never see the pads after them."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, (row, mask) in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        target = torch.tensor(row[1:] + [pad_id])
        keep = torch.tensor(mask[1:] + [0], dtype=torch.bool)
        labels[b, : len(row)] = torch.where(keep, target, torch.full_like(target, -100))
    return ids.to(device), labels.to(device)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
