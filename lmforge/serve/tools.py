"""Tool calling for /v1/chat/completions: tools into the prompt, calls out of the output.

Into the prompt: the checkpoint's chat template gets `tools=` (OpenAI's tool objects, as
transformers' apply_chat_template passes them), assistant messages their `tool_calls` (arguments
as a dict) and tool messages their `tool_call_id`. A template that never mentions `tools` gets them
folded into the messages instead, in the built-in template's Hermes/Qwen wording (tools listed in
the system turn, calls as <tool_call> blocks in the assistant's text, results in <tool_response>).

Out of the output, two formats (whichever the model writes):
- Hermes/Qwen: text, then one or more `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- JSON (Llama 3 style, and what the grammar forces): the whole output is one call object
  (`"arguments"` or `"parameters"`), or a list of them, optionally after `<|python_tag|>`.
A call is returned only when it names a declared tool with an object of arguments (validated
against the schema when the tool is `strict`); otherwise the text is plain content.

tool_choice: "none" renders no tools and parses nothing; "auto" parses whatever comes; "required"
and a named function constrain the output with a JSON Schema grammar ({"name": const, "arguments":
the function's parameters}; a list of them for "required" with parallel_tool_calls), so even an
untrained model writes a valid call. parallel_tool_calls false: at most one call is returned.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from lmforge.infer.grammar import GrammarSpec
from lmforge.tokenizer.chat import TOOLS_POSTAMBLE, TOOLS_PREAMBLE

from .protocol import ChatMessage, ChatRequest, Tool

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass
class ToolSet:
    """A request's tools and how calls are made: mode "auto", "required" or "named"."""

    tools: list[Tool]
    mode: str
    parallel: bool = True
    named: str | None = None

    @classmethod
    def of(cls, req: ChatRequest) -> ToolSet | None:
        mode = req.tool_mode()
        if mode == "none":
            return None
        named = req.tool_choice.function.name if mode == "named" else None
        return cls(list(req.tools), mode, req.parallel_tool_calls, named)

    @property
    def by_name(self) -> dict[str, Tool]:
        return {t.function.name: t for t in self.tools}

    def grammar(self) -> GrammarSpec | None:
        """The JSON Schema grammar that forces a call ("required" / "named"); None for "auto"."""
        if self.mode == "auto":
            return None
        chosen = [t for t in self.tools if self.mode == "required" or t.function.name == self.named]
        defs, options = {}, []
        for i, t in enumerate(chosen):
            params = t.function.parameters or {"type": "object", "properties": {}, "additionalProperties": False}
            defs[f"tool_{i}"] = _rebase_refs(params, f"#/$defs/tool_{i}")
            options.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": t.function.name}, "arguments": {"$ref": f"#/$defs/tool_{i}"}},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
            )
        call = options[0] if len(options) == 1 else {"anyOf": options}
        if self.mode == "required" and self.parallel:
            call = {"type": "array", "items": call, "minItems": 1}
        return GrammarSpec("json_schema", json.dumps({**call, "$defs": defs}))

    def call(self, obj) -> dict | None:
        """{"name", "arguments": JSON text} for a parsed call object naming a declared tool, else None."""
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as JSON text
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        tool = self.by_name.get(obj["name"])
        if tool is None or not isinstance(args, dict) or (self.named and obj["name"] != self.named):
            return None
        if tool.function.strict and tool.function.parameters is not None:
            import jsonschema

            if not jsonschema.validators.validator_for(tool.function.parameters)(tool.function.parameters).is_valid(
                args
            ):
                return None
        return {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}


def _rebase_refs(schema, base: str):
    """`schema` with its local $refs ("#...") pointing under `base`, where it now lives."""
    if isinstance(schema, dict):
        return {
            k: base + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else _rebase_refs(v, base)
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_rebase_refs(v, base) for v in schema]
    return schema


# ----------------------------------------------------------------------------- into the prompt


def template_messages(messages: list[ChatMessage], contents: list, tools: ToolSet | None, template: str):
    """(message dicts for the chat template, the `tools` template variable). `contents`: each
    message's content as the template takes it (text, or parts)."""
    plain = []
    for m, content in zip(messages, contents):
        d = {"role": m.role, "content": "" if content is None else content}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _args(c)}}
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        plain.append(d)
    listed = [t.model_dump(exclude_none=True, by_alias=True) for t in tools.tools] if tools else None
    if "tools" in template:  # the template renders tools, calls and results itself
        return plain, listed
    return _fold(plain, listed), None


def _args(call) -> dict | str:
    """A call's arguments as templates take them: a dict (its JSON text when not an object)."""
    try:
        args = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments
    return args if isinstance(args, dict) else call.function.arguments


