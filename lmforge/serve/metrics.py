"""Prometheus text exposition (format 0.0.4) for the server, without a client library.

Counters and histograms are updated from the event loop's thread only; gauges (queue depth, KV
blocks) and the engine's own running totals (prefix-cache queries and hits, preemptions, drafted
tokens: typed counter, named *_total) are read from the engine when /metrics is scraped, so they are
never stale.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

PREFIX = "lmforge"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Counter:
    def __init__(self, name: str, help: str):
        self.name, self.help = f"{PREFIX}_{name}", help
        self.values: dict[tuple, float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] += amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, v in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(dict(key))} {v:g}")
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = f"{PREFIX}_{name}", help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            lines.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
        lines += [f"{self.name}_sum {self.sum:g}", f"{self.name}_count {self.count}"]
        return lines


def _gauge(name: str, help: str, value: float) -> list[str]:
    name = f"{PREFIX}_{name}"
    return [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {value:g}"]


def _counter(name: str, help: str, value: float) -> list[str]:
    """A running total kept by the engine, read at scrape time: typed counter, named *_total."""
    name = f"{PREFIX}_{name}_total"
    return [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {value:g}"]


class Metrics:
    def __init__(self):
        self.requests = Counter("requests_total", "HTTP requests to /v1 endpoints by endpoint and status code")
        self.prompt_tokens = Counter("prompt_tokens_total", "prompt tokens received")
        self.generation_tokens = Counter("generation_tokens_total", "tokens generated")
        self.ttft = Histogram("time_to_first_token_seconds", "time from request to its first generated token")
        self.itl = Histogram("inter_token_latency_seconds", "time between consecutive generated tokens")
        self.latency = Histogram("request_latency_seconds", "time from request to its last token")

    def render(self, engine_stats: dict, in_flight: int) -> str:
        s = engine_stats
        lines: list[str] = []
        for m in (self.requests, self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.latency):
            lines += m.render()
        lines += _gauge("requests_in_flight", "requests admitted and not finished", in_flight)
        lines += _gauge("queue_depth", "requests waiting for the engine to start them", s["queue_depth"])
        lines += _gauge("running_sequences", "sequences in the running batch", s["running"])
        lines += _gauge("swapped_sequences", "sequences preempted to CPU memory", s["swapped"])
        lines += _gauge("kv_blocks_used", "KV cache blocks held by sequences", s["blocks_used"])
        lines += _gauge("kv_blocks_total", "KV cache blocks in the pool", s["blocks_total"])
        lines += _gauge("kv_blocks_cached", "free KV blocks kept for prefix-cache hits", s["blocks_cached"])
        # Prefix-cache hit rate = hits_total / queries_total (both in prompt tokens, as vLLM counts them).
        lines += _counter(
            "prefix_cache_queries", "prompt tokens looked up in the prefix cache", s["prefix_query_tokens"]
        )
        lines += _counter("prefix_cache_hits", "prompt tokens served from the prefix cache", s["prefix_hit_tokens"])
        lines += _counter("preemptions", "sequences preempted for lack of KV blocks", s["preemptions"])
        lines += _counter("spec_drafted_tokens", "tokens proposed by the draft model", s["drafted_tokens"])
        lines += _counter("spec_accepted_tokens", "drafted tokens the target accepted", s["accepted_tokens"])
        return "\n".join(lines) + "\n"
