"""End-to-end runs of `lmforge pretrain` on a tiny model: every objective's loss falls, a resumed run
reproduces the uninterrupted one, a corrupt checkpoint is skipped, bad input gives a clean error."""

from __future__ import annotations

import json
import shutil

import pytest

from lmforge.cli import main as cli
from lmforge.recipes._common import read_metrics

TINY = [
    "--set",
    "model.hidden_size=32",
    "--set",
    "model.intermediate_size=64",
    "--set",
    "model.num_hidden_layers=1",
    "--set",
    "model.num_attention_heads=2",
    "--set",
    "model.num_key_value_heads=1",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    from lmforge.train.stdlib_data import builtin_pretrain_data

    return builtin_pretrain_data(tmp_path_factory.mktemp("cache"), max_bytes=150_000, vocab_size=300, val_fraction=0.2)


def pretrain(out, data_dir, *extra):
    argv = [
        "pretrain",
        "--out",
        str(out),
        "--name",
        "pretrain",
        "--data",
        str(data_dir),
        "--seq-len",
        "32",
        "--batch-size",
        "8",
        "--set",
        "train.eval_batches=2",
        "--set",
        "optim.warmup_steps=3",
        *TINY,
        *extra,
    ]
    assert cli(argv) == 0
    return [r for r in read_metrics(out / "pretrain") if "loss" in r]


@pytest.mark.parametrize("objective,steps", [("clm", 40), ("mlm", 40), ("span", 40)])
def test_loss_falls(tmp_path, data_dir, objective, steps):
    rows = pretrain(
        tmp_path,
        data_dir,
        "--objective",
        objective,
        "--steps",
        str(steps),
        "--set",
        "train.eval_every=0",
        "--set",
        "train.save_every=0",
        "--lr",
        "0.01",
    )
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5, (objective, first, last)
    assert (tmp_path / "pretrain" / "final" / "model.safetensors").is_file()


def test_resume_reproduces_losses_and_skips_corrupt_checkpoint(tmp_path, data_dir):
    common = [
        "--steps",
        "12",
        "--set",
        "train.save_every=4",
        "--set",
        "train.keep_last=3",
        "--set",
        "train.eval_every=6",
        "--set",
        "train.grad_accum=2",
    ]
    full = pretrain(tmp_path / "a", data_dir, *common)
    assert (tmp_path / "a" / "pretrain" / "best" / "model.safetensors").is_file()  # evaluated at 6 and 12
    pretrain(tmp_path / "b", data_dir, *common)
    ckpts = tmp_path / "b" / "pretrain" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000004", "step-00000008", "step-00000012"]
    # "Kill" after step 8: the step-12 checkpoint is damaged (a flipped byte), so resume must use step 8.
    weights = ckpts / "step-00000012" / "model" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    shutil.rmtree(ckpts / "step-00000004")
    resumed = pretrain(tmp_path / "b", data_dir, *common, "--resume")
    by_step = {r["step"]: r["loss"] for r in resumed}
    assert sorted(by_step) == list(range(1, 13))
    for r in full:
        assert abs(by_step[r["step"]] - r["loss"]) < 1e-6, (r["step"], by_step[r["step"]], r["loss"])


def test_partial_checkpoint_is_skipped(tmp_path, data_dir):
    from lmforge.train.state import latest_good

    pretrain(tmp_path, data_dir, "--steps", "4", "--set", "train.save_every=2", "--set", "train.eval_every=0")
    root = tmp_path / "pretrain" / "checkpoints"
    (root / "step-00000004" / "manifest.json").unlink()  # as if killed before the manifest was written
    assert latest_good(root).name == "step-00000002"


def test_bad_override_is_a_clean_error(tmp_path, capsys):
    assert cli(["pretrain", "--out", str(tmp_path), "--set", "train.stepz=3"]) == 2
    assert "unknown field 'stepz'" in capsys.readouterr().err
    assert cli(["pretrain", "--out", str(tmp_path), "--data", str(tmp_path / "nope")]) == 2
    assert not (tmp_path / "pretrain" / "checkpoints").exists()


def test_checkpoint_loads_as_model(tmp_path, data_dir):
    import torch

    from lmforge.checkpoint import load_model

    pretrain(tmp_path, data_dir, "--steps", "2", "--set", "train.eval_every=0", "--set", "train.save_every=2")
    model = load_model(tmp_path / "pretrain" / "checkpoints" / "step-00000002" / "model")
    final = load_model(tmp_path / "pretrain" / "final")
    for (k, a), b in zip(model.state_dict().items(), final.state_dict().values()):
        assert torch.equal(a, b), k
    manifest = json.loads((tmp_path / "pretrain" / "checkpoints" / "step-00000002" / "manifest.json").read_text())
    assert "train_state.safetensors" in manifest["files"]


def test_plot_writes_png(tmp_path, data_dir):
    pretrain(tmp_path, data_dir, "--steps", "3", "--set", "train.eval_every=3", "--set", "train.save_every=0")
    assert cli(["plot", str(tmp_path / "pretrain"), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert cli(["plot", str(tmp_path / "missing")]) == 2


def test_config_overrides_are_checked():
    from lmforge.common import LmforgeError
    from lmforge.recipes._common import apply_overrides

    cfg = {"train": {"steps": 10}, "model": {}}
    assert apply_overrides(cfg, ["train.steps=3", "model.dim=8"], ("model",)) == {
        "train": {"steps": 3},
        "model": {"dim": 8},
    }
    with pytest.raises(LmforgeError, match="expected KEY=VALUE, e.g. builtin.x=1"):
        apply_overrides(cfg, ["train.steps"], example="builtin.x=1")
    with pytest.raises(LmforgeError):
        apply_overrides(cfg, ["train.stpes=3"])  # a typo is an error, not a new key


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
    assert read_metrics(tmp_path / "none", missing_ok=True) == []
