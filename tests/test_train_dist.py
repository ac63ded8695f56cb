"""torchrun with the gloo backend on CPU, 2 processes: DDP gives the loss trajectory of 1 process
with 2x gradient accumulation, FSDP2 gives the same as DDP, and an FSDP checkpoint loads in one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lmforge.recipes._common import read_metrics

ARGS = [
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--steps",
    "4",
    "--set",
    "train.eval_every=0",
    "--set",
    "train.save_every=4",
    "--set",
    "model.hidden_size=32",
    "--set",
    "model.num_hidden_layers=1",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from lmforge.train.stdlib_data import builtin_pretrain_data

    return builtin_pretrain_data(tmp_path_factory.mktemp("cache"), max_bytes=100_000, vocab_size=300)


def run(out, name, data_dir, nproc, *extra):
    if nproc == 1:  # in this process: saves an interpreter start
        from lmforge.cli import main

        assert main(["pretrain", "--out", str(out), "--name", name, "--data", str(data_dir), *ARGS, *extra]) == 0
        return [r["loss"] for r in read_metrics(out / name) if "loss" in r]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_LOG_LEVEL": "WARNING"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = launcher + [
        "-m",
        "lmforge",
        "pretrain",
        "--out",
        str(out),
        "--name",
        name,
        "--data",
        str(data_dir),
        *ARGS,
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r["loss"] for r in read_metrics(out / name) if "loss" in r]


def test_ddp_fsdp_match_single_process(tmp_path, data_dir):
    single = run(tmp_path, "single", data_dir, 1, "--grad-accum", "2")
    ddp = run(tmp_path, "ddp", data_dir, 2, "--strategy", "ddp")
    fsdp = run(tmp_path, "fsdp", data_dir, 2, "--strategy", "fsdp")
    assert len(single) == len(ddp) == len(fsdp) == 4
    for a, b, c in zip(single, ddp, fsdp):
        assert abs(a - b) < 1e-4 and abs(b - c) < 1e-4, (single, ddp, fsdp)

    # The FSDP checkpoint (gathered on rank 0) loads in this single process: weights and optimizer.
    from lmforge.checkpoint import load_model
    from lmforge.train import OptimConfig, build_optimizer
    from lmforge.train.state import load_checkpoint

    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-00000004"
    fsdp_model = load_model(ckpt / "model")
    ddp_model = load_model(tmp_path / "ddp" / "checkpoints" / "step-00000004" / "model")
    for (k, a), b in zip(fsdp_model.state_dict().items(), ddp_model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=k)
    fresh = load_model(tmp_path / "single" / "checkpoints" / "step-00000004" / "model").train()
    opt = build_optimizer(fresh, OptimConfig())
    state = load_checkpoint(ckpt, fresh, opt)
    assert state["step"] == 4
    moments = [s["exp_avg"] for s in opt.state.values()]
    assert len(moments) == len(list(fresh.parameters())) and all(m.abs().sum() > 0 for m in moments)
