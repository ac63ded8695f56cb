"""Evaluate a model (an lmforge checkpoint, a Hugging Face folder, a quantized or adapter checkpoint,
or an OpenAI-compatible endpoint URL) on the built-in standard-library tasks and any tasks of the
config, and write results.json + report.md + report.html with plots. `--compare A B` puts two
finished runs side by side instead.

    lmforge eval runs/pretrain/final                     # built-in tasks
    lmforge eval MODEL --task multiple_choice:mc.jsonl --task generation:qa.jsonl --set builtin=null
    lmforge eval http://localhost:8000 --config eval-example.yaml
    lmforge eval --compare runs/eval-a runs/eval-b --out runs/compare
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from lmforge.common import DEVICE_PATTERN, LmforgeError, checked, get_logger, seed_everything
from lmforge.eval.builtin import BuiltinConfig
from lmforge.recipes._common import add_config_arguments, load_config, overrides_from_args

log = get_logger("lmforge.eval")
FLAGS = {
    "--out": "out",
    "--limit": "limit",
    "--device": "device",
    "--dtype": "dtype",
    "--batch-size": "batch_size",
    "--max-length": "max_length",
    "--contamination": "contamination.corpus",
    "--seed": "seed",
}


@dataclasses.dataclass
class ContaminationSection:
    corpus: str | list[str] | None = None  # an n-gram index (.npy), a corpus file/folder, or a list of them
    ngram: int = checked(13, ge=1)
    min_overlap: int | None = checked(None, ge=1)  # words of overlap that count as contaminated (None: ngram)


@dataclasses.dataclass
class EvalRecipe:
    """configs/eval-default.yaml; another config file replaces the top-level fields it gives."""

    model: str | None = None  # a model folder or an http(s) endpoint URL
    endpoint_model: str = "default"
    out: str = "runs/eval"
    device: str = checked("auto", pattern=DEVICE_PATTERN)
    dtype: str | None = None  # None: the checkpoint's
    batch_size: int = checked(8, ge=1)
    max_length: int | None = checked(None, ge=1)
    seed: int = checked(0, ge=0)
    limit: int | None = checked(None, ge=0)
    builtin: BuiltinConfig | None = dataclasses.field(default_factory=BuiltinConfig)  # None: skip the built-in tasks
    contamination: ContaminationSection = dataclasses.field(default_factory=ContaminationSection)
    tasks: list[dict] = dataclasses.field(default_factory=list)  # TaskConfig fields, checked by build_tasks


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="model folder or http(s) endpoint URL (or set `model:` in the config)")
    p.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="TYPE:PATH",
        help="add a task from a local file, e.g. multiple_choice:mc.jsonl (repeatable); types: "
        "multiple_choice, generation, code, perplexity",
    )
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two result folders (or results.json)")
    add_config_arguments(p, "eval-default", FLAGS)


def task_from_flag(spec: str) -> dict:
    if ":" not in spec:
        raise LmforgeError(f"--task {spec!r}: expected TYPE:PATH, e.g. multiple_choice:data/mc.jsonl")
    kind, path = spec.split(":", 1)
    return {"name": Path(path).stem, "type": kind, "path": path}


def build_tasks(cfg: dict) -> list:
    from lmforge.eval.tasks import TaskConfig

    tasks, names = [], set()
    for i, t in enumerate(cfg.get("tasks") or []):
        if not isinstance(t, dict) or "name" not in t or "type" not in t:
            raise LmforgeError(f"tasks[{i}]: each task needs at least 'name' and 'type' (got {t!r})")
        fields = set(TaskConfig.__dataclass_fields__)
        unknown = sorted(set(t) - fields)
        if unknown:
            raise LmforgeError(
                f"task {t['name']!r}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(fields))})"
            )
        if t["name"] in names:
            raise LmforgeError(f"task name {t['name']!r} is used twice; names must be unique")
        names.add(t["name"])
        t = {"limit": cfg.get("limit"), "seed": cfg.get("seed", 0), **t}
        tasks.append(TaskConfig(**t))
    return tasks


def read_config(name: str, overrides: list[str]) -> dict:
    """eval-default.yaml, with the fields of another config file on top (a file may list only its
    tasks), then the command-line overrides; every field checked (`EvalRecipe`), then as a mapping."""
    return dataclasses.asdict(load_config(EvalRecipe, name, overrides, base="eval-default"))


def main(args: argparse.Namespace) -> int:
    from lmforge.eval.report import write_comparison

    cfg = read_config(args.config, overrides_from_args(args, FLAGS))
    if args.compare:
        paths = write_comparison(args.compare[0], args.compare[1], cfg["out"])
        print(f"comparison written to {paths['markdown']} and {paths['html']}")
        return 0
    cfg["model"] = args.model or cfg.get("model")
    if not cfg["model"]:
        raise LmforgeError("give a model: `lmforge eval MODEL` (a model folder or an http(s) endpoint URL)")
    cfg["tasks"] = list(cfg.get("tasks") or []) + [task_from_flag(s) for s in args.task]
    tasks = build_tasks(cfg)
    seed_everything(int(cfg.get("seed") or 0))
    run(cfg, tasks)
    return 0


def run(cfg: dict, tasks: list) -> dict:
    """Evaluate and write the report; returns the results dict."""
    from lmforge.eval.lm import load_lm
    from lmforge.eval.report import write_report
    from lmforge.eval.suite import evaluate

    def load(spec: str):
        return load_lm(
            str(spec),
            device=cfg.get("device"),
            dtype=cfg.get("dtype"),
            batch_size=int(cfg.get("batch_size") or 8),
            endpoint_model=cfg.get("endpoint_model") or "default",
            max_length=cfg.get("max_length"),
        )

    lm = load(cfg["model"])
    builtin = BuiltinConfig(**cfg["builtin"]) if cfg.get("builtin") else None
    if builtin is None and not tasks:
        raise LmforgeError("nothing to evaluate: builtin is null and no tasks are configured (add --task TYPE:PATH)")
    if any(t.type == "rag" for t in tasks):
        import lmforge.rag.evaluate  # noqa: F401  (registers the rag task type's runner)
    cont = cfg.get("contamination") or {}
    index = None
    if cont.get("corpus"):
        from lmforge.eval.contamination import load_index

        index = load_index(cont["corpus"], n=int(cont.get("ngram") or 13))
    results = evaluate(
        lm, tasks, builtin=builtin, contamination=index, min_overlap=cont.get("min_overlap"), config=cfg, load=load
    )
    paths = write_report(results, cfg["out"])
    for t in results["tasks"]:
        shown = {k: v for k, v in t["metrics"].items() if k != "examples"}
        print(
            f"{t['name']:<24} "
            + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(shown.items())[:4])
        )
    print(f"report: {paths['markdown']} and {paths['html']} (every prediction in {paths['results']})")
    return results
