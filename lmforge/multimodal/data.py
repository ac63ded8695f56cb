"""Image data: loading any image source, the pixel transform, the sklearn digits, and a folder of
images with a JSONL of captions or conversations (the LLaVA format).

JSONL lines (paths relative to the JSONL's folder, or to `image_root`):

    {"image": "a.png", "caption": "a cat on a mat"}
    {"image": "b.png", "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                                          {"from": "gpt", "value": "A dog."}]}
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.common import LmforgeError, get_logger

from .shapes import NUMBERS, Example

log = get_logger("lmforge.multimodal")


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise LmforgeError("images need pillow: pip install 'lmforge[vision]'") from None
    return Image


def load_image(source: Any) -> np.ndarray:
    """A path, raw bytes, a base64 `data:image/...` URL, a PIL image or an array -> uint8 [H, W, 3]."""
    Image = _pil()
    if isinstance(source, np.ndarray):
        arr = source if source.ndim == 3 else np.repeat(source[..., None], 3, axis=-1)
        return arr.astype(np.uint8)
    if isinstance(source, Image.Image):
        return np.asarray(source.convert("RGB"), dtype=np.uint8)
    what = "image"
    if isinstance(source, str) and source.startswith("data:"):
        head, _, payload = source.partition(",")
        if ";base64" not in head or not head.startswith("data:image/"):
            raise LmforgeError(f"image data URL must be 'data:image/<type>;base64,...', got {head[:40]!r}")
        try:
            source = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise LmforgeError("image data URL has invalid base64 data") from None
        what = "image data URL"
    elif isinstance(source, (str, Path)):
        what = str(source)
        if not Path(source).is_file():
            raise LmforgeError(f"image not found: {source}")
        source = Path(source).read_bytes()
    if not isinstance(source, (bytes, bytearray)):
        raise LmforgeError(f"cannot read an image from a {type(source).__name__}")
    try:
        with Image.open(io.BytesIO(source)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises many types for corrupt data
        raise LmforgeError(f"{what}: not a readable image ({type(e).__name__}: {e})") from None


def to_pixels(images: list[np.ndarray], size: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 [H, W, 3] images -> normalised float [B, 3, size, size] (bicubic resize when needed)."""
    Image = _pil()
    out = []
    for arr in images:
        if arr.shape[:2] != (size, size):
            arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BICUBIC))
        out.append(torch.from_numpy(np.array(arr, dtype=np.uint8)))  # a writable copy
    x = torch.stack(out).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


# ----------------------------------------------------------------------------- sklearn digits

DIGIT_TEMPLATES = ("a handwritten digit {}", "the number {} written by hand", "a photo of the digit {}")


def digit_class_names() -> list[str]:
    return list(NUMBERS)


def load_digits(split: str = "train", seed: int = 0, test_fraction: float = 0.25) -> list[Example]:
    """scikit-learn's 1797 8x8 handwritten digits (shipped with it, no download), split by a
    seeded permutation. Captions and questions are generated from the labels."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise LmforgeError("the digits data needs scikit-learn: pip install 'lmforge[vision]'") from None
    if split not in ("train", "test"):
        raise LmforgeError(f"digits split must be 'train' or 'test', got {split!r}")
    bunch = sk_load_digits()
    order = np.random.default_rng(seed).permutation(len(bunch.target))
    n_test = int(len(order) * test_fraction)
    idx = order[:n_test] if split == "test" else order[n_test:]
    out = []
    for i in idx:
        gray = (bunch.images[i] * (255.0 / 16.0)).astype(np.uint8)
        word = NUMBERS[int(bunch.target[i])]
        out.append(
            Example(
                np.repeat(gray[..., None], 3, axis=-1),
                [t.format(word) for t in DIGIT_TEMPLATES],
                [("what digit is this?", word, "digit")],
                int(bunch.target[i]),
            )
        )
    return out


# ----------------------------------------------------------------------------- folder + JSONL


def _conversation_qa(conv: list[dict], where: str) -> list[tuple[str, str, str]]:
    qa, pending = [], None
    for turn in conv:
        role, value = turn.get("from"), turn.get("value")
        if not isinstance(value, str):
            raise LmforgeError(f"{where}: conversation turn without a string 'value'")
        if role in ("human", "user"):
            pending = value.replace("<image>", "").strip()
        elif role in ("gpt", "assistant") and pending is not None:
            qa.append((pending, value.strip(), "qa"))
            pending = None
    return qa


def read_jsonl_folder(jsonl: str | Path, image_root: str | Path | None = None) -> tuple[list[Example], list[str]]:
    """Read a LLaVA-style JSONL. Returns (examples, skipped): broken or missing images and
    lines without an image are reported (logged and listed) and skipped, never fatal."""
    jsonl = Path(jsonl)
    if not jsonl.is_file():
        raise LmforgeError(f"JSONL file not found: {jsonl}")
    root = Path(image_root) if image_root else jsonl.parent
    examples, skipped = [], []
    for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{jsonl}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or "image" not in record:
            skipped.append(f"{where}: no 'image' field")
            continue
        try:
            image = load_image(root / record["image"])
        except LmforgeError as e:
            skipped.append(f"{where}: {e}")
            continue
        caps = record.get("caption", [])
        caps = [caps] if isinstance(caps, str) else list(caps)
        examples.append(Example(image, caps, _conversation_qa(record.get("conversations", []), where)))
    for s in skipped:
        log.warning("skipped %s", s)
    return examples, skipped


def load_examples(source: str, split: str, n: int, seed: int, image_size: int) -> list[Example]:
    """Built-in sets by name ("shapes", "shapes1" single-shape, "digits") or a JSONL path."""
    from .shapes import make_shapes

    split_seed = seed if split == "train" else seed + 10_000  # held-out: a disjoint seed stream
    if source == "shapes":
        return make_shapes(n, split_seed, image_size)
    if source == "shapes1":
        return make_shapes(n, split_seed, image_size, max_shapes=1)
    if source == "digits":
        return load_digits(split, seed)
    if source.endswith(".jsonl"):
        return read_jsonl_folder(source)[0]
    raise LmforgeError(f"unknown image data {source!r}: use shapes, shapes1, digits or a .jsonl file")
