"""BM25 (Lucene's variant, k1=1.5, b=0.75) over pre-tokenised chunks, through bm25s (sparse matrices of
precomputed term scores: a query is a sum of a few rows, not a pass over every document)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError
from lmforge.rag.terms import require


class Bm25:
    def __init__(self, retriever, num_docs: int) -> None:
        self.retriever, self.num_docs = retriever, num_docs

    @classmethod
    def build(cls, corpus_terms: list[list[str]], k1: float = 1.5, b: float = 0.75) -> Bm25:
        if not corpus_terms:
            raise LmforgeError("BM25 needs at least one chunk")
        bm25s = require("bm25s")
        retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
        # A chunk with no term at all (punctuation only) still needs a row: bm25s's empty token does that.
        retriever.index(corpus_terms, show_progress=False)
        return cls(retriever, len(corpus_terms))

    def save(self, folder: str | Path) -> None:
        self.retriever.save(str(folder))

    @classmethod
    def load(cls, folder: str | Path, num_docs: int) -> Bm25:
        bm25s = require("bm25s")
        return cls(bm25s.BM25.load(str(folder)), num_docs)

    def scores(self, query_terms: list[str]) -> np.ndarray:
        """BM25 score of every chunk for one query (terms the index has never seen score nothing)."""
        known = [t for t in query_terms if t in self.retriever.vocab_dict]
        if not known:
            return np.zeros(self.num_docs, dtype=np.float32)
        return np.asarray(self.retriever.get_scores(known), dtype=np.float32)
