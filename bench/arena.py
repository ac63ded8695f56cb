"""An arena table for the tiny arithmetic models of bench/_arith_models.py (and one of them with
test-time compute), from votes decided by the answers' correctness: on every problem, every pair of
contestants meets; the one that answered right wins, both right or both wrong is a tie. The votes
go through `lmforge arena --votes` (Bradley-Terry, bootstrap intervals, Elo, win-rate plot).

    python bench/arena.py                              # 100 problems, writes runs/bench-arena
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _arith_models import models_in  # noqa: E402

from lmforge.cli import main as lmforge  # noqa: E402
from lmforge.eval.lm import LocalLM  # noqa: E402
from lmforge.eval.reasoning import ArithmeticConfig, arithmetic_task, best_of_n, greedy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="runs/bench-arith")
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--out", default="runs/bench-arena")
    args = ap.parse_args()
    torch.set_num_threads(2)
    models = models_in(args.root)
    problems, _ = arithmetic_task(ArithmeticConfig(num_examples=args.problems, seed=0))
    prompts = [p["prompt"] for p in problems]
    answers = {}
    for name, folder in models.items():
        lm = LocalLM.load(folder, batch_size=32)
        answers[name] = greedy(lm, prompts).answers
    middle = sorted(models, key=lambda m: int(m.split("-")[1]))[len(models) // 2]
    answers[f"{middle}+best-of-8"] = best_of_n(LocalLM.load(models[middle], batch_size=32), prompts, 8).answers
    right = {m: [a == p["answer"] for a, p in zip(ans, problems)] for m, ans in answers.items()}
    votes = []
    for (a, b), (i, p) in itertools.product(itertools.combinations(right, 2), enumerate(problems)):
        ra, rb = right[a][i], right[b][i]
        winner = "model_a" if ra and not rb else "model_b" if rb and not ra else "tie"
        votes.append({"model_a": a, "model_b": b, "winner": winner, "prompt_id": p["id"]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "votes.jsonl").write_text("".join(json.dumps(v) + "\n" for v in votes))
    for m, r in right.items():
        print(f"{m}: accuracy {sum(r) / len(r):.3f}")
    lmforge(["arena", "--votes", str(out / "votes.jsonl"), "--out", str(out), "--bootstrap", "1000"])


if __name__ == "__main__":
    main()
