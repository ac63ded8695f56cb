"""Train a LLaVA-style vision-language model in two stages, or evaluate one.

    lmforge vlm train --stage 1 --config vlm-shapes --set vision=runs/clip-shapes --out runs/vlm-s1
    lmforge vlm train --stage 2 --config vlm-shapes --init runs/vlm-s1 --out runs/vlm-s2
    lmforge vlm eval --model runs/vlm-s2 [--noise]

Stage 1 trains only the projector, on captions ("describe the image."), with the image encoder
and the LM frozen. Stage 2 trains projector + LM (full, or LoRA with `--set lora_rank=8`) on the
visual questions plus captions, and the image encoder too with `--set vision_lr=1e-4` (the
frozen encoder's features are computed once; a tuned one encodes every batch). Without `--set lm=DIR` a fresh `lm_preset` model is first
trained text-only on the dataset's conversations (images removed) so stage 1 starts from an
LM that speaks the captions' language, as LLaVA starts from a pretrained LM.

Eval: VQA exact-match accuracy (per question kind), caption BLEU and CIDEr-D, the same with the
images replaced by noise (must fall to the blind baseline), and that blind baseline itself
(the most common training answer to each question).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict

import numpy as np
import torch

from lmforge.checkpoint import check_output_dir, load_model, load_tokenizer_if_any
from lmforge.common import LmforgeError, atomic_write_json, get_device, get_logger, seed_everything
from lmforge.infer.decode import decode_ids, pad_prompts
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.multimodal import (
    VisionLanguageModel,
    VlmConfig,
    bleu,
    cider_d,
    image_turn,
    is_multimodal,
    load_examples,
    load_hf_vision,
    load_multimodal,
    pixels_for,
    render_ids,
    save_multimodal,
)
from lmforge.multimodal.config import VlmTrainConfig
from lmforge.multimodal.metrics import vqa_accuracy
from lmforge.multimodal.pope import SPLITS as POPE_SPLITS
from lmforge.multimodal.pope import pope_questions, pope_scores, shape_objects
from lmforge.recipes._common import add_config_arguments, load_config
from lmforge.recipes._fit import LoopState, add_resume_argument, run_dir_for, run_fit, warmup_cosine
from lmforge.recipes._multimodal import lm_loss, pad_batch, stage_options
from lmforge.tokenizer import load_tokenizer, train_tokenizer
from lmforge.tokenizer.text import end_of_turn_ids
from lmforge.train import build_optimizer

log = get_logger("lmforge.vlm")
CAPTION_PROMPT = "describe the image."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["train", "eval"])
    p.add_argument(
        "--stage",
        type=int,
        choices=[1, 2],
        default=1,
        help="train: 1 = projector on captions, 2 = projector + LM on questions",
    )
    add_config_arguments(p, "vlm-shapes")
    p.add_argument("--init", help="stage 2: the stage-1 folder to continue from")
    p.add_argument("--out", help="train: output folder")
    p.add_argument("--overwrite", action="store_true", help="train: replace --out even if lmforge did not write it")
    p.add_argument("--model", help="eval: a VLM folder")
    p.add_argument("--noise", action="store_true", help="eval: only the noise-image control")
    p.add_argument("--json", help="write the metrics to this JSON file")
    add_resume_argument(p)  # train: checkpoints and metrics.jsonl are in <out>.train/


# ----------------------------------------------------------------------------- building


def load_vision(folder: str):
    """The image encoder of a `clip train` folder, or a Hugging Face CLIP vision folder."""
    if not folder:
        raise LmforgeError("vlm stage 1 needs an image encoder: --set vision=<clip folder or HF CLIP vision folder>")
    if is_multimodal(folder):
        return load_multimodal(folder, kind="clip").vision
    return load_hf_vision(folder)


def conversations(
    examples, caption_share: float, captions_only: bool, existence_share: float = 0.0, seed: int = 0
) -> list[tuple[int, str, str]]:
    """(example index, question, answer) pairs to train on; with existence_share > 0, POPE-style
    yes/no object questions (random negatives) are that share of the questions."""
    out = [(i, CAPTION_PROMPT, c) for i, ex in enumerate(examples) for c in ex.captions]
    if captions_only:
        return out
    qa = [(i, q, a) for i, ex in enumerate(examples) for q, a, _ in ex.qa]
    if existence_share > 0:
        yes_no = pope_questions([shape_objects(ex.captions[0]) for ex in examples], "random", seed)
        qa += yes_no[: int(len(qa) * existence_share / (1 - existence_share))]
    keep = int(len(qa) * caption_share / (1 - caption_share))
    return qa + out[:keep]


def fresh_lm(cfg: VlmTrainConfig, examples, device, run_dir=None, resume: str | None = None):
    """A new tokenizer + LM trained text-only on the conversations (images removed); checkpoints
    and metrics in `run_dir`/text-warmup."""
    texts = [t for ex in examples for t in ex.captions] + [f"{q} {a}" for ex in examples for q, a, _ in ex.qa]
    tokenizer = train_tokenizer(texts + [CAPTION_PROMPT], vocab_size=cfg.vocab_size)
    lm = Transformer(ModelConfig.preset(cfg.lm_preset, **{**cfg.lm_overrides, "vocab_size": tokenizer.vocab_size}))
    lm.to(device).train()
    optim_cfg = warmup_cosine(cfg.lm_lr, cfg.warmup_steps)
    render = lambda q, a: tokenizer.render_chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    next_batch = sampler(conversations(examples, 0.25, captions_only=False), cfg.batch_size, cfg.seed + 1, render)

    def batch(step: int) -> dict:
        ids, labels = pad_batch(next_batch()[1], tokenizer.pad_id, device)
        return {"input_ids": ids, "labels": labels}

    if cfg.text_warmup_steps:
        run_fit(
            lm,
            build_optimizer(lm, optim_cfg),
            lambda b: (lm_loss(lm(b["input_ids"]), b["labels"]), {}),
            batch,
            None if run_dir is None else run_dir / "text-warmup",
            stage_options(cfg.text_warmup_steps, optim_cfg, resume),
            LoopState(numpy=[next_batch.rng]),
            device=device,
        )
    return lm, tokenizer


# ----------------------------------------------------------------------------- training


def build_stage1(cfg: VlmTrainConfig, examples, device, run_dir=None, resume: str | None = None):
    vision = load_vision(cfg.vision)
    if cfg.lm:
        lm, tokenizer = load_model(cfg.lm, device=device), load_tokenizer_if_any(cfg.lm)
        if tokenizer is None or tokenizer.token_to_id("<image>") is None or not tokenizer.chat_template:
            raise LmforgeError(f"{cfg.lm}: the LM's tokenizer needs an '<image>' token and a chat template")
    else:
        lm, tokenizer = fresh_lm(cfg, examples, device, run_dir, resume)
    config = VlmConfig(
        vision.config, lm.config, tokenizer.token_to_id("<image>"), cfg.feature_layer, cfg.pool, cfg.select_feature
    )
    return VisionLanguageModel(config, vision, lm).to(device), tokenizer


def stage_optimizer(model: VisionLanguageModel, stage: int, cfg: VlmTrainConfig) -> torch.optim.AdamW:
    """Stage 1: projector only. Stage 2: projector + LM (or LoRA adapters on the LM, `lora_rank`),
    plus the image encoder when `vision_lr` > 0. The fresh projector learns at `lr`, the
    pretrained LM at the gentler `lm_lr`, the encoder at `vision_lr`."""
    model.requires_grad_(False)
    model.language_model.requires_grad_(stage == 2 and not cfg.lora_rank)
    if stage == 2 and cfg.lora_rank:
        try:
            from lmforge import peft
        except ImportError:
            raise LmforgeError("lora_rank > 0 needs lmforge.peft, which this build lacks") from None
        peft.apply(
            model.language_model,
            peft.LoraConfig(
                r=cfg.lora_rank,
                alpha=2 * cfg.lora_rank,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"],
            ),
        )
    model.projector.requires_grad_(True)
    model.vision.requires_grad_(stage == 2 and cfg.vision_lr > 0)
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]
    groups = [
        {"params": trainable(model.projector), "base_lr": cfg.lr},
        {"params": trainable(model.language_model), "base_lr": cfg.lm_lr},
        {"params": trainable(model.vision), "base_lr": cfg.vision_lr},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay
    )


def train(cfg: VlmTrainConfig, stage: int, init: str | None, out: str, resume: str | None = None) -> dict:
    seed_everything(cfg.seed)
    device = get_device(cfg.device)
    run_dir = run_dir_for(out)
    if stage == 1:
        size = load_vision(cfg.vision).config.image_size
        examples = load_examples(cfg.data, "train", cfg.train_size, cfg.seed, size)
        model, tokenizer = build_stage1(cfg, examples, device, run_dir, resume)
    else:
        if not init:
            raise LmforgeError("vlm stage 2 needs --init <stage-1 folder>")
        model, tokenizer = load_multimodal(init, device, kind="vlm"), load_tokenizer(init)
        examples = load_examples(cfg.data, "train", cfg.train_size, cfg.seed, model.vlm_config.vision.image_size)
    optimizer = stage_optimizer(model, stage, cfg)
    if cfg.existence_share and cfg.data not in ("shapes", "shapes1"):
        raise LmforgeError(f"existence_share needs the built-in shapes data (objects known), not {cfg.data!r}")
    pairs = conversations(examples, 0.2, stage == 1, cfg.existence_share, cfg.seed)
    steps = cfg.stage1_steps if stage == 1 else cfg.stage2_steps
    loss = fit(model, tokenizer, examples, pairs, optimizer, steps, cfg, device, run_dir, resume)
    if stage == 2 and cfg.lora_rank:
        from lmforge import peft

        peft.merge_and_unload(model.language_model)
    model.eval()
    metrics = evaluate(model, tokenizer, cfg, examples)
    metrics.update(stage=stage, steps=steps, final_loss=round(loss, 4))
    save_multimodal(model, out, tokenizer, extra={"train_config": vars(cfg), "metrics": metrics})
    return metrics


def sampler(pairs: list[tuple[int, str, str]], batch_size: int, seed: int, render):
    """A function returning a random batch: (pairs, rendered (ids, mask) rows), renders cached."""
    rng, cache = np.random.default_rng(seed), {}

    def next_batch():
        batch = [pairs[j] for j in rng.choice(len(pairs), batch_size)]
        for _, q, a in batch:
            if (q, a) not in cache:
                cache[q, a] = render(q, a)
        return batch, [cache[q, a] for _, q, a in batch]

    next_batch.rng = rng  # saved in checkpoints (LoopState): a resumed run draws the same batches
    return next_batch


@torch.no_grad()
def cached_features(model: VisionLanguageModel, examples, batch: int = 256) -> torch.Tensor:
    """The frozen encoder's features of every training image, computed once: [N, tokens, Dv]."""
    model.vision.eval()
    return torch.cat(
        [
            model.vision_features(pixels_for(model, [ex.image for ex in examples[s : s + batch]]))
            for s in range(0, len(examples), batch)
        ]
    )


