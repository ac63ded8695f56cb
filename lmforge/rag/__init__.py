"""L5: retrieval-augmented answers. Documents -> cited chunks (chunking.py) -> an index on disk with BM25
(bm25s) and optional dense vectors (faiss), updated incrementally (index.py) -> search by BM25, dense
or reciprocal rank fusion, optional LM reranking (retrieve.py) -> answers citing passages as [n]
(answer.py); recall@k / MRR / ROUGE-L / citation faithfulness and the `rag` eval task (evaluate.py);
the built-in stdlib QA set (qa.py) and an lmforge bi-encoder trained with CLIP's loss (biencoder.py).

    from lmforge.rag import IndexSettings, RagIndex, build_index, search
    build_index(["docs/"], "runs/rag/index", IndexSettings())
    hits = search(RagIndex.load("runs/rag/index"), "how is the cache cleared?", top_k=5, mode="bm25")

Optional dependencies (bm25s, faiss-cpu, jieba) are imported when used: pip install 'lmforge[rag]'.
"""

from __future__ import annotations

_LAZY = {
    "Chunk": "lmforge.rag.chunking",
    "chunk_text": "lmforge.rag.chunking",
    "IndexSettings": "lmforge.rag.index",
    "RagIndex": "lmforge.rag.index",
    "build_index": "lmforge.rag.index",
    "search": "lmforge.rag.retrieve",
    "search_batch": "lmforge.rag.retrieve",
    "rrf": "lmforge.rag.retrieve",
    "answer_batch": "lmforge.rag.answer",
    "parse_citations": "lmforge.rag.answer",
    "load_embedder": "lmforge.rag.embedders",
    "train_biencoder": "lmforge.rag.biencoder",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmforge.rag' has no attribute {name!r}")
