"""Dense retrieval: an embedding model turns chunks and queries into unit vectors, a vector index finds
the nearest chunks by inner product (= cosine).

Embedding models (`lmforge.rag.embedders.load_embedder(folder)`):
  * any Hugging Face encoder folder (config.json + weights + tokenizer): transformers' AutoModel, mean
    pooling over the real tokens (sentence-transformers' default), L2-normalised;
  * an lmforge bi-encoder (`biencoder.json`, see biencoder.py), trained by `lmforge rag train-encoder`.

Vector index: faiss's exact IndexFlatIP (faiss-cpu), or the same search in numpy when faiss is missing.
Exact search is what a few hundred thousand chunks need; both give identical rankings.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np

from lmforge.common import LmforgeError, get_logger

log = get_logger("lmforge.rag")


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: list[str], kind: str = "passage") -> np.ndarray:
        """texts -> float32 [N, dim] unit rows; `kind` is "query" or "passage" (asymmetric models)."""
        ...


def mean_pool(hidden, mask):
    """Mean of the hidden states of the real tokens: [B, T, H], [B, T] -> [B, H]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class HFEncoder:
    """A transformers encoder folder (BERT, MiniLM, E5, BGE...), loaded from disk only."""

    def __init__(self, folder: str | Path, batch_size: int = 32, max_length: int = 256) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.folder, self.batch_size, self.max_length = Path(folder), batch_size, max_length
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            self.model = AutoModel.from_pretrained(self.folder, local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise LmforgeError(f"{folder}: not a loadable Hugging Face encoder ({e})") from None
        self.name = f"hf:{self.folder.name}"
        self.dim = int(self.model.config.hidden_size)
        self._torch = torch

    def embed(self, texts: list[str], kind: str = "passage") -> np.ndarray:
        torch, out = self._torch, []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[i : i + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state
                pooled = mean_pool(hidden, batch["attention_mask"])
                out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def fingerprint(folder: str | Path) -> str:
    """Identifies an embedding model's weights: vectors made by another model cannot be mixed in."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and (p.suffix in (".json", ".safetensors", ".bin")):
            h.update(p.name.encode())
            h.update(hashlib.sha256(p.read_bytes()).digest() if p.suffix == ".json" else str(p.stat().st_size).encode())
    return h.hexdigest()[:16]


class VectorIndex:
    """Exact inner-product search over unit vectors: faiss IndexFlatIP, or numpy (`backend`)."""

    def __init__(self, vectors: np.ndarray, backend: str = "auto") -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if backend not in ("auto", "faiss", "numpy"):
            raise LmforgeError(f"unknown vector backend {backend!r} (choose from auto, faiss, numpy)")
        self.backend, self.index = "numpy", None
        if backend in ("auto", "faiss"):
            try:
                import faiss
            except ImportError:
                if backend == "faiss":
                    raise LmforgeError("the faiss backend needs faiss-cpu: pip install 'lmforge[rag]'") from None
                log.info("faiss is not installed: dense search runs in numpy (same results)")
            else:
                self.index = faiss.IndexFlatIP(self.vectors.shape[1])
                self.index.add(self.vectors)
                self.backend = "faiss"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [Q, D] -> (scores [Q, k], chunk indices [Q, k]), best first."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self.vectors))
        if self.index is not None:
            return self.index.search(q, k)
        sims = q @ self.vectors.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(sims, top, 1).argsort(axis=1)[:, ::-1]
        idx = np.take_along_axis(top, order, 1)
        return np.take_along_axis(sims, idx, 1), idx
