"""Helpers shared by recipes: the config and flag conventions every command follows, run folders, a
metrics JSONL writer. Generic: nothing here knows about a particular job.

    add_config_arguments(parser, "pretrain-tiny", {"--steps": "train.steps"})  # --config, --set, flags
    cfg = load_config(PretrainRecipe, args.config, overrides_from_args(args, FLAGS))  # lmforge.config
    add_deprecated_alias(parser, "--model", "--preset")  # an old spelling keeps working, with a warning
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.common import DEVICE_PATTERN, LmforgeError, atomic_write_text, check_value, checked
from lmforge.config import apply_overrides, config_names, load_config, load_config_tree, set_dotted  # noqa: F401


def add_config_arguments(
    parser: argparse.ArgumentParser, default: str | None, flags: dict[str, str] | None = None
) -> None:
    """--config NAME_OR_PATH (None: the dataclass defaults), --set a.b=c (repeatable), and one flag per
    `flags` entry (flag -> dotted key)."""
    names = ", ".join(config_names()) or "none"
    parser.add_argument("--config", default=default, help=f"recipe YAML: a path or a built-in name ({names})")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set train.steps=100 --set model.hidden_size=128",
    )
    for flag, key in (flags or {}).items():
        parser.add_argument(flag, dest=_dest(flag), default=None, metavar="VALUE", help=f"same as --set {key}=VALUE")


_SWITCHES = {
    "--auto-fit": ("train.auto_fit", "pick the largest micro-batch that fits in memory"),
    "--compile": ("train.compile", "torch.compile the model"),
    "--activation-checkpointing": ("train.activation_checkpointing", "recompute activations in backward"),
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """--resume and the on/off switches shared by training recipes."""
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue from the run's newest good checkpoint (or the given checkpoint folder)",
    )
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


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """`old` keeps working as a hidden spelling of the already added flag `new` (same dest, type and
    checks), printing a one-line deprecation warning, so scripts written for the old name still run."""
    target = parser._option_string_actions[new]

    class Alias(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {old} is deprecated; use {new}", file=sys.stderr)
            target(parser, namespace, values, new)

    parser.add_argument(
        old,
        action=Alias,
        dest=target.dest,
        nargs=target.nargs,
        const=target.const,
        type=target.type,
        choices=target.choices,
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
        metavar=target.metavar,
    )


def overrides_from_args(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    out = list(getattr(args, "overrides", []) or [])
    for flag, key in flags.items():
        value = getattr(args, _dest(flag), None)
        if value is not None:
            out.append(f"{key}={value}")
    return out


@dataclasses.dataclass
class RunConfig:
    """The `run:` section every training recipe has."""

    dir: str = "runs"
    name: str = checked("run", pattern=r"[^/\\]+")  # one folder name under `dir`
    device: str = checked("auto", pattern=DEVICE_PATTERN)
    tensorboard: bool = False


def make_run_dir(root: str | Path, name: str, cfg: Any = None, resume: bool = False) -> Path:
    """`root/name`: created (and the config, a mapping or a config dataclass, saved as config.yaml)
    unless resuming an existing run."""
    import yaml

    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)  # every field, defaults included: the run says all it was given
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
                    raise LmforgeError(
                        "tensorboard logging needs the `tensorboard` package (pip install tensorboard)"
                    ) from None

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
