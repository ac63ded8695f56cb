"""OpenAI's request bodies as pydantic models, and the error JSON every failure answers with.

Validation is strict (a string is not an int, a bool is not a number) so a client's mistake is a
400 naming the field, never a coercion that silently changes the request. Every number has a
range (a seed fits 64 bits, a penalty cannot overflow a logit).

No field is ignored: a field this server does not know is a 400 naming it ("unknown field"), at
the top level and inside messages, tools and formats alike. Every accepted field is honoured:

- sampling: temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty,
  frequency_penalty, logit_bias (token ids within the vocabulary), seed, n, stop, max_tokens
  (max_completion_tokens); unset ones take the checkpoint's generation_config.json defaults;
- output: stream, stream_options.include_usage, logprobs, top_logprobs, echo (completions);
- structure: response_format (text, json_object, json_schema: grammar-constrained), tools,
  tool_choice, parallel_tool_calls (serve/tools.py); messages with role "tool" and assistant
  `tool_calls` are rendered by the chat template;
- informational only, recorded nowhere and changing nothing by design: `user`, `metadata`
  (at most 16 string pairs), `store` (false only: this server stores no completion).

OpenAI fields accepted only at the value that asks for nothing (anything else is a 400 saying it
is not implemented): `suffix` (empty), `best_of` (= n), `min_tokens` (0), `functions` and
`function_call` (deprecated: use tools), and on an assistant message `refusal`, `annotations`,
`audio` and `function_call` (null or empty), which clients echo back from a response.

The body itself is checked before any field: valid UTF-8 JSON without NaN/Infinity, no integer
over 64 bits (a 4,300-digit one would even fail to print in an error message), nesting at most
MAX_DEPTH deep, no lone surrogate in any string (the tokenizer cannot encode one): each a 400
naming where, never a 500.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

MAX_DEPTH = 32  # JSON nesting; a chat request with image parts needs 6
_INT64 = 2**63
_FIELD_PREFIX = re.compile(r"^([a-z_][a-z0-9_.]*): ")
_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's function and schema names
# Fields OpenAI (or vLLM) defines that this server accepts only at the value that asks for nothing.
NOT_IMPLEMENTED = {
    "suffix": (None, ""),
    "min_tokens": (None, 0),
    "functions": (None,),
    "function_call": (None,),
    "refusal": (None,),
    "annotations": (None, []),
    "audio": (None,),
}


class APIError(Exception):
    """An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        # A message may quote the client's input: a lone surrogate in it must not break the JSON encoder.
        message, param = _printable(message), None if param is None else _printable(param)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _printable(text: str) -> str:
    """`text` with lone surrogates written as \\udXXX escapes, so it encodes as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


def check_json_schema(schema: Any) -> None:
    """ValueError unless `schema` is a valid JSON Schema (the draft its $schema names, else the latest)."""
    import jsonschema

    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise ValueError(f"not a valid JSON Schema{f' at {where}' if where else ''}: {e.message}") from None


class StreamOptions(_Request):
    include_usage: bool = False


class JSONSchemaFormat(_Request):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    name: str = Field(pattern=_NAME)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # honoured either way: the output always matches (grammar-constrained)

    @field_validator("schema_")
    @classmethod
    def _valid(cls, value: dict | None) -> dict | None:
        if value is not None:
            check_json_schema(value)
        return value


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is required with type "json_schema" and only with it')
        return self


class FunctionDef(_Request):
    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict | None = None  # a JSON Schema of the arguments object; None: no arguments
    strict: bool | None = None  # true: a call whose arguments do not validate is not returned as a call

    @field_validator("parameters")
    @classmethod
    def _valid(cls, value: dict | None) -> dict | None:
        if value is not None:
            check_json_schema(value)
            if value.get("type", "object") != "object":
                raise ValueError(f'the arguments are a JSON object: type must be "object", got {_short(value["type"])}')
        return value


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Request):
    name: str = Field(pattern=_NAME)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Request):
    id: str = Field(min_length=1)
    type: Literal["function"]
    function: FunctionCall


class _Sampling(_Request):
    """Fields completions and chat share. None: the checkpoint's generation_config.json default,
    else OpenAI's."""

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)  # torch generators take 64 bits
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None
    user: str | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    store: Literal[False] | None = None
    # Extensions other servers (vLLM) accept too.
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100.0)
    min_tokens: int | None = None

    @field_validator("min_tokens")
    @classmethod
    def _refuse_min_tokens(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_unless_default(value, info)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit() or not token.isascii():
                raise ValueError(f"the keys are token ids (decimal strings), got {_short(token)}")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {token} must be in [-100, 100], got {bias}")
        return value

    @model_validator(mode="after")
    def _check(self) -> _Sampling:
        stops = self.stop_list()
        if len(stops) > 4:
            raise ValueError("stop: at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop: stop sequences must not be empty")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def token_bias(self) -> dict[int, float]:
        return {int(t): b for t, b in (self.logit_bias or {}).items()}


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None  # fill-in-the-middle is not implemented: only empty
    best_of: int | None = Field(None, ge=1, le=16)

    @field_validator("suffix")
    @classmethod
    def _refuse_suffix(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_unless_default(value, info)

    @model_validator(mode="after")
    def _check_best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of: only best_of = n ({self.n}) is implemented (no ranking), got {self.best_of}")
        return self


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: Any = None


class InputAudio(_Request):
    data: str  # base64 of the file's bytes
    format: Literal["wav", "mp3", "flac", "ogg"]


class AudioPart(_Request):
    type: Literal["input_audio"]
    input_audio: InputAudio


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart | AudioPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant only
    tool_call_id: str | None = None  # tool only: the call this message answers
    # Fields a client echoes back from an assistant response: accepted when they say nothing.
    refusal: None = None
    annotations: list | None = None
    audio: None = None
    function_call: None = None

    @field_validator("annotations")
    @classmethod
    def _refuse_annotations(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_unless_default(value, info)

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls: only an assistant message has tool calls (this one is {self.role})")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool_call_id: a tool message needs the id of the call it answers (and only it)")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content: only an assistant message with tool_calls may have no content")
        if isinstance(self.content, list) and self.role != "user" and any(p.type != "text" for p in self.content):
            raise ValueError(f"content: a {self.role} message takes text parts only")
        return self


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, "none" without
    parallel_tool_calls: bool = True
    functions: None = None
    function_call: None = None

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _check_tools(self) -> ChatRequest:
        names = [t.function.name for t in self.tools or []]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"tools: two tools are named {dup!r}")
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            raise ValueError("tool_choice: needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice: no tool is named {choice.function.name!r} (tools: {', '.join(names)})")
        fmt = self.response_format
        if fmt is not None and fmt.type != "text" and self.tool_mode() != "none":
            raise ValueError('response_format: a JSON format and tools together need tool_choice "none"')
        call_ids = set()
        for i, m in enumerate(self.messages):
            call_ids |= {c.id for c in m.tool_calls or []}
            if m.role == "tool" and m.tool_call_id not in call_ids:
                raise ValueError(f"messages.{i}.tool_call_id: no earlier assistant tool call has id {m.tool_call_id!r}")
        return self

    def tool_mode(self) -> str:
        """ "none", "auto", "required" or "named" (tool_choice with its defaults applied)."""
        if not self.tools:
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"


def refuse_unless_default(value: Any, info: ValidationInfo) -> Any:
    if not any(value == ok and type(value) is type(ok) for ok in NOT_IMPLEMENTED[info.field_name]):
        raise ValueError(f"not implemented by this server (got {_short(value)})")
    return value


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _data_path(data: Any, loc: tuple) -> list:
    """pydantic's error location without the union-member tags it inserts (`str`, `literal[...]`,
    a model's name): only the keys and indexes that lead into the request body."""
    path = []
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            continue
        path.append(part)
    return path


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _check_tree(data: Any) -> None:
    """APIError(400) for nesting deeper than MAX_DEPTH or a string with a lone surrogate (JSON's
    "\ud800" escapes decode to one; no UTF-8 encoder or tokenizer takes it). Iterative: a deep body
    cannot exhaust the stack here."""
    stack = [(data, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(
                400, f"the request body is nested more than {MAX_DEPTH} levels deep (at {where})", param=where or None
            )
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise APIError(
                    400,
                    f"{where or 'body'}: the string has a lone UTF-16 surrogate "
                    f"({value[e.start]!r} at character {e.start}); send valid Unicode",
                    param=where or None,
                ) from None
        elif isinstance(value, int) and not -_INT64 <= value < 2 * _INT64:  # bool is an int in range
            raise APIError(
                400,
                f"{where or 'body'}: the integer needs {value.bit_length()} bits; at most 64 are accepted",
                param=where or None,
            )
        elif isinstance(value, dict):
            for k, v in value.items():
                stack.append((k, where, depth + 1))  # keys are strings too
                stack.append((v, f"{where}.{k}" if where else str(k), depth + 1))
        elif isinstance(value, list):
            stack.extend((v, f"{where}.{i}" if where else str(i), depth + 1) for i, v in enumerate(value))


def parse(cls: type[_Request], raw: bytes) -> Any:
    """Request bytes -> a validated model, or APIError(400) saying which field is wrong."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, f"the request body is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, NaN/Infinity, a 4,300-digit integer
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    _check_tree(data)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        # A union's members each report; the one that got deepest into the body says most.
        err = max(e.errors(), key=lambda err: len(_data_path(data, err["loc"])))
        path = _data_path(data, err["loc"]) + ([err["loc"][-1]] if err["type"] == "missing" else [])
        loc = ".".join(str(p) for p in path) or None
        msg = err["msg"].removeprefix("Value error, ")
        if loc is None and _FIELD_PREFIX.match(msg):  # a check across fields names the field first
            loc = _FIELD_PREFIX.match(msg).group(1)
            msg = msg[len(loc) + 2 :]
        if err["type"] == "extra_forbidden":
            msg = "unknown field: this server does not implement it (it refuses what it would otherwise ignore)"
        elif err["type"] == "none_required":  # a field accepted only when it asks for nothing
            msg = f"not implemented by this server (got {_short(err['input'])}; only null is accepted)"
            if loc in ("functions", "function_call"):
                msg += "; functions are deprecated by OpenAI: use tools and tool_choice"
        raise APIError(400, f"{loc}: {msg}" if loc else msg, param=loc) from None
