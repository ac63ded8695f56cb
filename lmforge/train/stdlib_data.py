"""Built-in training data from the default corpus (the running interpreter's standard library), so
`lmforge pretrain` and `lmforge sft` work with nothing else:

* pretraining shards: a byte-budgeted, evenly spread subset of the stdlib (code and prose), a BPE
  tokenizer trained on it, packed with the data pipeline's ShardWriter into the folder format
  `lmforge.data.loader.ShardLoader` reads (cached: built once per settings).
* an SFT set: a function's signature in, the first sentence of its docstring out, split into
  train/validation by module so no module is in both.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from lmforge.common import atomic_dir, get_logger
from lmforge.data.readers import ReadReport
from lmforge.data.shards import ShardWriter, is_validation, write_index
from lmforge.data.stdlib import documented_functions, is_example, read_stdlib, signature, stdlib_files
from lmforge.tokenizer import train_tokenizer

log = get_logger("lmforge.train")


def _spread(files: list[Path], max_bytes: int) -> list[Path]:
    """Every k-th file so the subset covers the whole library, not just the modules starting with 'a'."""
    total = sum(f.stat().st_size for f in files)
    step = max(1, int(total / max(max_bytes, 1)))
    out, size = [], 0
    for f in files[::step]:
        if size >= max_bytes:
            break
        out.append(f)
        size += f.stat().st_size
    return out


def builtin_pretrain_data(
    cache_dir: str | Path, max_bytes: int = 2_000_000, vocab_size: int = 512, val_fraction: float = 0.05, seed: int = 0
) -> Path:
    """A shard folder (index.json + tokenizer/) built from the stdlib; reused when it exists."""
    key = hashlib.sha1(json.dumps([max_bytes, vocab_size, val_fraction, seed]).encode()).hexdigest()[:10]
    out = Path(cache_dir) / f"builtin-{key}"
    if (out / "index.json").is_file():
        return out
    log.info("building the built-in corpus (%d bytes of the stdlib, vocab %d) in %s", max_bytes, vocab_size, out)
    docs = list(read_stdlib(_spread(stdlib_files(), max_bytes), ReadReport()))
    tokenizer = train_tokenizer((d.text for d in docs), vocab_size=vocab_size)
    with atomic_dir(out) as tmp:
        writers = {s: ShardWriter(tmp, s, tokenizer.vocab_size, tokenizer.eos_id, 1 << 22) for s in ("train", "val")}
        for doc, ids in zip(docs, tokenizer.encode_batch([d.text for d in docs])):
            split = "val" if is_validation(doc.id, val_fraction, seed) else "train"
            writers[split].add(np.asarray(ids, dtype=np.uint32))
        splits = {s: w.close() for s, w in writers.items()}
        tokenizer.save(tmp / "tokenizer")
        write_index(tmp, splits, tokenizer.vocab_size, tokenizer.eos_id)
    return out


# ----------------------------------------------------------------------------- SFT set


def function_examples(source: str) -> list[dict]:
    """{"prompt": signature, "response": first docstring sentence} for each documented public function."""
    return [
        {"prompt": signature(node), "response": sentence}
        for node, sentence in documented_functions(source)
        if is_example(node, sentence)
    ]


def builtin_sft_examples(
    max_bytes: int | None = 1_500_000,
    val_fraction: float = 0.1,
    seed: int = 0,
    heldout_fraction: float = 0.0,
    split_seed: int = 0,
    root: str | Path | None = None,
) -> dict[str, list[dict]]:
    """{"train": [...], "val": [...]}: the examples of one module all land in the same split.

    One document split for the whole lifecycle: a module is named by the id the data pipeline gives
    it (`stdlib/<path>`), and the modules `is_validation(id, heldout_fraction, split_seed)` holds out
    (the pretraining validation split, which the built-in eval tasks test on) give no example at
    all. Of the rest, `val_fraction` (chosen with another seed) is the SFT validation set that picks
    the best checkpoint. `max_bytes=None` reads every module."""
    import sysconfig

    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root=base)
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for path in files if max_bytes is None else _spread(files, max_bytes):
        doc_id = f"stdlib/{path.relative_to(base).as_posix()}"
        if is_validation(doc_id, heldout_fraction, split_seed):
            continue  # a held-out module: the eval tasks' own
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        split = "val" if is_validation(doc_id, val_fraction, split_seed + seed + 1) else "train"
        splits[split].extend(function_examples(source))
    return splits
