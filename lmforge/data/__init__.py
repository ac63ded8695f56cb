"""L2: pretraining data. Each stage is a plain function over documents; `prepare` wires them:

read (readers, stdlib) -> normalize -> filters -> dedup (exact + MinHash LSH) -> mix -> pack -> loader

from lmforge.data import load_config, prepare, ShardLoader, NGramIndex
stats = prepare(load_config(overrides=["dedup.threshold=0.7"]), "out/data")
loader = ShardLoader("out/data", seq_len=256, batch_size=8)
index = NGramIndex.build(train_texts, n=13); index.longest_overlap(example)   # contamination
"""

from __future__ import annotations

_LAZY = {
    "Document": "lmforge.data.readers",
    "ReadReport": "lmforge.data.readers",
    "read_inputs": "lmforge.data.readers",
    "DataConfig": "lmforge.data.config",
    "load_config": "lmforge.data.config",
    "NormalizeConfig": "lmforge.data.normalize",
    "normalize_text": "lmforge.data.normalize",
    "FilterConfig": "lmforge.data.filters",
    "apply_filters": "lmforge.data.filters",
    "detect_language": "lmforge.data.langid",
    "token_spans": "lmforge.data.words",
    "DedupConfig": "lmforge.data.dedup",
    "MinHasher": "lmforge.data.dedup",
    "dedup_texts": "lmforge.data.dedup",
    "mix": "lmforge.data.mix",
    "MixItem": "lmforge.data.mix",
    "prepare": "lmforge.data.prepare",
    "ShardLoader": "lmforge.data.loader",
    "NGramIndex": "lmforge.data.ngram",
    "check_examples": "lmforge.data.ngram",
    "decontaminate": "lmforge.data.ngram",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmforge.data' has no attribute {name!r}")
