"""Turning logits into the next token: greedy, temperature, top-k, top-p, min-p, repetition penalty,
OpenAI's logit_bias and presence/frequency penalties, and a grammar's allowed-token mask.

Pure functions over [B, V] logits so the single-sequence generator, the batching engine and
speculative decoding all sample the same way.

Numerically safe for any valid parameters: logits are shifted so their maximum is 0 before the
temperature divides them (a temperature of 1e-300 gives -inf or 0, never inf - inf = NaN), a
temperature under GREEDY_BELOW is greedy (as vLLM's 1e-5), and a penalty that overflows a
logit saturates it instead. A row without a single finite logit (a broken model) raises
LmforgeError rather than feeding NaN to multinomial.

Order (as vLLM): `adjust_logits` adds logit_bias, applies the repetition penalty (prompt and
output), subtracts presence/frequency penalties (OpenAI: over the generated tokens only) and masks
what the grammar forbids; then temperature, top-k, top-p and min-p (`probabilities`). Greedy takes
the argmax of the adjusted logits. A grammar mask wins over a bias: a +100 bias cannot bring back a
forbidden token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lmforge.common import LmforgeError

from .grammar import GrammarSpec, mask_logits

GREEDY_BELOW = 1e-5  # temperatures this small are greedy: the distribution is one-hot to float precision
_MAX = torch.finfo(torch.float32).max


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off (HF/CTRL semantics: divide positive logits, multiply negative)
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    # OpenAI-style extras: additive bias per token id, min-p filtering (drop tokens whose probability is
    # under min_p x the top one's), and presence/frequency penalties over the generated tokens.
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_p: float = 0.0  # 0: off
    presence_penalty: float = 0.0  # 0: off
    frequency_penalty: float = 0.0  # 0: off
    grammar: GrammarSpec | None = None  # the output must match it (JSON, JSON Schema, regex, EBNF)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise LmforgeError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        # `not x >= 0` (rather than `x < 0`) also refuses NaN, which compares false with everything.
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise LmforgeError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LmforgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LmforgeError(f"top_k must be >= 0, got {self.top_k}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise LmforgeError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_p <= 1:  # OpenAI/vLLM ranges from here on
            raise LmforgeError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise LmforgeError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not isinstance(self.logit_bias, dict):
            raise LmforgeError(f"logit_bias must map token ids to numbers, got {type(self.logit_bias).__name__}")
        bias = {}
        for token, value in self.logit_bias.items():
            try:  # OpenAI sends the ids as JSON object keys, i.e. strings
                t, v = int(token), float(value)
            except (TypeError, ValueError):
                raise LmforgeError(f"logit_bias: {token!r}: {value!r} is not a token id and a number") from None
            if t < 0:
                raise LmforgeError(f"logit_bias: token id {t} is negative")
            if not -100 <= v <= 100:
                raise LmforgeError(f"logit_bias: the bias of token {t} must be in [-100, 100], got {v}")
            bias[t] = v
        self.logit_bias = bias

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse logit_bias ids outside a model's vocabulary (0..vocab_size-1)."""
        bad = [t for t in self.logit_bias if t >= vocab_size]
        if bad:
            raise LmforgeError(f"logit_bias: token id {bad[0]} is outside the vocabulary (size {vocab_size})")

    @property
    def set_penalties(self) -> list[str]:
        """The penalties in use (they make the logits depend on the tokens so far)."""
        on = [self.repetition_penalty != 1.0, self.presence_penalty != 0.0, self.frequency_penalty != 0.0]
        return [n for n, o in zip(("repetition_penalty", "presence_penalty", "frequency_penalty"), on) if o]

    @property
    def penalised(self) -> bool:
        return bool(self.set_penalties)

    @property
    def adjusts(self) -> bool:
        """Anything `adjust_logits` does for these params, the grammar mask aside."""
        return self.penalised or bool(self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """seen [B, V] bool: tokens already in the prompt or the output."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    # A tiny penalty overflows a positive logit to inf (inf - inf is NaN later): saturate it instead.
    if penalised.is_floating_point():
        big = torch.finfo(penalised.dtype).max
        penalised = penalised.clamp(-big, big)
    return torch.where(seen, penalised, logits)


def safe_logits(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits with NaN as -inf and +inf saturated, shifted so each row's maximum is 0.
    Raises LmforgeError for a row with no finite logit: nothing can be sampled from it."""
    x = torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=_MAX, neginf=float("-inf"))
    top = x.amax(dim=-1, keepdim=True)
    if not torch.isfinite(top).all():
        raise LmforgeError("the model produced no finite logit for this sequence (NaN or -inf everywhere)")
    return x - top


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: counts [B, V] how often each token was generated;
    logit - presence * (count > 0) - frequency * count."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def adjust_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [B, V] with logit_bias, the repetition penalty (seen [B, V] bool: prompt and output
    tokens), presence/frequency penalties (counts [B, V]: generated tokens) and the grammar mask
    (allowed [B, V] bool) applied; the inputs each param leaves off may be None."""
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        values = torch.tensor(list(params.logit_bias.values()), device=logits.device, dtype=torch.float32)
        logits = logits.float().index_add(-1, ids, values.expand(logits.shape[0], -1))
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if counts is not None:
        logits = apply_penalties(logits.float(), counts, params.presence_penalty, params.frequency_penalty)
    if allowed is not None:
        logits = mask_logits(logits, allowed)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) / min-p set to -inf. logits [B, V]; min-p
    drops a token whose probability is under min_p x the most likely token's."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[..., 0] = False  # the top token always stays (a top_p below float32's range is 0 here)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0.0:  # p < min_p * p_max  <=>  logit < max logit + log(min_p) (the top token always stays)
        top = logits.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < top + math.log(min_p), float("-inf"))
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution actually sampled from (used by speculative decoding's acceptance test)."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    # Shifted logits are <= 0 with a 0 in every row, so any temperature keeps a finite maximum.
    logits = filter_logits(safe_logits(logits) / params.temperature, params.top_k, params.top_p, params.min_p)
    return logits.softmax(dim=-1)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (`adjust_logits` first, with the same optional inputs)."""
    logits = adjust_logits(logits, params, seen, counts, allowed)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, params)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
