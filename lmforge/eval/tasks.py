"""Tasks read from local JSONL files, scored through an `lm` (see lm.py), every prediction kept.

    multiple_choice  {"context"|"question", "choices": [...], "gold"|"answer"|"label": index or choice text}
    generation       {"prompt"|"question", "answer"|"answers": str or [str, ...]}
    code             {"prompt", "test", "entry_point"}   (HumanEval fields; see codeexec.py)
    perplexity       a .txt file (one document) or .jsonl with "text"; or `data_dir` of packed shards

Few-shot prompts draw `num_fewshot` examples with a seeded RNG (from `fewshot_path`, else from the
task's own file minus the example being asked). Every example keeps its per-example scores, so
`aggregate` can recompute a task's metrics on any subset (the uncontaminated one, say).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np

from lmforge.common import LmforgeError
from lmforge.eval import metrics as M
from lmforge.eval.task_data import (  # noqa: F401
    TASK_TYPES,
    TaskConfig,
    TaskResult,
    _field,
    load_examples,
    normalize_gen,
    normalize_mc,
    read_jsonl,
)


def fewshot_prefix(
    cfg: TaskConfig, pool: list[dict], index: int, exclude_self: bool, render: Callable[[dict], str]
) -> str:
    """`num_fewshot` seeded examples (never the asked one), each rendered with its answer."""
    if cfg.num_fewshot <= 0:
        return ""
    candidates = [ex for i, ex in enumerate(pool) if not (exclude_self and i == index)]
    rng = random.Random(f"{cfg.seed}:{index}")  # per-example seed: the same shots whatever `limit` is
    shots = rng.sample(candidates, min(cfg.num_fewshot, len(candidates)))
    return "".join(render(s) + cfg.fewshot_delimiter for s in shots)


def fewshot_pool(cfg: TaskConfig, examples: list[dict], normalize) -> tuple[list[dict], bool]:
    """(pool, whether it is the task's own examples, so the asked one must be left out)."""
    if cfg.fewshot_path:
        rows = read_jsonl(cfg.fewshot_path)
        return [normalize(r, f"{cfg.fewshot_path}:{i + 1}") for i, r in enumerate(rows)], False
    return examples, True


# ----------------------------------------------------------------------------- multiple choice


def run_multiple_choice(lm, cfg: TaskConfig, examples: list[dict] | None = None) -> TaskResult:
    examples = examples if examples is not None else load_examples(cfg, normalize_mc, apply_limit=False)
    pool, own = fewshot_pool(cfg, examples, normalize_mc)  # shots come from all examples, `limit` or not
    examples = examples[: cfg.limit] if cfg.limit else examples
    d = cfg.target_delimiter
    requests, contexts = [], []
    for i, ex in enumerate(examples):
        ctx = fewshot_prefix(cfg, pool, i, own, lambda s: s["context"] + d + s["choices"][s["gold"]]) + ex["context"]
        contexts.append(ctx)
        requests += [(ctx, d + c) for c in ex["choices"]]
    scores = lm.loglikelihood(requests)
    unconditional = None
    if cfg.unconditional_context is not None:  # one context for all: each distinct choice scored once
        distinct = sorted({d + c for ex in examples for c in ex["choices"]})
        priors = lm.loglikelihood([(cfg.unconditional_context, c) for c in distinct])
        unconditional = {c: s[0] for c, s in zip(distinct, priors)}
    records, pos = [], 0
    for ex, ctx in zip(examples, contexts):
        lls = [s[0] for s in scores[pos : pos + len(ex["choices"])]]
        pos += len(ex["choices"])
        # Length normalisation by characters of the choice, as lm-eval's acc_norm.
        normed = [ll / max(1, len(d + c)) for ll, c in zip(lls, ex["choices"])]
        pred, pred_norm = int(np.argmax(lls)), int(np.argmax(normed))
        record = {
            "id": ex["id"],
            "input": ex["context"],
            "prompt": ctx,
            "choices": ex["choices"],
            "gold": ex["gold"],
            "loglikelihoods": lls,
            "prediction": pred,
            "prediction_norm": pred_norm,
            "scores": {"acc": float(pred == ex["gold"]), "acc_norm": float(pred_norm == ex["gold"])},
        }
        if unconditional is not None:
            pmi = [ll - unconditional[d + c] for ll, c in zip(lls, ex["choices"])]
            record["prediction_mutual_info"] = int(np.argmax(pmi))
            record["scores"]["acc_mutual_info"] = float(record["prediction_mutual_info"] == ex["gold"])
        records.append(record)
    return TaskResult(cfg.name, cfg.type, aggregate(cfg, records), records)


# ----------------------------------------------------------------------------- generation


def run_generation(lm, cfg: TaskConfig, examples: list[dict] | None = None) -> TaskResult:
    examples = examples if examples is not None else load_examples(cfg, normalize_gen, apply_limit=False)
    pool, own = fewshot_pool(cfg, examples, normalize_gen)
    examples = examples[: cfg.limit] if cfg.limit else examples
    d = cfg.target_delimiter
    prompts = [
        fewshot_prefix(cfg, pool, i, own, lambda s: s["prompt"] + d + s["answers"][0]) + ex["prompt"]
        for i, ex in enumerate(examples)
    ]
    stop = ["\n\n"] if cfg.stop is None else cfg.stop
    extra = {"repetition_penalty": cfg.repetition_penalty} if cfg.repetition_penalty != 1.0 else {}
    outputs = lm.generate(
        prompts, max_new_tokens=cfg.max_new_tokens, stop=stop, temperature=cfg.temperature, seed=cfg.seed, **extra
    )
    records = []
    for ex, prompt, out in zip(examples, prompts, outputs):
        pred = M.extract_answer(out, cfg.answer_regex)
        records.append(
            {
                "id": ex["id"],
                "input": ex["prompt"],
                "prompt": prompt,
                "output": out,
                "prediction": pred,
                "answers": ex["answers"],
                "scores": sentence_scores(pred, ex["answers"], cfg.metrics),
            }
        )
    return TaskResult(cfg.name, cfg.type, aggregate(cfg, records), records)


_SENTENCE_METRICS = {"exact_match": M.exact_match, "f1": M.token_f1, "rouge_l": M.rouge_l}
_CORPUS_METRICS = {"bleu": M.bleu, "chrf": M.chrf}


def sentence_scores(pred: str, answers: list[str], names: list[str]) -> dict[str, float]:
    unknown = set(names) - set(_SENTENCE_METRICS) - set(_CORPUS_METRICS)
    if unknown:
        raise LmforgeError(
            f"unknown metric(s) {', '.join(sorted(unknown))} (known: "
            f"{', '.join([*_SENTENCE_METRICS, *_CORPUS_METRICS])})"
        )
    return {n: _SENTENCE_METRICS[n](pred, answers) for n in names if n in _SENTENCE_METRICS}


# ----------------------------------------------------------------------------- aggregation


def aggregate(cfg: TaskConfig, records: list[dict]) -> dict[str, float]:
    """Task metrics from per-example records (so a subset can be re-scored)."""
    if cfg.type == "perplexity":
        from lmforge.eval.perplexity import aggregate as ppl

        return ppl(records)
    if cfg.type == "code":
        from lmforge.eval.codeexec import aggregate as code

        return code(records, cfg.k)
    if cfg.type == "judge_pairwise":
        from lmforge.eval.judge import aggregate_pairwise

        return aggregate_pairwise(records, cfg.seed)
    if cfg.type == "judge_single":
        from lmforge.eval.judge import aggregate_single

        return aggregate_single(records, cfg.seed)
    out = {"examples": len(records)}
    if not records:
        return out
    for name in records[0]["scores"]:
        out[name] = M.mean([r["scores"][name] for r in records])
    if cfg.type == "generation":
        for name in cfg.metrics:
            if name in _CORPUS_METRICS:
                out[name] = _CORPUS_METRICS[name]([r["prediction"] for r in records], [r["answers"] for r in records])
    return out


PRIMARY = {
    "multiple_choice": "acc",
    "generation": None,
    "code": "pass@1",
    "perplexity": "bits_per_byte",
    "judge_pairwise": "win_rate",
    "judge_single": "score",
    "rag": "rouge_l",
}


def primary_metric(result: dict) -> tuple[str, float] | None:
    """The headline (name, value) of a task result dict, for tables and plots."""
    name = PRIMARY.get(result["type"])
    metrics = result["metrics"]
    if result["type"] == "multiple_choice" and "acc_mutual_info" in metrics:
        name = "acc_mutual_info"  # the task asked for it: the choices' own likelihood is not the question
    if name is None:
        name = next((m for m in ("rouge_l", "exact_match", "f1", "bleu", "chrf") if m in metrics), None)
    if name is None or name not in metrics:
        name = next((k for k in metrics if k != "examples"), None)
    return (name, metrics[name]) if name else None
