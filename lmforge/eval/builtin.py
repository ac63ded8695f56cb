"""Built-in tasks from the default corpus (the standard library), so a model trained by the
pipeline on nothing else still gets a meaningful report. Held-out modules are the ones the data
pipeline's split puts in validation (`lmforge.data.shards.is_validation` on the same document ids,
`stdlib/<path>` for code and `stdlib/<path>#prose` for prose, same fraction and seed), so the model
never trained on them.

    stdlib_code_ppl      perplexity / bits per byte of held-out modules' source
    stdlib_prose_ppl     the same on held-out modules' docstrings and comments
    stdlib_docstring     signature -> first sentence of the docstring (generation, ROUGE-L)
    stdlib_docstring_mc  which of 4 first sentences belongs to this function (log-likelihood; the
                         headline is acc_mutual_info: each sentence scored by how much the signature
                         raises its likelihood, so a sentence that is likely anywhere does not win)

`chat: true` asks in the chat format the fine-tuned model was trained on (the signature as the user
turn, the sentence as the assistant's); a base model is asked as a code completion.

Everything is deterministic for a given seed. `run_builtin(lm, BuiltinConfig())` runs them all;
`LocalLM(model, tokenizer)` makes an `lm` from a model in memory.
"""

from __future__ import annotations

import functools
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from lmforge.common import LmforgeError
from lmforge.data.shards import is_validation
from lmforge.data.stdlib import FIRST_SENTENCE, documented_functions, is_example, prose_of, signature, stdlib_files
from lmforge.eval.perplexity import text_perplexity
from lmforge.eval.tasks import TaskConfig, TaskResult, aggregate, run_generation, run_multiple_choice


@dataclass
class BuiltinConfig:
    val_fraction: float = 0.05  # must match the split the model was trained with (pretrain data.val_fraction) ...
    split_seed: int = 0  # ... and its seed
    seed: int = 0  # choice of examples and distractors
    max_docs: int = 8  # documents per perplexity task
    max_chars: int = 8000  # characters kept of each document (its start)
    num_examples: int = 40  # docstring tasks
    num_choices: int = 4
    max_new_tokens: int = 32
    stride: int | None = None
    root: str | None = None  # another stdlib folder (tests)
    chat: bool = False  # docstring tasks in the chat template's format (a model fine-tuned on the SFT set)
    # greedy decoding of a small model loops ("the list of the list of ..."), which scores the loop, not the
    # answer: a CTRL-style repetition penalty, the same for every model (1.0: plain greedy)
    repetition_penalty: float = 1.0
    # the training documents (a data stage's train_docs.jsonl): a module among them is never held out,
    # whatever id scheme its data run used (stdlib/<path> or the file's own path)
    trained_docs: str | None = None


@functools.lru_cache(maxsize=4)
def _files(root: str | None) -> tuple[Path, tuple[Path, ...]]:
    base = Path(root or sysconfig.get_paths()["stdlib"])
    return base, tuple(stdlib_files(root=base))


def held_out(cfg: BuiltinConfig, suffix: str = "") -> list[tuple[str, Path]]:
    """(document id, file) of the modules the pipeline's split holds out (`suffix` "#prose" for prose)."""
    base, files = _files(cfg.root)
    trained = _trained_modules(cfg.trained_docs, str(base)) if cfg.trained_docs else frozenset()
    out = []
    for f in files:
        rel = f.relative_to(base).as_posix()
        doc_id = f"stdlib/{rel}{suffix}"
        if is_validation(doc_id, cfg.val_fraction, cfg.split_seed) and rel not in trained:
            out.append((doc_id, f))
    return out


@functools.lru_cache(maxsize=4)
def _trained_modules(path: str, base: str) -> frozenset[str]:
    """Stdlib-relative paths of the modules whose code or prose is in a train_docs.jsonl."""
    from lmforge.common import read_jsonl

    out = set()
    for _, record in read_jsonl(path, "builtin.trained_docs"):
        doc_id = str(record.get("id", "") if isinstance(record, dict) else "").split("#")[0]
        if doc_id.startswith("stdlib/"):
            out.add(doc_id[len("stdlib/") :])
        elif Path(doc_id).is_absolute() and Path(doc_id).is_relative_to(base):
            out.add(Path(doc_id).relative_to(base).as_posix())
    return frozenset(out)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def perplexity_docs(cfg: BuiltinConfig, kind: str) -> list[tuple[str, str]]:
    docs = []
    for doc_id, path in held_out(cfg, "#prose" if kind == "prose" else ""):
        text = _read(path)
        if text is not None and kind == "prose":
            text = prose_of(text)
        if text and text.strip():
            docs.append((doc_id, text[: cfg.max_chars]))
    return docs[: cfg.max_docs]


