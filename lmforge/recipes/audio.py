"""Train or evaluate an audio-language model: speech in, text out (transcription, spoken commands).

    lmforge audio train --out runs/asr-digits                      # built-in English digit strings
    lmforge audio train --set data=digits-zh --out runs/asr-zh     # Mandarin digit strings
    lmforge audio eval --model runs/asr-digits                     # WER / CER on held-out clips
    lmforge generate --model runs/asr-digits --audio clip.wav      # one clip

The data is synthesised locally by espeak-ng (lmforge/multimodal/speech.py: varied voices, rates,
pitches and noise) or read from a folder with train.jsonl / test.jsonl of {"audio", "text"}.

Stage 1 (`stage1_steps`, for a pretrained encoder + LM: `--set encoder=<HF Whisper folder>
--set lm=<LM folder>`) trains only the projector. Stage 2 (`stage2_steps`) trains projector + LM
(or LoRA adapters on it, `lora_rank`) and the encoder at `encoder_lr` (0: frozen). With no
encoder and no LM given (no downloads here), both are fresh and stage 2 trains everything end to
end on the transcripts: user turn "<audio>\\ntranscribe.", assistant turn the transcript.

Eval: word error rate and character error rate (jiwer) on held-out clips of the same task, and
the same with the audio replaced by noise (the control: a model that reads the audio falls to
near 100% WER).
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from lmforge.checkpoint import check_output_dir, load_model, load_tokenizer_if_any
from lmforge.common import LmforgeError, atomic_write_json, get_device, get_logger, seed_everything
from lmforge.infer.decode import decode_ids
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.multimodal import load_multimodal, save_multimodal
from lmforge.multimodal.alm import AUDIO_TOKEN, AlmConfig, AudioLanguageModel, render_audio
from lmforge.multimodal.config import AudioTrainConfig
from lmforge.multimodal.speech import load_speech
from lmforge.multimodal.whisper import AudioEncoder, AudioEncoderConfig, load_hf_encoder
from lmforge.recipes._common import load_config
from lmforge.recipes._fit import LoopState, run_dir_for, run_fit, warmup_cosine
from lmforge.recipes._multimodal import add_train_eval_arguments, lm_loss, pad_batch, stage_options
from lmforge.tokenizer import load_tokenizer, train_tokenizer
from lmforge.tokenizer.bpe import DEFAULT_SPECIAL_TOKENS
from lmforge.tokenizer.text import end_of_turn_ids

log = get_logger("lmforge.audio")
HAN = r"\p{Han}"  # CJK ideographs, in the Rust regex syntax of the tokenizers library


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_train_eval_arguments(p, None, "an audio-language model folder (lmforge audio train --out)")


def build(cfg: AudioTrainConfig, examples, device) -> tuple[AudioLanguageModel, object]:
    """A new model: the given (or a fresh) encoder and LM, a fresh projector."""
    encoder = load_hf_encoder(cfg.encoder) if cfg.encoder else AudioEncoder(AudioEncoderConfig.from_dict(cfg.audio))
    if cfg.lm:
        lm, tokenizer = load_model(cfg.lm, device=device), load_tokenizer_if_any(cfg.lm)
        if tokenizer is None or tokenizer.token_to_id(AUDIO_TOKEN) is None or not tokenizer.chat_template:
            raise LmforgeError(f"{cfg.lm}: the LM's tokenizer needs an '{AUDIO_TOKEN}' token and a chat template")
    else:
        specials = DEFAULT_SPECIAL_TOKENS + [AUDIO_TOKEN]
        # Each Chinese character stays one token (one syllable of the clip): merged across
        # characters, 三零 would be one token and 三 another, and the target ids of a digit would
        # depend on its neighbours.
        texts = [ex.text for ex in examples] + [cfg.prompt]
        tokenizer = train_tokenizer(texts, cfg.vocab_size, specials, isolate=HAN)
        overrides = {**cfg.lm_overrides, "vocab_size": tokenizer.vocab_size}
        lm = Transformer(ModelConfig.preset(cfg.lm_preset, **overrides))
    longest = max(ex.wave.numel() for ex in examples) / 16000
    clip_seconds = cfg.clip_seconds or min(math.ceil(longest * 2) / 2, encoder.config.max_frames / 100)
    config = AlmConfig(
        encoder.config, lm.config, tokenizer.token_to_id(AUDIO_TOKEN), cfg.stack, clip_seconds, cfg.prompt
    )
    return AudioLanguageModel(config, encoder, lm).to(device), tokenizer


def stage_optimizer(model: AudioLanguageModel, stage: int, cfg: AudioTrainConfig) -> torch.optim.AdamW:
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    model.language_model.requires_grad_(stage == 2 and not cfg.lora_rank)
    if stage == 2 and cfg.lora_rank:
        from lmforge import peft

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
        peft.apply(
            model.language_model, peft.LoraConfig(r=cfg.lora_rank, alpha=2 * cfg.lora_rank, target_modules=targets)
        )
    model.encoder.requires_grad_(stage == 2 and cfg.encoder_lr > 0)
    model.encoder.embed_positions.requires_grad_(False)
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]
    groups = [
        {"params": trainable(model.projector) + trainable(model.language_model), "base_lr": cfg.lr},
        {"params": trainable(model.encoder), "base_lr": cfg.encoder_lr},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay
    )


def fit(model: AudioLanguageModel, tokenizer, examples, mels: torch.Tensor, stage: int, cfg, device, run_dir, resume):
    steps = cfg.stage1_steps if stage == 1 else cfg.stage2_steps
    if steps == 0:
        return float("nan")
    optimizer = stage_optimizer(model, stage, cfg)
    rows = [render_audio(tokenizer, model.alm_config, cfg.prompt, ex.text) for ex in examples]
    rng = np.random.default_rng(cfg.seed + stage)
    model.train()

    def batch(step: int) -> dict:
        index = rng.choice(len(examples), cfg.batch_size).tolist()
        ids, labels = pad_batch([rows[i] for i in index], tokenizer.pad_id, device)
        return {"ids": ids, "labels": labels, "mel": mels[index].to(device)}

    def loss_fn(b: dict):
        return lm_loss(model(inputs_embeds=model.embed(b["ids"], b["mel"])), b["labels"]), {}

    run = None if run_dir is None else run_dir / f"stage{stage}"
    options = stage_options(steps, warmup_cosine(cfg.lr, cfg.warmup_steps), resume)
    summary = run_fit(model, optimizer, loss_fn, batch, run, options, LoopState(numpy=[rng]), device=device)
    if stage == 2 and cfg.lora_rank:
        from lmforge import peft

        peft.merge_and_unload(model.language_model)
    return summary["final_loss"] if summary["final_loss"] is not None else float("nan")


@torch.no_grad()
def transcribe(
    model: AudioLanguageModel, tokenizer, waves: list[torch.Tensor], prompt: str, max_new: int = 24
) -> list[str]:
    """Greedy transcripts of 16 kHz clips (one batch: every prompt has the same length)."""
    device = next(model.parameters()).device
    ids, _ = render_audio(tokenizer, model.alm_config, prompt)
    input_ids = torch.tensor([ids] * len(waves), device=device)
    embeds = model.embed(input_ids, model.mel(waves).to(device))
    eot = end_of_turn_ids(tokenizer)
    out = decode_ids(model, SamplingParams(max_new_tokens=max_new), input_ids, inputs_embeds=embeds, eos_token_ids=eot)
    return [tokenizer.decode([t for t in o if t not in eot]).strip() for o in out]


def error_rates(hypotheses: list[str], references: list[str]) -> dict:
    """WER and CER (jiwer). CER ignores spaces, so it scores Chinese (written unspaced) fairly."""
    try:
        import jiwer
    except ImportError as e:
        raise LmforgeError("audio eval needs jiwer: pip install 'lmforge[audio]'") from e
    squash = lambda texts: [t.replace(" ", "") or "-" for t in texts]
    return {
        "wer": round(float(jiwer.wer(references, [h or "-" for h in hypotheses])), 4),
        "cer": round(float(jiwer.cer(squash(references), squash(hypotheses))), 4),
    }


def evaluate(model: AudioLanguageModel, tokenizer, cfg: AudioTrainConfig, batch: int = 64) -> dict:
    test = load_speech(cfg.data, "test", cfg.eval_size, cfg.seed)
    refs = [ex.text for ex in test]
    metrics: dict = {"data": cfg.data, "clips": len(test)}
    for tag, noise in (("", False), ("noise_", True)):
        rng = np.random.default_rng(cfg.seed)
        hyps = []
        for s in range(0, len(test), batch):
            waves = [ex.wave for ex in test[s : s + batch]]
            if noise:  # the control: the same prompts, each clip replaced by noise of its power
                waves = [torch.from_numpy(rng.standard_normal(w.numel()).astype(np.float32)) * w.std() for w in waves]
            hyps += transcribe(model, tokenizer, waves, cfg.prompt, cfg.max_new_tokens)
        metrics.update({f"{tag}{k}": v for k, v in error_rates(hyps, refs).items()})
        if not noise:
            metrics["example"] = f"{hyps[0]!r} (ref {refs[0]!r})"
    return metrics


def train(cfg: AudioTrainConfig, out: str, resume: str | None = None) -> dict:
    seed_everything(cfg.seed)
    device = get_device(cfg.device)
    log.info("synthesising %d training clips (%s)", cfg.train_size, cfg.data)
    examples = load_speech(cfg.data, "train", cfg.train_size, cfg.seed)
    model, tokenizer = build(cfg, examples, device)
    mels = model.mel([ex.wave for ex in examples])  # the clips are fixed: their log-mels are computed once
    run_dir = run_dir_for(out)
    losses = {
        f"stage{s}_loss": round(fit(model, tokenizer, examples, mels, s, cfg, device, run_dir, resume), 4)
        for s in (1, 2)
    }
    model.eval()
    metrics = {**evaluate(model, tokenizer, cfg), **losses, "clip_seconds": model.alm_config.clip_seconds}
    save_multimodal(model, out, tokenizer, extra={"train_config": vars(cfg), "metrics": metrics})
    return metrics


def main(args: argparse.Namespace) -> int:
    cfg = load_config(AudioTrainConfig, args.config, args.overrides)
    if args.action == "train":
        if not args.out:
            raise LmforgeError("audio train needs --out DIR")
        check_output_dir(args.out, [cfg.encoder, cfg.lm], args.overwrite)
        metrics = train(cfg, args.out, args.resume)
    else:
        if not args.model:
            raise LmforgeError("audio eval needs --model DIR")
        model = load_multimodal(args.model, get_device(cfg.device), kind="alm")
        metrics = evaluate(model, load_tokenizer(args.model), cfg)
    print(json.dumps(metrics, indent=2, ensure_ascii=False))
    if args.json:
        atomic_write_json(args.json, metrics)
    return 0
