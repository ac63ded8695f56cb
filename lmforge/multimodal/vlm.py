"""A LLaVA-style vision-language model: frozen image encoder -> MLP projector -> the lmforge LM.

    prompt ids  [..., <image> x N, ...]     (each <image> placeholder expanded to N tokens)
    embeddings  embed_tokens(ids), then the N image-token rows are overwritten (spliced) with
                projector(vit(image)[:, 1:])   (the patch features; the class token is dropped)
    forward     language_model(inputs_embeds=...) -> logits [B, T, V]

The model keeps the LM's forward signature (plus `pixel_values`), so the KV cache, masks and
position handling are the LM's own. Generation is lmforge.infer.decode's: it prefills the spliced
embeddings (`embed`) into the LM's cache, then decodes ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lmforge.common import LmforgeError
from lmforge.model import ModelConfig, Transformer

from .vit import VisionConfig, VisionTransformer


@dataclass
class VlmConfig:
    vision: VisionConfig
    text: ModelConfig
    image_token_id: int
    feature_layer: int = -1  # which ViT block's output feeds the projector (-2: LLaVA's penultimate)
    pool: int = 1  # average-pool the patch grid by this factor: pool^2 times fewer image tokens
    # LLaVA's mm_vision_select_feature: "patch" drops the class token, "cls_patch" keeps it first
    # (the image's summary: what CLIP's contrastive loss trained, e.g. which shape is left of which).
    select_feature: str = "patch"
    # Video: up to max_frames frames per clip, each a run of image tokens with a learned temporal
    # position added to its features (0: images only). See `video_features`.
    max_frames: int = 0

    def __post_init__(self) -> None:
        grid = self.vision.image_size // self.vision.patch_size
        if self.pool < 1 or grid % self.pool:
            raise LmforgeError(f"vlm config: pool {self.pool} must divide the {grid}x{grid} patch grid")
        if self.select_feature not in ("patch", "cls_patch"):
            raise LmforgeError(
                f"vlm config: select_feature must be 'patch' or 'cls_patch', got {self.select_feature!r}"
            )

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches // self.pool**2 + (self.select_feature == "cls_patch")

    def to_dict(self) -> dict:
        return {
            "vision": self.vision.to_dict(),
            "text": self.text.to_dict(),
            "image_token_id": self.image_token_id,
            "feature_layer": self.feature_layer,
            "pool": self.pool,
            "select_feature": self.select_feature,
            "max_frames": self.max_frames,
        }

    @classmethod
    def from_dict(cls, d: dict) -> VlmConfig:
        return cls(
            VisionConfig.from_dict(d["vision"]),
            ModelConfig.from_dict(d["text"]),
            d["image_token_id"],
            d.get("feature_layer", -1),
            d.get("pool", 1),
            d.get("select_feature", "patch"),
            d.get("max_frames", 0),
        )


class Projector(nn.Module):
    """LLaVA-1.5's mlp2x_gelu: vision width -> LM width."""

    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, text_dim)
        self.fc2 = nn.Linear(text_dim, text_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


def expand_image_tokens(ids: list[int], mask: list[int], image_token_id: int, n: int) -> tuple[list[int], list[int]]:
    """Replace each <image> id by n copies (the slots the image features will fill); the loss
    mask is 0 on them (the model never predicts image tokens)."""
    out_ids, out_mask = [], []
    for i, m in zip(ids, mask):
        if i == image_token_id:
            out_ids += [i] * n
            out_mask += [0] * n
        else:
            out_ids.append(i)
            out_mask.append(m)
    return out_ids, out_mask


def splice(
    embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor, image_token_id: int, what: str = "image"
) -> torch.Tensor:
    """embeds [B, T, D] with the image-token rows replaced, in reading order, by features
    [num_images, N, D] (image k fills the k-th run of N placeholders). Differentiable in both."""
    slots = input_ids == image_token_id
    if int(slots.sum()) != features.shape[0] * features.shape[1]:
        raise LmforgeError(
            f"the prompt has {int(slots.sum())} {what}-token slots but {features.shape[0]} {what}(s) "
            f"x {features.shape[1]} features were given (one <{what}> per {what}, expanded "
            f"to {features.shape[1]} tokens)"
        )
    return embeds.masked_scatter(slots[..., None], features.to(embeds.dtype))


class VisionLanguageModel(nn.Module):
    def __init__(
        self, config: VlmConfig, vision: VisionTransformer | None = None, language_model: Transformer | None = None
    ):
        super().__init__()
        self.vlm_config = config
        self.vision = vision or VisionTransformer(config.vision)
        self.language_model = language_model or Transformer(config.text)
        self.projector = Projector(config.vision.hidden_size, config.text.hidden_size)
        if config.max_frames:
            self.temporal = nn.Embedding(config.max_frames, config.vision.hidden_size)
            nn.init.zeros_(self.temporal.weight)  # starts as "several images"; training learns the order
        # Frozen by default (LLaVA-1.5); a recipe may unfreeze it for stage 2 (`vision_lr`).
        self.vision.requires_grad_(False)

    @property
    def config(self) -> ModelConfig:
        """The LM's config, so LM tooling (KVCache.for_model, generation) works unchanged."""
        return self.language_model.config

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_images, 3, H, W] -> encoder patch features [num_images, N, Dv] (pooled when
        configured). With the encoder frozen they are constant, so a loop may compute them once."""
        c = self.vlm_config
        hidden, _ = self.vision(pixel_values, layer=c.feature_layer)
        patches = hidden[:, 1:]  # [n, N, Dv], row-major over the patch grid
        if c.pool > 1:
            n, N, D = patches.shape
            g = int(N**0.5)
            grid = patches.transpose(1, 2).reshape(n, D, g, g)
            patches = nn.functional.avg_pool2d(grid, c.pool).flatten(2).transpose(1, 2)
        if c.select_feature == "cls_patch":
            patches = torch.cat([hidden[:, :1], patches], dim=1)
        return patches

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_images, 3, H, W] -> projected features [num_images, N, D_lm], ready to splice."""
        return self.projector(self.vision_features(pixel_values))

    def video_features(self, frames: torch.Tensor) -> torch.Tensor:
        """[num_videos, T, 3, H, W] -> projected features [num_videos, T x N, D_lm]: each frame's
        patch features plus its frame index's temporal embedding, frames in order. Spliced like
        images: one <image> placeholder per video, expanded to T x N slots."""
        n, t = frames.shape[:2]
        if not self.vlm_config.max_frames:
            raise LmforgeError("this VLM has no temporal embeddings (max_frames 0): it takes images, not videos")
        if t > self.vlm_config.max_frames:
            raise LmforgeError(
                f"a video of {t} frames is longer than this VLM's max_frames {self.vlm_config.max_frames}"
            )
        feats = self.vision_features(frames.flatten(0, 1))  # [n * T, N, Dv]
        feats = feats.view(n, t, *feats.shape[1:]) + self.temporal.weight[:t, None, :]
        return self.projector(feats.flatten(1, 2))

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds = self.language_model.model.embed_tokens(input_ids)
        if image_features is None and pixel_values is not None:
            image_features = self.image_features(pixel_values)
        if image_features is None:
            if bool((input_ids == self.vlm_config.image_token_id).any()):
                raise LmforgeError("the prompt has <image> placeholders but no image was given")
            return embeds
        return splice(embeds, input_ids, image_features, self.vlm_config.image_token_id)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        **lm_kwargs,
    ):
        """The LM's forward (same keyword arguments, same outputs) with images spliced in."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        return self.language_model(inputs_embeds=inputs_embeds, **lm_kwargs)