def fit(
    model,
    tokenizer,
    examples,
    pairs,
    optimizer,
    steps: int,
    cfg: VlmTrainConfig,
    device,
    run_dir=None,
    resume: str | None = None,
) -> float:
    """`steps` of train.fit on image conversations -> the last loss (nan when resumed at the end).
    run_dir None: no checkpoints or metrics."""
    c = model.vlm_config
    render = lambda q, a: render_ids(tokenizer, image_turn(q, a), c.image_token_id, c.num_image_tokens)
    next_batch = sampler(pairs, cfg.batch_size, cfg.seed + 2, render)
    tune_vision = any(p.requires_grad for p in model.vision.parameters())
    features = None if tune_vision else cached_features(model, examples)
    model.train()

    def batch(step: int) -> dict:
        pairs_, rows = next_batch()
        ids, labels = pad_batch(rows, tokenizer.pad_id, device)
        index = [i for i, _, _ in pairs_]
        if tune_vision:  # the encoder changes every step: encode this batch's images afresh
            return {"ids": ids, "labels": labels, "pixels": pixels_for(model, [examples[i].image for i in index])}
        return {"ids": ids, "labels": labels, "features": features[index]}

    def loss_fn(b: dict):
        projected = model.image_features(b["pixels"]) if tune_vision else model.projector(b["features"])
        return lm_loss(model(inputs_embeds=model.embed(b["ids"], image_features=projected)), b["labels"]), {}

    if steps == 0:
        return 0.0
    # The groups' own peaks (base_lr: projector, LM, encoder) scaled by one warmup-cosine schedule.
    summary = run_fit(
        model,
        optimizer,
        loss_fn,
        batch,
        run_dir,
        stage_options(steps, warmup_cosine(cfg.lr, cfg.warmup_steps), resume),
        LoopState(numpy=[next_batch.rng]),
        device=device,
    )
    return summary["final_loss"] if summary["final_loss"] is not None else float("nan")


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def answer_batch(
    model: VisionLanguageModel,
    tokenizer,
    images: list[np.ndarray],
    questions: list[str],
    max_new_tokens: int,
    noise: bool = False,
    seed: int = 0,
) -> list[str]:
    """Greedy answers to one question per image (left-padded batch)."""
    cfgv = model.vlm_config
    rows = [
        render_ids(tokenizer, image_turn(q), cfgv.image_token_id, cfgv.num_image_tokens, True)[0] for q in questions
    ]
    device = next(model.parameters()).device
    ids, mask = pad_prompts(rows, tokenizer.pad_id)
    if noise:  # the control: same prompts, images of uniform noise
        rng = np.random.default_rng(seed)
        images = [rng.integers(0, 256, im.shape, dtype=np.uint8) for im in images]
    embeds = model.embed(ids.to(device), pixels_for(model, images))
    params = SamplingParams(max_new_tokens=max_new_tokens)
    out = decode_ids(
        model,
        params,
        ids.to(device),
        inputs_embeds=embeds,
        attention_mask=mask.to(device),
        eos_token_ids=end_of_turn_ids(tokenizer),
    )  # EOS and the template's end of turn
    return [tokenizer.decode(o).strip() for o in out]


