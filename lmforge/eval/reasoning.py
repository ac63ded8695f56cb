"""Reasoning at test time: spend more samples per question to answer better, on a generated
multi-step arithmetic task with worked steps.

    greedy              one deterministic chain
    self_consistency    n sampled chains, the majority answer (Wang et al., 2022)
    best_of_n           n sampled chains, the one a verifier scores highest
    beam_search         a beam over reasoning steps: every beam samples `expand` next steps, a process
                        reward scores each partial chain, the best `width` go on (step-level search)

The task: "Q: 3 + 4 * 2" answered one reduction per line ("4 * 2 = 8", "3 + 8 = 11") and "A: 11"
(multiplication first, then left to right). `step_reward` is a rule-based process reward (the task is
verifiable step by step): a step earns 1 when it is a legal next reduction with the right
arithmetic, so partial chains are scored without the final answer. Any `lm` with `generate(prompts,
max_new_tokens, stop, temperature, seed)` works (LocalLM, EndpointLM, a scripted stub); compute is
counted in generated tokens (the lm's tokenizer when it has one, else words).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_STEP = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_ANSWER = re.compile(r"A:\s*(-?\d+)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass
class ArithmeticConfig:
    num_examples: int = 50
    min_ops: int = 2
    max_ops: int = 3
    max_operand: int = 9
    ops: str = "+-*"
    num_fewshot: int = 3
    seed: int = 0


def solve(tokens: Sequence) -> list[tuple[int, str, int, int]]:
    """The worked steps (a, op, b, result) of an expression given as [n, op, n, op, n, ...]:
    every multiplication first, left to right, then additions and subtractions left to right."""
    tokens, steps = list(tokens), []
    for ops in ("*", "+-"):
        i = 1
        while i < len(tokens):
            if tokens[i] in ops:
                a, op, b = tokens[i - 1], tokens[i], tokens[i + 1]
                r = _OPS[op](a, b)
                steps.append((a, op, b, r))
                tokens[i - 1 : i + 2] = [r]
            else:
                i += 2
    return steps


def format_solution(steps: Sequence[tuple[int, str, int, int]]) -> str:
    return "".join(f"{a} {op} {b} = {r}\n" for a, op, b, r in steps) + f"A: {steps[-1][3]}\n"


def make_problem(rng: random.Random, cfg: ArithmeticConfig) -> dict:
    n_ops = rng.randint(cfg.min_ops, cfg.max_ops)
    tokens: list = [rng.randint(1, cfg.max_operand)]
    for _ in range(n_ops):
        tokens += [rng.choice(cfg.ops), rng.randint(1, cfg.max_operand)]
    steps = solve(tokens)
    expr = " ".join(str(t) for t in tokens)
    return {"question": f"Q: {expr}\n", "answer": steps[-1][3], "solution": format_solution(steps)}


def arithmetic_task(cfg: ArithmeticConfig | None = None) -> tuple[list[dict], str]:
    """(problems, few-shot prefix): deterministic for cfg.seed; the few-shot examples are other problems."""
    cfg = cfg or ArithmeticConfig()
    rng = random.Random(cfg.seed)
    shots = [make_problem(rng, cfg) for _ in range(cfg.num_fewshot)]
    prefix = "".join(s["question"] + s["solution"] + "\n" for s in shots)
    seen = {s["question"] for s in shots}
    problems = []
    while len(problems) < cfg.num_examples:
        p = make_problem(rng, cfg)
        if p["question"] not in seen:  # a question never repeats its own worked example
            seen.add(p["question"])
            problems.append({**p, "id": f"arith/{len(problems)}", "prompt": prefix + p["question"]})
    return problems, prefix


def extract_answer(text: str) -> int | None:
    m = _ANSWER.search(text)
    return int(m.group(1)) if m else None


def _question_tokens(prompt: str) -> list:
    """The last question's expression as [n, op, n, ...] ([] when the prompt holds none)."""
    q = prompt.rfind("Q:")
    if q < 0:
        return []
    found = re.findall(r"\d+|[+\-*]", prompt[q + 2 :].split("\n", 1)[0])
    return [int(t) if t.isdigit() else t for t in found]


