"""An audio-language model: Whisper-style encoder -> frame stacking -> MLP projector -> the lmforge LM.

    prompt ids  [<audio> x N, ...prompt..., ...answer...]   (one <audio> placeholder expanded to N)
    embeddings  embed_tokens(ids), the N audio-token rows overwritten (spliced) with
                projector(stack(encoder(log_mel(wave))))

Every clip is padded (or cut) to `clip_seconds`, so each takes the same N slots: 100 mel frames a
second, halved by the encoder's strided conv, then `stack` neighbouring vectors concatenated into
one token (Qwen-Audio and SALMONN shorten the sequence the same way), N = frames / 2 / stack.
With the default 4 s and stack 4 that is 50 tokens, one per 80 ms. The LM's forward signature is
kept (plus `mel`), so training, the KV cache and lmforge.infer.decode work unchanged: generation
prefills `embed(...)` as `inputs_embeds`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from lmforge.common import LmforgeError
from lmforge.model import ModelConfig, Transformer

from .audio import HOP_LENGTH, SAMPLE_RATE, log_mel, pad_or_trim
from .vlm import Projector, expand_image_tokens, splice
from .whisper import AudioEncoder, AudioEncoderConfig

AUDIO_TOKEN = "<audio>"


@dataclass
class AlmConfig:
    audio: AudioEncoderConfig
    text: ModelConfig
    audio_token_id: int
    stack: int = 4  # encoder vectors concatenated per audio token
    clip_seconds: float = 4.0
    prompt: str = "transcribe."  # what the user turn says after <audio> to ask for a transcript

    def __post_init__(self) -> None:
        if self.stack < 1:
            raise LmforgeError(f"alm config: stack must be >= 1, got {self.stack}")
        if self.num_frames > self.audio.max_frames:
            raise LmforgeError(
                f"alm config: clip_seconds {self.clip_seconds} needs {self.num_frames} mel frames, over the "
                f"encoder's {self.audio.max_frames} (max_source_positions {self.audio.max_source_positions})"
            )

    @property
    def num_samples(self) -> int:
        return int(round(self.clip_seconds * SAMPLE_RATE))

    @property
    def num_frames(self) -> int:
        return self.num_samples // HOP_LENGTH

    @property
    def num_audio_tokens(self) -> int:
        return math.ceil(math.ceil(self.num_frames / 2) / self.stack)

    def to_dict(self) -> dict:
        return {
            "audio": self.audio.to_dict(),
            "text": self.text.to_dict(),
            "audio_token_id": self.audio_token_id,
            "stack": self.stack,
            "clip_seconds": self.clip_seconds,
            "prompt": self.prompt,
        }

    @classmethod
    def from_dict(cls, d: dict) -> AlmConfig:
        return cls(
            AudioEncoderConfig.from_dict(d["audio"]),
            ModelConfig.from_dict(d["text"]),
            d["audio_token_id"],
            d.get("stack", 4),
            d.get("clip_seconds", 4.0),
            d.get("prompt", "transcribe."),
        )


class AudioLanguageModel(nn.Module):
    def __init__(
        self, config: AlmConfig, encoder: AudioEncoder | None = None, language_model: Transformer | None = None
    ):
        super().__init__()
        self.alm_config = config
        self.encoder = encoder or AudioEncoder(config.audio)
        self.language_model = language_model or Transformer(config.text)
        self.projector = Projector(config.audio.d_model * config.stack, config.text.hidden_size)

    @property
    def config(self) -> ModelConfig:
        """The LM's config, so LM tooling (KVCache.for_model, generation) works unchanged."""
        return self.language_model.config

    def mel(self, waves: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """16 kHz waveforms (a list of [T] or [B, T]) -> log-mel [B, n_mels, frames], each clip
        padded or cut to clip_seconds."""
        c = self.alm_config
        if isinstance(waves, torch.Tensor) and waves.dim() == 1:
            waves = [waves]
        if isinstance(waves, list):
            waves = torch.stack([pad_or_trim(w.float().flatten(), c.num_samples) for w in waves])
        return log_mel(waves, c.audio.num_mel_bins, num_samples=c.num_samples)

    def audio_features(self, mel: torch.Tensor) -> torch.Tensor:
        """[B, n_mels, frames] -> projected features [B, N, D_lm], ready to splice."""
        hidden = self.encoder(mel.to(self.projector.fc1.weight.device))  # [B, P, Da]
        b, p, d = hidden.shape
        s = self.alm_config.stack
        hidden = nn.functional.pad(hidden, (0, 0, 0, (-p) % s))  # a whole number of stacks
        return self.projector(hidden.reshape(b, -1, s * d))

    def embed(
        self, input_ids: torch.Tensor, mel: torch.Tensor | None = None, audio_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        embeds = self.language_model.model.embed_tokens(input_ids)
        if audio_features is None and mel is not None:
            audio_features = self.audio_features(mel)
        if audio_features is None:
            if bool((input_ids == self.alm_config.audio_token_id).any()):
                raise LmforgeError("the prompt has <audio> placeholders but no audio was given")
            return embeds
        return splice(embeds, input_ids, audio_features, self.alm_config.audio_token_id, what="audio")

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        mel: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        **lm_kwargs,
    ):
        """The LM's forward (same keyword arguments, same outputs) with audio spliced in."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, mel)
        return self.language_model(inputs_embeds=inputs_embeds, **lm_kwargs)


def render_audio(tokenizer, config: AlmConfig, prompt: str, answer: str | None = None) -> tuple[list[int], list[int]]:
    """The chat-template ids and assistant loss mask of one clip + prompt (+ the answer when
    training): user turn "<audio>\n{prompt}", the placeholder expanded to its audio slots. Without
    an answer the template's generation prompt ends the ids."""
    messages = [{"role": "user", "content": f"{AUDIO_TOKEN}\n{prompt}"}]
    messages += [{"role": "assistant", "content": answer}] if answer is not None else []
    ids, mask = tokenizer.render_chat(messages, add_generation_prompt=answer is None)
    return expand_image_tokens(ids, mask, config.audio_token_id, config.num_audio_tokens)
