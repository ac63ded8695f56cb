"""What the edge-cloud router (routing.py) knows about one request, and the learned router.

A query is described by a dict of named numbers (plus the prompt text for n-grams):

    answer features   from the local answer's per-token log-probabilities (`answer_features`):
                      mean_logprob, min_logprob, entropy, log_tokens
    agreement         self-consistency: the share of k answers sampled from the local model whose
                      final answer (`answer_key`) equals the local answer's
    prompt features   from the prompt text alone (`prompt_features`): its length in characters and
                      words, how many digits and numbers it holds, its longest number; and hashed
                      character n-grams (`LearnedRouter.ngram_dims` buckets, counts log-scaled)

`LearnedRouter` is an L2-regularised logistic regression over any of these, fitted by Newton's
method with the penalty chosen by k-fold cross-validation on the training queries. Its label is
whether the local answer should be kept: the local answer is right (trained on the local model
alone), or, when the fallback's answers are known too, the local answer is right or the fallback's
is wrong too (escalating would not help: RouteLLM's "does the strong model win" label).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError, atomic_write_json, read_json

ANSWER_FEATURES = ("mean_logprob", "min_logprob", "entropy", "log_tokens")
PROMPT_FEATURES = (
    "prompt_log_chars",
    "prompt_log_words",
    "prompt_log_digits",
    "prompt_log_numbers",
    "prompt_max_number",
)
ALL_FEATURES = (*ANSWER_FEATURES, "agreement", *PROMPT_FEATURES)
L2_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def token_entropy(logprob: float, alts: Sequence[tuple[int, float]] | None) -> float:
    """Entropy (nats) of one next-token distribution seen through its top alternatives (the chosen
    token included): their probabilities, plus the remaining mass as one bucket (a lower bound)."""
    probs = {t: math.exp(lp) for t, lp in (alts or [])}
    if not probs:
        probs = {None: math.exp(logprob)}
    p = np.array(list(probs.values()))
    rest = max(0.0, 1.0 - float(p.sum()))
    h = float(-(p * np.log(np.clip(p, 1e-30, None))).sum())
    return h - (rest * math.log(rest) if rest > 0 else 0.0)


def answer_features(entries: Sequence) -> dict[str, float]:
    """Confidence features of one answer from its (token, logprob, alternatives) entries."""
    lps = [float(lp) for _, lp, _ in entries if lp is not None]
    if not lps:  # an empty answer: nothing to trust
        return {"mean_logprob": -1e9, "min_logprob": -1e9, "entropy": 1e9, "log_tokens": 0.0}
    ents = [token_entropy(lp, alts) for _, lp, alts in entries if lp is not None]
    return {
        "mean_logprob": float(np.mean(lps)),
        "min_logprob": float(np.min(lps)),
        "entropy": float(np.mean(ents)),
        "log_tokens": math.log1p(len(lps)),
    }


def answer_key(text: str) -> str:
    """The final answer of a generated text, for comparing answers (self-consistency votes on the
    final answer, not the wording of the chain): its last number when it holds one, else the text
    lower-cased with whitespace collapsed and surrounding punctuation dropped."""
    numbers = _NUMBER.findall(text)
    if numbers:
        n = numbers[-1]
        return str(float(n)) if "." in n else str(int(n))
    return " ".join(text.lower().split()).strip(" .,;:!?\"'`")


def agreement(answer: str, samples: Sequence[str]) -> float:
    """The share of `samples` whose final answer is `answer`'s (1.0 when there are none to disagree)."""
    if not samples:
        return 1.0
    key = answer_key(answer)
    return sum(answer_key(s) == key for s in samples) / len(samples)


def prompt_features(prompt: str) -> dict[str, float]:
    numbers = _NUMBER.findall(prompt)
    return {
        "prompt_log_chars": math.log1p(len(prompt)),
        "prompt_log_words": math.log1p(len(prompt.split())),
        "prompt_log_digits": math.log1p(sum(c.isdigit() for c in prompt)),
        "prompt_log_numbers": math.log1p(len(numbers)),
        "prompt_max_number": math.log1p(max((abs(float(n)) for n in numbers), default=0.0)),
    }


def query(
    prompt: str = "", entries: Sequence | None = None, samples: Sequence[str] | None = None, answer: str = ""
) -> dict:
    """Everything a router may read about one request: the prompt, the answer's features (when its
    log-probability entries are given) and the samples' agreement with `answer` (when given)."""
    out: dict = {"prompt": prompt, **prompt_features(prompt)}
    if entries is not None:
        out.update(answer_features(entries))
    if samples is not None:
        out["agreement"] = agreement(answer, samples)
    return out


def ngram_counts(text: str, dims: int, n: tuple[int, int] = (1, 3)) -> np.ndarray:
    """Character n-grams hashed into `dims` buckets (crc32: stable across processes, unlike hash()),
    counts log-scaled."""
    v = np.zeros(dims)
    for k in range(n[0], n[1] + 1):
        for i in range(len(text) - k + 1):
            v[zlib.crc32(text[i : i + k].encode()) % dims] += 1
    return np.log1p(v)


