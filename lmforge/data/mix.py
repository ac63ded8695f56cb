"""Stage 5, mix: sources with weights (target shares of the training tokens).

A source whose weight asks for more tokens than it has is repeated (whole epochs, then a seeded
random subset for the fraction); one with fewer is a seeded random subset. The realised token
shares are reported, since whole documents never hit a target exactly.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from lmforge.common import LmforgeError


@dataclass
class MixItem:
    key: Hashable  # whatever identifies the document to the caller
    source: str
    tokens: int


def _subset(items: Sequence[MixItem], budget: float, rng: np.random.Generator) -> list[MixItem]:
    """A seeded random subset whose tokens first reach `budget`."""
    chosen, total = [], 0
    for i in rng.permutation(len(items)):
        if total >= budget:
            break
        chosen.append(items[i])
        total += items[i].tokens
    return chosen


def mix(
    items: Sequence[MixItem],
    weights: dict[str, float] | None,
    seed: int = 0,
    total_tokens: int | None = None,
    shuffle: bool = True,
) -> tuple[list[Hashable], dict]:
    """-> (document keys in training order, repeats included; report per source).

    No weights: every document once (the natural mix). `total_tokens` defaults to the corpus size.
    """
    by_source: dict[str, list[MixItem]] = {}
    for it in items:
        by_source.setdefault(it.source, []).append(it)
    available = {s: sum(it.tokens for it in its) for s, its in by_source.items()}
    total = total_tokens if total_tokens is not None else sum(available.values())
    shares = _target_shares(weights, available)
    rng = np.random.default_rng(seed)
    chosen: list[MixItem] = []
    report: dict[str, dict] = {}
    for source in sorted(by_source):
        its = by_source[source]
        target = shares[source] * total
        ratio = target / available[source] if available[source] else 0.0
        epochs = int(ratio + 1e-9)  # float shares: 0.9999999 of a source is all of it
        picked = list(its) * epochs
        rest = target - epochs * available[source]
        if rest > 1e-6 * available[source]:
            picked += _subset(its, rest, rng)
        chosen += picked
        report[source] = {
            "documents": len(its),
            "tokens_available": available[source],
            "weight": shares[source],
            "epochs": round(ratio, 4),
            "tokens": sum(it.tokens for it in picked),
            "documents_out": len(picked),
        }
    realised = sum(r["tokens"] for r in report.values()) or 1
    for r in report.values():
        r["share"] = round(r["tokens"] / realised, 4)
    order = [chosen[i].key for i in (rng.permutation(len(chosen)) if shuffle else range(len(chosen)))]
    return order, report


AUTO = "auto"


def resolve_weights(
    weights: dict[str, float] | str | None, corpus_weights: dict[str, float] | None
) -> dict[str, float] | None:
    """`mix.weights` -> the weights to mix with (None: the natural mix). "auto" is `corpus_weights`:
    the built-in corpus's own weights on it, None (natural) on user inputs, whose source names the
    recipe cannot know. A mapping is the user's: a source in it with no documents stays an error."""
    if isinstance(weights, str):
        if weights != AUTO:
            raise LmforgeError(f"mix.weights: {weights!r} is not {AUTO!r}, null or a mapping of source: weight")
        return corpus_weights
    if weights is not None and not isinstance(weights, dict):
        raise LmforgeError(f"mix.weights: expected {AUTO!r}, null or a mapping of source: weight, got {weights!r}")
    return weights


def check_sources(weights: dict[str, float], present: Iterable[str]) -> None:
    """Every source the weights name must have documents (a typo must not drop a source silently)."""
    present = set(present)
    unknown = sorted(set(weights) - present)
    if unknown:
        raise LmforgeError(
            f"mix.weights: no documents from source(s) {', '.join(unknown)} "
            f"(sources present: {', '.join(sorted(present)) or 'none'})"
        )


def _target_shares(weights: dict[str, float] | None, available: dict[str, int]) -> dict[str, float]:
    if not weights:
        total = sum(available.values()) or 1
        return {s: n / total for s, n in available.items()}
    check_sources(weights, available)
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise LmforgeError(f"mix.weights must be >= 0 with a positive sum, got {weights}")
    total = sum(weights.values())
    return {s: weights.get(s, 0.0) / total for s in available}
