"""Front doors used by `lmforge generate` and `lmforge serve`: a JSONL file of prompts through the
engine (optionally with a draft model), one prompt through speculative decoding (draft model,
prompt lookup or Medusa heads), and loading a draft checked against its target.

Input rows: {"prompt": "..."} or {"prompt_ids": [...]} or {"messages": [...]} (chat template),
with optional "id", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "adapter".
Output rows (same order): id, completion, completion_ids, finish_reason, prompt_tokens,
completion_tokens (and with a draft or lookup, speculative: the request's acceptance figures).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from lmforge.common import LmforgeError, atomic_write_text, read_jsonl
from lmforge.tokenizer.text import completion_text

from .engine import Engine
from .sampling import SamplingParams

ROW_PARAMS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty")


def read_prompts(path: str | Path) -> list[tuple[str, dict]]:
    """[(where, row)], where = "path:line" for error messages."""
    rows = read_jsonl(path, "--prompts file")
    for where, row in rows:
        if not ({"prompt", "prompt_ids", "messages"} & set(row)):
            raise LmforgeError(f"{where}: needs a 'prompt', 'prompt_ids' or 'messages' field")
    return rows


def _encode(row: dict, tokenizer, where: str) -> list[int]:
    if "prompt_ids" in row:
        return [int(t) for t in row["prompt_ids"]]
    if tokenizer is None:
        raise LmforgeError(f"{where}: the model has no tokenizer, so rows need 'prompt_ids'")
    if "messages" in row:
        return tokenizer.encode(tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True))
    return tokenizer.encode(row["prompt"])


def load_draft(path: str | Path, target, tokenizer=None):
    """The draft model in `path` on the target's device and dtype, ready for inference; a clear error
    unless it shares the target's vocabulary (and tokenizer, when both folders have one)."""
    from lmforge.checkpoint import load_model, load_tokenizer_if_any

    from .prepare import prepare_for_inference

    p = next(target.parameters())
    draft = load_model(path, device=p.device, dtype=p.dtype if p.is_floating_point() else None)
    if draft.config.vocab_size != target.config.vocab_size:
        raise LmforgeError(
            f"--draft {path}: vocabulary {draft.config.vocab_size} differs from the target's "
            f"{target.config.vocab_size} (the draft needs the same tokenizer)"
        )
    theirs = load_tokenizer_if_any(path)
    if tokenizer is not None and theirs is not None and theirs.backend.get_vocab() != tokenizer.backend.get_vocab():
        raise LmforgeError(
            f"--draft {path}: its tokenizer.json differs from the target's (the draft needs the same tokenizer)"
        )
    return prepare_for_inference(draft)


def run_prompts_file(
    model,
    tokenizer,
    in_path: str | Path,
    out_path: str | Path,
    params: SamplingParams,
    draft: str | None = None,
    lookup: bool = False,
    num_speculative: int = 4,
    **engine_kwargs,
) -> dict:
    """Every prompt of the file through one Engine (speculative with a `draft` model folder or
    prompt `lookup`); writes out_path atomically; returns a summary (with the acceptance rate)."""
    rows = read_prompts(in_path)
    speculative = draft is not None or lookup
    if speculative:
        engine_kwargs.update(
            lookup=lookup,
            num_speculative=num_speculative,
            draft=None if draft is None else load_draft(draft, model, tokenizer),
        )
    engine = Engine(model, tokenizer, **engine_kwargs)
    start, ids = time.perf_counter(), []
    for where, row in rows:
        overrides = {k: row[k] for k in ROW_PARAMS if k in row}
        try:
            sp = dataclasses.replace(params, stop_token_ids=list(params.stop_token_ids), **overrides)
        except TypeError as e:
            raise LmforgeError(f"{where}: {e}") from None
        ids.append(engine.add_request(_encode(row, tokenizer, where), sp, row.get("adapter")))
    while engine.has_unfinished():
        engine.step()
    lines = []
    for i, ((_, row), rid) in enumerate(zip(rows, ids)):
        seq = engine.requests[rid]
        text = completion_text(tokenizer, seq.output, seq.params.stop_strings) if tokenizer is not None else None
        out = dict(
            id=row.get("id", i),
            completion=text,
            completion_ids=seq.output,
            finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt),
            completion_tokens=len(seq.output),
        )
        if seq.error is not None:  # this prompt failed alone in the engine (finish_reason "error")
            out["error"] = seq.error
        if speculative:
            out["speculative"] = engine.acceptance(rid)
        lines.append(json.dumps(out))
    atomic_write_text(out_path, "\n".join(lines) + "\n")
    failed = [(where, engine.requests[rid].error) for (where, _), rid in zip(rows, ids) if engine.requests[rid].error]
    if failed:
        raise LmforgeError(
            f"{len(failed)} of {len(rows)} prompts failed (first, {failed[0][0]}: {failed[0][1]}); "
            f"the others' completions are in {out_path}"
        )
    seconds = time.perf_counter() - start
    s = engine.stats
    summary = dict(
        requests=len(rows),
        generated_tokens=s["generated_tokens"],
        seconds=round(seconds, 2),
        tokens_per_s=round(s["generated_tokens"] / max(seconds, 1e-9), 1),
        prefix_hit_blocks=s["prefix_hit_blocks"],
    )
    if speculative:
        summary.update(
            drafted_tokens=s["drafted_tokens"],
            accepted_tokens=s["accepted_tokens"],
            acceptance_rate=round(s["accepted_tokens"] / max(1, s["drafted_tokens"]), 4),
        )
    return summary


def make_proposer(
    target,
    max_len: int,
    *,
    draft: str | None = None,
    lookup: bool = False,
    medusa: str | None = None,
    k: int = 4,
    min_confidence: float = 0.0,
    tokenizer=None,
):
    """(proposer, k) for exactly one of draft / lookup / medusa, for `decode.decode` (Medusa's k is
    its number of heads: the tree's depth). max_len: the draft's cache (prompt + new tokens)."""
    from .medusa import MedusaProposer, load_medusa
    from .speculative import DraftProposer, LookupProposer

    if sum([draft is not None, bool(lookup), medusa is not None]) != 1:
        raise LmforgeError("choose one of --draft DIR, --lookup, --medusa DIR")
    if medusa is not None:
        heads = load_medusa(medusa, next(target.parameters()).device)
        if heads.hidden_size != target.config.hidden_size:
            raise LmforgeError(
                f"{medusa}: heads of hidden size {heads.hidden_size} do not fit this model "
                f"(hidden size {target.config.hidden_size})"
            )
        return MedusaProposer(target, heads), heads.num_heads
    if draft is not None:
        return DraftProposer(load_draft(draft, target, tokenizer), max_len + k + 1, min_confidence), k
    return LookupProposer(), k
