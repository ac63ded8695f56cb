"""Stage 6, tokenize and pack: documents -> token ids -> flat numpy-memmap shards with EOS between
documents, plus a JSON index the loader reads. uint16 when the vocabulary fits (half the disk and
page cache), else uint32. The train/validation split is by document, decided by a hash of the id so
that it is stable across runs and independent of order and of the number of workers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError, atomic_path, atomic_write_json, read_json

INDEX_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


_PART = re.compile(r"#[A-Za-z]+$")


def is_validation(doc_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether a document is in a `fraction` sample chosen by a hash of its id: stable across runs,
    independent of order and of the number of workers. The validation split; with another seed,
    the tokenizer's training sample."""
    if fraction <= 0:
        return False
    # The parts of one document (ids "X#part", a letters-only part name, such as a module's prose
    # beside its code) split together: a model is never tested on a module whose other half it
    # trained on. Ids like "wiki#123" are documents of their own.
    doc_id = _PART.sub("", doc_id)
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def tokenize_texts(tokenizer, texts: Iterable[str], batch_size: int = 512) -> Iterator[np.ndarray]:
    """Token ids (uint32) of every text, in order; batches go to the Rust encoder's thread pool."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            yield from (np.asarray(ids, dtype=np.uint32) for ids in tokenizer.encode_batch(batch))
            batch = []
    if batch:
        yield from (np.asarray(ids, dtype=np.uint32) for ids in tokenizer.encode_batch(batch))


class ShardWriter:
    """Appends documents (+EOS) to `{split}-00000.bin`, `{split}-00001.bin`, ... of at most
    `shard_tokens` tokens each; a document is never split across shards (a larger one gets its own)."""

    def __init__(self, out_dir: str | Path, split: str, vocab_size: int, eos_id: int, shard_tokens: int) -> None:
        if eos_id is None:
            raise LmforgeError("the tokenizer has no eos_token: packing needs one to separate documents")
        self.out_dir, self.split, self.eos_id = Path(out_dir), split, eos_id
        self.dtype = token_dtype(vocab_size)
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._buf: list[np.ndarray] = []
        self._buf_tokens = 0
        self._buf_docs = 0
        self._eos = np.array([eos_id], dtype=self.dtype)

    def add(self, ids: np.ndarray) -> None:
        if self._buf_tokens and self._buf_tokens + len(ids) + 1 > self.shard_tokens:
            self._flush()
        self._buf += [ids.astype(self.dtype, copy=False), self._eos]
        self._buf_tokens += len(ids) + 1
        self._buf_docs += 1

    def _flush(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        with atomic_path(self.out_dir / name) as tmp:
            mm = np.memmap(tmp, dtype=self.dtype, mode="w+", shape=(self._buf_tokens,))
            mm[:] = np.concatenate(self._buf)
            mm.flush()
            del mm
        self.shards.append({"file": name, "tokens": self._buf_tokens, "documents": self._buf_docs})
        self._buf, self._buf_tokens, self._buf_docs = [], 0, 0

    def close(self) -> dict:
        if self._buf_tokens:
            self._flush()
        return {
            "shards": self.shards,
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
        }


def write_index(
    out_dir: str | Path, splits: dict[str, dict], vocab_size: int, eos_id: int, tokenizer_dir: str | None = "tokenizer"
) -> dict:
    index = {
        "version": INDEX_VERSION,
        "dtype": token_dtype(vocab_size).name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "tokenizer": tokenizer_dir,
        "splits": splits,
    }
    atomic_write_json(Path(out_dir) / "index.json", index)
    return index


def data_tokenizer(path: str | Path):
    """The tokenizer a shard folder was made with (its index.json names the tokenizer's folder)."""
    from lmforge.tokenizer import load_tokenizer  # the tokenizers library only when asked for

    folder = Path(path)
    index = read_json(folder / "index.json", "data index")
    return load_tokenizer(folder / (index.get("tokenizer") or "tokenizer"))


def read_index(path: str | Path) -> tuple[dict, Path]:
    """index.json (or its folder) -> (index, folder), checking the shards it names exist with the right size."""
    path = Path(path)
    file = path / "index.json" if path.is_dir() else path
    index = read_json(file, "data index")
    for key in ("dtype", "splits"):
        if key not in index:
            raise LmforgeError(f"{file}: not an lmforge data index (no {key!r})")
    folder = file.parent
    itemsize = np.dtype(index["dtype"]).itemsize
    for split, info in index["splits"].items():
        for shard in info["shards"]:
            f = folder / shard["file"]
            if not f.is_file():
                raise LmforgeError(f"{file}: shard {shard['file']} of split {split!r} is missing")
            if f.stat().st_size != shard["tokens"] * itemsize:
                raise LmforgeError(f"{f}: size {f.stat().st_size} bytes, index says {shard['tokens']} tokens")
    return index, folder


def iter_shard_documents(path: str | Path, split: str = "train") -> Iterator[np.ndarray]:
    """The token ids of every packed document of a split (the shards cut at EOS), in packed order."""
    index, folder = read_index(path)
    if split not in index["splits"]:
        raise LmforgeError(f"{folder}/index.json: no split {split!r} (has {', '.join(index['splits'])})")
    eos = index["eos_id"]
    for shard in index["splits"][split]["shards"]:
        tokens = np.memmap(folder / shard["file"], dtype=np.dtype(index["dtype"]), mode="r")
        ends = np.flatnonzero(tokens == eos)
        starts = np.concatenate([[0], ends[:-1] + 1])
        for s, e in zip(starts.tolist(), ends.tolist()):
            yield np.asarray(tokens[s:e])


def iter_shard_texts(path: str | Path, split: str = "train") -> Iterator[str]:
    """Every packed document of a split decoded with the folder's own tokenizer."""
    tokenizer = data_tokenizer(path)
    for ids in iter_shard_documents(path, split):
        yield tokenizer.decode(ids.tolist())
