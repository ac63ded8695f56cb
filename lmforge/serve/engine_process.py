"""The engine in a child process of its own, so the HTTP side and the model never share a GIL.

With the engine on a thread (runner.py), every torch op the engine runs releases the GIL and must
win it back from the event loop, which is busy turning the last step's tokens into SSE chunks:
under 16 streaming clients a 4 ms decode step took 6.6 ms, and the event loop's work and the
model's could never overlap. Here the child process owns the model, the KV cache and the engine
loop; the server process keeps the tokenizer, the HTTP routes and the text side. They talk over
two pipes:

    server -> child   ("add", key, Submission) | ("cancel", key) | ("stop",)
                      ("call", key, op, args)   an EngineOps call (embed, load_lora, unload_lora)
    child -> server   ("ready", info) | ("error", message)          once, at start-up
                      ("events", [(key, Event), ...], stats|None)   after every step
                      ("rejected", key, message) | ("failed", message) | ("stats", stats)
                      ("result", key, ok, payload)                  a call's outcome (engine_ops.PendingCalls)

The event loop reads the child's pipe directly (`add_reader`: no extra thread, no cross-thread
hand-off per step); a writer thread sends the commands, so the event loop never blocks on a full
pipe. The child is a fresh interpreter, `python -m lmforge.serve.engine_process CMD_FD EVENT_FD`
(not a fork: the server may already hold threads and an OpenMP pool; not multiprocessing's spawn,
which re-imports the caller's main script: a script without an `if __name__` guard, or code piped
to `python -`, would break). It gets the ServeConfig as its first message, loads the model itself,
ignores SIGINT/SIGTERM (the server drains and then sends "stop") and exits when the server's end
of the pipe closes, whatever killed it. Engine statistics for /metrics are a snapshot the child
sends at most every 50 ms while busy and whenever it goes idle.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from lmforge.common import LmforgeError, apply_threads_policy, get_logger

from .build import embedding_name
from .engine_ops import EngineOps, PendingCalls, call_result
from .runner import EngineFailed, Handle, Submission, adapter_in_use, check_room

log = get_logger(__name__)
_STATS_EVERY = 0.05  # seconds between statistics snapshots while the engine is busy


class EngineProcess:
    """The same interface as runner.EngineRunner (submit, cancel, start, stop, in_flight, stats,
    max_model_len, vocab_size), with the engine in a child process. Built from a
    ServeConfig (the child loads the model from its folder); waits until the model is loaded and
    raises LmforgeError with the child's message if it cannot be."""

    def __init__(self, cfg, max_in_flight: int, start_timeout: float = 1800.0):
        self.max_in_flight = max_in_flight
        self.lora_runtime = cfg.enable_lora_runtime
        self.embedding_model = embedding_name(cfg)
        cmd_recv, self._cmds = mp.Pipe(duplex=False)
        self._events, event_send = mp.Pipe(duplex=False)
        fds = (cmd_recv.fileno(), event_send.fileno())
        # The child imports this very lmforge, however it was found here (installed, or a source tree).
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        apply_threads_policy(env)  # the child loads torch at once; a server made without the CLI has not set it
        self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__, *map(str, fds)], pass_fds=fds, env=env, stdin=subprocess.DEVNULL
        )
        cmd_recv.close()
        event_send.close()
        self._cmds.send(("config", cfg))
        info = self._wait_ready(start_timeout)
        self.max_model_len, self.vocab_size, self.stats = info["max_model_len"], info["vocab_size"], info["stats"]
        self._keys = itertools.count()
        self._live: dict[int, Handle] = {}  # key -> submitted and not finished or cancelled
        self._calls: dict[int, asyncio.Future] = {}  # key -> an EngineOps call awaiting its result
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="lmforge-engine-writer", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.exitcode: int | None = None  # set when the child has died

    def _wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while not self._events.poll(0.1):
            if self._proc.poll() is not None:
                raise LmforgeError(
                    f"the engine process exited with code {self._proc.returncode} while loading "
                    f"the model (its log is above)"
                )
            if time.monotonic() > deadline:
                self._proc.kill()
                raise LmforgeError(f"the engine process did not load the model within {timeout:g} s")
        try:
            kind, payload = self._events.recv()
        except EOFError:
            raise LmforgeError(
                f"the engine process exited with code {self._wait(5)} while loading the model (its log is above)"
            ) from None
        if kind == "error":
            self._wait(5)
            raise LmforgeError(payload)
        return payload

    # ------------------------------------------------------------------ the runner interface

    @property
    def in_flight(self) -> int:
        return len(self._live)

    @property
    def alive(self) -> bool:
        return self.exitcode is None

    def start(self) -> None:
        """Attach to the running event loop: from now on it reads the child's events."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._events.fileno(), self._on_readable)
        self._writer.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self.alive:
            self._loop.remove_reader(self._events.fileno())
        if self._writer.is_alive():
            self._outbox.put(("stop",))
            self._outbox.put(None)
            self._writer.join(timeout)
        else:  # never started (the server failed to come up), or the child is gone
            try:
                self._cmds.send(("stop",))
            except OSError:
                pass
        if self._wait(timeout) is None:
            self._proc.kill()
            self._wait(timeout)

    def _wait(self, timeout: float) -> int | None:
        """The child's exit code once it has exited within `timeout` seconds, else None."""
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def submit(self, items: Sequence[Submission]) -> tuple[list[Handle], asyncio.Queue]:
        """Queue all of `items` or none (QueueFull); their events arrive on the returned queue.
        Called on the event loop this runner was started on."""
        if not self.alive:
            raise EngineFailed(f"the engine process has exited (code {self.exitcode})")
        check_room(len(self._live), len(items), self.max_in_flight)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        handles = []
        for i, it in enumerate(items):
            h = Handle(it, i, loop, events, request_id=next(self._keys))
            self._live[h.request_id] = h
            self._outbox.put(("add", h.request_id, it))
            handles.append(h)
        return handles, events

    def adapter_in_use(self, name: str) -> int:
        return adapter_in_use(self._live.values(), name)

    async def call(self, op: str, *args):
        """Run EngineOps `op` in the child between two steps; its result or its error."""
        if not self.alive:
            raise EngineFailed(f"the engine process has exited (code {self.exitcode})")
        key = next(self._keys)
        future = self._calls[key] = asyncio.get_running_loop().create_future()
        self._outbox.put(("call", key, op, args))
        try:
            return call_result(*await future)
        finally:
            self._calls.pop(key, None)

    def cancel(self, handle: Handle) -> None:
        """Stop a sequence; the child frees its blocks before its next step. A no-op once finished."""
        if self._live.pop(handle.request_id, None) is not None:
            handle.cancelled = True
            self._outbox.put(("cancel", handle.request_id))

    # ------------------------------------------------------------------ both directions

    def _write_loop(self) -> None:
        while (msg := self._outbox.get()) is not None:
            try:
                self._cmds.send(msg)
            except OSError:  # the child is gone; the reader reports it
                return

    def _on_readable(self) -> None:
        try:
            while self._events.poll():
                self._handle(self._events.recv())
        except (EOFError, OSError):
            self._child_died()

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "events":
            for key, ev in msg[1]:
                h = self._live.get(key)
                if h is None:  # cancelled meanwhile
                    continue
                h.queue.put_nowait((h.index, ev))
                if ev.finished:
                    del self._live[key]
            if msg[2] is not None:
                self.stats = msg[2]
        elif kind == "stats":
            self.stats = msg[1]
        elif kind == "rejected":
            h = self._live.pop(msg[1], None)
            if h is not None:
                h.queue.put_nowait(LmforgeError(msg[2]))
        elif kind == "failed":
            self._fail_all(EngineFailed(msg[1]))
        elif kind == "result":
            future = self._calls.get(msg[1])
            if future is not None and not future.done():
                future.set_result((msg[2], msg[3]))

    def _child_died(self) -> None:
        self._loop.remove_reader(self._events.fileno())
        code = self._wait(5)
        self.exitcode = code if code is not None else -1
        log.error("the engine process exited with code %s", self.exitcode)
        self._fail_all(EngineFailed(f"the engine process exited (code {self.exitcode})"))
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineFailed(f"the engine process exited (code {self.exitcode})"))
        self._outbox.put(None)

    def _fail_all(self, error: Exception) -> None:
        live, self._live = self._live, {}
        for h in live.values():
            h.queue.put_nowait(error)


