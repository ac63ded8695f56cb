"""Speculative decoding for one sequence: a cheap proposer guesses k tokens, the target checks them
all in one forward pass [1, k + 1], and rejection sampling (Leviathan et al. 2023; Chen et al. 2023)
keeps the output distributed exactly as the target's own sampling (greedy: identical tokens).

Proposers:
  DraftProposer(draft_model)  a smaller model with the same tokenizer; proposes by sampling its own
                              distribution q (same temperature/top-k/top-p as the request)
  LookupProposer(max_ngram)   prompt lookup: find the latest earlier occurrence of the last n tokens
                              and propose what followed it (deterministic, no model; good when the
                              output copies from the input, e.g. edits and extraction)

A token x drafted with probability q(x) is accepted with probability min(1, p(x) / q(x)); on
rejection the replacement is drawn from normalize(max(p - q, 0)); when all k are accepted a bonus
token comes from p's next position. A deterministic proposal is q = one-hot(x).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from lmforge.common import LmforgeError
from lmforge.model import KVCache

from .sampling import SamplingParams, probabilities


@dataclass
class SpecStats:
    steps: int = 0  # target forwards after the prefill
    proposed: int = 0
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
        return dict(steps=self.steps, proposed=self.proposed, accepted=self.accepted, new_tokens=self.new_tokens,
                    acceptance_rate=round(self.acceptance_rate, 4), tokens_per_step=round(self.tokens_per_step, 3),
                    tokens_per_s=round(self.new_tokens / max(self.seconds, 1e-9), 2))


def verify(p: torch.Tensor, q: torch.Tensor | None, drafts: list[int],
           generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Rejection-sample k drafts against the target. p [k+1, V] target probabilities at each draft
    position (plus the bonus position); q [k, V] the draft's probabilities, None for a deterministic
    proposal. Returns (tokens to append: the accepted drafts plus one more, number accepted)."""
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
    best = logits.argmax(-1).tolist()
    n_acc = 0
    while n_acc < len(drafts) and drafts[n_acc] == best[n_acc]:
        n_acc += 1
    return drafts[:n_acc] + [best[n_acc]], n_acc


