"""The one single-sequence decode driver (gpt-fast's single `generate(..., draft_model, speculate_k)`):
every way of decoding outside the batching engine goes through `decode`.

    decode(model, params, ids)                                  plain: one prefill, one token per step
    decode(model, params, ids, attention_mask=m)                a left-padded batch (plain only)
    decode(lm, params, inputs_embeds=e, input_ids=ids)          a prefill of embeddings (a VLM's spliced
                                                                image + text); ids feed the repetition penalty
    decode(model, params, ids, proposer=p, k=4, stats=s)        speculative: a proposer guesses up to k tokens
                                                                (speculative.DraftProposer / LookupProposer,
                                                                medusa.MedusaProposer), one forward verifies them
    decode(model, params, ids, sinks=AttentionSinks(4, 252))    a StreamingLLM cache (streaming.py)

It yields the next token of every row, a tensor [B], one at a time in every mode. The same
SamplingParams (seed, temperature, top-k/p, repetition penalty, stop ids, max tokens) reach every
mode; a combination a mode cannot honour raises LmforgeError instead of being dropped. A row that
hits a stop id yields it and then, in a batch, keeps yielding the first stop id until every row has
stopped (callers drop what follows a stop).

Speculative verification: the proposal is a tree of tokens after the last one (a chain for draft
and lookup, Medusa's tree of head guesses). The target runs the last token and the proposal in one
forward [1, n + 1], each node seeing the context and its own ancestors; the longest path whose tokens
the target accepts is kept, plus one token from the target at its end. Acceptance is rejection
sampling (Leviathan et al. 2023; Chen et al. 2023), so the output is distributed exactly as the
target's own sampling; greedy output is identical to plain greedy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from lmforge.common import LmforgeError
from lmforge.model import KVCache

from .grammar import draft_masks, grammar_for, grammar_masks, mask_logits
from .sampling import SamplingParams, adjust_logits, probabilities, sample


class Proposer(Protocol):
    """Guesses tokens for the target to verify. `propose` returns (tokens, q): q [n, V] the
    distribution each token was drawn from, None for a deterministic proposal. A proposer with
    `tree = True` proposes a tree, verified greedily: each proposal sets `parents` (node 0 is the last
    token, the proposed tokens are nodes 1..n, parents[i] < i) and `max_nodes` bounds n; otherwise the
    tokens are a chain. One with `needs_hidden = True` gets the target's last hidden state through
    `observe(hidden [H])` before each proposal."""

    def reset(self, prompt: list[int]) -> None: ...

    def propose(
        self, tokens: list[int], k: int, params: SamplingParams, generator
    ) -> tuple[list[int], torch.Tensor | None]: ...

    def accepted(self, num_valid: int) -> None: ...


@dataclass
class SpecStats:
    steps: int = 0  # target forwards after the prefill
    proposed: int = 0  # tokens proposed along the deepest path of each proposal
    accepted: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    accepted_per_step: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(1, self.proposed)

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / max(1, self.steps)

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "new_tokens": self.new_tokens,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "tokens_per_step": round(self.tokens_per_step, 3),
            "tokens_per_s": round(self.new_tokens / max(self.seconds, 1e-9), 2),
        }


def verify(
    p: torch.Tensor, q: torch.Tensor | None, drafts: list[int], generator: torch.Generator | None = None
) -> tuple[list[int], int]:
    """Rejection-sample k drafts against the target. p [k+1, V] target probabilities at each draft
    position (plus the bonus position); q [k, V] the draft's probabilities, None for a deterministic
    proposal. A token drafted with probability q(x) is accepted with probability min(1, p(x) / q(x));
    on rejection the replacement is drawn from normalize(max(p - q, 0)); when all k are accepted a
    bonus token comes from p's next position. Returns (tokens to append, number accepted)."""
    out = []
    for i, x in enumerate(drafts):
        qx = 1.0 if q is None else float(q[i, x])
        u = torch.rand((), generator=generator, device=p.device).item()
        if qx > 0 and u < min(1.0, float(p[i, x]) / qx):
            out.append(x)
            continue
        q_i = torch.zeros_like(p[i]) if q is None else q[i]
        if q is None:
            q_i[x] = 1.0
        residual = (p[i] - q_i).clamp(min=0)
        residual = residual if residual.sum() > 0 else p[i]  # p == q: any rejection is measure-zero
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out, i
    out.append(int(torch.multinomial(p[len(drafts)], 1, generator=generator)))
    return out, len(drafts)


