"""The ViT image encoder (CLIP's vision tower), built from the language model's own blocks.

    pixels [B, C, H, W] -> patch conv -> [B, N, D] -> prepend class token -> + learned positions
      -> pre-norm (CLIP's `pre_layrnorm`) -> L x Block (bidirectional, no RoPE)
      -> last hidden [B, 1+N, D];  pooled = post_norm(hidden[:, 0])

A block is `lmforge.model`'s Block (LayerNorm, biased q/k/v/o, ungated MLP), so parameter names
follow the LM (`layers.0.self_attn.q_proj`); `hf_to_lmforge` maps a Hugging Face
`CLIPVisionModel` state dict onto them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lmforge.common import LmforgeError, dataclass_from_dict
from lmforge.model import ModelConfig
from lmforge.model.transformer import Block

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class VisionConfig:
    image_size: int = 32
    patch_size: int = 4
    num_channels: int = 3
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # CLIP's x * sigmoid(1.702 x); or gelu / gelu_new
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise LmforgeError(
                f"vision config: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise LmforgeError(
                f"vision config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VisionConfig:
        return dataclass_from_dict(cls, d, "vision config")

    @classmethod
    def from_hf(cls, hf: dict) -> VisionConfig:
        """From a transformers CLIPVisionConfig dict (or a CLIPConfig's `vision_config`)."""
        hf = hf.get("vision_config", hf)
        keep = {f.name for f in dataclasses.fields(cls)} - {"image_mean", "image_std"}
        return cls(**{k: v for k, v in hf.items() if k in keep})

    def to_hf(self) -> dict:
        d = {k: v for k, v in self.to_dict().items() if k not in ("image_mean", "image_std")}
        return {
            **d,
            "architectures": ["CLIPVisionModel"],
            "model_type": "clip_vision_model",
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "initializer_factor": 1.0,
        }


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def encoder_block_config(
    hidden: int, intermediate: int, layers: int, heads: int, eps: float, activation: str
) -> ModelConfig:
    """The LM block as a bidirectional encoder's (CLIP's ViT, Whisper's encoder): LayerNorm,
    biased q/k/v/o, an ungated biased MLP. Vocab/positions are unused (vocab_size must be > 0)."""
    return ModelConfig(
        vocab_size=1,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        norm="layernorm",
        norm_eps=eps,
        activation=activation,
        gated_mlp=False,
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        causal=False,
    )


def _block_config(c: VisionConfig) -> ModelConfig:
    act = "gelu" if c.hidden_act == "quick_gelu" else c.hidden_act  # quick_gelu is swapped in after
    return encoder_block_config(
        c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.layer_norm_eps, act
    )


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        c = self.config = config
        self.patch_embed = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False)
        self.class_token = nn.Parameter(torch.randn(c.hidden_size) * 0.02)
        self.pos_embed = nn.Embedding(c.num_patches + 1, c.hidden_size)
        nn.init.normal_(self.pos_embed.weight, std=0.02)
        self.pre_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        bc = _block_config(c)
        self.layers = nn.ModuleList(Block(bc, i) for i in range(c.num_hidden_layers))
        for block in self.layers:
            for lin in (
                block.self_attn.q_proj,
                block.self_attn.k_proj,
                block.self_attn.v_proj,
                block.self_attn.o_proj,
                block.mlp.up_proj,
                block.mlp.down_proj,
            ):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            if c.hidden_act == "quick_gelu":  # not an LM activation; swap the MLP's function in
                block.mlp.act = quick_gelu
        self.post_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, 1 + N, D] (class token first), positions added, pre-normed."""
        c = self.config
        if pixel_values.shape[1:] != (c.num_channels, c.image_size, c.image_size):
            raise LmforgeError(
                f"vision encoder expects images [B, {c.num_channels}, {c.image_size}, "
                f"{c.image_size}], got {list(pixel_values.shape)}"
            )
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_token.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.weight
        return self.pre_norm(x)

    def forward(self, pixel_values: torch.Tensor, layer: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden [B, 1+N, D] after block `layer` (-1: the last; -2: the penultimate, as LLaVA
        uses), pooled [B, D] = post_norm(class token of the last block))."""
        x = self.embed(pixel_values)
        n = len(self.layers)
        stop = layer % n
        picked = x
        for i, block in enumerate(self.layers):
            x, _ = block(x, None, None)
            if i == stop:
                picked = x
        return picked, self.post_norm(x[:, 0])


# ----------------------------------------------------------------------------- HF CLIP keys

# (Hugging Face name, ours) prefixes; {i} is a layer index. One table serves both directions.
_KEY_MAP = [
    ("embeddings.patch_embedding.", "patch_embed."),
    ("embeddings.class_embedding", "class_token"),
    ("embeddings.position_embedding.", "pos_embed."),
    ("pre_layrnorm.", "pre_norm."),
    ("post_layernorm.", "post_norm."),
    ("encoder.layers.{i}.layer_norm1.", "layers.{i}.input_layernorm."),
    ("encoder.layers.{i}.layer_norm2.", "layers.{i}.post_attention_layernorm."),
    ("encoder.layers.{i}.self_attn.out_proj.", "layers.{i}.self_attn.o_proj."),
    ("encoder.layers.{i}.self_attn.", "layers.{i}.self_attn."),
    ("encoder.layers.{i}.mlp.fc1.", "layers.{i}.mlp.up_proj."),
    ("encoder.layers.{i}.mlp.fc2.", "layers.{i}.mlp.down_proj."),
]


def rename_key(key: str, to_ours: bool, table: list[tuple[str, str]] = _KEY_MAP) -> str | None:
    """key renamed by the first matching (HF, ours) prefix pair of table; None when none matches."""
    for hf, ours in table:
        src, dst = (hf, ours) if to_ours else (ours, hf)
        m = re.match(re.escape(src).replace(r"\{i\}", r"(\d+)"), key)
        if m:
            return dst.replace("{i}", m.group(1) if m.groups() else "") + key[m.end() :]
    return None


def hf_to_lmforge(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPVisionModel (or CLIPModel: `vision_model.` keys) state dict -> ours.
    Keys outside the vision tower (text model, projections, position_ids buffers) are dropped."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("vision_model.")
        new = rename_key(key, to_ours=True)
        if new is not None:
            out[new] = value
    return out


def lmforge_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = rename_key(key, to_ours=False)
        if new is None:
            raise LmforgeError(f"vision state dict key {key!r} has no Hugging Face CLIP name")
        out[new] = value
    return out
