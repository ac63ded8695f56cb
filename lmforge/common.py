"""L0: things every layer needs. Device/dtype choice, seeding, distributed rank info,
atomic file writes, the user-facing error type and a logger.

Imports only the standard library and torch (torch lazily where possible, so that
`lmforge --help` stays instant).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import tempfile
import types
import typing
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


# A device name get_device accepts (a regex for config fields): auto, cpu, mps, or cuda/xpu[:index].
DEVICE_PATTERN = r"auto|cpu|mps|meta|(cuda|xpu)(:\d+)?"


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


_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
DTYPE_NAMES = ("auto", *_DTYPES)  # what a dtype field accepts


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
def atomic_dir(path: str | os.PathLike, mark: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path` as a whole.

    Readers never see a folder with half its files; an existing folder is swapped out only once
    the new one is complete (and removed afterwards). `mark`: record the folder as lmforge's own
    output (`OUTPUT_MARKER`, listing its entries), so a later write may replace it without
    `--overwrite` (see `check_output_dir`). Callers replacing a user-named folder check it first.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if mark:
            atomic_write_json(
                tmp / OUTPUT_MARKER, {"written_by": "lmforge", "entries": sorted(p.name for p in tmp.iterdir())}
            )
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


# An output folder lmforge wrote (a model, an export): its marker lists the entries it made.
OUTPUT_MARKER = ".lmforge-output.json"


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
    """Build dataclass `cls` from `data`, every field checked (see `build_config`); `what` is the
    dotted name of the section the errors name (e.g. "model")."""
    return build_config(cls, data, what)


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


# ----------------------------------------------------------------------------- CPU threads

THREADS_POLICY_VAR = "LMFORGE_THREADS_POLICY"
# After each parallel region libgomp's idle threads spin 300,000 times before they sleep (~7 ms on this
# 2-core EPYC, where a spin is ~25 ns). Quiet, that saves a wake-up per region; beside one other CPU-bound
# process it is ruinous: the spinning thread burns the time slice its partner needs to finish the region
# (training 8x slower, serving 100x: bench/contention.py). 1,000 spins (~25 us) still bridge the gap
# between the regions of one step, so the quiet speed is kept (measured within noise), and the threads
# sleep when the partner is descheduled (training 1.4x slower under that load, serving 1.8x). PASSIVE (no
# spin) did a little better under load but cost 40% of quiet serving speed (a wake-up per tiny region).
# GOMP_SPINCOUNT is libgomp's knob (torch's Linux builds); other OpenMP runtimes ignore it.
_THREADS_POLICY: dict[str, str] = {"GOMP_SPINCOUNT": "1000"}
_OPENMP_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # what libgomp reads: a user's value wins


def apply_threads_policy(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set how OpenMP threads wait in `env` (default: this process's environment), so lmforge slows
    down gracefully when another process competes for the CPU cores. Returns the variables it set.

    Must run before torch is imported (OpenMP reads its settings once, when it loads); child
    processes inherit the result. Sets nothing when the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT
    themselves, or with LMFORGE_THREADS_POLICY=off."""
    env = os.environ if env is None else env
    switch = env.get(THREADS_POLICY_VAR, "on").strip().lower()
    if switch not in ("on", "off", "1", "0", "true", "false", ""):
        raise LmforgeError(f"{THREADS_POLICY_VAR}={env[THREADS_POLICY_VAR]!r}: use on or off")
    if switch in ("off", "0", "false") or any(env.get(k) for k in _OPENMP_WAIT_VARS):
        return {}
    env.update(_THREADS_POLICY)
    return dict(_THREADS_POLICY)


# ----------------------------------------------------------------------------- config values
# Every config is a dataclass; `build_config` is the one place a mapping (YAML, --set, JSON)
# becomes one. Each value is checked against the field's type annotation (a number-looking string
# such as YAML 1.1's "3e-4" is read as the number) and against the rules `checked` attaches to the
# field, so a bad value is a clear error naming the dotted field, never a crash deep in a job.


def checked(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: typing.Iterable | None = None,
    pattern: str | None = None,
) -> Any:
    """A dataclass field with value rules: bounds (numbers, or each number of a list/tuple),
    `choices` (allowed values) or a regex `pattern` (strings). None passes when the type allows it."""
    rules = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, pattern=pattern).items() if v is not None}
    if choices is not None:
        rules["choices"] = tuple(choices)
    return dataclasses.field(default=default, default_factory=factory, metadata={"rules": rules})


def _type_name(tp: Any) -> str:
    names = {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        dict: "a mapping",
        list: "a list",
        tuple: "a list",
    }
    origin = typing.get_origin(tp) or tp
    return names.get(origin, getattr(origin, "__name__", str(tp)))


