"""Train or evaluate video question answering: the VLM reads clips as frames in order.

    lmforge video train --out runs/video-shapes [--set steps=2500]
    lmforge video eval --model runs/video-shapes

Each clip (multimodal/video.py: shapes that move, come and go, or change colour) is sampled to
`num_frames` frames; every frame goes through the image encoder, gets its frame index's learned
temporal embedding, and the frames' features fill one run of image slots in the prompt (frames x
patches tokens). The encoder, projector, temporal embeddings and LM are trained together from
scratch (no downloads), on "which way does the red circle move?"-style questions.

Eval: accuracy per question kind on held-out clips, and the control: the same clips with their
frames shuffled, which keeps what is in them and loses the order, so a model that reads the order
falls to chance (move 1/4, appear 1/3, change 1/2).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch

from lmforge.checkpoint import check_output_dir
from lmforge.common import LmforgeError, atomic_write_json, get_device, get_logger, seed_everything
from lmforge.infer.decode import decode_ids, pad_prompts
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.multimodal import VisionConfig, VisionLanguageModel, VlmConfig, load_multimodal, save_multimodal
from lmforge.multimodal.chat import image_turn, render_ids
from lmforge.multimodal.config import VideoTrainConfig
from lmforge.multimodal.data import to_pixels
from lmforge.multimodal.video import make_motion_clips, shuffle_frames
from lmforge.recipes._common import load_config
from lmforge.recipes._fit import LoopState, run_dir_for, run_fit, warmup_cosine
from lmforge.recipes._multimodal import add_train_eval_arguments, lm_loss, pad_batch, stage_options
from lmforge.tokenizer import load_tokenizer, train_tokenizer
from lmforge.tokenizer.text import end_of_turn_ids
from lmforge.train import build_optimizer

log = get_logger("lmforge.video")
CHANCE = {"move": 0.25, "appear": 1 / 3, "change": 0.5}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_train_eval_arguments(p, None, "a folder written by `lmforge video train`")


def clips_for(cfg: VideoTrainConfig, split: str, n: int, image_size: int):
    seed = cfg.seed if split == "train" else cfg.seed + 10_000  # held-out: a disjoint seed stream
    return make_motion_clips(n, seed, image_size, cfg.num_frames)


def frames_tensor(model: VisionLanguageModel, clips_frames: list[np.ndarray]) -> torch.Tensor:
    """[num_videos, T, 3, H, W] normalised pixels."""
    vc = model.vlm_config.vision
    flat = [f for frames in clips_frames for f in frames]
    pix = to_pixels(flat, vc.image_size, vc.image_mean, vc.image_std)
    return pix.view(len(clips_frames), -1, *pix.shape[1:]).to(next(model.parameters()).device)


def slots(model: VisionLanguageModel, num_frames: int) -> int:
    return num_frames * model.vlm_config.num_image_tokens


def build(cfg: VideoTrainConfig, clips, device) -> tuple[VisionLanguageModel, object]:
    texts = [f"{q} {a}" for c in clips for q, a, _ in c.qa]
    tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    lm = Transformer(ModelConfig.preset(cfg.lm_preset, **{**cfg.lm_overrides, "vocab_size": tokenizer.vocab_size}))
    vision = VisionConfig.from_dict(cfg.vision)
    config = VlmConfig(vision, lm.config, tokenizer.token_to_id("<image>"), pool=cfg.pool, max_frames=cfg.num_frames)
    model = VisionLanguageModel(config, language_model=lm).to(device)
    model.requires_grad_(True)  # everything is fresh: the encoder learns too
    return model, tokenizer


def train(cfg: VideoTrainConfig, out: str, resume: str | None = None) -> dict:
    seed_everything(cfg.seed)
    device = get_device(cfg.device)
    clips = clips_for(cfg, "train", cfg.train_size, cfg.vision.get("image_size", 32))
    model, tokenizer = build(cfg, clips, device)
    n_slots = slots(model, cfg.num_frames)
    rows = [
        render_ids(tokenizer, image_turn(q, a), model.vlm_config.image_token_id, n_slots)
        for c in clips
        for q, a, _ in c.qa
    ]
    owner = [i for i, c in enumerate(clips) for _ in c.qa]
    optim_cfg = warmup_cosine(cfg.lr, cfg.warmup_steps)
    optimizer = build_optimizer(model, optim_cfg)
    rng = np.random.default_rng(cfg.seed + 1)
    model.train()

    def batch(step: int) -> dict:
        pick = rng.choice(len(rows), cfg.batch_size).tolist()
        ids, labels = pad_batch([rows[j] for j in pick], tokenizer.pad_id, device)
        return {"ids": ids, "labels": labels, "frames": frames_tensor(model, [clips[owner[j]].frames for j in pick])}

    def loss_fn(b: dict):
        embeds = model.embed(b["ids"], image_features=model.video_features(b["frames"]))
        return lm_loss(model(inputs_embeds=embeds), b["labels"]), {}

    summary = {"final_loss": None}
    if cfg.steps:
        options = stage_options(cfg.steps, optim_cfg, resume)
        summary = run_fit(
            model, optimizer, loss_fn, batch, run_dir_for(out), options, LoopState(numpy=[rng]), device=device
        )
    model.eval()
    metrics = evaluate(model, tokenizer, cfg)
    metrics.update(
        steps=cfg.steps, final_loss=None if summary["final_loss"] is None else round(summary["final_loss"], 4)
    )
    save_multimodal(model, out, tokenizer, extra={"train_config": vars(cfg), "metrics": metrics})
    return metrics


@torch.no_grad()
def answer(model: VisionLanguageModel, tokenizer, frames: list[np.ndarray], questions: list[str]) -> list[str]:
    """Greedy answers, one question per clip (all prompts padded on the left to one width)."""
    n_slots = slots(model, frames[0].shape[0])
    image_id = model.vlm_config.image_token_id
    rows = [render_ids(tokenizer, image_turn(q), image_id, n_slots, True)[0] for q in questions]
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in pad_prompts(rows, tokenizer.pad_id))
    embeds = model.embed(ids, image_features=model.video_features(frames_tensor(model, frames)))
    eot = end_of_turn_ids(tokenizer)
    out = decode_ids(
        model, SamplingParams(max_new_tokens=6), ids, inputs_embeds=embeds, attention_mask=mask, eos_token_ids=eot
    )
    return [tokenizer.decode([t for t in o if t not in eot]).strip() for o in out]


def evaluate(model: VisionLanguageModel, tokenizer, cfg: VideoTrainConfig, batch: int = 64) -> dict:
    clips = clips_for(cfg, "test", cfg.eval_size, model.vlm_config.vision.image_size)
    qa = [(c.frames, q, a, kind) for c in clips for q, a, kind in c.qa]
    metrics: dict = {"clips": len(clips)}
    rng = np.random.default_rng(cfg.seed)
    for tag, shuffle in (("", False), ("shuffled_", True)):
        hits = defaultdict(list)
        for s in range(0, len(qa), batch):
            chunk = qa[s : s + batch]
            frames = [shuffle_frames(f, rng) if shuffle else f for f, *_ in chunk]
            for (_, _, a, kind), p in zip(chunk, answer(model, tokenizer, frames, [q for _, q, _, _ in chunk])):
                hits[kind].append(p.lower() == a.lower())
                hits["all"].append(p.lower() == a.lower())
        metrics.update({f"{tag}acc_{k}": round(float(np.mean(v)), 4) for k, v in sorted(hits.items())})
    metrics["chance"] = {k: round(v, 4) for k, v in CHANCE.items()}
    return metrics


def main(args: argparse.Namespace) -> int:
    cfg = load_config(VideoTrainConfig, args.config, args.overrides)
    if args.action == "train":
        if not args.out:
            raise LmforgeError("video train needs --out DIR")
        check_output_dir(args.out, [], args.overwrite)
        metrics = train(cfg, args.out, args.resume)
    else:
        if not args.model:
            raise LmforgeError("video eval needs --model DIR")
        model = load_multimodal(args.model, get_device(cfg.device), kind="vlm")
        if not model.vlm_config.max_frames:
            raise LmforgeError(f"{args.model}: this VLM takes images, not videos (max_frames 0)")
        metrics = evaluate(model, load_tokenizer(args.model), cfg)
    print(json.dumps(metrics, indent=2))
    if args.json:
        atomic_write_json(args.json, metrics)
    return 0
