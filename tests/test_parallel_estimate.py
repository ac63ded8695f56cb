"""`lmforge estimate --tp/--pp/--dp`: per-rank parameters equal what the sharded/staged modules
really hold (TP: tests/test_parallel_tp.py checks the sharded model), memory and bytes sent per
step follow the ring-collective arithmetic, and impossible layouts are refused."""

from __future__ import annotations

import pytest

from lmforge.common import LmforgeError
from lmforge.model import ModelConfig, Transformer
from lmforge.train.parallel_memory import parallel_estimate, per_rank_parameters
from lmforge.train.pipeline import StageModel

C = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_stage_parameters_match_the_estimate(tied):
    c = ModelConfig(**{**C.__dict__, "tie_word_embeddings": tied})
    model = Transformer(c)
    held = [sum(p.numel() for p in StageModel(model, s, 2).parameters()) for s in range(2)]
    assert per_rank_parameters(c, pp=2) == max(held)
    assert per_rank_parameters(c) == sum(p.numel() for p in model.parameters()) == c.num_parameters()


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
