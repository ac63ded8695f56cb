"""Accuracy against compute at test time on the arithmetic task (lmforge/eval/reasoning.py): greedy,
self-consistency, best-of-n with the step verifier and step-level beam search with the process
reward, for a tiny model trained on worked problems (bench/_arith_models.py).

    python bench/reasoning.py                          # arith-5000, 60 problems
    python bench/reasoning.py --model arith-2500 --problems 100
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _arith_models import models_in  # noqa: E402

from lmforge.eval.lm import LocalLM  # noqa: E402
from lmforge.eval.reasoning import ArithmeticConfig, arithmetic_task, compute_table, format_rows  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="runs/bench-arith")
    p.add_argument("--model", default="arith-5000")
    p.add_argument("--problems", type=int, default=60)
    p.add_argument("--budgets", default="1,4,8")
    p.add_argument("--temperature", type=float, default=0.7)
    args = p.parse_args()
    torch.set_num_threads(2)
    models = models_in(args.root)
    lm = LocalLM.load(models[args.model], batch_size=32)
    problems, _ = arithmetic_task(ArithmeticConfig(num_examples=args.problems, seed=0))
    t0 = time.time()
    rows = compute_table(
        lm,
        problems,
        budgets=tuple(int(b) for b in args.budgets.split(",")),
        temperature=args.temperature,
        beams=((2, 2), (2, 4)),
    )
    print(f"{args.model}, {len(problems)} problems, temperature {args.temperature} ({time.time() - t0:.0f} s)")
    print(format_rows(rows))


if __name__ == "__main__":
    main()