def evaluate(
    model: VisionLanguageModel,
    tokenizer,
    cfg: VlmTrainConfig,
    train_examples=None,
    noise_only: bool = False,
    batch: int = 64,
) -> dict:
    size = model.vlm_config.vision.image_size
    test = load_examples(cfg.data, "test", cfg.eval_size, cfg.seed, size)
    qa = [(ex.image, q, a, kind) for ex in test for q, a, kind in ex.qa]
    metrics: dict = {"data": cfg.data, "questions": len(qa)}
    variants = [True] if noise_only else [False, True]
    for noise in variants:
        tag = "noise_" if noise else ""
        preds = []
        for s in range(0, len(qa), batch):
            chunk = qa[s : s + batch]
            preds += answer_batch(model, tokenizer, [c[0] for c in chunk], [c[1] for c in chunk], 8, noise, cfg.seed)
        correct = defaultdict(list)
        for (_, _, a, kind), p in zip(qa, preds):
            correct[kind].append(p.lower() == a.lower())
            correct["all"].append(p.lower() == a.lower())
        for kind, hits in sorted(correct.items()):
            metrics[f"{tag}vqa_{kind}"] = round(float(np.mean(hits)), 4)
        metrics[f"{tag}vqa_soft"] = round(
            float(np.mean([vqa_accuracy(p, [a]) for (_, _, a, _), p in zip(qa, preds)])), 4
        )
    if not noise_only and cfg.data in ("shapes", "shapes1"):
        metrics.update(pope(model, tokenizer, test, cfg.seed, batch))
    if train_examples is not None:
        metrics["blind_vqa_all"] = round(blind_baseline(train_examples, qa), 4)
    if not noise_only:
        refs = [ex.captions for ex in test]
        caps = []
        for s in range(0, len(test), batch):
            chunk = test[s : s + batch]
            caps += answer_batch(
                model, tokenizer, [ex.image for ex in chunk], [CAPTION_PROMPT] * len(chunk), cfg.max_new_tokens
            )
        metrics.update(
            caption_bleu=round(bleu(caps, refs), 2),
            caption_cider=round(cider_d(caps, refs), 3),
            caption_exact=round(float(np.mean([c in r for c, r in zip(caps, refs)])), 4),
            caption_example=f"{caps[0]!r} (ref {refs[0][0]!r})",
        )
    return metrics