def verify_greedy(logits: torch.Tensor, drafts: list[int]) -> tuple[list[int], int]:
    """The greedy case of `verify` (p one-hot at the argmax): accept drafts while they equal the
    target's argmax, then append the target's own token. One argmax and one sync per step."""
    fast = logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad
    best = (logits.numpy() if fast else logits).argmax(-1).tolist()  # numpy's: ~7x less overhead, same ties
    n_acc = 0
    while n_acc < len(drafts) and drafts[n_acc] == best[n_acc]:
        n_acc += 1
    return drafts[:n_acc] + [best[n_acc]], n_acc


def verify_tree(logits: torch.Tensor, tokens: list[int], parents: list[int]) -> tuple[list[int], int]:
    """Greedy verification of a tree (node 0 = the last token): the deepest node whose every
    ancestor's target argmax is the next node on its path. Returns (path of node indices from 0, the
    target's token after the path's last node)."""
    pred = logits.argmax(-1).tolist()
    ok, depth = [True] + [False] * (len(tokens) - 1), [0] * len(tokens)
    for i in range(1, len(tokens)):
        ok[i] = ok[parents[i]] and tokens[i] == pred[parents[i]]
        depth[i] = depth[parents[i]] + 1
    best = max((i for i in range(len(tokens)) if ok[i]), key=lambda i: depth[i])
    path = [best]
    while path[-1] != 0:
        path.append(parents[path[-1]])
    return path[::-1], pred[best]


def _ancestor_mask(parents: list[int], device) -> torch.Tensor:
    mask = torch.eye(len(parents), dtype=torch.bool)
    for i in range(1, len(parents)):
        mask[i] |= mask[parents[i]]
    return mask.to(device)


def _compact(cache: KVCache, start: int, path: list[int]) -> None:
    """Move the accepted nodes' keys/values (tree slots start + i) to slots start, start + 1, ..."""
    src = torch.tensor(path, device=cache.k[0].device) + start
    for buf in cache.k + cache.v:
        buf[:, :, start : start + len(path)] = buf[:, :, src]


# ----------------------------------------------------------------------------- the driver