def _newton(Z: np.ndarray, y: np.ndarray, l2: float, iters: int = 30) -> np.ndarray:
    """Weights (bias last) of L2-regularised logistic regression on Z (a column of ones last)."""
    w = np.zeros(Z.shape[1])
    reg = l2 * np.eye(Z.shape[1])
    reg[-1, -1] = 0  # the bias is not shrunk
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(Z @ w, -50, 50)))
        grad = Z.T @ (p - y) + reg @ w
        hess = Z.T @ (Z * (p * (1 - p))[:, None]) + reg
        step = np.linalg.solve(hess + 1e-9 * np.eye(len(w)), grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def _cv_loss(Z: np.ndarray, y: np.ndarray, l2: float, folds: int, seed: int) -> float:
    idx = np.random.default_rng(seed).permutation(len(y))
    loss = 0.0
    for f in range(folds):
        test = idx[f::folds]
        train = np.setdiff1d(idx, test)
        if y[train].min() == y[train].max():
            return math.inf
        p = 1 / (1 + np.exp(-np.clip(Z[test] @ _newton(Z[train], y[train], l2), -50, 50)))
        loss -= float(np.sum(y[test] * np.log(p + 1e-12) + (1 - y[test]) * np.log(1 - p + 1e-12)))
    return loss


@dataclass
class LearnedRouter:
    """P(keep the local answer) = sigmoid(w . standardized features + b)."""

    weights: list[float]
    bias: float
    mean: list[float]
    std: list[float]
    features: tuple[str, ...] = ANSWER_FEATURES
    ngram_dims: int = 0  # hashed character n-gram buckets of the prompt (0: none)
    ngram_n: tuple[int, int] = (1, 3)
    samples: int = 0  # "agreement": how many answers to sample per request, and at what temperature
    temperature: float = 0.7
    l2: float = 1.0
    label: str = "local_right"  # or "no_gain": local right or the fallback wrong too
    info: dict = field(default_factory=dict)  # how it was trained (task, split, held-out figures)

    def __post_init__(self) -> None:
        self.features, self.ngram_n = tuple(self.features), tuple(self.ngram_n)
        self.check(self.features, self.ngram_dims, self.ngram_n, self.samples)
        if not len(self.weights) == len(self.mean) == len(self.std) == len(self.features) + self.ngram_dims:
            raise LmforgeError(f"router features {self.features} (+{self.ngram_dims} n-grams) do not match its weights")

    @staticmethod
    def check(features: Sequence[str], ngram_dims: int, ngram_n: Sequence[int], samples: int) -> None:
        unknown = set(features) - set(ALL_FEATURES)
        if unknown:
            raise LmforgeError(f"unknown router features {sorted(unknown)}; known: {', '.join(ALL_FEATURES)}")
        if ("agreement" in features) != (samples > 0):
            raise LmforgeError("the agreement feature needs samples > 0 (and samples need that feature)")
        if ngram_dims < 0 or len(ngram_n) != 2 or not 1 <= ngram_n[0] <= ngram_n[1]:
            raise LmforgeError(f"bad n-gram settings: dims {ngram_dims}, n {tuple(ngram_n)}")

    @staticmethod
    def design(
        queries: Sequence[dict], features: Sequence[str], ngram_dims: int, ngram_n: tuple[int, int]
    ) -> np.ndarray:
        rows = []
        for q in queries:
            missing = [f for f in features if f not in q]
            if missing:
                raise LmforgeError(f"the router reads {missing}, which this query does not carry")
            row = [float(q[f]) for f in features]
            if ngram_dims:
                row += ngram_counts(q.get("prompt", ""), ngram_dims, ngram_n).tolist()
            rows.append(row)
        return np.array(rows, dtype=np.float64).reshape(len(rows), len(features) + ngram_dims)

    @classmethod
    def fit(
        cls,
        queries: Sequence[dict],
        keep: Sequence[bool],
        features: Sequence[str] = ANSWER_FEATURES,
        ngram_dims: int = 0,
        ngram_n: tuple[int, int] = (1, 3),
        l2: float | None = None,
        folds: int = 5,
        seed: int = 0,
        **kw,
    ) -> LearnedRouter:
        """Fit on `queries` (dicts from `query`) and whether each one's local answer is worth keeping;
        l2=None picks the penalty from L2_GRID by `folds`-fold cross-validated log-loss."""
        cls.check(features, ngram_dims, ngram_n, kw.get("samples", 0))
        X = cls.design(queries, features, ngram_dims, tuple(ngram_n))
        y = np.asarray(keep, dtype=np.float64)
        if len(X) < 2 or y.min() == y.max():
            raise LmforgeError(
                "a learned router needs examples whose local answer is worth keeping and some that are not"
            )
        mean, std = X.mean(0), X.std(0) + 1e-9
        Z = np.hstack([(X - mean) / std, np.ones((len(X), 1))])
        if l2 is None:
            k = min(folds, int(min(y.sum(), len(y) - y.sum())))
            l2 = min(L2_GRID, key=lambda c: _cv_loss(Z, y, c, k, seed)) if k >= 2 else 1.0
        w = _newton(Z, y, l2)
        return cls(w[:-1].tolist(), float(w[-1]), mean.tolist(), std.tolist(), tuple(features), ngram_dims,
                   tuple(ngram_n), l2=float(l2), **kw)  # fmt: skip

    def predict_many(self, queries: Sequence[dict]) -> np.ndarray:
        X = self.design(queries, self.features, self.ngram_dims, self.ngram_n)
        z = ((X - np.array(self.mean)) / np.array(self.std)) @ np.array(self.weights) + self.bias
        return 1 / (1 + np.exp(-np.clip(z, -50, 50)))

    def predict(self, q: dict) -> float:
        return float(self.predict_many([q])[0])

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, {**asdict(self), "features": list(self.features), "ngram_n": list(self.ngram_n)})

    @classmethod
    def load(cls, path: str | Path) -> LearnedRouter:
        data = read_json(path, "router file")
        if not isinstance(data, dict):
            raise LmforgeError(f"{path}: not a router file (a JSON object expected)")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise LmforgeError(f"{path}: not a router file ({e})") from None
        except LmforgeError as e:
            raise LmforgeError(f"{path}: {e}") from None
