"""StreamingLLM (Xiao et al. 2024): generate past the cache size with bounded memory by keeping the
first `sinks` tokens (attention sinks: the softmax parks its mass there) plus a sliding window of
the most recent tokens.

Positions are cache-relative, as in the paper: a token's position is its slot in the cache, so
the model never sees a position beyond `sinks + window`. When old tokens are evicted, the kept
window slides left by n slots; its keys were rotated (RoPE) for their old slots, and since
rotations compose, R(p - n) k = R(-n) R(p) k re-rotates them in place without the raw keys.
(Learned absolute positions are baked into the hidden state and cannot be moved; those models
just use cache-relative positions for new tokens.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lmforge.common import LmforgeError
from lmforge.model.layers import apply_rope

from .decode import decode
from .sampling import SamplingParams


class SinkKVCache:
    """[B, Hkv, sinks + window, hd] per layer; `update` has the static cache's contract."""

    def __init__(self, config, batch_size: int, sinks: int, window: int, device=None, dtype=torch.float32):
        if sinks < 0 or window < 2:
            raise LmforgeError(f"streaming cache needs sinks >= 0 and window >= 2, got sinks={sinks} window={window}")
        self.sinks, self.window, self.capacity = sinks, window, sinks + window
        shape = (batch_size, config.num_key_value_heads, self.capacity, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.length = 0  # filled slots
        self.evicted = 0  # tokens dropped so far

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, start_pos: int):
        end = start_pos + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"streaming cache overflow: slot {end} > capacity {self.capacity} (call make_room first)")
        self.k[layer_idx][:, :, start_pos:end] = k
        self.v[layer_idx][:, :, start_pos:end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def make_room(self, n_new: int, rotary=None) -> None:
        """Evict the oldest non-sink tokens so that n_new more fit; re-rotate the kept keys."""
        n = self.length + n_new - self.capacity
        if n <= 0:
            return
        if n_new > self.window:
            raise ValueError(f"{n_new} new tokens do not fit a window of {self.window}")
        s, keep = self.sinks, self.length - self.sinks - n
        rot = None
        if rotary is not None:
            cos, sin = rotary(torch.tensor([[-n]], device=self.k[0].device), self.k[0].dtype)
            rot = cos, sin
        for i in range(len(self.k)):
            kept_k = self.k[i][:, :, s + n : s + n + keep]
            self.k[i][:, :, s : s + keep] = apply_rope(kept_k, *rot) if rot is not None else kept_k.clone()
            self.v[i][:, :, s : s + keep] = self.v[i][:, :, s + n : s + n + keep].clone()
        self.length -= n
        self.evicted += n


@dataclass
class AttentionSinks:
    """The StreamingLLM cache option of `decode.decode`: keep `sinks` first tokens plus a window of
    the latest `window`; prompts and embeddings are fed `chunk` tokens at a time (default window/2)."""

    sinks: int = 4
    window: int = 252
    chunk: int | None = None

    def feeder(self, model, device) -> Callable:
        """feed(tokens [1, n] or embeds [1, n, D]) -> the last position's logits [1, V]."""
        dtype = next(model.parameters()).dtype
        cache = SinkKVCache(
            model.config, 1, self.sinks, self.window, device, dtype if dtype.is_floating_point else torch.float32
        )
        rotary = model.model.rotary if model.config.position == "rope" else None
        # Evicting re-rotates the kept keys with one RoPE table: layers with their own base (Gemma 3's
        # sliding layers) or LongRoPE's context-dependent factors would be rotated wrongly.
        if hasattr(model.model, "rotary_local") or getattr(rotary, "original_max", None) is not None:
            raise LmforgeError("attention sinks are not supported for models with a local RoPE base or LongRoPE")
        chunk = self.chunk or max(1, self.window // 2)

        def feed(tokens: torch.Tensor | None = None, embeds: torch.Tensor | None = None) -> torch.Tensor:
            x = tokens if embeds is None else embeds
            logits = None
            for i in range(0, x.shape[1], chunk):
                piece = x[:, i : i + chunk]
                n = piece.shape[1]
                cache.make_room(n, rotary)
                start = cache.length
                pos = torch.arange(start, start + n, device=device)[None]
                kw = {"input_ids": piece} if embeds is None else {"inputs_embeds": piece}
                logits = model(**kw, position_ids=pos, kv_cache=cache, start_pos=start, logits_to_keep=1)[:, -1]
                cache.length += n
            return logits

        return feed


def stream_generate_sinks(
    model, prompt_ids: list[int], params: SamplingParams, sinks: int = 4, window: int = 252, chunk: int | None = None
) -> Iterator[int]:
    """Yield new tokens one at a time for a single prompt; memory stays at sinks + window slots
    however long the prompt or the generation."""
    for token in decode(model, params, list(prompt_ids), sinks=AttentionSinks(sinks, window, chunk)):
        yield int(token[0])
