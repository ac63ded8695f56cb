"""Training data for the bi-encoder, from the stdlib modules that are NOT held out, split into train and
dev by module (a hash of the path, as the pipeline's split): the dev modules choose the checkpoint and
the hybrid fusion weight, so nothing is tuned on the held-out questions.

Per documented public function of a training module: (its question "What does `m.f` do?", the chunk
holding its `def`) and (its docstring sentence, that chunk), each with a hard negative: the chunk BM25
ranks highest among those that do not hold the `def` (DPR, Karpukhin et al. 2020). Hard negatives are
mostly the function's neighbours in the same file, which share its module words: exactly where BM25
alone confuses chunks, so they teach the encoder what BM25 lacks.

    split = split_modules(BuiltinConfig(), dev_fraction=0.1)
    triples = training_triples(split.train, split.base)     # [(query, positive, hard negative)]
    dev_examples = qa_examples(split.dev, split.base)       # as builtin_qa's, over the dev modules
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.data.shards import is_validation
from lmforge.data.stdlib import stdlib_files
from lmforge.eval.builtin import BuiltinConfig, held_out
from lmforge.rag.chunking import chunk_text
from lmforge.rag.index import indexed_text
from lmforge.rag.qa import _examples, _read, _stdlib_root
from lmforge.rag.terms import terms


@dataclass
class ModuleSplit:
    base: Path
    train: list[Path]
    dev: list[Path]
    test: list[Path]  # the held-out modules (builtin_qa's corpus): never read for training or tuning


def split_modules(cfg: BuiltinConfig | None = None, dev_fraction: float = 0.1, seed: int = 1) -> ModuleSplit:
    """Held-out modules are the test split; the rest split into train / dev by a hash of the module path
    (`seed` differs from the pipeline's split seed, so dev is not another copy of the held-out rule)."""
    cfg = cfg or BuiltinConfig()
    base = Path(cfg.root) if cfg.root else _stdlib_root()
    test = [p for _, p in held_out(cfg)]
    held = set(test)
    rest = [f for f in stdlib_files(root=base) if f not in held]
    dev = [f for f in rest if is_validation(f"rag-dev/{f.relative_to(base).as_posix()}", dev_fraction, seed)]
    dev_set = set(dev)
    return ModuleSplit(base, [f for f in rest if f not in dev_set], dev, test)


def qa_examples(files: list[Path], base: Path) -> list[dict]:
    """The built-in QA rows ({"id", "question", "answer", "sources"}) of these modules."""
    return _examples([(str(f), f) for f in files], base)


def training_triples(
    files: list[Path], base: Path, max_chars: int = 800, overlap: int = 150, hard_negatives: bool = True
) -> list[tuple[str, ...]]:
    """(query, positive chunk, hard negative chunk) per question and per docstring sentence of `files`
    (pairs without the negative when `hard_negatives` is off); chunked as an index chunks a file."""
    from lmforge.rag.sparse import Bm25

    chunks, rows = [], []  # rows: (query, chunk index of the positive, file, def line)
    for path in files:
        examples = _examples([(str(path), path)], base)
        if not examples:
            continue
        file_chunks = chunk_text(_read(path) or "", str(path), code=True, max_chars=max_chars, overlap=overlap)
        first = len(chunks)
        chunks += file_chunks
        for ex in examples:
            line = ex["sources"][0]["line"]
            pos = next((i for i, c in enumerate(file_chunks) if c.start_line <= line <= c.end_line), None)
            if pos is not None:
                rows += [(q, first + pos, str(path), line) for q in (ex["question"], ex["answer"])]
    texts = [indexed_text(c) for c in chunks]
    if not hard_negatives or not rows:
        return [(q, texts[i]) for q, i, _, _ in rows]
    bm25 = Bm25.build([terms(t, "bigram") for t in texts])
    out = []
    for query, pos, file, line in rows:
        scores = bm25.scores(terms(query, "bigram"))
        for i in scores.argsort()[::-1][:20]:
            c = chunks[i]
            if not (c.file == file and c.start_line <= line <= c.end_line) and texts[i] != texts[pos]:
                out.append((query, texts[pos], texts[i]))
                break
        else:  # BM25 found nothing else that shares a term: in-batch negatives only
            out.append((query, texts[pos]))
    return out


class DevSet:
    """The dev modules' questions over their own BM25 index (in `folder`): scores an encoder in training
    (checkpoint choice) and tunes the hybrid fusion for it."""

    def __init__(self, files: list[Path], base: Path, folder: str | Path) -> None:
        from lmforge.rag.index import IndexSettings, RagIndex, build_index

        self.examples = qa_examples(files, base)
        build_index([str(f) for f in files], folder, IndexSettings())
        self.index = RagIndex.load(folder)

    def attach(self, encoder) -> None:
        """Embed the dev chunks with `encoder` (in place of an index built with it)."""
        self.index.vectors = encoder.embed([indexed_text(c) for c in self.index.chunks], "passage")
        self.index._embedder, self.index._vector_index = encoder, None

    def score(self, modes: list[str], **search) -> dict[str, dict[str, float]]:
        from lmforge.rag.bench import score_modes

        return score_modes(self.index, self.examples, modes, **search)

    def tune_fusion(self, alphas: tuple[float, ...] = tuple(i / 10 for i in range(1, 10))) -> dict:
        """The fusion with the best dev recall@5 (then MRR): RRF or the convex combination at each alpha
        (the attached encoder's vectors) -> {"fusion", "alpha", "dev": recall/MRR of the choice}."""
        if not self.examples:  # nothing to tune on: the default fusion
            return {"fusion": "rrf", "alpha": None, "dev": None}
        tried = [("rrf", None, self.score(["hybrid"], fusion="rrf")["hybrid"])]
        tried += [("convex", a, self.score(["hybrid"], fusion="convex", alpha=a)["hybrid"]) for a in alphas]
        fusion, alpha, dev = max(tried, key=lambda t: (t[2]["recall@5"], t[2]["mrr"]))
        return {"fusion": fusion, "alpha": alpha, "dev": {k: round(v, 4) for k, v in dev.items()}}
