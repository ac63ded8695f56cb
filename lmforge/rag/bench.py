"""The measured retrieval table: BM25 / dense / hybrid recall@k and MRR on the built-in stdlib QA set, and
Chinese BM25 terms (jieba vs character bigrams) on the small Chinese set (zh_set.py)."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from lmforge.common import atomic_write_text, get_logger
from lmforge.eval import metrics as M
from lmforge.rag.evaluate import KS, retrieval_scores
from lmforge.rag.index import IndexSettings, RagIndex, build_index
from lmforge.rag.qa import builtin_qa
from lmforge.rag.retrieve import search_batch

log = get_logger("lmforge.rag")


def score_modes(index: RagIndex, examples: list[dict], modes: list[str], **search) -> dict[str, dict[str, float]]:
    """Mean recall@k / MRR of each retrieval mode over `examples` ({"question", "sources"}); `search`:
    more arguments of search_batch (fusion, alpha)."""
    out = {}
    for mode in modes:
        t0 = time.perf_counter()
        hits = search_batch(index, [e["question"] for e in examples], max(KS), mode, **search)
        per = [retrieval_scores(h, e["sources"]) for h, e in zip(hits, examples)]
        out[mode] = {k: M.mean([p[k] for p in per]) for k in per[0]}
        out[mode]["ms_per_query"] = 1000 * (time.perf_counter() - t0) / max(1, len(examples))
    return out


def retrieval_table(out: Path, embedder_dir: str | None, settings: IndexSettings, reader: str | None = None) -> dict:
    """Build the built-in QA set and its index under `out`, score each retriever (and, with a `reader`
    model, its answers with the best retriever's top passage and without retrieval); -> report dict."""
    examples, files = builtin_qa(num_examples=None)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "qa.jsonl", "".join(json.dumps(e) + "\n" for e in examples))
    embedder = None
    if embedder_dir:
        from lmforge.rag.embedders import load_embedder

        embedder = load_embedder(embedder_dir)
    stats = build_index([str(f) for f in files], out / "index", settings, embedder)
    index = RagIndex.load(out / "index")
    modes = ["bm25", "dense", "hybrid"] if embedder is not None else ["bm25"]
    report = {
        "questions": len(examples),
        "corpus": {"files": len(files), "chunks": stats["chunks"]},
        "retrieval": score_modes(index, examples, modes),
        "fusion": dict(zip(("fusion", "alpha"), index.fusion())) if embedder is not None else None,
        "chinese": chinese_table(),
    }
    if embedder is not None and index.fusion()[0] != "rrf":  # the tuned fusion beside plain RRF
        report["retrieval"]["hybrid-rrf"] = score_modes(index, examples, ["hybrid"], fusion="rrf")["hybrid"]
    if reader:
        from lmforge.eval.lm import LocalLM
        from lmforge.rag.reader import rag_vs_closed_book

        hits = search_batch(index, [e["question"] for e in examples], 1, modes[-1])
        report["answers"] = rag_vs_closed_book(LocalLM.load(reader), examples, hits)
        report["answers_retriever"] = modes[-1]
    return report


def chinese_table(settings: IndexSettings | None = None) -> dict[str, dict[str, float]]:
    """BM25 on the Chinese set with each tokenisation."""
    from lmforge.rag.zh_set import ZH_DISTRACTORS, ZH_SET

    settings = settings or IndexSettings(max_chars=400, overlap=0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "zh.jsonl"
        corpus.write_text(
            "".join(
                json.dumps({"id": f"p{i}", "text": p}, ensure_ascii=False) + "\n"
                for i, p in enumerate([p for p, _ in ZH_SET] + ZH_DISTRACTORS)
            ),
            encoding="utf-8",
        )
        examples = [
            {"question": q, "sources": [{"file": str(corpus), "record": f"p{i}"}]} for i, (_, q) in enumerate(ZH_SET)
        ]
        for mode in ("jieba", "bigram"):
            build_index([str(corpus)], Path(tmp) / mode, replace(settings, chinese=mode, embedder=None))
            out[mode] = score_modes(RagIndex.load(Path(tmp) / mode), examples, ["bm25"])["bm25"]
    return out
