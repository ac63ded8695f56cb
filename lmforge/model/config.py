"""ModelConfig: one flat dataclass. A field exists only for a real axis of variation between the
families we load (GPT-2, Llama 2/3/3.2, Qwen2/3, Qwen3-MoE, Mistral, Mixtral, Gemma 2/3, Phi-3, OLMo 2);
presets are plain data. Every field added for a newer family defaults to the Llama behaviour."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lmforge.common import LmforgeError, checked, dataclass_from_dict


@dataclass
class ModelConfig:
    arch: str = "llama"  # HF family used for export (model.hf_config.SUPPORTED: gpt2, llama, qwen3, gemma2, ...)
    vocab_size: int = checked(32000, ge=1)
    hidden_size: int = checked(512, ge=1)
    intermediate_size: int = checked(1376, ge=1)
    num_hidden_layers: int = checked(8, ge=1)
    num_attention_heads: int = checked(8, ge=1)
    num_key_value_heads: int | None = checked(None, ge=1)  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = checked(None, ge=1)  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = checked(2048, ge=1)
    norm: str = checked("rmsnorm", choices=("rmsnorm", "layernorm"))
    norm_eps: float = checked(1e-5, gt=0)
    # Where the block's norms sit: "pre" x + f(norm(x)) (Llama); "sandwich" x + norm(f(norm(x)))
    # (Gemma 2/3); "post" x + norm(f(x)) (OLMo 2).
    norm_position: str = checked("pre", choices=("pre", "sandwich", "post"))
    norm_weight_offset: float = 0.0  # Gemma: RMSNorm scales by (offset + weight), weights stored around 0
    qk_norm: str | None = checked(None, choices=("head", "full"))  # RMSNorm on q and k: per head (Qwen3,
    # Gemma 3) or over the whole projection (OLMo 2), before RoPE
    activation: str = "silu"  # silu | gelu | gelu_new (tanh approximation, GPT-2) | relu
    gated_mlp: bool = True  # SwiGLU-style gate_proj * up_proj; False: up_proj -> act -> down_proj
    position: str = checked("rope", choices=("rope", "learned"))
    rope_theta: float = checked(10000.0, gt=0)
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear"|"longrope", "factor": ..., ...}
    rope_local_theta: float | None = checked(None, gt=0)  # Gemma 3: the sliding layers' RoPE base (unscaled)
    partial_rotary_factor: float = checked(1.0, gt=0, le=1)  # RoPE on this fraction of each head (Phi-4-mini)
    attention_bias: bool = False  # bias on q/k/v projections (GPT-2, Qwen2)
    attention_out_bias: bool = False  # bias on o_proj (GPT-2)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = checked(None, ge=1)  # Mistral: a query sees only the last `sliding_window` keys
    # Per layer "sliding_attention" | "full_attention" (Gemma's alternation); None: every layer uses sliding_window.
    layer_types: list[str] | None = None
    scale_embeddings: bool = False  # Gemma: token embeddings x sqrt(hidden_size)
    query_pre_attn_scalar: float | None = checked(None, gt=0)  # Gemma: scores x this**-0.5 (None: head_dim)
    attn_logit_softcapping: float | None = checked(None, gt=0)  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = checked(None, gt=0)  # Gemma 2: the same on the output logits
    num_experts: int = checked(0, ge=0)  # > 0: sparse mixture-of-experts MLP (Mixtral)
    num_experts_per_tok: int = checked(2, ge=1)
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum to 1 (Mixtral; Qwen3-MoE: per config)
    router_aux_loss_coef: float = checked(0.02, ge=0)
    causal: bool = True  # False: bidirectional attention (masked LM)
    initializer_range: float = checked(0.02, ge=0)
    bos_token_id: int | None = checked(None, ge=0)
    eos_token_id: int | list[int] | None = checked(None, ge=0)  # HF configs may list several
    pad_token_id: int | None = checked(None, ge=0)
    extra: dict[str, Any] = field(default_factory=dict)  # HF config fields we carry but do not use

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        checks = [
            (self.norm in ("rmsnorm", "layernorm"), "norm", self.norm),
            (self.position in ("rope", "learned"), "position", self.position),
            (
                self.activation in ("silu", "gelu", "gelu_new", "relu", "gelu_pytorch_tanh"),
                "activation",
                self.activation,
            ),
            (self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads", self.num_key_value_heads),
            (self.vocab_size > 0 and self.hidden_size > 0 and self.num_hidden_layers > 0, "sizes", self.vocab_size),
            (
                self.layer_types is None
                or (
                    len(self.layer_types) == self.num_hidden_layers
                    and set(self.layer_types) <= {"sliding_attention", "full_attention"}
                ),
                "layer_types",
                self.layer_types,
            ),
        ]
        for ok, name, value in checks:
            if not ok:
                raise LmforgeError(f"invalid model config: {name}={value!r}")

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of layer `layer_idx` (None: it attends to the whole context)."""
        if self.layer_types is not None and self.layer_types[layer_idx] != "sliding_attention":
            return None
        return self.sliding_window

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "model") -> ModelConfig:
        """Every field checked for type and range; errors name `where.field` and the value."""
        return dataclass_from_dict(cls, d, where)

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        if not isinstance(name, str) or name not in PRESETS:
            raise LmforgeError(f"unknown model preset {name!r}: choose from {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count from the shapes alone (used by memory estimates and MFU)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        attn = h * q * 2 + h * kv * 2
        mlp = h * self.intermediate_size * (3 if self.gated_mlp else 2)
        if self.num_experts:
            mlp = mlp * self.num_experts + h * self.num_experts
        norms = {"pre": 2, "sandwich": 4, "post": 2}[self.norm_position] * h
        if self.qk_norm:
            norms += 2 * self.head_dim if self.qk_norm == "head" else q + kv
        per_layer = attn + mlp + norms
        n = per_layer * self.num_hidden_layers + h
        if include_embeddings:
            n += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
            if self.position == "learned":
                n += self.max_position_embeddings * h
        return n


_GPT2_STYLE = dict(
    arch="gpt2",
    norm="layernorm",
    activation="gelu_new",
    gated_mlp=False,
    position="learned",
    attention_bias=True,
    attention_out_bias=True,
    mlp_bias=True,
    tie_word_embeddings=True,
)

PRESETS: dict[str, dict] = {
    # A few hundred thousand parameters: tests and the default pipeline on a laptop CPU.
    "tiny": dict(
        arch="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "small": dict(
        arch="llama",
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    "tiny-gpt2": dict(
        _GPT2_STYLE,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    ),
    "tiny-moe": dict(
        arch="mixtral",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    ),
    # GPT-2 small (124M).
    "gpt2": dict(
        _GPT2_STYLE,
        vocab_size=50257,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=1024,
        bos_token_id=50256,
        eos_token_id=50256,
    ),
    # A Llama-shaped ~110M model with grouped-query attention.
    "llama-100m": dict(
        arch="llama",
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
}
