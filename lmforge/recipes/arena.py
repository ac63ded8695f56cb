"""Rate models by pairwise battles (Chatbot Arena style): Bradley-Terry ratings by maximum likelihood
with bootstrap 95% intervals, online Elo for comparison, and a win-rate matrix plot.

Battles come from a votes file (JSONL: model_a, model_b, winner in model_a|model_b|tie), from an LLM
judge comparing the models' answers on a prompt set (every pair, both orders), from the prompts'
reference answers (`--judge reference[:METRIC]`: each answer scored against the prompt's "reference"
(or "answer") field, the higher score wins the pair, equal scores tie; METRIC is answer (the final
answer equals the reference's, the default), exact (SQuAD-normalised exact match), token_f1, chrf,
rouge_l, or loglik: no answers, each model's log-likelihood of the reference after the prompt per
character, which still ranks models too weak to produce the reference), or votes and battles together.

    lmforge arena --votes votes.jsonl --out runs/arena
    lmforge arena runs/a/final runs/b/final http://127.0.0.1:8000 --judge runs/big/final --prompts p.jsonl
    lmforge arena small=runs/a/final big=runs/b/final --judge runs/big/final      # names in the table
    lmforge arena base=runs/p/base final=runs/p/final --judge reference:chrf --prompts code.jsonl

Writes arena.json (the table and settings), battles.jsonl, judgments.jsonl (the judge's texts) and
win_rates.png to --out, and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.common import LmforgeError, atomic_write_json, atomic_write_text, get_logger
from lmforge.recipes._common import bounded

log = get_logger("lmforge.arena")
REFERENCE_METRICS = ("answer", "exact", "token_f1", "chrf", "rouge_l", "loglik")
LOGLIK = "loglik"  # not an answer's score: the model's log-likelihood of the reference, per character


def reference_scorer(judge: str | None):
    """--judge reference[:METRIC] -> score(answer, reference) in [0, 1], or LOGLIK; None for a model judge."""
    if judge is None or judge.split(":", 1)[0] != "reference":
        return None
    from lmforge.eval import metrics
    from lmforge.serve.router_model import answer_key

    metric = judge.partition(":")[2] or "answer"
    scorers = {
        "answer": lambda a, r: float(answer_key(a) == answer_key(r)),
        "exact": lambda a, r: metrics.exact_match(a, [r]),
        "token_f1": lambda a, r: metrics.token_f1(a, [r]),
        "chrf": lambda a, r: metrics.chrf([a], [[r]]) / 100,
        "rouge_l": lambda a, r: metrics.rouge_l(a, [r]),
    }
    if metric == LOGLIK:
        return LOGLIK
    if metric not in scorers:
        raise LmforgeError(f"--judge {judge!r}: the reference metric must be one of {', '.join(REFERENCE_METRICS)}")
    return scorers[metric]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        help="model folders or endpoint URLs to battle, optionally NAME=SPEC (needs --judge)",
    )
    p.add_argument("--votes", action="append", default=[], metavar="FILE", help="a votes JSONL (repeatable)")
    p.add_argument(
        "--judge",
        help="the judge: a model folder, an endpoint URL, or reference[:METRIC] (score against the prompts' "
        f"references; METRIC: {', '.join(REFERENCE_METRICS)})",
    )
    p.add_argument(
        "--prompts",
        help="prompt JSONL (field 'prompt' or 'question', and 'reference' or 'answer' for --judge reference; "
        "default: a small built-in set)",
    )
    p.add_argument("--limit", type=bounded(int, ge=1), help="first N prompts only")
    p.add_argument("--max-new-tokens", type=bounded(int, ge=1), default=64)
    p.add_argument("--temperature", type=bounded(float, ge=0.0), default=0.0)
    p.add_argument("--stop", action="append", default=None, help='stop string for answers (default: "\\n\\n")')
    p.add_argument("--bootstrap", type=bounded(int, ge=0), default=1000, help="bootstrap rounds for the intervals")
    p.add_argument(
        "--prior",
        type=bounded(float, ge=0.0),
        default=0.1,
        help="virtual ties added to every pair (keeps an unbeaten model's rating finite; 0: plain MLE)",
    )
    p.add_argument(
        "--style-control",
        action="store_true",
        help="also rate with the answers' length difference as a covariate (the style_rating column)",
    )
    p.add_argument("--elo-k", type=bounded(float, gt=0.0), default=4.0, help="online Elo's K factor")
    p.add_argument("--seed", type=bounded(int, ge=0), default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/arena")


def _named(specs: list[str]) -> dict[str, str]:
    """NAME=SPEC or SPEC (named after its last two path parts, or the URL) -> {name: spec}."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or "/" in name or ":" in name:
            name, rest = ("/".join(Path(spec).resolve().parts[-2:]) if "://" not in spec else spec), spec
        if not name or not rest:
            raise LmforgeError(f"model {spec!r}: expected SPEC or NAME=SPEC")
        if name in out:
            raise LmforgeError(f"model name {name!r} is given twice; name them NAME=SPEC")
        out[name] = rest
    return out


