"""Stage 1, read: files (txt, md, jsonl, parquet; gzip/zstd compressed), folders and globs -> Documents.

Readers are generators, so memory stays flat whatever the corpus size. Bad input (undecodable
bytes, empty files, broken JSON lines, missing fields) is counted in a `ReadReport` with the file
and line, never raised: one bad line in a 100 GB crawl must not stop the run.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from lmforge.common import LmforgeError

# Source files: read whole like text, and of kind "code" (the quality filters, built for prose, skip them).
CODE_SUFFIXES = {
    ".py",
    ".pyi",
    ".js",
    ".mjs",
    ".cjs",
    ".jsx",
    ".ts",
    ".tsx",
    ".java",
    ".kt",
    ".scala",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".cxx",
    ".hpp",
    ".cs",
    ".go",
    ".rs",
    ".rb",
    ".php",
    ".swift",
    ".sh",
    ".bash",
    ".sql",
    ".lua",
    ".r",
    ".jl",
    ".pl",
    ".hs",
    ".ml",
}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".markdown"} | CODE_SUFFIXES
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
COMPRESSED = {".gz", ".zst", ".zstd"}
MAX_RECORDED_PROBLEMS = 200


@dataclass
class Document:
    """One document flowing through the stages. `meta` carries stage results (e.g. the filter rule).
    `kind` is "code" (a source file, a JSONL record with "kind": "code", the built-in corpus's code)
    or "prose" (everything else): the quality filters and language ID apply to prose by default."""

    id: str
    text: str
    source: str
    meta: dict = field(default_factory=dict)
    kind: str = "prose"


@dataclass
class ReadReport:
    """What the readers skipped, and where. `problems` keeps the first few as "file:line: reason"."""

    files: int = 0
    documents: int = 0
    bytes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.problems) < MAX_RECORDED_PROBLEMS:
            self.problems.append(f"{where}: {reason}")

    def merge(self, other: ReadReport) -> None:
        self.files += other.files
        self.documents += other.documents
        self.bytes += other.bytes
        for k, v in other.skipped.items():
            self.skipped[k] = self.skipped.get(k, 0) + v
        room = MAX_RECORDED_PROBLEMS - len(self.problems)
        self.problems.extend(other.problems[: max(room, 0)])

    def to_dict(self) -> dict:
        return {
            "files": self.files,
            "documents": self.documents,
            "bytes": self.bytes,
            "skipped": dict(sorted(self.skipped.items())),
            "problems": self.problems,
        }


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files, folders (recursively) and glob patterns -> a sorted, de-duplicated list of files."""
    found: list[Path] = []
    for item in inputs:
        s = str(item)
        matches = sorted(glob.glob(s, recursive=True)) if any(c in s for c in "*?[") else [s]
        if not matches:
            raise LmforgeError(f"input pattern {s!r} matches no file")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                found.extend(sorted(f for f in p.rglob("*") if f.is_file() and _format(f) is not None))
            elif p.is_file():
                found.append(p)
            else:
                raise LmforgeError(f"input not found: {p}")
    out, seen = [], set()
    for p in found:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _format(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in CODE_SUFFIXES:
        return "code"
    if last in JSONL_SUFFIXES:
        return "jsonl"
    if last in PARQUET_SUFFIXES:
        return "parquet"
    if last in TEXT_SUFFIXES:
        return "text"
    return None


def _open_binary(path: Path) -> IO[bytes]:
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix in (".zst", ".zstd"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def _decode(raw: bytes, report: ReadReport, where: str) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        report.skip(f"undecodable bytes (not UTF-8 at byte {e.start})", where)
        return None


def read_text_file(path: Path, source: str, report: ReadReport, kind: str = "prose") -> Iterator[Document]:
    """A whole .txt/.md (or source code) file is one document."""
    try:
        with _open_binary(path) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        report.skip(f"unreadable file ({e})", str(path))
        return
    text = _decode(raw, report, f"{path}:1")
    if text is None:
        return
    if not text.strip():
        report.skip("empty document", f"{path}:1")
        return
    report.bytes += len(raw)
    report.documents += 1
    yield Document(id=f"{path}", text=text, source=source, kind=kind)


def read_jsonl_file(path: Path, source: str, report: ReadReport, text_field: str = "text") -> Iterator[Document]:
    """One JSON object per line; the document text is `text_field` (dots reach into nested objects);
    a record with "kind": "code" is code, every other one prose."""
    try:
        f = io.BufferedReader(_open_binary(path))  # type: ignore[arg-type]
    except OSError as e:
        report.skip(f"unreadable file ({e})", str(path))
        return
    with f:
        for lineno, raw in enumerate(_safe_lines(f, path, report), start=1):
            where = f"{path}:{lineno}"
            line = _decode(raw, report, where)
            if line is None or not line.strip():
                if line is not None:
                    report.skip("empty line", where)
                continue
            doc = _json_document(line, text_field, report, where)
            if doc is None:
                continue
            text, doc_id, kind = doc
            report.bytes += len(raw)
            report.documents += 1
            yield Document(id=doc_id or where, text=text, source=source, kind=kind)


def _safe_lines(f: IO[bytes], path: Path, report: ReadReport) -> Iterator[bytes]:
    try:
        yield from f
    except (OSError, EOFError) as e:  # truncated gzip/zstd stream: keep what was read
        report.skip(f"truncated or corrupt compressed stream ({e})", str(path))


def _json_document(line: str, text_field: str, report: ReadReport, where: str) -> tuple[str, str | None, str] | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        report.skip(f"bad JSON ({e.msg} at column {e.colno})", where)
        return None
    value = obj
    for part in text_field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if not isinstance(value, str):
        report.skip(f"no string field {text_field!r}", where)
        return None
    if not value.strip():
        report.skip("empty document", where)
        return None
    doc_id = obj.get("id") if isinstance(obj, dict) else None
    kind = "code" if isinstance(obj, dict) and obj.get("kind") == "code" else "prose"
    return value, (str(doc_id) if doc_id is not None else None), kind


def read_parquet_file(path: Path, source: str, report: ReadReport, text_field: str = "text") -> Iterator[Document]:
    """Row groups are read one at a time so a large file does not land in memory at once."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        report.skip(f"unreadable parquet ({e})", str(path))
        return
    if text_field not in pf.schema_arrow.names:
        raise LmforgeError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for rg in range(pf.num_row_groups):
        for value in pf.read_row_group(rg, columns=[text_field]).column(0).to_pylist():
            row += 1
            where = f"{path}:row {row}"
            if not isinstance(value, str) or not value.strip():
                report.skip("empty document", where)
                continue
            report.bytes += len(value.encode("utf-8"))
            report.documents += 1
            yield Document(id=where, text=value, source=source)


def read_files(
    paths: Iterable[Path], source: str | None, report: ReadReport, text_field: str = "text"
) -> Iterator[Document]:
    """Documents of already-expanded files, in order. `source` None names each by its file stem."""
    for path in paths:
        fmt = _format(path)
        name = source or path.name.split(".")[0]
        report.files += 1
        if fmt == "jsonl":
            yield from read_jsonl_file(path, name, report, text_field)
        elif fmt == "parquet":
            yield from read_parquet_file(path, name, report, text_field)
        elif fmt in ("text", "code"):
            yield from read_text_file(path, name, report, kind="code" if fmt == "code" else "prose")
        else:
            report.skip("unsupported file type", str(path))


def read_inputs(
    inputs: Iterable[str | os.PathLike],
    source: str | None = None,
    text_field: str = "text",
    report: ReadReport | None = None,
) -> Iterator[Document]:
    """The convenience entry point: files/folders/globs -> Documents."""
    return read_files(expand_inputs(inputs), source, report if report is not None else ReadReport(), text_field)
