"""Helpers shared by recipes: YAML configs with command-line overrides, run folders, a metrics
JSONL writer. Generic: nothing here knows about a particular job.

    cfg = load_config("pretrain-tiny", ["train.steps=50", "optim.lr=1e-3"])   # or a .yaml path
    section(cfg, "train", TrainConfig)       # -> dataclass, unknown fields named in the error
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from lmforge.common import DEVICE_PATTERN, LmforgeError, atomic_write_text, build_config, check_value, checked

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def add_config_arguments(parser: argparse.ArgumentParser, default: str, flags: dict[str, str] | None = None) -> None:
    """--config NAME_OR_PATH, --set a.b=c (repeatable), and one flag per `flags` entry (flag -> dotted key)."""
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))) or "none"
    parser.add_argument("--config", default=default, help=f"recipe YAML: a path or a built-in name ({names})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set train.steps=100 --set model.hidden_size=128")
    for flag, key in (flags or {}).items():
        parser.add_argument(flag, dest=_dest(flag), default=None, metavar="VALUE", help=f"same as --set {key}=VALUE")


_SWITCHES = {"--auto-fit": ("train.auto_fit", "pick the largest micro-batch that fits in memory"),
             "--compile": ("train.compile", "torch.compile the model"),
             "--activation-checkpointing": ("train.activation_checkpointing", "recompute activations in backward")}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """--resume and the on/off switches shared by training recipes."""
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue from the run's newest good checkpoint (or the given checkpoint folder)")
    for flag, (key, help_text) in _SWITCHES.items():
        parser.add_argument(flag, dest=_dest(flag), action="store_true", help=f"{help_text} ({key}=true)")


def switch_overrides(args: argparse.Namespace) -> list[str]:
    return [f"{key}=true" for flag, (key, _) in _SWITCHES.items() if getattr(args, _dest(flag), False)]


def bounded(kind: type, **rules: Any):
    """An argparse `type=`: the flag's text read as `kind` and checked against `checked`'s rules
    (ge, gt, le, lt, choices), the same checks as config fields; argparse reports a bad value as a
    one-line error naming the flag (exit 2)."""
    rules = {k: (tuple(v) if k == "choices" else v) for k, v in rules.items()}

    def parse(text: str):
        try:
            return check_value(kind, text, rules)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _dest(flag: str) -> str:
    return "flag_" + flag.lstrip("-").replace("-", "_")


def overrides_from_args(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    out = list(getattr(args, "overrides", []) or [])
    for flag, key in flags.items():
        value = getattr(args, _dest(flag), None)
        if value is not None:
            out.append(f"{key}={value}")
    return out


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = CONFIG_DIR / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    raise LmforgeError(f"config {name_or_path!r} not found: not a file, and not a built-in config "
                       f"({', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))})")


def load_config(name_or_path: str, overrides: list[str] = (), open_sections: tuple[str, ...] = ("model",)) -> dict:
    """Read the YAML and apply `key.sub=value` overrides (values parsed as YAML scalars).

    An override of a key the config does not have is an error (a typo would otherwise be silently
    ignored), except inside `open_sections`, whose fields are checked by their own dataclass.
    """
    import yaml

    path = resolve_config_path(name_or_path)
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LmforgeError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise LmforgeError(f"{path}: expected a mapping of sections at the top level")
    return apply_overrides(cfg, overrides, open_sections)


def apply_overrides(cfg: dict, overrides: list[str], open_sections: tuple[str, ...] = (),
                    example: str = "train.steps=100") -> dict:
    """Apply `key.sub=value` overrides (values parsed as YAML scalars) to `cfg` in place; returns it."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise LmforgeError(f"override {item!r}: expected KEY=VALUE, e.g. {example}")
        key, raw = item.split("=", 1)
        set_dotted(cfg, key.strip(), yaml.safe_load(raw) if raw.strip() else None, open_sections)
    return cfg


def set_dotted(cfg: dict, key: str, value: Any, open_sections: tuple[str, ...] = ()) -> None:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None and (i > 0 or part in open_sections):
            child = node[part] = {}
        if not isinstance(child, dict):
            raise LmforgeError(f"override {key!r}: {'.'.join(parts[: i + 1])!r} is not a section of the config")
        node = child
    if parts[-1] not in node and parts[0] not in open_sections:
        known = ", ".join(sorted(node)) or "none"
        raise LmforgeError(f"override {key!r}: unknown field {parts[-1]!r} (known here: {known})")
    node[parts[-1]] = value


def section(cfg: dict, name: str, cls: type, **extra: Any):
    """Build dataclass `cls` from cfg[name]: unknown fields, wrong types and out-of-range values are
    errors naming `name.field` and the value (`build_config`)."""
    data = cfg.get(name)
    if data is not None and not isinstance(data, dict):
        raise LmforgeError(f"config section {name!r}: expected a mapping of fields, got {data!r}")
    return build_config(cls, {**(data or {}), **extra}, name)


@dataclasses.dataclass
class RunConfig:
    """The `run:` section every training recipe has."""

    dir: str = "runs"
    name: str = checked("run", pattern=r"[^/\\]+")  # one folder name under `dir`
    device: str = checked("auto", pattern=DEVICE_PATTERN)
    tensorboard: bool = False


def make_run_dir(root: str | Path, name: str, cfg: dict | None = None, resume: bool = False) -> Path:
    """`root/name`: created (and the config saved as config.yaml) unless resuming an existing run."""
    import yaml

    run = Path(root) / name
    run.mkdir(parents=True, exist_ok=True)
    if cfg is not None and not (resume and (run / "config.yaml").exists()):
        atomic_write_text(run / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    return run


class MetricsWriter:
    """Appends one JSON object per line (with a wall-clock time) to `path`; a no-op when disabled."""

    def __init__(self, path: str | Path, enabled: bool = True, tensorboard_dir: str | Path | None = None) -> None:
        self.path, self.enabled = Path(path), enabled
        self._file = None
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            drop_torn_line(self.path)  # a crash mid-write must not glue the next record onto half a line
            self._file = open(self.path, "a", encoding="utf-8")
            if tensorboard_dir:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(tensorboard_dir))
                except ImportError:
                    raise LmforgeError("tensorboard logging needs the `tensorboard` package (pip install tensorboard)")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path, missing_ok: bool = False) -> list[dict]:
    """The records of a run's metrics.jsonl (a run folder or the file). A line that is not JSON is
    skipped: the last one may be half-written by a run in progress or cut by a crash."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        if missing_ok:
            return []
        raise LmforgeError(f"no metrics file at {path}")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def drop_torn_line(path: str | Path) -> None:
    """Cut a half-written last line (no newline: a crash mid-write) off an append-only log, in
    place (a writer may hold the file open in append mode)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)
