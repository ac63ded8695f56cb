"""Search terms for BM25: English words (identifiers also split at `_`, `.` and camelCase, so the query
"json.decoder.scanstring" meets `def scanstring(`), minus bm25s's English stopwords; Chinese runs cut by
jieba (a dictionary segmenter) or into character bigrams (no dictionary). `require` imports an optional
dependency of `lmforge rag` or says how to install it.
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType

from lmforge.common import LmforgeError

CHINESE_MODES = ("jieba", "bigram")
_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]+|[A-Za-z0-9_]+")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")
_IS_CJK = re.compile(rf"[{_CJK}]")
_STOPWORDS: frozenset[str] | None = None


def require(module: str, what: str = "lmforge rag") -> ModuleType:
    """Import an optional dependency, or fail with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = {"faiss": "faiss-cpu"}.get(module, module)
        raise LmforgeError(
            f"{what} needs the package {package!r}, which is not installed: pip install 'lmforge[rag]'"
        ) from None


def _stopwords() -> frozenset[str]:
    global _STOPWORDS
    if _STOPWORDS is None:
        stop = require("bm25s.stopwords")
        _STOPWORDS = frozenset(stop.STOPWORDS_EN_PLUS) | frozenset(stop.STOPWORDS_CHINESE)
    return _STOPWORDS


def _jieba():
    jieba = require("jieba")
    jieba.setLogLevel(60)  # its dictionary-loading messages would go to stderr on every first call
    return jieba


def _chinese(run: str, mode: str) -> list[str]:
    if mode == "jieba":
        return [w for w in _jieba().lcut_for_search(run) if w.strip()]
    if len(run) == 1:
        return [run]
    return [run[i : i + 2] for i in range(len(run) - 1)]


def terms(text: str, chinese: str = "jieba", stopwords: bool = True) -> list[str]:
    """Lower-cased search terms of `text` (see the module docstring); `stopwords=False` keeps them (an
    identifier such as `when` or `get` is a stopword to BM25 but names a function to a learned encoder)."""
    if chinese not in CHINESE_MODES:
        raise LmforgeError(f"unknown Chinese tokenisation {chinese!r} (choose from {', '.join(CHINESE_MODES)})")
    stop = _stopwords() if stopwords else frozenset()
    out: list[str] = []
    for m in _TOKEN.finditer(text):
        tok = m.group(0)
        if _IS_CJK.match(tok):
            out.extend(w for w in _chinese(tok, chinese) if w not in stop)
            continue
        parts = [p.lower() for piece in tok.split("_") for p in _CAMEL.findall(piece)]
        words = [tok.lower().strip("_"), *(parts if len(parts) > 1 else [])]
        out.extend(w for w in words if w and w not in stop)
    return out
