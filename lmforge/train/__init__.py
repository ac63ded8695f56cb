"""L4: training building blocks as plain functions: objectives (CLM, MLM, span corruption),
parameter groups and LR schedules, the train step (accumulation, clipping, non-finite and spike
guards), evaluation, checkpoints with resume, DDP/FSDP wrapping, memory estimates.

The loop itself is `fit` (used by the pretrain and sft recipes); nothing is a Trainer class.
"""

from .distributed import shutdown
from .fit import RunContext, fit, summary_line
from .loop import EarlyStopping, SpikeGuard, StepHooks, StepResult, TrainConfig, evaluate, train_step
from .objectives import (
    IGNORE,
    OBJECTIVES,
    ObjectiveTokens,
    apply_mlm,
    batch_generator,
    clm_batch,
    corrupt_spans,
    lm_loss_sum,
    mlm_batch,
    prefix_lm_mask,
    random_spans_noise_mask,
    span_batch,
)
from .optim import OptimConfig, build_optimizer, lr_at, param_groups
from .setup import autocast_dtype, prepare_model, setup_runtime

__all__ = [
    "RunContext",
    "fit",
    "summary_line",
    "EarlyStopping",
    "SpikeGuard",
    "StepHooks",
    "StepResult",
    "TrainConfig",
    "evaluate",
    "train_step",
    "IGNORE",
    "OBJECTIVES",
    "ObjectiveTokens",
    "apply_mlm",
    "batch_generator",
    "clm_batch",
    "corrupt_spans",
    "lm_loss_sum",
    "mlm_batch",
    "prefix_lm_mask",
    "random_spans_noise_mask",
    "span_batch",
    "OptimConfig",
    "build_optimizer",
    "lr_at",
    "param_groups",
    "autocast_dtype",
    "prepare_model",
    "setup_runtime",
    "shutdown",
]
