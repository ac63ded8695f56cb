"""`ruff check` and `ruff format --check` over the package, tests and benchmarks (settings in
pyproject.toml), so style problems fail the test command like any other regression."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["lmforge", "tests", "bench"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *TARGETS], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (
        f"ruff {' '.join(command)} failed (run `ruff {command[0]} --fix` / `ruff format`):\n"
        + result.stdout[-4000:]
        + result.stderr[-2000:]
    )
