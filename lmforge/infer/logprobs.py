"""Logprob entries for OpenAI-style `logprobs`: the chosen token's log-probability and the top-n
alternatives at a position, from logits; shared by the engine and the vision path of the server."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch


def logprob_entry(logits: torch.Tensor, token: int, top_n: int) -> tuple[int, float, list[tuple[int, float]]]:
    """(token, its logprob, the top_n alternatives [(token, logprob)]) from one position's logits [V]."""
    return logprob_entries(logits[None], [0], [token], [top_n])[0]


def logprob_entries(logits: torch.Tensor, rows: Seq[int], tokens: Seq[int], top_ns: Seq[int]) -> list:
    """logprob_entry for several rows of logits [B, V] at once: one softmax, one gather, one top-k."""
    logp = logits[list(rows)].log_softmax(-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    k = max(top_ns)
    top = logp.topk(k) if k else None
    ids, values = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
    return [
        (t, lp, list(zip(ids[i][:n], values[i][:n])) if n else [])
        for i, (t, lp, n) in enumerate(zip(tokens, chosen, top_ns))
    ]


def _entries(logits: torch.Tensor, tokens: list, top_n: int | None) -> list | None:
    """Logprob entries of tokens[i] from logits[i] (one row per token), or None when not asked."""
    if top_n is None or not tokens or tokens[0] is None:
        return None
    return logprob_entries(logits, range(len(tokens)), tokens, [top_n] * len(tokens))
