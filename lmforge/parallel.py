"""L3: tensor parallelism (Megatron-style) through DTensor's `parallelize_module`.

Per Transformer block, with `tp` ranks in one process group (torchrun, gloo on CPU, nccl on CUDA):

    q/k/v, gate/up   ColwiseParallel  - each rank holds num_heads/tp query heads, num_kv_heads/tp
                                        key/value heads (GQA), intermediate_size/tp MLP columns
    o, down          RowwiseParallel  - partial sums, one all-reduce per projection
    embed_tokens     RowwiseParallel  - vocabulary-parallel: each rank embeds its vocab slice, all-reduce
    lm_head          ColwiseParallel  - vocabulary-parallel, the logits all-gathered (every rank samples
                                        the same token from the same logits)
    MoE experts      each expert's gate/up column-, down row-parallel; the router stays replicated, so
                     every rank routes every token identically and runs the same experts

Norms, the router and positional tables are replicated. Attention reads its head counts from the
module (`Attention.num_heads`), so sharding sets them to the local counts; the KV cache reads
`model.tp_local_config`. A sharded model's state dict gathers to full tensors
(`train.distributed.full_model_state`), so a TP checkpoint loads in one process and vice versa.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from lmforge.common import DistInfo, LmforgeError, dist_info


def init_process_group(device: torch.device) -> DistInfo:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA); a no-op for one process."""
    info = dist_info()
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
        minutes = int(os.environ.get("LMFORGE_DIST_TIMEOUT_MIN", 30))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=minutes))
    return info


def check_tp(config, tp: int, world_size: int) -> None:
    """Refuse a degree the model's shapes or the launch cannot honour, naming the field."""
    if tp < 1:
        raise LmforgeError(f"--tp must be >= 1, got {tp}")
    if tp == 1:
        return
    if world_size != tp:
        # Pure tensor parallelism: every rank of the run is one shard of the one model replica.
        raise LmforgeError(
            f"--tp {tp} needs exactly {tp} processes (torchrun --nproc_per_node {tp}); this run has "
            f"WORLD_SIZE={world_size} (combining TP with data parallelism is not supported yet)"
        )
    sizes = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "intermediate_size": config.intermediate_size,
    }
    for name, value in sizes.items():
        if value % tp:
            raise LmforgeError(f"model.{name}={value} is not divisible by --tp {tp}")


def tp_plan(model: nn.Module) -> dict:
    """{module path: ParallelStyle} for a lmforge Transformer (HF Llama parameter names)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    col, row = ColwiseParallel(), RowwiseParallel()
    plan = {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    }
    for i, block in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        plan.update({f"{p}.self_attn.{n}": col for n in ("q_proj", "k_proj", "v_proj")})
        plan[f"{p}.self_attn.o_proj"] = row
        mlps = (
            [(f"{p}.mlp.experts.{e}", m) for e, m in enumerate(block.mlp.experts)]
            if hasattr(block.mlp, "experts")
            else [(f"{p}.mlp", block.mlp)]
        )
        for prefix, mlp in mlps:
            if mlp.gate_proj is not None:
                plan[f"{prefix}.gate_proj"] = col
            plan[f"{prefix}.up_proj"] = col
            plan[f"{prefix}.down_proj"] = row
    return plan


def apply_tensor_parallel(model: nn.Module, tp: int, device: torch.device) -> nn.Module:
    """Shard `model` (a lmforge Transformer, already on `device`) across the `tp` ranks in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    config = model.config
    check_tp(config, tp, dist_info().world_size)
    if tp == 1:
        return model
    plan = tp_plan(model)
    for path in plan:
        module = model.get_submodule(path)
        if type(module) not in (nn.Linear, nn.Embedding):  # LoRA-wrapped, quantized, ...: no plan for it
            raise LmforgeError(f"--tp: {path} is a {type(module).__name__}, not a plain Linear/Embedding")
    for block in model.model.layers:
        if block.self_attn.kv_prefix is not None:
            raise LmforgeError("--tp does not support prefix tuning (its key/value prefix is not sharded)")
    init_process_group(device)
    mesh = init_device_mesh(device.type, (tp,), mesh_dim_names=("tp",))
    parallelize_module(model, mesh, plan)
    for block in model.model.layers:  # the attention reshape reads these: the local head counts
        block.self_attn.num_heads //= tp
        block.self_attn.num_kv_heads //= tp
    if config.tie_word_embeddings:  # both are sharded Shard(0) over the vocabulary: one parameter again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.tp_local_config = dataclasses.replace(
        config,
        num_attention_heads=config.num_attention_heads // tp,
        num_key_value_heads=config.num_key_value_heads // tp,
    )
    model.tp_mesh = mesh
    return model


def tp_degree(model: nn.Module) -> int:
    mesh = getattr(model, "tp_mesh", None)
    return 1 if mesh is None else mesh.size()


def data_parallel_info(info: DistInfo, tp: int) -> DistInfo:
    """The rank and world size data loading should use: the ranks of one tensor-parallel group read
    the same batches (they hold shards of one replica), so data is split over world_size // tp."""
    return DistInfo(rank=info.rank // tp, world_size=max(1, info.world_size // tp), local_rank=info.local_rank)


def shared_seed(seed: int | None) -> int | None:
    """Under tensor parallelism every rank samples from the same gathered logits, so they must also
    draw the same random numbers: an unseeded run takes rank 0's fresh seed on every rank."""
    if seed is not None or not (dist.is_available() and dist.is_initialized()):
        return seed
    box = [int(torch.randint(0, 2**31 - 1, ()).item())]
    dist.broadcast_object_list(box, src=0)
    return box[0]
