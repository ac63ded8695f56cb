"""Continuous batching on a tensor-parallel model: rank 0 schedules, every rank steps.

    # every rank: model = apply_tensor_parallel(model, tp, device); group = control_group()
    if rank == 0:
        engine = TPEngine(model, tokenizer, group=group, ...)   # an Engine: add_request, step, ...
        ...
        engine.close()                                            # the followers return
    else:
        follow(model, group)

The scheduler, the block pool, sampling, grammars and stop strings live on rank 0 only: they need
no model, and one copy cannot disagree with itself. What every rank must do together is each model
forward, since a sharded forward all-reduces inside every block. So rank 0 sends, before each one,
what the forward needs (its rows: new tokens, first position, block table; or a plain call's
arguments) over a gloo group of its own, and every rank runs that same forward on its shard, into
its own paged KV cache (the same block ids, its own heads). The logits come out gathered on every
rank; only rank 0 samples from them. The swaps of KV offload travel the same way (each rank keeps
its own heads' copy of a swapped-out sequence until rank 0 swaps it back in or drops it).

A draft model (`draft=`) is not sharded: it runs on rank 0 alone, like the rest of the scheduling;
only the target's verify forward runs everywhere. Prompt lookup needs no model at all.

The control group has its own long timeout: a server may sit idle for hours with the followers
waiting for the next step, which the default group's timeout (minutes) would end.
"""

from __future__ import annotations

import datetime
import weakref

import torch
import torch.distributed as dist

from lmforge.common import LmforgeError, get_logger

from .engine import Engine
from .paged import PagedKVCache, forward_packed, forward_padded

log = get_logger(__name__)

IDLE_TIMEOUT = datetime.timedelta(days=365)  # followers wait for rank 0's next step this long


_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # the default group -> its control group


def control_group():
    """The gloo group over every rank for rank 0's step messages: made once per process group (the
    first call is collective: every rank makes it, in the same order as its other groups)."""
    world = dist.group.WORLD
    if world not in _GROUPS:
        _GROUPS[world] = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return _GROUPS[world]


def _broadcast(message, group) -> object:
    box = [message]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class _Swapped(list):
    """Rank 0's copy of a swapped-out sequence's KV (what the scheduler keeps), tagged with the key
    under which the followers keep theirs."""

    key: int


class _MirroredCache:
    """The scheduler's cache on rank 0: swap-outs and swap-ins also happen on every follower."""

    def __init__(self, cache, engine: TPEngine):
        self.cache, self.engine, self._keys = cache, engine, 0

    def __getattr__(self, name: str):
        return getattr(self.cache, name)

    def read_blocks(self, blocks: list[int], device="cpu") -> _Swapped:
        self._keys += 1
        self.engine._send(("swap_out", self._keys, list(blocks)))
        data = _Swapped(self.cache.read_blocks(blocks, device))
        data.key = self._keys
        # A swapped-out sequence that is cancelled never swaps in: its followers' copies go with it.
        weakref.finalize(data, self.engine._dropped.append, self._keys)
        return data

    def write_blocks(self, blocks: list[int], data: _Swapped) -> None:
        self.engine._send(("swap_in", data.key, list(blocks)))
        self.cache.write_blocks(blocks, data)


class _MirroredModel:
    """Rank 0's model as the engine's owner sees it: a direct call (pooled embeddings, say) runs on
    every rank. Everything else is the sharded model itself."""

    def __init__(self, model, engine: TPEngine):
        self._model, self._engine = model, engine

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        if kwargs.get("kv_cache") is not None:
            raise LmforgeError("a direct call of a tensor-parallel engine's model cannot use a KV cache")
        self._engine._send(("call", args, kwargs))
        return self._model(*args, **kwargs)


class TPEngine(Engine):
    """An Engine on rank 0 of a tensor-parallel model whose followers run `follow`."""

    def __init__(self, model, tokenizer=None, *, group=None, **kwargs):
        if getattr(model, "tp_mesh", None) is None:
            raise LmforgeError("TPEngine needs a model sharded by lmforge.parallel.apply_tensor_parallel")
        if dist.get_rank() != 0:
            raise LmforgeError("TPEngine runs on rank 0; the other ranks run lmforge.infer.engine_tp.follow")
        self.group = group if group is not None else control_group()
        self._dropped: list[int] = []
        self._closed = False
        super().__init__(model, tokenizer, **kwargs)
        c = self.cache
        self._send(("init", c.num_blocks, c.block_size, c.k[0].dtype))
        self.scheduler.cache = _MirroredCache(self.scheduler.cache, self)
        self._sharded = model
        self.model = _MirroredModel(model, self)

    def _send(self, message: tuple) -> None:
        if self._closed:
            raise LmforgeError("this tensor-parallel engine is closed")
        dropped, self._dropped = self._dropped, []
        _broadcast((message, dropped), self.group)

    def forward_packed(self, model, cache, rows):
        self._send(("packed", rows))
        return forward_packed(self._sharded, cache, rows)

    def forward_padded(self, model, cache, rows, keep: int = 1, row_ids=None):
        self._send(("padded", rows, keep, row_ids))
        return forward_padded(self._sharded, cache, rows, keep, row_ids)

    def close(self) -> None:
        """Release the followers (they return from `follow`). Waits for a step in progress."""
        with self._lock:
            if not self._closed:
                self._send(("stop",))
                self._closed = True


@torch.inference_mode()
def follow(model, group=None) -> None:
    """The loop of a rank > 0: run every forward rank 0's TPEngine sends, on this rank's shard, until
    it closes. A forward that raises here raises on rank 0 too (the same inputs): it is logged and
    the loop goes on, as the engine does."""
    group = group if group is not None else control_group()
    config = getattr(model, "tp_local_config", model.config)
    device = next(model.parameters()).device
    cache, swapped = None, {}
    while True:
        message, dropped = _broadcast(None, group)
        for key in dropped:
            swapped.pop(key, None)
        kind, args = message[0], message[1:]
        if kind == "stop":
            return
        try:
            if kind == "init":
                num_blocks, block_size, dtype = args
                cache, swapped = PagedKVCache(config, num_blocks, block_size, device, dtype), {}
            elif kind == "packed":
                forward_packed(model, cache, *args)
            elif kind == "padded":
                forward_padded(model, cache, *args)
            elif kind == "call":
                model(*args[0], **args[1])
            elif kind == "swap_out":
                swapped[args[0]] = cache.read_blocks(args[1])
            elif kind == "swap_in":
                cache.write_blocks(args[1], swapped.pop(args[0]))
            else:
                raise LmforgeError(f"unknown message {kind!r} from rank 0")
        except Exception:
            log.exception("tensor-parallel follower: %s failed", kind)
