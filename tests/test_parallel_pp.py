"""Pipeline parallelism on 2 gloo processes (torchrun): `pretrain --pp 2` with the GPipe and the 1F1B
schedules gives one process's losses (same micro-batches as its gradient accumulation) for 20
steps, with tied embeddings and an uneven split of 3 blocks over 2 stages; checkpoints cross both
ways (a PP checkpoint resumes in one process, a single-process one resumes under PP)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_parallel_tp import tiny_corpus, torchrun

ARGS = ["--seq-len", "32", "--batch-size", "2", "--grad-accum", "2", "--steps", "20"]
ARGS += ["--set", "train.eval_every=0", "--set", "train.save_every=10", "--set", "train.keep_last=0"]
for key, value in dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64).items():
    ARGS += ["--set", f"model.{key}={value}"]


def _worker(runs: str, data: str) -> None:
    """Under torchrun: GPipe from scratch, then 1F1B resuming from the single-process step-10 checkpoint."""
    import lmforge.recipes.pretrain as pretrain
    from lmforge.cli import main

    # One process group for both runs (gloo cannot join a second one in the same processes).
    pretrain.shutdown = lambda: None
    common = ["--runs-dir", runs, "--data", data, *ARGS]
    assert main(["pretrain", "--name", "gpipe", "--pp", "2", "--set", "train.pp_schedule=gpipe", *common]) == 0
    resume = str(Path(runs) / "single" / "checkpoints" / "step-00000010")
    assert main(["pretrain", "--name", "1f1b", "--pp", "2", "--resume", resume, *common]) == 0


def _losses(run: Path) -> dict[int, float]:
    from lmforge.recipes._common import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def test_pp_schedules_match_one_process_and_checkpoints_cross(tmp_path, tmp_path_factory):
    from lmforge.checkpoint import load_model
    from lmforge.cli import main

    data = tiny_corpus(tmp_path_factory)
    common = ["--runs-dir", str(tmp_path), "--data", data, *ARGS]
    assert main(["pretrain", "--name", "single", *common]) == 0
    torchrun(__file__, str(tmp_path), data)
    resume = tmp_path / "gpipe" / "checkpoints" / "step-00000010"
    assert main(["pretrain", "--name", "resumed", "--resume", str(resume), *common]) == 0
    single, gpipe, one_f_one_b, resumed = (_losses(tmp_path / n) for n in ("single", "gpipe", "1f1b", "resumed"))
    assert sorted(single) == sorted(gpipe) == list(range(1, 21))
    assert sorted(one_f_one_b) == sorted(resumed) == list(range(11, 21))
    assert single[20] < single[1] - 0.3  # it learns: equal trajectories, not equal constants
    for step, loss in single.items():
        assert abs(gpipe[step] - loss) <= 1e-5, (step, gpipe, single)
        if step > 10:
            assert abs(one_f_one_b[step] - loss) <= 1e-5 and abs(resumed[step] - loss) <= 1e-5, step
    a, b = load_model(tmp_path / "gpipe" / "final"), load_model(tmp_path / "single" / "final")
    assert a.config.tie_word_embeddings  # the tied head was trained across the first and last stage
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert (x - y).abs().max() <= 1e-5, name


def test_pp_refuses_what_it_cannot_do_exactly():
    from lmforge.common import LmforgeError
    from lmforge.model import ModelConfig
    from lmforge.train.pipeline import check_pipeline, stage_layers

    assert [list(stage_layers(5, s, 2)) for s in range(2)] == [[0, 1, 2], [3, 4]]
    c = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    check_pipeline(c, 2, "1f1b", 2, 4, 2)
    for args, why in [
        ((c, 2, "1f1b", 1, 4, 2), "grad_accum >= 2"),
        ((c, 2, "gpipe", 2, 3, 2), "eval_batches=3"),
        ((c, 2, "gpipe", 1, 4, 1), "WORLD_SIZE=1"),
        ((c, 4, "gpipe", 1, 4, 4), "num_hidden_layers=2 < 4"),
        ((ModelConfig(**{**c.__dict__, "num_experts": 4}), 2, "gpipe", 1, 4, 2), "MoE"),
    ]:
        with pytest.raises(LmforgeError, match=why):
            check_pipeline(*args)


if __name__ == "__main__":  # the torchrun worker
    import torch.distributed as dist

    _worker(*sys.argv[1:3])
    if dist.is_initialized():
        dist.destroy_process_group()