def decode(
    model,
    params: SamplingParams,
    input_ids=None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    proposer: Proposer | None = None,
    k: int = 4,
    sinks=None,
    decode_fn=None,
    eos_token_ids: Sequence[int] = (),
    stats: SpecStats | None = None,
    return_logits: bool = False,
    tokenizer=None,
) -> Iterator:
    """Yield the next token of every row [B] per step (with `return_logits`, (token, the logits
    [B, V] it was sampled from)). `model`: a Transformer, or a model with a `language_model` (a VLM:
    its LM decodes, the embeddings carry the image). `input_ids`: a [B, T] tensor, a list of ids, or
    a list of lists (left-padded); with `inputs_embeds` [B, T, D] they are optional and only seed the
    repetition penalty and the proposers. `sinks`: a streaming.AttentionSinks cache option.
    `decode_fn` replaces the model call of the one-token step (e.g. a torch.compile'd model).
    `eos_token_ids` stop like params.stop_token_ids. `stats` (speculative) is filled as it goes.
    `tokenizer`: needed by a params.grammar (each row its own matcher; once the grammar is complete
    only the stop ids are allowed)."""
    lm = getattr(model, "language_model", model)
    stop = list(params.stop_token_ids)
    stop += [t for t in eos_token_ids if t is not None and t not in stop]
    ids, mask = _as_batch(input_ids, attention_mask, stop[0] if stop else 0)
    if inputs_embeds is not None:
        if inputs_embeds.dim() != 3:
            raise LmforgeError(f"inputs_embeds must be [batch, tokens, hidden], got {tuple(inputs_embeds.shape)}")
        if ids is not None and ids.shape != inputs_embeds.shape[:2]:
            raise LmforgeError(f"input_ids {tuple(ids.shape)} and inputs_embeds {tuple(inputs_embeds.shape)} disagree")
    elif ids is None:
        raise LmforgeError("decode needs input_ids or inputs_embeds")
    B = (ids if inputs_embeds is None else inputs_embeds).shape[0]
    modes = [
        name
        for name, on in (("speculative decoding", proposer is not None), ("attention sinks", sinks is not None))
        if on
    ]
    if modes:
        for what, bad in (
            ("a batch of prompts", B > 1 or (mask is not None and not bool(mask.all()))),
            ("a compiled decode step", decode_fn is not None),
            ("attention sinks", len(modes) > 1),
        ):
            if bad:
                raise LmforgeError(f"{modes[0]} decodes one prompt and does not support {what}")
    if proposer is not None:
        if inputs_embeds is not None:
            raise LmforgeError(
                "speculative decoding takes token ids, not inputs_embeds (the proposer needs the tokens)"
            )
        if return_logits:
            raise LmforgeError("speculative decoding does not return per-token logits")
        if params.penalised:
            raise LmforgeError(f"speculative decoding does not support {params.set_penalties[0]} (use plain decoding)")
        if k < 1:
            raise LmforgeError(f"speculative k must be >= 1, got {k}")
        if getattr(proposer, "tree", False) and not params.greedy:
            raise LmforgeError(
                "tree verification (Medusa) is greedy only (temperature 0); "
                "use a draft model or prompt lookup to sample"
            )
        if getattr(proposer, "tree", False) and params.grammar is not None:
            raise LmforgeError(
                "tree verification (Medusa) does not support a grammar; use a draft model or prompt lookup"
            )
        matcher = grammar_for(params, tokenizer, lm.config.vocab_size, stop)
        return _speculative(lm, ids[0].tolist(), params, proposer, k, stop, stats or SpecStats(), matcher)
    matchers = [grammar_for(params, tokenizer, lm.config.vocab_size, stop) for _ in range(B)]
    return _plain(lm, params, ids, mask, inputs_embeds, sinks, decode_fn, stop, return_logits, matchers)


def _as_batch(input_ids, attention_mask, pad_id: int):
    if input_ids is None or isinstance(input_ids, torch.Tensor):
        ids = input_ids if input_ids is None or input_ids.dim() == 2 else input_ids[None]
        return ids, attention_mask
    if input_ids and isinstance(input_ids[0], int):
        input_ids = [input_ids]
    return pad_prompts(input_ids, pad_id)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists -> (input_ids [B, T], attention_mask [B, T])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LmforgeError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, T - len(p) :] = 1
    return ids, mask


