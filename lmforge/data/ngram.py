"""The n-gram index behind the contamination check (13-gram default, as in the GPT-3 paper).

One index serves both ends: built once from the training data it flags evaluation examples (the
eval package calls `NGramIndex.longest_overlap`), and built from an evaluation set it removes
overlapping training documents (`decontaminate`). Words are lowercased runs of letters and digits,
so punctuation and case do not hide an overlap, and each CJK character is a word of its own
(`lmforge.data.words`, shared with dedup), so a Chinese n-gram is n characters. The index is a sorted array of 64-bit n-gram
hashes: membership for all n-grams of a text is one `np.searchsorted`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError, atomic_path
from lmforge.data.dedup import MinHasher
from lmforge.data.readers import Document

_NON_WORD = re.compile(r"[\W_]+")
_MERGE_EVERY = 4_000_000  # pending hashes before a merge into the sorted array (bounds memory)


def _canonical(text: str) -> str:
    return _NON_WORD.sub(" ", text.lower())


class NGramIndex:
    def __init__(self, hashes: np.ndarray, n: int = 13) -> None:
        self.hashes = hashes  # sorted, unique uint64
        self.n = n
        self._hasher = MinHasher(num_perm=1, shingle="word", ngram=n)

    @classmethod
    def build(cls, texts: Iterable[str], n: int = 13) -> NGramIndex:
        index = cls(np.zeros(0, dtype=np.uint64), n)
        pending: list[np.ndarray] = []
        size = 0
        for text in texts:
            h = index.ngram_hashes(text)
            pending.append(h)
            size += len(h)
            if size >= _MERGE_EVERY:
                index.hashes = np.unique(np.concatenate([index.hashes, *pending]))
                pending, size = [], 0
        index.hashes = np.unique(np.concatenate([index.hashes, *pending]))
        return index

    def __len__(self) -> int:
        return len(self.hashes)

    def ngram_hashes(self, text: str) -> np.ndarray:
        """Hashes of the text's word n-grams in order; empty when it has fewer than n words."""
        return self._hasher.combine(self._hasher.token_hashes(_canonical(text)), self.n)

    def matches(self, text: str) -> np.ndarray:
        """[number of n-grams] bool: which of the text's n-grams occur in the index."""
        h = self.ngram_hashes(text)
        if len(self.hashes) == 0 or len(h) == 0:
            return np.zeros(len(h), dtype=bool)
        pos = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        return self.hashes[pos] == h

    def contains(self, text: str) -> bool:
        return bool(self.matches(text).any())

    def longest_overlap(self, text: str) -> int:
        """Length in words of the longest run of consecutive indexed n-grams (0 when none)."""
        run = _longest_true_run(self.matches(text))
        return run + self.n - 1 if run else 0

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.concatenate([np.array([self.n], dtype=np.uint64), self.hashes]))

    @classmethod
    def load(cls, path: str | Path) -> NGramIndex:
        try:
            arr = np.load(path)
        except (OSError, ValueError) as e:
            raise LmforgeError(f"{path}: not an n-gram index ({e})") from None
        return cls(arr[1:], int(arr[0]))


def _longest_true_run(mask: np.ndarray) -> int:
    if not mask.any():
        return 0
    edges = np.flatnonzero(np.diff(mask.view(np.int8), prepend=0, append=0))
    return int((edges[1::2] - edges[0::2]).max())


@dataclass
class ExampleOverlap:
    id: str
    ngrams: int  # n-grams in the example
    matched: int  # of them found in the training data
    longest_overlap: int  # words
    contaminated: bool

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def check_examples(
    index: NGramIndex, examples: Iterable[tuple[str, str]], min_overlap: int | None = None
) -> list[ExampleOverlap]:
    """Per (id, text): overlap with the index. Contaminated when the longest overlap reaches
    `min_overlap` words (default n: any shared n-gram)."""
    need = min_overlap or index.n
    out = []
    for ex_id, text in examples:
        m = index.matches(text)
        run = _longest_true_run(m)
        longest = run + index.n - 1 if run else 0
        out.append(ExampleOverlap(ex_id, len(m), int(m.sum()), longest, longest >= need))
    return out


def summarize(results: list[ExampleOverlap]) -> dict:
    bad = sum(r.contaminated for r in results)
    return {
        "examples": len(results),
        "contaminated": bad,
        "contaminated_fraction": bad / len(results) if results else 0.0,
        "too_short": sum(r.ngrams == 0 for r in results),
    }


def decontaminate(
    docs: Iterable[Document], eval_index: NGramIndex, removed: list[str] | None = None
) -> Iterator[Document]:
    """Training documents sharing no n-gram with the evaluation index; ids of the others go to `removed`."""
    for doc in docs:
        if eval_index.contains(doc.text):
            if removed is not None:
                removed.append(doc.id)
            continue
        yield doc
