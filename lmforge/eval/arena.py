"""Arena ratings: pairwise battles between models -> Bradley-Terry ratings with bootstrap intervals,
online Elo for comparison, and a win-rate matrix (Chatbot Arena's method).

Battles come from a votes file (human votes: one JSON object per line with `model_a`, `model_b`,
`winner` in {"model_a", "model_b", "tie"}; lmsys's "tie (bothbad)" counts as a tie) or from an LLM
judge comparing the models' answers to a prompt set, every pair judged in both orders
(`judge.judge_pairwise`), so a judge's position bias cancels into a tie.

Bradley-Terry: P(i beats j) = sigmoid(theta_i - theta_j). A tie counts half a win to each side. The
maximum-likelihood thetas are found by Newton's method on the aggregated win counts (a K x K
problem, whatever the number of battles), batched over bootstrap replicates. `prior` adds that many
virtual ties to every pair: it keeps a model that never lost (or never won) finite and makes the
problem well posed when the comparison graph is not connected; 0 is the plain MLE. Ratings are on
the Elo scale, 1000 + 400 * theta / ln(10) with the thetas centred (a 400-point gap means 10:1 odds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError
from lmforge.common import read_jsonl as common_read_jsonl

SCALE = 400 / math.log(10)  # theta (natural log-odds) -> Elo points
BASE = 1000.0
WINNERS = ("model_a", "model_b", "tie")
_WINNER_ALIASES = {"a": "model_a", "b": "model_b", "tie (bothbad)": "tie", "both_bad": "tie", "draw": "tie"}

# A small general prompt set for `lmforge arena` without --prompts (answers a base model can attempt).
BUILTIN_PROMPTS = [
    "Explain what a hash table is in one paragraph.",
    "Write a Python function that returns the factorial of n.",
    "What is the difference between a list and a tuple in Python?",
    "Give three tips for writing readable code.",
    "Summarize what a compiler does.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Why do programs use version control?",
    "Explain recursion to a beginner.",
    "What does the `with` statement do in Python?",
    "Write a docstring for a function that merges two sorted lists.",
    "What is a unit test?",
    "Describe how binary search works.",
]


@dataclass
class Battle:
    model_a: str
    model_b: str
    winner: str  # "model_a" | "model_b" | "tie"
    prompt_id: str = ""
    len_a: int | None = None  # answer lengths (characters), for length control
    len_b: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def parse_battle(row: dict, where: str) -> Battle:
    """One vote row -> Battle; a missing field or an unknown winner is an error naming both."""
    for f in ("model_a", "model_b", "winner"):
        if f not in row:
            raise LmforgeError(f"{where}: missing field {f!r} (a vote needs model_a, model_b, winner)")
        if not isinstance(row[f], str) or not row[f]:
            raise LmforgeError(f"{where}: field {f!r} must be a non-empty string, got {row[f]!r}")
    winner = _WINNER_ALIASES.get(row["winner"].lower(), row["winner"].lower())
    if winner not in WINNERS:
        raise LmforgeError(f"{where}: field 'winner' is {row['winner']!r}; expected one of {', '.join(WINNERS)}")
    if row["model_a"] == row["model_b"]:
        raise LmforgeError(f"{where}: model_a and model_b are both {row['model_a']!r}")
    lengths = []
    for f in ("len_a", "len_b"):
        v = row.get(f)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise LmforgeError(f"{where}: field {f!r} must be a non-negative integer, got {v!r}")
        lengths.append(v)
    return Battle(row["model_a"], row["model_b"], winner, str(row.get("prompt_id", row.get("id", ""))), *lengths)


def read_votes(path: str | Path) -> list[Battle]:
    return [parse_battle(row, where) for where, row in common_read_jsonl(path, "votes file")]


def model_names(battles: Sequence[Battle]) -> list[str]:
    return sorted({b.model_a for b in battles} | {b.model_b for b in battles})


def _indices(battles: Sequence[Battle], models: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index of A, index of B, A's score 1 / 0.5 / 0) per battle."""
    pos = {m: i for i, m in enumerate(models)}
    a = np.array([pos[b.model_a] for b in battles], dtype=np.int64)
    b = np.array([pos[b.model_b] for b in battles], dtype=np.int64)
    s = np.array([{"model_a": 1.0, "model_b": 0.0, "tie": 0.5}[x.winner] for x in battles])
    return a, b, s


