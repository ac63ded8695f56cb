"""The transform manifest: the list of {"kind": ..., ...} entries a model carries in
`model.lmforge_transforms`, one per module swap applied to it (peft adapters, quantization), in order.
`lmforge.checkpoint` saves it beside the weights and replays it before loading them. Everything that
reads or edits the manifest goes through these four functions, so its representation has one home."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def transforms(model: nn.Module, kind: str | None = None) -> list[dict]:
    """The manifest's entries (a copy), all of them or those of one kind."""
    entries = list(getattr(model, "lmforge_transforms", None) or [])
    return entries if kind is None else [e for e in entries if e.get("kind") == kind]


def has_transform(model: nn.Module, kind: str) -> bool:
    return bool(transforms(model, kind))


def record_transform(model: nn.Module, entry: dict) -> None:
    """Append an entry (it must name its kind)."""
    if "kind" not in entry:
        raise ValueError(f"a transform entry needs a 'kind': {entry!r}")
    model.lmforge_transforms = transforms(model) + [dict(entry)]


def drop_transforms(model: nn.Module, kind: str, where: Callable[[dict], bool] | None = None) -> None:
    """Remove the entries of one kind (those `where` selects, or all), after their modules are undone."""
    model.lmforge_transforms = [
        e for e in transforms(model) if not (e.get("kind") == kind and (where is None or where(e)))
    ]
