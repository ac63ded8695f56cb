"""Issue 17 (CLI part): no silent deletes by --out, every bad config value a clear error (exit 2,
the dotted field named, no traceback), unexpected errors as one line (exit 1), resume that
survives a torn metrics line and stale temp folders and checks --resume PATH, and a generation
bounded by the model's context."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import check_output_dir, is_lmforge_output, save_model
from lmforge.cli import COMMANDS, main
from lmforge.common import LmforgeError, build_config
from lmforge.model import ModelConfig, Transformer
from lmforge.train import OptimConfig, TrainConfig


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "ckpt"
    save_model(Transformer(ModelConfig.preset("tiny", max_position_embeddings=64)), path)
    return path


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


# ----------------------------------------------------------------------------- --out never deletes


def test_out_refuses_an_unrelated_folder_and_keeps_it(ckpt, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    for argv in (["quantize", "--model", ckpt, "--out", precious], ["convert", "--to-hf", ckpt, "--out", precious]):
        code, err = cli(capsys, *argv)
        assert code == 2 and "lmforge did not write" in err and "--overwrite" in err
        assert (precious / "thesis.txt").read_text() == "years of work"
    code, _ = cli(capsys, "quantize", "--model", ckpt, "--out", precious, "--overwrite")
    assert code == 0 and not (precious / "thesis.txt").exists() and is_lmforge_output(precious)


def test_out_never_writes_over_its_input(ckpt, tmp_path, capsys):
    copy = tmp_path / "copy"
    save_model(Transformer(ModelConfig.preset("tiny")), copy)
    before = sorted(p.name for p in copy.iterdir())
    for out in (f"{copy}/", f"{copy}/.", str(copy.parent)):  # trailing slash, dot, the folder holding it
        code, err = cli(capsys, "convert", "--to-hf", f"{copy}/", "--out", out, "--overwrite")
        assert code == 2 and "input" in err, err
    assert sorted(p.name for p in copy.iterdir()) == before


def test_out_refuses_a_run_folder_holding_checkpoints(ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000001").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    save_model(Transformer(ModelConfig.preset("tiny")), run / "final")
    code, err = cli(capsys, "quantize", "--model", run / "final", "--out", run, "--overwrite")
    assert code == 2 and "holds the input" in err
    code, err = cli(capsys, "quantize", "--model", ckpt, "--out", run)
    assert code == 2 and (run / "checkpoints" / "step-00000001").is_dir()


def test_out_replaces_lmforges_own_output(ckpt, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli(capsys, "quantize", "--model", ckpt, "--out", out)[0] == 0
    assert cli(capsys, "quantize", "--model", ckpt, "--out", out)[0] == 0  # a rerun replaces it
    (out / "notes.txt").write_text("mine")  # a user file inside: no longer lmforge's alone
    assert cli(capsys, "quantize", "--model", ckpt, "--out", out)[0] == 2
    assert (out / "notes.txt").exists()


def test_check_output_dir_cases(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(LmforgeError, match="not a folder"):
        check_output_dir(tmp_path / "a.txt")
    with pytest.raises(LmforgeError, match="working directory"):
        check_output_dir(".", overwrite=True)
    (tmp_path / "src").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "src")
    with pytest.raises(LmforgeError, match="is the input"):
        check_output_dir(tmp_path / "link", [tmp_path / "src"], overwrite=True)
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty") == tmp_path / "empty"
    assert check_output_dir(tmp_path / "new", ["not-a-path-name"]) == tmp_path / "new"


# ----------------------------------------------------------------------------- config values


def test_number_strings_are_numbers_and_bad_values_name_the_field():
    assert build_config(OptimConfig, {"lr": "3e-4"}, "optim").lr == 3e-4  # YAML 1.1 reads 3e-4 as a string
    assert build_config(TrainConfig, {"steps": "1e3"}, "train").steps == 1000
    cases = [
        (TrainConfig, "train", {"micro_batch_size": 0}, "train.micro_batch_size=0: must be >= 1"),
        (TrainConfig, "train", {"grad_accum": 0}, "train.grad_accum=0"),
        (TrainConfig, "train", {"steps": 2.5}, "expected an integer"),
        (TrainConfig, "train", {"compile": "maybe"}, "train.compile='maybe': expected true or false"),
        (TrainConfig, "train", {"objective": "xyz"}, "choose one of clm, mlm, span"),
        (OptimConfig, "optim", {"lr": float("nan")}, "optim.lr=nan: must be a finite number"),
        (OptimConfig, "optim", {"betas": 5}, "optim.betas=5"),
        (OptimConfig, "optim", {"betas": [2, 3]}, "must be < 1"),
        (OptimConfig, "optim", {"schedule": "foo"}, "optim.schedule='foo'"),
        (OptimConfig, "optim", {"nope": 1}, "unknown field(s) nope"),
    ]
    for cls, where, data, message in cases:
        with pytest.raises(LmforgeError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            build_config(cls, data, where)
    with pytest.raises(LmforgeError, match="model.num_attention_heads=0"):
        ModelConfig.preset("tiny", num_attention_heads=0)  # was a ZeroDivisionError


@pytest.mark.parametrize(
    "argv,field",
    [
        (["pretrain", "--batch-size", "0"], "train.micro_batch_size=0"),
        (["pretrain", "--grad-accum", "0"], "train.grad_accum=0"),
        (["pretrain", "--steps", "abc"], "train.steps='abc'"),
        (["pretrain", "--lr", "abc"], "optim.lr='abc'"),
        (["sft", "--batch-size", "0"], "train.micro_batch_size=0"),
        (["sft", "--set", "peft.method=nope"], "peft.method='nope'"),
        (["align", "--lr", "abc"], "train.lr='abc'"),
        (["align", "--set", "train.batch_size=0"], "train.batch_size=0"),
        (["align", "--method", "nope"], "method='nope'"),
        (["data", "prepare", "--set", "pack.val_fraction=abc"], "pack.val_fraction='abc'"),
        (["data", "prepare", "--set", "tokenize.vocab_size=-1"], "tokenize.vocab_size=-1"),
    ],
)
def test_bad_config_values_exit_2_before_any_work(argv, field, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, *argv)
    assert code == 2 and field in err, err
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_align_reads_lr_3e_4_as_a_number():
    from lmforge.config import load_config
    from lmforge.train.align_config import AlignConfig

    cfg = load_config(AlignConfig, "align-default", ["train.lr=3e-4"])
    assert cfg.train.lr == 3e-4 and cfg.rl.group_size == 8


def test_bad_flag_is_a_status_not_a_system_exit(ckpt, capsys):
    code, err = cli(capsys, "generate", "--model", ckpt, "--prompt-ids", "1", "--top-p", "5")
    assert code == 2 and "--top-p" in err and "must be <= 1" in err


# ----------------------------------------------------------------------------- unexpected errors


def test_unexpected_exception_is_one_line_exit_1(monkeypatch, capsys):
    boom = types.ModuleType("lmforge_test_boom")
    boom.add_arguments = lambda parser: None

    def fail(args):
        raise RuntimeError("kaboom\nsecond line")

    boom.main = fail
    monkeypatch.setitem(sys.modules, "lmforge_test_boom", boom)
    monkeypatch.setitem(COMMANDS, "boom", ("lmforge_test_boom", "test"))
    code, err = cli(capsys, "boom")
    assert code == 1 and "RuntimeError: kaboom" in err and "second line" not in err and "LMFORGE_DEBUG" in err
    monkeypatch.setenv("LMFORGE_DEBUG", "1")
    assert main(["boom"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.delenv("LMFORGE_DEBUG")
    assert main(["--debug", "boom"]) == 1 and "Traceback" in capsys.readouterr().err


# ----------------------------------------------------------------------------- generation length


def test_max_new_tokens_is_bounded_by_the_context(ckpt, capsys):
    code, err = cli(capsys, "generate", "--model", ckpt, "--prompt-ids", "1,2", "--max-new-tokens", "1000000000")
    assert code == 2 and "context of 64 positions" in err
    code, err = cli(capsys, "generate", "--model", ckpt, "--prompt-ids", "1,2,3,4", "--max-new-tokens", "61")
    assert code == 2 and "prompt (4 tokens)" in err and "--max-new-tokens 60 or less" in err
    code, _ = cli(capsys, "generate", "--model", ckpt, "--prompt-ids", "1,2,3,4", "--max-new-tokens", "60")
    assert code == 0


# ----------------------------------------------------------------------------- resume


def test_resume_survives_torn_metrics_and_stale_tmp_and_checks_resume_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = [
        "pretrain",
        "--set",
        "data.max_bytes=100000",
        "--set",
        "data.vocab_size=300",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.save_every=1",
        "--lr",
        "3e-4",
        "--name",
        "r",
    ]
    assert cli(capsys, *base, "--steps", "2")[0] == 0
    run = tmp_path / "runs" / "r"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.')  # a crash mid-write
    stale = run / "checkpoints" / ".step-00000009.x1y2.tmp"
    stale.mkdir()
    assert cli(capsys, *base, "--steps", "3", "--resume")[0] == 0
    assert not stale.exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    weights = last / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit the safetensors header does not notice
    weights.write_bytes(bytes(data))
    code, err = cli(capsys, *base, "--steps", "4", "--resume", last)
    assert code == 2 and "sha256" in err
