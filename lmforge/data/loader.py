"""Stage 7, load: random windows of `seq_len + 1` tokens from the packed shards -> (x, y) batches.

An epoch is a seeded permutation of all windows (a window never crosses a shard; the window grid
shifts by a seeded offset each epoch so every token is a window start sometime). Step k of an
epoch takes windows [k*B*W, (k+1)*B*W) of the permutation and rank r the r-th block of B of them,
so ranks never read the same window in a step. Batches are a pure function of
(seed, epoch, step, rank): `state_dict()` is just that position, and a resumed run continues with
exactly the batches it would have seen. A background thread prepares the next batches.

    loader = ShardLoader("data/out", seq_len=256, batch_size=8, seed=0)
    x, y = next(loader)          # LongTensor [8, 256] each; y is x shifted by one token
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError
from lmforge.data.shards import read_index


class ShardLoader:
    def __init__(
        self,
        path_or_index: str | Path,
        seq_len: int,
        batch_size: int,
        split: str = "train",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 4,
    ) -> None:
        index, folder = read_index(path_or_index)
        if split not in index["splits"]:
            raise LmforgeError(f"{folder}/index.json has no split {split!r} (splits: {', '.join(index['splits'])})")
        if not 0 <= rank < world_size:
            raise LmforgeError(f"rank {rank} is outside world_size {world_size}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        self.vocab_size, self.eos_id = index.get("vocab_size"), index.get("eos_id")
        dtype = np.dtype(index["dtype"])
        self.shards = [
            np.memmap(folder / s["file"], dtype=dtype, mode="r")
            for s in index["splits"][split]["shards"]
            if s["tokens"] > 0
        ]
        if not self.shards:  # e.g. a val fraction too small to give the split one document
            raise LmforgeError(
                f"{folder}: split {split!r} has no tokens (no non-empty shards); "
                f"prepare more data or choose another split"
            )
        self.tokens = sum(len(s) for s in self.shards)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # the current and the next epoch
        self._epochs_lock = threading.Lock()
        if self.steps_per_epoch(0) == 0:
            raise LmforgeError(
                f"split {split!r} has {self.tokens} tokens: too few for one batch of "
                f"{world_size} x {batch_size} windows of {seq_len + 1} tokens"
            )
        self.epoch, self.step = 0, 0  # position of the next batch handed out
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()

    # ------------------------------------------------------------------ windows

    def _epoch_windows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, start token) of every window of this epoch, in the epoch's random order."""
        with self._epochs_lock:
            if epoch not in self._epochs:
                self._epochs[epoch] = self._make_windows(epoch)
                for old in sorted(self._epochs)[:-2]:
                    del self._epochs[old]
            return self._epochs[epoch]

    def _make_windows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        offset = int(rng.integers(self.seq_len))
        shard_ids, starts = [], []
        for i, shard in enumerate(self.shards):
            o = offset if len(shard) - 1 - offset >= self.seq_len else 0
            n = (len(shard) - 1 - o) // self.seq_len
            shard_ids.append(np.full(n, i, dtype=np.int64))
            starts.append(o + self.seq_len * np.arange(n, dtype=np.int64))
        order = rng.permutation(sum(len(s) for s in starts))
        return np.concatenate(shard_ids)[order], np.concatenate(starts)[order]

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        n = len(self._epoch_windows(self.epoch if epoch is None else epoch)[0])
        return n // (self.batch_size * self.world_size)

    def batch_at(self, epoch: int, step: int):
        """The (x, y) this rank gets at (epoch, step); a pure function of the position."""
        import torch

        shard_ids, starts = self._epoch_windows(epoch)
        first = (step * self.world_size + self.rank) * self.batch_size
        rows = np.stack(
            [
                self.shards[s][b : b + self.seq_len + 1]
                for s, b in zip(
                    shard_ids[first : first + self.batch_size].tolist(),
                    starts[first : first + self.batch_size].tolist(),
                )
            ]
        ).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def _advance(self, epoch: int, step: int) -> tuple[int, int]:
        step += 1
        if step >= self.steps_per_epoch(epoch):
            return epoch + 1, 0
        return epoch, step

    # ------------------------------------------------------------------ iteration with prefetch

    def _produce(self, epoch: int, step: int, stop: threading.Event, out: queue.Queue) -> None:
        while not stop.is_set():
            item = (epoch, step, *self.batch_at(epoch, step))
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            epoch, step = self._advance(epoch, step)

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=max(1, self.prefetch))
        self._thread = threading.Thread(
            target=self._produce,
            args=(self.epoch, self.step, self._stop, self._queue),
            daemon=True,
            name="ShardLoader-prefetch",
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self):
        if self.prefetch <= 0:
            x, y = self.batch_at(self.epoch, self.step)
        else:
            if self._thread is None:
                self._start()
            epoch, step, x, y = self._queue.get()
            assert (epoch, step) == (self.epoch, self.step), "prefetch out of step"
        self.epoch, self.step = self._advance(self.epoch, self.step)
        return x, y

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "seq_len"):
            if key in state and state[key] != getattr(self, key):
                raise LmforgeError(
                    f"loader state has {key}={state[key]}, this loader {key}={getattr(self, key)}: "
                    "resuming would not reproduce the batches"
                )
        # Another world size (a run resumed on fewer or more nodes): the same place in the epoch's
        # window order, when it falls on a step boundary of this world (W ranks x k steps each).
        seen = int(state["step"]) * int(state.get("world_size", self.world_size))
        if seen % self.world_size:
            raise LmforgeError(
                f"loader state is at {seen} batches of its epoch, not a multiple of this world_size "
                f"{self.world_size}: resuming would not reproduce the batches"
            )
        self.close()
        self.epoch, self.step = int(state["epoch"]), seen // self.world_size

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
