"""The whole lifecycle in one command, on the built-in corpus by default:

    data -> pretrain (base) -> sft (full or PEFT, merged: final) -> draft (distilled from final) -> quantize
         -> eval -> generate -> report

    lmforge pipeline                          # lmforge/configs/pipeline-tiny.yaml, < 15 min on 2 CPU cores
    lmforge pipeline --config my.yaml         # any other recipe (see pipeline-gpu-120m.yaml)
    lmforge pipeline --from sft               # rerun from a stage; --only report reruns one stage
    lmforge pipeline --set pretrain.steps=50  # override any recipe field

Each stage runs its own `lmforge <command>` (a separate process, so stages stay independent recipes)
and is skipped when its outputs exist and its settings and inputs are unchanged: re-running resumes.
Ctrl-C leaves finished stages stamped and the interrupted one to be resumed (training resumes from
its last checkpoint). Results land in runs/<name>/; `lmforge serve runs/<name>/final` serves the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lmforge.common import LmforgeError, atomic_write_json, get_logger, read_json
from lmforge.recipes._common import add_deprecated_alias, load_config_tree

log = get_logger("lmforge.pipeline")
STAGES = ["data", "pretrain", "sft", "draft", "quantize", "eval", "generate", "report"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", default="pipeline-tiny", help="pipeline YAML: a path or a built-in name (default: %(default)s)"
    )
    add_deprecated_alias(p, "--recipe", "--config")  # every command's recipe YAML is --config
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set pretrain.steps=50 (repeatable)",
    )
    p.add_argument("--name", help="run name (default: the recipe's name); outputs go to RUNS_DIR/NAME")
    p.add_argument("--runs-dir", help="parent folder of runs (default: the recipe's runs_dir)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--from", dest="from_stage", choices=STAGES, help="rerun this stage and every later one")
    group.add_argument("--only", choices=STAGES, help="rerun only this stage")


def main(args: argparse.Namespace) -> int:
    cfg = load_config_tree(
        args.config, args.overrides, open_sections=("data", "pretrain", "draft", "sft", "eval", "generate")
    )
    run = Path(args.runs_dir or cfg.get("runs_dir", "runs")) / (args.name or cfg.get("name", "pipeline"))
    run.mkdir(parents=True, exist_ok=True)
    forced = set(STAGES[STAGES.index(args.from_stage) :]) if args.from_stage else {args.only} if args.only else set()
    todo = [args.only] if args.only else STAGES
    t0 = time.time()
    for stage in todo:
        runner = STAGE_RUNNERS[stage]
        key = _stage_key(stage, cfg, run)
        stamp = run / ".stamps" / f"{stage}.json"
        if stage not in forced and _is_done(stamp, key):
            log.info("stage %s: up to date, skipped", stage)
            continue
        started = run / ".stamps" / f"{stage}.started"
        resume = started.is_file() and started.read_text() == key and stage not in forced
        stamp.unlink(missing_ok=True)
        started.parent.mkdir(parents=True, exist_ok=True)
        started.write_text(key)
        log.info("stage %s: %s", stage, "resuming" if resume else "running")
        t = time.time()
        runner(cfg, run, resume)
        atomic_write_json(stamp, {"key": key, "seconds": round(time.time() - t, 1), "finished": time.time()})
    print(
        f"pipeline finished in {time.time() - t0:.0f}s: report at {run / 'report.html'} and {run / 'report.md'}; "
        f"serve the model with `lmforge serve --model {run / 'final'}`"
    )
    return 0


def _stage_key(stage: str, cfg: dict, run: Path) -> str:
    """Hash of the stage's settings and of the stamps of the stages before it."""
    before = STAGES[: STAGES.index(stage)]
    upstream = [
        (run / ".stamps" / f"{s}.json").read_text() if (run / ".stamps" / f"{s}.json").is_file() else "" for s in before
    ]
    section = {s: cfg.get(s) for s in SECTIONS[stage]}
    return hashlib.sha256(json.dumps([section, upstream], sort_keys=True, default=str).encode()).hexdigest()[:16]


SECTIONS = {
    "data": ["data"],
    "pretrain": ["pretrain"],
    "sft": ["sft"],
    "draft": ["draft"],
    "quantize": ["quantize"],
    "eval": ["eval"],
    "generate": ["generate"],
    "report": [],
}