def _reduces(tokens: list, a: int, op: str, b: int) -> int | None:
    """Where `a op b` is a legal next reduction of `tokens` (multiplications before additions and
    subtractions, those left to right), or None."""
    for i in range(1, len(tokens) - 1, 2):
        if tokens[i] == op and tokens[i - 1] == a and tokens[i + 1] == b:
            if op == "*" or ("*" not in tokens and i == 1):
                return i
    return None


def step_reward(prompt: str, steps: Sequence[str]) -> list[float]:
    """Per step 1.0 or 0.0: a step earns 1 when it is a legal next reduction of the question's
    expression as the earlier steps left it and its arithmetic is right; a final "A: v" earns 1 when
    the expression is fully reduced to v. A wrong step stays wrong and so does what follows it."""
    tokens, rewards, broken = _question_tokens(prompt), [], False
    for line in steps:
        m = _STEP.match(line)
        if m and not broken:
            a, op, b, r = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            i = _reduces(tokens, a, op, b)
            ok = i is not None and _OPS[op](a, b) == r
            if ok:
                tokens[i - 1 : i + 2] = [r]
        elif line.strip().startswith("A:") and not broken:
            ok = len(tokens) == 1 and extract_answer(line) == tokens[0]
        else:
            ok = False
        broken = broken or not ok
        rewards.append(float(ok))
    return rewards


def chain_score(prompt: str, steps: Sequence[str]) -> float:
    """A chain is as good as its worst step (one wrong step spoils the answer); 1.0 when empty."""
    return min(step_reward(prompt, steps), default=1.0)


def step_verifier(prompt: str, completion: str) -> float:
    """best_of_n's verifier from the process reward: the worst step, and 0 without an answer."""
    lines = [s for s in completion.splitlines() if s.strip()]
    return chain_score(prompt, lines) if extract_answer(completion) is not None else 0.0


def count_tokens(lm, texts: Sequence[str]) -> int:
    tok = getattr(lm, "tokenizer", None)
    return sum(len(tok.encode(t)) if tok is not None else len(t.split()) for t in texts)


@dataclass
class Outcome:
    answers: list[int | None]
    tokens: int  # generated tokens, all samples of all questions


def _samples(lm, prompts, n, temperature, seed, max_new_tokens):
    flat = [p for p in prompts for _ in range(n)]
    outs = lm.generate(flat, max_new_tokens=max_new_tokens, stop=["\n\n", "Q:"], temperature=temperature, seed=seed)
    return [outs[i * n : (i + 1) * n] for i in range(len(prompts))], count_tokens(lm, outs)


def greedy(lm, prompts: Sequence[str], max_new_tokens: int = 64) -> Outcome:
    groups, tokens = _samples(lm, prompts, 1, 0.0, None, max_new_tokens)
    return Outcome([extract_answer(g[0]) for g in groups], tokens)


def majority(answers: Sequence[int | None]) -> int | None:
    """The most common answer (None when no sample answered); a tie goes to the one seen first."""
    counts = Counter(a for a in answers if a is not None)
    return max(counts, key=lambda a: (counts[a], -answers.index(a))) if counts else None


def vote(groups: Sequence[Sequence[str]], tokens: int) -> Outcome:
    """Self-consistency's choice among each question's samples: the majority answer."""
    return Outcome([majority([extract_answer(s) for s in g]) for g in groups], tokens)


def pick(
    prompts: Sequence[str], groups: Sequence[Sequence[str]], tokens: int, verifier: Callable[[str, str], float]
) -> Outcome:
    """Best-of-n's choice: the sample the verifier scores highest (the first of the best)."""
    picked = []
    for p, g in zip(prompts, groups):
        scores = [verifier(p, s) for s in g]
        picked.append(extract_answer(g[scores.index(max(scores))]))
    return Outcome(picked, tokens)


def self_consistency(
    lm, prompts: Sequence[str], n: int, temperature: float = 0.8, seed: int = 0, max_new_tokens: int = 64
) -> Outcome:
    return vote(*_samples(lm, prompts, n, temperature, seed, max_new_tokens))


