"""Metrics, each a small pure function: exact match and token F1 (SQuAD normalisation), BLEU and
chrF (sacrebleu), ROUGE-L (rouge-score), the unbiased pass@k estimator, bootstrap intervals.

Per-example scores are kept with every prediction so any subset (e.g. the examples that are not
contaminated) can be re-aggregated without rerunning the model.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation and articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """Bag-of-words F1 against the best-matching reference (SQuAD)."""
    return max(_f1(prediction, r) for r in references)


def _ref_streams(references: Sequence[Sequence[str]]) -> list[list[str]]:
    """sacrebleu wants one stream per reference slot; pad examples with fewer refs by repeating their first."""
    width = max(len(r) for r in references)
    return [[r[i] if i < len(r) else r[0] for r in references] for i in range(width)]


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenizer, exp smoothing), 0-100."""
    import sacrebleu

    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), _ref_streams(references)).score)


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus chrF (sacrebleu defaults: char 6-grams, beta 2), 0-100."""
    import sacrebleu

    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_chrf(list(predictions), _ref_streams(references)).score)


_ROUGE = None


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure (rouge-score, Porter stemming) against the best reference, 0-1."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer, tokenizers

        # An explicit tokenizer (the default one) skips an absl log call that installs a root log handler.
        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=True))
    return max(_ROUGE.score(r, prediction)["rougeL"].fmeasure for r in references)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def bootstrap_ci(
    values: Sequence[float], num_samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(num_samples, len(x)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def extract_answer(text: str, pattern: str | None) -> str:
    """The first group (or whole match) of `pattern` in `text`; the stripped text when no pattern/match."""
    if pattern:
        m = re.search(pattern, text, flags=re.MULTILINE)
        if m:
            return (m.group(1) if m.groups() else m.group(0)).strip()
    return text.strip()


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")
