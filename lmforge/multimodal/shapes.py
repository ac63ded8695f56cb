"""A generated image set: 1-3 coloured shapes on a dark canvas, with a caption and questions.

Seeded and any size: `make_shapes(n, seed)` returns the same examples for the same arguments.
Shapes sit in distinct horizontal slots so "left of" is always well defined:

    caption  "a small red circle left of a large blue square"
    QA       colour ("what colour is the circle?" -> "red"), count ("how many shapes are
             there?" -> "two"), position ("what shape is on the left?" -> "circle")
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 200),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class Example:
    """One image with its texts. `qa` items are (question, answer, kind)."""

    image: np.ndarray  # uint8 [H, W, 3]
    captions: list[str]
    qa: list[tuple[str, str, str]] = field(default_factory=list)
    label: int | None = None  # class index for zero-shot classification, when there is one
    # Partial descriptions for contrastive training only ("a circle left of a square"): with the
    # colours gone, matching them needs the shapes, which breaks CLIP's colour-only shortcut.
    extra_captions: list[str] = field(default_factory=list)


@dataclass
class Item:
    colour: str
    shape: str
    size: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


def _draw(draw, item: Item, cx: float, cy: float, r: float) -> None:
    fill = COLOURS[item.colour]
    if item.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif item.shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=fill)


def render(items: list[Item], size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw `items` left to right in equal slots, jittered vertically and within the slot."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 40, 3)))
    draw = ImageDraw.Draw(img)
    slot = size / len(items)
    for i, item in enumerate(items):
        large = min(0.45 * slot, 0.2 * size)
        r = max(large if item.size == "large" else 0.6 * large, 2.0)
        cx = slot * (i + 0.5) + rng.uniform(-1, 1) * max(slot / 2 - r, 0) * 0.5
        cy = size / 2 + rng.uniform(-1, 1) * (size / 2 - r - 1) * 0.7
        _draw(draw, item, cx, cy, r)
    return np.asarray(img, dtype=np.uint8)


def caption(items: list[Item]) -> str:
    return " left of ".join(item.phrase() for item in items)


def questions(items: list[Item], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    qa = [
        ("how many shapes are there?", NUMBERS[len(items)], "count"),
        ("what shape is on the left?", items[0].shape, "position"),
        ("what colour is the shape on the right?", items[-1].colour, "colour"),
    ]
    unique = [it for it in items if sum(o.shape == it.shape for o in items) == 1]
    if unique:
        it = unique[int(rng.integers(len(unique)))]
        qa.append((f"what colour is the {it.shape}?", it.colour, "colour"))
    return qa


def class_names(colours: list[str] | None = None) -> list[str]:
    """Zero-shot classes for single-shape images: "red circle", "red square", ..."""
    return [f"{c} {s}" for c in (colours or list(COLOURS)) for s in SHAPES]


def make_shapes(
    n: int, seed: int = 0, image_size: int = 32, max_shapes: int = 3, colours: list[str] | None = None
) -> list[Example]:
    """`n` examples from seed `seed`. With max_shapes=1 each example is labelled with its
    colour+shape class (index into `class_names(colours)`)."""
    rng = np.random.default_rng(seed)
    palette = colours or list(COLOURS)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, max_shapes + 1))
        items = [
            Item(
                palette[int(rng.integers(len(palette)))],
                SHAPES[int(rng.integers(len(SHAPES)))],
                SIZES[int(rng.integers(len(SIZES)))],
            )
            for _ in range(k)
        ]
        label = palette.index(items[0].colour) * len(SHAPES) + SHAPES.index(items[0].shape) if k == 1 else None
        shapes_only = " left of ".join(f"a {it.shape}" for it in items)
        out.append(
            Example(render(items, image_size, rng), [caption(items)], questions(items, rng), label, [shapes_only])
        )
    return out