def best_of_n(
    lm,
    prompts: Sequence[str],
    n: int,
    verifier: Callable[[str, str], float] = step_verifier,
    temperature: float = 0.8,
    seed: int = 0,
    max_new_tokens: int = 64,
) -> Outcome:
    return pick(prompts, *_samples(lm, prompts, n, temperature, seed, max_new_tokens), verifier)


def beam_search(
    lm,
    prompts: Sequence[str],
    width: int = 2,
    expand: int = 2,
    reward: Callable[[str, Sequence[str]], float] = chain_score,
    temperature: float = 0.8,
    seed: int = 0,
    max_steps: int = 8,
    step_tokens: int = 16,
) -> Outcome:
    """Step-level beam search: each live beam samples `expand` next lines (stop at a newline), every
    extended chain is scored by `reward(prompt, steps)`, the best `width` survive (stable: on equal
    scores the earlier sample wins). A beam ends at its "A:" line; the best finished chain answers."""
    beams = [[(1.0, [])] for _ in prompts]  # per question: (score, steps)
    finished: list[list[tuple[float, list[str]]]] = [[] for _ in prompts]
    tokens = 0
    for depth in range(max_steps):
        jobs = [(q, steps) for q, bs in enumerate(beams) for _, steps in bs]
        if not jobs:
            break
        flat = [prompts[q] + "".join(s + "\n" for s in steps) for q, steps in jobs for _ in range(expand)]
        outs = lm.generate(
            flat, max_new_tokens=step_tokens, stop=["\n"], temperature=temperature, seed=seed + 1000 * depth
        )
        tokens += count_tokens(lm, outs)
        candidates: list[list[tuple[float, list[str]]]] = [[] for _ in prompts]
        for j, (q, steps) in enumerate(jobs):
            for out in outs[j * expand : (j + 1) * expand]:
                line = out.strip().splitlines()[0] if out.strip() else ""
                chain = [*steps, line]
                candidates[q].append((reward(prompts[q], chain), chain))
        for q, cands in enumerate(candidates):
            cands.sort(key=lambda c: -c[0])
            live = []
            for c in cands[:width]:
                (finished[q] if c[1][-1].startswith("A:") or depth == max_steps - 1 else live).append(c)
            beams[q] = live
    answers = []
    for done in finished:
        best = max(done, key=lambda c: c[0]) if done else None
        answers.append(extract_answer(best[1][-1]) if best else None)
    return Outcome(answers, tokens)


def accuracy(outcome: Outcome, problems: Sequence[dict]) -> float:
    return sum(a == p["answer"] for a, p in zip(outcome.answers, problems)) / max(1, len(problems))


def compute_table(
    lm,
    problems: Sequence[dict],
    budgets: Sequence[int] = (1, 2, 4, 8),
    temperature: float = 0.8,
    seed: int = 0,
    beams: Sequence[tuple[int, int]] = ((1, 2), (2, 2), (2, 4)),
) -> list[dict]:
    """Accuracy against generated tokens per question, for every method and budget."""
    prompts = [p["prompt"] for p in problems]
    n_q = max(1, len(problems))
    rows = []

    def add(method: str, budget: str, out: Outcome) -> None:
        rows.append(
            {"method": method, "budget": budget, "accuracy": accuracy(out, problems), "tokens": out.tokens / n_q}
        )

    add("greedy", "1", greedy(lm, prompts))
    for n in budgets:  # both methods choose among the same samples: each is charged for all of them
        groups, tokens = _samples(lm, prompts, n, temperature, seed, 64)
        add("self_consistency", f"n={n}", vote(groups, tokens))
        add("best_of_n", f"n={n}", pick(prompts, groups, tokens, step_verifier))
    for width, expand in beams:
        out = beam_search(lm, prompts, width=width, expand=expand, temperature=temperature, seed=seed)
        add("beam_search", f"width={width},expand={expand}", out)
    return rows


def format_rows(rows: Sequence[dict]) -> str:
    lines = [f"{'method':<18} {'budget':<18} {'accuracy':>8} {'tokens/question':>16}"]
    lines += [f"{r['method']:<18} {r['budget']:<18} {r['accuracy']:>8.3f} {r['tokens']:>16.1f}" for r in rows]
    return "\n".join(lines)
