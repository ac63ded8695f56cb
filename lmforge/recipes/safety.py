"""Probe a model (folder or endpoint URL) for safety, bias and robustness: red teaming (attack
templates x harmful goals, judge-graded attack success rate), over-refusal on benign prompts,
CrowS-Pairs style bias by log-likelihood, regard gaps across swapped groups, and the accuracy drop
under typos. Small built-in sets (lmforge/eval/safety_data.py), or your JSONL files.

    lmforge safety runs/sft/final --judge http://127.0.0.1:8001      # every probe
    lmforge safety runs/sft/final --probe bias --probe robustness    # no judge needed
    lmforge safety MODEL --judge J --goals goals.jsonl --pairs crows_pairs.jsonl --mc mc.jsonl

Writes safety.json (metrics and every record) to --out and prints the metrics.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.common import LmforgeError, atomic_write_json
from lmforge.recipes._common import bounded

PROBES = ("red_team", "over_refusal", "bias", "regard", "robustness")
NEEDS_JUDGE = ("red_team",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a model folder or an endpoint URL")
    p.add_argument("--probe", action="append", choices=PROBES, help="run only these probes (repeatable; default: all)")
    p.add_argument("--judge", help="the judge for red teaming (and over-refusal, else refusal phrases decide)")
    p.add_argument("--goals", help="red-team goals JSONL (field 'goal' or 'prompt')")
    p.add_argument("--benign", help="over-refusal prompts JSONL (field 'prompt')")
    p.add_argument("--pairs", help="bias pairs JSONL ('more'/'less' or CrowS-Pairs' 'sent_more'/'sent_less')")
    p.add_argument("--mc", help="robustness multiple-choice JSONL (context, choices, gold)")
    p.add_argument("--typo-rate", type=bounded(float, ge=0.0, le=1.0), default=0.3, help="words given a typo")
    p.add_argument("--max-new-tokens", type=bounded(int, ge=1), default=64)
    p.add_argument("--seed", type=bounded(int, ge=0), default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/safety")


def main(args: argparse.Namespace) -> int:
    from lmforge.eval import safety as S
    from lmforge.eval.lm import load_lm

    probes = args.probe or list(PROBES)
    if args.judge is None and "red_team" in probes:
        if args.probe:
            raise LmforgeError("--probe red_team needs a --judge (a model folder or endpoint URL)")
        probes.remove("red_team")
    unused = {"--goals": (args.goals, "red_team"), "--benign": (args.benign, "over_refusal")}
    unused |= {"--pairs": (args.pairs, "bias"), "--mc": (args.mc, "robustness")}
    for flag, (value, probe) in unused.items():
        if value is not None and probe not in probes:
            raise LmforgeError(f"{flag} is for the {probe} probe, which is not run")
    lm = load_lm(args.model, device=args.device)
    judge = load_lm(args.judge, device=args.device) if args.judge else None
    metrics, records = {}, {}
    kw = dict(max_new_tokens=args.max_new_tokens, seed=args.seed)
    if "red_team" in probes:
        goals = S.read_strings(args.goals, ("goal", "prompt")) if args.goals else None
        metrics["red_team"], records["red_team"] = S.red_team(lm, judge, goals, **kw)
    if "over_refusal" in probes:
        benign = S.read_strings(args.benign, ("prompt", "question")) if args.benign else None
        metrics["over_refusal"], records["over_refusal"] = S.over_refusal(lm, benign, judge, **kw)
    if "bias" in probes:
        metrics["bias"], records["bias"] = S.crows_pairs(lm, S.read_pairs(args.pairs) if args.pairs else None)
    if "regard" in probes:
        metrics["regard"], records["regard"] = S.regard_gap(lm)
    if "robustness" in probes:
        mc = S.read_mc(args.mc) if args.mc else None
        metrics["robustness"], records["robustness"] = S.robustness(lm, mc, args.typo_rate, args.seed)
    out = Path(args.out)
    atomic_write_json(out / "safety.json", {"model": args.model, "metrics": metrics, "records": records})
    for probe, m in metrics.items():
        shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())
        print(f"{probe}: {shown}")
    print(f"written to {out / 'safety.json'}")
    return 0
