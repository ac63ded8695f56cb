"""Multi-turn judging (MT-Bench style) and length-controlled win rates (AlpacaEval LC).

MT-Bench: each question has two user turns; the model answers the first, then the follow-up with
its own first answer in the conversation. The judge grades each turn 1-10 seeing the whole
conversation so far (the turn-2 grade judges the follow-up answer in context, MT-Bench's
"multi-turn" prompt). A conversation is rendered by the model's chat template when its tokenizer
has one, else as a plain "User:/Assistant:" transcript.

Length control: a judge that likes long answers inflates a verbose model's win rate. Following
AlpacaEval 2.0's LC, P(model beats baseline on question i) = sigmoid(theta + phi * tanh(d_i / s))
with d_i the answer length difference and s its standard deviation, fitted by maximum likelihood
(ties as half a win); the LC win rate is sigmoid(theta), the win rate when the lengths are equal.
(AlpacaEval also fits a per-instruction difficulty term from many models' battles; with one pair
of models that term is not identifiable and is left out.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lmforge.common import LmforgeError, read_jsonl
from lmforge.eval.judge import JUDGE_MAX_TOKENS, parse_rating

MULTI_TURN_PROMPT = """Please act as an impartial judge and evaluate the quality of the response provided by \
an AI assistant to the user question displayed below. Your evaluation should focus on the assistant's answer \
to the LAST user question, in the context of the whole conversation. Rate the response on a scale of 1 to 10 \
strictly in this format: "Rating: [[5]]".

<|The Start of the Conversation|>
{conversation}
<|The End of the Conversation|>

Rating: """

BUILTIN_CONVERSATIONS: list[list[str]] = [
    ["Write a Python function that reverses a string.", "Now make it also remove the spaces."],
    ["What is a dictionary in Python?", "How do I loop over its keys and values at the same time?"],
    ["Explain what a unit test is.", "Give a tiny example with the unittest module."],
    ["Name three sorting algorithms.", "Which of them is fastest on nearly sorted data, and why?"],
    ["What does the `len` function return?", "What happens if I call it on an integer?"],
    ["Suggest a name for a variable holding a user's age.", "And one for a list of ages?"],
]


def transcript(turns: Sequence[tuple[str, str | None]]) -> str:
    return "".join(f"User: {q}\nAssistant: {a or ''}".rstrip(" ") + ("\n" if a else "") for q, a in turns)


def render(lm, turns: Sequence[tuple[str, str | None]]) -> str:
    """The conversation up to the last (unanswered) user turn, as the prompt to answer it."""
    tok = getattr(lm, "tokenizer", None)
    if tok is not None and getattr(tok, "chat_template", None):
        messages = []
        for q, a in turns:
            messages.append({"role": "user", "content": q})
            if a is not None:
                messages.append({"role": "assistant", "content": a})
        return tok.apply_chat_template(messages, add_generation_prompt=True)
    return transcript(turns)


def mt_bench(
    lm, judge, conversations: Sequence[Sequence[str]] | None = None, max_new_tokens: int = 64, seed: int = 0
) -> tuple[dict, list[dict]]:
    """(metrics, records): per conversation each turn's answer and 1-10 grade; metrics are the mean
    grade per turn and overall (ungraded turns counted as invalid, not as scores)."""
    convs = [list(c) for c in (BUILTIN_CONVERSATIONS if conversations is None else conversations)]
    n_turns = max(len(c) for c in convs)
    answers: list[list[str]] = [[] for _ in convs]
    for t in range(n_turns):  # every conversation's turn t in one batch
        live = [i for i, c in enumerate(convs) if t < len(c)]
        prompts = [render(lm, [*zip(convs[i][:t], answers[i]), (convs[i][t], None)]) for i in live]
        stop = ["\nUser:", "\n\n\n"]
        outs = lm.generate(prompts, max_new_tokens=max_new_tokens, stop=stop, temperature=0.0, seed=seed)
        for i, out in zip(live, outs):
            answers[i].append(out.strip())
    cells = [(i, t) for i, c in enumerate(convs) for t in range(len(c))]
    prompts = [
        MULTI_TURN_PROMPT.format(conversation=transcript(list(zip(convs[i][: t + 1], answers[i])))) for i, t in cells
    ]
    verdicts = judge.generate(prompts, max_new_tokens=JUDGE_MAX_TOKENS, stop=[], temperature=0.0)
    records = [
        {"turns": c, "answers": answers[i], "ratings": [None] * len(c), "judge": [None] * len(c)}
        for i, c in enumerate(convs)
    ]
    for (i, t), v in zip(cells, verdicts):
        records[i]["ratings"][t], records[i]["judge"][t] = parse_rating(v), v
    metrics: dict = {"conversations": len(convs)}
    all_scores = []
    for t in range(n_turns):
        scores = [r["ratings"][t] for r in records if t < len(r["ratings"]) and r["ratings"][t] is not None]
        metrics[f"turn_{t + 1}"] = float(np.mean(scores)) if scores else math.nan
        all_scores += scores
    metrics["score"] = float(np.mean(all_scores)) if all_scores else math.nan
    metrics["invalid"] = len(cells) - len(all_scores)
    return metrics, records


def read_conversations(path: str) -> list[list[str]]:
    """JSONL with "turns": [first question, follow-up, ...] (MT-Bench's question.jsonl field)."""
    out = []
    for where, row in read_jsonl(path, "conversation set"):
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            raise LmforgeError(f"{where}: field 'turns' must be a non-empty list of non-empty strings")
        out.append(turns)
    return out


# ----------------------------------------------------------------------------- length control


def length_controlled_win_rate(
    scores: Sequence[float], len_model: Sequence[int], len_baseline: Sequence[int], iters: int = 100
) -> dict[str, float]:
    """scores: the model's result per question (1 win, 0.5 tie, 0 loss, e.g. judge.judge_pairwise's
    "win"); lengths of both answers. Returns the raw and length-controlled win rates and the fit."""
    y = np.asarray(scores, dtype=np.float64)
    d = np.asarray(len_model, dtype=np.float64) - np.asarray(len_baseline, dtype=np.float64)
    if len(y) == 0 or not (len(y) == len(d)):
        raise LmforgeError("length control needs one score and two lengths per question")
    s = d.std()
    x = np.tanh(d / s) if s > 0 else np.zeros_like(d)
    X = np.stack([np.ones_like(x), x], 1)
    w = np.zeros(2)
    ridge = 1e-4 * np.eye(2)  # a judge that is always right (y all 1) would send theta to infinity
    for _ in range(iters):
        p = 1 / (1 + np.exp(-X @ w))
        grad = X.T @ (y - p) - ridge @ w
        hess = X.T @ (X * (p * (1 - p))[:, None]) + ridge
        step = np.linalg.solve(hess + 1e-12 * np.eye(2), grad)
        w += np.clip(step, -5, 5)
        if np.abs(step).max() < 1e-10:
            break
    return {
        "win_rate": float(y.mean()),
        "lc_win_rate": float(1 / (1 + math.exp(-w[0]))),
        "length_coefficient": float(w[1]),
        "mean_length_difference": float(d.mean()),
    }