def _static_feeder(model, B: int, T: int, max_new: int, mask, device, decode_fn):
    """Feed tokens (or the prompt's embeddings) into a preallocated KV cache; positions come from
    the attention mask so each left-padded row decodes exactly as it would alone."""
    max_len = T + max_new
    limit = model.config.max_position_embeddings
    if model.config.position == "learned" and max_len > limit:
        raise LmforgeError(
            f"prompt ({T} tokens) + max_new_tokens ({max_new}) exceeds the model's context of {limit} positions"
        )
    positions = None
    if mask is not None:
        mask = torch.cat([mask.to(device), mask.new_ones(B, max_new, device=device)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = KVCache.for_model(model, B, max_len + _virtual_tokens(model))
    filled = 0

    def feed(tokens: torch.Tensor | None = None, embeds: torch.Tensor | None = None) -> torch.Tensor:
        nonlocal filled
        n = (tokens if embeds is None else embeds).shape[1]
        fn = decode_fn if decode_fn is not None and filled else model
        kw = {} if embeds is None else {"inputs_embeds": embeds}
        logits = fn(
            tokens,
            **kw,
            attention_mask=None if mask is None else mask[:, : filled + n],
            position_ids=None if positions is None else positions[:, filled : filled + n],
            kv_cache=cache,
            start_pos=filled,
            logits_to_keep=1,
        )[:, -1]
        filled += n
        return logits

    return feed, (None if mask is None else mask[:, :T])


@torch.inference_mode()  # the cache is made here: an inference tensor updates without version counting
def _plain(
    model, params: SamplingParams, ids, mask, embeds, sinks, decode_fn, stop: list[int], return_logits: bool, matchers
) -> Iterator:
    device = next(model.parameters()).device
    ids = None if ids is None else ids.to(device)
    B, T = (ids if embeds is None else embeds).shape[:2]
    if sinks is not None:
        feed, prompt_mask = sinks.feeder(model, device), None
    else:
        feed, prompt_mask = _static_feeder(model, B, T, params.max_new_tokens, mask, device, decode_fn)
    return _plain_steps(model, params, ids, embeds, feed, prompt_mask, stop, return_logits, device, matchers)


@torch.inference_mode()
def _plain_steps(model, params, ids, embeds, feed, prompt_mask, stop_ids, return_logits, device, matchers) -> Iterator:
    if params.max_new_tokens == 0:
        return
    B = (ids if embeds is None else embeds).shape[0]
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    seen = None
    if params.repetition_penalty != 1.0:  # the prompt's tokens count too, as in the engine
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        if ids is not None:
            seen.scatter_(1, ids, True if prompt_mask is None else prompt_mask.bool())
    counts = None  # presence/frequency penalties: how often each row generated each token
    if params.presence_penalty or params.frequency_penalty:
        counts = torch.zeros(B, model.config.vocab_size, dtype=torch.long, device=device)
    grammar = matchers[0] is not None
    stop = torch.tensor(stop_ids, device=device, dtype=torch.long)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    logits = feed(ids if embeds is None else None, embeds)
    for i in range(params.max_new_tokens):
        allowed = grammar_masks(matchers, [stop_ids] * B, logits.shape[-1]).to(device) if grammar else None
        token = sample(logits.float(), params, generator, seen, counts, allowed)
        if len(stop):
            token = torch.where(finished, stop[0], token)
        if grammar:  # rows still going move their grammar past the token (a stop ends the row)
            for m, t, done in zip(matchers, token.tolist(), finished.tolist()):
                if not done and t not in stop_ids:
                    m.advance(t)
        if len(stop):
            finished |= torch.isin(token, stop)
        yield (token, logits) if return_logits else token
        if seen is not None:
            seen[torch.arange(B, device=device), token] = True
        if counts is not None:
            counts[torch.arange(B, device=device), token] += 1
        if bool(finished.all()) or i == params.max_new_tokens - 1:
            return
        logits = feed(token[:, None])


def _virtual_tokens(model) -> int:
    """KV-cache slots taken by prompt-tuning virtual tokens (0 without lmforge.peft adapters)."""
    from lmforge.model import transforms

    if not transforms(model, "peft"):
        return 0
    from lmforge.peft import virtual_tokens

    return virtual_tokens(model)


@torch.inference_mode()
def _speculative(
    target,
    prompt: list[int],
    params: SamplingParams,
    proposer: Proposer,
    k: int,
    stop_ids: list[int],
    stats: SpecStats,
    matcher=None,
) -> Iterator[torch.Tensor]:
    device = next(target.parameters()).device
    generator = torch.Generator(device=device).manual_seed(params.seed if params.seed is not None else 0)
    stop = set(stop_ids)
    tokens = list(prompt)
    hidden, tree = getattr(proposer, "needs_hidden", False), getattr(proposer, "tree", False)
    cache = KVCache.for_model(target, 1, len(tokens) + params.max_new_tokens + getattr(proposer, "max_nodes", k) + 1)
    proposer.reset(tokens)
    start = time.perf_counter()
    n_out = 0

    def emit(new: list[int]) -> Iterator[torch.Tensor]:
        nonlocal n_out
        for t in new:
            n_out += 1
            tokens.append(t)
            if matcher is not None and t not in stop:
                matcher.advance(t)
            stats.new_tokens, stats.seconds = n_out, time.perf_counter() - start
            yield torch.tensor([t])
            if t in stop or n_out >= params.max_new_tokens:
                return

    if params.max_new_tokens == 0:
        return
    # Prefill all but the last prompt token: every step then feeds [last token, proposal...]. A
    # proposer that reads the target's hidden state (Medusa) needs the last one's: prefill it all
    # and take the first token from the prefill.
    if hidden:
        logits, h = target(
            torch.tensor([tokens], device=device), kv_cache=cache, start_pos=0, logits_to_keep=1, return_hidden=True
        )
        proposer.observe(h[0, -1])
        allowed = None if matcher is None else grammar_masks([matcher], [stop_ids], logits.shape[-1]).to(device)
        first = int(sample(logits[:, -1].float(), params, generator, allowed=allowed)[0])
        yield from emit([first])
        if first in stop or n_out >= params.max_new_tokens:
            return
    elif len(tokens) > 1:
        target(torch.tensor([tokens[:-1]], device=device), kv_cache=cache, start_pos=0, logits_to_keep=1)
    while True:
        want = min(k, params.max_new_tokens - n_out - 1)
        drafts, q = proposer.propose(tokens, want, params, generator) if want > 0 else ([], None)
        parents = proposer.parents if tree and drafts else None
        L = len(tokens)
        ids = torch.tensor([[tokens[-1]] + drafts], device=device)
        kw = {}
        if parents is not None:  # a tree: each node sees the context and its own ancestors
            tree_mask = _ancestor_mask(parents, device)
            depth = tree_mask.sum(-1) - 1
            kw = {
                "position_ids": (L - 1 + depth)[None],
                "attn_mask": torch.cat(
                    [torch.ones(len(parents), L - 1, dtype=torch.bool, device=device), tree_mask], dim=1
                )[None, None],
            }
        out = target(ids, kv_cache=cache, start_pos=L - 1, return_hidden=hidden, **kw)
        logits, h = out if hidden else (out, None)
        logits = adjust_logits(logits[0], params)  # [len(drafts) + 1, V], with the logit_bias
        if matcher is not None:  # each position's grammar mask: a draft the grammar rejects has p = 0
            logits = mask_logits(logits, draft_masks(matcher, drafts, stop_ids, logits.shape[-1]))
        if parents is not None:
            path, bonus = verify_tree(logits, [tokens[-1]] + drafts, parents)
            _compact(cache, L - 1, path)
            new, n_acc, depth_proposed = [drafts[i - 1] for i in path[1:]] + [bonus], len(path) - 1, int(depth.max())
            last = path[-1]
        elif params.greedy:
            new, n_acc = verify_greedy(logits, drafts)
            depth_proposed, last = len(drafts), n_acc
        else:
            new, n_acc = verify(probabilities(logits.float(), params), q, drafts, generator)
            depth_proposed, last = len(drafts), n_acc
        proposer.accepted(L + n_acc)
        if h is not None:
            proposer.observe(h[0, last])
        stats.steps += 1
        stats.proposed += depth_proposed
        stats.accepted += n_acc
        stats.accepted_per_step.append(n_acc)
        yield from emit(new)
        if tokens[-1] in stop or n_out >= params.max_new_tokens:
            return


def decode_ids(model, params: SamplingParams, input_ids=None, **options) -> list[list[int]]:
    """Every row's new token ids, each cut after its first stop id (`decode`'s arguments)."""
    rows: list[list[int]] | None = None
    done: list[bool] = []
    stop = set(params.stop_token_ids) | set(options.get("eos_token_ids", ())) - {None}
    for token in decode(model, params, input_ids, **options):
        if rows is None:
            rows, done = [[] for _ in range(len(token))], [False] * len(token)
        for b, t in enumerate(token.tolist()):
            if not done[b]:
                rows[b].append(t)
                done[b] = t in stop
    if rows is None:  # max_new_tokens == 0
        embeds = options.get("inputs_embeds")
        n = embeds.shape[0] if embeds is not None else _as_batch(input_ids, None, 0)[0].shape[0]
        rows = [[] for _ in range(n)]
    return rows
