"""Continuous-batching scheduler: which sequences run this step, and with how many new tokens.

Every step: running sequences first (oldest first; a decode costs 1 token of the budget, an
unfinished prefill takes a chunk of what is left: chunked prefill), then swapped-out sequences
come back, then waiting requests are admitted while the token budget, the sequence cap and the
block pool allow. With a draft model, a decode reserves room for `lookahead` drafted tokens too.
`max_prefill_tokens` caps the prompt tokens of a step in which sequences are decoding, so that a
wave of newcomers is prefilled over several steps instead of stalling every running stream for one
long step.
When a running sequence needs a block and none is free, the newest running
sequence is preempted: its blocks are copied to CPU memory (KV offload, swapped back in later) or,
when the swap space is full or preemption="recompute", dropped and recomputed from its tokens.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from .paged import BlockPool, PagedKVCache, block_hashes
from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    adapter: str | None = None
    logprobs: int | None = None  # None: off; n: the chosen token's logprob plus the top n
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the cache
    num_registered: int = 0  # full blocks entered in the prefix table
    num_draft_computed: int = 0  # tokens whose draft-model keys/values are in the draft cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: str | None = None  # why it failed, when finish_reason is "error"
    swapped: list | None = None  # per-layer (k, v) on CPU while swapped out
    generator: torch.Generator | None = None
    token_logprobs: list = field(default_factory=list)
    prompt_logprobs: int | None = None  # None: off; n: every prompt token's logprob plus the top n (echo)
    prompt_token_logprobs: list = field(default_factory=lambda: [None])  # the first prompt token has none
    spec_steps: int = 0  # speculative decoding: verification forwards, tokens drafted, drafts accepted
    drafted: int = 0
    accepted: int = 0
    matcher: Any = None  # grammar.GrammarMatcher when the request has a grammar (its state lives with the sequence)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache when first admitted (usage reports them)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model (the prompt, or the last sampled token)."""
        return len(self.prompt) + len(self.output) - self.num_computed


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        cache: PagedKVCache,
        max_seqs: int,
        max_batch_tokens: int,
        prefix_caching: bool = True,
        preemption: str = "swap",
        swap_blocks: int | None = None,
        lookahead: int = 0,
        max_prefill_tokens: int | None = None,
    ):
        if preemption not in ("swap", "recompute"):
            raise ValueError(f"preemption must be 'swap' or 'recompute', got {preemption!r}")
        self.pool, self.cache = pool, cache
        self.max_seqs, self.max_batch_tokens = max_seqs, max_batch_tokens
        self.prefix_caching, self.preemption, self.lookahead = prefix_caching, preemption, lookahead
        self.max_prefill_tokens = max_prefill_tokens
        self._prefill_left = max_batch_tokens  # prompt tokens this step may still take
        self.swap_blocks = pool.num_blocks if swap_blocks is None else swap_blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self.counters = dict(
            prefix_hit_blocks=0,
            prefix_hit_tokens=0,
            prefix_query_tokens=0,  # prompt tokens looked up in the prefix cache (hit or not)
            preemptions=0,
            swaps_out=0,
            swaps_in=0,
            recomputes=0,
        )

    @property
    def swap_used(self) -> int:
        return sum(len(s.swapped[0][0]) // self.pool.block_size for s in self.swapped)

    # ------------------------------------------------------------------ scheduling

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The sequences to run this step with their number of new tokens."""
        budget, batch, preempted = self.max_batch_tokens, [], False
        decoding = self.max_prefill_tokens and any(s.num_pending == 1 for s in self.running)
        self._prefill_left = self.max_prefill_tokens if decoding else budget
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            n, cost = self._plan(seq, budget)
            if n == 0:  # a prompt chunk past this step's prefill cap
                continue
            while not self._reserve(seq, seq.num_computed + cost):
                preempted = True
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                batch.append((seq, n))
                budget = max(0, budget - cost)
        if not preempted:
            budget = self._swap_in(batch, budget)
            self._admit(batch, budget)
        return batch

    def _swap_in(self, batch: list, budget: int) -> int:
        while self.swapped and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.swapped[0]
            need = len(seq.swapped[0][0]) // self.pool.block_size
            if self.pool.num_free < need + 1:
                break
            self.swapped.popleft()
            seq.blocks = [self.pool.allocate() for _ in range(need)]
            self.cache.write_blocks(seq.blocks, seq.swapped)
            seq.swapped, seq.status = None, Status.RUNNING
            self.counters["swaps_in"] += 1
            self.running.append(seq)
            n, cost = self._plan(seq, budget)
            if n and self._reserve(seq, seq.num_computed + cost):
                batch.append((seq, n))
                budget = max(0, budget - cost)
        return budget

    def _admit(self, batch: list, budget: int) -> None:
        while self.waiting and budget > 0 and self._prefill_left > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            if not seq.blocks and self.prefix_caching and seq.prompt_logprobs is None:  # a hit skips logits
                self._prefix_lookup(seq)
            n, cost = self._plan(seq, budget)
            if not self._reserve(seq, seq.num_computed + cost):
                self._release(seq)  # retry from scratch when blocks free up
                break
            self.waiting.popleft()
            self.counters["prefix_hit_blocks"] += seq.num_registered if seq.num_computed else 0
            self.counters["prefix_hit_tokens"] += seq.num_computed
            if self.prefix_caching and seq.prompt_logprobs is None:  # it was looked up
                self.counters["prefix_query_tokens"] += len(seq.tokens)
            if not seq.output:  # a first admission (not a preempted sequence's recompute)
                seq.cached_tokens = seq.num_computed
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget = max(0, budget - cost)

    def _plan(self, seq: Sequence, budget: int) -> tuple[int, int]:
        """(new tokens to run, tokens of budget and cache to set aside): a decode with a draft model
        also verifies up to `lookahead` drafted tokens."""
        if seq.num_pending == 1:
            return min(1, budget), 1 + self.lookahead
        n = min(seq.num_pending, budget, self._prefill_left)
        self._prefill_left -= n
        return n, n

    # ------------------------------------------------------------------ blocks

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Make sure seq has blocks for its first num_tokens tokens."""
        need = -(-num_tokens // self.pool.block_size) - len(seq.blocks)
        for _ in range(need):
            block = self.pool.allocate()
            if block is None:
                return False
            seq.blocks.append(block)
        return True

    def _prefix_lookup(self, seq: Sequence) -> None:
        """Reuse cached blocks for the longest cached prefix, always leaving >= 1 token to compute
        (its logits give the first new token)."""
        tokens = seq.tokens
        usable = (len(tokens) - 1) // self.pool.block_size
        for h in block_hashes(tokens[: usable * self.pool.block_size], self.pool.block_size, seq.adapter):
            block = self.pool.lookup(h)
            if block is None:
                break
            seq.blocks.append(block)
        seq.num_registered = len(seq.blocks)
        seq.num_computed = seq.num_draft_computed = len(seq.blocks) * self.pool.block_size

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a forward: enter newly filled blocks in the prefix table."""
        # With a draft model a shared block must hold the draft's keys too (a later hit skips both).
        done = min(seq.num_computed, seq.num_draft_computed) if self.lookahead else seq.num_computed
        full = done // self.pool.block_size
        if not self.prefix_caching or full <= seq.num_registered:
            return
        hashes = block_hashes(seq.tokens[: full * self.pool.block_size], self.pool.block_size, seq.adapter)
        for i in range(seq.num_registered, full):
            self.pool.register(seq.blocks[i], hashes[i])
        seq.num_registered = full

    def _release(self, seq: Sequence) -> None:
        for block in seq.blocks:
            self.pool.release(block)
        seq.blocks, seq.num_computed, seq.num_registered, seq.num_draft_computed = [], 0, 0, 0

    def trim(self, seq: Sequence) -> None:
        """Give back blocks past the sequence's tokens (reserved for drafts that were rejected)."""
        keep = -(-len(seq.tokens) // self.pool.block_size)
        while len(seq.blocks) > keep:
            self.pool.release(seq.blocks.pop())

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.counters["preemptions"] += 1
        if self.preemption == "swap" and self.swap_used + len(seq.blocks) <= self.swap_blocks:
            seq.swapped = self.cache.read_blocks(seq.blocks)
            computed = seq.num_computed, seq.num_draft_computed
            self._release(seq)
            seq.num_computed, seq.num_draft_computed = computed  # their keys come back with the blocks
            seq.status = Status.SWAPPED
            self.swapped.append(seq)
            self.counters["swaps_out"] += 1
        else:
            self._release(seq)
            seq.status = Status.WAITING
            self.waiting.appendleft(seq)  # first in line again: it was admitted before the others
            self.counters["recomputes"] += 1

    def finish(self, seq: Sequence, reason: str | None) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status is Status.SWAPPED:
            self.swapped.remove(seq)
        self._release(seq)
        seq.swapped, seq.status, seq.finish_reason = None, Status.FINISHED, reason
