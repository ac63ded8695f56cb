"""Stage 3, quality filters: the Gopher rules (Rae et al. 2021, appendix A) and the C4 rules
(Raffel et al. 2020), each threshold a recipe field. A rejected document gets the name of the
first rule it failed; the stats report counts per rule.

Words: text written without spaces (Chinese, Japanese) counts each character as a word, so a
Chinese paragraph is not rejected as one giant word.

Scope: the rules were made for web prose and would reject nearly all code, so by default they (and
the language filter) apply to every prose document, i.e. every document not of kind "code" (source
files by extension, JSONL records with "kind": "code", the built-in corpus's code source; see
`lmforge.data.readers`). `filters.sources: [a, b]` applies them to exactly the sources named instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from lmforge.common import LmforgeError
from lmforge.data.langid import ACCURACY, detect_language, is_char_language, lingua_language
from lmforge.data.words import NO_SPACE_RANGES, char_class

_CJK = char_class(NO_SPACE_RANGES)
_WORDS = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_ALPHA = re.compile(r"[^\W\d_]")
_TERMINAL = (".", "!", "?", '"', "'", "\u3002", "\uff01", "\uff1f", "\u201d")
STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}  # Gopher's English stop words
C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies")


@dataclass
class FilterConfig:
    """Thresholds of the heuristic rules; `None` turns a rule off. Defaults are the papers' values."""

    sources: list[str] | None = None  # sources the rules apply to (None: every source's prose documents)
    languages: list[str] | None = None  # keep only these ISO 639-1 codes (None: all), detected by lingua
    min_language_score: float = 0.5  # lingua's confidence in the language, 0..1
    language_accuracy: str = "low"  # lingua's low (trigrams; fast) or high accuracy mode
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2  # English only
    max_dup_line_frac: float | None = 0.3
    max_dup_para_frac: float | None = 0.3
    max_dup_line_char_frac: float | None = 0.2
    max_dup_para_char_frac: float | None = 0.2
    max_top_ngram_char_frac: dict[int, float] = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    max_dup_ngram_char_frac: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    # C4
    c4_lorem_ipsum: bool = True
    c4_curly_brace: bool = True
    c4_javascript: bool = True
    c4_filter_lines: bool = False  # drop lines without terminal punctuation / under c4_min_words_per_line words
    c4_min_words_per_line: int = 3
    c4_min_sentences: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):  # `--set filters.sources=web` gives one string
            self.sources = [self.sources]
        if self.languages is not None:
            self.languages = [
                str(c).lower() for c in ([self.languages] if isinstance(self.languages, str) else self.languages)
            ]
        for code in self.languages or []:
            lingua_language(code)  # a code the detector does not know is an error now, not a silent drop
        if self.language_accuracy not in ACCURACY:
            raise LmforgeError(
                f"filters.language_accuracy: {self.language_accuracy!r} is not one of {', '.join(ACCURACY)}"
            )
        # YAML keys of nested maps arrive as strings
        self.max_top_ngram_char_frac = {int(k): float(v) for k, v in (self.max_top_ngram_char_frac or {}).items()}
        self.max_dup_ngram_char_frac = {int(k): float(v) for k, v in (self.max_dup_ngram_char_frac or {}).items()}

    def applies_to(self, source: str, kind: str = "prose") -> bool:
        """Whether the language filter and the quality rules see a document of this source and kind."""
        return source in self.sources if self.sources is not None else kind != "code"


def words_of(text: str) -> list[str]:
    return _WORDS.findall(text)


def _above(value: float, limit: float | None) -> bool:
    return limit is not None and value > limit


def _below(value: float, limit: float | None) -> bool:
    return limit is not None and value < limit


def gopher_quality(text: str, words: list[str], lang: str, cfg: FilterConfig) -> str | None:
    n = len(words)
    if _below(n, cfg.min_words):
        return "gopher_min_words"
    if _above(n, cfg.max_words):
        return "gopher_max_words"
    if not is_char_language(lang):  # mean word length is meaningless when a word is a character
        mean = sum(len(w) for w in words) / max(n, 1)
        if _below(mean, cfg.min_mean_word_length) or _above(mean, cfg.max_mean_word_length):
            return "gopher_mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    if _above(symbols / max(n, 1), cfg.max_symbol_word_ratio):
        return "gopher_symbol_word_ratio"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines:
        bullets = sum(ln.lstrip().startswith(("\u2022", "-", "*", "\u25cf", "\u25e6")) for ln in lines)
        if _above(bullets / len(lines), cfg.max_bullet_lines_ratio):
            return "gopher_bullet_lines"
        ellipsis = sum(ln.rstrip().endswith(("...", "\u2026")) for ln in lines)
        if _above(ellipsis / len(lines), cfg.max_ellipsis_lines_ratio):
            return "gopher_ellipsis_lines"
    alpha = sum(1 for w in words if _ALPHA.search(w))
    if _below(alpha / max(n, 1), cfg.min_alpha_words_ratio):
        return "gopher_alpha_words"
    if lang == "en" and cfg.min_stop_words is not None:
        if len(STOP_WORDS.intersection(w.lower() for w in words)) < cfg.min_stop_words:
            return "gopher_stop_words"
    return None


def _dup_fractions(parts: list[str]) -> tuple[float, float]:
    """(share of parts that repeat an earlier one, share of characters in those repeats)."""
    seen: set[str] = set()
    dup, dup_chars = 0, 0
    for p in parts:
        if p in seen:
            dup += 1
            dup_chars += len(p)
        seen.add(p)
    total_chars = sum(len(p) for p in parts)
    return dup / max(len(parts), 1), dup_chars / max(total_chars, 1)


