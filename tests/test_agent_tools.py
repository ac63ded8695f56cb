"""Agent tools: JSON Schema derived from type hints and docstrings (unsupported annotations and bad
schemas refused with clear errors), the calculator's safety, the files tool confined to its folder,
and Python in the eval sandbox."""

from __future__ import annotations

import enum
import os
from typing import Literal, Optional

import pytest

from lmforge.agent import Tool, ToolError, builtin_tools, calculate
from lmforge.agent.tools import MAX_RESULT_BITS, file_tools, python_tool
from lmforge.common import LmforgeError


class Unit(enum.Enum):
    C = "c"
    F = "f"


def weather(
    city: str,
    days: int,
    unit: Unit = Unit.C,
    detail: Literal["short", "long"] = "short",
    tags: list[str] | None = None,
    scale: float = 1.0,
    limits: dict[str, int] | None = None,
    pair: tuple[int, str] | None = None,
    verbose: Optional[bool] = None,  # noqa: UP045  (the Optional spelling is supported too)
) -> str:
    """Forecast for a city.

    More text that is not the summary.

    Args:
        city: the city's name,
            as people write it.
        days (int): how many days ahead.
    """
    return city


def test_schema_from_type_hints_and_docstring():
    t = Tool.from_function(weather)
    assert t.name == "weather" and t.description == "Forecast for a city."
    p = t.parameters
    assert p["required"] == ["city", "days"] and p["additionalProperties"] is False
    props = p["properties"]
    assert props["city"] == {"type": "string", "description": "the city's name, as people write it."}
    assert props["days"] == {"type": "integer", "description": "how many days ahead."}
    assert props["unit"] == {"enum": ["c", "f"], "default": "c"}
    assert props["detail"] == {"enum": ["short", "long"], "default": "short"}
    assert props["tags"] == {
        "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}],
        "default": None,
    }
    assert props["scale"] == {"type": "number", "default": 1.0}
    assert props["limits"]["anyOf"][0] == {"type": "object", "additionalProperties": {"type": "integer"}}
    assert props["pair"]["anyOf"][0]["prefixItems"] == [{"type": "integer"}, {"type": "string"}]
    assert props["verbose"]["anyOf"] == [{"type": "boolean"}, {"type": "null"}]
    assert t.validate('{"city": "Oslo", "days": 2, "unit": "f"}') == {"city": "Oslo", "days": 2, "unit": "f"}
    for bad, word in [
        ('{"city": "Oslo"}', "'days' is a required property"),
        ('{"city": "Oslo", "days": 2, "unit": "k"}', "unit: 'k' is not one of"),
        ('{"city": "Oslo", "days": 2, "x": 1}', "Additional properties"),
        ("[1]", "must be a JSON object"),
        ("{", "not valid JSON"),
    ]:
        with pytest.raises(ValueError, match=word):
            t.validate(bad)


class Thing:
    pass


def test_unsupported_annotations_and_bad_tools_are_clear_errors():
    def no_hint(x):
        return x

    def a_class(x: Thing) -> None: ...

    def bare_list(x: list) -> None: ...

    def star(*xs: int) -> None: ...

    def int_keys(x: dict[int, str]) -> None: ...

    for fn, word in [
        (no_hint, "parameter 'x' has no type annotation"),
        (a_class, "parameter 'x': unsupported annotation Thing"),
        (bare_list, "unsupported annotation list"),
        (star, r"\*args/\*\*kwargs"),
        (int_keys, r"use dict\[str, \.\.\.\]"),
    ]:
        with pytest.raises(ToolError, match=word):
            Tool.from_function(fn)
    with pytest.raises(ToolError, match="type 'object'"):
        Tool("f", "", {"type": "string"}, print)
    with pytest.raises(ToolError, match="not a valid JSON Schema at properties"):
        Tool("f", "", {"type": "object", "properties": 3}, print)
    with pytest.raises(ToolError, match="tool name 'bad name'"):
        Tool("bad name", "", {"type": "object"}, print)
    with pytest.raises(LmforgeError, match="two tools are named 'calculator'"):
        from lmforge.agent.loop import tool_specs

        tool_specs(builtin_tools(["calculator", "calculator"]))
    with pytest.raises(LmforgeError, match="unknown tool 'web'"):
        builtin_tools(["web"])
    with pytest.raises(LmforgeError, match="needs a folder"):
        builtin_tools(["files"])
    with pytest.raises(LmforgeError, match="needs an index"):
        builtin_tools(["rag"])


def test_calculator_is_exact_and_safe():
    assert calculate("123 * 456") == 56088
    assert calculate("(1 + 2) * -3 ** 2 // 4 % 5") == ((1 + 2) * -(3**2) // 4) % 5
    assert calculate("7 / 2") == 3.5 and calculate("2 ** -1") == 0.5
    assert calculate("2 ** 4000") == 2**4000
    for expr, word in [
        ("x + 1", "names"),
        ("abs(-1)", "function calls"),
        ("(1).real", "attribute access"),
        ("__import__('os').system('true')", "function calls"),
        ("'a' * 3", "only numbers"),
        ("[1][0]", "Subscript"),
        ("True + 1", "only numbers"),
        ("9 ** 9 ** 9", f"more than {MAX_RESULT_BITS} bits"),
        ("10 ** 100000", f"more than {MAX_RESULT_BITS} bits"),
        ("2 ** 4000 * 2 ** 4000", "product would have more than"),
        ("1 / 0", "division by zero"),
        ("1e308 * 10", "not finite"),
        ("(-8) ** 0.5", "not a real number"),
        ("lambda: 1", "Lambda is not allowed"),
        ("1 +", "not an arithmetic expression"),
        ("1" * 2000, "longer than"),
    ]:
        with pytest.raises(ValueError, match=word):
            calculate(expr)


def test_files_tool_stays_in_its_folder(tmp_path):
    root = tmp_path / "work"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("one\ntwo\nthree\n")
    (root / "sub" / "b.md").write_text("bee")
    (tmp_path / "secret.txt").write_text("top secret")
    os.symlink(tmp_path / "secret.txt", root / "link_out.txt")
    os.symlink(root / "a.txt", root / "link_in.txt")
    read, listing = file_tools(root)
    assert read.fn(path="a.txt") == "one\ntwo\nthree"
    assert read.fn(path="a.txt", start_line=2, max_lines=1) == "two\n[... 1 more lines]"
    assert read.fn(path="sub/../link_in.txt").startswith("one")
    assert listing.fn() == "a.txt\nlink_in.txt\nsub/b.md"  # the symlink out is not listed
    for bad in ["../secret.txt", str(tmp_path / "secret.txt"), "link_out.txt", "sub/../../secret.txt", "/etc/passwd"]:
        with pytest.raises(ValueError, match="outside the folder"):
            read.fn(path=bad)
    with pytest.raises(ValueError, match="no such file"):
        read.fn(path="missing.txt")
    with pytest.raises(ValueError, match="outside the folder"):
        listing.fn(subfolder="..")
    with pytest.raises(LmforgeError, match="no such folder"):
        file_tools(tmp_path / "missing")
    with pytest.raises(LmforgeError, match="not a folder"):
        file_tools(root / "a.txt")


def test_python_tool_runs_in_the_sandbox():
    py = python_tool(timeout=5)
    assert py.fn(code="print(6 * 7)") == "42"
    out = py.fn(code="import os\nprint(os.getcwd())\nraise SystemExit(3)")
    assert out.startswith("/box") and "[exit status 3]" in out
    assert "ZeroDivisionError" in py.fn(code="1/0")
    assert "timed out" in python_tool(timeout=1).fn(code="while True: pass")
