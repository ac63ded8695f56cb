"""Speculative decoding inside the continuous-batching engine: a drafter proposes up to k tokens
for every running sequence, the target checks all of them in the engine's one decode forward, and
`decode.verify` (exact rejection sampling; greedy gives the same tokens as plain decoding)
decides what is kept. Drafters: `DraftModel` (a small model with the same vocabulary, batched
across sequences) and `PromptLookup` (n-gram matches in the sequence itself, no model).

The draft keeps its keys/values in its own paged cache indexed by the same block ids as the
target's, so block tables, prefix sharing, swapping and freeing cover both models at once. A
sequence's `num_draft_computed` says how far the draft cache is right: it lags the target by
one token when every draft was accepted (the last draft never went through the draft), and the
next proposal starts by feeding the draft whatever it has not seen.
"""

from __future__ import annotations

import weakref

import torch

from lmforge.common import LmforgeError

from .decode import verify, verify_greedy
from .grammar import grammar_masks, mask_logits
from .paged import PagedKVCache, forward_packed, forward_padded
from .sampling import adjust_logits, probabilities
from .scheduler import Sequence
from .speculative import NgramIndex


class Drafter:
    """What the engine asks of a drafter; `cache` is its paged KV cache (None: it needs none)."""

    cache: PagedKVCache | None = None
    max_len = 1 << 62  # positions it can handle

    def __init__(self, k: int):
        if k < 1:
            raise LmforgeError(f"num_speculative must be >= 1, got {k}")
        self.k = k

    def num_drafts(self, seq: Sequence, max_model_len: int) -> int:
        """Drafts worth proposing: none past max_new_tokens or the context; none with a repetition,
        presence or frequency penalty (verification would need the penalty at every drafted position)."""
        if seq.params.penalised:
            return 0
        left = seq.params.max_new_tokens - len(seq.output) - 1  # the verify step always adds one token
        return max(0, min(self.k, left, max_model_len - len(seq.tokens)))

    def prefill(self, seqs: list[Sequence], upto: list[int]) -> None:
        for seq, end in zip(seqs, upto):
            seq.num_draft_computed = max(seq.num_draft_computed, end)

    def valid_after(self, seq: Sequence, length: int, num_drafts: int) -> int:
        """num_draft_computed after a verification step (length: the sequence before it)."""
        return seq.num_computed

    @staticmethod
    def verify(
        seq: Sequence, logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, generator: torch.Generator
    ) -> tuple[list[int], int]:
        """(tokens to append, drafts accepted) from the target's logits at [last, d1..dk] [k+1, V]."""
        if seq.params.greedy:
            return verify_greedy(logits, drafts)
        return verify(probabilities(logits, seq.params), q, drafts, generator)


class PromptLookup(Drafter):
    """Drafts copied from the sequence itself: what followed the latest earlier occurrence of its
    last n tokens (a deterministic proposal, so verification stays exact when sampling)."""

    def __init__(self, k: int, max_ngram: int = 3):
        super().__init__(k)
        self.max_ngram = max_ngram
        self.indexes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Sequence -> its NgramIndex

    def propose(
        self, seqs: list[Sequence], ks: list[int], generators: list[torch.Generator]
    ) -> tuple[list[list[int]], list[None]]:
        drafts = []
        for seq, k in zip(seqs, ks):
            index = self.indexes.get(seq)
            if index is None:
                index = self.indexes[seq] = NgramIndex(self.max_ngram)
            d = index.follow(seq.tokens, k) if k else []
            if seq.matcher is not None:  # what the grammar cannot continue with would only be rejected
                d = d[: seq.matcher.valid_prefix(d)]
            drafts.append(d)
        return drafts, [None] * len(seqs)