class NgramIndex:
    """The latest earlier start of every n-gram (n = 1..max_ngram) of a growing token list, updated
    as tokens come: a lookup costs a few dict probes, not a scan of the whole sequence per step (a
    scan per row made prompt lookup slower than plain decoding on long or non-repeating text)."""

    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram
        self.seen: list[int] = []  # the tokens indexed so far
        self.latest: list[dict] = [{} for _ in range(max_ngram + 1)]  # [n] n-gram -> its latest start

    def update(self, tokens: list[int]) -> None:
        n_seen = len(self.seen)
        if len(tokens) < n_seen or tokens[:n_seen] != self.seen:  # not a continuation: start over
            self.__init__(self.max_ngram)
            n_seen = 0
        self.seen += tokens[n_seen:]
        L = len(tokens)
        for n in range(1, self.max_ngram + 1):
            # Starts up to L - n - 1: an n-gram followed by at least one token (the tail's own is not).
            for start in range(max(0, n_seen - n), L - n):
                self.latest[n][tuple(tokens[start:start + n])] = start

    def follow(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching tail."""
        self.update(tokens)
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            start = self.latest[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start + n:start + n + k]
        return []


class LookupProposer:
    """Prompt-lookup drafting: match the longest recent n-gram (max_ngram down to 1) earlier in the
    sequence and propose the k tokens that followed it."""

    def __init__(self, max_ngram: int = 3):
        self.index = NgramIndex(max_ngram)

    def reset(self, prompt: list[int]) -> None:
        self.index = NgramIndex(self.index.max_ngram)

    def propose(self, tokens: list[int], k: int, params: SamplingParams, generator) -> tuple[list[int], None]:
        return self.index.follow(tokens, k), None

    def accepted(self, num_valid: int) -> None:
        pass


class DraftProposer:
    """A small draft model with its own static KV cache, rolled back after each verification.

    min_confidence > 0 stops drafting early when the draft's probability of its own next token falls
    below it (after at least one token): unsure guesses are mostly rejected, and each costs a draft
    forward plus a verified position. With it, k is an upper bound rather than a fixed length."""

    def __init__(self, draft, max_len: int, min_confidence: float = 0.0):
        self.draft, self.max_len, self.min_confidence = draft.eval(), max_len, min_confidence
        self.cache: KVCache | None = None
        self.valid = 0  # tokens whose keys/values in the draft cache are right

    def reset(self, prompt: list[int]) -> None:
        self.cache = KVCache.for_model(self.draft, 1, self.max_len)
        self.valid = 0

    def propose(self, tokens: list[int], k: int, params: SamplingParams, generator) -> tuple[list[int], torch.Tensor]:
        device = next(self.draft.parameters()).device
        pending = tokens[self.valid:]
        drafts, qs = [], []
        for _ in range(k):
            ids = torch.tensor([pending], device=device)
            logits = self.draft(ids, kv_cache=self.cache, start_pos=self.valid, logits_to_keep=1)[0, -1]
            self.valid += len(pending)
            if params.greedy:  # deterministic proposal: no distribution needed (q = one-hot)
                x = int(logits.argmax())
                confidence = float(logits.float().softmax(-1)[x]) if self.min_confidence > 0 else 1.0
            else:
                q = probabilities(logits.float()[None], params)[0]
                x = int(torch.multinomial(q, 1, generator=generator))
                confidence = float(q[x])
            if drafts and confidence < self.min_confidence:
                break  # the cache holds what was fed; this token is simply not proposed
            if not params.greedy:
                qs.append(q)
            drafts.append(x)
            pending = [x]
        return drafts, (torch.stack(qs) if qs else None)

    def accepted(self, num_valid: int) -> None:
        """num_valid: length of the sequence prefix that is still correct (the cache beyond is stale)."""
        self.valid = min(self.valid, num_valid)


@torch.inference_mode()
def speculative_generate(target, prompt_ids: list[int], params: SamplingParams, proposer, k: int = 4,
                         eos_token_ids: list[int] | None = None) -> tuple[list[int], SpecStats]:
    """New token ids for one prompt, and the acceptance statistics."""
    if params.repetition_penalty != 1.0:
        raise LmforgeError("speculative decoding does not support repetition_penalty (use plain decoding)")
    if k < 1:
        raise LmforgeError(f"speculative k must be >= 1, got {k}")
    device = next(target.parameters()).device
    generator = torch.Generator(device=device).manual_seed(params.seed if params.seed is not None else 0)
    stop = set(params.stop_token_ids) | set(eos_token_ids or [])
    tokens = list(prompt_ids)
    max_len = len(tokens) + params.max_new_tokens + k + 1
    cache = KVCache.for_model(target, 1, max_len)
    proposer.reset(tokens)
    stats, start = SpecStats(), time.perf_counter()
    # Prefill all but the last prompt token: every step then feeds [last token, drafts...].
    if len(tokens) > 1:
        target(torch.tensor([tokens[:-1]], device=device), kv_cache=cache, start_pos=0, logits_to_keep=1)
    out: list[int] = []
    while len(out) < params.max_new_tokens:
        want = min(k, params.max_new_tokens - len(out) - 1)
        drafts, q = proposer.propose(tokens, want, params, generator) if want > 0 else ([], None)
        L = len(tokens)
        ids = torch.tensor([[tokens[-1]] + drafts], device=device)
        logits = target(ids, kv_cache=cache, start_pos=L - 1)[0]  # [len(drafts) + 1, V]
        if params.greedy:
            new, n_acc = verify_greedy(logits, drafts)
        else:
            new, n_acc = verify(probabilities(logits.float(), params), q, drafts, generator)
        proposer.accepted(L + n_acc)
        stats.steps += 1
        stats.proposed += len(drafts)
        stats.accepted += n_acc
        stats.accepted_per_step.append(n_acc)
        for t in new:
            out.append(t)
            tokens.append(t)
            if t in stop or len(out) >= params.max_new_tokens:
                stats.new_tokens, stats.seconds = len(out), time.perf_counter() - start
                return out, stats
    stats.new_tokens, stats.seconds = len(out), time.perf_counter() - start
    return out, stats
