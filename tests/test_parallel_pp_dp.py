"""PP x DP (2D) training: 4 gloo processes (torchrun), 2 pipelines of 2 stages, give the losses of one
process accumulating both pipelines' micro-batches for 20 steps (<= 1e-5), with a tied head and an
uneven split; the final weights match. Four processes on a 2-core machine are slow: the test is
marked so, and the 2-process pipeline test (test_parallel_pp.py) stays in the normal suite."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_parallel_pp import ARGS
from test_parallel_tp import tiny_corpus, torchrun

PP, DP, ACCUM = 2, 2, 2  # one process takes DP x ACCUM micro-batches per step


def _worker(runs: str, data: str) -> None:
    from lmforge.cli import main

    argv = ["pretrain", "--name", "pp-dp", "--pp", str(PP), "--runs-dir", runs, "--data", data, *ARGS]
    assert main(argv) == 0


def _losses(run: Path) -> dict[int, float]:
    from lmforge.recipes._common import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def test_mesh_ranks_lay_pipelines_out_as_data_loading_reads_them():
    from lmforge.common import DistInfo
    from lmforge.parallel import data_parallel_info
    from lmforge.train.pipeline import mesh_ranks

    pipelines, replicas = mesh_ranks(8, 4)
    assert pipelines == [[0, 1, 2, 3], [4, 5, 6, 7]] and replicas == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # the ranks of one pipeline read the same batches; the pipelines read different ones
    reads = {r: data_parallel_info(DistInfo(rank=r, world_size=8, local_rank=r), 4).rank for r in range(8)}
    assert all(len({reads[r] for r in p}) == 1 for p in pipelines) and reads[0] != reads[4]
    assert mesh_ranks(2, 2) == ([[0, 1]], [[0], [1]])


@pytest.mark.slow  # 4 processes on 2 cores: ~2-3 minutes
def test_pp_times_dp_matches_one_process(tmp_path, tmp_path_factory):
    from lmforge.checkpoint import load_model
    from lmforge.cli import main

    data = tiny_corpus(tmp_path_factory)
    single = ["--runs-dir", str(tmp_path), "--data", data, *ARGS]
    single[single.index("--grad-accum") + 1] = str(DP * ACCUM)
    assert main(["pretrain", "--name", "single", *single]) == 0
    torchrun(__file__, str(tmp_path), data, nproc=PP * DP, timeout=600)
    one, two_d = _losses(tmp_path / "single"), _losses(tmp_path / "pp-dp")
    assert sorted(one) == sorted(two_d) == list(range(1, 21))
    assert one[20] < one[1] - 0.3  # it learns
    for step, loss in one.items():
        assert abs(two_d[step] - loss) <= 1e-5, (step, two_d, one)
    a, b = load_model(tmp_path / "pp-dp" / "final"), load_model(tmp_path / "single" / "final")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert (x - y).abs().max() <= 1e-5, name


if __name__ == "__main__":  # the torchrun worker
    import torch.distributed as dist

    _worker(*sys.argv[1:3])
    if dist.is_initialized():
        dist.destroy_process_group()