def _is_done(stamp: Path, key: str) -> bool:
    try:
        return read_json(stamp).get("key") == key
    except LmforgeError:
        return False


def lmforge(*args: str, log_file: Path | None = None) -> None:
    """Run `python -m lmforge ARGS` with its output shown (and kept in log_file); raise on failure."""
    cmd = [sys.executable, "-m", "lmforge", *map(str, args)]
    log.info("$ lmforge %s", " ".join(map(str, args)))
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file or os.devnull, "a", encoding="utf-8") as sink:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        tail = []
        try:
            for line in proc.stdout:
                sys.stderr.write(line)
                sink.write(line)
                tail = (tail + [line])[-20:]
            code = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    if code != 0:
        raise LmforgeError(f"`lmforge {args[0]}` failed (exit {code}); last lines:\n" + "".join(tail))


def _sets(values: list[str] | None) -> list[str]:
    out = []
    for v in values or []:
        out += ["--set", v]
    return out


# ----------------------------------------------------------------------------- stages


def stage_data(cfg: dict, run: Path, resume: bool) -> None:
    import sysconfig

    d = cfg.get("data") or {}
    # `{stdlib}` in an input path stands for this interpreter's standard library folder.
    inputs = [str(p).replace("{stdlib}", sysconfig.get_paths()["stdlib"]) for p in d.get("inputs") or []]
    lmforge(
        "data",
        "prepare",
        *inputs,
        "-o",
        run / "data",
        "--no-progress",
        *_sets(d.get("set")),
        log_file=run / "logs" / "data.log",
    )


def data_split(cfg: dict) -> tuple[float, int]:
    """(held-out fraction, seed) of the data stage's document split: the documents pretraining
    validates on are the ones SFT leaves out and the built-in eval tasks test on."""
    from lmforge.data.config import load_config as load_data_config

    pack = load_data_config(None, list((cfg.get("data") or {}).get("set") or [])).pack
    return pack.val_fraction, pack.seed


def heldout_split(cfg: dict, run: Path) -> dict:
    """The built-in eval tasks' split (BuiltinConfig fields): the data stage's validation fraction
    and seed, and never a module pretraining saw (its train_docs.jsonl, whatever ids it used)."""
    fraction, seed = data_split(cfg)
    out = {"val_fraction": fraction, "split_seed": seed}
    if (run / "data" / "train_docs.jsonl").is_file():
        out["trained_docs"] = str(run / "data" / "train_docs.jsonl")
    return out


def stage_pretrain(cfg: dict, run: Path, resume: bool) -> None:
    section = cfg.get("pretrain") or {}
    if not resume:
        shutil.rmtree(run / "base", ignore_errors=True)
    lmforge(
        "pretrain",
        "--data",
        run / "data",
        "--runs-dir",
        run,
        "--name",
        "base",
        "--preset",
        section["preset"],
        "--steps",
        section["steps"],
        "--resume",
        *_sets(section.get("set")),
        log_file=run / "logs" / "base.log",
    )


def stage_draft(cfg: dict, run: Path, resume: bool) -> None:
    """The speculative-decoding draft: a small model distilled from the shipped model (final) on the
    pretraining data, so its guesses are the final model's, not just plausible text."""
    section = cfg.get("draft")
    if not section:
        return
    if not resume:
        shutil.rmtree(run / "draft", ignore_errors=True)
    lmforge(
        "pretrain",
        "--data",
        run / "data",
        "--runs-dir",
        run,
        "--name",
        "draft",
        "--preset",
        section["preset"],
        "--steps",
        section["steps"],
        "--teacher",
        run / "final",
        "--resume",
        *_sets(section.get("set")),
        log_file=run / "logs" / "draft.log",
    )