def _fold(plain: list[dict], tools: list[dict] | None) -> list[dict]:
    """Tools, calls and results written into plain messages, for a template that knows none of them."""
    out = []
    for d in plain:
        d = dict(d)
        calls = d.pop("tool_calls", None)
        if calls:
            text = d["content"] if isinstance(d["content"], str) else ""
            blocks = [
                f"{_OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']})}\n{_CLOSE}"
                for c in calls
            ]
            d["content"] = "\n".join([text, *blocks] if text else blocks)
        if d.pop("tool_call_id", None) is not None and isinstance(d["content"], str):
            d["content"] = f"<tool_response>\n{d['content']}\n</tool_response>"
        out.append(d)
    if tools:
        listing = TOOLS_PREAMBLE + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_POSTAMBLE
        if out and out[0]["role"] == "system" and isinstance(out[0]["content"], str):
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + listing}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


# ----------------------------------------------------------------------------- out of the output


@dataclass
class ToolStream:
    """One choice's output, pushed as it streams: content to show now, and each call once whole.

    Content flows through until it may start a call: text that could begin `<tool_call>` is held
    back; an output that starts like JSON (or with <|python_tag|>), and any output under a forced
    call, is held to the end and parsed whole."""

    tools: ToolSet
    held: str = ""
    state: str = "start"  # "start" (nothing shown yet), "content", "calls" (after a <tool_call>), "json"
    calls: list[dict] = field(default_factory=list)  # {"id", "name", "arguments"}

    def push(self, text: str) -> tuple[str, list[dict]]:
        """(content to emit, new calls)."""
        self.held += text
        if self.state == "start":
            head = self.held.lstrip()
            if self.tools.mode != "auto" or head[:1] in ("{", "[") or head.startswith(_PYTHON_TAG):
                self.state = "json"
            elif not head or _PYTHON_TAG.startswith(head):
                return "", []
            else:
                self.state = "content"
        if self.state == "json":
            return "", []
        out, new = "", []
        while True:
            if self.state == "content":
                at = self.held.find(_OPEN)
                cut = len(self.held) - _partial_suffix(self.held, _OPEN) if at < 0 else at
                text = self.held[:cut]
                if not (self.calls and not text.strip()):  # whitespace after a call stays held
                    out, self.held = out + text, self.held[cut:]
                if at < 0:
                    return out, new
                self.held, self.state = self.held[self.held.find(_OPEN) :], "calls"
            end = self.held.find(_CLOSE)  # "calls": held starts with <tool_call>
            if end < 0:
                return out, new
            block, self.held = self.held[: end + len(_CLOSE)], self.held[end + len(_CLOSE) :]
            got = self._block(block)
            if got is None:
                out += block
            else:
                new.append(got)
            self.state = "content"

    def finish(self, finish_reason: str | None) -> tuple[str, list[dict], str | None]:
        """(the rest of the content, the last calls, the finish reason: "tool_calls" when calls were made)."""
        rest, new, self.held = self.held, [], ""
        if finish_reason == "stop":  # a cut-off output ("length") is never a call
            if self.state == "json":
                try:
                    obj = json.loads(rest.strip().removeprefix(_PYTHON_TAG))
                except json.JSONDecodeError:
                    obj = None
                calls = [self.tools.call(o) for o in (obj if isinstance(obj, list) else [obj])]
                if calls and all(calls) and (self.tools.parallel or len(calls) == 1):
                    new, rest = [self._add(c) for c in calls], ""
            elif self.state == "calls":  # a last block left unclosed
                got = self._block(rest)
                if got is not None:
                    new, rest = [got], ""
        if self.calls and not rest.strip():
            rest = ""  # the whitespace around the calls
        return rest, new, "tool_calls" if self.calls and finish_reason == "stop" else finish_reason

    def _block(self, block: str) -> dict | None:
        m = _BLOCK.search(block)
        try:
            obj = json.loads(m.group(1)) if m else None
        except json.JSONDecodeError:
            return None
        got = self.tools.call(obj)
        if got is None or (not self.tools.parallel and self.calls):
            return None
        return self._add(got)

    def _add(self, call: dict) -> dict:
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", **call}
        self.calls.append(call)
        return call


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (held back: it may be its start)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


def message_calls(calls: list[dict]) -> list[dict]:
    """Calls as a response message's `tool_calls`."""
    return [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls
    ]


def call_deltas(calls: list[dict], first_index: int) -> list[dict]:
    """Streamed `tool_calls` deltas: per call its index, id and name first, then its arguments."""
    out = []
    for k, c in enumerate(calls, first_index):
        out.append({"index": k, "id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": ""}})
        out.append({"index": k, "function": {"arguments": c["arguments"]}})
    return out
