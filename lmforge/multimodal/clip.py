"""CLIP: a ViT image encoder and an lmforge text encoder projected into one space, trained with a
symmetric InfoNCE loss and a learnable temperature (Radford et al. 2021).

    image [B, 3, H, W] -> ViT pooled [B, Dv] -> visual_projection -> l2-normalise  \\
                                                                                     cosine * exp(logit_scale)
    ids [B, T] (ending in EOS) -> Transformer hidden at the EOS -> text_projection /
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model import ModelConfig, Transformer

from .vit import VisionConfig, VisionTransformer


@dataclass
class ClipConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: ModelConfig = field(default_factory=lambda: ModelConfig.preset("tiny"))
    projection_dim: int = 64
    logit_scale_init: float = math.log(1 / 0.07)

    def to_dict(self) -> dict:
        return {
            "vision": self.vision.to_dict(),
            "text": self.text.to_dict(),
            "projection_dim": self.projection_dim,
            "logit_scale_init": self.logit_scale_init,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ClipConfig:
        return cls(
            VisionConfig.from_dict(d["vision"]),
            ModelConfig.from_dict(d["text"]),
            d["projection_dim"],
            d.get("logit_scale_init", math.log(1 / 0.07)),
        )


class CLIP(nn.Module):
    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        self.vision = VisionTransformer(config.vision)
        self.text = Transformer(config.text)
        self.visual_projection = nn.Linear(config.vision.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """-> unit vectors [B, P]."""
        _, pooled = self.vision(pixel_values)
        return F.normalize(self.visual_projection(pooled), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Right-padded ids [B, T] whose last real token is EOS -> unit vectors [B, P].
        The causal text encoder has read the whole caption by its EOS, so that state is the summary."""
        _, hidden = self.text(input_ids, attention_mask=attention_mask, logits_to_keep=1, return_hidden=True)
        last = attention_mask.long().sum(dim=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return F.normalize(self.text_projection(pooled), dim=-1)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """-> logits_per_image [B_img, B_txt] = exp(logit_scale) * cosine similarity."""
        img, txt = self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)
        # CLIP clamps the temperature so logits never exceed 100 (training stability).
        return self.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T

    def freeze(self, vision: bool = False, text: bool = False) -> None:
        """Frozen-encoder training (LiT: lock the image tower, tune the text side)."""
        for module, frozen in ((self.vision, vision), (self.text, text)):
            for p in module.parameters():
                p.requires_grad_(not frozen)


def info_nce(logits_per_image: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropies. Row i's positive
    is column targets[i] (default i). With duplicate captions in a batch pass soft targets
    instead: a [B, B] matrix whose rows sum to 1. Logits [B, B + K] carry K extra texts that are
    negatives only (NegCLIP's perturbed captions): they enter image->text, and text->image runs
    over the first B columns; soft targets are then [B, B + K] (a match there counts as one)."""
    n = logits_per_image.shape[0]
    if targets is None:
        targets = torch.arange(n, device=logits_per_image.device)
    if targets.dim() == 1:
        targets = F.one_hot(targets, logits_per_image.shape[1]).to(logits_per_image.dtype)
    i2t = targets / targets.sum(1, keepdim=True)
    t2i = targets[:, :n].T / targets[:, :n].T.sum(1, keepdim=True)
    loss_i2t = -(i2t * logits_per_image.log_softmax(dim=1)).sum(1).mean()
    loss_t2i = -(t2i * logits_per_image[:, :n].T.log_softmax(dim=1)).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def same_text_targets(texts: list[str], columns: list[str] | None = None) -> torch.Tensor:
    """Soft targets for a batch that may hold the same caption twice: equal texts share the mass,
    so the loss does not push apart two images that truly match both captions. `columns`: the
    texts of the logits' columns when they differ from the rows' (extra negative captions)."""
    same = torch.tensor([[a == b for b in (columns or texts)] for a in texts], dtype=torch.float32)
    return same / same.sum(dim=1, keepdim=True)