# ---------------------------------------------------------------------- the child process


def child_main(cfg, cmds, events) -> None:
    """Load the engine as `cfg` says, then step it, applying the server's commands in between."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server drains on these, then says "stop"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from .build import build_engine

    try:
        engine, _, _ = build_engine(cfg)
        ops = EngineOps.build(engine, cfg.embedding_model, cfg.device, cfg.dtype)
    except LmforgeError as e:
        events.send(("error", str(e)))
        return
    except Exception as e:  # a bug: the server process reports it and exits non-zero
        log.exception("loading the engine failed")
        events.send(("error", f"loading the model failed: {type(e).__name__}: {e}"))
        return
    events.send(
        (
            "ready",
            dict(max_model_len=engine.max_model_len, vocab_size=engine.model.config.vocab_size, stats=engine.stats),
        )
    )
    try:
        _serve_forever(engine, cmds, events, ops)
    except (EOFError, OSError):  # the server is gone
        pass


def _serve_forever(engine, cmds, events, ops: EngineOps | None = None) -> None:
    ops = ops or EngineOps(engine)
    rid_of: dict[int, int] = {}  # the server's key -> the engine's request id
    key_of: dict[int, int] = {}
    last_stats, idle_reported = time.monotonic(), True
    calls = PendingCalls(ops)
    while True:
        for key, outcome in calls.advance():  # one piece of the oldest call, then an engine step
            events.send(("result", key, *outcome))
        busy = engine.has_unfinished() or bool(calls.todo)
        if not busy and not idle_reported:
            events.send(("stats", engine.stats))
            idle_reported = True
        if cmds.poll(None if not busy else 0):  # idle: sleep until the server says something
            while True:
                msg = cmds.recv()
                if msg[0] == "stop":
                    return
                _apply(engine, ops, calls, msg, rid_of, key_of, events)
                if not cmds.poll():
                    break
        if not engine.has_unfinished():
            continue
        idle_reported = False
        try:
            step = engine.step()
        except Exception as e:  # a bug, not a client's mistake: fail what is in flight, keep serving
            log.exception("engine step failed")
            for key in list(rid_of):
                _forget(engine, key, rid_of, key_of)
            events.send(("failed", str(e)))
            continue
        out = []
        for ev in step:
            key = key_of.get(ev.request_id)
            if key is None:
                continue
            out.append((key, ev))
            if ev.finished:
                _forget(engine, key, rid_of, key_of)
        now = time.monotonic()
        stats = None
        if now - last_stats >= _STATS_EVERY:
            stats, last_stats = engine.stats, now
        if out or stats is not None:
            events.send(("events", out, stats))


def _apply(engine, ops: EngineOps, calls: PendingCalls, msg: tuple, rid_of: dict, key_of: dict, events) -> None:
    if msg[0] == "add":
        _, key, s = msg
        try:
            adapter = ops.adapter(s.adapter)
            rid = engine.add_request(s.prompt_ids, s.params, adapter, s.logprobs, s.prompt_logprobs)
        except Exception as e:  # validated by the server first; anything left goes back to the client
            events.send(("rejected", key, str(e)))
            return
        rid_of[key], key_of[rid] = rid, key
    elif msg[0] == "cancel" and msg[1] in rid_of:
        _forget(engine, msg[1], rid_of, key_of)
    elif msg[0] == "call":
        calls.add(*msg[1:])


def _forget(engine, key: int, rid_of: dict, key_of: dict) -> None:
    rid = rid_of.pop(key)
    del key_of[rid]
    engine.release(rid)  # cancels it first if it is still running; the engine keeps nothing


if __name__ == "__main__":  # the child: python -m lmforge.serve.engine_process CMD_FD EVENT_FD
    _commands, _events = Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False)
    child_main(_commands.recv()[1], _commands, _events)
