"""Built-in post-training tasks (no downloads), generated and checkable so every alignment method
shows a real effect on a tiny model in minutes:

* arithmetic: "12+7=" with a verifiable answer "19" (GRPO/PPO reward by exact checking);
* format preferences: the chosen answer follows a written rule (wrapped in brackets, ends with a
  period), the rejected one breaks it (DPO, reward model, RLAIF principles);
* docstring preferences: a function signature with its own docstring's first sentence (chosen) vs
  the sentence of another function (rejected), from the built-in SFT set.

Plus the encoding shared by the preference methods: prompt + response (+ EOS), right-padded, with a
response mask so only the response's log-probabilities count.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from lmforge.common import LmforgeError, read_jsonl

_WORDS = ["red", "blue", "green", "cat", "dog", "tree", "river", "stone", "cloud", "light", "apple", "house"]


def arithmetic_prompts(n: int, seed: int = 0, max_operand: int = 20) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        out.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return out


def arithmetic_reward(completion: str, answer: str) -> float:
    """1 for the exact answer (leading whitespace ignored, then a non-digit or the end), else 0."""
    text = completion.lstrip()
    if not text.startswith(answer):
        return 0.0
    rest = text[len(answer) :]
    return 1.0 if not rest or not rest[0].isdigit() else 0.0


def format_preference_pairs(n: int, seed: int = 0) -> list[dict]:
    """Principle: 'answer in brackets, ending with a period'."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = rng.choice(_WORDS)
        out.append({"prompt": f"Say {word}:", "chosen": f" [{word}].", "rejected": f" {word}"})
    return out


def docstring_preference_pairs(examples: list[dict], seed: int = 0) -> list[dict]:
    """examples: [{"prompt": signature, "response": sentence}] -> chosen/rejected pairs."""
    if len(examples) < 2:
        raise LmforgeError("docstring preferences need at least 2 examples")
    rng = random.Random(seed)
    out = []
    for i, ex in enumerate(examples):
        j = rng.randrange(len(examples) - 1)
        other = examples[j + (j >= i)]
        if other["response"] != ex["response"]:
            out.append({"prompt": ex["prompt"] + "\n", "chosen": ex["response"], "rejected": other["response"]})
    return out


def read_pairs(path: str | Path) -> list[dict]:
    """JSONL with prompt/chosen/rejected strings per line; errors name the line and the field."""
    return [
        _check_fields(where, rec, ("prompt", "chosen", "rejected")) for where, rec in read_jsonl(path, "pairs file")
    ]


def read_prompts(path: str | Path) -> list[dict]:
    """JSONL with prompt/answer strings per line (verifiable RL tasks)."""
    return [_check_fields(where, rec, ("prompt", "answer")) for where, rec in read_jsonl(path, "prompts file")]


def _check_fields(where: str, record: dict, keys: tuple[str, ...]) -> dict:
    for key in keys:
        if not isinstance(record.get(key), str):
            raise LmforgeError(f"{where}: field {key!r} must be a string")
    return record


def encode_responses(
    tokenizer, prompts: list[str], responses: list[str], max_len: int = 256, add_eos: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ids [B, T] (right-padded), attention_mask [B, T], response_mask [B, T]."""
    rows, masks = [], []
    for prompt, response in zip(prompts, responses):
        p = tokenizer.encode(prompt)
        r = tokenizer.encode(response) + ([tokenizer.eos_id] if add_eos and tokenizer.eos_id is not None else [])
        ids = (p + r)[:max_len]
        rows.append(ids)
        masks.append(([0] * len(p) + [1] * len(r))[:max_len])
    T = max(len(r) for r in rows)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    attn = torch.zeros(len(rows), T, dtype=torch.long)
    resp = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, : len(r)], attn[i, : len(r)], resp[i, : len(m)] = torch.tensor(r), 1, torch.tensor(m)
    return ids, attn, resp
