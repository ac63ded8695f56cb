"""Tools as the model sees them: a name, a description and a JSON Schema of the arguments.

`Tool.from_function(fn)` derives all three from a plain Python function: its name, the first
paragraph of its docstring, and its parameters' type hints (descriptions from a Google-style
`Args:` section). Supported annotations, and the schema each becomes:

    str -> string        int -> integer        float -> number        bool -> boolean
    None -> null         list[T] / tuple[T, ...] -> array of T        dict[str, T] -> object of T
    Literal["a", 1] -> enum       enum.Enum subclass -> enum of its values
    T | None / Optional[T] -> anyOf [T, null]       A | B -> anyOf [A, B]

A parameter with a default is optional (the default is recorded); without one it is required.
Anything else (no annotation, *args/**kwargs, a class, Any, a bare `list`) is refused with an
error naming the function and the parameter: the model could not be told what to send.

Arguments coming back from the model are checked against the schema (jsonschema) before the
function runs; a mismatch goes back to the model as an error message, not an exception.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmforge.common import LmforgeError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


class ToolError(LmforgeError):
    """A tool definition the model cannot be given (bad name, schema or annotation)."""


@dataclass
class Tool:
    """A callable the agent may run. `fn` takes the arguments as keywords and returns anything
    JSON-serialisable (or text); what it raises goes back to the model as the call's result."""

    name: str
    description: str
    parameters: dict
    fn: Callable[..., Any] = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ToolError(f"tool name {self.name!r}: use 1-64 letters, digits, '_' or '-'")
        if not callable(self.fn):
            raise ToolError(f"tool {self.name!r}: fn is not callable")
        check_parameters(self.parameters, f"tool {self.name!r}")

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None, description: str | None = None) -> Tool:
        params, doc = function_schema(fn)
        return cls(name or fn.__name__, description if description is not None else doc, params, fn)

    def spec(self) -> dict:
        """The OpenAI `tools` entry."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def validate(self, arguments: str) -> dict:
        """The call's arguments (JSON text) as a dict; raises ValueError with a message for the model."""
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"the arguments are not valid JSON ({e.msg} at character {e.pos})") from None
        if not isinstance(args, dict):
            raise ValueError(f"the arguments must be a JSON object, got {type(args).__name__}")
        errors = sorted(_validator(self.parameters).iter_errors(args), key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            where = "/".join(str(p) for p in e.path) or "arguments"
            raise ValueError(f"{where}: {e.message} (schema: {json.dumps(self.parameters)})")
        return args


def _validator(schema: dict):
    import jsonschema

    return jsonschema.validators.validator_for(schema)(schema)


def check_parameters(schema: Any, where: str) -> None:
    """A tool's parameters must be a valid JSON Schema of an object (as the OpenAI API requires)."""
    import jsonschema

    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ToolError(f"{where}: parameters must be a JSON Schema with type 'object', got {schema!r}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where_in = "/".join(str(p) for p in e.path) or "(root)"
        raise ToolError(f"{where}: parameters is not a valid JSON Schema at {where_in}: {e.message}") from None


def function_schema(fn: Callable[..., Any]) -> tuple[dict, str]:
    """(parameters JSON Schema, description) of a function, from its type hints and docstring."""
    label = getattr(fn, "__qualname__", repr(fn))
    try:
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
    except (TypeError, ValueError, NameError) as e:
        raise ToolError(f"function {label}: cannot read its signature or type hints ({e})") from None
    summary, arg_docs = _parse_docstring(inspect.getdoc(fn) or "")
    props, required = {}, []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ToolError(f"function {label}: parameter {p.name!r} (*args/**kwargs) cannot be described to a model")
        if p.name not in hints:
            raise ToolError(f"function {label}: parameter {p.name!r} has no type annotation")
        try:
            prop = annotation_schema(hints[p.name])
        except TypeError as e:
            raise ToolError(f"function {label}: parameter {p.name!r}: {e}") from None
        if p.name in arg_docs:
            prop["description"] = arg_docs[p.name]
        if p.default is p.empty:
            required.append(p.name)
        elif _jsonable(p.default):
            prop["default"] = p.default.value if isinstance(p.default, enum.Enum) else p.default
        props[p.name] = prop
    schema = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    return schema, summary


def annotation_schema(tp: Any) -> dict:
    """The JSON Schema of one annotation (the table in the module docstring); TypeError otherwise."""
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        if not all(_jsonable(v) for v in values):
            raise TypeError(f"enum {tp.__name__} has values that are not JSON scalars")
        return {"enum": values}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        if not all(_jsonable(v) for v in args):
            raise TypeError(f"{tp!r}: Literal values must be str, int, float, bool or None")
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [annotation_schema(a) for a in args]
        return {"anyOf": options}
    if origin is list and len(args) == 1:
        return {"type": "array", "items": annotation_schema(args[0])}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"type": "array", "items": annotation_schema(args[0])}
    if origin is tuple and args:
        items = [annotation_schema(a) for a in args]
        return {"type": "array", "prefixItems": items, "minItems": len(items), "maxItems": len(items)}
    if origin is dict and len(args) == 2:
        if args[0] is not str:
            raise TypeError(f"{tp!r}: JSON object keys are strings; use dict[str, ...]")
        return {"type": "object", "additionalProperties": annotation_schema(args[1])}
    name = getattr(tp, "__name__", None) or repr(tp)
    raise TypeError(
        f"unsupported annotation {name} (supported: str, int, float, bool, None, list[T], tuple[T, ...], "
        "dict[str, T], Literal[...], Enum, unions)"
    )


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, enum.Enum))


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(the first paragraph, {param: description} from a Google-style `Args:` section)."""
    summary = " ".join(doc.split("\n\n", 1)[0].split())
    args, current, in_args = {}, None, False
    for line in doc.splitlines():
        if re.match(r"^(Args|Arguments|Parameters):\s*$", line.strip()):
            in_args = True
            continue
        if in_args:
            if line.strip() and not line.startswith((" ", "\t")):  # the next section
                break
            m = re.match(r"^\s+(\w+)\s*(?:\([^)]*\))?:\s*(.*)$", line)
            if m and (current is None or len(line) - len(line.lstrip()) <= args[current][1]):
                current = m.group(1)
                args[current] = (m.group(2).strip(), len(line) - len(line.lstrip()))
            elif current and line.strip():
                args[current] = (f"{args[current][0]} {line.strip()}", args[current][1])
    return summary, {k: v for k, (v, _) in args.items()}