class DraftModel(Drafter):
    def __init__(self, draft, k: int, target_config, num_blocks: int, block_size: int):
        super().__init__(k)
        if draft.config.vocab_size != target_config.vocab_size:
            raise LmforgeError(
                f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                f"({target_config.vocab_size}): the draft needs the same tokenizer"
            )
        self.draft = draft.eval()
        p = next(draft.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        self.cache = PagedKVCache(draft.config, num_blocks, block_size, p.device, dtype)
        self.max_len = draft.config.max_position_embeddings

    def valid_after(self, seq: Sequence, length: int, num_drafts: int) -> int:
        if not num_drafts:  # the draft did not run: it lags until the next proposal catches it up
            return seq.num_draft_computed
        return min(length + num_drafts - 1, seq.num_computed)  # it never saw its own last draft

    def prefill(self, seqs: list[Sequence], upto: list[int]) -> None:
        """Run the draft over each sequence's tokens it has not seen, up to `upto` (a prefill chunk)."""
        rows = [
            (seq.tokens[seq.num_draft_computed : end], seq.num_draft_computed, seq.blocks)
            for seq, end in zip(seqs, upto)
            if end > seq.num_draft_computed
        ]
        if rows:
            forward_packed(self.draft, self.cache, rows)
        super().prefill(seqs, upto)

    def propose(
        self, seqs: list[Sequence], ks: list[int], generators: list[torch.Generator]
    ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Up to ks[i] drafted tokens per sequence, and the draft's distributions q [ks[i], V] they
        were sampled from (None for greedy requests: a deterministic proposal). A request's logit_bias
        and grammar shape the draft's distribution too (the grammar walks along the drafts and is
        rolled back after), so its drafts are ones the target can accept."""
        drafts: list[list[int]] = [[] for _ in seqs]
        walked = {i: 0 for i, seq in enumerate(seqs) if seq.matcher is not None}  # drafts each grammar took
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        # Round 0 feeds what the draft has not seen (one token, or two after a fully accepted step).
        pending = {i: (seq.tokens[seq.num_draft_computed :], seq.num_draft_computed) for i, seq in enumerate(seqs)}
        for r in range(max(ks, default=0)):
            idx = [i for i, k in enumerate(ks) if k > r]
            rows = [(*pending[i], seqs[i].blocks) for i in idx]
            logits = forward_padded(self.draft, self.cache, rows)[:, -1]
            logits = _shape(logits, [seqs[i] for i in idx], walked, idx, r)
            argmax = logits.argmax(-1).tolist()
            for j, i in enumerate(idx):
                params = seqs[i].params
                if params.greedy:
                    x = argmax[j]
                else:
                    q = probabilities(logits[j : j + 1], params)[0]
                    x = int(torch.multinomial(q, 1, generator=generators[i]))
                    qs[i].append(q)
                drafts[i].append(x)
                pending[i] = ([x], len(seqs[i].tokens) + r)
                if walked.get(i) == r and x != seqs[i].matcher.compiled.eos:  # still on the grammar's path
                    seqs[i].matcher.advance(x)
                    walked[i] += 1
        for i, n in walked.items():
            seqs[i].matcher.rollback(n)
        return drafts, [torch.stack(q) if q else None for q in qs]


def _shape(logits: torch.Tensor, seqs: list[Sequence], walked: dict[int, int], idx: list[int], r: int) -> torch.Tensor:
    """The draft's logits [B, V] for round r with each request's logit_bias and, where its grammar
    has followed all r drafts so far, the grammar's mask (its own end-of-sequence token standing for
    the request's stop ids: a draft of it is rejected at worst)."""
    if not any(s.params.logit_bias or s.matcher is not None for s in seqs):
        return logits
    logits = logits.float().clone()
    for j, seq in enumerate(seqs):
        if seq.params.logit_bias:
            logits[j : j + 1] = adjust_logits(logits[j : j + 1], seq.params)
    rows = [j for j, i in enumerate(idx) if walked.get(i) == r]
    if rows:
        matchers = [seqs[j].matcher for j in rows]
        allowed = grammar_masks(matchers, [[m.compiled.eos] for m in matchers], logits.shape[-1])
        logits[rows] = mask_logits(logits[rows], allowed)
    return logits
