"""A retrieval index on disk, built from files and folders, updated incrementally.

    INDEX/manifest.json   format, settings (chunking, Chinese tokenisation, embedding model + its
                          fingerprint) and, per file, its SHA-256 and the rows of its chunks
    INDEX/chunks.jsonl    one chunk a line: id, file, record, start_line, end_line, title, text
    INDEX/terms.jsonl     the chunk's BM25 terms (so an update re-tokenises changed files only)
    INDEX/bm25/           the bm25s index
    INDEX/vectors.npy     float32 [chunks, dim] unit vectors (when built with an embedding model)

`build_index` reuses every file whose content hash and settings are unchanged (its chunks, terms and
vectors), re-reads the changed and new files, and drops the removed ones. The whole folder is written
next to the old one and swapped in with a rename, so a crash never leaves half an index.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError, atomic_dir, atomic_write_json, get_logger, read_json
from lmforge.data.readers import ReadReport, expand_inputs, read_files
from lmforge.rag.chunking import Chunk, chunk_text
from lmforge.rag.sparse import Bm25
from lmforge.rag.terms import CHINESE_MODES, terms

log = get_logger("lmforge.rag")
FORMAT = "lmforge-rag/1"


@dataclass
class IndexSettings:
    max_chars: int = 800  # characters per chunk
    overlap: int = 150  # characters repeated from the previous chunk
    chinese: str = "bigram"  # Chinese BM25 terms: "bigram" (as good as jieba on our set, no dictionary) or "jieba"
    text_field: str = "text"  # JSONL/parquet field holding the text
    embedder: str | None = None  # embedding model folder (absolute); None: BM25 only
    embedder_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.max_chars < 1 or not 0 <= self.overlap < self.max_chars:
            raise LmforgeError(f"chunk size {self.max_chars} and overlap {self.overlap}: need 0 <= overlap < size")
        if self.chinese not in CHINESE_MODES:
            raise LmforgeError(
                f"unknown Chinese tokenisation {self.chinese!r} (choose from {', '.join(CHINESE_MODES)})"
            )

    def chunking(self) -> tuple:
        return (self.max_chars, self.overlap, self.text_field)


@dataclass
class RagIndex:
    folder: Path
    settings: IndexSettings
    chunks: list[Chunk]
    terms: list[list[str]]
    vectors: np.ndarray | None
    files: dict[str, dict] = field(default_factory=dict)
    bm25: Bm25 | None = None
    _embedder: object = None
    _vector_index: object = None

    @classmethod
    def load(cls, folder: str | Path) -> RagIndex:
        folder = Path(folder)
        if not (folder / "manifest.json").is_file():
            what = "does not exist" if not folder.exists() else "has no manifest.json"
            raise LmforgeError(f"{folder}: not an lmforge rag index ({what}; build one with `lmforge rag index`)")
        manifest = read_json(folder / "manifest.json", "rag index manifest")
        if manifest.get("format") != FORMAT:
            raise LmforgeError(f"{folder}/manifest.json: format {manifest.get('format')!r}, expected {FORMAT!r}")
        settings = IndexSettings(**manifest["settings"])
        chunks = [Chunk(**json.loads(line)) for line in _lines(folder / "chunks.jsonl")]
        if not chunks:
            raise LmforgeError(f"{folder}: the index is empty (no chunks)")
        toks = [json.loads(line) for line in _lines(folder / "terms.jsonl")]
        vectors = np.load(folder / "vectors.npy") if (folder / "vectors.npy").is_file() else None
        index = cls(folder, settings, chunks, toks, vectors, manifest["files"])
        index.bm25 = Bm25.load(folder / "bm25", len(chunks))
        return index

    def embedder(self):
        """The embedding model the vectors were made with (loaded once)."""
        if self._embedder is None:
            if self.settings.embedder is None or self.vectors is None:
                raise LmforgeError(f"{self.folder}: built without an embedding model; dense search needs --embedder")
            from lmforge.rag.embedders import load_embedder

            self._embedder = load_embedder(self.settings.embedder)
        return self._embedder

    def fusion(self) -> tuple[str, float | None]:
        """How hybrid search fuses: the encoder folder's fusion.json (written by `rag train-encoder`,
        tuned on its dev split), else reciprocal rank fusion."""
        path = Path(self.settings.embedder) / "fusion.json" if self.settings.embedder else None
        if path is None or not path.is_file():
            return "rrf", None
        tuned = read_json(path, "fusion settings")
        if tuned.get("fusion") not in ("rrf", "convex"):
            raise LmforgeError(f"{path}: fusion must be 'rrf' or 'convex', got {tuned.get('fusion')!r}")
        return tuned["fusion"], tuned.get("alpha")

    def vector_index(self, backend: str = "auto"):
        if self._vector_index is None or self._vector_index.backend != backend and backend != "auto":
            from lmforge.rag.dense import VectorIndex

            if self.vectors is None:
                raise LmforgeError(f"{self.folder}: the index has no vectors (built without --embedder)")
            self._vector_index = VectorIndex(self.vectors, backend)
        return self._vector_index


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise LmforgeError(f"{path}: missing (an incomplete index; rebuild it with `lmforge rag index`)")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def indexed_text(chunk: Chunk) -> str:
    """What BM25 and the embedder see: the file and heading path, then the text (a chunk's title often
    carries the words a question uses: the module, the section)."""
    title = "" if chunk.title == chunk.file else f" {chunk.title}"
    # The file's last three path parts: the folders nearest the file name its topic, an absolute prefix
    # ("/home/me/...") is the same for every chunk and only costs the embedder tokens.
    return f"{'/'.join(Path(chunk.file).parts[-3:])}{title}\n{chunk.text}"


def _record(doc_id: str, path: Path) -> str | None:
    """The record part of a chunk id: None for a whole-file document, else the JSONL line / parquet
    row ("L12", "row3") or the record's own id."""
    if doc_id == str(path):
        return None
    rest = doc_id[len(str(path)) + 1 :] if doc_id.startswith(f"{path}:") else doc_id
    return f"L{rest}" if rest.isdigit() else rest.replace(" ", "")


