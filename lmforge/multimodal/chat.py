"""Conversations with images -> model inputs, for training, the CLI and the server.

Messages follow the OpenAI chat format; an image is a content part:

    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}   (OpenAI)
    {"type": "image", "image": <path | PIL image | array | data URL>}

Each becomes the template's {"type": "image"} part (rendered as "<image>"), expanded to the
vision encoder's number of patch tokens, and its pixels are returned alongside the ids.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmforge.common import LmforgeError

from .data import load_image, to_pixels
from .vlm import VisionLanguageModel, expand_image_tokens


def _image_source(part: dict, where: str) -> Any:
    if part.get("type") == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise LmforgeError(f"{where}: image_url part needs {{'url': 'data:image/...;base64,...'}}")
        if url.startswith(("http://", "https://")):
            raise LmforgeError(f"{where}: remote image URLs are not fetched; send a base64 data URL")
        return url
    if "image" not in part:
        raise LmforgeError(f"{where}: image part has no 'image' field")
    return part["image"]


def split_images(messages: list[dict]) -> tuple[list[dict], list[np.ndarray]]:
    """(messages with image parts replaced by template {"type": "image"} parts, images in order)."""
    out, images = [], []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                where = f"message {i} part {j}"
                source = _image_source(part, where)
                try:
                    images.append(load_image(source))
                except LmforgeError as e:
                    raise LmforgeError(f"{where}: {e}") from None
                parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append({**message, "content": parts})
    return out, images


def render_ids(
    tokenizer, messages: list[dict], image_token_id: int, num_image_tokens: int, add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Chat-template ids and assistant loss mask, each <image> expanded to its feature slots."""
    ids, mask = tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
    return expand_image_tokens(ids, mask, image_token_id, num_image_tokens)


def image_turn(question: str, answer: str | None = None) -> list[dict]:
    """The training/eval conversation for one image: user = <image> + question, assistant = answer."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n" + question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def pixels_for(model: VisionLanguageModel, images: list[np.ndarray]) -> torch.Tensor:
    vc = model.vlm_config.vision
    device = next(model.parameters()).device
    return to_pixels(images, vc.image_size, vc.image_mean, vc.image_std).to(device)


@torch.no_grad()
def prepare_chat(
    model: VisionLanguageModel, tokenizer, messages: list[dict], add_generation_prompt: bool = True
) -> dict[str, torch.Tensor | None]:
    """OpenAI-style messages (images as parts) -> {"input_ids" [1, T], "pixel_values"
    [n, 3, H, W] | None, "inputs_embeds" [1, T, D]}: ready for lmforge.infer.decode (inputs_embeds
    with input_ids) or for an engine that accepts prompt embeddings."""
    messages, images = split_images(messages)
    cfg = model.vlm_config
    ids, _ = render_ids(tokenizer, messages, cfg.image_token_id, cfg.num_image_tokens, add_generation_prompt)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    pixel_values = pixels_for(model, images) if images else None
    return {"input_ids": input_ids, "pixel_values": pixel_values, "inputs_embeds": model.embed(input_ids, pixel_values)}


def image_question(image: Any, prompt: str, system: str | None = None) -> list[dict]:
    """One image + one question as chat messages (what `lmforge generate --image` asks)."""
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "\n" + prompt}]}
    ]
