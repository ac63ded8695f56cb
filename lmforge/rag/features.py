"""Hashed word and character-trigram features: the input of the bi-encoder's `text: "trigrams"` mode.

DSSM (Huang et al. 2013, "Learning deep structured semantic models for web search") reads a text as the
bag of its words' letter trigrams ("#when#" -> #wh, whe, hen, en#): morphological variants and split
identifiers (`scanString`, `scan_string`, `scanstring`) share most trigrams, and a word never seen in
training still has known trigrams. Here each term (split as BM25's, terms.py, but with stopwords kept:
`when`, `get`, `all` name functions) contributes itself and its trigrams, hashed into `buckets` rows
of an embedding table (the hashing trick: no vocabulary to build or store, so the encoder folder holds
only weights). CRC32 is stable across processes and machines, unlike Python's salted `hash`.
"""

from __future__ import annotations

import zlib

from lmforge.rag.terms import terms


def term_features(term: str, buckets: int) -> list[int]:
    """The bucket of the word itself (its own row: exact matches stay strong) and of its trigrams."""
    word = f"#{term}#"
    grams = [word[i : i + 3] for i in range(len(word) - 2)] if len(term) > 1 else []
    # "w:" / "g:" keep the word "abc" and the trigram "abc" apart
    return [zlib.crc32(f"w:{term}".encode()) % buckets] + [zlib.crc32(f"g:{g}".encode()) % buckets for g in grams]


def text_features(text: str, buckets: int, max_terms: int) -> list[int]:
    """Features of a text's first `max_terms` search terms (a passage's head holds its file, title and
    first lines); never empty (an empty text gets bucket 0, so every row can be pooled)."""
    cache: dict[str, list[int]] = {}
    out: list[int] = []
    for t in terms(text, "bigram", stopwords=False)[:max_terms]:
        if t not in cache:
            cache[t] = term_features(t, buckets)
        out += cache[t]
    return out or [0]
