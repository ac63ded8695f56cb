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
    # One fresh interpreter for all commands (each imports its recipe from scratch there): a process
    # per command cost ~4 s of interpreter and torch start-up each.
    script = (
        "import sys\n"
        "from lmforge.cli import COMMANDS, main\n"
        "for name in COMMANDS:\n"
        "    try:\n"
        "        code = main([name, '--help'])\n"
        "    except SystemExit as e:\n"
        "        code = e.code\n"
        "    if code not in (0, None):\n"
        "        sys.exit(f'{name} --help exited {code}')\n"
        "    print('HELP-OK', name, file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(line.split()[1] for line in r.stderr.splitlines() if line.startswith("HELP-OK")) == sorted(COMMANDS)


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


def test_bad_prompt_ids(tmp_path, capsys):
    from hf_models import make_hf_model

    make_hf_model("llama").save_pretrained(tmp_path)
    for argv, message in (
        (["--prompt-ids", "1,x"], "comma-separated integers"),
        (["--prompt-ids", "1,100000"], "outside the vocabulary"),
        (["--prompt", "hello"], "no tokenizer.json"),
    ):
        assert main(["generate", "--model", str(tmp_path), *argv]) == 2
        assert message in capsys.readouterr().err
