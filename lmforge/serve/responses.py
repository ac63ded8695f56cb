"""OpenAI's response shapes for a finished or streaming job: the JSON body of a completion or a chat
completion, and the server-sent-event chunks of a stream (with the optional usage chunk and
`data: [DONE]`); with tools, the calls parsed out of a chat's output (message `tool_calls`, or
streamed `tool_calls` deltas, finish_reason "tool_calls"). The routes (app.py) build a `Job`;
this module only shapes what comes back.
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .generation import Delta, chat_logprobs, completion_logprobs, echo_entries
from .protocol import APIError, ChatRequest, CompletionRequest
from .runner import Submission
from .tools import ToolSet, ToolStream, call_deltas, message_calls
from .vision import VisionRunner

_ID_PREFIX, _ids = secrets.token_hex(6), itertools.count()  # unique response ids without a syscall each


@dataclass
class Job:
    """One HTTP request's work: the choices to run and how to shape the answer."""

    kind: str  # "completion" | "chat"
    req: CompletionRequest | ChatRequest
    subs: list[Submission]
    prompt_tokens: int
    runner: VisionRunner | None = None  # None: the engine; image requests run on the VLM's own path
    echo: list[str] | None = None  # completions with echo: each choice's prompt text, put before its text
    tools: ToolSet | None = None  # chat with tools: calls parsed out of the output (serve/tools.py)
    id: str = field(default_factory=lambda: f"{_ID_PREFIX}{next(_ids):x}")
    created: int = field(default_factory=lambda: int(time.time()))


def usage(job: Job, completion_tokens: int, cached: list[int]) -> dict:
    """OpenAI's usage; `cached`: each choice's prompt tokens found in the prefix cache (a prompt counts
    once, as in prompt_tokens: the cached tokens of its first choice)."""
    return dict(
        prompt_tokens=job.prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=job.prompt_tokens + completion_tokens,
        prompt_tokens_details=dict(cached_tokens=sum(cached[:: job.req.n])),
    )


def response(state, job: Job, results: list[dict]) -> dict:
    tok, choices = state.tokenizer, []
    for i, r in enumerate(results):
        want_lp = job.subs[i].logprobs is not None
        if job.kind == "completion":
            text, entries = r["text"], r["logprobs"]
            if job.echo is not None:
                text, entries = job.echo[i] + text, echo_entries(job.subs[i].prompt_ids, r["prompt_logprobs"]) + entries
            lp = completion_logprobs(tok, entries) if want_lp else None
            choices.append(dict(index=i, text=text, logprobs=lp, finish_reason=r["finish_reason"]))
        else:
            lp = chat_logprobs(tok, r["logprobs"]) if want_lp else None
            message, reason = dict(role="assistant", content=r["text"]), r["finish_reason"]
            if job.tools is not None:
                stream = ToolStream(job.tools)
                shown, calls = stream.push(r["text"])
                rest, last, reason = stream.finish(reason)
                calls += last
                message["content"] = (shown + rest) or (None if calls else "")  # OpenAI: null beside calls
                if calls:
                    message["tool_calls"] = message_calls(calls)
            choices.append(dict(index=i, message=message, logprobs=lp, finish_reason=reason))
    obj = "text_completion" if job.kind == "completion" else "chat.completion"
    prefix = "cmpl-" if job.kind == "completion" else "chatcmpl-"
    return dict(
        id=prefix + job.id,
        object=obj,
        created=job.created,
        model=job.req.model,
        choices=choices,
        usage=usage(job, sum(r["tokens"] for r in results), [r["cached_tokens"] for r in results]),
        system_fingerprint=None,
    )


async def sse(state, job: Job, deltas: AsyncIterator[Delta]) -> AsyncIterator[str]:
    """OpenAI's chunk stream: `data: {chunk}` per delta, an optional usage chunk, `data: [DONE]`."""
    chat = job.kind == "chat"
    base = dict(
        id=("chatcmpl-" if chat else "cmpl-") + job.id,
        created=job.created,
        model=job.req.model,
        object="chat.completion.chunk" if chat else "text_completion",
        system_fingerprint=None,
    )
    include_usage = bool(job.req.stream_options and job.req.stream_options.include_usage)
    tokens, offsets, echoed, cached = 0, [0] * len(job.subs), set(), [0] * len(job.subs)

    head = json.dumps(base)[:-1]  # the fields every chunk shares, encoded once (the same bytes as whole)
    tail = ', "usage": null}' if include_usage else "}"

    def chunk(choice: dict) -> str:
        return f'data: {head}, "choices": [{json.dumps(choice)}]{tail}\n\n'

    streams = [ToolStream(job.tools) for _ in job.subs] if chat and job.tools is not None else None
    ncalls = [0] * len(job.subs)

    def chat_delta(i: int, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The delta of choice i: content, and tool calls once whole (tool_calls deltas)."""
        if streams is None:
            return (dict(content=text) if text else {}), finish_reason
        text, calls = streams[i].push(text)
        if finish_reason is not None:
            rest, last, finish_reason = streams[i].finish(finish_reason)
            text, calls = text + rest, calls + last
        delta = dict(content=text) if text else {}
        if calls:
            delta["tool_calls"] = call_deltas(calls, ncalls[i])
            ncalls[i] += len(calls)
        return delta, finish_reason

    try:
        if chat:
            for i in range(len(job.subs)):
                yield chunk(dict(index=i, delta=dict(role="assistant", content=""), logprobs=None, finish_reason=None))
        async for d in deltas:
            tokens += len(d.token_ids)
            cached[d.index] = cached[d.index] or d.cached_tokens or 0
            text, entries = d.text, d.logprobs
            if job.echo is not None and d.index not in echoed:  # the prompt goes first, in this choice's first chunk
                echoed.add(d.index)
                text = job.echo[d.index] + text
                if job.subs[d.index].logprobs is not None:
                    entries = echo_entries(job.subs[d.index].prompt_ids, d.prompt_logprobs) + (entries or [])
            if not (text or d.finish_reason or entries):
                continue
            if chat:
                delta, reason = chat_delta(d.index, text, d.finish_reason)
                lp = chat_logprobs(state.tokenizer, entries) if entries else None
                if delta.get("tool_calls") and reason is not None:  # the calls, then the finish on its own
                    yield chunk(dict(index=d.index, delta=delta, logprobs=lp, finish_reason=None))
                    delta, lp = {}, None
                if delta or lp or reason:
                    yield chunk(dict(index=d.index, delta=delta, logprobs=lp, finish_reason=reason))
            else:
                lp = completion_logprobs(state.tokenizer, entries, offsets[d.index]) if entries else None
                offsets[d.index] += len(text)
                yield chunk(dict(index=d.index, text=text, logprobs=lp, finish_reason=d.finish_reason))
        if include_usage:
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage(job, tokens, cached)})}\n\n"
    except APIError as e:  # headers are gone: the error travels in the stream, as OpenAI does
        yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"
