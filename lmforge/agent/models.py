"""What the agent talks to: one chat turn with OpenAI tool calling, from an HTTP endpoint or a local
lmforge model. Both return a `Reply`: the assistant message as the OpenAI API writes it
({"role": "assistant", "content": ..., "tool_calls": [{"id", "type": "function", "function":
{"name", "arguments": JSON text}}]}) and the tokens spent.

- `EndpointChat`: POST /v1/chat/completions on any OpenAI-compatible server (`lmforge serve`, vLLM,
  OpenAI...), with the standard library's urllib (no client library needed at run time).
- `LocalChat`: an lmforge checkpoint in this process, speaking exactly what `lmforge serve` speaks:
  the request is validated by the server's own models, tools are rendered through the checkpoint's
  chat template and calls parsed out of the output by serve/tools.py, and a forced tool_choice
  ("required" or a named function) constrains decoding with the same JSON Schema grammar.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lmforge.common import LmforgeError


@dataclass
class Reply:
    message: dict
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ChatModel(Protocol):
    name: str

    def chat(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        parallel_tool_calls: bool = True,
    ) -> Reply: ...


def request_body(model: str, messages, tools, tool_choice, max_tokens: int, temperature: float, parallel: bool) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
    if tools:
        body["tools"] = tools
        if tool_choice is not None:
            body["tool_choice"] = tool_choice
        if not parallel:  # sent only when off: the default everywhere is on
            body["parallel_tool_calls"] = False
    return body


@dataclass
class EndpointChat:
    """An OpenAI-compatible endpoint. `base_url` with or without the trailing /v1; `model="default"`
    takes the first model the server lists."""

    base_url: str
    model: str = "default"
    api_key: str = "EMPTY"
    timeout: float = 120.0
    name: str = field(init=False, default="")

    def __post_init__(self) -> None:
        url = self.base_url.rstrip("/")
        self.root = url if url.endswith("/v1") else url + "/v1"
        if self.model == "default":
            listed = self._request("GET", "/models").get("data") or []
            if not listed:
                raise LmforgeError(f"{self.base_url}: the endpoint serves no models")
            self.model = listed[0]["id"]
        self.name = self.model

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.root + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read())["error"]["message"]
            except Exception:  # noqa: BLE001  (any non-OpenAI error body: fall back to the reason)
                detail = e.reason
            raise LmforgeError(f"{self.base_url}: the endpoint refused the request (HTTP {e.code}): {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise LmforgeError(f"{self.base_url}: cannot reach the endpoint ({reason})") from None
        except json.JSONDecodeError:
            raise LmforgeError(f"{self.base_url}: the endpoint answered with something that is not JSON") from None

    def chat(self, messages, tools=None, tool_choice=None, max_tokens=256, temperature=0.0, parallel_tool_calls=True):
        body = request_body(self.model, messages, tools, tool_choice, max_tokens, temperature, parallel_tool_calls)
        r = self._request("POST", "/chat/completions", body)
        try:
            choice = r["choices"][0]
            message = {k: v for k, v in choice["message"].items() if v is not None}
        except (KeyError, IndexError, TypeError, AttributeError):
            raise LmforgeError(f"{self.base_url}: the reply has no choices[0].message: {str(r)[:200]}") from None
        usage = r.get("usage") or {}
        return Reply(
            message, choice.get("finish_reason"), usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        )


class LocalChat:
    """An lmforge model (and its tokenizer, whose chat template renders the tools) in this process."""

    def __init__(self, model, tokenizer, name: str = "local") -> None:
        from lmforge.tokenizer.text import end_of_turn_ids

        if tokenizer is None or not tokenizer.chat_template:
            raise LmforgeError(f"{name}: the model has no tokenizer with a chat template; an agent needs one")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.stop_ids = end_of_turn_ids(tokenizer)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> LocalChat:
        from lmforge.checkpoint import load_model, load_tokenizer_if_any
        from lmforge.common import get_device

        if not Path(path).exists():
            raise LmforgeError(f"--model {path}: no such model folder (or give --endpoint URL)")
        model = load_model(path, device=get_device(device)).eval()
        return cls(model, load_tokenizer_if_any(path), Path(path).name)

    def chat(self, messages, tools=None, tool_choice=None, max_tokens=256, temperature=0.0, parallel_tool_calls=True):
        import torch

        from lmforge.infer.generate import stream_generate
        from lmforge.infer.sampling import SamplingParams
        from lmforge.serve.protocol import APIError, ChatRequest, parse
        from lmforge.serve.text import chat_prompt_ids
        from lmforge.serve.tools import ToolSet, ToolStream, message_calls
        from lmforge.tokenizer.text import TextStream

        body = request_body(self.name, messages, tools, tool_choice, max_tokens, temperature, parallel_tool_calls)
        try:
            req = parse(ChatRequest, json.dumps(body).encode())
            toolset = ToolSet.of(req)
            ids = chat_prompt_ids(self.tokenizer, req.messages, tools=toolset)
        except APIError as e:
            raise LmforgeError(
                f"{self.name}: bad chat request: {e.param + ': ' if e.param else ''}{e.message}"
            ) from None
        limit = self.model.config.max_position_embeddings
        if len(ids) + max_tokens > limit:
            raise LmforgeError(
                f"{self.name}: the conversation ({len(ids)} tokens) plus max_tokens {max_tokens} passes the "
                f"model's {limit} positions"
            )
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=temperature,
            stop_token_ids=list(self.stop_ids),
            grammar=toolset.grammar() if toolset else None,
        )
        text, n, finish = TextStream(self.tokenizer, []), 0, "length"
        with torch.inference_mode():
            for token in stream_generate(self.model, [ids], params, tokenizer=self.tokenizer):
                t = int(token[0])
                if t in self.stop_ids:
                    finish = "stop"
                    break
                n += 1
                text.push([t])
        text.flush()
        content, calls = text.text, []
        if toolset is not None:
            stream = ToolStream(toolset)
            shown, calls = stream.push(content)
            rest, last, finish = stream.finish(finish)
            content, calls = shown + rest, calls + last
        message = {"role": "assistant", "content": content if content or not calls else None}
        if calls:
            message["tool_calls"] = message_calls(calls)
        return Reply(message, finish, len(ids), n + (finish == "stop"))
