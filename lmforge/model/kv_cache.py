"""Static (preallocated) KV cache: one [B, num_kv_heads, max_len, head_dim] buffer per layer.

Attention calls `update(layer_idx, k, v, start_pos)`: the new keys/values are written to slots
[start_pos, start_pos + T) and the filled part [0, start_pos + T) is returned to attend over, so
the prefix is never recomputed. Other caches (paged, sliding-window) implement the same method.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype: torch.dtype = torch.float32
    ):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.max_len = max_len
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> KVCache:
        p = next(model.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        # A tensor-parallel model (lmforge.parallel) holds only its rank's key/value heads.
        return cls(getattr(model, "tp_local_config", model.config), batch_size, max_len, device=p.device, dtype=dtype)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, start_pos: int):
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: writing up to position {end} but max_len is {self.max_len}")
        self.k[layer_idx][:, :, start_pos:end] = k
        self.v[layer_idx][:, :, start_pos:end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (e.g. drop finished sequences)."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
