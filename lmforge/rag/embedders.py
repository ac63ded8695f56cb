"""Loading an embedding model folder: an lmforge bi-encoder or any Hugging Face encoder (dense.py).
Its own module so dense.py (the HF encoder, mean pooling, vector search) and biencoder.py (which pools
with dense's mean) do not import each other."""

from __future__ import annotations

from pathlib import Path

from lmforge.common import LmforgeError
from lmforge.rag.dense import Embedder, HFEncoder


def load_embedder(folder: str | Path) -> Embedder:
    """`biencoder.json` -> the lmforge bi-encoder; `config.json` -> a transformers encoder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LmforgeError(f"embedding model folder not found: {folder}")
    if (folder / "biencoder.json").is_file():
        from lmforge.rag.biencoder import BiEncoder

        return BiEncoder.load(folder)
    if (folder / "config.json").is_file():
        return HFEncoder(folder)
    raise LmforgeError(f"{folder}: neither an lmforge bi-encoder (biencoder.json) nor a Hugging Face folder")
