"""Two "nodes" on localhost: two torchrun agents (`--nnodes 2 --rdzv-backend c10d`, one process each)
meet at a c10d rendezvous and train with DDP; the run then resumes from its checkpoint on one node,
one process with 2x gradient accumulation, and continues the same trajectory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from parallel_guard import start_guarded, stop_guarded
from test_parallel_tp import tiny_corpus

ARGS = ["--seq-len", "32", "--batch-size", "4", "--steps", "6", "--set", "train.eval_every=0"]
ARGS += ["--set", "train.save_every=3", "--set", "train.keep_last=0"]
ARGS += ["--set", "model.hidden_size=32", "--set", "model.num_hidden_layers=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path) -> dict[int, float]:
    from lmforge.recipes._common import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


@pytest.mark.slow
def test_two_nodes_train_with_ddp_and_resume_on_one(tmp_path, tmp_path_factory):
    from lmforge.cli import main

    data = tiny_corpus(tmp_path_factory)
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_LOG_LEVEL": "WARNING", "PYTHONPATH": root}
    rdzv = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "lmforge-test"]
    rdzv += ["--rdzv-endpoint", f"127.0.0.1:{_free_port()}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, "-m", "lmforge", "pretrain"]
    cmd += ["--runs-dir", str(tmp_path), "--name", "two-nodes", "--data", data, *ARGS]
    nodes = [start_guarded(cmd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    try:  # each agent and its worker die with the test (a timeout, a failure, pytest killed)
        for node in nodes:
            _, err = node.communicate(timeout=300)
            assert node.returncode == 0, err[-3000:]
    finally:
        for node in nodes:
            stop_guarded(node)
    two = _losses(tmp_path / "two-nodes")
    assert sorted(two) == list(range(1, 7))
    resume = tmp_path / "two-nodes" / "checkpoints" / "step-00000003"
    one = ["--runs-dir", str(tmp_path), "--name", "one-node", "--data", data, *ARGS, "--grad-accum", "2"]
    assert main(["pretrain", *one, "--resume", str(resume)]) == 0
    resumed = _losses(tmp_path / "one-node")
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert abs(resumed[step] - two[step]) < 1e-4, (step, resumed, two)
