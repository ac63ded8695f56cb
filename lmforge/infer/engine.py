"""The serving engine: many requests share one model through a paged KV cache and continuous batching.

    engine = Engine(model, tokenizer)
    rid = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=64))
    while engine.has_unfinished():
        for event in engine.step():   # Event(request_id, new_token_ids, finished, finish_reason, logprobs)
            ...

Each `step()` asks the scheduler for a batch, runs it through the model (decode rows [B, 1]; prefill
chunks packed into one row [1, sum T] with a block-diagonal causal mask, so nothing is padded),
samples one token for every sequence whose pending tokens are all computed, and reports what
happened. Explicit [B, 1, T, S] masks plus position ids make each sequence see only its own
context: it decodes the same alone or among others. (Rows with different LoRA adapters cannot
share a packed row; they run as left-padded rows [B, T], so each row's last column is its last token.)

Threads: `step()` holds a lock for the whole forward. `add_request`/`cancel`/`release` never wait for
it: they queue their change, which is applied at once when no step is running and otherwise at the
start of the next step, in the order queued. So a server thread may add/cancel while another steps.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import threading
from typing import NamedTuple, Sequence as Seq

import torch

from lmforge.common import LmforgeError

from .paged import BlockPool, PagedKVCache, block_table, write_slots
from .sampling import SamplingParams, sample
from .scheduler import Scheduler, Sequence, Status


class Event(NamedTuple):
    request_id: int
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" (stop token/string), "length" (max_new_tokens or context), None
    logprobs: list | None = None  # per new token: (token, logprob, [(top_token, logprob), ...]) when asked


class Engine:
    def __init__(self, model, tokenizer=None, *, max_batch_tokens: int = 2048, max_seqs: int = 64,
                 block_size: int = 16, num_blocks: int | None = None, prefix_caching: bool = True,
                 preemption: str = "swap", swap_blocks: int | None = None, max_model_len: int | None = None,
                 kv_memory: int = 256 << 20, seed: int = 0):
        """max_batch_tokens: new tokens per step (prefill chunks + decodes); max_seqs: running sequences;
        num_blocks: KV pool size in blocks (default: sized from max_seqs within kv_memory bytes);
        preemption: "swap" (KV offload to CPU, recompute when swap_blocks is full) or "recompute"."""
        self.model, self.tokenizer = model.eval(), tokenizer
        c = model.config
        p = next(model.parameters())
        self.device = p.device
        dtype = p.dtype if p.is_floating_point() else torch.float32
        self.max_model_len = min(max_model_len or c.max_position_embeddings, c.max_position_embeddings)
        if num_blocks is None:  # max_seqs sequences of a quarter context each, within kv_memory; >= 2 full ones
            per_seq = -(-self.max_model_len // block_size)
            itemsize = torch.finfo(dtype).bits // 8
            block_bytes = 2 * c.num_hidden_layers * block_size * c.num_key_value_heads * c.head_dim * itemsize
            num_blocks = max(2 * per_seq, min(max_seqs * per_seq // 4, kv_memory // block_bytes)) + 1
        self.block_size = block_size
        self.max_model_len = min(self.max_model_len, (num_blocks - 1) * block_size)  # one sequence must always fit
        self.pool = BlockPool(num_blocks, block_size)
        self.cache = PagedKVCache(c, num_blocks, block_size, self.device, dtype)
        self.scheduler = Scheduler(self.pool, self.cache, max_seqs, max_batch_tokens, prefix_caching, preemption,
                                   swap_blocks)
        self.requests: dict[int, Sequence] = {}
        self._ids = itertools.count()  # next() on a count is atomic: no lock needed
        self._lock = threading.RLock()  # held by step() for a whole forward
        self._ops: collections.deque = collections.deque()  # changes queued while a step runs
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._finished_early: list[Event] = []
        eos = getattr(tokenizer, "eos_id", None)
        self.eos = [eos] if eos is not None else []
        self.counters = dict(steps=0, generated_tokens=0, prompt_tokens=0)

    # ------------------------------------------------------------------ public API

    def add_request(self, prompt_ids: Seq[int], sampling: SamplingParams | None = None, adapter: str | None = None,
                    logprobs: int | None = None) -> int:
        """Queue a request; returns its id. `logprobs=n` reports each new token's logprob and the top n."""
        sampling = sampling or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise LmforgeError("every prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= t < self.model.config.vocab_size]
        if bad:
            raise LmforgeError(f"token id {bad[0]} is outside the vocabulary (size {self.model.config.vocab_size})")
        if len(prompt) >= self.max_model_len:
            raise LmforgeError(f"prompt of {len(prompt)} tokens does not fit the engine's context of "
                               f"{self.max_model_len} tokens")
        seq = Sequence(next(self._ids), prompt, sampling, adapter, logprobs)
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

    @property
    def stats(self) -> dict:
        s, pool = self.scheduler, self.pool
        return dict(blocks_total=pool.num_blocks - 1, blocks_used=pool.num_used, blocks_free=pool.num_free,
                    blocks_cached=len(pool.evictable), queue_depth=len(s.waiting), running=len(s.running),
                    swapped=len(s.swapped), prefix_memory_saved_bytes=s.counters["prefix_hit_blocks"]
                    * self.cache.bytes_per_block, **s.counters, **self.counters)

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
            for group in (decodes, prefills):
                if group:
                    events += self._run(group)
            return events

    def generate_batch(self, prompts: Seq[Seq[int]], sampling: SamplingParams | Seq[SamplingParams] | None = None,
                       adapters: Seq[str | None] | None = None) -> list[list[int]]:
        """Run prompts to completion; returns the new token ids of each, in order."""
        params = sampling if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        ids = [self.add_request(p, s, a) for p, s, a in zip(prompts, params, adapters)]
        while self.has_unfinished():
            self.step()
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
        if seq.params.max_new_tokens == 0:
            self._finish(seq, "length")
            self._finished_early.append(Event(seq.id, [], True, "length"))
        else:
            self.scheduler.waiting.append(seq)

    def _finish_if_live(self, seq: Sequence, reason: str) -> None:
        if seq.status is not Status.FINISHED:
            self._finish(seq, reason)

    # ------------------------------------------------------------------ one forward

    def _run(self, group: list[tuple[Sequence, int]]) -> list[Event]:
        packable = len(group) > 1 and len({seq.adapter for seq, _ in group}) == 1 and group[0][1] > 1
        logits = self._forward_packed(group) if packable else self._forward(group)
        argmax = logits.argmax(-1).tolist()  # one call for every greedy row
        events = []
        for row, (seq, n) in enumerate(group):
            seq.num_computed += n
            self.scheduler.register_full_blocks(seq)
            if seq.num_pending == 0 and seq.status is Status.RUNNING:
                events.append(self._sample_and_check(seq, logits[row], argmax[row]))
        return events

    def _forward(self, group: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Last-token logits [B, V] for the rows' new tokens (left-padded to the longest)."""
        T, bs = max(n for _, n in group), self.block_size
        ids, write_pos, ctx = [], [], []
        for seq, n in group:
            start = seq.num_computed
            ids.append([0] * (T - n) + seq.tokens[start:start + n])
            write_pos.append([-1] * (T - n) + list(range(start, start + n)))
            ctx.append(start + n)
        qpos, ctx = torch.tensor(write_pos), torch.tensor(ctx)
        nb = -(-int(ctx.max()) // bs)  # blocks covering the longest context
        tables = [seq.blocks for seq, _ in group]
        self.cache.set_step(write_slots(tables, write_pos, bs).to(self.device), block_table(tables, nb).to(self.device))
        mask = self._mask(qpos, ctx, nb * bs).to(self.device)
        with self._adapter_rows([seq.adapter for seq, _ in group]):
            logits = self.model(torch.tensor(ids, device=self.device), position_ids=qpos.clamp(min=0).to(self.device),
                                attn_mask=mask, kv_cache=self.cache, logits_to_keep=1)
        return logits[:, -1].float()

    def _forward_packed(self, group: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Prefill chunks packed into one row [1, sum n] (no padding): each sequence's queries see
        only its own blocks (a block-diagonal causal mask over the concatenated block tables).
        Needs one adapter for the whole group: per-row LoRA selection works on batch rows."""
        bs = self.block_size
        ids, qpos, tables, owner, key_pos, last = [], [], [], [], [], []
        for i, (seq, n) in enumerate(group):
            start = seq.num_computed
            ids += seq.tokens[start:start + n]
            qpos += range(start, start + n)
            owner += [i] * n
            last.append(len(ids) - 1)
            nb = -(-(start + n) // bs)
            tables += seq.blocks[:nb]
            key_pos.append(torch.arange(nb * bs))
        key_owner = torch.cat([torch.full((len(k),), i) for i, k in enumerate(key_pos)])
        q, k = torch.tensor(qpos)[:, None], torch.cat(key_pos)[None, :]
        allowed = (torch.tensor(owner)[:, None] == key_owner[None, :]) & (k <= q)
        window = self.model.config.sliding_window
        if window:
            allowed &= (q - k) < window
        slots = torch.cat([write_slots([seq.blocks], [list(range(seq.num_computed, seq.num_computed + n))], bs)[0]
                           for seq, n in group])
        self.cache.set_step(slots.reshape(1, -1).to(self.device), torch.tensor([tables], device=self.device))
        with self._adapter_rows([group[0][0].adapter]):
            _, hidden = self.model(torch.tensor([ids], device=self.device),
                                   position_ids=torch.tensor([qpos], device=self.device),
                                   attn_mask=allowed[None, None].to(self.device), kv_cache=self.cache,
                                   logits_to_keep=1, return_hidden=True)
        return self.model.lm_head(hidden[0, last]).float()  # each sequence's last new token

    def _mask(self, qpos: torch.Tensor, ctx: torch.Tensor, S: int) -> torch.Tensor:
        """[B, 1, T, S]: key j is visible to a query at position p if j <= p and j is in the row's context."""
        k = torch.arange(S)[None, None, :]
        q = qpos[:, :, None]
        allowed = (k <= q) & (k < ctx[:, None, None])
        window = self.model.config.sliding_window
        if window:
            allowed &= (q - k) < window
        allowed |= (q < 0) & (k == 0)  # padding queries see one key (their output is discarded)
        return allowed[:, None]

    def _adapter_rows(self, adapters: list[str | None]):
        if not any(adapters):
            return contextlib.nullcontext()
        from lmforge.peft import adapter_rows

        return adapter_rows(self.model, adapters)

    # ------------------------------------------------------------------ sampling and stopping

    def _sample_and_check(self, seq: Sequence, logits: torch.Tensor, argmax: int) -> Event:
        p = seq.params
        if p.greedy and p.repetition_penalty == 1.0:
            token = argmax
        else:
            seen = None
            if p.repetition_penalty != 1.0:
                seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool, device=logits.device)
                seen[0, torch.tensor(seq.tokens, device=logits.device)] = True
            token = int(sample(logits[None], p, seq.generator or self._generator, seen)[0])
        lp = None
        if seq.logprobs is not None:
            logp = logits.log_softmax(-1)
            top = logp.topk(seq.logprobs) if seq.logprobs else None
            alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            lp = [(token, float(logp[token]), alts)]
            seq.token_logprobs += lp
        seq.output.append(token)
        self.counters["generated_tokens"] += 1
        reason = self._stop_reason(seq, token)
        if reason is not None:
            self._finish(seq, reason)
        return Event(seq.id, [token], reason is not None, reason, lp)

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or token in self.eos:
            return "stop"
        if p.stop_strings and self.tokenizer is not None:
            text = self._decode_known(seq.output)
            if any(s and s in text for s in p.stop_strings):
                return "stop"
        if len(seq.output) >= p.max_new_tokens or len(seq.tokens) >= self.max_model_len:
            return "length"
        return None

    def _decode_known(self, ids: list[int]) -> str:
        """Decode for stop strings, skipping ids past the tokenizer's vocabulary: a model whose
        embedding is padded (to a multiple of 64, say) may emit one, and decode would raise."""
        limit = getattr(self.tokenizer, "vocab_size", None)
        return self.tokenizer.decode([t for t in ids if limit is None or t < limit])

    def _finish(self, seq: Sequence, reason: str | None) -> None:
        self.scheduler.finish(seq, reason)
