"""The per-row half of the serving engine (engine.py): what happens to one sequence after a forward.

`EngineRows` is mixed into `Engine`: choosing a row's next token, appending tokens up to the first
that ends the request (stop tokens, stop strings, max_new_tokens, the context), verifying a row's
speculative drafts, scoring prompt tokens (echo) and failing one row alone. engine.py keeps the
public API, the queue of changes and the batched forwards.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lmforge.common import LmforgeError, get_logger
from lmforge.tokenizer.text import TextStream

from .grammar import draft_masks, grammar_masks, mask_logits
from .logprobs import _entries, logprob_entry
from .sampling import adjust_logits, probabilities
from .scheduler import Sequence, Status

log = get_logger(__name__)


class Event(NamedTuple):
    request_id: int
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" (stop token/string), "length" (max_new_tokens or context),
    #                            "error" (this request failed alone: see `error`), None
    logprobs: list | None = None  # per new token: (token, logprob, [(top_token, logprob), ...]) when asked
    prompt_logprobs: list | None = None  # on a request's first event when asked: per prompt token, the first None
    error: str | None = None  # with finish_reason "error": what went wrong
    cached_tokens: int | None = None  # on a request's first event: prompt tokens taken from the prefix cache


class EngineRows:
    """Per-row steps of `Engine` (it provides model, tokenizer, scheduler, spec, eos, counters,
    _generator, _texts, max_model_len and _finish)."""

    def _fail(self, seq: Sequence, error: Exception) -> Event:
        """End `seq` alone with finish_reason "error" (its blocks freed); the step goes on."""
        if not isinstance(error, LmforgeError):  # a bug: keep its traceback in the log
            log.error("request %d failed", seq.id, exc_info=error)
        seq.error = str(error) if isinstance(error, LmforgeError) else f"{type(error).__name__}: {error}"
        self._finish(seq, "error")
        return Event(seq.id, [], True, "error", error=seq.error)

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Logprob entries of the prompt tokens these logits [n, V] (from position num_computed on)
        predict; a recomputed prefill (after preemption) does not add them twice."""
        for i, row in enumerate(logits):
            nxt = seq.num_computed + i + 1
            if nxt < len(seq.prompt) and nxt == len(seq.prompt_token_logprobs):
                seq.prompt_token_logprobs.append(logprob_entry(row, seq.prompt[nxt], seq.prompt_logprobs))

    def _verify_row(self, seq: Sequence, d: list[int], q, gen, lg: torch.Tensor) -> Event:
        """One sequence of a speculative step: keep its accepted drafts plus one token. lg: the
        target's logits at [last, d1..dk]; verification sees them with the bias and the grammar's
        mask at each position (a draft the grammar rejects has probability 0), logprobs do not."""
        L = len(seq.tokens)
        clg = self._constrain_drafts(seq, d, lg)
        if not d:
            seq.num_computed += 1
            seq.num_draft_computed = self.spec.valid_after(seq, L, 0)
            self.scheduler.register_full_blocks(seq)
            token = self._choose(seq, clg, 0, int(clg[0].argmax()))
            event = self._accept(seq, token, _entries(lg, [token], seq.logprobs))
        else:
            new, accepted = self.spec.verify(seq, clg, d, q, gen)
            self._advance_grammar(seq, new)
            kept, lps, reason = self._extend(seq, new, _entries(lg, new, seq.logprobs))
            seq.num_computed = min(L + accepted, len(seq.tokens))  # keys of last + the accepted drafts
            seq.num_draft_computed = self.spec.valid_after(seq, L, len(d))
            seq.spec_steps += 1
            seq.drafted, seq.accepted = seq.drafted + len(d), seq.accepted + accepted
            self.counters["drafted_tokens"] += len(d)
            self.counters["accepted_tokens"] += accepted
            self.scheduler.register_full_blocks(seq)
            if reason is not None:
                self._finish(seq, reason)
            event = self._event(seq, kept, lps, reason)
        if seq.status is Status.RUNNING:
            self.scheduler.trim(seq)  # blocks reserved for rejected drafts go back
        return event

    # ------------------------------------------------------------------ sampling and stopping

    def _choose(self, seq: Sequence, logits: torch.Tensor, row: int, argmax: int) -> int | None:
        """The next token of `seq` from logits[row] (already `_constrain`ed), or None when the request
        only scores its prompt (greedy rows only use `argmax`: no tensor op per row). A grammar
        advances past the token here, inside the caller's per-row failure handling."""
        p = seq.params
        if p.max_new_tokens == 0:  # asked for the prompt's logprobs only
            return None
        if p.greedy:
            token = argmax
        else:  # not sample(): that would add the logit_bias a second time
            probs = probabilities(logits[row : row + 1], p)
            token = int(torch.multinomial(probs, 1, generator=seq.generator or self._generator)[0])
        self._advance_grammar(seq, [token])
        return token

    def _stop_ids(self, seq: Sequence) -> list[int]:
        return self.eos + [t for t in seq.params.stop_token_ids if t not in self.eos]

    def _advance_grammar(self, seq: Sequence, tokens: list[int]) -> None:
        """Move the sequence's grammar past `tokens` (up to a stop token: the output ends there)."""
        if seq.matcher is None:
            return
        stops = self._stop_ids(seq)
        for token in tokens:
            if token in stops:
                return
            seq.matcher.advance(token)

    def _adjust(self, seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
        """logits [n, V] of one sequence with its logit_bias and penalties (over its tokens so far)."""
        p, V = seq.params, logits.shape[-1]
        seen = counts = None
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(1, V, dtype=torch.bool, device=logits.device)
            seen[0, torch.tensor(seq.tokens, device=logits.device)] = True
        if p.presence_penalty or p.frequency_penalty:
            out = torch.tensor(seq.output, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=V)[None, :V]
        return adjust_logits(logits, p, seen, counts)

    def _constrain(self, rows: list[tuple[int, Sequence]], logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] with each sampling row's logit_bias, penalties and grammar mask applied; the
        grammar masks of every constrained row come from one batched call. Rows that need none of
        these (and `logits` itself: logprobs report the model's own) are left as they are."""
        adjusted = [(row, seq) for row, seq in rows if seq.params.adjusts]
        constrained = [(row, seq) for row, seq in rows if seq.matcher is not None]
        if not adjusted and not constrained:
            return logits
        every = [row for row, _ in constrained] == list(range(len(logits)))  # a mask for every row: no scatter
        if adjusted or not every:  # rows are written in place below: not into the model's logits
            logits = logits.float().clone()
        for row, seq in adjusted:
            logits[row : row + 1] = self._adjust(seq, logits[row : row + 1])
        if constrained:  # after the bias: a +100 bias cannot bring a forbidden token back
            seqs = [seq for _, seq in constrained]
            allowed = grammar_masks([s.matcher for s in seqs], [self._stop_ids(s) for s in seqs], logits.shape[-1])
            rows = [row for row, _ in constrained]
            if every:
                logits = mask_logits(logits, allowed)
            else:
                idx = torch.tensor(rows, device=logits.device)
                logits[idx] = mask_logits(logits[idx], allowed)
        return logits

    def _constrain_drafts(self, seq: Sequence, drafts: list[int], logits: torch.Tensor) -> torch.Tensor:
        """The target's logits [len(drafts) + 1, V] at [last, d1..dk] with the sequence's bias and
        grammar applied at each position (`grammar.draft_masks`)."""
        if seq.params.adjusts:
            logits = self._adjust(seq, logits.float())
        if seq.matcher is None:
            return logits
        allowed = draft_masks(seq.matcher, drafts, self._stop_ids(seq), logits.shape[-1]).to(logits.device)
        return mask_logits(logits, allowed)

    def _accept(self, seq: Sequence, token: int | None, entries: list | None) -> Event:
        """Append the chosen token (with its logprob entry when asked) and report it."""
        if token is None:
            self._finish(seq, "length")
            return self._event(seq, [], None, "length")
        kept, lps, reason = self._extend(seq, [token], entries)
        if reason is not None:
            self._finish(seq, reason)
        return self._event(seq, kept, lps, reason)

    def _event(self, seq: Sequence, tokens: list[int], lps: list | None, reason: str | None) -> Event:
        first = len(seq.output) == len(tokens)  # the prompt's logprobs travel with the first event
        prompt_lps = seq.prompt_token_logprobs if first and seq.prompt_logprobs is not None else None
        cached = seq.cached_tokens if first else None
        return Event(seq.id, tokens, reason is not None, reason, lps, prompt_lps, cached_tokens=cached)

    def _extend(
        self, seq: Sequence, tokens: list[int], entries: list | None
    ) -> tuple[list[int], list | None, str | None]:
        """Append tokens (entries[i]: token i's logprob entry, when asked) up to the first that ends
        the request: (the tokens kept, their logprob entries, the finish reason or None)."""
        kept, reason = [], None
        for token in tokens:
            seq.output.append(token)
            kept.append(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                break
        lps = None if seq.logprobs is None else entries[: len(kept)]
        if lps:
            seq.token_logprobs += lps
        self.counters["generated_tokens"] += len(kept)
        return kept, lps, reason

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or token in self.eos:
            return "stop"
        if p.stop_strings and self.tokenizer is not None:
            # The request's text, decoded incrementally (each token once, not the output every step).
            text = self._texts.get(seq)
            if text is None:
                text = self._texts[seq] = TextStream(self.tokenizer, p.stop_strings)
            text.push(seq.output[len(text.starts) :])
            if text.stopped:
                return "stop"
        if len(seq.output) >= p.max_new_tokens or len(seq.prompt) + len(seq.output) >= self.max_model_len:
            return "length"
        return None
