"""A Whisper-style audio encoder, built from the language model's own blocks.

    log-mel [B, n_mels, F] -> conv1 (k3) -> GELU -> conv2 (k3, stride 2) -> GELU -> [B, F/2, D]
      -> + sinusoidal positions -> L x Block (pre-LayerNorm, bidirectional, GELU MLP) -> LayerNorm

Every 20 ms of audio becomes one vector (10 ms mel frames, halved by the strided conv). A block is
`lmforge.model`'s Block (LayerNorm, biased q/k/v/o, ungated MLP), so `hf_to_lmforge` maps a Hugging
Face `WhisperEncoder` (or `WhisperModel`/`WhisperForConditionalGeneration`: `model.encoder.` keys)
state dict onto it and `lmforge_to_hf` back. Whisper's k_proj has no bias: ours is loaded as zeros,
and stays zero under training (a bias on the keys adds the same amount to every score of a query,
which softmax ignores, so its gradient is exactly 0); exporting drops it.

Unlike Hugging Face's, this encoder takes clips shorter than `max_source_positions` (20 ms each):
a model trained on 2-second clips need not pad them to 30 s.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from lmforge.common import LmforgeError, dataclass_from_dict
from lmforge.model import ModelConfig
from lmforge.model.transformer import Block

from .vit import encoder_block_config, rename_key


@dataclass
class AudioEncoderConfig:
    num_mel_bins: int = 80
    d_model: int = 128
    encoder_layers: int = 2
    encoder_attention_heads: int = 4
    encoder_ffn_dim: int = 512
    max_source_positions: int = 1500  # 30 s of audio
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.d_model % self.encoder_attention_heads or self.d_model % 2:
            raise LmforgeError(
                f"audio encoder config: d_model {self.d_model} must be even and divisible by "
                f"encoder_attention_heads {self.encoder_attention_heads}"
            )

    @property
    def max_frames(self) -> int:
        """The longest log-mel input, in 10 ms frames."""
        return 2 * self.max_source_positions

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AudioEncoderConfig:
        return dataclass_from_dict(cls, d, "audio encoder config")

    @classmethod
    def from_hf(cls, hf: dict) -> AudioEncoderConfig:
        """From a transformers WhisperConfig dict (its encoder half)."""
        keep = {f.name for f in dataclasses.fields(cls)} - {"layer_norm_eps"}
        return cls(**{k: v for k, v in hf.items() if k in keep})

    def to_hf(self) -> dict:
        """A WhisperConfig dict whose encoder is this one (the decoder fields are the smallest valid)."""
        d = {k: v for k, v in self.to_dict().items() if k != "layer_norm_eps"}
        return {
            **d,
            "architectures": ["WhisperModel"],
            "model_type": "whisper",
            "activation_function": "gelu",
            "decoder_layers": 1,
            "decoder_attention_heads": self.encoder_attention_heads,
            "decoder_ffn_dim": self.encoder_ffn_dim,
            "scale_embedding": False,
        }


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed position table [length, channels]: sines then cosines over log-spaced rates."""
    step = math.log(max_timescale) / (channels // 2 - 1)
    rates = torch.exp(-step * torch.arange(channels // 2))
    angles = torch.arange(length)[:, None] * rates[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _block_config(c: AudioEncoderConfig) -> ModelConfig:
    return encoder_block_config(
        c.d_model, c.encoder_ffn_dim, c.encoder_layers, c.encoder_attention_heads, c.layer_norm_eps, "gelu"
    )


class AudioEncoder(nn.Module):
    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        c = self.config = config
        self.conv1 = nn.Conv1d(c.num_mel_bins, c.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(c.d_model, c.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(c.max_source_positions, c.d_model)
        with torch.no_grad():
            self.embed_positions.weight.copy_(sinusoids(c.max_source_positions, c.d_model))
        self.embed_positions.requires_grad_(False)  # fixed, as Whisper's
        bc = _block_config(c)
        self.layers = nn.ModuleList(Block(bc, i) for i in range(c.encoder_layers))
        for block in self.layers:
            nn.init.zeros_(block.self_attn.k_proj.bias)
        self.layer_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """[B, n_mels, F] log-mel frames (F <= 2 x max_source_positions) -> [B, ceil(F / 2), D]."""
        c = self.config
        if mel.dim() != 3 or mel.shape[1] != c.num_mel_bins:
            raise LmforgeError(f"audio encoder expects log-mel [B, {c.num_mel_bins}, frames], got {list(mel.shape)}")
        if not 0 < mel.shape[2] <= c.max_frames:
            raise LmforgeError(
                f"audio encoder takes 1 to {c.max_frames} mel frames ({c.max_frames / 100:.1f} s), got {mel.shape[2]}"
            )
        x = nn.functional.gelu(self.conv1(mel.to(self.conv1.weight.dtype)))
        x = nn.functional.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.embed_positions.weight[: x.shape[1]]
        for block in self.layers:
            x, _ = block(x, None, None)
        return self.layer_norm(x)


# ----------------------------------------------------------------------------- HF Whisper keys

_KEY_MAP = [
    ("layers.{i}.self_attn_layer_norm.", "layers.{i}.input_layernorm."),
    ("layers.{i}.final_layer_norm.", "layers.{i}.post_attention_layernorm."),
    ("layers.{i}.self_attn.out_proj.", "layers.{i}.self_attn.o_proj."),
    ("layers.{i}.self_attn.", "layers.{i}.self_attn."),
    ("layers.{i}.fc1.", "layers.{i}.mlp.up_proj."),
    ("layers.{i}.fc2.", "layers.{i}.mlp.down_proj."),
    ("conv1.", "conv1."),
    ("conv2.", "conv2."),
    ("embed_positions.", "embed_positions."),
    ("layer_norm.", "layer_norm."),
]
_ENCODER_PREFIXES = ("model.encoder.", "encoder.")


def hf_to_lmforge(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers WhisperEncoder / WhisperModel / WhisperForConditionalGeneration state dict ->
    ours. Decoder keys are dropped; Whisper's missing k_proj biases become zeros."""
    has_prefix = any(k.startswith(_ENCODER_PREFIXES) for k in state)
    out = {}
    for key, value in state.items():
        if has_prefix:
            prefix = next((p for p in _ENCODER_PREFIXES if key.startswith(p)), None)
            if prefix is None:
                continue
            key = key[len(prefix) :]
        new = rename_key(key, to_ours=True, table=_KEY_MAP)
        if new is not None:
            out[new] = value
    for key in [k for k in out if k.endswith("self_attn.k_proj.weight")]:
        bias = key.removesuffix("weight") + "bias"
        out.setdefault(bias, torch.zeros(out[key].shape[0], dtype=out[key].dtype))
    return out


def lmforge_to_hf(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Ours -> a WhisperEncoder state dict (prefix "model.encoder." for a WhisperModel's)."""
    out = {}
    for key, value in state.items():
        if key.endswith("self_attn.k_proj.bias"):
            continue  # Whisper has none; ours is identically zero (see the module docstring)
        new = rename_key(key, to_ours=False, table=_KEY_MAP)
        if new is None:
            raise LmforgeError(f"audio encoder state dict key {key!r} has no Hugging Face Whisper name")
        out[prefix + new] = value
    return out


def load_hf_encoder(folder) -> AudioEncoder:
    """An AudioEncoder from a Hugging Face Whisper folder (config.json + safetensors)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = AudioEncoderConfig.from_hf(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError) as e:
        raise LmforgeError(f"cannot read the Whisper config in {folder}: {e}") from e
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise LmforgeError(f"no *.safetensors weights in {folder}")
    encoder = AudioEncoder(config)
    missing, unexpected = encoder.load_state_dict(hf_to_lmforge(state), strict=False)
    if missing or unexpected:
        raise LmforgeError(
            f"Whisper weights in {folder} do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    return encoder
