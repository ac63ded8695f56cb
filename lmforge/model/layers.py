"""Leaf layers. Each takes explicit ints (not the whole config) so it can be reused elsewhere
(the vision encoder builds its blocks from these too)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight). offset 0: Llama; 1: Gemma, whose weights are stored around 0."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))  # an identity scale either way

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as HF does) then cast back: bf16 variance is too coarse.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma scales in fp32 and casts last: (1 + w) in bf16 would round w away
            return (x * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def make_norm(kind: str, dim: int, eps: float, offset: float = 0.0) -> nn.Module:
    return RMSNorm(dim, eps, offset) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


def activation_fn(name: str):
    if name == "silu":
        return F.silu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}")


# ----------------------------------------------------------------------------- rotary positions


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, long: bool = False) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with Llama-3, linear or LongRoPE scaling applied when configured
    (`long`: LongRoPE's factors for contexts beyond the original length, else its short ones)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    kind = rope_type(scaling)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    elif kind == "longrope":  # Phi-3: a learned divisor per frequency, one set per context regime
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        inv_freq = 1.0 / (factors * theta**exponents)
    elif kind != "default":
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv_freq


def rope_type(scaling: dict | None) -> str:
    return (scaling or {}).get("rope_type", (scaling or {}).get("type")) or "default"


def rope_attention_factor(scaling: dict | None, max_position_embeddings: int) -> float:
    """LongRoPE multiplies cos and sin by this (HF's `attention_scaling`); 1 for other kinds. Scaling
    both q and k by f is the same as scaling the attention scores by f**2, which is how we apply it
    (the cached keys stay plain rotations, so re-rotating them, as StreamingLLM does, stays exact)."""
    if rope_type(scaling) != "longrope":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


class RotaryEmbedding(nn.Module):
    def __init__(self, rotary_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(rotary_dim, theta, scaling), persistent=False)
        # LongRoPE switches to its long factors for the whole forward once a position passes the
        # original context (as HF does per forward); None for every other kind.
        self.original_max = None
        if rope_type(scaling) == "longrope":
            self.original_max = scaling["original_max_position_embeddings"]
            self.register_buffer(
                "inv_freq_long", rope_inv_freq(rotary_dim, theta, scaling, long=True), persistent=False
            )

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, sin [B, 1, T, rotary_dim] (broadcast over heads)."""
        inv_freq = self.inv_freq
        if self.original_max is not None:
            inv_freq = torch.where(position_ids.max() + 1 > self.original_max, self.inv_freq_long, inv_freq)
        freqs = position_ids[..., None].float() * inv_freq  # [B, T, rd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]; rotate pairs (i, i + rd/2) of the first rd = cos.shape[-1] dims as HF's
    `rotate_half` does (rd < hd: partial rotary, the rest passes through)."""
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)
    half = rd // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, optional RoPE, writing to a KV cache.

    qk_norm: RMSNorm on q and k before RoPE, per head ("head": Qwen3, Gemma 3) or over the whole
    projection ("full": OLMo 2). scale: the score scale (None: head_dim**-0.5). softcap: scores ->
    softcap * tanh(scores / softcap) before the mask (Gemma 2), which SDPA cannot do, so that case
    takes the explicit path."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_idx: int,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm: str | None = None,
        norm_eps: float = 1e-6,
        norm_offset: float = 0.0,
        scale: float | None = None,
        softcap: float | None = None,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.qk_norm, self.scale, self.softcap = qk_norm, scale, softcap
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=out_bias)
        if qk_norm is not None:
            full = qk_norm == "full"
            self.q_norm = RMSNorm(num_heads * head_dim if full else head_dim, norm_eps, norm_offset)
            self.k_norm = RMSNorm(num_kv_heads * head_dim if full else head_dim, norm_eps, norm_offset)
        # Optional trainable key/value prefix (prefix tuning / P-tuning v2): a module returning
        # (k, v) each [B, num_kv_heads, P, head_dim]. Set by lmforge.peft; None means no prefix.
        self.kv_prefix: nn.Module | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        kv_cache=None,
        start_pos: int = 0,
        is_causal: bool = False,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v, start_pos)  # [B, Hkv, S, hd]
        if self.kv_prefix is not None:
            pk, pv = self.kv_prefix(B)
            k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
            if mask is not None:  # prefix keys are visible to every query
                mask = torch.cat([mask.new_ones(*mask.shape[:-1], pk.shape[2]), mask], dim=-1)
            elif is_causal:
                is_causal = False
                mask = _causal_with_prefix(T, k.shape[2], pk.shape[2], x.device)
        if self.softcap is not None:
            out = softcapped_attention(q, k, v, mask, is_causal, self.scale, self.softcap)
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=is_causal and mask is None,
                scale=self.scale,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


def softcapped_attention(q, k, v, mask, is_causal: bool, scale: float | None, cap: float) -> torch.Tensor:
    """Attention with tanh-capped scores (Gemma 2). q [B, H, T, hd], k/v [B, Hkv, S, hd], mask bool
    [B|1, 1, T, S] (True = may attend) -> [B, H, T, hd]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = cap * torch.tanh(scores / cap)
    if mask is None and is_causal:
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def _causal_with_prefix(T: int, S: int, P: int, device) -> torch.Tensor:
    keys = torch.arange(S - P, device=device)
    causal = keys[None, :] <= torch.arange(T, device=device)[:, None] + (S - P - T)
    return torch.cat([torch.ones(T, P, dtype=torch.bool, device=device), causal], dim=-1)[None, None]


# ----------------------------------------------------------------------------- MLPs


class MLP(nn.Module):
    """SwiGLU (gated: down(act(gate(x)) * up(x))) or classic (down(act(up(x))))."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, gated: bool, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias) if gated else None
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class MoE(nn.Module):
    """Sparse mixture of experts with top-k routing (Mixtral). Returns (output, router_logits)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        activation: str,
        norm_topk_prob: bool = True,
    ):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(
            MLP(hidden_size, intermediate_size, activation, gated=True) for _ in range(num_experts)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        router_logits = self.gate(flat)  # [N, E]
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.norm_topk_prob:  # Mixtral; Qwen3-MoE keeps the raw softmax probabilities unless told to
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        # Loop over experts, not tokens: each expert runs once on the tokens routed to it.
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(chosen == e)
            if token_idx.numel():
                out.index_add_(0, token_idx, expert(flat[token_idx]) * weights[token_idx, slot, None])
        return out.view(B, T, H), router_logits


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss over all layers' router logits (as HF's Mixtral computes it):
    num_experts * sum_e (fraction of routings to e) * (mean router probability of e)."""
    logits = torch.cat(router_logits, dim=0)
    probs = F.softmax(logits, dim=-1, dtype=torch.float)
    chosen = probs.topk(top_k, dim=-1).indices
    expert_mask = F.one_hot(chosen, num_experts).float()  # [N, k, E]
    tokens_per_expert = expert_mask.mean(dim=0)  # [k, E]
    prob_per_expert = probs.mean(dim=0)  # [E]
    return (tokens_per_expert * prob_per_expert[None]).sum() * num_experts
