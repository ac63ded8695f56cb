"""Data parallelism through torchrun: DDP (replicated model, all-reduced gradients) or FSDP2
(`fully_shard`: parameters, gradients and optimizer state sharded across ranks); or tensor
parallelism (`train.tp`, lmforge.parallel: every rank one shard of one replica). Single-process
runs go through the same functions, which then do nothing.

State dicts are always gathered to full, unsharded tensors (torch.distributed.checkpoint's
state_dict helpers), so a checkpoint written by N ranks loads in one process and vice versa.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lmforge.common import DistInfo, LmforgeError
from lmforge.parallel import apply_tensor_parallel, init_process_group

from .pipeline import PipelineModel

STRATEGIES = ("ddp", "fsdp")


def init_distributed(device: torch.device) -> DistInfo:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA); a no-op for one process."""
    return init_process_group(device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wrap_model(model: nn.Module, strategy: str, device: torch.device, tp: int = 1) -> nn.Module:
    if tp > 1:  # every rank holds one shard of the one replica: no data-parallel wrapper on top
        if strategy == "fsdp":
            raise LmforgeError("train.strategy fsdp cannot be combined with --tp yet: use --strategy ddp (the default)")
        return apply_tensor_parallel(model, tp, device)
    if not is_distributed():
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:  # one all-gather per block keeps peak memory at ~one block
            fully_shard(block)
        fully_shard(model)
        return model
    raise LmforgeError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if enabled or not is_distributed():
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict with the model's own key names (collective under FSDP)."""
    if isinstance(model, PipelineModel):
        return model.full_state()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"state": {param_name: {...}}, "param_groups": [...]} keyed by parameter name, not index."""
    if isinstance(model, PipelineModel):
        return model.full_optimizer_state(optimizer)
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict, optim_state: dict | None
) -> None:
    """Every rank passes the full state; each keeps its own shard."""
    if isinstance(model, PipelineModel):
        return model.load_full_state(optimizer, model_state, optim_state)
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, model_state, options=opts)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ over `params` -> the global norm before clipping. Under tensor parallelism
    sharded (DTensor) and replicated (plain) gradients mix, which torch's fused norm refuses: each
    norm is then taken on its own (a DTensor's over the whole tensor) and the clip applied alike."""
    kinds = {type(p.grad).__name__ == "DTensor" for p in params}
    if len(kinds) < 2:
        return total_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in params]
    norm = torch.linalg.vector_norm(torch.stack([n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]))
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # as clip_grad_norm_: always multiply
    for p in params:
        p.grad.mul_(coef.item())
    return float(norm)


def total_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_ returns a DTensor under FSDP; the global norm is its full value."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
