"""LLM-as-judge: a judge model (any `lm`: local or an OpenAI-compatible endpoint) compares two
answers, or grades one on a 1-10 scale (the MT-bench prompts and verdict formats).

Pairwise: every pair is judged twice, once with each answer first. A verdict scores A 1 (A
better), 0.5 (tie) or 0 (B better); the pair's score is the mean of the two orders, so a judge that
always prefers the first position gives exactly 0.5, its position bias cancelled. The win rate is
the mean over questions, with a percentile bootstrap confidence interval.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lmforge.eval import metrics as M

PAIRWISE_PROMPT = """Please act as an impartial judge and evaluate the quality of the answers provided by two \
AI assistants to the question below. Do not let the order of the answers or their length influence you. \
Output your final verdict strictly in this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B \
is better, and "[[C]]" for a tie.

[Question]
{question}

[The Start of Assistant A's Answer]
{answer_a}
[The End of Assistant A's Answer]

[The Start of Assistant B's Answer]
{answer_b}
[The End of Assistant B's Answer]

Verdict: """

SINGLE_PROMPT = """Please act as an impartial judge and evaluate the quality of the answer provided by an AI \
assistant to the question below. Rate the answer on a scale of 1 to 10 strictly in this format: \
"Rating: [[5]]".

[Question]
{question}

[The Start of Assistant's Answer]
{answer}
[The End of Assistant's Answer]

Rating: """

_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_LOOSE_RATING = re.compile(r"\b(10|[1-9])(?:\s*/\s*10)?\b")
JUDGE_MAX_TOKENS = 256


def parse_verdict(text: str) -> str | None:
    """ "A", "B", "tie", or None when the judge's text holds no verdict."""
    m = _VERDICT.search(text)
    if m:
        return {"A": "A", "B": "B", "C": "tie"}[m.group(1)]
    m = re.match(r"\s*\[?\s*([AB])\b", text)  # small judges often just answer "A"
    return m.group(1) if m else None


def parse_rating(text: str) -> float | None:
    """The 1-10 rating in the judge's text, or None."""
    m = _RATING.search(text) or _LOOSE_RATING.search(text)
    if not m:
        return None
    value = float(m.group(1))
    return value if 1 <= value <= 10 else None


_POINTS = {"A": 1.0, "tie": 0.5, "B": 0.0, None: 0.5}  # no verdict counts as a tie


def judge_pairwise(
    judge,
    questions: Sequence[str],
    answers_a: Sequence[str],
    answers_b: Sequence[str],
    ids: Sequence[str] | None = None,
) -> list[dict]:
    """Per question: both orders' verdicts and A's score (1 win, 0.5 tie or inconsistent, 0 loss)."""
    ab = [
        PAIRWISE_PROMPT.format(question=q, answer_a=a, answer_b=b) for q, a, b in zip(questions, answers_a, answers_b)
    ]
    ba = [
        PAIRWISE_PROMPT.format(question=q, answer_a=b, answer_b=a) for q, a, b in zip(questions, answers_a, answers_b)
    ]
    out_ab = judge.generate(ab, max_new_tokens=JUDGE_MAX_TOKENS, stop=[], temperature=0.0)
    out_ba = judge.generate(ba, max_new_tokens=JUDGE_MAX_TOKENS, stop=[], temperature=0.0)
    records = []
    for i, q in enumerate(questions):
        v1 = parse_verdict(out_ab[i])
        v2 = {"A": "B", "B": "A"}.get(parse_verdict(out_ba[i]) or "", parse_verdict(out_ba[i]))  # back to A/B
        score = (_POINTS[v1] + _POINTS[v2]) / 2
        records.append(
            {
                "id": ids[i] if ids else str(i),
                "question": q,
                "answer_a": answers_a[i],
                "answer_b": answers_b[i],
                "judge_ab": out_ab[i],
                "judge_ba": out_ba[i],
                "verdicts": [v1, v2],
                "consistent": v1 == v2 and v1 is not None,
                "scores": {"win": score},
            }
        )
    return records


def aggregate_pairwise(records: Sequence[dict], seed: int = 0) -> dict[str, float]:
    scores = [r["scores"]["win"] for r in records]
    low, high = M.bootstrap_ci(scores, seed=seed)
    return {
        "examples": len(records),
        "win_rate": M.mean(scores),
        "win_rate_ci_low": low,
        "win_rate_ci_high": high,
        "wins": sum(s > 0.5 for s in scores),
        "ties": sum(s == 0.5 for s in scores),
        "losses": sum(s < 0.5 for s in scores),
        "consistency": M.mean([float(r["consistent"]) for r in records]),
    }


def judge_single(
    judge, questions: Sequence[str], answers: Sequence[str], ids: Sequence[str] | None = None
) -> list[dict]:
    """1-10 grades; an answer the judge did not grade scores nothing and is counted as invalid."""
    prompts = [SINGLE_PROMPT.format(question=q, answer=a) for q, a in zip(questions, answers)]
    outs = judge.generate(prompts, max_new_tokens=JUDGE_MAX_TOKENS, stop=[], temperature=0.0)
    records = []
    for i, (q, a, o) in enumerate(zip(questions, answers, outs)):
        rating = parse_rating(o)
        records.append(
            {
                "id": ids[i] if ids else str(i),
                "question": q,
                "answer": a,
                "judge": o,
                "rating": rating,
                "scores": {"score": rating} if rating is not None else {},
            }
        )
    return records


def aggregate_single(records: Sequence[dict], seed: int = 0) -> dict[str, float]:
    ratings = [r["rating"] for r in records if r["rating"] is not None]
    low, high = M.bootstrap_ci(ratings, seed=seed)
    return {
        "examples": len(records),
        "score": M.mean(ratings),
        "score_ci_low": low,
        "score_ci_high": high,
        "invalid": len(records) - len(ratings),
    }


def run_judge_task(lm, cfg, load_lm) -> object:
    """judge_pairwise / judge_single tasks: `lm` answers the file's questions, `cfg.judge` judges them
    (pairwise against `cfg.baseline`'s answers, or the file's "baseline" field)."""
    from lmforge.common import LmforgeError
    from lmforge.eval.task_data import TaskResult, _field, load_examples

    if not cfg.judge:
        raise LmforgeError(f"task {cfg.name!r}: 'judge' (a model folder or endpoint URL) is required for {cfg.type}")
    rows = load_examples(
        cfg, lambda r, w: {**r, "id": str(r.get("id", w)), "question": str(_field(r, ("question", "prompt"), w))}
    )
    questions, ids = [r["question"] for r in rows], [r["id"] for r in rows]
    stop = ["\n\n"] if cfg.stop is None else cfg.stop
    answers = lm.generate(
        questions, max_new_tokens=cfg.max_new_tokens, stop=stop, temperature=cfg.temperature, seed=cfg.seed
    )
    judge = load_lm(cfg.judge)
    if cfg.type == "judge_single":
        records = judge_single(judge, questions, answers, ids)
        return TaskResult(cfg.name, cfg.type, aggregate_single(records, cfg.seed), records)
    if cfg.baseline:
        baseline = load_lm(cfg.baseline).generate(
            questions, max_new_tokens=cfg.max_new_tokens, stop=stop, temperature=cfg.temperature, seed=cfg.seed
        )
    else:
        baseline = [str(_field(r, ("baseline", "reference", "answer"), f"{cfg.path}:{r['id']}")) for r in rows]
    records = judge_pairwise(judge, questions, answers, baseline, ids)
    return TaskResult(cfg.name, cfg.type, aggregate_pairwise(records, cfg.seed), records)
