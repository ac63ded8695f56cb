"""CLIP: train an image encoder and a text encoder into one embedding space, or evaluate one.

    lmforge clip train --config clip-shapes --out runs/clip-shapes [--set steps=300]
    lmforge clip eval --model runs/clip-shapes [--data shapes]
    lmforge clip filter --model runs/clip-shapes --data pairs.jsonl --filtered clean.jsonl [--threshold auto]

Evaluation: zero-shot classification (single-shape images against colour+shape prompts, or the
digits against "a handwritten digit three"...) and image<->text retrieval recall@1/5, on a
held-out split; CLIPScore of the held-out captions; and the CLIP filter's precision/recall/F1 at
finding the 20% of held-out captions swapped for another image's (Otsu's threshold, no labels).

Filter: CLIP-score filtering of a JSONL of image-caption pairs (multimodal/filtering.py): pairs
below the threshold are dropped and listed with their scores; unreadable lines are reported.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.checkpoint import check_output_dir
from lmforge.common import (
    LmforgeError,
    atomic_write_json,
    atomic_write_text,
    get_device,
    get_logger,
    read_json,
    seed_everything,
)
from lmforge.model import ModelConfig
from lmforge.multimodal import (
    CLIP,
    ClipConfig,
    VisionConfig,
    class_names,
    info_nce,
    load_examples,
    load_hf_vision,
    load_image,
    load_multimodal,
    recall_at_k,
    same_text_targets,
    save_multimodal,
    to_pixels,
    zero_shot_accuracy,
)
from lmforge.multimodal.config import ClipTrainConfig
from lmforge.multimodal.data import DIGIT_TEMPLATES, digit_class_names
from lmforge.multimodal.filtering import (
    clip_score_metric,
    clip_scores,
    detection_f1,
    encode_texts,
    mismatch_captions,
    otsu_threshold,
)
from lmforge.multimodal.shapes import SIZES
from lmforge.recipes._common import add_config_arguments, load_config
from lmforge.recipes._fit import FitOptions, LoopState, add_resume_argument, run_dir_for, run_fit, warmup_cosine
from lmforge.tokenizer import load_tokenizer, train_tokenizer
from lmforge.train import build_optimizer

log = get_logger("lmforge.clip")
MISMATCH_FRACTION = 0.2  # eval: the share of held-out captions swapped for another image's (filter F1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["train", "eval", "filter"])
    add_config_arguments(p, "clip-shapes")
    p.add_argument("--out", help="train: output folder")
    p.add_argument("--overwrite", action="store_true", help="train: replace --out even if lmforge did not write it")
    p.add_argument("--model", help="eval: a CLIP folder written by `lmforge clip train`")
    p.add_argument(
        "--data",
        help="eval: shapes | digits | a JSONL (default: what the model was trained on); "
        'filter: the JSONL of {"image": file, "caption": text} pairs to clean',
    )
    p.add_argument("--filtered", help="filter: write the kept JSONL lines here (unchanged, in order)")
    p.add_argument(
        "--threshold",
        default="auto",
        help="filter: drop pairs whose CLIP cosine is below this; 'auto' (default) = Otsu's cut of the scores",
    )
    p.add_argument("--json", help="write the metrics to this JSON file")
    add_resume_argument(p)  # train: checkpoints and metrics.jsonl are in <out>.train/


# ----------------------------------------------------------------------------- batches


def pixels(model: CLIP, images: list[np.ndarray], device) -> torch.Tensor:
    vc = model.config.vision
    return to_pixels(images, vc.image_size, vc.image_mean, vc.image_std).to(device)


def hard_negative_indices(captions: list[str], batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Half random anchors, half each anchor's nearest different caption by word overlap
    ("a red circle" next to "a blue circle"): the contrast the model must learn to resolve."""
    vocab = {w: i for i, w in enumerate(sorted({w for c in captions for w in c.split()}))}
    bow = np.zeros((len(captions), len(vocab)), dtype=np.float32)
    for i, c in enumerate(captions):
        for w in c.split():
            bow[i, vocab[w]] += 1
    bow /= np.linalg.norm(bow, axis=1, keepdims=True)  # cosine: longer captions are no nearer
    anchors = rng.choice(len(captions), batch_size - batch_size // 2, replace=False)
    overlap = bow[anchors] @ bow.T  # [A, N]
    caps = np.array(captions)
    overlap[caps[anchors][:, None] == caps[None, :]] = -1  # never the same caption
    overlap += rng.random(overlap.shape) * 1e-3  # break ties at random
    return np.concatenate([anchors, overlap.argmax(axis=1)])[:batch_size]


def near_miss_captions(
    captions: list[str], corpus: dict[int, list[list[str]]], k: int, rng: np.random.Generator
) -> list[str]:
    """k negatives per caption, each with one word swapped for the word a random same-length
    caption of `corpus` (captions by word count) has there: "a small red circle" -> "a small red
    square". Text-only negatives (NegCLIP, Yuksekgonul et al. 2023) that differ in one attribute:
    cheap (no extra images) and the image tower must see that attribute to reject them."""
    out = []
    for _ in range(k):
        for caption in captions:
            words = caption.split()
            same_length = corpus.get(len(words), [])
            for _ in range(8):  # a partner that differs somewhere; give up on unique captions
                other = same_length[int(rng.integers(len(same_length)))] if same_length else words
                diff = [i for i, (a, b) in enumerate(zip(words, other)) if a != b]
                if diff:
                    i = diff[int(rng.integers(len(diff)))]
                    words = words[:i] + [other[i]] + words[i + 1 :]
                    break
            out.append(" ".join(words))
    return out


# ----------------------------------------------------------------------------- train


def build(cfg: ClipTrainConfig, vocab_size: int) -> CLIP:
    text = ModelConfig.preset(cfg.text_preset, **{**cfg.text, "vocab_size": vocab_size})
    vision = VisionConfig.from_dict(cfg.vision)
    model = CLIP(ClipConfig(vision, text, cfg.projection_dim))
    if cfg.init_vision:
        model.vision = load_hf_vision(cfg.init_vision)
        model.visual_projection = torch.nn.Linear(model.vision.config.hidden_size, cfg.projection_dim, bias=False)
        model.config.vision = model.vision.config
    model.freeze(vision=cfg.freeze_vision)
    return model


def train(cfg: ClipTrainConfig, out: str, resume: str | None = None) -> dict:
    seed_everything(cfg.seed)
    device = get_device(cfg.device)
    image_size = VisionConfig.from_dict(cfg.vision).image_size
    examples = load_examples(cfg.data, "train", cfg.train_size, cfg.seed, image_size)
    if not examples:
        raise LmforgeError(f"no training images in {cfg.data!r}")
    texts = [c for ex in examples for c in ex.captions + ex.extra_captions] + prompt_texts(cfg.data)
    tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    model = build(cfg, tokenizer.vocab_size).to(device).train()
    optim_cfg = warmup_cosine(cfg.lr, cfg.warmup_steps, cfg.weight_decay)
    optimizer = build_optimizer(model, optim_cfg)
    rng = np.random.default_rng(cfg.seed)
    flat_caps = [ex.captions[0] for ex in examples]
    pick = lambda texts: texts[int(rng.integers(len(texts)))]
    corpus: dict[int, list[list[str]]] = {}
    for text in {c for ex in examples for c in ex.captions + ex.extra_captions}:
        corpus.setdefault(len(text.split()), []).append(text.split())

    def next_batch(step: int) -> dict:
        idx = (
            hard_negative_indices(flat_caps, cfg.batch_size, rng)
            if cfg.hard_negatives
            else rng.choice(len(examples), cfg.batch_size, replace=False)
        )
        batch = [examples[i] for i in idx]
        caps = [pick(ex.captions + ex.extra_captions) for ex in batch]
        # Positives: the same caption text, or for labelled sets the same class (digits).
        keys = [str(ex.label) if cfg.data == "digits" else c for ex, c in zip(batch, caps)]
        negatives = near_miss_captions(caps, corpus, cfg.text_negatives, rng)
        ids, mask = encode_texts(tokenizer, caps + negatives, device)
        return {
            "pixels": pixels(model, [ex.image for ex in batch], device),
            "ids": ids,
            "mask": mask,
            "targets": same_text_targets(keys, keys + negatives).to(device),
        }

    def loss_fn(b: dict):
        return info_nce(model(b["pixels"], b["ids"], b["mask"]), b["targets"]), {}

    start = time.perf_counter()
    summary = run_fit(
        model,
        optimizer,
        loss_fn,
        next_batch,
        run_dir_for(out),
        FitOptions(cfg.steps, optim_cfg, clip_grad=1.0, save_every=max(1, cfg.steps // 4), resume=resume),
        LoopState(numpy=[rng]),
        device=device,
    )
    loss = summary["final_loss"] if summary["final_loss"] is not None else float("nan")  # nan: resumed when done
    seconds = time.perf_counter() - start
    model.eval()
    metrics = evaluate(model, tokenizer, cfg.data, cfg.eval_size, cfg.seed)
    metrics.update(train_seconds=round(seconds, 1), steps=cfg.steps, final_loss=round(loss, 4))
    save_multimodal(model, out, tokenizer, extra={"train_config": vars(cfg), "metrics": metrics})
    return metrics


# ----------------------------------------------------------------------------- eval


def prompt_texts(data: str) -> list[str]:
    if data == "digits":
        return [t.format(n) for n in digit_class_names() for t in DIGIT_TEMPLATES]
    return [f"a {size} {name}" for name in class_names() for size in SIZES]


@torch.no_grad()
def class_embeddings(model: CLIP, tokenizer, data: str, device) -> torch.Tensor:
    """One unit vector per class: the mean over its prompt templates (prompt ensembling)."""
    if data == "digits":
        groups = [[t.format(n) for t in DIGIT_TEMPLATES] for n in digit_class_names()]
    else:
        groups = [[f"a {size} {name}" for size in SIZES] for name in class_names()]
    flat = [t for g in groups for t in g]
    emb = model.encode_text(*encode_texts(tokenizer, flat, device)).view(len(groups), len(groups[0]), -1)
    return torch.nn.functional.normalize(emb.mean(dim=1), dim=-1)


@torch.no_grad()
def evaluate(model: CLIP, tokenizer, data: str, eval_size: int, seed: int) -> dict:
    device = next(model.parameters()).device
    size = model.config.vision.image_size
    metrics = {"data": data}
    if data in ("shapes", "shapes1", "digits"):
        zs = load_examples("digits" if data == "digits" else "shapes1", "test", eval_size, seed, size)
        img = model.encode_image(pixels(model, [ex.image for ex in zs], device))
        labels = torch.tensor([ex.label for ex in zs], device=device)
        metrics["zero_shot_acc"] = round(
            zero_shot_accuracy(img, class_embeddings(model, tokenizer, data, device), labels), 4
        )
        metrics["zero_shot_classes"] = 10 if data == "digits" else len(class_names())
    examples = load_examples(data, "test", eval_size, seed, size)
    caps = [ex.captions[0] for ex in examples]
    img = model.encode_image(pixels(model, [ex.image for ex in examples], device))
    txt = model.encode_text(*encode_texts(tokenizer, caps, device))
    arr = np.array(caps)
    match = torch.from_numpy(arr[:, None] == arr[None, :]).to(device)  # identical captions both count
    i2t, t2i = recall_at_k(img @ txt.T, match), recall_at_k(txt @ img.T, match)
    noisy, bad = mismatch_captions(caps, MISMATCH_FRACTION, seed)
    scores = clip_scores(model, tokenizer, [ex.image for ex in examples], noisy)
    cut = otsu_threshold(scores)
    filtered = detection_f1((scores < cut).tolist(), bad)
    metrics.update(
        {
            "clip_score": round(
                clip_score_metric(clip_scores(model, tokenizer, [ex.image for ex in examples], caps)), 4
            ),
            "filter_f1": filtered["f1"],
            "filter_precision": filtered["precision"],
            "filter_recall": filtered["recall"],
            "filter_threshold": round(cut, 4),
            "i2t_r1": round(i2t[1], 4),
            "i2t_r5": round(i2t[5], 4),
            "t2i_r1": round(t2i[1], 4),
            "t2i_r5": round(t2i[5], 4),
            "eval_images": len(examples),
        }
    )
    return metrics


def filter_jsonl(model_dir: str, data: str, out: str, threshold: str = "auto") -> dict:
    """Score every {"image", "caption"} line of `data` with the CLIP model; write the lines at or
    above the threshold to `out` (atomically) and report the dropped ones with their scores."""
    try:
        cut = None if threshold == "auto" else float(threshold)
    except ValueError:
        raise LmforgeError(f"--threshold must be 'auto' or a number, got {threshold!r}") from None
    model, tokenizer = load_multimodal(model_dir, get_device("auto"), kind="clip"), load_tokenizer(model_dir)
    path = Path(data)
    if not path.is_file():
        raise LmforgeError(f"pairs file {path} does not exist")
    lines, images, captions, unreadable = [], [], [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            caption = record["caption"] if isinstance(record["caption"], str) else record["caption"][0]
            image = load_image(path.parent / record["image"])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, LmforgeError) as e:
            unreadable.append({"line": n, "error": f"{type(e).__name__}: {e}"})
            continue
        lines.append((n, line))
        images.append(image)
        captions.append(caption)
    if not lines:
        raise LmforgeError(f"{path}: no readable image-caption pairs ({len(unreadable)} unreadable lines)")
    scores = clip_scores(model, tokenizer, images, captions)
    cut = otsu_threshold(scores) if cut is None else cut
    keep = (scores >= cut).tolist()
    atomic_write_text(out, "".join(line + "\n" for (_, line), k in zip(lines, keep) if k))
    dropped = [
        {"line": n, "caption": c, "score": round(float(s), 4)}
        for (n, _), c, s, k in zip(lines, captions, scores, keep)
        if not k
    ]
    for d in dropped:
        log.info("dropped line %d (score %.3f): %s", d["line"], d["score"], d["caption"])
    return {
        "pairs": len(lines),
        "kept": sum(keep),
        "dropped": len(dropped),
        "threshold": round(cut, 4),
        "clip_score_kept": round(clip_score_metric(scores[torch.tensor(keep)]), 4),
        "unreadable": unreadable,
        "dropped_pairs": dropped,
    }


def main(args: argparse.Namespace) -> int:
    if args.action == "train":
        if not args.out:
            raise LmforgeError("clip train needs --out DIR")
        cfg = load_config(ClipTrainConfig, args.config, args.overrides)
        check_output_dir(args.out, [cfg.data, cfg.init_vision], args.overwrite)
        metrics = train(cfg, args.out, args.resume)
    elif args.action == "filter":
        if not (args.model and args.data and args.filtered):
            raise LmforgeError("clip filter needs --model DIR --data PAIRS.jsonl --filtered OUT.jsonl")
        metrics = filter_jsonl(args.model, args.data, args.filtered, args.threshold)
    else:
        if not args.model:
            raise LmforgeError("clip eval needs --model DIR")
        if args.resume:
            raise LmforgeError("--resume applies to `clip train` only")
        model = load_multimodal(args.model, get_device("auto"), kind="clip")
        tokenizer = load_tokenizer(args.model)
        cfg = load_config(ClipTrainConfig, None, args.overrides)
        meta = read_json(Path(args.model) / "config.json")
        data = args.data or meta.get("extra", {}).get("train_config", {}).get("data", "shapes")
        metrics = evaluate(model, tokenizer, data, cfg.eval_size, cfg.seed)
    print(json.dumps(metrics, indent=2))
    if args.json:
        atomic_write_json(args.json, metrics)
    return 0
