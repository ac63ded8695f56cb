"""CLIP-score filtering of image-text pairs, the data-cleaning step of LAION and DataComp.

    scores = clip_scores(clip, tokenizer, images, captions)      # cosine of each pair, [N]
    keep = scores >= otsu_threshold(scores)                       # or a fixed threshold

A pair whose caption does not describe its image scores low. The threshold is either given (LAION
used 0.28 for OpenAI's CLIP ViT-B/32) or, since a small model trained here has its own score scale,
found from the scores alone by Otsu's method: the cut that best separates them into two groups
(maximal between-group variance), which needs no labelled pairs. `clip_score_metric` is CLIPScore
(Hessel et al. 2021): 2.5 x max(cosine, 0), the reference-free caption metric.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.common import LmforgeError

from .clip import CLIP
from .data import to_pixels


def encode_texts(tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] ending in EOS (the pooled position) and their attention mask: what
    CLIP.encode_text reads."""
    rows = [ids + [tokenizer.eos_id] for ids in tokenizer.encode_batch(texts)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def clip_scores(
    model: CLIP, tokenizer, images: list[np.ndarray], captions: list[str], batch: int = 256
) -> torch.Tensor:
    """Cosine similarity of each (image, caption) pair under the CLIP model, [N] in [-1, 1]."""
    if len(images) != len(captions):
        raise LmforgeError(f"{len(images)} images but {len(captions)} captions: pairs must match one to one")
    device = next(model.parameters()).device
    vc = model.config.vision
    out = []
    for s in range(0, len(images), batch):
        pix = to_pixels(images[s : s + batch], vc.image_size, vc.image_mean, vc.image_std).to(device)
        img = model.encode_image(pix)
        txt = model.encode_text(*encode_texts(tokenizer, captions[s : s + batch], device))
        out.append((img * txt).sum(-1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def clip_score_metric(cosines: torch.Tensor) -> float:
    """CLIPScore: the mean of 2.5 x max(cosine, 0) (0-2.5; higher: captions closer to their images)."""
    return float((2.5 * cosines.clamp(min=0)).mean()) if cosines.numel() else float("nan")


def otsu_threshold(scores: torch.Tensor, bins: int = 256) -> float:
    """The score cut that maximises the between-group variance of the two sides (Otsu, 1979)."""
    x = scores.double().flatten()
    if x.numel() < 2 or float(x.max() - x.min()) == 0.0:
        return float(x.min()) if x.numel() else 0.0
    hist = torch.histc(x, bins, float(x.min()), float(x.max()))
    centres = torch.linspace(float(x.min()), float(x.max()), bins + 1, dtype=torch.float64)
    centres = (centres[:-1] + centres[1:]) / 2
    w0 = hist.cumsum(0)
    w1 = w0[-1] - w0
    m0 = (hist * centres).cumsum(0) / w0.clamp(min=1e-12)
    m1 = ((hist * centres).sum() - (hist * centres).cumsum(0)) / w1.clamp(min=1e-12)
    between = w0 * w1 * (m0 - m1) ** 2
    k = int(between[:-1].argmax())
    return float((centres[k] + centres[k + 1]) / 2)


def mismatch_captions(captions: list[str], fraction: float, seed: int) -> tuple[list[str], list[bool]]:
    """A copy of captions with `fraction` of them swapped for another pair's (a different text):
    (captions, is_mismatched). The seeded noisy set the filter is measured on."""
    rng = np.random.default_rng(seed)
    n = len(captions)
    noisy = list(captions)
    bad = [False] * n
    for i in rng.choice(n, int(round(fraction * n)), replace=False).tolist():
        others = [j for j in rng.permutation(n).tolist()[:20] if captions[j] != captions[i]]
        if others:
            noisy[i], bad[i] = captions[others[0]], True
    return noisy, bad


def detection_f1(dropped: list[bool], mismatched: list[bool]) -> dict:
    """Precision/recall/F1 of `dropped` as a detector of the mismatched pairs."""
    tp = sum(d and m for d, m in zip(dropped, mismatched))
    precision = tp / max(1, sum(dropped))
    recall = tp / max(1, sum(mismatched))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}
