"""The data recipe: nested dataclasses read from YAML, every field overridable as `section.field=value`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge import config
from lmforge.common import LmforgeError, checked
from lmforge.data.dedup import DedupConfig
from lmforge.data.filters import FilterConfig
from lmforge.data.normalize import NormalizeConfig

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "data-default.yaml"


@dataclass
class InputConfig:
    paths: list[str] | None = None  # files, folders, globs; None: the built-in standard-library corpus
    source: str | None = None  # source name of every document (None: the file's stem)
    text_field: str = "text"  # JSONL key / parquet column
    stdlib_include_tests: bool = False
    shard_bytes: int = checked(4_000_000, ge=1)  # input bytes per work unit (the unit of parallelism, resume)

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):  # `--set input.paths=corpus/` gives one string
            self.paths = [self.paths]


@dataclass
class MixConfig:
    # target token shares per source; None: the natural mix; "auto": the built-in corpus's weights on
    # it (stdlib.BUILTIN_WEIGHTS), the natural mix of the sources of user inputs
    weights: dict[str, float] | str | None = "auto"
    total_tokens: int | None = checked(None, ge=1)  # None: as many training tokens as the corpus has
    seed: int = checked(0, ge=0)


@dataclass
class TokenizeConfig:
    tokenizer: str | None = None  # a tokenizer folder/file; None: train one on the corpus
    vocab_size: int = checked(8192, ge=1)
    # about this much text, a seeded sample of the training docs, trains it
    train_bytes: int = checked(20_000_000, ge=1)
    batch_size: int = checked(512, ge=1)


@dataclass
class PackConfig:
    # share of documents held out (by a hash of the id: stable across runs)
    val_fraction: float = checked(0.01, ge=0, lt=1)
    shard_tokens: int = checked(50_000_000, ge=1)
    seed: int = checked(0, ge=0)


@dataclass
class DataConfig:
    input: InputConfig = field(default_factory=InputConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    workers: int = checked(0, ge=0)  # processes for the per-shard stages; 0: all cores
    executor: str = checked("local", choices=("local", "ray"))  # "local" (process pool) or "ray"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, values: dict[str, Any] | None = None
) -> DataConfig:
    """Recipe YAML (default: configs/data-default.yaml) + `--set` overrides + explicit values, through
    the one config loader (`lmforge.config.load_config`)."""
    path = Path(path) if path else DEFAULT_RECIPE
    if not path.is_file():
        raise LmforgeError(f"data recipe not found: {path}")
    try:
        return config.load_config(DataConfig, path, overrides or [], values)
    except LmforgeError as e:
        raise LmforgeError(f"{path}: {e}") from None
