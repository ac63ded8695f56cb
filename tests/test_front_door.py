"""The front door: `lmforge serve MODEL` (what the pipeline prints) and `--model MODEL` both name the model."""

import argparse
import os

import pytest

from lmforge.common import LmforgeError
from lmforge.recipes import serve as serve_recipe


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lmforge serve")
    serve_recipe.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize(
    "argv",
    [
        ("runs/x/final",),
        ("--model", "runs/x/final"),
        ("runs/x/final", "--port", "8001"),
        ("--port", "8001", "runs/x/final"),
        ("runs/x/final", "--model", "runs/x/final"),
        ("runs/x/final", "--model", "runs/x/./final/"),
    ],
)
def test_model_positional_or_flag(argv):
    assert os.path.realpath(serve_recipe.model_folder(parse(*argv))) == os.path.realpath("runs/x/final")


def test_positional_with_other_options_keeps_them():
    args = parse("runs/x/final", "--port", "8123", "--adapter", "sql=runs/sql")
    assert serve_recipe.model_folder(args) == "runs/x/final" and args.port == 8123 and args.adapter == ["sql=runs/sql"]


def test_two_different_models_is_an_error():
    with pytest.raises(LmforgeError, match="two different models"):
        serve_recipe.model_folder(parse("runs/x/final", "--model", "runs/y/final"))


def test_no_model_is_an_error():
    with pytest.raises(LmforgeError, match="no model"):
        serve_recipe.model_folder(parse("--port", "8001"))


def test_cli_no_model_exits_2_without_traceback(capsys):
    from lmforge.cli import main

    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "no model" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--help"], ["pipeline", "--help"]])
def test_help_prints_serve_commands_that_parse(argv, capsys):
    """Every `lmforge serve ...` the front door's help shows parses and names a model."""
    from lmforge.cli import main

    try:
        main(argv)
    except SystemExit:  # a command's --help exits through argparse
        pass
    out = " ".join(capsys.readouterr().out.split())  # help text wraps lines
    commands = [part.split("`", 1)[0] for part in out.split("`lmforge serve ")[1:]]
    assert commands, out
    for command in commands:
        assert serve_recipe.model_folder(parse(*command.split()))
