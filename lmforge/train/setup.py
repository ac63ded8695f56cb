"""Putting a model on the device for training: activation checkpointing, DDP/FSDP wrapping,
the optimizer (built after sharding, so its state is sharded too), torch.compile."""

from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.common import LmforgeError, get_device, get_dtype, seed_everything

from .distributed import init_distributed, wrap_model
from .loop import TrainConfig
from .optim import OptimConfig, build_optimizer
from .pipeline import wrap_pipeline


def setup_runtime(device_name: str | None, seed: int):
    """(device, dist info): joins torchrun's process group when there is one."""
    device = get_device(device_name)
    info = init_distributed(device)
    if device.type == "cuda" and info.world_size > 1:
        device = torch.device("cuda", info.local_rank)
    seed_everything(seed)  # same seed on every rank: identical initial weights
    return device, info


def autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 autocast where the device supports it ('auto'), never fp16 (it needs loss scaling)."""
    dtype = get_dtype(name, device)
    if dtype == torch.float16:
        raise LmforgeError("train.dtype float16 is not supported (needs loss scaling): use bfloat16 or float32")
    return dtype


def prepare_model(model: nn.Module, cfg: TrainConfig, optim_cfg: OptimConfig, device: torch.device):
    """-> (model to call, optimizer). The returned model may be a DDP/FSDP/compiled wrapper."""
    model.model.gradient_checkpointing = bool(cfg.activation_checkpointing)
    model.to(device)
    model.train()
    if cfg.pp > 1:  # each rank trains its stage; the optimizer holds that stage's parameters only
        if cfg.tp > 1 or cfg.strategy == "fsdp" or cfg.compile or cfg.activation_checkpointing:
            raise LmforgeError("--pp cannot be combined with --tp, fsdp, compile or activation checkpointing yet")
        wrapped = wrap_pipeline(model, cfg.pp, cfg.pp_schedule, cfg.grad_accum, cfg.eval_batches, device)
        return wrapped, build_optimizer(wrapped.stage_model, optim_cfg)
    wrapped = wrap_model(model, cfg.strategy, device, cfg.tp)
    optimizer = build_optimizer(wrapped, optim_cfg)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    return wrapped, optimizer
