"""Words of a text, the one definition behind MinHash shingles (dedup) and the n-gram index
(contamination): runs of bytes above the space for text written with spaces, and one token per
character for CJK ideographs, kana and hangul, so a Chinese paragraph is a sequence of characters,
not one giant "word". Text without CJK characters takes the plain whitespace path unchanged.
"""

from __future__ import annotations

import re

import numpy as np

# Scripts written without spaces between words (ideographs and kana): counted per character by the
# quality filters' word statistics too (`NO_SPACE_RANGES`).
NO_SPACE_RANGES = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F))
# n-grams also split hangul into syllables: Korean words are long compared with a 13-word window.
CJK_RANGES = NO_SPACE_RANGES + ((0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF))


def char_class(ranges: tuple[tuple[int, int], ...]) -> str:
    """The ranges as the inside of a regex character class."""
    return "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in ranges)


_CJK = re.compile(f"[{char_class(CJK_RANGES)}]")


def whitespace_spans(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of the runs of bytes above the space in UTF-8 `data` (one SIMD
    comparison; tab, newline and the other control bytes separate words too)."""
    word = data > 32
    n = len(data)
    change = np.empty(n + 1, dtype=bool)  # word/space boundaries, the text's ends included
    change[0], change[n] = word[0] if n else False, word[-1] if n else False
    np.not_equal(word[1:], word[:-1], out=change[1:n])
    edges = np.flatnonzero(change)
    return edges[0::2], edges[1::2]


def token_spans(text: str, data: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets, in order, of the words of `text` in its UTF-8 bytes `data`:
    whitespace-separated runs, with every CJK character a token of its own (also when it touches
    Latin letters or punctuation, which stay tokens of their own)."""
    if data is None:
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    if not _CJK.search(text):
        return whitespace_spans(data)
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    cjk = np.zeros(len(cps), dtype=bool)
    for lo, hi in CJK_RANGES:
        cjk |= (cps >= lo) & (cps <= hi)
    size = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)  # UTF-8 bytes per character
    ends = np.cumsum(size)
    starts = ends - size
    # the other words: whitespace runs once the CJK characters' bytes count as spaces
    masked = data.copy()
    masked[np.repeat(cjk, size)] = 32
    w_starts, w_ends = whitespace_spans(masked)
    all_starts = np.concatenate([w_starts, starts[cjk]])
    order = np.argsort(all_starts, kind="stable")
    return all_starts[order], np.concatenate([w_ends, ends[cjk]])[order]


def token_strings(text: str) -> list[str]:
    """The words of `token_spans` as strings (slow; for tests and for other libraries)."""
    data = text.encode("utf-8")
    return [data[s:e].decode("utf-8") for s, e in zip(*token_spans(text))]
