"""What a task is and its examples: TaskConfig, TaskResult, and reading/normalizing a task's JSONL
rows. The task runners (tasks.py, codeexec.py, judge.py) all build on this module, so none of them
imports another to get at it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.common import LmforgeError
from lmforge.common import read_jsonl as common_read_jsonl

TASK_TYPES = ("multiple_choice", "generation", "code", "perplexity", "judge_pairwise", "judge_single", "rag")


@dataclass
class TaskConfig:
    name: str
    type: str
    path: str | None = None  # JSONL (or .txt for perplexity)
    data_dir: str | None = None  # perplexity on packed shards instead of a file
    split: str = "val"
    limit: int | None = None  # first N examples only
    num_fewshot: int = 0
    fewshot_path: str | None = None
    seed: int = 0
    target_delimiter: str = " "  # between a context and its answer (lm-eval's default)
    fewshot_delimiter: str = "\n\n"
    max_new_tokens: int = 64
    stop: list[str] | None = None  # stop strings (None: "\n\n" for generation, HumanEval's for code)
    answer_regex: str | None = None  # the first group is the answer
    metrics: list[str] = field(default_factory=lambda: ["exact_match", "f1"])
    temperature: float = 0.0
    repetition_penalty: float = 1.0  # generation: >1 discourages repeating tokens (CTRL / HF semantics)
    num_samples: int = 1  # code: completions per problem
    k: list[int] = field(default_factory=lambda: [1])  # code: pass@k
    timeout: float = 10.0  # code: seconds per candidate
    memory_mb: int = 1024  # code: address-space limit per candidate
    stride: int | None = None  # perplexity: sliding-window stride (None: non-overlapping windows)
    judge: str | None = None  # judge_*: model folder or endpoint URL of the judge
    baseline: str | None = None  # judge_pairwise: model to compare against (else the file's "baseline" answers)
    # multiple_choice: also score each choice after this answer-free context and report acc_mutual_info
    # (argmax of log p(choice | context) - log p(choice | unconditional context), as lm-eval's metric)
    unconditional_context: str | None = None
    index: str | None = None  # rag: the `lmforge rag index` folder to retrieve from (runner: lmforge.rag.evaluate)
    rag_mode: str = "hybrid"  # rag: bm25 | dense | hybrid
    rag_passages: int = 3  # rag: passages given to the model (0: answer without retrieval)

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise LmforgeError(f"task {self.name!r}: unknown type {self.type!r} (choose from {', '.join(TASK_TYPES)})")


@dataclass
class TaskResult:
    name: str
    type: str
    metrics: dict[str, float]
    examples: list[dict]
    metrics_clean: dict[str, float] | None = None
    contamination: dict | None = None
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------- data


def read_jsonl(path: str | Path) -> list[dict]:
    return [record for _, record in common_read_jsonl(path, "task file")]


def _field(row: dict, names: tuple[str, ...], where: str) -> Any:
    for n in names:
        if n in row:
            return row[n]
    raise LmforgeError(f"{where}: missing field {names[0]!r} (also accepted: {', '.join(names[1:]) or 'none'})")


def normalize_mc(row: dict, where: str) -> dict:
    context = _field(row, ("context", "question", "query"), where)
    choices = _field(row, ("choices", "options", "endings"), where)
    if not isinstance(choices, list) or len(choices) < 2:
        raise LmforgeError(f"{where}: 'choices' must be a list of at least 2 strings")
    gold = _field(row, ("gold", "answer", "label"), where)
    if isinstance(gold, str) and gold in choices:
        gold = choices.index(gold)
    if not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise LmforgeError(
            f"{where}: 'gold' must be an index into choices (0..{len(choices) - 1}) or a choice, got {gold!r}"
        )
    return {
        "id": str(row.get("id", where)),
        "context": str(context),
        "choices": [str(c) for c in choices],
        "gold": gold,
    }


def normalize_gen(row: dict, where: str) -> dict:
    prompt = _field(row, ("prompt", "question", "context", "input"), where)
    answers = _field(row, ("answer", "answers", "target", "reference"), where)
    answers = [answers] if isinstance(answers, str) else [str(a) for a in answers]
    if not answers:
        raise LmforgeError(f"{where}: empty 'answer' list")
    return {**row, "id": str(row.get("id", row.get("task_id", where))), "prompt": str(prompt), "answers": answers}


def load_examples(cfg: TaskConfig, normalize: Callable[[dict, str], dict], apply_limit: bool = True) -> list[dict]:
    if not cfg.path:
        raise LmforgeError(f"task {cfg.name!r}: 'path' is required for type {cfg.type}")
    rows = read_jsonl(cfg.path)
    out = [normalize(r, f"{cfg.path}:{i + 1}") for i, r in enumerate(rows)]
    for i, ex in enumerate(out):  # default ids by line keep examples addressable in the report
        ex["id"] = ex["id"] if "id" in rows[i] or "task_id" in rows[i] else f"{cfg.name}/{i}"
    return out[: cfg.limit] if cfg.limit and apply_limit else out