class _Mismatch(Exception):
    """The value does not fit the annotation; `why` says what was expected."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """`value` as annotation `tp` (recursing into containers and dataclasses) or _Mismatch."""
    if tp is Any or tp is object or isinstance(tp, (str, typing.TypeVar)):
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        alts, why = [a for a in args if a is not type(None)], ""
        for alt in alts:
            try:
                return _coerce(alt, value, where)
            except _Mismatch as e:
                why = e.why
        if len(alts) > 1:
            why = "expected " + ", ".join(_type_name(a) for a in alts)
        raise _Mismatch(why + (" or null" if type(None) in args else ""))
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build_config(tp, value, where)
    if value is None:
        raise _Mismatch(f"expected {_type_name(tp)}, not null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.strip().lower() in ("true", "yes", "on")
        raise _Mismatch("expected true or false")
    if tp in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = (
                    float(value.strip().replace("_", ""))
                    if tp is float or not value.strip().lstrip("+-").isdigit()
                    else int(value.strip())
                )
            except ValueError:
                raise _Mismatch(f"expected {_type_name(tp)}") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise _Mismatch(f"expected {_type_name(tp)}")
        if tp is int:
            if isinstance(number, float) and not (math.isfinite(number) and number.is_integer()):
                raise _Mismatch("expected an integer")
            return int(number)
        try:
            return float(number)
        except OverflowError:
            raise _Mismatch("number too large") from None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `--set run.name=2024` is the name "2024"
        raise _Mismatch("expected a string (quote it in YAML)")
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, str) and args and args[0] is str:
            return value  # one name where a list of names is allowed (the dataclass decides)
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(f"expected {_type_name(tp)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch(f"expected a list of {len(args)} values")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if (origin or tp) is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch("expected a mapping")
        if not args:
            return dict(value)
        return {
            _coerce(args[0], k, f"{where}[{k!r}]"): _coerce(args[1], v, f"{where}[{k!r}]") for k, v in value.items()
        }
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _Mismatch(f"expected {_type_name(tp)}")
    return value


def _check_rules(value: Any, rules: dict, allow_nonfinite: bool) -> str | None:
    """Why `value` breaks the field's rules, or None."""
    if value is None:
        return None
    if "choices" in rules and value not in rules["choices"]:
        return f"choose one of {', '.join(map(str, rules['choices']))}"
    if "pattern" in rules and isinstance(value, str) and not re.fullmatch(rules["pattern"], value):
        return f"does not match {rules['pattern']}"
    numbers = value if isinstance(value, (list, tuple)) else [value]
    for x in numbers:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            continue
        if isinstance(x, float) and not math.isfinite(x) and not allow_nonfinite:
            return "must be a finite number"
        for key, ok, text in (
            ("ge", lambda b: x >= b, ">="),
            ("gt", lambda b: x > b, ">"),
            ("le", lambda b: x <= b, "<="),
            ("lt", lambda b: x < b, "<"),
        ):
            if key in rules and not ok(rules[key]):
                return f"must be {text} {rules[key]}"
    return None


def check_value(
    tp: Any, value: Any, rules: dict | None = None, where: str = "value", allow_nonfinite: bool = False
) -> Any:
    """`value` read as annotation `tp` and checked against `rules` (see `checked`); ValueError
    saying what was expected otherwise. A nested dataclass raises LmforgeError naming its field."""
    try:
        value = _coerce(tp, value, where)
    except _Mismatch as e:
        raise ValueError(e.why) from None
    why = _check_rules(value, rules or {}, allow_nonfinite)
    if why:
        raise ValueError(why)
    return value


def build_config(cls: type, data: Any, where: str = "") -> Any:
    """Dataclass `cls` from a mapping, each value checked against its field's annotation and rules.

    `where` is the dotted name of the section ("" at the top level); an unknown field, a value of
    the wrong type or out of range raises LmforgeError naming `where.field` and the value. Rules
    are checked before `cls` is built, so its `__post_init__` only ever sees well-typed values.
    """
    at = where or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LmforgeError(f"{at}: expected a mapping of fields, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        what = f"{where}: unknown field(s) " if where else f"unknown {cls.__name__} field(s): "
        raise LmforgeError(f"{what}{', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, raw in data.items():
        dotted = f"{where}.{name}" if where else name
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else None
        try:
            kwargs[name] = check_value(
                hints.get(name, Any),
                raw,
                f.metadata.get("rules", {}),
                dotted,
                allow_nonfinite=isinstance(default, float) and not math.isfinite(default),
            )
        except ValueError as e:
            shown = repr(raw) if len(repr(raw)) <= 60 else repr(raw)[:57] + "..."
            raise LmforgeError(f"{dotted}={shown}: {e}") from None
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field missing
        raise LmforgeError(f"{at}: {e}") from None
