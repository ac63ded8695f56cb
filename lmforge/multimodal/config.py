"""Settings of the `clip` and `vlm` recipes (YAML under lmforge/configs/, loaded by `config.load_config`,
every field overridable with `--set field=value`). Their training runs through `train.fit`
(recipes/_fit.py) with train/optim.py's optimizer and schedule."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.common import DEVICE_PATTERN, checked


def small_lm(layers: int, max_positions: int) -> dict:
    """The multimodal recipes' fresh-LM overrides of the `tiny` preset: width 128, GQA 4/2."""
    return {
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_positions,
    }


@dataclass
class ClipTrainConfig:
    data: str = "shapes"  # shapes | shapes1 | digits | path/to/data.jsonl
    train_size: int = checked(4000, ge=1)  # generated sets only
    eval_size: int = checked(500, ge=1)
    vision: dict = field(
        default_factory=lambda: {
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
        }
    )
    text_preset: str = "tiny"
    text: dict = field(default_factory=lambda: {"max_position_embeddings": 64})
    projection_dim: int = checked(64, ge=1)
    vocab_size: int = checked(400, ge=1)
    init_vision: str | None = None  # a Hugging Face CLIP vision folder to start from
    freeze_vision: bool = False  # LiT: keep the (pretrained) image tower fixed
    hard_negatives: bool = False  # half of each batch: near-miss captions of the other half
    text_negatives: int = checked(0, ge=0)  # per image, captions with one word swapped, as extra negatives
    steps: int = checked(600, ge=1)
    batch_size: int = checked(64, ge=1)
    lr: float = checked(1e-3, gt=0)
    weight_decay: float = checked(0.1, ge=0)
    warmup_steps: int = checked(50, ge=0)
    seed: int = checked(0, ge=0)
    device: str = checked("auto", pattern=DEVICE_PATTERN)


@dataclass
class VlmTrainConfig:
    data: str = "shapes"
    train_size: int = checked(6000, ge=1)
    eval_size: int = checked(300, ge=1)
    vision: str = ""  # a CLIP run folder (lmforge clip train --out) or a HF CLIP vision folder
    lm: str | None = None  # an lmforge/HF language model folder; None: a fresh `lm_preset` model
    lm_preset: str = "tiny"
    lm_overrides: dict = field(default_factory=lambda: small_lm(4, 256))
    vocab_size: int = checked(400, ge=1)
    text_warmup_steps: int = checked(300, ge=0)  # fresh LM only: text-only steps on the captions/answers first
    feature_layer: int = -2
    pool: int = checked(2, ge=1)  # 2x2 average pooling of the patch grid: 4x fewer image tokens in the LM
    # "cls_patch": the class token too, first (LLaVA's option)
    select_feature: str = checked("patch", choices=("patch", "cls_patch"))
    stage1_steps: int = checked(300, ge=0)  # projector only, captions
    stage2_steps: int = checked(600, ge=0)  # projector + LM (or LoRA), questions and captions
    lora_rank: int = checked(0, ge=0)  # > 0: stage 2 trains LoRA adapters (merged before saving), not the full LM
    batch_size: int = checked(32, ge=1)
    lr: float = checked(1e-3, gt=0)
    lm_lr: float = checked(5e-4, gt=0)
    vision_lr: float = checked(0.0, ge=0)  # > 0: stage 2 also fine-tunes the image encoder at this LR (0: frozen)
    existence_share: float = checked(0.0, ge=0, lt=1)  # stage 2: POPE-style yes/no object questions, this share
    weight_decay: float = checked(0.0, ge=0)
    warmup_steps: int = checked(30, ge=0)
    max_new_tokens: int = checked(32, ge=1)
    seed: int = checked(0, ge=0)
    device: str = checked("auto", pattern=DEVICE_PATTERN)


@dataclass
class AudioTrainConfig:
    """`lmforge audio train|eval`: an audio-language model (Whisper-style encoder -> projector -> LM)."""

    data: str = "digits-en"  # digits-en | commands-en | mixed-en | digits-zh | a folder with train/test.jsonl
    train_size: int = checked(6000, ge=1)
    eval_size: int = checked(200, ge=1)
    encoder: str | None = None  # a Hugging Face Whisper folder to start from; None: a fresh encoder
    audio: dict = field(
        default_factory=lambda: {
            # The size the README's Audio figures were measured with (6,000 clips, 3,000 steps).
            "num_mel_bins": 80,
            "d_model": 96,
            "encoder_layers": 2,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 256,
            "max_source_positions": 300,
        }
    )
    lm: str | None = None  # an lmforge/HF LM folder whose tokenizer has an <audio> token; None: a fresh one
    lm_preset: str = "tiny"
    lm_overrides: dict = field(default_factory=lambda: small_lm(3, 128))
    vocab_size: int = checked(320, ge=1)
    stack: int = checked(4, ge=1)  # encoder vectors per audio token (80 ms)
    clip_seconds: float = checked(0.0, ge=0)  # 0: the longest training clip, rounded up to 0.5 s
    stage1_steps: int = checked(0, ge=0)  # projector only (encoder and LM frozen): for a pretrained encoder + LM
    stage2_steps: int = checked(3000, ge=0)  # projector + LM (or LoRA) + the encoder unless encoder_lr = 0
    lora_rank: int = checked(0, ge=0)  # > 0: stage 2 trains LoRA adapters on the LM (merged before saving)
    batch_size: int = checked(16, ge=1)
    lr: float = checked(2e-3, gt=0)
    encoder_lr: float = checked(2e-3, ge=0)  # 0: keep the encoder frozen in stage 2
    weight_decay: float = checked(0.0, ge=0)
    warmup_steps: int = checked(100, ge=0)
    max_new_tokens: int = checked(24, ge=1)
    prompt: str = "transcribe."
    seed: int = checked(0, ge=0)
    device: str = checked("auto", pattern=DEVICE_PATTERN)


@dataclass
class VideoTrainConfig:
    """`lmforge video train|eval`: the VLM on generated clips of shapes in motion (multimodal/video.py)."""

    train_size: int = checked(3000, ge=1)
    eval_size: int = checked(300, ge=1)
    num_frames: int = checked(6, ge=2)
    vision: dict = field(
        default_factory=lambda: {
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 96,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        }
    )
    lm_preset: str = "tiny"
    lm_overrides: dict = field(default_factory=lambda: small_lm(3, 160))
    vocab_size: int = checked(320, ge=1)
    pool: int = checked(1, ge=1)  # average-pool each frame's patch grid (token budget: frames x patches / pool^2)
    steps: int = checked(2500, ge=0)  # measured: 1,500 left 'appears first/last' at 0.64 on half-and-half colour clips
    batch_size: int = checked(32, ge=1)
    lr: float = checked(1e-3, gt=0)
    warmup_steps: int = checked(100, ge=0)
    seed: int = checked(0, ge=0)
    device: str = checked("auto", pattern=DEVICE_PATTERN)