def win_counts(a: np.ndarray, b: np.ndarray, s: np.ndarray, k: int, weights: np.ndarray | None = None) -> np.ndarray:
    """W[..., i, j]: wins of i over j (ties half each). `weights` [R, n]: a count per battle and
    replicate (bootstrap), giving W of shape [R, K, K]."""
    w = np.ones((1, len(a))) if weights is None else np.atleast_2d(weights)
    out = np.zeros((w.shape[0], k * k))
    for flat, score in ((a * k + b, s), (b * k + a, 1.0 - s)):
        for r in range(w.shape[0]):
            out[r] += np.bincount(flat, weights=w[r] * score, minlength=k * k)
    out = out.reshape(-1, k, k)
    return out[0] if weights is None else out


def fit_bt(wins: np.ndarray, prior: float = 0.1, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Bradley-Terry MLE thetas (centred, natural log-odds) from win counts [K, K] or [R, K, K]."""
    W = np.asarray(wins, dtype=np.float64)
    single = W.ndim == 2
    W = W[None] if single else W
    k = W.shape[-1]
    W = W + (prior / 2) * (1 - np.eye(k))  # `prior` virtual ties per pair: half a win each way
    N = W + np.swapaxes(W, 1, 2)
    theta = np.zeros(W.shape[:2])
    centre = np.full((k, k), 1.0 / k)  # adds the constraint sum(theta) = 0 to the singular Laplacian
    for _ in range(max_iter):
        p = 1 / (1 + np.exp(-(theta[:, :, None] - theta[:, None, :])))
        grad = (W - N * p).sum(-1)  # d loglik / d theta_i
        c = N * p * (1 - p)
        lap = np.eye(k) * c.sum(-1)[:, :, None] - c  # minus the Hessian (a graph Laplacian)
        try:
            step = np.linalg.solve(lap + centre, grad[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = np.einsum("rij,rj->ri", np.linalg.pinv(lap + centre), grad)
        step = np.clip(step, -2.0, 2.0)  # damping: far from the optimum a full Newton step can overshoot
        theta = np.clip(theta + step, -30, 30)  # a model that never won (prior 0) runs off to -inf: kept finite
        theta -= theta.mean(-1, keepdims=True)
        if np.abs(step).max() < tol:
            break
    return theta[0] if single else theta


def fit_bt_style(
    battles: Sequence[Battle], models: Sequence[str], prior: float = 0.1, max_iter: int = 100
) -> tuple[np.ndarray, float]:
    """Style control (Chatbot Arena's, with length as the style): P(A beats B) = sigmoid(theta_A -
    theta_B + gamma * z), z the battle's normalised length difference (len_a - len_b) / (len_a +
    len_b) divided by its standard deviation, fitted jointly by Newton's method (ties half a win;
    `prior` as a ridge on the thetas, in place of fit_bt's virtual ties). Returns the centred thetas,
    the ratings with the length effect held out, and gamma, the log-odds a standard deviation longer
    answer buys. Every battle needs len_a and len_b."""
    missing = [i for i, x in enumerate(battles) if x.len_a is None or x.len_b is None]
    if missing:
        raise LmforgeError(f"style control needs answer lengths (len_a, len_b); battle {missing[0]} has none")
    a, b, s = _indices(battles, models)
    la = np.array([x.len_a for x in battles], dtype=np.float64)
    lb = np.array([x.len_b for x in battles], dtype=np.float64)
    z = (la - lb) / np.maximum(la + lb, 1.0)
    z = z / z.std() if z.std() > 0 else z
    k, n = len(models), len(battles)
    X = np.zeros((n, k + 1))
    X[np.arange(n), a], X[np.arange(n), b], X[:, k] = 1.0, -1.0, z
    ridge = np.diag([max(prior, 1e-6)] * k + [1e-6])  # also pins the thetas' common shift
    w = np.zeros(k + 1)
    for _ in range(max_iter):
        p = 1 / (1 + np.exp(-np.clip(X @ w, -30, 30)))
        grad = X.T @ (s - p) - ridge @ w
        step = np.linalg.solve(X.T @ (X * (p * (1 - p))[:, None]) + ridge, grad)
        w += np.clip(step, -2.0, 2.0)
        if np.abs(step).max() < 1e-10:
            break
    return w[:k] - w[:k].mean(), float(w[k])


def log_likelihood(theta: np.ndarray, wins: np.ndarray, prior: float = 0.0) -> float:
    """The objective fit_bt maximises (the ties-as-half-wins BT log-likelihood plus the prior's ties)."""
    k = len(theta)
    W = np.asarray(wins, dtype=np.float64) + (prior / 2) * (1 - np.eye(k))
    d = theta[:, None] - theta[None, :]
    return float((W * -np.logaddexp(0, -d)).sum())


def to_elo_scale(theta: np.ndarray) -> np.ndarray:
    return BASE + SCALE * np.asarray(theta)


def bootstrap_bt(
    battles: Sequence[Battle],
    models: Sequence[str],
    rounds: int = 1000,
    seed: int = 0,
    prior: float = 0.1,
    confidence: float = 0.95,
    chunk: int = 250,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of each model's rating (Elo scale): battles resampled with
    replacement `rounds` times, each replicate fitted. The same seed gives the same intervals."""
    a, b, s = _indices(battles, models)
    rng = np.random.default_rng(seed)
    n, k, samples = len(battles), len(models), []
    for start in range(0, rounds, chunk):
        r = min(chunk, rounds - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=r).astype(np.float64)  # battle counts
        samples.append(to_elo_scale(fit_bt(win_counts(a, b, s, k, weights), prior)))
    ratings = np.concatenate(samples)
    alpha = (1 - confidence) / 2
    return np.quantile(ratings, alpha, axis=0), np.quantile(ratings, 1 - alpha, axis=0)


def elo_ratings(
    battles: Sequence[Battle], models: Sequence[str], k_factor: float = 4.0, seed: int | None = None
) -> np.ndarray:
    """Online Elo (each battle updates both ratings by k_factor * (score - expected)), in the
    battles' order or shuffled by `seed`. Order-dependent, unlike BT: shown for comparison."""
    a, b, s = _indices(battles, models)
    order = np.arange(len(battles)) if seed is None else np.random.default_rng(seed).permutation(len(battles))
    r = np.full(len(models), BASE)
    for i in order:
        expected = 1 / (1 + 10 ** ((r[b[i]] - r[a[i]]) / 400))
        r[a[i]] += k_factor * (s[i] - expected)
        r[b[i]] -= k_factor * (s[i] - expected)
    return r


def win_rate_matrix(battles: Sequence[Battle], models: Sequence[str]) -> np.ndarray:
    """M[i, j]: the fraction of i's battles against j that i won (ties half); NaN where they never met."""
    a, b, s = _indices(battles, models)
    W = win_counts(a, b, s, len(models))
    N = W + W.T
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(N > 0, W / np.where(N > 0, N, 1), np.nan)


def arena_table(
    battles: Sequence[Battle], rounds: int = 1000, seed: int = 0, prior: float = 0.1, elo_k: float = 4.0
) -> list[dict]:
    """One row per model, best first: BT rating and its bootstrap interval, Elo, battles, win rate."""
    if not battles:
        raise LmforgeError("no battles to rate")
    models = model_names(battles)
    if len(models) < 2:
        raise LmforgeError(f"an arena needs at least two models, the battles name only {models}")
    a, b, s = _indices(battles, models)
    rating = to_elo_scale(fit_bt(win_counts(a, b, s, len(models)), prior))
    low, high = bootstrap_bt(battles, models, rounds, seed, prior) if rounds > 0 else (rating, rating)
    elo = elo_ratings(battles, models, elo_k, seed)
    rows = []
    for i, m in enumerate(models):
        mine = (a == i) | (b == i)
        score = np.where(a == i, s, 1 - s)[mine]
        rows.append(
            {
                "model": m,
                "rating": float(rating[i]),
                "ci_low": float(low[i]),
                "ci_high": float(high[i]),
                "elo": float(elo[i]),
                "battles": int(mine.sum()),
                "win_rate": float(score.mean()) if mine.any() else float("nan"),
            }
        )
    rows.sort(key=lambda r: -r["rating"])
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return rows


def format_table(rows: Sequence[dict]) -> str:
    lines = [
        f"{'rank':>4}  {'model':<28} {'BT rating':>9}  {'95% CI':>15}  {'Elo':>7}  {'battles':>7}  {'win rate':>8}"
    ]
    style = all("style_rating" in r for r in rows)
    if style:
        lines[0] += f"  {'style-ctrl':>10}"
    for r in rows:
        ci = f"{r['ci_low']:.0f}..{r['ci_high']:.0f}"
        lines.append(
            f"{r['rank']:>4}  {r['model']:<28} {r['rating']:>9.1f}  {ci:>15}  {r['elo']:>7.1f}  "
            f"{r['battles']:>7}  {r['win_rate']:>8.3f}" + (f"  {r['style_rating']:>10.1f}" if style else "")
        )
    return "\n".join(lines)


def plot_win_rates(battles: Sequence[Battle], order: Sequence[str], path: str | Path) -> None:
    """The win-rate matrix (row beats column) as a heat map, models in `order` (best first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.common import atomic_path

    m = win_rate_matrix(battles, order)
    size = 1.6 + 0.7 * len(order)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(m, cmap="RdBu", vmin=0, vmax=1)
    ax.set_xticks(range(len(order)), order, rotation=45, ha="right")
    ax.set_yticks(range(len(order)), order)
    for i in range(len(order)):
        for j in range(len(order)):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("opponent")
    ax.set_ylabel("model")
    ax.set_title("win rate of row against column (ties half)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- battles by a judge


def judge_battles(
    judge, prompts: Sequence[str], answers: Mapping[str, Sequence[str]], ids: Sequence[str] | None = None
) -> tuple[list[Battle], list[dict]]:
    """Every pair of models on every prompt, judged in both orders; the pair's score (mean of the
    two orders) decides: > 0.5 A wins, < 0.5 B wins, 0.5 (a tie, or the orders disagree) a tie.
    Returns the battles and the judge's records (verdicts, raw texts)."""
    from lmforge.eval.judge import judge_pairwise

    names = list(answers)
    ids = list(ids) if ids is not None else [str(i) for i in range(len(prompts))]
    battles, records = [], []
    for i, ma in enumerate(names):
        for mb in names[i + 1 :]:
            for rec in judge_pairwise(judge, prompts, answers[ma], answers[mb], ids):
                score = rec["scores"]["win"]
                winner = "model_a" if score > 0.5 else "model_b" if score < 0.5 else "tie"
                battles.append(Battle(ma, mb, winner, rec["id"], len(rec["answer_a"]), len(rec["answer_b"])))
                records.append({"model_a": ma, "model_b": mb, **rec})
    return battles, records


def reference_battles(
    scores: Mapping[str, Sequence[float]], ids: Sequence[str], lengths: Mapping[str, Sequence[int]] | None = None
) -> list[Battle]:
    """Battles from per-prompt scores of each model's answer (e.g. against a reference answer):
    every pair of models on every prompt, the higher score wins, equal scores tie."""
    names = list(scores)
    battles = []
    for i, ma in enumerate(names):
        for mb in names[i + 1 :]:
            for k, pid in enumerate(ids):
                sa, sb = scores[ma][k], scores[mb][k]
                winner = "model_a" if sa > sb + 1e-12 else "model_b" if sb > sa + 1e-12 else "tie"
                la, lb = (lengths[ma][k], lengths[mb][k]) if lengths is not None else (None, None)
                battles.append(Battle(ma, mb, winner, pid, la, lb))
    return battles
