"""Test-time reasoning on the arithmetic task with a scripted solver that slips on a step with a
known probability: the worked solutions, the process reward, majority voting, and that
self-consistency, best-of-n with the step verifier and step-level beam search beat greedy as they
spend more tokens."""

import random
import re
import zlib

import pytest

from lmforge.eval.reasoning import (
    _OPS,
    ArithmeticConfig,
    arithmetic_task,
    beam_search,
    best_of_n,
    compute_table,
    extract_answer,
    greedy,
    majority,
    self_consistency,
    solve,
    step_reward,
    step_verifier,
)


class ScriptedSolver:
    """Works the last question of the prompt (continuing any steps already written after it); each
    step's result is off by 1 to 3 with probability `slip`. Greedy (temperature 0) slips on a fixed
    per-prompt draw, sampling on a draw per (prompt, seed, row)."""

    def __init__(self, slip: float = 0.3):
        self.slip = slip

    def generate(self, prompts, max_new_tokens=64, stop=(), temperature=0.0, seed=None):
        out = []
        for i, p in enumerate(prompts):
            key = p if temperature == 0 else f"{p}|{seed}|{i}"
            rng = random.Random(zlib.crc32(key.encode()))
            q = p.rfind("Q:")
            head, *given = p[q:].split("\n")
            tokens = [int(t) if t.isdigit() else t for t in head[2:].split()]
            given = [g for g in given if g.strip()]
            lines = []
            for k, (a, op, b, r) in enumerate(self._reduce(tokens, given, rng)):
                if k >= len(given):
                    lines.append(f"{a} {op} {b} = {r}")
            lines.append(f"A: {self.last}")
            text = "\n".join(lines) + "\n"
            if "\n" in stop:
                text = text.split("\n")[0]
            out.append(text)
        return out

    def _reduce(self, tokens, given, rng):
        steps, k = [], 0
        for ops in ("*", "+-"):
            i = 1
            while i < len(tokens):
                if tokens[i] in ops:
                    a, op, b = tokens[i - 1], tokens[i], tokens[i + 1]
                    if k < len(given):
                        r = int(re.search(r"= (-?\d+)", given[k]).group(1))
                    else:
                        r = _OPS[op](a, b) + (rng.choice((-3, -2, -1, 1, 2, 3)) if rng.random() < self.slip else 0)
                    k += 1
                    steps.append((a, op, b, r))
                    tokens[i - 1 : i + 2] = [r]
                else:
                    i += 2
        self.last = tokens[0]
        return steps


def test_worked_solutions_and_task():
    assert solve([3, "+", 4, "*", 2]) == [(4, "*", 2, 8), (3, "+", 8, 11)]
    assert solve([9, "-", 2, "-", 3]) == [(9, "-", 2, 7), (7, "-", 3, 4)]
    problems, prefix = arithmetic_task(ArithmeticConfig(num_examples=20, seed=1))
    again, _ = arithmetic_task(ArithmeticConfig(num_examples=20, seed=1))
    assert problems == again and len(problems) == 20
    assert all(p["prompt"].startswith(prefix) and p["question"] not in prefix for p in problems)
    assert all(extract_answer(p["solution"]) == p["answer"] for p in problems)


def test_process_reward():
    prompt = "Q: 3 + 4 * 2\n"
    assert step_reward(prompt, ["4 * 2 = 8", "3 + 8 = 11", "A: 11"]) == [1.0, 1.0, 1.0]
    assert step_reward(prompt, ["4 * 2 = 9", "3 + 9 = 12", "A: 12"]) == [0.0, 0.0, 0.0]  # wrong stays wrong
    assert step_reward(prompt, ["5 * 2 = 10"]) == [0.0]  # 5 is not in the problem
    assert step_reward(prompt, ["4 * 2 = 8", "A: 8"]) == [1.0, 0.0]  # answered before the end
    assert step_reward(prompt, ["3 + 4 = 7", "7 * 2 = 14"]) == [0.0, 0.0]  # addition before multiplication
    assert step_reward("Q: 9 - 2 + 3\n", ["2 + 3 = 5"]) == [0.0]  # not left to right
    assert step_reward("Q: 9 - 2 * 3 * 2\n", ["3 * 2 = 6", "2 * 6 = 12", "9 - 12 = -3", "A: -3"]) == [1.0] * 4
    assert step_verifier(prompt, "4 * 2 = 8\n3 + 8 = 11\n") == 0.0  # no answer line
    assert step_verifier(prompt, "4 * 2 = 8\n3 + 8 = 11\nA: 11\n") == 1.0


def test_majority_vote():
    assert majority([3, 4, 4, None, 3]) == 3  # tie: the first seen
    assert majority([None, 5, 6, 6]) == 6 and majority([None, None]) is None


@pytest.fixture(scope="module")
def task():
    return arithmetic_task(ArithmeticConfig(num_examples=40, seed=0))[0]


def test_more_samples_answer_better(task):
    lm, prompts = ScriptedSolver(0.3), [p["prompt"] for p in task]

    def acc(out):
        return sum(a == p["answer"] for a, p in zip(out.answers, task)) / len(task)

    g = greedy(lm, prompts)
    sc1, sc9 = self_consistency(lm, prompts, 1), self_consistency(lm, prompts, 9)
    bo8 = best_of_n(lm, prompts, 8)
    beam = beam_search(lm, prompts, width=2, expand=3)
    assert acc(g) < 0.75 and acc(sc9) > acc(sc1) + 0.1
    assert acc(bo8) >= 0.95 and acc(beam) >= 0.9  # beam: 3 first steps all slip with p 0.027
    assert sc9.tokens > 8 * sc1.tokens and beam.tokens > g.tokens
    assert self_consistency(lm, prompts, 9, seed=0).answers == sc9.answers  # seeded


def test_compute_table_rows(task):
    rows = compute_table(ScriptedSolver(0.3), task[:10], budgets=(1, 4), beams=((2, 2),))
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("greedy", "1"),
        ("self_consistency", "n=1"),
        ("best_of_n", "n=1"),
        ("self_consistency", "n=4"),
        ("best_of_n", "n=4"),
        ("beam_search", "width=2,expand=2"),
    ]
    assert all(0 <= r["accuracy"] <= 1 and r["tokens"] > 0 for r in rows)
