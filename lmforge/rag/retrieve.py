"""Retrieval over a RagIndex: BM25, dense, or both fused by reciprocal rank fusion; optional reranking
of the fused candidates by a language model's log-likelihood of the query given the passage.

    hits = search(index, "what does `json.dumps` do?", top_k=5, mode="hybrid")
    for h in hits: print(h.rank, h.score, h.chunk.id)

RRF (Cormack et al. 2009): score(d) = sum over rankers of 1 / (k + rank of d), k = 60. It needs no
score calibration between BM25 (unbounded) and cosine (-1..1), which is why it is the default fusion.
It weighs both rankers alike, though: a weaker dense ranker drags a strong BM25 down. The convex
combination (Bruch et al. 2023, "An analysis of fusion functions for hybrid retrieval") keeps the
scores: alpha * dense + (1 - alpha) * BM25, each min-max normalised over its own candidates (a
candidate one ranker did not return scores its minimum there). Its alpha is tuned on a dev split
(`lmforge rag train-encoder` writes it beside the encoder, fusion.json, and an index built with that
encoder uses it), never on the questions it is measured on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmforge.common import LmforgeError
from lmforge.rag.chunking import Chunk
from lmforge.rag.index import RagIndex, indexed_text
from lmforge.rag.terms import terms

MODES = ("bm25", "dense", "hybrid")


@dataclass
class Hit:
    rank: int  # 1-based
    score: float
    chunk: Chunk

    def to_dict(self) -> dict:
        c = self.chunk
        return {
            "rank": self.rank,
            "score": round(float(self.score), 6),
            "id": c.id,
            "file": c.file,
            "record": c.record,
            "lines": [c.start_line, c.end_line],
            "title": c.title,
            "text": c.text,
        }


def rrf(rankings: list[list[int]], k: int = 60) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of ranked lists of ids -> [(id, fused score)], best first (ties: lower id)."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, start=1):
            fused[doc] = fused.get(doc, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))


FUSIONS = ("rrf", "convex")


def convex(sparse: list[tuple[int, float]], dense: list[tuple[int, float]], alpha: float) -> list[tuple[int, float]]:
    """alpha * min-max(dense) + (1 - alpha) * min-max(BM25) over the union of both candidate lists, best
    first (ties: lower id); a chunk missing from one list gets 0 (that list's minimum) from it."""

    def normalised(ranking: list[tuple[int, float]]) -> dict[int, float]:
        if not ranking:
            return {}
        lo, hi = min(s for _, s in ranking), max(s for _, s in ranking)
        return {i: (s - lo) / (hi - lo) if hi > lo else 1.0 for i, s in ranking}

    a, b = normalised(sparse), normalised(dense)
    fused = {i: (1 - alpha) * a.get(i, 0.0) + alpha * b.get(i, 0.0) for i in a.keys() | b.keys()}
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))


def _top(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Best k (index, score) of a score vector; chunks with score 0 (no shared term) are left out."""
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.lexsort((top, -scores[top]))]
    return [(int(i), float(scores[i])) for i in top if scores[i] > 0]


def bm25_rankings(index: RagIndex, queries: list[str], depth: int) -> list[list[tuple[int, float]]]:
    return [_top(index.bm25.scores(terms(q, index.settings.chinese)), depth) for q in queries]


def dense_rankings(
    index: RagIndex, queries: list[str], depth: int, backend: str = "auto"
) -> list[list[tuple[int, float]]]:
    q = index.embedder().embed(queries, kind="query")
    scores, idx = index.vector_index(backend).search(q, depth)
    return [[(int(i), float(s)) for i, s in zip(row_i, row_s) if i >= 0] for row_i, row_s in zip(idx, scores)]


def search_batch(
    index: RagIndex,
    queries: list[str],
    top_k: int = 5,
    mode: str = "hybrid",
    depth: int = 100,
    rrf_k: int = 60,
    reranker=None,
    rerank_depth: int = 20,
    backend: str = "auto",
    fusion: str | None = None,
    alpha: float | None = None,
) -> list[list[Hit]]:
    """Top `top_k` hits per query. `depth`: candidates each ranker contributes to the fusion.
    `reranker`: an lm with `loglikelihood` (lmforge.eval.lm) re-scoring the best `rerank_depth`.
    `fusion` / `alpha` (hybrid): None takes the index's (its encoder's fusion.json, else RRF)."""
    if mode not in MODES:
        raise LmforgeError(f"unknown retrieval mode {mode!r} (choose from {', '.join(MODES)})")
    if fusion is None:
        fusion, tuned = index.fusion()
        alpha = tuned if alpha is None else alpha
    if fusion not in FUSIONS:
        raise LmforgeError(f"unknown fusion {fusion!r} (choose from {', '.join(FUSIONS)})")
    if fusion == "convex" and (alpha is None or not 0.0 <= alpha <= 1.0):
        raise LmforgeError(f"convex fusion needs a weight alpha in [0, 1], got {alpha}")
    if top_k < 1:
        raise LmforgeError(f"--top-k must be >= 1, got {top_k}")
    if any(not q.strip() for q in queries):
        raise LmforgeError("the query is empty")
    depth = max(depth, top_k, rerank_depth if reranker is not None else 0)
    if mode == "bm25":
        ranked = bm25_rankings(index, queries, depth)
    elif mode == "dense":
        ranked = dense_rankings(index, queries, depth, backend)
    else:
        sparse, dense = bm25_rankings(index, queries, depth), dense_rankings(index, queries, depth, backend)
        if fusion == "convex":
            ranked = [convex(s, d, alpha) for s, d in zip(sparse, dense)]
        else:
            ranked = [rrf([[i for i, _ in s], [i for i, _ in d]], rrf_k) for s, d in zip(sparse, dense)]
    out = []
    for query, ranking in zip(queries, ranked):
        if reranker is not None:
            ranking = rerank(reranker, query, [index.chunks[i] for i, _ in ranking[:rerank_depth]], ranking)
        out.append([Hit(r, s, index.chunks[i]) for r, (i, s) in enumerate(ranking[:top_k], start=1)])
    return out


def search(index: RagIndex, query: str, top_k: int = 5, mode: str = "hybrid", **kw) -> list[Hit]:
    return search_batch(index, [query], top_k, mode, **kw)[0]


RERANK_PROMPT = "Passage: {passage}\nA question this passage answers:"


def rerank(lm, query: str, chunks: list[Chunk], ranking: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Query likelihood (UPR, Sachan et al. 2022): order candidates by log p(query | passage) under a
    language model, normalised per query token count (the same for all candidates of one query)."""
    if not chunks:
        return ranking
    requests = [(RERANK_PROMPT.format(passage=indexed_text(c)), " " + query) for c in chunks]
    scores = [ll for ll, _ in lm.loglikelihood(requests)]
    head = sorted(zip([i for i, _ in ranking[: len(chunks)]], scores), key=lambda kv: -kv[1])
    return head + ranking[len(chunks) :]
