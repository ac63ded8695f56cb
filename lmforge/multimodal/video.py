"""Video for the VLM: frame sampling, and generated clips of shapes in motion with questions.

    idx = sample_frames(total=120, num_frames=8)                # uniform; or mode="stride", stride=k
    clips = make_motion_clips(500, seed=0)                      # [VideoClip(frames [T, H, W, 3], qa)]

A clip is T frames of the shapes canvas (shapes.py) in which one thing happens, and each
question needs the frames' order to answer:
    move     a shape slides one way            "which way does the red circle move?"  -> "left"
    appear   shapes come and go one after another ("what shape appears last?" -> "square"),
             each on screen for the same number of frames
    change   a shape changes colour            "what colour does the circle turn?"    -> "blue"
Shuffling the frames (the control) keeps what is in them but loses the order: accuracy on these
questions must fall to chance for a model that reads the order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lmforge.common import LmforgeError

from .shapes import COLOURS, SHAPES, Item, _draw

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
KINDS = ("move", "appear", "change")


@dataclass
class VideoClip:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    qa: list[tuple[str, str, str]] = field(default_factory=list)  # (question, answer, kind)


def sample_frames(total: int, num_frames: int, mode: str = "uniform", stride: int = 1) -> list[int]:
    """Indices of the frames to keep: `uniform` spreads num_frames over the clip (the centre of
    each of num_frames equal segments); `stride` takes every stride-th frame, at most num_frames."""
    if total < 1 or num_frames < 1:
        raise LmforgeError(f"cannot sample {num_frames} frames from a clip of {total}")
    if mode == "uniform":
        return [min(total - 1, int((i + 0.5) * total / num_frames)) for i in range(num_frames)]
    if mode == "stride":
        if stride < 1:
            raise LmforgeError(f"frame stride must be >= 1, got {stride}")
        return list(range(0, total, stride))[:num_frames]
    raise LmforgeError(f"frame sampling mode must be 'uniform' or 'stride', got {mode!r}")


def _canvas(size: int, background: tuple[int, int, int], placed: list[tuple[Item, float, float, float]]):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    for item, cx, cy, r in placed:
        _draw(draw, item, cx, cy, r)
    return np.asarray(img, dtype=np.uint8)


def _item(rng: np.random.Generator, colours: list[str]) -> Item:
    return Item(colours[int(rng.integers(len(colours)))], SHAPES[int(rng.integers(len(SHAPES)))], "large")


def make_motion_clips(n: int, seed: int = 0, image_size: int = 32, num_frames: int = 6) -> list[VideoClip]:
    """n clips (kinds in turn), deterministic for the arguments."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        background = tuple(int(v) for v in rng.integers(0, 40, 3))
        r = image_size * 0.14
        frames, qa = [], []
        if kind == "move":
            item = _item(rng, colours)
            name, (dx, dy) = list(DIRECTIONS.items())[int(rng.integers(4))]
            span = image_size - 2 * r - 2
            start = np.array([image_size / 2, image_size / 2]) - np.array([dx, dy]) * span / 2
            start += (1 - np.abs([dx, dy])) * rng.uniform(-span / 3, span / 3, 2)  # off-axis jitter
            for t in range(num_frames):
                cx, cy = start + np.array([dx, dy]) * span * t / (num_frames - 1)
                frames.append(_canvas(image_size, background, [(item, cx, cy, r)]))
            qa.append((f"which way does the {item.colour} {item.shape} move?", name, "move"))
        elif kind == "appear":
            shapes = [str(s) for s in rng.permutation(SHAPES)[:3]]
            items = [Item(colours[int(rng.integers(len(colours)))], s, "large") for s in shapes]
            slots = rng.permutation(3)  # where each appears (left/middle/right): order is not position
            # Each shape is on screen for the same number of frames, so only the order tells which
            # came first (counting frames would answer "appears first" from shuffled frames).
            length = num_frames // 2
            onset = sorted(rng.choice(num_frames - length + 1, 3, replace=False).tolist())
            for t in range(num_frames):
                placed = [
                    (it, image_size * (slots[k] + 0.5) / 3, image_size / 2, image_size * 0.13)
                    for k, it in enumerate(items)
                    if onset[k] <= t < onset[k] + length
                ]
                frames.append(_canvas(image_size, background, placed))
            which = "first" if rng.random() < 0.5 else "last"
            qa.append((f"what shape appears {which}?", shapes[0] if which == "first" else shapes[-1], "appear"))
        else:
            before, after = rng.choice(colours, 2, replace=False).tolist()
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            cx, cy = rng.uniform(r + 1, image_size - r - 1, 2)
            # Each colour is on screen for half the clip (odd lengths: either colour gets the extra frame),
            # so only the order tells which came last (counting frames would answer from shuffled frames).
            switch = num_frames // 2 + (int(rng.integers(2)) if num_frames % 2 else 0)
            for t in range(num_frames):
                frames.append(
                    _canvas(
                        image_size, background, [(Item(before if t < switch else after, shape, "large"), cx, cy, r)]
                    )
                )
            qa.append((f"what colour does the {shape} turn?", after, "change"))
        out.append(VideoClip(np.stack(frames), qa))
    return out


def shuffle_frames(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The control: the same frames in a random order."""
    return frames[rng.permutation(frames.shape[0])]