def read_prompts(
    path: str | None, limit: int | None, need_references: bool = False
) -> tuple[list[str], list[str], list]:
    """(prompts, ids, references: the 'reference' or 'answer' field as text, None where absent; every
    prompt must have one when `need_references`)."""
    from lmforge.common import read_jsonl
    from lmforge.eval.arena import BUILTIN_PROMPTS

    if path is None:
        if need_references:
            raise LmforgeError("--judge reference needs --prompts FILE with a 'reference' (or 'answer') per prompt")
        n = len(BUILTIN_PROMPTS)
        return list(BUILTIN_PROMPTS)[:limit], [f"builtin/{i}" for i in range(n)][:limit], [None] * min(n, limit or n)
    prompts, ids, refs = [], [], []
    for where, row in read_jsonl(path, "prompts file"):
        text = row.get("prompt", row.get("question"))
        if not isinstance(text, str) or not text.strip():
            raise LmforgeError(f"{where}: field 'prompt' (or 'question') must be a non-empty string")
        ref = row.get("reference", row.get("answer"))
        if ref is not None and (isinstance(ref, bool) or not isinstance(ref, (str, int, float))):
            raise LmforgeError(f"{where}: field 'reference' (or 'answer') must be a string or a number, got {ref!r}")
        if ref is None and need_references:
            raise LmforgeError(f"{where}: --judge reference needs a 'reference' (or 'answer') field")
        prompts.append(text)
        ids.append(str(row.get("id", where)))
        refs.append(None if ref is None else str(ref))
    return prompts[:limit], ids[:limit], refs[:limit]


def main(args: argparse.Namespace) -> int:
    from lmforge.eval.arena import (
        arena_table,
        fit_bt_style,
        format_table,
        judge_battles,
        plot_win_rates,
        read_votes,
        reference_battles,
        to_elo_scale,
    )

    if not args.votes and not args.models:
        raise LmforgeError("nothing to rate: give --votes FILE and/or two or more MODELs with --judge")
    if args.models and len(args.models) < 2:
        raise LmforgeError("battles need at least two models")
    if args.models and not args.judge:
        raise LmforgeError("model battles need a --judge (a model folder or endpoint URL)")
    if args.judge and not args.models:
        raise LmforgeError("--judge is given but no MODELs to battle")
    if not args.models and (args.prompts or args.limit):
        raise LmforgeError("--prompts/--limit choose the prompts of model battles; give MODELs and --judge")
    battles = [b for path in args.votes for b in read_votes(path)]
    records: list[dict] = []
    if args.models:
        from lmforge.eval.lm import load_lm

        specs = _named(args.models)
        score = reference_scorer(args.judge)
        prompts, ids, refs = read_prompts(args.prompts, args.limit, need_references=score is not None)
        stop = ["\n\n"] if args.stop is None else args.stop
        answers, loglik = {}, {}
        for name, spec in specs.items():
            lm = load_lm(spec, device=args.device)
            if score == LOGLIK:  # how likely each model finds the reference: no answers to generate
                log.info("scoring %d references with %s", len(prompts), name)
                lls = lm.loglikelihood(list(zip(prompts, refs)))
                loglik[name] = [ll / max(1, len(r)) for (ll, _), r in zip(lls, refs)]
                answers[name] = [""] * len(prompts)
                continue
            log.info("answering %d prompts with %s", len(prompts), name)
            answers[name] = lm.generate(
                prompts, max_new_tokens=args.max_new_tokens, stop=stop, temperature=args.temperature, seed=args.seed
            )
        if score == LOGLIK:
            judged = reference_battles(loglik, ids)
            records = [{"model": m, "id": i, "loglik_per_char": v} for m in loglik for i, v in zip(ids, loglik[m])]
            for m, sc in loglik.items():
                print(f"{m}: mean log-likelihood of the reference per character {sum(sc) / len(sc):.4f}")
        elif score is not None:
            scores = {m: [score(a, r) for a, r in zip(ans, refs)] for m, ans in answers.items()}
            judged = reference_battles(scores, ids, {m: [len(a) for a in ans] for m, ans in answers.items()})
            records = [{"model": m, "id": i, "answer": a, "score": sc}
                       for m in answers for i, a, sc in zip(ids, answers[m], scores[m])]  # fmt: skip
            for m, sc in scores.items():
                print(f"{m}: mean {args.judge} score {sum(sc) / len(sc):.4f}")
        else:
            log.info("judging %d pairs x %d prompts x 2 orders", len(specs) * (len(specs) - 1) // 2, len(prompts))
            judged, records = judge_battles(load_lm(args.judge, device=args.device), prompts, answers, ids)
        battles += judged
    rows = arena_table(battles, rounds=args.bootstrap, seed=args.seed, prior=args.prior, elo_k=args.elo_k)
    extra = {}
    if args.style_control:
        names = [r["model"] for r in rows]
        theta, gamma = fit_bt_style(battles, names, args.prior)
        for r, t in zip(rows, to_elo_scale(theta)):
            r["style_rating"] = float(t)
        extra["length_coefficient"] = gamma
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    atomic_write_json(out / "arena.json", {"table": rows, "settings": settings, "battles": len(battles), **extra})
    atomic_write_text(out / "battles.jsonl", "".join(json.dumps(b.to_dict()) + "\n" for b in battles))
    if records:
        atomic_write_text(out / "judgments.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in records))
    plot_win_rates(battles, [r["model"] for r in rows], out / "win_rates.png")
    print(format_table(rows))
    if extra:
        print(f"style control: a standard deviation longer answer adds {extra['length_coefficient']:+.3f} log-odds")
    print(f"{len(battles)} battles; written to {out}/ (arena.json, battles.jsonl, win_rates.png)")
    return 0
