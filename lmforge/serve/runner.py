"""The engine's step loop in one background thread, its events fanned out to asyncio queues.

The HTTP handlers live on the event loop; the model runs here, off the loop, so streaming other
clients never waits for a forward. The event loop never touches the engine either (one thread owns
it, and the runner's request-id bookkeeping stays in step with it): `submit` and `cancel` only record
what to do; the engine thread applies them between steps. The number of requests in flight is
bounded: past it `submit` raises QueueFull and the server answers 429 instead of letting the queue
grow without end. (`lmforge serve` runs the engine in a process of its own by default:
engine_process.py, the same interface.)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.common import get_logger
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams

from .engine_ops import EngineOps, PendingCalls, call_result

log = get_logger(__name__)


class QueueFull(Exception):
    pass


def check_room(in_flight: int, adding: int, limit: int, what: str = "requests") -> None:
    """Raise QueueFull unless `adding` more fit beside `in_flight` within `limit`."""
    if in_flight + adding > limit:
        raise QueueFull(f"the server is at its limit of {limit} {what} in flight")


class EngineFailed(Exception):
    """The engine raised while stepping; every request in flight gets this instead of an event."""


@dataclass
class Submission:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # echo with logprobs: the prompt tokens' too


@dataclass(eq=False)
class Handle:
    """One submitted sequence. Its queue receives (index, Event) tuples, or an exception."""

    submission: Submission
    index: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    request_id: int | None = None  # the engine's id, once the engine thread has added it
    cancelled: bool = False


def adapter_in_use(handles, name: str) -> int:
    """How many of `handles` (submitted, unfinished) ask for adapter `name`."""
    return sum(h.submission.adapter == name for h in handles)


class EngineRunner:
    def __init__(
        self,
        engine: Engine,
        max_in_flight: int,
        ops: EngineOps | None = None,
        lora_runtime: bool = False,
        embedding_model: str | None = None,
    ):
        """ops: embeddings and run-time adapter loads, run on the engine thread between steps;
        lora_runtime: whether /v1/load_lora_adapter may use them; embedding_model: the served name
        of a dedicated embedding model (None: embeddings come from the served model)."""
        self.engine, self.max_in_flight = engine, max_in_flight
        self.ops = ops or EngineOps(engine)
        self.lora_runtime, self.embedding_model = lora_runtime, embedding_model
        self._calls: list[tuple] = []  # ((future, loop), op, args) to start between steps
        self._running_calls = PendingCalls(self.ops)
        self._live: set[Handle] = set()  # submitted and not finished or cancelled
        self._pending: list[Handle] = []  # to add to the engine
        self._cancels: list[Handle] = []  # to cancel in the engine
        self._by_id: dict[int, Handle] = {}
        self._lock = threading.Lock()  # guards the lists above; never held across a step
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)

    @property
    def in_flight(self) -> int:
        return len(self._live)

    @property
    def alive(self) -> bool:
        return not self._stopping  # the thread survives a failing step (_fail_all)

    @property
    def stats(self) -> dict:
        return self.engine.stats

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size

    def start(self) -> None:
        self._thread.start()

    def adapter_in_use(self, name: str) -> int:
        with self._lock:
            return adapter_in_use(self._live, name)

    async def call(self, op: str, *args):
        """Run EngineOps `op` on the engine thread between two steps; its result or its error."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._calls.append(((future, loop), op, args))
        self._wake.set()
        return call_result(*await future)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, items: Sequence[Submission]) -> tuple[list[Handle], asyncio.Queue]:
        """Queue all of `items` or none (QueueFull); their events arrive on the returned queue."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        handles = [Handle(it, i, loop, queue) for i, it in enumerate(items)]
        with self._lock:
            check_room(len(self._live), len(handles), self.max_in_flight)
            self._live.update(handles)
            self._pending += handles
        self._wake.set()
        return handles, queue

    def cancel(self, handle: Handle) -> None:
        """Stop a sequence (client gone, timeout, stop string); the engine thread frees its KV
        blocks before its next step. A no-op for finished sequences."""
        with self._lock:
            if handle in self._live:
                self._live.discard(handle)
                handle.cancelled = True
                self._cancels.append(handle)
        self._wake.set()

    # ------------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        while not self._stopping:
            self._apply_requests()
            if not self.engine.has_unfinished() and not self._running_calls.todo:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a bug, not a client's mistake: fail what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            self._dispatch(events)

    def _apply_requests(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            cancels, self._cancels = self._cancels, []
            calls, self._calls = self._calls, []
        for h in cancels:
            if h.request_id is not None:
                self.engine.cancel(h.request_id)
                self._drop(h.request_id)
        for h in pending:
            if h.cancelled:
                continue
            s = h.submission
            try:
                adapter = self.ops.adapter(s.adapter)
                h.request_id = self.engine.add_request(s.prompt_ids, s.params, adapter, s.logprobs, s.prompt_logprobs)
            except Exception as e:  # validated before submit; anything left is reported, not fatal
                self._finish_with(h, e)
                continue
            self._by_id[h.request_id] = h
        for call in calls:  # after the adds: an unload sees every request queued before it
            self._running_calls.add(*call)
        for (future, loop), outcome in self._running_calls.advance():  # one piece, then a step
            try:
                loop.call_soon_threadsafe(_settle, future, outcome)
            except RuntimeError:  # that event loop is closed
                pass

    def _dispatch(self, events: list) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = {}  # one wake-up per event loop per step
        for ev in events:
            h = self._by_id.get(ev.request_id)
            if h is None or h.cancelled:
                continue
            batches.setdefault(h.loop, []).append((h.queue, (h.index, ev)))
            if ev.finished:
                with self._lock:
                    self._live.discard(h)
                self._drop(ev.request_id)
        for loop, items in batches.items():
            _post(loop, items)

    def _drop(self, request_id: int) -> None:
        self._by_id.pop(request_id, None)
        self.engine.release(request_id)  # the engine keeps every request until released

    def _finish_with(self, h: Handle, error: Exception) -> None:
        with self._lock:
            self._live.discard(h)
        _post(h.loop, [(h.queue, error)])

    def _fail_all(self, error: Exception) -> None:
        for rid, h in list(self._by_id.items()):
            self.engine.cancel(rid)
            self._drop(rid)
            self._finish_with(h, EngineFailed(str(error)))


def _settle(future: asyncio.Future, outcome: tuple) -> None:
    if not future.done():  # the caller may have gone (cancelled)
        future.set_result(outcome)


def _deliver(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _post(loop: asyncio.AbstractEventLoop, items: list) -> None:
    try:
        loop.call_soon_threadsafe(_deliver, items)
    except RuntimeError:  # that event loop is closed: nobody is listening any more
        pass