def functions(cfg: BuiltinConfig) -> list[dict]:
    """Documented functions of the held-out modules: {id, signature, sentence}, sorted by id."""
    out, seen = [], set()
    for doc_id, path in held_out(cfg):
        for node, sentence in documented_functions(_read(path) or ""):
            if not is_example(node, sentence) or len(sentence.split()) < 3 or sentence in seen:
                continue  # the SFT set's rule (public, 10-200 characters); too short to tell apart; a duplicate
            seen.add(sentence)
            out.append(
                {"id": f"{doc_id}:{node.lineno}:{node.name}", "signature": signature(node), "sentence": sentence}
            )
    return sorted(out, key=lambda f: f["id"])


def _prompt(signature: str, chat_template=None) -> str:
    """A completion prompt (`def f(x):` then an opened docstring), or with a tokenizer, the chat
    turn the SFT set trains (the same `record_to_messages` shape: the signature is the user turn)."""
    if chat_template is None:
        return f'{signature}\n    """'
    return chat_template.apply_chat_template([{"role": "user", "content": signature}], add_generation_prompt=True)


def docstring_examples(cfg: BuiltinConfig, chat_template=None) -> list[dict]:
    fns = functions(cfg)
    rng = random.Random(cfg.seed)
    picked = rng.sample(fns, min(cfg.num_examples, len(fns)))
    return [
        {"id": f["id"], "prompt": _prompt(f["signature"], chat_template), "answers": [f["sentence"]]} for f in picked
    ]


def docstring_mc_examples(cfg: BuiltinConfig, chat_template=None) -> list[dict]:
    fns = functions(cfg)
    rng = random.Random(cfg.seed + 1)
    picked = rng.sample(fns, min(cfg.num_examples, len(fns)))
    out = []
    for f in picked:
        others = [g["sentence"] for g in fns if g["id"] != f["id"]]
        choices = rng.sample(others, min(cfg.num_choices - 1, len(others))) + [f["sentence"]]
        rng.shuffle(choices)
        out.append(
            {
                "id": f["id"],
                "context": _prompt(f["signature"], chat_template),
                "choices": choices,
                "gold": choices.index(f["sentence"]),
            }
        )
    return out


def task_configs(cfg: BuiltinConfig) -> dict[str, TaskConfig]:
    return {
        "stdlib_code_ppl": TaskConfig("stdlib_code_ppl", "perplexity", stride=cfg.stride),
        "stdlib_prose_ppl": TaskConfig("stdlib_prose_ppl", "perplexity", stride=cfg.stride),
        "stdlib_docstring": TaskConfig(
            "stdlib_docstring",
            "generation",
            seed=cfg.seed,
            target_delimiter="",
            max_new_tokens=cfg.max_new_tokens,
            stop=['"""', "\n\n"],
            answer_regex=FIRST_SENTENCE,
            metrics=["rouge_l", "exact_match"],
            repetition_penalty=cfg.repetition_penalty,
        ),
        "stdlib_docstring_mc": TaskConfig(
            "stdlib_docstring_mc",
            "multiple_choice",
            seed=cfg.seed,
            target_delimiter="",
            unconditional_context=_prompt("", None),
        ),
    }


def run_builtin(lm, cfg: BuiltinConfig | None = None, tasks: list[str] | None = None) -> list[TaskResult]:
    """Run the built-in tasks (all, or the names in `tasks`) with an `lm` (e.g. `LocalLM(model, tokenizer)`)."""
    cfg = cfg or BuiltinConfig()
    configs = task_configs(cfg)
    template = _chat_tokenizer(lm) if cfg.chat else None
    if template is not None:  # the same question with no signature: what the sentence costs anywhere
        configs["stdlib_docstring_mc"].unconditional_context = _prompt("", template)
    results = []
    for name in tasks or list(configs):
        tc = configs[name]
        if tc.type == "perplexity":
            metrics, records = text_perplexity(
                lm, perplexity_docs(cfg, "prose" if "prose" in name else "code"), cfg.stride
            )
            results.append(TaskResult(name, tc.type, metrics, records))
        elif tc.type == "generation":
            results.append(run_generation(lm, tc, docstring_examples(cfg, template)))
        else:
            results.append(run_multiple_choice(lm, tc, docstring_mc_examples(cfg, template)))
        results[-1].config = {"builtin": cfg.__dict__.copy()}
    return results


def _chat_tokenizer(lm):
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise LmforgeError("builtin.chat: this model has no tokenizer with a chat template to ask in the chat format")
    return tokenizer


__all__ = [
    "BuiltinConfig",
    "run_builtin",
    "functions",
    "docstring_examples",
    "docstring_mc_examples",
    "perplexity_docs",
    "held_out",
    "aggregate",
]
