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


def tiny_text_config(vocab_size: int, max_positions: int = 128) -> ModelConfig:
    """A one-layer, 32-wide LM config: the language side of the tiny multimodal test models."""
    return ModelConfig.preset(
        "tiny",
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_positions,
    )


def tiny_alm(tokenizer, clip_seconds: float = 1.0):
    """A random audio-language model (1-layer encoder and LM, width 32) for the tokenizer's <audio>."""
    from lmforge.multimodal.alm import AlmConfig, AudioLanguageModel
    from lmforge.multimodal.whisper import AudioEncoderConfig

    audio = AudioEncoderConfig(
        d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, max_source_positions=100
    )
    text = tiny_text_config(tokenizer.vocab_size)
    return AudioLanguageModel(AlmConfig(audio, text, tokenizer.token_to_id("<audio>"), clip_seconds=clip_seconds))
