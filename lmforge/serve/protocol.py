"""OpenAI's request bodies as pydantic models, and the error JSON every failure answers with.

Validation is strict (a string is not an int, a bool is not a number) so a client's mistake is a
400 naming the field, never a coercion that silently changes the request. Every number has a
range (a seed fits 64 bits, a penalty cannot overflow a logit). OpenAI fields this server does not
implement (logit_bias, tools, response_format, ...) are refused unless they ask for the default;
other unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.

The body itself is checked before any field: valid UTF-8 JSON without NaN/Infinity, no integer
over 64 bits (a 4,300-digit one would even fail to print in an error message), nesting at most
MAX_DEPTH deep, no lone surrogate in any string (the tokenizer cannot encode one): each a 400
naming where, never a 500.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

MAX_DEPTH = 32  # JSON nesting; a chat request with image parts needs 6
_INT64 = 2**63
# Fields OpenAI (or vLLM) defines that this server does not implement -> the values that ask for nothing.
UNSUPPORTED = {
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "min_tokens": (None, 0),
    "min_p": (None, 0, 0.0),
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
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Fields completions and chat share."""

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)  # torch generators take 64 bits
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # Extensions other servers (vLLM) accept too.
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100.0)
    logit_bias: Any = None
    best_of: Any = None
    min_tokens: Any = None
    min_p: Any = None

    @field_validator("logit_bias", "best_of", "min_tokens", "min_p")
    @classmethod
    def _refuse(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_unless_default(value, info)

    @model_validator(mode="after")
    def _check(self) -> _Sampling:
        stops = self.stop_list()
        if len(stops) > 4:
            raise ValueError("stop: at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop: stop sequences must not be empty")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty/frequency_penalty are not supported (use repetition_penalty)")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: Any = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None

    @field_validator("tools", "tool_choice", "functions", "function_call", "response_format")
    @classmethod
    def _refuse(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_unless_default(value, info)

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


def refuse_unless_default(value: Any, info: ValidationInfo) -> Any:
    if not any(value == ok and type(value) is type(ok) for ok in UNSUPPORTED[info.field_name]):
        raise ValueError(f"not supported by this server (got {_short(value)})")
    return value


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


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
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{loc}: {msg}" if loc else msg, param=loc) from None
