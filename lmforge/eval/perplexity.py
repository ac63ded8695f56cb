"""Perplexity and bits per byte, with sliding-window striding for texts longer than the context.

A window of `max_length` tokens moves `stride` tokens at a time; each window scores only the
tokens no earlier window scored, so every token is predicted once and (after the first window)
with at least `max_length - stride` tokens of context. A prefix token (bos, else eos) goes in
front so the text's first token is scored too, as lm-eval's rolling log-likelihood does.

    bits per byte = total NLL (nats) / ln 2 / UTF-8 bytes  (tokenizer-independent, comparable across models)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError


def windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) over the positions 1..n-1 of a sequence of n ids (index 0 is the
    prefix token, never a target)."""
    if stride <= 0 or stride > max_length:
        raise LmforgeError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    out, scored, begin = [], 1, 0
    while scored < n:
        end = min(begin + max_length + 1, n)  # +1: a window of L inputs predicts L targets
        out.append((begin, end, scored))
        scored, begin = end, begin + stride
    return out


@torch.inference_mode()
def token_nll(
    model, ids: Sequence[int], prefix_id: int, max_length: int, stride: int | None = None, batch_size: int = 8
) -> tuple[float, int]:
    """(sum of -log p over every token of `ids`, number of tokens) with sliding windows."""
    ids = [prefix_id] + list(ids)
    if len(ids) < 2:
        return 0.0, 0
    stride = stride or max_length
    device = next(model.parameters()).device
    spans = windows(len(ids), max_length, stride)
    total = 0.0
    # Windows of equal length run as one batch (all but the last usually are).
    for size in sorted({e - b for b, e, _ in spans}):
        group = [s for s in spans if s[1] - s[0] == size]
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            x = torch.tensor([ids[b:e] for b, e, _ in chunk], device=device)
            logp = F.log_softmax(model(x[:, :-1]).float(), dim=-1)
            nll = -logp.gather(-1, x[:, 1:, None])[..., 0]  # [b, size-1]: target j+1 given inputs <= j
            for row, (b, _, first) in enumerate(chunk):
                total += float(nll[row, first - b - 1 :].sum())
    return total, len(ids) - 1


def summarize(nll: float, tokens: int, n_bytes: int) -> dict[str, float]:
    return {
        "perplexity": math.exp(nll / tokens) if tokens else float("nan"),
        "nll_per_token": nll / tokens if tokens else float("nan"),
        "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else float("nan"),
        "tokens": tokens,
        "bytes": n_bytes,
    }


def text_perplexity(lm, texts: Sequence[tuple[str, str]], stride: int | None = None) -> tuple[dict, list[dict]]:
    """Perplexity of (id, text) documents scored independently -> (metrics, per-document records)."""
    records = []
    for doc_id, text in texts:
        ids = lm.tokenizer.encode(text)
        nll, n = token_nll(lm.model, ids, lm.prefix_id, lm.max_length, stride, lm.batch_size)
        records.append({"id": doc_id, "nll": nll, "tokens": n, "bytes": len(text.encode("utf-8")), "text": text[:200]})
    return aggregate(records), records


def aggregate(records: Sequence[dict]) -> dict[str, float]:
    return summarize(
        sum(r["nll"] for r in records), sum(r["tokens"] for r in records), sum(r["bytes"] for r in records)
    )


def shard_documents(data_dir: str | Path, split: str = "val", limit: int | None = None) -> list[np.ndarray]:
    """Token documents of a packed data split (`lmforge/data` shards: every document ends with EOS)."""
    from lmforge.data.shards import iter_shard_documents

    docs = []
    for doc in iter_shard_documents(data_dir, split):
        if len(doc):
            docs.append(doc.astype(np.int64))
        if limit and len(docs) >= limit:
            break
    return docs


def shard_perplexity(
    lm, data_dir: str | Path, split: str = "val", stride: int | None = None, limit: int | None = None
) -> tuple[dict, list[dict]]:
    """Perplexity over the documents of packed validation shards; bytes come from decoding the ids."""
    records = []
    for i, doc in enumerate(shard_documents(data_dir, split, limit)):
        ids = doc.tolist()
        nll, n = token_nll(lm.model, ids, lm.prefix_id, lm.max_length, stride, lm.batch_size)
        text = lm.tokenizer.decode(ids)
        records.append(
            {"id": f"{split}/{i}", "nll": nll, "tokens": n, "bytes": len(text.encode("utf-8")), "text": text[:200]}
        )
    return aggregate(records), records