def _file_chunks(path: Path, settings: IndexSettings, report: ReadReport) -> list[Chunk]:
    out: list[Chunk] = []
    for doc in read_files([path], None, report, settings.text_field):
        record = _record(doc.id, path)
        out += chunk_text(doc.text, str(path), record, doc.kind == "code", settings.max_chars, settings.overlap)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _previous(out: Path) -> RagIndex | None:
    if not out.exists():
        return None
    if not (out / "manifest.json").is_file():
        if out.is_dir() and not any(out.iterdir()):
            return None
        raise LmforgeError(f"{out}: exists and is not an lmforge rag index; choose another output folder")
    try:
        return RagIndex.load(out)
    except LmforgeError as e:
        log.warning("%s: rebuilding from scratch (%s)", out, e)
        return None


def build_index(inputs: list[str], out: str | Path, settings: IndexSettings, embedder=None) -> dict:
    """Index `inputs` (files, folders, globs) into `out`, reusing unchanged files of an index already
    there. `embedder`: an Embedder (dense.py) whose folder is `settings.embedder`, or None. -> stats."""
    out = Path(out)
    t0 = time.perf_counter()
    paths = expand_inputs(inputs)
    if not paths:
        raise LmforgeError(f"no readable file in {', '.join(map(str, inputs))} (txt, md, jsonl, parquet, source)")
    old = _previous(out)
    same_chunks = old is not None and old.settings.chunking() == settings.chunking()
    same_terms = same_chunks and old.settings.chinese == settings.chinese
    same_vectors = (
        same_chunks
        and old.vectors is not None
        and (old.settings.embedder_fingerprint, settings.embedder_fingerprint) != (None, None)
        and old.settings.embedder_fingerprint == settings.embedder_fingerprint
    )
    report = ReadReport()
    chunks: list[Chunk] = []
    toks: list[list[str]] = []
    vecs: list[np.ndarray | None] = []
    files: dict[str, dict] = {}
    stats = {"files": len(paths), "reindexed": 0, "reused": 0, "removed": 0}
    for path in paths:
        key, digest = os.path.abspath(path), _sha256(path)
        prev = old.files.get(key) if same_chunks else None
        start = len(chunks)
        if prev is not None and prev["sha256"] == digest:
            rows = range(prev["first"], prev["first"] + prev["count"])
            chunks += [old.chunks[i] for i in rows]
            toks += (
                [old.terms[i] for i in rows]
                if same_terms
                else [terms(indexed_text(old.chunks[i]), settings.chinese) for i in rows]
            )
            vecs += [old.vectors[i] if same_vectors else None for i in rows]
            stats["reused"] += 1
        else:
            new = _file_chunks(path, settings, report)
            chunks += new
            toks += [terms(indexed_text(c), settings.chinese) for c in new]
            vecs += [None] * len(new)
            stats["reindexed"] += 1
        files[key] = {"sha256": digest, "first": start, "count": len(chunks) - start}
    stats["removed"] = len(set(old.files) - set(files)) if old is not None else 0
    if not chunks:
        raise LmforgeError(
            f"nothing to index in {', '.join(map(str, inputs))}: {len(paths)} file(s) read, no text found"
            + (f" (skipped: {report.skipped})" if report.skipped else "")
        )
    vectors = _vectors(chunks, vecs, embedder)
    with atomic_dir(out) as tmp:
        Bm25.build(toks).save(tmp / "bm25")
        (tmp / "chunks.jsonl").write_text(
            "".join(json.dumps(c.to_dict(), ensure_ascii=False) + "\n" for c in chunks), encoding="utf-8"
        )
        (tmp / "terms.jsonl").write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in toks), "utf-8")
        if vectors is not None:
            np.save(tmp / "vectors.npy", vectors)
        manifest = {"format": FORMAT, "settings": asdict(settings), "files": files, "chunks": len(chunks)}
        atomic_write_json(tmp / "manifest.json", manifest)
    stats.update(chunks=len(chunks), skipped=report.skipped, seconds=round(time.perf_counter() - t0, 2))
    log.info("indexed %s", stats)
    return stats


def _vectors(chunks: list[Chunk], vecs: list[np.ndarray | None], embedder) -> np.ndarray | None:
    """Vectors of every chunk: reused rows as they are, the others embedded now (in one batch)."""
    if embedder is None:
        return None
    todo = [i for i, v in enumerate(vecs) if v is None]
    if todo:
        fresh = embedder.embed([indexed_text(chunks[i]) for i in todo], kind="passage")
        for i, v in zip(todo, fresh):
            vecs[i] = v
    return np.stack(vecs).astype(np.float32)
