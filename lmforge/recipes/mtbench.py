"""Multi-turn judging, MT-Bench style: the model answers each conversation's first question, then its
follow-up with its own first answer in the conversation; a judge model grades every turn 1-10 seeing
the whole conversation so far (lmforge/eval/multiturn.py).

    lmforge mtbench runs/pipeline-tiny/final --judge runs/big/final
    lmforge mtbench http://127.0.0.1:8000 --judge http://127.0.0.1:9000 --conversations question.jsonl

MODEL and --judge are model folders or OpenAI-compatible endpoint URLs. --conversations is a JSONL
with "turns": [first question, follow-up, ...] per line (MT-Bench's question.jsonl reads as is); the
default is a small built-in set of two-turn coding conversations. Prints the mean grade per turn
and overall; writes mt_bench.json (metrics and settings) and conversations.jsonl (answers, grades,
the judge's texts) to --out. A verdict without a readable "Rating: [[n]]" counts as invalid, not as
a grade.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from lmforge.common import LmforgeError, atomic_write_json, atomic_write_text, get_logger
from lmforge.recipes._common import bounded

log = get_logger("lmforge.mtbench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="the model to grade: a model folder or an endpoint URL")
    p.add_argument("--judge", required=True, help="the judge: a model folder or an endpoint URL")
    p.add_argument("--conversations", metavar="FILE", help='JSONL with "turns" per line (default: built-in set)')
    p.add_argument("--limit", type=bounded(int, ge=1), help="first N conversations only")
    p.add_argument("--max-new-tokens", type=bounded(int, ge=1), default=64, help="per answer (default: %(default)s)")
    p.add_argument("--seed", type=bounded(int, ge=0), default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/mtbench", help="folder for mt_bench.json and conversations.jsonl")


def main(args: argparse.Namespace) -> int:
    from lmforge.eval.lm import load_lm
    from lmforge.eval.multiturn import BUILTIN_CONVERSATIONS, mt_bench, read_conversations

    convs = BUILTIN_CONVERSATIONS if args.conversations is None else read_conversations(args.conversations)
    convs = convs[: args.limit]
    if not convs:
        raise LmforgeError(f"{args.conversations}: no conversations")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"--out {out}: exists and is not a folder")
    lm = load_lm(args.model, device=args.device)
    judge = lm if args.judge == args.model else load_lm(args.judge, device=args.device)
    log.info("%d conversations, %d turns", len(convs), sum(len(c) for c in convs))
    metrics, records = mt_bench(lm, judge, convs, max_new_tokens=args.max_new_tokens, seed=args.seed)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    # NaN (no gradable turn) is not JSON: written as null
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    atomic_write_json(out / "mt_bench.json", {"metrics": clean, "settings": settings})
    atomic_write_text(out / "conversations.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    turns = [k for k in metrics if k.startswith("turn_")]
    print("| " + " | ".join([*turns, "score", "invalid"]) + " |")
    print("|" + "---:|" * (len(turns) + 2))
    cells = [("n/a" if math.isnan(metrics[k]) else f"{metrics[k]:.2f}") for k in [*turns, "score"]]
    print("| " + " | ".join([*cells, str(metrics["invalid"])]) + " |")
    print(f"{len(convs)} conversations; written to {out}/ (mt_bench.json, conversations.jsonl)")
    return 0
