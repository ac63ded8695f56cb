"""Edge-cloud routing (`lmforge serve --fallback URL`): the local model answers every request; when its
confidence in that answer is low the request is sent on to a fallback OpenAI-compatible endpoint (a
larger model) and the fallback's answer is returned instead.

Confidence signals, from the engine's per-token log-probabilities of the local answer:
    mean_logprob   mean log p of the generated tokens; escalate when it is BELOW the threshold
    entropy        mean entropy (nats) of the next-token distributions, estimated from the top
                   ROUTE_TOP_LOGPROBS alternatives plus one bucket for the rest of the mass;
                   escalate when it is ABOVE the threshold
    learned        a logistic-regression router (`LearnedRouter`, a JSON file) trained on which
                   queries the local model got right; escalate when its P(right) is BELOW the threshold
A request with several choices (n > 1, or several prompts) is judged by its least confident choice.

Every non-streaming /v1 completion is routed; the decision is logged (logger `lmforge.serve.routing`,
and one JSON line per request to `route_log` when set) and reported in the response: header
`X-Lmforge-Route: local | fallback | local-fallback-failed` and a body field
`lmforge_route = {decision, signal, value, threshold}`. A fallback that fails (unreachable, an
error status) leaves the local answer in place, reported as `local-fallback-failed`. Streaming
requests are answered locally without routing (the decision needs the whole answer first) and say
so in the same header. `cost_quality_curve` measures a signal offline: accuracy against the
fraction of requests escalated, next to random routing at the same fraction.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError, get_logger, read_json

log = get_logger("lmforge.serve.routing")
SIGNALS = ("mean_logprob", "entropy", "learned")
ROUTE_TOP_LOGPROBS = 5  # alternatives per token the engine reports for the entropy estimate
HEADER = "X-Lmforge-Route"
FEATURES = ("mean_logprob", "min_logprob", "entropy", "log_tokens")
# mean log p below -1 (a typical token under e^-1 = 37%), entropy above 1 nat, P(right) below one half
DEFAULT_THRESHOLDS = {"mean_logprob": -1.0, "entropy": 1.0, "learned": 0.5}


@dataclass
class RouteConfig:
    fallback: str  # base URL of an OpenAI-compatible endpoint (with or without /v1)
    threshold: float | None = None  # None: the signal's DEFAULT_THRESHOLDS entry
    signal: str = "mean_logprob"
    fallback_model: str | None = None  # None: the first model the fallback lists
    fallback_api_key: str | None = None
    router: str | None = None  # signal "learned": the LearnedRouter JSON
    route_log: str | None = None  # append one JSON line per routed request
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if not self.fallback.startswith(("http://", "https://")):
            raise LmforgeError(f"--fallback must be an http(s) URL, got {self.fallback!r}")
        if self.signal not in SIGNALS:
            raise LmforgeError(f"--route-signal {self.signal!r}: choose from {', '.join(SIGNALS)}")
        if (self.signal == "learned") != (self.router is not None):
            raise LmforgeError("--route-signal learned needs --router FILE (and --router needs that signal)")
        if self.threshold is None:
            self.threshold = DEFAULT_THRESHOLDS[self.signal]
        if not math.isfinite(self.threshold):
            raise LmforgeError(f"--route-threshold must be a finite number, got {self.threshold}")


# ----------------------------------------------------------------------------- signals


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


def features(entries: Sequence) -> dict[str, float]:
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


@dataclass
class LearnedRouter:
    """P(the local answer is right) = sigmoid(w . standardized features + b), fitted by Newton's
    method on L2-regularised logistic loss."""

    weights: list[float]
    bias: float
    mean: list[float]
    std: list[float]
    features: tuple[str, ...] = FEATURES

    @classmethod
    def fit(cls, feats: Sequence[dict], correct: Sequence[bool], l2: float = 1e-2, iters: int = 50) -> LearnedRouter:
        X = np.array([[f[k] for k in FEATURES] for f in feats], dtype=np.float64)
        y = np.asarray(correct, dtype=np.float64)
        if len(X) < 2 or y.min() == y.max():
            raise LmforgeError("a learned router needs examples the local model got right and wrong")
        mean, std = X.mean(0), X.std(0) + 1e-9
        Z = np.hstack([(X - mean) / std, np.ones((len(X), 1))])
        w = np.zeros(Z.shape[1])
        reg = l2 * np.eye(Z.shape[1])
        reg[-1, -1] = 0  # the bias is not shrunk
        for _ in range(iters):
            p = 1 / (1 + np.exp(-Z @ w))
            grad = Z.T @ (p - y) + reg @ w
            hess = Z.T @ (Z * (p * (1 - p))[:, None]) + reg
            step = np.linalg.solve(hess + 1e-9 * np.eye(len(w)), grad)
            w -= step
            if np.abs(step).max() < 1e-10:
                break
        return cls(w[:-1].tolist(), float(w[-1]), mean.tolist(), std.tolist())

    def predict(self, feats: dict) -> float:
        x = (np.array([feats[k] for k in self.features]) - np.array(self.mean)) / np.array(self.std)
        return float(1 / (1 + np.exp(-(x @ np.array(self.weights) + self.bias))))

    def save(self, path: str | Path) -> None:
        from lmforge.common import atomic_write_json

        atomic_write_json(path, {**self.__dict__, "features": list(self.features)})

    @classmethod
    def load(cls, path: str | Path) -> LearnedRouter:
        data = read_json(path, "router file")
        try:
            router = cls(**{**data, "features": tuple(data["features"])})
        except (TypeError, KeyError) as e:
            raise LmforgeError(f"{path}: not a router file ({e})") from None
        if set(router.features) - set(FEATURES) or not (
            len(router.weights) == len(router.mean) == len(router.std) == len(router.features)
        ):
            raise LmforgeError(f"{path}: router features {router.features} do not match its weights")
        return router


# ----------------------------------------------------------------------------- the server side


@dataclass
class Decision:
    route: str  # "local" | "fallback" | "local-fallback-failed"
    value: float  # the signal's value (of the least confident choice)

    def info(self, cfg: RouteConfig) -> dict:
        return {"decision": self.route, "signal": cfg.signal, "value": self.value, "threshold": cfg.threshold}


class Router:
    def __init__(self, cfg: RouteConfig):
        self.cfg = cfg
        self.learned = LearnedRouter.load(cfg.router) if cfg.router else None
        base = cfg.fallback.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self._model = cfg.fallback_model
        self.counts = {"local": 0, "fallback": 0, "local-fallback-failed": 0}

    def value(self, entries: Sequence) -> float:
        f = features(entries)
        return self.learned.predict(f) if self.learned is not None else f[self.cfg.signal]

    def escalate(self, value: float) -> bool:
        return value > self.cfg.threshold if self.cfg.signal == "entropy" else value < self.cfg.threshold

    def decide(self, per_choice_entries: Sequence[Sequence]) -> Decision:
        values = [self.value(e) for e in per_choice_entries]
        worst = max(values) if self.cfg.signal == "entropy" else min(values)
        return Decision("fallback" if self.escalate(worst) else "local", worst)

    def probe(self, subs: list) -> list:
        """The submissions with log-probabilities asked of the engine (the signal needs them);
        `trim` takes back out what the client did not ask for."""
        return [replace(s, logprobs=max(s.logprobs or 0, ROUTE_TOP_LOGPROBS)) for s in subs]

    @staticmethod
    def trim(results: list[dict], asked: Sequence[int | None]) -> list[dict]:
        out = []
        for r, k in zip(results, asked):
            if k is None:
                entries = []
            else:
                entries = [(t, lp, None if alts is None else list(alts)[:k]) for t, lp, alts in r["logprobs"]]
            out.append({**r, "logprobs": entries})
        return out

    async def _fallback_model(self, client) -> str:
        if self._model is None:
            r = await client.get(f"{self.base}/models", headers=self._headers())
            r.raise_for_status()
            data = r.json().get("data") or []
            if not data:
                raise LmforgeError(f"{self.base}: the fallback serves no models")
            self._model = data[0]["id"]
        return self._model

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.cfg.fallback_api_key}"} if self.cfg.fallback_api_key else {}

    async def forward(self, kind: str, body: dict) -> dict:
        import httpx

        path = "/chat/completions" if kind == "chat" else "/completions"
        async with httpx.AsyncClient(timeout=self.cfg.timeout) as client:
            body = {**body, "model": await self._fallback_model(client), "stream": False}
            r = await client.post(self.base + path, json=body, headers=self._headers())
            r.raise_for_status()
            return r.json()

    async def respond(self, job, results: list[dict], local: Callable[[list[dict]], dict]):
        """The response for a job (responses.Job) the local model answered (`results`, from the
        probing submissions): the local one, or the fallback's; either carries the decision."""
        from fastapi.responses import JSONResponse

        kind, subs = job.kind, job.subs
        decision = self.decide([r["logprobs"] for r in results])
        body = None
        if decision.route == "fallback":
            try:
                body = await self.forward(kind, job.req.model_dump(mode="json", exclude_unset=True))
            except Exception as e:  # the local answer stands; the failure is reported, not hidden
                log.warning("fallback %s failed (%s: %s); answering locally", self.base, type(e).__name__, e)
                decision.route = "local-fallback-failed"
        if body is None:
            body = local(self.trim(results, [s.logprobs for s in subs]))
        self.record(decision, kind)
        body["lmforge_route"] = decision.info(self.cfg)
        return JSONResponse(body, headers={HEADER: decision.route})

    def record(self, decision: Decision, kind: str) -> None:
        self.counts[decision.route] += 1
        log.info(
            "route %s: %s=%.4f threshold %g -> %s",
            kind,
            self.cfg.signal,
            decision.value,
            self.cfg.threshold,
            decision.route,
        )
        if self.cfg.route_log:
            line = json.dumps({"time": time.time(), "kind": kind, **decision.info(self.cfg)})
            with open(self.cfg.route_log, "a", encoding="utf-8") as f:
                f.write(line + "\n")


# ----------------------------------------------------------------------------- offline evaluation


def cost_quality_curve(
    values: Sequence[float],
    local_correct: Sequence[bool],
    fallback_correct: Sequence[bool],
    higher_is_confident: bool = True,
    fractions: Sequence[float] = tuple(i / 10 for i in range(11)),
) -> list[dict]:
    """Accuracy when the least confident fraction f of queries goes to the fallback, for each f,
    next to random routing's expected accuracy at the same f; `threshold` is the signal's value at
    the cut (what --route-threshold to set for that budget)."""
    v = np.asarray(values, dtype=np.float64)
    lc, fc = np.asarray(local_correct, dtype=np.float64), np.asarray(fallback_correct, dtype=np.float64)
    n = len(v)
    order = np.argsort(v if higher_is_confident else -v, kind="stable")  # least confident first
    rows = []
    for f in fractions:
        k = int(round(f * n))
        routed = lc.copy()
        routed[order[:k]] = fc[order[:k]]
        rows.append(
            {
                "fraction_escalated": k / n,
                "accuracy": float(routed.mean()),
                "random_accuracy": float(lc.mean() * (1 - k / n) + fc.mean() * k / n),
                "threshold": float(v[order[k - 1]]) if k else None,
            }
        )
    return rows
