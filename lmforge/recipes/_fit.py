"""`train.fit` for the recipes whose loss is not the LM loss (align, clip, vlm, train-medusa,
quantize --method qat): one call sets up the run folder, metrics.jsonl, the schedule and the
checkpoints, so these recipes share the pretrain/SFT loop (resume, clipping, non-finite guard,
metrics) instead of writing their own.

    summary = run_fit(model, optimizer, loss_fn, next_batch, run_dir, FitOptions(steps=100), state=state)

`next_batch(step)` returns the step's batch (a dict); it must be a function of the step and of
`state` (a LoopState holding the recipe's generators and counters) so a resumed run sees the
batches the interrupted one would have.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmforge.common import LmforgeError, dist_info
from lmforge.recipes._common import MetricsWriter
from lmforge.train import OptimConfig, RunContext, TrainConfig, fit
from lmforge.train.loop import LossFn


@dataclass
class FitOptions:
    steps: int
    optim: OptimConfig  # the LR schedule (train/optim.py's lr_at); see constant_lr
    clip_grad: float = 0.0  # 0: no clipping (the norm is still logged)
    save_every: int = 0  # 0: a checkpoint only at the end (resume continues from there)
    keep_last: int = 2
    log_every: int = 1
    resume: str | None = None  # None | "latest" | a checkpoint folder


def constant_lr(lr: float) -> OptimConfig:
    return OptimConfig(lr=lr, schedule="constant", warmup_steps=0)


def warmup_cosine(lr: float, warmup_steps: int, weight_decay: float = 0.0) -> OptimConfig:
    """Linear warmup, then cosine to 10% of `lr`, AdamW betas (0.9, 0.98): the clip/vlm schedule."""
    return OptimConfig(lr=lr, warmup_steps=warmup_steps, min_lr_ratio=0.1, weight_decay=weight_decay, betas=(0.9, 0.98))


class LoopState:
    """What a recipe's batches depend on besides the step number, saved in every checkpoint (as
    JSON): NumPy and torch generators, and `values`, a dict of plain numbers the recipe updates."""

    def __init__(
        self, numpy: list[np.random.Generator] = (), generators: list[torch.Generator] = (), values: dict | None = None
    ) -> None:
        self.numpy, self.generators, self.values = list(numpy), list(generators), values if values is not None else {}

    def state_dict(self) -> dict:
        return {
            "numpy": [g.bit_generator.state for g in self.numpy],
            "torch": [g.get_state().tolist() for g in self.generators],
            "values": self.values,
        }

    def load_state_dict(self, state: dict) -> None:
        for g, s in zip(self.numpy, state.get("numpy", [])):
            g.bit_generator.state = s
        for g, s in zip(self.generators, state.get("torch", [])):
            g.set_state(torch.tensor(s, dtype=torch.uint8))
        self.values.update(state.get("values", {}))


def add_resume_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue from the newest good checkpoint (or the given checkpoint folder)",
    )


def run_dir_for(out: str | Path) -> Path:
    """Checkpoints and metrics.jsonl of a recipe whose --out folder is the finished model: beside it
    (`<out>.train/`), as the model folder is written in one piece at the end."""
    return Path(f"{Path(out)}.train")


def run_fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn | None,
    next_batch: Callable[[int], dict],
    run_dir: str | Path | None,
    opts: FitOptions,
    state: LoopState | None = None,
    tokenizer=None,
    device: torch.device | str = "cpu",
) -> dict:
    """`fit` with the recipe's loss (None: the LM loss on input_ids/labels): no LM evaluation, no spike guard (these losses may be negative
    or noisy by nature), fp32, one micro-batch per step. Returns fit's summary (final_loss, ...).
    `run_dir=None`: no metrics.jsonl and no checkpoints (a library call, not a run)."""
    if run_dir is None and opts.resume:
        raise LmforgeError("resume needs a run folder")
    info = dist_info()
    cfg = TrainConfig(
        steps=opts.steps,
        clip_grad=opts.clip_grad,
        spike_factor=0.0,
        eval_every=0,
        save_every=0 if run_dir is None else opts.save_every or opts.steps,
        keep_last=opts.keep_last,
        log_every=opts.log_every,
    )
    run_dir = Path(run_dir if run_dir is not None else ".")
    metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=info.is_main and cfg.save_every > 0)
    ctx = RunContext(run_dir, torch.device(device), torch.float32, info, metrics, tokenizer)
    try:
        return fit(
            model,
            optimizer,
            lambda step, i: next_batch(step),
            state,
            None,
            cfg,
            opts.optim,
            ctx,
            opts.resume,
            loss_fn=loss_fn,
            save_final=False,
        )
    finally:
        metrics.close()
