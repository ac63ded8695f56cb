"""From submitted requests to text deltas: one async generator drives all the choices of an HTTP
request (n > 1, or several prompts), turns token events into text, applies stop strings, records
latency metrics, enforces the per-request deadline, and cancels whatever is still running when
the consumer goes away (client disconnect, error), which frees the KV blocks at once.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .metrics import Metrics
from .protocol import APIError
from .runner import EngineFailed, EngineRunner, Handle, QueueFull, Submission
from .text import TextStream

_DEADLINE = object()  # put on a request's queue when its time is up


@dataclass
class Delta:
    index: int  # the choice
    text: str
    token_ids: list[int]
    logprobs: list | None  # the engine's (token, logprob, [(token, logprob), ...]) per new token
    finish_reason: str | None
    prompt_logprobs: list | None = None  # on a choice's first delta when echo asked for them
    cached_tokens: int | None = None  # on a choice's first delta: its prompt tokens found in the prefix cache


@dataclass
class _Choice:
    text: TextStream
    started: float
    last: float | None = None
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)  # entries not yet released with their text
    released: int = 0  # entries released so far


def submit(runner: EngineRunner, subs: list[Submission]) -> tuple[list[Handle], asyncio.Queue]:
    """Queue the choices now (before any response starts, so a full queue is a plain 429)."""
    try:
        return runner.submit(subs)
    except QueueFull as e:
        raise APIError(429, f"{e}; retry later", type="rate_limit_error", code="queue_full") from None
    except EngineFailed as e:
        raise APIError(503, f"the inference engine is not running: {e}", type="server_error") from None


async def generate(
    runner: EngineRunner,
    tokenizer,
    metrics: Metrics,
    submitted: tuple[list[Handle], asyncio.Queue],
    stop: list[str],
    timeout: float,
) -> AsyncIterator[Delta]:
    """Deltas of every choice, interleaved as tokens come; raises APIError (504 timeout, 500
    engine failure)."""
    handles, queue = submitted
    now = time.perf_counter()
    choices = [_Choice(TextStream(tokenizer, stop), now) for _ in handles]
    open_ = len(handles)
    # One timer per request puts a marker on the queue at the deadline (a timeout scope around
    # every token's wait cost a timer per token: a fifth of the streaming path's time).
    timer = asyncio.get_running_loop().call_later(timeout, queue.put_nowait, _DEADLINE)
    try:
        while open_:
            item = queue.get_nowait() if not queue.empty() else await queue.get()
            if item is _DEADLINE:
                raise APIError(
                    504,
                    f"the request did not finish within the server's {timeout:g} s timeout",
                    type="timeout_error",
                    code="timeout",
                )
            if isinstance(item, EngineFailed):
                raise APIError(500, f"the inference engine failed: {item}", type="server_error")
            if isinstance(item, Exception):
                raise APIError(400, str(item))
            i, ev = item
            if choices[i].finish_reason is not None:  # already cut at a stop string
                continue
            if ev.finish_reason == "error":  # this request failed alone; the others in the step went on
                raise APIError(500, f"the inference engine failed on this request: {ev.error}", type="server_error")
            delta = _advance(choices[i], i, ev, metrics)
            if delta.finish_reason is not None:
                open_ -= 1
                if not ev.finished:  # a stop string the engine did not see yet: stop it now
                    runner.cancel(handles[i])
            yield delta
    finally:
        timer.cancel()
        for h in handles:  # no-op for finished sequences; frees the blocks of the rest
            runner.cancel(h)


def _advance(ch: _Choice, i: int, ev, metrics: Metrics) -> Delta:
    now = time.perf_counter()
    n = len(ev.new_token_ids)
    if n:
        if ch.last is None:
            metrics.ttft.observe(now - ch.started)
        else:
            metrics.itl.observe(now - ch.last)
        ch.last, ch.tokens = now, ch.tokens + n
        metrics.generation_tokens.inc(n)
    text = ch.text.push(ev.new_token_ids)
    reason = ev.finish_reason if ev.finished else None
    if ch.text.stopped:
        reason = "stop"
    if reason is not None:
        text += ch.text.flush()
        ch.finish_reason = reason
        metrics.latency.observe(now - ch.started)
    logprobs = None
    if ev.logprobs is not None:  # released with their tokens' text: a stop string's tokens never are
        ch.logprobs += ev.logprobs
        upto = ch.text.covered()
        logprobs, ch.released = ch.logprobs[ch.released : upto], max(ch.released, upto)
    return Delta(i, text, list(ev.new_token_ids), logprobs, reason, ev.prompt_logprobs, ev.cached_tokens)


async def collect(deltas: AsyncIterator[Delta], n: int) -> list[dict]:
    """Run to the end; per choice: text, token count, finish reason, logprob entries, cached prompt tokens."""
    out = [
        dict(text="", tokens=0, finish_reason=None, logprobs=[], prompt_logprobs=None, cached_tokens=0)
        for _ in range(n)
    ]
    async for d in deltas:
        o = out[d.index]
        if o["finish_reason"] is not None:
            continue
        o["prompt_logprobs"] = o["prompt_logprobs"] or d.prompt_logprobs
        o["cached_tokens"] = o["cached_tokens"] or d.cached_tokens or 0
        o["text"] += d.text
        o["tokens"] += len(d.token_ids)
        o["logprobs"] += d.logprobs or []
        o["finish_reason"] = d.finish_reason
    return out


# ----------------------------------------------------------------------------- logprobs, OpenAI's shapes


_token_strs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {id: text}


def _token_str(tokenizer, token: int) -> str:
    """One token's text (cached: logprobs name every streamed token)."""
    cache = _token_strs.get(tokenizer)
    if cache is None:
        cache = _token_strs[tokenizer] = {}
    s = cache.get(token)
    if s is None:
        s = cache[token] = tokenizer.decode([token], skip_special_tokens=False) if token < tokenizer.vocab_size else ""
    return s


def echo_entries(prompt_ids: list[int], prompt_logprobs: list | None) -> list:
    """The prompt's logprob entries for echo: the first token has no logprob (None, as OpenAI)."""
    return [(prompt_ids[0], None, None)] + list((prompt_logprobs or [None])[1:])


def completion_logprobs(tokenizer, entries: list, offset: int = 0) -> dict:
    """The legacy completions shape: parallel lists of tokens, logprobs, top-n dicts, text offsets."""
    tokens, lps, tops, offsets = [], [], [], []
    for token, lp, alts in entries:
        s = _token_str(tokenizer, token)
        tokens.append(s)
        lps.append(lp)
        tops.append(None if alts is None else {_token_str(tokenizer, t): v for t, v in alts})
        offsets.append(offset)
        offset += len(s)
    return dict(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)


def chat_logprobs(tokenizer, entries: list) -> dict:
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""

    def item(token: int, lp: float) -> dict:
        s = _token_str(tokenizer, token)
        return dict(token=s, logprob=lp, bytes=list(s.encode("utf-8")))

    return dict(content=[{**item(t, lp), "top_logprobs": [item(a, v) for a, v in alts]} for t, lp, alts in entries])
