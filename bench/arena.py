"""An arena table for the tiny arithmetic models of bench/_arith_models.py (and one of them with
test-time compute), from votes decided by the answers' correctness: on every problem, every pair of
contestants meets; the one that answered right wins, both right or both wrong is a tie. The votes
go through `lmforge arena --votes` (Bradley-Terry, bootstrap intervals, Elo, win-rate plot).

With --pipeline RUN, the models a pipeline run produced (base, final, draft, each quantized one) meet
on code instead: prompts are the last lines before a line of standard-library modules the pipeline
did not train on, the reference is that next line, and `lmforge arena --judge reference:METRIC`
decides every pair (--metric loglik, the default: which model finds that line likelier, per
character; chrf: whose generated next line is closer to it).

    python bench/arena.py                              # 100 problems, writes runs/bench-arena
    python bench/arena.py --pipeline runs/pipeline-micro --out runs/bench-arena-pipeline
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

CODE_MODULES = ("csv.py", "textwrap.py", "shlex.py", "fnmatch.py", "heapq.py", "calendar.py", "difflib.py")


def code_prompts(n: int, context_lines: int = 3, max_chars: int = 160) -> list[dict]:
    """{"prompt", "reference", "id"}: the `context_lines` lines before a non-blank line of the
    CODE_MODULES (evenly spread over them), and that line."""
    import sysconfig

    per_file = -(-n // len(CODE_MODULES))
    rows = []
    for name in CODE_MODULES:
        lines = (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8").splitlines()
        spots = [
            i for i in range(context_lines, len(lines)) if lines[i].strip() and not lines[i].strip().startswith("#")
        ]
        for i in spots[:: max(1, len(spots) // per_file)][:per_file]:
            prompt = "\n".join(lines[i - context_lines : i]) + "\n"
            rows.append({"prompt": prompt[-max_chars:], "reference": lines[i], "id": f"{name}:{i + 1}"})
    return rows[:n]


def pipeline_arena(run: Path, out: Path, n: int, metric: str) -> None:
    folders = {"base": run / "base" / "final", "final": run / "final", "draft": run / "draft" / "final"}
    specs = [f"{m}={f}" for m, f in folders.items() if f.is_dir()]
    specs += [f"{q.name}={q}" for q in sorted((run / "quant").glob("*")) if q.is_dir()]
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "code_prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in code_prompts(n)))
    argv = ["arena", *specs, "--judge", f"reference:{metric}", "--prompts", str(prompts), "--stop", "\n"]
    lmforge([*argv, "--max-new-tokens", "24", "--out", str(out), "--bootstrap", "1000"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="runs/bench-arith")
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--out", default="runs/bench-arena")
    ap.add_argument("--pipeline", help="a pipeline run folder: battle its models on code instead")
    ap.add_argument("--metric", default="loglik", help="--pipeline: the reference metric (loglik, chrf, ...)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.pipeline:
        return pipeline_arena(Path(args.pipeline), Path(args.out), args.problems, args.metric)
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