def gopher_repetition(text: str, words: list[str], cfg: FilterConfig) -> str | None:
    lines = [ln for ln in text.split("\n") if ln.strip()]
    paras = [p for p in re.split(r"\n{2,}", text) if p.strip()]
    line_frac, line_chars = _dup_fractions(lines)
    para_frac, para_chars = _dup_fractions(paras)
    if _above(line_frac, cfg.max_dup_line_frac):
        return "gopher_dup_lines"
    if _above(para_frac, cfg.max_dup_para_frac):
        return "gopher_dup_paragraphs"
    if _above(line_chars, cfg.max_dup_line_char_frac):
        return "gopher_dup_line_chars"
    if _above(para_chars, cfg.max_dup_para_char_frac):
        return "gopher_dup_paragraph_chars"
    if not (cfg.max_top_ngram_char_frac or cfg.max_dup_ngram_char_frac) or not words:
        return None
    grams = _NGrams(words)
    for n, limit in sorted(cfg.max_top_ngram_char_frac.items()):
        if _above(grams.top_char_frac(n), limit):
            return f"gopher_top_{n}gram"
    for n, limit in sorted(cfg.max_dup_ngram_char_frac.items()):
        if _above(grams.dup_char_frac(n), limit):
            return f"gopher_dup_{n}gram"
    return None


class _NGrams:
    """Word n-gram statistics with numpy: words -> ids -> one uint64 key per n-gram position."""

    def __init__(self, words: list[str]) -> None:
        vocab: dict[str, int] = {}
        self.ids = np.array([vocab.setdefault(w, len(vocab)) for w in words], dtype=np.uint64) + np.uint64(1)
        self.lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self.total = max(int(self.lens.sum()), 1)
        self._keys = {1: self.ids}

    def keys(self, n: int) -> np.ndarray:
        """[len(words) - n + 1] keys; equal keys are equal n-grams (up to 64-bit collisions)."""
        if n not in self._keys:
            prev = self.keys(n - 1)
            with np.errstate(over="ignore"):
                self._keys[n] = prev[:-1] * np.uint64(0x9E3779B97F4A7C15) + self.ids[n - 1 :]
        return self._keys[n]

    def top_char_frac(self, n: int) -> float:
        """Characters in all occurrences of the most frequent n-gram (the first seen, on ties) / all."""
        keys = self.keys(n)
        if len(keys) == 0:
            return 0.0
        _, first, counts = np.unique(keys, return_index=True, return_counts=True)
        best = np.flatnonzero(counts == counts.max())
        i = int(first[best].min())
        count = int(counts.max())
        return count * int(self.lens[i : i + n].sum()) / self.total if count > 1 else 0.0

    def dup_char_frac(self, n: int) -> float:
        """Characters of the words inside a repeated (not first) occurrence of any n-gram / all."""
        keys = self.keys(n)
        if len(keys) == 0:
            return 0.0
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        repeats = np.flatnonzero(first[inverse] != np.arange(len(keys)))
        if len(repeats) == 0:
            return 0.0
        size = len(self.ids) + 1
        depth = np.cumsum(np.bincount(repeats, minlength=size) - np.bincount(repeats + n, minlength=size))
        return int(self.lens[depth[:-1] > 0].sum()) / self.total


def c4_lines(text: str, cfg: FilterConfig) -> str:
    """C4's line-level cleaning: keep lines ending in terminal punctuation with enough words."""
    kept = []
    for line in text.split("\n"):
        s = line.strip()
        low = s.lower()
        if not s.endswith(_TERMINAL) or len(words_of(s)) < cfg.c4_min_words_per_line:
            continue
        if (cfg.c4_javascript and "javascript" in low) or any(p in low for p in C4_POLICY):
            continue
        kept.append(line)
    return "\n".join(kept)


def c4_document(text: str, cfg: FilterConfig) -> str | None:
    low = text.lower()
    if cfg.c4_lorem_ipsum and "lorem ipsum" in low:
        return "c4_lorem_ipsum"
    if cfg.c4_curly_brace and "{" in text:
        return "c4_curly_brace"
    if cfg.c4_javascript and not cfg.c4_filter_lines and "javascript" in low:
        return "c4_javascript"
    if cfg.c4_min_sentences is not None:
        sentences = len(re.findall(r"[.!?\u3002\uff01\uff1f]+(?:\s|$)", text))
        if sentences < cfg.c4_min_sentences:
            return "c4_min_sentences"
    return None


def apply_filters(text: str, source: str, cfg: FilterConfig, kind: str = "prose") -> tuple[str, str | None, str]:
    """-> (possibly line-cleaned text, rejecting rule or None, language code: "code" for code that
    no filter looks at)."""
    in_scope = cfg.applies_to(source, kind)
    if not in_scope and kind == "code":
        return text, None, "code"
    lang, score = detect_language(text, cfg.languages, cfg.language_accuracy)
    if not in_scope:
        return text, None, lang
    if cfg.languages is not None and (lang not in cfg.languages or score < cfg.min_language_score):
        return text, "language", lang
    if cfg.c4_filter_lines:
        text = c4_lines(text, cfg)
        if not text.strip():
            return text, "c4_no_lines_left", lang
    rule = c4_document(text, cfg)
    if rule is None:
        words = words_of(text)
        rule = gopher_quality(text, words, lang, cfg) or gopher_repetition(text, words, cfg)
    return text, rule, lang
