"""L0: things every layer needs. Device/dtype choice, seeding, distributed rank info,
atomic file writes, the user-facing error type and a logger.

Imports only the standard library and torch (torch lazily where possible, so that
`lmforge --help` stays instant).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


class LmforgeError(Exception):
    """An error caused by the user's input (a file, a field, a value).

    The CLI prints its message without a traceback and exits with status 2;
    the server turns it into a 4xx JSON error. The message must name the file,
    field or value at fault.
    """


def get_logger(name: str = "lmforge") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logging.getLogger("lmforge").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root = logging.getLogger("lmforge")
        root.addHandler(handler)
        root.setLevel(os.environ.get("LMFORGE_LOG_LEVEL", "INFO"))
    return logger


# ----------------------------------------------------------------------------- devices


def get_device(name: str | None = None):
    """`auto`/None picks cuda, then mps, then cpu."""
    import torch

    if name and name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def get_dtype(name: str | None, device=None):
    """Parse a dtype name; `auto` gives bf16 on a GPU that supports it, else fp32."""
    import torch

    if name is None or name == "auto":
        dev = get_device(None) if device is None else torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    key = _DTYPES.get(str(name).lower().replace("torch.", ""))
    if key is None:
        raise LmforgeError(f"unknown dtype {name!r}: use one of float32, bfloat16, float16, auto")
    return getattr(torch, key)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank info from torchrun's environment variables (no process group needed)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


# ----------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only on success.

    A crash or Ctrl-C mid-write leaves the old file (or nothing) in place, never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path` as a whole.

    Readers never see a folder with half its files; an existing folder is swapped out only once
    the new one is complete (and removed afterwards).
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read JSON with an error that names the file and the position of the fault."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def dataclass_from_dict(cls, data: dict, what: str):
    """Build dataclass `cls` from `data`, naming unknown fields (a typo is an error, not ignored)."""
    import dataclasses

    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise LmforgeError(f"unknown {what} field(s): {', '.join(unknown)}")
    return cls(**data)


def read_jsonl(path: str | os.PathLike, what: str = "JSONL file") -> list[tuple[str, dict]]:
    """[(where, record)] for each non-blank line, `where` = "path:line" for error messages.
    A missing file, a bad line or a line that is not a JSON object raises LmforgeError naming it."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{what} not found: {path}")
    rows = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LmforgeError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(record, dict):
                    raise LmforgeError(f"{path}:{n}: expected a JSON object per line")
                rows.append((f"{path}:{n}", record))
        except UnicodeDecodeError as e:
            raise LmforgeError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not rows:
        raise LmforgeError(f"{path}: no records")
    return rows


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
