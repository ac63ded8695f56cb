"""The pieces of a training loop as plain functions: one optimizer step over a list of
micro-batches (accumulation, token-weighted loss, MoE aux loss, autocast, clipping, non-finite and
spike guards), evaluation, early stopping. The loop itself is `fit.fit`; the loss is the LM loss
(`forward_loss`) unless the caller passes its own `loss_fn`.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lmforge.common import DTYPE_NAMES, LmforgeError, checked
from lmforge.parallel import tp_degree

from .align import distill_loss  # the one KL of distillation (mean over labelled tokens)
from .distributed import all_reduce_sum, clip_gradients, gradient_sync, unwrap
from .losses import fusable_head, linear_cross_entropy
from .objectives import IGNORE, lm_loss_sum
from .pipeline import PipelineModel


@dataclass
class TrainConfig:
    steps: int = checked(200, ge=1)  # optimizer steps
    micro_batch_size: int = checked(8, ge=1)
    grad_accum: int = checked(1, ge=1)
    seq_len: int = checked(128, ge=1)
    objective: str = checked("clm", choices=("clm", "mlm", "span"))
    clip_grad: float = checked(1.0, ge=0)  # 0: no clipping (the norm is still logged)
    dtype: str = checked("auto", choices=DTYPE_NAMES)  # autocast: auto = bf16 on GPUs that support it, else fp32
    compile: bool = False
    activation_checkpointing: bool = False
    strategy: str = checked("ddp", choices=("ddp", "fsdp"))  # fsdp only under torchrun
    tp: int = checked(1, ge=1)  # tensor-parallel degree (lmforge.parallel): torchrun with exactly tp processes
    pp: int = checked(1, ge=1)  # pipeline stages (train/pipeline.py): torchrun with exactly pp processes
    pp_schedule: str = checked("1f1b", choices=("gpipe", "1f1b"))  # grad_accum micro-batches per step
    seed: int = checked(0, ge=0)
    eval_every: int = checked(50, ge=0)  # 0: never
    eval_batches: int = checked(8, ge=1)
    patience: int = checked(0, ge=0)  # stop after this many evaluations without improvement (0: never)
    save_every: int = checked(100, ge=0)  # 0: no checkpoints
    keep_last: int = checked(2, ge=0)  # 0: keep every checkpoint
    spike_factor: float = checked(4.0, ge=0)  # skip an update whose loss exceeds this x the running mean (0: off)
    spike_window: int = checked(20, ge=1)
    log_every: int = checked(1, ge=1)
    auto_fit: bool = False


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class SpikeGuard:
    """Flags a loss above `factor` x the mean of the last `window` accepted losses."""

    factor: float = 4.0
    window: int = 20
    history: deque = field(default_factory=deque)

    def is_spike(self, loss: float) -> bool:
        if self.factor <= 0 or len(self.history) < self.window:
            return False
        return loss > self.factor * (sum(self.history) / len(self.history))

    def accept(self, loss: float) -> None:
        self.history.append(loss)
        while len(self.history) > self.window:
            self.history.popleft()


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int  # input tokens processed on all ranks
    skipped: str | None  # None, "nonfinite" or "spike"
    metrics: dict = field(default_factory=dict)  # a custom loss's own figures, averaged over micro-batches


# A custom objective: micro-batch -> (mean loss of that micro-batch, figures to log). Used by the
# recipes whose loss is not the token-level LM loss (DPO, PPO, CLIP, Medusa heads, ...).
LossFn = Callable[[dict], "tuple[torch.Tensor, dict]"]


def forward_loss(model: nn.Module, batch: dict, aux_coef: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(summed token loss, aux loss, labelled tokens) for one micro-batch.

    With a plain output head the loss is fused with it (`losses.linear_cross_entropy`): the model
    returns its final hidden states and only the last position's logits (which nothing uses).
    """
    kwargs = {k: batch[k] for k in ("segment_ids", "attn_mask", "attention_mask") if batch.get(k) is not None}
    labels = batch["labels"]
    n = int((labels != IGNORE).sum())
    if batch.get("teacher_logits") is not None:  # distillation: the full logits are needed
        logits, aux = model(batch["input_ids"], return_aux_loss=True, **kwargs)
        alpha, temperature = batch["distill"]
        kd = distill_loss(logits, batch["teacher_logits"], (labels != IGNORE).float(), temperature) * n
        return (1 - alpha) * lm_loss_sum(logits, labels)[0] + alpha * kd, aux * aux_coef, n
    head = fusable_head(model)
    if head is not None:
        _, aux, hidden = model(batch["input_ids"], return_aux_loss=True, return_hidden=True, logits_to_keep=1, **kwargs)
        if hidden.shape[:2] == labels.shape:
            return linear_cross_entropy(hidden, head.weight, labels), aux * aux_coef, n
        logits = head(hidden)  # a prompt-tuning prefix changed the length: take the plain path
    else:
        logits, aux = model(batch["input_ids"], return_aux_loss=True, **kwargs)
    loss_sum, n = lm_loss_sum(logits, labels)
    return loss_sum, aux * aux_coef, n


