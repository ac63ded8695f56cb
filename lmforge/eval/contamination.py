"""Contamination: each task example checked against the training corpus with the data package's
n-gram index (`lmforge.data.ngram`, 13-gram by default as in GPT-3). Contaminated examples are
flagged in the results and every task's metrics are also reported on the clean subset.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from lmforge.common import LmforgeError, read_jsonl
from lmforge.data.ngram import NGramIndex, check_examples, summarize


def _corpus_texts(path: Path) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if f.suffix == ".jsonl":  # a bad line is named (path:line), not a JSONDecodeError traceback
            yield from (_record_text(record) for _, record in read_jsonl(f, "contamination corpus file"))
        elif f.suffix in (".txt", ".md", ".py", ".rst"):
            yield f.read_text(encoding="utf-8", errors="replace")


def _record_text(record) -> str:
    """A JSONL record's text: its "text" field, else all its strings (prompt/response, chat messages)."""
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, str):
        return record
    values = record.values() if isinstance(record, dict) else record if isinstance(record, list) else []
    return "\n".join(_record_text(v) for v in values if isinstance(v, (str, dict, list)))


def load_index(spec: str | Path | list, n: int = 13) -> NGramIndex:
    """A saved index (.npy, from `NGramIndex.save`), a packed data folder (its train split), or a
    corpus file/folder (.txt/.md/.py/.rst/.jsonl) indexed on the fly; a list of corpora (files,
    folders, packed data) makes one index of everything a model trained on (pretraining + SFT)."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    paths = [Path(s) for s in specs]
    for path in paths:
        if not path.exists():
            raise LmforgeError(f"contamination corpus/index not found: {path}")
    if len(paths) == 1 and paths[0].suffix == ".npy":
        return NGramIndex.load(paths[0])
    if any(p.suffix == ".npy" for p in paths):
        raise LmforgeError("a saved .npy contamination index cannot be combined with other corpora")
    return NGramIndex.build((text for p in paths for text in _texts_of(p)), n=n)


def _texts_of(path: Path) -> Iterator[str]:
    if (path / "index.json").is_file():
        from lmforge.data.shards import iter_shard_texts  # decoded with the tokenizer stored next to them

        return iter_shard_texts(path)
    return _corpus_texts(path)


def index_from_texts(texts: Iterable[str], n: int = 13) -> NGramIndex:
    return NGramIndex.build(texts, n=n)


def example_text(record: dict) -> str:
    """The part of an example a model could have memorised: question and gold answer."""
    text = record.get("input", record.get("prompt", ""))  # the example itself, not its few-shot prefix
    if "choices" in record:
        return text + " " + record["choices"][record["gold"]]
    if "answers" in record:
        return text + " " + record["answers"][0]
    return str(record.get("prompt", record.get("question", record.get("text", ""))))


def flag(result, cfg, index: NGramIndex, min_overlap: int | None = None) -> None:
    """Mark `result.examples` (contaminated, longest_overlap) and add the clean-subset metrics."""
    from lmforge.eval.tasks import aggregate

    if result.type == "perplexity":
        return  # documents are scored whole; their overlap is reported by the data pipeline's decontamination
    checks = check_examples(index, [(r["id"], example_text(r)) for r in result.examples], min_overlap)
    for record, c in zip(result.examples, checks):
        record["contaminated"] = c.contaminated
        record["longest_overlap"] = c.longest_overlap
    result.contamination = summarize(checks)
    result.metrics_clean = aggregate(cfg, [r for r in result.examples if not r["contaminated"]])
