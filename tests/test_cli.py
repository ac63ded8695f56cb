"""The command line: help, conversion, generation, and clear errors with exit code 2."""

import subprocess
import sys

import pytest

from lmforge.cli import COMMANDS, main


def run(*args):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_command():
    r = run("--help")
    assert r.returncode == 0
    for name in COMMANDS:
        assert name in r.stdout


def test_unknown_command():
    r = run("frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr


def test_every_command_has_help():
    for name in COMMANDS:
        r = run(name, "--help")
        assert r.returncode == 0, (name, r.stderr[-2000:])


def test_convert_round_trip_and_generate(tmp_path):
    from hf_models import make_hf_model

    make_hf_model("gpt2").save_pretrained(tmp_path / "hf")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "lf")]) == 0
    assert (tmp_path / "lf" / "lmforge_config.json").exists()
    assert main(["convert", "--to-hf", str(tmp_path / "lf"), "--out", str(tmp_path / "hf2")]) == 0
    r = run("generate", "--model", str(tmp_path / "hf2"), "--prompt-ids", "1,2,3", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().split(",")) == 5


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "--model", "/nonexistent/model", "--prompt", "x"], "model path not found: /nonexistent/model"),
        (["convert", "--from-hf", "/nonexistent", "--out", "/tmp/x-lmforge-out"], "model path not found"),
    ],
)
def test_errors_are_clear_and_exit_2(args, message):
    r = run(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_bad_prompt_ids(tmp_path):
    from hf_models import make_hf_model

    make_hf_model("llama").save_pretrained(tmp_path)
    r = run("generate", "--model", str(tmp_path), "--prompt-ids", "1,x")
    assert r.returncode == 2 and "comma-separated integers" in r.stderr
    r = run("generate", "--model", str(tmp_path), "--prompt-ids", "1,100000")
    assert r.returncode == 2 and "outside the vocabulary" in r.stderr
    r = run("generate", "--model", str(tmp_path), "--prompt", "hello")
    assert r.returncode == 2 and "no tokenizer.json" in r.stderr
