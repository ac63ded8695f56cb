"""L0: the one config loader every recipe uses: a YAML file (a path or a built-in name under
lmforge/configs/) <- `--set a.b=c` overrides <- values from flags, checked against the recipe's
dataclass (nested dataclasses for sections; `common.build_config`), so a typo or a bad value is an
error naming the dotted field and the value, never a setting silently ignored.

    cfg = load_config(PretrainRecipe, "pretrain-tiny", ["train.steps=50", "optim.lr=1e-3"])
    cfg.train.steps  # 50
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

from lmforge.common import LmforgeError, build_config

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """The YAML file `name_or_path` names: a path, or a built-in config (lmforge/configs/NAME[.yaml])."""
    text = str(name_or_path)
    for path in (Path(text), CONFIG_DIR / (text if text.endswith(".yaml") else f"{text}.yaml")):
        if path.is_file():
            return path
    raise LmforgeError(
        f"config {text!r} not found: not a file, and not a built-in config ({', '.join(config_names())})"
    )


def read_config_file(name_or_path: str | os.PathLike) -> dict:
    import yaml

    path = resolve_config_path(name_or_path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LmforgeError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(tree, dict):
        raise LmforgeError(f"{path}: expected a mapping of fields at the top level")
    return tree


def apply_overrides(
    tree: dict,
    overrides: typing.Iterable[str],
    open_sections: tuple[str, ...] = (),
    example: str = "train.steps=100",
    schema: type | None = None,
) -> dict:
    """Apply `a.b=c` overrides (values read as YAML) to `tree` in place; returns it. With `schema` (the
    config's dataclass) a key must name its fields; without, a key the tree lacks is an error except in
    `open_sections`. Either way a typo is an error, never a silently ignored setting."""
    import yaml

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise LmforgeError(f"override {item!r}: expected KEY=VALUE, e.g. {example}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise LmforgeError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
        set_dotted(tree, key.strip(), value, open_sections, schema)
    return tree


def set_dotted(
    tree: dict, key: str, value: Any, open_sections: tuple[str, ...] = (), schema: type | None = None
) -> None:
    """tree[a][b] = value for key "a.b" (sections created as needed), the key checked as `apply_overrides` says."""
    parts, node = key.split("."), tree
    is_open = schema is None and parts[0] in open_sections
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(schema):
            known = {f.name for f in dataclasses.fields(schema) if f.init}
            if part not in known:
                raise LmforgeError(f"override {key!r}: unknown field {part!r} (known here: {', '.join(sorted(known))})")
            schema = None if last else _section_schema(schema, part, key, ".".join(parts[: i + 1]))
            is_open = schema is dict
        elif last and not is_open and part not in node:
            known = ", ".join(sorted(node)) or "none"
            raise LmforgeError(f"override {key!r}: unknown field {part!r} (known here: {known})")
        if last:
            node[part] = value
            return
        child = node.get(part)
        if child is None and (i > 0 or is_open or schema is not None):
            child = node[part] = {}
        if not isinstance(child, dict):
            raise LmforgeError(f"override {key!r}: {'.'.join(parts[: i + 1])!r} is not a section of the config")
        node = child


def _section_schema(cls: type, name: str, key: str, where: str) -> type:
    """The dataclass of field `name`, or `dict` for a free-form mapping; an error for a plain value."""
    tp = typing.get_type_hints(cls)[name]
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    for alt in [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]:
        if dataclasses.is_dataclass(alt):
            return alt
        if alt is Any or alt is dict or typing.get_origin(alt) is dict:
            return dict
    raise LmforgeError(f"override {key!r}: {where!r} is a value, not a section of the config")


def load_config(
    cls: type,
    source: str | os.PathLike | None = None,
    overrides: typing.Iterable[str] = (),
    values: dict[str, Any] | None = None,
    base: str | os.PathLike | None = None,
) -> Any:
    """Dataclass `cls` (nested dataclasses for sections) from the YAML `source` (a path or a built-in
    name; None: the defaults), then `a.b=c` overrides, then `values` ({"a.b": value}, from flags).
    `base`: a config whose top-level fields `source` replaces (a file may give only its tasks)."""
    tree = read_config_file(base) if base else {}
    tree.update(read_config_file(source) if source and source != base else {})
    apply_overrides(tree, overrides, schema=cls)
    for key, value in (values or {}).items():
        set_dotted(tree, key, value, schema=cls)
    return build_config(cls, tree)


def load_config_tree(
    source: str | os.PathLike, overrides: typing.Iterable[str] = (), open_sections: tuple[str, ...] = ()
) -> dict:
    """The YAML with its overrides as a plain mapping, for a recipe whose sections are checked later."""
    return apply_overrides(read_config_file(source), overrides, open_sections)
