"""Edge-cloud routing (`lmforge serve --fallback URL`): the local model answers every request; when its
confidence in that answer is low the request is sent on to a fallback OpenAI-compatible endpoint (a
larger model) and the fallback's answer is returned instead.

Confidence signals (router_model.py computes what they read):
    mean_logprob   mean log p of the local answer's tokens; escalate when it is BELOW the threshold
    entropy        mean entropy (nats) of the next-token distributions, estimated from the top
                   ROUTE_TOP_LOGPROBS alternatives plus one bucket for the rest of the mass;
                   escalate when it is ABOVE the threshold
    agreement      self-consistency: the engine also samples `samples` answers per choice (at
                   `temperature`, seeds 1..k: the same request gets the same decision) and the value
                   is the share whose final answer equals the local answer's; escalate BELOW
    learned        a logistic-regression router (`LearnedRouter`, a JSON file from `lmforge route
                   train`) over answer features, agreement and/or the prompt's own features
                   (lengths, digits, hashed character n-grams); escalate when its P(keep) is BELOW
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

import numpy as np

from lmforge.common import LmforgeError, get_logger

from .protocol import APIError
from .router_model import LearnedRouter, answer_features, query

log = get_logger("lmforge.serve.routing")
SIGNALS = ("mean_logprob", "entropy", "agreement", "learned")
ROUTE_TOP_LOGPROBS = 5  # alternatives per token the engine reports for the entropy estimate
HEADER = "X-Lmforge-Route"
features = answer_features  # the answer-confidence features (the name the benches import)
# mean log p below -1 (a typical token under e^-1 = 37%), entropy above 1 nat, fewer than half of the
# samples agreeing, P(keep) below one half
DEFAULT_THRESHOLDS = {"mean_logprob": -1.0, "entropy": 1.0, "agreement": 0.5, "learned": 0.5}
DEFAULT_SAMPLES = 5  # --route-signal agreement without --route-samples


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
    samples: int | None = None  # signal "agreement": answers sampled per choice (None: DEFAULT_SAMPLES)
    temperature: float | None = None  # ... and their temperature (None: 0.7)

    def __post_init__(self) -> None:
        if not self.fallback.startswith(("http://", "https://")):
            raise LmforgeError(f"--fallback must be an http(s) URL, got {self.fallback!r}")
        if self.signal not in SIGNALS:
            raise LmforgeError(f"--route-signal {self.signal!r}: choose from {', '.join(SIGNALS)}")
        if (self.signal == "learned") != (self.router is not None):
            raise LmforgeError("--route-signal learned needs --router FILE (and --router needs that signal)")
        if self.signal != "agreement" and (self.samples is not None or self.temperature is not None):
            # a learned router samples as it was trained to (its file says how); no other signal samples
            raise LmforgeError("--route-samples/--route-temperature go with --route-signal agreement only")
        if self.signal == "agreement":
            self.samples = DEFAULT_SAMPLES if self.samples is None else self.samples
            self.temperature = 0.7 if self.temperature is None else self.temperature
            if self.samples < 1:
                raise LmforgeError(f"--route-samples must be >= 1, got {self.samples}")
            if not (math.isfinite(self.temperature) and self.temperature > 0):
                raise LmforgeError(f"--route-temperature must be a finite number > 0, got {self.temperature}")
        if self.threshold is None:
            self.threshold = DEFAULT_THRESHOLDS[self.signal]
        if not math.isfinite(self.threshold):
            raise LmforgeError(f"--route-threshold must be a finite number, got {self.threshold}")


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
        if self.learned is not None:
            self.samples, self.temperature = self.learned.samples, self.learned.temperature
        else:
            self.samples, self.temperature = cfg.samples or 0, cfg.temperature or 0.7
        base = cfg.fallback.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self._model = cfg.fallback_model
        self.counts = {"local": 0, "fallback": 0, "local-fallback-failed": 0}

    def value(self, q: dict) -> float:
        """The signal's value for one choice's query (router_model.query)."""
        return self.learned.predict(q) if self.learned is not None else q[self.cfg.signal]

    def escalate(self, value: float) -> bool:
        return value > self.cfg.threshold if self.cfg.signal == "entropy" else value < self.cfg.threshold

    def decide(self, queries: Sequence[dict]) -> Decision:
        """The decision for a request from its choices' queries (the least confident one decides)."""
        values = [self.value(q) for q in queries]
        worst = max(values) if self.cfg.signal == "entropy" else min(values)
        return Decision("fallback" if self.escalate(worst) else "local", worst)

    def queries(self, results: list[dict], n: int, prompts: Sequence[str]) -> list[dict]:
        """Per client choice (the first `n` results; the samples follow, `samples` per choice) what
        the signal reads: the prompt's text, the answer's log-probability entries, the samples."""
        k = self.samples
        return [
            query(
                prompts[i],
                results[i]["logprobs"],
                [s["text"] for s in results[n + i * k : n + (i + 1) * k]] if k else None,
                results[i]["text"],
            )
            for i in range(n)
        ]

    def probe(self, subs: list, max_in_flight: int | None = None) -> list:
        """The submissions to run: the client's, with log-probabilities asked of the engine (the
        signals need them; `trim` takes back out what the client did not ask for), then `samples`
        sampled answers per choice for the agreement signal."""
        probed = [replace(s, logprobs=max(s.logprobs or 0, ROUTE_TOP_LOGPROBS)) for s in subs]
        extra = [
            replace(
                s,
                logprobs=None,
                prompt_logprobs=None,
                params=replace(s.params, temperature=self.temperature, seed=j + 1 + (s.params.seed or 0)),
            )
            for s in subs
            for j in range(self.samples)
        ]
        if max_in_flight is not None and len(probed) + len(extra) > max_in_flight:
            raise APIError(
                400,
                f"routing with {self.samples} samples per choice runs {len(probed) + len(extra)} sequences for "
                f"this request; the server runs at most {max_in_flight} at once",
                param="n",
            )
        return probed + extra

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

    async def respond(self, job, results: list[dict], local: Callable[[list[dict]], dict], tokenizer=None):
        """The response for a job (responses.Job) the local model answered (`results`, from the
        probing submissions): the local one, or the fallback's; either carries the decision. The
        prompt text the signals read is each choice's prompt ids decoded by `tokenizer`."""
        from fastapi.responses import JSONResponse

        kind, subs = job.kind, job.subs
        prompts = [tokenizer.decode(s.prompt_ids) if tokenizer is not None else "" for s in subs]
        decision = self.decide(self.queries(results, len(subs), prompts))
        results = results[: len(subs)]
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
