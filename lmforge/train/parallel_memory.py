"""Per-rank memory and communication volume of a training step under tensor (TP), pipeline (PP) and
data parallelism (DDP or FSDP), from the model config alone; `lmforge estimate --tp/--pp/--dp`.

Memory per rank (full training: fp32 weights and gradients, AdamW's two fp32 moments):
  TP shards every block Linear and the embedding/head by `tp` (norms, the MoE router and learned
  positions stay whole); PP keeps ceil(L/pp) blocks per stage, the embedding on the first stage and
  the head on the last (the heavier of the two is reported); FSDP divides what is left by `dp`.
  Under TP the embedding's gradient is whole on every rank (DTensor's embedding backward gives it
  replicated; measured in tests/test_parallel_tp.py), so TP gradients exceed the weights by (tp-1)/tp V h.
  Activations: TP shards the attention/MLP intermediates (the residual-stream terms stay whole) and
  gathers full logits (no fused head); PP keeps the micro-batches in flight on the first stage:
  all `m` under GPipe, min(m, pp) under 1F1B.
Communication per rank and step (ring collectives: an all-reduce of S bytes sends 2(n-1)/n x S):
  DDP   all-reduce of the gradients                                 2(dp-1)/dp x 4N
  FSDP  all-gather of the weights twice + reduce-scatter of grads   3(dp-1)/dp x 4N
  TP    per block 2 all-reduces forward and 2 backward of [tokens, h], one for the embedding
        forward and backward, the logits all-gather forward and its gradient backward
  PP    each stage boundary: activations forward, their gradients backward, per micro-batch
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from lmforge.common import LmforgeError, human_bytes
from lmforge.model import ModelConfig

from .memory import activation_bytes, format_table


@dataclass
class ParallelEstimate:
    weights: float  # bytes per rank
    gradients: float
    optimizer: float
    activations: float
    comm: dict[str, float]  # bytes sent per rank per optimizer step, by kind

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def _ring(n: int) -> float:
    return 2 * (n - 1) / n


def per_rank_parameters(c: ModelConfig, tp: int = 1, pp: int = 1) -> int:
    """Parameters held by the most loaded rank (the first or last stage of the pipeline)."""
    h, L = c.hidden_size, c.num_hidden_layers
    embed = c.vocab_size * h
    head = 0 if c.tie_word_embeddings and pp == 1 else c.vocab_size * h  # PP holds a tied head twice
    positions = c.max_position_embeddings * h if c.position == "learned" else 0
    block = (c.num_parameters(include_embeddings=False) - h) / L  # the final norm is not a block's
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    sharded = 2 * h * q + 2 * h * kv + h * c.intermediate_size * (3 if c.gated_mlp else 2) * max(1, c.num_experts)
    per_block = sharded / tp + (block - sharded)  # norms and the router stay whole
    first = math.ceil(L / pp) * per_block + embed / tp + positions + (head / tp + h if pp == 1 else 0)
    last = (L // pp) * per_block + head / tp + h  # the first stages take the blocks that do not divide
    return int(first if pp == 1 else max(first, last))


def parallel_estimate(
    c: ModelConfig,
    micro_batch: int,
    seq_len: int,
    *,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    strategy: str = "ddp",
    micro_batches: int = 1,
    schedule: str = "1f1b",
    act_bytes: float = 4,
) -> ParallelEstimate:
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp), ("micro_batches", micro_batches)):
        if value < 1:
            raise LmforgeError(f"{name} must be >= 1, got {value}")
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
        if getattr(c, name) % tp:
            raise LmforgeError(f"model.{name}={getattr(c, name)} is not divisible by tp={tp}")
    if pp > c.num_hidden_layers:
        raise LmforgeError(f"pp={pp} exceeds model.num_hidden_layers={c.num_hidden_layers}")
    n = per_rank_parameters(c, tp, pp)
    shard = dp if strategy == "fsdp" else 1
    weights, grads, optim = 4 * n / shard, 4 * n / shard, 8 * n / shard
    if tp > 1:  # measured: DTensor's embedding backward returns the vocab-parallel embedding's gradient
        grads += 4 * c.vocab_size * c.hidden_size * (tp - 1) / tp  # whole (Replicate), not its shard
    local = dataclasses.replace(
        c,
        num_attention_heads=c.num_attention_heads // tp,
        num_key_value_heads=c.num_key_value_heads // tp,
        intermediate_size=c.intermediate_size // tp,
        num_hidden_layers=math.ceil(c.num_hidden_layers / pp),
    )
    tokens = micro_batch * seq_len
    acts = activation_bytes(local, micro_batch, seq_len, act_bytes)
    if tp > 1:  # logits gathered whole (and their gradient) instead of the fused chunked head
        acts += 2 * tokens * c.vocab_size * 4
    in_flight = micro_batches if schedule == "gpipe" or pp == 1 else min(micro_batches, pp)
    acts *= in_flight if pp > 1 else 1
    comm: dict[str, float] = {}
    if dp > 1:
        full = 4 * n  # this rank's (TP/PP-local) gradients
        comm[strategy] = (1.5 if strategy == "fsdp" else 1.0) * _ring(dp) * full
    steps_tokens = tokens * micro_batches
    if tp > 1:
        layers = math.ceil(c.num_hidden_layers / pp)
        reduces = 4 * layers + 2  # o/down forward and backward per block; the embedding both ways
        comm["tp"] = _ring(tp) * steps_tokens * c.hidden_size * act_bytes * reduces
        comm["tp"] += (tp - 1) / tp * steps_tokens * c.vocab_size * 4 * 2  # logits gathered, grads back
    if pp > 1:
        comm["pp"] = 2 * steps_tokens * c.hidden_size * act_bytes  # forward activations, backward grads
    return ParallelEstimate(weights, grads, optim, acts, comm)


def parallel_table(c: ModelConfig, micro_batch: int, seq_len: int, layouts: list[dict], **kw) -> str:
    """One row per layout ({"tp":, "pp":, "dp":, "strategy":}): per-rank memory and bytes sent per step."""
    header = ["layout", "weights", "grads", "optimizer", "activations", "total", "sent/step"]
    rows = []
    for lay in layouts:
        e = parallel_estimate(c, micro_batch, seq_len, **lay, **kw)
        name = " x ".join(f"{k}{v}" for k, v in lay.items() if k != "strategy" and v > 1) or "1 process"
        if lay.get("dp", 1) > 1:
            name += f" ({lay.get('strategy', 'ddp')})"
        vals = (e.weights, e.gradients, e.optimizer, e.activations, e.total, sum(e.comm.values()))
        rows.append([name, *(human_bytes(v) for v in vals)])
    return format_table(header, rows)
