"""Supervised fine-tuning data: JSONL conversations -> (input_ids, labels) with loss only on what
the assistant wrote -> packed rows with document-aware attention.

Each JSONL line is {"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "response": ...}
(also "completion"/"output" for the answer). The tokenizer's chat template renders it, and
`Tokenizer.render_chat` gives the assistant-token mask, so training, serving and evaluation see the
same strings. Packing concatenates short examples into one row with `segment_ids`: the model lets
tokens attend only within their own segment, and positions restart at each segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.common import LmforgeError
from lmforge.common import read_jsonl as common_read_jsonl

from .objectives import IGNORE

_ANSWER_KEYS = ("response", "completion", "output")


def record_to_messages(record: dict, where: str) -> list[dict]:
    if not isinstance(record, dict):
        raise LmforgeError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return record["messages"]
    answer = next((record[k] for k in _ANSWER_KEYS if k in record), None)
    if "prompt" in record and answer is not None:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": answer}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": record["system"]})
        return messages
    raise LmforgeError(f"{where}: expected 'messages' or 'prompt' + 'response', found keys {sorted(record)}")


def read_jsonl(path: str | Path) -> list[list[dict]]:
    """Conversations of a JSONL file; errors name the file and line."""
    return [record_to_messages(record, where) for where, record in common_read_jsonl(path, "SFT data file")]


def encode_example(
    tokenizer, messages: list[dict], max_len: int, where: str = "example"
) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels[t] is token t+1 when the assistant wrote it, else IGNORE."""
    try:
        ids, mask = tokenizer.render_chat(messages)
    except LmforgeError as e:
        raise LmforgeError(f"{where}: {e}") from None
    ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    return ids[:-1], labels


@dataclass
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    segment_ids: list[int]


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> list[PackedRow]:
    """Greedy, order-preserving packing into rows of exactly seq_len; padding is its own segment (0)
    with no loss. Examples with no labelled token are dropped (nothing to learn)."""
    rows: list[PackedRow] = []
    cur = PackedRow([], [], [])
    for ids, labels in examples:
        if not any(l != IGNORE for l in labels):
            continue
        if cur.input_ids and len(cur.input_ids) + len(ids) > seq_len:
            rows.append(cur)
            cur = PackedRow([], [], [])
        seg = len(set(cur.segment_ids)) + 1
        cur.input_ids += ids
        cur.labels += labels
        cur.segment_ids += [seg] * len(ids)
    if cur.input_ids:
        rows.append(cur)
    for r in rows:
        n = seq_len - len(r.input_ids)
        r.input_ids += [pad_id] * n
        r.labels += [IGNORE] * n
        r.segment_ids += [0] * n
    return rows


def replay_rows(folder, n: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[PackedRow]:
    """n windows of seq_len tokens from a packed data folder's train split, as rows with a label on
    every token: rehearsal of the pretraining data during fine-tuning (seeded, evenly spread)."""
    import numpy as np

    from lmforge.data.shards import read_index

    index, root = read_index(folder)
    if index.get("vocab_size") != vocab_size:
        raise LmforgeError(
            f"data.replay {folder}: vocabulary {index.get('vocab_size')} != the model tokenizer's "
            f"{vocab_size} (replay data must be tokenized by the model's tokenizer)"
        )
    shards = [
        np.memmap(root / s["file"], dtype=np.dtype(index["dtype"]), mode="r")
        for s in index["splits"]["train"]["shards"]
        if s["tokens"] > seq_len + 1
    ]
    if n > 0 and not shards:
        raise LmforgeError(f"data.replay {folder}: no train shard holds a window of {seq_len + 1} tokens")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        shard = shards[int(rng.integers(len(shards)))]
        start = int(rng.integers(0, len(shard) - seq_len - 1))
        window = np.asarray(shard[start : start + seq_len + 1], dtype=np.int64).tolist()
        rows.append(PackedRow(window[:-1], window[1:], [1] * seq_len))
    return rows


class PackedBatches:
    """Seeded shuffled epochs over packed rows; rank r of W takes batches r, r+W, ... of the global
    sequence (so W ranks x A accumulation == 1 process x A*W), with a resumable position."""

    def __init__(
        self,
        rows: list[PackedRow],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        segments: bool = True,
    ):
        if len(rows) < batch_size * world_size:
            raise LmforgeError(
                f"only {len(rows)} packed rows: fewer than one batch of {batch_size} x "
                f"{world_size} rank(s) (use more data or a smaller batch)"
            )
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        # One example per row with padding at the end needs no segments: causal attention already
        # keeps real tokens from seeing the pads after them.
        self.keys = ("input_ids", "labels", "segment_ids") if segments else ("input_ids", "labels")
        self.rank, self.world_size = rank, world_size
        self.per_epoch = len(rows) // batch_size
        self.position = 0

    def batch_at(self, index: int) -> dict:
        epoch, i = divmod(index, self.per_epoch)
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        picked = [self.rows[j] for j in order[i * self.batch_size : (i + 1) * self.batch_size].tolist()]
        return {k: torch.tensor([getattr(r, k) for r in picked]) for k in self.keys}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.batch_at(self.position * self.world_size + self.rank)
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position, "world_size": self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"]) * int(state.get("world_size", 1)) // self.world_size

    def close(self) -> None:
        pass
