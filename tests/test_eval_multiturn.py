"""MT-Bench style multi-turn judging (the follow-up is answered with the first answer in context and
judged in context) and AlpacaEval-style length control (a length-loving judge's advantage is taken
out; a real quality gap is kept)."""

import json

import numpy as np
import pytest

from lmforge.common import LmforgeError
from lmforge.eval.multiturn import length_controlled_win_rate, mt_bench, read_conversations, render


class Scripted:
    def __init__(self, rule):
        self.rule, self.prompts = rule, []

    def generate(self, prompts, max_new_tokens=64, stop=(), temperature=0.0, seed=None):
        self.prompts += list(prompts)
        return [self.rule(p) for p in prompts]


def test_follow_up_sees_the_first_answer_and_the_judge_sees_both_turns():
    model = Scripted(lambda p: "ANSWER2" if "ANSWER1" in p else "ANSWER1")
    judge = Scripted(lambda p: "Rating: [[8]]" if p.count("ANSWER") == 2 else "Rating: [[4]]")
    m, records = mt_bench(model, judge, [["first?", "second?"], ["only?"]])
    assert records[0]["answers"] == ["ANSWER1", "ANSWER2"] and records[1]["answers"] == ["ANSWER1"]
    assert "User: first?\nAssistant: ANSWER1\nUser: second?\nAssistant:" in model.prompts[-1]
    assert m["turn_1"] == 4.0 and m["turn_2"] == 8.0 and m["score"] == pytest.approx(16 / 3) and m["invalid"] == 0
    m, _ = mt_bench(model, Scripted(lambda p: "no idea"), [["a", "b"]])
    assert m["invalid"] == 2 and np.isnan(m["score"])


def test_render_uses_the_chat_template_when_there_is_one():
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, add_generation_prompt=False):
            return "|".join(f"{m['role']}:{m['content']}" for m in messages) + (
                "|assistant:" if add_generation_prompt else ""
            )

    lm = type("LM", (), {"tokenizer": Tok()})()
    assert render(lm, [("hi", "yo"), ("more", None)]) == "user:hi|assistant:yo|user:more|assistant:"


def test_length_control_removes_a_verbosity_bias_and_keeps_quality():
    rng = np.random.default_rng(0)
    n = 400
    base = rng.integers(50, 150, n)
    model = base + rng.integers(-60, 120, n)  # the model is wordier on average
    d = (model - base) / (model - base).std()
    p = 1 / (1 + np.exp(-2.5 * np.tanh(d)))  # the judge rewards length only: equal quality
    scores = (rng.random(n) < p).astype(float)
    r = length_controlled_win_rate(scores, model, base)
    assert r["win_rate"] > 0.6 and abs(r["lc_win_rate"] - 0.5) < 0.07 and r["length_coefficient"] > 1.5
    better = (rng.random(n) < 0.75).astype(float)  # real quality, lengths irrelevant
    r = length_controlled_win_rate(better, model, base)
    assert abs(r["lc_win_rate"] - r["win_rate"]) < 0.05
    same = length_controlled_win_rate([1, 0, 0.5, 1], [10] * 4, [10] * 4)  # no length difference at all
    assert same["lc_win_rate"] == pytest.approx(0.625, abs=1e-3)


def test_conversation_file(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"turns": ["a", "b"]}) + "\n" + json.dumps({"turns": "a"}))
    with pytest.raises(LmforgeError, match="q.jsonl:2: field 'turns'"):
        read_conversations(p)
