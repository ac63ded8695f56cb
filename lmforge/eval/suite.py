"""Running a list of tasks against one model: dispatch by task type, contamination flags, results.

lm = load_lm("out/model")                       # or LocalLM(model, tokenizer), or an endpoint URL
results = evaluate(lm, [TaskConfig(...), ...], builtin=BuiltinConfig(), contamination="corpus/")
write_report(results, "out/eval")
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from lmforge.common import LmforgeError, get_logger
from lmforge.eval.lm import LocalLM, load_lm
from lmforge.eval.report import make_results
from lmforge.eval.tasks import TaskConfig, TaskResult, run_generation, run_multiple_choice

log = get_logger("lmforge.eval")


# Task types whose runner lives above this layer, registered by the module that implements them:
# "rag" by lmforge.rag.evaluate (`lmforge eval` imports it). type -> runner(lm, cfg) -> TaskResult.
TASK_RUNNERS: dict = {}
RUNNER_MODULES = {"rag": "lmforge.rag.evaluate"}


def run_task(lm, cfg: TaskConfig, load=load_lm) -> TaskResult:
    if cfg.type in RUNNER_MODULES:
        if cfg.type not in TASK_RUNNERS:
            raise LmforgeError(f"task {cfg.name!r}: type {cfg.type} needs `import {RUNNER_MODULES[cfg.type]}` first")
        return TASK_RUNNERS[cfg.type](lm, cfg)
    if cfg.type == "multiple_choice":
        return run_multiple_choice(lm, cfg)
    if cfg.type == "generation":
        return run_generation(lm, cfg)
    if cfg.type == "code":
        from lmforge.eval.codeexec import run_code

        return run_code(lm, cfg)
    if cfg.type in ("judge_pairwise", "judge_single"):
        from lmforge.eval.judge import run_judge_task

        return run_judge_task(lm, cfg, load)
    return run_perplexity(lm, cfg)


def run_perplexity(lm, cfg: TaskConfig) -> TaskResult:
    from lmforge.eval import perplexity as P
    from lmforge.eval.tasks import read_jsonl

    if not isinstance(lm, LocalLM):
        texts = _perplexity_texts(cfg, read_jsonl)
        nll = [-x for x in lm.loglikelihood_rolling([t for _, t in texts])]
        records = [
            {"id": i, "nll": n, "tokens": 0, "bytes": len(t.encode()), "text": t[:200]} for (i, t), n in zip(texts, nll)
        ]
        return TaskResult(cfg.name, cfg.type, {"bits_per_byte": P.aggregate(records)["bits_per_byte"]}, records)
    if cfg.data_dir:
        metrics, records = P.shard_perplexity(lm, cfg.data_dir, cfg.split, cfg.stride, cfg.limit)
    else:
        metrics, records = P.text_perplexity(lm, _perplexity_texts(cfg, read_jsonl), cfg.stride)
    return TaskResult(cfg.name, cfg.type, metrics, records)


def _perplexity_texts(cfg: TaskConfig, read_jsonl) -> list[tuple[str, str]]:
    if not cfg.path:
        raise LmforgeError(f"task {cfg.name!r}: perplexity needs 'path' (a .txt or .jsonl file) or 'data_dir'")
    path = Path(cfg.path)
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
        texts = [(str(r.get("id", f"{cfg.name}/{i}")), str(r.get("text", ""))) for i, r in enumerate(rows)]
    elif path.is_file():
        texts = [(path.name, path.read_text(encoding="utf-8", errors="replace"))]
    else:
        raise LmforgeError(f"task {cfg.name!r}: perplexity file not found: {path}")
    return texts[: cfg.limit] if cfg.limit else texts


def evaluate(
    lm,
    tasks: Sequence[TaskConfig],
    builtin=None,
    contamination=None,
    min_overlap: int | None = None,
    config: dict | None = None,
    load=load_lm,
) -> dict:
    """Run `tasks` (and the built-in tasks when `builtin` is a BuiltinConfig) -> results dict.
    `contamination`: an NGramIndex, or a path for `contamination.load_index`."""
    results: list[TaskResult] = []
    configs: list[TaskConfig | None] = []
    for cfg in tasks:
        t0 = time.perf_counter()
        results.append(run_task(lm, cfg, load))
        configs.append(cfg)
        results[-1].config = {**cfg.__dict__, **results[-1].config}
        log.info("%s: %s (%.1f s)", cfg.name, _short(results[-1].metrics), time.perf_counter() - t0)
    if builtin is not None:
        if not isinstance(lm, LocalLM):
            raise LmforgeError("the built-in tasks need a local model (perplexity needs the model's tokenizer)")
        from lmforge.eval.builtin import run_builtin, task_configs

        t0 = time.perf_counter()
        for r in run_builtin(lm, builtin):
            results.append(r)
            configs.append(task_configs(builtin)[r.name])
            log.info("%s: %s", r.name, _short(r.metrics))
        log.info("built-in tasks: %.1f s", time.perf_counter() - t0)
    if contamination is not None:
        from lmforge.eval.contamination import flag, load_index

        index = load_index(contamination) if isinstance(contamination, (str, Path)) else contamination
        for r, cfg in zip(results, configs):
            flag(r, cfg, index, min_overlap)
    return make_results(getattr(lm, "name", "model"), results, config)


def _short(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(metrics.items())[:4])
