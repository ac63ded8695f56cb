"""Memory a model needs, from its config alone (no run): weights, gradients, optimizer states,
activations and KV cache, for inference, full fine-tuning, LoRA and QLoRA. `auto_fit` uses it to
choose the micro-batch before a run.

Activations are counted from what autograd keeps for backward in lmforge's own blocks (per token,
per layer, fp32 unless autocast):
  RMSNorm x2: its input and normalised output (2h each)          -> 4h
  attention: q, k, v, output and its [B,T,H*hd] copy (SDPA's
  flash path never stores the T x T matrix)                         -> 2q + 2kv + h
  MLP: SwiGLU keeps gate, act(gate), up and their product           -> 4I  (plain MLP: 2I)
and at the head, with the fused head + cross-entropy of `losses.py`: one fp32 [chunk, V] logits
buffer (at most 128 MiB), the hidden-state gradient and two head-weight-sized gradient buffers. Activation checkpointing
keeps only each block's input (h) plus one block's worth during its recomputation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from lmforge.common import LmforgeError, get_logger, human_bytes
from lmforge.model import ModelConfig

log = get_logger("lmforge.train")
MODES = ("inference", "full", "lora", "qlora")
NF4_BYTES = 0.5 + 4 / 64  # 4-bit codes + one fp32 absmax per block of 64


@dataclass
class MemoryEstimate:
    mode: str
    weights: float
    gradients: float
    optimizer: float
    activations: float
    kv_cache: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.kv_cache

    def row(self) -> list[str]:
        return [self.mode] + [
            human_bytes(v)
            for v in (self.weights, self.gradients, self.optimizer, self.activations, self.kv_cache, self.total)
        ]


def _linear_params(c: ModelConfig) -> int:
    """Parameters inside the blocks' Linear layers (what LoRA targets and NF4 quantises)."""
    return c.num_parameters(include_embeddings=False) - c.hidden_size * (2 * c.num_hidden_layers + 1)


def lora_params(c: ModelConfig, r: int = 8, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> int:
    h, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, c.intermediate_size),
        "up_proj": (h, c.intermediate_size),
        "down_proj": (c.intermediate_size, h),
    }
    return c.num_hidden_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)


def activation_bytes(
    c: ModelConfig, batch: int, seq_len: int, bytes_per: float = 4, checkpointing: bool = False
) -> float:
    h, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    mlp = (4 if c.gated_mlp else 2) * c.intermediate_size * (c.num_experts_per_tok if c.num_experts else 1)
    per_layer = 4 * h + 2 * q + 2 * kv + h + mlp
    tokens = batch * seq_len
    layers = (c.num_hidden_layers * h + per_layer) if checkpointing else c.num_hidden_layers * per_layer
    from .losses import CHUNK_BYTES

    chunk = min(tokens, max(64, CHUNK_BYTES // (4 * c.vocab_size)))
    head = chunk * c.vocab_size * 4 + 2 * c.vocab_size * h * 4 + tokens * h * 4
    return tokens * (layers * bytes_per + 2 * h * bytes_per) + head


def estimate(
    c: ModelConfig,
    mode: str = "full",
    batch: int = 1,
    seq_len: int = 512,
    param_bytes: float = 4,
    act_bytes: float = 4,
    lora_r: int = 8,
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj"),
    checkpointing: bool = False,
) -> MemoryEstimate:
    """param_bytes: 4 fp32, 2 bf16 (weights of a frozen base / inference); act_bytes likewise for activations."""
    if mode not in MODES:
        raise LmforgeError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    n = c.num_parameters()
    kv = 2 * c.num_hidden_layers * batch * seq_len * c.num_key_value_heads * c.head_dim * param_bytes
    if mode == "inference":
        # Prefill keeps one layer's activations and the last position's logits at a time.
        work = batch * seq_len * (4 * c.hidden_size + c.intermediate_size * 2) * param_bytes
        return MemoryEstimate(mode, n * param_bytes, 0, 0, work, kv)
    acts = activation_bytes(c, batch, seq_len, act_bytes, checkpointing)
    if mode == "full":
        return MemoryEstimate(mode, n * 4, n * 4, n * 8, acts, 0)  # fp32 master weights, AdamW m and v
    adapters = lora_params(c, lora_r, lora_targets)
    if mode == "lora":
        base = n * param_bytes
    else:  # qlora: block linears in NF4, embeddings/norms/head in param_bytes
        linear = _linear_params(c)
        base = linear * NF4_BYTES + (n - linear) * param_bytes
    return MemoryEstimate(mode, base + adapters * 4, adapters * 4, adapters * 8, acts, 0)


def estimate_table(c: ModelConfig, batch: int, seq_len: int, **kw) -> str:
    rows = [estimate(c, m, batch, seq_len, **kw).row() for m in MODES]
    return format_table(["mode", "weights", "gradients", "optimizer", "activations", "kv cache", "total"], rows)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def available_memory(device) -> float:
    """Bytes free for this process on the device (CUDA: free device memory; CPU: available RAM)."""
    import torch

    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        import os

        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def auto_fit(
    c: ModelConfig,
    cfg,
    device,
    world_size: int = 1,
    mode: str = "full",
    budget: float | None = None,
    headroom: float = 0.85,
):
    """The largest power-of-two micro-batch whose estimate fits `headroom` x the free memory, with
    gradient accumulation raised to keep micro_batch x grad_accum (x ranks) unchanged; activation
    checkpointing is switched on when even a micro-batch of 1 does not fit without it."""
    budget = headroom * (available_memory(device) if budget is None else budget)
    act_bytes = 2 if device.type == "cuda" else 4
    wanted = cfg.micro_batch_size * cfg.grad_accum
    for checkpointing in (bool(cfg.activation_checkpointing), True):
        micro = 1 << int(math.log2(wanted))
        while micro >= 1:
            need = estimate(c, mode, micro, cfg.seq_len, act_bytes=act_bytes, checkpointing=checkpointing).total
            if need <= budget and wanted % micro == 0:
                out = dataclasses.replace(
                    cfg, micro_batch_size=micro, grad_accum=wanted // micro, activation_checkpointing=checkpointing
                )
                log.info(
                    "auto-fit: micro-batch %d x accumulation %d%s (estimate %s of %s budget)",
                    micro,
                    out.grad_accum,
                    ", activation checkpointing" if checkpointing else "",
                    human_bytes(need),
                    human_bytes(budget),
                )
                return out
            micro //= 2
    raise LmforgeError(
        f"auto-fit: even a micro-batch of 1 with activation checkpointing needs "
        f"{human_bytes(estimate(c, mode, 1, cfg.seq_len, checkpointing=True).total)}, more than the "
        f"{human_bytes(budget)} available; use a smaller model, seq_len or QLoRA"
    )
