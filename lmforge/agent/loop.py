"""The agent loop (ReAct over OpenAI tool calling), written out:

    messages = [system?, user: task]
    repeat:
        reply = model.chat(messages, tools)             # one step
        if the reply calls tools: run each, append its result as a `tool` message, continue
        else: its text is the answer; stop

Limits stop it: `max_steps` model calls, `max_tokens` tokens in all (prompt + completion, as the
model reports them; each call asks for at most what is left), and `max_seconds` of wall time
(checked before every step and every tool call). A tool that raises, an unknown tool name, and
arguments that are not JSON or do not match the tool's schema all come back to the model as the
call's result (text starting "error:"), so it can correct itself; they never end the loop. A model
or endpoint failure does end it (stop_reason "model_error"), with the trace kept.

Every event goes to a JSONL trace (start, model, tool, end), rewritten atomically after each event,
so a run killed half-way leaves a readable trace of what happened up to then.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.common import LmforgeError, atomic_write_text

from .models import ChatModel
from .schema import Tool, ToolError

STOP_REASONS = ("answer", "max_steps", "max_tokens", "max_seconds", "model_error")


@dataclass
class AgentConfig:
    max_steps: int = 8  # model calls
    max_tokens: int = 8192  # prompt + completion tokens over the whole run
    max_seconds: float = 300.0  # wall time of the whole run
    turn_tokens: int = 256  # new tokens one model call may write
    temperature: float = 0.0
    tool_choice: str | dict = "auto"  # for the first step; later steps are "auto" so the model can answer
    system: str | None = None
    parallel_tool_calls: bool = True  # False: at most one call per step
    max_tool_chars: int = 8000  # a longer tool result is cut (it goes back into the prompt)

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_tokens", "turn_tokens", "max_tool_chars"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LmforgeError(f"agent {name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.max_seconds > 0:
            raise LmforgeError(f"agent max_seconds must be > 0, got {self.max_seconds!r}")
        if isinstance(self.tool_choice, str) and self.tool_choice not in ("auto", "required", "none"):
            raise LmforgeError(
                f"agent tool_choice must be auto, required, none or a function, got {self.tool_choice!r}"
            )


@dataclass
class AgentResult:
    answer: str | None
    stop_reason: str  # one of STOP_REASONS
    steps: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    seconds: float = 0.0
    error: str | None = None
    messages: list[dict] = field(default_factory=list, repr=False)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "messages"} | {"tokens": self.tokens}


class Trace:
    """A JSONL trace: one event per line, the whole file rewritten atomically after each event.
    `path` None keeps the events in memory only. Several runs (the patterns' agents) may share one."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.events: list[dict] = []
        self.t0 = time.monotonic()

    def add(self, type: str, **data) -> None:
        self.events.append({"type": type, "t": round(time.monotonic() - self.t0, 4), **data})
        if self.path is not None:
            lines = (json.dumps(e, ensure_ascii=False, default=str) for e in self.events)
            atomic_write_text(self.path, "\n".join(lines) + "\n")


def tool_specs(tools: list[Tool]) -> list[dict]:
    names = [t.name for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ToolError(f"two tools are named {dup!r}")
    return [t.spec() for t in tools]


def run_tool(tools: dict[str, Tool], call: dict, max_chars: int) -> tuple[str, bool]:
    """(result text, failed) of one call; every failure is text for the model, never an exception
    (KeyboardInterrupt and SystemExit still stop the run)."""
    fn = call.get("function") or {}
    name, arguments = fn.get("name"), fn.get("arguments", "")
    tool = tools.get(name)
    if tool is None:
        return f"error: there is no tool named {name!r} (tools: {', '.join(tools)})", True
    if not isinstance(arguments, str):  # some servers send the object itself
        arguments = json.dumps(arguments)
    try:
        args = tool.validate(arguments)
    except ValueError as e:
        return f"error: bad arguments for {name}: {e}", True
    try:
        out = tool.fn(**args)
    except Exception as e:  # noqa: BLE001  (whatever the tool raises is the model's to read)
        return f"error: {type(e).__name__}: {e}", True
    text = out if isinstance(out, str) else json.dumps(out, ensure_ascii=False, default=str)
    if len(text) > max_chars:
        text = text[:max_chars] + f"\n[... cut: {len(text) - max_chars} more characters]"
    return text, False


def run_agent(
    model: ChatModel,
    task: str,
    tools: list[Tool],
    config: AgentConfig | None = None,
    trace: Trace | str | Path | None = None,
    agent: str = "agent",
    history: list[dict] | None = None,
) -> AgentResult:
    """Run `task` until the model answers or a limit stops it. `history`: messages to start from
    (before the task); `agent`: the name this run's events carry in a shared trace."""
    cfg = config or AgentConfig()
    trace = trace if isinstance(trace, Trace) else Trace(trace)
    specs, by_name = tool_specs(tools), {t.name: t for t in tools}
    messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + list(history or [])
    messages.append({"role": "user", "content": task})
    res = AgentResult(None, "max_steps", messages=messages)
    t0 = time.monotonic()
    trace.add("start", agent=agent, model=model.name, task=task, tools=[t.name for t in tools], config=asdict(cfg))

    def over_time() -> bool:
        if time.monotonic() - t0 >= cfg.max_seconds:
            res.stop_reason = "max_seconds"
            return True
        return False

    while True:
        if res.steps >= cfg.max_steps:
            res.stop_reason = "max_steps"
            break
        left = cfg.max_tokens - res.tokens
        if left <= 0:
            res.stop_reason = "max_tokens"
            break
        if over_time():
            break
        choice = cfg.tool_choice if res.steps == 0 else "auto"
        started = time.monotonic()
        try:
            reply = model.chat(
                messages, specs or None, choice, min(cfg.turn_tokens, left), cfg.temperature, cfg.parallel_tool_calls
            )
        except LmforgeError as e:
            res.stop_reason, res.error = "model_error", str(e)
            trace.add("error", agent=agent, step=res.steps + 1, error=str(e))
            break
        res.steps += 1
        res.prompt_tokens += reply.prompt_tokens
        res.completion_tokens += reply.completion_tokens
        message = {"role": "assistant", "content": reply.message.get("content")}
        calls = reply.message.get("tool_calls") or []
        if calls:
            message["tool_calls"] = calls
        messages.append(message)
        trace.add(
            "model",
            agent=agent,
            step=res.steps,
            message=message,
            finish_reason=reply.finish_reason,
            usage={"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens},
            seconds=round(time.monotonic() - started, 4),
        )
        if not calls:
            res.answer, res.stop_reason = message["content"] or "", "answer"
            break
        for call in calls:
            if over_time():
                break
            started = time.monotonic()
            text, failed = run_tool(by_name, call, cfg.max_tool_chars)
            res.tool_calls += 1
            res.tool_errors += failed
            messages.append({"role": "tool", "tool_call_id": call.get("id"), "content": text})
            trace.add(
                "tool",
                agent=agent,
                step=res.steps,
                id=call.get("id"),
                name=(call.get("function") or {}).get("name"),
                arguments=(call.get("function") or {}).get("arguments"),
                result=text,
                error=failed,
                seconds=round(time.monotonic() - started, 4),
            )
        if res.stop_reason == "max_seconds":
            break
    res.seconds = round(time.monotonic() - t0, 4)
    trace.add("end", agent=agent, **res.summary())
    return res
