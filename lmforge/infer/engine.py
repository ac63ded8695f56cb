"""The serving engine: many requests share one model through a paged KV cache and continuous batching.

    engine = Engine(model, tokenizer)
    rid = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=64))
    while engine.has_unfinished():
        for event in engine.step():   # Event(request_id, new_token_ids, finished, finish_reason,
            ...                       #       logprobs, prompt_logprobs)

Each `step()` asks the scheduler for a batch, runs it through the model (decode rows [B, 1]; prefill
chunks packed into one row [1, sum T] with a block-diagonal causal mask, so nothing is padded),
samples one token for every sequence whose pending tokens are all computed, and reports what
happened. Explicit [B, 1, T, S] masks plus position ids make each sequence see only its own
context: it decodes the same alone or among others. (Rows with different LoRA adapters cannot
share a packed row; they run as left-padded rows [B, T], so each row's last column is its last token.)

With `draft=model` (or `lookup=True`: prompt-lookup drafts, no model), every decode is
speculative (engine_spec.py): the drafter proposes up to `num_speculative` tokens per running
sequence, batched; the target scores each row's
[last, d1..dk] in one forward and exact rejection sampling keeps a prefix plus one token (greedy:
the same tokens as plain decoding); blocks reserved for rejected drafts go back to the pool.

A failing row fails alone: when a forward over several rows raises, each row runs again by itself
(a forward only writes its rows' own KV slots, so a rerun is harmless) and only the row that still
raises ends, with finish_reason "error" and the message in Event.error; a row whose sampling raises
(a distribution without a finite logit) ends the same way. The other rows of the step go on.

Threads: `step()` holds a lock for the whole forward. `add_request`/`cancel`/`release` never wait for
it: they queue their change, which is applied at once when no step is running and otherwise at the
start of the next step, in the order queued. So a server thread may add/cancel while another steps.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import threading
import weakref
from collections.abc import Sequence as Seq

import torch

from lmforge.common import LmforgeError, get_logger

from .engine_rows import EngineRows, Event
from .engine_spec import DraftModel, PromptLookup
from .grammar import grammar_for
from .logprobs import logprob_entries
from .paged import BlockPool, CacheGroup, PagedKVCache, forward_packed, forward_padded
from .sampling import SamplingParams
from .scheduler import Scheduler, Sequence, Status

__all__ = ["Engine", "Event", "SamplingParams"]

log = get_logger(__name__)


class Engine(EngineRows):
    # Every model forward goes through these (engine_tp.TPEngine sends each one to its other ranks first).
    forward_packed = staticmethod(forward_packed)
    forward_padded = staticmethod(forward_padded)

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        max_batch_tokens: int = 2048,
        max_seqs: int = 64,
        block_size: int = 16,
        num_blocks: int | None = None,
        prefix_caching: bool = True,
        preemption: str = "swap",
        swap_blocks: int | None = None,
        max_model_len: int | None = None,
        kv_memory: int = 256 << 20,
        seed: int = 0,
        draft=None,
        lookup: bool = False,
        num_speculative: int = 4,
        max_prefill_tokens: int | None = None,
    ):
        """max_batch_tokens: new tokens per step (prefill chunks + decodes); max_seqs: running sequences;
        num_blocks: KV pool size in blocks (default: sized from max_seqs within kv_memory bytes);
        preemption: "swap" (KV offload to CPU, recompute when swap_blocks is full) or "recompute";
        draft: a smaller model with the same vocabulary proposing `num_speculative` tokens per decode;
        lookup: propose them by prompt lookup instead (n-gram matches in the sequence, no model);
        max_prefill_tokens: prompt tokens per step while sequences are decoding (None: max_batch_tokens)."""
        self.model, self.tokenizer = model.eval(), tokenizer
        c = model.config
        p = next(model.parameters())
        self.device = p.device
        dtype = p.dtype if p.is_floating_point() else torch.float32
        self.max_model_len = min(max_model_len or c.max_position_embeddings, c.max_position_embeddings)
        kv = getattr(model, "tp_local_config", c)  # a tensor-parallel shard caches its own heads only
        if num_blocks is None:  # max_seqs sequences of a quarter context each, within kv_memory; >= 2 full ones
            per_seq = -(-self.max_model_len // block_size)
            itemsize = torch.finfo(dtype).bits // 8
            block_bytes = 2 * c.num_hidden_layers * block_size * kv.num_key_value_heads * c.head_dim * itemsize
            num_blocks = max(2 * per_seq, min(max_seqs * per_seq // 4, kv_memory // block_bytes)) + 1
        self.block_size = block_size
        if draft is not None and lookup:
            raise LmforgeError("choose one drafter: a draft model or prompt lookup, not both")
        self.spec = (
            DraftModel(draft, num_speculative, c, num_blocks, block_size)
            if draft is not None
            else PromptLookup(num_speculative)
            if lookup
            else None
        )
        lookahead = 0 if self.spec is None else self.spec.k
        # One sequence (plus its drafts) must always fit.
        self.max_model_len = min(self.max_model_len, (num_blocks - 1) * block_size - lookahead)
        if self.spec is not None:
            self.max_model_len = min(self.max_model_len, self.spec.max_len)
        self.pool = BlockPool(num_blocks, block_size)
        self.cache = PagedKVCache(kv, num_blocks, block_size, self.device, dtype)
        caches = self.cache if self.spec is None or self.spec.cache is None else CacheGroup(self.cache, self.spec.cache)
        self.scheduler = Scheduler(
            self.pool,
            caches,
            max_seqs,
            max_batch_tokens,
            prefix_caching,
            preemption,
            swap_blocks,
            lookahead,
            max_prefill_tokens,
        )
        self.requests: dict[int, Sequence] = {}
        self._ids = itertools.count()  # next() on a count is atomic: no lock needed
        self._lock = threading.RLock()  # held by step() for a whole forward
        self._ops: collections.deque = collections.deque()  # changes queued while a step runs
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._finished_early: list[Event] = []
        self._texts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Sequence -> TextStream (stop strings)
        eos = getattr(tokenizer, "eos_id", None)
        self.eos = [eos] if eos is not None else []
        self.counters = dict(steps=0, generated_tokens=0, prompt_tokens=0, drafted_tokens=0, accepted_tokens=0)

    # ------------------------------------------------------------------ public API

    def add_request(
        self,
        prompt_ids: Seq[int],
        sampling: SamplingParams | None = None,
        adapter: str | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> int:
        """Queue a request; returns its id. `logprobs=n` reports each new token's logprob and the top n;
        `prompt_logprobs=n` the same for every prompt token after the first (OpenAI's echo; such a
        prompt is computed in full, not taken from the prefix cache, and max_new_tokens may be 0)."""
        sampling = sampling or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise LmforgeError("every prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= t < self.model.config.vocab_size]
        if bad:
            raise LmforgeError(f"token id {bad[0]} is outside the vocabulary (size {self.model.config.vocab_size})")
        if len(prompt) >= self.max_model_len:
            raise LmforgeError(
                f"prompt of {len(prompt)} tokens does not fit the engine's context of {self.max_model_len} tokens"
            )
        seq = Sequence(next(self._ids), prompt, sampling, adapter, logprobs, prompt_logprobs=prompt_logprobs)
        seq.matcher = grammar_for(sampling, self.tokenizer, self.model.config.vocab_size, self.eos)
        if sampling.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        self.requests[seq.id] = seq
        self._submit(self._admit, seq)
        return seq.id

    def cancel(self, request_id: int) -> bool:
        """Stop a request and free its blocks; False if it is unknown or already finished (when a step
        is running, the cancel lands after it, so a request finishing in that step is not cancelled)."""
        seq = self.requests.get(request_id)
        if seq is None or seq.status is Status.FINISHED:
            return False
        self._submit(self._finish_if_live, seq, "cancelled")
        return True

    def release(self, request_id: int) -> bool:
        """Forget a request (cancelling it first if it is still running); False if it is unknown.
        The engine keeps every request until released, so a long-running caller must release
        each one once it has read its output."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self._submit(self._finish_if_live, seq, "cancelled")
        return True

    def has_unfinished(self) -> bool:
        """True while anything is queued, waiting, running or unreported (or a step is running)."""
        if not self._lock.acquire(blocking=False):
            return True
        try:
            self._drain()
            s = self.scheduler
            return bool(self._ops or s.waiting or s.running or s.swapped or self._finished_early)
        finally:
            self._lock.release()

    def output(self, request_id: int) -> list[int]:
        return list(self.requests[request_id].output)

    def acceptance(self, request_id: int) -> dict:
        """Speculative decoding figures of one request: verification steps, drafted and accepted
        tokens, acceptance rate, tokens per verification step."""
        seq = self.requests[request_id]
        return dict(
            steps=seq.spec_steps,
            drafted=seq.drafted,
            accepted=seq.accepted,
            acceptance_rate=round(seq.accepted / max(1, seq.drafted), 4),
            tokens_per_step=round((seq.accepted + seq.spec_steps) / max(1, seq.spec_steps), 3),
        )

    @property
    def stats(self) -> dict:
        s, pool = self.scheduler, self.pool
        return dict(
            blocks_total=pool.num_blocks - 1,
            blocks_used=pool.num_used,
            blocks_free=pool.num_free,
            blocks_cached=len(pool.evictable),
            queue_depth=len(s.waiting),
            running=len(s.running),
            swapped=len(s.swapped),
            held_requests=len(self.requests),
            prefix_memory_saved_bytes=s.counters["prefix_hit_blocks"] * s.cache.bytes_per_block,
            **s.counters,
            **self.counters,
        )

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Run one scheduling step; returns an Event per request that produced a token or finished."""
        with self._lock:
            self._drain()
            events, self._finished_early = self._finished_early, []
            batch = self.scheduler.schedule()
            if not batch:
                return events
            self.counters["steps"] += 1
            decodes = [(s, n) for s, n in batch if n == 1]
            prefills = [(s, n) for s, n in batch if n > 1]
            if decodes:
                events += self._run(decodes) if self.spec is None else self._run_speculative(decodes)
            if prefills:
                events += self._run(prefills)
            return events

    def generate_batch(
        self,
        prompts: Seq[Seq[int]],
        sampling: SamplingParams | Seq[SamplingParams] | None = None,
        adapters: Seq[str | None] | None = None,
    ) -> list[list[int]]:
        """Run prompts to completion; returns the new token ids of each, in order (LmforgeError
        naming the first prompt that failed, once all have run)."""
        params = sampling if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        ids = [self.add_request(p, s, a) for p, s, a in zip(prompts, params, adapters)]
        while self.has_unfinished():
            self.step()
        failed = [(n, self.requests[i].error) for n, i in enumerate(ids) if self.requests[i].finish_reason == "error"]
        if failed:
            raise LmforgeError(f"prompt {failed[0][0]} failed: {failed[0][1]}")
        return [self.output(i) for i in ids]

    # ------------------------------------------------------------------ queued changes

    def _submit(self, fn, *args) -> None:
        """Queue a change; apply the queue now unless a step holds the lock (it drains it next)."""
        self._ops.append((fn, args))
        if self._lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._lock.release()

    def _drain(self) -> None:
        while self._ops:
            fn, args = self._ops.popleft()
            fn(*args)

    def _admit(self, seq: Sequence) -> None:
        self.counters["prompt_tokens"] += len(seq.prompt)
        if seq.params.max_new_tokens == 0 and seq.prompt_logprobs is None:
            seq.status, seq.finish_reason = Status.FINISHED, "length"  # never queued, holds no block
            self._finished_early.append(Event(seq.id, [], True, "length"))
        else:
            self.scheduler.waiting.append(seq)

    def _finish_if_live(self, seq: Sequence, reason: str) -> None:
        if seq.status is not Status.FINISHED:
            self._finish(seq, reason)

    # ------------------------------------------------------------------ one forward

    def _run(self, group: list[tuple[Sequence, int]]) -> list[Event]:
        try:  # nothing below changes a sequence until the loop after it: a rerun per row is exact
            logits, failure = self._forward(group), None
            # Rows that sample now, with their bias, penalties and grammar masks (logits: the model's own).
            sampling = [(row, s) for row, (s, n) in enumerate(group) if s.num_computed + n == len(s.tokens)]
            picked = self._constrain(sampling, logits)
        except Exception as e:
            failure = e
        if failure is not None:  # outside the except: a row's own failure is not logged as this one's sequel
            return self._split(self._run, group, failure)
        argmax = picked.argmax(-1).tolist()  # one call for every greedy row
        chosen, failed = [], []  # (seq, row, its next token or None: a prompt scored, nothing to generate)
        for row, (seq, n) in enumerate(group):
            seq.num_computed += n
            self.scheduler.register_full_blocks(seq)
            if seq.num_pending == 0 and seq.status is Status.RUNNING:
                try:
                    chosen.append((seq, row, self._choose(seq, picked, row, argmax[row])))
                except Exception as e:  # this row's distribution, not the step: it fails alone
                    failed.append(self._fail(seq, e))
        # Logprobs of every row that asked, in one softmax and one top-k (not a few tensor ops per row).
        asked = [
            (row, token, seq.logprobs) for seq, row, token in chosen if seq.logprobs is not None and token is not None
        ]
        entries = dict(zip((row for row, _, _ in asked), logprob_entries(logits, *zip(*asked)))) if asked else {}
        return failed + [
            self._accept(seq, token, [entries[row]] if row in entries else None) for seq, row, token in chosen
        ]

    def _forward(self, group: list[tuple[Sequence, int]]) -> torch.Tensor:
        """The group's pending tokens through the model (and the draft); the last position's logits
        [B, V]. Writes only the rows' own KV slots and prompt logprobs not yet recorded."""
        rows = [(seq.tokens[seq.num_computed : seq.num_computed + n], seq.num_computed, seq.blocks) for seq, n in group]
        T = max(n for _, n in group)
        scored = [seq.prompt_logprobs is not None and seq.num_computed < len(seq.prompt) for seq, _ in group]
        packable = len(group) > 1 and len({seq.adapter for seq, _ in group}) == 1 and T > 1 and not any(scored)
        with self._adapter_rows([seq.adapter for seq, _ in group] if not packable else [group[0][0].adapter]):
            if packable:  # one adapter for the whole group: per-row LoRA selection works on batch rows
                logits = self.forward_packed(self.model, self.cache, rows)
            else:  # prompt logprobs need every position's logits
                every = self.forward_padded(
                    self.model, self.cache, rows, keep=T if any(scored) else 1, row_ids=[seq.id for seq, _ in group]
                )
                logits = every[:, -1]
        for row, (seq, n) in enumerate(group):
            if scored[row]:
                self._score_prompt(seq, every[row, T - n :])
        if self.spec is not None:  # the draft's keys for the same tokens
            self.spec.prefill([seq for seq, _ in group], [seq.num_computed + n for seq, n in group])
        return logits

    def _split(self, run, group: list[tuple[Sequence, int]], error: Exception) -> list[Event]:
        """A forward over `group` raised: run each row alone, so only the row at fault fails."""
        if len(group) == 1:
            return [self._fail(group[0][0], error)]
        log.warning(
            "a step over %d sequences failed (%s: %s); running them one by one", len(group), type(error).__name__, error
        )
        return [ev for item in group for ev in run([item])]

    def _run_speculative(self, group: list[tuple[Sequence, int]]) -> list[Event]:
        """Decode with drafts: the draft proposes for every sequence, the target scores each row's
        [last, d1..dk] in one forward, and each row keeps its accepted drafts plus one token."""
        seqs = [seq for seq, _ in group]
        gens = [seq.generator or self._generator for seq in seqs]
        try:  # proposing and scoring change no sequence (only cache slots past what each has computed)
            drafts, qs = self.spec.propose(seqs, [self.spec.num_drafts(s, self.max_model_len) for s in seqs], gens)
            rows = [(seq.tokens[-1:] + d, seq.num_computed, seq.blocks) for seq, d in zip(seqs, drafts)]
            T = max(len(tokens) for tokens, _, _ in rows)
            with self._adapter_rows([seq.adapter for seq in seqs]):
                logits = self.forward_padded(self.model, self.cache, rows, keep=T)  # rows are left-padded
            failure = None
        except Exception as e:
            failure = e
        if failure is not None:
            return self._split(self._run_speculative, group, failure)
        events = []
        for i, (seq, d) in enumerate(zip(seqs, drafts)):
            try:
                events.append(self._verify_row(seq, d, qs[i], gens[i], logits[i, T - len(d) - 1 :]))
            except Exception as e:  # this row's distribution, not the step: it fails alone
                events.append(self._fail(seq, e))
        return events

    def _adapter_rows(self, adapters: list[str | None]):
        if not any(adapters):
            return contextlib.nullcontext()
        from lmforge.peft import adapter_rows

        return adapter_rows(self.model, adapters)

    def _finish(self, seq: Sequence, reason: str | None) -> None:
        self.scheduler.finish(seq, reason)
