"""A checkpoint's generation_config.json as the server's request defaults.

When the served model folder has one (HF checkpoints do), its `temperature`, `top_p`, `top_k`,
`min_p`, `repetition_penalty`, `max_new_tokens` and `eos_token_id` are what a request gets for the
fields it does not set (as transformers' generate() and vLLM use them); `do_sample: false` makes
the default greedy, as it does in generate(). Fields a request sets always win. Other keys of the
file (bos/pad ids, beam settings, ...) describe generate() options the server has no use for.
A value out of range is an error at start-up naming the file and the key, not a 400 on every request.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from lmforge.common import LmforgeError


@dataclass(frozen=True)
class GenerationDefaults:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # stop tokens beside the tokenizer's EOS


_RANGES = {  # key -> (type, check, what it must be)
    "temperature": (float, lambda v: 0 <= v, ">= 0"),
    "top_p": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (int, lambda v: v >= 0, ">= 0"),
    "min_p": (float, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (float, lambda v: v > 0, "> 0"),
    "max_new_tokens": (int, lambda v: v >= 1, ">= 1"),
}


def load_generation_defaults(folder: str | Path) -> GenerationDefaults:
    """The defaults from `folder`/generation_config.json; all unset when there is none."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return GenerationDefaults()
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise LmforgeError(f"{path}: expected a JSON object, got {type(config).__name__}")
    values = {}
    for key, (kind, ok, what) in _RANGES.items():
        v = config.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
            raise LmforgeError(f"{path}: {key} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
        if not (math.isfinite(v) and ok(v)):
            raise LmforgeError(f"{path}: {key} must be {what}, got {v!r}")
        values[key] = kind(v)
    if config.get("do_sample") is False:
        values["temperature"] = 0.0
    eos = config.get("eos_token_id")
    eos = [] if eos is None else [eos] if not isinstance(eos, list) else eos
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in eos):
        raise LmforgeError(f"{path}: eos_token_id must be a token id or a list of them, got {config['eos_token_id']!r}")
    return GenerationDefaults(**values, eos_token_ids=tuple(eos))