@dataclass
class StepHooks:
    """Method-specific additions to the plain step, e.g. AdaLoRA: an orthogonality regulariser in
    the loss and rank re-allocation after each update (while the gradients are still there)."""

    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None  # added once per optimizer step
    after_update: Callable[[int], object] | None = None  # called with the 1-based step number


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict],
    *,
    device: torch.device,
    dtype: torch.dtype,
    clip_grad: float,
    world_size: int,
    guard: SpikeGuard,
    aux_coef: float = 0.0,
    hooks: StepHooks | None = None,
    step: int = 0,
    loss_fn: LossFn | None = None,
) -> StepResult:
    """One optimizer step. The LM loss is the mean over every labelled token of the global batch
    (all micro-batches on all ranks), so accumulation and data parallelism give the same update
    as one big batch even when micro-batches hold different numbers of labelled tokens. A custom
    `loss_fn` returns each micro-batch's mean loss: the step averages those over micro-batches
    (and DDP/FSDP over ranks)."""
    max_norm = clip_grad if clip_grad > 0 else float("inf")
    if isinstance(model, PipelineModel):  # the schedule runs forward and backward over every stage
        if loss_fn is not None or (hooks is not None and hooks.extra_loss is not None):
            raise LmforgeError("--pp trains with the LM loss only (no custom loss or extra loss terms)")
        with autocast(device, dtype):
            loss_value, _ = model.pipeline_step(micro_batches)
        grad_norm, figures, replicas = model.grad_norm_and_clip(max_norm), {}, model.dp  # PP x DP: dp pipelines
    else:
        loss_value, grad_norm, figures = _forward_backward(
            model, micro_batches, device, dtype, max_norm, world_size, aux_coef, hooks, loss_fn
        )
        replicas = world_size // tp_degree(unwrap(model))  # the ranks of a TP group share one batch
    skipped = None
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        skipped = "nonfinite"
    elif guard.is_spike(loss_value):
        skipped = "spike"
    else:
        optimizer.step()
        guard.accept(loss_value)
        if hooks is not None and hooks.after_update is not None:
            hooks.after_update(step + 1)
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(b["input_ids"].numel() for b in micro_batches if "input_ids" in b) * replicas
    return StepResult(loss_value, grad_norm, tokens, skipped, figures)


def _forward_backward(
    model: nn.Module,
    micro_batches: list[dict],
    device: torch.device,
    dtype: torch.dtype,
    max_norm: float,
    world_size: int,
    aux_coef: float,
    hooks: StepHooks | None,
    loss_fn: LossFn | None,
) -> tuple[float, float, dict]:
    """Accumulated forward/backward over the micro-batches, then clipping -> (loss, grad norm, figures)."""
    if loss_fn is None:
        local = sum(int((b["labels"] != IGNORE).sum()) for b in micro_batches)
        n_global = max(1, int(all_reduce_sum(torch.tensor(float(local))).item()))
        scale = world_size / n_global  # gradients are averaged over ranks; undo that average
    else:
        n_global, scale = len(micro_batches) * world_size, 1.0 / len(micro_batches)
    loss_total = torch.zeros((), device=device)
    figures: dict[str, float] = {}
    for i, batch in enumerate(micro_batches):
        batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with gradient_sync(model, i == len(micro_batches) - 1), autocast(device, dtype):
            if loss_fn is None:
                loss_sum, aux, _ = forward_loss(model, batch, aux_coef)
            else:
                loss_sum, found = loss_fn(batch)
                aux = 0.0
                for k, v in found.items():
                    figures[k] = figures.get(k, 0.0) + float(v) / len(micro_batches)
            loss = loss_sum * scale + aux / len(micro_batches)
            if hooks is not None and hooks.extra_loss is not None:
                loss = loss + hooks.extra_loss(model) / len(micro_batches)
        loss.backward()
        loss_total += loss_sum.detach().float()
    loss_value = float(all_reduce_sum(loss_total)) / n_global
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = clip_gradients(params, max_norm) if params else 0.0
    return loss_value, grad_norm, figures


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device, dtype: torch.dtype) -> dict:
    """Token-weighted validation loss and perplexity over `batches` (summed over ranks)."""
    if isinstance(model, PipelineModel):  # grad_accum batches at a time: the schedule's micro-batches
        with autocast(device, dtype):
            total, count = model.pipeline_eval(list(batches), model.n_micro)
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for batch in batches:
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with autocast(device, dtype):
            loss_sum, _, n = forward_loss(model, batch, 0.0)
        total += float(loss_sum)
        count += n
    model.train(was_training)
    total, count = all_reduce_sum(total), all_reduce_sum(count)
    loss = float(total / count.clamp(min=1))
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


@dataclass
class EarlyStopping:
    patience: int = 0
    best: float = float("inf")
    bad_evals: int = 0

    def update(self, val_loss: float) -> bool:
        """Record an evaluation; True when it is a new best."""
        if val_loss < self.best:
            self.best, self.bad_evals = val_loss, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience
