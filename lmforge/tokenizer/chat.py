"""Chat templates: render a conversation with a Jinja template exactly as transformers does,
and find the characters of that rendering the assistant wrote (the SFT loss mask).

The template is whatever the tokenizer folder stores (tokenizer_config.json or
chat_template.jinja), so training, serving and evaluation all render the same string.

Rendering is bounded: Jinja's sandbox stops attribute escapes, not `{{ 'A' * 200000000 }}` (7 GB).
Every value the template makes by `*`, `+`, `%`, `~`, a call or a filter, and the output itself,
must stay within MAX_RENDER_CHARS characters (items, for lists), checked before the value is built
where its size can be known in advance, else a clear error.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.common import LmforgeError

# Tool calling in the Hermes/Qwen style: the tools (OpenAI's {"type": "function", "function": {...}})
# listed in the system turn inside <tools></tools>, each call written as
# <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>, each result a tool turn inside
# <tool_response></tool_response>. serve/tools.py parses the calls back out of the output.
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call>"
)

# ChatML (Qwen, OpenAI). `content` may be a string or a list of parts
# ({"type": "text", "text": ...} / {"type": "image"}), so vision-language conversations put
# the <image> placeholder where the image goes. With `tools`, the system turn lists them (a first
# system message's text goes before); assistant `tool_calls` and tool turns as above. Without
# tools, tool calls or tool turns it renders as plain ChatML. Raw strings: Jinja reads the '\n' escapes.
CHATML_TEMPLATE = (
    r"{% if tools %}{{ '<|im_start|>system\n' }}"
    r"{% if messages and messages[0]['role'] == 'system' and messages[0]['content'] is string %}"
    r"{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    r"{{ " + repr(TOOLS_PREAMBLE) + r" }}{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    r"{{ " + repr(TOOLS_POSTAMBLE) + r" + '<|im_end|>\n' }}{% endif %}"
    r"{% for message in messages %}"
    r"{% if not (tools and loop.first and message['role'] == 'system' and message['content'] is string) %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' }}"
    r"{% if message['role'] == 'tool' %}{{ '<tool_response>\n' }}{% endif %}"
    r"{% if message['content'] is string %}{{ message['content'] }}"
    r"{% elif message['content'] %}{% for part in message['content'] %}"
    r"{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    r"{% endfor %}{% endif %}"
    r"{% if message['role'] == 'tool' %}{{ '\n</tool_response>' }}{% endif %}"
    r"{% for call in message['tool_calls'] or [] %}"
    r"{{ ('\n' if message['content'] or not loop.first else '') + '<tool_call>\n{\"name\": ' }}"
    r"{{ call['function']['name'] | tojson }}{{ ', \"arguments\": ' }}"
    r"{{ call['function']['arguments'] | tojson }}{{ '}\n</tool_call>' }}"
    r"{% endfor %}"
    r"{{ '<|im_end|>\n' }}"
    r"{% endif %}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant", "tool", "developer")

# Private-use characters that bracket `{% generation %}` bodies when we ask for their positions.
_OPEN, _CLOSE = "\ue000", "\ue001"
_MARK_VAR = "lmforge_mark_generation"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class _GenerationTag(Extension):
    """transformers' `{% generation %}...{% endgeneration %}`: marks assistant-written text.

    Renders the body unchanged unless the template variable `lmforge_mark_generation` is true,
    in which case the body is bracketed by private-use markers that `_strip_marks` turns
    into character spans.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_mark", [nodes.Name(_MARK_VAR, "load")])
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _mark(self, on: Any, caller: Any) -> str:
        body = caller()
        return f"{_OPEN}{body}{_CLOSE}" if on else body


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON (as in transformers).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


MAX_RENDER_CHARS = 1 << 24  # 16M characters: far beyond any context, far below a memory problem
_NUMBER = re.compile(r"\d+")
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\d*)(?:\.(\d*))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)\}")


def _bound(size: int, what: str) -> None:
    if size > MAX_RENDER_CHARS:
        raise SecurityError(
            f"{what} would make {size} characters or items; a chat template may make at most {MAX_RENDER_CHARS}"
        )


def _sized(value: Any, what: str) -> Any:
    if isinstance(value, (str, list, tuple, dict)):
        _bound(len(value), what)
    return value


def _check_args(args: Iterable[Any], what: str) -> None:
    """An int argument is a width, a count or a repeat (center, ljust, zfill, indent, lipsum):
    one over the bound is refused before the call builds anything."""
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool):
            _bound(abs(a), f"{what} with argument {a}")


def _check_format(fmt: Any, what: str) -> None:
    """Widths and precisions written into a '%' or str.format format string."""
    if not isinstance(fmt, str):
        return
    numbers = [n for m in _PERCENT_SPEC.finditer(fmt) for n in m.groups() if n]
    numbers += [n for spec in _BRACE_SPEC.findall(fmt) for n in _NUMBER.findall(spec)]
    for n in numbers:
        _bound(int(n) if len(n) <= 12 else 10**12, f"{what} with width {n if len(n) <= 12 else n[:12] + '...'}")


def _check_text_call(name: str, text: Any, args: tuple) -> None:
    """Sizes known before a str method or filter runs: format widths, replace and join results,
    indent (the width once per line)."""
    if not isinstance(text, str):
        if name == "join" and isinstance(text, (list, tuple)):
            _bound(sum(len(x) for x in text if isinstance(x, str)), name)
        return
    if name in ("format", "format_map"):
        _check_format(text, name)
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and args[0]:
        grow = max(len(str(args[1])) - len(args[0]), 0)
        _bound(len(text) + text.count(args[0]) * grow, name)
    elif name == "indent" and args and isinstance(args[0], int):
        _bound(len(text) + (text.count("\n") + 1) * abs(args[0]), name)


class _BoundedCodeGenerator(CodeGenerator):
    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        """`a ~ b`: through environment.bounded_concat, not a bare "".join."""
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "+", "%", "**"})
    code_generator_class = _BoundedCodeGenerator

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        sized = (str, list, tuple)
        if operator == "*" and isinstance(left, sized) != isinstance(right, sized):
            seq, times = (left, right) if isinstance(left, sized) else (right, left)
            if isinstance(times, int):
                _bound(len(seq) * max(times, 0), "'*'")
        elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
            _bound(len(left) + len(right), "'+'")
        elif operator == "%" and isinstance(left, str):
            _check_format(left, "'%' formatting")
            _check_args(right if isinstance(right, tuple) else (right,), "'%' formatting")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            _bound(left.bit_length() * max(right, 0) // 3, "'**'")  # about the result's decimal digits
        return _sized(super().call_binop(context, operator, left, right), f"'{operator}'")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (as jinja's)
        name = getattr(__obj, "__name__", "a call")
        _check_args([*args, *kwargs.values()], name)
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # a str method's string
        if isinstance(owner, str):
            _check_text_call(name, args[0] if name == "join" and args else owner, args)
        return _sized(super().call(__context, __obj, *args, **kwargs), name)

    @staticmethod
    def bounded_concat(values: tuple) -> str:
        parts = [str(v) for v in values]
        _bound(sum(map(len, parts)), "'~'")
        return "".join(parts)


def _bounded_filter(f: Any) -> Any:
    skip = 2 if hasattr(f, "jinja_pass_arg") else 1  # (context or environment,) value, arguments...

    @functools.wraps(f)  # keeps jinja's pass_context/pass_environment marker
    def run(*args: Any, **kwargs: Any) -> Any:
        name = getattr(f, "__name__", "a filter").removeprefix("do_")
        _check_args([*args[skip:], *kwargs.values()], f"the filter {name}")
        if len(args) >= skip:
            _check_text_call(name, args[skip - 1], args[skip:])
        return _sized(f(*args, **kwargs), f"the filter {name}")

    return run


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile like transformers: immutable sandbox, trim_blocks, lstrip_blocks, same helpers;
    every value and the output bounded by MAX_RENDER_CHARS."""
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise LmforgeError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None


def check_messages(messages: Any) -> None:
    """Raise LmforgeError naming the first bad message (index, role, content)."""
    if not isinstance(messages, (list, tuple)):
        raise LmforgeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LmforgeError(f"message {i}: expected a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise LmforgeError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = m.get("content")
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            raise LmforgeError(f"message {i} ({role}): missing 'content'")
        if content is not None and not isinstance(content, (str, list)):
            raise LmforgeError(
                f"message {i} ({role}): 'content' must be a string or a list of parts, got {type(content).__name__}"
            )


def render(template: str, messages: list[dict], add_generation_prompt: bool = False, **variables: Any) -> str:
    """The template's string for `messages`. `variables` are extra template variables
    (bos_token, eos_token, tools, ...), as transformers passes its special tokens map."""
    check_messages(messages)
    context = {"tools": None, "documents": None, **variables}
    try:
        pieces, size = [], 0
        for piece in compile_template(template).generate(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **context
        ):
            size += len(piece)
            _bound(size, "the rendered conversation")
            pieces.append(piece)
        return "".join(pieces)
    except jinja2.TemplateError as e:
        raise LmforgeError(f"chat template failed: {e}") from None
    except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as e:  # the template's own bug
        raise LmforgeError(f"chat template failed: {type(e).__name__}: {e}") from None


def _strip_marks(marked: str) -> tuple[str, list[tuple[int, int]]]:
    out, spans, pos, start = [], [], 0, 0
    for piece in re.split(f"([{_OPEN}{_CLOSE}])", marked):
        if piece == _OPEN:
            start = pos
        elif piece == _CLOSE:
            spans.append((start, pos))
        else:
            out.append(piece)
            pos += len(piece)
    return "".join(out), spans


def _trim_after_end_token(text: str, start: int, end: int, end_tokens: Iterable[str]) -> int:
    """Drop template whitespace that follows the turn's last special token ("<|im_end|>\\n"):
    the model stops at the end-of-turn token, it never writes the newline after it."""
    segment = text[start:end]
    cut = max((segment.rfind(t) + len(t) for t in end_tokens if t and t in segment), default=-1)
    if cut > 0 and not segment[cut:].strip():
        return start + cut
    return end


def assistant_spans(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = False,
    end_tokens: Iterable[str] = (),
    **variables: Any,
) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [(start, end) character spans the assistant wrote, end-of-turn included]).

    Templates with `{% generation %}` say so themselves. For the others, turn i's span runs
    from the end of render(messages[:i], add_generation_prompt=True) to the end of
    render(messages[:i+1]): exact for any template whose renderings grow by appending.
    """
    text = render(template, messages, add_generation_prompt, **variables)
    if _GENERATION_TAG.search(template):
        marked, spans = _strip_marks(
            render(template, messages, add_generation_prompt, **{**variables, _MARK_VAR: True})
        )
        if marked != text:
            raise LmforgeError("chat template renders differently when its {% generation %} blocks are tracked")
        return text, spans
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(template, messages[:i], True, **variables)
        if not text.startswith(prompt):  # template ignores add_generation_prompt mid-conversation
            prompt = render(template, messages[:i], False, **variables)
        turn = render(template, messages[: i + 1], False, **variables)
        if not (text.startswith(prompt) and text.startswith(turn)):
            raise LmforgeError(
                f"message {i}: the chat template does not render conversations by appending turns, "
                "so the loss mask cannot be found; mark assistant text with {% generation %}"
            )
        spans.append((len(prompt), _trim_after_end_token(text, len(prompt), len(turn), end_tokens)))
    return text, spans
