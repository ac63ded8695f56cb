"""The engine's step loop in one background thread, its events fanned out to asyncio queues.

The HTTP handlers live on the event loop; the model runs here, off the loop, so streaming other
clients never waits for a forward. `submit` adds requests and registers their queues under one
lock, and events are dispatched under the same lock, so no event can arrive before its queue
exists. The number of requests in flight is bounded: past it `submit` raises QueueFull and the
server answers 429 instead of letting the queue grow without end.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Sequence

from lmforge.common import get_logger
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams

log = get_logger(__name__)


class QueueFull(Exception):
    pass


class EngineFailed(Exception):
    """The engine raised while stepping; every request in flight gets this instead of an event."""


@dataclass
class Submission:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    logprobs: int | None = None


class EngineRunner:
    def __init__(self, engine: Engine, max_in_flight: int):
        self.engine, self.max_in_flight = engine, max_in_flight
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)

    @property
    def in_flight(self) -> int:
        return len(self._queues)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, items: Sequence[Submission]) -> tuple[list[int], asyncio.Queue]:
        """Add all of `items` or none (QueueFull); returns their request ids and the one queue
        their events (or an EngineFailed) arrive on."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        with self._lock:
            if len(self._queues) + len(items) > self.max_in_flight:
                raise QueueFull(f"the server is at its limit of {self.max_in_flight} requests in flight")
            ids: list[int] = []
            try:
                for it in items:
                    ids.append(self.engine.add_request(it.prompt_ids, it.params, it.adapter, it.logprobs))
                    self._queues[ids[-1]] = (loop, queue)
            except Exception:
                for rid in ids:  # all or none
                    self._forget(rid, cancel=True)
                raise
        self._wake.set()
        return ids, queue

    def cancel(self, request_id: int) -> None:
        """Stop a request (client gone, timeout, stop string): its KV blocks are freed now."""
        with self._lock:
            self._forget(request_id, cancel=True)

    def _forget(self, request_id: int, cancel: bool) -> None:
        if self._queues.pop(request_id, None) is not None and cancel:
            self.engine.cancel(request_id)
        # The engine keeps every request it has seen; a long-running server must drop them.
        self.engine.requests.pop(request_id, None)

    def _loop(self) -> None:
        while not self._stopping:
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a bug, not a client's mistake: fail what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            with self._lock:
                # One wake-up per event loop per step, not one per event: fewer cross-thread calls.
                batches: dict[asyncio.AbstractEventLoop, list] = {}
                for ev in events:
                    entry = self._queues.get(ev.request_id)
                    if entry is not None:
                        batches.setdefault(entry[0], []).append((entry[1], ev))
                    if ev.finished:
                        self._forget(ev.request_id, cancel=False)
            for loop, items in batches.items():
                _post(loop, items)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            for rid, (loop, queue) in list(self._queues.items()):
                _post(loop, [(queue, EngineFailed(str(error)))])
                self._forget(rid, cancel=True)


def _deliver(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _post(loop: asyncio.AbstractEventLoop, items: list) -> None:
    try:
        loop.call_soon_threadsafe(_deliver, items)
    except RuntimeError:  # that event loop is closed: nobody is listening any more
        pass
