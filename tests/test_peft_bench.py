"""bench/peft.py runs end to end on the tiny preset (slow: it starts a process per method)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "peft.py"


@pytest.mark.slow
def test_peft_bench_runs_on_the_tiny_preset():
    out = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--preset",
            "tiny",
            "--steps",
            "2",
            "--batch",
            "2",
            "--seq",
            "32",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--methods",
            "lora,qlora,adalora,prefix",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for line in (
        "| lora |",
        "| qlora |",
        "| prefix |",
        "| peft-lora |",
        "LoRA r=8 q,v step time lmforge/peft",
        "QLoRA base linears: NF4",
        "AdaLoRA final ranks",
    ):
        assert line in out.stdout, out.stdout
