"""A tiny random vision-language model folder (tokenizer with <image> and a chat template), for tests
of the VLM's generation and serving."""

from pathlib import Path

import torch

from lmforge.model import ModelConfig
from lmforge.multimodal import VisionConfig, VisionLanguageModel, VlmConfig, save_multimodal
from lmforge.tokenizer import train_tokenizer


def save_tiny_vlm(folder: Path) -> Path:
    torch.manual_seed(0)
    tok = train_tokenizer(["what colour is the circle? red blue green a square left of"] * 8, vocab_size=300)
    text = ModelConfig.preset(
        "tiny",
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
    )
    vision = VisionConfig(
        image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = VisionLanguageModel(VlmConfig(vision, text, tok.token_to_id("<image>"), pool=2)).eval()
    with torch.no_grad():  # a projector with weight, so the image visibly changes the answer
        for p in model.projector.parameters():
            p.normal_(0, 1.0)
    return save_multimodal(model, folder, tok)
