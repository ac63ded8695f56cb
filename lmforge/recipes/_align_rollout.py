"""Sampling and scoring completions for the RL methods of `lmforge align` (GRPO, PPO, RLAIF): a
rollout with the lmforge generator, rewards from a reward model or the task's verifiable reward."""

from __future__ import annotations

import dataclasses

import torch

from lmforge.train import align_data as D
from lmforge.train.align_config import AlignRL


def rollout(model, tok, prompts: list[str], rc: AlignRL, seed: int, device):
    """Sample completions with the lmforge generator (KV cache) -> (texts, ids, attn, resp masks)."""
    from lmforge.infer.generate import generate

    model.eval()
    prompt_ids = [tok.encode(p) for p in prompts]
    stop = [tok.eos_id] if tok.eos_id is not None else []
    new = generate(
        model, prompt_ids, max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, seed=seed, stop_token_ids=stop
    )
    model.train()
    completions = []
    for row in new.tolist():
        cut = row.index(tok.eos_id) + 1 if tok.eos_id in row else len(row)
        completions.append(row[:cut])
    rows = [p + c for p, c in zip(prompt_ids, completions)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_id or 0, dtype=torch.long)
    attn, resp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompt_ids, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attn[i, : len(p) + len(c)] = 1
        resp[i, len(p) : len(p) + len(c)] = 1
    texts = [tok.decode([t for t in c if t != tok.eos_id]) for c in completions]
    return texts, ids.to(device), attn.to(device), resp.to(device)


def _score(texts, records, reward_model, ids, attn, task_reward):
    if reward_model is not None:
        with torch.no_grad():
            return reward_model(ids, attn).float()
    return torch.tensor([task_reward(t, r["answer"]) for t, r in zip(texts, records)], device=ids.device)


def shaped_arithmetic_reward(completion: str, answer: str) -> float:
    """Exact answer 1.0; right first digit 0.3; any leading digit 0.1 (a signal for a fresh model)."""
    exact = D.arithmetic_reward(completion, answer)
    text = completion.lstrip()
    return exact or (0.3 if text[:1] == answer[:1] else 0.1 if text[:1].isdigit() else 0.0)


def _mean_reward(model, tok, held, rc, reward_model, device, seed=1234) -> float:
    greedy = dataclasses.replace(rc, temperature=0.0)
    texts, ids, attn, _ = rollout(model, tok, [r["prompt"] for r in held], greedy, seed, device)
    return float(_score(texts, held, reward_model, ids, attn, shaped_arithmetic_reward).mean())


def label_pairs_with_judge(model, tok, prompts: list[str], judge, principles: str, rc: AlignRL, device) -> list[dict]:
    from lmforge.eval.judge import judge_pairwise

    a, *_ = rollout(model, tok, prompts, rc, 1, device)
    b, *_ = rollout(model, tok, prompts, rc, 2, device)
    questions = [f"{p}\n(Judge by these principles: {principles})" for p in prompts]
    records = judge_pairwise(judge, questions, a, b)
    pairs = []
    for prompt, x, y, rec in zip(prompts, a, b, records):
        win = rec["scores"]["win"]
        if win != 0.5 and x != y:
            chosen, rejected = (x, y) if win > 0.5 else (y, x)
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs
