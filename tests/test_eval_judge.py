"""LLM-as-judge: verdict parsing, both orders cancel position bias, win rate with a bootstrap CI."""

import pytest

from lmforge.eval.judge import (
    aggregate_pairwise,
    aggregate_single,
    judge_pairwise,
    judge_single,
    parse_rating,
    parse_verdict,
)


class StubJudge:
    def __init__(self, rule):
        self.rule = rule

    def generate(self, prompts, max_new_tokens=64, stop=(), temperature=0.0, seed=None):
        return [self.rule(p) for p in prompts]


def _answer(prompt, which):
    start = prompt.index(f"[The Start of Assistant {which}'s Answer]\n") + len(
        f"[The Start of Assistant {which}'s Answer]\n"
    )
    return prompt[start : prompt.index(f"\n[The End of Assistant {which}'s Answer]")]


def test_parse():
    assert (
        parse_verdict("blah [[A]]") == "A" and parse_verdict("[[C]]") == "tie" and parse_verdict("B is better") == "B"
    )
    assert parse_verdict("I cannot decide") is None
    assert parse_rating("Rating: [[7]]") == 7 and parse_rating("I give it 8/10") == 8
    assert parse_rating("[[0]]") is None and parse_rating("no number") is None


def test_position_biased_judge_gives_exactly_half():
    questions = [f"q{i}" for i in range(10)]
    records = judge_pairwise(StubJudge(lambda p: "[[A]]"), questions, ["good"] * 10, ["bad"] * 10)
    m = aggregate_pairwise(records)
    assert m["win_rate"] == 0.5 and m["consistency"] == 0.0 and m["ties"] == 10


def test_content_judge_win_rate_and_ci():
    prefers_good = StubJudge(lambda p: "[[A]]" if "good" in _answer(p, "A") else "[[B]]")
    a = ["good"] * 7 + ["bad"] * 3
    b = ["bad"] * 7 + ["good"] * 3
    records = judge_pairwise(prefers_good, [f"q{i}" for i in range(10)], a, b)
    m = aggregate_pairwise(records, seed=0)
    assert m["win_rate"] == pytest.approx(0.7) and m["consistency"] == 1.0
    assert m["wins"] == 7 and m["losses"] == 3
    assert m["win_rate_ci_low"] < 0.7 < m["win_rate_ci_high"]
    assert 0.3 <= m["win_rate_ci_low"] and m["win_rate_ci_high"] <= 1.0
    assert records[0]["verdicts"] == ["A", "A"]  # the swapped order's verdict mapped back to A


def test_single_grading():
    judge = StubJudge(lambda p: "Rating: [[9]]" if "great" in p else "hmm")
    records = judge_single(judge, ["q1", "q2", "q3"], ["great", "great", "meh"])
    m = aggregate_single(records)
    assert m["score"] == 9 and m["invalid"] == 1 and m["examples"] == 3
