"""`lmforge estimate --tp/--pp/--dp`: per-rank parameters equal what the sharded/staged modules
really hold (TP: tests/test_parallel_tp.py checks the sharded model), memory and bytes sent per
step follow the ring-collective arithmetic, and impossible layouts are refused. The per-rank
memory is checked against a measured training step (`measure_step`): the bytes of the weights,
gradients and AdamW states a rank really holds, and the bytes autograd saves for the backward
(every saved tensor's storage once, parameters excluded), for one process and a pipeline stage
here, for a TP rank in test_parallel_tp.py's torchrun worker."""

from __future__ import annotations

import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.model import ModelConfig, Transformer
from lmforge.train.parallel_memory import parallel_estimate, per_rank_parameters
from lmforge.train.pipeline import StageModel

C = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
ACT_TOLERANCE = 0.15  # the activation estimate counts the main tensors per block, not every small one


def _local(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding `t`'s data on this rank (a DTensor's shard; a pending collective's
    result is a wrapper around it)."""
    t = t._local_tensor if hasattr(t, "_local_tensor") else t
    while hasattr(t, "elem") and isinstance(t.elem, torch.Tensor):  # AsyncCollectiveTensor
        t = t.elem
    return t


def measure_step(model: torch.nn.Module, forward) -> dict[str, int]:
    """One AdamW training step of `model` (`forward()` -> the loss): the bytes this rank holds in
    weights, gradients and optimizer states (local shards), and the activations autograd saved."""
    params = list(model.parameters())
    skip = {_local(p).untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = _local(t).untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    optimizer.step()
    size = lambda t: _local(t).numel() * _local(t).element_size()  # noqa: E731
    unique = {id(p): p for p in params}.values()  # a tied weight once
    return {
        "weights": sum(size(p) for p in unique),
        "gradients": sum(size(p.grad) for p in unique if p.grad is not None),
        "optimizer": sum(size(t) for st in optimizer.state.values() for t in st.values() if t.dim() > 0),
        "activations": sum(saved.values()),
    }


def check_against_estimate(measured: dict, estimate) -> None:
    assert measured["weights"] == estimate.weights, (measured, estimate)
    assert measured["gradients"] == estimate.gradients and measured["optimizer"] == estimate.optimizer
    assert abs(measured["activations"] / estimate.activations - 1) <= ACT_TOLERANCE, (measured, estimate)


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_stage_parameters_match_the_estimate(tied):
    c = ModelConfig(**{**C.__dict__, "tie_word_embeddings": tied})
    model = Transformer(c)
    held = [sum(p.numel() for p in StageModel(model, s, 2).parameters()) for s in range(2)]
    assert per_rank_parameters(c, pp=2) == max(held)
    assert per_rank_parameters(c) == sum(p.numel() for p in model.parameters()) == c.num_parameters()


def _clm_loss(model, ids: torch.Tensor):
    from lmforge.train.objectives import lm_loss_sum

    return lambda: lm_loss_sum(model(ids), ids)[0] / ids.numel()


def test_one_process_memory_equals_a_measured_step():
    torch.manual_seed(0)
    ids = torch.randint(0, C.vocab_size, (4, 64))
    model = Transformer(C)
    check_against_estimate(measure_step(model, _clm_loss(model, ids)), parallel_estimate(C, 4, 64))


def test_pipeline_stage_memory_equals_a_measured_step():
    """Stages of 2 (3 blocks: 2 + 1): the estimate is the heavier stage's weights and states, and the
    first stage's activations (it holds the most micro-batches in flight), here one micro-batch."""
    from lmforge.train.objectives import lm_loss_sum

    torch.manual_seed(0)
    ids = torch.randint(0, C.vocab_size, (4, 64))
    model = Transformer(C)
    first, last = StageModel(model, 0, 2), StageModel(model, 1, 2)
    hidden = first(ids).detach()
    stages = [
        measure_step(first, lambda: first(ids).sum()),  # a sum saves nothing of its own
        measure_step(last, lambda: lm_loss_sum(last(hidden), ids)[0] / ids.numel()),
    ]
    e = parallel_estimate(C, 4, 64, pp=2, micro_batches=1)
    heavier = max(stages, key=lambda m: m["weights"])
    assert heavier["weights"] == e.weights and heavier["optimizer"] == e.optimizer
    assert abs(stages[0]["activations"] / e.activations - 1) <= ACT_TOLERANCE, (stages, e)


def test_memory_and_bytes_sent_per_step():
    one = parallel_estimate(C, 2, 16)
    assert one.comm == {} and one.weights == 4 * C.num_parameters() and one.optimizer == 2 * one.weights
    n = per_rank_parameters(C)
    ddp, fsdp = parallel_estimate(C, 2, 16, dp=4), parallel_estimate(C, 2, 16, dp=4, strategy="fsdp")
    assert ddp.comm["ddp"] == 2 * 3 / 4 * 4 * n and fsdp.comm["fsdp"] == 3 * 3 / 4 * 4 * n
    assert fsdp.weights == ddp.weights / 4 and fsdp.activations == ddp.activations
    tp = parallel_estimate(C, 2, 16, tp=2)
    tokens, h, v = 2 * 16, C.hidden_size, C.vocab_size
    assert tp.comm["tp"] == tokens * h * 4 * (4 * 3 + 2) + tokens * v * 4  # ring(2) = 1; logits half each way
    assert tp.weights < 0.6 * one.weights
    gpipe = parallel_estimate(C, 2, 16, pp=3, micro_batches=6, schedule="gpipe")
    f1b = parallel_estimate(C, 2, 16, pp=3, micro_batches=6, schedule="1f1b")
    assert gpipe.activations == 2 * f1b.activations  # 6 micro-batches in flight vs 3
    assert f1b.comm["pp"] == 2 * 6 * tokens * h * 4


def test_impossible_layouts_are_refused(capsys):
    from lmforge.cli import main

    with pytest.raises(LmforgeError, match="num_attention_heads=4 is not divisible by tp=3"):
        parallel_estimate(C, 1, 8, tp=3)
    with pytest.raises(LmforgeError, match="pp=4 exceeds"):
        parallel_estimate(C, 1, 8, pp=4)
    assert main(["estimate", "--model", "tiny", "--tp", "2", "--pp", "2", "--micro-batches", "4"]) == 0
    out = capsys.readouterr().out
    assert "tp2 x pp2" in out and "sent/step" in out