def stage_sft(cfg: dict, run: Path, resume: bool) -> None:
    s = cfg.get("sft") or {}
    if not resume:
        shutil.rmtree(run / "sft", ignore_errors=True)
    heldout, seed = data_split(cfg)
    lmforge(
        "sft",
        "--model",
        run / "base" / "final",
        "--method",
        s.get("method", "lora"),
        "--runs-dir",
        run,
        "--name",
        "sft",
        "--steps",
        s.get("steps", 100),
        "--resume",
        "--set",
        f"data.heldout_fraction={heldout}",
        "--set",
        f"data.split_seed={seed}",
        "--set",
        f"data.replay={run / 'data'}",  # replayed if replay_fraction > 0
        *_sets(s.get("set")),
        log_file=run / "logs" / "sft.log",
    )
    # Ship the checkpoint with the best SFT validation loss, not the last one (which may have overfit).
    best = run / "sft" / "best"
    merge_adapters(best if (best / "lmforge_config.json").is_file() else run / "sft" / "final", run / "final")


def merge_adapters(src: Path, out: Path) -> None:
    """Fold the fine-tuned adapters into the base weights: a plain model with no inference cost."""
    from lmforge import peft
    from lmforge.checkpoint import load_model, load_tokenizer_if_any, save_model
    from lmforge.model import has_transform
    from lmforge.quant import dequantize_model

    model = load_model(src)
    if peft.peft_configs(model):
        peft.merge_and_unload(model)
        if has_transform(model, "quant"):
            dequantize_model(model)  # QLoRA: a float model; the quantize stage re-quantizes it
    save_model(model, out, tokenizer=load_tokenizer_if_any(src))


def stage_quantize(cfg: dict, run: Path, resume: bool) -> None:
    for q in cfg.get("quantize") or []:
        extra = ["--calib", run / "data"] if q["method"] != "rtn" else []
        lmforge(
            "quantize",
            "--model",
            run / "final",
            "--out",
            run / "quant" / q["name"],
            "--method",
            q["method"],
            "--scheme",
            q["scheme"],
            *extra,
            log_file=run / "logs" / "quantize.log",
        )


def models_of(cfg: dict, run: Path) -> dict[str, Path]:
    """Every model the pipeline produced, in the order the report shows them."""
    out = {"base": run / "base" / "final", "draft": run / "draft" / "final", "final (sft, merged)": run / "final"}
    for q in cfg.get("quantize") or []:
        out[f"final {q['name']}"] = run / "quant" / q["name"]
    return {k: v for k, v in out.items() if (v / "lmforge_config.json").is_file()}


def trained_on(run: Path) -> list[Path]:
    """Everything the models trained on: the pretraining documents and the SFT conversations."""
    return [p for p in (run / "data" / "train_docs.jsonl", run / "sft" / "train_data.jsonl") if p.is_file()]


def stage_eval(cfg: dict, run: Path, resume: bool) -> None:
    e = cfg.get("eval") or {}
    corpora = trained_on(run)
    contamination = ["--set", "contamination.corpus=" + json.dumps([str(p) for p in corpora])] if corpora else []
    split = [item for key, value in heldout_split(cfg, run).items() for item in ("--set", f"builtin.{key}={value}")]
    for label, path in models_of(cfg, run).items():
        out = run / "eval" / path.relative_to(run).as_posix().replace("/", "-")
        chat = ["--set", "builtin.chat=true"] if label.startswith("final") else []  # asked as it was fine-tuned
        lmforge(
            "eval",
            path,
            "--out",
            out,
            *contamination,
            *split,
            *chat,
            *_sets(e.get("set")),
            log_file=run / "logs" / "eval.log",
        )


def stage_generate(cfg: dict, run: Path, resume: bool) -> None:
    from lmforge.recipes._pipeline_measure import measure_generation

    results = measure_generation(cfg.get("generate") or {}, models_of(cfg, run), heldout_split(cfg, run), run / "data")
    atomic_write_json(run / "generate" / "results.json", results)


def stage_report(cfg: dict, run: Path, resume: bool) -> None:
    from lmforge.recipes._pipeline_report import write_report

    paths = write_report(cfg, run, models_of(cfg, run), STAGES)
    log.info("wrote %s and %s", paths["html"], paths["markdown"])


STAGE_RUNNERS = {
    "data": stage_data,
    "pretrain": stage_pretrain,
    "sft": stage_sft,
    "draft": stage_draft,
    "quantize": stage_quantize,
    "eval": stage_eval,
    "generate": stage_generate,
    "report": stage_report,
}