def pope(model: VisionLanguageModel, tokenizer, test, seed: int, batch: int = 64) -> dict:
    """POPE hallucination scores per negative-sampling split (multimodal/pope.py)."""
    objects = [shape_objects(ex.captions[0]) for ex in test]
    metrics = {}
    for split in POPE_SPLITS:
        items = pope_questions(objects, split, seed)
        preds = []
        for s in range(0, len(items), batch):
            chunk = items[s : s + batch]
            preds += answer_batch(model, tokenizer, [test[i].image for i, _, _ in chunk], [q for _, q, _ in chunk], 4)
        scores = pope_scores(preds, [a for _, _, a in items])
        metrics.update({f"pope_{split}_{k}": v for k, v in scores.items() if k in ("accuracy", "f1", "yes_ratio")})
    return metrics


def blind_baseline(train_examples, qa) -> float:
    """Accuracy of always giving the most common training answer to each question text."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for ex in train_examples:
        for q, a, _ in ex.qa:
            answers[q][a] += 1
    return float(np.mean([bool(answers[q]) and answers[q].most_common(1)[0][0] == a for _, q, a, _ in qa]))


def main(args: argparse.Namespace) -> int:
    cfg = load_config(VlmTrainConfig, args.config, args.overrides)
    if args.action == "train":
        if not args.out:
            raise LmforgeError("vlm train needs --out DIR")
        check_output_dir(args.out, [args.init, cfg.data, cfg.vision or None, cfg.lm], args.overwrite)
        metrics = train(cfg, args.stage, args.init, args.out, args.resume)
    else:
        if not args.model:
            raise LmforgeError("vlm eval needs --model DIR")
        if args.resume:
            raise LmforgeError("--resume applies to `vlm train` only")
        model = load_multimodal(args.model, get_device(cfg.device), kind="vlm")
        train_examples = load_examples(cfg.data, "train", cfg.train_size, cfg.seed, model.vlm_config.vision.image_size)
        metrics = evaluate(model, load_tokenizer(args.model), cfg, train_examples, noise_only=args.noise)
    print(json.dumps(metrics, indent=2))
    if args.json:
        atomic_write_json(args.json, metrics)
    return 0
