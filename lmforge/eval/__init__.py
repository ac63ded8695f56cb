"""L5: evaluation. Perplexity / bits per byte, multiple choice by log-likelihood, generation tasks
(EM, F1, BLEU, chrF, ROUGE-L), sandboxed code execution (pass@k), LLM-as-judge, contamination flags,
built-in standard-library tasks, reports, and an lm-evaluation-harness backend (`harness.py`).

    from lmforge.eval import LocalLM, evaluate_builtin
    results = evaluate_builtin(model, tokenizer, "runs/eval")      # the pipeline's one call

Names are imported lazily so `import lmforge.eval` stays light.
"""

from __future__ import annotations

_LAZY = {
    "LocalLM": "lmforge.eval.lm",
    "EndpointLM": "lmforge.eval.lm",
    "load_lm": "lmforge.eval.lm",
    "TaskConfig": "lmforge.eval.tasks",
    "TaskResult": "lmforge.eval.tasks",
    "BuiltinConfig": "lmforge.eval.builtin",
    "run_builtin": "lmforge.eval.builtin",
    "evaluate": "lmforge.eval.suite",
    "write_report": "lmforge.eval.report",
    "write_comparison": "lmforge.eval.report",
}

__all__ = [*_LAZY, "evaluate_builtin"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmforge.eval' has no attribute {name!r}")


def evaluate_builtin(model, tokenizer, out_dir=None, name: str = "model", contamination=None, **builtin) -> dict:
    """Built-in tasks for a model in memory (+ report in `out_dir` when given) -> results dict.
    `builtin`: BuiltinConfig fields (val_fraction and split_seed must match the training split)."""
    from lmforge.eval.builtin import BuiltinConfig
    from lmforge.eval.lm import LocalLM
    from lmforge.eval.report import write_report
    from lmforge.eval.suite import evaluate

    was_training = model.training
    model.eval()
    try:
        results = evaluate(
            LocalLM(model, tokenizer, name=name),
            [],
            builtin=BuiltinConfig(**builtin),
            contamination=contamination,
            config={"builtin": builtin},
        )
    finally:
        model.train(was_training)
    if out_dir is not None:
        write_report(results, out_dir)
    return results
